"""What an S3 failure means: botocore's and urllib3's exceptions as the store's errors.

A person reading the message must learn which endpoint and bucket failed, what was being
done, and what to check, and must never see a secret: botocore's own texts hold none (SigV4
sends the key only as a signature), but they say nothing useful either, so every failure is
rewritten here.  chunkstore/s3bucket.py is the only caller.
"""

from __future__ import annotations

import re

from chunkstore.errors import (AccessDenied, EndpointFull, EndpointUnavailable, EndpointUntrusted, NoSuchBucket,
                               ObjectMissing, S3Error)
from chunkstore.s3settings import S3Location, S3Settings

CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "AllAccessDisabled", "AccountProblem", "403"}
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def error_code(exc: Exception) -> str:
    """The S3 error code (or HTTP status) of a botocore ClientError; "" for anything else."""
    from botocore import exceptions as be
    if isinstance(exc, be.ClientError):
        return str(exc.response.get("Error", {}).get("Code")
                   or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def translate(exc: Exception, op: str, location: S3Location, settings: S3Settings, key: str | None = None,
              waited: float | None = None) -> Exception:
    """The StoreError a botocore/urllib3 failure means, with a message for a person."""
    from botocore import exceptions as be
    where = f"{settings.endpoint_name} (bucket {location.bucket})"
    what = f"{op} {location.key(key)}" if key is not None else op
    budget = waited if waited is not None else settings.connect_timeout * settings.max_attempts
    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return NoSuchBucket(f"bucket {location.bucket} does not exist at {settings.endpoint_name}"
                                f" ({what})")
        if code in MISSING_CODES:
            return ObjectMissing(f"{location.key(key or '')} is missing from bucket "
                                 f"{location.bucket} at {settings.endpoint_name}")
        if code in CREDENTIAL_CODES:
            return AccessDenied(f"the S3 endpoint {where} refused {what} ({code}): check "
                                "BLOCKVAULT_S3_ACCESS_KEY_ID / BLOCKVAULT_S3_SECRET_ACCESS_KEY (or the "
                                "--credentials file) and that this user may use the bucket")
        return S3Error(f"the S3 endpoint {where} failed {what}: {code or status} "
                       f"{err.get('Message') or ''}".rstrip() + f" (after up to {settings.max_attempts} "
                       "attempts)")
    if isinstance(exc, be.SSLError):
        found = re.search(r"\] ([^(]*?)\s*\(_ssl", str(exc))
        reason = found.group(1) if found else "the TLS handshake failed"
        return EndpointUntrusted(f"the TLS certificate of the S3 endpoint {where} is not trusted "
                                 f"({reason[:160]}): give the CA certificate that signs it (PEM) with --ca-file "
                                 "FILE or BLOCKVAULT_S3_CA_FILE")
    if isinstance(exc, be.ReadTimeoutError) and op == "PUT":
        return EndpointFull(f"the S3 endpoint {where} took the upload {what} but did not answer within "
                            f"{settings.read_timeout:g} s ({settings.max_attempts} attempts): a full "
                            "Ceph cluster holds writes this way; check its free space (ceph df) and run the "
                            "command again")
    if isinstance(exc, (be.ConnectionError, be.HTTPClientError, be.ResponseStreamingError, OSError)) or \
            type(exc).__module__.startswith("urllib3"):
        return EndpointUnavailable(f"the S3 endpoint {where} did not answer within {budget:.0f} s "
                                   f"({what}: {type(exc).__name__}); check that it runs and is reachable, "
                                   "then run the command again")
    if isinstance(exc, be.NoCredentialsError):
        return AccessDenied(f"no S3 credentials for {where}: set BLOCKVAULT_S3_ACCESS_KEY_ID and "
                            "BLOCKVAULT_S3_SECRET_ACCESS_KEY, or pass --credentials FILE")
    if isinstance(exc, be.BotoCoreError):
        return S3Error(f"the S3 request {what} to {where} failed: {type(exc).__name__}")
    return exc


class ResponseStream:
    """A GET body read in pieces, with the transport's errors translated."""

    def __init__(self, body, fail):
        self._body, self._fail = body, fail     # fail(exc) -> the StoreError to raise

    def read(self, n: int = -1) -> bytes:
        try:
            return self._body.read(None if n is None or n < 0 else n)
        except Exception as exc:  # noqa: BLE001 - urllib3 and botocore raise several unrelated types
            raise self._fail(exc) from None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self._body.close()
        except Exception:  # noqa: BLE001 - closing a broken connection cannot fail the caller
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
