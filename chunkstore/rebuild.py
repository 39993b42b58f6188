"""Rebuild the chunk index from the packs alone.

The index is a cache of what the packs' record headers already say, so
losing or damaging it loses nothing: scan every pack (checking each record's
header and payload checksums), stop at a torn tail, and write the entries in
one transaction that replaces the old index.  Runs as the store's writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chunkstore.errors import IntegrityError
from chunkstore.index import IndexEntry, PackInfo
from chunkstore.pack import RECORD_MAGIC, iter_pack_paths, scan_pack
from chunkstore.store import ChunkStore


@dataclass
class RebuildReport:
    packs: int = 0
    chunks: int = 0
    duplicates: int = 0
    torn: list[str] = field(default_factory=list)       # "path@offset: problem"
    unreadable: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)       # "path@start-end: problem": damage, records after it saved
    bad_headers: list[str] = field(default_factory=list)  # "path: problem": its records were read anyway
    # Bad records whose chunk a good record elsewhere holds (a copy a backup
    # stored again after verify marked it): reported, not lost.
    superseded: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        """Something could not be saved: the caller must not report plain success."""
        return bool(self.lost or self.bad_headers or self.unreadable)


def rebuild_index(store: ChunkStore, wait: float = 0.0) -> RebuildReport:
    report = RebuildReport()
    entries: dict[bytes, IndexEntry] = {}
    packs: dict[bytes, PackInfo] = {}
    lost: list[tuple[str, bytes | None]] = []
    session = store.writer(wait=wait, purpose="rebuild-index")
    try:
        for path in iter_pack_paths(store.path):
            try:
                scan = scan_pack(path)
            except (IntegrityError, OSError) as e:
                report.unreadable.append(f"{path}: {e}")
                continue
            report.packs += 1
            if scan.torn_at is not None:
                report.torn.append(f"{path}@{scan.torn_at}: {scan.problem}")
            if scan.header_problem:
                report.bad_headers.append(scan.header_problem)
            lost += [(f"{path}@{start}-{end}: {problem}", digest) for start, end, problem, digest in scan.lost]
            good_end = scan.torn_at if scan.torn_at is not None else scan.size
            packs[scan.pack_id] = PackInfo(good_end, len(scan.records), scan.sealed)
            for rec in scan.records:
                h = rec.header
                if h.magic != RECORD_MAGIC or len(h.digest) != store.digester.size:
                    continue
                if h.digest in entries:
                    report.duplicates += 1
                    continue
                entries[h.digest] = IndexEntry(scan.pack_id, rec.offset, h.stored_len, h.raw_len, h.codec)
        report.chunks = len(entries)
        for text, digest in lost:
            (report.superseded if digest in entries else report.lost).append(text)

        def replace(txn):
            txn.drop(store.chunks_db, delete=False)
            txn.drop(store.packs_db, delete=False)
            for digest, entry in entries.items():
                txn.put(digest, entry.encode(), db=store.chunks_db)
            for pid, info in packs.items():
                txn.put(pid, info.encode(), db=store.packs_db)

        session.commit(replace)
    finally:
        if not session.committed:
            session.abort()
    return report
