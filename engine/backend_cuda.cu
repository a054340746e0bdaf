/* backend_cuda.cu - the CUDA backend: cuBLAS for matrix products, one
 * kernel for each pointwise operation of backend.h that a forward runs,
 * the precision's BF16 twins of the weights, recorded graphs and the
 * lanes; its table of ops.  The recurrence fused is cuda_fused.cu's, the
 * backward's kernels cuda_train.cu's (backend_cuda.cuh says what they
 * share).
 *
 * Every kernel here has a CPU twin in backend_cpu.c that computes the same
 * thing the same way; read them side by side.  All work is queued on the
 * backend's streams (one backend per batcher thread): lane 0, and the
 * lanes a forward runs layers or directions on at once (lane_use), so
 * nothing blocks until a download or sync.  Index arrays reach the device
 * through the engine's scratch buffers, uploaded once per call, never per
 * step.
 */
#include "backend_cuda.cuh"

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

void cuda_zero(struct backend *be, void *dst, size_t bytes)
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

/* The library's entry points (backend.h), the only symbols it exports: the
 * Makefile builds the CUDA files with hidden visibility. */
#define CUDA_LIBRARY_EXPORT extern "C" __attribute__((visibility("default")))
CUDA_LIBRARY_EXPORT cuda_gpu_present_fn cuda_gpu_present;
CUDA_LIBRARY_EXPORT cuda_backend_create_fn cuda_backend_create;

int cuda_gpu_present(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct backend *cuda_backend_create(char *err, size_t errlen)
{
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
