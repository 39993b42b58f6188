"""Finding things in the vSphere inventory, and the facts a backup reads off them.

A VM is named on the command line by its name, its managed object id
(``vm-42``) or its inventory path (``DC0/vm/folder/web01``); a name that two
VMs share is refused with both paths, because backing up the wrong machine
into a chain is worse than asking.  The listing for ``blockvault vsphere vms``
uses one PropertyCollector request for the whole inventory, not one round
trip per VM and property.

Datastore paths (``[LocalDS_0] web01/web01.vmdk``) are split here, and a disk's
datastore HTTP address is derived here: ``/folder/<path>?dcPath=..&dsName=..``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from engine.errors import NotFoundError
from engine.vsphere.connection import Connection
from engine.vsphere.errors import VsphereError

_MOREF = re.compile(r"^vm-\d+$")
_DS_PATH = re.compile(r"^\[([^\]]+)\]\s*(.*)$")


def vim():
    from pyVmomi import vim as _vim
    return _vim


# -- datastore paths -------------------------------------------------------------


def split_ds_path(path: str) -> tuple[str, str]:
    """``"[ds] dir/file"`` -> ``("ds", "dir/file")``."""
    m = _DS_PATH.match(path or "")
    if not m:
        raise VsphereError(f"{path!r} is not a datastore path like '[datastore] folder/file.vmdk'")
    return m.group(1), m.group(2)


def flat_file(descriptor_path: str) -> str:
    """The data file of a FlatVer2 disk: ``x.vmdk`` -> ``x-flat.vmdk``."""
    if not descriptor_path.endswith(".vmdk"):
        raise VsphereError(f"disk file {descriptor_path!r} does not end in .vmdk")
    return descriptor_path[: -len(".vmdk")] + "-flat.vmdk"


def folder_url(dc_path: str, ds_path: str) -> str:
    ds, rel = split_ds_path(ds_path)
    return f"/folder/{quote(rel)}?{urlencode({'dcPath': dc_path, 'dsName': ds})}"


# -- entities --------------------------------------------------------------------


def datacenter_of(entity):
    node = entity
    while node is not None and not isinstance(node, vim().Datacenter):
        node = node.parent
    if node is None:
        raise VsphereError(f"{entity.name} is in no datacenter")
    return node


def inventory_path(entity) -> str:
    """``DC0/vm/folder/name``: names from the root folder down (the root left out)."""
    names = []
    node = entity
    while node is not None and node.parent is not None:
        names.append(node.name)
        node = node.parent
    return "/".join(reversed(names))


def find_vm(conn: Connection, spec: str):
    """A VM by moref (``vm-42``), inventory path (has a ``/``) or unique name."""
    from pyVmomi import vmodl

    v = vim()
    with conn.guard(f"looking up VM {spec!r}"):
        content = conn.content
        if _MOREF.match(spec):
            vm = v.VirtualMachine(spec, conn.si._stub)
            try:
                vm.name  # noqa: B018 - does it exist?
                return vm
            except vmodl.fault.ManagedObjectNotFound:
                pass  # perhaps a VM named like a moref
        if "/" in spec:
            found = content.searchIndex.FindByInventoryPath(spec)
            if isinstance(found, v.VirtualMachine):
                return found
        matches = [vm for vm, props in _vm_properties(conn, ["name"]) if props.get("name") == spec]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFoundError(f"no VM {spec!r} on vCenter {conn.endpoint} (by name, moref or inventory path); "
                            "see 'blockvault vsphere vms'")
    where = ", ".join(f"{inventory_path(vm)} ({vm._moId})" for vm in matches)
    raise VsphereError(f"{len(matches)} VMs are named {spec!r}: {where}; name one by moref or inventory path")


def _vm_properties(conn: Connection, paths: list[str]):
    """(vm, {path: value}) for every VM, in one PropertyCollector round trip."""
    v = vim()
    from pyVmomi import vmodl

    content = conn.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [v.VirtualMachine], True)
    try:
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                obj=view, skip=True,
                selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                    name="view", path="view", skip=False, type=v.view.ContainerView)])],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=v.VirtualMachine, pathSet=paths)])
        out = []
        for obj in content.propertyCollector.RetrieveContents([spec]):
            out.append((obj.obj, {p.name: p.val for p in obj.propSet or []}))
        return out
    finally:
        view.Destroy()


@dataclass
class VmSummary:
    name: str
    moref: str
    power_state: str
    cbt_enabled: bool
    cbt_supported: bool
    disks: int
    capacity: int


def list_vms(conn: Connection) -> list[VmSummary]:
    v = vim()
    paths = ["name", "runtime.powerState", "config.changeTrackingEnabled",
             "capability.changeTrackingSupported", "config.hardware.device"]
    with conn.guard("listing VMs"):
        rows = _vm_properties(conn, paths)
    out = []
    for vm, props in rows:
        disks = [d for d in props.get("config.hardware.device") or [] if isinstance(d, v.vm.device.VirtualDisk)]
        out.append(VmSummary(
            name=props.get("name", vm._moId), moref=vm._moId,
            power_state=str(props.get("runtime.powerState") or "unknown"),
            cbt_enabled=bool(props.get("config.changeTrackingEnabled")),
            cbt_supported=bool(props.get("capability.changeTrackingSupported")),
            disks=len(disks), capacity=sum(disk_capacity(d) for d in disks)))
    return sorted(out, key=lambda s: (s.name, s.moref))


# -- disks and CBT ------------------------------------------------------------------


def virtual_disks(config) -> list:
    """The VirtualDisks of a VirtualMachineConfigInfo, in device order."""
    return [d for d in config.hardware.device if isinstance(d, vim().vm.device.VirtualDisk)]


def disk_capacity(disk) -> int:
    if getattr(disk, "capacityInBytes", None):
        return int(disk.capacityInBytes)
    return int(disk.capacityInKB or 0) * 1024


def ensure_cbt(conn: Connection, vm, vm_name: str) -> str | None:
    """Turn Changed Block Tracking on where it is off; a warning text when it
    cannot be, or None.  It takes effect at the next snapshot, which is the
    backup's own."""
    v = vim()
    with conn.guard(f"reading the CBT state of VM {vm_name}"):
        if vm.config.changeTrackingEnabled:
            return None
        supported = vm.capability.changeTrackingSupported
    if not supported:
        return (f"VM {vm_name} does not support Changed Block Tracking (virtual hardware 7 or later is needed); "
                "every backup reads its disks in full")
    try:
        conn.wait(vm.ReconfigVM_Task(v.vm.ConfigSpec(changeTrackingEnabled=True)),
                  f"enabling Changed Block Tracking on VM {vm_name}")
    except VsphereError as e:
        return f"{e}; this backup reads the disks in full"
    with conn.guard(f"reading the CBT state of VM {vm_name}"):
        if not vm.config.changeTrackingEnabled:
            return f"VM {vm_name} still shows Changed Block Tracking off after enabling it"
    return None


# -- restore targets ----------------------------------------------------------------


def find_datacenter(conn: Connection, name: str | None):
    v = vim()
    with conn.guard("listing datacenters"):
        dcs = []
        stack = list(conn.content.rootFolder.childEntity)
        while stack:
            e = stack.pop(0)
            if isinstance(e, v.Datacenter):
                dcs.append(e)
            elif isinstance(e, v.Folder):
                stack.extend(e.childEntity)
        if name is None:
            if not dcs:
                raise NotFoundError(f"vCenter {conn.endpoint} has no datacenter")
            return dcs[0]
        for dc in dcs:
            if dc.name == name or inventory_path(dc) == name:
                return dc
    raise NotFoundError(f"no datacenter {name!r} on vCenter {conn.endpoint}")


def find_in(conn: Connection, dc, kind: str, spec: str | None):
    """A datastore, folder, resource pool or host of datacenter ``dc`` by name or path."""
    v = vim()
    types = {"datastore": v.Datastore, "folder": v.Folder, "resource pool": v.ResourcePool,
             "host": v.HostSystem}
    with conn.guard(f"looking up {kind} {spec!r}"):
        if "/" in (spec or ""):
            found = conn.content.searchIndex.FindByInventoryPath(spec)
            if found is None and kind == "folder":
                found = conn.content.searchIndex.FindByInventoryPath(f"{inventory_path(dc)}/vm/{spec}")
            if isinstance(found, types[kind]):
                return found
        roots = {"datastore": dc.datastoreFolder, "folder": dc.vmFolder, "resource pool": dc.hostFolder,
                 "host": dc.hostFolder}
        view = conn.content.viewManager.CreateContainerView(roots[kind], [types[kind]], True)
        try:
            matches = [e for e in view.view if e.name == spec]
        finally:
            view.Destroy()
    if len(matches) == 1:
        return matches[0]
    what = "none" if not matches else ", ".join(inventory_path(m) for m in matches)
    raise NotFoundError(f"{kind} {spec!r} in datacenter {dc.name}: {what} found; give a unique name or a path")
