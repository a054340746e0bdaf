/* backend.h - the small interface every compute backend implements.
 *
 * The engine (forward.c, step.c) holds the whole algorithm: which layer runs
 * when, how sequences are packed, where states live.  A backend only knows
 * how to allocate memory it can compute on, move bytes in and out of it, and
 * run a dozen primitive operations on it.  The CPU backend (backend_cpu.c,
 * OpenBLAS) and the CUDA backend (backend_cuda.cu, cuBLAS) implement the
 * same operations, so the same tests run on both.
 *
 * All pointers given to an operation are backend ("device") pointers,
 * index arrays included.  Matrices are row-major.
 */
#ifndef RRN_BACKEND_H
#define RRN_BACKEND_H

#include <stddef.h>

#include "config.h"

/* One fused pointwise step of one layer in one direction, for n rows
 * (sequences).  Row i is the i-th row of xg, hg, q, out and attn; its
 * persistent state lives in a slot: its cell state at c + slot_i*H and its
 * history ring (the last R outputs h of the layer) at ring + slot_i*R*H,
 * with h_t at ring row (t mod R).  slot and t may be NULL, meaning slot_i = i
 * and t_i = t0 for every row (the batched forward, where all rows advance
 * together); otherwise they are per-row device arrays (the step API).
 *
 * The operation computes the cell (MODELS.md) from the input projection xg
 * (b_ih included) and the recurrent product hg (b_hh not included), adds
 * the RRA attention term to c and the temporal skip term to h, and writes
 * the new h to out, to the ring, and the new c to its slot. */
struct cell_step {
    enum cell cell;
    int n, H;
    const float *xg;          /* [n, G*H] */
    const float *hg;          /* [n, G*H] */
    const float *b_hh;        /* [G*H] */
    const float *peephole;    /* [H] or NULL */
    float *c;                 /* lstm: per-slot cell state */
    float *ring;              /* per-slot history of h, R rows each */
    int R;
    const int *slot;          /* [n] or NULL */
    const int *t;             /* [n] or NULL: 1-based step of each row */
    int t0;
    int skip_period;          /* 1: no temporal skip */
    enum attn_mode attn_mode;
    int attn_window;          /* K */
    const float *attn_logits; /* [K] (static) */
    const float *q;           /* [n, H] (dynamic): W_q h_{t-1} */
    float *attn;              /* [n, K] weights out, or NULL */
    float *out;               /* [n, H] */
};

struct backend;

struct backend_ops {
    const char *name;
    void (*destroy)(struct backend *be);
    void *(*alloc)(struct backend *be, size_t bytes);
    void (*free)(struct backend *be, void *p);
    int (*upload)(struct backend *be, void *dst, const void *src, size_t bytes);
    int (*download)(struct backend *be, void *dst, const void *src, size_t bytes);
    void (*zero)(struct backend *be, void *dst, size_t bytes);
    /* C[M,N] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T. */
    void (*gemm)(struct backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
    /* dst row r (stride ldd) = src row idx[r] (stride lds), width floats;
     * idx NULL means row r. */
    void (*gather_rows)(struct backend *be, float *dst, int ldd, const float *src, int lds,
                        const int *idx, int n, int width);
    /* Each of n rows of dst (stride ldd) = bias (width floats). */
    void (*set_rows)(struct backend *be, float *dst, int ldd, const float *bias, int n, int width);
    /* y[r] += x[r] for n rows of width floats. */
    void (*add_rows)(struct backend *be, float *y, int ldy, const float *x, int ldx, int n, int width);
    void (*cell_step)(struct backend *be, const struct cell_step *s);
    /* dst[i] = mean over s < len[i] of src row (off[s] + i); packed layout. */
    void (*pool_mean)(struct backend *be, float *dst, const float *src, int width,
                      const int *off, const int *len, int n);
    /* In place: each of n rows of width floats becomes its softmax. */
    void (*softmax_rows)(struct backend *be, float *x, int n, int width);
    /* out[r] = log softmax(x row r)[target[r]], or 0 where target[r] < 0. */
    void (*log_softmax_pick)(struct backend *be, const float *x, int n, int width,
                             const int *target, float *out);
    /* Wait for queued work; returns 0, or -1 with a message in be->err. */
    int (*sync)(struct backend *be);
};

struct backend {
    const struct backend_ops *ops;
    void *impl;
    char err[256];
};

enum device_kind { DEVICE_CPU, DEVICE_CUDA, DEVICE_AUTO };

/* Create a backend; DEVICE_AUTO picks CUDA when a GPU is present.  Returns
 * NULL with a message in err. */
struct backend *backend_create(enum device_kind kind, char *err, size_t errlen);
void backend_destroy(struct backend *be);

struct backend *backend_cpu_create(char *err, size_t errlen);
#ifdef RRN_CUDA
struct backend *backend_cuda_create(char *err, size_t errlen);
int backend_cuda_available(void);
#endif

/* The backends compiled into this binary, e.g. "cpu cuda". */
const char *backend_compiled(void);

#endif
