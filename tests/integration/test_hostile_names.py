"""Names with control characters (issue 9, item 13): refused as disk names at backup, shown
escaped in the refusal; and text a store holds (catalog entries written by someone else) never
reaches the terminal raw, from ``list``, ``vsphere list`` or ``verify``."""

import json
import os

import lmdb
import pytest

from helpers import make_sparse, rng, run_cli, store_fingerprint, write_at

CS = 64 << 10


@pytest.fixture
def populated(store_path, tmp_path):
    img = str(tmp_path / "ok.img")
    make_sparse(img, 4 * CS)
    write_at(img, 0, rng(5).bytes(2 * CS))
    assert run_cli("backup", store_path, img, "--disk", "ok").returncode == 0
    return store_path, img


@pytest.mark.parametrize("name,shown", [
    ("d\n", r"'d\n'"),                 # "$" matched before the newline: accepted by the old check
    ("web01\n", r"'web01\n'"),
    ("d\x1b[31m", r"'d\x1b[31m'"),
    ("d\r", r"'d\r'"),
    ("d\x7f", r"'d\x7f'"),
    ("d\u202eevil", r"'d\u202eevil'"),
])
def test_disk_names_with_control_characters_are_refused(populated, name, shown):
    store, img = populated
    before = store_fingerprint(store)
    proc = run_cli("backup", store, img, "--disk", name)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "disk name" in proc.stderr and shown in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert store_fingerprint(store) == before
    listed = json.loads(run_cli("list", store, "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == ["ok@1"]


def test_check_disk_name_uses_the_whole_string():
    from engine.catalog import check_disk_name, parse_ref
    from engine.errors import BadInputError, UsageError
    assert check_disk_name("web01/disk-2000") == "web01/disk-2000"
    for bad in ("d\n", "d\n\n", "\nd", "d\t"):
        with pytest.raises(BadInputError):
            check_disk_name(bad)
    with pytest.raises(UsageError):
        parse_ref("d\n@1")


def test_vm_names_with_a_trailing_newline_are_made_valid():
    from engine.catalog import check_disk_name
    from engine.vsphere.vmcatalog import disk_backup_name, vm_backup_name
    name = vm_backup_name("web01\n")
    assert name != "web01\n" and name.startswith("web01_+") and "\n" not in name
    assert check_disk_name(disk_backup_name(name, 2000))


ESC = "\x1b"
EVIL_DISK = "evil\x1b]0;owned\x07\x1b[2J"


def _plant_catalog_record(store: str) -> None:
    """A catalog entry someone else wrote: escape sequences in its name, kind, base and metadata."""
    from engine.catalog import BackupRecord, catalog_key
    rec = BackupRecord(disk=EVIL_DISK, seq=1, time=1.7e9, kind="full\x1b[31m", base="x\x1b[5m@1", size=CS,
                       chunk_size=CS, stats={"bytes_read": 0, "stored_bytes": 0, "duration": 0.0},
                       metadata={"source": {"kind": "raw", "path": "/tmp/\x1b[8mhidden"}},
                       warnings=["\x1b[1Abad"])
    env = lmdb.open(os.path.join(store, "index"), max_dbs=16, map_size=1 << 30)
    with env.begin(write=True) as txn:
        db = env.open_db(b"catalog", txn=txn)
        txn.put(catalog_key(rec.disk, rec.seq), rec.to_json(), db=db)
    env.close()


def test_list_and_verify_never_print_escape_sequences_raw(populated):
    store, _ = populated
    _plant_catalog_record(store)
    listed = run_cli("list", store)
    assert listed.returncode == 0, listed.stderr
    assert ESC not in listed.stdout and "\x07" not in listed.stdout, repr(listed.stdout)
    assert r"evil\x1b]0;owned\x07\x1b[2J@1" in listed.stdout, listed.stdout
    assert r"full\x1b[31m" in listed.stdout and r"x\x1b[5m@1" in listed.stdout
    assert "ok@1" in listed.stdout
    as_json = run_cli("list", store, "--json")
    assert as_json.returncode == 0 and ESC not in as_json.stdout
    ids = {b["id"] for b in json.loads(as_json.stdout)["backups"]}
    assert ids == {"ok@1", EVIL_DISK + "@1"}                        # JSON keeps the exact text, escaped
    only = run_cli("list", store, "--disk", "nothing\x1b[2J")
    assert ESC not in only.stdout + only.stderr
    verify = run_cli("verify", store)
    assert "Traceback" not in verify.stderr, verify.stderr
    assert ESC not in verify.stdout + verify.stderr, repr(verify.stdout + verify.stderr)


def test_printable_escapes_what_a_terminal_acts_on():
    from engine.commandline import printable
    assert printable("web01@3  2026-12-01") == "web01@3  2026-12-01"
    assert printable("né") == "né"
    assert printable("a\x1b[2Jb\n\r\t\x7f\x9b\u202e") == r"a\x1b[2Jb\n\r\t\x7f\x9b\u202e"


@pytest.mark.parametrize("where", ["source", "store"])
def test_error_messages_quoting_a_hostile_path_are_escaped(populated, tmp_path, where):
    """Errors quote paths someone else may have named (a store directory, a
    source image handed over by a guest's owner): an escape sequence or a
    newline in them reaches stderr and the log file escaped, one line a
    message, so it cannot clear the screen or forge a second line; the JSON
    error keeps the exact text (JSON escapes it)."""
    store, _ = populated
    hostile = str(tmp_path / "img\x1b[2J\nblockvault: store OK")
    log = tmp_path / "bv.log"
    if where == "store":
        args = ("list", hostile)
    else:
        args = ("backup", store, hostile, "--disk", "d")
    proc = run_cli(*args, "--log-file", str(log))
    assert proc.returncode == 1, proc.stderr
    for text in (proc.stderr, log.read_text()):
        assert "\x1b" not in text
        assert text.count("\n") == 1, text          # one record, one line
        assert r"img\x1b[2J\nblockvault: store OK" in text, text
    doc = json.loads(run_cli(*args, "--json").stdout)
    assert "img\x1b[2J\nblockvault: store OK" in doc["error"]["message"]
