"""Shared parts of the lifecycle fault tests (SIGKILL at random points of a real process).

Kill points: a forget or an upgrade spends most of its wall time starting the
interpreter and importing; its transaction and syncs take milliseconds.  A kill
at a uniformly random time would nearly always land before anything happened.
So the child runs under ``strace -f`` with a delay injected before every
``fsync``, ``fdatasync``, ``pwrite64``, ``rename`` and ``unlink`` (strace's
``inject=...:delay_enter``): the durable steps of the command are stretched
out, and a kill at a random time between the first of them and the end lands
between two of them.  Without strace (outside CI) the kill time is uniform over
the whole run, which still tests the early part.

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
DELAY_US = 40_000


def strace_path() -> str | None:
    """strace, if it can trace here; in CI its absence fails the test."""
    path = shutil.which("strace")
    if path and subprocess.run([path, "-f", "-o", os.devnull, "true"]).returncode == 0:
        return path
    if os.environ.get("CI"):
        pytest.fail("strace is missing or cannot trace; CI must run the lifecycle fault tests with it "
                    "(tools/install.sh --test installs strace)")
    return None


def cli_argv(*args: str, strace: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "engine.cli", *args]
    if strace:
        argv = [strace, "-f", "-qq", "-o", os.devnull, "-e", f"trace={DELAYED}",
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


def check_store(store: str, expected: dict[str, str], scratch: str) -> None:
    """verify passes, catalog and manifests agree, every point restores identical.
    ``expected``: every point that must be in the store -> a copy of its image."""
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
