"""An incremental whose source is not the chain's (another image, a resized or
replaced file) warns loudly, does not use its change list, and restores
exactly the source it read."""

import json
import os
import subprocess
import sys

import pytest

from engine.catalog import BackupRecord
from engine.identity import differences
from helpers import REPO_ROOT, make_sparse, resize, rng, run_cli, same_file, write_at

CS = 64 << 10


def _image(path, size, seed):
    make_sparse(path, size)
    r = rng(seed)
    for k in range(0, size // CS, 3):
        write_at(path, k * CS + 11, r.bytes(CS // 2))
    return path


def _cbt(tmp_path, size, areas, name="cbt.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"startOffset": 0, "length": size,
                             "changedArea": [{"start": s, "length": n} for s, n in areas]}))
    return str(p)


def _backup(*args):
    proc = run_cli("backup", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def _restored_equals(store, ident, expected, tmp_path):
    out = str(tmp_path / f"restore-{ident.replace('@', '-').replace('/', '_')}.img")
    proc = run_cli("restore", store, ident, out)
    assert proc.returncode == 0, proc.stderr
    return same_file(out, expected)


@pytest.mark.parametrize("size_b", [24 * CS + 7, 32 * CS + 5], ids=["smaller-image", "same-size-image"])
def test_incremental_of_another_image_warns_and_reads_it_all(store_path, tmp_path, size_b):
    """The issue's case scaled down: image A is the chain; B (another path, maybe another
    size) comes with a change list that names one small area of B."""
    a = _image(str(tmp_path / "a.img"), 32 * CS + 5, seed=1)
    b = _image(str(tmp_path / "b.img"), size_b, seed=2)
    first, _ = _backup(store_path, a, "--disk", "web01")
    assert first["warnings"] == []
    doc, stderr = _backup(store_path, b, "--disk", "web01", "--mode", "incremental",
                          "--changed-areas", _cbt(tmp_path, size_b, [(CS, 100)]))
    assert doc["id"] == "web01@2" and doc["kind"] == "incremental"
    [warning] = doc["warnings"]
    assert warning.startswith("SOURCE CHANGED: disk web01 is not read from the source web01@1 was read from (")
    assert f"path {a} -> {b}" in warning and "the change list is not used" in warning
    assert ("size" in warning) == (size_b != 32 * CS + 5)
    if size_b != 32 * CS + 5:
        assert f"size {32 * CS + 5} -> {size_b} bytes" in warning
    assert f"blockvault: warning: {warning}\n" in stderr
    assert doc["stats"]["changed_areas"] is False
    assert doc["stats"]["bytes_read"] == len(range(0, size_b // CS, 3)) * CS  # every allocated chunk of B
    # The catalog keeps the warning, and the new point is B, byte for byte.
    listing = json.loads(run_cli("list", store_path, "--disk", "web01", "--json").stdout)
    assert listing["backups"][1]["warnings"] == [warning]
    assert listing["backups"][1]["metadata"]["source"] == {"kind": "raw", "path": b, "size": size_b}
    assert _restored_equals(store_path, "web01@2", b, tmp_path)
    assert _restored_equals(store_path, "web01@1", a, tmp_path)


def test_same_source_uses_the_change_list_without_a_warning(store_path, tmp_path):
    a = _image(str(tmp_path / "a.img"), 32 * CS, seed=3)
    _backup(store_path, a, "--disk", "d")
    write_at(a, 5 * CS + 3, b"changed")
    # The same file named by a relative path from another directory is the same source.
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "backup", store_path, os.path.relpath(a, str(tmp_path)),
         "--disk", "d", "--mode", "incremental", "--changed-areas", _cbt(tmp_path, 32 * CS, [(5 * CS + 3, 7)]),
         "--json"],
        capture_output=True, text=True, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    # stderr carries only the summary line (no warning).
    assert doc["warnings"] == [] and "warning:" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "0 warnings" in proc.stderr, proc.stderr
    assert doc["stats"]["changed_areas"] is True and doc["stats"]["bytes_read"] == CS
    assert _restored_equals(store_path, "d@2", a, tmp_path)


def test_a_resized_disk_does_not_use_its_change_list(store_path, tmp_path):
    """A grown file at the same path: the list (even one of the old length) is not refused
    but not used either; the whole disk is read and restores exactly."""
    a = _image(str(tmp_path / "a.img"), 20 * CS + 100, seed=4)
    _backup(store_path, a, "--disk", "g")
    resize(a, 30 * CS + 1)
    write_at(a, 25 * CS, b"in the new space")
    write_at(a, 20 * CS + 50, b"across the old end")
    doc, stderr = _backup(store_path, a, "--disk", "g", "--mode", "incremental",
                          "--changed-areas", _cbt(tmp_path, 20 * CS + 100, []))
    [warning] = doc["warnings"]
    assert f"(size {20 * CS + 100} -> {30 * CS + 1} bytes)" in warning and "path" not in warning.split("(")[1]
    assert "blockvault: warning: SOURCE CHANGED" in stderr
    assert _restored_equals(store_path, "g@2", a, tmp_path)


def test_a_file_replaced_by_a_vmdk_at_the_same_path(store_path, tmp_path):
    a = _image(str(tmp_path / "disk"), 16 * CS, seed=5)
    _backup(store_path, a, "--disk", "k")
    raw_copy = str(tmp_path / "raw-copy")
    os.rename(a, raw_copy)
    write_at(raw_copy, 0, b"boot sector")
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", raw_copy, a], check=True)
    doc, stderr = _backup(store_path, a, "--disk", "k", "--mode", "incremental",
                          "--changed-areas", _cbt(tmp_path, 16 * CS, []))
    [warning] = doc["warnings"]
    assert "kind raw -> vmdk" in warning and "create type (none) -> monolithicSparse" in warning
    assert _restored_equals(store_path, "k@2", raw_copy, tmp_path)


def test_differences_of_records_written_before_identities():
    """Old records have no size in their source and may hold a relative path: no false alarm."""
    old = BackupRecord(disk="d", seq=1, time=0, kind="full", base=None, size=100, chunk_size=CS,
                       metadata={"source": {"kind": "raw", "path": "disk.img"}})
    assert differences(old, {"kind": "raw", "path": "/srv/disk.img", "size": 100}, 100) == []
    assert differences(old, {"kind": "vmdk", "path": "/srv/disk.img", "size": 100,
                             "create_type": "monolithicSparse"}, 100) == [
        "kind raw -> vmdk", "create type (none) -> monolithicSparse"]
    assert differences(old, None, 99) == ["size 100 -> 99 bytes"]
    legacy = json.loads(old.to_json())
    del legacy["warnings"]
    assert BackupRecord.from_json(json.dumps(legacy).encode()).warnings == []
