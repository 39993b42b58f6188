"""Key slots: the store's master key, wrapped once per way of unlocking it.

An encrypted store has one random master key (chunkstore/crypto.py) and any
number of slots, each a small JSON file that holds the master key encrypted
(AES-256-GCM) under a key-encryption key (KEK) of its own:

* a **passphrase** slot: KEK = argon2id(passphrase, salt, parameters in the
  slot).  The defaults cost about 0.5 s and 64 MiB per try on this machine
  (``python -m chunkstore.keyslots`` measures them), which is what a guesser
  pays per guess too;
* a **key-file** slot: KEK = HKDF-SHA-256(the 32 random bytes of a key file).
  No stretching is needed: the secret is random, not chosen.

Adding a passphrase is adding a slot, rotating it is adding the new one and
removing the old, and no data is re-encrypted: the master key never changes.
The wrap's associated data is "blockvault key slot 1\\0" + store id + slot
id, so a slot copied into another store, or renamed, does not unwrap.

A slot also carries a checksum of its own public fields (not a MAC: it
holds no secret).  It is what tells a wrong passphrase (the checksum holds,
the tag does not) from a damaged slot file (the checksum fails), so the
user is not sent to retype a passphrase that is right.  Slots are written
once each and never changed (docs/FORMAT.md "Key slots").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chunkstore.crypto import MASTER_SIZE, MasterKey
from chunkstore.errors import IntegrityError

SLOT_FORMAT = "blockvault-key-slot"
SLOT_VERSION = 1
KEYS_DIR = "keys"
PASSPHRASE, KEY_FILE = "passphrase", "key-file"
KINDS = (PASSPHRASE, KEY_FILE)
_WRAP_AD = b"blockvault key slot 1\0"
_KEY_FILE_INFO = b"blockvault key file slot 1\0"
SLOT_ID_SIZE = 8
SALT_SIZE = 16

# argon2id defaults, measured here (2 cores, `python -m chunkstore.keyslots`): 13 passes over
# 64 MiB with one lane take 0.52 s.  One lane: the figure does not depend on how many of a
# shared machine's cores are free, and a guesser's cost per guess is the same either way.
ARGON2_TIME_COST = 13
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 1
# Never below these, whatever BLOCKVAULT_ARGON2 asks (tests and slow machines lower the cost).
_ARGON2_FLOOR = (1, 8 * 1024, 1)
ENV_ARGON2 = "BLOCKVAULT_ARGON2"   # "TIME,MEMORY_KIB,PARALLELISM" for new passphrase slots


def argon2_defaults() -> dict:
    """The argon2id parameters of a new passphrase slot: the measured defaults, or
    BLOCKVAULT_ARGON2's (clamped to a floor)."""
    t, m, p = ARGON2_TIME_COST, ARGON2_MEMORY_KIB, ARGON2_PARALLELISM
    spec = os.environ.get(ENV_ARGON2)
    if spec:
        try:
            t, m, p = (int(x) for x in spec.split(","))
        except ValueError:
            from chunkstore.errors import ConfigError
            raise ConfigError(f"{ENV_ARGON2}={spec!r}: write TIME,MEMORY_KIB,PARALLELISM, e.g. 13,65536,1") from None
        t, m, p = max(t, _ARGON2_FLOOR[0]), max(m, _ARGON2_FLOOR[1]), max(p, _ARGON2_FLOOR[2])
    return {"name": "argon2id", "time_cost": t, "memory_kib": m, "parallelism": p}


def _argon2(passphrase: bytes, kdf: dict) -> bytes:
    from argon2.low_level import Type, hash_secret_raw
    return hash_secret_raw(passphrase, bytes.fromhex(kdf["salt"]), int(kdf["time_cost"]), int(kdf["memory_kib"]),
                           int(kdf["parallelism"]), 32, Type.ID)


def _hkdf(secret: bytes, kdf: dict) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(kdf["salt"]),
                info=_KEY_FILE_INFO).derive(secret)


def kek_of(kind: str, kdf: dict, material: bytes) -> bytes:
    """The key-encryption key of a slot: ``material`` is the passphrase (UTF-8) or the key file's secret."""
    return _argon2(material, kdf) if kind == PASSPHRASE else _hkdf(material, kdf)


def _ad(store_id: bytes, slot_id: str) -> bytes:
    return _WRAP_AD + store_id + bytes.fromhex(slot_id)


def _checksum(doc: dict) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:32]


@dataclass
class Slot:
    """One slot file's content (docs/FORMAT.md "Key slots")."""

    slot_id: str
    store_id: str
    kind: str
    kdf: dict
    nonce: str
    wrapped: str
    created: float = 0.0
    label: str = ""
    doc: dict = field(default_factory=dict, repr=False)

    def to_doc(self) -> dict:
        doc = {"format": SLOT_FORMAT, "version": SLOT_VERSION, "slot_id": self.slot_id, "store_id": self.store_id,
               "kind": self.kind, "created": self.created, "label": self.label, "kdf": self.kdf,
               "cipher": "aes-256-gcm", "nonce": self.nonce, "wrapped": self.wrapped}
        doc["checksum"] = _checksum(doc)
        return doc

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_doc(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Slot":
        """A slot from its file, or IntegrityError: unreadable, or its checksum fails (damaged)."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != SLOT_FORMAT:
                raise ValueError("not a key slot")
            if doc.get("version") != SLOT_VERSION:
                raise ValueError(f"slot version {doc.get('version')!r}, this blockvault reads {SLOT_VERSION}")
            if doc.get("checksum") != _checksum(doc):
                raise ValueError("its checksum does not match its content")
            slot = cls(str(doc["slot_id"]), str(doc["store_id"]), str(doc["kind"]), dict(doc["kdf"]),
                       str(doc["nonce"]), str(doc["wrapped"]), float(doc.get("created", 0.0)),
                       str(doc.get("label", "")), doc)
            if slot.kind not in KINDS or len(bytes.fromhex(slot.slot_id)) != SLOT_ID_SIZE:
                raise ValueError("unknown kind or malformed slot id")
            if len(bytes.fromhex(slot.nonce)) != 12 or len(bytes.fromhex(slot.wrapped)) != MASTER_SIZE + 16:
                raise ValueError("malformed nonce or wrapped key")
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"key slot {where} is damaged ({e}); remove it with 'blockvault key remove' "
                                 "once another slot opens the store") from None
        return slot

    def unwrap(self, store_id: bytes, kek: bytes) -> MasterKey | None:
        """The master key, or None when ``kek`` is not this slot's (a wrong passphrase or key file)."""
        try:
            raw = AESGCM(kek).decrypt(bytes.fromhex(self.nonce), bytes.fromhex(self.wrapped),
                                      _ad(store_id, self.slot_id))
        except InvalidTag:
            return None
        return MasterKey.from_bytes(raw)

    def public(self) -> dict:
        """What ``key list`` shows: nothing that helps a guesser beyond the KDF's cost."""
        kdf = {k: v for k, v in self.kdf.items() if k != "salt"}
        return {"id": self.slot_id, "kind": self.kind, "created": self.created, "label": self.label, "kdf": kdf}


def new_slot(master: MasterKey, store_id: bytes, kind: str, material: bytes, label: str = "",
             kdf: dict | None = None) -> Slot:
    """A new slot wrapping ``master``: ``material`` is a passphrase (UTF-8 bytes) or a key file's secret."""
    if kind == PASSPHRASE:
        kdf = dict(kdf or argon2_defaults())
    else:
        kdf = {"name": "hkdf-sha256"}
    kdf["salt"] = os.urandom(SALT_SIZE).hex()
    slot_id = os.urandom(SLOT_ID_SIZE).hex()
    nonce = os.urandom(12)
    wrapped = AESGCM(kek_of(kind, kdf, material)).encrypt(nonce, master.to_bytes(), _ad(store_id, slot_id))
    return Slot(slot_id, store_id.hex(), kind, kdf, nonce.hex(), wrapped.hex(), round(time.time(), 3), label)


def slot_file(slot_id: str) -> str:
    return f"{slot_id}.json"


def calibrate(target: float = 0.5, memory_kib: int = ARGON2_MEMORY_KIB, parallelism: int = ARGON2_PARALLELISM):
    """The argon2id time cost that takes about ``target`` seconds here, and what it took."""
    kdf = {"name": "argon2id", "salt": os.urandom(SALT_SIZE).hex(), "memory_kib": memory_kib,
           "parallelism": parallelism}
    t, took = 1, 0.0
    while True:
        kdf["time_cost"] = t
        start = time.perf_counter()
        _argon2(b"calibration", kdf)
        took = time.perf_counter() - start
        if took >= target:
            return t, took
        t = max(t + 1, int(t * target / max(took, 1e-3)))


if __name__ == "__main__":
    t, took = calibrate()
    print(f"argon2id: time_cost {t}, memory {ARGON2_MEMORY_KIB} KiB, parallelism {ARGON2_PARALLELISM}: "
          f"{took:.3f} s per unlock (default time_cost {ARGON2_TIME_COST})")
    kdf = dict(argon2_defaults(), salt=os.urandom(SALT_SIZE).hex())
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        _argon2(b"calibration", kdf)
        runs.append(time.perf_counter() - start)
    print("defaults, 5 unlocks: " + ", ".join(f"{x:.3f}" for x in runs) + " s")
