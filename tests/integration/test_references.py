"""Reference counts (issue 10 item 3): kept by every commit, released with a point,
recomputed by rebuild, checked by verify."""

from __future__ import annotations

import json
import os
import struct

import lmdb
import pytest

from helpers import make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at
from lifecycle_helpers import chunk_digests, counts, delete_point, meta_gen, read_db

CS = 64 << 10


@pytest.fixture
def chain(tmp_path):
    """d@1 full, d@2 with 3 chunks changed, e@1 sharing d's first 4 chunks."""
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    r = rng(101)
    d = str(tmp_path / "d.img")
    make_sparse(d, 2100 * CS)  # three segments, the last one short
    write_at(d, 0, r.bytes(8 * CS))
    write_at(d, 1500 * CS, r.bytes(2 * CS))
    points = {}
    assert run_cli("backup", store, d, "--disk", "d").returncode == 0
    points["d@1"] = snapshot(d, str(tmp_path / "d1"))
    write_at(d, 5 * CS, r.bytes(3 * CS))
    assert run_cli("backup", store, d, "--disk", "d", "--mode", "incremental").returncode == 0
    points["d@2"] = snapshot(d, str(tmp_path / "d2"))
    e = str(tmp_path / "e.img")
    make_sparse(e, 10 * CS)
    with open(d, "rb") as f:
        write_at(e, 0, f.read(4 * CS))
    write_at(e, 6 * CS, r.bytes(CS))
    assert run_cli("backup", store, e, "--disk", "e").returncode == 0
    points["e@1"] = snapshot(e, str(tmp_path / "e1"))
    return store, points


def restores(store, points, tmp_path):
    for bid, src in points.items():
        out = str(tmp_path / f"r-{bid}")
        proc = run_cli("restore", store, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, src), bid
        os.unlink(out)


def test_counts_follow_the_commits(chain):
    store, _ = chain
    refs = counts(store, b"chunkrefs")
    d1, d2, e1 = (chunk_digests(store, b) for b in ("d@1", "d@2", "e@1"))
    assert len(d1) == 10 and len(d2) == 10 and len(e1) == 5
    # d@1 and d@2 share their first segment's unchanged chunks only through different segments.
    first = {x for x in d1 & d2 & e1}
    assert len(first) == 4
    # Every referenced chunk is counted, nothing else; the zero digest never.
    assert set(refs) == d1 | d2 | e1
    # A chunk counts segments: the first 4 chunks are in d@1's first segment, d@2's and e@1's.
    assert all(refs[x] == 3 for x in first)
    # d@2's changed chunks: one segment; d@1's overwritten chunks likewise.
    assert all(refs[x] == 1 for x in (d1 - d2) | (d2 - d1))
    seg = counts(store, b"segrefs")
    # d's second segment (all zero) and third (the two chunks at 1500) are shared by d@1 and d@2.
    assert sorted(seg.values()) == [1, 1, 1, 2, 2]
    assert read_db(store, b"dead") == {} and meta_gen(store) == 0
    stats = json.loads(run_cli("stats", store, "--json").stdout)
    assert stats["dead_bytes"] == 0 and stats["live_bytes"] == stats["stored_bytes"]


def test_a_released_point_kills_its_unique_chunks_and_frees_what_list_said(chain, tmp_path):
    store, points = chain
    listed = {b["id"]: b["unique_bytes"] for b in json.loads(run_cli("list", store, "--json").stdout)["backups"]}
    only_d1 = chunk_digests(store, "d@1") - chunk_digests(store, "d@2") - chunk_digests(store, "e@1")
    assert len(only_d1) == 3
    index = read_db(store, b"chunks")
    sizes = {d: 64 + struct.unpack_from("<I", index[d], 24)[0] for d in index}
    assert listed["d@1"] == sum(sizes[d] for d in only_d1)
    assert listed["e@1"] == sizes[next(iter(chunk_digests(store, "e@1") - chunk_digests(store, "d@1")))]

    assert delete_point(store, "d@1") == 3
    del points["d@1"]
    dead = counts(store, b"dead")
    assert set(dead) == only_d1 and set(dead.values()) == {1} and meta_gen(store) == 1
    assert not set(counts(store, b"chunkrefs")) & only_d1
    stats = json.loads(run_cli("stats", store, "--json").stdout)
    assert stats["dead_bytes"] == listed["d@1"]
    assert sum(counts(store, b"packdead").values()) == listed["d@1"]
    # d@1's first segment is gone: no other manifest names it.
    assert len(read_db(store, b"segments")) == 4
    proc = run_cli("verify", store)
    assert proc.returncode == 0 and "store OK" in proc.stdout, proc.stdout + proc.stderr
    restores(store, points, tmp_path)

    # rebuild recomputes the same counts, dead marks and dead bytes from the manifests.
    before = store_fingerprint(store)
    os.unlink(os.path.join(store, "index", "data.mdb"))
    assert run_cli("rebuild", store).returncode == 0
    after = store_fingerprint(store)
    for name in ("catalog", "manifests", "segments", "segrefs", "chunkrefs", "packdead", "chunks", "packs"):
        assert after[f"lmdb:{name}"] == before[f"lmdb:{name}"], name
    assert set(counts(store, b"dead")) == only_d1
    assert run_cli("verify", store).returncode == 0
    restores(store, points, tmp_path)


@pytest.mark.parametrize("which", ["chunkrefs", "segrefs", "dead"])
def test_verify_reports_a_wrong_count_as_damage(chain, which):
    store, _ = chain
    # which == "dead": a referenced chunk marked dead
    key = next(iter(read_db(store, b"chunkrefs" if which == "dead" else which.encode())))
    env = lmdb.open(os.path.join(store, "index"), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.put(key, struct.pack("<Q", 7), db=env.open_db(which.encode(), txn=txn))
    env.close()
    proc = run_cli("verify", store)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "WRONG reference count" in proc.stdout and key.hex() in proc.stdout
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    assert doc["ok"] is False and doc["counts_checked"] is True
    # one wrong count; a wrong dead mark also makes its pack's dead bytes wrong
    assert len(doc["count_drift"]) == (2 if which == "dead" else 1)
    assert key.hex() in doc["count_drift"][0]
