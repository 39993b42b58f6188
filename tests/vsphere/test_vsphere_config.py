"""What a VM backup keeps besides data: the configuration as JSON, the spec that
recreates the VM from it, the VM's name in the store, and the server's VM list."""

from __future__ import annotations

import json

import pytest

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import bv_json, create_vm, init_store, server_args, write

from pyVmomi import SoapAdapter, vim  # noqa: E402

from engine.catalog import check_disk_name  # noqa: E402
from engine.errors import BadInputError  # noqa: E402
from engine.vsphere.configspec import build_spec  # noqa: E402
from engine.vsphere.connection import Endpoint, TlsPolicy  # noqa: E402
from engine.vsphere.errors import VsphereError  # noqa: E402
from engine.vsphere.vmcatalog import disk_backup_name, parse_vm_ref, vm_backup_name  # noqa: E402
from engine.vsphere.vmconfig import config_from_json, config_to_json, decode, encode  # noqa: E402


def snapshot_config(sim, vm):
    snap = sim.wait(vm.CreateSnapshot_Task(name="cfg", memory=False, quiesce=False))
    return snap.config


@pytest.mark.parametrize("which", ["default", "created"])
def test_config_survives_json_exactly(vcsim, which):
    vm = vcsim.vm() if which == "default" else create_vm(vcsim, "cfg01", [1024, 2048], cbt=True, nic=True)
    config = snapshot_config(vcsim, vm)
    text = json.dumps(config_to_json(config))
    dropped = []
    back = config_from_json(json.loads(text), dropped)
    assert dropped == []
    # Byte-identical once serialised as the API would send it: types, enums, morefs, dates.
    assert SoapAdapter.Serialize(back) == SoapAdapter.Serialize(config)
    doc = json.loads(text)
    assert doc["_vimtype"] == "vim.vm.ConfigInfo"
    disk = next(d for d in doc["hardware"]["device"] if d["_vimtype"] == "vim.vm.device.VirtualDisk")
    assert disk["backing"]["datastore"].startswith("vim.Datastore:")


def test_typed_any_values_and_unknown_fields():
    opts = [vim.option.OptionValue(key="big", value=encode_long(1 << 40)), vim.option.OptionValue(key="s", value="x")]
    doc = encode(vim.vm.ConfigSpec(extraConfig=opts))
    assert doc["extraConfig"][0]["value"] == {"_vimtype": "long", "_value": 1 << 40}
    assert doc["extraConfig"][1]["value"] == "x"
    doc["fieldFromTheFuture"] = 1
    dropped = []
    back = decode(doc, dropped=dropped)
    assert SoapAdapter.Serialize(back.extraConfig[0]) == SoapAdapter.Serialize(opts[0])
    assert dropped == ["config.fieldFromTheFuture"]
    with pytest.raises(VsphereError, match="not a vim.vm.ConfigInfo"):
        config_from_json({"_vimtype": "vim.vm.ConfigSpec"})


def encode_long(n):
    from pyVmomi import VmomiSupport
    return VmomiSupport.GetVmodlType("long")(n)


def test_spec_regenerates_identity_and_keeps_structure(vcsim):
    vm = create_vm(vcsim, "cfg02", [1024, 3072], cbt=True, nic=True)
    saved = snapshot_config(vcsim, vm)
    saved.extraConfig = list(saved.extraConfig or []) + [
        vim.option.OptionValue(key="uuid.bios", value="56 4d 00"),
        vim.option.OptionValue(key="scsi0:1.ctkEnabled", value="TRUE"),
        vim.option.OptionValue(key="guestinfo.role", value="db")]
    config = config_from_json(json.loads(json.dumps(config_to_json(saved))))
    out = build_spec(config, "cfg02-dr", "LocalDS_0")
    spec = out.spec
    assert spec.name == "cfg02-dr" and spec.files.vmPathName == "[LocalDS_0]"
    assert spec.uuid is None and spec.instanceUuid is None
    assert spec.numCPUs == 2 and spec.memoryMB == 128 and spec.changeTrackingEnabled is True
    assert {o.key for o in spec.extraConfig} >= {"guestinfo.role"}
    assert not {o.key for o in spec.extraConfig} & {"uuid.bios", "scsi0:1.ctkEnabled"}
    devices = [c.device for c in spec.deviceChange]
    assert all(d.key < 0 for d in devices)
    assert not any(type(d).__name__.endswith(("VirtualVideoCard", "VirtualIDEController", "VirtualKeyboard"))
                   for d in devices)
    ctrl = next(d for d in devices if isinstance(d, vim.vm.device.ParaVirtualSCSIController))
    disks = [c for c in spec.deviceChange if isinstance(c.device, vim.vm.device.VirtualDisk)]
    assert [c.fileOperation for c in disks] == ["create", "create"]
    assert all(c.device.controllerKey == ctrl.key for c in disks)
    assert [c.device.capacityInBytes for c in disks] == [1 << 20, 3 << 20]
    for c in disks:
        b = c.device.backing
        assert b.fileName == "[LocalDS_0]" and b.changeId is None and b.parent is None and b.uuid is None
    nic = next(d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert nic.macAddress is None and nic.addressType == "generated"
    assert [(d.saved_key, d.capacity) for d in out.disks] == [
        (d.key, d.capacityInBytes) for d in vcsim.disks(saved)]


def test_vm_names_in_the_store():
    assert vm_backup_name("web01") == "web01"
    odd = vm_backup_name("Finance DB (prod)/eu@2")
    assert odd.startswith("Finance_DB__prod__eu_2+") and check_disk_name(disk_backup_name(odd, 2000))
    assert vm_backup_name(odd) == odd                                   # idempotent
    assert vm_backup_name("a b") != vm_backup_name("a_b")               # no shared chain
    assert vm_backup_name("_x").startswith("vm_x+")
    assert len(disk_backup_name(vm_backup_name("v" * 80 + " " + "w" * 80), 2147483647)) <= 200
    assert parse_vm_ref("Finance DB (prod)/eu@2@3") == (vm_backup_name("Finance DB (prod)/eu@2"), "3")
    with pytest.raises(BadInputError):
        parse_vm_ref("web01")


def test_server_and_certificate_options():
    assert Endpoint.parse("vc.lab") == Endpoint("vc.lab", 443)
    assert Endpoint.parse("vc.lab:8443") == Endpoint("vc.lab", 8443)
    assert Endpoint.parse("[fd00::1]:9443") == Endpoint("fd00::1", 9443)
    assert str(Endpoint("fd00::1", 1)) == "[fd00::1]:1"
    for bad in ("", "vc.lab:0", "vc.lab:99999", "https://vc.lab", "a b"):
        with pytest.raises(VsphereError):
            Endpoint.parse(bad)
    assert TlsPolicy(thumbprint="aa:" * 31 + "aa").pin == "aa" * 32
    for bad in ("zz" * 20, "ab" * 21):
        with pytest.raises(VsphereError, match="thumbprint"):
            TlsPolicy(thumbprint=bad)


def test_vms_lists_cbt_state_and_last_backup(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    vm = create_vm(vcsim, "listed", [1024])
    write(vcsim, vcsim.disks(vm.config)[0], 0, b"x")
    before = {v["name"]: v for v in bv_json("vsphere", "vms", *server_args(vcsim), "--store", store)["vms"]}
    assert before["listed"]["cbt_enabled"] is False and before["listed"]["cbt_supported"] is True
    assert before["listed"]["last_backup"] is None and before["listed"]["disks"] == 1
    assert {"DC0_H0_VM0", "DC0_C0_RP0_VM1"} <= set(before)
    bv_json("vsphere", "backup", store, *server_args(vcsim), "--vm", vm._moId)  # by moref
    after = {v["name"]: v for v in bv_json("vsphere", "vms", *server_args(vcsim), "--store", store)["vms"]}
    assert after["listed"]["cbt_enabled"] is True
    assert after["listed"]["last_backup"]["id"] == "listed@1" and after["listed"]["last_backup"]["kind"] == "full"
