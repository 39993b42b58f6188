"""File-level restore from a VM backup: ``files ... VM@N --disk KEY`` against vcsim.

The VM's first disk holds an MBR table (sfdisk) with an ext4 filesystem
(mkfs.ext4 -d), written into its flat file as a guest would; the VM is backed
up with ``vsphere backup``; one file and one directory come back from the
point byte for byte, through the disk backup the VM record names.
"""

from __future__ import annotations

import os

import pytest

import fsimages
from helpers import rng
# vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import KiB, MiB, bv, bv_json, create_vm, init_store, server_args, write

if fsimages.missing_tools() and os.environ.get("CI", "").strip().lower() in ("", "0", "false", "no"):
    pytest.skip(f"needs {', '.join(fsimages.missing_tools())} (tools/install.sh --test)", allow_module_level=True)


def test_one_file_from_a_vm_backup(vcsim, tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n10.0.0.5 db01\n")
    (src / "var" / "www").mkdir(parents=True)
    page = rng(11).bytes(700 * KiB)
    (src / "var" / "www" / "index.html").write_bytes(page)
    fsimages.stamp(str(src))
    disk_img = fsimages.mbr(str(tmp_path / "disk.img"), 48 * MiB, [(1, 46, "83")])
    fsimages.place(disk_img, 1 * MiB, fsimages.ext4(str(tmp_path / "p1"), 46 * MiB, str(src)))

    store = init_store(tmp_path / "store")
    vm = create_vm(vcsim, "web01", [48 * MiB // KiB, 4 * MiB // KiB])
    a, b = vcsim.disks(vm.config)
    fsimages.place(str(vcsim.flat_path(a)), 0, disk_img)  # what the guest's disk holds
    write(vcsim, b, 0, b"second disk")
    point = bv_json("vsphere", "backup", store, *server_args(vcsim), "--vm", "web01")
    assert point["id"] == "web01@1"

    # Two disks: the id alone is ambiguous, and the message lists their keys.
    proc = bv("files", "ls", store, "web01@1", "/")
    assert proc.returncode == 2 and f"device keys {a.key}, {b.key}" in proc.stderr, proc.stderr
    proc = bv("files", "ls", store, "web01@1", "/", "--disk", "9999")
    assert proc.returncode == 1 and "has no disk 9999" in proc.stderr, proc.stderr

    parts = bv_json("files", "partitions", store, "web01@latest", "--disk", str(a.key))
    assert parts["id"] == f"web01/disk-{a.key}@1" and parts["table"] == "mbr"
    assert [(p["number"], p["filesystem"]) for p in parts["partitions"]] == [(1, "ext4")]

    dest = tmp_path / "restored"
    got = bv_json("files", "get", store, "web01@1", "/etc/hosts", "/var/www", str(dest), "--disk", str(a.key))
    assert got["files"] == 2 and got["directories"] == 1 and got["chunks_read"] < got["chunks_total"] // 4
    assert (dest / "hosts").read_bytes() == (src / "etc" / "hosts").read_bytes()
    assert (dest / "www" / "index.html").read_bytes() == page
    assert os.stat(dest / "hosts").st_mtime_ns == os.stat(src / "etc" / "hosts").st_mtime_ns

    # The disk backup's own id reads the same point.
    listing = bv_json("files", "ls", store, f"web01/disk-{a.key}@1", "/etc")
    assert [e["name"] for e in listing["entries"]] == ["hosts"]
