"""blockvault itself, through its CLI, with the same steps as the peers.

One store per chunk size of the sweep.  Night 1 is a full backup (the
engine finds the allocated extents itself), nights 2..n-1 are incrementals
fed the workload's changed-areas file (what CBT reported for that night),
night n is a differential fed the changes since T1.  Then `list` checks the
catalog, T1 and Tn are restored (and compared byte for byte by digest with
the image as it was that night), `verify` reads the store back and `stats`
reports what it holds.

The CLI (engine.cli) is used exactly as a user would:

    blockvault init STORE --chunk-size 1M --compression-level 3 [--digest D]
    blockvault backup STORE IMAGE --disk bench --mode full --json
    blockvault backup STORE IMAGE --disk bench --mode incremental --changed-areas F --json
    blockvault list STORE --disk bench --json
    blockvault restore STORE bench@N TARGET --json
    blockvault verify STORE --json
    blockvault stats STORE --json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import metadata
from typing import Any, Sequence

from bench.measure import Measured, StepRecord, ToolRunner, run_measured, settle, tool_version
from bench.units import chunk_label
from bench.workload import Night


# Keys of `verify --json` that list damage; any non-empty one fails the step
# even if the document says ok.
DAMAGE_KEYS = ("errors", "bad_chunks", "missing_packs", "damaged_manifests")


def parse_json_output(text: str) -> Any:
    """The JSON document a --json command printed: the whole output, or
    failing that its last line that parses (in case of stray log lines)."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line[:1] in "{[":
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError(f"no JSON in the output: {text[:200]!r}")


def _strings(doc: Any) -> list[str]:
    """Every string anywhere in a JSON document."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in _strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return []


class Blockvault(ToolRunner):
    kind = "blockvault"

    def __init__(self, root: str, chunk_size: int, *, command: Sequence[str] = ("blockvault",),
                 digest: str | None = None, compression_level: int | None = None,
                 disk: str = "bench", timeout: float | None = None, env: dict[str, str] | None = None):
        super().__init__(root, timeout=timeout)
        self.env = env  # None: this process's environment (an encrypted store's key source, else)
        self.chunk_size = chunk_size
        self.name = f"blockvault-{chunk_label(chunk_size)}"
        self.command = list(command)
        self.digest = digest
        self.compression_level = compression_level
        self.disk = disk
        self.ids: dict[int, str] = {}
        self._restore_reports: dict[int, Any] = {}
        self.info.update(chunk_size=chunk_size, digest=digest or "default",
                         compression_level=compression_level, disk=disk)

    def _cli(self, *args: str) -> list[str]:
        return [*self.command, *args]

    def available(self) -> str | None:
        if not shutil.which(self.command[0]):
            return f"{self.command[0]} is not on PATH"
        try:
            r = subprocess.run(self._cli("--help"), capture_output=True, text=True, timeout=120, env=self.env)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{' '.join(self._cli('--help'))} failed: {e}"
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            return f"{' '.join(self._cli('--help'))} exited {r.returncode}: {tail[0]}"
        return None

    def version(self) -> str | None:
        v = tool_version(self._cli("--version"), env=self.env)
        if v:
            return v
        try:
            return f"blockvault {metadata.version('blockvault')} (package metadata)"
        except metadata.PackageNotFoundError:
            return None

    def backup_mode(self, night: int, last_night: int) -> str:
        if night == 1:
            return "full"
        if night == last_night:
            return "differential"
        return "incremental"

    def _init(self) -> Measured:
        args = ["init", self.repo, "--chunk-size", chunk_label(self.chunk_size)]
        if self.digest:
            args += ["--digest", self.digest]
        if self.compression_level is not None:
            args += ["--compression-level", str(self.compression_level)]
        return run_measured([self._cli(*args)], timeout=self.timeout, env=self.env)

    def _backup(self, night: Night, image: str, mode: str) -> Measured:
        args = ["backup", self.repo, os.path.abspath(image), "--disk", self.disk, "--mode", mode]
        if mode == "incremental":
            args += ["--changed-areas", night.changed_areas]
        elif mode == "differential":
            args += ["--changed-areas", night.since_full_areas]
        return run_measured([self._cli(*args, "--json")], timeout=self.timeout, env=self.env)

    def _parse_backup(self, m: Measured, rec: StepRecord) -> None:
        doc = parse_json_output(m.stdout)
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise ValueError(f"backup --json printed no object with an 'id': {m.stdout[:200]!r}")
        if "stats" not in doc:
            raise ValueError("backup --json printed no 'stats'")
        backup_id = doc["id"]
        if not backup_id.startswith(f"{self.disk}@"):
            raise ValueError(f"backup id {backup_id!r} is not of the form {self.disk}@N")
        if backup_id in self.ids.values():
            raise ValueError(f"backup id {backup_id!r} was already given to an earlier backup")
        self.ids[rec.night] = backup_id
        rec.extra["backup_id"] = backup_id
        rec.extra["tool_report"] = doc["stats"]

    def list_backups(self) -> StepRecord:
        """`list --json` must show every backup this run made."""
        rec = StepRecord(self.name, "list")
        if not self.initialised():
            return self._skip(rec, "not initialised")
        settle()
        m = run_measured([self._cli("list", self.repo, "--disk", self.disk, "--json")],
                         timeout=self.timeout, env=self.env)
        self._record(rec, m)
        if m.ok:
            try:
                listed = set(_strings(parse_json_output(m.stdout)))
                missing = sorted(set(self.ids.values()) - listed)
                rec.extra["listed_ids"] = sorted(s for s in listed if s.startswith(f"{self.disk}@"))
                if missing:
                    rec.ok, rec.error = False, f"list --json does not show {', '.join(missing)}"
            except ValueError as e:
                rec.ok, rec.error = False, str(e)
            self.failed |= not rec.ok
        return rec

    def _restore(self, night: int, target_dir: str) -> tuple[Measured, str]:
        backup_id = self.ids.get(night)
        if backup_id is None:
            raise LookupError(f"no backup of T{night}")
        target = os.path.join(target_dir, "disk.img")
        m = run_measured([self._cli("restore", self.repo, backup_id, target, "--json")],
                         timeout=self.timeout, env=self.env)
        if m.ok:
            try:
                self._restore_reports[night] = parse_json_output(m.stdout)
            except ValueError:
                pass  # the report is a bonus; the restored bytes are what is checked
        return m, target

    def restore(self, night: Night, target_dir: str) -> StepRecord:
        rec = super().restore(night, target_dir)
        if night.night in self._restore_reports:
            rec.extra["tool_report"] = self._restore_reports[night.night]
        return rec

    def _verify(self) -> Measured:
        m = run_measured([self._cli("verify", self.repo, "--json")], timeout=self.timeout, env=self.env)
        if m.ok:
            try:
                doc = parse_json_output(m.stdout)
                self.info["verify"] = doc
                bad = isinstance(doc, dict) and (
                    doc.get("ok") is False or any(doc.get(k) for k in DAMAGE_KEYS))
                if bad:
                    m.returncodes.append(-1)
                    m.stderr += f"\nverify --json reports a problem: {json.dumps(doc)[:500]}"
            except ValueError as e:
                m.returncodes.append(-1)
                m.stderr += f"\n{e}"
        return m

    def finish(self) -> None:
        rec = StepRecord(self.name, "stats")
        if not self.initialised():
            self._skip(rec, "not initialised")
            return
        settle()
        m = run_measured([self._cli("stats", self.repo, "--json")], timeout=self.timeout, env=self.env)
        self._record(rec, m)
        if m.ok:
            try:
                self.info["stats"] = parse_json_output(m.stdout)
            except ValueError as e:
                rec.ok, rec.error = False, str(e)
                self.failed = True
