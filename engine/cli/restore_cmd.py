"""``restore``: one point written whole to a file, a block device or a vddk:// disk."""

from __future__ import annotations

import logging
import time

from engine import argtypes, clilog, swapped
from engine.cli import rollback_cmd
from engine.cli.common import open_repo, progress_for, seconds, add_store_arg
from engine.commandline import EXIT_OK, add_command, emit
from engine.progress import human_bytes


def cmd_restore(args) -> int:
    from engine.restore import make_target, restore_backup
    started = time.monotonic()
    swapped.check_restore(args.store, args.backup, args.target)
    if rollback_cmd.wants_rollback(args):
        return rollback_cmd.cmd_rollback(args)
    target = make_target(args.target, args.force, args.format, args.credentials, args.zeroed_target,
                         mode=args.mode)
    with progress_for(args, f"restore {args.backup}") as progress, open_repo(args) as repo:
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
        + seconds(time.monotonic() - started),
        [f"{result.chunks_read} chunks read, {result.chunks_written} written"])
    emit(args, doc, "")
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "restore", cmd_restore, "restore one backup to a raw image, a VMDK or a vSphere disk",
             "blockvault restore /backup/store db01@latest /restore/db01.img\n"
             "  blockvault restore /backup/store db01@-1 /restore/db01.vmdk     # the point before the latest\n"
             "  blockvault restore /backup/store db01@3 /dev/vg0/db01 --force    # a block device, in place\n"
             "  blockvault restore /backup/store db01@3 'vddk://vc.lab/vm-77?disk=[ds1] new/new.vmdk' --force\n"
             + rollback_cmd.EXAMPLES)
    add_store_arg(sp)
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
                    help="worker threads, 1-256 (default: two per core; four per core from a bucket)")
    rollback_cmd.add_options(sp)
