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
