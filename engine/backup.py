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

A change list is used only when it can be right: it must cover the whole
disk (engine/changes.py), and the disk must be the one the chain was read
from — same size, and for files the same kind and path (engine/identity.py)
— at every point since the base.  A different source is not an error (a
resized disk, an image moved): it is a warning, and the disk is read in
full as without a change list.  That rule also covers a resize: a shrunk
or grown disk never overlays its base, so no chunk at the old edge can
keep bytes the disk no longer has.

``backup_disk`` prepares one disk inside a write session and
``commit_backups`` commits any number of prepared disks at once: a VM's
disks become visible together or not at all.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from engine import signals
from engine.catalog import KINDS, BackupRecord, check_disk_name
from engine.changes import (ChangeList, DiskRuns, Run, check_cover, extents_to_runs, load_changed_areas,
                            run_chunks)
from engine.errors import BadInputError, NotFoundError
from engine.identity import differences, source_identity
from engine.manifest import Manifest, ManifestBuilder
from engine.pipeline import ChunkPipeline, default_workers
from engine.repository import Repository
from engine.sources import check_not_shrunk, opened_source

log = logging.getLogger("blockvault.backup")


@dataclass
class PreparedBackup:
    record: BackupRecord
    manifest: Manifest
    new_segments: dict[bytes, bytes]
    started: float = 0.0  # when the work began; record.time is the point's time (--time)
    timed: bool = True    # False: the record keeps the duration it has (a copied point, engine/copy.py)


def check_point_time(at: float, latest, what: str) -> None:
    """A chain's points are in time order: a new point may not be older than
    the chain's newest (``latest``, a catalog or VM record, or None).  Retention
    (engine/retention.py) and ``NAME@YYYY-MM-DD`` read times as the chain's order."""
    if latest is not None and at < latest.time:
        from engine.commandline import iso_time
        raise BadInputError(
            f"the new point of {what} would be at {iso_time(at)}, older than its newest point {latest.id} "
            f"({iso_time(latest.time)}); a chain's points are in time order: give a --time of "
            f"{iso_time(latest.time)} or later")


@dataclass
class ReadPlan:
    runs: list[Run] | DiskRuns  # a disk's own extents are streamed (DiskRuns), never listed whole
    base: BackupRecord | None
    base_manifest: Manifest | None  # the manifest overlaid (None: built from what is read)
    warnings: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return self.runs.chunks if isinstance(self.runs, DiskRuns) else run_chunks(self.runs)


def source_change(catalog, txn, disk_name: str, base: BackupRecord, identity: dict | None,
                  size: int) -> tuple[BackupRecord, list[str]] | None:
    """The first point since ``base`` (the chain's last point first) whose
    source differs from the one read now, with how; None if none does."""
    since = [r for r in catalog.for_name(txn, disk_name) if r.seq >= base.seq]
    for point in since[-1:] + since[:-1]:
        found = differences(point, identity, size)
        if found:
            return point, found
    return None


def plan_read(repo: Repository, txn, disk, disk_name: str, mode: str,
              changes: ChangeList | list[tuple[int, int]] | None, identity: dict | None = None) -> ReadPlan:
    """What to read, and on which base; ``changes`` as a plain list is taken
    to cover the whole disk (vSphere's replies are looped over its capacity)."""
    if mode not in KINDS:
        raise BadInputError(f"backup mode {mode!r} is unknown; use full, incremental or differential")
    catalog, cs, size = repo.catalog, repo.store.chunk_size, disk.size
    base, warnings = None, []
    if mode != "full":
        base = catalog.latest(txn, disk_name, kind="full" if mode == "differential" else None)
        if base is None:
            what = "full backup" if mode == "differential" else "backup"
            raise NotFoundError(
                f"{'an' if mode == 'incremental' else 'a'} {mode} backup of disk {disk_name!r} needs an earlier {what}, and there is none; "
                "run a full backup first (--mode full)"
            )
        # Without an identity (a VM disk: DiskJob has judged its capacity) and without a
        # list there is nothing to decide: the disk is read in full either way.
        changed = (source_change(catalog, txn, disk_name, base, identity, size)
                   if identity is not None or changes is not None else None)
        if changed is not None:
            point, how = changed
            use = "the change list is not used and " if changes is not None else ""
            resized = all(h.startswith("size ") for h in how)
            question = "was it resized?" if resized else "is it another disk's image?"
            warnings.append(
                f"SOURCE CHANGED: disk {disk_name} is not read from the source {point.id} was read from "
                f"({'; '.join(how)}); {question} This {mode} does not build on {base.id}: "
                f"{use}the whole disk is read (every allocated extent; only the chunks the store lacks "
                "are stored)")
            changes = None
    if changes is None:
        return ReadPlan(DiskRuns(disk, cs, size), base, None, warnings)
    if not isinstance(changes, ChangeList):
        changes = ChangeList.whole(changes, size)
    check_cover(changes, size, disk_name)
    base_manifest = repo.manifests.get(txn, base.key, base.id, base)
    return ReadPlan(extents_to_runs(changes.extents, cs, size), base, base_manifest, warnings)


def backup_disk(repo: Repository, session, pool: ThreadPoolExecutor, workers: int, disk, disk_name: str,
                mode: str, changed_areas: ChangeList | list[tuple[int, int]] | None = None,
                change_id: str | None = None, metadata: dict | None = None,
                on_progress: Callable[[int], None] | None = None,
                on_plan: Callable[[int], None] | None = None,
                identity: dict | None = None, warnings: list[str] | None = None,
                at: float | None = None) -> PreparedBackup:
    """Read one disk into the session; nothing is visible until commit_backups.

    ``at`` is the point's time (``--time``; default: when the work starts).
    ``identity`` (engine/identity.py) is compared with the chain's points;
    ``warnings`` are the caller's for this disk, and this backup's own are
    added to that list (and logged): the record carries them all."""
    check_disk_name(disk_name)
    started = time.time()
    store = repo.store
    cs = store.chunk_size
    notes = warnings if warnings is not None else []
    with store.read_txn() as txn:
        plan = plan_read(repo, txn, disk, disk_name, mode, changed_areas, identity)
        for text in plan.warnings:
            log.warning(text)
            notes.append(text)
        seq = repo.catalog.next_seq(txn, disk_name)
        point_time = started if at is None else at
        check_point_time(point_time, repo.catalog.latest(txn, disk_name), f"disk {disk_name}")
        if on_plan:
            on_plan(min(plan.chunks * cs, disk.size))
        builder = ManifestBuilder(disk.size, cs, store.digester.zero_digest, store.digester,
                                  lambda d: repo.manifests.segment(txn, d, plan.base.id), plan.base_manifest,
                                  flush=lambda segments: commit_segments(repo, session, segments))
        pipeline = ChunkPipeline(store, session, pool, workers)
        stats = pipeline.run(disk, plan.runs, disk.size, builder.set, on_progress)
        check_not_shrunk(disk)  # a raw file truncated meanwhile was read as zeros past its new end
        manifest = builder.finish()
    record = BackupRecord(
        disk=disk_name, seq=seq, time=point_time, kind=mode,
        base=plan.base.id if plan.base else None, size=disk.size, chunk_size=cs,
        change_id=change_id, metadata=metadata or {},
        stats={**stats.as_dict(), "nonzero_chunks": manifest.nonzero_chunks,
               "changed_areas": plan.base_manifest is not None},
        warnings=list(notes),
    )
    return PreparedBackup(record, manifest, builder.new_segments, started)


def commit_segments(repo: Repository, session, segments: dict[bytes, bytes]) -> None:
    """Commit finished manifest segments before the backup's own commit, so
    that they leave memory: a 4 TiB disk of 100,000 small extents rewrites
    256 MiB of them.  A segment is content-addressed and nothing refers to it
    until the manifest commits, so one committed by a backup that then fails
    is harmless garbage (docs/FORMAT.md "Commit order")."""
    with repo.store.read_txn() as txn:
        writes = repo.manifests.segment_writes(txn, segments)
    segments.clear()
    number = session.commit_early(writes)
    log.debug("committed manifest segments early as commit %d", number)


def commit_backups(repo: Repository, session, prepared: list[PreparedBackup], more=()) -> None:
    """One LMDB transaction: new chunks, manifests, segments, catalog entries.

    Every write also goes into the packs as metadata records (the session
    writes them after the chunks and syncs them before the LMDB commit), so
    ``blockvault rebuild`` can recreate the catalog from the packs alone.
    ``more`` adds records of the caller's, as (NumberedRecords, record)
    pairs: a VM backup's record."""
    finished = time.time()
    for p in prepared:
        if p.timed:
            p.record.stats["duration"] = round(finished - (p.started or p.record.time), 6)
    writes = []
    with repo.store.read_txn() as txn:
        for p in prepared:
            writes += repo.manifests.writes(txn, p.record.key, p.manifest, p.new_segments)
            writes.append(repo.catalog.write(p.record))
            p.new_segments = {}  # handed to the session, which drops each as LMDB takes it
    pairs = [(repo.catalog, p.record) for p in prepared] + list(more)
    writes += [numbered.write(record) for numbered, record in more]

    def check(txn):  # the chain locks make a clash a bug, but a bug must not overwrite a backup
        for numbered, record in pairs:
            numbered.check_new(txn, record)

    manifests = [p.manifest for p in prepared]

    def count(txn):  # reference counts, in the same transaction (engine/references.py)
        repo.references.add_manifests(txn, manifests)

    with signals.deferred():  # interrupted after LMDB's commit, the abort would delete referenced packs
        session.commit(check, metadata=writes, after=count)


def backup_image(repo: Repository, source: str, disk_name: str, mode: str = "full",
                 changed_areas_path: str | None = None, change_id: str | None = None,
                 wait: float = 0.0, workers: int | None = None, credentials_file: str | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 on_plan: Callable[[int], None] | None = None,
                 allow_external_extents: bool = False, at: float | None = None) -> BackupRecord:
    """Back up one disk (raw image, hosted VMDK or vddk:// URL) as the next point of ``disk_name``,
    recorded at ``at`` (a unix time; default now)."""
    check_disk_name(disk_name)
    if changed_areas_path is not None and mode == "full":
        raise BadInputError("--changed-areas applies to incremental and differential backups, not to a full")
    with opened_source(source, credentials_file, allow_external_extents) as disk:
        changed = load_changed_areas(changed_areas_path, disk.size) if changed_areas_path else None
        workers = workers or default_workers()
        with repo.store.writer(wait=wait, purpose=f"backup of {disk_name}", chains=[("disk", disk_name)]) as session, \
                ThreadPoolExecutor(workers, thread_name_prefix="bv-backup") as pool:
            identity = source_identity(disk)
            prepared = backup_disk(repo, session, pool, workers, disk, disk_name, mode, changed,
                                   change_id=change_id, metadata={"source": identity},
                                   on_progress=on_progress, on_plan=on_plan, identity=identity, at=at)
            commit_backups(repo, session, [prepared])
    return prepared.record
