"""Backups of one disk: plan what to read, run the pipeline, commit.

The three modes differ only in their base and in what they read:

* full: every allocated extent; no base.
* incremental: on top of the disk's latest backup.
* differential: on top of the disk's latest full.

With a changed-areas file (CBT), an incremental or differential reads only
those extents and overlays them on its base's manifest.  Without one it
reads every allocated extent like a full and stores only the chunks the
store lacks; its manifest is then built from what it read, so it is
complete even if the base was wrong.  Either way the result is a synthetic
full.

``backup_disk`` prepares one disk inside a write session and
``commit_backups`` commits any number of prepared disks at once: a VM's
disks become visible together or not at all.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from engine import signals
from engine.catalog import KINDS, BackupRecord, check_disk_name
from engine.changes import Run, extents_to_runs, load_changed_areas, merge_runs, run_chunks
from engine.errors import BadInputError, NotFoundError
from engine.manifest import Manifest, ManifestBuilder
from engine.pipeline import ChunkPipeline, default_workers
from engine.repository import Repository
from engine.sources import describe, opened_source


@dataclass
class PreparedBackup:
    record: BackupRecord
    manifest: Manifest
    new_segments: dict[bytes, bytes]


@dataclass
class ReadPlan:
    runs: list[Run]
    base: BackupRecord | None
    base_manifest: Manifest | None  # the manifest overlaid (None: built from what is read)

    @property
    def chunks(self) -> int:
        return run_chunks(self.runs)


def plan_read(repo: Repository, txn, disk, disk_name: str, mode: str,
              changed_areas: list[tuple[int, int]] | None) -> ReadPlan:
    if mode not in KINDS:
        raise BadInputError(f"backup mode {mode!r} is unknown; use full, incremental or differential")
    catalog, cs, size = repo.catalog, repo.store.chunk_size, disk.size
    base = None
    if mode != "full":
        base = catalog.latest(txn, disk_name, kind="full" if mode == "differential" else None)
        if base is None:
            what = "full backup" if mode == "differential" else "backup"
            raise NotFoundError(
                f"{'an' if mode == 'incremental' else 'a'} {mode} backup of disk {disk_name!r} needs an earlier {what}, and there is none; "
                "run a full backup first (--mode full)"
            )
    if changed_areas is None:
        return ReadPlan(extents_to_runs(disk.extents(), cs, size), base, None)

    base_manifest = repo.manifests.get(txn, base.key, base.id)
    runs = extents_to_runs(changed_areas, cs, size)
    if size != base.size:
        # CBT knows nothing of space the base never had: read what is allocated
        # there.  The chunk holding the smaller of the two ends changes shape
        # either way, so it is read again too.
        grown = [(s, n) for s, n in disk.extents() if s + n > base.size]
        edge = (min(size, base.size) - 1) // cs if min(size, base.size) > 0 else None
        extra = [(edge, edge + 1)] if edge is not None and edge * cs < size else []
        runs = merge_runs(runs, extents_to_runs(grown, cs, size), extra)
    return ReadPlan(runs, base, base_manifest)


def backup_disk(repo: Repository, session, pool: ThreadPoolExecutor, workers: int, disk, disk_name: str,
                mode: str, changed_areas: list[tuple[int, int]] | None = None,
                change_id: str | None = None, metadata: dict | None = None,
                on_progress: Callable[[int], None] | None = None,
                on_plan: Callable[[int], None] | None = None) -> PreparedBackup:
    """Read one disk into the session; nothing is visible until commit_backups."""
    check_disk_name(disk_name)
    started = time.time()
    store = repo.store
    cs = store.chunk_size
    with store.read_txn() as txn:
        plan = plan_read(repo, txn, disk, disk_name, mode, changed_areas)
        seq = repo.catalog.next_seq(txn, disk_name)
        if on_plan:
            on_plan(min(plan.chunks * cs, disk.size))
        builder = ManifestBuilder(disk.size, cs, store.digester.zero_digest, store.digester,
                                  lambda d: repo.manifests.segment(txn, d), plan.base_manifest)
        pipeline = ChunkPipeline(store, session, pool, workers)
        stats = pipeline.run(disk, plan.runs, disk.size, builder.set, on_progress)
        manifest = builder.finish()
    record = BackupRecord(
        disk=disk_name, seq=seq, time=started, kind=mode,
        base=plan.base.id if plan.base else None, size=disk.size, chunk_size=cs,
        change_id=change_id, metadata=metadata or {},
        stats={**stats.as_dict(), "nonzero_chunks": manifest.nonzero_chunks,
               "changed_areas": changed_areas is not None},
    )
    return PreparedBackup(record, manifest, builder.new_segments)


def commit_backups(repo: Repository, session, prepared: list[PreparedBackup], extra=None) -> None:
    """One LMDB transaction: new chunks, manifests, segments, catalog entries."""
    finished = time.time()
    for p in prepared:
        p.record.stats["duration"] = round(finished - p.record.time, 6)

    def write(txn):
        for p in prepared:
            repo.manifests.put(txn, p.record.key, p.manifest, p.new_segments)
            repo.catalog.put(txn, p.record)
        if extra is not None:
            extra(txn)

    with signals.deferred():  # interrupted after LMDB's commit, the abort would delete referenced packs
        session.commit(write)


def backup_image(repo: Repository, source: str, disk_name: str, mode: str = "full",
                 changed_areas_path: str | None = None, change_id: str | None = None,
                 wait: float = 0.0, workers: int | None = None, credentials_file: str | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 on_plan: Callable[[int], None] | None = None) -> BackupRecord:
    """Back up one disk (raw image, hosted VMDK or vddk:// URL) as the next point of ``disk_name``."""
    check_disk_name(disk_name)
    if changed_areas_path is not None and mode == "full":
        raise BadInputError("--changed-areas applies to incremental and differential backups, not to a full")
    with opened_source(source, credentials_file) as disk:
        changed = load_changed_areas(changed_areas_path, disk.size) if changed_areas_path else None
        workers = workers or default_workers()
        with repo.store.writer(wait=wait, purpose=f"backup of {disk_name}") as session, \
                ThreadPoolExecutor(workers, thread_name_prefix="bv-backup") as pool:
            prepared = backup_disk(repo, session, pool, workers, disk, disk_name, mode, changed,
                                   change_id=change_id, metadata={"source": describe(disk)},
                                   on_progress=on_progress, on_plan=on_plan)
            commit_backups(repo, session, [prepared])
    return prepared.record
