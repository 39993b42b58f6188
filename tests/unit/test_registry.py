"""The registry of sessions (chunkstore/registry.py) with real processes: a
registration lives exactly as long as its owner, whatever kills the owner."""

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys

import pytest

import chunkstore.registry as registry_mod
from chunkstore import ChunkStore
from chunkstore.registry import GEN_KEY, SESSIONS_DIR, Registry
from helpers import REPO_ROOT

CHILD = r"""
import sys
from chunkstore import ChunkStore
from chunkstore.registry import Registry
store = ChunkStore.open(sys.argv[1])
with Registry(store).register(sys.argv[2], "test child " + sys.argv[2]) as me:
    print(me.id, me.start_gen, flush=True)
    for line in sys.stdin:            # one pack id (hex) per line; the line "end" ends it
        if line.strip() == "end":
            break
        me.add_pack(bytes.fromhex(line.strip()))
        print("added", flush=True)
print("closed", flush=True)
"""


def _store(tmp_path):
    return ChunkStore.init(str(tmp_path / "s"), chunk_size=64 << 10)


def _child(store_path: str, kind: str = "backup") -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, store_path, kind], cwd=REPO_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    reg_id, gen = proc.stdout.readline().split()
    return proc, reg_id, int(gen)


def _set_gen(store, gen: int) -> None:
    with store.env.begin(write=True) as txn:
        txn.put(GEN_KEY, struct.pack("<Q", gen), db=store.meta_db)


def test_a_child_registration_is_live_and_lists_its_packs_then_dead_once_killed(tmp_path):
    store = _store(tmp_path)
    _set_gen(store, 7)
    reg = Registry(store)
    proc, reg_id, gen = _child(store.path)
    try:
        packs = [os.urandom(16) for _ in range(3)]
        for p in packs:
            proc.stdin.write(p.hex() + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "added"
        (entry,) = reg.entries()
        assert (entry.id, entry.kind, entry.pid, entry.start_gen, entry.live) == (reg_id, "backup", proc.pid, 7, True)
        assert gen == 7 and entry.command == "test child backup" and entry.host == os.uname().nodename
        assert entry.packs == packs
        assert reg.oldest_live_gen() == 7
        assert reg.reap(entry) is False and os.path.exists(entry.path)   # a live one is never reaped
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (dead,) = reg.entries()                  # seen dead at once: the kernel dropped its flock
        assert (dead.id, dead.live, dead.packs, dead.start_gen) == (reg_id, False, packs, 7)
        assert reg.oldest_live_gen() is None
        assert reg.reap(dead) is True
        assert reg.entries() == [] and os.listdir(os.path.join(store.path, SESSIONS_DIR)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.close()


def test_an_ended_registration_leaves_no_file(tmp_path):
    store = _store(tmp_path)
    proc, _, _ = _child(store.path, "restore")
    assert [e.kind for e in Registry(store).live()] == ["restore"]
    proc.stdin.write("end\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "closed"
    proc.wait()
    assert Registry(store).entries() == []
    store.close()


def test_oldest_live_gen_is_the_minimum_over_live_registrations_only(tmp_path):
    store = _store(tmp_path)
    reg = Registry(store)
    _set_gen(store, 3)
    old, _, _ = _child(store.path)
    _set_gen(store, 9)
    young, _, _ = _child(store.path, "verify")
    _set_gen(store, 1)  # (gen never goes down; here it shows which one the killed child had)
    dead, _, _ = _child(store.path)
    dead.kill()
    dead.wait()
    try:
        assert sorted((e.start_gen, e.live) for e in reg.entries()) == [(1, False), (3, True), (9, True)]
        assert reg.oldest_live_gen() == 3
        old.kill()
        old.wait()
        assert reg.oldest_live_gen() == 9
    finally:
        for p in (old, young):
            p.kill()
            p.wait()
        store.close()


def test_start_gen_is_read_after_the_flock_and_before_the_registration_is_published(tmp_path, monkeypatch):
    store = _store(tmp_path)
    _set_gen(store, 4)
    reg = Registry(store)
    seen = {}
    real = registry_mod.read_gen

    def spying_read_gen(s):
        (name,) = os.listdir(reg.dir)
        fd = os.open(os.path.join(reg.dir, name), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["locked"] = False
        except BlockingIOError:
            seen["locked"] = True
        finally:
            os.close(fd)
        seen["listed"] = reg.entries()
        return real(s)

    monkeypatch.setattr(registry_mod, "read_gen", spying_read_gen)
    with reg.register("backup", "b") as me:
        assert me.start_gen == 4
        assert seen == {"locked": True, "listed": []}   # locked first; not listed before it has its gen
        (entry,) = reg.entries()
        assert entry.live and entry.start_gen == 4
    store.close()


def test_a_damaged_registration_reads_as_the_oldest_session(tmp_path):
    store = _store(tmp_path)
    reg = Registry(store)
    with reg.register("backup", "b") as me:
        with open(me.path, "r+b") as f:
            f.write(b"}garbage")
        (entry,) = reg.entries()
        assert entry.live and entry.start_gen == 0 and entry.kind == "?"
    store.close()


def test_a_read_only_store_registers_nothing(tmp_path):
    path = str(tmp_path / "s")
    ChunkStore.init(path, chunk_size=64 << 10).close()
    with ChunkStore.open(path) as store:
        _set_gen(store, 2)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", path, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a bind mount read-only here")
        store = ChunkStore.open(str(mnt))
        assert store.read_only
        with Registry(store).register("restore", "r") as me:
            assert me.start_gen == 2 and not me.writes
            me.add_pack(os.urandom(16))          # a no-op, not an error
            assert Registry(store).entries() == []
        store.close()
        assert not os.path.exists(os.path.join(path, SESSIONS_DIR))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_registration_file_is_private_and_holds_one_json_head(tmp_path):
    store = _store(tmp_path)
    with Registry(store).register("gc", "gc STORE") as me:
        me.add_pack(b"\x01" * 16)
        st = os.stat(me.path)
        assert st.st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(me.path)).st_mode & 0o777 == 0o700
        lines = open(me.path, "rb").read().split(b"\n")
        head = json.loads(lines[0])
        assert set(head) == {"kind", "pid", "host", "started", "start_gen", "command"}
        assert (head["kind"], head["pid"], head["command"]) == ("gc", os.getpid(), "gc STORE")
        assert lines[1:] == [b"01" * 16, b""]
    store.close()
