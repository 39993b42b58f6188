"""The CLI's one logging setup: what goes to stderr, and to ``--log-file``.

Everything the engine has to tell a person — warnings (CBT fallbacks, a
source that changed identity...), the one-line summary of a backup,
restore or verify, the writer lock being waited for, errors — is a record
of the ``blockvault`` logger (or a child: ``blockvault.vsphere``,
``blockvault.store``...).  One handler writes them to stderr as
``blockvault: [warning: |error: ]MESSAGE``; stdout stays for data.

Levels: by default INFO (summaries, waits, warnings, errors); ``--quiet``
WARNING (warnings and errors only); ``-v`` DEBUG (per-disk figures, vSphere
steps).  ``--log-file FILE`` appends the same lines with a timestamp and the
pid, and always at least INFO, so a quiet cron job still leaves its summary
in the log.  The stderr handler ends a progress line before it writes.
"""

from __future__ import annotations

import logging
import os
import sys

from engine.progress import end_line

LOGGER = "blockvault"


def _prefix(record: logging.LogRecord) -> str:
    prefix = getattr(record, "bv_prefix", None)
    if prefix is None:
        # engine/vsphere logs its loudest warnings (CBT MISMATCH) at ERROR
        prefix = ("WARNING" if record.levelno >= logging.ERROR else
                  "warning" if record.levelno >= logging.WARNING else "")
    return f"{prefix}: " if prefix else ""


def _message(record: logging.LogRecord) -> str:
    # A warning may quote a server's or a library's text, which may repeat
    # the credentials it was given (engine/credentials.py).  Messages quote
    # paths, names and texts that someone else may have chosen (a store's
    # directory, a source's file name, a server's fault): a terminal control
    # sequence or a newline in them is written escaped, so one record stays
    # one line and cannot rewrite the screen or forge a "store OK".
    from engine.commandline import printable
    from engine.credentials import redact
    return printable(redact(record.getMessage()))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"blockvault: {_prefix(record)}{_message(record)}"


class _FileFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        from engine.commandline import iso_time
        return f"{iso_time(record.created)} [{record.process}] {_prefix(record)}{_message(record)}"


class StderrHandler(logging.Handler):
    """``blockvault: ...`` lines on the current sys.stderr, after the progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            end_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never fail the run
            self.handleError(record)


def setup(quiet: bool = False, verbose: int = 0, log_file: str | None = None) -> logging.Logger:
    """(Re)configure the ``blockvault`` logger for one command; idempotent."""
    log = logging.getLogger(LOGGER)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    stderr = StderrHandler(level)
    stderr.setFormatter(_Formatter())
    handlers: list[logging.Handler] = [stderr]
    try:
        if log_file:
            fh = logging.FileHandler(os.path.abspath(log_file), mode="a", encoding="utf-8")
            fh.setLevel(min(level, logging.INFO))
            fh.setFormatter(_FileFormatter())
            handlers.append(fh)
    finally:
        # The old handlers go only once the new ones exist: a --log-file that
        # cannot be opened is still reported on stderr.
        if len(handlers) == 1 + bool(log_file):
            for handler in list(log.handlers):
                if getattr(handler, "blockvault_cli", False):
                    log.removeHandler(handler)
                    handler.close()
    for handler in handlers:
        handler.blockvault_cli = True
        log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    # Records still propagate: the root logger has no handler in the CLI (so
    # nothing is printed twice), and in-process callers such as pytest's
    # caplog still see them.
    return log


def reset() -> None:
    """Remove the CLI's handlers (for in-process callers that are done)."""
    log = logging.getLogger(LOGGER)
    for handler in list(log.handlers):
        if getattr(handler, "blockvault_cli", False):
            log.removeHandler(handler)
            handler.close()
    log.setLevel(logging.NOTSET)


def summary(text: str, details: list[str] | tuple = ()) -> None:
    """The one-line summary of a command (INFO), and its details (DEBUG, ``-v``)."""
    log = logging.getLogger(LOGGER)
    log.info(text)
    for line in details:
        log.debug(f"  {line}")
