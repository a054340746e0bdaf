/* cupti_trace.c - a CUPTI injection library: what a program copied between
 * host and device, and how much of its GPU work ran at once.
 *
 *   CUDA_INJECTION64_PATH=build/cuda/tools/libcupti_trace.so PROGRAM ARGS...
 *
 * The CUDA driver loads it into any program as CUDA starts (no rebuild of
 * the program) and calls InitializeInjection; CUPTI's activity API then
 * hands it a record of every copy and kernel, which is what Nsight Systems
 * is built on.  Nsight Systems itself makes no report on the `device`
 * tool's machines, hence this.  At exit it prints to stderr:
 *
 *   - every distinct copy (direction and size) and how many times it ran,
 *     and how many of those ran inside a CUDA graph.  Copies that repeat
 *     once a step can then be named: they must be index arrays and
 *     results, and no copy the size of a weight matrix may repeat;
 *   - per CUDA graph (a recorded forward or step shape), and for kernels
 *     launched outside graphs: kernels, streams, the kernels' summed time
 *     and the time the GPU was busy with at least one of them.  Summed
 *     over busy above 1 means kernels of different streams ran at once:
 *     the forward's wavefront of layers, or two directions.  Then the
 *     idle time between its kernels within a replay, and the kernels that
 *     took most of its time, with their count and mean time.
 */
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int InitializeInjection(void);

#define BUFFER_BYTES ((size_t)8 << 20)

struct copy_count {
    uint8_t kind;  /* CUpti_ActivityMemcpyKind */
    uint64_t bytes;
    uint64_t count, in_graphs;
};

struct kernel_span {
    uint32_t graph, stream;
    uint64_t start, end;
    const char *name; /* CUPTI's, shared by every record of one kernel */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct copy_count *copies;
static size_t n_copies, cap_copies;
static struct kernel_span *kernels;
static size_t n_kernels, cap_kernels;
static int out_of_memory;

/* Grow *items (cap elements of size) to hold one more; 0, or -1. */
static int reserve(void **items, size_t *cap, size_t n, size_t size)
{
    if (n < *cap)
        return 0;
    size_t want = *cap ? 2 * *cap : 1024;
    void *p = realloc(*items, want * size);
    if (!p) {
        out_of_memory = 1;
        return -1;
    }
    *items = p;
    *cap = want;
    return 0;
}

static void note_copy(uint8_t kind, uint64_t bytes, int in_graph)
{
    for (size_t i = 0; i < n_copies; i++)
        if (copies[i].kind == kind && copies[i].bytes == bytes) {
            copies[i].count++;
            copies[i].in_graphs += in_graph != 0;
            return;
        }
    if (reserve((void **)&copies, &cap_copies, n_copies, sizeof *copies) == 0)
        copies[n_copies++] = (struct copy_count){kind, bytes, 1, in_graph != 0};
}

static void note_kernel(uint32_t graph, uint32_t stream, uint64_t start, uint64_t end, const char *name)
{
    if (reserve((void **)&kernels, &cap_kernels, n_kernels, sizeof *kernels) == 0)
        kernels[n_kernels++] = (struct kernel_span){graph, stream, start, end, name ? name : "?"};
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records)
{
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid)
{
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity *rec = NULL;
    pthread_mutex_lock(&mu);
    while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)rec;
            note_copy(m->copyKind, m->bytes, m->graphId != 0);
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)rec;
            note_kernel(k->graphId, k->streamId, k->start, k->end, k->name);
        }
    }
    pthread_mutex_unlock(&mu);
    free(buffer);
}

static const char *copy_kind_name(uint8_t kind)
{
    switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD:
        return "host to device";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH:
        return "device to host";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD:
        return "device to device";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOH:
        return "host to host";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP:
        return "peer to peer";
    }
    return "other";
}

static int by_graph_then_start(const void *a, const void *b)
{
    const struct kernel_span *x = a, *y = b;
    if (x->graph != y->graph)
        return x->graph < y->graph ? -1 : 1;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* Idle time between two kernels shorter than this is counted as a gap
 * inside one replay (launch latency, a wait between streams); a longer one
 * is the host's time between replays. */
#define GAP_NS 20000

struct kernel_name {
    const char *name;
    size_t count;
    uint64_t summed;
};

static int by_summed(const void *a, const void *b)
{
    const struct kernel_name *x = a, *y = b;
    return x->summed < y->summed ? 1 : x->summed > y->summed ? -1 : 0;
}

/* The n kernels of one graph (or of none), sorted by start: the line
 * above, then the kernels that took most of its time, each with how often
 * it ran and its mean time, so a slow step can be pinned on its kernel. */
static void report_graph(const struct kernel_span *k, size_t n)
{
    uint32_t streams[32];
    struct kernel_name names[64];
    size_t n_streams = 0, n_names = 0;
    uint64_t summed = 0, busy = 0, busy_end = 0, gaps = 0;
    for (size_t i = 0; i < n; i++) {
        summed += k[i].end - k[i].start;
        /* The union of the intervals, swept in order of start. */
        if (k[i].end > busy_end) {
            if (busy_end && k[i].start > busy_end && k[i].start - busy_end < GAP_NS)
                gaps += k[i].start - busy_end;
            busy += k[i].end - (k[i].start > busy_end ? k[i].start : busy_end);
            busy_end = k[i].end;
        }
        size_t s = 0;
        while (s < n_streams && streams[s] != k[i].stream)
            s++;
        if (s == n_streams && n_streams < sizeof streams / sizeof streams[0])
            streams[n_streams++] = k[i].stream;
        size_t m = 0;
        while (m < n_names && strcmp(names[m].name, k[i].name) != 0)
            m++;
        if (m == n_names && n_names < sizeof names / sizeof names[0])
            names[n_names++] = (struct kernel_name){k[i].name, 0, 0};
        if (m < n_names) {
            names[m].count++;
            names[m].summed += k[i].end - k[i].start;
        }
    }
    char name[32];
    if (k[0].graph)
        snprintf(name, sizeof name, "graph %u", k[0].graph);
    else
        snprintf(name, sizeof name, "outside graphs");
    fprintf(stderr,
            "cupti_trace: %-14s %9zu kernels on %zu stream(s): %.3f ms of kernels in %.3f ms busy (%.2fx), "
            "%.3f ms idle in gaps under %d us\n",
            name, n, n_streams, (double)summed / 1e6, (double)busy / 1e6, busy ? (double)summed / (double)busy : 0.0,
            (double)gaps / 1e6, GAP_NS / 1000);
    qsort(names, n_names, sizeof names[0], by_summed);
    for (size_t m = 0; m < n_names && m < 6; m++)
        fprintf(stderr, "cupti_trace:     %8zu x %8.2f us  %s\n", names[m].count,
                (double)names[m].summed / (double)names[m].count / 1e3, names[m].name);
}

static void report(void)
{
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&mu);
    fprintf(stderr, "cupti_trace: copies (direction, bytes: times run, of which in graphs)\n");
    for (size_t i = 0; i < n_copies; i++)
        fprintf(stderr, "cupti_trace:   %-16s %12llu B: %8llu, %llu\n", copy_kind_name(copies[i].kind),
                (unsigned long long)copies[i].bytes, (unsigned long long)copies[i].count,
                (unsigned long long)copies[i].in_graphs);
    qsort(kernels, n_kernels, sizeof *kernels, by_graph_then_start);
    for (size_t i = 0; i < n_kernels;) {
        size_t j = i;
        while (j < n_kernels && kernels[j].graph == kernels[i].graph)
            j++;
        report_graph(kernels + i, j - i);
        i = j;
    }
    if (out_of_memory)
        fprintf(stderr, "cupti_trace: out of memory: some records were dropped\n");
    pthread_mutex_unlock(&mu);
}

int InitializeInjection(void)
{
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "cupti_trace: CUPTI refused to trace this program\n");
        return 0;
    }
    atexit(report);
    return 1;
}
