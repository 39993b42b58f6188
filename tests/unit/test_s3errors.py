"""The CLI's codes and exit statuses for the S3 failures (docs/JSON.md lists them)."""

import pytest

from chunkstore import errors as se
from engine.commandline import describe_failure, error_code


@pytest.mark.parametrize("exc, code, status", [
    (se.LeaseHeld("held by web01 1234 for 12 s", holder="web01 1234", age=12.0), "lease_held", 4),
    (se.LeaseLost("taken over"), "lease_lost", 4),
    (se.EndpointUnavailable("no answer"), "s3_unavailable", 1),
    (se.EndpointFull("hung"), "s3_full", 1),
    (se.EndpointUntrusted("self-signed"), "s3_certificate", 1),
    (se.AccessDenied("refused"), "s3_access_denied", 1),
    (se.NoSuchBucket("none"), "s3_no_bucket", 1),
    (se.ObjectMissing("gone"), "s3_object_missing", 3),
    (se.ObjectLocked("locked"), "s3_object_locked", 1),
    (se.EndpointUnsafe("ignores If-None-Match"), "s3_unsafe", 1),
    (se.S3Error("other"), "s3_error", 1),
])
def test_s3_failures_have_their_code_and_exit_status(exc, code, status):
    assert error_code(exc) == code
    got_code, message, exit_code, _ = describe_failure(exc)
    assert (got_code, exit_code, message) == (code, status, str(exc))
