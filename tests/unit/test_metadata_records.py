"""Metadata records, pack headers with settings, and the data.mdb check (issue 9, items 1-3)."""

from __future__ import annotations

import os

import lmdb
import pytest

from chunkstore import StoreConfig
from chunkstore.codec import Codec
from chunkstore.errors import IntegrityError
from chunkstore.metadata import (OP_DELETE, OP_PUT, decode_metadata, encode_metadata, encode_metadata_records,
                                 iter_metadata_records, metadata_part)
from chunkstore.pack import (METADATA_MAGIC, METADATA_PART, RECORD_HEADER_SIZE, check_payload, decode_pack_header,
                             decode_record_header, encode_pack_header)
from chunkstore.store import index_file_problem


def test_a_commit_stream_is_cut_into_checked_parts_and_comes_back_whole():
    writes = [(OP_PUT, b"segments", os.urandom(16), os.urandom(16 << 10)) for _ in range(9)]
    writes += [(OP_PUT, b"catalog", b"d\0\0\0\0\1", b'{"kind":"full"}'), (OP_DELETE, b"catalog", b"old", b"")]
    stream = encode_metadata(writes)
    codec = Codec(1)
    records = encode_metadata_records(stream, 7, 6, 1.5, codec)
    assert len(records) == -(-len(stream) // METADATA_PART) > 1
    parts = {}
    for rec in records:
        hdr = decode_record_header(rec[:RECORD_HEADER_SIZE], "test")
        assert hdr.magic == METADATA_MAGIC and hdr.raw_len <= METADATA_PART
        payload = rec[RECORD_HEADER_SIZE:]
        check_payload(hdr, payload, "test")
        part = metadata_part(hdr)
        assert (part.commit, part.follows, part.parts, part.time) == (7, 6, len(records), 1.5)
        parts[part.part] = codec.decode(hdr.codec, payload, hdr.raw_len)
    assert decode_metadata(b"".join(parts[i] for i in range(len(parts))), "test") == writes
    # A commit's records are built one part at a time: the same bytes as the whole stream's.
    assert list(iter_metadata_records(writes, 7, 6, 1.5, codec)) == records
    # one flipped payload byte is caught by the payload check
    bad = bytearray(records[0])
    bad[RECORD_HEADER_SIZE + 5] ^= 1
    with pytest.raises(IntegrityError, match="payload checksum"):
        check_payload(decode_record_header(bad[:RECORD_HEADER_SIZE], "t"), bad[RECORD_HEADER_SIZE:], "t")
    with pytest.raises(IntegrityError, match="bad metadata entry"):
        decode_metadata(stream[:-1], "cut")


def test_every_pack_header_carries_the_settings_of_config_json():
    cfg = StoreConfig.new(chunk_size=1 << 20, digest="sha256", compression_level=-3, pack_target_size=5 << 20)
    header = encode_pack_header(cfg, b"P" * 16)
    assert len(header) == 128
    got = decode_pack_header(header, "test")
    assert got.pack_id == b"P" * 16
    assert StoreConfig(**got.settings()) == cfg
    flipped = bytearray(header)
    flipped[64] ^= 1  # the seed
    with pytest.raises(IntegrityError, match="checksum"):
        decode_pack_header(bytes(flipped), "test")


def test_a_truncated_or_foreign_data_mdb_is_recognised_without_mapping_it(tmp_path):
    env = lmdb.open(str(tmp_path / "index"), map_size=1 << 30, max_dbs=4)
    db = env.open_db(b"x")
    with env.begin(write=True) as txn:
        for i in range(3000):
            txn.put(b"%08d" % i, os.urandom(200), db=db)
    env.close()
    path = str(tmp_path / "index" / "data.mdb")
    assert index_file_problem(path) == ""
    size = os.path.getsize(path)
    os.truncate(path, size - 4096)
    assert "is truncated" in index_file_problem(path) and str(size) in index_file_problem(path)
    os.truncate(path, 4096)
    assert "shorter than its two meta pages" in index_file_problem(path)
    with open(path, "wb") as f:
        f.write(b"\x01" * 8192)
    assert "is not an LMDB file" in index_file_problem(path)
    os.unlink(path)
    assert index_file_problem(path) == "is missing"


@pytest.mark.parametrize("value_sizes", [[], [0], [METADATA_PART - 27], [METADATA_PART * 2 + 3, 5]],
                         ids=["empty", "one-empty-value", "exactly-one-part", "values-across-parts"])
def test_streamed_records_match_the_whole_stream_at_every_boundary(value_sizes):
    writes = [(OP_PUT, b"seg", b"k" * 16, os.urandom(n)) for n in value_sizes]
    codec = Codec(1)
    assert (list(iter_metadata_records(writes, 3, 2, 9.0, codec))
            == encode_metadata_records(encode_metadata(writes), 3, 2, 9.0, codec))
