"""S3 over HTTPS against radosgw's own TLS frontend: certificates are verified (a private CA
is given with ca_file), and uploads work there too (boto3's default aws-chunked bodies with
trailing checksums, which Ceph 16 cannot read over HTTPS, are switched off)."""

import io

import pytest

from chunkstore.errors import EndpointUntrusted
from chunkstore.s3bucket import Bucket
from chunkstore.s3check import check_conditional_writes
from chunkstore.s3settings import S3Location, S3Settings

pytestmark = pytest.mark.s3


def settings(ceph, ca_file):
    return S3Settings(endpoint=ceph.tls_endpoint, region=ceph.region, access_key=ceph.access_key,
                      secret_key=ceph.secret_key, ca_file=ca_file, connect_timeout=5.0, read_timeout=30.0,
                      max_attempts=2)


def test_https_with_the_ca_file(ceph, s3_bucket_name):
    bucket = Bucket(S3Location(s3_bucket_name, "store"), settings(ceph, ceph.ca_file))
    body = bytes(range(256)) * 4096 * 5                       # 5 MiB, as a stream and as bytes
    assert bucket.put_new("packs/aa/stream.pack", io.BytesIO(body))
    assert bucket.put_new("packs/aa/bytes.pack", body[:100_000])
    assert bucket.get("packs/aa/stream.pack") == body
    assert bucket.get_range("packs/aa/bytes.pack", 99_990, 20) == body[99_990:100_000]
    check_conditional_writes(bucket)


def test_https_without_the_ca_is_refused(ceph, s3_bucket_name):
    bucket = Bucket(S3Location(s3_bucket_name, "store"), settings(ceph, None))
    with pytest.raises(EndpointUntrusted) as info:
        bucket.put_new("config.json", b"{}")
    message = str(info.value)
    assert "--ca-file" in message and ceph.tls_endpoint in message and ceph.secret_key not in message
    assert "certificate" in message
    assert Bucket(S3Location(s3_bucket_name, "store"), settings(ceph, ceph.ca_file)).head("config.json") is None
