"""Restore one backup to a raw image: one manifest, parallel reads, sparse writes.

The manifest is walked a window of segments at a time; within a window the
chunks are grouped by pack and sorted by offset, adjacent records are read
with one pread, and the decompression and positional writes run in a thread
pool (pread, zstd and pwrite all release the GIL).  A chunk used at several
offsets is read once.  Zero chunks are never written: the target is created
at its full size as a sparse file, so they stay holes.

The restore writes to ``TARGET.blockvault-partial`` and renames it over the
target only when every chunk is written and synced, so an interrupted
restore never leaves a half-written file under the target's name.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from chunkstore import IndexEntry
from chunkstore.config import fsync_dir
from chunkstore.pack import RECORD_HEADER_SIZE
from engine.catalog import BackupRecord
from engine.errors import BadInputError
from engine.manifest import Manifest, segment_array
from engine.pipeline import default_workers
from engine.repository import Repository

SPAN_BYTES = 8 << 20
WINDOW_SEGMENTS = 16
PARTIAL_SUFFIX = ".blockvault-partial"


@dataclass
class RestoreResult:
    record: BackupRecord
    target: str
    bytes_written: int
    chunks_written: int
    chunks_read: int


@dataclass
class _Span:
    pack_id: bytes
    offset: int
    length: int
    items: list  # (offset in span, entry, digest, [disk offsets])


def _spans(entries: list[tuple[IndexEntry, bytes, list[int]]]) -> list[_Span]:
    """Group chunk records into contiguous pack reads of at most SPAN_BYTES."""
    entries.sort(key=lambda e: (e[0].pack_id, e[0].offset))
    spans: list[_Span] = []
    for entry, digest, offsets in entries:
        rec_len = RECORD_HEADER_SIZE + entry.stored_len
        last = spans[-1] if spans else None
        if (last is not None and last.pack_id == entry.pack_id
                and last.offset + last.length == entry.offset and last.length + rec_len <= SPAN_BYTES):
            last.items.append((last.length, entry, digest, offsets))
            last.length += rec_len
        else:
            spans.append(_Span(entry.pack_id, entry.offset, rec_len, [(0, entry, digest, offsets)]))
    return spans


def check_target(target: str, force: bool) -> None:
    if os.path.isdir(target):
        raise BadInputError(f"restore target {target} is a directory; give a file name")
    if os.path.lexists(target) and not force:
        raise BadInputError(f"restore target {target} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise BadInputError(f"restore target directory {parent} does not exist")


def restore_backup(repo: Repository, ref: str, target: str, force: bool = False,
                   workers: int | None = None,
                   on_start: Callable[[BackupRecord, int], None] | None = None,
                   on_progress: Callable[[int], None] | None = None) -> RestoreResult:
    store = repo.store
    check_target(target, force)
    workers = (workers or default_workers()) * 2  # I/O-bound share: keep reads in flight
    partial = target + PARTIAL_SUFFIX
    with store.read_txn() as txn:
        record = repo.catalog.resolve(txn, ref)
        manifest = repo.manifests.get(txn, record.key, record.id)
        if on_start:
            on_start(record, manifest.nonzero_chunks * manifest.chunk_size)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, manifest.size)
            counts = _write_all(repo, txn, manifest, fd, workers, on_progress)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(partial)
            raise
        os.close(fd)
    os.replace(partial, target)
    fsync_dir(os.path.dirname(os.path.abspath(target)))
    return RestoreResult(record, target, *counts)


def _write_all(repo: Repository, txn, manifest: Manifest, fd: int, workers: int,
               on_progress) -> tuple[int, int, int]:
    store = repo.store
    cs, size, zero = manifest.chunk_size, manifest.size, store.digester.zero_digest
    written = chunks_written = chunks_read = 0

    def work(span: _Span) -> int:
        data = store.read_span(span.pack_id, span.offset, span.length)
        done = 0
        for at, entry, digest, offsets in span.items:
            raw = store.decode_chunk(data, at, entry, digest)
            for off in offsets:
                n = min(cs, size - off)
                os.pwrite(fd, raw[:n] if n < cs else raw, off)
                done += n
        return done

    with ThreadPoolExecutor(workers, thread_name_prefix="bv-restore") as pool:
        inflight: deque[Future] = deque()
        try:
            for window in range(0, len(manifest.segments), WINDOW_SEGMENTS):
                by_digest: dict[bytes, list[int]] = {}
                for s in range(window, min(window + WINDOW_SEGMENTS, len(manifest.segments))):
                    if manifest.nonzero[s] == 0:
                        continue
                    arr = segment_array(repo.manifests.segment(txn, manifest.segments[s]), manifest.digest_len)
                    base = s * manifest.seg_chunks * cs
                    for k, row in enumerate(arr):
                        d = row.tobytes()
                        if d != zero:
                            by_digest.setdefault(d, []).append(base + k * cs)
                entries = [(store.require(txn, d), d, offs) for d, offs in by_digest.items()]
                chunks_read += len(entries)
                chunks_written += sum(len(o) for o in by_digest.values())
                for span in _spans(entries):
                    inflight.append(pool.submit(work, span))
                    while len(inflight) > workers * 2 or (inflight and inflight[0].done()):
                        n = inflight.popleft().result()
                        written += n
                        if on_progress:
                            on_progress(n)
            while inflight:
                n = inflight.popleft().result()
                written += n
                if on_progress:
                    on_progress(n)
        except BaseException:
            for fut in inflight:
                fut.cancel()
            raise
    return written, chunks_written, chunks_read
