/*
 * Hosted sparse extents ("KDMV"): monolithicSparse, twoGbMaxExtentSparse
 * extent files and streamOptimized files.
 *
 * Open reads the header (or, when the grain directory is "at the end", the
 * footer: footer marker, footer header, end-of-stream marker in the last
 * three sectors), checks every field, loads the grain directory and checks
 * that each grain table it points at lies inside the file and that no two
 * tables overlap.  That last check keeps the work of listing extents
 * proportional to the file size: a hostile directory cannot make one small
 * table count a million times.
 *
 * Reads then need no shared state: the grain table entries covering a
 * request are read with pread, uncompressed grains that lie back to back
 * in the file are read with one pread, compressed grains are inflated into
 * per-call buffers.
 */
#include "vmdk_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

typedef struct {
    uint32_t version, flags;
    uint64_t capacity, grain, desc_off, desc_size;
    uint32_t gtes;
    uint64_t rgd_off, gd_off, overhead;
    uint16_t compress;
    unsigned char nl[4];
} raw_header;

static void decode_header(const unsigned char *h, raw_header *r)
{
    r->version = vmdk_le32(h + 4);
    r->flags = vmdk_le32(h + 8);
    r->capacity = vmdk_le64(h + 12);
    r->grain = vmdk_le64(h + 20);
    r->desc_off = vmdk_le64(h + 28);
    r->desc_size = vmdk_le64(h + 36);
    r->gtes = vmdk_le32(h + 44);
    r->rgd_off = vmdk_le64(h + 48);
    r->gd_off = vmdk_le64(h + 56);
    r->overhead = vmdk_le64(h + 64);
    memcpy(r->nl, h + 73, 4);
    r->compress = (uint16_t)(h[77] | h[78] << 8);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Reads the footer of a stream file whose header says "GD at end". */
static int read_footer(int fd, const char *path, uint64_t file_size, raw_header *r, char *err,
                       size_t errlen)
{
    unsigned char f[3 * VMDK_SECTOR];
    if (file_size < 4 * VMDK_SECTOR)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "grain directory is at the end of the stream, but the file (%llu "
                         "bytes) is too short to hold a footer",
                         (unsigned long long)file_size);
    uint64_t at = file_size - sizeof(f);
    long long got = vmdk_pread_upto(fd, f, sizeof(f), at);
    if (got < 0)
        return vmdk_fail(err, errlen, errno, path, "cannot read the footer at byte %llu: %s",
                         (unsigned long long)at, strerror(errno));
    if ((size_t)got != sizeof(f))
        return vmdk_fail(err, errlen, EIO, path, "file shrank while reading the footer");
    if (vmdk_le32(f + 8) != 0 || vmdk_le32(f + 12) != VMDK_MARKER_FOOTER)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "no footer marker at byte %llu (the stream is truncated or was not "
                         "closed)",
                         (unsigned long long)at);
    if (vmdk_le32(f + VMDK_SECTOR) != VMDK_SPARSE_MAGIC)
        return vmdk_fail(err, errlen, EINVAL, path, "footer at byte %llu has no KDMV magic",
                         (unsigned long long)(at + VMDK_SECTOR));
    if (vmdk_le32(f + 2 * VMDK_SECTOR + 8) != 0 ||
        vmdk_le32(f + 2 * VMDK_SECTOR + 12) != VMDK_MARKER_EOS)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "no end-of-stream marker at byte %llu after the footer",
                         (unsigned long long)(at + 2 * VMDK_SECTOR));
    decode_header(f + VMDK_SECTOR, r);
    if (r->gd_off == VMDK_GD_AT_END)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "footer at byte %llu also says the grain directory is at the end",
                         (unsigned long long)(at + VMDK_SECTOR));
    return 0;
}

int vmdk_sparse_open(int fd, const char *path, uint64_t file_size, vmdk_sparse **out,
                     char **desc, char *err, size_t errlen)
{
    unsigned char h[VMDK_SECTOR];
    raw_header r;
    vmdk_sparse *sp = NULL;
    uint32_t *sorted = NULL;

    *out = NULL;
    if (desc)
        *desc = NULL;
    if (file_size < VMDK_SECTOR)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "file of %llu bytes is too short for a sparse VMDK header (512 bytes)",
                         (unsigned long long)file_size);
    long long got = vmdk_pread_upto(fd, h, sizeof(h), 0);
    if (got < 0)
        return vmdk_fail(err, errlen, errno, path, "cannot read the header: %s",
                         strerror(errno));
    if ((size_t)got != sizeof(h))
        return vmdk_fail(err, errlen, EIO, path, "file shrank while reading the header");
    if (vmdk_le32(h) != VMDK_SPARSE_MAGIC)
        return vmdk_fail(err, errlen, EINVAL, path, "bad magic 0x%08x (expected KDMV)",
                         vmdk_le32(h));
    decode_header(h, &r);
    const char *where = "header";
    if (r.gd_off == VMDK_GD_AT_END) {
        if (read_footer(fd, path, file_size, &r, err, errlen) != 0)
            return -1;
        where = "footer";
    }

    if (r.version < 1 || r.version > 3)
        return vmdk_fail(err, errlen, EINVAL, path, "%s: unsupported version %u", where,
                         r.version);
    if ((r.flags & VMDK_FLAG_NL_TEST) && memcmp(r.nl, "\n \r\n", 4) != 0)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s: newline check bytes are damaged (the file went through a "
                         "text-mode transfer)",
                         where);
    if (r.capacity > VMDK_MAX_CAPACITY / VMDK_SECTOR)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s: capacity of %llu sectors is beyond the limit of %llu sectors",
                         where, (unsigned long long)r.capacity,
                         (unsigned long long)(VMDK_MAX_CAPACITY / VMDK_SECTOR));
    if (r.grain == 0 || r.grain > VMDK_MAX_GRAIN_SECTORS || (r.grain & (r.grain - 1)) != 0)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s: grain size of %llu sectors (must be a power of two from 1 to %u)",
                         where, (unsigned long long)r.grain, VMDK_MAX_GRAIN_SECTORS);
    if (r.gtes == 0 || r.gtes > VMDK_MAX_GTES)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s: %u entries per grain table (must be 1 to %u)", where, r.gtes,
                         VMDK_MAX_GTES);
    if (r.compress > 1)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s: unknown compression algorithm %u", where, (unsigned)r.compress);
    if ((r.flags & VMDK_FLAG_COMPRESSED) && r.compress != 1)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s: compressed-grains flag without a compression algorithm", where);

    sp = calloc(1, sizeof(*sp));
    if (!sp)
        return vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
    sp->version = r.version;
    sp->flags = r.flags;
    sp->capacity = r.capacity * VMDK_SECTOR;
    sp->grain_sectors = (uint32_t)r.grain;
    sp->grain_bytes = r.grain * VMDK_SECTOR;
    sp->gtes = r.gtes;
    sp->gt_span = (uint64_t)r.gtes * sp->grain_bytes;
    sp->zero_gte = (r.flags & VMDK_FLAG_ZERO_GTE) != 0;
    sp->compressed = r.compress == 1;
    sp->markers = (r.flags & VMDK_FLAG_MARKERS) != 0;
    sp->gd_offset = r.gd_off;

    uint64_t gd_entries = (sp->capacity + sp->gt_span - 1) / sp->gt_span;
    uint64_t gt_bytes = (uint64_t)sp->gtes * 4;
    if (gd_entries > 0) {
        if (r.gd_off == 0) {
            vmdk_fail(err, errlen, EINVAL, path,
                      "%s: no grain directory (offset 0) for a capacity of %llu sectors", where,
                      (unsigned long long)r.capacity);
            goto fail;
        }
        if (gd_entries > (UINT64_C(1) << 25) || r.gd_off > file_size / VMDK_SECTOR ||
            gd_entries * 4 > file_size - r.gd_off * VMDK_SECTOR) {
            vmdk_fail(err, errlen, EINVAL, path,
                      "%s: grain directory of %llu entries at sector %llu runs past the end of "
                      "the file (%llu sectors)",
                      where, (unsigned long long)gd_entries, (unsigned long long)r.gd_off,
                      (unsigned long long)(file_size / VMDK_SECTOR));
            goto fail;
        }
        sp->gd_entries = (uint32_t)gd_entries;
        sp->gd = malloc(gd_entries * 4);
        sorted = malloc(gd_entries * 4);
        if (!sp->gd || !sorted) {
            vmdk_fail(err, errlen, ENOMEM, path, "out of memory for a grain directory of %llu "
                      "entries", (unsigned long long)gd_entries);
            goto fail;
        }
        got = vmdk_pread_upto(fd, sp->gd, gd_entries * 4, r.gd_off * VMDK_SECTOR);
        if (got < 0) {
            vmdk_fail(err, errlen, errno, path, "cannot read the grain directory: %s",
                      strerror(errno));
            goto fail;
        }
        if ((uint64_t)got != gd_entries * 4) {
            vmdk_fail(err, errlen, EIO, path, "file shrank while reading the grain directory");
            goto fail;
        }
        size_t ns = 0;
        for (uint32_t i = 0; i < sp->gd_entries; i++) {
            uint32_t v = vmdk_le32((const unsigned char *)&sp->gd[i]);
            sp->gd[i] = v;
            if (v == 0 || (sp->zero_gte && v == 1))
                continue;
            if ((uint64_t)v * VMDK_SECTOR + gt_bytes > file_size) {
                vmdk_fail(err, errlen, EINVAL, path,
                          "grain directory entry %u points at sector %u beyond the end of the "
                          "file (%llu sectors)",
                          i, v, (unsigned long long)(file_size / VMDK_SECTOR));
                goto fail;
            }
            sorted[ns++] = v;
        }
        qsort(sorted, ns, sizeof(*sorted), cmp_u32);
        for (size_t i = 1; i < ns; i++) {
            if ((uint64_t)sorted[i] * VMDK_SECTOR < (uint64_t)sorted[i - 1] * VMDK_SECTOR + gt_bytes) {
                vmdk_fail(err, errlen, EINVAL, path,
                          "grain directory has overlapping grain tables at sectors %u and %u",
                          sorted[i - 1], sorted[i]);
                goto fail;
            }
        }
        free(sorted);
        sorted = NULL;
    }

    if (desc && r.desc_off != 0 && r.desc_size != 0) {
        if (r.desc_size > VMDK_MAX_DESCRIPTOR / VMDK_SECTOR ||
            r.desc_off > file_size / VMDK_SECTOR ||
            r.desc_size * VMDK_SECTOR > file_size - r.desc_off * VMDK_SECTOR) {
            vmdk_fail(err, errlen, EINVAL, path,
                      "%s: embedded descriptor of %llu sectors at sector %llu is too large or "
                      "runs past the end of the file (%llu sectors)",
                      where, (unsigned long long)r.desc_size, (unsigned long long)r.desc_off,
                      (unsigned long long)(file_size / VMDK_SECTOR));
            goto fail;
        }
        size_t n = (size_t)(r.desc_size * VMDK_SECTOR);
        char *t = malloc(n + 1);
        if (!t) {
            vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
            goto fail;
        }
        got = vmdk_pread_upto(fd, t, n, r.desc_off * VMDK_SECTOR);
        if (got < 0 || (size_t)got != n) {
            free(t);
            vmdk_fail(err, errlen, got < 0 ? errno : EIO, path,
                      "cannot read the embedded descriptor");
            goto fail;
        }
        t[n] = '\0';
        *desc = t;
    }
    *out = sp;
    return 0;
fail:
    {
        int e = errno;
        free(sorted);
        vmdk_sparse_free(sp);
        errno = e;
        return -1;
    }
}

void vmdk_sparse_free(vmdk_sparse *sp)
{
    if (!sp)
        return;
    free(sp->gd);
    free(sp);
}

static int is_hole(const vmdk_sparse *sp, uint32_t v)
{
    return v == 0 || (sp->zero_gte && v == 1);
}

/* Largest compressed grain accepted: deflate never grows data by half. */
static uint64_t max_compressed(const vmdk_sparse *sp)
{
    return sp->grain_bytes + sp->grain_bytes / 2 + 4096;
}

/* Inflates the grain of table gdi, entry gti, stored at sector sec, into
 * gbuf (grain_bytes).  cbuf holds 12 + max_compressed() bytes. */
static int read_compressed(const vmdk_ext *e, uint32_t gdi, uint32_t gti, uint32_t sec,
                           unsigned char *cbuf, unsigned char *gbuf, char *err, size_t errlen)
{
    const vmdk_sparse *sp = e->sp;
    uint64_t at = (uint64_t)sec * VMDK_SECTOR;
    uint64_t maxc = max_compressed(sp);
    uint64_t want = maxc + (sp->markers ? 12 : 0);
    if (want > e->file_size - at)
        want = e->file_size - at;
    long long got = vmdk_pread_upto(e->fd, cbuf, (size_t)want, at);
    if (got < 0)
        return vmdk_fail(err, errlen, errno, e->path, "cannot read the grain at sector %u: %s",
                         sec, strerror(errno));
    const unsigned char *src = cbuf;
    uint64_t srclen = (uint64_t)got;
    if (sp->markers) {
        if (got < 12)
            return vmdk_fail(err, errlen, EINVAL, e->path,
                             "grain table entry %u of table %u: grain marker at sector %u is "
                             "cut off by the end of the file",
                             gti, gdi, sec);
        uint64_t lba = vmdk_le64(cbuf);
        uint32_t csize = vmdk_le32(cbuf + 8);
        uint64_t expect = ((uint64_t)gdi * sp->gtes + gti) * sp->grain_sectors;
        if (csize == 0)
            return vmdk_fail(err, errlen, EINVAL, e->path,
                             "grain table entry %u of table %u points at sector %u, which "
                             "holds a metadata marker (type %u), not a grain",
                             gti, gdi, sec, got >= 16 ? vmdk_le32(cbuf + 12) : 0u);
        if (csize > maxc)
            return vmdk_fail(err, errlen, EINVAL, e->path,
                             "grain marker at sector %u claims %u compressed bytes (at most "
                             "%llu for a grain of %llu bytes)",
                             sec, csize, (unsigned long long)maxc,
                             (unsigned long long)sp->grain_bytes);
        if ((uint64_t)csize + 12 > srclen)
            return vmdk_fail(err, errlen, EINVAL, e->path,
                             "grain marker at sector %u: %u compressed bytes run past the end "
                             "of the file (%llu bytes)",
                             sec, csize, (unsigned long long)e->file_size);
        if (lba != expect)
            return vmdk_fail(err, errlen, EINVAL, e->path,
                             "grain marker at sector %u is for sector %llu, but grain table "
                             "entry %u of table %u maps sector %llu there",
                             sec, (unsigned long long)lba, gti, gdi,
                             (unsigned long long)expect);
        src = cbuf + 12;
        srclen = csize;
    }
    uLongf dlen = (uLongf)sp->grain_bytes;
    int rc = uncompress(gbuf, &dlen, src, (uLong)srclen);
    if (rc != Z_OK)
        return vmdk_fail(err, errlen, EINVAL, e->path,
                         "grain at sector %u (table %u entry %u) does not inflate: %s", sec,
                         gdi, gti,
                         rc == Z_BUF_ERROR ? "larger than a grain or cut off"
                         : rc == Z_DATA_ERROR ? "corrupt deflate data"
                                              : "zlib error");
    if (dlen < sp->grain_bytes)
        memset(gbuf + dlen, 0, (size_t)(sp->grain_bytes - dlen));
    return 0;
}

int vmdk_sparse_read(const vmdk_ext *e, void *buf, size_t len, uint64_t off, char *err,
                     size_t errlen)
{
    const vmdk_sparse *sp = e->sp;
    unsigned char *p = buf;
    unsigned char *cbuf = NULL, *gbuf = NULL;
    unsigned char gtraw[VMDK_MAX_GTES * 4];
    /* A pending run of uncompressed grains that are contiguous in the file. */
    unsigned char *run_dst = NULL;
    uint64_t run_at = 0;
    size_t run_len = 0;
    int rc = -1;

#define FLUSH_RUN()                                                                          \
    do {                                                                                     \
        if (run_len) {                                                                       \
            long long g_ = vmdk_pread_upto(e->fd, run_dst, run_len, run_at);                  \
            if (g_ < 0) {                                                                    \
                vmdk_fail(err, errlen, errno, e->path, "cannot read at byte %llu: %s",       \
                          (unsigned long long)run_at, strerror(errno));                      \
                goto out;                                                                    \
            }                                                                                \
            if ((size_t)g_ != run_len) {                                                     \
                vmdk_fail(err, errlen, EIO, e->path,                                         \
                          "file shrank: short read at byte %llu", (unsigned long long)run_at); \
                goto out;                                                                    \
            }                                                                                \
            run_len = 0;                                                                     \
        }                                                                                    \
    } while (0)

    while (len > 0) {
        if (off >= sp->capacity) {
            memset(p, 0, len);
            break;
        }
        uint64_t avail = sp->capacity - off;
        uint64_t gdi = off / sp->gt_span;
        uint64_t in_gt = off % sp->gt_span;
        uint64_t chunk = sp->gt_span - in_gt;
        if (chunk > avail)
            chunk = avail;
        if (chunk > len)
            chunk = len;
        uint32_t gt = gdi < sp->gd_entries ? sp->gd[gdi] : 0;
        if (is_hole(sp, gt)) {
            memset(p, 0, (size_t)chunk);
            p += chunk;
            off += chunk;
            len -= (size_t)chunk;
            continue;
        }
        uint64_t first = in_gt / sp->grain_bytes;
        uint64_t last = (in_gt + chunk - 1) / sp->grain_bytes;
        size_t nent = (size_t)(last - first + 1);
        long long got = vmdk_pread_upto(e->fd, gtraw, nent * 4,
                                        (uint64_t)gt * VMDK_SECTOR + first * 4);
        if (got < 0) {
            vmdk_fail(err, errlen, errno, e->path, "cannot read grain table %llu: %s",
                      (unsigned long long)gdi, strerror(errno));
            goto out;
        }
        if ((size_t)got != nent * 4) {
            vmdk_fail(err, errlen, EIO, e->path, "file shrank while reading grain table %llu",
                      (unsigned long long)gdi);
            goto out;
        }
        for (size_t k = 0; k < nent; k++) {
            uint64_t gti = first + k;
            uint64_t within = (k == 0) ? in_gt % sp->grain_bytes : 0;
            uint64_t take = sp->grain_bytes - within;
            if (take > chunk)
                take = chunk;
            uint32_t v = vmdk_le32(gtraw + 4 * k);
            if (is_hole(sp, v)) {
                FLUSH_RUN();
                memset(p, 0, (size_t)take);
            } else if ((uint64_t)v >= e->file_size / VMDK_SECTOR) {
                vmdk_fail(err, errlen, EINVAL, e->path,
                          "grain table entry %llu of table %llu points at sector %u beyond the "
                          "end of the file (%llu sectors)",
                          (unsigned long long)gti, (unsigned long long)gdi, v,
                          (unsigned long long)(e->file_size / VMDK_SECTOR));
                goto out;
            } else if (sp->compressed) {
                FLUSH_RUN();
                if (!cbuf) {
                    cbuf = malloc((size_t)(max_compressed(sp) + 12));
                    gbuf = malloc((size_t)sp->grain_bytes);
                    if (!cbuf || !gbuf) {
                        vmdk_fail(err, errlen, ENOMEM, e->path, "out of memory");
                        goto out;
                    }
                }
                if (read_compressed(e, (uint32_t)gdi, (uint32_t)gti, v, cbuf, gbuf, err,
                                    errlen) != 0)
                    goto out;
                memcpy(p, gbuf + within, (size_t)take);
            } else {
                uint64_t at = (uint64_t)v * VMDK_SECTOR + within;
                if (at + take > e->file_size) {
                    vmdk_fail(err, errlen, EINVAL, e->path,
                              "grain table entry %llu of table %llu: grain at sector %u runs "
                              "past the end of the file (%llu bytes)",
                              (unsigned long long)gti, (unsigned long long)gdi, v,
                              (unsigned long long)e->file_size);
                    goto out;
                }
                if (run_len && run_at + run_len == at && run_dst + run_len == p &&
                    run_len + take <= (size_t)1 << 30) {
                    run_len += (size_t)take;
                } else {
                    FLUSH_RUN();
                    run_dst = p;
                    run_at = at;
                    run_len = (size_t)take;
                }
            }
            p += take;
            off += take;
            len -= (size_t)take;
            chunk -= take;
        }
    }
    FLUSH_RUN();
    rc = 0;
out:
    free(cbuf);
    free(gbuf);
    return rc;
#undef FLUSH_RUN
}

int vmdk_sparse_extents(const vmdk_ext *e, vmdk_rangevec *rv, char *err, size_t errlen)
{
    const vmdk_sparse *sp = e->sp;
    uint64_t limit = e->length < sp->capacity ? e->length : sp->capacity;
    unsigned char gtraw[VMDK_MAX_GTES * 4];
    uint64_t file_sectors = e->file_size / VMDK_SECTOR;

    for (uint32_t gdi = 0; gdi < sp->gd_entries; gdi++) {
        uint64_t base = (uint64_t)gdi * sp->gt_span;
        if (base >= limit)
            break;
        uint32_t gt = sp->gd[gdi];
        if (is_hole(sp, gt))
            continue;
        size_t n = (size_t)sp->gtes * 4;
        long long got = vmdk_pread_upto(e->fd, gtraw, n, (uint64_t)gt * VMDK_SECTOR);
        if (got < 0)
            return vmdk_fail(err, errlen, errno, e->path, "cannot read grain table %u: %s",
                             gdi, strerror(errno));
        if ((size_t)got != n)
            return vmdk_fail(err, errlen, EIO, e->path,
                             "file shrank while reading grain table %u", gdi);
        for (uint32_t gti = 0; gti < sp->gtes; gti++) {
            uint64_t vs = base + (uint64_t)gti * sp->grain_bytes;
            if (vs >= limit)
                break;
            uint32_t v = vmdk_le32(gtraw + 4 * gti);
            if (is_hole(sp, v))
                continue;
            if ((uint64_t)v >= file_sectors)
                return vmdk_fail(err, errlen, EINVAL, e->path,
                                 "grain table entry %u of table %u points at sector %u beyond "
                                 "the end of the file (%llu sectors)",
                                 gti, gdi, v, (unsigned long long)file_sectors);
            uint64_t ve = vs + sp->grain_bytes;
            if (ve > limit)
                ve = limit;
            if (vmdk_rangevec_push(rv, e->start + vs, e->start + ve) != 0)
                return vmdk_fail(err, errlen, ENOMEM, e->path, "out of memory");
        }
    }
    return 0;
}
