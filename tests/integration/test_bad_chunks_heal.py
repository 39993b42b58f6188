"""Bad chunks are not deduplicated against (issue 9, item 8): verify marks
what it finds bad, the next backup of the same data stores it again, and
every point that uses it heals; verify then reports it healed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lmdb

from chunkstore.pack import RECORD_HEADER_SIZE
from engine.repository import Repository
import jsonshape
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, snapshot, write_at

CS = 64 << 10


def _corrupt(store: str, digest: bytes) -> None:
    with Repository.open(store) as repo, repo.store.read_txn() as txn:
        entry = repo.store.require(txn, digest)
        path = repo.store.pack_path(entry.pack_id)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER_SIZE + 7)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def _marks(store: str) -> dict[bytes, dict]:
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    try:
        with env.begin(db=env.open_db(b"bad")) as txn:
            return {bytes(k): json.loads(bytes(v)) for k, v in txn.cursor()}
    finally:
        env.close()


def _setup(tmp_path):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    img = str(tmp_path / "d.img")
    make_sparse(img, 16 * CS)
    r = rng(95)
    write_at(img, 0, r.bytes(6 * CS))
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    p1 = snapshot(img, str(tmp_path / "p1"))
    write_at(img, 10 * CS, r.bytes(CS))  # d@2 shares chunks 0..5 with d@1
    assert run_cli("backup", store, img, "--disk", "d", "--mode", "incremental").returncode == 0
    p2 = snapshot(img, str(tmp_path / "p2"))
    with Repository.open(store) as repo, open(p1, "rb") as f:
        f.seek(3 * CS)
        digest = repo.store.digester(f.read(CS))
    return store, img, p1, p2, digest


def test_a_bad_chunk_is_stored_again_and_every_point_heals(tmp_path):
    store, img, p1, p2, digest = _setup(tmp_path)
    _corrupt(store, digest)
    proc = run_cli("verify", store, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3 and [b["digest"] for b in doc["bad_chunks"]] == [digest.hex()]
    assert doc["marks"] == {"recorded": True, "marked": 1, "note": ""}
    assert _marks(store)[digest]["state"] == "bad"
    for bid in ("d@1", "d@2"):  # both points are hurt
        assert run_cli("restore", store, bid, str(tmp_path / f"x{bid[-1]}")).returncode == 1
    # The next backup of the same data stores that chunk again, and only that one.
    proc = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)["stats"]
    assert st["new_chunks"] == 1 and st["dedup_chunks"] == 6, st
    assert _marks(store)[digest]["state"] == "healed"
    # verify: whole again, the chunk reported healed with the points it serves.
    proc = run_cli("verify", store, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"] is True, proc.stdout
    assert not jsonshape.check(doc, "verify", jsonshape.parse()[0])
    [healed] = doc["healed_chunks"]
    assert healed["digest"] == digest.hex() and "payload checksum mismatch" in healed["reason"]
    assert [b["id"] for b in healed["backups"]] == ["d@1", "d@2", "d@3"]
    assert _marks(store) == {}  # reported once, then dropped
    text = run_cli("verify", store)
    assert text.returncode == 0 and "store OK" in text.stdout and "HEALED" not in text.stdout
    # The FIRST point restores identical: it references the chunk by digest.
    for bid, source in (("d@1", p1), ("d@2", p2)):
        out = str(tmp_path / f"r{bid[-1]}.img")
        proc = run_cli("restore", store, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, source)


def test_healed_is_printed(tmp_path):
    store, img, _, _, digest = _setup(tmp_path)
    _corrupt(store, digest)
    assert run_cli("verify", store).returncode == 3
    assert run_cli("backup", store, img, "--disk", "d", "--mode", "incremental").returncode == 0
    text = run_cli("verify", store)
    assert text.returncode == 0 and f"HEALED chunk {digest.hex()}" in text.stdout and "d@1" in text.stdout


def test_verify_beside_a_writer_reports_that_it_could_not_mark(tmp_path):
    """verify never waits for the writer lock: with a backup running it says
    the marks were not recorded (and the next backup would not heal)."""
    store, _, _, _, digest = _setup(tmp_path)
    _corrupt(store, digest)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from chunkstore.lock import WriterLock; "
         f"WriterLock({store!r}).acquire(0, 'backup of x'); print('held', flush=True); time.sleep(60)"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("verify", store, "--json")
    finally:
        holder.kill()
        holder.wait()
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3 and doc["marks"]["recorded"] is False and doc["marks"]["marked"] == 0
    assert "not marked" in doc["marks"]["note"] and "backup of x" in doc["marks"]["note"]
    assert "not marked" in proc.stderr
    assert _marks(store) == {}
    # Run again once the store is free: marked.
    assert json.loads(run_cli("verify", store, "--json").stdout)["marks"]["marked"] == 1


def test_a_missing_pack_is_healed_by_the_next_backup(tmp_path):
    store, img, p1, _, digest = _setup(tmp_path)
    with Repository.open(store) as repo, repo.store.read_txn() as txn:
        path = repo.store.pack_path(repo.store.require(txn, digest).pack_id)
    os.unlink(path)
    doc = json.loads(run_cli("verify", store, "--json").stdout)
    assert doc["ok"] is False and doc["marks"]["marked"] >= 1
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    proc = run_cli("verify", store, "--json")
    assert proc.returncode == 0, proc.stdout
    out = str(tmp_path / "r1.img")
    assert run_cli("restore", store, "d@1", out).returncode == 0 and same_file(out, p1)


def test_rebuild_after_healing_keeps_the_good_copy_and_calls_the_bad_one_superseded(tmp_path):
    store, img, p1, p2, digest = _setup(tmp_path)
    _corrupt(store, digest)
    assert run_cli("verify", store).returncode == 3
    assert run_cli("backup", store, img, "--disk", "d", "--mode", "incremental").returncode == 0
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"chunks", txn=txn), delete=False)
    env.close()
    proc = run_cli("rebuild-index", store, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"] is True and doc["lost"] == [], (proc.stdout, proc.stderr)
    assert len(doc["superseded"]) == 1 and "payload checksum mismatch" in doc["superseded"][0]
    assert not jsonshape.check(doc, "rebuild-index", jsonshape.parse()[0])
    for bid, source in (("d@1", p1), ("d@2", p2)):
        out = str(tmp_path / f"r{bid[-1]}.img")
        assert run_cli("restore", store, bid, out).returncode == 0 and same_file(out, source)


def test_a_checkpointed_copy_heals_too(tmp_path, monkeypatch):
    """A long backup commits index entries early (checkpoints): a bad chunk
    stored again in a checkpointed pack is healed by that checkpoint."""
    import chunkstore.session as session_module
    from chunkstore import ChunkStore
    from engine.backup import backup_image
    from engine.verify import verify_repository

    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = str(tmp_path / "d.img")
    make_sparse(img, 400 * CS)
    r = rng(96)
    write_at(img, 0, r.bytes(4 * CS))
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    p1 = snapshot(img, str(tmp_path / "p1"))
    with Repository.open(store) as repo:
        digest = repo.store.digester(open(p1, "rb").read()[3 * CS:4 * CS])
    _corrupt(store, digest)
    assert run_cli("verify", store).returncode == 3
    write_at(img, 4 * CS, r.bytes(300 * CS))  # enough new chunks to seal packs well before the end
    monkeypatch.setattr(session_module, "CHECKPOINT_ENTRIES", 1)
    with Repository.open(store) as repo:
        healed_at = []
        real = session_module.badmarks.heal

        def spy(store_, txn, digests):
            import inspect
            healed_at.append(([f.function for f in inspect.stack()[1:4]], list(digests)))
            real(store_, txn, digests)
        monkeypatch.setattr(session_module.badmarks, "heal", spy)
        rec = backup_image(repo, img, "d", workers=1)
        assert rec.stats["new_chunks"] == 301
        callers, digests = healed_at[0]
        assert digests == [digest] and "_checkpoint" in callers, healed_at  # by a checkpoint, not at the end
        report = verify_repository(repo)
        assert report.ok and set(report.marks.healed) == {digest}
    out = str(tmp_path / "r1.img")
    assert run_cli("restore", store, "d@1", out).returncode == 0 and same_file(out, p1)
