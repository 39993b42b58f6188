import errno
import os
import threading

import pytest

import native
from helpers import make_sparse, rng, write_at


def test_extents_follow_holes(tmp_path):
    p = str(tmp_path / "d.img")
    make_sparse(p, 64 << 20)
    write_at(p, 1 << 20, b"x" * 4096)
    write_at(p, 40 << 20, b"y" * (1 << 20))
    with native.open_raw(p) as d:
        assert d.size == 64 << 20 and d.kind == "raw"
        ext = d.extents()
    covered = [(s, s + n) for s, n in ext]
    assert any(s <= 1 << 20 < e for s, e in covered)
    assert any(s <= 40 << 20 and (41 << 20) <= e for s, e in covered)
    assert sum(n for _, n in ext) < 4 << 20  # holes are not reported as data


def test_empty_and_fully_sparse_images(tmp_path):
    p = str(tmp_path / "e.img")
    make_sparse(p, 0)
    with native.open_raw(p) as d:
        assert d.size == 0 and d.extents() == []
    make_sparse(p, 8 << 20)
    with native.open_raw(p) as d:
        assert d.extents() == []


def test_read_chunks_merges_and_pads_past_end(tmp_path):
    p = str(tmp_path / "d.img")
    data = rng(1).bytes(300_000)
    with open(p, "wb") as f:
        f.write(data)
    cs = 64 << 10
    with native.open_raw(p) as d:
        buf = bytearray(5 * cs)
        d.read_chunks([0, cs, 2 * cs, 4 * cs, 9 * cs], cs, buf)
    assert bytes(buf[:3 * cs]) == data[:3 * cs]
    assert bytes(buf[3 * cs:3 * cs + (300_000 - 4 * cs)]) == data[4 * cs:]
    assert bytes(buf[3 * cs + (300_000 - 4 * cs):]) == bytes(len(buf) - 3 * cs - (300_000 - 4 * cs))


def test_read_chunks_rejects_small_buffer(tmp_path):
    p = str(tmp_path / "d.img")
    make_sparse(p, 1 << 20)
    with native.open_raw(p) as d, pytest.raises(ValueError, match="cannot hold"):
        d.read_chunks([0, 65536], 65536, bytearray(65536))


def test_zero_chunks():
    cs = 4096
    buf = bytearray(4 * cs + 100)
    buf[cs + 4095] = 1       # last byte of chunk 1
    buf[2 * cs] = 7          # first byte of chunk 2
    assert native.zero_chunks(buf, cs) == b"\x01\x00\x00\x01\x01"
    buf[-1] = 9
    assert native.zero_chunks(buf, cs)[-1] == 0


def test_errors_name_the_path(tmp_path):
    with pytest.raises(OSError) as e:
        native.open_raw(str(tmp_path / "missing.img"))
    assert e.value.errno == errno.ENOENT and e.value.filename.endswith("missing.img")
    with pytest.raises(OSError) as e:
        native.open_raw(str(tmp_path))
    assert e.value.errno == errno.EISDIR and "directory" in str(e.value)


def test_closed_disk_refuses_io(tmp_path):
    p = str(tmp_path / "d.img")
    make_sparse(p, 1 << 20)
    d = native.open_raw(p)
    d.close()
    assert d.closed
    with pytest.raises(ValueError):
        d.read(0, 10)


def test_parallel_reads_see_the_right_bytes(tmp_path):
    p = str(tmp_path / "d.img")
    data = rng(2).bytes(16 << 20)
    with open(p, "wb") as f:
        f.write(data)
    cs = 1 << 20
    errors = []
    with native.open_raw(p) as d:
        def worker(k):
            buf = bytearray(4 * cs)
            offs = [((k + i) % 16) * cs for i in range(4)]
            for _ in range(20):
                d.read_chunks(offs, cs, buf)
                for i, o in enumerate(offs):
                    if buf[i * cs:(i + 1) * cs] != data[o:o + cs]:
                        errors.append((k, o))
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_write_roundtrip(tmp_path):
    p = str(tmp_path / "w.img")
    make_sparse(p, 1 << 20)
    with native.open_raw(p, writable=True) as d:
        d.write(4096, b"hello")
        d.finish()
    with open(p, "rb") as f:
        f.seek(4096)
        assert f.read(5) == b"hello"
    assert os.path.getsize(p) == 1 << 20


def test_count_items_counts_aligned_slots_only():
    z = b"\0" * 16
    a = b"\1" * 16
    assert native.count_items(z + a + z + z, z) == 3
    assert native.count_items(a + a, z) == 0
    # A match that straddles two slots is not a slot.
    assert native.count_items(b"\1" * 8 + z + b"\1" * 8, z) == 0
    assert native.count_items(z + b"\0" * 5, z) == 1  # the partial tail is ignored
