/* test_pool.c - the CPU engine's worker pool (engine/pool.c), on its own.
 *
 * Every product and cell kernel of the CPU backend goes through pool_run,
 * and the other tests see only their results, which a pool that ran
 * everything on the caller's thread, or ran a task twice that happens to
 * write the same bits, would give too.  So this checks the contract
 * itself: each task runs once and no other; a worker number is below
 * pool_threads() and never held by two running tasks (callers index
 * per-worker scratch with it); tasks do run on two threads at once, and
 * an idle pool sleeps rather than spins; a caller that finds the pool
 * taken runs its tasks itself, in order; the limit of pool_set_threads
 * holds; RRN_THREADS is read as pool.h says.
 * `make test-tsan` runs it under ThreadSanitizer too.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <dirent.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "pool.h"
#include "support/filter.h"
#include "support/proc.h"
#include "support/timing.h"

/* The size main() asks for; the pool's upper bound (pool.c's MAX_THREADS). */
#define THREADS 4
#define MAX_WORKERS 64

/* What the tasks of one pool_run saw. */
struct tally {
    atomic_int *runs;     /* per task, with room past the last */
    atomic_int busy[MAX_WORKERS];
    atomic_int bad_worker; /* a worker number out of range, or in use twice */
    int limit;             /* pool_threads() when the run began */
};

/* A task long enough (some microseconds) that the workers, not only the
 * caller, get to claim some. */
static void count_task(void *ctx, int task, int worker)
{
    struct tally *t = ctx;
    if (worker < 0 || worker >= t->limit || atomic_exchange(&t->busy[worker], 1)) {
        atomic_store(&t->bad_worker, 1);
        return;
    }
    atomic_fetch_add(&t->runs[task], 1);
    volatile unsigned x = (unsigned)task;
    for (int i = 0; i < 2000; i++)
        x = x * 1664525u + 1013904223u;
    atomic_store(&t->busy[worker], 0);
}

static void check_each_task_once(int tasks)
{
    enum { SLACK = 8 };
    struct tally t = {.limit = pool_threads()};
    t.runs = calloc((size_t)tasks + SLACK, sizeof *t.runs);
    assert_non_null(t.runs);
    pool_run(tasks, count_task, &t);
    if (atomic_load(&t.bad_worker))
        fail_msg("%d tasks on %d threads: a worker number out of range or used twice at once", tasks, t.limit);
    for (int i = 0; i < tasks + SLACK; i++) {
        int want = i < tasks ? 1 : 0;
        if (atomic_load(&t.runs[i]) != want)
            fail_msg("%d tasks on %d threads: task %d ran %d times", tasks, t.limit, i, atomic_load(&t.runs[i]));
    }
    free(t.runs);
}

static void test_each_task_runs_once(void **state)
{
    (void)state;
    static const int tasks[] = {0, 1, 2, 3, 17, 1000};
    static const int threads[] = {1, 2, 3, 0};
    for (size_t k = 0; k < sizeof threads / sizeof threads[0]; k++) {
        pool_set_threads(threads[k]);
        for (size_t i = 0; i < sizeof tasks / sizeof tasks[0]; i++)
            check_each_task_once(tasks[i]);
    }
    pool_set_threads(0);
    pool_run(-1, count_task, NULL); /* nothing to do, nothing touched */
}

/* Two tasks, each waiting (up to 10 s) for the other to start: they end
 * at once only when two threads run them together. */
struct meeting {
    atomic_int arrived;
    atomic_int waited_out;
    int worker[2];
};

static void meet_task(void *ctx, int task, int worker)
{
    struct meeting *m = ctx;
    m->worker[task] = worker;
    atomic_fetch_add(&m->arrived, 1);
    double until = now_s() + 10;
    while (atomic_load(&m->arrived) < 2) {
        if (now_s() > until) {
            atomic_store(&m->waited_out, 1);
            return;
        }
        sched_yield();
    }
}

static void test_tasks_run_on_two_threads(void **state)
{
    (void)state;
    static const int threads[] = {0, 2};
    for (size_t k = 0; k < sizeof threads / sizeof threads[0]; k++) {
        pool_set_threads(threads[k]);
        for (int round = 0; round < 20; round++) {
            struct meeting m = {0};
            pool_run(2, meet_task, &m);
            if (atomic_load(&m.waited_out))
                fail_msg("round %d: the two tasks did not run at once (%d threads)", round, pool_threads());
            assert_int_not_equal(m.worker[0], m.worker[1]);
        }
    }
    pool_set_threads(0);
}

/* The threads the process had before the pool started: main()'s and
 * those a library started before it (OpenBLAS's, one for each core but
 * one, which spin for a while after the process starts, pool or not). */
#define MAX_THREADS_BEFORE 1024
static long threads_before_pool[MAX_THREADS_BEFORE];
static int n_threads_before_pool;

static void note_threads_before_pool(void)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    for (struct dirent *e; (e = readdir(d)) && n_threads_before_pool < MAX_THREADS_BEFORE;)
        if (e->d_name[0] != '.')
            threads_before_pool[n_threads_before_pool++] = atol(e->d_name);
    closedir(d);
}

/* CPU seconds the pool's workers have used: every thread of the process
 * but those before the pool, from /proc/self/task/TID/stat (utime and
 * stime, fields 14 and 15, the 12th and 13th after the name's ')'). */
static double pool_cpu_s(void)
{
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    unsigned long long ticks = 0;
    for (struct dirent *e; (e = readdir(d));) {
        long tid = atol(e->d_name);
        int before = e->d_name[0] == '.';
        for (int i = 0; i < n_threads_before_pool; i++)
            before |= threads_before_pool[i] == tid;
        char path[64], line[512];
        snprintf(path, sizeof path, "/proc/self/task/%ld/stat", tid);
        FILE *f = before ? NULL : fopen(path, "r");
        if (!f)
            continue;
        const char *end = fgets(line, sizeof line, f) ? strrchr(line, ')') : NULL;
        unsigned long long user, sys;
        if (end && sscanf(end + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &user, &sys) == 2)
            ticks += user + sys;
        fclose(f);
    }
    closedir(d);
    return (double)ticks / (double)sysconf(_SC_CLK_TCK);
}

/* Between calls the workers spin for SPIN_NS (0.2 ms), then sleep: a
 * server with nothing to do must not keep cores busy.  Measured as the
 * CPU time the pool's workers take over 200 ms in which this thread
 * sleeps: nothing, give or take (the clock's ticks are of 10 ms), where 3
 * spinning workers would take most of it on each core they get. */
static void test_idle_pool_sleeps(void **state)
{
    (void)state;
    check_each_task_once(100);
    sleep_ms(20);
    double t0 = pool_cpu_s();
    sleep_ms(200);
    double used = pool_cpu_s() - t0;
    if (used > 0.05)
        fail_msg("an idle pool's workers took %.0f ms of CPU in 200 ms", used * 1e3);
}

/* A task that runs a pool_run of its own while its caller holds the pool:
 * the inner tasks run on the task's own thread, as worker 0, in order. */
struct nested {
    pthread_t thread[4];
    int order[16], worker[16], count[4];
    atomic_int bad;
};

struct inner {
    struct nested *n;
    int outer;
};

static void inner_task(void *ctx, int task, int worker)
{
    struct inner *in = ctx;
    struct nested *n = in->n;
    int k = in->outer * 4 + n->count[in->outer]++;
    n->order[k] = task;
    n->worker[k] = worker;
    if (!pthread_equal(pthread_self(), n->thread[in->outer]))
        atomic_store(&n->bad, 1);
}

static void outer_task(void *ctx, int task, int worker)
{
    (void)worker;
    struct nested *n = ctx;
    struct inner in = {n, task};
    n->thread[task] = pthread_self();
    pool_run(4, inner_task, &in);
}

/* The 4 inner tasks of outer ran, in order, as worker 0. */
static void check_ran_in_place(const struct nested *n, int outer)
{
    assert_int_equal(n->count[outer], 4);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(n->order[outer * 4 + i], i);
        assert_int_equal(n->worker[outer * 4 + i], 0);
    }
}

static void test_taken_pool_runs_tasks_in_place(void **state)
{
    (void)state;
    struct nested n = {0};
    pool_run(4, outer_task, &n);
    assert_int_equal(atomic_load(&n.bad), 0);
    for (int outer = 0; outer < 4; outer++)
        check_ran_in_place(&n, outer);
}

/* On one thread, the caller runs every task itself, in order. */
static void test_one_thread_runs_in_order(void **state)
{
    (void)state;
    struct nested n = {0};
    struct inner in = {&n, 0};
    n.thread[0] = pthread_self();
    pool_set_threads(1);
    pool_run(4, inner_task, &in);
    pool_set_threads(0);
    assert_int_equal(atomic_load(&n.bad), 0);
    check_ran_in_place(&n, 0);
}

static void test_set_threads_clamps(void **state)
{
    (void)state;
    static const struct {
        int ask, get;
    } cases[] = {{1, 1}, {2, 2}, {THREADS, THREADS}, {THREADS + 1, THREADS}, {999, THREADS}, {0, THREADS},
                 {-1, THREADS}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(pool_set_threads(cases[i].ask), THREADS);
        if (pool_threads() != cases[i].get)
            fail_msg("pool_set_threads(%d): %d threads, want %d", cases[i].ask, pool_threads(), cases[i].get);
        assert_int_equal(pool_size(), THREADS);
    }
    pool_set_threads(0);
}

/* The pool's size in a new process of this binary with RRN_THREADS set to
 * value (unset when NULL), as main() prints it for --pool-size. */
static int size_with(const char *value)
{
    char self[PATH_MAX], *out = NULL;
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    assert_true(len > 0);
    self[len] = 0;
    int rc = value ? proc_run(&out, "env RRN_THREADS='%s' '%s' --pool-size", value, self)
                   : proc_run(&out, "env -u RRN_THREADS '%s' --pool-size", self);
    if (rc != 0)
        fail_msg("RRN_THREADS=%s: exit %d: %s", value ? value : "(unset)", rc, out);
    int size = atoi(out);
    free(out);
    return size;
}

static void test_rrn_threads(void **state)
{
    (void)state;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int dflt = cpus > 16 ? 16 : cpus < 1 ? 1 : (int)cpus;
    static const struct {
        const char *value;
        int size; /* 0: the default */
    } cases[] = {{NULL, 0}, {"", 0}, {"1", 1}, {"3", 3}, {"64", 64}, {"65", 64}, {"1000", 64},
                 {"0", 0},  {"-2", 0}, {"abc", 0}, {"3x", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int want = cases[i].size ? cases[i].size : dflt, got = size_with(cases[i].value);
        if (got != want)
            fail_msg("RRN_THREADS=%s: a pool of %d, want %d", cases[i].value ? cases[i].value : "(unset)", got,
                     want);
    }
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--pool-size") == 0) {
        printf("%d\n", pool_size());
        return 0;
    }
    /* The same pool on any machine, with more threads than it may have
     * cores, so that workers past a limit exist to be left out. */
    setenv("RRN_THREADS", "4", 1);
    note_threads_before_pool();
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_task_runs_once),
        cmocka_unit_test(test_tasks_run_on_two_threads),
        cmocka_unit_test(test_idle_pool_sleeps),
        cmocka_unit_test(test_taken_pool_runs_tasks_in_place),
        cmocka_unit_test(test_one_thread_runs_in_order),
        cmocka_unit_test(test_set_threads_clamps),
        cmocka_unit_test(test_rrn_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
