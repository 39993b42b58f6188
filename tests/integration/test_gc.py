"""blockvault gc (issue 10 item 4): dead packs deleted, packs repacked, what running
sessions and readers may still use kept, what killed sessions left reclaimed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chunkstore import ChunkStore
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at
from lifecycle_helpers import chunk_digests, counts, delete_point, meta_gen, read_db

CS = 64 << 10


def gc(store, *args, expect=0):
    proc = run_cli("gc", store, "--json", *args)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def pack_files(store):
    out = set()
    for root, _, files in os.walk(os.path.join(store, "packs")):
        out |= {bytes.fromhex(f[:-5]) for f in files if f.endswith(".pack")}
    return out


def restores(store, points, tmp_path):
    for bid, src in points.items():
        out = str(tmp_path / f"r-{bid.replace('@', '-')}")
        proc = run_cli("restore", store, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, src), bid
        os.unlink(out)


@pytest.fixture
def two_disks(tmp_path):
    """a@1, a@2 (half of a rewritten), b@1; packs of 1 MiB."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    r = rng(201)
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    make_sparse(a, 80 * CS)
    write_at(a, 0, r.bytes(64 * CS))
    make_sparse(b, 40 * CS)
    write_at(b, 0, r.bytes(32 * CS))
    assert run_cli("backup", store, a, "--disk", "a").returncode == 0
    for k in range(0, 64, 2):  # every other chunk: a@1's dead chunks share packs with live ones
        write_at(a, k * CS, r.bytes(CS))
    assert run_cli("backup", store, a, "--disk", "a").returncode == 0
    assert run_cli("backup", store, b, "--disk", "b").returncode == 0
    return store, {"a@2": snapshot(a, str(tmp_path / "a2")), "b@1": snapshot(b, str(tmp_path / "b1"))}


def test_gc_deletes_dead_packs_repacks_the_rest_and_every_point_restores(two_disks, tmp_path):
    store, points = two_disks
    only_a1 = chunk_digests(store, "a@1") - chunk_digests(store, "a@2")
    b_chunks = chunk_digests(store, "b@1")
    assert delete_point(store, "a@1") == 32 and delete_point(store, "b@1") == 32
    del points["b@1"]
    stats = json.loads(run_cli("stats", store, "--json").stdout)
    assert stats["dead_bytes"] == 64 * (CS + 64)  # random data is stored raw

    before = store_fingerprint(store)
    plan = gc(store, "--dry-run", "--max-unused", "0")
    assert store_fingerprint(store) == before  # a dry run changes nothing
    assert plan["dry_run"] is True and plan["deleted_packs"] and plan["repacked_packs"]

    done = gc(store, "--max-unused", "0")
    assert {p["id"] for p in done["deleted_packs"]} == {p["id"] for p in plan["deleted_packs"]}
    assert {p["id"] for p in done["repacked_packs"]} == {p["id"] for p in plan["repacked_packs"]}
    assert done["stored_bytes_after"] == plan["stored_bytes_after"]
    assert done["dead_bytes_after"] == 0 and done["chunks_removed"] == 64
    # every dead byte back; packs gone and new ones take their header and trailer (128 + 64 bytes) along
    frames = 192 * (len(done["new_packs"]) - len(done["deleted_packs"]) - len(done["repacked_packs"]))
    assert done["stored_bytes_after"] == done["stored_bytes_before"] - 64 * (CS + 64) + frames
    # b's packs held nothing else: deleted whole; the old packs' files are gone, the new ones known.
    gone = {bytes.fromhex(p["id"]) for p in done["deleted_packs"] + done["repacked_packs"]}
    assert not gone & pack_files(store) and done["waiting_packs"] == []
    assert pack_files(store) == set(read_db(store, b"packs"))
    index = read_db(store, b"chunks")
    assert not (only_a1 | b_chunks) & set(index)
    assert read_db(store, b"dead") == {} and read_db(store, b"packdead") == {} and read_db(store, b"doomed") == {}
    stats = json.loads(run_cli("stats", store, "--json").stdout)
    assert stats["dead_bytes"] == 0 and stats["stored_bytes"] == done["stored_bytes_after"]
    proc = run_cli("verify", store)
    assert proc.returncode == 0 and "store OK" in proc.stdout, proc.stdout + proc.stderr
    assert "unreferenced" not in proc.stderr
    restores(store, points, tmp_path)
    again = gc(store, "--max-unused", "0")
    assert again["deleted_packs"] == [] and again["repacked_packs"] == []


def test_max_unused_leaves_a_little_dead_space_alone(two_disks):
    store, _ = two_disks
    delete_point(store, "a@1")  # 32 of 160 chunks dead: about 20% of the store
    lax = gc(store, "--dry-run", "--max-unused", "50%")
    assert lax["repacked_packs"] == [] and lax["deleted_packs"] == []
    strict = gc(store, "--max-unused", "5%")
    assert strict["repacked_packs"] and strict["dead_bytes_after"] <= strict["max_unused_bytes"]


HOLD_REGISTRATION = (
    "import sys; from chunkstore import ChunkStore; from chunkstore.registry import Registry\n"
    "s = ChunkStore.open(sys.argv[1])\n"
    "with Registry(s).register('restore', 'test reader') as me:\n"
    "    print(me.start_gen, flush=True); sys.stdin.read()\n")


def hold_registration(store):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_REGISTRATION, store], cwd=REPO_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, int(proc.stdout.readline())


def test_a_session_older_than_the_deaths_pins_the_chunks_until_it_is_gone(two_disks, tmp_path):
    store, points = two_disks
    older, gen = hold_registration(store)
    assert gen == 0
    delete_point(store, "b@1")
    del points["b@1"]
    held = gc(store, "--max-unused", "0")
    assert held["pinned_chunks"] == 32 and held["deleted_packs"] == [] and held["chunks_removed"] == 0
    older.kill()
    older.wait()
    freed = gc(store, "--max-unused", "0")
    assert len(freed["reaped_sessions"]) == 1 and freed["chunks_removed"] == 32 and freed["deleted_packs"]
    assert not os.listdir(os.path.join(store, "sessions"))
    restores(store, points, tmp_path)


def test_a_replaced_pack_stays_on_disk_while_an_older_reader_runs(two_disks, tmp_path):
    store, points = two_disks
    delete_point(store, "a@1")
    reader, gen = hold_registration(store)  # registered after the deaths: they do not pin anything
    assert gen == 1
    done = gc(store, "--max-unused", "0")
    assert done["chunks_removed"] == 32 and done["repacked_packs"] and done["unlinked_packs"] == []
    waiting = {bytes.fromhex(p) for p in done["waiting_packs"]}
    assert waiting == {bytes.fromhex(p["id"]) for p in done["repacked_packs"]} and waiting <= pack_files(store)
    assert set(counts(store, b"doomed")) == waiting
    assert run_cli("verify", store).returncode == 0  # a doomed pack is not a left-over
    reader.stdin.close()
    reader.wait()
    later = gc(store)
    assert {bytes.fromhex(p) for p in later["unlinked_packs"]} == waiting and not waiting & pack_files(store)
    assert read_db(store, b"doomed") == {}
    restores(store, points, tmp_path)


KILLED = (
    "import os, runpy, sys; import chunkstore.session as s\n"
    "if sys.argv[1] == 'checkpoint':\n"
    "    s.CHECKPOINT_ENTRIES = 4; orig = s.WriteSession._checkpoint\n"
    "    def die(self):\n        orig(self); os._exit(9)\n"
    "    s.WriteSession._checkpoint = die\n"
    "else:\n"
    "    orig = s.WriteSession._write_metadata\n"
    "    def die(self, records):\n        orig(self, records); os._exit(9)\n"
    "    s.WriteSession._write_metadata = die\n"
    "sys.argv = ['blockvault'] + sys.argv[2:]; runpy.run_module('engine.cli', run_name='__main__')")


@pytest.mark.parametrize("where", ["checkpoint", "metadata"])
def test_what_a_killed_backup_left_is_reclaimed(two_disks, tmp_path, where):
    store, points = two_disks
    c = str(tmp_path / "c.img")  # 160 chunks: every writing thread fills (and seals) a 1 MiB pack mid-backup
    make_sparse(c, 192 * CS)
    write_at(c, 0, rng(202).bytes(160 * CS))
    before = pack_files(store)
    proc = subprocess.run([sys.executable, "-c", KILLED, where, "backup", store, c, "--disk", "c"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    left = pack_files(store) - before
    assert left
    orphans = set(read_db(store, b"chunks")) - set(counts(store, b"chunkrefs"))
    assert bool(orphans) == (where == "checkpoint")
    done = gc(store, "--max-unused", "0")
    assert len(done["reaped_sessions"]) == 1 and done["orphans_killed"] == len(orphans)
    assert not left & pack_files(store)  # unknown packs unlinked, checkpointed ones deleted as dead
    assert not orphans & set(read_db(store, b"chunks"))
    assert pack_files(store) == set(read_db(store, b"packs"))
    proc = run_cli("verify", store, "--json")
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["unreferenced_packs"] == []
    restores(store, points, tmp_path)


@pytest.mark.parametrize("where", ["checkpoint", "metadata"])
def test_the_dry_run_plans_what_gc_does_after_a_killed_backup(two_disks, tmp_path, where):
    """gc reaps first: the chunks a killed backup checkpointed die, so their packs are
    deleted whole.  The dry run changes nothing but must plan the same: before, it
    planned as if those chunks were live (their packs left alone or repacked, the
    stored bytes after overstated)."""
    store, _ = two_disks
    c = str(tmp_path / "c.img")
    make_sparse(c, 192 * CS)
    write_at(c, 0, rng(202).bytes(160 * CS))
    proc = subprocess.run([sys.executable, "-c", KILLED, where, "backup", store, c, "--disk", "c"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    orphans = set(read_db(store, b"chunks")) - set(counts(store, b"chunkrefs"))
    delete_point(store, "a@1")  # dead chunks beside live ones: packs to repack too
    before = store_fingerprint(store)
    plan = gc(store, "--dry-run", "--max-unused", "0")
    assert store_fingerprint(store) == before
    done = gc(store, "--max-unused", "0")
    assert done["orphans_killed"] == len(orphans) and len(done["reaped_sessions"]) == 1
    if where == "checkpoint":
        assert orphans and done["deleted_packs"]
    for key in ("orphans_killed", "reaped_sessions", "chunks_removed", "pinned_chunks", "stored_bytes_before",
                "dead_bytes_before", "stored_bytes_after", "dead_bytes_after"):
        assert plan[key] == done[key], (key, plan[key], done[key])
    for key in ("deleted_packs", "repacked_packs"):
        assert sorted(plan[key], key=lambda a: a["id"]) == sorted(done[key], key=lambda a: a["id"]), key
    assert sorted(plan["leftover_packs"]) == sorted(done["leftover_packs"])
    assert all(a["live_bytes"] > 0 for a in done["repacked_packs"])


def test_gc_refuses_bad_options_without_touching_the_store(two_disks):
    store, _ = two_disks
    before = store_fingerprint(store)
    for args, text in ((["--max-unused", "150%"], "from 0% to 100%"), (["--max-repack", "lots"], "is not a size")):
        proc = run_cli("gc", store, *args)
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert store_fingerprint(store) == before


def test_many_small_partly_dead_packs_merge_into_one_new_pack_in_one_switch(tmp_path):
    """Nightly incrementals leave a small pack per night; gc merges their live records
    into as few packs as the target size allows (here one) and switches the whole batch
    in one transaction: the store's generation rises by exactly one."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    r = rng(203)
    disk = str(tmp_path / "d.img")
    make_sparse(disk, 32 * CS)
    nights = 6
    night_packs = []
    for k in range(nights):  # each night: chunks 0-1 rewritten (dead next night) + 2 fresh ones (stay live)
        write_at(disk, 0, r.bytes(2 * CS))
        write_at(disk, (2 + 2 * k) * CS, r.bytes(2 * CS))
        before = set(read_db(store, b"packs"))
        assert run_cli("backup", store, disk, "--disk", "d", "--threads", "1").returncode == 0
        night_packs.append(set(read_db(store, b"packs")) - before)
    last = snapshot(disk, str(tmp_path / "last"))
    for k in range(1, nights):
        delete_point(store, f"d@{k}")
    # the nights' data packs: each holds 2 dead and 2 live chunks (the metadata packs are not repacked)
    data = set().union(*night_packs[:-1]) & set(counts(store, b"packdead"))
    assert len(data) == nights - 1
    plan = gc(store, "--dry-run", "--max-unused", "0")
    gen = meta_gen(store)
    done = gc(store, "--max-unused", "0")
    assert {bytes.fromhex(p["id"]) for p in done["repacked_packs"]} == data and done["deleted_packs"] == []
    assert len(done["new_packs"]) == 1  # 5 × 2 live chunks fit one 1 MiB pack
    assert set(read_db(store, b"packs")) & data == set() and bytes.fromhex(done["new_packs"][0]) in read_db(store, b"packs")
    assert meta_gen(store) == gen + 1  # one switch transaction for the whole batch
    assert done["stored_bytes_after"] == plan["stored_bytes_after"]
    assert done["stored_bytes_after"] == done["stored_bytes_before"] - (nights - 1) * 2 * (CS + 64) - 192 * (nights - 2)
    assert done["chunks_removed"] == 2 * (nights - 1) and done["dead_bytes_after"] == 0
    assert not data & pack_files(store)
    proc = run_cli("verify", store)
    assert proc.returncode == 0 and "store OK" in proc.stdout, proc.stdout + proc.stderr
    restores(store, {f"d@{nights}": last}, tmp_path)
