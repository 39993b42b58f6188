"""Restore one backup to a target: one manifest, parallel reads, sparse writes.

The manifest is walked a window of segments at a time; within a window the
chunks are grouped by pack and sorted by offset, adjacent records are read
with one pread, and the decompression and positional writes run in a thread
pool (pread, zstd and pwrite all release the GIL).  A chunk used at several
offsets is read once.  Zero chunks are not written to a target that reads
as zeros (a new sparse file or VMDK, a disk or device declared zeroed), so
they stay holes; targets that may hold old data get them written.

Where the bytes go, and which paths may receive them, is engine/targets.py.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import native

from chunkstore import IndexEntry
from chunkstore.pack import RECORD_HEADER_SIZE
from chunkstore.registry import Registry
from engine.catalog import BackupRecord
from engine.manifest import Manifest, segment_array
from engine.pipeline import default_workers
from engine.repository import Repository
from engine.targets import (PARTIAL_SUFFIX, BlockDeviceTarget, RawTarget, RestoreTarget, VddkTarget,  # noqa: F401
                            VmdkTarget, make_target)

SPAN_BYTES = 8 << 20
WINDOW_SEGMENTS = 16


@dataclass
class RestoreResult:
    record: BackupRecord
    target: str
    bytes_written: int
    chunks_written: int
    chunks_read: int
    warnings: list[str] = field(default_factory=list)
    rollback: object = None  # engine.rollback.RollbackStats, for a rollback


@dataclass
class _Span:
    pack_id: bytes
    offset: int
    length: int
    items: list  # (offset in span, entry, digest, [disk offsets])


def _spans(entries: list[tuple[IndexEntry, bytes, list[int]]], limit: int = SPAN_BYTES) -> list[_Span]:
    """Group chunk records into contiguous pack reads of at most ``limit`` bytes (engine/copy.py too)."""
    entries.sort(key=lambda e: (e[0].pack_id, e[0].offset))
    spans: list[_Span] = []
    for entry, digest, offsets in entries:
        rec_len = RECORD_HEADER_SIZE + entry.stored_len
        last = spans[-1] if spans else None
        if (last is not None and last.pack_id == entry.pack_id
                and last.offset + last.length == entry.offset and last.length + rec_len <= limit):
            last.items.append((last.length, entry, digest, offsets))
            last.length += rec_len
        else:
            spans.append(_Span(entry.pack_id, entry.offset, rec_len, [(0, entry, digest, offsets)]))
    return spans


def restore_backup(repo: Repository, ref: str, target: str | RestoreTarget, force: bool = False,
                   workers: int | None = None,
                   on_start: Callable[[BackupRecord, int], None] | None = None,
                   on_progress: Callable[[int], None] | None = None) -> RestoreResult:
    store = repo.store
    out = target if isinstance(target, RestoreTarget) else make_target(target, force)
    out.check()
    # Asked for: that many. Left to us: two per core, as reads are I/O-bound and stay in flight;
    # four per core from a bucket, where each thread waits on its ranged GET before it decodes:
    # with two, too few GETs were in flight (bench --s3: 31% of the endpoint's GET limit).
    remote = getattr(store.backend, "remote", False)
    workers = workers or default_workers() * (4 if remote else 2)
    # Registered before its snapshot is taken: gc unlinks no pack it may read (chunkstore/registry.py).
    with Registry(store).register("restore", f"restore of {ref}"), store.read_txn() as txn:
        record = repo.catalog.resolve(txn, ref)
        manifest = repo.manifests.get(txn, record.key, record.id, record)
        if on_start:
            chunks = manifest.n_chunks if out.writes_zeros else manifest.nonzero_chunks
            on_start(record, min(chunks * manifest.chunk_size, manifest.size))
        out.open(manifest.size)
        try:
            counts = _write_all(repo, txn, record, manifest, out, workers, on_progress)
            out.finish()
        except BaseException:
            out.discard()
            raise
    return RestoreResult(record, out.target, *counts, warnings=list(out.warnings))


# Granularity of the holes a restore leaves inside a chunk, unless the
# target says otherwise (RestoreTarget.hole_block: 4 KiB for raw files).
HOLE_BLOCK = 64 << 10


def nonzero_runs(raw, block: int = HOLE_BLOCK) -> list[tuple[int, int]]:
    """[start, end) runs of ``raw`` holding a non-zero byte, in ``block`` steps.

    A chunk is stored whole even where part of it is zeros (the end of a
    file, a partly written extent), and a target that reads as zeros does
    not need those parts written: the restored file keeps the source's holes
    and the restore writes less.  With 4 MiB chunks that was most of the
    bytes written.  The zero test runs in C; the flags are scanned a run at a
    time (bytes.find), so 4 KiB blocks cost no more Python work than 64 KiB
    ones in a chunk that is all data or all zeros."""
    flags = native.zero_chunks(raw, block)
    runs: list[tuple[int, int]] = []
    pos, n = 0, len(flags)
    while pos < n:
        first = flags.find(b"\0", pos)  # the next non-zero block
        if first < 0:
            break
        end = flags.find(b"\1", first)
        if end < 0:
            end = n
        runs.append((first * block, min(end * block, len(raw))))
        pos = end
    return runs


def manifest_windows(repo: Repository, txn, record: BackupRecord, manifest: Manifest,
                     with_zeros: bool) -> Iterator[dict[bytes, list[int]]]:
    """The whole manifest, a window of segments at a time, as {digest: [disk
    offsets]}; segments holding only zero chunks are left out unless the
    target needs its zeros written (``with_zeros``).  The plan of a full
    restore; a rollback's plan (engine/rollback.py) yields only what differs."""
    cs = manifest.chunk_size
    for window in range(0, len(manifest.segments), WINDOW_SEGMENTS):
        by_digest: dict[bytes, list[int]] = {}
        for s in range(window, min(window + WINDOW_SEGMENTS, len(manifest.segments))):
            if manifest.nonzero[s] == 0 and not with_zeros:
                continue
            arr = segment_array(repo.manifests.segment(txn, manifest.segments[s], record.id, manifest, s),
                                manifest.digest_len)
            base = s * manifest.seg_chunks * cs
            for k, row in enumerate(arr):
                by_digest.setdefault(row.tobytes(), []).append(base + k * cs)
        yield by_digest


def _write_all(repo: Repository, txn, record: BackupRecord, manifest: Manifest, out: RestoreTarget,
               workers: int, on_progress, windows: Iterable[dict[bytes, list[int]]] | None = None,
               thread_prefix: str = "bv-restore") -> tuple[int, int, int]:
    """Write what ``windows`` names (default: the whole manifest) to ``out``:
    the one write path of every restore, whole or rollback.  Zero chunks are
    written (``out.zero``) only to targets that may hold old data."""
    store = repo.store
    cs, size, zero = manifest.chunk_size, manifest.size, store.digester.zero_digest
    written = chunks_written = chunks_read = 0

    sparse = not out.writes_zeros
    # A target that holds old data but can deallocate (a file rolled back in
    # place) gets the zero blocks inside a chunk punched, not written: it ends
    # as sparse as a new file the same restore would have made.
    punch = out.punches_holes
    block = getattr(out, "hole_block", HOLE_BLOCK)
    if windows is None:
        windows = manifest_windows(repo, txn, record, manifest, out.writes_zeros)
    zeros = memoryview(bytes(cs)) if out.writes_zeros else None

    def work(span: _Span) -> int:
        data = store.read_span(span.pack_id, span.offset, span.length)
        done = 0
        for at, entry, digest, offsets in span.items:
            raw = store.decode_chunk(data, at, entry, digest)
            runs = nonzero_runs(raw, block) if sparse or punch else [(0, cs)]
            view = memoryview(raw)
            for off in offsets:
                n = min(cs, size - off)
                done_to = 0
                for start, end in runs:
                    if start >= n:
                        break
                    if punch and start > done_to:
                        out.zero(off + done_to, zeros[:start - done_to])
                    done_to = min(end, n)
                    out.write(off + start, view[start:done_to])
                if punch and done_to < n:
                    out.zero(off + done_to, zeros[:n - done_to])
                done += n
        return done

    def write_zeros(offsets: list[int]) -> int:
        done = 0
        for off in offsets:
            n = min(cs, size - off)
            out.zero(off, zeros[:n])
            done += n
        return done

    with ThreadPoolExecutor(workers, thread_name_prefix=thread_prefix) as pool:
        inflight: deque[Future] = deque()
        try:
            for by_digest in windows:
                zero_offsets = by_digest.pop(zero, [])
                entries = [(store.require(txn, d), d, offs) for d, offs in by_digest.items()]
                chunks_read += len(entries)
                chunks_written += sum(len(o) for o in by_digest.values())
                tasks = [(work, span) for span in _spans(entries)]
                if zeros is not None and zero_offsets:
                    chunks_written += len(zero_offsets)
                    per_task = max(1, SPAN_BYTES // cs)
                    tasks += [(write_zeros, zero_offsets[i:i + per_task])
                              for i in range(0, len(zero_offsets), per_task)]
                for fn, arg in tasks:
                    inflight.append(pool.submit(fn, arg))
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
