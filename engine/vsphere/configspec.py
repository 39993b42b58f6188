"""From a saved VirtualMachineConfigInfo to the ConfigSpec that recreates the VM.

Disaster recovery creates a *new* VM (``CreateVM_Task``) next to, or instead
of, the lost one, so the spec follows VMware's recipe for that
(vsphere-vddk.md §2.4) plus what makes a second copy safe:

* the default devices every new VM gets anyway (IDE, PS/2, PCI, SIO
  controllers, keyboard, pointing device, VMCI, and the video card, which
  vCenter and vcsim add themselves) are left out; devices still attached to
  them keep those standard keys;
* every other device gets a negative temporary key, and ``controllerKey``
  references are rewritten to match, as are boot-order entries;
* disks are created anew (``fileOperation=create``) on the target datastore
  with their saved capacities, as thin or thick flat disks like the saved
  ones; nothing of the old files survives: no parent, no changeId, no UUID;
* identity that must not clash with the original is regenerated: the VM's
  BIOS and instance UUIDs, NIC MAC addresses (``addressType=generated``), DVS
  port bindings, and the identity entries of ``extraConfig``;
* settings are copied from a list of fields known to be valid in a spec;
  everything not copied is named in ``notes`` for the restore's report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.vsphere.inventory import disk_capacity

DEFAULT_DEVICES = ("VirtualIDEController", "VirtualPS2Controller", "VirtualPCIController", "VirtualSIOController",
                   "VirtualKeyboard", "VirtualVMCIDevice", "VirtualPointingDevice", "VirtualVideoCard")

# ConfigInfo field -> ConfigSpec field, copied as they are.
COPIED = {
    "guestId": "guestId", "alternateGuestName": "alternateGuestName", "annotation": "annotation",
    "version": "version", "firmware": "firmware", "memoryHotAddEnabled": "memoryHotAddEnabled",
    "cpuHotAddEnabled": "cpuHotAddEnabled", "cpuHotRemoveEnabled": "cpuHotRemoveEnabled",
    "changeTrackingEnabled": "changeTrackingEnabled", "nestedHVEnabled": "nestedHVEnabled",
    "vPMCEnabled": "vPMCEnabled", "vAssertsEnabled": "vAssertsEnabled", "cpuAllocation": "cpuAllocation",
    "memoryAllocation": "memoryAllocation", "latencySensitivity": "latencySensitivity", "flags": "flags",
    "swapPlacement": "swapPlacement", "maxMksConnections": "maxMksConnections",
    "guestAutoLockEnabled": "guestAutoLockEnabled", "memoryReservationLockedToMax": "memoryReservationLockedToMax",
    "messageBusTunnelEnabled": "messageBusTunnelEnabled", "sevEnabled": "sevEnabled",
    "vmxStatsCollectionEnabled": "vmxStatsCollectionEnabled", "defaultPowerOps": "powerOpInfo",
    "consolePreferences": "consolePreferences",
}
HARDWARE = {"numCPU": "numCPUs", "numCoresPerSocket": "numCoresPerSocket", "memoryMB": "memoryMB",
            "virtualICH7MPresent": "virtualICH7MPresent", "virtualSMCPresent": "virtualSMCPresent"}
NOT_COPIED = ("vAppConfig", "ftInfo", "repConfig", "managedBy", "keyId", "vcpuConfig", "numaInfo",
              "sgxInfo", "guestMonitoringModeInfo")
# extraConfig keys that carry the old VM's identity or runtime state.
_IDENTITY_KEYS = re.compile(
    r"^(uuid\..*|vc\.uuid|nvram|sched\.swap\.derivedname|migrate\..*|checkpoint\..*|hostcpuid\..*|"
    r"guestcpuid\..*|usercpuid\..*|ethernet\d+\.(generatedaddress.*|address|addresstype)|.*ctkenabled)$",
    re.IGNORECASE)


@dataclass
class RestoreDisk:
    """A disk of the saved config and the temporary key it has in the spec."""
    saved_key: int
    temp_key: int
    capacity: int
    label: str


@dataclass
class RestoreSpec:
    spec: object                      # vim.vm.ConfigSpec
    disks: list[RestoreDisk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_spec(config, name: str, datastore: str, datastore_ref=None) -> RestoreSpec:
    """The ConfigSpec for ``CreateVM_Task`` of a new VM ``name`` on ``datastore``."""
    from pyVmomi import vim

    out = RestoreSpec(spec=vim.vm.ConfigSpec(name=name, files=vim.vm.FileInfo(vmPathName=f"[{datastore}]")))
    spec = out.spec
    for src, dst in COPIED.items():
        _copy(out, getattr(config, src, None), dst)
    hw = config.hardware
    for src, dst in HARDWARE.items():
        _copy(out, getattr(hw, src, None), dst)
    if spec.tools is None and config.tools is not None:
        tools = config.tools
        tools.toolsVersion = tools.toolsInstallType = tools.lastInstallInfo = None  # facts, not settings
        tools.pendingCustomization = tools.customizationKeyId = None
        spec.tools = tools
    for name_ in NOT_COPIED:
        if getattr(config, name_, None):
            out.notes.append(f"the saved '{name_}' setting is not restored; set it again by hand if needed")
    spec.extraConfig = [o for o in config.extraConfig or [] if not _IDENTITY_KEYS.match(o.key or "")]
    if config.cpuFeatureMask:
        spec.cpuFeatureMask = [vim.vm.ConfigSpec.CpuIdInfoSpec(operation="add", info=m)
                               for m in config.cpuFeatureMask]

    kept = [d for d in hw.device or [] if type(d).__name__.rsplit(".", 1)[-1] not in DEFAULT_DEVICES]
    keys = {d.key: -(i + 1) for i, d in enumerate(kept)}
    for dev in kept:
        dev.key = keys[dev.key]
        if dev.controllerKey in keys:
            dev.controllerKey = keys[dev.controllerKey]
        if isinstance(dev, vim.vm.device.VirtualController):
            dev.device = []
        change = vim.vm.device.VirtualDeviceSpec(operation="add", device=dev)
        if isinstance(dev, vim.vm.device.VirtualDisk):
            saved_key = next(k for k, v in keys.items() if v == dev.key)
            _new_disk(out, dev, saved_key, datastore, datastore_ref)
            change.fileOperation = "create"
        elif isinstance(dev, vim.vm.device.VirtualEthernetCard):
            _new_nic(dev)
        elif isinstance(dev, (vim.vm.device.VirtualCdrom, vim.vm.device.VirtualFloppy)):
            _detach_media(out, dev)
        spec.deviceChange = list(spec.deviceChange or []) + [change]
    _boot_order(out, config.bootOptions, keys)
    return out


def _copy(out: RestoreSpec, value, dst: str) -> None:
    if value is None:
        return
    try:
        setattr(out.spec, dst, value)
    except (TypeError, AttributeError):
        out.notes.append(f"the saved '{dst}' setting could not be carried over to the new VM")


def _new_disk(out: RestoreSpec, disk, saved_key: int, datastore: str, datastore_ref) -> None:
    from pyVmomi import vim

    capacity = disk_capacity(disk)
    old = disk.backing
    flat = vim.vm.device.VirtualDisk.FlatVer2BackingInfo
    backing = flat(fileName=f"[{datastore}]", datastore=datastore_ref, diskMode="persistent", thinProvisioned=True)
    if isinstance(old, flat):
        backing.diskMode = old.diskMode or "persistent"
        backing.thinProvisioned = bool(old.thinProvisioned)
        backing.eagerlyScrub = old.eagerlyScrub
        backing.writeThrough = old.writeThrough
    else:
        out.notes.append(f"disk {saved_key} had a {type(old).__name__} backing; it is recreated as a thin flat disk")
    disk.backing = backing
    disk.capacityInKB = -(-capacity // 1024)
    disk.capacityInBytes = capacity
    disk.diskObjectId = disk.vDiskId = disk.nativeUnmanagedLinkedClone = None
    label = disk.deviceInfo.label if disk.deviceInfo and disk.deviceInfo.label else f"disk {saved_key}"
    out.disks.append(RestoreDisk(saved_key=saved_key, temp_key=disk.key, capacity=capacity, label=label))


def _new_nic(nic) -> None:
    from pyVmomi import vim

    nic.macAddress = None
    nic.addressType = "generated"
    nic.externalId = None
    backing = nic.backing
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo) and backing.port:
        backing.port.portKey = None  # a port belongs to one VM; the switch assigns a new one
        backing.port.connectionCookie = None


def _detach_media(out: RestoreSpec, dev) -> None:
    """ISO and floppy images on the old datastore may not exist at the DR site."""
    from pyVmomi import vim

    if isinstance(dev.backing, vim.vm.device.VirtualDevice.FileBackingInfo):
        out.notes.append(f"{dev.deviceInfo.label if dev.deviceInfo else 'a removable device'} pointed at "
                         f"{dev.backing.fileName}; it is restored empty")
        if isinstance(dev, vim.vm.device.VirtualCdrom):
            dev.backing = vim.vm.device.VirtualCdrom.RemotePassthroughBackingInfo(deviceName="", exclusive=False)
        else:
            dev.backing = vim.vm.device.VirtualFloppy.RemoteDeviceBackingInfo(deviceName="")
        if dev.connectable:
            dev.connectable.connected = dev.connectable.startConnected = False


def _boot_order(out: RestoreSpec, boot, keys: dict[int, int]) -> None:
    if boot is None:
        return
    order = []
    for entry in boot.bootOrder or []:
        key = getattr(entry, "deviceKey", None)
        if key is None:
            order.append(entry)
        elif key in keys:
            entry.deviceKey = keys[key]
            order.append(entry)
    boot.bootOrder = order
    out.spec.bootOptions = boot
