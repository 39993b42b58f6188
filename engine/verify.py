"""Store verification in backup terms: which backups and offsets a bad chunk hurts.

chunkstore checks every chunk and every pack's frame; this module adds what
only the engine knows: each catalog record must parse, each manifest must
match its checksum and its catalog record, each segment must hash to its key
and fit its manifest, and every digest they name must be in the index.  For
every corrupt or missing chunk it lists the backups and disk offsets that
reference it, so an administrator knows what is hurt, and it marks those
chunks bad (chunkstore/badmarks.py) so the next backup of the same data
stores them again; chunks a backup has stored again since are reported as
healed, with the points that use them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from chunkstore import badmarks
from chunkstore.errors import IntegrityError
from chunkstore.pack import pack_relpath
from chunkstore.registry import Registry
from chunkstore.verify import ChunkVerifyReport, verify_chunks
from engine.manifest import count_nonzero, segment_array
from engine.references import count_drift
from engine.repository import Repository

MAX_OFFSETS_LISTED = 64


@dataclass
class VerifyReport:
    chunks: ChunkVerifyReport
    backups_checked: int = 0
    missing_chunks: set = field(default_factory=set)
    damaged_manifests: dict = field(default_factory=dict)     # backup id → reason
    bad_records: list = field(default_factory=list)           # catalog BadRecord
    affected: dict = field(default_factory=dict)              # digest → {backup id: [offsets]}
    marks: badmarks.MarkResult | None = None
    store_path: str = ""
    pack_name: object = None   # the store backend's name(pack_id): a path, or an s3:// URL
    count_drift: list = field(default_factory=list)          # stored reference counts the manifests contradict
    counts_checked: bool = False                             # False on a format-2 store (it keeps none)

    @property
    def ok(self) -> bool:
        return (self.chunks.ok and not self.missing_chunks and not self.damaged_manifests
                and not self.bad_records and not self.count_drift)

    def _backups(self, digest: bytes) -> list[dict]:
        hits = self.affected.get(digest, {})
        return [{"id": b, "offsets": offs[:MAX_OFFSETS_LISTED], "count": len(offs)}
                for b, offs in sorted(hits.items())]

    def bad(self) -> dict[bytes, str]:
        reasons = {d: r for d, r in self.chunks.corrupt.items()}
        reasons.update({d: "referenced by a manifest but not in the index" for d in self.missing_chunks})
        return reasons

    def as_dict(self) -> dict:
        problems = [{"digest": digest.hex(), "reason": reason, "backups": self._backups(digest)}
                    for digest, reason in sorted(self.bad().items())]
        marks = self.marks or badmarks.MarkResult()
        healed = [{"digest": d.hex(), "reason": m.reason, "healed": m.time or None, "backups": self._backups(d)}
                  for d, m in sorted(marks.healed.items())]
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks.chunks_checked,
            "bytes_checked": self.chunks.bytes_checked,
            "backups_checked": self.backups_checked,
            "bad_chunks": problems,
            "missing_packs": [self._pack(pack_id=p) for p in self.chunks.missing_packs],
            "bad_packs": [{**self._pack(pack_id=p), "reason": r} for p, r in sorted(self.chunks.bad_packs.items())],
            "read_errors": [{**self._pack(pack_id=e["id"]), "offset": e["offset"], "length": e["length"],
                             "error": e["error"]} for e in self.chunks.read_errors],
            "damaged_manifests": self.damaged_manifests,
            "bad_records": [b.as_dict() for b in self.bad_records],
            "healed_chunks": healed,
            "marks": {"recorded": marks.recorded, "marked": marks.marked, "note": marks.note},
            "unreferenced_packs": [self._pack(path=p) for p in self.chunks.unreferenced_packs],
            "metadata_lost": self.chunks.metadata_lost,
            "counts_checked": self.counts_checked,
            "count_drift": self.count_drift,
        }

    def _pack(self, pack_id: str | None = None, path: str | None = None) -> dict:
        """Every pack list reports a pack the same way: its id and its file's absolute path."""
        if pack_id is None:
            pack_id = path.rsplit("/", 1)[-1][:-len(".pack")]
        elif self.pack_name is not None:
            path = self.pack_name(bytes.fromhex(pack_id))
        else:
            path = os.path.join(self.store_path, pack_relpath(bytes.fromhex(pack_id)))
        return {"id": pack_id, "path": path if "://" in path else os.path.abspath(path)}


def verify_repository(repo: Repository, workers: int = 2,
                      on_total: Callable[[int], None] | None = None,
                      on_progress: Callable[[int], None] | None = None,
                      mark: bool = True) -> VerifyReport:
    """Check the whole store; with ``mark``, record the bad chunks it finds
    (under the store lock, shared, if no rebuild holds it alone) so the next
    backup stores them again."""
    store = repo.store
    started = time.time()
    with Registry(store).register("verify", "verify"):  # gc unlinks nothing it is reading
        report = VerifyReport(verify_chunks(store, workers, on_total, on_progress), store_path=store.path,
                              pack_name=store.backend.name)
        with store.read_txn() as txn:
            marked = set(badmarks.all_marks(store, txn))
        _check_manifests(repo, report, set(report.chunks.corrupt) | marked)
    if repo.references.kept:  # every count recomputed from the manifests (engine/references.py)
        with store.read_txn() as txn:
            report.count_drift = count_drift(repo, txn)
        report.counts_checked = True
    if mark:
        report.marks = badmarks.update_marks(store, report.bad(), started)
    return report


def _check_manifests(repo: Repository, report: VerifyReport, watched: set) -> None:
    """Every backup's manifest and segments; where each watched (bad or
    healed) digest and each digest missing from the index is used."""
    store = repo.store
    zero = np.frombuffer(store.digester.zero_digest, dtype=np.uint8)
    # Segments are shared between backups: inspect each one once.
    seg_hits: dict[bytes, tuple[int, int, list] | IntegrityError] = {}
    with store.read_txn() as txn:
        for record in repo.catalog.all(txn, bad=report.bad_records):
            report.backups_checked += 1
            try:
                manifest = repo.manifests.get(txn, record.key, record.id, record)
                for s, seg in enumerate(manifest.segments):
                    hits = seg_hits.get(seg)
                    if hits is None:  # read paced (ManifestStore.segment, chunkstore/residency.py)
                        try:
                            content = repo.manifests.segment(txn, seg, record.id)
                            hits = (len(content) // manifest.digest_len,
                                    count_nonzero(content, store.digester.zero_digest),
                                    _segment_problems(repo, txn, content, manifest.digest_len, zero, watched,
                                                      report))
                        except IntegrityError as e:
                            hits = e
                        seg_hits[seg] = hits
                    if isinstance(hits, IntegrityError):
                        raise IntegrityError(f"{record.id}: {str(hits).split(': ', 1)[-1]}")
                    length, nonzero, problems = hits
                    if length != manifest.segment_length(s) or nonzero != manifest.nonzero[s]:
                        raise IntegrityError(
                            f"{record.id}: manifest segment {seg.hex()} (segment {s}) holds {length} digests, "
                            f"{nonzero} not zero; the manifest expects {manifest.segment_length(s)}, "
                            f"{manifest.nonzero[s]} not zero")
                    base = s * manifest.seg_chunks * manifest.chunk_size
                    for k, digest in problems:
                        report.affected.setdefault(digest, {}).setdefault(record.id, []).append(
                            base + k * manifest.chunk_size)
            except IntegrityError as e:
                report.damaged_manifests[record.id] = str(e)


def _segment_problems(repo, txn, content: bytes, dlen: int, zero, watched: set,
                      report: VerifyReport) -> list[tuple[int, bytes]]:
    arr = segment_array(content, dlen)
    problems = []
    chunks_db = repo.store.chunks_db
    for k in np.nonzero(~(arr == zero).all(axis=1))[0]:
        digest = arr[k].tobytes()
        if digest in watched:
            problems.append((int(k), digest))
        elif txn.get(digest, db=chunks_db) is None:
            report.missing_chunks.add(digest)
            problems.append((int(k), digest))
    return problems
