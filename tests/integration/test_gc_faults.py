"""gc with real processes (issue 10 item 7, gc part): a restore reading a pack gc repacks,
a full file system while repacking, and SIGKILL at random points of gc."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from chunkstore import ChunkStore
from engine.repository import Repository
from engine.restore import restore_backup
from engine.verify import verify_repository
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at
from lifecycle_faults import Killer
from lifecycle_helpers import delete_point

CS = 64 << 10


def setup_store(tmp_path, chunks=64):
    """a@1; a@2 with every other chunk rewritten; a@1 deleted: a@2's packs are half dead."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    r = rng(401)
    a = str(tmp_path / "a.img")
    make_sparse(a, (chunks + 16) * CS)
    write_at(a, 0, r.bytes(chunks * CS))
    assert run_cli("backup", store, a, "--disk", "a").returncode == 0
    for k in range(0, chunks, 2):
        write_at(a, k * CS, r.bytes(CS))
    assert run_cli("backup", store, a, "--disk", "a").returncode == 0
    delete_point(store, "a@1")
    return store, a


# The restore stops itself (SIGSTOP) at its first pack read: registered, its index entries read.
FROZEN_RESTORE = (
    "import os, runpy, signal, sys; from chunkstore.store import ChunkStore\n"
    "orig = ChunkStore.read_span; state = []\n"
    "def read_span(self, *a):\n"
    "    if not state:\n        state.append(1); os.kill(os.getpid(), signal.SIGSTOP)\n"
    "    return orig(self, *a)\n"
    "ChunkStore.read_span = read_span\n"
    "sys.argv = ['blockvault'] + sys.argv[1:]; runpy.run_module('engine.cli', run_name='__main__')")


def test_a_restore_reading_a_pack_that_gc_repacks_finishes_identical(tmp_path):
    store, a = setup_store(tmp_path)
    out = str(tmp_path / "restored")
    restore = subprocess.Popen([sys.executable, "-c", FROZEN_RESTORE, "restore", store, "a@2", out, "--threads", "1"],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # stopped by itself, registered
        with open(f"/proc/{restore.pid}/stat") as f:
            if f.read().split(") ")[1].split()[0] == "T":
                break
        assert time.monotonic() < deadline and restore.poll() is None, restore.communicate()
        time.sleep(0.05)
    regs = os.listdir(os.path.join(store, "sessions"))
    assert len(regs) == 1
    try:
        gc = json.loads(run_cli("gc", store, "--json", "--max-unused", "0").stdout)
        assert gc["repacked_packs"] and gc["chunks_removed"] == 32
        # The packs it replaced stay while the frozen restore may read them.
        assert gc["unlinked_packs"] == [] and set(gc["waiting_packs"]) == {p["id"] for p in gc["repacked_packs"]}
    finally:
        os.kill(restore.pid, signal.SIGCONT)
    _, err = restore.communicate(timeout=120)
    assert restore.returncode == 0, err
    assert same_file(out, a)
    later = json.loads(run_cli("gc", store, "--json").stdout)
    assert set(later["unlinked_packs"]) == set(gc["waiting_packs"])
    assert run_cli("verify", store).returncode == 0
    os.unlink(out)
    assert run_cli("restore", store, "a@2", out).returncode == 0 and same_file(out, a)


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_gc_on_a_full_file_system_leaves_the_store_unchanged(small_fs, tmp_path):
    store, a = setup_store(small_fs)
    filler = os.path.join(small_fs, "filler")
    st = os.statvfs(small_fs)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:  # leave 256 KiB: less than one repacked pack needs
        f.truncate(0)
        f.write(b"\1" * max(0, free - (256 << 10)))
    before = store_fingerprint(store)
    proc = run_cli("gc", store, "--max-unused", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "No space left on device while gc copied the live records of pack" in proc.stderr
    assert "free space on that file system" in proc.stderr and "Traceback" not in proc.stderr
    assert store_fingerprint(store) == before
    assert not [n for n in os.listdir(os.path.join(store, "sessions"))]
    os.unlink(filler)
    done = json.loads(run_cli("gc", store, "--json", "--max-unused", "0").stdout)
    assert done["dead_bytes_after"] == 0
    out = str(tmp_path / "restored")
    assert run_cli("restore", store, "a@2", out).returncode == 0 and same_file(out, a)
    assert run_cli("verify", store).returncode == 0


KILLS = 30
MAX_ROUNDS = 120


def _check(store, points, tmp_path):
    with Repository.open(store) as repo:
        report = verify_repository(repo, mark=False)
        assert report.ok, report.as_dict()
        assert report.counts_checked and report.count_drift == []
        for bid, img in points.items():
            out = str(tmp_path / "check.img")
            restore_backup(repo, bid, out, force=True)
            assert same_file(out, img), bid
            os.unlink(out)


def test_sigkill_at_random_points_of_gc(tmp_path):
    """Each round adds a point of a, deletes the oldest but two, and kills a gc somewhere in its run."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    r = rng(402)
    a = str(tmp_path / "a.img")
    make_sparse(a, 160 * CS)
    points = {}
    seq = 0

    def new_point():
        nonlocal seq
        for k in r.choice(160, 48, replace=False):
            write_at(a, int(k) * CS, r.bytes(CS))
        seq += 1
        assert run_cli("backup", store, a, "--disk", "a").stdout.strip() == f"a@{seq}"
        points[f"a@{seq}"] = snapshot(a, str(tmp_path / f"a{seq}"))

    for _ in range(3):
        new_point()
    # Kill points: inside gc's durable part, whatever the machine's speed (tests/lifecycle_faults.py:
    # its fsyncs, writes, renames and unlinks delayed and logged by strace, the kill at a random part
    # of the span a calibration run measured).  A sleep after start would land before gc begins on
    # a busy machine and after it ends on an idle one.
    chooser = random.Random(403)
    killer = Killer(("gc", store, "--max-unused", "0"), str(tmp_path), chooser)
    killer.calibrate()

    b = str(tmp_path / "b.img")
    make_sparse(b, 96 * CS)
    killed = beside = 0
    for i in range(MAX_ROUNDS):
        if killed >= KILLS:
            break
        new_point()
        oldest = min(points, key=lambda p: int(p.split("@")[1]) if p.startswith("a@") else 1 << 30)
        delete_point(store, oldest)
        os.unlink(points.pop(oldest))
        backup = None
        if i % 2:  # half of the runs: a backup of another disk at the same time, sharing some chunks
            with open(a, "rb") as f:
                write_at(b, 0, f.read(16 * CS))
            write_at(b, 32 * CS, r.bytes(32 * CS))
            b_image = snapshot(b, str(tmp_path / f"b{i}"))
            backup = subprocess.Popen([sys.executable, "-m", "engine.cli", "backup", store, b, "--disk", "b"],
                                      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if killer.run_and_kill():
            killed += 1
        else:
            assert killer.last.returncode == 0, killer.last.stderr.read()
        if backup is not None:
            out, err = backup.communicate(timeout=300)
            assert backup.returncode == 0, err
            points[out.strip()] = b_image
            beside += 1
        _check(store, points, tmp_path)
    assert beside >= KILLS // 2
    assert killed >= KILLS
    final = json.loads(run_cli("gc", store, "--json").stdout)
    assert final["dead_bytes_after"] <= final["max_unused_bytes"]
    assert final["waiting_packs"] == []
    _check(store, points, tmp_path)
    proc = run_cli("verify", store, "--json")
    assert json.loads(proc.stdout)["unreferenced_packs"] == []
