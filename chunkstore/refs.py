"""Chunk reference counts, dead chunks and dead bytes per pack (format 3).

A chunk counts the *segments* that name it (each segment once, however
often it names the chunk); chunkstore does not know manifests, so the
engine hands it the contents of the segments it adds or removes, in the
transaction that adds or removes them.  The zero digest is never counted
(it is never stored).

A chunk whose count reaches 0 is *dead*: it goes into ``dead`` stamped with
the transaction's lifecycle generation (``meta`` ``gen``, bumped once by
every transaction that makes a chunk dead, switches index entries or
removes packs).  Its record is not removed: gc does that, once no live
registration is older than the stamp (chunkstore/gc.py).  A commit that
references a dead chunk again (deduplicated before it died) revives it.

``packdead`` keeps, per chunk pack, the bytes of its records that gc may
reclaim: dead chunks, and records the index no longer points at (a bad
chunk stored again, a dead chunk stored again, the loser's copy of a chunk
two sessions both stored).  It is what lets gc pick its packs, and `stats`
say the dead bytes, by reading only the packs that have some.  An indexed
chunk with count 0 that is not dead (checkpointed by a session that has
not committed yet) is not counted as dead bytes: it may still be wanted.

Every value here can be recomputed from the manifests (engine/references.py
``recount``), which is what ``rebuild``, the format-2 upgrade and ``verify``
do.  Encodings: docs/FORMAT.md ("Lifecycle databases").
"""

from __future__ import annotations

import struct
from typing import Iterable

from chunkstore import residency
from chunkstore.index import IndexEntry, PackInfo
from chunkstore.pack import PACK_HEADER, RECORD_HEADER_SIZE

CHUNKREFS_DB = b"chunkrefs"
DEAD_DB = b"dead"
PACKDEAD_DB = b"packdead"
DOOMED_DB = b"doomed"
GEN_KEY = b"gen"
# meta key: present (u64 3) once the index keeps the counts (init, upgrade, rebuild).
FORMAT_KEY = b"format"
REFS_DBS = (CHUNKREFS_DB, DEAD_DB, PACKDEAD_DB, DOOMED_DB)
TRAILER_SIZE = RECORD_HEADER_SIZE
_U64 = struct.Struct("<Q")


def u64(value) -> int:
    return _U64.unpack(bytes(value))[0]


def pack_u64(n: int) -> bytes:
    return _U64.pack(n)


def record_size(entry: IndexEntry) -> int:
    return RECORD_HEADER_SIZE + entry.stored_len


def record_bytes(info: PackInfo) -> int:
    """Bytes of a chunk pack's records: all but its header and trailer."""
    return max(0, info.size - PACK_HEADER.size - (TRAILER_SIZE if info.sealed else 0))


def distinct_digests(content: bytes, dlen: int, zero: bytes) -> set[bytes]:
    """The non-zero digests a segment names, each once."""
    if len(content) % dlen == 0:  # always, but for a damaged segment
        # struct slices the digests out in C: 2.5x faster than a set of slices,
        # and a forget of a long chain does this for every segment it frees.
        found = {d for d, in _digest_struct(dlen).iter_unpack(content)}
    else:
        found = {bytes(content[i:i + dlen]) for i in range(0, len(content), dlen)}
    found.discard(zero)
    return found


_DIGEST_STRUCTS: dict[int, struct.Struct] = {}


def _digest_struct(dlen: int) -> struct.Struct:
    st = _DIGEST_STRUCTS.get(dlen)
    if st is None:
        st = _DIGEST_STRUCTS[dlen] = struct.Struct(f"{dlen}s")
    return st


def has_counts(txn, meta_db) -> bool:
    return txn.get(FORMAT_KEY, db=meta_db) is not None


def mark_counted(txn, meta_db) -> None:
    txn.put(FORMAT_KEY, pack_u64(3), db=meta_db)


class ChunkRefs:
    """The chunk side of the reference counts, in the store's LMDB."""

    def __init__(self, store):
        self.store = store
        self.refs_db = store.db(CHUNKREFS_DB)
        self.dead_db = store.db(DEAD_DB)
        self.packdead_db = store.db(PACKDEAD_DB)
        self.doomed_db = store.db(DOOMED_DB)
        self._txn_gen: tuple[object, int] = (None, 0)

    # -- the generation --------------------------------------------------------

    def gen(self, txn) -> int:
        value = txn.get(GEN_KEY, db=self.store.meta_db)
        return u64(value) if value is not None else 0

    def new_gen(self, txn) -> int:
        """This write transaction's generation: the stored one + 1, bumped once per transaction."""
        owner, gen = self._txn_gen
        if owner is txn:
            return gen
        gen = self.gen(txn) + 1
        txn.put(GEN_KEY, pack_u64(gen), db=self.store.meta_db)
        self._txn_gen = (txn, gen)
        return gen

    # -- counts ----------------------------------------------------------------

    def count(self, txn, digest: bytes) -> int:
        value = txn.get(digest, db=self.refs_db)
        return u64(value) if value is not None else 0

    def dead_stamp(self, txn, digest: bytes) -> int | None:
        value = txn.get(digest, db=self.dead_db)
        return u64(value) if value is not None else None

    def _dead_bytes_add(self, txn, pack_id: bytes, delta: int) -> None:
        value = txn.get(pack_id, db=self.packdead_db)
        now = (u64(value) if value is not None else 0) + delta
        if now > 0:
            txn.put(pack_id, pack_u64(now), db=self.packdead_db)
        elif value is not None:
            txn.delete(pack_id, db=self.packdead_db)

    def garbage(self, txn, entry: IndexEntry) -> None:
        """A record the index stops pointing at (or never pointed at) is dead bytes of its pack."""
        self._dead_bytes_add(txn, entry.pack_id, record_size(entry))

    def add_segments(self, txn, contents: Iterable[bytes], paced: "residency.Paced | None" = None) -> None:
        """Segments that went from no manifest to one: their chunks count up; dead ones revive.

        ``contents`` is best a generator that reads each segment as it is
        wanted: one transaction may count hundreds of MiB of them (a backup
        that rewrote a fragmented disk), so each leaves memory once counted
        and the map is released as they are read (``paced``, the caller's
        if it reads them: chunkstore/residency.py)."""
        zero = self.store.digester.zero_digest
        dlen = len(zero)
        refs_db, chunks_db = self.refs_db, self.store.chunks_db
        paced = paced or residency.Paced(self.store.release_map)
        for content in contents:
            paced.step()
            for d in distinct_digests(content, dlen, zero):
                n = self.count(txn, d)
                txn.put(d, pack_u64(n + 1), db=refs_db)
                if n == 0 and txn.get(d, db=self.dead_db) is not None:
                    txn.delete(d, db=self.dead_db)
                    value = txn.get(d, db=chunks_db)
                    if value is not None:
                        self._dead_bytes_add(txn, IndexEntry.decode(value).pack_id,
                                             -record_size(IndexEntry.decode(value)))

    def release_segments(self, txn, contents: Iterable[bytes], freed: list[int] | None = None,
                         paced: "residency.Paced | None" = None) -> int:
        """Segments no manifest names any more: their chunks count down; those
        at 0 die, stamped with this transaction's generation.  Returns the
        number of chunks that died; ``freed[0]``, if given, grows by their
        records' bytes (what ``freed_bytes`` predicts before).  ``contents``
        as for ``add_segments``."""
        zero = self.store.digester.zero_digest
        dlen = len(zero)
        refs_db, chunks_db = self.refs_db, self.store.chunks_db
        died = 0
        paced = paced or residency.Paced(self.store.release_map)
        for content in contents:
            paced.step()
            for d in distinct_digests(content, dlen, zero):
                n = self.count(txn, d)
                if n > 1:
                    txn.put(d, pack_u64(n - 1), db=refs_db)
                    continue
                if n == 1:
                    txn.delete(d, db=refs_db)
                value = txn.get(d, db=chunks_db)
                if value is None or txn.get(d, db=self.dead_db) is not None:
                    continue
                txn.put(d, pack_u64(self.new_gen(txn)), db=self.dead_db)
                entry = IndexEntry.decode(value)
                self.garbage(txn, entry)
                died += 1
                if freed is not None:
                    freed[0] += record_size(entry)
        return died

    def kill_orphan(self, txn, digest: bytes, entry: IndexEntry) -> bool:
        """An indexed chunk nothing references (a killed session's checkpoint) becomes dead."""
        if self.count(txn, digest) or txn.get(digest, db=self.dead_db) is not None:
            return False
        txn.put(digest, pack_u64(self.new_gen(txn)), db=self.dead_db)
        self.garbage(txn, entry)
        return True

    def put_entry(self, txn, digest: bytes, entry: IndexEntry, replace_bad: bool) -> bool:
        """Index a chunk a session stored; False when the index keeps another copy.

        A dead chunk's old record (already dead bytes) or a bad one is
        replaced; a chunk indexed and alive meanwhile (another session stored
        it too) keeps its record, and this one is dead bytes."""
        chunks_db = self.store.chunks_db
        old = txn.get(digest, db=chunks_db)
        if old is not None:
            old_entry = IndexEntry.decode(old)
            if old_entry == entry:
                return True
            if txn.get(digest, db=self.dead_db) is not None:
                txn.delete(digest, db=self.dead_db)
            elif replace_bad:
                self.garbage(txn, old_entry)
            else:
                self.garbage(txn, entry)
                return False
        txn.put(digest, entry.encode(), db=chunks_db)
        return True

    # -- figures ---------------------------------------------------------------

    def dead_bytes(self, txn) -> int:
        with txn.cursor(db=self.packdead_db) as cur:
            return sum(u64(v) for _, v in cur)

    def freed_bytes(self, txn, drops: dict[bytes, int], paced: "residency.Paced | None" = None) -> int:
        """Stored bytes of the chunks whose count would reach 0 if each lost ``drops[d]`` references."""
        total = 0
        paced = paced or residency.Paced(self.store.release_map)
        for d, n in drops.items():
            paced.step()
            if self.count(txn, d) <= n:
                value = txn.get(d, db=self.store.chunks_db)
                if value is not None and txn.get(d, db=self.dead_db) is None:
                    total += record_size(IndexEntry.decode(value))
        return total
