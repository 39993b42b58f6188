"""Restore targets: where a restore's bytes go, and which paths may receive them.

A target is a raw file (sparse), a monolithicSparse VMDK written by native's
VMDK writer, a block device, or a vSphere disk through VDDK Write.  File
targets are written to ``TARGET.blockvault-partial`` and renamed over the
target only when every chunk is written and synced, so an interrupted
restore never leaves a half-written file under the target's name.

Block devices and VDDK disks exist before the restore and are written in
place: no partial file, no rename, no truncation.  Unless the user says the
target already reads as zeros (``--zeroed-target``), zero chunks are
written too, because the device may hold old data.  A rename over a device
node would replace the node with a regular file and never touch the device,
so every other kind of node (character devices such as /dev/null, FIFOs,
sockets) is refused, and so is a symbolic link that does not lead to a
block device: whether ``--force`` should replace the link or the file it
points to is a guess blockvault does not make.

The partial file is created exclusively and without following links
(``O_CREAT | O_EXCL | O_NOFOLLOW``): a ``TARGET.blockvault-partial`` planted
as a link to another file is refused, not written through, and a second
restore to the same target while one runs is refused instead of both
writing one file.  Restored images are 0600 (``--mode`` for another), since
they hold a whole disk's data; without ``--force`` the finished file is
linked into place only if the target is still absent.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading

import native

from chunkstore import safefs
from chunkstore.config import fsync_dir
from chunkstore.errors import UnsafePathError
from engine.errors import BadInputError
from engine.progress import human_bytes
from engine.sources import target_format

PARTIAL_SUFFIX = ".blockvault-partial"
IMAGE_MODE = 0o600  # restored images hold a disk's data: the owner's alone unless --mode
BLKROGET = 0x125E  # _IO(0x12, 94): is the block device read-only
WHAT_RESTORE_WRITES = "restore writes regular files, block devices, or vddk:// disks"


class RestoreTarget:
    """Where restored bytes go: ``write(offset, data)`` from many threads at once."""

    writes_zeros = False
    # Zero blocks of this size inside a chunk are not written (when the target
    # reads as zeros): VMDK's grain and CBT's block, a multiple of every file
    # system's block size.  Raw files go down to 4 KiB (RawTarget).
    hole_block = 64 << 10

    def __init__(self, target: str, force: bool, mode: int = IMAGE_MODE):
        self.target = target
        self.force = force
        self.mode = mode
        self.warnings: list[str] = []
        self._created = False  # the partial file is ours to rename or delete

    def check(self) -> None:
        target = self.target
        if os.path.isdir(target):
            raise BadInputError(f"restore target {target} is a directory; give a file name")
        if os.path.lexists(target) and not self.force:
            raise BadInputError(f"restore target {target} exists; pass --force to overwrite it")
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise BadInputError(f"restore target directory {parent} does not exist")

    @property
    def partial(self) -> str:
        return self.target + PARTIAL_SUFFIX

    def open(self, size: int) -> None:
        raise NotImplementedError

    def write(self, offset: int, data) -> None:
        raise NotImplementedError

    def zero(self, offset: int, zeros) -> None:
        """Make ``len(zeros)`` bytes at ``offset`` read as zeros (only called on
        targets that may hold old data: ``writes_zeros``)."""
        self.write(offset, zeros)

    # -- in place (a rollback, engine/rollback.py) ------------------------------
    # Only targets that exist before the restore have these: a block device, a
    # vddk:// disk, a raw file rolled back in place (InPlaceFileTarget).
    punches_holes = False  # zero() deallocates (engine/inplace.py): zero blocks in chunks go that way too
    in_place = False
    resizes = False  # fit() changes its size (a file); past its old end it then reads as zeros
    capacity = 0  # bytes the target holds, known once it is open

    def open_reader(self):
        """A native Disk reading what the target holds now (GIL-free batched reads)."""
        raise NotImplementedError

    def close_reader(self, disk) -> None:
        disk.close()

    def fit(self, size: int) -> None:
        """Make the target the disk's size where it can (a file); devices keep theirs."""

    def partial_exists(self) -> BadInputError:
        """The refusal when the partial file's name is taken: by a link, or by
        another restore (running, or killed before it could clean up)."""
        if os.path.islink(self.partial):
            return BadInputError(f"{self.partial} is a symbolic link (to {os.readlink(self.partial)}); a restore "
                                 f"never writes through links: remove it and run the restore again")
        return BadInputError(f"{self.partial} already exists: another restore to {self.target} is running, or "
                             "one was killed before it could remove it; if none is running, remove it and run "
                             "the restore again")

    def create_partial(self) -> int:
        """The partial file, new and ours (O_EXCL, O_NOFOLLOW), with exactly ``self.mode``."""
        try:
            fd = safefs.create_file(self.partial, "restore partial file", self.mode)
        except FileExistsError:
            raise self.partial_exists() from None
        except UnsafePathError as e:
            raise BadInputError(str(e)) from None
        self._created = True
        return fd

    def finish(self) -> None:
        """Durable, and under the target's name."""
        self._publish()
        fsync_dir(os.path.dirname(os.path.abspath(self.target)))

    def _publish(self) -> None:
        """Rename the partial file over the target (``--force``), or, without
        ``--force``, link it in only if the target is still absent: a target
        that appeared while the restore ran (another restore finished) is kept."""
        if not self.force:
            try:
                os.link(self.partial, self.target, follow_symlinks=False)
            except FileExistsError:
                raise BadInputError(f"restore target {self.target} appeared while this restore ran (another "
                                    "restore?); it is kept; pass --force to overwrite it") from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    raise
            else:  # file systems without hard links fall back to the rename below
                os.unlink(self.partial)
                self._created = False
                return
        os.replace(self.partial, self.target)
        self._created = False

    def discard(self) -> None:
        if not self._created:  # never another restore's partial file
            return
        self._created = False
        try:
            os.unlink(self.partial)
        except FileNotFoundError:
            pass


_SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_sync_file_range = None


def write_back(fd: int) -> None:
    """Write the file's dirty pages to the device and wait for them, without
    fsync's journal commit (sync_file_range(2); fdatasync where there is none).
    Not a durability point: ``finish`` still fsyncs.  ctypes releases the GIL."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes
            func = ctypes.CDLL("libc.so.6", use_errno=True).sync_file_range
            func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = func
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range and _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_ALL) == 0:
        return
    os.fdatasync(fd)   # no sync_file_range, or a file (a device) that refuses it


class RawTarget(RestoreTarget):
    """A sparse raw image: holes wherever the backup has zero chunks, and
    wherever a chunk has a zero 4 KiB block (the file system's block): a
    fragmented disk's 4 KiB extents in 256 KiB chunks restored with 64 KiB
    holes took 16 times the source's space (issue 9 item 17).

    Written behind: every ``write_behind`` bytes, POSIX_FADV_DONTNEED on the
    file starts the writeback of what is dirty and drops from the page cache
    what is already on disk, and ``finish`` drops the rest after its fsync.
    A restore left to the page cache took a fresh page per 4 KiB restored,
    and on a VM whose host takes back the guest's free pages (virtio-balloon
    free page reporting, as here) each first touch of one is a fault in the
    host: perf put 83% of a 1 GiB restore from a bucket in the kernel's copy
    into the page cache (copy_folio_from_iter_atomic), 7.5 s of CPU and 9-14 s
    of wall time.  Written behind, the same pages are reused 32 MiB at a time:
    1.5 s of CPU, 2.5 s.  It also leaves the page cache to the machine's other
    work instead of filling it with a disk image nobody reads yet."""

    hole_block = 4 << 10
    write_behind = 32 << 20
    _unflushed = 0  # bytes written since the last write-behind (under _write_lock)

    def open(self, size: int) -> None:
        self.fd = self.create_partial()
        try:
            os.ftruncate(self.fd, size)
        except BaseException:
            self.discard()
            raise
        self._new_locks()

    def write(self, offset: int, data) -> None:
        # Buffered writes to one file serialise on its inode lock, and the
        # kernel spins while it waits: when page-cache writes were slow, perf
        # put a third of a restore's CPU in rwsem_spin_on_owner.  Queueing on
        # a lock of our own sleeps instead, and the other threads decompress.
        with self._write_lock:
            os.pwrite(self.fd, data, offset)
            self._unflushed += len(data)
            behind = self._unflushed >= self.write_behind
            if behind:
                self._unflushed = 0
        if behind:  # outside the write lock: the other threads write on while this one waits
            with self._behind_lock:
                write_back(self.fd)
                self.drop_cached()

    def _new_locks(self) -> None:
        self._write_lock = threading.Lock()
        self._behind_lock = threading.Lock()  # one write-behind at a time; the others wait for it

    def drop_cached(self) -> None:
        """Drop the file's clean pages from the page cache (and start writing back the dirty ones)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def finish(self) -> None:
        os.fsync(self.fd)
        self.drop_cached()
        os.close(self.fd)
        self.fd = -1
        super().finish()

    def discard(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        super().discard()


class InPlaceTarget(RawTarget):
    """A raw target written where it stands (no partial file renamed over it):
    finishing is an fsync, discarding only closes, and a device or file that
    existed before is never removed."""

    in_place = True

    def open_reader(self):
        return native.open_raw(self.target)

    def finish(self) -> None:
        os.fsync(self.fd)
        self.drop_cached()
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockDeviceTarget(InPlaceTarget):
    """An existing block device, written in place with positional writes.

    Opened with O_EXCL, which Linux refuses (EBUSY) while the device is
    mounted, swapped on, or held by LVM, md or another exclusive opener; the
    mount table is read first so that the usual case names the mount point.
    """

    hole_block = 64 << 10  # (with --zeroed-target) a device takes fewer, larger writes

    def __init__(self, target: str, force: bool, zeroed: bool = False):
        super().__init__(target, force)
        self.writes_zeros = not zeroed
        self.fd = -1

    def check(self) -> None:
        rdev = os.stat(self.target).st_rdev
        mounted = mount_points(rdev)
        if mounted:
            raise BadInputError(f"restore target {self.target} is mounted on {', '.join(mounted)}; "
                                "unmount it first (a restore overwrites the whole device)")
        if not self.force:
            raise BadInputError(f"restore target {self.target} is a block device: the restore overwrites "
                                "it in place; pass --force to confirm")

    def open(self, size: int) -> None:
        try:
            self.fd = os.open(self.target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise BadInputError(self._busy_message()) from None
            raise BadInputError(f"cannot open block device {self.target} for writing: {e.strerror}") from None
        self._new_locks()
        # Linux opens a read-only device for writing and fails each write (EPERM).
        if int.from_bytes(fcntl.ioctl(self.fd, BLKROGET, bytes(4)), "little"):
            self.discard()
            raise BadInputError(f"block device {self.target} is read-only; make it writable "
                                "(blockdev --setrw) or restore to another device")
        have = self.capacity = os.lseek(self.fd, 0, os.SEEK_END)
        if have < size:
            self.discard()
            raise BadInputError(f"block device {self.target} holds {have} bytes ({human_bytes(have)}), the "
                                f"backup needs {size} ({human_bytes(size)}); restore to a device at least "
                                "that large")
        if have > size:
            self.warnings.append(f"block device {self.target} holds {have} bytes, the backup {size}: its last "
                                 f"{have - size} bytes are left as they were")

    def write(self, offset: int, data) -> None:
        try:
            super().write(offset, data)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.target) from None

    def _busy_message(self) -> str:
        rdev = os.stat(self.target).st_rdev
        mounted = mount_points(rdev)
        if mounted:
            return (f"restore target {self.target} is mounted on {', '.join(mounted)}; unmount it first "
                    "(a restore overwrites the whole device)")
        holders = device_holders(rdev)
        held = f" (held by {', '.join(holders)})" if holders else ""
        return (f"restore target {self.target} is in use{held}: mounted, swapped on, part of LVM or md, or "
                "open exclusively by another program; release it first")


def _device_numbers(rdev: int) -> set[str]:
    """"MAJOR:MINOR" of the device and of its partitions (a mounted partition is the disk in use)."""
    numbers = {f"{os.major(rdev)}:{os.minor(rdev)}"}
    sysdir = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    try:
        names = os.listdir(sysdir)
    except OSError:
        return numbers
    for name in names:
        if not os.path.exists(os.path.join(sysdir, name, "partition")):
            continue
        try:
            with open(os.path.join(sysdir, name, "dev")) as f:
                numbers.add(f.read().strip())
        except OSError:
            continue
    return numbers


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mount_points(rdev: int) -> list[str]:
    """Where the device (or one of its partitions) is mounted, from /proc/self/mountinfo."""
    numbers = _device_numbers(rdev)
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] in numbers:
                    found.append(_unescape(fields[4]))
    except OSError:
        pass
    return found


def device_holders(rdev: int) -> list[str]:
    """Kernel devices stacked on this one (dm, md), from sysfs."""
    try:
        return sorted(os.listdir(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders"))
    except OSError:
        return []


_NODE_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"))


def _is_block_device(target: str, fmt: str | None) -> bool:
    """True for a block device (through symbolic links); refuses nodes a restore must not replace."""
    link = os.path.islink(target)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BadInputError(f"restore target {target}: {e.strerror}") from None
    shown = f"{target} (a link to {os.path.realpath(target)})" if link else target
    if st is not None and stat.S_ISBLK(st.st_mode):
        if fmt not in (None, "raw"):
            raise BadInputError(f"restore target {shown} is a block device, which takes the disk's raw bytes: "
                                f"drop --format {fmt}")
        return True
    for test, kind in _NODE_KINDS:
        if st is not None and test(st.st_mode):
            raise BadInputError(f"restore target {shown} is {kind}; {WHAT_RESTORE_WRITES}")
    if link and not (st is not None and stat.S_ISDIR(st.st_mode)):
        where = (f"points to {os.path.realpath(target)}" if st is not None
                 else f"points to {os.readlink(target)}, which does not exist")
        raise BadInputError(f"restore target {target} is a symbolic link that {where}; name the file itself, "
                            "or remove the link (blockvault does not guess which of the two to replace)")
    return False


class VmdkTarget(RestoreTarget):
    """A hosted monolithicSparse VMDK; zero grains stay unallocated."""

    def open(self, size: int) -> None:
        # Created in C like the raw partial file: O_EXCL | O_NOFOLLOW, this mode exactly.
        try:
            self.disk = native.create_vmdk(self.partial, size, mode=self.mode)
        except FileExistsError:
            raise self.partial_exists() from None
        self._created = True

    def write(self, offset: int, data) -> None:
        self.disk.write(offset, data)

    def finish(self) -> None:
        self.disk.finish()
        self.disk.close()
        super().finish()

    def discard(self) -> None:
        if getattr(self, "disk", None) is not None:
            self.disk.close()
        super().discard()


class VddkTarget(RestoreTarget):
    """An existing vSphere disk, written in place through VDDK."""

    in_place = True

    def __init__(self, target: str, force: bool, credentials_file: str | None = None, zeroed: bool = False):
        super().__init__(target, force)
        self.credentials_file = credentials_file
        self.writes_zeros = not zeroed

    def open_reader(self):
        return self.disk  # the writable VDDK handle reads too

    def close_reader(self, disk) -> None:
        pass  # closed with the target

    def check(self) -> None:
        from engine.vddk_url import parse_vddk_url
        if parse_vddk_url(self.target).snapshot:
            raise BadInputError("a restore writes a VM's base disk, never a snapshot: drop snapshot= from the URL")
        if not self.force:
            raise BadInputError(f"restoring to {self.target} overwrites that disk; pass --force to confirm")

    def open(self, size: int) -> None:
        from engine.vddk_url import open_vddk_url
        try:
            self.disk = open_vddk_url(self.target, self.credentials_file, writable=True)
        except OSError as e:
            raise BadInputError(f"cannot open {self.target} for writing: {e.strerror or e}") from None
        self.capacity = self.disk.size
        if self.disk.size < size:
            self.disk.close()
            raise BadInputError(f"target disk holds {self.disk.size} bytes, the backup needs {size}; "
                                "grow the disk first")

    def write(self, offset: int, data) -> None:
        self.disk.write(offset, data)

    def finish(self) -> None:
        self.disk.finish()
        self.disk.close()

    def discard(self) -> None:
        if getattr(self, "disk", None) is not None and not self.disk.closed:
            self.disk.close()


def make_target(target: str, force: bool = False, fmt: str | None = None,
                credentials_file: str | None = None, zeroed: bool = False,
                mode: int | None = None) -> RestoreTarget:
    """The target for what the user named; ``zeroed`` matters only where old data may remain,
    ``mode`` (the new file's permissions, default 0600) only for files."""
    if not target.startswith("vddk://") and _is_block_device(target, fmt):
        _no_mode(mode, f"{target} is a block device, written in place")
        return BlockDeviceTarget(target, force, zeroed)
    kind = target_format(target, fmt)
    file_mode = IMAGE_MODE if mode is None else mode
    if kind == "raw":
        return RawTarget(target, force, file_mode)
    if kind == "vmdk":
        return VmdkTarget(target, force, file_mode)
    if kind == "vddk":
        _no_mode(mode, "a vddk:// disk is written in place")
        return VddkTarget(target, force, credentials_file, zeroed)
    raise BadInputError(f"restore format {fmt!r} is unknown; use raw, vmdk or vddk")


def _no_mode(mode: int | None, why: str) -> None:
    if mode is not None:
        from engine.errors import UsageError
        raise UsageError(f"--mode sets the permissions of a new image file; {why}: drop --mode")
