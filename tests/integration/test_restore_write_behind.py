"""A restore to a raw file writes behind: the image never sits whole in the page cache.

engine/targets.py RawTarget: every ``write_behind`` bytes the file's dirty pages are written
back and its clean pages dropped, and after the final fsync the rest goes too.  Checked with
mincore(2) on the real file while the restore runs (from its progress callback) and after it:
without the write-behind every restored page stays cached until memory runs short.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from engine.backup import backup_image
from engine.repository import Repository
from engine.restore import restore_backup
from engine.targets import PARTIAL_SUFFIX, RawTarget
from helpers import make_sparse, rng, same_file, write_at

MiB = 1 << 20
SIZE = 64 * MiB
BEHIND = 5 * MiB   # 64 MiB is not a multiple: the last 4 MiB are left for finish to drop

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def cached_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache (mincore over a read-only shared map; no page is touched)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_a_restore_keeps_little_of_the_image_in_the_page_cache(tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    Repository.init(store, chunk_size=1 * MiB).close()
    img = str(tmp_path / "disk.img")
    make_sparse(img, SIZE)
    write_at(img, 0, rng(31).bytes(SIZE))            # incompressible: stored raw, written whole
    with Repository.open(store) as repo:
        backup_image(repo, img, "d")

    monkeypatch.setattr(RawTarget, "write_behind", BEHIND)
    out = str(tmp_path / "restored.img")
    partial = out + PARTIAL_SUFFIX
    seen, done = [], [0]

    def progress(n):
        done[0] += n
        seen.append((done[0], cached_bytes(partial)))

    with Repository.open(store) as repo:
        restore_backup(repo, "d@1", out, workers=2, on_progress=progress)
    # while it ran: never more than a few write-behind steps and the spans in flight (8 MiB reads)
    late = [cached for written, cached in seen if written >= SIZE // 2]
    assert late and max(late) <= 24 * MiB, seen
    # and once it is done (fsynced), nothing of it is left in the cache
    assert cached_bytes(out) <= 256 << 10, cached_bytes(out)
    assert same_file(out, img)
