"""Points by id, whichever catalog holds them: ``DISK@N`` or ``VM@N``.

``protect``, ``note``, ``delete`` and ``forget`` take ids of both kinds of
point.  Disk backups live in the catalog (engine/catalog.py), VM backups
in ``vm_backups`` (engine/vsphere/vmcatalog.py); a disk and a VM may share a
name, and then the id alone does not say which is meant: the caller must
(``--vm`` / ``--disk``), nothing is guessed.

A disk backup made by a VM backup (its ``metadata.vm_backup``) is part of
that VM backup: retention treats the VM backup as the point, and the disk
backup goes with it.  ``owner`` tells which VM backup a disk backup belongs
to, if any.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.catalog import MAX_SEQ, BackupRecord, NumberedRecords, parse_ref
from engine.errors import NotFoundError, UsageError
from engine.vsphere.vmcatalog import VM_BACKUPS_DB, VmBackupRecord, VmCatalog, parse_vm_ref

DISK, VM = "disk", "vm"


@dataclass
class Point:
    """A point and the catalog that holds it."""

    kind: str                               # DISK or VM
    catalog: NumberedRecords
    record: BackupRecord | VmBackupRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.disk if self.kind == DISK else self.record.vm


class Points:
    """Both catalogs of a repository.  Construct it before the read
    transaction it is used in (VmCatalog opens its database)."""

    def __init__(self, repo):
        self.repo = repo
        self.disks = repo.catalog
        # None in a store that never held a VM backup: not created by looking.
        self.vms = VmCatalog(repo.store) if repo.store.db_if_exists(VM_BACKUPS_DB) is not None else None

    def _exists(self, txn, catalog: NumberedRecords | None, name: str) -> bool:
        return catalog is not None and next(iter(catalog.for_name(txn, name)), None) is not None

    def all_vms(self, txn) -> list[VmBackupRecord]:
        return list(self.vms.all(txn)) if self.vms is not None else []

    def vm_names(self, txn) -> list[str]:
        return sorted({r.vm for r in self.all_vms(txn)})

    def resolve(self, txn, ref: str, kind: str | None = None) -> Point:
        """The point ``ref`` names.  ``kind`` (DISK, VM or None: either) says
        which catalog; a name both have is refused without it."""
        disk = vm = None
        errors = []
        if kind in (None, DISK):
            try:
                disk = parse_ref(ref)
            except UsageError as e:
                errors.append(e)
        if kind in (None, VM):
            try:
                vm = parse_vm_ref(ref)
            except UsageError as e:
                errors.append(e)
        if disk is None and vm is None:
            raise errors[0]
        has_disk = disk is not None and self._exists(txn, self.disks, disk[0])
        has_vm = vm is not None and self._exists(txn, self.vms, vm[0])
        if has_disk and has_vm:
            raise UsageError(f"{ref!r}: both a disk and a VM are called {disk[0]!r}; say which with --disk or --vm")
        if has_vm:
            return Point(VM, self.vms, self.vms.resolve(txn, ref))
        if has_disk or kind == DISK:
            return Point(DISK, self.disks, self.disks.resolve(txn, ref))
        if kind == VM:
            if self.vms is None:
                raise NotFoundError(f"no VM backup {ref}: the store holds no VM backups")
            return Point(VM, self.vms, self.vms.resolve(txn, ref))
        name = (disk or vm)[0]
        raise NotFoundError(f"no backup {ref}: the store has no disk and no VM called {name!r} "
                            "(see 'blockvault list STORE' and 'blockvault vsphere list STORE')")

    def owner(self, txn, record: BackupRecord) -> VmBackupRecord | None:
        """The VM backup ``record`` (a disk backup) is part of, if that VM backup exists."""
        ref = (record.metadata or {}).get("vm_backup")
        if not isinstance(ref, str) or "@" not in ref:
            return None
        name, _, seq = ref.rpartition("@")
        if self.vms is None or not (seq.isascii() and seq.isdigit() and int(seq) <= MAX_SEQ):
            return None
        vm = self.vms.get(txn, name, int(seq))
        if vm is None or not any(d.get("backup") == record.id for d in vm.disks):
            return None
        return vm

    def disk_backups(self, txn, vm: VmBackupRecord) -> list[BackupRecord]:
        """The disk backups of VM backup ``vm`` that the catalog holds."""
        out = []
        for d in vm.disks:
            ref = d.get("backup")
            if not isinstance(ref, str) or "@" not in ref:
                continue
            name, _, seq = ref.rpartition("@")
            ok = seq.isascii() and seq.isdigit() and int(seq) <= MAX_SEQ
            rec = self.disks.get(txn, name, int(seq)) if ok else None
            if rec is not None:
                out.append(rec)
        return out
