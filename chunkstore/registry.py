"""Registry of running sessions and long readers (stand-in, lifecycle contract API).

Every writer session and long reader registers for its lifetime with a file
``STORE/sessions/<32 hex>.reg`` on which it holds ``flock(LOCK_EX)``: the
kernel drops the lock when the process dies, so a killed process's entry is
recognised as dead at once, without any clock.  The file holds one JSON line
(kind, pid, host, started, start_gen, command), then, for writers, one line
per pack the session creates, appended and fsynced before the pack file is
created, so gc can find and remove the packs of a session that was killed.

gc's safety rule reads ``start_gen`` (meta ``gen`` read *after* the lock was
taken): a dead chunk stamped D, or a pack switched away from at W, may go
only when every live entry has start_gen >= D (resp. W).

This is REFS's minimal stand-in for CONC's module (same API); CONC's
replaces it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

SESSIONS_DIR = "sessions"


@dataclass
class Entry:
    id: str
    kind: str = ""
    pid: int = 0
    host: str = ""
    started: float = 0.0
    start_gen: int = 0
    command: str = ""
    packs: list = field(default_factory=list)   # pack ids (bytes)
    live: bool = False
    path: str = ""


class Registration:
    """One running session's entry; ``add_pack`` before a pack file is created."""

    def __init__(self, fd: int, id_: str, start_gen: int):
        self.fd, self.id, self.start_gen = fd, id_, start_gen

    def add_pack(self, pack_id: bytes) -> None:
        if self.fd < 0:
            return
        os.write(self.fd, (pack_id.hex() + "\n").encode())
        os.fsync(self.fd)


class Registry:
    def __init__(self, store):
        self.store = store
        self.dir = os.path.join(store.path, SESSIONS_DIR)

    def _gen(self) -> int:
        refs = getattr(self.store, "refs", None)
        if refs is None:
            return 0
        with self.store.read_txn() as txn:
            return refs.gen(txn)

    @contextmanager
    def register(self, kind: str, command: str = ""):
        if self.store.read_only:
            yield Registration(-1, "", self._gen())
            return
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        reg_id = os.urandom(16).hex()
        path = os.path.join(self.dir, reg_id + ".reg")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start_gen = self._gen()
            doc = {"kind": kind, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                   "start_gen": start_gen, "command": command[:200]}
            os.write(fd, (json.dumps(doc) + "\n").encode())
            os.fsync(fd)
            yield Registration(fd, reg_id, start_gen)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)

    def entries(self) -> list[Entry]:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not name.endswith(".reg"):
                continue
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    live = False
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    live = True
                data = b""
                while chunk := os.read(fd, 1 << 16):
                    data += chunk
            finally:
                os.close(fd)
            lines = data.decode("utf-8", "replace").split("\n")
            entry = Entry(id=name[:-4], live=live, path=path)
            try:
                doc = json.loads(lines[0])
                entry.kind, entry.pid, entry.host = doc["kind"], doc["pid"], doc["host"]
                entry.started, entry.start_gen, entry.command = doc["started"], doc["start_gen"], doc["command"]
            except (ValueError, KeyError, TypeError, IndexError):
                entry.start_gen = 0  # still being written: the most careful reading
            for line in lines[1:]:
                line = line.strip()
                if len(line) == 32:
                    try:
                        entry.packs.append(bytes.fromhex(line))
                    except ValueError:
                        pass
            out.append(entry)
        return out

    def oldest_live_gen(self, exclude: str = "") -> int | None:
        gens = [e.start_gen for e in self.entries() if e.live and e.id != exclude]
        return min(gens) if gens else None

    def reap(self, entry: Entry) -> None:
        try:
            os.unlink(entry.path or os.path.join(self.dir, entry.id + ".reg"))
        except FileNotFoundError:
            pass
