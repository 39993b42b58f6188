"""Rebuild the whole LMDB environment from the packs alone.

Every pack record says what it is: chunk records recreate the chunk index,
and metadata records (written by every commit after its chunks were durable,
docs/FORMAT.md "Metadata records") recreate the databases of the layer above:
each commit's writes are replayed in commit order.  chunkstore does not read
those writes; they are (database, key, value) triples the engine defines.

Which commits count: each commit names the one that was the store's latest
when it was made, so the committed history is a chain.  A commit whose
metadata reached the packs but whose LMDB commit never happened (a crash in
between) is a sibling of the next commit: it is left out.  Only when it is
the last thing that happened is it counted, and then it is complete (its
chunks were durable before its metadata was written).

A damaged ``data.mdb`` (truncated, not LMDB) is never opened: it is moved
aside and a new one is written.  Runs as the store's writer.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

from chunkstore.codec import Codec
from chunkstore.config import StoreConfig, fsync_dir
from chunkstore.errors import IntegrityError
from chunkstore.index import CHUNKS_DB, IndexEntry, PackInfo
from chunkstore.lock import WriterLock
from chunkstore.metadata import LAST_COMMIT, OP_PUT, OWN_DBS, RESERVED_COMMIT, U64, decode_metadata, metadata_part
from chunkstore.pack import (METADATA_MAGIC, RECORD_HEADER_SIZE, RECORD_MAGIC, check_payload, decode_record_header,
                             scan_pack)
from chunkstore.readonly import refuse_write, store_is_writable
from chunkstore.registry import Registry
from chunkstore.store import DATA_FILE, INDEX_DIR, ChunkStore, _open_env, _record_cipher, index_file_problem


@dataclass
class RebuildReport:
    packs: int = 0
    chunks: int = 0
    duplicates: int = 0
    commits: int = 0                                     # commits replayed
    records: dict = field(default_factory=dict)         # database name → keys it holds after the replay
    left_out: list[str] = field(default_factory=list)   # commits not replayed, and why
    moved_aside: str | None = None                      # where a damaged data.mdb went
    previous_index: str | None = None                   # a copy of the replaced index, kept when incomplete
    torn: list[str] = field(default_factory=list)       # "path@offset: problem"
    unreadable: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)       # "path@start-end: problem": damage, records after it saved
    bad_headers: list[str] = field(default_factory=list)  # "path: problem": its records were read anyway
    # Bad records whose chunk a good record elsewhere holds (a copy a backup
    # stored again after verify marked it): reported, not lost.
    superseded: list[str] = field(default_factory=list)
    derived: str = ""   # what the layer above recomputed (the reference counts)

    @property
    def damaged(self) -> bool:
        """Something could not be saved: the caller must not report plain success."""
        return bool(self.lost or self.bad_headers or self.unreadable)

    @property
    def complete(self) -> bool:
        """Nothing the packs should have held was damaged, missing or unreadable."""
        return not self.damaged and not any(" missing" in x or "incomplete" in x for x in self.left_out)


@dataclass
class _Commit:
    number: int
    follows: int
    time: float
    parts: int
    streams: dict = field(default_factory=dict)   # part index → raw bytes

    @property
    def whole(self) -> bool:
        return len(self.streams) == self.parts


def rebuild_store(path: str, wait: float = 0.0, derive=None, backend=None, s3=None, lease=None,
                  master=None) -> RebuildReport:
    """Recreate ``STORE/index`` from the packs: chunk index, packs, metadata.

    ``derive(store)``, given by the layer above, returns a function
    ``finish(txn, gen_floor)`` run last in the rebuild's transaction: it
    recomputes what the replayed databases imply (the reference counts,
    engine/references.py); ``gen_floor`` is the lifecycle generation the
    rebuilt index must not go below.  ``backend``: where the packs are (default: ``path``'s
    packs/); ``s3`` and ``lease``: a store in a bucket, whose cache ``path`` is (attach).
    An encrypted store needs its ``master`` key: its metadata records are
    opened (authenticated) before they are replayed."""
    cfg = StoreConfig.load(path)
    if cfg.encrypted:  # refused (no key, wrong key) before anything is locked or moved aside
        _record_cipher(cfg, master, path)
    lock = WriterLock(path)
    lock.acquire(wait, "rebuild")
    try:
        report = RebuildReport()
        index = os.path.join(path, INDEX_DIR)
        os.makedirs(index, exist_ok=True)
        if not store_is_writable(index):  # the writer lock alone does not tell (an immutable index)
            raise refuse_write(path)
        data_mdb = os.path.join(index, DATA_FILE)
        if os.path.exists(data_mdb) and index_file_problem(data_mdb):
            report.moved_aside = f"{data_mdb}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            os.rename(data_mdb, report.moved_aside)
            try:  # its reader table belongs to the damaged file
                os.unlink(os.path.join(index, "lock.mdb"))
            except FileNotFoundError:
                pass
            fsync_dir(index)
        store = ChunkStore(path, cfg, _open_env(path, create=True), backend=backend, master=master)
        store.s3, store.lease = s3, lease
        try:
            _rebuild(store, report, derive(store) if derive else None)
        finally:
            store.close()
        return report
    finally:
        lock.release()


def rebuild_index(store: ChunkStore, wait: float = 0.0, derive=None) -> RebuildReport:
    """``rebuild_store`` for a store this process has open (its index intact)."""
    lock = WriterLock(store.path)
    lock.acquire(wait, "rebuild")
    try:
        report = RebuildReport()
        _rebuild(store, report, derive(store) if derive else None)
        return report
    finally:
        lock.release()


def _rebuild(store: ChunkStore, report: RebuildReport, finish=None) -> None:
    entries, packs, commits, copies = _scan(store.backend, store.config, report, store.cipher)
    chain = _chain(commits, report)
    if not report.complete:
        _keep_previous(store, report)
    store.check_owner()
    _replace(store, entries, packs, chain, commits, report, copies, finish)


def _keep_previous(store: ChunkStore, report: RebuildReport) -> None:
    """The packs lack something: the index being replaced may still hold it, so keep a copy."""
    with store.read_txn() as txn:
        if txn.stat(store.meta_db)["entries"] == 0 and txn.stat(store.chunks_db)["entries"] == 0:
            return  # empty: nothing to keep
    stem = os.path.join(store.path, INDEX_DIR, f"before-rebuild-{time.strftime('%Y%m%dT%H%M%S')}")
    where, n = stem, 1
    while os.path.lexists(where):
        n += 1
        where = f"{stem}-{n}"
    os.makedirs(where, mode=0o700)
    store.env.copy(where)
    for name in os.listdir(where):
        os.chmod(os.path.join(where, name), 0o600)
    report.previous_index = where


def _scan(backend, cfg: StoreConfig, report: RebuildReport, cipher=None):
    entries: dict[bytes, IndexEntry] = {}
    packs: dict[bytes, PackInfo] = {}
    commits: dict[int, _Commit] = {}
    copies: dict[bytes, list] = {}   # digest -> the IndexEntry of each of its other good records
    lost: list[tuple[str, bytes | None]] = []
    codec = Codec(cfg.compression_level)
    dlen = 32 if cfg.digest == "sha256" else 16
    for pack_id, scan, stream in _scanned_packs(backend, cfg, report):
        pack_path = backend.name(pack_id)
        with stream:
            report.packs += 1
            if scan.torn_at is not None:
                report.torn.append(f"{pack_path}@{scan.torn_at}: {scan.problem}")
            if scan.header_problem:
                report.bad_headers.append(scan.header_problem)
            lost += [(f"{pack_path}@{start}-{end}: {problem}", digest) for start, end, problem, digest in scan.lost]
            good_end = scan.torn_at if scan.torn_at is not None else scan.size
            metadata = [rec for rec in scan.records if rec.header.magic == METADATA_MAGIC]
            packs[scan.pack_id] = PackInfo(good_end, len(scan.records), scan.sealed, bool(metadata))
            for rec in scan.records:
                h = rec.header
                if h.magic == METADATA_MAGIC:
                    continue
                elif h.magic == RECORD_MAGIC and len(h.digest) == dlen:
                    if h.digest in entries:
                        report.duplicates += 1
                        copies.setdefault(h.digest, []).append(
                            IndexEntry(scan.pack_id, rec.offset, h.stored_len, h.raw_len, h.codec))
                        continue
                    entries[h.digest] = IndexEntry(scan.pack_id, rec.offset, h.stored_len, h.raw_len, h.codec)
            if metadata:
                _read_metadata(stream, pack_path, metadata, codec, commits, report, cipher, scan.pack_id)
    report.chunks = len(entries)
    for text, digest in lost:
        (report.superseded if digest in entries else report.lost).append(text)
    return entries, packs, commits, copies


def _scanned_packs(backend, cfg: StoreConfig, report: RebuildReport):
    """(pack id, its scan, its open stream) of every pack of the store, the unreadable ones reported.

    A remote backend (chunkstore/s3backend.py) fetches several packs at once
    (``prefetch``); a local one reads them in order."""
    def one(pack_id):
        pack_path = backend.name(pack_id)
        stream = None
        try:
            try:
                owner = backend.header(pack_id).store_id.hex()
            except IntegrityError:
                owner = cfg.store_id  # a bad header: scan_pack reports it and reads the records anyway
            if owner != cfg.store_id:
                raise IntegrityError(f"belongs to store {owner}, not to this store ({cfg.store_id})")
            stream = backend.open_stream(pack_id)
            return pack_id, scan_pack(stream, pack_id=pack_id), stream
        except (IntegrityError, OSError) as e:
            if stream is not None:
                stream.close()
            return pack_id, f"{pack_path}: {e}", None

    ids = [pid for pid, _ in backend.list()]
    if not backend.remote:
        ids.sort()
    prefetch = getattr(backend, "prefetch", None)
    results = prefetch(ids, one) if prefetch is not None else map(one, ids)
    for pack_id, scan, stream in results:
        if stream is None:
            report.unreadable.append(scan)
            continue
        yield pack_id, scan, stream


def _read_metadata(f, pack_path: str, records, codec: Codec, commits: dict, report: RebuildReport,
                   cipher=None, pack_id: bytes = b"") -> None:
    """Each metadata record's part of its commit's stream.  A record that does
    not read (or, sealed, does not authenticate) is reported and left out: its
    commit is then incomplete and not replayed."""
    for rec in records:
        where = f"{pack_path}@{rec.offset}"
        try:
            f.seek(rec.offset)
            head = f.read(RECORD_HEADER_SIZE)
            hdr = decode_record_header(head, where)
            payload = f.read(hdr.stored_len)
            check_payload(hdr, payload, where)
            if cipher is not None:
                from chunkstore.recordseal import open_payload
                payload = open_payload(cipher, pack_id, rec.offset, head, payload, where)
            raw = codec.decode(hdr.codec, payload, hdr.raw_len) if payload else b""
        except (IntegrityError, OSError) as e:
            report.unreadable.append(f"{where}: {e}")
            continue
        part = metadata_part(hdr)
        commit = commits.setdefault(part.commit, _Commit(part.commit, part.follows, part.time, part.parts))
        commit.streams[part.part] = raw


def _chain(commits: dict[int, _Commit], report: RebuildReport) -> list[int]:
    """The committed history, oldest first (see the module's docstring)."""
    whole = {n: c for n, c in commits.items() if c.whole}
    for n, c in sorted(commits.items()):
        if not c.whole:
            report.left_out.append(f"commit {n}: incomplete ({len(c.streams)} of {c.parts} metadata records)")
    chain, cur = [], max(whole, default=0)
    while cur:
        chain.append(cur)
        prev = whole[cur].follows
        if prev and prev not in whole:
            if prev not in commits:
                report.left_out.append(f"commit {prev}: its metadata records are missing (a pack lost?)")
            older = [n for n in whole if n < prev]
            prev = max(older, default=0)
        cur = prev
    kept = set(chain)
    for n in sorted(whole):
        if n not in kept:
            report.left_out.append(f"commit {n}: never committed (a crash came before its LMDB commit)")
    report.commits = len(chain)
    return chain[::-1]


def _replace(store: ChunkStore, entries, packs, chain: list[int], commits: dict, report: RebuildReport,
             copies: dict, finish=None) -> None:
    """One transaction: every database emptied and refilled."""
    env = store.env
    handles: dict[bytes, object] = {}

    def db(txn, name: bytes):
        if name not in handles:
            handles[name] = env.open_db(name, txn=txn, create=True)
        return handles[name]

    with env.begin(write=True) as txn:
        # The generation never goes back: a running reader's registration was stamped with it.
        gen_floor = max([store.refs.gen(txn)] + [e.start_gen for e in Registry(store).entries()])
        names = [bytes(k) for k, _ in txn.cursor()]
        for name in names:
            txn.drop(db(txn, name), delete=False)
        for digest, entry in entries.items():
            txn.put(digest, entry.encode(), db=store.chunks_db)
        for pid, info in packs.items():
            txn.put(pid, info.encode(), db=store.packs_db)
        touched: set[bytes] = set()
        for n in chain:
            commit = commits[n]
            stream = b"".join(commit.streams[i] for i in range(commit.parts))
            try:
                writes = decode_metadata(stream, f"metadata of commit {n}")
            except IntegrityError as e:
                report.left_out.append(f"commit {n}: {e}")
                continue
            for op, name, key, value in writes:
                if name == CHUNKS_DB and op == OP_PUT:
                    _keep_copy(txn, store, key, value, entries, copies)
                    continue
                if name in OWN_DBS:
                    report.left_out.append(f"commit {n}: writes chunkstore's database {name.decode()!r}; ignored")
                    continue
                handle = db(txn, name)
                touched.add(name)
                if op == OP_PUT:
                    txn.put(key, value, db=handle)
                else:
                    txn.delete(key, db=handle)
        if chain:
            txn.put(LAST_COMMIT, U64.pack(chain[-1]), db=store.meta_db)
            txn.put(RESERVED_COMMIT, U64.pack(max(commits)), db=store.meta_db)
        if finish is not None:
            report.derived = finish(txn, gen_floor)
        for name in sorted(touched):
            report.records[name.decode()] = txn.stat(db(txn, name))["entries"]


def _keep_copy(txn, store: ChunkStore, digest: bytes, value: bytes, entries: dict, copies: dict) -> None:
    """A commit's record of which copy of a chunk two sessions both stored the
    index kept (chunkstore/session.py, ``_note_kept``): honoured when that
    copy is a good record the scan found; otherwise (its pack reclaimed
    since) the first good copy stays."""
    try:
        kept = IndexEntry.decode(value)
    except struct.error:
        return
    if digest in entries and kept in copies.get(digest, ()):
        txn.put(digest, kept.encode(), db=store.chunks_db)
