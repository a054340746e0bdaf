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
#include "lazy_json.h"
#include "request_id.h"

#define DEFAULT_MAX_TOKENS 64
#define OPENAI_DEFAULT_MAX_TOKENS 16 /* the completions API's */
#define MAX_CHOICES 16 /* generations of one prompt a request may ask for ("n") */
#define MAX_JOBS MAX_TEXTS /* completions: prompts times n */

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
    int echo;              /* openai: the prompt, and its tokens' log-probabilities,
                              before each completion */
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
        return request_logprobs(req, &g->logprobs, &g->top_logprobs, r);
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
    const cJSON *bias = request_field(req, "logit_bias"), *opts = request_field(req, "stream_options");
    long long best_of = g->n;
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
    g->stream = g->logprobs = g->echo = 0;
    g->top_logprobs = 0;
    g->n = 1;
    /* With echo, max_tokens 0 asks for the prompt's log-probabilities alone. */
    if ((g->shape.dialect == DIALECT_OPENAI && request_bool(req, "echo", &g->echo, r) != 0) ||
        request_int(req, "max_tokens", g->echo ? 0 : 1, a->lim.max_tokens, &g->max_tokens, r) != 0 ||
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
    j->top_logprobs = top_logprobs_for(m, g->top_logprobs);
    for (int i = 0; i < g->n_stop; i++)
        if (!(j->stop[j->n_stop++] = strdup(g->stop[i]))) {
            reply_error(r, 500, "out of memory");
            job_release(j);
            return NULL;
        }
    return j;
}

/* "prompt": a string; the completions API's may also be an array of up to
 * MAX_TEXTS strings, each prompt its own completions.  (Not token ids:
 * this server's are its tokenizers', which clients do not have.) */
static int get_prompt(const cJSON *req, enum dialect d, struct texts *t, struct reply *r)
{
    const cJSON *f = request_field(req, "prompt");
    if (d == DIALECT_NATIVE || !cJSON_IsArray(f))
        return request_texts(req, "prompt", 0, t, r);
    const int n = cJSON_GetArraySize(f);
    if (n < 1 || n > MAX_TEXTS) {
        reply_error(r, 422, "\"prompt\" must hold from 1 to %d prompts, not %d", MAX_TEXTS, n);
        return -1;
    }
    t->field = "prompt";
    snprintf(t->list, sizeof t->list, "prompt");
    t->many = 1;
    t->n = 0;
    for (const cJSON *e = f->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            reply_error(r, 400, "\"prompt[%d]\" must be a string (token ids are not taken)", t->n);
            return -1;
        }
        t->s[t->n++] = e->valuestring;
    }
    return 0;
}

/* The jobs of a generation request.  First the generations, g->n of each
 * prompt (none when max_tokens is 0): prompt p's i-th at jobs[p * g->n + i],
 * a twin of the first sharing its tokens, with the first's seed + i, so
 * that it is the generation one request with that prompt and seed would
 * give.  Then, with echo, a score job holding every prompt's tokens, whose
 * terms and alternatives the answer echoes.  How many jobs, or -1 with r
 * set and no job left. */
static int generation_jobs(const struct api *a, const struct served_model *m, const cJSON *req,
                           struct gen_request *g, struct texts *t, struct job **jobs, struct reply *r)
{
    if (get_prompt(req, g->shape.dialect, t, r) != 0 || get_generation(a, req, g, r) != 0)
        return -1;
    if (t->n * g->n > MAX_JOBS) {
        reply_error(r, 422, "%d prompts of %lld completions each are more than the %d a request may ask for", t->n,
                    g->n, MAX_JOBS);
        return -1;
    }
    if (t->n > 1 && g->stream) {
        reply_error(r, 422, "several prompts cannot be streamed; ask with \"stream\": false");
        return -1;
    }
    const int per = g->max_tokens > 0 ? (int)g->n : 0;
    int made = 0, ok = 1;
    for (int p = 0; ok && p < t->n && per; p++) {
        struct job *first = set_generation(job_new(JOB_GENERATE, 1), m, g, g->sample.seed, r);
        if ((ok = first != NULL)) {
            jobs[made++] = first;
            ok = request_tokenize(a, m, t, p, first, r) == 0;
        }
        for (int i = 1; ok && i < per; i++)
            if ((ok = (jobs[made] = set_generation(job_twin(first), m, g, g->sample.seed + (uint64_t)i, r)) != NULL))
                made++;
    }
    if (ok && g->echo) {
        struct job *e = job_new(JOB_SCORE, t->n);
        if ((ok = e != NULL)) {
            jobs[made++] = e;
            e->logprobs = g->logprobs;
            e->top_logprobs = top_logprobs_for(m, g->top_logprobs);
            ok = request_tokenize(a, m, t, 0, e, r) == 0 && request_alternatives_fit(e, r) == 0;
        } else {
            reply_error(r, 500, "out of memory");
        }
    }
    if (ok)
        return made;
    for (int i = 0; i < made; i++)
        job_release(jobs[i]);
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

/* The tokens of a choice's "logprobs": an echoed prompt's (echo_len of
 * them, the first with no log-probability: nothing predicts it; token t
 * with echo_terms[t-1] and its alternatives), then the generated ones
 * (ids, with lps and top). */
struct lp_source {
    const struct tokenizer *tk;
    int k;
    const int32_t *echo_ids;
    const float *echo_terms;
    const struct token_logprob *echo_top;
    const size_t *echo_at;
    int echo_len;
    const int32_t *ids;
    const float *lps;
    const struct token_logprob *top;
    const size_t *at;      /* the generated ones' text offsets, after base */
    size_t base;
};

/* Token i of a choice's: its id, and its log-probability and alternatives
 * (NULL for an echoed prompt's first token). */
static int32_t lp_at(const struct lp_source *s, size_t i, const float **lp, const struct token_logprob **top)
{
    const int echoed = i < (size_t)s->echo_len;
    const size_t g = echoed ? i - 1 : i - (size_t)s->echo_len;
    *lp = echoed && i == 0 ? NULL : echoed ? &s->echo_terms[g] : &s->lps[g];
    *top = !*lp || !s->k ? NULL : (echoed ? s->echo_top : s->top) + g * (size_t)s->k;
    return echoed ? s->echo_ids[i] : s->ids[g];
}

/* The API's three parallel lists, an item each (lazy_item). */
static cJSON *lp_token_item(const void *ctx, size_t i)
{
    const float *lp;
    const struct token_logprob *top;
    return token_label(((const struct lp_source *)ctx)->tk, lp_at(ctx, i, &lp, &top));
}

static cJSON *lp_logprob_item(const void *ctx, size_t i)
{
    const float *lp;
    const struct token_logprob *top;
    lp_at(ctx, i, &lp, &top);
    return lp ? cJSON_CreateNumber(*lp) : cJSON_CreateNull();
}

/* Where token i begins (text_offset), in characters from the prompt's start. */
static cJSON *lp_offset_item(const void *ctx, size_t i)
{
    const struct lp_source *s = ctx;
    const size_t g = i - (size_t)s->echo_len;
    return cJSON_CreateNumber((double)(i < (size_t)s->echo_len ? s->echo_at[i] : s->base + s->at[g]));
}

/* A token's alternatives as {token: logprob}. */
static cJSON *lp_top_item(const void *ctx, size_t i)
{
    const struct lp_source *s = ctx;
    const float *lp;
    const struct token_logprob *top;
    lp_at(s, i, &lp, &top);
    if (!lp)
        return cJSON_CreateNull();
    cJSON *alt = cJSON_CreateObject();
    int failed = !alt;
    for (int a = 0; a < s->k && !failed; a++) {
        cJSON *label = token_label(s->tk, top[a].id);
        failed |= !label || json_put(alt, label->valuestring, cJSON_CreateNumber(top[a].logprob));
        cJSON_Delete(label);
    }
    return json_built(alt, failed);
}

/* An echoed prompt: its text as the request gave it, its tokens, and when
 * they were asked for, their terms and alternatives from the score job
 * (entry t-1 is token t's). */
struct echo {
    const char *text;
    const int32_t *ids;
    int len;
    const float *terms;
    const struct token_logprob *top;
    const size_t *at;      /* text offsets, with logprobs */
};

/* Prompt p of the score job e. */
static struct echo echo_of(const struct texts *t, const struct job *e, int p)
{
    const size_t at = job_text_at(e, p);
    return (struct echo){.text = t->s[p], .ids = e->ids[p], .len = e->lens[p],
                         .terms = e->token_logprob ? e->token_logprob + at : NULL, .top = job_top(e, at),
                         .at = e->text_at ? e->text_at + at : NULL};
}

/* Generated tokens n of job j from token `from` on, with their text
 * offsets: at[i] + base for token from + i. */
struct generated {
    const struct job *j;
    const int32_t *ids;
    int from, n;
    const size_t *at;
    size_t base;
};

/* A choice's "logprobs", null when not asked for: the echoed prompt's
 * tokens (echo not NULL), then the generated ones (g NULL: none); the
 * lists are z's (lazy_json.h), or made now with z NULL.  Without
 * alternatives "top_logprobs" is null. */
static cJSON *openai_logprobs(const struct tokenizer *tk, int want, int k, const struct echo *echo,
                              const struct generated *g, struct lazy_json *z)
{
    if (!want)
        return cJSON_CreateNull();
    struct lp_source s = {.tk = tk, .k = k};
    if (echo)
        s = (struct lp_source){.tk = tk, .k = k, .echo_ids = echo->ids, .echo_terms = echo->terms,
                               .echo_top = echo->top, .echo_at = echo->at, .echo_len = echo->len};
    if (g && g->n) {
        s.ids = g->ids + g->from;
        s.lps = g->j->token_logprob + g->from;
        s.top = job_top(g->j, (size_t)g->from);
        s.at = g->at;
        s.base = g->base;
    }
    const size_t len = (size_t)s.echo_len + (size_t)(g ? g->n : 0);
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "tokens", lazy_json_array(z, lp_token_item, &s, sizeof s, len));
    failed |= json_put(o, "token_logprobs", lazy_json_array(z, lp_logprob_item, &s, sizeof s, len));
    failed |= json_put(o, "top_logprobs", k ? lazy_json_array(z, lp_top_item, &s, sizeof s, len) : cJSON_CreateNull());
    failed |= json_put(o, "text_offset", lazy_json_array(z, lp_offset_item, &s, sizeof s, len));
    return json_built(o, failed);
}

/* ---- text_offset: where each token begins, in characters --------------- */

/* Text as tokens or pieces of a prompt join it: each one's clean text
 * (utf8_stream: a character split over byte tokens comes whole with its
 * last byte), and the characters taken so far. */
struct joined {
    struct utf8_stream text;
    size_t chars;
};

/* Puts n bytes (after a space with space set); *at: the characters before
 * them, that is where they begin (a character they finish began before
 * them).  Their clean text, NUL-terminated, valid until the next call;
 * NULL when out of memory. */
static const char *join(struct joined *t, int space, const char *p, size_t n, int final, size_t *len, size_t *at)
{
    const char *clean;
    if ((space && utf8_stream_put(&t->text, " ", 1) != 0) || (n && utf8_stream_put(&t->text, p, n) != 0) ||
        !(clean = utf8_stream_take(&t->text, final, len)))
        return NULL;
    *at = t->chars + (space ? 1 : 0);
    t->chars += utf8_length(clean, *len);
    return clean;
}

/* Token id as the batcher joins it to a generation's text of `before`
 * bytes: its piece and length, after a space when it is a word that is
 * not the text's first.  raw: room for a piece made. */
struct token_bytes {
    const char *piece;
    size_t len;
    int space;
};

static struct token_bytes token_bytes(const struct tokenizer *tk, int32_t id, size_t before, char raw[8])
{
    size_t len = 0;
    const char *piece = tokenizer_token(tk, id, raw, &len);
    return (struct token_bytes){.piece = piece, .len = piece ? len : 0,
                                .space = tk->type == TOKENIZER_WORD && before > 0};
}

/* How many of j's tokens its text shows: after a stop string, those that
 * begin before the cut (the last of them perhaps in part); else all.  A
 * completion lists these in its logprobs, streamed or not, as the tokens
 * of its text. */
static int tokens_shown(const struct tokenizer *tk, const struct job *j)
{
    if (j->finish != FINISH_STOP)
        return j->n_tokens;
    size_t at = 0;
    int i = 0;
    for (char raw[8]; i < j->n_tokens && at < j->text_len; i++) {
        const struct token_bytes t = token_bytes(tk, j->tokens[i], at, raw);
        at += (size_t)t.space + t.len;
    }
    return i;
}

/* The characters of prompt and, with at not NULL, where each of its n
 * tokens begins in it.  -1 when out of memory. */
static long long prompt_chars(const struct tokenizer *tk, const char *prompt, size_t *at, int n)
{
    struct joined t = {0};
    size_t *starts = NULL, len, from = 0, count = 0, before;
    int32_t *ids = NULL;
    int ok = !at || tokenizer_encode_spans(tk, prompt, strlen(prompt), &ids, &starts, &count) == 0;
    for (size_t i = 0; ok && at && i < count && i < (size_t)n; from = starts[i++]) {
        ok = join(&t, 0, prompt + from, starts[i] - from, 0, &len, &before) != NULL;
        at[i] = t.chars;
    }
    ok = ok && join(&t, 0, prompt + from, strlen(prompt) - from, 1, &len, &before);
    free(ids);
    free(starts);
    utf8_stream_free(&t.text);
    return ok ? (long long)t.chars : -1;
}

/* Where a completion's text begins, as text_offset counts (from the
 * prompt's start, whether or not the answer echoes it): after the prompt's
 * characters and a word model's joining space (openai_text), unless the
 * completion's joined text holds that space itself (a stream that sent
 * its prompt first). */
static size_t completion_base(const struct tokenizer *tk, const char *prompt, long long chars, int holds_space)
{
    return (size_t)chars + (tk->type == TOKENIZER_WORD && *prompt && !holds_space);
}

/* j->text_at, for the answer's text_offset: where each of its tokens
 * begins in the generated text.  0, or -1 when out of memory. */
static int generated_offsets(const struct tokenizer *tk, struct job *j)
{
    struct joined t = {0};
    size_t len, before = 0;
    int ok = (j->text_at = malloc(sizeof *j->text_at * ((size_t)j->n_tokens + 1))) != NULL;
    for (int i = 0; ok && i < j->n_tokens; i++) {
        char raw[8];
        const struct token_bytes b = token_bytes(tk, j->tokens[i], before, raw);
        ok = join(&t, b.space, b.piece, b.len, 0, &len, &j->text_at[i]) != NULL;
        before += (size_t)b.space + b.len;
    }
    utf8_stream_free(&t.text);
    return ok ? 0 : -1;
}

/* e->text_at, for an echo's text_offset: where each token of each prompt
 * begins in it; chars[p], prompt p's characters.  0, or -1 when out of
 * memory. */
static int echo_offsets(const struct tokenizer *tk, const struct texts *t, struct job *e, long long *chars)
{
    if (!(e->text_at = malloc(sizeof *e->text_at * (job_text_at(e, e->n_texts) + 1))))
        return -1;
    for (int p = 0; p < t->n; p++)
        if ((chars[p] = prompt_chars(tk, t->s[p], e->text_at + job_text_at(e, p), e->lens[p])) < 0)
            return -1;
    return 0;
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

/* "usage" of a request's prompts and their generations (per each, in
 * jobs as generation_jobs lays them out; echo, the score job, when per is
 * 0): each prompt counted once, as the completions API counts it, and how
 * much of them the cache supplied. */
static cJSON *openai_usage(struct job *const *jobs, int prompts, int per, const struct job *echo)
{
    int prompt_tokens = 0, generated = 0, cached = 0;
    for (int p = 0; p < prompts; p++) {
        prompt_tokens += per ? jobs[p * per]->lens[0] : echo->lens[p];
        cached += per ? jobs[p * per]->cached_tokens : 0;
        for (int i = 0; i < per; i++)
            generated += jobs[p * per + i]->n_tokens;
    }
    cJSON *o = cJSON_CreateObject(), *details = cJSON_CreateObject();
    int failed = json_put(o, "prompt_tokens", cJSON_CreateNumber(prompt_tokens));
    failed |= json_put(o, "completion_tokens", cJSON_CreateNumber(generated));
    failed |= json_put(o, "total_tokens", cJSON_CreateNumber(prompt_tokens + generated));
    failed |= json_put(details, "cached_tokens", cJSON_CreateNumber(cached));
    failed |= json_put(o, "prompt_tokens_details", details);
    return json_built(o, failed);
}

/* head + "choices" + "usage" (both consumed; usage NULL: none). */
static cJSON *openai_object(const struct gen_shape *g, const char *model, cJSON *choices, cJSON *usage)
{
    cJSON *o = openai_head(g, model);
    int failed = json_put(o, "choices", choices);
    if (usage)
        failed |= json_put(o, "usage", usage);
    return json_built(o, failed);
}

/* A choice's text: with echo, the prompt before the generated text (and
 * a space between them for a word model, whose words the generation
 * joins with spaces). */
static cJSON *openai_text(const struct tokenizer *tk, const struct echo *echo, const struct job *j)
{
    const char *gen = j && j->text ? j->text : "";
    const size_t gen_len = j && j->text ? j->text_len : 0;
    if (!echo)
        return json_text(gen, gen_len);
    const size_t prompt_len = strlen(echo->text);
    const int space = tk->type == TOKENIZER_WORD && prompt_len && gen_len;
    char *both = malloc(prompt_len + space + gen_len + 1);
    if (!both)
        return NULL;
    memcpy(both, echo->text, prompt_len);
    if (space)
        both[prompt_len] = ' ';
    memcpy(both + prompt_len + space, gen, gen_len);
    cJSON *o = json_text(both, prompt_len + space + gen_len);
    free(both);
    return o;
}

/* The answer to a completions request whose jobs ran: a choice for each of
 * the n generations of each prompt (n echoes alone with max_tokens 0), the
 * lists of their tokens z's. */
static cJSON *openai_answer(const struct served_model *m, const struct gen_request *g, const struct texts *t,
                            struct job *const *jobs, struct lazy_json *z)
{
    const int per = g->max_tokens > 0 ? (int)g->n : 0, n = (int)g->n, k = top_logprobs_for(m, g->top_logprobs);
    struct job *e = g->echo ? jobs[t->n * per] : NULL;
    /* With logprobs, text offsets: prompt p's characters before its
     * completions, and where each token begins. */
    long long chars[MAX_TEXTS] = {0};
    int failed = 0;
    if (g->logprobs) {
        failed = e && echo_offsets(&m->tk, t, e, chars) != 0;
        for (int p = 0; !e && p < t->n; p++)
            failed |= (chars[p] = prompt_chars(&m->tk, t->s[p], NULL, 0)) < 0;
        for (int c = 0; c < t->n * per && !failed; c++)
            failed = generated_offsets(&m->tk, jobs[c]) != 0;
    }
    cJSON *choices = failed ? NULL : cJSON_CreateArray();
    failed = !choices;
    for (int c = 0; c < t->n * n && !failed; c++) {
        const struct job *j = per ? jobs[c] : NULL;
        const struct echo echo = e ? echo_of(t, e, c / n) : (struct echo){0};
        const struct echo *ep = e ? &echo : NULL;
        const struct generated gen = {.j = j, .ids = j ? j->tokens : NULL, .n = j ? tokens_shown(&m->tk, j) : 0,
                                      .at = j ? j->text_at : NULL,
                                      .base = completion_base(&m->tk, t->s[c / n], chars[c / n], 0)};
        failed |= json_put(choices, NULL,
                           openai_choice(c, openai_text(&m->tk, ep, j),
                                         openai_logprobs(&m->tk, g->logprobs, k, ep, j ? &gen : NULL, z),
                                         j ? finish_name(j->finish) : "length"));
    }
    return failed ? json_built(choices, 1)
                  : openai_object(&g->shape, m->name, choices, openai_usage(jobs, t->n, per, e));
}

/* ---- Server-Sent Events ----------------------------------------------- */

struct api_stream {
    struct served_model *m;
    struct job *j;
    struct gen_shape shape;
    struct client client;
    int seen;             /* tokens already turned into events */
    int have;             /* tokens copied out of the job */
    size_t sent;          /* bytes of the job's text those events hold */
    int after_prompt;     /* an echoed prompt went first (a word model's first
                             token then takes a space, as openai_text joins them) */
    int ended;            /* the last events are in out */
    int batch_size;
    int32_t *ids;         /* tokens copied out of the job */
    struct joined text;   /* the tokens' text, cleaned */
    size_t base;          /* with logprobs, the text offset of the text's start */
    struct bytes out;     /* event bytes not yet read */
    size_t out_pos;
};

/* One `data: JSON` event into out; o is consumed. */
static int event_add(struct bytes *out, cJSON *o)
{
    char *json = o ? cJSON_PrintUnformatted(o) : NULL;
    int rc = json && bytes_add(out, "data: ", 6) == 0 && bytes_add(out, json, strlen(json)) == 0 &&
                     bytes_add(out, "\n\n", 2) == 0
                 ? 0
                 : -1;
    free(json);
    cJSON_Delete(o);
    return rc;
}

static int add_event(struct api_stream *s, cJSON *o)
{
    return event_add(&s->out, o);
}

/* A completions stream's event: one choice, or none and the usage (each
 * consumed, one of them NULL). */
static cJSON *openai_event(const struct gen_shape *shape, const char *model, cJSON *choice, cJSON *usage)
{
    cJSON *choices = cJSON_CreateArray();
    int failed = !choices || (choice && json_put(choices, NULL, choice));
    if (failed) {
        cJSON_Delete(choices);
        cJSON_Delete(usage);
        return NULL;
    }
    return openai_object(shape, model, choices, usage);
}

/* The end of a completions stream: the event with the finish reason, the
 * usage's when asked for (jobs and echo as openai_usage takes them), and
 * [DONE]. */
static int openai_end(struct bytes *out, const struct gen_shape *shape, const char *model, const char *finish,
                      struct job *const *jobs, int per, const struct job *echo)
{
    int rc = event_add(out, openai_event(shape, model,
                                         openai_choice(0, cJSON_CreateString(""), cJSON_CreateNull(), finish), NULL));
    if (rc == 0 && shape->include_usage)
        rc = event_add(out, openai_event(shape, model, NULL, openai_usage(jobs, 1, per, echo)));
    return rc == 0 && bytes_add(out, "data: [DONE]\n\n", 14) == 0 ? 0 : -1;
}

/* The event of token `index`, n bytes of its piece after a space or not:
 * its text joins the text before it as the batcher joins them, and a
 * character split over several byte tokens is sent whole with the last of
 * them, or as U+FFFD with the stream's last (final). */
static int token_event(struct api_stream *s, int32_t id, int index, const char *piece, size_t n, int space, int final)
{
    size_t clean_len, at;
    const char *clean = join(&s->text, space, piece, n, final, &clean_len, &at);
    if (!clean)
        return -1;
    if (s->shape.dialect == DIALECT_OPENAI) {
        const struct job *j = s->j;
        const struct generated gen = {.j = j, .ids = s->ids, .from = index, .n = 1, .at = &at, .base = s->base};
        cJSON *lps = openai_logprobs(&s->m->tk, j->logprobs, j->top_logprobs, NULL, &gen, NULL);
        return add_event(s, openai_event(&s->shape, s->m->name, openai_choice(0, cJSON_CreateString(clean), lps, NULL),
                                         NULL));
    }
    cJSON *o = cJSON_CreateObject();
    int failed = json_put(o, "token", cJSON_CreateString(clean));
    failed |= json_put(o, "id", cJSON_CreateNumber(id));
    failed |= json_put(o, "index", cJSON_CreateNumber(index));
    if (s->j->logprobs) {
        failed |= json_put(o, "logprob", cJSON_CreateNumber(s->j->token_logprob[index]));
        failed |= top_logprobs_put(o, &s->m->tk, job_top(s->j, (size_t)index), s->j->top_logprobs);
    }
    return add_event(s, json_built(o, failed));
}

/* The events after a generation's last token: its outcome and "[DONE]". */
static int last_events(struct api_stream *s)
{
    struct job *j = s->j;
    int rc = 0;
    if (j->failed) {
        char msg[320];
        const int status = job_failure(j, msg, sizeof msg);
        cJSON *e = cJSON_CreateObject(), *last = cJSON_CreateObject();
        int failed = json_put(e, "code", cJSON_CreateNumber(status));
        failed |= json_put(e, "message", cJSON_CreateString(msg));
        failed |= json_put(last, "error", e);
        rc = add_event(s, json_built(last, failed));
    } else if (s->shape.dialect == DIALECT_OPENAI) {
        return openai_end(&s->out, &s->shape, s->m->name, finish_name(j->finish), &j, 1, NULL);
    } else {
        rc = add_event(s, generation_result(j));
    }
    return rc == 0 && bytes_add(&s->out, "data: [DONE]\n\n", 14) == 0 ? 0 : -1;
}

/* Turns what the job has produced since the last call into events.  A
 * completions stream sends only text that no stop string can take back
 * (job_text_settled), and nothing past the cut of the one that ended it,
 * as the API's streams do, so that its pieces join to the answer's text;
 * a /generate stream sends each token as it comes (api.md).  A token that
 * leaves a character unfinished waits for the next one or the end, which
 * finishes it or ends it as U+FFFD. */
static int stream_collect(struct api_stream *s)
{
    struct job *j = s->j;
    pthread_mutex_lock(&j->mu);
    const int n = j->n_tokens, done = j->done;
    const size_t limit = s->shape.dialect == DIALECT_OPENAI ? job_text_settled(j) : SIZE_MAX;
    const int cut = done && j->finish == FINISH_STOP;
    if (n > s->have)
        memcpy(s->ids + s->have, j->tokens + s->have, sizeof *s->ids * (size_t)(n - s->have));
    s->have = n;
    pthread_mutex_unlock(&j->mu);
    for (char raw[8]; s->seen < n && !(cut && s->sent >= limit); s->seen++) {
        const struct token_bytes t = token_bytes(&s->m->tk, s->ids[s->seen], s->sent, raw);
        const size_t end = s->sent + (size_t)t.space + t.len;
        const int last = done && (s->seen == n - 1 || end >= limit);
        if (!done && (end > limit || (s->seen == n - 1 && utf8_stream_open(&s->text.text, t.piece, t.len))))
            break;
        const size_t len = end > limit ? limit - s->sent - (size_t)t.space : t.len;
        const int space = t.space || (s->m->tk.type == TOKENIZER_WORD && s->after_prompt && s->seen == 0);
        if (token_event(s, s->ids[s->seen], s->seen, t.piece, len, space, last) != 0)
            return -1;
        s->sent = end;
    }
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
        if (job_wait_client(s->j, s->have, &s->client) != 0 || stream_collect(s) != 0)
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
    utf8_stream_free(&s->text.text);
    free(s->out.p);
    free(s);
}

/* Submits the job and hands the stream to r, its first event first (an
 * echoed prompt, consumed; NULL: none); the stream takes over the
 * references to m and j.  0, or -1 with r set (m and j still the caller's). */
static int start_stream(struct served_model *m, struct job *j, const struct gen_shape *shape, const struct client *c,
                        const char *prompt, cJSON *first, struct reply *r)
{
    struct api_stream *s = calloc(1, sizeof *s);
    int32_t *ids = malloc(sizeof *ids * (size_t)j->max_tokens);
    const long long chars = j->logprobs ? prompt_chars(&m->tk, prompt, NULL, 0) : 0;
    if (!s || !ids || chars < 0 || jobs_submit(m, &j, 1, r) != 0) {
        if (!s || !ids || chars < 0)
            reply_error(r, 500, "out of memory");
        free(s);
        free(ids);
        cJSON_Delete(first);
        return -1;
    }
    *s = (struct api_stream){.m = m, .j = j, .shape = *shape, .client = *c, .batch_size = -1, .ids = ids,
                             .after_prompt = first != NULL,
                             .base = completion_base(&m->tk, prompt, chars, first != NULL)};
    if (first && add_event(s, first) != 0)
        job_cancel(j); /* out of memory: the stream ends at its first read */
    r->status = 200;
    r->stream = s;
    return 0;
}

/* A stream's first event with echo: the prompt, and with logprobs its
 * tokens', for which the score job e runs first.  NULL with r set when it
 * cannot be made. */
static cJSON *echo_event(const struct served_model *m, const struct gen_request *g, const struct texts *t,
                         struct job *e, const struct client *c, struct reply *r)
{
    long long chars;
    if (g->logprobs && (jobs_run(m, &e, 1, c, r) != 0 || echo_offsets(&m->tk, t, e, &chars) != 0)) {
        if (!r->status)
            reply_error(r, 500, "out of memory");
        return NULL;
    }
    const struct echo echo = echo_of(t, e, 0);
    cJSON *choices = cJSON_CreateArray(), *o = NULL;
    if (choices &&
        json_put(choices, NULL,
                 openai_choice(0, openai_text(&m->tk, &echo, NULL),
                               openai_logprobs(&m->tk, g->logprobs, top_logprobs_for(m, g->top_logprobs), &echo,
                                               NULL, NULL),
                               NULL)) == 0)
        o = openai_object(&g->shape, m->name, choices, NULL);
    else
        cJSON_Delete(choices);
    if (!o)
        reply_error(r, 500, "out of memory");
    return o;
}

/* A completions stream of an echoed prompt alone (max_tokens 0), whose
 * events are all there at once: the prompt's (first, consumed), the end's
 * and [DONE]. */
static void echo_only_events(const struct served_model *m, const struct gen_request *g, cJSON *first,
                             const struct job *e, struct reply *r)
{
    struct bytes out = {0};
    if (event_add(&out, first) != 0 || openai_end(&out, &g->shape, m->name, "length", NULL, 0, e) != 0) {
        free(out.p);
        reply_error(r, 500, "out of memory");
        return;
    }
    r->status = 200;
    r->body = out.p;
    r->content_type = "text/event-stream";
}

/* A finished generation's answer: generation_result, and the tokens'
 * log-probabilities when they were asked for. */
static cJSON *generation_answer(const struct served_model *m, const struct job *j)
{
    cJSON *o = generation_result(j);
    const struct logprobs_of l = {&m->tk, j->tokens, j->token_logprob, j->top, j->top_logprobs};
    if (o && j->logprobs &&
        json_put(o, "logprobs", lazy_json_array(NULL, logprobs_item, &l, sizeof l, (size_t)j->n_tokens)) != 0) {
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
    struct job *jobs[MAX_JOBS + 1] = {0};
    struct texts t;
    cJSON *req = request_parse(body, len, r);
    struct served_model *m = req ? request_model(a, req, endpoint, TASK_LM, r) : NULL;
    const int n = m ? generation_jobs(a, m, req, g, &t, jobs, r) : -1;
    /* Without logprobs the echo job only holds the prompts' tokens. */
    const int run = n - (g->echo && !g->logprobs);
    cJSON *first = n > 0 && g->stream && g->echo ? echo_event(m, g, &t, jobs[n - 1], c, r) : NULL;
    if (first && g->max_tokens == 0) {
        echo_only_events(m, g, first, jobs[n - 1], r);
    } else if (n > 0 && g->stream && (first || !g->echo) &&
               start_stream(m, jobs[0], &g->shape, c, t.s[0], first, r) == 0) {
        m = NULL; /* the stream's now */
        jobs[0] = NULL;
    } else if (n > 0 && !g->stream && (run == 0 || jobs_run(m, jobs, run, c, r) == 0)) {
        if (g->shape.dialect == DIALECT_OPENAI) {
            /* With echo and logprobs, as evaluation harnesses ask, the
             * answer grows with the prompts: written as it is sent. */
            struct lazy_json *z = answer_holding(m, jobs, n);
            if (z)
                reply_lazy_json(r, 200, openai_answer(m, g, &t, jobs, z), z);
            else
                reply_error(r, 500, "out of memory");
            m = NULL;
            memset(jobs, 0, sizeof jobs);
        } else {
            reply_json(r, 200, n == 1 ? generation_answer(m, jobs[0]) : generation_answers(m, jobs, n));
        }
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
