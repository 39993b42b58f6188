"""Trust, but verify: re-read a sample of the chunks CBT calls unchanged.

An incremental backup built on a wrong change list is silently wrong, and
CBT has had such bugs (VMware KB 2090639: wrong answers after a disk grew
past a 128 GB boundary; ESXi 6.0 lost changes made during snapshot
consolidation, Broadcom KB 317933).  So each CBT
incremental also reads a small random share of the chunks that CBT reports
unchanged and compares their digests with the base backup's manifest.  One
difference means the change list cannot be trusted for that disk: the caller
warns loudly and reads the whole disk instead.

The sample is drawn without listing the unchanged chunks: ranks are drawn in
"unchanged space" and mapped onto the gaps between the changed runs, so a
2 TiB disk costs memory in proportion to the sample, not to the disk.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from engine.changes import Run
from engine.manifest import Manifest

READ_BATCH = 32  # chunks per read_chunks call


@dataclass
class SampleResult:
    sampled: int = 0
    mismatched: list[int] = field(default_factory=list)   # chunk indices whose digest differs
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatched


def unchanged_count(runs: list[Run], n_chunks: int) -> int:
    return n_chunks - sum(min(end, n_chunks) - first for first, end in runs if first < n_chunks)


def draw(runs: list[Run], n_chunks: int, share: float, rng: random.Random) -> list[int]:
    """Sorted chunk indices outside ``runs`` (sorted, merged): ``ceil(share × unchanged)`` of them."""
    free = unchanged_count(runs, n_chunks)
    if share <= 0 or free <= 0:
        return []
    k = min(free, max(1, math.ceil(share * free)))
    ranks = sorted(rng.sample(range(free), k))
    gaps, pos = [], 0
    for first, end in runs:
        if first > pos:
            gaps.append((pos, min(first, n_chunks)))
        pos = max(pos, end)
    if pos < n_chunks:
        gaps.append((pos, n_chunks))
    out, r, before = [], 0, 0  # before: unchanged chunks in the gaps already passed
    for start, stop in gaps:
        while r < len(ranks) and ranks[r] < before + (stop - start):
            out.append(start + ranks[r] - before)
            r += 1
        before += stop - start
    return out


def check(disk, indices: list[int], chunk_size: int, digester, base: Manifest, load_segment) -> SampleResult:
    """Read ``indices`` through ``disk`` and compare with ``base``'s digests."""
    result = SampleResult()
    dlen = base.digest_len
    cache: dict[int, bytes] = {}
    for at in range(0, len(indices), READ_BATCH):
        batch = indices[at:at + READ_BATCH]
        buf = bytearray(len(batch) * chunk_size)
        disk.read_chunks([i * chunk_size for i in batch], chunk_size, buf)
        view = memoryview(buf)
        for j, index in enumerate(batch):
            seg = index // base.seg_chunks
            if seg not in cache:
                cache[seg] = load_segment(base.segments[seg])
            pos = (index - seg * base.seg_chunks) * dlen
            expected = cache[seg][pos:pos + dlen]
            if digester(view[j * chunk_size:(j + 1) * chunk_size]) != expected:
                result.mismatched.append(index)
        result.sampled += len(batch)
        result.bytes_read += sum(min(chunk_size, base.size - i * chunk_size) for i in batch)
    return result
