/* backend_cuda.cu - the CUDA backend: cuBLAS for matrix products, one
 * kernel for each pointwise operation of backend.h.
 *
 * Every kernel here has a CPU twin in backend_cpu.c that computes the same
 * thing the same way; read them side by side.  All work is queued on one
 * stream per backend (one backend per batcher thread), so nothing blocks
 * until a download or sync.  Index arrays reach the device through the
 * engine's scratch buffers, uploaded once per call, never per step.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
}

struct cuda_impl {
    cudaStream_t stream;
    cublasHandle_t blas;
};

static struct cuda_impl *impl_of(struct backend *be)
{
    return (struct cuda_impl *)be->impl;
}

static cudaStream_t stream_of(struct backend *be)
{
    return impl_of(be)->stream;
}

/* Record the first error; sync reports it. */
static int check(struct backend *be, cudaError_t rc, const char *what)
{
    if (rc == cudaSuccess)
        return 0;
    if (!be->err[0])
        snprintf(be->err, sizeof be->err, "%s: %s", what, cudaGetErrorString(rc));
    return -1;
}

static void cuda_destroy(struct backend *be)
{
    struct cuda_impl *c = impl_of(be);
    if (c) {
        if (c->blas)
            cublasDestroy(c->blas);
        if (c->stream)
            cudaStreamDestroy(c->stream);
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
    (void)be;
    if (p)
        cudaFree(p);
}

static int cuda_upload(struct backend *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes)
        return 0;
    return check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(be)), "upload");
}

static int cuda_download(struct backend *be, void *dst, const void *src, size_t bytes)
{
    if (!bytes)
        return 0;
    if (check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_of(be)), "download") != 0)
        return -1;
    /* The caller reads dst as soon as this returns. */
    return check(be, cudaStreamSynchronize(stream_of(be)), "download");
}

static void cuda_zero(struct backend *be, void *dst, size_t bytes)
{
    if (bytes)
        check(be, cudaMemsetAsync(dst, 0, bytes, stream_of(be)), "memset");
}

/* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so the
 * operands swap places and keep their transpose flags. */
static void cuda_gemm(struct backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc)
{
    if (M <= 0 || N <= 0)
        return;
    cublasStatus_t st = cublasSgemm(impl_of(be)->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, ldb, A, lda, &beta,
                                    C, ldc);
    if (st != CUBLAS_STATUS_SUCCESS && !be->err[0])
        snprintf(be->err, sizeof be->err, "cublasSgemm failed with status %d", (int)st);
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
    gather_rows_kernel<<<blocks_for((long)n * width, 256), 256, 0, stream_of(be)>>>(dst, ldd, src, lds, idx, n,
                                                                                    width);
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
    set_rows_kernel<<<blocks_for((long)n * width, 256), 256, 0, stream_of(be)>>>(dst, ldd, bias, n, width);
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
    add_rows_kernel<<<blocks_for((long)n * width, 256), 256, 0, stream_of(be)>>>(y, ldy, x, ldx, n, width);
}

__device__ float sigmoid_dev(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

/* Sum of v over the block; every thread gets the result. */
__device__ float block_sum(float v, float *shared)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++)
        total += shared[w];
    return total;
}

#define CELL_THREADS 256

/* One block per row.  The twin of cpu_cell_step: attention weights first
 * (a reduction over H per window entry), then every k of the row. */
__global__ void cell_step_kernel(struct cell_step s)
{
    __shared__ float red[CELL_THREADS / 32];
    __shared__ float a[CONFIG_MAX_ATTN_WINDOW];
    const int i = blockIdx.x, H = s.H, R = s.R, K = s.attn_window;
    const int G = s.cell == CELL_LSTM ? 4 : s.cell == CELL_GRU ? 3 : 1;
    const int slot = s.slot ? s.slot[i] : i;
    const int t = s.t ? s.t[i] : s.t0;
    float *ring = s.ring + (long)slot * R * H;
#define HIST(lag) (t - (lag) >= 1 ? ring + (long)((t - (lag)) % R) * H : (const float *)0)
    const float *xg = s.xg + (long)i * G * H;
    const float *hg = s.hg + (long)i * G * H;
    const float *b = s.b_hh;
    float *out = s.out + (long)i * H;

    if (s.cell == CELL_LSTM && K) {
        if (s.attn_mode == ATTN_STATIC) {
            for (int j = threadIdx.x; j < K; j += blockDim.x)
                a[j] = s.attn_logits[j];
        } else {
            const float *q = s.q + (long)i * H;
            float scale = 1.0f / sqrtf((float)H);
            for (int j = 0; j < K; j++) {
                const float *h = HIST(j + 2);
                float part = 0.0f;
                if (h)
                    for (int k = threadIdx.x; k < H; k += blockDim.x)
                        part += q[k] * h[k];
                float dot = block_sum(part, red);
                if (threadIdx.x == 0)
                    a[j] = dot * scale;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float mx = a[0], sum = 0.0f;
            for (int j = 1; j < K; j++)
                mx = fmaxf(mx, a[j]);
            for (int j = 0; j < K; j++) {
                a[j] = expf(a[j] - mx);
                sum += a[j];
            }
            for (int j = 0; j < K; j++) {
                a[j] /= sum;
                if (s.attn)
                    s.attn[(long)i * K + j] = a[j];
            }
        }
        __syncthreads();
    }
    const float *skip = s.skip_period > 1 && t % s.skip_period == 0 ? HIST(s.skip_period) : (const float *)0;
    const float *hp = HIST(1);
    float *hnew = ring + (long)(t % R) * H;
    float *c = s.c ? s.c + (long)slot * H : (float *)0;
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        float h;
        switch (s.cell) {
        case CELL_RNN_TANH:
            h = tanhf(xg[k] + hg[k] + b[k]);
            break;
        case CELL_RNN_RELU:
            h = fmaxf(0.0f, xg[k] + hg[k] + b[k]);
            break;
        case CELL_GRU: {
            float r = sigmoid_dev(xg[k] + hg[k] + b[k]);
            float z = sigmoid_dev(xg[H + k] + hg[H + k] + b[H + k]);
            float nn = tanhf(xg[2 * H + k] + r * (hg[2 * H + k] + b[2 * H + k]));
            h = (1.0f - z) * nn + z * (hp ? hp[k] : 0.0f);
            break;
        }
        default: {
            float ig = sigmoid_dev(xg[k] + hg[k] + b[k]);
            float fg = sigmoid_dev(xg[H + k] + hg[H + k] + b[H + k]);
            float gg = tanhf(xg[2 * H + k] + hg[2 * H + k] + b[2 * H + k]);
            float cn = fg * c[k] + ig * gg;
            for (int j = 0; j < K; j++) {
                const float *hj = HIST(j + 2);
                if (hj)
                    cn += a[j] * hj[k];
            }
            float po = xg[3 * H + k] + hg[3 * H + k] + b[3 * H + k];
            if (s.peephole)
                po += s.peephole[k] * cn;
            c[k] = cn;
            h = sigmoid_dev(po) * tanhf(cn);
            break;
        }
        }
        if (skip)
            h += skip[k];
        out[k] = h;
        hnew[k] = h;
    }
#undef HIST
}

static void cuda_cell_step(struct backend *be, const struct cell_step *s)
{
    if (s->n <= 0)
        return;
    cell_step_kernel<<<s->n, CELL_THREADS, 0, stream_of(be)>>>(*s);
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
    pool_mean_kernel<<<n, 256, 0, stream_of(be)>>>(dst, src, width, off, len);
}

__device__ float block_max(float v, float *shared)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    float m = shared[0];
    for (int w = 1; w < (int)(blockDim.x + 31) / 32; w++)
        m = fmaxf(m, shared[w]);
    return m;
}

/* A row's maximum and sum of exp(x - max), for every thread of the block:
 * what both softmax kernels start from. */
__device__ void row_max_sumexp(const float *row, int width, float *shared, float *mx, float *sum)
{
    float m = -INFINITY;
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        m = fmaxf(m, row[k]);
    m = block_max(m, shared);
    float part = 0.0f;
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        part += expf(row[k] - m);
    *sum = block_sum(part, shared);
    *mx = m;
}

__global__ void softmax_rows_kernel(float *x, int width)
{
    __shared__ float red[8];
    float *row = x + (long)blockIdx.x * width, mx, sum;
    row_max_sumexp(row, width, red, &mx, &sum);
    for (int k = threadIdx.x; k < width; k += blockDim.x)
        row[k] = expf(row[k] - mx) / sum;
}

static void cuda_softmax_rows(struct backend *be, float *x, int n, int width)
{
    if (n <= 0)
        return;
    softmax_rows_kernel<<<n, 256, 0, stream_of(be)>>>(x, width);
}

__global__ void log_softmax_pick_kernel(const float *x, int width, const int *target, float *out)
{
    __shared__ float red[8];
    const int r = blockIdx.x;
    if (target[r] < 0) {
        if (threadIdx.x == 0)
            out[r] = 0.0f;
        return;
    }
    const float *row = x + (long)r * width;
    float mx, sum;
    row_max_sumexp(row, width, red, &mx, &sum);
    if (threadIdx.x == 0)
        out[r] = (row[target[r]] - mx) - logf(sum);
}

static void cuda_log_softmax_pick(struct backend *be, const float *x, int n, int width, const int *target,
                                  float *out)
{
    if (n <= 0)
        return;
    log_softmax_pick_kernel<<<n, 256, 0, stream_of(be)>>>(x, width, target, out);
}

static int cuda_sync(struct backend *be)
{
    check(be, cudaStreamSynchronize(stream_of(be)), "stream");
    check(be, cudaGetLastError(), "kernel");
    return be->err[0] ? -1 : 0;
}

static const struct backend_ops cuda_ops = {
    "cuda",
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
    /* The backward operations: training runs on the CPU backend for now. */
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
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
    cudaError_t rc = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (rc != cudaSuccess) {
        snprintf(err, errlen, "cannot create a CUDA stream: %s", cudaGetErrorString(rc));
        cuda_destroy(be);
        return NULL;
    }
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(c->blas, c->stream) != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "cannot initialise cuBLAS");
        cuda_destroy(be);
        return NULL;
    }
    return be;
}
