"""restore --format, --threads and --zeroed-target on file targets: the restored
bytes (and holes) are compared with the source, never only the exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import allocated_ranges, make_sparse, rng, run_cli, same_file, text_bytes, write_at

CS = 64 << 10
BLOCK = 64 << 10
QEMU = shutil.which("qemu-img")


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    """(store, source path, backup JSON) of d@2, a 40 MiB sparse image with scattered data.

    Every other data chunk changed after d@1, so d@2's chunks lie apart in
    two packs: hundreds of separate reads for the restore's threads to share."""
    d = tmp_path_factory.mktemp("restore-options")
    store, img = str(d / "store"), str(d / "source.img")
    r = rng(20)
    size = (40 << 20) + 777
    make_sparse(img, size)
    for k in range(0, 600, 2):                       # text, chunk-aligned and not
        write_at(img, k * CS + (k % 3) * 4099, text_bytes(r, 30_000 + k * 50))
    write_at(img, 30 << 20, r.bytes(3 << 20))         # incompressible
    write_at(img, 20 << 20, bytes(1 << 20))            # written zeros
    write_at(img, size - 500, r.bytes(500))            # the partial last chunk
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    for k in range(0, 600, 4):
        write_at(img, k * CS + 100, text_bytes(r, 1000))
    write_at(img, (30 << 20) + CS, r.bytes(CS))
    proc = run_cli("backup", store, img, "--disk", "d", "--json")
    assert proc.returncode == 0, proc.stderr
    return store, img, json.loads(proc.stdout)


def _restore(store: str, target: str, *options: str) -> dict:
    proc = run_cli("restore", store, "d@2", target, "--json", *options)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_format_raw_overrides_a_vmdk_name(backed_up, tmp_path):
    store, img, _ = backed_up
    out = str(tmp_path / "x.vmdk")
    _restore(store, out, "--format", "raw")
    with open(out, "rb") as f:
        assert f.read(4) != b"KDMV"
    assert same_file(out, img)


@pytest.mark.skipif(QEMU is None and not os.environ.get("CI"), reason="qemu-img not installed")
def test_format_vmdk_overrides_a_raw_name(backed_up, tmp_path):
    store, img, _ = backed_up
    out = str(tmp_path / "x.img")
    _restore(store, out, "--format", "vmdk")
    info = json.loads(subprocess.run([QEMU or "qemu-img", "info", "--output=json", out], check=True,
                                     capture_output=True, text=True).stdout)
    size = os.path.getsize(img)
    padded = -(-size // 512) * 512  # a VMDK holds whole sectors
    assert info["format"] == "vmdk" and info["virtual-size"] == padded
    back = str(tmp_path / "back.raw")
    subprocess.run([QEMU or "qemu-img", "convert", "-f", "vmdk", "-O", "raw", out, back], check=True)
    with open(back, "rb") as f, open(img, "rb") as g:
        assert f.read(size) == g.read() and f.read() == bytes(padded - size)


def test_threads_one_and_eight_restore_the_same_bytes(backed_up, tmp_path):
    store, img, backup = backed_up
    docs = {}
    for n in ("1", "8"):
        out = str(tmp_path / f"t{n}.img")
        docs[n] = _restore(store, out, "--threads", n)
        assert same_file(out, img), f"--threads {n} restored other bytes"
    assert same_file(str(tmp_path / "t1.img"), str(tmp_path / "t8.img"))
    assert allocated_ranges(str(tmp_path / "t1.img")) == allocated_ranges(str(tmp_path / "t8.img"))
    with open(img, "rb") as f:
        data = f.read()
    lengths = [len(data[at:at + CS]) for at in range(0, len(data), CS) if data[at:at + CS].count(0) != CS]
    assert backup["stats"]["nonzero_chunks"] == len(lengths)
    for doc in docs.values():
        assert doc["chunks_written"] == len(lengths) and doc["bytes_written"] == sum(lengths)
        assert doc["chunks_read"] == docs["1"]["chunks_read"] > 0


def test_zeroed_target_changes_nothing_for_a_new_file(backed_up, tmp_path):
    """A restored file is new and sparse, so it already reads as zeros: the
    flag (meant for block devices and vddk disks) leaves its bytes and holes alone."""
    store, img, _ = backed_up
    plain, zeroed = str(tmp_path / "plain.img"), str(tmp_path / "zeroed.img")
    a = _restore(store, plain)
    b = _restore(store, zeroed, "--zeroed-target")
    assert same_file(plain, img) and same_file(zeroed, img)
    assert allocated_ranges(zeroed) == allocated_ranges(plain)
    with open(img, "rb") as f:
        data = f.read()
    nonzero = sum(1 for at in range(0, len(data), BLOCK) if data[at:at + BLOCK].count(0) != len(data[at:at + BLOCK]))
    for out in (plain, zeroed):
        assert os.stat(out).st_blocks * 512 <= nonzero * BLOCK  # zero 64 KiB blocks stay holes
    assert a["bytes_written"] == b["bytes_written"] and a["chunks_written"] == b["chunks_written"]


def test_threads_n_runs_exactly_n_restore_threads(backed_up, tmp_path):
    """``--threads 3`` means three threads: the I/O allowance for the default
    (two per core) must not double what an administrator asked for."""
    import threading

    from engine.repository import Repository
    from engine.restore import restore_backup

    store, img, _ = backed_up
    seen = []

    def count(_done):
        seen.append(sum(t.name.startswith("bv-restore") for t in threading.enumerate()))

    out = str(tmp_path / "t3.img")
    with Repository.open(store) as repo:
        restore_backup(repo, "d@2", out, workers=3, on_progress=count)
    assert same_file(out, img)
    assert seen and max(seen) == 3
