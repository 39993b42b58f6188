"""Fixtures that run blockvault's vCenter simulator (tools/vcsim) for tests.

The binary is built by ``tools/vcsim/build.sh`` into ``.cache/bin/vcsim`` at the
repository root; ``VCSIM_BIN`` overrides the path. Without the binary the tests
that use these fixtures are skipped, unless ``CI`` is set: then they fail, so a
CI run can never pass by silently testing nothing.

Each simulator runs on 127.0.0.1 with a port chosen by the kernel, keeps its
datastores under a pytest temporary directory (``TMPDIR``), and is stopped by
PID when the test ends, passed or failed: SIGTERM, then SIGKILL after a grace
period. ``-exit-with-parent`` makes it exit by itself should pytest be killed.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import quote, unquote, urlencode

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO_ROOT / ".cache" / "bin" / "vcsim"
START_TIMEOUT = 30.0  # seconds until the URL line must appear
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
URL_LINE = re.compile(r"GOVC_URL=(https?)://(?:([^:@\s]*):([^@\s]*)@)?([^:/\s]+):(\d+)(/\S*)\s+GOVC_SIM_PID=(\d+)")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


SKIP_MARK = "vSphere tests unavailable: "


def _unavailable(reason: str) -> None:
    if _ci():
        pytest.fail(f"vcsim tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(SKIP_MARK + reason)


def pytest_terminal_summary(terminalreporter) -> None:
    """One loud line at the end of the run when simulator tests were skipped: a
    green run that tested nothing of vSphere must not look like a full one."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if SKIP_MARK in text:
            why = text.split(SKIP_MARK, 1)[1]
            reasons[why] = reasons.get(why, 0) + 1
    for why, count in reasons.items():
        terminalreporter.write_line(f"vSphere tests SKIPPED ({count}): {why}; under CI (CI=true) this fails the run",
                                    red=True, bold=True)


def _binary() -> Path:
    path = Path(os.environ.get("VCSIM_BIN") or DEFAULT_BINARY)
    if not (path.is_file() and os.access(path, os.X_OK)):
        _unavailable(f"simulator binary {path} not built (run: bash tools/vcsim/build.sh, or set VCSIM_BIN)")
    return path


def _pyvmomi():
    try:
        from pyVim import connect
        from pyVmomi import vim
    except ImportError as exc:  # a declared dependency; missing means a broken env
        _unavailable(f"pyvmomi is not importable: {exc}")
    return connect, vim


class Vcsim:
    """One running simulator: where it listens, a connected ServiceInstance,
    and helpers to find a disk's flat file and to use datastore HTTP access."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int, user: str, pwd: str,
                 workdir: Path, stderr_path: Path):
        self.proc = proc
        self.pid = proc.pid
        self.host = host
        self.port = port
        # The URL line percent-encodes its user info (an '@' in a user name is %40).
        self.user = unquote(user or "user")
        self.pwd = unquote(pwd or "pass")
        self.workdir = workdir
        self.stderr_path = stderr_path
        self._sessions: list = []
        self.si = self.connect()

    # -- connection ---------------------------------------------------------

    def connect(self):
        """A new pyvmomi ServiceInstance (own session), closed at teardown."""
        connect, _ = _pyvmomi()
        si = connect.SmartConnect(host=self.host, port=self.port, user=self.user, pwd=self.pwd,
                                  disableSslCertValidation=True)
        self._sessions.append(si)
        return si

    @property
    def content(self):
        return self.si.RetrieveContent()

    @property
    def session_cookie(self) -> str:
        """``vmware_soap_session=<id>``: what a client sends in a Cookie header.
        pyvmomi keeps the whole Set-Cookie value (``...; HttpOnly``)."""
        return self.si._stub.cookie.split(";", 1)[0].strip()

    # -- inventory ----------------------------------------------------------

    @property
    def datacenter(self):
        _, vim = _pyvmomi()
        return next(e for e in self.content.rootFolder.childEntity if isinstance(e, vim.Datacenter))

    @property
    def datastore(self):
        return self.datacenter.datastore[0]

    def vm(self, name: str = "DC0_H0_VM0"):
        vm = self.content.searchIndex.FindByInventoryPath(f"{self.datacenter.name}/vm/{name}")
        assert vm is not None, f"no VM named {name}"
        return vm

    def wait(self, task):
        """Wait for a task like any pyvmomi client; returns info.result."""
        from pyVim.task import WaitForTask

        WaitForTask(task)
        return task.info.result

    @staticmethod
    def disks(config) -> list:
        """The VirtualDisks of a VirtualMachineConfigInfo (vm.config, snapshot.config)."""
        _, vim = _pyvmomi()
        return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]

    # -- disk files -----------------------------------------------------------

    def datastore_dir(self, name: Optional[str] = None) -> Path:
        """The local directory behind a datastore: its summary.url."""
        ds = self.datastore if name is None else next(d for d in self.datacenter.datastore if d.name == name)
        return Path(ds.summary.url)

    @staticmethod
    def split_datastore_path(ds_path: str) -> tuple[str, str]:
        """``"[LocalDS_0] vm/disk.vmdk"`` -> ``("LocalDS_0", "vm/disk.vmdk")``."""
        m = re.fullmatch(r"\[([^\]]+)\]\s*(.*)", ds_path)
        assert m, f"not a datastore path: {ds_path!r}"
        return m.group(1), m.group(2)

    def flat_ds_path(self, disk) -> str:
        """The datastore path of a disk's data: ``.vmdk`` -> ``-flat.vmdk``."""
        name = disk.backing.fileName
        assert name.endswith(".vmdk"), name
        return name[: -len(".vmdk")] + "-flat.vmdk"

    def flat_path(self, disk) -> Path:
        """The local file holding a disk's bytes (a raw image)."""
        ds, rel = self.split_datastore_path(self.flat_ds_path(disk))
        return self.datastore_dir(ds) / rel

    # -- datastore HTTP access (/folder) --------------------------------------

    def folder_url(self, ds_path: str) -> str:
        """``/folder/<path>?dcPath=<dc>&dsName=<ds>`` for a datastore path."""
        ds, rel = self.split_datastore_path(ds_path)
        query = urlencode({"dcPath": self.datacenter.name, "dsName": ds})
        return f"/folder/{quote(rel)}?{query}"

    def http(self, method: str, ds_path: str, body: bytes = None, headers: dict = None,
             cookie: bool = True) -> tuple[int, dict, bytes]:
        """One HTTPS request on a datastore file; returns (status, headers, body)."""
        hdrs = dict(headers or {})
        if cookie:
            hdrs["Cookie"] = self.session_cookie
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=30,
                                           context=ssl._create_unverified_context())
        try:
            conn.request(method, self.folder_url(ds_path), body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    # -- lifetime -------------------------------------------------------------

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Log out, then stop the process by PID: SIGTERM, SIGKILL if needed."""
        connect, _ = _pyvmomi()
        while self._sessions:
            si = self._sessions.pop()
            with contextlib.suppress(Exception):
                connect.Disconnect(si)
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running_vcsim(binary: Path, workdir: Path, args: Sequence[str] = ()) -> Iterator[Vcsim]:
    """Start the simulator, wait for its URL line, yield it, always stop it."""
    _pyvmomi()
    workdir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = workdir / "vcsim.stdout", workdir / "vcsim.stderr"
    env = dict(os.environ, TMPDIR=str(workdir))
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        # Files, not pipes: nothing has to keep draining them, and a late
        # write can never hit a closed pipe.
        proc = subprocess.Popen([str(binary), "-l", "127.0.0.1:0", "-exit-with-parent", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
    sim = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        match = None
        while match is None:
            match = URL_LINE.search(stdout_path.read_text(errors="replace"))
            if match:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"vcsim exited with {proc.returncode} before printing its URL:\n"
                                   f"{stderr_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vcsim printed no URL within {START_TIMEOUT} s:\n"
                                   f"{stderr_path.read_text(errors='replace')}")
            time.sleep(0.02)
        _, user, pwd, host, port, _, pid = match.groups()
        assert int(pid) == proc.pid, (pid, proc.pid)
        sim = Vcsim(proc, host, int(port), user, pwd, workdir, stderr_path)
        yield sim
    finally:
        if sim is not None:
            sim.stop()
        else:
            _stop(proc)


@pytest.fixture(scope="session")
def vcsim_bin() -> Path:
    """Path of the simulator binary (skip without it, fail under CI)."""
    return _binary()


@pytest.fixture
def vcsim(vcsim_bin, tmp_path) -> Iterator[Vcsim]:
    """A fresh simulator (default VPX inventory) for one test.

    Yields a :class:`Vcsim`: ``host``, ``port``, ``pid``, ``si`` (a connected
    pyvmomi ServiceInstance) and helpers.
    """
    with running_vcsim(vcsim_bin, tmp_path / "vcsim") as sim:
        yield sim


@pytest.fixture
def vcsim_factory(vcsim_bin, tmp_path):
    """Start simulators with extra command-line flags, e.g.
    ``vcsim_factory("-cbt-window-extents", "2")``; all stopped at teardown."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(*args: str) -> Vcsim:
            nonlocal count
            count += 1
            return stack.enter_context(running_vcsim(vcsim_bin, tmp_path / f"vcsim{count}", args))

        yield start
