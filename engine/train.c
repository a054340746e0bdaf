/* train.c - the backward pass: gradients of a batch's loss with respect to
 * every parameter, for every cell, connection scheme and head.
 *
 * The forward runs as for inference (forward.c) but keeps a tape: every
 * layer's output, each direction's h with the state carried in before it,
 * the cells' gate activations, the attention queries and weights.  The
 * backward then walks the layers top down and, in each, the steps from
 * last to first.  Gradients with respect to h accumulate in a packed
 * buffer laid out as the tape's h, so whatever reaches a state from later
 * steps (the recurrence, the attention over past states, the temporal
 * skip) is in place before that state's step is processed.  Weight
 * gradients are one GEMM per matrix over all of a layer's steps: the input
 * projections' from the packed inputs, the recurrent matrices' after the
 * walk, from each step's rows kept grouped by matrix (struct pass).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* The gradients' arena, allocated and zeroed on first use; NULL when out
 * of memory. */
static float *grads(struct engine *e)
{
    if (e->g.base)
        return e->g.base;
    size_t bytes = e->m->n_params * sizeof(float);
    float *base = e->be->ops->alloc(e->be, bytes);
    if (!base)
        return NULL;
    e->be->ops->zero(e->be, base, bytes);
    if (engine_make_view(e, base, &e->g) != 0) {
        e->be->ops->free(e->be, base);
        return NULL;
    }
    return base;
}

int engine_zero_grads(struct engine *e)
{
    if (!grads(e))
        return -1;
    e->be->ops->zero(e->be, e->g.base, e->m->n_params * sizeof(float));
    return 0;
}

int engine_grads_to_host(struct engine *e, float *g)
{
    if (!grads(e))
        return -1;
    return e->be->ops->download(e->be, g, e->g.base, e->m->n_params * sizeof(float));
}

/* After the weights changed on the backend: the token tables and graphs
 * go, and the twins follow the weights, so that training and its
 * validation multiply in the precision asked for (BF16 on CUDA), as
 * inference does; on the CPU the packed products give the same bits. */
static void weights_changed(struct engine *e)
{
    engine_drop_derived(e);
    engine_pack_weights(e);
}

int engine_params_from_host(struct engine *e, const float *p)
{
    int rc = e->be->ops->upload(e->be, e->w.base, p, e->m->n_params * sizeof(float));
    weights_changed(e);
    return rc;
}

int engine_params_to_host(struct engine *e, float *p)
{
    return e->be->ops->download(e->be, p, e->w.base, e->m->n_params * sizeof(float));
}

/* The optimizer's state of len floats, zeroed when first asked for (or for
 * another length: another optimizer); NULL when out of memory, or when
 * len is 0. */
static float *optim_state(struct engine *e, size_t len)
{
    struct backend *be = e->be;
    if (len == e->optim_len)
        return e->optim_state;
    be->ops->free(be, e->optim_state);
    e->optim_state = NULL;
    e->optim_len = 0;
    if (len == 0 || len > (size_t)-1 / sizeof(float) || !(e->optim_state = be->ops->alloc(be, len * sizeof(float))))
        return NULL;
    be->ops->zero(be, e->optim_state, len * sizeof(float));
    e->optim_len = len;
    return e->optim_state;
}

int engine_optim_step(struct engine *e, const struct optim_update *u, double *grad_norm)
{
    struct backend *be = e->be;
    const size_t n = e->m->n_params, len = (size_t)optim_state_arrays(u->kind, u->momentum) * n;
    double *squares = engine_ws(e, WS_GRAD_SQUARES, sizeof(double)), sum = NAN;
    backend_clear_error(be);
    if (!grads(e) || (len > 0 && !optim_state(e, len)) || !squares)
        return -1;
    be->ops->optim_step(be, u, e->w.base, e->g.base, e->optim_state, n, squares);
    int rc = be->ops->download(be, &sum, squares, sizeof sum) == 0 ? backend_sync(be) : -1;
    *grad_norm = sqrt(sum);
    if (rc != 0 || isfinite(sum))
        weights_changed(e);
    return rc;
}

int engine_optim_state_to_host(struct engine *e, float *s, size_t len)
{
    if (len > 0 && !optim_state(e, len))
        return -1;
    return len ? e->be->ops->download(e->be, s, e->optim_state, len * sizeof(float)) : 0;
}

int engine_optim_state_from_host(struct engine *e, const float *s, size_t len)
{
    if (len > 0 && !optim_state(e, len))
        return -1;
    return len ? e->be->ops->upload(e->be, e->optim_state, s, len * sizeof(float)) : 0;
}

/* The rows of step u >= -R of the tape's h: the prefix's R steps hold all B
 * rows each, then come the packed steps. */
static int row_of(const struct plan *p, int R, int u)
{
    return u < 0 ? (u + R) * p->n : R * p->n + p->off[u];
}

struct pass {
    struct engine *e;
    const struct plan *p;
    const struct dev_plan *d;
    struct tape t;
    const int *off_x;      /* device: row_of(u) for u >= -R, indexable from -R */
    float *dy;             /* [L + 1][P][Wmax]: dL/dy^k */
    /* The recurrent weights' gradients are one product over all steps
     * once a layer's steps are walked, not a small one a step: each step's
     * dL/d(recurrent product) rows (and dL/dq) go to rows goff[s].. of
     * buffers of P rows grouped by the recurrent matrix the step used,
     * matrix m's rows at group[m] .. group[m + 1] - 1 (steps in order
     * within), and hprev_rows names the tape's row of each one's h_{t-1}. */
    int *goff;             /* host: [T] */
    int group[CONFIG_MAX_SKIP_MATRICES + 1];
    const int *hprev_rows; /* device: [P] */
};

/* The grouped layout of struct pass: 0, or -1 when out of memory. */
static int group_steps(struct pass *ps)
{
    const struct plan *p = ps->p;
    const int M = ps->e->M, R = ps->e->R;
    int *rows = malloc((size_t)p->P * sizeof *rows);
    if (!(ps->goff = malloc((size_t)p->T * sizeof *ps->goff)) || !rows) {
        free(rows);
        return -1;
    }
    int next = 0;
    for (int m = 0; m < M; m++) {
        ps->group[m] = next;
        for (int s = 0; s < p->T; s++) {
            const int n = p->off[s + 1] - p->off[s];
            if ((p->pos + s) % M != m)
                continue;
            ps->goff[s] = next;
            for (int i = 0; i < n; i++)
                rows[next + i] = row_of(p, R, s - 1) + i;
            next += n;
        }
    }
    ps->group[M] = next;
    ps->hprev_rows = engine_upload_ints(ps->e, WS_G_ROWS, rows, (size_t)p->P);
    free(rows);
    return ps->hprev_rows ? 0 : -1;
}

static float *dy_of(const struct pass *ps, int k)
{
    return ps->dy + (size_t)k * ps->p->P * ps->t.Wmax;
}

static int alloc_tape(struct pass *ps, const struct train_options *opt)
{
    struct engine *e = ps->e;
    const struct plan *p = ps->p;
    const size_t fsz = sizeof(float);
    const int H = e->H, LD = e->L * e->D, B = p->n, P = p->P, R = e->R;
    struct tape *t = &ps->t;
    t->B = B;
    t->P = P;
    t->R = R;
    t->Wmax = e->E > e->W ? e->E : e->W;
    t->CW = CELL_CACHE(e->m->cfg.cell, H);
    t->dropout = opt->dropout;
    t->dropout_embed = opt->dropout_embed;
    t->seed = opt->seed;
    t->y = engine_ws(e, WS_T_Y, (size_t)(e->L + 1) * P * t->Wmax * fsz);
    int drops = opt->dropout_embed > 0.0f || (opt->dropout > 0.0f && e->L > 1);
    t->xin = drops ? engine_ws(e, WS_T_XIN, (size_t)e->L * P * t->Wmax * fsz) : NULL;
    t->h = engine_ws(e, WS_T_H, (size_t)LD * ((size_t)R * B + P) * H * fsz);
    t->cache = engine_ws(e, WS_T_CACHE, (size_t)LD * P * t->CW * fsz);
    int dynamic = e->K && e->m->cfg.attn_mode == ATTN_DYNAMIC;
    t->q = dynamic ? engine_ws(e, WS_T_Q, (size_t)LD * P * H * fsz) : NULL;
    t->attn = e->K ? engine_ws(e, WS_T_ATTN, (size_t)LD * P * e->K * fsz) : NULL;
    t->c0 = p->slot ? engine_ws(e, WS_T_C0, (size_t)e->L * B * H * fsz) : NULL;
    ps->dy = engine_ws(e, WS_DY, (size_t)(e->L + 1) * P * t->Wmax * fsz);
    if (!t->y || (drops && !t->xin) || !t->h || !t->cache || (dynamic && !t->q) ||
        (e->K && !t->attn) || (p->slot && !t->c0) || !ps->dy)
        return -1;
    /* (The engine's host scratch holds the plan; these need their own.) */
    int *host = malloc(((size_t)R * B + (size_t)R + p->T + 1) * sizeof *host);
    if (!host)
        return -1;
    /* Where each step's rows start, from -R on (the prefix) to T. */
    for (int u = -R; u <= p->T; u++)
        host[u + R] = row_of(p, R, u);
    int *off_x = engine_upload_ints(e, WS_T_OFF, host, (size_t)R + p->T + 1);
    ps->off_x = off_x ? off_x + R : NULL;
    t->prefix_idx = NULL;
    if (off_x && p->slot) {
        /* The prefix of a carried sequence: the last R states in its ring;
         * h_t sits at ring row t mod R, and rows never written are zero. */
        for (int u = -R; u < 0; u++)
            for (int i = 0; i < B; i++)
                host[(u + R) * B + i] = p->slot[i] * R + ((p->pos + 1 + u) % R + R) % R;
        t->prefix_idx = engine_upload_ints(e, WS_T_PREFIX, host, (size_t)R * B);
    }
    free(host);
    if (!off_x || (p->slot && !t->prefix_idx))
        return -1;
    e->be->ops->zero(e->be, ps->dy, (size_t)(e->L + 1) * P * t->Wmax * fsz);
    return 0;
}

/* The backward of a pooled head (classify, regress): from dL/dlogits to
 * the head's gradients and dL/dy^L. */
static void pooled_head_backward(struct pass *ps, const float *pooled, const float *dlogits, float *dpooled)
{
    struct engine *e = ps->e;
    struct backend *be = e->be;
    const int n = ps->p->n, W = e->W, H = e->H, C = e->C;
    be->ops->gemm(be, 1, 0, C, W, n, 1.0f, dlogits, C, pooled, W, 1.0f, e->g.head_w, W);
    be->ops->add_column_sums(be, e->g.head_b, dlogits, n, C);
    be->ops->gemm(be, 0, 0, n, W, C, 1.0f, dlogits, C, e->w.head_w, W, 0.0f, dpooled, W);
    float *dyl = dy_of(ps, e->L);
    if (e->m->cfg.pool == POOL_MEAN) {
        be->ops->pool_mean_backward(be, dyl, dpooled, W, ps->d->off, ps->d->len, n);
    } else {
        be->ops->scatter_add_rows(be, dyl, W, dpooled, W, ps->d->last, n, H);
        if (e->D == 2)
            be->ops->scatter_add_rows(be, dyl + H, W, dpooled + H, W, NULL, n, H);
    }
}

/* Softmax cross-entropy of a classifier's logits against the labels, or
 * the mean squared error of a regression against its targets; dL/dy^L
 * goes to dy. */
static int pooled_loss(struct pass *ps, const float *y, const struct engine_seq *seqs, const int *labels,
                       struct train_result *res)
{
    struct engine *e = ps->e;
    struct backend *be = e->be;
    const struct plan *p = ps->p;
    const int n = p->n, W = e->W, C = e->C, regress = e->m->cfg.task == TASK_REGRESS;
    int *sorted = malloc((size_t)n * sizeof *sorted);
    float *want = regress ? malloc(sizeof(float) * (size_t)n * C) : NULL;
    float *host = malloc((size_t)n * sizeof(float));
    int rc = sorted && host && (!regress || want) ? 0 : -1;
    for (int i = 0; rc == 0 && i < n; i++) {
        const struct engine_seq *q = &seqs[p->order[i]];
        sorted[i] = regress ? 0 : labels[p->order[i]];
        if (regress)
            memcpy(want + (size_t)i * C, q->target, sizeof(float) * (size_t)C);
    }
    int *dlabels = rc == 0 && !regress ? engine_upload_ints(e, WS_LABELS, sorted, (size_t)n) : NULL;
    float *dwant = regress ? engine_ws(e, WS_TARGETS, sizeof(float) * (size_t)n * C) : NULL;
    float *pooled = engine_ws(e, WS_POOL, (size_t)n * W * sizeof(float));
    float *logits = engine_ws(e, WS_LOGITS, (size_t)n * C * sizeof(float));
    float *dlogits = engine_ws(e, WS_DLOGITS, (size_t)n * C * sizeof(float));
    float *loss = engine_ws(e, WS_LOSS, (size_t)n * sizeof(float));
    float *dpooled = engine_ws(e, WS_DXIN2, (size_t)n * W * sizeof(float));
    if (rc != 0 || (regress ? !dwant : !dlabels) || !pooled || !logits || !dlogits || !loss || !dpooled ||
        (regress && be->ops->upload(be, dwant, want, sizeof(float) * (size_t)n * C)))
        rc = -1;
    if (rc == 0) {
        engine_classify_logits(e, ps->d, n, y, pooled, logits);
        if (regress)
            be->ops->squared_error(be, logits, dwant, n, C, loss, dlogits, 1.0f / ((float)n * C));
        else
            be->ops->softmax_xent(be, logits, n, C, dlabels, loss, dlogits, 1.0f / (float)n);
        pooled_head_backward(ps, pooled, dlogits, dpooled);
        rc = be->ops->download(be, host, loss, (size_t)n * sizeof(float));
    }
    /* regress: per element, so loss / count is the mean squared error */
    for (int i = 0; rc == 0 && i < n; i++)
        res->loss += host[i] / (regress ? C : 1);
    res->count += n;
    free(host);
    free(sorted);
    free(want);
    return rc;
}

/* Cross-entropy of every scored token against the next one. */
static int lm_loss(struct pass *ps, const float *y, struct train_result *res)
{
    struct engine *e = ps->e;
    struct backend *be = e->be;
    const struct plan *p = ps->p;
    const int P = p->P, W = e->W, V = e->V;
    long count = 0;
    for (int r = 0; r < P; r++)
        count += p->target[r] >= 0;
    if (count == 0)
        return 0;
    float *logits = engine_ws(e, WS_LOGITS, (size_t)P * V * sizeof(float));
    float *dlogits = engine_ws(e, WS_DLOGITS, (size_t)P * V * sizeof(float));
    float *loss = engine_ws(e, WS_LOSS, (size_t)P * sizeof(float));
    float *host = malloc((size_t)P * sizeof(float));
    int rc = logits && dlogits && loss && host ? 0 : -1;
    if (rc == 0) {
        be->ops->set_rows(be, logits, V, e->w.head_b, P, V);
        be->ops->gemm(be, 0, 1, P, V, W, 1.0f, y, W, e->w.head_w, W, 1.0f, logits, V);
        be->ops->softmax_xent(be, logits, P, V, ps->d->target, loss, dlogits, 1.0f / (float)count);
        be->ops->gemm(be, 1, 0, V, W, P, 1.0f, dlogits, V, y, W, 1.0f, e->g.head_w, W);
        be->ops->add_column_sums(be, e->g.head_b, dlogits, P, V);
        be->ops->gemm(be, 0, 0, P, W, V, 1.0f, dlogits, V, e->w.head_w, W, 1.0f, dy_of(ps, e->L), W);
        rc = be->ops->download(be, host, loss, (size_t)P * sizeof(float));
    }
    for (int r = 0; rc == 0 && r < P; r++)
        res->loss += host[r];
    res->count += count;
    free(host);
    return rc;
}

/* Backpropagation through time for one layer and direction: dh holds
 * dL/dh of every step on entry (this layer's share of dy); on return dxg
 * holds dL/d(input projection) of every step and the recurrent weights
 * have their gradients. */
static int bptt(struct pass *ps, int l, int dir, float *dh, float *dxg)
{
    struct engine *e = ps->e;
    struct backend *be = e->be;
    const struct plan *p = ps->p;
    const int H = e->H, GH = e->G * H, B = p->n, R = e->R, ld = l * e->D + dir;
    const struct layer_dir_params *w = &e->w.layers[l].dir[dir], *g = &e->g.layers[l].dir[dir];
    const int P = p->P, dynamic = e->m->cfg.attn_mode == ATTN_DYNAMIC;
    float *dhg_all = engine_ws(e, WS_DHG, (size_t)P * GH * sizeof(float));
    float *dc = engine_ws(e, WS_DC, (size_t)B * H * sizeof(float));
    float *dq_all = dynamic ? engine_ws(e, WS_DQ, (size_t)P * H * sizeof(float)) : NULL;
    float *hprev_all = engine_ws(e, WS_G_HPREV, (size_t)P * H * sizeof(float));
    if (!dhg_all || !dc || (dynamic && !dq_all) || !hprev_all)
        return -1;
    be->ops->zero(be, dc, (size_t)B * H * sizeof(float));
    const float *h = tape_h(&ps->t, ld, H);
    for (int s = p->T - 1; s >= 0; s--) {
        const int n = p->off[s + 1] - p->off[s], t0 = p->pos + s + 1, m = (t0 - 1) % e->M;
        const size_t at = (size_t)ld * p->P + p->off[s];
        float *dhg = dhg_all + (size_t)ps->goff[s] * GH, *dq = dq_all ? dq_all + (size_t)ps->goff[s] * H : NULL;
        struct cell_grad cg = {
            .cell = e->m->cfg.cell,
            .n = n,
            .H = H,
            .s = s,
            .off = ps->off_x,
            .h = h,
            .dh = dh,
            .cache = ps->t.cache + at * ps->t.CW,
            .cache_prev = s ? ps->t.cache + ((size_t)ld * p->P + p->off[s - 1]) * ps->t.CW : NULL,
            .c0 = ps->t.c0 ? ps->t.c0 + (size_t)l * B * H : NULL,
            .dc = dc,
            .dxg = dxg + (size_t)p->off[s] * GH,
            .dhg = dhg,
            .peephole = w->peephole,
            .d_peephole = g->peephole,
            .skip_period = e->m->cfg.skip_period,
            .t0 = t0,
            .attn_mode = e->m->cfg.attn_mode,
            .attn_window = e->K,
            .attn = ps->t.attn ? ps->t.attn + at * e->K : NULL,
            .q = ps->t.q ? ps->t.q + at * H : NULL,
            .d_attn_logits = g->attn_logits,
            .dq = dq,
        };
        be->ops->cell_step_backward(be, &cg);
        /* Through W_hh (and W_q) to h_{t-1}. */
        float *dhprev = dh + (size_t)row_of(p, R, s - 1) * H;
        if (s > 0) {
            be->ops->gemm(be, 0, 0, n, H, GH, 1.0f, dhg, GH, w->w_hh[m], H, 1.0f, dhprev, H);
            if (dq)
                be->ops->gemm(be, 0, 0, n, H, H, 1.0f, dq, H, w->attn_query, H, 1.0f, dhprev, H);
        }
    }
    /* The weights' gradients: each matrix's over all its steps at once. */
    be->ops->gather_rows(be, hprev_all, H, h, H, ps->hprev_rows, P, H);
    for (int m = 0; m < e->M; m++) {
        const int r0 = ps->group[m], rows = ps->group[m + 1] - r0;
        if (rows > 0)
            be->ops->gemm(be, 1, 0, GH, H, rows, 1.0f, dhg_all + (size_t)r0 * GH, GH, hprev_all + (size_t)r0 * H, H,
                          1.0f, g->w_hh[m], H);
    }
    be->ops->add_column_sums(be, g->b_hh, dhg_all, P, GH);
    if (dq_all)
        be->ops->gemm(be, 1, 0, H, H, P, 1.0f, dq_all, H, hprev_all, H, 1.0f, g->attn_query, H);
    return 0;
}

/* Every layer, top down: dy^{l+1} -> its parameters and dy^l. */
static int backward_layers(struct pass *ps)
{
    struct engine *e = ps->e;
    struct backend *be = e->be;
    const struct plan *p = ps->p;
    const int H = e->H, W = e->W, GH = e->G * H, P = p->P, R = e->R;
    const size_t fsz = sizeof(float);
    int in_max = e->E > W ? e->E : W;
    float *dh = engine_ws(e, WS_DH, ((size_t)R * p->n + P) * H * fsz);
    float *dxg = engine_ws(e, WS_DXG, (size_t)P * GH * fsz);
    float *dxin = engine_ws(e, WS_DXIN, (size_t)P * in_max * fsz);
    float *dxrev = e->D == 2 ? engine_ws(e, WS_DXIN2, (size_t)P * in_max * fsz) : NULL;
    float *xrev = e->D == 2 ? engine_ws(e, WS_XREV, (size_t)P * in_max * fsz) : NULL;
    if (!dh || !dxg || !dxin || (e->D == 2 && (!dxrev || !xrev)))
        return -1;
    for (int l = e->L - 1; l >= 0; l--) {
        const struct layer_params *w = &e->w.layers[l], *g = &e->g.layers[l];
        const int in = w->in;
        float *dy = dy_of(ps, l + 1);
        if (e->m->cfg.residual_depth && l >= 1) {
            /* y^{l+1} = h + P y^{l-1} */
            const int r = w->residual_from;
            const float *y2 = tape_y(&ps->t, l - 1);
            float *dy2 = dy_of(ps, l - 1);
            if (w->residual_proj) {
                be->ops->gemm(be, 1, 0, W, r, P, 1.0f, dy, W, y2, r, 1.0f, g->residual_proj, r);
                be->ops->gemm(be, 0, 0, P, r, W, 1.0f, dy, W, w->residual_proj, r, 1.0f, dy2, r);
            } else {
                be->ops->add_rows(be, dy2, W, dy, W, P, W);
            }
        }
        const float p_drop = tape_dropout(&ps->t, l);
        const float *layer_in = p_drop > 0.0f ? ps->t.xin + (size_t)l * P * ps->t.Wmax : tape_y(&ps->t, l);
        be->ops->zero(be, dxin, (size_t)P * in * fsz);
        for (int dir = 0; dir < e->D; dir++) {
            const struct layer_dir_params *wd = &w->dir[dir], *gd = &g->dir[dir];
            be->ops->zero(be, dh, ((size_t)R * p->n + P) * H * fsz);
            be->ops->gather_rows(be, dh + (size_t)R * p->n * H, H, dy + dir * H, W, dir ? ps->d->rev : NULL, P, H);
            if (bptt(ps, l, dir, dh, dxg) != 0)
                return -1;
            const float *xin = layer_in;
            if (dir == 1) {
                be->ops->gather_rows(be, xrev, in, layer_in, in, ps->d->rev, P, in);
                xin = xrev;
            }
            be->ops->gemm(be, 1, 0, GH, in, P, 1.0f, dxg, GH, xin, in, 1.0f, gd->w_ih, in);
            be->ops->add_column_sums(be, gd->b_ih, dxg, P, GH);
            if (dir == 0) {
                be->ops->gemm(be, 0, 0, P, in, GH, 1.0f, dxg, GH, wd->w_ih, in, 1.0f, dxin, in);
            } else {
                /* The backward direction saw the input reversed. */
                be->ops->gemm(be, 0, 0, P, in, GH, 1.0f, dxg, GH, wd->w_ih, in, 0.0f, dxrev, in);
                be->ops->scatter_add_rows(be, dxin, in, dxrev, in, ps->d->rev, P, in);
            }
        }
        if (p_drop > 0.0f)
            be->ops->dropout(be, dxin, dxin, (size_t)P * in, p_drop, ps->t.seed + (unsigned long long)l);
        be->ops->add_rows(be, dy_of(ps, l), in, dxin, in, P, in);
    }
    if (e->g.embedding) /* vector inputs have none */
        be->ops->scatter_add_rows(be, e->g.embedding, e->E, dy_of(ps, 0), e->E, ps->d->tokens, P, e->E);
    return 0;
}

int engine_train_batch(struct engine *e, struct engine_seq *seqs, int n, const int *labels,
                       const struct train_options *opt, struct train_result *res, char *err, size_t errlen)
{
    struct backend *be = e->be;
    backend_clear_error(be);
    if (!be->ops->cell_step_backward) {
        snprintf(err, errlen, "the %s backend cannot train yet", be->ops->name);
        return -1;
    }
    if (!(opt->dropout >= 0.0f && opt->dropout < 1.0f && opt->dropout_embed >= 0.0f && opt->dropout_embed < 1.0f)) {
        snprintf(err, errlen, "dropout must be in [0, 1), not %g (embedding: %g)", opt->dropout, opt->dropout_embed);
        return -1;
    }
    if (engine_check_batch(e, seqs, n, err, errlen) != 0)
        return -1;
    for (int i = 0; i < n; i++) {
        if (e->m->cfg.task == TASK_CLASSIFY && (!labels || labels[i] < 0 || labels[i] >= e->C)) {
            snprintf(err, errlen, "sequence %d: label %d is not a class of this model", i, labels ? labels[i] : -1);
            return -1;
        }
        if (e->m->cfg.task == TASK_REGRESS && !seqs[i].target) {
            snprintf(err, errlen, "sequence %d has no regression target", i);
            return -1;
        }
    }
    struct plan p;
    struct dev_plan d;
    struct pass ps = {.e = e, .p = &p, .d = &d};
    int rc = grads(e) && engine_make_plan(e, seqs, n, 0, &p) == 0 && engine_upload_plan(e, &p, &d) == 0 &&
                     alloc_tape(&ps, opt) == 0
                 ? 0
                 : -1;
    const float *y = rc == 0 ? engine_run_layers(e, &p, &d, ps.t.attn, &ps.t) : NULL;
    if (!y)
        rc = -1;
    if (rc == 0)
        rc = e->m->cfg.task == TASK_LM ? lm_loss(&ps, y, res) : pooled_loss(&ps, y, seqs, labels, res);
    if (rc == 0)
        rc = group_steps(&ps) == 0 ? backward_layers(&ps) : -1;
    free(ps.goff);
    if (rc != 0) {
        snprintf(err, errlen, "out of memory training on a batch of %d sequences", n);
        return -1;
    }
    if (backend_sync(be) != 0) {
        snprintf(err, errlen, "%s backend: %s", be->ops->name, be->err);
        return -1;
    }
    res->tokens += p.P;
    for (int i = 0; i < n && p.slot; i++)
        e->slot_pos[p.slot[i]] += p.len[i];
    return 0;
}
