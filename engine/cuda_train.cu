/* cuda_train.cu - the CUDA backend's training kernels: the twins of
 * backend_cpu.c's backward operations, the losses, dropout, and the
 * optimizer's step with its clipping.
 *
 * Sums over rows (the peephole and static attention gradients, column
 * sums, the embedding's scatter) run one thread per column over the rows
 * in order, as the CPU does, rather than with atomics: the result does not
 * depend on how the blocks were scheduled.
 */
#include "backend_cuda.cuh"

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

void cuda_cell_step_backward(struct backend *be, const struct cell_grad *g)
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

void cuda_add_column_sums(struct backend *be, float *dst, const float *src, int n, int width)
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

void cuda_scatter_add_rows(struct backend *be, float *dst, int ldd, const float *src, int lds,
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

void cuda_pool_mean_backward(struct backend *be, float *dst, const float *src, int width, const int *off,
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

void cuda_dropout(struct backend *be, float *y, const float *x, size_t n, float p, unsigned long long seed)
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

void cuda_softmax_xent(struct backend *be, const float *x, int n, int width, const int *target, float *loss,
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

void cuda_squared_error(struct backend *be, const float *x, const float *y, int n, int width, float *loss,
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

void cuda_optim_step(struct backend *be, const struct optim_update *u, float *params, const float *grad,
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

