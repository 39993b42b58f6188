"""The vsphere commands' ``--json`` output against docs/JSON.md, on the simulator
(issue 8, items 9 and 10): vms, backup (full, then an incremental with its
CBT sample), list, restore, the disk records they leave, an error document,
and the one-line summaries on stderr."""

from __future__ import annotations

import datetime
import json
import os
import re

import jsonshape
from vsphere_helpers import KiB, MiB, bv, bv_json, create_vm, image, init_store, server_args, write

SECTIONS, _ = jsonshape.parse()


def assert_shape(doc, section):
    problems = jsonshape.check(doc, section, SECTIONS)
    assert not problems, "\n".join(problems)


def test_vsphere_json_matches_the_document(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    srv = server_args(vcsim)
    vm = create_vm(vcsim, "web01", [4 * MiB // KiB], nic=True)
    (disk,) = vcsim.disks(vm.config)
    write(vcsim, disk, 0, os.urandom(300 * KiB))

    vms = bv_json("vsphere", "vms", *srv)
    assert_shape(vms, "vsphere vms")
    assert all(v["last_backup"] is None for v in vms["vms"])

    proc = bv("vsphere", "backup", store, *srv, "--vm", "web01", "--json")
    assert proc.returncode == 0, proc.stderr
    full = json.loads(proc.stdout)
    assert_shape(full, "vsphere backup")
    assert full["ok"] is True and full["kind"] == "full" and full["warnings"] == []
    assert re.fullmatch(r"blockvault: vsphere backup web01@1 full: 1 disk\(s\), read 320\.0 KiB, stored "
                        r"[0-9.]+ KiB, 0 warning\(s\), [0-9.]+ s\n", proc.stderr), proc.stderr
    iso = datetime.datetime.fromisoformat(full["time_iso"])
    assert iso.tzinfo is not None and abs(iso.timestamp() - full["time"]) < 1

    write(vcsim, disk, 2 * MiB, os.urandom(64 * KiB))
    inc = bv_json("vsphere", "backup", store, *srv, "--vm", "web01", "--cbt-sample", "0.5")
    assert_shape(inc, "vsphere backup")
    (d,) = inc["disks"]
    assert d["read"] == "changed-areas" and d["changed_bytes"] == 64 * KiB and d["sample"]["mismatched"] == 0

    listing = bv_json("vsphere", "list", store)
    assert_shape(listing, "vsphere list")
    assert [r["id"] for r in listing["vm_backups"]] == ["web01@1", "web01@2"]
    disks = bv_json("list", store)
    assert_shape(disks, "list")
    assert {b["metadata"]["source"]["kind"] for b in disks["backups"]} == {"vsphere"}

    vms = bv_json("vsphere", "vms", *srv, "--store", store)
    assert_shape(vms, "vsphere vms")
    (mine,) = [v for v in vms["vms"] if v["name"] == "web01"]
    assert mine["last_backup"]["id"] == "web01@2" and mine["last_backup"]["time_iso"]

    proc = bv("vsphere", "restore", store, "web01@2", *srv, "--name", "web01-dr", "--json")
    assert proc.returncode == 0, proc.stderr
    restored = json.loads(proc.stdout)
    assert_shape(restored, "vsphere restore")
    assert restored["vm"] == "web01-dr"
    assert proc.stderr.startswith("blockvault: vsphere restore web01@2 as VM web01-dr (")
    dr = vcsim.vm("web01-dr")
    (new_disk,) = vcsim.disks(dr.config)
    assert image(vcsim, new_disk)[:4 * MiB] == image(vcsim, disk)[:4 * MiB]

    # A failure: the error document, with a stable code, and the message on stderr.
    proc = bv("vsphere", "backup", store, *srv, "--vm", "no-such-vm", "--json")
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert_shape(err, "error")
    assert err["error"]["code"] == "not_found" and err["command"] == "vsphere backup"
    assert f"blockvault: error: {err['error']['message']}\n" in proc.stderr
