"""Files and directories inside a store, opened as what they are and nothing else.

A store (or a restore directory) may have been prepared by someone else: a
copy from untrusted media, a shared directory another user can write to.
Run as root, a ``STORE/lock`` that is a symbolic link to ``/etc/shadow``
would have the backup truncate it, and a ``packs/ab`` link to ``/etc`` would
have packs written there.  So nothing in a store is a link: every file the
store creates is opened ``O_NOFOLLOW`` (and ``O_EXCL`` where it creates a
new one), directories are made and opened without following links, and
``check_tree`` refuses a store holding one before anything is opened.

Modes are fixed here too: a store holds the secret seed of its digests
(``config.json``) and the data of every disk it backs up, so its directories
are 0700 and its files 0600 whatever the umask.
"""

from __future__ import annotations

import errno
import os
import stat

from chunkstore.errors import UnsafePathError

DIR_MODE = 0o700
FILE_MODE = 0o600

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse_link(path: str, what: str) -> UnsafePathError:
    try:
        to = f" (to {os.readlink(path)})"
    except OSError:
        to = ""
    return UnsafePathError(f"{what} {path} is a symbolic link{to}; a store holds no links, and blockvault "
                           "does not follow them (they could make it write outside the store): replace the "
                           "link by the file or directory it points to, or remove it")


def open_file(path: str, flags: int, what: str, mode: int = FILE_MODE) -> int:
    """``os.open`` that never follows a link at the last component and only
    returns regular files (a device node or a FIFO planted under a store
    file's name is refused, before a byte is written to it)."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse_link(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a regular file; remove it (a store holds only "
                                  "regular files and directories)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(path: str, what: str, mode: int = FILE_MODE, flags: int = os.O_WRONLY) -> int:
    """A new file, created here and now (``O_EXCL``: a file or a link of that
    name already there fails with FileExistsError), with exactly ``mode``."""
    fd = open_file(path, flags | os.O_CREAT | os.O_EXCL, what, mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_durably(path: str, body: bytes, what: str) -> None:
    """Put ``body`` at ``path`` whole or not at all: a new 0600 file under a
    temporary name (a link or a leftover of that name is removed, never written
    through), fsync'ed, renamed over ``path``, and the directory fsync'ed."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = create_file(tmp, what)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str, what: str, mode: int = DIR_MODE) -> None:
    """The directory ``path``, made with ``mode`` if missing; a link (or a
    file) where it should be is refused, never followed."""
    try:
        os.mkdir(path, mode)
        return
    except FileExistsError:
        pass
    check_dir(path, what)


def check_dir(path: str, what: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_link(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a directory; remove it")


def check_tree(store_path: str, files: tuple[str, ...], dirs: tuple[str, ...], fan_out: str) -> None:
    """Refuse a store that holds a link where blockvault opens something:
    ``files`` and ``dirs`` (relative names; missing ones are fine, their
    owners report them) and every entry of the ``fan_out`` directory (the
    packs' ``XX`` subdirectories).  The store's own path may be a link."""
    for name in files:
        path = os.path.join(store_path, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise _refuse_link(path, "store file")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"store file {path} is not a regular file; remove it (a store holds only "
                                  "regular files and directories)")
    for name in dirs:
        path = os.path.join(store_path, name)
        if os.path.lexists(path):
            check_dir(path, "store directory")
    root = os.path.join(store_path, fan_out)
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_symlink():
            raise _refuse_link(entry.path, "store directory")
