"""SIGTERM, SIGHUP and SIGINT stop a real backup or restore cleanly.

Each test starts ``python -m engine.cli`` on real data, waits until the
command is visibly mid-way (a pack file under STORE/packs, or the restore's
partial file), and signals it.  To land the signal mid-run on any machine,
the process is frozen with SIGSTOP first, the signal queued, and SIGCONT
sent: the signal is then handled at the exact point the command had reached.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.restore import PARTIAL_SUFFIX
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at

CS = 64 << 10
EXPECTED = {signal.SIGTERM: (143, "terminated by SIGTERM"), signal.SIGHUP: (129, "terminated by SIGHUP"),
            signal.SIGINT: (130, "interrupted (SIGINT)")}


def _packs(store):
    return sorted(glob.glob(os.path.join(store, "packs", "*", "*.pack")))


def _default_dispositions():
    """What a foreground command starts with.  A test run started in the background
    inherits SIGINT ignored (shells do that), and blockvault rightly leaves an
    ignored signal ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _start(*args, ignore=None):
    def prepare():
        _default_dispositions()
        if ignore:
            signal.signal(ignore, signal.SIG_IGN)
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=prepare)


def _wait_for(proc, predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout}s")
        time.sleep(0.002)


def _signal_mid_run(proc, signum):
    """Freeze, queue the signal, resume; returns (exit code, stderr, seconds from resume to exit)."""
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signum)
    resumed = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, time.monotonic() - resumed


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory):
    """A 64K-chunk store at zstd level 19 with one small backup, and a 128 MiB image
    of low-entropy bytes that takes that level several seconds to compress."""
    base = tmp_path_factory.mktemp("signals")
    store = str(base / "store")
    assert run_cli("init", store, "--chunk-size", "64K", "--compression-level", "19").returncode == 0
    small = str(base / "small.img")
    make_sparse(small, 32 * CS)
    write_at(small, 3 * CS, rng(70).bytes(5 * CS))
    proc = run_cli("backup", store, small, "--disk", "small")
    assert proc.returncode == 0, proc.stderr
    big = str(base / "big.img")
    make_sparse(big, 512 << 20)
    with open(big, "r+b") as f:
        f.write(np.random.default_rng(71).integers(0, 16, size=128 << 20, dtype=np.uint8).tobytes())
    return store, snapshot(small, str(base / "small.copy")), big


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_aborts_backup_and_deletes_its_packs(slow_store, tmp_path, signum):
    store, small, big = slow_store
    before, packs_before = store_fingerprint(store), _packs(store)
    proc = _start("backup", store, big, "--disk", "big")
    _wait_for(proc, lambda: len(_packs(store)) > len(packs_before), "pack file of the running backup")
    code, out, err, took = _signal_mid_run(proc, signum)
    want_code, want_text = EXPECTED[signum]
    assert code == want_code, err
    assert f"blockvault: {want_text}; backup aborted, its packs deleted; the store is as it was" in err, err
    assert "Traceback" not in err and out == ""
    assert took < 15, f"{took:.1f}s from the signal to the exit"
    assert _packs(store) == packs_before
    assert store_fingerprint(store) == before
    listing = run_cli("list", store, "--json")
    assert '"big@' not in listing.stdout
    out_img = str(tmp_path / "small.out")
    assert run_cli("restore", store, "small@1", out_img).returncode == 0
    assert same_file(out_img, small)
    assert run_cli("verify", store).returncode == 0


def test_ignored_sighup_is_left_ignored(slow_store, tmp_path):
    """Started under nohup (SIGHUP ignored), a hang-up does not stop the backup."""
    store, _, big = slow_store
    img = str(tmp_path / "quick.img")
    make_sparse(img, 256 * CS)
    with open(img, "r+b") as f:
        f.write(np.random.default_rng(72).integers(0, 16, size=16 << 20, dtype=np.uint8).tobytes())
    packs_before = _packs(store)
    proc = _start("backup", store, img, "--disk", "nohup", ignore=signal.SIGHUP)
    _wait_for(proc, lambda: len(_packs(store)) > len(packs_before), "pack file of the running backup")
    code, out, err, _ = _signal_mid_run(proc, signal.SIGHUP)
    assert code == 0, err
    assert out.strip() == "nohup@1"
    restored = str(tmp_path / "nohup.out")
    assert run_cli("restore", store, "nohup@1", restored).returncode == 0
    assert same_file(restored, img)


@pytest.fixture(scope="module")
def restorable(tmp_path_factory):
    """A backup with 768 MiB of random data (stored raw), so a restore takes a while."""
    base = tmp_path_factory.mktemp("restorable")
    store = str(base / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    img = str(base / "d.img")
    make_sparse(img, 1 << 30)
    r = np.random.default_rng(73)
    with open(img, "r+b") as f:
        for _ in range(48):
            f.write(r.bytes(16 << 20))
    proc = run_cli("backup", store, img, "--disk", "d")
    assert proc.returncode == 0, proc.stderr
    return store, img


@pytest.mark.parametrize("signum,name", [(signal.SIGTERM, "out.img"), (signal.SIGHUP, "out.img"),
                                         (signal.SIGINT, "out.img"), (signal.SIGTERM, "out.vmdk")],
                         ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGTERM-vmdk"])
def test_signal_aborts_restore_and_removes_the_partial_file(restorable, tmp_path, signum, name):
    store, img = restorable
    before = store_fingerprint(store)
    target = str(tmp_path / name)
    partial = target + PARTIAL_SUFFIX
    proc = _start("restore", store, "d@1", target)
    # Mid-way: the partial file exists and has some data in it, the target does not.
    _wait_for(proc, lambda: os.path.exists(partial) and os.stat(partial).st_blocks > 0, "partial file with data")
    code, out, err, took = _signal_mid_run(proc, signum)
    want_code, want_text = EXPECTED[signum]
    assert code == want_code, err
    assert f"blockvault: {want_text}; restore aborted, its partial file removed; {target} is as it was" in err
    assert "store is as it was" not in err and "Traceback" not in err
    assert took < 15
    assert not os.path.lexists(partial) and not os.path.lexists(target)
    assert os.listdir(tmp_path) == []
    assert store_fingerprint(store) == before
    # The store still restores the backup, byte for byte.
    target = str(tmp_path / "again.img")
    assert run_cli("restore", store, "d@1", target).returncode == 0
    assert same_file(target, img)
