"""PointView: one backup point as a file, read a chunk at a time.

Every reader of a point that does not write a whole disk (the NBD export of
``blockvault serve``, ``mount``, file-level restore) goes through this one
read path; the readers of whole points (restore, ``copy``) walk the same
manifest and segments in windows and read records in large spans instead.
A point is a synthetic full with one manifest, so a read at any offset
needs only that manifest, the segment covering the offset and the chunks
the read touches:

* the manifest is read once, when the view is opened;
* a segment (the digests of 1024 consecutive chunks) is loaded the first
  time a read touches it, checked against its key, and its chunks' index
  entries are resolved in the same LMDB transaction; a bounded number of
  resolved segments is kept, so no request scans a manifest or the index;
* a chunk costs one positional read of its record and one zstd call
  (ChunkStore.read_chunk, the store's checked read: record header, frame,
  digest), and the decoded chunk goes into a bounded LRU cache keyed by
  digest, so reads smaller than a chunk, and chunks used at several
  offsets, are decoded once;
* zero chunks are answered with zeros without touching the store.

Reads are thread-safe (nbdkit serves requests in parallel): the caches are
locked, and a chunk that two threads want at once is decoded by one of them
while the other waits for it.  pread, zstd and the digest release the GIL.

A long reader must keep gc from removing the packs it reads: see
``reader_registration``.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from chunkstore import IndexEntry
from engine.catalog import BackupRecord
from engine.manifest import Manifest
from engine.repository import Repository

log = logging.getLogger("blockvault.pointview")

DEFAULT_CACHE_BYTES = 64 << 20
DEFAULT_SEGMENTS = 64


def reader_registration(repo: Repository, kind: str, command: str = ""):
    """The store's registration of a long reader (kind "serve", "files", ...),
    to hold while the view is open so that a gc never removes a pack this
    reader may still read (chunkstore/registry.py: its flock dies with the
    process, so a killed server pins nothing).  Take it before opening the
    view: the manifest is then read under it."""
    from chunkstore.registry import Registry
    return Registry(repo.store).register(kind, command or kind)


@dataclass
class Counters:
    """What a view did; read by serve's statistics and files' chunk report."""

    chunks_read: int = 0       # chunk records read from packs (one pread each)
    chunks_decoded: int = 0    # records decoded (one zstd call, or none for a raw record)
    cache_hits: int = 0        # chunk pieces answered from the decoded-chunk cache
    zero_chunks: int = 0       # chunk pieces answered with zeros, store untouched
    bytes_read: int = 0        # record bytes read from packs
    segments_loaded: int = 0   # manifest segments loaded (and their index entries resolved)
    requests: int = 0          # pread calls
    read_errors: int = 0       # chunk reads that failed (damage, I/O errors): the caller got the exception

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Segment:
    digests: bytes                                   # chunk digests, digest_len each
    entries: dict[bytes, IndexEntry] = field(default_factory=dict)


class _Loading:
    """A chunk being decoded by one thread; others wait for its result."""

    def __init__(self):
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class PointView:
    """A read-only, random-access view of one backup point.

    ``pread(offset, length)`` and ``pread_into(buf, offset)`` are the
    interface for servers; ``file()`` gives an ``io.RawIOBase`` with
    read/seek/tell for libraries that want a file object."""

    def __init__(self, repo: Repository, record: BackupRecord, manifest: Manifest,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_segments: int = DEFAULT_SEGMENTS):
        self.repo = repo
        self.store = repo.store
        self.record = record
        self.manifest = manifest
        self.size = manifest.size
        self.chunk_size = manifest.chunk_size
        self.n_chunks = manifest.n_chunks
        self.counters = Counters()
        self.cache_bytes = max(0, int(cache_bytes))
        self._seg_chunks = manifest.seg_chunks
        self._dlen = manifest.digest_len
        self._zero = self.store.digester.zero_digest
        self._max_segments = max(1, max_segments)
        self._lock = threading.Lock()
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._seg_loading: dict[int, threading.Lock] = {}
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._loading: dict[bytes, _Loading] = {}
        self._zeros = memoryview(bytes(self.chunk_size))

    @classmethod
    def open(cls, repo: Repository, ref: str, **options) -> "PointView":
        """The view of backup ``ref`` (``db01@3``, ``db01@latest``...): the
        catalog record and manifest are read and checked now, so an unknown
        or damaged point fails here, before any server starts."""
        with repo.store.read_txn() as txn:
            record = repo.catalog.resolve(txn, ref)
            manifest = repo.manifests.get(txn, record.key, record.id, record)
        return cls(repo, record, manifest, **options)

    # -- the map -----------------------------------------------------------------

    def _segment(self, s: int) -> _Segment:
        with self._lock:
            seg = self._segments.get(s)
            if seg is not None:
                self._segments.move_to_end(s)
                return seg
            loading = self._seg_loading.setdefault(s, threading.Lock())
        with loading:  # one thread loads a segment; the others wait and reuse it
            with self._lock:
                seg = self._segments.get(s)
                if seg is not None:
                    return seg
            seg = self._load_segment(s)
            with self._lock:
                self._segments[s] = seg
                self.counters.segments_loaded += 1
                while len(self._segments) > self._max_segments:
                    self._segments.popitem(last=False)
                self._seg_loading.pop(s, None)
        return seg

    def _load_segment(self, s: int) -> _Segment:
        m, zero = self.manifest, self._zero
        if m.nonzero[s] == 0:  # all zeros: nothing to read, not even the segment
            return _Segment(zero * m.segment_length(s))
        store = self.store
        with store.read_txn() as txn:
            digests = self.repo.manifests.segment(txn, m.segments[s], self.record.id, m, s)
            seg = _Segment(digests)
            dlen = self._dlen
            for k in range(0, len(digests), dlen):
                d = digests[k:k + dlen]
                if d != zero and d not in seg.entries:
                    seg.entries[d] = store.require(txn, d)
        return seg

    def chunk_digest(self, index: int) -> bytes:
        """The digest of chunk ``index`` (the store's zero digest for a zero chunk)."""
        s, k = divmod(index, self._seg_chunks)
        if self.manifest.nonzero[s] == 0:
            return self._zero
        return self._segment(s).digests[k * self._dlen:(k + 1) * self._dlen]

    def is_zero_chunk(self, index: int) -> bool:
        return self.chunk_digest(index) == self._zero

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs covering [offset, offset+length),
        merged, at chunk granularity and clipped to the request.  All-zero
        segments are answered from the manifest alone."""
        end = self.size if length is None else min(self.size, offset + length)
        cs, per = self.chunk_size, self._seg_chunks
        out: list[list] = []
        i = offset // cs
        while i * cs < end:
            s = i // per
            if self.manifest.nonzero[s] == 0:
                step, zero = (s + 1) * per - i, True
            elif self.manifest.nonzero[s] == self.manifest.segment_length(s):
                step, zero = (s + 1) * per - i, False
            else:
                step, zero = 1, self.is_zero_chunk(i)
            start, stop = max(offset, i * cs), min(end, (i + step) * cs)
            if out and out[-1][2] == zero:
                out[-1][1] = stop - out[-1][0]
            else:
                out.append([start, stop - start, zero])
            i += step
        return [tuple(e) for e in out]

    # -- chunks ------------------------------------------------------------------

    def _chunk(self, index: int) -> bytes | None:
        """Chunk ``index`` decoded (None for a zero chunk), through the cache."""
        s, k = divmod(index, self._seg_chunks)
        if self.manifest.nonzero[s] == 0:
            with self._lock:
                self.counters.zero_chunks += 1
            return None
        seg = self._segment(s)
        digest = seg.digests[k * self._dlen:(k + 1) * self._dlen]
        if digest == self._zero:
            with self._lock:
                self.counters.zero_chunks += 1
            return None
        with self._lock:
            data = self._cache.get(digest)
            if data is not None:
                self._cache.move_to_end(digest)
                self.counters.cache_hits += 1
                return data
            wait = self._loading.get(digest)
            if wait is None:
                mine = self._loading[digest] = _Loading()
        if wait is not None:
            wait.done.wait()
            if wait.error is not None:
                raise wait.error
            with self._lock:
                self.counters.cache_hits += 1
            return wait.data
        try:
            entry = seg.entries[digest]
            data = self.store.read_chunk(digest, entry)
            mine.data = data
        except BaseException as e:
            mine.error = e
            with self._lock:
                self.counters.read_errors += 1
            raise
        finally:
            with self._lock:
                self._loading.pop(digest, None)
                if mine.error is None:
                    self.counters.chunks_read += 1
                    self.counters.bytes_read += entry.stored_len
                    # a record stored raw (zstd saved too little) needs no zstd call
                    self.counters.chunks_decoded += entry.stored_len < entry.raw_len
                    self._remember(digest, data)
            mine.done.set()
        return data

    def _remember(self, digest: bytes, data: bytes) -> None:
        """Keep a decoded chunk (lock held): least recently used ones go first."""
        if len(data) > self.cache_bytes:
            return
        self._cache[digest] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    # -- reading -----------------------------------------------------------------

    def pread_into(self, buf, offset: int) -> int:
        """Fill ``buf`` (a writable buffer) from ``offset``; returns the bytes
        filled, short only at the end of the disk."""
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        length = max(0, min(len(view), self.size - offset))
        with self._lock:
            self.counters.requests += 1
        cs, pos, end = self.chunk_size, offset, offset + length
        while pos < end:
            index, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            data = self._chunk(index)
            at = pos - offset
            if data is None:
                view[at:at + n] = self._zeros[:n]
            else:
                have = max(0, min(n, len(data) - within))
                view[at:at + have] = memoryview(data)[within:within + have]
                if have < n:  # a short last chunk: the rest of the disk reads as zeros
                    view[at + have:at + n] = self._zeros[:n - have]
            pos += n
        return length

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer past the end of the disk)."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        length = max(0, min(length, self.size - offset))
        cs = self.chunk_size
        if length and offset // cs == (offset + length - 1) // cs:  # within one chunk: no copy into a buffer
            within = offset % cs
            with self._lock:
                self.counters.requests += 1
            data = self._chunk(offset // cs)
            if data is None:
                return bytes(length)
            piece = data[within:within + length] if (within or length != len(data)) else data
            return piece if len(piece) == length else piece + bytes(length - len(piece))
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return bytes(buf)

    def file(self) -> "PointFile":
        """A file object over the view (its own position; the caches are shared)."""
        return PointFile(self)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0
            self._segments.clear()

    def __enter__(self) -> "PointView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PointFile(io.RawIOBase):
    """read/seek/tell over a PointView, for code that wants a file (pytsk3
    wrappers, shutil, hashing).  Read-only."""

    def __init__(self, view: PointView):
        super().__init__()
        self.view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.view.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b) -> int:
        n = self.view.pread_into(b, self._pos) if self._pos < self.view.size else 0
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.view.size - self._pos)
        data = self.view.pread(self._pos, size) if self._pos < self.view.size else b""
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    @property
    def size(self) -> int:
        return self.view.size
