"""Permissions (issue 9, item 12): with the common umask 022 a store is its owner's alone (0700
directories, 0600 files: config.json holds the digest seed), and so is a restored image unless
``restore --mode`` says otherwise.  A credentials file others can read is refused, the same way by
every command that takes one."""

import os
import stat
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, write_at

CS = 64 << 10


def run_022(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user with umask 022 runs it."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: os.umask(0o022))


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def image(tmp_path):
    img = str(tmp_path / "src.img")
    make_sparse(img, 40 * CS)
    write_at(img, CS, rng(3).bytes(20 * CS))
    return img


def test_store_and_restored_images_are_private_under_umask_022(tmp_path, image):
    store = str(tmp_path / "store")
    for args in (("init", store, "--chunk-size", "64K"), ("backup", store, image, "--disk", "d"),
                 ("backup", store, image, "--disk", "d", "--mode", "incremental")):
        proc = run_022(*args)
        assert proc.returncode == 0, proc.stderr
    assert _mode(store) == 0o700
    seen = {"dirs": 0, "files": 0}
    for root, dirs, files in os.walk(store):
        for name in dirs:
            assert _mode(os.path.join(root, name)) == 0o700, os.path.join(root, name)
            seen["dirs"] += 1
        for name in files:
            path = os.path.join(root, name)
            assert _mode(path) == 0o600, (path, oct(_mode(path)))
            seen["files"] += 1
    names = {os.path.relpath(os.path.join(r, f), store) for r, _, fs in os.walk(store) for f in fs}
    assert {"config.json", "lock", "index/data.mdb", "index/lock.mdb"} <= names
    assert any(n.endswith(".pack") for n in names) and seen["dirs"] >= 3

    for target, extra, want in (("r.img", (), 0o600), ("r.vmdk", (), 0o600),
                                ("m.img", ("--mode", "0644"), 0o644), ("m.vmdk", ("--mode", "640"), 0o640)):
        out = str(tmp_path / target)
        proc = run_022("restore", store, "d@2", out, *extra)
        assert proc.returncode == 0, proc.stderr
        assert _mode(out) == want, (target, oct(_mode(out)))
    assert same_file(str(tmp_path / "r.img"), image) and same_file(str(tmp_path / "m.img"), image)
    # --force over an existing world-readable image: the new one is 0600 too.
    old = tmp_path / "old.img"
    old.write_bytes(b"x")
    old.chmod(0o644)
    assert run_022("restore", store, "d@2", str(old), "--force").returncode == 0
    assert _mode(old) == 0o600 and same_file(str(old), image)


def test_init_makes_an_empty_directory_private(tmp_path):
    store = tmp_path / "given"
    store.mkdir()
    store.chmod(0o755)
    assert run_022("init", str(store)).returncode == 0
    assert _mode(store) == 0o700 and _mode(store / "config.json") == 0o600


@pytest.mark.parametrize("bad", ["999", "1777", "rw-r--r--", "", "0o10000"])
def test_restore_mode_must_be_octal_permission_bits(tmp_path, bad):
    proc = run_cli("restore", str(tmp_path / "s"), "d@1", str(tmp_path / "o.img"), "--mode", bad)
    assert proc.returncode == 2 and "--mode" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "s")


def test_restore_mode_is_refused_for_in_place_targets(store_path, image, tmp_path):
    assert run_cli("backup", store_path, image, "--disk", "d").returncode == 0
    proc = run_cli("restore", store_path, "d@1", "vddk://h/vm-1?disk=[ds] a/a.vmdk", "--force", "--mode", "644")
    assert proc.returncode == 2 and "drop --mode" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- credentials files

URL = "vddk://127.0.0.1:1/vm-1?disk=[ds1] a/a.vmdk&snapshot=snapshot-1"
NEEDLE = "is readable by other users"


@pytest.fixture
def creds(tmp_path):
    path = tmp_path / "vsphere.cred"
    path.write_text("user=backup@vsphere.local\npassword=S3cret-pass\n")
    return path


def _env_without_credentials():
    return {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_VSPHERE")}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_credentials_file_others_can_read_is_refused_everywhere(store_path, image, creds, tmp_path, mode):
    """The same refusal, before anything is contacted, for a vddk:// source, a vddk:// target and
    the vsphere commands; the message names the file, its mode and the fix."""
    creds.chmod(mode)
    env = _env_without_credentials()
    assert run_cli("backup", store_path, image, "--disk", "d").returncode == 0
    runs = {
        "backup vddk://": run_cli("backup", store_path, URL, "--disk", "v", "--credentials", str(creds), env=env),
        "restore to vddk://": run_cli("restore", store_path, "d@1", URL.split("&snapshot")[0], "--force",
                                      "--credentials", str(creds), env=env),
        "vsphere vms": run_cli("vsphere", "vms", "--server", "127.0.0.1:1", "--insecure",
                               "--credentials", str(creds), env=env),
        "vsphere backup": run_cli("vsphere", "backup", store_path, "--server", "127.0.0.1:1", "--insecure",
                                  "--vm", "web01", "--credentials", str(creds), env=env),
    }
    for what, proc in runs.items():
        assert proc.returncode == 1, (what, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr, (what, proc.stderr)
        assert NEEDLE in proc.stderr and str(creds) in proc.stderr, (what, proc.stderr)
        assert f"mode {mode:04o}" in proc.stderr and "chmod 600" in proc.stderr, (what, proc.stderr)
        assert "S3cret-pass" not in proc.stderr + proc.stdout


def test_a_private_credentials_file_gets_past_the_check(creds):
    from engine.credentials import load_credentials
    creds.chmod(0o600)
    c = load_credentials(str(creds))
    assert (c.user, c.password, c.source) == ("backup@vsphere.local", "S3cret-pass", str(creds))
    creds.chmod(0o644)
    from engine.errors import BadInputError
    with pytest.raises(BadInputError, match=NEEDLE):
        load_credentials(str(creds))
