/*
 * vmdk_tool: a small command-line driver of native/vmdk.h, built by
 * tests/native/test_vmdk.py (plain and with sanitizers).
 *
 *   vmdk_tool info IMAGE.vmdk
 *       prints {"capacity": N, "create_type": "...", "extents": [[start, length], ...]}
 *   vmdk_tool dump IMAGE.vmdk OUT.raw [--chunk BYTES] [--threads N]
 *       writes the whole virtual disk to OUT.raw (zero chunks become holes);
 *       --chunk sets the read size (odd sizes exercise unaligned reads),
 *       --threads reads with N threads sharing one handle
 *   vmdk_tool create RAW OUT.vmdk [--grain BYTES] [--chunk BYTES]
 *       writes RAW into a new monolithicSparse VMDK of the same capacity
 *
 * Exit status: 0 on success, 2 with the library's message on stderr on a
 * VMDK error, 1 on a usage or local I/O error.
 */
#define _GNU_SOURCE
#include "vmdk.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int usage(void)
{
    fprintf(stderr, "usage: vmdk_tool info IMAGE | dump IMAGE OUT [--chunk N] [--threads N] | "
                    "create RAW OUT [--grain N] [--chunk N]\n");
    return 1;
}

static uint64_t opt_num(int argc, char **argv, int from, const char *name, uint64_t def)
{
    for (int i = from; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0)
            return strtoull(argv[i + 1], NULL, 0);
    return def;
}

static int is_zero(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static int cmd_info(const char *path)
{
    char err[VMDK_ERRLEN];
    vmdk_disk *d = vmdk_open(path, err, sizeof(err));
    if (!d) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    vmdk_range *v = NULL;
    size_t n = 0;
    if (vmdk_extents(d, &v, &n, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        vmdk_close(d);
        return 2;
    }
    printf("{\"capacity\": %" PRIu64 ", \"create_type\": \"", vmdk_capacity(d));
    for (const char *c = vmdk_create_type(d); *c; c++)
        if (*c >= 0x20 && *c != '"' && *c != '\\' && *c < 0x7f)
            putchar(*c);
    printf("\", \"extents\": [");
    for (size_t i = 0; i < n; i++)
        printf("%s[%" PRIu64 ", %" PRIu64 "]", i ? ", " : "", v[i].start, v[i].length);
    printf("]}\n");
    free(v);
    vmdk_close(d);
    return 0;
}

struct dump_job {
    vmdk_disk *d;
    int out;
    uint64_t cap, chunk;
    unsigned idx, nthreads;
    int rc;
    char err[VMDK_ERRLEN];
};

static void *dump_worker(void *arg)
{
    struct dump_job *j = arg;
    unsigned char *buf = malloc(j->chunk);
    if (!buf) {
        snprintf(j->err, sizeof(j->err), "out of memory");
        j->rc = 1;
        return NULL;
    }
    uint64_t k = j->idx;
    for (uint64_t off = k * j->chunk; off < j->cap; k += j->nthreads, off = k * j->chunk) {
        size_t n = j->cap - off < j->chunk ? (size_t)(j->cap - off) : (size_t)j->chunk;
        if (vmdk_read(j->d, buf, n, off, j->err, sizeof(j->err)) != 0) {
            j->rc = 2;
            break;
        }
        if (is_zero(buf, n))
            continue;
        if (pwrite(j->out, buf, n, (off_t)off) != (ssize_t)n) {
            snprintf(j->err, sizeof(j->err), "write failed: %s", strerror(errno));
            j->rc = 1;
            break;
        }
    }
    free(buf);
    return NULL;
}

static int cmd_dump(const char *path, const char *outpath, uint64_t chunk, unsigned nthreads)
{
    char err[VMDK_ERRLEN];
    if (chunk == 0 || chunk > (1u << 30) || nthreads == 0 || nthreads > 64)
        return usage();
    vmdk_disk *d = vmdk_open(path, err, sizeof(err));
    if (!d) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    int out = open(outpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) {
        perror(outpath);
        vmdk_close(d);
        return 1;
    }
    struct dump_job *jobs = calloc(nthreads, sizeof(*jobs));
    pthread_t *tids = calloc(nthreads, sizeof(*tids));
    int rc = 0;
    if (!jobs || !tids) {
        rc = 1;
        goto done;
    }
    for (unsigned i = 0; i < nthreads; i++) {
        jobs[i] = (struct dump_job){.d = d, .out = out, .cap = vmdk_capacity(d),
                                    .chunk = chunk, .idx = i, .nthreads = nthreads};
        if (nthreads == 1)
            dump_worker(&jobs[i]);
        else
            pthread_create(&tids[i], NULL, dump_worker, &jobs[i]);
    }
    for (unsigned i = 0; i < nthreads; i++) {
        if (nthreads > 1)
            pthread_join(tids[i], NULL);
        if (jobs[i].rc && !rc) {
            rc = jobs[i].rc;
            fprintf(stderr, "%s\n", jobs[i].err);
        }
    }
    if (rc == 0 && ftruncate(out, (off_t)vmdk_capacity(d)) != 0) {
        perror("ftruncate");
        rc = 1;
    }
done:
    free(jobs);
    free(tids);
    close(out);
    vmdk_close(d);
    return rc;
}

static int cmd_create(const char *rawpath, const char *outpath, uint64_t grain, uint64_t chunk)
{
    char err[VMDK_ERRLEN];
    if (chunk == 0 || chunk > (1u << 30))
        return usage();
    int in = open(rawpath, O_RDONLY);
    struct stat st;
    if (in < 0 || fstat(in, &st) != 0) {
        perror(rawpath);
        return 1;
    }
    vmdk_writer *w = vmdk_writer_create(outpath, (uint64_t)st.st_size, (uint32_t)grain, 0644, err,
                                        sizeof(err));
    if (!w) {
        fprintf(stderr, "%s\n", err);
        close(in);
        return 2;
    }
    unsigned char *buf = malloc(chunk);
    int rc = buf ? 0 : 1;
    for (uint64_t off = 0; rc == 0 && off < (uint64_t)st.st_size; off += chunk) {
        size_t n = (uint64_t)st.st_size - off < chunk ? (size_t)((uint64_t)st.st_size - off)
                                                      : (size_t)chunk;
        if (pread(in, buf, n, (off_t)off) != (ssize_t)n) {
            perror("read");
            rc = 1;
        } else if (vmdk_writer_write(w, buf, n, off, err, sizeof(err)) != 0) {
            fprintf(stderr, "%s\n", err);
            rc = 2;
        }
    }
    if (rc == 0 && vmdk_writer_finish(w, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        rc = 2;
    }
    free(buf);
    vmdk_writer_close(w);
    close(in);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "info") == 0)
        return cmd_info(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "dump") == 0)
        return cmd_dump(argv[2], argv[3], opt_num(argc, argv, 4, "--chunk", 1 << 20),
                        (unsigned)opt_num(argc, argv, 4, "--threads", 1));
    if (argc >= 4 && strcmp(argv[1], "create") == 0)
        return cmd_create(argv[2], argv[3], opt_num(argc, argv, 4, "--grain", 0),
                          opt_num(argc, argv, 4, "--chunk", 1 << 20));
    return usage();
}
