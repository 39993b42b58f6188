"""Where an S3 store is, and how to reach it: the store URL and the client settings.

A store on object storage is named ``s3://BUCKET/PREFIX``; everything else the client
needs (endpoint, region, keys, CA file) comes from the environment or a credentials
file, never from argv: a command line is visible to every user of the machine (ps,
/proc/PID/cmdline) and ends up in shell histories and logs.  The secret key is kept
out of every repr and message, so a traceback or a debug log cannot leak it.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from chunkstore.errors import ConfigError, StoreUrlError

SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_ATTEMPTS = 4

ENV_ENDPOINT = "BLOCKVAULT_S3_ENDPOINT"
ENV_REGION = "BLOCKVAULT_S3_REGION"
ENV_ACCESS_KEY = "BLOCKVAULT_S3_ACCESS_KEY_ID"
ENV_SECRET_KEY = "BLOCKVAULT_S3_SECRET_ACCESS_KEY"
ENV_CA_FILE = "BLOCKVAULT_S3_CA_FILE"
ENV_CONNECT_TIMEOUT = "BLOCKVAULT_S3_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "BLOCKVAULT_S3_READ_TIMEOUT"
ENV_MAX_ATTEMPTS = "BLOCKVAULT_S3_MAX_ATTEMPTS"

# S3 bucket naming rules (the subset every implementation accepts): 3-63 characters,
# lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_FILE_KEYS = {"access_key_id", "secret_access_key", "region", "endpoint"}


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix inside it (no leading or trailing '/'; may be empty)."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, relative: str) -> str:
        """The full object key of a key relative to the store's prefix."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return self.url


def is_store_url(text: str) -> bool:
    return isinstance(text, str) and text.lower().startswith(SCHEME)


def parse_store_url(text: str) -> S3Location | None:
    """``s3://BUCKET[/PREFIX]`` as an S3Location; None for anything that is not an s3 URL
    (a local path).  A malformed s3 URL is a usage error (exit 2) saying what is wrong."""
    if not is_store_url(text):
        return None
    rest = text[len(SCHEME):]
    if "@" in rest.split("/", 1)[0]:
        # s3://KEY:SECRET@bucket: never echo it, the user just put a secret on the command line
        raise StoreUrlError("an s3:// store URL must not carry credentials (KEY:SECRET@): give them in "
                            f"{ENV_ACCESS_KEY} / {ENV_SECRET_KEY} or --credentials FILE, never on the command line")
    if any(c in rest for c in "?#\\") or any(ord(c) < 0x21 for c in rest):
        raise StoreUrlError(f"{text}: an s3:// store URL is s3://BUCKET/PREFIX (no query, fragment, spaces "
                            "or backslashes)")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreUrlError(f"{text}: the URL names no bucket: write s3://BUCKET/PREFIX")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StoreUrlError(f"{text}: {bucket!r} is not a valid bucket name (3-63 characters: lower-case "
                            "letters, digits, '.' and '-', starting and ending with a letter or digit)")
    if rest.endswith("/"):
        fixed = f"{SCHEME}{bucket}/{prefix.rstrip('/')}".rstrip("/")
        raise StoreUrlError(f"{text}: a store URL has no trailing '/': write {fixed}")
    if prefix:
        parts = prefix.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise StoreUrlError(f"{text}: the prefix has an empty, '.' or '..' part; write s3://BUCKET/a/b")
        if len(prefix.encode()) > 512:
            raise StoreUrlError(f"{text}: the prefix is longer than 512 bytes")
    return S3Location(bucket, prefix)


def _read_credentials_file(path: str) -> dict[str, str]:
    """``key = value`` lines (``#`` comments); refused when other users may read it."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"credentials file {path} is not a regular file")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"credentials file {path} is open to other users (mode "
                                  f"{stat.S_IMODE(mode):04o}) and holds a secret key: chmod 600 {path}, "
                                  "then run the command again")
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read credentials file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"credentials file {path} is not UTF-8 text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep or key not in _FILE_KEYS:
            # the line may hold the secret itself: name only its number
            raise ConfigError(f"credentials file {path}, line {number}: expected 'NAME = VALUE' with NAME one of "
                              f"{', '.join(sorted(_FILE_KEYS))}")
        values[key] = value.strip()
    return values


def _number(env, name: str, default: float, kind=float):
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name} must be greater than 0 (got {text})")
    return value


@dataclass(frozen=True, repr=False)
class S3Settings:
    """How to reach the endpoint.  ``access_key``/``secret_key`` None: boto3's own chain
    (AWS_* variables, ~/.aws) supplies them; ``endpoint`` None: boto3's default (AWS)."""

    endpoint: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    ca_file: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __repr__(self) -> str:
        secret = "<set>" if self.secret_key else None
        return (f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r}, access_key={self.access_key!r}, "
                f"secret_key={secret!r}, ca_file={self.ca_file!r}, connect_timeout={self.connect_timeout}, "
                f"read_timeout={self.read_timeout}, max_attempts={self.max_attempts})")

    __str__ = __repr__

    def as_env(self) -> dict[str, str]:
        """These settings as the BLOCKVAULT_S3_* variables ``resolve`` reads back: how a child
        process (nbdkit's plugin) gets them without a command line."""
        env = {ENV_REGION: self.region, ENV_CONNECT_TIMEOUT: repr(self.connect_timeout),
               ENV_READ_TIMEOUT: repr(self.read_timeout), ENV_MAX_ATTEMPTS: str(self.max_attempts)}
        for name, value in ((ENV_ENDPOINT, self.endpoint), (ENV_ACCESS_KEY, self.access_key),
                            (ENV_SECRET_KEY, self.secret_key), (ENV_CA_FILE, self.ca_file)):
            if value:
                env[name] = value
        return env

    @property
    def endpoint_name(self) -> str:
        """The endpoint for messages."""
        return self.endpoint or "the default AWS S3 endpoint"

    @classmethod
    def resolve(cls, endpoint: str | None = None, credentials_file: str | None = None,
                ca_file: str | None = None, env=None) -> "S3Settings":
        """Explicit arguments (and the credentials file, which the user named explicitly)
        first, then BLOCKVAULT_S3_*, then whatever boto3 finds itself."""
        env = os.environ if env is None else env
        from_file = _read_credentials_file(credentials_file) if credentials_file else {}
        endpoint = endpoint or from_file.get("endpoint") or env.get(ENV_ENDPOINT) or None
        region = (from_file.get("region") or env.get(ENV_REGION) or env.get("AWS_REGION")
                  or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION)
        if "access_key_id" in from_file or "secret_access_key" in from_file:
            access, secret = from_file.get("access_key_id"), from_file.get("secret_access_key")
            if not access or not secret:
                raise ConfigError(f"credentials file {credentials_file} needs both an access_key_id and a "
                                  "secret_access_key line")
        else:
            access, secret = env.get(ENV_ACCESS_KEY) or None, env.get(ENV_SECRET_KEY) or None
            if bool(access) != bool(secret):
                missing = ENV_SECRET_KEY if access else ENV_ACCESS_KEY
                raise ConfigError(f"{ENV_ACCESS_KEY} and {ENV_SECRET_KEY} go together: {missing} is not set")
        if endpoint is not None:
            if not re.match(r"^https?://[^/\s@]+(/.*)?$", endpoint):
                raise ConfigError(f"S3 endpoint {endpoint!r} is not an http:// or https:// URL "
                                  "(e.g. https://s3.example.net or http://127.0.0.1:7480)")
            endpoint = endpoint.rstrip("/")
        ca_file = ca_file or env.get(ENV_CA_FILE) or None
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ConfigError(f"CA file {ca_file} does not exist (or is not a file): give a PEM file of the "
                              "certificates that sign the endpoint's TLS certificate")
        return cls(endpoint=endpoint, region=region, access_key=access, secret_key=secret, ca_file=ca_file,
                   connect_timeout=_number(env, ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT),
                   read_timeout=_number(env, ENV_READ_TIMEOUT, DEFAULT_READ_TIMEOUT),
                   max_attempts=_number(env, ENV_MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS, int))
