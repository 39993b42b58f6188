import os

import pytest

from chunkstore import ChunkStore, IntegrityError, StoreLockedError
from chunkstore.codec import CODEC_RAW, CODEC_ZSTD
from chunkstore.pack import RECORD_HEADER_SIZE, decode_record_header, encode_record, scan_pack
from helpers import rng, text_bytes


def _fill(store, chunks):
    with store.writer() as w:
        for data in chunks:
            codec, payload = store.codec.encode(data)
            w.add(store.digester(data), codec, len(data), payload)
        w.commit()


def test_record_header_roundtrip_and_checks():
    rec = encode_record(b"d" * 16, CODEC_ZSTD, 65536, b"payload")
    h = decode_record_header(rec, "t")
    assert (h.digest, h.codec, h.raw_len, h.stored_len) == (b"d" * 16, CODEC_ZSTD, 65536, 7)
    damaged = bytearray(rec)
    damaged[9] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        decode_record_header(bytes(damaged), "t")


def test_chunks_read_back_and_codec_choice(tmp_path):
    store = ChunkStore.init(str(tmp_path / "s"), chunk_size=64 << 10)
    r = rng(3)
    text, noise = text_bytes(r, 65536), r.bytes(65536)
    _fill(store, [text, noise])
    with store.read_txn() as txn:
        assert store.lookup(txn, store.digester(text)).codec == CODEC_ZSTD
        assert store.lookup(txn, store.digester(noise)).codec == CODEC_RAW
    assert store.read_chunk(store.digester(text)) == text
    assert store.read_chunk(store.digester(noise)) == noise
    store.close()


def test_scan_stops_at_torn_tail(tmp_path):
    store = ChunkStore.init(str(tmp_path / "s"), chunk_size=64 << 10)
    r = rng(4)
    chunks = [r.bytes(65536) for _ in range(3)]
    _fill(store, chunks)
    (pack,) = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "s" / "packs") for f in fs]
    full = scan_pack(pack)
    assert full.sealed and len(full.records) == 3 and full.torn_at is None
    # Cut the pack in the middle of its last record, as a crash would.
    last = full.records[-1].offset
    with open(pack, "r+b") as f:
        f.truncate(last + RECORD_HEADER_SIZE + 100)
    torn = scan_pack(pack)
    assert len(torn.records) == 2 and torn.torn_at == last and not torn.sealed
    store.close()


def test_abandoned_session_leaves_nothing(tmp_path):
    store = ChunkStore.init(str(tmp_path / "s"), chunk_size=64 << 10)
    data = rng(5).bytes(65536)
    with store.writer() as w:
        codec, payload = store.codec.encode(data)
        w.add(store.digester(data), codec, len(data), payload)
    packs = [f for _, _, fs in os.walk(tmp_path / "s" / "packs") for f in fs]
    assert packs == []
    with store.read_txn() as txn:
        assert store.lookup(txn, store.digester(data)) is None
    store.close()


def test_second_writer_is_refused_with_holder(tmp_path):
    from chunkstore.lock import WriterLock
    store = ChunkStore.init(str(tmp_path / "s"))
    with store.writer(purpose="backup of x"):
        with pytest.raises(StoreLockedError, match="backup of x by pid"):
            WriterLock(str(tmp_path / "s")).acquire(wait=0.3)
    other = WriterLock(str(tmp_path / "s"))
    other.acquire()  # free again once the first one is gone
    other.release()
    store.close()


def test_pack_rotation_seals_full_packs(tmp_path):
    store = ChunkStore.init(str(tmp_path / "s"), chunk_size=64 << 10, pack_target_size=1 << 20)
    r = rng(6)
    _fill(store, [r.bytes(65536) for _ in range(40)])
    packs = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "s" / "packs") for f in fs]
    assert len(packs) >= 2
    assert all(scan_pack(p).sealed for p in packs)
    store.close()


def test_checkpoints_bound_pending_entries_and_survive_abort(tmp_path, monkeypatch):
    import chunkstore.session as session_mod
    from chunkstore.verify import verify_chunks
    monkeypatch.setattr(session_mod, "CHECKPOINT_ENTRIES", 10)
    store = ChunkStore.init(str(tmp_path / "s"), chunk_size=64 << 10, pack_target_size=1 << 20)
    r = rng(7)
    chunks = [r.bytes(65536) for _ in range(200)]
    per_pack = (1 << 20) // (65536 + RECORD_HEADER_SIZE)
    # Never more than a checkpoint's worth plus the packs not yet synced: the
    # open one, those waiting for the sealer, and one it just synced.
    bound = 10 + (session_mod.SEAL_BACKLOG + 2) * per_pack
    assert bound < len(chunks) // 2
    with store.writer() as w:
        for data in chunks:
            codec, payload = store.codec.encode(data)
            w.add(store.digester(data), codec, len(data), payload)
            assert len(w.pending) <= bound
        assert w.checkpoints >= 2
        # leaving without commit: only the unsealed tail is discarded
    report = verify_chunks(store)
    assert report.ok and report.chunks_checked >= 20
    with store.read_txn() as txn:
        known = [d for d in map(store.digester, chunks) if store.lookup(txn, d)]
    assert all(store.read_chunk(d) for d in known)
    store.close()
