"""The vCenter simulator (tools/vcsim) does what the vSphere backup code needs.

Everything goes through pyvmomi against the real binary: CBT enable, snapshots
with changeIds, QueryChangedDiskAreas computed from the bytes of each disk's
flat file, datastore HTTP access, snapshot removal and VM creation. Disk data
is written straight into the flat files, as a guest would write its disk.
"""

from __future__ import annotations

import os
import re

import pytest

try:
    from pyVmomi import vim, vmodl
except ImportError:  # a declared dependency: only a bare developer machine lacks it
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise
    pytest.skip("pyvmomi is not installed", allow_module_level=True)

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB  # the shim's CBT granularity
WINDOW = 4 * MiB  # default -cbt-window-bytes
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/(\d+)$")


# -- helpers -------------------------------------------------------------------


def enable_cbt(sim, vm):
    sim.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled is True


def snapshot(sim, vm, name, quiesce=False):
    snap = sim.wait(vm.CreateSnapshot_Task(name=name, description="test", memory=False, quiesce=quiesce))
    assert isinstance(snap, vim.vm.Snapshot)
    return snap


def snap_disk(sim, snap, key):
    return next(d for d in sim.disks(snap.config) if d.key == key)


def write(sim, disk, offset, data):
    with open(sim.flat_path(disk), "r+b") as f:
        f.seek(offset)
        f.write(data)


def create_vm(sim, name, capacities_kb, cbt=False):
    """CreateVM_Task with a PVSCSI controller and one thin disk per capacity."""
    dc = sim.datacenter
    host = next(h for h in sim.content.viewManager.CreateContainerView(
        dc.hostFolder, [vim.HostSystem], True).view)
    changes = [vim.vm.device.VirtualDeviceSpec(
        operation="add",
        device=vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing"))]
    for i, kb in enumerate(capacities_kb):
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation="add", fileOperation="create",
            device=vim.vm.device.VirtualDisk(
                key=-101 - i, controllerKey=-100, unitNumber=i, capacityInKB=kb,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{sim.datastore.name}]", diskMode="persistent", thinProvisioned=True))))
    spec = vim.vm.ConfigSpec(name=name, guestId="otherGuest", numCPUs=1, memoryMB=64,
                             files=vim.vm.FileInfo(vmPathName=f"[{sim.datastore.name}]"),
                             changeTrackingEnabled=cbt, deviceChange=changes)
    vm = sim.wait(dc.vmFolder.CreateVM_Task(config=spec, pool=host.parent.resourcePool, host=host))
    assert isinstance(vm, vim.VirtualMachine)
    return vm


def query_all(vm, snap, key, change_id, capacity, max_extents=None):
    """Loop QueryChangedDiskAreas over the whole disk, as backup code must, and
    check every reply's window and extents. Returns (extents, replies)."""
    pos, extents, replies = 0, [], []
    while pos < capacity:
        r = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=pos, changeId=change_id)
        assert r.startOffset == pos
        assert 0 < r.length <= capacity - pos
        end = pos + r.length
        prev_end = None
        for e in r.changedArea:
            assert e.length > 0
            assert pos <= e.start and e.start + e.length <= end, "extent outside the reply's window"
            if prev_end is not None:
                assert e.start > prev_end, "extents must be sorted, non-overlapping and merged"
            prev_end = e.start + e.length
            extents.append((e.start, e.length))
        if max_extents is not None:
            assert len(r.changedArea) <= max_extents
        replies.append(r)
        pos = end
    assert pos == capacity, "the replies must cover the disk exactly"
    return extents, replies


def blocks_of(extents, capacity):
    """The 64 KiB block numbers the extents cover; they must be block-aligned."""
    out = set()
    for start, length in extents:
        end = start + length
        assert start % BLOCK == 0 and (end % BLOCK == 0 or end == capacity), (start, length)
        out.update(range(start // BLOCK, (end + BLOCK - 1) // BLOCK))
    return out


# -- the three 0.24.2 bugs -------------------------------------------------------


def test_unset_property_reads_as_none(vcsim):
    # 0.24.2's Fetch panics on an unset property; pyvmomi saw RemoteDisconnected.
    vm = vcsim.vm()
    assert vm.snapshot is None
    assert vm.parentVApp is None
    assert vm.name == "DC0_H0_VM0"  # the connection survived


def test_change_tracking_supported_and_enabled(vcsim):
    vm = vcsim.vm()
    assert vm.capability.changeTrackingSupported is True
    assert not vm.config.changeTrackingEnabled
    enable_cbt(vcsim, vm)
    again = vcsim.vm()  # a fresh read
    assert again.config.changeTrackingEnabled is True


def test_snapshot_task_entity_is_the_vm(vcsim):
    vm = vcsim.vm()
    snap = snapshot(vcsim, vm, "s1")
    task = snap.RemoveSnapshot_Task(removeChildren=False)
    assert vcsim.wait(task) is None  # WaitForTask raised TypeError in plain 0.24.2
    assert task.info.state == "success"
    assert task.info.entity == vm
    assert task.info.entityName == vm.name
    assert vm.snapshot is None


# -- changeIds -----------------------------------------------------------------


def test_snapshot_gives_every_disk_a_change_id(vcsim):
    vm = vcsim.vm()
    # A second disk, added to the existing VM.
    controller = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))
    add = vim.vm.device.VirtualDeviceSpec(
        operation="add", fileOperation="create",
        device=vim.vm.device.VirtualDisk(
            key=-1, controllerKey=controller.key, unitNumber=1, capacityInKB=2048,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{vcsim.datastore.name}]", diskMode="persistent", thinProvisioned=True)))
    vcsim.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[add])))
    disks = vcsim.disks(vm.config)
    assert len(disks) == 2 and disks[0].backing.fileName != disks[1].backing.fileName

    plain = snapshot(vcsim, vm, "before-cbt")
    assert all(d.backing.changeId is None for d in vcsim.disks(plain.config))

    enable_cbt(vcsim, vm)
    s1 = snapshot(vcsim, vm, "s1")
    s2 = snapshot(vcsim, vm, "s2", quiesce=True)
    ids1 = {d.key: d.backing.changeId for d in vcsim.disks(s1.config)}
    ids2 = {d.key: d.backing.changeId for d in vcsim.disks(s2.config)}
    assert set(ids1) == set(ids2) == {d.key for d in disks}
    for key in ids1:
        m1, m2 = CHANGE_ID.match(ids1[key]), CHANGE_ID.match(ids2[key])
        assert m1 and m2, (ids1[key], ids2[key])
        # Same tracking UUID, a newer sequence number.
        assert ids1[key].split("/")[0] == ids2[key].split("/")[0]
        assert int(m2.group(3)) > int(m1.group(3))
    # Each disk has its own UUID; the live VM shows the latest changeIds; the
    # snapshot config is a point-in-time copy with both capacity fields.
    assert len({c.split("/")[0] for c in ids1.values()}) == 2
    assert {d.key: d.backing.changeId for d in vcsim.disks(vm.config)} == ids2
    for d in vcsim.disks(s1.config):
        assert d.capacityInBytes == d.capacityInKB * KiB
    assert all(d.backing.changeId is None for d in vcsim.disks(plain.config))


# -- QueryChangedDiskAreas -------------------------------------------------------


def test_changed_areas_are_exactly_the_written_blocks(vcsim):
    capacity = 24 * MiB
    vm = create_vm(vcsim, "cbt-vm", [capacity // KiB], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    assert disk.capacityInBytes == capacity
    write(vcsim, disk, 5 * MiB, b"old data before the first backup" * 100)

    s1 = snapshot(vcsim, vm, "t1")
    cid1 = snap_disk(vcsim, s1, disk.key).backing.changeId

    writes = [
        (0, b"\x01" * 100),                    # block 0
        (3 * BLOCK - 5, b"straddles"),         # blocks 2 and 3
        (WINDOW - 1, b"\x02\x03"),             # blocks 63 and 64: across two windows
        (10 * MiB, b"\xff" * BLOCK),           # exactly block 160
        (capacity - 1, b"\x09"),               # the last block
    ]
    for offset, data in writes:
        write(vcsim, disk, offset, data)
    expected = {0, 2, 3, 63, 64, 160, capacity // BLOCK - 1}

    s2 = snapshot(vcsim, vm, "t2")
    d2 = snap_disk(vcsim, s2, disk.key)
    extents, replies = query_all(vm, s2, disk.key, cid1, capacity)
    assert blocks_of(extents, capacity) == expected
    assert len(replies) >= capacity // WINDOW  # the disk does not fit one reply
    # Blocks 2 and 3 are one merged extent.
    assert (2 * BLOCK, 2 * BLOCK) in extents

    # Point in time: later writes change neither answer.
    write(vcsim, disk, 20 * MiB, b"after the snapshot")
    assert blocks_of(query_all(vm, s2, disk.key, cid1, capacity)[0], capacity) == expected
    assert query_all(vm, s2, disk.key, d2.backing.changeId, capacity)[0] == []
    assert query_all(vm, s1, disk.key, cid1, capacity)[0] == []

    # A window may start anywhere on a 512-byte boundary.
    r = vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=disk.key, startOffset=3 * BLOCK + 512, changeId=cid1)
    assert r.startOffset == 3 * BLOCK + 512
    assert r.changedArea[0].start == 3 * BLOCK + 512
    assert r.changedArea[0].length == BLOCK - 512


def test_star_reports_allocated_areas_only(vcsim):
    capacity = 8 * MiB
    vm = create_vm(vcsim, "star-vm", [capacity // KiB], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 1 * BLOCK + 7, b"data")
    write(vcsim, disk, 5 * BLOCK, b"\x55" * (2 * BLOCK))       # blocks 5 and 6
    write(vcsim, disk, 9 * BLOCK, b"\x00" * BLOCK)             # zeros: not reported (documented)
    write(vcsim, disk, 100 * BLOCK + BLOCK - 1, b"z")          # last byte of block 100

    snap = snapshot(vcsim, vm, "full")
    extents, _ = query_all(vm, snap, disk.key, "*", capacity)
    assert blocks_of(extents, capacity) == {1, 5, 6, 100}
    assert (5 * BLOCK, 2 * BLOCK) in extents

    # An untouched disk has nothing allocated.
    empty = create_vm(vcsim, "empty-vm", [capacity // KiB], cbt=True)
    esnap = snapshot(vcsim, empty, "full")
    edisk = vcsim.disks(empty.config)[0]
    assert query_all(empty, esnap, edisk.key, "*", capacity)[0] == []


def test_replies_are_bounded_by_extent_count(vcsim_factory):
    sim = vcsim_factory("-cbt-window-extents", "2", "-cbt-window-bytes", str(64 * MiB))
    capacity = 4 * MiB
    vm = create_vm(sim, "many-extents", [capacity // KiB], cbt=True)
    disk = sim.disks(vm.config)[0]
    changed = [0, 2, 4, 6, 8, 40]
    for b in changed:
        write(sim, disk, b * BLOCK, b"x")
    snap = snapshot(sim, vm, "s")
    extents, replies = query_all(vm, snap, disk.key, "*", capacity, max_extents=2)
    assert blocks_of(extents, capacity) == set(changed)
    assert len(replies) == 3
    # A reply ended by the extent limit ends right after its last extent.
    first = replies[0]
    assert first.length == first.changedArea[-1].start + first.changedArea[-1].length


def test_unknown_or_foreign_change_id_is_a_file_fault(vcsim):
    vm = create_vm(vcsim, "faults", [1024, 2048], cbt=True)
    d1, d2 = vcsim.disks(vm.config)
    snap = snapshot(vcsim, vm, "s")
    cid2 = snap_disk(vcsim, snap, d2.key).backing.changeId
    bogus = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/7"
    for change_id in (bogus, "not a change id", cid2):  # cid2 belongs to the other disk
        with pytest.raises(vim.fault.FileFault) as info:
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=d1.key, startOffset=0, changeId=change_id)
        assert info.value.file == d1.backing.fileName


def test_snapshot_without_cbt_is_a_file_fault(vcsim):
    vm = vcsim.vm()
    snap = snapshot(vcsim, vm, "no-cbt")
    disk = vcsim.disks(vm.config)[0]
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=0, changeId="*")


def test_cbt_reset_voids_old_change_ids(vcsim):
    vm = vcsim.vm()
    enable_cbt(vcsim, vm)
    disk = vcsim.disks(vm.config)[0]
    old = snap_disk(vcsim, snapshot(vcsim, vm, "s1"), disk.key).backing.changeId
    vcsim.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert vcsim.disks(vm.config)[0].backing.changeId is None
    off = snapshot(vcsim, vm, "cbt-off")
    assert snap_disk(vcsim, off, disk.key).backing.changeId is None
    enable_cbt(vcsim, vm)
    s2 = snapshot(vcsim, vm, "s2")
    new = snap_disk(vcsim, s2, disk.key).backing.changeId
    assert new.split("/")[0] != old.split("/")[0]
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=disk.key, startOffset=0, changeId=old)


def test_bad_arguments_are_invalid_argument(vcsim):
    capacity = 2 * MiB
    vm = create_vm(vcsim, "bad-args", [capacity // KiB], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    snap = snapshot(vcsim, vm, "s")
    for offset in (-512, 100, 513, capacity, capacity + 512):
        with pytest.raises(vmodl.fault.InvalidArgument) as info:
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId="*")
        assert info.value.invalidProperty == "startOffset"
    controller = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))
    with pytest.raises(vmodl.fault.InvalidArgument) as info:
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=controller.key, startOffset=0, changeId="*")
    assert info.value.invalidProperty == "deviceKey"
    with pytest.raises(vmodl.fault.InvalidArgument) as info:  # a snapshot of another VM
        vcsim.vm().QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=0, changeId="*")
    assert info.value.invalidProperty == "snapshot"


def test_current_state_needs_a_powered_off_vm(vcsim):
    vm = create_vm(vcsim, "current", [1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 3 * BLOCK, b"now")
    vcsim.wait(vm.PowerOnVM_Task())
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(deviceKey=disk.key, startOffset=0, changeId="*")
    vcsim.wait(vm.PowerOffVM_Task())
    r = vm.QueryChangedDiskAreas(deviceKey=disk.key, startOffset=0, changeId="*")
    assert [(e.start, e.length) for e in r.changedArea] == [(3 * BLOCK, BLOCK)]


# -- the backup sequence ---------------------------------------------------------


def test_change_id_outlives_its_removed_snapshot(vcsim):
    """Nightly incremental: T1's snapshot is deleted after the backup, T2 asks
    for the changes since T1's changeId."""
    capacity = 6 * MiB
    vm = create_vm(vcsim, "nightly", [capacity // KiB], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 0, b"base")
    s1 = snapshot(vcsim, vm, "backup")
    cid1 = snap_disk(vcsim, s1, disk.key).backing.changeId
    vcsim.wait(s1.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        vm.QueryChangedDiskAreas(snapshot=s1, deviceKey=disk.key, startOffset=0, changeId="*")

    write(vcsim, disk, 5 * MiB + 10, b"changed at night")
    s2 = snapshot(vcsim, vm, "backup")
    assert vm.snapshot.currentSnapshot == s2
    extents, _ = query_all(vm, s2, disk.key, cid1, capacity)
    assert blocks_of(extents, capacity) == {5 * MiB // BLOCK}
    vcsim.wait(s2.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None


def test_leftover_snapshots_are_found_by_name_and_removed(vcsim):
    """Step 2 of the backup sequence: delete this tool's snapshots that a
    failed run left behind, found by name in the snapshot tree."""
    vm = vcsim.vm()
    keep = snapshot(vcsim, vm, "someone-else")
    snapshot(vcsim, vm, "blockvault")
    snapshot(vcsim, vm, "blockvault")

    def walk(trees):
        for t in trees:
            yield t
            yield from walk(t.childSnapshotList)

    leftovers = [t.snapshot for t in walk(vm.snapshot.rootSnapshotList) if t.name == "blockvault"]
    assert len(leftovers) == 2
    for snap in leftovers:
        vcsim.wait(snap.RemoveSnapshot_Task(removeChildren=False))
    assert [t.snapshot for t in walk(vm.snapshot.rootSnapshotList)] == [keep]
    assert vm.snapshot.currentSnapshot == keep


def test_datastore_http_range_read_and_upload(vcsim):
    capacity = 4 * MiB
    vm = create_vm(vcsim, "http-vm", [capacity // KiB])
    disk = vcsim.disks(vm.config)[0]
    flat_ds_path = vcsim.flat_ds_path(disk)
    pattern = bytes(range(256)) * 64  # 16 KiB
    write(vcsim, disk, MiB + 100, pattern)

    status, headers, body = vcsim.http("GET", flat_ds_path, headers={"Range": f"bytes={MiB}-{MiB + 32 * KiB - 1}"})
    assert status == 206
    assert headers["content-range"] == f"bytes {MiB}-{MiB + 32 * KiB - 1}/{capacity}"
    with open(vcsim.flat_path(disk), "rb") as f:
        f.seek(MiB)
        assert body == f.read(32 * KiB)
    assert body[100:100 + len(pattern)] == pattern

    # A never-written area reads as zeros: the flat file is as long as the disk.
    status, _, body = vcsim.http("GET", flat_ds_path, headers={"Range": f"bytes={capacity - 4096}-{capacity - 1}"})
    assert status == 206 and body == b"\0" * 4096

    # Without the session cookie, as on vCenter: 401.
    status, _, _ = vcsim.http("GET", flat_ds_path, headers={"Range": "bytes=0-511"}, cookie=False)
    assert status == 401

    # Upload, then find the bytes both on the filesystem and over HTTP.
    vm_dir = flat_ds_path.rsplit("/", 1)[0]
    payload = os.urandom(100 * KiB)
    status, _, _ = vcsim.http("PUT", f"{vm_dir}/uploaded.bin", body=payload,
                              headers={"Content-Type": "application/octet-stream"})
    assert status in (200, 201)
    ds, rel = vcsim.split_datastore_path(f"{vm_dir}/uploaded.bin")
    assert (vcsim.datastore_dir(ds) / rel).read_bytes() == payload
    status, _, body = vcsim.http("GET", f"{vm_dir}/uploaded.bin")
    assert status == 200 and body == payload


def test_create_vm_with_two_disks(vcsim):
    vm = create_vm(vcsim, "restored", [8 * 1024, 40 * 1024], cbt=True)
    assert vm.config.changeTrackingEnabled is True
    disks = vcsim.disks(vm.config)
    assert [d.capacityInKB for d in disks] == [8 * 1024, 40 * 1024]
    assert [d.capacityInBytes for d in disks] == [8 * MiB, 40 * MiB]
    for d in disks:
        assert d.backing.fileName.startswith(f"[{vcsim.datastore.name}] ")
        flat = vcsim.flat_path(d)
        assert flat.is_file() and flat.stat().st_size == d.capacityInBytes
    snap = snapshot(vcsim, vm, "s")
    ids = [snap_disk(vcsim, snap, d.key).backing.changeId for d in disks]
    assert all(CHANGE_ID.match(i) for i in ids) and ids[0] != ids[1]


def test_recreate_vm_from_saved_snapshot_config(vcsim):
    """Disaster recovery: CreateVM_Task from a backup's snapshot.config."""
    src = create_vm(vcsim, "original", [2048, 4096], cbt=True)
    saved = snapshot(vcsim, src, "backup").config

    # VMware's list of default devices to drop, plus the video card: vcsim's
    # CreateVM_Task already adds one at PCI unit 0, and a second one at the
    # same unit is refused with InvalidDeviceSpec.
    skip = (vim.vm.device.VirtualIDEController, vim.vm.device.VirtualPS2Controller,
            vim.vm.device.VirtualPCIController, vim.vm.device.VirtualSIOController,
            vim.vm.device.VirtualKeyboard, vim.vm.device.VirtualVMCIDevice,
            vim.vm.device.VirtualPointingDevice, vim.vm.device.VirtualVideoCard)
    keys = {}
    changes = []
    for dev in saved.hardware.device:
        if isinstance(dev, skip):
            continue
        keys[dev.key] = -(len(keys) + 1)
    for dev in saved.hardware.device:
        if dev.key not in keys:
            continue
        dev.key = keys[dev.key]
        if dev.controllerKey in keys:
            dev.controllerKey = keys[dev.controllerKey]
        spec = vim.vm.device.VirtualDeviceSpec(operation="add", device=dev)
        if isinstance(dev, vim.vm.device.VirtualDisk):
            dev.backing.parent = None  # changeId is left in: the server must not take it over
            dev.backing.fileName = f"[{vcsim.datastore.name}]"
            spec.fileOperation = "create"
        changes.append(spec)
    spec = vim.vm.ConfigSpec(name="original-restored", guestId=saved.guestId, numCPUs=saved.hardware.numCPU,
                             memoryMB=saved.hardware.memoryMB, changeTrackingEnabled=True,
                             files=vim.vm.FileInfo(vmPathName=f"[{vcsim.datastore.name}]"), deviceChange=changes)
    dc = vcsim.datacenter
    host = src.runtime.host
    new = vcsim.wait(dc.vmFolder.CreateVM_Task(config=spec, pool=src.resourcePool, host=host))
    assert new.name == "original-restored"
    assert [d.capacityInBytes for d in vcsim.disks(new.config)] == [2 * MiB, 4 * MiB]
    assert [d.backing.changeId for d in vcsim.disks(new.config)] == [None, None]
    fresh = snapshot(vcsim, new, "first")
    for d in vcsim.disks(fresh.config):
        assert CHANGE_ID.match(d.backing.changeId).group(3) == "1"
    assert {d.backing.fileName for d in vcsim.disks(new.config)}.isdisjoint(
        {d.backing.fileName for d in vcsim.disks(src.config)})


def test_stop_removes_the_process_and_its_datastores(vcsim_factory):
    sim = vcsim_factory()
    ds_dir = sim.datastore_dir()
    assert ds_dir.is_dir()
    sim.stop()
    assert sim.proc.returncode == 0
    assert not ds_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(sim.pid, 0)
