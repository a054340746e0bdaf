/* pool.c - the worker pool behind pool_run (see pool.h).
 *
 * One job at a time: a caller takes the pool with a flag, publishes its
 * function and context, then claims tasks beside the workers.  A task is
 * claimed by compare-and-swap on `work`, which packs the next task (low 32
 * bits) and the task count (high 32 bits).  A claimed task belongs to the
 * job being run: the caller does not return, and so does not publish a new
 * job, until `done` reaches the task count, so a worker reads the job only
 * after a successful claim.  A caller that finds the pool taken (two
 * batchers of two models multiplying at once) runs its tasks itself rather
 * than wait: the pool is a speed-up, never a queue.
 */
#include "pool.h"

#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* Upper bound on the pool; RRN_THREADS is clamped to it. */
#define MAX_THREADS 64
#define DEFAULT_MAX_THREADS 16

/* How long an idle worker spins before it sleeps: longer than the pointwise
 * work between two recurrent-step products, short enough not to waste a core
 * when the server is idle. */
#define SPIN_NS 200000

static struct {
    pthread_once_t once;
    int size;         /* threads taking part, caller included */
    atomic_int limit; /* test hook: at most this many take part */
    atomic_flag busy; /* held by the caller whose job is running */
    pool_fn fn;
    void *ctx;
    _Atomic uint64_t work;
    atomic_int done;
    atomic_int sleepers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {
    .once = PTHREAD_ONCE_INIT,
    .busy = ATOMIC_FLAG_INIT,
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int work_available(int id)
{
    uint64_t w = atomic_load(&pool.work);
    return id < atomic_load_explicit(&pool.limit, memory_order_relaxed) && (uint32_t)w < (uint32_t)(w >> 32);
}

/* Claims and runs tasks as worker id until none is left; returns how many
 * it ran. */
static int run_tasks(int id)
{
    int ran = 0;
    uint64_t w = atomic_load(&pool.work);
    while ((uint32_t)w < (uint32_t)(w >> 32)) {
        if (!atomic_compare_exchange_weak(&pool.work, &w, w + 1))
            continue;
        pool.fn(pool.ctx, (int)(uint32_t)w, id);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        ran++;
        w = atomic_load(&pool.work);
    }
    return ran;
}

static void *worker_main(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (;;) {
        if (work_available(id) && run_tasks(id))
            continue;
        int64_t deadline = now_ns() + SPIN_NS;
        int spins = 0;
        while (!work_available(id)) {
            cpu_relax();
            if (++spins % 32 == 0 && now_ns() > deadline)
                break;
        }
        if (work_available(id))
            continue;
        /* sleepers is raised before the last look at work, and the caller
         * publishes work before it looks at sleepers, so a wake-up cannot
         * fall between them (both sequentially consistent). */
        pthread_mutex_lock(&pool.mu);
        atomic_fetch_add(&pool.sleepers, 1);
        while (!work_available(id))
            pthread_cond_wait(&pool.cv, &pool.mu);
        atomic_fetch_sub(&pool.sleepers, 1);
        pthread_mutex_unlock(&pool.mu);
    }
    return NULL;
}

static void pool_init(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n > DEFAULT_MAX_THREADS)
        n = DEFAULT_MAX_THREADS;
    const char *env = getenv("RRN_THREADS");
    if (env && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1)
            n = v;
    }
    if (n > MAX_THREADS)
        n = MAX_THREADS;
    if (n < 1)
        n = 1;

    /* Workers take no signals: those belong to the threads that expect them. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int size = 1;
    pthread_t tid;
    while (size < n && pthread_create(&tid, NULL, worker_main, (void *)(intptr_t)size) == 0) {
        pthread_detach(tid);
        size++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pool.size = size;
    atomic_store(&pool.limit, size);
}

int pool_threads(void)
{
    pthread_once(&pool.once, pool_init);
    return atomic_load(&pool.limit);
}

int pool_size(void)
{
    pthread_once(&pool.once, pool_init);
    return pool.size;
}

int pool_set_threads(int n)
{
    pthread_once(&pool.once, pool_init);
    atomic_store(&pool.limit, n <= 0 || n > pool.size ? pool.size : n);
    return pool.size;
}

void pool_run(int tasks, pool_fn fn, void *ctx)
{
    if (tasks <= 0)
        return;
    if (tasks == 1 || pool_threads() < 2 || atomic_flag_test_and_set(&pool.busy)) {
        for (int t = 0; t < tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store(&pool.work, (uint64_t)tasks << 32);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_tasks(0);
    for (long spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < tasks; spins++) {
        if (spins < 100000)
            cpu_relax();
        else
            sched_yield();
    }
    atomic_flag_clear(&pool.busy);
}
