/* metrics.h - the server's Prometheus metrics: requests by endpoint and
 * status and request latency per endpoint (struct metrics, the HTTP
 * threads'), and per model its engine batch sizes, engine time of
 * whole-sequence batches, time in the queue, a generation's time to its
 * first token and between tokens, tokens generated and prompt tokens read
 * (struct model_metrics, its batcher's), queue depth and weights (read at
 * render time); the connections open and those the server closed; and the
 * server's version and device.
 *
 * Every function is thread-safe: HTTP threads record requests, batcher
 * threads record batches and tokens, and /metrics renders concurrently.
 */
#ifndef RRN_METRICS_H
#define RRN_METRICS_H

#include <stddef.h>
#include <time.h>

/* The endpoints, in routing order.  EP_OTHER counts every path that is not
 * an endpoint, so a scanner cannot grow the label set without bound. */
enum endpoint {
    EP_CLASSIFY,
    EP_GENERATE,
    EP_ATTENTION,
    EP_SCORE,
    EP_MODELS,
    EP_HEALTHZ,
    EP_READYZ,
    EP_METRICS,
    EP_INDEX,
    EP_COMPLETIONS,
    EP_OPENAI_MODELS,
    EP_OTHER,
    EP_COUNT
};

/* The URL path of an endpoint ("other" for EP_OTHER): the router's key and
 * the metrics' label. */
const char *endpoint_path(enum endpoint e);

struct metrics;
struct model_metrics;
struct registry;

/* version: the server's, for rrnserve_build_info. */
struct metrics *metrics_new(const char *version);
void metrics_free(struct metrics *m);

/* The seconds from one reading of CLOCK_MONOTONIC to a later one: how the
 * latencies below are measured. */
double metrics_elapsed(const struct timespec *from, const struct timespec *to);

/* One finished request: its HTTP status (100..599) and latency. */
void metrics_request(struct metrics *m, enum endpoint e, int status, double seconds);

/* The connections (connections.h): how many may hold a place (the
 * --max-connections in force), how many are open, and each the server
 * closed itself, by why.  m may be NULL. */
enum connection_close {
    CLOSED_TIMEOUT,  /* its request did not arrive within --timeout-s */
    CLOSED_AT_LIMIT, /* idle at --max-connections, for a client that came */
    CLOSED_COUNT
};
void metrics_connections_max(struct metrics *m, int max);
void metrics_connections_open(struct metrics *m, int open);
void metrics_connection_closed(struct metrics *m, enum connection_close why);

/* A model's series, rendered with its name as the label `model`.  A model
 * reloaded with a new file starts them from zero again, which Prometheus
 * reads as a counter reset; one removed takes its series with it. */
struct model_metrics *model_metrics_new(void);
void model_metrics_free(struct model_metrics *mm);
/* One engine call over batch_size sequences. */
void metrics_batch(struct model_metrics *mm, int batch_size);

/* A model's time histograms (buckets from 0.1 ms to 10 s). */
enum model_time {
    TIME_ENGINE,         /* one classify/score/attention batch's engine call (not
                          * a generation's prefills and steps) */
    TIME_QUEUE_WAIT,     /* a job's, from its submission to the engine call that
                          * took it (a generation: its prefill, so the wait for a
                          * free slot counts) */
    TIME_FIRST_TOKEN,    /* a generation's, from its submission to its first token */
    TIME_TOKEN_INTERVAL, /* a generation of 2 or more tokens that ended: the mean
                          * time between its tokens after the first */
    TIME_COUNT
};
void metrics_time(struct model_metrics *mm, enum model_time t, double seconds);

/* A model's counters. */
enum model_count {
    COUNT_TOKENS,        /* tokens sampled */
    COUNT_PROMPT_TOKENS, /* prompt tokens of the generations started, cached ones too */
    COUNT_CACHED_TOKENS, /* prompt tokens whose state came from the prompt cache */
    COUNT_COUNT
};
void metrics_count(struct model_metrics *mm, enum model_count c, int n);

/* The generations running now. */
void metrics_streams(struct model_metrics *mm, int n);
/* The bytes the prompt cache holds now. */
void metrics_prompt_cache_bytes(struct model_metrics *mm, size_t bytes);
/* The bytes of scratch memory the model's engine holds now. */
void metrics_scratch_bytes(struct model_metrics *mm, size_t bytes);

/* The metrics in Prometheus' text exposition format, the models' series
 * (and rrnserve_model_info, the weights each serves) read from the
 * registry's models (r may be NULL).  A malloc'd string, or NULL when out
 * of memory. */
char *metrics_render(struct metrics *m, struct registry *r);

#endif
