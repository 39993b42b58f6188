"""The store as a whole: ``init``, ``stats`` and ``rebuild`` (the index or
config.json recreated from the packs, engine/recovery.py)."""

from __future__ import annotations

import logging

from chunkstore.config import CIPHER_NAMES, DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, DIGEST_KINDS
from engine import argtypes
from engine.cli.common import add_store_arg, key_source, open_repo, s3_settings, store_kwargs, warn_bad_records
from engine.commandline import EXIT_DAMAGED, EXIT_OK, add_command, emit
from engine.progress import human_bytes


def _encryption_settings(args) -> tuple[dict, str | None]:
    """init's keywords for an encrypted store (a new master key and its first slots) and the key
    file it wrote (removed again if the init fails); ({}, None) for a plaintext store."""
    from engine.errors import UsageError
    if not args.encryption:
        for given, name in ((args.new_key_file, "--new-key-file"), (args.label, "--label")):
            if given:
                raise UsageError(f"{name} goes with --encryption (a plaintext store has no keys)")
        return {}, None
    if args.key_file:
        raise UsageError("init makes a new key: give --new-key-file FILE to have a key file written, not --key-file")
    import os
    from chunkstore.crypto import MasterKey
    from chunkstore.errors import KeyRequiredError
    from chunkstore.keyexport import SECRET_SIZE, key_file_text, write_secret_file
    from chunkstore.keyslots import KEY_FILE, PASSPHRASE
    from chunkstore.keysource import new_passphrase
    slots = []
    passphrase = None
    if args.passphrase_file or os.environ.get("BLOCKVAULT_PASSPHRASE") or not args.new_key_file:
        passphrase = new_passphrase(args.passphrase_file, "BLOCKVAULT_PASSPHRASE", "--passphrase-file",
                                    prompt_for=f" of {args.store}")
    if passphrase is None and not args.new_key_file:
        raise KeyRequiredError("init --encryption needs a key: a passphrase (BLOCKVAULT_PASSPHRASE, --passphrase-file "
                               "FILE, or typed on a terminal) and/or --new-key-file FILE; never on the command line")
    if passphrase is not None:
        slots.append((PASSPHRASE, passphrase, args.label or "passphrase"))
    if args.new_key_file:
        secret = os.urandom(SECRET_SIZE)
        write_secret_file(args.new_key_file, key_file_text(secret), "--new-key-file")  # before the store: refused early
        slots.append((KEY_FILE, secret, args.label or f"key file {os.path.basename(args.new_key_file)}"))
    return {"encryption": args.encryption, "master": MasterKey.new(), "new_slots": slots}, args.new_key_file


def cmd_init(args) -> int:
    from engine.repository import Repository
    where = store_kwargs(args)
    where.pop("keys", None)
    if args.object_lock is not None:
        if not where:
            from engine.errors import UsageError
            raise UsageError("--object-lock is for a store in a bucket (s3://BUCKET/PREFIX)")
        if args.object_lock <= 0:
            from engine.errors import UsageError
            raise UsageError(f"--object-lock {args.object_lock:g}: give the retention in days, more than 0")
        where["object_lock_days"] = args.object_lock
        where["lease_bucket"] = args.lease_bucket
    elif args.lease_bucket is not None:
        from engine.errors import UsageError
        raise UsageError("--lease-bucket goes with --object-lock (a store without object lock keeps its lease "
                         "in its own bucket)")
    if args.encryption and args.digest:
        from engine.errors import UsageError
        raise UsageError("--digest is for plaintext stores: an encrypted store's chunk ids are keyed BLAKE3")
    crypto, key_file = _encryption_settings(args)
    try:
        repo = Repository.init(args.store, chunk_size=args.chunk_size, digest=args.digest or "xxh3-128",
                               compression_level=args.compression_level, **where, **crypto)
    except BaseException:
        if key_file:   # its slot was never made
            import os
            os.unlink(key_file)
        raise
    with repo:
        cfg = repo.store.config
        from chunkstore.slotstore import slots_of
        slots = [s.public() for s in slots_of(repo.store).load()[0]] if cfg.encrypted else []
        doc = {"store": args.store, "chunk_size": cfg.chunk_size, "digest": cfg.digest,
               "compression_level": cfg.compression_level, "format_version": cfg.version,
               "encryption": cfg.encryption or None, "key_slots": slots, "key_file": key_file}
        enc = (f", encrypted with {cfg.encryption}, {len(slots)} key slot{'' if len(slots) == 1 else 's'}"
               + (f", key file {key_file}" if key_file else "")) if cfg.encrypted else ""
        emit(args, doc, f"initialised store {args.store} (chunk size {human_bytes(cfg.chunk_size)}, "
                         f"digest {cfg.digest}, zstd level {cfg.compression_level}{enc})")
        if not cfg.encrypted and where:
            logging.getLogger("blockvault.keys").warning(
                "store %s is not encrypted: whoever can read the bucket can read every backup in it; "
                "for a bucket off site, make the store with --encryption aes-256-gcm (README 'Keys')", args.store)
        if cfg.encrypted:
            logging.getLogger("blockvault.keys").warning(
                "store %s is encrypted: without its key every backup in it is lost. Run 'blockvault key export "
                "%s FILE' and keep FILE off site, apart from the store", args.store, args.store)
    return EXIT_OK


def cmd_stats(args) -> int:
    from engine.stats import store_stats
    with open_repo(args) as repo:
        doc = store_stats(repo)
    warn_bad_records(doc["bad_records"])
    if args.json:
        emit(args, doc, "")
        return EXIT_OK

    def r(x):
        return f"{x:.2f}x" if x else "-"
    live_dead = ("- (format 2: counted once a writer upgrades the store)" if doc["dead_bytes"] is None else
                 f"{human_bytes(doc['live_bytes'])} live, {human_bytes(doc['dead_bytes'])} dead "
                 "(what 'blockvault gc' can reclaim)")
    print(f"store            {doc['store']}\n"
          f"disks, backups   {doc['disks']}, {doc['backups']}\n"
          f"protected        {human_bytes(doc['logical_bytes'])} logical, "
          f"{human_bytes(doc['logical_allocated_bytes'])} allocated\n"
          f"unique chunks    {doc['chunks']} ({human_bytes(doc['unique_bytes'])})\n"
          f"stored           {human_bytes(doc['stored_bytes'])} in {doc['packs']} packs\n"
          f"live, dead       {live_dead}\n"
          f"dedup            {r(doc['dedup_ratio'])}\n"
          f"compression      {r(doc['compression_ratio'])}\n"
          f"total reduction  {r(doc['reduction_ratio'])}")
    return EXIT_OK


def cmd_rebuild(args) -> int:
    from engine import recovery
    if args.config:
        doc = recovery.recreate_config(args.store, args.wait)
        emit(args, doc, recovery.config_text(doc))
        return EXIT_OK
    report = recovery.rebuild(args.store, args.wait, **store_kwargs(args))
    doc = recovery.rebuild_doc(report)
    if not report.complete:
        doc["ok"] = False
        doc["error"] = {"code": "damaged", "exit_code": EXIT_DAMAGED, "message": recovery.damage_message(report)}
        logging.getLogger("blockvault.rebuild").error(doc["error"]["message"])
    emit(args, doc, recovery.rebuild_text(doc))
    return EXIT_OK if report.complete else EXIT_DAMAGED


def cmd_attach(args) -> int:
    from chunkstore.s3settings import is_store_url
    from engine import recovery
    from engine.errors import UsageError
    if not is_store_url(args.store):
        raise UsageError(f"attach takes a store in a bucket (s3://BUCKET/PREFIX), not {args.store}")
    report, doc = recovery.attach(args.store, args.s3_cache, s3_settings(args), args.take_over,
                                  keys=key_source(args))
    if not report.complete:
        doc["ok"] = False
        doc["error"] = {"code": "damaged", "exit_code": EXIT_DAMAGED, "message": recovery.damage_message(report)}
        logging.getLogger("blockvault.rebuild").error(doc["error"]["message"])
    emit(args, doc, f"attached {doc['store']} in {doc['seconds']:.1f} s; cache {doc['cache']}\n"
                    + recovery.rebuild_text(doc))
    return EXIT_OK if report.complete else EXIT_DAMAGED


def register_init(sub) -> None:
    """``init`` comes first in --help; the other store verbs after the daily ones."""
    sp = add_command(sub, "init", cmd_init, "create a new store in an empty directory",
             "blockvault init /backup/store --chunk-size 1M\n"
             "  blockvault init s3://backups/site1 --object-lock 30   # immutable for 30 days; lease in backups-lease\n"
             "  blockvault init /backup/store --encryption aes-256-gcm            # asks for a passphrase twice\n"
             "  BLOCKVAULT_PASSPHRASE=... blockvault init /backup/store --encryption chacha20-poly1305\n"
             "  blockvault init /backup/store --encryption aes-256-gcm --new-key-file /root/store.key  # no passphrase")
    add_store_arg(sp)
    sp.add_argument("--chunk-size", type=argtypes.chunk_size, default=f"{DEFAULT_CHUNK_SIZE >> 10}K",
                    help="fixed chunk size, a power of two from 64K to 8M (default %(default)s)")
    sp.add_argument("--digest", choices=[d for d in DIGEST_KINDS if d != "blake3-128-keyed"], default=None,
                    help="chunk identity of a plaintext store: keyed xxh3-128 (fast) or sha256 (for mutually "
                         "untrusting tenants); default xxh3-128")
    sp.add_argument("--encryption", choices=CIPHER_NAMES,
                    help="encrypt the store at rest (AEAD; chunk ids keyed BLAKE3) under a new random master key, "
                         "wrapped by a passphrase slot (BLOCKVAULT_PASSPHRASE, --passphrase-file FILE or typed "
                         "twice) and/or a key-file slot (--new-key-file); default: not encrypted (README 'Keys')")
    sp.add_argument("--new-key-file", metavar="FILE",
                    help="with --encryption: write a new key file FILE (0600, never overwritten) and a key slot it "
                         "opens, for unattended jobs (--key-file FILE)")
    sp.add_argument("--label", metavar="TEXT", help="with --encryption: a label for the new key slots (key list)")
    sp.add_argument("--compression-level", type=argtypes.compression_level, default=DEFAULT_COMPRESSION_LEVEL,
                    help="zstd level, -7 to 22 (default %(default)s)")
    sp.add_argument("--object-lock", type=float, metavar="DAYS",
                    help="s3:// only: a new bucket with versioning and object lock; every object (packs, "
                         "config.json) is written with a COMPLIANCE retention of DAYS days, and gc frees a "
                         "pack only once its retention has ended")
    sp.add_argument("--lease-bucket", metavar="NAME",
                    help="with --object-lock: the bucket without versioning that holds the store's lease "
                         "(default BUCKET-lease; made when absent)")


def register(sub) -> None:
    sp = add_command(sub, "attach", cmd_attach, "make this host's cache of a store in a bucket, from the bucket alone",
                     "blockvault attach s3://backups/site1 --endpoint http://127.0.0.1:7480 --cache /var/cache/bv\n"
                     "  blockvault attach s3://backups/site1 --take-over   # the old host is gone, its lease expired")
    add_store_arg(sp)
    sp.add_argument("--take-over", action="store_true",
                    help="take the store's lease from another host whose lease has expired")

    sp = add_command(sub, "stats", cmd_stats, "space used and saved", "blockvault stats /backup/store")
    add_store_arg(sp)

    for name, text in (("rebuild", "recreate the store's index (backups, manifests, chunk index) from the packs"),
                       ("rebuild-index", "the old name of 'rebuild'")):
        sp = add_command(sub, name, cmd_rebuild, text,
                 f"blockvault {name} /backup/store            # index lost, damaged or truncated\n"
                 f"  blockvault {name} --config /backup/store   # config.json lost or edited")
        add_store_arg(sp)
        sp.add_argument("--config", action="store_true",
                        help="recreate config.json from the settings in the pack headers instead "
                             "(a differing one is kept as config.json.replaced-TIME)")
        sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                        help="wait this long for the running backups to finish (a rebuild runs alone), "
                             "inf: as long as it takes")
