/*
 * vddk_extents.c -- allocated extents: QueryAllocatedBlocks over whole chunks, in windows VDDK
 * accepts, turned into byte ranges that are clipped to the request, sorted and merged (the
 * whole range when the library predates QueryAllocatedBlocks).
 */
#define _GNU_SOURCE
#include "vddk_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>

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
static int query_blocks(vddk_disk *d, struct vddk_slot *s, uint64_t first, uint64_t last,
                        extent_vec *x, char *err)
{
    uint64_t chunk = d->info.chunk_sectors;
    uint64_t window = chunk * VIXDISKLIB_MAX_CHUNK_NUMBER;
    for (uint64_t start = first; start < last;) {
        uint64_t n = last - start < window ? last - start : window;
        VixDiskLibBlockList *bl = NULL;
        VixError e = vddk_g.fn.QueryAllocatedBlocks(s->h, start, n, chunk, &bl);
        if (e != VIX_OK)
            return vddk_vix_fail(err, e,
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
        e = bl ? vddk_g.fn.FreeBlockList(bl) : VIX_OK;
        if (oom)
            return vddk_fail(err, ENOMEM, "vddk_extents(%s): out of memory", d->path);
        if (e != VIX_OK)
            return vddk_vix_fail(err, e, "VixDiskLib_FreeBlockList(%s)", d->path);
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
    if (!vddk_g.fn.QueryAllocatedBlocks) {
        /* VDDK < 6.7: no allocation map; everything may hold data. */
        if (vec_push(&x, offset, end - offset) != 0)
            rc = vddk_fail(err, ENOMEM, "vddk_extents(%s): out of memory", d->path);
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
            struct vddk_slot *s = vddk_slot_get(d);
            rc = query_blocks(d, s, first, last, &x, err);
            vddk_slot_put(d, s);
        }
        if (rc == 0 && end_sector > aligned_end &&
            vec_push(&x, aligned_end * VDDK_SECTOR, cap - aligned_end * VDDK_SECTOR) != 0)
            rc = vddk_fail(err, ENOMEM, "vddk_extents(%s): out of memory", d->path);
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
