"""vSphere credentials: from the environment or a file, never from argv.

Command lines end up in shell history, ``ps`` output and job logs, so a
password is taken only from ``BLOCKVAULT_VSPHERE_USER`` /
``BLOCKVAULT_VSPHERE_PASSWORD`` or from a file of ``user=...`` and
``password=...`` lines (``#`` starts a comment) that no other user can read
(a file readable by group or others is refused).  ``Credentials`` hides the
password from ``repr`` so it cannot leak into a log or a traceback.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field

from engine.errors import BadInputError

USER_VAR = "BLOCKVAULT_VSPHERE_USER"
PASSWORD_VAR = "BLOCKVAULT_VSPHERE_PASSWORD"


REDACTED = "***"
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def _remember(secret: str | None, is_user: bool = False) -> None:
    """Note a secret for ``redact``.  A password of fewer than 3 characters,
    and a user name that is not domain-style (``@`` or ``\\``), are not
    struck: a plain name like "backup" is no secret, and too common a word
    to strike from every message (the same rule as native/vddk_library.c)."""
    if not secret or len(secret) < len(REDACTED) or (is_user and not any(c in secret for c in "@\\")):
        return
    with _secrets_lock:
        _secrets.add(secret)


def redact(text: str) -> str:
    """``text`` with every password (and domain-style user name) this process
    was given replaced by ``***``.

    Applied wherever a text we do not control enters one of our messages:
    pyvmomi faults, HTTP answers, VDDK's errors, so that a server or a
    library that repeats what it was given cannot leak it to a terminal, a
    log or ``--json`` output.
    """
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)  # longest first: one may contain another
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)
    source: str = "environment"

    def __post_init__(self) -> None:
        _remember(self.password)
        _remember(self.user, is_user=True)


def load_credentials(path: str | None = None, env=os.environ) -> Credentials:
    if path is None:
        user, password = env.get(USER_VAR), env.get(PASSWORD_VAR)
        if not user or password is None:
            raise BadInputError(
                f"no vSphere credentials: set {USER_VAR} and {PASSWORD_VAR}, or pass --credentials FILE "
                "(lines user=NAME and password=SECRET)"
            )
        return Credentials(user, password)
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            # Refused, not warned about: a warning in a nightly job's log is
            # read after the password has been readable for months.  Same rule
            # for every command (vddk:// sources and targets, vsphere).
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                raise BadInputError(f"credentials file {path} is readable by other users (mode "
                                    f"{stat.S_IMODE(mode):04o}) and holds a password: chmod 600 {path}, "
                                    "or use the environment variables")
            text = f.read()
    except OSError as e:
        raise BadInputError(f"cannot read credentials file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"credentials file {path} is not UTF-8 text") from None
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("user", "password"):
            raise BadInputError(f"credentials file {path}, line {number}: expected user=NAME or password=SECRET")
        values[key.strip()] = value.strip()
    if "user" not in values or "password" not in values:
        raise BadInputError(f"credentials file {path} needs both a user= and a password= line")
    return Credentials(values["user"], values["password"], source=path)
