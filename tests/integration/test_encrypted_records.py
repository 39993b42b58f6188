"""Sealed records of an encrypted store (issue 13, items 2 and 5): API level.

Real stores on disk, real packs: backups of a sparse image restored byte for
byte; records flipped, swapped, moved and transplanted from another store
with the pack and header checksums fixed up, so that only the AEAD can tell
(each is refused, and verify names the pack, offset and digest); no
plaintext of the image, the disk name or the source path in any file of the
store but index/; gc, copy (encrypted -> plaintext -> encrypted, ids
re-keyed) and rebuild of an encrypted store.  The CLI's key options belong
to tests/integration/test_keys.py.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
import zstandard

from chunkstore import ChunkStore
from chunkstore.crypto import MasterKey
from chunkstore.errors import ChunkNotFound, IntegrityError, KeyRequiredError, WrongKeyError
from chunkstore.gc import collect
from chunkstore.rebuild import rebuild_store
from chunkstore.index import IndexEntry
from chunkstore.pack import (RECORD_HEADER, RECORD_HEADER_SIZE, check64, decode_pack_header, decode_record_header,
                             encode_pack_header, iter_pack_paths, scan_pack)
from chunkstore.verify import verify_chunks
from engine import recovery
from engine.backup import backup_image
from engine.copy import copy_points
from engine.forget import delete_points
from engine.repository import Repository
from engine.restore import PARTIAL_SUFFIX, restore_backup
from engine.verify import verify_repository
from helpers import make_sparse, rng, same_file, snapshot, text_bytes, write_at

CS = 64 << 10
CHUNKS = 48
DISK = "payroll-db-disk-7f3a"  # a name that must not be readable in the store's files


def _new(path: str, master: MasterKey | None, cipher: str = "aes-256-gcm") -> Repository:
    if master is None:
        return Repository(ChunkStore.init(path, chunk_size=CS))
    return Repository(ChunkStore.init(path, chunk_size=CS, encryption=cipher, master=master))


def _image(tmp_path, seed: int = 1, name: str = "confidential-host-01.img") -> tuple[str, object]:
    """A sparse image: random chunks (stored raw: incompressible), text chunks
    (zstd), one chunk twice, holes."""
    r = rng(seed)
    img = str(tmp_path / name)
    make_sparse(img, CHUNKS * CS)
    for i in (0, 1, 2, 3, 9, 20, 30):
        write_at(img, i * CS, r.bytes(CS))
    write_at(img, 12 * CS, text_bytes(r, 3 * CS))
    with open(img, "rb") as f:
        f.seek(1 * CS)
        write_at(img, 40 * CS, f.read(CS))
    return img, r


def _backups(repo, tmp_path, seed: int = 1):
    """A full and an incremental backup; their images."""
    img, r = _image(tmp_path, seed)
    full = backup_image(repo, img, DISK, "full")
    snap1 = snapshot(img, str(tmp_path / f"snap1-{seed}"))
    write_at(img, 25 * CS, r.bytes(CS))
    write_at(img, 2 * CS + 100, b"changed")
    incr = backup_image(repo, img, DISK, "incremental")
    snap2 = snapshot(img, str(tmp_path / f"snap2-{seed}"))
    return (full, snap1), (incr, snap2)


def _entry(repo, digest):
    with repo.store.read_txn() as txn:
        return repo.store.require(txn, digest)


def _chunk_digest(repo, img: str, index: int) -> bytes:
    with open(img, "rb") as f:
        f.seek(index * CS)
        return repo.store.digester(f.read(CS))


def _fix_checks(path: str, offset: int) -> None:
    """Recompute the payload and header checks of the record at ``offset``: only
    the AEAD is left to notice what was changed."""
    with open(path, "r+b") as f:
        f.seek(offset)
        head = bytearray(f.read(RECORD_HEADER_SIZE))
        stored = RECORD_HEADER.unpack_from(head)[5]
        payload = f.read(stored)
        struct.pack_into("<Q", head, 48, check64(payload))
        struct.pack_into("<Q", head, 56, check64(bytes(head[:56])))
        f.seek(offset)
        f.write(head)


def _read(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _write(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _refused(repo, record, tmp_path, *digests: bytes, why: str = "does not authenticate") -> None:
    """The restore of ``record`` fails on one of ``digests`` (whichever it meets
    first) and leaves no target."""
    out = str(tmp_path / "refused.out")
    with pytest.raises(IntegrityError, match=why) as e:
        restore_backup(repo, record.id, out)
    assert any(d.hex() in str(e.value) for d in digests), e.value
    assert not os.path.exists(out) and not os.path.exists(out + PARTIAL_SUFFIX)


def _rebuild(path: str, master=None):
    """``blockvault rebuild``'s work with the key given (engine/recovery.py hands it the
    key the CLI's key options unlock: helper KEYS' part)."""
    return rebuild_store(path, 0.0, recovery._derive, master=master)


def _reported(repo, digest: bytes, entry, why: str = "does not authenticate") -> None:
    report = verify_repository(repo, mark=False)
    assert not report.ok
    reason = report.chunks.corrupt[digest]
    assert why in reason and entry.pack_id.hex() in reason and f"offset {entry.offset}" in reason, reason


@pytest.fixture
def master():
    return MasterKey.new()


@pytest.fixture
def enc(tmp_path, master):
    repo = _new(str(tmp_path / "enc"), master)
    yield repo
    repo.close()


# -- round trip ------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_full_and_incremental_restore_identical(tmp_path, master, cipher):
    path = str(tmp_path / "enc")
    repo = _new(path, master, cipher)
    (full, snap1), (incr, snap2) = _backups(repo, tmp_path)
    repo.close()
    repo = Repository(ChunkStore.open(path, master=master))  # a new process's view: key, config, packs
    for record, snap in ((full, snap1), (incr, snap2)):
        out = str(tmp_path / f"{record.id}.out")
        restore_backup(repo, record.id, out)
        assert same_file(out, snap)
    assert verify_repository(repo, mark=False).ok
    # Every stored length is the payload's plus the 16-byte tag: an incompressible chunk is CS + 16.
    entry = _entry(repo, _chunk_digest(repo, snap1, 0))
    assert entry.stored_len == CS + 16 and entry.codec == 0
    codes = {_read(p, 62, 1)[0] for p in iter_pack_paths(path)}
    assert codes == {{"aes-256-gcm": 1, "chacha20-poly1305": 2}[cipher]}
    repo.close()
    with pytest.raises(KeyRequiredError):
        ChunkStore.open(path)
    with pytest.raises(WrongKeyError):
        ChunkStore.open(path, master=MasterKey.new())


def test_pack_header_fields(tmp_path, enc, master):
    """Byte 62 cipher code, 88..103 key check, digest kind 3 — and a plaintext
    store's header exactly as before (zeros there)."""
    cfg = enc.store.config
    head = encode_pack_header(cfg, bytes(range(16)))
    assert head[60] == 3 and head[62] == 1 and head[63] == 0
    assert head[88:104] == bytes.fromhex(cfg.key_check) == master.check(enc.store.store_id)
    assert head[104:120] == bytes(16)
    parsed = decode_pack_header(head, "x")
    assert parsed.settings()["encryption"] == "aes-256-gcm"
    assert parsed.settings()["key_check"] == cfg.key_check
    plain = _new(str(tmp_path / "plain"), None)
    phead = encode_pack_header(plain.store.config, bytes(16))
    assert phead[62:64] == b"\0\0" and phead[88:120] == bytes(32)
    assert "encryption" not in decode_pack_header(phead, "y").settings()
    plain.close()
    # A header pairing keyed ids with no cipher (or the reverse) is refused.
    bad = bytearray(head)
    bad[62] = 0
    struct.pack_into("<Q", bad, 120, check64(bytes(bad[:120])))
    with pytest.raises(IntegrityError, match="keyed ids and sealed records go together"):
        decode_pack_header(bytes(bad), "z")


# -- no plaintext on disk ----------------------------------------------------------


def _patterns(img: str) -> list[bytes]:
    """64-byte pieces of every non-zero chunk of the image (start, middle, end)."""
    out = []
    with open(img, "rb") as f:
        data = f.read()
    for i in range(0, len(data), CS):
        chunk = data[i:i + CS]
        if chunk.count(0) == len(chunk):
            continue
        for at in (0, CS // 2, CS - 64):
            if chunk[at:at + 64].count(0) < 64:
                out.append(chunk[at:at + 64])
    return out


def _store_bytes(path: str) -> list[tuple[str, bytes]]:
    """Every file of the store but its LMDB index (which stays plaintext: README "Keys")."""
    out = []
    for root, dirs, files in os.walk(path):
        if os.path.relpath(root, path).split(os.sep)[0] == "index":
            continue
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out.append((os.path.join(root, name), f.read()))
    return out


def _found(path: str, needles: list[bytes]) -> list[str]:
    """Where a needle is readable: in a file's bytes, or in a record's payload
    once zstd-decompressed (metadata records are compressed before sealing, so
    a disk name may not appear verbatim even where nothing is sealed)."""
    out = [f"{needle[:16]!r} in {name}" for name, data in _store_bytes(path) for needle in needles
           if needle in data]
    dctx = zstandard.ZstdDecompressor()
    for p in iter_pack_paths(path):
        data = open(p, "rb").read()
        for rec in scan_pack(p).records:
            start = rec.offset + RECORD_HEADER_SIZE
            try:
                plain = dctx.decompress(data[start:start + rec.header.stored_len], max_output_size=4 << 20)
            except zstandard.ZstdError:
                continue
            out += [f"{needle[:16]!r} in record {p}@{rec.offset}" for needle in needles if needle in plain]
    return out


def test_no_plaintext_in_store_files(tmp_path, enc):
    (_, snap1), (_, snap2) = _backups(enc, tmp_path)
    source = os.path.basename(str(tmp_path / "confidential-host-01.img")).encode()
    needles = _patterns(snap1) + _patterns(snap2) + [DISK.encode(), source]
    assert len(needles) > 20
    assert _found(enc.path, needles) == []
    # The same search finds them in a plaintext store: it would see a leak.
    plain = _new(str(tmp_path / "plain"), None)
    os.makedirs(tmp_path / "p")
    _backups(plain, tmp_path / "p")
    plain.close()
    found = _found(str(tmp_path / "plain"), needles[:3] + [DISK.encode()])
    assert len(found) >= 4, found


# -- tampering ----------------------------------------------------------------------


def test_flipped_bit_in_payload_is_damage_not_data(tmp_path, enc):
    (full, snap1), (incr, _) = _backups(enc, tmp_path)
    digest = _chunk_digest(enc, snap1, 3)
    entry = _entry(enc, digest)
    pack = enc.store.pack_path(entry.pack_id)
    at = entry.offset + RECORD_HEADER_SIZE + 1000
    _write(pack, at, bytes([_read(pack, at, 1)[0] ^ 0x08]))
    # As it is, the payload check sees it; with the checks fixed up only the AEAD can.
    _reported(enc, digest, entry, "payload checksum mismatch")
    _fix_checks(pack, entry.offset)
    _reported(enc, digest, entry)
    _refused(enc, incr, tmp_path, digest)
    # A flipped bit in the tag is the same damage.
    tag = entry.offset + RECORD_HEADER_SIZE + entry.stored_len - 3
    _write(pack, at, bytes([_read(pack, at, 1)[0] ^ 0x08]))
    _write(pack, tag, bytes([_read(pack, tag, 1)[0] ^ 0x01]))
    _fix_checks(pack, entry.offset)
    _reported(enc, digest, entry)


@pytest.mark.parametrize("field,at", [("reserved", 6), ("raw length", 10), ("digest", 16), ("digest", 31), ("digest padding", 47)])
def test_edited_header_does_not_authenticate(tmp_path, enc, field, at):
    """The header's bytes 0..47 are the associated data: a header edited in any
    of them (checks fixed, the index entry made to agree) is refused when the
    record is opened, before anything is decompressed or hashed."""
    (full, snap1), _ = _backups(enc, tmp_path)
    digest = _chunk_digest(enc, snap1, 12)  # text: zstd
    entry = _entry(enc, digest)
    assert entry.codec != 0
    pack = enc.store.pack_path(entry.pack_id)
    head = bytearray(_read(pack, entry.offset, RECORD_HEADER_SIZE))
    head[at] ^= 1
    _write(pack, entry.offset, bytes(head))
    _fix_checks(pack, entry.offset)
    hdr = decode_record_header(_read(pack, entry.offset, RECORD_HEADER_SIZE), "edited")
    forged = IndexEntry(entry.pack_id, entry.offset, hdr.stored_len, hdr.raw_len, hdr.codec)
    record = _read(pack, entry.offset, RECORD_HEADER_SIZE + hdr.stored_len)
    with pytest.raises(IntegrityError, match="does not authenticate"):
        enc.store.open_record(record, 0, forged, hdr.digest)
    if field == "reserved":  # the index still agrees: verify and restore meet it
        _reported(enc, digest, entry)
        _refused(enc, full, tmp_path, digest)


def test_swapped_payloads_are_refused(tmp_path, enc):
    """Two equal-size records exchange payloads (checks fixed): each payload is
    sealed for the other's offset and header."""
    (full, snap1), _ = _backups(enc, tmp_path)
    a, b = _chunk_digest(enc, snap1, 0), _chunk_digest(enc, snap1, 9)
    ea, eb = _entry(enc, a), _entry(enc, b)
    assert ea.stored_len == eb.stored_len
    pa, pb = enc.store.pack_path(ea.pack_id), enc.store.pack_path(eb.pack_id)
    xa = _read(pa, ea.offset + RECORD_HEADER_SIZE, ea.stored_len)
    xb = _read(pb, eb.offset + RECORD_HEADER_SIZE, eb.stored_len)
    _write(pa, ea.offset + RECORD_HEADER_SIZE, xb)
    _write(pb, eb.offset + RECORD_HEADER_SIZE, xa)
    _fix_checks(pa, ea.offset)
    _fix_checks(pb, eb.offset)
    report = verify_repository(enc, mark=False)
    for d, e in ((a, ea), (b, eb)):
        reason = report.chunks.corrupt[d]
        assert "does not authenticate" in reason and f"offset {e.offset}" in reason, reason
    _refused(enc, full, tmp_path, a, b)


def test_swapped_whole_records_are_refused_after_a_rebuild(tmp_path, enc, master):
    """Two equal-size records exchange places, headers and all, and the index is
    rebuilt from the packs: every header, check and index entry agrees, and
    only the nonce (the offset) tells that they moved."""
    (full, snap1), (incr, snap2) = _backups(enc, tmp_path)
    a, b = _chunk_digest(enc, snap1, 0), _chunk_digest(enc, snap1, 9)
    ea, eb = _entry(enc, a), _entry(enc, b)
    assert ea.stored_len == eb.stored_len
    size = RECORD_HEADER_SIZE + ea.stored_len
    pa, pb = enc.store.pack_path(ea.pack_id), enc.store.pack_path(eb.pack_id)
    ra, rb = _read(pa, ea.offset, size), _read(pb, eb.offset, size)
    _write(pa, ea.offset, rb)
    _write(pb, eb.offset, ra)
    path = enc.path
    enc.close()
    report = _rebuild(path, master=master)
    assert report.complete and not report.lost, report
    repo = Repository(ChunkStore.open(path, master=master))
    try:
        moved = _entry(repo, a)
        assert (moved.pack_id, moved.offset) == (eb.pack_id, eb.offset)  # the index follows the record
        _reported(repo, a, moved)
        _reported(repo, b, _entry(repo, b))
        _refused(repo, full, tmp_path, a, b)
    finally:
        repo.close()


@pytest.mark.parametrize("key", ["its own key", "the same key"])
def test_record_from_another_store_is_refused(tmp_path, master, key):
    """A record of another encrypted store (same chunk size; its own key, or even
    the same master key) put over a record of this one at the same offset, and
    the index rebuilt: the record is framed, checked and indexed, yet it does not
    authenticate (with a reused key because subkeys are per store and per pack)."""
    mine = _new(str(tmp_path / "mine"), master)
    theirs = _new(str(tmp_path / "theirs"), master if key == "the same key" else MasterKey.new())
    (full, snap1), _ = _backups(mine, tmp_path)
    os.makedirs(tmp_path / "t")
    _backups(theirs, tmp_path / "t", seed=2)
    victim = _entry(mine, _chunk_digest(mine, snap1, 0))
    donor_digest = _chunk_digest(theirs, str(tmp_path / "t" / "snap1-2"), 0)
    donor = _entry(theirs, donor_digest)
    assert donor.offset == victim.offset and donor.stored_len == victim.stored_len
    size = RECORD_HEADER_SIZE + donor.stored_len
    _write(mine.store.pack_path(victim.pack_id), victim.offset,
           _read(theirs.store.pack_path(donor.pack_id), donor.offset, size))
    theirs.close()
    path = mine.path
    mine.close()
    assert _rebuild(path, master=master).complete
    repo = Repository(ChunkStore.open(path, master=master))
    try:
        planted = _entry(repo, donor_digest)
        assert (planted.pack_id, planted.offset) == (victim.pack_id, victim.offset)
        _reported(repo, donor_digest, planted)
        with pytest.raises(ChunkNotFound):  # the chunk it replaced is gone: the restore says so
            restore_backup(repo, full.id, str(tmp_path / "x.out"))
    finally:
        repo.close()


def _metadata_packs(path: str) -> list[tuple[str, list]]:
    out = []
    for p in iter_pack_paths(path):
        scan = scan_pack(p)
        recs = [r for r in scan.records if r.header.magic == b"BVMD"]
        if recs:
            out.append((p, recs))
    return out


def test_tampered_metadata_record_is_reported_not_replayed(tmp_path, enc, master):
    (full, snap1), (incr, _) = _backups(enc, tmp_path)
    # The incremental's commit is the newest metadata pack's (commit numbers rise).
    packs = _metadata_packs(enc.path)
    newest = max(packs, key=lambda pr: struct.unpack_from("<Q", pr[1][0].header.digest)[0])
    pack, recs = newest
    rec = recs[0]
    at = rec.offset + RECORD_HEADER_SIZE + rec.header.stored_len // 2
    _write(pack, at, bytes([_read(pack, at, 1)[0] ^ 0x20]))
    _fix_checks(pack, rec.offset)
    report = verify_repository(enc, mark=False)
    bad = report.chunks.bad_packs
    assert len(bad) == 1 and "does not authenticate" in next(iter(bad.values()))
    path = enc.path
    enc.close()
    shutil.rmtree(os.path.join(path, "index"))
    report = _rebuild(path, master=master)
    assert any("does not authenticate" in u and f"@{rec.offset}" in u for u in report.unreadable), report.unreadable
    assert report.damaged and report.commits == 1, report  # the full's commit only
    repo = Repository(ChunkStore.open(path, master=master))
    try:
        with repo.store.read_txn() as txn:
            ids = [r.id for r in repo.catalog.all(txn)]
        assert ids == [full.id]  # the tampered commit was not replayed, the one before it was
        out = str(tmp_path / "full.out")
        restore_backup(repo, full.id, out)
        assert same_file(out, snap1)
    finally:
        repo.close()


# -- gc, copy, rebuild -------------------------------------------------------------


def test_gc_repack_reseals(tmp_path, enc, master):
    img, r = _image(tmp_path)
    first = backup_image(enc, img, DISK, "full")
    for i in (0, 1, 3):  # what only the first point holds dies with it
        write_at(img, i * CS, r.bytes(CS))
    second = backup_image(enc, img, DISK, "full")
    snap = snapshot(img, str(tmp_path / "second"))
    delete_points(enc, [first.id])
    report = collect(enc.store, max_unused=0.0)
    assert report.repacked and report.new_packs, report
    path = enc.path
    enc.close()
    repo = Repository(ChunkStore.open(path, master=master))
    try:
        out = str(tmp_path / "second.out")
        restore_backup(repo, second.id, out)
        assert same_file(out, snap)
        v = verify_repository(repo, mark=False)
        assert v.ok and v.chunks.chunks_checked > 0
        moved = [e for e in (_entry(repo, _chunk_digest(repo, snap, i)) for i in (2, 9, 20, 30))
                 if e.pack_id.hex() in report.new_packs]
        assert moved  # some of its chunks now live in gc's new pack, sealed for their place there
    finally:
        repo.close()


def test_copy_encrypted_to_plaintext_and_back(tmp_path, enc):
    (full, snap1), (incr, snap2) = _backups(enc, tmp_path)
    plain = _new(str(tmp_path / "plain"), None)
    other_key = MasterKey.new()
    back = _new(str(tmp_path / "back"), other_key, "chacha20-poly1305")
    try:
        r1 = copy_points(enc, plain, [], everything=True)
        assert r1.rehash and r1.stats.chunks_rehashed > 0
        r2 = copy_points(plain, back, [], everything=True)
        assert r2.rehash and r2.stats.chunks_rehashed > 0
        for repo in (plain, back):
            for record, snap in ((full, snap1), (incr, snap2)):
                out = str(tmp_path / f"{os.path.basename(repo.path)}-{record.id}.out")
                restore_backup(repo, record.id, out)
                assert same_file(out, snap)
            assert verify_repository(repo, mark=False).ok
        # Ids re-keyed: no id of one store names a chunk in another.
        ids = [_chunk_digest(repo, snap1, 0) for repo in (enc, plain, back)]
        assert len(set(ids)) == 3
        with back.store.read_txn() as txn:
            assert back.store.lookup(txn, ids[0]) is None and back.store.lookup(txn, ids[2]) is not None
        # The plaintext store holds the image's bytes, the re-encrypted one none of them.
        needles = _patterns(snap1)
        assert _found(plain.path, needles[:3])
        assert _found(back.path, needles + [DISK.encode()]) == []
        # Between two encrypted stores directly: their id keys differ, so every chunk is re-hashed.
        third = _new(str(tmp_path / "third"), MasterKey.new())
        r3 = copy_points(enc, third, [], everything=True)
        assert r3.rehash and r3.stats.chunks_rehashed > 0
        out = str(tmp_path / "third.out")
        restore_backup(third, incr.id, out)
        assert same_file(out, snap2)
        third.close()
    finally:
        plain.close()
        back.close()


def test_copy_between_encrypted_stores_of_one_key_reseals(tmp_path, enc, master):
    """Two stores of one master key name chunks alike (no re-hash), yet a record is
    never passed through sealed: SRC opens it, DST's session seals it for its
    own pack and offset."""
    (full, snap1), (incr, snap2) = _backups(enc, tmp_path)
    twin = _new(str(tmp_path / "twin"), master)
    try:
        result = copy_points(enc, twin, [], everything=True)
        assert not result.rehash and result.stats.chunks_sent > 0
        for record, snap in ((full, snap1), (incr, snap2)):
            out = str(tmp_path / f"twin-{record.id}.out")
            restore_backup(twin, record.id, out)
            assert same_file(out, snap)
        assert verify_repository(twin, mark=False).ok
    finally:
        twin.close()


def test_rebuild_index_and_config_of_an_encrypted_store(tmp_path, enc, master):
    (full, snap1), (incr, snap2) = _backups(enc, tmp_path)
    path = enc.path
    cfg = enc.store.config
    enc.close()
    shutil.rmtree(os.path.join(path, "index"))
    with pytest.raises(KeyRequiredError):
        _rebuild(path)
    with pytest.raises(WrongKeyError):
        _rebuild(path, master=MasterKey.new())
    assert not os.path.exists(os.path.join(path, "index"))  # refused before anything was made
    report = _rebuild(path, master=master)
    assert report.complete and report.commits == 2, report
    # config.json lost too: the pack headers give it back, cipher and key check included.
    os.unlink(os.path.join(path, "config.json"))
    doc = recovery.recreate_config(path)
    assert doc["changed"]
    repo = Repository(ChunkStore.open(path, master=master))
    try:
        assert repo.store.config == cfg
        for record, snap in ((full, snap1), (incr, snap2)):
            out = str(tmp_path / f"{record.id}.rebuilt")
            restore_backup(repo, record.id, out)
            assert same_file(out, snap)
    finally:
        repo.close()


def test_verify_structure_pass_works_without_opening(tmp_path, enc):
    """The payload check is over the sealed bytes: a scan frames and checks every
    record of an encrypted pack without the key."""
    _backups(enc, tmp_path)
    for p in iter_pack_paths(enc.path):
        scan = scan_pack(p)
        assert scan.sealed and not scan.lost and scan.torn_at is None
    assert verify_chunks(enc.store).ok


def test_point_view_reads_through_the_opened_records(tmp_path, enc):
    """serve, mount and files read a point through PointView (ChunkStore.read_chunk):
    the same bytes as the image, and a record that does not authenticate is an
    error there too, never other bytes."""
    from engine.pointview import PointView
    (full, snap1), _ = _backups(enc, tmp_path)
    with open(snap1, "rb") as f:
        image = f.read()
    view = PointView.open(enc, full.id)
    try:
        assert view.pread(0, len(image)) == image
    finally:
        view.close()
    digest = _chunk_digest(enc, snap1, 9)
    entry = _entry(enc, digest)
    pack = enc.store.pack_path(entry.pack_id)
    at = entry.offset + RECORD_HEADER_SIZE + 7
    _write(pack, at, bytes([_read(pack, at, 1)[0] ^ 0x80]))
    _fix_checks(pack, entry.offset)
    view = PointView.open(enc, full.id)
    try:
        assert view.pread(0, CS) == image[:CS]
        with pytest.raises(IntegrityError, match="does not authenticate"):
            view.pread(9 * CS, CS)
    finally:
        view.close()
