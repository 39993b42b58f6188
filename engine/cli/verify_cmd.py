"""``verify``: every chunk read and re-hashed; what damage there is, and which points
it affects (exit 3)."""

from __future__ import annotations

import logging
import time

from engine import argtypes, clilog
from engine.cli.common import count, open_repo, progress_for, seconds, add_store_arg
from engine.commandline import EXIT_DAMAGED, EXIT_OK, add_command, emit, printable
from engine.progress import human_bytes


def cmd_verify(args) -> int:
    from engine.verify import verify_repository
    started = time.monotonic()
    with progress_for(args, "verify", finishing="checking manifests") as progress, open_repo(args) as repo:
        report = verify_repository(repo, workers=args.threads or 2, on_total=progress.set_total,
                                   on_progress=progress.advance)
        progress.finish()
    doc = report.as_dict()
    damage = [count(len(doc["bad_chunks"]), "bad chunk"), count(len(doc["missing_packs"]), "missing pack"),
              count(len(doc["damaged_manifests"]), "damaged manifest")]
    damage += [count(len(doc[k]), what) for k, what in (("bad_packs", "damaged pack frame"),
                                                         ("read_errors", "read error"),
                                                         ("bad_records", "damaged catalog record"),
                                                         ("count_drift", "wrong reference count")) if doc[k]]
    if doc["marks"]["note"]:
        logging.getLogger("blockvault.verify").warning(doc["marks"]["note"])
    if doc["metadata_lost"]:
        damage.insert(0, "metadata lost")
    checked = (f"{count(doc['chunks_checked'], 'chunk')} ({human_bytes(doc['bytes_checked'])}) and "
               f"{count(doc['backups_checked'], 'backup')} checked")
    verdict = "OK" if report.ok else f"DAMAGED: {', '.join(damage)}"
    clilog.summary(f"verify {repo.path}: {verdict}; {checked}, {seconds(time.monotonic() - started)}",
                   [f"{len(doc['unreferenced_packs'])} unreferenced pack file(s)"])
    if not report.ok:
        doc["error"] = {"code": "damaged", "message": f"store {repo.path} is damaged: {', '.join(damage)}",
                        "exit_code": EXIT_DAMAGED}
    if args.json:
        emit(args, doc, "")
    else:
        print(f"checked {checked[:-len(' checked')]}")
        # Backup ids and reasons come from the store: printed escaped (printable).
        for bad in doc["bad_chunks"]:
            where = "; ".join(f"{b['id']} at offsets {', '.join(map(str, b['offsets'][:8]))}"
                              + (" ..." if b["count"] > 8 else "") for b in bad["backups"]) or "no backup"
            print(printable(f"BAD chunk {bad['digest']}: {bad['reason']}"))
            print("    affects " + printable(where))
        for pack in doc["missing_packs"]:
            print(printable(f"MISSING pack {pack['id']} ({pack['path']})"))
        for pack in doc["bad_packs"]:
            print(printable(f"DAMAGED pack {pack['id']} ({pack['path']}): {pack['reason']}"))
        for err in doc["read_errors"]:
            print(printable(f"READ ERROR pack {err['id']} ({err['path']}) at offset {err['offset']}, "
                            f"{err['length']} bytes: {err['error']}"))
        for bid, reason in doc["damaged_manifests"].items():
            print(printable(f"DAMAGED manifest of {bid}: {reason}"))
        for rec in doc["bad_records"]:
            print(printable(f"DAMAGED catalog record {rec['key']}: {rec['reason']}"))
        for h in doc["healed_chunks"]:
            users = ", ".join(b["id"] for b in h["backups"]) or "no backup"
            print(printable(f"HEALED chunk {h['digest']}: stored again (was: {h['reason']}); used by {users}"))
        if doc["marks"]["marked"]:
            print(f"marked {count(doc['marks']['marked'], 'bad chunk')}: the next backup that reads "
                  "their data stores them again")
        for drift in doc["count_drift"]:
            print(printable(f"WRONG reference count: {drift}"))
        if doc["metadata_lost"]:
            print(f"METADATA LOST: {doc['metadata_lost']}")
        if doc["unreferenced_packs"] and not doc["metadata_lost"]:
            print(f"note: {len(doc['unreferenced_packs'])} pack file(s) left by interrupted backups "
                  "hold no referenced data")
        print("store OK" if report.ok else "store DAMAGED")
    return EXIT_OK if report.ok else EXIT_DAMAGED


def register(sub) -> None:
    sp = add_command(sub, "verify", cmd_verify, "read and check every chunk; report what damage affects",
             "blockvault verify /backup/store --json")
    add_store_arg(sp)
    sp.add_argument("--threads", type=argtypes.threads, default=None, help="worker threads, 1-256 (default 2)")
