"""``key list|add|remove|change|export``: the key slots of an encrypted store (chunkstore/keyslots.py).

Every verb but ``list`` first proves it holds a key of the store (the usual
sources: engine/cli/common.py key_source), since it wraps, shows or takes
away a way in.  The master key never changes, so none of them rewrites
data; a passphrase change is a new slot written before the old one is
removed (chunkstore/slotstore.py: at every instant one of them opens the
store).  Nothing here prints key material: ``export`` writes it to a new
0600 file only.
"""

from __future__ import annotations

import os

from engine.cli.common import add_store_arg, key_source, s3_settings
from engine.commandline import EXIT_OK, add_command, emit, iso_time, printable

EXAMPLES = {
    "list": "blockvault key list /backup/store --json",
    "add": "blockvault key add /backup/store                                  # a passphrase, typed twice\n"
           "  blockvault key add /backup/store --new-key-file /root/nightly.key   # for unattended jobs\n"
           "  BLOCKVAULT_NEW_PASSPHRASE=... blockvault key add /backup/store --passphrase-file /root/old.pass",
    "remove": "blockvault key remove /backup/store 3f0c9a1b2c3d4e5f --key-file /root/nightly.key",
    "change": "blockvault key change /backup/store                 # the passphrase typed: old once, new twice\n"
              "  blockvault key change /backup/store 3f0c9a1b2c3d4e5f --passphrase-file old --new-passphrase-file new",
    "export": "blockvault key export /backup/store /media/usb/store-key.txt   # then print it, keep it off site",
}


class _Store:
    """An encrypted store's config and slot place, without opening its index (list needs no key)."""

    def __init__(self, args):
        from chunkstore.config import StoreConfig
        from chunkstore.errors import ConfigError
        from chunkstore.s3settings import is_store_url
        from chunkstore.slotstore import BucketSlots, LocalSlots
        from chunkstore.store import refuse_url, require_config
        self.location = args.store
        settings = s3_settings(args)
        if is_store_url(args.store):
            from chunkstore.s3store import check_cache_config, context_for
            ctx = context_for(args.store, args.s3_cache, settings)
            self.config = StoreConfig.load(ctx.cache)
            check_cache_config(ctx, self.config)
            self.slots = BucketSlots(ctx.cache, ctx.bucket)
        else:
            refuse_url(args.store)
            require_config(args.store)
            self.config = StoreConfig.load(args.store)
            self.slots = LocalSlots(args.store)
        if not self.config.encrypted:
            raise ConfigError(f"store {args.store} is not encrypted: it has no keys (a store's encryption is "
                              "chosen at init: blockvault init DIR --encryption aes-256-gcm)")
        self.store_id = bytes.fromhex(self.config.store_id)
        self.keys = key_source(args)

    def unlock(self):
        """The master key, from the command's key sources (the slot used: ``self.keys.slot_id``)."""
        return self.keys.unlock(self.config, self.slots, self.location)

    def find(self, prefix: str):
        from engine.errors import NotFoundError, UsageError
        found, _ = self.slots.load()
        ids = self.slots.ids()
        match = [i for i in ids if i.startswith(prefix.lower())]
        if len(prefix) < 4:
            raise UsageError(f"slot {prefix!r}: give at least 4 digits of the slot id ('blockvault key list')")
        if not match:
            raise NotFoundError(f"store {self.location} has no key slot {prefix} (its slots: {', '.join(ids) or 'none'})")
        if len(match) > 1:
            raise UsageError(f"slot {prefix} names {len(match)} slots ({', '.join(match)}): give more digits")
        return match[0], {s.slot_id: s for s in found}


def _slot_doc(s) -> dict:
    return s.public()


def _slot_line(d: dict) -> str:
    return f"{d['id']}  {d['kind']:<10}  {iso_time(d['created'])}  {printable(d['label'])}"


def cmd_list(args) -> int:
    store = _Store(args)
    found, damaged = store.slots.load()
    doc = {"store": args.store, "encryption": store.config.encryption, "slots": [_slot_doc(s) for s in found],
           "damaged": damaged}
    lines = [_slot_line(d) for d in doc["slots"]] + [f"DAMAGED: {printable(d)}" for d in damaged]
    emit(args, doc, "\n".join(lines) or "no key slots")
    return EXIT_OK


def _new_material(args, store, what: str):
    """(kind, material, label, key file written) of the slot ``add`` or ``change`` makes."""
    from chunkstore.errors import KeyRequiredError
    from chunkstore.keyexport import SECRET_SIZE, key_file_text, write_secret_file
    from chunkstore.keyslots import KEY_FILE, PASSPHRASE
    from chunkstore.keysource import new_passphrase
    from engine.errors import UsageError
    if getattr(args, "new_key_file", None):
        if args.new_passphrase_file:
            raise UsageError("give --new-key-file or --new-passphrase-file, not both")
        secret = os.urandom(SECRET_SIZE)
        write_secret_file(args.new_key_file, key_file_text(secret), "--new-key-file")
        return KEY_FILE, secret, args.label or f"key file {os.path.basename(args.new_key_file)}", args.new_key_file
    passphrase = new_passphrase(args.new_passphrase_file, "BLOCKVAULT_NEW_PASSPHRASE", "--new-passphrase-file",
                                prompt_for=f" of {args.store}")
    if passphrase is None:
        raise KeyRequiredError(f"{what} needs the new passphrase: BLOCKVAULT_NEW_PASSPHRASE, --new-passphrase-file "
                               "FILE, or typed twice on a terminal" + (", or --new-key-file FILE" if what == "key add"
                                                                       else ""))
    return PASSPHRASE, passphrase, args.label or "passphrase", None


def cmd_add(args) -> int:
    from chunkstore.keyslots import new_slot
    store = _Store(args)
    master = store.unlock()
    kind, material, label, key_file = _new_material(args, store, "key add")
    try:
        slot = new_slot(master, store.store_id, kind, material, label)
        store.slots.write(slot)
    except BaseException:
        if key_file:
            os.unlink(key_file)
        raise
    doc = {"store": args.store, "added": _slot_doc(slot), "key_file": key_file}
    emit(args, doc, f"added {slot.kind} slot {slot.slot_id}" + (f"; key file {key_file}" if key_file else ""))
    return EXIT_OK


def _remove(store, slot_id: str, by_id: dict) -> None:
    """Remove slot ``slot_id``, refused when no other slot that opens the store would remain."""
    from engine.errors import BadInputError
    others = [i for i in by_id if i != slot_id]
    if not others:
        raise BadInputError(f"slot {slot_id} is the last key slot of store {store.location}: removing it would lock "
                            "every backup away for good; add another slot first ('blockvault key add')")
    store.slots.remove(slot_id)


def cmd_remove(args) -> int:
    store = _Store(args)
    store.unlock()
    slot_id, by_id = store.find(args.slot)
    _remove(store, slot_id, by_id)
    used = store.keys.slot_id == slot_id
    doc = {"store": args.store, "removed": slot_id, "was_the_slot_used": used, "slots_left": len(by_id) - 1}
    emit(args, doc, f"removed key slot {slot_id}" + (" (the one this command was opened with)" if used else "")
         + f"; {len(by_id) - 1} left")
    return EXIT_OK


def cmd_change(args) -> int:
    from chunkstore.keyslots import PASSPHRASE, new_slot
    from engine.errors import UsageError
    store = _Store(args)
    master = store.unlock()
    if args.slot:
        old, by_id = store.find(args.slot)
    elif store.keys.slot_id is None:
        raise UsageError("the store was opened with a key export: name the passphrase SLOT to change")
    else:
        old = store.keys.slot_id
        by_id = {s.slot_id: s for s in store.slots.load()[0]}
    if old not in by_id or by_id[old].kind != PASSPHRASE:
        raise UsageError(f"slot {old} is not a passphrase slot: 'key change' gives a passphrase slot a new passphrase "
                         "(for a key file: key add --new-key-file, then key remove)")
    kind, material, _, _ = _new_material(args, store, "key change")
    slot = new_slot(master, store.store_id, kind, material, args.label or by_id[old].label)
    store.slots.write(slot)           # durable before the old one goes (chunkstore/slotstore.py)
    store.slots.remove(old)
    doc = {"store": args.store, "removed": old, "added": _slot_doc(slot)}
    emit(args, doc, f"passphrase changed: slot {slot.slot_id} added, slot {old} removed")
    return EXIT_OK


def cmd_export(args) -> int:
    from chunkstore.keyexport import export_text, write_secret_file
    store = _Store(args)
    master = store.unlock()
    write_secret_file(args.file, export_text(master, store.store_id, store.config.encryption, args.store),
                      "key export file")
    doc = {"store": args.store, "store_id": store.config.store_id, "file": os.path.abspath(args.file)}
    emit(args, doc, f"master key of {args.store} written to {args.file} (mode 0600): print it or copy it off site, "
                    "keep it apart from the store, then remove this copy")
    return EXIT_OK


def register(sub) -> None:
    group = sub.add_parser("key", help="the key slots of an encrypted store: list, add, remove, change, export",
                           description="The key slots of an encrypted store. Each slot opens the store with a "
                                       "passphrase or a key file; the master key they wrap never changes, so no "
                                       "data is re-encrypted. Keep a 'key export' off site: losing every key loses "
                                       "every backup.",
                           epilog="examples:\n  " + "\n  ".join(e.split("\n")[0] for e in EXAMPLES.values()),
                           formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    from engine.commandline import common_options
    common_options(group)
    vsub = group.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    texts = {"list": "the store's key slots: id, kind, created, label (no key needed)",
             "add": "add a key slot: a new passphrase, or a new key file (--new-key-file)",
             "remove": "remove a key slot (the last one is refused)",
             "change": "give a passphrase slot a new passphrase (new slot written, then the old one removed)",
             "export": "write the master key to a new file FILE (0600), as text to print: a paper backup"}
    funcs = {"list": cmd_list, "add": cmd_add, "remove": cmd_remove, "change": cmd_change, "export": cmd_export}
    for name in ("list", "add", "remove", "change", "export"):
        sp = add_command(vsub, name, funcs[name], texts[name], EXAMPLES[name])
        add_store_arg(sp)
        if name == "remove":
            sp.add_argument("slot", metavar="SLOT", help="the slot id (or its first digits, at least 4)")
        if name == "change":
            sp.add_argument("slot", metavar="SLOT", nargs="?",
                            help="the passphrase slot to change (default: the one the passphrase given opens)")
        if name == "export":
            sp.add_argument("file", metavar="FILE", help="a new file (never overwritten)")
        if name in ("add", "change"):
            g = sp.add_argument_group("the new key", "never on the command line")
            g.add_argument("--new-passphrase-file", metavar="FILE",
                           help="the new passphrase in FILE (else BLOCKVAULT_NEW_PASSPHRASE, else typed twice)")
            if name == "add":
                g.add_argument("--new-key-file", metavar="FILE",
                               help="write a new key file FILE (0600, never overwritten) and a slot it opens")
            g.add_argument("--label", metavar="TEXT", help="the new slot's label (key list)")
