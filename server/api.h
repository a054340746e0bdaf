/* api.h - the endpoint handlers: each parses and validates its request
 * JSON, tokenizes, hands a job to the model's batcher, waits for it and
 * builds the response.  api.md documents every field and error.
 */
#ifndef RRN_API_H
#define RRN_API_H

#include <stdatomic.h>
#include <stddef.h>
#include <sys/types.h>

#include "http.h"

struct registry;
struct metrics;

struct api_limits {
    size_t max_text_bytes; /* per text or prompt */
    int max_tokens;        /* the largest max_tokens a request may ask for */
};

struct api {
    struct registry *reg;
    struct metrics *metrics;
    struct api_limits lim;
    atomic_int stopping;   /* set on SIGTERM: /readyz answers 503 */
};

/* A handler: body is the request body (len bytes, not NUL-terminated;
 * empty for GET).  It always fills r. */
typedef void api_handler(struct api *a, const char *body, size_t len, const struct client *c,
                         struct reply *r);

api_handler api_classify, api_generate, api_attention, api_score, api_models, api_healthz, api_readyz,
    api_metrics, api_completions, api_openai_models;

struct job;
/* The outcome of a finished generation as POST /generate answers it (text,
 * tokens, prompt_tokens, cached_tokens, finish_reason, seed): the response
 * and the last event of a stream alike, and `rrnserve run --generate`'s
 * output; NULL when out of memory. */
cJSON *generation_result(const struct job *j);

/* A generation streamed as Server-Sent Events (POST /generate or
 * /v1/completions with "stream": true): the HTTP layer pulls its bytes with api_stream_read. */

/* Up to max bytes of the stream into buf, blocking until there are some:
 * the number of bytes, 0 at the end, or -1 when the client went away. */
ssize_t api_stream_read(struct api_stream *s, char *buf, size_t max);
/* The largest engine batch that ran the stream, or -1 before any ran. */
int api_stream_batch_size(const struct api_stream *s);
/* Cancels the generation if it is still running and frees the stream. */
void api_stream_free(struct api_stream *s);

#endif
