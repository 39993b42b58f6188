"""Bad input gets a clear message, a meaningful exit code, and leaves the store as it was."""

import json
import os

import pytest

from helpers import make_sparse, rng, run_cli, store_fingerprint, write_at

CS = 64 << 10


@pytest.fixture
def populated(store_path, tmp_path):
    img = str(tmp_path / "ok.img")
    make_sparse(img, 16 * CS)
    write_at(img, 0, rng(40).bytes(3 * CS))
    proc = run_cli("backup", store_path, img, "--disk", "ok")
    assert proc.returncode == 0, proc.stderr
    return store_path, img


def _expect_error(args, code, *needles, store=None):
    before = store_fingerprint(store) if store else None
    proc = run_cli(*args)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    if store:
        assert store_fingerprint(store) == before
    return proc


def test_missing_image(populated, tmp_path):
    store, _ = populated
    _expect_error(["backup", store, str(tmp_path / "nope.img"), "--disk", "ok"], 1,
                  "nope.img", "No such file", store=store)


def test_directory_as_image(populated, tmp_path):
    store, _ = populated
    _expect_error(["backup", store, str(tmp_path), "--disk", "ok"], 1, "is a directory", store=store)


@pytest.mark.parametrize("content,needle", [
    ("[1, 2", "not valid JSON"),
    (json.dumps({"length": 16 * CS, "changedArea": [{"start": 0, "length": 100 * CS}]}),
     "outside the covered range"),
    (json.dumps({"startOffset": 0, "length": 1 << 40, "changedArea": []}), "past the end of the disk"),
    (json.dumps({"length": 16 * CS, "changedArea": [{"start": "0", "length": 5}]}), "changedArea[0]"),
    (json.dumps({"changedArea": [{"start": 0, "length": 5}]}), "no 'length'"),
])
def test_bad_changed_areas(populated, tmp_path, content, needle):
    store, img = populated
    cbt = tmp_path / "cbt.json"
    cbt.write_text(content)
    _expect_error(["backup", store, img, "--disk", "ok", "--mode", "incremental", "--changed-areas", str(cbt)],
                  1, needle, str(cbt), store=store)


@pytest.mark.parametrize("doc,needle", [
    ({"startOffset": 0, "length": 8 * CS, "changedArea": [{"start": 0, "length": 100}]},
     "its length 524288 is not the disk's size 1048576: is it the change list of another disk?"),
    ({"startOffset": 8 * CS, "length": 8 * CS, "changedArea": [{"start": 9 * CS, "length": 100}]},
     "the first 524288 bytes are not covered (startOffset 524288)"),
    ({"startOffset": 0, "length": 0, "changedArea": []}, "its length 0 is not the disk's size 1048576"),
])
def test_change_list_that_does_not_cover_the_disk(populated, tmp_path, doc, needle):
    """What a change list does not cover is unknown, not unchanged: such a list is refused,
    naming both sizes, and nothing is stored (it used to make a backup that restored wrong)."""
    store, img = populated
    write_at(img, 12 * CS, rng(41).bytes(CS))     # a change outside the covers above
    cbt = tmp_path / "cbt.json"
    cbt.write_text(json.dumps(doc))
    start, end = doc["startOffset"], doc["startOffset"] + doc["length"]
    _expect_error(["backup", store, img, "--disk", "ok", "--mode", "incremental", "--changed-areas", str(cbt)],
                  1, f"changed-areas file {cbt} covers bytes [{start}, {end}) of disk ok, which is {16 * CS} bytes",
                  needle, f"startOffset 0 and length {16 * CS}", store=store)


def test_future_format_version(populated):
    store, img = populated
    cfg_path = os.path.join(store, "config.json")
    doc = json.loads(open(cfg_path).read())
    doc["version"] = 4
    with open(cfg_path, "w") as f:
        json.dump(doc, f)
    _expect_error(["backup", store, img, "--disk", "ok"], 1, "format version 4", store=store)
    _expect_error(["list", store], 1, "format version 4")


def test_version_1_store_is_refused_with_what_to_do(populated):
    """Format version 2 (issue 9) keeps metadata records in the packs; a version-1 store has none."""
    store, img = populated
    cfg_path = os.path.join(store, "config.json")
    doc = json.loads(open(cfg_path).read())
    doc["version"] = 1
    with open(cfg_path, "w") as f:
        json.dump(doc, f)
    for args in (["backup", store, img, "--disk", "ok"], ["list", store], ["rebuild", store]):
        _expect_error(args, 1, "store format version 1", "reads versions 2 and 3 only",
                      "restore what you need with the blockvault release that wrote it", store=store)


def test_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    img = tmp_path / "i.img"
    make_sparse(str(img), CS)
    _expect_error(["backup", str(tmp_path / "plain"), str(img), "--disk", "x"], 1, "not a blockvault store")
    assert os.listdir(tmp_path / "plain") == []


def test_bad_disk_name_and_backup_id(populated, tmp_path):
    store, img = populated
    _expect_error(["backup", store, img, "--disk", "a@b"], 1, "disk name", store=store)
    _expect_error(["restore", store, "ok", str(tmp_path / "o")], 2, "not a backup id")  # malformed: usage
    _expect_error(["restore", store, "ok@9", str(tmp_path / "o")], 1, "no backup ok@9", "ok@1")


def test_usage_errors_exit_2(tmp_path):
    assert run_cli("backup").returncode == 2
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("init", str(tmp_path / "s"), "--chunk-size", "3M").returncode == 2  # a nonsense value: usage


def test_restore_refuses_to_overwrite(populated, tmp_path):
    store, img = populated
    target = tmp_path / "exists.img"
    target.write_bytes(b"precious")
    _expect_error(["restore", store, "ok@1", str(target)], 1, "exists", "--force")
    assert target.read_bytes() == b"precious"
    proc = run_cli("restore", store, "ok@1", str(target), "--force")
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == open(img, "rb").read()


@pytest.mark.parametrize("fail_after", [0, 1, 2])
def test_full_file_system_fails_cleanly_with_advice(populated, tmp_path, monkeypatch, capsys, fail_after):
    """ENOSPC while writing packs (a pack header, or records, from either of
    the worker threads): exit 1, the pack named, advice given, and the store
    exactly as it was, with no pack file left behind."""
    import errno

    from engine import cli

    store, _ = populated
    img = str(tmp_path / "big.img")
    make_sparse(img, 64 * CS)
    write_at(img, 0, rng(41).bytes(64 * CS))
    before = store_fingerprint(store)
    real_pwritev, calls = os.pwritev, [0]

    def filling_up(fd, buffers, offset):
        calls[0] += 1
        if calls[0] > fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", filling_up)
    code = cli.main(["backup", store, img, "--disk", "big"])
    err = capsys.readouterr().err
    assert code == 1 and calls[0] > fail_after, (code, calls, err)
    assert ".pack: No space left on device" in err and "free space" in err, err
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert store_fingerprint(store) == before
