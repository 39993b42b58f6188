"""`blockvault rebuild-index`, run as an administrator would: the index comes
back from the packs alone, and a torn tail is not indexed."""

import json
import os

import lmdb

from chunkstore import ChunkStore
from chunkstore.index import CHUNKS_DB, PACKS_DB
from chunkstore.pack import (PACK_HEADER, RECORD_HEADER_SIZE, encode_pack_header, encode_record,
                             pack_relpath)
from helpers import back_up_chain, make_sparse, rng, run_cli, same_file, text_bytes, write_at

CS = 64 << 10


def _dbs(store: str) -> dict[bytes, dict[bytes, bytes]]:
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    try:
        out = {}
        for name in (CHUNKS_DB, PACKS_DB):
            db = env.open_db(name)
            with env.begin(db=db) as txn:
                out[name] = {bytes(k): bytes(v) for k, v in txn.cursor()}
        return out
    finally:
        env.close()


def _wipe_index(store: str) -> None:
    """What a damaged or lost index looks like: no chunk and no pack entries."""
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            for name in (CHUNKS_DB, PACKS_DB):
                txn.drop(env.open_db(name, txn=txn), delete=False)
    finally:
        env.close()


def _store_with_points(tmp_path) -> tuple[str, dict[str, str]]:
    """A store with 1 MiB packs (several of them) and three points of one disk."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = str(tmp_path / "d.img")
    make_sparse(img, 96 * CS)
    r = rng(70)
    write_at(img, 0, r.bytes(24 * CS))
    write_at(img, 40 * CS, text_bytes(r, 16 * CS))
    points = back_up_chain(store, img, "d", r, lambda seq: ((60 + 8 * seq) * CS, 6 * CS), str(tmp_path / "p"))
    return store, points


def _restores_identical(store: str, points: dict[str, str], tmp_path) -> None:
    for bid, source in points.items():
        out = str(tmp_path / f"restored-{bid.replace('@', '-')}")
        proc = run_cli("restore", store, bid, out, "--force")
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, source), bid


def test_rebuild_index_brings_back_a_lost_index(tmp_path):
    store, points = _store_with_points(tmp_path)
    before = _dbs(store)
    assert len(before[PACKS_DB]) >= 3 and len(before[CHUNKS_DB]) > 40
    _wipe_index(store)
    lost = run_cli("restore", store, "d@3", str(tmp_path / "lost.img"))
    assert lost.returncode == 1 and "not in the index" in lost.stderr, lost.stderr

    proc = run_cli("rebuild-index", store, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["chunks"] == len(before[CHUNKS_DB]) and doc["packs"] == len(before[PACKS_DB])
    assert doc["torn"] == [] and doc["unreadable"] == [] and doc["duplicates"] == 0
    # The index the packs describe is the one the backups committed, entry for entry.
    assert _dbs(store) == before
    _restores_identical(store, points, tmp_path)
    verify = run_cli("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout
    assert f"checked {len(before[CHUNKS_DB])} chunks" in verify.stdout and "and 3 backups" in verify.stdout


def test_rebuild_index_stops_at_a_tail_record_whose_payload_is_bad(tmp_path):
    """An unsealed pack whose last record has an intact header but a payload
    that does not match its payload check (the header reached the disk, the
    payload's last page did not): the scan stops there, that record is not
    indexed, the records before it are."""
    store, points = _store_with_points(tmp_path)
    st = ChunkStore.open(store)
    r = rng(71)
    good, torn = r.bytes(CS), r.bytes(CS)
    pack_id = os.urandom(16)
    body = bytearray(encode_pack_header(st.config, pack_id))
    for raw in (good, torn):
        body += encode_record(st.digester(raw), 0, CS, raw) + raw
    torn_at = PACK_HEADER.size + RECORD_HEADER_SIZE + CS
    body[-4096:] = bytes(4096)  # the tail record's last page never reached the disk
    path = os.path.join(store, pack_relpath(pack_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(body)
    d_good, d_torn = st.digester(good), st.digester(torn)
    st.close()

    proc = run_cli("rebuild-index", store)
    assert proc.returncode == 0, proc.stderr
    assert f"torn tail ignored: {path}@{torn_at}: " in proc.stdout, proc.stdout
    assert "payload checksum mismatch" in proc.stdout, proc.stdout
    after = _dbs(store)
    assert d_good in after[CHUNKS_DB] and d_torn not in after[CHUNKS_DB]
    # The pack is known up to its good end, unsealed.
    assert after[PACKS_DB][pack_id][:13] == torn_at.to_bytes(8, "little") + (1).to_bytes(4, "little") + b"\0"
    with ChunkStore.open(store) as st:
        assert st.read_chunk(d_good) == good
    _restores_identical(store, points, tmp_path)
    verify = run_cli("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout
