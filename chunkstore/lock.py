"""One writer at a time per store.

A writer holds an exclusive ``flock`` on ``STORE/lock`` for its whole
session; the kernel drops it when the process dies, so a killed backup
never leaves a stale lock.  Readers take no lock at all (LMDB gives them a
consistent snapshot), so restores and listings run beside a backup.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from chunkstore.errors import StoreLockedError

LOCK_FILE = "lock"


class WriterLock:
    def __init__(self, store_path: str):
        self.store_path = store_path
        self.path = os.path.join(store_path, LOCK_FILE)
        self._fd = -1

    def acquire(self, wait: float = 0.0, purpose: str = "write") -> None:
        """Take the lock, waiting up to ``wait`` seconds for another writer."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise StoreLockedError(
                        f"store {self.store_path} is busy: another writer holds it ({holder}); "
                        "wait for it to finish, or pass --wait SECONDS to queue behind it"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": os.uname().nodename, "since": time.time(), "purpose": purpose}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"{info.get('purpose', 'write')} by pid {info['pid']} on {info['host']} since {since}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
