"""Repository: a chunk store plus the engine's own LMDB databases.

The engine keeps its catalog, manifests and manifest segments in the store's
LMDB environment (databases of their own), which is what lets one
transaction commit a backup's chunks, manifest and catalog entry together.
"""

from __future__ import annotations

from chunkstore import ChunkStore
from engine.catalog import CATALOG_DB, NEXT_SEQ_DB, Catalog
from engine.manifest import MANIFESTS_DB, SEGMENTS_DB, ManifestStore
from engine.references import References, recount


class Repository:
    def __init__(self, store: ChunkStore):
        self.store = store
        self.path = store.path
        self.catalog = Catalog(store.db(CATALOG_DB), CATALOG_DB, store.db_if_exists(NEXT_SEQ_DB))
        self.manifests = ManifestStore(store.db(MANIFESTS_DB), store.db(SEGMENTS_DB), store.digester,
                                       store.release_map)
        self.references = References(self)
        # A format-2 store's first writer computes the counts (ChunkStore.upgrade_format).
        store.upgrader = lambda txn: recount(self, txn)

    @classmethod
    def init(cls, path: str, **settings) -> "Repository":
        return cls(ChunkStore.init(path, **settings))

    @classmethod
    def open(cls, path: str, **where) -> "Repository":
        """``where``: ``cache`` and ``s3_settings`` of a store in a bucket, ``keys`` (a KeySource)
        or ``master`` of an encrypted store (ChunkStore.open)."""
        return cls(ChunkStore.open(path, **where))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
