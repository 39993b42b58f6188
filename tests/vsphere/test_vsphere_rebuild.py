"""Issue 9's "done when": a store with a VM chain of three disks and an image disk chain
loses ``index/data.mdb``; ``blockvault rebuild`` recreates every database from the
packs alone, byte for byte, and every point restores identical — the VM's saved
configuration included, as ``vsphere restore`` uses it for disaster recovery."""

from __future__ import annotations

import os

from helpers import back_up_chain, make_sparse, rng, same_file, store_fingerprint, text_bytes, write_at
from vsphere_helpers import (BLOCK, KiB, MiB, bv, bv_json, create_vm, image, init_store, keep_images,
                             server_args, write)

CAPS = [3 * MiB, 2 * MiB, 1 * MiB + 32 * KiB]


def test_lost_index_of_a_vm_chain_and_an_image_chain_is_rebuilt_from_the_packs(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    srv = server_args(vcsim)
    vm = create_vm(vcsim, "dr01", [c // KiB for c in CAPS], nic=True)
    disks = vcsim.disks(vm.config)
    assert len(disks) == 3
    r = rng(90)
    for i, d in enumerate(disks):
        write(vcsim, d, i * BLOCK, r.bytes(5 * BLOCK))
        write(vcsim, d, CAPS[i] - 100, b"tail of disk %d" % i)
    t1 = bv_json("vsphere", "backup", store, *srv, "--vm", "dr01")
    vm_points = {1: keep_images(vcsim, vm, tmp_path, "t1")}
    write(vcsim, disks[0], 2 * MiB, r.bytes(BLOCK))
    write(vcsim, disks[2], 7, b"changed boot block")
    t2 = bv_json("vsphere", "backup", store, *srv, "--vm", "dr01", "--cbt-sample", "0")
    assert (t1["id"], t2["id"], t2["kind"]) == ("dr01@1", "dr01@2", "incremental")
    vm_points[2] = keep_images(vcsim, vm, tmp_path, "t2")

    # An image disk chain beside it: full, incremental, differential.
    img = str(tmp_path / "d.img")
    make_sparse(img, 40 * BLOCK + 5)
    write_at(img, 3 * BLOCK, text_bytes(r, 6 * BLOCK))
    image_points = back_up_chain(store, img, "img", r, lambda seq: ((10 + 5 * seq) * BLOCK, 2 * BLOCK),
                                 str(tmp_path / "img-"), run=bv)

    before = store_fingerprint(store)
    assert {k for k in before if k.startswith("lmdb:")} >= {
        "lmdb:catalog", "lmdb:manifests", "lmdb:segments", "lmdb:vm_backups", "lmdb:chunks", "lmdb:packs",
        "lmdb:segrefs", "lmdb:chunkrefs", "lmdb:dead", "lmdb:packdead", "lmdb:doomed"}
    os.unlink(os.path.join(store, "index", "data.mdb"))

    lost = bv("list", store)
    assert lost.returncode == 1 and "data.mdb is missing" in lost.stderr
    assert f"run 'blockvault rebuild {store}'" in lost.stderr and "Traceback" not in lost.stderr

    rebuilt = bv_json("rebuild", store)
    assert rebuilt["commits"] == 5 and rebuilt["left_out"] == [] and rebuilt["unreadable"] == []
    assert rebuilt["records"]["catalog"] == 3 * 2 + 3 and rebuilt["records"]["vm_backups"] == 2
    # Every database the backups committed, entry for entry, and every file as it was.
    assert store_fingerprint(store) == before
    verify = bv("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout + verify.stderr
    assert "and 9 backups" in verify.stdout

    for bid, source in image_points.items():
        out = str(tmp_path / f"restored-{bid}")
        assert bv("restore", store, bid, out).returncode == 0
        assert same_file(out, source), bid
    for n, saved in vm_points.items():
        for d in disks:
            out = tmp_path / f"restored-dr01-{d.key}-{n}.img"
            proc = bv("restore", store, f"dr01/disk-{d.key}@{n}", out)
            assert proc.returncode == 0, proc.stderr
            assert out.read_bytes() == saved[d.key].read_bytes(), f"disk {d.key} of dr01@{n}"
        # Disaster recovery from the rebuilt store: the saved configuration and every disk.
        doc = bv_json("vsphere", "restore", store, f"dr01@{n}", *srv, "--name", f"dr01-new{n}")
        assert doc["vm"] == f"dr01-new{n}" and len(doc["disks"]) == 3
        new = vcsim.vm(f"dr01-new{n}")
        new_disks = vcsim.disks(new.config)
        assert [nd.capacityInBytes for nd in new_disks] == CAPS
        for old, nd in zip(disks, new_disks):
            assert image(vcsim, nd) == saved[old.key].read_bytes(), f"DR disk {old.key} of dr01@{n}"
        assert new.config.hardware.numCPU == 2 and new.config.hardware.memoryMB == 128
        assert new.config.annotation == "dr01 (test)"

    # The rebuilt store goes on: the next backups number on from where the chain was.
    t3 = bv_json("vsphere", "backup", store, *srv, "--vm", "dr01", "--cbt-sample", "0")
    assert t3["id"] == "dr01@3" and t3["base"] == "dr01@2"
