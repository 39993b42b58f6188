"""``restore ... --rollback-from ID2 | --rollback-compare``: a point written onto a
target that already holds a disk, changing only the chunks that differ.

The options belong to ``restore`` (restore_cmd registers them through
``add_options``); the work is engine/rollback.py.
"""

from __future__ import annotations

import logging
import time

from engine import argtypes, clilog
from engine.cli.common import count, open_repo, progress_for, seconds
from engine.commandline import EXIT_OK, emit
from engine.errors import UsageError
from engine.progress import human_bytes

EXAMPLES = (
    "  blockvault restore /backup/store db01@3 /restore/db01.img --rollback-from db01@5   # it holds @5: write what differs\n"
    "  blockvault restore /backup/store db01@3 /dev/vg0/db01 --force --rollback-compare  # read it, write what differs")


def add_options(sp) -> None:
    g = sp.add_argument_group("rollback (write only what differs, onto a target that holds a disk already)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--rollback-from", metavar="ID2",
                   help="TARGET holds point ID2 of the same disk: compare the two manifests and write only "
                        "the chunks that differ (checked first: TARGET's size and --verify-target chunks)")
    x.add_argument("--rollback-compare", action="store_true",
                   help="read TARGET, hash it chunk by chunk, and write only the chunks that differ from the "
                        "point (no assumption about what TARGET holds)")
    g.add_argument("--verify-target", type=argtypes.sample_count, default=None, metavar="N",
                   help="with --rollback-from: chunks read from TARGET and checked against ID2 before anything "
                        "is written (default 8; 0 skips the check)")


def wants_rollback(args) -> bool:
    if args.verify_target is not None and not args.rollback_from:
        raise UsageError("--verify-target checks the target of a --rollback-from; add --rollback-from ID2 "
                         "(or drop --verify-target)")
    if not (args.rollback_from or args.rollback_compare):
        return False
    for given, option, why in ((args.zeroed_target, "--zeroed-target", "the target holds a disk's data"),
                               (args.mode is not None, "--mode", "a rollback changes an existing file")):
        if given:
            raise UsageError(f"{option} does not go with a rollback: {why}; drop {option}")
    return True


def cmd_rollback(args) -> int:
    from engine.rollback import DEFAULT_SAMPLES, make_rollback_target, rollback_backup
    started = time.monotonic()
    target = make_rollback_target(args.target, args.force, args.format, args.credentials)
    samples = DEFAULT_SAMPLES if args.verify_target is None else args.verify_target
    label = f"rollback {args.backup}"
    with progress_for(args, label) as progress, open_repo(args) as repo:
        result = rollback_backup(repo, args.backup, target, base_ref=args.rollback_from,
                                 compare=args.rollback_compare, workers=args.threads, samples=samples,
                                 on_start=lambda rec, total: progress.set_total(total),
                                 on_progress=progress.advance)
        progress.finish()
    for text in result.warnings:
        logging.getLogger("blockvault.restore").warning(text)
    rb = result.rollback
    doc = {"id": result.record.id, "target": result.target, "size": result.record.size,
           "bytes_written": result.bytes_written, "chunks_written": result.chunks_written,
           "chunks_read": result.chunks_read, "warnings": result.warnings, "rollback": rb.as_dict()}
    how = (f"rollback from {rb.base}" if rb.mode == "from"
           else f"rollback by comparing, {human_bytes(rb.target_bytes_read)} of the target read")
    segments = f", {count(rb.segments_skipped, 'segment')} equal" if rb.mode == "from" else ""
    clilog.summary(
        f"restore {result.record.id} to {result.target} ({how}): {human_bytes(result.record.size)} disk, "
        f"wrote {result.chunks_written} of {rb.chunks} chunks ({human_bytes(result.bytes_written)}), "
        f"{rb.chunks_skipped} skipped as equal{segments}, "
        + (f"{len(result.warnings)} warning(s), " if result.warnings else "")
        + seconds(time.monotonic() - started),
        [f"{rb.chunks_compared} chunk digests compared, {rb.chunks_sampled} target chunks sampled, "
         f"{result.chunks_read} chunks read from the store"])
    emit(args, doc, "")
    return EXIT_OK
