/* Raw sparse image kernels; see rawdisk.h for why they exist. */
#define _GNU_SOURCE
#include "rawdisk.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

int rd_open(const char *path, int writable, uint64_t *size_out, char *err, size_t errlen)
{
    int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot open disk image: %s", strerror(e));
        errno = e;
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        snprintf(err, errlen, "cannot stat disk image: %s", strerror(e));
        errno = e;
        return -1;
    }
    if (S_ISREG(st.st_mode)) {
        *size_out = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        uint64_t bytes = 0;
        if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
            int e = errno;
            close(fd);
            snprintf(err, errlen, "cannot read block device size: %s", strerror(e));
            errno = e;
            return -1;
        }
        *size_out = bytes;
    } else {
        close(fd);
        snprintf(err, errlen, "%s",
                 S_ISDIR(st.st_mode) ? "is a directory, not a disk image"
                                     : "is not a regular file or block device");
        errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        return -1;
    }
    return fd;
}

static int push_extent(rd_extent **v, size_t *n, size_t *cap, uint64_t start, uint64_t end)
{
    if (end <= start)
        return 0;
    if (*n > 0 && (*v)[*n - 1].start + (*v)[*n - 1].length == start) {
        (*v)[*n - 1].length += end - start;
        return 0;
    }
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 64;
        rd_extent *nv = realloc(*v, ncap * sizeof(**v));
        if (!nv) {
            errno = ENOMEM;
            return -1;
        }
        *v = nv;
        *cap = ncap;
    }
    (*v)[*n].start = start;
    (*v)[*n].length = end - start;
    (*n)++;
    return 0;
}

int rd_extents(int fd, uint64_t size, rd_extent **out, size_t *count)
{
    return rd_extents_from(fd, size, 0, SIZE_MAX, out, count);
}

int rd_extents_from(int fd, uint64_t size, uint64_t from, size_t max, rd_extent **out, size_t *count)
{
    rd_extent *v = NULL;
    size_t n = 0, cap = 0;
    uint64_t pos = from;

    while (pos < size && n < max) {
        off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break; /* only a hole remains */
            if (errno == EINVAL || errno == ENOTSUP || errno == EOPNOTSUPP) {
                /* Filesystem (or block device) cannot tell: all of it. */
                n = 0;
                if (push_extent(&v, &n, &cap, from, size) != 0)
                    goto fail;
                break;
            }
            goto fail;
        }
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            goto fail;
        uint64_t end = (uint64_t)hole < size ? (uint64_t)hole : size;
        if (push_extent(&v, &n, &cap, (uint64_t)data, end) != 0)
            goto fail;
        if ((uint64_t)hole <= pos) /* defensive: never loop forever */
            break;
        pos = (uint64_t)hole;
    }
    *out = v;
    *count = n;
    return 0;
fail:
    {
        int e = errno;
        free(v);
        errno = e;
        return -1;
    }
}

int rd_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t got = pread(fd, p, len, (off_t)off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0) { /* end of file: the rest reads as zeros */
            memset(p, 0, len);
            return 0;
        }
        p += got;
        off += (uint64_t)got;
        len -= (size_t)got;
    }
    return 0;
}

int rd_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
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

int rd_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    /* Check a short prefix byte-wise, then compare the buffer with itself
     * shifted by that prefix: memcmp runs at memory bandwidth. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    if (len <= 16)
        return 1;
    return memcmp(p, p + 16, len - 16) == 0;
}
