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
#include "metrics.h"

/* ---- classify, score, attention ---------------------------------------- */

static cJSON *classify_result(const struct served_model *m, const struct job *j, int i)
{
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
static cJSON *score_result(const struct served_model *m, const struct job *j, int i)
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
        failed |= json_put(o, "logprobs", logprobs_list(&m->tk, j->ids[i] + 1, j->token_logprob + at, scored,
                                                        job_top(j, at), j->top_logprobs));
    }
    return json_built(o, failed);
}

/* One direction of one layer: per step (token position p), the K weights
 * and the position of the state each weighs (see engine.h). */
static cJSON *attention_direction(const float *w, int d, int len, int K)
{
    cJSON *o = cJSON_CreateObject(), *steps = cJSON_CreateArray();
    int failed = json_put(o, "direction", cJSON_CreateString(d == 0 ? "forward" : "backward"));
    for (int p = 0; p < len && !failed; p++) {
        cJSON *step = cJSON_CreateObject(), *weights = cJSON_CreateArray(), *pos = cJSON_CreateArray();
        failed |= json_put(step, "position", cJSON_CreateNumber(p));
        for (int k = 1; k <= K; k++) {
            failed |= json_put(weights, NULL, cJSON_CreateNumber(w[(size_t)p * K + k - 1]));
            failed |= json_put(pos, NULL, cJSON_CreateNumber(d == 0 ? p - 1 - k : p + 1 + k));
        }
        failed |= json_put(step, "weights", weights);
        failed |= json_put(step, "positions", pos);
        failed |= json_put(steps, NULL, step);
    }
    failed |= json_put(o, "steps", steps);
    return json_built(o, failed);
}

static cJSON *attention_result(const struct served_model *m, const struct job *j, int i)
{
    (void)i;
    const struct model_config *cfg = &m->model.cfg;
    const int L = cfg->layers, D = config_directions(cfg), K = cfg->attn_window, len = j->lens[0];
    cJSON *o = cJSON_CreateObject(), *tokens = cJSON_CreateArray(), *layers = cJSON_CreateArray();
    int failed = 0;
    for (int p = 0; p < len; p++)
        failed |= json_put(tokens, NULL, token_label(&m->tk, j->ids[0][p]));
    failed |= json_put(o, "tokens", tokens);
    failed |= json_put(o, "mode", cJSON_CreateString(cfg->attn_mode == ATTN_STATIC ? "static" : "dynamic"));
    failed |= json_put(o, "window", cJSON_CreateNumber(K));
    for (int l = 0; l < L && !failed; l++) {
        cJSON *layer = cJSON_CreateObject(), *dirs = cJSON_CreateArray();
        failed |= json_put(layer, "layer", cJSON_CreateNumber(l));
        for (int d = 0; d < D; d++)
            failed |= json_put(dirs, NULL, attention_direction(j->attention + ((size_t)l * D + d) * len * K, d, len, K));
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
    cJSON *(*result)(const struct served_model *m, const struct job *j, int i);
};

static const struct forward_endpoint classify_ep = {JOB_CLASSIFY, "/classify", TASK_CLASSIFY, 1, classify_result};
static const struct forward_endpoint score_ep = {JOB_SCORE, "/score", TASK_LM, 1, score_result};
static const struct forward_endpoint attention_ep = {JOB_ATTENTION, "/attention", -1, 0, attention_result};

/* One result for "text", {"results": [...]} for "texts". */
static cJSON *forward_results(const struct forward_endpoint *ep, const struct served_model *m,
                              const struct job *j, int many)
{
    if (!many)
        return ep->result(m, j, 0);
    cJSON *o = cJSON_CreateObject(), *results = cJSON_CreateArray();
    int failed = 0;
    for (int i = 0; i < j->n_texts; i++)
        failed |= json_put(results, NULL, ep->result(m, j, i));
    failed |= json_put(o, "results", results);
    return json_built(o, failed);
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
        jobs_run(m, &j, 1, c, r) == 0)
        reply_json(r, 200, forward_results(ep, m, j, t.many));
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
