/*
 * xtp.accelerators.cpu._gemv: fp32 and bf16 matrix-vector products for one-token decode on CPU.
 *
 * Contract (fp32, gemv): y[o] = sum_i W[o * in + i] * x[i] (+ b[o]) for o < out, with W a
 * row-major (out, in) fp32 matrix and x, y, b contiguous fp32 vectors. bf16 (gemv_bf16): the
 * same for m rows of x, W in a blocked layout (see below). One thread; the caller holds the
 * GIL. Eight rows are read together, one AVX-512 (or AVX2) accumulator each, so the weight
 * streams through at close to a core's read bandwidth; each row's sum is reduced in a fixed
 * order, so results are deterministic for a given instruction set (they differ from MKL's
 * only by rounding).
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

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define XTP_GEMV_X86 1
#include <immintrin.h>
#endif

typedef void (*gemv_fn)(const float *w, const float *x, const float *b, float *y,
                        Py_ssize_t out, Py_ssize_t in);

/* bf16: w packed (see gemv_bf16 below), x (m, in) and y (m, out) row-major, b (out) or NULL */
typedef void (*gemv_bf16_fn)(const uint16_t *p, const uint16_t *x, const uint16_t *b,
                             uint16_t *y, Py_ssize_t out, Py_ssize_t in, Py_ssize_t m);

static gemv_fn chosen = NULL;
static gemv_bf16_fn chosen_bf16 = NULL;
static const char *chosen_isa = "";

/*
 * bf16. The weight is packed once (cpu_gemv.py does it with torch: bit-exact, reversible):
 * rows padded with zeros to a multiple of 8, columns to a multiple of 32, then stored as
 * blocks of 8 rows, each block as chunks of 32 columns, each chunk as its 8 rows of 32 values
 * (8 x 64 bytes). A block is one sequential stream of 8 x in_pad values: plain rows of a bf16
 * weight are short streams (4 KiB for 2048 columns), which the CPU's prefetchers restart at
 * every page, and read slower (bench/RESULTS.md). bf16 values are widened to fp32 exactly
 * (shift / mask) and summed in fp32 with FMA; each output is rounded once to bf16 (nearest
 * even), bias included.
 * m rows of x reuse each block while it is in L1.
 */
#define CHUNK 32
#define ROW_BLOCK 8 /* rows per block of the bf16 layout, and per pass of every kernel */

static inline uint16_t
round_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN stays NaN (quiet) */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float
widen_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the m rows of x, each padded with zeros to in_pad columns, into buf (m * in_pad) */
static void
pad_rows(const uint16_t *x, uint16_t *buf, Py_ssize_t in, Py_ssize_t in_pad, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        memcpy(buf + j * in_pad, x + j * in, (size_t)in * 2);
        memset(buf + j * in_pad + in, 0, (size_t)(in_pad - in) * 2);
    }
}

#ifdef XTP_GEMV_X86

__attribute__((target("avx512f"))) static void
gemv_avx512(const float *w, const float *x, const float *b, float *y, Py_ssize_t out,
            Py_ssize_t in)
{
    const Py_ssize_t full = in & ~(Py_ssize_t)15;
    const __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    Py_ssize_t o = 0;
    for (; o + ROW_BLOCK <= out; o += ROW_BLOCK) {
        const float *r = w + o * in;
        __m512 acc[ROW_BLOCK];
        for (int k = 0; k < ROW_BLOCK; k++)
            acc[k] = _mm512_setzero_ps();
        for (Py_ssize_t i = 0; i < full; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
#pragma GCC unroll 8
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(r + k * in + i), xv, acc[k]);
        }
        if (tail) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + k * in + full), xv,
                                         acc[k]);
        }
        for (int k = 0; k < ROW_BLOCK; k++)
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
    for (; o + ROW_BLOCK <= out; o += ROW_BLOCK) {
        const float *r = w + o * in;
        __m256 acc[ROW_BLOCK];
        for (int k = 0; k < ROW_BLOCK; k++)
            acc[k] = _mm256_setzero_ps();
        for (Py_ssize_t i = 0; i < full; i += 8) {
            const __m256 xv = _mm256_loadu_ps(x + i);
#pragma GCC unroll 8
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r + k * in + i), xv, acc[k]);
        }
        for (int k = 0; k < ROW_BLOCK; k++) {
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


__attribute__((target("avx512f"))) static void
gemv_bf16_avx512(const uint16_t *p, const uint16_t *x, const uint16_t *b, uint16_t *y,
                 Py_ssize_t out, Py_ssize_t in, Py_ssize_t m)
{
    const Py_ssize_t in_pad = (in + CHUNK - 1) / CHUNK * CHUNK, chunks = in_pad / CHUNK;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (Py_ssize_t o = 0; o < out; o += ROW_BLOCK) {
        const uint16_t *blk = p + o * in_pad;
        for (Py_ssize_t j = 0; j < m; j++) {
            const uint16_t *xj = x + j * in_pad;
            __m512 acc[ROW_BLOCK];
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm512_setzero_ps();
            for (Py_ssize_t c = 0; c < chunks; c++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xj + c * CHUNK));
                const __m512 xlo = _mm512_castsi512_ps(_mm512_slli_epi32(xv, 16));
                const __m512 xhi = _mm512_castsi512_ps(_mm512_and_si512(xv, high));
                const uint16_t *q = blk + c * ROW_BLOCK * CHUNK;
#pragma GCC unroll 8
                for (int k = 0; k < ROW_BLOCK; k++) {
                    const __m512i wv = _mm512_loadu_si512((const void *)(q + k * CHUNK));
                    acc[k] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wv, 16)),
                                             xlo, acc[k]);
                    acc[k] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wv, high)),
                                             xhi, acc[k]);
                }
            }
            for (int k = 0; k < ROW_BLOCK && o + k < out; k++)
                y[j * out + o + k] = round_bf16(_mm512_reduce_add_ps(acc[k]) +
                                                (b ? widen_bf16(b[o + k]) : 0.0f));
        }
    }
}

__attribute__((target("avx2,fma"))) static void
gemv_bf16_avx2(const uint16_t *p, const uint16_t *x, const uint16_t *b, uint16_t *y,
               Py_ssize_t out, Py_ssize_t in, Py_ssize_t m)
{
    const Py_ssize_t in_pad = (in + CHUNK - 1) / CHUNK * CHUNK, chunks = in_pad / CHUNK;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (Py_ssize_t o = 0; o < out; o += ROW_BLOCK) {
        const uint16_t *blk = p + o * in_pad;
        for (Py_ssize_t j = 0; j < m; j++) {
            const uint16_t *xj = x + j * in_pad;
            __m256 acc[ROW_BLOCK];
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm256_setzero_ps();
            for (Py_ssize_t c = 0; c < chunks; c++) {
                for (int half = 0; half < 2; half++) {
                    const __m256i xv =
                        _mm256_loadu_si256((const __m256i *)(xj + c * CHUNK + half * 16));
                    const __m256 xlo = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));
                    const __m256 xhi = _mm256_castsi256_ps(_mm256_and_si256(xv, high));
                    const uint16_t *q = blk + c * ROW_BLOCK * CHUNK + half * 16;
#pragma GCC unroll 8
                    for (int k = 0; k < ROW_BLOCK; k++) {
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + k * CHUNK));
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), xlo, acc[k]);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_castsi256_ps(_mm256_and_si256(wv, high)), xhi, acc[k]);
                    }
                }
            }
            for (int k = 0; k < ROW_BLOCK && o + k < out; k++)
                y[j * out + o + k] = round_bf16(hsum256(acc[k]) +
                                                (b ? widen_bf16(b[o + k]) : 0.0f));
        }
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
        chosen_bf16 = gemv_bf16_avx512;
        chosen_isa = "avx512";
    } else if (avx2 && (isa == NULL || strcmp(isa, "avx2") == 0)) {
        chosen = gemv_avx2;
        chosen_bf16 = gemv_bf16_avx2;
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

/* The arguments of a kernel call, as ints: n_addr addresses (the one at index `optional` may
   be None, giving NULL; -1: none may), then n_size non-negative sizes. 0 on success, else -1
   with a Python error set. `sig` names the call in the messages. */
static int
parse_call(const char *sig, PyObject *const *args, Py_ssize_t nargs, int n_addr, int optional,
           void **addr, int n_size, Py_ssize_t *size)
{
    if (nargs != n_addr + n_size) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments", sig, n_addr + n_size);
        return -1;
    }
    for (int i = 0; i < n_addr; i++) {
        addr[i] = address(args[i], i == optional);
        if (addr[i] == NULL && PyErr_Occurred())
            return -1;
    }
    for (int i = 0; i < n_size; i++) {
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

/* gemv(w, x, b, y, out, in): addresses as ints (b may be None); returns None. */
static PyObject *
py_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *a[4];
    Py_ssize_t n[2];
    if (parse_call("gemv(w, x, b, y, out, in)", args, nargs, 4, 2, a, 2, n) < 0
        || !have_kernel((const void *)chosen))
        return NULL;
    chosen(a[0], a[1], a[2], a[3], n[0], n[1]);
    Py_RETURN_NONE;
}

/* gemv_bf16(p, x, b, y, out, in, m): packed bf16 weight, x (m, in), y (m, out); b may be
   None; addresses as ints. x is copied into a zero-padded buffer when in is not a multiple of
   32. Returns None. */
static PyObject *
py_gemv_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *a[4];
    Py_ssize_t n[3];
    if (parse_call("gemv_bf16(p, x, b, y, out, in, m)", args, nargs, 4, 2, a, 3, n) < 0
        || !have_kernel((const void *)chosen_bf16))
        return NULL;
    const Py_ssize_t out = n[0], in = n[1], m = n[2];
    const Py_ssize_t in_pad = (in + CHUNK - 1) / CHUNK * CHUNK;
    if (in_pad == in) {
        chosen_bf16(a[0], a[1], a[2], a[3], out, in, m);
        Py_RETURN_NONE;
    }
    uint16_t *buf = PyMem_Malloc((size_t)(m * in_pad) * 2 + 2);
    if (buf == NULL)
        return PyErr_NoMemory();
    pad_rows(a[1], buf, in, in_pad, m);
    chosen_bf16(a[0], buf, a[2], a[3], out, in, m);
    PyMem_Free(buf);
    Py_RETURN_NONE;
}

/* unpack_bf16(p, w, out, in): the packed bf16 weight p back into the row-major (out, in) w;
   returns None. Used for inputs the kernel does not serve (prefill): 64-byte copies, several
   times faster than torch's strided copy of the same permutation. */
static PyObject *
py_unpack_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *a[2];
    Py_ssize_t n[2];
    if (parse_call("unpack_bf16(p, w, out, in)", args, nargs, 2, -1, a, 2, n) < 0)
        return NULL;
    const uint16_t *p = a[0];
    uint16_t *w = a[1];
    const Py_ssize_t out = n[0], in = n[1];
    const Py_ssize_t chunks = (in + CHUNK - 1) / CHUNK;
    for (Py_ssize_t o = 0; o < out; o += ROW_BLOCK) {
        for (Py_ssize_t c = 0; c < chunks; c++) {
            const uint16_t *q = p + (o * chunks + c * ROW_BLOCK) * CHUNK;
            const Py_ssize_t len = in - c * CHUNK < CHUNK ? in - c * CHUNK : CHUNK;
            for (Py_ssize_t k = 0; k < ROW_BLOCK && o + k < out; k++)
                memcpy(w + (o + k) * in + c * CHUNK, q + k * CHUNK, (size_t)len * 2);
        }
    }
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
    {"gemv_bf16", (PyCFunction)(void (*)(void))py_gemv_bf16, METH_FASTCALL,
     "gemv_bf16(p, x, b, y, out, in, m): y = x @ W.T (+ b), bf16, W packed (cpu_gemv.py)"},
    {"unpack_bf16", (PyCFunction)(void (*)(void))py_unpack_bf16, METH_FASTCALL,
     "unpack_bf16(p, w, out, in): the packed bf16 weight p into row-major w"},
    {"isa", py_isa, METH_NOARGS, "the instruction set gemv uses here, or '' if none"},
    {"use", py_use, METH_O, "use('avx512' | 'avx2'): switch kernels; False if unsupported"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gemv",
    "fp32 matrix-vector products for one-token CPU decode (see cpu_gemv.py)", -1, methods,
};

PyMODINIT_FUNC
PyInit__gemv(void)
{
    choose(NULL);
    return PyModule_Create(&module);
}
