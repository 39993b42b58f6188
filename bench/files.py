"""File-level restore against a full restore of the same point, in one run.

    python -m bench --files [--size 20G] [--data 512M] [--chunk-size 256K] [--rounds 3] [--json]
    python -m bench.files ...   (the same)

Builds a disk of ``--size`` apparent bytes with an MBR table (sfdisk) and one
ext4 partition filled by ``mkfs.ext4 -d`` from a generated tree (``--data``
bytes in files of 1-64 MiB, a thousand small files in nested directories,
and the 1 MiB file fetched below), backs it up once, then times, through the
real command, alternately ``--rounds`` times:

* ``files ls STORE d@1 /``: the root listing;
* ``files get STORE d@1 /srv/data/one.bin DEST``: one 1 MiB file;
* ``restore STORE d@1 OUT``: the whole point, the way to one file without
  file-level restore.

It reports the median wall time of each, the chunks each read (the
commands' own --json counts) and the ratios, which the machine's noise
mostly cancels.  The fetched file is checked byte for byte, and the
restored image against the source (``cmp``; ``--no-check`` skips that).
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

from chunkstore.config import parse_size

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bv(*args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args, "--json"], capture_output=True, text=True,
                          cwd=REPO, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"bench: {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return wall, json.loads(proc.stdout)


def make_tree(root: str, data: int, seed: int = 1) -> bytes:
    """The partition's files; returns the 1 MiB file's bytes."""
    r = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "srv", "data"))
    one = r.bytes(MiB)
    with open(os.path.join(root, "srv", "data", "one.bin"), "wb") as f:
        f.write(one)
    left, i = data, 0
    while left > 0:
        n = min(left, int(r.integers(1, 65)) * MiB)
        d = os.path.join(root, "var", f"big{i % 8}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"blob{i}.bin"), "wb") as f:  # half random, half text: compressible
            f.write(r.bytes(n // 2) + (b"line of a log file %d\n" % i) * (n // 2 // 22) + bytes(n // 2 % 22))
        left -= n
        i += 1
    for k in range(1000):
        d = os.path.join(root, "etc", f"conf{k // 100}", f"sub{k // 10 % 10}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file{k}.conf"), "w") as f:
            f.write(f"setting{k} = {k * 7}\n" * (k % 50 + 1))
    return one


def build_disk(work: str, size: int, data: int) -> tuple[str, bytes]:
    src = os.path.join(work, "src")
    one = make_tree(src, data)
    disk = os.path.join(work, "disk.img")
    part = os.path.join(work, "part.img")
    start = MiB
    with open(disk, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", disk], input=f"label: dos\nstart={start // 512}, type=83\n", text=True,
                   check=True, capture_output=True)
    with open(part, "wb") as f:
        f.truncate(size - start - MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard", "-d", src, part],
                   check=True, capture_output=True)
    # place the partition, keeping holes
    with open(part, "rb") as s, open(disk, "r+b") as d:
        fd, pos, end = s.fileno(), 0, os.fstat(s.fileno()).st_size
        while pos < end:
            try:
                at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, at, os.SEEK_HOLE)
            while at < hole:
                n = min(8 * MiB, hole - at)
                os.pwrite(d.fileno(), os.pread(fd, n, at), start + at)
                at += n
            pos = hole
    os.unlink(part)
    shutil.rmtree(src)
    return disk, one


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="bv-bench-files-", dir=args.work)
    try:
        t0 = time.perf_counter()
        disk, one = build_disk(work, args.size_b, args.data_b)
        built = time.perf_counter() - t0
        store = os.path.join(work, "store")
        _bv("init", store, "--chunk-size", args.chunk_size)
        backup_wall, backup = _bv("backup", store, disk, "--disk", "d")
        steps: dict[str, list] = {"ls": [], "get": [], "restore": []}
        docs: dict[str, dict] = {}
        for k in range(args.rounds):
            for name in ("ls", "get", "restore"):
                if name == "ls":
                    wall, doc = _bv("files", "ls", store, "d@1", "/")
                elif name == "get":
                    dest = os.path.join(work, f"get{k}")
                    wall, doc = _bv("files", "get", store, "d@1", "/srv/data/one.bin", dest)
                    with open(os.path.join(dest, "one.bin"), "rb") as f:
                        if f.read() != one:
                            raise SystemExit("bench: files get returned other bytes than the source file")
                    shutil.rmtree(dest)
                else:
                    out = os.path.join(work, "restored.img")
                    wall, doc = _bv("restore", store, "d@1", out, "--force")
                    if k == 0 and not args.no_check:
                        subprocess.run(["cmp", disk, out], check=True)
                steps[name].append(wall)
                docs[name] = doc
        total = docs["ls"]["chunks_total"]
        med = {n: statistics.median(v) for n, v in steps.items()}
        result = {
            "disk": {"size": args.size_b, "data": args.data_b, "chunk_size": parse_size(args.chunk_size),
                     "chunks": total, "nonzero_chunks": backup["stats"]["nonzero_chunks"],
                     "build_s": round(built, 2), "backup_s": round(backup_wall, 2)},
            "rounds": args.rounds,
            "ls": {"median_s": round(med["ls"], 3), "walls_s": [round(w, 3) for w in steps["ls"]],
                   "chunks_read": docs["ls"]["chunks_read"],
                   "share_of_chunks": docs["ls"]["chunks_read"] / total},
            "get_1MiB": {"median_s": round(med["get"], 3), "walls_s": [round(w, 3) for w in steps["get"]],
                         "chunks_read": docs["get"]["chunks_read"]},
            "restore": {"median_s": round(med["restore"], 3), "walls_s": [round(w, 3) for w in steps["restore"]],
                        "chunks_read": docs["restore"]["chunks_read"],
                        "bytes_written": docs["restore"]["bytes_written"]},
            "ratios": {"restore_over_get": round(med["restore"] / med["get"], 1),
                       "restore_over_ls": round(med["restore"] / med["ls"], 1)},
        }
        return result
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def text(r: dict) -> str:
    d = r["disk"]
    return "\n".join([
        f"disk: {d['size'] / (1 << 30):.0f} GiB apparent, {d['data'] / MiB:.0f} MiB of file data, "
        f"{d['chunks']} chunks of {d['chunk_size'] >> 10} KiB ({d['nonzero_chunks']} not zero); "
        f"backup {d['backup_s']} s; medians of {r['rounds']} rounds",
        f"files ls /             {r['ls']['median_s']:8.3f} s  {r['ls']['chunks_read']:6d} chunks read "
        f"({100 * r['ls']['share_of_chunks']:.3f}% of the disk's)",
        f"files get one 1 MiB    {r['get_1MiB']['median_s']:8.3f} s  {r['get_1MiB']['chunks_read']:6d} chunks read",
        f"restore (whole point)  {r['restore']['median_s']:8.3f} s  {r['restore']['chunks_read']:6d} chunks read",
        f"restore / get: {r['ratios']['restore_over_get']}x   restore / ls: {r['ratios']['restore_over_ls']}x",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --files", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="20G", help="apparent disk size (20G)")
    p.add_argument("--data", default="512M", help="bytes of file data in the filesystem (512M)")
    p.add_argument("--chunk-size", default="256K", help="the store's chunk size (256K, the default)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (3)")
    p.add_argument("--work", help="where the disk and store go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-check", action="store_true", help="skip comparing the restored image with the disk")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    args.size_b, args.data_b = parse_size(args.size), parse_size(args.data)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
