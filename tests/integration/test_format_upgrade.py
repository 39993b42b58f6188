"""Format 3 (issue 10 item 6): a format-2 store, made by the code that wrote format 2
(tests/fixtures/make_v2_store.py), is read as it is and upgraded by its first writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, store_fingerprint, write_at
from lifecycle_helpers import counts, delete_point, read_db

sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "fixtures"))
import make_v2_store  # noqa: E402


@pytest.fixture(scope="module")
def v2_made(tmp_path_factory):
    have = subprocess.run(["git", "-C", REPO_ROOT, "cat-file", "-e", f"{make_v2_store.V2_COMMIT}^{{commit}}"],
                          capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {make_v2_store.V2_COMMIT} (the format-2 writer) is not in this clone (a shallow one?)")
    out = str(tmp_path_factory.mktemp("v2"))
    return out, make_v2_store.make(out)


@pytest.fixture
def v2(v2_made, tmp_path):
    out, points = v2_made
    store = str(tmp_path / "store")
    shutil.copytree(os.path.join(out, "store"), store)
    return store, dict(points), make_v2_store.v2_tree(os.path.join(out, "work"))


def config_version(store):
    with open(os.path.join(store, "config.json")) as f:
        return json.load(f)["version"]


def restores(store, points, tmp_path):
    for bid, img in points.items():
        out = str(tmp_path / f"r-{bid.replace('@', '-')}")
        proc = run_cli("restore", store, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, img), bid
        os.unlink(out)


def test_a_format_2_store_is_read_without_being_upgraded(v2, tmp_path):
    store, points, v2src = v2
    assert config_version(store) == 2
    listed = json.loads(run_cli("list", store, "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == ["d@1", "d@2", "e@1"] and {b["unique_bytes"] for b in listed} == {None}
    restores(store, points, tmp_path)
    proc = run_cli("verify", store, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"] is True and doc["counts_checked"] is False
    stats = json.loads(run_cli("stats", store, "--json").stdout)
    assert stats["dead_bytes"] is None and stats["live_bytes"] is None
    assert config_version(store) == 2 and counts(store, b"chunkrefs") == {} and b"format" not in read_db(store, b"meta")
    # ... and the format-2 code still reads and writes it.
    assert len(make_v2_store.run_v2(v2src, "list", store).stdout.splitlines()) == 1 + 3
    assert make_v2_store.run_v2(v2src, "verify", store).returncode == 0


def test_the_first_writer_upgrades_in_one_go_and_old_code_then_refuses(v2, tmp_path):
    store, points, v2src = v2
    f = str(tmp_path / "f.img")
    make_sparse(f, 8 << 16)
    write_at(f, 0, rng(311).bytes(3 << 16))
    proc = run_cli("backup", store, f, "--disk", "f")
    assert proc.returncode == 0, proc.stderr
    assert "upgraded from format version 2 to 3" in proc.stderr and "counts computed from the manifests" in proc.stderr
    points["f@1"] = f
    assert config_version(store) == 3
    # The counts are the manifests' (verify recomputes and compares them), for the old points too.
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    assert doc["ok"] is True and doc["counts_checked"] is True and doc["count_drift"] == []
    refs = counts(store, b"chunkrefs")
    assert len(refs) == 12 + 3 + 4 + 2 + 3 and max(refs.values()) == 3  # d@1 + d@2's new + e's new + f
    restores(store, points, tmp_path)
    # A second writer does not upgrade again.
    proc = run_cli("backup", store, f, "--disk", "f")
    assert proc.returncode == 0 and "upgraded" not in proc.stderr
    points["f@2"] = f
    # The format-2 code refuses a format-3 store: it would write without counting.
    old = make_v2_store.run_v2(v2src, "backup", store, f, "--disk", "f", check=False)
    assert old.returncode == 1 and "format version 3" in old.stderr
    # Lifecycle works on the upgraded store: a point released, gc, every other point whole.
    assert delete_point(store, "d@1") > 0
    del points["d@1"]
    done = json.loads(run_cli("gc", store, "--json", "--max-unused", "0").stdout)
    assert done["dead_bytes_after"] == 0 and done["chunks_removed"] > 0
    assert run_cli("verify", store).returncode == 0
    restores(store, points, tmp_path)


def test_a_crash_between_the_counts_and_config_json_upgrades_again(v2, tmp_path):
    """The counts' transaction commits first; config.json still says 2: the next writer counts again."""
    store, points, _ = v2
    die = ("import os, runpy, sys; from chunkstore.config import StoreConfig\n"
           "StoreConfig.save = lambda self, path: os._exit(9)\n"
           "sys.argv = ['blockvault'] + sys.argv[1:]; runpy.run_module('engine.cli', run_name='__main__')")
    f = str(tmp_path / "f.img")
    make_sparse(f, 4 << 16)
    killed = subprocess.run([sys.executable, "-c", die, "backup", store, f, "--disk", "f"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert config_version(store) == 2 and counts(store, b"chunkrefs")
    before = store_fingerprint(store)
    assert run_cli("list", store).returncode == 0 and store_fingerprint(store) == before  # readers do not upgrade
    proc = run_cli("backup", store, f, "--disk", "f")
    assert proc.returncode == 0 and "upgraded from format version 2 to 3" in proc.stderr
    assert config_version(store) == 3
    assert json.loads(run_cli("verify", store, "--json").stdout)["count_drift"] == []
    restores(store, points, tmp_path)
