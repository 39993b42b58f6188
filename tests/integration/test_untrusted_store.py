"""A store or a restore directory prepared by someone else cannot hurt the host (issue 9, items 9
and 10): links planted in a store or beside a restore target are refused, never followed, and
crafted zstd frames cannot make a restore or a verify allocate more than a chunk.

The commands run as the tests do, as root: a followed link would write wherever it points."""

import json
import os
import struct
import subprocess
import sys
import signal
import time

import pytest
import zstandard

from helpers import REPO_ROOT, chunk_packs, make_sparse, rng, run_cli, same_file, store_fingerprint, write_at

CS = 64 << 10
VICTIM_TEXT = b"precious: must never be truncated or overwritten\n"


@pytest.fixture
def backed_up(store_path, tmp_path):
    img = str(tmp_path / "src.img")
    make_sparse(img, 8 * CS)
    write_at(img, 0, rng(9).bytes(5 * CS))
    proc = run_cli("backup", store_path, img, "--disk", "d")
    assert proc.returncode == 0, proc.stderr
    return store_path, img


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_TEXT)
    return path


def _refused(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# ---------------------------------------------------------------- item 9: links


def test_lock_as_a_symlink_is_refused_and_its_target_untouched(backed_up, victim, tmp_path):
    store, img = backed_up
    lock = os.path.join(store, "lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    os.symlink(victim, lock)
    before = store_fingerprint(store)
    _refused(run_cli("backup", store, img, "--disk", "d"), lock, "symbolic link", str(victim))
    assert victim.read_bytes() == VICTIM_TEXT
    assert store_fingerprint(store) == before and os.readlink(lock) == str(victim)
    # The same for a lock link to a file that does not exist: nothing is created there.
    missing = tmp_path / "would-be-created"
    os.unlink(lock)
    os.symlink(missing, lock)
    _refused(run_cli("rebuild-index", store), lock, "symbolic link")
    assert not missing.exists()


def test_lock_that_is_a_hard_link_is_refused(backed_up, victim):
    store, img = backed_up
    lock = os.path.join(store, "lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    os.link(victim, lock)
    _refused(run_cli("backup", store, img, "--disk", "d"), lock, "hard link")
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_packs_subdirectory_that_is_a_symlink_is_refused(backed_up, tmp_path):
    store, img = backed_up
    outside = tmp_path / "outside"
    outside.mkdir()
    packs = os.path.join(store, "packs")
    # A link where the next backup may put its pack: every XX name, so whichever id it draws.
    for xx in (f"{i:02x}" for i in range(256)):
        if not os.path.exists(os.path.join(packs, xx)):
            os.symlink(outside, os.path.join(packs, xx))
    other = str(tmp_path / "other.img")
    make_sparse(other, 4 * CS)
    write_at(other, 0, rng(10).bytes(4 * CS))
    before = store_fingerprint(store)
    _refused(run_cli("backup", store, other, "--disk", "e"), "symbolic link", str(outside))
    assert os.listdir(outside) == []
    assert store_fingerprint(store) == before
    # Readers refuse the store too, naming the link.
    _refused(run_cli("list", store), "symbolic link")


@pytest.mark.parametrize("name", ["config.json", "index/lock.mdb", "index", "packs"])
def test_other_links_inside_a_store_are_refused(backed_up, tmp_path, name):
    store, _ = backed_up
    path = os.path.join(store, name)
    moved = tmp_path / ("moved-" + name.replace("/", "-"))
    os.rename(path, moved)
    os.symlink(moved, path)
    snapshot = moved.read_bytes() if moved.is_file() else None
    _refused(run_cli("list", store), path, "symbolic link")
    if snapshot is not None:
        assert moved.read_bytes() == snapshot


def test_a_pack_file_that_is_a_symlink_is_not_read(backed_up, tmp_path):
    """Readers open packs O_NOFOLLOW: restore fails naming the link, verify counts it as damage."""
    store, _ = backed_up
    packs = chunk_packs(store)  # the one restore reads (not the commit's metadata pack)
    moved = tmp_path / "moved.pack"
    os.rename(packs[0], moved)
    os.symlink(moved, packs[0])
    _refused(run_cli("restore", store, "d@1", str(tmp_path / "out.img")), packs[0], "symbolic link")
    verify = run_cli("verify", store, "--json")
    assert verify.returncode == 3 and "Traceback" not in verify.stderr, verify.stderr
    reasons = [b["reason"] for b in json.loads(verify.stdout)["bad_chunks"]]
    assert reasons and all("symbolic link" in r for r in reasons), reasons


@pytest.mark.parametrize("suffix,force", [(".img", False), (".img", True), (".vmdk", False), (".vmdk", True)])
def test_planted_partial_symlink_is_refused(backed_up, victim, tmp_path, suffix, force):
    store, _ = backed_up
    target = str(tmp_path / ("out" + suffix))
    partial = target + ".blockvault-partial"
    os.symlink(victim, partial)
    proc = run_cli("restore", store, "d@1", target, *(["--force"] if force else []))
    _refused(proc, partial, "symbolic link")
    assert victim.read_bytes() == VICTIM_TEXT
    assert os.readlink(partial) == str(victim) and not os.path.exists(target)


def test_a_partial_file_left_behind_is_refused_and_kept(backed_up, tmp_path):
    store, img = backed_up
    target = str(tmp_path / "out.img")
    partial = target + ".blockvault-partial"
    with open(partial, "wb") as f:
        f.write(b"another restore's bytes")
    _refused(run_cli("restore", store, "d@1", target), partial, "already exists", "remove it")
    with open(partial, "rb") as f:
        assert f.read() == b"another restore's bytes"   # not truncated, not deleted
    os.unlink(partial)
    proc = run_cli("restore", store, "d@1", target)
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, img)


def test_two_restores_to_one_target_at_once(store_path, tmp_path):
    """The first keeps its partial file to itself; the second is refused (the partial exists) and
    leaves it alone; the first's result is byte-identical to its point."""
    store = store_path
    imgs = {}
    for disk, seed in (("a", 11), ("b", 12)):
        img = str(tmp_path / f"{disk}.img")
        make_sparse(img, 256 * CS)
        write_at(img, 0, rng(seed).bytes(256 * CS))
        assert run_cli("backup", store, img, "--disk", disk).returncode == 0
        imgs[disk] = img
    target = str(tmp_path / "shared.img")
    partial = target + ".blockvault-partial"
    first = subprocess.Popen([sys.executable, "-m", "engine.cli", "restore", store, "a@1", target, "--threads", "1"],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.lexists(partial):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)   # hold it mid-restore, partial file open
    try:
        second = run_cli("restore", store, "b@1", target, "--force")
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    if first.returncode == 0 and second.returncode == 0:
        pytest.fail("both restores reported success for one target")
    _refused(second, partial, "already exists")
    assert same_file(target, imgs["a"])
    assert not os.path.lexists(partial)


def test_a_target_that_appears_meanwhile_is_not_overwritten_without_force(backed_up, tmp_path):
    """Without --force the finished file is linked into place only if the target is still absent."""
    from engine.restore import RawTarget, restore_backup
    from engine.repository import Repository
    store, _ = backed_up
    target = str(tmp_path / "late.img")

    class Late(RawTarget):
        def finish(self):
            with open(self.target, "wb") as f:   # another restore finished first
                f.write(b"the other restore's image")
            super().finish()

    from engine.errors import BadInputError
    with Repository.open(store) as repo, pytest.raises(BadInputError, match="appeared while this restore ran"):
        restore_backup(repo, "d@1", Late(target, False))
    with open(target, "rb") as f:
        assert f.read() == b"the other restore's image"
    assert not os.path.lexists(target + ".blockvault-partial")


# ---------------------------------------------------------------- item 10: crafted frames


def _frame_header(content_size: int | None, window_descriptor: int) -> bytes:
    """A zstd frame header (RFC 8878 3.1.1.1): no dictionary, no checksum, not single-segment;
    with an 8-byte Frame_Content_Size when ``content_size`` is given."""
    if content_size is None:
        return struct.pack("<IBB", 0xFD2FB528, 0x00, window_descriptor)
    return struct.pack("<IBBQ", 0xFD2FB528, 0xC0, window_descriptor, content_size)


def _zero_frame(n: int, declare: int | None) -> bytes:
    """A frame of ``n`` zero bytes (compressed in pieces, never held whole) whose header
    declares ``declare`` bytes (or nothing)."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=False)
    obj = cctx.compressobj()
    piece = bytes(16 << 20)
    parts = []
    left = n
    while left:
        take = min(left, len(piece))
        parts.append(obj.compress(piece[:take]))
        left -= take
    parts.append(obj.flush())
    frame = b"".join(parts)
    assert frame[4] == 0x00  # no content size, not single-segment: a window descriptor follows
    return _frame_header(declare, frame[5]) + frame[6:]


def _plant(store: str, digest: bytes, payload: bytes, raw_len: int = CS, codec: int = 1) -> None:
    """Point the index entry of ``digest`` at a new sealed pack holding one crafted record
    (valid checksums: only the frame inside lies)."""
    from chunkstore import ChunkStore
    from chunkstore.index import IndexEntry, PackInfo
    from chunkstore.pack import PACK_HEADER, encode_pack_header, encode_record, encode_trailer, pack_relpath
    with ChunkStore.open(store) as s:
        pid = os.urandom(16)
        path = os.path.join(store, pack_relpath(pid))
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        data = encode_pack_header(s.config, pid) + encode_record(digest, codec, raw_len, payload) + payload
        data += encode_trailer(1)
        with open(path, "wb") as f:
            f.write(data)
        with s.env.begin(write=True) as txn:
            txn.put(digest, IndexEntry(pid, PACK_HEADER.size, len(payload), raw_len, codec).encode(), db=s.chunks_db)
            txn.put(pid, PackInfo(len(data), 1, True).encode(), db=s.packs_db)


def _a_digest(store: str) -> bytes:
    from chunkstore import ChunkStore
    with ChunkStore.open(store) as s, s.read_txn() as txn:
        return bytes(next(iter(txn.cursor(db=s.chunks_db)))[0])


def _run_measured(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """The CLI in a child of a child: (its result, its peak RSS in bytes)."""
    probe = ("import json, resource, subprocess, sys\n"
             "p = subprocess.run([sys.executable, '-m', 'engine.cli', *sys.argv[1:]], capture_output=True, text=True)\n"
             "print(json.dumps([p.returncode, p.stdout, p.stderr,"
             " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n")
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)
    rc, out, err, rss = json.loads(proc.stdout)
    return subprocess.CompletedProcess(args, rc, out, err), rss


RSS_LIMIT = 300 << 20


@pytest.mark.parametrize("what,frame", [
    # 1 GiB of real zeros behind a header that says so: decompressed in full by the old code.
    ("declares and holds 1 GiB", lambda: _zero_frame(1 << 30, 1 << 30)),
    # A few hundred bytes declaring 2**62: MemoryError (a traceback) in the old code.
    ("declares 2**62 bytes", lambda: _zero_frame(CS, 1 << 62)),
    # Declares the record's size but holds 1 GiB; and one that declares nothing.
    ("declares the chunk size, holds 1 GiB", lambda: _zero_frame(1 << 30, CS)),
    ("declares nothing, holds 1 GiB", lambda: _zero_frame(1 << 30, None)),
])
def test_a_crafted_zstd_frame_fails_with_bounded_memory(backed_up, tmp_path, what, frame):
    store, _ = backed_up
    digest = _a_digest(store)
    payload = frame()
    assert len(payload) < 1 << 20, len(payload)
    _plant(store, digest, payload)
    restore, rss = _run_measured("restore", store, "d@1", str(tmp_path / "out.img"))
    assert rss < RSS_LIMIT, f"{what}: restore peaked at {rss >> 20} MiB"
    assert restore.returncode == 1, (restore.returncode, restore.stderr)
    assert "Traceback" not in restore.stderr and "MemoryError" not in restore.stderr, restore.stderr
    assert digest.hex() in restore.stderr and "zstd frame" in restore.stderr, restore.stderr
    assert not os.path.lexists(tmp_path / "out.img") and not os.path.lexists(tmp_path / "out.img.blockvault-partial")
    verify, rss = _run_measured("verify", store, "--json")
    assert verify.returncode == 3, (verify.returncode, verify.stderr)
    assert "Traceback" not in verify.stderr, verify.stderr
    bad = {b["digest"]: b["reason"] for b in json.loads(verify.stdout)["bad_chunks"]}
    assert list(bad) == [digest.hex()] and "zstd frame" in bad[digest.hex()], bad
    assert rss < RSS_LIMIT, f"{what}: verify peaked at {rss >> 20} MiB"


def test_a_record_declaring_more_than_the_chunk_size_is_rejected(backed_up, tmp_path):
    """raw length 8 MiB in a 64 KiB store: refused from the header, before anything is decompressed."""
    store, _ = backed_up
    digest = _a_digest(store)
    big = 8 << 20
    _plant(store, digest, zstandard.ZstdCompressor(write_content_size=True).compress(bytes(big)), raw_len=big)
    proc = run_cli("restore", store, "d@1", str(tmp_path / "out.img"))
    _refused(proc, digest.hex(), f"more than the chunk size {CS}")
    verify = run_cli("verify", store, "--json")
    assert verify.returncode == 3
    bad = {b["digest"]: b["reason"] for b in json.loads(verify.stdout)["bad_chunks"]}
    assert "chunk size" in bad[digest.hex()], bad


def test_decode_record_header_takes_the_chunk_size_as_a_cap():
    from chunkstore.errors import IntegrityError
    from chunkstore.pack import decode_record_header, encode_record
    head = encode_record(bytes(16), 1, 2 * CS, b"x")
    assert decode_record_header(head, "here").raw_len == 2 * CS          # no cap given: format limit
    with pytest.raises(IntegrityError, match=f"more than the store's chunk size {CS}"):
        decode_record_header(head, "here", CS)


def test_codec_refuses_a_frame_whose_declared_size_is_not_the_records():
    from chunkstore.codec import CODEC_ZSTD, Codec
    from chunkstore.errors import IntegrityError
    codec = Codec(1)
    with pytest.raises(IntegrityError, match="declares 4611686018427387904 bytes"):
        codec.decode(CODEC_ZSTD, _zero_frame(4096, 1 << 62), CS)
    good = zstandard.ZstdCompressor(write_content_size=True).compress(b"a" * CS)
    assert codec.decode(CODEC_ZSTD, good, CS) == b"a" * CS

