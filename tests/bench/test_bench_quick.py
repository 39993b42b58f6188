"""The benchmark's CI run: `python -m bench --quick` end to end.

It checks correctness only — every tool ran every step, every restore came
back byte-identical, the results are complete — and never speed.  Outside
CI it is skipped when the blockvault CLI or a peer is not installed; in CI
(CI set) a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS = ["restic", "borg", "borg-fixed", "tar-zstd"]
CHUNK_TOOLS = ["blockvault-64K", "blockvault-1M"]  # the quick sweep: its two ends
NIGHTS = 4  # quick default: T1 full, T2-T3 incremental, T4 differential


def _missing() -> list[str]:
    missing = []
    if shutil.which("blockvault") is None or importlib.util.find_spec("engine.cli") is None:
        missing.append("blockvault")
    missing += [t for t in ("restic", "borg", "tar", "zstd") if shutil.which(t) is None]
    return missing


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    missing = _missing()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not installed: {', '.join(missing)} (tools/install.sh installs blockvault, bench/setup.sh the peers)")
    out = tmp_path_factory.mktemp("bench-quick")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    results = out / "results.json"
    assert results.exists(), f"no results.json; stderr:\n{proc.stderr[-5000:]}"
    return proc, json.loads(results.read_text())


def test_quick_run_succeeds(quick_run):
    proc, doc = quick_run
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert proc.returncode == 0, f"exit {proc.returncode}; failed checks: {failed}\n{proc.stderr[-5000:]}"
    assert doc["ok"] is True and not failed
    assert doc["quick"] is True


def test_every_tool_has_every_step(quick_run):
    _, doc = quick_run
    assert sorted(doc["tools"]) == sorted(CHUNK_TOOLS + PEERS)
    for name, tool in doc["tools"].items():
        steps = {(s["step"], s["night"]): s for s in tool["steps"]}
        want = [("init", None)] + [("backup", n) for n in range(1, NIGHTS + 1)]
        want += [("restore", 1), ("restore", NIGHTS), ("verify", None)]
        if tool["kind"] == "blockvault":
            want += [("list", None), ("stats", None)]
        for key in want:
            assert key in steps, f"{name}: no {key}"
            assert steps[key]["ok"], f"{name} {key}: {steps[key]['error']}"
        for (step, night), s in steps.items():
            for field in ("wall_s", "cpu_s", "peak_rss_bytes", "stored_bytes", "stored_bytes_added"):
                assert s[field] is not None, f"{name} {step} {night}: {field} missing"
            if step in ("backup", "restore"):
                for field in ("logical_bytes", "data_bytes", "logical_MBps", "data_MBps"):
                    assert s[field] is not None, f"{name} {step} {night}: {field} missing"
        assert tool["version"], f"{name}: no version"


def test_blockvault_backup_modes(quick_run):
    _, doc = quick_run
    for name in CHUNK_TOOLS:
        modes = {s["night"]: s["mode"] for s in doc["tools"][name]["steps"] if s["step"] == "backup"}
        assert modes == {1: "full", 2: "incremental", 3: "incremental", 4: "differential"}
        ids = [s["backup_id"] for s in doc["tools"][name]["steps"] if s["step"] == "backup"]
        assert len(set(ids)) == NIGHTS and all(i.startswith("bench@") for i in ids)


def test_restores_checked_identical(quick_run):
    _, doc = quick_run
    for name, tool in doc["tools"].items():
        restores = [s for s in tool["steps"] if s["step"] == "restore"]
        assert sorted(s["night"] for s in restores) == [1, NIGHTS], name
        for s in restores:
            assert s["identical"] is True, f"{name} T{s['night']}: {s['error']}"


def test_workload_and_report_written(quick_run):
    _, doc = quick_run
    nights = doc["workload"]["nights"]
    assert [n["night"] for n in nights] == list(range(1, NIGHTS + 1))
    assert any(n["grew_by_bytes"] for n in nights), "the quick series should grow the disk once"
    assert all(n["hole_write_bytes"] > 0 for n in nights[1:])
    for key in ("cores", "memory_bytes", "kernel"):
        assert doc["machine"][key]
    assert doc["limits"]["zstd_compress_MBps"] and doc["limits"]["xxh3_128_MBps"]
    for tool in ("restic", "borg", "tar-zstd"):
        assert doc["versions"][tool]


def test_workload_is_deterministic_and_cbt_covers_every_write(tmp_path):
    """Independent of the tools: same seed, same bytes; and every 64 KiB
    block that differs between two nights lies in that night's changed areas."""
    np = pytest.importorskip("numpy")
    sys.path.insert(0, str(ROOT))
    from bench.workload import BLOCK, Workload, WorkloadConfig  # noqa: E402

    def cfg() -> WorkloadConfig:
        return WorkloadConfig(size=64 << 20, allocated=16 << 20, seed=5, change_share=0.05)

    a = Workload(str(tmp_path / "a.img"), str(tmp_path / "a"), cfg())
    b = Workload(str(tmp_path / "b.img"), str(tmp_path / "b"), cfg())
    try:
        assert a.create().scan.same_content(b.create().scan)[0]
        for _ in range(3):
            before = np.fromfile(tmp_path / "a.img", dtype=np.uint8)
            night = a.advance()
            assert night.scan.same_content(b.advance().scan)[0]
            after = np.fromfile(tmp_path / "a.img", dtype=np.uint8)
            before = np.concatenate([before, np.zeros(after.size - before.size, np.uint8)])
            differs = (before != after).reshape(-1, BLOCK).any(axis=1)
            assert differs.any()
            assert not (differs & ~night.changed64).any(), "a write outside the changed areas"
            doc = json.loads(Path(night.changed_areas).read_text())
            assert doc["startOffset"] == 0 and doc["length"] == night.size
            starts = [x["start"] for x in doc["changedArea"]]
            assert starts == sorted(starts)
            for x, y in zip(doc["changedArea"], doc["changedArea"][1:]):
                assert x["start"] + x["length"] < y["start"], "areas not merged"
            for x in doc["changedArea"]:
                assert x["start"] % BLOCK == 0 and x["length"] % BLOCK == 0
    finally:
        a.close()
        b.close()
