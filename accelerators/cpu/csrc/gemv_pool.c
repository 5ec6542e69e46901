/*
 * The thread pool of xtp.accelerators.cpu._gemv: one product split by output rows across the
 * calling thread and up to 255 workers (gemv.h, pool_run).
 *
 * Why a pool of our own (pthreads) and not OpenMP or torch's intra-op pool: torch's wheels
 * bundle their own OpenMP runtime (libgomp, or Intel's), and a second runtime linked into this
 * extension would be a second set of threads with its own spinning policy, or a clash of
 * symbols; torch's pool is reachable only through torch's C++ headers, which this extension
 * does not build against (it builds with a C compiler alone). A product is one fork-join: the
 * output rows are cut into parts of whole ROW_BLOCK blocks, about four per thread; the caller
 * and the woken workers take parts from a shared ticket (compare-and-swap) until none is left,
 * so a worker that wakes late, or is descheduled on a busy machine, delays nothing: the others
 * take its parts.
 *
 * Workers are started on first need (a product asking for more threads than exist) and live
 * for the process. Between products each spins on the counter for SPIN_NS (calling
 * sched_yield now and then, so a runnable thread of torch's on the same core gets the core),
 * then sleeps on a condition variable; the next product wakes it. One product at a time: a
 * second caller (another Python thread; the GIL is released while computing) waits for the
 * first. Fork-safe: pthread_atfork holds that lock across fork(), and the child starts with no
 * workers (they do not exist there) and starts its own on first need.
 *
 * Workers inherit the CPU affinity of the thread that starts them (the rank's cores, where
 * xtp pins ranks); the pool does not pin them further.
 *
 * Team mode (pool_use_team): the parts are taken by the caller's OpenMP team instead, through
 * the GOMP_parallel entry point of the OpenMP runtime torch already loaded (libgomp, or Intel's
 * libiomp5, which exports it too), found by the Python side and handed over as an address. Then
 * the product runs on torch's own intra-op threads, which are spinning from torch's last op
 * anyway: no second set of threads competes for the rank's cores. No OpenMP is linked here.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "gemv.h"

#define MAX_THREADS 256
#define SPIN_NS 200000L               /* a worker's spin before it sleeps: 0.2 ms */
#define MIN_BYTES_PER_THREAD (64 << 10) /* smaller parts than this are not worth a thread */

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

static struct {
    pthread_mutex_t submit; /* one product at a time; held across fork() */
    pthread_mutex_t lock;   /* with wake: sleeping workers */
    pthread_cond_t wake;
    atomic_uint gen;        /* bumped once per product, to wake the workers */
    atomic_int sleepers;
    /* the current product's parts: job id (24 bits) | next part (20) | parts (20); a thread
       takes a part by bumping `next` with compare-and-swap, so a part is taken once and only
       from the product it belongs to, however late a worker comes */
    _Atomic uint64_t ticket;
    atomic_int done;        /* parts finished */
    atomic_int threads;     /* threads asked for the current product */
    gemv_kernel kernel;
    const gemv_args *args;
    ptrdiff_t blocks_per_part;
    int workers;            /* workers started: ids 1..workers */
    unsigned start_gen[MAX_THREADS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};

#define PART_BITS 20
#define PART_MASK ((UINT64_C(1) << PART_BITS) - 1)

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void
before_fork(void)
{
    pthread_mutex_lock(&pool.submit);
}

static void
after_fork_parent(void)
{
    pthread_mutex_unlock(&pool.submit);
}

static void
after_fork_child(void)
{   /* only the forking thread exists here: no workers, no waiter, nothing running */
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.done, 0);
    pool.workers = 0;
}

static void
register_atfork(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* takes and computes parts of the current product until none is left; returns how many */
static int
take_parts(void)
{
    int taken = 0;
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    for (;;) {
        const uint64_t next = (t >> PART_BITS) & PART_MASK, parts = t & PART_MASK;
        if (next >= parts)
            return taken;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + (UINT64_C(1) << PART_BITS),
                                                   memory_order_acq_rel, memory_order_acquire))
            continue; /* t now holds the current ticket */
        /* part `next` is ours: its product cannot finish before we count it done, so the
           fields below are that product's */
        const gemv_args *a = pool.args;
        const ptrdiff_t o0 = (ptrdiff_t)next * pool.blocks_per_part * ROW_BLOCK;
        ptrdiff_t o1 = o0 + pool.blocks_per_part * ROW_BLOCK;
        if (o1 > a->out)
            o1 = a->out;
        pool.kernel(a, o0, o1);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        taken++;
        t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    }
}

static long
elapsed_ns(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* the generation after `seen`: spin, then sleep */
static unsigned
next_gen(unsigned seen)
{
    struct timespec t0;
    unsigned g;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned n = 1;; n++) {
        g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (g != seen)
            return g;
        CPU_RELAX();
        if ((n & 63) == 0) {
            if (elapsed_ns(&t0) > SPIN_NS)
                break;
            sched_yield();
        }
    }
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.sleepers, 1);
    while ((g = atomic_load(&pool.gen)) == seen)
        pthread_cond_wait(&pool.wake, &pool.lock);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.lock);
    return g;
}

static void *
worker(void *arg)
{
    const int id = (int)(intptr_t)arg;
    unsigned seen = pool.start_gen[id];
    for (;;) {
        seen = next_gen(seen);
        if (id < atomic_load_explicit(&pool.threads, memory_order_relaxed))
            take_parts();
    }
    return NULL;
}

/* GOMP_parallel(fn, data, num_threads, flags): libgomp's ABI for `#pragma omp parallel` */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads,
                                 unsigned flags);
static gomp_parallel_fn team_parallel = NULL;

void
pool_use_team(void *gomp_parallel)
{
    pthread_mutex_lock(&pool.submit);
    team_parallel = (gomp_parallel_fn)gomp_parallel;
    pthread_mutex_unlock(&pool.submit);
}

int
pool_team(void)
{
    return team_parallel != NULL;
}

static void
team_body(void *unused)
{
    (void)unused;
    take_parts();
}

int
pool_threads_for(const gemv_args *a, int threads, size_t weight_bytes)
{
    const ptrdiff_t blocks = (a->out + ROW_BLOCK - 1) / ROW_BLOCK;
    const size_t by_size = weight_bytes / MIN_BYTES_PER_THREAD;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if ((ptrdiff_t)threads > blocks)
        threads = (int)blocks;
    if ((size_t)threads > by_size)
        threads = (int)by_size;
    return threads < 1 ? 1 : threads;
}

int
pool_workers(void)
{
    return pool.workers;
}

void
pool_run(gemv_kernel kernel, const gemv_args *a, int threads, size_t weight_bytes)
{
    threads = pool_threads_for(a, threads, weight_bytes);
    if (threads == 1) {
        kernel(a, 0, a->out);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.submit);
    const unsigned gen = atomic_load(&pool.gen);
    while (!team_parallel && pool.workers < threads - 1) { /* start the missing workers */
        const int id = pool.workers + 1;
        pthread_t t;
        pthread_attr_t attr;
        pool.start_gen[id] = gen;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int err = pthread_create(&t, &attr, worker, (void *)(intptr_t)id);
        pthread_attr_destroy(&attr);
        if (err != 0)
            break;
        pool.workers = id;
    }
    if (!team_parallel && threads > pool.workers + 1)
        threads = pool.workers + 1;
    /* parts: about four per thread (a late or descheduled thread's parts are taken by the
       others), each whole blocks of ROW_BLOCK rows */
    const ptrdiff_t blocks = (a->out + ROW_BLOCK - 1) / ROW_BLOCK;
    ptrdiff_t per = (blocks + 4 * threads - 1) / (4 * threads);
    while ((blocks + per - 1) / per > (ptrdiff_t)PART_MASK)
        per *= 2;
    const uint64_t parts = (uint64_t)((blocks + per - 1) / per);
    const uint64_t job = (atomic_load_explicit(&pool.ticket, memory_order_relaxed) >>
                          (2 * PART_BITS)) + 1;
    pool.kernel = kernel;
    pool.args = a;
    pool.blocks_per_part = per;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.threads, threads);
    atomic_store_explicit(&pool.ticket, (job << (2 * PART_BITS)) | parts, memory_order_release);
    if (team_parallel) { /* the caller's OpenMP team takes the parts; returns when all are done */
        team_parallel(team_body, NULL, (unsigned)threads, 0);
        pthread_mutex_unlock(&pool.submit);
        return;
    }
    atomic_store(&pool.gen, gen + 1); /* seq_cst: ordered before the sleepers read below */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    take_parts();
    for (unsigned n = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < (int)parts;
         n++) {
        CPU_RELAX();
        if ((n & 1023) == 0)
            sched_yield();
    }
    pthread_mutex_unlock(&pool.submit);
}
