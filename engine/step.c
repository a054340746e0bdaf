/* step.c - the incremental step API: a batch of independent sequences, each
 * in its own slot, advances one token.
 *
 * Sequences join and leave between steps, so rows are at different time
 * steps: each row's step number t and slot travel to the cell kernel, and
 * h_{t-1} is gathered from each slot's history ring.  With several
 * recurrent matrices (the skip scheme), rows are ordered so that those
 * using the same matrix are adjacent and share one GEMM.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

static int check_step(const struct engine *e, const int *slots, const int32_t *tokens, int n,
                      char *err, size_t errlen)
{
    if (e->max_slots == 0) {
        snprintf(err, errlen, "this engine has no generation slots");
        return -1;
    }
    if (n < 1 || n > e->max_slots) {
        snprintf(err, errlen, "a step takes 1 to %d sequences, not %d", e->max_slots, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (engine_slot_position(e, slots[i]) < 0) {
            snprintf(err, errlen, "slot %d is not open", slots[i]);
            return -1;
        }
        if (tokens[i] < 0 || tokens[i] >= e->V) {
            snprintf(err, errlen, "token %d is outside the vocabulary of %d", tokens[i], e->V);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (slots[j] == slots[i]) {
                snprintf(err, errlen, "slot %d appears twice in one step", slots[i]);
                return -1;
            }
    }
    return 0;
}

/* Host index arrays of one step, in row order: token, slot, t and hprev
 * lie one after another, for one copy to the device. */
struct step_rows {
    int *order; /* row -> caller's index */
    int *token, *slot, *t, *hprev;
};

static int plan_rows(struct engine *e, const int *slots, const int32_t *tokens, int n, struct step_rows *r)
{
    int *h = engine_host(e, HOST_PLAN, 5 * (size_t)n * sizeof(int));
    if (!h)
        return -1;
    r->token = h;
    r->slot = h + n;
    r->t = h + 2 * n;
    r->hprev = h + 3 * n;
    r->order = h + 4 * n;
    /* Counting sort by recurrent matrix; with M == 1 the order is unchanged. */
    int row = 0;
    for (int m = 0; m < e->M; m++)
        for (int i = 0; i < n; i++)
            if (e->slot_pos[slots[i]] % e->M == m)
                r->order[row++] = i;
    for (int k = 0; k < n; k++) {
        int i = r->order[k];
        r->token[k] = tokens[i];
        r->slot[k] = slots[i];
        r->t[k] = e->slot_pos[slots[i]] + 1;
        r->hprev[k] = slots[i] * e->R + (r->t[k] - 1) % e->R;
    }
    return 0;
}

/* The device buffers of one step. */
struct step_bufs {
    int n;
    const int *d_token, *d_slot, *d_t, *d_hprev, *t_host;
    float *x, *xg, *hprev, *out, *attn;
    float *y;      /* three outputs [n, W]: y^l, y^{l-1}, y^{l-2} in turn */
    float *hg, *q; /* engine_layer_step's scratch */
};

/* The device work of a step (an engine_work): every layer, then the
 * head's logits into b->out, which it returns. */
static void *step_work(struct engine *e, void *arg)
{
    const struct step_bufs *b = arg;
    struct backend *be = e->be;
    const int H = e->H, W = e->W, V = e->V, K = e->K, S = e->max_slots, n = b->n;
    const int tables = e->token_xg[0] != NULL;
    if (engine_needs_embedding(e, tables))
        be->ops->gather_rows(be, b->x, e->E, e->w.embedding, e->E, b->d_token, n, e->E);
    const float *y_prev2 = NULL, *y_prev = b->x;
    float *y = NULL;
    for (int l = 0; l < e->L; l++) {
        float *ring = e->pool_ring + (size_t)l * S * e->R * H;
        y = b->y + (size_t)((l + 1) % 3) * n * W;
        if (l == 0 && tables)
            be->ops->gather_rows(be, b->xg, e->G * H, e->token_xg[0], e->G * H, b->d_token, n, e->G * H);
        else
            engine_input_projection(e, l, 0, y_prev, n, b->xg);
        be->ops->gather_rows(be, b->hprev, H, ring, H, b->d_hprev, n, H);
        struct layer_run run = {
            .layer = l,
            .n = n,
            .hprev = b->hprev,
            .xg = b->xg,
            .c = e->pool_c + (size_t)l * S * H,
            .ring = ring,
            .slot = b->d_slot,
            .t = b->d_t,
            .t_host = b->t_host,
            .out = y,
            .attn = b->attn ? b->attn + (size_t)l * n * K : NULL,
            .hg = b->hg,
            .q = b->q,
            /* Steps run on lane 0. */
            .q_lane = b->q && be->ops->lane_use ? 1 : 0,
        };
        engine_layer_step(e, &run);
        if (e->m->cfg.residual_depth && l >= 1)
            engine_residual(e, l, y, y_prev2, n);
        y_prev2 = y_prev;
        y_prev = y;
    }
    be->ops->set_rows(be, b->out, V, e->w.head_b, n, V);
    engine_gemm_weights(e, n, V, W, y, W, e->w.head_w, 1.0f, b->out, V);
    return b->out;
}

/* The step's work, recorded by shape (graphs.c): the rows, whether
 * attention is wanted, and how many rows use each recurrent matrix (rows
 * are sorted by matrix, one product for each). */
static int run_step(struct engine *e, struct step_bufs *b)
{
    if (!e->be->ops->capture_begin)
        return step_work(e, b) ? 0 : -1;
    int stack[3 + 8], *key = e->M <= 8 ? stack : malloc((3 + (size_t)e->M) * sizeof *key);
    if (!key)
        return step_work(e, b) ? 0 : -1;
    memset(key, 0, (3 + (size_t)e->M) * sizeof *key);
    key[0] = 'S';
    key[1] = b->n;
    key[2] = b->attn != NULL;
    for (int i = 0; i < b->n; i++)
        key[3 + (b->t_host[i] - 1) % e->M]++;
    void *out = engine_recorded(e, key, (3 + (size_t)e->M) * sizeof *key, step_work, b);
    if (key != stack)
        free(key);
    return out ? 0 : -1;
}

int engine_step(struct engine *e, const int *slots, const int32_t *tokens, int n,
                float *logits, float *attention, char *err, size_t errlen)
{
    if (check_step(e, slots, tokens, n, err, errlen) != 0)
        return -1;
    backend_clear_error(e->be);
    struct backend *be = e->be;
    const int H = e->H, W = e->W, V = e->V, K = e->K;
    const size_t fsz = sizeof(float);
    struct step_rows r;
    if (plan_rows(e, slots, tokens, n, &r) != 0)
        goto oom;
    int *d_token = engine_upload_ints(e, WS_PLAN, r.token, 4 * (size_t)n);
    float *x = engine_ws(e, WS_X0, (size_t)n * e->E * fsz);
    float *xg = engine_ws(e, WS_XG, (size_t)n * e->G * H * fsz);
    float *hprev = engine_ws(e, WS_HPREV, (size_t)n * H * fsz);
    float *y = engine_ws(e, WS_Y, 3 * (size_t)n * W * fsz);
    float *hg = engine_ws(e, WS_HG, (size_t)n * e->G * H * fsz);
    const int dynamic = K && e->m->cfg.attn_mode == ATTN_DYNAMIC;
    float *q = dynamic ? engine_ws(e, WS_Q, (size_t)n * H * fsz) : NULL;
    /* The logits, then the attention weights: one copy back. */
    const size_t attn_n = attention && K ? (size_t)e->L * n * K : 0;
    float *out = engine_ws(e, WS_LOGITS, ((size_t)n * V + attn_n) * fsz);
    if (!d_token || !x || !xg || !hprev || !y || !hg || (dynamic && !q) || !out)
        goto oom;
    struct step_bufs b = {
        .n = n, .d_token = d_token, .d_slot = d_token + n, .d_t = d_token + 2 * n, .d_hprev = d_token + 3 * n,
        .t_host = r.t, .x = x, .xg = xg, .hprev = hprev, .y = y, .hg = hg, .q = q, .out = out,
        .attn = attn_n ? out + (size_t)n * V : NULL,
    };
    if (run_step(e, &b) != 0) {
        if (!be->err[0])
            goto oom;
        snprintf(err, errlen, "%s backend: %s", be->ops->name, be->err);
        return -1;
    }

    size_t host_n = (size_t)n * V + attn_n;
    float *host = engine_host(e, HOST_RESULTS, host_n * fsz);
    if (!host)
        goto oom;
    float *h_attn = host + (size_t)n * V;
    int rc = be->ops->download(be, host, out, host_n * fsz);
    if (rc == 0)
        rc = backend_sync(be);
    if (rc != 0) {
        snprintf(err, errlen, "%s backend: %s", be->ops->name, be->err);
        return -1;
    }
    for (int k = 0; k < n; k++) {
        int i = r.order[k];
        memcpy(logits + (size_t)i * V, host + (size_t)k * V, (size_t)V * fsz);
        for (int l = 0; attn_n && l < e->L; l++)
            memcpy(attention + ((size_t)i * e->L + l) * K, h_attn + ((size_t)l * n + k) * K, (size_t)K * fsz);
        e->slot_pos[r.slot[k]]++;
    }
    return 0;
oom:
    snprintf(err, errlen, "out of memory for a step of %d sequences", n);
    return -1;
}
