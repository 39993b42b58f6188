"""What every blockvault command shares: options, JSON or text output, failures, tables.

Both command groups (engine/cli/ and engine/vsphere/cli.py) build their
commands with these, so ``--json``, ``--quiet``/``-v``/``--log-file``, help
epilogs, error documents and table layout behave the same everywhere.  The
JSON shapes are documented in docs/JSON.md (and tested against it).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGED, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

# JSON keys holding a unix time: each gets an ISO 8601 twin, ``KEY_iso``.
TIME_KEYS = ("time", "since")


class CommandLineError(Exception):
    """A command line argparse refused; raised instead of argparse's own exit."""

    exit_code = EXIT_USAGE

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (as CommandLineError) so that main()
    reports it like every other failure: on stderr, and as a JSON error
    document with ``--json``.  Subparsers inherit the class."""

    def error(self, message: str):
        raise CommandLineError(self, message)


def common_options(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--json``, ``-q``, ``-v``, ``--log-file``: accepted before the command
    name and after it.  On subcommands the defaults are suppressed so that a
    value given before the command name is not overwritten."""
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = parser.add_argument_group("output")
    g.add_argument("--json", action="store_true", default=default(False),
                   help="print one JSON document on stdout (docs/JSON.md), also on failure; no progress")
    g.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="stderr gets warnings and errors only (no summary line, no progress)")
    g.add_argument("-v", "--verbose", action="count", default=default(0),
                   help="more detail on stderr (per-disk figures, vSphere steps)")
    g.add_argument("--log-file", metavar="FILE", default=default(None),
                   help="also append every stderr message, with a timestamp, to FILE")


def add_command(subparsers, name: str, func, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with an example in its help and the common output options."""
    heading = "examples" if "\n" in example else "example"
    sp = subparsers.add_parser(name, help=help_text, description=help_text, epilog=f"{heading}:\n  {example}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(func=func)
    common_options(sp)
    return sp


def iso_time(t: float) -> str:
    """A unix time as ISO 8601 with the local offset, e.g. 2026-12-01T14:52:56+01:00."""
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def with_iso_times(doc):
    """A copy of ``doc`` where every ``time``/``since`` number has a ``..._iso`` twin."""
    if isinstance(doc, list):
        return [with_iso_times(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {}
    for key, value in doc.items():
        out[key] = with_iso_times(value)
        if key in TIME_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{key}_iso"] = iso_time(value)
    return out


def _dump(doc: dict) -> None:
    json.dump(with_iso_times(doc), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def emit(args, doc: dict, text: str) -> None:
    """One JSON document with ``--json`` (``ok`` true unless the document says
    otherwise), else the human text (if any)."""
    if args.json:
        _dump({"ok": True, **doc})
    elif text:
        print(text)


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (ESC and the other C0
    and C1 controls, DEL, newlines, bidirectional overrides) written as a Python
    escape (``\x1b``, ``\n``, ``\u202e``).  For text from a store, which may
    have been written by someone else: an escape sequence in a catalog entry
    must not retitle, recolour or rewrite the terminal of whoever lists it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def print_table(rows: list[tuple[str, ...]]) -> None:
    rows = [tuple(printable(str(cell)) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


# -- failures --------------------------------------------------------------------


def _code_table() -> list[tuple[type, str]]:
    """Exception class → stable ``error.code``, most specific first.  Imported
    here, not at start-up: the vSphere errors pull in ssl and http.client."""
    import lmdb

    from chunkstore import errors as se
    from engine import errors as ee
    from engine.vsphere import errors as ve
    return [
        (CommandLineError, "usage"),
        (KeyboardInterrupt, "interrupted"),
        (se.StoreLockedError, "store_locked"),
        (se.LeaseHeld, "lease_held"),
        (se.LeaseLost, "lease_lost"),
        (se.EndpointUnavailable, "s3_unavailable"),
        (se.EndpointFull, "s3_full"),
        (se.EndpointUntrusted, "s3_certificate"),
        (se.AccessDenied, "s3_access_denied"),
        (se.NoSuchBucket, "s3_no_bucket"),
        (se.ObjectMissing, "s3_object_missing"),
        (se.ObjectLocked, "s3_object_locked"),
        (se.EndpointUnsafe, "s3_unsafe"),
        (se.S3Error, "s3_error"),
        (se.KeyRequiredError, "key_required"),
        (se.WrongKeyError, "wrong_key"),
        (se.StoreReadOnlyError, "store_read_only"),
        (se.NotAStoreError, "not_a_store"),
        (se.FormatVersionError, "format_version"),
        (se.StoreExistsError, "store_exists"),
        (se.ChunkNotFound, "chunk_not_found"),
        (se.IntegrityError, "integrity"),
        (se.ConfigError, "bad_input"),
        (ve.CredentialsError, "credentials"),
        (ve.CertificateError, "certificate"),
        (ve.ConnectionLost, "connection_lost"),
        (ve.VsphereError, "vsphere"),
        (ee.EncryptedVolumeError, "encrypted"),
        (ee.NoFilesystemError, "no_filesystem"),
        (ee.FilesystemDamaged, "filesystem_damaged"),
        (ee.ToolMissingError, "tool_missing"),
        (ee.ServeError, "serve_failed"),
        (ee.BusyError, "busy"),
        (ee.BadInputError, "bad_input"),
        (ee.NotFoundError, "not_found"),
        (ee.BackupError, "backup_failed"),
        (se.StoreError, "store_error"),
        (lmdb.Error, "index_error"),
    ]


def error_code(exc: BaseException) -> str:
    """The stable code of a failure, for scripts (docs/JSON.md lists them all).

    Any failure whose ``exit_code`` is 2 is a usage error, whatever its class.
    """
    from chunkstore.errors import KeyRequiredError
    if isinstance(exc, KeyRequiredError):   # exit 2 like a usage error, but a code of its own
        return "key_required"
    if getattr(exc, "exit_code", None) == EXIT_USAGE:
        return "usage"
    if isinstance(exc, OSError):
        return "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "os_error"
    for cls, code in _code_table():
        if isinstance(exc, cls):
            return code
    return "error"


def describe_failure(exc: BaseException) -> tuple[str, str, int, dict]:
    """(code, message, exit code, extra error fields) for an expected failure."""
    code = error_code(exc)
    detail: dict = {}
    if isinstance(exc, CommandLineError):
        message = f"{exc} (see '{exc.parser.prog} --help')"
        exit_code = EXIT_USAGE
    elif isinstance(exc, KeyboardInterrupt):
        message, exit_code = "interrupted", EXIT_INTERRUPTED
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        hint = ("; free space on that file system (or raise the quota) and run the command again"
                if code == "no_space" else "")
        message, exit_code = f"{where}{exc.strerror or exc}{hint}", EXIT_ERROR
        if exc.errno in errno.errorcode:
            detail["errno"] = errno.errorcode[exc.errno]
    elif code == "index_error":
        message, exit_code = f"store index: {exc}", EXIT_ERROR
    else:
        message, exit_code = str(exc), getattr(exc, "exit_code", EXIT_ERROR)
    holder = getattr(exc, "holder", None)
    if isinstance(holder, dict):
        detail["holder"] = holder
    return code, message, exit_code, detail


def report_failure(args, code: str, message: str, exit_code: int, detail: dict | None = None,
                   prefix: str = "error") -> int:
    """Every failure of every command ends here: the human message on stderr
    (through the log, so ``--log-file`` has it too), and with ``--json`` an
    error document on stdout.  Returns ``exit_code``.  An interruption is
    no error of the command's: it is reported without the ``error:`` prefix."""
    import logging
    try:
        logging.getLogger("blockvault").error(message, extra={"bv_prefix": prefix})
    except OSError:  # the terminal that sent SIGHUP is gone
        pass
    if getattr(args, "json", False):
        error = {"code": code, "message": message, "exit_code": exit_code, **(detail or {})}
        doc = {"ok": False, "error": error}
        command = getattr(args, "command", None)
        if command:
            doc["command"] = " ".join(filter(None, (command, getattr(args, "vsphere_command", None)
                                                    or getattr(args, "files_command", None))))
        _dump(doc)
    return exit_code
