import json
import os
import struct

import pytest
import xxhash
import zstandard

from chunkstore.codec import CODEC_RAW, CODEC_ZSTD
from chunkstore.errors import IntegrityError
from chunkstore.pack import RECORD_HEADER_SIZE, decode_record_header, encode_record
from chunkstore.rebuild import rebuild_index
from chunkstore.verify import index_batches, verify_chunks
from engine.backup import backup_image
from engine.restore import PARTIAL_SUFFIX, restore_backup
from engine.verify import verify_repository
from helpers import make_sparse, rng, run_cli, same_file, snapshot, text_bytes, write_at

CS = 64 << 10


def _two_backups(repo, tmp_path):
    r = rng(30)
    img = str(tmp_path / "v.img")
    make_sparse(img, 32 * CS)
    shared = r.bytes(CS)
    write_at(img, 2 * CS, shared)
    write_at(img, 10 * CS, text_bytes(r, 4 * CS))
    t1 = backup_image(repo, img, "v", "full")
    snap1 = snapshot(img, str(tmp_path / "v1"))
    write_at(img, 20 * CS, r.bytes(CS))
    t2 = backup_image(repo, img, "v", "incremental")
    snap2 = snapshot(img, str(tmp_path / "v2"))
    return shared, (t1, snap1), (t2, snap2)


def _corrupt_payload_byte(repo, digest: bytes) -> None:
    with repo.store.read_txn() as txn:
        entry = repo.store.require(txn, digest)
    with open(repo.store.pack_path(entry.pack_id), "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER_SIZE + entry.stored_len // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))


def test_clean_store_verifies(repo, tmp_path):
    _two_backups(repo, tmp_path)
    report = verify_repository(repo)
    assert report.ok and report.chunks.chunks_checked == 6 and report.backups_checked == 2


def test_corrupt_byte_is_found_with_backups_and_offsets(repo, tmp_path, store_path):
    shared, (t1, _), (t2, snap2) = _two_backups(repo, tmp_path)
    digest = repo.store.digester(shared)
    _corrupt_payload_byte(repo, digest)
    report = verify_repository(repo)
    assert not report.ok and set(report.chunks.corrupt) == {digest}
    assert report.affected[digest] == {t1.id: [2 * CS], t2.id: [2 * CS]}
    # A restore that meets the damage fails loudly and leaves no target behind.
    out = str(tmp_path / "bad.out")
    with pytest.raises(IntegrityError, match=digest.hex()):
        restore_backup(repo, t2.id, out)
    assert not os.path.exists(out) and not os.path.exists(out + PARTIAL_SUFFIX)
    repo.close()
    proc = run_cli("verify", store_path, "--json")
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["bad_chunks"][0]["digest"] == digest.hex()
    assert {b["id"] for b in doc["bad_chunks"][0]["backups"]} == {t1.id, t2.id}
    text = run_cli("verify", store_path)
    assert text.returncode == 3 and "store DAMAGED" in text.stdout and digest.hex() in text.stdout


def test_missing_pack_is_reported(repo, tmp_path):
    shared, (t1, _), (t2, _) = _two_backups(repo, tmp_path)
    # The pack holding a chunk both backups use: which pack the first index key
    # lands in depends on the store's random seed, so pick it by content.
    digest = repo.store.digester(shared)
    with repo.store.read_txn() as txn:
        pack_id = repo.store.require(txn, digest).pack_id
    os.unlink(repo.store.pack_path(pack_id))
    report = verify_repository(repo)
    assert not report.ok and report.chunks.missing_packs == [pack_id.hex()]
    assert report.affected[digest] == {t1.id: [2 * CS], t2.id: [2 * CS]}


def test_verify_in_small_batches_sees_every_chunk(repo, tmp_path):
    shared, _, _ = _two_backups(repo, tmp_path)
    digest = repo.store.digester(shared)
    _corrupt_payload_byte(repo, digest)
    whole = verify_chunks(repo.store)
    seen = []
    for groups in index_batches(repo.store, limit=2):
        assert sum(len(items) for items in groups.values()) <= 2
        seen += [d for items in groups.values() for _, d in items]
    assert len(seen) == len(set(seen)) == whole.chunks_checked == 6
    batched = verify_chunks(repo.store, batch_entries=2)
    assert set(batched.corrupt) == set(whole.corrupt) == {digest}
    assert (batched.chunks_checked, batched.bytes_checked) == (whole.chunks_checked, whole.bytes_checked)


def test_rebuild_index_from_packs(repo, tmp_path, store_path):
    _, (t1, snap1), (t2, snap2) = _two_backups(repo, tmp_path)
    with repo.store.read_txn() as txn, txn.cursor(db=repo.store.chunks_db) as cur:
        before = {bytes(k): bytes(v) for k, v in cur}
    with repo.store.env.begin(write=True) as txn:
        txn.drop(repo.store.chunks_db, delete=False)
    assert not verify_repository(repo).ok          # manifests now point at nothing
    report = rebuild_index(repo.store)
    assert report.chunks == len(before) and not report.torn
    with repo.store.read_txn() as txn, txn.cursor(db=repo.store.chunks_db) as cur:
        assert {bytes(k): bytes(v) for k, v in cur} == before
    for rec, snap in ((t1, snap1), (t2, snap2)):
        out = str(tmp_path / f"r{rec.seq}")
        restore_backup(repo, rec.id, out)
        assert same_file(out, snap)


# -- records whose header is intact but whose payload is wrong ------------------------------------
#
# Each case is caught by exactly one of the read path's checks, so removing
# that check (verify without the re-hash, reads without the payload check)
# turns its test red.


def _rewrite_record(repo, digest: bytes, payload: bytes | None = None, payload_check: int | None = None) -> None:
    """Rewrite a chunk's record in place with a valid header: the same digest,
    codec and lengths, ``payload`` instead of the stored one (same length),
    and the payload check recomputed unless ``payload_check`` is given."""
    store = repo.store
    with store.read_txn() as txn:
        entry = store.require(txn, digest)
    path = store.pack_path(entry.pack_id)
    with open(path, "r+b") as f:
        f.seek(entry.offset)
        old = decode_record_header(f.read(RECORD_HEADER_SIZE), path)
        stored = f.read(entry.stored_len)
        payload = stored if payload is None else payload
        assert len(payload) == entry.stored_len
        head = bytearray(encode_record(digest, old.codec, old.raw_len, payload))
        if payload_check is not None:
            struct.pack_into("<Q", head, 48, payload_check)
            struct.pack_into("<Q", head, 56, xxhash.xxh3_64_intdigest(bytes(head[:56])))
        decode_record_header(bytes(head), "rewritten")  # the header itself is good
        f.seek(entry.offset)
        f.write(bytes(head) + payload)


def _other_frame_of_same_length(store, raw: bytes, frame_len: int) -> tuple[bytes, bytes]:
    """(other content, its zstd frame): different bytes of the same raw length
    whose frame at the store's level is exactly ``frame_len`` bytes."""
    compressor = zstandard.ZstdCompressor(level=store.config.compression_level, write_content_size=True)
    r = rng(32)
    for _ in range(2000):
        other = bytearray(raw)
        other[int(r.integers(0, len(raw)))] ^= 0x20
        frame = compressor.compress(bytes(other))
        if len(frame) == frame_len:
            return bytes(other), frame
    raise AssertionError("no frame of the same length found")


def _expect_restore_refused(store_path, backup_id, digest, tmp_path, reason):
    out = str(tmp_path / f"refused-{backup_id.replace('@', '-')}.img")
    proc = run_cli("restore", store_path, backup_id, out)
    assert proc.returncode == 1 and digest.hex() in proc.stderr and reason in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out) and not os.path.exists(out + PARTIAL_SUFFIX)


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_a_payload_that_decodes_to_other_bytes_is_found_by_the_rehash(repo, tmp_path, store_path, codec):
    """Payload replaced by other valid content of the same length, payload
    check and header check recomputed: the record is well formed and only the
    digest of the decoded bytes shows it is not the chunk it claims to be."""
    shared, (t1, snap1), (t2, _) = _two_backups(repo, tmp_path)
    store = repo.store
    with open(snap1, "rb") as f:
        f.seek(10 * CS)
        text = f.read(CS)
    raw = shared if codec == CODEC_RAW else text
    digest = store.digester(raw)
    with store.read_txn() as txn:
        entry = store.require(txn, digest)
    assert entry.codec == codec
    if codec == CODEC_RAW:
        other = payload = rng(33).bytes(CS)
    else:
        other, payload = _other_frame_of_same_length(store, raw, entry.stored_len)
    assert other != raw and store.codec.decode(codec, payload, CS) == other
    _rewrite_record(repo, digest, payload)

    report = verify_repository(repo)
    assert not report.ok and set(report.chunks.corrupt) == {digest}
    assert "does not hash to its digest" in report.chunks.corrupt[digest]
    with pytest.raises(IntegrityError, match="does not hash to its digest"):
        store.read_chunk(digest)
    proc = run_cli("verify", store_path, "--json")
    assert proc.returncode == 3 and json.loads(proc.stdout)["bad_chunks"][0]["digest"] == digest.hex()
    for rec in (t1, t2):
        _expect_restore_refused(store_path, rec.id, digest, tmp_path, "does not hash to its digest")


def test_a_payload_check_mismatch_alone_is_found(repo, tmp_path, store_path):
    """The payload decodes to the right bytes but no longer matches the payload
    check its (intact) header carries: the record is not good, and neither
    verify nor a restore may pass it, though the re-hash alone would."""
    shared, (t1, _), (t2, _) = _two_backups(repo, tmp_path)
    store = repo.store
    digest = store.digester(shared)
    with store.read_txn() as txn:
        entry = store.require(txn, digest)
    with open(store.pack_path(entry.pack_id), "rb") as f:
        f.seek(entry.offset + RECORD_HEADER_SIZE)
        stored = f.read(entry.stored_len)
    _rewrite_record(repo, digest, payload_check=xxhash.xxh3_64_intdigest(stored) ^ 1)

    report = verify_repository(repo)
    assert not report.ok and set(report.chunks.corrupt) == {digest}
    assert "payload checksum mismatch" in report.chunks.corrupt[digest]
    with pytest.raises(IntegrityError, match="payload checksum mismatch"):
        store.read_chunk(digest)
    for rec in (t1, t2):
        _expect_restore_refused(store_path, rec.id, digest, tmp_path, "payload checksum mismatch")
