"""Backup throughput from a monolithicSparse VMDK against the same data as a raw image.

    python -m bench.vmdk_vs_raw [--size 2G] [--allocated 512M] [--rounds 3] [--json]

One sparse raw image (bench.core_backup's mix), the same bytes converted to
monolithicSparse by qemu-img, each backed up (full) into a fresh store of
its own, alternating, ``--rounds`` times in one run; the figure that matters
is the ratio of the two medians, which the machine's noise mostly cancels.
Both restores are checked byte-identical to the raw image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from bench.core_backup import make_image
from chunkstore.config import parse_size
from engine.backup import backup_image
from engine.repository import Repository
from engine.restore import restore_backup

MiB = 1 << 20


def timed_backup(work: str, source: str, tag: str) -> tuple[float, dict]:
    store = os.path.join(work, f"store-{tag}")
    shutil.rmtree(store, ignore_errors=True)
    with Repository.init(store) as repo:
        t0 = time.perf_counter()
        rec = backup_image(repo, source, "bench", "full")
        wall = time.perf_counter() - t0
        out = os.path.join(work, f"restore-{tag}.raw")
        restore_backup(repo, rec.id, out, force=True)
    return wall, {"restored": out, "stats": rec.stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--allocated", default="512M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size, allocated = parse_size(args.size), parse_size(args.allocated)
    work = tempfile.mkdtemp(prefix="bv-vmdk-bench-")
    try:
        raw, vmdk = os.path.join(work, "disk.raw"), os.path.join(work, "disk.vmdk")
        make_image(raw, size, allocated)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                        raw, vmdk], check=True)
        times = {"raw": [], "vmdk": []}
        identical = True
        for _ in range(args.rounds):
            for tag, src in (("raw", raw), ("vmdk", vmdk)):
                wall, info = timed_backup(work, src, tag)
                times[tag].append(wall)
                identical &= subprocess.run(["cmp", "-s", raw, info["restored"]]).returncode == 0
                os.unlink(info["restored"])
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "size": size, "allocated": allocated, "rounds": args.rounds,
            "raw_s": times["raw"], "vmdk_s": times["vmdk"],
            "raw_logical_MBps": round(size / MiB / med["raw"], 1),
            "vmdk_logical_MBps": round(size / MiB / med["vmdk"], 1),
            "vmdk_over_raw_throughput": round(med["raw"] / med["vmdk"], 3),
            "restores_identical": identical,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{size // MiB} MiB disk, {allocated // MiB} MiB allocated, {args.rounds} rounds (median)")
        print(f"  raw  {result['raw_logical_MBps']:9.1f} logical MB/s")
        print(f"  vmdk {result['vmdk_logical_MBps']:9.1f} logical MB/s "
              f"({result['vmdk_over_raw_throughput']:.2f}x of raw)")
        print(f"  restores identical: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
