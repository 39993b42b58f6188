"""Where the key of an encrypted store comes from, and how it opens the store.

Never argv (a command line is readable by every user of the host through
``ps`` and /proc): a passphrase comes from ``BLOCKVAULT_PASSPHRASE``, from
``--passphrase-file FILE``, or from a prompt when stdin is a terminal; a key
file (a key-file slot's secret, or a ``key export``) from ``--key-file FILE``
or ``BLOCKVAULT_KEY_FILE``.  The options win over the environment.  With
none of them and no terminal, opening an encrypted store is refused
(KeyRequiredError, exit 2) with the list of ways to give the key: a
nightly job must not hang on a prompt nobody sees.

The key is looked for only once config.json says the store is encrypted,
since the slots it tries are the store's: a KeySource is handed to
ChunkStore.open (``keys=``) and asked to ``unlock`` there.  It keeps what
it unlocked, so one command opening the same store twice asks once.
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
import sys

from chunkstore.crypto import MasterKey, constant_time_equal
from chunkstore.errors import IntegrityError, KeyRequiredError, StoreError, WrongKeyError
from chunkstore.keyexport import KeyMaterial, read_key_file
from chunkstore.keyslots import KEY_FILE, PASSPHRASE, kek_of

log = logging.getLogger("blockvault.keys")


class PassphraseError(StoreError):
    """A passphrase file that is missing or empty, or two prompts that differ."""


def read_passphrase_file(path: str, what: str) -> bytes:
    """The passphrase in ``path`` (one trailing newline dropped), as UTF-8 bytes."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(64 << 10)
    except FileNotFoundError:
        raise PassphraseError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise PassphraseError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("%s %s can be read by other users (mode %o): chmod 600 it", what, path, stat.S_IMODE(st.st_mode))
    data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    if not data:
        raise PassphraseError(f"{what} {path} is empty; write the passphrase in it")
    return data


def _tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


class KeySource:
    """One store's key sources: the options and environment names of one side of a command
    (``copy`` has two: ``--key-file`` and ``--dst-key-file``, BLOCKVAULT_ and BLOCKVAULT_DST_)."""

    def __init__(self, passphrase_file: str | None = None, key_file: str | None = None, env=None,
                 env_prefix: str = "BLOCKVAULT_", option_prefix: str = "--", prompt: bool = True):
        self.passphrase_file = passphrase_file
        self.key_file = key_file
        self.env = os.environ if env is None else env
        self.env_prefix = env_prefix
        self.option_prefix = option_prefix
        self.prompt = prompt
        self.slot_id: str | None = None    # the slot that opened the store (None: a key export)
        self._unlocked: dict[str, tuple[MasterKey, str | None]] = {}

    def __repr__(self) -> str:
        return "KeySource(<secret>)"

    def unlocked(self, store_id: str) -> MasterKey | None:
        """The master key this source unlocked for store ``store_id`` (hex), if it did."""
        got = self._unlocked.get(store_id)
        return got[0] if got else None

    # -- what was given ---------------------------------------------------------------------

    def options(self) -> str:
        p, e = self.option_prefix, self.env_prefix
        return (f"{e}PASSPHRASE, {p}passphrase-file FILE, {p}key-file FILE (a key file or a key export), "
                f"{e}KEY_FILE, or run it on a terminal to type the passphrase")

    def given(self) -> bool:
        """Whether any source other than the prompt is set."""
        e = self.env_prefix
        return bool(self.key_file or self.passphrase_file or self.env.get(f"{e}PASSPHRASE")
                    or self.env.get(f"{e}KEY_FILE"))

    def _material(self, location: str):
        """("key", KeyMaterial, where) or ("passphrase", bytes, where)."""
        p, e = self.option_prefix, self.env_prefix
        if self.key_file:
            return "key", read_key_file(self.key_file, f"{p}key-file"), f"{p}key-file {self.key_file}"
        if self.passphrase_file:
            return ("passphrase", read_passphrase_file(self.passphrase_file, f"{p}passphrase-file"),
                    f"the passphrase in {p}passphrase-file {self.passphrase_file}")
        if self.env.get(f"{e}PASSPHRASE"):
            return "passphrase", self.env[f"{e}PASSPHRASE"].encode(), f"the passphrase in {e}PASSPHRASE"
        if self.env.get(f"{e}KEY_FILE"):
            path = self.env[f"{e}KEY_FILE"]
            return "key", read_key_file(path, f"{e}KEY_FILE"), f"{e}KEY_FILE {path}"
        if self.prompt and _tty():
            typed = getpass.getpass(f"passphrase of {location}: ")
            if not typed:
                raise KeyRequiredError(f"store {location} is encrypted and no passphrase was typed")
            return "passphrase", typed.encode(), "the passphrase typed"
        raise KeyRequiredError(f"store {location} is encrypted and no key was given: give it with "
                               f"{self.options()}; never on the command line")

    # -- opening ----------------------------------------------------------------------------

    def unlock(self, config, slots, location: str) -> MasterKey:
        """The master key of the store whose ``config`` (StoreConfig) and slot place
        (chunkstore/slotstore.py) are given; WrongKeyError when what was given opens none of
        its slots, IntegrityError when a slot opened but holds another key."""
        if config.store_id in self._unlocked:
            master, self.slot_id = self._unlocked[config.store_id]
            return master
        store_id = bytes.fromhex(config.store_id)
        kind, material, where = self._material(location)
        if kind == "key" and material.master is not None:
            master, slot_id = self._from_export(material, config, where, location), None
        else:
            master, slot_id = self._from_slots(kind, material, config, slots, where, location)
        if not constant_time_equal(master.check(store_id), bytes.fromhex(config.key_check)):
            raise IntegrityError(f"store {location}: key slot {slot_id} opened, but the key it holds is not the one "
                                 "config.json's key_check names: the slot or config.json is damaged (run "
                                 "'blockvault rebuild --config' if config.json was edited)")
        self._unlocked[config.store_id] = (master, slot_id)
        self.slot_id = slot_id
        return master

    def _from_export(self, material: KeyMaterial, config, where: str, location: str) -> MasterKey:
        if material.store_id.hex() != config.store_id:
            raise WrongKeyError(f"{where} is the key export of store {material.store_id.hex()}, not of store "
                                f"{location} ({config.store_id})")
        if not constant_time_equal(material.master.check(material.store_id), bytes.fromhex(config.key_check)):
            raise WrongKeyError(f"{where}: the key does not open store {location} (its check differs)")
        return material.master

    def _from_slots(self, kind: str, material, config, slots, where: str, location: str):
        wanted = KEY_FILE if kind == "key" else PASSPHRASE
        secret = material.secret if kind == "key" else material
        found, damaged = slots.load()
        candidates = [s for s in found if s.kind == wanted]
        store_id = bytes.fromhex(config.store_id)
        for slot in candidates:
            if slot.store_id != config.store_id:
                damaged.append(f"key slot {slot.slot_id} belongs to store {slot.store_id}, not this one")
                continue
            master = slot.unwrap(store_id, kek_of(slot.kind, slot.kdf, secret))
            if master is not None:
                log.debug("store %s opened with key slot %s", location, slot.slot_id)
                return master, slot.slot_id
        what = "passphrase" if wanted == PASSPHRASE else "key-file"
        if candidates:
            msg = (f"store {location}: {where} opens none of its {len(candidates)} {what} slot"
                   f"{'' if len(candidates) == 1 else 's'} (wrong {'passphrase' if wanted == PASSPHRASE else 'key file'}"
                   f"{', or a key file whose slot was removed' if wanted == KEY_FILE else ''})")
        else:
            others = ", ".join(sorted({s.kind for s in found})) or "none"
            msg = f"store {location} has no {what} slot (its slots: {others}); give another key"
        if damaged:
            msg += f"; {len(damaged)} slot(s) could not be tried: " + "; ".join(damaged)
        if not found and damaged:
            raise IntegrityError(msg)
        raise WrongKeyError(msg)


def new_passphrase(passphrase_file: str | None, env_name: str, option: str, env=None,
                   prompt_for: str = "") -> bytes | None:
    """A passphrase for a new slot: from ``option`` FILE, the environment variable, or typed twice on a
    terminal; None when none is given and there is no terminal."""
    env = os.environ if env is None else env
    if passphrase_file:
        return read_passphrase_file(passphrase_file, option)
    if env.get(env_name):
        return env[env_name].encode()
    if not _tty():
        return None
    first = getpass.getpass(f"new passphrase{prompt_for}: ")
    if not first:
        raise PassphraseError("an empty passphrase is refused; type one, or give a key file instead")
    if getpass.getpass("the same passphrase again: ") != first:
        raise PassphraseError("the two passphrases typed differ; nothing was changed")
    return first.encode()
