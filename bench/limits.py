"""This machine's limits, measured on the workload's own data in the same run.

Each limit is one stage of a backup or restore done alone, as fast as the
libraries allow, on 1 MiB chunks of the image's allocated, non-zero data
(a sample spread evenly over the image, at most `sample_bytes`):

* zstd compression at the store's level, and decompression of the result,
  with 1 and 2 threads (python-zstandard releases the GIL, each thread has
  its own compressor);
* XXH3-128 (the store's default digest) and SHA-256 (`--digest sha256`),
  with 1 and 2 threads;
* page-cache read of the image's allocated extents: read once to warm the
  cache, then timed on the second read;
* page-cache write: the sample written to a new file without fsync (after
  a sync, so no earlier writeback throttles it; best of two), and the same
  with fsync.

The run measures them twice, after T1 and after the last restore, and
keeps the best of each figure (`combine`): on a machine shared with other
work one pass may lose a core to someone else.

`limit_seconds` turns them into the shortest time a step could take for
the data it handles, assuming perfectly overlapped stages (each at its best
thread count), so `fraction_of_limit = limit_s / wall_s` says how close a
tool came to what this machine can do with the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Callable, Sequence

import numpy as np
import xxhash
import zstandard

from bench.units import MiB
from bench.workload import ImageScan, data_extents

CHUNK = MiB


def _throughput(make_worker: Callable[[], Callable[[bytes], object]], chunks: Sequence[bytes],
                threads: int, min_seconds: float) -> float:
    """Bytes per second of `threads` threads sharing `chunks` round-robin,
    repeating whole passes until min_seconds have passed."""
    parts = [list(chunks[i::threads]) for i in range(threads)]
    workers = [make_worker() for _ in range(threads)]
    for w, part in zip(workers, parts):  # warm up (allocations, tables)
        for c in part[:2]:
            w(c)
    total = sum(len(c) for c in chunks)
    done = 0
    t0 = time.perf_counter()
    while True:
        barrier = threading.Barrier(threads)

        def run(w: Callable[[bytes], object], part: list[bytes]) -> None:
            barrier.wait()
            for c in part:
                w(c)

        ts = [threading.Thread(target=run, args=(w, p)) for w, p in zip(workers, parts)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        done += total
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def sample_chunks(image: str, scan: ImageScan, sample_bytes: int) -> list[bytes]:
    """Up to sample_bytes of 1 MiB chunks holding non-zero data, evenly spread."""
    nz = scan.nonzero64
    per = CHUNK // (64 * 1024)  # 64 KiB blocks per chunk
    pad = (-len(nz)) % per
    blocks = np.flatnonzero(np.concatenate([nz, np.zeros(pad, bool)]).reshape(-1, per).any(axis=1))
    want = max(1, sample_bytes // CHUNK)
    if blocks.size > want:
        blocks = blocks[np.linspace(0, blocks.size - 1, want).astype(np.int64)]
    fd = os.open(image, os.O_RDONLY)
    try:
        chunks = [os.pread(fd, CHUNK, int(b) * CHUNK) for b in blocks.tolist()]
    finally:
        os.close(fd)
    return [c for c in chunks if c]


def _read_extents(fd: int, extents: list[tuple[int, int]], buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    for off, length in extents:
        end = off + length
        while off < end:
            n = os.preadv(fd, [view[: min(len(buf), end - off)]], off)
            if n <= 0:
                break
            off += n
            total += n
    return total


def rechunk(chunks: Sequence[bytes], size: int) -> list[bytes]:
    """The sample cut into (or joined up to) ``size``-byte chunks."""
    if size >= CHUNK:
        per = size // CHUNK
        return [b"".join(chunks[i:i + per]) for i in range(0, len(chunks), per)]
    return [c[i:i + size] for c in chunks for i in range(0, len(c), size)]


def measure_limits(image: str, scan: ImageScan, level: int, work_dir: str, *,
                   sample_bytes: int = 256 * MiB, threads: Sequence[int] = (1, 2),
                   min_seconds: float = 0.5, chunk_sizes: Sequence[int] = ()) -> dict:
    t_start = time.perf_counter()
    chunks = sample_chunks(image, scan, sample_bytes)
    sample = sum(len(c) for c in chunks)
    out: dict = {"sample_bytes": sample, "chunk_bytes": CHUNK, "zstd_level": level,
                 "threads": list(threads), "min_seconds_per_figure": min_seconds}

    compressed = [zstandard.ZstdCompressor(level=level).compress(c) for c in chunks]
    out["zstd_ratio"] = round(sample / max(1, sum(len(c) for c in compressed)), 3)

    def per_threads(make: Callable[[], Callable[[bytes], object]], data: Sequence[bytes],
                    denominator: int) -> dict[str, float]:
        res = {}
        for n in threads:
            rate = _throughput(make, data, n, min_seconds)
            # Rates are in input bytes of the stage: for decompression, the
            # bytes it produces (the data), not the compressed bytes it reads.
            res[str(n)] = round(rate * denominator / max(1, sum(len(d) for d in data)) / 1e6, 1)
        return res

    out["zstd_compress_MBps"] = per_threads(
        lambda: zstandard.ZstdCompressor(level=level).compress, chunks, sample)
    # zstd's speed depends on the frame size (its tables are sized for it),
    # so each blockvault store is held to the rate on its own chunk size.
    out["zstd_compress_by_chunk_MBps"] = {
        str(size): per_threads(lambda: zstandard.ZstdCompressor(level=level).compress,
                               rechunk(chunks, size), sample)
        for size in chunk_sizes if size != CHUNK}
    if CHUNK in chunk_sizes:
        out["zstd_compress_by_chunk_MBps"][str(CHUNK)] = out["zstd_compress_MBps"]
    out["zstd_decompress_MBps"] = per_threads(
        lambda: zstandard.ZstdDecompressor().decompress, compressed, sample)
    out["xxh3_128_MBps"] = per_threads(lambda: xxhash.xxh3_128_digest, chunks, sample)
    out["sha256_MBps"] = per_threads(lambda: (lambda c: hashlib.sha256(c).digest()), chunks, sample)

    fd = os.open(image, os.O_RDONLY)
    try:
        extents = data_extents(fd, os.fstat(fd).st_size)
        buf = bytearray(4 * MiB)
        _read_extents(fd, extents, buf)
        t0 = time.perf_counter()
        n = _read_extents(fd, extents, buf)
        out["read_page_cache_MBps"] = round(n / (time.perf_counter() - t0) / 1e6, 1)
        out["read_bytes"] = n
    finally:
        os.close(fd)

    # Writes: first flush what earlier steps left dirty, so that the figure
    # is the page cache's own speed, not writeback throttling; best of two
    # runs (the first one on a fresh VM also pays for touching new memory).
    # Then the same with fsync: what a durable restore pays at the end.
    path = os.path.join(work_dir, "limits-write.tmp")
    for durable in (False, True):
        rates = []
        for _ in range(2):
            os.sync()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                t0 = time.perf_counter()
                off = 0
                for c in chunks:
                    os.pwrite(fd, c, off)
                    off += len(c)
                if durable:
                    os.fsync(fd)
                rates.append(off / (time.perf_counter() - t0) / 1e6)
            finally:
                os.close(fd)
                os.unlink(path)
        out["write_fsync_MBps" if durable else "write_page_cache_MBps"] = round(max(rates), 1)
    out["measure_seconds"] = round(time.perf_counter() - t_start, 2)
    return out


def combine(passes: Sequence[dict]) -> dict:
    """The best of several measurements of the limits, figure by figure
    (and thread count by thread count): on a shared machine a pass can
    catch another process on the second core, never a faster machine."""
    out = dict(passes[0])
    for other in passes[1:]:
        for key, value in other.items():
            if not key.endswith("MBps"):
                continue
            if isinstance(value, dict):
                out[key] = _best_of(out.get(key) or {}, value)
            else:
                out[key] = max(value, out.get(key) or 0)
    out["passes"] = len(passes)
    return out


def _best_of(a: dict, b: dict) -> dict:
    """Figure-by-figure maximum of two (possibly nested) {key: MB/s} maps."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _best_of(a.get(k) or {}, v) if isinstance(v, dict) else max(v, a.get(k) or 0)
    return out


def best(limits: dict, key: str) -> float | None:
    """The best rate of a figure over the thread counts measured, in B/s."""
    v = limits.get(key)
    if v is None:
        return None
    if isinstance(v, dict):
        v = max(v.values()) if v else None
    return v * 1e6 if v else None


def limit_seconds(limits: dict | None, step: str, data_bytes: int | None, nonzero_bytes: int | None,
                  digest: str = "xxh3-128", compress_bytes: int | None = None,
                  chunk_size: int | None = None) -> float | None:
    """Shortest time this machine needs for a step on the same data:
    backup = max(read the data, hash the non-zero part, compress
    ``compress_bytes`` — the chunks that must be compressed, when the tool
    says which — else the non-zero part, at the rate for ``chunk_size``);
    restore = max(decompress, write the non-zero part);
    verify = max(read the stored bytes, decompress and hash the unique
    chunk bytes).  None if unknown."""
    if not limits or data_bytes is None or nonzero_bytes is None:
        return None
    if step == "backup":
        hash_key = "sha256_MBps" if digest == "sha256" else "xxh3_128_MBps"
        zstd = best(limits.get("zstd_compress_by_chunk_MBps") or {}, str(chunk_size)) or \
            best(limits, "zstd_compress_MBps")
        rates = [(data_bytes, best(limits, "read_page_cache_MBps")),
                 (nonzero_bytes, best(limits, hash_key)),
                 (nonzero_bytes if compress_bytes is None else compress_bytes, zstd)]
    elif step == "restore":
        rates = [(nonzero_bytes, best(limits, "zstd_decompress_MBps")),
                 (nonzero_bytes, best(limits, "write_page_cache_MBps"))]
    elif step == "verify":  # data: stored bytes read back; nonzero: unique chunk bytes
        hash_key = "sha256_MBps" if digest == "sha256" else "xxh3_128_MBps"
        rates = [(data_bytes, best(limits, "read_page_cache_MBps")),
                 (nonzero_bytes, best(limits, "zstd_decompress_MBps")),
                 (nonzero_bytes, best(limits, hash_key))]
    else:
        return None
    if any(r is None for _, r in rates):
        return None
    return max(n / r for n, r in rates)
