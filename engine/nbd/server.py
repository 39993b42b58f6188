"""One nbdkit serving one backup point: its command line, start, readiness, stop.

nbdkit runs blockvault's plugin (engine/nbd/export.py through
plugin_shim.py) in Debian's embedded Python 3.11; this module checks that the
interpreter blockvault runs on can be loaded there (same minor version, so
the same cp311 extension ABI), tells the shim where this interpreter's
packages are (BLOCKVAULT_NBDKIT_SITE), and builds the command:

    nbdkit --exit-with-parent -P PIDFILE (-r | --filter=cow)
           (-U SOCKET | -i ADDR -p PORT | -s) [--run CMD]
           python .../plugin_shim.py store=... point=... cache=... stats=...

``--exit-with-parent``: a killed ``blockvault serve`` takes its nbdkit with
it.  The pid file is written once nbdkit listens, which is how ``serve``
knows the export is ready before it prints the URI.  One nbdkit per point:
the cow overlay is then private to that server (reference/nbd.md).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shlex
import shutil
import site
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass

from engine.errors import BadInputError, BusyError, ServeError, ToolMissingError

log = logging.getLogger("blockvault.serve")

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin_shim.py")
DEFAULT_PORT = 10809
READY_TIMEOUT = 60.0
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes with the final NUL
INSTALL_HINT = "on Debian or Ubuntu: apt-get install nbdkit nbdkit-plugin-python libnbd-bin"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"{name} is not installed (Debian package {package}); {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def python_plugin_version() -> str:
    """The Python version nbdkit's Python plugin was built with (``3.11.1``)."""
    nbdkit = require_tool("nbdkit", "nbdkit")
    try:
        proc = subprocess.run([nbdkit, "python", "--dump-plugin"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ServeError("'nbdkit python --dump-plugin' did not answer in 30 s") from None
    if proc.returncode != 0:
        raise ToolMissingError("nbdkit's Python plugin is not installed (Debian package nbdkit-plugin-python); "
                               + INSTALL_HINT)
    for line in proc.stdout.splitlines():
        if line.startswith("python_version="):
            return line.split("=", 1)[1].strip()
    return ""


def check_nbdkit() -> None:
    """nbdkit and its Python plugin are installed, and can load this interpreter's packages."""
    built = python_plugin_version()
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if built and ".".join(built.split(".")[:2]) != mine:
        raise ToolMissingError(
            f"nbdkit's Python plugin embeds Python {built}, blockvault runs on Python {sys.version.split()[0]}: "
            f"its C extensions cannot load there; run blockvault on Python {'.'.join(built.split('.')[:2])}, "
            "the version Debian's nbdkit-plugin-python is built for")


def site_dirs() -> list[str]:
    """Where this interpreter's packages are, for the shim (editable installs' .pth included)."""
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str):
        dirs.append(user)
    return [d for d in dirs if os.path.isdir(d)]


def embedded_python_home() -> str | None:
    """The home of the interpreter nbdkit's plugin embeds (Debian's, under /usr).

    Left to itself, the embedded interpreter looks for ``python3`` on PATH to find its
    standard library, and under pyenv that is pyenv's 3.11.7: its pure-Python modules
    load, but its C extensions do not (``_ssl``: undefined symbol), so boto3 could not
    import and a store in a bucket could not be served."""
    home = "/usr"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return home if os.path.isfile(os.path.join(home, "lib", version, "os.py")) else None


def run_command(run: str) -> str:
    """``--run CMD`` as nbdkit runs it: with the caller's PYTHONHOME, not the one given
    to nbdkit's embedded interpreter (a Python the command starts must find its own)."""
    before = os.environ.get("PYTHONHOME")
    restore = "unset PYTHONHOME" if before is None else f"export PYTHONHOME={shlex.quote(before)}"
    return f"{restore}; {run}"


def plugin_env(s3_settings=None) -> dict[str, str]:
    """nbdkit's environment: where the packages are, and for a store in a bucket how to
    reach it (the environment, never argv: nbdkit's command line is visible in ps)."""
    env = dict(os.environ)
    env["BLOCKVAULT_NBDKIT_SITE"] = os.pathsep.join(site_dirs())
    home = embedded_python_home()
    if home:
        env["PYTHONHOME"] = home
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if s3_settings is not None:
        env.update(s3_settings.as_env())
    return env


def store_arg(store: str) -> str:
    """The plugin's store= parameter: a directory made absolute (nbdkit runs elsewhere), a URL as it is."""
    from chunkstore.s3settings import is_store_url
    return store if is_store_url(store) else os.path.abspath(store)


def unix_uri(path: str) -> str:
    return "nbd+unix:///?socket=" + urllib.parse.quote(os.path.abspath(path), safe="/")


def tcp_uri(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    return f"nbd://{host}:{port}/"


def prepare_socket(path: str) -> None:
    """Make ``path`` free for a new server: a socket left by a killed server
    (nothing answers on it) is removed; a live one, or any other file, is
    refused."""
    if len(os.fsencode(os.path.abspath(path))) > MAX_SOCKET_PATH:
        raise BadInputError(f"--socket {path}: the path is {len(os.fsencode(os.path.abspath(path)))} bytes long, "
                            f"a Unix socket's may be {MAX_SOCKET_PATH} at most; give a shorter one")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise BadInputError(f"--socket {path}: directory {parent} does not exist") from None
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BadInputError(f"--socket {path} exists and is not a socket; give a new path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info(f"removing {path}, the socket of a server that is gone")
        os.unlink(path)
        return
    finally:
        probe.close()
    raise BusyError(f"--socket {path}: another server is listening there; stop it, or give another path")


def check_port(addr: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((addr, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise BusyError(f"port {port} on {addr} is in use; give another --port") from None
        raise BadInputError(f"cannot listen on {addr} port {port}: {e.strerror}") from None
    finally:
        probe.close()


@dataclass
class Endpoint:
    """Where the export listens: a Unix socket, a TCP address, or nbdkit's stdin (-s)."""

    socket: str | None = None
    addr: str | None = None
    port: int | None = None
    single: bool = False

    @property
    def uri(self) -> str:
        if self.socket:
            return unix_uri(self.socket)
        if self.port:
            return tcp_uri(self.addr or "127.0.0.1", self.port)
        return ""

    def args(self) -> list[str]:
        if self.single:
            return ["-s"]
        if self.socket:
            return ["-U", os.path.abspath(self.socket)]
        return ["-i", self.addr or "127.0.0.1", "-p", str(self.port)]


def nbdkit_argv(store: str, point: str, endpoint: Endpoint, writable: bool, cache_bytes: int,
                stats: str | None = None, pidfile: str | None = None, run: str | None = None,
                verbose: bool = False, parallel_requests: bool = False, s3_cache: str | None = None) -> list[str]:
    argv = [require_tool("nbdkit", "nbdkit")]
    if not endpoint.single:
        argv.append("--exit-with-parent")
    if pidfile:
        argv += ["-P", pidfile]
    argv += ["--filter=cow"] if writable else ["-r"]
    argv += endpoint.args()
    if verbose:
        argv.append("-v")
    if run is not None:
        argv += ["--run", run_command(run)]
    argv += ["python", PLUGIN, f"store={store_arg(store)}", f"point={point}", f"cache={cache_bytes}"]
    if s3_cache:
        argv.append(f"s3cache={os.path.abspath(s3_cache)}")   # a directory, no secret
    if stats:
        argv.append(f"stats={stats}")
    if parallel_requests:
        argv.append("threads=parallel")
    return argv


class Server:
    """A running nbdkit; ``wait_ready`` returns once it listens."""

    def __init__(self, argv: list[str], pidfile: str, captive: bool = False, s3_settings=None):
        self.argv = argv
        self.pidfile = pidfile
        self.proc = subprocess.Popen(argv, env=plugin_env(s3_settings), stdin=None if captive else subprocess.DEVNULL)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if os.path.exists(self.pidfile) and os.path.getsize(self.pidfile) > 0:
                return
            rc = self.proc.poll()
            if rc is not None:
                raise ServeError(f"nbdkit exited with status {rc} before it served the point "
                                 "(its messages are above)")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"nbdkit did not start serving within {timeout:.0f} s")
            time.sleep(0.02)

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if nbdkit does not exit in ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(f"nbdkit (pid {self.proc.pid}) did not exit within {timeout:.0f} s of SIGTERM "
                            "(a client request stuck in the plugin?); killing it with SIGKILL")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


TEMP_PREFIX = "blockvault-serve-"


def reap_stale_tempdirs(max_age: float = 2 * READY_TIMEOUT) -> None:
    """Remove the temporary directories (pid file, stats, default socket) of
    servers that were killed (SIGKILL leaves them): this user's, whose nbdkit
    is gone, or that never got a pid file and are older than any start-up."""
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            try:
                with open(os.path.join(path, "nbdkit.pid")) as f:
                    pid = int(f.read().strip() or 0)
            except FileNotFoundError:
                pid = None
            if pid is None and time.time() - st.st_mtime < max_age:
                continue  # a server starting now
            if pid and _process_alive(pid):
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def read_stats(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
