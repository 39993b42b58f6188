"""``list``: the points of a store, oldest first."""

from __future__ import annotations

import time

from chunkstore.errors import StoreError
from engine.cli.common import open_repo, warn_bad_records, add_store_arg
from engine.commandline import EXIT_OK, add_command, emit, print_table, printable
from engine.progress import human_bytes


def cmd_list(args) -> int:
    bad: list = []
    with open_repo(args) as repo, repo.store.read_txn() as txn:
        if args.disk:
            records = list(repo.catalog.for_disk(txn, args.disk, bad=bad))
        else:
            records = list(repo.catalog.all(txn, bad=bad))
        unique = {r.id: unique_bytes(repo, txn, r) for r in records} if args.json else {}
    bad = [b.as_dict() for b in bad]
    warn_bad_records(bad)
    if args.json:
        emit(args, {"backups": [{**r.summary(), "unique_bytes": unique[r.id]} for r in records],
                    "bad_records": bad}, "")
        return EXIT_OK
    if not records:
        print(printable("no backups" + (f" of disk {args.disk}" if args.disk else "")))
        return EXIT_OK
    rows = [("ID", "TIME", "KIND", "BASE", "SIZE", "READ", "STORED", "SECONDS", "PROTECTED", "NOTE")]
    for r in records:
        st = r.stats
        rows.append((r.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)), r.kind, r.base or "-",
                     human_bytes(r.size), human_bytes(st.get("bytes_read", 0)),
                     human_bytes(st.get("stored_bytes", 0)), f"{st.get('duration', 0):.2f}",
                     "yes" if r.protected else "-", r.note or "-"))
    print_table(rows)
    return EXIT_OK


def unique_bytes(repo, txn, record) -> int | None:
    """Stored bytes only this point holds (freed if it alone were removed); None without counts."""
    try:
        manifest = repo.manifests.get(txn, record.key, record.id, record)
    except StoreError:
        return None  # a damaged manifest: verify says so
    return repo.references.unique_bytes(txn, [manifest])


def register(sub) -> None:
    sp = add_command(sub, "list", cmd_list, "list backups", "blockvault list /backup/store --disk db01")
    add_store_arg(sp)
    sp.add_argument("--disk", help="only this disk")
