"""Writing files and directories from a point's filesystem into DEST, and nowhere else.

The names come from a filesystem image, which anyone who controlled the
backed-up machine could have crafted: ``..``, ``/``, names with slashes or
NUL, a symbolic link and a directory of the same name in one directory (so
that a later ``x/passwd`` would land in ``/etc``), a directory that contains
itself.  So nothing here joins paths: every file is created relative to an
open descriptor of the directory it belongs in (``dir_fd``), with
``O_NOFOLLOW`` and ``O_EXCL``, every directory is opened with ``O_NOFOLLOW``
after it is made, and a name that is not one plain component is skipped and
reported.  Symbolic links are recreated as links, never followed.

Files are written sparse: 4 KiB blocks of zeros stay holes (TSK reads a
sparse file's holes without touching the disk).  Permission bits and
access/modification times are restored (a directory's after its contents);
setuid/setgid bits and owners are not: the files belong to whoever restores
them, and a setuid binary from another machine should not appear with its
powers in a restore directory.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from engine.errors import BadInputError, FileLevelError
from engine.filesystems import Entry, Filesystem, encode_name
from engine.restore import nonzero_runs

READ_SIZE = 1 << 20
HOLE_BLOCK = 4096
MAX_DEPTH = 400           # directory descriptors held at once (the process's limit is 1024)
MODE_MASK = 0o1777        # no setuid, no setgid


@dataclass
class ExtractReport:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def as_dict(self) -> dict:
        return {"files": self.files, "directories": self.directories, "symlinks": self.symlinks,
                "bytes": self.bytes, "skipped": self.skipped}


def plain_name(name: str) -> bool:
    """A name that is one path component, whatever the filesystem claims."""
    raw = encode_name(name)
    return raw not in (b"", b".", b"..") and b"/" not in raw and b"\0" not in raw


def open_dest(dest: str) -> int:
    """DEST as a directory descriptor: an existing directory, or a new one
    (its parent must exist)."""
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        pass
    try:
        return os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise BadInputError(f"{dest} is not a directory: DEST is the directory the files are written into") \
            from None


def exists_in(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


class Extractor:
    """Copies entries of one filesystem under one open DEST directory."""

    def __init__(self, fs: Filesystem, dest_fd: int, force: bool = False):
        self.fs = fs
        self.dest_fd = dest_fd
        self.force = force
        self.report = ExtractReport()
        self._seen_dirs: set[int] = set()

    def extract(self, entry: Entry, path: str, into_dest: bool = False) -> None:
        """``entry`` (found at ``path``) as DEST/<its name>; with ``into_dest``
        (the root directory) its contents go straight into DEST."""
        if into_dest:
            self._seen_dirs.add(entry.addr)
            self._tree(entry, self.dest_fd, path, own_fd=False)
            return
        if not plain_name(entry.name):
            raise FileLevelError(f"{path}: the filesystem names it {entry.name!r}, which is not a plain file "
                                 "name; it is not written")
        self._one(entry, self.dest_fd, path, depth=0)

    # -- one entry -------------------------------------------------------------

    def _one(self, entry: Entry, parent_fd: int, path: str, depth: int) -> None:
        if entry.kind == "file":
            self._file(entry, parent_fd, path)
        elif entry.kind == "dir":
            if entry.addr in self._seen_dirs:
                self.report.skip(path, "a directory already written (the filesystem links it twice, or "
                                       "into itself)")
                return
            if depth >= MAX_DEPTH:
                self.report.skip(path, f"nested deeper than {MAX_DEPTH} directories")
                return
            self._seen_dirs.add(entry.addr)
            fd = self._mkdir(entry, parent_fd, path)
            if fd is not None:
                self._tree(entry, fd, path, own_fd=True, depth=depth + 1)
        elif entry.kind == "symlink":
            self._symlink(entry, parent_fd, path)
        else:
            self.report.skip(path, f"a {entry.kind} special file: not restored")

    def _tree(self, directory: Entry, fd: int, path: str, own_fd: bool, depth: int = 1) -> None:
        try:
            for child in self.fs.children(directory, path):
                child_path = (path.rstrip("/") + "/" + child.name)
                if not plain_name(child.name):
                    self.report.skip(child_path, f"the name {child.name!r} is not a plain file name")
                    continue
                self._one(child, fd, child_path, depth)
            if own_fd:
                os.fchmod(fd, directory.mode & MODE_MASK)
                os.utime(fd, ns=(directory.atime_ns, directory.mtime_ns))
        finally:
            if own_fd:
                os.close(fd)
        if own_fd:
            self.report.directories += 1

    def _make_room(self, parent_fd: int, name: str, path: str, want_dir: bool) -> bool:
        """True when ``name`` may be created now; a clash is skipped (a name twice
        in one directory) or, with --force, a file or link in the way removed."""
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return True
        if want_dir and stat.S_ISDIR(st.st_mode) and self.force:
            return True
        if not self.force:
            self.report.skip(path, "a file of that name is already there (the filesystem lists the name twice, "
                                   "or DEST holds it: --force replaces files)")
            return False
        if stat.S_ISDIR(st.st_mode):
            self.report.skip(path, "a directory of that name is in the way")
            return False
        os.unlink(name, dir_fd=parent_fd)
        return True

    def _mkdir(self, entry: Entry, parent_fd: int, path: str) -> int | None:
        if not self._make_room(parent_fd, entry.name, path, want_dir=True):
            return None
        try:
            os.mkdir(entry.name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass  # --force into an existing directory
        except OSError as e:
            return self._skip_os(path, e)
        return os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)

    def _file(self, entry: Entry, parent_fd: int, path: str) -> None:
        if not self._make_room(parent_fd, entry.name, path, want_dir=False):
            return
        try:
            fd = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent_fd)
        except OSError as e:
            self._skip_os(path, e)
            return
        try:
            handle = self.fs.open_file(entry)
            for offset, stop in self.fs.data_ranges(handle, entry):
                while offset < stop:
                    data = self.fs.read(handle, entry, offset, min(READ_SIZE, stop - offset))
                    for start, end in nonzero_runs(data, HOLE_BLOCK):
                        os.pwrite(fd, memoryview(data)[start:end], offset + start)
                    offset += len(data)
            os.ftruncate(fd, entry.size)
            os.fchmod(fd, entry.mode & MODE_MASK)
            os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
        except BaseException:
            os.close(fd)
            os.unlink(entry.name, dir_fd=parent_fd)  # no half file left behind
            raise
        os.close(fd)
        self.report.files += 1
        self.report.bytes += entry.size

    def _symlink(self, entry: Entry, parent_fd: int, path: str) -> None:
        target = entry.link or ""
        if not target or "\0" in target:
            self.report.skip(path, "a symbolic link with an empty or impossible target")
            return
        if not self._make_room(parent_fd, entry.name, path, want_dir=False):
            return
        try:
            os.symlink(encode_name(target), entry.name, dir_fd=parent_fd)
            os.utime(entry.name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        except OSError as e:
            self._skip_os(path, e)
            return
        self.report.symlinks += 1

    def _skip_os(self, path: str, e: OSError):
        """A name this system cannot hold (too long, ...) is skipped; anything
        else (no space, no permission) stops the restore."""
        if e.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
            self.report.skip(path, os.strerror(e.errno))
            return None
        raise e
