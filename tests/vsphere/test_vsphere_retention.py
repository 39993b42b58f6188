"""VM points through the simulator (issue 10, items 1-2): ``vsphere backup --time``
sets the VM backup's and its disk backups' time, an older one is refused before a
snapshot is taken, and ``forget --vm`` removes VM backups with their disks while
the rest restore identical."""

from __future__ import annotations

import json

from helpers import rng
from vsphere_helpers import (BLOCK, KiB, MiB, bv, bv_json, create_vm, init_store, keep_images,
                             restore_disk_image, server_args, snapshot_names, write)

T = ["2026-11-01T22:00:00+01:00", "2026-11-02T22:00:00+01:00", "2026-11-03T22:00:00+01:00"]


def test_vsphere_time_and_forget_of_vm_points(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    srv = server_args(vcsim)
    vm = create_vm(vcsim, "ret01", [2 * MiB // KiB, 1 * MiB // KiB])
    disks = vcsim.disks(vm.config)
    r = rng(21)
    kept = {}
    for n, when in enumerate(T):
        for i, d in enumerate(disks):
            write(vcsim, d, (n + i) * BLOCK, r.bytes(BLOCK))
        doc = bv_json("vsphere", "backup", store, *srv, "--vm", "ret01", "--time", when, "--cbt-sample", "0")
        assert doc["id"] == f"ret01@{n + 1}"
        kept[n + 1] = keep_images(vcsim, vm, tmp_path, f"t{n + 1}")
    listing = json.loads(bv("vsphere", "list", store, "--json").stdout)["vm_backups"]
    import datetime
    want = [datetime.datetime.fromisoformat(t).timestamp() for t in T]
    assert [v["time"] for v in listing] == want
    disk_times = {b["id"]: b["time"] for b in json.loads(bv("list", store, "--json").stdout)["backups"]}
    assert disk_times[f"ret01/disk-{disks[0].key}@2"] == want[1]

    older = bv("vsphere", "backup", store, *srv, "--vm", "ret01", "--time", "2026-11-03T21:59:59+01:00")
    assert older.returncode == 1 and "older than its newest point ret01@3" in older.stderr
    assert "blockvault-backup" not in snapshot_names(vm)  # refused before a snapshot was taken
    assert len(json.loads(bv("vsphere", "list", store, "--json").stdout)["vm_backups"]) == 3

    assert bv("protect", store, "ret01@1").returncode == 0
    forgot = bv_json("forget", store, "--vm", "ret01", "--keep-last", "1")
    assert forgot["removed"] == ["ret01@2"]
    assert sorted(forgot["removed_disk_backups"]) == sorted(f"ret01/disk-{d.key}@2" for d in disks)
    left = [v["id"] for v in json.loads(bv("vsphere", "list", store, "--json").stdout)["vm_backups"]]
    assert left == ["ret01@1", "ret01@3"]
    for n in (1, 3):
        for d in disks:
            got = restore_disk_image(store, f"ret01/disk-{d.key}@{n}", tmp_path / f"r{n}-{d.key}.img")
            assert got == kept[n][d.key].read_bytes()
    # The next run is an incremental on ret01@3, numbered past the removed one.
    write(vcsim, disks[0], 9 * BLOCK, r.bytes(BLOCK))
    nxt = bv_json("vsphere", "backup", store, *srv, "--vm", "ret01", "--cbt-sample", "0")
    assert (nxt["id"], nxt["kind"], nxt["base"]) == ("ret01@4", "incremental", "ret01@3")
    got = restore_disk_image(store, nxt["disks"][0]["backup"], tmp_path / "r4.img")
    assert got == keep_images(vcsim, vm, tmp_path, "t4")[disks[0].key].read_bytes()
