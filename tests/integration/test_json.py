"""Every command's ``--json`` output, checked against docs/JSON.md (issue 8, item 9).

The documentation's field tables are the schema (tests/jsonshape.py): a field
the code prints but the document does not list, a type that differs, or a
documented field that is missing fails here, so the two cannot drift apart.
Failures print a JSON error document too, with a stable code.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys

import lmdb
import pytest

import jsonshape
from chunkstore.pack import RECORD_MAGIC, scan_pack
from lifecycle_helpers import chunk_digests, delete_point
from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, store_fingerprint, text_bytes, write_at

CS = 64 << 10
SECTIONS, CODES = jsonshape.parse()


def run_json(*args, expect: int = 0) -> tuple[dict, subprocess.CompletedProcess]:
    proc = run_cli(*args, "--json")
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout), proc


def assert_shape(doc: dict, section: str) -> None:
    problems = jsonshape.check(doc, section, SECTIONS)
    assert not problems, "\n".join(problems)


def assert_iso(doc: dict, key: str = "time") -> None:
    iso = datetime.datetime.fromisoformat(doc[f"{key}_iso"])
    assert iso.tzinfo is not None, doc[f"{key}_iso"]  # with an offset
    assert abs(iso.timestamp() - doc[key]) < 1.0


def test_the_document_covers_every_command():
    commands = {"init", "backup", "list", "restore", "verify", "stats", "gc", "rebuild", "rebuild-index",
                "rebuild --config", "demo", "vsphere vms", "vsphere backup", "vsphere list", "vsphere restore", "error",
                "protect", "delete", "forget", "files partitions", "files ls", "files get", "serve", "mount",
                "umount", "copy"}
    assert commands <= set(SECTIONS), commands - set(SECTIONS)
    for name in SECTIONS:
        jsonshape.expand(SECTIONS, name)  # every shape a table names exists


def test_every_error_code_is_documented():
    from engine.commandline import EXIT_DAMAGED, _code_table
    produced = {code for _, code in _code_table()} | {"no_space", "os_error", "error", "damaged", "demo_failed"}
    assert produced == set(CODES), (produced ^ set(CODES))
    assert CODES["usage"] == 2 and CODES["store_locked"] == 4 and CODES["interrupted"] == 130
    assert CODES["damaged"] == EXIT_DAMAGED


@pytest.fixture
def image(tmp_path):
    img = str(tmp_path / "d.img")
    make_sparse(img, 48 * CS + 5)
    write_at(img, 3 * CS + 1, text_bytes(rng(7), 5 * CS))
    write_at(img, 30 * CS, rng(8).bytes(2 * CS))
    return img


def test_store_commands_match_the_document(tmp_path, image):
    store = str(tmp_path / "store")
    doc, _ = run_json("init", store, "--chunk-size", "64K")
    assert_shape(doc, "init")
    assert doc["ok"] is True and doc["chunk_size"] == CS

    # A relative image path: the catalog records it absolute.
    rel = os.path.relpath(image, REPO_ROOT)
    full, proc = run_json("backup", store, rel, "--disk", "d")
    assert_shape(full, "backup")
    assert full["ok"] is True and full["warnings"] == [] and full["id"] == "d@1"
    assert full["metadata"]["source"]["path"] == image and os.path.isabs(full["metadata"]["source"]["path"])
    assert_iso(full)

    cbt = tmp_path / "cbt.json"
    cbt.write_text(json.dumps({"startOffset": 0, "length": 48 * CS + 5,
                               "changedArea": [{"start": 30 * CS, "length": CS}]}))
    inc, _ = run_json("backup", store, image, "--disk", "d", "--mode", "incremental", "--changed-areas", str(cbt))
    assert_shape(inc, "backup")
    assert inc["base"] == "d@1" and inc["stats"]["changed_areas"] is True and inc["warnings"] == []

    listing, _ = run_json("list", store)
    assert_shape(listing, "list")
    assert [b["id"] for b in listing["backups"]] == ["d@1", "d@2"]
    for rec in listing["backups"]:
        assert_iso(rec)
        assert rec["metadata"]["source"]["path"] == image

    out = str(tmp_path / "r.img")
    restored, _ = run_json("restore", store, "d@latest", out)
    assert_shape(restored, "restore")
    assert restored["id"] == "d@2" and same_file(out, image)

    verified, _ = run_json("verify", store)
    assert_shape(verified, "verify")
    assert verified["ok"] is True and "error" not in verified

    stats, _ = run_json("stats", store)
    assert_shape(stats, "stats")
    assert stats["backups"] == 2

    rebuilt, _ = run_json("rebuild-index", store)
    assert_shape(rebuilt, "rebuild-index")
    assert rebuilt["chunks"] == stats["chunks"]
    rebuilt, _ = run_json("rebuild", store)
    assert_shape(rebuilt, "rebuild")
    assert rebuilt["records"]["catalog"] == 2 and rebuilt["commits"] == 2 and rebuilt["moved_aside"] is None
    recreated, _ = run_json("rebuild", "--config", store)
    assert_shape(recreated, "rebuild --config")
    assert recreated["changed"] is False and recreated["chunk_size"] == CS

    # copy into a new store, and its copies listed with their origin.
    other = str(tmp_path / "other")
    assert run_cli("init", other, "--chunk-size", "64K").returncode == 0
    copied, _ = run_json("copy", store, other, "--all")
    assert_shape(copied, "copy")
    assert [c["copied_to"] for c in copied["copied"]] == ["d@1", "d@2"] and copied["stats"]["chunks_sent"] > 0
    planned, _ = run_json("copy", store, other, "--all", "--dry-run")
    assert_shape(planned, "copy")
    assert planned["copied"] == [] and planned["stats"] is None and len(planned["skipped"]) == 2
    listing, _ = run_json("list", other)
    assert_shape(listing, "list")
    assert [b["metadata"]["copied_from"]["id"] for b in listing["backups"]] == ["d@1", "d@2"]

    # gc, with something to do: a point of new data, released as delete/forget release one.
    write_at(image, 0, rng(9).bytes(4 * CS))
    assert run_cli("backup", store, image, "--disk", "z").returncode == 0
    changed = len(chunk_digests(store, "z@1") - chunk_digests(store, "d@2"))
    assert delete_point(store, "z@1") == changed == 4
    planned, _ = run_json("gc", store, "--dry-run", "--max-unused", "0")
    assert_shape(planned, "gc")
    swept, _ = run_json("gc", store, "--max-unused", "0")
    assert_shape(swept, "gc")
    assert planned["dry_run"] is True and swept["dry_run"] is False
    assert swept["deleted_packs"] + swept["repacked_packs"] and swept["chunks_removed"] == changed
    assert swept["dead_bytes_after"] == 0 and swept["stored_bytes_after"] == planned["stored_bytes_after"]


def test_verify_reports_damage_and_packs_in_one_shape(tmp_path, image):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    other = str(tmp_path / "e.img")
    make_sparse(other, 8 * CS)
    write_at(other, 0, rng(9).bytes(3 * CS))
    def pack_files():
        return {os.path.join(root, f) for root, _, files in os.walk(os.path.join(store, "packs")) for f in files}

    assert run_cli("backup", store, image, "--disk", "d").returncode == 0
    first = pack_files()
    assert run_cli("backup", store, other, "--disk", "e").returncode == 0
    # e@1's only chunk pack goes missing (its commit's metadata pack stays);
    (lost,) = [p for p in pack_files() - first if any(r.header.magic == RECORD_MAGIC for r in scan_pack(p).records)]
    # a copy of it under a new name is a pack nobody references.
    stray = os.path.join(os.path.dirname(lost), "ab" * 16 + ".pack")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    shutil.copyfile(lost, stray)
    os.unlink(lost)
    # and d@1's manifest is gone from the index
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        manifests = env.open_db(b"manifests", txn=txn, create=False)
        assert txn.delete(b"d\0\0\0\0\x01", db=manifests)
    env.close()

    doc, proc = run_json("verify", store, expect=3)
    assert_shape(doc, "verify")
    assert doc["ok"] is False and doc["error"]["code"] == "damaged" and doc["error"]["exit_code"] == 3
    lost_id = os.path.basename(lost)[:-5]
    assert doc["missing_packs"] == [{"id": lost_id, "path": lost}]
    assert doc["unreferenced_packs"] == [{"id": "ab" * 16, "path": stray}]
    assert list(doc["damaged_manifests"]) == ["d@1"] and "manifest is missing" in doc["damaged_manifests"]["d@1"]
    assert doc["bad_chunks"] and all(b["backups"][0]["id"] == "e@1" for b in doc["bad_chunks"])
    # The text report names both the id and the file of a missing pack.
    text = run_cli("verify", store)
    assert f"MISSING pack {lost_id} ({lost})" in text.stdout


def test_demo_matches_the_document(tmp_path):
    doc, _ = run_json("demo", "--dir", str(tmp_path / "demo"), "--size", "16M")
    assert_shape(doc, "demo")
    assert doc["ok"] is True and all(r["identical"] for r in doc["restores"])


def _error_doc(proc: subprocess.CompletedProcess, code: str, exit_code: int) -> dict:
    """The failure's JSON document, checked against the document, and its stderr twin."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert_shape(doc, "error")
    assert doc["ok"] is False and doc["error"]["code"] == code and doc["error"]["exit_code"] == exit_code
    assert CODES[code] == exit_code
    # The human message is on stderr as well, the same text.
    assert f"blockvault: error: {doc['error']['message']}\n" in proc.stderr
    return doc


def test_failures_print_an_error_document(tmp_path, image):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, image, "--disk", "d").returncode == 0
    before = store_fingerprint(store)

    doc = _error_doc(run_cli("restore", store, "d@7", str(tmp_path / "o.img"), "--json"), "not_found", 1)
    assert doc["command"] == "restore" and "d@7" in doc["error"]["message"]
    doc = _error_doc(run_cli("backup", store, str(tmp_path / "nope.img"), "--disk", "d", "--json"), "bad_input", 1)
    assert "nope.img" in doc["error"]["message"]
    _error_doc(run_cli("list", str(tmp_path), "--json"), "not_a_store", 1)
    _error_doc(run_cli("init", store, "--json"), "store_exists", 1)
    # Values that make no sense and malformed ids are usage errors (issue 8, item 13).
    _error_doc(run_cli("init", str(tmp_path / "s2"), "--chunk-size", "3M", "--json"), "usage", 2)
    # --json before the command name works as well
    _error_doc(run_cli("--json", "restore", store, "d@x", str(tmp_path / "o.img")), "usage", 2)
    assert store_fingerprint(store) == before


def test_usage_errors_print_an_error_document(tmp_path):
    doc = _error_doc(run_cli("backup", "--json"), "usage", 2)
    assert "required" in doc["error"]["message"] and "command" not in doc
    doc = _error_doc(run_cli("--json", "frobnicate"), "usage", 2)
    assert "frobnicate" in doc["error"]["message"]
    _error_doc(run_cli("verify", str(tmp_path), "--threads", "many", "--json"), "usage", 2)
    # Without --json a usage error still prints nothing on stdout.
    plain = run_cli("backup")
    assert plain.returncode == 2 and plain.stdout == "" and "usage: blockvault backup" in plain.stderr


def test_os_errors_name_the_errno(tmp_path, image):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    doc = _error_doc(run_cli("list", store, "--log-file", str(tmp_path / "no" / "such" / "dir.log"), "--json"),
                     "os_error", 1)
    assert doc["error"]["errno"] == "ENOENT" and "dir.log" in doc["error"]["message"]


def test_a_busy_store_names_its_holder(tmp_path, image):
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from chunkstore import ChunkStore; s = ChunkStore.open(sys.argv[1]); "
         "w = s.writer(purpose='nightly job', chains=[('disk', 'd')]); print('held', flush=True); "
         "time.sleep(60)", store],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        doc = _error_doc(run_cli("backup", store, image, "--disk", "d", "--json"), "store_locked", 4)
        h = doc["error"]["holder"]
        assert h["pid"] == holder.pid and h["purpose"] == "nightly job" and h["host"] == os.uname().nodename
        assert_iso(h, "since")
    finally:
        holder.kill()
        holder.wait()


def test_error_codes_follow_the_exception_and_its_exit_code():
    """The mapping is by class, most specific first; exit code 2 is always a usage error."""
    import errno

    from chunkstore.errors import StoreError, StoreLockedError
    from engine.commandline import error_code
    from engine.errors import BadInputError, NotFoundError
    from engine.vsphere.errors import CredentialsError

    class RefusedValue(BadInputError):
        exit_code = 2

    assert error_code(RefusedValue("--threads 0")) == "usage"
    assert error_code(BadInputError("x")) == "bad_input" and error_code(NotFoundError("x")) == "not_found"
    assert error_code(StoreLockedError("x")) == "store_locked" and error_code(StoreError("x")) == "store_error"
    assert error_code(CredentialsError("x")) == "credentials"
    assert error_code(OSError(errno.ENOSPC, "full")) == "no_space" and error_code(OSError(errno.EIO, "x")) == "os_error"
    assert error_code(KeyboardInterrupt()) == "interrupted"
