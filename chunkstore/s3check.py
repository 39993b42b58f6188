"""Does this endpoint honour conditional writes?  Proved, not assumed, at init and attach.

Everything that keeps an S3 store safe with more than one host in the world rests on two
atomic operations of the endpoint: create-if-absent (``If-None-Match: *``: a pack or
config.json is never overwritten, of two hosts racing for the lease one wins) and
compare-and-swap (``If-Match: ETag``: the lease is renewed only by its holder).  Some
S3-compatible servers accept those headers and ignore them, answering 200 where S3
answers 412; on such an endpoint the lease proves nothing.  So before a store is made or
attached, the endpoint is asked to do both on a scratch key, and must refuse what S3
refuses.
"""

from __future__ import annotations

import logging
import secrets

from chunkstore.errors import EndpointUnsafe

log = logging.getLogger("blockvault.s3")

SELFTEST_PREFIX = "selftest/"


def check_conditional_writes(bucket) -> None:
    """Raise EndpointUnsafe naming what the endpoint ignored; leaves no key behind."""
    key = SELFTEST_PREFIX + secrets.token_hex(16)
    where = f"the S3 endpoint {bucket.settings.endpoint_name} (bucket {bucket.location.bucket})"
    refuse = ("; a store there could be overwritten by a second host, so blockvault refuses to use it "
              "(use an endpoint that supports conditional writes, e.g. Ceph RGW, MinIO or AWS S3)")
    if bucket.versioned():
        refuse = (" (the bucket keeps versions, as object lock requires: Ceph 16 ignores If-None-Match and "
                  "refuses every If-Match on PUT in such a bucket)" + refuse)
    try:
        first = bucket.put_new_etag(key, b"selftest 1\n", look_first=False)
        if first is None:
            raise EndpointUnsafe(f"{where} refused to create a new key with If-None-Match: * (412 for a key "
                                 f"that did not exist){refuse}")
        if bucket.put_new_etag(key, b"selftest 2\n", look_first=False) is not None or \
                bucket.get(key) != b"selftest 1\n":
            raise EndpointUnsafe(f"{where} ignores If-None-Match: * on PUT (a second create of the same key "
                                 f"replaced the first){refuse}")
        stale = "0" * 32 if first != "0" * 32 else "1" * 32
        if bucket.put_if_match(key, b"selftest 3\n", stale) or bucket.get(key) != b"selftest 1\n":
            raise EndpointUnsafe(f"{where} ignores If-Match on PUT (a write with a stale ETag replaced the "
                                 f"object){refuse}")
        if not bucket.put_if_match(key, b"selftest 4\n", first) or bucket.get(key) != b"selftest 4\n":
            raise EndpointUnsafe(f"{where} refuses If-Match on PUT even with the object's own ETag, so the "
                                 f"store's lease could never be renewed{refuse}")
    finally:
        try:
            failed = bucket.delete([key])
        except Exception as exc:  # noqa: BLE001 - the verdict matters more than the scratch key
            failed = [(key, str(exc))]
        for name, reason in failed:
            log.warning("self-test key %s was not deleted (%s); it is harmless, delete it by hand",
                        bucket.location.key(name), reason)
    log.info("%s honours If-None-Match and If-Match", where)
