"""When Changed Block Tracking cannot be trusted: the night still succeeds, as a synthetic full.

A CBT reset, a resized disk, an added disk, a changeId the server refuses, a
reply that breaks the QueryChangedDiskAreas contract, and a sample of
"unchanged" chunks that turn out to have changed: each makes the disk be read
in full (only new chunks stored), with a warning on stderr and in --json.
"""

from __future__ import annotations

import logging
import os

import pytest

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import (BLOCK, KiB, MiB, bv, bv_json, connect, create_vm, image, init_store,
                             reset_cbt, restore_disk_image, server_args, write)

from pyVim.task import WaitForTask  # noqa: E402
from pyVmomi import vim  # noqa: E402

from engine.repository import Repository  # noqa: E402
from engine.vsphere.backup import BackupOptions, backup_vm  # noqa: E402
from engine.vsphere.changed_areas import (BadChangedAreas, ChangeIdRejected, _merge_reply,  # noqa: E402
                                          query_changed_areas, same_tracking)


def test_cbt_reset_reads_the_disk_in_full_and_stores_only_changes(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "db01", [8 * 1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 0, os.urandom(10 * BLOCK))
    t1 = bv_json("vsphere", "backup", store, *srv, "--vm", "db01")
    assert t1["disks"][0]["bytes_read"] == 10 * BLOCK

    write(vcsim, disk, 3 * BLOCK, os.urandom(BLOCK))
    reset_cbt(vcsim, vm)
    proc = bv("vsphere", "backup", store, *srv, "--vm", "db01", "--json")
    assert proc.returncode == 0, proc.stderr
    import json
    t2 = json.loads(proc.stdout)
    d = t2["disks"][0]
    assert t2["kind"] == "incremental" and d["kind"] == "incremental" and d["read"] == "allocated"
    assert "reset" in d["reason"] and d["bytes_read"] == 10 * BLOCK
    assert d["new_chunks"] == 1  # the other nine were deduplicated against T1
    assert len(t2["warnings"]) == 1 and "Changed Block Tracking was reset" in t2["warnings"][0]
    assert "blockvault: warning:" in proc.stderr and "reset" in proc.stderr
    assert restore_disk_image(store, d["backup"], tmp_path / "t2.img") == image(vcsim, disk)

    # The next night trusts CBT again: the changeId of T2 belongs to the new tracking.
    write(vcsim, disk, 5 * MiB, b"after the reset")
    t3 = bv_json("vsphere", "backup", store, *srv, "--vm", "db01", "--cbt-sample", "0")
    assert t3["disks"][0]["read"] == "changed-areas" and t3["disks"][0]["bytes_read"] == BLOCK
    assert t3["warnings"] == []


def test_resized_and_added_disks(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "grows", [2 * 1024], cbt=True)
    old = vcsim.disks(vm.config)[0]
    write(vcsim, old, 100 * KiB, b"first data" * 1000)
    t1 = bv_json("vsphere", "backup", store, *srv, "--vm", "grows")
    assert [d["device_key"] for d in t1["disks"]] == [old.key]

    old.capacityInKB, old.capacityInBytes = 6 * 1024, 6 * MiB
    ctrl = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.ParaVirtualSCSIController))
    added = vim.vm.device.VirtualDisk(
        key=-1, controllerKey=ctrl.key, unitNumber=1, capacityInKB=3 * 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=f"[{vcsim.datastore.name}]",
                                                              diskMode="persistent", thinProvisioned=True))
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=old),
        vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=added)])))
    grown, new = vcsim.disks(vm.config)
    assert grown.capacityInBytes == 6 * MiB
    write(vcsim, grown, 5 * MiB, b"in the grown part")
    write(vcsim, new, 0, b"on the new disk" * 100)

    t2 = bv_json("vsphere", "backup", store, *srv, "--vm", "grows")
    docs = {d["device_key"]: d for d in t2["disks"]}
    assert t2["kind"] == "incremental"
    assert docs[grown.key]["kind"] == "incremental" and docs[grown.key]["read"] == "allocated"
    assert "capacity changed" in docs[grown.key]["reason"]
    assert docs[new.key]["kind"] == "full" and docs[new.key]["reason"] == "new disk"
    assert any("capacity changed" in w for w in t2["warnings"])
    assert any("no earlier backup" in w for w in t2["warnings"])

    vcsim.datacenter.vmFolder.CreateFolder("recovered")
    dr = bv_json("vsphere", "restore", store, "grows@2", *srv, "--name", "grows-dr", "--folder", "recovered",
                 "--host", "DC0_H0", "--datastore", vcsim.datastore.name)
    new_vm = vcsim.content.searchIndex.FindByInventoryPath("DC0/vm/recovered/grows-dr")
    assert new_vm is not None and new_vm.runtime.host.name == "DC0_H0"
    restored = vcsim.disks(new_vm.config)
    assert [d["capacity"] for d in dr["disks"]] == [6 * MiB, 3 * MiB]
    assert [image(vcsim, d) for d in restored] == [image(vcsim, grown), image(vcsim, new)]


def test_a_refused_change_id_is_reported_as_such(vcsim):
    vm = create_vm(vcsim, "faulty", [1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    snap = vcsim.wait(vm.CreateSnapshot_Task(name="s", memory=False, quiesce=False))
    current = next(d for d in vcsim.disks(snap.config) if d.key == disk.key).backing.changeId
    bogus = current.split("/")[0] + "/999"  # the right tracking UUID, a sequence that never existed
    assert same_tracking(bogus, current)
    with connect(vcsim) as conn:
        with pytest.raises(ChangeIdRejected, match="FileFault"):
            query_changed_areas(conn, vm, snap, disk.key, MiB, bogus, "the test disk")
        assert query_changed_areas(conn, vm, snap, disk.key, MiB, "*", "the test disk") == []


def _reply(start, length, extents):
    return vim.VirtualMachine.DiskChangeInfo(
        startOffset=start, length=length,
        changedArea=[vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent(start=s, length=n) for s, n in extents])


@pytest.mark.parametrize("reply, problem", [
    (_reply(512, 1024, []), "starts at 512"),
    (_reply(0, 0, []), "does not advance"),
    (_reply(0, 8 * MiB, []), "does not advance"),                       # past the 4 MiB disk
    (_reply(0, MiB, [(0, 10), (5, 10)]), "overlaps"),
    (_reply(0, MiB, [(100, 10), (0, 10)]), "out of order"),
    (_reply(0, MiB, [(MiB - 5, 10)]), "outside the reply's window"),
    (_reply(0, MiB, [(10, 0)]), "has length 0"),
])
def test_replies_breaking_the_contract_are_refused(reply, problem):
    with pytest.raises(BadChangedAreas, match=problem):
        _merge_reply([], reply, 0, 4 * MiB, "QueryChangedDiskAreas")


def test_replies_are_merged_across_window_edges():
    extents = _merge_reply([], _reply(0, MiB, [(0, 10), (MiB - 512, 512)]), 0, 4 * MiB, "q")
    extents = _merge_reply(extents, _reply(MiB, MiB, [(MiB, 512), (MiB + 4096, 1)]), MiB, 4 * MiB, "q")
    assert extents == [(0, 10), (MiB - 512, 1024), (MiB + 4096, 1)]


def test_cbt_that_misses_a_change_is_caught_by_the_sample(vcsim, tmp_path, caplog):
    """vcsim's CBT is exact, so a change it cannot see is made after the snapshot: the
    sample reads the disk as it is and finds a chunk whose digest is not the base's."""
    store = init_store(tmp_path / "store")
    vm = create_vm(vcsim, "liar", [4 * 1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 0, os.urandom(16 * BLOCK))
    with Repository.open(store) as repo, connect(vcsim) as conn:
        backup_vm(repo, conn, vm, BackupOptions())

        def sneak(event, detail):
            if event == "snapshot-created":
                write(vcsim, disk, 7 * BLOCK + 9, b"CBT never saw this")

        with caplog.at_level(logging.WARNING, logger="blockvault.vsphere"):
            result = backup_vm(repo, conn, vm, BackupOptions(cbt_sample=1.0, seed=7, on_event=sneak))
    doc = result.record.disks[0]
    assert doc["cbt_mismatch"] is True and doc["read"] == "allocated" and doc["sample"]["mismatched"] == 1
    assert doc["sample"]["chunks"] == 64  # every chunk of the 4 MiB disk: CBT reported none changed
    assert any(r.levelno == logging.ERROR and "CBT MISMATCH" in r.getMessage() and "offsets 458752" in r.getMessage()
               for r in caplog.records)
    assert any("CBT MISMATCH" in w for w in result.warnings)
    # Read in full, so the backup holds what the disk holds now.
    assert restore_disk_image(store, doc["backup"], tmp_path / "t2.img") == image(vcsim, disk)


def test_http_transport_refuses_a_vm_with_other_snapshots(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "snapped", [1024], cbt=True)
    vcsim.wait(vm.CreateSnapshot_Task(name="before upgrade", memory=False, quiesce=False))
    proc = bv("vsphere", "backup", store, *srv, "--vm", "snapped")
    assert proc.returncode == 1
    assert "before upgrade" in proc.stderr and "--transport vddk" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [t.name for t in vm.snapshot.rootSnapshotList] == ["before upgrade"]
    assert bv_json("vsphere", "list", store)["vm_backups"] == []
