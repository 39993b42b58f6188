"""chunkstore/residency.py: one long transaction that reads much of data.mdb
keeps its resident set bounded (``Paced``), and releasing the map in the
middle of a transaction, read or write, changes no byte it reads or commits."""

import hashlib

from chunkstore import residency
from chunkstore.store import ChunkStore

VALUE = 16 << 10   # a manifest segment of 64 KiB chunks
COUNT = 4096       # 64 MiB of them
DB = b"segments"


def _key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest()  # random order, as digests


def _value(i: int) -> bytes:
    return hashlib.shake_128(i.to_bytes(8, "big")).digest(VALUE)


def _filled(store_path: str) -> ChunkStore:
    store = ChunkStore.open(store_path)
    db = store.db(DB)
    for start in range(0, COUNT, 512):  # as early commits write them: 512 at a time, in disk order
        with store.env.begin(write=True) as txn:
            for i in range(start, start + 512):
                txn.put(_key(i), _value(i), db=db)
    store.release_map()
    return store


def _read_all(store: ChunkStore, txn, paced: "residency.Paced | None") -> int:
    """Read every value in ``txn`` (in write order); the most the file-backed RSS grew meanwhile."""
    db = store.db(DB)
    base = residency.file_resident()
    grew = 0
    for i in range(COUNT):
        if paced is not None:
            paced.step()
        assert txn.get(_key(i), db=db) == _value(i)
        grew = max(grew, residency.file_resident() - base)
    return grew


def test_a_paced_transaction_keeps_the_file_pages_it_maps_bounded(store_path):
    store = _filled(store_path)
    try:
        with store.read_txn() as txn:
            unpaced = _read_all(store, txn, None)
        store.release_map()
        paced = residency.Paced(store.release_map)
        with store.read_txn() as txn:
            grew = _read_all(store, txn, paced)
    finally:
        store.close()
    # Unpaced, reading 64 MiB through the map leaves it all resident.
    assert unpaced > 48 << 20, unpaced
    # Paced: the budget, plus what CHECK_EVERY steps can map before the next look.
    assert grew < residency.RELEASE_BUDGET + (8 << 20), grew
    assert paced.releases >= 4, paced.releases


def test_releasing_inside_a_write_transaction_changes_nothing_it_reads_or_commits(store_path):
    store = _filled(store_path)
    try:
        db = store.db(DB)
        with store.env.begin(write=True) as txn:
            paced = residency.Paced(store.release_map, budget=1 << 20, every=1)
            for i in range(0, COUNT, 2):  # half the values rewritten: dirty pages beside mapped ones
                txn.put(_key(i), _value(i + COUNT), db=db)
            for i in range(COUNT):
                paced.step()
                assert txn.get(_key(i), db=db) == _value(i + COUNT if i % 2 == 0 else i)
            assert paced.releases >= 8
        store.release_map()
        with store.read_txn() as txn:
            for i in range(COUNT):
                assert txn.get(_key(i), db=db) == _value(i + COUNT if i % 2 == 0 else i)
    finally:
        store.close()

