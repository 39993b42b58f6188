/*
 * The one shape every disk reader in native/ has, so that the Python binding
 * (module.c) wraps raw images, VMDK files and VDDK disks alike: the engine
 * sees a single Disk type whatever the source.
 *
 * Each kind supplies a disk_ops table.  read and write are called with the
 * GIL released, possibly from several threads at once on one handle, so an
 * implementation must be safe for that (pread/pwrite, or its own lock).
 * Errors return -1 with errno set and a message in err; the binding adds the
 * path unless messages_name_file says the message has it already.
 */
#ifndef BLOCKVAULT_DISK_H
#define BLOCKVAULT_DISK_H

#include "rawdisk.h"

typedef struct disk_ops {
    const char *kind;
    int (*read)(void *impl, void *buf, size_t len, uint64_t off, char *err, size_t errlen);
    /* NULL when the kind is read-only. */
    int (*write)(void *impl, const void *buf, size_t len, uint64_t off, char *err, size_t errlen);
    int (*extents)(void *impl, rd_extent **out, size_t *count, char *err, size_t errlen);
    /* Makes written data durable and finishes the file; NULL when nothing to do. */
    int (*finish)(void *impl, char *err, size_t errlen);
    void (*close)(void *impl);
    /* 1 when err messages already name the file (VMDK: often an extent file,
     * not the one opened), so the binding must not add the path again. */
    int messages_name_file;
    /* At most max extents from byte `from` on (clipped to start there); NULL
     * when the kind lists everything at once (disk_type.c then keeps that
     * list, 16 bytes an extent, and pages through it). */
    int (*extents_from)(void *impl, uint64_t from, size_t max, rd_extent **out, size_t *count,
                        char *err, size_t errlen);
} disk_ops;

#endif
