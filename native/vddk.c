/*
 * vddk.c -- the VDDK transport: libvixDiskLib loaded with dlopen, driven through its C ABI.
 *
 * See vddk.h for the contract.  This file is laid out in the order a job uses it: the ABI
 * transcription (types, layouts, entry points), error texts, the log callbacks, loading and
 * InitEx, connection parameters (where the credentials live and die), the job bracket, then
 * the disk: open, the handle pool, extents, read, write, close.
 *
 * The ABI is transcribed from the facts in /work/shared/reference/vsphere-vddk.md §1 (x86-64
 * LP64); the _Static_asserts pin the offsets given there, so a wrong transcription does not
 * compile.  Nothing here includes VMware's headers: the library may be absent at build time.
 */
#define _GNU_SOURCE
#include "vddk.h"

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

#define DECLARE_FN(name, ret, args) ret (*name) args;
struct vix_fns {
    VDDK_REQUIRED_SYMBOLS(DECLARE_FN)
    VDDK_OPTIONAL_SYMBOLS(DECLARE_FN)
};

/* ---------------------------------------------------------------------------------------- */
/* Process-wide state                                                                        */
/* ---------------------------------------------------------------------------------------- */

enum lib_state { LIB_UNLOADED, LIB_READY, LIB_EXITED };

/* g.lock guards the fields below and serialises every InitEx/Exit, ConnectEx/Open and
 * Close/Disconnect, and the job calls (VMware: one thread at a time opens and closes).  After
 * InitEx, g.fn is immutable until Exit, and Exit is refused while a disk is open, so the I/O
 * paths read g.fn without the lock. */
static struct {
    pthread_mutex_t lock;
    enum lib_state state;
    void *dl;
    struct vix_fns fn;
    int major;
    unsigned open_disks;
    char libfile[PATH_MAX]; /* as dlopen()ed */
    char libreal[PATH_MAX]; /* realpath of it, to recognise the same library */
    char libdir[PATH_MAX];  /* InitEx libDir: the VDDK directory (parent of lib64/) */
    char libgiven[PATH_MAX]; /* the libpath vddk_init was given ("" for the defaults) */
} g = { .lock = PTHREAD_MUTEX_INITIALIZER };

static _Thread_local VixError tls_errcode;

uint64_t vddk_errcode(void) { return tls_errcode; }

/* ---------------------------------------------------------------------------------------- */
/* Errors                                                                                    */
/* ---------------------------------------------------------------------------------------- */

/* snprintf that may truncate on purpose: every message here is capped at VDDK_ERRLEN. */
static void bounded(char *dst, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void bounded(char *dst, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, size, fmt, ap);
    va_end(ap);
}

/* Symbolic names of the VixErrors worth naming, and the errno each failure reports (the
 * binding raises OSError subclasses from errno: FileNotFoundError, PermissionError...). */
static const struct { unsigned code; const char *name; int errnum; } vix_names[] = {
    {1, "VIX_E_FAIL", EIO},
    {2, "VIX_E_OUT_OF_MEMORY", ENOMEM},
    {3, "VIX_E_INVALID_ARG", EINVAL},
    {4, "VIX_E_FILE_NOT_FOUND", ENOENT},
    {5, "VIX_E_OBJECT_IS_BUSY", EBUSY},
    {6, "VIX_E_NOT_SUPPORTED", ENOTSUP},
    {7, "VIX_E_FILE_ERROR", EIO},
    {8, "VIX_E_DISK_FULL", ENOSPC},
    {9, "VIX_E_INCORRECT_FILE_TYPE", EINVAL},
    {10, "VIX_E_CANCELLED", ECANCELED},
    {11, "VIX_E_FILE_READ_ONLY", EROFS},
    {13, "VIX_E_FILE_ACCESS_ERROR", EACCES},
    {15, "VIX_E_FILE_ALREADY_LOCKED", EBUSY},
    {24, "VIX_E_BUFFER_TOOSMALL", EOVERFLOW},
    {25, "VIX_E_OBJECT_NOT_FOUND", ENOENT},
    {26, "VIX_E_HOST_NOT_CONNECTED", ENOTCONN},
    {35, "VIX_E_AUTHENTICATION_FAIL", EACCES},
    {36, "VIX_E_HOST_CONNECTION_LOST", ECONNRESET},
    {1000, "VIX_E_INVALID_HANDLE", EBADF},
    {14008, "VIX_E_HOST_SERVER_NOT_FOUND", EHOSTUNREACH},
    {14009, "VIX_E_HOST_NETWORK_CONN_REFUSED", ECONNREFUSED},
    {14010, "VIX_E_HOST_TCP_SOCKET_ERROR", ECONNRESET},
    {14011, "VIX_E_HOST_TCP_CONN_LOST", ECONNRESET},
    {16000, "VIX_E_DISK_INVAL", EINVAL},
    {16001, "VIX_E_DISK_NOINIT", EIO},
    {16002, "VIX_E_DISK_NOIO", EIO},
    {16003, "VIX_E_DISK_PARTIALCHAIN", EIO},
    {16006, "VIX_E_DISK_NEEDSREPAIR", EIO},
    {16007, "VIX_E_DISK_OUTOFRANGE", EINVAL},
    {16008, "VIX_E_DISK_CID_MISMATCH", EIO},
    {16052, "VIX_E_DISK_KEY_NOTFOUND", ENOENT},
    {16053, "VIX_E_DISK_SUBSYSTEM_INIT_FAIL", EIO},
    {16054, "VIX_E_DISK_INVALID_CONNECTION", ENOTCONN},
    {16063, "VIX_E_DISK_INVALIDDISK", EINVAL},
    {16067, "VIX_E_DISK_CAPACITY_MISMATCH", EINVAL},
    {18000, "VIX_E_CANNOT_CONNECT_TO_HOST", EHOSTUNREACH},
    {26000, "VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED", ENOTSUP},
    {30007, "VIX_E_NET_HTTP_COULDNT_CONNECT", ECONNREFUSED},
    {30028, "VIX_E_NET_HTTP_OPERATION_TIMEDOUT", ETIMEDOUT},
    {30035, "VIX_E_NET_HTTP_SSL_CONNECT_ERROR", ECONNABORTED},
};

static const char *vix_name(VixError e, int *errnum)
{
    unsigned code = (unsigned)VIX_ERROR_CODE(e);
    for (size_t i = 0; i < sizeof vix_names / sizeof vix_names[0]; i++)
        if (vix_names[i].code == code) {
            *errnum = vix_names[i].errnum;
            return vix_names[i].name;
        }
    *errnum = EIO;
    if (code >= 30001 && code <= 30202)
        return "VIX_E_NET_HTTP_*";
    return "unnamed VixError";
}

/* A failure outside VDDK: err = the formatted message, errno = errnum. */
static int fail(char *err, int errnum, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, VDDK_ERRLEN, fmt, ap);
    va_end(ap);
    tls_errcode = 0;
    errno = errnum;
    return -1;
}

/* A failed VixDiskLib call: err = "<what> failed: VDDK error <code> (<NAME>): <GetErrorText>". */
static int vix_fail(char *err, VixError e, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int vix_fail(char *err, VixError e, const char *fmt, ...)
{
    char what[VDDK_ERRLEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);

    char *text = g.fn.GetErrorText ? g.fn.GetErrorText(e, NULL) : NULL;
    const char *shown = text ? text : "(no error text)";
    size_t n = strlen(shown);
    while (n > 0 && (shown[n - 1] == '\n' || shown[n - 1] == '\r' || shown[n - 1] == ' '))
        n--;
    char full[32] = "";
    if (e != VIX_ERROR_CODE(e))
        bounded(full, sizeof full, " [0x%" PRIx64 "]", e);
    int errnum;
    const char *name = vix_name(e, &errnum);
    bounded(err, VDDK_ERRLEN, "%s failed: VDDK error %" PRIu64 "%s (%s): %.*s", what,
             (uint64_t)VIX_ERROR_CODE(e), full, name, (int)n, shown);
    if (text)
        g.fn.FreeErrorText(text);
    tls_errcode = e;
    errno = errnum;
    return -1;
}

/* ---------------------------------------------------------------------------------------- */
/* VDDK's log callbacks                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* VDDK calls these from its own threads, so the sink is read under its own small lock (never
 * g.lock: InitEx logs while g.lock is held). */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static vddk_log_fn log_fn;
static void *log_userdata;

void vddk_set_log(vddk_log_fn fn, void *userdata)
{
    pthread_mutex_lock(&log_lock);
    log_fn = fn;
    log_userdata = userdata;
    pthread_mutex_unlock(&log_lock);
}

static void log_emit(int level, const char *fmt, va_list args)
{
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, args);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    /* VDDK 7 reports its failed telemetry as errors on every connection; not our problem. */
    if (level > VDDK_LOG_INFO &&
        (strstr(msg, "Get CEIP status failed") || strstr(msg, "VDDK_PhoneHome:")))
        level = VDDK_LOG_INFO;

    pthread_mutex_lock(&log_lock);
    vddk_log_fn fn = log_fn;
    void *ud = log_userdata;
    pthread_mutex_unlock(&log_lock);
    if (fn)
        fn(level, msg, ud);
    else if (level >= VDDK_LOG_WARNING)
        fprintf(stderr, "vddk: %s%s\n", level == VDDK_LOG_PANIC ? "panic: " : "", msg);
}

/* Never hand VDDK NULL callbacks: its defaults are not thread-safe. */
static void log_info(const char *fmt, va_list args) { log_emit(VDDK_LOG_INFO, fmt, args); }
static void log_warning(const char *fmt, va_list args) { log_emit(VDDK_LOG_WARNING, fmt, args); }
static void log_panic(const char *fmt, va_list args) { log_emit(VDDK_LOG_PANIC, fmt, args); }

/* ---------------------------------------------------------------------------------------- */
/* Loading and InitEx                                                                        */
/* ---------------------------------------------------------------------------------------- */

static const char *const default_dirs[] = {
    "/usr/lib/vmware-vix-disklib",
    "/usr/local/lib/vmware-vix-disklib",
    "/opt/vmware-vix-disklib-distrib",
};

/* Newest first, each under <dir>/lib64 and then <dir> itself (so a test stub can sit in a
 * plain directory); the unversioned name last. */
static const char *const lib_names[] = {
    "lib64/libvixDiskLib.so.8", "lib64/libvixDiskLib.so.7", "lib64/libvixDiskLib.so.6",
    "libvixDiskLib.so.8",       "libvixDiskLib.so.7",       "libvixDiskLib.so.6",
    "lib64/libvixDiskLib.so",   "libvixDiskLib.so",
};

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The major version from a name like "libvixDiskLib.so.8" or "libvixDiskLib.so.8.0.1"; 0 if
 * the name carries none. */
static int major_from_name(const char *path)
{
    const char *so = strstr(path, ".so.");
    if (!so)
        return 0;
    return atoi(so + 4);
}

/* Candidate library files for libpath, in order; *n set to the count. */
static void candidates(const char *libpath, char out[][PATH_MAX], size_t max, size_t *n)
{
    *n = 0;
    if (libpath && !is_dir(libpath)) {
        bounded(out[(*n)++], PATH_MAX, "%s", libpath);
        return;
    }
    size_t ndirs = libpath ? 1 : sizeof default_dirs / sizeof default_dirs[0];
    for (size_t d = 0; d < ndirs; d++)
        for (size_t i = 0; i < sizeof lib_names / sizeof lib_names[0] && *n < max; i++)
            bounded(out[(*n)++], PATH_MAX, "%s/%s", libpath ? libpath : default_dirs[d],
                     lib_names[i]);
}

#define MAX_CANDIDATES 32
static char cand[MAX_CANDIDATES][PATH_MAX]; /* candidates() output, used under g.lock */

/* dlopen the first candidate that exists and loads; fills g.dl, g.libfile, g.libreal,
 * g.libdir, g.major. */
static int load_library(const char *libpath, char *err)
{
    size_t n;
    candidates(libpath, cand, MAX_CANDIDATES, &n);

    char last[VDDK_ERRLEN] = "";
    int last_errno = ENOENT;
    for (size_t i = 0; i < n; i++) {
        int exists = access(cand[i], F_OK) == 0;
        if (n > 1 && !exists)
            continue;
        void *dl = dlopen(cand[i], RTLD_NOW | RTLD_LOCAL);
        if (!dl) {
            const char *why = dlerror();
            bounded(last, sizeof last, "dlopen(%s) failed: %s", cand[i], why ? why : "?");
            last_errno = exists ? ELIBACC : ENOENT;
            continue;
        }
        g.dl = dl;
        bounded(g.libfile, sizeof g.libfile, "%s", cand[i]);
        if (!realpath(cand[i], g.libreal))
            bounded(g.libreal, sizeof g.libreal, "%s", cand[i]);
        g.major = major_from_name(cand[i]);
        if (!g.major)
            g.major = major_from_name(g.libreal);
        if (!g.major)
            g.major = 6; /* oldest supported: never read the VDDK 7 Info fields unasked */
        bounded(g.libdir, sizeof g.libdir, "%s", cand[i]);
        char *slash = strrchr(g.libdir, '/');
        if (slash) {
            *slash = '\0';
            size_t len = strlen(g.libdir);
            if (len >= 6 && strcmp(g.libdir + len - 6, "/lib64") == 0)
                g.libdir[len - 6] = '\0';
        } else {
            g.libdir[0] = '\0';
        }
        return 0;
    }
    if (last[0])
        return fail(err, last_errno, "cannot load libvixDiskLib: %s", last);
    if (libpath)
        return fail(err, ENOENT, "cannot load libvixDiskLib: no libvixDiskLib.so{.8,.7,.6,} "
                    "in %s or %s/lib64", libpath, libpath);
    return fail(err, ENOENT, "cannot load libvixDiskLib: not found in %s, %s or %s (pass its path)",
                default_dirs[0], default_dirs[1], default_dirs[2]);
}

static int resolve_symbols(char *err)
{
    memset(&g.fn, 0, sizeof g.fn);
#define RESOLVE_REQUIRED(name, ret, args)                                                     \
    if (!(*(void **)&g.fn.name = dlsym(g.dl, "VixDiskLib_" #name)))                           \
        return fail(err, ELIBBAD, "%s lacks VixDiskLib_" #name ": VDDK >= 6.5 is required",   \
                    g.libfile);
    VDDK_REQUIRED_SYMBOLS(RESOLVE_REQUIRED)
#undef RESOLVE_REQUIRED
#define RESOLVE_OPTIONAL(name, ret, args) *(void **)&g.fn.name = dlsym(g.dl, "VixDiskLib_" #name);
    VDDK_OPTIONAL_SYMBOLS(RESOLVE_OPTIONAL)
#undef RESOLVE_OPTIONAL
    /* Each optional pair is used whole or not at all. */
    if (!g.fn.QueryAllocatedBlocks || !g.fn.FreeBlockList)
        g.fn.QueryAllocatedBlocks = NULL, g.fn.FreeBlockList = NULL;
    if (!g.fn.AllocateConnectParams || !g.fn.FreeConnectParams)
        g.fn.AllocateConnectParams = NULL, g.fn.FreeConnectParams = NULL;
    return 0;
}

/* Called on failure paths too, so it keeps errno. */
static void unload(void)
{
    int saved = errno;
    if (g.dl)
        dlclose(g.dl);
    errno = saved;
    g.dl = NULL;
    memset(&g.fn, 0, sizeof g.fn); /* no stale pointers into an unmapped library */
}

/* Is libpath the library already loaded?  (Resolved the way load_library would.) */
static int same_library(const char *libpath)
{
    if (strcmp(libpath, g.libgiven) == 0)
        return 1;
    size_t n;
    candidates(libpath, cand, MAX_CANDIDATES, &n);
    for (size_t i = 0; i < n; i++) {
        char real[PATH_MAX];
        if (realpath(cand[i], real))
            return strcmp(real, g.libreal) == 0;
    }
    return 0;
}

static int init_locked(const char *libpath, const char *config_file, char *err)
{
    if (g.state == LIB_EXITED)
        return fail(err, EINVAL, "VixDiskLib_InitEx: VDDK was already shut down "
                    "(VixDiskLib_Exit) in this process and cannot be initialised again");
    if (g.state == LIB_READY) {
        if (libpath && !same_library(libpath))
            return fail(err, EINVAL, "VixDiskLib_InitEx: %s is already loaded in this "
                        "process; cannot also load %s", g.libfile, libpath);
        return 0;
    }
    if (load_library(libpath, err) != 0)
        return -1;
    if (resolve_symbols(err) != 0) {
        unload();
        return -1;
    }
    /* 6.5 is the API level nbdkit and Bareos announce; it covers every call made here. */
    VixError e = g.fn.InitEx(6, 5, log_info, log_warning, log_panic,
                             g.libdir[0] ? g.libdir : NULL, config_file);
    if (e != VIX_OK) {
        vix_fail(err, e, "VixDiskLib_InitEx(libDir %s)", g.libdir[0] ? g.libdir : "NULL");
        unload();
        return -1;
    }
    bounded(g.libgiven, sizeof g.libgiven, "%s", libpath ? libpath : "");
    g.state = LIB_READY;
    return 0;
}

int vddk_init(const char *libpath, const char *config_file, char *err)
{
    pthread_mutex_lock(&g.lock);
    int rc = init_locked(libpath, config_file, err);
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int vddk_exit(char *err)
{
    pthread_mutex_lock(&g.lock);
    int rc = 0;
    if (g.state == LIB_READY) {
        if (g.open_disks > 0) {
            rc = fail(err, EBUSY, "VixDiskLib_Exit: %u disk(s) still open; close them first",
                      g.open_disks);
        } else {
            g.fn.Exit();
            unload();
            g.state = LIB_EXITED;
        }
    }
    pthread_mutex_unlock(&g.lock);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Connection parameters                                                                     */
/* ---------------------------------------------------------------------------------------- */

/* VixDiskLibConnectParams plus the memory this file owns behind it.  The credential copies are
 * wiped by params_free(), called as soon as the VDDK call that needed them has returned. */
typedef struct {
    VixDiskLibConnectParams *p;
    int from_vddk;  /* allocated by AllocateConnectParams: free with FreeConnectParams */
    char *vmx;      /* "moref=vm-N" */
    char *secret[3]; /* user, password, cookie */
} params_t;

static void params_free(params_t *pp)
{
    for (int i = 0; i < 3; i++) {
        if (pp->secret[i]) {
            explicit_bzero(pp->secret[i], strlen(pp->secret[i]));
            free(pp->secret[i]);
        }
    }
    if (pp->p) {
        explicit_bzero(&pp->p->creds, sizeof pp->p->creds);
        /* The strings are ours, not VDDK's: detach them before FreeConnectParams. */
        pp->p->vmxSpec = pp->p->serverName = pp->p->thumbPrint = NULL;
        if (pp->from_vddk)
            g.fn.FreeConnectParams(pp->p);
        else
            free(pp->p);
    }
    free(pp->vmx);
    memset(pp, 0, sizeof *pp);
}

/* Build the parameters for c.  A NULL server means local files: all-zero parameters.  A remote
 * connection needs the user, the password and -- unless with_vm is 0, as for Cleanup, whose
 * vmxSpec must be NULL -- the VM (VDDK crashes on NULL fields). */
static int params_build(params_t *pp, const vddk_conn *c, int with_vm, char *err)
{
    memset(pp, 0, sizeof *pp);
    if (!c->server) {
        if (c->vm_moref || c->snapshot_moref || c->user || c->password || c->cookie ||
            c->thumbprint || c->port || c->nfc_port)
            return fail(err, EINVAL, "vddk: connection fields are set but server is NULL "
                        "(a local connection takes none of them)");
    } else if ((with_vm && !c->vm_moref) || !c->user || !c->password) {
        return fail(err, EINVAL, "vddk: connecting to %s needs vm_moref, user and password%s%s%s",
                    c->server, c->vm_moref || !with_vm ? "" : " (vm_moref missing)",
                    c->user ? "" : " (user missing)", c->password ? "" : " (password missing)");
    }

    if (g.fn.AllocateConnectParams) {
        pp->p = g.fn.AllocateConnectParams();
        pp->from_vddk = pp->p != NULL;
    }
    if (!pp->p)
        pp->p = calloc(1, sizeof *pp->p);
    if (!pp->p)
        return fail(err, ENOMEM, "vddk: out of memory for connection parameters");
    if (!c->server)
        return 0;

    VixDiskLibConnectParams *p = pp->p;
    const char *vm = c->vm_moref;
    if (with_vm && (strncmp(vm, "moref=", 6) == 0 || strchr(vm, '?')))
        pp->vmx = strdup(vm);
    else if (with_vm && asprintf(&pp->vmx, "moref=%s", vm) < 0)
        pp->vmx = NULL;
    pp->secret[0] = strdup(c->user);
    pp->secret[1] = strdup(c->password);
    pp->secret[2] = c->cookie ? strdup(c->cookie) : NULL;
    if ((with_vm && !pp->vmx) || !pp->secret[0] || !pp->secret[1] ||
        (c->cookie && !pp->secret[2])) {
        params_free(pp);
        return fail(err, ENOMEM, "vddk: out of memory for connection parameters");
    }
    p->vmxSpec = pp->vmx;
    p->serverName = (char *)c->server;
    p->thumbPrint = (char *)c->thumbprint;
    p->port = c->port;
    p->nfcHostPort = c->nfc_port;
    p->specType = VIXDISKLIB_SPEC_VMX;
    if (c->cookie) {
        p->credType = VIXDISKLIB_CRED_SESSIONID;
        p->creds.sessionId.cookie = pp->secret[2];
        p->creds.sessionId.userName = pp->secret[0];
        p->creds.sessionId.key = pp->secret[1];
    } else {
        p->credType = VIXDISKLIB_CRED_UID;
        p->creds.uid.userName = pp->secret[0];
        p->creds.uid.password = pp->secret[1];
    }
    return 0;
}

static const char *or_null(const char *s) { return s ? s : "NULL"; }

/* ---------------------------------------------------------------------------------------- */
/* The job bracket: PrepareForAccess, Cleanup, EndAccess                                     */
/* ---------------------------------------------------------------------------------------- */

enum job_call { JOB_PREPARE, JOB_END, JOB_CLEANUP };

static int job_call(enum job_call which, const vddk_conn *c, const char *identity,
                    unsigned *cleaned, unsigned *remaining, char *err)
{
    static const char *const names[] = {"VixDiskLib_PrepareForAccess", "VixDiskLib_EndAccess",
                                        "VixDiskLib_Cleanup"};
    if (which != JOB_CLEANUP && (!identity || !identity[0] || strlen(identity) > 50))
        return fail(err, EINVAL, "%s: identity must be 1 to 50 characters", names[which]);

    pthread_mutex_lock(&g.lock);
    params_t pp;
    int rc = init_locked(c->libpath, c->config_file, err);
    if (rc == 0)
        rc = params_build(&pp, c, which != JOB_CLEANUP, err);
    if (rc == 0) {
        VixError e;
        uint32_t done = 0, left = 0;
        if (which == JOB_PREPARE)
            e = g.fn.PrepareForAccess(pp.p, identity);
        else if (which == JOB_END)
            e = g.fn.EndAccess(pp.p, identity);
        else
            e = g.fn.Cleanup(pp.p, &done, &left);
        params_free(&pp);
        if (e != VIX_OK)
            rc = vix_fail(err, e, "%s(server %s, vm %s)", names[which], or_null(c->server),
                          or_null(c->vm_moref));
        if (cleaned)
            *cleaned = done;
        if (remaining)
            *remaining = left;
    }
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int vddk_prepare_access(const vddk_conn *c, const char *identity, char *err)
{
    return job_call(JOB_PREPARE, c, identity, NULL, NULL, err);
}

int vddk_end_access(const vddk_conn *c, const char *identity, char *err)
{
    return job_call(JOB_END, c, identity, NULL, NULL, err);
}

int vddk_cleanup(const vddk_conn *c, unsigned *cleaned_up, unsigned *remaining, char *err)
{
    return job_call(JOB_CLEANUP, c, NULL, cleaned_up, remaining, err);
}

/* ---------------------------------------------------------------------------------------- */
/* The disk and its handle pool                                                              */
/* ---------------------------------------------------------------------------------------- */

/* One VDDK connection + handle.  Only the thread that borrowed the slot touches it. */
struct slot {
    VixDiskLibConnection conn;
    VixDiskLibHandle h;
    uint8_t *bounce; /* lazily allocated, d->bounce_len bytes, sector aligned */
};

struct vddk_disk {
    vddk_info info;
    char *path;
    int writable;
    int aligned_buffers; /* SAN wants sector-aligned buffers: bounce unaligned ones */
    size_t bounce_len;
    struct slot *slots;
    unsigned nslots;
    pthread_mutex_t pool_lock;
    pthread_cond_t pool_cond;
    struct slot **idle; /* stack of idle slots */
    unsigned nidle;
};

static struct slot *slot_get(vddk_disk *d)
{
    pthread_mutex_lock(&d->pool_lock);
    while (d->nidle == 0)
        pthread_cond_wait(&d->pool_cond, &d->pool_lock);
    struct slot *s = d->idle[--d->nidle];
    pthread_mutex_unlock(&d->pool_lock);
    return s;
}

static void slot_put(vddk_disk *d, struct slot *s)
{
    pthread_mutex_lock(&d->pool_lock);
    d->idle[d->nidle++] = s;
    pthread_cond_signal(&d->pool_cond);
    pthread_mutex_unlock(&d->pool_lock);
}

static uint8_t *slot_bounce(vddk_disk *d, struct slot *s, char *err)
{
    if (!s->bounce && posix_memalign((void **)&s->bounce, 4096, d->bounce_len) != 0) {
        s->bounce = NULL;
        fail(err, ENOMEM, "vddk: out of memory for a %zu-byte bounce buffer", d->bounce_len);
    }
    return s->bounce;
}

/* Close and disconnect every slot that is open; the first failure goes to err (if not NULL).
 * Called with g.lock held. */
static int close_slots_locked(vddk_disk *d, char *err)
{
    int rc = 0;
    for (unsigned i = 0; i < d->nslots; i++) {
        struct slot *s = &d->slots[i];
        if (s->h) {
            VixError e = g.fn.Close(s->h);
            if (e != VIX_OK && rc == 0 && err)
                rc = vix_fail(err, e, "VixDiskLib_Close(%s)", d->path);
            s->h = NULL;
        }
        if (s->conn) {
            VixError e = g.fn.Disconnect(s->conn);
            if (e != VIX_OK && rc == 0 && err)
                rc = vix_fail(err, e, "VixDiskLib_Disconnect(%s)", d->path);
            s->conn = NULL;
        }
    }
    return rc;
}

static void disk_free(vddk_disk *d)
{
    if (!d)
        return;
    for (unsigned i = 0; d->slots && i < d->nslots; i++)
        free(d->slots[i].bounce);
    free(d->slots);
    free(d->idle);
    free(d->path);
    pthread_mutex_destroy(&d->pool_lock);
    pthread_cond_destroy(&d->pool_cond);
    free(d);
}

static int check_opts(const vddk_disk_opts *o, unsigned *handles, uint32_t *io, uint32_t *chunk,
                      char *err)
{
    if (!o->path || !o->path[0])
        return fail(err, EINVAL, "vddk_open: no disk path");
    *handles = o->handles ? o->handles : 1;
    *io = o->io_sectors ? o->io_sectors : VDDK_DEFAULT_IO_SECTORS;
    *chunk = o->chunk_sectors ? o->chunk_sectors : VDDK_MIN_CHUNK_SECTORS;
    if (*handles > VDDK_MAX_HANDLES)
        return fail(err, EINVAL, "vddk_open: %u handles requested, at most %u", *handles,
                    VDDK_MAX_HANDLES);
    if (o->writable && *handles != 1)
        return fail(err, EINVAL,
                    "vddk_open: a writable disk takes exactly one handle (VDDK locks it)");
    if (*io > 65536)
        return fail(err, EINVAL, "vddk_open: io_sectors %" PRIu32 " is above 65536 (32 MiB)", *io);
    if (*chunk < VDDK_MIN_CHUNK_SECTORS)
        return fail(err, EINVAL,
                    "vddk_open: chunk_sectors %" PRIu32 " is below VDDK's minimum of %u", *chunk,
                    VDDK_MIN_CHUNK_SECTORS);
    return 0;
}

/* Open every slot: all ConnectEx calls first, so the credential copies can be wiped right after
 * the last one, then the Opens.  Called with g.lock held. */
static int open_slots_locked(vddk_disk *d, const vddk_conn *c, const vddk_disk_opts *o,
                             char *err)
{
    params_t pp;
    if (params_build(&pp, c, 1, err) != 0)
        return -1;
    int rc = 0;
    char read_only = o->writable ? 0 : 1;
    for (unsigned i = 0; i < d->nslots && rc == 0; i++) {
        VixError e = g.fn.ConnectEx(pp.p, read_only, c->snapshot_moref, c->transport_modes,
                                    &d->slots[i].conn);
        if (e != VIX_OK) {
            d->slots[i].conn = NULL;
            rc = vix_fail(err, e,
                          "VixDiskLib_ConnectEx(server %s, vm %s, snapshot %s, transports %s, "
                          "handle %u of %u)",
                          or_null(c->server), or_null(c->vm_moref), or_null(c->snapshot_moref),
                          or_null(c->transport_modes), i + 1, d->nslots);
        }
    }
    params_free(&pp); /* wipes the credential copies */
    if (rc != 0)
        return -1;

    uint32_t flags = (o->writable ? 0 : VIXDISKLIB_FLAG_OPEN_READ_ONLY) |
                     (o->single_link ? VIXDISKLIB_FLAG_OPEN_SINGLE_LINK : 0) |
                     (o->unbuffered ? VIXDISKLIB_FLAG_OPEN_UNBUFFERED : 0);
    for (unsigned i = 0; i < d->nslots; i++) {
        VixError e = g.fn.Open(d->slots[i].conn, o->path, flags, &d->slots[i].h);
        if (e != VIX_OK) {
            d->slots[i].h = NULL;
            return vix_fail(err, e, "VixDiskLib_Open(\"%s\", handle %u of %u)", o->path, i + 1,
                            d->nslots);
        }
    }
    return 0;
}

/* GetInfo + GetTransportMode on the first slot.  Called with g.lock held. */
static int read_info_locked(vddk_disk *d, char *err)
{
    VixDiskLibInfo *vi = NULL;
    VixError e = g.fn.GetInfo(d->slots[0].h, &vi);
    if (e != VIX_OK)
        return vix_fail(err, e, "VixDiskLib_GetInfo(%s)", d->path);
    if (!vi)
        return fail(err, EIO, "VixDiskLib_GetInfo(%s) returned no info", d->path);
    vddk_info *info = &d->info;
    info->capacity_sectors = vi->capacity;
    info->adapter_type = vi->adapterType;
    info->num_links = vi->numLinks;
    if (g.major >= 7) {
        info->logical_sector_size = vi->logicalSectorSize;
        info->physical_sector_size = vi->physicalSectorSize;
    }
    bounded(info->uuid, sizeof info->uuid, "%s", vi->uuid ? vi->uuid : "");
    bounded(info->parent_hint, sizeof info->parent_hint, "%s",
             vi->parentFileNameHint ? vi->parentFileNameHint : "");
    g.fn.FreeInfo(vi);
    if (info->capacity_sectors > UINT64_MAX / VDDK_SECTOR)
        return fail(err, EOVERFLOW,
                    "VixDiskLib_GetInfo(%s): capacity of %" PRIu64 " sectors overflows", d->path,
                    info->capacity_sectors);
    info->capacity = info->capacity_sectors * VDDK_SECTOR;

    const char *mode = g.fn.GetTransportMode(d->slots[0].h);
    bounded(info->transport, sizeof info->transport, "%s", mode ? mode : "");
    return 0;
}

vddk_disk *vddk_open(const vddk_conn *c, const vddk_disk_opts *o, char *err)
{
    unsigned handles = 1;
    uint32_t io = 0, chunk = 0;
    if (check_opts(o, &handles, &io, &chunk, err) != 0)
        return NULL;

    vddk_disk *d = calloc(1, sizeof *d);
    if (!d) {
        fail(err, ENOMEM, "vddk_open: out of memory");
        return NULL;
    }
    pthread_mutex_init(&d->pool_lock, NULL);
    pthread_cond_init(&d->pool_cond, NULL);
    d->nslots = handles;
    d->writable = o->writable != 0;
    d->path = strdup(o->path);
    d->slots = calloc(handles, sizeof *d->slots);
    d->idle = calloc(handles, sizeof *d->idle);
    if (!d->path || !d->slots || !d->idle) {
        disk_free(d);
        fail(err, ENOMEM, "vddk_open: out of memory");
        return NULL;
    }

    pthread_mutex_lock(&g.lock);
    int rc = init_locked(c->libpath, c->config_file, err);
    if (rc == 0)
        rc = open_slots_locked(d, c, o, err);
    if (rc == 0)
        rc = read_info_locked(d, err);
    int saved_errno = errno;
    uint64_t saved_code = tls_errcode;
    if (rc != 0) {
        close_slots_locked(d, NULL); /* may clobber errno: the first failure is reported */
    } else {
        g.open_disks++;
        d->info.lib_major = g.major;
        d->info.has_allocated_blocks = g.fn.QueryAllocatedBlocks != NULL;
        bounded(d->info.libfile, sizeof d->info.libfile, "%s", g.libfile);
    }
    pthread_mutex_unlock(&g.lock);
    if (rc != 0) {
        disk_free(d);
        errno = saved_errno;
        tls_errcode = saved_code;
        return NULL;
    }

    d->info.handles = handles;
    d->info.io_sectors = io;
    d->info.chunk_sectors = chunk;
    d->aligned_buffers = strcmp(d->info.transport, "san") == 0;
    d->bounce_len = d->aligned_buffers ? (size_t)io * VDDK_SECTOR : VDDK_SECTOR;
    for (unsigned i = 0; i < handles; i++)
        d->idle[d->nidle++] = &d->slots[i];
    return d;
}

const vddk_info *vddk_disk_info(const vddk_disk *d) { return &d->info; }

uint64_t vddk_capacity(const vddk_disk *d) { return d->info.capacity; }

int vddk_close(vddk_disk *d, char *err)
{
    if (!d)
        return 0;
    int rc = d->writable ? vddk_flush(d, err) : 0;
    int saved_errno = errno;
    uint64_t saved_code = tls_errcode;
    char close_err[VDDK_ERRLEN];
    pthread_mutex_lock(&g.lock);
    if (close_slots_locked(d, close_err) != 0 && rc == 0) {
        memcpy(err, close_err, VDDK_ERRLEN);
        rc = -1;
        saved_errno = errno;
        saved_code = tls_errcode;
    }
    g.open_disks--;
    pthread_mutex_unlock(&g.lock);
    disk_free(d);
    errno = saved_errno; /* the first failure's */
    tls_errcode = saved_code;
    return rc;
}

int vddk_flush(vddk_disk *d, char *err)
{
    if (!d->writable)
        return 0;
    int rc = 0;
    for (unsigned i = 0; i < d->nslots && rc == 0; i++) {
        struct slot *s = slot_get(d);
        VixError e = g.fn.Flush(s->h);
        slot_put(d, s);
        if (e != VIX_OK)
            rc = vix_fail(err, e, "VixDiskLib_Flush(%s)", d->path);
    }
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Allocated extents                                                                         */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    vddk_extent *v;
    size_t n, cap;
} extent_vec;

static int vec_push(extent_vec *x, uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    if (x->n == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 64;
        vddk_extent *v = realloc(x->v, cap * sizeof *v);
        if (!v)
            return -1;
        x->v = v;
        x->cap = cap;
    }
    x->v[x->n++] = (vddk_extent){off, len};
    return 0;
}

static int extent_cmp(const void *a, const void *b)
{
    uint64_t x = ((const vddk_extent *)a)->start, y = ((const vddk_extent *)b)->start;
    return x < y ? -1 : x > y;
}

/* Clip every extent to [lo, hi), sort, and merge overlapping or touching ones, in place. */
static void clip_sort_merge(extent_vec *x, uint64_t lo, uint64_t hi)
{
    size_t k = 0;
    for (size_t i = 0; i < x->n; i++) {
        uint64_t a = x->v[i].start, b = a + x->v[i].length;
        if (a < lo)
            a = lo;
        if (b > hi)
            b = hi;
        if (a < b)
            x->v[k++] = (vddk_extent){a, b - a};
    }
    x->n = k;
    if (x->n > 1) /* x->v may be NULL when VDDK reported nothing */
        qsort(x->v, x->n, sizeof *x->v, extent_cmp);
    k = 0;
    for (size_t i = 0; i < x->n; i++) {
        if (k > 0 && x->v[i].start <= x->v[k - 1].start + x->v[k - 1].length) {
            uint64_t end = x->v[i].start + x->v[i].length;
            if (end > x->v[k - 1].start + x->v[k - 1].length)
                x->v[k - 1].length = end - x->v[k - 1].start;
        } else {
            x->v[k++] = x->v[i];
        }
    }
    x->n = k;
}

/* QueryAllocatedBlocks over whole chunks [first, last) sectors, in windows of at most
 * VIXDISKLIB_MAX_CHUNK_NUMBER chunks, appending byte ranges to x. */
static int query_blocks(vddk_disk *d, struct slot *s, uint64_t first, uint64_t last,
                        extent_vec *x, char *err)
{
    uint64_t chunk = d->info.chunk_sectors;
    uint64_t window = chunk * VIXDISKLIB_MAX_CHUNK_NUMBER;
    for (uint64_t start = first; start < last;) {
        uint64_t n = last - start < window ? last - start : window;
        VixDiskLibBlockList *bl = NULL;
        VixError e = g.fn.QueryAllocatedBlocks(s->h, start, n, chunk, &bl);
        if (e != VIX_OK)
            return vix_fail(err, e,
                            "VixDiskLib_QueryAllocatedBlocks(%s, start sector %" PRIu64
                            ", %" PRIu64 " sectors, chunk %" PRIu64 ")",
                            d->path, start, n, chunk);
        int oom = 0;
        for (uint32_t i = 0; bl && i < bl->numBlocks && !oom; i++) {
            uint64_t off = bl->blocks[i].offset, len = bl->blocks[i].length;
            if (off >= d->info.capacity_sectors)
                continue;
            if (len > d->info.capacity_sectors - off)
                len = d->info.capacity_sectors - off;
            oom = vec_push(x, off * VDDK_SECTOR, len * VDDK_SECTOR) != 0;
        }
        e = bl ? g.fn.FreeBlockList(bl) : VIX_OK;
        if (oom)
            return fail(err, ENOMEM, "vddk_extents(%s): out of memory", d->path);
        if (e != VIX_OK)
            return vix_fail(err, e, "VixDiskLib_FreeBlockList(%s)", d->path);
        start += n;
    }
    return 0;
}

int vddk_extents(vddk_disk *d, uint64_t offset, uint64_t length, vddk_extent **out,
                 size_t *count, char *err)
{
    *out = NULL;
    *count = 0;
    uint64_t cap = d->info.capacity;
    if (offset >= cap || length == 0)
        return 0;
    uint64_t end = length > cap - offset ? cap : offset + length;

    extent_vec x = {0};
    int rc = 0;
    if (!g.fn.QueryAllocatedBlocks) {
        /* VDDK < 6.7: no allocation map; everything may hold data. */
        if (vec_push(&x, offset, end - offset) != 0)
            rc = fail(err, ENOMEM, "vddk_extents(%s): out of memory", d->path);
    } else {
        /* VDDK answers whole chunks only: query the chunk-aligned part of the range and report
         * the unaligned tail of the disk as allocated (what Bareos does too). */
        uint64_t chunk = d->info.chunk_sectors;
        uint64_t aligned_end = d->info.capacity_sectors / chunk * chunk;
        uint64_t first = offset / VDDK_SECTOR / chunk * chunk;
        uint64_t end_sector = (end + VDDK_SECTOR - 1) / VDDK_SECTOR;
        uint64_t last = (end_sector + chunk - 1) / chunk * chunk;
        if (last > aligned_end)
            last = aligned_end;
        if (first < last) {
            struct slot *s = slot_get(d);
            rc = query_blocks(d, s, first, last, &x, err);
            slot_put(d, s);
        }
        if (rc == 0 && end_sector > aligned_end &&
            vec_push(&x, aligned_end * VDDK_SECTOR, cap - aligned_end * VDDK_SECTOR) != 0)
            rc = fail(err, ENOMEM, "vddk_extents(%s): out of memory", d->path);
    }
    if (rc != 0) {
        free(x.v);
        return -1;
    }
    clip_sort_merge(&x, offset, end);
    if (x.n == 0) {
        free(x.v);
        x.v = NULL;
    }
    *out = x.v;
    *count = x.n;
    return 0;
}

void vddk_free_extents(vddk_extent *extents) { free(extents); }

/* ---------------------------------------------------------------------------------------- */
/* Read and write                                                                            */
/* ---------------------------------------------------------------------------------------- */

static int vix_read(vddk_disk *d, struct slot *s, uint64_t sector, uint64_t n, uint8_t *buf,
                    char *err)
{
    VixError e = g.fn.Read(s->h, sector, n, buf);
    if (e != VIX_OK)
        return vix_fail(err, e,
                        "VixDiskLib_Read(%s, start sector %" PRIu64 ", %" PRIu64 " sectors)",
                        d->path, sector, n);
    return 0;
}

/* Read [pos, pos + n) (within the capacity) into dst.  Whole aligned sectors go straight into
 * the caller's buffer, up to io_sectors per call; a partial sector at either end is read whole
 * into the bounce buffer and the needed bytes copied out.  Under SAN, an unaligned destination
 * goes through the (then large) bounce buffer as well. */
static int read_range(vddk_disk *d, struct slot *s, uint64_t pos, uint8_t *dst, size_t n,
                      char *err)
{
    uint64_t io = d->info.io_sectors;
    while (n > 0) {
        uint64_t sector = pos / VDDK_SECTOR;
        size_t skip = (size_t)(pos % VDDK_SECTOR);
        size_t done;
        if (skip == 0 && n >= VDDK_SECTOR &&
            (!d->aligned_buffers || (uintptr_t)dst % VDDK_SECTOR == 0)) {
            uint64_t ns = n / VDDK_SECTOR < io ? n / VDDK_SECTOR : io;
            if (vix_read(d, s, sector, ns, dst, err) != 0)
                return -1;
            done = (size_t)(ns * VDDK_SECTOR);
        } else {
            uint8_t *b = slot_bounce(d, s, err);
            if (!b)
                return -1;
            uint64_t ns = 1;
            if (skip == 0 && n >= VDDK_SECTOR) /* SAN, unaligned destination */
                ns = n / VDDK_SECTOR < io ? n / VDDK_SECTOR : io;
            if (vix_read(d, s, sector, ns, b, err) != 0)
                return -1;
            done = (size_t)(ns * VDDK_SECTOR) - skip;
            if (done > n)
                done = n;
            memcpy(dst, b + skip, done);
        }
        pos += done;
        dst += done;
        n -= done;
    }
    return 0;
}

int vddk_read(vddk_disk *d, uint64_t offset, void *buf, size_t len, char *err)
{
    uint8_t *dst = buf;
    uint64_t cap = d->info.capacity;
    if (len == 0)
        return 0;
    if (offset >= cap) {
        memset(dst, 0, len);
        return 0;
    }
    size_t valid = cap - offset < len ? (size_t)(cap - offset) : len;
    memset(dst + valid, 0, len - valid);

    struct slot *s = slot_get(d);
    int rc = read_range(d, s, offset, dst, valid, err);
    slot_put(d, s);
    return rc;
}

int vddk_write(vddk_disk *d, uint64_t offset, const void *buf, size_t len, char *err)
{
    if (!d->writable)
        return fail(err, EBADF, "vddk_write(%s): the disk was opened read-only", d->path);
    if (offset % VDDK_SECTOR || len % VDDK_SECTOR)
        return fail(err, EINVAL, "vddk_write(%s): offset %" PRIu64 " and length %zu must be "
                    "multiples of %u (VDDK writes whole sectors)", d->path, offset, len,
                    VDDK_SECTOR);
    if (offset > d->info.capacity || len > d->info.capacity - offset)
        return fail(err, ENOSPC, "vddk_write(%s): %zu bytes at offset %" PRIu64 " end past "
                    "the capacity of %" PRIu64 " bytes", d->path, len, offset,
                    d->info.capacity);

    const uint8_t *src = buf;
    uint64_t io = d->info.io_sectors;
    uint64_t sector = offset / VDDK_SECTOR, left = len / VDDK_SECTOR;
    struct slot *s = slot_get(d);
    int rc = 0;
    while (left > 0 && rc == 0) {
        uint64_t ns = left < io ? left : io;
        const uint8_t *from = src;
        if (d->aligned_buffers && (uintptr_t)src % VDDK_SECTOR) {
            uint8_t *b = slot_bounce(d, s, err);
            if (!b) {
                rc = -1;
                break;
            }
            memcpy(b, src, (size_t)(ns * VDDK_SECTOR));
            from = b;
        }
        VixError e = g.fn.Write(s->h, sector, ns, from);
        if (e != VIX_OK)
            rc = vix_fail(err, e,
                          "VixDiskLib_Write(%s, start sector %" PRIu64 ", %" PRIu64 " sectors)",
                          d->path, sector, ns);
        src += ns * VDDK_SECTOR;
        sector += ns;
        left -= ns;
    }
    slot_put(d, s);
    return rc;
}
