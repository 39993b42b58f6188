"""The store's locks: who may write beside whom.

Three kinds of ``flock``, all dropped by the kernel when their process dies,
so a killed backup never leaves a stale lock:

* ``STORE/lock``: **shared** by every ordinary writer (backups of different
  disks and VMs, forget, gc...), **exclusive** by what must run alone
  (rebuild, rebuild --config, a format upgrade) and by a copy of the store
  (``flock STORE/lock cp -a ...``, README).  Only an exclusive holder writes
  a JSON note about itself into the file; shared holders are named by their
  registrations (chunkstore/registry.py).
* ``STORE/locks/disk-<hex>.lock`` and ``vm-<hex>.lock`` (hex of the UTF-8
  name): exclusive for a backup of that chain, so two backups of one disk
  are serialised while backups of different disks run at once.  Its holder
  writes its registration id (and a note) into it.
* ``STORE/locks/commit.lock``: exclusive from a commit's number reservation
  to its LMDB commit (chunkstore/session.py), so commit numbers and
  ``follows`` stay one chain that ``rebuild`` can walk.

Readers take none of them: LMDB gives them a consistent snapshot.

Lock files are opened without following a link and must be regular files
with one name (chunkstore/safefs.py), so a planted link cannot make a
backup (often root) truncate another file.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import time
from typing import Callable

from chunkstore import safefs
from chunkstore.errors import StoreLockedError, StoreReadOnlyError, UnsafePathError
from chunkstore.readonly import read_only_message
from chunkstore.registry import READER_KINDS, PathRegistry

LOCK_FILE = "lock"
LOCKS_DIR = "locks"
COMMIT_LOCK = "commit.lock"
CHAIN_KINDS = ("disk", "vm")

log = logging.getLogger("blockvault.store")


def chain_lock_name(kind: str, name: str) -> str:
    """``disk-<hex>.lock``: any chain name is a safe file name this way."""
    if kind not in CHAIN_KINDS:
        raise ValueError(f"unknown chain kind {kind!r}")
    return f"{kind}-{name.encode('utf-8').hex()}.lock"


def _note(purpose: str, session: str | None = None) -> dict:
    note = {"pid": os.getpid(), "host": os.uname().nodename, "since": time.time(), "purpose": purpose}
    if session:
        note["session"] = session
    return note


class _FileLock:
    """One flock'ed file of the store; ``what`` names it in messages."""

    def __init__(self, store_path: str, path: str, what: str):
        self.store_path = store_path
        self.path = path
        self.what = what
        self._fd = -1

    def _open(self) -> int:
        """The lock file, opened for writing: on a read-only store, a clear refusal."""
        try:
            directory = os.path.dirname(self.path)
            if os.path.abspath(directory) != os.path.abspath(self.store_path):
                safefs.make_dir(directory, "store directory")  # STORE/locks: made, or refused if a link
            fd = safefs.open_file(self.path, os.O_RDWR | os.O_CREAT, f"{self.what} file")
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise StoreReadOnlyError(read_only_message(self.store_path)) from None
            raise
        if os.fstat(fd).st_nlink != 1:
            os.close(fd)
            raise UnsafePathError(f"{self.what} file {self.path} has other names (hard links); a store's files "
                                  "have one name each: remove it (the next writer creates a new one)")
        return fd

    def _take(self, mode: int, deadline: float, wait: float, busy: Callable[[int], tuple[str, dict]]) -> None:
        """flock ``mode`` by ``deadline`` (monotonic), or StoreLockedError naming the holder.

        While it waits it says once (on the ``blockvault.store`` logger, which
        the CLI shows on stderr) whom it waits for.  ``busy(fd)`` describes the
        holder: (the sentence, a JSON-able holder or {})."""
        fd = self._open()
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                text, holder = busy(fd)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    advice = (f"waited {wait:g} s for it to finish; run the command again when it has"
                              if wait > 0 else
                              "wait for it to finish, or pass --wait SECONDS to queue behind it")
                    err = StoreLockedError(f"{text}; {advice}")
                    err.holder = holder
                    raise err from None
                # A holder writes its details just after taking the lock:
                # give it a moment before saying "holder unknown".
                if not told and (holder or time.monotonic() - started >= 1.0):
                    told = True
                    log.info("%s; waiting up to %g s for it", text, wait)
                time.sleep(0.2)
        self._fd = fd

    def _write_note(self, note: dict) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(note).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


class StoreLock(_FileLock):
    """``STORE/lock``, shared by ordinary writers, exclusive for what runs alone."""

    def __init__(self, store_path: str):
        super().__init__(store_path, os.path.join(store_path, LOCK_FILE), "store lock")
        self.shared = False
        self._asking_shared = False

    def acquire(self, wait: float = 0.0, purpose: str = "write", shared: bool = False,
                deadline: float | None = None) -> None:
        wait = max(wait, 0.0)
        deadline = time.monotonic() + wait if deadline is None else deadline
        self._asking_shared = shared
        self._take(fcntl.LOCK_SH if shared else fcntl.LOCK_EX, deadline, wait, self._busy)
        self.shared = shared
        if not shared:
            self._write_note(_note(purpose))

    def release(self) -> None:
        if self._fd >= 0 and not self.shared:
            os.ftruncate(self._fd, 0)  # the note is about the exclusive holder only
        super().release()

    def _busy(self, fd: int) -> tuple[str, dict]:
        """Who holds it.  Asking for it shared, only an exclusive holder can be in
        the way, and it wrote its note; asking for it alone, the registered
        writers come first (a note there may be a killed rebuild's, left behind)."""
        note = read_note(fd)
        writers = [] if self._asking_shared else _live_writers(self.store_path)
        if writers:
            shown = "; ".join(e.describe() for e in writers[:3]) + ("; ..." if len(writers) > 3 else "")
            count = f"{len(writers)} writer{'' if len(writers) == 1 else 's'}"
            return (f"store {self.store_path} is busy: {count} hold{'s' if len(writers) == 1 else ''} it "
                    f"({shown})", holder_of(writers[0]))
        if note:
            return f"store {self.store_path} is busy: another writer holds it alone ({describe_holder(note)})", note
        return f"store {self.store_path} is busy: another writer holds it (holder unknown)", {}


# ``STORE/lock`` taken exclusive (acquire's default): rebuild, rebuild --config, an upgrade.
WriterLock = StoreLock


class ChainLock(_FileLock):
    """A backup chain's lock (a disk's or a VM's): one backup of a chain at a time."""

    def __init__(self, store_path: str, kind: str, name: str):
        super().__init__(store_path, os.path.join(store_path, LOCKS_DIR, chain_lock_name(kind, name)),
                         f"{kind} lock")
        self.kind, self.name = kind, name

    def acquire(self, wait: float, deadline: float, purpose: str) -> None:
        self._take(fcntl.LOCK_EX, deadline, wait, self._busy)
        self._write_note(_note(purpose))

    def name_session(self, session: str, purpose: str) -> None:
        """Once the holder is registered: its registration id, for whoever waits."""
        self._write_note(_note(purpose, session))

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
        super().release()

    def _busy(self, fd: int) -> tuple[str, dict]:
        note = read_note(fd)
        holder = note
        entry = _registration(self.store_path, note.get("session"))
        if entry is not None and entry.live:
            holder = holder_of(entry)
            who = entry.describe()
        else:
            who = describe_holder(note)
        what = "VM" if self.kind == "vm" else "disk"
        return (f"{what} {self.name} is busy in store {self.store_path}: another backup of it is running "
                f"({who})", holder)


class ChainLocks:
    """The locks of several chains for a short while (forget, delete: one
    transaction), taken in name order like a session's, released on exit::

        with ChainLocks(store.path, [("disk", "web01")], wait, "forget"):
            ...
    """

    def __init__(self, store_path: str, chains, wait: float = 0.0, purpose: str = "write",
                 session: str | None = None):
        self.store_path, self.chains, self.wait, self.purpose = store_path, sorted(set(chains)), wait, purpose
        self.session = session  # the holder's registration id, for whoever finds a chain busy
        self._held: list[ChainLock] = []

    def __enter__(self) -> "ChainLocks":
        deadline = time.monotonic() + max(self.wait, 0.0)
        try:
            for kind, name in self.chains:
                lock = ChainLock(self.store_path, kind, name)
                lock.acquire(max(self.wait, 0.0), deadline, self.purpose)
                self._held.append(lock)
                if self.session:
                    lock.name_session(self.session, self.purpose)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for lock in reversed(self._held):
            lock.release()
        self._held.clear()


class CommitLock(_FileLock):
    """``STORE/locks/commit.lock``: one commit at a time, from number to LMDB commit."""

    def __init__(self, store_path: str):
        super().__init__(store_path, os.path.join(store_path, LOCKS_DIR, COMMIT_LOCK), "commit lock")

    def __enter__(self) -> "CommitLock":
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for one commit only: always worth waiting for
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_note(fd: int) -> dict:
    """What a lock file says about its holder ({} when it says nothing usable)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    try:
        since = datetime.datetime.fromtimestamp(info["since"]).astimezone().isoformat(timespec="seconds")
        return f"{info.get('purpose', 'write')} by pid {info['pid']} on {info['host']} since {since}"
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return "holder unknown"


def holder_of(entry) -> dict:
    """A registration as the ``holder`` of a busy error (docs/JSON.md)."""
    return {"pid": entry.pid, "host": entry.host, "since": entry.started, "purpose": entry.command or entry.kind,
            "session": entry.id}


def _registration(store_path: str, reg_id):
    return PathRegistry(store_path).get(reg_id) if isinstance(reg_id, str) else None


def _live_writers(store_path: str) -> list:
    return [e for e in PathRegistry(store_path).entries() if e.live and e.kind not in READER_KINDS]
