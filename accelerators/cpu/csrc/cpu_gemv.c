/*
 * xtp.accelerators.cpu._gemv: fp32 and bf16 matrix products for decode on CPU (one to a few
 * input rows), computed on one thread or split by output rows across several.
 *
 * Contract (fp32, gemv): y[j, o] = sum_i W[o * in + i] * x[j, i] (+ b[o]) for o < out and
 * j < m, with W a row-major (out, in) fp32 matrix and x (m, in), y (m, out), b (out)
 * contiguous fp32. bf16 (gemv_bf16): the same with W in a blocked layout (gemv_kernels.c),
 * sums in fp32 and one rounding to bf16 per output. Each output is summed in a fixed order
 * for a given instruction set, whatever the thread count and m: results are deterministic and
 * differ from MKL's / oneDNN's only by rounding.
 *
 * Threads: the last, optional argument of gemv / gemv_bf16 (default 1); the product's output
 * rows are split across that many threads (gemv_pool.c: a persistent pthread pool, why not
 * OpenMP there). The GIL is released while computing, so other Python threads run meanwhile;
 * the caller keeps the tensors alive (they are passed as addresses).
 *
 * Built at install time by setup.py (an optional extension: where it does not compile, xtp
 * keeps torch's own paths). Nothing here depends on torch: addresses come in as integers. The
 * instruction set is chosen once at import from what the running CPU and OS support
 * (isa(): "avx512", "avx2" or "" when neither, in which case gemv raises RuntimeError;
 * use(name) switches, for tests of the other path).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "gemv.h"

/* the m rows of x, each padded with zeros to in_pad columns, into buf (m * in_pad) */
static void
pad_rows(const uint16_t *x, uint16_t *buf, Py_ssize_t in, Py_ssize_t in_pad, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        memcpy(buf + j * in_pad, x + j * in, (size_t)in * 2);
        memset(buf + j * in_pad + in, 0, (size_t)(in_pad - in) * 2);
    }
}

static void *
address(PyObject *obj, int optional)
{
    if (optional && obj == Py_None)
        return NULL;
    void *p = PyLong_AsVoidPtr(obj);
    if (p == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "a null address");
    return p;
}

/* The arguments of a kernel call, as ints: n_addr addresses (the one at index `optional` may
   be None, giving NULL; -1: none may), then n_min to n_size non-negative sizes (those not
   given keep the values size[] holds). 0 on success, else -1 with a Python error set. `sig`
   names the call in the messages. */
static int
parse_call(const char *sig, PyObject *const *args, Py_ssize_t nargs, int n_addr, int optional,
           void **addr, int n_min, int n_size, Py_ssize_t *size)
{
    if (nargs < n_addr + n_min || nargs > n_addr + n_size) {
        if (n_min == n_size)
            PyErr_Format(PyExc_TypeError, "%s takes %d arguments", sig, n_addr + n_size);
        else
            PyErr_Format(PyExc_TypeError, "%s takes %d to %d arguments", sig, n_addr + n_min,
                         n_addr + n_size);
        return -1;
    }
    for (int i = 0; i < n_addr; i++) {
        addr[i] = address(args[i], i == optional);
        if (addr[i] == NULL && PyErr_Occurred())
            return -1;
    }
    for (int i = 0; i < nargs - n_addr; i++) {
        size[i] = PyLong_AsSsize_t(args[n_addr + i]);
        if (size[i] == -1 && PyErr_Occurred())
            return -1;
        if (size[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative size", sig);
            return -1;
        }
    }
    return 0;
}

static int
have_kernel(const void *kernel)
{
    if (kernel == NULL)
        PyErr_SetString(PyExc_RuntimeError, "no gemv kernel for this CPU (isa() is empty)");
    return kernel != NULL;
}

/* threads as asked: at least 1 (0 is refused), at most INT_MAX */
static int
thread_count(const char *sig, Py_ssize_t threads)
{
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "%s: threads must be at least 1", sig);
        return 0;
    }
    return threads > 0x7fffffff ? 0x7fffffff : (int)threads;
}

/* A product on a plain row-major weight (out, in) of itemsize-byte values: the call's
   arguments w, x, b, y, out, in[, m[, threads]] (m = 1 and one thread by default; b may be
   None), in a multiple of in_step and out of out_step; returns None. */
static PyObject *
plain_product(const char *sig, PyObject *const *args, Py_ssize_t nargs, gemv_kernel kernel,
              size_t itemsize, Py_ssize_t in_step, Py_ssize_t out_step)
{
    void *a[4];
    Py_ssize_t n[4] = {0, 0, 1, 1};
    if (parse_call(sig, args, nargs, 4, 2, a, 2, 4, n) < 0 || !have_kernel((const void *)kernel))
        return NULL;
    const int threads = thread_count(sig, n[3]);
    if (!threads)
        return NULL;
    if (n[1] % in_step || n[0] % out_step) {
        PyErr_Format(PyExc_ValueError, "%s: in must be a multiple of %zd and out of %zd, got "
                     "out=%zd in=%zd", sig, in_step, out_step, n[0], n[1]);
        return NULL;
    }
    const gemv_args g = {a[0], a[1], a[2], a[3], n[0], n[1], n[2]};
    Py_BEGIN_ALLOW_THREADS
    pool_run(kernel, &g, threads, (size_t)(n[0] * n[1]) * itemsize);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gemv(w, x, b, y, out, in[, m[, threads]]): fp32, x (m, in), y (m, out), m = 1 and one
   thread by default; addresses as ints (b may be None); returns None. */
static PyObject *
py_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return plain_product("gemv(w, x, b, y, out, in[, m[, threads]])", args, nargs, gemv_f32, 4,
                         1, 1);
}

/* gemv_bf16(p, x, b, y, out, in, m[, threads]): packed bf16 weight, x (m, in), y (m, out); b
   may be None; addresses as ints. x is copied into a zero-padded buffer when in is not a
   multiple of 32. Returns None. */
static PyObject *
py_gemv_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char sig[] = "gemv_bf16(p, x, b, y, out, in, m[, threads])";
    void *a[4];
    Py_ssize_t n[4] = {0, 0, 0, 1};
    if (parse_call(sig, args, nargs, 4, 2, a, 3, 4, n) < 0
        || !have_kernel((const void *)gemv_bf16))
        return NULL;
    const int threads = thread_count(sig, n[3]);
    if (!threads)
        return NULL;
    const Py_ssize_t out = n[0], in = n[1], m = n[2];
    const Py_ssize_t in_pad = (in + CHUNK - 1) / CHUNK * CHUNK;
    uint16_t *buf = NULL;
    if (in_pad != in) {
        buf = PyMem_Malloc((size_t)(m * in_pad) * 2 + 2);
        if (buf == NULL)
            return PyErr_NoMemory();
        pad_rows(a[1], buf, in, in_pad, m);
    }
    const gemv_args g = {a[0], buf ? buf : a[1], a[2], a[3], out, in, m};
    const gemv_kernel kernel = gemv_bf16;
    const size_t bytes = (size_t)(((out + ROW_BLOCK - 1) / ROW_BLOCK) * ROW_BLOCK * in_pad) * 2;
    Py_BEGIN_ALLOW_THREADS
    pool_run(kernel, &g, threads, bytes);
    Py_END_ALLOW_THREADS
    PyMem_Free(buf);
    Py_RETURN_NONE;
}

/* gemv_bf16_rows(w, x, b, y, out, in[, m[, threads]]): the bf16 weight as plain rows
   (out, in), in a multiple of 32 and out of 8; x (m, in), y (m, out); b may be None. */
static PyObject *
py_gemv_bf16_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return plain_product("gemv_bf16_rows(w, x, b, y, out, in[, m[, threads]])", args, nargs,
                         gemv_bf16_rows, 2, CHUNK, ROW_BLOCK);
}

/* threads_for(out, in, itemsize, threads): how many threads a product of an (out, in) weight
   of itemsize-byte values uses when `threads` are asked (small products use fewer) */
static PyObject *
py_threads_for(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char sig[] = "threads_for(out, in, itemsize, threads)";
    Py_ssize_t n[4];
    if (parse_call(sig, args, nargs, 0, -1, NULL, 4, 4, n) < 0)
        return NULL;
    const int threads = thread_count(sig, n[3]);
    if (!threads)
        return NULL;
    const gemv_args g = {NULL, NULL, NULL, NULL, n[0], n[1], 1};
    return PyLong_FromLong(pool_threads_for(&g, threads, (size_t)(n[0] * n[1] * n[2])));
}

/* pool_workers(): pool threads started in this process (0 in a new fork child until used) */
static PyObject *
py_pool_workers(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(pool_workers());
}

/* rows o_begin <= o < o_end of the packed bf16 weight a->w back into the row-major (out, in)
   a->y: 64-byte copies (a gemv_kernel, so that pool_run can split it like a product) */
static void
unpack_rows(const gemv_args *a, ptrdiff_t o_begin, ptrdiff_t o_end)
{
    const uint16_t *p = a->w;
    uint16_t *w = a->y;
    const ptrdiff_t in = a->in, chunks = (in + CHUNK - 1) / CHUNK;
    for (ptrdiff_t o = o_begin; o < o_end; o += ROW_BLOCK) {
        for (ptrdiff_t c = 0; c < chunks; c++) {
            const uint16_t *q = p + (o * chunks + c * ROW_BLOCK) * CHUNK;
            const ptrdiff_t len = in - c * CHUNK < CHUNK ? in - c * CHUNK : CHUNK;
            for (ptrdiff_t k = 0; k < ROW_BLOCK && o + k < o_end; k++)
                memcpy(w + (o + k) * in + c * CHUNK, q + k * CHUNK, (size_t)len * 2);
        }
    }
}

/* unpack_bf16(p, w, out, in[, threads]): the packed bf16 weight p back into the row-major
   (out, in) w, split by row blocks across `threads` threads like a product (1 by default);
   returns None. Used for inputs the kernel does not serve (prefill): 64-byte copies, several
   times faster than torch's strided copy of the same permutation. */
static PyObject *
py_unpack_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char sig[] = "unpack_bf16(p, w, out, in[, threads])";
    void *a[2];
    Py_ssize_t n[3] = {0, 0, 1};
    if (parse_call(sig, args, nargs, 2, -1, a, 2, 3, n) < 0)
        return NULL;
    const int threads = thread_count(sig, n[2]);
    if (!threads)
        return NULL;
    const gemv_args g = {a[0], NULL, NULL, a[1], n[0], n[1], 1};
    const size_t bytes = (size_t)(n[0] * n[1]) * 2;
    Py_BEGIN_ALLOW_THREADS
    pool_run(unpack_rows, &g, threads, bytes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* use_team(address or None): split products across the caller's OpenMP team through the
   GOMP_parallel at `address` (an int, found by gemv.py in the runtime torch loaded), or with
   None through the pool's own threads again; returns whether team mode is on */
static PyObject *
py_use_team(PyObject *self, PyObject *arg)
{
    void *fn = NULL;
    if (arg != Py_None) {
        fn = PyLong_AsVoidPtr(arg);
        if (fn == NULL && PyErr_Occurred())
            return NULL;
    }
    pool_use_team(fn);
    return PyBool_FromLong(pool_team());
}

static PyObject *
py_isa(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(gemv_isa);
}

/* use(name): switch to "avx512" or "avx2" (for tests of the other path); False if this CPU
   cannot run it (nothing changes then). */
static PyObject *
py_use(PyObject *self, PyObject *arg)
{
    const char *isa = PyUnicode_AsUTF8(arg);
    if (isa == NULL)
        return NULL;
    return PyBool_FromLong(gemv_choose(isa));
}

static PyMethodDef methods[] = {
    {"gemv", (PyCFunction)(void (*)(void))py_gemv, METH_FASTCALL,
     "gemv(w, x, b, y, out, in[, m[, threads]]): y = x @ W.T (+ b), fp32, x (m, in) (m = 1 "
     "by default), on `threads` threads (1 by default); addresses as ints, b may be None"},
    {"gemv_bf16", (PyCFunction)(void (*)(void))py_gemv_bf16, METH_FASTCALL,
     "gemv_bf16(p, x, b, y, out, in, m[, threads]): y = x @ W.T (+ b), bf16, W packed "
     "(gemv.py), on `threads` threads (1 by default)"},
    {"gemv_bf16_rows", (PyCFunction)(void (*)(void))py_gemv_bf16_rows, METH_FASTCALL,
     "gemv_bf16_rows(w, x, b, y, out, in[, m[, threads]]): y = x @ W.T (+ b), bf16, W plain "
     "rows (in a multiple of 32, out of 8), on `threads` threads (1 by default)"},
    {"unpack_bf16", (PyCFunction)(void (*)(void))py_unpack_bf16, METH_FASTCALL,
     "unpack_bf16(p, w, out, in[, threads]): the packed bf16 weight p into row-major w, on "
     "`threads` threads (1 by default)"},
    {"threads_for", (PyCFunction)(void (*)(void))py_threads_for, METH_FASTCALL,
     "threads_for(out, in, itemsize, threads): the threads a product of that weight uses"},
    {"pool_workers", py_pool_workers, METH_NOARGS,
     "pool threads started in this process (0 in a fork child until it computes)"},
    {"use_team", py_use_team, METH_O,
     "use_team(address | None): products on the caller's OpenMP team (GOMP_parallel at address)"},
    {"isa", py_isa, METH_NOARGS, "the instruction set gemv uses here, or '' if none"},
    {"use", py_use, METH_O, "use('avx512' | 'avx2'): switch kernels; False if unsupported"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gemv",
    "fp32 and bf16 matrix products for CPU decode, on one or several threads (see gemv.py)",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__gemv(void)
{
    gemv_choose(NULL);
    return PyModule_Create(&module);
}
