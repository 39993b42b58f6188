"""Key slots, key files and key exports (chunkstore/keyslots.py, keyexport.py, keysource.py):
the wrap and its associated data, a damaged slot told from a wrong passphrase, the stored
argon2 parameters, an export's per-line checks."""

import json
import os

import pytest

from chunkstore.crypto import MasterKey
from chunkstore.errors import IntegrityError, KeyRequiredError, WrongKeyError
from chunkstore.keyexport import KeyFileError, export_text, key_file_text, parse_key_file
from chunkstore.keyslots import (ARGON2_MEMORY_KIB, ARGON2_PARALLELISM, ARGON2_TIME_COST, KEY_FILE, PASSPHRASE, Slot,
                                 argon2_defaults, kek_of, new_slot)
from chunkstore.keysource import KeySource
from chunkstore.slotstore import LocalSlots

CHEAP = {"name": "argon2id", "time_cost": 1, "memory_kib": 8192, "parallelism": 1}
STORE = bytes(range(16))


class Config:
    """What KeySource.unlock reads of a StoreConfig."""

    def __init__(self, master, store_id=STORE):
        self.store_id = store_id.hex()
        self.key_check = master.check(store_id).hex()


def test_a_passphrase_slot_unwraps_with_its_passphrase_only():
    master = MasterKey.new()
    slot = new_slot(master, STORE, PASSPHRASE, b"correct horse", kdf=CHEAP)
    again = Slot.parse(slot.to_bytes(), "slot")
    assert again.unwrap(STORE, kek_of(PASSPHRASE, again.kdf, b"correct horse")) == master
    assert again.unwrap(STORE, kek_of(PASSPHRASE, again.kdf, b"correct horsf")) is None


def test_the_wrap_is_bound_to_the_store_and_the_slot_id():
    master = MasterKey.new()
    slot = new_slot(master, STORE, KEY_FILE, b"s" * 32)
    kek = kek_of(KEY_FILE, slot.kdf, b"s" * 32)
    assert slot.unwrap(STORE, kek) == master
    assert slot.unwrap(bytes(16), kek) is None                   # copied into another store
    slot.slot_id = "00" * 8                                       # renamed
    assert slot.unwrap(STORE, kek) is None


def test_a_damaged_slot_is_told_from_a_wrong_passphrase():
    slot = new_slot(MasterKey.new(), STORE, PASSPHRASE, b"pw", kdf=CHEAP)
    doc = json.loads(slot.to_bytes())
    digit = "0" if doc["wrapped"][10] != "0" else "1"
    doc["wrapped"] = doc["wrapped"][:10] + digit + doc["wrapped"][11:]
    with pytest.raises(IntegrityError, match="damaged.*checksum"):
        Slot.parse(json.dumps(doc).encode(), "keys/x.json")
    with pytest.raises(IntegrityError, match="damaged"):
        Slot.parse(b'{"format": "blockvault-key-slot", "vers', "keys/x.json")


def test_new_passphrase_slots_store_the_measured_argon2_parameters(monkeypatch):
    monkeypatch.delenv("BLOCKVAULT_ARGON2", raising=False)
    assert argon2_defaults() == {"name": "argon2id", "time_cost": ARGON2_TIME_COST,
                                 "memory_kib": ARGON2_MEMORY_KIB, "parallelism": ARGON2_PARALLELISM}
    assert ARGON2_MEMORY_KIB == 64 * 1024
    monkeypatch.setenv("BLOCKVAULT_ARGON2", "0,1,0")             # clamped to the floor
    assert argon2_defaults()["time_cost"] == 1 and argon2_defaults()["memory_kib"] == 8192
    monkeypatch.setenv("BLOCKVAULT_ARGON2", "2,9000,1")
    doc = json.loads(new_slot(MasterKey.new(), STORE, PASSPHRASE, b"pw").to_bytes())
    assert doc["kdf"]["time_cost"] == 2 and doc["kdf"]["memory_kib"] == 9000 and len(doc["kdf"]["salt"]) == 32


def test_an_export_round_trips_and_a_typo_is_found_on_its_line():
    master = MasterKey.new()
    text = export_text(master, STORE, "aes-256-gcm", "/backup/store")
    got = parse_key_file(text, "export")
    assert got.master == master and got.store_id == STORE
    lines = text.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith("3 "))
    digit = "0" if lines[row][2] != "0" else "1"
    lines[row] = lines[row][:2] + digit + lines[row][3:]
    with pytest.raises(KeyFileError, match="key line 3 .*mistyped") as e:
        parse_key_file("\n".join(lines), "export")
    assert lines[row][2:10] not in str(e.value)                  # the message never echoes key digits
    # typed back in upper case, with the comments left out: still the key
    typed = "\n".join(ln.upper() if ln[0].isdigit() else ln for ln in text.splitlines() if not ln.startswith("#"))
    assert parse_key_file(typed.replace("BLOCKVAULT KEY EXPORT 1", "blockvault key export 1"), "x").master == master


def test_a_key_file_holds_its_secret_and_nothing_else():
    secret = os.urandom(32)
    assert parse_key_file(key_file_text(secret), "f").secret == secret
    with pytest.raises(KeyFileError, match="not a blockvault key file"):
        parse_key_file("hunter2\n", "f")
    with pytest.raises(KeyFileError, match="cut short"):
        parse_key_file(key_file_text(secret)[:-10], "f")


def test_a_key_source_opens_with_the_right_slot_and_refuses_the_rest(tmp_path):
    master = MasterKey.new()
    place = LocalSlots(str(tmp_path))
    place.write(new_slot(master, STORE, PASSPHRASE, b"first", kdf=CHEAP))
    second = new_slot(master, STORE, PASSPHRASE, b"second", kdf=CHEAP)
    place.write(second)
    cfg = Config(master)
    source = KeySource(env={"BLOCKVAULT_PASSPHRASE": "second"}, prompt=False)
    assert source.unlock(cfg, place, "s") == master and source.slot_id == second.slot_id
    with pytest.raises(WrongKeyError, match="opens none of its 2 passphrase slots"):
        KeySource(env={"BLOCKVAULT_PASSPHRASE": "third"}, prompt=False).unlock(cfg, place, "s")
    with pytest.raises(KeyRequiredError, match="BLOCKVAULT_PASSPHRASE.*--passphrase-file.*--key-file"):
        KeySource(env={}, prompt=False).unlock(cfg, place, "s")
    export = tmp_path / "export"
    export.write_text(export_text(master, STORE, "aes-256-gcm", "s"))
    assert KeySource(key_file=str(export), env={}).unlock(cfg, place, "s") == master
    other = Config(master, store_id=bytes(16))
    with pytest.raises(WrongKeyError, match="key export of store 000102"):
        KeySource(key_file=str(export), env={}).unlock(other, place, "s")


def test_a_slot_that_opens_to_another_key_is_damage_not_a_wrong_passphrase(tmp_path):
    place = LocalSlots(str(tmp_path))
    place.write(new_slot(MasterKey.new(), STORE, PASSPHRASE, b"pw", kdf=CHEAP))
    with pytest.raises(IntegrityError, match="key_check"):
        KeySource(env={"BLOCKVAULT_PASSPHRASE": "pw"}, prompt=False).unlock(Config(MasterKey.new()), place, "s")
