"""Faults of the endpoint under a store in a bucket, with real processes (issue 12, item 9):
radosgw restarted in the middle of a restore, an endpoint that accepts and never answers,
and a Ceph cluster whose OSD is full (a cluster of the test's own, always stopped)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from helpers import REPO_ROOT, freeze, make_sparse, rng, run_cli, same_file, snapshot, write_at
from s3cluster import s3env_of

pytestmark = pytest.mark.s3

GUARD = 240      # seconds: a command that has not ended by then waits without end (the bug guarded)


def listing(env, url, cache) -> list[str]:
    proc = run_cli("list", url, "--cache", cache, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return [p["id"] for p in json.loads(proc.stdout)["backups"]]


def restore_same(env, url, cache, ident, expected, out) -> None:
    proc = run_cli("restore", url, ident, out, "--cache", cache, "--force", env=env, timeout=GUARD)
    assert proc.returncode == 0, proc.stderr
    assert same_file(out, expected), ident
    os.unlink(out)


def written(proc) -> int:
    """Bytes the process has written so far (its restore target, mostly): /proc/PID/io wchar."""
    try:
        with open(f"/proc/{proc.pid}/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])
    except (OSError, KeyError):
        return 0


# -- radosgw restarted during a restore ------------------------------------------------------------


def test_radosgw_restarted_during_a_restore_the_restore_retries_and_finishes_identical(
        s3_store_url, ceph, tmp_path):
    env = s3env_of(ceph)
    cache = str(tmp_path / "cache")
    assert run_cli("init", s3_store_url, "--cache", cache, "--chunk-size", "64K", env=env).returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 512 << 20)
    r = rng(31)
    for i in range(0, 512 << 20, 4 << 20):
        write_at(img, i, r.bytes(1 << 20))          # 128 MiB of data over 512 MiB
    proc = run_cli("backup", s3_store_url, img, "--disk", "d", "--cache", cache, env=env, timeout=GUARD)
    assert proc.returncode == 0, proc.stderr
    expected = snapshot(img, str(tmp_path / "snap"))
    os.unlink(img)
    out = str(tmp_path / "restored.img")
    restore = subprocess.Popen([sys.executable, "-m", "engine.cli", "restore", s3_store_url, "d@1", out,
                                "--cache", cache, "--threads", "2"], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while written(restore) < (4 << 20) and restore.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Held still while the endpoint goes away, so that the outage surely meets its reads
        # (a restore from RGW on this machine takes about a second).
        freeze(restore)
        assert written(restore) < (64 << 20), "the restore was nearly done before radosgw could be killed"
        ceph.kill_rgw()
        restore.send_signal(signal.SIGCONT)
        time.sleep(3)                                   # the endpoint is gone for a while ...
        ceph.restart_rgw()                              # ... and comes back
        stdout, stderr = restore.communicate(timeout=GUARD)
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.wait()
        ceph.restart_rgw() if ceph._rgw_pid() is None else None
    # the outage was met (its reads were retried, and said so) and the restore finished identical
    assert restore.returncode == 0, stderr
    assert "retrying" in stderr and ceph.endpoint in stderr, stderr
    assert "Traceback" not in stderr
    assert same_file(out, expected)


# -- an endpoint that accepts and never answers --------------------------------------------------------


class HungEndpoint:
    """A TCP listener that accepts every connection and never sends a byte (a SIGSTOPped
    or wedged server looks exactly like this to a client)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.held: list[socket.socket] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.stopped = True
        self.sock.close()
        for c in self.held:
            c.close()


def test_a_hung_endpoint_fails_backup_and_restore_within_bounded_time_naming_it(s3_store_url, ceph, tmp_path):
    env = s3env_of(ceph)
    cache = str(tmp_path / "cache")
    assert run_cli("init", s3_store_url, "--cache", cache, env=env).returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 8 << 20)
    write_at(img, 0, rng(32).bytes(2 << 20))
    assert run_cli("backup", s3_store_url, img, "--disk", "d", "--cache", cache, env=env).returncode == 0
    first = snapshot(img, str(tmp_path / "snap1"))
    write_at(img, 4 << 20, rng(33).bytes(2 << 20))
    hung = HungEndpoint()
    slow = dict(env, BLOCKVAULT_S3_READ_TIMEOUT="2", BLOCKVAULT_S3_MAX_ATTEMPTS="1")
    out = str(tmp_path / "restored.img")
    try:
        backup = run_cli("backup", s3_store_url, img, "--disk", "d", "--cache", cache, "--endpoint", hung.url,
                         env=slow, timeout=GUARD)
        restore = run_cli("restore", s3_store_url, "d@1", out, "--cache", cache, "--endpoint", hung.url,
                          env=slow, timeout=GUARD)
        assert hung.held, "the commands never reached the hung endpoint"
    finally:
        hung.close()
    for proc in (backup, restore):
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert hung.url in proc.stderr and "did not answer" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)
    # nothing committed; with the endpoint back, the store is as it was and writes on
    assert listing(env, s3_store_url, cache) == ["d@1"]
    restore_same(env, s3_store_url, cache, "d@1", first, out)
    proc = run_cli("backup", s3_store_url, img, "--disk", "d", "--cache", cache, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "d@2", proc.stderr


# -- a full OSD ------------------------------------------------------------------------------------------


@pytest.fixture
def small_cluster(monkeypatch):
    """A cluster of this test's own (1 GiB memstore), so that filling it harms no other test."""
    from s3cluster import CephCluster, free_port_base, missing_message
    if missing_message():
        pytest.fail(missing_message(), pytrace=False)
    monkeypatch.setenv("STORE_GB", "1")
    cluster = CephCluster()
    directory = tempfile.mkdtemp(prefix="bvf", dir="/tmp")
    try:
        cluster.start(directory, free_port_base())
        yield cluster
    finally:
        cluster.stop()


def ceph_cmd(cluster, *args) -> str:
    env = dict(os.environ, CEPH_CONF=os.path.join(cluster.dir, "ceph.conf"))
    proc = subprocess.run(["ceph", *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def osd_full(cluster) -> bool:
    health = json.loads(ceph_cmd(cluster, "health", "detail", "--format", "json"))
    return "OSD_FULL" in health.get("checks", {})


def set_full_ratio(cluster, full: float) -> None:
    """The OSD counts as full above ``full`` of its device (nearfull < backfillfull < full kept ordered)."""
    if full < 0.5:
        ceph_cmd(cluster, "osd", "set-nearfull-ratio", f"{full / 3:.6f}")
        ceph_cmd(cluster, "osd", "set-backfillfull-ratio", f"{full / 2:.6f}")
        ceph_cmd(cluster, "osd", "set-full-ratio", f"{full:.6f}")
    else:
        ceph_cmd(cluster, "osd", "set-full-ratio", f"{full:.6f}")
        ceph_cmd(cluster, "osd", "set-backfillfull-ratio", "0.90")
        ceph_cmd(cluster, "osd", "set-nearfull-ratio", "0.85")


def test_a_full_osd_fails_the_backup_clearly_commits_nothing_and_earlier_points_restore(small_cluster, tmp_path):
    cluster = small_cluster
    env = s3env_of(cluster, BLOCKVAULT_S3_READ_TIMEOUT="3")
    cluster.client().create_bucket(Bucket="full-test")
    url = "s3://full-test/store"
    cache = str(tmp_path / "cache")
    assert run_cli("init", url, "--cache", cache, env=env).returncode == 0
    img = str(tmp_path / "disk.img")
    make_sparse(img, 32 << 20)
    r = rng(34)
    write_at(img, 0, r.bytes(8 << 20))
    assert run_cli("backup", url, img, "--disk", "d", "--cache", cache, env=env).returncode == 0
    first = snapshot(img, str(tmp_path / "snap1"))
    write_at(img, 8 << 20, r.bytes(16 << 20))

    # The OSD fills up: what it holds now is past its full ratio (the OSD reports itself full
    # and the mon flags it OSD_FULL; there is no mgr, so no 'ceph osd df' to read its use from).
    set_full_ratio(cluster, 0.001)     # 1 MiB of the 1 GiB device: the pools and d@1 hold more
    deadline = time.monotonic() + 60
    while not osd_full(cluster):
        assert time.monotonic() < deadline, "the OSD never reported full"
        time.sleep(0.5)
    started = time.monotonic()
    proc = run_cli("backup", url, img, "--disk", "d", "--cache", cache, env=env, timeout=GUARD)
    took = time.monotonic() - started
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert cluster.endpoint in proc.stderr and "full" in proc.stderr and "ceph df" in proc.stderr, proc.stderr
    assert took < GUARD
    # nothing committed, and what was committed before still restores (GETs work on a full cluster)
    assert listing(env, url, cache) == ["d@1"]
    restore_same(env, url, cache, "d@1", first, str(tmp_path / "restored.img"))

    # space comes back: the same backup succeeds, both points restore, the store verifies
    set_full_ratio(cluster, 0.95)
    deadline = time.monotonic() + 60
    while osd_full(cluster):
        assert time.monotonic() < deadline, "the OSD stayed full"
        time.sleep(0.5)
    proc = run_cli("backup", url, img, "--disk", "d", "--cache", cache, env=env, timeout=GUARD)
    assert proc.returncode == 0 and proc.stdout.strip() == "d@2", proc.stderr
    second = snapshot(img, str(tmp_path / "snap2"))
    restore_same(env, url, cache, "d@2", second, str(tmp_path / "restored.img"))
    proc = run_cli("verify", url, "--cache", cache, "--json", env=env, timeout=GUARD)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stderr
