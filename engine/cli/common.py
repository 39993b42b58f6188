"""What the verb modules share: opening the store, the progress line, and the
few words every summary line uses."""

from __future__ import annotations

import logging

from engine.progress import Progress


def progress_for(args, label: str, finishing: str = "syncing") -> Progress:
    """A progress line on a terminal; none with --json or -q (stdout and stderr stay clean for scripts)."""
    return Progress(label, enabled=False if (args.json or args.quiet) else None, finishing=finishing)


def open_repo(args):
    """The store named by ``args.store``; imported late so ``--help`` stays fast."""
    from engine.repository import Repository
    return Repository.open(args.store)


def seconds(t: float) -> str:
    return f"{t:.1f} s"


def count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def warn_bad_records(bad: list[dict]) -> None:
    """Damaged catalog records are skipped by list and stats, and said so."""
    for b in bad:
        logging.getLogger("blockvault.catalog").warning(f"{b['reason']}; skipped (run 'blockvault verify')")
