"""The peers, run on the same image night by night: restic, borg (its
default content-defined chunker, and fixed 4 MiB chunks with sparse
detection) and `tar --sparse | zstd -1` as the no-dedup baseline.

All use Debian's packages (bench/setup.sh installs them).  Repositories are
local and unencrypted where the tool allows it (`borg init -e none`); restic
always encrypts, so it gets a fixed password from the environment.  Each
tool's caches and configuration live under its own work folder, never in
$HOME, so runs do not leak into each other.
"""

from __future__ import annotations

import json
import os
import shutil

from bench.measure import Measured, StepRecord, ToolRunner, disk_usage, run_measured, tool_version
from bench.workload import Night


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Restic(ToolRunner):
    name = "restic"
    password = "blockvault-bench"  # restic cannot store unencrypted; this is not a secret

    def __init__(self, root: str, **kw):
        super().__init__(root, **kw)
        self.snapshots: dict[int, str] = {}
        self.image_path: str | None = None

    def available(self) -> str | None:
        return None if shutil.which("restic") else "restic is not installed (run bench/setup.sh)"

    def version(self) -> str | None:
        return tool_version(["restic", "version"])

    def env(self) -> dict[str, str]:
        return _env(RESTIC_REPOSITORY=self.repo, RESTIC_PASSWORD=self.password,
                    RESTIC_CACHE_DIR=os.path.join(self.root, "cache"),
                    RESTIC_PROGRESS_FPS="0.2")

    def _init(self) -> Measured:
        # Format 2 is the one with compression (zstd, "auto" level by default).
        return run_measured([["restic", "init", "--repository-version", "2"]],
                            env=self.env(), timeout=self.timeout)

    def _backup(self, night: Night, image: str, mode: str) -> Measured:
        self.image_path = os.path.abspath(image)
        return run_measured([["restic", "backup", "--json", "--host", "bench",
                              "--tag", f"T{night.night}", self.image_path]],
                            env=self.env(), timeout=self.timeout)

    def _parse_backup(self, m: Measured, rec: StepRecord) -> None:
        summary = [d for d in _json_lines(m.stdout) if d.get("message_type") == "summary"]
        if not summary:
            raise ValueError("no summary in restic's JSON output")
        s = summary[-1]
        self.snapshots[rec.night] = s["snapshot_id"]
        rec.extra["tool_report"] = {k: s.get(k) for k in (
            "snapshot_id", "data_added", "total_bytes_processed", "total_duration")}

    def _restore(self, night: int, target_dir: str) -> tuple[Measured, str]:
        snap = self.snapshots.get(night)
        if snap is None or self.image_path is None:
            raise LookupError(f"no snapshot of T{night}")
        m = run_measured([["restic", "restore", snap, "--target", target_dir]],
                         env=self.env(), timeout=self.timeout)
        return m, os.path.join(target_dir, self.image_path.lstrip("/"))

    def _verify(self) -> Measured:
        return run_measured([["restic", "check", "--read-data"]], env=self.env(), timeout=self.timeout)


class Borg(ToolRunner):
    """borg with its defaults (buzhash chunker, lz4)."""

    name = "borg"
    create_options: list[str] = []

    def __init__(self, root: str, **kw):
        super().__init__(root, **kw)
        self.archives: set[int] = set()
        self.image_name: str | None = None

    def available(self) -> str | None:
        return None if shutil.which("borg") else "borg is not installed (run bench/setup.sh)"

    def version(self) -> str | None:
        return tool_version(["borg", "--version"])

    def env(self) -> dict[str, str]:
        return _env(BORG_BASE_DIR=os.path.join(self.root, "base"),
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                    BORG_DISPLAY_PASSPHRASE="no", BORG_PASSPHRASE="")

    def _init(self) -> Measured:
        return run_measured([["borg", "init", "-e", "none", self.repo]], env=self.env(), timeout=self.timeout)

    def _backup(self, night: Night, image: str, mode: str) -> Measured:
        self.image_name = os.path.basename(image)
        return run_measured([["borg", "create", "--json", *self.create_options,
                              f"{self.repo}::T{night.night}", self.image_name]],
                            cwd=os.path.dirname(os.path.abspath(image)), env=self.env(),
                            timeout=self.timeout)

    def _parse_backup(self, m: Measured, rec: StepRecord) -> None:
        doc = json.loads(m.stdout)
        stats = doc["archive"]["stats"]
        self.archives.add(rec.night)
        rec.extra["tool_report"] = {k: stats.get(k) for k in (
            "original_size", "compressed_size", "deduplicated_size", "duration")}

    def _restore(self, night: int, target_dir: str) -> tuple[Measured, str]:
        if night not in self.archives or self.image_name is None:
            raise LookupError(f"no archive of T{night}")
        # --sparse: all-zero chunks become holes, as a disk image needs.
        m = run_measured([["borg", "extract", "--sparse", f"{self.repo}::T{night}"]],
                         cwd=target_dir, env=self.env(), timeout=self.timeout)
        return m, os.path.join(target_dir, self.image_name)

    def _verify(self) -> Measured:
        return run_measured([["borg", "check", "--verify-data", self.repo]], env=self.env(),
                            timeout=self.timeout)


class BorgFixed(Borg):
    """borg with fixed 4 MiB chunks and hole detection (its mode for disk images)."""

    name = "borg-fixed"
    create_options = ["--chunker-params", "fixed,4194304", "--sparse"]


class TarZstd(ToolRunner):
    """No deduplication: every night a whole `tar --sparse | zstd -1` archive.

    Archives no restore needs are deleted once measured (`keep` nights are
    kept), to save disk space; their size stays in stored_bytes_added and in
    info.pruned_bytes, so the cumulative figure is what keeping them costs."""

    name = "tar-zstd"

    def __init__(self, root: str, keep: set[int] | None = None, **kw):
        super().__init__(root, **kw)
        self.keep = keep
        self.archives: dict[int, str] = {}
        self.image_name: str | None = None
        self.info["pruned_bytes"] = 0

    def available(self) -> str | None:
        missing = [t for t in ("tar", "zstd") if not shutil.which(t)]
        return f"{', '.join(missing)} not installed (run bench/setup.sh)" if missing else None

    def version(self) -> str | None:
        tar = tool_version(["tar", "--version"])
        zstd = tool_version(["zstd", "--version"])
        return f"{tar}; {zstd}"

    def _init(self) -> Measured:
        return run_measured([["mkdir", "-p", self.repo]], timeout=self.timeout)

    def _archive(self, night: int) -> str:
        return os.path.join(self.repo, f"T{night}.tar.zst")

    def _backup(self, night: Night, image: str, mode: str) -> Measured:
        self.image_name = os.path.basename(image)
        out = self._archive(night.night)
        m = run_measured([
            ["tar", "--sparse", "-cf", "-", "-C", os.path.dirname(os.path.abspath(image)), self.image_name],
            ["zstd", "-1", "-q", "-f", "-o", out],
        ], timeout=self.timeout)
        if m.ok:
            self.archives[night.night] = out
        return m

    def backup(self, night: Night, image: str, last_night: int) -> StepRecord:
        rec = super().backup(night, image, last_night)
        if self.keep is not None:
            for n, path in list(self.archives.items()):
                if n not in self.keep:
                    size = disk_usage(path)
                    os.unlink(path)
                    del self.archives[n]
                    self.info["pruned_bytes"] += size
            self._stored = disk_usage(self.repo)
        return rec

    def _restore(self, night: int, target_dir: str) -> tuple[Measured, str]:
        if night not in self.archives or self.image_name is None:
            raise LookupError(f"no archive of T{night}")
        m = run_measured([["zstd", "-dcq", self.archives[night]],
                          ["tar", "-xf", "-", "-C", target_dir]], timeout=self.timeout)
        return m, os.path.join(target_dir, self.image_name)

    def _verify(self) -> Measured | None:
        if not self.archives:
            return None
        return run_measured([["zstd", "-tq", *[self.archives[n] for n in sorted(self.archives)]]],
                            timeout=self.timeout)


PEERS = {cls.name: cls for cls in (Restic, Borg, BorgFixed, TarZstd)}
