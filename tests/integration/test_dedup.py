from chunkstore.codec import CODEC_RAW
from chunkstore.index import IndexEntry
from engine.backup import backup_image
from engine.restore import restore_backup
from engine.stats import store_stats
from helpers import make_sparse, rng, same_file, text_bytes, write_at

CS = 64 << 10


def test_dedup_across_disks(repo, tmp_path):
    r = rng(20)
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    content = text_bytes(r, 2 << 20) + r.bytes(2 << 20)
    for path, at in ((a, 0), (b, 8 * CS)):   # same data, other offsets (chunk aligned)
        make_sparse(path, 16 << 20)
        write_at(path, at, content)
    first = backup_image(repo, a, "vm1-disk0", "full")
    second = backup_image(repo, b, "vm2-disk0", "full")
    assert first.stats["new_chunks"] == len(content) // CS
    assert second.stats["new_chunks"] == 0 and second.stats["dedup_chunks"] == len(content) // CS
    stats = store_stats(repo)
    assert stats["dedup_ratio"] == 2.0 and stats["disks"] == 2
    for rec, src in ((first, a), (second, b)):
        out = str(tmp_path / f"{rec.disk}.out")
        restore_backup(repo, rec.id, out)
        assert same_file(out, src)


def test_repeated_chunks_within_one_disk_are_stored_once(repo, tmp_path):
    img = str(tmp_path / "rep.img")
    make_sparse(img, 64 * CS)
    block = rng(21).bytes(CS)
    for k in range(0, 64, 2):
        write_at(img, k * CS, block)
    rec = backup_image(repo, img, "rep", "full")
    assert rec.stats["new_chunks"] == 1 and rec.stats["dedup_chunks"] == 31
    out = str(tmp_path / "rep.out")
    restore_backup(repo, rec.id, out)
    assert same_file(out, img)


def test_incompressible_data_is_stored_raw(repo, tmp_path):
    img = str(tmp_path / "noise.img")
    make_sparse(img, 8 << 20)
    write_at(img, 0, rng(22).bytes(8 << 20))
    rec = backup_image(repo, img, "noise", "full")
    assert rec.stats["stored_bytes"] <= (8 << 20) + 128 * 64  # payload + record headers only
    with repo.store.read_txn() as txn, txn.cursor(db=repo.store.chunks_db) as cur:
        assert all(IndexEntry.decode(v).codec == CODEC_RAW for _, v in cur)
    out = str(tmp_path / "noise.out")
    restore_backup(repo, rec.id, out)
    assert same_file(out, img)


def test_unchanged_incremental_without_cbt_stores_nothing(repo, tmp_path):
    img = str(tmp_path / "same.img")
    make_sparse(img, 4 << 20)
    write_at(img, 100, text_bytes(rng(23), 1 << 20))
    backup_image(repo, img, "same", "full")
    again = backup_image(repo, img, "same", "incremental")
    assert again.stats["new_chunks"] == 0 and again.stats["stored_bytes"] == 0
