"""Disk sources: turn what the user names into an open ``native.Disk``.

A backup source is a raw image (regular file or block device), a hosted
VMDK (recognised by its content: the sparse magic ``KDMV`` or a text
descriptor, so a ``-flat.vmdk`` extent is rightly read as raw), or a
``vddk://`` URL for a disk of a vSphere VM read through VDDK.  Every kind
answers the same three questions the pipeline asks: size, allocated
extents, chunk reads.

Other containers (qcow2, QED, VDI, VHD, VHDX) are recognised by their
magic and refused: read as raw, a backup would hold the container's bytes
(its tables, its footer), not the disk, and restore them as a "disk" no
guest can boot.  A fixed VHD is the disk's bytes plus a 512-byte footer;
it is refused too (rather than read short) so that one rule holds: convert
with ``qemu-img convert -O raw`` first.  Restore targets named like those
containers are refused for the same reason (blockvault writes raw or VMDK).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from contextlib import contextmanager
from typing import Iterator

import native

from engine import nodes
from engine.errors import BadInputError

_SPARSE_MAGIC = b"KDMV"
_DESCRIPTOR_MARK = b"# Disk DescriptorFile"


# Name endings of containers a restore does not write.
CONTAINER_SUFFIXES = {".qcow2": "qcow2", ".qcow": "qcow", ".qed": "QED", ".vdi": "VDI", ".vhd": "VHD",
                      ".vhdx": "VHDX"}
_VHD_FOOTER = 512


def _fixed_vhd(tail: bytes) -> bool:
    """A VHD footer with a valid checksum (so a raw disk that merely ends in 'conectix' is not one)."""
    if len(tail) != _VHD_FOOTER or not tail.startswith(b"conectix"):
        return False
    (checksum,) = struct.unpack_from(">I", tail, 64)
    return checksum == ~(sum(tail[:64]) + sum(tail[68:])) & 0xFFFFFFFF


def container_format(head: bytes, tail: bytes) -> tuple[str, str] | None:
    """(name, qemu-img format) of a container image from its first KiB and last 512 bytes, else None."""
    if head.startswith(b"QFI\xfb"):
        version = struct.unpack_from(">I", head, 4)[0] if len(head) >= 8 else 0
        return ("qcow", "qcow") if version == 1 else ("qcow2", "qcow2")
    if head.startswith(b"QED\0"):
        return "QED", "qed"
    if head.startswith(b"vhdxfile"):
        return "VHDX", "vhdx"
    if head.startswith(b"conectix"):
        return "VHD (dynamic)", "vpc"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return "VDI", "vdi"
    if _fixed_vhd(tail):
        return "VHD (fixed)", "vpc"
    return None


def _tail(fd: int) -> bytes:
    """The last 512 bytes (where a fixed VHD keeps its footer), or b"" where there is no end to seek."""
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, _VHD_FOOTER, end - _VHD_FOOTER) if end >= 2 * _VHD_FOOTER else b""
    except OSError:
        return b""


def _converted_name(path: str) -> str:
    """Where the advice puts the converted raw image: never the source's own name."""
    stem, suffix = os.path.splitext(path)
    return stem + (".img" if suffix.lower() != ".img" else "-raw.img")


_NOT_A_DISK = {
    "a FIFO (named pipe)": "a backup reads a disk at chosen offsets and must know its size, which a pipe has "
                           "neither of: write the stream to a file first and back up the file",
    "a character device": "disks are regular files (images) or block devices such as /dev/sdb",
    "a socket": "disks are regular files (images) or block devices such as /dev/sdb",
}


def _open_file_source(spec: str) -> tuple[int, os.stat_result]:
    """fd and fstat of a raw or VMDK source, opened without blocking; other nodes are refused unopened."""
    try:
        return nodes.open_for_reading(spec, block_devices=True)
    except nodes.WrongNode as e:
        advice = _NOT_A_DISK.get(e.kind, "name a disk image or a block device")
        raise BadInputError(f"cannot read disk image {spec}: is {e.kind}, not a disk image; {advice}") from None
    except OSError as e:
        raise BadInputError(f"cannot read disk image {spec}: {e.strerror}") from None


def source_kind(spec: str, fd: int | None = None) -> str:
    """'vddk', 'vmdk' or 'raw' for a backup source (read through ``fd`` when given);
    a container image is refused."""
    if spec.startswith("vddk://"):
        return "vddk"
    own = fd is None
    if own:
        fd, _ = _open_file_source(spec)
    try:
        head = os.pread(fd, 1024, 0)
        tail = _tail(fd)
    except OSError as e:
        raise BadInputError(f"cannot read disk image {spec}: {e.strerror}") from None
    finally:
        if own:
            os.close(fd)
    if head.startswith(_SPARSE_MAGIC) or head.lstrip().startswith(_DESCRIPTOR_MARK):
        return "vmdk"
    container = container_format(head, tail)
    if container is not None:
        name, fmt = container
        fixed = " (the disk's bytes and a 512-byte footer)" if name == "VHD (fixed)" else ""
        raise BadInputError(
            f"{spec} is a {name} image{fixed}, not a raw disk or a VMDK: backed up as raw it would keep the "
            "container's bytes, not the disk's. Convert it first and back up the result: "
            f"qemu-img convert -f {fmt} -O raw {spec} {_converted_name(spec)}  (or -O vmdk)")
    return "raw"


EXTERNAL_EXTENTS_FLAG = "--allow-external-extents"
# A raw source's own fd, kept while a job reads it, by id() of its Disk (see check_not_shrunk).
_watched: dict[int, tuple[int, str]] = {}


def _open_file_disk(spec: str, kind: str, allow_external_extents: bool):
    try:
        return native.open_vmdk(spec, allow_external_extents) if kind == "vmdk" else native.open_raw(spec)
    except OSError as e:
        detail = e.strerror or str(e)
        where = "" if spec in detail else f" {spec}"  # VMDK messages name the file already
        if e.errno == errno.EPERM and "outside the descriptor's directory" in detail:
            detail += (f"; a descriptor from elsewhere can name any file (/etc/shadow, ../../x): pass "
                       f"{EXTERNAL_EXTENTS_FLAG} only if you trust it, or copy the extent beside the descriptor")
        raise BadInputError(f"cannot read {kind} disk{where}: {detail}") from None


IDENTITY = "blockvault"


@contextmanager
def opened_source(spec: str, credentials_file: str | None = None,
                  allow_external_extents: bool = False) -> Iterator["native.Disk"]:
    """Open a backup source read-only for the length of a job.

    A FIFO, socket or character device is refused before it is opened, and
    an empty disk (0 bytes) is refused: a backup of nothing is a mistake,
    not a point to restore.  For VDDK the job is bracketed by
    PrepareForAccess / EndAccess, which keep vCenter from migrating the VM's
    storage while it is read.
    """
    if not spec.startswith("vddk://"):
        fd, st = _open_file_source(spec)
        try:
            kind = source_kind(spec, fd)
            disk = _open_file_disk(spec, kind, allow_external_extents)
            with disk:
                if disk.size == 0:
                    what = "block device" if stat.S_ISBLK(st.st_mode) else "disk image"
                    raise BadInputError(f"{what} {spec} is empty (0 bytes); nothing to back up")
                if kind == "raw":
                    _watched[id(disk)] = (fd, spec)
                try:
                    yield disk
                finally:
                    _watched.pop(id(disk), None)
        finally:
            os.close(fd)
        return
    from engine.credentials import load_credentials, redact
    from engine.vddk_url import parse_vddk_url
    target = parse_vddk_url(spec)
    creds = load_credentials(credentials_file)
    conn = target.connection(creds)

    def why(e: OSError) -> str:
        """VDDK's message, struck of credentials, and where the refused ones came from."""
        text = redact(e.strerror or str(e))
        if e.errno == errno.EACCES:  # VIX_E_AUTHENTICATION_FAIL and the like
            origin = "the environment" if creds.source == "environment" else creds.source
            text += f"; check the credentials from {origin}"
        return text

    try:
        native.vddk_prepare_access(IDENTITY, **conn)
    except OSError as e:
        raise BadInputError(f"VDDK PrepareForAccess for {target.vm_moref} on {target.server} failed: "
                            f"{why(e)}") from None
    try:
        try:
            disk = native.open_vddk(target.disk, **conn)
        except OSError as e:
            raise BadInputError(f"cannot open {spec}: {why(e)}") from None
        with disk:
            yield disk
    finally:
        try:
            native.vddk_end_access(IDENTITY, **conn)
        except OSError as e:  # VDDK's text may repeat the credentials it was given
            raise OSError(e.errno, redact(e.strerror or str(e))) from None


def check_not_shrunk(disk) -> None:
    """Refuse a raw source that is now shorter than when it was opened.

    The raw reader pads reads past the end of the file with zeros (a disk
    whose size is not a multiple of the chunk size needs that), so a file
    truncated while it is read would be backed up as zeros past its new end
    and look like a success.  Checked through the job's own fd at the end
    of the read, before anything is committed."""
    watched = _watched.get(id(disk))
    if watched is None:
        return
    fd, spec = watched
    try:
        now = nodes.current_size(fd)
    except OSError as e:
        raise BadInputError(f"cannot check the size of {spec} after reading it: {e.strerror}") from None
    if now < disk.size:
        raise BadInputError(
            f"{spec} shrank from {disk.size} to {now} bytes while it was read: what lay past byte {now} would "
            "have been backed up as zeros, so nothing was stored. Back up an image that nothing writes to "
            "(a copy, a snapshot, or with its VM stopped)")


def describe(disk) -> dict:
    """What a backup records about where its data came from (never credentials).

    A file's path is made absolute: it identifies the source across runs
    started from other directories (engine/identity.py); a vddk:// path is
    not a file name."""
    path = disk.path if disk.kind == "vddk" or "://" in disk.path else os.path.abspath(disk.path)
    doc = {"kind": disk.kind, "path": path}
    doc.update({k: v for k, v in disk.info.items() if k in ("create_type", "transport")})
    return doc


def target_format(target: str, requested: str | None) -> str:
    """'raw', 'vmdk' or 'vddk' for a restore target; a container's name needs --format."""
    if requested:
        return requested
    if target.startswith("vddk://"):
        return "vddk"
    suffix = os.path.splitext(target)[1].lower()
    if suffix in CONTAINER_SUFFIXES:
        name = CONTAINER_SUFFIXES[suffix]
        fmt = {"VHD": "vpc", "VHDX": "vhdx", "VDI": "vdi", "QED": "qed"}.get(name, name)
        raw = _converted_name(target)
        raise BadInputError(
            f"restore target {target} is named like a {name} image, but blockvault writes raw images and "
            f"VMDKs only: restore to {raw} (or a .vmdk) and convert it, e.g. "
            f"qemu-img convert -f raw -O {fmt} {raw} {target}; or pass --format raw to write a raw image "
            "under this name")
    return "vmdk" if suffix == ".vmdk" else "raw"
