/* api.c - the endpoint handlers (see api.h and api.md).
 *
 * Every handler follows the same path: parse the body, look the model up
 * (a counted reference, released when the request ends), validate and
 * tokenize, build one job, submit it to the model's batcher and wait for
 * it, checking between short waits whether the client is still there, then
 * turn the job's outputs into JSON.  Handlers never run a model.
 */
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistr.h>

#include "api.h"
#include "batcher.h"
#include "metrics.h"
#include "registry.h"
#include "request_id.h"

#define MAX_TEXTS 256
#define DEFAULT_MAX_TOKENS 64
#define OPENAI_DEFAULT_MAX_TOKENS 16 /* the completions API's */
#define MAX_CHOICES 16 /* generations a /generate request may ask for ("n") */
/* How often a waiting handler looks at its client's connection. */
#define WAIT_SLICE_MS 50
/* Seeds travel as JSON numbers, which hold integers exactly up to 2^53. */
#define MAX_SEED ((UINT64_C(1) << 53) - 1)

/* The texts of a request, borrowed from its parsed JSON. */
struct texts {
    int n;
    int many;               /* given as an array ("texts"), not one string */
    const char *field;      /* "text" or "prompt" */
    const char *s[MAX_TEXTS];
};

/* A growing byte buffer. */
struct buf {
    char *p;
    size_t len, cap;
};

static int buf_add(struct buf *b, const void *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

/* ---- JSON building: every allocation checked ------------------------- */

/* Adds v (NULL when its allocation failed) to object o under key, or to
 * array o when key is NULL; on failure v is freed.  Returns 0 or 1 (failed),
 * so callers can OR the results and check once. */
static int put(cJSON *o, const char *key, cJSON *v)
{
    if (v && (key ? cJSON_AddItemToObject(o, key, v) : cJSON_AddItemToArray(o, v)))
        return 0;
    cJSON_Delete(v);
    return 1;
}

/* o when nothing failed, else NULL (o freed). */
static cJSON *built(cJSON *o, int failed)
{
    if (failed || !o) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* ---- UTF-8 ------------------------------------------------------------ */

/* Writes the UTF-8 of in[0..n) to out with every invalid byte, and NUL,
 * replaced by U+FFFD, so any text is a valid JSON string.  An incomplete
 * sequence at the end is left for the next call unless final.  out needs
 * room for 3n + 1 bytes.  Returns the number of input bytes consumed. */
static size_t utf8_clean(const char *in, size_t n, int final, char *out, size_t *outlen)
{
    size_t i = 0, o = 0;
    while (i < n) {
        ucs4_t uc;
        int k = u8_mbtoucr(&uc, (const uint8_t *)in + i, n - i);
        if (k == -2 && !final)
            break;
        if (k > 0 && uc != 0) {
            memcpy(out + o, in + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = 0;
    *outlen = o;
    return i;
}

/* A JSON string of n bytes of text, cleaned as utf8_clean does. */
static cJSON *text_string(const char *text, size_t n)
{
    char *clean = malloc(3 * n + 1);
    size_t len;
    if (!clean)
        return NULL;
    utf8_clean(text, n, 1, clean, &len);
    cJSON *s = cJSON_CreateString(clean);
    free(clean);
    return s;
}

/* ---- request parsing ---------------------------------------------------- */

/* The request object, or NULL with a 400 in r. */
static cJSON *parse_request(const char *body, size_t len, struct reply *r)
{
    const char *end = NULL;
    cJSON *req = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (req && end)
        while (end < body + len && strchr(" \t\r\n", *end))
            end++;
    if (!req || end != body + len) {
        reply_error(r, 400, "the body is not valid JSON");
    } else if (!cJSON_IsObject(req)) {
        reply_error(r, 400, "the body must be a JSON object");
    } else {
        return req;
    }
    cJSON_Delete(req);
    return NULL;
}

/* An optional field: NULL when absent or null. */
static const cJSON *field(const cJSON *req, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(req, name);
    return cJSON_IsNull(f) ? NULL : f;
}

/* An optional integer field in [lo, hi], left at its default when absent.
 * 0, or -1 with a 400 (not an integer) or 422 (out of range) in r. */
static int get_int(const cJSON *req, const char *name, long long lo, long long hi, long long *out,
                   struct reply *r)
{
    const cJSON *f = field(req, name);
    if (!f)
        return 0;
    if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble)) {
        reply_error(r, 400, "\"%s\" must be an integer", name);
        return -1;
    }
    if (f->valuedouble < (double)lo || f->valuedouble > (double)hi) {
        reply_error(r, 422, "\"%s\" must be from %lld to %lld", name, lo, hi);
        return -1;
    }
    *out = (long long)f->valuedouble;
    return 0;
}

/* An optional number field, left at its default when absent; the caller
 * checks its range.  0, or -1 with a 400 in r. */
static int get_number(const cJSON *req, const char *name, double *out, struct reply *r)
{
    const cJSON *f = field(req, name);
    if (!f)
        return 0;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble)) {
        reply_error(r, 400, "\"%s\" must be a number", name);
        return -1;
    }
    *out = f->valuedouble;
    return 0;
}

/* An optional true or false, left at its default when absent. */
static int get_bool(const cJSON *req, const char *name, int *out, struct reply *r)
{
    const cJSON *f = field(req, name);
    if (!f)
        return 0;
    if (!cJSON_IsBool(f)) {
        reply_error(r, 400, "\"%s\" must be true or false", name);
        return -1;
    }
    *out = cJSON_IsTrue(f);
    return 0;
}

/* The model the request names, of the task the endpoint needs (task < 0:
 * any); NULL with a 400, 404 or 422 in r. */
static struct served_model *get_model(struct api *a, const cJSON *req, const char *endpoint, int task,
                                      struct reply *r)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(req, "model");
    if (!cJSON_IsString(f)) {
        reply_error(r, 400, "\"model\" must be a string naming a model (GET /models lists them)");
        return NULL;
    }
    struct served_model *m = registry_get(a->reg, f->valuestring);
    if (!m) {
        reply_error(r, 404, "there is no model named \"%.200s\" (GET /models lists them)", f->valuestring);
        return NULL;
    }
    if (m->model.cfg.input_dim) {
        reply_error(r, 422, "model \"%s\" reads vectors, not text; %s needs a model with a tokenizer", m->name,
                    endpoint);
        served_model_release(m);
        return NULL;
    }
    if (task >= 0 && (int)m->model.cfg.task != task) {
        reply_error(r, 422, "model \"%s\" has task \"%s\"; %s needs a model with task \"%s\"", m->name,
                    task_name(m->model.cfg.task), endpoint, task_name((enum task)task));
        served_model_release(m);
        return NULL;
    }
    return m;
}

/* The field name of text i, for messages: "text", "texts[3]", "prompt". */
static void text_field(const struct texts *t, int i, char *out, size_t len)
{
    if (t->many)
        snprintf(out, len, "%ss[%d]", t->field, i);
    else
        snprintf(out, len, "%s", t->field);
}

/* The request's text: the string field `name`, or when many_ok, instead an
 * array of 1..MAX_TEXTS strings under `name` + "s".  0, or -1 with a 400
 * or 422 in r. */
static int get_texts(const cJSON *req, const char *name, int many_ok, struct texts *t, struct reply *r)
{
    char plural[32];
    snprintf(plural, sizeof plural, "%ss", name);
    const cJSON *one = field(req, name), *many = many_ok ? field(req, plural) : NULL;
    t->field = name;
    t->many = many != NULL;
    if (one && many) {
        reply_error(r, 400, "give either \"%s\" or \"%s\", not both", name, plural);
        return -1;
    }
    if (one) {
        if (!cJSON_IsString(one)) {
            reply_error(r, 400, "\"%s\" must be a string", name);
            return -1;
        }
        t->n = 1;
        t->s[0] = one->valuestring;
        return 0;
    }
    if (!many) {
        if (many_ok)
            reply_error(r, 400, "\"%s\" (a string) or \"%s\" (an array of strings) is required", name, plural);
        else
            reply_error(r, 400, "\"%s\" (a string) is required", name);
        return -1;
    }
    if (!cJSON_IsArray(many)) {
        reply_error(r, 400, "\"%s\" must be an array of strings", plural);
        return -1;
    }
    int n = cJSON_GetArraySize(many);
    if (n < 1 || n > MAX_TEXTS) {
        reply_error(r, 422, "\"%s\" must hold from 1 to %d texts, not %d", plural, MAX_TEXTS, n);
        return -1;
    }
    t->n = 0;
    for (const cJSON *e = many->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            reply_error(r, 400, "\"%s[%d]\" must be a string", plural, t->n);
            return -1;
        }
        t->s[t->n++] = e->valuestring;
    }
    return 0;
}

/* Tokenizes every text into the job's inputs.  0, or -1 with a 422 (too
 * long, no tokens) or 500 in r. */
static int tokenize(const struct api *a, const struct served_model *m, const struct texts *t, struct job *j,
                    struct reply *r)
{
    for (int i = 0; i < t->n; i++) {
        char name[48];
        size_t len = strlen(t->s[i]), n = 0;
        text_field(t, i, name, sizeof name);
        if (len > a->lim.max_text_bytes) {
            reply_error(r, 422, "\"%s\" is %zu bytes long; the limit is %zu", name, len, a->lim.max_text_bytes);
            return -1;
        }
        if (tokenizer_encode(&m->tk, t->s[i], len, &j->ids[i], &n) != 0) {
            reply_error(r, 500, "out of memory tokenizing \"%s\"", name);
            return -1;
        }
        if (n == 0) {
            reply_error(r, 422, "\"%s\" has no tokens for the tokenizer of model \"%s\"", name, m->name);
            return -1;
        }
        j->lens[i] = (int)n;
    }
    return 0;
}

/* ---- running jobs ------------------------------------------------------- */

/* Waits until the job is done or, for generation, holds more than seen
 * tokens.  -1 when the client went away first; the job is then cancelled,
 * so the batcher drops it. */
static int wait_job(struct job *j, int seen, const struct client *c)
{
    while (!job_wait(j, seen, WAIT_SLICE_MS))
        if (c->gone(c->arg)) {
            job_cancel(j);
            return -1;
        }
    return 0;
}

/* 0 when the batcher took the n jobs, else -1 with a 503 in r. */
static int submit(const struct served_model *m, struct job *const *jobs, int n, struct reply *r)
{
    int rc = batcher_submit(m->batcher, jobs, n);
    if (rc == -1) {
        reply_error(r, 503, "model \"%s\" has too many requests queued; retry later", m->name);
        r->retry_after = 1;
    } else if (rc == -3) {
        reply_error(r, 422, "%d generations are more than model \"%s\"'s queue holds (--max-queue)", n, m->name);
    } else if (rc != 0) {
        reply_error(r, 503, "the server is shutting down");
    }
    return rc == 0 ? 0 : -1;
}

/* Submits n jobs and waits for them all: 0 when they ran, else -1 with r
 * set.  A client that leaves cancels what has not finished, and a job that
 * fails the ones not yet waited for. */
static int run_jobs(const struct served_model *m, struct job **jobs, int n, const struct client *c,
                    struct reply *r)
{
    if (submit(m, jobs, n, r) != 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (rc != 0) {
            job_cancel(jobs[i]);
            continue;
        }
        if (wait_job(jobs[i], INT_MAX, c) != 0) {
            r->status = HTTP_CLIENT_GONE;
            rc = -1;
            continue;
        }
        if (jobs[i]->batch_size > r->batch_size)
            r->batch_size = jobs[i]->batch_size;
        if (jobs[i]->failed) {
            reply_error(r, 500, "the engine failed: %s", jobs[i]->error);
            rc = -1;
        }
    }
    return rc;
}

/* ---- tokens and their log-probabilities -------------------------------- */

/* A token as people read it: its text, or <0xNN> for a byte that is not
 * text on its own (a piece of a multi-byte character, or NUL). */
static cJSON *token_label(const struct tokenizer *tk, int32_t id)
{
    char raw[8], label[16];
    size_t len = 0;
    const char *piece = tokenizer_token(tk, id, raw, &len);
    if (!piece)
        return cJSON_CreateString("");
    if (len == 1 && ((unsigned char)piece[0] >= 0x80 || piece[0] == 0)) {
        snprintf(label, sizeof label, "<0x%02X>", (unsigned char)piece[0]);
        return cJSON_CreateString(label);
    }
    return text_string(piece, len);
}

/* {"token", "id", "logprob"}, NULL when out of memory. */
static cJSON *logprob_entry(const struct tokenizer *tk, int32_t id, float logprob)
{
    cJSON *e = cJSON_CreateObject();
    int failed = put(e, "token", token_label(tk, id));
    failed |= put(e, "id", cJSON_CreateNumber(id));
    failed |= put(e, "logprob", cJSON_CreateNumber(logprob));
    return built(e, failed);
}

/* Token i's alternatives, most probable first, as "top_logprobs" of o
 * when the request asked for them. */
static int put_top_logprobs(cJSON *o, const struct tokenizer *tk, const struct job *j, int i)
{
    if (j->top_logprobs == 0)
        return 0;
    cJSON *top = cJSON_CreateArray();
    int failed = !top;
    for (int k = 0; k < j->top_logprobs && !failed; k++) {
        const struct token_logprob *t = &j->top[(size_t)i * j->top_logprobs + k];
        failed |= put(top, NULL, logprob_entry(tk, t->id, t->logprob));
    }
    return put(o, "top_logprobs", built(top, failed));
}

/* "logprobs": an entry for each of n tokens, ids[k] with its
 * log-probability lps[k] and, when top is a generation that asked for
 * them, its alternatives. */
static cJSON *logprobs_list(const struct tokenizer *tk, const int32_t *ids, const float *lps, int n,
                            const struct job *top)
{
    cJSON *list = cJSON_CreateArray();
    int failed = !list;
    for (int k = 0; k < n && !failed; k++) {
        cJSON *e = logprob_entry(tk, ids[k], lps[k]);
        if (e && top)
            failed |= put_top_logprobs(e, tk, top, k);
        failed |= put(list, NULL, e);
    }
    return built(list, failed);
}

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
    int failed = put(o, "label", cJSON_CreateString(cfg->classes[best]));
    for (int c = 0; c < C; c++)
        failed |= put(probs, cfg->classes[c], cJSON_CreateNumber(p[c]));
    failed |= put(o, "probabilities", probs);
    return built(o, failed);
}

/* As `rrnserve run` reports it: tokens 2..n scored given their prefixes. */
static cJSON *score_result(const struct served_model *m, const struct job *j, int i)
{
    const double logprob = j->logprob[i];
    const int scored = j->lens[i] - 1;
    cJSON *o = cJSON_CreateObject();
    int failed = put(o, "logprob", cJSON_CreateNumber(logprob));
    failed |= put(o, "tokens", cJSON_CreateNumber(scored));
    failed |= put(o, "bits_per_char",
                  scored ? cJSON_CreateNumber(-logprob / log(2.0) / scored) : cJSON_CreateNull());
    if (j->logprobs) {
        /* Tokens 2..n, each with the term of the sum it added. */
        size_t at = 0;
        for (int k = 0; k < i; k++)
            at += (size_t)j->lens[k];
        failed |= put(o, "logprobs", logprobs_list(&m->tk, j->ids[i] + 1, j->token_logprob + at, scored, NULL));
    }
    return built(o, failed);
}

/* One direction of one layer: per step (token position p), the K weights
 * and the position of the state each weighs (see engine.h). */
static cJSON *attention_direction(const float *w, int d, int len, int K)
{
    cJSON *o = cJSON_CreateObject(), *steps = cJSON_CreateArray();
    int failed = put(o, "direction", cJSON_CreateString(d == 0 ? "forward" : "backward"));
    for (int p = 0; p < len && !failed; p++) {
        cJSON *step = cJSON_CreateObject(), *weights = cJSON_CreateArray(), *pos = cJSON_CreateArray();
        failed |= put(step, "position", cJSON_CreateNumber(p));
        for (int k = 1; k <= K; k++) {
            failed |= put(weights, NULL, cJSON_CreateNumber(w[(size_t)p * K + k - 1]));
            failed |= put(pos, NULL, cJSON_CreateNumber(d == 0 ? p - 1 - k : p + 1 + k));
        }
        failed |= put(step, "weights", weights);
        failed |= put(step, "positions", pos);
        failed |= put(steps, NULL, step);
    }
    failed |= put(o, "steps", steps);
    return built(o, failed);
}

static cJSON *attention_result(const struct served_model *m, const struct job *j, int i)
{
    (void)i;
    const struct model_config *cfg = &m->model.cfg;
    const int L = cfg->layers, D = config_directions(cfg), K = cfg->attn_window, len = j->lens[0];
    cJSON *o = cJSON_CreateObject(), *tokens = cJSON_CreateArray(), *layers = cJSON_CreateArray();
    int failed = 0;
    for (int p = 0; p < len; p++)
        failed |= put(tokens, NULL, token_label(&m->tk, j->ids[0][p]));
    failed |= put(o, "tokens", tokens);
    failed |= put(o, "mode", cJSON_CreateString(cfg->attn_mode == ATTN_STATIC ? "static" : "dynamic"));
    failed |= put(o, "window", cJSON_CreateNumber(K));
    for (int l = 0; l < L && !failed; l++) {
        cJSON *layer = cJSON_CreateObject(), *dirs = cJSON_CreateArray();
        failed |= put(layer, "layer", cJSON_CreateNumber(l));
        for (int d = 0; d < D; d++)
            failed |= put(dirs, NULL, attention_direction(j->attention + ((size_t)l * D + d) * len * K, d, len, K));
        failed |= put(layer, "directions", dirs);
        failed |= put(layers, NULL, layer);
    }
    failed |= put(o, "layers", layers);
    return built(o, failed);
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
        failed |= put(results, NULL, ep->result(m, j, i));
    failed |= put(o, "results", results);
    return built(o, failed);
}

static void forward(const struct forward_endpoint *ep, struct api *a, const char *body, size_t len,
                    const struct client *c, struct reply *r)
{
    struct texts t;
    struct job *j = NULL;
    cJSON *req = parse_request(body, len, r);
    struct served_model *m = req ? get_model(a, req, ep->path, ep->task, r) : NULL;
    int ok = m != NULL;
    if (ok && ep->kind == JOB_ATTENTION && m->model.cfg.attn_mode == ATTN_NONE) {
        reply_error(r, 422, "model \"%s\" has no attention (its config has no \"attention\")", m->name);
        ok = 0;
    }
    int logprobs = 0;
    ok = ok && get_texts(req, "text", ep->many, &t, r) == 0 &&
         (ep->kind != JOB_SCORE || get_bool(req, "logprobs", &logprobs, r) == 0);
    if (ok && !(j = job_new(ep->kind, t.n))) {
        reply_error(r, 500, "out of memory");
        ok = 0;
    }
    if (j)
        j->logprobs = logprobs;
    if (ok && tokenize(a, m, &t, j, r) == 0 && run_jobs(m, &j, 1, c, r) == 0)
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

/* ---- generate ------------------------------------------------------------ */

/* The two ways to ask for a generation: rrnserve's own /generate, and
 * /v1/completions, the shape of OpenAI's completions API that many clients
 * and tools speak.  Both make the same jobs and run them the same way;
 * they differ in a few fields and defaults and in the shape of answers and
 * stream events. */
enum dialect { DIALECT_NATIVE, DIALECT_OPENAI };

/* How a generation's answer is shaped: what a stream keeps of its request. */
struct gen_shape {
    enum dialect dialect;
    int include_usage;     /* openai, streaming: a last event with the usage */
    char id[REQUEST_ID_MAX + 8]; /* openai: the answer's "id", from the request id */
    long long created;     /* openai: when the request came, in Unix seconds */
};

struct gen_request {
    struct gen_shape shape;
    struct sample_params sample;
    long long max_tokens;
    int stream;
    int logprobs;
    long long top_logprobs;
    long long n;
    const char *stop[JOB_MAX_STOP];
    int n_stop;
};

static int random_seed(uint64_t *seed)
{
    unsigned char b[8];
    if (RAND_bytes(b, sizeof b) != 1)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < sizeof b; i++)
        v = v << 8 | b[i];
    *seed = v & MAX_SEED;
    return 0;
}

/* "stop": a string or an array of up to JOB_MAX_STOP strings, none empty. */
static int get_stops(const struct api *a, const cJSON *req, struct gen_request *g, struct reply *r)
{
    const cJSON *f = field(req, "stop");
    g->n_stop = 0;
    if (!f)
        return 0;
    if (!cJSON_IsString(f) && !cJSON_IsArray(f)) {
        reply_error(r, 400, "\"stop\" must be a string or an array of strings");
        return -1;
    }
    if (cJSON_IsArray(f) && cJSON_GetArraySize(f) > JOB_MAX_STOP) {
        reply_error(r, 422, "\"stop\" may hold at most %d strings", JOB_MAX_STOP);
        return -1;
    }
    for (const cJSON *e = cJSON_IsString(f) ? f : f->child; e; e = cJSON_IsString(f) ? NULL : e->next) {
        if (!cJSON_IsString(e)) {
            reply_error(r, 400, "\"stop[%d]\" must be a string", g->n_stop);
            return -1;
        }
        size_t len = strlen(e->valuestring);
        if (len == 0 || len > a->lim.max_text_bytes) {
            reply_error(r, 422, "a stop string must be from 1 to %zu bytes long", a->lim.max_text_bytes);
            return -1;
        }
        g->stop[g->n_stop++] = e->valuestring;
    }
    return 0;
}

/* "logprobs" and "top_logprobs" (native), or the completions API's
 * "logprobs": k, the sampled tokens' log-probabilities with the k most
 * probable tokens beside them. */
static int get_logprobs(const cJSON *req, struct gen_request *g, struct reply *r)
{
    if (g->shape.dialect == DIALECT_NATIVE)
        return get_bool(req, "logprobs", &g->logprobs, r) != 0 ||
                       get_int(req, "top_logprobs", 0, JOB_MAX_TOP_LOGPROBS, &g->top_logprobs, r) != 0
                   ? -1
                   : 0;
    long long k = -1;
    if (get_int(req, "logprobs", 0, JOB_MAX_TOP_LOGPROBS, &k, r) != 0)
        return -1;
    g->logprobs = k >= 0;
    g->top_logprobs = k > 0 ? k : 0;
    return 0;
}

/* Fields of the completions API that would change the answer and that the
 * server does not do: refused by name rather than ignored. */
static int get_openai_extras(const cJSON *req, struct gen_request *g, struct reply *r)
{
    static const char *const penalties[] = {"presence_penalty", "frequency_penalty"};
    const cJSON *echo = field(req, "echo"), *bias = field(req, "logit_bias"), *opts = field(req, "stream_options");
    long long best_of = g->n;
    if (echo && !cJSON_IsFalse(echo)) {
        reply_error(r, 422, "\"echo\" is not supported: the answer holds the generated text only");
        return -1;
    }
    if (field(req, "suffix")) {
        reply_error(r, 422, "\"suffix\" is not supported: a recurrent model reads its text in one direction");
        return -1;
    }
    for (size_t i = 0; i < sizeof penalties / sizeof *penalties; i++) {
        double v = 0;
        if (get_number(req, penalties[i], &v, r) != 0)
            return -1;
        if (v != 0) {
            reply_error(r, 422, "\"%s\" is not supported; leave it out or 0", penalties[i]);
            return -1;
        }
    }
    if (bias && (!cJSON_IsObject(bias) || bias->child)) {
        reply_error(r, 422, "\"logit_bias\" is not supported; leave it out or {}");
        return -1;
    }
    if (get_int(req, "best_of", 1, MAX_CHOICES, &best_of, r) != 0)
        return -1;
    if (best_of != g->n) {
        reply_error(r, 422, "\"best_of\" is not supported apart from \"n\"; leave it out or equal to \"n\"");
        return -1;
    }
    if (opts && !cJSON_IsObject(opts)) {
        reply_error(r, 400, "\"stream_options\" must be an object");
        return -1;
    }
    return opts ? get_bool(opts, "include_usage", &g->shape.include_usage, r) : 0;
}

/* The sampling fields, with their defaults.  0, or -1 with r set. */
static int get_generation(const struct api *a, const cJSON *req, struct gen_request *g, struct reply *r)
{
    double temperature = 1.0, top_p = 1.0;
    long long top_k = 0, seed = -1;
    const int max_tokens = g->shape.dialect == DIALECT_OPENAI ? OPENAI_DEFAULT_MAX_TOKENS : DEFAULT_MAX_TOKENS;
    g->max_tokens = a->lim.max_tokens < max_tokens ? a->lim.max_tokens : max_tokens;
    g->stream = g->logprobs = 0;
    g->top_logprobs = 0;
    g->n = 1;
    if (get_int(req, "max_tokens", 1, a->lim.max_tokens, &g->max_tokens, r) != 0 ||
        get_number(req, "temperature", &temperature, r) != 0 || get_number(req, "top_p", &top_p, r) != 0 ||
        get_int(req, "top_k", 0, INT_MAX, &top_k, r) != 0 ||
        get_int(req, "seed", 0, (long long)MAX_SEED, &seed, r) != 0 ||
        get_stops(a, req, g, r) != 0 || get_bool(req, "stream", &g->stream, r) != 0 ||
        get_logprobs(req, g, r) != 0 || get_int(req, "n", 1, MAX_CHOICES, &g->n, r) != 0 ||
        (g->shape.dialect == DIALECT_OPENAI && get_openai_extras(req, g, r) != 0))
        return -1;
    if (g->n > 1 && g->stream) {
        reply_error(r, 422, "\"n\" above 1 cannot be streamed; ask with \"stream\": false");
        return -1;
    }
    if (g->top_logprobs > 0 && !g->logprobs) {
        reply_error(r, 422, "\"top_logprobs\" needs \"logprobs\": true");
        return -1;
    }
    if (temperature < 0) {
        reply_error(r, 422, "\"temperature\" must be 0 (greedy) or more");
        return -1;
    }
    if (!(top_p > 0 && top_p <= 1)) {
        reply_error(r, 422, "\"top_p\" must be more than 0 and at most 1");
        return -1;
    }
    g->sample = (struct sample_params){.temperature = (float)temperature, .top_k = (int)top_k, .top_p = (float)top_p};
    if (seed >= 0) {
        g->sample.seed = (uint64_t)seed;
    } else if (random_seed(&g->sample.seed) != 0) {
        reply_error(r, 500, "no random seed could be drawn");
        return -1;
    }
    return 0;
}

static const char *finish_name(enum finish_reason f)
{
    return f == FINISH_STOP ? "stop" : "length";
}

/* The outcome of a finished generation: the non-streaming response and the
 * last event of a stream alike. */
static cJSON *generation_result(const struct job *j)
{
    cJSON *o = cJSON_CreateObject();
    int failed = put(o, "text", text_string(j->text ? j->text : "", j->text ? j->text_len : 0));
    failed |= put(o, "tokens", cJSON_CreateNumber(j->n_tokens));
    failed |= put(o, "prompt_tokens", cJSON_CreateNumber(j->lens[0]));
    failed |= put(o, "cached_tokens", cJSON_CreateNumber(j->cached_tokens));
    failed |= put(o, "finish_reason", cJSON_CreateString(finish_name(j->finish)));
    /* Raw digits: cJSON prints a large number with 15 significant digits
     * when that is within a rounding error, which would lose the seed. */
    char seed[24];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)j->sample.seed);
    failed |= put(o, "seed", cJSON_CreateRaw(seed));
    return built(o, failed);
}

/* The job for a generation request; NULL with r set. */
/* The request's settings into job j (NULL: out of memory), with seed; j
 * is released when they cannot be.  j, or NULL with r set. */
static struct job *set_generation(struct job *j, const struct served_model *m, const struct gen_request *g,
                                  uint64_t seed, struct reply *r)
{
    if (!j) {
        reply_error(r, 500, "out of memory");
        return NULL;
    }
    j->sample = g->sample;
    j->sample.seed = seed & MAX_SEED;
    j->max_tokens = (int)g->max_tokens;
    j->logprobs = g->logprobs;
    j->top_logprobs = g->top_logprobs < m->tk.vocab ? (int)g->top_logprobs : m->tk.vocab;
    for (int i = 0; i < g->n_stop; i++)
        if (!(j->stop[j->n_stop++] = strdup(g->stop[i]))) {
            reply_error(r, 500, "out of memory");
            job_release(j);
            return NULL;
        }
    return j;
}

/* "prompt": a string; the completions API's may also be an array of one
 * (an array of several prompts, or of token ids, is refused). */
static int get_prompt(const cJSON *req, enum dialect d, struct texts *t, struct reply *r)
{
    const cJSON *f = field(req, "prompt");
    if (d == DIALECT_NATIVE || !cJSON_IsArray(f))
        return get_texts(req, "prompt", 0, t, r);
    if (cJSON_GetArraySize(f) != 1) {
        reply_error(r, 422, "\"prompt\" must be one string (or an array of one): one prompt a request");
        return -1;
    }
    if (!cJSON_IsString(f->child)) {
        reply_error(r, 400, "\"prompt[0]\" must be a string");
        return -1;
    }
    t->field = "prompt";
    t->many = 0;
    t->n = 1;
    t->s[0] = f->child->valuestring;
    return 0;
}

/* The jobs of a generation request, g->n of them, the prompt tokenized
 * once and shared; their seeds follow the first's, so that each is the
 * generation one request with that seed would give.  0, or -1 with r set
 * and no job left. */
static int generation_jobs(const struct api *a, const struct served_model *m, const cJSON *req,
                           struct gen_request *g, struct job **jobs, struct reply *r)
{
    struct texts t;
    if (get_prompt(req, g->shape.dialect, &t, r) != 0 || get_generation(a, req, g, r) != 0 ||
        !(jobs[0] = set_generation(job_new(JOB_GENERATE, 1), m, g, g->sample.seed, r)))
        return -1;
    int n = tokenize(a, m, &t, jobs[0], r) == 0;
    while (n > 0 && n < g->n && (jobs[n] = set_generation(job_twin(jobs[0]), m, g, g->sample.seed + (uint64_t)n, r)))
        n++;
    if (n == g->n)
        return 0;
    for (int i = 0; i < g->n; i++) {
        job_release(jobs[i]);
        jobs[i] = NULL;
    }
    return -1;
}

/* ---- the completions API's shapes (DIALECT_OPENAI) -------------------- */

/* What every answer and stream event of a completion begins with. */
static cJSON *openai_head(const struct gen_shape *g, const char *model)
{
    cJSON *o = cJSON_CreateObject();
    int failed = put(o, "id", cJSON_CreateString(g->id));
    failed |= put(o, "object", cJSON_CreateString("text_completion"));
    failed |= put(o, "created", cJSON_CreateNumber((double)g->created));
    failed |= put(o, "model", cJSON_CreateString(model));
    return built(o, failed);
}

/* A choice's "logprobs": of tokens ids[from..from+n) of job j,
 * {"tokens", "token_logprobs", "top_logprobs"} with each step's
 * alternatives as {token: logprob}; null when they were not asked for. */
static cJSON *openai_logprobs(const struct tokenizer *tk, const struct job *j, const int32_t *ids, int from, int n)
{
    if (!j->logprobs)
        return cJSON_CreateNull();
    cJSON *o = cJSON_CreateObject(), *tokens = cJSON_CreateArray(), *lps = cJSON_CreateArray(),
          *tops = j->top_logprobs ? cJSON_CreateArray() : cJSON_CreateNull();
    int failed = !tokens || !lps || !tops;
    for (int i = from; i < from + n && !failed; i++) {
        failed |= put(tokens, NULL, token_label(tk, ids[i]));
        failed |= put(lps, NULL, cJSON_CreateNumber(j->token_logprob[i]));
        cJSON *top = j->top_logprobs ? cJSON_CreateObject() : NULL;
        for (int k = 0; top && k < j->top_logprobs && !failed; k++) {
            const struct token_logprob *t = &j->top[(size_t)i * j->top_logprobs + k];
            cJSON *label = token_label(tk, t->id);
            failed |= !label || put(top, label->valuestring, cJSON_CreateNumber(t->logprob));
            cJSON_Delete(label);
        }
        if (j->top_logprobs)
            failed |= put(tops, NULL, top);
    }
    failed |= put(o, "tokens", tokens);
    failed |= put(o, "token_logprobs", lps);
    failed |= put(o, "top_logprobs", tops);
    return built(o, failed);
}

/* One choice: its index, text (consumed), logprobs (consumed) and finish
 * reason (NULL: null, the stream's events before the last). */
static cJSON *openai_choice(int index, cJSON *text, cJSON *logprobs, const char *finish)
{
    cJSON *o = cJSON_CreateObject();
    int failed = put(o, "text", text);
    failed |= put(o, "index", cJSON_CreateNumber(index));
    failed |= put(o, "logprobs", logprobs);
    failed |= put(o, "finish_reason", finish ? cJSON_CreateString(finish) : cJSON_CreateNull());
    return built(o, failed);
}

/* "usage" of the n generations of one prompt: the prompt counted once, as
 * the completions API counts it, and how much of it the cache supplied. */
static cJSON *openai_usage(struct job *const *jobs, int n)
{
    int generated = 0;
    for (int i = 0; i < n; i++)
        generated += jobs[i]->n_tokens;
    cJSON *o = cJSON_CreateObject(), *details = cJSON_CreateObject();
    int failed = put(o, "prompt_tokens", cJSON_CreateNumber(jobs[0]->lens[0]));
    failed |= put(o, "completion_tokens", cJSON_CreateNumber(generated));
    failed |= put(o, "total_tokens", cJSON_CreateNumber(jobs[0]->lens[0] + generated));
    failed |= put(details, "cached_tokens", cJSON_CreateNumber(jobs[0]->cached_tokens));
    failed |= put(o, "prompt_tokens_details", details);
    return built(o, failed);
}

/* head + "choices" (consumed) + "usage" when jobs is not NULL. */
static cJSON *openai_object(const struct gen_shape *g, const char *model, cJSON *choices, struct job *const *jobs,
                            int n)
{
    cJSON *o = openai_head(g, model);
    int failed = put(o, "choices", choices);
    if (jobs)
        failed |= put(o, "usage", openai_usage(jobs, n));
    return built(o, failed);
}

/* The answer to a completions request that ran its n jobs. */
static cJSON *openai_answer(const struct served_model *m, const struct gen_shape *g, struct job *const *jobs, int n)
{
    cJSON *choices = cJSON_CreateArray();
    int failed = !choices;
    for (int i = 0; i < n && !failed; i++) {
        const struct job *j = jobs[i];
        failed |= put(choices, NULL,
                      openai_choice(i, text_string(j->text ? j->text : "", j->text ? j->text_len : 0),
                                    openai_logprobs(&m->tk, j, j->tokens, 0, j->n_tokens), finish_name(j->finish)));
    }
    return failed ? built(choices, 1) : openai_object(g, m->name, choices, jobs, n);
}

/* ---- Server-Sent Events ----------------------------------------------- */

struct api_stream {
    struct served_model *m;
    struct job *j;
    struct gen_shape shape;
    struct client client;
    int seen;             /* tokens already turned into events */
    int ended;            /* the last events are in out */
    int batch_size;
    int32_t *ids;         /* tokens copied out of the job */
    struct buf raw;       /* bytes of an unfinished UTF-8 character */
    struct buf out;       /* event bytes not yet read */
    size_t out_pos;
    char *clean;          /* scratch for utf8_clean */
    size_t clean_cap;
};

/* One `data: JSON` event; o is consumed. */
static int add_event(struct api_stream *s, cJSON *o)
{
    char *json = o ? cJSON_PrintUnformatted(o) : NULL;
    int rc = json && buf_add(&s->out, "data: ", 6) == 0 && buf_add(&s->out, json, strlen(json)) == 0 &&
                     buf_add(&s->out, "\n\n", 2) == 0
                 ? 0
                 : -1;
    free(json);
    cJSON_Delete(o);
    return rc;
}

/* A completions stream's event: one choice (consumed, NULL: none, for the
 * usage event), and the usage when there is no choice. */
static cJSON *openai_event(const struct api_stream *s, cJSON *choice)
{
    cJSON *choices = cJSON_CreateArray();
    int failed = !choices || (choice && put(choices, NULL, choice));
    if (failed) {
        cJSON_Delete(choices);
        return NULL;
    }
    return openai_object(&s->shape, s->m->name, choices, choice ? NULL : &s->j, 1);
}

/* The event of token `index`: its text joins the text before it as the
 * batcher joins them (words with a space), and a character split over
 * several byte tokens is sent whole with the last of them. */
static int token_event(struct api_stream *s, int32_t id, int index)
{
    char raw[8];
    size_t len = 0, clean_len;
    const char *piece = tokenizer_token(&s->m->tk, id, raw, &len);
    if ((s->m->tk.type == TOKENIZER_WORD && index > 0 && buf_add(&s->raw, " ", 1) != 0) ||
        (piece && buf_add(&s->raw, piece, len) != 0))
        return -1;
    if (3 * s->raw.len + 1 > s->clean_cap) {
        char *p = realloc(s->clean, 3 * s->raw.len + 1);
        if (!p)
            return -1;
        s->clean = p;
        s->clean_cap = 3 * s->raw.len + 1;
    }
    size_t used = utf8_clean(s->raw.p, s->raw.len, 0, s->clean, &clean_len);
    memmove(s->raw.p, s->raw.p + used, s->raw.len - used);
    s->raw.len -= used;
    if (s->shape.dialect == DIALECT_OPENAI)
        return add_event(s, openai_event(s, openai_choice(0, cJSON_CreateString(s->clean),
                                                          openai_logprobs(&s->m->tk, s->j, s->ids, index, 1), NULL)));
    cJSON *o = cJSON_CreateObject();
    int failed = put(o, "token", cJSON_CreateString(s->clean));
    failed |= put(o, "id", cJSON_CreateNumber(id));
    failed |= put(o, "index", cJSON_CreateNumber(index));
    if (s->j->logprobs) {
        failed |= put(o, "logprob", cJSON_CreateNumber(s->j->token_logprob[index]));
        failed |= put_top_logprobs(o, &s->m->tk, s->j, index);
    }
    return add_event(s, built(o, failed));
}

/* The events after a generation's last token: its outcome and "[DONE]". */
static int last_events(struct api_stream *s)
{
    const struct job *j = s->j;
    int rc = 0;
    if (j->failed) {
        char msg[320];
        snprintf(msg, sizeof msg, "the engine failed: %s", j->error);
        cJSON *e = cJSON_CreateObject(), *last = cJSON_CreateObject();
        int failed = put(e, "code", cJSON_CreateNumber(500));
        failed |= put(e, "message", cJSON_CreateString(msg));
        failed |= put(last, "error", e);
        rc = add_event(s, built(last, failed));
    } else if (s->shape.dialect == DIALECT_OPENAI) {
        rc = add_event(s, openai_event(s, openai_choice(0, cJSON_CreateString(""), cJSON_CreateNull(),
                                                        finish_name(j->finish))));
        if (rc == 0 && s->shape.include_usage)
            rc = add_event(s, openai_event(s, NULL));
    } else {
        rc = add_event(s, generation_result(j));
    }
    return rc == 0 && buf_add(&s->out, "data: [DONE]\n\n", 14) == 0 ? 0 : -1;
}

/* Turns what the job has produced since the last call into events. */
static int stream_collect(struct api_stream *s)
{
    struct job *j = s->j;
    pthread_mutex_lock(&j->mu);
    int n = j->n_tokens, done = j->done;
    if (n > s->seen)
        memcpy(s->ids + s->seen, j->tokens + s->seen, sizeof *s->ids * (size_t)(n - s->seen));
    pthread_mutex_unlock(&j->mu);
    for (; s->seen < n; s->seen++)
        if (token_event(s, s->ids[s->seen], s->seen) != 0)
            return -1;
    if (!done)
        return 0;
    /* Done: the batcher writes nothing more, so the job reads freely. */
    s->ended = 1;
    s->batch_size = j->batch_size;
    return last_events(s);
}

ssize_t api_stream_read(struct api_stream *s, char *buf, size_t max)
{
    while (s->out_pos == s->out.len) {
        if (s->ended)
            return 0;
        s->out.len = s->out_pos = 0;
        if (wait_job(s->j, s->seen, &s->client) != 0 || stream_collect(s) != 0)
            return -1;
    }
    size_t n = s->out.len - s->out_pos < max ? s->out.len - s->out_pos : max;
    memcpy(buf, s->out.p + s->out_pos, n);
    s->out_pos += n;
    return (ssize_t)n;
}

int api_stream_batch_size(const struct api_stream *s)
{
    return s->batch_size;
}

void api_stream_free(struct api_stream *s)
{
    if (!s)
        return;
    if (!s->ended)
        job_cancel(s->j);
    job_release(s->j);
    served_model_release(s->m);
    free(s->ids);
    free(s->raw.p);
    free(s->out.p);
    free(s->clean);
    free(s);
}

/* Submits the job and hands the stream to r; the stream takes over the
 * references to m and j.  0, or -1 with r set (m and j still the caller's). */
static int start_stream(struct served_model *m, struct job *j, const struct gen_shape *shape, const struct client *c,
                        struct reply *r)
{
    struct api_stream *s = calloc(1, sizeof *s);
    int32_t *ids = malloc(sizeof *ids * (size_t)j->max_tokens);
    if (!s || !ids) {
        free(s);
        free(ids);
        reply_error(r, 500, "out of memory");
        return -1;
    }
    if (submit(m, &j, 1, r) != 0) {
        free(s);
        free(ids);
        return -1;
    }
    *s = (struct api_stream){.m = m, .j = j, .shape = *shape, .client = *c, .batch_size = -1, .ids = ids};
    r->status = 200;
    r->stream = s;
    return 0;
}

/* A finished generation's answer: generation_result, and the tokens'
 * log-probabilities when they were asked for. */
static cJSON *generation_answer(const struct served_model *m, const struct job *j)
{
    cJSON *o = generation_result(j);
    if (o && j->logprobs &&
        put(o, "logprobs", logprobs_list(&m->tk, j->tokens, j->token_logprob, j->n_tokens, j)) != 0) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* n > 1 generations: {"results": [...]}, one answer each. */
static cJSON *generation_answers(const struct served_model *m, struct job **jobs, int n)
{
    cJSON *o = cJSON_CreateObject(), *results = cJSON_CreateArray();
    int failed = 0;
    for (int i = 0; i < n; i++)
        failed |= put(results, NULL, generation_answer(m, jobs[i]));
    failed |= put(o, "results", results);
    return built(o, failed);
}

/* /generate and /v1/completions: the jobs, run or streamed, and the
 * answer in the request's dialect. */
static void generate(struct api *a, struct gen_request *g, const char *endpoint, const char *body, size_t len,
                     const struct client *c, struct reply *r)
{
    struct job *jobs[MAX_CHOICES] = {0};
    cJSON *req = parse_request(body, len, r);
    struct served_model *m = req ? get_model(a, req, endpoint, TASK_LM, r) : NULL;
    const int made = m && generation_jobs(a, m, req, g, jobs, r) == 0;
    const int n = made ? (int)g->n : 0;
    if (made && g->stream && start_stream(m, jobs[0], &g->shape, c, r) == 0) {
        m = NULL; /* the stream's now */
        jobs[0] = NULL;
    } else if (made && !g->stream && run_jobs(m, jobs, n, c, r) == 0) {
        reply_json(r, 200, g->shape.dialect == DIALECT_OPENAI ? openai_answer(m, &g->shape, jobs, n)
                           : n == 1                         ? generation_answer(m, jobs[0])
                                                            : generation_answers(m, jobs, n));
    }
    for (int i = 0; i < n; i++)
        job_release(jobs[i]);
    if (m)
        served_model_release(m);
    cJSON_Delete(req);
}

void api_generate(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    struct gen_request g = {.shape.dialect = DIALECT_NATIVE};
    generate(a, &g, "/generate", body, len, c, r);
}

/* The answer's id is the request's, which the log and X-Request-Id carry. */
void api_completions(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    struct gen_request g = {.shape = {.dialect = DIALECT_OPENAI, .created = (long long)time(NULL)}};
    snprintf(g.shape.id, sizeof g.shape.id, "cmpl-%s", c->request_id ? c->request_id : "");
    generate(a, &g, "/v1/completions", body, len, c, r);
}

/* ---- models, health, metrics ------------------------------------------- */

static cJSON *model_info(const struct served_model *m)
{
    char *config = config_to_json(&m->model.cfg);
    cJSON *o = cJSON_CreateObject();
    int failed = put(o, "name", cJSON_CreateString(m->name));
    failed |= put(o, "task", cJSON_CreateString(task_name(m->model.cfg.task)));
    failed |= put(o, "config", config ? cJSON_Parse(config) : NULL);
    failed |= put(o, "parameters", cJSON_CreateNumber((double)m->model.n_params));
    failed |= put(o, "sha256", cJSON_CreateString(m->model.sha256));
    free(config);
    return built(o, failed);
}

void api_models(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)body, (void)len, (void)c;
    struct served_model **list = NULL;
    int n = 0;
    if (registry_list(a->reg, &list, &n) != 0) {
        reply_error(r, 500, "out of memory");
        return;
    }
    cJSON *o = cJSON_CreateObject(), *models = cJSON_CreateArray();
    int failed = 0;
    for (int i = 0; i < n; i++) {
        failed |= put(models, NULL, model_info(list[i]));
        served_model_release(list[i]);
    }
    free(list);
    failed |= put(o, "models", models);
    reply_json(r, 200, built(o, failed));
}

/* GET /v1/models: the completions API's list, {"object": "list", "data":
 * [{"id", "object": "model", "created", "owned_by"}]}, for clients that
 * look a model up before they use it. */
void api_openai_models(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)body, (void)len, (void)c;
    struct served_model **list = NULL;
    int n = 0;
    if (registry_list(a->reg, &list, &n) != 0) {
        reply_error(r, 500, "out of memory");
        return;
    }
    cJSON *o = cJSON_CreateObject(), *data = cJSON_CreateArray();
    int failed = put(o, "object", cJSON_CreateString("list"));
    for (int i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        int bad = put(e, "id", cJSON_CreateString(list[i]->name));
        bad |= put(e, "object", cJSON_CreateString("model"));
        bad |= put(e, "created", cJSON_CreateNumber((double)list[i]->modified));
        bad |= put(e, "owned_by", cJSON_CreateString("rrnserve"));
        failed |= put(data, NULL, built(e, bad));
        served_model_release(list[i]);
    }
    free(list);
    failed |= put(o, "data", data);
    reply_json(r, 200, built(o, failed));
}

void api_healthz(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)a, (void)body, (void)len, (void)c;
    cJSON *o = cJSON_CreateObject();
    reply_json(r, 200, built(o, put(o, "status", cJSON_CreateString("ok"))));
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
    int failed = put(o, "status", cJSON_CreateString("ready"));
    failed |= put(o, "models", cJSON_CreateNumber(n));
    reply_json(r, 200, built(o, failed));
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
