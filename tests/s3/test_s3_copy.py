"""``blockvault copy`` to, from and between stores in a bucket of a real Ceph RGW (issue 12, item 8).

Real processes only: the CLI copies a local T1..T3 chain into S3, S3 into a third (local)
store, and one prefix of the bucket into another; every point restores byte-identical from
every store, each verifies clean, and the counts the command reports are checked against
the chunks the stores hold.  DST is a writer (it takes DST's lease), SRC a reader.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from chunkstore import ChunkStore
from chunkstore.s3settings import S3Settings
from helpers import back_up_chain, make_sparse, rng, run_cli, same_file, snapshot, write_at

pytestmark = pytest.mark.s3

CS = 64 << 10
SIZE = 4 << 20


def run_json(env, *args) -> dict:
    proc = run_cli(*args, "--json", env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def chunk_count(store: str, ceph=None, cache: str | None = None) -> int:
    """Chunks in the store's index (through its cache for a store in a bucket: a reader, no lease)."""
    where = {}
    if ceph is not None:
        where = {"cache": cache, "s3_settings": S3Settings(endpoint=ceph.endpoint, region=ceph.region,
                                                           access_key=ceph.access_key, secret_key=ceph.secret_key)}
    with ChunkStore.open(store, **where) as s, s.read_txn() as txn:
        return txn.stat(s.chunks_db)["entries"]


def check_restores(env, store: str, points: dict[str, str], scratch: str, *cache) -> None:
    for ident, image in points.items():
        out = os.path.join(scratch, "restored.img")
        proc = run_cli("restore", store, ident, out, "--force", *cache, env=env)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, image), f"{ident} does not restore identical from {store}"
        os.unlink(out)


def check_clean(env, store: str, *cache) -> None:
    doc = run_json(env, "verify", store, *cache)
    assert doc["ok"] is True and doc["missing_packs"] == [] and doc["unreferenced_packs"] == [], doc


def lease_host(ceph, url: str) -> str:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    body = ceph.client().get_object(Bucket=bucket, Key=f"{prefix}/lease")["Body"].read()
    return json.loads(body)["host_id"]


def cache_host(cache: str) -> str:
    with open(os.path.join(cache, "cache.json")) as f:
        return json.load(f)["host_id"]


def local_chain(env, tmp_path):
    src = str(tmp_path / "src")
    assert run_cli("init", src, "--chunk-size", "64K", env=env).returncode == 0
    img = str(tmp_path / "a.img")
    make_sparse(img, SIZE)
    r = rng(220)
    write_at(img, 0, r.bytes(20 * CS))
    write_at(img, 40 * CS, r.bytes(3 * CS))
    points = back_up_chain(src, img, "a", r, lambda seq: (seq * 7 * CS + 11, 2 * CS), str(tmp_path / "snap"),
                           run=lambda *a: run_cli(*a, env=env))
    return src, img, points


def test_local_to_s3_to_local_restores_every_point_and_the_next_night_sends_only_its_new_chunks(
        s3_store_url, s3env, tmp_path, ceph):
    env = s3env
    src, img, points = local_chain(env, tmp_path)
    cache = str(tmp_path / "s3cache")
    assert run_cli("init", s3_store_url, "--cache", cache, "--chunk-size", "64K", env=env).returncode == 0

    # local -> S3: every chunk of SRC goes over once (another seed: re-hashed), into the bucket
    doc = run_json(env, "copy", src, s3_store_url, "--all", "--dst-cache", cache)
    assert [(c["id"], c["copied_to"]) for c in doc["copied"]] == [("a@1", "a@1"), ("a@2", "a@2"), ("a@3", "a@3")]
    assert doc["destination"]["store"] == s3_store_url and doc["rehashed"] is True
    src_chunks = chunk_count(src)
    assert doc["stats"]["chunks_sent"] == src_chunks == chunk_count(s3_store_url, ceph, cache)
    assert lease_host(ceph, s3_store_url) == cache_host(cache)      # DST was written as its lease holder
    assert [f for _, _, fs in os.walk(os.path.join(cache, "packs")) for f in fs] == []   # all in the bucket
    check_clean(env, s3_store_url, "--cache", cache)
    check_restores(env, s3_store_url, points, str(tmp_path), "--cache", cache)

    # S3 -> a third store (local): SRC is the bucket, read through its cache
    third = str(tmp_path / "third")
    assert run_cli("init", third, "--chunk-size", "64K", env=env).returncode == 0
    doc = run_json(env, "copy", s3_store_url, third, "--all", "--cache", cache)
    assert [c["copied_to"] for c in doc["copied"]] == ["a@1", "a@2", "a@3"]
    assert doc["source"]["store"] == s3_store_url
    assert doc["stats"]["chunks_sent"] == src_chunks == chunk_count(third)
    check_clean(env, third)
    check_restores(env, third, points, str(tmp_path))
    check_restores(env, src, points, str(tmp_path))

    # the next night: T4 in SRC; the copy to S3 sends exactly T4's new chunks, and so does S3 -> third
    write_at(img, 50 * CS + 3, rng(221).bytes(3 * CS))
    t4 = run_json(env, "backup", src, img, "--disk", "a", "--mode", "incremental")
    points["a@4"] = snapshot(img, str(tmp_path / "snap4"))
    assert t4["stats"]["new_chunks"] == 4   # 3 chunks' worth, 3 bytes past a chunk boundary
    held = chunk_count(s3_store_url, ceph, cache)
    doc = run_json(env, "copy", src, s3_store_url, "--all", "--dst-cache", cache)
    assert [c["id"] for c in doc["copied"]] == ["a@4"]
    assert [s["id"] for s in doc["skipped"]] == ["a@1", "a@2", "a@3"]
    st = doc["stats"]
    assert st["chunks_sent"] == st["chunks_read"] == 4 == chunk_count(s3_store_url, ceph, cache) - held
    held = chunk_count(third)
    doc = run_json(env, "copy", s3_store_url, third, "--all", "--cache", cache)
    assert [c["id"] for c in doc["copied"]] == ["a@4"]
    assert doc["stats"]["chunks_sent"] == doc["stats"]["chunks_read"] == 4 == chunk_count(third) - held
    for store, opts in ((s3_store_url, ("--cache", cache)), (third, ())):
        check_clean(env, store, *opts)
        check_restores(env, store, {"a@4": points["a@4"]}, str(tmp_path), *opts)


def test_s3_to_s3_between_two_prefixes_of_one_bucket(s3_store_url, s3env, tmp_path, ceph):
    env = s3env
    src, img, points = local_chain(env, tmp_path)
    a_url, b_url = s3_store_url, s3_store_url.rsplit("/", 1)[0] + "/offsite"
    a_cache, b_cache = str(tmp_path / "cache-a"), str(tmp_path / "cache-b")
    assert run_cli("init", a_url, "--cache", a_cache, "--chunk-size", "64K", env=env).returncode == 0
    assert run_cli("init", b_url, "--cache", b_cache, "--chunk-size", "64K", env=env).returncode == 0
    run_json(env, "copy", src, a_url, "--all", "--dst-cache", a_cache)
    doc = run_json(env, "copy", a_url, b_url, "--all", "--src-cache", a_cache, "--dst-cache", b_cache,
                   "--dst-endpoint", ceph.endpoint)
    assert [c["copied_to"] for c in doc["copied"]] == ["a@1", "a@2", "a@3"]
    assert doc["stats"]["chunks_sent"] == chunk_count(src) == chunk_count(b_url, ceph, b_cache)
    assert lease_host(ceph, b_url) == cache_host(b_cache)
    check_clean(env, b_url, "--cache", b_cache)
    check_restores(env, b_url, points, str(tmp_path), "--cache", b_cache)
    # a second run has nothing to do
    doc = run_json(env, "copy", a_url, b_url, "--all", "--cache", a_cache, "--dst-cache", b_cache)
    assert doc["copied"] == [] and doc["stats"]["chunks_sent"] == 0


def test_copy_into_a_bucket_whose_lease_another_host_holds_is_refused_and_sends_nothing(
        s3_store_url, s3env, tmp_path, ceph):
    env = s3env
    src, img, points = local_chain(env, tmp_path)
    cache = str(tmp_path / "s3cache")
    assert run_cli("init", s3_store_url, "--cache", cache, "--chunk-size", "64K", env=env).returncode == 0
    bucket, prefix = s3_store_url[len("s3://"):].split("/", 1)
    lease = {"holder": "offsite-host-7 777", "host_id": "d" * 32, "renewed": time.time(), "ttl": 300.0}
    client = ceph.client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/lease", Body=json.dumps(lease).encode())
    proc = run_cli("copy", src, s3_store_url, "--all", "--dst-cache", cache, env=env)
    assert proc.returncode == 4 and "offsite-host-7 777" in proc.stderr, proc.stderr
    packs = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/packs/").get("KeyCount", 0)
    assert packs == 0
    # a DST option given for a local DST is a usage error naming it
    proc = run_cli("copy", s3_store_url, src, "--all", "--cache", cache, "--dst-cache", cache, env=env)
    assert proc.returncode == 2 and "--dst-cache" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
