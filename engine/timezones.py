"""Time zones and point times: what ``--time`` and ``--tz`` mean.

A point's time is a unix time.  Two things need a zone: reading a
``--time`` written without an offset, and cutting time into retention
buckets (engine/retention.py: "which day is this point of").  Both use the
same rule so that ``backup --time 2026-11-30T23:30`` is a point of
2026-11-30 for a ``forget`` run on the same host: the zone is ``--tz`` when
given, else the host's (``TZ``, else ``/etc/localtime``, else UTC, which is
what the C library does too).  Zones are IANA names read with ``zoneinfo``,
so a bucket does not move when the host's offset changes with DST.
"""

from __future__ import annotations

import datetime
import os
import zoneinfo

from engine.errors import UsageError

_ZONEINFO_DIRS = ("/usr/share/zoneinfo/", "/usr/lib/zoneinfo/", "/usr/share/lib/zoneinfo/")


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name`` (``Europe/Berlin``, ``UTC``), or a usage error saying what to give."""
    try:
        if not name or name != name.strip() or ".." in name:
            raise ValueError(name)
        return zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError, OSError):
        raise UsageError(f"--tz {name!r} is not a time zone this host knows; give an IANA name such as "
                         "Europe/Berlin, America/New_York or UTC (see /usr/share/zoneinfo)") from None


def host_zone() -> zoneinfo.ZoneInfo:
    """The host's zone: ``TZ`` if it names a zone, else what ``/etc/localtime``
    links to, else UTC.  A ``TZ`` in POSIX form (``CET-1CEST``) has no IANA
    name; it is not guessed at: give ``--tz``."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz:
        try:
            return zoneinfo.ZoneInfo(tz)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError, OSError):
            if tz.startswith("/"):
                named = _name_of_file(tz)
                if named:
                    return named
            raise UsageError(f"TZ={tz!r} is no IANA zone name; give --tz ZONE (e.g. --tz Europe/Berlin)") from None
    named = _name_of_file("/etc/localtime")
    return named or zoneinfo.ZoneInfo("UTC")


def _name_of_file(path: str) -> zoneinfo.ZoneInfo | None:
    try:
        real = os.path.realpath(path)
    except OSError:
        return None
    for base in _ZONEINFO_DIRS:
        if real.startswith(base):
            try:
                return zoneinfo.ZoneInfo(real[len(base):])
            except (ValueError, zoneinfo.ZoneInfoNotFoundError, OSError):
                return None
    return None


def zone_or_host(name: str | None) -> zoneinfo.ZoneInfo:
    return zone(name) if name else host_zone()


def parse_time(text: str, tz: zoneinfo.ZoneInfo | None = None) -> float:
    """ISO 8601 (``2026-11-30T23:30:00+01:00``, ``...Z``, ``2026-11-30 23:30``,
    ``2026-11-30``) as a unix time.  Without an offset the wall time is read
    in ``tz`` (default: the host's zone); a wall time the zone has twice (the
    autumn hour) is the first of the two, one it skips (the spring hour) is
    read with the offset before the change."""
    raw = (text or "").strip()
    try:
        if not raw.isascii():
            raise ValueError(raw)
        when = datetime.datetime.fromisoformat(raw)
    except ValueError:
        raise UsageError(f"--time {text!r} is not an ISO 8601 time; write e.g. 2026-11-30T23:30:00+01:00, "
                         "2026-11-30T22:30:00Z or 2026-11-30 23:30 (no offset: the host's time zone)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz or host_zone(), fold=0)
    return when.timestamp()


def local(t: float, tz: zoneinfo.ZoneInfo) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, tz)


def shown(t: float, tz: zoneinfo.ZoneInfo) -> str:
    """``2026-11-30 23:30:00 CET``: how tables show a point's time in a zone."""
    return local(t, tz).strftime("%Y-%m-%d %H:%M:%S %Z")
