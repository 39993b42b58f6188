"""The encryption bench's CI run: `python -m bench --encryption --quick` end to end.

Correctness only, never speed: every tool (the plaintext and the encrypted
blockvault stores, restic, borg with and without encryption) ran every step,
every restore came back byte-identical, the report holds every figure its
ratios need, and the primitives' table has its eight rows.  The bench's own
word is not the only evidence: the run keeps its work folder, and the test
reads each blockvault store's config.json itself (an encrypted store must
say so, with keyed ids: a store that ignored --encryption would otherwise be
measured as an encrypted one), then restores the incremental point from each
store again, with the store's own key source, and compares the bytes with
the image.  Outside CI a missing restic or borg skips it; in CI it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import same_file

ROOT = Path(__file__).resolve().parents[2]
BLOCKVAULT = ["blockvault", "blockvault-aes-256-gcm", "blockvault-chacha20-poly1305",
              "blockvault-aes-256-gcm-keyfile"]
PEERS = ["restic", "borg-none", "borg-repokey-blake2"]
PRIMITIVES = ["xxh3-128-seeded", "blake3-128-keyed", "blake2b-128-keyed", "hmac-sha256-128",
              "aes-256-gcm seal", "aes-256-gcm open", "chacha20-poly1305 seal", "chacha20-poly1305 open"]
STEPS = ["init", "full", "incremental", "restore"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    missing = [t for t in ("restic", "borg") if shutil.which(t) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not installed: {', '.join(missing)} (bench/setup.sh installs them)")
    out = tmp_path_factory.mktemp("bench-enc")
    work = out / "work"
    proc = subprocess.run([sys.executable, "-m", "bench", "--encryption", "--quick", "--out", str(out), "--keep",
                           "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    results = out / "results.json"
    assert results.exists(), f"no results.json; stderr:\n{proc.stderr[-5000:]}"
    return proc, json.loads(results.read_text()), out, work


def test_every_tool_ran_every_step_and_every_restore_is_identical(run):
    proc, doc, _, _ = run
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert doc["ok"] is True, [c for c in doc["checks"] if not c["ok"]]
    assert sorted(doc["tools"]) == sorted(BLOCKVAULT + PEERS)
    for name, tool in doc["tools"].items():
        steps = {s["step_name"]: s for s in tool["steps"]}
        want = STEPS + (["list"] if name in BLOCKVAULT else [])
        assert sorted(steps) == sorted(want), name
        assert all(s["ok"] and s["round"] == 1 for s in tool["steps"]), (name, tool["steps"])
        for s in tool["steps"]:
            if s["step_name"] in ("full", "incremental", "restore"):
                assert s["wall_s"] > 0 and s["peak_rss_bytes"] > 0 and s["logical_MBps"] > 0, (name, s)
        restore = steps["restore"]
        assert restore["identical"] is True and restore["night"] == 2, (name, restore)
        assert tool["version"], name
    # what each step moved: T1's allocated bytes on the full backup; the incremental read only T2's changes
    t1, t2 = doc["nights"]
    full = next(s for s in doc["tools"]["blockvault"]["steps"] if s["step_name"] == "full")
    inc = next(s for s in doc["tools"]["blockvault"]["steps"] if s["step_name"] == "incremental")
    assert full["data_bytes"] == t1["allocated_bytes"]
    assert 0 < inc["data_bytes"] == t2["changed_bytes"] < t1["allocated_bytes"] // 4


def test_the_report_has_every_ratio_margin_and_target(run):
    _, doc, out, _ = run
    assert set(doc["ratios"]) == set(BLOCKVAULT[1:])
    for name, r in doc["ratios"].items():
        assert all(isinstance(r[s], float) and r[s] > 0 for s in ("full", "incremental", "restore", "full_cpu",
                                                                  "incremental_cpu", "restore_cpu")), (name, r)
        assert isinstance(r["key_open_s"], float), (name, r)
    assert set(doc["margins"]) == {"borg", "restic"}
    for peer, m in doc["margins"].items():
        for s in ("full", "incremental", "restore"):
            assert all(m["steps"][s][k] > 0 for k in ("plaintext", "encrypted", "encrypted_of_plaintext")), (peer, s)
    # a quick run never judges speed, but names every target with its figure
    assert len(doc["targets"]) == 3 * 2 + 2 * 3
    assert all(t["met"] is None and t["value"] > 0 for t in doc["targets"]), doc["targets"]
    rows = {r["name"]: r for r in doc["crypto_ids"]["rows"]}
    assert list(rows) == PRIMITIVES
    for r in rows.values():
        assert [x["threads"] for x in r["runs"]] == [1, 2] and all(x["MBps"] > 0 for x in r["runs"])
        assert r["gil"] in ("holds", "releases", "unclear")
    report = (out / "report.md").read_text()
    for heading in ("## Primitives", "## Steps", "## blockvault encrypted / plaintext",
                    "## blockvault's margin over the peers", "## Targets"):
        assert heading in report
    for name in BLOCKVAULT + PEERS + PRIMITIVES:
        assert f"| {name} |" in report, name


def test_the_encrypted_stores_are_encrypted_and_restore_again_with_their_own_key(run, tmp_path):
    from bench.encryption import PASSPHRASE

    _, doc, _, work = run
    image = work / "round1" / "disk.img"  # after the run: T2, the point restored
    base = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    base["PYTHONPATH"] = str(ROOT)
    for name in BLOCKVAULT:
        root = work / "round1" / name
        cfg = json.loads((root / "repo" / "config.json").read_text())
        cipher = doc["tools"][name]["encryption"]
        if name == "blockvault":
            assert cipher is None and "encryption" not in cfg and cfg["digest"] == "xxh3-128"
            env = base
        else:
            assert cfg["encryption"] == cipher and cfg["digest"] == "blake3-128-keyed" and cfg["version"] == 4
            if name.endswith("-keyfile"):
                assert (root / "store.key").is_file()
                env = dict(base, BLOCKVAULT_KEY_FILE=str(root / "store.key"))
            else:
                env = dict(base, BLOCKVAULT_PASSPHRASE=PASSPHRASE)
        point = next(s for s in doc["tools"][name]["steps"] if s["step_name"] == "incremental")["backup_id"]
        target = tmp_path / f"{name}.img"
        proc = subprocess.run([sys.executable, "-m", "engine.cli", "restore", str(root / "repo"), point, str(target)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (name, proc.stderr)
        assert same_file(str(target), str(image)), name
        target.unlink()
        if cipher:  # and without its key it does not open
            proc = subprocess.run([sys.executable, "-m", "engine.cli", "restore", str(root / "repo"), point,
                                   str(target)], cwd=ROOT, env=base, capture_output=True, text=True, timeout=300,
                                  stdin=subprocess.DEVNULL)
            assert proc.returncode != 0 and not target.exists(), (name, proc.stderr)
