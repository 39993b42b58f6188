"""Instant access on a store in a bucket of a real Ceph RGW: ``files get`` (the verbs of the
``files`` group take the bucket options), ``serve`` and ``mount``, which hand nbdkit's plugin the
cache (s3cache=) and the S3 settings (environment), and give its embedded Debian interpreter
its own home (under pyenv it found pyenv's standard library, whose _ssl it cannot load, so
boto3 did not import)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import fsimages
from helpers import make_sparse, rng, run_cli, write_at

pytestmark = pytest.mark.s3


def test_files_get_from_an_s3_point_restores_the_file_identical(s3_store_url, s3env, tmp_path):
    if fsimages.missing_tools():
        pytest.fail(f"needs {', '.join(fsimages.missing_tools())} (tools/install.sh --test)", pytrace=False)
    src = tmp_path / "src"
    src.mkdir()
    data = rng(42).bytes(3 << 20)
    (src / "big.bin").write_bytes(data)
    img = fsimages.ext4(str(tmp_path / "disk.img"), 32 << 20, str(src))
    cache = str(tmp_path / "cache")
    assert run_cli("init", s3_store_url, "--cache", cache, env=s3env).returncode == 0
    assert run_cli("backup", s3_store_url, img, "--disk", "d", "--cache", cache, env=s3env).returncode == 0
    dest = tmp_path / "dest"
    proc = run_cli("files", "get", s3_store_url, "d@1", "/big.bin", str(dest), "--cache", cache, env=s3env)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "big.bin").read_bytes() == data


def _backed_up_disk(s3_store_url, s3env, tmp_path) -> tuple[str, str]:
    img = str(tmp_path / "disk.img")
    make_sparse(img, 24 << 20)
    write_at(img, 1 << 20, rng(43).bytes(3 << 20))
    cache = str(tmp_path / "cache")
    assert run_cli("init", s3_store_url, "--cache", cache, "--chunk-size", "64K", env=s3env).returncode == 0
    assert run_cli("backup", s3_store_url, img, "--disk", "d", "--cache", cache, env=s3env).returncode == 0
    return img, cache


def test_serve_exports_an_s3_point_identical_and_run_keeps_the_callers_python_home(
        s3_store_url, s3env, tmp_path):
    img, cache = _backed_up_disk(s3_store_url, s3env, tmp_path)
    out = tmp_path / "out.img"
    env = {k: v for k, v in s3env.items() if k != "PYTHONHOME"}
    proc = run_cli("serve", s3_store_url, "d@1", "--s3-cache", cache, "--json", "--run",
                   f'echo "home=${{PYTHONHOME-unset}}" >&2; nbdcopy "$uri" {out}', env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "home=unset" in proc.stderr              # nbdkit's own PYTHONHOME stays nbdkit's
    with open(out, "rb") as f, open(img, "rb") as g:
        assert f.read() == g.read()


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("nbdkit", "nbdfuse", "fusermount3"))
                    or not os.path.exists("/dev/fuse"), reason="needs nbdfuse, fuse3 and /dev/fuse")
def test_mount_reads_an_s3_point_as_its_image(s3_store_url, s3env, tmp_path):
    img, cache = _backed_up_disk(s3_store_url, s3env, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", s3_store_url, "d@1", str(mnt), "--s3-cache", cache, env=s3env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        with open(mnt / "disk.raw", "rb") as f, open(img, "rb") as g:
            assert f.read() == g.read()
    finally:
        down = run_cli("umount", str(mnt), env=s3env, timeout=120)
        if down.returncode != 0:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
    assert down.returncode == 0, down.stderr
