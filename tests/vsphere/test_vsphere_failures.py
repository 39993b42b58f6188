"""Runs that go wrong: a crashed run's snapshot, vCenter gone mid-backup, a dropped
session, bad certificates and credentials.  Each ends with a clear message, an
unchanged store, and a next run that cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import (BLOCK, MiB, PASSWORD, REPO_ROOT, USER, all_bytes_under, bv, bv_json, cli_env,
                             connect, create_vm, image, init_store, restore_disk_image, server_args,
                             snapshot_names, write)

from engine.repository import Repository  # noqa: E402
from engine.vsphere.backup import BackupOptions, backup_vm  # noqa: E402
from engine.vsphere.errors import ConnectionLost  # noqa: E402
from engine.vsphere.http_disk import DatastoreHttp, HttpDisk  # noqa: E402
from engine.vsphere.inventory import find_vm, flat_file, folder_url  # noqa: E402
from engine.vsphere.snapshot import SNAPSHOT_NAME  # noqa: E402
from helpers import store_fingerprint  # noqa: E402


def test_leftover_snapshot_is_removed_by_the_next_run(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "app01", [2 * 1024], cbt=True)
    write(vcsim, vcsim.disks(vm.config)[0], 0, b"data" * 1000)
    vcsim.wait(vm.CreateSnapshot_Task(name=SNAPSHOT_NAME, description="left by a crash", memory=False,
                                      quiesce=False))
    doc = bv_json("vsphere", "backup", store, *srv, "--vm", "app01")
    assert doc["id"] == "app01@1"
    assert len(doc["warnings"]) == 1 and "left behind by an earlier backup run" in doc["warnings"][0]
    assert snapshot_names(vm) == []


def test_killed_run_leaves_the_store_as_it_was_and_its_snapshot_is_cleaned_up(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "app02", [4 * 1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 0, os.urandom(20 * BLOCK))
    assert bv_json("vsphere", "backup", store, *srv, "--vm", "app02")["id"] == "app02@1"
    write(vcsim, disk, 2 * MiB, os.urandom(BLOCK))
    before = store_fingerprint(store)

    # A backup process that dies (SIGKILL) right after its disks were read.
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / "tests" / "vsphere")!r}]
        from engine.credentials import Credentials
        from engine.repository import Repository
        from engine.vsphere.backup import BackupOptions, backup_vm
        from engine.vsphere.connection import Connection, Endpoint, TlsPolicy
        from engine.vsphere.inventory import find_vm
        def die(event, detail):
            if event == "disks-read":
                os.kill(os.getpid(), signal.SIGKILL)
        conn = Connection(Endpoint({vcsim.host!r}, {vcsim.port}), Credentials("u", "p"), TlsPolicy(insecure=True))
        with Repository.open({store!r}) as repo:
            backup_vm(repo, conn, find_vm(conn, "app02"), BackupOptions(on_event=die))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert snapshot_names(vm) == [SNAPSHOT_NAME]
    after = store_fingerprint(store)
    # Only unreferenced pack bytes may differ; the LMDB state is exactly as it was.
    assert {k: v for k, v in after.items() if k.startswith("lmdb:")} == \
        {k: v for k, v in before.items() if k.startswith("lmdb:")}

    doc = bv_json("vsphere", "backup", store, *srv, "--vm", "app02", "--cbt-sample", "0")
    assert doc["id"] == "app02@2" and doc["kind"] == "incremental"
    assert any("left behind" in w for w in doc["warnings"])
    assert doc["disks"][0]["read"] == "changed-areas" and doc["disks"][0]["bytes_read"] == BLOCK
    assert snapshot_names(vm) == []
    assert restore_disk_image(store, doc["disks"][0]["backup"], tmp_path / "t2.img") == image(vcsim, disk)


def test_vcenter_stopped_mid_backup(vcsim_factory, tmp_path):
    store = init_store(tmp_path / "store")
    first = vcsim_factory()
    vm = create_vm(first, "app03", [4 * 1024, 2 * 1024], cbt=True)
    for d in first.disks(vm.config):
        write(first, d, 0, os.urandom(8 * BLOCK))
    with Repository.open(store) as repo, connect(first) as conn:
        backup_vm(repo, conn, vm, BackupOptions())
    before = store_fingerprint(store)

    def stop(event, detail):
        if event == "snapshot-created":
            first.stop()

    with Repository.open(store) as repo, connect(first) as conn:
        with pytest.raises(ConnectionLost) as info:
            backup_vm(repo, conn, find_vm(conn, "app03"), BackupOptions(on_event=stop))
    message = str(info.value)
    assert f"vCenter {first.host}:{first.port}" in message
    assert "nothing was committed to the store" in message
    assert "could not be removed either" in message and "the next backup of this VM removes it" in message
    assert store_fingerprint(store) == before  # the failed session's packs are gone too

    # The command says the same without a traceback, and exits 1.
    proc = bv("vsphere", "backup", store, *server_args(first, pin=False), "--vm", "app03")
    assert proc.returncode == 1 and "cannot reach vCenter" in proc.stderr and "Traceback" not in proc.stderr

    # vCenter is back (a new one: the simulator keeps no state); the next run works and,
    # the old changeIds being unknown there, reads the disks in full with a warning.
    second = vcsim_factory()
    vm2 = create_vm(second, "app03", [4 * 1024, 2 * 1024], cbt=True)
    for d in second.disks(vm2.config):
        write(second, d, 0, os.urandom(8 * BLOCK))
    doc = bv_json("vsphere", "backup", store, *server_args(second), "--vm", "app03")
    assert doc["id"] == "app03@2" and [d["read"] for d in doc["disks"]] == ["allocated", "allocated"]
    assert bv("verify", store).returncode == 0


def test_dropped_session_is_renewed_once(vcsim):
    vm = create_vm(vcsim, "app04", [1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 3 * BLOCK, b"still readable")
    with connect(vcsim) as conn:
        old_cookie = conn.cookie
        key = conn.content.sessionManager.currentSession.key
        # The server forgets the session (vCenter restart, idle timeout, an admin).
        vcsim.content.sessionManager.TerminateSession([key])
        # Datastore HTTP access gets 401 with the old cookie, logs in again, reads.
        source = HttpDisk(DatastoreHttp(conn, 2), folder_url("DC0", flat_file(disk.backing.fileName)), MiB,
                          lambda: [], "test disk")
        buf = bytearray(2 * BLOCK)
        source.read_chunks([3 * BLOCK, 4 * BLOCK], BLOCK, buf)
        assert bytes(buf[:14]) == b"still readable" and not any(buf[BLOCK:])
        assert conn.cookie != old_cookie
        # SOAP calls renew it too.
        vcsim.content.sessionManager.TerminateSession([conn.content.sessionManager.currentSession.key])
        assert find_vm(conn, "app04")._moId == vm._moId
        source.close()


def test_keepalive_renews_a_dropped_session_between_calls(vcsim):
    from engine.credentials import Credentials
    from engine.vsphere.connection import Connection, Endpoint, TlsPolicy

    with Connection(Endpoint(vcsim.host, vcsim.port), Credentials(USER, PASSWORD), TlsPolicy(insecure=True),
                    keepalive=0.2) as conn:
        old = conn.cookie
        vcsim.content.sessionManager.TerminateSession([conn.content.sessionManager.currentSession.key])
        deadline = time.monotonic() + 10
        while conn.cookie == old and time.monotonic() < deadline:
            time.sleep(0.1)
        assert conn.cookie != old  # renewed by the keep-alive thread, no call of ours needed


def test_certificate_checks(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    unpinned = ["--server", f"{vcsim.host}:{vcsim.port}"]
    proc = bv("vsphere", "vms", *unpinned)
    assert proc.returncode == 1 and "not trusted" in proc.stderr and "SHA-256 thumbprint is" in proc.stderr
    wrong = bv("vsphere", "vms", *unpinned, "--thumbprint", "AB" * 32)
    assert wrong.returncode == 1 and "not the pinned one" in wrong.stderr
    both = bv("vsphere", "vms", *unpinned, "--thumbprint", "AB" * 32, "--insecure")
    assert both.returncode == 2  # usage: one way of checking at a time
    assert bv("vsphere", "vms", *unpinned, "--insecure").returncode == 0
    assert bv("vsphere", "vms", *server_args(vcsim), "--store", store).returncode == 0
    # A CA file that did not sign the server's certificate, and one that does not exist.
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(open("/etc/ssl/certs/ca-certificates.crt", "rb").read()
                         if os.path.exists("/etc/ssl/certs/ca-certificates.crt") else b"")
    if other_ca.stat().st_size:
        refused = bv("vsphere", "vms", *unpinned, "--ca-file", other_ca)
        assert refused.returncode == 1 and "not trusted" in refused.stderr
    missing = bv("vsphere", "vms", *unpinned, "--ca-file", tmp_path / "nope.pem")
    assert missing.returncode == 1 and "cannot use CA file" in missing.stderr


def test_failed_disaster_recovery_removes_the_half_restored_vm(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "lost01", [2 * 1024, 1024], cbt=True)
    for d in vcsim.disks(vm.config):
        write(vcsim, d, 0, os.urandom(3 * BLOCK))
    bv_json("vsphere", "backup", store, *srv, "--vm", "lost01")
    for pack in (tmp_path / "store" / "packs").rglob("*.pack"):
        pack.unlink()  # the data is gone; the catalog still says it is there
    proc = bv("vsphere", "restore", store, "lost01@1", *srv, "--name", "lost01-dr")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is missing" in proc.stderr and "the half-restored VM lost01-dr was removed" in proc.stderr
    assert vcsim.content.searchIndex.FindByInventoryPath("DC0/vm/lost01-dr") is None


def test_credentials_never_leak(vcsim_factory, tmp_path):
    sim = vcsim_factory("-username", USER, "-password", PASSWORD)
    store, srv = init_store(tmp_path / "store"), server_args(sim)
    vm = create_vm(sim, "secret01", [1024], cbt=True)
    write(sim, sim.disks(vm.config)[0], 0, b"payload" * 100)
    outputs = []

    ok = bv("vsphere", "backup", store, *srv, "--vm", "secret01", "--json")
    assert ok.returncode == 0, ok.stderr
    outputs.append(ok)
    outputs.append(bv("vsphere", "vms", *srv, "--store", store, "--json"))
    outputs.append(bv("vsphere", "list", store, "--json"))
    dr = bv("vsphere", "restore", store, "secret01@1", *srv, "--name", "secret01-dr", "--json")
    assert dr.returncode == 0, dr.stderr
    outputs.append(dr)

    # Wrong password: refused, said so, secrets not echoed.
    bad = bv("vsphere", "backup", store, *srv, "--vm", "secret01",
             env=cli_env(password="Wr0ng-" + PASSWORD))
    assert bad.returncode == 1 and "refused the login" in bad.stderr and "the environment" in bad.stderr
    outputs.append(bad)
    # A credentials file works; it is named in messages, its contents are not.
    creds = tmp_path / "vsphere.cred"
    creds.write_text(f"# lab\nuser = {USER}\npassword = Wr0ng-{PASSWORD}\n")
    creds.chmod(0o600)
    from_file = bv("vsphere", "vms", *srv, "--credentials", creds, env=cli_env(user="", password=""))
    assert from_file.returncode == 1 and str(creds) in from_file.stderr
    outputs.append(from_file)
    creds.write_text(f"user={USER}\npassword={PASSWORD}\n")
    assert bv("vsphere", "vms", *srv, "--credentials", creds, env=cli_env(user="", password="")).returncode == 0
    # No credentials at all: a usage hint, not a crash; and no option takes a password.
    none = bv("vsphere", "vms", *srv, env=cli_env(user="", password=""))
    assert none.returncode == 1 and "BLOCKVAULT_VSPHERE_USER" in none.stderr
    assert bv("vsphere", "vms", *srv, "--password", PASSWORD).returncode == 2

    for proc in outputs:
        for secret in (PASSWORD, USER):
            assert secret not in proc.stdout and secret not in proc.stderr
    blob = all_bytes_under(store)
    assert PASSWORD.encode() not in blob and USER.encode() not in blob
    assert json.loads(ok.stdout)["source"]["server"] == f"{sim.host}:{sim.port}"
