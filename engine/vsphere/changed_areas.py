"""QueryChangedDiskAreas, looped over the whole disk and checked reply by reply.

One reply covers only ``[startOffset, startOffset + length)`` of the disk, and
the server decides how much (vCenter bounds replies by size and by extent
count), so a caller must loop until the capacity is covered; a caller that
asks once silently misses changes.  Every reply is also checked before it is
believed: it must start where asked, advance, stay inside the disk, and list
extents that are inside its window, sorted and not overlapping.  A reply that
breaks any of these is a server bug, and a backup built on it would be wrong
without anybody noticing, so it stops the disk's CBT use (the caller falls
back to reading allocated areas).

changeIds are opaque except for one documented rule: the part before ``/`` is
the disk's tracking UUID, and a different UUID means tracking was reset since
the saved changeId (a full read is needed).  A ``FileFault`` reply means the
same for an id the server no longer knows.
"""

from __future__ import annotations

from engine.vsphere.connection import Connection
from engine.vsphere.errors import VsphereError, describe_fault

ALL_ALLOCATED = "*"


class ChangeIdRejected(VsphereError):
    """The server does not know the changeId any more (FileFault): CBT was reset
    or the disk is not the one the changeId came from."""


class BadChangedAreas(VsphereError):
    """A QueryChangedDiskAreas reply that breaks the documented contract."""


def tracking_uuid(change_id: str | None) -> str | None:
    if not change_id or change_id == ALL_ALLOCATED:
        return None
    return change_id.split("/", 1)[0].strip()


def same_tracking(saved: str | None, current: str | None) -> bool:
    a, b = tracking_uuid(saved), tracking_uuid(current)
    return a is not None and a == b


def query_changed_areas(conn: Connection, vm, snapshot, device_key: int, capacity: int, change_id: str,
                        label: str) -> list[tuple[int, int]]:
    """Sorted, merged (start, length) byte extents changed since ``change_id``
    (``"*"``: the allocated areas) as of ``snapshot``, for the whole disk."""
    from pyVmomi import vim

    extents: list[tuple[int, int]] = []
    pos = 0
    what = f"QueryChangedDiskAreas on {label}"
    while pos < capacity:
        with conn.guard(what):
            try:
                reply = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=device_key, startOffset=pos,
                                                 changeId=change_id)
            except vim.fault.FileFault as fault:
                raise ChangeIdRejected(f"{what} refused changeId {change_id!r}: {describe_fault(fault)}") from None
        extents = _merge_reply(extents, reply, pos, capacity, what)
        pos = reply.startOffset + reply.length
    return extents


def _merge_reply(extents: list[tuple[int, int]], reply, pos: int, capacity: int,
                 what: str) -> list[tuple[int, int]]:
    start, length = reply.startOffset, reply.length
    if start != pos:
        raise BadChangedAreas(f"{what}: asked for offset {pos}, the reply starts at {start}")
    if length is None or length <= 0 or start + length > capacity:
        raise BadChangedAreas(f"{what}: reply at {start} has length {length}, which does not advance "
                              f"inside the {capacity}-byte disk")
    end = start + length
    last_end = start
    for area in reply.changedArea or []:
        a_start, a_len = area.start, area.length
        if a_len is None or a_len <= 0:
            raise BadChangedAreas(f"{what}: extent at {a_start} has length {a_len}")
        if a_start < last_end:
            raise BadChangedAreas(f"{what}: extent at {a_start} is out of order or overlaps the one before "
                                  f"(which ends at {last_end})")
        if a_start + a_len > end:
            raise BadChangedAreas(f"{what}: extent ({a_start}, {a_len}) lies outside the reply's window "
                                  f"[{start}, {end})")
        if extents and extents[-1][0] + extents[-1][1] == a_start:
            extents[-1] = (extents[-1][0], extents[-1][1] + a_len)  # split by a window edge
        else:
            extents.append((a_start, a_len))
        last_end = a_start + a_len
    return extents
