"""Helpers for the engine's vSphere tests: VMs with known disk contents on the
simulator, the blockvault command against it, and byte-exact disk images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from pyVim.task import WaitForTask
    from pyVmomi import vim
except ImportError:  # a declared test dependency: only a bare developer machine lacks it
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise
    pytest.skip("vSphere tests unavailable: pyvmomi is not installed", allow_module_level=True)  # see conftest

REPO_ROOT = Path(__file__).resolve().parents[2]
KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB           # the simulator's CBT granularity, and the test stores' chunk size
USER = "bv-operator@vsphere.local"
PASSWORD = "Tr0ub4dor&3-never-print-me"


def sha256_thumbprint(sim) -> str:
    pem = ssl.get_server_certificate((sim.host, sim.port))
    der = ssl.PEM_cert_to_DER_cert(pem)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def cli_env(extra: dict | None = None, user: str = USER, password: str = PASSWORD) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env.update(BLOCKVAULT_VSPHERE_USER=user, BLOCKVAULT_VSPHERE_PASSWORD=password)
    env.update(extra or {})
    return env


def bv(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real ``blockvault`` command in a child process."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env if env is not None else cli_env(),
                          stdin=subprocess.DEVNULL)


def server_args(sim, pin: bool = True) -> list[str]:
    args = ["--server", f"{sim.host}:{sim.port}"]
    return args + (["--thumbprint", sha256_thumbprint(sim)] if pin else ["--insecure"])


def bv_json(*args, env=None) -> dict:
    proc = bv(*args, "--json", env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return json.loads(proc.stdout)


def init_store(path: Path) -> str:
    proc = bv("init", path, "--chunk-size", "64K")
    assert proc.returncode == 0, proc.stderr
    return str(path)


def create_vm(sim, name: str, capacities_kb: list[int], cbt: bool = False, nic: bool = False):
    """CreateVM_Task: a PVSCSI controller, one thin disk per capacity, optionally a NIC."""
    dc = sim.datacenter
    host = next(h for h in sim.content.viewManager.CreateContainerView(dc.hostFolder, [vim.HostSystem], True).view)
    changes = [vim.vm.device.VirtualDeviceSpec(
        operation="add",
        device=vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing"))]
    for i, kb in enumerate(capacities_kb):
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation="add", fileOperation="create",
            device=vim.vm.device.VirtualDisk(
                key=-101 - i, controllerKey=-100, unitNumber=i, capacityInKB=kb,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{sim.datastore.name}]", diskMode="persistent", thinProvisioned=True))))
    if nic:
        net = sim.datacenter.network[0]
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualVmxnet3(
            key=-200, addressType="generated",
            backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net.name, network=net))))
    spec = vim.vm.ConfigSpec(name=name, guestId="otherGuest", numCPUs=2, memoryMB=128, annotation=f"{name} (test)",
                             files=vim.vm.FileInfo(vmPathName=f"[{sim.datastore.name}]"),
                             changeTrackingEnabled=cbt, deviceChange=changes)
    WaitForTask(dc.vmFolder.CreateVM_Task(config=spec, pool=host.parent.resourcePool, host=host))
    return sim.vm(name)


def write(sim, disk, offset: int, data: bytes) -> None:
    """What a guest writes: straight into the disk's flat file."""
    with open(sim.flat_path(disk), "r+b") as f:
        f.seek(offset)
        f.write(data)


def image(sim, disk) -> bytes:
    return sim.flat_path(disk).read_bytes()


def keep_images(sim, vm, where: Path, tag: str) -> dict[int, Path]:
    """Copies of the VM's disks as they are now, by device key."""
    out = {}
    for d in sim.disks(vm.config):
        dst = where / f"{tag}-{d.key}.img"
        shutil.copyfile(sim.flat_path(d), dst)
        out[d.key] = dst
    return out


def reconfigure(sim, vm, **spec) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(**spec)))


def reset_cbt(sim, vm) -> None:
    """Turn CBT off and on again: every changeId of the VM becomes invalid."""
    reconfigure(sim, vm, changeTrackingEnabled=False)
    reconfigure(sim, vm, changeTrackingEnabled=True)


def snapshot_names(vm) -> list[str]:
    def walk(trees):
        for t in trees or []:
            yield t
            yield from walk(t.childSnapshotList)
    return [t.name for t in walk(vm.snapshot.rootSnapshotList if vm.snapshot else None)]


def all_bytes_under(path) -> bytes:
    chunks = []
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                chunks.append(f.read())
    return b"\0".join(chunks)


def connect(sim, pin: bool = False):
    """An engine Connection to the simulator (API-level tests)."""
    from engine.credentials import Credentials
    from engine.vsphere.connection import Connection, Endpoint, TlsPolicy

    tls = TlsPolicy(thumbprint=sha256_thumbprint(sim)) if pin else TlsPolicy(insecure=True)
    return Connection(Endpoint(sim.host, sim.port), Credentials(USER, PASSWORD), tls, timeout=10)


def restore_disk_image(store: str, backup_id: str, target: Path) -> bytes:
    proc = bv("restore", store, backup_id, target)
    assert proc.returncode == 0, proc.stderr
    return target.read_bytes()
