/*
 * framebus._atomic: the memory-ordering primitives the ring needs, and nothing else.
 *
 * Python has no way to emit a fence or an acquire load. On x86_64 (TSO) plain aligned
 * 8-byte loads and stores are already ordered the way a seqlock needs, but on aarch64
 * (Jetson) loads may pass loads and stores may pass stores, so the ring's protocol
 * (docs/framebus.md, "Memory ordering") needs real barriers:
 *
 *   writer: store(stamp, odd); fence_release(); <payload + metadata>; store_release(stamp, even)
 *   reader: s1 = load_acquire(stamp); <metadata + payload>; fence_acquire(); s2 = load(stamp)
 *
 * Words are 8-byte aligned u64 inside a shared mapping, addressed by byte offset.
 * A Words object holds a buffer export of the mapping for its lifetime, so the mapping
 * cannot be unmapped under it; release() gives the export back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int held;
} WordsObject;

static int
words_ptr(WordsObject *self, PyObject *arg, _Atomic uint64_t **out)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "Words: mapping already released");
        return -1;
    }
    Py_ssize_t off = PyLong_AsSsize_t(arg);
    if (off == -1 && PyErr_Occurred())
        return -1;
    if (off < 0 || off % 8 != 0 || off + 8 > self->view.len) {
        PyErr_Format(PyExc_IndexError,
                     "Words: offset %zd is not an aligned u64 inside %zd bytes",
                     off, self->view.len);
        return -1;
    }
    *out = (_Atomic uint64_t *)((char *)self->view.buf + off);
    return 0;
}

static PyObject *
words_load_acquire(WordsObject *self, PyObject *arg)
{
    _Atomic uint64_t *p;
    if (words_ptr(self, arg, &p) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(p, memory_order_acquire));
}

static PyObject *
words_load(WordsObject *self, PyObject *arg)
{
    _Atomic uint64_t *p;
    if (words_ptr(self, arg, &p) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(p, memory_order_relaxed));
}

static PyObject *
words_store_impl(WordsObject *self, PyObject *const *args, Py_ssize_t nargs,
                 memory_order order)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store takes (offset, value)");
        return NULL;
    }
    _Atomic uint64_t *p;
    if (words_ptr(self, args[0], &p) < 0)
        return NULL;
    if (self->view.readonly) {
        PyErr_SetString(PyExc_TypeError, "Words: store into a read-only mapping");
        return NULL;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    atomic_store_explicit(p, (uint64_t)v, order);
    Py_RETURN_NONE;
}

static PyObject *
words_store_release(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return words_store_impl(self, args, nargs, memory_order_release);
}

static PyObject *
words_store(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return words_store_impl(self, args, nargs, memory_order_relaxed);
}

static PyObject *
words_add(WordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add takes (offset, delta)");
        return NULL;
    }
    _Atomic uint64_t *p;
    if (words_ptr(self, args[0], &p) < 0)
        return NULL;
    if (self->view.readonly) {
        PyErr_SetString(PyExc_TypeError, "Words: add into a read-only mapping");
        return NULL;
    }
    unsigned long long d = PyLong_AsUnsignedLongLong(args[1]);
    if (d == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t old = atomic_fetch_add_explicit(p, (uint64_t)d, memory_order_acq_rel);
    return PyLong_FromUnsignedLongLong(old + d);
}

static PyObject *
words_release(WordsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->held) {
        self->held = 0;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static void
words_dealloc(WordsObject *self)
{
    if (self->held)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
words_init(WordsObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O:Words", &obj))
        return -1;
    if (self->held) {
        PyBuffer_Release(&self->view);
        self->held = 0;
    }
    /* Read-only mappings (a consumer's view of the slots) are accepted: loads work,
       stores raise. */
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_SIMPLE) < 0)
        return -1;
    if (((uintptr_t)self->view.buf) % 8 != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "Words: buffer is not 8-byte aligned");
        return -1;
    }
    self->held = 1;
    return 0;
}

static PyMethodDef words_methods[] = {
    {"load_acquire", (PyCFunction)words_load_acquire, METH_O, "Acquire load of the u64 at a byte offset."},
    {"load", (PyCFunction)words_load, METH_O, "Relaxed (single-copy atomic) load of the u64 at a byte offset."},
    {"store_release", (PyCFunction)(void (*)(void))words_store_release, METH_FASTCALL, "Release store of a u64."},
    {"store", (PyCFunction)(void (*)(void))words_store, METH_FASTCALL, "Relaxed (single-copy atomic) store of a u64."},
    {"add", (PyCFunction)(void (*)(void))words_add, METH_FASTCALL, "Atomic fetch-add (acq_rel); returns the new value."},
    {"release", (PyCFunction)words_release, METH_NOARGS, "Give the buffer export back."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WordsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "framebus._atomic.Words",
    .tp_basicsize = sizeof(WordsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Atomic u64 words inside a writable shared buffer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)words_init,
    .tp_dealloc = (destructor)words_dealloc,
    .tp_methods = words_methods,
};

static PyObject *
fence_release(PyObject *m, PyObject *Py_UNUSED(ignored))
{
    atomic_thread_fence(memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *
fence_acquire(PyObject *m, PyObject *Py_UNUSED(ignored))
{
    atomic_thread_fence(memory_order_acquire);
    Py_RETURN_NONE;
}

static PyObject *
fence_seq_cst(PyObject *m, PyObject *Py_UNUSED(ignored))
{
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"fence_release", fence_release, METH_NOARGS, "Release fence: earlier loads/stores before later stores."},
    {"fence_acquire", fence_acquire, METH_NOARGS, "Acquire fence: earlier loads before later loads/stores."},
    {"fence_seq_cst", fence_seq_cst, METH_NOARGS, "Full fence."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef atomic_module = {
    PyModuleDef_HEAD_INIT, "framebus._atomic",
    "Memory-ordering primitives for framebus (see docs/framebus.md).", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    if (PyType_Ready(&WordsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&atomic_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&WordsType);
    if (PyModule_AddObject(m, "Words", (PyObject *)&WordsType) < 0) {
        Py_DECREF(&WordsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
