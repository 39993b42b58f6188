"""VM backups: ``VM@N`` groups the disk backups of one run, with the VM's configuration.

Each disk of a VM keeps its own chain in the ordinary catalog, named
``VM/disk-<deviceKey>`` (so each has its T1..Tn and its changeId); the VM
record ties one run's disk backups together and holds what disaster recovery
needs besides the data: the configuration read from the backup snapshot, the
source VM's identity, and the run's warnings.  The record is written by
``commit_backups(..., more=...)`` in the same LMDB transaction as the disks'
manifests and catalog entries, so a VM backup is visible only when every one
of its disks is.

Records are JSON in LMDB database ``vm_backups``, keyed like the catalog
(VM name, a 0 byte, big-endian sequence number), so a VM's backups sort in
order and its latest is the last key of its range.  docs/FORMAT.md has the
fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

from engine.catalog import NEXT_SEQ_DB, NumberedRecords, catalog_key, split_ref

VM_BACKUPS_DB = b"vm_backups"
_ALLOWED = re.compile(r"[^A-Za-z0-9._:+-]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,149}")  # fullmatch: "$" would let "web01\n" through
MAX_NAME = 150  # leaves room for "/disk-<key>" within the catalog's 200 characters


def vm_backup_name(vm_name: str) -> str:
    """The store's name for a VM: its own when that is a valid catalog name.

    Other names are made valid (disallowed characters, including ``/`` and
    ``@``, become ``_``) and get 8 hex digits of the original's SHA-256, so two
    VMs whose names differ only in such characters never share a chain.  The
    mapping is idempotent: a valid name maps to itself.
    """
    if _NAME.fullmatch(vm_name or ""):
        return vm_name
    cleaned = _ALLOWED.sub("_", vm_name or "")
    if not cleaned[:1].isalnum():
        cleaned = "vm" + cleaned
    tag = hashlib.sha256((vm_name or "").encode()).hexdigest()[:8]
    return f"{cleaned[:MAX_NAME - 9]}+{tag}"


def disk_backup_name(vm_backup: str, device_key: int) -> str:
    return f"{vm_backup}/disk-{device_key}"


@dataclass
class VmBackupRecord:
    vm: str                       # the store's name for the VM (vm_backup_name)
    seq: int
    time: float
    kind: str                     # full, incremental or differential (what was asked)
    base: str | None              # the VM backup this run's changes are relative to
    disks: list[dict]             # one per disk, see docs/FORMAT.md
    config: dict                  # VirtualMachineConfigInfo of the snapshot (vmconfig.py)
    source: dict                  # server, VM name, moref, UUIDs, inventory path, datacenter
    warnings: list[str] = field(default_factory=list)
    snapshot: dict = field(default_factory=dict)
    protected: bool = False       # protect / unprotect (engine/pointflags.py)
    note: str = ""                # note

    @property
    def id(self) -> str:
        return f"{self.vm}@{self.seq}"

    @property
    def key(self) -> bytes:
        return catalog_key(self.vm, self.seq)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data) -> "VmBackupRecord":
        return cls(**json.loads(bytes(data)))

    def summary(self, with_config: bool = False) -> dict:
        doc = asdict(self)
        doc["id"] = self.id
        if not with_config:
            doc.pop("config")
        return doc


def parse_vm_ref(ref: str) -> tuple[str, str]:
    """``web01@3`` -> (store name of web01, "3"); also ``@latest``, ``@-1``, ``@2026-11-30``."""
    name, which = split_ref(ref, "VM backup", "VM")
    return vm_backup_name(name), which


class VmCatalog(NumberedRecords):
    """The ``vm_backups`` database.  Construct it before opening the read
    transaction it is used in: LMDB shows a transaction only the databases
    opened before it began."""

    record_type = VmBackupRecord
    what = "VM backup"
    list_option = "--vm"

    def __init__(self, store):
        super().__init__(store.db(VM_BACKUPS_DB), VM_BACKUPS_DB, store.db_if_exists(NEXT_SEQ_DB))

    def for_vm(self, txn, vm: str) -> Iterator[VmBackupRecord]:
        return self.for_name(txn, vm)

    def resolve(self, txn, ref: str) -> VmBackupRecord:
        vm, which = parse_vm_ref(ref)
        return self._resolve(txn, vm, which, ref, "blockvault vsphere list STORE")
