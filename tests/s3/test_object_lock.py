"""Object lock against a real Ceph RGW: a COMPLIANCE retention written with the object makes
deletes with the store's own credentials fail, and the object stays readable, also behind
a delete marker; once the retention ends the delete goes through."""

import datetime
import time
import uuid

import pytest
from botocore.exceptions import ClientError

from chunkstore.s3bucket import Bucket
from chunkstore.s3settings import S3Location, S3Settings

pytestmark = pytest.mark.s3

BODY = b"pack bytes " * 100


@pytest.fixture
def settings(ceph):
    return S3Settings(endpoint=ceph.endpoint, region=ceph.region, access_key=ceph.access_key,
                      secret_key=ceph.secret_key, connect_timeout=5.0, read_timeout=30.0, max_attempts=3)


@pytest.fixture
def locked(settings):
    bucket = Bucket(S3Location(f"bv-lock-{uuid.uuid4().hex[:12]}", "store"), settings)
    assert not bucket.exists()
    bucket.create(object_lock=True)
    return bucket


def versions(ceph, bucket, key):
    doc = ceph.client().list_object_versions(Bucket=bucket.location.bucket, Prefix=bucket.location.key(key))
    return doc.get("Versions", []), doc.get("DeleteMarkers", [])


def test_create_with_object_lock(ceph, locked, settings, s3_bucket_name):
    assert locked.exists() and locked.versioned() and locked.object_lock()
    plain = Bucket(S3Location(s3_bucket_name, "store"), settings)
    assert not plain.versioned() and not plain.object_lock()
    doc = ceph.client().get_object_lock_configuration(Bucket=locked.location.bucket)
    assert doc["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"


def test_retention_is_written_with_the_object(locked):
    until = time.time() + 3600
    assert locked.put_new("packs/aa/locked.pack", BODY, retain_until=until) is True
    assert locked.put_new("packs/aa/locked.pack", b"overwrite?", retain_until=until) is False
    assert locked.get("packs/aa/locked.pack") == BODY
    assert abs(locked.retention("packs/aa/locked.pack") - until) < 2
    assert locked.put_new("packs/aa/free.pack", BODY) and locked.retention("packs/aa/free.pack") is None


def test_a_locked_object_cannot_be_deleted_with_the_stores_credentials(ceph, locked):
    until = time.time() + 3600
    assert locked.put_new("packs/aa/locked.pack", BODY, retain_until=until)
    assert locked.put_new("packs/bb/free.pack", BODY)

    failures = locked.delete(["packs/aa/locked.pack", "packs/bb/free.pack"])
    stamp = datetime.datetime.fromtimestamp(int(until), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M")
    assert len(failures) == 1 and failures[0][0] == "packs/aa/locked.pack"
    assert failures[0][1].startswith(f"locked until {stamp}"), failures
    assert locked.get("packs/aa/locked.pack") == BODY                       # intact
    assert versions(ceph, locked, "packs/bb/free.pack") == ([], [])         # really gone, no marker left
    assert [o.key for o in locked.list()] == ["packs/aa/locked.pack"]

    # the same credentials, by hand: deleting the version is refused ...
    raw = ceph.client()
    [version], _ = versions(ceph, locked, "packs/aa/locked.pack")
    with pytest.raises(ClientError) as info:
        raw.delete_object(Bucket=locked.location.bucket, Key="store/packs/aa/locked.pack",
                          VersionId=version["VersionId"])
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    # ... and a plain DELETE only hides it behind a delete marker: the store still reads it
    raw.delete_object(Bucket=locked.location.bucket, Key="store/packs/aa/locked.pack")
    with pytest.raises(ClientError):
        raw.get_object(Bucket=locked.location.bucket, Key="store/packs/aa/locked.pack")
    assert locked.get("packs/aa/locked.pack") == BODY
    assert locked.get_range("packs/aa/locked.pack", 5, 10) == BODY[5:15]
    with locked.open_stream("packs/aa/locked.pack") as stream:
        assert stream.read() == BODY
    assert locked.head("packs/aa/locked.pack").size == len(BODY)
    assert [o.key for o in locked.list("packs/")] == ["packs/aa/locked.pack"]
    assert locked.retention("packs/aa/locked.pack") is not None


def test_the_delete_goes_through_once_the_retention_ends(ceph, locked):
    until = time.time() + 3
    assert locked.put_new("packs/cc/short.pack", BODY, retain_until=until)
    assert locked.delete(["packs/cc/short.pack"])[0][1].startswith("locked until")
    while time.time() < until + 1.5:
        time.sleep(0.25)
    assert locked.delete(["packs/cc/short.pack"]) == []
    assert locked.head("packs/cc/short.pack") is None
    assert versions(ceph, locked, "packs/cc/short.pack") == ([], [])
