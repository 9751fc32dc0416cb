/* A persistent thread pool with dynamic work claiming.
 *
 * Decode calls a kernel ~210 times per token, each a few tens of microseconds, so waking threads
 * through the OS on every call would cost as much as the work: workers spin on a generation
 * counter for a while (BITLM_SPIN_US, default 1000 us) after each task, then sleep on a condition
 * variable.
 *
 * A task is split into parts; thread t (the caller is 0) owns a contiguous range of them, so a
 * thread keeps streaming the same stretch of the weights call after call (its core's caches stay
 * warm), and claims them from its own atomic counter. A thread out of parts steals from the
 * others' counters: if a worker is descheduled (another process busy on its core), the caller
 * does its parts and the call slows to one-thread speed instead of stalling for a scheduler time
 * slice. Each counter carries the task's generation in its high 32 bits, so a worker that wakes
 * late can never claim a part of a newer task with an older one's arguments. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "i2v.h"

#define MAX_THREADS 256

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

static struct {
    pthread_mutex_t mu;        /* guards sleeping */
    pthread_cond_t cv;
    pthread_mutex_t run_mu;    /* one task at a time (callers on several Python threads) */
    atomic_uint gen;           /* bumped once per task; workers wait for a change */
    struct {
        atomic_ullong v;       /* (generation << 32) | next part of this thread's range */
        char pad[56];          /* one cache line per counter */
    } claim[MAX_THREADS];
    atomic_int done;           /* parts finished in the current task */
    atomic_int sleepers;
    atomic_int stop;
    i2v_task_fn fn;            /* the current task: written before claim is published */
    void *ctx;
    int nparts;
    int nthreads;              /* including the caller */
    pthread_t tid[MAX_THREADS];
    long spin_ns;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* set while this thread runs a part: a task that itself calls i2v_pool_run (a kernel inside a
 * kernel) runs its parts inline instead of waiting on the pool it is part of */
static __thread int in_task;

/* thread t's range of parts: [t * nparts / nthreads, (t + 1) * nparts / nthreads) */
static int range_begin(int t, int nparts, int nthreads) { return (int)((long)t * nparts / nthreads); }

/* claim and run parts of task g from thread `me`'s range, then from the others', until none are
 * left (or the task is no longer g) */
static void run_parts(unsigned g, int me) {
    int nthreads = P.nthreads;
    for (int i = 0; i < nthreads; i++) {
        int t = (me + i) % nthreads;
        for (;;) {
            unsigned long long c = atomic_load_explicit(&P.claim[t].v, memory_order_acquire);
            if ((unsigned)(c >> 32) != g) return;  /* a newer task: this one is over */
            int nparts = P.nparts;  /* a newer task's value only once the counters have left g: then
                                       the CAS below fails (i2v_pool_run resets them first) */
            atomic_thread_fence(memory_order_acquire);  /* that read before the CAS's (free on x86) */
            int part = range_begin(t, nparts, nthreads) + (int)(c & 0xFFFFFFFFu);
            if (part >= range_begin(t + 1, nparts, nthreads)) break;
            if (atomic_compare_exchange_weak_explicit(&P.claim[t].v, &c, c + 1, memory_order_acq_rel,
                                                      memory_order_relaxed)) {
                in_task = 1;
                P.fn(P.ctx, part, nparts);  /* task g stays live until its every part is done */
                in_task = 0;
                atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
            }
        }
    }
}

static void *worker(void *arg) {
    int me = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&P.gen);
    for (;;) {
        unsigned g;
        long t0 = 0;
        for (unsigned spins = 0; (g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen; spins++) {
            if (atomic_load_explicit(&P.stop, memory_order_relaxed)) return NULL;
            if ((spins & 255) == 0) {
                sched_yield();  /* every ~20 us: if this core is shared (more threads than free
                                   cores), let the thread doing the work run */
                long t = now_ns();
                if (t0 == 0) t0 = t;
                else if (t - t0 > P.spin_ns) {
                    pthread_mutex_lock(&P.mu);
                    atomic_fetch_add(&P.sleepers, 1);
                    while ((g = atomic_load(&P.gen)) == seen && !atomic_load(&P.stop))
                        pthread_cond_wait(&P.cv, &P.mu);
                    atomic_fetch_sub(&P.sleepers, 1);
                    pthread_mutex_unlock(&P.mu);
                    break;
                }
            }
            cpu_relax();
        }
        if (atomic_load(&P.stop)) return NULL;
        seen = g;
        run_parts(g, me);
    }
}

static int available_cpus(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void stop_workers(void) {
    if (P.nthreads <= 1) return;
    atomic_store(&P.stop, 1);
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 1; i < P.nthreads; i++) pthread_join(P.tid[i], NULL);
    atomic_store(&P.stop, 0);
    P.nthreads = 1;
}

static void reset_in_child(void);
static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_in_child); }

/* after fork() the child has none of the workers: forget them and start afresh on first use */
static void reset_in_child(void) {
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    pthread_mutex_init(&P.run_mu, NULL);
    atomic_store(&P.sleepers, 0);
    atomic_store(&P.stop, 0);
    P.nthreads = 0;
}

int i2v_pool_set_threads(int n) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_atfork);
    if (n <= 0) {
        const char *env = getenv("BITLM_NUM_THREADS");
        n = env && atoi(env) > 0 ? atoi(env) : available_cpus();
    }
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&P.run_mu);
    if (P.spin_ns == 0) {
        const char *spin = getenv("BITLM_SPIN_US");
        P.spin_ns = (spin ? atol(spin) : 1000) * 1000L;
    }
    if (n != P.nthreads) {
        stop_workers();
        int started = 1;
        for (int i = 1; i < n; i++, started++)
            if (pthread_create(&P.tid[i], NULL, worker, (void *)(intptr_t)i) != 0) break;
        P.nthreads = started;
    }
    pthread_mutex_unlock(&P.run_mu);
    return P.nthreads;
}

int i2v_pool_threads(void) {
    if (P.nthreads == 0) i2v_pool_set_threads(0);
    return P.nthreads;
}

/* where part p's units start: the share of p's thread t, [total * b / nparts, total * e / nparts)
 * for its parts b .. e - 1, cut into its K = e - b parts with sizes falling as K - k (part k ends
 * where a fraction 1 - ((K - k - 1) / K)^2 of the share is done): the last parts, the ones a thread
 * waits for or steals at the end of a run, are short (at K = 8 the last is 1/64 of the share, not 1/8) */
static long split_start(long total, int p, int nparts, int nthreads) {
    if (p >= nparts) return total;
    int t = (int)((long)p * nthreads / nparts);
    while (t > 0 && range_begin(t, nparts, nthreads) > p) t--;
    while (range_begin(t + 1, nparts, nthreads) <= p) t++;
    int b = range_begin(t, nparts, nthreads), e = range_begin(t + 1, nparts, nthreads);
    int64_t K = e - b, r = e - p;  /* the thread's parts, and those left with p's */
    int64_t u0 = (int64_t)total * b / nparts, n = (int64_t)total * e / nparts - u0;
    return (long)(u0 + n - n * r * r / (K * K));
}

void i2v_pool_split(long total, int p, int nparts, long *lo, long *hi) {
    int nthreads = P.nthreads > 0 ? P.nthreads : 1;
    *lo = split_start(total, p, nparts, nthreads);
    *hi = split_start(total, p + 1, nparts, nthreads);
}

void i2v_pool_run(i2v_task_fn fn, void *ctx, int nparts) {
    if (P.nthreads == 0) i2v_pool_set_threads(0);
    if (nparts <= 1 || P.nthreads <= 1 || in_task) {
        for (int p = 0; p < nparts; p++) fn(ctx, p, nparts);
        return;
    }
    pthread_mutex_lock(&P.run_mu);
    unsigned g = atomic_load(&P.gen) + 1;
    /* The counters move to the new generation BEFORE the task's fn, ctx and nparts are written: a
     * worker still in run_parts for the last task, holding a counter value of the old generation,
     * must fail its compare-and-swap. In the other order it could read the new nparts (a part index
     * that was past its range now within it), claim on a counter not yet reset, and run an extra part
     * of the new task, counted in done: the caller then returned while a real part still ran (wrong
     * results, or a fault in scratch the next call replaced). Workers enter run_parts for g only
     * after seeing P.gen = g below, so they see this task's fn, ctx and nparts. */
    for (int t = 0; t < P.nthreads; t++)
        atomic_store_explicit(&P.claim[t].v, (unsigned long long)g << 32, memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);  /* the resets before the writes below, on weak-memory CPUs too */
    P.fn = fn;
    P.ctx = ctx;
    P.nparts = nparts;
    atomic_store(&P.done, 0);
    atomic_store(&P.gen, g);  /* seq_cst: a worker going to sleep either sees the new gen or is
                                 counted in sleepers below and gets the broadcast */
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    run_parts(g, 0);
    for (unsigned spins = 1; atomic_load_explicit(&P.done, memory_order_acquire) < nparts; spins++) {
        cpu_relax();
        if ((spins & 255) == 0) sched_yield();  /* a descheduled worker may need this core */
    }
    pthread_mutex_unlock(&P.run_mu);
}
