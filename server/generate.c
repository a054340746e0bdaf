/* generate.c - the generation endpoints: POST /generate, and POST
 * /v1/completions, the same generation in the shape of OpenAI's
 * completions API (see api.md).  A request's "n" generations are jobs that
 * share its tokenized prompt; they are answered whole once they end, or
 * one token at a time as Server-Sent Events that the HTTP layer pulls
 * (api_stream_read).
 */
#include <cjson/cJSON.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "handler.h"
#include "request_id.h"

#define DEFAULT_MAX_TOKENS 64
#define OPENAI_DEFAULT_MAX_TOKENS 16 /* the completions API's */
#define MAX_CHOICES 16 /* generations a request may ask for ("n") */

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

/* "stop": a string or an array of up to JOB_MAX_STOP strings, none empty. */
static int get_stops(const struct api *a, const cJSON *req, struct gen_request *g, struct reply *r)
{
    const cJSON *f = request_field(req, "stop");
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
        return request_bool(req, "logprobs", &g->logprobs, r) != 0 ||
                       request_int(req, "top_logprobs", 0, JOB_MAX_TOP_LOGPROBS, &g->top_logprobs, r) != 0
                   ? -1
                   : 0;
    long long k = -1;
    if (request_int(req, "logprobs", 0, JOB_MAX_TOP_LOGPROBS, &k, r) != 0)
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
    const cJSON *echo = request_field(req, "echo"), *bias = request_field(req, "logit_bias"), *opts = request_field(req, "stream_options");
    long long best_of = g->n;
    if (echo && !cJSON_IsFalse(echo)) {
        reply_error(r, 422, "\"echo\" is not supported: the answer holds the generated text only");
        return -1;
    }
    if (request_field(req, "suffix")) {
        reply_error(r, 422, "\"suffix\" is not supported: a recurrent model reads its text in one direction");
        return -1;
    }
    for (size_t i = 0; i < sizeof penalties / sizeof *penalties; i++) {
        double v = 0;
        if (request_number(req, penalties[i], &v, r) != 0)
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
    if (request_int(req, "best_of", 1, MAX_CHOICES, &best_of, r) != 0)
        return -1;
    if (best_of != g->n) {
        reply_error(r, 422, "\"best_of\" is not supported apart from \"n\"; leave it out or equal to \"n\"");
        return -1;
    }
    if (opts && !cJSON_IsObject(opts)) {
        reply_error(r, 400, "\"stream_options\" must be an object");
        return -1;
    }
    return opts ? request_bool(opts, "include_usage", &g->shape.include_usage, r) : 0;
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
    if (request_int(req, "max_tokens", 1, a->lim.max_tokens, &g->max_tokens, r) != 0 ||
        request_number(req, "temperature", &temperature, r) != 0 || request_number(req, "top_p", &top_p, r) != 0 ||
        request_int(req, "top_k", 0, INT_MAX, &top_k, r) != 0 ||
        request_int(req, "seed", 0, (long long)SAMPLE_SEED_MAX, &seed, r) != 0 ||
        get_stops(a, req, g, r) != 0 || request_bool(req, "stream", &g->stream, r) != 0 ||
        get_logprobs(req, g, r) != 0 || request_int(req, "n", 1, MAX_CHOICES, &g->n, r) != 0 ||
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
    } else if (sample_seed_random(&g->sample.seed) != 0) {
        reply_error(r, 500, "no random seed could be drawn");
        return -1;
    }
    return 0;
}

static const char *finish_name(enum finish_reason f)
{
    return f == FINISH_STOP ? "stop" : "length";
}

cJSON *generation_result(const struct job *j)
{
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "text", json_text(j->text ? j->text : "", j->text ? j->text_len : 0));
    failed |= json_put(o, "tokens", cJSON_CreateNumber(j->n_tokens));
    failed |= json_put(o, "prompt_tokens", cJSON_CreateNumber(j->lens[0]));
    failed |= json_put(o, "cached_tokens", cJSON_CreateNumber(j->cached_tokens));
    failed |= json_put(o, "finish_reason", cJSON_CreateString(finish_name(j->finish)));
    /* Raw digits: cJSON prints a large number with 15 significant digits
     * when that is within a rounding error, which would lose the seed. */
    char seed[24];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)j->sample.seed);
    failed |= json_put(o, "seed", cJSON_CreateRaw(seed));
    return json_built(o, failed);
}

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
    j->sample.seed = seed & SAMPLE_SEED_MAX;
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
    const cJSON *f = request_field(req, "prompt");
    if (d == DIALECT_NATIVE || !cJSON_IsArray(f))
        return request_texts(req, "prompt", 0, t, r);
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
    int n = request_tokenize(a, m, &t, jobs[0], r) == 0;
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
    int failed = json_put(o, "id", cJSON_CreateString(g->id));
    failed |= json_put(o, "object", cJSON_CreateString("text_completion"));
    failed |= json_put(o, "created", cJSON_CreateNumber((double)g->created));
    failed |= json_put(o, "model", cJSON_CreateString(model));
    return json_built(o, failed);
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
        failed |= json_put(tokens, NULL, token_label(tk, ids[i]));
        failed |= json_put(lps, NULL, cJSON_CreateNumber(j->token_logprob[i]));
        cJSON *top = j->top_logprobs ? cJSON_CreateObject() : NULL;
        for (int k = 0; top && k < j->top_logprobs && !failed; k++) {
            const struct token_logprob *t = &j->top[(size_t)i * j->top_logprobs + k];
            cJSON *label = token_label(tk, t->id);
            failed |= !label || json_put(top, label->valuestring, cJSON_CreateNumber(t->logprob));
            cJSON_Delete(label);
        }
        if (j->top_logprobs)
            failed |= json_put(tops, NULL, top);
    }
    failed |= json_put(o, "tokens", tokens);
    failed |= json_put(o, "token_logprobs", lps);
    failed |= json_put(o, "top_logprobs", tops);
    return json_built(o, failed);
}

/* One choice: its index, text (consumed), logprobs (consumed) and finish
 * reason (NULL: null, the stream's events before the last). */
static cJSON *openai_choice(int index, cJSON *text, cJSON *logprobs, const char *finish)
{
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "text", text);
    failed |= json_put(o, "index", cJSON_CreateNumber(index));
    failed |= json_put(o, "logprobs", logprobs);
    failed |= json_put(o, "finish_reason", finish ? cJSON_CreateString(finish) : cJSON_CreateNull());
    return json_built(o, failed);
}

/* "usage" of the n generations of one prompt: the prompt counted once, as
 * the completions API counts it, and how much of it the cache supplied. */
static cJSON *openai_usage(struct job *const *jobs, int n)
{
    int generated = 0;
    for (int i = 0; i < n; i++)
        generated += jobs[i]->n_tokens;
    cJSON *o = cJSON_CreateObject(), *details = cJSON_CreateObject();
    int failed = json_put(o, "prompt_tokens", cJSON_CreateNumber(jobs[0]->lens[0]));
    failed |= json_put(o, "completion_tokens", cJSON_CreateNumber(generated));
    failed |= json_put(o, "total_tokens", cJSON_CreateNumber(jobs[0]->lens[0] + generated));
    failed |= json_put(details, "cached_tokens", cJSON_CreateNumber(jobs[0]->cached_tokens));
    failed |= json_put(o, "prompt_tokens_details", details);
    return json_built(o, failed);
}

/* head + "choices" (consumed) + "usage" when jobs is not NULL. */
static cJSON *openai_object(const struct gen_shape *g, const char *model, cJSON *choices, struct job *const *jobs,
                            int n)
{
    cJSON *o = openai_head(g, model);
    int failed = json_put(o, "choices", choices);
    if (jobs)
        failed |= json_put(o, "usage", openai_usage(jobs, n));
    return json_built(o, failed);
}

/* The answer to a completions request that ran its n jobs. */
static cJSON *openai_answer(const struct served_model *m, const struct gen_shape *g, struct job *const *jobs, int n)
{
    cJSON *choices = cJSON_CreateArray();
    int failed = !choices;
    for (int i = 0; i < n && !failed; i++) {
        const struct job *j = jobs[i];
        failed |= json_put(choices, NULL,
                      openai_choice(i, json_text(j->text ? j->text : "", j->text ? j->text_len : 0),
                                    openai_logprobs(&m->tk, j, j->tokens, 0, j->n_tokens), finish_name(j->finish)));
    }
    return failed ? json_built(choices, 1) : openai_object(g, m->name, choices, jobs, n);
}

/* ---- Server-Sent Events ----------------------------------------------- */

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
    int failed = !choices || (choice && json_put(choices, NULL, choice));
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
    int failed = json_put(o, "token", cJSON_CreateString(s->clean));
    failed |= json_put(o, "id", cJSON_CreateNumber(id));
    failed |= json_put(o, "index", cJSON_CreateNumber(index));
    if (s->j->logprobs) {
        failed |= json_put(o, "logprob", cJSON_CreateNumber(s->j->token_logprob[index]));
        failed |= top_logprobs_put(o, &s->m->tk, s->j, index);
    }
    return add_event(s, json_built(o, failed));
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
        int failed = json_put(e, "code", cJSON_CreateNumber(500));
        failed |= json_put(e, "message", cJSON_CreateString(msg));
        failed |= json_put(last, "error", e);
        rc = add_event(s, json_built(last, failed));
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
        if (job_wait_client(s->j, s->seen, &s->client) != 0 || stream_collect(s) != 0)
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
    if (jobs_submit(m, &j, 1, r) != 0) {
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
        json_put(o, "logprobs", logprobs_list(&m->tk, j->tokens, j->token_logprob, j->n_tokens, j)) != 0) {
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
        failed |= json_put(results, NULL, generation_answer(m, jobs[i]));
    failed |= json_put(o, "results", results);
    return json_built(o, failed);
}

/* /generate and /v1/completions: the jobs, run or streamed, and the
 * answer in the request's dialect. */
static void generate(struct api *a, struct gen_request *g, const char *endpoint, const char *body, size_t len,
                     const struct client *c, struct reply *r)
{
    struct job *jobs[MAX_CHOICES] = {0};
    cJSON *req = request_parse(body, len, r);
    struct served_model *m = req ? request_model(a, req, endpoint, TASK_LM, r) : NULL;
    const int made = m && generation_jobs(a, m, req, g, jobs, r) == 0;
    const int n = made ? (int)g->n : 0;
    if (made && g->stream && start_stream(m, jobs[0], &g->shape, c, r) == 0) {
        m = NULL; /* the stream's now */
        jobs[0] = NULL;
    } else if (made && !g->stream && jobs_run(m, jobs, n, c, r) == 0) {
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
