"""The VDDK transport of VM backups and disaster recovery, against vcsim and the VDDK stand-in.

vcsim answers the vSphere API (snapshots, changeIds, QueryChangedDiskAreas,
CreateVM_Task); the stand-in libvixDiskLib (tests/vddk_stub, built here with
gcc and loaded by native's real dlopen binding) serves "[datastore] path" of a
VM moref and snapshot moref from a directory tree.  The run's own event hook
links that tree to the simulator's flat files as soon as the snapshot (or the
new VM) exists, which is the moment real VDDK could open them too.

VDDK is loaded once per process and never unloaded, so every run happens in
a child process of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap

import pytest

# vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import (BLOCK, MiB, PASSWORD, REPO_ROOT, USER, create_vm, image, init_store, keep_images,
                             restore_disk_image, write)

STUB_SRC = REPO_ROOT / "tests" / "vddk_stub" / "vixDiskLibStub.c"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the VDDK stand-in")

CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, REPO)
    from pyVmomi import vim
    from engine.credentials import Credentials
    from engine.repository import Repository
    from engine.vsphere.backup import BackupOptions, backup_vm
    from engine.vsphere.connection import Connection, Endpoint, TlsPolicy
    from engine.vsphere.inventory import find_vm, flat_file, split_ds_path, virtual_disks
    from engine.vsphere.restore import RestoreOptions, restore_vm

    ARGS = json.loads(sys.argv[1])
    root, ds_dir = ARGS["root"], ARGS["ds_dir"]
    conn = Connection(Endpoint(ARGS["host"], ARGS["port"]), Credentials(ARGS["user"], ARGS["password"]),
                      TlsPolicy(thumbprint=ARGS["pin"]), timeout=20)

    def link(vm_moref, where, config):
        # "[ds] dir/disk.vmdk" of this VM (and snapshot) -> the simulator's flat file
        for disk in virtual_disks(config):
            ds, rel = split_ds_path(disk.backing.fileName)
            path = os.path.join(root, vm_moref, where, ds, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(os.path.join(ds_dir, split_ds_path(flat_file(disk.backing.fileName))[1]), path)

    def on_event(event, detail):
        if event == "snapshot-created":
            snap = vim.vm.Snapshot(detail["snapshot"], conn.si._stub)
            link(detail["vm"], detail["snapshot"], snap.config)
        elif event == "vm-created":
            link(detail["vm"], "current", vim.VirtualMachine(detail["vm"], conn.si._stub).config)

    with Repository.open(ARGS["store"]) as repo:
        if ARGS["what"] == "backup":
            r = backup_vm(repo, conn, find_vm(conn, ARGS["vm"]),
                          BackupOptions(transport="vddk", vddk_library=ARGS["library"], cbt_sample=0,
                                        vddk_transports="nbdssl:nbd", on_event=on_event))
            print(json.dumps({"id": r.record.id, "disks": r.record.disks, "source": r.record.source,
                              "warnings": r.warnings}))
        else:
            r = restore_vm(repo, conn, ARGS["ref"], RestoreOptions(name=ARGS["name"], transport="vddk",
                                                                  vddk_library=ARGS["library"], on_event=on_event))
            print(json.dumps({"vm": r.vm, "transport": r.transport, "disks": r.disks}))
    conn.close()
""")


@pytest.fixture(scope="module")
def stub_library(tmp_path_factory):
    lib = tmp_path_factory.mktemp("vddk") / "lib64"
    lib.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-o", str(lib / "libvixDiskLib.so.8"),
                    str(STUB_SRC), "-lpthread"], check=True)
    return lib.parent


def sha1_thumbprint(sim) -> str:
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((sim.host, sim.port)))
    return ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())


def run_child(sim, tmp_path, library, **args):
    root = tmp_path / "vddk-root"
    root.mkdir(exist_ok=True)
    log = tmp_path / f"vddk-{len(list(tmp_path.glob('vddk-*.log')))}.log"  # one log per run
    env = dict(os.environ, VDDK_STUB_ROOT=str(root), VDDK_STUB_LOG=str(log), VDDK_STUB_USER=USER,
               VDDK_STUB_PASSWORD=PASSWORD, VDDK_STUB_THUMBPRINT=sha1_thumbprint(sim))
    pin = ":".join(f"{b:02X}" for b in hashlib.sha256(ssl.PEM_cert_to_DER_cert(
        ssl.get_server_certificate((sim.host, sim.port)))).digest())
    doc = dict(args, root=str(root), ds_dir=str(sim.datastore_dir()), host=sim.host, port=sim.port, user=USER,
               password=PASSWORD, pin=pin, library=str(library))
    proc = subprocess.run([sys.executable, "-c", CHILD.replace("REPO", repr(str(REPO_ROOT)), 1), json.dumps(doc)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), log.read_text(), proc


def test_backup_and_disaster_recovery_through_vddk(vcsim, tmp_path, stub_library):
    store = init_store(tmp_path / "store")
    vm = create_vm(vcsim, "vddk01", [6 * 1024, 2 * 1024], cbt=True)
    a, b = vcsim.disks(vm.config)
    write(vcsim, a, 0, os.urandom(5 * BLOCK))
    write(vcsim, b, MiB, os.urandom(BLOCK))

    t1, log1, _ = run_child(vcsim, tmp_path, stub_library, what="backup", store=store, vm="vddk01")
    assert t1["id"] == "vddk01@1" and t1["source"]["transport"] == "vddk"
    assert [d["transport"] for d in t1["disks"]] == ["nbdssl", "nbdssl"]   # what VDDK chose from the list
    assert [d["bytes_read"] for d in t1["disks"]] == [5 * BLOCK, BLOCK]    # QueryAllocatedBlocks
    point1 = keep_images(vcsim, vm, tmp_path, "t1")
    for d, key in zip(t1["disks"], (a.key, b.key)):   # what VDDK served is what the disks hold
        assert restore_disk_image(store, d["backup"], tmp_path / f"r1-{key}.img") == point1[key].read_bytes()

    write(vcsim, a, 4 * MiB, os.urandom(BLOCK))
    t2, log2, _ = run_child(vcsim, tmp_path, stub_library, what="backup", store=store, vm="vddk01")
    assert [(d["read"], d["bytes_read"]) for d in t2["disks"]] == [("changed-areas", BLOCK), ("changed-areas", 0)]
    point2 = keep_images(vcsim, vm, tmp_path, "t2")
    for d, key in zip(t2["disks"], (a.key, b.key)):
        assert restore_disk_image(store, d["backup"], tmp_path / f"r2-{key}.img") == point2[key].read_bytes()

    for log in (log1, log2):
        calls = [line.split()[0] for line in log.splitlines() if line and not line.startswith(" ")]
        assert "VIOLATION" not in log and PASSWORD not in log
        assert calls.index("PrepareForAccess") < calls.index("ConnectEx") < calls.index("Read")
        assert max(i for i, c in enumerate(calls) if c == "Read") < calls.index("EndAccess")

    for n, saved in ((1, point1), (2, point2)):
        dr, log, _ = run_child(vcsim, tmp_path, stub_library, what="restore", store=store, ref=f"vddk01@{n}",
                               name=f"vddk01-dr{n}")
        assert dr["transport"] == "vddk" and len(dr["disks"]) == 2
        new = vcsim.disks(vcsim.vm(f"vddk01-dr{n}").config)
        assert [image(vcsim, d) for d in new] == [saved[a.key].read_bytes(), saved[b.key].read_bytes()]
        assert "Write" in log and "VIOLATION" not in log
        # A restore writes the new VM's base disks: no snapshot in any ConnectEx.
        assert "snapshot-" not in "".join(line for line in log.splitlines() if line.startswith("ConnectEx"))
