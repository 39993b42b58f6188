"""The chunk index: digest → where the chunk's record sits in which pack.

It lives in LMDB (databases ``chunks`` and ``packs`` of the store's
environment), so lookups are memory-mapped B-tree reads that never block
and never load the whole index into RAM, and so index entries commit in the
same transaction as the manifests that reference them.  The index holds no
information the packs do not also hold: ``rebuild-index`` recreates it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CHUNKS_DB = b"chunks"
PACKS_DB = b"packs"
META_DB = b"meta"

# pack id, record offset, stored (payload) length, raw length, codec
_ENTRY = struct.Struct("<16sQIIB3x")
# pack size in bytes, record count, sealed flag, metadata flag (a commit's metadata pack)
_PACK = struct.Struct("<QIBB2x")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    pack_id: bytes
    offset: int
    stored_len: int
    raw_len: int
    codec: int

    def encode(self) -> bytes:
        return _ENTRY.pack(self.pack_id, self.offset, self.stored_len, self.raw_len, self.codec)

    @classmethod
    def decode(cls, value) -> "IndexEntry":
        return cls(*_ENTRY.unpack(bytes(value)))


@dataclass(frozen=True, slots=True)
class PackInfo:
    size: int
    chunk_count: int
    sealed: bool
    metadata: bool = False  # holds a commit's metadata records (no chunks)

    def encode(self) -> bytes:
        return _PACK.pack(self.size, self.chunk_count, int(self.sealed), int(self.metadata))

    @classmethod
    def decode(cls, value) -> "PackInfo":
        size, count, sealed, metadata = _PACK.unpack(bytes(value))
        return cls(size, count, bool(sealed), bool(metadata))
