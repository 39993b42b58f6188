"""The lifecycle bench's verdicts: correctness checks, the issue's targets, a Markdown report.

Checks decide the exit status and never look at a speed: every step ran and
succeeded, every tool kept what its own semantics keep (bench/retention_models.py),
the tools agree where those semantics agree, every point blockvault kept
restores byte-identical, both blockvault stores verify, the fresh store was
built.  Targets (issue 10, item 9) are figures with a verdict, reported but
not enforced: a quick run on tiny images says nothing about them.
"""

from __future__ import annotations

import argparse

from bench.units import MiB, format_size

MODEL_OF = {"blockvault": "blockvault", "blockvault-scaled": "blockvault", "restic": "restic", "borg": "borg"}
DAMAGE_KEYS = ("errors", "bad_chunks", "missing_packs", "damaged_manifests")


def check_results(doc: dict, args: argparse.Namespace) -> list[dict]:
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    disks = doc["config"]["disks"]
    newest = list(range(max(1, args.nights - doc["config"]["policy"]["daily"] + 1), args.nights + 1))
    for name, t in doc["tools"].items():
        bad = [f"{b['disk']} T{b['night']}: {b['error']}" for b in t["backups"] if not b["ok"]]
        if not t["info"].get("copy_of"):  # the scaled store is a copy of blockvault's, plus ballast
            check(f"{name}: every nightly backup succeeded",
                  not bad and len(t["backups"]) == args.nights * len(disks),
                  "; ".join(bad)[:1000] or f"{len(t['backups'])} backups")
        failed = [f"{s['step']}: {s.get('error')}" for s in t["steps"] if not s["ok"]]
        check(f"{name}: every other step succeeded", not failed, "; ".join(failed)[:1000])
        r = doc["retention"].get(name) or {}
        check(f"{name}: retention ran ({' + '.join(r.get('commands', []))})", r.get("ok"),
              f"reclaimed {r.get('reclaimed_bytes')}")
        kept = doc["kept"].get(name, {})
        want = doc["expected"][MODEL_OF[name]]
        wrong = {d: kept.get(d) for d in disks if kept.get(d) != want}
        check(f"{name}: kept what its semantics keep", not wrong,
              f"expected {want}, got {wrong}" if wrong else f"{want}")
        lost = {d: sorted(set(newest) - set(kept.get(d, []))) for d in disks}
        check(f"{name}: kept the newest {len(newest)} nights (every tool's keep-daily)",
              not any(lost.values()), str(lost))
    names = [n for n in doc["tools"] if doc["kept"].get(n)]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if doc["expected"][MODEL_OF[a]] == doc["expected"][MODEL_OF[b]]:
                same = all(doc["kept"][a].get(d) == doc["kept"][b].get(d) for d in disks)
                check(f"{a} and {b} kept the same points (their semantics agree here)", same,
                      f"{ {d: doc['kept'][a].get(d) for d in disks} } vs { {d: doc['kept'][b].get(d) for d in disks} }")
    ballast = [b for b in doc.get("ballast", [])]
    big = doc["kept"].get("blockvault-scaled", {})
    check("blockvault-scaled: every ballast disk kept its one point",
          all(big.get(b["disk"]) is not None and len(big[b["disk"]]) == 1 for b in ballast) and all(
              b["ok"] for b in ballast), f"{len(ballast)} ballast disks")
    r = doc["retention"]
    if "blockvault" in r and "blockvault-scaled" in r:
        ratio = r["blockvault-scaled"]["stored_before"] / max(1, r["blockvault"]["stored_before"])
        check(f"blockvault-scaled is {args.scale:g}x the store", ratio >= args.scale * 0.95, f"{ratio:.2f}x")
    restores = doc["restores"]
    expected = sum(len(v) for d, v in doc["kept"].get("blockvault", {}).items() if d in disks)
    bad = [f"{x['disk']} T{x['night']}: {x.get('error')}" for x in restores if not x["identical"]]
    check("blockvault: every kept point restored byte-identical after gc",
          restores and not bad and len(restores) == expected, "; ".join(bad)[:1000] or f"{len(restores)} points")
    for name in ("blockvault", "blockvault-scaled"):
        v = (doc["tools"].get(name) or {}).get("info", {}).get("verify")
        ok = isinstance(v, dict) and v.get("ok") is not False and not any(v.get(k) for k in DAMAGE_KEYS)
        check(f"{name}: verify after gc", ok, "" if ok else str(v)[:500])
    f = doc["fresh"]
    check("fresh store of the kept points built", f["stored_bytes"] > 0 and not f["failed"] and restores and all(
        x.get("fresh_backup_ok") for x in restores), format_size(f["stored_bytes"]))
    return checks


def targets(doc: dict) -> dict:
    """The issue's targets with the figures measured (None where a step did not run)."""
    r = doc["retention"]
    bv = r.get("blockvault") or {}
    out: dict = {}
    if bv.get("ok"):
        for peer in ("restic", "borg"):
            p = r.get(peer) or {}
            if p.get("ok") and bv["wall_s"]:
                ratio = p["wall_s"] / bv["wall_s"]
                out[f"faster than {peer} (>= 10x: restic)"] = {
                    "ratio": round(ratio, 2), "blockvault_s": bv["wall_s"], f"{peer}_s": p["wall_s"],
                    "met": ratio >= 10 if peer == "restic" else None}
        fresh = doc["fresh"]["stored_bytes"]
        if fresh:
            ratio = bv["stored_after"] / fresh
            out["size after within 10% of a fresh store"] = {
                "ratio": round(ratio, 4), "after": bv["stored_after"], "fresh": fresh, "met": ratio <= 1.10}
        out["peak RSS under 256 MiB"] = {"peak_rss_bytes": bv["peak_rss_bytes"],
                                         "met": bv["peak_rss_bytes"] < 256 * MiB}
        big = r.get("blockvault-scaled") or {}
        # The whole retention step (forget --gc, one process): forget's share
        # follows the points removed, which are the same in both stores.
        gc_a, gc_b = bv.get("wall_s"), big.get("wall_s")
        if big.get("ok") and gc_a and gc_b:
            size_ratio = big["stored_before"] / max(1, bv["stored_before"])
            out["gc time follows the deleted data, not the store"] = {
                "gc_s": gc_a, "gc_scaled_s": gc_b, "gc_ratio": round(gc_b / gc_a, 2),
                "store_ratio": round(size_ratio, 2),
                "reclaimed": bv["reclaimed_bytes"], "reclaimed_scaled": big["reclaimed_bytes"],
                "met": gc_b / gc_a < (1 + size_ratio) / 2}
    return out


def markdown(doc: dict) -> str:
    c = doc["config"]
    lines = [f"# blockvault lifecycle bench ({'quick' if doc['quick'] else 'full'})", "",
             f"`{' '.join(doc['command'])}` — {doc['created']}", "",
             f"{c['nights']} nights from {c['start']}, disks {', '.join(c['disks'])} "
             f"({format_size(c['size'])} apparent, {format_size(c['allocated'])} written, "
             f"{c['change_share']:.0%} changed per night); policy "
             + ", ".join(f"keep-{k} {v}" for k, v in c["policy"].items()), "",
             "| tool | retention | wall s | per command | peak RSS | before | after | reclaimed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in doc["retention"].items():
        lines.append(f"| {name} | {' + '.join(r['commands'])} | {r['wall_s']:.2f} | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["per_command"].items())
                     + f" | {format_size(r['peak_rss_bytes'])} | {format_size(r['stored_before'])} | "
                     f"{format_size(r['stored_after'])} | {format_size(r['reclaimed_bytes'])} |")
    lines += ["", f"Fresh store of the kept points: {format_size(doc['fresh']['stored_bytes'])}.", "",
              "| target | figures | met |", "| --- | --- | --- |"]
    for name, t in doc["targets"].items():
        figs = ", ".join(f"{k} {v}" for k, v in t.items() if k != "met")
        lines.append(f"| {name} | {figs} | {t['met']} |")
    lines += ["", "Kept nights (per disk):", ""]
    for name, k in doc["kept"].items():
        lines.append(f"* {name}: " + "; ".join(f"{d} {v}" for d, v in k.items() if not d.startswith("ballast")))
    lines += ["", "| check | ok | detail |", "| --- | --- | --- |"]
    for ch in doc["checks"]:
        lines.append(f"| {ch['name']} | {'yes' if ch['ok'] else 'NO'} | {ch['detail'][:200]} |")
    return "\n".join(lines) + "\n"
