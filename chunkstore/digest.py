"""Chunk digests: the identity of a chunk in a store.

XXH3-128 keyed with the store's random seed is the default: it runs near
memory bandwidth (tens of GB/s per core here) and the secret seed keeps one
guest from precomputing collisions against another store's chunks.  A store
created with ``--digest sha256`` trades speed for a cryptographic identity,
for stores shared by parties that do not trust each other.  Both release the
GIL on large buffers, so digesting runs on every core.
"""

from __future__ import annotations

import hashlib

import xxhash

from chunkstore.config import StoreConfig

# Digests live in fixed 32-byte fields on disk; shorter ones are zero-padded.
DIGEST_FIELD = 32


class Digester:
    """Computes a store's chunk digests; immutable and safe to share between threads."""

    __slots__ = ("kind", "size", "_seed", "zero_digest", "_fn")

    def __init__(self, kind: str, seed: int, chunk_size: int, id_key: bytes | None = None):
        self.kind = kind
        self._seed = seed
        if kind == "blake3-128-keyed":  # an encrypted store's: chunkstore/crypto.py
            if id_key is None:
                raise ValueError("keyed ids need the store's id key")
            from chunkstore.crypto import keyed_id
            self.size = 16
            self._fn = keyed_id(id_key)
        elif kind == "xxh3-128":
            self.size = 16
            self._fn = self._xxh3
        elif kind == "sha256":
            self.size = 32
            self._fn = self._sha256
        else:  # config validation keeps us from here
            raise ValueError(kind)
        # The digest of an all-zero chunk stands for "zero" in manifests:
        # such chunks are never stored, and restores leave holes for them.
        self.zero_digest = self._fn(bytes(chunk_size))

    @classmethod
    def for_config(cls, cfg: StoreConfig, master=None) -> "Digester":
        return cls(cfg.digest, cfg.seed, cfg.chunk_size, master.id_key if master is not None else None)

    def _xxh3(self, data) -> bytes:
        return xxhash.xxh3_128_digest(data, seed=self._seed)

    def _sha256(self, data) -> bytes:
        return hashlib.sha256(data).digest()

    def __call__(self, data) -> bytes:
        return self._fn(data)
