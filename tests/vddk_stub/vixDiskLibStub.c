/*
 * vixDiskLibStub.c -- a stand-in libvixDiskLib that serves local raw files, for the tests.
 *
 * It exports the VixDiskLib entry points with the real library's names, signatures and struct
 * layouts (vixDiskLibStub.h), so native/vddk_*.c load and drive it through dlopen exactly as
 * they would drive VMware's library.  Built by tests/native/test_vddk.py:
 *     gcc -shared -fPIC -fvisibility=hidden -o <dir>/lib64/libvixDiskLib.so.8 \
 *         vixDiskLibStub.c -lpthread
 * (-DSTUB_VDDK6 for a VDDK 6.5 look-alike, -DSTUB_OMIT_READ for a library lacking Read and
 * ReadAsync).
 *
 * Where the disks are.  A remote connection (serverName set) is mapped to a directory tree:
 *     ConnectEx(vmxSpec "moref=vm-42", snapshotRef "snapshot-7") + Open("[ds1] vm42/disk.vmdk")
 *       -> $VDDK_STUB_ROOT/vm-42/snapshot-7/ds1/vm42/disk.vmdk
 * and with a NULL snapshotRef (restore to the VM's current disks) to .../vm-42/current/....
 * The file holds the disk's bytes raw (whatever its name); capacity = file size / 512.  A local
 * connection (all-zero parameters) opens Open's path as is; it must be absolute.
 *
 * Environment:
 *   VDDK_STUB_ROOT      the directory above (required for remote connections)
 *   VDDK_STUB_LOG       file to which every call appends one line "<Function> key=value ..."
 *                       (GetErrorText/FreeErrorText/FreeInfo are not logged), followed by
 *                       detail lines indented by two spaces ("  Open ok mode=nbd ...",
 *                       "  Read -> 16007" for a failure), and "VIOLATION <Function>: <what>"
 *                       when the caller broke a rule of the API.  User names, passwords and
 *                       cookies are never written: the parameters line names only the
 *                       credential type.
 *   VDDK_STUB_USER, VDDK_STUB_PASSWORD
 *                       when set, ConnectEx refuses other credentials: VIX_E_AUTHENTICATION_FAIL
 *   VDDK_STUB_THUMBPRINT when set, Open of a remote disk fails with VIX_E_FAIL ("Unknown error")
 *                       unless ConnectEx got this thumbprint -- the real library's quirk
 *   VDDK_STUB_MODES     transport modes the stub "supports" for remote connections, colon-
 *                       separated; default "nbdssl:nbd" (no SAN LUN is visible and this is no
 *                       proxy VM, so san and hotadd are not).  Open picks the first mode of the
 *                       ConnectEx list (NULL: "file:san:hotadd:nbd") that is supported; if the
 *                       list named only san/hotadd it falls back to nbdssl like VDDK; otherwise
 *                       Open fails with VIX_E_NOT_SUPPORTED.  Local connections always use
 *                       "file".
 *   VDDK_STUB_FAIL      fault injection, "Func:code[:n],...": Func (e.g. Read) returns code from
 *                       its n-th call on (default the first)
 *   VDDK_STUB_DELAY_US  each Read/Write sleeps this long, widening the window in which a second
 *                       concurrent call on the same handle is caught
 *   VDDK_STUB_LEAK      when set, the stub behaves like a careless library: every error text
 *                       (GetErrorText) ends with the user name and password of the last remote
 *                       ConnectEx/PrepareForAccess/Cleanup parameters, and each ConnectEx and
 *                       failed Open logs them through the warning callback.  The caller must
 *                       keep them out of everything it prints.  (The call log never has them.)
 *
 * Checks on the caller (each a VIOLATION line plus an error code): calls before InitEx
 * (VIX_E_DISK_NOINIT), InitEx twice or with NULL log callbacks, ConnectEx parameters that would
 * crash VDDK (remote without moref/credentials; Cleanup with a vmxSpec, which must be NULL there)
 * or non-zero reserved fields (a layout mistake),
 * Open without a live connection (VIX_E_DISK_INVALID_CONNECTION), Read/Write past the capacity
 * (VIX_E_DISK_OUTOFRANGE), two concurrent calls on one handle (VIX_E_OBJECT_IS_BUSY), use of a
 * closed handle or a double Close (VIX_E_INVALID_HANDLE), Disconnect with handles still open,
 * QueryAllocatedBlocks with a chunk below 128 sectors or an unaligned window
 * (VIX_E_INVALID_ARG), and at Exit anything still open or not freed (handles, connections,
 * block lists, infos, error texts).  Error texts follow the wording of VMware's VIX error
 * reference where known; the codes are the real ones.
 */
#define _GNU_SOURCE
#include "vixDiskLibStub.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------- */
/* Call log and fault injection                                                              */
/* ---------------------------------------------------------------------------------------- */

static void slog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void slog(const char *fmt, ...)
{
    const char *path = getenv("VDDK_STUB_LOG");
    if (!path || !*path)
        return;
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    ssize_t w = write(fd, line, (size_t)n); /* one write per line: O_APPEND keeps lines whole */
    (void)w;
    close(fd);
}

/* Log "<fn> -> <code>" for a failure and hand the code back. */
static VixError failed(const char *fn, VixError e)
{
    slog("  %s -> %" PRIu64, fn, e);
    return e;
}

static VixError violation(const char *fn, VixError e, const char *what)
{
    slog("VIOLATION %s: %s", fn, what);
    return failed(fn, e);
}

static pthread_mutex_t inject_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { char name[32]; unsigned long calls; } inject_calls[64];

/* VDDK_STUB_LEAK: the credentials a careless library would repeat in its texts. */
static pthread_mutex_t leak_lock = PTHREAD_MUTEX_INITIALIZER;
static char leak_text[600];

static void leak_remember(const char *user, const char *secret)
{
    if (!getenv("VDDK_STUB_LEAK"))
        return;
    pthread_mutex_lock(&leak_lock);
    snprintf(leak_text, sizeof leak_text, " [session user=%s password=%s]", user, secret);
    pthread_mutex_unlock(&leak_lock);
}

/* A copy of the leaked credentials text ("" without VDDK_STUB_LEAK or a connection yet). */
static void leak_copy(char *dst, size_t size)
{
    pthread_mutex_lock(&leak_lock);
    snprintf(dst, size, "%s", getenv("VDDK_STUB_LEAK") ? leak_text : "");
    pthread_mutex_unlock(&leak_lock);
}

/* The code VDDK_STUB_FAIL injects into this call of fn, or VIX_OK. */
static VixError injected(const char *fn)
{
    const char *spec = getenv("VDDK_STUB_FAIL");
    if (!spec || !*spec)
        return VIX_OK;
    pthread_mutex_lock(&inject_lock);
    unsigned long calls = 0;
    for (size_t i = 0; i < sizeof inject_calls / sizeof inject_calls[0]; i++) {
        if (!inject_calls[i].name[0])
            snprintf(inject_calls[i].name, sizeof inject_calls[i].name, "%s", fn);
        if (strcmp(inject_calls[i].name, fn) == 0) {
            calls = ++inject_calls[i].calls;
            break;
        }
    }
    pthread_mutex_unlock(&inject_lock);

    size_t fnlen = strlen(fn);
    for (const char *p = spec; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len > fnlen && strncmp(p, fn, fnlen) == 0 && p[fnlen] == ':') {
            char *rest;
            VixError code = strtoull(p + fnlen + 1, &rest, 10);
            unsigned long from = 1;
            if (*rest == ':')
                from = strtoul(rest + 1, NULL, 10);
            if (calls >= from)
                return code;
        }
        p += len + (end ? 1 : 0);
    }
    return VIX_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Library state                                                                             */
/* ---------------------------------------------------------------------------------------- */

#define MAX_CONNS 64
#define MAX_HANDLES 256
#define MAX_LISTS 256

struct stub_conn {
    int remote;
    int read_only;
    char vm[128];       /* moref, without "moref=" */
    char snapshot[128]; /* "current" when none */
    char thumbprint[128];
    char modes[256];    /* the requested transport list */
    unsigned open_handles;
};

struct stub_handle {
    struct stub_conn *conn;
    int fd;
    int writable;
    uint64_t capacity; /* sectors */
    const char *mode;
    char uuid[64];
    atomic_int busy;
};

enum { ST_NEW, ST_READY, ST_EXITED };

static struct {
    pthread_mutex_t lock;
    int state;
    VixDiskLibGenericLogFunc *log, *warn, *panic;
    pthread_t thread;
    int thread_started;
    pthread_cond_t thread_cond;
    struct stub_conn *conns[MAX_CONNS];
    struct stub_handle *handles[MAX_HANDLES];
    VixDiskLibBlockList *lists[MAX_LISTS];
    long infos;
    long texts;
} S = { .lock = PTHREAD_MUTEX_INITIALIZER, .thread_cond = PTHREAD_COND_INITIALIZER };

static int live_conn(struct stub_conn *c)
{
    for (int i = 0; c && i < MAX_CONNS; i++)
        if (S.conns[i] == c)
            return 1;
    return 0;
}

static struct stub_handle *live_handle(void *h)
{
    pthread_mutex_lock(&S.lock);
    struct stub_handle *found = NULL;
    for (int i = 0; h && i < MAX_HANDLES; i++)
        if (S.handles[i] == h)
            found = h;
    pthread_mutex_unlock(&S.lock);
    return found;
}

static int ready(void)
{
    pthread_mutex_lock(&S.lock);
    int r = S.state == ST_READY;
    pthread_mutex_unlock(&S.lock);
    return r;
}

#define REQUIRE_INIT(fn)                                                                      \
    do {                                                                                      \
        if (!ready())                                                                         \
            return violation(fn, VIX_E_DISK_NOINIT, "called before InitEx or after Exit");     \
    } while (0)

static void call_log(VixDiskLibGenericLogFunc *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    f(fmt, ap);
    va_end(ap);
}

/* VDDK's InitEx starts threads that log; so does the stub, to exercise the caller's callbacks
 * from a foreign thread.  It lives until Exit. */
static void *background(void *arg)
{
    (void)arg;
    call_log(S.log, "VixDiskLibStub: background thread %s\n", "running");
    call_log(S.warn, "VDDK_PhoneHome: Get CEIP status failed: %s\n", "no vCenter in a stub");
    pthread_mutex_lock(&S.lock);
    while (S.state == ST_READY)
        pthread_cond_wait(&S.thread_cond, &S.lock);
    pthread_mutex_unlock(&S.lock);
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Init, Exit, error texts                                                                   */
/* ---------------------------------------------------------------------------------------- */

VixError VixDiskLib_InitEx(uint32_t majorVersion, uint32_t minorVersion,
                           VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                           VixDiskLibGenericLogFunc *panic, const char *libDir,
                           const char *configFile)
{
    slog("InitEx major=%u minor=%u libDir=%s configFile=%s", majorVersion, minorVersion,
         libDir ? libDir : "NULL", configFile ? configFile : "NULL");
    VixError e = injected("InitEx");
    if (e)
        return failed("InitEx", e);
    if (!log || !warn || !panic)
        return violation("InitEx", VIX_E_INVALID_ARG,
                         "NULL log callback (VDDK's defaults are not thread-safe)");
    pthread_mutex_lock(&S.lock);
    int state = S.state;
    if (state == ST_NEW) {
        S.state = ST_READY;
        S.log = log;
        S.warn = warn;
        S.panic = panic;
        S.thread_started = pthread_create(&S.thread, NULL, background, NULL) == 0;
    }
    pthread_mutex_unlock(&S.lock);
    if (state != ST_NEW)
        return violation("InitEx", VIX_E_FAIL, "InitEx called more than once in a process");
    return VIX_OK;
}

void VixDiskLib_Exit(void)
{
    slog("Exit");
    pthread_mutex_lock(&S.lock);
    if (S.state != ST_READY) {
        pthread_mutex_unlock(&S.lock);
        slog("VIOLATION Exit: without a successful InitEx, or twice");
        return;
    }
    int conns = 0, handles = 0, lists = 0;
    for (int i = 0; i < MAX_CONNS; i++)
        conns += S.conns[i] != NULL;
    for (int i = 0; i < MAX_HANDLES; i++)
        handles += S.handles[i] != NULL;
    for (int i = 0; i < MAX_LISTS; i++)
        lists += S.lists[i] != NULL;
    long infos = S.infos, texts = S.texts;
    S.state = ST_EXITED;
    pthread_cond_broadcast(&S.thread_cond);
    pthread_mutex_unlock(&S.lock);
    if (S.thread_started)
        pthread_join(S.thread, NULL);
    if (conns || handles)
        slog("VIOLATION Exit: %d connection(s) and %d handle(s) still open", conns, handles);
    if (lists || infos || texts)
        slog("VIOLATION Exit: not freed: %d block list(s), %ld info(s), %ld error text(s)", lists,
             infos, texts);
}

static const struct { VixError code; const char *text; } error_texts[] = {
    {VIX_OK, "The operation was successful"},
    {VIX_E_FAIL, "Unknown error"},
    {VIX_E_OUT_OF_MEMORY, "Memory allocation failed: out of memory"},
    {VIX_E_INVALID_ARG, "One of the parameters was invalid"},
    {VIX_E_FILE_NOT_FOUND, "A file was not found"},
    {VIX_E_OBJECT_IS_BUSY,
     "This function cannot be performed because the handle is executing another function"},
    {VIX_E_NOT_SUPPORTED, "The operation is not supported"},
    {VIX_E_FILE_ERROR, "A file access error occurred on the host or guest operating system"},
    {VIX_E_FILE_READ_ONLY, "The file is write-protected"},
    {VIX_E_FILE_ACCESS_ERROR, "You do not have access rights to this file"},
    {VIX_E_FILE_ALREADY_LOCKED, "The file is already in use"},
    {VIX_E_AUTHENTICATION_FAIL, "Authentication failure"},
    {VIX_E_INVALID_HANDLE, "The handle is not a valid VIX object"},
    {VIX_E_HOST_TCP_CONN_LOST, "The network connection to the host was lost"},
    {VIX_E_DISK_NOINIT, "The disk library has not been initialized"},
    {VIX_E_DISK_NOIO, "The disk could not be read or written"},
    {VIX_E_DISK_OUTOFRANGE, "The sector number is out of range for this disk"},
    {VIX_E_DISK_KEY_NOTFOUND, "The metadata key was not found"},
    {VIX_E_DISK_INVALID_CONNECTION, "Invalid connection handle"},
    {VIX_E_DISK_INVALIDDISK, "The file specified is not a virtual disk"},
};

char *VixDiskLib_GetErrorText(VixError err, const char *locale)
{
    (void)locale;
    const char *text = "Unknown error";
    for (size_t i = 0; i < sizeof error_texts / sizeof error_texts[0]; i++)
        if (error_texts[i].code == VIX_ERROR_CODE(err))
            text = error_texts[i].text;
    char leak[sizeof leak_text], *copy = malloc(strlen(text) + sizeof leak);
    leak_copy(leak, sizeof leak);
    if (copy)
        sprintf(copy, "%s%s", text, leak);
    if (copy) {
        pthread_mutex_lock(&S.lock);
        S.texts++;
        pthread_mutex_unlock(&S.lock);
    }
    return copy;
}

void VixDiskLib_FreeErrorText(char *errMsg)
{
    if (!errMsg)
        return;
    pthread_mutex_lock(&S.lock);
    S.texts--;
    pthread_mutex_unlock(&S.lock);
    free(errMsg);
}

/* ---------------------------------------------------------------------------------------- */
/* Connection parameters and the job calls                                                   */
/* ---------------------------------------------------------------------------------------- */

static int modes_valid(const char *modes)
{
    static const char *const known[] = {"file", "san", "hotadd", "nbd", "nbdssl"};
    char buf[256];
    if (strlen(modes) >= sizeof buf)
        return 0;
    snprintf(buf, sizeof buf, "%s", modes);
    char *save = NULL;
    int any = 0;
    for (char *m = strtok_r(buf, ":", &save); m; m = strtok_r(NULL, ":", &save)) {
        int ok = 0;
        for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
            ok |= strcmp(m, known[i]) == 0;
        if (!ok)
            return 0;
        any = 1;
    }
    return any;
}

/* Validate p as VDDK would need it, and log its non-secret fields under fn.  with_vm: 1 if a
 * remote connection needs vmxSpec "moref=...", 0 if vmxSpec must be NULL (Cleanup).  Returns
 * VIX_OK or the error (already logged). */
static VixError check_params(const char *fn, const VixDiskLibConnectParams *p, int with_vm,
                             int *remote)
{
    if (!p)
        return violation(fn, VIX_E_INVALID_ARG, "NULL connection parameters");
    const char *cred = p->credType == VIXDISKLIB_CRED_UID         ? "uid"
                       : p->credType == VIXDISKLIB_CRED_SESSIONID ? "sessionid"
                       : p->credType == 0                          ? "none"
                                                                   : "other";
    slog("  %s params vmxSpec=%s server=%s port=%u nfcPort=%u thumbprint=%s credType=%s", fn,
         p->vmxSpec ? p->vmxSpec : "NULL", p->serverName ? p->serverName : "NULL", p->port,
         p->nfcHostPort, p->thumbPrint ? p->thumbPrint : "NULL", cred);
    static const char zero[8];
    if (p->reserved1 || p->reserved3 || memcmp(p->reserved4, zero, 8) || p->reserved5 ||
        p->specType != VIXDISKLIB_SPEC_VMX)
        return violation(fn, VIX_E_INVALID_ARG,
                         "reserved fields or specType not zero (struct layout mismatch?)");
    *remote = p->serverName != NULL;
    if (!*remote) {
        if (p->vmxSpec || p->credType)
            return violation(fn, VIX_E_INVALID_ARG, "local connection with vmxSpec or credentials");
        return VIX_OK;
    }
    if (with_vm && (!p->vmxSpec || strncmp(p->vmxSpec, "moref=", 6) != 0 || !p->vmxSpec[6]))
        return violation(fn, VIX_E_INVALID_ARG, "remote connection without vmxSpec \"moref=...\"");
    if (!with_vm && p->vmxSpec)
        return violation(fn, VIX_E_INVALID_ARG, "vmxSpec should be NULL");
    const char *user, *secret;
    if (p->credType == VIXDISKLIB_CRED_UID) {
        user = p->creds.uid.userName;
        secret = p->creds.uid.password;
    } else if (p->credType == VIXDISKLIB_CRED_SESSIONID) {
        if (!p->creds.sessionId.cookie)
            return violation(fn, VIX_E_INVALID_ARG, "SESSIONID credentials without a cookie");
        user = p->creds.sessionId.userName;
        secret = p->creds.sessionId.key;
    } else {
        return violation(fn, VIX_E_INVALID_ARG,
                         "remote connection without UID/SESSIONID credentials");
    }
    if (!user || !secret)
        return violation(fn, VIX_E_INVALID_ARG, "NULL user name or password (VDDK would crash)");
    leak_remember(user, secret);
    const char *want_user = getenv("VDDK_STUB_USER");
    const char *want_pass = getenv("VDDK_STUB_PASSWORD");
    if ((want_user && strcmp(want_user, user) != 0) ||
        (want_pass && strcmp(want_pass, secret) != 0))
        return failed(fn, VIX_E_AUTHENTICATION_FAIL);
    return VIX_OK;
}

VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *connectParams, Bool readOnly,
                              const char *snapshotRef, const char *transportModes,
                              VixDiskLibConnection *connection)
{
    slog("ConnectEx readOnly=%d snapshot=%s transports=%s", readOnly,
         snapshotRef ? snapshotRef : "NULL", transportModes ? transportModes : "NULL");
    REQUIRE_INIT("ConnectEx");
    if (!connection)
        return violation("ConnectEx", VIX_E_INVALID_ARG, "NULL connection out pointer");
    int remote = 0;
    VixError e = check_params("ConnectEx", connectParams, 1, &remote);
    if (e)
        return e;
    char leak[sizeof leak_text];
    leak_copy(leak, sizeof leak);
    if (remote && leak[0])
        call_log(S.warn, "VixDiskLibStub: connecting to %s%s\n", connectParams->serverName, leak);
    if (transportModes && !modes_valid(transportModes))
        return violation("ConnectEx", VIX_E_INVALID_ARG, "unknown transport mode");
    if (snapshotRef && !remote)
        return violation("ConnectEx", VIX_E_INVALID_ARG, "snapshotRef without a vmxSpec");
    if ((e = injected("ConnectEx")))
        return failed("ConnectEx", e);

    struct stub_conn *c = calloc(1, sizeof *c);
    if (!c)
        return failed("ConnectEx", VIX_E_OUT_OF_MEMORY);
    c->remote = remote;
    c->read_only = readOnly != 0;
    if (remote) {
        snprintf(c->vm, sizeof c->vm, "%s", connectParams->vmxSpec + 6);
        snprintf(c->thumbprint, sizeof c->thumbprint, "%s",
                 connectParams->thumbPrint ? connectParams->thumbPrint : "");
    }
    snprintf(c->snapshot, sizeof c->snapshot, "%s", snapshotRef ? snapshotRef : "current");
    snprintf(c->modes, sizeof c->modes, "%s",
             transportModes ? transportModes : "file:san:hotadd:nbd"); /* VDDK's default */

    pthread_mutex_lock(&S.lock);
    int slot = -1;
    for (int i = 0; i < MAX_CONNS && slot < 0; i++)
        if (!S.conns[i])
            slot = i;
    if (slot >= 0)
        S.conns[slot] = c;
    pthread_mutex_unlock(&S.lock);
    if (slot < 0) {
        free(c);
        return failed("ConnectEx", VIX_E_OUT_OF_MEMORY);
    }
    *connection = c;
    return VIX_OK;
}

VixError VixDiskLib_Disconnect(VixDiskLibConnection connection)
{
    slog("Disconnect");
    REQUIRE_INIT("Disconnect");
    pthread_mutex_lock(&S.lock);
    struct stub_conn *c = connection;
    int live = live_conn(c);
    unsigned open = live ? c->open_handles : 0;
    if (live && !open)
        for (int i = 0; i < MAX_CONNS; i++)
            if (S.conns[i] == c)
                S.conns[i] = NULL;
    pthread_mutex_unlock(&S.lock);
    if (!live)
        return violation("Disconnect", VIX_E_DISK_INVALID_CONNECTION,
                         "not a live connection (double Disconnect?)");
    if (open)
        return violation("Disconnect", VIX_E_OBJECT_IS_BUSY,
                         "handles still open on the connection");
    free(c);
    return VIX_OK;
}

VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *connectParams, uint32_t *numCleanedUp,
                            uint32_t *numRemaining)
{
    slog("Cleanup");
    REQUIRE_INIT("Cleanup");
    int remote;
    VixError e = check_params("Cleanup", connectParams, 0, &remote);
    if (!e)
        e = injected("Cleanup");
    if (e)
        return failed("Cleanup", e);
    if (numCleanedUp)
        *numCleanedUp = 0;
    if (numRemaining)
        *numRemaining = 0;
    return VIX_OK;
}

static VixError access_call(const char *fn, const VixDiskLibConnectParams *p, const char *identity)
{
    slog("%s identity=%s", fn, identity ? identity : "NULL");
    REQUIRE_INIT(fn);
    int remote = 0;
    VixError e = check_params(fn, p, 1, &remote);
    if (e)
        return e;
    if (!remote)
        return violation(fn, VIX_E_INVALID_ARG, "needs a vCenter connection and a VM");
    if (!identity || !*identity || strlen(identity) > 50)
        return violation(fn, VIX_E_INVALID_ARG, "identity must be 1 to 50 characters");
    if ((e = injected(fn)))
        return failed(fn, e);
    return VIX_OK;
}

VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *connectParams,
                                     const char *identity)
{
    return access_call("PrepareForAccess", connectParams, identity);
}

VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *connectParams, const char *identity)
{
    return access_call("EndAccess", connectParams, identity);
}

#ifndef STUB_VDDK6
VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void)
{
    slog("AllocateConnectParams");
    return calloc(1, sizeof(VixDiskLibConnectParams));
}
#endif

void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *connectParams)
{
    slog("FreeConnectParams");
    free(connectParams); /* the member strings belong to the caller */
}

const char *VixDiskLib_ListTransportModes(void)
{
    return "file:nbdssl:nbd";
}

/* ---------------------------------------------------------------------------------------- */
/* Open, Close, GetInfo, GetTransportMode                                                    */
/* ---------------------------------------------------------------------------------------- */

static const char *const all_modes[] = {"file", "san", "hotadd", "nbd", "nbdssl"};

static const char *static_mode(const char *m)
{
    for (size_t i = 0; i < sizeof all_modes / sizeof all_modes[0]; i++)
        if (strcmp(m, all_modes[i]) == 0)
            return all_modes[i];
    return NULL;
}

static int mode_listed(const char *list, const char *m)
{
    size_t len = strlen(m);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ':');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == len && strncmp(p, m, n) == 0)
            return 1;
        p += n + (end ? 1 : 0);
    }
    return 0;
}

/* The mode Open uses for a connection, or NULL if none of the requested ones works. */
static const char *pick_mode(const struct stub_conn *c)
{
    if (!c->remote)
        return "file";
    const char *supported = getenv("VDDK_STUB_MODES");
    if (!supported || !*supported)
        supported = "nbdssl:nbd";
    char buf[256];
    snprintf(buf, sizeof buf, "%s", c->modes);
    int only_advanced = 1;
    char *save = NULL;
    for (char *m = strtok_r(buf, ":", &save); m; m = strtok_r(NULL, ":", &save)) {
        if (strcmp(m, "file") != 0 && mode_listed(supported, m))
            return static_mode(m);
        only_advanced &= strcmp(m, "san") == 0 || strcmp(m, "hotadd") == 0;
    }
    return only_advanced ? "nbdssl" : NULL;
}

/* "[ds] rel/path" under $VDDK_STUB_ROOT/<vm>/<snapshot>/ds/rel/path; no "..". */
static VixError map_path(const struct stub_conn *c, const char *path, char *out, size_t len)
{
    if (!c->remote) {
        if (path[0] != '/')
            return VIX_E_INVALID_ARG;
        snprintf(out, len, "%s", path);
        return VIX_OK;
    }
    const char *root = getenv("VDDK_STUB_ROOT");
    const char *close = strchr(path, ']');
    if (!root || path[0] != '[' || !close || close == path + 1 || strstr(path, ".."))
        return VIX_E_INVALID_ARG;
    const char *rel = close + 1;
    while (*rel == ' ')
        rel++;
    if (!*rel)
        return VIX_E_INVALID_ARG;
    int n = snprintf(out, len, "%s/%s/%s/%.*s/%s", root, c->vm, c->snapshot,
                     (int)(close - path - 1), path + 1, rel);
    return n > 0 && (size_t)n < len ? VIX_OK : VIX_E_INVALID_ARG;
}

VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path, uint32_t flags,
                         VixDiskLibHandle *diskHandle)
{
    slog("Open path=%s flags=%u", path ? path : "NULL", flags);
    REQUIRE_INIT("Open");
    pthread_mutex_lock(&S.lock);
    int live = live_conn(connection);
    pthread_mutex_unlock(&S.lock);
    if (!live)
        return violation("Open", VIX_E_DISK_INVALID_CONNECTION,
                         "no live connection (Open before ConnectEx?)");
    if (!path || !diskHandle)
        return violation("Open", VIX_E_INVALID_ARG, "NULL path or handle out pointer");
    const uint32_t known = VIXDISKLIB_FLAG_OPEN_UNBUFFERED | VIXDISKLIB_FLAG_OPEN_SINGLE_LINK |
                           VIXDISKLIB_FLAG_OPEN_READ_ONLY | VIXDISKLIB_FLAG_OPEN_COMPRESSION_ZLIB |
                           VIXDISKLIB_FLAG_OPEN_COMPRESSION_FASTLZ |
                           VIXDISKLIB_FLAG_OPEN_COMPRESSION_SKIPZ;
    if (flags & ~known)
        return violation("Open", VIX_E_INVALID_ARG, "unknown open flags");
    struct stub_conn *c = connection;
    VixError e = injected("Open");
    if (e)
        return failed("Open", e);

    char file[PATH_MAX];
    if ((e = map_path(c, path, file, sizeof file)))
        return failed("Open", e);
    const char *want = getenv("VDDK_STUB_THUMBPRINT");
    if (c->remote && want && strcmp(want, c->thumbprint) != 0)
        return failed("Open", VIX_E_FAIL); /* what a thumbprint mismatch looks like */
    const char *mode = pick_mode(c);
    if (!mode)
        return failed("Open", VIX_E_NOT_SUPPORTED);

    int writable = !c->read_only && !(flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY);
    int fd = open(file, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) {
        int saved = errno;
        char leak[sizeof leak_text];
        leak_copy(leak, sizeof leak);
        if (leak[0])
            call_log(S.warn, "VixDiskLibStub: cannot open %s%s\n", path, leak);
        errno = saved;
    }
    if (fd < 0)
        return failed("Open", errno == ENOENT || errno == ENOTDIR ? VIX_E_FILE_NOT_FOUND
                              : errno == EACCES                  ? VIX_E_FILE_ACCESS_ERROR
                                                                 : VIX_E_FILE_ERROR);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size % VIXDISKLIB_SECTOR_SIZE) {
        close(fd);
        return failed("Open", VIX_E_DISK_INVALIDDISK);
    }
    if (writable && flock(fd, LOCK_EX | LOCK_NB) != 0) {
        close(fd);
        return failed("Open", VIX_E_FILE_ALREADY_LOCKED);
    }

    struct stub_handle *h = calloc(1, sizeof *h);
    if (!h) {
        close(fd);
        return failed("Open", VIX_E_OUT_OF_MEMORY);
    }
    h->conn = c;
    h->fd = fd;
    h->writable = writable;
    h->capacity = (uint64_t)st.st_size / VIXDISKLIB_SECTOR_SIZE;
    h->mode = mode;
    snprintf(h->uuid, sizeof h->uuid, "60 00 c2 9b %02x %02x %02x %02x-00 00 00 00 00 00 00 01",
             (unsigned)(st.st_ino & 0xff), (unsigned)(st.st_ino >> 8 & 0xff),
             (unsigned)(st.st_ino >> 16 & 0xff), (unsigned)(st.st_ino >> 24 & 0xff));

    pthread_mutex_lock(&S.lock);
    int slot = -1;
    for (int i = 0; i < MAX_HANDLES && slot < 0; i++)
        if (!S.handles[i])
            slot = i;
    if (slot >= 0) {
        S.handles[slot] = h;
        c->open_handles++;
    }
    pthread_mutex_unlock(&S.lock);
    if (slot < 0) {
        close(fd);
        free(h);
        return failed("Open", VIX_E_OUT_OF_MEMORY);
    }
    slog("  Open ok mode=%s writable=%d capacity=%" PRIu64, mode, writable, h->capacity);
    *diskHandle = h;
    return VIX_OK;
}

VixError VixDiskLib_Close(VixDiskLibHandle diskHandle)
{
    slog("Close");
    REQUIRE_INIT("Close");
    pthread_mutex_lock(&S.lock);
    struct stub_handle *h = NULL;
    for (int i = 0; diskHandle && i < MAX_HANDLES; i++)
        if (S.handles[i] == diskHandle) {
            h = S.handles[i];
            S.handles[i] = NULL;
        }
    if (h)
        h->conn->open_handles--;
    pthread_mutex_unlock(&S.lock);
    if (!h)
        return violation("Close", VIX_E_INVALID_HANDLE, "not an open handle (double Close?)");
    if (atomic_load(&h->busy))
        slog("VIOLATION Close: handle closed while a call on it is in progress");
    close(h->fd);
    free(h);
    return VIX_OK;
}

VixError VixDiskLib_GetInfo(VixDiskLibHandle diskHandle, VixDiskLibInfo **info)
{
    slog("GetInfo");
    REQUIRE_INIT("GetInfo");
    struct stub_handle *h = live_handle(diskHandle);
    if (!h)
        return violation("GetInfo", VIX_E_INVALID_HANDLE, "not an open handle");
    if (!info)
        return violation("GetInfo", VIX_E_INVALID_ARG, "NULL info out pointer");
    VixDiskLibInfo *i = calloc(1, sizeof *i); /* exactly the layout's size */
    if (!i)
        return failed("GetInfo", VIX_E_OUT_OF_MEMORY);
    i->capacity = h->capacity;
    i->adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
    i->numLinks = 1;
    i->biosGeo = (VixDiskLibGeometry){(uint32_t)(h->capacity / (255 * 63)), 255, 63};
    i->physGeo = i->biosGeo;
    i->uuid = strdup(h->uuid);
#ifndef STUB_VDDK6
    i->logicalSectorSize = 512;
    i->physicalSectorSize = 4096;
#endif
    pthread_mutex_lock(&S.lock);
    S.infos++;
    pthread_mutex_unlock(&S.lock);
    *info = i;
    return VIX_OK;
}

void VixDiskLib_FreeInfo(VixDiskLibInfo *info)
{
    if (!info)
        return;
    pthread_mutex_lock(&S.lock);
    S.infos--;
    pthread_mutex_unlock(&S.lock);
    free(info->uuid);
    free(info->parentFileNameHint);
    free(info);
}

const char *VixDiskLib_GetTransportMode(VixDiskLibHandle diskHandle)
{
    struct stub_handle *h = live_handle(diskHandle);
    slog("GetTransportMode -> %s", h ? h->mode : "NULL");
    if (!h)
        slog("VIOLATION GetTransportMode: not an open handle");
    return h ? h->mode : NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* I/O                                                                                       */
/* ---------------------------------------------------------------------------------------- */

/* Enter a call on h: the handle must be open and idle.  Leave with h_leave. */
static VixError h_enter(const char *fn, VixDiskLibHandle handle, struct stub_handle **out)
{
    if (!ready())
        return violation(fn, VIX_E_DISK_NOINIT, "called before InitEx or after Exit");
    struct stub_handle *h = live_handle(handle);
    if (!h)
        return violation(fn, VIX_E_INVALID_HANDLE, "not an open handle");
    if (atomic_exchange(&h->busy, 1))
        return violation(fn, VIX_E_OBJECT_IS_BUSY, "concurrent calls on one handle");
    *out = h;
    return VIX_OK;
}

static void h_leave(struct stub_handle *h) { atomic_store(&h->busy, 0); }

static void io_delay(void)
{
    const char *d = getenv("VDDK_STUB_DELAY_US");
    if (d && *d)
        usleep((useconds_t)strtoul(d, NULL, 10));
}

static VixError io_check(const char *fn, struct stub_handle *h, uint64_t start, uint64_t n,
                         const void *buf)
{
    if (!buf)
        return violation(fn, VIX_E_INVALID_ARG, "NULL buffer");
    if (start > h->capacity || n > h->capacity - start)
        return violation(fn, VIX_E_DISK_OUTOFRANGE, "sectors past the capacity");
    if (n > SIZE_MAX / VIXDISKLIB_SECTOR_SIZE)
        return violation(fn, VIX_E_INVALID_ARG, "request too large");
    VixError e = injected(fn);
    return e ? failed(fn, e) : VIX_OK;
}

#ifndef STUB_OMIT_READ
VixError VixDiskLib_Read(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                         VixDiskLibSectorType numSectors, uint8_t *readBuffer)
{
    slog("Read start=%" PRIu64 " n=%" PRIu64, startSector, numSectors);
    struct stub_handle *h;
    VixError e = h_enter("Read", diskHandle, &h);
    if (e)
        return e;
    e = io_check("Read", h, startSector, numSectors, readBuffer);
    if (!e) {
        io_delay();
        size_t len = (size_t)numSectors * VIXDISKLIB_SECTOR_SIZE, done = 0;
        off_t off = (off_t)(startSector * VIXDISKLIB_SECTOR_SIZE);
        while (done < len) {
            ssize_t r = pread(h->fd, readBuffer + done, len - done, off + (off_t)done);
            if (r <= 0) {
                e = failed("Read", VIX_E_FILE_ERROR);
                break;
            }
            done += (size_t)r;
        }
    }
    h_leave(h);
    return e;
}
#endif

VixError VixDiskLib_Write(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                          VixDiskLibSectorType numSectors, const uint8_t *writeBuffer)
{
    slog("Write start=%" PRIu64 " n=%" PRIu64, startSector, numSectors);
    struct stub_handle *h;
    VixError e = h_enter("Write", diskHandle, &h);
    if (e)
        return e;
    if (!h->writable)
        e = failed("Write", VIX_E_FILE_READ_ONLY);
    else
        e = io_check("Write", h, startSector, numSectors, writeBuffer);
    if (!e) {
        io_delay();
        size_t len = (size_t)numSectors * VIXDISKLIB_SECTOR_SIZE, done = 0;
        off_t off = (off_t)(startSector * VIXDISKLIB_SECTOR_SIZE);
        while (done < len) {
            ssize_t w = pwrite(h->fd, writeBuffer + done, len - done, off + (off_t)done);
            if (w <= 0) {
                e = failed("Write", errno == ENOSPC ? 8 /* VIX_E_DISK_FULL */ : VIX_E_FILE_ERROR);
                break;
            }
            done += (size_t)w;
        }
    }
    h_leave(h);
    return e;
}

/* The async forms complete at once, then report VIX_ASYNC, as VDDK's "queued" answer. */
#ifndef STUB_OMIT_READ
VixError VixDiskLib_ReadAsync(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                              VixDiskLibSectorType numSectors, uint8_t *readBuffer,
                              VixDiskLibCompletionCB callback, void *cbData)
{
    VixError e = VixDiskLib_Read(diskHandle, startSector, numSectors, readBuffer);
    if (callback)
        callback(cbData, e);
    return VIX_ASYNC;
}
#endif

VixError VixDiskLib_WriteAsync(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                               VixDiskLibSectorType numSectors, const uint8_t *writeBuffer,
                               VixDiskLibCompletionCB callback, void *cbData)
{
    VixError e = VixDiskLib_Write(diskHandle, startSector, numSectors, writeBuffer);
    if (callback)
        callback(cbData, e);
    return VIX_ASYNC;
}

VixError VixDiskLib_Wait(VixDiskLibHandle diskHandle)
{
    return live_handle(diskHandle) ? VIX_OK : VIX_E_INVALID_HANDLE;
}

VixError VixDiskLib_Flush(VixDiskLibHandle diskHandle)
{
    slog("Flush");
    struct stub_handle *h;
    VixError e = h_enter("Flush", diskHandle, &h);
    if (e)
        return e;
    if (h->writable && fdatasync(h->fd) != 0)
        e = failed("Flush", VIX_E_FILE_ERROR);
    h_leave(h);
    return e;
}

/* ---------------------------------------------------------------------------------------- */
/* QueryAllocatedBlocks                                                                      */
/* ---------------------------------------------------------------------------------------- */

#ifndef STUB_VDDK6
/* Append chunks [c0, c1) (in chunk units) to the list, merging with the last block. */
static int add_chunks(VixDiskLibBlockList **bl, uint32_t *cap, uint64_t c0, uint64_t c1,
                      uint64_t chunk)
{
    VixDiskLibBlockList *l = *bl;
    if (l->numBlocks > 0) {
        VixDiskLibBlock *last = &l->blocks[l->numBlocks - 1];
        if (last->offset + last->length >= c0 * chunk) {
            uint64_t end = c1 * chunk;
            if (end > last->offset + last->length)
                last->length = end - last->offset;
            return 0;
        }
    }
    if (l->numBlocks == *cap) {
        uint32_t ncap = *cap * 2;
        l = realloc(l, 8 + 16 * (size_t)ncap);
        if (!l)
            return -1;
        *bl = l;
        *cap = ncap;
    }
    l->blocks[l->numBlocks++] = (VixDiskLibBlock){c0 * chunk, (c1 - c0) * chunk};
    return 0;
}

VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle diskHandle,
                                         VixDiskLibSectorType startSector,
                                         VixDiskLibSectorType numSectors,
                                         VixDiskLibSectorType chunkSize,
                                         VixDiskLibBlockList **blockList)
{
    slog("QueryAllocatedBlocks start=%" PRIu64 " n=%" PRIu64 " chunk=%" PRIu64, startSector,
         numSectors, chunkSize);
    struct stub_handle *h;
    VixError e = h_enter("QueryAllocatedBlocks", diskHandle, &h);
    if (e)
        return e;
    const char *fn = "QueryAllocatedBlocks";
    if (!blockList)
        e = violation(fn, VIX_E_INVALID_ARG, "NULL block list out pointer");
    else if (chunkSize < VIXDISKLIB_MIN_CHUNK_SIZE)
        e = violation(fn, VIX_E_INVALID_ARG, "chunk size below VIXDISKLIB_MIN_CHUNK_SIZE");
    else if (numSectors == 0 || startSector % chunkSize || numSectors % chunkSize)
        e = violation(fn, VIX_E_INVALID_ARG, "window not a whole number of aligned chunks");
    else if (numSectors / chunkSize > VIXDISKLIB_MAX_CHUNK_NUMBER)
        e = violation(fn, VIX_E_INVALID_ARG, "more than VIXDISKLIB_MAX_CHUNK_NUMBER chunks");
    else if (startSector > h->capacity || numSectors > h->capacity - startSector)
        e = violation(fn, VIX_E_INVALID_ARG, "window past the capacity");
    else if ((e = injected(fn)))
        e = failed(fn, e);
    if (e) {
        h_leave(h);
        return e;
    }

    uint32_t cap = 16;
    VixDiskLibBlockList *l = malloc(8 + 16 * (size_t)cap);
    if (!l) {
        h_leave(h);
        return failed(fn, VIX_E_OUT_OF_MEMORY);
    }
    l->numBlocks = 0;
    const uint64_t cbytes = chunkSize * VIXDISKLIB_SECTOR_SIZE;
    off_t pos = (off_t)(startSector * VIXDISKLIB_SECTOR_SIZE);
    const off_t end = (off_t)((startSector + numSectors) * VIXDISKLIB_SECTOR_SIZE);
    while (pos < end) {
        off_t data = lseek(h->fd, pos, SEEK_DATA);
        if (data < 0 || data >= end)
            break; /* ENXIO: only a hole is left */
        off_t hole = lseek(h->fd, data, SEEK_HOLE);
        if (hole < 0 || hole > end)
            hole = end;
        uint64_t c0 = (uint64_t)data / cbytes, c1 = ((uint64_t)hole + cbytes - 1) / cbytes;
        if (add_chunks(&l, &cap, c0, c1, chunkSize) != 0) {
            free(l);
            h_leave(h);
            return failed(fn, VIX_E_OUT_OF_MEMORY);
        }
        pos = hole;
    }
    h_leave(h);

    pthread_mutex_lock(&S.lock);
    int slot = -1;
    for (int i = 0; i < MAX_LISTS && slot < 0; i++)
        if (!S.lists[i])
            slot = i;
    if (slot >= 0)
        S.lists[slot] = l;
    pthread_mutex_unlock(&S.lock);
    if (slot < 0) {
        free(l);
        return violation(fn, VIX_E_OUT_OF_MEMORY, "too many block lists not freed");
    }
    slog("  QueryAllocatedBlocks ok blocks=%u", l->numBlocks);
    *blockList = l;
    return VIX_OK;
}

VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList)
{
    slog("FreeBlockList");
    pthread_mutex_lock(&S.lock);
    int found = 0;
    for (int i = 0; blockList && i < MAX_LISTS; i++)
        if (S.lists[i] == blockList) {
            S.lists[i] = NULL;
            found = 1;
        }
    pthread_mutex_unlock(&S.lock);
    if (!found)
        return violation("FreeBlockList", VIX_E_INVALID_ARG,
                         "not a block list from QueryAllocatedBlocks");
    free(blockList);
    return VIX_OK;
}
#endif /* STUB_VDDK6 */

/* ---------------------------------------------------------------------------------------- */
/* The rest of the ABI: present for symbol parity, minimal behaviour                         */
/* ---------------------------------------------------------------------------------------- */

VixError VixDiskLib_Create(const VixDiskLibConnection connection, const char *path,
                           const VixDiskLibCreateParams *createParams,
                           VixDiskLibProgressFunc *progressFunc, void *progressData)
{
    (void)connection, (void)path, (void)createParams, (void)progressFunc, (void)progressData;
    slog("Create");
    return failed("Create", VIX_E_NOT_SUPPORTED);
}

VixError VixDiskLib_ReadMetadata(VixDiskLibHandle diskHandle, const char *key, char *buf,
                                 size_t bufLen, size_t *requiredLen)
{
    (void)buf, (void)bufLen, (void)requiredLen;
    slog("ReadMetadata key=%s", key ? key : "NULL");
    if (!live_handle(diskHandle))
        return violation("ReadMetadata", VIX_E_INVALID_HANDLE, "not an open handle");
    return failed("ReadMetadata", VIX_E_DISK_KEY_NOTFOUND);
}

VixError VixDiskLib_WriteMetadata(VixDiskLibHandle diskHandle, const char *key, const char *val)
{
    (void)key, (void)val;
    slog("WriteMetadata");
    if (!live_handle(diskHandle))
        return violation("WriteMetadata", VIX_E_INVALID_HANDLE, "not an open handle");
    return failed("WriteMetadata", VIX_E_NOT_SUPPORTED);
}

VixError VixDiskLib_GetMetadataKeys(VixDiskLibHandle diskHandle, char *keys, size_t maxLen,
                                    size_t *requiredLen)
{
    slog("GetMetadataKeys");
    if (!live_handle(diskHandle))
        return violation("GetMetadataKeys", VIX_E_INVALID_HANDLE, "not an open handle");
    if (requiredLen)
        *requiredLen = 1; /* an empty, double-NUL-terminated list */
    if (!keys || maxLen < 1)
        return 24; /* VIX_E_BUFFER_TOOSMALL */
    keys[0] = '\0';
    return VIX_OK;
}
