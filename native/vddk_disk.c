/*
 * vddk_disk.c -- one vSphere disk opened through VDDK: ConnectEx + Open of its pool of handle
 * slots (vddk_internal.h), GetInfo, reads and writes split into VDDK-sized whole-sector calls
 * on a borrowed slot, Flush, and Close + Disconnect.
 */
#define _GNU_SOURCE
#include "vddk_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* The disk and its handle pool                                                              */
/* ---------------------------------------------------------------------------------------- */

static uint8_t *slot_bounce(vddk_disk *d, struct vddk_slot *s, char *err)
{
    if (!s->bounce && posix_memalign((void **)&s->bounce, 4096, d->bounce_len) != 0) {
        s->bounce = NULL;
        vddk_fail(err, ENOMEM, "vddk: out of memory for a %zu-byte bounce buffer", d->bounce_len);
    }
    return s->bounce;
}

/* Close and disconnect every slot that is open; the first failure goes to err (if not NULL).
 * Called with vddk_g.lock held. */
static int close_slots_locked(vddk_disk *d, char *err)
{
    int rc = 0;
    for (unsigned i = 0; i < d->nslots; i++) {
        struct vddk_slot *s = &d->slots[i];
        if (s->h) {
            VixError e = vddk_g.fn.Close(s->h);
            if (e != VIX_OK && rc == 0 && err)
                rc = vddk_vix_fail(err, e, "VixDiskLib_Close(%s)", d->path);
            s->h = NULL;
        }
        if (s->conn) {
            VixError e = vddk_g.fn.Disconnect(s->conn);
            if (e != VIX_OK && rc == 0 && err)
                rc = vddk_vix_fail(err, e, "VixDiskLib_Disconnect(%s)", d->path);
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
        return vddk_fail(err, EINVAL, "vddk_open: no disk path");
    *handles = o->handles ? o->handles : 1;
    *io = o->io_sectors ? o->io_sectors : VDDK_DEFAULT_IO_SECTORS;
    *chunk = o->chunk_sectors ? o->chunk_sectors : VDDK_MIN_CHUNK_SECTORS;
    if (*handles > VDDK_MAX_HANDLES)
        return vddk_fail(err, EINVAL, "vddk_open: %u handles requested, at most %u", *handles,
                         VDDK_MAX_HANDLES);
    if (o->writable && *handles != 1)
        return vddk_fail(err, EINVAL,
                         "vddk_open: a writable disk takes exactly one handle (VDDK locks it)");
    if (*io > 65536)
        return vddk_fail(err, EINVAL, "vddk_open: io_sectors %" PRIu32 " is above 65536 (32 MiB)",
                         *io);
    if (*chunk < VDDK_MIN_CHUNK_SECTORS)
        return vddk_fail(err, EINVAL,
                         "vddk_open: chunk_sectors %" PRIu32 " is below VDDK's minimum of %u",
                         *chunk, VDDK_MIN_CHUNK_SECTORS);
    return 0;
}

/* Open every slot: all ConnectEx calls first, so the credential copies can be wiped right after
 * the last one, then the Opens.  Called with vddk_g.lock held. */
static int open_slots_locked(vddk_disk *d, const vddk_conn *c, const vddk_disk_opts *o,
                             char *err)
{
    vddk_params pp;
    if (vddk_params_build(&pp, c, 1, err) != 0)
        return -1;
    int rc = 0;
    char read_only = o->writable ? 0 : 1;
    for (unsigned i = 0; i < d->nslots && rc == 0; i++) {
        VixError e = vddk_g.fn.ConnectEx(pp.p, read_only, c->snapshot_moref, c->transport_modes,
                                         &d->slots[i].conn);
        if (e != VIX_OK) {
            d->slots[i].conn = NULL;
            rc = vddk_vix_fail(err, e,
                               "VixDiskLib_ConnectEx(server %s, vm %s, snapshot %s, transports %s, "
                               "handle %u of %u)",
                               vddk_or_null(c->server), vddk_or_null(c->vm_moref),
                               vddk_or_null(c->snapshot_moref), vddk_or_null(c->transport_modes),
                               i + 1, d->nslots);
        }
    }
    vddk_params_free(&pp); /* wipes the credential copies */
    if (rc != 0)
        return -1;

    uint32_t flags = (o->writable ? 0 : VIXDISKLIB_FLAG_OPEN_READ_ONLY) |
                     (o->single_link ? VIXDISKLIB_FLAG_OPEN_SINGLE_LINK : 0) |
                     (o->unbuffered ? VIXDISKLIB_FLAG_OPEN_UNBUFFERED : 0);
    for (unsigned i = 0; i < d->nslots; i++) {
        VixError e = vddk_g.fn.Open(d->slots[i].conn, o->path, flags, &d->slots[i].h);
        if (e != VIX_OK) {
            d->slots[i].h = NULL;
            return vddk_vix_fail(err, e, "VixDiskLib_Open(\"%s\", handle %u of %u)", o->path, i + 1,
                                 d->nslots);
        }
    }
    return 0;
}

/* GetInfo + GetTransportMode on the first slot.  Called with vddk_g.lock held. */
static int read_info_locked(vddk_disk *d, char *err)
{
    VixDiskLibInfo *vi = NULL;
    VixError e = vddk_g.fn.GetInfo(d->slots[0].h, &vi);
    if (e != VIX_OK)
        return vddk_vix_fail(err, e, "VixDiskLib_GetInfo(%s)", d->path);
    if (!vi)
        return vddk_fail(err, EIO, "VixDiskLib_GetInfo(%s) returned no info", d->path);
    vddk_info *info = &d->info;
    info->capacity_sectors = vi->capacity;
    info->adapter_type = vi->adapterType;
    info->num_links = vi->numLinks;
    if (vddk_g.major >= 7) {
        info->logical_sector_size = vi->logicalSectorSize;
        info->physical_sector_size = vi->physicalSectorSize;
    }
    vddk_bounded(info->uuid, sizeof info->uuid, "%s", vi->uuid ? vi->uuid : "");
    vddk_bounded(info->parent_hint, sizeof info->parent_hint, "%s",
                 vi->parentFileNameHint ? vi->parentFileNameHint : "");
    vddk_g.fn.FreeInfo(vi);
    if (info->capacity_sectors > UINT64_MAX / VDDK_SECTOR)
        return vddk_fail(err, EOVERFLOW,
                         "VixDiskLib_GetInfo(%s): capacity of %" PRIu64 " sectors overflows",
                         d->path, info->capacity_sectors);
    info->capacity = info->capacity_sectors * VDDK_SECTOR;

    const char *mode = vddk_g.fn.GetTransportMode(d->slots[0].h);
    vddk_bounded(info->transport, sizeof info->transport, "%s", mode ? mode : "");
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
        vddk_fail(err, ENOMEM, "vddk_open: out of memory");
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
        vddk_fail(err, ENOMEM, "vddk_open: out of memory");
        return NULL;
    }

    pthread_mutex_lock(&vddk_g.lock);
    int rc = vddk_init_locked(c->libpath, c->config_file, err);
    if (rc == 0)
        rc = open_slots_locked(d, c, o, err);
    if (rc == 0)
        rc = read_info_locked(d, err);
    int saved_errno = errno;
    uint64_t saved_code = vddk_tls_errcode;
    if (rc != 0) {
        close_slots_locked(d, NULL); /* may clobber errno: the first failure is reported */
    } else {
        vddk_g.open_disks++;
        d->info.lib_major = vddk_g.major;
        d->info.has_allocated_blocks = vddk_g.fn.QueryAllocatedBlocks != NULL;
        vddk_bounded(d->info.libfile, sizeof d->info.libfile, "%s", vddk_g.libfile);
    }
    pthread_mutex_unlock(&vddk_g.lock);
    if (rc != 0) {
        disk_free(d);
        errno = saved_errno;
        vddk_tls_errcode = saved_code;
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
    uint64_t saved_code = vddk_tls_errcode;
    char close_err[VDDK_ERRLEN];
    pthread_mutex_lock(&vddk_g.lock);
    if (close_slots_locked(d, close_err) != 0 && rc == 0) {
        memcpy(err, close_err, VDDK_ERRLEN);
        rc = -1;
        saved_errno = errno;
        saved_code = vddk_tls_errcode;
    }
    vddk_g.open_disks--;
    pthread_mutex_unlock(&vddk_g.lock);
    disk_free(d);
    errno = saved_errno; /* the first failure's */
    vddk_tls_errcode = saved_code;
    return rc;
}

int vddk_flush(vddk_disk *d, char *err)
{
    if (!d->writable)
        return 0;
    int rc = 0;
    for (unsigned i = 0; i < d->nslots && rc == 0; i++) {
        struct vddk_slot *s = vddk_slot_get(d);
        VixError e = vddk_g.fn.Flush(s->h);
        vddk_slot_put(d, s);
        if (e != VIX_OK)
            rc = vddk_vix_fail(err, e, "VixDiskLib_Flush(%s)", d->path);
    }
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Read and write                                                                            */
/* ---------------------------------------------------------------------------------------- */

static int vix_read(vddk_disk *d, struct vddk_slot *s, uint64_t sector, uint64_t n, uint8_t *buf,
                    char *err)
{
    VixError e = vddk_g.fn.Read(s->h, sector, n, buf);
    if (e != VIX_OK)
        return vddk_vix_fail(err, e,
                             "VixDiskLib_Read(%s, start sector %" PRIu64 ", %" PRIu64 " sectors)",
                             d->path, sector, n);
    return 0;
}

/* Read [pos, pos + n) (within the capacity) into dst.  Whole aligned sectors go straight into
 * the caller's buffer, up to io_sectors per call; a partial sector at either end is read whole
 * into the bounce buffer and the needed bytes copied out.  Under SAN, an unaligned destination
 * goes through the (then large) bounce buffer as well. */
static int read_range(vddk_disk *d, struct vddk_slot *s, uint64_t pos, uint8_t *dst, size_t n,
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

    struct vddk_slot *s = vddk_slot_get(d);
    int rc = read_range(d, s, offset, dst, valid, err);
    vddk_slot_put(d, s);
    return rc;
}

int vddk_write(vddk_disk *d, uint64_t offset, const void *buf, size_t len, char *err)
{
    if (!d->writable)
        return vddk_fail(err, EBADF, "vddk_write(%s): the disk was opened read-only", d->path);
    if (offset % VDDK_SECTOR || len % VDDK_SECTOR)
        return vddk_fail(err, EINVAL, "vddk_write(%s): offset %" PRIu64 " and length %zu must be "
                         "multiples of %u (VDDK writes whole sectors)", d->path, offset, len,
                         VDDK_SECTOR);
    if (offset > d->info.capacity || len > d->info.capacity - offset)
        return vddk_fail(err, ENOSPC, "vddk_write(%s): %zu bytes at offset %" PRIu64 " end past "
                         "the capacity of %" PRIu64 " bytes", d->path, len, offset,
                         d->info.capacity);

    const uint8_t *src = buf;
    uint64_t io = d->info.io_sectors;
    uint64_t sector = offset / VDDK_SECTOR, left = len / VDDK_SECTOR;
    struct vddk_slot *s = vddk_slot_get(d);
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
        VixError e = vddk_g.fn.Write(s->h, sector, ns, from);
        if (e != VIX_OK)
            rc = vddk_vix_fail(err, e,
                               "VixDiskLib_Write(%s, start sector %" PRIu64 ", %" PRIu64
                               " sectors)", d->path, sector, ns);
        src += ns * VDDK_SECTOR;
        sector += ns;
        left -= ns;
    }
    vddk_slot_put(d, s);
    return rc;
}
