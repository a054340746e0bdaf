/* backend_cuda.cuh - what the CUDA backend's files share: its state (the
 * lanes, the precision), how they queue kernels and record errors, the
 * block reductions, and the device code of a cell's step, which the
 * products' path (backend_cuda.cu) and the fused recurrence (cuda_fused.cu)
 * both run.
 *
 * The backend is three files: backend_cuda.cu (memory, products, the
 * forward's pointwise kernels, precision, graphs, lanes; the ops table),
 * cuda_fused.cu (a step's recurrent product fused with its cell) and
 * cuda_train.cu (the backward's kernels and the optimizer).  Every kernel
 * has a CPU twin in backend_cpu.c that computes the same thing the same
 * way; read them side by side.
 */
#ifndef RRN_BACKEND_CUDA_CUH
#define RRN_BACKEND_CUDA_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
}
#include "cell_grad.h"

/* A stream, the event other lanes wait on, and a cuBLAS handle of its own
 * with a workspace of its own: one workspace must not serve two streams at
 * once. */
struct cuda_lane {
    cudaStream_t stream;
    cudaEvent_t queued;
    cublasHandle_t blas;
    void *workspace;
    /* In BF16 precision, the other operand of a product by weights,
     * rounded to BF16 (gemm_packed); grow-only. */
    __nv_bfloat16 *bf16;
    size_t bf16_cap; /* values */
};

/* cuBLAS's advice for a workspace of one's own: 32 MiB on Hopper, 4 MiB
 * before it; one size serves both.  Without one, a product recorded into
 * a graph may take its workspace from cudaMallocAsync, putting memory
 * nodes into the graph: memory that is not the engine's to count. */
#define CUBLAS_WORKSPACE_BYTES ((size_t)32 << 20)

/* A wavefront of up to 8 layers takes two lanes a layer, one for its steps
 * and one for its projections, and with dynamic attention, up to 5 layers,
 * a third for its queries' product; lanes are made when first used. */
#define CUDA_LANES 16

struct cuda_impl {
    /* Lane 0 is made with the backend, the others when first used. */
    struct cuda_lane lanes[CUDA_LANES];
    int lane; /* where work is queued now */
    /* How cuBLAS computes the products (set_precision). */
    enum precision precision;
    cublasComputeType_t compute;
    /* BF16 scratches that a lane outgrew: graphs recorded before may still
     * read them, so they stay until the backend goes.  Each is at most
     * half the next, so a few hold any growth. */
    __nv_bfloat16 *outgrown[32];
    int n_outgrown;
    /* Grow-only device scratch for operations that need some (the
     * backward's per-row attention gradients). */
    float *scratch;
    size_t scratch_cap; /* floats */
    /* Whether the fused steps of a forward may overlap each other
     * (inputs_ready): the device has programmatic dependent launch, and
     * the build did not turn it off (FUSED_OVERLAP). */
    bool overlap;
};

/* 0 builds the fused steps without overlapping launches, for
 * tools/gpu-run.sh bench to time what they buy. */
#ifndef FUSED_OVERLAP
#define FUSED_OVERLAP 1
#endif

static inline struct cuda_impl *impl_of(struct backend *be)
{
    return (struct cuda_impl *)be->impl;
}

static inline cudaStream_t stream_of(struct backend *be)
{
    struct cuda_impl *c = impl_of(be);
    return c->lanes[c->lane].stream;
}

/* Record the first error; sync reports it.  The runtime also keeps a
 * failed call's error for the thread until cudaGetLastError reads it, and
 * sync reads it to catch failed launches: it is read here, so that an error
 * already recorded (and cleared from be->err by the next engine call) does
 * not fail that next call too.  A fault that leaves the device unusable
 * comes back by itself. */
static inline int check(struct backend *be, cudaError_t rc, const char *what)
{
    if (rc == cudaSuccess)
        return 0;
    (void)cudaGetLastError();
    if (!be->err[0])
        snprintf(be->err, sizeof be->err, "%s: %s", what, cudaGetErrorString(rc));
    return -1;
}


/* Queue kernel on the backend's stream, grid blocks of threads threads;
 * with overlap, allowed to start before the kernel before it in the
 * stream ends (programmatic dependent launch): only for kernels that call
 * inputs_ready before they read or write what that one may have.
 * cudaLaunchKernelEx rather than <<< >>>: a launch that cannot start
 * fails the call that made it, and the kernels also run under the CPU
 * emulator of tests/cuda_emu, which a C++ compiler builds. */
template <typename... Params, typename... Args>
static void launch_on(struct backend *be, bool overlap, void (*kernel)(Params...), int grid, int threads,
                      Args... args)
{
    cudaLaunchAttribute attr = {};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)grid);
    cfg.blockDim = dim3((unsigned)threads);
    cfg.stream = stream_of(be);
    cfg.attrs = &attr;
    cfg.numAttrs = overlap ? 1 : 0;
    check(be, cudaLaunchKernelEx(&cfg, kernel, args...), "kernel launch");
}

template <typename... Params, typename... Args>
static void launch(struct backend *be, void (*kernel)(Params...), int grid, int threads, Args... args)
{
    launch_on(be, false, kernel, grid, threads, args...);
}

static inline int blocks_for(long n, int threads)
{
    long b = (n + threads - 1) / threads;
    return (int)(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

inline __device__ float sigmoid_dev(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

/* op over v of every thread of the block; every thread gets the result.
 * Warps first, then the warps' results in order. */
template <typename T, typename Op> __device__ T block_reduce(T v, T *shared, Op op)
{
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    T total = shared[0];
    for (int w = 1; w < (int)(blockDim.x + 31) / 32; w++)
        total = op(total, shared[w]);
    return total;
}

struct add_op {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct max_op {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/* Sums in float for the cell kernels, in double where the CPU twin sums in
 * double. */
template <typename T> __device__ T block_sum(T v, T *shared)
{
    return block_reduce(v, shared, add_op());
}

inline __device__ float block_max(float v, float *shared)
{
    return block_reduce(v, shared, max_op());
}

#define CELL_THREADS 256

/* cell_gates of config.c, for device code. */
static inline __host__ __device__ int gates_of(enum cell cell)
{
    return cell == CELL_LSTM ? 4 : cell == CELL_GRU ? 3 : 1;
}

/* Where row i of a cell_step keeps its state, and its step. */
struct cell_row {
    int t;           /* 1-based step */
    float *ring;     /* the slot's history of h */
    float *c;        /* the slot's cell state (LSTM), or NULL */
    const float *xg; /* the row's input projection, G*H floats */
    float *out;
    float *cache;    /* training: the row's CELL_CACHE floats, or NULL */
};

inline __device__ cell_row cell_row_of(const cell_step &s, int i)
{
    const int slot = s.slot ? s.slot[i] : i;
    cell_row r;
    r.t = s.t ? s.t[i] : s.t0;
    r.ring = s.ring + (long)slot * s.R * s.H;
    r.c = s.c ? s.c + (long)slot * s.H : (float *)0;
    r.xg = s.xg + (long)i * gates_of(s.cell) * s.H;
    r.out = s.out + (long)i * s.H;
    r.cache = s.cache ? s.cache + (long)i * CELL_CACHE(s.cell, s.H) : (float *)0;
    return r;
}

/* The row's h_{t-lag}, or NULL before its first step. */
inline __device__ const float *cell_hist(const cell_step &s, const cell_row &r, int lag)
{
    return r.t - lag >= 1 ? r.ring + (long)((r.t - lag) % s.R) * s.H : (const float *)0;
}

/* One thread: a window's K scores in a become their softmax, copied to
 * out (K floats) unless it is NULL. */
inline __device__ void softmax_window(float *a, int K, float *out)
{
    float mx = a[0], sum = 0.0f;
    for (int j = 1; j < K; j++)
        mx = fmaxf(mx, a[j]);
    for (int j = 0; j < K; j++) {
        a[j] = expf(a[j] - mx);
        sum += a[j];
    }
    for (int j = 0; j < K; j++) {
        a[j] /= sum;
        if (out)
            out[j] = a[j];
    }
}

/* Every thread of the block, once the window's K scores are in a (shared
 * memory): they become their softmax, by one thread. */
inline __device__ void window_weights(float *a, int K, float *out)
{
    __syncthreads();
    if (threadIdx.x == 0)
        softmax_window(a, K, out);
    __syncthreads();
}

/* Unit k of a row: the cell of MODELS.md from its gates' input projections
 * (r.xg) and recurrent products hv[g] (b_hh not included), the attention
 * term with weights a (NULL: none) and the temporal skip.  It writes h to
 * the output and the ring, the LSTM's c to the slot, and what the
 * backward needs to the cache; it reads only element k of every state,
 * so the units of a row need no barrier between them. */
inline __device__ void cell_unit(const cell_step &s, const cell_row &r, int k, const float *hv, const float *a)
{
    const int H = s.H, t = r.t;
    const float *xg = r.xg, *b = s.b_hh;
    float h;
    switch (s.cell) {
    case CELL_RNN_TANH:
        h = tanhf(xg[k] + hv[0] + b[k]);
        if (r.cache)
            r.cache[k] = h;
        break;
    case CELL_RNN_RELU:
        h = fmaxf(0.0f, xg[k] + hv[0] + b[k]);
        if (r.cache)
            r.cache[k] = h;
        break;
    case CELL_GRU: {
        const float *hp = cell_hist(s, r, 1);
        float rg = sigmoid_dev(xg[k] + hv[0] + b[k]);
        float z = sigmoid_dev(xg[H + k] + hv[1] + b[H + k]);
        float hn = hv[2] + b[2 * H + k];
        float nn = tanhf(xg[2 * H + k] + rg * hn);
        h = (1.0f - z) * nn + z * (hp ? hp[k] : 0.0f);
        if (r.cache)
            gru_cache_element(H, k, r.cache, rg, z, nn, hn);
        break;
    }
    default: {
        float ig = sigmoid_dev(xg[k] + hv[0] + b[k]);
        float fg = sigmoid_dev(xg[H + k] + hv[1] + b[H + k]);
        float gg = tanhf(xg[2 * H + k] + hv[2] + b[2 * H + k]);
        float cn = fg * r.c[k] + ig * gg;
        if (a) {
            /* The window's states that exist, h_{t-2} back to h_{t-1-K}
             * (cell_hist's), whose places in the ring run down from
             * (t - 2) mod R: counted down rather than each found by a
             * division, and without a branch a state, so that the loads
             * of several can be in flight at once. */
            const int have = t - 2 < s.attn_window ? t - 2 : s.attn_window;
            int place = have > 0 ? (t - 2) % s.R : 0;
            for (int j = 0; j < have; j++) {
                cn += a[j] * r.ring[(long)place * H + k];
                place = place > 0 ? place - 1 : s.R - 1;
            }
        }
        float po = xg[3 * H + k] + hv[3] + b[3 * H + k];
        if (s.peephole)
            po += s.peephole[k] * cn;
        float og = sigmoid_dev(po);
        r.c[k] = cn;
        h = og * tanhf(cn);
        if (r.cache)
            lstm_cache_element(H, k, r.cache, ig, fg, gg, og, cn);
        break;
    }
    }
    const float *skip = s.skip_period > 1 && t % s.skip_period == 0 ? cell_hist(s, r, s.skip_period)
                                                                     : (const float *)0;
    if (skip)
        h += skip[k];
    r.out[k] = h;
    r.ring[(long)(t % s.R) * H + k] = h;
}

/* Whether the cell adds an attention term. */
static inline __host__ __device__ int attends(const cell_step &s)
{
    return s.cell == CELL_LSTM && s.attn_window > 0;
}

/* exp in the precision of its argument, named so that a float never
 * widens to double by overload resolution. */
inline __device__ float exp_of(float x)
{
    return expf(x);
}

inline __device__ double exp_of(double x)
{
    return exp(x);
}

/* A row's maximum and sum of exp(x - max), for every thread of the block:
 * what the softmax kernels start from.  T is the sum's type: float, or
 * double where the CPU twin sums in double. */
template <typename T> __device__ void row_max_sumexp(const float *row, int width, float *shared, T *shared_t,
                                                     float *mx, T *sum)
{
    float m = -INFINITY;
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        m = fmaxf(m, row[k]);
    m = block_max(m, shared);
    T part = 0;
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        part += exp_of((T)(row[k] - m));
    *sum = block_sum(part, shared_t);
    *mx = m;
}

/* The ops of the other files, for backend_cuda.cu's table. */
void cuda_zero(struct backend *be, void *dst, size_t bytes);
int cuda_recurrent_step(struct backend *be, const struct cell_step *s, const float *hprev, const float *w,
                        const float *w_q);
void cuda_cell_step_backward(struct backend *be, const struct cell_grad *g);
void cuda_add_column_sums(struct backend *be, float *dst, const float *src, int n, int width);
void cuda_scatter_add_rows(struct backend *be, float *dst, int ldd, const float *src, int lds, const int *idx,
                           int n, int width);
void cuda_pool_mean_backward(struct backend *be, float *dst, const float *src, int width, const int *off,
                             const int *len, int n);
void cuda_dropout(struct backend *be, float *y, const float *x, size_t n, float p, unsigned long long seed);
void cuda_softmax_xent(struct backend *be, const float *x, int n, int width, const int *target, float *loss,
                       float *dx, float scale);
void cuda_squared_error(struct backend *be, const float *x, const float *y, int n, int width, float *loss,
                        float *dx, float scale);
void cuda_optim_step(struct backend *be, const struct optim_update *u, float *params, const float *grad,
                     float *state, size_t n, double *sum_squares);

#endif
