/*
 * The SIMD kernels of xtp.accelerators.cpu._gemv (AVX-512 and AVX2+FMA), each computing a range
 * of output rows (gemv.h) so the pool can split one product across threads.
 *
 * fp32: W row-major. Eight rows are read together, one accumulator each (sixteen with two
 * input rows per pass on AVX-512), so the weight streams through at close to a core's read
 * bandwidth. bf16: W in the blocked layout (rows padded with zeros to a multiple of 8, columns
 * to a multiple of 32, stored as blocks of 8 rows, each block as chunks of 32 columns, each
 * chunk as its 8 rows of 32 values: one sequential stream per block, where plain bf16 rows are
 * short streams the prefetchers restart at every page); values widened to fp32 exactly
 * (shift / mask) and summed with FMA; each output rounded once to bf16 (nearest even), bias
 * included. With several input rows each block is reused from L1/L2 for every row.
 *
 * Every output is summed in the same order whatever the thread count, the number of input
 * rows and how they are grouped in a pass: results are bit-identical across thread counts and
 * batch sizes for one instruction set, and differ from MKL's / oneDNN's only by rounding.
 *
 * Not used: avx512_bf16's vdpbf16ps. It flushes denormal inputs and outputs to zero (outside
 * the "fp32 sums, one rounding" contract for tiny values) and, measured on the blocked layout
 * at one row, read no faster than widening (bench/RESULTS.md, "bf16 through the kernel too").
 */
#include <string.h>

#include "gemv.h"

gemv_kernel gemv_f32 = NULL, gemv_bf16 = NULL, gemv_bf16_rows = NULL;
const char *gemv_isa = "";

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

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

/* ---- AVX-512 ------------------------------------------------------------------------- */

/* s[j][k] = row k of the 8-row block r . input row j, for nr (1 or 2) input rows x, x + in */
INLINE __attribute__((target("avx512f"))) void
f32_block512(const float *r, const float *x, ptrdiff_t in, const int nr, float s[2][ROW_BLOCK])
{
    const ptrdiff_t full = in & ~(ptrdiff_t)15;
    const __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    __m512 acc[2][ROW_BLOCK];
    for (int j = 0; j < nr; j++)
        for (int k = 0; k < ROW_BLOCK; k++)
            acc[j][k] = _mm512_setzero_ps();
    for (ptrdiff_t i = 0; i < full; i += 16) {
        __m512 xv[2];
        for (int j = 0; j < nr; j++)
            xv[j] = _mm512_loadu_ps(x + j * in + i);
#pragma GCC unroll 8
        for (int k = 0; k < ROW_BLOCK; k++) {
            const __m512 wv = _mm512_loadu_ps(r + k * in + i);
            for (int j = 0; j < nr; j++)
                acc[j][k] = _mm512_fmadd_ps(wv, xv[j], acc[j][k]);
        }
    }
    if (tail) {
        __m512 xv[2];
        for (int j = 0; j < nr; j++)
            xv[j] = _mm512_maskz_loadu_ps(tail, x + j * in + full);
        for (int k = 0; k < ROW_BLOCK; k++) {
            const __m512 wv = _mm512_maskz_loadu_ps(tail, r + k * in + full);
            for (int j = 0; j < nr; j++)
                acc[j][k] = _mm512_fmadd_ps(wv, xv[j], acc[j][k]);
        }
    }
    for (int j = 0; j < nr; j++)
        for (int k = 0; k < ROW_BLOCK; k++)
            s[j][k] = _mm512_reduce_add_ps(acc[j][k]);
}

__attribute__((target("avx512f"))) static void
f32_avx512(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe)
{
    const float *w = a->w, *x = a->x, *b = a->b;
    float *y = a->y;
    const ptrdiff_t in = a->in, out = a->out, m = a->m;
    const ptrdiff_t full = in & ~(ptrdiff_t)15;
    const __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    ptrdiff_t o = ob;
    float s[2][ROW_BLOCK];
    for (; o + ROW_BLOCK <= oe; o += ROW_BLOCK) {
        const float *r = w + o * in;
        ptrdiff_t j = 0;
        for (; j + 2 <= m; j += 2) {
            f32_block512(r, x + j * in, in, 2, s);
            for (int jj = 0; jj < 2; jj++)
                for (int k = 0; k < ROW_BLOCK; k++)
                    y[(j + jj) * out + o + k] = s[jj][k] + (b ? b[o + k] : 0.0f);
        }
        for (; j < m; j++) {
            f32_block512(r, x + j * in, in, 1, s);
            for (int k = 0; k < ROW_BLOCK; k++)
                y[j * out + o + k] = s[0][k] + (b ? b[o + k] : 0.0f);
        }
    }
    for (; o < oe; o++) { /* the last rows, fewer than 8: one at a time */
        const float *r = w + o * in;
        for (ptrdiff_t j = 0; j < m; j++) {
            const float *xj = x + j * in;
            __m512 acc = _mm512_setzero_ps();
            for (ptrdiff_t i = 0; i < full; i += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(xj + i), acc);
            if (tail)
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + full),
                                      _mm512_maskz_loadu_ps(tail, xj + full), acc);
            y[j * out + o] = _mm512_reduce_add_ps(acc) + (b ? b[o] : 0.0f);
        }
    }
}

/* s[j][k] for 8 bf16 weight rows and nr (1 or 2) padded input rows x, x + in_pad. The rows'
   32-column chunk c starts at blk + c * cstep, row k of it rstride values further: the blocked
   layout (cstep ROW_BLOCK, rstride CHUNK) or plain rows (cstep 1, rstride in = in_pad) */
INLINE __attribute__((target("avx512f"))) void
bf16_block512(const uint16_t *blk, const uint16_t *x, ptrdiff_t in_pad, const int nr,
              float s[2][ROW_BLOCK], ptrdiff_t cstep, ptrdiff_t rstride)
{
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[2][ROW_BLOCK];
    for (int j = 0; j < nr; j++)
        for (int k = 0; k < ROW_BLOCK; k++)
            acc[j][k] = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; c < in_pad; c += CHUNK) {
        __m512 xlo[2], xhi[2];
        for (int j = 0; j < nr; j++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(x + j * in_pad + c));
            xlo[j] = _mm512_castsi512_ps(_mm512_slli_epi32(xv, 16));
            xhi[j] = _mm512_castsi512_ps(_mm512_and_si512(xv, high));
        }
        const uint16_t *q = blk + c * cstep;
#pragma GCC unroll 8
        for (int k = 0; k < ROW_BLOCK; k++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(q + k * rstride));
            const __m512 wlo = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
            const __m512 whi = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
            for (int j = 0; j < nr; j++) {
                acc[j][k] = _mm512_fmadd_ps(wlo, xlo[j], acc[j][k]);
                acc[j][k] = _mm512_fmadd_ps(whi, xhi[j], acc[j][k]);
            }
        }
    }
    for (int j = 0; j < nr; j++)
        for (int k = 0; k < ROW_BLOCK; k++)
            s[j][k] = _mm512_reduce_add_ps(acc[j][k]);
}

static void
bf16_store(const gemv_args *a, ptrdiff_t j, ptrdiff_t o, const float *s)
{
    const uint16_t *b = a->b;
    uint16_t *y = a->y;
    for (int k = 0; k < ROW_BLOCK && o + k < a->out; k++)
        y[j * a->out + o + k] = round_bf16(s[k] + (b ? widen_bf16(b[o + k]) : 0.0f));
}

/* the bf16 products of rows [ob, oe) of the weight: blocked layout, or plain rows (in a
   multiple of CHUNK, out of ROW_BLOCK) */
INLINE __attribute__((target("avx512f"))) void
bf16_avx512_layout(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe, const int plain)
{
    const uint16_t *p = a->w, *x = a->x;
    const ptrdiff_t in_pad = (a->in + CHUNK - 1) / CHUNK * CHUNK, m = a->m;
    const ptrdiff_t cstep = plain ? 1 : ROW_BLOCK, rstride = plain ? in_pad : CHUNK;
    float s[2][ROW_BLOCK];
    for (ptrdiff_t o = ob; o < oe; o += ROW_BLOCK) {
        const uint16_t *blk = p + o * in_pad;
        ptrdiff_t j = 0;
        for (; j + 2 <= m; j += 2) {
            bf16_block512(blk, x + j * in_pad, in_pad, 2, s, cstep, rstride);
            bf16_store(a, j, o, s[0]);
            bf16_store(a, j + 1, o, s[1]);
        }
        for (; j < m; j++) {
            bf16_block512(blk, x + j * in_pad, in_pad, 1, s, cstep, rstride);
            bf16_store(a, j, o, s[0]);
        }
    }
}

__attribute__((target("avx512f"))) static void
bf16_avx512(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe)
{
    bf16_avx512_layout(a, ob, oe, 0);
}

__attribute__((target("avx512f"))) static void
bf16_rows_avx512(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe)
{
    bf16_avx512_layout(a, ob, oe, 1);
}

/* ---- AVX2 + FMA (16 registers: one input row per pass) -------------------------------- */

__attribute__((target("avx2,fma"))) static float
hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void
f32_avx2(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe)
{
    const float *w = a->w, *b = a->b;
    float *y = a->y;
    const ptrdiff_t in = a->in, out = a->out, full = in & ~(ptrdiff_t)7;
    for (ptrdiff_t j = 0; j < a->m; j++) {
        const float *x = (const float *)a->x + j * in;
        float *yj = y + j * out;
        ptrdiff_t o = ob;
        for (; o + ROW_BLOCK <= oe; o += ROW_BLOCK) {
            const float *r = w + o * in;
            __m256 acc[ROW_BLOCK];
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm256_setzero_ps();
            for (ptrdiff_t i = 0; i < full; i += 8) {
                const __m256 xv = _mm256_loadu_ps(x + i);
#pragma GCC unroll 8
                for (int k = 0; k < ROW_BLOCK; k++)
                    acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r + k * in + i), xv, acc[k]);
            }
            for (int k = 0; k < ROW_BLOCK; k++) {
                float s = hsum256(acc[k]);
                for (ptrdiff_t i = full; i < in; i++)
                    s += r[k * in + i] * x[i];
                yj[o + k] = s + (b ? b[o + k] : 0.0f);
            }
        }
        for (; o < oe; o++) {
            const float *r = w + o * in;
            __m256 acc = _mm256_setzero_ps();
            for (ptrdiff_t i = 0; i < full; i += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), acc);
            float s = hsum256(acc);
            for (ptrdiff_t i = full; i < in; i++)
                s += r[i] * x[i];
            yj[o] = s + (b ? b[o] : 0.0f);
        }
    }
}

INLINE __attribute__((target("avx2,fma"))) void
bf16_avx2_layout(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe, const int plain)
{
    const uint16_t *p = a->w;
    const ptrdiff_t in_pad = (a->in + CHUNK - 1) / CHUNK * CHUNK;
    const ptrdiff_t cstep = plain ? 1 : ROW_BLOCK, rstride = plain ? in_pad : CHUNK;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (ptrdiff_t o = ob; o < oe; o += ROW_BLOCK) {
        const uint16_t *blk = p + o * in_pad;
        for (ptrdiff_t j = 0; j < a->m; j++) {
            const uint16_t *xj = (const uint16_t *)a->x + j * in_pad;
            __m256 acc[ROW_BLOCK];
            float s[ROW_BLOCK];
            for (int k = 0; k < ROW_BLOCK; k++)
                acc[k] = _mm256_setzero_ps();
            for (ptrdiff_t c = 0; c < in_pad; c += CHUNK) {
                for (int half = 0; half < 2; half++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xj + c + half * 16));
                    const __m256 xlo = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));
                    const __m256 xhi = _mm256_castsi256_ps(_mm256_and_si256(xv, high));
                    const uint16_t *q = blk + c * cstep + half * 16;
#pragma GCC unroll 8
                    for (int k = 0; k < ROW_BLOCK; k++) {
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + k * rstride));
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), xlo, acc[k]);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_castsi256_ps(_mm256_and_si256(wv, high)), xhi, acc[k]);
                    }
                }
            }
            for (int k = 0; k < ROW_BLOCK; k++)
                s[k] = hsum256(acc[k]);
            bf16_store(a, j, o, s);
        }
    }
}

__attribute__((target("avx2,fma"))) static void
bf16_avx2(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe)
{
    bf16_avx2_layout(a, ob, oe, 0);
}

__attribute__((target("avx2,fma"))) static void
bf16_rows_avx2(const gemv_args *a, ptrdiff_t ob, ptrdiff_t oe)
{
    bf16_avx2_layout(a, ob, oe, 1);
}

int
gemv_choose(const char *isa)
{
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f");
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx512 && (isa == NULL || strcmp(isa, "avx512") == 0)) {
        gemv_f32 = f32_avx512;
        gemv_bf16 = bf16_avx512;
        gemv_bf16_rows = bf16_rows_avx512;
        gemv_isa = "avx512";
    } else if (avx2 && (isa == NULL || strcmp(isa, "avx2") == 0)) {
        gemv_f32 = f32_avx2;
        gemv_bf16 = bf16_avx2;
        gemv_bf16_rows = bf16_rows_avx2;
        gemv_isa = "avx2";
    } else {
        return isa == NULL;
    }
    return 1;
}
#else
int
gemv_choose(const char *isa)
{
    return isa == NULL;
}
#endif
