"""Unmap the pages of the LMDB file a long writer has touched.

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
lives in the map).
"""

from __future__ import annotations

import ctypes
import os

_MADV_DONTNEED = 4
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
    return bool(ranges)
