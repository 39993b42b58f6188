"""An object-lock store: its data bucket is versioned and locked, its lease lives elsewhere.

Object lock needs a versioned bucket, and in a versioned bucket Ceph 16 ignores
``If-None-Match: *`` and refuses every ``If-Match`` PUT: the lease (a compare-and-swap
object, chunkstore/lease.py) cannot work there, and neither can the self-test.  So such a
store keeps its lease (and the self-test's scratch keys) in a *companion bucket* without
versioning, ``<BUCKET>-lease`` unless ``init --lease-bucket NAME`` says otherwise, under
the same prefix.  The data bucket names it in ``PREFIX/store-lock.json``, written at init
with the same COMPLIANCE retention as everything else there, so ``attach`` on a new host
finds it from the data bucket alone (config.json is the same document as a local store's
and stays so)::

    {"lease_bucket":"backups-lease","days":30}\\n

Packs in the data bucket are written with put_new's HEAD-then-PUT there (not atomic:
their ids are 128 random bits, a collision is no risk); config.json and store-lock.json
are written only by the holder of the lease, which init takes first.
"""

from __future__ import annotations

import json
import os

from chunkstore import safefs
from chunkstore.errors import NotAStoreError, ObjectMissing

STORE_LOCK_KEY = "store-lock.json"
CACHE_LOCK_FILE = "object-lock.json"    # the cache's copy of store-lock.json
LEASE_SUFFIX = "-lease"


def default_lease_bucket(bucket: str) -> str:
    return bucket + LEASE_SUFFIX


def encode(lease_bucket: str, days: float) -> bytes:
    n = int(days) if float(days).is_integer() else float(days)
    return (json.dumps({"lease_bucket": lease_bucket, "days": n}, separators=(",", ":")) + "\n").encode()


def decode(data: bytes, where: str) -> dict:
    """``{"lease_bucket": str, "days": float}``; NotAStoreError when it is not one."""
    try:
        doc = json.loads(data)
        if not (isinstance(doc, dict) and isinstance(doc.get("lease_bucket"), str) and doc["lease_bucket"]
                and isinstance(doc.get("days"), (int, float)) and doc["days"] > 0):
            raise ValueError("lease_bucket or days missing")
    except ValueError as e:
        raise NotAStoreError(f"{where}: {STORE_LOCK_KEY} is not an object-lock description ({e}); it is "
                             "written once at init and never changed: this bucket was altered by hand") from None
    return {"lease_bucket": doc["lease_bucket"], "days": float(doc["days"])}


def read_remote(bucket) -> dict | None:
    """The data bucket's store-lock.json, or None for a store without object lock."""
    try:
        data = bucket.get(STORE_LOCK_KEY)
    except ObjectMissing:
        return None
    return decode(data, bucket.url)


def write_cache(cache: str, doc: dict) -> None:
    safefs.write_durably(os.path.join(cache, CACHE_LOCK_FILE), encode(doc["lease_bucket"], doc["days"]),
                         "object-lock file")


def read_cache(cache: str) -> dict | None:
    try:
        with open(os.path.join(cache, CACHE_LOCK_FILE), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return decode(data, cache)


def lease_bucket(location, settings, name: str):
    """The companion bucket's Bucket (same prefix).  Its ``url`` stays the store's, so the
    lease's messages name the store, not the bucket it happens to live in."""
    from chunkstore.s3bucket import Bucket
    from chunkstore.s3settings import S3Location
    b = Bucket(S3Location(name, location.prefix), settings)
    b.url = f"{location.url} (lease in bucket {name})"
    return b
