"""Damage to pack frames (issue 9, item 5): verify checks every pack's header
and trailer, and rebuild-index salvages every good record after a bad one,
saying what it could not save, with exit 3."""

from __future__ import annotations

import json
import os

import lmdb
import pytest

from chunkstore.index import CHUNKS_DB
from chunkstore.pack import PACK_HEADER, RECORD_HEADER_SIZE, iter_pack_paths, scan_pack
import jsonshape
from helpers import chunk_packs, make_sparse, rng, run_cli, same_file, snapshot, write_at

CS = 64 << 10
N = 40


@pytest.fixture
def one_pack(tmp_path):
    """A store whose one data pack holds N chunk records, and a point of a disk using them."""
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    img = str(tmp_path / "d.img")
    make_sparse(img, 64 * CS)
    write_at(img, 0, rng(91).bytes(N * CS))
    proc = run_cli("backup", store, img, "--disk", "d", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    packs = chunk_packs(store)  # the commit's metadata pack aside
    assert len(packs) == 1
    scan = scan_pack(packs[0])
    assert len(scan.records) == N and scan.sealed
    return store, packs[0], scan, snapshot(img, str(tmp_path / "p1"))


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def _indexed(store: str) -> set[bytes]:
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    try:
        with env.begin(db=env.open_db(CHUNKS_DB)) as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}
    finally:
        env.close()


def _wipe_chunks(store: str) -> None:
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            txn.drop(env.open_db(CHUNKS_DB, txn=txn), delete=False)
    finally:
        env.close()


def _rebuild(store: str, expect: int) -> dict:
    proc = run_cli("rebuild-index", store, "--json")
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert not jsonshape.check(doc, "rebuild-index", jsonshape.parse()[0]), jsonshape.check(
        doc, "rebuild-index", jsonshape.parse()[0])
    return doc


def test_a_flipped_bit_in_a_pack_header_is_found_and_the_pack_salvaged(one_pack, tmp_path):
    store, pack, _, p1 = one_pack
    before = _indexed(store)
    _flip(pack, 40)  # inside the pack id field
    proc = run_cli("verify", store, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3 and doc["ok"] is False, proc.stdout
    pid = os.path.basename(pack)[:-5]
    assert [(p["id"], p["path"]) for p in doc["bad_packs"]] == [(pid, pack)]
    assert "pack header checksum mismatch" in doc["bad_packs"][0]["reason"]
    text = run_cli("verify", store)
    assert text.returncode == 3 and f"DAMAGED pack {pid}" in text.stdout
    # The rebuild keeps every record (the pack id is also the file name) and says the header is bad.
    _wipe_chunks(store)
    doc = _rebuild(store, 3)
    assert doc["chunks"] == N and doc["lost"] == [] and doc["error"]["code"] == "damaged"
    assert len(doc["bad_headers"]) == 1 and pack in doc["bad_headers"][0]
    assert _indexed(store) == before
    out = str(tmp_path / "r.img")
    assert run_cli("restore", store, "d@1", out).returncode == 0 and same_file(out, p1)


def test_a_damaged_trailer_is_found(one_pack):
    store, pack, _, _ = one_pack
    _flip(pack, os.path.getsize(pack) - RECORD_HEADER_SIZE + 9)  # the trailer's record count
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    assert doc["ok"] is False and "trailer" in doc["bad_packs"][0]["reason"], doc["bad_packs"]


@pytest.mark.parametrize("where", ["payload", "header"])
def test_one_bad_record_mid_pack_loses_one_chunk_only(one_pack, tmp_path, where):
    store, pack, scan, _ = one_pack
    victim = scan.records[N // 2]
    before = _indexed(store)
    _flip(pack, victim.offset + (RECORD_HEADER_SIZE + 100 if where == "payload" else 20))
    _wipe_chunks(store)
    doc = _rebuild(store, 3)
    after = _indexed(store)
    assert before - after == {victim.header.digest} and after <= before  # 1 chunk lost, not 20
    assert doc["chunks"] == N - 1
    end = scan.records[N // 2 + 1].offset
    assert doc["lost"] == [f"{pack}@{victim.offset}-{end}: " + doc["lost"][0].split(": ", 1)[1]]
    assert "checksum mismatch" in doc["lost"][0]
    text = run_cli("rebuild-index", store)
    assert text.returncode == 3 and f"NOT SAVED" in text.stdout and f"{pack}@{victim.offset}-{end}" in text.stdout
    assert "not everything could be saved" in text.stderr
    # verify names the lost chunk and the point it hurts.
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    assert doc["ok"] is False
    assert [b["digest"] for b in doc["bad_chunks"]] == [victim.header.digest.hex()]
    assert doc["bad_chunks"][0]["backups"][0]["offsets"] == [(N // 2) * CS]


def test_a_torn_tail_is_still_only_a_torn_tail(one_pack):
    """What a crash leaves (an unsealed pack cut in a record) is not damage: exit 0."""
    store, pack, scan, _ = one_pack
    with open(pack, "r+b") as f:
        f.truncate(scan.records[-1].offset + 30)
    _wipe_chunks(store)
    doc = _rebuild(store, 0)
    assert doc["chunks"] == N - 1 and len(doc["torn"]) == 1 and doc["lost"] == []


def test_scan_resynchronises_after_garbage(tmp_path, one_pack):
    """Bytes that look like a record magic inside a bad range do not stop the scan."""
    _, pack, scan, _ = one_pack
    a, b = scan.records[3], scan.records[6]
    with open(pack, "r+b") as f:
        f.seek(a.offset)
        f.write((b"BVCK" + bytes(60)) * ((b.offset - a.offset) // 64 - 1) + b"BVND")
    again = scan_pack(pack)
    assert len(again.records) == N - 3 and again.sealed and again.torn_at is None
    assert [(s, e) for s, e, _, _ in again.lost] == [(a.offset, b.offset)]
    assert again.records[3].offset == b.offset and b.offset - a.offset > PACK_HEADER.size
