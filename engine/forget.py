"""Removing points: ``delete`` (points by id) and ``forget`` (a retention policy).

``delete_points`` is the one way a point leaves the store.  One write
session commits, in one LMDB transaction, the removal of each point's
catalog entry and manifest (and of a VM backup's record together with
every disk backup of it), as metadata records (deletes) of that commit, so
``rebuild`` replays the removals in order with the backups: a point is
gone or whole, never half.  Segments and chunks are not touched here: they
are shared, and only reference counts (``repo.references``, when present)
know when one is no longer used; physical space comes back with gc.

What a removal leaves is still consistent because every manifest is a
synthetic full: a later point whose ``base`` names a removed one restores
from its own manifest, and the next incremental takes the chain's newest
remaining point as its base.  Two things are refused unless asked for:
removing a protected point (``unprotect`` it first), and removing the
newest point of a chain (``--allow-remove-newest``): it holds the changeId
a CBT change list given to the next incremental is relative to.  When the
newest is removed anyway its number is kept used (``next_seq``), so an
id never names two different points.

``forget`` applies engine/retention.py to each group (each disk's chain,
each VM's chain) and removes what the policy does not keep, all groups in
the same transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chunkstore.lock import ChainLocks
from engine import signals
from engine.catalog import CATALOG_DB, NEXT_SEQ_DB, BackupRecord
from engine.errors import BadInputError, NotFoundError, UsageError
from engine.manifest import MANIFESTS_DB
from engine.points import DISK, VM, Point, Points
from engine.retention import Candidate, Decision, Policy, decide
from engine.vsphere.vmcatalog import VM_BACKUPS_DB, VmBackupRecord

log = logging.getLogger("blockvault.forget")


@dataclass
class Removal:
    """What one ``delete_points`` removes (or, in a dry run, would)."""

    points: list[Point] = field(default_factory=list)          # as named: disk and VM points
    disk_backups: list[BackupRecord] = field(default_factory=list)  # every disk backup, a VM's included
    vm_backups: list[VmBackupRecord] = field(default_factory=list)
    freed_bytes: int | None = None                             # None: not known (no reference counts)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.points]


def plan_removal(points: Points, txn, targets: list[Point], allow_remove_newest: bool = False) -> Removal:
    """Check ``targets`` and expand VM backups to their disk backups; refuse
    what may not be removed, naming the point and what to do."""
    removal = Removal()
    named = {p.id: p for p in targets}
    vm_ids = {p.id for p in targets if p.kind == VM}
    disks: dict[str, BackupRecord] = {}
    for p in named.values():
        removal.points.append(p)
        if p.kind == VM:
            removal.vm_backups.append(p.record)
            for rec in points.disk_backups(txn, p.record):
                disks.setdefault(rec.id, rec)
        else:
            owner = points.owner(txn, p.record)
            if owner is not None and owner.id not in vm_ids:
                raise BadInputError(f"{p.id} is a disk backup of VM backup {owner.id}: it is removed with the VM "
                                    f"backup only; delete {owner.id} (with --vm if a disk is called like the VM)")
            disks.setdefault(p.id, p.record)
    removal.disk_backups = list(disks.values())
    for rec in [*removal.vm_backups, *removal.disk_backups]:
        if rec.protected:
            raise BadInputError(f"{rec.id} is protected; 'blockvault unprotect STORE {rec.id}' first if it must go")
    if not allow_remove_newest:
        chains = [(points.vms, r.vm, r) for r in removal.vm_backups]
        chains += [(points.disks, r.disk, r) for r in removal.disk_backups]
        latest_of = _latest_cache(txn)
        for catalog, name, rec in chains:
            latest = latest_of(catalog, name)
            if latest is not None and latest.seq == rec.seq:
                raise BadInputError(f"{rec.id} is the newest point of {name}: the next incremental builds on it "
                                    "(its changeId); give --allow-remove-newest to remove it anyway")
    return removal


def _latest_cache(txn):
    """``catalog.latest`` once per chain: forgetting a long chain asks for each of its points."""
    cache: dict = {}

    def latest(catalog, name: str):
        key = (catalog.name, name)
        if key not in cache:
            cache[key] = catalog.latest(txn, name)
        return cache[key]
    return latest


def _writes(points: Points, txn, removal: Removal) -> list[tuple[bytes, bytes, bytes | None]]:
    writes: list[tuple[bytes, bytes, bytes | None]] = []
    for rec in removal.disk_backups:
        writes += [(CATALOG_DB, rec.key, None), (MANIFESTS_DB, rec.key, None)]
    for rec in removal.vm_backups:
        writes.append((VM_BACKUPS_DB, rec.key, None))
    # A chain whose newest point goes keeps that number used.
    newest: dict[tuple[bytes, str], int] = {}
    latest_of = _latest_cache(txn)
    for catalog, name, seq in ([(points.disks, r.disk, r.seq) for r in removal.disk_backups]
                               + [(points.vms, r.vm, r.seq) for r in removal.vm_backups]):
        latest = latest_of(catalog, name)
        if latest is not None and latest.seq == seq:
            key = (catalog.name, name)
            newest[key] = max(newest.get(key, 0), seq + 1, catalog.reserved_seq(txn, name))
            writes.append(catalog.next_write(name, newest[key]))
    return writes


def freed_bytes(repo, txn, records: list[BackupRecord]) -> int | None:
    """Bytes no kept point shares with ``records`` (reference counts, when the store has them)."""
    refs = getattr(repo, "references", None)
    unique = getattr(refs, "unique_bytes", None)
    if unique is None:
        return None
    manifests = [repo.manifests.get(txn, r.key, r.id, r) for r in records]
    freed = unique(txn, manifests)
    return None if freed is None else int(freed)  # None: a format-2 store, not counted yet


def delete_points(repo, ids, kind: str | None = None, wait: float = 0.0, allow_remove_newest: bool = False,
                  session=None, dry_run: bool = False) -> Removal:
    """Remove the points ``ids`` (``DISK@N`` / ``VM@N`` strings, or Points) in
    one transaction; what was removed.  ``session``: a write session the
    caller holds (forget decides under it), committed here; else one of
    its own.  With ``dry_run`` nothing is written and no lock is taken."""
    points = Points(repo)
    store = repo.store
    if dry_run:
        with store.read_txn() as txn:
            removal = plan_removal(points, txn, _resolve(points, txn, ids, kind), allow_remove_newest)
            removal.freed_bytes = freed_bytes(repo, txn, removal.disk_backups)
        return removal
    own = session is None
    if own:
        session = store.writer(wait=wait, purpose=f"delete of {', '.join(map(str, ids))[:200]}", kind="delete")
    try:
        with store.read_txn() as txn:
            targets = _resolve(points, txn, ids, kind)
            chains = removal_chains(plan_removal(points, txn, targets, allow_remove_newest))
        # The chains it changes are locked for this one transaction: a backup of one of them is
        # waited for (--wait) or named (exit 4), and none starts until the removal is committed.
        with ChainLocks(store.path, chains, wait, session.purpose,
                        session.registration.id if session.registration else None):
            return _remove(repo, points, session, targets, allow_remove_newest)
    finally:
        if own and not session.committed:
            session.abort()


def removal_chains(removal: Removal) -> list[tuple[str, str]]:
    """The backup chains (chunkstore/lock.py) a removal changes: each VM's and each disk's."""
    return sorted({("vm", r.vm) for r in removal.vm_backups} | {("disk", r.disk) for r in removal.disk_backups})


def _remove(repo, points: Points, session, targets: list[Point], allow_remove_newest: bool) -> Removal:
    """Plan again, under the chains' locks, and commit."""
    store = repo.store
    with store.read_txn() as txn:
        removal = plan_removal(points, txn, targets, allow_remove_newest)
        writes = _writes(points, txn, removal)
        # What the removal checks is still there when it commits: the bytes read now.
        keys = {(p.catalog.db, p.record.key) for p in removal.points}
        keys.update((points.disks.db, r.key) for r in removal.disk_backups)
        expected = {(db, key): _raw(txn.get(key, db=db)) for db, key in keys}
    if not removal.points:
        removal.freed_bytes = 0 if getattr(repo, "references", None) is not None else None
        return removal
    if any(name == NEXT_SEQ_DB for name, _, _ in writes):
        handle = store.db(NEXT_SEQ_DB)  # opened (created) before the write transaction
        points.disks.next_db = handle
        if points.vms is not None:
            points.vms.next_db = handle
    refs = getattr(repo, "references", None)
    freed = [0]

    def release(txn):
        # The chain locks make a change in between a bug; a bug must not remove what was not checked.
        for (db, key), value in expected.items():
            now = txn.get(key, db=db)
            if now is None or value is None or bytes(now) != value:
                raise BadInputError(f"a point changed while it was being removed ({key!r}); run the command again")
        freed[0] = 0  # a commit that retries calls this again
        if refs is not None:
            for rec in removal.disk_backups:
                refs.release_manifest(txn, repo.manifests.get(txn, rec.key, rec.id, rec), freed)

    with signals.deferred():  # interrupted after LMDB's commit, the abort would still report a failure
        session.commit(release, metadata=writes)
    # The bytes of the chunks that died in the commit: what unique_bytes would have
    # predicted before it (the dry run's figure), without reading the manifests twice.
    removal.freed_bytes = freed[0] if refs is not None and refs.kept else None
    log.info("removed %s", ", ".join(removal.ids))
    return removal


def _raw(value) -> bytes | None:
    return None if value is None else bytes(value)


def _resolve(points: Points, txn, ids, kind) -> list[Point]:
    out, seen = [], set()
    for ref in ids:
        p = ref if isinstance(ref, Point) else points.resolve(txn, ref, kind)
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    return out


# -- forget ---------------------------------------------------------------------------


@dataclass
class Group:
    kind: str                 # DISK or VM
    name: str
    points: list[Point]
    newest: Point | None      # the chain's newest point (what the next backup builds on)
    decisions: list[Decision] = field(default_factory=list)


def groups(points: Points, txn, disk: str | None = None, vm: str | None = None, bad: list | None = None) -> list[Group]:
    """The groups ``forget`` decides on: each disk chain (its points that are
    not part of a VM backup) and each VM's chain; one of them, or all."""
    from engine.vsphere.vmcatalog import vm_backup_name
    out: list[Group] = []
    if vm is None:
        chains: dict[str, list[BackupRecord]] = {}
        records = points.disks.for_name(txn, disk, bad) if disk else points.disks.all(txn, bad)
        for rec in records:
            chains.setdefault(rec.disk, []).append(rec)
        for name, recs in chains.items():
            own = [r for r in recs if points.owner(txn, r) is None]
            if not own and disk:
                owner = points.owner(txn, recs[-1])
                raise UsageError(f"the points of disk {name} are disk backups of VM {owner.vm}'s backups; "
                                 f"give --vm {owner.vm}")
            if own:
                out.append(Group(DISK, name, [Point(DISK, points.disks, r) for r in own],
                                 Point(DISK, points.disks, recs[-1])))
        if disk and not out:
            raise NotFoundError(f"the store has no backups of disk {disk!r} (see 'blockvault list STORE')")
    if disk is None:
        name = vm_backup_name(vm) if vm else None
        chains_vm: dict[str, list[VmBackupRecord]] = {}
        if points.vms is not None:
            for rec in (points.vms.for_name(txn, name) if name else points.vms.all(txn, bad)):
                chains_vm.setdefault(rec.vm, []).append(rec)
        if vm and not chains_vm:
            raise NotFoundError(f"the store has no backups of VM {vm!r} (see 'blockvault vsphere list STORE')")
        for vname, recs in chains_vm.items():
            out.append(Group(VM, vname, [Point(VM, points.vms, r) for r in recs], Point(VM, points.vms, recs[-1])))
    return out


def _protected(points: Points, txn, p: Point) -> bool:
    """A VM backup counts as protected if one of its disk backups is (protect refuses to set that,
    but a policy must never fail half-way on it)."""
    if p.record.protected:
        return True
    return p.kind == VM and any(r.protected for r in points.disk_backups(txn, p.record))


@dataclass
class ForgetResult:
    groups: list[Group]
    removal: Removal
    dry_run: bool


def forget(repo, policy: Policy, tz, disk: str | None = None, vm: str | None = None, wait: float = 0.0,
           allow_remove_newest: bool = False, dry_run: bool = False) -> ForgetResult:
    """Apply ``policy`` to the chosen groups and remove what it does not keep."""
    if policy.empty:
        decide([], policy, tz)  # raises the usage error
    points = Points(repo)
    store = repo.store
    session = None if dry_run else store.writer(wait=wait, purpose="forget", kind="forget")
    try:
        bad: list = []
        with store.read_txn() as txn:
            found = groups(points, txn, disk, vm, bad)
            removed: list[Point] = []
            for g in found:
                by_id = {p.id: p for p in g.points}
                g.decisions = decide([Candidate(p.id, p.record.time, p.record.seq, _protected(points, txn, p))
                                      for p in g.points], policy, tz,
                                     g.newest.id if g.newest else None, allow_remove_newest)
                removed += [by_id[d.id] for d in g.decisions if not d.keep]
        for b in bad:
            log.warning("%s; not considered (run 'blockvault verify')", b.reason)
        # The policy already kept (or was allowed to drop) each chain's newest.
        if removed:
            removal = delete_points(repo, removed, wait=wait, allow_remove_newest=True, session=session,
                                    dry_run=dry_run)
        else:
            removal = Removal(freed_bytes=0 if getattr(repo, "references", None) is not None else None)
        return ForgetResult(found, removal, dry_run)
    finally:
        if session is not None and not session.committed:
            session.abort()
