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

/* One translation unit: each part below keeps its helpers static. */
#include "disk_type.c"
#include "raw_binding.c"
#include "vmdk_binding.c"
#include "vddk_binding.c"
#include "kernels.c"

static PyMethodDef module_methods[] = {
    {"open_raw", (PyCFunction)(void (*)(void))mod_open_raw, METH_VARARGS | METH_KEYWORDS,
     open_raw_doc},
    {"open_vmdk", (PyCFunction)(void (*)(void))mod_open_vmdk, METH_VARARGS | METH_KEYWORDS, open_vmdk_doc},
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
    NULL, NULL, NULL, NULL,
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
