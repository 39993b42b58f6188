"""Uploads over HTTPS are not SHA-256-hashed for their signature; over plain HTTP they are.

chunkstore/s3bucket.py: TLS already authenticates every byte of the body, so a PUT over HTTPS
signs its headers with ``x-amz-content-sha256: UNSIGNED-PAYLOAD`` (the SHA-256 of a pack was
0.9 s of CPU per GiB uploaded here, on cores radosgw shares).  Over plain HTTP nothing else
protects the body, so there the payload is still signed and radosgw checks its hash.  Checked
on the headers botocore really sends to the real radosgw, and on what the bucket then holds.
"""

from __future__ import annotations

import hashlib
import io

import pytest

from chunkstore.s3bucket import Bucket
from chunkstore.s3settings import S3Location, S3Settings

pytestmark = pytest.mark.s3


def bucket_at(ceph, name: str, tls: bool) -> Bucket:
    settings = S3Settings(endpoint=ceph.tls_endpoint if tls else ceph.endpoint, region=ceph.region,
                          access_key=ceph.access_key, secret_key=ceph.secret_key,
                          ca_file=ceph.ca_file if tls else None, connect_timeout=5.0, read_timeout=30.0,
                          max_attempts=2)
    return Bucket(S3Location(name, "store"), settings)


def sent_content_hashes(bucket: Bucket) -> list[str]:
    """The x-amz-content-sha256 of every PutObject the bucket's client sends from now on."""
    seen: list[str] = []

    def capture(request, **_):
        value = request.headers.get("x-amz-content-sha256")
        seen.append(value.decode() if isinstance(value, bytes) else value)

    bucket._client.meta.events.register("before-send.s3.PutObject", capture)
    return seen


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_a_pack_upload_signs_its_payload_only_without_tls(ceph, s3_bucket_name, tls):
    bucket = bucket_at(ceph, s3_bucket_name, tls)
    seen = sent_content_hashes(bucket)
    body = hashlib.sha256(b"pack").digest() * (5 << 15)           # 5 MiB, streamed as a pack is
    assert bucket.put_new("packs/ab/one.pack", io.BytesIO(body))
    assert bucket.put_new("packs/ab/two.pack", body[:70_000])     # and as bytes (metadata, config)
    expected = ["UNSIGNED-PAYLOAD"] * 2 if tls else [hashlib.sha256(body).hexdigest(),
                                                     hashlib.sha256(body[:70_000]).hexdigest()]
    assert seen == expected
    assert bucket.get("packs/ab/one.pack") == body
    assert bucket.get("packs/ab/two.pack") == body[:70_000]
    assert bucket.put_new("packs/ab/one.pack", b"other") is False  # If-None-Match still holds
