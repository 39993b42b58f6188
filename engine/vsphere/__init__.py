"""vSphere: nightly VM backups through pyvmomi and Changed Block Tracking, and disaster recovery.

One noun per module (docs/DESIGN.md has the tour):

* ``errors``       — VsphereError and kin; faults and socket errors as one readable line
* ``connection``   — the certificate-checked, self-renewing pyvmomi session
* ``inventory``    — finding VMs and restore targets; disks, CBT on/off, datastore paths
* ``snapshot``     — the run's snapshot: taken, always removed, recognised when left over
* ``changed_areas``— QueryChangedDiskAreas looped over the disk, every reply checked
* ``cbt_sample``   — re-reading a sample of "unchanged" chunks to catch a lying CBT
* ``http_disk``    — a disk over datastore HTTP access (vcsim, or vSphere without VDDK)
* ``vddk_disk``    — a disk through VDDK (native.open_vddk), for real vSphere
* ``vmconfig``     — VirtualMachineConfigInfo <-> JSON
* ``configspec``   — saved config -> ConfigSpec for CreateVM_Task (new identities)
* ``vmcatalog``    — VM backup records ``VM@N`` (LMDB ``vm_backups``)
* ``disk_job``     — one disk of a run: CBT or a full read, and why
* ``backup``       — the run: snapshot, config, disks in parallel, one commit
* ``restore``      — disaster recovery into a new VM
* ``cli``          — ``blockvault vsphere backup|restore|vms|list``

Nothing here is imported by the rest of the engine except ``cli.register``;
pyvmomi is imported lazily, so blockvault works without the vsphere extra.
"""
