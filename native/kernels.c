/*
 * kernels.c: buffer kernels of the hot path (zero chunks, digest counting).
 *
 * Small loops over whole batches, run with the GIL released, so that no
 * Python code ever walks a buffer byte by byte.
 *
 * Part of native._native: included by module.c (one translation unit, so
 * these stay static); not compiled on its own.
 */

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
