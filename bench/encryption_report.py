"""The encryption bench's verdicts: best runs, ratios, targets, checks, and report.md.

Every ratio divides two wall times of the same step on the same bytes in the
same run, so the machine's speed cancels out: blockvault's encrypted store
over its plaintext store (speed, so 1.0 is free and 0.90 the target), and
blockvault's margin over a peer (the peer's wall time over blockvault's, so
2.0 is "twice as fast"), encrypted against encrypted and plaintext against
plaintext.  restic has no plaintext repository, so its margin is given
against both blockvault stores.
"""

from __future__ import annotations

from bench import crypto_ids
from bench.units import MiB, format_size

STEPS = ("full", "incremental", "restore")
TARGETS = {"full": 0.90, "restore": 0.90}  # issue 13, item 4: encrypted over plaintext
MARGIN_TARGET = 0.90  # the encrypted margin over a peer, of the plaintext margin
ID_ROWS = 8


def _steps(tool: dict, name: str) -> list[dict]:
    return [s for s in tool["steps"] if s.get("step_name") == name]


def best(tool: dict, name: str) -> dict | None:
    """The fastest successful run of a step, with the largest peak RSS of all its runs."""
    ok = [s for s in _steps(tool, name) if s["ok"] and s.get("wall_s")]
    if not ok:
        return None
    b = dict(min(ok, key=lambda s: s["wall_s"]))
    b["peak_rss_bytes"] = max(s["peak_rss_bytes"] or 0 for s in ok)
    b["min_cpu_s"] = min(s["cpu_s"] for s in ok)
    b["runs"] = len(ok)
    return b


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _plain_and_encrypted(doc: dict) -> tuple[str | None, list[str]]:
    names = [n for n, t in doc["tools"].items() if t["kind"] == "blockvault"]
    plain = next((n for n in names if not doc["tools"][n]["encryption"]), None)
    return plain, [n for n in names if doc["tools"][n]["encryption"]]


def summarise(doc: dict) -> None:
    """Fills doc['best'], ['ratios'], ['margins'], ['targets'], ['checks'], ['ok']."""
    tools = doc["tools"]
    doc["best"] = {n: {s: best(t, s) for s in (*STEPS, "list")} for n, t in tools.items()}
    wall = {n: {s: (b or {}).get("wall_s") for s, b in steps.items()} for n, steps in doc["best"].items()}
    plain, encrypted = _plain_and_encrypted(doc)
    ratios = {}
    cpu = {n: {s: (b or {}).get("min_cpu_s") for s, b in steps.items()} for n, steps in doc["best"].items()}
    for n in encrypted:
        r = {s: _ratio(wall[plain][s], wall[n][s]) if plain else None for s in STEPS}
        # CPU seconds (user + system, every thread): what encryption adds, whatever the machine's load
        r.update({f"{s}_cpu": _ratio(cpu[plain][s], cpu[n][s]) if plain else None for s in STEPS})
        lp, ln = (wall[plain]["list"] if plain else None), wall[n]["list"]
        r["key_open_s"] = round(ln - lp, 3) if lp and ln else None
        ratios[n] = r
    doc["ratios"] = ratios
    # the encrypted blockvault the peers are held against: the first cipher, passphrase slot
    headline = next((n for n in encrypted if tools[n]["key_source"] == "passphrase"), None)
    margins = {}
    if plain and headline and "borg-none" in tools and "borg-repokey-blake2" in tools:
        m = {}
        for s in STEPS:
            p = _ratio(wall["borg-none"][s], wall[plain][s])
            e = _ratio(wall["borg-repokey-blake2"][s], wall[headline][s])
            m[s] = {"plaintext": p, "encrypted": e, "encrypted_of_plaintext": _ratio(e, p)}
        margins["borg"] = {"plaintext_pair": f"borg-none / {plain}", "encrypted_pair":
                           f"borg-repokey-blake2 / {headline}", "steps": m}
    if plain and headline and "restic" in tools:
        m = {}
        for s in STEPS:
            p = _ratio(wall["restic"][s], wall[plain][s])
            e = _ratio(wall["restic"][s], wall[headline][s])
            m[s] = {"plaintext": p, "encrypted": e, "encrypted_of_plaintext": _ratio(e, p)}
        margins["restic"] = {"plaintext_pair": f"restic / {plain}", "encrypted_pair": f"restic / {headline}",
                             "steps": m}
    doc["margins"] = margins
    judged = not doc["quick"]  # a quick run never judges speed
    targets = []
    for n in encrypted:
        for s, want in TARGETS.items():
            v = ratios[n][s]
            targets.append({"name": f"{n} {s} / plaintext", "value": v, "target": want,
                            "met": (v is not None and v >= want) if judged else None})
    for peer, m in margins.items():
        for s in STEPS:
            v = m["steps"][s]["encrypted_of_plaintext"]
            targets.append({"name": f"margin over {peer}, {s}: encrypted / plaintext", "value": v,
                            "target": MARGIN_TARGET, "met": (v is not None and v >= MARGIN_TARGET) if judged else None})
    doc["targets"] = targets
    doc["checks"] = checks(doc, plain, encrypted)
    doc["ok"] = all(c["ok"] for c in doc["checks"])


def checks(doc: dict, plain: str | None, encrypted: list[str]) -> list[dict]:
    out: list[dict] = []

    def check(name: str, ok, detail: str = "") -> None:
        out.append({"name": name, "ok": bool(ok), "detail": detail})

    rounds = doc["config"]["rounds"]
    for n, t in doc["tools"].items():
        want = ["init", *STEPS] + (["list"] if t["kind"] == "blockvault" else [])
        have = [s.get("step_name") for s in t["steps"]]
        missing = [f"{w} x{rounds - have.count(w)}" for w in want if have.count(w) < rounds]
        check(f"{n}: every step of every round present", not missing, ", ".join(missing))
        failed = [f"{s.get('step_name')} (round {s.get('round')}): {s['error']}" for s in t["steps"] if not s["ok"]]
        check(f"{n}: every step succeeded", not failed, "; ".join(failed)[:2000])
        restores = _steps(t, "restore")
        bad = [f"round {s.get('round')}" for s in restores if s.get("identical") is not True]
        check(f"{n}: every restore identical", restores and not bad, ", ".join(bad) or f"{len(restores)} restores")
        check(f"{n}: version known", bool(t.get("version")), str(t.get("version")))
        if t["kind"] == "blockvault":
            cfg = t["info"].get("store_config") or {}
            want_enc = t["encryption"]
            got = cfg.get("encryption") or None
            check(f"{n}: store is {'encrypted with ' + want_enc if want_enc else 'plaintext'}",
                  got == want_enc and (cfg.get("digest") == "blake3-128-keyed") == bool(want_enc),
                  f"config.json: {cfg}")
    check("plaintext and encrypted blockvault stores ran", plain and encrypted,
          f"plaintext {plain}, encrypted {encrypted}")
    check("every ratio computed", all(v is not None for r in doc["ratios"].values() for k, v in r.items())
          and all(t["value"] is not None for t in doc["targets"]), "")
    if "crypto_ids" in doc:
        rows = doc["crypto_ids"]["rows"]
        check("primitives measured", len(rows) == ID_ROWS and all(
            len(r["runs"]) == 2 and all(x["MBps"] > 0 for x in r["runs"]) and r["gil"] for r in rows),
            ", ".join(r["name"] for r in rows))
    return out


def _mbps(b: dict | None) -> str:
    return "-" if not b or not b.get("logical_MBps") else f"{b['logical_MBps']:.0f}"


def _cell(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(doc: dict, brief: bool = False) -> str:
    c = doc["config"]
    m = doc["machine"]
    lines = [f"# Encryption at rest: blockvault against restic and borg ({doc['created']})", "",
             f"Image: {format_size(c['size_bytes'])} apparent, {format_size(c['allocated_bytes'])} written in T1, "
             f"{c['change_share']:.0%} of its blocks rewritten for T2; blockvault chunk size "
             f"{format_size(c['chunk_size'])}; best of {c['rounds']} round(s). Machine: {m.get('cores')} cores, "
             f"{m.get('cpu_model', '?')}, load average {m['loadavg_start'][0]:.2f} at the start, "
             f"{m.get('loadavg_end', [0])[0]:.2f} at the end. `{' '.join(doc['command'])}`"
             + (" (quick: correctness only, the figures judge nothing)" if doc["quick"] else ""), ""]
    if "crypto_ids" in doc and not brief:
        lines += ["## Primitives (bench/crypto_ids.py)", "", crypto_ids.table(doc["crypto_ids"]), ""]
    lines += ["## Steps (MB/s: apparent image size over wall time; fastest round)", "",
              "| tool | encryption | full MB/s | incremental MB/s | restore MB/s | full / incr / restore CPU s | "
              "list s | peak RSS | stored |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, t in doc["tools"].items():
        b = doc["best"][n]
        rss = max((x or {}).get("peak_rss_bytes") or 0 for x in b.values())
        stored = (b.get("incremental") or {}).get("stored_bytes")
        enc = t["encryption"] or "none"
        if t.get("key_source"):
            enc += f" ({t['key_source']})"
        cpus = " / ".join(_cell((b[s] or {}).get("min_cpu_s"), "{:.2f}") for s in STEPS)
        lines.append(f"| {n} | {enc} | {_mbps(b['full'])} | {_mbps(b['incremental'])} | {_mbps(b['restore'])} | "
                     f"{cpus} | {_cell((b.get('list') or {}).get('wall_s'), '{:.2f}')} | {format_size(rss)} | "
                     f"{format_size(stored)} |")
    lines += ["", "## blockvault encrypted / plaintext (speed; targets: full >= 0.90, restore >= 0.90)", "",
              "Wall time, then CPU seconds (plaintext's over the encrypted store's: 1.0 = free).", "",
              "| store | full | incremental | restore | full, CPU | incremental, CPU | restore, CPU | "
              "opening the key (list, s over plaintext) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, r in doc["ratios"].items():
        lines.append(f"| {n} | {_cell(r['full'])} | {_cell(r['incremental'])} | {_cell(r['restore'])} | "
                     f"{_cell(r['full_cpu'])} | {_cell(r['incremental_cpu'])} | {_cell(r['restore_cpu'])} | "
                     f"{_cell(r['key_open_s'], '{:+.2f}')} |")
    if doc["margins"]:
        lines += ["", "## blockvault's margin over the peers (peer wall time / blockvault's)", "",
                  "| peer | step | plaintext | encrypted | encrypted / plaintext |", "| --- | --- | --- | --- | --- |"]
        for peer, mm in doc["margins"].items():
            for s in STEPS:
                x = mm["steps"][s]
                lines.append(f"| {peer} | {s} | {_cell(x['plaintext'], '{:.2f}x')} | {_cell(x['encrypted'], '{:.2f}x')} "
                             f"| {_cell(x['encrypted_of_plaintext'])} |")
        lines += [""] + [f"* {peer}: plaintext = {mm['plaintext_pair']}, encrypted = {mm['encrypted_pair']}"
                         for peer, mm in doc["margins"].items()]
    lines += ["", "## Targets", ""]
    for t in doc["targets"]:
        verdict = "not judged (quick)" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"* {t['name']}: {_cell(t['value'])} (target >= {t['target']:.2f}): {verdict}")
    failed = [x for x in doc["checks"] if not x["ok"]]
    lines += ["", f"## Checks: {len(doc['checks']) - len(failed)} of {len(doc['checks'])} passed", ""]
    lines += [f"* FAILED {x['name']}: {x['detail']}" for x in failed]
    if not brief:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v), ""]
    return "\n".join(lines) + "\n"


__all__ = ["summarise", "markdown", "best", "STEPS", "TARGETS", "MiB"]
