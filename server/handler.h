/* handler.h - what the endpoint handlers of api.c and generate.c are made
 * of: JSON built with every allocation checked, the request's fields read
 * and checked (a 400 or 422 naming the field at fault otherwise), texts
 * tokenized, jobs handed to a model's batcher and waited for while the
 * client is still there, and tokens with their log-probabilities as JSON.
 */
#ifndef RRN_HANDLER_H
#define RRN_HANDLER_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "batcher.h"
#include "bytes.h"
#include "registry.h"
#include "utf8.h"

#define MAX_TEXTS 256

/* The texts of a request, borrowed from its parsed JSON. */
struct texts {
    int n;
    int many;               /* given as an array, not one string */
    const char *field;      /* the string's field: "text" or "prompt" */
    char list[16];          /* the array's field: "texts", or the completions
                               API's "prompt" */
    const char *s[MAX_TEXTS];
};

/* ---- JSON building ---- */

/* Adds v (NULL when its allocation failed) to object o under key, or to
 * array o when key is NULL; on failure v is freed.  Returns 0 or 1 (failed),
 * so callers can OR the results and check once. */
int json_put(cJSON *o, const char *key, cJSON *v);
/* o when nothing failed, else NULL (o freed). */
cJSON *json_built(cJSON *o, int failed);
/* A JSON string of n bytes of text, cleaned as utf8_clean does. */
cJSON *json_text(const char *text, size_t n);

/* ---- the request's fields: 0, or -1 with the error in r ---- */

/* The request object, or NULL with a 400 in r. */
cJSON *request_parse(const char *body, size_t len, struct reply *r);
/* An optional field: NULL when absent or null. */
const cJSON *request_field(const cJSON *req, const char *name);
/* Optional fields, left at their defaults when absent: an integer in
 * [lo, hi] (400 when not an integer, 422 out of range), a finite number
 * (the caller checks its range), true or false. */
int request_int(const cJSON *req, const char *name, long long lo, long long hi, long long *out, struct reply *r);
int request_number(const cJSON *req, const char *name, double *out, struct reply *r);
int request_bool(const cJSON *req, const char *name, int *out, struct reply *r);
/* "logprobs" (true or false) and "top_logprobs" (0 to JOB_MAX_TOP_LOGPROBS,
 * only with logprobs). */
int request_logprobs(const cJSON *req, int *logprobs, long long *top, struct reply *r);
/* The model the request names, of the task the endpoint needs (task < 0:
 * any), a reference for the caller to release; NULL with a 400, 404 or 422
 * in r. */
struct served_model *request_model(struct api *a, const cJSON *req, const char *endpoint, int task,
                                   struct reply *r);
/* The request's text: the string field `name`, or when many_ok, instead an
 * array of 1..MAX_TEXTS strings under `name` + "s". */
int request_texts(const cJSON *req, const char *name, int many_ok, struct texts *t, struct reply *r);
/* Tokenizes texts first.. into the job's j->n_texts inputs (422: too long,
 * no tokens). */
int request_tokenize(const struct api *a, const struct served_model *m, const struct texts *t, int first,
                     struct job *j, struct reply *r);
/* 0 when each of the texts of score job j has a finite log-probability;
 * else a 422 naming the first that has not (JSON has no Inf or NaN, and a
 * null would read as a score). */
int request_scores_finite(const struct texts *t, const struct job *j, struct reply *r);

/* The alternatives a token gets for top_logprobs `asked`: at most the
 * model's vocabulary. */
int top_logprobs_for(const struct served_model *m, long long asked);
/* 422 when a score job asks for more than MAX_ALTERNATIVES alternatives
 * (its tokens times top_logprobs): each is some 40 bytes of answer, so
 * that a request cannot ask for gigabytes. */
#define MAX_ALTERNATIVES (1 << 20)
int request_alternatives_fit(const struct job *j, struct reply *r);

/* ---- running jobs ---- */

/* Waits for news of job j (job_wait), cancelling it and returning -1 when
 * the client goes away meanwhile. */
int job_wait_client(struct job *j, int seen, const struct client *c);
/* 0 when the model's batcher took the n jobs, else -1 with a 503 (or 422:
 * more than its queue ever holds) in r. */
int jobs_submit(const struct served_model *m, struct job *const *jobs, int n, struct reply *r);
/* The status a failed job answers with, its message into msg: 503 with
 * its own words when the server cut it off as it stopped, else 500 naming
 * the engine's error. */
int job_failure(const struct job *j, char *msg, size_t cap);
/* Submits n jobs and waits for them all: 0 when they ran, else -1 with r
 * set.  A client that leaves cancels what has not finished, and a job that
 * fails the ones not yet waited for. */
int jobs_run(const struct served_model *m, struct job **jobs, int n, const struct client *c, struct reply *r);

/* ---- tokens and their log-probabilities ---- */

/* A token as people read it: its text, or <0xNN> for a byte that is not
 * text on its own (a piece of a multi-byte character, or NUL). */
cJSON *token_label(const struct tokenizer *tk, int32_t id);
/* {"token", "id", "logprob"}, NULL when out of memory. */
cJSON *logprob_entry(const struct tokenizer *tk, int32_t id, float logprob);
/* A token's k alternatives top[0..k), most probable first, as
 * "top_logprobs" of o (nothing when k is 0). */
int top_logprobs_put(cJSON *o, const struct tokenizer *tk, const struct token_logprob *top, int k);
/* Tokens ids[i] with their log-probabilities lps[i] and k alternatives
 * each, top[i*k ...] (k may be 0). */
struct logprobs_of {
    const struct tokenizer *tk;
    const int32_t *ids;
    const float *lps;
    const struct token_logprob *top;
    int k;
};
/* Token i's entry (a lazy_item, lazy_json.h), NULL when out of memory. */
cJSON *logprobs_item(const void *ctx, size_t i);

/* An answer (lazy_json.h) made from n finished jobs of model m, which it
 * holds (taking them) until it is sent; NULL when out of memory, the jobs
 * and m released. */
struct lazy_json *answer_holding(struct served_model *m, struct job *const *jobs, int n);

#endif
