"""Disks through VMware's VDDK (libvixDiskLib), the transport for real vSphere.

The C side (``native.open_vddk``, see native/vddk.h) loads VMware's library
at run time, connects with the backup snapshot's moref and returns the same
``Disk`` type as the raw reader: ``size``, ``extents()`` (QueryAllocatedBlocks),
``read_chunks()`` with the GIL released, ``write()`` for restores, and
``transport``, the mode VDDK actually chose (nbdssl, hotadd, san...).
``AccessBracket`` wraps a backup in PrepareForAccess/EndAccess.  This
module only finds the library, decides whether VDDK is the transport of a
run, and passes the connection's facts to the C side: the server's SHA-1
thumbprint (VDDK checks it) and the credentials, which go straight into
VDDK's connect parameters and are wiped there after use.

Where no library is installed, or the extension was built without VDDK, the
``auto`` choice falls back to datastore HTTP access (http_disk.py).
"""

from __future__ import annotations

import glob
import os

import native

from engine.vsphere.connection import Connection
from engine.vsphere.errors import VsphereError, describe_native

LIBRARY_ENV = "BLOCKVAULT_VDDK_LIBRARY"
DEFAULT_DIRS = ("/usr/lib/vmware-vix-disklib", "/usr/local/lib/vmware-vix-disklib",
                "/opt/vmware-vix-disklib-distrib")
TRANSPORTS = ("auto", "vddk", "http")


def binding_available() -> bool:
    return hasattr(native, "open_vddk")


def find_library(explicit: str | None = None) -> str | None:
    """The libvixDiskLib to load: ``explicit``, ``$BLOCKVAULT_VDDK_LIBRARY``, or
    the first installed one under VMware's usual directories."""
    chosen = explicit or os.environ.get(LIBRARY_ENV)
    if chosen:
        if not os.path.exists(chosen):
            raise VsphereError(f"VDDK library {chosen} does not exist")
        return chosen
    for base in DEFAULT_DIRS:
        for pattern in ("lib64/libvixDiskLib.so*", "libvixDiskLib.so*"):
            found = sorted(glob.glob(os.path.join(base, pattern)))
            if found:
                return found[-1]
    return None


def choose_transport(requested: str, library: str | None) -> str:
    """``vddk`` or ``http`` for a run; ``auto`` means VDDK when it is usable."""
    if requested not in TRANSPORTS:
        raise VsphereError(f"--transport {requested!r}: use vddk or http")
    if requested == "http":
        return "http"
    usable = binding_available() and library is not None
    if requested == "vddk" and not usable:
        why = ("this build of blockvault's C extension has no VDDK support" if not binding_available() else
               f"no VDDK library found (pass --vddk-library, set {LIBRARY_ENV}, or install VDDK under "
               f"{DEFAULT_DIRS[0]})")
        raise VsphereError(f"--transport vddk: {why}; --transport http reads through datastore HTTP access")
    return "vddk" if usable else "http"


def connection_args(conn: Connection, library: str | None, vm_moref: str) -> dict:
    """The keyword arguments every ``native`` VDDK call takes to reach vSphere."""
    creds = conn.credentials
    return {"library": library, "server": conn.endpoint.host, "port": conn.endpoint.port,
            "thumbprint": conn.vddk_thumbprint(), "user": creds.user, "password": creds.password,
            "vm_moref": vm_moref}


def open_disk(conn: Connection, library: str | None, vm_moref: str, snapshot_moref: str | None, disk_path: str,
              transport_modes: str | None, writable: bool = False, handles: int = 1):
    """A ``native`` Disk on a VM's disk: of the snapshot (backup), or of the VM's
    current disks when ``snapshot_moref`` is None (restore, ``writable``).
    ``handles`` VDDK connections serve parallel reads; a writable disk has one."""
    try:
        return native.open_vddk(disk_path, writable=writable, handles=1 if writable else max(1, handles),
                                snapshot_moref=snapshot_moref, transport_modes=transport_modes,
                                **connection_args(conn, library, vm_moref))
    except OSError as e:
        # native's messages name the VDDK call and error, never the credentials.
        raise VsphereError(f"VDDK could not open {disk_path} of {vm_moref}: {describe_native(e)}") from None


class AccessBracket:
    """PrepareForAccess before the snapshot, EndAccess after it is gone (vCenter only).

    They stop vCenter from migrating the VM's storage while its disks are
    read.  ESXi refuses them; a refusal is a warning, not a failure.
    """

    IDENTITY = "blockvault"

    def __init__(self, conn: Connection, library: str | None, vm_moref: str, warn):
        self.args = connection_args(conn, library, vm_moref)
        self.warn = warn
        self.prepared = False

    def prepare(self) -> None:
        try:
            native.vddk_prepare_access(self.IDENTITY, **self.args)
            self.prepared = True
        except OSError as e:
            self.warn(f"VDDK PrepareForAccess failed ({describe_native(e)}); storage migrations are not blocked "
                      "during this backup")

    def end(self) -> None:
        if not self.prepared:
            return
        try:
            native.vddk_end_access(self.IDENTITY, **self.args)
        except OSError as e:
            self.warn(f"VDDK EndAccess failed ({describe_native(e)}); vCenter may keep storage migrations of this "
                      "VM disabled until it is called")
