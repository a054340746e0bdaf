/* forward.c - the batched forward pass over whole sequences.
 *
 * Sequences are sorted by length, longest first, and packed time-major the
 * way PyTorch packs them: step s holds the n_s sequences still running, at
 * rows off[s] .. off[s] + n_s - 1.  Every step is then one contiguous block,
 * so each layer costs one input-projection GEMM over all steps and, per
 * step, one recurrent GEMM over exactly the running rows; no work is spent
 * on padding and a sequence's result does not depend on its batch.
 *
 * A GPU backend asks for padding instead (backend_ops.pad_steps): every
 * step holds all sequences, the length is rounded up to whole chunks of
 * steps and the sequences to whole groups of rows, with fillers.  A GPU
 * step costs the same for fewer rows, and the kernels' shapes then depend
 * on the padded sizes only, so a graph recorded for one batch replays for
 * the next with other lengths and about as many texts.
 *
 * The backward direction of a bidirectional layer runs the same code over
 * each sequence reversed within its own length: row (s, i) of the reversed
 * packing is row (len_i - 1 - s, i) of the forward one, a map that is its
 * own inverse, so one index array turns inputs and outputs around.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

int engine_check_batch(const struct engine *e, const struct engine_seq *seqs, int n, char *err, size_t errlen)
{
    if (n <= 0) {
        snprintf(err, errlen, "empty batch");
        return -1;
    }
    int with_slot = 0;
    const int vectors = e->m->cfg.input_dim > 0;
    for (int i = 0; i < n; i++) {
        if (seqs[i].len < 1 || (vectors ? !seqs[i].inputs : !seqs[i].tokens)) {
            snprintf(err, errlen, "sequence %d is empty%s", i, vectors && seqs[i].len > 0 ? " (the model reads vectors)" : "");
            return -1;
        }
        for (int t = 0; !vectors && t < seqs[i].len; t++)
            if (seqs[i].tokens[t] < 0 || seqs[i].tokens[t] >= e->V) {
                snprintf(err, errlen, "sequence %d: token %d at position %d is outside the vocabulary of %d",
                         i, seqs[i].tokens[t], t, e->V);
                return -1;
            }
        if (seqs[i].next && (*seqs[i].next < 0 || *seqs[i].next >= e->V)) {
            snprintf(err, errlen, "sequence %d: next token %d is outside the vocabulary of %d", i, *seqs[i].next,
                     e->V);
            return -1;
        }
        with_slot += seqs[i].slot >= 0;
    }
    if (with_slot && with_slot != n) {
        snprintf(err, errlen, "either every sequence of a batch keeps its state in a slot or none does");
        return -1;
    }
    /* Slots continue their sequences in step, so they must all be at the
     * same position. */
    int pos = with_slot ? engine_slot_position(e, seqs[0].slot) : 0;
    for (int i = 0; i < with_slot; i++) {
        int at = engine_slot_position(e, seqs[i].slot);
        if (at < 0) {
            snprintf(err, errlen, "sequence %d: slot %d is not open", i, seqs[i].slot);
            return -1;
        }
        if (at != pos) {
            snprintf(err, errlen, "sequence %d: slot %d is at token %d, the batch at %d", i, seqs[i].slot, at, pos);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (seqs[j].slot == seqs[i].slot) {
                snprintf(err, errlen, "slot %d appears twice in one batch", seqs[i].slot);
                return -1;
            }
    }
    return 0;
}

/* Steps per chunk of a wavefront (backends with lanes): layer l steps
 * through chunk k on lane l while layer l + 1 steps through chunk k - 2
 * and projects chunk k - 1 on lanes of its own, as cuDNN overlaps layers.
 * A step's products are too small to fill a GPU (at batch 64 and H 512,
 * 16 tiles of cuBLAS's on 132 SMs), so layers running at once cost little
 * more than one, and a projection running beside a layer's steps no
 * longer waits in line before them; the pipeline fills in
 * 2(L - 1) chunks, and each chunk's projection is still one product of 8
 * steps' rows.  A padded plan's length is whole chunks. */
#define WAVE_CHUNK 8

/* A padded plan's width is a multiple of this many rows, so that batches
 * of 1 to 8 texts, 9 to 16 and so on share their recorded graphs. */
#define PAD_ROWS 8

static size_t round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

/* The caller's sequence at sorted position i of a plan, or NULL for a
 * filler (engine_make_plan). */
static struct engine_seq *seq_at(const struct plan *p, struct engine_seq *seqs, int i)
{
    return p->order[i] < p->seqs ? &seqs[p->order[i]] : NULL;
}

/* Indices sorted by length, longest first; stable, so equal batches give
 * equal packings.  qsort has no context argument in C11, and an insertion
 * sort is fast for batches of a few hundred. */
static void sort_order(int *order, int n, const int *lens)
{
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = 1; i < n; i++) {
        int x = order[i], j = i;
        while (j > 0 && lens[order[j - 1]] < lens[x]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = x;
    }
}

int engine_make_plan(struct engine *e, const struct engine_seq *seqs, int n, int pad, struct plan *p)
{
    /* A padded plan also rounds its width up to whole groups of rows,
     * with filler sequences of one token whose results nobody reads. */
    const int width = pad ? (int)round_up((size_t)n, PAD_ROWS) : n;
    p->seqs = n;
    p->n = width;
    p->T = 0;
    p->P = 0;
    for (int i = 0; i < n; i++) {
        p->P += seqs[i].len;
        if (seqs[i].len > p->T)
            p->T = seqs[i].len;
    }
    if (pad) {
        p->T = (int)round_up((size_t)p->T, WAVE_CHUNK);
        p->P = width * p->T;
    }
    int with_slot = seqs[0].slot >= 0;
    p->pos = with_slot ? engine_slot_position(e, seqs[0].slot) : 0;
    /* One block: what the device reads first, from len to tokens_rev
     * (engine_upload_plan copies it whole), then order and the lengths in
     * the caller's order, which only the host reads. */
    size_t need = 4 * (size_t)width + (size_t)p->T + 1 + 4 * (size_t)p->P + 2 * (size_t)width;
    int *h = engine_host(e, HOST_PLAN, need * sizeof(int));
    if (!h)
        return -1;
    p->len = h;
    p->last = h + width;
    p->slot = with_slot ? h + 2 * width : NULL;
    p->hprev = with_slot ? h + 3 * width : NULL;
    p->off = h + 4 * width;
    p->tokens = p->off + p->T + 1;
    p->rev = p->tokens + p->P;
    p->target = p->rev + p->P;
    p->tokens_rev = p->target + p->P;
    p->order = p->tokens_rev + p->P;
    int *caller_len = p->order + width;

    for (int i = 0; i < width; i++)
        caller_len[i] = i < n ? seqs[i].len : 1;
    sort_order(p->order, width, caller_len);
    for (int i = 0; i < width; i++) {
        p->len[i] = caller_len[p->order[i]];
        if (p->slot) {
            p->slot[i] = seqs[p->order[i]].slot;
            p->hprev[i] = p->slot[i] * e->R + p->pos % e->R;
        }
    }
    /* off[s]: rows before step s; n_s = sequences longer than s, or all
     * of them in a padded plan. */
    p->off[0] = 0;
    for (int s = 0, running = width; s < p->T; s++) {
        while (!pad && running > 0 && p->len[running - 1] <= s)
            running--;
        p->off[s + 1] = p->off[s] + running;
    }
    const int E = e->E;
    p->inputs = e->m->cfg.input_dim ? engine_host(e, HOST_INPUTS, (size_t)p->P * E * sizeof(float)) : NULL;
    if (e->m->cfg.input_dim && !p->inputs)
        return -1;
    for (int i = 0; i < width; i++) {
        const struct engine_seq *q = p->order[i] < n ? &seqs[p->order[i]] : NULL;
        const int len = q ? q->len : 0;
        for (int s = 0; s < len; s++) {
            int row = p->off[s] + i;
            if (p->inputs) {
                memcpy(p->inputs + (size_t)row * E, q->inputs + (size_t)s * E, sizeof(float) * (size_t)E);
                p->tokens[row] = 0;
                p->target[row] = -1;
            } else {
                p->tokens[row] = q->tokens[s];
                p->target[row] = s + 1 < q->len ? q->tokens[s + 1] : q->next ? *q->next : -1;
            }
            p->rev[row] = p->off[q->len - 1 - s] + i;
        }
        /* The rows of a padded plan after the sequence's end, and all of a
         * filler's: a valid token and input, no target, and in place when
         * reversed. */
        for (int s = len; pad && s < p->T; s++) {
            int row = p->off[s] + i;
            if (p->inputs)
                memset(p->inputs + (size_t)row * E, 0, sizeof(float) * (size_t)E);
            p->tokens[row] = 0;
            p->target[row] = -1;
            p->rev[row] = row;
        }
        p->last[i] = p->off[p->len[i] - 1] + i;
    }
    for (int row = 0; row < p->P; row++)
        p->tokens_rev[row] = p->tokens[p->rev[row]];
    return 0;
}

/* The plan's index arrays in one copy: a copy to a GPU costs some
 * microseconds of latency whatever its size, and a forward used to make
 * nine. */
int engine_upload_plan(struct engine *e, const struct plan *p, struct dev_plan *d)
{
    const int *first = p->len, *end = p->tokens_rev + p->P;
    int *base = engine_upload_ints(e, WS_PLAN, first, (size_t)(end - first));
    if (!base)
        return -1;
    d->len = base;
    d->last = base + (p->last - first);
    d->slot = p->slot ? base + (p->slot - first) : NULL;
    d->hprev = p->slot ? base + (p->hprev - first) : NULL;
    d->off = base + (p->off - first);
    d->tokens = base + (p->tokens - first);
    d->rev = base + (p->rev - first);
    d->target = base + (p->target - first);
    d->tokens_rev = base + (p->tokens_rev - first);
    d->inputs = NULL;
    if (p->inputs) {
        size_t bytes = sizeof(float) * (size_t)p->P * e->E;
        d->inputs = engine_ws(e, WS_INPUTS, bytes);
        if (!d->inputs || e->be->ops->upload(e->be, d->inputs, p->inputs, bytes) != 0)
            return -1;
    }
    return 0;
}

/* A forward projects each step's inputs just before the step, on backends
 * that ask for it, when the projections of all steps would not stay in
 * cache (their trip through memory cost the CPU engine 5% of a batch of
 * 64 x 128 tokens) and a step has rows enough to share the weights' trip
 * from cache (at batch 1 that trip, once a step, made the RRA benchmark
 * 30% slower). */
#define PROJECT_ALL_MAX_BYTES ((size_t)8 << 20)
#define PROJECT_STEP_MIN_ROWS 32

static void lane_use(struct backend *be, int lane)
{
    if (be->ops->lane_use)
        be->ops->lane_use(be, lane);
}

static void lane_wait(struct backend *be, int lane)
{
    if (be->ops->lane_wait)
        be->ops->lane_wait(be, lane);
}

/* What the tasks of one forward share: the batch, its outputs and the
 * scratch of every lane. */
struct layers_run {
    struct engine *e;
    const struct plan *p;
    const struct dev_plan *d;
    float *attn;
    const struct tape *tape;
    int chunk, chunks, tables, hsep;
    int q_lanes; /* lane q_lanes + k runs the queries' product of lane k's steps; 0: none */
    float *ys[CONFIG_MAX_LAYERS + 1]; /* y^k, 1-based as in MODELS.md: y^0 is the embedded input */
    float *xrev, *xg, *hg, *qs, *hprev0, *c, *ring, *hout;
    size_t xg_rows;
};

/* Layer l's input: in training with dropout, its dropped-out copy (the
 * depth residual adds the undropped output). */
static float *layer_input(const struct layers_run *w, int l)
{
    if (w->tape && tape_dropout(w->tape, l) > 0.0f)
        return w->tape->xin + (size_t)l * w->p->P * w->tape->Wmax;
    return w->ys[l];
}

/* Make that copy, before the layer's first task. */
static void drop_layer_input(const struct layers_run *w, int l)
{
    struct engine *e = w->e;
    if (w->tape && tape_dropout(w->tape, l) > 0.0f)
        e->be->ops->dropout(e->be, layer_input(w, l), w->ys[l], (size_t)w->p->P * e->w.layers[l].in,
                            tape_dropout(w->tape, l), w->tape->seed + (unsigned long long)l);
}

/* The step after chunk k's last. */
static int chunk_end(const struct layers_run *w, int k)
{
    const int s1 = (k + 1) * w->chunk;
    return s1 < w->p->T ? s1 : w->p->T;
}

/* Task: layer l's input projection (direction dir) of chunk k into xg:
 * read from the token tables for layer 0 when the engine has them, else
 * computed from the layer input. */
static void project_chunk(const struct layers_run *w, int l, int dir, int k, float *xg)
{
    struct engine *e = w->e;
    const int *off = w->p->off, GH = e->G * e->H, in = e->w.layers[l].in;
    const int s1 = chunk_end(w, k), row0 = off[k * w->chunk];
    const float *x = layer_input(w, l);
    /* The backward direction reads its input reversed, made at its first
     * chunk. */
    if (dir == 1 && !(l == 0 && w->tables)) {
        if (k == 0)
            e->be->ops->gather_rows(e->be, w->xrev, in, x, in, w->d->rev, w->p->P, in);
        x = w->xrev;
    }
    if (l == 0 && w->tables)
        e->be->ops->gather_rows(e->be, xg, GH, e->token_xg[dir], GH,
                                (dir ? w->d->tokens_rev : w->d->tokens) + row0, off[s1] - row0, GH);
    else
        engine_input_projection(e, l, dir, x + (size_t)row0 * in, off[s1] - row0, xg);
}

/* Task: layer l's steps of chunk k (direction dir) on lane's scratch from
 * the projection xg, then the rows of y they complete: the chunk's when
 * chunks run as a wavefront (wave), else all of them at the last chunk.
 * h kept apart (hsep) goes into them, the backward direction's reversed. */
static void run_chunk(const struct layers_run *w, int l, int dir, int k, int lane, const float *xg, int wave)
{
    struct engine *e = w->e;
    struct backend *be = e->be;
    const struct plan *p = w->p;
    const struct dev_plan *d = w->d;
    const struct tape *tape = w->tape;
    const int H = e->H, W = e->W, P = p->P, n = p->n, GH = e->G * H, D = e->D;
    const int s0 = k * w->chunk, s1 = chunk_end(w, k), row0 = p->off[s0];
    const int ld = l * D + dir;
    float *y = w->ys[l + 1];
    float *cl = d->slot ? e->pool_c + (size_t)l * e->max_slots * H : w->c + (size_t)lane * n * H;
    float *rl = d->slot ? e->pool_ring + (size_t)l * e->max_slots * e->R * H
                        : w->ring + (size_t)lane * n * e->R * H;
    float *hp0 = w->hprev0 ? w->hprev0 + (size_t)lane * n * H : NULL;
    /* Training keeps h after its prefix; else h goes straight into the
     * layer output unless kept apart (hsep). */
    float *pre = tape ? tape_h(tape, ld, H) : NULL;
    float *h = tape ? pre + (size_t)tape->R * tape->B * H
               : w->hsep && (D == 2 || l >= 1) ? w->hout + (size_t)(D == 2 ? dir : lane) * P * H
                                               : y;
    if (k == 0) {
        if (tape && tape->c0)
            be->ops->gather_rows(be, tape->c0 + (size_t)l * n * H, H, cl, H, d->slot, n, H);
        if (!d->slot)
            be->ops->zero(be, cl, (size_t)n * H * sizeof(float));
        if (p->pos)
            be->ops->gather_rows(be, hp0, H, rl, H, d->hprev, n, H);
        if (tape && tape->prefix_idx)
            be->ops->gather_rows(be, pre, H, rl, H, tape->prefix_idx, tape->R * tape->B, H);
        else if (tape)
            be->ops->zero(be, pre, (size_t)tape->R * tape->B * H * sizeof(float));
    }
    for (int s = s0; s < s1; s++) {
        struct layer_run r = {
            .layer = l,
            .dir = dir,
            .n = p->off[s + 1] - p->off[s],
            .hprev = s ? h + (size_t)p->off[s - 1] * H : hp0,
            .xg = xg + (size_t)(p->off[s] - row0) * GH,
            .c = cl,
            .ring = rl,
            .slot = d->slot,
            .t0 = p->pos + s + 1,
            .out = h + (size_t)p->off[s] * H,
            .attn = w->attn ? w->attn + ((size_t)ld * P + p->off[s]) * e->K : NULL,
            .cache = tape ? tape->cache + ((size_t)ld * P + p->off[s]) * tape->CW : NULL,
            .hg = w->hg + (size_t)lane * n * GH,
            .q = tape && tape->q ? tape->q + ((size_t)ld * P + p->off[s]) * H
                 : w->qs         ? w->qs + (size_t)lane * n * H
                                 : NULL,
            .lane = lane,
            .q_lane = w->q_lanes ? w->q_lanes + lane : 0,
        };
        engine_layer_step(e, &r);
    }
    if (!wave && k < w->chunks - 1)
        return;
    const int y0 = wave ? row0 : 0, y1 = wave ? p->off[s1] : P;
    if (h != y)
        be->ops->gather_rows(be, y + (size_t)y0 * W + dir * H, W, h + (size_t)y0 * H, H, dir ? d->rev : NULL,
                             y1 - y0, H);
}

/* The depth residual into rows y0 .. y1 - 1 of layer l's output, once
 * both directions have written them. */
static void depth_residual(const struct layers_run *w, int l, int y0, int y1)
{
    struct engine *e = w->e;
    if (e->m->cfg.residual_depth && l >= 1)
        engine_residual(e, l, w->ys[l + 1] + (size_t)y0 * e->W, w->ys[l - 1] + (size_t)y0 * e->w.layers[l - 1].in,
                        y1 - y0);
}

/* Run every layer; returns the last layer's output [P, W] or NULL.
 *
 * The work is cut into tasks: a layer's input projection of a chunk of
 * steps, and its steps over the chunk (with the depth residual of the
 * rows they complete).  One lane runs them layer by layer, with chunks of
 * one step (project_each_step) or of all T.  With lanes, a two-direction
 * model runs its directions on lanes 0 and 1, and a one-direction model
 * runs as a wavefront: layer l's steps on lane l, its projections on lane
 * L + l, each projection one chunk ahead of the layer's steps and one
 * behind the steps of the layer below, so that it overlaps both.  So
 * every buffer a task writes is its lane's own, or rows of the chunk. */
float *engine_run_layers(struct engine *e, const struct plan *p, const struct dev_plan *d, float *attn,
                         const struct tape *tape)
{
    struct backend *be = e->be;
    const int H = e->H, W = e->W, P = p->P, n = p->n, GH = e->G * H, L = e->L, D = e->D, T = p->T;
    const size_t fsz = sizeof(float);
    const int max_lanes = be->ops->lane_use ? be->ops->max_lanes : 1;
    const int wave = !tape && D == 1 && L > 1 && 2 * L <= max_lanes && T > WAVE_CHUNK;
    const int lanes = wave ? L : D <= max_lanes ? D : 1;
    const int each_step = be->ops->project_each_step && n >= PROJECT_STEP_MIN_ROWS &&
                          (size_t)P * GH * fsz > PROJECT_ALL_MAX_BYTES;
    const int chunk = each_step ? 1 : wave ? WAVE_CHUNK : T, chunks = (T + chunk - 1) / chunk;
    const int dynamic = e->K && e->m->cfg.attn_mode == ATTN_DYNAMIC;
    const int nbuf = wave && L > 3 ? L : 3;
    /* The lanes that step (wave: one a layer; else one a direction), and
     * with dynamic attention as many again for their queries, past those
     * in use, where there are that many. */
    const int stepping = wave ? L : lanes, in_use = wave ? 2 * L : lanes;
    int in_max = e->E > W ? e->E : W;
    struct layers_run w = {
        .e = e, .p = p, .d = d, .attn = attn, .tape = tape, .chunk = chunk, .chunks = chunks,
        /* Training keeps the embedded input on its tape, and moves the
         * weights the tables were made from. */
        .tables = e->token_xg[0] && !tape,
        /* The first chunk has the most rows: sequences only end. */
        .xg_rows = (size_t)p->off[chunk],
        /* The recurrence's h kept apart from the layer output (training
         * keeps its own): per direction, interleaved into y afterwards, or
         * per lane in a wavefront with the depth residual, which adds to y
         * chunk by chunk while the next chunk still reads h. */
        .hsep = tape ? 0 : D == 2 ? 2 : wave && e->m->cfg.residual_depth ? lanes : 0,
        .q_lanes = dynamic && be->ops->lane_use && in_use + stepping <= max_lanes ? in_use : 0,
    };
    float *x0 = tape ? tape_y(tape, 0) : engine_ws(e, WS_X0, (size_t)P * e->E * fsz);
    w.xrev = D == 2 ? engine_ws(e, WS_XREV, (size_t)P * in_max * fsz) : NULL;
    /* Per lane: the projection (two per layer in a wavefront, the chunk
     * being stepped and the next), the recurrent product, the queries, the
     * h a continued sequence starts from (its slot's last), and the cell
     * states and histories of sequences without slots. */
    w.xg = engine_ws(e, WS_XG, (wave ? 2 * L : lanes) * w.xg_rows * GH * fsz);
    w.hg = engine_ws(e, WS_HG, (size_t)lanes * n * GH * fsz);
    w.qs = dynamic && !tape ? engine_ws(e, WS_Q, (size_t)lanes * n * H * fsz) : NULL;
    w.hprev0 = p->pos ? engine_ws(e, WS_HPREV, (size_t)lanes * n * H * fsz) : NULL;
    w.c = d->slot ? NULL : engine_ws(e, WS_C, (size_t)lanes * n * H * fsz);
    w.ring = d->slot ? NULL : engine_ws(e, WS_RING, (size_t)lanes * n * e->R * H * fsz);
    w.hout = w.hsep ? engine_ws(e, WS_HOUT, (size_t)w.hsep * P * H * fsz) : NULL;
    float *ybuf = tape ? NULL : engine_ws(e, WS_Y, (size_t)nbuf * P * W * fsz);
    if (!x0 || (D == 2 && !w.xrev) || (w.hsep && !w.hout) || !w.xg || !w.hg || (dynamic && !tape && !w.qs) ||
        (!tape && !ybuf) || (!d->slot && (!w.c || !w.ring)) || (p->pos && !w.hprev0))
        return NULL;
    w.ys[0] = x0;
    for (int k = 1; k <= L; k++)
        w.ys[k] = tape ? tape_y(tape, k) : ybuf + (size_t)(k % nbuf) * P * W;

    if (d->inputs)
        be->ops->gather_rows(be, x0, e->E, d->inputs, e->E, NULL, P, e->E);
    else if (engine_needs_embedding(e, w.tables))
        be->ops->gather_rows(be, x0, e->E, e->w.embedding, e->E, d->tokens, P, e->E);
    const size_t xg_size = w.xg_rows * GH;
    if (wave) {
        /* Round r: layer l projects chunk r - 2l + 1 and steps chunk
         * r - 2l, whose projection the round before made.  Lane l waits
         * for its projections before the next is queued, and the next
         * waits for the lane below and for lane l's steps of two chunks
         * back, the last to read its buffer. */
        for (int r = -1; r < chunks + 2 * (L - 1); r++)
            for (int l = 0; l < L; l++) {
                const int kp = r - 2 * l + 1, ks = r - 2 * l;
                const int projects = kp >= 0 && kp < chunks, steps = ks >= 0 && ks < chunks;
                if (steps) {
                    lane_use(be, l);
                    lane_wait(be, L + l);
                }
                if (projects) {
                    lane_use(be, L + l);
                    if (l == 0 || kp >= 2)
                        lane_wait(be, l);
                    if (l > 0)
                        lane_wait(be, l - 1);
                    project_chunk(&w, l, 0, kp, w.xg + (size_t)(2 * l + kp % 2) * xg_size);
                }
                if (steps) {
                    lane_use(be, l);
                    run_chunk(&w, l, 0, ks, l, w.xg + (size_t)(2 * l + ks % 2) * xg_size, 1);
                    depth_residual(&w, l, p->off[ks * chunk], p->off[chunk_end(&w, ks)]);
                }
            }
    } else {
        for (int task = 0; task < L * D * chunks; task++) {
            const int l = task / (D * chunks), dir = task / chunks % D, k = task % chunks;
            const int lane = lanes == 2 ? dir : 0;
            if (dir == 0 && k == 0)
                drop_layer_input(&w, l);
            if (lanes == 2) {
                /* Lane 1 starts the backward direction where lane 0 is. */
                if (dir == 0 && k == 0) {
                    lane_use(be, 1);
                    lane_wait(be, 0);
                }
                lane_use(be, dir);
            }
            float *xg = w.xg + (size_t)lane * xg_size;
            project_chunk(&w, l, dir, k, xg);
            run_chunk(&w, l, dir, k, lane, xg, 0);
            if (dir < D - 1 || k < chunks - 1)
                continue;
            /* The layer's directions join before its depth residual and
             * the next layer. */
            if (lanes == 2) {
                lane_use(be, 0);
                lane_wait(be, 1);
            }
            depth_residual(&w, l, 0, P);
        }
    }
    /* Lane 0 goes on when every lane is done (the queries' lanes are
     * each step's cell's to wait for). */
    if (in_use > 1) {
        lane_use(be, 0);
        for (int k = 1; k < in_use; k++)
            lane_wait(be, k);
    }
    return w.ys[L];
}

void engine_classify_logits(struct engine *e, const struct dev_plan *d, int n, const float *y, float *pooled,
                            float *logits)
{
    struct backend *be = e->be;
    const int W = e->W, H = e->H, C = e->C;
    if (e->m->cfg.pool == POOL_MEAN) {
        be->ops->pool_mean(be, pooled, y, W, d->off, d->len, n);
    } else {
        /* The forward direction's last output; the backward direction's
         * final state is its output at position 0 (PyTorch's h_n). */
        be->ops->gather_rows(be, pooled, W, y, W, d->last, n, H);
        if (e->D == 2)
            be->ops->gather_rows(be, pooled + H, W, y + H, W, NULL, n, H);
    }
    be->ops->set_rows(be, logits, C, e->w.head_b, n, C);
    engine_gemm_weights(e, n, C, W, pooled, W, e->w.head_w, 1.0f, logits, C);
}

static int classify_head(struct engine *e, const struct plan *p, const struct dev_plan *d, const float *y,
                         struct engine_seq *seqs)
{
    struct backend *be = e->be;
    const int n = p->n, W = e->W, C = e->C;
    float *pooled = engine_ws(e, WS_POOL, (size_t)n * W * sizeof(float));
    float *logits = engine_ws(e, WS_LOGITS, 2 * (size_t)n * C * sizeof(float));
    float *host = engine_host(e, HOST_RESULTS, 2 * (size_t)n * C * sizeof(float));
    if (!pooled || !logits || !host)
        return -1;
    engine_classify_logits(e, d, n, y, pooled, logits);
    float *probs = logits + (size_t)n * C;
    be->ops->gather_rows(be, probs, C, logits, C, NULL, n, C);
    be->ops->softmax_rows(be, probs, n, C);
    int rc = be->ops->download(be, host, logits, 2 * (size_t)n * C * sizeof(float));
    for (int i = 0; rc == 0 && i < n; i++) {
        struct engine_seq *q = seq_at(p, seqs, i);
        if (!q)
            continue;
        if (q->logits)
            memcpy(q->logits, host + (size_t)i * C, (size_t)C * sizeof(float));
        if (q->probs)
            memcpy(q->probs, host + (size_t)(n + i) * C, (size_t)C * sizeof(float));
    }
    return rc;
}

static int lm_head(struct engine *e, const struct plan *p, const struct dev_plan *d, const float *y,
                   struct engine_seq *seqs)
{
    struct backend *be = e->be;
    const int n = p->n, W = e->W, V = e->V, P = p->P;
    int want_logits = 0, want_last = 0;
    for (int i = 0; i < p->seqs; i++) {
        want_logits |= seqs[i].logits != NULL;
        want_last |= seqs[i].last_logits != NULL;
    }
    /* One buffer, [P] log-probabilities, [n][V] last logits, [P][V]
     * logits, so that one copy brings back what was asked for: a prefix.
     * Each part starts on a 256-byte boundary, as cudaMalloc's buffers
     * do, where cuBLAS's vector loads want them. */
    const size_t at_last = round_up((size_t)P, 64), at_logits = at_last + round_up((size_t)n * V, 64);
    float *lp = engine_ws(e, WS_LOGITS, (at_logits + (size_t)P * V) * sizeof(float));
    size_t down = want_logits ? at_logits + (size_t)P * V : want_last ? at_last + (size_t)n * V : (size_t)P;
    float *host = engine_host(e, HOST_RESULTS, down * sizeof(float));
    if (!lp || !host)
        return -1;
    float *last = lp + at_last, *logits = lp + at_logits;
    be->ops->set_rows(be, logits, V, e->w.head_b, P, V);
    engine_gemm_weights(e, P, V, W, y, W, e->w.head_w, 1.0f, logits, V);
    be->ops->log_softmax_pick(be, logits, P, V, d->target, lp);
    if (want_last || want_logits)
        be->ops->gather_rows(be, last, V, logits, V, d->last, n, V);
    const float *h_lp = host, *h_last = host + at_last, *h_logits = host + at_logits;
    int rc = be->ops->download(be, host, lp, down * sizeof(float));
    for (int i = 0; rc == 0 && i < n; i++) {
        struct engine_seq *q = seq_at(p, seqs, i);
        if (!q)
            continue;
        double sum = 0.0;
        for (int s = 0; s < q->len; s++)
            sum += h_lp[p->off[s] + i];
        q->logprob = sum;
        if (q->token_logprobs)
            for (int s = 0; s < q->len; s++)
                q->token_logprobs[s] = h_lp[p->off[s] + i];
        if (q->logits)
            for (int s = 0; s < q->len; s++)
                memcpy(q->logits + (size_t)s * V, h_logits + (size_t)(p->off[s] + i) * V, (size_t)V * sizeof(float));
        if (q->last_logits)
            memcpy(q->last_logits, h_last + (size_t)i * V, (size_t)V * sizeof(float));
    }
    return rc;
}

/* Rearrange the packed attention weights [L][D][P][K] into each sequence's
 * [L][D][rows][K], by token position. */
static int copy_attention(struct engine *e, const struct plan *p, const float *attn, struct engine_seq *seqs)
{
    const int K = e->K, P = p->P;
    size_t total = (size_t)e->L * e->D * P * K;
    float *host = engine_host(e, HOST_RESULTS, total * sizeof(float));
    if (!host)
        return -1;
    int rc = e->be->ops->download(e->be, host, attn, total * sizeof(float));
    for (int i = 0; rc == 0 && i < p->n; i++) {
        struct engine_seq *q = seq_at(p, seqs, i);
        if (!q || !q->attention)
            continue;
        const size_t rows = q->attention_rows ? (size_t)q->attention_rows : (size_t)q->len;
        for (int ld = 0; ld < e->L * e->D; ld++) {
            int dir = ld % e->D;
            for (int pos = 0; pos < q->len; pos++) {
                int step = dir ? q->len - 1 - pos : pos;
                memcpy(q->attention + ((size_t)ld * rows + pos) * K,
                       host + ((size_t)ld * P + p->off[step] + i) * K, (size_t)K * sizeof(float));
            }
        }
    }
    return rc;
}

struct layers_args {
    const struct plan *p;
    const struct dev_plan *d;
    float *attn;
};

static void *layers_work(struct engine *e, void *arg)
{
    const struct layers_args *a = arg;
    return engine_run_layers(e, a->p, a->d, a->attn, NULL);
}

/* The layers of an inference forward, recorded by shape (graphs.c): the
 * rows of each step (off), the position slots continue from (the steps'
 * numbers are kernel arguments), and which inputs and outputs there are. */
static const float *run_layers(struct engine *e, const struct plan *p, const struct dev_plan *d, float *attn)
{
    struct layers_args a = {p, d, attn};
    if (!e->be->ops->capture_begin)
        return layers_work(e, &a);
    size_t len = (7 + (size_t)p->T + 1) * sizeof(int);
    int *key = malloc(len);
    if (!key)
        return layers_work(e, &a);
    key[0] = 'F';
    key[1] = p->n;
    key[2] = p->T;
    key[3] = p->pos;
    key[4] = d->slot != NULL;
    key[5] = d->inputs != NULL;
    key[6] = attn != NULL;
    memcpy(key + 7, p->off, ((size_t)p->T + 1) * sizeof(int));
    const float *y = engine_recorded(e, key, len, layers_work, &a);
    free(key);
    return y;
}

/* One call of engine_forward: the batch in one plan. */
static int forward_call(struct engine *e, struct engine_seq *seqs, int n, char *err, size_t errlen)
{
    backend_clear_error(e->be);
    struct plan p;
    struct dev_plan d;
    /* Slots keep the state at each sequence's end: no padding for them. */
    const int pad = e->be->ops->pad_steps && seqs[0].slot < 0;
    if (engine_make_plan(e, seqs, n, pad, &p) != 0 || engine_upload_plan(e, &p, &d) != 0) {
        snprintf(err, errlen, "out of memory for a batch of %d sequences", n);
        return -1;
    }
    int want_attn = 0;
    for (int i = 0; i < n; i++)
        want_attn |= seqs[i].attention != NULL;
    float *attn = NULL;
    if (want_attn && e->K) {
        attn = engine_ws(e, WS_ATTN, (size_t)e->L * e->D * p.P * e->K * sizeof(float));
        if (!attn) {
            snprintf(err, errlen, "out of memory for attention weights");
            return -1;
        }
    }
    const float *y = run_layers(e, &p, &d, attn);
    int rc = y ? 0 : -1;
    if (rc == 0)
        rc = e->m->cfg.task == TASK_LM ? lm_head(e, &p, &d, y, seqs) : classify_head(e, &p, &d, y, seqs);
    if (rc == 0 && attn)
        rc = copy_attention(e, &p, attn, seqs);
    if (rc == 0)
        rc = backend_sync(e->be);
    if (rc != 0) {
        /* A failed transfer or kernel leaves its message; else scratch
         * memory ran out. */
        if (e->be->err[0])
            snprintf(err, errlen, "%s backend: %s", e->be->ops->name, e->be->err);
        else
            snprintf(err, errlen, "out of memory running a batch of %d sequences (%d tokens)", n, p.P);
        return -1;
    }
    for (int i = 0; i < n && p.slot; i++)
        e->slot_pos[p.slot[i]] += p.len[i];
    return 0;
}

int engine_forward(struct engine *e, struct engine_seq *seqs, int n, char *err, size_t errlen)
{
    if (engine_check_batch(e, seqs, n, err, errlen) != 0)
        return -1;
    int rc = 0;
    for (int from = 0, to; rc == 0 && from < n; from = to) {
        long tokens = seqs[from].len;
        for (to = from + 1; to < n && tokens + seqs[to].len <= ENGINE_CALL_TOKENS; to++)
            tokens += seqs[to].len;
        rc = forward_call(e, seqs + from, to - from, err, errlen);
    }
    return rc;
}
