"""An encrypted store in a bucket of a real Ceph RGW: its key slots in PREFIX/keys/ (and the
cache's copies), attach on a new host with the passphrase only, key add/remove reaching
the bucket, and no passphrase, nor the host's name (the lease's holder is sealed), in any
object of the bucket."""

import json
import os
import socket
import time

import pytest

from helpers import rng, run_cli, same_file

pytestmark = pytest.mark.s3

PASSPHRASE = "s3-Passphrase-unique-81c4e0"


def cli(env, *args, **extra):
    return run_cli(*args, env={**env, **extra})


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def env(s3env):
    e = {k: v for k, v in s3env.items() if k not in ("BLOCKVAULT_PASSPHRASE", "BLOCKVAULT_KEY_FILE")}
    e["BLOCKVAULT_ARGON2"] = "1,8192,1"
    e["BLOCKVAULT_LEASE_TTL"] = "2"   # the first host's lease expires 2 s after it stops working
    return e


def objects(ceph, url) -> dict[str, bytes]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = ceph.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for o in page.get("Contents", ()):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_an_encrypted_store_in_a_bucket_attaches_on_a_new_host_with_the_passphrase(s3_store_url, env, ceph, tmp_path):
    cache = str(tmp_path / "cache")
    ok(cli(env, "init", s3_store_url, "--cache", cache, "--encryption", "aes-256-gcm", "--chunk-size", "64K",
           BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    img = str(tmp_path / "disk.img")
    r = rng(7)
    with open(img, "wb") as f:
        f.write(r.bytes(1 << 20) + bytes(1 << 20) + r.bytes(512 << 10))
    ok(cli(env, "backup", s3_store_url, img, "--disk", "d", "--cache", cache, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    stored = objects(ceph, s3_store_url)
    slot_keys = [k for k in stored if k.startswith("keys/")]
    assert len(slot_keys) == 1 and slot_keys[0].endswith(".json")
    slot = json.loads(stored[slot_keys[0]])
    assert slot["kind"] == "passphrase" and slot["kdf"]["name"] == "argon2id"
    assert sorted(os.listdir(os.path.join(cache, "keys"))) == [slot_keys[0][len("keys/"):]]
    with open(os.path.join(cache, "keys", slot_keys[0][len("keys/"):]), "rb") as f:
        assert f.read() == stored[slot_keys[0]]
    for name, body in stored.items():
        assert PASSPHRASE.encode() not in body, name
    # the lease names its holder ("HOST PID") sealed: no object but the packs (whose records are
    # sealed by chunkstore/recordseal.py) holds this host's name followed by a space
    lease = json.loads(stored["lease"])
    assert lease["holder"].startswith("sealed:")
    named = socket.gethostname().encode() + b" "
    assert not [name for name, body in stored.items() if named in body and not name.startswith("packs/")]

    # a new host: an empty cache, the bucket and the passphrase only
    other = str(tmp_path / "other-cache")
    proc = cli(env, "attach", s3_store_url, "--cache", other, "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE + "x")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "wrong_key"
    assert not os.path.exists(other)                 # a wrong key made nothing
    proc = cli(env, "attach", s3_store_url, "--cache", other)
    assert proc.returncode == 2 and "BLOCKVAULT_PASSPHRASE" in proc.stderr and not os.path.exists(other)
    held = cli(env, "attach", s3_store_url, "--cache", other, BLOCKVAULT_PASSPHRASE=PASSPHRASE)
    assert held.returncode == 4 and f"held by {socket.gethostname()} " in held.stderr   # opened with the key
    time.sleep(2.5)                                  # the first host's lease expires
    ok(cli(env, "attach", s3_store_url, "--cache", other, "--take-over", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert os.listdir(os.path.join(other, "keys")) == os.listdir(os.path.join(cache, "keys"))
    out = str(tmp_path / "out")
    ok(cli(env, "restore", s3_store_url, "d@1", out, "--cache", other, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert same_file(out, img)


def test_key_add_and_remove_reach_the_bucket(s3_store_url, env, ceph, tmp_path):
    cache = str(tmp_path / "cache")
    ok(cli(env, "init", s3_store_url, "--cache", cache, "--encryption", "chacha20-poly1305",
           BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    key = str(tmp_path / "nightly.key")
    ok(cli(env, "key", "add", s3_store_url, "--cache", cache, "--new-key-file", key, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    listed = json.loads(ok(cli(env, "key", "list", s3_store_url, "--cache", cache, "--json")).stdout)["slots"]
    in_bucket = sorted(k[len("keys/"):-len(".json")] for k in objects(ceph, s3_store_url) if k.startswith("keys/"))
    assert sorted(s["id"] for s in listed) == in_bucket and len(in_bucket) == 2
    pw_slot = next(s["id"] for s in listed if s["kind"] == "passphrase")
    ok(cli(env, "key", "remove", s3_store_url, pw_slot, "--cache", cache, "--key-file", key))
    left = sorted(k for k in objects(ceph, s3_store_url) if k.startswith("keys/"))
    assert left == [f"keys/{next(s['id'] for s in listed if s['kind'] == 'key-file')}.json"]
    assert cli(env, "stats", s3_store_url, "--cache", cache, BLOCKVAULT_PASSPHRASE=PASSPHRASE).returncode == 1
    # a new host attaching with the key file gets only the slot that is left
    other = str(tmp_path / "other")
    time.sleep(2.5)
    ok(cli(env, "attach", s3_store_url, "--cache", other, "--take-over", BLOCKVAULT_KEY_FILE=key))
    assert os.listdir(os.path.join(other, "keys")) == [left[0][len("keys/"):]]
