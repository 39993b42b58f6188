"""Manifest segments committed before the backup's own commit (issue 9 item 17).

A backup that rewrites more than 16 MiB of manifest segments commits them
early, as commits of their own (engine/backup.py commit_segments,
WriteSession.commit_early), so that its memory does not grow with them.  A
crash between those commits must leave every earlier backup as it was,
nothing of the killed one visible, and a store that the packs alone can
rebuild, including the segments a later backup then does not write again.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import pytest

from helpers import REPO_ROOT, allocated_ranges, make_sparse, run_cli, store_fingerprint

CS = 64 << 10
SEGMENT_SPAN = 1024 * CS   # disk bytes one manifest segment covers at 64 KiB chunks
BLOCK = 4096


def _one_block_per_segment(path: str, segments: int, seed: int) -> None:
    """A sparse image of ``segments`` segments with one 4 KiB block of data in each: every
    segment of its manifest is new."""
    make_sparse(path, segments * SEGMENT_SPAN)
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for s in range(segments):
            os.pwrite(fd, rnd.randbytes(BLOCK), s * SEGMENT_SPAN + rnd.randrange(SEGMENT_SPAN // BLOCK) * BLOCK)
    finally:
        os.close(fd)


def _counters(store: str) -> tuple[int, int]:
    """(commit.last, entries in ``segments``), read as any reader would, while a backup runs."""
    env = lmdb.open(os.path.join(store, "index"), readonly=True, max_dbs=16, lock=False)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            last = txn.get(b"commit.last", db=meta)
            try:
                segments = txn.stat(env.open_db(b"segments", txn=txn, create=False))["entries"]
            except lmdb.NotFoundError:
                segments = 0
        return (int.from_bytes(bytes(last), "little") if last else 0), segments
    finally:
        env.close()

def _kill_after_first_early_commit(proc, store, segments_before: int) -> None:
    """SIGKILL the backup ``proc`` once its first early commit added segments."""
    try:
        deadline = time.monotonic() + 300
        while _counters(store)[1] == segments_before:
            assert proc.poll() is None, "the backup ended before its first early commit"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert proc.poll() is None, "the backup ended before it could be killed mid-way"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()



def _same_sparse(a: str, b: str) -> bool:
    """Byte-equal, reading only where either file holds data (holes read as zeros)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    ranges = sorted(set(allocated_ranges(a)) | set(allocated_ranges(b)))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, length in ranges:
            fa.seek(start)
            fb.seek(start)
            if fa.read(length) != fb.read(length):
                return False
    return True


def _restores(store: str, point: str, source: str, out: str) -> None:
    r = run_cli("restore", store, point, out)
    assert r.returncode == 0, r.stderr
    assert _same_sparse(out, source)
    os.unlink(out)


@pytest.mark.slow
def test_a_backup_killed_between_its_early_segment_commits_leaves_the_store_whole(tmp_path):
    store, small, big, out = (str(tmp_path / n) for n in ("store", "small.img", "big.img", "r.img"))
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    _one_block_per_segment(small, 8, seed=1)
    assert run_cli("backup", store, small, "--disk", "a").returncode == 0
    last_before, segments_before = _counters(store)
    assert last_before == 1
    # 8,192 new segments (128 MiB): eight early commits of 1,024, then the backup's own.
    _one_block_per_segment(big, 8192, seed=2)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "backup", store, big, "--disk", "d"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_after_first_early_commit(proc, store, segments_before)
    last, segments = _counters(store)
    assert last > last_before and segments >= segments_before + 1024  # an early commit landed
    # Nothing of the killed backup is visible; the earlier one is intact.
    listing = run_cli("list", store)
    assert listing.returncode == 0 and "a@1" in listing.stdout and "d@" not in listing.stdout, listing.stdout
    assert run_cli("verify", store).returncode == 0
    _restores(store, "a@1", small, out)

    # The next backup of the same disk finds the killed one's segments in the index
    # and does not write them again: they are in the packs only as the killed
    # backup's early commits.
    again = run_cli("backup", store, big, "--disk", "d")
    assert again.returncode == 0 and again.stdout.strip() == "d@1", again.stderr
    _restores(store, "d@1", big, out)
    before = store_fingerprint(store)

    for name in ("data.mdb", "lock.mdb"):
        os.unlink(os.path.join(store, "index", name))
    rebuilt = run_cli("rebuild", store)
    assert rebuilt.returncode == 0, rebuilt.stderr
    after = store_fingerprint(store)
    for db in ("catalog", "manifests", "segments", "meta"):
        assert after[f"lmdb:{db}"] == before[f"lmdb:{db}"], db
    _restores(store, "d@1", big, out)
    _restores(store, "a@1", small, out)
    assert run_cli("verify", store).returncode == 0
    shutil.rmtree(store)


# A backup started with a small early-commit threshold (engine.manifest.FLUSH_SEGMENT_BYTES,
# read at each backup): a handful of segments per early commit, so small disks exercise it.
_SMALL_FLUSH = ("import runpy, sys, engine.manifest as m; m.FLUSH_SEGMENT_BYTES = 40 << 10; "
                "sys.argv = ['blockvault', *sys.argv[1:]]; runpy.run_module('engine.cli', run_name='__main__')")


def _backup_small_flush(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SMALL_FLUSH, "backup", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


def _verify_json(store: str) -> dict:
    r = run_cli("verify", store, "--json")
    doc = json.loads(r.stdout)
    assert doc["counts_checked"] is True
    assert doc["count_drift"] == [], doc["count_drift"]
    assert doc["ok"] is True and r.returncode == 0, r.stdout
    return doc


def test_segments_committed_early_are_counted_by_the_backups_commit(tmp_path):
    """The final commit counts every segment of its manifest segrefs did not
    know, the early-committed ones too: verify sees no drift, and gc after a
    forget keeps every remaining point whole."""
    store, a, b, out = (str(tmp_path / n) for n in ("store", "a.img", "b.img", "r.img"))
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    _one_block_per_segment(a, 24, seed=3)
    r = _backup_small_flush(store, a, "--disk", "a")
    assert r.returncode == 0, r.stderr
    last, _ = _counters(store)
    assert last > 2                              # early commits besides the backup's own
    shutil.copyfile(a, str(tmp_path / "a1.img"))
    os.unlink(a)
    _one_block_per_segment(a, 24, seed=4)        # every segment and chunk changes
    r = _backup_small_flush(store, a, "--disk", "a", "--mode", "incremental")
    assert r.returncode == 0, r.stderr
    shutil.copyfile(a, b)                        # b shares every segment of a@2
    r = _backup_small_flush(store, b, "--disk", "b")
    assert r.returncode == 0, r.stderr
    assert _counters(store)[0] > last + 4
    _verify_json(store)
    from lifecycle_helpers import delete_point
    assert delete_point(store, "a@1") == 24       # a@1's chunks die
    gc = run_cli("gc", store, "--max-unused", "0", "--json")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["chunks_removed"] == 24, gc.stdout
    _verify_json(store)
    _restores(store, "a@2", a, out)
    _restores(store, "b@1", b, out)


def test_a_killed_backups_early_segments_are_no_count_drift_and_keep_nothing_live(tmp_path):
    """Segments a killed backup committed early have no count (no manifest
    names them): verify must not call that drift, and gc reaps the killed
    backup's chunks regardless (the segments themselves stay: see docs/FORMAT.md)."""
    store, small, big, out = (str(tmp_path / n) for n in ("store", "small.img", "big.img", "r.img"))
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    _one_block_per_segment(small, 8, seed=5)
    assert run_cli("backup", store, small, "--disk", "a").returncode == 0
    _, segments_before = _counters(store)
    _one_block_per_segment(big, 4096, seed=6)
    proc = subprocess.Popen([sys.executable, "-c", _SMALL_FLUSH, "backup", store, big, "--disk", "d"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_after_first_early_commit(proc, store, segments_before)
    _, segments = _counters(store)
    assert segments > segments_before            # early segments no manifest names
    _verify_json(store)
    gc = run_cli("gc", store, "--max-unused", "0", "--json")
    assert gc.returncode == 0, gc.stderr
    doc = json.loads(gc.stdout)
    assert doc["reaped_sessions"] and doc["orphans_killed"] + len(doc["leftover_packs"]) > 0, gc.stdout
    _verify_json(store)
    _restores(store, "a@1", small, out)
    listing = run_cli("list", store)
    assert "d@" not in listing.stdout, listing.stdout
