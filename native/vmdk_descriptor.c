/*
 * VMDK text descriptors: "key=value" lines and extent lines
 *   ACCESS SECTORS TYPE ["file" [OFFSET]]
 * Only what the reader needs is kept (createType, whether there is a
 * parent, the extents); every other line is ignored.  Lines, names and
 * numbers are length- and overflow-checked; the text is never modified.
 */
#include "vmdk_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int is_ws(char c)
{
    return c == ' ' || c == '\t';
}

static int word_is(const char *p, size_t n, const char *w)
{
    return strlen(w) == n && memcmp(p, w, n) == 0;
}

/* Parses decimal digits at *pp into *v (no sign, no overflow). 0 or -1. */
static int parse_u64(const char **pp, const char *end, uint64_t *v)
{
    const char *p = *pp;
    uint64_t x = 0;
    if (p >= end || *p < '0' || *p > '9')
        return -1;
    while (p < end && *p >= '0' && *p <= '9') {
        unsigned d = (unsigned)(*p - '0');
        if (x > (UINT64_MAX - d) / 10)
            return -1;
        x = x * 10 + d;
        p++;
    }
    *pp = p;
    *v = x;
    return 0;
}

static int push_extent(vmdk_descriptor *out, size_t *cap, const vmdk_desc_extent *x)
{
    if (out->n_ext == *cap) {
        size_t ncap = *cap ? *cap * 2 : 8;
        vmdk_desc_extent *nv = realloc(out->ext, ncap * sizeof(*nv));
        if (!nv)
            return -1;
        out->ext = nv;
        *cap = ncap;
    }
    out->ext[out->n_ext++] = *x;
    return 0;
}

static int parse_extent(const char *p, const char *end, size_t lineno, const char *path,
                        vmdk_descriptor *out, size_t *cap, char *err, size_t errlen)
{
    vmdk_desc_extent x = {0};
    const char *w = p;
    if (out->n_ext >= VMDK_MAX_EXTENTS)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: more than %d extents", lineno, VMDK_MAX_EXTENTS);
    while (p < end && !is_ws(*p))
        p++;
    if (word_is(w, (size_t)(p - w), "NOACCESS"))
        return vmdk_fail(err, errlen, ENOTSUP, path,
                         "descriptor line %zu: NOACCESS extents cannot be read", lineno);
    while (p < end && is_ws(*p))
        p++;
    if (parse_u64(&p, end, &x.sectors) != 0 || (p < end && !is_ws(*p)))
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: extent size is not a sector count", lineno);
    if (x.sectors == 0 || x.sectors > VMDK_MAX_CAPACITY / VMDK_SECTOR)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: extent of %llu sectors (allowed 1 to %llu)",
                         lineno, (unsigned long long)x.sectors,
                         (unsigned long long)(VMDK_MAX_CAPACITY / VMDK_SECTOR));
    while (p < end && is_ws(*p))
        p++;
    w = p;
    while (p < end && !is_ws(*p))
        p++;
    size_t wn = (size_t)(p - w);
    if (word_is(w, wn, "FLAT") || word_is(w, wn, "VMFS"))
        x.kind = VMDK_EXT_FLAT;
    else if (word_is(w, wn, "SPARSE"))
        x.kind = VMDK_EXT_SPARSE;
    else if (word_is(w, wn, "ZERO"))
        x.kind = VMDK_EXT_ZERO;
    else if (word_is(w, wn, "VMFSSPARSE") || word_is(w, wn, "SESPARSE") ||
             word_is(w, wn, "VMFSRDM") || word_is(w, wn, "VMFSRAW"))
        return vmdk_fail(err, errlen, ENOTSUP, path,
                         "descriptor line %zu: %.*s extents are not supported", lineno,
                         (int)wn, w);
    else
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: unknown extent type '%.*s'", lineno,
                         (int)(wn > 32 ? 32 : wn), w);
    while (p < end && is_ws(*p))
        p++;
    if (x.kind == VMDK_EXT_ZERO) {
        if (p != end)
            return vmdk_fail(err, errlen, EINVAL, path,
                             "descriptor line %zu: unexpected text after a ZERO extent", lineno);
        if (push_extent(out, cap, &x) != 0)
            return vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
        return 0;
    }
    if (p >= end || *p != '"')
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: extent file name missing (expected \"name\")",
                         lineno);
    p++;
    const char *name = p;
    while (p < end && *p != '"')
        p++;
    if (p >= end)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: extent file name has no closing quote", lineno);
    size_t nn = (size_t)(p - name);
    if (nn == 0 || nn > 4095)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: extent file name of %zu bytes", lineno, nn);
    p++;
    while (p < end && is_ws(*p))
        p++;
    if (p < end) {
        if (parse_u64(&p, end, &x.offset) != 0 ||
            x.offset > (UINT64_C(1) << 62) / VMDK_SECTOR)
            return vmdk_fail(err, errlen, EINVAL, path,
                             "descriptor line %zu: extent offset is not a sector count", lineno);
        while (p < end && is_ws(*p))
            p++;
        if (p != end)
            return vmdk_fail(err, errlen, EINVAL, path,
                             "descriptor line %zu: unexpected text after the extent offset",
                             lineno);
    }
    if (x.kind == VMDK_EXT_SPARSE && x.offset != 0)
        return vmdk_fail(err, errlen, EINVAL, path,
                         "descriptor line %zu: SPARSE extent with an offset (%llu)", lineno,
                         (unsigned long long)x.offset);
    x.file = malloc(nn + 1);
    if (!x.file)
        return vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
    memcpy(x.file, name, nn);
    x.file[nn] = '\0';
    if (push_extent(out, cap, &x) != 0) {
        free(x.file);
        return vmdk_fail(err, errlen, ENOMEM, path, "out of memory");
    }
    return 0;
}

int vmdk_descriptor_parse(const char *text, size_t len, int embedded, const char *path,
                          vmdk_descriptor *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    size_t n = strnlen(text, len);
    if (n > VMDK_MAX_DESCRIPTOR)
        return vmdk_fail(err, errlen, EINVAL, path, "descriptor of %zu bytes is too large",
                         n);
    size_t cap = 0, lineno = 0, pos = 0;
    int have_create = 0;
    while (pos < n) {
        lineno++;
        const char *line = text + pos;
        const char *nl = memchr(line, '\n', n - pos);
        size_t ll = nl ? (size_t)(nl - line) : n - pos;
        pos += ll + (nl ? 1 : 0);
        if (ll > VMDK_MAX_LINE)
            goto toolong;
        const char *p = line, *end = line + ll;
        while (end > p && (end[-1] == '\r' || is_ws(end[-1])))
            end--;
        while (p < end && is_ws(*p))
            p++;
        if (p == end || *p == '#')
            continue;
        const char *w = p;
        while (w < end && !is_ws(*w) && *w != '=')
            w++;
        size_t wn = (size_t)(w - p);
        if (w < end && is_ws(*w) &&
            (word_is(p, wn, "RW") || word_is(p, wn, "RDONLY") || word_is(p, wn, "NOACCESS"))) {
            if (embedded) {
                /* A sparse file's own extent line: it names the file itself,
                 * but its size must agree with the header (vmdk.c checks). */
                const char *q = w;
                uint64_t sectors;
                while (q < end && is_ws(*q))
                    q++;
                if (parse_u64(&q, end, &sectors) == 0) {
                    out->embedded_lines++;
                    out->embedded_sectors = sectors > UINT64_MAX - out->embedded_sectors
                                                ? UINT64_MAX
                                                : out->embedded_sectors + sectors;
                }
                continue;
            }
            if (parse_extent(p, end, lineno, path, out, &cap, err, errlen) != 0)
                goto fail;
            continue;
        }
        const char *eq = memchr(p, '=', (size_t)(end - p));
        if (!eq)
            continue;
        const char *k = p, *ke = eq;
        while (ke > k && is_ws(ke[-1]))
            ke--;
        const char *v = eq + 1, *ve = end;
        while (v < ve && is_ws(*v))
            v++;
        if (ve - v >= 2 && *v == '"' && ve[-1] == '"') {
            v++;
            ve--;
        }
        size_t kn = (size_t)(ke - k), vn = (size_t)(ve - v);
        if (word_is(k, kn, "createType")) {
            if (vn == 0 || vn >= sizeof(out->create_type)) {
                vmdk_fail(err, errlen, EINVAL, path,
                          "descriptor line %zu: createType of %zu bytes", lineno, vn);
                goto fail;
            }
            memcpy(out->create_type, v, vn);
            out->create_type[vn] = '\0';
            have_create = 1;
        } else if (word_is(k, kn, "parentCID")) {
            if (!(vn == 8 && strncasecmp(v, "ffffffff", 8) == 0))
                out->has_parent = 1;
        }
    }
    if (!embedded) {
        if (!have_create) {
            vmdk_fail(err, errlen, EINVAL, path,
                      "not a VMDK: no sparse header magic and no createType in a descriptor");
            goto fail;
        }
        if (out->n_ext == 0) {
            vmdk_fail(err, errlen, EINVAL, path, "descriptor lists no extents");
            goto fail;
        }
    }
    return 0;
toolong:
    vmdk_fail(err, errlen, EINVAL, path, "descriptor line %zu is longer than %d bytes", lineno,
              VMDK_MAX_LINE);
fail:
    vmdk_descriptor_free(out);
    return -1;
}

void vmdk_descriptor_free(vmdk_descriptor *d)
{
    for (size_t i = 0; i < d->n_ext; i++)
        free(d->ext[i].file);
    free(d->ext);
    d->ext = NULL;
    d->n_ext = 0;
}
