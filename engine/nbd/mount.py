"""``mount``/``umount``: a backup point as the file DIR/disk.raw, through nbdfuse.

nbdfuse (Debian libnbd-bin) runs nbdkit with blockvault's plugin as its
child (``--command nbdkit -s ...``: one process pair per mount, no socket)
and turns the export into a FUSE file.  ``mount`` starts nbdfuse in a
session of its own, waits for its pid file (written once the file is
served) and returns; ``umount`` runs ``fusermount3 -u``, after which
nbdfuse and its nbdkit exit by themselves.

What a mount was made from is kept in a small state file per directory
(under $XDG_RUNTIME_DIR, else the temporary directory, private to the
user), since the kernel lists a FUSE mount only as ``fuse /dev/fuse``.
A server that was killed leaves a mount whose every access fails with
ENOTCONN (or ECONNABORTED); ``mount`` and ``umount`` both recognise that and detach it, so
it never blocks the next mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time

from engine.errors import BadInputError, BusyError, ServeError, ToolMissingError
from engine.nbd import server as srv

log = logging.getLogger("blockvault.mount")

FILE_NAME = "disk.raw"
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0


def _state_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"blockvault-mounts-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_uid != os.getuid():
        raise BadInputError(f"{path} belongs to another user; set XDG_RUNTIME_DIR to a directory of your own")
    return path


def _state_path(directory: str) -> str:
    return os.path.join(_state_dir(), hashlib.sha256(directory.encode()).hexdigest()[:24] + ".json")


def _unescape(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_type(directory: str) -> str | None:
    """The file system type mounted at ``directory`` (None: not a mount point)."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape(fields[4]) == directory:
                sep = fields.index("-")
                found = fields[sep + 1]  # the last one listed is the one on top
    return found


# What a FUSE mount whose daemon died answers: ENOTCONN once the kernel has
# torn the connection down, ECONNABORTED while it is still doing so.
STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def _is_stale(directory: str) -> bool:
    try:
        os.stat(directory)
    except OSError as e:
        return e.errno in STALE_ERRNOS
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _read_state(directory: str) -> dict | None:
    try:
        with open(_state_path(directory)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _drop_state(directory: str, state: dict | None) -> None:
    for path in (_state_path(directory), (state or {}).get("log")):
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _fusermount(directory: str, lazy: bool) -> subprocess.CompletedProcess:
    tool = srv.require_tool("fusermount3", "fuse3")
    return subprocess.run([tool, "-u"] + (["-z"] if lazy else []) + [directory], capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, stdin=subprocess.DEVNULL)


def _detach_stale(directory: str) -> None:
    proc = _fusermount(directory, lazy=True)
    if proc.returncode != 0:
        raise ServeError(f"{directory}: cannot detach the stale mount left by a server that died: "
                         f"{proc.stderr.strip()}")
    log.warning(f"{directory}: detached a stale mount left by a server that died")


def _wait_gone(pid: int | None, timeout: float = EXIT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while pid and _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mount(store: str, record, directory: str, writable: bool, cache_bytes: int, s3_cache: str | None = None,
          s3_settings=None, key_text: str | None = None) -> dict:
    nbdfuse = srv.require_tool("nbdfuse", "libnbd-bin")
    srv.require_tool("fusermount3", "fuse3")
    srv.check_nbdkit()
    if not os.path.exists("/dev/fuse"):
        raise ToolMissingError("/dev/fuse does not exist: FUSE is not available here (load the fuse module, "
                               "or in a container pass --device /dev/fuse)")
    directory = os.path.realpath(directory)
    fstype = mount_type(directory)
    if fstype is not None:
        state = _read_state(directory)
        if _is_stale(directory):
            _detach_stale(directory)
            _drop_state(directory, state)
        elif state and _alive(state.get("pid", 0)):
            raise BusyError(f"{directory} already holds a mount of {state.get('id')}; "
                            f"run 'blockvault umount {directory}' first")
        else:
            raise BusyError(f"{directory} is a mount point ({fstype}); give an empty directory")
    if not os.path.isdir(directory):
        raise BadInputError(f"{directory} is not a directory; create an empty one to mount on")
    if os.listdir(directory):
        raise BadInputError(f"{directory} is not empty; the mount would hide its files: give an empty directory")

    work = tempfile.mkdtemp(prefix="blockvault-mount-")
    pidfile = os.path.join(work, "nbdfuse.pid")
    logfile = os.path.join(_state_dir(), os.path.basename(_state_path(directory))[:-5] + ".log")
    inner = srv.nbdkit_argv(store, record.id, srv.Endpoint(single=True), writable, cache_bytes, s3_cache=s3_cache)
    argv = [nbdfuse] + ([] if writable else ["-r"]) + ["-P", pidfile, os.path.join(directory, FILE_NAME),
                                                       "--command"] + inner
    key_file = None
    try:
        key_file = srv.key_handoff(key_text, work)   # an encrypted store's key, for the plugin only
        with open(logfile, "ab") as err:
            proc = subprocess.Popen(argv, env=srv.plugin_env(s3_settings, key_file), stdin=subprocess.DEVNULL,
                                    stdout=err,
                                    stderr=err, start_new_session=True, cwd="/")
        deadline = time.monotonic() + READY_TIMEOUT
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
            rc = proc.poll()
            if rc is not None or time.monotonic() > deadline:
                if rc is None:
                    proc.kill()
                    proc.wait()
                with open(logfile, errors="replace") as f:
                    tail = f.read()[-2000:].strip()
                raise ServeError(f"nbdfuse did not mount {record.id} on {directory}"
                                 + (f" (exit status {rc})" if rc is not None else f" within {READY_TIMEOUT:.0f} s")
                                 + (f": {tail}" if tail else ""))
            time.sleep(0.02)
    finally:
        for path in (pidfile, key_file or os.path.join(work, "store.key")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.rmdir(work)
    path = os.path.join(directory, FILE_NAME)
    doc = {"id": record.id, "directory": directory, "file": path, "size": record.size, "writable": writable,
           "pid": proc.pid}
    with open(_state_path(directory), "w") as f:
        json.dump({**doc, "store": srv.store_arg(store), "log": logfile}, f)
    return doc


def umount(directory: str) -> dict:
    directory = os.path.realpath(directory)
    state = _read_state(directory)
    fstype = mount_type(directory)
    if fstype is None:
        _drop_state(directory, state)
        raise BadInputError(f"{directory} is not mounted")
    stale = _is_stale(directory)
    if state is None and not stale:
        raise BadInputError(f"{directory} was not mounted by 'blockvault mount' (it is a {fstype} mount); "
                            "unmount it with the tool that mounted it")
    if stale:
        _detach_stale(directory)
    else:
        proc = _fusermount(directory, lazy=False)
        if proc.returncode != 0:
            message = proc.stderr.strip()
            if "busy" in message.lower():
                raise BusyError(f"{directory} is in use (a process has {FILE_NAME} open, or a loop device "
                                f"holds it); close it and run 'blockvault umount {directory}' again")
            raise ServeError(f"fusermount3 -u {directory} failed: {message}")
    pid = (state or {}).get("pid")
    if not _wait_gone(pid):
        log.warning(f"nbdfuse (pid {pid}) is still running {EXIT_TIMEOUT:.0f} s after the unmount")
    _drop_state(directory, state)
    return {"directory": directory, "id": (state or {}).get("id"), "stale": stale}
