"""WriteSession: one writer of a store (one backup), fed by many threads at once.

Until ``commit`` nothing a session writes is visible: index entries wait in
memory and pack bytes sit in files nothing references.  ``commit`` seals and
fsyncs every pack first and only then commits the LMDB transaction, so the
index never points at bytes a crash could lose.  Leaving the ``with`` block
without committing deletes the session's packs.

The backup pipeline calls ``claim`` and ``write`` from every worker thread,
so the session is built so that those threads do not queue behind each
other or behind the disk:

* ``claim`` decides, under one short lock, which digests a caller must
  store: a chunk that two batches (or two disks of a VM) both meet is
  written once, by whoever claimed it first.
* ``write`` only *reserves* byte ranges under the lock and then writes them
  with ``pwritev`` outside it, with the GIL released.  Each thread appends to
  a pack of its own: two writers of one file queue on its inode lock (perf
  showed them spinning there), two files cost nothing.
* A full pack is retired; once its last writer is done a background thread
  writes its trailer and fsyncs it, overlapping the flush with the reading
  and compressing of the rest of the disk.  At most ``SEAL_BACKLOG`` retired
  packs wait for it, which bounds the dirty data in flight.

Only one thread writes a given pack, so its records reach the file in
order and a crash leaves at most a torn tail.

Several sessions (backups of other disks, other processes) run at once,
each with its own packs; only their commits take turns, under
``STORE/locks/commit.lock`` from the commit number to the LMDB commit, so
the commits stay one chain for ``rebuild``.  A chunk two of them stored
keeps the index entry committed first (``_put_chunks``).

Two things leave memory before the final commit, so that a session's memory
does not grow with what it writes: index entries of synced packs
(checkpoints, ``_checkpoint``), and writes of the layer above that are
harmless unreferenced — its content-addressed manifest segments — which
``commit_early`` commits as commits of their own.  Neither makes anything
visible that refers to them: only the final commit does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import lmdb

from chunkstore import badmarks, residency
from chunkstore.config import FORMAT_VERSION
from chunkstore.errors import StoreError
from chunkstore.index import CHUNKS_DB, IndexEntry, PackInfo
from chunkstore.holds import Holds
from chunkstore.lock import CommitLock
from chunkstore.metadata import (LAST_COMMIT, OP_PUT, RESERVED_COMMIT, U64, MetadataWrite, iter_metadata_records,
                                 meta_number, take_writes)
from chunkstore.pack import RECORD_HEADER_SIZE, PackWriter, encode_record
from chunkstore.registry import Registration
from chunkstore.sealer import Sealer

if TYPE_CHECKING:
    from chunkstore.store import ChunkStore

# Pending index entries beyond which synced packs are checkpointed into the
# index (about 120 bytes each in memory): bounds a session's memory whatever
# the amount of new data.
CHECKPOINT_ENTRIES = 8192
# Retired packs that may wait for their fsync before writers are held back.
SEAL_BACKLOG = 2
# chunkstore/crypto.py TAG_SIZE: what sealing adds to a payload.  Not imported
# from there, so that a plaintext store's writer never loads cryptography.
TAG_SIZE = 16

# One chunk for ``write``: (digest, codec, raw length, payload).
Record = tuple[bytes, int, int, object]

class WriteSession:
    """One writer of a store, beside others (each its own packs; chunkstore/holds.py
    says what it holds).  ``claim``, ``write`` and ``add`` are
    thread-safe; ``commit`` and ``abort`` belong to the thread that opened it."""

    def __init__(self, store: "ChunkStore", wait: float, purpose: str, kind: str = "backup",
                 chains: Iterable[tuple[str, str]] = ()):
        self.store = store
        self.purpose = purpose
        self._holds = Holds(store, purpose)  # chain locks, the store lock (shared), a registration
        # A format-2 store's first writer upgrades it, alone (ChunkStore.upgrade_format).
        self._holds.take(wait, kind, chains,
                         alone=store.upgrade_format if store.config.version < FORMAT_VERSION else None)
        try:
            # Marked by verify: stored again when met (chunkstore/badmarks.py).
            self._bad: set[bytes] = badmarks.bad_digests(store)
        except BaseException:
            self._holds.release()
            raise
        self.pending: dict[bytes, IndexEntry] = {}
        self._claimed: set[bytes] = set()
        self._mutex = threading.Lock()
        # One commit at a time: early commits come from the thread of each disk
        # being read (several in a VM backup), the final one from the caller's.
        self._committing = threading.Lock()
        self._sealed_one = threading.Condition(self._mutex)
        self._packs: list[PackWriter] = []   # packs not yet in the index
        self._current: dict[int, PackWriter] = {}   # open pack per writing thread
        self._retiring = 0                   # retired packs not yet synced
        self._sealer: Sealer | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self.committed = False
        self.bytes_written = 0
        self.checkpoints = 0
        self.duplicate_chunks = 0   # stored here, but another session indexed its copy first
        self.duplicate_bytes = 0
        # Duplicates whose copy here comes first in pack order (see _note_kept).
        self._kept: dict[bytes, IndexEntry] = {}
        self.early_commits = 0

    def lock_chains(self, chains: Iterable[tuple[str, str]], wait: float) -> None:
        """Add backup chains' locks once they are known (a VM's disks): chunkstore/holds.py."""
        self._holds.lock_chains(chains, wait)

    @property
    def registration(self) -> "Registration | None":
        return self._holds.registration

    def _new_pack(self) -> PackWriter:
        """A new pack, its id in the registration (durable) before its file exists."""
        return PackWriter(self.store.path, self.store.config, before_create=self._holds.registration.add_pack)

    def __enter__(self) -> "WriteSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    # -- writing ---------------------------------------------------------------

    def claim(self, digests: Iterable[bytes]) -> list[bytes]:
        """The digests the caller must write (order kept): in neither the index
        (a chunk marked bad counts as absent), this session's packs, nor
        another caller's claim.  They become the caller's: nobody else is told
        to write them."""
        out = []
        chunks_db, dead_db = self.store.chunks_db, self.store.refs.dead_db
        with self._mutex, self.store.read_txn() as txn:
            pending, claimed, bad = self.pending, self._claimed, self._bad
            for d in digests:
                # A dead chunk counts as absent: gc may remove it before this session commits.
                if d in pending or d in claimed or (txn.get(d, db=chunks_db) is not None and d not in bad
                                                    and txn.get(d, db=dead_db) is None):
                    continue
                claimed.add(d)
                out.append(d)
        return out

    def add(self, digest: bytes, codec: int, raw_len: int, payload) -> None:
        self.write([(digest, codec, raw_len, payload)])

    def write(self, records: Sequence[Record]) -> int:
        """Append chunks to the session's packs; returns the bytes written.

        A digest the session already holds is skipped.  Payloads are written
        before this returns, so they may be views of a buffer the caller
        reuses afterwards.
        """
        cipher = self.store.cipher
        # An encrypted store's records are sealed once ``reserve`` gave their
        # offset (the nonce), outside the mutex: chunkstore/recordseal.py.
        heads = [encode_record(d, codec, raw_len, payload) for d, codec, raw_len, payload in records] \
            if cipher is None else None
        tag = 0 if cipher is None else TAG_SIZE
        plan: list[tuple[PackWriter, int, list]] = []
        written = 0
        with self._mutex:
            self._check_writable()
            while self._retiring >= SEAL_BACKLOG and self._failure is None:
                self._sealed_one.wait()
            self._check_writable()
            target = self.store.config.pack_target_size
            thread = threading.get_ident()
            for i, (digest, codec, raw_len, payload) in enumerate(records):
                if digest in self.pending:
                    continue
                size = RECORD_HEADER_SIZE + len(payload) + tag
                pack = self._current.get(thread)
                if pack is not None and pack.chunk_count and pack.size + size > target:
                    self._retire(pack)
                    pack = None
                if pack is None:
                    try:
                        pack = self._new_pack()
                    except BaseException as e:  # the other writers stop too
                        self._fail(e)
                        raise
                    self._current[thread] = pack
                    self._packs.append(pack)
                if not plan or plan[-1][0] is not pack:
                    pack.writers += 1
                    plan.append((pack, pack.size, []))
                offset = pack.reserve(size)
                if heads is not None:
                    plan[-1][2].extend((heads[i], payload))
                else:
                    plan[-1][2].append((offset, records[i]))
                self.pending[digest] = IndexEntry(pack.pack_id, offset, len(payload) + tag, raw_len, codec)
                self._claimed.discard(digest)
                written += size
            self.bytes_written += written
        try:
            for pack, offset, parts in plan:
                if cipher is not None:
                    parts = _sealed_parts(cipher, pack.pack_id, parts)
                pack.write_at(offset, parts)
        except BaseException as e:
            with self._mutex:
                self._fail(e)
            raise
        finally:
            with self._mutex:
                for pack, _, _ in plan:
                    pack.writers -= 1
                    if pack.retired and pack.writers == 0:
                        self._sealer_queue().put(pack)
        return written

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError("write session is closed")
        if self._failure is not None:
            self._raise_failure("write session failed earlier, nothing committed")

    def _raise_failure(self, context: str) -> None:
        """Report the session's first failure, whichever thread asks.

        Several threads write at once and the caller sees whichever of them
        it collects first, so every later caller must get the same message
        as the thread that met the failure: an OSError (a full file system,
        an I/O error) is raised again with its errno and file name, for the
        command line to name the pack and say what to do.
        """
        failure = self._failure
        if isinstance(failure, OSError):
            raise OSError(failure.errno, failure.strerror, failure.filename) from failure
        raise StoreError(f"{context}: {failure}") from failure

    def _retire(self, pack: PackWriter) -> None:
        """No more reservations in ``pack``; it is sealed once its writers finish."""
        pack.retired = True
        self._retiring += 1
        for thread, open_pack in list(self._current.items()):
            if open_pack is pack:
                del self._current[thread]
        if pack.writers == 0:
            self._sealer_queue().put(pack)

    def _sealer_queue(self) -> "queue.SimpleQueue[PackWriter | None]":
        if self._sealer is None:
            self._sealer = Sealer(self)
        return self._sealer.todo

    def _sealed(self, pack: PackWriter) -> None:
        """Called by the sealer once ``pack`` is durable."""
        with self._mutex:
            self._retiring -= 1
            self._sealed_one.notify_all()
            due = len(self.pending) >= CHECKPOINT_ENTRIES and not self._closed
        if due:
            self._checkpoint()

    def _fail(self, error: BaseException) -> None:
        """Record the session's first failure (mutex held); wake writers held back."""
        self._failure = self._failure or error
        self._sealed_one.notify_all()

    def _sealer_failed(self, error: BaseException) -> None:
        with self._mutex:
            self._fail(error)

    def _checkpoint(self) -> None:
        """Commit the index entries of synced packs early, to bound memory.

        Only synced packs take part, so the entries point at durable bytes;
        until the session's final commit no manifest references them, so they
        are invisible garbage if the session never commits, exactly like the
        pack bytes themselves.
        """
        with self._mutex:
            synced = [p for p in self._packs if p.synced]
            ids = {p.pack_id for p in synced}
            moved = {d: e for d, e in self.pending.items() if e.pack_id in ids}
        store = self.store
        store.backend.wait_published(ids)  # the entries point into the bucket, not the spool
        store.check_owner()
        with CommitLock(store.path), store.env.begin(write=True) as txn:
            self._put_chunks(txn, moved)
            for pack in synced:
                txn.put(pack.pack_id, PackInfo(pack.size, pack.chunk_count, True, pack.metadata).encode(), db=store.packs_db)
        with self._mutex:
            for digest in moved:
                del self.pending[digest]
            self._packs = [p for p in self._packs if p.pack_id not in ids]
            self.checkpoints += 1
        self.store.release_map()

    def _put_chunks(self, txn, entries: dict[bytes, IndexEntry]) -> None:
        """Index this session's chunks, keeping whatever another session indexed first.

        Two sessions that met one new chunk at once both stored it; the index
        keeps one copy, the first committed, and never switches a reader's
        entry to another pack: the later copy is dead bytes in its pack
        (counted in ``duplicate_*``) for gc.  A chunk still marked bad is the
        exception: this session stored it again to replace the bad copy, and
        its mark says healed (chunkstore/badmarks.py); once healed, the next
        session's copy is a duplicate like any other."""
        chunks_db, refs = self.store.chunks_db, self.store.refs
        healed = []
        paced = residency.Paced(self.store.release_map)  # each put a random leaf: chunkstore/residency.py
        for digest, entry in entries.items():
            paced.step()
            if txn.put(digest, entry.encode(), db=chunks_db, overwrite=False):
                continue
            old = IndexEntry.decode(txn.get(digest, db=chunks_db))
            if refs.dead_stamp(txn, digest) is not None:
                # Dead (claim stored it again, as gc may take the old copy): this copy
                # replaces it; the old record is dead bytes already (chunkstore/refs.py).
                txn.delete(digest, db=refs.dead_db)
                txn.put(digest, entry.encode(), db=chunks_db)
            elif self._replaces(txn, digest):
                txn.put(digest, entry.encode(), db=chunks_db)
                refs.garbage(txn, old)  # the bad record
                healed.append(digest)
            else:
                self.duplicate_chunks += 1
                self.duplicate_bytes += RECORD_HEADER_SIZE + entry.stored_len
                refs.garbage(txn, entry)  # this session's copy
                self._note_kept(digest, entry, old)
        if healed:
            badmarks.heal(self.store, txn, healed)
            self._bad.difference_update(healed)

    def _replaces(self, txn, digest: bytes) -> bool:
        """Whether this session's copy of an indexed chunk replaces the indexed
        one: a copy of a dead chunk (chunkstore/refs.py), or of one still marked
        bad (not healed by another session)."""
        return (self.store.refs.dead_stamp(txn, digest) is not None
                or digest in self._bad and badmarks.still_bad(self.store, txn, digest))

    def _note_kept(self, digest: bytes, mine: IndexEntry, kept: IndexEntry) -> None:
        """Remember a duplicate that ``rebuild`` would index at this session's
        copy: it takes the first good copy in pack order (pack id, offset),
        while the index kept the first committed.  The commit's metadata then
        says which copy the index kept, so a rebuild picks that one too."""
        if (mine.pack_id, mine.offset) < (kept.pack_id, kept.offset):
            self._kept[digest] = kept

    def _kept_writes(self) -> list[tuple[int, bytes, bytes, bytes]]:
        """Under the commit lock: the ``chunks`` records of this commit's duplicates
        (none in the usual case).  Nothing indexes a chunk while the lock is
        held, so what is indexed now is what the LMDB commit will keep."""
        store = self.store
        paced = residency.Paced(store.release_map)
        with store.read_txn() as txn:
            for digest, entry in self.pending.items():
                paced.step()
                value = txn.get(digest, db=store.chunks_db)
                if value is not None and not self._replaces(txn, digest):
                    self._note_kept(digest, entry, IndexEntry.decode(value))
        return [(OP_PUT, CHUNKS_DB, d, e.encode()) for d, e in sorted(self._kept.items())]

    # -- ending ----------------------------------------------------------------

    def _stop_writing(self) -> None:
        """Refuse further writes, retire the open packs and wait for the sealer."""
        with self._mutex:
            self._closed = True
            for pack in list(self._current.values()):
                self._retire(pack)
        if self._sealer is not None:
            self._sealer.stop()

    def commit(self, extra: Callable[[lmdb.Transaction], None] | None = None,
               metadata: Sequence[MetadataWrite] = (),
               after: Callable[[lmdb.Transaction], None] | None = None) -> None:
        """Make this session's chunks, plus whatever ``extra`` and ``metadata`` write, visible at once.

        ``metadata`` is the layer above's writes, as (database, key, value):
        once the chunk packs are durable they are written as metadata records
        into a pack of their own, which is made durable too, and then applied
        in the same LMDB transaction as the chunks, so the packs alone can
        recreate those databases (chunkstore/rebuild.py).
        ``extra`` may check or write more, but what it writes is not in the
        packs; ``after`` runs once the metadata writes are in the
        transaction (the reference counts of what they added, which the
        rebuild recomputes rather than replays).  A ``metadata`` list is
        taken over (emptied).
        """
        if self.committed:
            raise StoreError("write session committed twice")
        writes = take_writes(metadata)
        store = self.store
        self._stop_writing()
        if self._failure is not None:
            self._raise_failure("write session failed, nothing committed")
        for pack in self._packs:
            if not pack.synced:  # not reached by the sealer: cannot happen unless it failed
                raise StoreError(f"pack {pack.pack_id.hex()} was never synced; nothing committed")
        # Step 2 of FORMAT.md "Commit order" where packs live elsewhere (a bucket):
        # every chunk pack durable there before the metadata naming its chunks exists.
        store.backend.wait_published([p.pack_id for p in self._packs])
        # From the number's reservation to the LMDB commit no other commit (of
        # this session: ``_committing``; of any session: CommitLock) runs, so
        # ``follows`` names the commit just before this one and the commits
        # form one chain, however sessions and early commits interleave.
        with self._committing, CommitLock(store.path):
            number = 0
            writes += self._kept_writes()
            if writes:
                number, follows = self._reserve_commit()
                self._write_metadata(iter_metadata_records(writes, number, follows, time.time(), store.codec))
                store.backend.wait_published([p.pack_id for p in self._packs if p.metadata])
            store.check_owner()  # a store in a bucket: its lease is still ours
            store.release_map()  # what the caller's reads mapped (chunkstore/residency.py)
            self._commit_index(extra, writes, number, after)
        self.committed = True
        self._holds.release()

    def _commit_index(self, extra, writes: list, number: int, after=None) -> None:
        """Step 5 of FORMAT.md "Commit order": one LMDB write transaction."""
        store = self.store
        with store.env.begin(write=True) as txn:
            self._put_chunks(txn, self.pending)
            for pack in self._packs:
                txn.put(pack.pack_id, PackInfo(pack.size, pack.chunk_count, True, pack.metadata).encode(), db=store.packs_db)
            if extra is not None:
                extra(txn)
            self._apply(txn, writes)
            if after is not None:
                after(txn)
            if number:
                txn.put(LAST_COMMIT, U64.pack(number), db=store.meta_db)

    def commit_early(self, metadata: Sequence[MetadataWrite]) -> int:
        """Commit ``metadata`` now, as a commit of its own; returns its number (0: nothing to write).

        For writes that are harmless when nothing ever refers to them, made
        early so that they leave memory before the final commit: the engine's
        manifest segments, which are content-addressed (a fragmented disk's
        backup rewrites hundreds of MiB of them).  The commit is an ordinary
        one — number reserved, metadata records in a pack of their own, made
        durable, then one LMDB transaction with that pack's ``packs`` entry,
        the writes and ``commit.last`` — so a crash at any point leaves what
        any commit leaves, and the final commit simply follows it.  It holds
        no chunk entries: those are checkpointed on their own.  The writes may
        name chunks that are not durable yet; nothing may refer to them until
        the final commit, which comes after every chunk pack is durable.
        A ``metadata`` list is taken over (emptied).
        """
        writes = take_writes(metadata)
        if not writes:
            return 0
        store = self.store
        with self._committing, CommitLock(store.path):  # as ``commit``: one chain of commits
            with self._mutex:
                self._check_writable()
            store.release_map()
            number, follows = self._reserve_commit()
            packs = self._write_metadata(iter_metadata_records(writes, number, follows, time.time(), store.codec))
            store.backend.wait_published([p.pack_id for p in packs])  # as ``commit``: durable where packs live
            # Out of the session's packs before LMDB holds them: an abort must
            # never delete a pack a committed commit needs.  Interrupted before
            # LMDB's commit, the pack is what a crash there leaves: a commit
            # the next one does not follow (chunkstore/rebuild.py leaves it out).
            with self._mutex:
                self._packs = [p for p in self._packs if p not in packs]
            store.check_owner()  # a store in a bucket: its lease is still ours
            with store.env.begin(write=True) as txn:
                for pack in packs:
                    txn.put(pack.pack_id, PackInfo(pack.size, pack.chunk_count, True, True).encode(), db=store.packs_db)
                self._apply(txn, writes)
                txn.put(LAST_COMMIT, U64.pack(number), db=store.meta_db)
            self.early_commits += 1
        self.store.release_map()
        return number

    def _apply(self, txn, writes: list) -> None:
        """The layer above's writes.  A write leaves
        Python's memory as it enters the transaction's: a fragmented disk's
        backup rewrites hundreds of MiB of segments, which would otherwise be
        held twice at the peak."""
        store = self.store
        paced = residency.Paced(store.release_map)  # each a random leaf: chunkstore/residency.py
        for i in range(len(writes)):
            paced.step()
            op, name, key, value = writes[i]
            writes[i] = None
            if op == OP_PUT:
                txn.put(key, value, db=store.db(name))
            else:
                txn.delete(key, db=store.db(name))

    def _reserve_commit(self) -> tuple[int, int]:
        """(this commit's number, the last committed one's), the number made
        durable before any record carries it: numbers are never reused."""
        store = self.store
        with store.env.begin(write=True) as txn:
            last = meta_number(txn, store.meta_db, LAST_COMMIT)
            number = max(last, meta_number(txn, store.meta_db, RESERVED_COMMIT)) + 1
            txn.put(RESERVED_COMMIT, U64.pack(number), db=store.meta_db)
        return number, last

    def _write_metadata(self, records: Iterable[bytes]) -> list[PackWriter]:
        """Write a commit's metadata records into packs of their own, then
        seal and sync them; returns those packs (also in the session's).  The
        final commit calls this after every chunk pack is durable, so metadata
        that reached the disk never names chunks that did not."""
        target = self.store.config.pack_target_size
        cipher = self.store.cipher
        if cipher is not None:  # sealed at their offsets, as chunks (chunkstore/recordseal.py)
            from chunkstore.recordseal import seal_record
        tag = 0 if cipher is None else TAG_SIZE
        pack, done = None, []
        try:
            for rec in records:
                if pack is not None and pack.chunk_count and pack.size + len(rec) + tag > target:
                    self._finish_metadata_pack(pack)
                    pack = None
                if pack is None:
                    pack = self._new_pack()
                    pack.metadata = True
                    done.append(pack)
                    with self._mutex:
                        self._packs.append(pack)
                if cipher is None:
                    pack.write_at(pack.reserve(len(rec)), [rec])
                else:
                    offset = pack.reserve(len(rec) + TAG_SIZE)
                    rec = seal_record(cipher, pack.pack_id, offset, rec)
                    pack.write_at(offset, [rec])
                with self._mutex:
                    self.bytes_written += len(rec)
            if pack is not None:
                self._finish_metadata_pack(pack)
        except BaseException as e:
            with self._mutex:
                self._fail(e)
            raise
        return done

    def _finish_metadata_pack(self, pack: PackWriter) -> None:
        pack.seal()
        pack.sync()
        pack.close()
        pack.synced = True
        self.store.backend.publish(pack.pack_id, pack.path)

    def abort(self) -> None:
        """Delete the packs nothing references; checkpointed ones stay for GC."""
        with self._mutex:
            self._closed = True
        if self._sealer is not None:
            self._sealer.stop(discard=True)
        try:
            self.store.backend.discard([p.pack_id for p in self._packs])
        except Exception as e:  # what went out stays for gc (its registration names it)
            logging.getLogger("blockvault.store").warning("could not remove the uploaded packs of an aborted "
                                                          "session: %s", e)
        for pack in self._packs:
            pack.discard()
        self._packs.clear()
        self.pending.clear()
        self._holds.release()


def _sealed_parts(cipher, pack_id: bytes, items: list) -> list:
    """(offset, record) pairs of one pack as the header and sealed payload of each."""
    from chunkstore.recordseal import seal_chunk
    parts = []
    for offset, (digest, codec, raw_len, payload) in items:
        parts.extend(seal_chunk(cipher, pack_id, offset, digest, codec, raw_len, payload))
    return parts
