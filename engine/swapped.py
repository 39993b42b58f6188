"""Positional arguments given in the wrong order, named before anything runs.

``blockvault backup IMAGE STORE`` would otherwise fail with "IMAGE: no such
directory" (or worse, "not a store"), which does not tell the user what they
did.  A directory holding a store config is recognisable, so when STORE is
not a store and another positional is one, the message names both
arguments and the right order.  Exit code 2, a usage error.
"""

from __future__ import annotations

import os

from chunkstore.config import CONFIG_FILE
from engine.errors import UsageError


def is_store(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def _swapped(usage: str, found: dict[str, str]) -> UsageError:
    named = " and ".join(f"{value} looks like the {role}" for role, value in found.items())
    return UsageError(f"arguments in the wrong order? {named}; write: {usage}")


def check_backup(store: str, source: str, disk: str = "NAME") -> None:
    if not is_store(store) and is_store(source):
        raise _swapped(f"blockvault backup {source} {store} --disk {disk}",
                       {"STORE": source, "SOURCE (the disk image)": store})


def check_restore(store: str, backup: str, target: str) -> None:
    from engine.catalog import split_ref
    if not is_store(store):
        for value in (backup, target):
            if is_store(value):
                ref = next((v for v in (store, backup, target) if v != value and _is_ref(v, split_ref)), "DISK@N")
                rest = next((v for v in (store, backup, target) if v not in (value, ref)), "TARGET")
                raise _swapped(f"blockvault restore {value} {ref} {rest}", {"STORE": value})
        return
    if not _is_ref(backup, split_ref) and _is_ref(target, split_ref):
        raise _swapped(f"blockvault restore {store} {target} {backup}",
                       {"backup id": target, "TARGET": backup})


def check_vm_restore(store: str, backup: str) -> None:
    if not is_store(store) and is_store(backup):
        raise _swapped(f"blockvault vsphere restore {backup} {store} ...", {"STORE": backup, "VM backup id": store})


def _is_ref(text: str, split_ref) -> bool:
    try:
        split_ref(text, "backup", "DISK")
    except UsageError:
        return False
    return True
