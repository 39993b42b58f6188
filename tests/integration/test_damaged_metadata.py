"""Damage to the metadata that used to pass verify and restore wrong bytes
(issue 9, items 4 and 7): a changed byte in a manifest or a segment, and a
catalog record that does not parse.  Each is changed directly in LMDB, as a
bad disk or a bad hand would."""

from __future__ import annotations

import json
import os

import lmdb
import pytest

from chunkstore.errors import IntegrityError
from engine.manifest import Manifest
from engine.restore import PARTIAL_SUFFIX
import jsonshape
from helpers import make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, text_bytes, write_at

CS = 64 << 10


def _env(store: str) -> lmdb.Environment:
    return lmdb.open(os.path.join(store, "index"), max_dbs=16)


def _flip(store: str, db_name: bytes, key: bytes | None, at: int) -> bytes:
    """Flip one bit of byte ``at`` of the value under ``key`` (the first key when None)."""
    env = _env(store)
    try:
        db = env.open_db(db_name)
        with env.begin(write=True, db=db) as txn:
            if key is None:
                key = next(iter(txn.cursor().iternext(keys=True, values=False)))
            value = bytearray(txn.get(key))
            value[at] ^= 0x01
            txn.put(key, bytes(value))
        return bytes(key)
    finally:
        env.close()


def _put(store: str, db_name: bytes, key: bytes, value: bytes) -> None:
    env = _env(store)
    try:
        with env.begin(write=True, db=env.open_db(db_name)) as txn:
            txn.put(key, value)
    finally:
        env.close()


@pytest.fixture
def two_points(tmp_path):
    """A store with d@1 (full) and d@2 (incremental) of a 2-segment disk, and their images."""
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    img = str(tmp_path / "d.img")
    make_sparse(img, 1100 * CS + 4096)  # 1101 chunks: two segments
    r = rng(90)
    write_at(img, 0, r.bytes(3 * CS))
    write_at(img, 1050 * CS, text_bytes(r, 2 * CS))
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    p1 = snapshot(img, str(tmp_path / "p1"))
    write_at(img, 5 * CS, r.bytes(CS))
    assert run_cli("backup", store, img, "--disk", "d", "--mode", "incremental").returncode == 0
    p2 = snapshot(img, str(tmp_path / "p2"))
    return store, img, {"d@1": p1, "d@2": p2}


def _restore_refused(store: str, bid: str, tmp_path, *needles: str) -> None:
    out = str(tmp_path / f"out-{bid.replace('@', '-')}.img")
    before = store_fingerprint(store)
    proc = run_cli("restore", store, bid, out)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert not os.path.exists(out) and not os.path.exists(out + PARTIAL_SUFFIX)
    assert store_fingerprint(store) == before


def _verify(store: str, expect: int) -> dict:
    proc = run_cli("verify", store, "--json")
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert not jsonshape.check(doc, "verify", jsonshape.parse()[0])
    return doc


@pytest.mark.parametrize("at", [12, 30, 40])  # the disk size, the checksum, a segment digest
def test_one_changed_byte_in_a_manifest_is_found(two_points, tmp_path, at):
    store, _, points = two_points
    key = b"d\0" + (1).to_bytes(4, "big")
    _flip(store, b"manifests", key, at)
    doc = _verify(store, 3)
    assert set(doc["damaged_manifests"]) == {"d@1"}
    assert "manifest checksum mismatch" in doc["damaged_manifests"]["d@1"]
    _restore_refused(store, "d@1", tmp_path, "d@1", "manifest checksum mismatch")
    # The other point is untouched and restores identical.
    out = str(tmp_path / "ok.img")
    assert run_cli("restore", store, "d@2", out).returncode == 0 and same_file(out, points["d@2"])


def test_one_changed_byte_in_a_segment_is_found(two_points, tmp_path):
    store, img, points = two_points
    env = _env(store)
    with env.begin(db=env.open_db(b"manifests")) as txn:
        m1 = Manifest.decode(txn.get(b"d\0" + (1).to_bytes(4, "big")))
        m2 = Manifest.decode(txn.get(b"d\0" + (2).to_bytes(4, "big")))
    env.close()
    shared = m1.segments[1]
    assert m2.segments[1] == shared and m2.segments[0] != m1.segments[0]  # segment 1 is shared
    _flip(store, b"segments", shared, 5 * 16 + 3)  # a digest inside it
    doc = _verify(store, 3)
    assert set(doc["damaged_manifests"]) == {"d@1", "d@2"}
    for bid in ("d@1", "d@2"):
        reason = doc["damaged_manifests"][bid]
        assert shared.hex() in reason and "do not hash to its key" in reason and reason.startswith(bid), reason
        _restore_refused(store, bid, tmp_path, bid, shared.hex(), "do not hash to its key")
    # An incremental overlays the base's segments it changes: with a change in
    # the damaged one it fails too, naming the segment, and stores nothing.
    cbt = str(tmp_path / "cbt.json")
    with open(cbt, "w") as f:
        json.dump({"startOffset": 0, "length": os.path.getsize(img), "changedArea": [{"start": 1050 * CS, "length": CS}]}, f)
    before = store_fingerprint(store)
    proc = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "--changed-areas", cbt)
    assert proc.returncode == 1 and shared.hex() in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert store_fingerprint(store) == before


def test_a_segment_of_the_wrong_length_is_found(two_points, tmp_path):
    """A segment replaced by another valid segment (its key recomputed) of a
    different length: the key check passes, the manifest's count does not."""
    store, _, _ = two_points
    from engine.repository import Repository
    with Repository.open(store) as repo, repo.store.read_txn() as txn:
        m1 = repo.manifests.get(txn, b"d\0" + (1).to_bytes(4, "big"), "d@1")
        short = repo.manifests.segment(txn, m1.segments[0])[:-16]
        key = repo.store.digester(short)
        manifest = Manifest(m1.size, m1.chunk_size, 16, [key, m1.segments[1]], m1.nonzero)
    _put(store, b"segments", key, short)
    _put(store, b"manifests", b"d\0" + (1).to_bytes(4, "big"), manifest.encode())
    doc = _verify(store, 3)
    assert "holds 1023 digests" in doc["damaged_manifests"]["d@1"] and "expects 1024" in doc["damaged_manifests"]["d@1"]
    _restore_refused(store, "d@1", tmp_path, "d@1", "holds 1023 digests")


def test_manifest_counts_must_agree_with_the_disk_size():
    m = Manifest(1100 * CS, CS, 16, [b"\1" * 16], [3])   # 1100 chunks need two segments
    with pytest.raises(IntegrityError, match="holds 1 segments, but a disk of .* has 1100 chunks, so 2 segments"):
        Manifest.decode(m.encode(), "d@1")
    m = Manifest(10 * CS, CS, 16, [b"\1" * 16], [11])
    with pytest.raises(IntegrityError, match="11 non-zero chunks, more than its 10"):
        Manifest.decode(m.encode(), "d@1")
    good = Manifest(10 * CS, CS, 16, [b"\1" * 16], [10])
    assert Manifest.decode(good.encode()).n_chunks == 10


def test_a_manifest_that_disagrees_with_its_catalog_record_is_found(two_points, tmp_path):
    """A valid manifest (checksum right) of another size, as a wrong write would leave."""
    store, _, _ = two_points
    key = b"d\0" + (1).to_bytes(4, "big")
    env = _env(store)
    with env.begin(db=env.open_db(b"manifests")) as txn:
        m = Manifest.decode(txn.get(key))
    env.close()
    m.size += CS  # "a file 64 KiB too long": still two segments
    _put(store, b"manifests", key, m.encode())
    doc = _verify(store, 3)
    assert "the catalog one of" in doc["damaged_manifests"]["d@1"]
    _restore_refused(store, "d@1", tmp_path, "d@1", "the catalog one of")


# -- item 7: a catalog record that does not parse ---------------------------------------------------


@pytest.mark.parametrize("garbage", [b"\xff\xfenot json", b"[1, 2]", b'{"disk": "d", "seq": 1}',
                                     b'{"disk": "d", "seq": 1, "time": 1, "kind": "full", "base": null, '
                                     b'"size": "big", "chunk_size": 65536}'])
def test_a_bad_catalog_record_is_reported_and_skipped(two_points, tmp_path, garbage):
    store, _, points = two_points
    _put(store, b"catalog", b"d\0" + (1).to_bytes(4, "big"), garbage)
    # list: the other point is listed; the bad one named on stderr, in --json too; exit 0.
    proc = run_cli("list", store)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "\nd@2 " in proc.stdout and "\nd@1 " not in proc.stdout
    assert "catalog record d@1 is damaged" in proc.stderr, proc.stderr
    proc = run_cli("list", store, "--disk", "d", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and [b["id"] for b in doc["backups"]] == ["d@2"]
    assert not jsonshape.check(doc, "list", jsonshape.parse()[0])
    assert doc["bad_records"][0]["key"] == "d@1" and "damaged" in doc["bad_records"][0]["reason"]
    # stats: counts what parses, names what does not.
    proc = run_cli("stats", store, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["backups"] == 1 and doc["bad_records"][0]["key"] == "d@1", proc.stderr
    assert "catalog record d@1 is damaged" in proc.stderr
    proc = run_cli("stats", store)
    assert proc.returncode == 0 and "catalog record d@1" in proc.stderr and "Traceback" not in proc.stderr
    # verify: damage (exit 3), the record named, everything else still checked.
    doc = _verify(store, 3)
    assert doc["bad_records"][0]["key"] == "d@1" and doc["backups_checked"] == 1
    text = run_cli("verify", store)
    assert text.returncode == 3 and "DAMAGED catalog record d@1" in text.stdout
    out = str(tmp_path / "ok.img")
    assert run_cli("restore", store, "d@2", out).returncode == 0 and same_file(out, points["d@2"])


def test_a_record_under_a_key_that_is_not_its_own_is_reported(two_points):
    store, _, _ = two_points
    env = _env(store)
    with env.begin(db=env.open_db(b"catalog")) as txn:
        value = bytes(txn.get(b"d\0" + (2).to_bytes(4, "big")))
    env.close()
    _put(store, b"catalog", b"d\0" + (7).to_bytes(4, "big"), value)
    doc = _verify(store, 3)
    assert doc["bad_records"] == [{"key": "d@7", "reason": "catalog record d@7 is damaged: it describes d@2, "
                                                          "not the point its key names"}]
