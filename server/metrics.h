/* metrics.h - the server's Prometheus metrics: requests by endpoint and
 * status, request latency per endpoint, engine batch sizes, engine time of
 * whole-sequence batches, tokens generated, and (read at render time) each
 * model's queue depth.
 *
 * Every function is thread-safe: HTTP threads record requests, batcher
 * threads record batches and tokens, and /metrics renders concurrently.
 */
#ifndef RRN_METRICS_H
#define RRN_METRICS_H

#include <stddef.h>

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
    EP_OTHER,
    EP_COUNT
};

/* The URL path of an endpoint ("other" for EP_OTHER): the router's key and
 * the metrics' label. */
const char *endpoint_path(enum endpoint e);

struct metrics;
struct registry;

struct metrics *metrics_new(void);
void metrics_free(struct metrics *m);

/* One finished request: its HTTP status (100..599) and latency. */
void metrics_request(struct metrics *m, enum endpoint e, int status, double seconds);
/* One engine call over batch_size sequences (called by the batchers). */
void metrics_batch(struct metrics *m, int batch_size);
/* The engine time of one classify/score/attention batch (called by the
 * batchers; generation prefills and steps are not counted). */
void metrics_engine(struct metrics *m, double seconds);
/* n tokens sampled (called by the batchers). */
void metrics_tokens(struct metrics *m, int n);

/* The metrics in Prometheus' text exposition format, queue depths read
 * from the registry's models (r may be NULL).  A malloc'd string, or NULL
 * when out of memory. */
char *metrics_render(struct metrics *m, struct registry *r);

#endif
