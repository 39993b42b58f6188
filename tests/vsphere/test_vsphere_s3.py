"""``blockvault vsphere`` with its store in a bucket of a real Ceph RGW (issue 12), against vcsim.

A VM's full and incremental backups go into s3://BUCKET/PREFIX through host A's cache; host B
attaches with an empty cache (the bucket alone), lists the VM's backups and recreates the VM
of every point, byte-identical.  The vSphere verbs spell the bucket's credentials and CA file
--s3-credentials/--s3-ca-file (--credentials and --ca-file are vCenter's there); an S3 option
with a local STORE is a usage error before any connection, the store untouched.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from s3cluster import s3env_of
# vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import BLOCK, KiB, MiB, bv, bv_json, cli_env, create_vm, image, init_store, keep_images, \
    server_args, write

CAP_A = 6 * MiB
CAP_B = 2 * MiB + 32 * KiB


@pytest.fixture
def env(ceph):
    """vCenter's credentials and the bucket's (environment only), a short lease for host A."""
    bucket = {k: v for k, v in s3env_of(ceph).items() if k.startswith("BLOCKVAULT_S3")}
    return cli_env(dict(bucket, BLOCKVAULT_LEASE_TTL="2"))


def pack_objects(ceph, url: str) -> list[str]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    page = ceph.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/packs/")
    return [o["Key"] for o in page.get("Contents", ())]


def test_vm_backups_into_a_bucket_recover_on_a_new_host_byte_identical(vcsim, ceph, s3_store_url, env, tmp_path):
    url, srv = s3_store_url, server_args(vcsim)
    cache_a, cache_b = str(tmp_path / "host-a"), str(tmp_path / "host-b")
    proc = bv("init", url, "--chunk-size", "64K", "--cache", cache_a, env=env)
    assert proc.returncode == 0, proc.stderr
    vm = create_vm(vcsim, "web01", [CAP_A // KiB, CAP_B // KiB])
    a, b = vcsim.disks(vm.config)
    write(vcsim, a, 0, os.urandom(400 * KiB))
    write(vcsim, a, 5 * MiB + 3, os.urandom(70 * KiB))
    write(vcsim, b, CAP_B - 10, b"tail bytes")

    t1 = bv_json("vsphere", "backup", url, "--cache", cache_a, *srv, "--vm", "web01", env=env)
    assert t1["id"] == "web01@1" and t1["kind"] == "full"
    points = {1: keep_images(vcsim, vm, tmp_path, "t1")}
    after_full = pack_objects(ceph, url)
    assert after_full, "the full backup left no pack in the bucket"

    write(vcsim, a, 2 * MiB, os.urandom(BLOCK))
    write(vcsim, b, 100, b"changed" * 50)
    t2 = bv_json("vsphere", "backup", url, "--cache", cache_a, *srv, "--vm", "web01", "--cbt-sample", "0", env=env)
    assert t2["id"] == "web01@2" and t2["kind"] == "incremental" and t2["base"] == "web01@1"
    assert sum(d["bytes_read"] for d in t2["disks"]) == 2 * BLOCK   # the two changed chunks only
    points[2] = keep_images(vcsim, vm, tmp_path, "t2")
    assert len(pack_objects(ceph, url)) > len(after_full)

    listed = bv_json("vsphere", "list", url, "--cache", cache_a, env=env)["vm_backups"]
    assert [(x["id"], x["kind"]) for x in listed] == [("web01@1", "full"), ("web01@2", "incremental")]

    # host A is gone: host B attaches with an empty cache, from the bucket alone
    time.sleep(2.5)                                   # A's lease expires
    proc = bv("attach", url, "--cache", cache_b, "--take-over", env=env)
    assert proc.returncode == 0, proc.stderr
    vms = {v["name"]: v for v in bv_json("vsphere", "vms", *srv, "--store", url, "--cache", cache_b,
                                         env=env)["vms"]}
    assert vms["web01"]["last_backup"]["id"] == "web01@2"
    listed = bv_json("vsphere", "list", url, "--cache", cache_b, "--vm", "web01", env=env)["vm_backups"]
    assert [x["id"] for x in listed] == ["web01@1", "web01@2"]

    for n, saved in points.items():
        doc = bv_json("vsphere", "restore", url, f"web01@{n}", "--cache", cache_b, *srv, "--name", f"web01-dr{n}",
                      env=env)
        assert doc["vm"] == f"web01-dr{n}" and len(doc["disks"]) == 2
        new_disks = vcsim.disks(vcsim.vm(f"web01-dr{n}").config)
        assert [d.capacityInBytes for d in new_disks] == [CAP_A, CAP_B]
        for old_key, new_disk in zip((a.key, b.key), new_disks):
            assert image(vcsim, new_disk) == saved[old_key].read_bytes(), f"disk {old_key} of web01@{n}"

    # the disk points are ordinary points of the store too: verify on host B is clean
    proc = bv("verify", url, "--cache", cache_b, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_an_s3_option_with_a_local_store_is_a_usage_error_before_connecting(tmp_path):
    store = init_store(tmp_path / "store")
    before = sorted(os.listdir(store))
    creds = tmp_path / "s3.cred"
    creds.write_text("access_key_id = x\nsecret_access_key = y\n")
    os.chmod(creds, 0o600)
    dead = ["--server", "127.0.0.1:1", "--insecure"]      # a connection attempt would fail differently (exit 1)
    cases = [
        (["vsphere", "backup", store, *dead, "--vm", "web01", "--endpoint", "http://127.0.0.1:9"], "--endpoint"),
        (["vsphere", "backup", store, *dead, "--vm", "web01", "--s3-credentials", str(creds)], "--s3-credentials"),
        (["vsphere", "restore", store, "web01@1", *dead, "--name", "x", "--cache", str(tmp_path / "c")], "--cache"),
        (["vsphere", "restore", store, "web01@1", *dead, "--name", "x", "--s3-ca-file", str(creds)], "--s3-ca-file"),
        (["vsphere", "list", store, "--credentials", str(creds)], "--credentials"),
        (["vsphere", "vms", *dead, "--store", store, "--endpoint", "http://127.0.0.1:9"], "--endpoint"),
        (["vsphere", "vms", *dead, "--cache", str(tmp_path / "c")], "--cache"),
    ]
    for argv, option in cases:
        proc = bv(*argv)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        assert f"{option} is for" in proc.stderr and "s3://BUCKET/PREFIX" in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and "127.0.0.1:1" not in proc.stderr, proc.stderr
    assert sorted(os.listdir(store)) == before and not (tmp_path / "c").exists()
    # the vCenter options keep their names: --credentials of a vsphere backup is vCenter's file
    proc = bv("vsphere", "backup", store, *dead, "--vm", "web01", "--credentials", str(tmp_path / "none"))
    assert proc.returncode == 1 and f"cannot read credentials file {tmp_path / 'none'}" in proc.stderr, proc.stderr
