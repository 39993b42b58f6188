"""``vddk://`` URLs: one string naming a vSphere disk read (or written) through VDDK.

    vddk://HOST[:PORT]/VM-MOREF?disk=[DATASTORE] DIR/NAME.vmdk
        [&snapshot=SNAPSHOT-MOREF] [&transport=nbdssl:nbd] [&thumbprint=AA:BB:...]
        [&library=/usr/lib/vmware-vix-disklib]

Credentials are not part of the URL (it ends up in logs and in the
catalog): they come from the environment or a credentials file.  Without
``snapshot`` the VM's current disk is opened, which is what a restore
writes to.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import native

from engine.credentials import Credentials, load_credentials, redact
from engine.errors import BadInputError

_KEYS = {"disk", "snapshot", "transport", "thumbprint", "library"}


@dataclass(frozen=True)
class VddkTarget:
    server: str
    port: int
    vm_moref: str
    disk: str
    snapshot: str | None = None
    transport: str | None = None
    thumbprint: str | None = None
    library: str | None = None

    def connection(self, creds: Credentials) -> dict:
        return dict(library=self.library, server=self.server, port=self.port, thumbprint=self.thumbprint,
                    user=creds.user, password=creds.password, vm_moref=self.vm_moref,
                    snapshot_moref=self.snapshot, transport_modes=self.transport)


def parse_vddk_url(url: str) -> VddkTarget:
    parts = urlsplit(url)
    usage = ("write it as vddk://HOST[:PORT]/VM-MOREF?disk=[datastore] dir/disk.vmdk"
             "[&snapshot=snapshot-N][&transport=nbdssl:nbd][&thumbprint=..][&library=..]")
    if parts.scheme != "vddk" or not parts.hostname:
        raise BadInputError(f"{url!r} is not a vddk:// URL; {usage}")
    if parts.username or parts.password:
        raise BadInputError("credentials do not belong in a vddk:// URL; set BLOCKVAULT_VSPHERE_USER and "
                            "BLOCKVAULT_VSPHERE_PASSWORD or pass --credentials FILE")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - _KEYS
    if unknown:
        raise BadInputError(f"vddk URL has unknown parameter(s) {', '.join(sorted(unknown))}; {usage}")
    one = {k: v[-1] for k, v in query.items()}
    moref = unquote(parts.path.strip("/"))
    if not moref or "/" in moref:
        raise BadInputError(f"vddk URL needs the VM's moref as its path (e.g. /vm-42); {usage}")
    if not one.get("disk"):
        raise BadInputError(f"vddk URL needs disk=[datastore] path/disk.vmdk; {usage}")
    try:
        port = parts.port or 443
    except ValueError:
        raise BadInputError(f"vddk URL has a bad port; {usage}") from None
    return VddkTarget(parts.hostname, port, moref, one["disk"], one.get("snapshot") or None,
                      one.get("transport") or None, one.get("thumbprint") or None, one.get("library") or None)


def open_vddk_url(url: str, credentials_file: str | None = None, writable: bool = False):
    target = parse_vddk_url(url)
    try:
        return native.open_vddk(target.disk, writable=writable,
                                **target.connection(load_credentials(credentials_file)))
    except OSError as e:  # VDDK's text may repeat the credentials it was given
        raise OSError(e.errno, redact(e.strerror or str(e))) from None
