"""engine/pointview.py, the one read path over a point, against what `restore`
writes for the same point: reads at odd offsets and lengths across chunk and
segment boundaries, the zero map, the counters and the bounded cache."""

from __future__ import annotations

import random
import threading

import pytest

from engine.pointview import PointView
from engine.repository import Repository
from helpers import make_sparse, rng, run_cli, text_bytes, write_at

CS = 64 << 10
SEG = 1024 * CS  # one manifest segment of 64 KiB chunks


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    """A store with d@1 (full) and d@2 (incremental) of a sparse 200 MiB + 777 B
    image, and each point's restored image (bytes read back as the truth)."""
    d = tmp_path_factory.mktemp("pointview")
    store, img = str(d / "store"), str(d / "src.img")
    r = rng(11)
    size = 3 * SEG + 777                              # partial last chunk, 4 segments
    make_sparse(img, size)
    for k in range(0, 300, 3):                        # segment 0: text, not chunk-aligned
        write_at(img, k * CS + (k % 5) * 1021, text_bytes(r, 20_000 + k * 37))
    write_at(img, SEG - 5000, r.bytes(10_000))         # across the segment 0/1 boundary
    dup = r.bytes(CS)
    write_at(img, 400 * CS, dup)                       # one chunk at two offsets
    write_at(img, 401 * CS, dup)
    # segment 2 stays all zeros
    write_at(img, 3 * SEG, r.bytes(500))               # the partial last chunk
    write_at(img, 3 * SEG + 600, b"tail")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    write_at(img, 7 * CS + 11, r.bytes(3 * CS))        # d@2 changes a few chunks
    write_at(img, 3 * CS, bytes(CS))                   # and zeroes one that held data
    proc = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental")
    assert proc.returncode == 0, proc.stderr
    restored = {}
    for ref in ("d@1", "d@2"):
        out = str(d / f"{ref}.img")
        proc = run_cli("restore", store, ref, out)
        assert proc.returncode == 0, proc.stderr
        with open(out, "rb") as f:
            restored[ref] = f.read()
    return store, restored


@pytest.fixture
def repo(points):
    r = Repository.open(points[0])
    yield r
    r.close()


def odd_ranges(size: int, seed: int, n: int = 300):
    r = random.Random(seed)
    edges = [0, CS - 1, CS, SEG - 1, SEG, 2 * SEG - 3, 3 * SEG, size - 1, size - 777]
    out = [(e, r.choice([1, 2, 4095, CS + 1, 3 * CS + 7])) for e in edges]
    out += [(r.randrange(size), r.choice([1, 17, 511, 4096, CS - 1, CS, 2 * CS + 123, 5 * CS]))
            for _ in range(n)]
    return out


@pytest.mark.parametrize("ref", ["d@1", "d@2"])
def test_pread_matches_the_restored_image_at_odd_offsets(points, repo, ref):
    truth = points[1][ref]
    view = PointView.open(repo, ref)
    assert view.size == len(truth)
    for offset, length in odd_ranges(view.size, seed=len(ref) + ord(ref[-1])):
        assert view.pread(offset, length) == truth[offset:offset + length], (offset, length)
        buf = bytearray(length)
        n = view.pread_into(buf, offset)
        assert bytes(buf[:n]) == truth[offset:offset + length], (offset, length)
    assert view.pread(view.size, 10) == b""
    assert view.pread(view.size - 3, 10) == truth[-3:]


def test_file_interface_reads_the_whole_point(points, repo):
    truth = points[1]["d@2"]
    f = PointView.open(repo, "d@2").file()
    assert f.seek(0, 2) == len(truth)
    f.seek(SEG - 100)
    assert f.read(300) == truth[SEG - 100:SEG + 200]
    assert f.tell() == SEG + 200
    f.seek(-10, 1)
    assert f.read(10) == truth[SEG + 190:SEG + 200]
    f.seek(0)
    pieces = []
    while True:
        piece = f.read(CS * 3 + 5)
        if not piece:
            break
        pieces.append(piece)
    assert b"".join(pieces) == truth
    f.seek(5)
    buf = bytearray(100)
    assert f.readinto(buf) == 100 and bytes(buf) == truth[5:105]


@pytest.mark.parametrize("ref", ["d@1", "d@2"])
def test_zero_map_is_the_manifests_zero_chunks(points, repo, ref):
    truth = points[1][ref]
    view = PointView.open(repo, ref)
    zero_chunks = {i for i in range(view.n_chunks) if not any(truth[i * CS:(i + 1) * CS])}
    got = set()
    pos = 0
    for off, length, zero in view.extents():
        assert off == pos and length > 0
        pos += length
        if zero:
            assert off % CS == 0
            got |= set(range(off // CS, -(-(off + length) // CS)))
    assert pos == view.size
    assert got == zero_chunks
    assert 2048 <= len(got) < view.n_chunks                  # segment 2 and most of 0, 1
    # clipped to the request, still merged
    part = view.extents(CS + 5, 3 * CS)
    assert part[0][0] == CS + 5 and sum(e[1] for e in part) == 3 * CS


def test_zero_chunks_never_touch_the_store_and_the_cache_counts(points, repo):
    truth = points[1]["d@1"]
    view = PointView.open(repo, "d@1")
    assert view.pread(2 * SEG + 12345, SEG - 20000) == truth[2 * SEG + 12345:3 * SEG - 7655]
    c = view.counters
    assert (c.chunks_read, c.segments_loaded, c.bytes_read) == (0, 0, 0)   # an all-zero segment
    assert view.pread(1 * CS, CS) == bytes(CS)                   # a zero chunk in a data segment
    assert c.chunks_read == 0 and c.segments_loaded == 1
    # the chunk stored once at 400 and 401: one read, one cache hit
    assert view.pread(400 * CS, 2 * CS) == truth[400 * CS:402 * CS]
    assert (c.chunks_read, c.cache_hits) == (1, 1)
    # small reads inside one chunk decode it once
    for k in range(16):
        assert view.pread(6 * CS + k * 4096, 4096) == truth[6 * CS + k * 4096:6 * CS + (k + 1) * 4096]
    assert c.chunks_read == 2 and c.cache_hits == 16
    assert c.chunks_decoded <= c.chunks_read and c.bytes_read > 0


def test_cache_is_bounded_in_bytes(points, repo):
    truth = points[1]["d@1"]
    view = PointView.open(repo, "d@1", cache_bytes=3 * CS)
    data_chunks = [i for i in range(300) if any(truth[i * CS:(i + 1) * CS])][:10]
    for i in data_chunks:
        view.pread(i * CS, CS)
    assert view.counters.chunks_read == 10
    assert view._cached <= 3 * CS and len(view._cache) == 3
    view.pread(data_chunks[-1] * CS, 10)                       # recent: a hit
    assert view.counters.chunks_read == 10
    view.pread(data_chunks[0] * CS, 10)                        # evicted: read again
    assert view.counters.chunks_read == 11


def test_parallel_readers_with_a_tiny_cache(points, repo):
    truth = points[1]["d@2"]
    view = PointView.open(repo, "d@2", cache_bytes=2 * CS, max_segments=1)
    errors = []

    def reader(seed):
        try:
            for offset, length in odd_ranges(view.size, seed, n=150):
                if view.pread(offset, length) != truth[offset:offset + length]:
                    errors.append((offset, length))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert view._cached <= 2 * CS and len(view._segments) <= 1


def test_unknown_point_fails_before_any_read(repo):
    from engine.errors import NotFoundError
    with pytest.raises(NotFoundError):
        PointView.open(repo, "d@9")
