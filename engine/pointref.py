"""Which disk point a file-level command reads: ``DISK@N``, or ``VM@N`` with ``--disk KEY``.

A VM backup is a group of disk backups (engine/vsphere/vmcatalog.py): its
record lists each disk's device key and the id of that disk's own backup
(``VM/disk-KEY@M``), so reading a VM's disk is reading that disk backup.
Without ``--disk`` an id is first a disk's; when no disk has that name, a VM
of that name with one disk stands for that disk.
"""

from __future__ import annotations

from engine.catalog import BackupRecord
from engine.errors import NotFoundError, UsageError


def _device_key(text: str) -> int:
    key = text[len("disk-"):] if text.startswith("disk-") else text
    if not (key.isascii() and key.isdigit()):
        raise UsageError(f"--disk {text!r}: a VM disk is named by its vSphere device key, e.g. --disk 2000 "
                         "('blockvault vsphere list STORE --json' shows each backup's disks)")
    return int(key)


def _vm_disk(vm_record, key: int | None) -> str:
    disks = vm_record.disks
    keys = ", ".join(str(d["device_key"]) for d in disks) or "none"
    if key is None:
        if len(disks) == 1:
            return disks[0]["backup"]
        raise UsageError(f"VM backup {vm_record.id} has {len(disks)} disks (device keys {keys}): "
                         "choose one with --disk KEY")
    for d in disks:
        if d["device_key"] == key:
            return d["backup"]
    raise NotFoundError(f"VM backup {vm_record.id} has no disk {key}; its disks' device keys are {keys}")


def resolve_point(repo, vms, txn, ref: str, disk: str | None = None) -> BackupRecord:
    """The disk backup ``ref`` names (``vms`` is a VmCatalog opened before ``txn``)."""
    if disk is not None:
        return repo.catalog.resolve(txn, _vm_disk(vms.resolve(txn, ref), _device_key(disk)))
    try:
        return repo.catalog.resolve(txn, ref)
    except NotFoundError as disk_error:
        try:
            vm_record = vms.resolve(txn, ref)
        except (NotFoundError, UsageError):
            raise disk_error from None
        return repo.catalog.resolve(txn, _vm_disk(vm_record, None))
