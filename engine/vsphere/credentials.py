"""Who blockvault logs in to vCenter as, and where that comes from.

Credentials are never accepted on the command line: argv is world-readable
through /proc and lands in shell histories and process listings.  They come
from the environment (``BLOCKVAULT_VSPHERE_USER``, ``BLOCKVAULT_VSPHERE_PASSWORD``)
or from a file named with ``--credentials``, and they live in one
``Credentials`` object whose ``repr`` hides both values, so an accidental log
line or traceback cannot print them.  Nothing here writes them anywhere.

The file holds ``key = value`` lines (``#`` starts a comment)::

    user = backup@vsphere.local
    password = s3cret

A file that other users may read is used, with a warning: it is the
administrator's file, but they should know.
"""

from __future__ import annotations

import logging
import os
import stat

from engine.vsphere.errors import CredentialsError

ENV_USER = "BLOCKVAULT_VSPHERE_USER"
ENV_PASSWORD = "BLOCKVAULT_VSPHERE_PASSWORD"

log = logging.getLogger("blockvault.vsphere")


class Credentials:
    """A user name and password that refuse to be printed."""

    __slots__ = ("user", "password", "origin")

    def __init__(self, user: str, password: str, origin: str):
        self.user = user
        self.password = password
        self.origin = origin  # "the environment" or "FILE": for messages, never the values

    def __repr__(self) -> str:
        return f"Credentials(from {self.origin})"

    __str__ = __repr__


def from_environment(env: dict | None = None) -> Credentials:
    env = os.environ if env is None else env
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    missing = [name for name, value in ((ENV_USER, user), (ENV_PASSWORD, password)) if not value]
    if missing:
        raise CredentialsError(
            f"no vSphere credentials: set {ENV_USER} and {ENV_PASSWORD} in the environment, or pass "
            f"--credentials FILE (a file with 'user = ...' and 'password = ...' lines); "
            f"not set: {', '.join(missing)}"
        )
    return Credentials(user, password, "the environment")


def from_file(path: str) -> Credentials:
    try:
        with open(path, "r", encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {path} does not exist") from None
    except IsADirectoryError:
        raise CredentialsError(f"credentials file {path} is a directory") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"credentials file {path} is not UTF-8 text") from None
    except OSError as e:
        raise CredentialsError(f"cannot read credentials file {path}: {e.strerror}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("credentials file %s can be read by other users; chmod 600 it", path)
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("user", "password"):
            # The line is not echoed: it may be a password written the wrong way.
            raise CredentialsError(
                f"credentials file {path}, line {number}: expected 'user = NAME' or 'password = SECRET'"
            )
        values[key] = value.strip()
    if not values.get("user") or "password" not in values:
        raise CredentialsError(f"credentials file {path} needs both a 'user = ...' and a 'password = ...' line")
    return Credentials(values["user"], values["password"], path)


def load(path: str | None) -> Credentials:
    """From ``path`` when given, else from the environment."""
    return from_file(path) if path else from_environment()
