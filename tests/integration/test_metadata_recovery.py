"""The packs are the store (issue 9, items 1-3): a lost, emptied or truncated index
and a lost or edited config.json are each said plainly, and ``blockvault rebuild``
(``--config``) brings the store back from the packs alone, every point identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lmdb
import pytest

from chunkstore import ChunkStore
from helpers import REPO_ROOT, back_up_chain, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, text_bytes, write_at

CS = 64 << 10


@pytest.fixture
def chain(tmp_path):
    """A store (1 MiB packs) with two disks: d@1..d@3 (full, incremental, differential) and e@1."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = str(tmp_path / "d.img")
    make_sparse(img, 80 * CS + 7)
    r = rng(91)
    write_at(img, 0, r.bytes(20 * CS))
    write_at(img, 30 * CS, text_bytes(r, 10 * CS))
    points = back_up_chain(store, img, "d", r, lambda seq: ((50 + 6 * seq) * CS, 3 * CS), str(tmp_path / "d"))
    other = str(tmp_path / "e.img")
    make_sparse(other, 8 * CS)
    write_at(other, CS, r.bytes(2 * CS))
    assert run_cli("backup", store, other, "--disk", "e").returncode == 0
    points["e@1"] = snapshot(other, str(tmp_path / "e1"))
    return store, points


def restores_identical(store: str, points: dict, tmp_path) -> None:
    for bid, source in points.items():
        out = str(tmp_path / f"out-{bid.replace('@', '-')}")
        proc = run_cli("restore", store, bid, out, "--force")
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, source), bid


def data_mdb(store: str) -> str:
    return os.path.join(store, "index", "data.mdb")


def empty_every_database(store: str) -> None:
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in [bytes(k) for k, _ in txn.cursor()]:
            txn.drop(env.open_db(name, txn=txn), delete=False)
    env.close()


def test_an_emptied_index_is_metadata_lost_and_rebuild_brings_every_backup_back(chain, tmp_path):
    store, points = chain
    before = store_fingerprint(store)
    # the reference counts are in the comparison too (recomputed by the rebuild, not replayed)
    assert {"lmdb:segrefs", "lmdb:chunkrefs", "lmdb:dead", "lmdb:packdead"} <= set(before)
    empty_every_database(store)
    listing = run_cli("list", store)
    assert listing.returncode == 0 and listing.stdout.strip() == "no backups"
    verify = run_cli("verify", store)
    assert verify.returncode == 3, verify.stdout + verify.stderr
    assert "METADATA LOST" in verify.stdout and f"metadata lost: run 'blockvault rebuild {store}'" in verify.stdout
    assert "store DAMAGED" in verify.stdout and "store OK" not in verify.stdout
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    assert doc["ok"] is False and "metadata lost" in doc["metadata_lost"] and doc["error"]["exit_code"] == 3

    rebuilt = run_cli("rebuild", store)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "4 commits replayed: 4 backups" in rebuilt.stdout, rebuilt.stdout
    assert store_fingerprint(store) == before
    restores_identical(store, points, tmp_path)
    assert run_cli("verify", store).returncode == 0


def test_a_deleted_data_mdb_is_named_and_rebuilt(chain, tmp_path):
    store, points = chain
    before = store_fingerprint(store)
    os.unlink(data_mdb(store))
    for args in (["list", store], ["verify", store], ["restore", store, "d@1", str(tmp_path / "x.img")],
                 ["backup", store, points["e@1"], "--disk", "e"]):
        proc = run_cli(*args)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert "data.mdb is missing" in proc.stderr and f"run 'blockvault rebuild {store}'" in proc.stderr
        assert not os.path.exists(data_mdb(store)), args  # nobody made a new, empty index meanwhile
    proc = run_cli("rebuild-index", store)  # the old name works too
    assert proc.returncode == 0, proc.stderr
    assert store_fingerprint(store) == before
    restores_identical(store, points, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_data_mdb_is_refused_before_it_is_mapped_and_rebuilt_aside(chain, tmp_path, damage):
    store, points = chain
    before = store_fingerprint(store)
    path = data_mdb(store)
    size = os.path.getsize(path)
    if damage == "truncated":
        os.truncate(path, size // 2)
        needle = "is truncated"
    else:
        with open(path, "wb") as f:
            f.write(rng(92).bytes(size))
        needle = "is not an LMDB file"
    with open(path, "rb") as f:
        damaged = f.read()
    for args in (["list", store], ["verify", store], ["stats", store],
                 ["restore", store, "d@1", str(tmp_path / "x.img")],
                 ["backup", store, points["e@1"], "--disk", "e"]):
        proc = run_cli(*args)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)  # not SIGBUS (-7 / 135)
        assert needle in proc.stderr and f"run 'blockvault rebuild {store}'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert open(path, "rb").read() == damaged
    proc = run_cli("rebuild", store, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    aside = doc["moved_aside"]
    assert aside.startswith(path + ".damaged-") and open(aside, "rb").read() == damaged
    assert doc["records"]["catalog"] == 4 and doc["left_out"] == []
    assert store_fingerprint(store) == before
    restores_identical(store, points, tmp_path)
    assert run_cli("verify", store).returncode == 0


def test_a_lost_config_is_recreated_from_the_pack_headers(chain, tmp_path):
    store, points = chain
    config = os.path.join(store, "config.json")
    original = open(config, "rb").read()
    os.unlink(config)
    proc = run_cli("list", store)
    assert proc.returncode == 1 and "config.json is missing, but the directory holds blockvault packs" in proc.stderr
    assert f"run 'blockvault rebuild --config {store}'" in proc.stderr
    proc = run_cli("rebuild", "--config", store)
    assert proc.returncode == 0, proc.stderr
    assert f"recreated {os.path.abspath(config)} from" in proc.stdout
    assert open(config, "rb").read() == original  # every setting, the seed included
    restores_identical(store, points, tmp_path)


def test_an_edited_seed_is_detected_and_the_config_rewritten_from_the_packs(chain, tmp_path):
    store, points = chain
    config = os.path.join(store, "config.json")
    original = open(config, "rb").read()
    doc = json.loads(original)
    doc["seed"] = f"{int(doc['seed'], 16) ^ 1:016x}"
    with open(config, "w") as f:
        json.dump(doc, f)
    edited = open(config, "rb").read()
    before = store_fingerprint(store)
    for args in (["list", store], ["restore", store, "d@3", str(tmp_path / "x.img")],
                 ["backup", store, points["e@1"], "--disk", "e"], ["verify", store]):
        proc = run_cli(*args)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert "config.json disagrees with the pack headers (seed differ" in proc.stderr, proc.stderr
        assert f"run 'blockvault rebuild --config {store}'" in proc.stderr
    assert store_fingerprint(store) == before
    proc = run_cli("rebuild", "--config", store, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["changed"] is True and open(out["replaced"], "rb").read() == edited
    assert "seed" not in out and doc["seed"] not in proc.stdout
    assert open(config, "rb").read() == original
    restores_identical(store, points, tmp_path)


# A backup killed after its metadata records are durable but before the LMDB commit.
DIE_BEFORE_LMDB_COMMIT = (
    "import os, runpy, sys; import chunkstore.session as s; orig = s.WriteSession._write_metadata\n"
    "def die(self, records):\n    orig(self, records)\n    os._exit(9)\n"
    "s.WriteSession._write_metadata = die; sys.argv = ['blockvault'] + sys.argv[1:]; "
    "runpy.run_module('engine.cli', run_name='__main__')")


def killed_backup(store: str, source: str, disk: str) -> None:
    proc = subprocess.run([sys.executable, "-c", DIE_BEFORE_LMDB_COMMIT, "backup", store, source, "--disk", disk],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr


def test_a_commit_that_died_before_lmdb_is_left_out_once_a_later_commit_exists(chain, tmp_path):
    store, points = chain
    r = rng(93)
    img = str(tmp_path / "f.img")
    make_sparse(img, 6 * CS)
    write_at(img, 0, r.bytes(3 * CS))
    killed_backup(store, img, "f")            # would have been f@1
    verify = run_cli("verify", store)         # a crash is not lost metadata
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout
    write_at(img, 0, r.bytes(3 * CS))
    assert run_cli("backup", store, img, "--disk", "f").stdout.strip() == "f@1"
    points["f@1"] = snapshot(img, str(tmp_path / "f1"))
    before = store_fingerprint(store)
    os.unlink(data_mdb(store))
    proc = run_cli("rebuild", store, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["commits"] == 5 and len(doc["left_out"]) == 1 and "never committed" in doc["left_out"][0]
    # The catalog is the one the commits made (the killed commit's number stays reserved); the
    # killed backup's packs are now known to the index, their chunks indexed like any other.
    after = store_fingerprint(store)
    for name in ("catalog", "manifests", "segments", "meta"):
        assert after[f"lmdb:{name}"] == before[f"lmdb:{name}"], name
    assert set(after) == set(before)
    restores_identical(store, points, tmp_path)


def test_a_complete_commit_that_died_last_is_counted(chain, tmp_path):
    """Its chunks were durable before its metadata was written: restorable, so the rebuild keeps it."""
    store, points = chain
    img = str(tmp_path / "g.img")
    make_sparse(img, 6 * CS)
    write_at(img, CS, rng(94).bytes(2 * CS))
    killed_backup(store, img, "g")
    assert [b["id"] for b in json.loads(run_cli("list", store, "--json").stdout)["backups"]] == [
        "d@1", "d@2", "d@3", "e@1"]
    os.unlink(data_mdb(store))
    proc = run_cli("rebuild", store)
    assert proc.returncode == 0, proc.stderr
    points["g@1"] = img
    restores_identical(store, points, tmp_path)
    verify = run_cli("verify", store)
    assert verify.returncode == 0 and "and 5 backups" in verify.stdout, verify.stdout


def metadata_pack_of(store: str, commit: int) -> str:
    from chunkstore.metadata import metadata_part
    from chunkstore.pack import METADATA_MAGIC, iter_pack_paths, scan_pack
    (path,) = [p for p in iter_pack_paths(store)
               if any(r.header.magic == METADATA_MAGIC and metadata_part(r.header).commit == commit
                      for r in scan_pack(p).records)]
    return path


def test_a_lost_metadata_pack_is_missing_to_verify_and_the_rebuild_says_what_it_could_not_recover(chain, tmp_path):
    store, points = chain
    lost = metadata_pack_of(store, 2)          # d@2's commit
    os.unlink(lost)
    verify = run_cli("verify", store)
    assert verify.returncode == 3 and f"MISSING pack {os.path.basename(lost)[:-5]} ({lost})" in verify.stdout
    proc = run_cli("rebuild", store, "--json")
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == "damaged"
    assert "commit 2: its metadata records are missing" in doc["error"]["message"]
    assert "commit 2: its metadata records are missing" in proc.stderr
    assert doc["commits"] == 3 and doc["records"]["catalog"] == 3
    # The index it replaced is kept, d@2 and all.
    kept = lmdb.open(doc["previous_index"], readonly=True, lock=False, max_dbs=16)
    with kept.begin() as txn:
        catalog = kept.open_db(b"catalog", txn=txn, create=False)
        assert txn.get(b"d\0\0\0\0\x02", db=catalog) is not None
    kept.close()
    listed = [b["id"] for b in json.loads(run_cli("list", store, "--json").stdout)["backups"]]
    assert listed == ["d@1", "d@3", "e@1"]
    restores_identical(store, {k: points[k] for k in ("d@1", "e@1")}, tmp_path)


@pytest.mark.parametrize("where", ["payload", "tail"])
def test_a_damaged_metadata_record_is_damage_to_verify(chain, tmp_path, where):
    """The index still holds the commit, so reads work; but the pack copy the
    rebuild needs is bad, and verify must say so (no chunk check reads it)."""
    store, _ = chain
    path = metadata_pack_of(store, 2)
    with open(path, "r+b") as f:
        if where == "payload":   # a byte inside the first record's payload
            f.seek(128 + 64 + 3)
            byte = f.read(1)
            f.seek(128 + 64 + 3)
            f.write(bytes([byte[0] ^ 0x55]))
        else:                    # the trailer gone: the pack ends early
            f.truncate(os.path.getsize(path) - 64)
    proc = run_cli("verify", store, "--json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout)
    pack_id = os.path.basename(path)[:-5]
    bad = [p for p in doc["bad_packs"] if p["id"] == pack_id]
    assert bad and "metadata" in bad[0]["reason"], doc["bad_packs"]
