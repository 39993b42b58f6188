"""The ``blockvault`` command line.

Exit codes: 0 success; 1 an error, explained on stderr; 2 a usage error;
3 verify found damage; 4 the store is held by another writer; 128 + the
signal's number when stopped by SIGINT (130), SIGTERM (143) or SIGHUP (129)
(engine/signals.py).  stdout carries data only (a backup id, tables, or with
``--json`` one JSON document, also on failure: docs/JSON.md); stderr the
progress line (on a terminal, never with ``--json``), the one-line summary of
each backup, restore and verify, warnings and errors (engine/clilog.py).
Every failure goes through ``fail``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time

# numpy (restore, verify) only does array bookkeeping here; without this its
# OpenBLAS starts a thread per core that spins at import (perf: 1.4% of a
# restore).  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import lmdb  # noqa: E402

from chunkstore import StoreError  # noqa: E402
from chunkstore.config import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, DIGEST_KINDS  # noqa: E402
from engine import argtypes, clilog, signals, swapped  # noqa: E402
from engine.commandline import (EXIT_DAMAGED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_LOCKED,  # noqa: E402,F401
                                EXIT_OK, EXIT_USAGE, CommandLineError, Parser, add_command, common_options,
                                describe_failure, emit, print_table, printable, report_failure)
from engine.progress import Progress, human_bytes  # noqa: E402
from engine.vsphere.cli import register as register_vsphere  # noqa: E402

EPILOG = """\
examples:
  blockvault init /backup/store
  blockvault backup /backup/store disk.img --disk web01-disk0
  blockvault backup /backup/store disk.img --disk web01-disk0 --mode incremental --changed-areas cbt.json
  blockvault list /backup/store --disk web01-disk0
  blockvault restore /backup/store web01-disk0@latest /restore/disk.img
  blockvault verify /backup/store --json
  blockvault rebuild /backup/store     # index lost or damaged: recreate it from the packs
  blockvault demo                      # try it all on a generated sparse image

output: data (a backup id, tables, --json documents) on stdout; a one-line summary of each
backup, restore and verify, warnings and errors on stderr (-q: warnings and errors only).

exit codes: 0 ok, 1 error, 2 usage, 3 verify found damage, 4 store busy,
  130 interrupted (SIGINT), 143 terminated (SIGTERM), 129 hung up (SIGHUP)
"""


def _progress(args, label: str, finishing: str = "syncing") -> Progress:
    return Progress(label, enabled=False if (args.json or args.quiet) else None, finishing=finishing)


def _open(args):
    from engine.repository import Repository
    return Repository.open(args.store)


def _seconds(t: float) -> str:
    return f"{t:.1f} s"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def version() -> str:
    """The installed distribution's version, else the one in pyproject.toml beside the code."""
    from importlib import metadata
    try:
        return metadata.version("blockvault")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "pyproject.toml"), "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


# -- commands -------------------------------------------------------------------


def cmd_init(args) -> int:
    from engine.repository import Repository
    repo = Repository.init(args.store, chunk_size=args.chunk_size, digest=args.digest,
                           compression_level=args.compression_level)
    with repo:
        cfg = repo.store.config
        doc = {"store": args.store, "chunk_size": cfg.chunk_size, "digest": cfg.digest,
               "compression_level": cfg.compression_level, "format_version": cfg.version}
        emit(args, doc, f"initialised store {args.store} (chunk size {human_bytes(cfg.chunk_size)}, "
                         f"digest {cfg.digest}, zstd level {cfg.compression_level})")
    return EXIT_OK


def cmd_backup(args) -> int:
    from engine.backup import backup_image
    swapped.check_backup(args.store, args.source, args.disk)
    with _progress(args, f"backup {args.disk}") as progress, _open(args) as repo:
        rec = backup_image(repo, args.source, args.disk, args.mode, args.changed_areas, args.change_id,
                           wait=args.wait, workers=args.threads, credentials_file=args.credentials,
                           on_progress=progress.advance, on_plan=progress.set_total,
                           allow_external_extents=args.allow_external_extents)
        progress.finish()
    doc = rec.summary()
    doc.setdefault("warnings", [])
    st = rec.stats
    clilog.summary(
        f"backup {rec.id} {rec.kind}: read {human_bytes(st['bytes_read'])}, stored "
        f"{human_bytes(st['stored_bytes'])} ({_count(st['new_chunks'], 'new chunk')}), "
        f"{_count(len(doc['warnings']), 'warning')}, {_seconds(st['duration'])}",
        [f"source {rec.metadata.get('source', {}).get('path')}, base {rec.base or '-'}, "
         f"disk {human_bytes(rec.size)}",
         f"{st['chunks_read']} chunks read: {st['new_chunks']} new, {st['dedup_chunks']} deduplicated, "
         f"{st['zero_chunks']} zero; changed areas {'used' if st.get('changed_areas') else 'not used'}"])
    emit(args, doc, rec.id)
    return EXIT_OK


def _warn_bad_records(bad: list[dict]) -> None:
    """Damaged catalog records are skipped by list and stats, and said so."""
    for b in bad:
        logging.getLogger("blockvault.catalog").warning(f"{b['reason']}; skipped (run 'blockvault verify')")


def cmd_list(args) -> int:
    bad: list = []
    with _open(args) as repo, repo.store.read_txn() as txn:
        if args.disk:
            records = list(repo.catalog.for_disk(txn, args.disk, bad=bad))
        else:
            records = list(repo.catalog.all(txn, bad=bad))
    bad = [b.as_dict() for b in bad]
    _warn_bad_records(bad)
    if args.json:
        emit(args, {"backups": [r.summary() for r in records], "bad_records": bad}, "")
        return EXIT_OK
    if not records:
        print(printable("no backups" + (f" of disk {args.disk}" if args.disk else "")))
        return EXIT_OK
    rows = [("ID", "TIME", "KIND", "BASE", "SIZE", "READ", "STORED", "SECONDS")]
    for r in records:
        st = r.stats
        rows.append((r.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)), r.kind, r.base or "-",
                     human_bytes(r.size), human_bytes(st.get("bytes_read", 0)),
                     human_bytes(st.get("stored_bytes", 0)), f"{st.get('duration', 0):.2f}"))
    print_table(rows)
    return EXIT_OK


def cmd_restore(args) -> int:
    from engine.restore import make_target, restore_backup
    started = time.monotonic()
    swapped.check_restore(args.store, args.backup, args.target)
    target = make_target(args.target, args.force, args.format, args.credentials, args.zeroed_target,
                         mode=args.mode)
    with _progress(args, f"restore {args.backup}") as progress, _open(args) as repo:
        result = restore_backup(repo, args.backup, target, workers=args.threads,
                                on_start=lambda rec, total: progress.set_total(total),
                                on_progress=progress.advance)
        progress.finish()
    for text in result.warnings:
        logging.getLogger("blockvault.restore").warning(text)
    doc = {"id": result.record.id, "target": result.target, "size": result.record.size,
           "bytes_written": result.bytes_written, "chunks_written": result.chunks_written,
           "chunks_read": result.chunks_read, "warnings": result.warnings}
    clilog.summary(
        f"restore {result.record.id} to {result.target}: {human_bytes(result.record.size)} disk, "
        f"wrote {human_bytes(result.bytes_written)} of data, "
        + (f"{len(result.warnings)} warning(s), " if result.warnings else "")
        + _seconds(time.monotonic() - started),
        [f"{result.chunks_read} chunks read, {result.chunks_written} written"])
    emit(args, doc, "")
    return EXIT_OK


def cmd_verify(args) -> int:
    from engine.verify import verify_repository
    started = time.monotonic()
    with _progress(args, "verify", finishing="checking manifests") as progress, _open(args) as repo:
        report = verify_repository(repo, workers=args.threads or 2, on_total=progress.set_total,
                                   on_progress=progress.advance)
        progress.finish()
    doc = report.as_dict()
    damage = [_count(len(doc["bad_chunks"]), "bad chunk"), _count(len(doc["missing_packs"]), "missing pack"),
              _count(len(doc["damaged_manifests"]), "damaged manifest")]
    damage += [_count(len(doc[k]), what) for k, what in (("bad_packs", "damaged pack frame"),
                                                         ("read_errors", "read error"),
                                                         ("bad_records", "damaged catalog record")) if doc[k]]
    if doc["marks"]["note"]:
        logging.getLogger("blockvault.verify").warning(doc["marks"]["note"])
    if doc["metadata_lost"]:
        damage.insert(0, "metadata lost")
    checked = (f"{_count(doc['chunks_checked'], 'chunk')} ({human_bytes(doc['bytes_checked'])}) and "
               f"{_count(doc['backups_checked'], 'backup')} checked")
    verdict = "OK" if report.ok else f"DAMAGED: {', '.join(damage)}"
    clilog.summary(f"verify {repo.path}: {verdict}; {checked}, {_seconds(time.monotonic() - started)}",
                   [f"{len(doc['unreferenced_packs'])} unreferenced pack file(s)"])
    if not report.ok:
        doc["error"] = {"code": "damaged", "message": f"store {repo.path} is damaged: {', '.join(damage)}",
                        "exit_code": EXIT_DAMAGED}
    if args.json:
        emit(args, doc, "")
    else:
        print(f"checked {checked[:-len(' checked')]}")
        # Backup ids and reasons come from the store: printed escaped (printable).
        for bad in doc["bad_chunks"]:
            where = "; ".join(f"{b['id']} at offsets {', '.join(map(str, b['offsets'][:8]))}"
                              + (" ..." if b["count"] > 8 else "") for b in bad["backups"]) or "no backup"
            print(printable(f"BAD chunk {bad['digest']}: {bad['reason']}"))
            print("    affects " + printable(where))
        for pack in doc["missing_packs"]:
            print(printable(f"MISSING pack {pack['id']} ({pack['path']})"))
        for pack in doc["bad_packs"]:
            print(printable(f"DAMAGED pack {pack['id']} ({pack['path']}): {pack['reason']}"))
        for err in doc["read_errors"]:
            print(printable(f"READ ERROR pack {err['id']} ({err['path']}) at offset {err['offset']}, "
                            f"{err['length']} bytes: {err['error']}"))
        for bid, reason in doc["damaged_manifests"].items():
            print(printable(f"DAMAGED manifest of {bid}: {reason}"))
        for rec in doc["bad_records"]:
            print(printable(f"DAMAGED catalog record {rec['key']}: {rec['reason']}"))
        for h in doc["healed_chunks"]:
            users = ", ".join(b["id"] for b in h["backups"]) or "no backup"
            print(printable(f"HEALED chunk {h['digest']}: stored again (was: {h['reason']}); used by {users}"))
        if doc["marks"]["marked"]:
            print(f"marked {_count(doc['marks']['marked'], 'bad chunk')}: the next backup that reads "
                  "their data stores them again")
        if doc["metadata_lost"]:
            print(f"METADATA LOST: {doc['metadata_lost']}")
        if doc["unreferenced_packs"] and not doc["metadata_lost"]:
            print(f"note: {len(doc['unreferenced_packs'])} pack file(s) left by interrupted backups "
                  "hold no referenced data")
        print("store OK" if report.ok else "store DAMAGED")
    return EXIT_OK if report.ok else EXIT_DAMAGED


def cmd_stats(args) -> int:
    from engine.stats import store_stats
    with _open(args) as repo:
        doc = store_stats(repo)
    _warn_bad_records(doc["bad_records"])
    if args.json:
        emit(args, doc, "")
        return EXIT_OK

    def r(x):
        return f"{x:.2f}x" if x else "-"
    print(f"store            {doc['store']}\n"
          f"disks, backups   {doc['disks']}, {doc['backups']}\n"
          f"protected        {human_bytes(doc['logical_bytes'])} logical, "
          f"{human_bytes(doc['logical_allocated_bytes'])} allocated\n"
          f"unique chunks    {doc['chunks']} ({human_bytes(doc['unique_bytes'])})\n"
          f"stored           {human_bytes(doc['stored_bytes'])} in {doc['packs']} packs\n"
          f"dedup            {r(doc['dedup_ratio'])}\n"
          f"compression      {r(doc['compression_ratio'])}\n"
          f"total reduction  {r(doc['reduction_ratio'])}")
    return EXIT_OK


def cmd_rebuild(args) -> int:
    from engine import recovery
    if args.config:
        doc = recovery.recreate_config(args.store, args.wait)
        emit(args, doc, recovery.config_text(doc))
        return EXIT_OK
    report = recovery.rebuild(args.store, args.wait)
    doc = recovery.rebuild_doc(report)
    if not report.complete:
        doc["ok"] = False
        doc["error"] = {"code": "damaged", "exit_code": EXIT_DAMAGED, "message": recovery.damage_message(report)}
        logging.getLogger("blockvault.rebuild").error(doc["error"]["message"])
    emit(args, doc, recovery.rebuild_text(doc))
    return EXIT_OK if report.complete else EXIT_DAMAGED


def cmd_demo(args) -> int:
    from engine.demo import run_demo
    doc = run_demo(args.dir, args.size, quiet=args.json or args.quiet)
    if not doc["ok"]:
        doc["error"] = {"code": "demo_failed", "message": "the demo's restores or verify did not match",
                        "exit_code": EXIT_ERROR}
    emit(args, doc, "")
    return EXIT_OK if doc["ok"] else EXIT_ERROR


# -- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="blockvault", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Deduplicating backups of virtual disks: every backup is a synthetic full.")
    p.add_argument("--version", action="version", version=f"blockvault {version()}")
    common_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name, func, help_text, example):
        return add_command(sub, name, func, help_text, example)

    sp = cmd("init", cmd_init, "create a new store in an empty directory",
             "blockvault init /backup/store --chunk-size 1M")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("--chunk-size", type=argtypes.chunk_size, default=f"{DEFAULT_CHUNK_SIZE >> 10}K",
                    help="fixed chunk size, a power of two from 64K to 8M (default %(default)s)")
    sp.add_argument("--digest", choices=DIGEST_KINDS, default="xxh3-128",
                    help="chunk identity: keyed xxh3-128 (fast) or sha256 (for mutually untrusting "
                         "tenants); default %(default)s")
    sp.add_argument("--compression-level", type=argtypes.compression_level, default=DEFAULT_COMPRESSION_LEVEL,
                    help="zstd level, -7 to 22 (default %(default)s)")

    sp = cmd("backup", cmd_backup, "back up a disk (raw image, VMDK or vddk:// URL) as the next point of a disk",
             "blockvault backup /backup/store disk.img --disk db01          # full: the first point\n"
             "  blockvault backup /backup/store disk.img --disk db01 --mode incremental --changed-areas cbt.json\n"
             "  blockvault backup /backup/store web01.vmdk --disk web01\n"
             "  blockvault backup /backup/store 'vddk://vc.lab:443/vm-42?disk=[ds1] web01/web01.vmdk"
             "&snapshot=snapshot-7&thumbprint=AA:BB:..' --disk web01-disk0")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("source", metavar="SOURCE",
                    help="raw image (file or block device), hosted .vmdk (flat, sparse, streamOptimized), "
                         "or vddk://HOST[:PORT]/VM-MOREF?disk=...&snapshot=... (see README)")
    sp.add_argument("--disk", required=True, help="name of the disk this image is a point of")
    sp.add_argument("--mode", choices=("full", "incremental", "differential"), default="full",
                    help="full (default); incremental: on the latest backup; differential: on the latest full")
    sp.add_argument("--changed-areas", metavar="FILE",
                    help="vSphere DiskChangeInfo JSON listing the extents changed since the base; "
                         "without it an incremental reads all allocated extents")
    sp.add_argument("--change-id", help="CBT changeId to record with this backup")
    sp.add_argument("--allow-external-extents", action="store_true",
                    help="read VMDK extent files outside the descriptor's directory (refused by default: "
                         "a descriptor can name any file, such as /etc/shadow)")
    sp.add_argument("--credentials", metavar="FILE",
                    help="vSphere credentials for vddk:// (lines user=.. and password=..); default: "
                         "BLOCKVAULT_VSPHERE_USER and BLOCKVAULT_VSPHERE_PASSWORD")
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another writer to finish, inf: as long as it takes "
                         "(default: fail at once)")
    sp.add_argument("--threads", type=argtypes.threads, default=None,
                    help="worker threads, 1-256 (default: one per core)")

    sp = cmd("list", cmd_list, "list backups", "blockvault list /backup/store --disk db01")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("--disk", help="only this disk")

    sp = cmd("restore", cmd_restore, "restore one backup to a raw image, a VMDK or a vSphere disk",
             "blockvault restore /backup/store db01@latest /restore/db01.img\n"
             "  blockvault restore /backup/store db01@-1 /restore/db01.vmdk     # the point before the latest\n"
             "  blockvault restore /backup/store db01@3 /dev/vg0/db01 --force    # a block device, in place\n"
             "  blockvault restore /backup/store db01@3 'vddk://vc.lab/vm-77?disk=[ds1] new/new.vmdk' --force")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("backup", metavar="DISK@N",
                    help="backup id: db01@3, db01@latest, db01@-1 (the one before the latest), "
                         "db01@2026-11-30 (the last of that day)")
    sp.add_argument("target", metavar="TARGET",
                    help="file to write (sparse raw, or .vmdk), a block device (written in place), or a vddk:// URL")
    sp.add_argument("--format", choices=("raw", "vmdk", "vddk"),
                    help="what to write (default: vddk for vddk:// URLs, raw for block devices, vmdk for *.vmdk, "
                         "else raw)")
    sp.add_argument("--force", action="store_true",
                    help="replace TARGET if it exists (required for block devices and vddk)")
    sp.add_argument("--credentials", metavar="FILE", help="vSphere credentials file for vddk:// targets")
    sp.add_argument("--mode", type=argtypes.file_mode, metavar="OCTAL",
                    help="permissions of the restored image file (default 600: a disk's data is its owner's)")
    sp.add_argument("--zeroed-target", action="store_true",
                    help="the block device or vddk disk already reads as zeros: skip writing zero chunks "
                         "(files are always new and sparse)")
    sp.add_argument("--threads", type=argtypes.threads, default=None,
                    help="worker threads, 1-256 (default: two per core)")

    sp = cmd("verify", cmd_verify, "read and check every chunk; report what damage affects",
             "blockvault verify /backup/store --json")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("--threads", type=argtypes.threads, default=None, help="worker threads, 1-256 (default 2)")

    sp = cmd("stats", cmd_stats, "space used and saved", "blockvault stats /backup/store")
    sp.add_argument("store", metavar="STORE")

    for name, text in (("rebuild", "recreate the store's index (backups, manifests, chunk index) from the packs"),
                       ("rebuild-index", "the old name of 'rebuild'")):
        sp = cmd(name, cmd_rebuild, text,
                 f"blockvault {name} /backup/store            # index lost, damaged or truncated\n"
                 f"  blockvault {name} --config /backup/store   # config.json lost or edited")
        sp.add_argument("store", metavar="STORE")
        sp.add_argument("--config", action="store_true",
                        help="recreate config.json from the settings in the pack headers instead "
                             "(a differing one is kept as config.json.replaced-TIME)")
        sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                        help="wait this long for another writer to finish, inf: as long as it takes")

    sp = cmd("demo", cmd_demo, "back up, restore and verify a generated sparse image in a scratch store",
             "blockvault demo --dir /tmp/bv-demo --size 2G")
    sp.add_argument("--dir", default=os.path.join(os.getcwd(), "blockvault-demo"),
                    help="scratch directory (default ./blockvault-demo): a new or empty directory, or one an "
                         "earlier demo made (its files are replaced); anything else is refused")
    sp.add_argument("--size", type=argtypes.demo_size, default="1G",
                    help="apparent size of the generated image, at least 1M (default 1G)")

    register_vsphere(sub)
    return p


def _wants_json(argv: list[str]) -> bool:
    """--json anywhere before a ``--``: known even when the rest does not parse."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def fail(args, exc: BaseException) -> int:
    """Report an expected failure (see commandline.describe_failure); the exit code."""
    if isinstance(exc, CommandLineError):
        exc.parser.print_usage(sys.stderr)
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, SIGTERM, SIGHUP: 128 + the signal's number
        detail = {"signal": signals.signal_name(getattr(exc, "signum", signal.SIGINT))}
        return report_failure(args, "interrupted", signals.report(exc, args), signals.exit_code(exc),
                              detail, prefix="")
    code, message, exit_code, detail = describe_failure(exc)
    return report_failure(args, code, message, exit_code, detail)


def main(argv: list[str] | None = None) -> int:
    from engine.allocator import keep_freed_memory
    keep_freed_memory()
    # Nothing the engine builds relies on the cycle collector, and restores
    # create one small object per chunk: collect rarely, and never rescan
    # the objects the imports left behind.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace(json=_wants_json(argv), quiet=False, verbose=0, log_file=None, command=None)
    clilog.setup()
    try:
        args = build_parser().parse_args(argv)
        clilog.setup(args.quiet, args.verbose, args.log_file)
        with signals.handled():  # SIGTERM and SIGHUP stop a command like Ctrl-C (engine/signals.py)
            return args.func(args)
    except (CommandLineError, StoreError, OSError, lmdb.Error, KeyboardInterrupt) as e:
        return fail(args, e)


if __name__ == "__main__":
    sys.exit(main())
