/* api.c - the endpoint handlers but generation's (generate.c): the
 * forward endpoints, /classify, /score and /attention, which run their
 * texts through the model in one job, and what a server says of itself,
 * /models (and /v1/models), /healthz, /readyz and /metrics (see api.h and
 * api.md).
 */
#include <cjson/cJSON.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "handler.h"
#include "lazy_json.h"
#include "metrics.h"

/* ---- classify, score, attention ---------------------------------------- */

static cJSON *classify_result(const struct served_model *m, const struct job *j, int i, struct lazy_json *z)
{
    (void)z;
    const struct model_config *cfg = &m->model.cfg;
    const int C = m->model.head_out;
    const float *p = j->probs + (size_t)i * C;
    int best = 0;
    for (int c = 1; c < C; c++)
        if (p[c] > p[best])
            best = c;
    cJSON *o = cJSON_CreateObject(), *probs = cJSON_CreateObject();
    int failed = json_put(o, "label", cJSON_CreateString(cfg->classes[best]));
    for (int c = 0; c < C; c++)
        failed |= json_put(probs, cfg->classes[c], cJSON_CreateNumber(p[c]));
    failed |= json_put(o, "probabilities", probs);
    return json_built(o, failed);
}

/* As `rrnserve run` reports it: tokens 2..n scored given their prefixes. */
static cJSON *score_result(const struct served_model *m, const struct job *j, int i, struct lazy_json *z)
{
    const double logprob = j->logprob[i];
    const int scored = j->lens[i] - 1;
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "logprob", cJSON_CreateNumber(logprob));
    failed |= json_put(o, "tokens", cJSON_CreateNumber(scored));
    failed |= json_put(o, "bits_per_char",
                  scored ? cJSON_CreateNumber(-logprob / log(2.0) / scored) : cJSON_CreateNull());
    if (j->logprobs) {
        /* Tokens 2..n, each with the term of the sum it added and the
         * tokens the model held likelier there. */
        const size_t at = job_text_at(j, i);
        const struct logprobs_of l = {&m->tk, j->ids[i] + 1, j->token_logprob + at, job_top(j, at),
                                      j->top_logprobs};
        failed |= json_put(o, "logprobs", lazy_json_array(z, logprobs_item, &l, sizeof l, (size_t)scored));
    }
    return json_built(o, failed);
}

/* A token of a text as a string (a lazy_item). */
struct labels_of {
    const struct tokenizer *tk;
    const int32_t *ids;
};

static cJSON *label_item(const void *ctx, size_t p)
{
    const struct labels_of *l = ctx;
    return token_label(l->tk, l->ids[p]);
}

/* One direction of one layer's weights (see engine.h). */
struct steps_of {
    const float *w; /* [len][K] */
    int d, K;
};

/* Step p (a lazy_item): the K weights and the position of the state each
 * weighs. */
static cJSON *step_item(const void *ctx, size_t p)
{
    const struct steps_of *s = ctx;
    cJSON *step = cJSON_CreateObject(), *weights = cJSON_CreateArray(), *pos = cJSON_CreateArray();
    int failed = json_put(step, "position", cJSON_CreateNumber((double)p));
    for (int k = 1; k <= s->K; k++) {
        failed |= json_put(weights, NULL, cJSON_CreateNumber(s->w[p * s->K + k - 1]));
        failed |= json_put(pos, NULL, cJSON_CreateNumber(s->d == 0 ? (double)p - 1 - k : (double)p + 1 + k));
    }
    failed |= json_put(step, "weights", weights);
    failed |= json_put(step, "positions", pos);
    return json_built(step, failed);
}

static cJSON *attention_result(const struct served_model *m, const struct job *j, int i, struct lazy_json *z)
{
    (void)i;
    const struct model_config *cfg = &m->model.cfg;
    const int L = cfg->layers, D = config_directions(cfg), K = cfg->attn_window, len = j->lens[0];
    const struct labels_of labels = {&m->tk, j->ids[0]};
    cJSON *o = cJSON_CreateObject(), *layers = cJSON_CreateArray();
    int failed = json_put(o, "tokens", lazy_json_array(z, label_item, &labels, sizeof labels, (size_t)len));
    failed |= json_put(o, "mode", cJSON_CreateString(cfg->attn_mode == ATTN_STATIC ? "static" : "dynamic"));
    failed |= json_put(o, "window", cJSON_CreateNumber(K));
    for (int l = 0; l < L && !failed; l++) {
        cJSON *layer = cJSON_CreateObject(), *dirs = cJSON_CreateArray();
        failed |= json_put(layer, "layer", cJSON_CreateNumber(l));
        for (int d = 0; d < D; d++) {
            const struct steps_of steps = {j->attention + ((size_t)l * D + d) * len * K, d, K};
            cJSON *dir = cJSON_CreateObject();
            int bad = json_put(dir, "direction", cJSON_CreateString(d == 0 ? "forward" : "backward"));
            bad |= json_put(dir, "steps", lazy_json_array(z, step_item, &steps, sizeof steps, (size_t)len));
            failed |= json_put(dirs, NULL, json_built(dir, bad));
        }
        failed |= json_put(layer, "directions", dirs);
        failed |= json_put(layers, NULL, layer);
    }
    failed |= json_put(o, "layers", layers);
    return json_built(o, failed);
}

/* How one forward endpoint differs from the others. */
struct forward_endpoint {
    enum job_kind kind;
    const char *path;
    int task;       /* the task the model must have, or -1 */
    int many;       /* accepts "texts" as well as "text" */
    /* Text i's result; its long arrays are z's (written as they are sent). */
    cJSON *(*result)(const struct served_model *m, const struct job *j, int i, struct lazy_json *z);
};

static const struct forward_endpoint classify_ep = {JOB_CLASSIFY, "/classify", TASK_CLASSIFY, 1, classify_result};
static const struct forward_endpoint score_ep = {JOB_SCORE, "/score", TASK_LM, 1, score_result};
static const struct forward_endpoint attention_ep = {JOB_ATTENTION, "/attention", -1, 0, attention_result};

/* One result for "text", {"results": [...]} for "texts". */
static cJSON *forward_results(const struct forward_endpoint *ep, const struct served_model *m,
                              const struct job *j, int many, struct lazy_json *z)
{
    if (!many)
        return ep->result(m, j, 0, z);
    cJSON *o = cJSON_CreateObject(), *results = cJSON_CreateArray();
    int failed = 0;
    for (int i = 0; i < j->n_texts; i++)
        failed |= json_put(results, NULL, ep->result(m, j, i, z));
    failed |= json_put(o, "results", results);
    return json_built(o, failed);
}

/* Answers finished job j, taking it and m. */
static void forward_answer(const struct forward_endpoint *ep, struct served_model *m, struct job *j, int many,
                           struct reply *r)
{
    struct lazy_json *z = answer_holding(m, &j, 1);
    if (!z) {
        reply_error(r, 500, "out of memory");
        return;
    }
    reply_lazy_json(r, 200, forward_results(ep, m, j, many, z), z);
}

static void forward(const struct forward_endpoint *ep, struct api *a, const char *body, size_t len,
                    const struct client *c, struct reply *r)
{
    struct texts t;
    struct job *j = NULL;
    cJSON *req = request_parse(body, len, r);
    struct served_model *m = req ? request_model(a, req, ep->path, ep->task, r) : NULL;
    int ok = m != NULL;
    if (ok && ep->kind == JOB_ATTENTION && m->model.cfg.attn_mode == ATTN_NONE) {
        reply_error(r, 422, "model \"%s\" has no attention (its config has no \"attention\")", m->name);
        ok = 0;
    }
    int logprobs = 0;
    long long top = 0;
    ok = ok && request_texts(req, "text", ep->many, &t, r) == 0 &&
         (ep->kind != JOB_SCORE || request_logprobs(req, &logprobs, &top, r) == 0);
    if (ok && !(j = job_new(ep->kind, t.n))) {
        reply_error(r, 500, "out of memory");
        ok = 0;
    }
    if (j) {
        j->logprobs = logprobs;
        j->top_logprobs = top_logprobs_for(m, top);
    }
    if (ok && request_tokenize(a, m, &t, 0, j, r) == 0 && request_alternatives_fit(j, r) == 0 &&
        jobs_run(m, &j, 1, c, r) == 0 && (ep->kind != JOB_SCORE || request_scores_finite(&t, j, r) == 0)) {
        forward_answer(ep, m, j, t.many, r);
        j = NULL;
        m = NULL;
    }
    job_release(j);
    if (m)
        served_model_release(m);
    cJSON_Delete(req);
}

void api_classify(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    forward(&classify_ep, a, body, len, c, r);
}

void api_score(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    forward(&score_ep, a, body, len, c, r);
}

void api_attention(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    forward(&attention_ep, a, body, len, c, r);
}

/* ---- models, health, metrics ------------------------------------------- */

static cJSON *model_info(const struct served_model *m)
{
    char *config = config_to_json(&m->model.cfg);
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "name", cJSON_CreateString(m->name));
    failed |= json_put(o, "task", cJSON_CreateString(task_name(m->model.cfg.task)));
    failed |= json_put(o, "config", config ? cJSON_Parse(config) : NULL);
    failed |= json_put(o, "parameters", cJSON_CreateNumber((double)m->model.n_params));
    failed |= json_put(o, "sha256", cJSON_CreateString(m->model.sha256));
    free(config);
    return json_built(o, failed);
}

/* GET /v1/models' entry: the completions API's shape of a model. */
static cJSON *openai_model_info(const struct served_model *m)
{
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "id", cJSON_CreateString(m->name));
    failed |= json_put(o, "object", cJSON_CreateString("model"));
    failed |= json_put(o, "created", cJSON_CreateNumber((double)m->modified));
    failed |= json_put(o, "owned_by", cJSON_CreateString("rrnserve"));
    return json_built(o, failed);
}

/* Every served model as info makes it, in an array under key of o. */
static void list_models(struct api *a, cJSON *o, const char *key, cJSON *(*info)(const struct served_model *),
                        struct reply *r)
{
    struct served_model **list = NULL;
    int n = 0;
    if (registry_list(a->reg, &list, &n) != 0) {
        cJSON_Delete(o);
        reply_error(r, 500, "out of memory");
        return;
    }
    cJSON *models = cJSON_CreateArray();
    int failed = !o;
    for (int i = 0; i < n; i++) {
        failed |= json_put(models, NULL, info(list[i]));
        served_model_release(list[i]);
    }
    free(list);
    failed |= json_put(o, key, models);
    reply_json(r, 200, json_built(o, failed));
}

void api_models(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)body, (void)len, (void)c;
    list_models(a, cJSON_CreateObject(), "models", model_info, r);
}

/* GET /v1/models: {"object": "list", "data": [...]}, for the completions
 * API's clients, which look a model up before they use it. */
void api_openai_models(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)body, (void)len, (void)c;
    cJSON *o = cJSON_CreateObject();
    if (o && json_put(o, "object", cJSON_CreateString("list")) != 0) {
        cJSON_Delete(o);
        o = NULL;
    }
    list_models(a, o, "data", openai_model_info, r);
}

void api_healthz(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)a, (void)body, (void)len, (void)c;
    cJSON *o = cJSON_CreateObject();
    reply_json(r, 200, json_built(o, json_put(o, "status", cJSON_CreateString("ok"))));
}

void api_readyz(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)body, (void)len, (void)c;
    struct served_model **list = NULL;
    int n = 0;
    if (atomic_load(&a->stopping)) {
        reply_error(r, 503, "the server is shutting down");
        return;
    }
    if (registry_list(a->reg, &list, &n) != 0) {
        reply_error(r, 500, "out of memory");
        return;
    }
    /* A model whose engine keeps failing (a broken device) makes the whole
     * server unready: a load balancer then sends its traffic elsewhere
     * until the batcher's probe finds the engine working again. */
    char failing[640] = "", why[512];
    for (int i = 0; i < n; i++) {
        if (!failing[0] && batcher_failing(list[i]->batcher, why, sizeof why))
            snprintf(failing, sizeof failing, "model %s is failing: %s", list[i]->name, why);
        served_model_release(list[i]);
    }
    free(list);
    if (failing[0]) {
        reply_error(r, 503, "%s", failing);
        return;
    }
    if (n == 0) {
        reply_error(r, 503, "no model is loaded");
        return;
    }
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "status", cJSON_CreateString("ready"));
    failed |= json_put(o, "models", cJSON_CreateNumber(n));
    reply_json(r, 200, json_built(o, failed));
}

void api_metrics(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)body, (void)len, (void)c;
    char *text = metrics_render(a->metrics, a->reg);
    if (!text) {
        reply_error(r, 500, "out of memory");
        return;
    }
    r->status = 200;
    r->body = text;
    r->content_type = "text/plain; version=0.0.4; charset=utf-8";
}
