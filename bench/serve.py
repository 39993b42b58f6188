"""The NBD export against restore: nbdcopy from `blockvault serve` to null: and
to a file, and `blockvault restore` of the same point, MB/s in one run.

    python -m bench.serve [--size 2G] [--allocated 512M] [--chunk-size 1M] [--rounds 3]
                          [--parallel-requests] [--json]

One sparse image (bench.core_backup's mix: a third text, a third random, a
third written zeros, in 1 MiB runs), backed up in full once; then each round
measures, alternating, two ways:

* whole commands, start-up included (the CLI for both; nbdkit and its
  Python plugin for the export): ``blockvault restore`` to a new file
  against ``blockvault serve --run 'nbdcopy "$uri" null:'`` and ``... FILE'``;
* the transfer alone: restore_backup() in this process against nbdcopy
  from a server started fresh (cold cache) for each copy, timing nbdcopy.

MB/s = the disk's size / the median wall time; the figures that matter are
the export's medians over restore's (target: >= 0.70).  Every file written
is compared with the image byte for byte.
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

from bench.core_backup import make_image
from chunkstore.config import parse_size

MiB = 1 << 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: float = 3600) -> float:
    """Wall seconds of one blockvault command (a child process, as a user runs it)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"blockvault {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return wall


SERVE_OPTIONS: list[str] = []  # --parallel-requests, when asked for


def transfer(store: str, target: str, sock: str) -> float:
    """Wall seconds of nbdcopy from a server started for it (not counted)."""
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", store, "bench@1", "--socket", sock,
                               *SERVE_OPTIONS],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        uri = server.stdout.readline().strip()
        if not uri:
            raise SystemExit("blockvault serve did not start")
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", uri, target], check=True, timeout=3600)
        return time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)


def restore_in_process(store: str, out: str) -> float:
    from engine.repository import Repository
    from engine.restore import restore_backup
    with Repository.open(store) as repo:
        t0 = time.perf_counter()
        restore_backup(repo, "bench@1", out, force=True)
        return time.perf_counter() - t0


def same(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b], timeout=3600).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--allocated", default="512M")
    ap.add_argument("--chunk-size", default="1M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--parallel-requests", action="store_true",
                    help="serve with --parallel-requests (nbdkit's PARALLEL thread model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.parallel_requests:
        SERVE_OPTIONS.append("--parallel-requests")
    size, allocated = parse_size(args.size), parse_size(args.allocated)
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install nbdkit nbdkit-plugin-python libnbd-bin")
    work = tempfile.mkdtemp(prefix="bv-serve-bench-", dir=args.dir)
    try:
        img, store = os.path.join(work, "disk.raw"), os.path.join(work, "store")
        make_image(img, size, allocated)
        cli("init", store, "--chunk-size", args.chunk_size)
        cli("backup", store, img, "--disk", "bench")
        keys = ("restore", "export_null", "export_file", "restore_transfer", "nbdcopy_null", "nbdcopy_file")
        times: dict[str, list[float]] = {k: [] for k in keys}
        identical = True
        out, copy, sock = (os.path.join(work, n) for n in ("restored.raw", "copied.raw", "bench.sock"))

        def check(path: str) -> None:
            nonlocal identical
            identical &= same(img, path)
            os.unlink(path)

        for _ in range(args.rounds):
            times["restore"].append(cli("restore", store, "bench@1", out, "--force"))
            check(out)
            times["export_null"].append(cli("serve", store, "bench@1", *SERVE_OPTIONS,
                                            "--run", 'nbdcopy "$uri" null:'))
            times["export_file"].append(cli("serve", store, "bench@1", *SERVE_OPTIONS,
                                            "--run", f'nbdcopy "$uri" {copy}'))
            check(copy)
            times["restore_transfer"].append(restore_in_process(store, out))
            check(out)
            times["nbdcopy_null"].append(transfer(store, "null:", sock))
            times["nbdcopy_file"].append(transfer(store, copy, sock))
            check(copy)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "size": size, "allocated": allocated, "chunk_size": parse_size(args.chunk_size), "rounds": args.rounds,
            "parallel_requests": args.parallel_requests,
            **{f"{k}_s": [round(t, 3) for t in v] for k, v in times.items()},
            **{f"{k}_MBps": round(size / MiB / med[k], 1) for k in times},
            "export_null_over_restore": round(med["restore"] / med["export_null"], 3),
            "export_file_over_restore": round(med["restore"] / med["export_file"], 3),
            "nbdcopy_null_over_restore_transfer": round(med["restore_transfer"] / med["nbdcopy_null"], 3),
            "nbdcopy_file_over_restore_transfer": round(med["restore_transfer"] / med["nbdcopy_file"], 3),
            "identical": identical,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{size // MiB} MiB disk, {allocated // MiB} MiB allocated, {args.chunk_size} chunks, "
              f"{args.rounds} rounds, {'parallel' if args.parallel_requests else 'serialised'} requests per "
              "connection (median, logical MB/s = disk size / wall time)")
        r = result
        print("  whole commands, start-up included:")
        print(f"    blockvault restore to a file       {r['restore_MBps']:9.1f} MB/s")
        print(f"    serve --run nbdcopy to null:       {r['export_null_MBps']:9.1f} MB/s "
              f"({r['export_null_over_restore']:.2f}x of restore)")
        print(f"    serve --run nbdcopy to a file      {r['export_file_MBps']:9.1f} MB/s "
              f"({r['export_file_over_restore']:.2f}x of restore)")
        print("  the transfer alone:")
        print(f"    restore_backup() to a file         {r['restore_transfer_MBps']:9.1f} MB/s")
        print(f"    nbdcopy to null: (fresh server)    {r['nbdcopy_null_MBps']:9.1f} MB/s "
              f"({r['nbdcopy_null_over_restore_transfer']:.2f}x of restore)")
        print(f"    nbdcopy to a file (fresh server)   {r['nbdcopy_file_MBps']:9.1f} MB/s "
              f"({r['nbdcopy_file_over_restore_transfer']:.2f}x of restore)")
        print(f"  restores identical: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
