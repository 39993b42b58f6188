"""Sealed records: an encrypted store's pack records, built and opened.

chunkstore/crypto.py holds the AEAD (RecordCipher: per-pack subkey, the
record's offset as nonce); this module is what a record looks like around
it (docs/FORMAT.md "Record encryption").  The associated data is the record
header's first 48 bytes — magic, codec, digest length, reserved, raw length,
stored length, digest field — with the stored length already counting the
16-byte tag, so the header that is written is the one that was authenticated.
The header's payload check is over the sealed bytes: a scan (rebuild's,
verify's structure pass) frames and checks records without the key.

Sealing needs the record's final place (pack id, offset), so a writer seals
after it reserved the space: WriteSession.write, metadata records, gc's
repack (which re-seals every record it moves: a record copied verbatim would
not authenticate at its new offset).
"""

from __future__ import annotations

import struct

from chunkstore.crypto import RECORD_AD_SIZE, TAG_SIZE
from chunkstore.digest import DIGEST_FIELD
from chunkstore.errors import IntegrityError
from chunkstore.pack import RECORD_HEADER, RECORD_HEADER_SIZE, RECORD_MAGIC, check64

_CHECKED = 56  # header bytes the header checksum covers


def _header(magic: bytes, codec: int, dlen: int, raw_len: int, stored_len: int, field: bytes, pcheck: int) -> bytes:
    head = RECORD_HEADER.pack(magic, codec, dlen, 0, raw_len, stored_len, field, pcheck, 0)
    return head[:_CHECKED] + struct.pack("<Q", check64(head[:_CHECKED]))


def seal_chunk(cipher, pack_id: bytes, offset: int, digest: bytes, codec: int, raw_len: int,
               payload) -> tuple[bytes, bytes]:
    """(header, sealed payload) of a chunk record at ``offset`` of pack ``pack_id``;
    ``payload`` is the compressed (or raw) plaintext, ``codec`` says which."""
    field = digest.ljust(DIGEST_FIELD, b"\0")
    stored = len(payload) + TAG_SIZE
    ad = RECORD_HEADER.pack(RECORD_MAGIC, codec, len(digest), 0, raw_len, stored, field, 0, 0)[:RECORD_AD_SIZE]
    sealed = cipher.seal(pack_id, offset, ad, payload)
    return _header(RECORD_MAGIC, codec, len(digest), raw_len, stored, field, check64(sealed)), sealed


def seal_record(cipher, pack_id: bytes, offset: int, record) -> bytes:
    """A plaintext record (header + payload, e.g. a metadata record) sealed for
    ``offset`` of ``pack_id``: TAG_SIZE bytes longer, every header field kept but
    the stored length and the checks."""
    magic, codec, dlen, _, raw_len, stored, field, _, _ = RECORD_HEADER.unpack_from(record)
    plain = memoryview(record)[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + stored]
    stored += TAG_SIZE
    ad = RECORD_HEADER.pack(magic, codec, dlen, 0, raw_len, stored, field, 0, 0)[:RECORD_AD_SIZE]
    sealed = cipher.seal(pack_id, offset, ad, plain)
    return _header(magic, codec, dlen, raw_len, stored, field, check64(sealed)) + sealed


def open_payload(cipher, pack_id: bytes, offset: int, head, sealed, where: str) -> bytes:
    """The plaintext payload of the record whose header bytes are ``head`` and
    sealed payload ``sealed`` (both checked for framing by the caller); IntegrityError
    naming ``where`` when it does not authenticate."""
    if len(sealed) < TAG_SIZE:
        raise IntegrityError(f"{where}: sealed payload shorter than its tag ({len(sealed)} bytes)")
    return cipher.open(pack_id, offset, bytes(head[:RECORD_AD_SIZE]), sealed, where)


def open_record(cipher, record, pack_id: bytes, offset: int, where: str) -> tuple[bytes, bytes]:
    """(header, plaintext payload) of the sealed record ``record`` (header and
    payload, framing checked) found at ``offset`` of ``pack_id``: what gc's
    repack holds between reading a record and writing it elsewhere."""
    stored = RECORD_HEADER.unpack_from(record)[5]
    view = memoryview(record)
    head = bytes(view[:RECORD_HEADER_SIZE])
    return head, open_payload(cipher, pack_id, offset, head, view[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + stored],
                              where)


def seal_opened(cipher, head: bytes, plain, pack_id: bytes, offset: int) -> bytes:
    """An opened record (``open_record``) sealed again for ``offset`` of ``pack_id``:
    same header fields and length, a new payload check.  A record is never
    copied verbatim to a new place: it would not authenticate there."""
    magic, codec, dlen, _, raw_len, stored, field, _, _ = RECORD_HEADER.unpack_from(head)
    sealed = cipher.seal(pack_id, offset, head[:RECORD_AD_SIZE], plain)
    return _header(magic, codec, dlen, raw_len, stored, field, check64(sealed)) + sealed
