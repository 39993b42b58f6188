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

from chunkstore.errors import IntegrityError

MANIFESTS_DB = b"manifests"
SEGMENTS_DB = b"segments"
SEGMENT_CHUNKS = 1024
_MAGIC = b"BVMF"
_VERSION = 1
# magic, version, digest length, reserved, chunks per segment, disk size, chunk size
_HEADER = struct.Struct("<4sBBHIQQ")
_COUNT = struct.Struct("<I")


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
        parts = [_HEADER.pack(_MAGIC, _VERSION, self.digest_len, 0, self.seg_chunks, self.size, self.chunk_size)]
        for digest, count in zip(self.segments, self.nonzero):
            parts.append(digest)
            parts.append(_COUNT.pack(count))
        return b"".join(parts)

    @classmethod
    def decode(cls, data, where: str = "manifest") -> "Manifest":
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise IntegrityError(f"{where}: truncated")
        magic, version, dlen, _, seg_chunks, size, chunk_size = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise IntegrityError(f"{where}: not a version-{_VERSION} manifest")
        step = dlen + _COUNT.size
        body = data[_HEADER.size:]
        m = cls(size, chunk_size, dlen, [], [], seg_chunks)
        expected = -(-m.n_chunks // seg_chunks) if m.n_chunks else 0
        if len(body) != expected * step:
            raise IntegrityError(f"{where}: {len(body)} bytes of segments, expected {expected * step}")
        for off in range(0, len(body), step):
            m.segments.append(body[off:off + dlen])
            m.nonzero.append(_COUNT.unpack_from(body, off + dlen)[0])
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
    """

    def __init__(self, size: int, chunk_size: int, zero_digest: bytes, hasher: Callable[[bytes], bytes],
                 load_segment: Callable[[bytes], bytes], base: Manifest | None = None):
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
        if digest not in self.new_segments:
            self.new_segments[digest] = content
        return digest, count_nonzero(content, self.zero)

    def _finish_current(self) -> None:
        if self._buf is not None:
            self.done[self._cur] = self._store(bytes(self._buf))
            self._buf = None

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
    """Reads and writes manifests and their segments in the store's LMDB."""

    def __init__(self, manifests_db, segments_db):
        self.manifests_db = manifests_db
        self.segments_db = segments_db

    def get(self, txn, key: bytes, where: str) -> Manifest:
        value = txn.get(key, db=self.manifests_db)
        if value is None:
            raise IntegrityError(f"{where}: manifest is missing")
        return Manifest.decode(value, where)

    def segment(self, txn, digest: bytes) -> bytes:
        value = txn.get(digest, db=self.segments_db)
        if value is None:
            raise IntegrityError(f"manifest segment {digest.hex()} is missing")
        return bytes(value)

    def put(self, txn, key: bytes, manifest: Manifest, new_segments: dict[bytes, bytes]) -> None:
        for digest, content in new_segments.items():
            txn.put(digest, content, db=self.segments_db, overwrite=False)
        txn.put(key, manifest.encode(), db=self.manifests_db)
