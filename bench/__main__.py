"""python -m bench: blockvault and its peers on one nightly disk-image series.

    python -m bench --out DIR [--quick] [--size 8G --allocated 2G --nights N
        --change-share 0.02 --pattern clustered|uniform
        --chunk-sizes 64K,256K,1M,4M --peers restic,borg,borg-fixed,tar-zstd]
    python -m bench --lifecycle --out DIR [--quick] ...   (retention: bench/lifecycle.py)

Writes DIR/results.json, DIR/report.md and DIR/*.png (see bench/README.md).
``python -m bench --s3`` is another: local against S3 (bench/s3.py).
``python -m bench --files`` is another bench: file-level restore (bench/files.py).
--quick runs tiny images for CI and checks correctness only: every restore
identical, the JSON complete, every tool ran; it exits non-zero on any
failure and never judges speed.  A full run applies the same checks.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata

from chunkstore.config import DEFAULT_COMPRESSION_LEVEL
from bench import report
from bench.blockvault_runner import Blockvault
from bench.limits import combine, limit_seconds, measure_limits
from bench.measure import STEP_FIELDS, ToolRunner, fresh_dirs, log, rss_floor
from bench.peers import PEERS, TarZstd
from bench.units import MiB, chunk_label, format_size, parse_size
from bench.workload import Night, Workload, WorkloadConfig

FULL = {"size": "8G", "allocated": "2G", "nights": 7, "change_share": 0.02,
        "pattern": "clustered", "chunk_sizes": "64K,256K,1M,4M",
        "peers": "restic,borg,borg-fixed,tar-zstd", "limits_sample": "256M"}
QUICK = {"size": "64M", "allocated": "16M", "nights": 4, "change_share": 0.05,
         "pattern": "clustered", "chunk_sizes": "64K,1M",
         "peers": "restic,borg,borg-fixed,tar-zstd", "limits_sample": "16M"}

# Fields every successful step must fill in; backups and restores also move bytes.
REQUIRED = ("wall_s", "cpu_user_s", "cpu_sys_s", "cpu_s", "peak_rss_bytes",
            "stored_bytes", "stored_bytes_added")
REQUIRED_IO = ("logical_bytes", "data_bytes", "nonzero_bytes", "logical_MBps", "data_MBps")


def default_blockvault_command() -> str:
    """The installed console script itself; peers are run as their binaries too.

    On a pyenv machine ``blockvault`` on PATH is a shell shim that costs
    about 50 ms per call, a quarter of an incremental backup's wall time.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "blockvault")
    return beside if os.access(beside, os.X_OK) else "blockvault"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json, report.md and plots")
    p.add_argument("--quick", action="store_true",
                   help="tiny images, correctness checks only (for CI, under 2 minutes)")
    p.add_argument("--size", help=f"apparent size of T1 (default {FULL['size']}, quick {QUICK['size']})")
    p.add_argument("--allocated", help=f"bytes written in T1 (default {FULL['allocated']})")
    p.add_argument("--nights", type=int, help=f"nights T1..Tn (default {FULL['nights']})")
    p.add_argument("--change-share", type=float, help="share of allocated data changed per night (0.02)")
    p.add_argument("--pattern", choices=["clustered", "uniform"], help="how nightly changes spread")
    p.add_argument("--chunk-sizes", help=f"blockvault chunk-size sweep (default {FULL['chunk_sizes']})")
    p.add_argument("--peers", help=f"comma list of {','.join(PEERS)} or 'none'")
    p.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    p.add_argument("--work", help="folder for the image and repositories (default OUT/work)")
    p.add_argument("--keep", action="store_true", help="keep the image and repositories")
    p.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL,
                   help="zstd level given to `blockvault init` and used for the limits (default: the store default, %(default)s)")
    p.add_argument("--digest", choices=["xxh3-128", "sha256"], help="blockvault store digest")
    p.add_argument("--blockvault", default=default_blockvault_command(),
                   help="command that runs the blockvault CLI (default: the console script beside this "
                        "Python, so a version manager's shim does not add its start-up to every step)")
    p.add_argument("--no-blockvault", action="store_true", help="peers only (while developing)")
    p.add_argument("--no-verify", action="store_true", help="skip the verify step of every tool")
    p.add_argument("--limits-sample", help="bytes of data the limits are measured on (256M)")
    p.add_argument("--timeout", type=float, help="seconds before one step is killed (quick 120, else 7200)")
    a = p.parse_args(argv)
    defaults = QUICK if a.quick else FULL
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.timeout is None:
        a.timeout = 120.0 if a.quick else 7200.0
    if a.nights < 1:
        p.error("--nights must be at least 1")
    a.peer_names = [] if a.peers in ("", "none") else [s.strip() for s in a.peers.split(",") if s.strip()]
    unknown = [n for n in a.peer_names if n not in PEERS]
    if unknown:
        p.error(f"unknown peers: {', '.join(unknown)} (known: {', '.join(PEERS)})")
    try:
        a.chunk_list = [parse_size(s) for s in a.chunk_sizes.split(",") if s.strip()]
        a.size_b, a.allocated_b = parse_size(a.size), parse_size(a.allocated)
        a.sample_b = parse_size(a.limits_sample)
    except ValueError as e:
        p.error(str(e))
    return a


def machine() -> dict:
    info = {"cores": os.cpu_count(), "kernel": platform.release(), "uname": " ".join(platform.uname()),
            "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def filesystem_of(path: str) -> str | None:
    try:
        r = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=30)
        return r.stdout.splitlines()[1].split()[1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def library_versions() -> dict:
    out = {}
    for mod in ("numpy", "zstandard", "xxhash", "matplotlib", "lmdb"):
        try:
            out[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            out[mod] = None
    try:
        import zstandard
        out["libzstd (python-zstandard)"] = zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION))
    except ImportError:
        pass
    return out


def repo_commit() -> str | None:
    """The commit of the checkout the bench runs from (read-only git call)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def warm(image: str) -> None:
    """Reads the whole image once, holes too, so that no tool pays for
    filling the page cache (the first tool of a night would otherwise)."""
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(image, "rb", buffering=0) as f:
        while f.readinto(view):
            pass


def expected_steps(tool: ToolRunner, nights: int, restore_nights: list[int], verify: bool) -> list[tuple]:
    steps = [("init", None)] + [("backup", n) for n in range(1, nights + 1)]
    if tool.kind == "blockvault":
        steps.append(("list", None))
    steps += [("restore", n) for n in restore_nights]
    if verify:
        steps.append(("verify", None))
    if tool.kind == "blockvault":
        steps.append(("stats", None))
    return steps


def check_results(doc: dict, tools: list[ToolRunner], args: argparse.Namespace,
                  restore_nights: list[int]) -> list[dict]:
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    for tool in tools:
        res = doc["tools"][tool.name]
        by_key = {(s["step"], s["night"]): s for s in res["steps"]}
        want = expected_steps(tool, args.nights, restore_nights, not args.no_verify)
        missing = [f"{s}{'' if n is None else f' T{n}'}" for s, n in want if (s, n) not in by_key]
        check(f"{tool.name}: every step present", not missing, ", ".join(missing))
        failed = [f"{s['step']}{'' if s['night'] is None else ' T%d' % s['night']}: {s['error']}"
                  for s in res["steps"] if not s["ok"]]
        check(f"{tool.name}: every step succeeded", not failed, "; ".join(failed)[:2000])
        incomplete = []
        for s in res["steps"]:
            if not s["ok"]:
                continue
            need = REQUIRED + (REQUIRED_IO if s["step"] in ("backup", "restore") else ())
            gaps = [k for k in need if s.get(k) is None]
            if gaps:
                incomplete.append(f"{s['step']} {s['night']}: {', '.join(gaps)}")
        check(f"{tool.name}: every figure recorded", not incomplete, "; ".join(incomplete))
        restores = [s for s in res["steps"] if s["step"] == "restore"]
        bad = [f"T{s['night']}" for s in restores if s.get("identical") is not True]
        check(f"{tool.name}: restores identical", restores and not bad,
              ("not identical or not checked: " + ", ".join(bad)) if bad else
              ", ".join(f"T{s['night']}" for s in restores))
        check(f"{tool.name}: version known", bool(res.get("version")), str(res.get("version")))
    check("machine described", all(doc["machine"].get(k) for k in ("cores", "memory_bytes", "kernel")))
    lim = doc.get("limits") or {}
    check("limits measured", "zstd_compress_MBps" in lim and all(
        str(size) in (lim.get("zstd_compress_by_chunk_MBps") or {}) for size in args.chunk_list))
    check("every night generated", len(doc["workload"]["nights"]) == args.nights)
    if not args.no_blockvault:
        check("blockvault ran", any(t.kind == "blockvault" for t in tools))
    return checks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--rollback" in argv:  # the rollback bench (bench/rollback.py) takes the rest of the options
        from bench import rollback
        return rollback.main([a for a in argv if a != "--rollback"])
    if "--files" in argv:  # file-level restore against a full restore: bench/files.py
        from bench import files
        return files.main([a for a in argv if a != "--files"])
    if "--s3" in argv:  # local against Ceph RGW, with the endpoint's own limit: bench/s3.py
        from bench import s3
        return s3.main([a for a in argv if a != "--s3"])
    if "--encryption" in argv:  # encrypted against plaintext stores and peers: bench/encryption.py
        from bench import encryption
        return encryption.main([a for a in argv if a != "--encryption"])
    if "--lifecycle" in argv:  # its own run and options: bench/lifecycle.py
        from bench import lifecycle
        return lifecycle.main([a for a in argv if a != "--lifecycle"])
    args = parse_args(argv)
    t0 = time.perf_counter()
    out, work = fresh_dirs(args.out, args.work)
    image = os.path.join(work, "disk.img")
    nights = args.nights
    restore_nights = sorted({1, nights})

    cfg = WorkloadConfig(size=args.size_b, allocated=args.allocated_b, seed=args.seed,
                         change_share=args.change_share, pattern=args.pattern)

    tools: list[ToolRunner] = []
    if not args.no_blockvault:
        for cs in args.chunk_list:
            tools.append(Blockvault(os.path.join(work, "blockvault", chunk_label(cs)), cs,
                                    command=args.blockvault.split(), digest=args.digest,
                                    compression_level=args.compression_level, timeout=args.timeout))
    for name in args.peer_names:
        cls = PEERS[name]
        kw = {"keep": set(restore_nights)} if cls is TarZstd else {}
        tools.append(cls(os.path.join(work, "peers", name), timeout=args.timeout, **kw))

    doc: dict = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "config": {"nights": nights, "restore_nights": restore_nights,
                   "chunk_sizes": args.chunk_list, "peers": args.peer_names,
                   "compression_level": args.compression_level, "digest": args.digest or "default",
                   "blockvault_command": args.blockvault, "verify": not args.no_verify,
                   "timeout_s": args.timeout, "work_filesystem": filesystem_of(work),
                   "rss_floor_bytes": rss_floor()},
        "machine": machine(),
        "versions": {},
        "workload": {"config": cfg.describe(), "nights": []},
        "limits": None,
        "tools": {},
        "step_fields": list(STEP_FIELDS),
        "checks": [],
        "ok": False,
    }

    log(t0, f"{len(tools)} tools: {', '.join(t.name for t in tools)}; work in {work}")
    load = os.getloadavg()
    doc["machine"]["loadavg_start"] = list(load)
    if load[0] > 0.5 and not args.quick:
        log(t0, f"warning: load average {load[0]:.2f} before the run: figures will be noisy")
    for tool in tools:
        rec = tool.init()
        log(t0, f"{tool.name} init: {'ok' if rec.ok else 'FAILED: ' + str(rec.error)}")

    wl = Workload(image, os.path.join(work, "cbt"), cfg)
    limit_passes: list[dict] = []
    min_seconds = 0.05 if args.quick else 0.5
    try:
        for n in range(1, nights + 1):
            night: Night = wl.create() if n == 1 else wl.advance()
            warm(image)
            s = night.summary()
            doc["workload"]["nights"].append(s)
            log(t0, f"T{n}: {format_size(night.size)} apparent, {format_size(s['allocated_bytes'])} allocated, "
                    f"{format_size(s['changed_bytes'])} changed, generated in {s['generate_seconds']:.1f}s")
            if n == 1:
                limit_passes.append(measure_limits(image, night.scan, args.compression_level, work,
                                                   sample_bytes=args.sample_b, min_seconds=min_seconds,
                                                   chunk_sizes=args.chunk_list))
                log(t0, "limits: " + json.dumps({k: v for k, v in limit_passes[0].items() if k.endswith("MBps")}))
            for tool in tools:
                rec = tool.backup(night, image, nights)
                log(t0, f"{tool.name} backup T{n} ({rec.mode}): " + (
                    f"{rec.wall_s:.2f}s, {rec.logical_MBps or 0:.0f} MB/s logical, "
                    f"+{format_size(rec.stored_bytes_added)}" if rec.ok else f"FAILED: {rec.error}"))
        for tool in tools:
            if isinstance(tool, Blockvault):
                rec = tool.list_backups()
                log(t0, f"{tool.name} list: {'ok' if rec.ok else 'FAILED: ' + str(rec.error)}")
        for n in restore_nights:
            for tool in tools:
                rec = tool.restore(wl.nights[n - 1], os.path.join(work, "restore", tool.name))
                log(t0, f"{tool.name} restore T{n}: " + (
                    f"{rec.wall_s:.2f}s, identical" if rec.ok else f"FAILED: {rec.error}"))
        if not args.no_verify:
            for tool in tools:
                rec = tool.verify()
                if rec is not None:
                    log(t0, f"{tool.name} verify: " + (f"{rec.wall_s:.2f}s" if rec.ok else f"FAILED: {rec.error}"))
        for tool in tools:
            tool.finish()
        limit_passes.append(measure_limits(image, wl.nights[-1].scan, args.compression_level, work,
                                           sample_bytes=args.sample_b, min_seconds=min_seconds,
                                           chunk_sizes=args.chunk_list))
        log(t0, "limits again: " + json.dumps({k: v for k, v in limit_passes[-1].items() if k.endswith("MBps")}))
    finally:
        wl.close()
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    doc["limits"] = combine(limit_passes)
    doc["limits_passes"] = limit_passes

    digest = args.digest or "xxh3-128"
    for tool in tools:
        unique = (tool.info.get("stats") or {}).get("unique_bytes") if tool.kind == "blockvault" else None
        for rec in tool.steps:
            if rec.ok and rec.step == "verify" and isinstance(unique, int):
                rec.nonzero_bytes = unique  # what verify must decompress and hash
            if rec.ok and rec.step in ("backup", "restore", "verify"):
                # blockvault says which chunks it had to compress (new_bytes);
                # the peers do not, so they are held to all non-zero bytes.
                said = rec.extra.get("tool_report") if tool.kind == "blockvault" else None
                must_compress = said.get("new_bytes") if isinstance(said, dict) else None
                lim = limit_seconds(doc["limits"], rec.step, rec.data_bytes, rec.nonzero_bytes, digest,
                                    compress_bytes=must_compress, chunk_size=getattr(tool, "chunk_size", None))
                rec.limit_s = lim
                rec.fraction_of_limit = lim / rec.wall_s if lim is not None and rec.wall_s else None
        doc["tools"][tool.name] = tool.results()
        doc["versions"][tool.name] = doc["tools"][tool.name]["version"]
    doc["versions"]["blockvault_commit"] = repo_commit()
    doc["versions"].update(library_versions())
    doc["versions"]["python"] = sys.version.split()[0]

    doc["checks"] = check_results(doc, tools, args, restore_nights)
    doc["ok"] = all(c["ok"] for c in doc["checks"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=float)
    try:
        doc["plots"] = report.plots(doc, out)
    except ImportError as e:
        doc["plots"] = []
        log(t0, f"no plots: {e} (run bench/setup.sh)")
        if not args.quick:
            doc["checks"].append({"name": "plots drawn", "ok": False, "detail": str(e)})
            doc["ok"] = False
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=float)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report.markdown(doc))

    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    for c in doc["checks"]:
        if not c["ok"]:
            log(t0, f"CHECK FAILED: {c['name']}: {c['detail']}")
    log(t0, f"{'ok' if doc['ok'] else 'FAILED'}: {sum(c['ok'] for c in doc['checks'])} of "
            f"{len(doc['checks'])} checks passed; results in {out}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
