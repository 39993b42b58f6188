"""A store with object lock (``init --object-lock DAYS``) on a real Ceph 16 RGW.

Object lock needs a versioned bucket, where Ceph 16 ignores If-None-Match and refuses every
If-Match PUT: the store keeps its lease (and the self-test) in a companion bucket without
versioning, named by ``PREFIX/store-lock.json`` (chunkstore/objectlock.py).  Every object
of the data bucket carries a COMPLIANCE retention; gc leaves what is still locked doomed
and says until when."""

import datetime
import json
import os
import time
import uuid

import pytest
from botocore.exceptions import ClientError

from helpers import make_sparse, rng, run_cli, same_file, snapshot, write_at

pytestmark = pytest.mark.s3

DAY = 86400


@pytest.fixture
def locked_url():
    """A store URL in a bucket that does not exist yet: init makes it, with object lock."""
    return f"s3://bv-ol-{uuid.uuid4().hex[:12]}/store"


def cli(env, *args, timeout=300):
    return run_cli(*args, timeout=timeout, env=env)


def split(url):
    bucket, prefix = url[len("s3://"):].split("/", 1)
    return bucket, prefix


def objects(ceph, bucket, prefix):
    """{key: [version ids]} of every object version under prefix (behind the store's back)."""
    found, kw = {}, {"Bucket": bucket, "Prefix": prefix + "/"}
    client = ceph.client()
    while True:
        page = client.list_object_versions(**kw)
        for v in page.get("Versions", ()):
            found.setdefault(v["Key"], []).append(v["VersionId"])
        if not page.get("IsTruncated"):
            return found
        kw["KeyMarker"], kw["VersionIdMarker"] = page["NextKeyMarker"], page["NextVersionIdMarker"]


def packs_of(ceph, url):
    bucket, prefix = split(url)
    return {k: v for k, v in objects(ceph, bucket, prefix).items() if k.startswith(f"{prefix}/packs/")}


def chain(env, url, cache, img, tmp_path, r, disk="d"):
    """T1 full, T2 incremental with a fresh region over T1's: T2 leaves some of T1's chunks dead."""
    points = {}
    make_sparse(img, 8 << 20)
    write_at(img, 0, r.bytes(6 << 20))
    for seq in (1, 2):
        if seq == 2:
            write_at(img, 0, r.bytes(3 << 20))
        proc = cli(env, "backup", url, img, "--disk", disk, "--cache", cache)
        assert proc.returncode == 0 and proc.stdout.strip() == f"{disk}@{seq}", proc.stderr
        points[f"{disk}@{seq}"] = snapshot(img, str(tmp_path / f"{disk}-snap{seq}"))
    return points


def restore_all(env, url, cache, points, tmp_path):
    for ident, expected in points.items():
        out = str(tmp_path / f"out-{ident.replace('@', '-')}")
        proc = cli(env, "restore", url, ident, out, "--cache", cache)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, expected), ident
        os.unlink(out)


def verify_ok(env, url, cache):
    proc = cli(env, "verify", url, "--cache", cache, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stdout + proc.stderr


@pytest.fixture
def store(ceph, s3env, locked_url, tmp_path):
    """A one-day object-lock store with the T1..T2 chain in it: (url, cache, points)."""
    cache = str(tmp_path / "cache")
    proc = cli(s3env, "init", locked_url, "--cache", cache, "--object-lock", "1")
    assert proc.returncode == 0, proc.stderr
    points = chain(s3env, locked_url, cache, str(tmp_path / "disk.img"), tmp_path, rng(41))
    return locked_url, cache, points


def test_init_makes_a_locked_data_bucket_and_a_plain_lease_bucket(ceph, store, s3env, tmp_path):
    url, cache, points = store
    bucket, prefix = split(url)
    client = ceph.client()
    assert client.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    conf = client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    assert conf["ObjectLockEnabled"] == "Enabled"
    assert client.get_bucket_versioning(Bucket=bucket + "-lease").get("Status") is None
    # store-lock.json, byte for byte (docs/FORMAT.md), and the lease beside it in the lease bucket only
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/store-lock.json")["Body"].read()
    assert body == f'{{"lease_bucket":"{bucket}-lease","days":1}}\n'.encode()
    lease = json.loads(client.get_object(Bucket=bucket + "-lease", Key=f"{prefix}/lease")["Body"].read())
    with open(os.path.join(cache, "cache.json")) as f:
        assert lease["host_id"] == json.load(f)["host_id"]
    assert f"{prefix}/lease" not in objects(ceph, bucket, prefix)
    assert not [k for k in objects(ceph, bucket + "-lease", prefix) if "/selftest/" in k]   # self-test cleaned up
    # every object of the data bucket has a COMPLIANCE retention of about a day, and one version
    keys = objects(ceph, bucket, prefix)
    assert f"{prefix}/config.json" in keys and packs_of(ceph, url)
    now = time.time()
    for key, versions in keys.items():
        assert len(versions) == 1, key
        ret = client.get_object_retention(Bucket=bucket, Key=key)["Retention"]
        assert ret["Mode"] == "COMPLIANCE", key
        assert now + DAY - 600 < ret["RetainUntilDate"].timestamp() < now + DAY + 60, key
    restore_all(s3env, url, cache, points, tmp_path)
    verify_ok(s3env, url, cache)


def test_a_delete_with_the_stores_own_credentials_fails_and_the_store_still_verifies(ceph, store, s3env,
                                                                                      tmp_path):
    url, cache, points = store
    bucket, _ = split(url)
    client = ceph.client()            # the very credentials the store runs with (ceph.env())
    packs = packs_of(ceph, url)
    victim = sorted(packs)[0]
    with pytest.raises(ClientError) as info:
        client.delete_object(Bucket=bucket, Key=victim, VersionId=packs[victim][0])
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    refused = client.delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": k, "VersionId": v[0]} for k, v in packs.items()]})
    assert len(refused.get("Errors", [])) == len(packs)
    # a plain DELETE cannot be refused: it hides every pack behind a delete marker
    for key in packs:
        client.delete_object(Bucket=bucket, Key=key)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=split(url)[1] + "/packs/")
    assert packs_of(ceph, url) == packs                     # every version still there
    verify_ok(s3env, url, cache)
    restore_all(s3env, url, cache, points, tmp_path)


def test_delete_and_gc_leave_locked_packs_doomed_and_say_until_when(ceph, store, s3env, tmp_path):
    url, cache, points = store
    before = packs_of(ceph, url)
    proc = cli(s3env, "delete", url, "d@1", "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    proc = cli(s3env, "gc", url, "--cache", cache, "--max-unused", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    doomed = {a["id"] for a in doc["deleted_packs"] + doc["repacked_packs"]}
    assert doomed and doc["unlinked_packs"] == []
    assert "was not deleted" not in proc.stderr, proc.stderr     # no delete was sent (it would be refused)
    assert {p["id"] for p in doc["locked_packs"]} == doomed
    client = ceph.client()
    bucket, prefix = split(url)
    for p in doc["locked_packs"]:
        key = f"{prefix}/packs/{p['id'][:2]}/{p['id']}.pack"
        until = client.get_object_retention(Bucket=bucket, Key=key)["Retention"]["RetainUntilDate"]
        assert abs(p["until"] - until.timestamp()) < 1
        assert p["until_utc"] == until.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    after = packs_of(ceph, url)
    assert set(before) <= set(after) and all(after[k] == v for k, v in before.items())   # nothing deleted
    # not even tried: no delete marker on any of them
    markers = client.list_object_versions(Bucket=bucket, Prefix=prefix + "/").get("DeleteMarkers", [])
    assert markers == []
    # the next gc says the same in text, with when the space comes back
    proc = cli(s3env, "gc", url, "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    latest = max(p["until_utc"] for p in doc["locked_packs"])
    assert f"locked until {latest}" in proc.stdout and "space comes back" in proc.stdout, proc.stdout
    for p in doomed:
        assert f"doomed pack {p}: locked until" in proc.stdout
    assert packs_of(ceph, url) == after
    restore_all(s3env, url, cache, {"d@2": points["d@2"]}, tmp_path)
    verify_ok(s3env, url, cache)


def test_a_lease_held_by_another_host_is_refused_with_exit_4(ceph, store, s3env, tmp_path):
    url, cache, _ = store
    bucket, prefix = split(url)
    lease = {"holder": "backup-host-2 4242", "host_id": "c" * 32, "renewed": time.time(), "ttl": 300.0}
    ceph.client().put_object(Bucket=bucket + "-lease", Key=f"{prefix}/lease", Body=json.dumps(lease).encode())
    before = packs_of(ceph, url)
    img = str(tmp_path / "disk.img")
    write_at(img, 0, rng(5).bytes(1 << 20))
    proc = cli(s3env, "backup", url, img, "--disk", "d", "--cache", cache)
    assert proc.returncode == 4 and "backup-host-2 4242" in proc.stderr, proc.stderr
    assert packs_of(ceph, url) == before
    other = str(tmp_path / "other")
    proc = cli(s3env, "attach", url, "--cache", other, "--take-over")
    assert proc.returncode == 4 and "backup-host-2 4242" in proc.stderr, proc.stderr
    assert not os.path.exists(other)


def test_attach_on_an_empty_cache_finds_the_lease_bucket_and_keeps_locking(ceph, store, s3env, tmp_path):
    url, cache, points = store
    bucket, prefix = split(url)
    client = ceph.client()
    client.delete_object(Bucket=bucket + "-lease", Key=f"{prefix}/lease")     # the old host is gone
    fresh = str(tmp_path / "fresh")
    proc = cli(s3env, "attach", url, "--cache", fresh)
    assert proc.returncode == 0, proc.stderr
    lease = json.loads(client.get_object(Bucket=bucket + "-lease", Key=f"{prefix}/lease")["Body"].read())
    with open(os.path.join(fresh, "cache.json")) as f:
        assert lease["host_id"] == json.load(f)["host_id"]
    restore_all(s3env, url, fresh, points, tmp_path)
    # a backup from the new host writes its packs locked as well
    before = packs_of(ceph, url)
    img = str(tmp_path / "disk.img")
    write_at(img, 0, rng(6).bytes(1 << 20))
    proc = cli(s3env, "backup", url, img, "--disk", "d", "--cache", fresh)
    assert proc.returncode == 0, proc.stderr
    new = set(packs_of(ceph, url)) - set(before)
    assert new
    for key in new:
        ret = client.get_object_retention(Bucket=bucket, Key=key)["Retention"]
        assert ret["Mode"] == "COMPLIANCE" and ret["RetainUntilDate"].timestamp() > time.time() + DAY - 600


def test_lease_bucket_option_and_refusals(ceph, s3env, locked_url, tmp_path):
    bucket, prefix = split(locked_url)
    cache = str(tmp_path / "c")
    proc = cli(s3env, "init", locked_url, "--cache", cache, "--lease-bucket", "x")
    assert proc.returncode == 2 and "--object-lock" in proc.stderr and not os.path.exists(cache)
    proc = cli(s3env, "init", locked_url, "--cache", cache, "--object-lock", "0")
    assert proc.returncode == 2 and "more than 0" in proc.stderr
    name = f"bv-lease-{uuid.uuid4().hex[:8]}"
    proc = cli(s3env, "init", locked_url, "--cache", cache, "--object-lock", "0.5", "--lease-bucket", name)
    assert proc.returncode == 0, proc.stderr
    client = ceph.client()
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/store-lock.json")["Body"].read()
    assert body == f'{{"lease_bucket":"{name}","days":0.5}}\n'.encode()
    assert client.head_object(Bucket=name, Key=f"{prefix}/lease")
    proc = cli(s3env, "init", locked_url, "--cache", str(tmp_path / "d"), "--object-lock", "1")
    assert proc.returncode == 1 and "already a store" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "d")


def test_an_init_that_fails_after_taking_the_lease_gives_it_back(ceph, s3env, locked_url, tmp_path):
    """config.json's upload refused (a bucket policy) after the lease and store-lock.json: no cache,
    no lease left in the lease bucket; the locked store-lock.json keeps the URL from a new init."""
    bucket, prefix = split(locked_url)
    client = ceph.client()
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                     "Resource": f"arn:aws:s3:::{bucket}/{prefix}/config.json"}]}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny))
    cache = str(tmp_path / "c")
    try:
        proc = cli(s3env, "init", locked_url, "--cache", cache, "--object-lock", "1")
    finally:
        client.delete_bucket_policy(Bucket=bucket)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(cache)
    assert list(objects(ceph, bucket + "-lease", prefix)) == []           # the lease was given back
    assert list(objects(ceph, bucket, prefix)) == [f"{prefix}/store-lock.json"]
    proc = cli(s3env, "init", locked_url, "--cache", cache, "--object-lock", "1")
    assert proc.returncode == 1 and "already a store" in proc.stderr, proc.stderr
