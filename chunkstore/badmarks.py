"""Bad-chunk marks: chunks verify found damaged, which the next backup stores again.

Deduplication trusts the index: a digest it knows is never written again.
Without marks, a chunk whose record is damaged would stay damaged in every
later backup of the same data, because each of them would deduplicate
against the bad copy.  verify therefore records every chunk it finds corrupt
(or whose pack is gone) in LMDB database ``bad``; a write session treats a
marked digest as absent (``WriteSession.claim``), so the next backup that
reads those bytes stores a fresh copy, and its commit points the index entry
at the new record and turns the mark into "healed".  Every point that names
the digest heals with it, since manifests reference chunks by digest only.
The next verify reports the healed chunks and drops their marks.

Marks are written under the store lock, shared like any writer's (verify
takes it briefly, without waiting), so a session that began before a mark
may still use the bad copy; the next one stores it again.  A session heals
a mark only while it still says bad: once another session healed it, a
copy stored again is a duplicate like any other.  Value layout:
docs/FORMAT.md ("bad").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from chunkstore.errors import StoreError
from chunkstore.lock import WriterLock
from chunkstore.readonly import refuse_write

BAD_DB = b"bad"
BAD, HEALED = "bad", "healed"


@dataclass(frozen=True)
class Mark:
    state: str      # BAD or HEALED
    reason: str     # what verify found
    time: float     # when it was marked, or healed

    def encode(self) -> bytes:
        return json.dumps({"state": self.state, "reason": self.reason, "time": self.time},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value) -> "Mark":
        try:
            doc = json.loads(bytes(value))
            return cls(str(doc["state"]), str(doc.get("reason", "")), float(doc.get("time", 0)))
        except (ValueError, TypeError, KeyError):
            return cls(BAD, "unreadable mark", 0.0)  # err towards storing the chunk again


def all_marks(store, txn) -> dict[bytes, Mark]:
    with txn.cursor(db=store.bad_db) as cur:
        return {bytes(k): Mark.decode(v) for k, v in cur}


def bad_digests(store) -> set[bytes]:
    """Digests a write session must treat as absent (usually none)."""
    with store.read_txn() as txn:
        return {d for d, m in all_marks(store, txn).items() if m.state == BAD}


def still_bad(store, txn, digest: bytes) -> bool:
    """Whether the index entry of a marked digest is still the bad copy."""
    value = txn.get(digest, db=store.bad_db)
    return value is not None and Mark.decode(value).state == BAD


def heal(store, txn, digests) -> None:
    """In a session's commit: these marked digests were just stored again."""
    now = time.time()
    for digest in digests:
        old = Mark.decode(txn.get(digest, db=store.bad_db) or b"{}")
        txn.put(digest, Mark(HEALED, old.reason, now).encode(), db=store.bad_db)


@dataclass
class MarkResult:
    recorded: bool = False
    marked: int = 0                       # marks set by this verify
    healed: dict = field(default_factory=dict)   # digest -> Mark (healed, or found good again)
    note: str = ""


def update_marks(store, bad: dict[bytes, str], started: float) -> MarkResult:
    """After a verify that began at ``started`` and found ``bad`` (digest ->
    reason): mark those, report and drop the marks of chunks that are good
    again.  Takes the store lock shared, as any writer does (only a store held
alone, by a rebuild, is reported busy and not waited for)."""
    result = MarkResult()
    lock = WriterLock(store.path)
    try:
        if store.read_only:  # a read-only mount, or an index we may not write (chunkstore/readonly.py)
            raise refuse_write(store.path)
        lock.acquire(0.0, "verify (marking bad chunks)", shared=True)
    except (StoreError, OSError) as e:
        with store.read_txn() as txn:
            result.healed = {d: m for d, m in all_marks(store, txn).items() if m.state == HEALED}
        result.note = (f"bad chunks not marked, so the next backup will not store them again ({e}); "
                       "run verify again when the store is free")
        return result
    try:
        now = time.time()
        with store.env.begin(write=True) as txn:
            for digest, mark in all_marks(store, txn).items():
                if digest in bad:
                    continue
                # Not bad now: stored again by a backup, or good again (a pack put back).
                result.healed[digest] = mark if mark.state == HEALED else Mark(HEALED, mark.reason, 0.0)
                txn.delete(digest, db=store.bad_db)
            for digest, reason in bad.items():
                old = txn.get(digest, db=store.bad_db)
                if old is not None:
                    mark = Mark.decode(old)
                    if mark.state == HEALED and mark.time >= started:
                        continue  # stored again while this verify ran: the copy it checked is gone
                    if mark.state == BAD:
                        continue
                txn.put(digest, Mark(BAD, reason, now).encode(), db=store.bad_db)
                result.marked += 1
        result.recorded = True
    finally:
        lock.release()
    return result
