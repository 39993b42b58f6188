"""One disk of a VM backup run: what to read, whether CBT can be trusted, the read.

For an incremental or differential the disk's change list comes from
QueryChangedDiskAreas with the changeId of its base backup.  It is used only
when nothing says it is unsafe; otherwise the disk's allocated areas are read
in full, only chunks the store lacks are stored, the manifest is built from
what was read (a synthetic full that does not depend on the base), and the
reason is a warning of the run:

* no earlier backup of this disk (a disk added since): read as a full;
* the disk's capacity changed;
* the base backup or the snapshot has no changeId (CBT off or not active yet);
* the tracking UUID of the changeId changed (CBT was reset);
* QueryChangedDiskAreas refuses the changeId (FileFault) or breaks its contract;
* the sample of "unchanged" chunks (cbt_sample.py) does not match the base.

Several DiskJobs of one VM run in parallel threads; they share the write
session and the chunk thread pool (WriteSession lookups and appends are
thread-safe), and each reads through its own disk source.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable

from engine.backup import PreparedBackup, backup_disk
from engine.changes import extents_to_runs
from engine.vsphere import cbt_sample
from engine.vsphere.changed_areas import (ALL_ALLOCATED, BadChangedAreas, ChangeIdRejected, query_changed_areas,
                                          same_tracking)
from engine.vsphere.inventory import disk_capacity, flat_file

log = logging.getLogger("blockvault.vsphere")


@dataclass
class DiskOutcome:
    prepared: PreparedBackup
    doc: dict                      # this disk's entry of the VM record
    warnings: list[str] = field(default_factory=list)


class DiskJob:
    """Back up one VirtualDisk of the backup snapshot into the run's session."""

    def __init__(self, run, device, disk_name: str):
        self.run = run                 # backup.VmRun: connection, snapshot, session, options
        self.device = device
        self.disk_name = disk_name
        self.key = device.key
        self.capacity = disk_capacity(device)
        label = device.deviceInfo.label if device.deviceInfo and device.deviceInfo.label else f"disk {device.key}"
        self.label = f"{label} (device {device.key}) of VM {run.vm_name}"
        self.change_id = getattr(device.backing, "changeId", None)
        self.warnings: list[str] = []
        seed = run.options.seed
        self.rng = random.Random(f"{seed}:{device.key}") if seed is not None else random.Random()

    def warn(self, text: str, loud: bool = False) -> None:
        (log.error if loud else log.warning)(text)
        self.warnings.append(text)

    # -- deciding -----------------------------------------------------------------

    def base_record(self, txn):
        run = self.run
        if run.kind == "full":
            return None
        return run.repo.catalog.latest(txn, self.disk_name, kind="full" if run.kind == "differential" else None)

    def distrust(self, base) -> str | None:
        """Why this disk's change list cannot be used; None when it can."""
        if base.size != self.capacity:
            return f"its capacity changed from {base.size} to {self.capacity} bytes since {base.id}"
        if not base.change_id:
            return f"its earlier backup {base.id} has no changeId"
        if not self.change_id:
            return "the snapshot shows no changeId for it (Changed Block Tracking is off or not active yet)"
        if not same_tracking(base.change_id, self.change_id):
            return (f"Changed Block Tracking was reset since {base.id} (changeId {base.change_id!r} -> "
                    f"{self.change_id!r})")
        return None

    def changed_areas(self, source, txn, base) -> tuple[list | None, dict]:
        """The extents to read (None: everything allocated) and what was decided."""
        run = self.run
        fallback = "reading its allocated areas in full and storing only the chunks that changed"
        reason = self.distrust(base)
        if reason is None:
            try:
                areas = query_changed_areas(run.conn, run.vm, run.snapshot, self.key, self.capacity,
                                            base.change_id, self.label)
            except (ChangeIdRejected, BadChangedAreas) as e:
                reason = str(e)
        if reason is not None:
            self.warn(f"{self.label}: {reason}; {fallback}")
            return None, {"read": "allocated", "reason": reason}
        decision = {"read": "changed-areas", "changed_bytes": sum(n for _, n in areas)}
        share = run.options.cbt_sample
        if share > 0:
            sample = self.sample(source, txn, base, areas, share)
            decision["sample"] = {"chunks": sample.sampled, "mismatched": len(sample.mismatched),
                                  "bytes_read": sample.bytes_read}
            if not sample.ok:
                cs = run.repo.store.chunk_size
                where = ", ".join(str(i * cs) for i in sample.mismatched[:8])
                self.warn(f"CBT MISMATCH on {self.label}: {len(sample.mismatched)} of {sample.sampled} sampled "
                          f"chunks that Changed Block Tracking reports unchanged since {base.id} differ from that "
                          f"backup (offsets {where}); the change list cannot be trusted: {fallback}. Consider a "
                          "CBT reset of this VM.", loud=True)
                decision.update(read="allocated", reason="CBT sample mismatch", cbt_mismatch=True)
                return None, decision
        return areas, decision

    def sample(self, source, txn, base, areas, share: float) -> cbt_sample.SampleResult:
        repo = self.run.repo
        cs = repo.store.chunk_size
        manifest = repo.manifests.get(txn, base.key, base.id, base)
        runs = extents_to_runs(areas, cs, self.capacity)
        indices = cbt_sample.draw(runs, min(manifest.n_chunks, -(-self.capacity // cs)), share, self.rng)
        return cbt_sample.check(source, indices, cs, repo.store.digester, manifest,
                                lambda d: repo.manifests.segment(txn, d, base.id))

    # -- reading ------------------------------------------------------------------

    def allocated(self) -> list[tuple[int, int]]:
        """Allocated areas for the HTTP source: QueryChangedDiskAreas("*")."""
        run = self.run
        try:
            return query_changed_areas(run.conn, run.vm, run.snapshot, self.key, self.capacity, ALL_ALLOCATED,
                                       self.label)
        except (ChangeIdRejected, BadChangedAreas) as e:
            self.warn(f"{self.label}: the allocated areas are unknown ({e}); reading the whole disk")
            return [(0, self.capacity)] if self.capacity else []

    def run_backup(self, on_plan: Callable[[int], None] | None,
                   on_progress: Callable[[int], None] | None) -> DiskOutcome:
        run = self.run
        source = run.open_source(self)
        try:
            with run.repo.store.read_txn() as txn:
                base = self.base_record(txn)
                if base is None and run.kind != "full":
                    self.warn(f"{self.label} has no earlier backup (a disk added since the last one); "
                              "reading it in full")
                    kind, areas, decision = "full", None, {"read": "allocated", "reason": "new disk"}
                elif base is None:
                    kind, areas, decision = "full", None, {"read": "allocated"}
                else:
                    kind = run.kind
                    areas, decision = self.changed_areas(source, txn, base)
            prepared = backup_disk(
                run.repo, run.session, run.pool, run.workers, source, self.disk_name, kind, areas,
                change_id=self.change_id, metadata=run.disk_metadata(self), on_progress=on_progress,
                on_plan=on_plan, warnings=self.warnings, at=run.point_time)
            transport = getattr(source, "transport", run.transport)
            transferred = getattr(source, "bytes_transferred", None)
            short = getattr(source, "file_length", None)
            if short is not None:
                self.warn(f"{self.label}: its file {flat_file(self.device.backing.fileName)} holds only {short} "
                          f"of the disk's {self.capacity} bytes (a thin disk stored short on its datastore); the "
                          "bytes past its end were read as zeros")
        finally:
            source.close()
        rec = prepared.record
        doc = {"device_key": self.key, "label": self.label, "backup": rec.id, "kind": rec.kind,
               "capacity": self.capacity, "file": self.device.backing.fileName, "change_id": self.change_id,
               "transport": transport, "bytes_read": rec.stats["bytes_read"],
               "new_chunks": rec.stats["new_chunks"], "stored_bytes": rec.stats["stored_bytes"],
               "warnings": list(self.warnings), **decision}
        if transferred is not None:
            doc["bytes_transferred"] = transferred
        return DiskOutcome(prepared, doc, self.warnings)
