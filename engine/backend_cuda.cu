/* backend_cuda.cu - the CUDA backend: cuBLAS for matrix products, one
 * kernel for each pointwise operation of backend.h, and a step's recurrent
 * product fused with its cell (recurrent_step_kernel).
 *
 * Every kernel here has a CPU twin in backend_cpu.c that computes the same
 * thing the same way; read them side by side.  All work is queued on the
 * backend's streams (one backend per batcher thread): lane 0, and the
 * lanes a forward runs layers or directions on at once (lane_use), so
 * nothing blocks until a download or sync.  Index arrays reach the device
 * through the engine's scratch buffers, uploaded once per call, never per
 * step.
 */
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
 * and one for its projections; lanes are made when first used. */
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
     * the build did not turn it off. */
    bool overlap;
};

static struct cuda_impl *impl_of(struct backend *be)
{
    return (struct cuda_impl *)be->impl;
}

static cudaStream_t stream_of(struct backend *be)
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
static int check(struct backend *be, cudaError_t rc, const char *what)
{
    if (rc == cudaSuccess)
        return 0;
    (void)cudaGetLastError();
    if (!be->err[0])
        snprintf(be->err, sizeof be->err, "%s: %s", what, cudaGetErrorString(rc));
    return -1;
}

static void cuda_destroy(struct backend *be)
{
    struct cuda_impl *c = impl_of(be);
    if (c) {
        for (int k = 0; k < CUDA_LANES; k++) {
            struct cuda_lane *l = &c->lanes[k];
            if (l->blas)
                cublasDestroy(l->blas);
            if (l->workspace)
                cudaFree(l->workspace);
            if (l->bf16)
                cudaFree(l->bf16);
            if (l->queued)
                cudaEventDestroy(l->queued);
            if (l->stream)
                cudaStreamDestroy(l->stream);
        }
        if (c->scratch)
            cudaFree(c->scratch);
        for (int k = 0; k < c->n_outgrown; k++)
            cudaFree(c->outgrown[k]);
        free(c);
    }
    free(be);
}

static void *cuda_alloc(struct backend *be, size_t bytes)
{
    void *p = NULL;
    if (check(be, cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc") != 0)
        return NULL;
    return p;
}

static void cuda_free(struct backend *be, void *p)
{
    if (p)
        check(be, cudaFree(p), "cudaFree");
}

static void *cuda_host_alloc(struct backend *be, size_t bytes)
{
    void *p = NULL;
    if (check(be, cudaMallocHost(&p, bytes ? bytes : 1), "cudaMallocHost") != 0)
        return NULL;
    return p;
}

static void cuda_host_free(struct backend *be, void *p)
{
    if (p)
        check(be, cudaFreeHost(p), "cudaFreeHost");
}

static int cuda_upload(struct backend *be, void *dst, const void *src, size_t bytes)
{
    be->bytes_up += bytes;
    be->copies_up++;
    if (!bytes)
        return 0;
    return check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(be)), "upload");
}

static int cuda_download(struct backend *be, void *dst, const void *src, size_t bytes)
{
    be->bytes_down += bytes;
    be->copies_down++;
    if (!bytes)
        return 0;
    if (check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_of(be)), "download") != 0)
        return -1;
    /* The caller reads dst as soon as this returns, so a launch that failed
     * before it (which the stream never ran) must fail it too. */
    if (check(be, cudaStreamSynchronize(stream_of(be)), "download") != 0)
        return -1;
    return check(be, cudaGetLastError(), "kernel");
}

static void cuda_zero(struct backend *be, void *dst, size_t bytes)
{
    if (bytes)
        check(be, cudaMemsetAsync(dst, 0, bytes, stream_of(be)), "memset");
}

/* Row-major C = alpha op(A) op(B) + beta C, A and B of one type (FP32, or
 * BF16 in cuda_gemm_packed), C in FP32.  Row-major is column-major C^T =
 * op(B)^T op(A)^T, so the operands swap places and keep their transpose
 * flags. */
static void gemm_ex(struct backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha, const void *A,
                    int lda, const void *B, int ldb, cudaDataType_t type, float beta, float *C, int ldc,
                    cublasComputeType_t compute)
{
    if (M <= 0 || N <= 0)
        return;
    struct cuda_impl *c = impl_of(be);
    cublasStatus_t st = cublasGemmEx(c->lanes[c->lane].blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                     trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, type, ldb, A, type, lda,
                                     &beta, C, CUDA_R_32F, ldc, compute, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS && !be->err[0])
        snprintf(be->err, sizeof be->err, "cublasGemmEx failed with status %d", (int)st);
}

static void cuda_gemm(struct backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc)
{
    gemm_ex(be, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, CUDA_R_32F, beta, C, ldc, impl_of(be)->compute);
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

static int blocks_for(long n, int threads)
{
    long b = (n + threads - 1) / threads;
    return (int)(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

__global__ void gather_rows_kernel(float *dst, int ldd, const float *src, int lds, const int *idx, int n,
                                   int width)
{
    long total = (long)n * width;
    for (long x = blockIdx.x * (long)blockDim.x + threadIdx.x; x < total; x += (long)gridDim.x * blockDim.x) {
        int r = (int)(x / width), k = (int)(x % width);
        dst[(long)r * ldd + k] = src[(long)(idx ? idx[r] : r) * lds + k];
    }
}

static void cuda_gather_rows(struct backend *be, float *dst, int ldd, const float *src, int lds, const int *idx,
                             int n, int width)
{
    if (n <= 0)
        return;
    launch(be, gather_rows_kernel, blocks_for((long)n * width, 256), 256, dst, ldd, src, lds, idx, n, width);
}

__global__ void set_rows_kernel(float *dst, int ldd, const float *bias, int n, int width)
{
    long total = (long)n * width;
    for (long x = blockIdx.x * (long)blockDim.x + threadIdx.x; x < total; x += (long)gridDim.x * blockDim.x)
        dst[(x / width) * ldd + x % width] = bias[x % width];
}

static void cuda_set_rows(struct backend *be, float *dst, int ldd, const float *bias, int n, int width)
{
    if (n <= 0)
        return;
    launch(be, set_rows_kernel, blocks_for((long)n * width, 256), 256, dst, ldd, bias, n, width);
}

__global__ void add_rows_kernel(float *y, int ldy, const float *x, int ldx, int n, int width)
{
    long total = (long)n * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        y[(i / width) * ldy + i % width] += x[(i / width) * ldx + i % width];
}

static void cuda_add_rows(struct backend *be, float *y, int ldy, const float *x, int ldx, int n, int width)
{
    if (n <= 0)
        return;
    launch(be, add_rows_kernel, blocks_for((long)n * width, 256), 256, y, ldy, x, ldx, n, width);
}

__device__ float sigmoid_dev(float x)
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

__device__ float block_max(float v, float *shared)
{
    return block_reduce(v, shared, max_op());
}

#define CELL_THREADS 256

/* cell_gates of config.c, for device code. */
static __host__ __device__ int gates_of(enum cell cell)
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

__device__ cell_row cell_row_of(const cell_step &s, int i)
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
__device__ const float *cell_hist(const cell_step &s, const cell_row &r, int lag)
{
    return r.t - lag >= 1 ? r.ring + (long)((r.t - lag) % s.R) * s.H : (const float *)0;
}

/* One thread: a window's K scores in a become their softmax, copied to
 * out (K floats) unless it is NULL. */
__device__ void softmax_window(float *a, int K, float *out)
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
__device__ void window_weights(float *a, int K, float *out)
{
    __syncthreads();
    if (threadIdx.x == 0)
        softmax_window(a, K, out);
    __syncthreads();
}

/* Every thread of the block: the attention weights of row i into a (K
 * floats of shared memory), and into s.attn when asked.  The twin of
 * backend_cpu.c's attention_weights. */
__device__ void attention_weights(const cell_step &s, const cell_row &r, int i, float *a)
{
    const int K = s.attn_window, H = s.H;
    if (s.attn_mode == ATTN_STATIC) {
        for (int j = threadIdx.x; j < K; j += blockDim.x)
            a[j] = s.attn_logits[j];
    } else {
        const float *q = s.q + (long)i * H;
        float scale = 1.0f / sqrtf((float)H);
        /* A warp per window entry, its lanes striding over H and summing
         * by shuffles: the entries need no barrier between them, where a
         * block-wide sum for each took two. */
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
        for (int j = warp; j < K; j += warps) {
            const float *h = cell_hist(s, r, j + 2);
            float part = 0.0f;
            if (h)
                for (int k = lane; k < H; k += 32)
                    part += q[k] * h[k];
            for (int o = 16; o > 0; o >>= 1)
                part += __shfl_down_sync(0xffffffffu, part, o);
            if (lane == 0)
                a[j] = part * scale;
        }
    }
    window_weights(a, K, s.attn ? s.attn + (long)i * K : (float *)0);
}

/* Unit k of a row: the cell of MODELS.md from its gates' input projections
 * (r.xg) and recurrent products hv[g] (b_hh not included), the attention
 * term with weights a (NULL: none) and the temporal skip.  It writes h to
 * the output and the ring, the LSTM's c to the slot, and what the
 * backward needs to the cache; it reads only element k of every state,
 * so the units of a row need no barrier between them. */
__device__ void cell_unit(const cell_step &s, const cell_row &r, int k, const float *hv, const float *a)
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
__host__ __device__ static int attends(const cell_step &s)
{
    return s.cell == CELL_LSTM && s.attn_window > 0;
}

/* The threads of cell_step_kernel's blocks: a thread a unit, up to this
 * many, so that a row's units are not done one after another by a thread
 * each waiting on its loads. */
#define CELL_STEP_THREADS 512

/* One block per row.  The twin of cpu_cell_step: attention weights first
 * (a reduction over H per window entry), then every k of the row from the
 * recurrent products in hg; in training it also fills the row's cache as
 * cell_rows does. */
__global__ void __launch_bounds__(CELL_STEP_THREADS) cell_step_kernel(struct cell_step s)
{
    __shared__ float a[CONFIG_MAX_ATTN_WINDOW];
    const int i = blockIdx.x, H = s.H, G = gates_of(s.cell);
    const cell_row r = cell_row_of(s, i);
    if (attends(s))
        attention_weights(s, r, i, a);
    const float *hg = s.hg + (long)i * G * H;
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        float hv[4];
        for (int g = 0; g < G; g++)
            hv[g] = hg[g * H + k];
        cell_unit(s, r, k, hv, attends(s) ? a : (const float *)0);
    }
}

static void cuda_cell_step(struct backend *be, const struct cell_step *s)
{
    if (s->n <= 0)
        return;
    const int threads = (s->H + 31) / 32 * 32;
    launch(be, cell_step_kernel, s->n, threads < CELL_STEP_THREADS ? threads : CELL_STEP_THREADS, *s);
}

/* ---- the recurrence fused: product and cell in one kernel --------------
 *
 * cuBLAS's product for a step of a batch (64 x 512 by 2048 x 512 in the
 * benchmark) is a split-K pair of kernels on an H100, 19.6 us at 6.8
 * TFLOP/s, with the gates then written out and read back by the cell
 * kernel.  Fused, a block takes a tile of rows and the units of one tile,
 * all G gates of each (FUSED_COLS columns of the product), and runs their
 * cell as soon as its sums are done: one launch a step, and the gates
 * never leave the block.  Dynamic attention adds a launch before it: the
 * query's product, by tiles the same way, since a row's weights need its
 * whole query (query_kernel).  It computes in FP32 only: in TF32 and BF16
 * the tensor cores' products are cuBLAS's. */
#define FUSED_COLS 16

/* The widest window of dynamic attention the fused step takes: a block
 * keeps each of its rows' K weights in shared memory.  Wider windows take
 * the products' path. */
#define FUSED_WINDOW 32

/* A tile of ROWS rows by FUSED_COLS columns: 8, 16, 32 or 64 rows, the
 * fewest that hold a step's rows (fused_rows), so that a small batch does
 * not multiply rows of zeros.  The 256
 * threads split the sum over H into SLICES groups of ROWS threads, each
 * thread holding 4 rows by 4 columns of it; H is staged KC at a time, KS
 * of it a slice, every thread bringing H4 float4s of h and W4 of W. */
template <int ROWS> struct tile_shape {
    static constexpr int SLICES = CELL_THREADS / ROWS;
    static constexpr int KC = 4 * SLICES > 64 ? 4 * SLICES : 64;
    static constexpr int KS = KC / SLICES;
    static constexpr int LD = KC + 4; /* a row of the staged h and W */
    static constexpr int H4 = ROWS * KC / 4 / CELL_THREADS;
    static constexpr int W4 = FUSED_COLS * KC / 4 / CELL_THREADS;
    static constexpr int STAGED = (ROWS + FUSED_COLS) * LD, SUMS = SLICES * ROWS * FUSED_COLS;
    static constexpr int SHARED = STAGED > SUMS ? STAGED : SUMS; /* floats */
    static_assert(ROWS % 4 == 0 && KS % 4 == 0, "a thread's rows and k come 4 at a time");
    static_assert(H4 * CELL_THREADS * 4 == ROWS * KC && W4 * CELL_THREADS * 4 == FUSED_COLS * KC,
                  "every thread stages whole float4s");
};

/* Up to 4 floats of p, those past avail zero: one 16-byte load where the
 * row allows it (vec: H a multiple of 4 and aligned pointers). */
__device__ float4 load4(const float *p, int avail, bool vec)
{
    if (vec && avail >= 4)
        return *(const float4 *)p;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (avail > 0)
        v.x = p[0];
    if (avail > 1)
        v.y = p[1];
    if (avail > 2)
        v.z = p[2];
    if (avail > 3)
        v.w = p[3];
    return v;
}

/* Every thread of the block: rows r0 .. r0 + ROWS - 1 of hprev (n rows, H
 * wide) times the FUSED_COLS rows of w that the tile's columns name
 * (w_row(c), or -1 for a column of zeros), summed over H: returns shared
 * memory holding row r, column c at r FUSED_COLS + c.  The first stage of
 * w is loaded before ready() is called, and nothing else is read before
 * it: ready is where a kernel waits for the one before it (inputs_ready).  A thread's rows
 * are rg + ROWS/4 j and its columns cg + 4 c, which keeps the loads of a
 * quarter warp on distinct banks; one float4 of h and one of W per row
 * and column every 4 k, so 8 loads of 16 bytes from shared memory feed 64
 * multiply-adds.  The next stage is loaded into registers while this
 * one's products run, so that global memory's latency hides behind them. */
template <int ROWS, typename WRow, typename Ready>
__device__ const float *tile_product(const float *hprev, int n, int H, int r0, const float *w, WRow w_row,
                                     Ready ready)
{
    using T = tile_shape<ROWS>;
    __shared__ __align__(16) float shared[T::SHARED];
    float *hs = shared, *ws = shared + ROWS * T::LD;
    const int tid = threadIdx.x, slice = tid / ROWS, rg = tid % ROWS / 4, cg = tid % 4;
    const bool vec = H % 4 == 0 && (uintptr_t)hprev % 16 == 0 && (uintptr_t)w % 16 == 0;
    float4 hnext[T::H4], wnext[T::W4];
    auto fetch_h = [&](int k0) {
        for (int m = 0; m < T::H4; m++) {
            const int x = tid + m * CELL_THREADS, i = r0 + x / (T::KC / 4), k = 4 * (x % (T::KC / 4));
            hnext[m] = load4(hprev + (long)i * H + k0 + k, i < n ? H - k0 - k : 0, vec);
        }
    };
    auto fetch_w = [&](int k0) {
        for (int m = 0; m < T::W4; m++) {
            const int x = tid + m * CELL_THREADS, wr = w_row(x / (T::KC / 4)), k = 4 * (x % (T::KC / 4));
            wnext[m] = load4(w + (wr >= 0 ? (long)wr * H : 0) + k0 + k, wr >= 0 ? H - k0 - k : 0, vec);
        }
    };
    fetch_w(0);
    ready();
    fetch_h(0);
    float acc[4][4] = {};
    for (int k0 = 0; k0 < H; k0 += T::KC) {
        for (int m = 0; m < T::H4; m++) {
            const int x = tid + m * CELL_THREADS;
            *(float4 *)&hs[x / (T::KC / 4) * T::LD + 4 * (x % (T::KC / 4))] = hnext[m];
        }
        for (int m = 0; m < T::W4; m++) {
            const int x = tid + m * CELL_THREADS;
            *(float4 *)&ws[x / (T::KC / 4) * T::LD + 4 * (x % (T::KC / 4))] = wnext[m];
        }
        __syncthreads();
        if (k0 + T::KC < H) {
            fetch_h(k0 + T::KC);
            fetch_w(k0 + T::KC);
        }
        const int ks = slice * T::KS, kn = H - k0;
        for (int k = ks; k < ks + T::KS && k < kn; k += 4) {
            float4 hv[4], wv[4];
            for (int j = 0; j < 4; j++)
                hv[j] = *(const float4 *)&hs[(rg + ROWS / 4 * j) * T::LD + k];
            for (int c = 0; c < 4; c++)
                wv[c] = *(const float4 *)&ws[(cg + 4 * c) * T::LD + k];
            for (int j = 0; j < 4; j++)
                for (int c = 0; c < 4; c++) {
                    float v = acc[j][c];
                    v = fmaf(hv[j].x, wv[c].x, v);
                    v = fmaf(hv[j].y, wv[c].y, v);
                    v = fmaf(hv[j].z, wv[c].z, v);
                    acc[j][c] = fmaf(hv[j].w, wv[c].w, v);
                }
        }
        __syncthreads();
    }
    /* The slices' sums, where h and W were ([slice][row][column]), then
     * added in order into the first slice's place, every thread taking
     * its share of the tile. */
    for (int j = 0; j < 4; j++)
        for (int c = 0; c < 4; c++)
            shared[(slice * ROWS + rg + ROWS / 4 * j) * FUSED_COLS + cg + 4 * c] = acc[j][c];
    __syncthreads();
    for (int x = tid; x < ROWS * FUSED_COLS; x += CELL_THREADS) {
        float v = shared[x];
        for (int q = 1; q < T::SLICES; q++)
            v += shared[q * ROWS * FUSED_COLS + x];
        shared[x] = v;
    }
    __syncthreads();
    return shared;
}

/* A product over n rows and some units, per_tile units a tile (their
 * gates FUSED_COLS columns at most): the block's first row and unit, and
 * how many blocks the product takes. */
template <int ROWS> __device__ void tile_of_block(int units, int per_tile, int *r0, int *u0)
{
    const int unit_tiles = (units + per_tile - 1) / per_tile;
    *u0 = blockIdx.x % unit_tiles * per_tile;
    *r0 = blockIdx.x / unit_tiles * ROWS;
}

static int tile_blocks(int n, int rows, int units, int per_tile)
{
    return (units + per_tile - 1) / per_tile * ((n + rows - 1) / rows);
}

/* Every thread of a fused kernel, before it touches anything but the
 * weights.  Where the kernel was launched to overlap the one before it in
 * its stream (programmatic dependent launch, sm_90 on; launch_on), it
 * waits here until that one has finished and its writes are seen, and then
 * lets the next such kernel start: a layer's steps are a chain of them, so
 * that each step's blocks are scheduled and load their first weights while
 * the step before still runs, instead of after it.  Launched otherwise,
 * both calls return at once. */
__device__ void inputs_ready()
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    cudaGridDependencySynchronize();
    cudaTriggerProgrammaticLaunchCompletion();
#endif
}

/* Every thread of the block: the attention weights of the tile's rows
 * into a, each row's K at row K (dynamic) or one window for every row
 * (static), and to s.attn from the blocks of the first units. */
template <int ROWS, int G> __device__ void tile_attention(const cell_step &s, int r0, int u0, float *a)
{
    const int H = s.H, n = s.n, K = s.attn_window, tid = threadIdx.x;
    if (s.attn_mode == ATTN_DYNAMIC) {
        /* Row i's score j: the query kernel's parts of it, one a tile of
         * the query, added in the tiles' order; then each row's softmax,
         * a thread a row.  Every block of the row's tile works them out
         * for itself. */
        const int tiles = (H + FUSED_COLS - 1) / FUSED_COLS;
        const float scale = 1.0f / sqrtf((float)H);
        /* By 16-byte loads where every score's parts start aligned: a
         * thread's loads are what the step waits on here. */
        const bool vec = tiles % 4 == 0 && (uintptr_t)s.hg % 16 == 0;
        for (int x = tid; x < ROWS * K; x += blockDim.x) {
            const int i = r0 + x / K;
            float score = 0.0f;
            if (i < n) {
                const float *part = s.hg + (long)i * G * H + x % K * tiles;
                for (int q = 0; q < tiles; q += 4) {
                    const float4 p = load4(part + q, tiles - q, vec);
                    score += p.x;
                    score += p.y;
                    score += p.z;
                    score += p.w;
                }
            }
            a[x] = score * scale;
        }
        __syncthreads();
        for (int row = tid; row < ROWS; row += blockDim.x) {
            const int i = r0 + row;
            softmax_window(a + row * K, K, s.attn && u0 == 0 && i < n ? s.attn + (long)i * K : (float *)0);
        }
        __syncthreads();
    } else {
        for (int j = tid; j < K; j += blockDim.x)
            a[j] = s.attn_logits[j];
        window_weights(a, K, (float *)0);
        if (s.attn && u0 == 0)
            for (int x = tid; x < ROWS * K; x += blockDim.x) {
                const int i = r0 + x / K;
                if (i < n)
                    s.attn[(long)i * K + x % K] = a[x % K];
            }
    }
}

/* The cell kernel with the recurrent product done inside: each tile's
 * (row, unit) runs cell_unit from its gates' sums, as cell_step_kernel
 * does from hg in memory.  A tile holds FUSED_COLS / G units: 4 of the
 * LSTM, 5 of the GRU (one column unused), 16 of a plain RNN. */
template <int G, int ROWS> __global__ void __launch_bounds__(CELL_THREADS)
    recurrent_step_kernel(struct cell_step s, const float *hprev, const float *w)
{
    constexpr int U = FUSED_COLS / G;
    static_assert(8 * FUSED_WINDOW >= CONFIG_MAX_ATTN_WINDOW, "a static window fits the smallest tile's weights");
    __shared__ float a[ROWS * FUSED_WINDOW];
    const int H = s.H, n = s.n, K = s.attn_window, tid = threadIdx.x;
    int r0, u0;
    tile_of_block<ROWS>(H, U, &r0, &u0);
    /* Column c is gate c / U of unit u0 + c % U: W's row g H + u0 + u. */
    const float *sums = tile_product<ROWS>(
        hprev, n, H, r0, w,
        [&](int c) {
            const int g = c / U, unit = u0 + c % U;
            return g < G && unit < H ? g * H + unit : -1;
        },
        [&] {
            inputs_ready();
            if (attends(s))
                tile_attention<ROWS, G>(s, r0, u0, a);
        });
    for (int x = tid; x < ROWS * U; x += blockDim.x) {
        const int row = x / U, u = x % U, i = r0 + row, k = u0 + u;
        if (i >= n || k >= H)
            continue;
        float hv[4];
        for (int g = 0; g < G; g++)
            hv[g] = sums[row * FUSED_COLS + g * U + u];
        const float *aw = !attends(s) ? (const float *)0 : s.attn_mode == ATTN_DYNAMIC ? a + row * K : a;
        cell_unit(s, cell_row_of(s, i), k, hv, aw);
    }
}

/* Dynamic attention's queries, q = hprev W_q^T, by the tiles of the
 * recurrent product: FUSED_COLS units of q a tile.  A row's scores need
 * its whole query, which no tile has, so each tile also leaves its part of
 * them, q . h_{t-1-j} over its units alone, in the row's hg (which the
 * fused step does not otherwise use): K parts a tile, at j tiles + tile,
 * for recurrent_step_kernel to add up in order.  Added in a fixed order
 * rather than by atomics, the scores do not depend on how the blocks
 * ran. */
template <int ROWS> __global__ void __launch_bounds__(CELL_THREADS)
    query_kernel(struct cell_step s, const float *hprev, const float *w_q)
{
    const int H = s.H, K = s.attn_window, tiles = (H + FUSED_COLS - 1) / FUSED_COLS;
    int r0, u0;
    tile_of_block<ROWS>(H, FUSED_COLS, &r0, &u0);
    const float *sums = tile_product<ROWS>(
        hprev, s.n, H, r0, w_q, [&](int c) { return u0 + c < H ? u0 + c : -1; }, [] { inputs_ready(); });
    for (int x = threadIdx.x; x < ROWS * FUSED_COLS; x += blockDim.x) {
        const int row = x / FUSED_COLS, c = x % FUSED_COLS, i = r0 + row;
        if (i < s.n && u0 + c < H)
            s.q[(long)i * H + u0 + c] = sums[x];
    }
    const bool vec = H % 4 == 0 && (uintptr_t)s.ring % 16 == 0;
    for (int x = threadIdx.x; x < ROWS * K; x += blockDim.x) {
        const int row = x / K, j = x % K, i = r0 + row;
        if (i >= s.n)
            continue;
        const float *h = cell_hist(s, cell_row_of(s, i), j + 2), *q = sums + row * FUSED_COLS;
        float part = 0.0f;
        for (int c = 0; h && c < FUSED_COLS; c += 4) {
            const float4 hv = load4(h + u0 + c, H - u0 - c, vec);
            part += q[c] * hv.x;
            part += q[c + 1] * hv.y;
            part += q[c + 2] * hv.z;
            part += q[c + 3] * hv.w;
        }
        s.hg[(long)i * gates_of(s.cell) * H + j * tiles + u0 / FUSED_COLS] = part;
    }
}

/* Both kernels read the weights before inputs_ready, so they overlap the
 * kernel before them only where nothing can have just written the weights:
 * in training the optimizer rewrites them between batches, in inference
 * nothing does. */
template <int ROWS> static void fused_step(struct backend *be, const struct cell_step *s, const float *hprev,
                                           const float *w, const float *w_q)
{
    const int G = gates_of(s->cell), U = FUSED_COLS / G;
    const bool overlap = impl_of(be)->overlap && !s->cache;
    if (attends(*s) && s->attn_mode == ATTN_DYNAMIC)
        launch_on(be, overlap, query_kernel<ROWS>, tile_blocks(s->n, ROWS, s->H, FUSED_COLS), CELL_THREADS, *s,
                  hprev, w_q);
    launch_on(be, overlap,
              G == 4   ? recurrent_step_kernel<4, ROWS>
              : G == 3 ? recurrent_step_kernel<3, ROWS>
                       : recurrent_step_kernel<1, ROWS>,
              tile_blocks(s->n, ROWS, s->H, U), CELL_THREADS, *s, hprev, w);
}

/* The most rows a tile takes; a step of more takes several tiles.  64
 * unless built otherwise: tools/gpu-bundle.sh builds the benchmark with 32
 * and 16 too, for tools/gpu-run.sh bench to time the trade between a
 * tile's reuse of each W it loads (more rows) and the blocks a step
 * spreads over the SMs (fewer). */
#ifndef FUSED_ROWS_MAX
#define FUSED_ROWS_MAX 64
#endif

/* 0 builds the fused steps without overlapping launches (inputs_ready),
 * for tools/gpu-run.sh bench to time what they buy. */
#ifndef FUSED_OVERLAP
#define FUSED_OVERLAP 1
#endif
static_assert(FUSED_ROWS_MAX == 8 || FUSED_ROWS_MAX == 16 || FUSED_ROWS_MAX == 32 || FUSED_ROWS_MAX == 64,
              "a tile has 8, 16, 32 or 64 rows");

/* The rows of a tile for a step of n rows. */
static int fused_rows(int n)
{
    int rows = 8;
    while (rows < n && rows < FUSED_ROWS_MAX)
        rows *= 2;
    return rows;
}

static int cuda_recurrent_step(struct backend *be, const struct cell_step *s, const float *hprev, const float *w,
                               const float *w_q)
{
    /* Dynamic attention's parts of scores, K a tile of the query, must fit
     * the row's hg, and its weights the block's shared memory. */
    const int parts = s->attn_window * ((s->H + FUSED_COLS - 1) / FUSED_COLS);
    if (be->recurrence != RECURRENCE_FUSED || impl_of(be)->precision != PRECISION_FP32 ||
        (attends(*s) && s->attn_mode == ATTN_DYNAMIC &&
         (s->attn_window > FUSED_WINDOW || parts > gates_of(s->cell) * s->H)))
        return 0;
    if (s->n <= 0)
        return 1;
    switch (fused_rows(s->n)) {
    case 8:
        fused_step<8>(be, s, hprev, w, w_q);
        break;
    case 16:
        fused_step<16>(be, s, hprev, w, w_q);
        break;
    case 32:
        fused_step<32>(be, s, hprev, w, w_q);
        break;
    default:
        fused_step<64>(be, s, hprev, w, w_q);
        break;
    }
    return 1;
}

__global__ void pool_mean_kernel(float *dst, const float *src, int width, const int *off, const int *len)
{
    const int i = blockIdx.x;
    for (int k = threadIdx.x; k < width; k += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < len[i]; s++)
            sum += src[(long)(off[s] + i) * width + k];
        dst[(long)i * width + k] = sum / (float)len[i];
    }
}

static void cuda_pool_mean(struct backend *be, float *dst, const float *src, int width, const int *off,
                           const int *len, int n)
{
    if (n <= 0)
        return;
    launch(be, pool_mean_kernel, n, 256, dst, src, width, off, len);
}

/* exp in the precision of its argument, named so that a float never
 * widens to double by overload resolution. */
__device__ float exp_of(float x)
{
    return expf(x);
}

__device__ double exp_of(double x)
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

__global__ void softmax_rows_kernel(float *x, int width)
{
    __shared__ float red[8];
    float *row = x + (long)blockIdx.x * width, mx, sum;
    row_max_sumexp(row, width, red, red, &mx, &sum);
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        row[k] = expf(row[k] - mx) / sum;
}

static void cuda_softmax_rows(struct backend *be, float *x, int n, int width)
{
    if (n <= 0)
        return;
    launch(be, softmax_rows_kernel, n, 256, x, width);
}

/* Sums in double, as its CPU twin does: over a large vocabulary a float
 * sum loses digits, and a text's log-probability adds them up. */
__global__ void log_softmax_pick_kernel(const float *x, int width, const int *target, float *out)
{
    __shared__ float red[8];
    __shared__ double redd[8];
    const int r = blockIdx.x;
    if (target[r] < 0) {
        if (threadIdx.x == 0)
            out[r] = 0.0f;
        return;
    }
    const float *row = x + (long)r * width;
    float mx;
    double sum;
    row_max_sumexp(row, width, red, redd, &mx, &sum);
    if (threadIdx.x == 0)
        out[r] = (float)((double)(row[target[r]] - mx) - log(sum));
}

static void cuda_log_softmax_pick(struct backend *be, const float *x, int n, int width, const int *target,
                                  float *out)
{
    if (n <= 0)
        return;
    launch(be, log_softmax_pick_kernel, n, 256, x, width, target, out);
}

/* ------------------------------------------------------------------------ */
/* Training: the twins of backend_cpu.c's backward operations.  Sums over
 * rows (the peephole and static attention gradients, column sums, the
 * embedding's scatter) run one thread per column over the rows in order,
 * as the CPU does, rather than with atomics: the result does not depend on
 * how the blocks were scheduled. */

/* Device scratch of at least n floats, or NULL (the error recorded).  It
 * synchronizes and allocates, which a recording (capture_begin) forbids:
 * only training's backward uses it, and training is never recorded. */
static float *scratch_of(struct backend *be, size_t n)
{
    struct cuda_impl *c = impl_of(be);
    if (n <= c->scratch_cap)
        return c->scratch;
    /* Nothing queued may still use the old buffer when it goes. */
    if (check(be, cudaStreamSynchronize(stream_of(be)), "stream") != 0)
        return NULL;
    if (c->scratch)
        cudaFree(c->scratch);
    c->scratch = NULL;
    c->scratch_cap = 0;
    if (check(be, cudaMalloc(&c->scratch, n * sizeof(float)), "cudaMalloc") != 0)
        return NULL;
    c->scratch_cap = n;
    return c->scratch;
}

/* One block per row: the twin of cell_grad_rows, less the sums over rows
 * (cell_grad_sums_kernel).  Each thread owns its k of every state it
 * touches, so the additions into earlier steps' dh need no atomics.
 * With attention, the row's dL/dc_t goes to dct_rows (H floats a row) for
 * the attention's terms; each thread reads back only the k it wrote, so
 * it need not be shared memory, which could not hold the largest H. */
__global__ void cell_grad_kernel(struct cell_grad g, float *dct_rows, float *da_rows)
{
    __shared__ float red[CELL_THREADS / 32];
    __shared__ float da[CONFIG_MAX_ATTN_WINDOW];
    const int i = blockIdx.x, H = g.H, K = g.attn_window, s = g.s;
    const int G = gates_of(g.cell);
    const long cw = CELL_CACHE(g.cell, H), GH = (long)G * H;
    const float scale = 1.0f / sqrtf((float)H);
    float *dh = g.dh + (long)(g.off[s] + i) * H;
    const float *hprev = g.h + (long)(g.off[s - 1] + i) * H;
    float *dhprev = g.dh + (long)(g.off[s - 1] + i) * H;
    const float *cache = g.cache + i * cw;
    float *dxg = g.dxg + i * GH, *dhg = g.dhg + i * GH;
    float *skip = g.skip_period > 1 && g.t0 % g.skip_period == 0
                      ? g.dh + (long)(g.off[s - g.skip_period] + i) * H
                      : (float *)0;
    float *dct = dct_rows ? dct_rows + (long)i * H : (float *)0;
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        if (skip)
            skip[k] += dh[k];
        switch (g.cell) {
        case CELL_RNN_TANH:
            dxg[k] = dhg[k] = dh[k] * (1.0f - cache[k] * cache[k]);
            break;
        case CELL_RNN_RELU:
            dxg[k] = dhg[k] = cache[k] > 0.0f ? dh[k] : 0.0f;
            break;
        case CELL_GRU:
            gru_grad_element(H, k, dh[k], cache, hprev[k], &dhprev[k], dxg, dhg);
            break;
        default: {
            const float *cprev = g.cache_prev ? g.cache_prev + i * cw + 4 * H
                                 : g.c0       ? g.c0 + (long)i * H
                                              : (const float *)0;
            float dpo;
            float dc = lstm_grad_element(H, k, dh[k], cache, tanhf(cache[4 * H + k]), cprev ? cprev[k] : 0.0f,
                                         g.peephole != NULL, g.peephole ? g.peephole[k] : 0.0f,
                                         g.dc + (long)i * H + k, &dpo, dxg, dhg);
            if (dct)
                dct[k] = dc;
            break;
        }
        }
    }
    if (g.cell != CELL_LSTM || !K)
        return;
    /* c_t += sum_j a_j h_{t-1-j}: the states get a_j dc_t, the weights
     * dc_t . h_{t-1-j}, then through the softmax. */
    __syncthreads();
    const float *a = g.attn + (long)i * K;
    for (int j = 0; j < K; j++) {
        const float *hj = g.h + (long)(g.off[s - 2 - j] + i) * H;
        float *dhj = g.dh + (long)(g.off[s - 2 - j] + i) * H;
        float part = 0.0f;
        for (int k = threadIdx.x; k < H; k += blockDim.x) {
            part += dct[k] * hj[k];
            dhj[k] += a[j] * dct[k];
        }
        float sum = block_sum(part, red);
        if (threadIdx.x == 0)
            da[j] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float dot = 0.0f;
        for (int j = 0; j < K; j++)
            dot += a[j] * da[j];
        for (int j = 0; j < K; j++)
            da[j] = a[j] * (da[j] - dot); /* now d score_j */
    }
    __syncthreads();
    if (g.attn_mode == ATTN_STATIC) {
        for (int j = threadIdx.x; j < K; j += blockDim.x)
            da_rows[(long)i * K + j] = da[j];
        return;
    }
    /* score_j = q . h_{t-1-j} / sqrt(H) */
    const float *q = g.q + (long)i * H;
    float *dq = g.dq + (long)i * H;
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < K; j++) {
            const float *hj = g.h + (long)(g.off[s - 2 - j] + i) * H;
            float *dhj = g.dh + (long)(g.off[s - 2 - j] + i) * H;
            acc += da[j] * scale * hj[k];
            dhj[k] += da[j] * scale * q[k];
        }
        dq[k] = acc;
    }
}

/* The sums over rows of one step: d_peephole[k] (recomputed from the
 * cache and dh, which cell_grad_kernel leaves as they were for this step's
 * rows) and the static attention's d_attn_logits[j], rows in order. */
__global__ void cell_grad_sums_kernel(struct cell_grad g, const float *da_rows)
{
    const int H = g.H, K = g.attn_window;
    const long cw = CELL_CACHE(g.cell, H);
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; g.peephole && k < H; k += gridDim.x * blockDim.x)
        for (int i = 0; i < g.n; i++) {
            const float *cache = g.cache + i * cw;
            float og = cache[3 * H + k], c = cache[4 * H + k];
            float dpo = g.dh[(long)(g.off[g.s] + i) * H + k] * tanhf(c) * og * (1.0f - og);
            g.d_peephole[k] += dpo * c;
        }
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; da_rows && j < K; j += gridDim.x * blockDim.x)
        for (int i = 0; i < g.n; i++)
            g.d_attn_logits[j] += da_rows[(long)i * K + j];
}

static void cuda_cell_step_backward(struct backend *be, const struct cell_grad *g)
{
    if (g->n <= 0)
        return;
    const int attn = g->cell == CELL_LSTM && g->attn_window;
    const int stat = attn && g->attn_mode == ATTN_STATIC;
    /* n rows of dL/dc_t (H floats each), then n of the static attention's K. */
    float *rows = attn ? scratch_of(be, (size_t)g->n * (g->H + g->attn_window)) : (float *)0;
    if (attn && !rows)
        return;
    float *da_rows = stat ? rows + (size_t)g->n * g->H : (float *)0;
    launch(be, cell_grad_kernel, g->n, CELL_THREADS, *g, rows, da_rows);
    if (g->peephole || stat)
        launch(be, cell_grad_sums_kernel, blocks_for(g->H > g->attn_window ? g->H : g->attn_window, 128), 128, *g,
               (const float *)da_rows);
}

/* dst[k] += sum over rows of src[r][k], rows in order. */
__global__ void add_column_sums_kernel(float *dst, const float *src, int n, int width)
{
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < width; k += gridDim.x * blockDim.x) {
        float sum = dst[k];
        for (int r = 0; r < n; r++)
            sum += src[(long)r * width + k];
        dst[k] = sum;
    }
}

static void cuda_add_column_sums(struct backend *be, float *dst, const float *src, int n, int width)
{
    if (n > 0 && width > 0)
        launch(be, add_column_sums_kernel, blocks_for(width, 128), 128, dst, src, n, width);
}

/* Rows in order, one thread per column: repeated indices add up in the
 * same order as on the CPU. */
__global__ void scatter_add_rows_kernel(float *dst, int ldd, const float *src, int lds, const int *idx, int n,
                                        int width)
{
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < width; k += gridDim.x * blockDim.x)
        for (int r = 0; r < n; r++)
            dst[(long)(idx ? idx[r] : r) * ldd + k] += src[(long)r * lds + k];
}

static void cuda_scatter_add_rows(struct backend *be, float *dst, int ldd, const float *src, int lds,
                                  const int *idx, int n, int width)
{
    if (n > 0 && width > 0)
        launch(be, scatter_add_rows_kernel, blocks_for(width, 128), 128, dst, ldd, src, lds, idx, n, width);
}

/* One block per sequence; each (step, sequence) row is its own. */
__global__ void pool_mean_backward_kernel(float *dst, const float *src, int width, const int *off,
                                          const int *len)
{
    const int i = blockIdx.x;
    for (int k = threadIdx.x; k < width; k += blockDim.x) {
        float v = src[(long)i * width + k] / (float)len[i];
        for (int s = 0; s < len[i]; s++)
            dst[(long)(off[s] + i) * width + k] += v;
    }
}

static void cuda_pool_mean_backward(struct backend *be, float *dst, const float *src, int width, const int *off,
                                    const int *len, int n)
{
    if (n > 0)
        launch(be, pool_mean_backward_kernel, n, 256, dst, src, width, off, len);
}

/* The twin of backend_cpu.c's hash_uniform: the same mask on both. */
__device__ float hash_uniform_dev(unsigned long long seed, unsigned long long i)
{
    unsigned long long z = seed + 0x9e3779b97f4a7c15ULL * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (float)(z >> 40) * 0x1.0p-24f;
}

__global__ void dropout_kernel(float *y, const float *x, size_t n, float p, unsigned long long seed)
{
    float keep = 1.0f / (1.0f - p);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = hash_uniform_dev(seed, i) < p ? 0.0f : x[i] * keep;
}

static void cuda_dropout(struct backend *be, float *y, const float *x, size_t n, float p, unsigned long long seed)
{
    if (n > 0)
        launch(be, dropout_kernel, blocks_for((long)n, 256), 256, y, x, n, p, seed);
}

/* One block per row; sums in double, as the CPU twin. */
__global__ void softmax_xent_kernel(const float *x, int width, const int *target, float *loss, float *dx,
                                    float scale)
{
    __shared__ float red[8];
    __shared__ double redd[8];
    const int r = blockIdx.x;
    const float *row = x + (long)r * width;
    float *d = dx + (long)r * width;
    if (target[r] < 0) {
        for (int k = threadIdx.x; k < width; k += blockDim.x)
            d[k] = 0.0f;
        if (threadIdx.x == 0)
            loss[r] = 0.0f;
        return;
    }
    float mx;
    double sum;
    row_max_sumexp(row, width, red, redd, &mx, &sum);
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        d[k] = scale * (float)(exp((double)(row[k] - mx)) / sum) - (k == target[r] ? scale : 0.0f);
    if (threadIdx.x == 0)
        loss[r] = (float)(log(sum) - (double)(row[target[r]] - mx));
}

static void cuda_softmax_xent(struct backend *be, const float *x, int n, int width, const int *target, float *loss,
                              float *dx, float scale)
{
    if (n > 0)
        launch(be, softmax_xent_kernel, n, 256, x, width, target, loss, dx, scale);
}

__global__ void squared_error_kernel(const float *x, const float *y, int width, float *loss, float *dx, float scale)
{
    __shared__ double redd[8];
    const long r = blockIdx.x;
    double part = 0.0;
    for (int k = threadIdx.x; k < width; k += blockDim.x) {
        float e = x[r * width + k] - y[r * width + k];
        part += (double)e * e;
        dx[r * width + k] = scale * 2.0f * e;
    }
    double sum = block_sum(part, redd);
    if (threadIdx.x == 0)
        loss[r] = (float)sum;
}

static void cuda_squared_error(struct backend *be, const float *x, const float *y, int n, int width, float *loss,
                               float *dx, float scale)
{
    if (n > 0)
        launch(be, squared_error_kernel, n, 256, x, y, width, loss, dx, scale);
}

/* The gradients' sum of squares: SUM_BLOCKS blocks each add the squares
 * of their grid-strided elements, then one block adds the blocks' sums,
 * both in double and in a fixed order, so that a step's bits do not depend
 * on how the blocks were scheduled. */
#define SUM_BLOCKS 256

__global__ void sum_squares_kernel(const float *x, size_t n, double *partial)
{
    __shared__ double red[8];
    double part = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        part += (double)x[i] * x[i];
    part = block_sum(part, red);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = part;
}

__global__ void sum_partials_kernel(const double *partial, int n, double *total)
{
    __shared__ double red[8];
    double part = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        part += partial[i];
    part = block_sum(part, red);
    if (threadIdx.x == 0)
        *total = part;
}

/* A thread per parameter; none changes when the gradients are not all
 * finite. */
__global__ void optim_step_kernel(struct optim_update u, float *params, const float *grad, float *state, size_t n,
                                  const double *sum_squares)
{
    if (!isfinite(*sum_squares))
        return;
    const double scale = optim_clip_scale(*sum_squares, u.clip_norm);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        optim_update_element(u, n, i, params + i, (float)(grad[i] * scale), state);
}

static void cuda_optim_step(struct backend *be, const struct optim_update *u, float *params, const float *grad,
                            float *state, size_t n, double *sum_squares)
{
    if (n == 0) {
        cuda_zero(be, sum_squares, sizeof *sum_squares);
        return;
    }
    /* SUM_BLOCKS partial sums, as doubles. */
    double *partial = (double *)scratch_of(be, 2 * SUM_BLOCKS);
    if (!partial)
        return;
    launch(be, sum_squares_kernel, SUM_BLOCKS, 256, grad, n, partial);
    launch(be, sum_partials_kernel, 1, 256, (const double *)partial, SUM_BLOCKS, sum_squares);
    launch(be, optim_step_kernel, blocks_for((long)n, 256), 256, *u, params, grad, state, n,
           (const double *)sum_squares);
}

/* FP32 computes in FP32 throughout.  TF32 lets cuBLAS round the FP32
 * operands as they enter the tensor cores (to 10 mantissa bits), summing
 * in FP32.  BF16 multiplies by BF16 twins of the weights (pack_weights)
 * and the other operand rounded to BF16 (gemm_packed), summing in FP32:
 * asked only to allow BF16 (CUBLAS_COMPUTE_32F_FAST_16BF), cuBLAS 13 ran
 * its TF32 kernels on an H100, bit for bit (bench/RESULTS.md).  Products
 * of two activations (training's backward) use TF32 in both. */
static int cuda_set_precision(struct backend *be, enum precision p)
{
    static const cublasComputeType_t compute[] = {CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32,
                                                  CUBLAS_COMPUTE_32F_FAST_TF32};
    impl_of(be)->precision = p;
    impl_of(be)->compute = compute[p];
    return 0;
}

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, int rows, int cols, int lds)
{
    long total = (long)rows * cols;
    for (long x = blockIdx.x * (long)blockDim.x + threadIdx.x; x < total; x += (long)gridDim.x * blockDim.x)
        dst[x] = __float2bfloat16_rn(src[(x / cols) * lds + x % cols]);
}

/* In BF16 precision, a weight matrix's twin in BF16 (freed with free);
 * NULL in the others, whose products read the FP32 weights. */
static void *cuda_pack_weights(struct backend *be, const float *B, int N, int K, size_t *bytes)
{
    if (impl_of(be)->precision != PRECISION_BF16)
        return NULL;
    *bytes = (size_t)N * K * sizeof(__nv_bfloat16);
    __nv_bfloat16 *twin = (__nv_bfloat16 *)cuda_alloc(be, *bytes);
    if (twin)
        launch(be, to_bf16_kernel, blocks_for((long)N * K, 256), 256, twin, B, N, K, K);
    return twin;
}

/* The lane's BF16 scratch of at least n values, or NULL (the error
 * recorded).  It grows only outside a recording, which cannot allocate:
 * a shape is recorded the second time it comes, and the first, run as it
 * was queued, grew the scratch for it. */
static __nv_bfloat16 *bf16_scratch(struct backend *be, size_t n)
{
    struct cuda_impl *c = impl_of(be);
    struct cuda_lane *l = &c->lanes[c->lane];
    if (n <= l->bf16_cap)
        return l->bf16;
    if (c->n_outgrown == (int)(sizeof c->outgrown / sizeof c->outgrown[0])) {
        snprintf(be->err, sizeof be->err, "the BF16 scratch grew too often");
        return NULL;
    }
    size_t cap = n > 2 * l->bf16_cap ? n : 2 * l->bf16_cap;
    void *p = NULL;
    if (check(be, cudaMalloc(&p, cap * sizeof(__nv_bfloat16)), "cudaMalloc") != 0)
        return NULL;
    if (l->bf16)
        c->outgrown[c->n_outgrown++] = l->bf16;
    l->bf16 = (__nv_bfloat16 *)p;
    l->bf16_cap = cap;
    return l->bf16;
}

/* C = A B^T + beta C with B's BF16 twin: A rounded to BF16 into the
 * lane's scratch, then one cuBLAS product of BF16 operands summed in FP32. */
static void cuda_gemm_packed(struct backend *be, int M, int N, int K, const float *A, int lda, const void *packed,
                             float beta, float *C, int ldc)
{
    if (M <= 0 || N <= 0)
        return;
    __nv_bfloat16 *a = bf16_scratch(be, (size_t)M * K);
    if (!a)
        return;
    launch(be, to_bf16_kernel, blocks_for((long)M * K, 256), 256, a, A, M, K, lda);
    gemm_ex(be, 0, 1, M, N, K, 1.0f, a, K, packed, K, CUDA_R_16BF, beta, C, ldc, CUBLAS_COMPUTE_32F);
}

/* Thread-local capture: another model's batcher, on its own stream and
 * thread, may allocate while this one records. */
static int cuda_capture_begin(struct backend *be)
{
    return check(be, cudaStreamBeginCapture(stream_of(be), cudaStreamCaptureModeThreadLocal), "graph capture");
}

static void *cuda_capture_end(struct backend *be)
{
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t rc = cudaStreamEndCapture(stream_of(be), &graph);
    if (rc == cudaSuccess && graph)
        rc = cudaGraphInstantiate(&exec, graph, 0);
    if (graph)
        cudaGraphDestroy(graph);
    if (rc != cudaSuccess) {
        /* A failed capture leaves its error to be read; it is not the
         * device's, and the caller runs the work without a graph. */
        cudaGetLastError();
        return NULL;
    }
    return exec;
}

static int cuda_replay(struct backend *be, void *graph)
{
    return check(be, cudaGraphLaunch((cudaGraphExec_t)graph, stream_of(be)), "graph launch");
}

static void cuda_graph_free(struct backend *be, void *graph)
{
    check(be, cudaGraphExecDestroy((cudaGraphExec_t)graph), "graph free");
}

/* Make what lane l lacks of its stream, event, workspace and handle; 0, or
 * -1 with a message in err. */
static int lane_open(struct cuda_lane *l, char *err, size_t errlen)
{
    cudaError_t rc = l->stream ? cudaSuccess : cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking);
    if (rc == cudaSuccess && !l->queued)
        rc = cudaEventCreateWithFlags(&l->queued, cudaEventDisableTiming);
    if (rc != cudaSuccess) {
        snprintf(err, errlen, "cannot create a CUDA stream: %s", cudaGetErrorString(rc));
        return -1;
    }
    if (!l->workspace && (rc = cudaMalloc(&l->workspace, CUBLAS_WORKSPACE_BYTES)) != cudaSuccess) {
        l->workspace = NULL;
        (void)cudaGetLastError();
        snprintf(err, errlen, "cannot allocate cuBLAS's workspace: %s", cudaGetErrorString(rc));
        return -1;
    }
    cublasHandle_t blas = NULL;
    /* cublasSetStream resets the workspace to cuBLAS's own, so it comes
     * first; the handle is kept only once both are set. */
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(blas, l->stream) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(blas, l->workspace, CUBLAS_WORKSPACE_BYTES) != CUBLAS_STATUS_SUCCESS) {
        if (blas)
            cublasDestroy(blas);
        snprintf(err, errlen, "cannot initialise cuBLAS");
        return -1;
    }
    l->blas = blas;
    return 0;
}

/* A lane that cannot be made leaves its error for sync, and the work in
 * the lane already in use, where it runs in order. */
static void cuda_lane_use(struct backend *be, int lane)
{
    struct cuda_impl *c = impl_of(be);
    char err[sizeof be->err];
    if (!c->lanes[lane].blas && lane_open(&c->lanes[lane], err, sizeof err) != 0) {
        if (!be->err[0])
            memcpy(be->err, err, sizeof err);
        return;
    }
    c->lane = lane;
}

static void cuda_lane_wait(struct backend *be, int lane)
{
    struct cuda_impl *c = impl_of(be);
    struct cuda_lane *l = &c->lanes[lane];
    if (lane == c->lane || !l->blas)
        return;
    if (check(be, cudaEventRecord(l->queued, l->stream), "event") == 0)
        check(be, cudaStreamWaitEvent(stream_of(be), l->queued, 0), "event");
}

static int cuda_sync(struct backend *be)
{
    struct cuda_impl *c = impl_of(be);
    for (int k = 0; k < CUDA_LANES; k++)
        if (c->lanes[k].blas)
            check(be, cudaStreamSynchronize(c->lanes[k].stream), "stream");
    check(be, cudaGetLastError(), "kernel");
    return be->err[0] ? -1 : 0;
}

static const struct backend_ops cuda_ops = {
    "cuda",
    0, /* project_each_step */
    1, /* pad_steps */
    cuda_destroy,
    cuda_alloc,
    cuda_free,
    cuda_upload,
    cuda_download,
    cuda_zero,
    cuda_gemm,
    cuda_gather_rows,
    cuda_set_rows,
    cuda_add_rows,
    cuda_cell_step,
    cuda_pool_mean,
    cuda_softmax_rows,
    cuda_log_softmax_pick,
    cuda_sync,
    cuda_cell_step_backward,
    cuda_add_column_sums,
    cuda_scatter_add_rows,
    cuda_pool_mean_backward,
    cuda_dropout,
    cuda_softmax_xent,
    cuda_squared_error,
    cuda_optim_step,
    cuda_set_precision,
    cuda_host_alloc,
    cuda_host_free,
    cuda_pack_weights,
    cuda_gemm_packed,
    cuda_capture_begin,
    cuda_capture_end,
    cuda_replay,
    cuda_graph_free,
    CUDA_LANES,
    cuda_lane_use,
    cuda_lane_wait,
    cuda_recurrent_step,
};

extern "C" int backend_cuda_available(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

extern "C" struct backend *backend_cuda_create(char *err, size_t errlen)
{
    if (!backend_cuda_available()) {
        snprintf(err, errlen, "no CUDA GPU is available");
        return NULL;
    }
    struct backend *be = (struct backend *)calloc(1, sizeof *be);
    struct cuda_impl *c = (struct cuda_impl *)calloc(1, sizeof *c);
    if (!be || !c) {
        free(be);
        free(c);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    be->ops = &cuda_ops;
    be->impl = c;
    c->compute = CUBLAS_COMPUTE_32F;
    int dev = 0, major = 0;
    c->overlap = FUSED_OVERLAP && cudaGetDevice(&dev) == cudaSuccess &&
                 cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9;
    if (lane_open(&c->lanes[0], err, errlen) != 0) {
        cuda_destroy(be);
        return NULL;
    }
    return be;
}
