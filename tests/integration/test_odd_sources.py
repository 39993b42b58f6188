"""Sources that are not what they seem: VMDK extents outside the descriptor's
directory, capacities that disagree, FIFOs and character devices, empty disks,
and an image that shrinks while it is read.  Each is an error (exit 1) with a
message naming the problem, and the store is left exactly as it was."""

import glob
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest

from helpers import REPO_ROOT, make_sparse, rng, run_cli, store_fingerprint, write_at

CS = 64 << 10
QEMU = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU is None and not os.environ.get("CI"), reason="qemu-img not installed")
DESC_HEAD = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
             'createType="monolithicFlat"\n\n# Extent description\n')


@pytest.fixture
def populated(store_path, tmp_path):
    img = str(tmp_path / "ok.img")
    make_sparse(img, 16 * CS)
    write_at(img, 0, rng(90).bytes(3 * CS))
    proc = run_cli("backup", store_path, img, "--disk", "ok")
    assert proc.returncode == 0, proc.stderr
    return store_path, img


def _refused(store, args, *needles, timeout=60):
    """The command fails with exit 1 within ``timeout`` (a hang is a failure too), says
    each needle, prints no traceback, and leaves the store as it was."""
    before = store_fingerprint(store)
    try:
        proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} hung: no answer after {timeout}s")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert store_fingerprint(store) == before
    return proc


def _points(store, disk):
    proc = run_cli("list", store, "--disk", disk, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    return [b["id"] for b in doc["backups"]]


# -- item 11: VMDK extents and capacities --------------------------------------------


def test_descriptor_naming_etc_passwd_is_refused(populated, tmp_path):
    store, _ = populated
    desc = tmp_path / "vm" / "evil.vmdk"
    desc.parent.mkdir()
    desc.write_text(DESC_HEAD + 'RW 2 FLAT "/etc/passwd" 0\n')
    proc = _refused(store, ["backup", store, str(desc), "--disk", "evil"], str(desc), '"/etc/passwd"',
                    "outside the descriptor's directory", "--allow-external-extents")
    assert _points(store, "evil") == []


def test_dotdot_extent_refused_unless_allowed(populated, tmp_path):
    store, _ = populated
    outside = tmp_path / "x"
    data = rng(91).bytes(8 * 512)
    outside.write_bytes(data)
    desc = tmp_path / "a" / "b" / "disk.vmdk"
    desc.parent.mkdir(parents=True)
    desc.write_text(DESC_HEAD + 'RW 8 FLAT "../../x" 0\n')
    _refused(store, ["backup", store, str(desc), "--disk", "ext"], "../../x", str(outside),
             "outside the descriptor's directory " + str(desc.parent), "--allow-external-extents")
    assert _points(store, "ext") == []
    # The user vouches for it: read, and restored byte for byte.
    proc = run_cli("backup", store, str(desc), "--disk", "ext", "--allow-external-extents")
    assert proc.returncode == 0 and proc.stdout.strip() == "ext@1", proc.stderr
    out = tmp_path / "restored.img"
    assert run_cli("restore", store, "ext@1", str(out)).returncode == 0
    assert out.read_bytes() == data


def test_symlinked_extent_leading_outside_is_refused(populated, tmp_path):
    store, _ = populated
    (tmp_path / "secret.bin").write_bytes(b"s" * 4096)
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk-flat.vmdk").symlink_to(tmp_path / "secret.bin")
    desc = vm / "disk.vmdk"
    desc.write_text(DESC_HEAD + 'RW 8 FLAT "disk-flat.vmdk" 0\n')
    _refused(store, ["backup", store, str(desc), "--disk", "link"], "disk-flat.vmdk",
             str(tmp_path / "secret.bin"), "outside the descriptor's directory")


def test_extents_inside_the_directory_still_work(populated, tmp_path):
    """A subdirectory, a link to a sibling, and an absolute name inside: all read."""
    store, _ = populated
    vm = tmp_path / "vm"
    (vm / "sub").mkdir(parents=True)
    a, b = rng(92).bytes(4096), rng(93).bytes(4096)
    (vm / "sub" / "a.bin").write_bytes(a)
    (vm / "b.bin").write_bytes(b)
    (vm / "b-link.bin").symlink_to("b.bin")
    desc = vm / "disk.vmdk"
    desc.write_text(DESC_HEAD + f'RW 8 FLAT "sub/a.bin" 0\nRW 8 FLAT "b-link.bin" 0\nRW 8 FLAT "{vm}/b.bin" 0\n')
    proc = run_cli("backup", store, str(desc), "--disk", "inside")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "restored.img"
    assert run_cli("restore", store, "inside@1", str(out)).returncode == 0
    assert out.read_bytes() == a + b + b


@pytest.fixture
def sparse_vmdk(tmp_path):
    raw = tmp_path / "src.raw"
    make_sparse(str(raw), 4 << 20)
    write_at(str(raw), 5000, rng(94).bytes(100_000))
    img = tmp_path / "disk.vmdk"
    subprocess.run([QEMU or "qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(img)], check=True)
    return img


@needs_qemu
@pytest.mark.parametrize("capacity,needle", [
    (0, "sparse header gives a capacity of 0 sectors (an empty disk), but its embedded descriptor's extents "
        "add up to 8192 sectors"),
    (4096, "its embedded descriptor's extents add up to 8192 sectors, but the sparse header gives a capacity "
           "of 4096 sectors"),
    (16384, "add up to 8192 sectors, but the sparse header gives a capacity of 16384 sectors"),
])
def test_sparse_capacity_that_disagrees_is_refused(populated, sparse_vmdk, capacity, needle):
    store, _ = populated
    data = bytearray(sparse_vmdk.read_bytes())
    assert struct.unpack_from("<Q", data, 12)[0] == 8192  # 4 MiB
    struct.pack_into("<Q", data, 12, capacity)
    sparse_vmdk.write_bytes(bytes(data))
    _refused(store, ["backup", store, str(sparse_vmdk), "--disk", "cap"], str(sparse_vmdk), needle)


@needs_qemu
def test_descriptor_extent_size_that_disagrees_with_its_sparse_file(populated, sparse_vmdk, tmp_path):
    store, _ = populated
    desc = tmp_path / "split.vmdk"
    desc.write_text(DESC_HEAD.replace("monolithicFlat", "twoGbMaxExtentSparse")
                    + f'RW 9000 SPARSE "{sparse_vmdk.name}"\n')
    _refused(store, ["backup", store, str(desc), "--disk", "cap"], str(sparse_vmdk),
             "sparse extent 1 is given 9000 sectors, but the sparse header gives a capacity of 8192 sectors")
    desc.write_text(DESC_HEAD.replace("monolithicFlat", "twoGbMaxExtentSparse")
                    + f'RW 8192 SPARSE "{sparse_vmdk.name}"\n')
    proc = run_cli("backup", store, str(desc), "--disk", "cap")
    assert proc.returncode == 0 and proc.stdout.strip() == "cap@1", proc.stderr


# -- item 15: FIFOs, devices, empty disks, a shrinking image -----------------------------


def test_fifo_as_source_fails_at_once(populated, tmp_path):
    store, _ = populated
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    started = time.monotonic()
    _refused(store, ["backup", store, str(fifo), "--disk", "pipe"], str(fifo), "is a FIFO (named pipe)",
             "write the stream to a file first", timeout=20)
    assert time.monotonic() - started < 20


def test_fifo_as_changed_areas_fails_at_once(populated, tmp_path):
    store, img = populated
    fifo = tmp_path / "cbt.json"
    os.mkfifo(fifo)
    _refused(store, ["backup", store, img, "--disk", "ok", "--mode", "incremental", "--changed-areas", str(fifo)],
             f"changed-areas file {fifo} is a FIFO (named pipe), not a regular file", timeout=20)


@pytest.mark.parametrize("node", ["/dev/null", "/dev/zero"])
def test_character_devices_are_refused(populated, node):
    store, img = populated
    _refused(store, ["backup", store, node, "--disk", "chr"], f"{node}: is a character device, not a disk image",
             timeout=20)
    _refused(store, ["backup", store, img, "--disk", "ok", "--mode", "incremental", "--changed-areas", node],
             f"changed-areas file {node} is a character device", timeout=20)


def test_empty_image_is_refused(populated, tmp_path):
    store, _ = populated
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    _refused(store, ["backup", store, str(empty), "--disk", "empty"],
             f"disk image {empty} is empty (0 bytes); nothing to back up")
    assert _points(store, "empty") == []


def test_empty_block_device_is_refused(populated, tmp_path):
    """A loop device over a 0-byte file is a block device of size 0."""
    store, _ = populated
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"")
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        _refused(store, ["backup", store, dev, "--disk", "blk"], f"block device {dev} is empty (0 bytes)")
        assert _points(store, "blk") == []
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def _packs(store):
    return glob.glob(os.path.join(store, "packs", "*", "*.pack"))


def test_image_that_shrinks_while_read_is_an_error(tmp_path):
    """Truncated to 4 MiB once the backup is writing packs: the reader would pad the
    rest with zeros; the size checked again at the end of the read refuses it.  (zstd
    level 19 keeps the backup busy for seconds before the truncation; the zeros after
    it are never compressed, so the rest is quick.)"""
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K", "--compression-level", "19").returncode == 0
    img = str(tmp_path / "big.img")
    size, small = 64 << 20, 4 << 20
    make_sparse(img, size)
    r = rng(95)
    words = r.integers(0, 4, size=size // 8, dtype="u1").repeat(8).tobytes()  # low entropy: slow at level 19
    write_at(img, 0, words)
    before = store_fingerprint(store)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "backup", store, img, "--disk", "big",
                             "--threads", "2"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _packs(store):
            assert proc.poll() is None, f"the backup ended before writing a pack: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no pack after 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)  # truncate mid-read, whatever the machine's speed
        os.truncate(img, small)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert f"{img} shrank from {size} to {small} bytes while it was read" in err, err
    assert "nothing was stored" in err and "Traceback" not in err and out == ""
    assert store_fingerprint(store) == before
    assert _points(store, "big") == []

