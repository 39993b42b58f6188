"""``protect``, ``unprotect``, ``note``, ``delete`` and ``forget``: a point's
flags, and removing points (engine/pointflags.py, engine/forget.py)."""

from __future__ import annotations

from engine import argtypes, clilog
from engine.cli.common import open_repo
from engine.commandline import EXIT_OK, add_command, emit


def _kind(args) -> str | None:
    from engine.points import DISK, VM
    return VM if getattr(args, "vm_ids", False) else DISK if getattr(args, "disk_ids", False) else None


def _flag_doc(rec) -> dict:
    return {"id": rec.id, "protected": rec.protected, "note": rec.note}


def cmd_protect(args) -> int:
    from engine.pointflags import update_point
    protect = args.command == "protect"
    with open_repo(args) as repo:
        rec = update_point(repo, args.id, _kind(args), args.wait, protected=protect)
    clilog.summary(f"{rec.id} {'protected: forget and delete leave it' if protect else 'no longer protected'}")
    emit(args, {"point": _flag_doc(rec)}, rec.id)
    return EXIT_OK


def cmd_note(args) -> int:
    from engine.errors import UsageError
    from engine.pointflags import check_note, update_point
    if args.clear == (args.text is not None):
        raise UsageError("give either a TEXT or --clear")
    text = "" if args.clear else check_note(args.text)
    with open_repo(args) as repo:
        rec = update_point(repo, args.id, _kind(args), args.wait, note=text)
    clilog.summary(f"{rec.id}: note {'removed' if args.clear else 'set'}")
    emit(args, {"point": _flag_doc(rec)}, rec.id)
    return EXIT_OK


def _which(sp) -> None:
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--disk", dest="disk_ids", action="store_true",
                   help="the ids are disk backups (needed only when a disk and a VM share the name)")
    g.add_argument("--vm", dest="vm_ids", action="store_true", help="the ids are VM backups (VM@N)")


def _wait(sp) -> None:
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another writer of the store, inf: as long as it takes "
                         "(default: fail at once)")


def register(sub) -> None:
    for name, text, example in (
            ("protect", "protect a point: forget never removes it, delete refuses it",
             "blockvault protect /backup/store db01@12\n  blockvault protect /backup/store web01@3 --vm"),
            ("unprotect", "let forget and delete remove a point again",
             "blockvault unprotect /backup/store db01@12")):
        sp = add_command(sub, name, cmd_protect, text, example)
        sp.add_argument("store", metavar="STORE")
        sp.add_argument("id", metavar="ID", help="DISK@N or VM@N (also @latest, @-1, @YYYY-MM-DD)")
        _which(sp)
        _wait(sp)
    sp = add_command(sub, "note", cmd_note, "attach a note to a point (shown by list), or remove it",
                     "blockvault note /backup/store db01@12 'before the upgrade to PostgreSQL 17'\n"
                     "  blockvault note /backup/store db01@12 --clear")
    sp.add_argument("store", metavar="STORE")
    sp.add_argument("id", metavar="ID", help="DISK@N or VM@N (also @latest, @-1, @YYYY-MM-DD)")
    sp.add_argument("text", metavar="TEXT", nargs="?",
                    help="one line of printable text, at most 1000 characters (no control characters)")
    sp.add_argument("--clear", action="store_true", help="remove the point's note")
    _which(sp)
    _wait(sp)
