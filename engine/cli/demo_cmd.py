"""``demo``: the whole cycle on a generated sparse image in a scratch store."""

from __future__ import annotations

import os

from engine import argtypes
from engine.commandline import EXIT_ERROR, EXIT_OK, add_command, emit


def cmd_demo(args) -> int:
    from engine.demo import run_demo
    doc = run_demo(args.dir, args.size, quiet=args.json or args.quiet)
    if not doc["ok"]:
        doc["error"] = {"code": "demo_failed", "message": "the demo's restores or verify did not match",
                        "exit_code": EXIT_ERROR}
    emit(args, doc, "")
    return EXIT_OK if doc["ok"] else EXIT_ERROR


def register(sub) -> None:
    sp = add_command(sub, "demo", cmd_demo, "back up, restore and verify a generated sparse image in a scratch store",
             "blockvault demo --dir /tmp/bv-demo --size 2G")
    sp.add_argument("--dir", default=os.path.join(os.getcwd(), "blockvault-demo"),
                    help="scratch directory (default ./blockvault-demo): a new or empty directory, or one an "
                         "earlier demo made (its files are replaced); anything else is refused")
    sp.add_argument("--size", type=argtypes.demo_size, default="1G",
                    help="apparent size of the generated image, at least 1M (default 1G)")
