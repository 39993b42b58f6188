"""The ``blockvault`` command line.

Exit codes: 0 success; 1 an error, explained on stderr; 2 a usage error;
3 verify found damage; 4 the store is held by another writer; 128 + the
signal's number when stopped by SIGINT (130), SIGTERM (143) or SIGHUP (129).  ``--json`` prints one JSON document on stdout and turns
progress off; progress is also off when stderr is not a terminal.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys
import time

# numpy (restore, verify) only does array bookkeeping here; without this its
# OpenBLAS starts a thread per core that spins at import (perf: 1.4% of a
# restore).  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import lmdb  # noqa: E402

from chunkstore import StoreError
from chunkstore.config import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, DIGEST_KINDS
from engine import argtypes, signals, swapped
from engine.commandline import add_command, emit, print_table
from engine.progress import Progress, human_bytes
from engine.vsphere.cli import register as register_vsphere

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGED, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EPILOG = """\
examples:
  blockvault init /backup/store
  blockvault backup /backup/store disk.img --disk web01-disk0
  blockvault backup /backup/store disk.img --disk web01-disk0 --mode incremental --changed-areas cbt.json
  blockvault list /backup/store --disk web01-disk0
  blockvault restore /backup/store web01-disk0@latest /restore/disk.img
  blockvault verify /backup/store --json
  blockvault demo                      # try it all on a generated sparse image

exit codes: 0 ok, 1 error, 2 usage, 3 verify found damage, 4 store busy,
  130 interrupted (SIGINT), 143 terminated (SIGTERM), 129 hung up (SIGHUP)
"""


def _progress(args, label: str) -> Progress:
    return Progress(label, enabled=False if args.json else None)


def _open(args):
    from engine.repository import Repository
    return Repository.open(args.store)


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
    progress = _progress(args, f"backup {args.disk}")
    with _open(args) as repo:
        rec = backup_image(repo, args.source, args.disk, args.mode, args.changed_areas, args.change_id,
                           wait=args.wait, workers=args.threads, credentials_file=args.credentials,
                           on_progress=progress.advance, on_plan=progress.set_total)
    progress.finish()
    st = rec.stats
    text = (f"{rec.id}\n" if not sys.stdout.isatty() else
            f"{rec.id}  {rec.kind}: read {human_bytes(st['bytes_read'])}, "
            f"{st['new_chunks']} new chunks ({human_bytes(st['stored_bytes'])} stored), "
            f"{st['dedup_chunks']} deduplicated, {st['zero_chunks']} zero, in {st['duration']:.2f}s")
    emit(args, rec.summary(), text.rstrip("\n"))
    return EXIT_OK


def cmd_list(args) -> int:
    with _open(args) as repo, repo.store.read_txn() as txn:
        if args.disk:
            records = list(repo.catalog.for_disk(txn, args.disk))
        else:
            records = list(repo.catalog.all(txn))
    if args.json:
        emit(args, {"backups": [r.summary() for r in records]}, "")
        return EXIT_OK
    if not records:
        print("no backups" + (f" of disk {args.disk}" if args.disk else ""))
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
    swapped.check_restore(args.store, args.backup, args.target)
    progress = _progress(args, f"restore {args.backup}")
    target = make_target(args.target, args.force, args.format, args.credentials, args.zeroed_target)
    with _open(args) as repo:
        result = restore_backup(repo, args.backup, target, workers=args.threads,
                                on_start=lambda rec, total: progress.set_total(total),
                                on_progress=progress.advance)
    progress.finish()
    doc = {"id": result.record.id, "target": result.target, "size": result.record.size,
           "bytes_written": result.bytes_written, "chunks_written": result.chunks_written,
           "chunks_read": result.chunks_read}
    emit(args, doc, f"restored {result.record.id} to {result.target} ({human_bytes(result.record.size)}, "
                     f"{human_bytes(result.bytes_written)} of data)")
    return EXIT_OK


def cmd_verify(args) -> int:
    from engine.verify import verify_repository
    progress = _progress(args, "verify")
    with _open(args) as repo:
        report = verify_repository(repo, workers=args.threads or 2, on_total=progress.set_total,
                                   on_progress=progress.advance)
    progress.finish()
    doc = report.as_dict()
    if args.json:
        emit(args, doc, "")
    else:
        print(f"checked {doc['chunks_checked']} chunks ({human_bytes(doc['bytes_checked'])}) "
              f"and {doc['backups_checked']} backups")
        for bad in doc["bad_chunks"]:
            where = "; ".join(f"{b['id']} at offsets {', '.join(map(str, b['offsets'][:8]))}"
                              + (" ..." if b["count"] > 8 else "") for b in bad["backups"]) or "no backup"
            print(f"BAD chunk {bad['digest']}: {bad['reason']}\n    affects {where}")
        for pack in doc["missing_packs"]:
            print(f"MISSING pack {pack}")
        for bid, reason in doc["damaged_manifests"].items():
            print(f"DAMAGED manifest of {bid}: {reason}")
        if doc["unreferenced_packs"]:
            print(f"note: {len(doc['unreferenced_packs'])} pack file(s) left by interrupted backups "
                  "hold no referenced data")
        print("store OK" if report.ok else "store DAMAGED")
    return EXIT_OK if report.ok else EXIT_DAMAGED


def cmd_stats(args) -> int:
    from engine.stats import store_stats
    with _open(args) as repo:
        doc = store_stats(repo)
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


def cmd_rebuild_index(args) -> int:
    from chunkstore.rebuild import rebuild_index
    with _open(args) as repo:
        report = rebuild_index(repo.store, wait=args.wait)
    doc = {"packs": report.packs, "chunks": report.chunks, "duplicates": report.duplicates,
           "torn": report.torn, "unreadable": report.unreadable}
    emit(args, doc, f"index rebuilt: {report.chunks} chunks from {report.packs} packs"
                     + "".join(f"\n  torn tail ignored: {t}" for t in report.torn)
                     + "".join(f"\n  unreadable pack: {u}" for u in report.unreadable))
    return EXIT_OK


def cmd_demo(args) -> int:
    from engine.demo import run_demo
    doc = run_demo(args.dir, args.size, quiet=args.json)
    emit(args, doc, "")
    return EXIT_OK if doc["ok"] else EXIT_ERROR


# -- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockvault", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Deduplicating backups of virtual disks: every backup is a synthetic full.")
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
             "  blockvault restore /backup/store db01@3 'vddk://vc.lab/vm-77?disk=[ds1] new/new.vmdk' --force")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("backup", metavar="DISK@N",
                    help="backup id: db01@3, db01@latest, db01@-1 (the one before the latest), "
                         "db01@2026-11-30 (the last of that day)")
    sp.add_argument("target", metavar="TARGET", help="file to write (sparse raw, or .vmdk), or a vddk:// URL")
    sp.add_argument("--format", choices=("raw", "vmdk", "vddk"),
                    help="what to write (default: vddk for vddk:// URLs, vmdk for *.vmdk, else raw)")
    sp.add_argument("--force", action="store_true", help="replace TARGET if it exists (required for vddk)")
    sp.add_argument("--credentials", metavar="FILE", help="vSphere credentials file for vddk:// targets")
    sp.add_argument("--zeroed-target", action="store_true",
                    help="the vddk target disk is newly created: skip writing its zero chunks")
    sp.add_argument("--threads", type=argtypes.threads, default=None,
                    help="worker threads, 1-256 (default: two per core)")

    sp = cmd("verify", cmd_verify, "read and check every chunk; report what damage affects",
             "blockvault verify /backup/store --json")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("--threads", type=argtypes.threads, default=None, help="worker threads, 1-256 (default 2)")

    sp = cmd("stats", cmd_stats, "space used and saved", "blockvault stats /backup/store")
    sp.add_argument("store", metavar="STORE")

    sp = cmd("rebuild-index", cmd_rebuild_index, "rebuild the chunk index from the pack files",
             "blockvault rebuild-index /backup/store")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another writer to finish, inf: as long as it takes")

    sp = cmd("demo", cmd_demo, "back up, restore and verify a generated sparse image in a scratch store",
             "blockvault demo --dir /tmp/bv-demo --size 2G")
    sp.add_argument("--dir", default=os.path.join(os.getcwd(), "blockvault-demo"),
                    help="scratch directory (default ./blockvault-demo, replaced)")
    sp.add_argument("--size", type=argtypes.demo_size, default="1G",
                    help="apparent size of the generated image, at least 1M (default 1G)")

    register_vsphere(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.allocator import keep_freed_memory
    keep_freed_memory()
    # Nothing the engine builds relies on the cycle collector, and restores
    # create one small object per chunk: collect rarely, and never rescan
    # the objects the imports left behind.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with signals.handled():  # SIGTERM and SIGHUP stop a command like Ctrl-C (engine/signals.py)
            return args.func(args)
    except StoreError as e:
        print(f"blockvault: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_ERROR)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        hint = ("; free space on that file system (or raise the quota) and run the command again"
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
        print(f"blockvault: error: {where}{e.strerror or e}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except lmdb.Error as e:
        print(f"blockvault: error: store index: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: 128 + the signal's number
        try:
            print(signals.report(e, args), file=sys.stderr)
        except OSError:  # the terminal that sent SIGHUP is gone
            pass
        return signals.exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
