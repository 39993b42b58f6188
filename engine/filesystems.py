"""Filesystems inside a point, read by The Sleuth Kit (pytsk3): lookup, listing, file data.

Nothing is mounted and no filesystem code is ours: TSK parses the
filesystem (ext2/3/4, NTFS, FAT, exFAT, HFS+, APFS, ISO 9660, UFS) through a
file-like view of one manifest (engine/pointview.py, wrapped for TSK by
engine/partitions.py's ``ViewImage``), so a listing reads only the chunks
holding the metadata it walks, and a file only its data runs.

The image is untrusted input: names may hold ``/``, NUL or ``..``, a
directory may contain itself, sizes may be absurd.  This module reports what
the filesystem says, names as bytes decoded like the OS decodes file names
(UTF-8, other bytes as U+DC80..U+DCFF), and leaves what may be written where
to engine/extract.py.  TSK's failures (OSError with its own text) become
the errors of engine/errors.py, with what to do next.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import pytsk3

from engine.errors import FilesystemDamaged, NotFoundError

_META = {int(getattr(pytsk3, f"TSK_FS_META_TYPE_{k}")): v for k, v in (
    ("REG", "file"), ("DIR", "dir"), ("LNK", "symlink"), ("FIFO", "fifo"), ("CHR", "char"),
    ("BLK", "block"), ("SOCK", "socket"), ("SHAD", "other"), ("WHT", "other"),
    ("VIRT", "virtual"), ("VIRT_DIR", "virtual"))}
_NAME_UNALLOC = int(pytsk3.TSK_FS_NAME_FLAG_UNALLOC)
_VIRTUAL_NAMES = {int(pytsk3.TSK_FS_NAME_TYPE_VIRT), int(pytsk3.TSK_FS_NAME_TYPE_VIRT_DIR)}
_FS_NAMES = {int(getattr(pytsk3, k)): k[len("TSK_FS_TYPE_"):].lower() for k in dir(pytsk3)
             if k.startswith("TSK_FS_TYPE_") and not k.endswith(("DETECT", "ENUM", "UNSUPP"))}
_MODE_TYPE = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "socket": stat.S_IFSOCK}
# What TSK shows for exFAT's allocation bitmap, up-case table and label entries, at the root.
EXFAT_SYSTEM = (b"$ALLOC_BITMAP", b"$UPCASE_TABLE", b"$VOLUME_LABEL", b"$VOLUME_GUID", b"$TEXFAT", b"$ACT")
NO_POSIX_MODES = ("fat12", "fat16", "fat32", "exfat", "ntfs")
_DATA_ATTRS = (int(pytsk3.TSK_FS_ATTR_TYPE_DEFAULT), int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA))
_WHOLE_ATTR = int(pytsk3.TSK_FS_ATTR_RES) | int(pytsk3.TSK_FS_ATTR_COMP) | int(pytsk3.TSK_FS_ATTR_ENC)
_NONRES = int(pytsk3.TSK_FS_ATTR_NONRES)
_HOLE_RUN = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE)
MAX_SYMLINK_HOPS = 40
MAX_LINK = 64 << 10
# What a TSK call raises: OSError with TSK's message, or RuntimeError wrapping an
# exception of ViewImage.read (a damaged chunk), which ``reraise`` then raises itself.
TSK_ERRORS = (OSError, RuntimeError)


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def tsk_reason(e: OSError) -> str:
    """TSK's message without its source-file prefix: ``...(tsk3.cpp:378) Unable to ...``."""
    text = str(e)
    return text.split(") ", 1)[1] if ") " in text and "tsk3.cpp" in text else text


@dataclass
class Entry:
    """One directory entry, as the filesystem describes it."""
    name: str
    kind: str              # file, dir, symlink, fifo, char, block, socket, other
    addr: int              # inode / MFT entry / directory-entry address
    size: int
    mode: int              # permission bits (0o7777) as the filesystem records or TSK infers them
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    link: str | None = None  # symlink target

    @property
    def st_mode(self) -> int:
        return _MODE_TYPE.get(self.kind, 0) | self.mode

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.kind, "size": self.size, "mode": f"{self.mode:04o}",
                "uid": self.uid, "gid": self.gid, "mtime": self.mtime_ns / 1e9, "inode": self.addr,
                "link": self.link}


def _ns(sec, nano) -> int:
    return int(sec or 0) * 1_000_000_000 + int(nano or 0)


class Filesystem:
    """One filesystem TSK opened: path lookup, directory listing, file reads."""

    def __init__(self, fs, image, where: str, partition: int):  # image: engine.partitions.ViewImage
        self.fs = fs
        self.image = image
        self.where = where
        self.partition = partition
        self.kind = _FS_NAMES.get(int(fs.info.ftype), f"type {int(fs.info.ftype)}")
        self._ntfs = self.kind == "ntfs"
        self._case_insensitive = self.kind in ("ntfs", "fat12", "fat16", "fat32", "exfat", "hfs", "apfs")
        # FAT, exFAT and NTFS keep no POSIX permissions: TSK reports 0777 for everything,
        # and restored files should not come out writable by everyone.
        self.posix_modes = self.kind not in NO_POSIX_MODES
        self.root: Entry | None = None
        self.root = self._entry_of(self._tsk(fs.open_meta, what="the root directory", inode=fs.info.root_inum), "/")

    def _tsk(self, fn, *args, what: str, **kw):
        try:
            return fn(*args, **kw)
        except TSK_ERRORS as e:
            self.image.reraise()
            raise FilesystemDamaged(f"{self.where} ({self.kind}): cannot read {what}: {tsk_reason(e)}; "
                                    "the filesystem's metadata is damaged or not what it claims") from None

    def _entry_of(self, f, name: str) -> Entry:
        meta = f.info.meta
        if meta is None:
            raise FilesystemDamaged(f"{self.where} ({self.kind}): {name!r} has no metadata")
        kind = _META.get(int(meta.type), "other")
        link = None
        if kind == "symlink":
            raw = meta.link or b""
            if not raw and 0 < meta.size <= MAX_LINK:
                raw = self._tsk(f.read_random, 0, meta.size, what=f"the symbolic link {name!r}")
            link = decode_name(raw if isinstance(raw, bytes) else encode_name(raw))
        mode = int(meta.mode) & 0o7777 if self.posix_modes else (0o755 if kind == "dir" else 0o644)
        return Entry(name, kind, int(meta.addr), int(meta.size), mode, int(meta.uid),
                     int(meta.gid), _ns(meta.mtime, meta.mtime_nano), _ns(meta.atime, meta.atime_nano), link)

    def children(self, directory: Entry, path: str = "") -> list[Entry]:
        """The live entries of a directory: no ``.``/``..``, no deleted names, no
        TSK virtual entries, no NTFS system files ($MFT...) at the root."""
        d = self._tsk(self.fs.open_dir, what=f"directory {path or directory.name!r}", inode=directory.addr)
        out = []
        it = iter(d)
        while True:
            f = self._tsk(next, it, None, what=f"directory {path or directory.name!r}")
            if f is None:
                break
            info = f.info.name
            if info is None or int(info.flags) & _NAME_UNALLOC or int(info.type) in _VIRTUAL_NAMES:
                continue
            raw = info.name or b""
            if raw in (b".", b".."):
                continue
            if f.info.meta is None:
                continue
            if self._ntfs and raw.startswith(b"$") and int(f.info.meta.addr) < 24:
                continue
            if self.kind == "exfat" and directory.addr == self.root.addr and raw in EXFAT_SYSTEM:
                continue
            entry = self._entry_of(f, decode_name(raw))
            if entry.kind != "virtual":
                out.append(entry)
        out.sort(key=lambda e: e.name)
        return out

    def lookup(self, path: str) -> Entry:
        """The entry at ``path`` (from the filesystem's root).  Symbolic links
        in the middle of the path are followed inside this filesystem; the last
        component is not (``get`` writes the link itself)."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        stack: list[Entry] = [self.root]
        hops = 0
        done: list[str] = []
        while parts:
            part = parts.pop(0)
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                    done.pop()
                continue
            here = "/" + "/".join(done)
            if stack[-1].kind != "dir":
                raise NotFoundError(f"{self.where}: {here} is not a directory, so {here}/{part} does not exist")
            entry = self._find(stack[-1], part, here)
            if entry.kind == "symlink" and parts:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise NotFoundError(f"{self.where}: too many symbolic links in {path}")
                target = entry.link or ""
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                if target.startswith("/"):
                    stack, done = [self.root], []
                continue
            stack.append(entry)
            done.append(entry.name)
        return stack[-1]

    def _find(self, directory: Entry, name: str, here: str) -> Entry:
        children = self.children(directory, here)
        for e in children:
            if e.name == name:
                return e
        if self._case_insensitive:
            same = [e for e in children if e.name.casefold() == name.casefold()]
            if len(same) == 1:
                return same[0]
        shown = os.path.join(here, name)
        raise NotFoundError(f"{self.where} ({self.kind}): {shown!r} does not exist "
                            f"('blockvault files ls' lists {here})")

    def open_file(self, entry: Entry):
        return self._tsk(self.fs.open_meta, what=f"file {entry.name!r}", inode=entry.addr)

    def data_ranges(self, handle, entry: Entry) -> list[tuple[int, int]]:
        """[start, end) byte ranges of a file that hold data: its holes (sparse
        runs) are left out, so a sparse file, or one whose damaged size claims
        a terabyte its blocks do not hold, costs what its blocks cost.  A
        resident, compressed or encrypted stream is one range: TSK maps it."""
        size = entry.size
        if size <= 0:
            return []
        attrs = self._tsk(list, handle, what=f"the attributes of {entry.name!r}")
        data = [a for a in attrs if int(a.info.type) in _DATA_ATTRS and not a.info.name]
        data = data or [a for a in attrs if int(a.info.type) in _DATA_ATTRS]
        if not data or int(data[0].info.flags) & _WHOLE_ATTR or not int(data[0].info.flags) & _NONRES:
            return [(0, size)]
        block = self.fs.info.block_size
        ranges: list[list[int]] = []
        for run in self._tsk(list, data[0], what=f"the block runs of {entry.name!r}"):
            if int(run.flags) & _HOLE_RUN:
                continue
            start, end = run.offset * block, min(size, (run.offset + run.len) * block)
            if start >= end:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = end
            else:
                ranges.append([start, end])
        return [tuple(r) for r in sorted(ranges)]

    def read(self, handle, entry: Entry, offset: int, length: int) -> bytes:
        data = self._tsk(handle.read_random, offset, length, what=f"file {entry.name!r} at offset {offset}")
        if not data:
            raise FilesystemDamaged(f"{self.where} ({self.kind}): file {entry.name!r} ends at {offset} bytes, "
                                    f"its metadata says {entry.size}: the filesystem is damaged")
        return data
