"""Fragmented disks (issue 9 item 17): the backup plan does not hold every
extent of the disk, and a restore leaves 4 KiB zero blocks as holes, so a
disk of many small extents restores into the space its source takes."""

import json
import os
import random
import shutil
import subprocess
import sys
import tracemalloc

import native
import pytest

from engine.backup import plan_read
from engine.changes import EXTENT_PAGE, paged_extents
from engine.repository import Repository
from helpers import REPO_ROOT, allocated_ranges, make_sparse, run_cli, same_file, write_at

CS = 64 << 10
BLOCK = 4096


def _fragmented(path: str, size: int, count: int, seed: int = 1) -> list[int]:
    """A sparse image with ``count`` 4 KiB blocks of data spread over it; their offsets."""
    make_sparse(path, size)
    rnd = random.Random(seed)
    step = size // count // BLOCK * BLOCK
    offsets = [i * step + rnd.randrange(step // BLOCK) * BLOCK for i in range(count)]
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, rnd.randbytes(BLOCK), off)
    finally:
        os.close(fd)
    return offsets


def test_a_fragmented_disk_restores_into_the_space_of_its_source(tmp_path):
    img, store, out = str(tmp_path / "d.img"), str(tmp_path / "store"), str(tmp_path / "r.img")
    _fragmented(img, 1 << 30, 2000)
    # Zero 4 KiB blocks inside data too: data, hole, data, two holes, data in one chunk.
    base = 700 * CS
    for k in (0, 2, 5):
        write_at(img, base + k * BLOCK, random.Random(k).randbytes(BLOCK))
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    r = run_cli("restore", store, "d@latest", out)
    assert r.returncode == 0, r.stderr
    assert same_file(out, img)
    source, restored = os.stat(img).st_blocks * 512, os.stat(out).st_blocks * 512
    # 64 KiB holes made this 16 times the source (131 MB for 8 MB).
    assert restored <= source * 1.1, (restored, source)
    assert allocated_ranges(out) == allocated_ranges(img)


def test_a_vmdk_restore_keeps_its_grains(tmp_path):
    """VMDK targets keep 64 KiB holes (the grain): 4 KiB pieces of a grain
    would be written as whole grains anyway."""
    img, store, out = str(tmp_path / "d.img"), str(tmp_path / "store"), str(tmp_path / "r.vmdk")
    make_sparse(img, 4 << 20)
    for k in (0, 3, 17, 40):
        write_at(img, k * BLOCK * 5, random.Random(k).randbytes(BLOCK))
    assert run_cli("init", store, "--chunk-size", "256K").returncode == 0
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    r = run_cli("restore", store, "d@1", out)
    assert r.returncode == 0, r.stderr
    with native.open_vmdk(out) as d, open(img, "rb") as f:
        assert d.read(0, 4 << 20) == f.read()


def _plan_peak(store: str, img: str) -> tuple[int, int]:
    """(peak bytes Python allocated to plan a full backup and walk its runs, chunks in them)."""
    with Repository.open(store) as repo, native.open_raw(img) as disk, repo.store.read_txn() as txn:
        tracemalloc.start()
        try:
            plan = plan_read(repo, txn, disk, "d", "full", None)
            walked = sum(end - first for first, end in plan.runs)  # as the pipeline does
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert plan.chunks == walked
    return peak, walked


@pytest.mark.slow
def test_planning_a_fragmented_backup_holds_a_page_of_extents_not_all_of_them(tmp_path, store_path):
    small, large = str(tmp_path / "small.img"), str(tmp_path / "large.img")
    offsets_small = _fragmented(small, 64 << 30, 5_000)
    offsets_large = _fragmented(large, 64 << 30, 100_000)
    peak_small, chunks_small = _plan_peak(store_path, small)
    peak_large, chunks_large = _plan_peak(store_path, large)
    assert chunks_small == len({o // CS for o in offsets_small})
    assert chunks_large == len({o // CS for o in offsets_large})
    # Listing all 100,000 extents and their runs took 26 MB (260 bytes an extent).
    assert peak_large < 4 << 20, peak_large
    assert peak_large - peak_small < 1 << 20, (peak_small, peak_large)


def test_native_extents_page_through_a_disk(tmp_path):
    img = str(tmp_path / "d.img")
    _fragmented(img, 1 << 30, 3000)
    with native.open_raw(img) as d:
        whole = d.extents()
        assert len(whole) == 3000
        assert list(paged_extents(d, 64)) == whole
        assert list(paged_extents(d)) == whole and len(whole) < EXTENT_PAGE
        start, length = whole[10]
        assert d.extents(start + 100, 2) == [(start + 100, length - 100), whole[11]]
        assert d.extents(d.size, 5) == []
        with pytest.raises(ValueError):
            d.extents(0, -1)


def test_native_extents_page_through_a_vmdk_too(tmp_path):
    """Kinds that list everything at once (VMDK, VDDK) are paged from one listing."""
    out = str(tmp_path / "w.vmdk")
    with native.create_vmdk(out, 64 << 20) as w:
        for k in range(0, 64, 3):
            w.write(k << 20, b"\1" * 4096)
        w.finish()
    with native.open_vmdk(out) as d:
        whole = d.extents()
        assert len(whole) == 22
        assert list(paged_extents(d, 5)) == whole
        start, length = whole[3]
        assert d.extents(start + 512, 1) == [(start + 512, length - 512)]


def _cli_peak_rss(*args: str) -> int:
    """Peak RSS (bytes) of one command, in a fresh process of its own."""
    code = ("import resource, subprocess, sys\n"
            f"r = subprocess.run([sys.executable, '-m', 'engine.cli', *{list(args)!r}],"
            " capture_output=True, text=True)\n"
            "assert r.returncode == 0, r.stderr\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout) * 1024


def _backup_peak_rss(tmp_path, name: str, size: int, count: int) -> int:
    """Peak RSS (bytes) of one backup, in a fresh process of its own."""
    img, store = str(tmp_path / f"{name}.img"), str(tmp_path / f"{name}-store")
    _fragmented(img, size, count)
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    peak = _cli_peak_rss("backup", store, img, "--disk", "d")
    os.unlink(img)
    shutil.rmtree(store)
    return peak


@pytest.mark.slow
def test_committing_a_rewritten_manifest_does_not_hold_its_segments_twice(tmp_path):
    """16,384 small extents over 1 TiB touch every one of its 16,384 manifest
    segments: 256 MiB of new segments.  The commit held them in Python and
    again in LMDB's transaction (618 MiB peak); now each leaves Python as it
    enters LMDB (457 MiB).  The figures of the item's 4 TiB disk: 677 → 518 MB.
    Since the segments are committed early and every read of them is paced
    (chunkstore/residency.py): 79 MB, and 101 MB for the 4 TiB disk."""
    base = _backup_peak_rss(tmp_path, "small", 1 << 30, 16)
    peak = _backup_peak_rss(tmp_path, "large", 1 << 40, 16_384)
    segments = 16_384 * 1024 * 16
    assert peak - base < 1.9 * segments, (base, peak)


@pytest.mark.slow
def test_a_backups_memory_does_not_grow_with_the_segments_it_rewrites(tmp_path):
    """One 4 KiB extent in every 64 MiB: 2,048 then 8,192 rewritten segments
    (32 and 128 MiB of them).  They were all held until the commit: 68 and
    193 MB peak RSS.  Now they are committed early, 16 MiB at a time
    (engine/backup.py commit_segments), and the LMDB pages the writer touched
    are unmapped after each commit (chunkstore/residency.py).  The final
    commit then counts the references of every one of them in one
    transaction (engine/references.py add_manifests), which mapped them all
    again: 102 and 233 MB; it reads each once, the map released as it goes
    (residency.Paced): 69 and 74 MB."""
    n = _backup_peak_rss(tmp_path, "n", 2048 << 26, 2048)
    four_n = _backup_peak_rss(tmp_path, "4n", 8192 << 26, 8192)
    assert four_n - n < 48 << 20, (n, four_n)


@pytest.mark.slow
def test_removing_a_fragmented_point_does_not_grow_with_its_segments(tmp_path):
    """A delete reads every segment of the point to count its chunks down
    (References.release_manifest; a dry run reads them for unique_bytes).
    That mapped all of them: 68 and 198 MB peak RSS for 2,048 and 8,192
    segments; read in order, the map released as they go
    (chunkstore/residency.py Paced): 36 and 38 MB."""
    peaks = []
    for n in (2048, 8192):
        img, store = str(tmp_path / f"{n}.img"), str(tmp_path / f"{n}-store")
        _fragmented(img, n << 26, n)
        assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
        assert run_cli("backup", store, img, "--disk", "d").returncode == 0
        os.unlink(img)
        peaks.append(_cli_peak_rss("delete", store, "d@1", "--allow-remove-newest"))
        listed = json.loads(run_cli("list", store, "--json").stdout)
        assert listed["backups"] == []
        r = run_cli("verify", store, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["count_drift"] == []
        shutil.rmtree(store)
    assert peaks[1] - peaks[0] < 24 << 20, peaks


def _same_sparse(a: str, b: str) -> bool:
    """Same size, same allocated ranges, same bytes in them (the holes read as zeros either way)."""
    ranges = allocated_ranges(a)
    if os.path.getsize(a) != os.path.getsize(b) or allocated_ranges(b) != ranges:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return all(os.pread(fa.fileno(), n, at) == os.pread(fb.fileno(), n, at) for at, n in ranges)


@pytest.mark.slow
def test_a_restores_memory_does_not_grow_with_the_segments_it_reads(tmp_path):
    """A restore reads every segment of its manifest through LMDB's map, in
    one read transaction: they all stayed resident, 85 and 213 MB peak RSS
    for 2,048 and 8,192 segments (1.3 GB for the item's 4 TiB disk, whose
    segments are 1 GiB).  Every segment read is paced now (ManifestStore.segment,
    chunkstore/residency.py): 52 and 58 MB (56 MB for the 4 TiB disk)."""
    peaks = []
    for n in (2048, 8192):
        img, store, out = str(tmp_path / f"{n}.img"), str(tmp_path / f"{n}-store"), str(tmp_path / f"{n}-r.img")
        _fragmented(img, n << 26, n)
        assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
        assert run_cli("backup", store, img, "--disk", "d").returncode == 0
        peaks.append(_cli_peak_rss("restore", store, "d@latest", out))
        assert _same_sparse(img, out)  # its data where the source has it, holes elsewhere
        # (st_blocks also counts ext4's extent-tree blocks, which differ by a few.)
        assert os.stat(out).st_blocks <= os.stat(img).st_blocks * 1.1
        for path in (img, out):
            os.unlink(path)
        shutil.rmtree(store)
    assert peaks[1] - peaks[0] < 24 << 20, peaks
