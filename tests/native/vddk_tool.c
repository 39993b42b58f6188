/*
 * vddk_tool.c -- a command-line driver of native/vddk_*.c (vddk.h), for the tests.
 *
 * It runs one job the way the engine will: [PrepareForAccess] -> open -> one command -> close
 * -> Cleanup -> [EndAccess] -> Exit, and prints the result as one JSON object on stdout.  On
 * failure it prints "vddk_tool: <message> (vddk_errcode=N, errno=E)" on stderr and exits with 1
 * (2 for bad usage).  VDDK's log callbacks are printed on stderr as "vddk-log <level>: <msg>".
 *
 *   vddk_tool [options] info
 *   vddk_tool [options] extents [OFFSET LENGTH]
 *   vddk_tool [options] dump OUT          allocated extents (all with --all) into raw file OUT
 *   vddk_tool [options] read OFFSET LENGTH OUT   one vddk_read of any range into OUT
 *   vddk_tool [options] restore IN        IN's data extents onto the disk (--zero-holes: also
 *                                         zeros over IN's holes); opens the disk writable
 *   vddk_tool [options] write OFFSET IN   one vddk_write of IN's bytes; opens it writable
 *
 * Options: --lib PATH --config FILE --server HOST --port N --thumbprint T --user U --vm MOREF
 * --snapshot MOREF --transports MODES --disk PATH --identity ID --handles N --threads N
 * --io-sectors N --chunk N --single-link --all --zero-holes.  The password is taken from the
 * environment variable VDDK_TOOL_PASSWORD (and a session cookie from VDDK_TOOL_COOKIE), never
 * from the command line, where ps(1) would show it.
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -Inative tests/native/vddk_tool.c \
 *            native/vddk_library.c native/vddk_access.c native/vddk_disk.c native/vddk_extents.c \
 *            -o vddk_tool -ldl -lpthread
 */
#define _GNU_SOURCE
#include "vddk.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PIECE (8u << 20) /* bytes per vddk_read/vddk_write request */

static struct {
    vddk_conn conn;
    vddk_disk_opts opts;
    const char *identity;
    unsigned threads;
    int all, zero_holes;
} cfg;

static char first_err[VDDK_ERRLEN];
static uint64_t first_code;
static int first_errno;

/* Remember the first failure of the job (with vddk_errcode() and errno, so call it right after
 * the failing call); later ones (during teardown) are only printed. */
static void record(const char *err)
{
    int errnum = errno;
    if (!first_err[0]) {
        snprintf(first_err, sizeof first_err, "%s", err);
        first_code = vddk_errcode();
        first_errno = errnum;
    } else {
        fprintf(stderr, "vddk_tool: also: %s\n", err);
    }
}

static void tool_log(int level, const char *msg, void *ud)
{
    (void)ud;
    static const char *const names[] = {"info", "warning", "panic"};
    fprintf(stderr, "vddk-log %s: %s\n", names[level < 0 || level > 2 ? 0 : level], msg);
}

static void usage(void)
{
    fprintf(stderr, "usage: vddk_tool [options] info|extents|dump|read|restore|write ...\n");
    exit(2);
}

static uint64_t num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || !*s)
        usage();
    return v;
}

static void json_info(const vddk_disk *d)
{
    const vddk_info *i = vddk_disk_info(d);
    printf("\"capacity\": %" PRIu64 ", \"capacity_sectors\": %" PRIu64 ", \"transport\": \"%s\", "
           "\"lib_major\": %d, \"handles\": %u, \"logical_sector_size\": %u, "
           "\"physical_sector_size\": %u, \"has_allocated_blocks\": %s, \"adapter_type\": %d, "
           "\"num_links\": %d, \"uuid\": \"%s\", \"libfile\": \"%s\"",
           i->capacity, i->capacity_sectors, i->transport, i->lib_major, i->handles,
           i->logical_sector_size, i->physical_sector_size,
           i->has_allocated_blocks ? "true" : "false", i->adapter_type, i->num_links, i->uuid,
           i->libfile);
}

/* ---- dump: extents -> pieces -> threads ------------------------------------------------ */

struct dump_job {
    vddk_disk *d;
    int fd;
    vddk_extent *pieces;
    size_t npieces;
    atomic_size_t next;
    atomic_int failed;
    pthread_mutex_t err_lock;
    char err[VDDK_ERRLEN];
    uint64_t code;
    int errnum;
};

static void *dump_worker(void *arg)
{
    struct dump_job *j = arg;
    uint8_t *buf = malloc(PIECE);
    char err[VDDK_ERRLEN];
    if (!buf) {
        atomic_store(&j->failed, 1);
        return NULL;
    }
    for (;;) {
        size_t k = atomic_fetch_add(&j->next, 1);
        if (k >= j->npieces || atomic_load(&j->failed))
            break;
        vddk_extent p = j->pieces[k];
        const char *msg = NULL;
        if (vddk_read(j->d, p.start, buf, (size_t)p.length, err) != 0)
            msg = err;
        else if (pwrite(j->fd, buf, (size_t)p.length, (off_t)p.start) != (ssize_t)p.length)
            msg = "writing the dump file failed";
        if (msg) {
            int errnum = errno;
            pthread_mutex_lock(&j->err_lock);
            if (!atomic_exchange(&j->failed, 1)) {
                snprintf(j->err, sizeof j->err, "%s", msg);
                j->code = msg == err ? vddk_errcode() : 0;
                j->errnum = errnum;
            }
            pthread_mutex_unlock(&j->err_lock);
            break;
        }
    }
    free(buf);
    return NULL;
}

static int cmd_dump(vddk_disk *d, const char *out)
{
    char err[VDDK_ERRLEN];
    vddk_extent *ext = NULL, whole = {0, vddk_capacity(d)};
    size_t n = 0;
    if (cfg.all) {
        ext = &whole;
        n = whole.length ? 1 : 0;
    } else if (vddk_extents(d, 0, UINT64_MAX, &ext, &n, err) != 0) {
        record(err);
        return -1;
    }
    size_t npieces = 0;
    for (size_t i = 0; i < n; i++)
        npieces += (size_t)((ext[i].length + PIECE - 1) / PIECE);
    struct dump_job j = {.d = d, .npieces = 0, .err_lock = PTHREAD_MUTEX_INITIALIZER};
    j.pieces = calloc(npieces ? npieces : 1, sizeof *j.pieces);
    uint64_t bytes = 0;
    for (size_t i = 0; j.pieces && i < n; i++)
        for (uint64_t off = 0; off < ext[i].length; off += PIECE) {
            uint64_t len = ext[i].length - off < PIECE ? ext[i].length - off : PIECE;
            j.pieces[j.npieces++] = (vddk_extent){ext[i].start + off, len};
            bytes += len;
        }
    if (!cfg.all)
        vddk_free_extents(ext);
    j.fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (!j.pieces || j.fd < 0 || ftruncate(j.fd, (off_t)vddk_capacity(d)) != 0) {
        snprintf(err, sizeof err, "cannot create %s: %s", out, strerror(errno));
        record(err);
        free(j.pieces);
        if (j.fd >= 0)
            close(j.fd);
        return -1;
    }
    unsigned nt = cfg.threads ? cfg.threads : 1;
    pthread_t *t = calloc(nt, sizeof *t);
    unsigned started = 0;
    while (t && started < nt && pthread_create(&t[started], NULL, dump_worker, &j) == 0)
        started++;
    if (started == 0)
        dump_worker(&j);
    for (unsigned i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    free(t);
    free(j.pieces);
    close(j.fd);
    if (atomic_load(&j.failed)) {
        record(j.err[0] ? j.err : "dump failed");
        first_code = j.code; /* the worker's thread saw the VixError and errno, not this one */
        first_errno = j.errnum;
        return -1;
    }
    printf("{\"command\": \"dump\", \"bytes_read\": %" PRIu64 ", ", bytes);
    json_info(d);
    printf("}\n");
    return 0;
}

/* ---- the other commands ---------------------------------------------------------------- */

static int cmd_info(vddk_disk *d)
{
    printf("{\"command\": \"info\", ");
    json_info(d);
    printf("}\n");
    return 0;
}

static int cmd_extents(vddk_disk *d, uint64_t off, uint64_t len)
{
    char err[VDDK_ERRLEN];
    vddk_extent *ext;
    size_t n;
    if (vddk_extents(d, off, len, &ext, &n, err) != 0) {
        record(err);
        return -1;
    }
    printf("{\"command\": \"extents\", \"extents\": [");
    for (size_t i = 0; i < n; i++)
        printf("%s[%" PRIu64 ", %" PRIu64 "]", i ? ", " : "", ext[i].start, ext[i].length);
    printf("], ");
    json_info(d);
    printf("}\n");
    vddk_free_extents(ext);
    return 0;
}

static int cmd_read(vddk_disk *d, uint64_t off, uint64_t len, const char *out)
{
    char err[VDDK_ERRLEN];
    uint8_t *buf = malloc(len ? (size_t)len : 1);
    if (!buf) {
        record("out of memory");
        return -1;
    }
    /* Fill with a pattern so that bytes vddk_read fails to write would show. */
    memset(buf, 0xA5, (size_t)len);
    int rc = vddk_read(d, off, buf, (size_t)len, err);
    if (rc != 0) {
        record(err);
    } else {
        FILE *f = fopen(out, "wb");
        if (!f || fwrite(buf, 1, (size_t)len, f) != len || fclose(f) != 0) {
            record("cannot write the read output file");
            rc = -1;
        } else {
            printf("{\"command\": \"read\", \"bytes\": %" PRIu64 ", ", len);
            json_info(d);
            printf("}\n");
        }
    }
    free(buf);
    return rc;
}

/* Write [off, off + len) of the file fd onto the disk, in PIECE-sized requests. */
static int write_span(vddk_disk *d, int fd, uint64_t off, uint64_t len, uint8_t *buf, int zeros)
{
    char err[VDDK_ERRLEN];
    for (uint64_t done = 0; done < len;) {
        size_t n = len - done < PIECE ? (size_t)(len - done) : PIECE;
        if (zeros) {
            memset(buf, 0, n);
        } else if (pread(fd, buf, n, (off_t)(off + done)) != (ssize_t)n) {
            record("reading the restore input failed");
            return -1;
        }
        if (vddk_write(d, off + done, buf, n, err) != 0) {
            record(err);
            return -1;
        }
        done += n;
    }
    return 0;
}

static int cmd_restore(vddk_disk *d, const char *in)
{
    int fd = open(in, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        record("cannot open the restore input");
        return -1;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size > vddk_capacity(d) || size % VDDK_SECTOR) {
        record("the restore input is larger than the disk or not whole sectors");
        close(fd);
        return -1;
    }
    uint8_t *buf = malloc(PIECE);
    uint64_t written = 0, zeroed = 0, pos = 0;
    int rc = buf ? 0 : -1;
    while (rc == 0 && pos < size) {
        off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
        uint64_t dstart = data < 0 ? size : (uint64_t)data / VDDK_SECTOR * VDDK_SECTOR;
        if (cfg.zero_holes && dstart > pos) {
            rc = write_span(d, fd, pos, dstart - pos, buf, 1);
            zeroed += dstart - pos;
        }
        if (rc != 0 || dstart >= size)
            break;
        off_t hole = lseek(fd, (off_t)dstart, SEEK_HOLE);
        uint64_t dend = hole < 0 ? size
                                 : ((uint64_t)hole + VDDK_SECTOR - 1) / VDDK_SECTOR * VDDK_SECTOR;
        if (dend > size)
            dend = size;
        rc = write_span(d, fd, dstart, dend - dstart, buf, 0);
        written += dend - dstart;
        pos = dend;
    }
    free(buf);
    close(fd);
    if (rc == 0) {
        printf("{\"command\": \"restore\", \"bytes_written\": %" PRIu64
               ", \"bytes_zeroed\": %" PRIu64 ", ", written, zeroed);
        json_info(d);
        printf("}\n");
    }
    return rc;
}

static int cmd_write(vddk_disk *d, uint64_t off, const char *in)
{
    char err[VDDK_ERRLEN];
    int fd = open(in, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        record("cannot open the write input");
        return -1;
    }
    size_t len = (size_t)st.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    int rc = -1;
    if (buf && pread(fd, buf, len, 0) == (ssize_t)len) {
        rc = vddk_write(d, off, buf, len, err);
        if (rc != 0)
            record(err);
    } else {
        record("reading the write input failed");
    }
    free(buf);
    close(fd);
    if (rc == 0)
        printf("{\"command\": \"write\", \"bytes_written\": %zu}\n", len);
    return rc;
}

/* ---- main: one job --------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name, field)                                                                      \
        if (strcmp(o, name) == 0) { if (!v) usage(); field; i++; continue; }
        ARG("--lib", cfg.conn.libpath = v)
        ARG("--config", cfg.conn.config_file = v)
        ARG("--server", cfg.conn.server = v)
        ARG("--port", cfg.conn.port = (uint32_t)num(v))
        ARG("--thumbprint", cfg.conn.thumbprint = v)
        ARG("--user", cfg.conn.user = v)
        ARG("--vm", cfg.conn.vm_moref = v)
        ARG("--snapshot", cfg.conn.snapshot_moref = v)
        ARG("--transports", cfg.conn.transport_modes = v)
        ARG("--disk", cfg.opts.path = v)
        ARG("--identity", cfg.identity = v)
        ARG("--handles", cfg.opts.handles = (unsigned)num(v))
        ARG("--threads", cfg.threads = (unsigned)num(v))
        ARG("--io-sectors", cfg.opts.io_sectors = (uint32_t)num(v))
        ARG("--chunk", cfg.opts.chunk_sectors = (uint32_t)num(v))
#undef ARG
        if (strcmp(o, "--single-link") == 0)
            cfg.opts.single_link = 1;
        else if (strcmp(o, "--all") == 0)
            cfg.all = 1;
        else if (strcmp(o, "--zero-holes") == 0)
            cfg.zero_holes = 1;
        else
            usage();
    }
    if (i >= argc)
        usage();
    const char *cmd = argv[i++];
    int nargs = argc - i;
    char **args = argv + i;
    cfg.conn.password = getenv("VDDK_TOOL_PASSWORD");
    cfg.conn.cookie = getenv("VDDK_TOOL_COOKIE");
    if (!cfg.conn.server)
        cfg.conn.password = cfg.conn.cookie = NULL; /* a local connection takes none */
    cfg.opts.writable = strcmp(cmd, "restore") == 0 || strcmp(cmd, "write") == 0;

    vddk_set_log(tool_log, NULL);
    char err[VDDK_ERRLEN];
    int prepared = 0;
    if (cfg.identity) {
        if (vddk_prepare_access(&cfg.conn, cfg.identity, err) != 0)
            record(err);
        else
            prepared = 1;
    }
    vddk_disk *d = NULL;
    if (!first_err[0]) {
        d = vddk_open(&cfg.conn, &cfg.opts, err);
        if (!d)
            record(err);
    }
    if (d) {
        if (strcmp(cmd, "info") == 0 && nargs == 0)
            cmd_info(d);
        else if (strcmp(cmd, "extents") == 0 && (nargs == 0 || nargs == 2))
            cmd_extents(d, nargs ? num(args[0]) : 0, nargs ? num(args[1]) : UINT64_MAX);
        else if (strcmp(cmd, "dump") == 0 && nargs == 1)
            cmd_dump(d, args[0]);
        else if (strcmp(cmd, "read") == 0 && nargs == 3)
            cmd_read(d, num(args[0]), num(args[1]), args[2]);
        else if (strcmp(cmd, "restore") == 0 && nargs == 1)
            cmd_restore(d, args[0]);
        else if (strcmp(cmd, "write") == 0 && nargs == 2)
            cmd_write(d, num(args[0]), args[1]);
        else
            record("unknown command or wrong number of arguments");
        if (vddk_close(d, err) != 0)
            record(err);
    }
    /* Cleanup "for safety" after Disconnect, as VMware's upgrade notes advise -- also when the
     * Open failed, but not when VDDK never loaded. */
    if ((d || prepared) && vddk_cleanup(&cfg.conn, NULL, NULL, err) != 0)
        record(err);
    if (prepared && vddk_end_access(&cfg.conn, cfg.identity, err) != 0)
        record(err);
    if (vddk_exit(err) != 0)
        record(err);
    if (first_err[0]) {
        fprintf(stderr, "vddk_tool: %s (vddk_errcode=%" PRIu64 ", errno=%d)\n", first_err,
                first_code, first_errno);
        return 1;
    }
    return 0;
}
