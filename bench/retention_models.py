"""What each tool's retention policy should keep, computed independently of the tools.

The lifecycle bench runs the same `keep-daily / keep-weekly / keep-monthly` policy
through blockvault, restic and borg, and then reads back which points each one
kept.  The three tools do not read the policy the same way, so the bench holds
each tool to a model of its own documented semantics, and holds two tools to
each other only where their models give the same set:

* blockvault (Proxmox Backup Server's rules, issue 10): the rules run in order;
  a rule skips every bucket that already holds a point kept by an earlier rule,
  keeps the newest point of each other bucket, spends one of its count on it,
  and marks the bucket's other points removed (no later rule looks at them).
* restic: every rule looks at every snapshot, newest first, independently: a
  rule keeps a snapshot when its bucket differs from the last bucket that rule
  kept, and spends one of its count; a snapshot is kept if any rule keeps it.
* borg 1.2: the rules run in order over the archives, newest first; a rule
  spends one of its count on each new bucket whose newest archive no earlier
  rule kept (a bucket whose newest archive is already kept is passed over
  without spending); if a rule ends short of its count it also keeps the
  oldest archive (borg 1.2's "keep oldest" addition).

Buckets: day `%Y-%m-%d`, ISO week `%G-%V`, month `%Y-%m`, in the time zone the
points' datetimes carry (the bench uses UTC for every tool).
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable, Sequence

Point = tuple[int, _dt.datetime]  # (key, time): a night number and when it was taken

BUCKETS: dict[str, Callable[[_dt.datetime], str]] = {
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: t.strftime("%G-%V"),
    "monthly": lambda t: t.strftime("%Y-%m"),
}
ORDER = ("daily", "weekly", "monthly")


def _newest_first(points: Sequence[Point]) -> list[Point]:
    return sorted(points, key=lambda p: p[1], reverse=True)


def _rules(policy: dict[str, int]) -> list[tuple[str, int]]:
    unknown = set(policy) - set(ORDER)
    if unknown:
        raise ValueError(f"the models know daily, weekly and monthly only, not {sorted(unknown)}")
    return [(r, policy[r]) for r in ORDER if policy.get(r)]


def keep_pbs(points: Sequence[Point], policy: dict[str, int]) -> set[int]:
    """blockvault's (PBS's) kept keys; the newest point is always kept.

    A point a rule passed over inside a bucket it kept is marked removed, and
    later rules no longer look at it (so a month's newest point can be lost to
    the week that straddles the month's end)."""
    pts = _newest_first(points)
    kept: set[int] = set()
    removed: set[int] = set()
    for rule, count in _rules(policy):
        bucket = BUCKETS[rule]
        taken = {bucket(t) for k, t in pts if k in kept}
        seen: set[str] = set()
        for k, t in pts:
            if k in kept or k in removed:
                continue
            b = bucket(t)
            if b in taken:
                continue
            if b in seen:
                removed.add(k)
                continue
            if len(seen) >= count:
                break
            seen.add(b)
            kept.add(k)
    if pts:
        kept.add(pts[0][0])
    return kept


def keep_restic(points: Sequence[Point], policy: dict[str, int]) -> set[int]:
    """restic forget's kept keys (every rule over every snapshot)."""
    left = dict(_rules(policy))
    last: dict[str, str | None] = {r: None for r in left}
    kept: set[int] = set()
    for k, t in _newest_first(points):
        for rule in left:
            if left[rule] <= 0:
                continue
            b = BUCKETS[rule](t)
            if b != last[rule]:
                last[rule] = b
                left[rule] -= 1
                kept.add(k)
    return kept


def keep_borg(points: Sequence[Point], policy: dict[str, int]) -> set[int]:
    """borg 1.2 prune's kept keys."""
    pts = _newest_first(points)
    kept: set[int] = set()
    for rule, count in _rules(policy):
        bucket = BUCKETS[rule]
        last = None
        spent = 0
        for k, t in pts:
            b = bucket(t)
            if b == last:
                continue
            last = b
            if k in kept:
                continue
            kept.add(k)
            spent += 1
            if spent == count:
                break
        if spent < count and pts and pts[-1][0] not in kept:
            kept.add(pts[-1][0])
    return kept


MODELS = {"blockvault": keep_pbs, "restic": keep_restic, "borg": keep_borg}
