"""One authenticated, certificate-checked session with vCenter (or ESXi).

Why each part is here:

* **Certificates.** A backup tool holds credentials that can read every disk
  of every VM, so the server is checked before anything is sent: against a
  pinned thumbprint (SHA-1, SHA-256 or SHA-512 of the certificate, as vSphere
  shows them), against a CA file, or against the system's CAs.  Only an
  explicit ``--insecure`` skips the check.  A refused certificate produces a
  message that names its SHA-256 thumbprint, so pinning it is one copy away.
  The same policy covers SOAP (pyvmomi checks the pin on every connection it
  opens) and the datastore HTTP connections (``TlsPolicy.check``).
* **Sessions.** pyvmomi's session-oriented stub logs in on first use and logs
  in again when the server says the session is gone (``NotAuthenticated``);
  it is configured for exactly one re-login or one reconnect per call, so a
  vCenter that stays down fails the run promptly instead of retrying forever.
  A keep-alive thread calls ``CurrentTime`` now and then so that a long disk
  read (which uses the session cookie, not SOAP) does not outlive an idle
  session.
* **Errors.** ``guard`` turns pyvmomi faults and socket errors into
  ``VsphereError``/``ConnectionLost`` with one readable line; credentials
  never appear in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from engine.credentials import Credentials
from engine.vsphere.errors import (NETWORK_ERRORS, CertificateError, ConnectionLost, CredentialsError,
                                   VsphereError, describe_fault)

log = logging.getLogger("blockvault.vsphere")

DEFAULT_PORT = 443
DEFAULT_TIMEOUT = 120.0  # seconds a socket may stay silent
KEEPALIVE_INTERVAL = 300.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``."""
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]/\s]+)(?::(\d{1,5}))?", text or "")
        if not m:
            raise VsphereError(f"--server {text!r} is not HOST or HOST:PORT")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise VsphereError(f"--server {text!r}: port {port} is out of range")
        return cls(host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def thumbprint(der: bytes, algorithm: str = "sha256") -> str:
    """``AA:BB:...`` as vSphere and VDDK print certificate thumbprints."""
    return ":".join(f"{b:02X}" for b in hashlib.new(algorithm, der).digest())


_PIN_ALGORITHMS = {40: "sha1", 64: "sha256", 128: "sha512"}


class TlsPolicy:
    """How the server's certificate is checked: pinned, CA file, system CAs, or not at all."""

    def __init__(self, thumbprint: str | None = None, ca_file: str | None = None, insecure: bool = False):
        if sum(bool(x) for x in (thumbprint, ca_file, insecure)) > 1:
            raise VsphereError("give only one of --thumbprint, --ca-file and --insecure")
        self.pin = None
        if thumbprint:
            pin = re.sub(r"[\s:]", "", thumbprint).lower()
            if not re.fullmatch(r"[0-9a-f]+", pin) or len(pin) not in _PIN_ALGORITHMS:
                raise VsphereError(f"--thumbprint {thumbprint!r} is not a SHA-1, SHA-256 or SHA-512 "
                                   "thumbprint in hex (colons allowed)")
            self.pin = pin
        self.ca_file = ca_file
        self.insecure = insecure

    def context(self) -> ssl.SSLContext:
        if self.pin or self.insecure:
            # The pin is checked on the certificate itself, not through a CA.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise CertificateError(f"cannot use CA file {self.ca_file}: {describe_fault(e)}") from None

    def check(self, der: bytes | None, where: str) -> None:
        """Refuse a certificate that is not the pinned one (no-op without a pin)."""
        if not self.pin:
            return
        if not der:
            raise CertificateError(f"{where} presented no certificate")
        got = hashlib.new(_PIN_ALGORITHMS[len(self.pin)], der).hexdigest()
        if got != self.pin:
            raise CertificateError(
                f"{where} presented a certificate whose {_PIN_ALGORITHMS[len(self.pin)].upper()} thumbprint is "
                f"{thumbprint(der, _PIN_ALGORITHMS[len(self.pin)])}, not the pinned one; refusing to connect"
            )


def fetch_certificate(endpoint: Endpoint, policy: TlsPolicy, timeout: float) -> bytes:
    """Connect once, check the certificate under ``policy``, return it (DER).

    Done before any credential is sent, and it is what gives the clear
    messages: unreachable server, untrusted certificate (with its thumbprint).
    """
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as e:
        raise ConnectionLost(f"cannot reach vCenter {endpoint}: {describe_fault(e)}") from None
    try:
        with policy.context().wrap_socket(sock, server_hostname=endpoint.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        seen = _unverified_certificate(endpoint, timeout)
        hint = (f"; its SHA-256 thumbprint is {thumbprint(seen)}: if that is your vCenter's, pass "
                "--thumbprint with it, or --ca-file with the CA that signed it" if seen else "")
        raise CertificateError(f"vCenter {endpoint} presented a certificate that is not trusted "
                               f"({e.verify_message}){hint}") from None
    except (OSError, ssl.SSLError) as e:
        raise ConnectionLost(f"TLS handshake with vCenter {endpoint} failed: {describe_fault(e)}") from None
    finally:
        sock.close()
    policy.check(der, f"vCenter {endpoint}")
    return der


def _unverified_certificate(endpoint: Endpoint, timeout: float) -> bytes | None:
    ctx = TlsPolicy(insecure=True).context()
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=endpoint.host) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


class Connection:
    """A logged-in pyvmomi ServiceInstance plus what datastore HTTP access needs."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, tls: TlsPolicy,
                 timeout: float = DEFAULT_TIMEOUT, keepalive: float = KEEPALIVE_INTERVAL):
        self.endpoint = endpoint
        self.tls = tls
        self.timeout = timeout
        self._credentials = credentials
        self._stop = threading.Event()
        self._keepalive_thread: threading.Thread | None = None
        self.certificate = fetch_certificate(endpoint, tls, timeout)
        self._login(keepalive)

    def _login(self, keepalive: float) -> None:
        from pyVim.connect import SmartStubAdapter, VimSessionOrientedStub
        from pyVmomi import vim

        creds = self._credentials
        try:
            soap = SmartStubAdapter(host=self.endpoint.host, port=self.endpoint.port, sslContext=self.tls.context(),
                                    thumbprint=self.tls.pin, httpConnectionTimeout=self.timeout)
        except NETWORK_ERRORS as e:
            raise ConnectionLost(f"cannot reach vCenter {self.endpoint}: {describe_fault(e)}") from None
        except Exception as e:  # pyVim raises a bare Exception for "not a VIM server"
            raise VsphereError(f"{self.endpoint} does not answer as a vSphere API endpoint: "
                               f"{describe_fault(e)}") from None

        def login(stub) -> None:
            vim.ServiceInstance("ServiceInstance", stub).content.sessionManager.Login(creds.user, creds.password)

        # retryCount=2: one new login after NotAuthenticated, or one new
        # connection after a network error, per call; then the error is raised.
        self._soap = soap
        self._stub = VimSessionOrientedStub(soap, login, retryDelay=0.5, retryCount=2)
        self.si = vim.ServiceInstance("ServiceInstance", self._stub)
        try:
            self.content = self.si.RetrieveContent()
            self.content.sessionManager.currentSession  # noqa: B018 - forces the login now
        except vim.fault.InvalidLogin:
            origin = "the environment" if creds.source == "environment" else creds.source
            raise CredentialsError(f"vCenter {self.endpoint} refused the login with the credentials from "
                                   f"{origin}") from None
        except NETWORK_ERRORS as e:
            raise ConnectionLost(f"lost the connection to vCenter {self.endpoint} while logging in: "
                                 f"{describe_fault(e)}") from None
        except Exception as e:  # noqa: BLE001 - any other fault: never raw (it may echo the request)
            raise VsphereError(f"logging in to vCenter {self.endpoint} failed: {describe_fault(e)}") from None
        if keepalive > 0:
            self._keepalive_thread = threading.Thread(target=self._keepalive, args=(keepalive,),
                                                      name="bv-vsphere-keepalive", daemon=True)
            self._keepalive_thread.start()

    # -- session --------------------------------------------------------------

    def _keepalive(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception as e:  # the next real call reports it
                log.debug("keep-alive to %s failed: %s", self.endpoint, describe_fault(e))

    @property
    def cookie(self) -> str:
        """``vmware_soap_session=<id>``: the session, for datastore HTTP access."""
        return (self._soap.cookie or "").split(";", 1)[0].strip()

    def refresh(self) -> None:
        """Make sure the session is alive (logs in again if the server dropped it)."""
        # CurrentTime needs no session, so the session itself is asked for:
        # None means the server forgot it, and the next read logs in again.
        with self.guard("checking the session"):
            if self.content.sessionManager.currentSession is None:
                self._stub._SetStateUnauthenticated()
                if self.content.sessionManager.currentSession is None:
                    raise ConnectionLost(f"vCenter {self.endpoint} dropped the session and a new login "
                                         "did not restore it")

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Report pyvmomi faults and network errors inside as one readable VsphereError."""
        from pyVmomi import vmodl
        try:
            yield
        except VsphereError:
            raise
        except vmodl.MethodFault as e:
            raise VsphereError(f"{what} failed on vCenter {self.endpoint}: {describe_fault(e)}") from None
        except NETWORK_ERRORS as e:
            raise ConnectionLost(f"lost the connection to vCenter {self.endpoint} while {what}: "
                                 f"{describe_fault(e)}") from None

    def wait(self, task, what: str, timeout: float | None = None):
        """Wait for a vSphere task; its result, or a VsphereError naming ``what``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        with self.guard(what):
            while True:
                info = task.info
                if info.state == "success":
                    return info.result
                if info.state == "error":
                    raise VsphereError(f"{what} failed on vCenter {self.endpoint}: {describe_fault(info.error)}")
                if deadline is not None and time.monotonic() > deadline:
                    raise VsphereError(f"{what} did not finish within {timeout:.0f} s on vCenter {self.endpoint}")
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @property
    def credentials(self) -> Credentials:
        """For VDDK's own connection (vddk_disk.py); never for messages."""
        return self._credentials

    def vddk_thumbprint(self) -> str:
        """The server certificate's SHA-1 thumbprint, the form VDDK's ConnectEx wants."""
        return thumbprint(self.certificate, "sha1")

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        try:
            self.content.sessionManager.Logout()
        except Exception as e:  # the server may be gone; nothing to clean up then
            log.debug("logout from %s failed: %s", self.endpoint, describe_fault(e))
        with contextlib.suppress(Exception):
            self._soap.DropConnections()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
