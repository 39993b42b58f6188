"""How vSphere work fails, in the engine's error family.

Everything here derives from ``engine.errors.BackupError`` so ``blockvault``'s
main loop prints the message and exits 1, as for any other expected failure.
pyvmomi faults and socket errors never reach the user raw: they are turned
into these, with a message that names the server, the object and what to do,
and never a credential (see ``describe_fault``).
"""

from __future__ import annotations

import http.client
import socket
import ssl

from engine.credentials import redact
from engine.errors import BackupError


class VsphereError(BackupError):
    """A vSphere request failed or vSphere refused what the backup needs."""


class CredentialsError(VsphereError):
    """No credentials, unreadable credentials, or credentials the server refused."""


class CertificateError(VsphereError):
    """The server's certificate is not the pinned one or not signed by the given CA."""


class ConnectionLost(VsphereError):
    """vCenter (or its datastore HTTP access) stopped answering in the middle of the work."""


NETWORK_ERRORS = (socket.error, http.client.HTTPException, ssl.SSLError, TimeoutError)


def describe_fault(exc: BaseException) -> str:
    """One line for a pyvmomi fault or a network error, without request bodies.

    ``str()`` of a pyvmomi fault prints the whole data object; only the
    message, the fault's type and the few fields that help (file names,
    the invalid property) are kept, and any credential the server repeats
    in them is struck (``redact``).
    """
    return redact(_describe(exc))


def describe_native(exc: OSError) -> str:
    """The message of an OSError from ``native`` (VDDK's error text included), struck of credentials."""
    return redact(exc.strerror or str(exc))


def _describe(exc: BaseException) -> str:
    try:
        from pyVmomi import vmodl
    except ImportError:  # pragma: no cover - pyvmomi is the vsphere extra
        vmodl = None
    if vmodl is not None and isinstance(exc, vmodl.MethodFault):
        name = type(exc).__name__
        parts = [exc.msg] if getattr(exc, "msg", None) else []
        for item in getattr(exc, "faultMessage", None) or []:
            if getattr(item, "message", None) and item.message not in parts:
                parts.append(item.message)
        for field in ("file", "invalidProperty", "name"):
            value = getattr(exc, field, None)
            if isinstance(value, str) and value:
                parts.append(f"{field} {value}")
        return f"{name}" + (f": {'; '.join(parts)}" if parts else "")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
