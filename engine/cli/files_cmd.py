"""``files partitions|ls|get``: a point's files, read without restoring the disk or mounting it.

The point is read through engine/pointview.py (the one read path), its
partitions and filesystems by The Sleuth Kit (engine/partitions.py,
engine/filesystems.py), and files are written under DEST by
engine/extract.py.  Every command reports how many of the disk's chunks it
read: a listing reads the few that hold the metadata it walks, not the disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import time

from engine import clilog
from engine.cli.common import count, open_repo, seconds, add_store_arg
from engine.commandline import EXIT_OK, add_command, common_options, emit, print_table, printable
from engine.errors import FileLevelError, UsageError
from engine.progress import human_bytes

log = logging.getLogger("blockvault.files")

EPILOG = """\
examples:
  blockvault files partitions /backup/store web01-disk0@latest
  blockvault files ls /backup/store web01-disk0@latest /etc --partition 1 --long
  blockvault files get /backup/store web01-disk0@3 /etc/hosts /var/www ./restored
  blockvault files ls /backup/store web01@latest /home --disk 2000     # a VM backup: its disk 2000

Nothing is mounted: The Sleuth Kit reads the partition table (MBR, GPT) and the filesystem
(ext2/3/4, NTFS, FAT, exFAT, HFS+, ...) straight from the store, reading only the chunks it needs.
"""


def _partition(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is not a partition number (1, 2, ...; 0 is the whole disk)")
    return int(text)


class _Session:
    """One point opened for reading: its record, its view, the reader's registration."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()

    def __enter__(self):
        from engine.partitions import Disk
        from engine.pointref import resolve_point
        from engine.pointview import PointView, reader_registration
        from engine.vsphere.vmcatalog import VmCatalog
        self.repo = open_repo(self.args)
        self.registration = self.view = None
        try:
            # Registered as a reader before the manifest is read: a gc keeps every pack it names.
            registration = reader_registration(self.repo, "files")
            registration.__enter__()
            self.registration = registration
            vms = VmCatalog(self.repo.store)  # opens its database: before the read transaction
            with self.repo.store.read_txn() as txn:
                self.record = resolve_point(self.repo, vms, txn, self.args.backup, self.args.disk)
                manifest = self.repo.manifests.get(txn, self.record.key, self.record.id, self.record)
            self.view = PointView(self.repo, self.record, manifest)
            self.disk = Disk(self.view, self.record.id)
        except BaseException as e:
            self._close(type(e), e, e.__traceback__)
            raise
        return self

    def _close(self, *exc):
        try:
            if self.view is not None:
                self.view.close()
            if self.registration is not None:
                self.registration.__exit__(*exc)
        finally:
            self.repo.close()

    def __exit__(self, *exc):
        self._close(*exc)

    def reads(self) -> dict:
        c = self.view.counters
        return {"chunks_read": c.chunks_read, "chunks_total": self.view.n_chunks, "bytes_read": c.bytes_read}

    def summary(self, what: str) -> None:
        r = self.reads()
        share = 100.0 * r["chunks_read"] / r["chunks_total"] if r["chunks_total"] else 0.0
        clilog.summary(f"files {self.args.files_command} {self.record.id}: {what}; read "
                       f"{r['chunks_read']} of {r['chunks_total']} chunks ({share:.2f}%, "
                       f"{human_bytes(r['bytes_read'])} from packs), {seconds(time.monotonic() - self.started)}")

    def filesystem(self):
        number = self.disk.choose(self.args.partition)
        return self.disk.open(number)

    def base_doc(self, fs=None) -> dict:
        doc = {"id": self.record.id, "size": self.record.size}
        if fs is not None:
            doc.update(partition=fs.partition or None, filesystem=fs.kind)
        return doc


def cmd_partitions(args) -> int:
    with _Session(args) as s:
        s.disk.probe()
        whole = s.disk.whole_disk_filesystem() if not s.disk.partitions else None
        doc = {**s.base_doc(), "table": s.disk.table, "partitions": [p.as_dict() for p in s.disk.partitions],
               "filesystem": whole, **s.reads()}
        s.summary(f"{s.disk.table or 'no'} partition table, {count(len(s.disk.partitions), 'partition')}")
    if args.json:
        emit(args, doc, "")
        return EXIT_OK
    if not doc["partitions"]:
        print(printable(f"{doc['id']}: no partition table; the whole disk holds "
                        + (f"a {whole} filesystem" if whole else "no filesystem The Sleuth Kit reads")))
        return EXIT_OK
    rows = [("NUMBER", "START", "SIZE", "DESCRIPTION", "FILESYSTEM")]
    for p in doc["partitions"]:
        rows.append((str(p["number"]), str(p["start"]), human_bytes(p["length"]), p["description"],
                     p["filesystem"] or f"- ({p['note']})"))
    print(printable(f"{doc['id']}: {doc['table'].upper()} partition table"))
    print_table(rows)
    return EXIT_OK


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


_TYPE_CHAR = {"dir": "d", "symlink": "l", "fifo": "p", "char": "c", "block": "b", "socket": "s"}


def _long_row(e) -> tuple[str, ...]:
    mode = stat.filemode(e.st_mode)
    if e.kind not in ("file", "dir", "symlink"):
        mode = _TYPE_CHAR.get(e.kind, "?") + mode[1:]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns // 1_000_000_000))
    name = e.name + (f" -> {e.link}" if e.link is not None else "")
    return (mode, str(e.uid), str(e.gid), str(e.size), when, name)


def cmd_ls(args) -> int:
    with _Session(args) as s:
        fs = s.filesystem()
        path = args.path or "/"
        entry = fs.lookup(path)
        entries = fs.children(entry, path) if entry.kind == "dir" else [entry]
        doc = {**s.base_doc(fs), "path": path, "type": entry.kind, "entries": [e.as_dict() for e in entries],
               **s.reads()}
        s.summary(f"{_entries(len(entries))} in {path}")
    if args.json:
        emit(args, doc, "")
    elif args.long:
        if entries:
            print_table([_long_row(e) for e in entries])
    else:
        for e in entries:
            print(printable(e.name + ("/" if e.kind == "dir" else "")))
    return EXIT_OK


def cmd_get(args) -> int:
    from engine.extract import Extractor, exists_in, open_dest, plain_name
    if not args.paths:
        raise UsageError("files get needs at least one PATH before DEST, e.g. "
                         "blockvault files get STORE DISK@N /etc/hosts ./restored")
    with _Session(args) as s:
        fs = s.filesystem()
        found = [(path, fs.lookup(path)) for path in args.paths]  # every PATH exists before anything is written
        names: dict[str, str] = {}  # what will be written straight into DEST, and from which PATH
        for path, entry in found:
            is_root = entry.addr == fs.root.addr and entry.kind == "dir"
            for name in ([c.name for c in fs.children(entry, path)] if is_root else [entry.name]):
                if not is_root and not plain_name(name):
                    raise FileLevelError(f"{path}: the filesystem names it {name!r}, which is not a plain file "
                                         "name: it cannot be written as a file of DEST")
                if names.get(name, path) != path and plain_name(name):
                    raise UsageError(f"{names[name]} and {path} would both write {args.dest}/{name}: "
                                     "get them one at a time, into different DESTs")
                names[name] = path
        dest_fd = open_dest(args.dest)
        try:
            if not args.force:
                clash = [n for n in names if plain_name(n) and exists_in(dest_fd, n)]
                if clash:
                    raise UsageError(f"{args.dest} already holds {', '.join(map(repr, clash))}: choose an empty "
                                     "DEST, or --force to replace files there")
            extractor = Extractor(fs, dest_fd, force=args.force)
            for path, entry in found:
                extractor.extract(entry, path, into_dest=(entry.addr == fs.root.addr and entry.kind == "dir"))
        finally:
            os.close(dest_fd)
        report = extractor.report
        for skipped in report.skipped:
            log.warning(printable(f"{skipped['path']}: not written: {skipped['reason']}"))
        doc = {**s.base_doc(fs), "paths": list(args.paths), "dest": args.dest, **report.as_dict(), **s.reads()}
        s.summary(f"{count(report.files, 'file')} ({human_bytes(report.bytes)}), "
                  f"{report.directories} director{'y' if report.directories == 1 else 'ies'}, "
                  f"{count(report.symlinks, 'symbolic link')}, {len(report.skipped)} skipped, to {args.dest}")
    emit(args, doc, "")
    return EXIT_OK


def _common(sp) -> None:
    add_store_arg(sp)
    sp.add_argument("backup", metavar="ID",
                    help="a disk backup (web01-disk0@3, @latest, @-1, @2026-11-30) or a VM backup (web01@3; "
                         "with several disks add --disk KEY)")
    sp.add_argument("--disk", metavar="KEY",
                    help="the disk of VM backup ID to read, by its vSphere device key (2000, 2001...)")


def _fs_options(sp) -> None:
    sp.add_argument("--partition", type=_partition, metavar="N",
                    help="partition number as 'files partitions' shows it (Linux's numbering: sda1 is 1); "
                         "0 is the whole disk; default: the only partition with a filesystem")


def register(sub) -> None:
    group = sub.add_parser("files", help="list and restore single files from a point, without restoring the disk",
                           description="List and restore single files and directories from a backup point.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(group)
    fsub = group.add_subparsers(dest="files_command", metavar="COMMAND", required=True)

    sp = add_command(fsub, "partitions", cmd_partitions, "the point's partition table and the filesystem in each",
                     "blockvault files partitions /backup/store web01-disk0@latest")
    _common(sp)

    sp = add_command(fsub, "ls", cmd_ls, "list a directory of the point's filesystem",
                     "blockvault files ls /backup/store web01-disk0@latest /var/log --long\n"
                     "  blockvault files ls /backup/store web01@3 / --disk 2001 --partition 2 --json")
    _common(sp)
    sp.add_argument("path", metavar="PATH", nargs="?", default="/", help="directory or file (default /)")
    _fs_options(sp)
    sp.add_argument("--long", "-l", action="store_true", help="mode, owner, size, time and link target")

    sp = add_command(fsub, "get", cmd_get, "restore files and directories (with their modes and times) into DEST",
                     "blockvault files get /backup/store web01-disk0@latest /etc/hosts ./restored\n"
                     "  blockvault files get /backup/store web01@-1 /home/ann /srv/www /tmp/out --disk 2000\n"
                     "  blockvault files get /backup/store web01-disk0@3 / ./whole-fs   # everything")
    _common(sp)
    sp.add_argument("paths", metavar="PATH", nargs="*", help="files or directories in the point's filesystem")
    sp.add_argument("dest", metavar="DEST", help="directory to write into (made if missing); each PATH becomes "
                                                  "DEST/<its name>, / puts the whole filesystem into DEST")
    _fs_options(sp)
    sp.add_argument("--force", action="store_true", help="replace files already in DEST (directories are merged)")
