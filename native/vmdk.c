/*
 * VMDK reader: opening (descriptor or sparse file), the extent map,
 * allocated areas and reads.  See vmdk.h for what and why.
 */
#define _GNU_SOURCE
#include "vmdk_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

int vmdk_fail(char *err, size_t errlen, int errnum, const char *path, const char *fmt, ...)
{
    if (err && errlen) {
        int n = 0;
        if (path)
            n = snprintf(err, errlen, "%s: ", path);
        if (n < 0)
            n = 0;
        if ((size_t)n < errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    errno = errnum ? errnum : EINVAL;
    return -1;
}

long long vmdk_pread_upto(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    size_t done = 0;
    if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off) {
        errno = EOVERFLOW;
        return -1;
    }
    while (done < len) {
        ssize_t got = pread(fd, p + done, len - done, (off_t)(off + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0)
            break;
        done += (size_t)got;
    }
    return (long long)done;
}

int vmdk_rangevec_push(vmdk_rangevec *rv, uint64_t start, uint64_t end)
{
    if (end <= start)
        return 0;
    if (rv->n > 0) {
        vmdk_range *last = &rv->v[rv->n - 1];
        if (start <= last->start + last->length) {
            if (end > last->start + last->length)
                last->length = end - last->start;
            return 0;
        }
    }
    if (rv->n == rv->cap) {
        size_t ncap = rv->cap ? rv->cap * 2 : 64;
        vmdk_range *nv = realloc(rv->v, ncap * sizeof(*nv));
        if (!nv)
            return -1;
        rv->v = nv;
        rv->cap = ncap;
    }
    rv->v[rv->n].start = start;
    rv->v[rv->n].length = end - start;
    rv->n++;
    return 0;
}

/* Opens a file read-only and learns its size; regular files and block
 * devices only.  Messages name `name` (the path as the user or the
 * descriptor wrote it), which may differ from the `path` opened.
 * Returns the fd or -1. */
static int open_sized(const char *path, const char *name, int oflags, uint64_t *size,
                      struct stat *st_out, char *err, size_t errlen)
{
    /* O_NONBLOCK: a FIFO named by a hostile descriptor must not hang open(). */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY | oflags);
    path = name;
    if (fd < 0)
        return vmdk_fail(err, errlen, errno, path, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return vmdk_fail(err, errlen, e, path, "cannot stat: %s", strerror(e));
    }
    if (st_out)
        *st_out = st;
    if (S_ISREG(st.st_mode)) {
        *size = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        uint64_t b = 0;
        if (ioctl(fd, BLKGETSIZE64, &b) != 0) {
            int e = errno;
            close(fd);
            return vmdk_fail(err, errlen, e, path, "cannot read block device size: %s",
                             strerror(e));
        }
        *size = b;
    } else {
        /* FIFOs, sockets, character devices: not disk data. */
        int dir = S_ISDIR(st.st_mode);
        close(fd);
        return vmdk_fail(err, errlen, dir ? EISDIR : EINVAL, path, "%s",
                         dir ? "is a directory, not a disk image"
                             : "is not a regular file or block device");
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
}

/* path of an extent file named in the descriptor at desc_path. */
static char *join_path(const char *desc_path, const char *name)
{
    if (name[0] == '/')
        return strdup(name);
    const char *slash = strrchr(desc_path, '/');
    size_t dn = slash ? (size_t)(slash - desc_path) + 1 : 0;
    size_t nn = strlen(name);
    if (dn + nn + 1 > PATH_MAX)
        return NULL;
    char *p = malloc(dn + nn + 1);
    if (!p)
        return NULL;
    memcpy(p, desc_path, dn);
    memcpy(p + dn, name, nn + 1);
    return p;
}

/* The real path of the directory holding the descriptor at desc_path
 * (malloc'ed), or NULL with errno set. */
static char *real_dir_of(const char *desc_path)
{
    const char *slash = strrchr(desc_path, '/');
    char *dir = !slash ? strdup(".")
              : slash == desc_path ? strdup("/")
                                   : strndup(desc_path, (size_t)(slash - desc_path));
    if (!dir)
        return NULL;
    char *real = realpath(dir, NULL);
    int e = errno;
    free(dir);
    errno = e;
    return real;
}

/* Whether the real path `real` lies inside the real directory `dir`. */
static int path_inside(const char *real, const char *dir)
{
    size_t n = strlen(dir);
    if (n == 1 && dir[0] == '/')
        return real[0] == '/';
    return strncmp(real, dir, n) == 0 && real[n] == '/';
}

/* Opens extent i's file (ex->path) for the descriptor d.  Unless external
 * extents are allowed, the name is resolved first and refused when it
 * leads outside dir, before anything is opened (opening is not harmless:
 * think of /dev/watchdog); the resolved path is opened without following a
 * last symbolic link, and the file actually opened is checked once more
 * through /proc, so a link swapped in meanwhile cannot lead elsewhere. */
static int open_extent(const vmdk_disk *d, size_t i, vmdk_ext *ex, const char *dir,
                       struct stat *st, char *err, size_t errlen)
{
    if (!dir)
        return open_sized(ex->path, ex->path, 0, &ex->file_size, st, err, errlen);
    char *real = realpath(ex->path, NULL);
    if (!real)
        return vmdk_fail(err, errlen, errno, ex->path, "cannot open: %s", strerror(errno));
    if (!path_inside(real, dir)) {
        vmdk_fail(err, errlen, EPERM, d->path,
                  "extent %zu is \"%.300s\" (%.300s), outside the descriptor's directory %.300s; "
                  "such an extent is not read unless external extents are allowed",
                  i + 1, ex->path, real, dir);
        free(real);
        return -1;
    }
    int fd = open_sized(real, ex->path, O_NOFOLLOW, &ex->file_size, st, err, errlen);
    free(real);
    if (fd < 0)
        return -1;
    char link[64], now[PATH_MAX + 1];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, now, PATH_MAX);
    if (n > 0) { /* no /proc: the check before the open stands alone */
        now[n] = '\0';
        if (!path_inside(now, dir)) {
            close(fd);
            return vmdk_fail(err, errlen, EPERM, d->path,
                             "extent %zu \"%.300s\" changed while it was opened and now leads "
                             "to %.300s, outside the descriptor's directory %.300s",
                             i + 1, ex->path, now, dir);
        }
    }
    return fd;
}

/* A sparse file's capacity must be the size its descriptor gives it: a
 * capacity of 0 would back up as an empty disk, and a disagreement means
 * the file is damaged or not the one the descriptor was written for. */
static int check_sparse_capacity(const char *path, const char *what, uint64_t capacity,
                                 int have_desc, uint64_t desc_sectors, char *err,
                                 size_t errlen)
{
    unsigned long long cap = (unsigned long long)(capacity / VMDK_SECTOR);
    if (capacity == 0 && !(have_desc && desc_sectors))
        return vmdk_fail(err, errlen, EINVAL, path,
                         "sparse header gives a capacity of 0 sectors: an empty disk");
    if (capacity == 0)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "sparse header gives a capacity of 0 sectors (an empty disk), but %s "
                         "%llu sectors",
                         what, (unsigned long long)desc_sectors);
    if (have_desc && desc_sectors != capacity / VMDK_SECTOR)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "%s %llu sectors, but the sparse header gives a capacity of %llu "
                         "sectors",
                         what, (unsigned long long)desc_sectors, cap);
    return 0;
}

void vmdk_close(vmdk_disk *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->n_ext; i++) {
        vmdk_ext *e = &d->ext[i];
        if (e->fd >= 0)
            close(e->fd);
        free(e->path);
        vmdk_sparse_free(e->sp);
    }
    free(d->ext);
    free(d->path);
    free(d);
}

static vmdk_disk *open_monolithic(vmdk_disk *d, int fd, uint64_t size, char *err,
                                  size_t errlen)
{
    vmdk_sparse *sp = NULL;
    char *text = NULL;
    if (vmdk_sparse_open(fd, d->path, size, &sp, &text, err, errlen) != 0) {
        close(fd);
        return NULL;
    }
    int embedded = text != NULL;
    if (embedded) {
        vmdk_descriptor desc;
        int rc = vmdk_descriptor_parse(text, strlen(text), 1, d->path, &desc, err, errlen);
        free(text);
        if (rc != 0) {
            vmdk_sparse_free(sp);
            close(fd);
            return NULL;
        }
        memcpy(d->create_type, desc.create_type, sizeof(d->create_type));
        int parent = desc.has_parent, have_lines = desc.embedded_lines > 0;
        uint64_t sectors = desc.embedded_sectors;
        vmdk_descriptor_free(&desc);
        if (!parent && check_sparse_capacity(d->path, "its embedded descriptor's extents add up to",
                                             sp->capacity, have_lines, sectors, err,
                                             errlen) != 0) {
            vmdk_sparse_free(sp);
            close(fd);
            return NULL;
        }
        if (parent) {
            vmdk_sparse_free(sp);
            close(fd);
            vmdk_fail(err, errlen, ENOTSUP, d->path,
                      "is a delta disk with a parent (parentCID is set); snapshot chains "
                      "are not supported");
            return NULL;
        }
    }
    if (!embedded && check_sparse_capacity(d->path, "", sp->capacity, 0, 0, err, errlen) != 0) {
        vmdk_sparse_free(sp);
        close(fd);
        return NULL;
    }
    d->ext = calloc(1, sizeof(*d->ext));
    char *p = strdup(d->path);
    if (!d->ext || !p) {
        free(p);
        vmdk_sparse_free(sp);
        close(fd);
        vmdk_fail(err, errlen, ENOMEM, d->path, "out of memory");
        return NULL;
    }
    d->n_ext = 1;
    d->ext[0] = (vmdk_ext){.kind = VMDK_EXT_SPARSE, .start = 0, .length = sp->capacity,
                           .fd = fd, .path = p, .file_size = size, .sp = sp};
    d->capacity = sp->capacity;
    return d;
}

static vmdk_disk *open_descriptor(vmdk_disk *d, int fd, uint64_t size, unsigned flags,
                                  char *err, size_t errlen)
{
    if (size > VMDK_MAX_DESCRIPTOR) {
        close(fd);
        vmdk_fail(err, errlen, EINVAL, d->path,
                  "not a VMDK: no sparse header magic, and at %llu bytes too large for a "
                  "text descriptor",
                  (unsigned long long)size);
        return NULL;
    }
    char *text = malloc((size_t)size + 1);
    if (!text) {
        close(fd);
        vmdk_fail(err, errlen, ENOMEM, d->path, "out of memory");
        return NULL;
    }
    long long got = vmdk_pread_upto(fd, text, (size_t)size, 0);
    int e = errno;
    close(fd);
    if (got < 0) {
        free(text);
        vmdk_fail(err, errlen, e, d->path, "cannot read: %s", strerror(e));
        return NULL;
    }
    text[got] = '\0';
    vmdk_descriptor desc;
    int rc = vmdk_descriptor_parse(text, (size_t)got, 0, d->path, &desc, err, errlen);
    free(text);
    if (rc != 0)
        return NULL;
    memcpy(d->create_type, desc.create_type, sizeof(d->create_type));
    if (desc.has_parent) {
        vmdk_descriptor_free(&desc);
        vmdk_fail(err, errlen, ENOTSUP, d->path,
                  "is a delta disk with a parent (parentCID is set); snapshot chains are not "
                  "supported");
        return NULL;
    }
    char *dir = NULL;
    if (!(flags & VMDK_OPEN_EXTERNAL_EXTENTS) && !(dir = real_dir_of(d->path))) {
        e = errno;
        vmdk_descriptor_free(&desc);
        vmdk_fail(err, errlen, e, d->path, "cannot resolve the descriptor's directory: %s",
                  strerror(e));
        return NULL;
    }
    struct file_id {
        dev_t dev;
        ino_t ino;
    } *ids = calloc(desc.n_ext, sizeof(*ids));
    size_t n_sparse = 0;
    d->ext = calloc(desc.n_ext, sizeof(*d->ext));
    if (!d->ext || !ids) {
        free(dir);
        free(ids);
        vmdk_descriptor_free(&desc);
        vmdk_fail(err, errlen, ENOMEM, d->path, "out of memory");
        return NULL;
    }
    uint64_t pos = 0;
    for (size_t i = 0; i < desc.n_ext; i++) {
        const vmdk_desc_extent *x = &desc.ext[i];
        vmdk_ext *ex = &d->ext[i];
        ex->fd = -1;
        d->n_ext = i + 1;
        uint64_t len = x->sectors * VMDK_SECTOR; /* sectors <= 2^41: no overflow */
        if (len > VMDK_MAX_CAPACITY - pos) {
            vmdk_fail(err, errlen, EINVAL, d->path,
                      "extents add up to more than the limit of %llu bytes (extent %zu)",
                      (unsigned long long)VMDK_MAX_CAPACITY, i + 1);
            goto fail;
        }
        ex->kind = x->kind;
        ex->start = pos;
        ex->length = len;
        pos += len;
        if (x->kind == VMDK_EXT_ZERO)
            continue;
        ex->path = join_path(d->path, x->file);
        if (!ex->path) {
            vmdk_fail(err, errlen, ENAMETOOLONG, d->path,
                      "extent %zu: file name \"%.200s\" is too long", i + 1, x->file);
            goto fail;
        }
        struct stat st;
        ex->fd = open_extent(d, i, ex, dir, &st, err, errlen);
        if (ex->fd < 0)
            goto fail;
        if (x->kind == VMDK_EXT_SPARSE) {
            /* Each sparse file once: a descriptor naming one file thousands
             * of times must not multiply its grain directory in memory, or
             * the work of listing extents. */
            for (size_t j = 0; j < n_sparse; j++) {
                if (ids[j].dev == st.st_dev && ids[j].ino == st.st_ino) {
                    vmdk_fail(err, errlen, EINVAL, ex->path,
                              "sparse extent %zu uses the same file as an earlier extent",
                              i + 1);
                    goto fail;
                }
            }
            ids[n_sparse].dev = st.st_dev;
            ids[n_sparse].ino = st.st_ino;
            n_sparse++;
        }
        if (x->kind == VMDK_EXT_FLAT) {
            ex->file_off = x->offset * VMDK_SECTOR;
            if (ex->file_off > ex->file_size || len > ex->file_size - ex->file_off) {
                vmdk_fail(err, errlen, EINVAL, ex->path,
                          "flat extent %zu needs %llu bytes at byte %llu, but the file has "
                          "only %llu bytes",
                          i + 1, (unsigned long long)len, (unsigned long long)ex->file_off,
                          (unsigned long long)ex->file_size);
                goto fail;
            }
        } else {
            unsigned char m[4];
            got = vmdk_pread_upto(ex->fd, m, 4, 0);
            if (got < 0) {
                vmdk_fail(err, errlen, errno, ex->path, "cannot read: %s", strerror(errno));
                goto fail;
            }
            if (got == 4 && vmdk_le32(m) == VMDK_COWD_MAGIC) {
                vmdk_fail(err, errlen, ENOTSUP, ex->path,
                          "COWD (vmfsSparse) extents are not supported");
                goto fail;
            }
            if (vmdk_sparse_open(ex->fd, ex->path, ex->file_size, &ex->sp, NULL, err,
                                 errlen) != 0)
                goto fail;
        }
    }
    /* After every extent is open, so that a file named twice is reported
     * as such rather than by its size. */
    for (size_t i = 0; i < desc.n_ext; i++) {
        const vmdk_ext *ex = &d->ext[i];
        char what[96];
        snprintf(what, sizeof what, "sparse extent %zu is given", i + 1);
        if (ex->kind == VMDK_EXT_SPARSE &&
            check_sparse_capacity(ex->path, what, ex->sp->capacity, 1,
                                  ex->length / VMDK_SECTOR, err, errlen) != 0)
            goto fail;
    }
    vmdk_descriptor_free(&desc);
    free(ids);
    free(dir);
    d->capacity = pos;
    return d;
fail:
    e = errno;
    vmdk_descriptor_free(&desc);
    free(ids);
    free(dir);
    errno = e;
    return NULL;
}

vmdk_disk *vmdk_open(const char *path, char *err, size_t errlen)
{
    return vmdk_open_flags(path, 0, err, errlen);
}

vmdk_disk *vmdk_open_flags(const char *path, unsigned flags, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    vmdk_disk *d = calloc(1, sizeof(*d));
    if (!d || !(d->path = strdup(path))) {
        free(d);
        vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
        return NULL;
    }
    uint64_t size = 0;
    int fd = open_sized(path, path, 0, &size, NULL, err, errlen);
    if (fd < 0) {
        vmdk_close(d);
        return NULL;
    }
    unsigned char m[4] = {0};
    long long got = vmdk_pread_upto(fd, m, 4, 0);
    if (got < 0) {
        int e = errno;
        close(fd);
        vmdk_fail(err, errlen, e, path, "cannot read: %s", strerror(e));
        vmdk_close(d);
        return NULL;
    }
    vmdk_disk *r;
    if (got == 4 && vmdk_le32(m) == VMDK_SPARSE_MAGIC) {
        r = open_monolithic(d, fd, size, err, errlen);
    } else if (got == 4 && vmdk_le32(m) == VMDK_COWD_MAGIC) {
        close(fd);
        vmdk_fail(err, errlen, ENOTSUP, path, "COWD (vmfsSparse) disks are not supported");
        r = NULL;
    } else {
        r = open_descriptor(d, fd, size, flags, err, errlen);
    }
    if (!r) {
        int e = errno;
        vmdk_close(d);
        errno = e;
    }
    return r;
}

uint64_t vmdk_capacity(const vmdk_disk *d)
{
    return d->capacity;
}

const char *vmdk_create_type(const vmdk_disk *d)
{
    return d->create_type;
}

/* Index of the extent holding byte off (< capacity). */
static size_t find_extent(const vmdk_disk *d, uint64_t off)
{
    size_t lo = 0, hi = d->n_ext;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (d->ext[mid].start <= off)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

int vmdk_read(vmdk_disk *d, void *buf, size_t len, uint64_t off, char *err, size_t errlen)
{
    unsigned char *p = buf;
    if (len == 0)
        return 0;
    if (off >= d->capacity) {
        memset(p, 0, len);
        return 0;
    }
    if (len > d->capacity - off) {
        size_t in = (size_t)(d->capacity - off);
        memset(p + in, 0, len - in);
        len = in;
    }
    size_t i = find_extent(d, off);
    while (len > 0 && i < d->n_ext) {
        const vmdk_ext *e = &d->ext[i];
        uint64_t rel = off - e->start;
        size_t n = e->length - rel < len ? (size_t)(e->length - rel) : len;
        if (e->kind == VMDK_EXT_ZERO) {
            memset(p, 0, n);
        } else if (e->kind == VMDK_EXT_FLAT) {
            long long got = vmdk_pread_upto(e->fd, p, n, e->file_off + rel);
            if (got < 0)
                return vmdk_fail(err, errlen, errno, e->path, "cannot read at byte %llu: %s",
                                 (unsigned long long)(e->file_off + rel), strerror(errno));
            if ((size_t)got != n)
                return vmdk_fail(err, errlen, EIO, e->path,
                                 "flat extent file ends at byte %llu, before the %zu bytes "
                                 "wanted at byte %llu (file shrank?)",
                                 (unsigned long long)(e->file_off + rel + (uint64_t)got), n,
                                 (unsigned long long)(e->file_off + rel));
        } else {
            if (vmdk_sparse_read(e, p, n, rel, err, errlen) != 0)
                return -1;
        }
        p += n;
        off += n;
        len -= n;
        i++;
    }
    if (len > 0)
        memset(p, 0, len);
    return 0;
}

static int flat_extents(const vmdk_ext *e, vmdk_rangevec *rv, char *err, size_t errlen)
{
    uint64_t pos = e->file_off, end = e->file_off + e->length;
    while (pos < end) {
        off_t data = lseek(e->fd, (off_t)pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break;
            if (errno == EINVAL || errno == ENOTSUP || errno == EOPNOTSUPP) {
                /* The filesystem cannot tell: the rest is data. */
                if (vmdk_rangevec_push(rv, e->start + (pos - e->file_off), e->start + e->length) != 0)
                    return vmdk_fail(err, errlen, ENOMEM, e->path, "out of memory");
                break;
            }
            return vmdk_fail(err, errlen, errno, e->path, "SEEK_DATA at byte %llu: %s",
                             (unsigned long long)pos, strerror(errno));
        }
        if ((uint64_t)data >= end)
            break;
        off_t hole = lseek(e->fd, data, SEEK_HOLE);
        if (hole < 0)
            return vmdk_fail(err, errlen, errno, e->path, "SEEK_HOLE at byte %llu: %s",
                             (unsigned long long)data, strerror(errno));
        uint64_t h = (uint64_t)hole < end ? (uint64_t)hole : end;
        if (h <= (uint64_t)data) /* defensive: never loop forever */
            h = end;
        if (vmdk_rangevec_push(rv, e->start + ((uint64_t)data - e->file_off),
                               e->start + (h - e->file_off)) != 0)
            return vmdk_fail(err, errlen, ENOMEM, e->path, "out of memory");
        pos = h;
    }
    return 0;
}

int vmdk_extents(vmdk_disk *d, vmdk_range **out, size_t *count, char *err, size_t errlen)
{
    vmdk_rangevec rv = {0};
    *out = NULL;
    *count = 0;
    for (size_t i = 0; i < d->n_ext; i++) {
        const vmdk_ext *e = &d->ext[i];
        int rc = 0;
        if (e->kind == VMDK_EXT_FLAT)
            rc = flat_extents(e, &rv, err, errlen);
        else if (e->kind == VMDK_EXT_SPARSE)
            rc = vmdk_sparse_extents(e, &rv, err, errlen);
        if (rc != 0) {
            int en = errno;
            free(rv.v);
            errno = en;
            return -1;
        }
    }
    *out = rv.v;
    *count = rv.n;
    return 0;
}
