"""Shared parts of the lifecycle fault tests (SIGKILL at random points of a real process).

Kill points: a forget or an upgrade spends most of its wall time starting the
interpreter and importing; its transaction and syncs take milliseconds.  A kill
at a uniformly random time would nearly always land before anything happened
(and on a busy machine start-up time varies by more than the whole write part).
So the child runs under ``strace -f`` tracing only its durable calls
(``fsync``, ``fdatasync``, ``pwrite64``, ``rename``, ``unlink``, ...), each
delayed by strace's ``inject=...:delay_enter``.  The test waits until the trace
shows the first of them, then kills after a random part of the time the durable
part took in a calibration run: the kill lands between two durable steps, or
after the last.  Without strace (outside CI) the kill time is uniform over the
whole run, which still tests the early part.

After every kill the store is checked in full by `check_store`: verify passes
(the reference counts too, once the store keeps them), the catalog and the
manifests name the same points, and every point left restores byte-identical
to the image it was taken of.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import pytest

from engine.catalog import CATALOG_DB
from engine.manifest import MANIFESTS_DB
from engine.repository import Repository
from engine.restore import restore_backup
from engine.verify import verify_repository
from helpers import REPO_ROOT, run_cli, same_file

DELAYED = "fsync,fdatasync,pwrite64,pwritev,rename,renameat,renameat2,unlink,unlinkat"
DELAY_US = 25_000


def strace_path() -> str | None:
    """strace, if it can trace here; in CI its absence fails the test."""
    path = shutil.which("strace")
    if path and subprocess.run([path, "-f", "-o", os.devnull, "true"]).returncode == 0:
        return path
    if os.environ.get("CI"):
        pytest.fail("strace is missing or cannot trace; CI must run the lifecycle fault tests with it "
                    "(tools/install.sh --test installs strace)")
    return None


def cli_argv(*args: str, strace: str | None = None, trace: str | None = None) -> list[str]:
    """The CLI; under strace, with the durable calls delayed and logged (-ttt) to ``trace``."""
    argv = [sys.executable, "-m", "engine.cli", *args]
    if strace:
        argv = [strace, "-f", "-qq", "-ttt", "-o", trace or os.devnull, "-e", f"trace={DELAYED}", "-e", "signal=none",
                "-e", f"inject={DELAYED}:delay_enter={DELAY_US}", *argv]
    return argv


def start(argv: list[str]) -> subprocess.Popen:
    """A child in its own process group (strace and its tracee die together)."""
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL the child's group; True if it was still running."""
    running = proc.poll() is None
    if running:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            running = False
    proc.wait()
    return running


def _durable_stamps(trace: str) -> list[float]:
    """Times of the durable calls in a trace (``PID TIME call(...)`` lines; not signals)."""
    out = []
    with open(trace) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[2].split("(", 1)[0] in DELAYED.split(","):
                out.append(float(parts[1]))
    return out


def durable_span(trace: str) -> float:
    """Seconds from the first to the last durable call of a whole traced run."""
    stamps = _durable_stamps(trace)
    assert stamps, "the traced run made no durable call"
    return max(stamps) - min(stamps) + DELAY_US / 1e6


def wait_first_durable(trace: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Waits until the trace shows a durable call; False if the child ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(trace) and _durable_stamps(trace):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.003)
    raise AssertionError("the child made no durable call in time")


class Killer:
    """Runs a command and SIGKILLs it at a random point of its durable part."""

    def __init__(self, argv: tuple[str, ...], tmp: str, chooser):
        self.argv, self.tmp, self.chooser = argv, tmp, chooser
        self.strace = strace_path()
        self.span = None
        self.whole = None
        self.n = 0
        self.last: subprocess.Popen | None = None

    def _trace(self) -> str:
        self.n += 1
        path = os.path.join(self.tmp, f"trace-{self.n}")
        if os.path.exists(path):
            os.unlink(path)
        return path

    def calibrate(self) -> subprocess.CompletedProcess:
        """One whole run (it must succeed): how long its durable part takes."""
        trace = self._trace()
        self.whole, proc = timed(cli_argv(*self.argv, strace=self.strace, trace=trace))
        assert proc.returncode == 0, proc.stderr
        if self.strace:
            self.span = durable_span(trace)
        return proc

    def run_and_kill(self) -> bool:
        """True if the child was killed (False: it had finished)."""
        trace = self._trace()
        proc = start(cli_argv(*self.argv, strace=self.strace, trace=trace))
        if self.strace:
            if wait_first_durable(trace, proc):
                time.sleep(self.chooser.uniform(0, self.span * 1.3))
        else:
            time.sleep(self.chooser.uniform(0, self.whole * 1.1))
        self.last = proc
        return kill_group(proc)


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0, proc


def writers_share_the_store(tmp: str) -> bool:
    """Whether this tree's writers run side by side (issue 10's concurrency):
    with STORE/lock held shared here, a backup must go through rather than
    fail as busy.  Probed on a scratch store, by behaviour."""
    store = os.path.join(tmp, "probe-store")
    img = os.path.join(tmp, "probe.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
        f.write(b"probe")
    assert run_cli("init", store).returncode == 0
    fd = os.open(os.path.join(store, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        proc = run_cli("backup", store, img, "--disk", "probe")
    finally:
        os.close(fd)
    shutil.rmtree(store)
    os.unlink(img)
    return proc.returncode == 0


def catalog_ids(store: str) -> set[str]:
    with Repository.open(store) as repo, repo.store.read_txn() as txn:
        return {rec.id for rec in repo.catalog.all(txn)}


def _keys(store: str, name: bytes) -> set[bytes]:
    env = lmdb.open(os.path.join(store, "index"), readonly=True, max_dbs=64, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(name, txn=txn, create=False)
            return {bytes(k) for k, _ in txn.cursor(db=db)}
    finally:
        env.close()


def check_store(store: str, expected: dict[str, str], scratch: str) -> dict:
    """verify passes, catalog and manifests agree, every point restores identical;
    returns verify's report.  ``expected``: every point that must be in the
    store -> a copy of its image."""
    with Repository.open(store) as repo:
        report = verify_repository(repo, mark=False)
        assert report.ok, report.as_dict()
    assert _keys(store, CATALOG_DB) == _keys(store, MANIFESTS_DB), "a point half removed: catalog and manifests differ"
    ids = catalog_ids(store)
    assert ids == set(expected), (sorted(ids), sorted(expected))
    with Repository.open(store) as repo:
        for ident in sorted(ids):
            out = os.path.join(scratch, "restored.img")
            restore_backup(repo, ident, out, force=True)
            assert same_file(out, expected[ident]), f"{ident} does not restore identical"
            os.unlink(out)
    return report.as_dict()
