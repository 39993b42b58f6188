"""Store-wide figures: what is protected, what it costs on disk, and why."""

from __future__ import annotations

from chunkstore.index import IndexEntry
from chunkstore.pack import RECORD_HEADER_SIZE
from chunkstore.verify import pack_totals
from engine.repository import Repository


def store_stats(repo: Repository) -> dict:
    store = repo.store
    backups = disks = logical = logical_nonzero = 0
    names = set()
    unique_raw = stored_payload = chunks = 0
    bad: list = []  # catalog records that do not parse: reported, not counted
    with store.read_txn() as txn:
        for rec in repo.catalog.all(txn, bad=bad):
            backups += 1
            names.add(rec.disk)
            logical += rec.size
            logical_nonzero += min(rec.stats.get("nonzero_chunks", 0) * rec.chunk_size, rec.size)
        with txn.cursor(db=store.chunks_db) as cur:
            for _, value in cur:
                entry = IndexEntry.decode(value)
                chunks += 1
                unique_raw += entry.raw_len
                stored_payload += RECORD_HEADER_SIZE + entry.stored_len
        packs, pack_bytes = pack_totals(store, txn)
        dead = store.refs.dead_bytes(txn) if repo.references.kept else None
    disks = len(names)

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "store": store.location,
        "chunk_size": store.chunk_size,
        "digest": store.config.digest,
        "compression_level": store.config.compression_level,
        "disks": disks,
        "backups": backups,
        "logical_bytes": logical,
        "logical_allocated_bytes": logical_nonzero,
        "chunks": chunks,
        "unique_bytes": unique_raw,
        "stored_bytes": pack_bytes,
        "packs": packs,
        "live_bytes": None if dead is None else pack_bytes - dead,
        "dead_bytes": dead,
        "dedup_ratio": ratio(logical_nonzero, unique_raw),
        "compression_ratio": ratio(unique_raw, stored_payload),
        "reduction_ratio": ratio(logical_nonzero, pack_bytes),
        "bad_records": [b.as_dict() for b in bad],
    }
