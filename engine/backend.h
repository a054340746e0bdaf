/* backend.h - the small interface every compute backend implements.
 *
 * The engine (forward.c, step.c) holds the whole algorithm: which layer runs
 * when, how sequences are packed, where states live.  A backend only knows
 * how to allocate memory it can compute on, move bytes in and out of it, and
 * run a dozen primitive operations on it.  The CPU backend (backend_cpu.c,
 * OpenBLAS) and the CUDA backend (backend_cuda.cu, cuda_fused.cu,
 * cuda_train.cu; cuBLAS) implement the same operations, so the same tests
 * run on both.
 *
 * All pointers given to an operation are backend ("device") pointers,
 * index arrays included.  Matrices are row-major.
 */
#ifndef RRN_BACKEND_H
#define RRN_BACKEND_H

#include <stddef.h>

#include "config.h"
#include "optim_update.h"

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
    float *hg;                /* [n, G*H]; scratch to recurrent_step */
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
    float *q;                 /* [n, H] (dynamic): W_q h_{t-1}, which
                                 recurrent_step computes itself */
    float *attn;              /* [n, K] weights out, or NULL */
    float *out;               /* [n, H] */
    float *cache;             /* training: [n, CELL_CACHE(cell, H)] what the
                                 backward pass needs, or NULL */
};

/* Floats per row the forward keeps for the backward pass: the LSTM's four
 * gate activations and new c; the GRU's r, z, n and W_hn h + b_hn; the
 * plain RNN's output before the skip term. */
#define CELL_CACHE(cell, H) ((cell) == CELL_LSTM ? 5 * (H) : (cell) == CELL_GRU ? 4 * (H) : (H))

/* The backward of one cell_step, over the n rows of step s of a packed
 * batch (rows off[s] .. off[s] + n - 1; step s - j has its rows at off[s -
 * j]).  Histories are packed too, with R steps of prefix before step 0
 * (the state carried into the batch, zeros for a fresh one): the h of row
 * i at step u >= -R is at h + (off[u] + i) * H, with off indexed from -R
 * (the caller passes off + R).  dh is laid out the same way and holds the
 * gradient with respect to each h; this step's rows are read, and the
 * rows of earlier steps receive what flows to them through the cell's
 * h_{t-1} (GRU), the attention and the skip.  What flows through W_hh and
 * W_q the caller adds with GEMMs, from dhg and dq. */
struct cell_grad {
    enum cell cell;
    int n, H, s;
    const int *off;           /* offsets, indexable from -R */
    const float *h;           /* packed h of this layer and direction */
    float *dh;                /* packed gradient with respect to h */
    const float *cache;       /* this step's rows of the forward's cache */
    const float *cache_prev;  /* step s - 1's rows, or NULL at s = 0 */
    const float *c0;          /* [n, H] cell state carried in, or NULL */
    float *dc;                /* [n, H] in: dL/dc_t; out: dL/dc_{t-1} */
    float *dxg, *dhg;         /* [n, G*H] out */
    const float *peephole;
    float *d_peephole;        /* [H] accumulated */
    int skip_period;
    int t0;                   /* 1-based step number of step s */
    enum attn_mode attn_mode;
    int attn_window;
    const float *attn;        /* [n, K] this step's weights */
    const float *q;           /* [n, H] this step's queries (dynamic) */
    float *d_attn_logits;     /* [K] accumulated (static) */
    float *dq;                /* [n, H] out (dynamic) */
};

struct backend;

/* How the matrix products compute: FP32 throughout (the default), or on
 * CUDA's tensor cores with inputs rounded to TF32 (10 mantissa bits) or
 * BF16 (7), sums in FP32.  The pointwise kernels compute in FP32 either
 * way, and weights and activations stay FP32 in memory. */
enum precision { PRECISION_FP32, PRECISION_TF32, PRECISION_BF16 };

/* How a step's recurrent product is computed: by the backend's matrix
 * product and then cell_step (the default), or fused with the cell in one
 * kernel (recurrent_step; CUDA in FP32). */
enum recurrence { RECURRENCE_GEMM, RECURRENCE_FUSED };

struct backend_ops {
    const char *name;
    /* 1: a forward computes each step's input projection just before the
     * step (the CPU, where the step's rows then come from cache rather
     * than from memory); 0: all steps' in one product first (a GPU, for
     * which one large product beats many small ones). */
    int project_each_step;
    /* 1: a forward without slots runs every step over all its sequences,
     * those already ended included (their rows are computed and not read),
     * and pads its length to a multiple of 8 steps and its sequences to a
     * multiple of 8 with fillers, so that one recorded graph serves every
     * batch of 1 to 8 sequences (9 to 16, ...) in the same 8 steps of
     * length (a GPU, whose step takes as long for 40 rows as for 64); 0:
     * each step over the sequences still running (the CPU). */
    int pad_steps;
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

    /* Training.  A backend without them (NULL) cannot train. */
    void (*cell_step_backward)(struct backend *be, const struct cell_grad *g);
    /* dst[k] += sum over n rows of src[r][k]. */
    void (*add_column_sums)(struct backend *be, float *dst, const float *src, int n, int width);
    /* dst row idx[r] (stride ldd) += src row r (stride lds), rows in order
     * so repeated indices add up deterministically; idx NULL means r. */
    void (*scatter_add_rows)(struct backend *be, float *dst, int ldd, const float *src, int lds, const int *idx,
                             int n, int width);
    /* The backward of pool_mean: dst row (off[s] + i) += src row i / len[i]. */
    void (*pool_mean_backward)(struct backend *be, float *dst, const float *src, int width, const int *off,
                               const int *len, int n);
    /* y = x * mask / (1 - p), the mask drawn from (seed, element index) so
     * the backward applies the same one; x == y allowed. */
    void (*dropout)(struct backend *be, float *y, const float *x, size_t n, float p, unsigned long long seed);
    /* Softmax cross-entropy of n rows against target (< 0: row ignored):
     * loss[r] = -log softmax(x_r)[target_r]; dx = scale * (softmax - onehot). */
    void (*softmax_xent)(struct backend *be, const float *x, int n, int width, const int *target, float *loss,
                         float *dx, float scale);
    /* Squared error of n rows: loss[r] = sum_k (x - y)^2; dx = scale * 2 (x - y). */
    void (*squared_error)(struct backend *be, const float *x, const float *y, int n, int width, float *loss,
                          float *dx, float scale);
    /* One optimizer step over n parameters (optim_update.h), done where
     * they live so that neither they nor their gradients cross to the host:
     * the sum of grad's squares (in double) goes to *sum_squares, in
     * backend memory; when it is not finite (a gradient is Inf or NaN),
     * nothing else changes.  Otherwise grad is scaled to an L2 norm of at
     * most u->clip_norm when that is > 0, then each parameter updated by
     * u's rule, its state in state (optim_state_arrays arrays of n floats).
     * The same bits on every backend, but for the sum of squares, which
     * each adds in its own order. */
    void (*optim_step)(struct backend *be, const struct optim_update *u, float *params, const float *grad,
                       float *state, size_t n, double *sum_squares);

    /* The arithmetic of the matrix products from now on; 0, or -1 with a
     * message in err.  NULL: the backend computes in FP32 only. */
    int (*set_precision)(struct backend *be, enum precision p);

    /* Host memory that uploads and downloads stage through: page-locked on
     * CUDA, so that copies go straight to and from the device by DMA.  NULL
     * when out of memory. */
    void *(*host_alloc)(struct backend *be, size_t bytes);
    void (*host_free)(struct backend *be, void *p);

    /* A weight matrix B [N][K] (row stride K) copied into the form the
     * backend's products x B^T read best, made once when a model is
     * placed: the CPU's packed layout, CUDA's BF16 twin in BF16 precision.
     * Freed with free, *bytes set to its size.  NULL when out of memory or
     * when the backend multiplies by B as it is (CUDA in FP32 and TF32). */
    void *(*pack_weights)(struct backend *be, const float *B, int N, int K, size_t *bytes);
    /* C[M,N] = A B^T + beta C, beta 0 or 1, B packed by pack_weights: the
     * same bits as gemm with trans_b on the CPU; on CUDA, A and B rounded
     * to BF16. */
    void (*gemm_packed)(struct backend *be, int M, int N, int K, const float *A, int lda, const void *packed,
                        float beta, float *C, int ldc);

    /* Graphs (CUDA graphs): between capture_begin and capture_end the work
     * queued is recorded, not run; capture_end returns it as a graph that
     * replay queues again, the same kernels on the same pointers, at the
     * cost of one launch.  capture_end returns NULL when the capture failed
     * (nothing ran; be->err may say why).  NULL ops: the backend runs work
     * as it is queued (the CPU, where a launch costs nothing). */
    int (*capture_begin)(struct backend *be);
    void *(*capture_end)(struct backend *be);
    int (*replay)(struct backend *be, void *graph);
    void (*graph_free)(struct backend *be, void *graph);

    /* Lanes (CUDA streams), so that independent work (the layers of a
     * forward in a wavefront, the two directions of a layer) runs at once:
     * work queued after lane_use(k) goes to lane k, 0 <= k < max_lanes,
     * and is ordered only after the lane's earlier work and what lane_wait
     * adds: lane_wait(k) makes the current lane's later work wait for all
     * that lane k has queued so far.  Work goes to lane 0 unless told
     * otherwise, and sync waits for every lane.  For a recording, a lane's
     * first work must follow a wait on a lane already in it, and lane 0
     * must have waited for every other lane before capture_end.  NULL ops
     * (max_lanes 0): one lane, the CPU's. */
    int max_lanes;
    void (*lane_use)(struct backend *be, int lane);
    void (*lane_wait)(struct backend *be, int lane);

    /* The recurrent product and cell_step in one pass, when be->recurrence
     * asks for it: hg = hprev w^T (hprev [n][H], w [G*H][H]) is computed
     * inside rather than read from s->hg, so the gates never go through
     * memory and a step is one launch.  With dynamic attention it also
     * computes the queries s->q = hprev w_q^T first (w_q [H][H]), and s->hg
     * is scratch it may use (each row's attention scores in parts, one a
     * tile of its query).  Returns 0, having queued nothing, where it computes
     * the step by gemm and cell_step instead: the answer depends on the
     * settings and the model's shape, never on the rows.  NULL: never. */
    int (*recurrent_step)(struct backend *be, const struct cell_step *s, const float *hprev, const float *w,
                          const float *w_q);
};

struct backend {
    const struct backend_ops *ops;
    void *impl;
    char err[256];
    /* Bytes moved by upload and download so far, and in how many copies:
     * what crosses between host and device memory (tests check that a
     * generation step moves only its tokens and results, never the model,
     * and that a call makes one copy each way, since on a GPU each copy
     * costs microseconds of latency whatever its size). */
    size_t bytes_up, bytes_down;
    size_t copies_up, copies_down;
    enum recurrence recurrence; /* backend_set_recurrence */
};

enum device_kind { DEVICE_CPU, DEVICE_CUDA, DEVICE_AUTO };

/* The device DEVICE_AUTO stands for here: CUDA when this binary has it and
 * a GPU is present, else the CPU.  Other kinds are returned as they are. */
enum device_kind backend_resolve(enum device_kind kind);

/* Create a backend; DEVICE_AUTO picks CUDA when a GPU is present.  Returns
 * NULL with a message in err. */
struct backend *backend_create(enum device_kind kind, char *err, size_t errlen);
void backend_destroy(struct backend *be);

struct backend *backend_cpu_create(char *err, size_t errlen);

/* The two functions the CUDA backend's library exports (backend_cuda.cu),
 * which backend.c looks up by name when it loads it: 1 when the driver
 * reports a GPU; a new CUDA backend, or NULL with a message in err. */
typedef int cuda_gpu_present_fn(void);
typedef struct backend *cuda_backend_create_fn(char *err, size_t errlen);

/* 1 when the CUDA backend loads and the driver reports a GPU; always 0 in a
 * build without CUDA, so that callers (and the CUDA tests, which skip) need
 * not ask which build they are in. */
int backend_cuda_available(void);
/* NULL when backend_cuda_available, else why not, for a log: the build has
 * no CUDA, its library would not load (the loader's message), or there is
 * no GPU. */
const char *backend_cuda_unavailable(void);

/* The backends compiled into this binary, e.g. "cpu cuda". */
const char *backend_compiled(void);

/* Names on the command line: "auto", "cpu", "cuda"; "fp32", "tf32", "bf16".  The
 * parsers return 0, or -1 for a name they do not know. */
int backend_device_parse(const char *s, enum device_kind *dev);
int backend_precision_parse(const char *s, enum precision *p);
const char *backend_precision_name(enum precision p);
/* "gemm", "fused". */
int backend_recurrence_parse(const char *s, enum recurrence *r);
const char *backend_recurrence_name(enum recurrence r);
/* Where work runs, as the logs say it: the device's name, then the
 * precision when it is not FP32 and the recurrence when fused ("cuda,
 * tf32", "cuda, fused"). */
void backend_describe(const char *device, enum precision p, enum recurrence r, char *buf, size_t len);

/* Wait for the backend's queued work: 0, or -1 with a message in be->err.
 * What the engine calls instead of ops->sync (it adds a test hook). */
int backend_sync(struct backend *be);

/* Forget an earlier failure recorded in be->err.  The engine calls it as
 * each forward, step or training batch starts, so that one that failed
 * (out of device memory, say) does not fail every one after it; a fault
 * that leaves the device unusable fails them again by itself. */
void backend_clear_error(struct backend *be);

/* Set the matrix products' precision; 0, or -1 with a message in err (the
 * backend has no such mode, or failed to set it). */
int backend_set_precision(struct backend *be, enum precision p, char *err, size_t errlen);

/* Set how steps compute their recurrent product; 0, or -1 with a message
 * in err (the backend has no fused recurrence). */
int backend_set_recurrence(struct backend *be, enum recurrence r, char *err, size_t errlen);

#endif
