/* pool.h - the CPU engine's worker threads: a parallel for loop over tasks,
 * shared by the matrix products (gemm.c, and OpenBLAS's in bands) and the
 * cell kernels (backend_cpu.c).
 *
 * One process-wide pool of RRN_THREADS threads (default: the online CPUs,
 * at most 16), started on first use.  Between two calls its workers spin
 * for a moment before they sleep, because a recurrent step alternates a
 * product and a pointwise kernel every few microseconds and waking a
 * sleeping thread costs more than that.
 */
#ifndef RRN_POOL_H
#define RRN_POOL_H

/* Below this many flops (2 M N K) a matrix product runs on one thread:
 * waking the workers would cost more than they save. */
#define POOL_MIN_FLOPS 1.5e6

/* fn(ctx, task, worker) runs one task; worker (0 .. pool_threads()-1)
 * names the thread running it, the same for no two tasks of one pool_run
 * that run at once, so a caller can give each worker its own scratch. */
typedef void (*pool_fn)(void *ctx, int task, int worker);

/* Threads that take part in a pool_run, the caller included (at least 1). */
int pool_threads(void);

/* The pool's size: the most pool_threads() can be, and so the bound on
 * worker, for callers that size per-worker scratch once. */
int pool_size(void);

/* Runs fn for every task in [0, tasks) and returns when all are done.
 * When another caller holds the pool, or a single thread is allowed, every
 * task runs on the calling thread as worker 0, in order: callers must not
 * depend on which thread runs a task, only on each task's own result. */
void pool_run(int tasks, pool_fn fn, void *ctx);

/* For tests and benchmarks: at most n threads (the caller included,
 * clamped to the pool's size) take part in later calls; 0 restores the
 * pool's size.  Returns the pool's size.  Process-wide. */
int pool_set_threads(int n);

#endif
