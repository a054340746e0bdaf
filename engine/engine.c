/* engine.c - placing a model on a backend, scratch memory, step-API slots,
 * and the pieces of a layer that the batched forward (forward.c) and the
 * step API (step.c) share.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* The pointer at p's offset within the host arena, in another arena of the
 * same layout (the weights on the backend, or their gradients). */
static float *relocate(const struct engine *e, float *base, const float *p)
{
    return p ? base + (p - e->m->arena) : NULL;
}

/* Free a view's pointer tables (not its arena) and empty it. */
static void drop_tables(struct engine *e, struct param_view *v)
{
    for (int l = 0; v->layers && l < e->L; l++)
        for (int d = 0; d < e->D; d++)
            free(v->layers[l].dir[d].w_hh);
    free(v->layers);
    memset(v, 0, sizeof *v);
}

int engine_make_view(struct engine *e, float *base, struct param_view *v)
{
    const struct model *m = e->m;
    v->base = base;
    v->layers = calloc((size_t)e->L, sizeof *v->layers);
    if (!v->layers)
        goto fail;
    for (int l = 0; l < e->L; l++) {
        const struct layer_params *hl = &m->layers[l];
        struct layer_params *dl = &v->layers[l];
        *dl = *hl;
        dl->dir[0].w_hh = dl->dir[1].w_hh = NULL; /* the host's tables are not ours */
        dl->residual_proj = relocate(e, base, hl->residual_proj);
        for (int d = 0; d < e->D; d++) {
            const struct layer_dir_params *hp = &hl->dir[d];
            struct layer_dir_params *dp = &dl->dir[d];
            dp->w_ih = relocate(e, base, hp->w_ih);
            dp->b_ih = relocate(e, base, hp->b_ih);
            dp->b_hh = relocate(e, base, hp->b_hh);
            dp->peephole = relocate(e, base, hp->peephole);
            dp->attn_logits = relocate(e, base, hp->attn_logits);
            dp->attn_query = relocate(e, base, hp->attn_query);
            dp->w_hh = calloc((size_t)e->M, sizeof *dp->w_hh);
            if (!dp->w_hh)
                goto fail;
            for (int j = 0; j < e->M; j++)
                dp->w_hh[j] = relocate(e, base, hp->w_hh[j]);
        }
    }
    v->embedding = relocate(e, base, m->embedding);
    v->head_w = relocate(e, base, m->head_w);
    v->head_b = relocate(e, base, m->head_b);
    return 0;
fail:
    drop_tables(e, v);
    return -1;
}

static void free_view(struct engine *e, struct param_view *v)
{
    float *base = v->base;
    drop_tables(e, v);
    e->be->ops->free(e->be, base);
}

static int mirror_weights(struct engine *e, char *err, size_t errlen)
{
    size_t bytes = e->m->n_params * sizeof(float);
    float *base = e->be->ops->alloc(e->be, bytes);
    if (!base || e->be->ops->upload(e->be, base, e->m->arena, bytes) != 0) {
        e->be->ops->free(e->be, base);
        snprintf(err, errlen, "cannot place %zu bytes of weights on the %s backend", bytes, e->be->ops->name);
        return -1;
    }
    if (engine_make_view(e, base, &e->w) != 0) {
        e->be->ops->free(e->be, base);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

/* The packed twin of weight matrix W [N][K]; on failure the engine goes
 * on without it. */
static void pack_one(struct engine *e, const float *W, int N, int K)
{
    if (!W)
        return;
    size_t bytes;
    void *p = e->be->ops->pack_weights(e->be, W, N, K, &bytes);
    if (!p)
        return;
    e->packed[e->n_packed++] = (struct packed_weight){W, p};
    e->packed_bytes += bytes;
}

/* Packed twins of every matrix the forward and the step multiply by: the
 * recurrent and input matrices, the attention query, the depth residual's
 * projection and the head.  On the CPU they double the memory of those
 * weights for a product about a tenth faster (bench/bench_gemm); on CUDA
 * in BF16 precision they are the BF16 weights the tensor cores read, half
 * as large again. */
void engine_pack_weights(struct engine *e)
{
    if (!e->be->ops->pack_weights)
        return;
    int most = e->L * e->D * (e->M + 2) + e->L + 1;
    if (!(e->packed = calloc((size_t)most, sizeof *e->packed)))
        return;
    const int GH = e->G * e->H;
    for (int l = 0; l < e->L; l++) {
        const struct layer_params *lp = &e->w.layers[l];
        for (int d = 0; d < e->D; d++) {
            pack_one(e, lp->dir[d].w_ih, GH, lp->in);
            for (int m = 0; m < e->M; m++)
                pack_one(e, lp->dir[d].w_hh[m], GH, e->H);
            pack_one(e, lp->dir[d].attn_query, e->H, e->H);
        }
        pack_one(e, lp->residual_proj, e->W, lp->residual_from);
    }
    pack_one(e, e->w.head_w, e->C, e->W);
}

static void drop_packed(struct engine *e)
{
    for (int i = 0; i < e->n_packed; i++)
        e->be->ops->free(e->be, e->packed[i].packed);
    free(e->packed);
    e->packed = NULL;
    e->n_packed = 0;
    e->packed_bytes = 0;
}

void engine_gemm_weights(struct engine *e, int n, int N, int K, const float *x, int ldx, const float *W,
                         float beta, float *y, int ldy)
{
    /* A handful of matrices; a scan costs nothing beside the product. */
    for (int i = 0; i < e->n_packed; i++)
        if (e->packed[i].w == W) {
            e->be->ops->gemm_packed(e->be, n, N, K, x, ldx, e->packed[i].packed, beta, y, ldy);
            return;
        }
    e->be->ops->gemm(e->be, 0, 1, n, N, K, 1.0f, x, ldx, W, K, beta, y, ldy);
}

size_t engine_packed_bytes(const struct engine *e)
{
    return e->packed_bytes;
}

/* Token tables cost V * G * H floats a direction; past this a model with a
 * large vocabulary (word tokenizers) computes its projection instead. */
#define TOKEN_TABLE_MAX_BYTES ((size_t)64 << 20)

/* The table is the projection of every embedding row, through the same
 * code as a forward's projection, so a gathered row has the bits the
 * forward would compute (gemm_nt's result for a row depends on nothing
 * else).  Without memory for it, or if the backend fails making it, the
 * engine runs without it. */
static void drop_token_tables(struct engine *e)
{
    for (int dir = 0; dir < 2; dir++) {
        e->be->ops->free(e->be, e->token_xg[dir]);
        e->token_xg[dir] = NULL;
    }
}

static void build_token_tables(struct engine *e)
{
    size_t row = (size_t)e->G * e->H * sizeof(float);
    if (!e->w.embedding || (size_t)e->V * e->D * row > TOKEN_TABLE_MAX_BYTES)
        return;
    for (int dir = 0; dir < e->D; dir++) {
        if (!(e->token_xg[dir] = e->be->ops->alloc(e->be, (size_t)e->V * row)))
            break;
        engine_input_projection(e, 0, dir, e->w.embedding, e->V, e->token_xg[dir]);
    }
    if (!e->token_xg[e->D - 1] || backend_sync(e->be) != 0) {
        drop_token_tables(e);
        backend_clear_error(e->be);
    }
}

void engine_drop_derived(struct engine *e)
{
    engine_drop_graphs(e);
    drop_token_tables(e);
    drop_packed(e);
}

int engine_needs_embedding(const struct engine *e, int tables)
{
    return !tables || (e->m->cfg.residual_depth && e->L > 1);
}

size_t engine_token_table_bytes(const struct engine *e)
{
    return e->token_xg[0] ? (size_t)e->D * e->V * e->G * e->H * sizeof(float) : 0;
}

static int open_slots(struct engine *e, int max_slots, char *err, size_t errlen)
{
    e->max_slots = max_slots;
    if (max_slots == 0)
        return 0;
    if (e->m->cfg.task != TASK_LM || e->D != 1) {
        snprintf(err, errlen, "step slots need a unidirectional language model");
        return -1;
    }
    e->slot_pos = malloc((size_t)max_slots * sizeof *e->slot_pos);
    size_t c_bytes = (size_t)e->L * max_slots * e->H * sizeof(float);
    e->pool_c = e->be->ops->alloc(e->be, c_bytes);
    e->pool_ring = e->be->ops->alloc(e->be, c_bytes * e->R);
    if (!e->slot_pos || !e->pool_c || !e->pool_ring) {
        snprintf(err, errlen, "cannot allocate state for %d generation slots", max_slots);
        return -1;
    }
    for (int s = 0; s < max_slots; s++)
        e->slot_pos[s] = -1;
    return 0;
}

struct engine *engine_create(const struct model *m, struct backend *be, int max_slots,
                             char *err, size_t errlen)
{
    const struct model_config *cfg = &m->cfg;
    struct engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->m = m;
    e->be = be;
    e->G = config_gates(cfg);
    e->H = cfg->hidden;
    e->D = config_directions(cfg);
    e->W = config_output_width(cfg);
    e->E = cfg->embed_dim;
    e->V = m->vocab;
    e->L = cfg->layers;
    e->M = cfg->skip_matrices;
    e->K = cfg->attn_mode == ATTN_NONE ? 0 : cfg->attn_window;
    e->C = m->head_out;
    /* The ring must hold every state a step reads (lags up to K+1 for
     * attention, the skip period for the skip) plus the one it writes. */
    e->R = e->K + 2 > cfg->skip_period + 1 ? e->K + 2 : cfg->skip_period + 1;
    if (mirror_weights(e, err, errlen) != 0 || open_slots(e, max_slots, err, errlen) != 0) {
        engine_destroy(e);
        return NULL;
    }
    engine_pack_weights(e);
    build_token_tables(e);
    return e;
}

void engine_destroy(struct engine *e)
{
    if (!e)
        return;
    struct backend *be = e->be;
    for (int i = 0; i < WS_COUNT; i++)
        be->ops->free(be, e->ws[i]);
    engine_drop_derived(e);
    free_view(e, &e->w);
    free_view(e, &e->g);
    be->ops->free(be, e->optim_state);
    be->ops->free(be, e->pool_c);
    be->ops->free(be, e->pool_ring);
    free(e->slot_pos);
    for (int i = 0; i < HOST_COUNT; i++)
        be->ops->host_free(be, e->host[i]);
    free(e);
}

const struct model *engine_model(const struct engine *e)
{
    return e->m;
}

/* *buf grown to at least bytes with the backend's alloc and release (its
 * device or its host memory); the contents are not kept.  It grows by half
 * again, so that a slowly rising batch size does not reallocate every
 * call. */
static void *grow(struct engine *e, void **buf, size_t *cap, size_t bytes,
                  void *(*alloc)(struct backend *, size_t), void (*release)(struct backend *, void *))
{
    if (bytes <= *cap && *buf)
        return *buf;
    size_t want = bytes + bytes / 2 + 64;
    void *p = alloc(e->be, want);
    if (!p)
        return NULL;
    release(e->be, *buf);
    *buf = p;
    *cap = want;
    return p;
}

void *engine_ws(struct engine *e, enum ws_buf which, size_t bytes)
{
    void *old = e->ws[which], *p = grow(e, &e->ws[which], &e->ws_cap[which], bytes, e->be->ops->alloc,
                                        e->be->ops->free);
    if (p != old)
        e->ws_gen++;
    return p;
}

size_t engine_scratch_bytes(const struct engine *e)
{
    size_t n = 0;
    for (int i = 0; i < WS_COUNT; i++)
        n += e->ws_cap[i];
    for (int i = 0; i < HOST_COUNT; i++)
        n += e->host_cap[i];
    return n;
}

int *engine_upload_ints(struct engine *e, enum ws_buf which, const int *src, size_t n)
{
    int *d = engine_ws(e, which, n * sizeof(int));
    if (d && e->be->ops->upload(e->be, d, src, n * sizeof(int)) != 0)
        return NULL;
    return d;
}

void *engine_host(struct engine *e, enum host_buf which, size_t bytes)
{
    return grow(e, &e->host[which], &e->host_cap[which], bytes, e->be->ops->host_alloc, e->be->ops->host_free);
}

void engine_input_projection(struct engine *e, int layer, int dir, const float *x, int n, float *xg)
{
    const struct layer_params *lp = &e->w.layers[layer];
    const struct layer_dir_params *dp = &lp->dir[dir];
    int GH = e->G * e->H;
    e->be->ops->set_rows(e->be, xg, GH, dp->b_ih, n, GH);
    engine_gemm_weights(e, n, GH, lp->in, x, lp->in, dp->w_ih, 1.0f, xg, GH);
}

void engine_residual(struct engine *e, int layer, float *y, const float *y2, int n)
{
    const struct layer_params *lp = &e->w.layers[layer];
    if (lp->residual_proj)
        engine_gemm_weights(e, n, e->W, lp->residual_from, y2, lp->residual_from, lp->residual_proj, 1.0f, y,
                            e->W);
    else
        e->be->ops->add_rows(e->be, y, e->W, y2, e->W, n, e->W);
}

/* The skip scheme's recurrent matrix for step t. */
static int matrix_of(const struct engine *e, int t)
{
    return (t - 1) % e->M;
}

/* Rows are ordered so that those using the same recurrent matrix are
 * adjacent: the run of rows from i that share one, its end returned and
 * its matrix in *m. */
static int run_end(const struct engine *e, const struct layer_run *r, int i, int *m)
{
    *m = matrix_of(e, r->t_host ? r->t_host[i] : r->t0);
    int j = i + 1;
    while (j < r->n && matrix_of(e, r->t_host ? r->t_host[j] : r->t0) == *m)
        j++;
    return j;
}

/* Rows i .. i + n - 1 of a step, as a step of their own. */
static struct cell_step step_rows(const struct engine *e, const struct cell_step *s, int i, int n)
{
    struct cell_step sub = *s;
    const size_t GH = (size_t)e->G * e->H;
    sub.n = n;
    sub.xg += i * GH;
    sub.hg += i * GH;
    sub.out += (size_t)i * e->H;
    if (sub.q)
        sub.q += (size_t)i * e->H;
    if (sub.attn)
        sub.attn += (size_t)i * e->K;
    if (sub.cache)
        sub.cache += (size_t)i * CELL_CACHE(s->cell, e->H);
    if (sub.slot)
        sub.slot += i;
    if (sub.t)
        sub.t += i;
    return sub;
}

void engine_layer_step(struct engine *e, const struct layer_run *r)
{
    struct backend *be = e->be;
    const struct layer_dir_params *dp = &e->w.layers[r->layer].dir[r->dir];
    const int H = e->H, GH = e->G * H, n = r->n;
    struct cell_step s = {
        .cell = e->m->cfg.cell,
        .n = n,
        .H = H,
        .xg = r->xg,
        .hg = r->hg,
        .b_hh = dp->b_hh,
        .peephole = dp->peephole,
        .c = r->c,
        .ring = r->ring,
        .R = e->R,
        .slot = r->slot,
        .t = r->t,
        .t0 = r->t0,
        .skip_period = e->m->cfg.skip_period,
        .attn_mode = e->m->cfg.attn_mode,
        .attn_window = e->K,
        .attn_logits = dp->attn_logits,
        .q = r->q,
        .attn = r->attn,
        .out = r->out,
        .cache = r->cache,
    };
    if (!r->hprev) {
        be->ops->zero(be, r->hg, (size_t)n * GH * sizeof(float));
        if (r->q)
            be->ops->zero(be, r->q, (size_t)n * H * sizeof(float));
        be->ops->cell_step(be, &s);
        return;
    }
    /* Fused: one pass per run of rows; the backend's answer is the same
     * for every run, so only the first can decline. */
    int fused = be->ops->recurrent_step != NULL;
    for (int i = 0, m; fused && i < n;) {
        int j = run_end(e, r, i, &m);
        struct cell_step rows = step_rows(e, &s, i, j - i);
        fused = be->ops->recurrent_step(be, &rows, r->hprev + (size_t)i * H, dp->w_hh[m], dp->attn_query);
        i = j;
    }
    if (fused)
        return;
    if (r->q) {
        if (r->q_lane) {
            be->ops->lane_use(be, r->q_lane);
            be->ops->lane_wait(be, r->lane);
        }
        engine_gemm_weights(e, n, H, H, r->hprev, H, dp->attn_query, 0.0f, r->q, H);
        if (r->q_lane)
            be->ops->lane_use(be, r->lane);
    }
    for (int i = 0, m; i < n;) {
        int j = run_end(e, r, i, &m);
        engine_gemm_weights(e, j - i, GH, H, r->hprev + (size_t)i * H, H, dp->w_hh[m], 0.0f, r->hg + (size_t)i * GH,
                            GH);
        i = j;
    }
    if (r->q && r->q_lane)
        be->ops->lane_wait(be, r->q_lane);
    be->ops->cell_step(be, &s);
}

/* The empty state: h_0 = c_0 = 0 and no history (the step API reads
 * h_{t-1} from the ring, including at t = 1). */
static void slot_zero(struct engine *e, int slot)
{
    size_t hb = (size_t)e->H * sizeof(float);
    for (int l = 0; l < e->L; l++) {
        size_t base = (size_t)l * e->max_slots + slot;
        e->be->ops->zero(e->be, e->pool_c + base * e->H, hb);
        e->be->ops->zero(e->be, e->pool_ring + base * e->R * e->H, hb * e->R);
    }
}

int engine_slot_open(struct engine *e)
{
    for (int s = 0; s < e->max_slots; s++) {
        if (e->slot_pos[s] >= 0)
            continue;
        slot_zero(e, s);
        e->slot_pos[s] = 0;
        return s;
    }
    return -1;
}

void engine_slot_clear(struct engine *e, int slot)
{
    if (slot >= 0 && slot < e->max_slots && e->slot_pos[slot] >= 0)
        slot_zero(e, slot);
}

void engine_slot_close(struct engine *e, int slot)
{
    if (slot >= 0 && slot < e->max_slots)
        e->slot_pos[slot] = -1;
}

int engine_slot_position(const struct engine *e, int slot)
{
    return slot >= 0 && slot < e->max_slots ? e->slot_pos[slot] : -1;
}

size_t engine_slot_state_len(const struct engine *e)
{
    return (size_t)e->L * (e->R + 1) * e->H;
}

/* Each layer's cell state then its ring, per layer, so a saved state is one
 * flat array whatever the backend.  Saves into `to`, or restores from
 * `from`. */
static int slot_copy(struct engine *e, int slot, float *to, const float *from)
{
    if (engine_slot_position(e, slot) < 0)
        return -1;
    size_t H = (size_t)e->H, R = (size_t)e->R, S = (size_t)e->max_slots;
    const struct backend_ops *ops = e->be->ops;
    for (int l = 0; l < e->L; l++) {
        float *c = e->pool_c + ((size_t)l * S + (size_t)slot) * H;
        float *ring = e->pool_ring + ((size_t)l * S + (size_t)slot) * R * H;
        size_t at = (size_t)l * (R + 1) * H;
        int rc = to ? ops->download(e->be, to + at, c, H * sizeof(float)) |
                          ops->download(e->be, to + at + H, ring, R * H * sizeof(float))
                    : ops->upload(e->be, c, from + at, H * sizeof(float)) |
                          ops->upload(e->be, ring, from + at + H, R * H * sizeof(float));
        if (rc)
            return -1;
    }
    return 0;
}

int engine_slot_save(struct engine *e, int slot, float *state)
{
    return slot_copy(e, slot, state, NULL);
}

int engine_slot_restore(struct engine *e, int slot, const float *state, int position)
{
    if (position < 0 || slot_copy(e, slot, NULL, state) != 0)
        return -1;
    e->slot_pos[slot] = position;
    return 0;
}
