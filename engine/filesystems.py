"""Partitions and filesystems inside a point, read by The Sleuth Kit (pytsk3).

Nothing is mounted and no filesystem code is ours: TSK parses the partition
table (MBR, GPT, BSD, Sun, Apple) and the filesystem (ext2/3/4, NTFS, FAT,
exFAT, HFS+, APFS, ISO 9660, UFS) from a file-like view of one
manifest (engine/pointview.py), so a listing reads only the chunks holding
the metadata it walks.  TSK's reads go through ``ViewImage``, an
``Img_Info`` whose ``read`` is the view's ``pread``.

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

from engine.errors import EncryptedVolumeError, FilesystemDamaged, NoFilesystemError, NotFoundError, UsageError

_META = {int(getattr(pytsk3, f"TSK_FS_META_TYPE_{k}")): v for k, v in (
    ("REG", "file"), ("DIR", "dir"), ("LNK", "symlink"), ("FIFO", "fifo"), ("CHR", "char"),
    ("BLK", "block"), ("SOCK", "socket"), ("SHAD", "other"), ("WHT", "other"),
    ("VIRT", "virtual"), ("VIRT_DIR", "virtual"))}
_NAME_DIR = int(pytsk3.TSK_FS_NAME_TYPE_DIR)
_NAME_UNALLOC = int(pytsk3.TSK_FS_NAME_FLAG_UNALLOC)
_VIRTUAL_NAMES = {int(pytsk3.TSK_FS_NAME_TYPE_VIRT), int(pytsk3.TSK_FS_NAME_TYPE_VIRT_DIR)}
_FS_NAMES = {int(getattr(pytsk3, k)): k[len("TSK_FS_TYPE_"):].lower() for k in dir(pytsk3)
             if k.startswith("TSK_FS_TYPE_") and not k.endswith(("DETECT", "ENUM", "UNSUPP"))}
_VS_NAMES = {int(pytsk3.TSK_VS_TYPE_DOS): "mbr", int(pytsk3.TSK_VS_TYPE_GPT): "gpt",
             int(pytsk3.TSK_VS_TYPE_BSD): "bsd", int(pytsk3.TSK_VS_TYPE_SUN): "sun",
             int(pytsk3.TSK_VS_TYPE_MAC): "mac", int(pytsk3.TSK_VS_TYPE_APFS): "apfs"}
_ALLOC = int(pytsk3.TSK_VS_PART_FLAG_ALLOC)
_MODE_TYPE = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "socket": stat.S_IFSOCK}
# What TSK shows for exFAT's allocation bitmap, up-case table and label entries, at the root.
EXFAT_SYSTEM = (b"$ALLOC_BITMAP", b"$UPCASE_TABLE", b"$VOLUME_LABEL", b"$VOLUME_GUID", b"$TEXFAT", b"$ACT")
NO_POSIX_MODES = ("fat12", "fat16", "fat32", "exfat", "ntfs")
_DATA_ATTRS = (int(pytsk3.TSK_FS_ATTR_TYPE_DEFAULT), int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA))
_WHOLE_ATTR = int(pytsk3.TSK_FS_ATTR_RES) | int(pytsk3.TSK_FS_ATTR_COMP) | int(pytsk3.TSK_FS_ATTR_ENC)
_NONRES = int(pytsk3.TSK_FS_ATTR_NONRES)
_HOLE_RUN = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE)
DETECT_ORDER = tuple(getattr(pytsk3, f"TSK_FS_TYPE_{t}") for t in (
    "EXT_DETECT", "NTFS_DETECT", "EXFAT", "FAT_DETECT", "HFS_DETECT", "APFS_DETECT", "FFS_DETECT", "ISO9660_DETECT"))
MAX_SYMLINK_HOPS = 40
MAX_LINK = 64 << 10
# What a TSK call raises: OSError with TSK's message, or RuntimeError wrapping an
# exception of ViewImage.read (a damaged chunk), which ``reraise`` then raises itself.
_TSK_ERRORS = (OSError, RuntimeError)


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class ViewImage(pytsk3.Img_Info):
    """TSK's disk image: any object with ``pread(offset, length)`` and ``size``.

    An exception in ``read`` (a damaged chunk, a missing pack) reaches TSK
    only as a failed read; it is kept here so that the caller re-raises the
    store's own error instead of TSK's vaguer one (``reraise``)."""

    def __init__(self, view):
        self._view = view
        self.failure: BaseException | None = None
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def read(self, offset, size):
        if offset < 0 or size <= 0 or offset >= self._view.size:
            return b""
        try:
            return bytes(self._view.pread(offset, min(size, self._view.size - offset)))
        except BaseException as e:  # noqa: BLE001 -- kept and re-raised outside TSK's C code
            self.failure = self.failure or e
            raise

    def get_size(self):
        return self._view.size

    def close(self):
        pass

    def reraise(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure


@dataclass
class Partition:
    number: int            # as Linux numbers it: MBR primaries 1-4, logicals 5.., GPT entries by slot
    start: int             # bytes
    length: int            # bytes
    description: str       # TSK's: the MBR type, or the GPT partition's name
    filesystem: str | None = None
    note: str | None = None  # why no filesystem was found (encrypted, LVM, swap ...)

    def as_dict(self) -> dict:
        return {"number": self.number, "start": self.start, "length": self.length,
                "description": self.description, "filesystem": self.filesystem, "note": self.note}


def _signature(view, offset: int) -> str | None:
    """What a volume TSK cannot read holds, from its first bytes: for the message."""
    head = view.pread(offset, 8192)
    if head[:6] == b"LUKS\xba\xbe":
        return "encrypted:LUKS"
    if head[3:11] == b"-FVE-FS-":
        return "encrypted:BitLocker"
    if head[512:520] == b"LABELONE" or head[0:8] == b"LABELONE":
        return "an LVM physical volume"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap space"
    if head[4096:4100] == b"\xfc\x4e\x2b\xa9":
        return "a Linux md RAID member"
    if not head.strip(b"\0"):
        return "only zeros"
    return None


class Disk:
    """A point's disk: its partition table, if any, and the filesystems in it."""

    def __init__(self, view, where: str):
        self.view = view
        self.where = where
        self.image = ViewImage(view)
        self.table: str | None = None
        self.partitions: list[Partition] = []
        try:
            vs = pytsk3.Volume_Info(self.image)
        except _TSK_ERRORS:
            self.image.reraise()
            return  # no partition table: the filesystem, if any, is the whole disk
        self.table = _VS_NAMES.get(int(vs.info.vstype), str(int(vs.info.vstype)))
        block = vs.info.block_size
        logical = 5
        for part in vs:
            if not int(part.flags) & _ALLOC:
                continue
            if self.table == "mbr" and part.table_num > 0:
                number, logical = logical, logical + 1
            else:
                number = part.slot_num + 1
            self.partitions.append(Partition(number, part.start * block, part.len * block,
                                             decode_name(part.desc).strip("\0") or "-"))
        self.image.reraise()

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        if not self.partitions:
            raise NotFoundError(f"{self.where} has no partition table, so no partition {number}: "
                                "leave out --partition (or give --partition 0) to read the whole disk")
        have = ", ".join(str(p.number) for p in self.partitions)
        raise NotFoundError(f"{self.where} has no partition {number}; its partitions are {have} "
                            "(see 'blockvault files partitions')")

    def probe(self) -> None:
        """Fill in each partition's filesystem (or a note saying what it holds)."""
        for p in self.partitions:
            try:
                p.filesystem = self.open(p.number).kind
            except (NoFilesystemError, EncryptedVolumeError, FilesystemDamaged) as e:
                p.note = getattr(e, "what", None) or "no filesystem"

    def whole_disk_filesystem(self) -> str | None:
        try:
            return self.open(0).kind
        except (NoFilesystemError, EncryptedVolumeError, FilesystemDamaged):
            return None

    def choose(self, number: int | None) -> int:
        """The partition to read: the one asked for; without one, the whole disk
        when there is no table, else the only partition holding a filesystem."""
        if number is not None:
            if number:
                self.partition(number)
            return number
        if not self.partitions:
            return 0
        if len(self.partitions) == 1:
            return self.partitions[0].number
        self.probe()
        readable = [p for p in self.partitions if p.filesystem]
        if len(readable) == 1:
            return readable[0].number
        have = ", ".join(f"{p.number} ({p.filesystem or p.note or 'no filesystem'})" for p in self.partitions)
        raise UsageError(f"{self.where} has {len(self.partitions)} partitions, "
                         f"{len(readable)} with a filesystem: {have}; choose one with --partition N")

    def open(self, number: int) -> "Filesystem":
        if number:
            p = self.partition(number)
            offset, what = p.start, f"partition {number} of {self.where}"
        else:
            offset, what = 0, self.where
        fs, reason = self._detect(offset)
        if fs is None:
            sig = _signature(self.view, offset)
            if sig and sig.startswith("encrypted:"):
                kind = sig.split(":", 1)[1]
                raise EncryptedVolumeError(
                    f"{what} is a {kind}-encrypted volume: its files cannot be read without unlocking it; "
                    f"restore the disk ('blockvault restore') and open it with "
                    f"{'cryptsetup' if kind == 'LUKS' else 'dislocker or cryptsetup --type bitlk'}",
                    what=f"{kind} encrypted")
            if reason is not None:
                raise FilesystemDamaged(f"{what} (offset {offset}) holds a filesystem The Sleuth Kit cannot open: "
                                        f"{reason}; its metadata is damaged", what="damaged filesystem")
            detail = f"it holds {sig}" if sig else "no filesystem signature matched"
            raise NoFilesystemError(
                f"{what} (offset {offset}) holds no filesystem The Sleuth Kit can read ({detail}); it reads "
                "ext2/3/4, NTFS, FAT, exFAT, HFS+, APFS, UFS and ISO 9660"
                + ("" if number or not self.partitions else "; this disk has partitions: give --partition N"),
                what=sig or "no filesystem")
        return Filesystem(fs, self.image, what, number)


    def _detect(self, offset: int):
        """The first filesystem type that opens at ``offset``; else None and, when a
        type's signature matched but the rest did not open, TSK's complaint.

        Each type is tried by itself rather than with TSK's DETECT, which
        also probes for YAFFS2 (raw NAND dumps, never a disk): that probe
        reads pages spread over the first tens of megabytes, 80 of the 81
        chunks a listing of a 20 GiB ext4 disk read, and on a disk of noise
        it reads on and on."""
        damage = None
        for fstype in DETECT_ORDER:
            try:
                return pytsk3.FS_Info(self.image, offset=offset, type=fstype), None
            except _TSK_ERRORS as e:
                self.image.reraise()
                reason = _tsk_reason(e)
                if damage is None and not any(w in reason.lower() for w in _NOT_THIS_TYPE):
                    damage = reason  # the type's signature matched, then its metadata did not
        return None, damage


# TSK's words for "this is not that filesystem" (as opposed to "it is, but damaged").
_NOT_THIS_TYPE = ("magic", "invalid fs type", "not a", "cannot determine", "no valid", "is not")


def _tsk_reason(e: OSError) -> str:
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

    def __init__(self, fs, image: ViewImage, where: str, partition: int):
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
        except _TSK_ERRORS as e:
            self.image.reraise()
            raise FilesystemDamaged(f"{self.where} ({self.kind}): cannot read {what}: {_tsk_reason(e)}; "
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
