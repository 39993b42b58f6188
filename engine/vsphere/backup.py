"""A nightly VM backup: snapshot, configuration, changed extents, commit.

The sequence, per run (vsphere-vddk.md §2.2):

1. take the VM's lock and the store lock, shared with other backups
   (before touching vSphere, so a busy VM costs no snapshot); its disks'
   locks follow once the snapshot names them;
2. turn CBT on where it is off (it takes effect with step 4's snapshot);
3. remove snapshots that earlier, crashed runs left behind (by name);
4. take the backup snapshot (memory off, quiesce optional);
5. read the configuration from the snapshot (not from the VM: the snapshot's
   is the one that matches the disks read) and keep it as JSON;
6. back up every disk in parallel (disk_job.py): its changed extents since
   its base's changeId, or its allocated areas when CBT cannot be trusted;
7. remove the snapshot, on success and on failure alike;
8. commit every disk's manifest and catalog entry, the new changeIds and the
   VM record ``VM@N`` in one LMDB transaction: the VM backup appears whole
   or not at all.

A failure anywhere leaves the store as it was (the session's packs are
deleted) and says whether the snapshot could be removed; if not, the next
run removes it in step 3.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Callable

from chunkstore import StoreError
from engine.backup import check_point_time, commit_backups
from engine.catalog import BackupRecord
from engine.errors import NotFoundError
from engine.pipeline import default_workers
from engine.repository import Repository
from engine.vsphere import snapshot as snapshots
from engine.vsphere.configspec import build_spec
from engine.vsphere.connection import Connection
from engine.vsphere.disk_job import DiskJob
from engine.vsphere.errors import VsphereError, describe_fault
from engine.vsphere.http_disk import DatastoreHttp, HttpDisk
from engine.vsphere.inventory import (datacenter_of, ensure_cbt, flat_file, folder_url, inventory_path,
                                      virtual_disks)
from engine.vsphere.vddk_disk import AccessBracket, choose_transport, find_library, open_disk
from engine.vsphere.vmcatalog import VmBackupRecord, VmCatalog, disk_backup_name, vm_backup_name
from engine.vsphere.vmconfig import config_from_json, config_to_json

log = logging.getLogger("blockvault.vsphere")

MODES = ("auto", "full", "incremental", "differential")


@dataclass
class BackupOptions:
    mode: str = "auto"
    transport: str = "auto"            # auto, vddk or http
    vddk_library: str | None = None
    vddk_transports: str | None = None  # e.g. "nbdssl:nbd"; None: VDDK's default
    quiesce: bool = False
    cbt_sample: float = 0.001          # share of CBT-unchanged chunks re-read and compared (≥ 1 chunk)
    workers: int | None = None
    parallel_disks: int = 4
    connections: int = 4               # per disk: HTTP connections or VDDK handles
    wait: float = 0.0
    seed: int | None = None            # for the CBT sample; None: random
    at: float | None = None            # the point's time (--time); None: when the run starts
    on_event: Callable[[str, dict], None] | None = None


@dataclass
class VmBackupResult:
    record: VmBackupRecord
    disks: list[BackupRecord]
    warnings: list[str] = field(default_factory=list)


class VmRun:
    """State shared by the DiskJobs of one run."""

    def __init__(self, repo: Repository, conn: Connection, vm, vm_name: str, kind: str,
                 options: BackupOptions, transport: str, library: str | None):
        self.repo, self.conn, self.vm, self.vm_name = repo, conn, vm, vm_name
        self.kind, self.options, self.transport, self.library = kind, options, transport, library
        self.session = self.pool = self.snapshot = None
        self.workers = options.workers or default_workers()
        self.dc_path = self.datacenter = self.inventory_path = ""
        self.backup_id = ""
        self.point_time: float | None = None  # the VM backup's time, given to each disk backup

    def open_source(self, job: DiskJob):
        device = job.device
        if self.transport == "vddk":
            return open_disk(self.conn, self.library, self.vm._moId, self.snapshot._moId, device.backing.fileName,
                             self.options.vddk_transports, handles=self.options.connections)
        from pyVmomi import vim
        backing = device.backing
        if not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo) or backing.parent is not None:
            raise VsphereError(f"{job.label} is a {type(backing).__name__.rsplit('.', 1)[-1]}"
                               f"{' with a parent disk' if getattr(backing, 'parent', None) else ''}; datastore "
                               "HTTP access reads only flat disks without snapshots: use --transport vddk")
        url = folder_url(self.dc_path, flat_file(backing.fileName))
        return HttpDisk(DatastoreHttp(self.conn, self.options.connections), url, job.capacity,
                        job.allocated, f"{backing.fileName} ({job.label})")

    def disk_metadata(self, job: DiskJob) -> dict:
        return {"source": {"kind": "vsphere", "transport": self.transport, "server": str(self.conn.endpoint),
                           "vm": self.vm_name, "moref": self.vm._moId, "device_key": job.key,
                           "file": job.device.backing.fileName},
                "vm_backup": self.backup_id}


def _event(options: BackupOptions, event: str, **detail) -> None:
    if options.on_event:
        options.on_event(event, detail)


def _kind(mode: str, vm: str, prev: VmBackupRecord | None, prev_full: VmBackupRecord | None) -> str:
    if mode not in MODES:
        raise VsphereError(f"--mode {mode!r}: use auto, full, incremental or differential")
    if mode == "auto":
        return "incremental" if prev else "full"
    if (mode == "incremental" and prev is None) or (mode == "differential" and prev_full is None):
        what = "backup" if mode == "incremental" else "full backup"
        article = "an" if mode == "incremental" else "a"
        raise NotFoundError(f"{article} {mode} backup of VM {vm} needs an earlier {what}, and the store has none; "
                            "run --mode full (or auto) first")
    return mode


def _skipped(device) -> str | None:
    """Why a disk is left out: snapshots do not cover independent disks or physical RDMs."""
    backing = device.backing
    mode = getattr(backing, "diskMode", "") or ""
    if mode.startswith("independent"):
        return f"it is an {mode} disk, which snapshots do not cover"
    if getattr(backing, "compatibilityMode", None) == "physicalMode":
        return "it is a physical-mode raw device mapping, which snapshots do not cover"
    return None


def backup_vm(repo: Repository, conn: Connection, vm, options: BackupOptions | None = None,
              on_plan: Callable[[int], None] | None = None,
              on_progress: Callable[[int], None] | None = None) -> VmBackupResult:
    """Back up every disk of ``vm`` as the next point ``VM@N`` of the store."""
    options = options or BackupOptions()
    store, vms = repo.store, VmCatalog(repo.store)
    with conn.guard("reading the VM's name"):
        vm_name = vm.name
    name = vm_backup_name(vm_name)
    started = time.time()
    # The VM's chain lock now, its disks' once the snapshot names them (_read):
    # backups of other VMs and disks run beside this one (chunkstore/lock.py).
    with store.writer(wait=options.wait, purpose=f"vSphere backup of VM {vm_name}",
                      chains=[("vm", name)]) as session:
        with store.read_txn() as txn:
            prev, prev_full = vms.latest(txn, name), vms.latest(txn, name, kind="full")
            seq = vms.next_seq(txn, name)
            point_time = started if options.at is None else options.at
            check_point_time(point_time, prev, f"VM {vm_name}")
        kind = _kind(options.mode, name, prev, prev_full)
        library = find_library(options.vddk_library) if options.transport != "http" else None
        transport = choose_transport(options.transport, library)
        run = VmRun(repo, conn, vm, vm_name, kind, options, transport, library)
        run.session, run.backup_id, run.point_time = session, f"{name}@{seq}", point_time
        warnings: list[str] = []

        def warn(text: str) -> None:
            log.warning(text)
            warnings.append(text)

        for text in filter(None, [ensure_cbt(conn, vm, vm_name), *snapshots.remove_leftovers(conn, vm, vm_name)]):
            warn(text)
        if transport == "http":
            others = snapshots.other_snapshots(conn, vm, vm_name)
            if others:
                raise VsphereError(f"VM {vm_name} has snapshots ({', '.join(others)}): its disks are then redo-log "
                                   "chains that datastore HTTP access cannot read; remove them or use --transport "
                                   "vddk")
        bracket = AccessBracket(conn, library, vm._moId, warn) if transport == "vddk" else None
        if bracket:
            bracket.prepare()
        try:
            run.snapshot = snapshots.create(conn, vm, vm_name, options.quiesce)
            _event(options, "snapshot-created", snapshot=run.snapshot._moId, vm=vm._moId)
            try:
                config_doc, outcomes = _read(run, warnings, on_plan, on_progress)
            except BaseException as e:
                raise _after_failure(run, e)
            removed = _remove_snapshot(run, warnings)
        finally:
            if bracket:
                bracket.end()
        base = None if kind == "full" else (prev if kind == "incremental" else prev_full).id
        record = VmBackupRecord(
            vm=name, seq=seq, time=point_time, kind=kind, base=base,
            disks=[o.doc for o in outcomes], config=config_doc, warnings=warnings,
            source={"server": str(conn.endpoint), "vm": vm_name, "moref": vm._moId,
                    "uuid": config_doc.get("uuid"), "instance_uuid": config_doc.get("instanceUuid"),
                    "path": run.inventory_path, "datacenter": run.datacenter, "transport": transport,
                    "quiesced": options.quiesce},
            snapshot={"name": snapshots.SNAPSHOT_NAME, "moref": run.snapshot._moId, "removed": removed})
        prepared = [o.prepared for o in outcomes]
        commit_backups(repo, session, prepared, more=[(vms, record)])
    _event(options, "committed", id=record.id)
    return VmBackupResult(record, [p.record for p in prepared], warnings)


def _read(run: VmRun, warnings: list[str], on_plan, on_progress):
    conn, vm = run.conn, run.vm
    with conn.guard(f"reading the configuration of the backup snapshot of VM {run.vm_name}"):
        config = run.snapshot.config
        dc = datacenter_of(vm)
        run.dc_path, run.datacenter, run.inventory_path = inventory_path(dc), dc.name, inventory_path(vm)
    config_doc = config_to_json(config)
    try:  # what disaster recovery will do, tried now so a problem shows while the VM still exists
        build_spec(config_from_json(config_doc), f"{run.vm_name}-check", "check")
    except Exception as e:  # noqa: BLE001 - any failure here is a warning, not the night's failure
        warnings.append(f"the saved configuration of VM {run.vm_name} may not rebuild a VM: {describe_fault(e)}")
        log.warning(warnings[-1])
    jobs = []
    for device in virtual_disks(config):
        why = _skipped(device)
        if why:
            warnings.append(f"disk {device.key} of VM {run.vm_name} is not backed up: {why}")
            log.warning(warnings[-1])
            continue
        jobs.append(DiskJob(run, device, disk_backup_name(vm_backup_name(run.vm_name), device.key)))
    run.session.lock_chains([("disk", job.disk_name) for job in jobs], run.options.wait)
    plan_total, lock = [0], threading.Lock()

    def planned(n: int) -> None:
        with lock:
            plan_total[0] += n
            if on_plan:
                on_plan(plan_total[0])

    with ThreadPoolExecutor(run.workers, thread_name_prefix="bv-backup") as pool, \
            ThreadPoolExecutor(max(1, min(len(jobs), run.options.parallel_disks)),
                               thread_name_prefix="bv-disk") as disks:
        run.pool = pool
        futures = [disks.submit(job.run_backup, planned, on_progress) for job in jobs]
        outcomes, first_error = [], None
        try:  # short waits: a signal is handled in this thread only when it wakes (engine/signals.py)
            while futures_wait(futures, timeout=0.5).not_done:
                pass
        except KeyboardInterrupt as e:
            first_error = e
            futures_wait(futures)  # the disks stop at their next batch (signals.check in the pipeline)
        for fut in futures:  # every disk finishes (or fails) before the snapshot goes
            try:
                outcomes.append(fut.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first_error = first_error or e
    if first_error is not None:
        raise first_error
    for o in outcomes:
        warnings.extend(o.warnings)
    _event(run.options, "disks-read", disks=len(outcomes))
    return config_doc, outcomes


def _remove_snapshot(run: VmRun, warnings: list[str]) -> bool:
    try:
        snapshots.remove(run.conn, run.vm, run.vm_name, run.snapshot, f"backup snapshot {snapshots.SNAPSHOT_NAME!r}")
    except VsphereError as e:
        warnings.append(f"{e}; the backup itself is complete, and the next backup removes the snapshot")
        log.warning(warnings[-1])
        return False
    _event(run.options, "snapshot-removed", snapshot=run.snapshot._moId)
    return True


def _after_failure(run: VmRun, error: BaseException) -> BaseException:
    """Remove the snapshot after a failed read; the error to raise, saying how that went."""
    try:
        snapshots.remove(run.conn, run.vm, run.vm_name, run.snapshot, f"backup snapshot {snapshots.SNAPSHOT_NAME!r}")
        note = "the backup snapshot was removed"
    except VsphereError as e:
        note = (f"the backup snapshot {snapshots.SNAPSHOT_NAME!r} could not be removed either ({e}); the next "
                "backup of this VM removes it")
    tail = f"nothing was committed to the store, {note}"
    if isinstance(error, StoreError):  # VsphereError, a busy store, bad input...: same kind, one message
        failure = type(error)(f"{error}; {tail}")
    elif isinstance(error, OSError):  # the VDDK reader's I/O errors
        failure = VsphereError(f"reading the disks of VM {run.vm_name} failed: {describe_fault(error)}; {tail}")
    else:  # interrupted, or a bug: keep it and its traceback
        log.warning("backup of VM %s stopped; %s", run.vm_name, tail)
        return error
    failure.__cause__ = error
    return failure
