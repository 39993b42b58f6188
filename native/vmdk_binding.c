/*
 * vmdk_binding.c: hosted VMDK files as Disks, read and written.
 *
 * vmdk.c's messages already name the file (often an extent file, not the
 * one opened), so these Disks tell the binding not to add the path again.
 *
 * Part of native._native: included by module.c (one translation unit, so
 * these stay static); not compiled on its own.
 */

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

static const disk_ops vmdk_ops = {"vmdk", vmdk_ops_read, NULL, vmdk_ops_extents, NULL, vmdk_ops_close, 1,
                                  NULL};

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
                                         vmdkw_finish, vmdkw_close, 1, NULL};


/* Encodes a path argument for C; on failure returns NULL with the error set. */
static PyObject *fs_encode(PyObject *path)
{
    return PyUnicode_EncodeFSDefault(path);
}

PyDoc_STRVAR(open_vmdk_doc,
"open_vmdk(path, allow_external_extents=False) -> Disk\n\n"
"Open a hosted VMDK read-only: a descriptor (flat, vmfs, twoGbMaxExtent*),\n"
"monolithicSparse or streamOptimized.  info['create_type'] names the kind.\n"
"An extent file outside the descriptor's directory (after symbolic links)\n"
"raises PermissionError unless allow_external_extents is true.");

static PyObject *mod_open_vmdk(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "allow_external_extents", NULL};
    PyObject *path;
    int external = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|p", kwlist, PyUnicode_FSDecoder, &path,
                                     &external))
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
    v = vmdk_open_flags(PyBytes_AS_STRING(bytes), external ? VMDK_OPEN_EXTERNAL_EXTENTS : 0, err,
                        sizeof err);
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
"create_vmdk(path, capacity, grain_size=0, mode=0o600) -> Disk\n\n"
"Create a monolithicSparse VMDK of capacity bytes for writing.  path must not\n"
"exist (FileExistsError, also for a symbolic link there); the file gets mode\n"
"exactly.  Write whole grains where possible; call finish() to complete the file.");

static PyObject *mod_create_vmdk(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "capacity", "grain_size", "mode", NULL};
    PyObject *path;
    unsigned long long capacity;
    unsigned int grain = 0, mode = 0600;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&K|II", kwlist, PyUnicode_FSDecoder, &path,
                                     &capacity, &grain, &mode))
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
    w = vmdk_writer_create(PyBytes_AS_STRING(bytes), capacity, grain, mode, err, sizeof err);
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
