"""The three tools of the lifecycle bench: nightly backups at a given date,
one retention step, and which points are left.

Each runner keeps one repository and backs up every disk into it every night
with the night's date (blockvault `backup --time`, restic `backup --time`,
borg `create --timestamp`), so the three apply the same policy to the same
dates.  `retention()` is the measured step the issue compares: blockvault
`forget --gc` (one process), restic `forget --prune`, borg `prune` (one run per disk:
borg prunes by archive-name pattern) then `compact`.  `kept()` reads back,
per disk, the nights whose points are left, from each tool's own listing.

Every command is measured by `bench.measure.run_measured` (wall time, the
child's own rusage and peak RSS).  All three run with TZ=UTC, and blockvault's
forget is given `--tz UTC`, so day, week and month buckets are the same.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from typing import Any, Sequence

from bench.blockvault_runner import parse_json_output
from bench.measure import Measured, disk_usage, run_measured, settle, tool_version
from bench.workload import Night

POLICY_FLAGS = ("daily", "weekly", "monthly")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TZ"] = "UTC"
    env.update(extra)
    return env


def step_dict(name: str, m: Measured, **extra: Any) -> dict:
    """One measured command as results.json keeps it."""
    d = {"step": name, "ok": m.ok, "error": m.error(), "wall_s": round(m.wall_s, 4),
         "cpu_s": round(m.cpu_user_s + m.cpu_sys_s, 4), "peak_rss_bytes": m.peak_rss_bytes}
    d.update(extra)
    return d


def policy_args(policy: dict[str, int]) -> list[str]:
    out = []
    for rule in POLICY_FLAGS:
        if policy.get(rule):
            out += [f"--keep-{rule}", str(policy[rule])]
    return out


class LifecycleTool:
    """One repository, its nightly backups, its retention step."""

    name = "tool"

    def __init__(self, root: str, disks: Sequence[str], *, timeout: float):
        self.root = root
        self.repo = os.path.join(root, "repo")
        self.disks = list(disks)
        self.timeout = timeout
        self.backups: list[dict] = []  # one per (night, disk)
        self.steps: list[dict] = []  # init, retention commands, listing, extra
        self.failed = False
        self.info: dict[str, Any] = {}

    # -- to override -------------------------------------------------------
    def available(self) -> str | None:
        return None

    def version(self) -> str | None:
        raise NotImplementedError

    def _init(self) -> Measured:
        raise NotImplementedError

    def _backup(self, disk: str, night: Night, image: str, when: _dt.datetime) -> Measured:
        raise NotImplementedError

    def _retention(self, policy: dict[str, int]) -> list[tuple[str, Measured]]:
        raise NotImplementedError

    def _kept(self) -> dict[str, list[_dt.datetime]]:
        """disk -> times of the points left."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------
    def run(self, name: str, m: Measured, **extra: Any) -> dict:
        d = step_dict(name, m, **extra)
        self.steps.append(d)
        self.failed |= not m.ok
        return d

    def init(self) -> bool:
        why = self.available()
        if why:
            self.steps.append({"step": "init", "ok": False, "error": why})
            self.failed = True
            return False
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)
        return self.run("init", self._init())["ok"]

    def backup(self, disk: str, night: Night, image: str, when: _dt.datetime) -> dict:
        settle()
        m = self._backup(disk, night, image, when)
        d = step_dict("backup", m, disk=disk, night=night.night)
        self.backups.append(d)
        self.failed |= not m.ok
        return d

    def stored(self) -> int:
        return disk_usage(self.repo)

    def retention(self, policy: dict[str, int]) -> dict:
        """The measured retention step: its commands one after the other."""
        before = self.stored()
        settle()
        runs = self._retention(policy)
        after = self.stored()
        for name, m in runs:
            self.run(name, m)
        return {"ok": all(m.ok for _, m in runs), "commands": [n for n, _ in runs],
                "wall_s": round(sum(m.wall_s for _, m in runs), 4),
                "cpu_s": round(sum(m.cpu_user_s + m.cpu_sys_s for _, m in runs), 4),
                "peak_rss_bytes": max((m.peak_rss_bytes for _, m in runs), default=0),
                "stored_before": before, "stored_after": after, "reclaimed_bytes": before - after,
                "per_command": {n: round(m.wall_s, 4) for n, m in runs}}

    def kept(self) -> dict[str, list[_dt.datetime]]:
        try:
            return self._kept()
        except (ValueError, KeyError, TypeError) as e:
            self.steps.append({"step": "list", "ok": False, "error": f"cannot read the listing: {e}"})
            self.failed = True
            return {}


def _utc(text: str) -> _dt.datetime:
    """An ISO time as the tools print it (restic: nanoseconds and an offset)."""
    text = text.strip().replace("Z", "+00:00")
    if "." in text:  # restic prints 9 fraction digits; fromisoformat takes 6
        head, rest = text.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        text = head + "." + digits[:6].ljust(6, "0") + rest[len(digits):]
    t = _dt.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc)


def _member(m: Measured, key: str) -> dict | None:
    """The top-level figures of one member of what a --json command said."""
    if not m.ok:
        return None
    try:
        doc = parse_json_output(m.stdout)
    except ValueError:
        return None
    part = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(part, dict):
        return None
    return {k: (len(v) if isinstance(v, list) else v) for k, v in part.items() if not isinstance(v, dict)}


def _scalars(m: Measured) -> dict | None:
    """What a --json command said, its top-level figures only (lists by their length)."""
    if not m.ok:
        return None
    try:
        doc = parse_json_output(m.stdout)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return {k: (len(v) if isinstance(v, list) else v) for k, v in doc.items() if not isinstance(v, dict)}


class BlockvaultLife(LifecycleTool):
    """blockvault: incrementals from the night's changed areas, `forget --gc`."""

    def __init__(self, root: str, disks: Sequence[str], *, command: Sequence[str], timeout: float,
                 name: str = "blockvault", init_args: Sequence[str] = ()):
        super().__init__(root, disks, timeout=timeout)
        self.name = name
        self.command = list(command)
        self.init_args = list(init_args)
        self.chains: set[str] = set()
        self.gc_args: list[str] = []

    def cli(self, *args: str) -> list[str]:
        return [*self.command, *args]

    def version(self) -> str | None:
        return tool_version(self.cli("--version"))

    def measured(self, *args: str) -> Measured:
        return run_measured([self.cli(*args)], env=_env(), timeout=self.timeout)

    def _init(self) -> Measured:
        return self.measured("init", self.repo, *self.init_args)

    def _backup(self, disk: str, night: Night, image: str, when: _dt.datetime) -> Measured:
        args = ["backup", self.repo, os.path.abspath(image), "--disk", disk, "--json",
                "--time", when.isoformat()]
        if disk in self.chains:
            args += ["--mode", "incremental", "--changed-areas", night.changed_areas]
        else:
            args += ["--mode", "full"]
        m = self.measured(*args)
        if m.ok:
            self.chains.add(disk)
        return m

    def full_backup(self, disk: str, image: str, when: _dt.datetime) -> Measured:
        m = self.measured("backup", self.repo, os.path.abspath(image), "--disk", disk, "--mode", "full",
                          "--json", "--time", when.isoformat())
        self.failed |= not m.ok
        return m

    def forget_gc(self, policy: dict[str, int]) -> Measured:
        return self.measured("forget", self.repo, "--all", *policy_args(policy), "--tz", "UTC",
                             "--gc", *self.gc_args, "--json")

    def _retention(self, policy: dict[str, int]) -> list[tuple[str, Measured]]:
        # One process: forget, then gc as soon as forget's transaction has
        # committed (`forget --gc`).  Two commands cost two interpreter start-ups,
        # which were most of the step's wall time.
        m = self.forget_gc(policy)
        self.info["forget"] = _scalars(m)
        self.info["gc"] = _member(m, "gc")
        return [("forget --gc", m)]

    def json_of(self, name: str, *args: str) -> Any:
        m = self.measured(*args)
        self.run(name, m)
        return parse_json_output(m.stdout) if m.ok else None

    def _kept(self) -> dict[str, list[_dt.datetime]]:
        doc = self.json_of("list", "list", self.repo, "--json")
        out: dict[str, list[_dt.datetime]] = {}
        for rec in (doc or {}).get("backups", []):
            t = _dt.datetime.fromtimestamp(float(rec["time"]), _dt.timezone.utc)
            out.setdefault(rec["disk"], []).append(t)
        return out


class ResticLife(LifecycleTool):
    """restic: one snapshot per disk and night (host `bench`, the image's path
    tells the disks apart, as restic's default grouping does), `forget --prune`."""

    name = "restic"
    password = "blockvault-bench"  # restic cannot store unencrypted; this is not a secret

    def available(self) -> str | None:
        return None if shutil.which("restic") else "restic is not installed (run bench/setup.sh)"

    def version(self) -> str | None:
        return tool_version(["restic", "version"])

    def env(self) -> dict[str, str]:
        return _env(RESTIC_REPOSITORY=self.repo, RESTIC_PASSWORD=self.password,
                    RESTIC_CACHE_DIR=os.path.join(self.root, "cache"), RESTIC_PROGRESS_FPS="0.2")

    def _run(self, *args: str) -> Measured:
        return run_measured([["restic", *args]], env=self.env(), timeout=self.timeout)

    def _init(self) -> Measured:
        return self._run("init", "--repository-version", "2")

    def _backup(self, disk: str, night: Night, image: str, when: _dt.datetime) -> Measured:
        return self._run("backup", "--json", "--host", "bench", "--tag", disk,
                         "--time", when.strftime("%Y-%m-%d %H:%M:%S"), os.path.abspath(image))

    def _retention(self, policy: dict[str, int]) -> list[tuple[str, Measured]]:
        return [("forget --prune", self._run("forget", *policy_args(policy), "--prune"))]

    def _kept(self) -> dict[str, list[_dt.datetime]]:
        m = self._run("snapshots", "--json")
        self.run("list", m)
        out: dict[str, list[_dt.datetime]] = {}
        for snap in json.loads(m.stdout) if m.ok else []:
            out.setdefault(snap["tags"][0], []).append(_utc(snap["time"]))
        return out


class BorgLife(LifecycleTool):
    """borg with its defaults (buzhash, lz4), archives `DISK-Tn`; `prune` per disk, then `compact`."""

    name = "borg"

    def available(self) -> str | None:
        return None if shutil.which("borg") else "borg is not installed (run bench/setup.sh)"

    def version(self) -> str | None:
        return tool_version(["borg", "--version"])

    def env(self) -> dict[str, str]:
        return _env(BORG_BASE_DIR=os.path.join(self.root, "base"),
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_DISPLAY_PASSPHRASE="no", BORG_PASSPHRASE="")

    def _run(self, *args: str, cwd: str | None = None) -> Measured:
        return run_measured([["borg", *args]], cwd=cwd, env=self.env(), timeout=self.timeout)

    def _init(self) -> Measured:
        return self._run("init", "-e", "none", self.repo)

    def _backup(self, disk: str, night: Night, image: str, when: _dt.datetime) -> Measured:
        # borg 1.2's --timestamp is UTC, yyyy-mm-ddThh:mm:ss.
        return self._run("create", "--timestamp", when.strftime("%Y-%m-%dT%H:%M:%S"),
                         f"{self.repo}::{disk}-T{night.night}", os.path.basename(image),
                         cwd=os.path.dirname(os.path.abspath(image)))

    def _retention(self, policy: dict[str, int]) -> list[tuple[str, Measured]]:
        runs = [(f"prune {d}", self._run("prune", *policy_args(policy), "--glob-archives", f"{d}-T*", self.repo))
                for d in self.disks]
        runs.append(("compact", self._run("compact", self.repo)))
        return runs

    def _kept(self) -> dict[str, list[_dt.datetime]]:
        m = self._run("list", "--json", self.repo)
        self.run("list", m)
        out: dict[str, list[_dt.datetime]] = {}
        for a in (json.loads(m.stdout)["archives"] if m.ok else []):
            disk = a["name"].rsplit("-T", 1)[0]
            out.setdefault(disk, []).append(_utc(a["time"]))
        return out
