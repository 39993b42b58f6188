"""The registry of running sessions and readers: who may still use what.

gc may remove a dead chunk, or unlink a pack it switched away from, only
once nothing that began before may still use it (docs/DESIGN.md, "Safety by
registry, not by clock").  So every writer session and every long reader
registers for its lifetime, in a way that dies with its process::

    STORE/sessions/<32 hex>.reg   flock(LOCK_EX) held by its owner, 0600
        line 1: {"kind", "pid", "host", "started", "start_gen", "command"}
        then, for a writer, one pack id (32 hex) per line

A registration is *live* while its flock is held: the kernel drops it when
the process dies, however it dies, so a SIGKILLed backup is seen dead at
once and nothing ever waits for a timeout.  The file is written and locked
under a temporary name and published by a rename, so whoever lists
``*.reg`` never meets a registration its owner has not locked yet (it
would look dead and be reaped).  ``start_gen`` is read after the flock is
taken and before the registration is published; the owner reads the index
only after, so start_gen is never newer than anything it sees.

A writer appends each pack id and fsyncs *before* it creates the pack file:
a pack on disk that the ``packs`` database does not know is then either in
a live registration (still being written: hands off) or in a dead one
(left by a killed session: gc's to reclaim).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chunkstore import safefs

if TYPE_CHECKING:
    from chunkstore.store import ChunkStore

SESSIONS_DIR = "sessions"
SUFFIX = ".reg"
TEMP_PREFIX = ".new-"
GEN_KEY = b"gen"  # meta: the lifecycle generation (u64 LE, absent = 0), counted by gc/forget
_U64 = struct.Struct("<Q")
_ID = re.compile(r"[0-9a-f]{32}")
# Kinds that only read: they hold gc back, but the store lock does not wait for them.
READER_KINDS = frozenset({"restore", "verify", "serve", "files", "read"})


def read_gen(store: "ChunkStore") -> int:
    """The store's lifecycle generation now (0 before any forget or gc)."""
    with store.read_txn() as txn:
        value = txn.get(GEN_KEY, db=store.meta_db)
    return _U64.unpack(bytes(value))[0] if value is not None else 0


@dataclass
class Entry:
    """One registration as seen from outside."""

    id: str
    kind: str
    pid: int
    host: str
    started: float
    start_gen: int
    command: str
    packs: list[bytes] = field(default_factory=list)
    live: bool = False
    path: str = ""

    def describe(self) -> str:
        """"backup of d by pid 12 on host since 2026-..." for messages naming a holder."""
        try:
            since = datetime.datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds")
        except (ValueError, OverflowError, OSError):
            since = "?"
        return f"{self.command or self.kind} by pid {self.pid} on {self.host} since {since}"


class Registration:
    """A registration held by this process; ``close`` (or leaving ``with``) ends it."""

    def __init__(self, reg_id: str, start_gen: int, fd: int = -1, path: str = ""):
        self.id = reg_id
        self.start_gen = start_gen
        self.path = path
        self._fd = fd

    def add_pack(self, pack_id: bytes) -> None:
        """Record a pack this session is about to create (durable before the pack file exists)."""
        if self._fd < 0:
            return
        os.write(self._fd, pack_id.hex().encode() + b"\n")
        os.fsync(self._fd)

    @property
    def writes(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        """Unlink, then close (which drops the flock): a listing between the two
        sees it live, never a dead one that was in fact still running."""
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "Registration":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PathRegistry:
    """The registrations of the store at ``store_path``, read only (no store opened)."""

    def __init__(self, store_path: str):
        self.dir = os.path.join(store_path, SESSIONS_DIR)

    def entries(self) -> list[Entry]:
        """Every published registration, live or dead (a dead one stays until reaped)."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            entry = self._read(os.path.join(self.dir, name), name[:-len(SUFFIX)])
            if entry is not None:
                out.append(entry)
        return out

    def live(self) -> list[Entry]:
        return [e for e in self.entries() if e.live]

    def get(self, reg_id: str) -> Entry | None:
        if not _ID.fullmatch(reg_id):  # ids come from lock notes: never a path
            return None
        return self._read(os.path.join(self.dir, reg_id + SUFFIX), reg_id)

    def oldest_live_gen(self) -> int | None:
        gens = [e.start_gen for e in self.entries() if e.live]
        return min(gens) if gens else None

    def reap(self, entry: Entry) -> bool:
        """Remove a dead registration's file; False (and nothing removed) if it is live after all."""
        try:
            fd = safefs.open_file(entry.path, os.O_RDONLY, "session registration")
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            os.unlink(entry.path)
            return True
        finally:
            os.close(fd)

    def _read(self, path: str, reg_id: str) -> Entry | None:
        try:
            fd = safefs.open_file(path, os.O_RDONLY, "session registration")
        except FileNotFoundError:
            return None  # ended meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                live = False
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                live = True
            data = _read_all(fd)
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        try:
            head = json.loads(lines[0])
            if not isinstance(head, dict):
                raise ValueError("not an object")
        except ValueError:
            head = {}
        packs = []
        for line in lines[1:]:
            if len(line) == 32:  # a torn last line is not a pack id (its pack was never created)
                try:
                    packs.append(bytes.fromhex(line.decode("ascii")))
                except ValueError:
                    pass
        # A damaged head reads as the oldest possible session: safe for gc.
        return Entry(reg_id, str(head.get("kind", "?")), _int(head.get("pid")), str(head.get("host", "?")),
                     _float(head.get("started")), _int(head.get("start_gen")), str(head.get("command", "")),
                     packs, live, path)



class Registry(PathRegistry):
    """The registry of an open store: ``register`` reads its ``meta`` gen and read-only flag."""

    def __init__(self, store: "ChunkStore"):
        super().__init__(store.path)
        self.store = store

    def register(self, kind: str, command: str) -> Registration:
        """Register this process's ``kind`` of work for as long as the result is open."""
        if self.store.read_only:  # nothing can be written, so nothing can be removed under it either
            return Registration(os.urandom(16).hex(), read_gen(self.store))
        safefs.make_dir(self.dir, "store directory")
        reg_id = os.urandom(16).hex()
        temp = os.path.join(self.dir, TEMP_PREFIX + reg_id)
        final = os.path.join(self.dir, reg_id + SUFFIX)
        fd = safefs.create_file(temp, "session registration", flags=os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start_gen = read_gen(self.store)
            head = {"kind": kind, "pid": os.getpid(), "host": os.uname().nodename, "started": time.time(),
                    "start_gen": start_gen, "command": command}
            os.write(fd, json.dumps(head, separators=(",", ":")).encode() + b"\n")
            os.fsync(fd)
            os.rename(temp, final)
            _fsync_dir(self.dir)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            os.close(fd)
            raise
        return Registration(reg_id, start_gen, fd, final)


def _read_all(fd: int) -> bytes:
    parts, offset = [], 0
    while True:
        part = os.pread(fd, 1 << 16, offset)
        if not part:
            return b"".join(parts)
        parts.append(part)
        offset += len(part)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
