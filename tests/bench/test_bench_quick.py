"""The benchmark's CI run: `python -m bench --quick` end to end.

It checks correctness only — every tool ran every step, every restore came
back byte-identical, the results are complete — and never speed.  Outside
CI it is skipped when the blockvault CLI or a peer is not installed; in CI
(CI set) a missing tool is a failure, not a skip.

The bench's own verdicts are not taken on trust: the run keeps its
repositories (--keep), and the tests restore nights T1 and Tn from every one
of them again and compare the bytes with the nights regenerated here from
the workload's seed, and hold the numbers in results.json against what the
kept stores themselves say (du, `list --json`, `stats --json`).
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

from chunkstore.pack import METADATA_MAGIC, PACK_HEADER, RECORD_HEADER_SIZE, iter_pack_paths, scan_pack
from helpers import same_file

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


def _du(path: Path) -> int:
    """Allocated bytes, by du(1) itself rather than the bench's own walk."""
    out = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path, dict]:
    """(process, results.json, the kept work folder, du of every repository right after the run)."""
    missing = _missing()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not installed: {', '.join(missing)} (tools/install.sh installs blockvault, bench/setup.sh the peers)")
    out = tmp_path_factory.mktemp("bench-quick")
    work = out / "work"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--keep",
                           "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    results = out / "results.json"
    assert results.exists(), f"no results.json; stderr:\n{proc.stderr[-5000:]}"
    doc = json.loads(results.read_text())
    du = {name: _du(_repo_root(work, name)) for name in doc["tools"]}
    return proc, doc, work, du


@pytest.fixture(scope="module")
def quick_run(kept_run) -> tuple[subprocess.CompletedProcess, dict]:
    return kept_run[0], kept_run[1]


def _repo_root(work: Path, tool: str) -> Path:
    """Where the bench keeps a tool's repository (what its stored_bytes measure)."""
    if tool.startswith("blockvault-"):
        return work / "blockvault" / tool.split("-", 1)[1] / "repo"
    return work / "peers" / tool / "repo"


@pytest.fixture(scope="module")
def nights(kept_run, tmp_path_factory) -> dict[int, Path]:
    """T1 and Tn regenerated here from the quick workload's seed (not the bench's image)."""
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import QUICK  # noqa: E402
    from bench.units import parse_size  # noqa: E402
    from bench.workload import Workload, WorkloadConfig  # noqa: E402

    _, doc, work, _ = kept_run
    d = tmp_path_factory.mktemp("nights")
    cfg = WorkloadConfig(size=parse_size(QUICK["size"]), allocated=parse_size(QUICK["allocated"]), seed=1,
                         change_share=QUICK["change_share"], pattern=QUICK["pattern"])
    assert QUICK["nights"] == NIGHTS and doc["workload"]["config"] == cfg.describe()
    wl = Workload(str(d / "disk.img"), str(d / "cbt"), cfg)
    try:
        wl.create()
        shutil.copyfile(d / "disk.img", d / "T1.img")
        for _ in range(NIGHTS - 1):
            wl.advance()
    finally:
        wl.close()
    os.replace(d / "disk.img", d / f"T{NIGHTS}.img")
    # The bench left its own image at the last night: the same bytes.
    assert same_file(work / "disk.img", d / f"T{NIGHTS}.img")
    return {1: d / "T1.img", NIGHTS: d / f"T{NIGHTS}.img"}


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


def test_every_repository_restores_every_night_byte_for_byte(kept_run, nights, tmp_path):
    """Restore T1 and Tn again from each kept repository, with each tool's own
    restore command, and compare the bytes with the regenerated nights."""
    sys.path.insert(0, str(ROOT))
    from bench.peers import Borg, BorgFixed, Restic, TarZstd  # noqa: E402

    _, doc, work, _ = kept_run
    image = str(work / "disk.img")
    for name, tool in doc["tools"].items():
        backups = {s["night"]: s for s in tool["steps"] if s["step"] == "backup"}
        for night, expected in nights.items():
            out = tmp_path / name / f"T{night}"
            out.mkdir(parents=True)
            if tool["kind"] == "blockvault":
                store = _repo_root(work, name)
                proc = subprocess.run([sys.executable, "-m", "engine.cli", "restore", str(store),
                                       backups[night]["backup_id"], str(out / "disk.img")],
                                      cwd=ROOT, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, proc.stderr
                restored = out / "disk.img"
            else:
                cls = {"restic": Restic, "borg": Borg, "borg-fixed": BorgFixed, "tar-zstd": TarZstd}[name]
                runner = cls(str(work / "peers" / name))
                if cls is Restic:
                    runner.snapshots = {n: s["tool_report"]["snapshot_id"] for n, s in backups.items()}
                    runner.image_path = image
                elif cls is TarZstd:
                    runner.archives = {n: runner._archive(n) for n in nights}
                    runner.image_name = "disk.img"
                else:
                    runner.archives = set(backups)
                    runner.image_name = "disk.img"
                m, path = runner._restore(night, str(out))
                assert m.ok, f"{name} T{night}: {m.error}"
                restored = Path(path)
            assert same_file(restored, expected), f"{name}: restore of T{night} differs from the night"


def test_reported_numbers_match_the_kept_stores(kept_run):
    """results.json against the repositories themselves: sizes by du(1), and
    for blockvault the ids, the per-backup stats and the store totals by its
    own list/stats commands."""
    _, doc, work, du = kept_run
    sizes = {n["night"]: n["size_bytes"] for n in doc["workload"]["nights"]}
    for name, tool in doc["tools"].items():
        assert tool["stored_bytes_final"] == du[name], name
        steps = [s for s in tool["steps"] if s["stored_bytes"] is not None]
        assert steps[-1]["stored_bytes"] == du[name], name
        backups = [s for s in tool["steps"] if s["step"] == "backup"]
        for s in backups + [s for s in tool["steps"] if s["step"] == "restore"]:
            assert s["logical_bytes"] == sizes[s["night"]], (name, s["step"], s["night"])
        if tool["kind"] != "blockvault":
            continue
        store = str(_repo_root(work, name))

        def cli(*args):
            proc = subprocess.run([sys.executable, "-m", "engine.cli", *args, "--json"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        listed = {b["id"]: b for b in cli("list", store)["backups"]}
        assert set(listed) == {s["backup_id"] for s in backups}
        for s in backups:
            rec = listed[s["backup_id"]]
            assert rec["kind"] == s["mode"] and rec["size"] == sizes[s["night"]]
            assert rec["stats"]["new_chunks"] == s["tool_report"]["new_chunks"]
            assert rec["stats"]["stored_bytes"] == s["tool_report"]["stored_bytes"]
        stats = cli("stats", store)
        assert stats == tool["info"]["stats"]
        # Every chunk in the store was new in exactly one backup; the packs hold
        # the chunk records the backups wrote, each commit's metadata records
        # (format version 2), and a 128-byte header and a 64-byte trailer each.
        assert stats["chunks"] == sum(b["stats"]["new_chunks"] for b in listed.values())
        metadata = sum(RECORD_HEADER_SIZE + r.header.stored_len for p in iter_pack_paths(store)
                       for r in scan_pack(p).records if r.header.magic == METADATA_MAGIC)
        assert metadata > 0
        assert stats["stored_bytes"] == (sum(b["stats"]["stored_bytes"] for b in listed.values()) + metadata
                                         + (PACK_HEADER.size + RECORD_HEADER_SIZE) * stats["packs"])
        assert stats["backups"] == NIGHTS and stats["chunk_size"] == tool["info"]["chunk_size"]


def test_the_bench_comparison_sees_one_changed_byte(tmp_path):
    """`identical` in results.json comes from ImageScan.same_content: it must
    tell apart two images that differ in one byte, or only in size."""
    sys.path.insert(0, str(ROOT))
    from bench.workload import scan_image  # noqa: E402

    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    data = os.urandom(3 << 20)
    a.write_bytes(data)
    b.write_bytes(data[:(2 << 20) + 5] + bytes([data[(2 << 20) + 5] ^ 1]) + data[(2 << 20) + 6:])
    c.write_bytes(data + bytes(4096))
    base = scan_image(str(a))
    assert base.same_content(scan_image(str(a)))[0]
    same, why = base.same_content(scan_image(str(b)))
    assert not same and "first at offset 2097152" in why
    assert not base.same_content(scan_image(str(c)))[0]
