"""The writer lock seen from outside: `--wait` queues a backup behind another
holder, and a copy taken under the lock (README, "Copying a store") is a
consistent store even while backups run and queue around it."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from chunkstore import ChunkStore
from chunkstore.registry import PathRegistry
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, write_at

CS = 64 << 10
HOLD = 1.5


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _image(tmp_path, name: str, mib: int, seed: int) -> str:
    img = str(tmp_path / name)
    make_sparse(img, (mib + 4) << 20)
    write_at(img, 0, rng(seed).bytes(mib << 20))
    return img


def _packs(store: str) -> list[str]:
    return [f for _, _, fs in os.walk(os.path.join(store, "packs")) for f in fs]


def test_wait_queues_a_backup_behind_the_writer_and_then_runs_it(store_path, tmp_path):
    img = _image(tmp_path, "d.img", 2, 80)
    lock = os.open(os.path.join(store_path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.pwrite(lock, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time(),
                                "purpose": "test holder"}).encode(), 0)
    started = time.monotonic()
    proc = _cli("backup", store_path, img, "--disk", "d", "--wait", "30")
    try:
        time.sleep(HOLD)
        assert proc.poll() is None, proc.communicate()
        assert _packs(store_path) == []           # it waits before writing anything
        listed = run_cli("list", store_path, "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout)["backups"] == []
    finally:
        os.ftruncate(lock, 0)
        os.close(lock)                            # releases the flock
    out, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0 and out.strip() == "d@1", err
    assert elapsed >= HOLD
    restored = str(tmp_path / "r.img")
    assert run_cli("restore", store_path, "d@1", restored).returncode == 0
    assert same_file(restored, img)


def test_a_copy_under_the_writer_lock_is_consistent_while_backups_run(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    first = _image(tmp_path, "first.img", 4, 81)
    assert run_cli("backup", store, first, "--disk", "first").returncode == 0
    sources = {"first@1": snapshot(first, str(tmp_path / "first@1"))}
    big = _image(tmp_path, "big.img", 96, 82)       # a backup that runs long enough to copy beside
    other = _image(tmp_path, "other.img", 8, 83)
    sources["big@1"], sources["other@1"] = big, other

    running = _cli("backup", store, big, "--disk", "big")
    deadline = time.monotonic() + 60
    while not PathRegistry(store).live():   # its registration: it holds the store lock (shared)
        assert time.monotonic() < deadline and running.poll() is None, running.communicate()
        time.sleep(0.01)
    # Held mid-backup while the copy and the next backup line up behind it, so
    # the copy cannot start after the backup ended, however fast the disk is.
    running.send_signal(signal.SIGSTOP)
    copy = str(tmp_path / "copy")
    # The README's command: wait for the writer, keep the lock while copying.
    copier = subprocess.Popen(["flock", os.path.join(store, "lock"), "cp", "-a", store, copy],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    queued = _cli("backup", store, other, "--disk", "other", "--wait", "120")
    time.sleep(0.3)
    assert running.poll() is None and copier.poll() is None, "the copy did not wait for the backup"
    assert not os.path.exists(copy)
    running.send_signal(signal.SIGCONT)
    for proc in (running, copier, queued):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    verify = run_cli("verify", copy)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout + verify.stderr
    listed = json.loads(run_cli("list", copy, "--json").stdout)["backups"]
    ids = {b["id"] for b in listed}
    assert {"first@1", "big@1"} <= ids, ids       # the backup the copy waited for is in it
    for bid in ids:
        out = str(tmp_path / f"from-copy-{bid.replace('@', '-')}")
        proc = run_cli("restore", copy, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, sources[bid]), bid
    # The original store is whole too, with the queued backup in it.
    assert {b["id"] for b in json.loads(run_cli("list", store, "--json").stdout)["backups"]} == set(sources)
