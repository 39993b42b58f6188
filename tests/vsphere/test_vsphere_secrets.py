"""Credentials on the error paths of ``blockvault vsphere``: wrong password (from the environment
and from a credentials file), an unreachable host, a VDDK library that is not one, a VDDK open
failure from a library that repeats the credentials in its texts (the stand-in's VDDK_STUB_LEAK),
and a server fault that repeats them.  The password and the (domain-style) user name appear in
no stdout, stderr, ``--json`` document or store file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import (BLOCK, REPO_ROOT, all_bytes_under, bv, cli_env, create_vm, image, init_store,
                             restore_disk_image, server_args, write)

from pyVmomi import vim  # noqa: E402

from engine.credentials import Credentials  # noqa: E402
from engine.vsphere.errors import describe_fault, describe_native  # noqa: E402

USER = "bv-admin@vsphere.local"
SECRET = "S3cr3t-Pa55-XYZ"
STUB_SRC = REPO_ROOT / "tests" / "vddk_stub" / "vixDiskLibStub.c"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _leaks(proc) -> list[str]:
    text = proc.stdout + proc.stderr
    return [s for s in (SECRET, USER) if s in text]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the VDDK stand-in")
def test_secrets_never_leak_on_error_paths(vcsim_factory, tmp_path):
    sim = vcsim_factory("-username", USER, "-password", SECRET)
    store, srv = init_store(tmp_path / "store"), server_args(sim)
    vm = create_vm(sim, "sec01", [2 * 1024], cbt=True)
    disk = sim.disks(vm.config)[0]
    write(sim, disk, BLOCK - 3, os.urandom(2 * BLOCK))
    lib = tmp_path / "vddk" / "lib64"
    lib.mkdir(parents=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-o", str(lib / "libvixDiskLib.so.8"),
                    str(STUB_SRC), "-lpthread"], check=True)
    (tmp_path / "vddk-root").mkdir()
    env = cli_env({"VDDK_STUB_LEAK": "1", "VDDK_STUB_ROOT": str(tmp_path / "vddk-root")},
                  user=USER, password=SECRET)
    runs = {}

    ok = bv("vsphere", "backup", store, *srv, "--vm", "sec01", "--transport", "http", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    backup_id = json.loads(ok.stdout)["disks"][0]["backup"]
    assert restore_disk_image(store, backup_id, tmp_path / "t1.img") == image(sim, disk)
    runs["success"] = ok

    wrong = "Wr0ng-" + SECRET
    runs["wrong password"] = bv("vsphere", "backup", store, *srv, "--vm", "sec01", "--json",
                                env=cli_env(user=USER, password=wrong))
    creds = tmp_path / "vsphere.cred"
    creds.write_text(f"user = {USER}\npassword = {wrong}\n")
    creds.chmod(0o600)
    runs["wrong password from a file"] = bv("vsphere", "vms", *srv, "--credentials", creds, "--json",
                                            env=cli_env(user="", password=""))
    runs["unreachable host"] = bv("vsphere", "backup", store, "--server", f"127.0.0.1:{_closed_port()}",
                                  "--insecure", "--vm", "sec01", "--json", env=env)
    not_a_library = tmp_path / "libvixDiskLib.so.8"
    not_a_library.write_text("not a library\n")
    runs["library load failure"] = bv("vsphere", "backup", store, *srv, "--vm", "sec01", "--transport", "vddk",
                                      "--vddk-library", not_a_library, "--json", env=env)
    runs["open failure"] = bv("vsphere", "backup", store, *srv, "--vm", "sec01", "--transport", "vddk",
                              "--vddk-library", tmp_path / "vddk", "--json", env=env)
    runs["restore open failure"] = bv("vsphere", "restore", store, "sec01@1", *srv, "--name", "sec01-dr",
                                      "--transport", "vddk", "--vddk-library", tmp_path / "vddk", "--json", env=env)

    for what, proc in runs.items():
        assert _leaks(proc) == [], (what, proc.stdout, proc.stderr)
        if what != "success":
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, (what, proc.stderr)
    assert "refused the login" in runs["wrong password"].stderr
    assert str(creds) in runs["wrong password from a file"].stderr
    assert "cannot reach vCenter 127.0.0.1:" in runs["unreachable host"].stderr
    assert "cannot load libvixDiskLib" in runs["library load failure"].stderr
    # The stand-in did repeat the credentials: in its error text and in a logged warning.
    assert "A file was not found [session user=*** password=***]" in runs["open failure"].stderr
    assert "VixDiskLibStub: connecting to 127.0.0.1 [session user=*** password=***]" in runs["open failure"].stderr
    assert "A file was not found [session user=*** password=***]" in runs["restore open failure"].stderr
    assert "the half-restored VM sec01-dr was removed" in runs["restore open failure"].stderr
    blob = all_bytes_under(store)
    assert SECRET.encode() not in blob and USER.encode() not in blob
    assert vm.snapshot is None


def test_server_texts_are_struck_of_credentials():
    """A fault or an OSError whose text repeats the credentials (a server or a library that
    echoes its request) is described without them."""
    Credentials(USER, SECRET)  # what every connection is made with: its secrets are now known
    fault = vim.fault.InvalidLogin(msg=f"Cannot complete login for {USER} with password {SECRET}",
                                   faultMessage=[vim.LocalizableMessage(key="k", message=f"pw={SECRET}")])
    text = describe_fault(fault)
    assert text == "vim.fault.InvalidLogin: Cannot complete login for *** with password ***; pw=***"
    assert describe_fault(vim.fault.FileFault(file=f"[ds] {SECRET}.vmdk")) == "vim.fault.FileFault: file [ds] ***.vmdk"
    err = OSError(13, f"VixDiskLib_Open failed: VDDK error 35: Authentication failure for {USER}:{SECRET}")
    assert describe_native(err) == "VixDiskLib_Open failed: VDDK error 35: Authentication failure for ***:***"
    Credentials("backup", "ab")  # a plain user name and a tiny password are not struck from words
    assert describe_native(OSError(5, "backup failed: ab")) == "backup failed: ab"
