"""Point times and flags (issue 10, item 1): ``backup --time``, ``protect`` /
``unprotect``, ``note``, for disk and VM points, kept by ``rebuild``."""

from __future__ import annotations

import datetime
import json
import os
import zoneinfo

import pytest

from chunkstore import ChunkStore
from helpers import make_sparse, rng, run_cli, store_fingerprint, write_at
from vmpoints import vm_backup

CS = 64 << 10
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def env_tz(tz: str) -> dict:
    return {**os.environ, "TZ": tz}


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "store")
    ChunkStore.init(path, chunk_size=CS).close()
    return path


@pytest.fixture
def img(tmp_path):
    path = str(tmp_path / "d.img")
    make_sparse(path, 16 * CS)
    write_at(path, 0, rng(5).bytes(4 * CS))
    return path


def listing(store: str, *args: str, env=None) -> list[dict]:
    proc = run_cli("list", store, "--json", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["backups"]


def test_time_with_and_without_offset_is_the_point_time(store, img):
    ok = run_cli("backup", store, img, "--disk", "d", "--time", "2026-03-29T01:30:00+01:00")
    assert ok.returncode == 0, ok.stderr
    # Without an offset: the host's zone (TZ here); 03:30 on the spring-forward day is CEST (+02:00).
    ok = run_cli("backup", store, img, "--disk", "d", "--time", "2026-03-29 03:30", env=env_tz("Europe/Berlin"))
    assert ok.returncode == 0, ok.stderr
    ok = run_cli("backup", store, img, "--disk", "d", "--time", "2026-03-29T02:00:00Z")
    assert ok.returncode == 0, ok.stderr
    times = [p["time"] for p in listing(store)]
    want = [datetime.datetime(2026, 3, 29, 0, 30, tzinfo=datetime.timezone.utc).timestamp(),
            datetime.datetime(2026, 3, 29, 3, 30, tzinfo=BERLIN).timestamp(),
            datetime.datetime(2026, 3, 29, 2, 0, tzinfo=datetime.timezone.utc).timestamp()]
    assert times == want
    assert datetime.datetime(2026, 3, 29, 3, 30, tzinfo=BERLIN).utcoffset() == datetime.timedelta(hours=2)


def test_a_point_older_than_the_chain_s_newest_is_refused_and_nothing_written(store, img):
    assert run_cli("backup", store, img, "--disk", "d", "--time", "2026-11-30T23:30:00Z").returncode == 0
    before = store_fingerprint(store)
    older = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "--time", "2026-11-30T23:29:59Z")
    assert older.returncode == 1
    assert "older than its newest point d@1" in older.stderr and "Traceback" not in older.stderr
    assert "2026-11-30T23:30:00" in older.stderr
    assert store_fingerprint(store) == before
    same = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "--time", "2026-11-30T23:30:00Z")
    assert same.returncode == 0 and same.stdout.strip() == "d@2", same.stderr
    # Another disk's chain has its own order.
    other = run_cli("backup", store, img, "--disk", "e", "--time", "2020-01-01")
    assert other.returncode == 0, other.stderr


def test_a_malformed_time_is_a_usage_error(store, img):
    proc = run_cli("backup", store, img, "--disk", "d", "--time", "yesterday")
    assert proc.returncode == 2 and "'yesterday' is not an ISO 8601 time" in proc.stderr
    assert listing(store) == []


def test_protect_and_note_are_listed_and_rebuild_keeps_them(store, img):
    for n in range(3):
        assert run_cli("backup", store, img, "--disk", "d", "--time", f"2026-11-0{n + 1}T22:00:00Z").returncode == 0
    assert run_cli("protect", store, "d@2").returncode == 0
    assert run_cli("note", store, "d@latest", "before the upgrade — 8.2").returncode == 0
    assert run_cli("note", store, "d@1", "to be cleared").returncode == 0
    assert run_cli("note", store, "d@1", "--clear").returncode == 0
    points = {p["id"]: p for p in listing(store)}
    assert [(i, p["protected"], p["note"]) for i, p in points.items()] == [
        ("d@1", False, ""), ("d@2", True, ""), ("d@3", False, "before the upgrade — 8.2")]
    table = run_cli("list", store).stdout.splitlines()
    assert table[0].split()[-2:] == ["PROTECTED", "NOTE"]
    assert table[2].split()[-2:] == ["yes", "-"] and table[3].endswith("before the upgrade — 8.2")
    assert run_cli("unprotect", store, "d@2").returncode == 0 and not listing(store)[1]["protected"]
    assert run_cli("protect", store, "d@2").returncode == 0

    before = store_fingerprint(store)
    os.unlink(os.path.join(store, "index", "data.mdb"))
    rebuilt = run_cli("rebuild", store)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert store_fingerprint(store) == before
    assert {p["id"]: (p["protected"], p["note"]) for p in listing(store)} == {
        "d@1": (False, ""), "d@2": (True, ""), "d@3": (False, "before the upgrade — 8.2")}


@pytest.mark.parametrize("text", ["two\nlines", "esc \x1b[31m red", "bidi \u202e", ""])
def test_a_note_with_control_characters_is_refused_and_nothing_written(store, img, text):
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    before = store_fingerprint(store)
    proc = run_cli("note", store, "d@1", text)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("empty" if not text else "control character") in proc.stderr
    assert store_fingerprint(store) == before


def test_flags_of_a_missing_point_name_what_exists(store, img):
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    proc = run_cli("protect", store, "d@7")
    assert proc.returncode == 1 and "no backup d@7" in proc.stderr and "d@1" in proc.stderr
    proc = run_cli("protect", store, "nosuch@1")
    assert proc.returncode == 1 and "no disk and no VM called 'nosuch'" in proc.stderr
    assert run_cli("note", store, "d@1").returncode == 2  # neither TEXT nor --clear


def test_vm_points_take_flags_and_rebuild_keeps_them(store, img, tmp_path):
    t0 = datetime.datetime(2026, 11, 1, 22, tzinfo=datetime.timezone.utc).timestamp()
    assert vm_backup(store, "web01", {2000: img}, t0) == "web01@1"
    assert vm_backup(store, "web01", {2000: img}, t0 + 86400, "incremental") == "web01@2"
    assert run_cli("protect", store, "web01@1").returncode == 0
    assert run_cli("note", store, "web01@2", "patched").returncode == 0
    # A disk called like the VM makes the bare id ambiguous: refused, --vm says which.
    assert run_cli("backup", store, img, "--disk", "web01").returncode == 0
    amb = run_cli("unprotect", store, "web01@1")
    assert amb.returncode == 2 and "both a disk and a VM" in amb.stderr
    assert run_cli("note", store, "web01@1", "the disk", "--disk").returncode == 0

    def vm_list():
        proc = run_cli("vsphere", "list", store, "--json")
        assert proc.returncode == 0, proc.stderr
        return {r["id"]: (r["protected"], r["note"]) for r in json.loads(proc.stdout)["vm_backups"]}

    assert vm_list() == {"web01@1": (True, ""), "web01@2": (False, "patched")}
    assert {p["id"]: p["note"] for p in listing(store, "--disk", "web01")} == {"web01@1": "the disk"}
    assert "yes" in run_cli("vsphere", "list", store).stdout.splitlines()[1]
    os.unlink(os.path.join(store, "index", "data.mdb"))
    assert run_cli("rebuild", store).returncode == 0
    assert vm_list() == {"web01@1": (True, ""), "web01@2": (False, "patched")}
    # The VM backup's time is its disk backups' time too.
    assert [p["time"] for p in listing(store, "--disk", "web01/disk-2000")] == [t0, t0 + 86400]


def test_json_of_protect_note_and_list_is_documented(store, img):
    import jsonshape
    sections, _ = jsonshape.parse()
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    for args in (("protect", store, "d@1"), ("note", store, "d@1", "x"), ("unprotect", store, "d@1")):
        proc = run_cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert not jsonshape.check(doc, "protect", sections), jsonshape.check(doc, "protect", sections)
        assert doc["point"]["id"] == "d@1"
    proc = run_cli("list", store, "--json")
    doc = json.loads(proc.stdout)
    assert not jsonshape.check(doc, "list", sections)
    assert doc["backups"][0]["note"] == "x" and doc["backups"][0]["protected"] is False
