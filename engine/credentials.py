"""vSphere credentials: from the environment or a file, never from argv.

Command lines end up in shell history, ``ps`` output and job logs, so a
password is taken only from ``BLOCKVAULT_VSPHERE_USER`` /
``BLOCKVAULT_VSPHERE_PASSWORD`` or from a file of ``user=...`` and
``password=...`` lines (``#`` starts a comment).  ``Credentials`` hides the
password from ``repr`` so it cannot leak into a log or a traceback.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from engine.errors import BadInputError

USER_VAR = "BLOCKVAULT_VSPHERE_USER"
PASSWORD_VAR = "BLOCKVAULT_VSPHERE_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)
    source: str = "environment"
    warnings: tuple = ()


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
            text = f.read()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise BadInputError(f"cannot read credentials file {path}: {e.strerror}") from None
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
    warnings = ()
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings = (f"credentials file {path} is readable by other users; chmod 600 it",)
    return Credentials(values["user"], values["password"], source=path, warnings=warnings)
