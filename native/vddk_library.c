/*
 * vddk_library.c -- libvixDiskLib itself: finding and dlopen()ing it, resolving its entry
 * points, InitEx and Exit, the process-wide state (vddk_g) that every other vddk_*.c file
 * reads, the log callbacks handed to InitEx, and the error helpers that turn a VixError
 * into a message and an errno.
 *
 * See vddk.h for the contract and vddk_internal.h for the ABI.
 */
#define _GNU_SOURCE
#include "vddk_internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct vddk_global vddk_g = { .lock = PTHREAD_MUTEX_INITIALIZER };

_Thread_local VixError vddk_tls_errcode;

uint64_t vddk_errcode(void) { return vddk_tls_errcode; }

/* ---------------------------------------------------------------------------------------- */
/* Errors                                                                                    */
/* ---------------------------------------------------------------------------------------- */

/* snprintf that may truncate on purpose: every message here is capped at VDDK_ERRLEN. */
void vddk_bounded(char *dst, size_t size, const char *fmt, ...)
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

/* ---------------------------------------------------------------------------------------- */
/* Redaction of credentials in VDDK's own texts                                              */
/* ---------------------------------------------------------------------------------------- */

/* The passwords, cookies and domain-style user names (with '@' or '\\') handed to VDDK in this
 * process.  A library is free to repeat them in an error text or a log line (a careless or
 * debugging build does); every text that comes from VDDK goes through vddk_redact() before it
 * is shown, so none of them is ever printed.  These are the only copies kept past the call
 * that needed them; they live until the process exits, like the caller's own strings. */
#define REDACT_MAX 16
#define REDACT_MARK "***"
static pthread_mutex_t redact_lock = PTHREAD_MUTEX_INITIALIZER;
static char *redact_list[REDACT_MAX];
static size_t redact_count;

void vddk_redact_add(const char *secret, int is_user)
{
    if (!secret || strlen(secret) < strlen(REDACT_MARK))
        return; /* striking every "a" from a message would say nothing either */
    if (is_user && !strpbrk(secret, "@\\"))
        return; /* a plain user name ("backup") is no secret, and too common a word to strike */
    pthread_mutex_lock(&redact_lock);
    size_t i = 0;
    while (i < redact_count && strcmp(redact_list[i], secret) != 0)
        i++;
    if (i == redact_count) {
        char *copy = strdup(secret);
        if (copy && redact_count == REDACT_MAX) { /* the oldest goes */
            free(redact_list[0]);
            memmove(redact_list, redact_list + 1, (REDACT_MAX - 1) * sizeof *redact_list);
            redact_count--;
        }
        if (copy)
            redact_list[redact_count++] = copy;
    }
    pthread_mutex_unlock(&redact_lock);
}

/* Replace every registered secret in the NUL-terminated buf by "***"; never longer, since a
 * secret has at least as many characters as the mark. */
void vddk_redact(char *buf)
{
    const size_t mark = strlen(REDACT_MARK);
    pthread_mutex_lock(&redact_lock);
    for (size_t i = 0; i < redact_count; i++) {
        const size_t len = strlen(redact_list[i]);
        char *at = buf;
        while ((at = strstr(at, redact_list[i])) != NULL) {
            memcpy(at, REDACT_MARK, mark);
            memmove(at + mark, at + len, strlen(at + len) + 1);
            at += mark;
        }
    }
    pthread_mutex_unlock(&redact_lock);
}

/* A failure outside VDDK: err = the formatted message, errno = errnum. */
int vddk_fail(char *err, int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, VDDK_ERRLEN, fmt, ap);
    va_end(ap);
    vddk_tls_errcode = 0;
    errno = errnum;
    return -1;
}

/* A failed VixDiskLib call: err = "<what> failed: VDDK error <code> (<NAME>): <GetErrorText>". */
int vddk_vix_fail(char *err, VixError e, const char *fmt, ...)
{
    char what[VDDK_ERRLEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);

    char *text = vddk_g.fn.GetErrorText ? vddk_g.fn.GetErrorText(e, NULL) : NULL;
    const char *shown = text ? text : "(no error text)";
    size_t n = strlen(shown);
    while (n > 0 && (shown[n - 1] == '\n' || shown[n - 1] == '\r' || shown[n - 1] == ' '))
        n--;
    char full[32] = "";
    if (e != VIX_ERROR_CODE(e))
        vddk_bounded(full, sizeof full, " [0x%" PRIx64 "]", e);
    int errnum;
    const char *name = vix_name(e, &errnum);
    vddk_bounded(err, VDDK_ERRLEN, "%s failed: VDDK error %" PRIu64 "%s (%s): %.*s", what,
                 (uint64_t)VIX_ERROR_CODE(e), full, name, (int)n, shown);
    vddk_redact(err); /* VDDK's text may repeat what it was given */
    if (text)
        vddk_g.fn.FreeErrorText(text);
    vddk_tls_errcode = e;
    errno = errnum;
    return -1;
}

/* ---------------------------------------------------------------------------------------- */
/* VDDK's log callbacks                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* VDDK calls these from its own threads, so the sink is read under its own small lock (never
 * vddk_g.lock: InitEx logs while vddk_g.lock is held). */
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
    vddk_redact(msg);
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
        vddk_bounded(out[(*n)++], PATH_MAX, "%s", libpath);
        return;
    }
    size_t ndirs = libpath ? 1 : sizeof default_dirs / sizeof default_dirs[0];
    for (size_t d = 0; d < ndirs; d++)
        for (size_t i = 0; i < sizeof lib_names / sizeof lib_names[0] && *n < max; i++)
            vddk_bounded(out[(*n)++], PATH_MAX, "%s/%s", libpath ? libpath : default_dirs[d],
                         lib_names[i]);
}

#define MAX_CANDIDATES 32
static char cand[MAX_CANDIDATES][PATH_MAX]; /* candidates() output, used under vddk_g.lock */

/* dlopen the first candidate that exists and loads; fills vddk_g.dl, vddk_g.libfile,
 * vddk_g.libreal, vddk_g.libdir, vddk_g.major. */
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
            vddk_bounded(last, sizeof last, "dlopen(%s) failed: %s", cand[i], why ? why : "?");
            last_errno = exists ? ELIBACC : ENOENT;
            continue;
        }
        vddk_g.dl = dl;
        vddk_bounded(vddk_g.libfile, sizeof vddk_g.libfile, "%s", cand[i]);
        if (!realpath(cand[i], vddk_g.libreal))
            vddk_bounded(vddk_g.libreal, sizeof vddk_g.libreal, "%s", cand[i]);
        vddk_g.major = major_from_name(cand[i]);
        if (!vddk_g.major)
            vddk_g.major = major_from_name(vddk_g.libreal);
        if (!vddk_g.major)
            vddk_g.major = 6; /* oldest supported: never read the VDDK 7 Info fields unasked */
        vddk_bounded(vddk_g.libdir, sizeof vddk_g.libdir, "%s", cand[i]);
        char *slash = strrchr(vddk_g.libdir, '/');
        if (slash) {
            *slash = '\0';
            size_t len = strlen(vddk_g.libdir);
            if (len >= 6 && strcmp(vddk_g.libdir + len - 6, "/lib64") == 0)
                vddk_g.libdir[len - 6] = '\0';
        } else {
            vddk_g.libdir[0] = '\0';
        }
        return 0;
    }
    if (last[0])
        return vddk_fail(err, last_errno, "cannot load libvixDiskLib: %s", last);
    if (libpath)
        return vddk_fail(err, ENOENT, "cannot load libvixDiskLib: no libvixDiskLib.so{.8,.7,.6,} "
                         "in %s or %s/lib64", libpath, libpath);
    return vddk_fail(err, ENOENT,
                     "cannot load libvixDiskLib: not found in %s, %s or %s (pass its path)",
                     default_dirs[0], default_dirs[1], default_dirs[2]);
}

static int resolve_symbols(char *err)
{
    memset(&vddk_g.fn, 0, sizeof vddk_g.fn);
#define RESOLVE_REQUIRED(name, ret, args)                                                     \
    if (!(*(void **)&vddk_g.fn.name = dlsym(vddk_g.dl, "VixDiskLib_" #name)))                 \
        return vddk_fail(err, ELIBBAD,                                                        \
                         "%s lacks VixDiskLib_" #name ": VDDK >= 6.5 is required",            \
                         vddk_g.libfile);
    VDDK_REQUIRED_SYMBOLS(RESOLVE_REQUIRED)
#undef RESOLVE_REQUIRED
#define RESOLVE_OPTIONAL(name, ret, args)                                                     \
    *(void **)&vddk_g.fn.name = dlsym(vddk_g.dl, "VixDiskLib_" #name);
    VDDK_OPTIONAL_SYMBOLS(RESOLVE_OPTIONAL)
#undef RESOLVE_OPTIONAL
    /* Each optional pair is used whole or not at all. */
    if (!vddk_g.fn.QueryAllocatedBlocks || !vddk_g.fn.FreeBlockList)
        vddk_g.fn.QueryAllocatedBlocks = NULL, vddk_g.fn.FreeBlockList = NULL;
    if (!vddk_g.fn.AllocateConnectParams || !vddk_g.fn.FreeConnectParams)
        vddk_g.fn.AllocateConnectParams = NULL, vddk_g.fn.FreeConnectParams = NULL;
    return 0;
}

/* Called on failure paths too, so it keeps errno. */
static void unload(void)
{
    int saved = errno;
    if (vddk_g.dl)
        dlclose(vddk_g.dl);
    errno = saved;
    vddk_g.dl = NULL;
    memset(&vddk_g.fn, 0, sizeof vddk_g.fn); /* no stale pointers into an unmapped library */
}

/* Is libpath the library already loaded?  (Resolved the way load_library would.) */
static int same_library(const char *libpath)
{
    if (strcmp(libpath, vddk_g.libgiven) == 0)
        return 1;
    size_t n;
    candidates(libpath, cand, MAX_CANDIDATES, &n);
    for (size_t i = 0; i < n; i++) {
        char real[PATH_MAX];
        if (realpath(cand[i], real))
            return strcmp(real, vddk_g.libreal) == 0;
    }
    return 0;
}

int vddk_init_locked(const char *libpath, const char *config_file, char *err)
{
    if (vddk_g.state == VDDK_LIB_EXITED)
        return vddk_fail(err, EINVAL, "VixDiskLib_InitEx: VDDK was already shut down "
                         "(VixDiskLib_Exit) in this process and cannot be initialised again");
    if (vddk_g.state == VDDK_LIB_READY) {
        if (libpath && !same_library(libpath))
            return vddk_fail(err, EINVAL, "VixDiskLib_InitEx: %s is already loaded in this "
                             "process; cannot also load %s", vddk_g.libfile, libpath);
        return 0;
    }
    if (load_library(libpath, err) != 0)
        return -1;
    if (resolve_symbols(err) != 0) {
        unload();
        return -1;
    }
    /* 6.5 is the API level nbdkit and Bareos announce; it covers every call made here. */
    VixError e = vddk_g.fn.InitEx(6, 5, log_info, log_warning, log_panic,
                                  vddk_g.libdir[0] ? vddk_g.libdir : NULL, config_file);
    if (e != VIX_OK) {
        vddk_vix_fail(err, e, "VixDiskLib_InitEx(libDir %s)",
                      vddk_g.libdir[0] ? vddk_g.libdir : "NULL");
        unload();
        return -1;
    }
    vddk_bounded(vddk_g.libgiven, sizeof vddk_g.libgiven, "%s", libpath ? libpath : "");
    vddk_g.state = VDDK_LIB_READY;
    return 0;
}

int vddk_init(const char *libpath, const char *config_file, char *err)
{
    pthread_mutex_lock(&vddk_g.lock);
    int rc = vddk_init_locked(libpath, config_file, err);
    pthread_mutex_unlock(&vddk_g.lock);
    return rc;
}

int vddk_exit(char *err)
{
    pthread_mutex_lock(&vddk_g.lock);
    int rc = 0;
    if (vddk_g.state == VDDK_LIB_READY) {
        if (vddk_g.open_disks > 0) {
            rc = vddk_fail(err, EBUSY, "VixDiskLib_Exit: %u disk(s) still open; close them first",
                           vddk_g.open_disks);
        } else {
            vddk_g.fn.Exit();
            unload();
            vddk_g.state = VDDK_LIB_EXITED;
        }
    }
    pthread_mutex_unlock(&vddk_g.lock);
    return rc;
}
