"""``blockvault demo``: its restores are checked here byte for byte against the
image states rebuilt independently, and it never deletes what it did not make."""

import json
import os

import pytest

from engine.demo import BLOCK, MARKER, mutate_image, write_image
from helpers import run_cli, same_file, store_fingerprint

SIZE = 64 << 20


def test_demo_restores_match_the_image_states(tmp_path):
    demo = tmp_path / "demo"
    proc = run_cli("demo", "--dir", str(demo), "--size", "64M", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and all(step["identical"] for step in doc["restores"])
    assert (demo / MARKER).is_file()

    # The two states of the image, rebuilt here from the same seeds, not taken from the demo.
    state1, state2 = str(tmp_path / "state1.img"), str(tmp_path / "state2.img")
    write_image(state1, SIZE, seed=1)
    write_image(state2, SIZE, seed=1)
    mutate_image(state2, seed=2, count=max(4, SIZE // BLOCK // 200))
    assert not same_file(state1, state2)
    assert same_file(str(demo / "disk.img"), state2)
    assert same_file(str(demo / "restore-1.img"), state1)
    assert same_file(str(demo / "restore-2.img"), state2)

    # The store it made is a real one: two points, an incremental that read little, verify OK.
    listing = json.loads(run_cli("list", str(demo / "store"), "--json").stdout)
    kinds = [(b["id"], b["kind"]) for b in listing["backups"]]
    assert kinds == [("demo-disk@1", "full"), ("demo-disk@2", "incremental")]
    assert listing["backups"][1]["stats"]["bytes_read"] < SIZE // 10
    assert run_cli("verify", str(demo / "store")).returncode == 0

    # Run again in the directory it made: allowed, and the same result.
    again = run_cli("demo", "--dir", str(demo), "--size", "64M", "--json")
    assert again.returncode == 0, again.stderr
    assert same_file(str(demo / "restore-1.img"), state1)


def _tree(path):
    """Every file under path with its bytes."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = open(p, "rb").read() if os.path.isfile(p) else None
    return out


def test_demo_refuses_a_real_store(store_path, tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.write(os.urandom(3 * BLOCK))
    assert run_cli("backup", store_path, img, "--disk", "precious").returncode == 0
    before = store_fingerprint(store_path), _tree(store_path)
    proc = run_cli("demo", "--dir", store_path, "--size", "8M")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"demo directory {store_path} is a blockvault store; nothing was changed" in proc.stderr
    assert "demo passed" not in proc.stderr
    assert (store_fingerprint(store_path), _tree(store_path)) == before
    out = str(tmp_path / "r.img")
    assert run_cli("restore", store_path, "precious@1", out).returncode == 0 and same_file(out, img)


@pytest.mark.parametrize("layout", ["user-file", "plain-file", "symlink", "fake-marker-dir"])
def test_demo_refuses_what_it_did_not_make(tmp_path, layout):
    target = tmp_path / "mine"
    if layout == "user-file":
        target.mkdir()
        (target / "thesis.txt").write_text("four years of work")
        (target / "disk.img").write_bytes(b"not the demo's")
    elif layout == "plain-file":
        target.write_text("a file, not a directory")
    elif layout == "symlink":
        real = tmp_path / "real"
        real.mkdir()
        (real / MARKER).write_text("x")
        (real / "disk.img").write_bytes(b"keep")
        target.symlink_to(real)
    else:  # a directory named like the marker does not count as one
        target.mkdir()
        (target / MARKER).mkdir()
        (target / "disk.img").write_bytes(b"keep")
    before = _tree(tmp_path)
    proc = run_cli("demo", "--dir", str(target), "--size", "8M")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "nothing was changed" in proc.stderr
    assert f"demo directory {target}" in proc.stderr and "choose another --dir" in proc.stderr
    assert _tree(tmp_path) == before


def test_demo_uses_an_empty_directory_and_keeps_other_files_on_reuse(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert run_cli("demo", "--dir", str(target), "--size", "8M").returncode == 0
    assert (target / MARKER).is_file() and (target / "store" / "config.json").is_file()
    (target / "notes.txt").write_text("mine")       # a file the demo did not make survives a rerun
    assert run_cli("demo", "--dir", str(target), "--size", "8M").returncode == 0
    assert (target / "notes.txt").read_text() == "mine"
