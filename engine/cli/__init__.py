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


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for: reading the distribution's
    metadata costs about 20 ms, which every command paid at start-up."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default,
                         help=help or "show the program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(f"blockvault {version()}\n", sys.stdout)
        parser.exit()


# -- parser ---------------------------------------------------------------------


def add_store_options(sub) -> None:
    """The options of a store in a bucket, for every command whose STORE add_store_arg made
    (added last, so they never take an option name a command already uses)."""
    import argparse

    from engine.cli.common import add_s3_options
    for parser in set(sub.choices.values()):
        if any(a.dest == "store" and getattr(a, "_s3_store", False)   # STORE, or vsphere vms' --store
               for a in parser._actions):
            add_s3_options(parser)
        for action in parser._actions:   # a verb group (files ls|get|...): its own verbs
            if isinstance(action, argparse._SubParsersAction):
                add_store_options(action)


class _Skipped:
    """Stands in for the parser of a verb that is not being run: every call is
    accepted and ignored, so a module's ``register`` runs unchanged."""

    def __getattr__(self, name):
        return self._ignore

    def _ignore(self, *args, **kwargs):
        return self


class _OnlyVerb:
    """The sub-command action, but only ``verb`` gets a real parser.

    argparse builds a parser per verb (about 300 options in all); a command
    parses only its own, so building the others was start-up time spent for
    nothing (a forget or gc is mostly start-up).  Anything the verb does not
    match (a typo, ``--help``) gets the full parser instead (build_parser)."""

    def __init__(self, sub, verb: str):
        self.sub, self.verb, self.found = sub, verb, False

    @property
    def choices(self):
        return self.sub.choices

    def add_parser(self, name, **kwargs):
        if name != self.verb:
            return _Skipped()
        self.found = True
        return self.sub.add_parser(name, **kwargs)


def _verb_of(argv: list[str]) -> str | None:
    """The command name in ``argv``: the first word that is not a top-level option
    (or the value of ``--log-file``)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if word == "--log-file":
            i += 2
            continue
        if not word.startswith("-") or word == "-":
            return word
        i += 1
    return None


def _top_parser() -> tuple[argparse.ArgumentParser, object]:
    p = Parser(
        prog="blockvault", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Deduplicating backups of virtual disks: every backup is a synthetic full.")
    p.add_argument("--version", action=_VersionAction)
    common_options(p, top=True)
    return p, p.add_subparsers(dest="command", metavar="COMMAND", required=True)


def _register(sub) -> None:
    store_cmd.register_init(sub)
    for module in VERB_MODULES:
        module.register(sub)
    register_vsphere(sub)
    add_store_options(sub)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the parser of the verb it names (see _OnlyVerb)."""
    verb = _verb_of(argv) if argv is not None else None
    if verb is not None:
        p, sub = _top_parser()
        only = _OnlyVerb(sub, verb)
        _register(only)
        if only.found:
            return p
    p, sub = _top_parser()
    _register(sub)
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
        args = build_parser(argv).parse_args(argv)
        clilog.setup(args.quiet, args.verbose, args.log_file)
        with signals.handled():  # SIGTERM and SIGHUP stop a command like Ctrl-C (engine/signals.py)
            return args.func(args)
    except (CommandLineError, StoreError, OSError, lmdb.Error, KeyboardInterrupt) as e:
        return fail(args, e)

