/* engine_internal.h - what engine.c, forward.c and step.c share: the engine
 * struct, the model's weights as backend pointers, and grow-only scratch.
 */
#ifndef RRN_ENGINE_INTERNAL_H
#define RRN_ENGINE_INTERNAL_H

#include "engine.h"

/* Scratch buffers on the backend, grown on demand and kept between calls so
 * a steady load allocates nothing. */
enum ws_buf {
    WS_PLAN, WS_X0, WS_XREV, WS_XG, WS_HG, WS_Q, WS_HOUT,
    WS_Y, WS_C, WS_RING, WS_ATTN, WS_POOL, WS_LOGITS, WS_HPREV,
    /* training: the tape, then the backward's buffers */
    WS_T_Y, WS_T_XIN, WS_T_H, WS_T_CACHE, WS_T_Q, WS_T_ATTN, WS_T_C0, WS_T_PREFIX, WS_T_OFF,
    WS_DY, WS_DH, WS_DXG, WS_DHG, WS_DC, WS_DQ, WS_DXIN, WS_DXIN2, WS_DLOGITS, WS_LOSS, WS_LABELS,
    WS_G_ROWS, WS_G_HPREV, WS_GRAD_SQUARES,
    WS_INPUTS, WS_TARGETS, WS_COUNT
};

/* Host scratch buffers: a batch's plan (index arrays), its packed vector
 * inputs, and the results it downloads. */
enum host_buf { HOST_PLAN, HOST_INPUTS, HOST_RESULTS, HOST_COUNT };

/* Named pointers into an arena laid out as the model's (struct model):
 * the weights on the backend, or their gradients. */
struct param_view {
    float *base;
    struct layer_params *layers;
    float *embedding, *head_w, *head_b;
};

/* Point a view's fields into base, an arena laid out as the model's; on
 * failure (out of memory) the view is left empty and base untouched. */
int engine_make_view(struct engine *e, float *base, struct param_view *v);

struct engine {
    const struct model *m;
    struct backend *be;
    /* Dimensions, named as in MODELS.md. */
    int G, H, D, W, E, V, L, M, K, C, R;
    struct param_view w;         /* the weights on the backend */
    struct param_view g;         /* their gradients (training), or zeros */
    float *optim_state;          /* the optimizer's (engine_optim_step), or NULL */
    size_t optim_len;            /* its floats */
    /* Layer 0's input projection of every token id, per direction ([V][G*H]:
     * row v is W_ih e_v + b_ih, the bits the projection of token v gets),
     * so a forward gathers rows instead of embedding and multiplying.  NULL
     * for vector inputs, tables over TOKEN_TABLE_MAX_BYTES, and engines
     * whose weights were replaced (engine_params_from_host). */
    float *token_xg[2];
    /* The backend's packed twins (pack_weights) of every matrix a product
     * multiplies by, found by engine_gemm_weights; none where the backend
     * does not pack, or the weights were replaced. */
    struct packed_weight {
        const float *w;
        void *packed;
    } *packed;
    int n_packed;
    size_t packed_bytes;
    void *ws[WS_COUNT];
    size_t ws_cap[WS_COUNT];
    unsigned ws_gen;             /* scratch reallocations so far */
    struct graph_cache *graphs;  /* recorded device work (graphs.c) */
    /* Step-API slots: per layer, S cell states and S rings of R states. */
    int max_slots;
    int *slot_pos;               /* tokens consumed; -1 when free */
    float *pool_c, *pool_ring;
    /* Host scratch that transfers stage through (backend host memory:
     * page-locked on CUDA), grown like ws. */
    void *host[HOST_COUNT];
    size_t host_cap[HOST_COUNT]; /* bytes */
};

/* A scratch buffer of at least bytes, or NULL when out of memory. */
void *engine_ws(struct engine *e, enum ws_buf which, size_t bytes);
/* n ints from the host copied into scratch buffer which; NULL when out of
 * memory or the copy failed. */
int *engine_upload_ints(struct engine *e, enum ws_buf which, const int *src, size_t n);
/* A host scratch buffer of at least bytes, or NULL when out of memory. */
void *engine_host(struct engine *e, enum host_buf which, size_t bytes);

/* One layer's recurrent step for rows that are all at step t0 (forward) or
 * at the per-row steps in t (the step API); shared by both paths. */
struct layer_run {
    int layer, dir, n;
    const float *hprev;      /* [n, H] h_{t-1} of each row, or NULL when all are at t = 1 */
    const float *xg;         /* [n, G*H] */
    float *c, *ring;         /* state pool for this layer */
    const int *slot, *t;     /* device arrays or NULL */
    const int *t_host;       /* host copy of t, or NULL (all rows at t0) */
    int t0;
    float *out, *attn;
    float *cache;            /* training: the step's rows of the tape's cache */
    float *hg;               /* [n, G*H] scratch for the recurrent product */
    float *q;                /* [n, H] for W_q h_{t-1} (dynamic attention), else NULL */
    /* Backends with lanes: the lane the step runs on, and another for the
     * queries' product to run on beside the recurrent product (both read
     * only h_{t-1}), or 0 for none. */
    int lane, q_lane;
};
void engine_layer_step(struct engine *e, const struct layer_run *r);

/* y (n rows, width W) += the depth residual of layer l from y^{l-2}. */
void engine_residual(struct engine *e, int layer, float *y, const float *y2, int n);

/* Input projection of n rows: xg = x W_ih^T + b_ih. */
void engine_input_projection(struct engine *e, int layer, int dir, const float *x, int n, float *xg);

/* y = x W^T + beta y for n rows, W [N][K] one of the model's weight
 * matrices on the backend: through its packed twin when there is one. */
void engine_gemm_weights(struct engine *e, int n, int N, int K, const float *x, int ldx, const float *W,
                         float beta, float *y, int ldy);

/* Drop what the engine derived from the weights (token tables, packed
 * twins, recorded graphs): the weights are about to change. */
void engine_drop_derived(struct engine *e);

/* Make the packed twins of the weights (backend_ops.pack_weights), when
 * the engine is made and again after training changed the weights: on
 * CUDA in BF16 they are what the products read. */
void engine_pack_weights(struct engine *e);

/* Device work that engine_recorded may record: returns its result, a
 * pointer, or NULL on failure. */
typedef void *(*engine_work)(struct engine *e, void *arg);

/* work(e, arg), or on backends that record graphs its recording replayed,
 * for the shapes seen before; key (len bytes) must hold everything on the
 * host that decides the work's kernels and their arguments (graphs.c). */
void *engine_recorded(struct engine *e, const void *key, size_t len, engine_work work, void *arg);

/* Free the recorded graphs; shapes are recorded again as they come. */
void engine_drop_graphs(struct engine *e);

/* Whether a pass that reads layer 0's projection from the token tables
 * (tables nonzero) still needs the embedded input y^0 on the backend: only
 * for the depth residual, which adds it to layer 2's output.  A pass
 * without tables always does. */
int engine_needs_embedding(const struct engine *e, int tables);

/* Host-side plan of one batch; its index arrays share one block of host
 * memory (engine_make_plan). */
struct plan {
    int n, T, P;  /* rows per step (sequences), steps, rows */
    int seqs;     /* the caller's sequences: order[i] >= seqs is a filler */
    int *order;   /* sorted position -> caller's index */
    int *len;     /* [n] sorted lengths */
    int *off;     /* [T + 1] */
    int *tokens;  /* [P] packed token ids */
    int *tokens_rev; /* [P] token of the mirrored position (two directions) */
    int *rev;     /* [P] packed row of the mirrored position */
    int *last;    /* [n] packed row of each sequence's last step */
    int *target;  /* [P] next token, or -1 */
    int *slot;    /* [n] state slot, or NULL */
    int *hprev;   /* [n] ring row of each slot's last state */
    int pos;      /* tokens the slots consumed before this batch */
    float *inputs; /* [P][E] packed vector inputs, or NULL (tokens) */
};

/* Device copies of the plan's index arrays, in one scratch buffer laid out
 * as the host's block. */
struct dev_plan {
    int *tokens, *tokens_rev, *rev, *last, *off, *len, *target, *slot, *hprev;
    float *inputs;
};

/* What a training forward keeps for the backward pass (train.c), all in
 * the packed layout.  Each layer and direction's h has R steps of prefix
 * before step 0: the state carried in from a slot (zeros for a fresh
 * sequence), so the backward finds every h_{t-lag} it needs in one place. */
struct tape {
    int B, P, R, Wmax, CW;
    float *y;       /* [L + 1][P][Wmax]: y^0 (the embedded input) .. y^L */
    float *xin;     /* [L][P][Wmax]: layer inputs after dropout, or NULL */
    float *h;       /* [L * D][R * B + P][H] */
    float *cache;   /* [L * D][P][CW] */
    float *q;       /* [L * D][P][H] (dynamic attention) */
    float *attn;    /* [L * D][P][K] */
    float *c0;      /* [L][B][H] cell state carried in, or NULL (zeros) */
    const int *prefix_idx; /* [R * B] ring rows of the prefix, or NULL */
    float dropout, dropout_embed;
    unsigned long long seed;
};

/* The dropout on layer l's input. */
static inline float tape_dropout(const struct tape *t, int l)
{
    return l ? t->dropout : t->dropout_embed;
}

static inline float *tape_y(const struct tape *t, int k)
{
    return t->y + (size_t)k * t->P * t->Wmax;
}

static inline float *tape_h(const struct tape *t, int ld, int H)
{
    return t->h + (size_t)ld * ((size_t)t->R * t->B + t->P) * H;
}

int engine_check_batch(const struct engine *e, const struct engine_seq *seqs, int n, char *err, size_t errlen);
/* The plan of a batch; pad: every step over all sequences, the length
 * padded to whole chunks and the sequences to whole groups of rows with
 * fillers (backend_ops.pad_steps). */
int engine_make_plan(struct engine *e, const struct engine_seq *seqs, int n, int pad, struct plan *p);
int engine_upload_plan(struct engine *e, const struct plan *p, struct dev_plan *d);
/* A classifier's head: pool y [P, W] into pooled [n, W], then logits [n, C]. */
void engine_classify_logits(struct engine *e, const struct dev_plan *d, int n, const float *y, float *pooled,
                            float *logits);
/* Every layer over a planned batch; returns the last layer's output
 * [P, W], or NULL when out of memory.  attn, when not NULL, gets the
 * attention weights [L][D][P][K]; tape, when not NULL, gets what the
 * backward pass needs (and then holds the outputs and weights itself). */
float *engine_run_layers(struct engine *e, const struct plan *p, const struct dev_plan *d, float *attn,
                         const struct tape *tape);

#endif
