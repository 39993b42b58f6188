"""A point's disk as The Sleuth Kit sees it: the partition table, and which filesystem to open.

``ViewImage`` is TSK's disk image over a file-like view of one manifest
(engine/pointview.py, the one read path): every read TSK makes is a
``pread`` of the point, so opening a table or a filesystem costs the chunks
those structures sit in.  ``Disk`` reads the table (MBR, GPT, BSD, Sun,
Apple), numbers partitions as Linux does, chooses the one to read, and opens
its filesystem (engine/filesystems.py) or says what the volume holds
instead: LUKS, BitLocker, LVM, md RAID, swap, zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytsk3

from engine.errors import EncryptedVolumeError, FilesystemDamaged, NoFilesystemError, NotFoundError, UsageError
from engine.filesystems import TSK_ERRORS, Filesystem, decode_name, tsk_reason

_VS_NAMES = {int(pytsk3.TSK_VS_TYPE_DOS): "mbr", int(pytsk3.TSK_VS_TYPE_GPT): "gpt",
             int(pytsk3.TSK_VS_TYPE_BSD): "bsd", int(pytsk3.TSK_VS_TYPE_SUN): "sun",
             int(pytsk3.TSK_VS_TYPE_MAC): "mac", int(pytsk3.TSK_VS_TYPE_APFS): "apfs"}
_ALLOC = int(pytsk3.TSK_VS_PART_FLAG_ALLOC)
DETECT_ORDER = tuple(getattr(pytsk3, f"TSK_FS_TYPE_{t}") for t in (
    "EXT_DETECT", "NTFS_DETECT", "EXFAT", "FAT_DETECT", "HFS_DETECT", "APFS_DETECT", "FFS_DETECT", "ISO9660_DETECT"))


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
        except TSK_ERRORS:
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
            except TSK_ERRORS as e:
                self.image.reraise()
                reason = tsk_reason(e)
                if damage is None and not any(w in reason.lower() for w in _NOT_THIS_TYPE):
                    damage = reason  # the type's signature matched, then its metadata did not
        return None, damage


# TSK's words for "this is not that filesystem" (as opposed to "it is, but damaged").
_NOT_THIS_TYPE = ("magic", "invalid fs type", "not a", "cannot determine", "no valid", "is not")
