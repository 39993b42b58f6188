package main

// The CBT shim: Changed Block Tracking emulation for govmomi 0.24.2's
// simulator, which has neither disk changeIds nor QueryChangedDiskAreas.
//
// How it works. The simulator calls registered handlers (Registry.AddHandler)
// whenever an object is put into, updated in or removed from its registry.
// The shim is such a handler:
//
//   - A new VirtualMachineSnapshot: its config is a shallow copy of the VM's
//     config, so the shim gives it its own deep copy (a snapshot's config must
//     describe the disks as they were). If the VM has changeTrackingEnabled,
//     each file-backed disk's -flat.vmdk is read and a fingerprint per 64 KiB
//     block is recorded, a new changeId is made for the disk and written into
//     backing.changeId of the snapshot's disk and of the VM's live disk.
//     QueryChangedDiskAreas later compares fingerprints, so its answer is
//     point-in-time correct even though the simulator never freezes disk data
//     (it has no delta disks: the flat file keeps changing after a snapshot).
//   - A new Task whose entity is a snapshot (RemoveSnapshot_Task, ...):
//     bug workaround, the entity becomes the snapshot's VM (see fixTask).
//   - A new VirtualMachine: bug workaround, capability.changeTrackingSupported.
//   - A task that finished on a VM: the shim looks at the VM again (observeVM):
//     CBT switched off forgets the VM's changeIds (a CBT reset, as on ESXi);
//     disk sizes are filled in and flat files grown to the disk capacity.
//   - A removed snapshot forgets its fingerprints, but not its changeIds: the
//     next incremental backup asks for changes since the changeId of a
//     snapshot that was deleted right after the previous backup.
//
// Locking: registry handlers run in the goroutine of the SOAP call that made
// the change, which holds the simulator's lock on that call's object (for a
// snapshot or a reconfigure, the VM). The shim therefore never takes a VM's
// lock from a handler when the call's object is that VM, and its own mutex is
// always taken after any simulator lock, never before one.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"log"
	"os"
	"path"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

const (
	defaultWindowBytes   = 4 << 20 // 4 MiB of disk per QueryChangedDiskAreas reply
	defaultWindowExtents = 32      // and at most 32 extents per reply
)

// diskID identifies a tracked disk: the same device key backed by another
// file (a disk removed and re-added) is another disk with its own changeIds.
type diskID struct {
	vm   types.ManagedObjectReference
	key  int32
	file string // datastore path of the descriptor, "[ds] dir/name.vmdk"
}

// tracking is the live CBT state of a disk: the UUID part of its changeIds
// (new after a CBT reset) and the sequence number of the last one.
type tracking struct {
	uuid string
	seq  int
}

// diskPoint is a disk as it was when one snapshot was taken.
type diskPoint struct {
	id       diskID
	changeID string
	sums     *blockSums
}

// snapshotState is what the shim knows about one snapshot.
type snapshotState struct {
	vm    types.ManagedObjectReference
	cbt   bool                 // was CBT on when it was taken?
	disks map[int32]*diskPoint // by device key, CBT-tracked disks only
}

type cbtShim struct {
	windowBytes   int64
	windowExtents int

	mu        sync.Mutex
	tracked   map[diskID]*tracking
	changeIDs map[string]*diskPoint
	snapshots map[types.ManagedObjectReference]*snapshotState
}

func newCBTShim(windowBytes int64, windowExtents int) *cbtShim {
	return &cbtShim{
		windowBytes:   windowBytes,
		windowExtents: windowExtents,
		tracked:       make(map[diskID]*tracking),
		changeIDs:     make(map[string]*diskPoint),
		snapshots:     make(map[types.ManagedObjectReference]*snapshotState),
	}
}

// install registers the shim with the simulator's registry and fixes up the
// VMs that already exist (the default inventory is built before the shim can
// be registered, because building it replaces the registry).
func (s *cbtShim) install() {
	simulator.Map.AddHandler(s)
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok {
			s.vmCreated(vm)
			s.observeVM(vm)
		}
	}
}

// Reference makes the shim a registry handler (a mo.Reference). The type is
// not a vSphere type, so no SOAP call can ever address it.
func (s *cbtShim) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "BlockvaultCBTShim", Value: "cbt-shim"}
}

// PutObject is called for every new object in the registry.
func (s *cbtShim) PutObject(obj mo.Reference) {
	switch o := obj.(type) {
	case *simulator.VirtualMachineSnapshot:
		s.snapshotTaken(o)
	case *simulator.Task:
		fixTask(o)
	case *simulator.VirtualMachine:
		s.vmCreated(o)
	}
}

// UpdateObject is called for every property change; only finished tasks
// interest the shim.
func (s *cbtShim) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	t, ok := obj.(*mo.Task)
	if !ok || !taskFinished(changes) {
		return
	}
	if t.Info.Entity != nil && t.Info.Entity.Type == "VirtualMachine" {
		if vm, ok := simulator.Map.Get(*t.Info.Entity).(*simulator.VirtualMachine); ok {
			if strings.HasPrefix(t.Info.DescriptionId, "VirtualMachine.") {
				// A VM method's task (ReconfigVM_Task...) runs inside that
				// VM's SOAP call, which holds the VM's lock already.
				s.observeVM(vm)
			} else {
				// A snapshot's task (entity rewritten by fixTask): the call
				// holds the snapshot's lock, and has released the VM's.
				simulator.Map.WithLock(vm, func() { s.observeVM(vm) })
			}
		}
	}
	if ref, ok := t.Info.Result.(types.ManagedObjectReference); ok && ref.Type == "VirtualMachine" {
		// CreateVM_Task, CloneVM_Task...: the new VM is not the call's object,
		// so its lock is free to take.
		if t.Info.Entity == nil || *t.Info.Entity != ref {
			if vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine); ok {
				simulator.Map.WithLock(vm, func() { s.observeVM(vm) })
			}
		}
	}
}

// RemoveObject is called when an object leaves the registry.
func (s *cbtShim) RemoveObject(ref types.ManagedObjectReference) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch ref.Type {
	case "VirtualMachineSnapshot":
		delete(s.snapshots, ref) // its changeIds stay valid
	case "VirtualMachine":
		s.forgetVM(ref)
		for snap, st := range s.snapshots {
			if st.vm == ref {
				delete(s.snapshots, snap)
			}
		}
	}
}

func taskFinished(changes []types.PropertyChange) bool {
	for _, c := range changes {
		if c.Name == "info.state" {
			state, _ := c.Val.(types.TaskInfoState)
			return state == types.TaskInfoStateSuccess || state == types.TaskInfoStateError
		}
	}
	return false
}

// fixTask works around a 0.24.2 bug: tasks created by a snapshot's methods
// (RemoveSnapshot_Task, RevertToSnapshot_Task) name the snapshot as their
// entity, but TaskInfo.entity is a ManagedEntity and a snapshot is not one;
// pyvmomi's WaitForTask then fails with "For "entity" expected type
// vim.ManagedEntity, but got vim.vm.Snapshot". vCenter names the VM there.
// Other entities that are not ManagedEntities are dropped (the property is
// optional), and entityName becomes the entity's name as on vCenter.
func fixTask(t *simulator.Task) {
	if t.Info.Entity == nil {
		return
	}
	obj := simulator.Map.Get(*t.Info.Entity)
	if snap, ok := obj.(*simulator.VirtualMachineSnapshot); ok {
		vm := snap.Vm
		t.Info.Entity = &vm
		obj = simulator.Map.Get(vm)
	}
	if e, ok := obj.(mo.Entity); ok {
		t.Info.EntityName = e.Entity().Name
	} else if obj != nil {
		t.Info.Entity = nil
		t.Info.EntityName = ""
	}
}

// vmCreated works around a 0.24.2 gap: VMs never set
// capability.changeTrackingSupported, so pyvmomi reads False and a backup
// tool that checks it (as it should, vSphere needs hardware version 7+)
// refuses to enable CBT. vcsim's VMs are vmx-13.
func (s *cbtShim) vmCreated(vm *simulator.VirtualMachine) {
	vm.Capability.ChangeTrackingSupported = types.NewBool(true)
}

// observeVM brings the shim's view of a VM up to date after a task on it.
// The caller holds the VM's lock.
func (s *cbtShim) observeVM(vm *simulator.VirtualMachine) {
	if vm.Config == nil {
		return
	}
	if !isTrue(vm.Config.ChangeTrackingEnabled) {
		// CBT off: every changeId of this VM is void, and a later enable
		// starts new tracking UUIDs (what a CBT reset does on ESXi).
		s.mu.Lock()
		s.forgetVM(vm.Self)
		s.mu.Unlock()
	}
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		fillCapacity(disk)
		if flat, err := flatFile(disk); err == nil {
			growToCapacity(flat, diskCapacity(disk))
		}
		// A disk shows only a changeId the shim issued for it: none after a
		// CBT reset, and none copied in from elsewhere (a CreateVM_Task spec
		// rebuilt from a saved config may still carry the old one).
		if id := changeIDOf(disk.Backing); id != "" && !s.issuedFor(vm.Self, disk, id) {
			setChangeID(disk.Backing, "")
		}
	}
}

// issuedFor tells whether changeId id was made by the shim for this disk.
func (s *cbtShim) issuedFor(vm types.ManagedObjectReference, disk *types.VirtualDisk, id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.changeIDs[id]
	return p != nil && p.id == diskID{vm: vm, key: disk.Key, file: diskFileName(disk)}
}

// forgetVM drops the tracking state and changeIds of a VM; s.mu is held.
func (s *cbtShim) forgetVM(vm types.ManagedObjectReference) {
	for id := range s.tracked {
		if id.vm == vm {
			delete(s.tracked, id)
		}
	}
	for cid, p := range s.changeIDs {
		if p.id.vm == vm {
			delete(s.changeIDs, cid)
		}
	}
}

// snapshotTaken runs inside CreateSnapshot_Task, with the VM locked, right
// after the simulator registered the new snapshot and before it is returned.
func (s *cbtShim) snapshotTaken(snap *simulator.VirtualMachineSnapshot) {
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	cfg, err := copyConfig(&snap.Config)
	if err != nil {
		log.Printf("cbt-shim: copying the config of %s: %v (left shared with the VM)", snap.Self, err)
		cfg = &snap.Config
	}
	state := &snapshotState{vm: vm.Self, cbt: isTrue(vm.Config.ChangeTrackingEnabled), disks: map[int32]*diskPoint{}}

	for _, dev := range cfg.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		fillCapacity(disk)
		setChangeID(disk.Backing, "") // only the shim's own, just below
		if !state.cbt {
			continue
		}
		point, err := s.trackDisk(vm.Self, disk)
		if err != nil {
			log.Printf("cbt-shim: snapshot %s, disk %d: %v (no changeId)", snap.Self, disk.Key, err)
			continue
		}
		setChangeID(disk.Backing, point.changeID)
		// vCenter shows the latest changeId on the VM's disk too.
		for _, live := range vm.Config.Hardware.Device {
			if d, ok := live.(*types.VirtualDisk); ok && d.Key == disk.Key {
				setChangeID(d.Backing, point.changeID)
			}
		}
		state.disks[disk.Key] = point
	}
	snap.Config = *cfg

	s.mu.Lock()
	s.snapshots[snap.Self] = state
	s.mu.Unlock()
}

// trackDisk fingerprints a disk's flat file now and gives it a new changeId.
func (s *cbtShim) trackDisk(vm types.ManagedObjectReference, disk *types.VirtualDisk) (*diskPoint, error) {
	info, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
	if !ok || !supportsChangeID(disk.Backing) {
		return nil, fmt.Errorf("backing %T has no changeId", disk.Backing)
	}
	flat, err := flatFile(disk)
	if err != nil {
		return nil, err
	}
	capacity := diskCapacity(disk)
	growToCapacity(flat, capacity)
	sums, err := fingerprintFile(flat, capacity) // outside s.mu: reads the whole disk
	if err != nil {
		return nil, err
	}
	id := diskID{vm: vm, key: disk.Key, file: info.GetVirtualDeviceFileBackingInfo().FileName}

	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tracked[id]
	if t == nil {
		t = &tracking{uuid: newTrackingUUID()}
		s.tracked[id] = t
	}
	t.seq++
	point := &diskPoint{id: id, changeID: fmt.Sprintf("%s/%d", t.uuid, t.seq), sums: sums}
	s.changeIDs[point.changeID] = point
	return point, nil
}

// newTrackingUUID renders 16 random bytes the way vSphere renders the UUID
// part of a changeId: hex byte pairs separated by spaces, with a dash after
// the eighth byte, e.g. "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b".
// VMware's UUIDs start with 0x52, so these do too.
func newTrackingUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[0] = 0x52
	var sb strings.Builder
	for i, c := range b {
		switch {
		case i == 8:
			sb.WriteByte('-')
		case i > 0:
			sb.WriteByte(' ')
		}
		fmt.Fprintf(&sb, "%02x", c)
	}
	return sb.String()
}

func supportsChangeID(b types.BaseVirtualDeviceBackingInfo) bool {
	switch b.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo, *types.VirtualDiskSparseVer2BackingInfo,
		*types.VirtualDiskSeSparseBackingInfo, *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		return true
	}
	return false
}

func changeIDOf(b types.BaseVirtualDeviceBackingInfo) string {
	switch x := b.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		return x.ChangeId
	case *types.VirtualDiskSparseVer2BackingInfo:
		return x.ChangeId
	case *types.VirtualDiskSeSparseBackingInfo:
		return x.ChangeId
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		return x.ChangeId
	}
	return ""
}

func setChangeID(b types.BaseVirtualDeviceBackingInfo, id string) {
	switch x := b.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		x.ChangeId = id
	case *types.VirtualDiskSparseVer2BackingInfo:
		x.ChangeId = id
	case *types.VirtualDiskSeSparseBackingInfo:
		x.ChangeId = id
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		x.ChangeId = id
	}
}

// diskCapacity is the disk size in bytes. vcsim's own disks only have
// capacityInKB; vSphere has had capacityInBytes since 5.5.
func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// fillCapacity sets whichever of capacityInBytes / capacityInKB is missing,
// as vCenter always reports both and backup code records capacityInBytes.
func fillCapacity(d *types.VirtualDisk) {
	if d.CapacityInBytes == 0 && d.CapacityInKB > 0 {
		d.CapacityInBytes = d.CapacityInKB * 1024
	}
	if d.CapacityInKB == 0 && d.CapacityInBytes > 0 {
		d.CapacityInKB = (d.CapacityInBytes + 1023) / 1024
	}
}

// flatFile is where the simulator keeps a disk's data on the local
// filesystem: the datastore's URL (a local directory) joined with the path
// after "[datastore] ", with ".vmdk" replaced by "-flat.vmdk". vcsim creates
// the descriptor and the flat file empty; the flat file is a raw image.
func flatFile(disk *types.VirtualDisk) (string, error) {
	b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
	if !ok {
		return "", fmt.Errorf("disk %d has no file backing", disk.Key)
	}
	info := b.GetVirtualDeviceFileBackingInfo()
	var p object.DatastorePath
	if !p.FromString(info.FileName) || !strings.HasSuffix(p.Path, ".vmdk") {
		return "", fmt.Errorf("disk %d: unexpected file name %q", disk.Key, info.FileName)
	}
	var ds *simulator.Datastore
	if info.Datastore != nil {
		ds, _ = simulator.Map.Get(*info.Datastore).(*simulator.Datastore)
	}
	if ds == nil {
		for _, e := range simulator.Map.All("Datastore") {
			if d, ok := e.(*simulator.Datastore); ok && d.Name == p.Datastore {
				ds = d
			}
		}
	}
	if ds == nil {
		return "", fmt.Errorf("disk %d: datastore %q not found", disk.Key, p.Datastore)
	}
	dir := ds.Info.GetDatastoreInfo().Url
	return path.Join(dir, strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk"), nil
}

// growFlatFiles is the -grow-flat-files flag.
var growFlatFiles = true

// growToCapacity makes the flat file as long as the disk (sparse, so it costs
// no space), as on a real datastore: vcsim creates it empty, and an HTTP
// range read of a never-written area would otherwise get 416 instead of
// zeros. The file is never shrunk. With -grow-flat-files=false it is left as
// short as the guest wrote it (clients must read past its end as zeros).
func growToCapacity(flat string, capacity int64) {
	if !growFlatFiles {
		return
	}
	st, err := os.Stat(flat)
	if err != nil || !st.Mode().IsRegular() || st.Size() >= capacity {
		return
	}
	if err := os.Truncate(flat, capacity); err != nil {
		log.Printf("cbt-shim: growing %s to %d bytes: %v", flat, capacity, err)
	}
}

// copyConfig deep-copies a VirtualMachineConfigInfo by a round trip through
// the vim25 XML encoding (the types carry xsi:type information for their
// interface-typed fields, so devices and backings come back as themselves).
func copyConfig(src *types.VirtualMachineConfigInfo) (*types.VirtualMachineConfigInfo, error) {
	type wrapper struct {
		Config types.VirtualMachineConfigInfo `xml:"config"`
	}
	data, err := xml.Marshal(wrapper{Config: *src})
	if err != nil {
		return nil, err
	}
	dec := xml.NewDecoder(bytes.NewReader(data))
	dec.TypeFunc = types.TypeFunc()
	var out wrapper
	if err := dec.Decode(&out); err != nil {
		return nil, err
	}
	return &out.Config, nil
}

func isTrue(b *bool) bool { return b != nil && *b }
