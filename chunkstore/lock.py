"""One writer at a time per store.

A writer holds an exclusive ``flock`` on ``STORE/lock`` for its whole
session; the kernel drops it when the process dies, so a killed backup
never leaves a stale lock.  Readers take no lock at all (LMDB gives them a
consistent snapshot), so restores and listings run beside a backup.

The lock file is truncated and written by whoever takes it, often root: it
is opened without following a link and must be a regular file with one
name (chunkstore/safefs.py), so a planted link or hard link cannot make a
backup truncate another file.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import time

from chunkstore import safefs
from chunkstore.errors import StoreLockedError, StoreReadOnlyError, UnsafePathError
from chunkstore.readonly import read_only_message

LOCK_FILE = "lock"


class WriterLock:
    def __init__(self, store_path: str):
        self.store_path = store_path
        self.path = os.path.join(store_path, LOCK_FILE)
        self._fd = -1

    def acquire(self, wait: float = 0.0, purpose: str = "write") -> None:
        """Take the lock, waiting up to ``wait`` seconds for another writer.

        While it waits it says once (on the ``blockvault.store`` logger, which
        the CLI shows on stderr) whom it waits for; a timeout names the holder
        and how long it waited.  The error carries the holder as ``holder``.
        """
        fd = self._open()
        if os.fstat(fd).st_nlink != 1:
            os.close(fd)
            raise UnsafePathError(f"store lock file {self.path} has other names (hard links); a store's files "
                                  "have one name each: remove it (the next writer creates a new one)")
        wait = max(wait, 0.0)
        started = time.monotonic()
        deadline = started + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = _read_holder(fd)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    advice = (f"waited {wait:g} s for it to finish; run the command again when it has"
                              if wait > 0 else
                              "wait for it to finish, or pass --wait SECONDS to queue behind it")
                    err = StoreLockedError(f"store {self.store_path} is busy: another writer holds it "
                                           f"({describe_holder(info)}); {advice}")
                    err.holder = info
                    raise err from None
                # A holder writes its details just after taking the lock:
                # give it a moment before saying "holder unknown".
                if not told and (info or time.monotonic() - started >= 1.0):
                    told = True
                    logging.getLogger("blockvault.store").info(
                        "store %s is held by another writer (%s); waiting up to %g s for it",
                        self.store_path, describe_holder(info), wait)
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": os.uname().nodename, "since": time.time(), "purpose": purpose}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def _open(self) -> int:
        """The lock file, opened for writing: on a read-only store, a clear refusal."""
        try:
            return safefs.open_file(self.path, os.O_RDWR | os.O_CREAT, "store lock file")
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise StoreReadOnlyError(read_only_message(self.store_path)) from None
            raise

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


def _read_holder(fd: int) -> dict:
    """What the lock file says about its holder ({} when it says nothing usable)."""
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
