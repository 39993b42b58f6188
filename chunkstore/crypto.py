"""Encryption at rest: the store's master key and the sealing of pack records.

An encrypted store has one random master key (an encryption key and an id
key, 32 bytes each), wrapped by key slots (chunkstore/keyslots.py).  Chunk ids
are keyed BLAKE3 of the plaintext under the id key, truncated to 128 bits: a
PRF, so equal chunks still dedup inside the store while another store (another
key) cannot link them, and at 6.9 GB/s per core here (XXH3: 18 GB/s; keyed
BLAKE2b 1.05, HMAC-SHA-256 with SHA-NI 1.7; bench/crypto_ids.py) it stays off
the backup's critical path, which zstd sets.

Records are sealed with an AEAD under a per-pack subkey (HKDF-SHA-256 of the
encryption key, salted with the store id, the pack id as info), with the
record's byte offset in its pack as the nonce.  Pack ids are 128 random bits
and never reused, and an offset holds one record, so every (key, nonce) pair
is used once by construction, with no nonce stored and no birthday bound on
the number of records.  It also binds a record to its place: moved, swapped
or copied from another store, a record no longer authenticates.  The
associated data is the record header's first 48 bytes (magic, codec, digest
and lengths), so a header cannot be edited either.  The cost is that gc's
repack and copy re-seal what they move; AES-GCM runs at 8 GB/s here.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chunkstore.errors import IntegrityError

CIPHERS = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}
# One byte in a pack header (docs/FORMAT.md "Pack header"): 0 = not encrypted.
CIPHER_CODES = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
# The chunk id of an encrypted store.
KEYED_DIGEST = "blake3-128-keyed"
TAG_SIZE = 16
KEY_SIZE = 32
MASTER_SIZE = 2 * KEY_SIZE
KEY_CHECK_SIZE = 16
# Bytes of a record header that are the AEAD's associated data.
RECORD_AD_SIZE = 48
_PACK_KEY_INFO = b"blockvault pack key 1\0"
_KEY_CHECK_INFO = b"blockvault key check 1\0"
_OBJECT_KEY_INFO = b"blockvault object key 1\0"
_AEAD_CACHE = 256


@dataclass(frozen=True)
class MasterKey:
    """The store's secret: what every key slot wraps and a key export holds."""

    enc_key: bytes
    id_key: bytes

    def __post_init__(self):
        if len(self.enc_key) != KEY_SIZE or len(self.id_key) != KEY_SIZE:
            raise ValueError("a master key is two 32-byte keys")

    @classmethod
    def new(cls) -> "MasterKey":
        return cls(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))

    def to_bytes(self) -> bytes:
        return self.enc_key + self.id_key

    @classmethod
    def from_bytes(cls, raw: bytes) -> "MasterKey":
        if len(raw) != MASTER_SIZE:
            raise ValueError(f"a master key is {MASTER_SIZE} bytes, not {len(raw)}")
        return cls(bytes(raw[:KEY_SIZE]), bytes(raw[KEY_SIZE:]))

    def check(self, store_id: bytes) -> bytes:
        """What config.json's ``key_check`` holds: tells a right key from a wrong
        one (of another store, or mistyped in an export) without decrypting data,
        and reveals nothing of the key."""
        return hmac.digest(self.to_bytes(), _KEY_CHECK_INFO + store_id, "sha256")[:KEY_CHECK_SIZE]

    def __repr__(self) -> str:  # never print key bytes, not even in a traceback's locals
        return "MasterKey(<secret>)"


def keyed_id(id_key: bytes):
    """The chunk-id function of an encrypted store: 16 bytes of keyed BLAKE3.
    blake3 releases the GIL on large buffers, so digesting uses every core."""
    def digest(data) -> bytes:
        return blake3.blake3(data, key=id_key).digest(16)
    return digest


def _derive(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(key)


def record_nonce(offset: int) -> bytes:
    """12 bytes: the record's offset in its pack (u64 LE), then 4 zero bytes."""
    return offset.to_bytes(8, "little") + bytes(4)


class RecordCipher:
    """Seals and opens the payloads of one store's pack records.  Thread-safe."""

    def __init__(self, cipher: str, master: MasterKey, store_id: bytes):
        if cipher not in CIPHERS:
            raise ValueError(f"cipher {cipher!r} is unknown; use one of {', '.join(CIPHERS)}")
        self.name = cipher
        self.code = CIPHER_CODES[cipher]
        self._aead_class = CIPHERS[cipher]
        self._enc_key = master.enc_key
        self._store_id = store_id
        self._cache: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()

    def _aead(self, pack_id: bytes):
        with self._lock:
            aead = self._cache.get(pack_id)
            if aead is not None:
                self._cache.move_to_end(pack_id)
                return aead
        aead = self._aead_class(_derive(self._enc_key, self._store_id, _PACK_KEY_INFO + pack_id))
        with self._lock:
            self._cache[pack_id] = aead
            while len(self._cache) > _AEAD_CACHE:
                self._cache.popitem(last=False)
        return aead

    def seal(self, pack_id: bytes, offset: int, ad, plaintext) -> bytes:
        """ciphertext || 16-byte tag of the record at ``offset`` of pack ``pack_id``."""
        # Buffers go in as they are: a bytes() copy of a 256 KiB payload cost more
        # than the AEAD itself here (a fresh allocation faults in every page).
        return self._aead(pack_id).encrypt(record_nonce(offset), plaintext, ad)

    def open(self, pack_id: bytes, offset: int, ad, sealed, where: str) -> bytes:
        """The plaintext, or IntegrityError naming ``where``: a wrong key, a record
        moved from elsewhere, or changed bytes all look alike, and none decrypts."""
        try:
            return self._aead(pack_id).decrypt(record_nonce(offset), sealed, ad)
        except InvalidTag:
            raise IntegrityError(f"{where}: record does not authenticate (changed, moved, or sealed with "
                                 "another key)") from None


class ObjectCipher:
    """Seals whole small documents (bucket metadata objects, key-less
    metadata) with random nonces under a key of their own; ``name`` is the
    associated data, so a document cannot stand in for another."""

    def __init__(self, cipher: str, master: MasterKey, store_id: bytes):
        self._aead = CIPHERS[cipher](_derive(master.enc_key, store_id, _OBJECT_KEY_INFO))

    def seal(self, name: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, name)

    def open(self, name: bytes, sealed: bytes, where: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], name)
        except (InvalidTag, ValueError):
            raise IntegrityError(f"{where}: does not authenticate (changed, or sealed with another key)") from None


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


__all__ = ["CIPHERS", "CIPHER_CODES", "KEYED_DIGEST", "MasterKey", "RecordCipher", "ObjectCipher", "keyed_id",
           "record_nonce", "TAG_SIZE", "RECORD_AD_SIZE"]
