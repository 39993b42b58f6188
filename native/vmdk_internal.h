/*
 * Shared between the vmdk_*.c files only; the public API is vmdk.h.
 * Names here are prefixed vmdk_ too, so they never collide with the rest
 * of the extension when everything is linked into one module.
 */
#ifndef BLOCKVAULT_VMDK_INTERNAL_H
#define BLOCKVAULT_VMDK_INTERNAL_H

#include "vmdk.h"

#include <stdarg.h>

#define VMDK_SECTOR 512u

/* KDMV header layout (little-endian), offsets in bytes. */
#define VMDK_SPARSE_MAGIC 0x564d444bu /* "KDMV" read as little-endian u32 */
#define VMDK_COWD_MAGIC 0x44574f43u   /* "COWD" */
#define VMDK_FLAG_NL_TEST 0x1u
#define VMDK_FLAG_RGD 0x2u
#define VMDK_FLAG_ZERO_GTE 0x4u
#define VMDK_FLAG_COMPRESSED 0x10000u
#define VMDK_FLAG_MARKERS 0x20000u
#define VMDK_GD_AT_END UINT64_C(0xffffffffffffffff)
#define VMDK_MARKER_EOS 0u
#define VMDK_MARKER_GT 1u
#define VMDK_MARKER_GD 2u
#define VMDK_MARKER_FOOTER 3u

/* Limits on sparse headers (see vmdk.h for the rest). */
#define VMDK_MAX_GRAIN_SECTORS 2048u /* 1 MiB */
#define VMDK_MAX_GTES 4096u

/* A sparse (KDMV) extent file, normal or stream-optimized. */
typedef struct {
    uint32_t version;
    uint32_t flags;
    uint64_t capacity;     /* bytes, from the header (or footer) */
    uint64_t grain_bytes;
    uint32_t grain_sectors;
    uint32_t gtes;         /* entries per grain table */
    uint64_t gt_span;      /* bytes of virtual disk one grain table covers */
    uint32_t gd_entries;
    uint32_t *gd;          /* grain table sectors; 0 = none */
    int zero_gte;          /* a grain table entry of 1 means "zeros" */
    int compressed;        /* grains are deflate streams */
    int markers;           /* grains start with a 12-byte marker */
    uint64_t gd_offset;    /* sectors, for messages */
} vmdk_sparse;

enum { VMDK_EXT_FLAT, VMDK_EXT_ZERO, VMDK_EXT_SPARSE };

typedef struct {
    int kind;
    uint64_t start;     /* virtual byte offset */
    uint64_t length;    /* bytes */
    int fd;             /* -1 for ZERO */
    char *path;         /* for messages; NULL for ZERO */
    uint64_t file_off;  /* FLAT: byte offset in the file */
    uint64_t file_size;
    vmdk_sparse *sp;    /* SPARSE */
} vmdk_ext;

struct vmdk_disk {
    char *path;
    char create_type[64];
    uint64_t capacity;
    size_t n_ext;
    vmdk_ext *ext;
};

/* One parsed descriptor extent line. */
typedef struct {
    int kind;           /* VMDK_EXT_* */
    uint64_t sectors;
    uint64_t offset;    /* sectors (FLAT) */
    char *file;         /* as written, NULL for ZERO */
} vmdk_desc_extent;

typedef struct {
    char create_type[64];
    int has_parent;
    size_t n_ext;
    vmdk_desc_extent *ext;
    /* Embedded descriptors only: how many extent lines, and the sectors they
     * add up to (saturating), to check against the sparse header's capacity. */
    size_t embedded_lines;
    uint64_t embedded_sectors;
} vmdk_descriptor;

/* Formats "<path>: <message>" into err, sets errno to errnum, returns -1. */
int vmdk_fail(char *err, size_t errlen, int errnum, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* pread until len bytes are in or EOF.  Returns bytes read (may be short
 * at EOF) or -1 with errno set. */
long long vmdk_pread_upto(int fd, void *buf, size_t len, uint64_t off);

/* Parses text (len bytes, stops at the first NUL).  embedded: the text came
 * from inside a sparse file, so extent lines are not required.  Fills *out
 * (free with vmdk_descriptor_free).  Returns 0 or -1 with err set. */
int vmdk_descriptor_parse(const char *text, size_t len, int embedded, const char *path,
                          vmdk_descriptor *out, char *err, size_t errlen);
void vmdk_descriptor_free(vmdk_descriptor *d);

/* Reads and checks the header (or the footer of a stream file) of the
 * KDMV file open on fd, loads and checks its grain directory.  If desc is
 * not NULL and the file embeds a descriptor, *desc receives it as a
 * malloc'ed NUL-terminated string (else NULL). */
int vmdk_sparse_open(int fd, const char *path, uint64_t file_size, vmdk_sparse **out,
                     char **desc, char *err, size_t errlen);
void vmdk_sparse_free(vmdk_sparse *sp);

/* Reads len bytes at virtual offset off of the sparse extent (zeros past
 * its capacity). */
int vmdk_sparse_read(const vmdk_ext *e, void *buf, size_t len, uint64_t off,
                     char *err, size_t errlen);

/* Appends the allocated grains of the extent, clipped to [0, e->length)
 * and shifted by e->start, to the growing range vector. */
typedef struct {
    vmdk_range *v;
    size_t n, cap;
} vmdk_rangevec;
int vmdk_rangevec_push(vmdk_rangevec *rv, uint64_t start, uint64_t end);
int vmdk_sparse_extents(const vmdk_ext *e, vmdk_rangevec *rv, char *err, size_t errlen);

static inline uint32_t vmdk_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t vmdk_le64(const unsigned char *p)
{
    return (uint64_t)vmdk_le32(p) | (uint64_t)vmdk_le32(p + 4) << 32;
}

static inline void vmdk_put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void vmdk_put_le64(unsigned char *p, uint64_t v)
{
    vmdk_put_le32(p, (uint32_t)v);
    vmdk_put_le32(p + 4, (uint32_t)(v >> 32));
}

#endif
