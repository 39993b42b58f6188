/*
 * rawdisk: the raw-image reader behind blockvault's hot read path.
 *
 * A backup reads only the allocated parts of a sparse image, in large
 * chunk-aligned batches, from several threads at once.  This file holds the
 * pure C kernels for that (no Python.h), so they can be tested and profiled
 * on their own:
 *
 *   - rd_open: open a regular file or block device read-only and learn its size;
 *     refuses directories and other kinds with a clear message.
 *   - rd_extents: the allocated byte ranges, found with SEEK_DATA/SEEK_HOLE.
 *     A filesystem that cannot tell reports the whole file as one extent,
 *     which is always safe (holes then read as zeros and are dropped later).
 *   - rd_pread_full: positional read that retries short reads and EINTR and
 *     pads with zeros past the end of the file, so callers always get whole
 *     chunks.
 *   - rd_is_zero: all-zero test at memory bandwidth (memcmp against itself,
 *     shifted), used to keep zero chunks out of the store.
 *
 * Every function is re-entrant: callers run them concurrently with the GIL
 * released.
 */
#ifndef BLOCKVAULT_RAWDISK_H
#define BLOCKVAULT_RAWDISK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define RD_ERRLEN 512

typedef struct {
    uint64_t start;
    uint64_t length;
} rd_extent;

/* Returns an fd (>= 0) or -1 with errno set and a message in err. */
int rd_open(const char *path, int writable, uint64_t *size_out, char *err, size_t errlen);

/* Allocated extents of fd within [0, size).  *out is malloc'ed (free it).
 * Returns 0, or -1 with errno set. */
int rd_extents(int fd, uint64_t size, rd_extent **out, size_t *count);

/* The same from byte `from` on, at most max extents (the first one starts at
 * `from` or later): a caller pages through a fragmented file in batches, so
 * its memory does not grow with the number of extents. */
int rd_extents_from(int fd, uint64_t size, uint64_t from, size_t max, rd_extent **out,
                    size_t *count);

/* Reads len bytes at off; bytes past EOF read as zeros.  Returns 0 or -1
 * (errno set). */
int rd_pread_full(int fd, void *buf, size_t len, uint64_t off);

/* Writes len bytes at off, retrying short writes and EINTR.  0 or -1. */
int rd_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);

/* 1 when all len bytes are zero. */
int rd_is_zero(const void *buf, size_t len);

#endif
