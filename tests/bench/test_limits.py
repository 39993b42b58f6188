"""The machine-limit arithmetic the speed targets are judged by."""

import pytest

from bench.limits import combine, limit_seconds, rechunk

MB = 1e6


def test_rechunk_cuts_and_joins_without_losing_bytes():
    chunks = [bytes([i]) * (1 << 20) for i in range(5)]
    small = rechunk(chunks, 256 << 10)
    assert len(small) == 20 and all(len(c) == 256 << 10 for c in small)
    big = rechunk(chunks, 4 << 20)
    assert [len(c) for c in big] == [4 << 20, 1 << 20]
    assert b"".join(small) == b"".join(big) == b"".join(chunks)


def test_combine_keeps_the_best_of_nested_figures():
    a = {"zstd_compress_MBps": {"1": 900.0, "2": 1700.0},
         "zstd_compress_by_chunk_MBps": {"262144": {"1": 800.0, "2": 1600.0}}, "read_page_cache_MBps": 9000.0}
    b = {"zstd_compress_MBps": {"1": 950.0, "2": 1650.0},
         "zstd_compress_by_chunk_MBps": {"262144": {"1": 780.0, "2": 1700.0}}, "read_page_cache_MBps": 8000.0}
    out = combine([a, b])
    assert out["zstd_compress_MBps"] == {"1": 950.0, "2": 1700.0}
    assert out["zstd_compress_by_chunk_MBps"] == {"262144": {"1": 800.0, "2": 1700.0}}
    assert out["read_page_cache_MBps"] == 9000.0


def test_backup_limit_uses_what_had_to_be_compressed_at_the_store_chunk_size():
    limits = {"read_page_cache_MBps": 20000.0, "xxh3_128_MBps": {"1": 30000.0, "2": 40000.0},
              "zstd_compress_MBps": {"1": 1000.0, "2": 2000.0},
              "zstd_compress_by_chunk_MBps": {"262144": {"1": 900.0, "2": 1800.0}}}
    # A peer: every non-zero byte at the 1 MiB rate.
    assert limit_seconds(limits, "backup", 2000 * MB, 1800 * MB) == pytest.approx(0.9)
    # blockvault: only the new chunks, at its own chunk size's rate.
    assert limit_seconds(limits, "backup", 2000 * MB, 1800 * MB, compress_bytes=900 * MB,
                         chunk_size=256 << 10) == pytest.approx(0.5)
    # Nothing new to compress: reading the data is the bound.
    assert limit_seconds(limits, "backup", 2000 * MB, 1800 * MB, compress_bytes=0,
                         chunk_size=256 << 10) == pytest.approx(0.1)
