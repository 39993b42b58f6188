"""Shared test helpers: images with known content, snapshots, store fingerprints."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

import lmdb
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def text_bytes(r: np.random.Generator, n: int) -> bytes:
    words = r.choice([b"alpha ", b"beta ", b"gamma\n", b"delta ", b"vault ", b"0123 "], size=n // 4 + 1)
    return b"".join(words)[:n]


def write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make_sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def resize(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def snapshot(src: str, dst: str) -> str:
    shutil.copyfile(src, dst)
    return dst


def same_file(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 << 20), fb.read(4 << 20)
            if x != y:
                return False
            if not x:
                return True


def allocated_ranges(path: str) -> list[tuple[int, int]]:
    out, pos = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
    finally:
        os.close(fd)
    return out


def store_fingerprint(store: str) -> dict:
    """Everything a store holds that matters: files (but the locks: STORE/lock, STORE/locks/) and
    every LMDB record."""
    fp = {}
    for root, _, files in os.walk(store):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, store)
            if rel in ("lock",) or rel.startswith(("index" + os.sep, "locks" + os.sep)):
                continue
            with open(path, "rb") as f:
                fp[rel] = hashlib.sha256(f.read()).hexdigest()
    index = os.path.join(store, "index")
    if os.path.isdir(index):
        env = lmdb.open(index, readonly=True, max_dbs=64, lock=False)
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                h = hashlib.sha256()
                for k, v in txn.cursor(db=db):
                    h.update(bytes(k) + b"=" + bytes(v) + b";")
                fp[f"lmdb:{name.decode()}"] = h.hexdigest()
        env.close()
    return fp


def chunk_packs(store: str) -> list[str]:
    """The store's pack files that hold chunk records (not a commit's metadata pack, format 2)."""
    from chunkstore.pack import RECORD_MAGIC, iter_pack_paths, scan_pack
    return [p for p in iter_pack_paths(store) if any(r.header.magic == RECORD_MAGIC for r in scan_pack(p).records)]


def back_up_chain(store: str, img: str, disk: str, r: np.random.Generator, change_at, snapshots: str,
                  run=None) -> dict[str, str]:
    """Points DISK@1..3 of ``img`` as a full, an incremental and a differential;
    before each later point ``r.bytes(length)`` is written at
    ``change_at(seq) -> (offset, length)``.  Returns {id: a copy of the image
    as that point saw it} (copies named ``snapshots + seq``)."""
    points = {}
    for seq, mode in ((1, "full"), (2, "incremental"), (3, "differential")):
        if seq > 1:
            offset, length = change_at(seq)
            write_at(img, offset, r.bytes(length))
        proc = (run or run_cli)("backup", store, img, "--disk", disk, "--mode", mode)
        assert proc.returncode == 0 and proc.stdout.strip() == f"{disk}@{seq}", proc.stderr
        points[f"{disk}@{seq}"] = snapshot(img, f"{snapshots}{seq}")
    return points


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, in a child process, as an administrator would run it."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL)


def freeze(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGSTOP ``proc`` and return once every thread of it is stopped: the
    signal is delivered asynchronously, and a test that fingerprints a store
    right after sending it can catch a pack write still landing."""
    import signal as _signal
    proc.send_signal(_signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = []
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with open(f"/proc/{proc.pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            return                       # it exited: nothing left to land
        if states and all(s in "Tt" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {proc.pid} did not stop within {timeout} s")


def foreground(*ignore) -> None:
    """A child's dispositions as a command typed at a terminal has them, for
    ``preexec_fn``: SIGINT, SIGTERM and SIGHUP default, then ``ignore`` ignored.
    A test run started in the background (``cmd &`` from a script) inherits
    SIGINT ignored, every child with it, and blockvault leaves an ignored
    signal ignored: a test that stops a child with SIGINT must start it so."""
    import signal as _signal
    for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(sig, _signal.SIG_DFL)
    for sig in ignore:
        _signal.signal(sig, _signal.SIG_IGN)
