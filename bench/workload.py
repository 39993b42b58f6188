"""Deterministic sparse disk images and the nightly change series T1..Tn.

A workload is one raw image file, sparse like a thin-provisioned virtual
disk, built from a seed so that every run of the benchmark (and every tool
in one run) sees exactly the same bytes:

* T1 (`Workload.create`): an image of ``size`` apparent bytes with about
  ``allocated`` bytes written, laid out as extents of 64 KiB blocks (the CBT
  granularity) spread over the disk with holes between them.  The extents
  hold a realistic mix (see `Mix`): compressible text, random (already
  compressed) data, mostly-zero structured 4 KiB pages, allocated zeros
  (written, so they occupy blocks), and duplicated extents, some aligned to
  ``align`` (4 MiB, hence to every smaller power-of-two chunk size) together
  with their source, some shifted by a few 4 KiB pages so that no fixed
  chunk grid lines them up.
* Each later night (`Workload.advance`) rewrites ``change_share`` of the
  allocated 64 KiB blocks in place, either clustered (runs of adjacent
  blocks, with hot regions such as a database or a journal taking about
  half of the writes every night) or uniformly at random; a tenth of the
  writes go into former holes; every ``grow_every`` nights the disk grows.
  Writes are whole runs of blocks (new text, random data, copies of existing
  content, zeroing) or a few 4 KiB pages per block (in-place page updates).

Every write goes through one method that also records it, so the
changed-areas file emitted per night is exactly what CBT would report:
64 KiB granularity, merged, sorted, in vSphere's DiskChangeInfo shape.  A
second file per night covers everything changed since T1 (for differential
backups).  After each night the image is scanned (`scan_image`): a digest
per 1 MiB block, the allocated bytes (SEEK_DATA/SEEK_HOLE) and a map of the
non-zero 64 KiB blocks; restores are compared against those digests.

The image is never held in memory: content is generated in 1 MiB pieces
with numpy and written with os.pwrite; holes come from ftruncate.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import xxhash

from bench.units import GiB, KiB, MiB, format_size, parse_size

BLOCK = 64 * KiB  # layout unit and CBT granularity
PAGE = 4 * KiB  # guest filesystem / database page
PIECE = 1 * MiB  # generation unit, and the block the digests cover

TEXT, RANDOM, PAGES, ZERO = "text", "random", "pages", "zero"
DATA_KINDS = (TEXT, RANDOM, PAGES)

_ZERO_PIECE = bytes(PIECE)
ZERO_DIGEST = xxhash.xxh3_128_digest(_ZERO_PIECE)


@dataclass
class Mix:
    """Shares of T1's allocated bytes per kind of content (they sum to 1)."""

    text: float = 0.34
    random: float = 0.22
    pages: float = 0.14
    zero: float = 0.10
    dup_aligned: float = 0.10
    dup_unaligned: float = 0.10

    def normalised(self) -> "Mix":
        total = sum(self.__dict__.values())
        return Mix(**{k: v / total for k, v in self.__dict__.items()})


@dataclass
class WorkloadConfig:
    size: int = 8 * GiB  # apparent size of T1
    allocated: int = 2 * GiB  # bytes written in T1
    seed: int = 1
    change_share: float = 0.02  # share of allocated 64 KiB blocks changed per night
    pattern: str = "clustered"  # or "uniform"
    align: int = 4 * MiB  # alignment of the "aligned" duplicates and their sources
    hole_share: float = 0.10  # share of a night's changed blocks written into former holes
    hot_fraction: float = 0.05  # share of T1's allocated blocks that are hot (clustered)
    hot_share: float = 0.5  # share of a clustered night's in-place writes that hit hot regions
    grow_every: int = 3  # the disk grows on nights 3, 6, 9, ... (0: never)
    grow_fraction: float = 1 / 16  # growth per event, of the current size
    mix: Mix = field(default_factory=Mix)

    def check(self) -> None:
        if self.size % MiB or self.size <= 0:
            raise ValueError("size must be a positive multiple of 1 MiB")
        if self.allocated % BLOCK or not 0 < self.allocated <= self.size // 2:
            raise ValueError("allocated must be a multiple of 64 KiB, at most half the size")
        if self.pattern not in ("clustered", "uniform"):
            raise ValueError("pattern must be 'clustered' or 'uniform'")
        if not 0 < self.change_share <= 0.5:
            raise ValueError("change share must be in (0, 0.5]")
        if self.align % BLOCK or self.align & (self.align - 1):
            raise ValueError("align must be a power of two multiple of 64 KiB")

    def describe(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "mix"}
        d["mix"] = dict(self.mix.normalised().__dict__)
        return d


# --------------------------------------------------------------------------
# Content


class Content:
    """Generates the bytes of a content stream (kind, seed) piece by piece.

    A stream's piece i depends only on (workload seed, kind, stream seed, i),
    so writing the same stream twice anywhere yields identical bytes: that
    is how duplicated extents are made without reading the image back.
    """

    def __init__(self, seed: int):
        self.seed = seed
        rng = np.random.default_rng([seed, 0x7E47])
        # A language: 8192 words with a Zipf-like frequency, then a pool of
        # 65536 sentences drawn from it.  Text pieces are random sequences of
        # pool sentences: zstd gets roughly 2.7x (64 KiB) to 3.2x (1 MiB) at
        # level 3, like real prose or logs, and generation runs near 1 GB/s.
        letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
        freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
                         2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])
        nwords = 8192
        lengths = np.clip(rng.poisson(5, nwords) + 1, 2, 14)
        flat = rng.choice(letters, int(lengths.sum()), p=freq / freq.sum()).tobytes()
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        words = [flat[bounds[i]:bounds[i + 1]] for i in range(nwords)]
        zipf = 1.0 / (np.arange(nwords) + 2.7) ** 1.07
        per_sentence = rng.integers(6, 22, 65536)
        picks = rng.choice(nwords, int(per_sentence.sum()), p=zipf / zipf.sum()).tolist()
        ends = rng.random(65536) < 0.2
        self._sentences: list[bytes] = []
        pos = 0
        for n, newline in zip(per_sentence.tolist(), ends.tolist()):
            s = b" ".join([words[i] for i in picks[pos:pos + n]])
            pos += n
            self._sentences.append(s[:1].upper() + s[1:] + (b".\n" if newline else b". "))
        self._mean_sentence = sum(map(len, self._sentences)) / len(self._sentences)

    def piece(self, kind: str, stream: int, index: int, length: int = PIECE) -> bytes:
        if kind == ZERO:
            return _ZERO_PIECE[:length]
        rng = np.random.default_rng([self.seed, stream, index])
        if kind == RANDOM:
            return rng.bytes(length)
        if kind == TEXT:
            return self._text(rng, length)
        if kind == PAGES:
            return self.pages(rng, -(-length // PAGE), base=(stream << 24) + index * (PIECE // PAGE))[:length]
        raise ValueError(f"unknown content kind {kind!r}")

    def stream(self, kind: str, stream: int, length: int) -> Iterator[tuple[int, bytes]]:
        """(offset in stream, bytes) pieces covering the first `length` bytes."""
        for index in range(-(-length // PIECE)):
            off = index * PIECE
            yield off, self.piece(kind, stream, index, min(PIECE, length - off))

    def _text(self, rng: np.random.Generator, length: int) -> bytes:
        n = int(length / self._mean_sentence * 1.1) + 8
        while True:
            picks = rng.integers(0, len(self._sentences), n).tolist()
            out = b"".join([self._sentences[i] for i in picks])
            if len(out) >= length:
                return out[:length]
            n *= 2

    @staticmethod
    def pages(rng: np.random.Generator, npages: int, base: int) -> bytes:
        """Database-like 4 KiB pages: a 28-byte header (magic, page number,
        LSN, checksum, record count, free offset), a few short records at the
        end of about two thirds of the pages, zeros in between."""
        hdr = np.zeros(npages, dtype=[("magic", "S4"), ("pageno", "<u8"), ("lsn", "<u8"),
                                      ("checksum", "<u4"), ("nrec", "<u2"), ("free", "<u2")])
        tail = rng.integers(0, 480, npages)
        tail[rng.random(npages) < 0.33] = 0
        hdr["magic"] = b"BVPG"
        hdr["pageno"] = base + np.arange(npages, dtype=np.uint64)
        hdr["lsn"] = rng.integers(1, 1 << 48, npages)
        hdr["checksum"] = rng.integers(0, 1 << 32, npages, dtype=np.uint64)
        hdr["nrec"] = (tail + 79) // 80
        hdr["free"] = PAGE - tail
        out = np.zeros((npages, PAGE), dtype=np.uint8)
        out[:, :hdr.itemsize] = hdr.view(np.uint8).reshape(npages, hdr.itemsize)
        records = rng.integers(32, 127, (npages, 480), dtype=np.uint8)
        keep = np.arange(480)[None, :] >= (480 - tail)[:, None]
        out[:, PAGE - 480:] = np.where(keep, records, 0)
        return out.tobytes()


@dataclass
class Segment:
    offset: int  # bytes from the extent's start
    kind: str
    stream: int
    length: int


@dataclass
class Extent:
    nblocks: int
    segments: list[Segment]
    role: str  # text, random, pages, zero, dup-aligned, dup-unaligned
    aligned: bool = False
    start: int = -1  # block index, set by the layout


# --------------------------------------------------------------------------
# Scanning


@dataclass
class ImageScan:
    """What a file holds, per 1 MiB block, independent of how it is stored."""

    size: int
    digests: np.ndarray  # (blocks, 16) uint8: XXH3-128 of each 1 MiB block
    nonzero64: np.ndarray  # bool per 64 KiB block: holds a non-zero byte
    allocated_bytes: int  # by SEEK_DATA/SEEK_HOLE
    seconds: float

    @property
    def nonzero_bytes(self) -> int:
        return int(self.nonzero64.sum()) * BLOCK

    def same_content(self, other: "ImageScan") -> tuple[bool, str]:
        """(identical, why not): compares sizes and every 1 MiB digest."""
        if self.size != other.size:
            return False, f"size {other.size} != expected {self.size}"
        diff = np.flatnonzero((self.digests != other.digests).any(axis=1))
        if diff.size:
            return False, (f"{diff.size} of {len(self.digests)} MiB blocks differ, "
                           f"first at offset {int(diff[0]) * PIECE}")
        return True, ""


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Allocated (offset, length) ranges of an open file, by SEEK_DATA/SEEK_HOLE."""
    out = []
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        if hole > data:
            out.append((data, hole - data))
        off = hole
    return out


def scan_image(path: str) -> ImageScan:
    """Digest every 1 MiB block of a file, reading only its allocated parts."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        nblocks = -(-size // PIECE)
        extents = data_extents(fd, size)
        touched = np.zeros(nblocks + 1, dtype=np.int32)
        for off, length in extents:
            touched[off // PIECE] += 1
            touched[-(-(off + length) // PIECE)] -= 1
        touched = np.cumsum(touched[:-1]) > 0
        digests = np.empty((nblocks, 16), dtype=np.uint8)
        digests[:] = np.frombuffer(ZERO_DIGEST, dtype=np.uint8)
        nonzero = np.zeros(nblocks * (PIECE // BLOCK), dtype=bool)
        buf = bytearray(PIECE)
        view = memoryview(buf)
        words = np.frombuffer(buf, dtype=np.uint64).reshape(PIECE // BLOCK, BLOCK // 8)
        for b in np.flatnonzero(touched).tolist():
            off = b * PIECE
            want = min(PIECE, size - off)
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], off + got)
                if n <= 0:
                    break
                got += n
            if want < PIECE:  # a last partial block: its digest covers only real bytes
                view[want:] = bytes(PIECE - want)
                digests[b] = np.frombuffer(xxhash.xxh3_128_digest(view[:want]), dtype=np.uint8)
            else:
                digests[b] = np.frombuffer(xxhash.xxh3_128_digest(view), dtype=np.uint8)
            nonzero[b * 16:(b + 1) * 16] = words.any(axis=1)
        nonzero = nonzero[: -(-size // BLOCK)]
        return ImageScan(size, digests, nonzero, sum(l for _, l in extents), time.perf_counter() - t0)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Change areas


def bitmap_runs(bits: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, merged (first block, block count) runs of a bool array."""
    idx = np.flatnonzero(bits)
    if idx.size == 0:
        return []
    cut = np.flatnonzero(np.diff(idx) != 1)
    starts = idx[np.concatenate([[0], cut + 1])]
    ends = idx[np.concatenate([cut, [idx.size - 1]])] + 1
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def write_change_info(path: str, bits: np.ndarray, size: int) -> int:
    """Writes a DiskChangeInfo-shaped file for the blocks set in `bits`;
    returns the bytes it covers."""
    areas = []
    total = 0
    for first, count in bitmap_runs(bits):
        start = first * BLOCK
        length = min(count * BLOCK, size - start)
        areas.append({"start": start, "length": length})
        total += length
    doc = {"startOffset": 0, "length": size, "changedArea": areas}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)
    return total


# --------------------------------------------------------------------------
# Nights


@dataclass
class Night:
    night: int
    size: int
    scan: ImageScan
    changed64: np.ndarray  # blocks CBT reports since the previous night (T1: allocated)
    since_full64: np.ndarray  # blocks changed since T1 (T1: allocated)
    changed_areas: str  # path of the DiskChangeInfo file since the previous night
    since_full_areas: str  # path of the DiskChangeInfo file since T1
    written_bytes: int
    hole_write_bytes: int
    grew_by: int
    generate_seconds: float

    @property
    def changed_bytes(self) -> int:
        return min(int(self.changed64.sum()) * BLOCK, self.size)

    def read_set(self, what: str) -> tuple[int, int]:
        """(bytes a step must read or write, of which non-zero) for
        'full' / 'restore' (the whole allocated image), 'incremental' (this
        night's changed areas) or 'differential' (changes since T1)."""
        nz = self.scan.nonzero64
        if what in ("full", "restore"):
            return self.scan.allocated_bytes, self.scan.nonzero_bytes
        bits = self.changed64 if what == "incremental" else self.since_full64
        if what not in ("incremental", "differential"):
            raise ValueError(what)
        return int(bits.sum()) * BLOCK, int((bits & nz).sum()) * BLOCK

    def summary(self) -> dict:
        return {
            "night": self.night,
            "size_bytes": self.size,
            "allocated_bytes": self.scan.allocated_bytes,
            "nonzero_bytes": self.scan.nonzero_bytes,
            "changed_bytes": self.changed_bytes,
            "changed_nonzero_bytes": self.read_set("incremental")[1] if self.night > 1 else None,
            "changed_areas": len(bitmap_runs(self.changed64)),
            "since_full_bytes": int(self.since_full64.sum()) * BLOCK,
            "written_bytes": self.written_bytes,
            "hole_write_bytes": self.hole_write_bytes,
            "grew_by_bytes": self.grew_by,
            "generate_seconds": round(self.generate_seconds, 3),
            "scan_seconds": round(self.scan.seconds, 3),
            "changed_areas_file": os.path.basename(self.changed_areas),
            "since_full_areas_file": os.path.basename(self.since_full_areas),
        }


class Workload:
    """One image and its night-by-night history (see the module docstring)."""

    def __init__(self, image: str, cbt_dir: str, config: WorkloadConfig):
        config.check()
        self.image = image
        self.cbt_dir = cbt_dir
        self.config = config
        self.content = Content(config.seed)
        self.rng = np.random.default_rng([config.seed, 0x1A40])
        self._next_stream = 1
        self.nights: list[Night] = []
        self.size = config.size
        self.extents: list[Extent] = []
        self._fd = -1
        self._changed = np.zeros(0, dtype=bool)
        self._written = 0
        self.alloc64 = np.zeros(0, dtype=bool)
        self.hot64 = np.zeros(0, dtype=bool)

    # -- writing ---------------------------------------------------------

    def _new_stream(self) -> int:
        self._next_stream += 1
        return self._next_stream

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """The only way bytes reach the image: also records them for CBT."""
        end = offset + len(data)
        if end > self.size:
            raise AssertionError(f"write past the end of the disk ({end} > {self.size})")
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._changed[offset // BLOCK: -(-end // BLOCK)] = True
        self._written += len(data)

    def _write_stream(self, kind: str, stream: int, length: int, offset: int) -> None:
        for off, data in self.content.stream(kind, stream, length):
            self._pwrite(data, offset + off)

    def _write_extent(self, ext: Extent) -> None:
        base = ext.start * BLOCK
        for seg in ext.segments:
            self._write_stream(seg.kind, seg.stream, seg.length, base + seg.offset)
        self.alloc64[ext.start: ext.start + ext.nblocks] = True

    # -- T1 ----------------------------------------------------------------

    def _layout(self) -> None:
        cfg = self.config
        rng = self.rng
        mix = cfg.mix.normalised()
        total_blocks = self.size // BLOCK
        want = cfg.allocated // BLOCK
        longest = max(1, min(1024, want // 8))

        def lengths(budget: int) -> list[int]:
            out = []
            while budget > 0:
                n = int(np.clip(rng.lognormal(math.log(16), 1.3), 1, longest))
                n = min(n, budget)
                out.append(n)
                budget -= n
            return out

        exts: list[Extent] = []
        for kind in (TEXT, RANDOM, PAGES, ZERO):
            for n in lengths(round(getattr(mix, kind) * want)):
                stream = 0 if kind == ZERO else self._new_stream()
                exts.append(Extent(n, [Segment(0, kind, stream, n * BLOCK)], kind))
        sources = [e for e in exts if e.role in DATA_KINDS]
        weights = np.array([e.nblocks for e in sources], dtype=float)
        weights /= weights.sum()

        def pick_source() -> Extent:
            return sources[int(rng.choice(len(sources), p=weights))]

        budget = round(mix.dup_aligned * want)
        while budget > 0:
            src = pick_source()
            src.aligned = True
            n = min(src.nblocks, budget)
            seg = src.segments[0]
            exts.append(Extent(n, [Segment(0, seg.kind, seg.stream, n * BLOCK)], "dup-aligned", aligned=True))
            budget -= n
        budget = round(mix.dup_unaligned * want)
        while budget > 0:
            src = pick_source()
            copied = min(src.nblocks, max(1, budget - 1))
            n = copied + 1
            shift = int(rng.integers(1, BLOCK // PAGE)) * PAGE
            seg = src.segments[0]
            exts.append(Extent(n, [
                Segment(0, PAGES, self._new_stream(), shift),
                Segment(shift, seg.kind, seg.stream, copied * BLOCK),
                Segment(shift + copied * BLOCK, PAGES, self._new_stream(), BLOCK - shift),
            ], "dup-unaligned"))
            budget -= n

        # Place the extents in a random order with random holes between them;
        # the first starts at block 0 (a partition table and a filesystem
        # superblock are always there).
        order = [exts[i] for i in rng.permutation(len(exts))]
        align_blocks = cfg.align // BLOCK
        used = sum(e.nblocks for e in exts)
        reserve = sum(align_blocks - 1 for e in exts if e.aligned)
        holes = total_blocks - used - reserve
        if holes < 0:
            raise ValueError(
                f"{format_size(cfg.allocated)} allocated with {format_size(cfg.align)}-aligned "
                f"duplicates does not fit in {format_size(self.size)}; use a larger size")
        gaps = rng.exponential(1.0, len(order))
        gaps[0] = 0
        gaps = np.floor(gaps / gaps.sum() * holes).astype(np.int64)
        pos = 0
        for ext, gap in zip(order, gaps.tolist()):
            pos += gap
            if ext.aligned:
                pos = -(-pos // align_blocks) * align_blocks
            ext.start = pos
            pos += ext.nblocks
        assert pos <= total_blocks
        self.extents = sorted(order, key=lambda e: e.start)

        # Hot regions: whole data extents (a database, a journal, logs).
        hot_want = cfg.hot_fraction * want
        hot = 0
        self.hot64 = np.zeros(total_blocks, dtype=bool)
        for i in rng.permutation(len(self.extents)).tolist():
            ext = self.extents[i]
            if hot >= hot_want:
                break
            if ext.role in (PAGES, TEXT) and ext.nblocks <= max(1, hot_want - hot) * 2:
                self.hot64[ext.start: ext.start + ext.nblocks] = True
                hot += ext.nblocks

    def create(self) -> Night:
        """Writes T1 (replacing any file at the path) and returns it."""
        t0 = time.perf_counter()
        os.makedirs(self.cbt_dir, exist_ok=True)
        self._layout()
        self._fd = os.open(self.image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.size)
        self._changed = np.zeros(self.size // BLOCK, dtype=bool)
        self.alloc64 = np.zeros(self.size // BLOCK, dtype=bool)
        self._written = 0
        for ext in self.extents:
            self._write_extent(ext)
        return self._finish_night(1, t0, hole_bytes=0, grew_by=0)

    # -- T2.. --------------------------------------------------------------

    def advance(self) -> Night:
        """Applies one night of changes to the image in place."""
        if not self.nights:
            raise RuntimeError("create() first")
        cfg = self.config
        night = len(self.nights) + 1
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, 0x2B17, night])
        self._changed = np.zeros(self.size // BLOCK, dtype=bool)
        self._written = 0

        allocated_blocks = int(self.alloc64.sum())
        target = max(2, round(cfg.change_share * allocated_blocks))
        to_holes = max(1, round(target * cfg.hole_share))
        in_place = target - to_holes

        grew_by = 0
        old_blocks = self.size // BLOCK
        if cfg.grow_every and night % cfg.grow_every == 0 and cfg.grow_fraction > 0:
            grew_by = max(MiB, -(-int(self.size * cfg.grow_fraction) // MiB) * MiB)
            self.size += grew_by
            os.ftruncate(self._fd, self.size)
            extra = self.size // BLOCK - old_blocks
            self._changed = np.zeros(self.size // BLOCK, dtype=bool)
            self.alloc64 = np.concatenate([self.alloc64, np.zeros(extra, dtype=bool)])
            self.hot64 = np.concatenate([self.hot64, np.zeros(extra, dtype=bool)])

        chosen = self._choose_in_place(rng, in_place)
        for first, count in bitmap_runs(chosen):
            while count > 0:  # long runs are several writes of different kinds
                n = min(count, int(rng.integers(1, 33)))
                self._rewrite(rng, first, n)
                first += n
                count -= n

        before = self._written
        if grew_by:
            self._fill_holes(rng, (to_holes + 1) // 2, lo=old_blocks)
            self._fill_holes(rng, to_holes // 2, lo=0)
        else:
            self._fill_holes(rng, to_holes, lo=0)
        return self._finish_night(night, t0, hole_bytes=self._written - before, grew_by=grew_by)

    def _choose_in_place(self, rng: np.random.Generator, count: int) -> np.ndarray:
        chosen = np.zeros(self.size // BLOCK, dtype=bool)
        alloc = np.flatnonzero(self.alloc64)
        count = min(count, alloc.size)
        if count <= 0:
            return chosen
        if self.config.pattern == "uniform":
            chosen[rng.choice(alloc, count, replace=False)] = True
            return chosen

        def runs(candidates: np.ndarray, want: int, mean_run: float) -> int:
            got = 0
            for _ in range(want * 4 + 100):
                if got >= want or candidates.size == 0:
                    break
                i = int(rng.integers(candidates.size))
                n = min(int(rng.geometric(1 / mean_run)), want - got)
                sel = candidates[i: i + n]
                got += int((~chosen[sel]).sum())
                chosen[sel] = True
            return got

        hot = np.flatnonzero(self.hot64 & self.alloc64)
        got = runs(hot, round(count * self.config.hot_share), mean_run=4)
        runs(alloc, count - got, mean_run=8)
        return chosen

    def _rewrite(self, rng: np.random.Generator, first: int, n: int) -> None:
        """One guest write over blocks [first, first + n)."""
        off = first * BLOCK
        action = rng.choice(["text", "random", "pages", "zero", "copy"], p=[0.35, 0.2, 0.3, 0.05, 0.1])
        if action == "text":
            self._write_stream(TEXT, self._new_stream(), n * BLOCK, off)
        elif action == "random":
            self._write_stream(RANDOM, self._new_stream(), n * BLOCK, off)
        elif action == "zero":
            self._write_stream(ZERO, 0, n * BLOCK, off)
        elif action == "copy":  # a file copied from elsewhere on the disk
            sources = [e for e in self.extents if e.role in DATA_KINDS]
            src = sources[int(rng.integers(len(sources)))].segments[0]
            self._write_stream(src.kind, src.stream, min(n * BLOCK, src.length), off)
        else:  # a database updates a few pages of each block in place
            for b in range(first, first + n):
                pages = rng.choice(BLOCK // PAGE, int(rng.integers(1, 5)), replace=False)
                data = Content.pages(rng, len(pages), base=int(rng.integers(1 << 40)))
                for j, p in enumerate(sorted(pages.tolist())):
                    self._pwrite(data[j * PAGE:(j + 1) * PAGE], b * BLOCK + p * PAGE)

    def _fill_holes(self, rng: np.random.Generator, count: int, lo: int) -> None:
        """New data (files created by the guest) written into former holes."""
        written = 0
        for _ in range(count * 4 + 50):
            if written >= count:
                break
            free = np.flatnonzero(~self.alloc64[lo:]) + lo
            if free.size == 0:
                break
            i = int(rng.integers(free.size))
            n = min(int(rng.geometric(1 / 16)), count - written)
            seg = free[i: i + n]
            seg = seg[: int(np.argmin(np.append(seg - seg[0] == np.arange(seg.size), False)))]
            kind = str(rng.choice(list(DATA_KINDS), p=[0.5, 0.25, 0.25]))
            self._write_stream(kind, self._new_stream(), seg.size * BLOCK, int(seg[0]) * BLOCK)
            self.alloc64[seg] = True
            written += seg.size

    # -- bookkeeping -------------------------------------------------------

    def _finish_night(self, night: int, t0: float, hole_bytes: int, grew_by: int) -> Night:
        generate = time.perf_counter() - t0
        scan = scan_image(self.image)
        changed = self._changed.copy()
        if night == 1:
            since_full = changed.copy()
        elif night == 2:
            since_full = changed.copy()
        else:
            prev = self.nights[-1].since_full64
            since_full = changed.copy()
            since_full[: prev.size] |= prev
        cbt = os.path.join(self.cbt_dir, f"changed-T{night}.json")
        cum = os.path.join(self.cbt_dir, f"changed-since-T1-T{night}.json")
        write_change_info(cbt, changed, self.size)
        write_change_info(cum, since_full, self.size)
        n = Night(night, self.size, scan, changed, since_full, cbt, cum, self._written,
                  hole_bytes, grew_by, generate)
        self.nights.append(n)
        return n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Stand-alone: `python -m bench.workload DIR --size 256M --allocated 64M --nights 3`."""
    p = argparse.ArgumentParser(prog="python -m bench.workload", description=main.__doc__)
    p.add_argument("dir")
    p.add_argument("--size", default="8G")
    p.add_argument("--allocated", default="2G")
    p.add_argument("--nights", type=int, default=3)
    p.add_argument("--change-share", type=float, default=0.02)
    p.add_argument("--pattern", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    cfg = WorkloadConfig(size=parse_size(a.size), allocated=parse_size(a.allocated), seed=a.seed,
                         change_share=a.change_share, pattern=a.pattern)
    os.makedirs(a.dir, exist_ok=True)
    with Workload(os.path.join(a.dir, "disk.img"), a.dir, cfg) as wl:
        night = wl.create()
        print(json.dumps(night.summary()))
        for _ in range(a.nights - 1):
            print(json.dumps(wl.advance().summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
