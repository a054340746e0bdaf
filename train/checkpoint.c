/* checkpoint.c - a training run saved at a step and resumed there (see
 * checkpoint.h).  The state is JSON in the files' metadata, its doubles as
 * C99 hex floats ("%a"): JSON numbers as cJSON prints them lose the last
 * bits, and a resumed run should report what the whole run would have.
 * Every value read back is checked before it is used, since a damaged
 * state must give a message, not a crash or a read out of bounds.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "error.h"
#include "safetensors.h"

/* Bound on a step, an epoch, a count or a position in a state: far above
 * any run's, and a whole number a double holds exactly. */
#define STATE_MAX 1e15

static const cJSON *field(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

/* Whether v is a whole number from 0 to max (NAN is not). */
static int whole(double v, double max)
{
    return v >= 0 && v <= max && v == floor(v);
}

static int get_whole(const cJSON *o, const char *name, double max, double *out)
{
    const cJSON *v = field(o, name);
    if (!cJSON_IsNumber(v) || !whole(v->valuedouble, max))
        return -1;
    *out = v->valuedouble;
    return 0;
}

static cJSON *rng_json(const struct rng *g)
{
    char buf[4][17];
    const char *s[4];
    for (int i = 0; i < 4; i++) {
        snprintf(buf[i], sizeof buf[i], "%016llx", (unsigned long long)g->s[i]);
        s[i] = buf[i];
    }
    return cJSON_CreateStringArray(s, 4);
}

static int rng_from_json(const cJSON *a, struct rng *g)
{
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != 4)
        return -1;
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, a)
    {
        char *end = NULL;
        if (!cJSON_IsString(x) || !x->valuestring[0])
            return -1;
        g->s[i++] = strtoull(x->valuestring, &end, 16);
        if (*end)
            return -1;
    }
    return 0;
}

static cJSON *doubles_json(const double *v, int n)
{
    char buf[16][40];
    const char *s[16];
    for (int i = 0; i < n && i < 16; i++) {
        snprintf(buf[i], sizeof buf[i], "%a", v[i]);
        s[i] = buf[i];
    }
    return cJSON_CreateStringArray(s, n);
}

/* v[0..n) from an array of min to n doubles, NAN for those it lacks (a
 * state written before they were kept). */
static int doubles_from_json(const cJSON *a, double *v, int min, int n)
{
    int size = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : -1, i = 0;
    if (size < min || size > n)
        return -1;
    const cJSON *x;
    cJSON_ArrayForEach(x, a)
    {
        char *end = NULL;
        if (!cJSON_IsString(x))
            return -1;
        v[i] = strtod(x->valuestring, &end);
        if (end == x->valuestring || *end)
            return -1;
        i++;
    }
    for (; i < n; i++)
        v[i] = NAN;
    return 0;
}

static cJSON *point_json(const struct curve_point *p)
{
    const double v[8] = {(double)p->step, p->epoch, p->train_loss, p->valid_loss, p->valid_metric, p->lr,
                         p->tokens_per_s, p->grad_norm};
    return doubles_json(v, 8);
}

/* A point of the learning curve; one from before the gradients' norm was
 * kept has 7 numbers, and no norm (NAN). */
static int point_from_json(const cJSON *a, struct curve_point *p)
{
    double v[8];
    if (doubles_from_json(a, v, 7, 8) || !whole(v[0], STATE_MAX))
        return -1;
    *p = (struct curve_point){(long)v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
    return 0;
}

static char *state_path(const char *ckpt)
{
    size_t n = strlen(ckpt) + 7;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s.state", ckpt);
    return p;
}

/* Floats of the optimizer's state: its arrays of one float a parameter. */
static size_t optim_len(const struct run *r)
{
    return (size_t)optim_state_arrays(r->o.optim.kind, r->o.optim.momentum) * r->model.n_params;
}

int checkpoint_save(struct run *r, const char *path, char *err, size_t errlen)
{
    const size_t n_params = r->model.n_params, slot_len = run_is_lm(r) ? engine_slot_state_len(r->e) : 0;
    const size_t moments_len = optim_len(r);
    cJSON *st = cJSON_CreateObject(), *curve = cJSON_CreateArray(), *slot_pos = cJSON_CreateArray();
    float *slots = slot_len ? malloc(sizeof(float) * slot_len * r->o.batch) : NULL;
    float *moments = moments_len ? malloc(sizeof(float) * moments_len) : NULL;
    char *path2 = state_path(path), *json = NULL;
    int rc = st && curve && slot_pos && path2 && (!slot_len || slots) && (!moments_len || moments)
                 ? 0
                 : error_fmt(err, errlen, "out of memory");
    if (rc == 0)
        rc = run_sync_weights(r, err, errlen);
    if (rc == 0 && engine_optim_state_to_host(r->e, moments, moments_len) != 0)
        rc = error_fmt(err, errlen, "cannot read the optimizer's state back from the %s backend: %s",
                       r->be->ops->name, r->be->err[0] ? r->be->err : "out of memory");
    for (int i = 0; rc == 0 && i < r->curve.n; i++)
        cJSON_AddItemToArray(curve, point_json(&r->curve.p[i]));
    for (int i = 0; rc == 0 && slot_len && i < r->o.batch; i++) {
        cJSON_AddItemToArray(slot_pos, cJSON_CreateNumber(engine_slot_position(r->e, r->slots[i])));
        if (engine_slot_save(r->e, r->slots[i], slots + (size_t)i * slot_len))
            rc = error_fmt(err, errlen, "cannot read a stream's state back from the backend");
    }
    if (rc == 0) {
        cJSON_AddNumberToObject(st, "step", (double)r->step);
        cJSON_AddNumberToObject(st, "epoch", (double)r->epoch);
        cJSON_AddItemToObject(st, "rng", rng_json(&r->epoch_rng));
        cJSON_AddNumberToObject(st, "next_batch", r->next_batch);
        const double acc[5] = {r->loss_sum, (double)r->loss_count, (double)r->tokens, r->norm_sum,
                               (double)r->norm_steps};
        cJSON_AddItemToObject(st, "since_last_point", doubles_json(acc, 5));
        cJSON_AddItemToObject(st, "curve", curve);
        cJSON_AddItemToObject(st, "slot_pos", slot_pos);
        curve = slot_pos = NULL;
        if (r->best)
            cJSON_AddItemToObject(st, "best", point_json(&r->best_at));
        if (run_is_lm(r)) {
            cJSON *w = cJSON_AddObjectToObject(st, "windows");
            double *start = malloc(sizeof(double) * (size_t)r->o.batch);
            for (int i = 0; start && i < r->o.batch; i++)
                start[i] = (double)r->win.start[i];
            if (!w || !start)
                rc = error_fmt(err, errlen, "out of memory");
            else {
                cJSON_AddNumberToObject(w, "pos", (double)r->win.pos);
                cJSON_AddNumberToObject(w, "epoch", (double)r->win.epoch);
                cJSON_AddItemToObject(w, "rng", rng_json(&r->win.rng));
                cJSON_AddItemToObject(w, "start", cJSON_CreateDoubleArray(start, r->o.batch));
            }
            free(start);
        }
        json = cJSON_PrintUnformatted(st);
        if (!json)
            rc = error_fmt(err, errlen, "out of memory");
    }
    if (rc == 0) {
        struct st_write_tensor t[3];
        int nt = 0;
        t[nt++] = (struct st_write_tensor){"optim", 1, {(int64_t)moments_len}, moments};
        if (slot_len)
            t[nt++] = (struct st_write_tensor){"slots", 2, {r->o.batch, (int64_t)slot_len}, slots};
        if (r->best)
            t[nt++] = (struct st_write_tensor){"best", 1, {(int64_t)n_params}, r->best};
        struct st_meta meta[] = {{"training_state", json}};
        /* The state first: a weight file next to an older state would
         * resume wrongly, a state next to an older weight file cannot be
         * found without it. */
        rc = st_write(path2, t, nt, meta, 1, err, errlen);
        if (rc == 0) {
            char *config = cJSON_PrintUnformatted(r->o.root);
            struct st_meta mm[] = {{"training_config", config}, {"training_state", json}};
            rc = config ? model_save(&r->model, path, mm, 2, err, errlen) : error_fmt(err, errlen, "out of memory");
            free(config);
        }
    }
    cJSON_Delete(st);
    cJSON_Delete(curve);
    cJSON_Delete(slot_pos);
    free(json);
    free(slots);
    free(moments);
    free(path2);
    return rc;
}

/* The counters, generator and learning curve of st into r; the name of
 * the first field found damaged, or NULL. */
static const char *restore_progress(struct run *r, const cJSON *st, int has_best)
{
    double step, epoch, next_batch, acc[5];
    if (get_whole(st, "step", STATE_MAX, &step))
        return "step";
    if (get_whole(st, "epoch", STATE_MAX, &epoch))
        return "epoch";
    if (get_whole(st, "next_batch", INT_MAX, &next_batch))
        return "next_batch";
    if (rng_from_json(field(st, "rng"), &r->epoch_rng))
        return "rng";
    /* A state from before the gradients' norms were kept has 3 sums. */
    if (doubles_from_json(field(st, "since_last_point"), acc, 3, 5) || !isfinite(acc[0]) ||
        !whole(acc[1], STATE_MAX) || !whole(acc[2], STATE_MAX) || !(isnan(acc[3]) || isfinite(acc[3])) ||
        !(isnan(acc[4]) || whole(acc[4], STATE_MAX)))
        return "since_last_point";
    if (has_best && point_from_json(field(st, "best"), &r->best_at))
        return "best";
    r->step = (long)step;
    r->epoch = (long)epoch;
    r->next_batch = (int)next_batch;
    r->loss_sum = acc[0];
    r->loss_count = (long)acc[1];
    r->tokens = (long)acc[2];
    r->norm_sum = isnan(acc[3]) ? 0.0 : acc[3];
    r->norm_steps = isnan(acc[4]) ? 0 : (long)acc[4];
    const cJSON *curve = field(st, "curve"), *p;
    if (!cJSON_IsArray(curve))
        return "curve";
    cJSON_ArrayForEach(p, curve)
    {
        struct curve_point pt;
        if (point_from_json(p, &pt) || curve_add(&r->curve, &pt))
            return "curve";
    }
    return NULL;
}

/* A language model's windows, put back into r->win, and its streams'
 * positions into positions[B] (starts[B] is room for the windows' starts);
 * the name of the first field found damaged, or NULL. */
static const char *restore_windows(struct run *r, const cJSON *st, size_t *starts, int *positions)
{
    const int B = r->o.batch;
    const cJSON *w = field(st, "windows"), *start = field(w, "start"), *pos = field(st, "slot_pos"), *x;
    double at, epoch;
    struct rng g;
    if (!cJSON_IsObject(w) || get_whole(w, "pos", STATE_MAX, &at) || get_whole(w, "epoch", STATE_MAX, &epoch) ||
        rng_from_json(field(w, "rng"), &g) || !cJSON_IsArray(start) || cJSON_GetArraySize(start) != B)
        return "windows";
    int i = 0;
    cJSON_ArrayForEach(x, start)
    {
        if (!cJSON_IsNumber(x) || !whole(x->valuedouble, STATE_MAX))
            return "windows";
        starts[i++] = (size_t)x->valuedouble;
    }
    if (lm_windows_restore(&r->win, (size_t)at, (long)epoch, &g, starts) != 0)
        return "windows";
    if (!cJSON_IsArray(pos) || cJSON_GetArraySize(pos) != B)
        return "slot_pos";
    i = 0;
    cJSON_ArrayForEach(x, pos)
    {
        if (!cJSON_IsNumber(x) || !whole(x->valuedouble, INT_MAX))
            return "slot_pos";
        positions[i++] = (int)x->valuedouble;
    }
    return NULL;
}

/* The step of the training state a checkpoint's weight file carries, or
 * -1 when it has none. */
static double weights_step(const char *path)
{
    struct st_file f;
    char why[512];
    double step = -1;
    if (st_open(path, &f, why, sizeof why))
        return -1;
    const char *text = st_meta_get(&f, "training_state");
    cJSON *st = text ? cJSON_ParseWithOpts(text, NULL, 1) : NULL;
    if (get_whole(st, "step", STATE_MAX, &step))
        step = -1;
    cJSON_Delete(st);
    st_close(&f);
    return step;
}

int checkpoint_restore(struct run *r, const char *path, char *err, size_t errlen)
{
    char *path2 = state_path(path), why[512];
    struct st_file f;
    if (!path2 || st_open(path2, &f, why, sizeof why)) {
        error_fmt(err, errlen, "%s: %s", path2 ? path2 : path, path2 ? why : "out of memory");
        free(path2);
        return -1;
    }
    const char *text = st_meta_get(&f, "training_state");
    cJSON *st = text ? cJSON_ParseWithOpts(text, NULL, 1) : NULL;
    const struct st_tensor *optim = st_find(&f, "optim"), *slots = st_find(&f, "slots"), *best = st_find(&f, "best");
    const size_t slot_len = run_is_lm(r) ? engine_slot_state_len(r->e) : 0, moments_len = optim_len(r);
    float *moments = NULL, *all = NULL;
    size_t *starts = NULL;
    int *positions = NULL;
    const char *bad = NULL;
    int rc = 0;
    if (!optim || (size_t)optim->numel != moments_len ||
        (slot_len && (!slots || (size_t)slots->numel != slot_len * (size_t)r->o.batch)) ||
        (best && (size_t)best->numel != r->model.n_params)) {
        rc = error_fmt(err, errlen, "%s does not match this run (another model or batch size?)", path2);
    } else if ((moments_len && !(moments = malloc(sizeof(float) * moments_len))) ||
               (best && !(r->best = malloc(sizeof(float) * r->model.n_params))) ||
               (slot_len && (!(all = malloc(sizeof(float) * slot_len * (size_t)r->o.batch)) ||
                             !(starts = malloc(sizeof *starts * (size_t)r->o.batch)) ||
                             !(positions = malloc(sizeof *positions * (size_t)r->o.batch))))) {
        rc = error_fmt(err, errlen, "out of memory");
    } else if (!cJSON_IsObject(st)) {
        bad = "training_state";
    } else {
        st_to_f32(optim, moments);
        if (engine_optim_state_from_host(r->e, moments, moments_len) != 0)
            rc = error_fmt(err, errlen, "cannot put the optimizer's state on the %s backend: %s", r->be->ops->name,
                           r->be->err[0] ? r->be->err : "out of memory");
        if (rc == 0 && best)
            st_to_f32(best, r->best);
        if (rc == 0)
            bad = restore_progress(r, st, best != NULL);
        /* Both files carry the step: weights of one step resumed from the
         * place and moments of another would be a run that never was. */
        const double step = rc == 0 && !bad ? weights_step(path) : (double)r->step;
        if (step < 0)
            rc = error_fmt(err, errlen, "%s has no training state (not a checkpoint?)", path);
        else if (step != (double)r->step)
            rc = error_fmt(err, errlen, "%s holds the weights of step %.0f but %s the state of step %ld: a "
                           "checkpoint's two files must come from one step (a run ended between writing them, or "
                           "files mixed)", path, step, path2, r->step);
        if (rc == 0 && !bad && !run_is_lm(r) && r->next_batch > 0) {
            /* Redraw this epoch's order from the generator as it was. */
            r->rng = r->epoch_rng;
            if (bucket_batches(&r->train_d, r->o.batch, &r->rng, r->order, r->batch_start, &r->n_batches))
                rc = error_fmt(err, errlen, "out of memory");
            else if (r->next_batch > r->n_batches)
                bad = "next_batch";
        }
        if (rc == 0 && !bad && slot_len)
            bad = restore_windows(r, st, starts, positions);
        if (rc == 0 && !bad && slot_len) {
            st_to_f32(slots, all);
            for (int i = 0; rc == 0 && i < r->o.batch; i++) {
                r->slots[i] = engine_slot_open(r->e);
                if (engine_slot_restore(r->e, r->slots[i], all + (size_t)i * slot_len, positions[i]) != 0)
                    rc = error_fmt(err, errlen, "cannot put a stream's state on the %s backend: %s",
                                   r->be->ops->name, r->be->err[0] ? r->be->err : "no free slot");
            }
        }
    }
    if (bad)
        rc = error_fmt(err, errlen, "%s: its training state is damaged or not of this run (at \"%s\")", path2, bad);
    free(all);
    free(starts);
    free(positions);
    free(moments);
    free(path2);
    cJSON_Delete(st);
    st_close(&f);
    if (rc == 0)
        fprintf(stderr, "resuming %s at step %ld\n", path, r->step);
    return rc;
}
