"""Metadata records: a commit's LMDB writes, kept in the packs too.

A commit's metadata is the list of LMDB writes (database, key, value) the
layer above makes in that commit, as one byte stream cut into records of at
most METADATA_PART raw bytes (``BVMD`` records, framed and checked like
chunks: chunkstore/pack.py).  chunkstore does not read the values: replaying
every commit's writes in commit order recreates those databases
(chunkstore/rebuild.py), which is what makes the packs alone the store.
The bytes are in docs/FORMAT.md ("Metadata records").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from chunkstore.errors import IntegrityError, StoreError
from chunkstore.index import CHUNKS_DB, META_DB, PACKS_DB
from chunkstore.refs import REFS_DBS
from chunkstore.pack import METADATA_FIELD, METADATA_MAGIC, METADATA_PART, RECORD_HEADER, RecordHeader, check64

OP_PUT, OP_DELETE = 1, 2
# One write of the layer above for a commit: (database name, key, value); a
# value of None deletes the key.
MetadataWrite = tuple[bytes, bytes, "bytes | None"]
# Keys of the ``meta`` database: the number of the last committed commit, and
# the highest number handed out (a commit that wrote its metadata records and
# then died keeps its number: the next commit gets a new one).
LAST_COMMIT = b"commit.last"
RESERVED_COMMIT = b"commit.reserved"
OWN_DBS = (CHUNKS_DB, PACKS_DB, META_DB, b"bad", *REFS_DBS)  # b"bad": chunkstore/badmarks.py
U64 = struct.Struct("<Q")
# op, database name length, key length, value length
METADATA_ENTRY = struct.Struct("<BBHI")


@dataclass(frozen=True)
class MetadataPart:
    commit: int     # this commit's number (1, 2, ...)
    follows: int    # the number of the commit that was the store's latest when it was made (0: none)
    part: int
    parts: int
    time: float


def meta_number(txn, db, key: bytes) -> int:
    value = txn.get(key, db=db)
    return U64.unpack(bytes(value))[0] if value is not None else 0


def take_writes(metadata: Sequence[MetadataWrite]) -> list:
    """``metadata`` as (op, database, key, value), checked; a list is emptied
    (taken over: each write is dropped once LMDB holds it, see WriteSession._apply)."""
    writes = [(OP_DELETE if v is None else OP_PUT, bytes(n), bytes(k), b"" if v is None else bytes(v))
              for n, k, v in metadata]
    if isinstance(metadata, list):
        metadata.clear()
    for _, name, _, _ in writes:
        if name in OWN_DBS:
            raise StoreError(f"metadata may not write chunkstore's own database {name.decode()!r}")
    return writes


def encode_metadata(writes) -> bytes:
    """The stream of ``(op, db name, key, value)`` writes."""
    out = bytearray()
    for op, name, key, value in writes:
        out += METADATA_ENTRY.pack(op, len(name), len(key), len(value)) + name + key + value
    return bytes(out)


def decode_metadata(stream: bytes, where: str) -> list[tuple[int, bytes, bytes, bytes]]:
    writes, pos, n = [], 0, len(stream)
    while pos < n:
        if pos + METADATA_ENTRY.size > n:
            raise IntegrityError(f"{where}: metadata entry truncated at byte {pos}")
        op, nlen, klen, vlen = METADATA_ENTRY.unpack_from(stream, pos)
        pos += METADATA_ENTRY.size
        end = pos + nlen + klen + vlen
        if op not in (OP_PUT, OP_DELETE) or end > n:
            raise IntegrityError(f"{where}: bad metadata entry at byte {pos - METADATA_ENTRY.size}")
        name, key, value = stream[pos:pos + nlen], stream[pos + nlen:pos + nlen + klen], stream[pos + nlen + klen:end]
        writes.append((op, name, key, value))
        pos = end
    return writes


def _metadata_record(raw: bytes, commit: int, follows: int, index: int, count: int, when: float, codec) -> bytes:
    kind, payload = codec.encode(raw) if raw else (0, b"")
    field = METADATA_FIELD.pack(commit, follows, index, count, when)
    head = RECORD_HEADER.pack(METADATA_MAGIC, kind, METADATA_FIELD.size, 0, len(raw), len(payload),
                              field, check64(payload), 0)
    return head[:56] + struct.pack("<Q", check64(head[:56])) + bytes(payload)


def encode_metadata_records(stream: bytes, commit: int, follows: int, when: float, codec) -> list[bytes]:
    """The records (header + payload, joined) carrying ``stream`` for commit ``commit``."""
    pieces = [stream[i:i + METADATA_PART] for i in range(0, len(stream), METADATA_PART)] or [b""]
    return [_metadata_record(raw, commit, follows, i, len(pieces), when, codec) for i, raw in enumerate(pieces)]


def iter_metadata_records(writes, commit: int, follows: int, when: float, codec) -> Iterator[bytes]:
    """The records of ``encode_metadata_records(encode_metadata(writes), ...)``,
    built one part at a time.  A backup of a large fragmented disk rewrites
    hundreds of MiB of manifest segments; the whole stream, its parts and
    their records held at once cost several times that (a 1 TiB disk with
    16,384 extents: 924 MB peak RSS against 457 MB without records)."""
    total = sum(METADATA_ENTRY.size + len(n) + len(k) + len(v) for _, n, k, v in writes)
    count = max(1, -(-total // METADATA_PART))
    buf = bytearray()
    index = 0
    for op, name, key, value in writes:
        buf += METADATA_ENTRY.pack(op, len(name), len(key), len(value))
        buf += name
        buf += key
        buf += value
        while len(buf) >= METADATA_PART:
            yield _metadata_record(bytes(buf[:METADATA_PART]), commit, follows, index, count, when, codec)
            del buf[:METADATA_PART]
            index += 1
    if buf or index == 0:
        yield _metadata_record(bytes(buf), commit, follows, index, count, when, codec)


def metadata_part(header: RecordHeader) -> MetadataPart:
    return MetadataPart(*METADATA_FIELD.unpack(header.digest))
