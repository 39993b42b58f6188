"""File-level restore (``files partitions|ls|get``) on disks built by the real tools.

Nothing is mounted: sfdisk/sgdisk write the partition tables, mkfs.ext4 -d,
mkfs.vfat + mcopy and mkntfs + ntfscp fill the filesystems (tests/fsimages.py),
the images are backed up with the real command, and what ``files get``
writes is compared byte for byte (and mode and mtime) with the source tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import fsimages
import jsonshape
from fsimages import MiB
from helpers import rng, run_cli

CS = 64 << 10

if fsimages.missing_tools() and os.environ.get("CI", "").strip().lower() in ("", "0", "false", "no"):
    pytest.skip(f"file-level tests need {', '.join(fsimages.missing_tools())} (tools/install.sh --test)",
                allow_module_level=True)


SECTIONS, _ = jsonshape.parse()


def bv(*args, expect: int = 0, timeout: float = 180) -> dict:
    """The real command with --json; its document checked against docs/JSON.md."""
    proc = run_cli(*map(str, args), "--json", timeout=timeout)
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    section = "error" if expect else (f"files {args[1]}" if args[0] == "files" else None)
    if section:
        problems = jsonshape.check(doc, section, SECTIONS)
        assert not problems, "\n".join(problems)
    return doc


def backed_up(tmp_path, image: str, disk: str = "d") -> str:
    store = tmp_path / "store"
    if not store.exists():
        bv("init", store, "--chunk-size", "64K")
    bv("backup", store, image, "--disk", disk)
    return str(store)


def assert_restored(dest: str, files: dict[str, bytes], src: str, modes: bool = True) -> None:
    """Every source file is in DEST with its bytes, mode and mtime."""
    got, want = fsimages.tree_of(dest), fsimages.tree_of(src)
    for rel, data in files.items():
        assert got[rel][0] == "file" and got[rel][1] == data, rel
    for rel, (kind, content, mode, mtime) in want.items():
        assert rel in got, rel
        assert got[rel][0] == kind and got[rel][1] == content, rel
        assert got[rel][3] == mtime, (rel, got[rel][3], mtime)
        if modes and mode is not None:
            assert got[rel][2] == mode, (rel, oct(got[rel][2]), oct(mode))


def test_ext4_in_an_mbr_table_is_listed_and_restored_byte_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = fsimages.make_tree(str(src), rng(1))
    disk = fsimages.mbr(str(tmp_path / "disk.img"), 128 * MiB, [(1, 96, "83"), (97, 16, "82")])
    fsimages.place(disk, 1 * MiB, fsimages.ext4(str(tmp_path / "p1"), 96 * MiB, str(src)))
    fsimages.place(disk, 97 * MiB, fsimages.swap(str(tmp_path / "p2"), 16 * MiB))
    store = backed_up(tmp_path, disk)

    parts = bv("files", "partitions", store, "d@1")
    assert parts["table"] == "mbr" and parts["filesystem"] is None
    assert [(p["number"], p["start"], p["length"], p["filesystem"], p["note"]) for p in parts["partitions"]] == \
        [(1, 1 * MiB, 96 * MiB, "ext4", None), (2, 97 * MiB, 16 * MiB, None, "swap space")]

    # Without --partition: the only partition holding a filesystem.
    ls = bv("files", "ls", store, "d@latest", "/")
    assert ls["partition"] == 1 and ls["filesystem"] == "ext4" and ls["type"] == "dir"
    by_name = {e["name"]: e for e in ls["entries"]}
    assert set(by_name) == set(os.listdir(src)) | {"lost+found"}
    assert by_name["big.bin"]["size"] == len(files["big.bin"]) and by_name["big.bin"]["type"] == "file"
    assert by_name["run.sh"]["mode"] == "0750" and by_name["link to small"]["link"] == "small.txt"
    assert by_name["dir with spaces"]["type"] == "dir"
    sub = bv("files", "ls", store, "d@1", "/dir with spaces", "--partition", "1")
    assert [e["name"] for e in sub["entries"]] == ["nested", "ünïcödé file.txt"]

    text = run_cli("files", "ls", str(store), "d@1", "/dir with spaces", "--long")
    assert text.returncode == 0 and "ünïcödé file.txt" in text.stdout and text.stdout.startswith("drwx")
    assert "files ls d@1: 2 entries in /dir with spaces; read" in text.stderr

    dest = tmp_path / "out"
    got = bv("files", "get", store, "d@1", "/", dest)
    assert got["files"] == len(files) and got["symlinks"] == 1 and got["skipped"] == []
    shutil_free = fsimages.tree_of(str(dest))
    assert set(shutil_free) == set(fsimages.tree_of(str(src))) | {"lost+found"}
    assert_restored(str(dest), files, str(src))
    err = bv("files", "get", store, "d@1", "/", dest, expect=2)  # the root's names are already in DEST
    assert "already holds" in err["error"]["message"] and "--force" in err["error"]["message"]
    sparse = os.stat(dest / "sparse.img")
    assert sparse.st_size == 8 * MiB and sparse.st_blocks * 512 <= 64 << 10  # the holes stay holes

    # Single files and a directory, into an existing DEST; a clash is refused unless --force.
    dest2 = tmp_path / "out2"
    got = bv("files", "get", store, "d@1", "/big.bin", "/dir with spaces/nested", "/link to small", dest2)
    assert sorted(os.listdir(dest2)) == ["big.bin", "link to small", "nested"]
    assert (dest2 / "big.bin").read_bytes() == files["big.bin"]
    assert (dest2 / "nested" / "deep.txt").read_bytes() == files["dir with spaces/nested/deep.txt"]
    assert os.readlink(dest2 / "link to small") == "small.txt"
    (dest2 / "big.bin").write_bytes(b"mine")
    err = bv("files", "get", store, "d@1", "/big.bin", dest2, expect=2)
    assert "already holds 'big.bin'" in err["error"]["message"]
    assert (dest2 / "big.bin").read_bytes() == b"mine"
    bv("files", "get", store, "d@1", "/big.bin", dest2, "--force")
    assert (dest2 / "big.bin").read_bytes() == files["big.bin"]


def test_gpt_with_fat32_ntfs_and_exfat(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = fsimages.make_tree(str(src), rng(2), symlinks=False)
    disk = fsimages.gpt(str(tmp_path / "disk.img"), 240 * MiB,
                        [(1, 80, "0700", "fat part"), (81, 80, "0700", "ntfs part"), (161, 64, "0700", "exfat")])
    fsimages.place(disk, 1 * MiB, fsimages.fat32(str(tmp_path / "p1"), 80 * MiB, str(src)))
    ntfs_files = {"big.bin": str(src / "big.bin"), "naïve café.txt": str(src / "dir with spaces/ünïcödé file.txt"),
                  "sparse.img": str(src / "sparse.img")}
    fsimages.place(disk, 81 * MiB, fsimages.ntfs(str(tmp_path / "p2"), 80 * MiB, ntfs_files))
    fsimages.place(disk, 161 * MiB, fsimages.exfat(str(tmp_path / "p3"), 64 * MiB))
    store = backed_up(tmp_path, disk)

    parts = bv("files", "partitions", store, "d@1")
    assert parts["table"] == "gpt"
    assert [(p["number"], p["description"], p["filesystem"]) for p in parts["partitions"]] == \
        [(1, "fat part", "fat32"), (2, "ntfs part", "ntfs"), (3, "exfat", "exfat")]
    err = bv("files", "ls", store, "d@1", "/", expect=2)
    assert "--partition" in err["error"]["message"] and err["error"]["code"] == "usage"

    dest = tmp_path / "fat"
    got = bv("files", "get", store, "d@1", "/", dest, "--partition", "1")
    assert got["filesystem"] == "fat32" and got["files"] == len(files)
    assert_restored(str(dest), files, str(src), modes=False)  # FAT keeps no modes...
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o644  # ...and none come out writable by all

    ls = bv("files", "ls", store, "d@1", "/", "--partition", "2")
    assert sorted(e["name"] for e in ls["entries"]) == sorted(ntfs_files)  # no $MFT, no $Bitmap
    dest = tmp_path / "ntfs"
    bv("files", "get", store, "d@1", *[f"/{n}" for n in ntfs_files], dest, "--partition", "2")
    for name, local in ntfs_files.items():
        with open(local, "rb") as f:
            assert (dest / name).read_bytes() == f.read(), name
    # Case-insensitive filesystems find a name however it is written.
    bv("files", "get", store, "d@1", "/BIG.BIN", tmp_path / "ci", "--partition", "2")
    assert (tmp_path / "ci" / "big.bin").read_bytes() == files["big.bin"]

    ls = bv("files", "ls", store, "d@1", "/", "--partition", "3")
    assert ls["filesystem"] == "exfat" and ls["entries"] == []


def _changed_areas(old: str, new: str, path: str) -> str:
    """A DiskChangeInfo of the 64 KiB blocks that differ: what CBT would say."""
    areas = []
    with open(old, "rb") as a, open(new, "rb") as b:
        at = 0
        while True:
            x, y = a.read(CS), b.read(CS)
            if not x and not y:
                break
            if x != y:
                areas.append({"start": at, "length": CS})
            at += CS
    size = os.path.getsize(new)
    with open(path, "w") as f:
        json.dump({"startOffset": 0, "length": size, "changedArea": areas}, f)
    return path


def test_a_point_of_a_chain_reads_through_its_incremental_manifest(tmp_path):
    """An incremental built on its base's manifest (a change list, as CBT gives):
    each point gives its own files, the unchanged ones from segments it shares."""
    src = tmp_path / "src"
    src.mkdir()
    files = fsimages.make_tree(str(src), rng(3))
    img = fsimages.ext4(str(tmp_path / "disk.img"), 200 * MiB, str(src))  # 4 manifest segments
    store = backed_up(tmp_path, img)
    before = tmp_path / "before.img"
    before.write_bytes(open(img, "rb").read())

    new_small = b"changed after the full backup\n" * 10
    (tmp_path / "new_small").write_bytes(new_small)
    fsimages.run("debugfs", "-w", "-R", "rm /small.txt", img)
    fsimages.run("debugfs", "-w", "-R", f"write {tmp_path / 'new_small'} /small.txt", img)
    fsimages.run("debugfs", "-w", "-R", 'rm "/dir with spaces/nested/deep.txt"', img)
    cbt = _changed_areas(str(before), img, str(tmp_path / "cbt.json"))
    inc = bv("backup", store, img, "--disk", "d", "--mode", "incremental", "--changed-areas", cbt)
    assert inc["base"] == "d@1" and inc["stats"]["changed_areas"] is True
    assert inc["stats"]["chunks_read"] < 40

    for point, small in (("d@1", files["small.txt"]), ("d@2", new_small)):
        dest = tmp_path / point
        bv("files", "get", store, point, "/small.txt", "/big.bin", "/sparse.img", dest)
        assert (dest / "small.txt").read_bytes() == small, point
        assert (dest / "big.bin").read_bytes() == files["big.bin"], point
        assert (dest / "sparse.img").read_bytes() == files["sparse.img"], point
    assert [e["name"] for e in bv("files", "ls", store, "d@1", "/dir with spaces/nested")["entries"]] == ["deep.txt"]
    assert bv("files", "ls", store, "d@2", "/dir with spaces/nested")["entries"] == []
    err = bv("files", "get", store, "d@2", "/dir with spaces/nested/deep.txt", tmp_path / "x", expect=1)
    assert err["error"]["code"] == "not_found" and "deep.txt" in err["error"]["message"]


def test_a_listing_of_a_20_gib_disk_reads_a_tiny_share_of_its_chunks(tmp_path):
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    one = rng(4).bytes(1 * MiB)
    (src / "data" / "one.bin").write_bytes(one)
    (src / "hello.txt").write_bytes(b"hello\n")
    img = fsimages.ext4(str(tmp_path / "disk.img"), 20 << 30, str(src))
    store = backed_up(tmp_path, img)
    ls = bv("files", "ls", store, "d@1", "/")
    assert ls["chunks_total"] == (20 << 30) // CS
    assert sorted(e["name"] for e in ls["entries"]) == ["data", "hello.txt", "lost+found"]
    assert 0 < ls["chunks_read"] < ls["chunks_total"] // 1000  # under 0.1%
    got = bv("files", "get", store, "d@1", "/data/one.bin", tmp_path / "out")
    assert (tmp_path / "out" / "one.bin").read_bytes() == one
    assert got["chunks_read"] <= 16 + 8  # the file's 16 chunks and a few of metadata


def test_errors_name_what_is_wrong(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    disk = fsimages.mbr(str(tmp_path / "disk.img"), 64 * MiB, [(1, 30, "83"), (31, 16, "83"), (47, 16, "83")])
    fsimages.place(disk, 1 * MiB, fsimages.ext4(str(tmp_path / "p1"), 30 * MiB, str(src)))
    with open(disk, "r+b") as f:  # partition 2: noise
        f.seek(31 * MiB)
        f.write(rng(5).bytes(1 * MiB))
    fsimages.place(disk, 47 * MiB, fsimages.luks(str(tmp_path / "p3"), 16 * MiB))  # partition 3: LUKS2
    store = backed_up(tmp_path, disk)

    err = bv("files", "ls", store, "d@1", "/", "--partition", "2", expect=1)
    assert err["error"]["code"] == "no_filesystem" and "partition 2 of d@1" in err["error"]["message"]
    err = bv("files", "ls", store, "d@1", "/", "--partition", "3", expect=1)
    assert err["error"]["code"] == "encrypted" and "LUKS" in err["error"]["message"]
    err = bv("files", "ls", store, "d@1", "/", "--partition", "9", expect=1)
    assert err["error"]["code"] == "not_found" and "partitions are 1, 2, 3" in err["error"]["message"]
    err = bv("files", "ls", store, "d@1", "/missing/f", "--partition", "1", expect=1)
    assert err["error"]["code"] == "not_found" and "'/missing' does not exist" in err["error"]["message"]
    assert err["command"] == "files ls"
    err = bv("files", "ls", store, "d@1", "/f/g", "--partition", "1", expect=1)
    assert "/f is not a directory" in err["error"]["message"]
    err = bv("files", "ls", store, "nodisk@1", "/", expect=1)
    assert err["error"]["code"] == "not_found"
    # A PATH that does not exist: nothing written, not even DEST's other files.
    err = bv("files", "get", store, "d@1", "/f", "/nope", tmp_path / "dest", "--partition", "1", expect=1)
    assert not (tmp_path / "dest").exists()
    parts = bv("files", "partitions", store, "d@1")
    assert [(p["filesystem"], p["note"]) for p in parts["partitions"]] == \
        [("ext4", None), (None, "no filesystem"), (None, "LUKS encrypted")]
    plain = run_cli("files", "ls", store, "d@1", "/", "--partition", "3")
    assert plain.returncode == 1 and plain.stdout == "" and "cryptsetup" in plain.stderr
    assert "Traceback" not in plain.stderr


def _sandbox(tmp_path):
    """DEST inside a directory that holds nothing else, and a directory beside it
    that a link from the image points at: nothing may appear outside DEST."""
    box = tmp_path / "box"
    (box / "outside").mkdir(parents=True)
    return box, box / "dest", box / "outside"


def _everything_under(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), path) for d, dirs, names in os.walk(path) for n in dirs + names}


def test_hostile_names_never_leave_dest(tmp_path):
    """Names patched into the image's directory blocks after mkfs: slashes and
    '..' (ESCAPE..), a directory that takes the name of a link to a place
    outside DEST (QQlnk2QQ -> QQlnk1QQ), a directory entry pointing back at the
    root (a loop)."""
    box, dest, outside = _sandbox(tmp_path)
    src = tmp_path / "src"
    (src / "QQlnk2QQ").mkdir(parents=True)
    (src / "QQlnk2QQ" / "pwned").write_bytes(b"through the link")
    os.symlink(str(outside), src / "QQlnk1QQ")
    (src / "ESCAPExxxxx").write_bytes(b"up and out")
    absolute = str(tmp_path / "abs-pwn")  # an absolute name: os.open would ignore dir_fd
    (src / ("S" * len(absolute))).write_bytes(b"a slash")
    (src / "LOOPDIR").mkdir()
    (src / "LOOPDIR" / "in-loop").write_bytes(b"once")
    (src / "fine.txt").write_bytes(b"fine")
    img = fsimages.ext4(str(tmp_path / "disk.img"), 32 * MiB, str(src), "-O", "^metadata_csum,^dir_index")
    fsimages.patch(img, b"QQlnk2QQ", b"QQlnk1QQ")
    fsimages.patch(img, b"ESCAPExxxxx", b"../../pwned")
    fsimages.patch(img, b"S" * len(absolute), absolute.encode())
    at = fsimages.patch(img, b"LOOPDIR\x00", b"LOOPDIR\x00")[0]
    with open(img, "r+b") as f:  # the entry's inode number (8 bytes before its name) -> the root, 2
        f.seek(at - 8)
        f.write((2).to_bytes(4, "little"))
    store = backed_up(tmp_path, img)

    names = [e["name"] for e in bv("files", "ls", store, "d@1", "/")["entries"]]
    assert sorted(names) == sorted(["QQlnk1QQ", "QQlnk1QQ", "../../pwned", absolute, "LOOPDIR", "fine.txt",
                                    "lost+found"])
    for force in ((), ("--force",)):
        got = bv("files", "get", store, "d@1", "/", dest, *force, timeout=120)
        assert (dest / "fine.txt").read_bytes() == b"fine"
        reasons = {s["path"]: s["reason"] for s in got["skipped"]}
        assert "not a plain file name" in reasons["/../../pwned"] and "not a plain file name" in reasons["/" + absolute]
        assert "already written" in reasons["/LOOPDIR"]
        assert _everything_under(outside) == set()
        assert sorted(os.listdir(box)) == ["dest", "outside"]
        assert not os.path.exists(absolute) and not (tmp_path / "pwned").exists()
        for path in _everything_under(dest):  # nothing in DEST leads out of it but the image's own link
            assert os.path.realpath(dest / path).startswith(str(dest) + os.sep) or path == "QQlnk1QQ", path


def _inode_at(img: str, path: str) -> int:
    """Byte offset of ``path``'s inode in an ext4 image (debugfs imap)."""
    out = subprocess.run(["debugfs", "-R", f'imap "{path}"', img], capture_output=True, text=True, check=True).stdout
    block = int(re.search(r"block (\d+)", out).group(1))
    offset = int(re.search(r"offset (0x[0-9a-f]+)", out).group(1), 16)
    bsize = int(re.search(r"Block size:\s+(\d+)", subprocess.run(
        ["dumpe2fs", "-h", img], capture_output=True, text=True, check=True).stdout).group(1))
    return block * bsize + offset


def _first_block(img: str, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f'blocks "{path}"', img], capture_output=True, text=True, check=True)
    bsize = int(re.search(r"Block size:\s+(\d+)", subprocess.run(
        ["dumpe2fs", "-h", img], capture_output=True, text=True, check=True).stdout).group(1))
    return int(out.stdout.split()[0]) * bsize


def test_corrupted_metadata_gives_a_clear_error_not_a_crash_or_a_hang(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = fsimages.make_tree(str(src), rng(6))
    clean = fsimages.ext4(str(tmp_path / "clean.img"), 64 * MiB, str(src))
    r = rng(7)
    root, big = _inode_at(clean, "/"), _inode_at(clean, "/big.bin")
    cases = {
        "superblock": [(1024, bytes(1024))],                          # no ext4 magic left
        "group descriptors": [(2048, r.bytes(2048))],                # the blocks after the superblock
        "root inode": [(root + 40, r.bytes(60))],                    # its extent tree: noise
        "directory block": [(_first_block(clean, "/dir with spaces"), r.bytes(1024))],
        "huge size": [(big + 4, (0).to_bytes(4, "little")), (big + 108, (1 << 8).to_bytes(4, "little"))],
        "everything": [(off, r.bytes(4096)) for off in range(0, 8 << 20, 12288)],
    }
    store = tmp_path / "store"
    bv("init", store, "--chunk-size", "64K")
    results = {}
    for name, writes in cases.items():
        img = str(tmp_path / f"{name}.img")
        with open(img, "wb") as f:  # a sparse copy: six of these stay small
            f.truncate(os.path.getsize(clean))
        fsimages.place(img, 0, clean)
        with open(img, "r+b") as f:
            for off, data in writes:
                f.seek(off)
                f.write(data)
        disk = name.replace(" ", "-")
        bv("backup", store, img, "--disk", disk)
        for args in (("ls", "/"), ("ls", "/dir with spaces"), ("get", "/", tmp_path / f"out-{disk}")):
            proc = run_cli("files", args[0], str(store), f"{disk}@1", *map(str, args[1:]), "--json", timeout=120)
            assert "Traceback" not in proc.stderr, (name, args, proc.stderr)
            doc = json.loads(proc.stdout)
            assert proc.returncode in (0, 1), (name, args, proc.returncode, proc.stderr)
            if proc.returncode:
                assert doc["error"]["code"] in ("no_filesystem", "filesystem_damaged", "not_found"), doc
                assert proc.stderr.startswith("blockvault: error: ") and disk in proc.stderr
            results[name, args[0], str(args[1])[:1]] = doc.get("error", {}).get("code", "ok")
    assert results["superblock", "ls", "/"] == "no_filesystem"
    assert results["group descriptors", "ls", "/"] == "filesystem_damaged"
    assert results["root inode", "ls", "/"] == "filesystem_damaged"
    assert results["directory block", "ls", "/"] == "ok"  # the damage is below the root
    assert results["huge size", "get", "/"] == "ok"        # a terabyte claimed: its blocks are read, no more
    huge = tmp_path / "out-huge-size" / "big.bin"
    assert os.path.getsize(huge) == 1 << 40 and os.stat(huge).st_blocks * 512 < 8 * MiB
    with open(huge, "rb") as f:
        assert f.read(len(files["big.bin"])) == files["big.bin"]


def test_a_damaged_chunk_is_the_store_s_integrity_error_not_a_filesystem_s(tmp_path):
    """TSK only sees a failed read; the store's own error (which chunk, which
    pack, run verify) is what the user gets."""
    from helpers import chunk_packs
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10000)
    img = fsimages.ext4(str(tmp_path / "disk.img"), 16 * MiB, str(src))
    store = backed_up(tmp_path, img)
    for pack in chunk_packs(store):
        size = os.path.getsize(pack)
        with open(pack, "r+b") as f:
            for at in range(512, size - 512, 2048):
                f.seek(at)
                f.write(b"\xff\x00\xff\x00")
    err = bv("files", "ls", store, "d@1", "/", expect=1)
    assert err["error"]["code"] == "integrity" and "chunk" in err["error"]["message"], err
