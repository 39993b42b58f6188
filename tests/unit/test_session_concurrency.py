"""Two write sessions of one store at once (chunkstore/session.py): the commit
lock keeps their commits one chain, and a chunk both stored keeps the entry
committed first, in the live index and in a rebuild."""

import threading

import chunkstore.session as session_mod
from chunkstore import ChunkStore
from chunkstore.index import IndexEntry
from chunkstore.rebuild import rebuild_index
from chunkstore.session import LAST_COMMIT, RESERVED_COMMIT, meta_number
from helpers import rng

CS = 64 << 10
DB = b"notes"


def _store(tmp_path):
    store = ChunkStore.init(str(tmp_path / "s"), chunk_size=CS, pack_target_size=1 << 20)
    store.db(DB)  # opened before any write transaction, as the engine's Repository does
    return store


def _chunk(store, data: bytes):
    d = store.digester(data)
    codec, payload = store.codec.encode(data)
    return (d, codec, len(data), payload)


def _notes(store) -> dict:
    with store.read_txn() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=store.db(DB))}


def test_a_commit_waits_for_another_sessions_commit_so_follows_stays_a_chain(tmp_path, monkeypatch):
    store = _store(tmp_path)
    with store.writer() as w:
        w.commit(metadata=[(DB, b"zero", b"0")])
    paused, go = threading.Event(), threading.Event()
    real = session_mod.WriteSession._write_metadata

    def slow_write_metadata(self, records):
        if self.purpose == "first":          # the first session stops between its number and its LMDB commit
            paused.set()
            go.wait(30)
        return real(self, records)

    monkeypatch.setattr(session_mod.WriteSession, "_write_metadata", slow_write_metadata)
    first, second = store.writer(purpose="first"), store.writer(purpose="second")
    first.write([_chunk(store, rng(1).bytes(CS))])
    second.write([_chunk(store, rng(2).bytes(CS))])
    t = threading.Thread(target=first.commit, kwargs={"metadata": [(DB, b"first", b"1")]})
    t.start()
    assert paused.wait(30)
    done = threading.Thread(target=second.commit, kwargs={"metadata": [(DB, b"second", b"2")]})
    done.start()
    done.join(1.0)                          # without the commit lock it would commit now
    with store.read_txn() as txn:
        reserved = meta_number(txn, store.meta_db, RESERVED_COMMIT)
    go.set()
    t.join(30)
    done.join(30)
    assert reserved == 2                    # the second had not even reserved its number
    with store.read_txn() as txn:
        assert meta_number(txn, store.meta_db, LAST_COMMIT) == 3
    before = _notes(store)
    assert before == {b"zero": b"0", b"first": b"1", b"second": b"2"}
    report = rebuild_index(store)
    assert report.commits == 3 and report.complete
    assert _notes(store) == before          # every commit on the chain rebuild walks


def test_a_chunk_two_sessions_stored_keeps_the_first_committed_entry_also_after_a_rebuild(tmp_path):
    store = _store(tmp_path)
    shared = _chunk(store, rng(3).bytes(CS))
    s1, s2 = store.writer(purpose="one"), store.writer(purpose="two")
    for s in (s1, s2):
        assert s.claim([shared[0]]) == [shared[0]]   # neither sees the other's: both store it
        s.write([shared])
    # The session whose pack sorts last commits first, so a rebuild (which takes
    # the first good copy in pack order) would pick the other copy on its own.
    early, late = sorted((s1, s2), key=lambda s: s.pending[shared[0]].pack_id, reverse=True)
    kept = early.pending[shared[0]]
    early.commit(metadata=[(DB, b"early", b"e")])
    late.commit(metadata=[(DB, b"late", b"l")])
    assert (early.duplicate_chunks, late.duplicate_chunks) == (0, 1)
    assert late.duplicate_bytes == 64 + len(shared[3])
    with store.read_txn() as txn:
        assert store.lookup(txn, shared[0]) == kept
    assert store.read_chunk(shared[0]) == rng(3).bytes(CS)
    rebuild_index(store)
    with store.read_txn() as txn:
        assert store.lookup(txn, shared[0]) == kept and isinstance(kept, IndexEntry)
    store.close()


def test_a_duplicate_met_by_a_checkpoint_is_recorded_by_the_final_commit(tmp_path, monkeypatch):
    import time
    monkeypatch.setattr(session_mod, "CHECKPOINT_ENTRIES", 1)
    store = _store(tmp_path)
    shared = _chunk(store, rng(4).bytes(CS))
    s1, s2 = store.writer(purpose="one"), store.writer(purpose="two")
    for s in (s1, s2):
        s.write([shared])
    early, late = sorted((s1, s2), key=lambda s: s.pending[shared[0]].pack_id, reverse=True)
    kept = early.pending[shared[0]]
    early.commit(metadata=[(DB, b"early", b"e")])
    r = rng(5)
    for _ in range(40):          # fills the pack holding the shared chunk: sealed, then checkpointed
        late.write([_chunk(store, r.bytes(CS))])
    deadline = time.monotonic() + 30
    while shared[0] in late.pending:
        assert time.monotonic() < deadline, "no checkpoint took the shared chunk"
        time.sleep(0.01)
    assert late.checkpoints >= 1 and late.duplicate_chunks == 1
    late.commit(metadata=[(DB, b"late", b"l")])
    with store.read_txn() as txn:
        assert store.lookup(txn, shared[0]) == kept
    rebuild_index(store)
    with store.read_txn() as txn:
        assert store.lookup(txn, shared[0]) == kept
    store.close()


def test_an_early_commit_waits_for_another_sessions_commit_so_follows_stays_a_chain(tmp_path, monkeypatch):
    """commit_early (a backup's manifest segments, committed before its own
    commit) takes the commit lock like commit: rebuild walks one chain."""
    store = _store(tmp_path)
    with store.writer() as w:
        w.commit(metadata=[(DB, b"zero", b"0")])
    paused, go = threading.Event(), threading.Event()
    real = session_mod.WriteSession._write_metadata

    def slow_write_metadata(self, records):
        if self.purpose == "first":
            paused.set()
            go.wait(30)
        return real(self, records)

    monkeypatch.setattr(session_mod.WriteSession, "_write_metadata", slow_write_metadata)
    first, second = store.writer(purpose="first"), store.writer(purpose="second")
    t = threading.Thread(target=first.commit, kwargs={"metadata": [(DB, b"first", b"1")]})
    t.start()
    assert paused.wait(30)
    numbers = []
    early = threading.Thread(target=lambda: numbers.append(second.commit_early([(DB, b"early", b"e")])))
    early.start()
    early.join(1.0)                          # without the commit lock it would commit now
    with store.read_txn() as txn:
        reserved = meta_number(txn, store.meta_db, RESERVED_COMMIT)
    go.set()
    t.join(30)
    early.join(30)
    second.commit(metadata=[(DB, b"second", b"2")])
    assert reserved == 2                     # the early commit had not reserved its number
    assert numbers == [3]
    with store.read_txn() as txn:
        assert meta_number(txn, store.meta_db, LAST_COMMIT) == 4
    before = _notes(store)
    assert before == {b"zero": b"0", b"first": b"1", b"early": b"e", b"second": b"2"}
    report = rebuild_index(store)
    assert report.commits == 4 and report.complete
    assert _notes(store) == before
