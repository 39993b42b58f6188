"""Backups and restores through the VDDK C ABI: a stand-in libvixDiskLib, built here
from C and loaded with dlopen by the real binding, serves local files as vSphere disks."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, store_fingerprint, text_bytes, write_at

STUB_SRC = os.path.join(REPO_ROOT, "tests", "vddk_stub", "vixDiskLibStub.c")
PASSWORD = "S3cret-pa55word!"
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture
def vsphere(tmp_path):
    lib = tmp_path / "vddk" / "lib64"
    lib.mkdir(parents=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-o",
                    str(lib / "libvixDiskLib.so.8"), STUB_SRC, "-lpthread"], check=True)
    root = tmp_path / "datastores"
    disk = root / "vm-42" / "snapshot-7" / "ds1" / "web01" / "web01.vmdk"
    disk.parent.mkdir(parents=True)
    size = 24 << 20
    make_sparse(str(disk), size)
    r = rng(80)
    write_at(str(disk), 3 << 20, r.bytes(1 << 20))
    write_at(str(disk), (10 << 20) + 5, text_bytes(r, 300_000))
    env = dict(os.environ, VDDK_STUB_ROOT=str(root), VDDK_STUB_LOG=str(tmp_path / "vddk.log"),
               VDDK_STUB_USER="backup", VDDK_STUB_PASSWORD=PASSWORD,
               BLOCKVAULT_VSPHERE_USER="backup", BLOCKVAULT_VSPHERE_PASSWORD=PASSWORD)
    url = (f"vddk://vc.lab:443/vm-42?disk=[ds1] web01/web01.vmdk&snapshot=snapshot-7"
           f"&transport=nbdssl:nbd&thumbprint=AA:BB:CC&library={tmp_path / 'vddk'}")
    store = str(tmp_path / "store")
    assert run_cli("init", store, "--chunk-size", "256K").returncode == 0
    return dict(env=env, url=url, disk=str(disk), store=store, root=root, log=tmp_path / "vddk.log", size=size)


def _all_bytes_under(path):
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                yield f.read()


def test_backup_and_restore_through_vddk(vsphere, tmp_path):
    v = vsphere
    proc = run_cli("backup", v["store"], v["url"], "--disk", "web01-disk0", "--json", env=v["env"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["metadata"]["source"]["kind"] == "vddk"
    assert doc["metadata"]["source"]["transport"] == "nbdssl"
    assert doc["size"] == v["size"] and doc["stats"]["bytes_read"] < 4 << 20  # allocated blocks only

    out = str(tmp_path / "restored.raw")
    assert run_cli("restore", v["store"], "web01-disk0@1", out, env=v["env"]).returncode == 0
    assert same_file(out, v["disk"])

    log = v["log"].read_text()
    calls = [line.split()[0] for line in log.splitlines() if line and not line.startswith(" ")]
    order = [c for c in calls if c in ("InitEx", "PrepareForAccess", "ConnectEx", "Open", "QueryAllocatedBlocks",
                                        "Read", "Close", "Disconnect", "EndAccess", "Exit")]
    assert order[0] == "InitEx" and "VIOLATION" not in log
    first = {c: order.index(c) for c in set(order)}
    assert first["PrepareForAccess"] < first["ConnectEx"] < first["Open"] < first["QueryAllocatedBlocks"] < first["Read"]
    assert max(i for i, c in enumerate(order) if c == "Read") < order.index("Close") < order.index("EndAccess")

    # The password reaches VDDK but nothing else: not the log, the store, the output.
    assert PASSWORD not in log and PASSWORD not in proc.stdout + proc.stderr
    assert not any(PASSWORD.encode() in blob for blob in _all_bytes_under(v["store"]))


def test_restore_writes_a_vsphere_disk(vsphere, tmp_path):
    v = vsphere
    assert run_cli("backup", v["store"], v["url"], "--disk", "web01-disk0", env=v["env"]).returncode == 0
    target_file = v["root"] / "vm-77" / "current" / "ds1" / "new" / "new.vmdk"
    target_file.parent.mkdir(parents=True)
    with open(target_file, "wb") as f:                 # a reused disk with stale data in it
        f.write(b"\xee" * v["size"])
    url = f"vddk://vc.lab/vm-77?disk=[ds1] new/new.vmdk&library={tmp_path / 'vddk'}"
    refused = run_cli("restore", v["store"], "web01-disk0@1", url, env=v["env"])
    assert refused.returncode == 1 and "--force" in refused.stderr
    proc = run_cli("restore", v["store"], "web01-disk0@1", url, "--force", env=v["env"])
    assert proc.returncode == 0, proc.stderr
    assert same_file(str(target_file), v["disk"])      # zero chunks were written over the stale bytes
    snap = run_cli("restore", v["store"], "web01-disk0@1", url + "&snapshot=snapshot-1", "--force", env=v["env"])
    assert snap.returncode == 1 and "never a snapshot" in snap.stderr


def test_wrong_password_and_missing_credentials(vsphere):
    v = vsphere
    before = store_fingerprint(v["store"])
    env = dict(v["env"], BLOCKVAULT_VSPHERE_PASSWORD="wrong-one")
    proc = run_cli("backup", v["store"], v["url"], "--disk", "d", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "wrong-one" not in proc.stderr and "VDDK error" in proc.stderr
    env = {k: val for k, val in v["env"].items() if not k.startswith("BLOCKVAULT_VSPHERE")}
    proc = run_cli("backup", v["store"], v["url"], "--disk", "d", env=env)
    assert proc.returncode == 1 and "BLOCKVAULT_VSPHERE_USER" in proc.stderr
    with_creds = v["url"].replace("vddk://", "vddk://backup:x@")
    proc = run_cli("backup", v["store"], with_creds, "--disk", "d", env=v["env"])
    assert proc.returncode == 1 and "do not belong" in proc.stderr
    assert store_fingerprint(v["store"]) == before


def test_credentials_file(vsphere, tmp_path):
    v = vsphere
    creds = tmp_path / "creds"
    creds.write_text(f"# lab\nuser=backup\npassword={PASSWORD}\n")
    creds.chmod(0o600)
    env = {k: val for k, val in v["env"].items() if not k.startswith("BLOCKVAULT_VSPHERE")}
    proc = run_cli("backup", v["store"], v["url"], "--disk", "d", "--credentials", str(creds), env=env)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "restored.raw"
    assert run_cli("restore", v["store"], "d@1", str(out), env=env).returncode == 0
    assert same_file(str(out), v["disk"])              # what VDDK served is what was stored


SECRET_USER = "bv-admin@vsphere.local"
SECRET = "S3cr3t-Pa55-XYZ"


def test_secrets_never_leak_on_any_path(vsphere, tmp_path):
    """The stand-in repeats the user and password in every error text and logs them as a
    warning (VDDK_STUB_LEAK, a careless library).  On every path -- success, wrong password from
    the environment or a credentials file, a disk that is not there, a library that is not one,
    a restore target that cannot be opened -- neither reaches stdout, stderr, --json output or
    the store."""
    v = vsphere
    env = dict(v["env"], VDDK_STUB_USER=SECRET_USER, VDDK_STUB_PASSWORD=SECRET, VDDK_STUB_LEAK="1",
               BLOCKVAULT_VSPHERE_USER=SECRET_USER, BLOCKVAULT_VSPHERE_PASSWORD=SECRET)
    runs = {}
    runs["success"] = run_cli("backup", v["store"], v["url"], "--disk", "web01-disk0", "--json", env=env)
    assert runs["success"].returncode == 0, runs["success"].stderr
    out = tmp_path / "restored.raw"
    assert run_cli("restore", v["store"], "web01-disk0@1", str(out), env=env).returncode == 0
    assert same_file(str(out), v["disk"])

    wrong = "Wr0ng-" + SECRET
    runs["wrong password"] = run_cli("backup", v["store"], v["url"], "--disk", "d", "--json",
                                     env=dict(env, BLOCKVAULT_VSPHERE_PASSWORD=wrong))
    creds = tmp_path / "creds"
    creds.write_text(f"user = {SECRET_USER}\npassword = {wrong}\n")
    creds.chmod(0o600)
    no_env = {k: val for k, val in env.items() if not k.startswith("BLOCKVAULT_VSPHERE")}
    runs["wrong password from a file"] = run_cli("backup", v["store"], v["url"], "--disk", "d",
                                                 "--credentials", str(creds), env=no_env)
    missing = v["url"].replace("web01/web01.vmdk", "web01/missing.vmdk")
    runs["open failure"] = run_cli("backup", v["store"], missing, "--disk", "d", "--json", env=env)
    not_a_library = tmp_path / "libvixDiskLib.so.8"
    not_a_library.write_text(f"not a library {SECRET}\n")
    bad_lib = v["url"].split("&library=")[0] + f"&library={not_a_library}"
    runs["library load failure"] = run_cli("backup", v["store"], bad_lib, "--disk", "d", env=env)
    target = f"vddk://vc.lab/vm-77?disk=[ds1] nowhere/new.vmdk&library={tmp_path / 'vddk'}"
    runs["restore open failure"] = run_cli("restore", v["store"], "web01-disk0@1", target, "--force", env=env)

    for what, proc in runs.items():
        if what != "success":
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, (what, proc.stderr)
    leaks = {what: proc.stdout + proc.stderr for what, proc in runs.items()
             if any(secret in proc.stdout + proc.stderr for secret in (SECRET, SECRET_USER))}
    assert leaks == {}
    # The library did repeat them (struck out here), so the check above means something.
    assert "vddk: VixDiskLibStub: connecting to vc.lab [session user=*** password=***]" in runs["success"].stderr
    assert "Authentication failure [session user=*** password=***]" in runs["wrong password"].stderr
    assert str(creds) in runs["wrong password from a file"].stderr
    assert "A file was not found [session user=*** password=***]" in runs["open failure"].stderr
    assert "cannot load libvixDiskLib" in runs["library load failure"].stderr
    assert "cannot open vddk://" in runs["restore open failure"].stderr
    assert not any(s.encode() in blob for blob in _all_bytes_under(v["store"]) for s in (SECRET, SECRET_USER))


def test_missing_library_is_a_clear_error(vsphere, tmp_path):
    v = vsphere
    before = store_fingerprint(v["store"])
    url = v["url"].split("&library=")[0] + f"&library={tmp_path / 'nowhere'}"
    proc = run_cli("backup", v["store"], url, "--disk", "d", env=v["env"])
    assert proc.returncode == 1 and "libvixDiskLib" in proc.stderr and "Traceback" not in proc.stderr
    assert store_fingerprint(v["store"]) == before
