"""The ``blockvault`` command line.

Exit codes: 0 success; 1 an error, explained on stderr; 2 a usage error;
3 verify found damage; 4 busy (another backup of the same disk or VM, a
rebuild holding the store alone, or, for rebuild, running backups); 128 + the
signal's number when stopped by SIGINT (130), SIGTERM (143) or SIGHUP (129)
(engine/signals.py).  stdout carries data only (a backup id, tables, or with
``--json`` one JSON document, also on failure: docs/JSON.md); stderr the
progress line (on a terminal, never with ``--json``), the one-line summary of
each backup, restore and verify, warnings and errors (engine/clilog.py).
Every failure goes through ``fail``.

One module per verb group (``store_cmd``: init, stats, rebuild; ``backup_cmd``,
``list_cmd``, ``restore_cmd``, ``files_cmd``, ``verify_cmd``, ``retention_cmd`` (protect, note,
delete, forget), ``gc_cmd``, ``copy_cmd``, ``demo_cmd``; ``access_cmd`` (serve, mount, umount); ``vsphere`` in
engine/vsphere/cli.py), each with ``register(sub)``; this module builds the
parser from them and owns the one failure path.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys

# numpy (restore, verify) only does array bookkeeping here; without this its
# OpenBLAS starts a thread per core that spins at import (perf: 1.4% of a
# restore).  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import lmdb  # noqa: E402

from chunkstore import StoreError  # noqa: E402
from engine import clilog, signals  # noqa: E402
from engine.cli import (access_cmd, backup_cmd, copy_cmd, demo_cmd, files_cmd, gc_cmd, list_cmd,  # noqa: E402
                        restore_cmd, retention_cmd, store_cmd, verify_cmd)
from engine.commandline import (EXIT_DAMAGED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_LOCKED,  # noqa: E402,F401
                                EXIT_OK, EXIT_USAGE, CommandLineError, Parser, common_options,
                                describe_failure, report_failure)
from engine.vsphere.cli import register as register_vsphere  # noqa: E402

# The order of ``blockvault --help`` (after ``init``).
VERB_MODULES = (backup_cmd, list_cmd, restore_cmd, files_cmd, verify_cmd, retention_cmd, gc_cmd, copy_cmd,
                store_cmd, demo_cmd, access_cmd)

EPILOG = """\
examples:
  blockvault init /backup/store
  blockvault backup /backup/store disk.img --disk web01-disk0
  blockvault backup /backup/store disk.img --disk web01-disk0 --mode incremental --changed-areas cbt.json
  blockvault list /backup/store --disk web01-disk0
  blockvault restore /backup/store web01-disk0@latest /restore/disk.img
  blockvault verify /backup/store --json
  blockvault forget /backup/store --all --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
  blockvault protect /backup/store web01-disk0@12
  blockvault copy /backup/store /offsite/store --all   # the off-site copy: only what it lacks
  blockvault rebuild /backup/store     # index lost or damaged: recreate it from the packs
  blockvault demo                      # try it all on a generated sparse image

output: data (a backup id, tables, --json documents) on stdout; a one-line summary of each
backup, restore and verify, warnings and errors on stderr (-q: warnings and errors only).

exit codes: 0 ok, 1 error, 2 usage, 3 verify found damage, 4 store busy,
  130 interrupted (SIGINT), 143 terminated (SIGTERM), 129 hung up (SIGHUP)
"""


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def version() -> str:
    """The installed distribution's version, else the one in pyproject.toml beside the code."""
    from importlib import metadata
    try:
        return metadata.version("blockvault")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
        with open(os.path.join(_REPO_ROOT, "pyproject.toml"), "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


# -- parser ---------------------------------------------------------------------


def add_store_options(sub) -> None:
    """The options of a store in a bucket, for every command whose STORE add_store_arg made
    (added last, so they never take an option name a command already uses)."""
    from engine.cli.common import add_s3_options
    for parser in set(sub.choices.values()):
        if any(a.dest == "store" and not a.option_strings and getattr(a, "_s3_store", False)
               for a in parser._actions):
            add_s3_options(parser)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="blockvault", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Deduplicating backups of virtual disks: every backup is a synthetic full.")
    p.add_argument("--version", action="version", version=f"blockvault {version()}")
    common_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    store_cmd.register_init(sub)
    for module in VERB_MODULES:
        module.register(sub)
    register_vsphere(sub)
    add_store_options(sub)
    return p


def _wants_json(argv: list[str]) -> bool:
    """--json anywhere before a ``--``: known even when the rest does not parse."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def fail(args, exc: BaseException) -> int:
    """Report an expected failure (see commandline.describe_failure); the exit code."""
    if isinstance(exc, CommandLineError):
        exc.parser.print_usage(sys.stderr)
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, SIGTERM, SIGHUP: 128 + the signal's number
        detail = {"signal": signals.signal_name(getattr(exc, "signum", signal.SIGINT))}
        return report_failure(args, "interrupted", signals.report(exc, args), signals.exit_code(exc),
                              detail, prefix="")
    code, message, exit_code, detail = describe_failure(exc)
    return report_failure(args, code, message, exit_code, detail)


def main(argv: list[str] | None = None) -> int:
    from engine.allocator import keep_freed_memory
    keep_freed_memory()
    # Nothing the engine builds relies on the cycle collector, and restores
    # create one small object per chunk: collect rarely, and never rescan
    # the objects the imports left behind.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace(json=_wants_json(argv), quiet=False, verbose=0, log_file=None, command=None)
    clilog.setup()
    try:
        args = build_parser().parse_args(argv)
        clilog.setup(args.quiet, args.verbose, args.log_file)
        with signals.handled():  # SIGTERM and SIGHUP stop a command like Ctrl-C (engine/signals.py)
            return args.func(args)
    except (CommandLineError, StoreError, OSError, lmdb.Error, KeyboardInterrupt) as e:
        return fail(args, e)

