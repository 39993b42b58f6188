"""What every blockvault command shares: subcommand set-up, JSON or text output, tables.

Both command groups (engine/cli.py and engine/vsphere/cli.py) build their
commands with these, so ``--json``, help epilogs and table layout behave the
same everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_command(subparsers, name: str, func, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with an example in its help and the common ``--json`` flag."""
    heading = "examples" if "\n" in example else "example"
    sp = subparsers.add_parser(name, help=help_text, description=help_text, epilog=f"{heading}:\n  {example}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(func=func)
    sp.add_argument("--json", action="store_true", help="print one JSON document; no progress")
    return sp


def emit(args, doc: dict, text: str) -> None:
    """One JSON document with ``--json``, else the human text (if any)."""
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif text:
        print(text)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
