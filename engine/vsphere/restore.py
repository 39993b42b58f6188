"""Disaster recovery: a new VM from a saved configuration, its disks from one manifest each.

``restore_vm`` creates the VM with ``CreateVM_Task`` from the configuration
kept in the VM record (configspec.py turns it into a spec with new
identities), checks that the new VM's disks match the backup, and writes each
disk from the one manifest of its disk backup (a synthetic full: never a
chain).  The new VM has no snapshot, so what is written is its base disks,
never a redo log.  It is left powered off.

Writing a disk:

* **VDDK** (real vSphere): the new disk is opened read-write through VDDK and
  the restore machinery of engine/restore.py writes the non-zero chunks into
  it directly (a new disk reads as zeros, so zero chunks are skipped).
* **Datastore HTTP** (vcsim, or vSphere without VDDK): HTTP can only replace a
  whole file, so the disk is first restored into a sparse temporary file
  (holes for zero chunks: it costs the disk's data, not its capacity) and
  that file is streamed up as the new disk's ``-flat.vmdk``.  Memory use is
  bounded either way.

A failure after the VM was created destroys that half-restored VM (a VM with
some disks written and others empty must not be mistaken for a good copy)
and says so.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from chunkstore import StoreError
from engine.repository import Repository
from engine.restore import RawTarget, RestoreTarget, restore_backup
from engine.vsphere.configspec import build_spec
from engine.vsphere.connection import Connection
from engine.vsphere.errors import VsphereError
from engine.vsphere.http_disk import DatastoreHttp
from engine.vsphere.inventory import (disk_capacity, find_datacenter, find_in, flat_file, folder_url,
                                      inventory_path, split_ds_path, virtual_disks)
from engine.vsphere.vddk_disk import choose_transport, find_library, open_disk
from engine.vsphere.vmcatalog import VmCatalog
from engine.vsphere.vmconfig import config_from_json

log = logging.getLogger("blockvault.vsphere")


@dataclass
class RestoreOptions:
    name: str
    datacenter: str | None = None
    datastore: str | None = None
    folder: str | None = None
    resource_pool: str | None = None
    host: str | None = None
    transport: str = "auto"
    vddk_library: str | None = None
    vddk_transports: str | None = None
    tmp_dir: str | None = None
    workers: int | None = None
    on_event: Callable[[str, dict], None] | None = None


@dataclass
class VmRestoreResult:
    backup: str
    vm: str
    moref: str
    transport: str
    disks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _OpenDiskTarget(RestoreTarget):
    """A freshly created disk already opened for writing (through VDDK)."""

    writes_zeros = False  # a new disk reads as zeros

    def __init__(self, disk, label: str):
        super().__init__(label, True)
        self.disk = disk

    def check(self) -> None:
        pass

    def open(self, size: int) -> None:
        if self.disk.size < size:
            raise VsphereError(f"{self.target} holds {self.disk.size} bytes, the backup needs {size}")

    def write(self, offset: int, data) -> None:
        self.disk.write(offset, data)

    def finish(self) -> None:
        self.disk.finish()

    def discard(self) -> None:
        pass


def restore_vm(repo: Repository, conn: Connection, ref: str, options: RestoreOptions,
               on_start: Callable[[int], None] | None = None,
               on_progress: Callable[[int], None] | None = None) -> VmRestoreResult:
    """Recreate VM backup ``ref`` (``VM@N``) as the new VM ``options.name``."""
    vms = VmCatalog(repo.store)  # opens its database: before the read transaction
    with repo.store.read_txn() as txn:
        record = vms.resolve(txn, ref)
        backups = {d["device_key"]: repo.catalog.resolve(txn, d["backup"]) for d in record.disks}
    dropped: list[str] = []
    config = config_from_json(record.config, dropped)
    notes = [f"saved setting {p} is unknown to this pyvmomi and is not restored" for p in dropped]
    library = find_library(options.vddk_library) if options.transport != "http" else None
    transport = choose_transport(options.transport, library)

    dc = find_datacenter(conn, options.datacenter or record.source.get("datacenter"))
    datastore = find_in(conn, dc, "datastore", options.datastore or split_ds_path(config.files.vmPathName)[0])
    folder = find_in(conn, dc, "folder", options.folder) if options.folder else dc.vmFolder
    host = find_in(conn, dc, "host", options.host) if options.host else None
    pool = (find_in(conn, dc, "resource pool", options.resource_pool) if options.resource_pool
            else _default_pool(conn, dc, host))
    with conn.guard("reading the restore targets"):
        ds_name, dc_path = datastore.name, inventory_path(dc)
        if conn.content.searchIndex.FindChild(folder, options.name) is not None:
            raise VsphereError(f"a VM named {options.name!r} already exists in {inventory_path(folder)}; "
                               "choose another --name")
    spec = build_spec(config, options.name, ds_name, datastore)
    notes.extend(spec.notes)
    with conn.guard(f"requesting VM {options.name}"):
        task = folder.CreateVM_Task(config=spec.spec, pool=pool, host=host)
    vm = conn.wait(task, f"creating VM {options.name} from {record.id}")
    _event(options, "vm-created", vm=vm._moId, name=options.name)
    result = VmRestoreResult(record.id, options.name, vm._moId, transport, notes=notes)
    try:
        with conn.guard(f"reading the disks of the new VM {options.name}"):
            if vm.snapshot is not None:
                raise VsphereError(f"the new VM {options.name} has a snapshot; refusing to write into a redo log")
            created = virtual_disks(vm.config)
        if len(created) != len(spec.disks):
            raise VsphereError(f"the new VM has {len(created)} disks, the saved configuration {len(spec.disks)}")
        if on_start:  # what progress counts: uploaded bytes (http), written data (vddk)
            chosen = [backups[d.saved_key] for d in spec.disks if d.saved_key in backups]
            on_start(sum(d.capacity for d in spec.disks if d.saved_key in backups) if transport == "http" else
                     sum(min(b.size, b.stats.get("nonzero_chunks", 0) * b.chunk_size) for b in chosen))
        for planned, device in zip(spec.disks, created):
            backup = backups.get(planned.saved_key)
            capacity = disk_capacity(device)
            if capacity != planned.capacity:
                raise VsphereError(f"{planned.label}: the new disk has {capacity} bytes, the saved one "
                                   f"{planned.capacity}")
            doc = {"device_key": device.key, "saved_device_key": planned.saved_key, "file": device.backing.fileName,
                   "capacity": capacity, "backup": backup.id if backup else None}
            if backup is None:
                notes.append(f"{planned.label} was not backed up in {record.id}; it is restored empty")
            else:
                if backup.size > capacity:
                    raise VsphereError(f"{backup.id} holds {backup.size} bytes, more than the new disk's {capacity}")
                doc["bytes_written"] = _write_disk(repo, conn, options, transport, library, dc_path, vm, device,
                                                   backup, capacity, on_progress)
            result.disks.append(doc)
    except BaseException as e:
        raise _destroy_after_failure(conn, vm, options.name, e)
    _event(options, "disks-written", vm=vm._moId)
    return result


def _write_disk(repo, conn, options, transport, library, dc_path, vm, device, backup, capacity, on_progress) -> int:
    label = f"{device.backing.fileName} of the new VM {options.name}"
    if transport == "vddk":
        disk = open_disk(conn, library, vm._moId, None, device.backing.fileName, options.vddk_transports,
                         writable=True)
        try:
            done = restore_backup(repo, backup.id, _OpenDiskTarget(disk, label), workers=options.workers,
                                  on_progress=on_progress)
        finally:
            disk.close()
        return done.bytes_written
    http = DatastoreHttp(conn, 1)
    with tempfile.TemporaryDirectory(prefix="blockvault-restore-", dir=options.tmp_dir) as tmp:
        path = os.path.join(tmp, "disk.img")
        done = restore_backup(repo, backup.id, RawTarget(path, False), workers=options.workers)
        if capacity > backup.size:
            os.truncate(path, capacity)  # the new disk's size; the tail reads as zeros
        http.upload(folder_url(dc_path, flat_file(device.backing.fileName)), path, label, on_progress)
    return done.bytes_written


def _default_pool(conn: Connection, dc, host):
    from pyVmomi import vim
    with conn.guard("looking up a resource pool"):
        if host is not None:
            return host.parent.resourcePool
        view = conn.content.viewManager.CreateContainerView(dc.hostFolder, [vim.ComputeResource], True)
        try:
            for cr in view.view:
                if cr.resourcePool is not None:
                    return cr.resourcePool
        finally:
            view.Destroy()
    raise VsphereError(f"datacenter {dc.name} has no host or cluster to run the VM on; pass --resource-pool")


def _destroy_after_failure(conn: Connection, vm, name: str, error: BaseException) -> BaseException:
    try:
        with conn.guard(f"removing the half-restored VM {name}"):
            task = vm.Destroy_Task()
        conn.wait(task, f"removing the half-restored VM {name}")
        note = f"the half-restored VM {name} was removed"
    except VsphereError as e:
        note = f"the half-restored VM {name} could not be removed ({e}); delete it by hand"
    log.warning(note)
    if isinstance(error, StoreError):  # VsphereError, a damaged store...: same kind, one message
        failure = type(error)(f"{error}; {note}")
        failure.__cause__ = error
        return failure
    return error


def _event(options: RestoreOptions, event: str, **detail) -> None:
    if options.on_event:
        options.on_event(event, detail)
