/* A parallel for that never waits for a thread that has not started: the CPU kernels' threads.
 *
 * parallel_for(total, chunk, threads, fn, ctx) runs fn(ctx, lo, hi) over [0, total) in chunks of
 * `chunk` items. The caller and up to threads - 1 pool threads claim chunks from one atomic
 * counter, and the call returns once every chunk is done. A pool thread that the OS has not
 * scheduled yet (the machine is busy) claims nothing, and the caller does its share instead: a
 * fork-join runtime's barrier (OpenMP's) would wait for it, which on a loaded 2-core machine made
 * a decode step about 6x slower. Pool threads spin briefly between calls (a decode step makes hundreds,
 * microseconds apart), then sleep on a futex. Correctness never depends on them: in a child after
 * fork(), which has no pool threads, the caller runs every chunk.
 *
 * Each kernel library includes this header and gets its own pool; an idle pool's threads sleep.
 */
#ifndef PAGEDSERVE_CPU_POOL_H
#define PAGEDSERVE_CPU_POOL_H

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef void (*range_fn)(void *ctx, int64_t lo, int64_t hi);

#define POOL_MAX_THREADS 64
#define POOL_SPIN_NS 50000 /* a pool thread spins this long for the next call before sleeping */

static struct {
    pthread_mutex_t call; /* one job at a time */
    _Atomic uint64_t state; /* job generation << 32 | next unclaimed chunk */
    _Atomic uint32_t wake; /* futex word: bumped for each job */
    _Atomic int64_t done; /* chunks of the current job finished */
    _Atomic(range_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int64_t total, chunk, chunks;
    _Atomic int sleepers; /* pool threads in (or entering) futex wait: the caller wakes them only then */
    int started; /* pool threads running in this process */
} pool = {.call = PTHREAD_MUTEX_INITIALIZER};

static inline void pool_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static inline int64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim and run chunks of the job of generation `gen` until none is left (or a newer job began). */
static void pool_work(uint32_t gen) {
    for (;;) {
        uint64_t s = atomic_load_explicit(&pool.state, memory_order_acquire);
        if ((uint32_t)(s >> 32) != gen) return;
        const int64_t i = (int64_t)(uint32_t)s, chunks = atomic_load_explicit(&pool.chunks, memory_order_relaxed);
        if (i >= chunks) return;
        const range_fn fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
        const int64_t total = atomic_load_explicit(&pool.total, memory_order_relaxed);
        const int64_t chunk = atomic_load_explicit(&pool.chunk, memory_order_relaxed);
        /* the fields read above belong to this job only if the claim succeeds on the same state */
        if (!atomic_compare_exchange_weak_explicit(&pool.state, &s, s + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        const int64_t lo = i * chunk, hi = lo + chunk < total ? lo + chunk : total;
        fn(ctx, lo, hi);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *pool_thread(void *arg) {
    (void)arg;
    uint32_t seen = atomic_load(&pool.wake);
    for (;;) {
        const int64_t until = pool_now_ns() + POOL_SPIN_NS;
        int spins = 0;
        while (atomic_load_explicit(&pool.wake, memory_order_acquire) == seen) {
            if ((++spins & 63) == 0 && pool_now_ns() > until) {
                atomic_fetch_add(&pool.sleepers, 1); /* seq_cst with the caller's bump of wake */
                syscall(SYS_futex, &pool.wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&pool.sleepers, 1);
                break;
            }
            pool_relax();
        }
        const uint32_t now = atomic_load_explicit(&pool.wake, memory_order_acquire);
        if (now == seen) continue;
        seen = now;
        pool_work((uint32_t)(atomic_load_explicit(&pool.state, memory_order_acquire) >> 32));
    }
    return NULL;
}

/* fork() waits for a running job to end; the child has no pool threads */
static void pool_before_fork(void) { pthread_mutex_lock(&pool.call); }
static void pool_after_fork_parent(void) { pthread_mutex_unlock(&pool.call); }
static void pool_after_fork_child(void) {
    pool.started = 0;
    pthread_mutex_unlock(&pool.call);
}

static void pool_start(int threads) {
    static int atfork;
    if (!atfork) atfork = !pthread_atfork(pool_before_fork, pool_after_fork_parent, pool_after_fork_child);
    for (; pool.started < threads - 1 && pool.started < POOL_MAX_THREADS - 1; pool.started++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, pool_thread, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer helpers: the caller does more itself */
    }
}

/* Chunks of about a quarter of one thread's share, a multiple of `align` items: a thread that starts
 * late leaves the others little to wait for. */
static inline int64_t pool_chunk(int64_t total, int64_t threads, int64_t align) {
    const int64_t parts = 4 * (threads > 1 ? threads : 1), chunk = (total + parts - 1) / parts;
    return (chunk + align - 1) / align * align;
}

static void parallel_for(int64_t total, int64_t chunk, int64_t threads, range_fn fn, void *ctx) {
    if (total <= 0) return;
    if (chunk < 1) chunk = 1;
    const int64_t chunks = (total + chunk - 1) / chunk;
    if (threads <= 1 || chunks <= 1) {
        fn(ctx, 0, total);
        return;
    }
    pthread_mutex_lock(&pool.call);
    pool_start((int)threads);
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.total, total, memory_order_relaxed);
    atomic_store_explicit(&pool.chunk, chunk, memory_order_relaxed);
    atomic_store_explicit(&pool.chunks, chunks, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const uint32_t gen = (uint32_t)(atomic_load(&pool.state) >> 32) + 1;
    atomic_store_explicit(&pool.state, (uint64_t)gen << 32, memory_order_release);
    atomic_fetch_add(&pool.wake, 1);
    if (atomic_load(&pool.sleepers) > 0)
        syscall(SYS_futex, &pool.wake, FUTEX_WAKE_PRIVATE, (int)(threads - 1), NULL, NULL, 0);
    pool_work(gen);
    /* every chunk is claimed; wait for those a pool thread is still running (yielding the CPU to
     * it, since on a busy machine it may be waiting for one) */
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < chunks; spins++) {
        if (spins > 1000) sched_yield();
        else pool_relax();
    }
    pthread_mutex_unlock(&pool.call);
}

#endif
