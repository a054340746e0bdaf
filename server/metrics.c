/* metrics.c - Prometheus counters and histograms for the server (see
 * metrics.h).  One mutex guards everything: each update is a handful of
 * additions, far cheaper than the request around it, and a single lock
 * makes every rendered snapshot consistent (a histogram's buckets always
 * add up to its count).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "metrics.h"
#include "registry.h"

#define STATUS_MIN 100
#define STATUS_MAX 599

static const char *const paths[EP_COUNT] = {
    [EP_CLASSIFY] = "/classify", [EP_GENERATE] = "/generate", [EP_ATTENTION] = "/attention",
    [EP_SCORE] = "/score",       [EP_MODELS] = "/models",     [EP_HEALTHZ] = "/healthz",
    [EP_READYZ] = "/readyz",     [EP_METRICS] = "/metrics",   [EP_INDEX] = "/",
    [EP_OTHER] = "other",
};

/* Upper bounds of the histogram buckets; +Inf is implied. */
static const double latency_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25,  0.5,    1,     2.5,  5,     10,   30, 60};
static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
static const double engine_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05,   0.1,     0.25,   0.5,   1,      2.5,   10};
#define N_LATENCY (sizeof latency_bounds / sizeof latency_bounds[0])
#define N_BATCH (sizeof batch_bounds / sizeof batch_bounds[0])
#define N_ENGINE (sizeof engine_bounds / sizeof engine_bounds[0])
#define MAX2(a, b) ((a) > (b) ? (a) : (b))

struct histogram {
    unsigned long long buckets[MAX2(MAX2(N_LATENCY, N_BATCH), N_ENGINE) + 1]; /* not cumulative */
    unsigned long long count;
    double sum;
};

struct counters {
    unsigned long long requests[EP_COUNT][STATUS_MAX - STATUS_MIN + 1];
    struct histogram latency[EP_COUNT];
    struct histogram batch;
    struct histogram engine;
    unsigned long long tokens;
};

struct metrics {
    pthread_mutex_t mu;
    struct counters c;
};

const char *endpoint_path(enum endpoint e)
{
    return (unsigned)e < EP_COUNT ? paths[e] : paths[EP_OTHER];
}

struct metrics *metrics_new(void)
{
    struct metrics *m = calloc(1, sizeof *m);
    if (m && pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m);
        return NULL;
    }
    return m;
}

void metrics_free(struct metrics *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static void observe(struct histogram *h, const double *bounds, size_t n, double v)
{
    size_t b = 0;
    while (b < n && v > bounds[b])
        b++;
    h->buckets[b]++;
    h->count++;
    h->sum += v;
}

void metrics_request(struct metrics *m, enum endpoint e, int status, double seconds)
{
    if (!m)
        return;
    if ((unsigned)e >= EP_COUNT)
        e = EP_OTHER;
    if (status < STATUS_MIN || status > STATUS_MAX)
        status = 500;
    pthread_mutex_lock(&m->mu);
    m->c.requests[e][status - STATUS_MIN]++;
    observe(&m->c.latency[e], latency_bounds, N_LATENCY, seconds);
    pthread_mutex_unlock(&m->mu);
}

void metrics_batch(struct metrics *m, int batch_size)
{
    if (!m || batch_size <= 0)
        return;
    pthread_mutex_lock(&m->mu);
    observe(&m->c.batch, batch_bounds, N_BATCH, batch_size);
    pthread_mutex_unlock(&m->mu);
}

void metrics_engine(struct metrics *m, double seconds)
{
    if (!m || seconds < 0)
        return;
    pthread_mutex_lock(&m->mu);
    observe(&m->c.engine, engine_bounds, N_ENGINE, seconds);
    pthread_mutex_unlock(&m->mu);
}

void metrics_tokens(struct metrics *m, int n)
{
    if (!m || n <= 0)
        return;
    pthread_mutex_lock(&m->mu);
    m->c.tokens += (unsigned long long)n;
    pthread_mutex_unlock(&m->mu);
}

/* A label value in Prometheus' escaping: backslash, quote and newline. */
static void put_label(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fputc('\\', f);
        if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

/* The series of one histogram; label is "" or `name="value"`. */
static void put_histogram(FILE *f, const char *name, const char *label, const struct histogram *h,
                          const double *bounds, size_t n)
{
    const char *sep = *label ? "," : "";
    unsigned long long cum = 0;
    for (size_t b = 0; b <= n; b++) {
        cum += h->buckets[b];
        if (b < n)
            fprintf(f, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, label, sep, bounds[b], cum);
        else
            fprintf(f, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, label, sep, cum);
    }
    const char *open = *label ? "{" : "", *close = *label ? "}" : "";
    fprintf(f, "%s_sum%s%s%s %.17g\n", name, open, label, close, h->sum);
    fprintf(f, "%s_count%s%s%s %llu\n", name, open, label, close, h->count);
}

static void put_queue_depths(FILE *f, struct registry *r)
{
    struct served_model **list = NULL;
    int n = 0;
    fputs("# HELP rrnserve_queue_depth Jobs waiting in a model's queue.\n"
          "# TYPE rrnserve_queue_depth gauge\n", f);
    if (!r || registry_list(r, &list, &n) != 0)
        return;
    for (int i = 0; i < n; i++) {
        fputs("rrnserve_queue_depth{model=\"", f);
        put_label(f, list[i]->name);
        fprintf(f, "\"} %d\n", batcher_queue_depth(list[i]->batcher));
        served_model_release(list[i]);
    }
    free(list);
}

char *metrics_render(struct metrics *m, struct registry *r)
{
    /* Render from a snapshot, so the lock is not held while formatting. */
    struct counters *snap = malloc(sizeof *snap);
    if (!snap)
        return NULL;
    pthread_mutex_lock(&m->mu);
    *snap = m->c;
    pthread_mutex_unlock(&m->mu);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(snap);
        return NULL;
    }
    fputs("# HELP rrnserve_requests_total HTTP requests by endpoint and status.\n"
          "# TYPE rrnserve_requests_total counter\n", f);
    for (int e = 0; e < EP_COUNT; e++)
        for (int s = STATUS_MIN; s <= STATUS_MAX; s++)
            if (snap->requests[e][s - STATUS_MIN])
                fprintf(f, "rrnserve_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n", paths[e], s,
                        snap->requests[e][s - STATUS_MIN]);
    fputs("# HELP rrnserve_request_duration_seconds HTTP request latency by endpoint.\n"
          "# TYPE rrnserve_request_duration_seconds histogram\n", f);
    for (int e = 0; e < EP_COUNT; e++) {
        char label[64];
        snprintf(label, sizeof label, "endpoint=\"%s\"", paths[e]);
        if (snap->latency[e].count)
            put_histogram(f, "rrnserve_request_duration_seconds", label, &snap->latency[e], latency_bounds,
                          N_LATENCY);
    }
    fputs("# HELP rrnserve_batch_size Sequences per engine call.\n"
          "# TYPE rrnserve_batch_size histogram\n", f);
    put_histogram(f, "rrnserve_batch_size", "", &snap->batch, batch_bounds, N_BATCH);
    fputs("# HELP rrnserve_engine_seconds Engine time of each classify/score/attention batch.\n"
          "# TYPE rrnserve_engine_seconds histogram\n", f);
    put_histogram(f, "rrnserve_engine_seconds", "", &snap->engine, engine_bounds, N_ENGINE);
    fprintf(f, "# HELP rrnserve_tokens_generated_total Tokens sampled by /generate.\n"
               "# TYPE rrnserve_tokens_generated_total counter\n"
               "rrnserve_tokens_generated_total %llu\n", snap->tokens);
    put_queue_depths(f, r);
    int failed = ferror(f);
    /* fclose publishes text and len; a stream that failed is discarded. */
    if (fclose(f) != 0 || failed) {
        free(text);
        text = NULL;
    }
    free(snap);
    return text;
}
