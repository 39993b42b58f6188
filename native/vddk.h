/*
 * vddk.h -- read and write vSphere virtual disks through VMware's VDDK (libvixDiskLib).
 *
 * What it does.  This is the VDDK transport of blockvault's disk readers, in plain C with no
 * Python.h so that it can be built and tested on its own (tests/native/vddk_tool.c) and bound
 * to Python by a thin wrapper.  It loads libvixDiskLib at run time with dlopen() -- VMware's
 * library is proprietary, ships its own copies of libcrypto/libstdc++ and is absent on most
 * machines, so blockvault must never link against it -- resolves the entry points with
 * dlsym(), and drives the C ABI the way VMware's programming guide asks:
 *
 *   vddk_init            InitEx, once per process (further calls are no-ops)
 *   vddk_prepare_access  PrepareForAccess, before the backup snapshot is taken (vCenter only)
 *   vddk_open            ConnectEx + Open (+ GetInfo, GetTransportMode), one or more handles
 *   vddk_extents         QueryAllocatedBlocks in windows, as sorted merged byte ranges
 *   vddk_read/_write     Read/Write in requests of up to 8 MiB, whole sectors
 *   vddk_close           Flush (read-write only), Close, Disconnect
 *   vddk_cleanup         Cleanup, after the job's disks are disconnected
 *   vddk_end_access      EndAccess, after the snapshot is deleted
 *   vddk_exit            Exit, once, when the process is done with VDDK
 *
 * The disk-reader shape.  Like every reader in native/, a disk is opened into an opaque handle,
 * reports its capacity in bytes and its allocated extents as sorted, merged byte ranges, reads
 * any byte range into a caller's buffer and is closed.  Every function that can fail takes a
 * `char err[VDDK_ERRLEN]`, returns -1 (or NULL) and writes one line into it that names the
 * operation; for a failure inside VDDK it also carries the VixError code, its symbolic name
 * and VixDiskLib_GetErrorText's text, e.g.
 *     VixDiskLib_Open("[ds1] vm/vm.vmdk", handle 1 of 1) failed: VDDK error 4
 *     (VIX_E_FILE_NOT_FOUND): A file was not found
 * errno is set on every failure, as disk.h asks of all readers: mapped from the VixError
 * (VIX_E_FILE_NOT_FOUND -> ENOENT, VIX_E_AUTHENTICATION_FAIL -> EACCES, connection losses ->
 * ECONNRESET, ..., EIO otherwise), or EINVAL/ENOMEM/ELIBACC/ELIBBAD for failures outside VDDK.
 * vddk_errcode() returns the VixError itself on the failing thread (0 for failures outside
 * VDDK), for callers that want the exact code.
 *
 * Threads.  VDDK handles are not thread-safe: concurrent calls on one handle are forbidden.
 * vddk_read() may nevertheless be called from many threads at once on one vddk_disk (the
 * binding releases the GIL and reads from a thread pool): a vddk_disk owns a pool of
 * `handles` VDDK connections+handles, and each request borrows one of them exclusively.  With
 * handles == 1 requests are serialised; with N they run N at a time (NBD transports move one
 * stream per handle, so this is how parallel reads get faster).  ConnectEx/Open/Close/Disconnect
 * of all disks are serialised by one process-wide lock, as VMware advises.  vddk_close() must
 * not race with I/O on the same disk.  InitEx starts threads inside VDDK: never fork() after
 * vddk_init() (in Python: no multiprocessing "fork" start method once VDDK is loaded).
 *
 * Credentials.  The user name, password and session cookie are never written into error
 * messages or log lines by this code.  Each call that needs them (prepare/open/cleanup/
 * end_access) copies them into private buffers for VDDK and wipes those copies with
 * explicit_bzero() as soon as VDDK returns -- for vddk_open right after ConnectEx -- so no copy
 * lives as long as the handle.  The caller's own strings are const and left to the caller.
 * One exception: a private list of the passwords, cookies and domain-style user names used,
 * kept to strike them ("***") from every text that comes from VDDK -- error texts and log
 * lines -- since a library may repeat what it was given.
 *
 * Library environment.  VDDK dlopen()s its bundled libraries from its own directory, so the
 * process should be started with LD_LIBRARY_PATH including <vddk>/lib64 (nbdkit re-execs
 * itself for this); this file cannot fix that after the process started.
 *
 * Build: cc -c vddk_library.c vddk_access.c vddk_disk.c vddk_extents.c (C11, POSIX; they share
 * vddk_internal.h), link with -ldl -lpthread.
 */
#ifndef BLOCKVAULT_VDDK_H
#define BLOCKVAULT_VDDK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VDDK_ERRLEN 512            /* size of every err buffer */
#define VDDK_SECTOR 512u           /* VDDK's unit of Read/Write/QueryAllocatedBlocks */
#define VDDK_MIN_CHUNK_SECTORS 128u /* VIXDISKLIB_MIN_CHUNK_SIZE: 64 KiB */
#define VDDK_DEFAULT_IO_SECTORS 16384u /* 8 MiB per Read/Write call */
#define VDDK_MAX_HANDLES 32u

/* Where and as whom to connect.  All strings are borrowed for the duration of the call only. */
typedef struct vddk_conn {
    const char *libpath;        /* libvixDiskLib file, or a VDDK directory (tries lib64/ and
                                   ./ for .so.8/.7/.6); NULL: /usr/lib/vmware-vix-disklib,
                                   /usr/local/lib/vmware-vix-disklib,
                                   /opt/vmware-vix-disklib-distrib */
    const char *config_file;    /* InitEx configFile ("name = value" lines); NULL: none */
    const char *server;         /* vCenter or ESXi host; NULL: local files, no network */
    uint32_t port;              /* HTTPS port; 0: VDDK's default (443) */
    uint32_t nfc_port;          /* ESXi NFC port; 0: VDDK's default (902) */
    const char *thumbprint;     /* server certificate SHA-1, "xx:xx:...:xx" */
    const char *user;           /* credType UID: user + password ... */
    const char *password;
    const char *cookie;         /* ... or credType SESSIONID: vmware_soap_session cookie,
                                   with user and password (as key) */
    const char *vm_moref;       /* "vm-16" (sent as vmxSpec "moref=vm-16"); a value that
                                   already starts with "moref=" or holds '?' is sent as is */
    const char *snapshot_moref; /* "snapshot-47"; NULL: the VM's current disks (restore) */
    const char *transport_modes;/* "nbdssl:nbd", "hotadd:nbdssl"...; NULL: VDDK's default */
} vddk_conn;

/* What to open and how to do I/O on it; a zeroed struct (plus path) gives the defaults. */
typedef struct vddk_disk_opts {
    const char *path;           /* "[datastore] vm/vm.vmdk" (remote) or an absolute local path */
    int writable;               /* 0: ConnectEx readOnly + OPEN_READ_ONLY (backup);
                                   1: read-write (restore) */
    int single_link;            /* VIXDISKLIB_FLAG_OPEN_SINGLE_LINK: only this link of a chain
                                   (holes then need not read as zeros) */
    int unbuffered;             /* VIXDISKLIB_FLAG_OPEN_UNBUFFERED */
    unsigned handles;           /* VDDK connections+handles for parallel reads; 0: 1; must be
                                   1 when writable (VDDK locks a disk open for writing) */
    uint32_t io_sectors;        /* largest Read/Write call; 0: VDDK_DEFAULT_IO_SECTORS */
    uint32_t chunk_sectors;     /* QueryAllocatedBlocks chunk size; 0: 128; at least 128 */
} vddk_disk_opts;

/* What vddk_open learned about the disk and the library. */
typedef struct vddk_info {
    uint64_t capacity;          /* bytes (= capacity_sectors * 512) */
    uint64_t capacity_sectors;
    uint32_t logical_sector_size;  /* 0 unless the library is VDDK 7 or newer */
    uint32_t physical_sector_size; /* 0 unless the library is VDDK 7 or newer */
    int adapter_type;           /* VixDiskLibAdapterType: 1 IDE, 2 BusLogic, 3 LsiLogic */
    int num_links;              /* 1 + redo logs in the chain */
    int lib_major;              /* VDDK major version, from the soname (6 when unknown) */
    int has_allocated_blocks;   /* QueryAllocatedBlocks present (VDDK >= 6.7); without it
                                   vddk_extents reports the whole range as allocated */
    unsigned handles;           /* VDDK handles actually open */
    uint32_t io_sectors;
    uint32_t chunk_sectors;
    char transport[32];         /* GetTransportMode of the first handle: "nbdssl", "hotadd"... */
    char uuid[128];             /* VixDiskLibInfo.uuid, "" if none */
    char parent_hint[512];      /* VixDiskLibInfo.parentFileNameHint, "" if none */
    char libfile[512];          /* the libvixDiskLib file that was loaded */
} vddk_info;

/* One allocated byte range [start, start + length); the layout of rawdisk's rd_extent. */
typedef struct vddk_extent {
    uint64_t start;
    uint64_t length;
} vddk_extent;

typedef struct vddk_disk vddk_disk;

/* Log sink for VDDK's own log/warning/panic callbacks; called from VDDK's threads (a Python
 * binding must take the GIL itself), must not call vddk_* functions.  NULL restores the
 * default: warnings and panics on stderr, info dropped.  Known-noisy VDDK errors
 * (CEIP/PhoneHome) are demoted to info. */
enum { VDDK_LOG_INFO = 0, VDDK_LOG_WARNING = 1, VDDK_LOG_PANIC = 2 };
typedef void (*vddk_log_fn)(int level, const char *msg, void *userdata);
void vddk_set_log(vddk_log_fn fn, void *userdata);

/* Load libvixDiskLib and call InitEx, once per process; later calls only check that `libpath`
 * (if not NULL) names the library already loaded.  vddk_open and the job calls do this
 * implicitly with the vddk_conn's libpath/config_file; calling it early from the main thread,
 * before creating I/O threads, is what VMware recommends. */
int vddk_init(const char *libpath, const char *config_file, char *err);

/* Exit and dlclose.  Refused (-1) while disks are open.  Final: VDDK may be initialised only
 * once per process, so vddk_init fails afterwards. */
int vddk_exit(char *err);

/* Job bracket (vCenter only; ESXi refuses it -- callers may treat failure as a warning).
 * identity: at most 50 characters, the same string for both calls. */
int vddk_prepare_access(const vddk_conn *c, const char *identity, char *err);
int vddk_end_access(const vddk_conn *c, const char *identity, char *err);

/* VixDiskLib_Cleanup with the connection's server and credentials (vmxSpec NULL, as VDDK asks;
 * vm_moref is not needed), "for safety" after Disconnect; either out pointer may be NULL. */
int vddk_cleanup(const vddk_conn *c, unsigned *cleaned_up, unsigned *remaining, char *err);

/* ConnectEx + Open (one per handle) + GetInfo + GetTransportMode.  NULL on error. */
vddk_disk *vddk_open(const vddk_conn *c, const vddk_disk_opts *o, char *err);

const vddk_info *vddk_disk_info(const vddk_disk *d); /* valid until vddk_close */
uint64_t vddk_capacity(const vddk_disk *d);           /* bytes */

/* Allocated extents within [offset, offset + length) (clipped to the capacity; pass
 * UINT64_MAX as length for "to the end"), at the chunk granularity, sorted and merged.  The
 * unaligned tail (capacity % chunk) is reported as allocated, since VDDK can only be asked
 * whole chunks.  *out is malloc'd (NULL when *count == 0); free it with vddk_free_extents. */
int vddk_extents(vddk_disk *d, uint64_t offset, uint64_t length,
                 vddk_extent **out, size_t *count, char *err);
void vddk_free_extents(vddk_extent *extents);

/* Fill buf[0..len) with the disk's bytes at offset.  Any offset and length: partial sectors are
 * read whole and copied out; bytes at or past the capacity read as zeros.  Thread-safe on one
 * disk (see "Threads"). */
int vddk_read(vddk_disk *d, uint64_t offset, void *buf, size_t len, char *err);

/* Write buf[0..len) at offset (restore).  Requires a writable disk, offset and len multiples
 * of 512, and offset + len <= capacity: VDDK writes whole sectors and never grows a disk. */
int vddk_write(vddk_disk *d, uint64_t offset, const void *buf, size_t len, char *err);

/* VixDiskLib_Flush on every handle (writable disks; a no-op otherwise). */
int vddk_flush(vddk_disk *d, char *err);

/* Flush (if writable), Close and Disconnect every handle, and free d -- even on error, in which
 * case the first failure is reported. */
int vddk_close(vddk_disk *d, char *err);

/* The VixError of the latest failing vddk_* call on this thread; 0 when that failure did not
 * come from VDDK (bad argument, dlopen, out of memory). */
uint64_t vddk_errcode(void);

#ifdef __cplusplus
}
#endif

#endif /* BLOCKVAULT_VDDK_H */
