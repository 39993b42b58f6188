"""``blockvault copy``: points from one store into another, sending only what DST lacks.

The off-site copy of a nightly job.  Which points and under which numbers is
engine/copyplan.py; this module moves the data and commits, exactly as a
backup does: one write session in DST (its registration, the chains' locks,
the store lock shared), chunks claimed and written through the session, and
one ``commit_backups`` for every point, with the reference counts in the same
transaction.  Until that commit nothing is visible in DST: a failed, stopped
or killed copy leaves DST as it was (a killed one's packs are reaped by gc).

SRC is read through one manifest per point (the manifest, its checked
segments, the chunks' index entries, records grouped into contiguous pack
reads as a restore groups them: engine/restore.py ``_spans``), under a reader
registration so SRC's gc keeps every pack the copy may read.  Nothing here
opens a path of either store: only ``ChunkStore``/``Repository`` calls, so
the copy works for any store ``ChunkStore.open`` opens.

Two stores whose digest keys agree (digest kind, seed for XXH3, chunk size)
name every chunk and segment alike: a segment DST holds costs nothing, the
others are copied as they are, and only their chunks DST lacks are read
(records passed through when the zstd levels agree; from an encrypted SRC
their payloads are opened, and DST's session seals what it writes: a sealed
record is never copied as it is).  Where the keys differ (an encrypted side
always differs from a plaintext one, and two encrypted stores by their id keys)
every chunk is re-hashed for DST: decoded from SRC (its digest checked),
hashed with DST's function, and if DST lacks it compressed with DST's level.
So that a nightly copy still costs the night's change, the translation is
learnt from what DST already holds: the DST chain's newest copy pairs each of
its SRC segments and chunks with DST's (same offsets, same disk), so an
unchanged segment is translated without a read, and in a changed one only
chunks that were not at that place before are read.  A different chunk
size would need re-chunking, which copy does not do: it is refused.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from chunkstore.pack import RECORD_HEADER_SIZE
from chunkstore.registry import Registry
from engine import signals
from engine.backup import PreparedBackup, commit_backups
from engine.copyplan import CopyPlan, make_plan, origin_of, select
from engine.errors import BadInputError
from engine.manifest import Manifest
from engine.pipeline import default_workers
from engine.points import VM, Points
from engine.repository import Repository
from engine.restore import WINDOW_SEGMENTS, _spans
from engine.vsphere.vmcatalog import VmCatalog

log = logging.getLogger("blockvault.copy")

# Pack bytes one thread task reads and sends: large enough that Python's
# per-task cost vanishes next to the pread, zstd and digest calls (which
# release the GIL, so both cores work), small enough that the tasks of one
# window keep every thread busy (8 MiB tasks left a 2-thread pool idle).
TASK_BYTES = 2 << 20
MIN_TASK_BYTES = 256 << 10
# Re-hash translations kept between points (about 100 bytes each).
MAX_CHUNK_MAP = 1 << 20


@dataclass
class CopyStats:
    points_copied: int = 0
    disk_backups_copied: int = 0
    chunks_read: int = 0        # chunk records read from SRC
    bytes_read: int = 0         # their bytes (record headers included)
    chunks_sent: int = 0        # chunk records written to DST (the chunks DST lacked)
    bytes_sent: int = 0         # their bytes in DST's packs (record headers included)
    chunks_rehashed: int = 0    # chunks decoded and hashed with DST's digest
    segments_sent: int = 0      # manifest segments DST lacked

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CopyResult:
    plan: CopyPlan
    rehash: bool
    dry_run: bool
    stats: CopyStats = field(default_factory=CopyStats)


def digest_keys_differ(src, dst) -> list[str]:
    """What makes SRC's chunk names not DST's: [] when a digest means the same in both."""
    a, b = src.config, dst.config
    out = []
    if a.digest != b.digest:
        out.append(f"digest {a.digest} vs {b.digest}")
    elif a.digest != "sha256" and a.seed != b.seed:
        out.append("digest seed")
    elif a.digest == "blake3-128-keyed" and src.digester.zero_digest != dst.digester.zero_digest:
        out.append("id key")  # two encrypted stores: equal zero ids mean equal id keys
    return out


def check_pair(src: Repository, dst: Repository) -> None:
    if src.store.store_id == dst.store.store_id:
        raise BadInputError(f"SRC and DST are the same store (store id {src.store.store_id.hex()}): "
                            "copy needs another store as DST (blockvault init DIR)")
    a, b = src.store.chunk_size, dst.store.chunk_size
    if a != b:
        raise BadInputError(
            f"SRC has chunks of {a} bytes and DST of {b}: copy does not re-chunk points; make DST with "
            f"'blockvault init DIR --chunk-size {a // 1024}K'")


class _Transfer:
    """Moves one point's manifest and the chunks DST lacks into the session."""

    def __init__(self, src: Repository, dst: Repository, session, pool: ThreadPoolExecutor, workers: int,
                 stats: CopyStats, on_progress: Callable[[int], None] | None):
        self.src, self.dst, self.session, self.pool = src, dst, session, pool
        self.depth = workers * 2
        self.stats = stats
        self.on_progress = on_progress
        self.rehash = bool(digest_keys_differ(src.store, dst.store))
        self.passthrough = src.store.config.compression_level == dst.store.config.compression_level
        self.src_zero = src.store.digester.zero_digest
        self.dst_zero = dst.store.digester.zero_digest
        self.handed: dict[bytes, bytes] = {}    # segments new to DST, given to a point of this commit
        self.seg_map: dict[bytes, bytes] = {}   # re-hash: SRC segment -> DST segment
        self.chunk_map: dict[bytes, bytes] = {}  # re-hash: SRC chunk -> DST chunk
        self.base: dict[str, tuple[Manifest, Manifest]] = {}  # chain -> (SRC, DST) manifests of its newest copy

    # -- the chunks ----------------------------------------------------------

    def _tasks(self, src_txn, digests) -> list[list]:
        """SRC records of ``digests`` as contiguous pack reads of at most TASK_BYTES, grouped
        into tasks of at least MIN_TASK_BYTES (scattered records: several reads per task)."""
        store = self.src.store
        spans = _spans([(store.require(src_txn, d), d, None) for d in digests], TASK_BYTES)
        tasks, cur, size = [], [], 0
        for span in spans:
            cur.append(span)
            size += span.length
            if size >= MIN_TASK_BYTES:
                tasks.append(cur)
                cur, size = [], 0
        if cur:
            tasks.append(cur)
        return tasks

    def _send(self, spans) -> tuple[int, int, int, int, list[tuple[bytes, bytes]]]:
        """One task: read, check, (re-hash,) claim, compress, write.  Returns
        (records read, bytes read, records sent, bytes sent, SRC->DST digests)."""
        src, dst = self.src.store, self.dst.store
        raws, read, nbytes, pairs, records = [], 0, 0, [], []
        for span in spans:
            data = src.read_span(span.pack_id, span.offset, span.length)
            nbytes += span.length
            view = memoryview(data)
            for at, entry, digest, _ in span.items:
                raw = src.decode_chunk(data, at, entry, digest)
                read += 1
                if self.rehash:
                    new = dst.digester(raw)
                    pairs.append((digest, new))
                    raws.append((new, raw))
                elif self.passthrough and src.cipher is None:
                    start = at + RECORD_HEADER_SIZE
                    records.append((digest, entry.codec, entry.raw_len, view[start:start + entry.stored_len]))
                elif self.passthrough:  # sealed for its place in SRC: opened, sealed by DST's session
                    records.append((digest, entry.codec, entry.raw_len, src.open_record(data, at, entry, digest)[1]))
                else:
                    raws.append((digest, raw))
        if self.rehash:  # only now is the DST name known, so only now can DST say what it lacks
            unique = dict(raws)
            raws = [(d, unique[d]) for d in self.session.claim(unique)]
        if raws:
            encoded = dst.codec.encode_many([r for _, r in raws])
            records += [(d, codec, len(r), payload) for (d, r), (codec, payload) in zip(raws, encoded)]
        sent = self.session.write(records) if records else 0
        return read, nbytes, len(records), sent, pairs

    def _run_tasks(self, tasks) -> dict[bytes, bytes]:
        """Every task through the pool, a bounded number in flight; the SRC->DST pairs learnt."""
        learnt: dict[bytes, bytes] = {}
        inflight: deque[Future] = deque()
        st = self.stats

        def collect(fut):
            read, nbytes, n, sent, pairs = fut.result()
            st.chunks_read += read
            st.bytes_read += nbytes
            st.chunks_sent += n
            st.bytes_sent += sent
            st.chunks_rehashed += len(pairs)
            learnt.update(pairs)

        try:
            for t in tasks:
                signals.check()
                inflight.append(self.pool.submit(self._send, t))
                while len(inflight) > self.depth or (inflight and inflight[0].done()):
                    collect(inflight.popleft())
            while inflight:
                collect(inflight.popleft())
        except BaseException:
            for fut in inflight:
                fut.cancel()
            raise
        return learnt

    # -- the manifest --------------------------------------------------------

    def _dst_has_segment(self, dst_txn, digest: bytes) -> bool:
        return digest in self.handed or dst_txn.get(digest, db=self.dst.manifests.segments_db) is not None

    def _give(self, dst_txn, digest: bytes, content: bytes, new_segments: dict) -> None:
        if not self._dst_has_segment(dst_txn, digest):
            new_segments[digest] = content
            self.handed[digest] = content
            self.stats.segments_sent += 1

    def copy_point(self, src_txn, dst_txn, src_rec, m: Manifest) -> tuple[Manifest, dict[bytes, bytes]]:
        """DST's manifest of ``src_rec`` (manifest ``m``) and the segments DST lacks;
        its chunks DST lacks are written into the session on the way."""
        new_segments: dict[bytes, bytes] = {}
        segments = list(m.segments)
        cs = m.chunk_size
        for w in range(0, len(m.segments), WINDOW_SEGMENTS):
            window = range(w, min(w + WINDOW_SEGMENTS, len(m.segments)))
            if self.rehash:
                self._rehash_window(src_txn, dst_txn, src_rec, m, window, segments, new_segments)
            else:
                self._plain_window(src_txn, dst_txn, src_rec, m, window, new_segments)
            if self.on_progress:
                self.on_progress(sum(m.nonzero[s] for s in window) * cs)
        dlen = len(self.dst_zero)
        return Manifest(m.size, cs, dlen, segments, list(m.nonzero)), new_segments

    def _digests(self, content: bytes, dlen: int) -> list[bytes]:
        return [content[i:i + dlen] for i in range(0, len(content), dlen)]

    def _plain_window(self, src_txn, dst_txn, rec, m: Manifest, window, new_segments) -> None:
        need: dict[bytes, None] = {}
        for s in window:
            d = m.segments[s]
            if self._dst_has_segment(dst_txn, d):
                continue  # its chunks are DST's already
            content = self.src.manifests.segment(src_txn, d, rec.id, m, s)
            self._give(dst_txn, d, content, new_segments)
            for c in self._digests(content, m.digest_len):
                if c != self.src_zero:
                    need[c] = None
        fresh = self.session.claim(need)
        if fresh:
            self._run_tasks(self._tasks(src_txn, fresh))

    def _rehash_window(self, src_txn, dst_txn, rec, m: Manifest, window, segments, new_segments) -> None:
        base = self.base.get(rec.disk)
        todo, need = [], {}
        for s in window:
            d = m.segments[s]
            if d in self.seg_map:
                segments[s] = self.seg_map[d]
                continue
            chunks = self._digests(self.src.manifests.segment(src_txn, d, rec.id, m, s), m.digest_len)
            local = self._local_map(src_txn, dst_txn, base, s, len(chunks))
            for c in chunks:
                if c != self.src_zero and c not in local and c not in self.chunk_map:
                    need[c] = None
            todo.append((s, d, chunks, local))
        learnt = self._run_tasks(self._tasks(src_txn, need)) if need else {}
        for s, d, chunks, local in todo:
            out = []
            for c in chunks:
                if c == self.src_zero:
                    out.append(self.dst_zero)
                else:
                    out.append(local.get(c) or learnt.get(c) or self.chunk_map[c])
            content = b"".join(out)
            new = self.dst.store.digester(content)
            self._give(dst_txn, new, content, new_segments)
            self.seg_map[d] = segments[s] = new
        if len(self.chunk_map) + len(learnt) > MAX_CHUNK_MAP:
            self.chunk_map.clear()
        self.chunk_map.update(learnt)

    def _local_map(self, src_txn, dst_txn, base, s: int, length: int) -> dict[bytes, bytes]:
        """SRC -> DST digests of segment ``s`` of the chain's newest copy (same offsets)."""
        if base is None or s >= len(base[0].segments) or base[0].segment_length(s) != length:
            return {}
        a, b = base
        src_seg = self.src.manifests.segment(src_txn, a.segments[s])
        dst_seg = self.handed.get(b.segments[s]) or self.dst.manifests.segment(dst_txn, b.segments[s])
        return dict(zip(self._digests(src_seg, a.digest_len), self._digests(dst_seg, b.digest_len)))

    def learn_base(self, src_txn, dst_txn, src_points: Points, dst_points: Points, chain: str) -> None:
        """The DST chain's newest copy of a SRC point SRC still holds: the translation's start."""
        if not self.rehash or chain in self.base:
            return
        src_id = self.src.store.store_id.hex()
        for rec in reversed(list(dst_points.disks.for_disk(dst_txn, chain))):
            origin = origin_of(rec)
            if origin is None or origin["store_id"] != src_id:
                continue
            name, _, seq = origin["id"].rpartition("@")
            theirs = src_points.disks.get(src_txn, name, int(seq)) if seq.isdigit() else None
            if theirs is None:
                continue
            a = self.src.manifests.get(src_txn, theirs.key, theirs.id, theirs)
            b = self.dst.manifests.get(dst_txn, rec.key, rec.id, rec)
            self.remember(chain, a, b)
            return

    def remember(self, chain: str, a: Manifest, b: Manifest) -> None:
        if not self.rehash or len(a.segments) != len(b.segments):
            return
        self.base[chain] = (a, b)
        for x, y in zip(a.segments, b.segments):
            self.seg_map[x] = y


def copy_points(src: Repository, dst: Repository, ids: list[str], disk: str | None = None, vm: str | None = None,
                everything: bool = False, dry_run: bool = False, wait: float = 0.0, workers: int | None = None,
                on_total: Callable[[int], None] | None = None,
                on_progress: Callable[[int], None] | None = None) -> CopyResult:
    check_pair(src, dst)
    # Twice the cores, as restore: a task waits for SRC's pread and DST's pwrite part of its time.
    workers = workers or default_workers() * 2
    src_points, dst_points = Points(src), Points(dst)
    src_id, dst_id = src.store.store_id.hex(), dst.store.store_id.hex()
    with Registry(src.store).register("copy", f"copy to store {dst_id}"), src.store.read_txn() as src_txn:
        chosen = select(src_points, src_txn, ids, disk, vm, everything)
        with dst.store.read_txn() as dst_txn:
            plan = make_plan(src_points, src_txn, src_id, dst_points, dst_txn, dst_id, chosen)
        result = CopyResult(plan, bool(digest_keys_differ(src.store, dst.store)), dry_run)
        if dry_run or not plan.points:
            return result
        with dst.store.writer(wait=wait, purpose=f"copy from store {src_id}", kind="copy",
                              chains=plan.chains) as session, \
                ThreadPoolExecutor(workers, thread_name_prefix="bv-copy") as pool:
            dst_points = Points(dst)  # after the locks: what another writer committed meanwhile
            with dst.store.read_txn() as dst_txn:
                fresh = make_plan(src_points, src_txn, src_id, dst_points, dst_txn, dst_id, chosen)
                if [p.dst.id for p in fresh.points] != [p.dst.id for p in plan.points]:
                    raise BadInputError("DST changed while the copy started (another copy or backup of these "
                                        "chains committed); run the copy again")
                plan = result.plan = fresh
                manifests = {}
                for p in plan.points:
                    for s, _ in p.pairs:
                        manifests[s.id] = src.manifests.get(src_txn, s.key, s.id, s)
                if on_total:
                    on_total(sum(m.nonzero_chunks * m.chunk_size for m in manifests.values()))
                xfer = _Transfer(src, dst, session, pool, workers, result.stats, on_progress)
                prepared, more = [], []
                for p in plan.points:
                    for s, d in p.pairs:
                        xfer.learn_base(src_txn, dst_txn, src_points, dst_points, s.disk)
                        m = manifests[s.id]
                        dm, new_segments = xfer.copy_point(src_txn, dst_txn, s, m)
                        xfer.remember(s.disk, m, dm)
                        prepared.append(PreparedBackup(d, dm, new_segments, timed=False))
                        result.stats.disk_backups_copied += 1
                    if p.kind == VM:
                        more.append((None, p.dst))
                    result.stats.points_copied += 1
            signals.check()
            if more:  # VmCatalog opens (creates) its database: outside any transaction of ours
                vms = VmCatalog(dst.store)
                more = [(vms, record) for _, record in more]
            commit_backups(dst, session, prepared, more=more)
    log.debug("copied %d points, %d chunks sent", result.stats.points_copied, result.stats.chunks_sent)
    return result

