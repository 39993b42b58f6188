"""A VM disk's own catalog record carries the warnings of its backup (BackupRecord.warnings),
as a file backup's does, so `list --json` of the disk says why it was read in full."""

from __future__ import annotations

import json
import os

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import BLOCK, bv, bv_json, create_vm, init_store, reset_cbt, server_args, write


def test_disk_record_keeps_the_cbt_fallback_warning(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "web07", [4 * 1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 0, os.urandom(4 * BLOCK))
    t1 = bv_json("vsphere", "backup", store, *srv, "--vm", "web07")
    name = t1["disks"][0]["backup"].rpartition("@")[0]
    reset_cbt(vcsim, vm)
    t2 = bv_json("vsphere", "backup", store, *srv, "--vm", "web07")
    [warning] = t2["warnings"]
    assert "Changed Block Tracking was reset" in warning
    proc = bv("list", store, "--disk", name, "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)["backups"]
    assert [r["warnings"] for r in records] == [[], [warning]]


def test_a_resized_disk_is_warned_about_once(vcsim, tmp_path):
    """DiskJob says why a resized disk is read in full; backup_disk must not add its own
    'SOURCE CHANGED' for the same resize (one cause, one warning)."""
    from pyVim.task import WaitForTask
    from pyVmomi import vim
    from vsphere_helpers import MiB

    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "grows2", [2 * 1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 0, os.urandom(BLOCK))
    bv_json("vsphere", "backup", store, *srv, "--vm", "grows2")
    disk.capacityInKB, disk.capacityInBytes = 4 * 1024, 4 * MiB
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])))
    t2 = bv_json("vsphere", "backup", store, *srv, "--vm", "grows2")
    [warning] = t2["warnings"]
    assert "capacity changed" in warning
    assert t2["disks"][0]["warnings"] == [warning]
    records = json.loads(bv("list", store, "--disk", t2["disks"][0]["backup"].rpartition("@")[0],
                            "--json").stdout)["backups"]
    assert records[-1]["warnings"] == [warning]
