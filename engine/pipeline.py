"""The backup hot path: read → drop zeros → digest → look up → compress → pack.

Work moves in batches of about 8 MiB (never less than one chunk) so every
thread task is large enough to amortise Python's overhead, and every heavy
step runs with the GIL released: the C reader, the zero test, xxhash or
sha256, and zstd.  Two kinds of task share one thread pool:

1. read+digest a batch (I/O and hashing, every chunk of the batch);
2. compress the chunks of a batch that the store does not have yet.

The main thread does the cheap, order-sensitive parts: index look-ups, the
manifest (fed in ascending chunk order), and appending to the pack.  Both
queues are bounded, which bounds memory whatever the disk size, and batch
buffers are recycled: a fresh 8 MiB buffer costs 2048 page faults, which on
a virtual machine is a sizeable share of the work of reading it.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import native

from chunkstore import ChunkStore, WriteSession
from chunkstore.pack import RECORD_HEADER_SIZE
from engine.changes import Run

BATCH_BYTES = 8 << 20


@dataclass
class IngestStats:
    chunks_read: int = 0
    bytes_read: int = 0
    zero_chunks: int = 0
    dedup_chunks: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    stored_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def iter_batches(runs: Iterable[Run], per_batch: int) -> Iterator[list[int]]:
    """Chunk indices in ascending order, ``per_batch`` at a time (across runs)."""
    batch: list[int] = []
    for first, end in runs:
        i = first
        while i < end:
            take = min(end - i, per_batch - len(batch))
            batch.extend(range(i, i + take))
            i += take
            if len(batch) == per_batch:
                yield batch
                batch = []
    if batch:
        yield batch


class _Batch:
    __slots__ = ("indices", "buf", "digests")

    def __init__(self, indices: list[int], buf: bytearray, digests: list[bytes]):
        self.indices = indices
        self.buf = buf
        self.digests = digests


class ChunkPipeline:
    """Feeds one disk's chunks into a write session; one instance per disk."""

    def __init__(self, store: ChunkStore, session: WriteSession, pool: ThreadPoolExecutor, workers: int):
        self.store = store
        self.session = session
        self.pool = pool
        self.depth = workers + 2
        self.cs = store.chunk_size
        self.digester = store.digester
        self.zero = store.digester.zero_digest
        self.stats = IngestStats()
        self._inflight: set[bytes] = set()
        self._spare: list[bytearray] = []

    def _read_and_digest(self, disk, indices: list[int], buf: bytearray) -> _Batch:
        cs = self.cs
        disk.read_chunks([i * cs for i in indices], cs, buf)
        zero_flags = native.zero_chunks(buf, cs)
        view = memoryview(buf)
        digest, zero = self.digester, self.zero
        digests = [zero if zero_flags[j] else digest(view[j * cs:(j + 1) * cs]) for j in range(len(indices))]
        return _Batch(indices, buf, digests)

    def _compress(self, buf: bytearray, picks: list[tuple[int, bytes]]) -> tuple[bytearray, list]:
        cs = self.cs
        view = memoryview(buf)
        encoded = self.store.codec.encode_many([view[j * cs:(j + 1) * cs] for j, _ in picks])
        out = [(d, codec, payload) for (_, d), (codec, payload) in zip(picks, encoded)]
        view.release()
        return buf, out

    def run(self, disk, runs: Iterable[Run], disk_size: int,
            on_chunk: Callable[[int, bytes], None],
            on_progress: Callable[[int], None] | None = None) -> IngestStats:
        """Read every chunk in ``runs``; ``on_chunk(index, digest)`` in ascending order."""
        per_batch = max(1, BATCH_BYTES // self.cs)
        batches = iter_batches(runs, per_batch)
        reads: deque[Future] = deque()
        compressions: deque[Future] = deque()
        try:
            self._fill(reads, batches, disk)
            while reads:
                batch = reads.popleft().result()
                self._fill(reads, batches, disk)
                picks = self._account(batch, disk_size, on_chunk)
                if picks:
                    compressions.append(self.pool.submit(self._compress, batch.buf, picks))
                else:
                    self._spare.append(batch.buf)
                while compressions and (compressions[0].done() or len(compressions) > self.depth):
                    self._store(compressions.popleft().result())
                if on_progress:
                    on_progress(sum(min(self.cs, disk_size - i * self.cs) for i in batch.indices))
            while compressions:
                self._store(compressions.popleft().result())
        except BaseException:
            for fut in (*reads, *compressions):
                fut.cancel()
            raise
        return self.stats

    def _fill(self, reads: deque, batches: Iterator[list[int]], disk) -> None:
        while len(reads) < self.depth:
            indices = next(batches, None)
            if indices is None:
                return
            size = len(indices) * self.cs
            buf = self._spare.pop() if self._spare else bytearray(size)
            if len(buf) != size:  # only the last batch is shorter
                buf = bytearray(size)
            reads.append(self.pool.submit(self._read_and_digest, disk, indices, buf))

    def _account(self, batch: _Batch, disk_size: int, on_chunk) -> list[tuple[int, bytes]]:
        """Record the batch in the manifest and stats; return the chunks to compress."""
        st, zero, cs = self.stats, self.zero, self.cs
        candidates: dict[bytes, int] = {}
        for j, (index, digest) in enumerate(zip(batch.indices, batch.digests)):
            on_chunk(index, digest)
            st.chunks_read += 1
            st.bytes_read += min(cs, disk_size - index * cs)
            if digest == zero:
                st.zero_chunks += 1
            elif digest in self._inflight or digest in candidates:
                st.dedup_chunks += 1
            else:
                candidates[digest] = j
        fresh = set(self.session.unknown(candidates))
        st.dedup_chunks += len(candidates) - len(fresh)
        picks = [(j, d) for d, j in candidates.items() if d in fresh]
        self._inflight.update(fresh)
        return picks

    def _store(self, done: tuple[bytearray, list]) -> None:
        buf, compressed = done
        self._spare.append(buf)
        st = self.stats
        for digest, codec, payload in compressed:
            self.session.add(digest, codec, self.cs, payload)
            self._inflight.discard(digest)
            st.new_chunks += 1
            st.new_bytes += self.cs
            st.stored_bytes += len(payload) + RECORD_HEADER_SIZE
