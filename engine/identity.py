"""What identifies a backup's source, and whether it changed along a chain.

An incremental or differential trusts that the disk it reads now is the
disk its base was read from: a change list says which bytes changed *of
that disk*.  An image of another disk backed up under the same name (a 1.5
GiB image as the next point of a 2 GiB disk's chain), a file replaced at the
same path, or a resized disk breaks that silently.  So every point records
its source's kind, absolute path, size (and a VMDK's create type), and a
backup that builds on a base compares them with every point since that base;
any difference means the change list is not used and the disk is read in
full, with a warning (engine/backup.py).
"""

from __future__ import annotations

import os

from engine.catalog import BackupRecord
from engine.sources import describe

_COMPARED = ("kind", "path", "create_type")


def source_identity(disk) -> dict:
    """The record's ``metadata["source"]``: where its data came from (never credentials)."""
    return {**describe(disk), "size": disk.size}


def differences(point: BackupRecord, identity: dict | None, size: int) -> list[str]:
    """How the source read now differs from the one ``point`` was read from ([] if it does not)."""
    found = []
    if point.size != size:
        found.append(f"size {point.size} -> {size} bytes")
    if identity is None:
        return found
    was = point.metadata.get("source") or {}
    for key in _COMPARED:
        old, new = was.get(key), identity.get(key)
        if key == "path" and old is not None and was.get("kind") != "vddk" and not os.path.isabs(old):
            continue  # recorded relative by an older version: the directory it was relative to is unknown
        if old != new:
            found.append(f"{key.replace('_', ' ')} {old or '(none)'} -> {new or '(none)'}")
    return found
