/* serve.c - `rrnserve serve`: options, startup, signals and shutdown of the
 * HTTP server.
 *
 * Signals are blocked in every thread (the mask is set before any thread
 * starts, and threads inherit it) and taken synchronously by the main
 * thread with sigwait, so their handling may lock, log and reload freely:
 *   SIGHUP           re-read the models folder (registry_reload) and the
 *                    API key file (auth_reload);
 *   SIGTERM, SIGINT  stop accepting, answer every request already accepted
 *                    (for --drain-s seconds, or until a second SIGTERM or
 *                    SIGINT; then the batchers end what they still hold,
 *                    each with an error its client reads, and CUT_OFF_S more
 *                    seconds let those answers out), exit 0.
 */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../cli/commands.h"
#include "api.h"
#include "auth.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "registry.h"

/* How long the answers of the requests cut off at the end of --drain-s
 * have to go out before their connections are closed.  Part of the time a
 * supervisor must allow for a stop (tests/check_k8s.py counts it). */
#define CUT_OFF_S 2

struct serve_options {
    const char *models, *host, *api_keys;
    enum log_format log_format;
    enum device_kind device;
    enum precision precision;
    enum recurrence recurrence;
    long port, max_batch, max_wait_us, max_queue, threads, max_body, max_text_bytes, max_tokens_limit,
        max_connections, timeout_s, prompt_cache_mb, drain_s;
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: rrnserve serve [--models DIR] [--host ADDR] [--port N] [--device auto|cpu|cuda]\n"
            "                      [--precision fp32|tf32|bf16] [--recurrence gemm|fused]\n"
            "                      [--max-batch N] [--max-wait-us N] [--max-queue N] [--api-keys FILE]\n"
            "                      [--threads N] [--max-body BYTES] [--max-text-bytes N]\n"
            "                      [--max-tokens-limit N] [--max-connections N] [--timeout-s N]\n"
            "                      [--prompt-cache-mb N] [--drain-s N] [--log-format text|json]\n"
            "\n"
            "Serves every *.safetensors file of DIR (default: models) over HTTP; see api.md.\n"
            "  --models DIR           the models folder; each file is a model named by its file name\n"
            "  --host ADDR            address to listen on (default 127.0.0.1)\n"
            "  --port N               port to listen on, 0 for any free one (default 8080)\n"
            "  --device D             auto (CUDA when a GPU is present), cpu or cuda (default auto)\n"
            "  --precision P          fp32, or tf32 or bf16 for tensor-core matrix products on cuda (default fp32)\n"
            "  --recurrence R         gemm, or fused: each step's recurrent product inside its cell kernel,\n"
            "                         on cuda in fp32 (default gemm)\n"
            "  --max-batch N          sequences per engine call (default 32)\n"
            "  --max-wait-us N        how long a batch may wait to fill, microseconds (default 2000)\n"
            "  --max-queue N          jobs waiting per model before answering 503 (default 256)\n"
            "  --api-keys FILE        require Authorization: Bearer KEY; FILE lists SHA-256 hashes of keys\n"
            "  --threads N            CPU threads for matrix products (default: the CPUs, at most 16)\n"
            "  --max-body BYTES       largest request body (default 1048576)\n"
            "  --max-text-bytes N     largest text or prompt (default 100000)\n"
            "  --max-tokens-limit N   largest max_tokens a request may ask for (default 1024)\n"
            "  --max-connections N    connections served at once (default 512); at the limit a new\n"
            "                         client takes the place of one idle 100 ms or more, or gets a 503;\n"
            "                         lowered, with a log line, to what the open-file limit allows\n"
            "  --timeout-s N          a connection idle this long, or a request still arriving after\n"
            "                         this long, is closed (seconds, default 30)\n"
            "  --prompt-cache-mb N    per language model, the states after prompts and generations kept\n"
            "                         so that a prompt beginning with one skips its tokens; 0 for none\n"
            "                         (default 64)\n"
            "  --drain-s N            on SIGTERM, how long the requests in flight may take to finish\n"
            "                         before each is ended with a 503 (seconds, default 300; a second\n"
            "                         SIGTERM or SIGINT ends the wait at once)\n"
            "  --log-format F         text, or json: each log line a JSON object (default text)\n");
}

/* An integer option within [lo, hi]; 0 or -1 after a message. */
static int parse_long(const char *name, const char *value, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(value, &end, 10);
    if (end == value || *end || v < lo || v > hi) {
        fprintf(stderr, "rrnserve serve: --%s must be an integer from %ld to %ld, not '%s'\n", name, lo, hi, value);
        return -1;
    }
    *out = v;
    return 0;
}

/* 0, or 2 (the exit status for bad usage), or 1 for --help (exit 0). */
static int parse_options(int argc, char **argv, struct serve_options *o)
{
    /* The integer options: getopt's value for each is its index here. */
    struct {
        const char *name;
        long lo, hi;
        long *dest;
    } ints[] = {
        {"port", 0, 65535, &o->port},
        {"max-batch", 1, 4096, &o->max_batch},
        {"max-wait-us", 0, 10000000, &o->max_wait_us},
        {"max-queue", 1, 1000000, &o->max_queue},
        {"threads", 1, 1024, &o->threads},
        {"max-body", 1, 1L << 30, &o->max_body},
        {"max-text-bytes", 1, 1L << 26, &o->max_text_bytes},
        {"max-tokens-limit", 1, 1000000, &o->max_tokens_limit},
        {"max-connections", 1, 100000, &o->max_connections},
        {"timeout-s", 1, 86400, &o->timeout_s},
        {"prompt-cache-mb", 0, 1L << 20, &o->prompt_cache_mb},
        {"drain-s", 0, 86400, &o->drain_s},
    };
    enum { N_INTS = sizeof ints / sizeof ints[0], OPT_MODELS = 256, OPT_HOST, OPT_DEVICE, OPT_PRECISION, OPT_RECURRENCE,
           OPT_KEYS, OPT_LOG_FORMAT, OPT_HELP };
    struct option opts[N_INTS + 9];
    for (int i = 0; i < N_INTS; i++)
        opts[i] = (struct option){ints[i].name, required_argument, NULL, i};
    opts[N_INTS] = (struct option){"models", required_argument, NULL, OPT_MODELS};
    opts[N_INTS + 1] = (struct option){"host", required_argument, NULL, OPT_HOST};
    opts[N_INTS + 2] = (struct option){"device", required_argument, NULL, OPT_DEVICE};
    opts[N_INTS + 3] = (struct option){"precision", required_argument, NULL, OPT_PRECISION};
    opts[N_INTS + 4] = (struct option){"recurrence", required_argument, NULL, OPT_RECURRENCE};
    opts[N_INTS + 5] = (struct option){"api-keys", required_argument, NULL, OPT_KEYS};
    opts[N_INTS + 6] = (struct option){"log-format", required_argument, NULL, OPT_LOG_FORMAT};
    opts[N_INTS + 7] = (struct option){"help", no_argument, NULL, OPT_HELP};
    opts[N_INTS + 8] = (struct option){NULL, 0, NULL, 0};

    *o = (struct serve_options){.models = "models", .host = "127.0.0.1", .device = DEVICE_AUTO, .port = 8080,
                                .max_batch = 32, .max_wait_us = 2000, .max_queue = 256, .threads = 0,
                                .max_body = 1L << 20, .max_text_bytes = 100000, .max_tokens_limit = 1024,
                                .max_connections = 512, .timeout_s = 30, .prompt_cache_mb = 64, .drain_s = 300};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c >= 0 && c < N_INTS) {
            if (parse_long(ints[c].name, optarg, ints[c].lo, ints[c].hi, ints[c].dest) != 0)
                return 2;
        } else if (c == OPT_MODELS) {
            o->models = optarg;
        } else if (c == OPT_HOST) {
            o->host = optarg;
        } else if (c == OPT_DEVICE) {
            if (backend_device_parse(optarg, &o->device) != 0) {
                fprintf(stderr, "rrnserve serve: --device must be auto, cpu or cuda, not '%s'\n", optarg);
                return 2;
            }
        } else if (c == OPT_PRECISION) {
            if (backend_precision_parse(optarg, &o->precision) != 0) {
                fprintf(stderr, "rrnserve serve: --precision must be fp32, tf32 or bf16, not '%s'\n", optarg);
                return 2;
            }
        } else if (c == OPT_RECURRENCE) {
            if (backend_recurrence_parse(optarg, &o->recurrence) != 0) {
                fprintf(stderr, "rrnserve serve: --recurrence must be gemm or fused, not '%s'\n", optarg);
                return 2;
            }
        } else if (c == OPT_KEYS) {
            o->api_keys = optarg;
        } else if (c == OPT_LOG_FORMAT) {
            if (strcmp(optarg, "text") != 0 && strcmp(optarg, "json") != 0) {
                fprintf(stderr, "rrnserve serve: --log-format must be text or json, not '%s'\n", optarg);
                return 2;
            }
            o->log_format = strcmp(optarg, "json") == 0 ? LOG_JSON : LOG_TEXT;
        } else if (c == OPT_HELP) {
            usage(stdout);
            return 1;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "rrnserve serve: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    return 0;
}

/* The registry logs each model it loads; this says what came of it all. */
static void log_ready(struct registry *reg)
{
    struct served_model **list = NULL;
    int n = 0;
    if (registry_list(reg, &list, &n) != 0)
        return;
    for (int i = 0; i < n; i++)
        served_model_release(list[i]);
    free(list);
    if (n == 0)
        log_msg("no model loaded: /readyz answers 503 until a reload (SIGHUP) finds one");
    else
        log_msg("serving %d model(s) on device %s", n, registry_device(reg));
}

/* The API key file read again; a file that fails to read leaves the keys
 * as they were, since refusing every request would be worse. */
static void reload_keys(struct auth *auth, const char *path)
{
    char err[512];
    int n = auth_reload(auth, path, err, sizeof err);
    if (n < 0)
        log_msg("cannot reload the API keys: %s; keeping the %d key hash(es) loaded before", err, auth_count(auth));
    else if (n == 0)
        log_msg("reloaded the API keys: %s holds no key hash, so every key is revoked: each request that needs one "
                "is refused until the file holds one",
                path);
    else
        log_msg("reloaded the API keys: %d key hash(es) from %s", n, path);
}

/* Takes signals until SIGTERM or SIGINT; returns that signal. */
static int wait_for_stop(const sigset_t *set, struct registry *reg, const char *dir, struct auth *auth,
                         const char *keys)
{
    for (;;) {
        int sig;
        if (sigwait(set, &sig) != 0)
            continue;
        if (sig != SIGHUP)
            return sig;
        log_msg("SIGHUP: reloading the models of %s", dir);
        notify_reloading();
        if (auth)
            reload_keys(auth, keys);
        registry_reload(reg);
        notify_send("READY=1");
    }
}

/* Waits up to drain_s seconds for the requests in flight to end, looking
 * each second for a second SIGTERM or SIGINT, which ends the wait at once
 * (an operator who will not wait: Ctrl-C twice); *again is that signal,
 * or 0.  Returns the requests still in flight. */
static int drain(struct http_server *http, const sigset_t *set, long drain_s, int *again)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    *again = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        const long left_s = drain_s - (long)(now.tv_sec - start.tv_sec);
        const int left = http_drain(http, left_s > 0 ? 1 : 0);
        if (!left || left_s <= 0)
            return left;
        const int sig = sigtimedwait(set, NULL, &(struct timespec){0});
        if (sig == SIGTERM || sig == SIGINT) {
            *again = sig;
            return left;
        }
    }
}

/* Threads a library started before main() (OpenBLAS's pool) do not block
 * the signals; one delivered to such a thread is passed on to the main
 * thread, which blocks it, so its sigwait takes it. */
static pthread_t main_thread;
static void pass_to_main(int sig)
{
    pthread_kill(main_thread, sig);
}

int cmd_serve(int argc, char **argv)
{
    struct serve_options o;
    int rc = parse_options(argc, argv, &o);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    log_set_format(o.log_format);

    /* Before any thread exists, so that every thread inherits the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    main_thread = pthread_self();
    struct sigaction pass = {.sa_handler = pass_to_main, .sa_mask = set};
    sigaction(SIGTERM, &pass, NULL);
    sigaction(SIGINT, &pass, NULL);
    sigaction(SIGHUP, &pass, NULL);
    /* A client that hangs up must not kill the server. */
    signal(SIGPIPE, SIG_IGN);
    char threads[16];
    snprintf(threads, sizeof threads, "%ld", o.threads);
    if (o.threads && setenv("RRN_THREADS", threads, 1) != 0) {
        fprintf(stderr, "rrnserve serve: cannot set RRN_THREADS\n");
        return 1;
    }

    char err[512];
    struct auth *auth = NULL;
    if (o.api_keys && !(auth = auth_load(o.api_keys, err, sizeof err))) {
        fprintf(stderr, "rrnserve serve: %s\n", err);
        return 1;
    }
    struct metrics *metrics = metrics_new(RRN_VERSION);
    struct registry *reg = NULL;
    struct http_server *http = NULL;
    struct api api = {.metrics = metrics,
                      .lim = {.max_text_bytes = (size_t)o.max_text_bytes, .max_tokens = (int)o.max_tokens_limit}};
    atomic_init(&api.stopping, 0);
    atomic_int cut_off;
    atomic_init(&cut_off, 0);
    struct registry_options ro = {
        .dir = o.models, .device = o.device, .precision = o.precision, .recurrence = o.recurrence,
        .batch = {.max_batch = (int)o.max_batch, .max_wait_us = (int)o.max_wait_us, .max_queue = (int)o.max_queue,
                  .prompt_cache_bytes = (size_t)o.prompt_cache_mb << 20, .cut_off = &cut_off},
    };
    if (!metrics) {
        fprintf(stderr, "rrnserve serve: out of memory\n");
    } else if (!(reg = registry_open(&ro, err, sizeof err))) {
        fprintf(stderr, "rrnserve serve: %s\n", err);
    } else {
        /* Whoever runs this on a machine with a GPU wants to know why it
         * computes on the CPU. */
        const char *no_cuda = o.device == DEVICE_AUTO ? backend_cuda_unavailable() : NULL;
        if (no_cuda)
            log_msg("device auto chose the cpu: %s", no_cuda);
        log_ready(reg);
        if (auth)
            log_msg("API keys required (%d key hash(es) from %s)", auth_count(auth), o.api_keys);
        api.reg = reg;
        struct http_options ho = {.host = o.host, .port = (int)o.port, .max_body = (size_t)o.max_body,
                                  .max_connections = (int)o.max_connections, .timeout_s = (int)o.timeout_s};
        if (!(http = http_start(&ho, &api, auth, metrics, err, sizeof err)))
            fprintf(stderr, "rrnserve serve: %s\n", err);
    }
    if (!http) {
        registry_close(reg);
        metrics_free(metrics);
        auth_free(auth);
        return 1;
    }
    /* Brackets keep an IPv6 address apart from the port. */
    const char *br = strchr(o.host, ':') ? "[" : "", *ket = *br ? "]" : "";
    log_msg("listening on http://%s%s%s:%d", br, o.host, ket, http_port(http));
    notify_send("READY=1");

    int sig = wait_for_stop(&set, reg, o.models, auth, o.api_keys);
    notify_send("STOPPING=1");
    atomic_store(&api.stopping, 1);
    http_quiesce(http);
    log_msg("%s: no new connections; answering the requests in flight", sig == SIGINT ? "SIGINT" : "SIGTERM");
    int again, left = drain(http, &set, o.drain_s, &again);
    if (left) {
        /* Their clients are told so (a 503, a stream's error event and
         * [DONE]) rather than left with a connection cut mid-answer. */
        if (again)
            log_msg("%s again: ending the %d request(s) still in flight", again == SIGINT ? "SIGINT" : "SIGTERM",
                    left);
        else
            log_msg("%d request(s) still in flight after %ld s (--drain-s); ending them", left, o.drain_s);
        atomic_store(&cut_off, 1);
        if ((left = http_drain(http, CUT_OFF_S)))
            log_msg("%d request(s) still in flight %d s later; closing their connections", left, CUT_OFF_S);
    }
    http_stop(http);
    registry_close(reg);
    metrics_free(metrics);
    auth_free(auth);
    log_msg("stopped");
    return 0;
}
