"""The seed's sequence, end to end, through the ``blockvault vsphere`` command against vcsim.

T1 full; guest writes; T2 and T3 incrementals that read exactly the changed
chunks; a differential; then disaster recovery of every point into a new VM
whose disks are byte-identical to the source VM's disks at that time.  The
VM has two disks (read in parallel), one of them not a whole number of
chunks long, and spans several QueryChangedDiskAreas windows.
"""

from __future__ import annotations

import os

# vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import (BLOCK, KiB, MiB, bv, bv_json, create_vm, image, init_store, keep_images,
                             server_args, write)

CAP_A = 12 * MiB            # three 4 MiB QueryChangedDiskAreas windows
CAP_B = 4 * MiB + 32 * KiB  # the last chunk is half a chunk


def blocks(*spans):
    """Chunk indices covered by (offset, length) spans."""
    out = set()
    for off, n in spans:
        out.update(range(off // BLOCK, (off + n - 1) // BLOCK + 1))
    return out


def by_key(doc):
    return {d["device_key"]: d for d in doc["disks"]}


def test_nightly_sequence_and_disaster_recovery(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    srv = server_args(vcsim)
    vm = create_vm(vcsim, "web01", [CAP_A // KiB, CAP_B // KiB], nic=True)
    a, b = vcsim.disks(vm.config)
    assert vm.config.changeTrackingEnabled is not True  # the first backup turns CBT on

    r = os.urandom
    write(vcsim, a, 0, r(300 * KiB))                    # chunks 0-4
    write(vcsim, a, 3 * MiB + 7, b"boot sector? " * 5000)
    write(vcsim, b, 1 * MiB, r(100 * KiB))
    write(vcsim, b, CAP_B - 10, b"tail bytes")           # inside the half chunk

    # -- T1: the first backup of the VM is a full (mode auto) ----------------------
    t1 = bv_json("vsphere", "backup", store, *srv, "--vm", "web01")
    assert t1["id"] == "web01@1" and t1["kind"] == "full" and t1["base"] is None
    assert [d["kind"] for d in t1["disks"]] == ["full", "full"]
    assert all(d["transport"] == "http" for d in t1["disks"])
    assert vm.config.changeTrackingEnabled is True and vm.snapshot is None
    allocated_a = blocks((0, 300 * KiB), (3 * MiB + 7, 13 * 5000))
    assert by_key(t1)[a.key]["bytes_read"] == len(allocated_a) * BLOCK
    assert by_key(t1)[b.key]["bytes_read"] == 2 * BLOCK + 32 * KiB  # 1 MiB + the half chunk
    points = {1: keep_images(vcsim, vm, tmp_path, "t1")}

    # -- T2: an incremental reads exactly the changed chunks --------------------------
    write(vcsim, a, 5 * MiB, r(BLOCK))                   # chunk 80
    write(vcsim, a, 4 * MiB - 3, b"across a window edge")  # chunks 63 and 64
    changed_a2 = blocks((5 * MiB, BLOCK), (4 * MiB - 3, 20))
    t2 = bv_json("vsphere", "backup", store, *srv, "--vm", "web01", "--cbt-sample", "0")
    assert t2["id"] == "web01@2" and t2["kind"] == "incremental" and t2["base"] == "web01@1"
    d2 = by_key(t2)
    assert d2[a.key]["read"] == "changed-areas" and d2[a.key]["kind"] == "incremental"
    assert d2[a.key]["bytes_read"] == len(changed_a2) * BLOCK == d2[a.key]["bytes_transferred"]
    assert d2[b.key]["bytes_read"] == 0 == d2[b.key]["bytes_transferred"]
    assert d2[a.key]["change_id"] != by_key(t1)[a.key]["change_id"]
    assert t2["warnings"] == []
    points[2] = keep_images(vcsim, vm, tmp_path, "t2")

    # -- T3: again, with the CBT sample re-reading some unchanged chunks -------------------
    write(vcsim, a, 100, b"rewritten" * 10)              # chunk 0
    write(vcsim, b, CAP_B - 40 * KiB, r(10 * KiB))       # chunk 64 and the half chunk
    t3 = bv_json("vsphere", "backup", store, *srv, "--vm", "web01", "--cbt-sample", "0.05")
    d3 = by_key(t3)
    assert t3["kind"] == "incremental" and t3["base"] == "web01@2"
    assert d3[a.key]["bytes_read"] == BLOCK
    assert d3[b.key]["bytes_read"] == BLOCK + 32 * KiB
    for d in d3.values():
        assert d["sample"]["chunks"] >= 1 and d["sample"]["mismatched"] == 0
        assert d["bytes_transferred"] == d["bytes_read"] + d["sample"]["bytes_read"]
    points[3] = keep_images(vcsim, vm, tmp_path, "t3")

    # -- D: a differential reads everything changed since the full ----------------------------
    write(vcsim, a, 9 * MiB, r(2 * BLOCK))               # chunks 144-145
    diff = bv_json("vsphere", "backup", store, *srv, "--vm", "web01", "--mode", "differential",
                   "--cbt-sample", "0")
    dd = by_key(diff)
    assert diff["kind"] == "differential" and diff["base"] == "web01@1"
    since_full_a = changed_a2 | {0} | {144, 145}
    assert dd[a.key]["bytes_read"] == len(since_full_a) * BLOCK
    assert dd[b.key]["bytes_read"] == BLOCK + 32 * KiB
    points[4] = keep_images(vcsim, vm, tmp_path, "t4")

    listing = bv_json("vsphere", "list", store)["vm_backups"]
    assert [(x["id"], x["kind"]) for x in listing] == [
        ("web01@1", "full"), ("web01@2", "incremental"), ("web01@3", "incremental"), ("web01@4", "differential")]
    disks = bv_json("list", store)["backups"]
    assert sorted({x["disk"] for x in disks}) == [f"web01/disk-{a.key}", f"web01/disk-{b.key}"]
    assert bv("verify", store).returncode == 0

    # -- disaster recovery of every point into a new VM ------------------------------------------
    source_uuid, source_macs = vm.config.uuid, macs(vm)
    for n, saved in points.items():
        where = ["--resource-pool", "DC0/host/DC0_C0/Resources"] if n == 3 else []
        doc = bv_json("vsphere", "restore", store, f"web01@{n}", *srv, "--name", f"web01-dr{n}", *where)
        assert doc["vm"] == f"web01-dr{n}" and len(doc["disks"]) == 2
        new = vcsim.vm(f"web01-dr{n}")
        assert new.runtime.powerState == "poweredOff" and new.snapshot is None
        if where:
            assert new.resourcePool.parent.name == "DC0_C0"
        new_disks = vcsim.disks(new.config)
        assert [d.capacityInBytes for d in new_disks] == [CAP_A, CAP_B]
        for old_key, new_disk in zip((a.key, b.key), new_disks):
            assert image(vcsim, new_disk) == saved[old_key].read_bytes(), f"disk {old_key} of point {n}"
        # A second copy must not clash with the original.
        assert new.config.uuid != source_uuid
        assert macs(new) and not set(macs(new)) & set(source_macs)
        assert new.config.hardware.numCPU == 2 and new.config.hardware.memoryMB == 128
        assert new.config.annotation == "web01 (test)"

    # The original is untouched by all this and keeps no snapshot.
    assert vm.snapshot is None and [image(vcsim, d) for d in (a, b)] == [p.read_bytes() for p in points[4].values()]

    # A name that exists is refused before anything is created.
    again = bv("vsphere", "restore", store, "web01@1", *srv, "--name", "web01-dr1")
    assert again.returncode == 1 and "already exists" in again.stderr


def macs(vm):
    from pyVmomi import vim
    return [d.macAddress for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
