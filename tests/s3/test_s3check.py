"""The conditional-write self-test: passes on Ceph RGW, refuses a real endpoint that ignores
If-None-Match or If-Match (radosgw behind a gateway that drops them), leaves no key behind."""

import pytest

from chunkstore.errors import EndpointUnsafe
from chunkstore.s3bucket import Bucket
from chunkstore.s3check import check_conditional_writes
from chunkstore.s3settings import S3Location, S3Settings
from s3proxy import S3Gateway

pytestmark = pytest.mark.s3


def settings(ceph, endpoint):
    return S3Settings(endpoint=endpoint, region=ceph.region, access_key=ceph.access_key,
                      secret_key=ceph.secret_key, connect_timeout=5.0, read_timeout=30.0, max_attempts=2)


def keys(ceph, bucket_name):
    return [o["Key"] for o in ceph.client().list_objects_v2(Bucket=bucket_name).get("Contents", [])]


def test_ceph_rgw_passes_and_no_key_is_left(ceph, s3_bucket_name):
    bucket = Bucket(S3Location(s3_bucket_name, "store"), settings(ceph, ceph.endpoint))
    check_conditional_writes(bucket)
    assert keys(ceph, s3_bucket_name) == []


@pytest.mark.parametrize("dropped, named", [(("If-None-Match",), "ignores If-None-Match"),
                                            (("If-Match",), "ignores If-Match on PUT"),
                                            (("If-None-Match", "If-Match"), "ignores If-None-Match")])
def test_an_endpoint_that_ignores_conditional_writes_is_refused(ceph, s3_bucket_name, dropped, named):
    gateway = S3Gateway(ceph.endpoint, ceph.access_key, ceph.secret_key, drop=dropped)
    try:
        bucket = Bucket(S3Location(s3_bucket_name, "store"), settings(ceph, gateway.endpoint))
        with pytest.raises(EndpointUnsafe) as info:
            check_conditional_writes(bucket)
        # the gateway really received the headers and really dropped them
        sent = {h for method, _, headers in gateway.seen if method == "PUT" for h in headers}
        assert dropped[0].lower() in sent
    finally:
        gateway.close()
    message = str(info.value)
    assert named in message and gateway.endpoint in message and s3_bucket_name in message
    assert ceph.secret_key not in message and info.value.exit_code == 1
    assert keys(ceph, s3_bucket_name) == []   # the scratch key was deleted even so


def test_the_gateway_itself_is_faithful(ceph, s3_bucket_name):
    """Dropping nothing, the same gateway passes the self-test: the refusals above come from
    the missing headers, not from the gateway."""
    gateway = S3Gateway(ceph.endpoint, ceph.access_key, ceph.secret_key)
    try:
        check_conditional_writes(Bucket(S3Location(s3_bucket_name, "p"), settings(ceph, gateway.endpoint)))
    finally:
        gateway.close()


def test_the_verdict_on_an_object_lock_bucket_matches_the_endpoint(ceph, s3_bucket_name):
    """Object lock needs versioning, and Ceph 16 ignores If-None-Match (and refuses every
    If-Match) in a versioned bucket.  The self-test must say so exactly when the endpoint
    really does it, measured here with the plain client."""
    import uuid

    from botocore.exceptions import ClientError
    name = f"bv-lockchk-{uuid.uuid4().hex[:8]}"
    bucket = Bucket(S3Location(name, "store"), settings(ceph, ceph.endpoint))
    bucket.create(object_lock=True)
    raw = ceph.client()
    raw.put_object(Bucket=name, Key="probe", Body=b"1", IfNoneMatch="*")
    try:
        raw.put_object(Bucket=name, Key="probe", Body=b"2", IfNoneMatch="*")
        ignores = True
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "PreconditionFailed"
        ignores = False
    for v in raw.list_object_versions(Bucket=name, Prefix="probe").get("Versions", []):
        raw.delete_object(Bucket=name, Key="probe", VersionId=v["VersionId"])
    if ignores:
        with pytest.raises(EndpointUnsafe) as info:
            check_conditional_writes(bucket)
        assert "ignores If-None-Match" in str(info.value) and "keeps versions" in str(info.value)
    else:
        check_conditional_writes(bucket)
    assert raw.list_object_versions(Bucket=name).get("Versions", []) == []
