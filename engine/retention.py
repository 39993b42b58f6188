"""Which points a retention policy keeps: Proxmox Backup Server's rules, plus
restic's ``--keep-within``.  Pure: points and a policy in, decisions out.

PBS's semantics are what VM administrators reason with, and they are
*cumulative*: the rules run one after the other, in the order last, hourly,
daily, weekly (ISO week), monthly, yearly, and each covers only what the
earlier ones left.  For one rule, newest point first:

* a point already decided (kept or removed by an earlier rule) is passed;
* a point whose bucket (its hour, day, ISO week, month, year) already holds
  a point an earlier rule kept is passed too, and costs this rule nothing:
  ``keep-daily 7 keep-weekly 4`` keeps seven days and then four weeks that
  hold no kept day, not four weeks counted from today;
* otherwise the first point of a new bucket is kept and spends one of the
  rule's count ("daily 3/7"); the other points of a bucket this rule kept
  are removed (a coarser rule after it does not get them);
* once the count is spent the rule stops, leaving older points to the next.

What no rule keeps is removed.  Ours on top of PBS's:

* ``within`` (restic's ``--keep-within``) keeps every point newer than the
  group's newest point minus the duration (never "now": a store whose
  backups stopped keeps its last ones).  It runs *before* the rules, as
  their first and cumulative member: ``--keep-within 2d --keep-daily 7``
  keeps two days of everything and then seven older days.
* Protected points are never removed, and, as in PBS (pbs-datastore
  ``prune.rs``: a protected point is marked Protected, never Keep), they
  neither spend a rule's count nor claim their bucket for the later rules:
  protecting an old point does not shorten the history the rules keep.
* The newest point of a chain (the one the next incremental builds on) is
  kept when no rule keeps it, unless ``allow_remove_newest``.
* Keep-last's buckets are the points themselves (PBS uses the time to the
  second: two points of the same second would be one bucket).

Buckets are wall-clock in one IANA zone, given explicitly, PBS's strftime
buckets: the autumn hour that happens twice is one hourly bucket, the
spring hour that does not happen is none.  An empty policy is refused by
the caller (restic's rule, against PBS's silent keep-everything).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, fields
from typing import Callable, Iterable
from zoneinfo import ZoneInfo

from engine.errors import UsageError

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_PART = re.compile(r"(\d+)([ymdh])")


@dataclass(frozen=True)
class Within:
    """restic's duration: years, months, days and hours, as calendar steps back
    from the newest point in the policy's zone (months as Go's AddDate: one
    month before 31 March is 3 March)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> "Within":
        raw = (text or "").strip()
        parts = _PART.findall(raw) if raw.isascii() else []
        units = [u for _, u in parts]
        if not parts or "".join(n + u for n, u in parts) != raw or len(set(units)) != len(units):
            raise UsageError(f"--keep-within {text!r}: write a duration as restic does, numbers with y (years), "
                             "m (months), d (days), h (hours), e.g. 2d, 36h, 1y6m")
        got = {u: int(n) for n, u in parts}
        within = cls(got.get("y", 0), got.get("m", 0), got.get("d", 0), got.get("h", 0))
        if not any((within.years, within.months, within.days, within.hours)):
            raise UsageError(f"--keep-within {text!r} keeps nothing; give a duration above 0")
        return within

    def __str__(self) -> str:
        return "".join(f"{n}{u}" for n, u in ((self.years, "y"), (self.months, "m"), (self.days, "d"),
                                               (self.hours, "h")) if n)

    def limit(self, newest: float, tz: ZoneInfo) -> float:
        """The unix time a point must be newer than (strictly) to be kept."""
        dt = datetime.datetime.fromtimestamp(newest, tz)
        month0 = dt.year * 12 + (dt.month - 1) - self.years * 12 - self.months
        year, month = divmod(month0, 12)
        wall = (datetime.datetime(year, month + 1, 1, dt.hour, dt.minute, dt.second, dt.microsecond)
                + datetime.timedelta(days=dt.day - 1 - self.days))
        return wall.replace(tzinfo=tz, fold=0).timestamp() - self.hours * 3600


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Within | None = None

    def __post_init__(self):
        for name in RULES:
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise UsageError(f"--keep-{name} {n!r}: give a whole number of 0 or more")

    @property
    def empty(self) -> bool:
        return self.within is None and not any(getattr(self, name) for name in RULES)

    def options(self) -> str:
        """The policy as command-line options, e.g. ``--keep-daily 7 --keep-weekly 4``."""
        out = [f"--keep-{name} {getattr(self, name)}" for name in RULES if getattr(self, name)]
        if self.within is not None:
            out.insert(0, f"--keep-within {self.within}")
        return " ".join(out)

    def as_dict(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name in RULES}
        doc["within"] = str(self.within) if self.within else None
        return doc


@dataclass(frozen=True)
class Candidate:
    """A point as retention sees it: an id, a time, an order among equal
    times (its sequence number) and whether it is protected."""

    id: str
    time: float
    seq: int = 0
    protected: bool = False


@dataclass
class Decision:
    id: str
    time: float
    keep: bool
    reason: str            # "daily 3/7", "protected", "within 2d", "newest of chain"; for a removal why
    rule: str | None = None  # the rule that decided: a RULES name, "within", "protected", "newest", or None
    bucket: str | None = None  # the bucket of that rule it was kept or removed in


def bucket_function(rule: str, tz: ZoneInfo) -> Callable[[Candidate], str]:
    """The bucket a point falls in for ``rule``, as text (wall clock in ``tz``)."""
    def local(p: Candidate) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(p.time, tz)

    if rule == "last":
        return lambda p: p.id
    if rule == "hourly":
        return lambda p: local(p).strftime("%Y-%m-%dT%H")
    if rule == "daily":
        return lambda p: local(p).strftime("%Y-%m-%d")
    if rule == "weekly":
        def week(p: Candidate) -> str:
            year, number, _ = local(p).isocalendar()
            return f"{year}-W{number:02d}"
        return week
    if rule == "monthly":
        return lambda p: local(p).strftime("%Y-%m")
    if rule == "yearly":
        return lambda p: local(p).strftime("%Y")
    raise ValueError(rule)


def decide(points: Iterable[Candidate], policy: Policy, tz: ZoneInfo, newest_id: str | None = None,
           allow_remove_newest: bool = False) -> list[Decision]:
    """One group's points (one disk's or one VM's chain) -> a decision for each,
    newest first.  ``newest_id`` is the point the chain's next backup builds on."""
    if policy.empty:
        raise UsageError("an empty retention policy would remove every point; give at least one --keep-... "
                         "option (restic's rule: nothing is read as 'keep everything')")
    order = sorted(points, key=lambda p: (p.time, p.seq), reverse=True)
    marks: dict[str, Decision] = {}
    for p in order:
        if p.protected:
            marks[p.id] = Decision(p.id, p.time, True, "protected", "protected")
    if policy.within is not None and order:
        limit = policy.within.limit(order[0].time, tz)
        for p in order:
            if p.id not in marks and p.time > limit:
                marks[p.id] = Decision(p.id, p.time, True, f"within {policy.within}", "within")
    for rule in RULES:
        count = getattr(policy, rule)
        if count:
            _apply_rule(order, marks, rule, count, bucket_function(rule, tz))
    for p in order:
        if p.id not in marks:
            marks[p.id] = Decision(p.id, p.time, False, "no rule keeps it")
    if newest_id in marks and not marks[newest_id].keep and not allow_remove_newest:
        d = marks[newest_id]
        marks[newest_id] = Decision(d.id, d.time, True, "newest of chain", "newest")
    return [marks[p.id] for p in order]


def _apply_rule(order: list[Candidate], marks: dict[str, Decision], rule: str, count: int,
                bucket: Callable[[Candidate], str]) -> None:
    # Buckets of points an earlier rule (or within) kept: passed over, free of charge.
    # Protected points are not kept by a rule, so their buckets stay open (PBS).
    already = {bucket(p) for p in order
               if p.id in marks and marks[p.id].keep and marks[p.id].rule not in ("protected",)}
    taken: dict[str, str] = {}
    for p in order:
        if p.id in marks:
            continue
        b = bucket(p)
        if b in already:
            continue
        if b not in taken:
            if len(taken) >= count:
                break
            taken[b] = p.id
            marks[p.id] = Decision(p.id, p.time, True, f"{rule} {len(taken)}/{count}", rule, b)
        else:
            marks[p.id] = Decision(p.id, p.time, False, f"{rule}: {taken[b]} is kept for {b}", rule, b)
