"""The backup snapshot: taken for one run, always removed, recognised if left behind.

Every run reads its disks from a snapshot of its own, so the data, the saved
configuration and the new changeIds describe one instant.  The snapshot is
taken without memory (a crash-consistent image; ``quiesce`` asks VMware Tools
for a file-system-consistent one) and is removed at the end of the run,
successful or not.

A run that was killed cannot remove its snapshot, and a VM that keeps a
snapshot grows a redo log without end and blocks some transports.  So every
snapshot this tool takes has the same name, ``SNAPSHOT_NAME``, and the next
run removes any snapshot of that name before taking its own (VMware's
programming guide gives the same advice).  Snapshots with other names are
never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from engine.vsphere.connection import Connection
from engine.vsphere.errors import VsphereError

SNAPSHOT_NAME = "blockvault-backup"

log = logging.getLogger("blockvault.vsphere")


def walk(trees):
    """Every VirtualMachineSnapshotTree of a snapshot forest, depth first."""
    for tree in trees or []:
        yield tree
        yield from walk(tree.childSnapshotList)


def leftovers(conn: Connection, vm, vm_name: str, name: str = SNAPSHOT_NAME) -> list:
    with conn.guard(f"listing the snapshots of VM {vm_name}"):
        info = vm.snapshot
        return [t for t in walk(info.rootSnapshotList if info else None) if t.name == name]


def remove_leftovers(conn: Connection, vm, vm_name: str, name: str = SNAPSHOT_NAME) -> list[str]:
    """Remove this tool's snapshots left by earlier runs; one warning per snapshot."""
    warnings = []
    for tree in leftovers(conn, vm, vm_name, name):
        created = tree.createTime.isoformat(timespec="seconds") if tree.createTime else "an unknown time"
        remove(conn, vm, vm_name, tree.snapshot, f"snapshot {name!r} ({tree.snapshot._moId}, taken {created})")
        warnings.append(f"removed snapshot {name!r} of VM {vm_name} taken {created} and left behind by an "
                        "earlier backup run that did not finish")
    return warnings


def other_snapshots(conn: Connection, vm, vm_name: str, name: str = SNAPSHOT_NAME) -> list[str]:
    """Names of the VM's snapshots that are not this tool's."""
    with conn.guard(f"listing the snapshots of VM {vm_name}"):
        info = vm.snapshot
        return [t.name for t in walk(info.rootSnapshotList if info else []) if t.name != name]


def create(conn: Connection, vm, vm_name: str, quiesce: bool = False, name: str = SNAPSHOT_NAME):
    """Take the run's snapshot (memory off); returns its managed object."""
    description = (f"blockvault backup in progress (pid {os.getpid()} on {socket.gethostname()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}); the next backup removes it if this one dies")
    with conn.guard(f"requesting a snapshot of VM {vm_name}"):
        task = vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=quiesce)
    snap = conn.wait(task, f"creating snapshot {name!r} of VM {vm_name}")
    if snap is None:
        raise VsphereError(f"creating snapshot {name!r} of VM {vm_name} returned no snapshot")
    return snap


def remove(conn: Connection, vm, vm_name: str, snap, what: str) -> None:
    """RemoveSnapshot_Task without children: the disks are consolidated, nothing else goes."""
    with conn.guard(f"removing {what} of VM {vm_name}"):
        task = snap.RemoveSnapshot_Task(removeChildren=False)
    conn.wait(task, f"removing {what} of VM {vm_name}")
    log.debug("removed %s of VM %s", what, vm_name)
