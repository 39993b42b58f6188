/*
 * native._native: the Python face of blockvault's disk readers.
 *
 * One type, Disk, wraps any disk_ops implementation (disk.h).  The methods
 * that move data (read_chunks, read, write) and zero_chunks release the GIL
 * so a thread pool in the engine keeps both cores busy.  A Disk counts the
 * calls in flight and refuses to close under them, so a thread that is still
 * reading can never touch a freed handle.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "disk.h"
#include "rawdisk.h"
#include "vddk.h"
#include "vmdk.h"

typedef struct {
    PyObject_HEAD
    const disk_ops *ops;
    void *impl;
    uint64_t size;
    PyObject *path;
    PyObject *info;    /* dict: what the reader learned (format, transport...) */
    Py_ssize_t active; /* calls running with the GIL released */
} DiskObject;

static PyTypeObject DiskType;

/* OSError(errno, message, path): the engine reports both to the user. */
static PyObject *raise_oserror(int err, const char *msg, PyObject *path)
{
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "isO", err ? err : EIO, msg,
                                          path ? path : Py_None);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *disk_err_path(DiskObject *self)
{
    return self->ops->messages_name_file ? NULL : self->path;
}

static int disk_check_open(DiskObject *self)
{
    if (self->impl == NULL) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on a closed disk");
        return -1;
    }
    return 0;
}

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

static const disk_ops raw_ops = {"raw", raw_read, raw_write, raw_extents, raw_finish, raw_close, 0};

/* ---- hosted VMDK files (vmdk.h) ----------------------------------------- */

static int vmdk_ops_read(void *impl, void *buf, size_t len, uint64_t off, char *err, size_t errlen)
{
    return vmdk_read(impl, buf, len, off, err, errlen);
}

static int vmdk_ops_extents(void *impl, rd_extent **out, size_t *count, char *err, size_t errlen)
{
    /* vmdk_range has rd_extent's layout (vmdk.h says so). */
    return vmdk_extents(impl, (vmdk_range **)out, count, err, errlen);
}

static void vmdk_ops_close(void *impl)
{
    vmdk_close(impl);
}

static const disk_ops vmdk_ops = {"vmdk", vmdk_ops_read, NULL, vmdk_ops_extents, NULL, vmdk_ops_close, 1};

static int vmdkw_read(void *impl, void *buf, size_t len, uint64_t off, char *err, size_t errlen)
{
    (void)impl, (void)buf, (void)len, (void)off;
    snprintf(err, errlen, "a VMDK being written cannot be read back before it is finished");
    errno = EBADF;
    return -1;
}

static int vmdkw_write(void *impl, const void *buf, size_t len, uint64_t off, char *err,
                       size_t errlen)
{
    return vmdk_writer_write(impl, buf, len, off, err, errlen);
}

static int vmdkw_extents(void *impl, rd_extent **out, size_t *count, char *err, size_t errlen)
{
    (void)impl, (void)err, (void)errlen;
    *out = NULL;
    *count = 0;
    return 0;
}

static int vmdkw_finish(void *impl, char *err, size_t errlen)
{
    return vmdk_writer_finish(impl, err, errlen);
}

static void vmdkw_close(void *impl)
{
    vmdk_writer_close(impl);
}

static const disk_ops vmdk_writer_ops = {"vmdk-writer", vmdkw_read, vmdkw_write, vmdkw_extents,
                                         vmdkw_finish, vmdkw_close, 1};

/* ---- vSphere disks through VDDK (vddk.h) ------------------------------------ */

static int vddk_ops_read(void *impl, void *buf, size_t len, uint64_t off, char *err, size_t errlen)
{
    (void)errlen; /* err is RD_ERRLEN = VDDK_ERRLEN bytes */
    return vddk_read(impl, off, buf, len, err);
}

static int vddk_ops_write(void *impl, const void *buf, size_t len, uint64_t off, char *err,
                          size_t errlen)
{
    (void)errlen;
    return vddk_write(impl, off, buf, len, err);
}

static int vddk_ops_extents(void *impl, rd_extent **out, size_t *count, char *err, size_t errlen)
{
    (void)errlen;
    vddk_extent *v = NULL;
    if (vddk_extents(impl, 0, vddk_capacity(impl), &v, count, err) != 0)
        return -1;
    /* Same layout as rd_extent (vddk.h); vddk_free_extents is free(). */
    *out = (rd_extent *)v;
    return 0;
}

static int vddk_ops_finish(void *impl, char *err, size_t errlen)
{
    (void)errlen;
    return vddk_flush(impl, err);
}

static void vddk_ops_close(void *impl)
{
    char err[VDDK_ERRLEN];
    vddk_close(impl, err);
}

static const disk_ops vddk_ops = {"vddk", vddk_ops_read, vddk_ops_write, vddk_ops_extents,
                                  vddk_ops_finish, vddk_ops_close, 0};

/* ---- Disk ---------------------------------------------------------------- */

static PyObject *disk_new_from(const disk_ops *ops, void *impl, uint64_t size, PyObject *path)
{
    DiskObject *d = PyObject_New(DiskObject, &DiskType);
    if (!d) {
        ops->close(impl);
        return NULL;
    }
    d->ops = ops;
    d->impl = impl;
    d->size = size;
    d->active = 0;
    Py_INCREF(path);
    d->path = path;
    d->info = PyDict_New();
    if (!d->info) {
        Py_DECREF(d);
        return NULL;
    }
    return (PyObject *)d;
}

static void disk_dealloc(DiskObject *self)
{
    if (self->impl)
        self->ops->close(self->impl);
    Py_XDECREF(self->path);
    Py_XDECREF(self->info);
    PyObject_Free(self);
}

PyDoc_STRVAR(read_chunks_doc,
"read_chunks(offsets, chunk_size, buffer)\n\n"
"Read len(offsets) chunks of chunk_size bytes into consecutive slots of the\n"
"writable buffer; adjacent offsets are merged into one large read.  Bytes\n"
"past the end of the disk read as zeros.");

static PyObject *disk_read_chunks(DiskObject *self, PyObject *args)
{
    PyObject *offsets_obj;
    Py_ssize_t chunk_size;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "Onw*", &offsets_obj, &chunk_size, &view))
        return NULL;
    PyObject *result = NULL;
    uint64_t *offs = NULL;
    PyObject *seq = NULL;
    if (disk_check_open(self) != 0)
        goto out;
    if (chunk_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
        goto out;
    }
    seq = PySequence_Fast(offsets_obj, "offsets must be a sequence of integers");
    if (!seq)
        goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > view.len / chunk_size) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes cannot hold %zd chunks of %zd bytes",
                     view.len, n, chunk_size);
        goto out;
    }
    offs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (!offs) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred())
            goto out;
        offs[i] = v;
    }
    char err[RD_ERRLEN] = "";
    int rc = 0, saved = 0;
    self->active++;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < n && rc == 0) {
        Py_ssize_t j = i + 1;
        /* Merge runs of adjacent chunks, capped so one call stays bounded. */
        while (j < n && offs[j] == offs[j - 1] + (uint64_t)chunk_size &&
               (j - i) * chunk_size < (64 << 20))
            j++;
        rc = self->ops->read(self->impl, (char *)view.buf + i * chunk_size,
                             (size_t)((j - i) * chunk_size), offs[i], err, sizeof err);
        if (rc != 0)
            saved = errno;
        i = j;
    }
    Py_END_ALLOW_THREADS
    self->active--;
    if (rc != 0) {
        raise_oserror(saved, err, disk_err_path(self));
        goto out;
    }
    result = Py_NewRef(Py_None);
out:
    PyMem_Free(offs);
    Py_XDECREF(seq);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(read_doc, "read(offset, length) -> bytes\n\nSmall positional read; zeros past the end.");

static PyObject *disk_read(DiskObject *self, PyObject *args)
{
    unsigned long long off;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Kn", &off, &len))
        return NULL;
    if (disk_check_open(self) != 0)
        return NULL;
    if (len < 0) {
        PyErr_SetString(PyExc_ValueError, "length must not be negative");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, len);
    if (!out)
        return NULL;
    char err[RD_ERRLEN] = "";
    int rc, saved = 0;
    self->active++;
    Py_BEGIN_ALLOW_THREADS
    rc = self->ops->read(self->impl, PyBytes_AS_STRING(out), (size_t)len, off, err, sizeof err);
    if (rc != 0)
        saved = errno;
    Py_END_ALLOW_THREADS
    self->active--;
    if (rc != 0) {
        Py_DECREF(out);
        return raise_oserror(saved, err, disk_err_path(self));
    }
    return out;
}

PyDoc_STRVAR(write_doc, "write(offset, buffer)\n\nPositional write of the whole buffer.");

static PyObject *disk_write(DiskObject *self, PyObject *args)
{
    unsigned long long off;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "Ky*", &off, &view))
        return NULL;
    PyObject *result = NULL;
    if (disk_check_open(self) != 0)
        goto out;
    if (!self->ops->write) {
        PyErr_Format(PyExc_OSError, "%s disks are read-only", self->ops->kind);
        goto out;
    }
    char err[RD_ERRLEN] = "";
    int rc, saved = 0;
    self->active++;
    Py_BEGIN_ALLOW_THREADS
    rc = self->ops->write(self->impl, view.buf, (size_t)view.len, off, err, sizeof err);
    if (rc != 0)
        saved = errno;
    Py_END_ALLOW_THREADS
    self->active--;
    if (rc != 0) {
        raise_oserror(saved, err, disk_err_path(self));
        goto out;
    }
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(extents_doc,
"extents() -> list[tuple[int, int]]\n\n"
"Allocated (start, length) byte ranges, sorted and merged: the local\n"
"equivalent of queryChangedDiskAreas(\"*\").");

static PyObject *disk_extents(DiskObject *self, PyObject *Py_UNUSED(ignored))
{
    if (disk_check_open(self) != 0)
        return NULL;
    rd_extent *v = NULL;
    size_t n = 0;
    char err[RD_ERRLEN] = "";
    int rc, saved = 0;
    self->active++;
    Py_BEGIN_ALLOW_THREADS
    rc = self->ops->extents(self->impl, &v, &n, err, sizeof err);
    if (rc != 0)
        saved = errno;
    Py_END_ALLOW_THREADS
    self->active--;
    if (rc != 0)
        return raise_oserror(saved, err, disk_err_path(self));
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)v[i].start,
                                    (unsigned long long)v[i].length);
        if (!t) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    free(v);
    return list;
}

PyDoc_STRVAR(finish_doc, "finish()\n\nMake written data durable (and complete the file format).");

static PyObject *disk_finish(DiskObject *self, PyObject *Py_UNUSED(ignored))
{
    if (disk_check_open(self) != 0)
        return NULL;
    if (!self->ops->finish)
        Py_RETURN_NONE;
    char err[RD_ERRLEN] = "";
    int rc, saved = 0;
    self->active++;
    Py_BEGIN_ALLOW_THREADS
    rc = self->ops->finish(self->impl, err, sizeof err);
    if (rc != 0)
        saved = errno;
    Py_END_ALLOW_THREADS
    self->active--;
    if (rc != 0)
        return raise_oserror(saved, err, disk_err_path(self));
    Py_RETURN_NONE;
}

static PyObject *disk_close(DiskObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->active > 0) {
        PyErr_SetString(PyExc_RuntimeError, "disk is closed while calls are still running on it");
        return NULL;
    }
    if (self->impl) {
        self->ops->close(self->impl);
        self->impl = NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *disk_enter(DiskObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *disk_exit(DiskObject *self, PyObject *Py_UNUSED(args))
{
    PyObject *r = disk_close(self, NULL);
    if (!r)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *disk_get_size(DiskObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->size);
}

static PyObject *disk_get_path(DiskObject *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->path);
}

static PyObject *disk_get_kind(DiskObject *self, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(self->ops->kind);
}

static PyObject *disk_get_info(DiskObject *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->info);
}

static PyObject *disk_get_transport(DiskObject *self, void *Py_UNUSED(c))
{
    PyObject *t = PyDict_GetItemString(self->info, "transport");
    return Py_NewRef(t ? t : Py_None);
}

static PyObject *disk_get_closed(DiskObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->impl == NULL);
}

static PyObject *disk_repr(DiskObject *self)
{
    return PyUnicode_FromFormat("<native.Disk %s %R size=%llu%s>", self->ops->kind, self->path,
                                (unsigned long long)self->size, self->impl ? "" : " closed");
}

static PyMethodDef disk_methods[] = {
    {"read_chunks", (PyCFunction)disk_read_chunks, METH_VARARGS, read_chunks_doc},
    {"read", (PyCFunction)disk_read, METH_VARARGS, read_doc},
    {"write", (PyCFunction)disk_write, METH_VARARGS, write_doc},
    {"extents", (PyCFunction)disk_extents, METH_NOARGS, extents_doc},
    {"finish", (PyCFunction)disk_finish, METH_NOARGS, finish_doc},
    {"close", (PyCFunction)disk_close, METH_NOARGS, "close()"},
    {"__enter__", (PyCFunction)disk_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)disk_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef disk_getset[] = {
    {"size", (getter)disk_get_size, NULL, "capacity in bytes", NULL},
    {"path", (getter)disk_get_path, NULL, "what was opened", NULL},
    {"kind", (getter)disk_get_kind, NULL, "raw, vmdk, vmdk-writer or vddk", NULL},
    {"closed", (getter)disk_get_closed, NULL, NULL, NULL},
    {"info", (getter)disk_get_info, NULL, "what the reader learned about the disk", NULL},
    {"transport", (getter)disk_get_transport, NULL, "VDDK transport mode used, else None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DiskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "native._native.Disk",
    .tp_basicsize = sizeof(DiskObject),
    .tp_dealloc = (destructor)disk_dealloc,
    .tp_repr = (reprfunc)disk_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A disk opened by one of native's readers (open_raw, ...).",
    .tp_methods = disk_methods,
    .tp_getset = disk_getset,
};

/* ---- module functions ---------------------------------------------------- */

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

/* Encodes a path argument for C; on failure returns NULL with the error set. */
static PyObject *fs_encode(PyObject *path)
{
    return PyUnicode_EncodeFSDefault(path);
}

PyDoc_STRVAR(open_vmdk_doc,
"open_vmdk(path) -> Disk\n\n"
"Open a hosted VMDK read-only: a descriptor (flat, vmfs, twoGbMaxExtent*),\n"
"monolithicSparse or streamOptimized.  info['create_type'] names the kind.");

static PyObject *mod_open_vmdk(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSDecoder, &path))
        return NULL;
    PyObject *bytes = fs_encode(path);
    if (!bytes) {
        Py_DECREF(path);
        return NULL;
    }
    char err[VMDK_ERRLEN] = "";
    vmdk_disk *v;
    int saved = 0;
    Py_BEGIN_ALLOW_THREADS
    v = vmdk_open(PyBytes_AS_STRING(bytes), err, sizeof err);
    if (!v)
        saved = errno;
    Py_END_ALLOW_THREADS
    Py_DECREF(bytes);
    if (!v) {
        raise_oserror(saved, err, NULL); /* vmdk messages name the file */
        Py_DECREF(path);
        return NULL;
    }
    DiskObject *d = (DiskObject *)disk_new_from(&vmdk_ops, v, vmdk_capacity(v), path);
    Py_DECREF(path);
    if (!d)
        return NULL;
    PyObject *ct = PyUnicode_DecodeUTF8(vmdk_create_type(v), (Py_ssize_t)strlen(vmdk_create_type(v)),
                                        "replace");
    if (!ct || PyDict_SetItemString(d->info, "create_type", ct) < 0) {
        Py_XDECREF(ct);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(ct);
    return (PyObject *)d;
}

PyDoc_STRVAR(create_vmdk_doc,
"create_vmdk(path, capacity, grain_size=0) -> Disk\n\n"
"Create a monolithicSparse VMDK of capacity bytes for writing.  Write whole\n"
"grains where possible; call finish() to complete the file.");

static PyObject *mod_create_vmdk(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "capacity", "grain_size", NULL};
    PyObject *path;
    unsigned long long capacity;
    unsigned int grain = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&K|I", kwlist, PyUnicode_FSDecoder, &path,
                                     &capacity, &grain))
        return NULL;
    PyObject *bytes = fs_encode(path);
    if (!bytes) {
        Py_DECREF(path);
        return NULL;
    }
    char err[VMDK_ERRLEN] = "";
    vmdk_writer *w;
    int saved = 0;
    Py_BEGIN_ALLOW_THREADS
    w = vmdk_writer_create(PyBytes_AS_STRING(bytes), capacity, grain, err, sizeof err);
    if (!w)
        saved = errno;
    Py_END_ALLOW_THREADS
    Py_DECREF(bytes);
    if (!w) {
        raise_oserror(saved, err, NULL); /* vmdk messages name the file */
        Py_DECREF(path);
        return NULL;
    }
    PyObject *d = disk_new_from(&vmdk_writer_ops, w, vmdk_writer_capacity(w), path);
    Py_DECREF(path);
    return d;
}

/* Connection parameters come as keyword arguments; the C strings borrow from
 * the kwargs dict, which outlives the call. */
static int parse_conn(PyObject *kw, vddk_conn *c)
{
    static const char *names[] = {"library", "config_file", "server", "thumbprint", "user",
                                  "password", "cookie", "vm_moref", "snapshot_moref",
                                  "transport_modes", "port", "nfc_port", NULL};
    memset(c, 0, sizeof *c);
    if (!kw)
        return 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kw, &pos, &key, &value)) {
        const char *k = PyUnicode_AsUTF8(key);
        if (!k)
            return -1;
        int known = 0;
        for (int i = 0; names[i]; i++)
            known |= strcmp(k, names[i]) == 0;
        if (!known) {
            PyErr_Format(PyExc_TypeError, "unknown VDDK connection parameter %R", key);
            return -1;
        }
    }
    const char **slots[] = {&c->libpath, &c->config_file, &c->server, &c->thumbprint, &c->user,
                            &c->password, &c->cookie, &c->vm_moref, &c->snapshot_moref,
                            &c->transport_modes};
    for (int i = 0; i < 10; i++) {
        PyObject *v = PyDict_GetItemString(kw, names[i]);
        if (!v || v == Py_None)
            continue;
        if (!(*slots[i] = PyUnicode_AsUTF8(v)))
            return -1;
    }
    uint32_t *ports[] = {&c->port, &c->nfc_port};
    for (int i = 0; i < 2; i++) {
        PyObject *v = PyDict_GetItemString(kw, names[10 + i]);
        if (!v || v == Py_None)
            continue;
        unsigned long n = PyLong_AsUnsignedLong(v);
        if (PyErr_Occurred())
            return -1;
        if (n > 65535) {
            PyErr_Format(PyExc_ValueError, "%s %lu is not a TCP port", names[10 + i], n);
            return -1;
        }
        *ports[i] = (uint32_t)n;
    }
    return 0;
}

static int info_set(PyObject *info, const char *key, PyObject *value)
{
    if (!value)
        return -1;
    int rc = PyDict_SetItemString(info, key, value);
    Py_DECREF(value);
    return rc;
}

PyDoc_STRVAR(open_vddk_doc,
"open_vddk(path, *, writable=False, handles=1, library=None, server=None, port=0,\n"
"          thumbprint=None, user=None, password=None, cookie=None, vm_moref=None,\n"
"          snapshot_moref=None, transport_modes=None, config_file=None) -> Disk\n\n"
"Open a vSphere disk through libvixDiskLib (dlopen'ed from library, or VDDK's\n"
"usual install places).  path is '[datastore] dir/disk.vmdk'.  info holds the\n"
"transport mode actually used, the library file and version.");

static PyObject *mod_open_vddk(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path))
        return NULL;
    vddk_disk_opts o;
    memset(&o, 0, sizeof o);
    o.path = path;
    o.handles = 1;
    PyObject *conn_kw = kw ? PyDict_Copy(kw) : PyDict_New();
    if (!conn_kw)
        return NULL;
    PyObject *v;
    if ((v = PyDict_GetItemString(conn_kw, "writable"))) {
        o.writable = PyObject_IsTrue(v);
        PyDict_DelItemString(conn_kw, "writable");
    }
    if ((v = PyDict_GetItemString(conn_kw, "handles"))) {
        o.handles = (unsigned)PyLong_AsUnsignedLong(v);
        PyDict_DelItemString(conn_kw, "handles");
        if (PyErr_Occurred()) {
            Py_DECREF(conn_kw);
            return NULL;
        }
    }
    vddk_conn c;
    if (o.writable < 0 || parse_conn(conn_kw, &c) != 0) {
        Py_DECREF(conn_kw);
        return NULL;
    }
    char err[VDDK_ERRLEN] = "";
    vddk_disk *d;
    int saved = 0;
    Py_BEGIN_ALLOW_THREADS
    d = vddk_open(&c, &o, err);
    if (!d)
        saved = errno;
    Py_END_ALLOW_THREADS
    Py_DECREF(conn_kw);
    PyObject *name = PyUnicode_FromFormat("vddk:%s", path);
    if (!name) {
        if (d)
            vddk_ops_close(d);
        return NULL;
    }
    if (!d) {
        raise_oserror(saved, err, name);
        Py_DECREF(name);
        return NULL;
    }
    const vddk_info *in = vddk_disk_info(d);
    DiskObject *disk = (DiskObject *)disk_new_from(&vddk_ops, d, in->capacity, name);
    Py_DECREF(name);
    if (!disk)
        return NULL;
    if (info_set(disk->info, "transport", PyUnicode_FromString(in->transport)) < 0 ||
        info_set(disk->info, "library", PyUnicode_DecodeFSDefault(in->libfile)) < 0 ||
        info_set(disk->info, "library_major", PyLong_FromLong(in->lib_major)) < 0 ||
        info_set(disk->info, "handles", PyLong_FromUnsignedLong(in->handles)) < 0 ||
        info_set(disk->info, "uuid", PyUnicode_DecodeUTF8(in->uuid, (Py_ssize_t)strlen(in->uuid),
                                                          "replace")) < 0 ||
        info_set(disk->info, "allocated_blocks", PyBool_FromLong(in->has_allocated_blocks)) < 0) {
        Py_DECREF(disk);
        return NULL;
    }
    return (PyObject *)disk;
}

typedef int (*access_fn)(const vddk_conn *, const char *, char *);

static PyObject *vddk_access_call(PyObject *args, PyObject *kw, access_fn fn)
{
    const char *identity;
    if (!PyArg_ParseTuple(args, "s", &identity))
        return NULL;
    vddk_conn c;
    if (parse_conn(kw, &c) != 0)
        return NULL;
    char err[VDDK_ERRLEN] = "";
    int rc, saved = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = fn(&c, identity, err);
    if (rc != 0)
        saved = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return raise_oserror(saved, err, NULL);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(vddk_prepare_access_doc,
"vddk_prepare_access(identity, **connection)\n\n"
"VixDiskLib_PrepareForAccess for the VM (before its backup snapshot is taken).");

static PyObject *mod_vddk_prepare_access(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    return vddk_access_call(args, kw, vddk_prepare_access);
}

PyDoc_STRVAR(vddk_end_access_doc, "vddk_end_access(identity, **connection)\n\nVixDiskLib_EndAccess.");

static PyObject *mod_vddk_end_access(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    return vddk_access_call(args, kw, vddk_end_access);
}

PyDoc_STRVAR(count_items_doc,
"count_items(buffer, item) -> int\n\n"
"How many of the len(item)-byte slots of buffer equal item (a trailing\n"
"partial slot is ignored): counts zero digests in a manifest segment\n"
"without numpy on the backup path.");

static PyObject *mod_count_items(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer buf, item;
    if (!PyArg_ParseTuple(args, "y*y*", &buf, &item))
        return NULL;
    Py_ssize_t n = 0;
    if (item.len <= 0) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&item);
        PyErr_SetString(PyExc_ValueError, "item must not be empty");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at + item.len <= buf.len; at += item.len)
        n += memcmp((const char *)buf.buf + at, item.buf, (size_t)item.len) == 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyBuffer_Release(&item);
    return PyLong_FromSsize_t(n);
}

PyDoc_STRVAR(zero_chunks_doc,
"zero_chunks(buffer, chunk_size) -> bytes\n\n"
"One byte per chunk of the buffer: 1 where the chunk is all zeros.\n"
"A final partial chunk counts as a chunk.");

static PyObject *mod_zero_chunks(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t chunk_size;
    if (!PyArg_ParseTuple(args, "y*n", &view, &chunk_size))
        return NULL;
    if (chunk_size <= 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
        return NULL;
    }
    Py_ssize_t n = (view.len + chunk_size - 1) / chunk_size;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out) {
        PyBuffer_Release(&view);
        return NULL;
    }
    char *flags = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t start = i * chunk_size;
        Py_ssize_t len = view.len - start < chunk_size ? view.len - start : chunk_size;
        flags[i] = (char)rd_is_zero((const char *)view.buf + start, (size_t)len);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"open_raw", (PyCFunction)(void (*)(void))mod_open_raw, METH_VARARGS | METH_KEYWORDS,
     open_raw_doc},
    {"open_vmdk", (PyCFunction)mod_open_vmdk, METH_VARARGS, open_vmdk_doc},
    {"create_vmdk", (PyCFunction)(void (*)(void))mod_create_vmdk, METH_VARARGS | METH_KEYWORDS,
     create_vmdk_doc},
    {"open_vddk", (PyCFunction)(void (*)(void))mod_open_vddk, METH_VARARGS | METH_KEYWORDS,
     open_vddk_doc},
    {"vddk_prepare_access", (PyCFunction)(void (*)(void))mod_vddk_prepare_access,
     METH_VARARGS | METH_KEYWORDS, vddk_prepare_access_doc},
    {"vddk_end_access", (PyCFunction)(void (*)(void))mod_vddk_end_access,
     METH_VARARGS | METH_KEYWORDS, vddk_end_access_doc},
    {"zero_chunks", (PyCFunction)mod_zero_chunks, METH_VARARGS, zero_chunks_doc},
    {"count_items", (PyCFunction)mod_count_items, METH_VARARGS, count_items_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "native._native",
    "blockvault's disk readers and hot-path kernels (see native/*.h).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&DiskType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    Py_INCREF(&DiskType);
    if (PyModule_AddObject(m, "Disk", (PyObject *)&DiskType) < 0) {
        Py_DECREF(&DiskType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
