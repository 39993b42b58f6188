"""A raw image file rolled back in place: the one target a rollback adds.

A full restore writes a new partial file and renames it over the target, so
an interrupted restore never leaves a half-written image.  A rollback exists
to write less than that: only the chunks that differ, into the file that
already holds the older point.  So this target opens the existing file
(``O_NOFOLLOW``: never through a link), resizes it to the restored disk's
size (truncation grows with zeros and shrinks), and writes in place.  An
interrupted rollback leaves the file a mix of both points; engine/rollback.py
says so, and a second rollback finishes the job.

Zero chunks where the old point had data, and zero 4 KiB blocks inside the
chunks written, are punched out as holes (``fallocate(PUNCH_HOLE)``), so the
file ends as sparse as a full restore would make it; on a file system
without hole punching zeros are written.
An exclusive ``flock`` keeps two rollbacks from writing one file at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat


from engine.errors import BadInputError
from engine.targets import InPlaceTarget

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``length`` bytes at ``offset`` (they read as zeros; the size
    is kept).  False where the file system cannot punch holes.  ctypes
    releases the GIL around the call."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class InPlaceFileTarget(InPlaceTarget):
    """An existing raw image, written in place (a rollback)."""

    writes_zeros = True  # it holds old data: zero chunks are made zero (punched)
    resizes = True
    punches_holes = True  # zero 4 KiB blocks inside a written chunk are punched as well

    def __init__(self, target: str):
        super().__init__(target, force=True)
        self.fd = -1
        self._punch = True

    def check(self) -> None:
        try:
            st = os.lstat(self.target)
        except FileNotFoundError:
            raise BadInputError(f"rollback target {self.target} does not exist: a rollback changes a disk that "
                                "already holds a point of it; to create the image, restore without "
                                "--rollback-from/--rollback-compare") from None
        if not stat.S_ISREG(st.st_mode):
            raise BadInputError(f"rollback target {self.target} is not a regular file; a rollback writes raw "
                                "image files, block devices or vddk:// disks in place")

    def open(self, size: int) -> None:
        try:
            self.fd = os.open(self.target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise BadInputError(f"cannot open rollback target {self.target} for writing: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.discard()
            raise BadInputError(f"rollback target {self.target} is being written by another rollback; "
                                "wait for it to finish") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between check() and open()
            self.discard()
            raise BadInputError(f"rollback target {self.target} is not a regular file")
        self.capacity = st.st_size
        self._new_locks()

    def fit(self, size: int) -> None:
        """Grow (with zeros) or shrink the file to the restored disk's size."""
        if self.capacity != size:
            os.ftruncate(self.fd, size)
            self.capacity = size

    def zero(self, offset: int, zeros) -> None:
        if self._punch and punch_hole(self.fd, offset, len(zeros)):
            return
        self._punch = False  # this file system cannot: zeros from now on
        self.write(offset, zeros)
