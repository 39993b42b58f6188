"""Full and incremental backup of a sparse image: logical MB/s, stored bytes, peak RSS.

    python -m bench.core_backup [--size 4G] [--allocated 1G] [--change 0.02] [--dir DIR] [--json]

Makes a sparse image (``--allocated`` of ``--size`` written in 1 MiB runs: a
third text-like, a third random, a third written zeros), backs it up in full
with the ``blockvault`` command in a child process, rewrites ``--change`` of
the allocated data, and backs it up again as an incremental with the matching
changed-areas file.  Peak RSS is the child's (``wait4`` rusage), so it is the
whole backup process.  Logical MB/s = disk size / wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from chunkstore.config import parse_size

MiB = 1 << 20


def make_image(path: str, size: int, allocated: int, seed: int = 7) -> list[int]:
    """Returns the offsets of the 1 MiB runs it wrote."""
    rng = np.random.default_rng(seed)
    slots = size // MiB
    picks = np.sort(rng.choice(slots, size=allocated // MiB, replace=False))
    words = np.frombuffer(b"".join(rng.choice([b"the ", b"block ", b"vault ", b"disk\n", b"chunk "], MiB // 4)),
                          dtype=np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i, slot in enumerate(picks):
            kind = i % 3
            if kind == 0:
                data = np.roll(words, int(rng.integers(0, MiB)))[:MiB].tobytes()
            elif kind == 1:
                data = rng.bytes(MiB)
            else:
                data = bytes(MiB)
            os.pwrite(fd, data, int(slot) * MiB)
    finally:
        os.close(fd)
    return [int(s) * MiB for s in picks]


def change(path: str, runs: list[int], share: float, seed: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    count = max(1, int(len(runs) * share))
    areas = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in sorted(rng.choice(runs, size=count, replace=False)):
            start = int(off) + int(rng.integers(0, 16)) * 65536
            os.pwrite(fd, rng.bytes(65536), start)
            areas.append({"start": start, "length": 65536})
    finally:
        os.close(fd)
    return areas


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.decode()}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
            "output": json.loads(out) if out.strip().startswith(b"{") else out.decode()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--allocated", default="1G")
    ap.add_argument("--change", type=float, default=0.02)
    ap.add_argument("--chunk-size", default="256K")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size, allocated = parse_size(args.size), parse_size(args.allocated)
    work = args.dir or tempfile.mkdtemp(prefix="bv-bench-")
    os.makedirs(work, exist_ok=True)
    img, store = os.path.join(work, "disk.img"), os.path.join(work, "store")
    shutil.rmtree(store, ignore_errors=True)
    cli = [sys.executable, "-m", "engine.cli"]
    try:
        runs = make_image(img, size, allocated)
        subprocess.run(cli + ["init", store, "--chunk-size", args.chunk_size], check=True, stdout=subprocess.DEVNULL)
        full = run(cli + ["backup", store, img, "--disk", "bench", "--json"])
        areas = change(img, runs, args.change)
        cbt = os.path.join(work, "cbt.json")
        with open(cbt, "w") as f:
            json.dump({"startOffset": 0, "length": size, "changedArea": areas}, f)
        inc = run(cli + ["backup", store, img, "--disk", "bench", "--mode", "incremental",
                         "--changed-areas", cbt, "--json"])
        restored = os.path.join(work, "restore.img")
        rest = run(cli + ["restore", store, "bench@2", restored, "--force", "--json"])
        same = subprocess.run(["cmp", "-s", img, restored]).returncode == 0
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"size": size, "allocated": allocated, "chunk_size": args.chunk_size, "cores": os.cpu_count(), "steps": {}}
    for name, step in (("full", full), ("incremental", inc), ("restore", rest)):
        stats = step["output"].get("stats", {}) if isinstance(step["output"], dict) else {}
        result["steps"][name] = {
            "wall_s": round(step["wall"], 3), "cpu_s": round(step["cpu"], 3),
            "logical_MBps": round(size / MiB / step["wall"], 1),
            "bytes_read": stats.get("bytes_read"), "stored_bytes": stats.get("stored_bytes"),
            "peak_rss_MiB": round(step["peak_rss"] / MiB, 1),
        }
    result["restore_identical"] = same
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{size / MiB:.0f} MiB image, {allocated / MiB:.0f} MiB allocated, chunk {args.chunk_size}, "
              f"{os.cpu_count()} cores")
        for name, s in result["steps"].items():
            print(f"  {name:12s} {s['wall_s']:7.2f}s  {s['logical_MBps']:8.1f} logical MB/s  "
                  f"read {(s['bytes_read'] or 0) / MiB:8.1f} MiB  stored {(s['stored_bytes'] or 0) / MiB:8.1f} MiB  "
                  f"peak RSS {s['peak_rss_MiB']:6.1f} MiB  cpu {s['cpu_s']:.2f}s")
        print(f"  restore of the incremental identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
