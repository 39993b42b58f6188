"""Verify every stored chunk: read, check framing and checksum, decompress, re-hash.

Chunks are checked pack by pack in offset order (sequential reads), with a
thread pool doing the decompress and digest work.  The result lists each
bad chunk by digest with the reason; what a bad chunk means for backups is
the engine's business.
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from chunkstore.errors import IntegrityError
from chunkstore.index import IndexEntry, PackInfo
from chunkstore.pack import RECORD_HEADER_SIZE, iter_pack_paths
from chunkstore.store import ChunkStore

SPAN_BYTES = 8 << 20


@dataclass
class ChunkVerifyReport:
    chunks_checked: int = 0
    bytes_checked: int = 0
    corrupt: dict[bytes, str] = field(default_factory=dict)  # digest → reason
    missing_packs: list[str] = field(default_factory=list)
    unreferenced_packs: list[str] = field(default_factory=list)  # left by interrupted writers

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing_packs


def index_by_pack(store: ChunkStore, txn) -> dict[bytes, list[tuple[IndexEntry, bytes]]]:
    groups: dict[bytes, list] = defaultdict(list)
    with txn.cursor(db=store.chunks_db) as cur:
        for key, value in cur:
            entry = IndexEntry.decode(value)
            groups[entry.pack_id].append((entry, bytes(key)))
    for items in groups.values():
        items.sort(key=lambda it: it[0].offset)
    return groups


def verify_chunks(store: ChunkStore, workers: int = 2,
                  on_total: Callable[[int], None] | None = None,
                  on_progress: Callable[[int], None] | None = None) -> ChunkVerifyReport:
    report = ChunkVerifyReport()
    with store.read_txn() as txn:
        groups = index_by_pack(store, txn)
        known_packs = {bytes(k) for k, _ in txn.cursor(db=store.packs_db)}
    if on_total:
        on_total(sum(RECORD_HEADER_SIZE + e.stored_len for items in groups.values() for e, _ in items))

    def check_span(pack_id: bytes, items: list[tuple[IndexEntry, bytes]]) -> tuple[int, int, dict]:
        start = items[0][0].offset
        end = items[-1][0].offset + RECORD_HEADER_SIZE + items[-1][0].stored_len
        bad: dict[bytes, str] = {}
        try:
            data = store.read_span(pack_id, start, end - start)
        except IntegrityError as e:
            data, short = None, str(e)
        for entry, digest in items:
            if data is None:
                bad[digest] = short
                continue
            try:
                store.decode_chunk(data, entry.offset - start, entry, digest)
            except IntegrityError as e:
                bad[digest] = str(e)
        return len(items), end - start, bad

    with ThreadPoolExecutor(workers, thread_name_prefix="bv-verify") as pool:
        futures = deque()
        for pack_id, items in groups.items():
            if not os.path.exists(store.pack_path(pack_id)):
                report.missing_packs.append(pack_id.hex())
            for span in _split(items):
                futures.append(pool.submit(check_span, pack_id, span))
        for fut in futures:
            n, nbytes, bad = fut.result()
            report.chunks_checked += n
            report.bytes_checked += nbytes
            report.corrupt.update(bad)
            if on_progress:
                on_progress(nbytes)
    for path in iter_pack_paths(store.path):
        name = os.path.basename(path)[:-5]
        try:
            pid = bytes.fromhex(name)
        except ValueError:
            continue
        if pid not in known_packs:
            report.unreferenced_packs.append(path)
    return report


def _split(items: list[tuple[IndexEntry, bytes]]) -> list[list[tuple[IndexEntry, bytes]]]:
    """Runs of records that sit next to each other, at most SPAN_BYTES per run."""
    spans, cur, cur_end, cur_len = [], [], -1, 0
    for entry, digest in items:
        rec = RECORD_HEADER_SIZE + entry.stored_len
        if cur and (entry.offset != cur_end or cur_len + rec > SPAN_BYTES):
            spans.append(cur)
            cur, cur_len = [], 0
        cur.append((entry, digest))
        cur_end = entry.offset + rec
        cur_len += rec
    if cur:
        spans.append(cur)
    return spans


def pack_totals(store: ChunkStore, txn) -> tuple[int, int]:
    """(packs, bytes) as the index records them."""
    count = size = 0
    with txn.cursor(db=store.packs_db) as cur:
        for _, value in cur:
            count += 1
            size += PackInfo.decode(value).size
    return count, size
