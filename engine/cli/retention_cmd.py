"""``protect``, ``unprotect``, ``note``, ``delete`` and ``forget``: a point's
flags, and removing points (engine/pointflags.py, engine/forget.py)."""

from __future__ import annotations

from engine import argtypes, clilog
from engine.cli.common import open_repo, add_store_arg
from engine.commandline import EXIT_OK, add_command, emit


def _kind(args) -> str | None:
    from engine.points import DISK, VM
    return VM if getattr(args, "vm_ids", False) else DISK if getattr(args, "disk_ids", False) else None


def _flag_doc(rec) -> dict:
    return {"id": rec.id, "protected": rec.protected, "note": rec.note}


def cmd_protect(args) -> int:
    from engine.pointflags import update_point
    protect = args.command == "protect"
    with open_repo(args) as repo:
        rec = update_point(repo, args.id, _kind(args), args.wait, protected=protect)
    clilog.summary(f"{rec.id} {'protected: forget and delete leave it' if protect else 'no longer protected'}")
    emit(args, {"point": _flag_doc(rec)}, rec.id)
    return EXIT_OK


def cmd_note(args) -> int:
    from engine.errors import UsageError
    from engine.pointflags import check_note, update_point
    if args.clear == (args.text is not None):
        raise UsageError("give either a TEXT or --clear")
    text = "" if args.clear else check_note(args.text)
    with open_repo(args) as repo:
        rec = update_point(repo, args.id, _kind(args), args.wait, note=text)
    clilog.summary(f"{rec.id}: note {'removed' if args.clear else 'set'}")
    emit(args, {"point": _flag_doc(rec)}, rec.id)
    return EXIT_OK


def _freed(n) -> str:
    from engine.progress import human_bytes
    return "-" if n is None else human_bytes(n)


def _removal_doc(removal) -> dict:
    return {"removed": removal.ids, "removed_disk_backups": [r.id for r in removal.disk_backups],
            "freed_bytes": removal.freed_bytes}


def cmd_delete(args) -> int:
    from engine.forget import delete_points
    with open_repo(args) as repo:
        removal = delete_points(repo, args.ids, _kind(args), args.wait, args.allow_remove_newest,
                                dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    extra = len(removal.disk_backups) - sum(1 for p in removal.points if p.kind == "disk")
    with_disks = f" (with {extra} disk backup{'s' if extra != 1 else ''} of VM backups)" if extra else ""
    text = f"{verb} {', '.join(removal.ids)}{with_disks}; frees {_freed(removal.freed_bytes)}"
    if not args.dry_run:
        clilog.summary(text + " once gc runs" if removal.freed_bytes else text)
    emit(args, {"dry_run": args.dry_run, **_removal_doc(removal)}, text if args.dry_run else "\n".join(removal.ids))
    return EXIT_OK


def _policy(args):
    from engine.retention import Policy, Within
    within = Within.parse(args.keep_within) if args.keep_within is not None else None
    policy = Policy(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly, args.keep_monthly,
                    args.keep_yearly, within)
    if policy.empty:
        from engine.errors import UsageError
        raise UsageError("an empty retention policy is refused (it is not read as 'keep everything'): give at "
                         "least one of --keep-last/-hourly/-daily/-weekly/-monthly/-yearly N or --keep-within D")
    return policy


def cmd_forget(args) -> int:
    from engine.errors import UsageError
    from engine.forget import forget
    from engine.timezones import shown, zone_or_host
    policy = _policy(args)
    if not (args.disk or args.vm or args.all):
        raise UsageError("say what to forget in: --disk NAME, --vm NAME or --all (every disk and VM)")
    if not args.gc and (args.max_unused is not None or args.max_repack is not None):
        raise UsageError("--max-unused and --max-repack are gc's options: give them with --gc "
                         "(or run 'blockvault gc' after forget)")
    tz = zone_or_host(args.tz)
    gc_doc = None
    with open_repo(args) as repo:
        result = forget(repo, policy, tz, args.disk, args.vm, args.wait, args.allow_remove_newest, args.dry_run)
        removal = result.removal
        if args.gc and removal.points and not args.dry_run:
            gc_doc = _gc_after(repo, args)
    total = sum(len(g.decisions) for g in result.groups)
    removed = len(removal.points)
    verb = "would remove" if args.dry_run else "removed"
    footer = (f"{verb} {removed} of {total} point{'s' if total != 1 else ''} in {len(result.groups)} "
              f"group{'s' if len(result.groups) != 1 else ''}, freeing {_freed(removal.freed_bytes)}; "
              f"times and buckets in {tz.key}; policy {policy.options()}")
    if args.json:
        groups = [{"kind": g.kind, "name": g.name,
                   "points": [{"id": d.id, "time": d.time, "keep": d.keep, "reason": d.reason, "rule": d.rule,
                               "bucket": d.bucket} for d in g.decisions]} for g in result.groups]
        emit(args, {"dry_run": args.dry_run, "zone": tz.key, "policy": policy.as_dict(), "groups": groups,
                    "kept": total - removed, **_removal_doc(removal),
                    **({"gc": gc_doc} if gc_doc is not None else {})}, "")
    else:
        from engine.commandline import print_table
        rows = [("GROUP", "ID", f"TIME ({tz.key})", "ACTION", "REASON")]
        for g in result.groups:
            for d in g.decisions:
                rows.append((f"{g.kind} {g.name}", d.id, shown(d.time, tz), "keep" if d.keep else "remove",
                             d.reason))
        if len(rows) > 1:
            print_table(rows)
        from engine.commandline import printable
        print(printable(footer))
        if gc_doc is not None:
            print(printable(_gc_line(gc_doc)))
    if not args.dry_run:
        clilog.summary(f"forget: {footer}")
        if gc_doc is not None:
            clilog.summary(f"forget --gc: {_gc_line(gc_doc)}")
    return EXIT_OK


def _gc_after(repo, args) -> dict:
    """forget --gc: the space back at once, as 'blockvault gc' with the same --wait would.

    It runs after forget's transaction has committed, as a writer of its own, so a
    failing gc (ENOSPC) leaves forget's removal done and the store consistent."""
    from chunkstore.gc import DEFAULT_MAX_UNUSED, collect
    max_unused = DEFAULT_MAX_UNUSED if args.max_unused is None else args.max_unused
    return collect(repo.store, max_unused=max_unused, max_repack=args.max_repack, wait=args.wait).as_dict()


def _gc_line(doc: dict) -> str:
    from engine.progress import human_bytes
    freed = doc["stored_bytes_before"] - doc["stored_bytes_after"]
    return (f"gc freed {human_bytes(freed)}: {len(doc['deleted_packs'])} packs deleted, "
            f"{len(doc['repacked_packs'])} repacked into {len(doc['new_packs'])}; dead bytes "
            f"{human_bytes(doc['dead_bytes_before'])} -> {human_bytes(doc['dead_bytes_after'])}")


def _which(sp) -> None:
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--disk", dest="disk_ids", action="store_true",
                   help="the ids are disk backups (needed only when a disk and a VM share the name)")
    g.add_argument("--vm", dest="vm_ids", action="store_true", help="the ids are VM backups (VM@N)")


def _wait(sp) -> None:
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another writer of the store, inf: as long as it takes "
                         "(default: fail at once)")


def _removal_options(sp) -> None:
    sp.add_argument("--allow-remove-newest", action="store_true",
                    help="also remove the newest point of a chain (the base of its next incremental)")
    sp.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")
    _wait(sp)


def register(sub) -> None:
    for name, text, example in (
            ("protect", "protect a point: forget never removes it, delete refuses it",
             "blockvault protect /backup/store db01@12\n  blockvault protect /backup/store web01@3 --vm"),
            ("unprotect", "let forget and delete remove a point again",
             "blockvault unprotect /backup/store db01@12")):
        sp = add_command(sub, name, cmd_protect, text, example)
        add_store_arg(sp)
        sp.add_argument("id", metavar="ID", help="DISK@N or VM@N (also @latest, @-1, @YYYY-MM-DD)")
        _which(sp)
        _wait(sp)
    sp = add_command(sub, "note", cmd_note, "attach a note to a point (shown by list), or remove it",
                     "blockvault note /backup/store db01@12 'before the upgrade to PostgreSQL 17'\n"
                     "  blockvault note /backup/store db01@12 --clear")
    add_store_arg(sp)
    sp.add_argument("id", metavar="ID", help="DISK@N or VM@N (also @latest, @-1, @YYYY-MM-DD)")
    sp.add_argument("text", metavar="TEXT", nargs="?",
                    help="one line of printable text, at most 1000 characters (no control characters)")
    sp.add_argument("--clear", action="store_true", help="remove the point's note")
    _which(sp)
    _wait(sp)

    sp = add_command(sub, "delete", cmd_delete, "remove points by id (a VM backup with its disk backups)",
                     "blockvault delete /backup/store db01@3 db01@4\n"
                     "  blockvault delete /backup/store web01@2 --vm --dry-run")
    add_store_arg(sp)
    sp.add_argument("ids", metavar="ID", nargs="+", help="DISK@N or VM@N (also @-1, @YYYY-MM-DD)")
    _which(sp)
    _removal_options(sp)

    sp = add_command(sub, "forget", cmd_forget,
                     "remove the points a retention policy does not keep (Proxmox Backup Server's rules)",
                     "blockvault forget /backup/store --all --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run\n"
                     "  blockvault forget /backup/store --disk db01 --keep-last 3 --keep-within 2d --tz Europe/Berlin\n"
                     "  blockvault forget /backup/store --vm web01 --keep-daily 14 --json\n"
                     "  blockvault forget /backup/store --all --keep-daily 7 --gc --max-unused 10%")
    sp.description = (
        "Each disk's chain and each VM's chain is one group.  Rules run in the order last, hourly, daily, "
        "weekly (ISO week), monthly, yearly; each keeps the newest point of each bucket that no earlier rule "
        "kept a point in, one of its count per bucket, and removes the other points of a bucket it kept; "
        "what no rule keeps is removed.  --keep-within runs first.  Protected points and the newest point "
        "of each chain are always kept.  An empty policy is refused.  Exit codes: 0 done (also when nothing "
        "was to be removed), 1 error, 2 usage (an empty policy), 4 another writer holds the store.")
    add_store_arg(sp)
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--disk", help="only this disk's chain")
    which.add_argument("--vm", help="only this VM's chain")
    which.add_argument("--all", action="store_true", help="every disk's and every VM's chain")
    for rule, what in (("last", "points"), ("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"),
                       ("monthly", "months"), ("yearly", "years")):
        sp.add_argument(f"--keep-{rule}", type=argtypes.count, default=0, metavar="N",
                        help="keep the newest N points" if rule == "last" else
                        f"keep the newest point of each of the newest N {what} that have a point")
    sp.add_argument("--keep-within", metavar="DURATION",
                    help="keep every point newer than the group's newest minus DURATION (restic's: y, m = "
                         "months, d, h, e.g. 2d, 36h, 1y6m)")
    sp.add_argument("--tz", metavar="ZONE",
                    help="IANA time zone of the buckets (which day is a point of), e.g. Europe/Berlin "
                         "(default: the host's zone, from TZ or /etc/localtime)")
    sp.add_argument("--gc", action="store_true",
                    help="run gc right after, when forget removed something (with the same --wait)")
    sp.add_argument("--max-unused", type=argtypes.unused_share, default=None, metavar="SHARE",
                    help="with --gc: gc's --max-unused (default 5%%)")
    sp.add_argument("--max-repack", type=argtypes.byte_size, default=None, metavar="BYTES",
                    help="with --gc: gc's --max-repack (default: no limit)")
    _removal_options(sp)
