/*
 * Shared between the vddk_*.c files only; the public API is vddk.h.
 *
 * The VixDiskLib ABI is transcribed here from the facts in /work/shared/reference/vsphere-vddk.md
 * §1 (x86-64 LP64); the _Static_asserts pin the offsets given there, so a wrong transcription
 * does not compile.  Nothing here includes VMware's headers: the library may be absent at build
 * time.  Everything with linkage is prefixed vddk_, so nothing collides with the rest of the
 * extension when everything is linked into one module; the Vix* names are VMware's, and types
 * only.
 */
#ifndef BLOCKVAULT_VDDK_INTERNAL_H
#define BLOCKVAULT_VDDK_INTERNAL_H

#include "vddk.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------- */
/* The VixDiskLib ABI                                                                        */
/* ---------------------------------------------------------------------------------------- */

typedef uint64_t VixError;
#define VIX_OK 0
#define VIX_ERROR_CODE(e) ((e) & 0xFFFF)

typedef void *VixDiskLibConnection;
typedef void *VixDiskLibHandle;
typedef void VixDiskLibLogFunc(const char *fmt, va_list args);

enum { VIXDISKLIB_CRED_UID = 1, VIXDISKLIB_CRED_SESSIONID = 2 };
enum { VIXDISKLIB_SPEC_VMX = 0 };
enum {
    VIXDISKLIB_FLAG_OPEN_UNBUFFERED = 1,
    VIXDISKLIB_FLAG_OPEN_SINGLE_LINK = 2,
    VIXDISKLIB_FLAG_OPEN_READ_ONLY = 4,
};
#define VIXDISKLIB_MAX_CHUNK_NUMBER (512u * 1024u) /* chunks per QueryAllocatedBlocks call */

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long reserved1;
    int credType;
    union {
        struct { char *userName; char *password; } uid;
        struct { char *cookie; char *userName; char *key; } sessionId;
        void *reserved2;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *reserved3;
    char reserved4[8];
    void *reserved5;
    union {
        struct { char *id; char *datastoreMoRef; char *ssId; } vStorageObjSpec;
    } spec;
    int specType;
} VixDiskLibConnectParams;

_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "ConnectParams size");
_Static_assert(offsetof(VixDiskLibConnectParams, credType) == 32, "credType offset");
_Static_assert(offsetof(VixDiskLibConnectParams, creds) == 40, "creds offset");
_Static_assert(offsetof(VixDiskLibConnectParams, port) == 64, "port offset");
_Static_assert(offsetof(VixDiskLibConnectParams, nfcHostPort) == 68, "nfcHostPort offset");
_Static_assert(offsetof(VixDiskLibConnectParams, spec) == 96, "spec offset");
_Static_assert(offsetof(VixDiskLibConnectParams, specType) == 120, "specType offset");

typedef struct { uint32_t cylinders, heads, sectors; } VixDiskLibGeometry;

/* VDDK 7+ layout; before 7.0 the struct ends after uuid (56 bytes), so the two sector sizes
 * are read only when the loaded library is major 7 or newer. */
typedef struct {
    VixDiskLibGeometry biosGeo;
    VixDiskLibGeometry physGeo;
    uint64_t capacity; /* sectors */
    int adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibInfo;

_Static_assert(sizeof(VixDiskLibInfo) == 64, "Info size");
_Static_assert(offsetof(VixDiskLibInfo, capacity) == 24, "capacity offset");
_Static_assert(offsetof(VixDiskLibInfo, uuid) == 48, "uuid offset");
_Static_assert(offsetof(VixDiskLibInfo, logicalSectorSize) == 56, "logicalSectorSize offset");

typedef struct { uint64_t offset, length; } VixDiskLibBlock; /* sectors */
typedef struct { uint32_t numBlocks; VixDiskLibBlock blocks[1]; } VixDiskLibBlockList;

_Static_assert(offsetof(VixDiskLibBlockList, blocks) == 8, "BlockList.blocks offset");

/* Entry points: X(name, return type, parameter list).  Required ones are those of VDDK 6.5
 * that this file calls; the 6.7 additions are optional and NULL when missing. */
#define VDDK_REQUIRED_SYMBOLS(X)                                                              \
    X(InitEx, VixError, (uint32_t, uint32_t, VixDiskLibLogFunc *, VixDiskLibLogFunc *,        \
                         VixDiskLibLogFunc *, const char *, const char *))                    \
    X(Exit, void, (void))                                                                     \
    X(ConnectEx, VixError, (const VixDiskLibConnectParams *, char, const char *, const char *, \
                            VixDiskLibConnection *))                                          \
    X(Disconnect, VixError, (VixDiskLibConnection))                                           \
    X(Open, VixError, (const VixDiskLibConnection, const char *, uint32_t, VixDiskLibHandle *)) \
    X(Close, VixError, (VixDiskLibHandle))                                                    \
    X(GetInfo, VixError, (VixDiskLibHandle, VixDiskLibInfo **))                               \
    X(FreeInfo, void, (VixDiskLibInfo *))                                                     \
    X(GetTransportMode, const char *, (VixDiskLibHandle))                                     \
    X(Read, VixError, (VixDiskLibHandle, uint64_t, uint64_t, uint8_t *))                      \
    X(Write, VixError, (VixDiskLibHandle, uint64_t, uint64_t, const uint8_t *))               \
    X(Flush, VixError, (VixDiskLibHandle))                                                    \
    X(GetErrorText, char *, (VixError, const char *))                                         \
    X(FreeErrorText, void, (char *))                                                          \
    X(Cleanup, VixError, (const VixDiskLibConnectParams *, uint32_t *, uint32_t *))           \
    X(PrepareForAccess, VixError, (const VixDiskLibConnectParams *, const char *))            \
    X(EndAccess, VixError, (const VixDiskLibConnectParams *, const char *))

#define VDDK_OPTIONAL_SYMBOLS(X)                                                              \
    X(QueryAllocatedBlocks, VixError, (VixDiskLibHandle, uint64_t, uint64_t, uint64_t,        \
                                       VixDiskLibBlockList **))                               \
    X(FreeBlockList, VixError, (VixDiskLibBlockList *))                                       \
    X(AllocateConnectParams, VixDiskLibConnectParams *, (void))                               \
    X(FreeConnectParams, void, (VixDiskLibConnectParams *))

#define VDDK_DECLARE_FN(name, ret, args) ret (*name) args;
struct vix_fns {
    VDDK_REQUIRED_SYMBOLS(VDDK_DECLARE_FN)
    VDDK_OPTIONAL_SYMBOLS(VDDK_DECLARE_FN)
};

/* ---------------------------------------------------------------------------------------- */
/* Process-wide state (vddk_library.c)                                                       */
/* ---------------------------------------------------------------------------------------- */

enum vddk_lib_state { VDDK_LIB_UNLOADED, VDDK_LIB_READY, VDDK_LIB_EXITED };

/* vddk_g.lock guards the fields below and serialises every InitEx/Exit, ConnectEx/Open and
 * Close/Disconnect, and the job calls (VMware: one thread at a time opens and closes).  After
 * InitEx, vddk_g.fn is immutable until Exit, and Exit is refused while a disk is open, so the
 * I/O paths read vddk_g.fn without the lock. */
struct vddk_global {
    pthread_mutex_t lock;
    enum vddk_lib_state state;
    void *dl;
    struct vix_fns fn;
    int major;
    unsigned open_disks;
    char libfile[PATH_MAX]; /* as dlopen()ed */
    char libreal[PATH_MAX]; /* realpath of it, to recognise the same library */
    char libdir[PATH_MAX];  /* InitEx libDir: the VDDK directory (parent of lib64/) */
    char libgiven[PATH_MAX]; /* the libpath vddk_init was given ("" for the defaults) */
};
extern struct vddk_global vddk_g;

/* The VixError of this thread's latest failure, 0 when it did not come from VDDK; what
 * vddk_errcode() returns.  Set by vddk_fail/vddk_vix_fail. */
extern _Thread_local VixError vddk_tls_errcode;

/* Load libvixDiskLib, resolve its entry points and call InitEx, unless done already (then only
 * check that libpath, if not NULL, names the library loaded).  Called with vddk_g.lock held. */
int vddk_init_locked(const char *libpath, const char *config_file, char *err);

/* ---------------------------------------------------------------------------------------- */
/* Errors (vddk_library.c)                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* snprintf that may truncate on purpose: every message here is capped at VDDK_ERRLEN. */
void vddk_bounded(char *dst, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A failure outside VDDK: err = the formatted message, errno = errnum.  Returns -1. */
int vddk_fail(char *err, int errnum, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* A failed VixDiskLib call: err = "<what> failed: VDDK error <code> (<NAME>): <GetErrorText>",
 * errno mapped from the code.  Returns -1. */
int vddk_vix_fail(char *err, VixError e, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Credentials given to VDDK, struck from every text of VDDK's (error texts, log lines) by
 * vddk_redact(); see vddk_library.c.  is_user: only a domain-style name (with '@' or '\\'). */
void vddk_redact_add(const char *secret, int is_user);
void vddk_redact(char *buf);

static inline const char *vddk_or_null(const char *s) { return s ? s : "NULL"; }

/* ---------------------------------------------------------------------------------------- */
/* Connection parameters (vddk_access.c)                                                     */
/* ---------------------------------------------------------------------------------------- */

/* VixDiskLibConnectParams plus the memory this code owns behind it.  The credential copies are
 * wiped by vddk_params_free(), called as soon as the VDDK call that needed them has returned. */
typedef struct {
    VixDiskLibConnectParams *p;
    int from_vddk;  /* allocated by AllocateConnectParams: free with FreeConnectParams */
    char *vmx;      /* "moref=vm-N" */
    char *secret[3]; /* user, password, cookie */
} vddk_params;

/* Build the parameters for c.  A NULL server means local files: all-zero parameters.  A remote
 * connection needs the user, the password and -- unless with_vm is 0, as for Cleanup, whose
 * vmxSpec must be NULL -- the VM (VDDK crashes on NULL fields).  Called with vddk_g.lock held,
 * after vddk_init_locked. */
int vddk_params_build(vddk_params *pp, const vddk_conn *c, int with_vm, char *err);
void vddk_params_free(vddk_params *pp);

/* ---------------------------------------------------------------------------------------- */
/* The disk and its handle pool (vddk_disk.c)                                                */
/* ---------------------------------------------------------------------------------------- */

/* One VDDK connection + handle.  Only the thread that borrowed the slot touches it. */
struct vddk_slot {
    VixDiskLibConnection conn;
    VixDiskLibHandle h;
    uint8_t *bounce; /* lazily allocated, d->bounce_len bytes, sector aligned */
};

/* Opened by vddk_disk.c; vddk_extents.c borrows a slot for QueryAllocatedBlocks. */
struct vddk_disk {
    vddk_info info;
    char *path;
    int writable;
    int aligned_buffers; /* SAN wants sector-aligned buffers: bounce unaligned ones */
    size_t bounce_len;
    struct vddk_slot *slots;
    unsigned nslots;
    pthread_mutex_t pool_lock;
    pthread_cond_t pool_cond;
    struct vddk_slot **idle; /* stack of idle slots */
    unsigned nidle;
};

/* Borrow an idle slot (waiting for one if all are busy) and give it back: every VDDK call on a
 * handle outside open/close goes through these, so no handle is used by two threads at once. */
static inline struct vddk_slot *vddk_slot_get(vddk_disk *d)
{
    pthread_mutex_lock(&d->pool_lock);
    while (d->nidle == 0)
        pthread_cond_wait(&d->pool_cond, &d->pool_lock);
    struct vddk_slot *s = d->idle[--d->nidle];
    pthread_mutex_unlock(&d->pool_lock);
    return s;
}

static inline void vddk_slot_put(vddk_disk *d, struct vddk_slot *s)
{
    pthread_mutex_lock(&d->pool_lock);
    d->idle[d->nidle++] = s;
    pthread_cond_signal(&d->pool_cond);
    pthread_mutex_unlock(&d->pool_lock);
}

#endif
