"""Hosted VMDKs made by qemu-img back up and restore byte-identical; VMDKs written
by blockvault pass qemu-img check and convert back to the same bytes."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import make_sparse, rng, run_cli, same_file, text_bytes, write_at

QEMU = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(QEMU is None and not os.environ.get("CI"), reason="qemu-img not installed")

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized"]


def qemu(*args):
    return subprocess.run([QEMU or "qemu-img", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def source_raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("vmdk-src")
    raw = str(d / "source.raw")
    r = rng(70)
    size = 40 * (1 << 20) + 512 * 3      # a partial last grain
    make_sparse(raw, size)
    write_at(raw, 7, text_bytes(r, 200_000))               # not grain-aligned
    write_at(raw, 5 << 20, r.bytes(1 << 20))
    write_at(raw, (20 << 20) + 4096, bytes(128 << 10))     # written zeros
    write_at(raw, size - 1000, r.bytes(1000))              # the very end
    return raw


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_vmdk_backs_up_byte_identical(tmp_path, source_raw, subformat):
    vmdk = str(tmp_path / f"disk-{subformat}.vmdk")
    qemu("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", source_raw, vmdk)
    reference = str(tmp_path / "reference.raw")
    qemu("convert", "-O", "raw", vmdk, reference)
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    proc = run_cli("backup", store, vmdk, "--disk", "vm", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["metadata"]["source"]["kind"] == "vmdk"
    assert doc["metadata"]["source"]["create_type"] == subformat
    if subformat != "monolithicFlat" and subformat != "twoGbMaxExtentFlat":
        # Allocated grains only: far less than the 40 MiB capacity.
        assert doc["stats"]["bytes_read"] < 4 << 20
    out = str(tmp_path / "restored.raw")
    proc = run_cli("restore", store, "vm@1", out)
    assert proc.returncode == 0, proc.stderr
    assert same_file(out, reference)


def test_restore_to_vmdk_passes_qemu_check(tmp_path, source_raw):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "128K").returncode == 0
    assert run_cli("backup", store, source_raw, "--disk", "d").returncode == 0
    out = str(tmp_path / "restored.vmdk")
    proc = run_cli("restore", store, "d@1", out)
    assert proc.returncode == 0, proc.stderr
    assert "No errors" in qemu("check", out).stdout
    info = json.loads(qemu("info", "--output=json", out).stdout)
    assert info["format"] == "vmdk" and info["virtual-size"] == os.path.getsize(source_raw)
    back = str(tmp_path / "back.raw")
    qemu("convert", "-O", "raw", out, back)
    assert same_file(back, source_raw)
    # ... and blockvault reads its own VMDK back too.
    assert run_cli("backup", store, out, "--disk", "again").returncode == 0
    again = str(tmp_path / "again.raw")
    assert run_cli("restore", store, "again@1", again).returncode == 0
    assert same_file(again, source_raw)


def test_corrupt_vmdk_is_a_clear_error(tmp_path, source_raw):
    vmdk = str(tmp_path / "bad.vmdk")
    qemu("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", source_raw, vmdk)
    with open(vmdk, "r+b") as f:
        f.truncate(2048)                                   # header survives, tables do not
    store = str(tmp_path / "store")
    assert run_cli("init", store).returncode == 0
    proc = run_cli("backup", store, vmdk, "--disk", "bad")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bad.vmdk" in proc.stderr
    assert json.loads(run_cli("list", store, "--json").stdout)["backups"] == []
