"""The owner lease against a real Ceph RGW: one host at a time, take-over only after
expiry and only when asked, renewal keeps it, a taken-over host notices, a race has one winner."""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from chunkstore.errors import LeaseHeld, LeaseLost
from chunkstore.lease import LEASE_KEY, Lease
from chunkstore.s3bucket import Bucket
from chunkstore.s3settings import S3Location, S3Settings
from helpers import REPO_ROOT

pytestmark = pytest.mark.s3

HOST_A, HOST_B = "a" * 32, "b" * 32


@pytest.fixture
def bucket(ceph, s3_bucket_name):
    settings = S3Settings(endpoint=ceph.endpoint, region=ceph.region, access_key=ceph.access_key,
                          secret_key=ceph.secret_key, connect_timeout=5.0, read_timeout=30.0, max_attempts=3)
    return Bucket(S3Location(s3_bucket_name, "store"), settings)


def wait_until_expired(bucket, ttl):
    """Sleep past the lease's expiry as the lease itself measures it (its age, not a guess)."""
    _, info = bucket.get_with_info(LEASE_KEY)
    doc = json.loads(bucket.get(LEASE_KEY))
    while time.time() - max(doc["renewed"], info.last_modified) <= ttl + 0.2:
        time.sleep(0.2)


def test_the_lease_object_is_one_json_line(bucket):
    lease = Lease.acquire(bucket, HOST_A, "web01 4242")
    data = bucket.get(LEASE_KEY)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    doc = json.loads(data)
    assert list(doc) == ["holder", "host_id", "renewed", "ttl"]
    assert doc["holder"] == "web01 4242" and doc["host_id"] == HOST_A and doc["ttl"] == 300.0
    assert abs(doc["renewed"] - time.time()) < 60
    assert lease.etag == bucket.head(LEASE_KEY).etag


def test_a_second_host_is_refused_naming_holder_and_age(bucket):
    Lease.acquire(bucket, HOST_A, "web01 4242")
    before = bucket.get(LEASE_KEY)
    for take_over in (False, True):    # not expired: --take-over does not help either
        with pytest.raises(LeaseHeld) as info:
            Lease.acquire(bucket, HOST_B, "web02 77", take_over=take_over)
        exc = info.value
        assert exc.exit_code == 4 and exc.holder == "web01 4242" and 0 <= exc.age < 60
        assert "held by web01 4242" in str(exc) and "renewed" in str(exc) and " s ago" in str(exc)
    assert bucket.get(LEASE_KEY) == before   # the holder's lease is untouched


def test_take_over_only_after_expiry_and_only_when_asked(bucket):
    old = Lease.acquire(bucket, HOST_A, "web01 4242", ttl=2.0)
    wait_until_expired(bucket, 2.0)
    with pytest.raises(LeaseHeld) as info:
        Lease.acquire(bucket, HOST_B, "web02 77", ttl=2.0)       # expired, but not asked to take over
    assert "expired" in str(info.value) and "--take-over" in str(info.value)
    new = Lease.acquire(bucket, HOST_B, "web02 77", take_over=True, ttl=2.0)
    assert json.loads(bucket.get(LEASE_KEY))["host_id"] == HOST_B
    new.check()
    # the old holder notices at its next check or renewal, and keeps noticing
    with pytest.raises(LeaseLost) as lost:
        old.check()
    assert "web02 77" in str(lost.value) and lost.value.exit_code == 4
    with pytest.raises(LeaseLost):
        old.renew()
    with pytest.raises(LeaseLost):
        old.check()
    assert json.loads(bucket.get(LEASE_KEY))["host_id"] == HOST_B   # the loser wrote nothing


def test_renewal_keeps_the_lease(bucket):
    lease = Lease.acquire(bucket, HOST_A, "web01 4242", ttl=2.0)
    lease.start_renewing()                 # every 0.5 s
    try:
        deadline = time.time() + 5.0       # well past two ttls
        while time.time() < deadline:
            with pytest.raises(LeaseHeld):
                Lease.acquire(bucket, HOST_B, "web02 77", take_over=True, ttl=2.0)
            time.sleep(0.5)
        lease.check()
    finally:
        lease.stop()
    wait_until_expired(bucket, 2.0)        # stopped renewing: now it expires
    Lease.acquire(bucket, HOST_B, "web02 77", take_over=True, ttl=2.0)


def test_processes_of_one_host_share_the_lease(bucket):
    first = Lease.acquire(bucket, HOST_A, "web01 1")
    second = Lease.acquire(bucket, HOST_A, "web01 2")   # same host: no refusal
    for _ in range(3):                                  # each renewal changes the ETag under the other
        first.renew()
        second.renew()
        first.check()
        second.check()
    assert json.loads(bucket.get(LEASE_KEY))["holder"] == "web01 2"


def test_an_unreadable_lease_is_never_overwritten(bucket):
    assert bucket.put_new(LEASE_KEY, b"not json")
    with pytest.raises(LeaseHeld) as info:
        Lease.acquire(bucket, HOST_A, "web01 1", take_over=True)
    assert "unreadable" in str(info.value)
    assert bucket.get(LEASE_KEY) == b"not json"


RACER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from chunkstore.errors import LeaseHeld
    from chunkstore.lease import Lease
    from chunkstore.s3bucket import Bucket
    from chunkstore.s3settings import S3Settings, parse_store_url
    bucket = Bucket(parse_store_url(sys.argv[1]), S3Settings.resolve())
    bucket.head("warm-up")                 # connection made before the start signal
    barrier = sys.argv[3]
    open(os.path.join(barrier, "ready-" + sys.argv[2]), "w").close()
    while not os.path.exists(os.path.join(barrier, "go")):
        time.sleep(0.001)
    try:
        Lease.acquire(bucket, sys.argv[2], "racer " + sys.argv[2])
        print("won")
    except LeaseHeld as exc:
        print("held", exc.holder)
""")


def test_processes_racing_for_the_lease_exactly_one_wins(ceph, bucket, tmp_path):
    script = RACER.format(root=REPO_ROOT)
    env = dict(os.environ, **ceph.env())
    for round_ in range(3):
        store = f"{bucket.url}-{round_}"
        hosts = [uuid.uuid4().hex for _ in range(6)]
        barrier = tmp_path / f"round{round_}"
        barrier.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", script, store, host, str(barrier)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for host in hosts]
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("ready-*"))) < len(hosts) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        (barrier / "go").touch()           # all six are waiting: they start together
        results = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in results]
        outs = [out.strip() for out, _ in results]
        winners = [host for host, out in zip(hosts, outs) if out == "won"]
        assert len(winners) == 1, outs
        assert all(out == f"held racer {winners[0]}" for out in outs if out != "won"), outs
        sub = Bucket(S3Location(bucket.location.bucket, f"store-{round_}"), bucket.settings)
        assert json.loads(sub.get(LEASE_KEY))["host_id"] == winners[0]


def test_check_notices_at_once_when_the_lease_is_gone_or_changed_hands(ceph, bucket):
    """check() reads the lease even right after a renewal: a lease deleted or rewritten by
    someone else (an operator, a host whose clock ran ahead) is noticed before the next commit."""
    lease = Lease.acquire(bucket, HOST_A, "web01 1")
    lease.check()
    raw = ceph.client()
    raw.delete_object(Bucket=bucket.location.bucket, Key="store/" + LEASE_KEY)
    with pytest.raises(LeaseLost, match="deleted"):
        lease.check()

    other = Lease.acquire(bucket, HOST_A, "web01 2")
    raw.put_object(Bucket=bucket.location.bucket, Key="store/" + LEASE_KEY,
                   Body=json.dumps({"holder": "web09 9", "host_id": HOST_B, "renewed": time.time(),
                                    "ttl": 300.0}).encode())
    with pytest.raises(LeaseLost, match="web09 9"):
        other.check()
