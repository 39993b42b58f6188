"""The store's locks (chunkstore/lock.py) held by real child processes."""

import os
import subprocess
import sys

import pytest

from chunkstore import ChunkStore, StoreLockedError
from chunkstore.errors import UnsafePathError
from chunkstore.lock import ChainLocks, StoreLock, chain_lock_name
from helpers import REPO_ROOT

HOLDER = r"""
import sys
from chunkstore import ChunkStore
s = ChunkStore.open(sys.argv[1])
w = s.writer(purpose="backup of " + sys.argv[2], chains=[("disk", sys.argv[2])])
print(w.registration.id, flush=True)
sys.stdin.readline()
"""


def _holder(store: str, disk: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store, disk], cwd=REPO_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, proc.stdout.readline().strip()


def test_chain_locks_for_one_transaction_name_the_session_holding_the_chain(tmp_path):
    store = str(tmp_path / "s")
    ChunkStore.init(store, chunk_size=64 << 10).close()
    proc, reg_id = _holder(store, "web/disk-2000")
    try:
        with pytest.raises(StoreLockedError) as caught:
            with ChainLocks(store, [("disk", "other"), ("disk", "web/disk-2000")], 0, "forget"):
                pass
        assert caught.value.holder["session"] == reg_id and caught.value.holder["pid"] == proc.pid
        assert "disk web/disk-2000 is busy" in str(caught.value) and "backup of web/disk-2000" in str(caught.value)
        # What it took before meeting the busy one it gave back.
        with ChainLocks(store, [("disk", "other")], 0, "forget"):
            pass
        # The store lock is shared: another writer runs beside the holder; alone, nobody does.
        lock = StoreLock(store)
        lock.acquire(0, "copy", shared=True)
        lock.release()
        with pytest.raises(StoreLockedError) as alone:
            StoreLock(store).acquire(0, "rebuild")
        assert alone.value.holder["session"] == reg_id and "1 writer holds it" in str(alone.value)
    finally:
        proc.kill()
        proc.wait()
    with ChainLocks(store, [("disk", "web/disk-2000")], 0, "forget"):   # released with its process
        pass
    assert os.path.exists(os.path.join(store, "locks", "disk-" + b"web/disk-2000".hex() + ".lock"))


def test_a_chain_lock_file_name_is_the_hex_of_the_name_and_a_planted_link_is_refused(tmp_path):
    assert chain_lock_name("vm", "web01") == "vm-" + b"web01".hex() + ".lock"
    with pytest.raises(ValueError):
        chain_lock_name("pool", "x")
    store = str(tmp_path / "s")
    ChunkStore.init(store, chunk_size=64 << 10).close()
    os.makedirs(os.path.join(store, "locks"))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, os.path.join(store, "locks", chain_lock_name("disk", "d")))
    with pytest.raises(UnsafePathError):
        with ChainLocks(store, [("disk", "d")], 0, "backup"):
            pass
    assert victim.read_text() == "keep me"


def test_a_locks_or_sessions_directory_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for sub in ("locks", "sessions"):
        store = str(tmp_path / f"s-{sub}")
        opened = ChunkStore.init(store, chunk_size=64 << 10)
        os.symlink(elsewhere, os.path.join(store, sub))
        with pytest.raises(UnsafePathError):
            ChunkStore.open(store)
        with pytest.raises(UnsafePathError):   # and a writer of a store opened before the link appeared
            opened.writer(chains=[("disk", "d")])
        opened.close()
    assert os.listdir(elsewhere) == []


def test_a_killed_rebuild_s_note_does_not_hide_the_running_writers(tmp_path):
    store = str(tmp_path / "s")
    ChunkStore.init(store, chunk_size=64 << 10).close()
    with open(os.path.join(store, "lock"), "w") as f:   # what a rebuild killed mid-way leaves in the file
        f.write('{"pid": 1, "host": "gone", "since": 0, "purpose": "rebuild"}')
    proc, reg_id = _holder(store, "d")
    try:
        with pytest.raises(StoreLockedError) as caught:
            StoreLock(store).acquire(0, "rebuild")
        assert caught.value.holder["session"] == reg_id and "backup of d by pid" in str(caught.value)
        assert "rebuild by pid 1" not in str(caught.value)
    finally:
        proc.kill()
        proc.wait()
