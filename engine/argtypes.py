"""Value types for command-line options: nonsense is a usage error (exit 2).

argparse turns an ``ArgumentTypeError`` into ``blockvault: error: argument
--threads: ...`` and exit code 2 before anything is opened, so ``--threads
0``, ``--wait -5`` or ``--chunk-size 3M`` never reach a store.  Each message
says what is accepted.
"""

from __future__ import annotations

import argparse
import math

from chunkstore.config import MAX_CHUNK_SIZE, MAX_COMPRESSION_LEVEL, MIN_CHUNK_SIZE, MIN_COMPRESSION_LEVEL
from chunkstore.errors import ConfigError

MAX_THREADS = 256  # beyond this the pipelines' buffers in flight alone take gigabytes
MIN_DEMO_SIZE = 1 << 20


def _number(text: str, kind, what: str):
    """ASCII only: int() and float() also take "٣" (an Arabic-Indic 3) and full-width digits."""
    try:
        if not text.isascii():
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def threads(text: str) -> int:
    n = _number(text, int, "a whole number of threads")
    if not 1 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text} threads: give 1 to {MAX_THREADS} (or leave it out for the default)")
    return n


def wait_seconds(text: str) -> float:
    """0 (fail at once), a number of seconds, or ``inf`` (as long as it takes)."""
    s = _number(text, float, "a number of seconds")
    if math.isnan(s) or s < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 or more seconds (inf waits as long as it takes)")
    return s


def timeout_seconds(text: str) -> float:
    s = _number(text, float, "a number of seconds")
    if not (math.isfinite(s) and s > 0):
        raise argparse.ArgumentTypeError(f"{text}: give a number of seconds above 0")
    return s


def share(text: str) -> float:
    value = _number(text, float, "a share between 0 and 1 (e.g. 0.01 for 1%)")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (e.g. 0.01 for 1%)")
    return value


def compression_level(text: str) -> int:
    n = _number(text, int, "a zstd level (a whole number)")
    if not MIN_COMPRESSION_LEVEL <= n <= MAX_COMPRESSION_LEVEL:
        raise argparse.ArgumentTypeError(
            f"zstd level {n} is outside {MIN_COMPRESSION_LEVEL}..{MAX_COMPRESSION_LEVEL}")
    return n


def _size(text: str) -> int:
    from chunkstore import parse_size
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def chunk_size(text: str) -> int:
    n = _size(text)
    if not MIN_CHUNK_SIZE <= n <= MAX_CHUNK_SIZE or n & (n - 1):
        raise argparse.ArgumentTypeError(
            f"{text} is not a power of two between 64K and 8M; pick one of 64K, 128K, 256K, 512K, 1M, 2M, 4M, 8M")
    return n


def demo_size(text: str) -> int:
    n = _size(text)
    if n < MIN_DEMO_SIZE:
        raise argparse.ArgumentTypeError(f"{text}: the demo image needs at least 1M")
    return n


def file_mode(text: str) -> int:
    """Permissions of a new file, in octal as chmod takes them: 600, 0644, 0o640."""
    t = text.strip().lower().removeprefix("0o")
    if not t or len(t) > 4 or any(c not in "01234567" for c in t):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode; write it in octal like chmod: 600, 0640")
    mode = int(t, 8)
    if mode > 0o777:
        raise argparse.ArgumentTypeError(f"{text}: give permission bits only (0000 to 0777, no setuid/sticky)")
    return mode


TIME_HELP = ("the point's recorded time, ISO 8601: 2026-11-30T23:30:00+01:00, 2026-11-30T22:30Z, or without "
             "an offset (2026-11-30 23:30) in the host's time zone (TZ, else /etc/localtime); default: now. "
             "Retention (forget) works on it; it may not be older than the chain's newest point")


def point_time(text: str) -> float:
    """``--time``: a unix time (engine/timezones.py says what a time without an offset means)."""
    from engine.errors import UsageError
    from engine.timezones import parse_time
    try:
        return parse_time(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--time ")) from None


def count(text: str) -> int:
    """A retention count: a whole number, 0 or more (0: the rule is off)."""
    n = _number(text, int, "a whole number")
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 or more")
    return n


def sample_count(text: str) -> int:
    """--verify-target: how many chunks of a rollback's target are read first (0 to 4096)."""
    n = _number(text, int, "a whole number of chunks")
    if not 0 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"{text} chunks: give 0 (no check) to 4096")
    return n


def cache_size(text: str) -> int:
    """A decoded-chunk cache size for serve and mount: 0 (none) up to 64G."""
    n = _size(text)
    if not 0 <= n <= 64 << 30:
        raise argparse.ArgumentTypeError(f"{text}: give a cache size from 0 to 64G (e.g. 256M)")
    return n


def port(text: str) -> int:
    n = _number(text, int, "a TCP port number")
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port {n} is outside 1..65535")
    return n


def unused_share(text: str) -> float:
    """gc's --max-unused: 5%, 0.05."""
    t = text.strip()
    value = _number(t[:-1], float, "a share like 5% or 0.05") / 100 if t.endswith("%") else \
        _number(t, float, "a share like 5% or 0.05")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share of the stored bytes from 0% to 100%")
    return value


def byte_size(text: str) -> int:
    """A number of bytes, with K, M, G or T (binary units): 512M, 10G."""
    return _size(text)
