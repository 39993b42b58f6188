"""One bucket (and a key prefix in it) as the store's object space.

The store needs few S3 operations, but needs them exactly: an atomic create-if-absent
(``If-None-Match: *``) for packs and config.json, a compare-and-swap (``If-Match``) for
the lease, ranged reads, listings, batched deletes, and object lock.  This module is the
one place that talks to boto3, so the endpoint quirks live here and nowhere else:

* Ceph 16 does not understand boto3's default ``aws-chunked`` bodies with trailing
  checksums (uploads over HTTPS fail), so checksums are sent only where S3 requires them.
* Ceph 16 compares a PUT's ``If-Match`` with the ETag *unquoted*: ETags are kept unquoted.
* Over HTTPS a PUT's signature covers its headers, not a SHA-256 of the body
  (``UNSIGNED-PAYLOAD``): TLS authenticates every byte already, and hashing each pack cost
  0.9 s of CPU per GiB uploaded, on cores radosgw shares.  Over plain HTTP nothing else
  protects the body, so the payload stays signed there (radosgw checks the hash).
* Every wait is bounded: connect and read timeouts, botocore's retries, and one more
  bounded round of our own for connection failures (a restarting radosgw).

Every failure becomes a StoreError subclass (chunkstore/errors.py) whose message names
the endpoint and the bucket and says what to check; no message or repr carries a secret.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

from chunkstore.errors import AccessDenied, ObjectLocked, ObjectMissing
from chunkstore.s3failures import (MISSING_CODES, PRECONDITION_CODES, ResponseStream, error_code,
                                   translate)
from chunkstore.s3settings import S3Location, S3Settings

log = logging.getLogger("blockvault.s3")

POOL_CONNECTIONS = 32        # uploader and reader pools run up to 16 threads each
DELETE_BATCH = 1000          # the most keys one DeleteObjects takes
_ROUNDS = 2                  # our own rounds around botocore's retries, for connection failures
_ROUND_PAUSE = 2.0


@dataclass
class _Refused:
    """An expected refusal (412 on a conditional PUT, 416 on a range past the end)."""

    code: str


@dataclass
class ObjectInfo:
    key: str                 # relative to the store's prefix
    size: int
    etag: str                # unquoted
    last_modified: float     # unix time


def _content_md5(body) -> str:
    """Content-MD5 of a body (bytes, or a seekable file read and rewound)."""
    digest = hashlib.md5()
    if isinstance(body, (bytes, bytearray, memoryview)):
        digest.update(body)
    else:
        start = body.tell()
        while piece := body.read(1 << 20):
            digest.update(piece)
        body.seek(start)
    return base64.b64encode(digest.digest()).decode()


def _unquote(etag: str | None) -> str:
    return (etag or "").strip().strip('"')


class Bucket:
    """A store's bucket.  Thread-safe (one boto3 client, which is)."""

    def __init__(self, location: S3Location, settings: S3Settings, list_page_size: int = 1000):
        import boto3
        from botocore.config import Config
        self.location = location
        self.settings = settings
        self.url = location.url
        self.list_page_size = list_page_size
        self._versioned: bool | None = None
        self._versioned_lock = threading.Lock()
        tls = (settings.endpoint or "https://").lower().startswith("https://")   # no endpoint: AWS, HTTPS
        config = Config(
            s3={"addressing_style": "path", "payload_signing_enabled": not tls},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
            max_pool_connections=POOL_CONNECTIONS,
            tcp_keepalive=True,
        )
        # A session of its own: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region,
            aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
            verify=settings.ca_file if settings.ca_file else True, config=config)

    def __repr__(self) -> str:
        return f"Bucket({self.url!r}, endpoint={self.settings.endpoint_name!r})"

    # --- error translation ------------------------------------------------------------------

    def _failure(self, key: str):
        return lambda exc: self._translate(exc, "GET", key)

    def _translate(self, exc: Exception, op: str, key: str | None = None, waited: float | None = None) -> Exception:
        return translate(exc, op, self.location, self.settings, key, waited)

    def _call(self, op: str, method: str, key: str | None = None, absorb: frozenset = frozenset(), **kwargs):
        """One client call, with one more bounded round of retries for connection failures
        (botocore's own retries are spent within seconds; a radosgw restart takes longer).
        An S3 error code in ``absorb`` is an expected answer: returned as ``_Refused``."""
        from botocore import exceptions as be
        started = time.monotonic()
        for attempt in range(_ROUNDS):
            try:
                return getattr(self._client, method)(**kwargs)
            except (be.EndpointConnectionError, be.ConnectionClosedError) as exc:
                if attempt == _ROUNDS - 1:
                    raise self._translate(exc, op, key, time.monotonic() - started) from None
                log.info("S3 %s %s: %s; retrying in %.0f s", op, key or "", type(exc).__name__, _ROUND_PAUSE)
                time.sleep(_ROUND_PAUSE)
            except be.ClientError as exc:
                if self._code(exc) in absorb:
                    return _Refused(self._code(exc))
                raise self._translate(exc, op, key, time.monotonic() - started) from None
            except Exception as exc:  # noqa: BLE001 - translated or re-raised
                translated = self._translate(exc, op, key, time.monotonic() - started)
                if translated is exc:
                    raise
                raise translated from None

    _code = staticmethod(error_code)

    # --- the bucket -------------------------------------------------------------------------

    def exists(self) -> bool:
        from botocore import exceptions as be
        try:
            self._client.head_bucket(Bucket=self.location.bucket)
            return True
        except be.ClientError as exc:
            if self._code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                return False
            raise self._translate(exc, "HEAD bucket") from None
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, "HEAD bucket") from None

    def create(self, object_lock: bool = False) -> None:
        """Make the bucket (no LocationConstraint: Ceph takes the default placement).
        ``object_lock``: with versioning and object lock, so put_new can write retentions."""
        from botocore import exceptions as be
        kwargs = {"Bucket": self.location.bucket}
        if object_lock:
            kwargs["ObjectLockEnabledForBucket"] = True
        try:
            self._client.create_bucket(**kwargs)
        except be.ClientError as exc:
            if self._code(exc) != "BucketAlreadyOwnedByYou":
                if self._code(exc) == "BucketAlreadyExists":
                    raise AccessDenied(f"bucket {self.location.bucket} at {self.settings.endpoint_name} already "
                                       "exists and belongs to another user: choose another name") from None
                raise self._translate(exc, "CREATE bucket") from None
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, "CREATE bucket") from None
        if object_lock:
            self._call("PUT versioning", "put_bucket_versioning", Bucket=self.location.bucket,
                       VersioningConfiguration={"Status": "Enabled"})
            self._call("PUT object-lock", "put_object_lock_configuration", Bucket=self.location.bucket,
                       ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"})
            self._versioned = True

    def versioned(self) -> bool:
        """Whether the bucket keeps versions (object lock implies it): deletes must then name
        the version, or they only hide the object behind a delete marker and free nothing."""
        with self._versioned_lock:
            if self._versioned is None:
                try:
                    doc = self._call("GET versioning", "get_bucket_versioning", Bucket=self.location.bucket)
                except AccessDenied:
                    # a user without s3:GetBucketVersioning: take the bucket as unversioned (the
                    # conditional headers stay the real guard), say so once
                    log.warning("may not read the versioning of bucket %s; taking it as unversioned",
                                self.location.bucket)
                    doc = {}
                self._versioned = doc.get("Status") in ("Enabled", "Suspended")
            return self._versioned

    def object_lock(self) -> bool:
        """Whether the bucket has object lock enabled."""
        from botocore import exceptions as be
        try:
            doc = self._client.get_object_lock_configuration(Bucket=self.location.bucket)
        except be.ClientError as exc:
            if self._code(exc) in {"ObjectLockConfigurationNotFoundError", "404", "InvalidRequest"}:
                return False
            raise self._translate(exc, "GET object-lock") from None
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, "GET object-lock") from None
        return doc.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    # --- objects ----------------------------------------------------------------------------

    def put_new(self, key: str, body: bytes | BinaryIO, retain_until: float | None = None) -> bool:
        """Create ``key`` unless it exists (``If-None-Match: *``).  True: created; False: an
        object was there already (412) and is left unchanged.  A PUT retried after a lost
        answer can meet its own first attempt and say False: callers that care compare content.
        ``retain_until``: a COMPLIANCE retention until that unix time (object-lock bucket)."""
        return self.put_new_etag(key, body, retain_until) is not None

    def put_new_etag(self, key: str, body: bytes | BinaryIO, retain_until: float | None = None,
                     look_first: bool | None = None) -> str | None:
        """put_new, answering the new object's (unquoted) ETag, or None when it existed.

        ``look_first`` (default: on a versioned bucket): HEAD the key first and answer None
        when it has a version.  Ceph 16 ignores ``If-None-Match: *`` in a versioned bucket
        (every object-lock bucket is one) and would add a second version; the HEAD keeps a
        second ``init`` or a re-sent pack from doing that, though not atomically (two
        writers can both pass it), which is why s3check refuses such an endpoint for the
        lease."""
        if look_first is None:
            look_first = self.versioned()
        if look_first and self.head(key) is not None:
            return None
        kwargs = {"IfNoneMatch": "*"}
        if retain_until is not None:
            kwargs["ObjectLockMode"] = "COMPLIANCE"
            kwargs["ObjectLockRetainUntilDate"] = datetime.datetime.fromtimestamp(retain_until, datetime.timezone.utc)
            kwargs["ContentMD5"] = _content_md5(body)   # S3 requires a body digest with a retention
        return self._put(key, body, PRECONDITION_CODES, kwargs)

    def put_if_match(self, key: str, body: bytes, etag: str) -> bool:
        """Replace ``key`` only if its ETag is still ``etag`` (compare-and-swap); False on 412
        (changed) or when the object is gone."""
        return self.put_if_match_etag(key, body, etag) is not None

    def put_if_match_etag(self, key: str, body: bytes, etag: str) -> str | None:
        """put_if_match, answering the new ETag, or None when refused."""
        return self._put(key, body, PRECONDITION_CODES | MISSING_CODES, {"IfMatch": _unquote(etag)})

    def _put(self, key: str, body, absorb: frozenset, conditions: dict) -> str | None:
        answer = self._call("PUT", "put_object", key, absorb=absorb, Bucket=self.location.bucket,
                            Key=self.location.key(key), Body=body, **conditions)
        return None if isinstance(answer, _Refused) else _unquote(answer.get("ETag"))

    def get(self, key: str) -> bytes:
        """The whole object; ObjectMissing when it is not there."""
        return self.get_with_info(key)[0]

    def get_with_info(self, key: str, hidden: bool = True) -> tuple[bytes, ObjectInfo]:
        """The whole object and its ETag/size/time from the same response (no HEAD race).
        ``hidden=False``: only the current version (no fall-back past a delete marker)."""
        doc = self._get_object("GET", key, hidden)
        with ResponseStream(doc["Body"], self._failure(key)) as body:
            data = body.read()
        modified = doc.get("LastModified")
        return data, ObjectInfo(key, len(data), _unquote(doc.get("ETag")), modified.timestamp() if modified else 0.0)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of ``key``; fewer where the object ends first
        (b"" at or past its end): the caller decides whether a short read is damage."""
        if length <= 0:
            return b""
        doc = self._get_object("GET", key, True, absorb=frozenset({"InvalidRange", "416"}),
                               Range=f"bytes={offset}-{offset + length - 1}")
        if isinstance(doc, _Refused):
            return b""
        with ResponseStream(doc["Body"], self._failure(key)) as body:
            data = body.read()
        # a server that ignores Range answers 200 with the whole object
        if doc.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 and "ContentRange" not in doc:
            data = data[offset:offset + length]
        return data

    def open_stream(self, key: str) -> BinaryIO:
        """The object as a stream (``read(n)`` until b"")."""
        body = self._get_object("GET", key, True)["Body"]
        return ResponseStream(body, self._failure(key))  # type: ignore[return-value]

    def _get_object(self, op: str, key: str, hidden: bool, absorb: frozenset = frozenset(), method="get_object",
                    **extra):
        """GET (or HEAD) ``key``.  On a versioned bucket a key whose current version is a
        delete marker is read from its newest real version: a plain DELETE (which object
        lock cannot refuse: it only adds a marker) must not make a locked pack unreadable."""
        try:
            return self._call(op, method, key, absorb=absorb, Bucket=self.location.bucket,
                              Key=self.location.key(key), **extra)
        except ObjectMissing:
            if not hidden or not self.versioned():
                raise
            versions = self._versions(key, markers=False)
            if not versions:
                raise
            log.warning("%s is hidden by a delete marker in bucket %s; reading its version %s",
                        self.location.key(key), self.location.bucket, versions[0])
            return self._call(op, method, key, absorb=absorb, Bucket=self.location.bucket,
                              Key=self.location.key(key), VersionId=versions[0], **extra)

    def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag and time of ``key``; None when it does not exist."""
        try:
            doc = self._get_object("HEAD", key, True, method="head_object")
        except ObjectMissing:
            return None
        return ObjectInfo(key, int(doc.get("ContentLength", 0)), _unquote(doc.get("ETag")),
                          doc["LastModified"].timestamp() if doc.get("LastModified") else 0.0)

    def list(self, subprefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under PREFIX/subprefix, keys relative to PREFIX, page by page (on a
        versioned bucket: every key with a real version, also one hidden by a delete marker)."""
        base = self.location.key("") if self.location.prefix else ""
        if self.versioned():
            yield from self._list_versions(base, subprefix)
            return
        kwargs = {"Bucket": self.location.bucket, "Prefix": base + subprefix, "MaxKeys": self.list_page_size}
        while True:
            page = self._call("LIST", "list_objects_v2", subprefix or "", **kwargs)
            for item in page.get("Contents", ()):
                yield ObjectInfo(item["Key"][len(base):], int(item["Size"]), _unquote(item.get("ETag")),
                                 item["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    def _list_versions(self, base: str, subprefix: str) -> Iterator[ObjectInfo]:
        kwargs = {"Bucket": self.location.bucket, "Prefix": base + subprefix, "MaxKeys": self.list_page_size}
        last = None
        while True:
            page = self._call("LIST versions", "list_object_versions", subprefix or "", **kwargs)
            for item in page.get("Versions", ()):   # by key, newest version first
                if item["Key"] != last:
                    last = item["Key"]
                    yield ObjectInfo(item["Key"][len(base):], int(item["Size"]), _unquote(item.get("ETag")),
                                     item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker")

    def delete(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """Delete ``keys`` in batches of 1000; returns the failures as (key, reason).  A key
        already absent is no failure.  On a versioned bucket the version itself is deleted
        (object lock then refuses it while its retention runs: 'locked until ...')."""
        failures: list[tuple[str, str]] = []
        keys = list(keys)
        versioned = self.versioned() if keys else False
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            if versioned:
                objects = [{"Key": self.location.key(k), "VersionId": v}
                           for k in batch for v in self._versions(k)]
            else:
                objects = [{"Key": self.location.key(k)} for k in batch]
            if not objects:
                continue
            doc = self._call("DELETE", "delete_objects", None, Bucket=self.location.bucket,
                             Delete={"Objects": objects, "Quiet": True})
            base = len(self.location.key("")) if self.location.prefix else 0
            failed: dict[str, str] = {}
            for err in doc.get("Errors", ()):
                key = err.get("Key", "")[base:]
                if err.get("Code") in MISSING_CODES:
                    continue
                failed.setdefault(key, f"{err.get('Code')}: {err.get('Message') or ''}".rstrip(": "))
            for key, reason in failed.items():
                until = self.retention(key) if versioned else None
                if until is not None and until > time.time():
                    stamp = datetime.datetime.fromtimestamp(until, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    reason = f"locked until {stamp}"
                failures.append((key, reason))
        return failures

    def _versions(self, key: str, markers: bool = True) -> list[str]:
        """The version ids of exactly ``key``, newest first (and of its delete markers)."""
        full = self.location.key(key)
        found: list[str] = []
        kwargs = {"Bucket": self.location.bucket, "Prefix": full}
        while True:
            page = self._call("LIST versions", "list_object_versions", key, **kwargs)
            for item in list(page.get("Versions", ())) + (list(page.get("DeleteMarkers", ())) if markers else []):
                if item["Key"] == full:
                    found.append(item["VersionId"])
            if not page.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker")

    def retention(self, key: str) -> float | None:
        """The COMPLIANCE/GOVERNANCE retain-until time of ``key``; None when it has none."""
        none = frozenset({"NoSuchObjectLockConfiguration", "ObjectLockConfigurationNotFoundError",
                          "InvalidRequest"})
        try:
            doc = self._get_object("GET retention", key, True, absorb=none, method="get_object_retention")
        except ObjectMissing:
            return None
        if isinstance(doc, _Refused):
            return None
        until = doc.get("Retention", {}).get("RetainUntilDate")
        return until.timestamp() if until else None

    def delete_locked_error(self, key: str, until: float) -> ObjectLocked:
        """The error for a caller that must fail (not just report) on a locked object."""
        stamp = datetime.datetime.fromtimestamp(until, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ObjectLocked(f"{self.location.key(key)} in bucket {self.location.bucket} is locked until {stamp} "
                            "(object lock, COMPLIANCE): it cannot be deleted before then")
