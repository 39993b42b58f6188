"""The bytes at rest: a content-addressed store of fixed-size chunks.

Vocabulary (docs/FORMAT.md defines each byte):

* chunk: ``chunk_size`` bytes of a disk, identified by its digest.
* digest: keyed XXH3-128 (default) or SHA-256 of the chunk's bytes.
* pack: an append-only file of chunk records; sealed (immutable) when full.
* index: LMDB map digest → (pack, offset, sizes, codec).
* write session: the single writer; its chunks become visible in one commit.

This package knows nothing about disks, VMs or backups; ``engine`` builds
those on top of it.
"""

from chunkstore.config import StoreConfig, parse_size
from chunkstore.errors import (ChunkNotFound, ConfigError, FormatVersionError, IntegrityError,
                               NotAStoreError, StoreError, StoreExistsError, StoreLockedError,
                               StoreReadOnlyError)
from chunkstore.index import IndexEntry
from chunkstore.session import WriteSession
from chunkstore.store import ChunkStore

__all__ = [
    "ChunkNotFound", "ChunkStore", "ConfigError", "FormatVersionError", "IndexEntry",
    "IntegrityError", "NotAStoreError", "StoreConfig", "StoreError", "StoreExistsError",
    "StoreLockedError", "StoreReadOnlyError", "WriteSession", "parse_size",
]
