"""What ``blockvault copy`` copies, and under which ids in the destination.

The selection (ids, ``--disk``, ``--vm``, ``--all``) is resolved in SRC; a
VM backup takes its disk backups along, and a disk backup that belongs to a
VM backup is refused alone (as ``delete`` refuses it): copied without its VM
record it would lose the configuration disaster recovery needs.

Numbering in DST.  A copied point keeps its number N when N is free, that is
when it is at least the DST chain's next number (``next_seq``: above the
newest point and above every deleted one); otherwise it becomes the chain's
next number.  Its time never changes, and a chain's points are in time
order, so a point older than the DST chain's newest point cannot be
appended: asked for by id it is refused, picked by ``--disk``/``--vm``/
``--all`` it is skipped with that reason (a point DST's own retention
removed is not copied back every night).

Already there.  Every copied record carries its origin, ``copied_from``
(``{"store_id", "id"}``; a disk backup's in ``metadata``, a VM backup's in
``source``, where older readers see one more key of a free-form object).  A
SRC point that DST holds as a copy (same SRC store id and id) is skipped, so
a second run copies only the new points; so is a SRC point that is itself a
copy of a point DST still holds (copying back).  The origin's ids also map
``base`` and a VM backup's disk ids to DST's numbers.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field

from engine.catalog import BackupRecord
from engine.errors import BadInputError, NotFoundError
from engine.points import DISK, VM, Points
from engine.vsphere.vmcatalog import VmBackupRecord, vm_backup_name

COPIED_FROM = "copied_from"


def origin_of(record) -> dict | None:
    """The ``copied_from`` document of a record, or None."""
    holder = record.metadata if isinstance(record, BackupRecord) else record.source
    found = (holder or {}).get(COPIED_FROM)
    ok = isinstance(found, dict) and isinstance(found.get("store_id"), str) and isinstance(found.get("id"), str)
    return found if ok else None


@dataclass
class PlannedPoint:
    """One SRC point to copy: its DST record(s), ready to commit."""

    kind: str                                   # DISK or VM
    src: BackupRecord | VmBackupRecord
    dst: BackupRecord | VmBackupRecord
    disks: list[tuple[BackupRecord, BackupRecord]] = field(default_factory=list)  # (src, dst) disk backups

    @property
    def pairs(self) -> list[tuple[BackupRecord, BackupRecord]]:
        return self.disks if self.kind == VM else [(self.src, self.dst)]


@dataclass
class Skipped:
    id: str
    reason: str
    existing: str | None = None   # the DST point that already holds it

    def as_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason, "existing": self.existing}


@dataclass
class CopyPlan:
    points: list[PlannedPoint]
    skipped: list[Skipped]
    id_map: dict[str, str]                      # SRC id -> DST id, of every point both hold

    @property
    def chains(self) -> list[tuple[str, str]]:
        """The DST chain locks the copy needs."""
        out = set()
        for p in self.points:
            if p.kind == VM:
                out.add(("vm", p.dst.vm))
            out.update(("disk", d.disk) for _, d in p.pairs)
        return sorted(out)


def select(src_points: Points, txn, ids: list[str], disk: str | None, vm: str | None, everything: bool):
    """The SRC points asked for, as (kind, record, explicit) in chain order."""
    chosen = []
    if ids:
        for ref in ids:
            point = src_points.resolve(txn, ref)
            if point.kind == DISK:
                owner = src_points.owner(txn, point.record)
                if owner is not None:
                    raise BadInputError(f"{point.id} is a disk of VM backup {owner.id}; copy {owner.id} (its "
                                        "configuration and every disk go together)")
            chosen.append((point.kind, point.record, True))
    elif disk is not None:
        recs = [r for r in src_points.disks.for_disk(txn, disk) if src_points.owner(txn, r) is None]
        if not recs:
            raise NotFoundError(f"SRC has no backups of disk {disk!r} (outside VM backups); "
                                "see 'blockvault list SRC'")
        chosen = [(DISK, r, False) for r in recs]
    elif vm is not None:
        recs = list(src_points.vms.for_vm(txn, vm_backup_name(vm))) if src_points.vms is not None else []
        if not recs:
            raise NotFoundError(f"SRC has no backups of VM {vm!r}; see 'blockvault vsphere list SRC'")
        chosen = [(VM, r, False) for r in recs]
    elif everything:
        chosen = [(VM, r, False) for r in src_points.all_vms(txn)]
        chosen += [(DISK, r, False) for r in src_points.disks.all(txn) if src_points.owner(txn, r) is None]
    seen, out = set(), []
    for kind, rec, explicit in sorted(chosen, key=lambda c: (c[0], c[1].key)):
        if (kind, rec.id) not in seen:
            seen.add((kind, rec.id))
            out.append((kind, rec, explicit))
    return out


class _Chains:
    """DST's chains as the plan grows them: next number and newest time."""

    def __init__(self, catalog, txn):
        self.catalog, self.txn = catalog, txn
        self.state: dict[str, tuple[int, float | None, str | None]] = {}

    def get(self, name: str) -> tuple[int, float | None, str | None]:
        if name not in self.state:
            latest = self.catalog.latest(self.txn, name) if self.catalog is not None else None
            nxt = self.catalog.next_seq(self.txn, name) if self.catalog is not None else 1
            self.state[name] = (nxt, latest.time if latest else None, latest.id if latest else None)
        return self.state[name]

    def place(self, name: str, rec) -> int | str:
        """The DST number of ``rec`` in chain ``name``, or why it cannot go there."""
        nxt, newest, newest_id = self.get(name)
        if newest is not None and rec.time < newest:
            return f"older than DST's newest point of {name}, {newest_id}"
        return rec.seq if rec.seq >= nxt else nxt

    def take(self, name: str, seq: int, rec, ident: str) -> None:
        self.state[name] = (seq + 1, rec.time, ident)


def _copied(dst_points: Points, txn) -> tuple[dict[tuple[str, str], str], set[str]]:
    """(SRC store id, SRC id) -> DST id of every copy DST holds; and DST's own ids."""
    held, own = {}, set()
    records = list(dst_points.disks.all(txn)) + dst_points.all_vms(txn)
    for rec in records:
        own.add(rec.id)
        origin = origin_of(rec)
        if origin is not None:
            held[(origin["store_id"], origin["id"])] = rec.id
    return held, own


def make_plan(src_points: Points, src_txn, src_id: str, dst_points: Points, dst_txn, dst_id: str,
              chosen) -> CopyPlan:
    held, own = _copied(dst_points, dst_txn)
    disks, vms = _Chains(dst_points.disks, dst_txn), _Chains(dst_points.vms, dst_txn)
    id_map = {src: dst for (store, src), dst in held.items() if store == src_id}
    points, skipped = [], []

    def existing(rec) -> str | None:
        got = held.get((src_id, rec.id))
        origin = origin_of(rec)
        if got is None and origin is not None and origin["store_id"] == dst_id and origin["id"] in own:
            got = origin["id"]  # SRC's copy of a point DST still holds
        return got

    for kind, rec, explicit in chosen:
        there = existing(rec)
        if there is not None:
            skipped.append(Skipped(rec.id, "already in DST", there))
            id_map[rec.id] = there
            continue
        members = src_points.disk_backups(src_txn, rec) if kind == VM else [rec]
        where = [(d, disks.place(d.disk, d)) for d in members]
        if kind == VM:
            where.insert(0, (rec, vms.place(rec.vm, rec)))
        refused = [(r, w) for r, w in where if isinstance(w, str)]
        if refused:
            why = "; ".join(f"{r.id}: {w}" for r, w in refused)
            if explicit:
                raise BadInputError(f"{rec.id} cannot be copied: {why} (a chain's points are in time order); "
                                    "copy it into another store")
            skipped.append(Skipped(rec.id, why))
            continue
        pairs = []
        for d, seq in where:
            if isinstance(d, BackupRecord):
                new = _copy.deepcopy(d)
                new.seq = seq
                pairs.append((d, new))
                id_map[d.id] = new.id
                disks.take(d.disk, seq, d, new.id)
        if kind == VM:
            dst = _copy.deepcopy(rec)
            dst.seq = where[0][1]
            id_map[rec.id] = dst.id
            vms.take(rec.vm, dst.seq, rec, dst.id)
            points.append(PlannedPoint(VM, rec, dst, pairs))
        else:
            points.append(PlannedPoint(DISK, rec, pairs[0][1]))
    for p in points:
        _rewrite(p, src_id, id_map)
    return CopyPlan(points, skipped, id_map)


def _rewrite(p: PlannedPoint, src_id: str, id_map: dict[str, str]) -> None:
    """Ids in the DST records mapped to DST's numbers; origin recorded; protection dropped
    (it belongs to the retention of the store that set it)."""
    for src, dst in p.pairs:
        dst.base = id_map.get(src.base) if src.base else None
        dst.protected = False
        dst.metadata = dict(dst.metadata or {})
        dst.metadata[COPIED_FROM] = {"store_id": src_id, "id": src.id}
        if p.kind == VM:
            dst.metadata["vm_backup"] = p.dst.id
    if p.kind == VM:
        vm = p.dst
        vm.base = id_map.get(p.src.base) if p.src.base else None
        vm.protected = False
        vm.source = dict(vm.source or {})
        vm.source[COPIED_FROM] = {"store_id": src_id, "id": p.src.id}
        for entry in vm.disks:
            if isinstance(entry.get("backup"), str) and entry["backup"] in id_map:
                entry["backup"] = id_map[entry["backup"]]
