"""A store on a read-only mount (issue 9 item 14): list, verify, restore and
stats work, and every writer is refused with one clear message.

Tests run as root, and root writes through any file mode, so the store is
made read-only the honest way: a read-only bind mount of its directory."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import chunk_packs, make_sparse, rng, run_cli, same_file, snapshot, store_fingerprint, write_at

CS = 64 << 10
MESSAGE = ("the store at {} is read-only (mounted read-only?); writing is impossible: "
           "list, verify, restore and stats work")


MOUNTED: list[str] = []


def _mount_read_only(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    bind = subprocess.run(["mount", "--bind", src, dst], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here (mount --bind: {bind.stderr.strip()})")
    MOUNTED.append(dst)
    ro = subprocess.run(["mount", "-o", "remount,bind,ro", dst], capture_output=True, text=True)
    if ro.returncode != 0:
        pytest.skip(f"cannot make a bind mount read-only here: {ro.stderr.strip()}")


@pytest.fixture
def chain(tmp_path):
    """A store with two points of one disk, the images they were read from, and
    a read-only mount of the directory holding the store."""
    src = tmp_path / "rw"
    src.mkdir()
    store = str(src / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    img = str(tmp_path / "d.img")
    make_sparse(img, 40 * CS + 123)
    write_at(img, 3 * CS + 7, rng(1).bytes(5 * CS))
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    first = snapshot(img, str(tmp_path / "d1.img"))
    write_at(img, 30 * CS, rng(2).bytes(CS + 99))
    assert run_cli("backup", store, img, "--disk", "d", "--mode", "incremental").returncode == 0
    mnt = str(tmp_path / "ro")
    yield {"src": str(src), "rw_store": store, "mnt": mnt, "store": os.path.join(mnt, "store"),
           "points": {"d@1": first, "d@2": img}, "image": img}
    # (os.path.ismount cannot tell a bind mount of the same file system)
    while mnt in MOUNTED:
        MOUNTED.remove(mnt)
        subprocess.run(["umount", mnt], check=True)


def _reads_and_refuses(tmp_path, chain, mounted: bool = True) -> None:
    store, before = chain["store"], store_fingerprint(chain["rw_store"])
    if mounted:
        with pytest.raises(OSError):  # the mount really is read-only, for root too
            open(os.path.join(store, "probe"), "w")

    listed = run_cli("list", store, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [b["id"] for b in json.loads(listed.stdout)["backups"]] == ["d@1", "d@2"]

    verified = run_cli("verify", store)
    assert verified.returncode == 0, verified.stderr
    assert "store OK" in verified.stdout

    stats = run_cli("stats", store, "--json")
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert doc["backups"] == 2 and doc["disks"] == 1 and doc["chunks"] > 0

    # A database the store never made (no VM was ever backed up) reads as empty.
    vms = run_cli("vsphere", "list", store)
    assert vms.returncode == 0, vms.stderr
    assert "no VM backups" in vms.stdout

    for ref, image in chain["points"].items():
        out = str(tmp_path / f"restored-{ref.replace('@', '-')}.img")
        r = run_cli("restore", store, ref, out)
        assert r.returncode == 0, r.stderr
        assert same_file(out, image), ref

    for args in (("backup", store, chain["image"], "--disk", "d"),
                 ("backup", store, chain["image"], "--disk", "other", "--mode", "full"),
                 ("rebuild-index", store)):
        r = run_cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.strip() == "blockvault: error: " + MESSAGE.format(store), r.stderr
        assert "Traceback" not in r.stderr
    r = run_cli("backup", store, chain["image"], "--disk", "d", "--json")
    error = json.loads(r.stdout)["error"]
    assert r.returncode == 1 and error["code"] == "store_read_only"
    assert error["message"] == MESSAGE.format(store)
    assert store_fingerprint(chain["rw_store"]) == before


def test_a_store_on_a_read_only_mount_is_read_and_refuses_writers(tmp_path, chain):
    _mount_read_only(chain["src"], chain["mnt"])
    _reads_and_refuses(tmp_path, chain)


def test_a_read_only_store_without_a_lock_file_is_read_too(tmp_path, chain):
    """A copy or snapshot may come without LMDB's lock.mdb, and a read-only
    file system cannot have one made."""
    os.unlink(os.path.join(chain["rw_store"], "index", "lock.mdb"))
    _mount_read_only(chain["src"], chain["mnt"])
    _reads_and_refuses(tmp_path, chain)
    assert not os.path.exists(os.path.join(chain["rw_store"], "index", "lock.mdb"))


def test_an_index_that_may_not_be_written_opens_without_its_lock(tmp_path, chain):
    """Immutable index files (chattr +i: not even root may open them for
    writing) on a writable file system: LMDB cannot use its lock file, so the
    store is read without one, and writers are refused."""
    index = os.path.join(chain["rw_store"], "index")
    files = [os.path.join(index, n) for n in ("data.mdb", "lock.mdb")]
    made = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {made.stderr.strip()}")
    try:
        shutil.rmtree(chain["mnt"], ignore_errors=True)
        os.symlink(chain["src"], chain["mnt"])  # the same paths as the mounted tests
        _reads_and_refuses(tmp_path, chain, mounted=False)
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)


def test_verify_of_a_damaged_read_only_store_reports_the_damage_it_cannot_mark(tmp_path, chain):
    packs = chunk_packs(chain["rw_store"])  # not a commit's metadata pack
    with open(packs[0], "r+b") as f:  # a byte inside the first record's payload (128-byte pack header)
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = store_fingerprint(chain["rw_store"])
    _mount_read_only(chain["src"], chain["mnt"])
    r = run_cli("verify", chain["store"], "--json")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["bad_chunks"], doc
    assert "read-only" in json.dumps(doc) + r.stderr
    assert store_fingerprint(chain["rw_store"]) == before
