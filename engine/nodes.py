"""Opening a file the user names for reading, without hanging or side effects.

A backup's source and its changed-areas file are named by the user, and a
name can lead to any kind of node.  A FIFO blocks ``open()`` until a writer
comes (forever, in a cron job), a socket cannot be opened at all, and a
character device is not a disk: reading ``/dev/zero`` never ends, and merely
opening some devices acts (``/dev/watchdog`` arms the machine's watchdog).
So the node is looked at with ``stat`` before it is opened, and opened with
``O_NONBLOCK`` so that a FIFO swapped in meanwhile is seen by ``fstat``
instead of blocking.
"""

from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"))


def kind_of(mode: int) -> str:
    """'a FIFO (named pipe)', 'a block device'... for a stat mode."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


class WrongNode(Exception):
    """The path leads to a node of another kind than wanted; ``kind`` says which."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def open_for_reading(path: str, block_devices: bool) -> tuple[int, os.stat_result]:
    """An fd (blocking again) and its fstat for a regular file, or a block device when
    ``block_devices``; WrongNode for any other kind, OSError when it cannot be opened."""
    def check(st: os.stat_result) -> None:
        if not (stat.S_ISREG(st.st_mode) or (block_devices and stat.S_ISBLK(st.st_mode))):
            raise WrongNode(kind_of(st.st_mode))

    check(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        check(st)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def current_size(fd: int) -> int:
    """The size of the open regular file or block device now (lseek to the end works for both)."""
    return os.lseek(fd, 0, os.SEEK_END)
