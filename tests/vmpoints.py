"""VM backups without a vCenter: what engine/vsphere/backup.py commits, made
from image files by the same calls (backup_disk, commit_backups with the
VM record in ``more``), for the lifecycle tests of VM@N points."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from engine.backup import backup_disk, commit_backups
from engine.repository import Repository
from engine.sources import opened_source
from engine.vsphere.vmcatalog import VmBackupRecord, VmCatalog, disk_backup_name


def vm_backup(store: str, vm: str, images: dict[int, str], at: float, mode: str = "full",
              config: dict | None = None, change_ids: dict[int, str] | None = None) -> str:
    """Back up ``images`` (device key -> image path) as the next VM@N at unix time ``at``; its id.
    ``config`` is the VM record's configuration, ``change_ids`` each disk's changeId (default none)."""
    with Repository.open(store) as repo:
        vms = VmCatalog(repo.store)
        with repo.store.writer(purpose=f"test VM backup of {vm}") as session, \
                ThreadPoolExecutor(2) as pool:
            with repo.store.read_txn() as txn:
                seq = vms.next_seq(txn, vm)
                prev = vms.latest(txn, vm)
            backup_id = f"{vm}@{seq}"
            prepared, docs = [], []
            for key, path in sorted(images.items()):
                change_id = (change_ids or {}).get(key)
                with opened_source(path) as disk:
                    p = backup_disk(repo, session, pool, 2, disk, disk_backup_name(vm, key), mode, change_id=change_id,
                                    metadata={"source": {"kind": "vsphere", "vm": vm, "device_key": key},
                                              "vm_backup": backup_id}, at=at)
                prepared.append(p)
                docs.append({"device_key": key, "label": f"Hard disk {key}", "backup": p.record.id,
                             "kind": p.record.kind, "capacity": p.record.size, "file": path, "change_id": change_id,
                             "transport": "test", "bytes_read": p.record.stats["bytes_read"],
                             "new_chunks": p.record.stats["new_chunks"],
                             "stored_bytes": p.record.stats["stored_bytes"], "warnings": [], "read": "allocated"})
            record = VmBackupRecord(vm=vm, seq=seq, time=at, kind=mode,
                                    base=prev.id if prev and mode != "full" else None, disks=docs,
                                    config=config or {}, source={"server": "test:443", "vm": vm, "moref": "vm-1"},
                                    snapshot={"name": "blockvault-backup", "moref": "snapshot-1", "removed": True})
            commit_backups(repo, session, prepared, more=[(vms, record)])
    return backup_id
