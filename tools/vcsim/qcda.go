package main

// QueryChangedDiskAreas, answered from the fingerprints the shim recorded.
//
// Semantics (vSphere API, VirtualMachine.QueryChangedDiskAreas):
//   - snapshot: the point in time to describe; unset means the VM's current
//     state, which vSphere allows only for a powered-off VM.
//   - changeId "*": the areas of the disk in use. Here: the 64 KiB blocks that
//     hold any non-zero byte (holes and all-zero blocks are left out).
//   - any other changeId: the areas that changed between the point in time
//     that changeId names (a snapshot of the same disk, taken while CBT was
//     on, possibly since deleted) and the queried snapshot. Here: the 64 KiB
//     blocks whose content differs.
//   - the reply covers [startOffset, startOffset+length) only. Like vCenter,
//     which may answer for part of the disk, the shim bounds every reply (at
//     most -cbt-window-bytes of disk and -cbt-window-extents extents), so
//     callers must loop: startOffset += length until the capacity is reached.
//     Extents are sorted, merged (none touch or overlap) and inside the
//     window; the window ends right after the last extent when the extent
//     limit is what ended it.
//   - faults: FileFault when the changeId is unknown, belongs to another disk,
//     or was voided by a CBT reset, and when the snapshot was taken with CBT
//     off; InvalidArgument for a negative startOffset, one that is not a
//     multiple of 512, or one at or beyond the capacity, for a device key
//     that is no disk of the snapshot, and for a snapshot of another VM.

import (
	"fmt"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func (s *cbtShim) queryChangedDiskAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, types.BaseMethodFault) {
	vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine)
	if !ok {
		return nil, &types.ManagedObjectNotFound{Obj: req.This}
	}

	var point *diskPoint
	var fault types.BaseMethodFault
	if req.Snapshot != nil {
		point, fault = s.snapshotPoint(vm, *req.Snapshot, req.DeviceKey)
	} else {
		point, fault = s.currentPoint(vm, req.DeviceKey)
	}
	if fault != nil {
		return nil, fault
	}

	capacity := point.sums.capacity
	if req.StartOffset < 0 || req.StartOffset%512 != 0 || req.StartOffset >= capacity {
		return nil, &types.InvalidArgument{InvalidProperty: "startOffset"}
	}

	var changed func(block int64) bool
	if req.ChangeId == "*" {
		changed = func(i int64) bool { return !point.sums.isZero(i) }
	} else {
		s.mu.Lock()
		base := s.changeIDs[req.ChangeId]
		s.mu.Unlock()
		if base == nil || base.id != point.id {
			return nil, fileFault(point.id.file, fmt.Sprintf("changeId %q is not valid for this disk", req.ChangeId))
		}
		changed = func(i int64) bool { return string(point.sums.sum(i)) != string(base.sums.sum(i)) }
	}

	length, extents := changedWindow(req.StartOffset, capacity, s.windowBytes, s.windowExtents, changed)
	return &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length, ChangedArea: extents}, nil
}

// snapshotPoint finds the recorded state of a disk in a snapshot.
func (s *cbtShim) snapshotPoint(vm *simulator.VirtualMachine, ref types.ManagedObjectReference, key int32) (*diskPoint, types.BaseMethodFault) {
	snap, ok := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return nil, &types.ManagedObjectNotFound{Obj: ref}
	}
	if snap.Vm != vm.Self {
		return nil, &types.InvalidArgument{InvalidProperty: "snapshot"}
	}
	// The snapshot's config is the shim's private copy, never changed later.
	disk := findDisk(snap.Config.Hardware.Device, key)
	if disk == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "deviceKey"}
	}

	s.mu.Lock()
	st := s.snapshots[ref]
	var point *diskPoint
	if st != nil {
		point = st.disks[key]
	}
	s.mu.Unlock()

	if point == nil {
		return nil, fileFault(diskFileName(disk), "changed block tracking was not enabled when the snapshot was taken")
	}
	return point, nil
}

// currentPoint fingerprints a disk as it is now (no snapshot given).
func (s *cbtShim) currentPoint(vm *simulator.VirtualMachine, key int32) (*diskPoint, types.BaseMethodFault) {
	var (
		fault    types.BaseMethodFault
		id       diskID
		flat     string
		capacity int64
	)
	simulator.Map.WithLock(vm, func() {
		disk := findDisk(vm.Config.Hardware.Device, key)
		switch {
		case disk == nil:
			fault = &types.InvalidArgument{InvalidProperty: "deviceKey"}
		case vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff:
			fault = fileFault(diskFileName(disk), "the current state can only be queried on a powered-off virtual machine; pass a snapshot")
		case !isTrue(vm.Config.ChangeTrackingEnabled):
			fault = fileFault(diskFileName(disk), "changed block tracking is not enabled")
		default:
			var err error
			if flat, err = flatFile(disk); err != nil {
				fault = fileFault(diskFileName(disk), err.Error())
			}
			id = diskID{vm: vm.Self, key: key, file: diskFileName(disk)}
			capacity = diskCapacity(disk)
		}
	})
	if fault != nil {
		return nil, fault
	}
	sums, err := fingerprintFile(flat, capacity)
	if err != nil {
		return nil, fileFault(id.file, err.Error())
	}
	return &diskPoint{id: id, sums: sums}, nil
}

// changedWindow builds one reply starting at start: it ends at the capacity,
// after windowBytes, or right after the maxExtents-th extent, whichever comes
// first. Extents are clipped to the window and merged.
func changedWindow(start, capacity, windowBytes int64, maxExtents int, changed func(block int64) bool) (int64, []types.DiskChangeExtent) {
	end := start + windowBytes
	if end > capacity {
		end = capacity
	}
	var extents []types.DiskChangeExtent
	for i := start / blockSize; i*blockSize < end; i++ {
		if !changed(i) {
			continue
		}
		from, to := i*blockSize, (i+1)*blockSize
		if from < start {
			from = start
		}
		if to > end {
			to = end
		}
		if n := len(extents); n > 0 && extents[n-1].Start+extents[n-1].Length == from {
			extents[n-1].Length += to - from
			continue
		}
		if len(extents) == maxExtents {
			last := extents[len(extents)-1]
			end = last.Start + last.Length
			break
		}
		extents = append(extents, types.DiskChangeExtent{Start: from, Length: to - from})
	}
	return end - start, extents
}

func findDisk(devices []types.BaseVirtualDevice, key int32) *types.VirtualDisk {
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == key {
			return disk
		}
	}
	return nil
}

func diskFileName(disk *types.VirtualDisk) string {
	if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
		return b.GetVirtualDeviceFileBackingInfo().FileName
	}
	return ""
}

func fileFault(file, msg string) *types.FileFault {
	return &types.FileFault{
		VimFault: types.VimFault{MethodFault: types.MethodFault{
			FaultMessage: []types.LocalizableMessage{{Key: "com.blockvault.vcsim.cbt", Message: msg}},
		}},
		File: file,
	}
}
