/* backend_cpu.c - the CPU backend: gemm_nt (batch-invariant) and OpenBLAS
 * for matrix products, plain C loops for everything pointwise.
 *
 * "Device" memory is ordinary heap memory here, so upload and download are
 * memcpy.  Each operation is the reference twin of a CUDA kernel in
 * backend_cuda.cu, cuda_fused.cu or cuda_train.cu; keep the two reading
 * alike.
 */
#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cell_grad.h"
#include "gemm.h"
#include "pool.h"

static void cpu_destroy(struct backend *be)
{
    free(be->impl);
    free(be);
}

static void *cpu_alloc(struct backend *be, size_t bytes)
{
    (void)be;
    /* 64-byte alignment keeps rows of SIMD loops and BLAS panels aligned. */
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0)
        return NULL;
    return p;
}

static void cpu_free(struct backend *be, void *p)
{
    (void)be;
    free(p);
}

static void *cpu_host_alloc(struct backend *be, size_t bytes)
{
    (void)be;
    return malloc(bytes ? bytes : 1);
}

static int cpu_upload(struct backend *be, void *dst, const void *src, size_t bytes)
{
    be->bytes_up += bytes;
    be->copies_up++;
    if (bytes)
        memcpy(dst, src, bytes);
    return 0;
}

static int cpu_download(struct backend *be, void *dst, const void *src, size_t bytes)
{
    be->bytes_down += bytes;
    be->copies_down++;
    if (bytes)
        memcpy(dst, src, bytes);
    return 0;
}

static void cpu_zero(struct backend *be, void *dst, size_t bytes)
{
    (void)be;
    if (bytes)
        memset(dst, 0, bytes);
}

/* The products gemm_nt does not take (training's gradients) go to OpenBLAS,
 * single-threaded, a band of C's rows or columns for each task of the pool.
 * With OpenBLAS's own threads, they spun on after each product against the
 * pool's, which runs the cell kernels in between, every step: 14-17% of a
 * training profile on 2 cores was their sched_yield.  No band splits the
 * sum over K, so each element's sum is one call's.
 *
 * The bands follow from the product's shape alone, never from the number
 * of threads: OpenBLAS's bits for an element depend on the extent of the
 * call it is in (0.3.21, measured: with its AVX2 kernels, bands of rows
 * that are not multiples of 12 and any bands of columns; with its AVX-512
 * kernels, 600 x 40 x 200 in bands of 160 rows against whole), so only the
 * same bands give a training run the same bits on any number of threads.
 * Each call packs the other operand anew, so a band costs more the more
 * there are: at most BLAS_BANDS, none narrower than
 * BLAS_BAND_MIN rows or columns nor of fewer than POOL_MIN_FLOPS.  On 2
 * cores, against 2 bands: the recurrent matrix's gradient (2048 x 512 over
 * 4,064 tokens) takes 5% longer in 8 bands and 13% in 16 of 128 rows. */
#define BLAS_BANDS 8
#define BLAS_BAND_MIN 128

struct blas_job {
    int trans_a, trans_b, M, N, K;
    float alpha, beta;
    const float *A;
    int lda;
    const float *B;
    int ldb;
    float *C;
    int ldc;
    int by_rows;  /* bands of C's rows (op(A)'s), else of its columns (op(B)'s) */
    int per_task; /* rows or columns a band */
};

static void blas_task(void *ctx, int task, int worker)
{
    (void)worker;
    const struct blas_job *j = ctx;
    const int lo = task * j->per_task, extent = j->by_rows ? j->M : j->N;
    const int n = extent - lo < j->per_task ? extent - lo : j->per_task;
    const float *A = j->A, *B = j->B;
    float *C = j->C;
    if (j->by_rows) {
        A += j->trans_a ? (size_t)lo : (size_t)lo * j->lda;
        C += (size_t)lo * j->ldc;
    } else {
        B += j->trans_b ? (size_t)lo * j->ldb : (size_t)lo;
        C += lo;
    }
    cblas_sgemm(CblasRowMajor, j->trans_a ? CblasTrans : CblasNoTrans, j->trans_b ? CblasTrans : CblasNoTrans,
                j->by_rows ? n : j->M, j->by_rows ? j->N : n, j->K, j->alpha, A, j->lda, B, j->ldb, j->beta, C,
                j->ldc);
}

/* blas_task's calls are the pool's threads; OpenBLAS gets none of its own.
 * Once a process, since a server creates backends as it loads models. */
static void blas_single_threaded(void)
{
    openblas_set_num_threads(1);
}

static void cpu_gemm(struct backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc)
{
    (void)be;
    if (M <= 0 || N <= 0)
        return;
    /* Inference multiplies activations by weights, x W^T: gemm_nt keeps
     * each row's result independent of the batch it runs in.  The other
     * forms (training's gradients) go to OpenBLAS. */
    if (!trans_a && trans_b && alpha == 1.0f && (beta == 0.0f || beta == 1.0f)) {
        gemm_nt(M, N, K, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    const int by_rows = M >= N, extent = by_rows ? M : N;
    double most = 2.0 * M * N * K / POOL_MIN_FLOPS;
    if (most > extent / BLAS_BAND_MIN)
        most = extent / BLAS_BAND_MIN;
    const int bands = most < 1 ? 1 : most > BLAS_BANDS ? BLAS_BANDS : (int)most;
    const int per_task = ((extent + bands - 1) / bands + 15) / 16 * 16;
    struct blas_job j = {trans_a, trans_b, M, N, K, alpha, beta, A, lda, B, ldb, C, ldc, by_rows, per_task};
    pool_run((extent + per_task - 1) / per_task, blas_task, &j);
}

static void *cpu_pack_weights(struct backend *be, const float *B, int N, int K, size_t *bytes)
{
    *bytes = gemm_pack_floats(N, K) * sizeof(float);
    float *p = cpu_alloc(be, *bytes);
    if (p)
        gemm_pack(N, K, B, K, p);
    return p;
}

static void cpu_gemm_packed(struct backend *be, int M, int N, int K, const float *A, int lda, const void *packed,
                            float beta, float *C, int ldc)
{
    (void)be;
    gemm_nt_packed(M, N, K, A, lda, packed, beta, C, ldc);
}

static void cpu_gather_rows(struct backend *be, float *dst, int ldd, const float *src, int lds,
                            const int *idx, int n, int width)
{
    (void)be;
    for (int r = 0; r < n; r++)
        memcpy(dst + (size_t)r * ldd, src + (size_t)(idx ? idx[r] : r) * lds, (size_t)width * sizeof(float));
}

static void cpu_set_rows(struct backend *be, float *dst, int ldd, const float *bias, int n, int width)
{
    (void)be;
    for (int r = 0; r < n; r++)
        memcpy(dst + (size_t)r * ldd, bias, (size_t)width * sizeof(float));
}

static void cpu_add_rows(struct backend *be, float *y, int ldy, const float *x, int ldx, int n, int width)
{
    (void)be;
    for (int r = 0; r < n; r++) {
        float *yr = y + (size_t)r * ldy;
        const float *xr = x + (size_t)r * ldx;
        for (int k = 0; k < width; k++)
            yr[k] += xr[k];
    }
}

/* exp(x) for float, vectorizable: libm's expf is a call the compiler
 * cannot vectorize, and the cell's sigmoids and tanhs were the engine's
 * largest cost after the matrix products.  Range reduction x = n ln2 + r
 * (ln2 in two parts), a degree-6 polynomial for e^r (Cephes' expf
 * coefficients), and 2^n assembled in the exponent bits; within 2 ulp of
 * expf over the clamped range.  Only +, -, * and / appear, none fused, so
 * every vector width and the scalar tail give each element the same bits
 * and results stay independent of the batch. */
static inline float exp_approx(float x)
{
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    /* Round x / ln2 to nearest by adding and removing 1.5 * 2^23. */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

static inline float sigmoid_approx(float x)
{
    return 1.0f / (1.0f + exp_approx(-x));
}

/* tanh from e^{-2|x|}: no overflow, and odd by construction. */
static inline float tanh_approx(float x)
{
    float e = exp_approx(-2.0f * fabsf(x));
    return copysignf((1.0f - e) / (1.0f + e), x);
}

/* Softmax of n values in place, subtracting the maximum first so that
 * large logits do not overflow. */
static void softmax_inplace(float *x, int n)
{
    float mx = x[0];
    for (int j = 1; j < n; j++)
        if (x[j] > mx)
            mx = x[j];
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        x[j] = expf(x[j] - mx);
        sum += x[j];
    }
    for (int j = 0; j < n; j++)
        x[j] /= sum;
}

/* q . h over n values in 8 lanes, lane l summing k = l (mod 8) in order,
 * then one fixed tree: written so that the compiler vectorizes it (a plain
 * running sum is a chain it may not reorder) and every vector width gives
 * the same bits (nothing is fused: -std=c11 turns contraction off). */
static inline __attribute__((always_inline)) float dot8(const float *q, const float *h, int n)
{
    float lane[8] = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++)
            lane[l] += q[k + l] * h[k + l];
    for (; k < n; k++)
        lane[k % 8] += q[k] * h[k];
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

/* The RRA weights a_{t,1..K} of one row: static ones come from the learned
 * logits; dynamic ones from the query against the states h_{t-1-j}.
 * States before the start are zero vectors: their score is 0, and they keep
 * their place in the softmax.  Inlined into each clone of cell_rows. */
static inline __attribute__((always_inline)) void attention_weights(const struct cell_step *s, const float *q,
                                                                    const float *const *hist, float *a)
{
    int K = s->attn_window;
    if (s->attn_mode == ATTN_STATIC) {
        memcpy(a, s->attn_logits, (size_t)K * sizeof(float));
    } else {
        float scale = 1.0f / sqrtf((float)s->H);
        for (int j = 0; j < K; j++) {
            const float *h = hist[j + 2];
            a[j] = (h ? dot8(q, h, s->H) : 0.0f) * scale;
        }
    }
    softmax_inplace(a, K);
}

/* One row of each cell, written as flat, branch-free loops over k that the
 * compiler vectorizes.  always_inline: compiled into each clone of
 * cell_rows, AVX2 included, and specialized for each constant `full`: 0
 * for inference without attention or peepholes, which reads no attention
 * sum att or peephole and keeps no training cache, yet still adds their
 * +0 and multiplies by their 0, so that both forms give the same bits. */
static inline __attribute__((always_inline)) void lstm_row(int full, float *restrict out, float *restrict c,
                                                           const float *restrict xg, const float *restrict hg,
                                                           const float *restrict b, const float *restrict att,
                                                           const float *restrict peep, float *restrict cache,
                                                           int H)
{
    for (int k = 0; k < H; k++) {
        float ig = sigmoid_approx(xg[k] + hg[k] + b[k]), fg = sigmoid_approx(xg[H + k] + hg[H + k] + b[H + k]);
        float gg = tanh_approx(xg[2 * H + k] + hg[2 * H + k] + b[2 * H + k]);
        float cn = fg * c[k] + ig * gg + (full ? att[k] : 0.0f);
        float og = sigmoid_approx(xg[3 * H + k] + hg[3 * H + k] + b[3 * H + k] + (full ? peep[k] : 0.0f) * cn);
        c[k] = cn;
        out[k] = og * tanh_approx(cn);
        if (full)
            lstm_cache_element(H, k, cache, ig, fg, gg, og, cn);
    }
}

static inline __attribute__((always_inline)) void gru_row(float *restrict out, const float *restrict xg,
                                                          const float *restrict hg, const float *restrict b,
                                                          const float *restrict hp, float *restrict cache, int H)
{
    for (int k = 0; k < H; k++) {
        float r = sigmoid_approx(xg[k] + hg[k] + b[k]);
        float z = sigmoid_approx(xg[H + k] + hg[H + k] + b[H + k]);
        float hn = hg[2 * H + k] + b[2 * H + k];
        float nn = tanh_approx(xg[2 * H + k] + r * hn);
        out[k] = (1.0f - z) * nn + z * hp[k];
        gru_cache_element(H, k, cache, r, z, nn, hn);
    }
}

/* Scratch floats a worker needs for one row of a cell step: gate
 * pre-activations (4 H), attention sums, zeros and a cache row. */
#define CELL_SCRATCH (11 * (size_t)CONFIG_MAX_HIDDEN)

/* Below this many gate values a step is not worth splitting over threads. */
#define CELL_PARALLEL_MIN 8192

/* target_clones builds AVX-512 and AVX2 copies beside the baseline one
 * and picks at load time (no operation is fused, so all three give the
 * same bits).  Not under ThreadSanitizer: GCC instruments the clones'
 * resolver, which the loader runs before TSan's runtime is up, and the
 * program faults before main. */
#ifdef __SANITIZE_THREAD__
#define CELL_CLONES
#else
#define CELL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

/* Rows i0..i1-1 of a cell step; scratch is the worker's own.  Runs once
 * per layer, step and worker. */
CELL_CLONES
static void cell_rows(const void *arg, int i0, int i1, float *scratch)
{
    const struct cell_step *s = arg;
    const int H = s->H, R = s->R, K = s->attn_window;
    const int G = cell_gates(s->cell);
    /* hist[lag] is h_{t-lag} of the row, or NULL before the sequence start. */
    const float *hist[CONFIG_MAX_ATTN_WINDOW + 2 > CONFIG_MAX_SKIP_PERIOD + 1
                      ? CONFIG_MAX_ATTN_WINDOW + 2 : CONFIG_MAX_SKIP_PERIOD + 1];
    float a[CONFIG_MAX_ATTN_WINDOW];
    /* Without a cache to fill, the rows write theirs to scratch: one code
     * path, and the stores stay in L1. */
    float *att = scratch, *zero = att + H, *row_cache = zero + H;
    memset(zero, 0, (size_t)H * sizeof(float));
    const size_t cw = CELL_CACHE(s->cell, H);
    for (int i = i0; i < i1; i++) {
        const int slot = s->slot ? s->slot[i] : i;
        const int t = s->t ? s->t[i] : s->t0;
        float *ring = s->ring + (size_t)slot * R * H;
        for (int lag = 1; lag < R; lag++)
            hist[lag] = t - lag >= 1 ? ring + (size_t)((t - lag) % R) * H : NULL;
        const float *xg = s->xg + (size_t)i * G * H;
        const float *hg = s->hg + (size_t)i * G * H;
        const float *b = s->b_hh;
        float *out = s->out + (size_t)i * H;
        float *cache = s->cache ? s->cache + i * cw : row_cache;

        switch (s->cell) {
        case CELL_RNN_TANH:
            for (int k = 0; k < H; k++)
                out[k] = tanh_approx(xg[k] + hg[k] + b[k]);
            break;
        case CELL_RNN_RELU:
            for (int k = 0; k < H; k++)
                out[k] = fmaxf(0.0f, xg[k] + hg[k] + b[k]);
            break;
        case CELL_GRU:
            gru_row(out, xg, hg, b, hist[1] ? hist[1] : zero, cache, H);
            break;
        case CELL_LSTM: {
            float *c = s->c + (size_t)slot * H;
            if (!K && !s->peephole && !s->cache) {
                /* Inference without attention or peepholes: nothing to
                 * read but the gates and the state, nothing to keep. */
                lstm_row(0, out, c, xg, hg, b, NULL, NULL, NULL, H);
                break;
            }
            memset(att, 0, (size_t)H * sizeof(float));
            if (K) {
                attention_weights(s, s->q ? s->q + (size_t)i * H : NULL, hist, a);
                if (s->attn)
                    memcpy(s->attn + (size_t)i * K, a, (size_t)K * sizeof(float));
                for (int j = 0; j < K; j++)
                    if (hist[j + 2])
                        for (int k = 0; k < H; k++)
                            att[k] += a[j] * hist[j + 2][k];
            }
            lstm_row(1, out, c, xg, hg, b, att, s->peephole ? s->peephole : zero, cache, H);
            break;
        }
        }
        if (s->cache && G == 1)
            memcpy(cache, out, (size_t)H * sizeof(float));
        if (s->skip_period > 1 && t % s->skip_period == 0 && hist[s->skip_period])
            for (int k = 0; k < H; k++)
                out[k] += hist[s->skip_period][k];
        memcpy(ring + (size_t)(t % R) * H, out, (size_t)H * sizeof(float));
    }
}

/* Rows a..b of a cell kernel; scratch is the running worker's own. */
typedef void (*rows_fn)(const void *arg, int i0, int i1, float *scratch);

struct rows_job {
    rows_fn rows;
    const void *arg;
    float *scratch; /* CELL_SCRATCH floats a worker */
    int n, per_task;
};

static void rows_task(void *ctx, int task, int worker)
{
    const struct rows_job *j = ctx;
    int i0 = task * j->per_task, i1 = j->n - i0 < j->per_task ? j->n : i0 + j->per_task;
    j->rows(j->arg, i0, i1, j->scratch + (size_t)worker * CELL_SCRATCH);
}

/* Runs rows over n rows of width values each: split over the worker pool
 * when there is enough work and the rows are independent (each its own
 * slot, state, outputs and gradient rows), so the result is the same bits
 * however they are split. */
static void run_rows(struct backend *be, int n, size_t width, int independent, rows_fn rows, const void *arg)
{
    int tasks = 1, threads = pool_threads();
    if (independent && threads > 1 && (size_t)n * width >= CELL_PARALLEL_MIN)
        tasks = 2 * threads < n ? 2 * threads : n;
    struct rows_job job = {rows, arg, be->impl, n, (n + tasks - 1) / tasks};
    pool_run((n + job.per_task - 1) / job.per_task, rows_task, &job);
}

static void cpu_cell_step(struct backend *be, const struct cell_step *s)
{
    const int G = cell_gates(s->cell);
    run_rows(be, s->n, (size_t)G * s->H, 1, cell_rows, s);
}

static void cpu_pool_mean(struct backend *be, float *dst, const float *src, int width,
                          const int *off, const int *len, int n)
{
    (void)be;
    for (int i = 0; i < n; i++) {
        float *d = dst + (size_t)i * width;
        memset(d, 0, (size_t)width * sizeof(float));
        for (int s = 0; s < len[i]; s++) {
            const float *x = src + (size_t)(off[s] + i) * width;
            for (int k = 0; k < width; k++)
                d[k] += x[k];
        }
        for (int k = 0; k < width; k++)
            d[k] /= (float)len[i];
    }
}

static void cpu_softmax_rows(struct backend *be, float *x, int n, int width)
{
    (void)be;
    for (int r = 0; r < n; r++)
        softmax_inplace(x + (size_t)r * width, width);
}

static void cpu_log_softmax_pick(struct backend *be, const float *x, int n, int width,
                                 const int *target, float *out)
{
    (void)be;
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * width;
        if (target[r] < 0) {
            out[r] = 0.0f;
            continue;
        }
        float mx = xr[0];
        for (int j = 1; j < width; j++)
            if (xr[j] > mx)
                mx = xr[j];
        /* Sum in double: over a 100k-word vocabulary float loses digits. */
        double sum = 0.0;
        for (int j = 0; j < width; j++)
            sum += exp((double)(xr[j] - mx));
        out[r] = (float)((double)(xr[target[r]] - mx) - log(sum));
    }
}

/* Rows i0..i1-1 of the backward twin of cell_rows (see struct cell_grad). */
static void cell_grad_rows(const void *arg, int i0, int i1, float *scratch)
{
    const struct cell_grad *g = arg;
    const int H = g->H, K = g->attn_window, s = g->s;
    const size_t cw = CELL_CACHE(g->cell, H);
    const size_t GH = (size_t)cell_gates(g->cell) * H;
    const float scale = 1.0f / sqrtf((float)H);
    float *dct = scratch; /* one row of dL/dc_t, for the attention */
    for (int i = i0; i < i1; i++) {
        float *dh = g->dh + (size_t)(g->off[s] + i) * H;
        const float *hprev = g->h + (size_t)(g->off[s - 1] + i) * H;
        float *dhprev = g->dh + (size_t)(g->off[s - 1] + i) * H;
        const float *cache = g->cache + i * cw;
        float *dxg = g->dxg + i * GH, *dhg = g->dhg + i * GH;
        /* h_t = cell + h_{t-K}: the skip passes dh on unchanged. */
        if (g->skip_period > 1 && g->t0 % g->skip_period == 0) {
            float *d = g->dh + (size_t)(g->off[s - g->skip_period] + i) * H;
            for (int k = 0; k < H; k++)
                d[k] += dh[k];
        }
        switch (g->cell) {
        case CELL_RNN_TANH:
            for (int k = 0; k < H; k++)
                dxg[k] = dhg[k] = dh[k] * (1.0f - cache[k] * cache[k]);
            break;
        case CELL_RNN_RELU:
            for (int k = 0; k < H; k++)
                dxg[k] = dhg[k] = cache[k] > 0.0f ? dh[k] : 0.0f;
            break;
        case CELL_GRU:
            for (int k = 0; k < H; k++)
                gru_grad_element(H, k, dh[k], cache, hprev[k], &dhprev[k], dxg, dhg);
            break;
        case CELL_LSTM: {
            float *dc = g->dc + (size_t)i * H;
            const float *cprev = g->cache_prev ? g->cache_prev + i * cw + 4 * H : g->c0 ? g->c0 + (size_t)i * H : NULL;
            for (int k = 0; k < H; k++) {
                float c = cache[4 * H + k], dpo;
                dct[k] = lstm_grad_element(H, k, dh[k], cache, tanh_approx(c), cprev ? cprev[k] : 0.0f,
                                           g->peephole != NULL, g->peephole ? g->peephole[k] : 0.0f, &dc[k], &dpo,
                                           dxg, dhg);
                if (g->peephole)
                    g->d_peephole[k] += dpo * c;
            }
            if (!K)
                break;
            /* c_t += sum_j a_j h_{t-1-j}: the states get a_j dc_t, the
             * weights dc_t . h_{t-1-j}, then through the softmax. */
            const float *a = g->attn + (size_t)i * K;
            float da[CONFIG_MAX_ATTN_WINDOW], dot = 0.0f;
            for (int j = 0; j < K; j++) {
                const float *hj = g->h + (size_t)(g->off[s - 2 - j] + i) * H;
                float *dhj = g->dh + (size_t)(g->off[s - 2 - j] + i) * H;
                da[j] = 0.0f;
                for (int k = 0; k < H; k++) {
                    da[j] += dct[k] * hj[k];
                    dhj[k] += a[j] * dct[k];
                }
                dot += a[j] * da[j];
            }
            for (int j = 0; j < K; j++)
                da[j] = a[j] * (da[j] - dot); /* now d score_j */
            if (g->attn_mode == ATTN_STATIC) {
                for (int j = 0; j < K; j++)
                    g->d_attn_logits[j] += da[j];
                break;
            }
            /* score_j = q . h_{t-1-j} / sqrt(H) */
            const float *q = g->q + (size_t)i * H;
            float *dq = g->dq + (size_t)i * H;
            memset(dq, 0, (size_t)H * sizeof(float));
            for (int j = 0; j < K; j++) {
                const float *hj = g->h + (size_t)(g->off[s - 2 - j] + i) * H;
                float *dhj = g->dh + (size_t)(g->off[s - 2 - j] + i) * H;
                for (int k = 0; k < H; k++) {
                    dq[k] += da[j] * scale * hj[k];
                    dhj[k] += da[j] * scale * q[k];
                }
            }
            break;
        }
        }
    }
}

/* The peephole and static attention gradients sum over the rows, in row
 * order: split, they would add in another order and change the bits, so
 * those models' steps run on one thread. */
static void cpu_cell_step_backward(struct backend *be, const struct cell_grad *g)
{
    const int G = cell_gates(g->cell);
    int shared_sums = g->peephole || (g->attn_window && g->attn_mode == ATTN_STATIC);
    run_rows(be, g->n, (size_t)G * g->H, !shared_sums, cell_grad_rows, g);
}

static void cpu_add_column_sums(struct backend *be, float *dst, const float *src, int n, int width)
{
    (void)be;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < width; k++)
            dst[k] += src[(size_t)r * width + k];
}

static void cpu_scatter_add_rows(struct backend *be, float *dst, int ldd, const float *src, int lds, const int *idx,
                                 int n, int width)
{
    (void)be;
    for (int r = 0; r < n; r++) {
        float *d = dst + (size_t)(idx ? idx[r] : r) * ldd;
        for (int k = 0; k < width; k++)
            d[k] += src[(size_t)r * lds + k];
    }
}

static void cpu_pool_mean_backward(struct backend *be, float *dst, const float *src, int width, const int *off,
                                   const int *len, int n)
{
    (void)be;
    for (int i = 0; i < n; i++)
        for (int s = 0; s < len[i]; s++) {
            float *d = dst + (size_t)(off[s] + i) * width;
            for (int k = 0; k < width; k++)
                d[k] += src[(size_t)i * width + k] / (float)len[i];
        }
}

/* A uniform [0, 1) draw from (seed, index) alone: splitmix64's mixer, so
 * the mask needs no state and the backward draws the same one. */
static float hash_uniform(unsigned long long seed, size_t i)
{
    unsigned long long z = seed + 0x9e3779b97f4a7c15ULL * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (float)(z >> 40) * 0x1.0p-24f;
}

static void cpu_dropout(struct backend *be, float *y, const float *x, size_t n, float p, unsigned long long seed)
{
    (void)be;
    float keep = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++)
        y[i] = hash_uniform(seed, i) < p ? 0.0f : x[i] * keep;
}

static void cpu_softmax_xent(struct backend *be, const float *x, int n, int width, const int *target, float *loss,
                             float *dx, float scale)
{
    (void)be;
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * width;
        float *d = dx + (size_t)r * width;
        if (target[r] < 0) {
            loss[r] = 0.0f;
            memset(d, 0, (size_t)width * sizeof(float));
            continue;
        }
        float mx = xr[0];
        for (int k = 1; k < width; k++)
            mx = xr[k] > mx ? xr[k] : mx;
        double sum = 0.0;
        for (int k = 0; k < width; k++)
            sum += exp((double)(xr[k] - mx));
        for (int k = 0; k < width; k++)
            d[k] = scale * (float)(exp((double)(xr[k] - mx)) / sum);
        d[target[r]] -= scale;
        loss[r] = (float)(log(sum) - (double)(xr[target[r]] - mx));
    }
}

static void cpu_squared_error(struct backend *be, const float *x, const float *y, int n, int width, float *loss,
                              float *dx, float scale)
{
    (void)be;
    for (int r = 0; r < n; r++) {
        double sum = 0.0;
        for (int k = 0; k < width; k++) {
            float e = x[(size_t)r * width + k] - y[(size_t)r * width + k];
            sum += (double)e * e;
            dx[(size_t)r * width + k] = scale * 2.0f * e;
        }
        loss[r] = (float)sum;
    }
}

/* The optimizer walks the parameters in chunks of this many, the chunks
 * split over the worker pool as rows are: each parameter's update is its
 * own, so the split changes no bit. */
#define OPTIM_CHUNK 4096

struct optim_job {
    struct optim_update u;
    float *p;
    const float *grad;
    float *state;
    size_t n;
    double scale; /* clipping's */
};

static void optim_chunks(const void *arg, int c0, int c1, float *scratch)
{
    const struct optim_job *j = arg;
    const struct optim_update u = j->u;
    const size_t end = (size_t)c1 * OPTIM_CHUNK < j->n ? (size_t)c1 * OPTIM_CHUNK : j->n;
    (void)scratch;
    for (size_t i = (size_t)c0 * OPTIM_CHUNK; i < end; i++)
        optim_update_element(u, j->n, i, j->p + i, (float)(j->grad[i] * j->scale), j->state);
}

static void cpu_optim_step(struct backend *be, const struct optim_update *u, float *params, const float *grad,
                           float *state, size_t n, double *sum_squares)
{
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += (double)grad[i] * grad[i];
    *sum_squares = sum;
    const struct optim_job job = {*u, params, grad, state, n, optim_clip_scale(sum, u->clip_norm)};
    if (n > 0 && isfinite(sum))
        run_rows(be, (int)((n + OPTIM_CHUNK - 1) / OPTIM_CHUNK), OPTIM_CHUNK, 1, optim_chunks, &job);
}

/* Work is done when an operation returns; what is left to report is an
 * error an operation recorded, as the CUDA backend's sync reports its. */
static int cpu_sync(struct backend *be)
{
    return be->err[0] ? -1 : 0;
}

static const struct backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .zero = cpu_zero,
    .gemm = cpu_gemm,
    .gather_rows = cpu_gather_rows,
    .set_rows = cpu_set_rows,
    .add_rows = cpu_add_rows,
    .cell_step = cpu_cell_step,
    .pool_mean = cpu_pool_mean,
    .softmax_rows = cpu_softmax_rows,
    .log_softmax_pick = cpu_log_softmax_pick,
    .sync = cpu_sync,
    .cell_step_backward = cpu_cell_step_backward,
    .add_column_sums = cpu_add_column_sums,
    .scatter_add_rows = cpu_scatter_add_rows,
    .pool_mean_backward = cpu_pool_mean_backward,
    .dropout = cpu_dropout,
    .softmax_xent = cpu_softmax_xent,
    .squared_error = cpu_squared_error,
    .optim_step = cpu_optim_step,
    .project_each_step = 1,
    .pad_steps = 0,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_free,
    .pack_weights = cpu_pack_weights,
    .gemm_packed = cpu_gemm_packed,
};

struct backend *backend_cpu_create(char *err, size_t errlen)
{
    struct backend *be = calloc(1, sizeof *be);
    /* impl: the cell kernels' scratch, CELL_SCRATCH floats for each
     * thread of the pool (pages are only touched up to the model's H). */
    if (!be || !(be->impl = malloc(CELL_SCRATCH * sizeof(float) * (size_t)pool_size()))) {
        free(be);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    be->ops = &cpu_ops;
    static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
    pthread_once(&blas_once, blas_single_threaded);
    return be;
}
