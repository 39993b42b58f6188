"""WriteSession under concurrent use: claims, parallel appends, the sealer thread."""

import errno
import os
import threading
import time

import pytest

import chunkstore.session as session_mod
from chunkstore import ChunkStore, StoreError
from chunkstore.pack import PackWriter, scan_pack
from chunkstore.verify import verify_chunks
from helpers import rng, text_bytes

CS = 64 << 10


def _store(tmp_path, **kw):
    return ChunkStore.init(str(tmp_path / "s"), chunk_size=CS, pack_target_size=1 << 20, **kw)


def _packs(tmp_path):
    return [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "s" / "packs") for f in fs]


def _encode_all(store, chunks):
    return [(store.digester(c), *store.codec.encode(c)) for c in chunks]


def test_each_digest_is_claimed_by_exactly_one_caller(tmp_path):
    store = _store(tmp_path)
    digests = [os.urandom(16) for _ in range(2000)]
    got: list[list[bytes]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def claimer(k):
        start.wait()
        for i in range(0, len(digests), 50):
            got[k].extend(w.claim(digests[i:i + 50]))

    with store.writer() as w:
        threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    granted = [d for g in got for d in g]
    assert sorted(granted) == sorted(digests)  # each one once, none lost
    store.close()


def test_claim_skips_what_the_index_or_the_session_holds(tmp_path):
    store = _store(tmp_path)
    r = rng(11)
    old, new = text_bytes(r, CS), r.bytes(CS)
    with store.writer() as w:
        ((d, codec, payload),) = _encode_all(store, [old])
        w.write([(d, codec, CS, payload)])
        w.commit()
    with store.writer() as w:
        d_old, d_new = store.digester(old), store.digester(new)
        assert w.claim([d_old, d_new]) == [d_new]
        assert w.claim([d_new]) == []                      # claimed already
        codec, payload = store.codec.encode(new)
        w.write([(d_new, codec, CS, payload)])
        assert w.claim([d_new]) == []                      # written by this session
        w.commit()
    assert store.read_chunk(store.digester(new)) == new
    store.close()


def test_parallel_writers_fill_packs_in_order_and_commit_everything(tmp_path):
    store = _store(tmp_path)
    r = rng(12)
    chunks = [r.bytes(CS) if i % 2 else text_bytes(r, CS) for i in range(240)]
    records = _encode_all(store, chunks)
    with store.writer() as w:
        def writer(part):
            for i in range(0, len(part), 8):
                batch = part[i:i + 8]
                fresh = set(w.claim([d for d, _, _ in batch]))
                w.write([(d, codec, CS, p) for d, codec, p in batch if d in fresh])

        threads = [threading.Thread(target=writer, args=(records[k::3],)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.commit()
    packs = _packs(tmp_path)
    assert len(packs) >= 6
    total = 0
    for p in packs:
        scan = scan_pack(p)
        assert scan.sealed and scan.torn_at is None and not scan.problem
        assert os.path.getsize(p) <= 1 << 20
        total += len(scan.records)
    assert total == len(chunks)
    for c in chunks:
        assert store.read_chunk(store.digester(c)) == c
    assert verify_chunks(store).ok
    store.close()


def test_writers_wait_for_the_sealer_when_the_backlog_is_full(tmp_path, monkeypatch):
    store = _store(tmp_path)
    unsynced_peak = [0]
    real_sync = PackWriter.sync

    def slow_sync(self):
        time.sleep(0.05)
        real_sync(self)

    monkeypatch.setattr(PackWriter, "sync", slow_sync)
    r = rng(13)
    chunks = [r.bytes(CS) for _ in range(120)]  # about 8 packs of 1 MiB
    with store.writer() as w:
        for d, codec, p in _encode_all(store, chunks):
            w.write([(d, codec, CS, p)])
            with w._mutex:
                unsynced_peak[0] = max(unsynced_peak[0], w._retiring)
        w.commit()
    assert 1 <= unsynced_peak[0] <= session_mod.SEAL_BACKLOG
    assert all(store.read_chunk(store.digester(c)) == c for c in chunks)
    store.close()


def test_a_failed_fsync_fails_the_session_and_commits_nothing(tmp_path, monkeypatch):
    store = _store(tmp_path)

    def failing_sync(self):
        raise OSError(5, "Input/output error", self.path)

    monkeypatch.setattr(PackWriter, "sync", failing_sync)
    r = rng(14)
    chunks = [r.bytes(CS) for _ in range(40)]
    # The sealer meets the failure; the writer (or the commit) after it gets
    # the same OSError, with the pack's name, for the CLI to explain.
    with pytest.raises(OSError, match="Input/output error") as failed:
        with store.writer() as w:
            for d, codec, p in _encode_all(store, chunks):
                w.write([(d, codec, CS, p)])
            w.commit()
    assert failed.value.errno == errno.EIO and failed.value.filename.endswith(".pack")
    with store.read_txn() as txn:
        assert all(store.lookup(txn, store.digester(c)) is None for c in chunks)
    assert _packs(tmp_path) == []  # the aborted session deleted its packs
    store.close()


def test_a_closed_session_refuses_writes(tmp_path):
    store = _store(tmp_path)
    data = rng(15).bytes(CS)
    w = store.writer()
    w.commit()
    codec, payload = store.codec.encode(data)
    with pytest.raises(StoreError, match="closed"):
        w.write([(store.digester(data), codec, CS, payload)])
    store.close()


@pytest.mark.parametrize("fail_at", ["header", "record"])
def test_every_thread_after_a_write_failure_gets_the_original_error(tmp_path, monkeypatch, fail_at):
    """ENOSPC met by one writing thread: every later write, from any thread,
    and the commit raise the same OSError (errno and pack path), so the
    message does not depend on which worker the caller hears from first."""
    store = _store(tmp_path)
    r = rng(16)
    (a, b) = _encode_all(store, [r.bytes(CS), r.bytes(CS)])
    real_pwritev, calls = os.pwritev, [0]

    def filling_up(fd, buffers, offset):
        calls[0] += 1
        if calls[0] > (0 if fail_at == "header" else 1):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwritev(fd, buffers, offset)

    with store.writer() as w:
        monkeypatch.setattr(os, "pwritev", filling_up)
        with pytest.raises(OSError) as first:
            w.write([(a[0], a[1], CS, a[2])])
        monkeypatch.setattr(os, "pwritev", real_pwritev)  # the disk has room again
        assert first.value.errno == errno.ENOSPC and first.value.filename.endswith(".pack")
        later: list[BaseException] = []

        def other_thread():
            try:
                w.write([(b[0], b[1], CS, b[2])])
            except BaseException as e:  # noqa: BLE001 - inspected below
                later.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert len(later) == 1 and type(later[0]) is OSError, later
        assert (later[0].errno, later[0].filename) == (errno.ENOSPC, first.value.filename)
        with pytest.raises(OSError) as at_commit:
            w.commit()
        assert (at_commit.value.errno, at_commit.value.filename) == (errno.ENOSPC, first.value.filename)
    assert _packs(tmp_path) == []
    with store.read_txn() as txn:
        assert store.lookup(txn, a[0]) is None and store.lookup(txn, b[0]) is None
    store.close()


def test_an_early_commit_is_kept_when_the_session_then_aborts(tmp_path):
    """commit_early is a commit of its own: the session that made it may still
    fail, and its abort must not delete the metadata pack that commit needs."""
    from chunkstore.rebuild import rebuild_index

    store = _store(tmp_path)
    store.db(b"segments")  # opened before any write transaction, as the engine's Repository does
    r = rng(5)
    with store.writer() as w:
        ((d, codec, payload),) = _encode_all(store, [r.bytes(CS)])
        w.write([(d, codec, CS, payload)])
        writes = [(b"segments", b"key-%d" % i, r.bytes(100)) for i in range(3)]
        expected = {k: v for _, k, v in writes}
        assert w.commit_early(writes) == 1 and writes == []  # taken over
        # no commit: the with block aborts
    segments = store.db(b"segments")
    with store.read_txn() as txn:
        assert {k: txn.get(k, db=segments) for k in expected} == expected
        assert txn.get(d, db=store.chunks_db) is None  # the aborted session's chunk is not indexed
    (kept,) = _packs(tmp_path)  # the chunk pack is gone, the early commit's metadata pack is not
    assert all(rec.header.magic == b"BVMD" for rec in scan_pack(kept).records)
    with store.env.begin(write=True) as txn:
        txn.drop(segments, delete=False)
    report = rebuild_index(store)
    assert report.commits == 1 and report.complete
    with store.read_txn() as txn:
        assert {k: txn.get(k, db=segments) for k in expected} == expected
    store.close()
