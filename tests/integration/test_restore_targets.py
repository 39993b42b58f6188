"""Restores onto block devices (loop devices the tests attach), and refusals of
every other kind of node: the device bytes themselves are compared, and every
node is checked to still be what it was.

Only loop devices these tests attach, and /dev/null (refused, and read only
after the same refusal has been seen on a copy of it in tmp_path), are ever
touched under /dev.  A loop node replaced by a broken restore is put back
in the teardown before the device is detached.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess

import pytest

from engine.repository import Repository
from engine.restore import PARTIAL_SUFFIX, restore_backup
from helpers import rng, run_cli, text_bytes, write_at

CS = 128 << 10
BLOCK = 64 << 10
FILL = b"\xaa"


def _source(path: str, size: int) -> bytes:
    """Text, zero chunks, chunks half zero, a repeated chunk, random bytes, a partial tail."""
    r = rng(7)
    with open(path, "wb") as f:
        f.truncate(size)
    write_at(path, 0, text_bytes(r, CS))
    write_at(path, 5 * CS + BLOCK, text_bytes(r, BLOCK))
    write_at(path, 6 * CS, text_bytes(r, BLOCK))
    for k in (10, 11, 12):
        write_at(path, k * CS, open(path, "rb").read(CS))
    write_at(path, 20 * CS, r.integers(0, 256, 3 * CS, dtype="uint8").tobytes())
    tail = size - (size % CS or CS) + 100
    write_at(path, tail, text_bytes(r, size - tail))
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def backed_up(tmp_path):
    """(store, source bytes) of one backup d@1 of 48 chunks of 128 KiB."""
    store, img = str(tmp_path / "store"), str(tmp_path / "src.img")
    assert run_cli("init", store, "--chunk-size", "128K").returncode == 0
    data = _source(img, 48 * CS)
    proc = run_cli("backup", store, img, "--disk", "d")
    assert proc.returncode == 0, proc.stderr
    return store, data


class Loop:
    def __init__(self, dev: str, backing: str):
        self.dev, self.backing = dev, backing
        st = os.stat(dev)
        self.rdev, self.mode, self.gid = st.st_rdev, st.st_mode, st.st_gid

    def contents(self) -> bytes:
        """What the device holds: read from its backing file, so a replaced node cannot fake it."""
        with open(self.backing, "rb") as f:
            return f.read()

    def assert_intact(self) -> None:
        st = os.lstat(self.dev)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == self.rdev, f"{self.dev} is no longer the loop device"
        assert not os.path.lexists(self.dev + PARTIAL_SUFFIX)


@pytest.fixture
def loop(tmp_path):
    """attach(size) -> Loop over a tmp_path file of ``size`` 0xAA bytes; detached at teardown."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed: no loop device to restore onto")
    attached: list[Loop] = []

    def attach(size: int, *options: str) -> Loop:
        backing = str(tmp_path / f"backing{len(attached)}.img")
        with open(backing, "wb") as f:
            f.write(FILL * size)
        proc = subprocess.run(["losetup", "-f", "--show", *options, backing], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot attach a loop device here (a container without loop devices?): "
                        f"{proc.stderr.strip()}")
        dev = Loop(proc.stdout.strip(), backing)
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        st = os.lstat(dev.dev)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != dev.rdev:  # a broken restore replaced the node
            os.unlink(dev.dev)
            os.mknod(dev.dev, dev.mode, dev.rdev)
            os.chown(dev.dev, 0, dev.gid)
        if os.path.lexists(dev.dev + PARTIAL_SUFFIX):
            os.unlink(dev.dev + PARTIAL_SUFFIX)
        subprocess.run(["losetup", "-d", dev.dev], check=True)


def _expected_zeroed(data: bytes) -> bytes:
    """A device restored with --zeroed-target: zero 64 KiB blocks keep the old bytes."""
    out = bytearray()
    for at in range(0, len(data), BLOCK):
        block = data[at:at + BLOCK]
        out += FILL * len(block) if block.count(0) == len(block) else block
    return bytes(out)


def test_restore_onto_a_loop_device_writes_every_byte_in_place(backed_up, loop):
    store, data = backed_up
    dev = loop(len(data))
    refused = run_cli("restore", store, "d@1", dev.dev)
    assert refused.returncode == 1 and "is a block device" in refused.stderr and "--force" in refused.stderr
    assert dev.contents() == FILL * len(data)

    proc = run_cli("restore", store, "d@1", dev.dev, "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    dev.assert_intact()
    assert dev.contents() == data  # the zero chunks overwrote the old 0xAA bytes too
    with open(dev.dev, "rb") as f:
        assert f.read() == data
    doc = json.loads(proc.stdout)
    assert doc["target"] == dev.dev and doc["warnings"] == []
    assert doc["bytes_written"] == len(data) and doc["chunks_written"] == len(data) // CS


def test_zeroed_target_leaves_a_devices_zero_blocks_unwritten(backed_up, loop):
    store, data = backed_up
    dev = loop(len(data))
    proc = run_cli("restore", store, "d@1", dev.dev, "--force", "--zeroed-target", "--json")
    assert proc.returncode == 0, proc.stderr
    dev.assert_intact()
    expected = _expected_zeroed(data)
    assert expected != data and dev.contents() == expected
    nonzero = sum(1 for at in range(0, len(data), CS) if data[at:at + CS].count(0) != CS)
    doc = json.loads(proc.stdout)
    assert doc["chunks_written"] == nonzero and doc["bytes_written"] == nonzero * CS


def test_device_node_in_tmp_and_a_link_to_it_named_vmdk(backed_up, loop, tmp_path):
    """A node made with mknod over the loop device, and a symlink to it whose name
    says VMDK: both are the device, written raw and in place."""
    store, data = backed_up
    dev = loop(len(data))
    node = str(tmp_path / "disk-node")
    os.mknod(node, stat.S_IFBLK | 0o600, dev.rdev)
    proc = run_cli("restore", store, "d@1", node, "--force")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISBLK(os.lstat(node).st_mode) and os.lstat(node).st_rdev == dev.rdev
    assert not os.path.lexists(node + PARTIAL_SUFFIX)
    assert dev.contents() == data

    with open(dev.backing, "r+b") as f:  # old bytes again: the next restore must write them all
        f.write(FILL * len(data))
    link = str(tmp_path / "restored.vmdk")
    os.symlink(node, link)
    proc = run_cli("restore", store, "d@1", link, "--force")
    assert proc.returncode == 0, proc.stderr
    assert os.path.islink(link) and os.readlink(link) == node
    dev.assert_intact()
    assert dev.contents() == data

    vmdk = run_cli("restore", store, "d@1", link, "--force", "--format", "vmdk")
    assert vmdk.returncode == 1 and "is a block device" in vmdk.stderr and "drop --format vmdk" in vmdk.stderr
    assert os.path.islink(link) and dev.contents() == data


def test_device_smaller_than_the_disk_is_refused_untouched(backed_up, loop):
    store, data = backed_up
    dev = loop(len(data) - CS)
    proc = run_cli("restore", store, "d@1", dev.dev, "--force")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"holds {len(data) - CS} bytes" in proc.stderr and f"needs {len(data)}" in proc.stderr
    dev.assert_intact()
    assert dev.contents() == FILL * (len(data) - CS)


def test_device_larger_than_the_disk_keeps_its_tail_and_says_so(tmp_path, loop):
    store, img = str(tmp_path / "store"), str(tmp_path / "odd.img")
    assert run_cli("init", store, "--chunk-size", "128K").returncode == 0
    size = 40 * CS + 1000
    data = _source(img, size)
    assert run_cli("backup", store, img, "--disk", "odd").returncode == 0
    dev = loop(48 * CS)
    proc = run_cli("restore", store, "odd@1", dev.dev, "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    dev.assert_intact()
    got = dev.contents()
    assert got[:size] == data and got[size:] == FILL * (48 * CS - size)
    warning = f"holds {48 * CS} bytes, the backup {size}: its last {48 * CS - size} bytes are left as they were"
    assert warning in proc.stderr and any(warning in w for w in json.loads(proc.stdout)["warnings"])
    assert json.loads(proc.stdout)["bytes_written"] == size


def test_mounted_device_is_refused_naming_the_mount_point(backed_up, loop, tmp_path):
    store, data = backed_up
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed: cannot make a file system to mount")
    dev = loop(len(data))
    subprocess.run(["mkfs.ext4", "-q", "-F", dev.dev], check=True, capture_output=True)
    mnt = tmp_path / "mnt point"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "ro", dev.dev, str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()}")
    try:
        before = dev.contents()
        proc = run_cli("restore", store, "d@1", dev.dev, "--force")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"is mounted on {mnt}" in proc.stderr and "unmount it first" in proc.stderr
        dev.assert_intact()
        assert dev.contents() == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_device_held_exclusively_is_refused(backed_up, loop):
    """O_EXCL catches what the mount table does not show (LVM, md, swap, another writer)."""
    store, data = backed_up
    dev = loop(len(data))
    holder = os.open(dev.dev, os.O_RDONLY | os.O_EXCL)
    try:
        proc = run_cli("restore", store, "d@1", dev.dev, "--force")
    finally:
        os.close(holder)
    assert proc.returncode == 1 and f"restore target {dev.dev} is in use" in proc.stderr
    dev.assert_intact()
    assert dev.contents() == FILL * len(data)


def test_read_only_device_is_refused(backed_up, loop):
    store, data = backed_up
    dev = loop(len(data), "--read-only")
    proc = run_cli("restore", store, "d@1", dev.dev, "--force")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"block device {dev.dev} is read-only" in proc.stderr
    dev.assert_intact()
    assert dev.contents() == FILL * len(data)


def test_progress_totals_and_counts_for_a_device(backed_up, loop):
    from engine.targets import BlockDeviceTarget
    store, data = backed_up
    nonzero = sum(1 for at in range(0, len(data), CS) if data[at:at + CS].count(0) != CS)
    for zeroed, total in ((False, len(data)), (True, nonzero * CS)):
        dev = loop(len(data))
        started, advanced = [], []
        with Repository.open(store) as repo:
            result = restore_backup(repo, "d@1", BlockDeviceTarget(dev.dev, True, zeroed),
                                    on_start=lambda rec, n: started.append(n), on_progress=advanced.append)
        assert started == [total] and sum(advanced) == total == result.bytes_written
        assert dev.contents() == (_expected_zeroed(data) if zeroed else data)


def _refused(store: str, target: str, kind: str) -> None:
    proc = run_cli("restore", store, "d@1", target, "--force")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"restore target {target} is {kind}; restore writes regular files, block devices, or vddk:// disks" \
        in proc.stderr
    assert not os.path.lexists(target + PARTIAL_SUFFIX)


def test_character_devices_are_refused_and_stay_devices(backed_up, tmp_path):
    store, _ = backed_up
    null = os.stat("/dev/null")
    assert stat.S_ISCHR(null.st_mode)
    copy = str(tmp_path / "null")
    os.mknod(copy, stat.S_IFCHR | 0o666, null.st_rdev)
    _refused(store, copy, "a character device")
    assert stat.S_ISCHR(os.lstat(copy).st_mode) and os.lstat(copy).st_rdev == null.st_rdev
    # Only now, with the copy known to be refused, the real one.
    _refused(store, "/dev/null", "a character device")
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == null.st_rdev and after.st_ino == null.st_ino


def test_fifo_and_socket_are_refused(backed_up, tmp_path):
    store, _ = backed_up
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    _refused(store, fifo, "a FIFO (named pipe)")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    path = str(tmp_path / "sock")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path)
        _refused(store, path, "a socket")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        sock.close()


def test_symbolic_links_not_leading_to_a_device_are_refused(backed_up, tmp_path):
    store, _ = backed_up
    real = tmp_path / "real.img"
    real.write_bytes(b"precious")
    link = str(tmp_path / "link.img")
    os.symlink(real, link)
    proc = run_cli("restore", store, "d@1", link, "--force")
    assert proc.returncode == 1
    assert f"restore target {link} is a symbolic link that points to {real}; name the file itself" in proc.stderr
    assert os.readlink(link) == str(real) and real.read_bytes() == b"precious"

    dangling = str(tmp_path / "dangling.img")
    os.symlink(tmp_path / "gone.img", dangling)
    proc = run_cli("restore", store, "d@1", dangling, "--force")
    assert proc.returncode == 1 and "which does not exist" in proc.stderr
    assert os.path.islink(dangling) and not os.path.exists(tmp_path / "gone.img")

    chr_link = str(tmp_path / "null-link")
    os.symlink("/dev/null", chr_link)
    proc = run_cli("restore", store, "d@1", chr_link, "--force")
    assert proc.returncode == 1 and "(a link to /dev/null) is a character device" in proc.stderr
    assert os.path.islink(chr_link) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
