/*
 * vmdk: hosted VMware virtual disks (.vmdk) read and written in pure C.
 *
 * Why it exists: a backup source is often not a vSphere datastore reached
 * through VDDK but a VMDK file on local disk (a Workstation/Fusion VM, an
 * OVA export, a copy of a datastore).  The engine wants the same three
 * things from such a file that it gets from VDDK: the capacity, the
 * allocated areas (the local equivalent of queryChangedDiskAreas("*"), so
 * a full backup reads only what was ever written), and positional reads
 * into caller buffers from several threads at once.  Restores to a hosted
 * VM need the reverse: a monolithicSparse file that VMware products and
 * qemu-img accept.  This file has no Python.h; module.c binds it to the
 * engine's Disk type (disk.h) like every other reader in native/.
 *
 * What it reads:
 *   - text descriptors (createType monolithicFlat, vmfs, twoGbMaxExtentFlat,
 *     twoGbMaxExtentSparse, ...) whose extents are FLAT, VMFS, SPARSE or
 *     ZERO, RW or RDONLY, with sector offsets; extent files are relative to
 *     the descriptor's directory;
 *   - monolithicSparse files (KDMV header, embedded descriptor, grain
 *     directory and grain tables; unallocated grains and zeroed-grain
 *     entries read as zeros);
 *   - streamOptimized files (deflate-compressed grains behind grain
 *     markers, grain directory either in the header or in the footer at
 *     the end of the file).
 * Not supported, refused with a clear message: snapshot chains (a parent
 * CID), COWD/vmfsSparse and seSparse extents, raw device mappings.
 *
 * Reads never cache anything mutable: the grain directory is loaded once
 * at open and is read-only afterwards, grain tables are read with pread
 * for each request.  So vmdk_read and vmdk_extents may run concurrently on
 * one handle from any number of threads (the binding releases the GIL).
 *
 * Every file is hostile until checked: header fields, grain directory and
 * grain table entries, markers and descriptor lines are bounds-checked
 * (sizes, overflows, capacity, extent counts, line lengths, grain and
 * compressed sizes), and memory stays proportional to the size of the
 * files on disk.  A bad file gives -1, errno (EINVAL for a malformed
 * file, ENOMEM, or the failing system call's errno) and a message in err
 * that names the file, the offset and what is wrong, e.g.
 *   "disk.vmdk: grain table entry 17 of table 3 points at sector 123456789
 *    beyond the end of the file (4096 sectors)".
 *
 * Conventions: offsets and lengths are bytes; err is a caller buffer of
 * errlen bytes (VMDK_ERRLEN is enough); returned arrays are malloc'ed and
 * freed by the caller with free().
 *
 * Build: compile vmdk.c vmdk_descriptor.c vmdk_sparse.c vmdk_writer.c with
 * -std=gnu11 -pthread and link -lz (Debian zlib1g-dev).
 */
#ifndef BLOCKVAULT_VMDK_H
#define BLOCKVAULT_VMDK_H

#include <stddef.h>
#include <stdint.h>

#define VMDK_ERRLEN 512

/* Largest virtual capacity accepted, 1 PiB (VMware's own limit is 62 TB). */
#define VMDK_MAX_CAPACITY (UINT64_C(1) << 50)
/* Most extents one descriptor may list (each extent keeps a file open). */
#define VMDK_MAX_EXTENTS 4096
/* Largest text descriptor, standalone or embedded, and longest line in it. */
#define VMDK_MAX_DESCRIPTOR (1024 * 1024)
#define VMDK_MAX_LINE 8192

/* One allocated byte range of the virtual disk.  Same layout as rd_extent
 * (rawdisk.h), so the binding can hand either to the same code. */
typedef struct {
    uint64_t start;
    uint64_t length;
} vmdk_range;

/* ---- reader ---------------------------------------------------------- */

typedef struct vmdk_disk vmdk_disk;

/* Opens a .vmdk: a text descriptor, a monolithicSparse file or a
 * streamOptimized file (recognised by content, not by name).  Every
 * extent file is opened, checked against its declared size and kept open
 * until vmdk_close.  Returns NULL with errno and err set on failure.
 *
 * A descriptor is data, often from someone else (an OVA, a copied VM
 * folder): an extent named "/etc/shadow" or "../../x" would make a backup
 * run as root read and keep that file.  So every extent file must resolve
 * (symbolic links followed) inside the descriptor's directory or below it;
 * one outside is refused before it is opened (errno EPERM), unless flags
 * has VMDK_OPEN_EXTERNAL_EXTENTS.  A disk of capacity 0, and a sparse
 * extent whose header capacity is not the size its descriptor line gives
 * it, are refused (EINVAL): the file is damaged or not what it claims. */
#define VMDK_OPEN_EXTERNAL_EXTENTS 0x1u
vmdk_disk *vmdk_open_flags(const char *path, unsigned flags, char *err, size_t errlen);

/* vmdk_open_flags(path, 0, ...): extents outside the descriptor's
 * directory refused. */
vmdk_disk *vmdk_open(const char *path, char *err, size_t errlen);

/* Virtual size in bytes (sum of the extents, a multiple of 512). */
uint64_t vmdk_capacity(const vmdk_disk *d);

/* The descriptor's createType ("monolithicSparse", "streamOptimized",
 * "twoGbMaxExtentFlat", ...), or "" when a sparse file has none. */
const char *vmdk_create_type(const vmdk_disk *d);

/* Allocated areas as sorted, merged, non-overlapping byte ranges within
 * [0, capacity): allocated grains of sparse and stream extents, and for
 * flat extents the data regions SEEK_DATA/SEEK_HOLE find in the extent
 * file (the whole extent where the filesystem cannot tell).  ZERO extents
 * and zeroed grains are not allocated.  *out is malloc'ed (NULL when
 * *count is 0); free() it.  Validates every grain table entry it visits.
 * Returns 0, or -1 with errno and err set. */
int vmdk_extents(vmdk_disk *d, vmdk_range **out, size_t *count, char *err, size_t errlen);

/* Fills buf with len bytes of the virtual disk at off.  Bytes past the
 * capacity, unallocated or zeroed grains and ZERO extents read as zeros.
 * Thread-safe on one handle.  Returns 0, or -1 with errno and err set. */
int vmdk_read(vmdk_disk *d, void *buf, size_t len, uint64_t off, char *err, size_t errlen);

/* Closes every extent file and frees the handle.  NULL is fine. */
void vmdk_close(vmdk_disk *d);

/* ---- monolithicSparse writer ------------------------------------------ */

typedef struct vmdk_writer vmdk_writer;

#define VMDK_DEFAULT_GRAIN (64 * 1024)

/* Creates path, which must not exist (O_EXCL, and O_NOFOLLOW: a link there is
 * refused, never followed), with permissions mode (exactly, whatever the umask),
 * as a hosted monolithicSparse VMDK, version 1,
 * with an embedded descriptor and a redundant grain directory, laid out
 * as VMware does: header, descriptor, redundant GD and its grain tables,
 * GD and its grain tables, then grains in the order they are written.
 * capacity is in bytes and rounded up to a 512-byte sector; grain_size is
 * in bytes, a power of two from 4 KiB to 1 MiB, 0 for the default 64 KiB.
 * The capacity is limited by the format's 32-bit sector offsets (about
 * 2 TiB including metadata).  Returns NULL with errno and err set. */
vmdk_writer *vmdk_writer_create(const char *path, uint64_t capacity, uint32_t grain_size,
                                unsigned mode, char *err, size_t errlen);

/* Capacity in bytes (after rounding up to a sector). */
uint64_t vmdk_writer_capacity(const vmdk_writer *w);

/* Writes len bytes at off (within the capacity).  Whole grains at
 * grain-aligned offsets are the fast path; a partial grain is merged with
 * what is already there.  All-zero grains that were never written stay
 * unallocated.  Thread-safe on one handle as long as concurrent calls do
 * not write the same grain.  Returns 0, or -1 with errno and err set. */
int vmdk_writer_write(vmdk_writer *w, const void *buf, size_t len, uint64_t off,
                      char *err, size_t errlen);

/* Writes the grain tables (both copies) and fsyncs: the file is complete
 * only after this returns 0.  Further writes are refused. */
int vmdk_writer_finish(vmdk_writer *w, char *err, size_t errlen);

/* Frees the handle and closes the file; without vmdk_writer_finish the
 * file is left incomplete (its grain tables are empty).  NULL is fine. */
void vmdk_writer_close(vmdk_writer *w);

#endif
