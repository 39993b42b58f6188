"""``backup``: one disk image, VMDK or vddk:// disk as the next point of its chain
(``vsphere backup`` backs up whole VMs: engine/vsphere/cli.py)."""

from __future__ import annotations

from engine import argtypes, clilog, swapped
from engine.cli.common import count, open_repo, progress_for, seconds, add_store_arg
from engine.commandline import EXIT_OK, add_command, emit
from engine.progress import human_bytes


def cmd_backup(args) -> int:
    from engine.backup import backup_image
    swapped.check_backup(args.store, args.source, args.disk)
    with progress_for(args, f"backup {args.disk}") as progress, open_repo(args) as repo:
        rec = backup_image(repo, args.source, args.disk, args.mode, args.changed_areas, args.change_id,
                           wait=args.wait, workers=args.threads, credentials_file=args.credentials,
                           on_progress=progress.advance, on_plan=progress.set_total,
                           allow_external_extents=args.allow_external_extents, at=args.time)
        progress.finish()
    doc = rec.summary()
    doc.setdefault("warnings", [])
    st = rec.stats
    clilog.summary(
        f"backup {rec.id} {rec.kind}: read {human_bytes(st['bytes_read'])}, stored "
        f"{human_bytes(st['stored_bytes'])} ({count(st['new_chunks'], 'new chunk')}), "
        f"{count(len(doc['warnings']), 'warning')}, {seconds(st['duration'])}",
        [f"source {rec.metadata.get('source', {}).get('path')}, base {rec.base or '-'}, "
         f"disk {human_bytes(rec.size)}",
         f"{st['chunks_read']} chunks read: {st['new_chunks']} new, {st['dedup_chunks']} deduplicated, "
         f"{st['zero_chunks']} zero; changed areas {'used' if st.get('changed_areas') else 'not used'}"])
    emit(args, doc, rec.id)
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "backup", cmd_backup, "back up a disk (raw image, VMDK or vddk:// URL) as the next point of a disk",
             "blockvault backup /backup/store disk.img --disk db01          # full: the first point\n"
             "  blockvault backup /backup/store disk.img --disk db01 --mode incremental --changed-areas cbt.json\n"
             "  blockvault backup /backup/store web01.vmdk --disk web01\n"
             "  blockvault backup /backup/store db01.img --disk db01 --wait 3600   # other disks run beside it; "
             "another backup of db01 is waited for\n"
             "  blockvault backup /backup/store 'vddk://vc.lab:443/vm-42?disk=[ds1] web01/web01.vmdk"
             "&snapshot=snapshot-7&thumbprint=AA:BB:..' --disk web01-disk0\n"
             "  blockvault backup /backup/store imported.img --disk db02 --time 2026-11-30T23:30:00+01:00   # its recorded time")
    add_store_arg(sp)
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
    sp.add_argument("--time", type=argtypes.point_time, default=None, metavar="ISO8601", help=argtypes.TIME_HELP)
    sp.add_argument("--allow-external-extents", action="store_true",
                    help="read VMDK extent files outside the descriptor's directory (refused by default: "
                         "a descriptor can name any file, such as /etc/shadow)")
    sp.add_argument("--credentials", metavar="FILE",
                    help="vSphere credentials for vddk:// (lines user=.. and password=..); default: "
                         "BLOCKVAULT_VSPHERE_USER and BLOCKVAULT_VSPHERE_PASSWORD")
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another backup of the same disk (or a rebuild) to finish, "
                         "inf: as long as it takes "
                         "(default: fail at once)")
    sp.add_argument("--threads", type=argtypes.threads, default=None,
                    help="worker threads, 1-256 (default: one per core)")
