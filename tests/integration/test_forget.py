"""Removing points (issue 10, items 1-2): ``delete`` and ``forget`` on a real
store — one transaction, replayed by ``rebuild``, the rest restoring
byte-identical, incrementals still building on what is left."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import lmdb
import pytest

import jsonshape
from chunkstore import ChunkStore
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at
from vmpoints import vm_backup

CS = 64 << 10
DAY = 86400
T0 = datetime.datetime(2026, 11, 1, 22, tzinfo=datetime.timezone.utc).timestamp()


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def cbt_file(tmp_path, name, size, areas):
    p = tmp_path / name
    p.write_text(json.dumps({"startOffset": 0, "length": size,
                             "changedArea": [{"start": s, "length": n} for s, n in areas]}))
    return str(p)


@pytest.fixture
def nights(tmp_path):
    """d@1..d@6 on six nights (a full, then incrementals with a change list), each night changing
    3 chunks; {id: copy of the image as that point saw it}."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = str(tmp_path / "d.img")
    make_sparse(img, 40 * CS)
    r = rng(17)
    write_at(img, 0, r.bytes(12 * CS))
    points = {}
    for n in range(6):
        args = ["backup", store, img, "--disk", "d", "--time", iso(T0 + n * DAY)]
        if n:
            at = (2 + 5 * n) * CS
            write_at(img, at, r.bytes(3 * CS))
            args += ["--mode", "incremental", "--changed-areas",
                     cbt_file(tmp_path, f"cbt{n}", 40 * CS, [(at, 3 * CS)])]
        proc = run_cli(*args)
        assert proc.returncode == 0 and proc.stdout.strip() == f"d@{n + 1}", proc.stderr
        points[f"d@{n + 1}"] = snapshot(img, str(tmp_path / f"snap{n + 1}"))
    return store, img, points


def ids(store: str) -> list[str]:
    proc = run_cli("list", store, "--json")
    assert proc.returncode == 0, proc.stderr
    return [b["id"] for b in json.loads(proc.stdout)["backups"]]


def restores_identical(store: str, points: dict, tmp_path) -> None:
    for bid, source in points.items():
        out = str(tmp_path / f"out-{bid.replace('@', '-').replace('/', '_')}")
        proc = run_cli("restore", store, bid, out, "--force")
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, source), bid


def lmdb_keys(store: str, db: bytes) -> set[bytes]:
    env = lmdb.open(os.path.join(store, "index"), readonly=True, max_dbs=16, lock=False)
    try:
        with env.begin() as txn:
            try:
                handle = env.open_db(db, txn=txn, create=False)
            except lmdb.NotFoundError:
                return set()
            return {bytes(k) for k, _ in txn.cursor(db=handle)}
    finally:
        env.close()


def key(disk: str, seq: int) -> bytes:
    return disk.encode() + b"\0" + seq.to_bytes(4, "big")


def rebuild_from_packs(store: str) -> None:
    os.unlink(os.path.join(store, "index", "data.mdb"))
    proc = run_cli("rebuild", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_delete_then_rebuild_keeps_the_points_gone_and_the_rest_identical(nights, tmp_path):
    store, _, points = nights
    proc = run_cli("delete", store, "d@2", "d@3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["d@2", "d@3"]
    assert ids(store) == ["d@1", "d@4", "d@5", "d@6"]
    assert lmdb_keys(store, b"manifests") == {key("d", n) for n in (1, 4, 5, 6)}
    kept = {k: v for k, v in points.items() if k not in ("d@2", "d@3")}
    restores_identical(store, kept, tmp_path)
    gone = run_cli("restore", store, "d@2", str(tmp_path / "x"))
    assert gone.returncode == 1 and "no backup d@2" in gone.stderr
    before = store_fingerprint(store)
    rebuild_from_packs(store)
    assert store_fingerprint(store) == before
    assert ids(store) == ["d@1", "d@4", "d@5", "d@6"]
    restores_identical(store, kept, tmp_path)
    assert run_cli("verify", store).returncode == 0


def test_forget_the_middle_then_incrementals_build_on_what_is_left(nights, tmp_path):
    store, img, points = nights
    assert run_cli("protect", store, "d@1").returncode == 0
    proc = run_cli("forget", store, "--disk", "d", "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    assert ids(store) == ["d@1", "d@5", "d@6"]
    assert "removed 3 of 6 points in 1 group" in proc.stdout
    # The next incremental's base is the newest left, its change list relative to it.
    at = 30 * CS
    write_at(img, at, rng(3).bytes(2 * CS))
    nxt = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "--time", iso(T0 + 9 * DAY),
                  "--changed-areas", cbt_file(tmp_path, "cbt9", 40 * CS, [(at, 2 * CS)]), "--json")
    assert nxt.returncode == 0, nxt.stderr
    doc = json.loads(nxt.stdout)
    assert doc["id"] == "d@7" and doc["base"] == "d@6" and doc["stats"]["changed_areas"] is True
    points["d@7"] = snapshot(img, str(tmp_path / "snap7"))
    # The newest removed on purpose: its number is not used again, the base is the one before.
    assert run_cli("delete", store, "d@7").returncode == 1
    assert run_cli("delete", store, "d@7", "--allow-remove-newest").returncode == 0
    again = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "--json")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["id"] == "d@8" and doc["base"] == "d@6"
    points["d@8"] = snapshot(img, str(tmp_path / "snap8"))
    left = {k: points[k] for k in ("d@1", "d@5", "d@6", "d@8")}
    restores_identical(store, left, tmp_path)
    # A differential still finds the full (d@1, protected) as its base.
    diff = run_cli("backup", store, img, "--disk", "d", "--mode", "differential", "--json")
    assert json.loads(diff.stdout)["base"] == "d@1"
    rebuild_from_packs(store)
    assert ids(store) == ["d@1", "d@5", "d@6", "d@8", "d@9"]
    after = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental")
    assert after.stdout.strip() == "d@10", after.stderr  # next_seq survived the rebuild too
    restores_identical(store, left, tmp_path)


def test_delete_refuses_protected_newest_and_unknown_points_and_changes_nothing(nights):
    store, _, _ = nights
    assert run_cli("protect", store, "d@2").returncode == 0
    before = store_fingerprint(store)
    for args, words in ((["d@3", "d@2"], "d@2 is protected"),
                        (["d@6"], "d@6 is the newest point of d"),
                        (["d@latest"], "--allow-remove-newest"),
                        (["d@9"], "no backup d@9"),
                        (["zz@1"], "no disk and no VM called 'zz'")):
        proc = run_cli("delete", store, *args)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert store_fingerprint(store) == before
    usage = run_cli("delete", store, "d")
    assert usage.returncode == 2 and "d@latest" in usage.stderr


def test_a_vm_backup_goes_with_its_disk_backups_and_a_disk_backup_alone_is_refused(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS).close()
    imgs = {}
    for k in (2000, 2001):
        imgs[k] = str(tmp_path / f"disk{k}.img")
        make_sparse(imgs[k], 8 * CS)
    r = rng(8)
    snaps = {}
    for n in range(3):
        for k, path in imgs.items():
            write_at(path, n * CS, r.bytes(CS))
            snaps[(n + 1, k)] = snapshot(path, str(tmp_path / f"s{n}-{k}"))
        assert vm_backup(store, "web01", imgs, T0 + n * DAY, "full" if n == 0 else "incremental") == f"web01@{n + 1}"
    before = store_fingerprint(store)
    alone = run_cli("delete", store, "web01/disk-2001@1")
    assert alone.returncode == 1 and "disk backup of VM backup web01@1" in alone.stderr
    assert store_fingerprint(store) == before
    proc = run_cli("delete", store, "web01@1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["removed"] == ["web01@1"]
    assert sorted(doc["removed_disk_backups"]) == ["web01/disk-2000@1", "web01/disk-2001@1"]
    assert not jsonshape.check(doc, "delete", jsonshape.parse()[0])
    assert ids(store) == [f"web01/disk-{k}@{n}" for k in (2000, 2001) for n in (2, 3)]
    assert lmdb_keys(store, b"vm_backups") == {key("web01", 2), key("web01", 3)}
    rebuild_from_packs(store)
    assert lmdb_keys(store, b"vm_backups") == {key("web01", 2), key("web01", 3)}
    restores_identical(store, {f"web01/disk-{k}@{n}": snaps[(n, k)] for k in (2000, 2001) for n in (2, 3)},
                       tmp_path)
    # forget on the VM's chain: the VM backups are the points, their disks go with them.
    assert run_cli("forget", store, "--disk", "web01/disk-2000", "--keep-last", "1").returncode == 2
    proc = run_cli("forget", store, "--vm", "web01", "--keep-last", "1")
    assert proc.returncode == 0, proc.stderr
    assert ids(store) == ["web01/disk-2000@3", "web01/disk-2001@3"]
    assert lmdb_keys(store, b"vm_backups") == {key("web01", 3)}


def test_forget_all_groups_in_one_run_dry_run_changes_nothing_and_json_is_documented(nights, tmp_path):
    store, _, points = nights
    other = str(tmp_path / "e.img")
    make_sparse(other, 4 * CS)
    write_at(other, 0, rng(4).bytes(CS))
    for n in range(3):
        assert run_cli("backup", store, other, "--disk", "e", "--time", iso(T0 + n * DAY + 3600)).returncode == 0
    img2 = str(tmp_path / "v.img")
    make_sparse(img2, 4 * CS)
    for n in range(2):
        vm_backup(store, "vm1", {2000: img2}, T0 + n * DAY)
    before = store_fingerprint(store)
    policy = ["--keep-daily", "2", "--tz", "Europe/Berlin"]
    dry = run_cli("forget", store, "--all", *policy, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert store_fingerprint(store) == before
    doc = json.loads(dry.stdout)
    problems = jsonshape.check(doc, "forget", jsonshape.parse()[0])
    assert not problems, problems
    assert doc["zone"] == "Europe/Berlin" and doc["dry_run"] is True
    groups = {(g["kind"], g["name"]): [(p["id"], p["keep"], p["reason"]) for p in g["points"]] for g in doc["groups"]}
    assert groups == {
        ("disk", "d"): [("d@6", True, "daily 1/2"), ("d@5", True, "daily 2/2")]
                       + [(f"d@{n}", False, "no rule keeps it") for n in (4, 3, 2, 1)],
        ("disk", "e"): [("e@3", True, "daily 1/2"), ("e@2", True, "daily 2/2"), ("e@1", False, "no rule keeps it")],
        ("vm", "vm1"): [("vm1@2", True, "daily 1/2"), ("vm1@1", True, "daily 2/2")],
    }
    assert sorted(doc["removed"]) == ["d@1", "d@2", "d@3", "d@4", "e@1"] and doc["kept"] == 6
    # from the reference counts: the bytes of the chunks only the removed points use
    assert isinstance(doc["freed_bytes"], int) and doc["freed_bytes"] > 0
    table = run_cli("forget", store, "--all", *policy, "--dry-run")
    assert "TIME (Europe/Berlin)" in table.stdout and "would remove 5 of 11 points in 3 groups" in table.stdout
    assert "freeing -" not in table.stdout and "freeing " in table.stdout and "d@4" in table.stdout
    assert store_fingerprint(store) == before
    real = run_cli("forget", store, "--all", *policy, "--json")
    assert real.returncode == 0, real.stderr
    assert sorted(json.loads(real.stdout)["removed"]) == sorted(doc["removed"])
    assert sorted(ids(store)) == sorted(["d@5", "d@6", "e@2", "e@3", "vm1/disk-2000@1", "vm1/disk-2000@2"])
    assert json.loads(run_cli("stats", store, "--json").stdout)["dead_bytes"] == doc["freed_bytes"]
    restores_identical(store, {k: points[k] for k in ("d@5", "d@6")}, tmp_path)
    again = run_cli("forget", store, "--all", *policy)
    assert again.returncode == 0 and "removed 0 of 6 points" in again.stdout


def test_forget_refuses_an_empty_policy_and_a_missing_group(nights):
    store, _, _ = nights
    before = store_fingerprint(store)
    empty = run_cli("forget", store, "--all", "--json")
    assert empty.returncode == 2 and json.loads(empty.stdout)["error"]["code"] == "usage"
    assert "empty retention policy" in empty.stderr
    assert run_cli("forget", store, "--keep-last", "1").returncode == 2  # no --disk/--vm/--all
    assert run_cli("forget", store, "--all", "--keep-within", "2w").returncode == 2
    assert run_cli("forget", store, "--all", "--keep-last", "1", "--tz", "Mars/Olympus").returncode == 2
    missing = run_cli("forget", store, "--disk", "nope", "--keep-last", "1")
    assert missing.returncode == 1 and "no backups of disk 'nope'" in missing.stderr
    assert store_fingerprint(store) == before


def test_forget_and_delete_wait_for_a_backup_of_the_chain_or_exit_4(nights):
    store, _, _ = nights
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from chunkstore import ChunkStore; s = ChunkStore.open(sys.argv[1]); "
         "w = s.writer(purpose='nightly job', chains=[('disk', 'd')]); print('held', flush=True); "
         "time.sleep(60); w.abort()", store],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run_cli("forget", store, "--all", "--keep-last", "1", "--json")
        assert busy.returncode == 4 and json.loads(busy.stdout)["error"]["code"] == "store_locked"
        # (a backup of disk d is running: the chain forget would change is busy, and says by whom)
        assert json.loads(busy.stdout)["error"]["holder"]["pid"] == holder.pid
        assert "disk d is busy" in json.loads(busy.stdout)["error"]["message"]
        assert run_cli("delete", store, "d@1").returncode == 4
        # A dry run reads only: it works beside the writer.
        assert run_cli("forget", store, "--all", "--keep-last", "1", "--dry-run").returncode == 0
    finally:
        holder.kill()
        holder.wait()
    assert ids(store) == [f"d@{n}" for n in range(1, 7)]


def test_a_vm_s_disk_backup_cannot_be_protected_alone(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS).close()
    img = str(tmp_path / "v.img")
    make_sparse(img, 4 * CS)
    for n in range(2):
        vm_backup(store, "vm1", {2000: img}, T0 + n * DAY)
    before = store_fingerprint(store)
    proc = run_cli("protect", store, "vm1/disk-2000@1")
    assert proc.returncode == 1 and "disk backup of VM backup vm1@1" in proc.stderr
    assert "protect STORE vm1@1 --vm" in proc.stderr
    assert store_fingerprint(store) == before
    assert run_cli("note", store, "vm1/disk-2000@1", "the system disk").returncode == 0
    assert run_cli("protect", store, "vm1@1").returncode == 0
    proc = run_cli("forget", store, "--vm", "vm1", "--keep-last", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [p["reason"] for p in json.loads(proc.stdout)["groups"][0]["points"]] == ["last 1/1", "protected"]
    assert len(ids(store)) == 2


def test_a_delete_killed_before_its_lmdb_commit_is_gone_or_whole(nights, tmp_path):
    """SIGKILL once the deletion's metadata records are durable, before LMDB commits: the index still
    holds every point (and verify passes); a rebuild counts the deletion only if nothing came after it
    (chunkstore/rebuild.py), so both ways every point is either gone or whole."""
    store, img, points = nights
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO_ROOT, "tests", "faults"), REPO_ROOT]),
           "BLOCKVAULT_TEST_KILL": "after-metadata"}
    killed = run_cli("delete", store, "d@2", "d@3", env=env)
    assert killed.returncode == -9, killed.stderr
    assert ids(store) == [f"d@{n}" for n in range(1, 7)]
    assert run_cli("verify", store).returncode == 0
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-a", store, copy], check=True)
    # Rebuilt now: the deletion was the last thing that happened, and it is complete: counted.
    rebuild_from_packs(copy)
    assert ids(copy) == ["d@1", "d@4", "d@5", "d@6"]
    restores_identical(copy, {k: points[k] for k in ("d@1", "d@4", "d@5", "d@6")}, tmp_path)
    # A commit after it (the next backup) makes it a sibling that never committed: left out.
    assert run_cli("backup", store, img, "--disk", "e").returncode == 0
    rebuild_from_packs(store)
    assert ids(store) == [f"d@{n}" for n in range(1, 7)] + ["e@1"]
    restores_identical(store, points, tmp_path)
