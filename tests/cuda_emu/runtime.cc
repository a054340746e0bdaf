/* runtime.cc - the CUDA runtime emulated on the CPU: device and pinned
 * memory, streams that run their work late, stream capture and graphs,
 * and kernels run one fiber per CUDA thread.  What it checks, and why, is
 * in cuda_runtime.h.
 *
 * Queued work runs on the host thread that synchronizes a stream of its
 * family (run_until), one item at a time under device_mu; a block's
 * threads are fibers, run a warp at a time in a random order until they
 * finish or wait at a barrier (run_block).  Under AddressSanitizer the
 * switches are announced to it, so that it knows which stack is live.
 */
#include "cuda_runtime.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FIBER_START(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define FIBER_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#define FIBER_REUSE(top, size) __asan_unpoison_memory_region((char *)(top) - (size), size)
#define SPARE_POISON(p, size) __asan_poison_memory_region(p, size)
#define SPARE_UNPOISON(p, size) __asan_unpoison_memory_region(p, size)
#else
#define FIBER_START(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define FIBER_FINISH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define FIBER_REUSE(top, size) ((void)(top), (void)(size))
#define SPARE_POISON(p, size) ((void)(p), (void)(size))
#define SPARE_UNPOISON(p, size) ((void)(p), (void)(size))
#endif

__thread uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emu {

void fault(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cuda_emu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

/* ---- errors ----------------------------------------------------------- */

static thread_local cudaError_t last_error = cudaSuccess;

/* A failed call's error is also the thread's last error, as in CUDA. */
static cudaError_t fail(cudaError_t err)
{
    last_error = err;
    return err;
}

/* ---- memory ----------------------------------------------------------- */

struct allocation {
    size_t bytes;
    bool device; /* else pinned host memory */
};

static std::mutex mem_mu;
static std::map<uintptr_t, allocation> allocations;

/* The allocation holding all of [p, p + bytes), or NULL. */
static const allocation *allocation_of(const void *p, size_t bytes)
{
    uintptr_t a = (uintptr_t)p;
    std::lock_guard<std::mutex> lock(mem_mu);
    auto it = allocations.upper_bound(a);
    if (it == allocations.begin())
        return NULL;
    --it;
    if (a + bytes > it->first + it->second.bytes)
        return NULL;
    return &it->second;
}

int device_range(const void *p, size_t bytes)
{
    const allocation *a = allocation_of(p, bytes);
    return a && a->device;
}

static bool pinned_range(const void *p, size_t bytes)
{
    const allocation *a = allocation_of(p, bytes);
    return a && !a->device;
}

} /* namespace cuda_emu */

/* ---- streams ------------------------------------------------------------ */

/* An item of a stream's queue: work to run, or a wait until another stream
 * has run its first wait_seq items (cudaStreamWaitEvent). */
struct emu_item {
    std::function<void()> work;
    emu_stream *wait_on;
    uint64_t wait_seq;
};

/* A recorded graph: each node runs after the nodes it depends on. */
struct emu_node {
    std::function<void()> work;
    std::vector<size_t> deps;
};

struct emu_graph {
    std::vector<emu_node> nodes;
};

/* A capture in progress: the stream that began it, and the streams that
 * joined it by waiting on an event recorded in it. */
struct emu_capture {
    emu_graph *graph;
    bool invalid;
    pthread_t thread;
    emu_stream *origin;
    std::vector<emu_stream *> members;
};

struct emu_stream {
    std::deque<emu_item> queue;
    uint64_t queued = 0, done = 0; /* items ever queued, and run */
    /* Streams that ever waited for one another share a family.  Running a
     * family's work, the emulator picks its next item at random among the
     * heads of its streams' queues whose waits are met: the orders a GPU
     * may run them in, so that a wait the program forgot shows. */
    uint64_t family = 0;
    emu_capture *capture = NULL;
    std::vector<size_t> tail; /* capturing: what its next node depends on */
};

struct emu_event {
    bool recorded = false;
    emu_stream *stream = NULL;    /* recorded outside a capture: its first */
    uint64_t seq = 0;             /* seq items */
    emu_capture *capture = NULL;  /* recorded in a capture: the nodes the */
    std::vector<size_t> nodes;    /* stream had recorded */
    bool capture_ended = false;
};

namespace cuda_emu {

/* Guards every stream, event and capture, and is held while work runs:
 * the emulated device runs one thing at a time. */
static std::mutex device_mu;
static std::set<emu_stream *> streams;
static std::set<emu_event *> events;
static emu_stream legacy_stream;
static uint64_t families;
static uint64_t order_state = 0x9e3779b97f4a7c15ULL;

/* The capture this thread began, if any: while it lasts, the calls a
 * capture forbids fail and invalidate it. */
static thread_local emu_capture *capturing;

static unsigned next_random(uint64_t *state);

static emu_stream *stream_of(cudaStream_t s)
{
    if (!s)
        return &legacy_stream;
    return streams.count(s) ? s : NULL;
}

static std::vector<emu_stream *> all_streams(void)
{
    std::vector<emu_stream *> all(streams.begin(), streams.end());
    all.push_back(&legacy_stream);
    return all;
}

static cudaError_t forbidden_in_capture(void)
{
    std::lock_guard<std::mutex> lock(device_mu);
    capturing->invalid = true;
    return fail(cudaErrorStreamCaptureUnsupported);
}

/* Run items of s's family until s has run its first seq; device_mu held. */
static void run_until(emu_stream *s, uint64_t seq)
{
    std::vector<emu_stream *> family, ready;
    for (emu_stream *t : all_streams())
        if (t->family == s->family)
            family.push_back(t);
    while (s->done < seq) {
        ready.clear();
        for (emu_stream *t : family) {
            if (t->queue.empty())
                continue;
            const emu_item &head = t->queue.front();
            if (!head.wait_on || head.wait_on->done >= head.wait_seq)
                ready.push_back(t);
        }
        if (ready.empty())
            fault("a stream waits for work that was never queued");
        emu_stream *t = ready[next_random(&order_state) % ready.size()];
        emu_item item = std::move(t->queue.front());
        t->queue.pop_front();
        if (item.work)
            item.work();
        t->done++;
    }
}

/* What cudaFree and cudaFreeHost do first: wait for every stream. */
static void flush_all(void)
{
    std::lock_guard<std::mutex> lock(device_mu);
    for (emu_stream *s : all_streams())
        run_until(s, s->queued);
}

cudaError_t enqueue(cudaStream_t stream, std::function<void()> work)
{
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *s = stream_of(stream);
    if (!s)
        return fail(cudaErrorInvalidResourceHandle);
    if (s->capture) {
        if (s->capture->invalid)
            return fail(cudaErrorStreamCaptureInvalidated);
        std::vector<emu_node> &nodes = s->capture->graph->nodes;
        nodes.push_back(emu_node{std::move(work), s->tail});
        s->tail.assign(1, nodes.size() - 1);
    } else {
        s->queue.push_back(emu_item{std::move(work), NULL, 0});
        s->queued++;
    }
    return cudaSuccess;
}

/* ---- kernels: one fiber per CUDA thread ---------------------------------- */

/* A context switch: saves the callee-saved registers and the floating-point
 * control words on the current stack, stores its pointer in *save, and
 * resumes the stack at next.  ucontext's swapcontext would do it with a
 * system call (the signal mask) each time, and the kernels switch often. */
extern "C" void emu_switch(void **save, void *next);
__asm__(".text\n"
        ".globl emu_switch\n"
        ".hidden emu_switch\n"
        ".type emu_switch, @function\n"
        "emu_switch:\n"
        "    pushq %rbp\n"
        "    pushq %rbx\n"
        "    pushq %r12\n"
        "    pushq %r13\n"
        "    pushq %r14\n"
        "    pushq %r15\n"
        "    subq $8, %rsp\n"
        "    stmxcsr (%rsp)\n"
        "    fnstcw 4(%rsp)\n"
        "    movq %rsp, (%rdi)\n"
        "    movq %rsi, %rsp\n"
        "    ldmxcsr (%rsp)\n"
        "    fldcw 4(%rsp)\n"
        "    addq $8, %rsp\n"
        "    popq %r15\n"
        "    popq %r14\n"
        "    popq %r13\n"
        "    popq %r12\n"
        "    popq %rbx\n"
        "    popq %rbp\n"
        "    ret\n"
        ".size emu_switch, .-emu_switch\n");

#define FIBER_STACK (256 * 1024)
#define GUARD 4096
#define WARP 32

struct fiber {
    void *sp;    /* saved stack pointer while switched out */
    char *stack; /* FIBER_STACK bytes above a guard page */
    uint3 thread_idx;
    unsigned linear; /* x + y * bx + z * bx * by */
    bool done;
    void *asan_fake_stack;
};

/* Threads waiting for the others at a barrier: a block's __syncthreads,
 * or a warp's shuffle. */
struct barrier_state {
    unsigned count; /* arrivals that open it */
    std::vector<fiber *> waiting;
};

struct warp_state {
    unsigned lanes;
    barrier_state at;
    unsigned long long slot[WARP];
    /* Its lanes that can run, in no order. */
    std::vector<fiber *> runnable;
};

struct block_run {
    const std::function<void()> *body;
    void *scheduler_sp;
    unsigned n, exited;
    barrier_state at;
    /* Thread 0 finished without a barrier: the others run as plain calls. */
    bool direct;
    std::vector<warp_state> warps;
};

/* Fibers and their stacks are kept per host thread and reused. */
struct fiber_pool {
    std::vector<std::unique_ptr<fiber>> fibers;
    ~fiber_pool()
    {
        for (auto &f : fibers)
            munmap(f->stack - GUARD, FIBER_STACK + GUARD);
    }
    fiber *get(unsigned i)
    {
        while (fibers.size() <= i) {
            std::unique_ptr<fiber> f(new fiber());
            char *mem = (char *)mmap(NULL, FIBER_STACK + GUARD, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (mem == MAP_FAILED)
                fault("cannot map a fiber stack");
            /* The guard page turns a kernel's stack overflow into a fault. */
            mprotect(mem, GUARD, PROT_NONE);
            f->stack = mem + GUARD;
            fibers.push_back(std::move(f));
        }
        return fibers[i].get();
    }
};

static thread_local fiber_pool pool;
static thread_local block_run *run;
static thread_local fiber *self;
static thread_local const void *scheduler_stack;
static thread_local size_t scheduler_stack_size;

static void yield(void)
{
    fiber *f = self;
    FIBER_START(&f->asan_fake_stack, scheduler_stack, scheduler_stack_size);
    emu_switch(&f->sp, run->scheduler_sp);
    FIBER_FINISH(f->asan_fake_stack, &scheduler_stack, &scheduler_stack_size);
}

static void fiber_main(void)
{
    FIBER_FINISH(NULL, &scheduler_stack, &scheduler_stack_size);
    fiber *f = self;
    (*run->body)();
    block_run *b = run;
    warp_state &w = b->warps[f->linear / WARP];
    f->done = true;
    b->exited++;
    if (!b->at.waiting.empty())
        fault("thread (%u,%u,%u) of block (%u,%u,%u) returned while %zu threads of its block wait at "
              "__syncthreads: a barrier in code that not every thread runs",
              f->thread_idx.x, f->thread_idx.y, f->thread_idx.z, blockIdx.x, blockIdx.y, blockIdx.z,
              b->at.waiting.size());
    if (!w.at.waiting.empty())
        fault("thread %u of block %u returned while %zu lanes of its warp wait at a shuffle", f->linear, blockIdx.x,
              w.at.waiting.size());
    void *dead;
    FIBER_START(NULL, scheduler_stack, scheduler_stack_size);
    emu_switch(&dead, b->scheduler_sp);
    fault("a finished fiber was resumed");
}

/* A fresh stack whose first switch enters fiber_main: the frame emu_switch
 * pops (control words, six registers, then fiber_main as its return
 * address, 16-byte aligned as a call leaves it). */
static void fiber_start(fiber *f)
{
    uint64_t *top = (uint64_t *)(f->stack + FIBER_STACK);
    /* A finished fiber left fiber_main's frame on its stack, which never
     * returned: ASan still has that frame's redzones marked. */
    FIBER_REUSE(top, 16384);
    uint64_t *sp = top - 2; /* a zero return address above fiber_main's frame */
    sp[1] = 0;
    sp[0] = (uint64_t)(uintptr_t)fiber_main;
    sp -= 6;
    memset(sp, 0, 6 * sizeof *sp);
    sp -= 1;
    *sp = 0x1f80 | (uint64_t)0x037f << 32; /* MXCSR and x87 control word at reset */
    f->sp = sp;
    f->done = false;
}

static void switch_to(block_run &b, fiber *f)
{
    self = f;
    threadIdx = f->thread_idx;
    void *fake = NULL;
    FIBER_START(&fake, f->stack, FIBER_STACK);
    emu_switch(&b.scheduler_sp, f->sp);
    FIBER_FINISH(fake, NULL, NULL);
}

/* Wait until every thread of the barrier has come; the last one opens it
 * and runs on, the others become runnable. */
static void barrier(const char *what, barrier_state *at)
{
    block_run *b = run;
    if (!b)
        fault("%s outside a kernel", what);
    if (b->direct)
        fault("thread %u of block %u reached %s, which thread 0 of its block finished without", self->linear,
              blockIdx.x, what);
    if (b->exited)
        fault("thread %u of block %u reached %s after %u threads of its block returned", self->linear, blockIdx.x,
              what, b->exited);
    if (at->waiting.size() + 1 == at->count) {
        for (fiber *f : at->waiting)
            b->warps[f->linear / WARP].runnable.push_back(f);
        at->waiting.clear();
        return;
    }
    at->waiting.push_back(self);
    yield();
}

void syncthreads(void)
{
    barrier("__syncthreads", run ? &run->at : NULL);
}

unsigned long long shfl_down(unsigned mask, unsigned long long bits, unsigned delta, int width)
{
    if (!run || run->direct) {
        barrier("__shfl_down_sync", NULL);
        return 0;
    }
    fiber *f = self;
    warp_state &w = run->warps[f->linear / WARP];
    unsigned lane = f->linear % WARP;
    unsigned full = w.lanes == WARP ? 0xffffffffu : (1u << w.lanes) - 1;
    if (mask != full)
        fault("__shfl_down_sync with mask %#x in a warp whose lanes are %#x", mask, full);
    if (width <= 0 || width > WARP || (width & (width - 1)))
        fault("__shfl_down_sync with width %d", width);
    w.slot[lane] = bits;
    barrier("__shfl_down_sync", &w.at);
    unsigned src = lane + delta, end = (lane / width + 1) * width;
    unsigned long long out = src < end && src < w.lanes ? w.slot[src] : bits;
    /* Nobody writes a slot again before every lane has read. */
    barrier("__shfl_down_sync", &w.at);
    return out;
}

/* xorshift64*: the warp scheduler's state is seeded per launch (launch),
 * the stream scheduler's once, so that a run repeats. */
static thread_local uint64_t random_state;

static unsigned next_random(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned)((*state * 0x2545f4914f6cdd1dULL) >> 32);
}

/* cudaGridDependencySynchronize's calls in the launch running on this
 * host thread. */
static __thread unsigned long long grid_waits;

void grid_dependency_wait(void)
{
    grid_waits++;
}

static void run_block(const std::function<void()> &body, dim3 block_idx, dim3 block_dim, dim3 grid_dim)
{
    block_run b;
    b.body = &body;
    b.n = block_dim.x * block_dim.y * block_dim.z;
    b.exited = 0;
    b.at.count = b.n;
    b.direct = false;
    b.warps.assign((b.n + WARP - 1) / WARP, warp_state());
    for (unsigned w = 0; w < b.warps.size(); w++) {
        b.warps[w].lanes = w + 1 < b.warps.size() || b.n % WARP == 0 ? WARP : b.n % WARP;
        b.warps[w].at.count = b.warps[w].lanes;
    }
    std::vector<fiber *> fibers(b.n);
    for (unsigned i = 0; i < b.n; i++) {
        fiber *f = fibers[i] = pool.get(i);
        f->linear = i;
        f->thread_idx = uint3{i % block_dim.x, i / block_dim.x % block_dim.y, i / (block_dim.x * block_dim.y)};
    }
    block_run *outer = run;
    run = &b;
    blockIdx = uint3{block_idx.x, block_idx.y, block_idx.z};
    blockDim = uint3{block_dim.x, block_dim.y, block_dim.z};
    gridDim = uint3{grid_dim.x, grid_dim.y, grid_dim.z};

    fiber *first = fibers[0];
    fiber_start(first);
    switch_to(b, first);
    if (first->done) {
        b.direct = true;
        for (unsigned i = 1; i < b.n; i++) {
            self = fibers[i];
            threadIdx = self->thread_idx;
            body();
        }
    } else {
        /* Thread 0 waits at its first barrier; the others start. */
        for (unsigned i = 1; i < b.n; i++) {
            fiber_start(fibers[i]);
            b.warps[i / WARP].runnable.push_back(fibers[i]);
        }
        /* As a GPU schedules warps: a random warp runs as far as it can
         * (its lanes in a random order, each until it waits or returns),
         * then another.  So a read of shared memory that lacks the barrier
         * before it meets, in some block, the value before the write, or
         * the next one, written by a warp that ran ahead. */
        std::vector<unsigned> ready;
        for (;;) {
            ready.clear();
            for (unsigned w = 0; w < b.warps.size(); w++)
                if (!b.warps[w].runnable.empty())
                    ready.push_back(w);
            if (ready.empty())
                break;
            std::vector<fiber *> &lanes = b.warps[ready[next_random(&random_state) % ready.size()]].runnable;
            while (!lanes.empty()) {
                size_t pick = next_random(&random_state) % lanes.size();
                fiber *f = lanes[pick];
                lanes[pick] = lanes.back();
                lanes.pop_back();
                switch_to(b, f);
            }
        }
        if (b.exited != b.n)
            fault("block (%u,%u,%u): %u of its threads wait for each other at different barriers (a __syncthreads "
                  "or a shuffle that not every thread reaches)",
                  block_idx.x, block_idx.y, block_idx.z, b.n - b.exited);
    }
    run = outer;
}

cudaError_t launch(const cudaLaunchConfig_t *cfg, std::function<void()> body)
{
    if (!cfg)
        return fail(cudaErrorInvalidValue);
    dim3 g = cfg->gridDim, t = cfg->blockDim;
    unsigned long long threads = (unsigned long long)t.x * t.y * t.z;
    if (!g.x || !g.y || !g.z || g.x > 2147483647u || g.y > 65535 || g.z > 65535 || !threads || threads > 1024 ||
        t.x > 1024 || t.y > 1024 || t.z > 64)
        return fail(cudaErrorInvalidConfiguration);
    if (cfg->dynamicSmemBytes)
        fault("dynamic shared memory is not emulated");
    bool overlap = false;
    for (unsigned a = 0; a < cfg->numAttrs; a++) {
        if (cfg->attrs[a].id != cudaLaunchAttributeProgrammaticStreamSerialization)
            fault("launch attribute %d is not emulated", (int)cfg->attrs[a].id);
        overlap = cfg->attrs[a].val.programmaticStreamSerializationAllowed != 0;
    }
    static std::atomic<uint64_t> launches;
    uint64_t seed = 0x9e3779b97f4a7c15ULL * (launches.fetch_add(1) + 1);
    return enqueue(cfg->stream, [g, t, body, seed, overlap, threads]() {
        random_state = seed;
        grid_waits = 0;
        for (unsigned z = 0; z < g.z; z++)
            for (unsigned y = 0; y < g.y; y++)
                for (unsigned x = 0; x < g.x; x++)
                    run_block(body, dim3(x, y, z), t, g);
        const unsigned long long all = threads * g.x * g.y * g.z;
        if (overlap && grid_waits != all)
            fault("a kernel launched to overlap the one before it waited for it in %llu of its %llu threads, "
                  "not in each once (cudaGridDependencySynchronize)",
                  grid_waits, all);
    });
}

} /* namespace cuda_emu */

using namespace cuda_emu;

/* ---- the runtime API ------------------------------------------------------ */

const char *cudaGetErrorString(cudaError_t err)
{
    switch (err) {
    case cudaSuccess:
        return "no error";
    case cudaErrorInvalidValue:
        return "invalid argument";
    case cudaErrorMemoryAllocation:
        return "out of memory";
    case cudaErrorInvalidConfiguration:
        return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer:
        return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection:
        return "invalid copy direction for memcpy";
    case cudaErrorNoDevice:
        return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle:
        return "invalid resource handle";
    case cudaErrorStreamCaptureUnsupported:
        return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
        return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureMerge:
        return "operation would result in a merge of separate capture sequences";
    case cudaErrorStreamCaptureUnjoined:
        return "capture sequence contains a fork that was not joined to the primary stream";
    case cudaErrorStreamCaptureIsolation:
        return "dependency created on uncaptured work in another stream";
    case cudaErrorStreamCaptureWrongThread:
        return "attempt to terminate a thread-local capture sequence from another thread";
    }
    return "unrecognized error code";
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t err = last_error;
    last_error = cudaSuccess;
    return err;
}

/* One device, unless CUDA_VISIBLE_DEVICES hides it as it would a GPU. */
cudaError_t cudaGetDeviceCount(int *count)
{
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    *count = !visible || (visible[0] && strcmp(visible, "-1") != 0);
    return *count ? cudaSuccess : fail(cudaErrorNoDevice);
}

cudaError_t cudaGetDevice(int *device)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess)
        return cudaErrorNoDevice;
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device)
{
    if (!value || device != 0 || attr != cudaDevAttrComputeCapabilityMajor)
        return fail(cudaErrorInvalidValue);
    *value = 9;
    return cudaSuccess;
}

/* Freed blocks of SPARE_MIN bytes or more are kept for the next
 * allocation of the same size (up to SPARE_MAX bytes in all), poisoned
 * meanwhile, so that AddressSanitizer still reports a read of freed
 * memory.  Fresh pages cost far more than filling used ones: every engine
 * a test makes takes a cuBLAS workspace of 32 MiB a lane, and taking them
 * from the system was two thirds of the emulated fixtures' time. */
#define SPARE_MIN ((size_t)1 << 20)
#define SPARE_MAX ((size_t)1 << 30)
struct spare_blocks {
    std::multimap<size_t, void *> by_size;
    size_t bytes;
    ~spare_blocks()
    {
        for (auto &b : by_size) {
            SPARE_UNPOISON(b.second, b.first);
            free(b.second);
        }
    }
};
static spare_blocks spares;

/* A block of bytes: a spare one, or one from the allocator; NULL when
 * there is none. */
static void *take_block(size_t bytes)
{
    {
        std::lock_guard<std::mutex> lock(mem_mu);
        auto it = spares.by_size.find(bytes);
        if (it != spares.by_size.end()) {
            void *mem = it->second;
            spares.by_size.erase(it);
            spares.bytes -= bytes;
            SPARE_UNPOISON(mem, bytes);
            return mem;
        }
    }
    /* Aligned to 256 bytes, as cudaMalloc's memory is. */
    void *mem = NULL;
    return posix_memalign(&mem, 256, bytes ? bytes : 1) == 0 ? mem : NULL;
}

static void give_block(void *mem, size_t bytes)
{
    {
        std::lock_guard<std::mutex> lock(mem_mu);
        if (bytes >= SPARE_MIN && spares.bytes + bytes <= SPARE_MAX) {
            SPARE_POISON(mem, bytes);
            spares.by_size.emplace(bytes, mem);
            spares.bytes += bytes;
            return;
        }
    }
    free(mem);
}

static cudaError_t allocate(void **p, size_t bytes, bool device)
{
    *p = NULL;
    if (capturing)
        return forbidden_in_capture();
    void *mem = take_block(bytes);
    if (!mem)
        return fail(cudaErrorMemoryAllocation);
    /* A GPU's fresh memory holds whatever was there: here NaN floats and
     * -1 ints, so that reading it before writing shows. */
    memset(mem, 0xff, bytes);
    std::lock_guard<std::mutex> lock(mem_mu);
    allocations[(uintptr_t)mem] = allocation{bytes, device};
    *p = mem;
    return cudaSuccess;
}

static cudaError_t release(void *p, bool device)
{
    if (!p)
        return cudaSuccess;
    if (capturing)
        return forbidden_in_capture();
    flush_all();
    size_t bytes;
    {
        std::lock_guard<std::mutex> lock(mem_mu);
        auto it = allocations.find((uintptr_t)p);
        if (it == allocations.end() || it->second.device != device)
            return fail(device ? cudaErrorInvalidDevicePointer : cudaErrorInvalidValue);
        bytes = it->second.bytes;
        allocations.erase(it);
    }
    give_block(p, bytes);
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t bytes)
{
    return allocate(p, bytes, true);
}

cudaError_t cudaFree(void *p)
{
    return release(p, true);
}

cudaError_t cudaMallocHost(void **p, size_t bytes)
{
    return allocate(p, bytes, false);
}

cudaError_t cudaFreeHost(void *p)
{
    return release(p, false);
}

/* Copies between the device and pinned memory are queued and read their
 * source when they run.  Pageable memory is copied at once after what the
 * stream has queued, as CUDA stages it, and cannot be captured. */
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s)
{
    const void *host = NULL;
    if (kind == cudaMemcpyHostToDevice) {
        if (!device_range(dst, bytes) || device_range(src, 1))
            return fail(cudaErrorInvalidValue);
        host = src;
    } else if (kind == cudaMemcpyDeviceToHost) {
        if (!device_range(src, bytes) || device_range(dst, 1))
            return fail(cudaErrorInvalidValue);
        host = dst;
    } else if (kind == cudaMemcpyDeviceToDevice) {
        if (!device_range(src, bytes) || !device_range(dst, bytes))
            return fail(cudaErrorInvalidValue);
    } else {
        return fail(cudaErrorInvalidMemcpyDirection);
    }
    if (!host || pinned_range(host, bytes))
        return enqueue(s, [dst, src, bytes]() { memcpy(dst, src, bytes); });
    cudaError_t rc = cudaStreamSynchronize(s);
    if (rc == cudaSuccess)
        memcpy(dst, src, bytes);
    return rc;
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s)
{
    if (!device_range(dst, bytes))
        return fail(cudaErrorInvalidValue);
    return enqueue(s, [dst, value, bytes]() { memset(dst, value, bytes); });
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    (void)flags;
    emu_stream *st = new emu_stream();
    std::lock_guard<std::mutex> lock(device_mu);
    st->family = ++families;
    streams.insert(st);
    *s = st;
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *st = stream_of(s);
    if (!st || st == &legacy_stream)
        return fail(cudaErrorInvalidResourceHandle);
    /* Work already queued still runs; waits for it are then met. */
    run_until(st, st->queued);
    for (emu_stream *t : all_streams())
        for (emu_item &item : t->queue)
            if (item.wait_on == st)
                item.wait_on = NULL;
    for (emu_event *e : events)
        if (e->stream == st)
            e->stream = NULL;
    streams.erase(st);
    delete st;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    if (capturing)
        return forbidden_in_capture();
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *st = stream_of(s);
    if (!st)
        return fail(cudaErrorInvalidResourceHandle);
    if (st->capture)
        return fail(cudaErrorStreamCaptureUnsupported);
    run_until(st, st->queued);
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    (void)flags;
    emu_event *ev = new emu_event();
    std::lock_guard<std::mutex> lock(device_mu);
    events.insert(ev);
    *e = ev;
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    std::lock_guard<std::mutex> lock(device_mu);
    if (!events.erase(e))
        return fail(cudaErrorInvalidResourceHandle);
    delete e;
    return cudaSuccess;
}

/* The event stands for what s has queued so far: its first items, or in a
 * capture the nodes the next one would depend on. */
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *st = stream_of(s);
    if (!st || !events.count(e))
        return fail(cudaErrorInvalidResourceHandle);
    e->recorded = true;
    e->capture_ended = false;
    e->capture = st->capture;
    e->nodes = st->tail;
    e->stream = st->capture ? NULL : st;
    e->seq = st->queued;
    return cudaSuccess;
}

/* Joins two families, or a capture: a stream waiting on an event recorded
 * in a capture is captured too from then on, its next node depending on
 * the event's nodes. */
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags)
{
    (void)flags;
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *st = stream_of(s);
    if (!st || !events.count(e))
        return fail(cudaErrorInvalidResourceHandle);
    if (e->capture_ended || (st->capture && !e->capture)) {
        /* A capture's work may depend on nothing outside it but the order
         * of its own streams. */
        if (st->capture)
            st->capture->invalid = true;
        return fail(cudaErrorStreamCaptureIsolation);
    }
    if (!e->recorded)
        return cudaSuccess;
    if (e->capture) {
        if (!st->capture) {
            st->capture = e->capture;
            st->tail = e->nodes;
            e->capture->members.push_back(st);
        } else if (st->capture == e->capture) {
            for (size_t n : e->nodes)
                if (std::find(st->tail.begin(), st->tail.end(), n) == st->tail.end())
                    st->tail.push_back(n);
        } else {
            st->capture->invalid = true;
            return fail(cudaErrorStreamCaptureMerge);
        }
        return cudaSuccess;
    }
    if (!e->stream || e->stream == st)
        return cudaSuccess;
    st->queue.push_back(emu_item{std::function<void()>(), e->stream, e->seq});
    st->queued++;
    uint64_t from = e->stream->family;
    for (emu_stream *t : all_streams())
        if (t->family == from)
            t->family = st->family;
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode)
{
    (void)mode;
    if (capturing)
        return forbidden_in_capture();
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *st = stream_of(s);
    if (!s || !st)
        return fail(cudaErrorInvalidResourceHandle);
    if (st->capture)
        return fail(cudaErrorInvalidValue);
    emu_capture *c = new emu_capture();
    c->graph = new emu_graph();
    c->invalid = false;
    c->thread = pthread_self();
    c->origin = st;
    c->members.push_back(st);
    st->capture = c;
    st->tail.clear();
    capturing = c;
    return cudaSuccess;
}

/* The nodes deps and everything they depend on, marked in seen. */
static void mark_ancestors(const emu_graph *g, const std::vector<size_t> &deps, std::vector<bool> &seen)
{
    std::vector<size_t> todo(deps);
    while (!todo.empty()) {
        size_t n = todo.back();
        todo.pop_back();
        if (seen[n])
            continue;
        seen[n] = true;
        todo.insert(todo.end(), g->nodes[n].deps.begin(), g->nodes[n].deps.end());
    }
}

/* Ends the capture s began.  Every stream that joined it must have been
 * joined back: its last node must come before the end of s. */
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph)
{
    *graph = NULL;
    std::lock_guard<std::mutex> lock(device_mu);
    emu_stream *st = stream_of(s);
    if (!st)
        return fail(cudaErrorInvalidResourceHandle);
    emu_capture *c = st->capture;
    if (!c || c->origin != st)
        return fail(cudaErrorInvalidValue);
    if (!pthread_equal(c->thread, pthread_self()))
        return fail(cudaErrorStreamCaptureWrongThread);
    std::vector<bool> joined(c->graph->nodes.size(), false);
    mark_ancestors(c->graph, st->tail, joined);
    bool unjoined = false;
    for (emu_stream *m : c->members) {
        for (size_t n : m->tail)
            unjoined |= !joined[n];
        m->capture = NULL;
        m->tail.clear();
    }
    for (emu_event *e : events)
        if (e->capture == c) {
            e->capture = NULL;
            e->recorded = false;
            e->capture_ended = true;
        }
    capturing = NULL;
    emu_graph *g = c->graph;
    bool invalid = c->invalid;
    delete c;
    if (invalid || unjoined) {
        delete g;
        return fail(invalid ? cudaErrorStreamCaptureInvalidated : cudaErrorStreamCaptureUnjoined);
    }
    *graph = g;
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags)
{
    (void)flags;
    if (!graph)
        return fail(cudaErrorInvalidValue);
    *exec = new emu_graph(*graph);
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph)
{
    if (!graph)
        return fail(cudaErrorInvalidValue);
    delete graph;
    return cudaSuccess;
}

/* The recorded work runs again as it was recorded: the same pointers and
 * scalars, reading whatever the buffers hold when it runs, each node after
 * those it depends on and otherwise in a random order, as branches of a
 * graph run at once on a GPU. */
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s)
{
    if (!exec)
        return fail(cudaErrorInvalidValue);
    std::vector<emu_node> nodes = exec->nodes;
    static std::atomic<uint64_t> launches;
    uint64_t seed = 0x2545f4914f6cdd1dULL * (launches.fetch_add(1) + 1);
    return enqueue(s, [nodes, seed]() {
        uint64_t state = seed;
        std::vector<size_t> waiting(nodes.size()), ready;
        std::vector<std::vector<size_t>> after(nodes.size());
        for (size_t n = 0; n < nodes.size(); n++) {
            waiting[n] = nodes[n].deps.size();
            for (size_t d : nodes[n].deps)
                after[d].push_back(n);
            if (!waiting[n])
                ready.push_back(n);
        }
        while (!ready.empty()) {
            size_t pick = next_random(&state) % ready.size(), n = ready[pick];
            ready[pick] = ready.back();
            ready.pop_back();
            nodes[n].work();
            for (size_t m : after[n])
                if (!--waiting[m])
                    ready.push_back(m);
        }
    });
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec)
{
    return cudaGraphDestroy(exec);
}
