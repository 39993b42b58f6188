/*
 * disk_type.c: the Disk type every reader is wrapped in.
 *
 * One Python type for every disk kind: the kind's disk_ops (disk.h) does the
 * I/O, this file does the argument handling, the GIL release around every
 * call that moves data, and the count of calls in flight that keeps close()
 * from freeing a handle another thread is still using.
 *
 * Part of native._native: included by module.c (one translation unit, so
 * these stay static); not compiled on its own.
 */

typedef struct {
    PyObject_HEAD
    const disk_ops *ops;
    void *impl;
    uint64_t size;
    PyObject *path;
    PyObject *info;    /* dict: what the reader learned (format, transport...) */
    Py_ssize_t active; /* calls running with the GIL released */
    rd_extent *ext_cache; /* paged extents() of a kind without extents_from */
    size_t ext_n;
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
    d->ext_cache = NULL;
    d->ext_n = 0;
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
    free(self->ext_cache);
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
"extents(start=0, max_count=0) -> list[tuple[int, int]]\n\n"
"Allocated (start, length) byte ranges, sorted and merged: the local\n"
"equivalent of queryChangedDiskAreas(\"*\").  With max_count > 0, at most\n"
"that many, from byte start on (the first one clipped to begin there): a\n"
"caller pages through a fragmented disk by passing the end of the last\n"
"extent it got, so its memory does not grow with the number of extents.");

static PyObject *extent_list(const rd_extent *v, size_t n)
{
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
    return list;
}

/* List extents with the GIL released: all of them (max 0) or a page of at
 * most max from offset from.  0, or -1 with an OSError set. */
static int disk_list_extents(DiskObject *self, uint64_t from, size_t max, rd_extent **v, size_t *n)
{
    char err[RD_ERRLEN] = "";
    int rc, saved = 0;
    self->active++;
    Py_BEGIN_ALLOW_THREADS
    if (max > 0)
        rc = self->ops->extents_from(self->impl, from, max, v, n, err, sizeof err);
    else
        rc = self->ops->extents(self->impl, v, n, err, sizeof err);
    if (rc != 0)
        saved = errno;
    Py_END_ALLOW_THREADS
    self->active--;
    if (rc != 0) {
        raise_oserror(saved, err, disk_err_path(self));
        return -1;
    }
    return 0;
}

/* Kinds that list everything at once: list once, keep the C array (16 bytes
 * an extent, a tenth of the Python tuples), page through it. */
static PyObject *disk_extents_cached(DiskObject *self, uint64_t from, size_t max)
{
    if (!self->ext_cache) {
        rd_extent *v = NULL;
        size_t n = 0;
        if (disk_list_extents(self, 0, 0, &v, &n) != 0)
            return NULL;
        if (self->ext_cache) { /* another thread listed meanwhile */
            free(v);
        } else {
            self->ext_cache = v;
            self->ext_n = n;
        }
    }
    const rd_extent *c = self->ext_cache;
    size_t lo = 0, hi = self->ext_n;
    while (lo < hi) { /* first extent ending after from */
        size_t mid = lo + (hi - lo) / 2;
        if (c[mid].start + c[mid].length <= from)
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t n = self->ext_n - lo < max ? self->ext_n - lo : max;
    PyObject *list = extent_list(c + lo, n);
    if (list && n > 0 && c[lo].start < from) { /* clip the first one */
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)from,
                                    (unsigned long long)(c[lo].start + c[lo].length - from));
        if (!t)
            Py_CLEAR(list);
        else
            PyList_SetItem(list, 0, t);
    }
    return list;
}

static PyObject *disk_extents(DiskObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"start", "max_count", NULL};
    unsigned long long from = 0;
    Py_ssize_t max = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|Kn", kwlist, &from, &max))
        return NULL;
    if (disk_check_open(self) != 0)
        return NULL;
    if (max < 0) {
        PyErr_SetString(PyExc_ValueError, "max_count must not be negative");
        return NULL;
    }
    if (max > 0 && !self->ops->extents_from)
        return disk_extents_cached(self, from, (size_t)max);
    rd_extent *v = NULL;
    size_t n = 0;
    if (disk_list_extents(self, from, (size_t)max, &v, &n) != 0)
        return NULL;
    PyObject *list = extent_list(v, n);
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
    free(self->ext_cache);
    self->ext_cache = NULL;
    self->ext_n = 0;
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
    {"extents", (PyCFunction)(void (*)(void))disk_extents, METH_VARARGS | METH_KEYWORDS, extents_doc},
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
