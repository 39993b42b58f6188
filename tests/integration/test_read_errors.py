"""verify and read errors (issue 9, item 6): an I/O error in the middle of a
pack is reported with the pack and offset, counted as damage, and the rest
of the store is still checked.

The EIO comes from tests/faults/sitecustomize.py (a bad byte range of one
pack file, raised at ``os.pread``): this machine's kernel has no
device-mapper driver for a real ``error`` target.
"""

from __future__ import annotations

import json
import os

from chunkstore.pack import PACK_HEADER, RECORD_HEADER_SIZE, iter_pack_paths, scan_pack
import jsonshape
from helpers import chunk_packs, REPO_ROOT, make_sparse, rng, run_cli, write_at

CS = 64 << 10
N = 24


def _store(tmp_path):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    img = str(tmp_path / "d.img")
    make_sparse(img, 32 * CS)
    write_at(img, 0, rng(93).bytes(N * CS))
    assert run_cli("backup", store, img, "--disk", "d", "--threads", "1").returncode == 0
    [pack] = chunk_packs(store)  # the commit's metadata pack aside
    return store, pack, scan_pack(pack)


def _verify_with_bad_range(store: str, pack: str, start: int, end: int, *extra: str):
    st = os.stat(pack)
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO_ROOT, "tests", "faults"),
           "BLOCKVAULT_TEST_EIO": f"{st.st_dev}:{st.st_ino}:{start}:{end}"}
    return run_cli("verify", store, *extra, env=env)


def test_a_read_error_is_reported_with_pack_and_offset_and_verify_goes_on(tmp_path):
    store, pack, scan = _store(tmp_path)
    victim = scan.records[10]
    bad_at = victim.offset + RECORD_HEADER_SIZE + 4096
    proc = _verify_with_bad_range(store, pack, bad_at, bad_at + 512, "--json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert not jsonshape.check(doc, "verify", jsonshape.parse()[0])
    pid = os.path.basename(pack)[:-5]
    assert doc["read_errors"] == [{"id": pid, "path": pack, "offset": victim.offset,
                                   "length": RECORD_HEADER_SIZE + victim.header.stored_len,
                                   "error": "Input/output error"}]
    # Only the record under the bad sector is lost; every other chunk was read and checked.
    assert doc["chunks_checked"] == N
    assert [b["digest"] for b in doc["bad_chunks"]] == [victim.header.digest.hex()]
    reason = doc["bad_chunks"][0]["reason"]
    assert f"read error in pack {pid} at offset {victim.offset}" in reason and "Input/output error" in reason
    assert doc["bad_chunks"][0]["backups"] == [{"id": "d@1", "offsets": [10 * CS], "count": 1}]
    text = _verify_with_bad_range(store, pack, bad_at, bad_at + 512)
    assert text.returncode == 3 and f"READ ERROR pack {pid}" in text.stdout and f"at offset {victim.offset}" in text.stdout
    assert "read error" in text.stderr and "store DAMAGED" in text.stdout


def test_a_read_error_in_a_pack_header_is_damage_too(tmp_path):
    store, pack, _ = _store(tmp_path)
    proc = _verify_with_bad_range(store, pack, 0, PACK_HEADER.size, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3 and doc["chunks_checked"] == N and doc["bad_chunks"] == []
    assert doc["read_errors"][0]["offset"] == 0 and "read error at offset 0" in doc["bad_packs"][0]["reason"]


def test_the_fault_is_inert_without_its_variable(tmp_path):
    store, pack, _ = _store(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO_ROOT, "tests", "faults")}
    assert run_cli("verify", store, env=env).returncode == 0
