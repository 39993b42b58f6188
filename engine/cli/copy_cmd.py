"""``copy``: points from one store into another (engine/copy.py), the off-site copy of a nightly job."""

from __future__ import annotations

import os
import time

from engine import argtypes, clilog
from engine.cli.common import count, progress_for, seconds
from engine.commandline import EXIT_OK, add_command, emit
from engine.progress import human_bytes

EXAMPLES = """blockvault copy /backup/store /offsite/store --all           # every point DST lacks
  blockvault copy /backup/store /offsite/store --disk web01-disk0 --dry-run
  blockvault copy /backup/store /offsite/store web01@latest db01-disk0@12 --json
  blockvault copy /backup/store /offsite/store --vm web01               # VM backups, with their disks
  blockvault copy /backup/store s3://offsite/store --all --dst-endpoint https://s3.example.net
  blockvault copy s3://offsite/store /restore/store --all --endpoint https://s3.example.net
  blockvault copy s3://a/store s3://b/store --all --dst-credentials ~/.config/b.s3   # another account

SRC's bucket options are the plain ones (--endpoint, --cache, --credentials, --ca-file, also
spelled --src-...), DST's are --dst-endpoint, --dst-cache, --dst-credentials, --dst-ca-file;
both sides read BLOCKVAULT_S3_* / AWS_* from the environment where no option says otherwise.
An encrypted SRC's key comes from BLOCKVAULT_PASSPHRASE, --passphrase-file, --key-file or
BLOCKVAULT_KEY_FILE, an encrypted DST's from BLOCKVAULT_DST_PASSPHRASE, --dst-passphrase-file,
--dst-key-file or BLOCKVAULT_DST_KEY_FILE (else each is asked on a terminal).
DST is opened as a writer (it takes DST's lease), SRC as a reader (it needs no lease).

A point keeps its number when DST's chain has it free, its time, kind, note, changeIds and a VM
backup's configuration; it records where it came from (copied_from), so the next night's copy
sends only the new points' new chunks. Protection is not copied: it belongs to a store's retention."""


def _point_doc(p) -> dict:
    return {"id": p.src.id, "copied_to": p.dst.id, "kind": p.kind,
            "disk_backups": [{"id": s.id, "copied_to": d.id} for s, d in p.pairs]}


def _open_kwargs(store: str, args, side: str) -> dict:
    """The cache and S3Settings of one side's options ({} for a local store)."""
    from engine.cli.common import s3_settings_of
    get = lambda name: getattr(args, f"{side}_{name}")  # noqa: E731
    settings = s3_settings_of(store, get("endpoint"), get("credentials"), get("ca_file"), get("cache"),
                              option_prefix=f"--{side}-" if side == "dst" else "--")
    from engine.cli.common import key_source
    keys = {"keys": key_source(args, "dst" if side == "dst" else "")}   # an encrypted side's key
    return keys if settings is None else {"cache": get("cache"), "s3_settings": settings, **keys}


def _not_the_same(src: str, dst: str) -> None:
    """One directory given twice (the store ids would say so too, but LMDB refuses to open it twice first)."""
    from engine.errors import BadInputError
    try:
        same = os.path.samefile(src, dst)
    except (OSError, ValueError):
        same = src == dst
    if same:
        raise BadInputError(f"SRC and DST are the same store ({src}): copy needs another store as DST "
                            "(blockvault init DIR)")


def cmd_copy(args) -> int:
    from engine.copy import copy_points, digest_keys_differ
    from engine.errors import UsageError
    from engine.repository import Repository
    given = sum((bool(args.ids), args.disk is not None, args.vm is not None, args.all))
    if given != 1:
        raise UsageError("say what to copy: point ids, --disk NAME, --vm NAME or --all (one of them)")
    _not_the_same(args.src, args.dst)
    started = time.monotonic()
    src_where, dst_where = _open_kwargs(args.src, args, "src"), _open_kwargs(args.dst, args, "dst")
    with Repository.open(args.src, **src_where) as src, Repository.open(args.dst, **dst_where) as dst, \
            progress_for(args, "copy") as progress:
        result = copy_points(src, dst, args.ids, args.disk, args.vm, args.all, dry_run=args.dry_run,
                             wait=args.wait, workers=args.threads, on_total=progress.set_total,
                             on_progress=progress.advance)
        progress.finish()
        reasons = digest_keys_differ(src.store, dst.store)
        ids = (src.store.store_id.hex(), dst.store.store_id.hex())
    st = result.stats
    took = time.monotonic() - started
    doc = {"dry_run": args.dry_run, "source": {"store": args.src, "store_id": ids[0]},
           "destination": {"store": args.dst, "store_id": ids[1]},
           "rehashed": result.rehash, "rehash_reasons": reasons,
           "copied": [_point_doc(p) for p in result.plan.points],
           "skipped": [s.as_dict() for s in result.plan.skipped],
           "stats": None if args.dry_run else {**st.as_dict(), "duration": round(took, 6)}}
    verb = "would copy" if args.dry_run else "copied"
    lines = [f"{verb} {p.src.id} -> {p.dst.id}" for p in result.plan.points]
    lines += [f"skipped {s.id}: {s.reason}" + (f" ({s.existing})" if s.existing else "") for s in result.plan.skipped]
    sent = "" if args.dry_run else (f", {count(st.chunks_sent, 'chunk')} sent ({human_bytes(st.bytes_sent)}), "
                                    f"{count(st.chunks_read, 'chunk')} read"
                                    f"{', re-hashed for DST' if result.rehash else ''}, {seconds(took)}")
    clilog.summary(f"copy {args.src} -> {args.dst}: {verb} {count(len(result.plan.points), 'point')}, "
                   f"{len(result.plan.skipped)} skipped{sent}")
    emit(args, doc, "\n".join(lines))
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "copy", cmd_copy, "copy points into another store, sending only the chunks it lacks",
                     EXAMPLES)
    sp.add_argument("src", metavar="SRC", help="the store to copy from")
    sp.add_argument("dst", metavar="DST", help="the store to copy into (blockvault init it first)")
    sp.add_argument("ids", metavar="ID", nargs="*", help="points to copy: DISK@N or VM@N (also @latest, @-1, @DATE)")
    sp.add_argument("--disk", metavar="NAME", help="every backup of this disk (outside VM backups)")
    sp.add_argument("--vm", metavar="NAME", help="every backup of this VM, with its disks")
    sp.add_argument("--all", action="store_true", help="every point of SRC")
    sp.add_argument("--dry-run", action="store_true", help="say what would be copied and as which ids; change nothing")
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for DST's locks (inf: as long as it takes)")
    sp.add_argument("--threads", type=argtypes.threads, default=None, metavar="N",
                    help="threads reading, re-hashing and compressing (default: two per core)")
    for side, name, where in (("src", "SRC", "--{0}, --src-{0}"), ("dst", "DST", "--dst-{0}")):
        g = sp.add_argument_group(f"{name} in a bucket (s3://BUCKET/PREFIX)",
                                  "secrets only from BLOCKVAULT_S3_ACCESS_KEY_ID / BLOCKVAULT_S3_SECRET_ACCESS_KEY "
                                  "(or AWS_*, ~/.aws) or a credentials FILE, never on the command line")
        for opt, metavar, text in (
                ("endpoint", "URL", f"{name}'s S3 endpoint (default: BLOCKVAULT_S3_ENDPOINT, else AWS)"),
                ("cache", "DIR", f"this host's cache of {name} (default: $BLOCKVAULT_CACHE/BUCKET/PREFIX or "
                                 "~/.cache/blockvault/s3/BUCKET/PREFIX)"),
                ("credentials", "FILE", f"{name}'s 'key = value' file: access_key_id, secret_access_key, region, "
                                        "endpoint (mode 0600)"),
                ("ca-file", "FILE", f"PEM certificates to verify {name}'s endpoint's TLS with")):
            names = where.format(opt).split(", ")
            g.add_argument(*names, dest=f"{side}_{opt.replace('-', '_')}", metavar=metavar, help=text)
    from engine.cli.common import add_key_options
    add_key_options(sp)          # SRC's: --passphrase-file, --key-file, BLOCKVAULT_PASSPHRASE, BLOCKVAULT_KEY_FILE
    add_key_options(sp, "dst")   # DST's: --dst-passphrase-file, --dst-key-file, BLOCKVAULT_DST_*
