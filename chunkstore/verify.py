"""Verify every stored chunk: read, check framing and checksum, decompress, re-hash.

Chunks are checked pack by pack in offset order (sequential reads), with a
thread pool doing the decompress and digest work.  The result lists each
bad chunk by digest with the reason; what a bad chunk means for backups is
the engine's business.  Each pack's header and (when sealed) trailer are
checked too: no chunk read needs them, but ``rebuild-index`` and a human
reading the pack do.  A read error (EIO from a failing disk) is damage like
any other: the records it hides are reported with the pack and offset, and
the check goes on with the rest.
"""

from __future__ import annotations

from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from chunkstore.errors import IntegrityError
from chunkstore.index import IndexEntry, PackInfo
from chunkstore.metadata import metadata_part
from chunkstore.pack import (METADATA_MAGIC, PACK_HEADER, RECORD_HEADER_SIZE, TRAILER_MAGIC, decode_pack_header,
                             decode_record_header, scan_backend_pack, scan_pack)
from chunkstore.backend import pack_id_of
from chunkstore.registry import PathRegistry
from chunkstore.metadata import LAST_COMMIT, RESERVED_COMMIT, meta_number
from chunkstore.store import ChunkStore

SPAN_BYTES = 8 << 20


@dataclass
class ChunkVerifyReport:
    chunks_checked: int = 0
    bytes_checked: int = 0
    corrupt: dict[bytes, str] = field(default_factory=dict)  # digest → reason
    missing_packs: list[str] = field(default_factory=list)
    unreferenced_packs: list[str] = field(default_factory=list)  # left by interrupted writers
    bad_packs: dict[str, str] = field(default_factory=dict)      # pack id hex → what is wrong with its frame
    read_errors: list[dict] = field(default_factory=list)        # {id, offset, length, error}
    metadata_lost: str | None = None  # why the packs hold commits the index never saw

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing_packs and not self.bad_packs and not self.metadata_lost


# Index entries held in memory at once (about 200 bytes each): a store of
# any size is verified in passes of this many chunks, each pass reading its
# chunks pack by pack in offset order.  At 256 KiB chunks one pass covers
# 64 GiB of chunks.
BATCH_ENTRIES = 1 << 18


def index_batches(store: ChunkStore, limit: int = BATCH_ENTRIES):
    """The index in batches of at most ``limit`` entries, each grouped by pack
    and sorted by offset: {pack id: [(entry, digest), ...]}.

    Each batch is read in a read transaction of its own, so a long verify
    does not pin old LMDB pages (which would make a concurrent backup grow
    the file instead of reusing them).  Entries a writer adds meanwhile may or
    may not be seen; none that existed at the start is skipped.
    """
    after: bytes | None = None
    while True:
        groups: dict[bytes, list] = defaultdict(list)
        held = 0
        with store.read_txn() as txn, txn.cursor(db=store.chunks_db) as cur:
            more = cur.set_range(after) if after is not None else cur.first()
            if more and after is not None and cur.key() == after:
                more = cur.next()
            while more:
                key = cur.key()
                entry = IndexEntry.decode(cur.value())
                groups[entry.pack_id].append((entry, key))
                held += 1
                if held >= limit:
                    after = key
                    break
                more = cur.next()
        if groups:
            yield _sorted(groups)
        if not more:
            return


def _sorted(groups: dict[bytes, list]) -> dict[bytes, list]:
    for items in groups.values():
        items.sort(key=lambda it: it[0].offset)
    return groups


def _indexed_bytes(store: ChunkStore, txn) -> int:
    """Record bytes the index points at (the progress total), without keeping entries."""
    total = 0
    with txn.cursor(db=store.chunks_db) as cur:
        for value in cur.iternext(keys=False, values=True):
            total += RECORD_HEADER_SIZE + IndexEntry.decode(value).stored_len
    return total


def verify_chunks(store: ChunkStore, workers: int = 2,
                  on_total: Callable[[int], None] | None = None,
                  on_progress: Callable[[int], None] | None = None,
                  batch_entries: int = BATCH_ENTRIES) -> ChunkVerifyReport:
    report = ChunkVerifyReport()
    missing: set[bytes] = set()
    with store.read_txn() as txn:
        total = _indexed_bytes(store, txn) if on_total else 0
    if on_total:
        on_total(total)
    for groups in index_batches(store, batch_entries):
        _verify_batch(store, groups, workers, report, missing, on_progress)
    with store.read_txn() as txn:
        infos = {bytes(k): PackInfo.decode(v) for k, v in txn.cursor(db=store.packs_db)}
    # A commit's metadata pack holds no indexed chunk, and only it can rebuild that commit.
    backend = store.backend
    missing |= {p for p, info in infos.items() if info.metadata and backend.size(p) is None}
    report.missing_packs = sorted(p.hex() for p in missing)
    for pack_id, info in sorted(infos.items()):
        if pack_id not in missing and backend.size(pack_id) is not None:
            problem = check_pack_frame(store, pack_id, info, report)
            if not problem and info.metadata:
                problem = metadata_pack_problem(store, pack_id)
            if problem:
                report.bad_packs[pack_id.hex()] = problem
    # Packs being written by running sessions are not left-overs.  Listed in
    # this order: a pack file seen is in its session's registration already
    # (chunkstore/registry.py), and a session that ended since has either
    # committed its packs (known to the index read last) or deleted them.
    listed = list(backend.list_named())
    writing = {p for e in PathRegistry(store.path).entries() if e.live for p in e.packs}
    with store.read_txn() as txn:
        known_packs = {bytes(k) for k, _ in txn.cursor(db=store.packs_db)}
        # Replaced by gc and waiting for their last reader (chunkstore/gc.py): not left-overs.
        doomed = {bytes(k) for k, _ in txn.cursor(db=store.refs.doomed_db)}
    for pid, name in listed:
        if pid not in known_packs and pid not in doomed and pid not in writing and backend.present(pid, name):
            report.unreferenced_packs.append(name)
    report.metadata_lost = metadata_lost(store, report.unreferenced_packs)
    return report


def metadata_pack_problem(store: ChunkStore, pack_id: bytes) -> str:
    """What is wrong with a commit's metadata records ("" when nothing).

    No index entry points into a metadata pack, so the chunk checks never
    read it; yet its records are the only copy of that commit outside LMDB,
    the copy ``blockvault rebuild`` needs.  Metadata packs are small: each is
    scanned whole, every record's payload checked.  Such a pack was synced
    before its commit, so a torn tail is damage too, not a crash's leftover."""
    try:
        scan = scan_backend_pack(store.backend, pack_id)
    except (IntegrityError, OSError) as e:
        return f"metadata pack unreadable: {e}"
    if scan.lost:
        start, _, problem, _ = scan.lost[0]
        return (f"metadata record damaged at offset {start} ({problem}); the index still holds the commit, "
                "but a rebuild from the packs would not")
    if scan.torn_at is not None or not scan.sealed:
        return f"metadata pack ends early at offset {scan.torn_at}: {scan.problem or 'no trailer'}"
    if store.cipher is not None:
        return _unsealed_metadata(store, pack_id, scan)
    return ""


def _unsealed_metadata(store: ChunkStore, pack_id: bytes, scan) -> str:
    """The first metadata record of an encrypted store's pack that does not
    authenticate ("" when all do): changed bytes the structure checks cannot
    see, since the payload check is over the sealed bytes."""
    from chunkstore.recordseal import open_record
    for rec in scan.records:
        size = RECORD_HEADER_SIZE + rec.header.stored_len
        where = f"pack {pack_id.hex()} offset {rec.offset}"
        try:
            open_record(store.cipher, store.read_span(pack_id, rec.offset, size), pack_id, rec.offset, where)
        except IntegrityError as e:
            return (f"metadata record damaged at offset {rec.offset} ({e}); the index still holds the commit, "
                    "but a rebuild from the packs would not")
        except OSError as e:
            return f"metadata pack unreadable at offset {rec.offset}: {e}"
    return ""


def check_pack_frame(store: ChunkStore, pack_id: bytes, info: PackInfo, report: ChunkVerifyReport) -> str:
    """What is wrong with a pack's header or trailer ("" when nothing)."""
    where = f"pack {pack_id.hex()}"
    trailer_at = info.size - RECORD_HEADER_SIZE
    at = 0
    try:
        head = store.read_span(pack_id, 0, PACK_HEADER.size)
        header = decode_pack_header(head, where)
        store_id, header_id = header.store_id, header.pack_id
        if store_id != store.store_id:
            return f"{where}: header names store {store_id.hex()}, not this store ({store.store_id.hex()})"
        if header_id != pack_id:
            return f"{where}: header names pack {header_id.hex()}, not the one its file name says"
        if info.sealed and trailer_at >= PACK_HEADER.size:
            at = trailer_at
            tail = decode_record_header(store.read_span(pack_id, trailer_at, RECORD_HEADER_SIZE),
                                        f"{where}: trailer at offset {trailer_at}")
            if tail.magic != TRAILER_MAGIC:
                return f"{where}: no trailer at offset {trailer_at} (the pack is sealed)"
            if tail.raw_len != info.chunk_count:
                return f"{where}: trailer counts {tail.raw_len} records, the index {info.chunk_count}"
    except IntegrityError as e:
        return str(e)
    except OSError as e:
        report.read_errors.append({"id": pack_id.hex(), "offset": at, "length": RECORD_HEADER_SIZE,
                                   "error": e.strerror or str(e)})
        return f"{where}: read error at offset {at}: {e.strerror or e}"
    return ""


def _read_error(pack_id: bytes, offset: int, length: int, e: OSError) -> tuple[dict, str]:
    text = e.strerror or str(e)
    return ({"id": pack_id.hex(), "offset": offset, "length": length, "error": text},
            f"read error in pack {pack_id.hex()} at offset {offset} ({length} bytes): {text}")


def metadata_lost(store: ChunkStore, unreferenced: list[str]) -> str | None:
    """Why the packs hold commits this index never made, or None.

    Every commit reserves its number in the index (``meta``) before any pack
    carries it, so a metadata record numbered above the reservation is a
    commit of an index that was lost, replaced by an older copy or emptied.
    A commit that died before its LMDB commit is below it: no alarm.  Only
    packs the index does not know can hold such records."""
    with store.read_txn() as txn:
        reserved = max(meta_number(txn, store.meta_db, RESERVED_COMMIT), meta_number(txn, store.meta_db, LAST_COMMIT))
    newer: set[int] = set()
    for name in unreferenced:
        try:
            pid = pack_id_of(name)
            with store.backend.open_named(pid, name) as f:
                scan = scan_pack(f, check_payloads=False, pack_id=pid)
        except (IntegrityError, OSError):
            continue
        newer |= {n for n in (metadata_part(r.header).commit for r in scan.records
                              if r.header.magic == METADATA_MAGIC) if n > reserved}
    if not newer:
        return None
    return (f"the packs hold {len(newer)} commit(s) of backups this index does not know (numbers "
            f"{min(newer)}..{max(newer)}; the index knows {reserved}): the index was lost, emptied or replaced "
            f"by an older copy; metadata lost: run 'blockvault rebuild {store.location}'")


def _verify_batch(store: ChunkStore, groups: dict[bytes, list], workers: int, report: ChunkVerifyReport,
                  missing: set[bytes], on_progress: Callable[[int], None] | None) -> None:
    def check_span(pack_id: bytes, items: list[tuple[IndexEntry, bytes]]) -> tuple[int, int, dict, list]:
        start = items[0][0].offset
        end = items[-1][0].offset + RECORD_HEADER_SIZE + items[-1][0].stored_len
        bad: dict[bytes, str] = {}
        errors: list[dict] = []
        try:
            data, base = store.read_span(pack_id, start, end - start), start
        except (IntegrityError, OSError):
            data = None  # read the records one by one: only those a short file or an error hides are lost
        for entry, digest in items:
            at = entry.offset
            if data is None:
                length = RECORD_HEADER_SIZE + entry.stored_len
                try:
                    record, base = store.read_span(pack_id, at, length), at
                except IntegrityError as e:
                    bad[digest] = str(e)
                    continue
                except OSError as e:
                    error, bad[digest] = _read_error(pack_id, at, length, e)
                    errors.append(error)
                    continue
            else:
                record = data
            try:
                store.decode_chunk(record, at - base, entry, digest)
            except IntegrityError as e:
                bad[digest] = str(e)
        return len(items), end - start, bad, errors

    with ThreadPoolExecutor(workers, thread_name_prefix="bv-verify") as pool:
        futures = deque()
        for pack_id, items in groups.items():
            if pack_id not in missing and store.backend.size(pack_id) is None:
                missing.add(pack_id)
            for span in _split(items):
                futures.append(pool.submit(check_span, pack_id, span))
        while futures:
            n, nbytes, bad, errors = futures.popleft().result()
            report.chunks_checked += n
            report.bytes_checked += nbytes
            report.corrupt.update(bad)
            report.read_errors.extend(errors)
            if on_progress:
                on_progress(nbytes)


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
