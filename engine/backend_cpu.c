/* backend_cpu.c - the CPU backend: gemm_nt (batch-invariant) and OpenBLAS
 * for matrix products, plain C loops for everything pointwise.
 *
 * "Device" memory is ordinary heap memory here, so upload and download are
 * memcpy.  Each operation is the reference twin of a CUDA kernel in
 * backend_cuda.cu; keep the two reading alike.
 */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "gemm.h"

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

static int cpu_copy(struct backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
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
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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

/* The RRA weights a_{t,1..K} of one row: static ones come from the learned
 * logits; dynamic ones from the query against the states h_{t-1-j}.
 * States before the start are zero vectors: their score is 0, and they keep
 * their place in the softmax. */
static void attention_weights(const struct cell_step *s, const float *q, const float *const *hist, float *a)
{
    int K = s->attn_window;
    if (s->attn_mode == ATTN_STATIC) {
        memcpy(a, s->attn_logits, (size_t)K * sizeof(float));
    } else {
        float scale = 1.0f / sqrtf((float)s->H);
        for (int j = 0; j < K; j++) {
            const float *h = hist[j + 2];
            float dot = 0.0f;
            if (h)
                for (int k = 0; k < s->H; k++)
                    dot += q[k] * h[k];
            a[j] = dot * scale;
        }
    }
    softmax_inplace(a, K);
}

/* One row of each cell, written as flat, branch-free loops over k that the
 * compiler vectorizes; absent terms come as arrays of zeros.  pre holds
 * the LSTM's gate pre-activations (xg + hg + b_hh). */
/* always_inline: compiled into each clone of cpu_cell_step, AVX2 included. */
static inline __attribute__((always_inline)) void lstm_row(float *restrict out, float *restrict c, const float *restrict pre,
                     const float *restrict att, const float *restrict peep, int H)
{
    for (int k = 0; k < H; k++) {
        float cn = sigmoid_approx(pre[H + k]) * c[k] + sigmoid_approx(pre[k]) * tanh_approx(pre[2 * H + k]) +
                   att[k];
        c[k] = cn;
        out[k] = sigmoid_approx(pre[3 * H + k] + peep[k] * cn) * tanh_approx(cn);
    }
}

static inline __attribute__((always_inline)) void gru_row(float *restrict out, const float *restrict xg, const float *restrict hg,
                    const float *restrict b, const float *restrict hp, int H)
{
    for (int k = 0; k < H; k++) {
        float r = sigmoid_approx(xg[k] + hg[k] + b[k]);
        float z = sigmoid_approx(xg[H + k] + hg[H + k] + b[H + k]);
        float nn = tanh_approx(xg[2 * H + k] + r * (hg[2 * H + k] + b[2 * H + k]));
        out[k] = (1.0f - z) * nn + z * hp[k];
    }
}

/* Runs once per layer and step over the whole batch; target_clones builds
 * an AVX2 copy beside the baseline one and picks at load time. */
__attribute__((target_clones("avx2", "default")))
static void cpu_cell_step(struct backend *be, const struct cell_step *s)
{
    const int H = s->H, R = s->R, K = s->attn_window;
    const int G = s->cell == CELL_LSTM ? 4 : s->cell == CELL_GRU ? 3 : 1;
    /* hist[lag] is h_{t-lag} of the row, or NULL before the sequence start. */
    const float *hist[CONFIG_MAX_ATTN_WINDOW + 2 > CONFIG_MAX_SKIP_PERIOD + 1
                      ? CONFIG_MAX_ATTN_WINDOW + 2 : CONFIG_MAX_SKIP_PERIOD + 1];
    float a[CONFIG_MAX_ATTN_WINDOW];
    float *pre = be->impl, *att = pre + 4 * (size_t)H, *zero = att + H;
    memset(zero, 0, (size_t)H * sizeof(float));
    for (int i = 0; i < s->n; i++) {
        const int slot = s->slot ? s->slot[i] : i;
        const int t = s->t ? s->t[i] : s->t0;
        float *ring = s->ring + (size_t)slot * R * H;
        for (int lag = 1; lag < R; lag++)
            hist[lag] = t - lag >= 1 ? ring + (size_t)((t - lag) % R) * H : NULL;
        const float *xg = s->xg + (size_t)i * G * H;
        const float *hg = s->hg + (size_t)i * G * H;
        const float *b = s->b_hh;
        float *out = s->out + (size_t)i * H;

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
            gru_row(out, xg, hg, b, hist[1] ? hist[1] : zero, H);
            break;
        case CELL_LSTM: {
            for (int k = 0; k < 4 * H; k++)
                pre[k] = xg[k] + hg[k] + b[k];
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
            lstm_row(out, s->c + (size_t)slot * H, pre, att, s->peephole ? s->peephole : zero, H);
            break;
        }
        }
        if (s->skip_period > 1 && t % s->skip_period == 0 && hist[s->skip_period])
            for (int k = 0; k < H; k++)
                out[k] += hist[s->skip_period][k];
        memcpy(ring + (size_t)(t % R) * H, out, (size_t)H * sizeof(float));
    }
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

static int cpu_sync(struct backend *be)
{
    (void)be;
    return 0;
}

static const struct backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
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
};

struct backend *backend_cpu_create(char *err, size_t errlen)
{
    struct backend *be = calloc(1, sizeof *be);
    /* impl: scratch for cpu_cell_step, one row of gate pre-activations,
     * attention sums and zeros (6 H). */
    if (!be || !(be->impl = malloc(6 * sizeof(float) * CONFIG_MAX_HIDDEN))) {
        free(be);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    be->ops = &cpu_ops;
    return be;
}
