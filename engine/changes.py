"""Change lists: which chunks of a disk a backup must read.

Every source of "what to read" — allocated extents for a full, a CBT
changed-areas file (vSphere's DiskChangeInfo) for an incremental — is
turned into the same thing: sorted, merged runs of chunk indices on the
store's chunk grid.  Runs, not index arrays, so a 2 TiB disk costs a few
tuples, not millions of integers.

A change list speaks only for the span it covers, ``[startOffset,
startOffset + length)``: what lies outside is unknown, not unchanged.  So
a list is kept with its cover (``ChangeList``), and a backup that uses one
first checks that the cover is exactly its disk (``check_cover``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

from engine import nodes
from engine.errors import BadInputError

Run = tuple[int, int]  # [first chunk, end chunk)


# Extents asked of a disk reader at a time: a backup of a disk with a
# million small extents holds this many, not a million (engine/backup.py).
EXTENT_PAGE = 4096


def runs_of(extents: Iterable[tuple[int, int]], chunk_size: int, size: int) -> Iterator[Run]:
    """Byte extents (start, length), sorted by start → chunk runs covering them,
    clipped to the disk, one at a time: memory does not grow with their number."""
    cur: Run | None = None
    for start, length in extents:
        end = min(start + length, size)
        if length <= 0 or start >= end:
            continue
        first, last = start // chunk_size, -(-end // chunk_size)
        if cur is not None and first <= cur[1]:
            if last > cur[1]:
                cur = (cur[0], last)
        else:
            if cur is not None:
                yield cur
            cur = (first, last)
    if cur is not None:
        yield cur


def extents_to_runs(extents: Iterable[tuple[int, int]], chunk_size: int, size: int) -> list[Run]:
    """Byte extents (start, length) in any order → chunk runs covering them, clipped to the disk."""
    return list(runs_of(sorted(extents), chunk_size, size))


def paged_extents(disk, page: int = EXTENT_PAGE) -> Iterator[tuple[int, int]]:
    """A disk's allocated extents in order, asked of its reader ``page`` at a
    time (``native.Disk.extents(start, max_count)``), never all at once.  A
    reader that only lists everything (the vSphere HTTP disk: its list is
    vCenter's reply, already in memory) is taken whole."""
    start = 0
    while True:
        try:
            got = disk.extents(start, page)
        except TypeError:
            if start:
                raise
            yield from sorted(disk.extents())
            return
        yield from got
        if len(got) < page:
            return
        last_start, last_length = got[-1]
        start = last_start + last_length


class DiskRuns:
    """The chunk runs of a disk's allocated extents, listed from the disk
    again each time they are iterated: a plan of a fragmented disk costs a
    page of extents, not a list of them all.  ``chunks`` is counted once."""

    def __init__(self, disk, chunk_size: int, size: int):
        self.disk, self.chunk_size, self.size = disk, chunk_size, size
        self.chunks = run_chunks(self)

    def __iter__(self) -> Iterator[Run]:
        return runs_of(paged_extents(self.disk), self.chunk_size, self.size)


def merge_runs(*lists: Iterable[Run]) -> list[Run]:
    merged: list[Run] = []
    for first, end in sorted(r for lst in lists for r in lst):
        if merged and first <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((first, end))
    return merged


def run_chunks(runs: Iterable[Run]) -> int:
    return sum(end - first for first, end in runs)


@dataclass(frozen=True)
class ChangeList:
    """Changed extents (start, length) and the span [start, end) of the disk they speak for."""

    extents: list[tuple[int, int]]
    start: int
    end: int
    origin: str  # where the list came from, for messages

    @classmethod
    def whole(cls, extents: list[tuple[int, int]], size: int, origin: str = "change list") -> "ChangeList":
        """A list known to cover the whole disk (vSphere's replies, looped over the capacity)."""
        return cls(list(extents), 0, size, origin)


def check_cover(changes: ChangeList, disk_size: int, disk_name: str) -> None:
    """Refuse a change list that does not cover exactly [0, disk_size).

    Bytes outside the cover would be taken from the base as if unchanged,
    and a list that covers less than the disk is most often another disk's
    (or one reply of a looped QueryChangedDiskAreas)."""
    if changes.start == 0 and changes.end == disk_size:
        return
    if changes.start > 0:
        gap = (f"the first {changes.start} bytes are not covered (startOffset {changes.start}): "
               "is it one reply of a looped QueryChangedDiskAreas? Merge every reply, from offset 0, "
               "into one list")
    else:
        gap = (f"its length {changes.end} is not the disk's size {disk_size}: "
               "is it the change list of another disk?")
    raise BadInputError(
        f"{changes.origin} covers bytes [{changes.start}, {changes.end}) of disk {disk_name}, which is "
        f"{disk_size} bytes; {gap}. Outside what it covers a change list says nothing, so it cannot be "
        f"used: give one with startOffset 0 and length {disk_size}, or leave out --changed-areas "
        "(every allocated extent is then read, and only the chunks the store lacks are stored)")


def load_changed_areas(path: str, disk_size: int) -> ChangeList:
    """Read a DiskChangeInfo-shaped JSON file and check it against the disk.

    ``{"startOffset": 0, "length": N, "changedArea": [{"start": S, "length": L}, ...]}``;
    extents need not be chunk-aligned or sorted, but they must lie inside the
    cover, and the cover inside the disk.  ``length`` is required: without
    it the file does not say what it speaks for.  Whether the cover is the
    whole disk is checked when the list is used (``check_cover``), since a
    disk that was resized since its base does not use the list at all.
    """
    try:
        fd, _ = nodes.open_for_reading(path, block_devices=False)
        with open(fd, "rb") as f:
            doc = json.loads(f.read())
    except nodes.WrongNode as e:
        raise BadInputError(f"changed-areas file {path} is {e.kind}, not a regular file; save the change "
                            "list to a file and name that") from None
    except FileNotFoundError:
        raise BadInputError(f"changed-areas file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"changed-areas file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise BadInputError(f"cannot read changed-areas file {path}: {e.strerror}") from None

    def bad(what: str) -> BadInputError:
        return BadInputError(
            f"changed-areas file {path}: {what}; expected "
            '{"startOffset": 0, "length": N, "changedArea": [{"start": S, "length": L}, ...]}'
        )

    if not isinstance(doc, dict) or not isinstance(doc.get("changedArea"), list):
        raise bad("no 'changedArea' list")
    if "length" not in doc:
        raise bad(f"no 'length': a change list must say which span of the disk it covers "
                  f"(for this disk startOffset 0 and length {disk_size})")
    start_offset, length = doc.get("startOffset", 0), doc["length"]
    for name, value in (("startOffset", start_offset), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"'{name}' must be a non-negative integer, not {value!r}")
    cover_end = start_offset + length
    if cover_end > disk_size:
        raise bad(f"it covers bytes up to {cover_end}, past the end of the disk ({disk_size} bytes); "
                  "is it the change list of another disk?")
    extents = []
    for i, area in enumerate(doc["changedArea"]):
        if not isinstance(area, dict):
            raise bad(f"changedArea[{i}] is not an object")
        s, n = area.get("start"), area.get("length")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, n)) or s < 0 or n < 0:
            raise bad(f"changedArea[{i}] needs non-negative integer 'start' and 'length', got {area!r}")
        if s < start_offset or s + n > cover_end:
            raise bad(f"changedArea[{i}] (start {s}, length {n}) lies outside the covered range "
                      f"[{start_offset}, {cover_end}) of the disk's {disk_size} bytes")
        if n:
            extents.append((s, n))
    return ChangeList(extents, start_offset, cover_end, f"changed-areas file {path}")
