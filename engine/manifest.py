"""Manifests: for one backup, the digest of every chunk of the disk.

Every backup is a synthetic full: its manifest resolves every offset, so a
restore reads one manifest and never a chain.  To keep an incremental's cost
proportional to what changed, a manifest is a short list of *segments*, each
the digests of ``SEGMENT_CHUNKS`` consecutive chunks, stored once by their
own digest in LMDB database ``segments`` and shared by every backup whose
segment is identical.  An incremental rewrites only the segments it touches;
the rest of its list is copied from its base.  A chunk that is all zeros is
recorded as the store's zero digest and never stored.

Encodings are in docs/FORMAT.md ("Manifests").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import native
import xxhash

from chunkstore.errors import IntegrityError
from chunkstore.residency import Paced

MANIFESTS_DB = b"manifests"
SEGMENTS_DB = b"segments"
SEGMENT_CHUNKS = 1024
_MAGIC = b"BVMF"
_VERSION = 2
# magic, version, digest length, reserved, chunks per segment, disk size, chunk size, check
_HEADER = struct.Struct("<4sBBHIQQQ")
_CHECK_AT = 28  # the check is xxh3-64 of everything but itself: bytes 0..27 and the entries
_COUNT = struct.Struct("<I")
_MAX_CHUNK = 16 << 20  # above any chunk size the store allows
# New segment bytes a ManifestBuilder holds before it hands them to its
# ``flush`` (a commit of their own, engine/backup.py): what a backup holds of
# its manifest whatever the number of segments it rewrites.  Each flush costs
# a metadata pack and three syncs; 16 MiB is 1,024 segments.
FLUSH_SEGMENT_BYTES = 16 << 20


def _check64(head: bytes, body) -> int:
    h = xxhash.xxh3_64()
    h.update(head[:_CHECK_AT])
    h.update(body)
    return h.intdigest()


@dataclass
class Manifest:
    size: int
    chunk_size: int
    digest_len: int
    segments: list[bytes]           # segment digests
    nonzero: list[int]              # per segment: chunks that are not zero
    seg_chunks: int = SEGMENT_CHUNKS

    @property
    def n_chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def segment_length(self, i: int) -> int:
        return min(self.seg_chunks, self.n_chunks - i * self.seg_chunks)

    @property
    def nonzero_chunks(self) -> int:
        return sum(self.nonzero)

    def encode(self) -> bytes:
        parts = []
        for digest, count in zip(self.segments, self.nonzero):
            parts.append(digest)
            parts.append(_COUNT.pack(count))
        body = b"".join(parts)
        head = _HEADER.pack(_MAGIC, _VERSION, self.digest_len, 0, self.seg_chunks, self.size, self.chunk_size, 0)
        return head[:_CHECK_AT] + struct.pack("<Q", _check64(head, body)) + body

    @classmethod
    def decode(cls, data, where: str = "manifest") -> "Manifest":
        """Parse and check a manifest: its checksum first (one changed byte
        anywhere is found here), then that its sizes agree with each other."""
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise IntegrityError(f"{where}: manifest truncated ({len(data)} bytes)")
        magic, version, dlen, _, seg_chunks, size, chunk_size, check = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise IntegrityError(f"{where}: not a version-{_VERSION} manifest (magic {magic!r}, version {version})")
        body = data[_HEADER.size:]
        if check != _check64(data, body):
            raise IntegrityError(f"{where}: manifest checksum mismatch (the manifest is damaged)")
        if dlen not in (16, 32) or seg_chunks != SEGMENT_CHUNKS or not 0 < chunk_size <= _MAX_CHUNK \
                or chunk_size & (chunk_size - 1):
            raise IntegrityError(f"{where}: manifest has impossible sizes (digest length {dlen}, "
                                 f"{seg_chunks} chunks per segment, chunk size {chunk_size})")
        step = dlen + _COUNT.size
        m = cls(size, chunk_size, dlen, [], [], seg_chunks)
        expected = -(-m.n_chunks // seg_chunks) if m.n_chunks else 0
        if len(body) != expected * step:
            raise IntegrityError(f"{where}: manifest holds {len(body) // step} segments, but a disk of {size} bytes "
                                 f"in {chunk_size}-byte chunks has {m.n_chunks} chunks, so {expected} segments")
        for i, off in enumerate(range(0, len(body), step)):
            m.segments.append(body[off:off + dlen])
            count = _COUNT.unpack_from(body, off + dlen)[0]
            if count > m.segment_length(i):
                raise IntegrityError(f"{where}: manifest says segment {i} has {count} non-zero chunks, "
                                     f"more than its {m.segment_length(i)}")
            m.nonzero.append(count)
        return m


def segment_array(content: bytes, digest_len: int):
    """A segment's digests as an (n, digest_len) uint8 array, without copying."""
    import numpy as np  # restore and verify only: keeps numpy's import off the backup path

    return np.frombuffer(content, dtype=np.uint8).reshape(-1, digest_len)


def count_nonzero(content: bytes, zero_digest: bytes) -> int:
    return len(content) // len(zero_digest) - native.count_items(content, zero_digest)


class ManifestBuilder:
    """Builds a backup's manifest from its base plus the chunks read now.

    ``set`` must be called in ascending chunk order (the pipeline delivers
    them so); a segment is finished as soon as the stream moves past it, so
    only one segment is held open at a time.  Segments never touched keep the
    base's digest; with no base they are all-zero segments.

    Finished segments wait in ``new_segments`` for the commit; once they
    exceed ``flush_bytes`` they are handed to ``flush`` (which commits them
    early) and only their digests are kept, so a backup that rewrites every
    segment of a large fragmented disk holds at most ``flush_bytes`` of them.
    """

    def __init__(self, size: int, chunk_size: int, zero_digest: bytes, hasher: Callable[[bytes], bytes],
                 load_segment: Callable[[bytes], bytes], base: Manifest | None = None,
                 flush: Callable[[dict[bytes, bytes]], None] | None = None,
                 flush_bytes: int | None = None):
        self.size = size
        self.chunk_size = chunk_size
        self.zero = zero_digest
        self.dlen = len(zero_digest)
        self.hasher = hasher
        self.load_segment = load_segment
        self.base = base
        self.n_chunks = -(-size // chunk_size)
        self.n_segments = -(-self.n_chunks // SEGMENT_CHUNKS)
        self.done: dict[int, tuple[bytes, int]] = {}
        self.new_segments: dict[bytes, bytes] = {}
        self.flushed: set[bytes] = set()   # digests of segments handed to ``flush``
        self.flush = flush
        # Read at each backup, not bound at import: tests set a small threshold.
        self.flush_bytes = FLUSH_SEGMENT_BYTES if flush_bytes is None else flush_bytes
        self._held = 0                     # bytes in new_segments
        self._cur = -1
        self._buf: bytearray | None = None
        self._last = -1

    def _seg_len(self, s: int) -> int:
        return min(SEGMENT_CHUNKS, self.n_chunks - s * SEGMENT_CHUNKS)

    def _initial(self, s: int) -> bytearray:
        """Segment s as the base has it, fitted to the new disk size."""
        length = self._seg_len(s)
        base = self.base
        if base is None or s >= len(base.segments):
            return bytearray(self.zero * length)
        content = bytearray(self.load_segment(base.segments[s]))
        have = len(content) // self.dlen
        if have < length:
            content += self.zero * (length - have)
        return content[: length * self.dlen]

    def set(self, index: int, digest: bytes) -> None:
        if index <= self._last or index >= self.n_chunks:
            raise ValueError(f"chunk {index} out of order or past the disk's end")
        self._last = index
        s = index // SEGMENT_CHUNKS
        if s != self._cur:
            self._finish_current()
            self._cur = s
            self._buf = self._initial(s)
        pos = (index - s * SEGMENT_CHUNKS) * self.dlen
        self._buf[pos:pos + self.dlen] = digest

    def _store(self, content: bytes) -> tuple[bytes, int]:
        digest = self.hasher(content)
        if digest not in self.new_segments and digest not in self.flushed:
            self.new_segments[digest] = content
            self._held += len(content)
        return digest, count_nonzero(content, self.zero)

    def _finish_current(self) -> None:
        if self._buf is not None:
            self.done[self._cur] = self._store(bytes(self._buf))
            self._buf = None
            if self.flush is not None and self._held >= self.flush_bytes:
                segments, self.new_segments, self._held = self.new_segments, {}, 0
                self.flushed.update(segments)
                self.flush(segments)

    def finish(self) -> Manifest:
        self._finish_current()
        segments, nonzero = [], []
        zero_cache: dict[int, tuple[bytes, int]] = {}
        base = self.base
        for s in range(self.n_segments):
            got = self.done.get(s)
            if got is None:
                length = self._seg_len(s)
                if base is not None and s < len(base.segments) and base.segment_length(s) == length:
                    got = (base.segments[s], base.nonzero[s])
                elif base is None or s >= len(base.segments):
                    if length not in zero_cache:
                        zero_cache[length] = self._store(self.zero * length)
                    got = zero_cache[length]
                else:  # a segment the resize cut or extended
                    got = self._store(bytes(self._initial(s)))
            segments.append(got[0])
            nonzero.append(got[1])
        return Manifest(self.size, self.chunk_size, self.dlen, segments, nonzero)


class ManifestStore:
    """Reads and writes manifests and their segments in the store's LMDB.

    Every read is checked: a manifest against its checksum (and, given the
    catalog record, against the disk size and chunk size it records), a
    segment against its key, which is the digest of its bytes.  A changed
    byte in either would otherwise restore wrong data with exit 0."""

    def __init__(self, manifests_db, segments_db, hasher: Callable[[bytes], bytes],
                 release_map: Callable[[], object] = lambda: None):
        self.manifests_db = manifests_db
        self.segments_db = segments_db
        self.hasher = hasher
        self.release_map = release_map
        # Every segment read of every reader (restore, rollback, an NBD export, verify) goes
        # through ``segment``: a restore of a 4 TiB disk of 100,000 extents read its 1 GiB of
        # segments through the map and peaked at 1.3 GB RSS, all file pages (residency.Paced).
        self._paced = Paced(release_map)

    def segment_writes(self, txn, new_segments: dict[bytes, bytes]) -> list[tuple[bytes, bytes, bytes]]:
        """The segments the store lacks, as (database, key, value) writes for
        WriteSession.commit's or commit_early's metadata.  Each lookup is a
        random leaf of ``segments``, which faults in a folio of the file: the
        map is released as they go (chunkstore/residency.py ``Paced``)."""
        paced = Paced(self.release_map)
        out = []
        for d, c in new_segments.items():
            paced.step()
            if txn.get(d, db=self.segments_db) is None:
                out.append((SEGMENTS_DB, d, c))
        return out

    def writes(self, txn, key: bytes, manifest: Manifest,
               new_segments: dict[bytes, bytes]) -> list[tuple[bytes, bytes, bytes]]:
        """A backup's manifest and the segments the store lacks, as (database,
        key, value) writes for WriteSession.commit's metadata."""
        out = self.segment_writes(txn, new_segments)
        out.append((MANIFESTS_DB, key, manifest.encode()))
        return out

    def get(self, txn, key: bytes, where: str, record=None) -> Manifest:
        """The manifest under ``key``; ``where`` names it in errors.  With
        ``record`` (its catalog entry) the sizes must also agree with it."""
        value = txn.get(key, db=self.manifests_db)
        if value is None:
            raise IntegrityError(f"{where}: manifest is missing")
        m = Manifest.decode(value, where)
        if record is not None and (m.size, m.chunk_size) != (record.size, record.chunk_size):
            raise IntegrityError(f"{where}: manifest describes a disk of {m.size} bytes in {m.chunk_size}-byte "
                                 f"chunks, the catalog one of {record.size} bytes in {record.chunk_size}-byte chunks")
        return m

    def segment(self, txn, digest: bytes, where: str = "", manifest: Manifest | None = None,
                index: int | None = None) -> bytes:
        """The segment ``digest``, checked against its key; with ``manifest``
        and ``index`` also its length and non-zero count against the manifest."""
        name = f"{where + ': ' if where else ''}manifest segment {digest.hex()}"
        self._paced.step()
        value = txn.get(digest, db=self.segments_db)
        if value is None:
            raise IntegrityError(f"{name} is missing")
        content = bytes(value)
        if self.hasher(content) != digest:
            raise IntegrityError(f"{name} is damaged: its bytes do not hash to its key")
        dlen = len(digest)
        if len(content) % dlen:
            raise IntegrityError(f"{name} is damaged: {len(content)} bytes is not a whole number of digests")
        if manifest is not None and index is not None:
            length = manifest.segment_length(index)
            if len(content) != length * dlen:
                raise IntegrityError(f"{name} (segment {index}) holds {len(content) // dlen} digests, "
                                     f"the manifest expects {length}")
        return content

