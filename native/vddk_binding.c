/*
 * vddk_binding.c: vSphere disks through VDDK as Disks.
 *
 * Connection parameters arrive as keyword arguments and are borrowed as C
 * strings for the duration of each call; vddk_*.c copy and wipe what they
 * keep.  Every VDDK call runs with the GIL released: connects may block on
 * the network.
 *
 * Part of native._native: included by module.c (one translation unit, so
 * these stay static); not compiled on its own.
 */

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
                                  vddk_ops_finish, vddk_ops_close, 0, NULL};


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
