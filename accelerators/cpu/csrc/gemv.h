/*
 * Shared by the parts of xtp.accelerators.cpu._gemv: the kernels (gemv_kernels.c), the thread
 * pool that splits one product across threads (gemv_pool.c) and the Python module
 * (cpu_gemv.c). No Python here: the kernels and the pool run without the GIL.
 */
#ifndef XTP_GEMV_H
#define XTP_GEMV_H

#include <stddef.h>
#include <stdint.h>

#define CHUNK 32    /* columns per chunk of the bf16 layout */
#define ROW_BLOCK 8 /* rows per block of the bf16 layout, and per pass of every kernel */

/* One product: y (m, out) = x (m, in) @ W.T (+ b). fp32: w row-major (out, in), x (m, in).
   bf16: w packed (gemv_kernels.c), x (m, in_pad) zero-padded to a multiple of CHUNK; bf16 rows:
   w row-major (out, in) with in a multiple of CHUNK and out of ROW_BLOCK, x (m, in). */
typedef struct {
    const void *w, *x, *b;
    void *y;
    ptrdiff_t out, in, m;
} gemv_args;

/* computes the outputs o_begin <= o < o_end of every one of the m rows; o_begin is a multiple
   of ROW_BLOCK, o_end one too or out */
typedef void (*gemv_kernel)(const gemv_args *a, ptrdiff_t o_begin, ptrdiff_t o_end);

/* the kernels chosen for this CPU (NULL where there are none); gemv_choose(NULL) picks the
   best, gemv_choose("avx512" | "avx2") that one; 0 if the CPU cannot run what was asked */
extern gemv_kernel gemv_f32, gemv_bf16, gemv_bf16_rows;
extern const char *gemv_isa;
int gemv_choose(const char *isa);

/* kernel(a) split by rows of ROW_BLOCK outputs across `threads` threads (the caller's and
   threads - 1 pool workers, started on first need); returns when every part is done. Uses
   fewer threads where the product is small (pool_threads_for). Never fails: where a worker
   cannot be started, fewer threads do the work. */
void pool_run(gemv_kernel kernel, const gemv_args *a, int threads, size_t weight_bytes);
/* how many threads pool_run uses for a product of weight_bytes with `threads` asked */
int pool_threads_for(const gemv_args *a, int threads, size_t weight_bytes);
/* workers started in this process (0 in a fresh fork child) */
int pool_workers(void);
/* team mode: split products across the caller's OpenMP team through this GOMP_parallel
   (NULL: back to the pool's own workers); pool_team() says whether it is on */
void pool_use_team(void *gomp_parallel);
int pool_team(void);

#endif
