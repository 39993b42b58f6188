"""Reference counts of segments and chunks, kept in the commit's transaction (format 3).

A segment counts the manifests that name it (each manifest once), a chunk
the segments that name it (chunkstore/refs.py).  Both change in the very
LMDB transaction that adds a manifest (a backup's commit) or removes one
(``release_manifest``, called by forget/delete), so a chunk is known dead
the moment its last point goes, and removing a point costs the segments of
its manifest, not the store: the chunk side is touched only for segments
that appear (an incremental: the segments it changed) or disappear.

The counts hold nothing the manifests do not: ``recount`` computes them all
from the ``manifests`` and ``segments`` databases.  ``rebuild`` and the
upgrade of a format-2 store write what it computes; ``verify`` compares it
with what is stored and reports any difference as damage.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from chunkstore import residency
from chunkstore.errors import StoreError
from chunkstore.index import IndexEntry, PackInfo
from chunkstore.refs import distinct_digests, mark_counted, pack_u64, record_bytes, record_size, u64
from engine.manifest import MANIFESTS_DB, SEGMENTS_DB, Manifest

SEGREFS_DB = b"segrefs"
MAX_DRIFT_LISTED = 20

log = logging.getLogger("blockvault.references")


class References:
    """The engine's side of the counts; ``store.refs`` is the chunk side."""

    def __init__(self, repo):
        self.repo = repo
        self.store = repo.store
        self.chunks = repo.store.refs
        self.segrefs_db = repo.store.db(SEGREFS_DB)

    def count(self, txn, segment: bytes) -> int:
        value = txn.get(segment, db=self.segrefs_db)
        return u64(value) if value is not None else 0

    @property
    def kept(self) -> bool:
        """False for a format-2 store not upgraded yet (read by a reader): no counts to read."""
        return self.store.config.version >= 3

    def add_manifests(self, txn, manifests: list[Manifest]) -> None:
        """A commit's new manifests (their segments already written in ``txn``).

        One pass, each segment read once and only while its chunks are
        counted: a backup that committed its segments early (a fragmented
        disk's, 256 MiB of them) has every one of them to count here, and
        reading them all first held them all in the transaction's map (RSS
        69 → 222 MB for 8,192 segments); the map is now released as they go
        (chunkstore/residency.py ``Paced``).  They are read in the manifest's
        order, which is about the order their pages have in the file (a
        backup writes them in disk order), so that each folio is faulted in
        about once: in hash order (a ``set``) 16 MiB of them mapped the whole
        140 MB file.  A segment that turns out missing raises, which aborts
        the whole transaction, counts included."""
        segments_db = self.repo.manifests.segments_db
        paced = residency.Paced(self.store.release_map)

        def appeared():
            for m in manifests:
                for s in dict.fromkeys(m.segments):  # each once, in the manifest's order (see above)
                    paced.step()
                    n = self.count(txn, s)
                    txn.put(s, pack_u64(n + 1), db=self.segrefs_db)
                    if n:
                        continue
                    content = txn.get(s, db=segments_db)
                    if content is None:
                        # It existed when the commit was prepared, so it was not written again; a
                        # forget of another chain removed it since.  Committing would lose it.
                        raise StoreError(f"manifest segment {s.hex()} was removed by a forget or delete that ran "
                                         "while this backup committed; nothing was committed: run the backup again")
                    yield bytes(content)

        self.chunks.add_segments(txn, appeared(), paced)

    def release_manifest(self, txn, manifest: Manifest, freed: list[int] | None = None) -> int:
        """A manifest leaves the store (in ``txn``, a write transaction): its
        segments count down, a segment at 0 is deleted and its chunks count
        down, and a chunk at 0 becomes dead, stamped with the transaction's
        new generation.  Returns the number of chunks that died (``freed[0]``,
        if given, grows by their stored bytes)."""
        segments_db = self.repo.manifests.segments_db
        paced = residency.Paced(self.store.release_map)

        def gone():  # streamed, in the manifest's order, the map released as they go: as ``add_manifests``
            for s in dict.fromkeys(manifest.segments):
                paced.step()
                n = self.count(txn, s)
                if n > 1:
                    txn.put(s, pack_u64(n - 1), db=self.segrefs_db)
                    continue
                if n == 0:
                    log.warning("segment %s had no reference count; run 'blockvault verify'", s.hex())
                else:
                    txn.delete(s, db=self.segrefs_db)
                content = txn.get(s, db=segments_db)
                if content is not None:
                    txn.delete(s, db=segments_db)
                    yield bytes(content)

        return self.chunks.release_segments(txn, gone(), freed, paced)

    def unique_bytes(self, txn, manifests: list[Manifest]) -> int | None:
        """Stored bytes freed if only these manifests were removed: the chunks
        whose count would reach 0 (None on a store that keeps no counts)."""
        if not self.kept:
            return None
        drops = Counter()
        for m in manifests:
            for s in dict.fromkeys(m.segments):  # in the manifest's order, as ``add_manifests`` reads them
                drops[s] += 1
        zero = self.store.digester.zero_digest
        chunk_drops: Counter = Counter()
        segments_db = self.repo.manifests.segments_db
        paced = residency.Paced(self.store.release_map)
        for s, n in drops.items():
            paced.step()
            if self.count(txn, s) <= n:
                content = txn.get(s, db=segments_db)
                if content is not None:
                    chunk_drops.update(distinct_digests(bytes(content), len(zero), zero))
        return self.chunks.freed_bytes(txn, chunk_drops, paced)


# -- recounting from the manifests --------------------------------------------


@dataclass
class Expected:
    segments: Counter = field(default_factory=Counter)
    chunks: Counter = field(default_factory=Counter)
    unreadable: list = field(default_factory=list)    # manifests that do not parse (verify reports them)


def expected_counts(repo, txn) -> Expected:
    out = Expected()
    manifests = repo.manifests
    with txn.cursor(db=manifests.manifests_db) as cur:
        for key, value in cur:
            try:
                m = Manifest.decode(value, f"manifest {bytes(key)!r}")
            except Exception as e:  # noqa: BLE001 - a damaged manifest counts nothing; verify names it
                out.unreadable.append(str(e))
                continue
            for s in dict.fromkeys(m.segments):
                out.segments[s] += 1
    zero = repo.store.digester.zero_digest
    # Every segment of the store is read: in the manifests' order (which is
    # about the order of the file, see ``add_manifests``), the map released as they go.
    paced = residency.Paced(repo.store.release_map)
    for s in out.segments:
        content = txn.get(s, db=manifests.segments_db)
        paced.step()
        if content is not None:
            out.chunks.update(distinct_digests(bytes(content), len(zero), zero))
    return out


def _pack_dead(store, txn, kept_bytes: Counter) -> dict[bytes, int]:
    """Per chunk pack: its record bytes but those of indexed chunks that are
    not dead (``kept_bytes``): records not indexed, and dead ones."""
    out = {}
    with txn.cursor(db=store.packs_db) as cur:
        for pid, value in cur:
            info = PackInfo.decode(value)
            if info.metadata:
                continue
            pid = bytes(pid)
            garbage = record_bytes(info) - kept_bytes[pid]
            if garbage > 0:
                out[pid] = garbage
    return out


def recount(repo, txn, gen_floor: int = 0) -> str:
    """Write every count anew from the manifests (rebuild, upgrade; nothing else runs).

    Segments no manifest names are deleted (a rebuild replays the backup
    that wrote a segment but a forget's deletes only of its manifest), and
    every indexed chunk that nothing references becomes dead, keeping its
    stamp if it had one, else stamped with the current generation: nobody
    can reference such a chunk (no session runs), so gc may take it."""
    store, refs = repo.store, repo.store.refs
    exp = expected_counts(repo, txn)
    old_dead = {bytes(k): bytes(v) for k, v in txn.cursor(db=refs.dead_db)}
    gen = max(refs.gen(txn), gen_floor)
    for db in (repo.references.segrefs_db, refs.refs_db, refs.dead_db, refs.packdead_db):
        txn.drop(db, delete=False)
    for s in sorted(exp.segments):
        txn.put(s, pack_u64(exp.segments[s]), db=repo.references.segrefs_db, append=True)
    for d in sorted(exp.chunks):
        txn.put(d, pack_u64(exp.chunks[d]), db=refs.refs_db, append=True)
    segments_db = repo.manifests.segments_db
    unused = [bytes(k) for k in txn.cursor(db=segments_db).iternext(keys=True, values=False)
              if bytes(k) not in exp.segments]
    for s in unused:
        txn.delete(s, db=segments_db)
    indexed: Counter = Counter()
    dead = 0
    with txn.cursor(db=store.chunks_db) as cur:
        for d, value in cur:
            d, entry = bytes(d), IndexEntry.decode(value)
            if exp.chunks[d]:
                indexed[entry.pack_id] += record_size(entry)
            else:
                txn.put(d, old_dead.get(d) or pack_u64(gen), db=refs.dead_db)
                dead += 1
    for pid, garbage in sorted(_pack_dead(store, txn, indexed).items()):
        txn.put(pid, pack_u64(garbage), db=refs.packdead_db)
    if gen:
        txn.put(b"gen", pack_u64(gen), db=store.meta_db)
    mark_counted(txn, store.meta_db)
    return (f"counts computed from the manifests: {len(exp.segments)} segments, {len(exp.chunks)} chunks "
            f"referenced, {dead} dead, {len(unused)} unreferenced segments removed")


def count_drift(repo, txn) -> list[str]:
    """Where the stored counts differ from the manifests' (verify): damage."""
    store, refs = repo.store, repo.store.refs
    exp = expected_counts(repo, txn)
    drift: list[str] = []
    paced = residency.Paced(store.release_map)  # the scans below read whole databases through the map

    def compare(db, expected: Counter, what: str) -> None:
        seen = set()
        for k, v in txn.cursor(db=db):
            paced.step()
            k = bytes(k)
            seen.add(k)
            if expected[k] != u64(v):
                drift.append(f"{what} {k.hex()}: count {u64(v)} stored, {expected[k]} by the manifests")
        for k in expected:
            if k not in seen:
                drift.append(f"{what} {k.hex()}: no count stored, {expected[k]} by the manifests")

    compare(repo.references.segrefs_db, exp.segments, "segment")
    compare(refs.refs_db, exp.chunks, "chunk")
    dead: set[bytes] = set()
    for d, _ in txn.cursor(db=refs.dead_db):
        d = bytes(d)
        dead.add(d)
        if exp.chunks[d]:
            drift.append(f"chunk {d.hex()}: marked dead, but {exp.chunks[d]} segments reference it")
        elif txn.get(d, db=store.chunks_db) is None:
            drift.append(f"chunk {d.hex()}: marked dead, but not in the index")
    indexed: Counter = Counter()
    with txn.cursor(db=store.chunks_db) as cur:
        for d, value in cur:
            paced.step()
            d = bytes(d)
            if d not in dead:
                entry = IndexEntry.decode(value)
                indexed[entry.pack_id] += record_size(entry)
    expected_dead = _pack_dead(store, txn, indexed)
    stored = {bytes(k): u64(v) for k, v in txn.cursor(db=refs.packdead_db)}
    doomed = {bytes(k) for k, _ in txn.cursor(db=refs.doomed_db)}
    for pid in sorted(set(stored) | set(expected_dead)):
        if pid in doomed:
            continue
        if stored.get(pid, 0) != expected_dead.get(pid, 0):
            drift.append(f"pack {pid.hex()}: {stored.get(pid, 0)} dead bytes stored, "
                         f"{expected_dead.get(pid, 0)} by the index")
    if len(drift) > MAX_DRIFT_LISTED:
        drift = drift[:MAX_DRIFT_LISTED] + [f"... and {len(drift) - MAX_DRIFT_LISTED} more"]
    return drift
