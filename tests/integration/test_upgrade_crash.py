"""The format 2 -> 3 upgrade killed with SIGKILL at random points: the store is
format 2 or format 3, never something between, and loses nothing.

Each round starts from a copy of a real format-2 store (made by the code that
wrote format 2: tests/fixtures/make_v2_store.py) and runs its first writer, a
`blockvault gc`, which upgrades it (the reference counts computed from the
manifests in one transaction, then config.json rewritten) and is killed at a
random point of its durable calls (strace delays, tests/lifecycle_faults.py),
at least 30 times.  In every other round a backup of another disk is started
beside it (`--wait`; it may be the one that upgrades).  After each kill:
config.json is whole and says 2 or 3, verify passes (the counts too when it
says 3), every point restores byte-identical; then a writer in this process
finishes the upgrade, and verify (counts included) and the restores pass again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from engine.backup import backup_image
from engine.repository import Repository
from helpers import REPO_ROOT, make_sparse, rng, snapshot, write_at
from lifecycle_faults import Killer, check_store, cli_argv, start

if not os.path.exists(os.path.join(REPO_ROOT, "tests", "fixtures", "make_v2_store.py")):  # issue 10's refs-gc
    pytest.skip("no format-3 upgrade in this tree (tests/fixtures/make_v2_store.py)", allow_module_level=True)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "fixtures"))
import make_v2_store  # noqa: E402

KILLS = 30
MAX_ROUNDS = 150  # it stops at KILLS; a round whose child finished first (an idle machine, a backup beside
# that upgraded the store itself) kills nothing


@pytest.fixture(scope="module")
def v2_made(tmp_path_factory):
    have = subprocess.run(["git", "-C", REPO_ROOT, "cat-file", "-e", f"{make_v2_store.V2_COMMIT}^{{commit}}"],
                          capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {make_v2_store.V2_COMMIT} (the format-2 writer) is not in this clone (a shallow one?)")
    out = str(tmp_path_factory.mktemp("v2"))
    return out, make_v2_store.make(out)


def _version(store: str) -> int:
    with open(os.path.join(store, "config.json")) as f:
        return json.load(f)["version"]


def test_sigkill_during_the_format_upgrade(v2_made, tmp_path):
    out, points = v2_made
    v2 = os.path.join(out, "store")
    assert _version(v2) == 2
    store = str(tmp_path / "store")
    scratch = str(tmp_path)
    g = str(tmp_path / "g.img")
    make_sparse(g, 16 << 16)
    r = rng(80)
    chooser = random.Random(81)

    def fresh() -> None:
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(v2, store)

    killer = Killer(("gc", store), scratch, chooser)
    fresh()
    done = killer.calibrate()
    assert "upgraded from format version 2 to 3" in done.stderr, done.stderr
    assert _version(store) == 3

    killed = upgraded_before_kill = with_backup = 0
    versions_seen = set()
    for i in range(MAX_ROUNDS):
        if killed >= KILLS:
            break
        fresh()
        expected = dict(points)
        other = None
        if i % 2:
            write_at(g, 0, r.bytes(3 << 16))
            g_copy = snapshot(g, str(tmp_path / f"g-{i}.img"))
            other = start(cli_argv("backup", store, g, "--disk", "g", "--wait", "300"))
            with_backup += 1
        killed += killer.run_and_kill()
        if other is not None:
            stdout, err = other.communicate(timeout=300)
            assert other.returncode == 0, f"the backup beside a killed upgrade failed: {err}"
            expected[stdout.strip()] = g_copy
        version = _version(store)  # json.load: config.json is whole
        assert version in (2, 3)
        versions_seen.add(version)
        upgraded_before_kill += version == 3
        report = check_store(store, expected, scratch)
        assert report.get("counts_checked") is (version == 3), report
        # Whatever the kill left, the next writer finishes the job.
        f = str(tmp_path / "f.img")
        make_sparse(f, 4 << 16)
        write_at(f, 0, r.bytes(1 << 16))
        with Repository.open(store) as repo:
            rec = backup_image(repo, f, "f", "full")
        expected[rec.id] = snapshot(f, str(tmp_path / f"f-{i}.img"))
        assert _version(store) == 3
        assert check_store(store, expected, scratch).get("counts_checked") is True
    assert killed >= KILLS, f"only {killed} of {MAX_ROUNDS} upgrades were killed mid-way"
    assert with_backup >= KILLS // 2
    print(f"{killed} kills; {upgraded_before_kill} rounds had upgraded before the kill; versions seen {versions_seen}")
