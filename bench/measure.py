"""Running a tool's command and measuring it, the same way for every tool.

`run_measured` starts one command, or a pipeline (tar | zstd), each through
a small launcher that reaps it with os.wait4, so it gets the kernel's own
account of that child: CPU seconds (user + system, every thread, and any
children the process waited for) and peak resident set size.  Wall time
runs from the first command's start to the last one's end.  `disk_usage`
is `du -sB1` in Python.

`ToolRunner` is the shape of every runner (the peers and blockvault): it
turns measured runs into step records with the same fields for every tool,
so the report can put them side by side.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from bench.units import mbps
from bench.workload import ImageScan, Night, scan_image

STEP_FIELDS = (
    "tool", "step", "night", "mode", "ok", "error",
    "wall_s", "cpu_user_s", "cpu_sys_s", "cpu_s", "peak_rss_bytes",
    "logical_bytes", "data_bytes", "nonzero_bytes", "logical_MBps", "data_MBps",
    "stored_bytes", "stored_bytes_added", "identical", "limit_s", "fraction_of_limit",
)


@dataclass
class Measured:
    argv: list[list[str]]
    returncodes: list[int]
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    peak_rss_bytes: int  # for a pipeline: the sum of each process's peak (they run together)
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def error(self) -> str | None:
        if self.ok:
            return None
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        failed = [(" ".join(a[:3]), rc) for a, rc in zip(self.argv, self.returncodes) if rc != 0]
        tail = self.stderr.strip().splitlines()[-6:]
        return f"{failed[0][0]}... exited {failed[0][1]}: " + " | ".join(tail)


# Peak RSS needs care: on exec, Linux keeps the old address space's
# high-water mark in the process's maxrss, and a child forked (or vforked)
# from this Python process starts from this process's size, hundreds of MiB
# after the limits sample.  So every measured command is started by a tiny
# launcher (a fresh `python -I -S`, a few MiB) that forks it, reaps it with
# os.wait4 and writes the child's own rusage and monotonic start/end times
# to a file.  The launcher's size is the floor of any peak RSS measured
# (`rss_floor()` reports it; results.json keeps it).
_LAUNCHER = r"""
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, ("cannot run %s: %s\n" % (argv[0], e)).encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
t1 = time.monotonic()
with open(out, "w") as f:
    f.write("%r %r %r %r %d" % (t0, t1, ru.ru_utime, ru.ru_stime, ru.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def _launch(argv: list[str], report: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, report, *argv]


def run_measured(cmds: Sequence[Sequence[str]], *, cwd: str | None = None,
                 env: dict[str, str] | None = None, timeout: float | None = None,
                 stdout_path: str | None = None) -> Measured:
    """Runs cmds[0] | cmds[1] | ... and measures it.  The last command's
    standard output goes to `stdout_path` if given (then `stdout` is empty),
    else it is captured.  Wall time runs from the first command's start to
    the last one's end; CPU seconds add up, and so do peak RSSs (the
    processes of a pipeline run at the same time)."""
    cmds = [list(c) for c in cmds]
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp, \
            tempfile.TemporaryFile() as out_tmp, tempfile.TemporaryFile() as err:
        reports = [os.path.join(tmp, f"rusage-{i}") for i in range(len(cmds))]
        out = open(stdout_path, "wb") if stdout_path else out_tmp
        procs: list[subprocess.Popen] = []
        t0 = time.perf_counter()
        try:
            prev = None
            for i, argv in enumerate(cmds):
                last = i == len(cmds) - 1
                p = subprocess.Popen(
                    _launch(argv, reports[i]), cwd=cwd, env=env,
                    stdin=prev.stdout if prev is not None else subprocess.DEVNULL,
                    stdout=out if last else subprocess.PIPE, stderr=err,
                    start_new_session=True)
                if prev is not None:
                    prev.stdout.close()  # the next process holds the pipe now
                procs.append(p)
                prev = p
        except BaseException:
            for p in procs:
                _kill(p)
                p.wait()
            if stdout_path:
                out.close()
            raise
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            for p in procs:
                _kill(p)

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            rcs = [p.wait() for p in procs]
        finally:
            if timer:
                timer.cancel()
        outer_wall = time.perf_counter() - t0
        starts, ends, user, system, rss = [], [], 0.0, 0.0, 0
        for path in reports:
            try:
                with open(path) as f:
                    a, b, u, s, r = f.read().split()
            except (OSError, ValueError):
                continue  # killed before it could report
            starts.append(float(a))
            ends.append(float(b))
            user += float(u)
            system += float(s)
            rss += int(r)
        complete = len(starts) == len(cmds)
        wall = max(ends) - min(starts) if complete else outer_wall
        if stdout_path:
            out.close()
            text = ""
        else:
            out_tmp.seek(0)
            text = out_tmp.read().decode(errors="replace")
        err.seek(0)
        errtext = err.read().decode(errors="replace")
    if not complete and not timed_out.is_set():
        rcs.append(-1)
        errtext += "\nthe launcher did not report the rusage of every process"
    return Measured(cmds, rcs, wall, user, system, rss, text, errtext[-20000:], timed_out.is_set())


def settle() -> None:
    """Called before every measured step: flushes what earlier steps (and
    the workload) left dirty, so one step's writeback does not slow the next."""
    os.sync()


_FLOOR: int | None = None


def rss_floor() -> int:
    """Peak RSS measured for `true`: the least any measured command can show."""
    global _FLOOR
    if _FLOOR is None:
        _FLOOR = run_measured([["true"]]).peak_rss_bytes
    return _FLOOR


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def disk_usage(path: str) -> int:
    """Bytes a directory (or file) occupies on disk, like `du -sB1`:
    allocated blocks, each inode counted once."""
    if not os.path.exists(path):
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(p: str) -> None:
        nonlocal total
        st = os.lstat(p)
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            total += st.st_blocks * 512

    add(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                add(os.path.join(root, name))
            except FileNotFoundError:
                pass
    return total


def tool_version(argv: Sequence[str], env: dict[str, str] | None = None) -> str | None:
    """First line a command prints about its version, or None if it cannot run."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text and r.returncode == 0 else None


@dataclass
class StepRecord:
    tool: str
    step: str  # init, backup, list, restore, verify, stats
    night: int | None = None
    mode: str | None = None
    ok: bool = False
    error: str | None = None
    wall_s: float | None = None
    cpu_user_s: float | None = None
    cpu_sys_s: float | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    logical_bytes: int | None = None
    data_bytes: int | None = None
    nonzero_bytes: int | None = None
    logical_MBps: float | None = None
    data_MBps: float | None = None
    stored_bytes: int | None = None
    stored_bytes_added: int | None = None
    identical: bool | None = None
    limit_s: float | None = None
    fraction_of_limit: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in STEP_FIELDS}
        for k in ("wall_s", "cpu_user_s", "cpu_sys_s", "cpu_s", "logical_MBps", "data_MBps",
                  "limit_s", "fraction_of_limit"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        d.update(self.extra)
        return d


class ToolRunner:
    """Base of every runner: a repository in `root`, steps measured alike.

    Subclasses implement the commands (`_init`, `_backup`, `_restore`,
    `_verify`) and say which nights they back up how (`backup_mode`).
    """

    name = "tool"
    kind = "peer"

    def __init__(self, root: str, *, timeout: float | None = None):
        self.root = root
        self.repo = os.path.join(root, "repo")
        self.timeout = timeout
        self.steps: list[StepRecord] = []
        self.failed = False
        self.info: dict[str, Any] = {}
        self._stored = 0

    # -- to override -------------------------------------------------------

    def version(self) -> str | None:
        raise NotImplementedError

    def available(self) -> str | None:
        """None when the tool can run here, else why not."""
        return None

    def backup_mode(self, night: int, last_night: int) -> str:
        return "full-read"

    def _init(self) -> Measured:
        raise NotImplementedError

    def _backup(self, night: Night, image: str, mode: str) -> Measured:
        raise NotImplementedError

    def _restore(self, night: int, target_dir: str) -> tuple[Measured, str]:
        """Restores a night into target_dir; returns the run and the restored file."""
        raise NotImplementedError

    def _verify(self) -> Measured | None:
        return None

    def _parse_backup(self, m: Measured, rec: StepRecord) -> None:
        """Picks the tool's own figures out of a backup run (optional)."""

    # -- measured steps ----------------------------------------------------

    def _record(self, rec: StepRecord, m: Measured | None, *, logical: int | None = None,
                data: int | None = None, nonzero: int | None = None) -> StepRecord:
        if m is not None:
            rec.ok = m.ok
            rec.error = m.error()
            rec.wall_s = m.wall_s
            rec.cpu_user_s = m.cpu_user_s
            rec.cpu_sys_s = m.cpu_sys_s
            rec.cpu_s = m.cpu_user_s + m.cpu_sys_s
            rec.peak_rss_bytes = m.peak_rss_bytes
        rec.logical_bytes, rec.data_bytes, rec.nonzero_bytes = logical, data, nonzero
        if rec.wall_s:
            rec.logical_MBps = mbps(logical, rec.wall_s)
            rec.data_MBps = mbps(data, rec.wall_s)
        stored = disk_usage(self.repo)
        rec.stored_bytes = stored
        rec.stored_bytes_added = stored - self._stored
        self._stored = stored
        if not rec.ok:
            self.failed = True
        self.steps.append(rec)
        return rec

    def _skip(self, rec: StepRecord, why: str) -> StepRecord:
        rec.ok = False
        rec.error = why
        self.failed = True
        self.steps.append(rec)
        return rec

    def init(self) -> StepRecord:
        rec = StepRecord(self.name, "init")
        why = self.available()
        if why:
            return self._skip(rec, why)
        if os.path.exists(self.root):
            shutil.rmtree(self.root)
        os.makedirs(self.root)
        settle()
        return self._record(rec, self._init())

    def initialised(self) -> bool:
        return bool(self.steps) and self.steps[0].step == "init" and self.steps[0].ok

    def backup(self, night: Night, image: str, last_night: int) -> StepRecord:
        mode = self.backup_mode(night.night, last_night)
        rec = StepRecord(self.name, "backup", night.night, mode)
        if not self.initialised():
            return self._skip(rec, "not initialised")
        data, nonzero = night.read_set(mode if mode in ("incremental", "differential") else "full")
        settle()
        m = self._backup(night, image, mode)
        if m.ok:
            try:
                self._parse_backup(m, rec)
            except Exception as e:  # a tool's report we cannot read is a failure too
                m.returncodes.append(-1)
                m.stderr += f"\ncannot read the tool's output: {e!r}"
        return self._record(rec, m, logical=night.size, data=data, nonzero=nonzero)

    def restore(self, night: Night, target_dir: str) -> StepRecord:
        rec = StepRecord(self.name, "restore", night.night)
        if not self.initialised():
            return self._skip(rec, "not initialised")
        if os.path.exists(target_dir):
            shutil.rmtree(target_dir)
        os.makedirs(target_dir)
        settle()
        try:
            m, restored = self._restore(night.night, target_dir)
        except LookupError as e:  # nothing to restore (the backup failed)
            return self._skip(rec, str(e))
        if m.ok and os.path.isfile(restored):
            # A restore counts until its data is durable: blockvault fsyncs
            # the target itself, the peers do not, so every tool's restore is
            # followed by `sync FILE` (fsync), measured as part of the step.
            s = run_measured([["sync", restored]], timeout=self.timeout)
            rec.extra["tool_wall_s"] = round(m.wall_s, 4)
            rec.extra["sync_wall_s"] = round(s.wall_s, 4)
            m = Measured(m.argv + s.argv, m.returncodes + s.returncodes, m.wall_s + s.wall_s,
                         m.cpu_user_s + s.cpu_user_s, m.cpu_sys_s + s.cpu_sys_s,
                         max(m.peak_rss_bytes, s.peak_rss_bytes), m.stdout, m.stderr + s.stderr,
                         m.timed_out or s.timed_out)
        data, nonzero = night.read_set("restore")
        self._record(rec, m, logical=night.size, data=data, nonzero=nonzero)
        if m.ok:
            if not os.path.isfile(restored):
                rec.ok, rec.identical = False, False
                rec.error = f"restored file {restored} does not exist"
            else:
                got: ImageScan = scan_image(restored)
                same, why = night.scan.same_content(got)
                rec.identical = same
                rec.extra["restored_allocated_bytes"] = got.allocated_bytes
                if not same:
                    rec.ok = False
                    rec.error = f"restore of T{night.night} differs: {why}"
            if not rec.ok:
                self.failed = True
        shutil.rmtree(target_dir, ignore_errors=True)
        return rec

    def verify(self) -> StepRecord | None:
        rec = StepRecord(self.name, "verify")
        if not self.initialised():
            return self._skip(rec, "not initialised")
        settle()
        m = self._verify()
        if m is None:
            return None
        return self._record(rec, m, logical=None, data=self._stored, nonzero=None)

    def finish(self) -> None:
        """Last words after every step (e.g. stats); nothing by default."""

    def results(self) -> dict:
        return {
            "kind": self.kind,
            "version": self.version(),
            "ok": not self.failed,
            "stored_bytes_final": self._stored,
            "info": self.info,
            "steps": [s.as_dict() for s in self.steps],
        }

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def log(t0: float, msg: str) -> None:
    """One progress line of a bench mode on stderr, stamped with the seconds since ``t0``."""
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def same_bytes(a: str, b: str) -> bool:
    """Whether two files hold the same bytes (a restore against its image)."""
    if not os.path.exists(a) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def fresh_dirs(out: str, work: str | None) -> tuple[str, str]:
    """(OUT, WORK) as absolute paths: OUT made if missing, WORK (default OUT/work) made anew."""
    out = os.path.abspath(out)
    work = os.path.abspath(work or os.path.join(out, "work"))
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    return out, work
