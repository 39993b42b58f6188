"""What a rollback target holds, chunk by chunk: ``--rollback-compare``'s reader.

The target is read in batches of 32 MiB by a thread pool of its own; the
native reads (``Disk.read_chunks``) and the store's digest (keyed XXH3 or
SHA-256 on whole chunks) both release the GIL, so the batches are read and
hashed on every core.  Zero chunks are found by native's zero test and take
the zero digest without hashing.  Where the target is a raw file or block
device, its allocated extents are listed first (SEEK_DATA/SEEK_HOLE, a page
at a time): chunks in a hole of a sparse file read as zeros without reading
them.  (A vddk:// disk is read whole: a snapshot chain's unallocated blocks
read from its parent, not as zeros.)

Each batch's digests are compared with the point's, and the chunks that
differ come out a window of segments at a time as {digest: [offsets]}, the
plan engine/restore.py's write path takes; while it writes one window the
pool reads the next.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import native
import numpy as np

from engine.catalog import BackupRecord
from engine.manifest import Manifest, segment_array
from engine.repository import Repository
from engine.restore import WINDOW_SEGMENTS
from engine.targets import RestoreTarget

BATCH_BYTES = 32 << 20  # one read of the target per task
EXTENTS_PAGE = 4096


def allocated_chunks(disk, start: int, end: int, cs: int) -> np.ndarray | None:
    """A mask of the chunks of [start, end) that meet an allocated extent of a
    raw file or device; None where every chunk must be read."""
    if disk.kind != "raw":
        return None
    mask = np.zeros(-(-(end - start) // cs), dtype=bool)
    pos = start
    while pos < end:
        page = disk.extents(pos, EXTENTS_PAGE)
        if not page:
            break
        for off, length in page:
            if off >= end:
                return mask
            first, last = (off - start) // cs, -(-(min(off + length, end) - start) // cs)
            mask[first:last] = True
        pos = page[-1][0] + page[-1][1]
    return mask


def compare_windows(repo: Repository, txn, record: BackupRecord, manifest: Manifest, out: RestoreTarget,
                    workers: int, stats, on_progress) -> Iterator[dict[bytes, list[int]]]:
    """The chunks where the target differs from the point (``stats``: a
    RollbackStats, counting chunks compared and bytes read)."""
    cs, size, dlen = manifest.chunk_size, manifest.size, manifest.digest_len
    digester = repo.store.digester
    zero = digester.zero_digest
    per_task = max(1, BATCH_BYTES // cs)
    disk = out.open_reader()
    buffers = threading.local()  # one batch buffer per thread: no 32 MiB of fresh pages per batch

    def hash_batch(arr, base: int, first: int, count: int, wanted) -> tuple[list[int], int]:
        """Indices (into ``arr``, whose chunk 0 is the disk's chunk ``base``) of the
        ``count`` chunks from ``first`` that differ; bytes of the target read.
        ``wanted``: which of them to read (the others lie in holes: zeros)."""
        start = (base + first) * cs
        index = list(range(count)) if wanted is None else [j for j in range(count) if wanted[j]]
        digests = [zero] * count
        nbytes = 0
        if index:
            buf = getattr(buffers, "buf", None)
            if buf is None:
                buf = buffers.buf = bytearray(per_task * cs)
            disk.read_chunks([start + j * cs for j in index], cs, buf)
            last = index[-1]
            if start + (last + 1) * cs > size:  # a device larger than the disk: its tail is not the disk's
                at = len(index) - 1
                buf[at * cs + size - (start + last * cs):(at + 1) * cs] = bytes((start + (last + 1) * cs) - size)
            flags = native.zero_chunks(memoryview(buf)[:len(index) * cs], cs)
            view = memoryview(buf)
            for at, j in enumerate(index):
                if not flags[at]:
                    digests[j] = digester(view[at * cs:(at + 1) * cs])
            nbytes = sum(min(cs, size - (start + j * cs)) for j in index)
        have = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, dlen)
        differ = np.flatnonzero(np.any(have != arr[first:first + count], axis=1))
        return [first + int(k) for k in differ], nbytes

    pool = ThreadPoolExecutor(workers, thread_name_prefix="bv-compare")
    try:
        for window in range(0, len(manifest.segments), WINDOW_SEGMENTS):
            w_start = window * manifest.seg_chunks * cs
            w_end = min(size, (window + WINDOW_SEGMENTS) * manifest.seg_chunks * cs)
            allocated = allocated_chunks(disk, w_start, w_end, cs)
            jobs = []
            for s in range(window, min(window + WINDOW_SEGMENTS, len(manifest.segments))):
                arr = segment_array(repo.manifests.segment(txn, manifest.segments[s], record.id, manifest, s), dlen)
                base = s * manifest.seg_chunks
                for first in range(0, len(arr), per_task):
                    count = min(per_task, len(arr) - first)
                    at = base + first - window * manifest.seg_chunks
                    wanted = None if allocated is None else allocated[at:at + count]
                    span = min(count * cs, size - (base + first) * cs)
                    jobs.append((arr, base, count, span, pool.submit(hash_batch, arr, base, first, count, wanted)))
            by_digest: dict[bytes, list[int]] = {}
            for arr, base, count, span, fut in jobs:
                differ, nbytes = fut.result()
                stats.chunks_compared += count
                stats.target_bytes_read += nbytes
                for k in differ:
                    by_digest.setdefault(arr[k].tobytes(), []).append((base + k) * cs)
                if on_progress:
                    on_progress(span)
            yield by_digest
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        out.close_reader(disk)
