/*
 * xtp.accelerators._cpu_gemv: fp32 matrix-vector products for one-token decode on CPU.
 *
 * Contract: y[o] = sum_i W[o * in + i] * x[i] (+ b[o]) for o < out, with W a row-major
 * (out, in) fp32 matrix and x, y, b contiguous fp32 vectors. One thread; the caller holds the
 * GIL. Eight rows are read together, one AVX-512 (or AVX2) accumulator each, so the weight
 * streams through at close to a core's read bandwidth; each row's sum is reduced in a fixed
 * order, so results are deterministic for a given instruction set (they differ from MKL's
 * only by rounding).
 *
 * Built at install time by setup.py (an optional extension: where it does not compile, xtp
 * keeps torch's F.linear). Nothing here depends on torch: addresses come in as integers. The
 * instruction set is chosen once at import from what the running CPU and OS support
 * (isa(): "avx512", "avx2" or "" when neither, in which case gemv raises RuntimeError;
 * use(name) switches, for tests of the other path).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define XTP_GEMV_X86 1
#include <immintrin.h>
#endif

typedef void (*gemv_fn)(const float *w, const float *x, const float *b, float *y,
                        Py_ssize_t out, Py_ssize_t in);

static gemv_fn chosen = NULL;
static const char *chosen_isa = "";

#ifdef XTP_GEMV_X86
#define ROWS 8

__attribute__((target("avx512f"))) static void
gemv_avx512(const float *w, const float *x, const float *b, float *y, Py_ssize_t out,
            Py_ssize_t in)
{
    const Py_ssize_t full = in & ~(Py_ssize_t)15;
    const __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    Py_ssize_t o = 0;
    for (; o + ROWS <= out; o += ROWS) {
        const float *r = w + o * in;
        __m512 acc[ROWS];
        for (int k = 0; k < ROWS; k++)
            acc[k] = _mm512_setzero_ps();
        for (Py_ssize_t i = 0; i < full; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
#pragma GCC unroll 8
            for (int k = 0; k < ROWS; k++)
                acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(r + k * in + i), xv, acc[k]);
        }
        if (tail) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
            for (int k = 0; k < ROWS; k++)
                acc[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + k * in + full), xv,
                                         acc[k]);
        }
        for (int k = 0; k < ROWS; k++)
            y[o + k] = _mm512_reduce_add_ps(acc[k]) + (b ? b[o + k] : 0.0f);
    }
    for (; o < out; o++) {
        const float *r = w + o * in;
        __m512 acc = _mm512_setzero_ps();
        for (Py_ssize_t i = 0; i < full; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i), acc);
        if (tail)
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + full),
                                  _mm512_maskz_loadu_ps(tail, x + full), acc);
        y[o] = _mm512_reduce_add_ps(acc) + (b ? b[o] : 0.0f);
    }
}

__attribute__((target("avx2,fma"))) static float
hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void
gemv_avx2(const float *w, const float *x, const float *b, float *y, Py_ssize_t out,
          Py_ssize_t in)
{
    const Py_ssize_t full = in & ~(Py_ssize_t)7;
    Py_ssize_t o = 0;
    for (; o + ROWS <= out; o += ROWS) {
        const float *r = w + o * in;
        __m256 acc[ROWS];
        for (int k = 0; k < ROWS; k++)
            acc[k] = _mm256_setzero_ps();
        for (Py_ssize_t i = 0; i < full; i += 8) {
            const __m256 xv = _mm256_loadu_ps(x + i);
#pragma GCC unroll 8
            for (int k = 0; k < ROWS; k++)
                acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r + k * in + i), xv, acc[k]);
        }
        for (int k = 0; k < ROWS; k++) {
            float s = hsum256(acc[k]);
            for (Py_ssize_t i = full; i < in; i++)
                s += r[k * in + i] * x[i];
            y[o + k] = s + (b ? b[o + k] : 0.0f);
        }
    }
    for (; o < out; o++) {
        const float *r = w + o * in;
        __m256 acc = _mm256_setzero_ps();
        for (Py_ssize_t i = 0; i < full; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), acc);
        float s = hsum256(acc);
        for (Py_ssize_t i = full; i < in; i++)
            s += r[i] * x[i];
        y[o] = s + (b ? b[o] : 0.0f);
    }
}

static int
choose(const char *isa)
{
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f");
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx512 && (isa == NULL || strcmp(isa, "avx512") == 0)) {
        chosen = gemv_avx512;
        chosen_isa = "avx512";
    } else if (avx2 && (isa == NULL || strcmp(isa, "avx2") == 0)) {
        chosen = gemv_avx2;
        chosen_isa = "avx2";
    } else {
        return isa == NULL;
    }
    return 1;
}
#else
static int
choose(const char *isa)
{
    return isa == NULL;
}
#endif

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

/* gemv(w, x, b, y, out, in): addresses as ints (b may be None); returns None. */
static PyObject *
py_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "gemv(w, x, b, y, out, in) takes 6 arguments");
        return NULL;
    }
    if (chosen == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no gemv kernel for this CPU (isa() is empty)");
        return NULL;
    }
    const float *w = address(args[0], 0);
    const float *x = w ? address(args[1], 0) : NULL;
    if (x == NULL)
        return NULL;
    const float *b = address(args[2], 1);
    if (b == NULL && PyErr_Occurred())
        return NULL;
    float *y = address(args[3], 0);
    if (y == NULL)
        return NULL;
    const Py_ssize_t out = PyLong_AsSsize_t(args[4]);
    const Py_ssize_t in = PyLong_AsSsize_t(args[5]);
    if ((out == -1 || in == -1) && PyErr_Occurred())
        return NULL;
    if (out < 0 || in < 0) {
        PyErr_SetString(PyExc_ValueError, "gemv: negative size");
        return NULL;
    }
    chosen(w, x, b, y, out, in);
    Py_RETURN_NONE;
}

static PyObject *
py_isa(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(chosen_isa);
}

/* use(name): switch to "avx512" or "avx2" (for tests of the other path); False if this CPU
   cannot run it (nothing changes then). */
static PyObject *
py_use(PyObject *self, PyObject *arg)
{
    const char *isa = PyUnicode_AsUTF8(arg);
    if (isa == NULL)
        return NULL;
    return PyBool_FromLong(choose(isa));
}

static PyMethodDef methods[] = {
    {"gemv", (PyCFunction)(void (*)(void))py_gemv, METH_FASTCALL,
     "gemv(w, x, b, y, out, in): y = W @ x (+ b), fp32; addresses as ints, b may be None"},
    {"isa", py_isa, METH_NOARGS, "the instruction set gemv uses here, or '' if none"},
    {"use", py_use, METH_O, "use('avx512' | 'avx2'): switch kernels; False if unsupported"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu_gemv",
    "fp32 matrix-vector products for one-token CPU decode (see cpu_gemv.py)", -1, methods,
};

PyMODINIT_FUNC
PyInit__cpu_gemv(void)
{
    choose(NULL);
    return PyModule_Create(&module);
}
