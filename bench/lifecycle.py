"""python -m bench --lifecycle: two months of nights, then retention, against restic and borg.

    python -m bench --lifecycle --out DIR [--quick] [--nights 60 --disks 2 --size 1G
        --allocated 256M --change-share 0.03 --scale 4 --peers restic,borg]

Every night each disk (a `bench.workload` series, one seed per disk) changes a
few per cent and is backed up, dated that night, by blockvault (`backup --time`,
an incremental from the night's changed areas), restic (`backup --time`) and
borg (`create --timestamp`).  A second blockvault store gets the same nights
plus ballast disks (full backups of other images) until it is `--scale` times
the first store's size.  Then each tool applies `keep-daily 7 keep-weekly 4
keep-monthly 6` and gives the space back (blockvault forget --gc, restic forget
--prune, borg prune + compact), measured as one retention step.  Afterwards:
each tool's kept set against a model of its own semantics (bench/retention_models.py),
every point blockvault kept restored and compared with the night it was taken,
`verify` of both stores, and a fresh store holding only the kept points (the
restored images backed up again) whose size the gc'ed store is held against.

Writes DIR/lifecycle.json and DIR/lifecycle.md.  `--quick` is small enough for
CI and checks correctness only; no check ever looks at a speed (the targets are
reported, not enforced).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time

from bench.lifecycle_tools import BlockvaultLife, BorgLife, LifecycleTool, ResticLife, step_dict
from bench.lifecycle_report import check_results, markdown, targets
from bench.measure import fresh_dirs, log, rss_floor
from bench.retention_models import MODELS
from bench.units import format_size, parse_size
from bench.workload import Night, Workload, WorkloadConfig, scan_image

POLICY = {"daily": 7, "weekly": 4, "monthly": 6}
FULL = {"nights": 60, "disks": 2, "size": "512M", "allocated": "128M", "change_share": 0.03,
        "scale": 4.0, "start": "2026-09-01T02:00:00+00:00", "timeout": 3600.0}
QUICK = {"nights": 12, "disks": 2, "size": "32M", "allocated": "8M", "change_share": 0.05,
         "scale": 4.0, "start": "2026-10-24T02:00:00+00:00", "timeout": 300.0}
PEER_CLASSES = {"restic": ResticLife, "borg": BorgLife}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --lifecycle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for lifecycle.json and lifecycle.md")
    p.add_argument("--quick", action="store_true", help="tiny images, correctness only (CI)")
    p.add_argument("--nights", type=int, help=f"nights, one point per disk each (default {FULL['nights']})")
    p.add_argument("--disks", type=int, help=f"disks backed up every night (default {FULL['disks']})")
    p.add_argument("--size", help=f"apparent size of each disk (default {FULL['size']})")
    p.add_argument("--allocated", help=f"bytes written in each disk's T1 (default {FULL['allocated']})")
    p.add_argument("--change-share", type=float, help="share of allocated blocks changed per night (0.03)")
    p.add_argument("--scale", type=float, help="the second blockvault store is this many times the first (4)")
    p.add_argument("--start", help="date of night 1, ISO 8601 with offset (default %s)" % FULL["start"])
    p.add_argument("--peers", default="restic,borg", help="restic,borg or a subset, or none")
    p.add_argument("--seed", type=int, default=1, help="workload seed of disk 1 (disk k: seed + k - 1)")
    p.add_argument("--blockvault", default=None,
                   help="command that runs the blockvault CLI (default: this Python -m engine.cli)")
    p.add_argument("--work", help="folder for images and repositories (default OUT/work)")
    p.add_argument("--keep", action="store_true", help="keep images and repositories")
    p.add_argument("--timeout", type=float, help="seconds before one command is killed")
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.peer_names = [] if a.peers in ("", "none") else [s.strip() for s in a.peers.split(",") if s.strip()]
    bad = [n for n in a.peer_names if n not in PEER_CLASSES]
    if bad:
        p.error(f"unknown peers: {', '.join(bad)} (known: {', '.join(PEER_CLASSES)})")
    if a.nights < 1 or a.disks < 1 or a.scale < 1:
        p.error("--nights and --disks must be at least 1, --scale at least 1")
    try:
        a.size_b, a.allocated_b = parse_size(a.size), parse_size(a.allocated)
        a.start_t = _dt.datetime.fromisoformat(a.start).astimezone(_dt.timezone.utc)
    except ValueError as e:
        p.error(str(e))
    a.command = a.blockvault.split() if a.blockvault else [sys.executable, "-m", "engine.cli"]
    return a


def compile_tree() -> None:
    """Byte-compile the tree's blockvault, as tools/install.sh (and pip, for an ordinary
    install) does.  Where PYTHONDONTWRITEBYTECODE is set, an uncompiled tree would
    make every blockvault command compile its modules again (about 0.1 s of CPU):
    start-up is most of a forget + gc, and no installed blockvault pays it."""
    import compileall
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for pkg in ("chunkstore", "engine", "native"):
        compileall.compile_dir(os.path.join(root, pkg), quiet=1, workers=0)


def night_time(args: argparse.Namespace, n: int) -> _dt.datetime:
    return args.start_t + _dt.timedelta(days=n - 1)


def workload_config(args: argparse.Namespace, seed: int, allocated: int | None = None) -> WorkloadConfig:
    # No growth: a disk that grows by 1/16 every third night would be 3.4x its
    # size after 60 nights, and retention would be measured on a growing disk.
    return WorkloadConfig(size=args.size_b, allocated=allocated or args.allocated_b, seed=seed,
                          change_share=args.change_share, grow_every=0)


def add_ballast(store: BlockvaultLife, args: argparse.Namespace, work: str, target: int, t0: float) -> list[dict]:
    """Full backups of other images into `store` until it holds `target` bytes.
    Each ballast disk is its own chain with one point (the newest of a chain is
    always kept), so forget and gc have the same deletion to do as in the
    smaller store, in a store `--scale` times larger."""
    out = []
    when = night_time(args, args.nights)
    k = 0
    while store.stored() < target and k < 256:
        k += 1
        image = os.path.join(work, "ballast.img")
        # Half the disk written: fewer, larger ballast disks than the nightly ones.
        cfg = workload_config(args, seed=10_000 + args.seed + k, allocated=args.size_b // 2 // (64 << 10) * (64 << 10))
        with Workload(image, os.path.join(work, "ballast-cbt"), cfg) as wl:
            wl.create()
        m = store.full_backup(f"ballast{k}", image, when)
        out.append(step_dict("backup", m, disk=f"ballast{k}"))
        os.unlink(image)
        if not m.ok:
            log(t0, f"ballast backup failed: {m.error()}")
            break
    log(t0, f"{store.name}: {k} ballast disks, {format_size(store.stored())}")
    return out


def restore_and_refill(bv: BlockvaultLife, fresh: BlockvaultLife, kept: dict, wls: dict,
                       args: argparse.Namespace, work: str) -> list[dict]:
    """Restores every point blockvault kept, compares it with its night, and
    backs the restored image up into `fresh` (oldest first, dated as before)."""
    results = []
    nights = {night_time(args, n): n for n in range(1, args.nights + 1)}
    target = os.path.join(work, "restored.img")
    for disk in sorted(kept):
        if disk not in wls:
            continue
        for when in sorted(kept[disk]):
            n = nights.get(when)
            rec = {"disk": disk, "night": n, "identical": False}
            results.append(rec)
            if n is None:
                rec["error"] = f"a point at {when.isoformat()} matches no night"
                continue
            ids = [r for r in (bv.info.get("listed") or []) if r["disk"] == disk and r["time_utc"] == when]
            if not ids:
                rec["error"] = "not in list --json"
                continue
            if os.path.exists(target):
                os.unlink(target)
            m = bv.measured("restore", bv.repo, ids[0]["id"], target, "--json")
            rec["restore_ok"] = m.ok
            if not m.ok:
                rec["error"] = m.error()
                continue
            same, why = wls[disk].nights[n - 1].scan.same_content(scan_image(target))
            rec["identical"] = same
            if not same:
                rec["error"] = why
            f = fresh.full_backup(disk, target, when)
            rec["fresh_backup_ok"] = f.ok
            if not f.ok:
                rec["error"] = f.error()
            os.unlink(target)
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.blockvault is None:  # this tree's code (the default command)
        compile_tree()
    t0 = time.perf_counter()
    out, work = fresh_dirs(args.out, args.work)
    disks = [f"d{k}" for k in range(1, args.disks + 1)]
    bv = BlockvaultLife(os.path.join(work, "blockvault"), disks, command=args.command, timeout=args.timeout)
    big = BlockvaultLife(os.path.join(work, "blockvault-scaled"), disks, command=args.command,
                         timeout=args.timeout, name="blockvault-scaled")
    fresh = BlockvaultLife(os.path.join(work, "blockvault-fresh"), disks, command=args.command,
                           timeout=args.timeout, name="blockvault-fresh")
    peers: list[LifecycleTool] = [PEER_CLASSES[n](os.path.join(work, n), disks, timeout=args.timeout)
                                  for n in args.peer_names]
    nightly: list[LifecycleTool] = [bv, *peers]
    tools: list[LifecycleTool] = [bv, big, *peers]
    for t in nightly + [fresh]:
        ok = t.init()
        log(t0, f"{t.name} init: {'ok' if ok else 'FAILED: ' + str(t.steps[-1].get('error'))}")

    wls = {d: Workload(os.path.join(work, f"{d}.img"), os.path.join(work, f"cbt-{d}"),
                       workload_config(args, seed=args.seed + i)) for i, d in enumerate(disks)}
    doc: dict = {"schema": 1, "kind": "lifecycle", "quick": args.quick,
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": ["python", "-m", "bench", "--lifecycle", *argv],
                 "config": {"nights": args.nights, "disks": disks, "size": args.size_b,
                            "allocated": args.allocated_b, "change_share": args.change_share,
                            "scale": args.scale, "start": args.start_t.isoformat(), "policy": POLICY,
                            "peers": args.peer_names, "blockvault_command": args.command,
                            "rss_floor_bytes": rss_floor()},
                 "machine": {"cores": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
                 "nights": [], "tools": {}, "checks": [], "ok": False}
    retention: dict[str, dict] = {}
    kept: dict[str, dict] = {}
    final: dict[str, int] = {}
    restores: list[dict] = []
    try:
        for n in range(1, args.nights + 1):
            when = night_time(args, n)
            changed = 0
            for d, wl in wls.items():
                night: Night = wl.create() if n == 1 else wl.advance()
                changed += night.changed_bytes
                for t in nightly:
                    r = t.backup(d, night, wl.image, when)
                    if not r["ok"]:
                        log(t0, f"{t.name} backup {d} T{n} FAILED: {r['error']}")
            doc["nights"].append({"night": n, "time": when.isoformat(), "changed_bytes": changed})
            if n == 1 or n % 10 == 0 or n == args.nights:
                log(t0, f"T{n} {when.date()}: {format_size(changed)} changed; " + ", ".join(
                    f"{t.name} {format_size(t.stored())}" for t in nightly))
        # The larger store starts as a copy of blockvault's after the nights
        # (the same points, packs and counts: the same deletion to do); its
        # ballast is added once the peers' repositories are measured and gone,
        # so the run needs less scratch space at once.
        shutil.rmtree(big.root, ignore_errors=True)
        shutil.copytree(bv.root, big.root, symlinks=True)
        big.info["copy_of"] = bv.name
        before = bv.stored()

        def retain(t: LifecycleTool) -> None:
            retention[t.name] = r = t.retention(POLICY)
            log(t0, f"{t.name} retention ({' + '.join(r['commands'])}): "
                    f"{r['wall_s']:.2f}s {r['per_command']}, reclaimed {format_size(r['reclaimed_bytes'])}, "
                    f"peak RSS {format_size(r['peak_rss_bytes'])}" + ("" if r["ok"] else " FAILED"))

        for t in nightly:
            retain(t)
        kept.update({t.name: t.kept() for t in nightly})
        final.update({t.name: t.stored() for t in peers})
        if not args.keep:
            for t in peers:
                shutil.rmtree(t.root, ignore_errors=True)
        doc["ballast"] = add_ballast(big, args, work, int(args.scale * before), t0)
        # gc's --max-unused is a share of the store; the larger store gets the
        # same allowance in bytes, so both gc runs have the same work to do.
        big.gc_args = ["--max-unused", f"{0.05 * before / max(1, big.stored()):.6f}"]
        retain(big)
        kept[big.name] = big.kept()
        for t in (bv, big):
            listed = t.json_of("list", "list", t.repo, "--json") or {}
            t.info["listed"] = [{"id": r["id"], "disk": r["disk"], "time_utc": _dt.datetime.fromtimestamp(
                float(r["time"]), _dt.timezone.utc)} for r in listed.get("backups", [])]
            t.info["verify"] = t.json_of("verify", "verify", t.repo, "--json")
            t.info["stats"] = t.json_of("stats", "stats", t.repo, "--json")
        if not args.keep:
            shutil.rmtree(big.root, ignore_errors=True)
        restores = restore_and_refill(bv, fresh, kept.get(bv.name, {}), wls, args, work)
        log(t0, f"restored {sum(r['identical'] for r in restores)} of {len(restores)} kept points identical; "
                f"fresh store {format_size(fresh.stored())} against {format_size(bv.stored())}")
    finally:
        for wl in wls.values():
            wl.close()

    nights_of = {night_time(args, n): n for n in range(1, args.nights + 1)}
    points = [(n, night_time(args, n)) for n in range(1, args.nights + 1)]
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    doc["kept"] = {name: {d: sorted(nights_of.get(t, -1) for t in ts) for d, ts in sorted(k.items())}
                   for name, k in kept.items()}
    doc["expected"] = {name: sorted(f(points, POLICY)) for name, f in MODELS.items()}
    doc["retention"] = retention
    doc["restores"] = restores
    doc["fresh"] = {"stored_bytes": fresh.stored(), "steps": fresh.steps, "failed": fresh.failed}
    for t in tools:
        info = {k: v for k, v in t.info.items() if k != "listed"}
        doc["tools"][t.name] = {"version": t.version(), "ok": not t.failed, "backups": t.backups,
                                "steps": t.steps, "info": info, "stored_final": final.get(t.name, t.stored())}
    doc["checks"] = check_results(doc, args)
    doc["ok"] = all(c["ok"] for c in doc["checks"])
    doc["targets"] = targets(doc)
    with open(os.path.join(out, "lifecycle.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "lifecycle.md"), "w") as f:
        f.write(markdown(doc))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    for c in doc["checks"]:
        if not c["ok"]:
            log(t0, f"CHECK FAILED: {c['name']}: {c['detail']}")
    for name, tg in doc["targets"].items():
        log(t0, f"target {name}: {tg}")
    log(t0, f"{'ok' if doc['ok'] else 'FAILED'}: {sum(c['ok'] for c in doc['checks'])} of "
            f"{len(doc['checks'])} checks passed; results in {out}")
    return 0 if doc["ok"] else 1
