"""Golden vectors for engine/retention.py (issue 10, item 2): points at given
times -> what is kept, and why.  Every expected table below was worked out by
hand from PBS's rules (see the module's docstring), with the calendar facts
it needs written next to it."""

from __future__ import annotations

import datetime
import zoneinfo

import pytest

from engine.errors import UsageError
from engine.retention import Candidate, Policy, Within, decide

UTC = zoneinfo.ZoneInfo("UTC")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def at(text: str, tz=UTC) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def points(*spec, tz=UTC, protected=()) -> list[Candidate]:
    """("id", "YYYY-MM-DD HH:MM") pairs, oldest first; seq in that order."""
    return [Candidate(pid, at(when, tz), seq, pid in protected) for seq, (pid, when) in enumerate(spec, 1)]


def table(decisions) -> list[tuple[str, str]]:
    """(id, reason) newest first, with "-" in front of a removal's reason."""
    return [(d.id, d.reason if d.keep else "- " + d.reason) for d in decisions]


def test_daily_then_weekly_is_cumulative_not_overlapping():
    # 20 nightly points, 2026-11-01 .. 11-20.  ISO weeks: W44 ends Sun 11-01, W45 = 11-02..08,
    # W46 = 11-09..15, W47 = 11-16..22.  The 7 dailies (11-14..20) cover W46 and W47, so weekly
    # passes 11-09..13 free of charge and keeps the newest of W45 (11-08) and of W44 (11-01).
    pts = points(*[(f"p{d:02d}", f"2026-11-{d:02d} 22:00") for d in range(1, 21)])
    got = table(decide(pts, Policy(daily=7, weekly=4), UTC))
    want = [(f"p{d}", f"daily {21 - d}/7") for d in range(20, 13, -1)]
    want += [(f"p{d:02d}", "- no rule keeps it") for d in range(13, 8, -1)]
    want += [("p08", "weekly 1/4")] + [(f"p0{d}", "- weekly: p08 is kept for 2026-W45") for d in range(7, 1, -1)]
    want += [("p01", "weekly 2/4")]
    assert got == want


def test_several_points_in_one_bucket_last_daily_monthly():
    pts = points(("h", "2026-09-01 12:00"), ("g", "2026-10-15 12:00"), ("f", "2026-10-31 12:00"),
                 ("e", "2026-11-28 12:00"), ("d", "2026-11-29 12:00"), ("c", "2026-11-30 01:00"),
                 ("b", "2026-11-30 12:00"), ("a", "2026-11-30 23:00"))
    got = table(decide(pts, Policy(last=2, daily=2, monthly=2), UTC))
    assert got == [
        ("a", "last 1/2"), ("b", "last 2/2"),
        ("c", "- no rule keeps it"),          # its day already has kept points (a, b): daily passes it
        ("d", "daily 1/2"), ("e", "daily 2/2"),
        ("f", "monthly 1/2"),                 # 2026-11 is covered by a..e: monthly starts at October
        ("g", "- monthly: f is kept for 2026-10"),
        ("h", "monthly 2/2"),
    ]


def test_protected_points_neither_spend_a_count_nor_claim_a_bucket():
    pts = points(*[(f"p{d}", f"2026-11-0{d} 12:00") for d in range(1, 6)], protected={"p4"})
    assert table(decide(pts, Policy(daily=2), UTC)) == [
        ("p5", "daily 1/2"), ("p4", "protected"), ("p3", "daily 2/2"),
        ("p2", "- no rule keeps it"), ("p1", "- no rule keeps it")]
    # A protected point is the newest of its day: the day's next point is still the daily one.
    pts = points(("q1", "2026-11-05 06:00"), ("q2", "2026-11-05 18:00"), protected={"q2"})
    assert table(decide(pts, Policy(daily=1), UTC)) == [("q2", "protected"), ("q1", "daily 1/1")]
    # keep-last counts past it too; an old protected point outside every rule stays.
    pts = points(("o", "2020-01-01 00:00"), ("p1", "2026-11-01 00:00"), ("p2", "2026-11-02 00:00"),
                 ("p3", "2026-11-03 00:00"), protected={"p3", "o"})
    assert table(decide(pts, Policy(last=2), UTC)) == [
        ("p3", "protected"), ("p2", "last 1/2"), ("p1", "last 2/2"), ("o", "protected")]


def test_buckets_are_days_of_the_given_zone():
    # 2026-03-28T23:30Z is 00:30 CET on 03-29 in Berlin but still 03-28 in UTC.
    pts = [Candidate("y", at("2026-03-28 22:30"), 1), Candidate("x", at("2026-03-28 23:30"), 2)]
    assert table(decide(pts, Policy(daily=2), BERLIN)) == [("x", "daily 1/2"), ("y", "daily 2/2")]
    assert table(decide(pts, Policy(daily=2), UTC)) == [("x", "daily 1/2"), ("y", "- daily: x is kept for 2026-03-28")]


def test_spring_forward_berlin_has_no_02_hour():
    # 2026-03-29: 02:00 CET becomes 03:00 CEST.  Every 30 min from 00:00Z: 01:00 CET, 01:30 CET,
    # 03:00 CEST, 03:30 CEST, 04:00 CEST: hourly buckets 04, 03, 01 (there is no 02).
    pts = [Candidate(f"t{i}", at("2026-03-29 00:00") + 1800 * i, i) for i in range(5)]
    assert table(decide(pts, Policy(hourly=3), BERLIN)) == [
        ("t4", "hourly 1/3"), ("t3", "hourly 2/3"), ("t2", "- hourly: t3 is kept for 2026-03-29T03"),
        ("t1", "hourly 3/3"), ("t0", "- hourly: t1 is kept for 2026-03-29T01")]
    # The spring day has 23 hours and is one daily bucket.
    assert table(decide(pts, Policy(daily=1), BERLIN))[0] == ("t4", "daily 1/1")


def test_fall_back_berlin_the_twice_hour_is_one_bucket():
    # 2026-10-25: 03:00 CEST becomes 02:00 CET.  00:10Z = 02:10 CEST, 00:40Z = 02:40 CEST,
    # 01:10Z = 02:10 CET, 01:40Z = 02:40 CET, 02:10Z = 03:10 CET: Berlin hours 03, 02 (four points).
    times = ["00:10", "00:40", "01:10", "01:40", "02:10"]
    pts = [Candidate(f"a{i}", at(f"2026-10-25 {t}"), i) for i, t in enumerate(times)]
    assert table(decide(pts, Policy(hourly=3), BERLIN)) == [
        ("a4", "hourly 1/3"), ("a3", "hourly 2/3"),
        ("a2", "- hourly: a3 is kept for 2026-10-25T02"), ("a1", "- hourly: a3 is kept for 2026-10-25T02"),
        ("a0", "- hourly: a3 is kept for 2026-10-25T02")]
    # In UTC the same points fall in the hours 02, 01, 01, 00, 00.
    assert table(decide(pts, Policy(hourly=3), UTC)) == [
        ("a4", "hourly 1/3"), ("a3", "hourly 2/3"), ("a2", "- hourly: a3 is kept for 2026-10-25T01"),
        ("a1", "hourly 3/3"), ("a0", "- hourly: a1 is kept for 2026-10-25T00")]


def test_keep_within_a_day_across_fall_back_is_25_hours_in_berlin():
    # Newest 2026-10-25 12:00 CET (11:00Z).  One calendar day back in Berlin is 2026-10-24 12:00 CEST
    # = 10:00Z, 25 hours before; in UTC it is 10-24 11:00Z.  Kept: strictly newer than the limit.
    pts = points(("edge", "2026-10-24 10:00"), ("in25", "2026-10-24 10:30"), ("new", "2026-10-25 11:00"))
    assert table(decide(pts, Policy(within=Within.parse("1d")), BERLIN)) == [
        ("new", "within 1d"), ("in25", "within 1d"), ("edge", "- no rule keeps it")]
    assert table(decide(pts, Policy(within=Within.parse("1d")), UTC)) == [
        ("new", "within 1d"), ("in25", "- no rule keeps it"), ("edge", "- no rule keeps it")]


def test_keep_within_runs_first_and_the_rules_continue_after_it():
    # Every 12 h from 11-01 00:00 to 11-05 12:00 (n0..n9).  Within 2d of n9 (11-05 12:00): newer than
    # 11-03 12:00, i.e. n6..n9 (n5 is exactly at the limit).  Daily then passes 11-04 and 11-05.
    pts = [Candidate(f"n{i}", at("2026-11-01 00:00") + 43200 * i, i) for i in range(10)]
    got = table(decide(pts, Policy(daily=2, within=Within.parse("2d")), UTC))
    assert got == [("n9", "within 2d"), ("n8", "within 2d"), ("n7", "within 2d"), ("n6", "within 2d"),
                   ("n5", "daily 1/2"), ("n4", "- daily: n5 is kept for 2026-11-03"),
                   ("n3", "daily 2/2"), ("n2", "- daily: n3 is kept for 2026-11-02"),
                   ("n1", "- no rule keeps it"), ("n0", "- no rule keeps it")]


def test_iso_week_53_spans_the_new_year_and_yearly_continues():
    # 2026 has 53 ISO weeks: W53 = Mon 2026-12-28 .. Sun 2027-01-03.  2027-01-04 is 2027-W01;
    # 2026-12-27 is 2026-W52; 2025-12-31 (a Wednesday) is already 2026-W01.
    pts = points(("y25", "2025-12-31 12:00"), ("d27", "2026-12-27 12:00"), ("d28", "2026-12-28 12:00"),
                 ("d31", "2026-12-31 12:00"), ("j2", "2027-01-02 12:00"), ("j4", "2027-01-04 12:00"))
    got = table(decide(pts, Policy(weekly=3, yearly=2), UTC))
    assert got == [("j4", "weekly 1/3"), ("j2", "weekly 2/3"),
                   ("d31", "- weekly: j2 is kept for 2026-W53"), ("d28", "- weekly: j2 is kept for 2026-W53"),
                   ("d27", "weekly 3/3"),
                   ("y25", "yearly 1/2")]   # 2027 and 2026 hold kept points: yearly starts at 2025


def test_year_boundary_days_and_months():
    # 23:30 and 00:30 on either side of New Year are different days, months and years; in Berlin
    # 2026-12-31T23:30Z is already 2027.
    pts = points(("old", "2026-12-31 23:30"), ("new", "2027-01-01 00:30"))
    for rule in ("daily", "monthly", "yearly"):
        assert table(decide(pts, Policy(**{rule: 2}), UTC)) == [("new", f"{rule} 1/2"), ("old", f"{rule} 2/2")]
    assert table(decide(pts, Policy(yearly=2), BERLIN)) == [
        ("new", "yearly 1/2"), ("old", "- yearly: new is kept for 2027")]


def test_newest_of_the_chain_is_kept_unless_allowed():
    # c3 is the chain's newest (the next incremental's base) though its time is older (a store
    # from before times were ordered): no rule keeps it.
    pts = [Candidate("c1", 100.0, 1), Candidate("c2", 200.0, 2), Candidate("c3", 50.0, 3)]
    assert table(decide(pts, Policy(last=1), UTC, newest_id="c3")) == [
        ("c2", "last 1/1"), ("c1", "- no rule keeps it"), ("c3", "newest of chain")]
    assert table(decide(pts, Policy(last=1), UTC, newest_id="c3", allow_remove_newest=True))[2] == (
        "c3", "- no rule keeps it")
    # Equal times: the later sequence number is the newer point.
    same = [Candidate("s1", 100.0, 1), Candidate("s2", 100.0, 2)]
    assert table(decide(same, Policy(last=1), UTC)) == [("s2", "last 1/1"), ("s1", "- no rule keeps it")]


def test_an_empty_policy_is_refused():
    with pytest.raises(UsageError, match="empty retention policy"):
        decide(points(("a", "2026-01-01 00:00")), Policy(), UTC)
    assert Policy().empty and not Policy(within=Within.parse("1h")).empty and not Policy(yearly=1).empty


def test_within_durations():
    assert Within.parse("1y6m") == Within(years=1, months=6) and str(Within.parse("36h")) == "36h"
    for bad in ("", "2", "2w", "1d1d", "-1d", "0d", "1.5d", "d2"):
        with pytest.raises(UsageError):
            Within.parse(bad)
    # One month before 2026-03-31 12:00 is "2026-02-31" = 2026-03-03 12:00 (Go's AddDate).
    assert Within(months=1).limit(at("2026-03-31 12:00"), UTC) == at("2026-03-03 12:00")
    assert Within(years=1, hours=2).limit(at("2028-02-29 12:00"), UTC) == at("2027-03-01 10:00")
