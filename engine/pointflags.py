"""``protect``, ``unprotect`` and ``note``: flags kept in a point's catalog record.

A protected point is never removed by ``forget`` nor by ``delete`` (PBS's
"protected"); a note is free text an administrator attaches ("before the
upgrade to 8.2").  Both are fields of the record itself (docs/FORMAT.md),
rewritten whole by a commit of their own whose metadata records carry the
new record, so ``rebuild`` replays them like any other write.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from engine.errors import BadInputError
from engine.points import DISK, Points

log = logging.getLogger("blockvault.points")
MAX_NOTE = 1000  # characters


def check_note(text: str) -> str:
    """A note may hold any printable text: no control characters (newlines,
    ESC...), no bidirectional overrides, at most MAX_NOTE characters."""
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("the note is empty; give a text, or --clear to remove the note")
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        raise BadInputError(f"the note {text!r} holds the control character {bad!r}; notes are one line of "
                            "printable text")
    if len(text) > MAX_NOTE:
        raise BadInputError(f"the note has {len(text)} characters; at most {MAX_NOTE} are kept")
    return text


def update_point(repo, ref: str, kind: str | None = None, wait: float = 0.0, **changes):
    """Set ``changes`` (``protected=``, ``note=``) on the point ``ref``; the new record.

    Runs as the store's writer: the record read is the record replaced."""
    points = Points(repo)
    store = repo.store
    with store.writer(wait=wait, purpose=f"{' and '.join(changes)} of {ref}") as session:
        with store.read_txn() as txn:
            point = points.resolve(txn, ref, kind)
            owner = points.owner(txn, point.record) if point.kind == DISK else None
        if owner is not None and "protected" in changes:
            # forget and delete treat the VM backup as the point: a flag on one of its disks would
            # make the VM backup's removal fail half-way through a policy.
            raise BadInputError(f"{point.id} is a disk backup of VM backup {owner.id}; protect the VM backup: "
                                f"'blockvault {'protect' if changes['protected'] else 'unprotect'} STORE {owner.id} --vm'")
        old = point.record
        new = replace(old, **changes)
        if new == old:
            return new  # nothing to write (the session's exit lets the lock go)
        before = old.to_json()

        def check(txn):  # the writer lock makes a change in between a bug; a bug must not lose one
            now = txn.get(old.key, db=point.catalog.db)
            if now is None or bytes(now) != before:
                raise BadInputError(f"{old.id} changed while its flags were being set; run the command again")

        session.commit(check, metadata=[point.catalog.write(new)])
    log.debug("%s: %s", new.id, ", ".join(f"{k} {v!r}" for k, v in changes.items()))
    return new
