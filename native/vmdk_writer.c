/*
 * monolithicSparse writer: the restore target for hosted VMs.
 *
 * Layout, as VMware and qemu-img lay it out (all in 512-byte sectors):
 *   0                header (version 1, flags: newline test | redundant GD)
 *   1 .. 20          embedded descriptor
 *   21               redundant grain directory, then its grain tables
 *   ...              grain directory, then its grain tables
 *   overhead         (rounded up to a grain) grains, in the order written
 * Every grain table is preallocated, so both directories are final when
 * the file is created; the tables themselves are kept in memory (only the
 * ones that received a grain) and written, both copies, by finish.
 * Grain table entries are 32-bit sector numbers, which caps the file at
 * 2 TiB; create refuses a capacity that could not be filled.
 */
#define _GNU_SOURCE
#include "vmdk_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define W_GTES 512u
#define W_DESC_OFF 1u
#define W_DESC_SECTORS 20u

struct vmdk_writer {
    int fd;
    char *path;
    uint64_t capacity;      /* bytes */
    uint64_t grain_bytes;
    uint32_t grain_sectors;
    uint64_t gt_span;
    uint32_t gd_entries;
    uint64_t rgd_gt0, gd_gt0; /* first grain table of each copy, sectors */
    uint64_t next_sector;   /* where the next grain goes */
    uint32_t **gts;         /* in-memory grain tables, NULL until used */
    pthread_mutex_t lock;
    int finished;
};

static int all_zero(const unsigned char *p, size_t n)
{
    size_t head = n < 16 ? n : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    return n <= 16 || memcmp(p, p + 16, n - 16) == 0;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t put = pwrite(fd, p, len, (off_t)off);
        if (put < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += put;
        off += (uint64_t)put;
        len -= (size_t)put;
    }
    return 0;
}

static uint32_t random_cid(void)
{
    uint32_t v = 0;
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != (ssize_t)sizeof(v))
        v = (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16);
    if (v == 0xffffffffu)
        v = 1;
    return v;
}

vmdk_writer *vmdk_writer_create(const char *path, uint64_t capacity, uint32_t grain_size,
                                unsigned mode, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (grain_size == 0)
        grain_size = VMDK_DEFAULT_GRAIN;
    if (grain_size < 4096 || grain_size > 1024 * 1024 || (grain_size & (grain_size - 1)) != 0) {
        vmdk_fail(err, errlen, EINVAL, path,
                  "grain size %u is not a power of two from 4 KiB to 1 MiB", grain_size);
        return NULL;
    }
    if (capacity == 0 || capacity > VMDK_MAX_CAPACITY) {
        vmdk_fail(err, errlen, EINVAL, path, "capacity of %llu bytes is out of range",
                  (unsigned long long)capacity);
        return NULL;
    }
    uint64_t cap_sectors = (capacity + VMDK_SECTOR - 1) / VMDK_SECTOR;
    uint32_t gs = grain_size / VMDK_SECTOR;
    uint64_t gt_span_sectors = (uint64_t)W_GTES * gs;
    uint64_t gd_entries = (cap_sectors + gt_span_sectors - 1) / gt_span_sectors;
    uint64_t gd_sectors = (gd_entries * 4 + VMDK_SECTOR - 1) / VMDK_SECTOR;
    uint64_t gt_sectors = W_GTES * 4 / VMDK_SECTOR;
    uint64_t rgd = W_DESC_OFF + W_DESC_SECTORS;
    uint64_t rgd_gt0 = rgd + gd_sectors;
    uint64_t gd = rgd_gt0 + gd_entries * gt_sectors;
    uint64_t gd_gt0 = gd + gd_sectors;
    uint64_t overhead = gd_gt0 + gd_entries * gt_sectors;
    overhead = (overhead + gs - 1) / gs * gs;
    uint64_t grains = (cap_sectors + gs - 1) / gs;
    if (overhead + grains * gs > UINT32_MAX) {
        vmdk_fail(err, errlen, EFBIG, path,
                  "capacity of %llu bytes is too large for a monolithicSparse file (its "
                  "32-bit sector offsets reach 2 TiB)",
                  (unsigned long long)capacity);
        return NULL;
    }

    vmdk_writer *w = calloc(1, sizeof(*w));
    if (!w || !(w->path = strdup(path)) ||
        !(w->gts = calloc((size_t)gd_entries, sizeof(*w->gts)))) {
        if (w) {
            free(w->path);
            free(w);
        }
        vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
        return NULL;
    }
    w->fd = -1;
    w->capacity = cap_sectors * VMDK_SECTOR;
    w->grain_sectors = gs;
    w->grain_bytes = grain_size;
    w->gt_span = gt_span_sectors * VMDK_SECTOR;
    w->gd_entries = (uint32_t)gd_entries;
    w->rgd_gt0 = rgd_gt0;
    w->gd_gt0 = gd_gt0;
    w->next_sector = overhead;
    pthread_mutex_init(&w->lock, NULL);

    unsigned char *meta = NULL;
    /* A new file, never one that is there already nor one a link leads to:
     * a restore's partial file planted as a link would otherwise be written
     * through (as root, anywhere).  fchmod: exactly this mode, whatever the umask. */
    w->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)(mode & 07777));
    if (w->fd < 0) {
        int e = errno;
        vmdk_fail(err, errlen, e, path, "cannot create: %s", strerror(e));
        errno = e;
        goto fail;
    }
    struct stat st;
    if (fstat(w->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        vmdk_fail(err, errlen, EINVAL, path, "is not a regular file");
        goto fail;
    }
    if (fchmod(w->fd, (mode_t)(mode & 07777)) != 0) {
        vmdk_fail(err, errlen, errno, path, "cannot set its mode: %s", strerror(errno));
        goto fail;
    }

    /* Header, descriptor and both directories in one buffer. */
    size_t head_bytes = (size_t)((W_DESC_OFF + W_DESC_SECTORS) * VMDK_SECTOR);
    meta = calloc(1, head_bytes);
    if (!meta) {
        vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
        goto fail;
    }
    unsigned char *h = meta;
    vmdk_put_le32(h, VMDK_SPARSE_MAGIC);
    vmdk_put_le32(h + 4, 1);
    vmdk_put_le32(h + 8, VMDK_FLAG_NL_TEST | VMDK_FLAG_RGD);
    vmdk_put_le64(h + 12, cap_sectors);
    vmdk_put_le64(h + 20, gs);
    vmdk_put_le64(h + 28, W_DESC_OFF);
    vmdk_put_le64(h + 36, W_DESC_SECTORS);
    vmdk_put_le32(h + 44, W_GTES);
    vmdk_put_le64(h + 48, rgd);
    vmdk_put_le64(h + 56, gd);
    vmdk_put_le64(h + 64, overhead);
    h[72] = 0;
    memcpy(h + 73, "\n \r\n", 4);
    /* compressAlgorithm (77..78) = 0 */

    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    char name[256];
    size_t bn = 0;
    for (; base[bn] && bn < sizeof(name) - 1; bn++) {
        unsigned char c = (unsigned char)base[bn];
        name[bn] = (c < 0x20 || c == '"' || c == 0x7f) ? '_' : (char)c;
    }
    name[bn] = '\0';
    uint64_t cyl = cap_sectors / (16 * 63);
    if (cyl > 16383)
        cyl = 16383;
    snprintf((char *)meta + W_DESC_OFF * VMDK_SECTOR, W_DESC_SECTORS * VMDK_SECTOR,
             "# Disk DescriptorFile\n"
             "version=1\n"
             "CID=%08x\n"
             "parentCID=ffffffff\n"
             "createType=\"monolithicSparse\"\n"
             "\n"
             "# Extent description\n"
             "RW %llu SPARSE \"%s\"\n"
             "\n"
             "# The Disk Data Base\n"
             "#DDB\n"
             "\n"
             "ddb.virtualHWVersion = \"4\"\n"
             "ddb.geometry.cylinders = \"%llu\"\n"
             "ddb.geometry.heads = \"16\"\n"
             "ddb.geometry.sectors = \"63\"\n"
             "ddb.adapterType = \"ide\"\n",
             random_cid(), (unsigned long long)cap_sectors, name, (unsigned long long)cyl);
    if (pwrite_full(w->fd, meta, head_bytes, 0) != 0) {
        vmdk_fail(err, errlen, errno, path, "cannot write the header: %s", strerror(errno));
        goto fail;
    }
    free(meta);
    meta = calloc(gd_sectors, VMDK_SECTOR);
    if (!meta) {
        vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
        goto fail;
    }
    for (int copy = 0; copy < 2; copy++) {
        uint64_t gt0 = copy ? gd_gt0 : rgd_gt0;
        for (uint64_t i = 0; i < gd_entries; i++)
            vmdk_put_le32(meta + 4 * i, (uint32_t)(gt0 + i * gt_sectors));
        if (pwrite_full(w->fd, meta, gd_sectors * VMDK_SECTOR,
                        (copy ? gd : rgd) * VMDK_SECTOR) != 0) {
            vmdk_fail(err, errlen, errno, path, "cannot write the grain directory: %s",
                      strerror(errno));
            goto fail;
        }
    }
    free(meta);
    meta = NULL;
    if (ftruncate(w->fd, (off_t)(overhead * VMDK_SECTOR)) != 0) {
        vmdk_fail(err, errlen, errno, path, "cannot size the file: %s", strerror(errno));
        goto fail;
    }
    return w;
fail:
    {
        int e = errno;
        free(meta);
        if (w->fd >= 0)
            unlink(path); /* created above, exclusively: ours to remove */
        vmdk_writer_close(w);
        errno = e;
        return NULL;
    }
}

uint64_t vmdk_writer_capacity(const vmdk_writer *w)
{
    return w->capacity;
}

/* Sector of grain g, allocating it when alloc is set.  Called with the
 * lock held.  Returns 0 when unallocated (and !alloc), or -1 on error. */
static long long grain_sector(vmdk_writer *w, uint64_t g, int alloc, char *err, size_t errlen)
{
    uint64_t gdi = g / W_GTES, gti = g % W_GTES;
    uint32_t *t = w->gts[gdi];
    if (t && t[gti])
        return t[gti];
    if (!alloc)
        return 0;
    if (!t) {
        t = calloc(W_GTES, sizeof(*t));
        if (!t)
            return vmdk_fail(err, errlen, ENOMEM, w->path, "out of memory");
        w->gts[gdi] = t;
    }
    if (w->next_sector + w->grain_sectors > UINT32_MAX)
        return vmdk_fail(err, errlen, EFBIG, w->path, "file would exceed 2 TiB");
    t[gti] = (uint32_t)w->next_sector;
    w->next_sector += w->grain_sectors;
    return t[gti];
}

int vmdk_writer_write(vmdk_writer *w, const void *buf, size_t len, uint64_t off, char *err,
                      size_t errlen)
{
    const unsigned char *p = buf;
    if (w->finished)
        return vmdk_fail(err, errlen, EINVAL, w->path, "write after finish");
    if (off > w->capacity || len > w->capacity - off)
        return vmdk_fail(err, errlen, EINVAL, w->path,
                         "write of %zu bytes at byte %llu is beyond the capacity (%llu bytes)",
                         len, (unsigned long long)off, (unsigned long long)w->capacity);
    while (len > 0) {
        uint64_t g = off / w->grain_bytes;
        uint64_t within = off % w->grain_bytes;
        size_t take = w->grain_bytes - within < len ? (size_t)(w->grain_bytes - within) : len;
        /* Bytes of this grain that lie within the capacity. */
        uint64_t gstart = g * w->grain_bytes;
        uint64_t glen = w->capacity - gstart < w->grain_bytes ? w->capacity - gstart
                                                              : w->grain_bytes;
        int zero = all_zero(p, take);
        pthread_mutex_lock(&w->lock);
        long long sec = grain_sector(w, g, 0, err, errlen);
        if (sec == 0 && zero) {
            pthread_mutex_unlock(&w->lock);
        } else if (sec == 0 && (within != 0 || take != glen)) {
            /* New grain, partly written: write it whole (zeros around the
             * data) before anyone else can see it. */
            sec = grain_sector(w, g, 1, err, errlen);
            unsigned char *tmp = sec > 0 ? calloc(1, (size_t)w->grain_bytes) : NULL;
            int rc = -1;
            if (sec > 0 && !tmp)
                vmdk_fail(err, errlen, ENOMEM, w->path, "out of memory");
            if (tmp) {
                memcpy(tmp + within, p, take);
                rc = pwrite_full(w->fd, tmp, (size_t)w->grain_bytes,
                                 (uint64_t)sec * VMDK_SECTOR);
                if (rc != 0)
                    vmdk_fail(err, errlen, errno, w->path, "cannot write at byte %llu: %s",
                              (unsigned long long)sec * VMDK_SECTOR, strerror(errno));
                free(tmp);
            }
            pthread_mutex_unlock(&w->lock);
            if (rc != 0)
                return -1;
        } else {
            if (sec == 0)
                sec = grain_sector(w, g, 1, err, errlen);
            pthread_mutex_unlock(&w->lock);
            if (sec < 0)
                return -1;
            uint64_t at = (uint64_t)sec * VMDK_SECTOR + within;
            if (pwrite_full(w->fd, p, take, at) != 0)
                return vmdk_fail(err, errlen, errno, w->path, "cannot write at byte %llu: %s",
                                 (unsigned long long)at, strerror(errno));
        }
        p += take;
        off += take;
        len -= take;
    }
    return 0;
}

int vmdk_writer_finish(vmdk_writer *w, char *err, size_t errlen)
{
    unsigned char raw[W_GTES * 4];
    if (w->finished)
        return 0;
    pthread_mutex_lock(&w->lock);
    int rc = 0;
    for (uint32_t i = 0; i < w->gd_entries && rc == 0; i++) {
        if (!w->gts[i])
            continue;
        for (uint32_t j = 0; j < W_GTES; j++)
            vmdk_put_le32(raw + 4 * j, w->gts[i][j]);
        uint64_t gt_sectors = W_GTES * 4 / VMDK_SECTOR;
        if (pwrite_full(w->fd, raw, sizeof(raw), (w->rgd_gt0 + i * gt_sectors) * VMDK_SECTOR) != 0 ||
            pwrite_full(w->fd, raw, sizeof(raw), (w->gd_gt0 + i * gt_sectors) * VMDK_SECTOR) != 0)
            rc = vmdk_fail(err, errlen, errno, w->path, "cannot write grain table %u: %s", i,
                           strerror(errno));
    }
    /* The last grain may have been written short (capacity not a multiple
     * of the grain): make the file cover every allocated grain. */
    if (rc == 0 && ftruncate(w->fd, (off_t)(w->next_sector * VMDK_SECTOR)) != 0)
        rc = vmdk_fail(err, errlen, errno, w->path, "cannot size the file: %s",
                       strerror(errno));
    if (rc == 0 && fsync(w->fd) != 0)
        rc = vmdk_fail(err, errlen, errno, w->path, "fsync failed: %s", strerror(errno));
    if (rc == 0)
        w->finished = 1;
    pthread_mutex_unlock(&w->lock);
    return rc;
}

void vmdk_writer_close(vmdk_writer *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    if (w->gts) {
        for (uint32_t i = 0; i < w->gd_entries; i++)
            free(w->gts[i]);
        free(w->gts);
    }
    pthread_mutex_destroy(&w->lock);
    free(w->path);
    free(w);
}
