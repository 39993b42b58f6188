"""Garbage collection: space back from dead chunks, beside running backups.

gc never walks every chunk: it reads ``dead`` (chunks no segment names) and
``packdead`` (per pack, the bytes gc may reclaim), so its time follows what
was deleted, not the store's size.  It runs as an ordinary writer, in this
order (docs/FORMAT.md "gc order"):

1. **Reap** registrations whose process died (chunkstore/registry.py): the
   packs they created that the index does not know are unlinked; chunks of
   their checkpointed packs that the index holds and nothing references
   become dead (stamped now).  A live session's packs are never touched.
2. **Plan** from ``dead``: a dead chunk stamped D may go only when every
   live registration (but gc's own) started at generation >= D: an older
   session may have deduplicated against it, an older reader may read it.
   A pack whose records are all reclaimable is *deleted*; a pack with dead
   bytes is *repacked* when the store's dead bytes exceed ``max_unused`` of
   its stored bytes, worst share first, up to ``max_repack`` bytes of packs.
3. **Delete**: one transaction removes the dead chunks' entries, the packs'
   entries, and lists the packs in ``doomed`` with the new generation.
4. **Repack**, a batch at a time: the packs to repack are cut into batches
   whose live records fit one pack of the target size; a batch's live records
   are copied (checked) into one new pack, sealed and fsynced once; one
   transaction then switches, for every old pack of the batch, the index
   entries that still point at its records, deletes the reclaimable ones, and
   dooms it.  A chunk revived meanwhile (a
   commit referenced it) keeps the old pack alive: it is not doomed.
5. **Unlink** a doomed pack once no live registration but gc's is older than
   its generation (a reader that began before the switch may still read
   it); otherwise the next gc unlinks it.  A crash anywhere leaves the store
   consistent: new packs before the switch are the dead gc session's, reaped
   next time; doomed packs are unlinked by the next gc.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from chunkstore.errors import IntegrityError
from chunkstore.index import IndexEntry, PackInfo
from chunkstore.pack import (PACK_HEADER, RECORD_HEADER_SIZE, RECORD_MAGIC, PackWriter, check_payload, decode_record_header,
                             scan_backend_pack, scan_pack)
from chunkstore.refs import pack_u64, record_bytes, record_size, u64
from chunkstore.registry import Registry

log = logging.getLogger("blockvault.gc")

DEFAULT_MAX_UNUSED = 0.05
PACK_FRAME = PACK_HEADER.size + RECORD_HEADER_SIZE  # a pack's header and trailer


@dataclass
class PackAction:
    id: str
    size: int          # the pack's bytes
    dead: int          # bytes gc may reclaim in it
    live: int          # bytes of records copied (repack) or 0 (delete)

    def as_dict(self) -> dict:
        return {"id": self.id, "size": self.size, "dead_bytes": self.dead, "live_bytes": self.live}


@dataclass
class GcReport:
    dry_run: bool = False
    stored_before: int = 0
    dead_before: int = 0
    stored_after: int = 0
    dead_after: int = 0
    max_unused_bytes: int = 0
    deleted: list = field(default_factory=list)       # PackAction
    repacked: list = field(default_factory=list)      # PackAction
    new_packs: list = field(default_factory=list)     # pack ids (hex)
    kept: list = field(default_factory=list)          # packs a revived chunk kept (hex)
    chunks_removed: int = 0
    pinned_chunks: int = 0          # dead, but a live registration is older than their death
    unlinked: list = field(default_factory=list)      # pack files removed (hex)
    waiting: list = field(default_factory=list)       # doomed packs a live older reader may still read
    reaped: list = field(default_factory=list)        # registrations of dead processes removed
    leftover_packs: list = field(default_factory=list)  # their packs the index did not know, unlinked
    orphans_killed: int = 0         # their checkpointed chunks nothing referenced, made dead
    skipped: list = field(default_factory=list)       # "pack: why" (a damaged record is not copied)
    locked: list = field(default_factory=list)        # {"id", "until"}: doomed, object lock keeps them until then

    def as_dict(self) -> dict:
        return {"dry_run": self.dry_run, "stored_bytes_before": self.stored_before,
                "dead_bytes_before": self.dead_before, "stored_bytes_after": self.stored_after,
                "dead_bytes_after": self.dead_after, "max_unused_bytes": self.max_unused_bytes,
                "deleted_packs": [a.as_dict() for a in self.deleted],
                "repacked_packs": [a.as_dict() for a in self.repacked], "new_packs": self.new_packs,
                "kept_packs": self.kept, "chunks_removed": self.chunks_removed,
                "pinned_chunks": self.pinned_chunks, "unlinked_packs": self.unlinked,
                "waiting_packs": self.waiting, "reaped_sessions": self.reaped,
                "leftover_packs": self.leftover_packs, "orphans_killed": self.orphans_killed,
                "skipped": self.skipped, "locked_packs": self.locked}


class _Plan:
    def __init__(self):
        self.removable: dict[bytes, list] = defaultdict(list)  # pack → [(digest, entry)]
        self.pinned: dict[bytes, int] = defaultdict(int)
        self.delete: list[bytes] = []
        self.repack: list[bytes] = []
        self.groups: list[list[bytes]] = []  # repack batches: each one's live records fill one new pack
        self.infos: dict[bytes, PackInfo] = {}
        self.dead: dict[bytes, int] = {}


def collect(store, max_unused: float = DEFAULT_MAX_UNUSED, max_repack: int | None = None, dry_run: bool = False,
            wait: float = 0.0, on_total: Callable[[int], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> GcReport:
    """One gc run (see the module's docstring)."""
    report = GcReport(dry_run=dry_run)
    if dry_run:
        reg = Registry(store)
        # The plan of a real run follows its reap: the chunks a killed session
        # checkpointed die first, so their packs are deleted, not repacked.
        orphans, stamp = _preview_reap(store, reg, report)
        plan = _plan(store, reg, _limit(reg.entries(), ""), max_unused, max_repack, report, orphans, stamp)
        _fill_plan_report(store, plan, report)
        return report
    with store.writer(wait=wait, purpose="gc", kind="gc") as session:
        me = session.registration
        reg = Registry(store)
        _reap(store, reg, me.id, report)
        if store.backend.remote:
            _sweep_unknown(store, reg, report)
        plan = _plan(store, reg, _limit(reg.entries(), me.id), max_unused, max_repack, report)
        if on_total:
            on_total(sum(plan.infos[p].size for p in plan.repack))
        _delete(store, plan, report)
        for group in plan.groups:
            _repack(store, plan, group, me, report, on_progress)
        _unlink_doomed(store, reg, me.id, report)
    # (the session commits nothing of its own: leaving the block ends its lock and registration)
    with store.read_txn() as txn:
        report.stored_after = _stored(store, txn)
        report.dead_after = store.refs.dead_bytes(txn)
    return report


def _limit(entries, me: str) -> float:
    """The oldest start generation of a live registration but ours (infinity: none)."""
    gens = [e.start_gen for e in entries if e.live and e.id != me]
    return min(gens) if gens else float("inf")


def _stored(store, txn) -> int:
    with txn.cursor(db=store.packs_db) as cur:
        return sum(PackInfo.decode(v).size for _, v in cur)


# -- 1. reap ------------------------------------------------------------------


def _leftovers(store, reg: Registry, me: str) -> list:
    """What the killed sessions left, read only: [(registration, unknown packs, orphans)].

    Unknown packs: listed by the registration, known neither to ``packs`` nor to
    ``doomed``.  Orphans: (digest, entry) of the chunks its checkpointed packs
    hold that the index points at there, with no count and no ``dead`` entry.
    The dry run plans with these as reap would leave them (_plan)."""
    refs = store.refs
    out = []
    for entry in reg.entries():
        if entry.live or entry.id == me:
            continue
        unknown, orphans = [], []
        with store.read_txn() as txn:
            for pack_id in entry.packs:
                if txn.get(pack_id, db=store.packs_db) is not None:
                    orphans += _orphans(store, txn, pack_id)
                elif txn.get(pack_id, db=refs.doomed_db) is None:
                    unknown.append(pack_id)
        out.append((entry, unknown, orphans))
    return out


def _orphans(store, txn, pack_id: bytes) -> list:
    refs = store.refs
    try:
        scan = scan_backend_pack(store.backend, pack_id, check_payloads=False)
    except (OSError, IntegrityError):
        return []
    out = []
    for rec in scan.records:
        if rec.header.magic != RECORD_MAGIC:
            continue
        d = rec.header.digest
        value = txn.get(d, db=store.chunks_db)
        if value is None:
            continue
        e = IndexEntry.decode(value)
        if (e.pack_id == pack_id and e.offset == rec.offset and not refs.count(txn, d)
                and txn.get(d, db=refs.dead_db) is None):
            out.append((d, e))
    return out


def _reap(store, reg: Registry, me: str, report: GcReport) -> None:
    refs = store.refs
    for entry, unknown, orphans in _leftovers(store, reg, me):
        present = [pack_id for pack_id in unknown if store.backend.size(pack_id) is not None]
        failed = {pid for pid, _ in _remove_packs(store, present)}
        report.leftover_packs += [pid.hex() for pid in present if pid not in failed]
        if orphans:  # checkpointed packs: their unreferenced chunks die now
            with store.env.begin(write=True) as txn:
                for d, e in orphans:
                    if txn.get(d, db=store.chunks_db) == e.encode() and refs.kill_orphan(txn, d, e):
                        report.orphans_killed += 1
        reg.reap(entry)
        report.reaped.append(entry.id)


def _preview_reap(store, reg: Registry, report: GcReport) -> tuple[list, int]:
    """The dry run's reap: what it would remove, and the chunks it would make dead
    with the generation they would be stamped with (the next one)."""
    orphans = []
    for entry, unknown, found in _leftovers(store, reg, ""):
        report.reaped.append(entry.id)
        report.leftover_packs += [p.hex() for p in unknown if store.backend.size(p) is not None]
        orphans += found
    report.orphans_killed = len(orphans)
    with store.read_txn() as txn:
        stamp = store.refs.gen(txn) + 1
    return orphans, stamp


def _sweep_unknown(store, reg: Registry, report: GcReport) -> None:
    """A bucket's pack objects that no index entry, doomed list or running session names:
    uploads of sessions that failed after their PUT (the endpoint died mid-backup) and whose
    abort could not delete them.  Listed first, then the registry, then the index: a pack
    seen here is in its session's registration already (it is written before the pack),
    and a session that ended since has committed it or removed it."""
    listed = [pid for pid, _ in store.backend.list()]
    writing = {p for e in reg.entries() if e.live for p in e.packs}
    with store.read_txn() as txn:
        unknown = [pid for pid in listed if pid not in writing and txn.get(pid, db=store.packs_db) is None
                   and txn.get(pid, db=store.refs.doomed_db) is None]
    if unknown:
        store.check_owner()
        failed = {pid for pid, _ in _remove_packs(store, unknown)}
        report.leftover_packs += [pid.hex() for pid in unknown if pid not in failed]


# -- 2. plan ------------------------------------------------------------------


def _plan(store, reg, limit: float, max_unused: float, max_repack: int | None, report: GcReport,
          orphans: list = (), orphan_stamp: int = 0) -> _Plan:
    """``orphans`` (the dry run's): chunks reap would make dead, stamped ``orphan_stamp``."""
    plan = _Plan()
    refs = store.refs
    with store.read_txn() as txn:
        dead = ((bytes(d), u64(stamp), txn.get(d, db=store.chunks_db)) for d, stamp in txn.cursor(db=refs.dead_db))
        for d, stamp, value in dead:
            if value is None:
                continue
            _removable(plan, report, d, IndexEntry.decode(value), stamp, limit)
        plan.dead = {bytes(k): u64(v) for k, v in txn.cursor(db=refs.packdead_db)}
        for d, e in orphans:
            _removable(plan, report, d, e, orphan_stamp, limit)
            plan.dead[e.pack_id] = plan.dead.get(e.pack_id, 0) + record_size(e)
        for pid in plan.dead:
            value = txn.get(pid, db=store.packs_db)
            if value is not None:
                plan.infos[pid] = PackInfo.decode(value)
        report.stored_before = _stored(store, txn)
        report.dead_before = sum(plan.dead.values())
    report.max_unused_bytes = int(max_unused * report.stored_before)
    unused = report.dead_before
    candidates = []
    for pid, dead in plan.dead.items():
        info = plan.infos.get(pid)
        if info is None or info.metadata or plan.pinned[pid]:
            continue
        live = record_bytes(info) - dead
        if live <= 0:
            plan.delete.append(pid)
            unused -= dead
        else:
            candidates.append((dead / max(record_bytes(info), 1), pid))
    budget = max_repack if max_repack is not None else float("inf")
    for _, pid in sorted(candidates, reverse=True):
        if unused <= report.max_unused_bytes:
            break
        size = plan.infos[pid].size
        if size > budget:
            continue
        budget -= size
        plan.repack.append(pid)
        unused -= plan.dead[pid]
    _batch(plan, store.config.pack_target_size)
    return plan


def _removable(plan: _Plan, report: GcReport, d: bytes, e: IndexEntry, stamp: int, limit: float) -> None:
    if stamp <= limit:
        plan.removable[e.pack_id].append((d, e))
    else:
        plan.pinned[e.pack_id] += 1
        report.pinned_chunks += 1


def _batch(plan: _Plan, target: int) -> None:
    """Cut the packs to repack into batches whose live records fit one new pack.

    Whole packs, in plan order: the dry run predicts the new packs (and so the
    stored bytes after) from each pack's live bytes alone, without reading it."""
    group, fill = [], PACK_HEADER.size
    for pid in plan.repack:
        live = record_bytes(plan.infos[pid]) - plan.dead[pid]
        if group and fill + live > target:
            plan.groups.append(group)
            group, fill = [], PACK_HEADER.size
        group.append(pid)
        fill += live
    if group:
        plan.groups.append(group)


def _fill_plan_report(store, plan: _Plan, report: GcReport) -> None:
    for pid in plan.delete:
        report.deleted.append(PackAction(pid.hex(), plan.infos[pid].size, plan.dead[pid], 0))
        report.chunks_removed += len(plan.removable[pid])
    for pid in plan.repack:
        info = plan.infos[pid]
        report.repacked.append(PackAction(pid.hex(), info.size, plan.dead[pid], record_bytes(info) - plan.dead[pid]))
        report.chunks_removed += len(plan.removable[pid])
    # each batch of repacked packs becomes one new pack of their live records (header and trailer: 192 bytes)
    report.stored_after = (report.stored_before - sum(a.size for a in report.deleted)
                           - sum(a.size - a.live for a in report.repacked) + PACK_FRAME * len(plan.groups))
    report.dead_after = report.dead_before - sum(a.dead for a in report.deleted + report.repacked)


# -- 3. delete ----------------------------------------------------------------


def _still_dead(txn, refs, store, items) -> bool:
    return all(txn.get(d, db=store.chunks_db) == e.encode() and txn.get(d, db=refs.dead_db) is not None
               for d, e in items)


def _delete(store, plan: _Plan, report: GcReport) -> None:
    if not plan.delete:
        return
    refs = store.refs
    with store.env.begin(write=True) as txn:
        gen = None
        for pid in plan.delete:
            items = plan.removable[pid]
            if not _still_dead(txn, refs, store, items):  # revived meanwhile: stays
                report.kept.append(pid.hex())
                continue
            gen = gen or refs.new_gen(txn)
            for d, _ in items:
                txn.delete(d, db=store.chunks_db)
                txn.delete(d, db=refs.dead_db)
            txn.delete(pid, db=store.packs_db)
            txn.delete(pid, db=refs.packdead_db)
            txn.put(pid, pack_u64(gen), db=refs.doomed_db)
            report.deleted.append(PackAction(pid.hex(), plan.infos[pid].size, plan.dead[pid], 0))
            report.chunks_removed += len(items)


# -- 4. repack ----------------------------------------------------------------


def _read_live(store, plan: _Plan, pid: bytes) -> list:
    """The live records of one old pack, read and checked: [(digest, old entry, raw record)].

    A whole pack is read before any of it is written, so a damaged pack is skipped
    without leaving half of it in the batch's new pack.  The records are read
    in a few long reads, of what lies between the dead records the plan knows
    (_read_between_dead); where that finds anything odd, from a scan of the pack."""
    try:
        records = _read_between_dead(store, plan, pid)
    except IntegrityError:
        records = _read_scanned(store, plan, pid)
    if store.cipher is not None:
        records = _opened(store, pid, records)
    return records


def _opened(store, pid: bytes, records: list) -> list:
    """An encrypted store's live records opened where they are (a record that does
    not authenticate spoils its pack, which is skipped as damaged): each is sealed
    again for its place in the new pack (chunkstore/recordseal.py)."""
    from chunkstore.recordseal import open_record
    return [(d, e, open_record(store.cipher, raw, pid, e.offset, f"pack {pid.hex()} offset {e.offset}"))
            for d, e, raw in records]


def _read_between_dead(store, plan: _Plan, pid: bytes) -> list:
    """Records are contiguous from the pack header on; every dead record's place is
    in the plan (its index entry).  What lies between them is read whole, one read
    per gap, and its records parsed in memory: a nightly pack's gaps are its live
    records, where a scan read every record header with a seek of its own (on a
    pack long out of the page cache, one disk wait per record)."""
    info = plan.infos[pid]
    end = PACK_HEADER.size + record_bytes(info)
    drop = {d for d, _ in plan.removable[pid]}
    gaps, pos = [], PACK_HEADER.size
    for offset, size in sorted((e.offset, record_size(e)) for _, e in plan.removable[pid]):
        if offset > pos:
            gaps.append((pos, offset))
        pos = max(pos, offset + size)
    if pos < end:
        gaps.append((pos, end))
    out = []
    with store.read_txn() as txn:
        for start, stop in gaps:
            try:
                buf = store.backend.read(pid, start, stop - start)  # short: IntegrityError
            except OSError as e:
                raise IntegrityError(str(e)) from e
            view, at = memoryview(buf), 0
            while at < len(buf):
                where = f"pack {pid.hex()} offset {start + at}"
                hdr = decode_record_header(view[at:at + RECORD_HEADER_SIZE], where, store.chunk_size, store.tag_size)
                size = RECORD_HEADER_SIZE + hdr.stored_len
                if hdr.magic != RECORD_MAGIC or at + size > len(buf):
                    raise IntegrityError(f"{where}: not a chunk record inside the pack's records")
                value = txn.get(hdr.digest, db=store.chunks_db) if hdr.digest not in drop else None
                if value is not None:
                    e = IndexEntry.decode(value)
                    if e.pack_id == pid and e.offset == start + at:
                        if e.stored_len != hdr.stored_len:
                            raise IntegrityError(f"{where}: record does not match the index")
                        check_payload(hdr, view[at + RECORD_HEADER_SIZE:at + size], where)
                        out.append((hdr.digest, e, view[at:at + size]))  # a view: the gap is held once
                at += size
    return out


def _read_scanned(store, plan: _Plan, pid: bytes) -> list:
    """_read_live from a scan of the pack (which steps over damage)."""
    drop = {d for d, _ in plan.removable[pid]}
    try:
        stream = store.backend.open_stream(pid)
    except OSError as e:  # unreadable (gone, EIO): skipped like a damaged pack, verify reports it
        raise IntegrityError(str(e)) from e
    with stream:
        try:
            scan = scan_pack(stream, check_payloads=False, pack_id=pid)
        except OSError as e:
            raise IntegrityError(str(e)) from e
        wanted = []  # (digest, old entry)
        with store.read_txn() as txn:
            for rec in scan.records:
                h = rec.header
                if h.magic != RECORD_MAGIC or h.digest in drop:
                    continue
                value = txn.get(h.digest, db=store.chunks_db)
                if value is None:
                    continue
                e = IndexEntry.decode(value)
                if e.pack_id == pid and e.offset == rec.offset:
                    wanted.append((h.digest, e))
        out = []
        for d, e in wanted:
            size = record_size(e)
            stream.seek(e.offset)
            raw = stream.read(size)
            where = f"pack {pid.hex()} offset {e.offset}"
            hdr = decode_record_header(raw[:RECORD_HEADER_SIZE], where, store.chunk_size, store.tag_size)
            if hdr.digest != d or hdr.stored_len != e.stored_len or len(raw) != size:
                raise IntegrityError(f"{where}: record does not match the index")
            check_payload(hdr, raw[RECORD_HEADER_SIZE:], where)
            out.append((d, e, raw))
    return out


READ_THREADS = 8
READ_AHEAD = 32 << 20


def _read_batch(store, plan: _Plan, group: list):
    """(pack, its live records or the IntegrityError that spoils it), in batch order.

    The packs are read by a few threads at once: a pack's records are read where
    the index points, and a batch's packs (nightly ones: many, small, long out
    of the page cache) cost one disk wait each when read one after the other."""
    def read(pid):
        try:
            return _read_live(store, plan, pid)
        except IntegrityError as e:
            return e
    if len(group) == 1:
        yield group[0], read(group[0])
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    threads = min(READ_THREADS, len(group))

    def live(pid):
        return record_bytes(plan.infos[pid]) - plan.dead[pid]
    with ThreadPoolExecutor(threads, thread_name_prefix="bv-gc-read") as pool:
        # What was read waits in memory until it is written: at most twice as many
        # packs ahead as there are threads, and about READ_AHEAD bytes of live records.
        ahead, todo, held = deque(), deque(group), 0
        while todo or ahead:
            while todo and (not ahead or (len(ahead) < 2 * threads and held + live(todo[0]) <= READ_AHEAD)):
                pid = todo.popleft()
                held += live(pid)
                ahead.append((pid, pool.submit(read, pid)))
            pid, fut = ahead.popleft()
            records = fut.result()
            held -= live(pid)
            yield pid, records


def _repack(store, plan: _Plan, group: list, me, report: GcReport, on_progress) -> None:
    """Merge the live records of a batch of old packs into new packs and switch them at once.

    One writer takes the records of every pack of the batch (a batch was planned to
    fit one pack of the target size), so many small packs become one; it is sealed
    and fsynced once, and one transaction (one generation) switches the index and
    dooms every old pack of the batch.  Per-pack transactions cost an fsync round
    each, which dominated gc's wall time on stores of many small nightly packs."""
    refs = store.refs
    copies: dict[bytes, list] = {}  # old pack → [(digest, old entry, new entry)]
    writers: list[PackWriter] = []
    target = store.config.pack_target_size
    if store.cipher is not None:
        from chunkstore.recordseal import seal_opened
    try:
        out = None
        for pid, records in _read_batch(store, plan, group):
            if isinstance(records, IntegrityError):  # never copy (nor drop) a damaged pack: verify reports it
                report.skipped.append(f"{pid.hex()}: {records}")
                continue
            mine = copies[pid] = []
            for d, e, raw in records:
                size = record_size(e)
                if out is not None and out.chunk_count and out.size + size > target:
                    _finish(out)
                    out = None
                if out is None:
                    out = PackWriter(store.path, store.config, me.add_pack)
                    writers.append(out)
                offset = out.reserve(size)
                if store.cipher is not None:  # opened by _read_live: sealed for its new place
                    raw = seal_opened(store.cipher, raw[0], raw[1], out.pack_id, offset)
                out.write_at(offset, [raw])
                mine.append((d, e, IndexEntry(out.pack_id, offset, e.stored_len, e.raw_len, e.codec)))
        if out is not None:
            _finish(out)
    except OSError as e:  # ENOSPC, EIO: the new packs go, the store stays as it was
        for w in writers:
            w.discard()
        names = ", ".join(p.hex() for p in group)
        raise OSError(e.errno, f"{e.strerror} while gc copied the live records of pack(s) {names} into a new "
                               "pack; gc changed nothing of those packs (the new pack was removed)", e.filename) from e
    except BaseException:
        for w in writers:  # interrupted: likewise
            w.discard()
        raise
    if not copies:
        return
    # The new packs are durable where the packs live before the index points at them.
    try:
        for w in writers:
            store.backend.publish(w.pack_id, w.path)
        store.backend.wait_published([w.pack_id for w in writers])
        store.check_owner()
    except BaseException:
        store.backend.discard([w.pack_id for w in writers])
        for w in writers:
            w.discard()
        raise
    with store.env.begin(write=True) as txn:
        gen = refs.new_gen(txn)
        for w in writers:
            txn.put(w.pack_id, PackInfo(w.size, w.chunk_count, True).encode(), db=store.packs_db)
        for pid, mine in copies.items():
            drop = plan.removable[pid]
            switched = 0
            for d, old, new in mine:
                if txn.get(d, db=store.chunks_db) == old.encode():
                    txn.put(d, new.encode(), db=store.chunks_db)
                    if txn.get(d, db=refs.dead_db) is not None:
                        # Died since it was read: dead bytes where it is now; its death counted the old record.
                        refs.garbage(txn, new)
                    else:
                        switched += record_size(old)
                else:  # moved meanwhile (stored again): this copy is garbage
                    refs.garbage(txn, new)
            if _still_dead(txn, refs, store, drop):
                for d, _ in drop:
                    txn.delete(d, db=store.chunks_db)
                    txn.delete(d, db=refs.dead_db)
                txn.delete(pid, db=store.packs_db)
                txn.delete(pid, db=refs.packdead_db)
                txn.put(pid, pack_u64(gen), db=refs.doomed_db)
                report.chunks_removed += len(drop)
            else:  # a chunk it held was revived: the pack stays, what was copied out of it is dead there
                refs._dead_bytes_add(txn, pid, switched)
                report.kept.append(pid.hex())
    for pid, mine in copies.items():
        info = plan.infos[pid]
        if mine or pid.hex() in report.kept:
            report.repacked.append(PackAction(pid.hex(), info.size, plan.dead[pid], sum(record_size(e) for _, e, _ in mine)))
        else:  # every live record it had died or moved since the plan: nothing was copied, it was deleted
            report.deleted.append(PackAction(pid.hex(), info.size, plan.dead[pid], 0))
        if on_progress:
            on_progress(info.size)
    report.new_packs += [w.pack_id.hex() for w in writers]


def _remove_packs(store, pack_ids: list, locked: dict | None = None) -> list:
    """Remove packs through the store's backend; what it refused stays doomed, for the next gc.
    A pack that object lock still protects is not even tried (``locked``: pack → until)."""
    locked = store.backend.locks(pack_ids) if locked is None else locked
    failed = store.backend.delete([pid for pid in pack_ids if pid not in locked])
    for pid, why in failed:
        log.warning("gc: pack %s of %s was not deleted (%s); the next gc tries again", pid.hex(), store.location, why)
    if locked:
        log.info("gc: %d pack(s) of %s are under object lock until %s at the latest; a gc after then deletes "
                 "them", len(locked), store.location, _utc(max(locked.values())))
    return failed + [(pid, f"locked until {_utc(locked[pid])}") for pid in pack_ids if pid in locked]


def _utc(t: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finish(pack: PackWriter) -> None:
    pack.seal()
    pack.sync()
    pack.close()
    pack.synced = True


# -- 5. unlink ----------------------------------------------------------------


def _unlink_doomed(store, reg: Registry, me: str, report: GcReport) -> None:
    refs = store.refs
    limit = _limit(reg.entries(), me)
    with store.read_txn() as txn:
        doomed = [(bytes(k), u64(v)) for k, v in txn.cursor(db=refs.doomed_db)]
    ready = []
    for pid, gen in doomed:
        if gen > limit:
            report.waiting.append(pid.hex())
            continue
        ready.append(pid)
    if ready:
        store.check_owner()  # never delete for a store whose lease another host took over
    locked = store.backend.locks(ready)
    report.locked += [{"id": pid.hex(), "until": round(until, 3), "until_utc": _utc(until)}
                      for pid, until in sorted(locked.items(), key=lambda kv: kv[1])]
    failed = {pid for pid, _ in _remove_packs(store, ready, locked)}
    ready = [pid for pid in ready if pid not in failed]
    report.unlinked += [pid.hex() for pid in ready]
    if ready:
        with store.env.begin(write=True) as txn:
            for pid in ready:
                txn.delete(pid, db=refs.doomed_db)
