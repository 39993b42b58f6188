/*
 * libFuzzer harness for native/vmdk.c (reader).
 *
 * Input layout: the first byte picks the mode, the rest is file content.
 *   mode & 1 == 0: the rest is one file, opened as disk.vmdk (sparse,
 *                  stream or descriptor: the reader decides by content);
 *   mode & 1 == 1: the rest is split on the separator "@@@@\n" into a
 *                  descriptor d.vmdk and up to four extent files x0.vmdk ..
 *                  x3.vmdk beside it, and d.vmdk is opened;
 *   mode & 2:      every file is extended with a hole of ((mode >> 2) & 63)
 *                  * 16 KiB, so a small input can stand for a large file
 *                  (large grain tables, directories far into the file) and
 *                  header fields stay a large share of the bytes mutated.
 * Whatever opens is then exercised: capacity, the allocated extents (checked
 * to be sorted, merged and within the capacity), reads at the start and end
 * of extents, and pseudo-random reads (seeded by the input) including
 * unaligned ones and ones past the capacity.
 *
 * Build with clang -fsanitize=fuzzer,address,undefined (see run_fuzz.sh).
 * With -DVMDK_FUZZ_REPLAY it gets a main() that runs each file named on the
 * command line once, so gcc sanitizer builds can replay regressions without
 * libFuzzer.
 */
#define _GNU_SOURCE
#include "vmdk.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SEP "@@@@\n"
#define MAX_READ (256 * 1024)

static char g_dir[256];
static unsigned char *g_buf;

static void die(const char *what)
{
    perror(what);
    abort();
}

static void drop_file(const char *name);

static void cleanup(void)
{
    static const char *all[] = {"disk.vmdk", "d.vmdk", "x0.vmdk", "x1.vmdk", "x2.vmdk", "x3.vmdk"};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        drop_file(all[i]);
    rmdir(g_dir);
}

static void setup(void)
{
    if (g_dir[0])
        return;
    /* run_fuzz.sh points FUZZ_VMDK_TMP at a directory it removes afterwards
     * (libFuzzer's time limit ends the process without atexit handlers). */
    const char *base = getenv("FUZZ_VMDK_TMP");
    if (!base || !*base)
        base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(g_dir, sizeof(g_dir), "%s/fuzz_vmdk.XXXXXX", base);
    if (!mkdtemp(g_dir))
        die("mkdtemp");
    g_buf = malloc(MAX_READ);
    if (!g_buf)
        die("malloc");
    atexit(cleanup);
}

static void put_file(const char *name, const uint8_t *p, size_t n, size_t hole)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        die(path);
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            die("write");
        p += w;
        n -= (size_t)w;
    }
    if (hole) {
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0 || ftruncate(fd, end + (off_t)hole) != 0)
            die("ftruncate");
    }
    close(fd);
}

static void drop_file(const char *name)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    unlink(path);
}

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64 */
    uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static void do_read(vmdk_disk *d, uint64_t off, size_t len)
{
    char err[VMDK_ERRLEN];
    if (len > MAX_READ)
        len = MAX_READ;
    memset(g_buf, 0xa5, len);
    err[0] = '\0';
    if (vmdk_read(d, g_buf, len, off, err, sizeof(err)) != 0) {
        if (!err[0])
            abort(); /* an error must always come with a message */
        return;
    }
    /* Past the capacity the disk reads as zeros. */
    uint64_t cap = vmdk_capacity(d);
    for (size_t i = 0; i < len; i++)
        if (off + i >= cap && g_buf[i] != 0)
            abort();
}

static void exercise(const char *name, uint64_t seed)
{
    char path[512], err[VMDK_ERRLEN];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    err[0] = '\0';
    vmdk_disk *d = vmdk_open(path, err, sizeof(err));
    if (!d) {
        if (!err[0])
            abort();
        return;
    }
    uint64_t cap = vmdk_capacity(d);
    if (cap == 0 || cap > VMDK_MAX_CAPACITY)
        abort(); /* an empty disk is refused at open */
    (void)vmdk_create_type(d);
    vmdk_range *v = NULL;
    size_t n = 0;
    if (vmdk_extents(d, &v, &n, err, sizeof(err)) == 0) {
        for (size_t i = 0; i < n; i++) {
            if (v[i].length == 0 || v[i].start + v[i].length > cap)
                abort();
            if (i > 0 && v[i].start <= v[i - 1].start + v[i - 1].length)
                abort(); /* must be sorted and merged */
        }
        for (size_t i = 0; i < n && i < 8; i++) {
            do_read(d, v[i].start, v[i].length < 70000 ? (size_t)v[i].length : 70000);
            uint64_t end = v[i].start + v[i].length;
            do_read(d, end > 4097 ? end - 4097 : 0, 8193);
        }
    } else if (!err[0]) {
        abort();
    }
    free(v);
    uint64_t s = seed;
    for (int i = 0; i < 8; i++) {
        uint64_t r = rng_next(&s);
        uint64_t off = cap ? r % (cap + cap / 8 + 1) : r % 4096;
        if (i & 1)
            off &= ~(uint64_t)65535; /* grain-aligned sometimes */
        size_t len = (size_t)(rng_next(&s) % MAX_READ) + 1;
        do_read(d, off, len);
    }
    vmdk_close(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *names[] = {"x0.vmdk", "x1.vmdk", "x2.vmdk", "x3.vmdk"};
    setup();
    if (size < 1)
        return 0;
    uint64_t seed = 1469598103934665603ull;
    for (size_t i = 0; i < size && i < 4096; i++)
        seed = (seed ^ data[i]) * 1099511628211ull;
    uint8_t mode = data[0];
    size_t hole = (mode & 2) ? (size_t)((mode >> 2) & 63) * 16384 : 0;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    if ((mode & 1) == 0) {
        put_file("disk.vmdk", p, n, hole);
        exercise("disk.vmdk", seed);
        drop_file("disk.vmdk");
        return 0;
    }
    const char *file = "d.vmdk";
    int idx = -1;
    for (;;) {
        const uint8_t *sep = memmem(p, n, SEP, sizeof(SEP) - 1);
        size_t len = sep ? (size_t)(sep - p) : n;
        put_file(file, p, len, hole);
        if (!sep || idx == 3)
            break;
        p = sep + sizeof(SEP) - 1;
        n -= len + sizeof(SEP) - 1;
        file = names[++idx];
    }
    exercise("d.vmdk", seed);
    drop_file("d.vmdk");
    for (int i = 0; i < 4; i++)
        drop_file(names[i]);
    return 0;
}

#ifdef VMDK_FUZZ_REPLAY
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f)
            die(argv[i]);
        size_t cap = 1 << 16, n = 0;
        uint8_t *buf = malloc(cap);
        size_t got;
        while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
            n += got;
            if (n == cap) {
                cap *= 2;
                buf = realloc(buf, cap);
            }
        }
        fclose(f);
        if (!buf)
            die("malloc");
        LLVMFuzzerTestOneInput(buf, n);
        free(buf);
        printf("replayed %s (%zu bytes)\n", argv[i], n);
    }
    free(g_buf);
    return 0;
}
#endif
