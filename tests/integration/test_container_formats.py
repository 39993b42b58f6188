"""qcow2, QED, VDI, VHD and VHDX images (made by qemu-img) are refused as backup
sources, naming the format and the conversion, and never stored as container
bytes; restore targets named like them need --format raw."""

import os
import shutil
import subprocess

import pytest

from helpers import make_sparse, rng, run_cli, same_file, store_fingerprint, write_at

CS = 64 << 10

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None and not os.environ.get("CI"),
                                reason="qemu-img (qemu-utils) is not installed")

# (qemu-img format, options, name in the message, file name)
FORMATS = [
    ("qcow2", [], "qcow2", "disk.qcow2"),
    ("qcow2", [], "qcow2", "disk.img"),           # named like a raw image: recognised by content
    ("qed", [], "QED", "disk.qed"),
    ("vdi", [], "VDI", "disk.vdi"),
    ("vpc", [], "VHD (dynamic)", "disk.vhd"),
    ("vpc", ["-o", "subformat=fixed"], "VHD (fixed)", "disk.vhd"),
    ("vhdx", [], "VHDX", "disk.vhdx"),
]


@pytest.mark.parametrize("fmt,options,name,filename", FORMATS,
                         ids=[f"{f[0]}{'-fixed' if f[1] else ''}-{f[3]}" for f in FORMATS])
def test_container_source_is_refused(store_path, tmp_path, fmt, options, name, filename):
    raw = str(tmp_path / "guest.raw")
    make_sparse(raw, 2 << 20)
    write_at(raw, 0, rng(70).bytes(3 * CS))      # real data inside the container
    image = str(tmp_path / filename)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, raw, image], check=True)
    before = store_fingerprint(store_path)
    proc = run_cli("backup", store_path, image, "--disk", "c")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    converted = image[:-4] + "-raw.img" if filename.endswith(".img") else os.path.splitext(image)[0] + ".img"
    assert f"{image} is a {name} image" in proc.stderr
    assert f"qemu-img convert -f {fmt} -O raw {image} {converted}" in proc.stderr
    assert store_fingerprint(store_path) == before
    assert "no backups" in run_cli("list", store_path).stdout

    # The advice works: the converted image backs up and restores as the guest's disk.
    subprocess.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", image, converted], check=True)
    assert run_cli("backup", store_path, converted, "--disk", "c").returncode == 0
    out = str(tmp_path / "back.raw")
    assert run_cli("restore", store_path, "c@1", out).returncode == 0
    with open(out, "rb") as f, open(raw, "rb") as g:
        assert f.read(3 * CS) == g.read(3 * CS)


def test_raw_disks_that_only_look_like_containers_are_raw(store_path, tmp_path):
    """'conectix' in the last sector without a valid VHD checksum is data, not a footer."""
    img = str(tmp_path / "plain.img")
    make_sparse(img, 8 * CS)
    write_at(img, 8 * CS - 512, b"conectix" + bytes(100))
    write_at(img, 0, b"QFI")                    # three bytes of the qcow magic are not the magic
    assert run_cli("backup", store_path, img, "--disk", "p").returncode == 0
    out = str(tmp_path / "p.out")
    assert run_cli("restore", store_path, "p@1", out).returncode == 0 and same_file(out, img)


@pytest.mark.parametrize("suffix,fmt", [(".qcow2", "qcow2"), (".QED", "qed"), (".vdi", "vdi"), (".vhd", "vpc"),
                                        (".vhdx", "vhdx")])
def test_restore_target_named_like_a_container(store_path, tmp_path, suffix, fmt):
    img = str(tmp_path / "src.img")
    make_sparse(img, 4 * CS)
    write_at(img, CS, rng(71).bytes(CS))
    assert run_cli("backup", store_path, img, "--disk", "r").returncode == 0
    target = str(tmp_path / f"out{suffix}")
    proc = run_cli("restore", store_path, "r@1", target)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"restore target {target} is named like a" in proc.stderr
    assert f"qemu-img convert -f raw -O {fmt} {tmp_path / 'out.img'} {target}" in proc.stderr
    assert "--format raw" in proc.stderr
    assert not os.path.lexists(target) and not os.path.lexists(target + ".blockvault-partial")
    # Asked for explicitly, raw bytes under that name are written.
    proc = run_cli("restore", store_path, "r@1", target, "--format", "raw")
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, img)
