"""chunkstore.s3bucket against a real Ceph RGW: the few operations the store relies on,
exactly (conditional writes, ranges, pagination, batched deletes) and the failures it must
name (bad keys, no endpoint, no bucket) without leaking a secret."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from chunkstore.errors import AccessDenied, EndpointUnavailable, NoSuchBucket, ObjectMissing
from chunkstore.s3bucket import Bucket
from chunkstore.s3settings import S3Location, S3Settings

pytestmark = pytest.mark.s3


def settings(ceph, **over) -> S3Settings:
    values = dict(endpoint=ceph.endpoint, region=ceph.region, access_key=ceph.access_key,
                  secret_key=ceph.secret_key, connect_timeout=5.0, read_timeout=30.0, max_attempts=3)
    values.update(over)
    return S3Settings(**values)


@pytest.fixture
def bucket(ceph, s3_bucket_name):
    return Bucket(S3Location(s3_bucket_name, "store"), settings(ceph))


def raw_get(ceph, bucket_name, key):
    return ceph.client().get_object(Bucket=bucket_name, Key=key)["Body"].read()


def test_put_new_creates_once_and_never_overwrites(ceph, bucket):
    assert bucket.put_new("config.json", b"first") is True
    assert bucket.put_new("config.json", b"second") is False
    assert raw_get(ceph, bucket.location.bucket, "store/config.json") == b"first"  # under the prefix
    assert bucket.get("config.json") == b"first"


def test_put_new_racing_writers_exactly_one_wins(ceph, bucket):
    bodies = [f"writer {i}".encode() for i in range(16)]
    barrier = threading.Barrier(16)

    def attempt(body):
        barrier.wait()
        return bucket.put_new("lease", body)

    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(attempt, bodies))
    assert won.count(True) == 1
    assert bucket.get("lease") == bodies[won.index(True)]


def test_put_if_match_is_a_compare_and_swap(ceph, bucket):
    assert bucket.put_new("lease", b"v1")
    first = bucket.head("lease")
    assert first is not None and first.size == 2 and '"' not in first.etag
    assert bucket.put_if_match("lease", b"v2", first.etag) is True
    assert bucket.put_if_match("lease", b"v3", first.etag) is False  # stale: someone changed it
    assert bucket.get("lease") == b"v2"
    second = bucket.head("lease")
    assert bucket.put_if_match("lease", b"v4", f'"{second.etag}"') is True  # quoted as S3 prints it
    assert bucket.get("lease") == b"v4"
    assert bucket.put_if_match("absent", b"x", second.etag) is False and bucket.head("absent") is None


def test_ranged_reads_and_streams(bucket):
    body = bytes(range(256)) * 40
    assert bucket.put_new("packs/ab/x.pack", body)
    assert bucket.get_range("packs/ab/x.pack", 0, 10) == body[:10]
    assert bucket.get_range("packs/ab/x.pack", 1000, 3000) == body[1000:4000]
    assert bucket.get_range("packs/ab/x.pack", len(body) - 5, 100) == body[-5:]  # short at the end
    assert bucket.get_range("packs/ab/x.pack", len(body), 10) == b""               # past the end
    assert bucket.get_range("packs/ab/x.pack", 7, 0) == b""
    with bucket.open_stream("packs/ab/x.pack") as stream:
        pieces = []
        while piece := stream.read(777):
            pieces.append(piece)
    assert b"".join(pieces) == body
    with pytest.raises(ObjectMissing) as info:
        bucket.get_range("packs/ab/none.pack", 0, 10)
    assert info.value.exit_code == 3 and "store/packs/ab/none.pack" in str(info.value)
    with pytest.raises(ObjectMissing):
        bucket.get("packs/ab/none.pack")
    assert bucket.head("packs/ab/none.pack") is None


def test_list_pages_through_more_than_1000_keys_and_stays_under_the_prefix(ceph, s3_bucket_name):
    s = settings(ceph)
    bucket = Bucket(S3Location(s3_bucket_name, "store"), s, list_page_size=97)
    sibling = Bucket(S3Location(s3_bucket_name, "store2"), s)  # shares "store" as a string prefix
    keys = [f"packs/{i % 256:02x}/{uuid.uuid4().hex}.pack" for i in range(1105)]
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda k: bucket.put_new(k, k.encode()), keys))
    assert sibling.put_new("packs/00/other.pack", b"other") and sibling.put_new("config.json", b"{}")
    assert bucket.put_new("config.json", b"{}")

    listed = list(bucket.list("packs/"))
    assert sorted(o.key for o in listed) == sorted(keys)          # every key once, relative to PREFIX
    assert all(o.size == len(o.key) and len(o.etag) == 32 for o in listed)
    assert sorted(o.key for o in bucket.list()) == sorted(keys + ["config.json"])
    assert [o.key for o in bucket.list("packs/00/")] == sorted(k for k in keys if k.startswith("packs/00/"))

    # batched delete: two DeleteObjects requests; keys already gone are no failure
    assert bucket.delete(keys + ["packs/ff/never-there.pack"]) == []
    assert [o.key for o in bucket.list()] == ["config.json"]
    assert sorted(o.key for o in sibling.list()) == ["config.json", "packs/00/other.pack"]  # untouched
    assert bucket.delete([]) == []


def test_a_store_at_the_bucket_root(ceph, s3_bucket_name):
    bucket = Bucket(S3Location(s3_bucket_name, ""), settings(ceph))
    assert bucket.put_new("config.json", b"root")
    assert raw_get(ceph, s3_bucket_name, "config.json") == b"root"
    assert [o.key for o in bucket.list()] == ["config.json"]


@pytest.mark.parametrize("which", ["secret", "access key"])
def test_bad_credentials_are_access_denied_naming_no_secret(ceph, s3_bucket_name, which):
    wrong = "Wrong-Secret-" + uuid.uuid4().hex
    over = {"secret_key": wrong} if which == "secret" else {"access_key": "NOSUCHKEY" + uuid.uuid4().hex[:8]}
    bucket = Bucket(S3Location(s3_bucket_name, "store"), settings(ceph, **over))
    with pytest.raises(AccessDenied) as info:
        bucket.put_new("config.json", b"x")
    message = str(info.value)
    assert ceph.endpoint in message and s3_bucket_name in message
    assert "BLOCKVAULT_S3_ACCESS_KEY_ID" in message
    assert wrong not in message and ceph.secret_key not in message
    assert wrong not in repr(bucket) and ceph.secret_key not in repr(bucket.settings)
    with pytest.raises(AccessDenied):
        list(bucket.list())
    assert Bucket(S3Location(s3_bucket_name, "store"), settings(ceph)).head("config.json") is None  # nothing written


def test_an_unreachable_endpoint_is_reported_not_waited_for(ceph):
    import socket
    with socket.socket() as s:        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bucket = Bucket(S3Location("bucket", "store"),
                    settings(ceph, endpoint=f"http://127.0.0.1:{port}", connect_timeout=1.0, max_attempts=2))
    outcome = {}

    def run():
        try:
            bucket.get("config.json")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["exc"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)   # a bound against an endless wait, not a speed assertion
    assert not worker.is_alive(), "an unreachable endpoint made the client wait without end"
    exc = outcome["exc"]
    assert isinstance(exc, EndpointUnavailable), exc
    assert f"127.0.0.1:{port}" in str(exc) and "did not answer within" in str(exc)
    assert ceph.secret_key not in str(exc)


def test_a_bucket_that_does_not_exist(ceph):
    name = f"bv-none-{uuid.uuid4().hex[:8]}"
    bucket = Bucket(S3Location(name, "store"), settings(ceph))
    assert bucket.exists() is False
    for call in (lambda: bucket.get("config.json"), lambda: bucket.put_new("config.json", b"x"),
                 lambda: list(bucket.list())):
        with pytest.raises(NoSuchBucket) as info:
            call()
        assert name in str(info.value) and ceph.endpoint in str(info.value)
    bucket.create()
    assert bucket.exists() is True
    bucket.create()   # again: the bucket is ours already, nothing to do
    assert bucket.put_new("config.json", b"x")


def test_an_upload_that_is_never_answered_is_endpoint_full(ceph, s3_bucket_name):
    """A full Ceph cluster takes a PUT and holds it; the client must give up (read timeout,
    bounded retries) with the hint, never wait without end.  The gateway in front of the
    real radosgw holds every PUT the same way."""
    from chunkstore.errors import EndpointFull
    from s3proxy import S3Gateway
    gateway = S3Gateway(ceph.endpoint, ceph.access_key, ceph.secret_key, hang_puts=True)
    try:
        bucket = Bucket(S3Location(s3_bucket_name, "store"),
                        settings(ceph, endpoint=gateway.endpoint, read_timeout=1.0, max_attempts=2))
        assert Bucket(S3Location(s3_bucket_name, "store"), settings(ceph)).put_new("config.json", b"{}")
        assert bucket.get("config.json") == b"{}"    # reads pass through the gateway
        outcome = {}
        worker = threading.Thread(target=lambda: outcome.update(
            exc=pytest.raises(EndpointFull, bucket.put_new, "packs/aa/x.pack", b"x" * 1000)), daemon=True)
        worker.start()
        worker.join(120)
        assert not worker.is_alive(), "a hung PUT made the client wait without end"
    finally:
        gateway.close()
    message = str(outcome["exc"].value)
    assert "ceph df" in message and gateway.endpoint in message and s3_bucket_name in message
    puts = [path for method, path, _ in gateway.seen if method == "PUT"]
    assert len(puts) == 2    # max_attempts, then it stops
    assert Bucket(S3Location(s3_bucket_name, "store"), settings(ceph)).head("packs/aa/x.pack") is None
