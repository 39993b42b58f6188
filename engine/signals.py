"""SIGTERM and SIGHUP stop a command the way Ctrl-C does.

cron, systemd and a closed terminal stop a job with SIGTERM or SIGHUP, whose
default action kills the process on the spot: a backup would leave its packs
behind and a restore its ``TARGET.blockvault-partial``.  While a command runs
(``handled()``), those signals and SIGINT raise ``Interrupted``, a
``KeyboardInterrupt``, in the main thread, so every cleanup that already
runs for Ctrl-C runs for them too: the write session deletes its packs, a
restore removes its partial file, a vSphere backup removes its snapshot.

* Only the first signal interrupts.  Later ones (a closed terminal often
  sends SIGHUP twice) must not break into that cleanup half-way; SIGKILL
  still stops the process at once.
* Worker threads never see a signal; loops that run outside the main thread
  (one disk of a VM backup) call ``check()`` to stop soon after it.
* ``deferred()`` holds a signal back during a commit: an interrupt between
  the LMDB commit and the session marking itself committed would delete
  packs that the new backup references.
* A signal ignored when blockvault started (``nohup``) stays ignored.

The exit code is 128 + the signal's number, as a shell reports a process
killed by it: 130 SIGINT, 143 SIGTERM, 129 SIGHUP.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT, after_commit: bool = False):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.after_commit = after_commit   # the command's commit completed before it was acted on


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


class _State:
    def __init__(self):
        self.stopping = threading.Event()
        self.signum = 0
        self.deferring = 0
        self.pending = 0


_state = _State()


def _handler(signum, frame) -> None:
    if _state.stopping.is_set():
        _note(f"blockvault: {signal_name(signum)} ignored: already stopping after "
              f"{signal_name(_state.signum)} (SIGKILL stops at once)")
        return
    _state.signum = signum
    _state.stopping.set()
    if _state.deferring:
        _state.pending = signum
        return
    raise Interrupted(signum)


def _note(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, RuntimeError):  # terminal gone; stderr busy in this thread
        pass


@contextlib.contextmanager
def handled():
    """Turn SIGINT, SIGTERM and SIGHUP into ``Interrupted`` for the duration
    (main thread only); the previous handlers come back afterwards."""
    global _state
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state = _State()
    previous = {}
    for sig in HANDLED:
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state = _State()  # a library caller's later pipelines are not "stopping"


def ignored() -> list[int]:
    """The stop signals this command leaves ignored because they were ignored when
    it started: SIGINT for a command a script runs in the background (``cmd &``
    in a shell without job control), SIGHUP under ``nohup``.  A long-running
    command names only the signals that really stop it (``blockvault serve``)."""
    return [sig for sig in HANDLED if signal.getsignal(sig) is signal.SIG_IGN]


def stopping() -> bool:
    return _state.stopping.is_set()


def check() -> None:
    """For loops outside the main thread: stop once a signal has arrived."""
    if _state.stopping.is_set():
        raise Interrupted(_state.signum)


@contextlib.contextmanager
def deferred():
    """Act on a signal only after the block: for a commit that must finish
    once started.  A signal that arrived meanwhile is raised after it,
    marked ``after_commit``."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    # Reached only when the block completed; a failure keeps its own error.
    signum = _state.pending
    if signum and not _state.deferring:
        _state.pending = 0
        raise Interrupted(signum, after_commit=True)


# -- what the user is told ------------------------------------------------------------


def report(exc: KeyboardInterrupt, args) -> str:
    """What main() reports (after ``blockvault: ``): which signal, and what the
    interrupted command left behind; "the store is as it was" only where one
    was written."""
    signum = getattr(exc, "signum", signal.SIGINT)
    cause = "interrupted (SIGINT)" if signum == signal.SIGINT else f"terminated by {signal_name(signum)}"
    command = getattr(args, "command", None)
    if command == "vsphere":
        command = f"vsphere {getattr(args, 'vsphere_command', '')}"
    if getattr(exc, "after_commit", False):
        return (f"{cause} after {command} had committed its work; nothing was undone "
                "(see 'blockvault list')")
    return f"{cause}; {_aftermath(command, args)}"


def _is_block_device(path: str) -> bool:
    """A block device target is written in place (engine/targets.py): no partial file to remove."""
    import os
    import stat
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _aftermath(command: str, args) -> str:
    unchanged = "the store is as it was before this command"
    if command in ("backup", "vsphere backup"):
        what = "VM backup" if command == "vsphere backup" else "backup"
        return f"{what} aborted, its packs deleted; {unchanged}"
    if command in ("rebuild", "rebuild-index"):
        return (f"{command} aborted; {unchanged} (a damaged index it had already moved aside stays "
                "beside it as index/data.mdb.damaged-TIME: run the rebuild again)")
    if command == "restore":
        target = getattr(args, "target", "")
        if getattr(args, "rollback_from", None) or getattr(args, "rollback_compare", False):
            held = getattr(args, "rollback_from", None) or "what it held"
            return (f"rollback aborted; {target} may now hold a mix of {held} and {args.backup}: run the same "
                    "rollback again (or --rollback-compare) before using it")
        if "://" in target or _is_block_device(target):
            return (f"restore aborted; the disk {target} was partly overwritten: restore to it again "
                    "before using it")
        return f"restore aborted, its partial file removed; {target} is as it was"
    if command == "vsphere restore":
        return "VM restore aborted; a VM it had created is removed (see the warning above); the store was not written"
    if command == "init":
        return (f"init aborted; if {getattr(args, 'store', 'STORE')} now holds no config.json, remove it "
                "and run init again")
    if command == "demo":
        return f"demo aborted; {getattr(args, 'dir', 'its directory')} is left as it was at that moment"
    return "nothing was written"
