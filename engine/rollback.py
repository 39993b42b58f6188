"""Rollback restore: turn a target that holds one point into another, writing only what differs.

Two ways to know what differs:

* ``--rollback-from ID2``: the user says the target holds ID2.  The two
  manifests are compared segment by segment (a segment digest names 1024
  chunk digests, so equal segments cost nothing: no segment read, no chunk
  compared), then chunk by chunk inside the segments that differ.  After a
  3% change that is ~3% of a restore's reads and writes.
* ``--rollback-compare``: nothing is assumed.  The target is read in large
  batches by a thread pool (native reads and the store's digest both
  release the GIL), each chunk hashed with the store's digest and compared
  with the point's; only the chunks that differ are written.

Either way the plan is a stream of windows of {digest: [offsets]} handed to
the restore's one write path (engine/restore.py ``_write_all``), so a
rollback writes exactly as a restore does, into the same targets
(engine/targets.py; a raw file in place is engine/inplace.py).

A rollback onto a target that does not hold ID2 would silently make a wrong
disk, so ``--rollback-from`` checks cheaply before it writes anything: the
target's size (a file: exactly ID2's; a device or vddk disk: at least), and
a sample of chunks read from the target (``--verify-target N``, default 8):
the first and the last chunk that differ, and chunks drawn at random among
ID2's non-zero ones.  Each must hash to ID2's digest at its offset, or to
ID's (a chunk an interrupted rollback had already written).  A sample is
evidence, not proof: ``--rollback-compare`` is the mode that needs no
assertion.

An interrupted rollback leaves the target a mix of both points; the error
says so, and the same rollback run again (or ``--rollback-compare``)
finishes the job, since every chunk it already wrote is one that now
matches.
"""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import native
import numpy as np

from engine.catalog import BackupRecord
from engine.errors import BadInputError, UsageError
from engine.inplace import InPlaceFileTarget
from engine.manifest import Manifest, segment_array
from engine.progress import human_bytes
from engine.repository import Repository
from engine.restore import WINDOW_SEGMENTS, RestoreResult, _write_all
from engine.sources import target_format
from engine.targets import RestoreTarget, _is_block_device, make_target
from engine.target_digests import compare_windows

DEFAULT_SAMPLES = 8


@dataclass
class RollbackStats:
    """What a rollback compared and skipped (``--json``'s ``rollback`` object)."""

    mode: str                    # "from" (the manifests compared) or "compare" (the target read)
    base: str | None             # the point the target was said to hold (--rollback-from)
    chunks: int                  # chunks of the restored disk
    chunks_compared: int = 0     # chunk digests compared one by one
    chunks_skipped: int = 0      # chunks left as they were: already equal
    segments_skipped: int = 0    # segments equal in both manifests (--rollback-from): nothing compared
    chunks_sampled: int = 0      # chunks of the target read to check it holds the base
    target_bytes_read: int = 0   # bytes read from the target

    def as_dict(self) -> dict:
        return asdict(self)


class TargetMismatch(BadInputError):
    """The target does not hold the point --rollback-from names."""


def make_rollback_target(target: str, force: bool = False, fmt: str | None = None,
                         credentials_file: str | None = None) -> RestoreTarget:
    """The in-place target for what the user named: a block device or a vddk://
    disk (``--force`` required, as for any restore that overwrites one), or an
    existing raw image file (the rollback option is the confirmation)."""
    if target.startswith("vddk://") or _is_block_device(target, fmt):
        return make_target(target, force, fmt, credentials_file)
    if target_format(target, fmt) != "raw":
        raise BadInputError(f"a rollback writes raw images, block devices and vddk:// disks in place; "
                            f"{target} would be a {target_format(target, fmt)} image: restore it whole instead")
    return InPlaceFileTarget(target)


def rollback_backup(repo: Repository, ref: str, out: RestoreTarget, base_ref: str | None = None,
                    compare: bool = False, workers: int | None = None, samples: int = DEFAULT_SAMPLES,
                    on_start: Callable[[BackupRecord, int], None] | None = None,
                    on_progress: Callable[[int], None] | None = None) -> RestoreResult:
    """Restore ``ref`` onto ``out``, which holds ``base_ref`` (or, with
    ``compare``, anything): only the chunks that differ are written."""
    from engine.pipeline import default_workers
    if (base_ref is None) == (not compare):
        raise UsageError("a rollback needs exactly one of --rollback-from ID2 and --rollback-compare")
    if not out.in_place:
        raise BadInputError(f"{out.target} cannot be rolled back in place")
    workers = workers or default_workers() * 2  # as restore_backup
    out.check()
    store = repo.store
    with store.read_txn() as txn:
        record = repo.catalog.resolve(txn, ref)
        manifest = repo.manifests.get(txn, record.key, record.id, record)
        base = old = None
        if base_ref is not None:
            base = repo.catalog.resolve(txn, base_ref)
            if base.disk != record.disk:
                raise UsageError(f"--rollback-from {base.id} is a point of disk {base.disk}, {record.id} one of "
                                 f"{record.disk}: name the point of {record.disk} the target holds, or use "
                                 "--rollback-compare, which reads the target instead")
            old = repo.manifests.get(txn, base.key, base.id, base)
        stats = RollbackStats("compare" if compare else "from", base.id if base else None, manifest.n_chunks)
        out.open(manifest.size)  # a device or disk too small for the point is refused here
        wrote, windows = False, None
        try:
            if compare:
                out.fit(manifest.size)
                windows = compare_windows(repo, txn, record, manifest, out, workers, stats, on_progress)
            else:
                plan = _FromPlan(repo, txn, record, manifest, base, old, resizes=out.resizes)
                _check_holds_base(out, plan, samples, stats)
                out.fit(manifest.size)
                windows = plan.windows(stats, on_progress)
            if on_start:
                on_start(record, manifest.size)
            wrote = True
            counts = _write_all(repo, txn, record, manifest, out, workers, None, windows, "bv-rollback")
            out.finish()
        except BaseException as e:
            if windows is not None:
                windows.close()  # stops --rollback-compare's readers
            _join_orphans()
            out.discard()
            if wrote and not isinstance(e, KeyboardInterrupt):  # signals.py words the interrupted case
                raise _stopped(e, out.target, base.id if base else None, record.id) from None
            raise
    stats.chunks_skipped = manifest.n_chunks - counts[1]
    result = RestoreResult(record, out.target, *counts, warnings=list(out.warnings))
    result.rollback = stats
    return result


def _join_orphans() -> None:
    """Wait for this rollback's pool threads that no pool will join.

    A signal that lands while ThreadPoolExecutor starts a worker
    (``Thread.start`` waits for it) raises in the main thread after the
    thread runs but before the pool records it: shutdown() never joins that
    worker, which may still be writing when the target is closed (a VDDK
    disk then refuses to close under a running call).  The pool's shutdown
    has queued its stop marker, so each such worker ends after its item."""
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and t.name.startswith(("bv-rollback", "bv-compare")):
            t.join()


def mixed_notice(target: str, base_id: str | None, new_id: str) -> str:
    held = base_id or "what it held"
    return (f"the rollback stopped part way: {target} now holds a mix of {held} and {new_id}; run the "
            f"same rollback again (or --rollback-compare) before using it")


def _stopped(e: BaseException, target: str, base_id: str | None, new_id: str) -> BaseException:
    """``e`` with the mixed-target notice added, keeping its kind (and exit code)."""
    notice = mixed_notice(target, base_id, new_id)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename and e.filename != target else ""
        return OSError(e.errno, f"{where}{e.strerror or e}; {notice}", target)
    e.args = (f"{e}; {notice}",)
    return e


class _FromPlan:
    """Which chunks differ between the base's manifest and the point's."""

    def __init__(self, repo: Repository, txn, record: BackupRecord, new: Manifest, base: BackupRecord,
                 old: Manifest, resizes: bool):
        if old.chunk_size != new.chunk_size:
            raise BadInputError(f"{base.id} has {old.chunk_size}-byte chunks, {record.id} {new.chunk_size}-byte "
                                "ones: use --rollback-compare")
        self.repo, self.txn, self.record, self.base = repo, txn, record, base
        self.new, self.old = new, old
        self.cs = new.chunk_size
        self.zero = repo.store.digester.zero_digest
        # Past the base's end a resized file reads as zeros; a device or disk
        # holds whatever it held there, so those chunks are always written.
        self.first_unknown = (new.n_chunks if resizes or new.size <= old.size else old.size // self.cs)
        self.differing = [s for s in range(len(new.segments)) if not self._same(s)]

    def _same(self, s: int) -> bool:
        new, old = self.new, self.old
        return (s < len(old.segments) and old.segments[s] == new.segments[s]
                and s * new.seg_chunks + new.segment_length(s) <= self.first_unknown)

    def _segment(self, manifest: Manifest, record: BackupRecord, s: int):
        content = self.repo.manifests.segment(self.txn, manifest.segments[s], record.id, manifest, s)
        return segment_array(content, manifest.digest_len)

    def pair(self, s: int):
        """(the point's digests, the base's at the same chunks) for segment s, as arrays."""
        new_arr = self._segment(self.new, self.record, s)
        length = len(new_arr)
        if s < len(self.old.segments):
            old_arr = self._segment(self.old, self.base, s)[:length]
        else:
            old_arr = new_arr[:0]
        if len(old_arr) < length:  # past the base's end: zeros (a resized file reads so)
            pad = np.frombuffer(self.zero * (length - len(old_arr)), dtype=np.uint8).reshape(-1, len(self.zero))
            old_arr = np.concatenate([old_arr, pad])
        return new_arr, old_arr

    def differs(self, s: int):
        """Indices (within segment s) of the chunks to write."""
        new_arr, old_arr = self.pair(s)
        mask = np.any(new_arr != old_arr, axis=1)
        first = s * self.new.seg_chunks
        if self.first_unknown < first + len(mask):
            mask[max(0, self.first_unknown - first):] = True
        return new_arr, old_arr, np.flatnonzero(mask)

    def windows(self, stats: RollbackStats, on_progress) -> Iterator[dict[bytes, list[int]]]:
        new, cs = self.new, self.cs
        differing = set(self.differing)
        seg_bytes = new.seg_chunks * cs
        for window in range(0, len(new.segments), WINDOW_SEGMENTS):
            by_digest: dict[bytes, list[int]] = {}
            for s in range(window, min(window + WINDOW_SEGMENTS, len(new.segments))):
                if s not in differing:
                    stats.segments_skipped += 1
                else:
                    new_arr, _, idx = self.differs(s)
                    stats.chunks_compared += len(new_arr)
                    base = s * new.seg_chunks
                    for k in idx.tolist():
                        by_digest.setdefault(new_arr[k].tobytes(), []).append((base + k) * cs)
                if on_progress:
                    on_progress(min(seg_bytes, new.size - s * seg_bytes))
            yield by_digest

    def samples(self, count: int) -> list[tuple[int, set[bytes]]]:
        """Up to ``count`` chunk indices to read from the target, with the digests
        each may have: the base's, or the point's (written by an interrupted
        rollback).  The first and last chunk that differ, then random non-zero
        chunks of the base.  Only whole chunks inside both disks."""
        if count <= 0:
            return []
        limit = min(self.old.size, self.new.size, self.first_unknown * self.cs) // self.cs
        if limit == 0:
            return []
        seg = self.new.seg_chunks
        picked: dict[int, set[bytes]] = {}
        cache: dict[int, tuple] = {}

        def arrays(s):
            if s not in cache:
                cache[s] = self.pair(s)
            return cache[s]

        def take(i: int) -> None:
            if i < limit and i not in picked and len(picked) < count:
                new_arr, old_arr = arrays(i // seg)
                picked[i] = {old_arr[i % seg].tobytes(), new_arr[i % seg].tobytes()}

        if self.differing:  # the first and the last chunk to be written
            first, last = self.differing[0], self.differing[-1]
            idx = self.differs(first)[2]
            if len(idx):
                take(first * seg + int(idx[0]))
            idx = self.differs(last)[2]
            if len(idx):
                take(last * seg + int(idx[-1]))
        r = random.Random()
        segments = [s for s in range(len(self.old.segments)) if s * seg < limit and self.old.nonzero[s]]
        weights = [self.old.nonzero[s] for s in segments]
        rows: dict[int, list[int]] = {}  # per segment: its non-zero chunks inside the limit
        tries = 0
        while len(picked) < min(count, limit) and tries < 4 * count:
            tries += 1
            s = r.choices(segments, weights=weights)[0] if segments else None
            if s is not None and s not in rows:
                old_arr = arrays(s)[1]
                nonzero = np.flatnonzero(np.any(old_arr != np.frombuffer(self.zero, dtype=np.uint8), axis=1))
                rows[s] = [s * seg + int(k) for k in nonzero if s * seg + int(k) < limit]
            if s is not None and rows[s]:
                take(r.choice(rows[s]))
            else:
                take(r.randrange(limit))
        return sorted(picked.items())


def _check_holds_base(out: RestoreTarget, plan: _FromPlan, samples: int, stats: RollbackStats) -> None:
    """Refuse, before anything is written, a target that cannot hold the base."""
    base, size = plan.base, plan.old.size
    if (out.capacity != size) if out.resizes else (out.capacity < size):
        rule = "a file holding it has exactly that size" if out.resizes else "a device holding it is at least that large"
        raise TargetMismatch(f"{out.target} holds {out.capacity} bytes ({human_bytes(out.capacity)}), so it does not "
                             f"hold {base.id}, a disk of {size} bytes ({human_bytes(size)}; {rule}); nothing was "
                             "written. Name the point it holds, or use --rollback-compare")
    picks = plan.samples(samples)
    if not picks:
        return
    cs, digester = plan.cs, plan.repo.store.digester
    disk = out.open_reader()
    bad: list[int] = []
    try:
        buf = bytearray(cs)
        for index, accepted in picks:
            disk.read_chunks([index * cs], cs, buf)
            stats.target_bytes_read += cs
            if digester(buf) not in accepted:
                bad.append(index * cs)
    finally:
        out.close_reader(disk)
    stats.chunks_sampled = len(picks)
    if bad:
        raise TargetMismatch(
            f"{out.target} does not hold {base.id}: {len(bad)} of {len(picks)} chunks read from it (at offset "
            f"{bad[0]}{' and others' if len(bad) > 1 else ''}) match neither {base.id} nor {plan.record.id}; "
            "nothing was written. Name the point it holds, or use --rollback-compare, which reads the whole "
            "target and writes what differs")
