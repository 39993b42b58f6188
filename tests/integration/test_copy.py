"""``blockvault copy``: points into another store, only the chunks it lacks (issue 12, item 8).

Real stores, real processes: every copied point restores byte-identical from
DST, DST verifies clean (its reference counts recomputed and compared), the
counts the command reports are checked against what the stores hold, and a
copy killed with SIGKILL leaves DST with no new point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import jsonshape
from chunkstore import ChunkStore
from engine.repository import Repository
from engine.verify import verify_repository
from engine.vsphere.vmcatalog import VmCatalog
from helpers import (REPO_ROOT, back_up_chain, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint,
                     write_at)
from vmpoints import vm_backup

CS = 64 << 10
SIZE = 4 << 20


def run_json(*args, expect: int = 0) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def init(path: str, **settings) -> str:
    Repository.init(path, chunk_size=settings.pop("chunk_size", CS), **settings).close()
    return path


def records(store: str) -> dict[str, dict]:
    doc = run_json("list", store)
    return {b["id"]: b for b in doc["backups"]}


def chunk_count(store: str) -> int:
    with ChunkStore.open(store) as s, s.read_txn() as txn:
        return txn.stat(s.chunks_db)["entries"]


def check_clean(store: str) -> None:
    """verify (chunks, manifests, catalog, and every reference count recomputed) finds nothing."""
    with Repository.open(store) as repo:
        report = verify_repository(repo, mark=False)
    assert report.ok, report.as_dict()


def check_restores(store: str, expected: dict[str, str], scratch: str) -> None:
    for ident, image in expected.items():
        out = os.path.join(scratch, "restored.img")
        proc = run_cli("restore", store, ident, out, "--force")
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, image), f"{ident} does not restore identical from {store}"
        os.unlink(out)


@pytest.fixture
def chain(tmp_path):
    """SRC with disk a@1..3 (full, incremental, differential); {id: image as it was}."""
    src = init(str(tmp_path / "src"))
    img = str(tmp_path / "a.img")
    make_sparse(img, SIZE)
    r = rng(120)
    write_at(img, 0, r.bytes(20 * CS))
    write_at(img, 40 * CS, r.bytes(3 * CS))
    points = back_up_chain(src, img, "a", r, lambda seq: (seq * 7 * CS + 11, 2 * CS), str(tmp_path / "snap"))
    return src, img, points


def test_chain_copies_to_a_store_of_another_seed_and_the_next_night_sends_only_its_new_chunks(tmp_path, chain):
    src, img, points = chain
    assert run_cli("note", src, "a@2", "before the upgrade").returncode == 0
    assert run_cli("protect", src, "a@1").returncode == 0
    dst = init(str(tmp_path / "dst"))
    before = records(src)

    doc = run_json("copy", src, dst, "--all")
    problems = jsonshape.check(doc, "copy")
    assert not problems, problems
    assert doc["rehashed"] is True and doc["rehash_reasons"] == ["digest seed"]
    assert [(c["id"], c["copied_to"]) for c in doc["copied"]] == [("a@1", "a@1"), ("a@2", "a@2"), ("a@3", "a@3")]
    assert doc["skipped"] == []
    # Every chunk SRC holds went over once, re-hashed: DST holds exactly as many.
    src_chunks = chunk_count(src)
    assert doc["stats"]["chunks_sent"] == doc["stats"]["chunks_rehashed"] == src_chunks == chunk_count(dst)
    check_clean(dst)
    check_restores(dst, points, str(tmp_path))

    after = records(dst)
    for ident, rec in before.items():
        got = after[ident]
        for key in ("time", "kind", "base", "size", "change_id", "note", "warnings", "stats"):
            assert got[key] == rec[key], (ident, key)
        assert got["metadata"]["source"] == rec["metadata"]["source"]
        assert got["metadata"]["copied_from"] == {"store_id": doc["source"]["store_id"], "id": ident}
    assert before["a@1"]["protected"] is True and after["a@1"]["protected"] is False  # DST's retention decides
    assert after["a@2"]["note"] == "before the upgrade"

    # The next night: T4 in SRC, and the copy sends exactly T4's new chunks.
    write_at(img, 50 * CS + 3, rng(121).bytes(3 * CS))
    t4 = run_json("backup", src, img, "--disk", "a", "--mode", "incremental")
    points["a@4"] = snapshot(img, str(tmp_path / "snap4"))
    dst_before = chunk_count(dst)
    doc = run_json("copy", src, dst, "--all")
    assert [c["id"] for c in doc["copied"]] == ["a@4"]
    assert [(s["id"], s["existing"]) for s in doc["skipped"]] == [("a@1", "a@1"), ("a@2", "a@2"), ("a@3", "a@3")]
    st = doc["stats"]
    assert t4["stats"]["new_chunks"] == 4  # 3 chunks' worth, 3 bytes past a chunk boundary
    assert st["chunks_sent"] == t4["stats"]["new_chunks"] == chunk_count(dst) - dst_before
    assert st["bytes_sent"] == t4["stats"]["stored_bytes"]  # same zstd level: the same records, re-named
    assert st["chunks_read"] == st["chunks_sent"]  # the rest was translated from a@3's copy, unread
    check_clean(dst)
    check_restores(dst, {"a@4": points["a@4"]}, str(tmp_path))

    # And a third run has nothing to do.
    doc = run_json("copy", src, dst, "--disk", "a")
    assert doc["copied"] == [] and doc["stats"]["chunks_read"] == doc["stats"]["chunks_sent"] == 0


def test_same_digest_keys_copy_the_segments_as_they_are_and_copy_back_skips(tmp_path, chain):
    """sha256 stores name every chunk alike: no re-hash, only what DST lacks is read.
    Copying DST on to a third store works the same, and copying DST back into SRC
    finds every point there already."""
    src_, img, points = chain
    src = init(str(tmp_path / "src2"), digest="sha256")
    for seq in (1, 2, 3):
        assert run_cli("backup", src, points[f"a@{seq}"], "--disk", "a").returncode == 0
    mid = init(str(tmp_path / "mid"), digest="sha256", compression_level=5)
    # mid holds a@1 already (copied by id), so copying a@2 and a@3 reads only their new chunks.
    first = run_json("copy", src, mid, "a@1")
    assert [c["copied_to"] for c in first["copied"]] == ["a@1"] and first["rehashed"] is False
    assert first["stats"]["chunks_read"] == first["stats"]["chunks_sent"] == chunk_count(mid)
    held = chunk_count(mid)
    doc = run_json("copy", src, mid, "--disk", "a")
    assert [c["id"] for c in doc["copied"]] == ["a@2", "a@3"]
    assert doc["stats"]["chunks_read"] == doc["stats"]["chunks_sent"] == chunk_count(mid) - held > 0
    with ChunkStore.open(src) as s, ChunkStore.open(mid) as m, s.read_txn() as a, m.read_txn() as b:
        assert {bytes(k) for k, _ in a.cursor(db=s.chunks_db)} == {bytes(k) for k, _ in b.cursor(db=m.chunks_db)}
    check_clean(mid)
    check_restores(mid, points, str(tmp_path))

    third = init(str(tmp_path / "third"))  # xxh3: re-hashed again, from a store of copies
    doc = run_json("copy", mid, third, "--all")
    assert doc["rehashed"] is True and [c["copied_to"] for c in doc["copied"]] == ["a@1", "a@2", "a@3"]
    check_clean(third)
    check_restores(third, points, str(tmp_path))

    before = store_fingerprint(src)
    back = run_json("copy", mid, src, "--all")
    assert back["copied"] == [] and [s["existing"] for s in back["skipped"]] == ["a@1", "a@2", "a@3"]
    assert store_fingerprint(src) == before


def test_vm_backup_copies_with_its_configuration_and_disks(tmp_path):
    src, dst = init(str(tmp_path / "src")), init(str(tmp_path / "dst"))
    r = rng(130)
    images = {}
    for key in (2000, 2001):
        images[key] = str(tmp_path / f"d{key}.img")
        make_sparse(images[key], SIZE)
        write_at(images[key], key % 7 * CS, r.bytes(9 * CS))
    config = {"_vimtype": "vim.vm.ConfigInfo", "name": "web01", "guestId": "debian12_64Guest",
              "hardware": {"_vimtype": "vim.vm.VirtualHardware", "numCPU": 2, "memoryMB": 2048}}
    vm_backup(src, "web01", images, at=1_700_000_000.0, config=config, change_ids={2000: "52 aa/1", 2001: "52 bb/1"})
    expect = {f"web01/disk-{k}@1": snapshot(p, str(tmp_path / f"s{k}")) for k, p in images.items()}
    write_at(images[2001], 30 * CS, r.bytes(2 * CS))
    vm_backup(src, "web01", images, at=1_700_086_400.0, mode="incremental", config=config,
              change_ids={2000: "52 aa/2", 2001: "52 bb/2"})
    expect.update({f"web01/disk-{k}@2": snapshot(p, str(tmp_path / f"t{k}")) for k, p in images.items()})

    refused = run_cli("copy", src, dst, "web01/disk-2000@1")
    assert refused.returncode == 1 and "is a disk of VM backup web01@1" in refused.stderr

    doc = run_json("copy", src, dst, "--vm", "web01")
    assert [(c["id"], c["kind"]) for c in doc["copied"]] == [("web01@1", "vm"), ("web01@2", "vm")]
    assert [d["copied_to"] for d in doc["copied"][1]["disk_backups"]] == ["web01/disk-2000@2", "web01/disk-2001@2"]
    with Repository.open(src) as a, Repository.open(dst) as b:
        va, vb = VmCatalog(a.store), VmCatalog(b.store)
        with a.store.read_txn() as ta, b.store.read_txn() as tb:
            for seq in (1, 2):
                x, y = va.get(ta, "web01", seq), vb.get(tb, "web01", seq)
                assert y.config == x.config == config
                assert (y.time, y.kind, y.base, y.snapshot) == (x.time, x.kind, x.base, x.snapshot)
                assert [d["change_id"] for d in y.disks] == [d["change_id"] for d in x.disks]
                assert [d["backup"] for d in y.disks] == [d["backup"] for d in x.disks]
                assert y.source["copied_from"]["id"] == f"web01@{seq}"
                for d in y.disks:
                    disk_rec = b.catalog.resolve(tb, d["backup"])
                    assert disk_rec.metadata["vm_backup"] == y.id and disk_rec.change_id == d["change_id"]
    check_clean(dst)
    check_restores(dst, expect, str(tmp_path))
    # list of DST's VM backups shows them (the vsphere list reads the same record)
    proc = run_cli("vsphere", "list", dst, "--json")
    assert proc.returncode == 0 and [v["id"] for v in json.loads(proc.stdout)["vm_backups"]] == ["web01@1", "web01@2"]


def _dst_packs(store: str) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(store, "packs")))


def test_sigkill_in_the_middle_of_a_copy_leaves_dst_as_it_was(tmp_path):
    src = init(str(tmp_path / "src"))
    img = str(tmp_path / "big.img")
    make_sparse(img, 48 << 20)
    write_at(img, 0, rng(140).bytes(40 << 20))
    assert run_cli("backup", src, img, "--disk", "big").returncode == 0
    dst = init(str(tmp_path / "dst"), pack_target_size=1 << 20)
    packs_before = _dst_packs(dst)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "copy", src, dst, "--all", "--threads", "1"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _dst_packs(dst) < packs_before + 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the copy finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _dst_packs(dst) > packs_before  # it was writing
    assert records(dst) == {}
    check_clean(dst)
    # The next run copies it whole.
    doc = run_json("copy", src, dst, "--all")
    assert [c["copied_to"] for c in doc["copied"]] == ["big@1"]
    check_clean(dst)
    check_restores(dst, {"big@1": img}, str(tmp_path))


def test_sigterm_in_the_middle_of_a_copy_leaves_dst_byte_for_byte_as_it_was(tmp_path):
    src = init(str(tmp_path / "src"))
    img = str(tmp_path / "big.img")
    make_sparse(img, 48 << 20)
    write_at(img, 0, rng(141).bytes(40 << 20))
    assert run_cli("backup", src, img, "--disk", "big").returncode == 0
    dst = init(str(tmp_path / "dst"), pack_target_size=1 << 20)
    before, packs_before = store_fingerprint(dst), _dst_packs(dst)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "copy", src, dst, "--all", "--threads", "1"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _dst_packs(dst) < packs_before + 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the copy finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated by SIGTERM" in err and "Traceback" not in err, err
    assert store_fingerprint(dst) == before  # its packs deleted, nothing committed


def test_bad_input_is_refused_and_dst_is_left_as_it_was(tmp_path, chain):
    src, img, points = chain
    dst = init(str(tmp_path / "dst"))
    before = store_fingerprint(dst)
    cases = [
        (("a@9",), 1, "not_found", "no backup a@9"),
        (("nosuch@1",), 1, "not_found", "no disk and no VM called 'nosuch'"),
        (("--disk", "nosuch"), 1, "not_found", "SRC has no backups of disk 'nosuch'"),
        ((), 2, "usage", "say what to copy"),
        (("a@1", "--all"), 2, "usage", "say what to copy"),
    ]
    for extra, code, error, text in cases:
        proc = run_cli("copy", src, dst, *extra, "--json")
        assert proc.returncode == code, (extra, proc.stderr)
        assert json.loads(proc.stdout)["error"]["code"] == error, (extra, proc.stdout)
        assert text in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
        assert store_fingerprint(dst) == before, extra

    same = run_cli("copy", src, src, "--all")
    assert same.returncode == 1 and "SRC and DST are the same store" in same.stderr
    twin = str(tmp_path / "twin")  # a copy of SRC's directory: the same store id, refused as the same store
    shutil.copytree(src, twin)
    before_twin = store_fingerprint(twin)
    same = run_cli("copy", src, twin, "--all")
    assert same.returncode == 1 and "SRC and DST are the same store (store id" in same.stderr, same.stderr
    assert store_fingerprint(twin) == before_twin

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("copy", src, str(empty), "--all", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "not_a_store", proc.stdout
    assert os.listdir(empty) == []

    other = init(str(tmp_path / "other"), chunk_size=128 << 10)
    before_other = store_fingerprint(other)
    proc = run_cli("copy", src, other, "--all")
    assert proc.returncode == 1
    assert "SRC has chunks of 65536 bytes and DST of 131072" in proc.stderr and "--chunk-size 64K" in proc.stderr
    assert store_fingerprint(other) == before_other

    # A point older than DST's newest point of its chain cannot be appended to it.
    assert run_cli("copy", src, dst, "a@3").returncode == 0
    proc = run_cli("copy", src, dst, "a@2")
    assert proc.returncode == 1 and "older than DST's newest point of a, a@3" in proc.stderr
    doc = run_json("copy", src, dst, "--all")  # picked by --all: skipped, with the reason
    assert doc["copied"] == [] and "older than DST's newest point of a, a@3" in {
        s["id"]: s["reason"] for s in doc["skipped"]}["a@1"]
    assert list(records(dst)) == ["a@3"]


def test_dry_run_changes_nothing(tmp_path, chain):
    src, img, points = chain
    dst = init(str(tmp_path / "dst"))
    before = store_fingerprint(dst)
    doc = run_json("copy", src, dst, "--all", "--dry-run")
    assert not jsonshape.check(doc, "copy")
    assert doc["dry_run"] is True and doc["stats"] is None
    assert [c["copied_to"] for c in doc["copied"]] == ["a@1", "a@2", "a@3"]
    assert store_fingerprint(dst) == before


def test_a_number_dst_has_taken_becomes_the_chains_next_and_bases_follow(tmp_path, chain):
    """DST's own a@1 (older) keeps its number; SRC's a@1..3 become a@2..4, their bases mapped
    to DST's numbers, and every one restores as SRC's point did."""
    src, img, points = chain
    dst = init(str(tmp_path / "dst"))
    own = str(tmp_path / "own.img")
    make_sparse(own, SIZE)
    write_at(own, 5 * CS, rng(150).bytes(2 * CS))
    assert run_cli("backup", dst, own, "--disk", "a", "--time", "2020-01-01T00:00:00+00:00").returncode == 0
    doc = run_json("copy", src, dst, "--all")
    assert [(c["id"], c["copied_to"]) for c in doc["copied"]] == [("a@1", "a@2"), ("a@2", "a@3"), ("a@3", "a@4")]
    got = records(dst)
    assert [(i, got[i]["base"], got[i]["kind"]) for i in sorted(got)] == [
        ("a@1", None, "full"), ("a@2", None, "full"), ("a@3", "a@2", "incremental"), ("a@4", "a@2", "differential")]
    assert got["a@4"]["metadata"]["copied_from"]["id"] == "a@3"
    check_clean(dst)
    check_restores(dst, {"a@1": own, "a@2": points["a@1"], "a@3": points["a@2"], "a@4": points["a@3"]},
                   str(tmp_path))
    again = run_json("copy", src, dst, "--all")  # found by their origin, whatever their numbers
    assert again["copied"] == [] and [s["existing"] for s in again["skipped"]] == ["a@2", "a@3", "a@4"]


def test_vm_backup_renumbered_in_dst_maps_its_disks_and_base(tmp_path):
    """DST holds a VM backup of its own under the same name (older): the copies become web01@2
    and web01@3, their disk backups the disks' next numbers, and every id inside them follows."""
    src, dst = init(str(tmp_path / "src")), init(str(tmp_path / "dst"))
    r = rng(160)
    images = {}
    for key in (2000, 2001):
        images[key] = str(tmp_path / f"d{key}.img")
        make_sparse(images[key], SIZE)
        write_at(images[key], key % 5 * CS, r.bytes(6 * CS))
    vm_backup(dst, "web01", images, at=1_600_000_000.0)  # DST's own, older
    own = {f"web01/disk-{k}@1": snapshot(p, str(tmp_path / f"o{k}")) for k, p in images.items()}
    write_at(images[2000], 20 * CS, r.bytes(CS))
    vm_backup(src, "web01", images, at=1_700_000_000.0)
    expect = {f"web01/disk-{k}@2": snapshot(p, str(tmp_path / f"s{k}")) for k, p in images.items()}
    write_at(images[2001], 33 * CS, r.bytes(CS))
    vm_backup(src, "web01", images, at=1_700_086_400.0, mode="incremental")
    expect.update({f"web01/disk-{k}@3": snapshot(p, str(tmp_path / f"t{k}")) for k, p in images.items()})

    doc = run_json("copy", src, dst, "--all")
    assert [(c["id"], c["copied_to"]) for c in doc["copied"]] == [("web01@1", "web01@2"), ("web01@2", "web01@3")]
    with Repository.open(dst) as b:
        vb = VmCatalog(b.store)
        with b.store.read_txn() as tb:
            v2, v3 = vb.get(tb, "web01", 2), vb.get(tb, "web01", 3)
            assert (v2.base, v3.base) == (None, "web01@2")
            assert [d["backup"] for d in v3.disks] == ["web01/disk-2000@3", "web01/disk-2001@3"]
            for v in (v2, v3):
                for d in v.disks:
                    assert b.catalog.resolve(tb, d["backup"]).metadata["vm_backup"] == v.id
            assert b.catalog.resolve(tb, "web01/disk-2001@3").base == "web01/disk-2001@2"
    check_clean(dst)
    check_restores(dst, {**own, **expect}, str(tmp_path))
