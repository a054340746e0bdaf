/* fuzz_request.c - libFuzzer target for the request parsing of every
 * endpoint: the input's first byte picks the handler of server/api.c
 * ((byte - '0') % 10, so that the seeds begin with a digit: classify,
 * score, attention, generate, models, healthz, readyz, metrics,
 * completions, the completions API's models) and the rest is the request
 * body.
 *
 * The handlers run as the server runs them, on a registry opened once over
 * a temporary folder of links to five fixtures of tests/fixtures (so run
 * from the repository root), on the CPU, with small limits (4096-byte
 * texts, 16 tokens) so that valid requests are cheap.  A streamed
 * generation, and an answer written as it is sent (lazy_json.h), is read
 * to its end, the latter parsed as JSON.  Every reply must carry a status
 * and a body, a stream or a lazy answer, and a body or lazy answer must be
 * UTF-8 whatever bytes the request held.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <unistr.h>

#include "api.h"
#include "lazy_json.h"
#include "metrics.h"
#include "registry.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const models[] = {"plain_lstm_l2_bi_last", "rra_dynamic_w3_l2_bi", "combo_lstm_lm", "tok_word_lm",
                                     "tok_byte"};
#define N_MODELS (sizeof models / sizeof models[0])

static api_handler *const handlers[] = {api_classify, api_score,  api_attention, api_generate,    api_models,
                                        api_healthz,  api_readyz, api_metrics,   api_completions, api_openai_models};

static char dir[64];
static struct api api;

static void link_path(char *out, size_t cap, size_t i)
{
    snprintf(out, cap, "%s/%s.safetensors", dir, models[i]);
}

static void remove_dir(void)
{
    char path[128];
    for (size_t i = 0; i < N_MODELS; i++) {
        link_path(path, sizeof path, i);
        unlink(path);
    }
    rmdir(dir);
}

static int never_gone(void *arg)
{
    (void)arg;
    return 0;
}

static void open_registry(void)
{
    char err[512], cwd[PATH_MAX], target[PATH_MAX + 128], path[128];
    snprintf(dir, sizeof dir, "/tmp/rrn_fuzz_req_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("fuzz_request: mkdtemp");
        exit(1);
    }
    atexit(remove_dir);
    if (!getcwd(cwd, sizeof cwd)) {
        perror("fuzz_request: getcwd");
        exit(1);
    }
    for (size_t i = 0; i < N_MODELS; i++) {
        snprintf(target, sizeof target, "%s/tests/fixtures/%s.safetensors", cwd, models[i]);
        link_path(path, sizeof path, i);
        if (access(target, R_OK) != 0 || symlink(target, path) != 0) {
            fprintf(stderr, "fuzz_request: cannot link %s (run from the repository root)\n", target);
            exit(1);
        }
    }
    api.metrics = metrics_new("fuzz");
    struct registry_options ro = {.dir = dir, .device = DEVICE_CPU,
                                  .batch = {.max_batch = 8, .max_wait_us = 0, .max_queue = 64}};
    api.lim = (struct api_limits){.max_text_bytes = 4096, .max_tokens = 16};
    atomic_init(&api.stopping, 0);
    if (!api.metrics || !(api.reg = registry_open(&ro, err, sizeof err))) {
        fprintf(stderr, "fuzz_request: %s\n", api.metrics ? err : "out of memory");
        exit(1);
    }
}

/* Reads a lazy answer to its end, which must be one JSON value, and frees
 * it. */
static void read_lazy(struct lazy_json *z)
{
    size_t len = 0, cap = 1 << 16;
    char *text = malloc(cap);
    ssize_t n = 0;
    while (text && (n = lazy_json_read(z, text + len, cap - len - 1)) > 0)
        if ((len += (size_t)n) + 1 == cap)
            text = realloc(text, cap *= 2);
    if (!text || n < 0)
        abort();
    text[len] = 0;
    cJSON *parsed = cJSON_Parse(text);
    if (!parsed || u8_check((const uint8_t *)text, len))
        abort();
    cJSON_Delete(parsed);
    free(text);
    lazy_json_free(z);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!api.reg)
        open_registry();
    if (size < 1)
        return 0;
    struct reply r = {.batch_size = -1};
    struct client c = {never_gone, NULL, "fuzz"};
    api_handler *handler = handlers[(uint8_t)(data[0] - '0') % (sizeof handlers / sizeof handlers[0])];
    handler(&api, (const char *)data + 1, size - 1, &c, &r);
    if (r.status < 200 || r.status > 599 || (!r.stream && !r.lazy && !r.body) ||
        (r.body && u8_check((const uint8_t *)r.body, strlen(r.body))))
        abort();
    if (r.lazy)
        read_lazy(r.lazy);
    if (r.stream) {
        char buf[4096];
        ssize_t n;
        int reads = 0;
        while ((n = api_stream_read(r.stream, buf, sizeof buf)) > 0)
            if (++reads > 100000)
                abort();
        if (n < 0)
            abort();
        api_stream_free(r.stream);
    }
    free(r.body);
    return 0;
}
