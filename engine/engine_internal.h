/* engine_internal.h - what engine.c, forward.c and step.c share: the engine
 * struct, the model's weights as backend pointers, and grow-only scratch.
 */
#ifndef RRN_ENGINE_INTERNAL_H
#define RRN_ENGINE_INTERNAL_H

#include "engine.h"

/* Scratch buffers on the backend, grown on demand and kept between calls so
 * a steady load allocates nothing. */
enum ws_buf {
    WS_TOKENS, WS_X0, WS_XREV, WS_XG, WS_HG, WS_Q, WS_HOUT0, WS_HOUT1,
    WS_Y0, WS_Y1, WS_Y2, WS_C, WS_RING, WS_ATTN, WS_POOL, WS_LOGITS,
    WS_TARGET, WS_LOGPROB, WS_REV, WS_LAST, WS_OFF, WS_LEN, WS_SLOT, WS_T,
    WS_HPREV, WS_COUNT
};

struct engine {
    const struct model *m;
    struct backend *be;
    /* Dimensions, named as in MODELS.md. */
    int G, H, D, W, E, V, L, M, K, C, R;
    /* The weights on the backend: one block, same layout as m->arena. */
    float *dev_arena;
    struct layer_params *layers; /* pointers into dev_arena */
    float *embedding, *head_w, *head_b;
    void *ws[WS_COUNT];
    size_t ws_cap[WS_COUNT];
    /* Step-API slots: per layer, S cell states and S rings of R states. */
    int max_slots;
    int *slot_pos;               /* tokens consumed; -1 when free */
    float *pool_c, *pool_ring;
    /* Host scratch for index arrays, grown like ws. */
    int *host_idx;
    size_t host_idx_cap;
};

/* A scratch buffer of at least bytes, or NULL when out of memory. */
void *engine_ws(struct engine *e, enum ws_buf which, size_t bytes);
/* Host int scratch of at least n ints, or NULL. */
int *engine_host_ints(struct engine *e, size_t n);

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
};
int engine_layer_step(struct engine *e, const struct layer_run *r);

/* y (n rows, width W) += the depth residual of layer l from y^{l-2}. */
void engine_residual(struct engine *e, int layer, float *y, const float *y2, int n);

/* Input projection of n rows: xg = x W_ih^T + b_ih. */
void engine_input_projection(struct engine *e, int layer, int dir, const float *x, int n, float *xg);

#endif
