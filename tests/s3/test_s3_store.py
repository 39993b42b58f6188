"""A store in a bucket of a real Ceph RGW: the T1..T5 chain, attach on a new host from the
bucket alone, gc deleting pack objects, radosgw killed in the middle of a backup, and the
refusals (bad credentials, a bucket that is no store, a lease held by another host)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.backup import backup_image
from engine.repository import Repository
from engine.restore import restore_backup
from helpers import REPO_ROOT, freeze, make_sparse, resize, rng, run_cli, same_file, snapshot, write_at
from integration.test_chain import CS, cbt_file, scribble

pytestmark = pytest.mark.s3


@pytest.fixture
def settings(ceph):
    from chunkstore.s3settings import S3Settings
    return S3Settings(endpoint=ceph.endpoint, region=ceph.region, access_key=ceph.access_key,
                      secret_key=ceph.secret_key, connect_timeout=5.0, read_timeout=30.0, max_attempts=3)


def cli(env, *args, timeout=300):
    return run_cli(*args, timeout=timeout, env=env)


def pack_objects(ceph, url):
    """The pack objects of the store at ``url``, as the bucket lists them (behind the store's back)."""
    bucket, prefix = url[len("s3://"):].split("/", 1)
    keys, token = [], None
    client = ceph.client()
    while True:
        kw = {"Bucket": bucket, "Prefix": f"{prefix}/packs/"}
        if token:
            kw["ContinuationToken"] = token
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", ())]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated"):
            return set(keys)


def restore_all(env, url, cache, points, tmp_path):
    for ident, expected in points.items():
        out = str(tmp_path / f"out-{ident.replace('@', '-')}-{os.path.basename(cache)}")
        proc = cli(env, "restore", url, ident, out, "--cache", cache)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, expected), ident
        os.unlink(out)


def back_up_three(env, url, cache, img, tmp_path, r, disk="d"):
    points = {}
    for seq, mode in ((1, "full"), (2, "incremental"), (3, "differential")):
        if seq > 1:
            write_at(img, int(r.integers(0, 6 << 20)), r.bytes(300_000))
        proc = cli(env, "backup", url, img, "--disk", disk, "--mode", mode, "--cache", cache)
        assert proc.returncode == 0 and proc.stdout.strip() == f"{disk}@{seq}", proc.stderr
        points[f"{disk}@{seq}"] = snapshot(img, str(tmp_path / f"{disk}-snap{seq}"))
    return points


# -- the chain ------------------------------------------------------------------------------


def test_the_t1_to_t5_chain_on_s3_restores_every_point_byte_identical(s3_store_url, settings, tmp_path, ceph):
    cache = str(tmp_path / "cache")
    repo = Repository.init(s3_store_url, cache=cache, s3_settings=settings, chunk_size=CS)
    r = rng(10)
    img = str(tmp_path / "disk.img")
    size1 = 20 * (1 << 20) + 12345
    make_sparse(img, size1)
    scribble(img, r, 30, size1)
    points = {}
    try:
        t1 = backup_image(repo, img, "d", "full")
        points[t1.id] = snapshot(img, str(tmp_path / "t1"))
        a2 = scribble(img, r, 12, size1)
        since_full = list(a2)
        t2 = backup_image(repo, img, "d", "incremental", cbt_file(tmp_path, "c2", size1, a2))
        points[t2.id] = snapshot(img, str(tmp_path / "t2"))
        size3 = 28 * (1 << 20) + 777
        resize(img, size3)
        a3 = scribble(img, r, 6, size3) + [(size1 + 5000, 40_000)]
        write_at(img, size1 + 5000, r.bytes(40_000))
        since_full += a3
        t3 = backup_image(repo, img, "d", "incremental", cbt_file(tmp_path, "c3", size3, a3))
        points[t3.id] = snapshot(img, str(tmp_path / "t3"))
        size4 = 16 * (1 << 20) + 5
        resize(img, size4)
        a4 = scribble(img, r, 5, size4)
        since_full = [(s, min(n, size4 - s)) for s, n in since_full + a4 if s < size4]
        t4 = backup_image(repo, img, "d", "differential", cbt_file(tmp_path, "c4", size4, since_full))
        points[t4.id] = snapshot(img, str(tmp_path / "t4"))
        scribble(img, r, 8, size4)
        write_at(img, 3 * CS, bytes(CS))
        t5 = backup_image(repo, img, "d", "incremental")
        points[t5.id] = snapshot(img, str(tmp_path / "t5"))
        assert t5.base == t4.id and t4.base == t1.id
    finally:
        repo.close()
    # the packs are in the bucket, the spool is empty: a restore can only read the bucket
    spool = [f for _, _, files in os.walk(os.path.join(cache, "packs")) for f in files]
    assert spool == []
    assert len(pack_objects(ceph, s3_store_url)) >= 5
    with Repository.open(s3_store_url, cache=cache, s3_settings=settings) as repo:
        for ident, expected in points.items():
            out = str(tmp_path / f"restore-{ident.replace('@', '-')}")
            restore_backup(repo, ident, out)
            assert same_file(out, expected), ident


# -- attach on another host -----------------------------------------------------------------


def test_attach_on_an_empty_cache_of_another_host_restores_every_point_and_verifies(s3_store_url, s3env, tmp_path):
    env = dict(s3env, BLOCKVAULT_LEASE_TTL="2")     # host A's lease expires 2 s after it stops working
    cache_a, cache_b = str(tmp_path / "host-a"), str(tmp_path / "host-b")
    assert cli(env, "init", s3_store_url, "--cache", cache_a).returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 8 << 20)
    r = rng(4)
    write_at(img, 0, r.bytes(3 << 20))
    points = back_up_three(env, s3_store_url, cache_a, img, tmp_path, r)
    points.update(back_up_three(env, s3_store_url, cache_a, img, tmp_path, r, disk="e"))

    # host B, while A's lease is fresh: refused, naming the holder; the empty cache is not left behind
    held = cli(s3env, "attach", s3_store_url, "--cache", cache_b)
    assert held.returncode == 4 and "is held by" in held.stderr and "Traceback" not in held.stderr
    assert not os.path.exists(cache_b)
    time.sleep(2.5)                                  # A stopped renewing: its lease expires
    plain = cli(s3env, "attach", s3_store_url, "--cache", cache_b)
    assert plain.returncode == 4 and "--take-over" in plain.stderr
    proc = cli(s3env, "attach", s3_store_url, "--cache", cache_b, "--take-over", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["commits"] == 6 and doc["records"]["catalog"] == 6 and doc["chunks"] > 0
    assert doc["cache"] == cache_b

    listing = json.loads(cli(s3env, "list", s3_store_url, "--cache", cache_b, "--json").stdout)
    assert sorted(p["id"] for p in listing["backups"]) == sorted(points)
    restore_all(s3env, s3_store_url, cache_b, points, tmp_path)
    proc = cli(s3env, "verify", s3_store_url, "--cache", cache_b, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["unreferenced_packs"] == [] and doc["missing_packs"] == []

    # host A's cache is stale now: its readers and writers are refused and told to attach
    stale = cli(s3env, "list", s3_store_url, "--cache", cache_a)
    assert stale.returncode == 4 and "attach" in stale.stderr
    write = cli(s3env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache_a)
    assert write.returncode == 4 and "now owned by" in write.stderr

    # B writes on: a new point, restorable
    proc = cli(s3env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache_b)
    assert proc.returncode == 0 and proc.stdout.strip() == "d@4", proc.stderr


# -- gc --------------------------------------------------------------------------------------


def test_gc_on_s3_deletes_the_dead_pack_objects(s3_store_url, s3env, tmp_path, ceph):
    cache = str(tmp_path / "cache")
    assert cli(s3env, "init", s3_store_url, "--cache", cache).returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 6 << 20)
    r = rng(7)
    points = {}
    for seq in (1, 2, 3):
        write_at(img, 0, r.bytes(4 << 20))         # every point's data is new
        proc = cli(s3env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache)
        assert proc.returncode == 0, proc.stderr
        points[f"d@{seq}"] = snapshot(img, str(tmp_path / f"snap{seq}"))
    before = pack_objects(ceph, s3_store_url)
    proc = cli(s3env, "delete", s3_store_url, "d@1", "d@2", "--cache", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    proc = cli(s3env, "gc", s3_store_url, "--cache", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    gone = {f"{s3_store_url.split('/', 3)[3]}/packs/{p[:2]}/{p}.pack" for p in doc["unlinked_packs"]}
    assert doc["unlinked_packs"] and gone <= before
    after = pack_objects(ceph, s3_store_url)
    assert not (gone & after)                  # what gc unlinked is gone from the bucket
    assert before - gone <= after              # and nothing else is
    restore_all(s3env, s3_store_url, cache, {"d@3": points["d@3"]}, tmp_path)
    proc = cli(s3env, "verify", s3_store_url, "--cache", cache, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stderr


# -- radosgw killed in the middle of a backup ---------------------------------------------------


def test_radosgw_killed_mid_backup_commits_nothing_and_gc_reclaims_the_partial_uploads(
        s3_store_url, s3env, tmp_path, ceph):
    cache = str(tmp_path / "cache")
    assert cli(s3env, "init", s3_store_url, "--cache", cache, "--chunk-size", "64K").returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 1 << 30)
    r = rng(9)
    for i in range(0, 1 << 30, 8 << 20):
        write_at(img, i, r.bytes(1 << 20))           # 128 MiB of new data over 1 GiB: many packs
    first = cli(s3env, "backup", s3_store_url, img, "--disk", "seed", "--cache", cache)
    assert first.returncode == 0, first.stderr
    before = pack_objects(ceph, s3_store_url)
    # 512 MiB of new data (16 packs): 128 MiB took radosgw 0.2 s, and the backup could be done
    # (exiting, poll() still None) by the time the test had seen its second pack
    for i in range(0, 1 << 30, 8 << 20):
        write_at(img, i, r.bytes(4 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "backup", s3_store_url, img, "--disk", "d",
                             "--cache", cache], cwd=REPO_ROOT, env=s3env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # wait until this backup has uploaded something, then kill the endpoint under it
        deadline = time.monotonic() + 120
        while len(pack_objects(ceph, s3_store_url) - before) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Stopped while radosgw dies: with 2 of its ~5 packs up, a backup left running could
        # upload the rest and commit between the check and the kill (it did, on a quiet machine).
        freeze(proc)
        assert proc.poll() is None, "the backup finished before radosgw could be killed: give it more data"
        ceph.kill_rgw()
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        ceph.restart_rgw()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "did not answer" in err and "nothing" in err
    partial = pack_objects(ceph, s3_store_url) - before
    assert partial                             # uploads of the failed backup its abort could not delete
    # nothing committed: the store lists only the first backup, and verify passes
    listing = json.loads(cli(s3env, "list", s3_store_url, "--cache", cache, "--json").stdout)
    assert [p["id"] for p in listing["backups"]] == ["seed@1"]
    # the next backup succeeds and restores
    again = cli(s3env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache)
    assert again.returncode == 0 and again.stdout.strip() == "d@1", again.stderr
    restore_all(s3env, s3_store_url, cache, {"d@1": snapshot(img, str(tmp_path / "snap-d"))}, tmp_path)
    # gc reclaims what the killed backup left in the bucket
    proc = cli(s3env, "gc", s3_store_url, "--cache", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    left = pack_objects(ceph, s3_store_url)
    assert not (partial & left)
    assert set(json.loads(proc.stdout)["leftover_packs"]) >= {k.rsplit("/", 1)[1][:-5] for k in partial}
    proc = cli(s3env, "verify", s3_store_url, "--cache", cache, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["unreferenced_packs"] == [], proc.stdout


# -- refusals -----------------------------------------------------------------------------------


def test_bad_credentials_are_refused_clearly_and_leave_nothing(s3_store_url, s3env, tmp_path, ceph):
    env = dict(s3env, BLOCKVAULT_S3_SECRET_ACCESS_KEY="not-the-secret")
    cache = str(tmp_path / "cache")
    proc = cli(env, "init", s3_store_url, "--cache", cache)
    assert proc.returncode == 1 and "BLOCKVAULT_S3_ACCESS_KEY_ID" in proc.stderr, proc.stderr
    assert "not-the-secret" not in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(cache)
    bucket = s3_store_url.split("/")[2]
    assert ceph.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_bucket_that_is_not_a_store(s3_bucket_name, s3env, tmp_path, ceph):
    ceph.client().put_object(Bucket=s3_bucket_name, Key="photos/cat.jpg", Body=b"meow")
    url = f"s3://{s3_bucket_name}/photos"
    cache = str(tmp_path / "cache")
    proc = cli(s3env, "attach", url, "--cache", cache)
    assert proc.returncode == 1 and "is not a blockvault store" in proc.stderr, proc.stderr
    assert not os.path.exists(cache)
    proc = cli(s3env, "list", url, "--cache", cache)
    assert proc.returncode == 1 and "attach" in proc.stderr and "Traceback" not in proc.stderr


def test_init_twice_is_already_a_store(s3_store_url, s3env, tmp_path):
    assert cli(s3env, "init", s3_store_url, "--cache", str(tmp_path / "a")).returncode == 0
    proc = cli(s3env, "init", s3_store_url, "--cache", str(tmp_path / "b"))
    assert proc.returncode == 1 and "already a store" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "b")


def test_a_lease_held_by_another_host_refuses_writers_with_exit_4_naming_the_holder(s3_store_url, s3env,
                                                                                     tmp_path, ceph):
    cache = str(tmp_path / "cache")
    assert cli(s3env, "init", s3_store_url, "--cache", cache).returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 2 << 20)
    write_at(img, 0, rng(1).bytes(1 << 20))
    bucket, prefix = s3_store_url[len("s3://"):].split("/", 1)
    lease = {"holder": "backup-host-2 4242", "host_id": "c" * 32, "renewed": time.time(), "ttl": 300.0}
    ceph.client().put_object(Bucket=bucket, Key=f"{prefix}/lease", Body=json.dumps(lease).encode())
    before = pack_objects(ceph, s3_store_url)
    proc = cli(s3env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache)
    assert proc.returncode == 4 and "backup-host-2 4242" in proc.stderr, proc.stderr
    assert pack_objects(ceph, s3_store_url) == before
    proc = cli(s3env, "attach", s3_store_url, "--cache", str(tmp_path / "other"), "--take-over")
    assert proc.returncode == 4 and "backup-host-2 4242" in proc.stderr   # not expired: no take-over
    # with no lease in the bucket, the writer takes it (and readers need none)
    client = ceph.client()
    client.delete_object(Bucket=bucket, Key=f"{prefix}/lease")
    assert cli(s3env, "list", s3_store_url, "--cache", cache).returncode == 0
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/lease")
    proc = cli(s3env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    taken = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/lease")["Body"].read())
    with open(os.path.join(cache, "cache.json")) as f:
        assert taken["host_id"] == json.load(f)["host_id"]


# -- the metadata pack: its upload gates the LMDB commit -----------------------------------------


def test_a_metadata_pack_whose_upload_fails_commits_nothing(s3_store_url, ceph, tmp_path):
    """The bucket starts refusing pack uploads exactly when the commit hands over its metadata
    pack (a bucket policy: reads and the lease still work): the chunk packs are in the bucket,
    the metadata pack is not, so the LMDB commit must not happen."""
    from chunkstore.errors import StoreError
    from chunkstore.pack import METADATA_MAGIC, PACK_HEADER
    from chunkstore.s3settings import S3Settings
    settings = S3Settings(endpoint=ceph.endpoint, region=ceph.region, access_key=ceph.access_key,
                          secret_key=ceph.secret_key, connect_timeout=5.0, read_timeout=30.0, max_attempts=2)
    bucket, prefix = s3_store_url[len("s3://"):].split("/", 1)
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                     "Resource": f"arn:aws:s3:::{bucket}/{prefix}/packs/*"}]}
    client = ceph.client()
    cache = str(tmp_path / "cache")
    img = str(tmp_path / "disk.img")
    make_sparse(img, 4 << 20)
    write_at(img, 0, rng(3).bytes(2 << 20))
    repo = Repository.init(s3_store_url, cache=cache, s3_settings=settings)
    backend = repo.store.backend
    publish = backend.publish
    refused = []

    def publish_refused_from_the_metadata_pack_on(pack_id, path):
        with open(path, "rb") as f:
            f.seek(PACK_HEADER.size)
            if f.read(4) == METADATA_MAGIC and not refused:
                backend.wait_published(list(backend._uploads))   # the chunk packs went out first
                client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny))
                refused.append(pack_id)
        publish(pack_id, path)

    backend.publish = publish_refused_from_the_metadata_pack_on
    try:
        with pytest.raises(StoreError) as err:
            backup_image(repo, img, "d", "full")
        assert refused and "nothing" in str(err.value)
    finally:
        repo.close()
        client.delete_bucket_policy(Bucket=bucket)
    assert f"{prefix}/packs/{refused[0].hex()[:2]}/{refused[0].hex()}.pack" not in pack_objects(ceph, s3_store_url)
    listing = run_cli("list", s3_store_url, "--cache", cache, "--json", env={**os.environ, **ceph.env()})
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["backups"] == []
