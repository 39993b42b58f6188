"""``gc``: space back from what forget and delete made dead (chunkstore/gc.py),
while backups keep running."""

from __future__ import annotations

import time

from engine import argtypes, clilog
from engine.cli.common import count, open_repo, progress_for, seconds, add_store_arg
from engine.commandline import EXIT_OK, add_command, emit
from engine.progress import human_bytes

EXAMPLES = """blockvault gc /backup/store
  blockvault gc /backup/store --dry-run              # what it would delete and repack
  blockvault gc /backup/store --max-unused 10% --max-repack 20G --json"""


def cmd_gc(args) -> int:
    from chunkstore.gc import collect
    started = time.monotonic()
    with progress_for(args, "gc", finishing="unlinking") as progress, open_repo(args) as repo:
        report = collect(repo.store, max_unused=args.max_unused, max_repack=args.max_repack, dry_run=args.dry_run,
                         wait=args.wait, on_total=progress.set_total, on_progress=progress.advance)
        progress.finish()
    doc = report.as_dict()
    freed = doc["stored_bytes_before"] - doc["stored_bytes_after"]
    verb = "would free" if report.dry_run else "freed"
    lines = []
    locked = {p["id"]: p["until_utc"] for p in doc["locked_packs"]}
    for a in doc["deleted_packs"]:
        if a["id"] in locked:
            lines.append(f"doomed pack {a['id']} ({human_bytes(a['size'])}, all dead): locked until "
                         f"{locked[a['id']]}")
            continue
        lines.append(f"{'would delete' if report.dry_run else 'deleted'} pack {a['id']} "
                     f"({human_bytes(a['size'])}, all dead)")
    for a in doc["repacked_packs"]:
        lines.append(f"{'would repack' if report.dry_run else 'repacked'} pack {a['id']} "
                     f"({human_bytes(a['size'])}: {human_bytes(a['dead_bytes'])} dead, "
                     f"{human_bytes(a['live_bytes'])} copied)")
    for p in doc["kept_packs"]:
        lines.append(f"kept pack {p}: a chunk in it was referenced again meanwhile")
    for s in doc["skipped"]:
        lines.append(f"SKIPPED pack {s} (run 'blockvault verify')")
    if locked:
        told = {a["id"] for a in doc["deleted_packs"]}
        lines += [f"doomed pack {p}: locked until {until}" for p, until in locked.items() if p not in told]
        lines.append(f"{count(len(locked), 'pack')} stay in the bucket under object lock (COMPLIANCE) until "
                     f"{max(locked.values())} at the latest: their space comes back at the first gc after "
                     "their lock ends")
    if doc["waiting_packs"]:
        lines.append(f"{count(len(doc['waiting_packs']), 'pack')} left for a later gc: a reader that began before "
                     "they were replaced is still running")
    if doc["pinned_chunks"]:
        lines.append(f"{count(doc['pinned_chunks'], 'dead chunk')} kept: a session that began before they died "
                     "is still running")
    if doc["leftover_packs"] or doc["orphans_killed"]:
        lines.append(f"reclaimed what {count(len(doc['reaped_sessions']), 'killed session')} left: "
                     f"{count(len(doc['leftover_packs']), 'pack')}, {count(doc['orphans_killed'], 'chunk')}")
    lines.append(f"{verb} {human_bytes(freed)}; dead bytes {human_bytes(doc['dead_bytes_before'])} -> "
                 f"{human_bytes(doc['dead_bytes_after'])} of {human_bytes(doc['stored_bytes_after'])} stored "
                 f"(--max-unused allows {human_bytes(doc['max_unused_bytes'])})")
    clilog.summary(f"gc {repo.path}: {verb} {human_bytes(freed)} ({count(len(doc['deleted_packs']), 'pack')} "
                   f"deleted, {len(doc['repacked_packs'])} repacked), {seconds(time.monotonic() - started)}")
    emit(args, doc, "\n".join(lines))
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "gc", cmd_gc, "reclaim the space of dead chunks (beside running backups)", EXAMPLES)
    add_store_arg(sp)
    sp.add_argument("--max-unused", type=argtypes.unused_share, default=0.05, metavar="SHARE",
                    help="repack packs while dead bytes exceed this share of the stored bytes (default 5%%; "
                         "packs holding nothing live are always deleted)")
    sp.add_argument("--max-repack", type=argtypes.byte_size, default=None, metavar="BYTES",
                    help="rewrite at most this many bytes of packs in one run, e.g. 10G (default: no limit)")
    sp.add_argument("--dry-run", action="store_true", help="say what would be deleted and repacked; change nothing")
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for the store's writer lock (inf: as long as it takes)")
