"""blockvault mount/umount: a point as DIR/disk.raw through nbdfuse, read with
cmp against what `restore` writes; killed servers leave nothing that blocks
the next mount."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time

import pytest

import jsonshape
from engine.nbd.mount import mount_type
from helpers import make_sparse, rng, run_cli, store_fingerprint, text_bytes, write_at

CS = 64 << 10
TOOLS = ("nbdkit", "nbdfuse", "fusermount3")
pytestmark = pytest.mark.skipif(
    any(subprocess.run(["sh", "-c", f"command -v {t}"], capture_output=True, timeout=30).returncode for t in TOOLS)
    or not os.path.exists("/dev/fuse"),
    reason="needs nbdkit, nbdkit-plugin-python, libnbd-bin, fuse3 and /dev/fuse (tools/install.sh --test)")
SECTIONS, _ = jsonshape.parse()


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    d = tmp_path_factory.mktemp("mount")
    store, img = str(d / "store"), str(d / "src.img")
    r = rng(5)
    size = (9 << 20) + 4097
    make_sparse(img, size)
    for k in range(0, 140, 2):
        write_at(img, k * CS + 17, text_bytes(r, 9000 + k))
    write_at(img, 6 << 20, r.bytes(1 << 20))
    write_at(img, size - 100, r.bytes(100))
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, img, "--disk", "web01:disk-0").returncode == 0
    restored = str(d / "restored.img")
    assert run_cli("restore", store, "web01:disk-0@1", restored).returncode == 0
    return store, restored


@pytest.fixture
def mnt(tmp_path):
    """An empty directory (with a space in its name), unmounted whatever the test did."""
    path = tmp_path / "mount point"
    path.mkdir()
    yield str(path)
    if mount_type(str(path)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], timeout=30, capture_output=True)


def cmp(a: str, b: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cmp", a, b], capture_output=True, text=True, timeout=120)


def mount_json(*args, expect: int = 0) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout)
    if expect == 0:
        problems = jsonshape.check(doc, args[0], SECTIONS)
        assert not problems, "\n".join(problems)
    return doc


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_mount_reads_as_the_restored_image_and_umount_cleans_up(point, mnt):
    store, restored = point
    doc = mount_json("mount", store, "web01:disk-0@latest", mnt)
    assert doc["file"] == os.path.join(mnt, "disk.raw") and doc["id"] == "web01:disk-0@1" and not doc["writable"]
    assert os.path.getsize(doc["file"]) == os.path.getsize(restored)
    result = cmp(doc["file"], restored)
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(OSError) as e:
        os.open(doc["file"], os.O_WRONLY)
    assert e.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    nbdkit = children(doc["pid"])
    assert nbdkit
    again = run_cli("mount", store, "web01:disk-0@1", mnt)          # a live mount is busy
    assert again.returncode == 4 and "umount" in again.stderr
    down = mount_json("umount", mnt)
    assert down == {"ok": True, "directory": mnt, "id": "web01:disk-0@1", "stale": False}
    assert mount_type(mnt) is None and os.listdir(mnt) == []
    assert wait_gone(doc["pid"]) and all(wait_gone(p) for p in nbdkit)
    gone = run_cli("umount", mnt)
    assert gone.returncode == 1 and "not mounted" in gone.stderr


def test_writable_mount_keeps_writes_out_of_the_store(point, mnt):
    store, restored = point
    before = store_fingerprint(store)
    doc = mount_json("mount", store, "web01:disk-0@1", mnt, "--writable")
    assert doc["writable"] is True
    fd = os.open(doc["file"], os.O_RDWR)
    try:
        os.pwrite(fd, b"\xee" * 5000, 123_457)
        os.fsync(fd)
        got = os.pread(fd, 9000, 120_000)
    finally:
        os.close(fd)
    with open(restored, "rb") as f:
        f.seek(120_000)
        expected = bytearray(f.read(9000))
    expected[3457:3457 + 5000] = b"\xee" * 5000
    assert got == bytes(expected)
    mount_json("umount", mnt)
    assert store_fingerprint(store) == before
    doc = mount_json("mount", store, "web01:disk-0@1", mnt)          # the overlay died with its server
    assert cmp(doc["file"], restored).returncode == 0
    mount_json("umount", mnt)


@pytest.mark.parametrize("victim", ["nbdfuse", "nbdkit"])
def test_a_killed_server_leaves_nothing_that_blocks_the_next_mount(point, mnt, victim):
    store, restored = point
    doc = mount_json("mount", store, "web01:disk-0@1", mnt)
    pid = doc["pid"] if victim == "nbdfuse" else children(doc["pid"])[0]
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    if victim == "nbdkit":       # nbdfuse notices at the next read and the mount goes stale
        try:
            with open(doc["file"], "rb") as f:
                f.read(4096)
        except OSError:
            pass
        assert wait_gone(doc["pid"])
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)   # the kernel's words for a dead daemon
    doc = mount_json("mount", store, "web01:disk-0@1", mnt)          # the stale mount is detached first
    assert cmp(doc["file"], restored).returncode == 0
    os.kill(doc["pid"], signal.SIGKILL)
    assert wait_gone(doc["pid"])
    down = mount_json("umount", mnt)                            # and umount clears a stale one too
    assert down["stale"] is True and mount_type(mnt) is None and os.listdir(mnt) == []


def test_bad_mounts_are_refused_and_change_nothing(point, tmp_path, mnt):
    store, _ = point
    keep = tmp_path / "full"
    keep.mkdir()
    (keep / "file").write_text("mine")
    proc = run_cli("mount", store, "web01:disk-0@1", str(keep))
    assert proc.returncode == 1 and "not empty" in proc.stderr and (keep / "file").read_text() == "mine"
    proc = run_cli("mount", store, "web01:disk-0@1", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "not a directory" in proc.stderr
    proc = run_cli("mount", store, "web01:disk-0@4", mnt, "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "not_found"
    assert mount_type(mnt) is None
    proc = run_cli("umount", "/")
    assert proc.returncode == 1 and "not mounted by 'blockvault mount'" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control")
                    or subprocess.run(["sh", "-c", "command -v losetup mkfs.ext4"], capture_output=True,
                                      timeout=30).returncode,
                    reason="needs root, loop devices, losetup and mkfs.ext4")
def test_a_mounted_point_loop_mounts_and_a_busy_umount_is_refused(tmp_path, mnt):
    """What mount is for: the file system inside a backed-up disk, loop-mounted by the user."""
    src, fs_img, inside = (tmp_path / n for n in ("src", "fs.img", "inside"))
    mnt = tmp_path / "mount point"
    for d in (src, inside):
        d.mkdir()
    (src / "greeting.txt").write_text("hello from inside\n")
    big = rng(3).bytes(3 << 20)
    (src / "big.bin").write_bytes(big)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(fs_img), "64M"], check=True, timeout=120)
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, str(fs_img), "--disk", "fs").returncode == 0
    doc = mount_json("mount", store, "fs@1", str(mnt))
    loop = subprocess.run(["losetup", "-r", "-f", "--show", doc["file"]], capture_output=True, text=True,
                          timeout=60)
    if loop.returncode != 0:
        mount_json("umount", str(mnt))
        pytest.skip(f"losetup cannot attach here: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro,noload", dev, str(inside)], check=True, timeout=60)
        try:
            assert (inside / "greeting.txt").read_text() == "hello from inside\n"
            assert (inside / "big.bin").read_bytes() == big
        finally:
            subprocess.run(["umount", str(inside)], check=True, timeout=60)
        busy = run_cli("umount", str(mnt), "--json")           # the loop device still holds disk.raw
        assert busy.returncode == 4 and json.loads(busy.stdout)["error"]["code"] == "busy"
        assert mount_type(str(mnt)) is not None
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=60)
    deadline = time.monotonic() + 30
    while True:                                  # the loop device lets go asynchronously
        down = run_cli("umount", str(mnt))
        if down.returncode != 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert down.returncode == 0, down.stderr
    assert mount_type(str(mnt)) is None
