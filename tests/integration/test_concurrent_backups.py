"""Several backups into one store at once (issue 10 item 5), with real processes:
each in its own session, with its own packs; two of the same disk serialised;
a killed one seen dead at once; and the commits, interleaved, still one chain
that ``rebuild`` recreates every database from."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from chunkstore import ChunkStore
from chunkstore.pack import RECORD_MAGIC, iter_pack_paths, scan_pack
from chunkstore.registry import PathRegistry
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at

CS = 64 << 10
TEMPLATE = 2 << 20   # what every disk shares: clones of one template


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _image(tmp_path, name: str, mib: int, seed: int, template: bytes = b"") -> str:
    img = str(tmp_path / name)
    make_sparse(img, (mib + 4) << 20)
    if template:
        write_at(img, 0, template)
    write_at(img, len(template), rng(seed).bytes(mib << 20))
    return img


def _registration(store: str, pid: int, packs: int = 1, timeout: float = 120):
    """The live registration of process ``pid`` once it lists ``packs`` packs: mid-backup."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in PathRegistry(store).entries():
            if e.pid == pid and e.live and len(e.packs) >= packs:
                return e
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never registered with {packs} packs in {store}")


def _finish(proc: subprocess.Popen, expect: str) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == expect, (proc.returncode, out, err)


def _copies(store: str, digest: bytes) -> int:
    """Chunk records holding ``digest`` in all the store's packs."""
    return sum(1 for p in iter_pack_paths(store) for r in scan_pack(p).records
               if r.header.magic == RECORD_MAGIC and r.header.digest[:len(digest)] == digest)


def test_backups_of_four_disks_at_once_interleave_their_commits_and_rebuild_recreates_the_store(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    template = rng(90).bytes(TEMPLATE)
    images = {name: _image(tmp_path, f"{name}.img", mib, seed, template)
              for name, mib, seed in (("a", 40, 91), ("b", 24, 92), ("c", 12, 93), ("d", 12, 94))}
    procs = {name: _cli("backup", store, img, "--disk", name) for name, img in images.items()}
    try:
        # a and b are frozen mid-backup (each has created a pack) while the others commit.
        a = _registration(store, procs["a"].pid, packs=2)
        procs["a"].send_signal(signal.SIGSTOP)
        b = _registration(store, procs["b"].pid, packs=2)
        procs["b"].send_signal(signal.SIGSTOP)
        for name in ("c", "d"):
            _finish(procs[name], f"{name}@1")
        live = {e.pid for e in PathRegistry(store).live()}
        assert live == {procs["a"].pid, procs["b"].pid}      # c and d are done, a and b still running
        procs["b"].send_signal(signal.SIGCONT)
        _finish(procs["b"], "b@1")
        procs["a"].send_signal(signal.SIGCONT)
        _finish(procs["a"], "a@1")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    assert a.kind == b.kind == "backup" and a.command == "backup of a"
    assert PathRegistry(store).entries() == []               # every session ended and said so

    # Every point restores byte-identical, and the store verifies.
    for name, img in images.items():
        out = str(tmp_path / f"r-{name}.img")
        proc = run_cli("restore", store, f"{name}@1", out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, img), name
    verify = run_cli("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout + verify.stderr

    with ChunkStore.open(store) as s, s.read_txn() as txn:
        digest = s.digester(template[:CS])
        indexed = s.lookup(txn, digest)
        last = int.from_bytes(txn.get(b"commit.last", db=s.meta_db), "little")
    # The template was stored by every session that met it before another committed
    # it (a and b, frozen, did): twice or more in the packs, once in the index.
    assert indexed is not None and _copies(store, digest) >= 3
    assert last == 4

    # The commits (c, d, b, a, each numbered after the last committed one) are one
    # chain: a rebuild from the packs alone recreates every database identically.
    before = store_fingerprint(store)
    os.rename(os.path.join(store, "index"), str(tmp_path / "index-aside"))
    proc = run_cli("rebuild", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert store_fingerprint(store) == before


def test_two_backups_of_one_disk_the_second_fails_naming_the_first_or_waits(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = _image(tmp_path, "d.img", 24, 95)
    other = _image(tmp_path, "e.img", 4, 96)
    first = _cli("backup", store, img, "--disk", "d")
    try:
        holder = _registration(store, first.pid, packs=1)
        first.send_signal(signal.SIGSTOP)
        packs = sorted(iter_pack_paths(store))
        busy = run_cli("backup", store, img, "--disk", "d", "--json")
        assert busy.returncode == 4, busy.stdout + busy.stderr
        assert "Traceback" not in busy.stderr
        err = json.loads(busy.stdout)["error"]
        assert err["code"] == "store_locked"
        assert err["holder"]["pid"] == first.pid and err["holder"]["session"] == holder.id
        assert err["holder"]["purpose"] == "backup of d" and err["holder"]["host"] == os.uname().nodename
        assert f"disk d is busy" in err["message"] and f"pid {first.pid}" in err["message"]
        assert "--wait" in err["message"]
        assert sorted(iter_pack_paths(store)) == packs            # it wrote nothing
        assert [e.pid for e in PathRegistry(store).entries()] == [first.pid]
        # Another disk is not held up by d's backup.
        proc = run_cli("backup", store, other, "--disk", "e")
        assert proc.returncode == 0 and proc.stdout.strip() == "e@1", proc.stderr
        # With --wait the second queues, and runs once the first is done.
        log = tmp_path / "queued.err"
        with open(log, "w") as errf:
            queued = subprocess.Popen([sys.executable, "-m", "engine.cli", "backup", store, img, "--disk", "d",
                                       "--wait", "300"], cwd=REPO_ROOT, text=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=errf)
        deadline = time.monotonic() + 60
        while "waiting" not in log.read_text():                   # it says once whom it waits for
            assert time.monotonic() < deadline and queued.poll() is None, log.read_text()
            time.sleep(0.05)
        assert f"pid {first.pid}" in log.read_text() and "backup of d" in log.read_text()
        assert [e.pid for e in PathRegistry(store).entries()] == [first.pid]   # not registered yet
        first.send_signal(signal.SIGCONT)
        _finish(first, "d@1")
        out, _ = queued.communicate(timeout=300)
        assert queued.returncode == 0 and out.strip() == "d@2", log.read_text()
    finally:
        for p in (first,):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    for bid in ("d@1", "d@2"):
        out = str(tmp_path / f"r-{bid}.img")
        assert run_cli("restore", store, bid, out).returncode == 0
        assert same_file(out, img), bid



def test_a_killed_backup_is_seen_dead_at_once_and_blocks_nobody(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = _image(tmp_path, "d.img", 24, 97)
    victim = _cli("backup", store, img, "--disk", "d")
    held = _registration(store, victim.pid, packs=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (dead,) = PathRegistry(store).entries()
    assert dead.id == held.id and not dead.live and dead.pid == victim.pid
    assert len(dead.packs) >= 2                           # what gc will look for: the packs it created
    with ChunkStore.open(store) as s, s.read_txn() as txn:
        for pack_id in dead.packs:
            assert txn.get(pack_id, db=s.packs_db) is None   # never committed
    assert all(os.path.exists(os.path.join(store, "packs", p.hex()[:2], p.hex() + ".pack")) for p in dead.packs[:-1])
    # Nothing waits for it: the same disk backs up at once, without --wait, and a rebuild runs.
    proc = run_cli("backup", store, img, "--disk", "d")
    assert proc.returncode == 0 and proc.stdout.strip() == "d@1", proc.stderr
    out = str(tmp_path / "r.img")
    assert run_cli("restore", store, "d@1", out).returncode == 0 and same_file(out, img)
    rebuilt = run_cli("rebuild", store)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    # The dead registration stays (gc reclaims its packs, then reaps it); the others are gone.
    assert [(e.id, e.live) for e in PathRegistry(store).entries()] == [(dead.id, False)]


def test_rebuild_runs_alone_it_names_a_running_backup_and_leaves_the_store_as_it_was(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = _image(tmp_path, "d.img", 24, 98)
    running = _cli("backup", store, img, "--disk", "d")
    try:
        _registration(store, running.pid, packs=1)
        running.send_signal(signal.SIGSTOP)
        before = store_fingerprint(store)
        proc = run_cli("rebuild", store, "--json")
        assert proc.returncode == 4, proc.stdout + proc.stderr
        err = json.loads(proc.stdout)["error"]
        assert err["holder"]["pid"] == running.pid and err["holder"]["purpose"] == "backup of d"
        assert f"store {store} is busy: 1 writer holds it (backup of d by pid {running.pid}" in err["message"]
        assert store_fingerprint(store) == before
        running.send_signal(signal.SIGCONT)
        _finish(running, "d@1")
    finally:
        if running.poll() is None:
            running.send_signal(signal.SIGCONT)
            running.kill()
            running.wait()
    assert run_cli("rebuild", store).returncode == 0


def test_verify_beside_a_running_backup_does_not_call_its_packs_left_overs(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    first = _image(tmp_path, "a.img", 4, 99)
    assert run_cli("backup", store, first, "--disk", "a").returncode == 0
    img = _image(tmp_path, "d.img", 24, 100)
    running = _cli("backup", store, img, "--disk", "d")
    try:
        held = _registration(store, running.pid, packs=2)
        running.send_signal(signal.SIGSTOP)
        proc = run_cli("verify", store, "--json")
        doc = json.loads(proc.stdout)
        assert proc.returncode == 0 and doc["ok"] is True, proc.stdout + proc.stderr
        assert doc["unreferenced_packs"] == []                 # they are being written
        running.send_signal(signal.SIGKILL)
        running.wait()
    finally:
        if running.poll() is None:
            running.send_signal(signal.SIGCONT)
            running.kill()
            running.wait()
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    left = {os.path.basename(p["path"])[:-5] for p in doc["unreferenced_packs"]}
    on_disk = {p.hex() for p in held.packs if os.path.exists(os.path.join(store, "packs", p.hex()[:2], p.hex() + ".pack"))}
    assert doc["ok"] is True and on_disk and left >= on_disk      # now they are left-overs of a killed backup
