"""The ways a chunk store can refuse or fail.

One root, ``StoreError``, so the CLI can turn every expected failure into a
message and an exit code; everything else is a bug and keeps its traceback.
Messages name the store, the object and the cause, and say what to do.
"""


class StoreError(Exception):
    """Base of every expected chunk-store failure."""

    exit_code = 1


class NotAStoreError(StoreError):
    """The directory holds no blockvault store."""


class FormatVersionError(StoreError):
    """The store was written by a newer (or unknown) format version."""


class StoreUrlError(StoreError):
    """A URL (s3://, sftp://...) where a store directory was expected: refused,
    not made into a local directory named after its scheme."""

    exit_code = 2


class StoreExistsError(StoreError):
    """init was pointed at a directory that is not empty."""


class StoreLockedError(StoreError):
    """Another writer holds the store."""

    exit_code = 4


class ChunkNotFound(StoreError):
    """A digest that the index does not know."""


class IntegrityError(StoreError):
    """Bytes at rest do not match their checksum, digest or framing."""


class ConfigError(StoreError):
    """A store setting out of range or malformed."""


class UnsafePathError(StoreError):
    """A symbolic link, device node or other non-regular file where a store
    (or a restore) opens or creates a file: refused, never followed."""


class StoreReadOnlyError(StoreError):
    """A writer was asked of a store that cannot be written (a read-only mount)."""


class IndexDamagedError(IntegrityError):
    """The LMDB file is truncated or is not an LMDB file: mapping it would
    crash the process (SIGBUS), so it is refused before it is opened."""


class ConfigMismatchError(StoreError):
    """config.json disagrees with the settings every pack header carries."""


# --- object storage (chunkstore/s3bucket.py, lease.py, s3check.py) ----------------------------
# Messages name the endpoint and the bucket, never a key or secret.

class S3Error(StoreError):
    """An S3 request failed (after its bounded retries)."""


class EndpointUnavailable(S3Error):
    """The endpoint did not answer (connection refused, reset or timed out) after retries."""


class EndpointUntrusted(S3Error):
    """The endpoint's TLS certificate is not trusted (or not for that name)."""


class EndpointFull(S3Error):
    """An upload was accepted but never answered: a full Ceph cluster holds writes this way."""


class AccessDenied(S3Error):
    """The endpoint refused the credentials or the request."""


class NoSuchBucket(S3Error):
    """The bucket does not exist."""


class ObjectMissing(S3Error):
    """An object the store needs is not in the bucket."""

    exit_code = 3


class ObjectLocked(S3Error):
    """Object lock (a COMPLIANCE retention) forbids deleting the object until its date."""


class EndpointUnsafe(S3Error):
    """The endpoint ignores conditional writes (If-None-Match / If-Match): two writers could
    overwrite each other's objects, so the store refuses to run there."""


class LeaseHeld(S3Error):
    """Another host holds the store's lease (it owns the bucket's store)."""

    exit_code = 4

    def __init__(self, message: str, holder: str = "", age: float = 0.0, host_id: str = ""):
        super().__init__(message)
        self.holder = holder
        self.age = age
        self.host_id = host_id


class LeaseLost(S3Error):
    """The lease was taken over while this command ran: it must stop before committing."""

    exit_code = 4


class KeyRequiredError(StoreError):
    """An encrypted store was opened without a key (no passphrase, no key file)."""

    exit_code = 2


class WrongKeyError(StoreError):
    """The passphrase or key file given does not open this store."""

    exit_code = 1
