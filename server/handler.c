/* handler.c - what the endpoint handlers are made of (see handler.h).
 *
 * Every handler follows the same path: parse the body, look the model up
 * (a counted reference, released when the request ends), validate and
 * tokenize, build its jobs, submit them to the model's batcher and wait,
 * checking between short waits whether the client is still there, then
 * turn the jobs' outputs into JSON.  Handlers never run a model.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler.h"
#include "json_text.h"
#include "lazy_json.h"

/* How often a waiting handler looks at its client's connection. */
#define WAIT_SLICE_MS 50

/* ---- JSON building: every allocation checked ------------------------- */

int json_put(cJSON *o, const char *key, cJSON *v)
{
    if (v && (key ? cJSON_AddItemToObject(o, key, v) : cJSON_AddItemToArray(o, v)))
        return 0;
    cJSON_Delete(v);
    return 1;
}

cJSON *json_built(cJSON *o, int failed)
{
    if (failed || !o) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

cJSON *json_text(const char *text, size_t n)
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

static int by_name(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A name that some object within v holds twice, else NULL; *oom set when
 * memory ran out looking.  Sorted, not compared pairwise, since a body of
 * --max-body bytes may be one object of 100,000 names. */
static const char *twice_named(const cJSON *v, int *oom)
{
    int n = cJSON_IsObject(v) ? cJSON_GetArraySize(v) : 0;
    if (n > 1) {
        const char **names = malloc((size_t)n * sizeof *names);
        if (!names) {
            *oom = 1;
            return NULL;
        }
        int i = 0;
        for (const cJSON *c = v->child; c; c = c->next)
            names[i++] = c->string;
        qsort(names, (size_t)n, sizeof *names, by_name);
        const char *twice = NULL;
        for (i = 1; i < n && !twice; i++)
            twice = strcmp(names[i - 1], names[i]) == 0 ? names[i] : NULL;
        free(names);
        if (twice)
            return twice;
    }
    const char *twice = NULL;
    for (const cJSON *c = v->child; c && !twice && !*oom; c = c->next)
        twice = twice_named(c, oom);
    return twice;
}

cJSON *request_parse(const char *body, size_t len, struct reply *r)
{
    const char *twice = NULL;
    int oom = 0;
    cJSON *req = json_parse_whole(body, len);
    if (!req) {
        reply_error(r, 400, "the body is not valid JSON");
    } else if (json_holds_nul(body, len)) {
        reply_error(r, 400, "a string of the body holds U+0000 (\\u0000), which no field takes");
    } else if (!cJSON_IsObject(req)) {
        reply_error(r, 400, "the body must be a JSON object");
    } else if ((twice = twice_named(req, &oom)) != NULL) {
        /* JSON parsers differ on which of the two they keep (cJSON the
         * first, most others the last), so a proxy that checked one may
         * pass the other: neither is taken. */
        reply_error(r, 400, "the name \"%.200s\" appears twice in one object of the body", twice);
    } else if (oom) {
        reply_error(r, 500, "out of memory reading the body");
    } else {
        return req;
    }
    cJSON_Delete(req);
    return NULL;
}

const cJSON *request_field(const cJSON *req, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(req, name);
    return cJSON_IsNull(f) ? NULL : f;
}

int request_int(const cJSON *req, const char *name, long long lo, long long hi, long long *out, struct reply *r)
{
    const cJSON *f = request_field(req, name);
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

int request_number(const cJSON *req, const char *name, double *out, struct reply *r)
{
    const cJSON *f = request_field(req, name);
    if (!f)
        return 0;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble)) {
        reply_error(r, 400, "\"%s\" must be a number", name);
        return -1;
    }
    *out = f->valuedouble;
    return 0;
}

int request_bool(const cJSON *req, const char *name, int *out, struct reply *r)
{
    const cJSON *f = request_field(req, name);
    if (!f)
        return 0;
    if (!cJSON_IsBool(f)) {
        reply_error(r, 400, "\"%s\" must be true or false", name);
        return -1;
    }
    *out = cJSON_IsTrue(f);
    return 0;
}

int request_logprobs(const cJSON *req, int *logprobs, long long *top, struct reply *r)
{
    if (request_bool(req, "logprobs", logprobs, r) != 0 ||
        request_int(req, "top_logprobs", 0, JOB_MAX_TOP_LOGPROBS, top, r) != 0)
        return -1;
    if (*top > 0 && !*logprobs) {
        reply_error(r, 422, "\"top_logprobs\" needs \"logprobs\": true");
        return -1;
    }
    return 0;
}

struct served_model *request_model(struct api *a, const cJSON *req, const char *endpoint, int task,
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
        snprintf(out, len, "%s[%d]", t->list, i);
    else
        snprintf(out, len, "%s", t->field);
}

int request_texts(const cJSON *req, const char *name, int many_ok, struct texts *t, struct reply *r)
{
    char plural[sizeof t->list];
    snprintf(plural, sizeof plural, "%ss", name);
    const cJSON *one = request_field(req, name), *many = many_ok ? request_field(req, plural) : NULL;
    t->field = name;
    memcpy(t->list, plural, sizeof plural);
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

int request_scores_finite(const struct texts *t, const struct job *j, struct reply *r)
{
    for (int i = 0; i < j->n_texts; i++)
        if (!isfinite(j->logprob[i])) {
            char name[48];
            text_field(t, i, name, sizeof name);
            reply_error(r, 422, "\"%s\": " ENGINE_SCORE_NOT_FINITE, name);
            return -1;
        }
    return 0;
}

int request_tokenize(const struct api *a, const struct served_model *m, const struct texts *t, int first,
                     struct job *j, struct reply *r)
{
    for (int i = 0; i < j->n_texts; i++) {
        char name[48];
        size_t len = strlen(t->s[first + i]), n = 0;
        text_field(t, first + i, name, sizeof name);
        if (len > a->lim.max_text_bytes) {
            reply_error(r, 422, "\"%s\" is %zu bytes long; the limit is %zu", name, len, a->lim.max_text_bytes);
            return -1;
        }
        if (tokenizer_encode(&m->tk, t->s[first + i], len, &j->ids[i], &n) != 0) {
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

int top_logprobs_for(const struct served_model *m, long long asked)
{
    return asked < m->tk.vocab ? (int)asked : m->tk.vocab;
}

int request_alternatives_fit(const struct job *j, struct reply *r)
{
    const long long tokens = (long long)job_text_at(j, j->n_texts);
    if (tokens * j->top_logprobs <= MAX_ALTERNATIVES)
        return 0;
    reply_error(r, 422, "%lld tokens with %d alternatives each are more than the %d alternatives an answer may hold",
                tokens, j->top_logprobs, MAX_ALTERNATIVES);
    return -1;
}

/* ---- running jobs ------------------------------------------------------- */

int job_wait_client(struct job *j, int seen, const struct client *c)
{
    while (!job_wait(j, seen, WAIT_SLICE_MS))
        if (c->gone(c->arg)) {
            job_cancel(j);
            return -1;
        }
    return 0;
}

int jobs_submit(const struct served_model *m, struct job *const *jobs, int n, struct reply *r)
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

int job_failure(const struct job *j, char *msg, size_t cap)
{
    if (j->failed == JOB_CUT_OFF) {
        snprintf(msg, cap, "%s", j->error);
        return 503;
    }
    snprintf(msg, cap, "the engine failed: %s", j->error);
    return 500;
}

int jobs_run(const struct served_model *m, struct job **jobs, int n, const struct client *c, struct reply *r)
{
    if (jobs_submit(m, jobs, n, r) != 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (rc != 0) {
            job_cancel(jobs[i]);
            continue;
        }
        if (job_wait_client(jobs[i], INT_MAX, c) != 0) {
            r->status = HTTP_CLIENT_GONE;
            rc = -1;
            continue;
        }
        if (jobs[i]->batch_size > r->batch_size)
            r->batch_size = jobs[i]->batch_size;
        if (jobs[i]->failed) {
            char msg[320];
            const int status = job_failure(jobs[i], msg, sizeof msg);
            reply_error(r, status, "%s", msg);
            rc = -1;
        }
    }
    return rc;
}

/* ---- tokens and their log-probabilities -------------------------------- */

cJSON *token_label(const struct tokenizer *tk, int32_t id)
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
    return json_text(piece, len);
}

cJSON *logprob_entry(const struct tokenizer *tk, int32_t id, float logprob)
{
    cJSON *e = cJSON_CreateObject();
    int failed = json_put(e, "token", token_label(tk, id));
    failed |= json_put(e, "id", cJSON_CreateNumber(id));
    failed |= json_put(e, "logprob", cJSON_CreateNumber(logprob));
    return json_built(e, failed);
}

int top_logprobs_put(cJSON *o, const struct tokenizer *tk, const struct token_logprob *top, int k)
{
    if (k == 0)
        return 0;
    cJSON *list = cJSON_CreateArray();
    int failed = !list;
    for (int i = 0; i < k && !failed; i++)
        failed |= json_put(list, NULL, logprob_entry(tk, top[i].id, top[i].logprob));
    return json_put(o, "top_logprobs", json_built(list, failed));
}

cJSON *logprobs_item(const void *ctx, size_t i)
{
    const struct logprobs_of *l = ctx;
    cJSON *e = logprob_entry(l->tk, l->ids[i], l->lps[i]);
    if (e && top_logprobs_put(e, l->tk, l->k ? l->top + i * (size_t)l->k : NULL, l->k) != 0) {
        cJSON_Delete(e);
        return NULL;
    }
    return e;
}

/* Finished jobs and their model, held until their answer is sent. */
struct held {
    struct served_model *m;
    int n;
    struct job *jobs[];
};

static void release_held(void *p)
{
    struct held *h = p;
    for (int i = 0; i < h->n; i++)
        job_release(h->jobs[i]);
    served_model_release(h->m);
    free(h);
}

struct lazy_json *answer_holding(struct served_model *m, struct job *const *jobs, int n)
{
    struct held *h = malloc(sizeof *h + sizeof *jobs * (size_t)n);
    if (!h) {
        for (int i = 0; i < n; i++)
            job_release(jobs[i]);
        served_model_release(m);
        return NULL;
    }
    h->m = m;
    h->n = n;
    memcpy(h->jobs, jobs, sizeof *jobs * (size_t)n);
    return lazy_json_new(release_held, h);
}
