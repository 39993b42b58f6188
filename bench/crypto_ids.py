"""The primitives of an encrypted store, measured on this machine in one run.

    python -m bench.crypto_ids [--size 1M] [--seconds 0.5] [--json]
    (and as the first part of ``python -m bench --encryption``)

Chunk-id candidates (16-byte ids of a 1 MiB buffer): XXH3-128 with a 64-bit
seed (a plaintext store's id), keyed BLAKE3 (an encrypted store's id,
chunkstore/crypto.py ``keyed_id``), keyed BLAKE2b and HMAC-SHA-256 truncated
to 128 bits; and the two AEADs of ``cryptography`` a record is sealed with,
AES-256-GCM and ChaCha20-Poly1305, sealing and opening a 1 MiB payload with
48 bytes of associated data (a record header's).

Each runs on 1 thread, then on 2 threads at once (the backup digests and
seals in worker threads, so what matters is whether a call lets the other
thread run).  Two figures tell: the 2-thread throughput over the 1-thread
one, and "parallelism", the CPU seconds both threads used over the wall time
(``time.thread_time``).  A call that holds the GIL keeps parallelism at 1.0
whatever the machine does; one that releases it reaches 2.0 when a second
core is free.  On a shared machine the second core may be busy, so the
verdict is "releases" only above 1.4, "holds" below 1.15 and "unclear"
between.  Ratios within this one run are what to read; absolute MB/s move
with the machine's load.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from typing import Callable

import numpy as np

from bench.units import MiB, parse_size

AD = bytes(range(48))  # the size of a record header's associated data
NONCE = bytes(12)      # one nonce for every call: the output is thrown away, only the time counts


def id_functions() -> dict[str, Callable[[], Callable]]:
    """name -> factory of a one-argument function (a fresh key per run)."""
    import blake3
    import xxhash

    seed = int.from_bytes(os.urandom(8), "little")
    key = os.urandom(32)

    def xxh3(data):
        return xxhash.xxh3_128_digest(data, seed=seed)

    def blake3_keyed(data):  # the same call as chunkstore.crypto.keyed_id
        return blake3.blake3(data, key=key).digest(16)

    def blake2b_keyed(data):
        return hashlib.blake2b(data, key=key, digest_size=16).digest()

    def hmac_sha256(data):
        return hmac.digest(key, data, "sha256")[:16]

    return {"xxh3-128-seeded": lambda: xxh3, "blake3-128-keyed": lambda: blake3_keyed,
            "blake2b-128-keyed": lambda: blake2b_keyed, "hmac-sha256-128": lambda: hmac_sha256}


def aead_functions(bufs: list[bytes]) -> dict[str, Callable[[], tuple[Callable, list[bytes]]]]:
    """name -> factory of (function, the buffers it takes in turn): seal takes
    the plaintext pool, open a pool of the same buffers sealed."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    out = {}
    for name, cls in (("aes-256-gcm", AESGCM), ("chacha20-poly1305", ChaCha20Poly1305)):
        aead = cls(os.urandom(32))

        def seal(data, aead=aead):
            return aead.encrypt(NONCE, data, AD)

        def open_(sealed, aead=aead):
            return aead.decrypt(NONCE, sealed, AD)

        out[f"{name} seal"] = (lambda f=seal: (f, bufs))
        out[f"{name} open"] = (lambda f=open_, a=aead: (f, [a.encrypt(NONCE, b, AD) for b in bufs]))
    return out


def run_threads(fn: Callable, bufs: list[bytes], threads: int, seconds: float, size: int) -> dict:
    """``threads`` threads call fn on the buffers in turn until ``seconds``
    have passed; all start together (a barrier) and the wall time runs until
    the last ends."""
    barrier = threading.Barrier(threads + 1)
    calls = [0] * threads
    cpu = [0.0] * threads
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            fn(bufs[0])  # warm: first-call set-up is not measured
            barrier.wait()
            c0 = time.thread_time()
            end = time.perf_counter() + seconds
            n, k = 0, i * len(bufs) // threads  # the threads start apart in the pool
            while time.perf_counter() < end:
                fn(bufs[k])
                k = (k + 1) % len(bufs)
                n += 1
            calls[i] = n
            cpu[i] = time.thread_time() - c0
        except BaseException as e:  # reported, not swallowed
            errors.append(e)
            barrier.abort()

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    total = sum(calls) * size
    return {"threads": threads, "calls": sum(calls), "wall_s": round(wall, 4),
            "MBps": round(total / wall / 1e6, 1), "parallelism": round(sum(cpu) / wall, 2)}


def gil_probe(fn: Callable, bufs: list[bytes], seconds: float = 0.6, interval: float = 0.1, probes: int = 3) -> dict:
    """Does a call of fn let other Python threads run?  Measured by a heartbeat,
    whatever the machine's load.

    Thread A calls fn in a loop; thread B sleeps 1 ms, then needs the GIL to
    note the time, again and again.  With the switch interval set to
    ``interval`` (200 ms), a call that holds the GIL makes B wait for the
    interval before A is asked to let go, so B's beats come ~100 ms apart; a
    call that releases it lets B in at once, 1 ms plus the scheduler's delay
    (a few ms on a busy machine) apart.  A probe's verdict is from its median
    gap: "holds" above half the interval, "releases" below a quarter of it.
    On a loaded machine a probe can be fooled one way: when the OS takes A off
    the CPU in the instant it let go of the GIL, B beats freely until A is
    back, so a holding call can look like a releasing one.  Hence ``probes``
    probes and the majority verdict; each probe's gap is kept."""
    runs = [_probe(fn, bufs, seconds, interval) for _ in range(probes)]
    votes = [r["gil"] for r in runs]
    gil = max(("holds", "releases", "unclear"), key=votes.count)
    return {"gil": gil, "heartbeat_median_gap_ms": sorted(r["gap_ms"] for r in runs)[len(runs) // 2],
            "probes": runs, "switch_interval_ms": round(interval * 1000)}


def _probe(fn: Callable, bufs: list[bytes], seconds: float, interval: float) -> dict:
    old = sys.getswitchinterval()
    beats: list[float] = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            time.sleep(0.001)
            beats.append(time.perf_counter())

    fn(bufs[0])
    sys.setswitchinterval(interval)
    try:
        hb = threading.Thread(target=heartbeat, daemon=True)
        hb.start()
        end, k = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            fn(bufs[k])
            k = (k + 1) % len(bufs)
        stop.set()
    finally:
        sys.setswitchinterval(old)
    hb.join()
    gaps = sorted(b - a for a, b in zip(beats, beats[1:]))
    median = gaps[len(gaps) // 2] if gaps else float(seconds)
    gil = "holds" if median > interval / 2 else "releases" if median < interval / 4 else "unclear"
    return {"gil": gil, "gap_ms": round(median * 1000, 2), "beats": len(beats)}


def measure(size: int = MiB, seconds: float = 0.3, threads: tuple[int, ...] = (1, 2), pool: int = 64 * MiB,
            rounds: int = 3, probe_seconds: float = 0.6, probes: int = 3) -> dict:
    """Every primitive at 1 and 2 threads, one after the other, in this process.

    The buffers are ``pool`` bytes of distinct ``size``-byte buffers taken in
    turn, more than the CPU's caches hold, so the data comes from memory as a
    chunk just read from the page cache does (one 1 MiB buffer called again
    and again stays in L2, and XXH3 then looks three times faster than it is
    for a backup).  Each thread count runs ``rounds`` times, alternating, and
    the fastest run counts: other work on the machine only ever slows one."""
    rng = np.random.default_rng(13)
    bufs = [rng.bytes(size) for _ in range(max(1, pool // size))]
    rows = []
    ids = {name: (lambda f=f: (f(), bufs)) for name, f in id_functions().items()}
    for group, funcs in (("id", ids), ("aead", aead_functions(bufs))):
        for name, factory in funcs.items():
            fn, inputs = factory()
            runs: dict[int, dict] = {}
            for _ in range(rounds):
                for t in threads:
                    r = run_threads(fn, inputs, t, seconds, size)
                    if t not in runs or r["MBps"] > runs[t]["MBps"]:
                        runs[t] = r
            row = {"group": group, "name": name, "runs": [runs[t] for t in threads]}
            if 1 in runs and 2 in runs:
                row["two_over_one"] = round(runs[2]["MBps"] / runs[1]["MBps"], 2)
                row["parallelism_2"] = runs[2]["parallelism"]
            row.update(gil_probe(fn, inputs, probe_seconds, probes=probes))
            del inputs
            rows.append(row)
    base = next(r for r in rows if r["name"] == "xxh3-128-seeded")["runs"][0]["MBps"]
    for r in rows:
        r["of_xxh3_1thread"] = round(r["runs"][0]["MBps"] / base, 3)
    return {"buffer_bytes": size, "pool_bytes": len(bufs) * size, "seconds_per_run": seconds, "rounds": rounds, "loadavg": list(os.getloadavg()),
            "cpu_flags": cpu_flags(), "versions": versions(), "rows": rows}


def cpu_flags() -> list[str]:
    """The CPU features these primitives use, as /proc/cpuinfo lists them."""
    want = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "sha_ni", "avx2", "avx512f", "ssse3")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def versions() -> dict:
    from importlib import metadata
    out = {}
    for mod in ("cryptography", "blake3", "xxhash"):
        try:
            out[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            out[mod] = None
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        out["openssl"] = backend.openssl_version_text()
    except Exception:  # the figure is a bonus
        pass
    return out


def table(doc: dict) -> str:
    """Markdown: MB/s at 1 and 2 threads, 2/1, parallelism, GIL verdict, share of XXH3."""
    lines = [f"{doc['buffer_bytes'] // MiB} MiB buffers taken in turn from {doc['pool_bytes'] // MiB} MiB, "
             f"best of {doc['rounds']} runs of {doc['seconds_per_run']} s, "
             f"load average {doc['loadavg'][0]:.2f}; CPU: {', '.join(doc['cpu_flags']) or '?'}", "",
             "| primitive | MB/s, 1 thread | MB/s, 2 threads | 2 / 1 | parallelism | GIL (heartbeat gap) | "
             "of XXH3 (1 thread) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        one, two = r["runs"][0], r["runs"][-1]
        lines.append(f"| {r['name']} | {one['MBps']:.0f} | {two['MBps']:.0f} | {r.get('two_over_one', '-')} | "
                     f"{r.get('parallelism_2', '-')} | {r['gil']} ({r['heartbeat_median_gap_ms']:.1f} ms) | "
                     f"{r['of_xxh3_1thread']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.crypto_ids", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1M", help="buffer size (default 1M)")
    p.add_argument("--pool", default="64M", help="distinct buffers in turn, this much in all (default 64M; "
                   "1M: one buffer, hot in cache)")
    p.add_argument("--seconds", type=float, default=0.3, help="one run of a primitive (default 0.3)")
    p.add_argument("--rounds", type=int, default=3, help="runs per primitive and thread count, best counts (default 3)")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    a = p.parse_args(argv)
    doc = measure(parse_size(a.size), a.seconds, pool=parse_size(a.pool), rounds=a.rounds)
    print(json.dumps(doc, indent=1) if a.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
