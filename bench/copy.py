"""``blockvault copy`` against a plain restore of the same point, in one run.

    python -m bench.copy [--size 256M] [--allocated 192M] [--chunk-size 256K] [--rounds 3] [--dir DIR] [--json]

One sparse image (bench.core_backup's mix of text, random and written-zero
1 MiB runs) backed up in full as P1, then 3% of its non-zero chunks changed
and backed up as the incremental P2.  Each round, alternating:

* ``restore``: restore P1 whole to a new file (fsync included);
* ``copy``: copy P1 into a new, empty store of another seed, so every chunk
  is read, checked, re-hashed, compressed with DST's level and written
  (the commit's fsyncs included);
* ``backup``: a full backup of P1's image into a new store (the same hashing,
  compressing and writing, from a file instead of a store);
* ``copy_next``: then P2 into that store: only P2's new chunks are read and
  sent (the rest is translated from P1's copy).

The engine is called in-process (engine.restore, engine.copy), so the figures
are the work, not Python's start-up.  Throughput is P1's non-zero bytes over
the median time; the figure that matters is the ratio ``copy / restore``,
measured on the same data at the same time (and ``copy / backup``).  Every copy is checked: the point
restores byte-identical from DST.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench.core_backup import make_image
from bench.rollback import change_chunks, same
from chunkstore.config import parse_size
from engine.backup import backup_image
from engine.copy import copy_points
from engine.repository import Repository
from engine.restore import restore_backup

MiB = 1 << 20


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.copy", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--allocated", type=parse_size, default=parse_size("192M"))
    p.add_argument("--chunk-size", type=parse_size, default=parse_size("256K"))
    p.add_argument("--change", type=float, default=0.03)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one, deleted)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="bv-bench-copy-")
    os.makedirs(work, exist_ok=True)
    try:
        img = os.path.join(work, "disk.img")
        make_image(img, args.size, args.allocated)
        src_path = os.path.join(work, "src")
        with Repository.init(src_path, chunk_size=args.chunk_size) as src:
            p1 = backup_image(src, img, "d")
            p1_copy = os.path.join(work, "p1.img")
            shutil.copyfile(img, p1_copy)
            changed = change_chunks(img, args.chunk_size, args.change)
            p2 = backup_image(src, img, "d", mode="incremental")
            data = p1.stats["nonzero_chunks"] * args.chunk_size
            times: dict[str, list[float]] = {"restore": [], "copy": [], "backup": [], "copy_next": []}
            sent = {}
            for r in range(args.rounds):
                out = os.path.join(work, "restored.img")
                dst_path = os.path.join(work, f"dst{r}")

                def restore():
                    restore_backup(src, p1.id, out, force=True)

                def copy_p1():
                    with Repository.init(dst_path, chunk_size=args.chunk_size) as dst:
                        return copy_points(src, dst, [p1.id])

                def backup():  # P1's image into a new store: the same reading, hashing and compressing
                    fresh = os.path.join(work, "fresh")
                    with Repository.init(fresh, chunk_size=args.chunk_size) as repo:
                        backup_image(repo, p1_copy, "d")
                    shutil.rmtree(fresh)

                def copy_p2():
                    with Repository.open(dst_path) as dst:
                        return copy_points(src, dst, [p2.id])

                steps = [("restore", restore), ("copy", copy_p1), ("backup", backup)]
                for name, fn in (steps if r % 2 == 0 else steps[::-1]):
                    took, res = _timed(fn)
                    times[name].append(took)
                    if name == "copy":
                        sent["copy"] = res.stats.as_dict()
                took, res = _timed(copy_p2)
                times["copy_next"].append(took)
                sent["copy_next"] = res.stats.as_dict()
                assert same(out, p1_copy), "restore differs from P1"
                with Repository.open(dst_path) as dst:
                    restore_backup(dst, p1.id, out, force=True)
                    assert same(out, p1_copy), "P1 copied does not restore identical"
                    restore_backup(dst, p2.id, out, force=True)
                    assert same(out, img), "P2 copied does not restore identical"
                os.unlink(out)
                shutil.rmtree(dst_path)
        med = {k: statistics.median(v) for k, v in times.items()}
        doc = {"size": args.size, "nonzero_bytes": data, "chunk_size": args.chunk_size, "rounds": args.rounds,
               "changed_chunks": changed, "seconds": med,
               "mb_per_s": {k: data / 1e6 / med[k] for k in ("restore", "copy", "backup")},
               "copy_over_restore": med["restore"] / med["copy"], "copy_over_backup": med["backup"] / med["copy"],
               "sent": sent}
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(f"P1: {data / MiB:.0f} MiB of non-zero chunks ({args.chunk_size >> 10} KiB), median of {args.rounds}")
            print(f"restore P1           {med['restore']:.3f} s  {doc['mb_per_s']['restore']:.0f} MB/s")
            print(f"copy P1 (re-hashed)  {med['copy']:.3f} s  {doc['mb_per_s']['copy']:.0f} MB/s  "
                  f"= {doc['copy_over_restore']:.2f} x restore's speed")
            print(f"backup of P1's image {med['backup']:.3f} s  {doc['mb_per_s']['backup']:.0f} MB/s  "
                  f"(copy = {doc['copy_over_backup']:.2f} x a full backup's speed)")
            print(f"copy P2 next night   {med['copy_next']:.3f} s  {sent['copy_next']['chunks_sent']} chunks sent "
                  f"({changed} changed)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
