"""Instant access on a store in a bucket of a real Ceph RGW: ``files get`` (the verbs of the
``files`` group take the bucket options).  ``serve``/``mount`` hand the plugin the cache
(s3cache=) and the S3 settings (environment) but are not tested here yet: nbdkit's embedded
Debian interpreter, started under pyenv, loads pyenv's _ssl and fails to import boto3."""

from __future__ import annotations

import os

import pytest

import fsimages
from helpers import rng, run_cli

pytestmark = pytest.mark.s3


@pytest.fixture
def s3env(ceph):
    env = dict(os.environ)
    env.update(ceph.env())
    env["BLOCKVAULT_S3_MAX_ATTEMPTS"] = "2"
    env["BLOCKVAULT_S3_CONNECT_TIMEOUT"] = "3"
    env["BLOCKVAULT_S3_READ_TIMEOUT"] = "20"
    return env


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
