"""Disk sources: turn what the user names into an open ``native.Disk``.

A backup source is a raw image (regular file or block device), a hosted
VMDK (recognised by its content: the sparse magic ``KDMV`` or a text
descriptor, so a ``-flat.vmdk`` extent is rightly read as raw), or a
``vddk://`` URL for a disk of a vSphere VM read through VDDK.  Every kind
answers the same three questions the pipeline asks: size, allocated
extents, chunk reads.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import native

from engine.errors import BadInputError

_SPARSE_MAGIC = b"KDMV"
_DESCRIPTOR_MARK = b"# Disk DescriptorFile"


def source_kind(spec: str) -> str:
    """'vddk', 'vmdk' or 'raw' for a backup source."""
    if spec.startswith("vddk://"):
        return "vddk"
    try:
        with open(spec, "rb") as f:
            head = f.read(1024)
    except IsADirectoryError:
        raise BadInputError(f"cannot read disk image {spec}: is a directory, not a disk image") from None
    except OSError as e:
        raise BadInputError(f"cannot read disk image {spec}: {e.strerror}") from None
    if head.startswith(_SPARSE_MAGIC) or head.lstrip().startswith(_DESCRIPTOR_MARK):
        return "vmdk"
    return "raw"


IDENTITY = "blockvault"


@contextmanager
def opened_source(spec: str, credentials_file: str | None = None) -> Iterator["native.Disk"]:
    """Open a backup source read-only for the length of a job.

    For VDDK the job is bracketed by PrepareForAccess / EndAccess, which
    keep vCenter from migrating the VM's storage while it is read.
    """
    kind = source_kind(spec)
    if kind != "vddk":
        try:
            disk = native.open_vmdk(spec) if kind == "vmdk" else native.open_raw(spec)
        except OSError as e:
            detail = e.strerror or str(e)
            where = "" if spec in detail else f" {spec}"  # VMDK messages name the file already
            raise BadInputError(f"cannot read {kind} disk{where}: {detail}") from None
        with disk:
            yield disk
        return
    from engine.credentials import load_credentials
    from engine.vddk_url import parse_vddk_url
    target = parse_vddk_url(spec)
    conn = target.connection(load_credentials(credentials_file))
    try:
        native.vddk_prepare_access(IDENTITY, **conn)
    except OSError as e:
        raise BadInputError(f"VDDK PrepareForAccess for {target.vm_moref} on {target.server} failed: {e}") from None
    try:
        try:
            disk = native.open_vddk(target.disk, **conn)
        except OSError as e:
            raise BadInputError(f"cannot open {spec}: {e.strerror or e}") from None
        with disk:
            yield disk
    finally:
        native.vddk_end_access(IDENTITY, **conn)


def describe(disk) -> dict:
    """What a backup records about where its data came from (never credentials)."""
    # Absolute, so the catalog still says which file it was whatever the
    # directory the next command runs in; a vddk:// path is not a file name.
    path = disk.path if disk.kind == "vddk" or "://" in disk.path else os.path.abspath(disk.path)
    doc = {"kind": disk.kind, "path": path}
    doc.update({k: v for k, v in disk.info.items() if k in ("create_type", "transport")})
    return doc


def target_format(target: str, requested: str | None) -> str:
    if requested:
        return requested
    if target.startswith("vddk://"):
        return "vddk"
    return "vmdk" if os.path.splitext(target)[1].lower() == ".vmdk" else "raw"
