/* The thin CPython binding of the kernel library: every argument is a plain integer (pointers
 * come from torch's data_ptr() on the Python side), so this file knows nothing of torch and
 * a call costs a few hundred nanoseconds (METH_FASTCALL, no argument tuples). The GIL is
 * released around the kernels. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "bitnet.h"
#include "i2v.h"

static int get_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, long long *out) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

#define PTR(T, v) ((T)(uintptr_t)(v))

/* the end of a kernel call: 0 -> None, -1 -> ValueError (bad sizes or a path this CPU lacks),
 * anything else -> MemoryError */
static PyObject *result(int rc, const char *what, long long path) {
    if (rc == 0) Py_RETURN_NONE;
    if (rc == -1) return PyErr_Format(PyExc_ValueError, "%s: bad arguments or unsupported path %lld", what, path);
    return PyErr_NoMemory();
}

/* gemm(x, ldx, xsum or 0, M, K, w, N, y, ldy, path) */
static PyObject *py_gemm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[10];
    if (get_args(args, nargs, 10, a)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_gemm(PTR(const int8_t *, a[0]), (size_t)a[1], PTR(const int32_t *, a[2]), (int)a[3],
                  (int)a[4], PTR(const uint8_t *, a[5]), (int)a[6], PTR(int32_t *, a[7]), (size_t)a[8],
                  (int)a[9]);
    Py_END_ALLOW_THREADS
    return result(rc, "i2v_gemm", a[9]);
}

/* gemm_fmt(fmt, x, ldx, xsum or 0, M, K, w, N, y, ldy, path): fmt I2V_FMT_* (0 i2v, 1 t5) */
static PyObject *py_gemm_fmt(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[11];
    if (get_args(args, nargs, 11, a)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_gemm_fmt((int)a[0], PTR(const int8_t *, a[1]), (size_t)a[2], PTR(const int32_t *, a[3]), (int)a[4],
                      (int)a[5], PTR(const uint8_t *, a[6]), (int)a[7], PTR(int32_t *, a[8]), (size_t)a[9],
                      (int)a[10]);
    Py_END_ALLOW_THREADS
    return result(rc, "i2v_gemm_fmt", a[10]);
}

/* quantize(x, ldx, M, K, q, ldq, scale, qsum, path) */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[9];
    if (get_args(args, nargs, 9, a)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_quantize(PTR(const float *, a[0]), (size_t)a[1], (int)a[2], (int)a[3], PTR(int8_t *, a[4]),
                      (size_t)a[5], PTR(float *, a[6]), PTR(int32_t *, a[7]), (int)a[8]);
    Py_END_ALLOW_THREADS
    return result(rc, "i2v_quantize", a[8]);
}

/* linear(x, ldx, M, K, w, N, wscale, y, ldy, path): wscale is a float */
static PyObject *py_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) return PyErr_Format(PyExc_TypeError, "linear expects 10 arguments, got %zd", nargs);
    long long a[10];
    for (Py_ssize_t i = 0; i < 10; i++) {
        if (i == 6) continue;
        a[i] = PyLong_AsLongLong(args[i]);
        if (a[i] == -1 && PyErr_Occurred()) return NULL;
    }
    double wscale = PyFloat_AsDouble(args[6]);
    if (wscale == -1.0 && PyErr_Occurred()) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_linear(PTR(const float *, a[0]), (size_t)a[1], (int)a[2], (int)a[3], PTR(const uint8_t *, a[4]),
                    (int)a[5], (float)wscale, PTR(float *, a[7]), (size_t)a[8], (int)a[9]);
    Py_END_ALLOW_THREADS
    return result(rc, "i2v_linear", a[9]);
}

/* q6_gemv(w, V, H, x, ldx, xsum or 0, M, out, ldo, path) */
static PyObject *py_q6_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[10];
    if (get_args(args, nargs, 10, a)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_q6_gemv(PTR(const uint8_t *, a[0]), (int)a[1], (int)a[2], PTR(const int8_t *, a[3]), (size_t)a[4],
                     PTR(const int32_t *, a[5]), (int)a[6], PTR(int32_t *, a[7]), (size_t)a[8], (int)a[9]);
    Py_END_ALLOW_THREADS
    return result(rc, "i2v_q6_gemv", a[9]);
}

/* from_hf(hf, out, in, dst) */
static PyObject *py_from_hf(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[4];
    if (get_args(args, nargs, 4, a)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_from_hf(PTR(const uint8_t *, a[0]), (int)a[1], (int)a[2], PTR(uint8_t *, a[3]));
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_Format(PyExc_ValueError, "i2v_from_hf: bad shape %lld x %lld", a[1], a[2]);
    Py_RETURN_NONE;
}

/* from_hf_fmt(fmt, hf, out, in, dst) */
static PyObject *py_from_hf_fmt(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[5];
    if (get_args(args, nargs, 5, a)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = i2v_from_hf_fmt((int)a[0], PTR(const uint8_t *, a[1]), (int)a[2], (int)a[3], PTR(uint8_t *, a[4]));
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_Format(PyExc_ValueError, "i2v_from_hf_fmt: bad format %lld or shape %lld x %lld", a[0], a[2], a[3]);
    Py_RETURN_NONE;
}

/* read_bytes(ptr, n): the bandwidth probe */
static PyObject *py_read_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[2];
    if (get_args(args, nargs, 2, a)) return NULL;
    uint64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = i2v_read_bytes(PTR(const uint8_t *, a[0]), (size_t)a[1]);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(r);
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    int got;
    Py_BEGIN_ALLOW_THREADS
    got = i2v_pool_set_threads((int)n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(got);
}

static PyObject *py_num_threads(PyObject *self, PyObject *unused) { return PyLong_FromLong(i2v_pool_threads()); }
static PyObject *py_best_path(PyObject *self, PyObject *unused) { return PyLong_FromLong(i2v_best_path()); }
static PyObject *py_cpu_features(PyObject *self, PyObject *unused) { return PyUnicode_FromString(i2v_cpu_features()); }

static PyObject *py_path_supported(PyObject *self, PyObject *arg) {
    long p = PyLong_AsLong(arg);
    if (p == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(i2v_path_supported((int)p));
}

static PyObject *py_path_name(PyObject *self, PyObject *arg) {
    long p = PyLong_AsLong(arg);
    if (p == -1 && PyErr_Occurred()) return NULL;
    return PyUnicode_FromString(i2v_path_name((int)p));
}

/* ---- the whole-model forward (bitnet.h) ---- */
static void model_capsule_free(PyObject *cap) {
    bn_model_free((bn_model *)PyCapsule_GetPointer(cap, "bitlm.bn_model"));
}

/* model_new(ints_ptr, nints, flts_ptr, nflts) -> capsule */
static PyObject *py_model_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[4];
    if (get_args(args, nargs, 4, a)) return NULL;
    bn_model *m = bn_model_new(PTR(const int64_t *, a[0]), (int)a[1], PTR(const double *, a[2]), (int)a[3]);
    if (!m) return PyErr_Format(PyExc_ValueError, "bn_model_new: inconsistent model descriptor");
    return PyCapsule_New(m, "bitlm.bn_model", model_capsule_free);
}

/* forward(model, tokens_ptr, T, pos, out_ptr, n_out, hidden): logits [n_out, V], or hidden [T, H] */
static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) return PyErr_Format(PyExc_TypeError, "forward expects 7 arguments, got %zd", nargs);
    bn_model *m = (bn_model *)PyCapsule_GetPointer(args[0], "bitlm.bn_model");
    if (!m) return NULL;
    long long a[7];
    if (get_args(args + 1, nargs - 1, 6, a + 1)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (a[6])
        rc = bn_forward_hidden(m, PTR(const int32_t *, a[1]), (int)a[2], (int)a[3], PTR(float *, a[4]));
    else
        rc = bn_forward(m, PTR(const int32_t *, a[1]), (int)a[2], (int)a[3], PTR(float *, a[4]), (int)a[5]);
    Py_END_ALLOW_THREADS
    if (rc == -1) return PyErr_Format(PyExc_ValueError, "bn_forward: positions past the cache or token ids out of range");
    if (rc == -3) return PyErr_Format(PyExc_OSError, "bn_forward: an embedding row could not be read from its file");
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* forward_paged(model, tokens_ptr, seqs_ptr, nseq, pool_ptr, block_size, n_blocks, logits_ptr): seqs int64
 * [nseq, BN_NS] (bitnet.h); logits [sum of n_out, V] */
static PyObject *py_forward_paged(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "forward_paged expects 8 arguments, got %zd", nargs);
    bn_model *m = (bn_model *)PyCapsule_GetPointer(args[0], "bitlm.bn_model");
    if (!m) return NULL;
    long long a[8];
    if (get_args(args + 1, nargs - 1, 7, a + 1)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bn_forward_paged(m, PTR(const int32_t *, a[1]), PTR(const int64_t *, a[2]), (int)a[3], PTR(void *, a[4]),
                          (int)a[5], (int)a[6], PTR(float *, a[7]));
    Py_END_ALLOW_THREADS
    if (rc == -1) return PyErr_Format(PyExc_ValueError, "bn_forward_paged: positions past the context, token ids or block ids out of range, or a q8_0 cache's block_size not a multiple of 16");
    if (rc == -3) return PyErr_Format(PyExc_OSError, "bn_forward_paged: an embedding row could not be read from its file");
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* profile(model, enable, reset) -> tuple of BN_NPROF nanosecond totals; enable < 0 leaves it as is */
static PyObject *py_profile(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "profile expects 3 arguments, got %zd", nargs);
    bn_model *m = (bn_model *)PyCapsule_GetPointer(args[0], "bitlm.bn_model");
    if (!m) return NULL;
    long long a[3];
    if (get_args(args + 1, nargs - 1, 2, a + 1)) return NULL;
    int64_t out[BN_NPROF];
    bn_profile(m, (int)a[1], out, (int)a[2]);
    PyObject *t = PyTuple_New(BN_NPROF);
    if (!t) return NULL;
    for (int i = 0; i < BN_NPROF; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(out[i]));
    return t;
}

static PyMethodDef methods[] = {
    {"profile", (PyCFunction)(void (*)(void))py_profile, METH_FASTCALL, "profile(model, enable, reset) -> ns per phase"},
    {"model_new", (PyCFunction)(void (*)(void))py_model_new, METH_FASTCALL, "model_new(ints, nints, flts, nflts) -> model"},
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL, "forward(model, tokens, T, pos, out, n_out, hidden)"},
    {"forward_paged", (PyCFunction)(void (*)(void))py_forward_paged, METH_FASTCALL,
     "forward_paged(model, tokens, seqs, nseq, pool, block_size, n_blocks, logits)"},
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_FASTCALL, "gemm(x, ldx, xsum, M, K, w, N, y, ldy, path)"},
    {"gemm_fmt", (PyCFunction)(void (*)(void))py_gemm_fmt, METH_FASTCALL,
     "gemm_fmt(fmt, x, ldx, xsum, M, K, w, N, y, ldy, path)"},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL, "quantize(x, ldx, M, K, q, ldq, scale, qsum, path)"},
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL, "linear(x, ldx, M, K, w, N, wscale, y, ldy, path)"},
    {"q6_gemv", (PyCFunction)(void (*)(void))py_q6_gemv, METH_FASTCALL, "q6_gemv(w, V, H, x, ldx, xsum, M, out, ldo, path)"},
    {"from_hf", (PyCFunction)(void (*)(void))py_from_hf, METH_FASTCALL, "from_hf(hf, out, in, dst): HF packed -> I2V"},
    {"from_hf_fmt", (PyCFunction)(void (*)(void))py_from_hf_fmt, METH_FASTCALL,
     "from_hf_fmt(fmt, hf, out, in, dst): HF packed -> I2V or T5"},
    {"read_bytes", (PyCFunction)(void (*)(void))py_read_bytes, METH_FASTCALL, "read_bytes(ptr, n) -> checksum"},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n) -> threads in use (n <= 0: all CPUs)"},
    {"num_threads", py_num_threads, METH_NOARGS, "threads in the pool"},
    {"best_path", py_best_path, METH_NOARGS, "index of the default kernel path"},
    {"path_supported", py_path_supported, METH_O, "whether this CPU runs the path"},
    {"path_name", py_path_name, METH_O, "name of a path index"},
    {"cpu_features", py_cpu_features, METH_NOARGS, "CPU features the dispatcher looked at"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_native", "bitlm I2V ternary kernels (C)", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "NPATHS", I2V_NPATHS) < 0 || PyModule_AddIntConstant(m, "KV_BLOCK", BN_KV_BLOCK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
