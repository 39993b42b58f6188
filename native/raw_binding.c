/*
 * raw_binding.c: raw images (files and block devices) as Disks.
 *
 * The kernels are in rawdisk.c; this is their disk_ops table and open_raw().
 *
 * Part of native._native: included by module.c (one translation unit, so
 * these stay static); not compiled on its own.
 */

/* ---- raw images -------------------------------------------------------- */

typedef struct {
    int fd;
} raw_impl;

static int raw_read(void *impl, void *buf, size_t len, uint64_t off, char *err, size_t errlen)
{
    if (rd_pread_full(((raw_impl *)impl)->fd, buf, len, off) != 0) {
        int e = errno;
        snprintf(err, errlen, "read of %zu bytes at offset %llu failed: %s", len,
                 (unsigned long long)off, strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static int raw_write(void *impl, const void *buf, size_t len, uint64_t off, char *err,
                     size_t errlen)
{
    if (rd_pwrite_full(((raw_impl *)impl)->fd, buf, len, off) != 0) {
        int e = errno;
        snprintf(err, errlen, "write of %zu bytes at offset %llu failed: %s", len,
                 (unsigned long long)off, strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static uint64_t raw_size_of(int fd)
{
    off_t end = lseek(fd, 0, SEEK_END);
    return end < 0 ? 0 : (uint64_t)end;
}

static int raw_extents(void *impl, rd_extent **out, size_t *count, char *err, size_t errlen)
{
    int fd = ((raw_impl *)impl)->fd;
    if (rd_extents(fd, raw_size_of(fd), out, count) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot list allocated extents: %s", strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static int raw_extents_from(void *impl, uint64_t from, size_t max, rd_extent **out, size_t *count,
                            char *err, size_t errlen)
{
    int fd = ((raw_impl *)impl)->fd;
    if (rd_extents_from(fd, raw_size_of(fd), from, max, out, count) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot list allocated extents: %s", strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static int raw_finish(void *impl, char *err, size_t errlen)
{
    if (fsync(((raw_impl *)impl)->fd) != 0 && errno != EINVAL) {
        int e = errno;
        snprintf(err, errlen, "fsync failed: %s", strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static void raw_close(void *impl)
{
    close(((raw_impl *)impl)->fd);
    free(impl);
}

static const disk_ops raw_ops = {"raw", raw_read, raw_write, raw_extents, raw_finish, raw_close, 0,
                                 raw_extents_from};


PyDoc_STRVAR(open_raw_doc,
"open_raw(path, writable=False) -> Disk\n\n"
"Open a raw image (regular file or block device).");

static PyObject *mod_open_raw(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "writable", NULL};
    PyObject *path;
    int writable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|p", kwlist, PyUnicode_FSDecoder, &path,
                                     &writable))
        return NULL;
    PyObject *bytes = PyUnicode_EncodeFSDefault(path);
    if (!bytes) {
        Py_DECREF(path);
        return NULL;
    }
    char err[RD_ERRLEN] = "";
    uint64_t size = 0;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = rd_open(PyBytes_AS_STRING(bytes), writable, &size, err, sizeof err);
    Py_END_ALLOW_THREADS
    Py_DECREF(bytes);
    if (fd < 0) {
        raise_oserror(errno, err, path);
        Py_DECREF(path);
        return NULL;
    }
    raw_impl *impl = malloc(sizeof *impl);
    if (!impl) {
        close(fd);
        Py_DECREF(path);
        return PyErr_NoMemory();
    }
    impl->fd = fd;
    PyObject *d = disk_new_from(&raw_ops, impl, size, path);
    Py_DECREF(path);
    return d;
}
