"""Unmap the pages of the LMDB file a long writer (or reader) has touched.

LMDB reads through a shared read-only map of ``data.mdb``.  Linux maps a
whole page-cache folio at a fault (folios of up to a few MiB on ext4, also
under MADV_RANDOM), and LMDB writes its pages in long runs, so a session that
touches index pages all over the file soon has the whole file counted in its
resident set: a backup that committed 1 GiB of manifest segments early showed
1.2 GB of RSS of which 78 MB was its own memory.  Those pages are clean page
cache the kernel could drop at any time, but they count wherever RSS counts
(``top``, ru_maxrss, the OOM killer's choice).

``release`` drops the process's page-table entries for the file
(MADV_DONTNEED on a shared file mapping): the next access faults the page in
again from the page cache, unchanged, so readers in other threads see the
same bytes.  Only for maps LMDB opened without MDB_WRITEMAP (nothing dirty
lives in the map: a write transaction's dirty pages are in its own heap
memory), so it is safe in the middle of any transaction, read or write.

A transaction that itself touches much releases the map as it goes
(``Paced``): a backup's final commit counts the chunks of every segment the
backup committed early (engine/references.py ``add_manifests``), 1 GiB of
them for a 4 TiB disk of 100,000 small extents.  What a page touched costs
is not its 4 KiB but the folio it is in, 100-200 KiB here on average (12 MB
of RSS for 64 segments of 16 KiB read, each a B-tree lookup and its value),
so ``Paced`` does not count bytes: it watches the process's file-backed
resident set (``/proc/self/statm``, 1.3 µs a read) and releases once that
grew by ``RELEASE_BUDGET``.  Without it the commit of 8,192 segments grew
from 69 to 222 MB RSS, all of it file pages of ``data.mdb``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable

_MADV_DONTNEED = 4
# Growth of the file-backed resident set at which ``Paced`` releases the map,
# and the steps (lookups) between two looks at it: a release costs 0.3 ms
# (it reads /proc/self/maps), a look 1.3 µs.
RELEASE_BUDGET = 8 << 20
CHECK_EVERY = 4
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


def _ranges(path: str) -> list[tuple[int, int]]:
    st = os.stat(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or int(fields[4]) != st.st_ino:
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if os.makedev(major, minor) != st.st_dev:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def release(path: str) -> bool:
    """Drop this process's mapped pages of ``path`` (LMDB's data.mdb); False
    where that cannot be done (no /proc, no glibc): harmless, only RSS."""
    madvise = _madvise()
    if madvise is None:
        return False
    try:
        ranges = _ranges(path)
    except OSError:
        return False
    for start, end in ranges:
        madvise(start, end - start, _MADV_DONTNEED)
    global _floor
    _floor = file_resident()
    return bool(ranges)


_statm_lock = threading.Lock()
_floor: int | None = None   # file_resident() right after the process's last release
_statm: tuple[int, int] | None = None   # (pid, fd of /proc/PID/statm), kept open
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_resident() -> int | None:
    """Bytes of this process's resident set that are shared file pages
    (statm's third field: RssFile + RssShmem); None without /proc."""
    global _statm
    pid = os.getpid()
    try:
        with _statm_lock:
            if _statm is None or _statm[0] != pid:  # /proc/self is resolved at open: not across a fork
                _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
            fd = _statm[1]
        return int(os.pread(fd, 128, 0).split()[2]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class Paced:
    """For one long transaction, or one reader of many (engine/manifest.py
    ``ManifestStore.segment``, from any thread: a racing step only makes a
    look come a step early or late): ``step`` once per lookup or
    read; every ``every`` steps it looks at the file-backed resident set and
    calls ``release`` (a store's ``release_map``) once that grew by
    ``budget`` since the last release (this process's, by any caller: what
    the transaction's own first steps found mapped counts too), so the
    transaction's RSS stays bounded however much of the file it touches.
    Pages a release cannot drop (a library loaded since) cost one release:
    the next budget counts from what is resident after it."""

    def __init__(self, release: Callable[[], object], budget: int = RELEASE_BUDGET, every: int = CHECK_EVERY):
        self.release = release
        self.budget = budget
        self.every = every
        self.releases = 0
        self._steps = 0
        self._base = _floor if _floor is not None else file_resident()

    def step(self) -> None:
        self._steps += 1
        if self._steps < self.every:
            return
        self._steps = 0
        if self._base is None:
            return
        now = file_resident()
        if _floor is not None and _floor < self._base:
            self._base = _floor   # released meanwhile (another thread, a nested caller)
        if now is not None and now - self._base > self.budget:
            self.release()
            self.releases += 1
            self._base = _floor if _floor is not None else file_resident()
