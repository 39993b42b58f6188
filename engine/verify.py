"""Store verification in backup terms: which backups and offsets a bad chunk hurts.

chunkstore checks every chunk; this module adds what only the engine knows:
each manifest's segments must exist and every digest they name must be in
the index, and for every corrupt or missing chunk it lists the backups and
disk offsets that reference it, so an administrator knows what to re-run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from chunkstore.errors import IntegrityError
from chunkstore.pack import pack_relpath
from chunkstore.verify import ChunkVerifyReport, verify_chunks
from engine.manifest import segment_array
from engine.repository import Repository

MAX_OFFSETS_LISTED = 64


@dataclass
class VerifyReport:
    chunks: ChunkVerifyReport
    backups_checked: int = 0
    missing_chunks: set = field(default_factory=set)
    damaged_manifests: dict = field(default_factory=dict)     # backup id → reason
    affected: dict = field(default_factory=dict)              # digest → {backup id: [offsets]}
    store_path: str = ""

    @property
    def ok(self) -> bool:
        return self.chunks.ok and not self.missing_chunks and not self.damaged_manifests

    def as_dict(self) -> dict:
        problems = []
        reasons = {d: r for d, r in self.chunks.corrupt.items()}
        reasons.update({d: "referenced by a manifest but not in the index" for d in self.missing_chunks})
        for digest, reason in sorted(reasons.items()):
            hits = self.affected.get(digest, {})
            problems.append({
                "digest": digest.hex(), "reason": reason,
                "backups": [{"id": b, "offsets": offs[:MAX_OFFSETS_LISTED], "count": len(offs)}
                            for b, offs in sorted(hits.items())],
            })
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks.chunks_checked,
            "bytes_checked": self.chunks.bytes_checked,
            "backups_checked": self.backups_checked,
            "bad_chunks": problems,
            "missing_packs": [self._pack(pack_id=p) for p in self.chunks.missing_packs],
            "damaged_manifests": self.damaged_manifests,
            "unreferenced_packs": [self._pack(path=p) for p in self.chunks.unreferenced_packs],
        }

    def _pack(self, pack_id: str | None = None, path: str | None = None) -> dict:
        """Every pack list reports a pack the same way: its id and its file's absolute path."""
        if pack_id is None:
            pack_id = os.path.basename(path)[:-len(".pack")]
        else:
            path = os.path.join(self.store_path, pack_relpath(bytes.fromhex(pack_id)))
        return {"id": pack_id, "path": os.path.abspath(path)}


def verify_repository(repo: Repository, workers: int = 2,
                      on_total: Callable[[int], None] | None = None,
                      on_progress: Callable[[int], None] | None = None) -> VerifyReport:
    store = repo.store
    report = VerifyReport(verify_chunks(store, workers, on_total, on_progress), store_path=store.path)
    bad = set(report.chunks.corrupt)
    zero = np.frombuffer(store.digester.zero_digest, dtype=np.uint8)
    # Segments are shared between backups: inspect each one once.
    seg_hits: dict[bytes, list[tuple[int, bytes]]] = {}
    with store.read_txn() as txn:
        for record in repo.catalog.all(txn):
            report.backups_checked += 1
            try:
                manifest = repo.manifests.get(txn, record.key, record.id)
                for s, seg in enumerate(manifest.segments):
                    hits = seg_hits.get(seg)
                    if hits is None:
                        hits = seg_hits[seg] = _segment_problems(
                            repo, txn, repo.manifests.segment(txn, seg), manifest.digest_len, zero, bad, report)
                    base = s * manifest.seg_chunks * manifest.chunk_size
                    for k, digest in hits:
                        report.affected.setdefault(digest, {}).setdefault(record.id, []).append(
                            base + k * manifest.chunk_size)
            except IntegrityError as e:
                report.damaged_manifests[record.id] = str(e)
    return report


def _segment_problems(repo, txn, content: bytes, dlen: int, zero, bad: set,
                      report: VerifyReport) -> list[tuple[int, bytes]]:
    arr = segment_array(content, dlen)
    problems = []
    chunks_db = repo.store.chunks_db
    for k in np.nonzero(~(arr == zero).all(axis=1))[0]:
        digest = arr[k].tobytes()
        if digest in bad:
            problems.append((int(k), digest))
        elif txn.get(digest, db=chunks_db) is None:
            report.missing_chunks.add(digest)
            problems.append((int(k), digest))
    return problems
