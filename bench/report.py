"""report.md and the PNG plots, made from results.json alone.

Everything here reads the results document, so a report can be redrawn
from a saved run: `python -m bench.report DIR` (DIR holding results.json).
"""

from __future__ import annotations

import json
import os
import sys
from statistics import mean

from bench.units import format_size

STEP_GROUPS = ("backup T1", "backup T2..Tn-1", "backup Tn", "restore T1", "restore Tn")


def _steps(tool: dict, step: str) -> list[dict]:
    return [s for s in tool["steps"] if s["step"] == step]


def _group(doc: dict, tool: dict, group: str) -> list[dict]:
    """Successful steps of a tool that fall in one of STEP_GROUPS."""
    n = doc["config"]["nights"]
    step, which = group.split(" ")
    out = []
    for s in _steps(tool, step):
        if not s["ok"] or s["night"] is None:
            continue
        if which == "T1" and s["night"] == 1:
            out.append(s)
        elif which == "Tn" and s["night"] == n and n > 1:
            out.append(s)
        elif which == "T2..Tn-1" and 1 < s["night"] < n:
            out.append(s)
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def cumulative_stored(tool: dict) -> list[tuple[int, int]]:
    """(night, stored bytes if everything were kept) after each night's backup."""
    total = 0
    out = []
    for s in tool["steps"]:
        if s["step"] == "init":
            total += s.get("stored_bytes_added") or 0
        elif s["step"] == "backup" and s["ok"]:
            total += s.get("stored_bytes_added") or 0
            out.append((s["night"], total))
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _loads(v: list | None) -> str:
    return ", ".join(f"{x:.2f}" for x in v) if v else "-"


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(doc: dict) -> str:
    cfg, wl, lim = doc["config"], doc["workload"], doc.get("limits") or {}
    m = doc["machine"]
    out = [f"# blockvault benchmark{' (quick: correctness only)' if doc.get('quick') else ''}\n",
           f"`{' '.join(doc['command'])}` — {doc['created']} — "
           f"**{'all checks passed' if doc['ok'] else 'SOME CHECKS FAILED'}**\n"]
    if doc.get("quick"):
        out.append("\nThis was a `--quick` run on tiny images: its figures say nothing about speed.\n")

    out.append("\n## Machine and versions\n\n")
    out.append(_table(["what", "value"], [
        ["cores", m.get("cores")], ["memory", format_size(m.get("memory_bytes"))],
        ["CPU", m.get("cpu_model", "-")], ["kernel", m.get("kernel")],
        ["work filesystem", cfg.get("work_filesystem")],
        ["load average (1, 5, 15 min) at start / end",
         f"{_loads(m.get('loadavg_start'))} / {_loads(m.get('loadavg_end'))}"],
    ] + [[k, f"`{v}`"] for k, v in doc["versions"].items()]))

    out.append("\n## Workload\n\n")
    c = wl["config"]
    mix = ", ".join(f"{k} {v:.0%}" for k, v in c["mix"].items())
    out.append(f"Seed {c['seed']}; T1 {format_size(c['size'])} apparent, {format_size(c['allocated'])} "
               f"allocated; mix: {mix}; {c['pattern']} changes of {c['change_share']:.1%} of the allocated "
               f"64 KiB blocks per night ({c['hole_share']:.0%} into former holes); the disk grows by "
               f"{c['grow_fraction']:.2%} every {c['grow_every']} nights.\n\n")
    out.append(_table(["night", "apparent", "allocated", "non-zero", "changed (CBT)", "areas", "written",
                       "into holes", "grew", "since T1"], [
        [f"T{n['night']}", format_size(n["size_bytes"]), format_size(n["allocated_bytes"]),
         format_size(n["nonzero_bytes"]), format_size(n["changed_bytes"]), n["changed_areas"],
         format_size(n["written_bytes"]), format_size(n["hole_write_bytes"]),
         format_size(n["grew_by_bytes"]) if n["grew_by_bytes"] else "", format_size(n["since_full_bytes"])]
        for n in wl["nights"]]))

    out.append("\n## Machine limits on this data\n\n")
    if lim:
        out.append(f"Measured on {format_size(lim['sample_bytes'])} of the image's non-zero data in "
                   f"1 MiB chunks (zstd level {lim['zstd_level']}: ratio {lim['zstd_ratio']}).\n\n")
        rows = []
        for key, label in (("zstd_compress_MBps", "zstd compress"), ("zstd_decompress_MBps", "zstd decompress"),
                           ("xxh3_128_MBps", "XXH3-128"), ("sha256_MBps", "SHA-256")):
            v = lim.get(key, {})
            rows.append([label] + [_fmt(v.get(str(t))) for t in lim["threads"]])
            if key == "zstd_compress_MBps":
                for size, by_t in sorted((lim.get("zstd_compress_by_chunk_MBps") or {}).items(),
                                         key=lambda kv: int(kv[0])):
                    rows.append([f"zstd compress, {format_size(int(size))} frames"] +
                                [_fmt(by_t.get(str(t))) for t in lim["threads"]])
        for key, label in (("read_page_cache_MBps", "page-cache read of the image"),
                           ("write_page_cache_MBps", "page-cache write"), ("write_fsync_MBps", "write + fsync")):
            rows.append([label, _fmt(lim.get(key)), ""])
        out.append(_table(["stage (MB/s)"] + [f"{t} thread{'s' if t > 1 else ''}" for t in lim["threads"]], rows))

    tools = doc["tools"]
    out.append("\n## Summary\n\nMB/s are decimal (10^6 bytes/s). *logical* = apparent image size / wall "
               "time; *data* = bytes the step had to read (backups: allocated bytes, or the changed areas "
               "for CBT-driven backups) or write (restores: allocated bytes) / wall time.\n\n")
    rows = []
    for name, t in tools.items():
        row = [f"**{name}**" if t["kind"] == "blockvault" else name]
        for g in STEP_GROUPS:
            ss = _group(doc, t, g)
            row.append(f"{_fmt(_mean([s['data_MBps'] for s in ss]))} ({_fmt(_mean([s['wall_s'] for s in ss]), 2)} s)"
                       if ss else "-")
        cum = cumulative_stored(t)
        later = [s["stored_bytes_added"] for s in _steps(t, "backup") if s["ok"] and s["night"] > 1]
        row += [format_size(cum[0][1]) if cum else "-", format_size(_mean(later)),
                format_size(cum[-1][1]) if cum else "-",
                format_size(max([s["peak_rss_bytes"] or 0 for s in t["steps"]] or [0])),
                "ok" if t["ok"] else "FAILED"]
        rows.append(row)
    out.append(_table(["tool"] + [f"{g}: data MB/s (wall)" for g in STEP_GROUPS] +
                      ["stored after T1", "mean added T2..Tn", "stored total", "peak RSS", "status"], rows))

    bv = {k: v for k, v in tools.items() if v["kind"] == "blockvault"}
    if bv:
        out.append("\n## blockvault against this machine's limits\n\n"
                   "`fraction` = limit time / wall time, where the limit time is the slowest stage of a "
                   "perfectly overlapped pipeline on the same bytes (backup: page-cache read of the data, "
                   "digest of its non-zero part, zstd of the chunks the store lacked at the rate for "
                   "the store's chunk size; restore: zstd decompress and page-cache write of "
                   "the non-zero part), each at its best thread count (see README).\n\n")
        rows = []
        for name, t in bv.items():
            for s in t["steps"]:
                if s["step"] in ("backup", "restore", "verify"):
                    own = (s.get("tool_report") or {}).get("duration") if isinstance(
                        s.get("tool_report"), dict) else None
                    rows.append([name, s["step"], "" if s["night"] is None else f"T{s['night']}",
                                 s.get("mode") or "", _fmt(s["wall_s"], 3),
                                 _fmt(own, 3) if isinstance(own, (int, float)) else "-",
                                 _fmt(s["data_MBps"]), _fmt(s["limit_s"], 3), _fmt(s["fraction_of_limit"], 2),
                                 _fmt(s["cpu_s"], 2), format_size(s["peak_rss_bytes"]),
                                 format_size(s["stored_bytes_added"]) if s["step"] == "backup" else ""])
        out.append(_table(["store", "step", "night", "mode", "wall s", "own duration s", "data MB/s",
                           "limit s", "fraction", "CPU s", "peak RSS", "stored added"], rows))
        out.append("\n*own duration* is the `duration` blockvault reports in its JSON (its work without "
                   "process start-up), where it reports one. Verify: data = stored bytes, limit on "
                   "decompressing and hashing the store's unique bytes (`stats`).\n")

        out.append("\n## blockvault chunk-size sweep\n\n")
        rows = []
        for name, t in bv.items():
            inc = [s for s in _steps(t, "backup") if s["ok"] and s["night"] and s["night"] > 1]
            full = [s for s in _steps(t, "backup") if s["ok"] and s["night"] == 1]
            rest = [s for s in _steps(t, "restore") if s["ok"]]
            rows.append([name, format_size(t["info"].get("chunk_size")),
                         format_size(full[0]["stored_bytes_added"]) if full else "-",
                         format_size(_mean([s["stored_bytes_added"] for s in inc])),
                         _fmt(_mean([s["data_MBps"] for s in full])), _fmt(_mean([s["data_MBps"] for s in inc])),
                         _fmt(_mean([s["fraction_of_limit"] for s in inc]), 2),
                         _fmt(_mean([s["data_MBps"] for s in rest])), format_size(t["stored_bytes_final"])])
        out.append(_table(["store", "chunk", "stored T1", "mean stored per later night", "full data MB/s",
                           "later nights data MB/s", "later nights fraction", "restore data MB/s",
                           "stored total"], rows))

    out.append("\n## Every step\n\n")
    for name, t in tools.items():
        out.append(f"\n### {name}\n\n`{t.get('version')}`\n\n")
        out.append(_table(["step", "night", "mode", "ok", "wall s", "CPU s", "peak RSS", "logical MB/s",
                           "data MB/s", "stored added", "stored", "identical", "error"], [
            [s["step"], s["night"] or "", s.get("mode") or "", "ok" if s["ok"] else "FAIL", _fmt(s["wall_s"], 3),
             _fmt(s["cpu_s"], 2), format_size(s["peak_rss_bytes"]), _fmt(s["logical_MBps"]), _fmt(s["data_MBps"]),
             format_size(s["stored_bytes_added"]), format_size(s["stored_bytes"]),
             "" if s["identical"] is None else ("yes" if s["identical"] else "NO"),
             (s["error"] or "").replace("|", "/")[:200]]
            for s in t["steps"]]))

    if doc.get("plots"):
        out.append("\n## Plots\n\n" + "".join(f"![{p}]({p})\n\n" for p in doc["plots"]))
    out.append("\n## Checks\n\n")
    out.append(_table(["check", "result", "detail"], [
        [c["name"], "ok" if c["ok"] else "**FAILED**", (c["detail"] or "").replace("|", "/")[:300]]
        for c in doc["checks"]]))
    return "".join(out)


def plots(doc: dict, out_dir: str) -> list[str]:
    """Draws the PNGs; returns their file names.  Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = doc["tools"]
    names = list(tools)
    made = []

    # 1. Throughput per tool and step.
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=False)
    width = 0.8 / max(1, len(names))
    for ax, key, title in ((axes[0], "logical_MBps", "logical MB/s (apparent size / wall)"),
                           (axes[1], "data_MBps", "data MB/s (bytes read or written / wall)")):
        for i, name in enumerate(names):
            vals = [_mean([s[key] for s in _group(doc, tools[name], g)]) or 0 for g in STEP_GROUPS]
            ax.bar([x + i * width for x in range(len(STEP_GROUPS))], vals, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(STEP_GROUPS))])
        ax.set_xticklabels(STEP_GROUPS, rotation=15)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Throughput per tool and step (mean over nights in the group)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=110)
    plt.close(fig)
    made.append("throughput.png")

    # 2. Cumulative stored bytes across nights.
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in names:
        pts = cumulative_stored(tools[name])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / 2**30 for p in pts], marker="o", label=name)
    ax.set_xlabel("night")
    ax.set_ylabel("stored GiB (du of the repository; tar-zstd: all archives)")
    ax.set_title("Cumulative stored bytes across nights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "stored.png"), dpi=110)
    plt.close(fig)
    made.append("stored.png")

    # 3. blockvault's chunk-size sweep: incremental bytes stored against throughput.
    bv = [(t["info"].get("chunk_size"), name, t) for name, t in tools.items() if t["kind"] == "blockvault"]
    if bv:
        bv.sort(key=lambda x: x[0] or 0)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
        for cs, name, t in bv:
            inc = [s for s in _steps(t, "backup") if s["ok"] and s["night"] and s["night"] > 1]
            x = _mean([s["data_MBps"] for s in inc])
            y = _mean([s["stored_bytes_added"] for s in inc])
            if x is None or y is None:
                continue
            ax.scatter([x], [y / 2**20], s=60)
            ax.annotate(format_size(cs), (x, y / 2**20), textcoords="offset points", xytext=(6, 6))
        ax.set_xlabel("mean data MB/s of backups T2..Tn (changed areas given / wall)")
        ax.set_ylabel("mean MiB stored per night T2..Tn")
        ax.set_title("incremental bytes stored against throughput")
        ax.grid(alpha=0.3)
        labels = [format_size(cs) for cs, _, _ in bv]
        for group, marker in (("backup T1", "o"), ("backup T2..Tn-1", "s"), ("restore T1", "^"),
                              ("restore Tn", "v")):
            ys = [_mean([s["data_MBps"] for s in _group(doc, t, group)]) for _, _, t in bv]
            ax2.plot(labels, [y if y is not None else float("nan") for y in ys], marker=marker, label=group)
        ax2.set_yscale("log")
        ax2.set_xlabel("chunk size")
        ax2.set_ylabel("data MB/s")
        ax2.set_title("throughput per chunk size")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
        fig.suptitle("blockvault chunk-size sweep")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "chunk_sweep.png"), dpi=110)
        plt.close(fig)
        made.append("chunk_sweep.png")
    return made


def main(argv: list[str] | None = None) -> int:
    """Redraws report.md and the plots of a saved run: python -m bench.report DIR."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(main.__doc__, file=sys.stderr)
        return 2
    with open(os.path.join(argv[0], "results.json")) as f:
        doc = json.load(f)
    doc["plots"] = plots(doc, argv[0])
    with open(os.path.join(argv[0], "report.md"), "w") as f:
        f.write(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
