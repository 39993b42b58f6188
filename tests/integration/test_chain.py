"""T1..T5 of full, incremental and differential backups with growth and shrink:
every point restores byte-identical to the image as it was backed up."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

import native
from engine.backup import backup_disk, backup_image, commit_backups
from engine.errors import BadInputError, NotFoundError
from engine.restore import restore_backup
from helpers import allocated_ranges, make_sparse, resize, rng, same_file, snapshot, text_bytes, write_at

CS = 64 << 10


def cbt_file(tmp_path, name, size, areas):
    p = tmp_path / name
    p.write_text(json.dumps({"startOffset": 0, "length": size,
                             "changedArea": [{"start": s, "length": n} for s, n in areas]}))
    return str(p)


def scribble(path, r, count, size, max_len=200_000):
    """Unaligned writes; returns the areas CBT would report."""
    areas = []
    for _ in range(count):
        n = int(r.integers(1, max_len))
        s = int(r.integers(0, max(1, size - n)))
        write_at(path, s, r.bytes(n) if r.random() < 0.5 else text_bytes(r, n))
        areas.append((s, n))
    return areas


def test_chain_with_growth_shrink_and_every_mode(repo, tmp_path):
    r = rng(10)
    img = str(tmp_path / "disk.img")
    size1 = 20 * (1 << 20) + 12345            # not a multiple of the chunk size
    make_sparse(img, size1)
    scribble(img, r, 30, size1)
    points = {}

    t1 = backup_image(repo, img, "d", "full")
    points[t1.id] = snapshot(img, str(tmp_path / "t1"))
    since_full = []

    a2 = scribble(img, r, 12, size1)
    since_full += a2
    t2 = backup_image(repo, img, "d", "incremental", cbt_file(tmp_path, "c2", size1, a2))
    points[t2.id] = snapshot(img, str(tmp_path / "t2"))
    assert t2.base == t1.id and t2.stats["bytes_read"] < size1 // 2

    size3 = 28 * (1 << 20) + 777               # growth; CBT lists the writes in the new space
    resize(img, size3)
    a3 = scribble(img, r, 6, size3) + [(size1 + 5000, 40_000)]
    write_at(img, size1 + 5000, r.bytes(40_000))
    write_at(img, size1 - 10, b"edge-of-old-size")  # straddles the old end
    a3.append((size1 - 10, 16))
    since_full += a3
    t3 = backup_image(repo, img, "d", "incremental", cbt_file(tmp_path, "c3", size3, a3))
    points[t3.id] = snapshot(img, str(tmp_path / "t3"))

    size4 = 16 * (1 << 20) + 5                 # shrink, then a differential against T1
    resize(img, size4)
    a4 = scribble(img, r, 5, size4)
    since_full = [(s, min(n, size4 - s)) for s, n in since_full + a4 if s < size4]
    t4 = backup_image(repo, img, "d", "differential", cbt_file(tmp_path, "c4", size4, since_full))
    points[t4.id] = snapshot(img, str(tmp_path / "t4"))
    assert t4.base == t1.id and t4.kind == "differential"

    scribble(img, r, 8, size4)                 # an incremental without a change list
    write_at(img, 3 * CS, bytes(CS))           # data turned to zeros must be zeros after restore
    t5 = backup_image(repo, img, "d", "incremental")
    points[t5.id] = snapshot(img, str(tmp_path / "t5"))
    assert t5.base == t4.id

    for ident, expected in points.items():
        out = str(tmp_path / f"restore-{ident.replace('@', '-')}")
        result = restore_backup(repo, ident, out)
        assert same_file(out, expected), ident
        assert os.path.getsize(out) == os.path.getsize(expected)
        assert result.record.id == ident
    latest = str(tmp_path / "latest")
    restore_backup(repo, "d@latest", latest)
    assert same_file(latest, points[t5.id])


def test_growth_without_cbt_entries_is_still_read(repo, tmp_path):
    """A change list that forgets the new space must not lose data written there."""
    r = rng(11)
    img = str(tmp_path / "g.img")
    make_sparse(img, 4 << 20)
    write_at(img, 0, r.bytes(CS))
    backup_image(repo, img, "g", "full")
    resize(img, 9 << 20)
    write_at(img, (6 << 20) + 3, r.bytes(70_000))
    rec = backup_image(repo, img, "g", "incremental", cbt_file(tmp_path, "c", 9 << 20, []))
    out = str(tmp_path / "out")
    restore_backup(repo, rec.id, out)
    assert same_file(out, img)


def test_holes_at_every_chunk_boundary(repo, tmp_path):
    r = rng(12)
    img = str(tmp_path / "h.img")
    n = 48
    make_sparse(img, n * CS)
    for k in range(1, n):
        if k % 4 == 0:
            write_at(img, k * CS - 2048, r.bytes(4096))   # data straddling the boundary
        elif k % 4 == 1:
            write_at(img, k * CS, r.bytes(CS))             # exactly one chunk; a hole follows
    write_at(img, n * CS - 1, b"\x01")                     # the very last byte
    rec = backup_image(repo, img, "h", "full")
    out = str(tmp_path / "h.out")
    restore_backup(repo, rec.id, out)
    assert same_file(out, img)
    # Zero chunks come back as holes: chunks k % 4 == 2 hold no data and must
    # not be allocated in the restored file; every other chunk (but 0) has data.
    allocated = allocated_ranges(out)
    data_chunks = {k for s, n_ in allocated for k in range(s // CS, -(-(s + n_) // CS))}
    holes = {k for k in range(n) if k % 4 == 2}
    assert holes and not holes & data_chunks
    assert set(range(1, n)) - holes <= data_chunks
    assert rec.stats["zero_chunks"] + rec.stats["new_chunks"] + rec.stats["dedup_chunks"] == rec.stats["chunks_read"]


def test_zero_blocks_inside_a_chunk_stay_holes(tmp_path):
    """With 1 MiB chunks a chunk is stored whole, but the 64 KiB blocks of it
    that are zeros are not written back: the restore keeps the source's holes."""
    from engine.repository import Repository
    big = 1 << 20
    repo = Repository.init(str(tmp_path / "s1m"), chunk_size=big)
    r = rng(13)
    img = str(tmp_path / "p.img")
    make_sparse(img, 3 * big + 5000)                    # ends inside a chunk
    write_at(img, 0, r.bytes(CS))                        # block 0 of chunk 0
    write_at(img, 5 * CS + 100, r.bytes(10))             # inside block 5
    write_at(img, big + 15 * CS, r.bytes(CS))            # the last block of chunk 1
    write_at(img, 3 * big, r.bytes(5000))                # the short last chunk
    rec = backup_image(repo, img, "p", "full")
    out = str(tmp_path / "p.out")
    restore_backup(repo, rec.id, out)
    assert same_file(out, img)
    blocks = {k for s, n in allocated_ranges(out) for k in range(s // CS, -(-(s + n) // CS))}
    assert blocks == {0, 5, 16 + 15, 48}
    repo.close()


def test_differential_needs_a_full(repo, tmp_path):
    img = str(tmp_path / "x.img")
    make_sparse(img, 1 << 20)
    with pytest.raises(NotFoundError, match="run a full backup first"):
        backup_image(repo, img, "never", "differential")


def test_empty_and_all_hole_disks(repo, tmp_path):
    """An all-hole disk backs up and restores as holes.  An empty (0-byte) image is refused
    since issue 9 item 15 (a backup of nothing is a mistake), but a 0-byte point made before
    that, here through backup_disk under the source check, still restores."""
    for name, size in (("empty", 0), ("holes", 50 * CS + 7)):
        img = str(tmp_path / f"{name}.img")
        make_sparse(img, size)
        if size == 0:
            with pytest.raises(BadInputError, match=r"empty\.img is empty \(0 bytes\); nothing to back up"):
                backup_image(repo, img, name, "full")
            with native.open_raw(img) as disk, repo.store.writer() as session, ThreadPoolExecutor(2) as pool:
                prepared = backup_disk(repo, session, pool, 2, disk, name, "full")
                commit_backups(repo, session, [prepared])
            rec = prepared.record
        else:
            rec = backup_image(repo, img, name, "full")
        assert rec.stats["new_chunks"] == 0
        out = str(tmp_path / f"{name}.out")
        restore_backup(repo, rec.id, out)
        assert os.path.getsize(out) == size and allocated_ranges(out) == []


def _restore_all(repo, tmp_path, points):
    for ident, expected in points.items():
        out = str(tmp_path / f"restore-{ident.replace('@', '-')}")
        restore_backup(repo, ident, out, force=True)
        assert same_file(out, expected), ident


def test_shrink_then_grow_keeps_no_stale_byte_at_the_old_edge(repo, tmp_path):
    """10.5 chunks -> 7.25 -> 12.7 with change lists that never mention the edge chunk 7
    (7.25 chunks is a 4 KiB multiple: no allocated block of the file reaches past it, so only
    a resize rule, not the allocation, makes a backup read chunk 7 again; today a resized
    disk is read in full, it used to be an edge re-read that a mutant removed): the bytes of
    chunk 7 past 7.25 chunks are gone after the shrink and must come back as zeros after the
    grow, not as what the first backup read there."""
    r = rng(14)
    img = str(tmp_path / "e.img")
    make_sparse(img, int(10.5 * CS))
    write_at(img, 0, r.bytes(int(10.5 * CS)))               # every byte non-zero, the edge chunk too
    points = {}
    t1 = backup_image(repo, img, "e", "full")
    points[t1.id] = snapshot(img, str(tmp_path / "e1"))

    resize(img, int(7.25 * CS))
    write_at(img, 6 * CS + 100, b"\xff")                     # one byte next to the edge chunk
    t2 = backup_image(repo, img, "e", "incremental", cbt_file(tmp_path, "e2", int(7.25 * CS), [(6 * CS + 100, 1)]))
    points[t2.id] = snapshot(img, str(tmp_path / "e2"))

    resize(img, int(12.7 * CS))
    write_at(img, 11 * CS, b"new space")
    t3 = backup_image(repo, img, "e", "incremental", cbt_file(tmp_path, "e3", int(12.7 * CS), [(11 * CS, 9)]))
    points[t3.id] = snapshot(img, str(tmp_path / "e3"))
    with open(img, "rb") as f:
        f.seek(int(7.25 * CS))
        assert f.read(CS // 2) == bytes(CS // 2)            # what a stale edge chunk would get wrong
    assert t2.warnings and t3.warnings                      # both resizes said why the list was not used
    _restore_all(repo, tmp_path, points)

    # The same at an unchanged size: now the list is used, and the restore is still exact.
    write_at(img, 2 * CS + 5, b"small change")
    t4 = backup_image(repo, img, "e", "incremental", cbt_file(tmp_path, "e4", int(12.7 * CS), [(2 * CS + 5, 12)]))
    points[t4.id] = snapshot(img, str(tmp_path / "e4"))
    assert t4.warnings == [] and t4.stats["changed_areas"] and t4.stats["bytes_read"] == CS
    _restore_all(repo, tmp_path, points)


def test_differential_after_a_shrink_and_regrow_in_between(repo, tmp_path):
    """T1 full at S; T2 shrinks; T3 grows back to S; a differential on T1 at size S would
    see no size change against its base, but the bytes past the shrink were zeroed in
    between: the points since the base tell, and the disk is read in full."""
    r = rng(15)
    size = 10 * CS + 300
    img = str(tmp_path / "s.img")
    make_sparse(img, size)
    write_at(img, 0, r.bytes(size))
    backup_image(repo, img, "s", "full")
    resize(img, 4 * CS + 1)
    backup_image(repo, img, "s", "incremental")
    resize(img, size)
    backup_image(repo, img, "s", "incremental")
    write_at(img, CS, b"since the full")
    t4 = backup_image(repo, img, "s", "differential", cbt_file(tmp_path, "s4", size, [(CS, 14)]))
    out = str(tmp_path / "s4.out")
    restore_backup(repo, t4.id, out)
    assert same_file(out, img)
    assert t4.base == "s@1" and len(t4.warnings) == 1
    assert "s@2 was read from (size 262145 -> 655660 bytes)" in t4.warnings[0]


def test_disk_names_that_are_prefixes_of_others(repo, tmp_path):
    """'d' and 'd2' share a key prefix but not a chain: d's first point is d@1, and
    d@latest, d's list and d's incremental base are d's, never d2's."""
    r = rng(16)
    img2, img = str(tmp_path / "d2.img"), str(tmp_path / "d.img")
    make_sparse(img2, 8 * CS)
    make_sparse(img, 6 * CS)
    for k in range(3):
        write_at(img2, k * CS, r.bytes(CS))
        assert backup_image(repo, img2, "d2", "full" if k == 0 else "incremental").id == f"d2@{k + 1}"
    write_at(img, 0, r.bytes(2 * CS))
    first = backup_image(repo, img, "d", "full")
    assert first.id == "d@1"
    write_at(img, 3 * CS, b"second")
    second = backup_image(repo, img, "d", "incremental", cbt_file(tmp_path, "dd", 6 * CS, [(3 * CS, 6)]))
    assert second.id == "d@2" and second.base == "d@1" and second.warnings == []
    with repo.store.read_txn() as txn:
        assert repo.catalog.resolve(txn, "d@latest").id == "d@2"
        assert [b.id for b in repo.catalog.for_disk(txn, "d")] == ["d@1", "d@2"]
        assert repo.catalog.resolve(txn, "d2@latest").id == "d2@3"
    out = str(tmp_path / "d.out")
    restore_backup(repo, "d@latest", out)
    assert same_file(out, img)
    with pytest.raises(NotFoundError, match="no backup d@3"):
        restore_backup(repo, "d@3", str(tmp_path / "none"))
