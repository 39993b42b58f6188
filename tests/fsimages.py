"""Disk images made by the real tools, nothing mounted: sfdisk and sgdisk partition
tables, mkfs.ext4 -d, mkfs.vfat + mcopy, mkntfs + ntfscp, mkfs.exfat, mkswap;
and the source trees they are filled from, for byte-for-byte comparison."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

MiB = 1 << 20
SECTOR = 512
TOOLS = ("sfdisk", "sgdisk", "mkfs.ext4", "debugfs", "dumpe2fs", "mkfs.vfat", "mcopy", "mkntfs", "ntfscp",
         "mkfs.exfat", "mkswap", "cryptsetup")
# mtools and ntfscp convert names with the locale's charset: UTF-8 for the non-ASCII names.
_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}
T0 = 1_000_000_000  # 2001-09-09: whole, even seconds (FAT keeps 2-second times)


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not os.path.exists(f"/sbin/{t}")]


def run(*cmd, input: str | None = None) -> None:
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, input=input, env=_ENV,
                   timeout=300)


def make_tree(root: str, rng, symlinks: bool = True, sparse: bool = True) -> dict[str, bytes]:
    """The files every filesystem test restores: one spanning many chunks, a
    sparse one, names with spaces and non-ASCII, a nested directory, an
    executable, a symbolic link; fixed mtimes.  Returns path -> content."""
    files = {
        "small.txt": b"hello, file-level restore\n",
        "big.bin": rng.bytes(3 * MiB + 12345),                     # 49 chunks of 64 KiB
        "dir with spaces/ünïcödé file.txt": "naïve café — 日本語\n".encode() * 100,
        "dir with spaces/nested/deep.txt": b"deep\n" * 1000,
        "run.sh": b"#!/bin/sh\necho hi\n",
    }
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.chmod(os.path.join(root, "run.sh"), 0o750)
    os.chmod(os.path.join(root, "small.txt"), 0o640)
    if sparse:
        path = os.path.join(root, "sparse.img")
        with open(path, "wb") as f:
            f.truncate(8 * MiB)
            f.write(b"head" * 1024)
            f.seek(5 * MiB + 3)
            f.write(b"middle")
            f.seek(8 * MiB - 4)
            f.write(b"tail")
        with open(path, "rb") as f:
            files["sparse.img"] = f.read()
    if symlinks:
        os.symlink("small.txt", os.path.join(root, "link to small"))
    stamp(root)
    return files


def stamp(root: str) -> None:
    """Fixed, distinct mtimes (even seconds), directories after their contents."""
    entries = []
    for dirpath, dirs, names in os.walk(root):
        for n in names + dirs:
            entries.append(os.path.join(dirpath, n))
    for i, path in enumerate(sorted(entries, key=lambda p: -p.count(os.sep))):
        os.utime(path, (T0 + 2 * i, T0 + 2 * i), follow_symlinks=False)


def ext4(path: str, size: int, src: str | None, *extra: str) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-I", "256", "-E", "lazy_itable_init=1,nodiscard", *extra,
        *(("-d", src) if src else ()), path)
    return path


def fat32(path: str, size: int, src: str) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.vfat", "-F", "32", path)
    run("mcopy", "-i", path, "-s", "-m", "-Q", *[os.path.join(src, n) for n in sorted(os.listdir(src))], "::/")
    return path


def ntfs(path: str, size: int, files: dict[str, str]) -> str:
    """mkntfs and ntfscp: files (name in the root -> local file); ntfscp makes no directories."""
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkntfs", "-F", "-Q", "-q", path)
    for name, local in files.items():
        run("ntfscp", "-f", "-q", path, local, name)
    return path


def exfat(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.exfat", path)
    return path


def swap(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkswap", path)
    return path


def luks(path: str, size: int) -> str:
    """cryptsetup luksFormat on a file (no device mapper needed to write the header)."""
    with open(path, "wb") as f:
        f.truncate(size)
    key = path + ".key"
    with open(key, "w") as f:
        f.write("not the point of the test")
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key, path)
    return path


def mbr(path: str, size: int, parts: list[tuple[int, int, str]]) -> str:
    """sfdisk: (start MiB, size MiB, type) per partition; a 5th+ goes into an extended one."""
    with open(path, "wb") as f:
        f.truncate(size)
    lines = ["label: dos"] + [f"start={s * MiB // SECTOR}, size={n * MiB // SECTOR}, type={t}" for s, n, t in parts]
    run("sfdisk", "-q", path, input="\n".join(lines) + "\n")
    return path


def gpt(path: str, size: int, parts: list[tuple[int, int, str, str]]) -> str:
    """sgdisk: (start MiB, size MiB, type code, name) per partition, numbered 1.."""
    with open(path, "wb") as f:
        f.truncate(size)
    args = []
    for i, (s, n, code, name) in enumerate(parts, 1):
        args += ["-n", f"{i}:{s * MiB // SECTOR}:{(s + n) * MiB // SECTOR - 1}", "-t", f"{i}:{code}", "-c", f"{i}:{name}"]
    run("sgdisk", *args, path)
    return path


def place(disk: str, offset: int, part: str) -> None:
    """Copy a filesystem image into a disk image at ``offset``, keeping holes."""
    with open(part, "rb") as src, open(disk, "r+b") as dst:
        fd = src.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data_at, os.SEEK_HOLE)
            while data_at < hole:
                n = min(8 * MiB, hole - data_at)
                os.pwrite(dst.fileno(), os.pread(fd, n, data_at), offset + data_at)
                data_at += n
            pos = hole


def patch(image: str, old: bytes, new: bytes, count: int = 1) -> list[int]:
    """Replace ``old`` by ``new`` (same length) in an image file; the offsets patched."""
    assert len(old) == len(new)
    with open(image, "r+b") as f:
        data = f.read()
        at, found = 0, []
        while True:
            at = data.find(old, at)
            if at < 0:
                break
            found.append(at)
            at += 1
        assert len(found) == count, (old, found)
        for at in found:
            f.seek(at)
            f.write(new)
    return found


def tree_of(root: str) -> dict[str, tuple]:
    """path -> (kind, content or link target, mode bits, mtime ns) of everything under root."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path), None, st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out
