"""Lifecycle test helpers: reading the reference-count databases, deleting a point
the way forget/delete does (one commit: catalog and manifest deletes recorded as
metadata, counts released in the same transaction)."""

from __future__ import annotations

import os
import struct

import lmdb

from engine.catalog import CATALOG_DB
from engine.manifest import MANIFESTS_DB
from engine.repository import Repository


def read_db(store: str, name: bytes) -> dict[bytes, bytes]:
    env = lmdb.open(os.path.join(store, "index"), readonly=True, max_dbs=64, lock=False)
    try:
        with env.begin() as txn:
            try:
                db = env.open_db(name, txn=txn, create=False)
            except lmdb.NotFoundError:
                return {}
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
    finally:
        env.close()


def counts(store: str, name: bytes) -> dict[bytes, int]:
    return {k: struct.unpack("<Q", v)[0] for k, v in read_db(store, name).items()}


def meta_gen(store: str) -> int:
    v = read_db(store, b"meta").get(b"gen")
    return struct.unpack("<Q", v)[0] if v else 0


def delete_point(store: str, bid: str) -> int:
    """Remove one disk backup as forget/delete will: returns the chunks that died."""
    died = []
    with Repository.open(store) as repo:
        with repo.store.read_txn() as txn:
            rec = repo.catalog.resolve(txn, bid)
            manifest = repo.manifests.get(txn, rec.key, rec.id, rec)
        with repo.store.writer(purpose=f"delete {bid}") as session:
            session.commit(metadata=[(CATALOG_DB, rec.key, None), (MANIFESTS_DB, rec.key, None)],
                           after=lambda txn: died.append(repo.references.release_manifest(txn, manifest)))
    return died[0]


def chunk_digests(store: str, bid: str) -> set[bytes]:
    """The non-zero chunk digests a point references."""
    with Repository.open(store) as repo, repo.store.read_txn() as txn:
        rec = repo.catalog.resolve(txn, bid)
        m = repo.manifests.get(txn, rec.key, rec.id, rec)
        zero = repo.store.digester.zero_digest
        out = set()
        for s in m.segments:
            content = repo.manifests.segment(txn, s)
            out |= {content[i:i + len(zero)] for i in range(0, len(content), len(zero))}
        out.discard(zero)
        return out
