"""Change lists: which chunks of a disk a backup must read.

Every source of "what to read" — allocated extents for a full, a CBT
changed-areas file (vSphere's DiskChangeInfo) for an incremental — is
turned into the same thing: sorted, merged runs of chunk indices on the
store's chunk grid.  Runs, not index arrays, so a 2 TiB disk costs a few
tuples, not millions of integers.
"""

from __future__ import annotations

import json
from typing import Iterable

from engine.errors import BadInputError

Run = tuple[int, int]  # [first chunk, end chunk)


def extents_to_runs(extents: Iterable[tuple[int, int]], chunk_size: int, size: int) -> list[Run]:
    """Byte extents (start, length) → chunk runs covering them, clipped to the disk."""
    runs: list[Run] = []
    for start, length in sorted(extents):
        end = min(start + length, size)
        if length <= 0 or start >= end:
            continue
        first, last = start // chunk_size, -(-end // chunk_size)
        if runs and first <= runs[-1][1]:
            if last > runs[-1][1]:
                runs[-1] = (runs[-1][0], last)
        else:
            runs.append((first, last))
    return runs


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


def load_changed_areas(path: str, disk_size: int) -> list[tuple[int, int]]:
    """Read a DiskChangeInfo-shaped JSON file and check it against the disk.

    ``{"startOffset": 0, "length": N, "changedArea": [{"start": S, "length": L}, ...]}``;
    extents need not be chunk-aligned, but they must lie inside the disk.
    """
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise BadInputError(f"changed-areas file {path} does not exist") from None
    except IsADirectoryError:
        raise BadInputError(f"changed-areas file {path} is a directory") from None
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
    start_offset = doc.get("startOffset", 0)
    length = doc.get("length", disk_size - start_offset if isinstance(start_offset, int) else None)
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
    return extents
