"""Rollback restore against a full restore of the same point, in one run.

    python -m bench.rollback [--size 4G] [--allocated 1G] [--change 0.03] [--chunk-size 256K]
                             [--rounds 3] [--dir DIR] [--json]
    python -m bench --rollback [the same options]

One sparse image (bench.core_backup's mix of text, random and written-zero
1 MiB runs), backed up in full as P1; then ``--change`` of its non-zero
chunks rewritten (4 KiB of random bytes in each, spread over the whole
disk) and backed up as the incremental P2.  Each round, alternating:

* ``full``: restore P1 whole to a new file (what a rollback saves);
* ``from``: a file holding P2 rolled back to P1 with ``--rollback-from P2``;
* ``compare``: a sparse file holding P1 rolled forward to P2 with
  ``--rollback-compare`` (its allocated extents read and hashed; holes are zeros);
* ``compare_dense``: the same onto a file with every byte written (as a block
  device is read: all of it), against
* ``full2``: restore P2 whole to a new file.

Every result is compared byte for byte with the full restore of its point.
The engine is called in-process (engine.restore, engine.rollback), so the
figures are the work itself, not Python's start-up; every step ends with
its fsync.  The figures that matter are the ratios of medians,
``full / from`` (the issue's target: at least 10), ``full2 / compare`` and
``full2 / compare_dense``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.core_backup import make_image
from bench.measure import same_bytes
from chunkstore.config import parse_size
from engine.backup import backup_image
from engine.repository import Repository
from engine.restore import restore_backup
from engine.rollback import make_rollback_target, rollback_backup

MiB = 1 << 20


def change_chunks(path: str, chunk_size: int, share: float, seed: int = 9) -> int:
    """Rewrite 4 KiB in ``share`` of the image's non-zero chunks; returns how many."""
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        data = []
        pos = 0
        while pos < size:  # the allocated extents, then the chunks in them holding a non-zero byte
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for c in range(start // chunk_size, -(-end // chunk_size)):
                if os.pread(fd, chunk_size, c * chunk_size).strip(b"\0"):
                    data.append(c)
            pos = end
        data = sorted(set(data))
        picks = rng.choice(data, size=max(1, int(len(data) * share)), replace=False)
        for c in picks:
            at = int(c) * chunk_size + int(rng.integers(0, chunk_size // 4096)) * 4096
            os.pwrite(fd, rng.bytes(4096), at)
    finally:
        os.close(fd)
    return len(picks)


def copy_durably(src: str, dst: str, sparse: str = "always") -> None:
    """A copy (sparse, or with ``sparse="never"`` every byte written, as a block
    device holds them), synced: the rollback's fsync must not pay for the setup's writes."""
    subprocess.run(["cp", f"--sparse={sparse}", src, dst], check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.rollback", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4G", help="apparent disk size (4G)")
    p.add_argument("--allocated", default="1G", help="bytes written in the image (1G)")
    p.add_argument("--change", type=float, default=0.03, help="share of the non-zero chunks changed (0.03)")
    p.add_argument("--chunk-size", default="256K", help="store chunk size (256K, the default)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four steps, alternating (3)")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed at the end)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, allocated, cs = parse_size(args.size), parse_size(args.allocated), parse_size(args.chunk_size)
    work = args.dir or tempfile.mkdtemp(prefix="bv-rollback-bench-")
    os.makedirs(work, exist_ok=True)
    times: dict[str, list[float]] = {"full": [], "from": [], "compare": [], "compare_dense": [], "full2": []}
    identical = True
    try:
        image, store = os.path.join(work, "disk.img"), os.path.join(work, "store")
        shutil.rmtree(store, ignore_errors=True)
        make_image(image, size, allocated)
        with Repository.init(store, chunk_size=cs) as repo:
            p1 = backup_image(repo, image, "bench", "full").id
            changed = change_chunks(image, cs, args.change)
            p2 = backup_image(repo, image, "bench", "incremental").id
            ref = {p1: os.path.join(work, "ref1.img"), p2: os.path.join(work, "ref2.img")}
            for point, path in ref.items():
                restore_backup(repo, point, path, force=True)
            target = os.path.join(work, "target.img")
            stats = {}
            for _ in range(args.rounds):
                out = os.path.join(work, "full.img")
                t, _r = timed(lambda: restore_backup(repo, p1, out, force=True))
                times["full"].append(t)
                identical &= same_bytes(out, ref[p1])
                copy_durably(ref[p2], target)
                t, r = timed(lambda: rollback_backup(repo, p1, make_rollback_target(target), base_ref=p2))
                times["from"].append(t)
                stats["from"] = r.rollback.as_dict() | {"chunks_written": r.chunks_written}
                identical &= same_bytes(target, ref[p1])
                t, r = timed(lambda: rollback_backup(repo, p2, make_rollback_target(target), compare=True))
                times["compare"].append(t)
                stats["compare"] = r.rollback.as_dict() | {"chunks_written": r.chunks_written}
                identical &= same_bytes(target, ref[p2])
                copy_durably(ref[p1], target, sparse="never")
                t, r = timed(lambda: rollback_backup(repo, p2, make_rollback_target(target), compare=True))
                times["compare_dense"].append(t)
                stats["compare_dense"] = r.rollback.as_dict() | {"chunks_written": r.chunks_written}
                identical &= same_bytes(target, ref[p2])
                t, _r = timed(lambda: restore_backup(repo, p2, out, force=True))
                times["full2"].append(t)
                identical &= same_bytes(out, ref[p2])
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "size": size, "allocated": allocated, "chunk_size": cs, "rounds": args.rounds,
            "changed_chunks": changed, "change_share": args.change,
            "seconds_median": {k: round(v, 4) for k, v in med.items()},
            "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "full_over_rollback_from": round(med["full"] / med["from"], 1),
            "full_over_rollback_compare": round(med["full2"] / med["compare"], 2),
            "full_over_rollback_compare_dense": round(med["full2"] / med["compare_dense"], 2),
            "compare_dense_target_MBps": round(size / MiB / med["compare_dense"], 1),
            "rollbacks": stats, "identical": identical,
        }
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["seconds_median"]
        print(f"{size // MiB} MiB disk, {allocated // MiB} MiB allocated, {cs >> 10} KiB chunks, "
              f"{changed} chunks changed ({args.change:.0%} of the non-zero ones), {args.rounds} rounds (median)")
        print(f"  full restore of P1             {s['full']:8.3f} s")
        print(f"  rollback P2 -> P1 (--from)     {s['from']:8.3f} s   {result['full_over_rollback_from']}x faster; "
              f"wrote {stats['from']['chunks_written']} chunks")
        print(f"  full restore of P2             {s['full2']:8.3f} s")
        print(f"  rollback P1 -> P2 (--compare)  {s['compare']:8.3f} s   {result['full_over_rollback_compare']}x "
              f"faster (a sparse file: read {stats['compare']['target_bytes_read'] // MiB} MiB of it), "
              f"wrote {stats['compare']['chunks_written']} chunks")
        print(f"  the same, every byte allocated {s['compare_dense']:8.3f} s   "
              f"{result['full_over_rollback_compare_dense']}x faster (as a block device: read all of it, "
              f"{result['compare_dense_target_MBps']} MB/s)")
        print(f"  every result identical to its full restore: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
