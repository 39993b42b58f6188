"""The test cluster itself: radosgw can be killed and restarted under a client (the fault
tests rely on it), and missing packages fail loudly with the install hint."""

import pytest

from chunkstore.errors import EndpointUnavailable
from chunkstore.s3bucket import Bucket
from chunkstore.s3settings import S3Location, S3Settings
from s3cluster import CephCluster

pytestmark = pytest.mark.s3


def test_kill_and_restart_radosgw(ceph, s3_bucket_name):
    settings = S3Settings(endpoint=ceph.endpoint, region=ceph.region, access_key=ceph.access_key,
                          secret_key=ceph.secret_key, connect_timeout=1.0, read_timeout=10.0, max_attempts=2)
    bucket = Bucket(S3Location(s3_bucket_name, "store"), settings)
    assert bucket.put_new("packs/00/a.pack", b"survives a radosgw crash")
    ceph.kill_rgw()
    try:
        with pytest.raises(EndpointUnavailable) as info:
            bucket.get("packs/00/a.pack")
        assert ceph.endpoint in str(info.value)
    finally:
        ceph.restart_rgw()
    assert bucket.get("packs/00/a.pack") == b"survives a radosgw crash"   # the OSD kept it


def test_missing_packages_fail_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))     # no ceph tools on it
    with pytest.raises(RuntimeError) as info:
        CephCluster().start(str(tmp_path / "c"), 30000)
    assert "tools/install.sh --test" in str(info.value) and "radosgw" in str(info.value)
    assert not (tmp_path / "c").exists()


def test_a_cluster_whose_owner_is_killed_is_brought_down(tmp_path):
    """pytest SIGKILLed (a CI timeout) must not leave memstore daemons holding RAM: the
    cluster's watchdog stops them once its owner process is gone."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from helpers import REPO_ROOT
    directory = tempfile.mkdtemp(prefix="bvk", dir="/tmp")
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, 'tests'); from s3cluster import *; "
         f"CephCluster().start({directory!r}, free_port_base()); print('up', flush=True); time.sleep(600)"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "up"
        pids = [int(open(os.path.join(directory, "run", f)).read()) for f in os.listdir(os.path.join(directory, "run"))
                if f.endswith(".pid")]
        assert len(pids) == 3 and all(os.path.exists(f"/proc/{p}") for p in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 120     # a bound, not a speed check
    while time.monotonic() < deadline and (os.path.exists(directory) or any(os.path.exists(f"/proc/{p}") for p in pids)):
        time.sleep(0.5)
    assert not os.path.exists(directory)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
