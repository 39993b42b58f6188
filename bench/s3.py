"""python -m bench --s3: a local store against a store in Ceph RGW, and the endpoint's own limit, in one run.

    python -m bench --s3 --out DIR [--quick] [--size 1G] [--attach-size 4G] [--keep]

Starts a throwaway single-node Ceph (tools/ceph-s3.sh through tests/s3cluster.py;
memstore holds about twice what is stored in RAM, so --store-gb is sized from the
data), makes one sparse image of incompressible 1 MiB runs (so what is stored is what
is moved and MB/s compare with the endpoint's MiB/s), then measures with the CLI
(bench/measure.py: wall time and peak RSS from wait4):

* local and S3: a full backup (P1), an incremental after 3% of the chunks changed
  (P2), a restore of P1;
* S3 only: the restore again with ``--threads 4`` (restore's default before it ran
  four threads per core from a bucket); ``attach`` on an empty cache (a new host), then a restore of P2 from it;
  ``copy`` of both points from the local store into a fresh S3 store;
* the endpoint: PUT then GET of pack-sized objects (32 MiB, and 8 MiB: restore's
  largest ranged GET) with as many requests in flight as the uploader (4) and as
  restore (8) use (bench/s3_endpoint.py); the limit is the best of those runs, right after the S3 figures, on the same cluster.

Ratios printed: S3 backup MiB/s of bytes uploaded over the PUT limit, S3 restore
over the GET limit (targets: 80%), peak RSS (target: under 256 MiB).
``--attach-size`` adds a second S3 store of that much packed data and times
``attach`` of it on an empty cache.  ``--quick`` is small, for CI: it checks that
every step ran and every restore is byte-identical, never speed.  Figures are only
comparable within one run: client, radosgw and OSD share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np

from bench.measure import fresh_dirs, log, run_measured, same_bytes
from bench.s3_endpoint import client as s3_client
from bench.s3_endpoint import measure as endpoint_measure
from bench.units import parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
PACK = 32 << 20          # chunkstore.config.DEFAULT_PACK_TARGET
SPAN = 8 << 20           # engine.restore.SPAN_BYTES
TARGETS = {"backup_of_put": 0.8, "restore_of_get": 0.8, "peak_rss_bytes": 256 * MiB}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench --s3", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json")
    p.add_argument("--quick", action="store_true", help="small, correctness only (CI)")
    p.add_argument("--size", help="non-zero bytes of the image (default 1G, quick 24M)")
    p.add_argument("--attach-size", help="also time attach of a store holding this much packed data (e.g. 4G)")
    p.add_argument("--chunk-size", default="1M", help="store chunk size (default 1M)")
    p.add_argument("--threads", type=int, default=4, help="requests in flight for the endpoint limit (4: the uploader's)")
    p.add_argument("--store-gb", type=int, help="memstore size (default: from the data)")
    p.add_argument("--work", help="work folder (default OUT/work)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeout", type=float, default=3600.0)
    a = p.parse_args(argv)
    a.size_b = parse_size(a.size or ("24M" if a.quick else "1G"))
    a.attach_b = parse_size(a.attach_size) if a.attach_size else 0
    a.chunk_b = parse_size(a.chunk_size)
    return a


def make_image(path: str, data_bytes: int, seed: int) -> None:
    """``data_bytes`` of random 1 MiB runs in a sparse image 4/3 as large (a quarter holes)."""
    rng = np.random.default_rng(seed)
    slots = max(1, data_bytes // MiB) * 4 // 3
    picks = np.sort(rng.choice(slots, size=max(1, data_bytes // MiB), replace=False))
    with open(path, "wb") as f:
        f.truncate(slots * MiB)
        for s in picks:
            f.seek(int(s) * MiB)
            f.write(rng.bytes(MiB))


def change(path: str, chunk: int, share: float, seed: int) -> None:
    """New random bytes in ``share`` of the image's allocated chunks (4 KiB at the start of each)."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for off in range(0, size, chunk):
            f.seek(off)
            if f.read(4096).count(0) < 4096 and rng.random() < share:
                f.seek(off)
                f.write(rng.bytes(4096))




class Runner:
    """The CLI of this checkout (``python -m engine.cli``), measured, every step recorded."""

    def __init__(self, env: dict, timeout: float, t0: float):
        self.env, self.timeout, self.t0 = env, timeout, t0
        self.steps: list[dict] = []

    def __call__(self, name: str, where: str, *args: str, moved: int | None = None, env: dict | None = None) -> dict:
        m = run_measured([[sys.executable, "-m", "engine.cli", *args]], cwd=ROOT, env=dict(self.env, **(env or {})),
                         timeout=self.timeout)
        rec = {"step": name, "where": where, "ok": m.ok, "error": m.error(), "wall_s": round(m.wall_s, 3),
               "cpu_s": round(m.cpu_user_s + m.cpu_sys_s, 3), "peak_rss_bytes": m.peak_rss_bytes,
               "moved_bytes": moved, "stdout": m.stdout[-4000:]}
        if moved is not None and m.wall_s > 0:
            rec["MiBps"] = round(moved / MiB / m.wall_s, 1)
        self.steps.append(rec)
        log(self.t0, f"{where:5} {name:12} {'ok' if m.ok else 'FAILED'} {m.wall_s:7.2f}s "
                     f"{rec.get('MiBps', '-')} MiB/s, peak RSS {m.peak_rss_bytes / MiB:.0f} MiB"
                     + ("" if m.ok else f": {m.error()}"))
        return rec


def stored_bytes(runner: Runner, store: str, *extra: str) -> int | None:
    m = run_measured([[sys.executable, "-m", "engine.cli", "stats", store, "--json", *extra]], cwd=ROOT,
                     env=runner.env, timeout=runner.timeout)
    try:
        doc = json.loads(m.stdout)
    except ValueError:
        return None
    for key in ("stored_bytes", "pack_bytes"):
        if isinstance(doc.get(key), int):
            return doc[key]
    return None


def endpoint_limit(cluster, threads: int, total: int) -> dict:
    s3 = s3_client(cluster.endpoint, cluster.access_key, cluster.secret_key, cluster.region)
    bucket = f"bv-limit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    # packs as the uploader PUTs them; ranged-GET-sized objects with restore's threads too (2x)
    runs = [endpoint_measure(s3, bucket, size, n, total) for size, n in
            ((PACK, threads), (SPAN, threads), (SPAN, 2 * threads))]
    s3.delete_bucket(Bucket=bucket)
    return {"threads": threads, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out, work = fresh_dirs(args.out, args.work)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from s3cluster import CephCluster, free_port_base, missing_message   # the tests' cluster, one recipe
    if missing_message():
        print(missing_message(), file=sys.stderr)
        return 1
    # memstore: ~2x what is stored; stored: the S3 store, the copy's store, the limit's objects, attach store
    need = 2 * (2 * args.size_b + 2 * max(args.size_b // 4, 64 * MiB) + args.attach_b) + (1 << 30)
    store_gb = args.store_gb or max(2, -(-need // (1 << 30)))
    os.environ["STORE_GB"] = str(store_gb)
    cluster = CephCluster()
    cdir = tempfile.mkdtemp(prefix="bvs3b", dir="/tmp")
    log(t0, f"starting Ceph (memstore {store_gb} GiB) in {cdir}")
    cluster.start(cdir, free_port_base())
    doc: dict = {"schema": 1, "command": ["python", "-m", "bench", "--s3", *(argv or [])], "quick": args.quick,
                 "config": {"data_bytes": args.size_b, "chunk_size": args.chunk_b, "store_gb": store_gb,
                            "attach_bytes": args.attach_b, "limit_threads": args.threads},
                 "cluster_start_s": round(cluster.start_seconds, 2), "targets": TARGETS, "checks": []}
    try:
        env = dict(os.environ, **cluster.env(), BLOCKVAULT_LEASE_TTL="3")
        run = Runner(env, args.timeout, t0)
        doc["steps"] = run.steps
        checks = doc["checks"]

        def check(name, ok, detail=""):
            checks.append({"name": name, "ok": bool(ok), "detail": detail})

        img = os.path.join(work, "disk.img")
        make_image(img, args.size_b, 1)
        snap1 = os.path.join(work, "p1.img")
        shutil.copyfile(img, snap1)
        data = args.size_b
        local, url = os.path.join(work, "local"), f"s3://bv-bench-{uuid.uuid4().hex[:8]}/store"
        cache_a, cache_b = os.path.join(work, "cache-a"), os.path.join(work, "cache-b")
        cluster.client().create_bucket(Bucket=url[5:].split("/")[0])
        cs = ["--chunk-size", args.chunk_size]
        run("init", "local", "init", local, *cs)
        run("init", "s3", "init", url, "--cache", cache_a, *cs)
        run("backup", "local", "backup", local, img, "--disk", "d", moved=data)
        up0 = stored_bytes(run, url, "--cache", cache_a)
        run("backup", "s3", "backup", url, img, "--disk", "d", "--cache", cache_a, moved=data)
        up1 = stored_bytes(run, url, "--cache", cache_a)
        change(img, args.chunk_b, 0.03, 2)
        snap2 = os.path.join(work, "p2.img")
        shutil.copyfile(img, snap2)
        run("incremental", "local", "backup", local, img, "--disk", "d", "--mode", "incremental")
        run("incremental", "s3", "backup", url, img, "--disk", "d", "--mode", "incremental", "--cache", cache_a)
        up2 = stored_bytes(run, url, "--cache", cache_a)
        if up1 is not None and up2 is not None:
            inc = up2 - up1
            for r in run.steps[-2:]:
                r["moved_bytes"] = inc
                r["MiBps"] = round(inc / MiB / r["wall_s"], 1)
        if up0 is not None and up1 is not None:
            b = _step(doc, "s3", "backup")
            b["uploaded_bytes"] = up1 - up0
            b["uploaded_MiBps"] = round((up1 - up0) / MiB / b["wall_s"], 1)
        restored = {}
        for where, store, extra in (("local", local, ()), ("s3", url, ("--cache", cache_a))):
            target = os.path.join(work, f"restore-{where}.img")
            run("restore", where, "restore", store, "d@1", target, *extra, moved=data)
            restored[where] = same_bytes(target, snap1)
            if os.path.exists(target):
                os.unlink(target)
        # the same restore with restore's earlier default of two threads per core (4 here): before/after,
        # alternated, twice each (the best counts: other work on the machine only ever slows a run down)
        target = os.path.join(work, "restore-s3-again.img")
        for step, threads in (("restore@4thr", ["--threads", "4"]), ("restore#2", []),
                              ("restore@4thr#2", ["--threads", "4"])):
            run(step, "s3", "restore", url, "d@1", target, "--cache", cache_a, *threads, moved=data)
            restored[f"s3 {step}"] = same_bytes(target, snap1)
            if os.path.exists(target):
                os.unlink(target)
        time.sleep(3.5)   # host A's lease (TTL 3 s) expires: host B may take over
        run("attach", "s3", "attach", url, "--cache", cache_b, "--take-over", moved=up2)
        target = os.path.join(work, "restore-b.img")
        run("restore@B", "s3", "restore", url, "d@2", target, "--cache", cache_b, moved=data)
        restored["s3 after attach"] = same_bytes(target, snap2)
        if os.path.exists(target):
            os.unlink(target)
        url2 = f"s3://{url[5:].split('/')[0]}/copy"
        cenv = {"BLOCKVAULT_CACHE": os.path.join(work, "cache-c")}   # copy has no --cache: DST's default one
        run("init", "s3", "init", url2, *cs, env=cenv)
        run("copy", "local>s3", "copy", local, url2, "--all", moved=up2, env=cenv)
        target = os.path.join(work, "restore-c.img")
        run("restore@copy", "s3", "restore", url2, "d@2", target, env=cenv)
        restored["s3 copy"] = same_bytes(target, snap2)
        if os.path.exists(target):
            os.unlink(target)
        log(t0, "endpoint limit ...")
        doc["limit"] = endpoint_limit(cluster, args.threads, max(4 * PACK, min(args.size_b // 2, 1 << 30)))
        for r in doc["limit"]["runs"]:
            log(t0, f"  {r['object_bytes'] // MiB} MiB x {r['threads']}: PUT {r['put_mib_s']} GET {r['get_mib_s']} MiB/s")
        if args.attach_b:
            doc["attach_large"] = attach_large(run, cluster, work, args, t0)

        failed = [f"{s['where']} {s['step']}: {s['error']}" for s in run.steps if not s["ok"]]
        check("every step succeeded", not failed, "; ".join(failed)[:2000])
        check("restores identical", all(restored.values()), json.dumps(restored))
        doc["restored_identical"] = restored
        doc["summary"] = summary(doc)
        if not args.quick:
            s = doc["summary"]
            for key, target in (("backup_of_put", 0.8), ("restore_of_get", 0.8)):
                s.setdefault("targets_met", {})[key] = s.get(key) is not None and s[key] >= target
            s["targets_met"]["peak_rss"] = s["peak_rss_bytes"] < TARGETS["peak_rss_bytes"]
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc["ok"] = all(c["ok"] for c in doc["checks"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(table(doc))
    for c in doc["checks"]:
        if not c["ok"]:
            log(t0, f"CHECK FAILED: {c['name']}: {c['detail']}")
    log(t0, f"{'ok' if doc['ok'] else 'FAILED'}; results in {out}/results.json")
    return 0 if doc["ok"] else 1


def attach_large(run: Runner, cluster, work: str, args, t0: float) -> dict:
    """A store of ``--attach-size`` packed data, then attach of it on an empty cache."""
    img = os.path.join(work, "large.img")
    make_image(img, args.attach_b, 3)
    url = f"s3://bv-large-{uuid.uuid4().hex[:8]}/store"
    cluster.client().create_bucket(Bucket=url[5:].split("/")[0])
    cache_a, cache_b = os.path.join(work, "large-a"), os.path.join(work, "large-b")
    run("init", "large", "init", url, "--cache", cache_a, "--chunk-size", args.chunk_size)
    run("backup", "large", "backup", url, img, "--disk", "big", "--cache", cache_a, moved=args.attach_b)
    os.unlink(img)
    packed = stored_bytes(run, url, "--cache", cache_a)
    time.sleep(3.5)
    rec = run("attach", "large", "attach", url, "--cache", cache_b, "--take-over", "--json", moved=packed)
    return {"packed_bytes": packed, "attach_s": rec["wall_s"], "MiBps": rec.get("MiBps"),
            "peak_rss_bytes": rec["peak_rss_bytes"]}


def _step(doc, where, step):
    return next((s for s in doc["steps"] if s["where"] == where and s["step"] == step), None)


def _best(doc, where, step):
    """The faster of ``step`` and ``step#2``."""
    runs = [s for s in (_step(doc, where, step), _step(doc, where, step + "#2")) if s and s.get("MiBps")]
    return max(runs, key=lambda s: s["MiBps"], default=None)


def summary(doc: dict) -> dict:
    # the limit is the best the endpoint did in any of its runs (the harder comparison)
    runs = doc["limit"]["runs"]
    put, get = max(r["put_mib_s"] for r in runs), max(r["get_mib_s"] for r in runs)
    b, r = _step(doc, "s3", "backup"), _best(doc, "s3", "restore")
    s = {"put_limit_MiBps": put, "get_limit_MiBps": get,
         "backup_MiBps": b and b.get("uploaded_MiBps", b.get("MiBps")), "restore_MiBps": r and r.get("MiBps"),
         "restore_4_threads_MiBps": (_best(doc, "s3", "restore@4thr") or {}).get("MiBps"),
         "peak_rss_bytes": max(x["peak_rss_bytes"] for x in doc["steps"] if x["where"] != "large")}
    lb, lr = _step(doc, "local", "backup"), _step(doc, "local", "restore")
    s["restore_of_local"] = round(s["restore_MiBps"] / lr["MiBps"], 3) if s["restore_MiBps"] and lr else None
    s["backup_of_local"] = round(s["backup_MiBps"] / lb["MiBps"], 3) if s["backup_MiBps"] and lb else None
    s["backup_of_put"] = round(s["backup_MiBps"] / put, 3) if s["backup_MiBps"] else None
    s["restore_of_get"] = round(s["restore_MiBps"] / get, 3) if s["restore_MiBps"] else None
    return s


def table(doc: dict) -> str:
    lines = [f"{'step':14} {'local MiB/s':>12} {'local RSS':>10} {'S3 MiB/s':>10} {'S3 RSS':>8}"]
    for step in ("backup", "incremental", "restore", "restore@4thr", "restore#2", "restore@4thr#2", "attach", "restore@B", "copy", "restore@copy"):
        lo = _step(doc, "local", step)
        hi = _step(doc, "s3", step) or _step(doc, "local>s3", step)
        cell = lambda s, k: "-" if not s or s.get(k) is None else (  # noqa: E731
            f"{s[k] / MiB:.0f}M" if k == "peak_rss_bytes" else str(s[k]))
        lines.append(f"{step:14} {cell(lo, 'MiBps'):>12} {cell(lo, 'peak_rss_bytes'):>10} "
                     f"{cell(hi, 'MiBps'):>10} {cell(hi, 'peak_rss_bytes'):>8}")
    s = doc.get("summary")
    if s:
        for r in doc["limit"]["runs"]:
            lines.append(f"endpoint {r['object_bytes'] >> 20:>2} MiB objects x {r['threads']:>2} in flight: "
                         f"PUT {r['put_mib_s']:7.1f} MiB/s  GET {r['get_mib_s']:7.1f} MiB/s")
        lines.append(f"limit (best of those): PUT {s['put_limit_MiBps']} MiB/s, GET {s['get_limit_MiBps']} MiB/s")
        lines.append(f"backup (bytes uploaded) {s['backup_MiBps']} MiB/s = {s['backup_of_put']} of PUT; "
                     f"restore (best of 2) {s['restore_MiBps']} MiB/s = {s['restore_of_get']} of GET "
                     f"(with 4 threads: {s['restore_4_threads_MiBps']} MiB/s); "
                     f"peak RSS {s['peak_rss_bytes'] / MiB:.0f} MiB")
        lines.append(f"S3 / local: backup {s['backup_of_local']}, restore {s['restore_of_local']} "
                     "(a local restore is the ceiling of one from a bucket: the same decode and writes)")
    if doc.get("attach_large"):
        a = doc["attach_large"]
        lines.append(f"attach of {a['packed_bytes'] and a['packed_bytes'] / MiB:.0f} MiB packed: {a['attach_s']} s "
                     f"({a['MiBps']} MiB/s), peak RSS {a['peak_rss_bytes'] / MiB:.0f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
