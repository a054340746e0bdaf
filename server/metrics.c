/* metrics.c - Prometheus counters and histograms for the server (see
 * metrics.h).  One mutex guards the HTTP series and one each model's: an
 * update is a handful of additions, far cheaper than the request or the
 * engine call around it, and a lock per set makes every rendered snapshot
 * of it consistent (a histogram's buckets always add up to its count).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batcher.h"
#include "metrics.h"
#include "registry.h"

#define STATUS_MIN 100
#define STATUS_MAX 599

static const char *const paths[EP_COUNT] = {
    [EP_CLASSIFY] = "/classify", [EP_GENERATE] = "/generate", [EP_ATTENTION] = "/attention",
    [EP_SCORE] = "/score",       [EP_MODELS] = "/models",     [EP_HEALTHZ] = "/healthz",
    [EP_READYZ] = "/readyz",     [EP_METRICS] = "/metrics",   [EP_INDEX] = "/",
    [EP_COMPLETIONS] = "/v1/completions", [EP_OPENAI_MODELS] = "/v1/models", [EP_OTHER] = "other",
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
    int connections_max, connections_open;
    unsigned long long closed[CLOSED_COUNT];
};

static const char *const close_reasons[CLOSED_COUNT] = {[CLOSED_TIMEOUT] = "timeout", [CLOSED_AT_LIMIT] = "limit"};

struct metrics {
    pthread_mutex_t mu;
    struct counters c;
    const char *version;
};

struct model_counters {
    struct histogram batch;
    struct histogram times[TIME_COUNT];
    unsigned long long counts[COUNT_COUNT];
    size_t cache_bytes;
    size_t scratch_bytes;
    int streams;
};

/* The families of enum model_time and enum model_count, in their order.
 * Those of generation are left out for classifiers, where they would only
 * ever be zero (a server of many models would send thousands of lines of
 * zeros a scrape). */
static const struct family {
    const char *name, *help;
    int lm_only;
} time_families[TIME_COUNT] = {
    [TIME_ENGINE] = {"rrnserve_engine_seconds", "Engine time of each classify/score/attention batch.", 0},
    [TIME_QUEUE_WAIT] = {"rrnserve_queue_wait_seconds",
                         "Time from a job's submission to the engine call that took it.", 0},
    [TIME_FIRST_TOKEN] = {"rrnserve_time_to_first_token_seconds",
                          "Time from a generation's submission to its first token.", 1},
    [TIME_TOKEN_INTERVAL] = {"rrnserve_time_per_output_token_seconds",
                             "Mean time between the tokens after the first, per ended generation of 2 or more "
                             "tokens.",
                             1},
}, count_families[COUNT_COUNT] = {
    [COUNT_TOKENS] = {"rrnserve_tokens_generated_total", "Tokens sampled by /generate.", 1},
    [COUNT_PROMPT_TOKENS] = {"rrnserve_prompt_tokens_total",
                             "Prompt tokens of the generations started, cached ones included.", 1},
    [COUNT_CACHED_TOKENS] = {"rrnserve_prompt_cache_tokens_total",
                             "Prompt tokens whose state came from the prompt cache.", 1},
};

struct model_metrics {
    pthread_mutex_t mu;
    struct model_counters c;
};

const char *endpoint_path(enum endpoint e)
{
    return (unsigned)e < EP_COUNT ? paths[e] : paths[EP_OTHER];
}

struct metrics *metrics_new(const char *version)
{
    struct metrics *m = calloc(1, sizeof *m);
    if (m && pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m);
        return NULL;
    }
    if (m)
        m->version = version;
    return m;
}

void metrics_free(struct metrics *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

struct model_metrics *model_metrics_new(void)
{
    struct model_metrics *mm = calloc(1, sizeof *mm);
    if (mm && pthread_mutex_init(&mm->mu, NULL) != 0) {
        free(mm);
        return NULL;
    }
    return mm;
}

void model_metrics_free(struct model_metrics *mm)
{
    if (!mm)
        return;
    pthread_mutex_destroy(&mm->mu);
    free(mm);
}

double metrics_elapsed(const struct timespec *from, const struct timespec *to)
{
    return (double)(to->tv_sec - from->tv_sec) + (double)(to->tv_nsec - from->tv_nsec) * 1e-9;
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

void metrics_connections_max(struct metrics *m, int max)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->c.connections_max = max;
    pthread_mutex_unlock(&m->mu);
}

void metrics_connections_open(struct metrics *m, int open)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->c.connections_open = open;
    pthread_mutex_unlock(&m->mu);
}

void metrics_connection_closed(struct metrics *m, enum connection_close why)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->c.closed[why]++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_batch(struct model_metrics *mm, int batch_size)
{
    if (batch_size <= 0)
        return;
    pthread_mutex_lock(&mm->mu);
    observe(&mm->c.batch, batch_bounds, N_BATCH, batch_size);
    pthread_mutex_unlock(&mm->mu);
}

void metrics_time(struct model_metrics *mm, enum model_time t, double seconds)
{
    if ((unsigned)t >= TIME_COUNT || seconds < 0)
        return;
    pthread_mutex_lock(&mm->mu);
    observe(&mm->c.times[t], engine_bounds, N_ENGINE, seconds);
    pthread_mutex_unlock(&mm->mu);
}

void metrics_count(struct model_metrics *mm, enum model_count c, int n)
{
    if ((unsigned)c >= COUNT_COUNT || n <= 0)
        return;
    pthread_mutex_lock(&mm->mu);
    mm->c.counts[c] += (unsigned long long)n;
    pthread_mutex_unlock(&mm->mu);
}

void metrics_streams(struct model_metrics *mm, int n)
{
    pthread_mutex_lock(&mm->mu);
    mm->c.streams = n;
    pthread_mutex_unlock(&mm->mu);
}

void metrics_prompt_cache_bytes(struct model_metrics *mm, size_t bytes)
{
    pthread_mutex_lock(&mm->mu);
    mm->c.cache_bytes = bytes;
    pthread_mutex_unlock(&mm->mu);
}

void metrics_scratch_bytes(struct model_metrics *mm, size_t bytes)
{
    pthread_mutex_lock(&mm->mu);
    mm->c.scratch_bytes = bytes;
    pthread_mutex_unlock(&mm->mu);
}

/* `model="NAME"`, the name in Prometheus' escaping (backslash, quote,
 * newline); malloc'd. */
static char *model_label(const char *name)
{
    char *label = malloc(2 * strlen(name) + sizeof "model=\"\""), *p = label;
    if (!label)
        return NULL;
    p += sprintf(p, "model=\"");
    for (const char *c = name; *c; c++) {
        if (*c == '\\' || *c == '"' || *c == '\n')
            *p++ = '\\';
        *p++ = *c == '\n' ? 'n' : *c;
    }
    strcpy(p, "\"");
    return label;
}

/* The series of one histogram; label is `name="value"`. */
static void put_histogram(FILE *f, const char *name, const char *label, const struct histogram *h,
                          const double *bounds, size_t n)
{
    unsigned long long cum = 0;
    for (size_t b = 0; b <= n; b++) {
        cum += h->buckets[b];
        if (b < n)
            fprintf(f, "%s_bucket{%s,le=\"%g\"} %llu\n", name, label, bounds[b], cum);
        else
            fprintf(f, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, label, cum);
    }
    fprintf(f, "%s_sum{%s} %.17g\n", name, label, h->sum);
    fprintf(f, "%s_count{%s} %llu\n", name, label, h->count);
}

/* What the models' series show: one model's, read at once. */
struct model_snapshot {
    char *label;
    struct model_counters c;
    int depth;
    int failing;
    int lm;
    const char *task;
    char sha256[65];
};

/* The models' series, each family's series together as the format wants. */
static void put_models(FILE *f, const struct model_snapshot *ms, int n)
{
    fputs("# HELP rrnserve_batch_size Sequences per engine call.\n"
          "# TYPE rrnserve_batch_size histogram\n", f);
    for (int i = 0; i < n; i++)
        put_histogram(f, "rrnserve_batch_size", ms[i].label, &ms[i].c.batch, batch_bounds, N_BATCH);
    for (int t = 0; t < TIME_COUNT; t++) {
        fprintf(f, "# HELP %s %s\n# TYPE %s histogram\n", time_families[t].name, time_families[t].help,
                time_families[t].name);
        for (int i = 0; i < n; i++)
            if (ms[i].lm || !time_families[t].lm_only)
                put_histogram(f, time_families[t].name, ms[i].label, &ms[i].c.times[t], engine_bounds, N_ENGINE);
    }
    for (int c = 0; c < COUNT_COUNT; c++) {
        fprintf(f, "# HELP %s %s\n# TYPE %s counter\n", count_families[c].name, count_families[c].help,
                count_families[c].name);
        for (int i = 0; i < n; i++)
            if (ms[i].lm || !count_families[c].lm_only)
                fprintf(f, "%s{%s} %llu\n", count_families[c].name, ms[i].label, ms[i].c.counts[c]);
    }
    fputs("# HELP rrnserve_streams_running Generations running now.\n"
          "# TYPE rrnserve_streams_running gauge\n", f);
    for (int i = 0; i < n; i++)
        if (ms[i].lm)
            fprintf(f, "rrnserve_streams_running{%s} %d\n", ms[i].label, ms[i].c.streams);
    fputs("# HELP rrnserve_prompt_cache_bytes Bytes of states the prompt cache holds.\n"
          "# TYPE rrnserve_prompt_cache_bytes gauge\n", f);
    for (int i = 0; i < n; i++)
        if (ms[i].lm)
            fprintf(f, "rrnserve_prompt_cache_bytes{%s} %zu\n", ms[i].label, ms[i].c.cache_bytes);
    fputs("# HELP rrnserve_engine_scratch_bytes Bytes of scratch memory a model's engine holds (the largest "
          "call's so far).\n"
          "# TYPE rrnserve_engine_scratch_bytes gauge\n", f);
    for (int i = 0; i < n; i++)
        fprintf(f, "rrnserve_engine_scratch_bytes{%s} %zu\n", ms[i].label, ms[i].c.scratch_bytes);
    fputs("# HELP rrnserve_queue_depth Jobs waiting in a model's queue.\n"
          "# TYPE rrnserve_queue_depth gauge\n", f);
    for (int i = 0; i < n; i++)
        fprintf(f, "rrnserve_queue_depth{%s} %d\n", ms[i].label, ms[i].depth);
    fputs("# HELP rrnserve_model_failing 1 while a model's engine calls keep failing (as /readyz reports).\n"
          "# TYPE rrnserve_model_failing gauge\n", f);
    for (int i = 0; i < n; i++)
        fprintf(f, "rrnserve_model_failing{%s} %d\n", ms[i].label, ms[i].failing);
    fputs("# HELP rrnserve_model_info The weights each model serves: their task and the SHA-256 of their file's "
          "data.\n"
          "# TYPE rrnserve_model_info gauge\n", f);
    for (int i = 0; i < n; i++)
        fprintf(f, "rrnserve_model_info{%s,task=\"%s\",sha256=\"%s\"} 1\n", ms[i].label, ms[i].task, ms[i].sha256);
}

/* Snapshots of the registry's models (none when r is NULL); -1 when out
 * of memory. */
static int snapshot_models(struct registry *r, struct model_snapshot **out, int *n_out)
{
    struct served_model **list = NULL;
    int n = 0;
    *out = NULL;
    *n_out = 0;
    if (!r)
        return 0;
    if (registry_list(r, &list, &n) != 0)
        return -1;
    struct model_snapshot *ms = calloc((size_t)(n ? n : 1), sizeof *ms);
    int rc = ms ? 0 : -1;
    for (int i = 0; i < n; i++) {
        if (rc == 0 && !(ms[i].label = model_label(list[i]->name)))
            rc = -1;
        if (rc == 0) {
            struct model_metrics *mm = batcher_metrics(list[i]->batcher);
            pthread_mutex_lock(&mm->mu);
            ms[i].c = mm->c;
            pthread_mutex_unlock(&mm->mu);
            ms[i].depth = batcher_queue_depth(list[i]->batcher);
            ms[i].failing = batcher_failing(list[i]->batcher, NULL, 0);
            ms[i].task = task_name(list[i]->model.cfg.task);
            ms[i].lm = list[i]->model.cfg.task == TASK_LM;
            memcpy(ms[i].sha256, list[i]->model.sha256, sizeof ms[i].sha256);
        }
        served_model_release(list[i]);
    }
    free(list);
    *out = ms;
    *n_out = n;
    return rc;
}

static void free_snapshots(struct model_snapshot *ms, int n)
{
    for (int i = 0; ms && i < n; i++)
        free(ms[i].label);
    free(ms);
}

char *metrics_render(struct metrics *m, struct registry *r)
{
    /* Render from snapshots, so no lock is held while formatting. */
    struct counters *snap = malloc(sizeof *snap);
    struct model_snapshot *models = NULL;
    int n_models = 0;
    if (!snap || snapshot_models(r, &models, &n_models) != 0) {
        free(snap);
        free_snapshots(models, n_models);
        return NULL;
    }
    pthread_mutex_lock(&m->mu);
    *snap = m->c;
    pthread_mutex_unlock(&m->mu);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(snap);
        free_snapshots(models, n_models);
        return NULL;
    }
    fprintf(f, "# HELP rrnserve_build_info The server's version and the device its models run on.\n"
               "# TYPE rrnserve_build_info gauge\n"
               "rrnserve_build_info{version=\"%s\",device=\"%s\"} 1\n",
            m->version, r ? registry_device(r) : "none");
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
    fprintf(f, "# HELP rrnserve_connections_max Connections served at once: --max-connections, or what the open-file "
               "limit left of it.\n"
               "# TYPE rrnserve_connections_max gauge\n"
               "rrnserve_connections_max %d\n"
               "# HELP rrnserve_connections_open Connections open now.\n"
               "# TYPE rrnserve_connections_open gauge\n"
               "rrnserve_connections_open %d\n",
            snap->connections_max, snap->connections_open);
    fputs("# HELP rrnserve_connections_closed_total Connections the server closed: a request that did not arrive "
          "within --timeout-s (timeout), or idle at --max-connections for a client that came (limit).\n"
          "# TYPE rrnserve_connections_closed_total counter\n", f);
    for (int c = 0; c < CLOSED_COUNT; c++)
        fprintf(f, "rrnserve_connections_closed_total{reason=\"%s\"} %llu\n", close_reasons[c], snap->closed[c]);
    put_models(f, models, n_models);
    int failed = ferror(f);
    /* fclose publishes text and len; a stream that failed is discarded. */
    if (fclose(f) != 0 || failed) {
        free(text);
        text = NULL;
    }
    free(snap);
    free_snapshots(models, n_models);
    return text;
}
