/* test_server.c - `rrnserve serve` driven over real HTTP on 127.0.0.1: the
 * server runs as a child process ($RRN_BIN, as tests/run_tests.sh sets it)
 * on a temporary folder of fixture models, and is spoken to with plain
 * sockets.  Every endpoint and every error status; results equal to the
 * fixtures; seeded and streamed generation; 64 concurrent clients; queue
 * limits and clients that leave; request ids; the log as JSON; the prompt
 * cache; SIGTERM under load, SIGHUP reloads and API keys.
 *
 * Every wait is bounded (socket timeouts, polling counts), nothing asserts
 * how fast anything is, and each child is killed in its teardown even when
 * its test fails (and, through PR_SET_PDEATHSIG, when this process dies).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <dlfcn.h>
#include <math.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <unistr.h>

#include "../cli/commands.h"
#include "backend.h"
#include "handler.h"
#include "model.h"
#include "request_id.h"
#include "support/buf.h"
#include "support/cuda.h"
#include "support/files.h"
#include "support/filter.h"
#include "support/fixtures.h"
#include "support/http.h"
#include "support/model_json.h"
#include "support/proc.h"
#include "support/server.h"
#include "support/timing.h"

static const char *const main_models[] = {"combo_lstm_lm", "rra_dynamic_w3_l2_bi", "plain_lstm_l2_bi_last",
                                          "tok_word_lm", NULL};

/* strcasestr, which POSIX lacks. */
static const char *strcasestr_ascii(const char *hay, const char *needle)
{
    for (size_t n = strlen(needle); *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return hay;
    return NULL;
}

static cJSON *json_of(const struct http_resp *r)
{
    cJSON *j = cJSON_Parse(r->body.p);
    if (!j)
        fail_msg("not JSON (status %d): %s", r->status, r->body.p);
    return j;
}

/* POST a JSON body; the answer must have the status; returns its JSON. */
static cJSON *post(int port, const char *path, int status, const char *body)
{
    struct http_resp r;
    http_must_request(port, "POST", path, "", body, &r);
    if (r.status != status)
        fail_msg("POST %s %s: status %d, not %d: %s", path, body, r.status, status, r.body.p);
    cJSON *j = json_of(&r);
    http_resp_free(&r);
    return j;
}

static cJSON *get(int port, const char *path, int status)
{
    struct http_resp r;
    http_must_request(port, "GET", path, "", NULL, &r);
    if (r.status != status)
        fail_msg("GET %s: status %d, not %d: %s", path, r.status, status, r.body.p);
    cJSON *j = json_of(&r);
    http_resp_free(&r);
    return j;
}

/* Five euro signs, three bytes each: text that a cut may split. */
#define EURO5 "\xE2\x82\xAC\xE2\x82\xAC\xE2\x82\xAC\xE2\x82\xAC\xE2\x82\xAC"

/* An error answer: the status, JSON content in UTF-8 (whatever bytes of
 * the request its message quotes), and the error object naming `mention`
 * (when not NULL) in its message. */
static void check_error(const struct http_resp *r, int status, const char *mention)
{
    char type[128];
    if (r->status != status)
        fail_msg("status %d, not %d: %s", r->status, status, r->body.p);
    assert_string_equal(http_header(r, "Content-Type", type, sizeof type), "application/json");
    if (u8_check((const uint8_t *)r->body.p, r->body.len))
        fail_msg("the error's body is not UTF-8: %s", r->body.p);
    cJSON *j = json_of(r);
    cJSON *e = cJSON_GetObjectItem(j, "error");
    assert_true(cJSON_IsObject(e));
    assert_int_equal(cJSON_GetObjectItem(e, "code")->valueint, status);
    cJSON *msg = cJSON_GetObjectItem(e, "message");
    assert_true(cJSON_IsString(msg) && msg->valuestring[0]);
    if (mention && !strstr(msg->valuestring, mention))
        fail_msg("message \"%s\" does not mention %s", msg->valuestring, mention);
    cJSON_Delete(j);
}

static void expect_error(int port, const char *method, const char *path, const char *headers, const char *body,
                         int status, const char *mention)
{
    struct http_resp r;
    http_must_request(port, method, path, headers, body, &r);
    check_error(&r, status, mention);
    http_resp_free(&r);
}

/* A request whose answer must have the given status; the answer is
 * dropped. */
static void expect_status(int port, const char *method, const char *path, const char *headers, const char *body,
                          int status)
{
    struct http_resp r;
    http_must_request(port, method, path, headers, body, &r);
    if (r.status != status)
        fail_msg("%s %s: status %d, not %d: %s", method, path, r.status, status, r.body.p);
    http_resp_free(&r);
}

/* A request body with one string field JSON-escaped. */
static char *body_with(const char *model, const char *field, const char *text, const char *more)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model", model);
    cJSON_AddStringToObject(o, field, text);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    assert_non_null(s);
    if (!more)
        return s;
    /* more: extra members, spliced in before the closing brace. */
    struct buf b = {0};
    buf_add(&b, s, strlen(s) - 1);
    buf_printf(&b, ",%s}", more);
    free(s);
    return b.p;
}

/* ---- the main server: every endpoint, every error ----------------------- */

static int setup_main(void **state)
{
    /* Under RRN_SERVER_WRAPPER (valgrind runs one thread at a time)
     * requests arrive further apart: a longer wait still fills batches. */
    static const char *const extra[] = {"--device", "cpu", "--max-wait-us", "20000", NULL};
    static const char *const wrapped[] = {"--device", "cpu", "--max-wait-us", "200000", NULL};
    *state = server_start(&(struct server_opts){.models = main_models, .args = server_wrapped() ? wrapped : extra});
    return 0;
}

static void test_health_and_metrics(void **state)
{
    struct server *s = *state;
    cJSON *j = get(s->port, "/healthz", 200);
    assert_string_equal(cJSON_GetObjectItem(j, "status")->valuestring, "ok");
    cJSON_Delete(j);
    j = get(s->port, "/readyz", 200);
    assert_int_equal(cJSON_GetObjectItem(j, "models")->valueint, 4);
    cJSON_Delete(j);

    struct http_resp r;
    char type[128];
    http_must_request(s->port, "GET", "/metrics", "", NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(http_header(&r, "Content-Type", type, sizeof type), "text/plain"));
    assert_non_null(strstr(r.body.p, "rrnserve_requests_total{endpoint=\"/healthz\",status=\"200\"} "));
    assert_non_null(strstr(r.body.p, "rrnserve_request_duration_seconds_bucket{endpoint=\"/readyz\",le=\"+Inf\"} "));
    assert_non_null(strstr(r.body.p, "# TYPE rrnserve_batch_size histogram"));
    assert_non_null(strstr(r.body.p, "rrnserve_queue_depth{model=\"combo_lstm_lm\"} 0"));
    assert_non_null(strstr(r.body.p, "rrnserve_tokens_generated_total{model=\"combo_lstm_lm\"} 0\n"));
    /* A classifier has the series of batches, not those of generation. */
    assert_non_null(strstr(r.body.p, "rrnserve_queue_wait_seconds_count{model=\"plain_lstm_l2_bi_last\"} "));
    assert_null(strstr(r.body.p, "rrnserve_time_to_first_token_seconds_count{model=\"plain_lstm_l2_bi_last\"}"));
    assert_null(strstr(r.body.p, "rrnserve_streams_running{model=\"plain_lstm_l2_bi_last\"}"));
    http_resp_free(&r);
    /* The connection of the request that reads it, at least. */
    assert_true(http_metric(s->port, "rrnserve_connections_open") >= 1);
    assert_true(http_metric(s->port, "rrnserve_connections_max") >= 1);
    assert_true(http_metric(s->port, "rrnserve_connections_closed_total{reason=\"timeout\"}") == 0);

    /* A model's batches count under its name only; a batch of one text
     * in the bucket le="1", as a bucket counts the values up to its bound,
     * the bound included. */
    static const char *const used = "rrnserve_batch_size_count{model=\"plain_lstm_l2_bi_last\"}",
                             *const ones = "rrnserve_batch_size_bucket{model=\"plain_lstm_l2_bi_last\",le=\"1\"}",
                             *const timed = "rrnserve_engine_seconds_count{model=\"plain_lstm_l2_bi_last\"}",
                             *const idle = "rrnserve_batch_size_count{model=\"rra_dynamic_w3_l2_bi\"}";
    double used0 = http_metric(s->port, used), ones0 = http_metric(s->port, ones);
    double timed0 = http_metric(s->port, timed), idle0 = http_metric(s->port, idle);
    assert_true(used0 >= 0 && ones0 >= 0 && timed0 >= 0 && idle0 >= 0);
    char *body = body_with("plain_lstm_l2_bi_last", "text", "good day!", NULL);
    cJSON_Delete(post(s->port, "/classify", 200, body));
    free(body);
    assert_true(http_metric(s->port, used) == used0 + 1);
    assert_true(http_metric(s->port, ones) == ones0 + 1);
    assert_true(http_metric(s->port, timed) == timed0 + 1);
    assert_true(http_metric(s->port, idle) == idle0);
}

static void test_models(void **state)
{
    struct server *s = *state;
    cJSON *j = get(s->port, "/models", 200);
    cJSON *models = cJSON_GetObjectItem(j, "models");
    assert_int_equal(cJSON_GetArraySize(models), 4);
    /* Sorted by name. */
    static const char *const names[] = {"combo_lstm_lm", "plain_lstm_l2_bi_last", "rra_dynamic_w3_l2_bi",
                                        "tok_word_lm"};
    static const char *const tasks[] = {"lm", "classify", "classify", "lm"};
    for (int i = 0; i < 4; i++) {
        cJSON *m = cJSON_GetArrayItem(models, i);
        assert_string_equal(cJSON_GetObjectItem(m, "name")->valuestring, names[i]);
        assert_string_equal(cJSON_GetObjectItem(m, "task")->valuestring, tasks[i]);
        assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "config"), "task")->valuestring, tasks[i]);
        assert_true(cJSON_GetObjectItem(m, "parameters")->valuedouble > 0);
        const char *sha256 = cJSON_GetObjectItem(m, "sha256")->valuestring;
        assert_int_equal(strlen(sha256), 64);
        /* The same weights named in /metrics, for telling replicas apart. */
        char info[256];
        snprintf(info, sizeof info, "rrnserve_model_info{model=\"%s\",task=\"%s\",sha256=\"%s\"}", names[i],
                 tasks[i], sha256);
        assert_true(http_metric(s->port, info) == 1);
    }
    cJSON_Delete(j);
    assert_true(http_metric(s->port, "rrnserve_build_info{version=\"" RRN_VERSION "\",device=\"cpu\"}") == 1);
}

static void check_probabilities(const cJSON *got, const cJSON *classes, const cJSON *want)
{
    const cJSON *probs = cJSON_GetObjectItem(got, "probabilities");
    int best = 0;
    for (int c = 0; c < cJSON_GetArraySize(classes); c++) {
        double w = cJSON_GetArrayItem(want, c)->valuedouble;
        const cJSON *p = cJSON_GetObjectItem(probs, cJSON_GetArrayItem(classes, c)->valuestring);
        assert_non_null(p);
        assert_true(fabs(p->valuedouble - w) < 1e-5);
        if (w > cJSON_GetArrayItem(want, best)->valuedouble)
            best = c;
    }
    assert_string_equal(cJSON_GetObjectItem(got, "label")->valuestring,
                        cJSON_GetArrayItem(classes, best)->valuestring);
}

static void test_classify_equals_fixture(void **state)
{
    struct server *s = *state;
    static const char *const models[] = {"plain_lstm_l2_bi_last", "rra_dynamic_w3_l2_bi"};
    for (int m = 0; m < 2; m++) {
        cJSON *fx = fixture_json(models[m]);
        cJSON *texts = cJSON_GetObjectItem(fx, "texts"), *want = cJSON_GetObjectItem(fx, "probabilities");
        cJSON *classes = cJSON_GetObjectItem(cJSON_GetObjectItem(fx, "config"), "classes");
        for (int t = 0; t < cJSON_GetArraySize(texts); t++) {
            char *body = body_with(models[m], "text", cJSON_GetArrayItem(texts, t)->valuestring, NULL);
            cJSON *got = post(s->port, "/classify", 200, body);
            check_probabilities(got, classes, cJSON_GetArrayItem(want, t));
            cJSON_Delete(got);
            free(body);
        }
        /* All texts at once: the same answers, in order. */
        cJSON *req = cJSON_CreateObject();
        cJSON_AddStringToObject(req, "model", models[m]);
        cJSON_AddItemToObject(req, "texts", cJSON_Duplicate(texts, 1));
        char *body = cJSON_PrintUnformatted(req);
        cJSON *got = post(s->port, "/classify", 200, body);
        cJSON *results = cJSON_GetObjectItem(got, "results");
        assert_int_equal(cJSON_GetArraySize(results), cJSON_GetArraySize(texts));
        for (int t = 0; t < cJSON_GetArraySize(texts); t++)
            check_probabilities(cJSON_GetArrayItem(results, t), classes, cJSON_GetArrayItem(want, t));
        cJSON_Delete(got);
        free(body);
        cJSON_Delete(req);
        cJSON_Delete(fx);
    }
}

static void test_score_equals_fixture(void **state)
{
    struct server *s = *state;
    cJSON *fx = fixture_json("tok_word_lm");
    cJSON *texts = cJSON_GetObjectItem(fx, "texts"), *lp = cJSON_GetObjectItem(fx, "logprob"),
          *count = cJSON_GetObjectItem(fx, "logprob_count");
    for (int t = 0; t < cJSON_GetArraySize(texts); t++) {
        char *body = body_with("tok_word_lm", "text", cJSON_GetArrayItem(texts, t)->valuestring, NULL);
        cJSON *got = post(s->port, "/score", 200, body);
        double L = cJSON_GetObjectItem(got, "logprob")->valuedouble;
        int n = cJSON_GetArrayItem(count, t)->valueint;
        assert_true(fabs(L - cJSON_GetArrayItem(lp, t)->valuedouble) < 1e-4);
        assert_int_equal(cJSON_GetObjectItem(got, "tokens")->valueint, n);
        cJSON *bpc = cJSON_GetObjectItem(got, "bits_per_char");
        if (n == 0)
            assert_true(cJSON_IsNull(bpc));
        else
            assert_true(fabs(bpc->valuedouble - (-L / log(2.0) / n)) < 1e-9);
        cJSON_Delete(got);
        free(body);
    }
    cJSON_Delete(fx);
}

/* /attention on every text of fixture name: its shape and mode, each
 * weight within 1e-5 of PyTorch's and the position each weighs. */
static void check_attention_fixture(int port, const char *name)
{
    cJSON *fx = fixture_json(name), *cfg = cJSON_GetObjectItem(fx, "config");
    cJSON *texts = cJSON_GetObjectItem(fx, "texts"), *att = cJSON_GetObjectItem(fx, "attention");
    const int L = cJSON_GetObjectItem(cfg, "layers")->valueint;
    const int D = cJSON_IsTrue(cJSON_GetObjectItem(cfg, "bidirectional")) ? 2 : 1;
    const int K = cJSON_GetObjectItem(cJSON_GetObjectItem(cfg, "attention"), "window")->valueint;
    const char *mode = cJSON_GetObjectItem(cJSON_GetObjectItem(cfg, "attention"), "mode")->valuestring;
    for (int t = 0; t < cJSON_GetArraySize(texts); t++) {
        char *body = body_with(name, "text", cJSON_GetArrayItem(texts, t)->valuestring, NULL);
        cJSON *got = post(port, "/attention", 200, body);
        cJSON *want = cJSON_GetArrayItem(att, t);
        int len = cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(fx, "tokens"), t));
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "tokens")), len);
        assert_int_equal(cJSON_GetObjectItem(got, "window")->valueint, K);
        assert_string_equal(cJSON_GetObjectItem(got, "mode")->valuestring, mode);
        cJSON *layers = cJSON_GetObjectItem(got, "layers");
        assert_int_equal(cJSON_GetArraySize(layers), L);
        for (int l = 0; l < L; l++) {
            cJSON *dirs = cJSON_GetObjectItem(cJSON_GetArrayItem(layers, l), "directions");
            assert_int_equal(cJSON_GetArraySize(dirs), D);
            for (int d = 0; d < D; d++) {
                cJSON *dir = cJSON_GetArrayItem(dirs, d);
                assert_string_equal(cJSON_GetObjectItem(dir, "direction")->valuestring, d ? "backward" : "forward");
                cJSON *steps = cJSON_GetObjectItem(dir, "steps");
                assert_int_equal(cJSON_GetArraySize(steps), len);
                for (int p = 0; p < len; p++) {
                    cJSON *step = cJSON_GetArrayItem(steps, p);
                    cJSON *w = cJSON_GetObjectItem(step, "weights"), *pos = cJSON_GetObjectItem(step, "positions");
                    assert_int_equal(cJSON_GetObjectItem(step, "position")->valueint, p);
                    for (int k = 0; k < K; k++) {
                        double ref = cJSON_GetArrayItem(
                                         cJSON_GetArrayItem(cJSON_GetArrayItem(cJSON_GetArrayItem(want, l), d), p), k)
                                         ->valuedouble;
                        assert_true(fabs(cJSON_GetArrayItem(w, k)->valuedouble - ref) < 1e-5);
                        assert_int_equal(cJSON_GetArrayItem(pos, k)->valueint, d ? p + 2 + k : p - 2 - k);
                    }
                }
            }
        }
        cJSON_Delete(got);
        free(body);
    }
    cJSON_Delete(fx);
}

/* A bidirectional classifier's maps, and a language model's (one
 * direction a layer, run through engine_score). */
static void test_attention_equals_fixture(void **state)
{
    struct server *s = *state;
    check_attention_fixture(s->port, "rra_dynamic_w3_l2_bi");
    check_attention_fixture(s->port, "combo_lstm_lm");
}

/* The weights of step p of layer l's direction d in an /attention answer. */
static cJSON *attention_step(const cJSON *got, int l, int d, int p)
{
    cJSON *layer = cJSON_GetArrayItem(cJSON_GetObjectItem(got, "layers"), l);
    cJSON *dir = cJSON_GetArrayItem(cJSON_GetObjectItem(layer, "directions"), d);
    cJSON *step = cJSON_GetArrayItem(cJSON_GetObjectItem(dir, "steps"), p);
    assert_non_null(step);
    return cJSON_GetObjectItem(step, "weights");
}

/* A bidirectional classifier's map of a text longer than a forward turn
 * (4,096 tokens) runs whole, as a short one does (a language model's
 * goes in parts through a slot, which a classifier has not): every step
 * there, and layer 0's forward weights, which depend on the text's start
 * alone, those of its first 16 characters. */
static void test_long_attention_of_a_classifier(void **state)
{
    struct server *s = *state;
    enum { LEN = 5000, PREFIX = 16 };
    char text[LEN + 1];
    for (int i = 0; i < LEN; i++)
        text[i] = "good day! a bad film, "[i % 22];
    text[LEN] = 0;
    char *body = body_with("rra_dynamic_w3_l2_bi", "text", text, NULL);
    cJSON *whole = post(s->port, "/attention", 200, body);
    free(body);
    text[PREFIX] = 0;
    body = body_with("rra_dynamic_w3_l2_bi", "text", text, NULL);
    cJSON *prefix = post(s->port, "/attention", 200, body);
    free(body);
    assert_non_null(attention_step(whole, 1, 1, LEN - 1));
    for (int p = 0; p < PREFIX; p++) {
        cJSON *a = attention_step(whole, 0, 0, p), *b = attention_step(prefix, 0, 0, p);
        assert_int_equal(cJSON_GetArraySize(a), cJSON_GetArraySize(b));
        for (int k = 0; k < cJSON_GetArraySize(a); k++)
            assert_true(fabs(cJSON_GetArrayItem(a, k)->valuedouble - cJSON_GetArrayItem(b, k)->valuedouble) < 1e-5);
    }
    cJSON_Delete(whole);
    cJSON_Delete(prefix);
}

/* A classify request's texts go to the engine in calls of at most 16,384
 * tokens, so four texts of 9,000 characters (no two fit in one call) leave
 * the engine's scratch memory (which keeps its largest call's) where one
 * of them left it. */
static void test_forward_calls_are_bounded(void **state)
{
    struct server *s = *state;
    const char *series = "rrnserve_engine_scratch_bytes{model=\"plain_lstm_l2_bi_last\"}";
    enum { LEN = 9000 };
    char *text = malloc(LEN + 1);
    assert_non_null(text);
    for (int i = 0; i < LEN; i++)
        text[i] = "good day, "[i % 10];
    text[LEN] = 0;
    const double before = http_metric(s->port, series);
    struct buf one = {0}, four = {0};
    buf_printf(&one, "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"%s\"}", text);
    buf_printf(&four, "{\"model\": \"plain_lstm_l2_bi_last\", \"texts\": [\"%s\", \"%s\", \"%s\", \"%s\"]}", text,
               text, text, text);
    cJSON_Delete(post(s->port, "/classify", 200, one.p));
    const double after_one = http_metric(s->port, series);
    cJSON *got = post(s->port, "/classify", 200, four.p);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "results")), 4);
    const double after_four = http_metric(s->port, series);
    if (!(before >= 0 && after_one > before && after_four == after_one))
        fail_msg("scratch bytes %.0f before, %.0f after one text, %.0f after four", before, after_one, after_four);
    cJSON_Delete(got);
    free(one.p);
    free(four.p);
    free(text);
}

/* ---- the CUDA backend with its recurrence fused ------------------------- */

/* A server of the main models with --device cuda --recurrence fused; no
 * server (and the test skipped) without a GPU. */
static int setup_fused(void **state)
{
    *state = NULL;
    static const char *const extra[] = {"--device", "cuda", "--recurrence", "fused", NULL};
    if (backend_cuda_available())
        *state = server_start(&(struct server_opts){.models = main_models, .args = extra});
    return 0;
}

/* What a user of --recurrence fused gets over HTTP: the fixtures'
 * probabilities, log-probabilities and attention weights, as the CPU's
 * server gives them, and a log that names the recurrence. */
static void test_fused_recurrence_equals_fixtures(void **state)
{
    struct server *s = *state;
    if (!s)
        skip();
    assert_int_equal(server_wait_log(s, "on device cuda, fused", 1), 1);
    test_classify_equals_fixture(state);
    test_score_equals_fixture(state);
    test_attention_equals_fixture(state);
}

/* ---- choosing the device ------------------------------------------------ */

/* A server left to choose its device (--device auto, the default). */
static int setup_auto(void **state)
{
    *state = server_start(&(struct server_opts){.models = main_models});
    return 0;
}

/* Whether the server s has mapped a file whose name holds name. */
static int server_maps(const struct server *s, const char *name)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)s->pid);
    char *maps = file_read(path, NULL);
    assert_non_null(maps);
    int found = strstr(maps, name) != NULL;
    free(maps);
    return found;
}

/* --device auto takes the GPU when there is one.  Otherwise it says why
 * and computes on the CPU; without an NVIDIA driver it does not even load
 * the CUDA library, which would map cuBLAS (150 MB more memory).  A CUDA
 * library that will not load (the environment names one that is not
 * there) is such a reason too. */
static void test_device_auto(void **state)
{
    struct server *s = *state;
    const char *why = backend_cuda_unavailable();
    char line[640];
    snprintf(line, sizeof line, "device auto chose the cpu: %s", why ? why : "");
    assert_int_equal(server_wait_log(s, why ? line : "on device cuda", 1), 1);
    if (!why)
        assert_true(server_maps(s, "librrnserve-cuda"));
    void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (driver)
        dlclose(driver);
    else if (why && strstr(backend_compiled(), "cuda")) {
        assert_non_null(strstr(why, "no CUDA driver"));
        assert_false(server_maps(s, "librrnserve-cuda"));
        assert_false(server_maps(s, "libcublas"));
    }

    static const char *const env[] = {"RRN_CUDA_LIBRARY=" CUDA_MISSING_LIBRARY, NULL};
    struct server *without = server_start(&(struct server_opts){.models = main_models, .env = env});
    snprintf(line, sizeof line, "device auto chose the cpu: %s", cuda_missing_library_says());
    assert_int_equal(server_wait_log(without, line, 1), 1);
    assert_int_equal(server_wait_log(without, "on device cpu", 1), 1);
    test_classify_equals_fixture((void **)&without);
    server_stop(without);
}

static cJSON *generate(int port, const char *model, const char *more)
{
    char *body = body_with(model, "prompt", "good day", more);
    cJSON *got = post(port, "/generate", 200, body);
    free(body);
    return got;
}

static const char *str_of(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItem(o, key);
    assert_true(cJSON_IsString(v));
    return v->valuestring;
}

static void test_generate_seeded(void **state)
{
    struct server *s = *state;
    cJSON *a = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 20, \"seed\": 7, \"temperature\": 0.9");
    cJSON *b = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 20, \"seed\": 7, \"temperature\": 0.9");
    assert_string_equal(str_of(a, "text"), str_of(b, "text"));
    assert_int_equal(cJSON_GetObjectItem(a, "tokens")->valueint, 20);
    assert_string_equal(str_of(a, "finish_reason"), "length");
    assert_int_equal(cJSON_GetObjectItem(a, "seed")->valueint, 7);
    cJSON_Delete(a);
    cJSON_Delete(b);

    /* Seed 0 is a seed like any other, not "draw one". */
    a = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 20, \"seed\": 0, \"temperature\": 0.9");
    b = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 20, \"seed\": 0, \"temperature\": 0.9");
    assert_string_equal(str_of(a, "text"), str_of(b, "text"));
    assert_int_equal(cJSON_GetObjectItem(a, "seed")->valueint, 0);
    cJSON_Delete(a);
    cJSON_Delete(b);

    /* No seed: the one drawn is returned, and reproduces the text. */
    a = generate(s->port, "tok_word_lm", "\"max_tokens\": 12");
    double seed = cJSON_GetObjectItem(a, "seed")->valuedouble;
    assert_true(seed >= 0 && seed <= 9007199254740991.0);
    char more[160];
    snprintf(more, sizeof more, "\"max_tokens\": 12, \"seed\": %.0f", seed);
    b = generate(s->port, "tok_word_lm", more);
    assert_string_equal(str_of(a, "text"), str_of(b, "text"));
    cJSON_Delete(a);
    cJSON_Delete(b);

    /* Every seed up to 2^53 - 1 comes back digit for digit. */
    static const char *const big[] = {"7000000000000001", "9007199254740991"};
    for (int k = 0; k < 2; k++) {
        char want[64];
        snprintf(more, sizeof more, "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good\", \"max_tokens\": 2, "
                                    "\"seed\": %s}", big[k]);
        snprintf(want, sizeof want, "\"seed\":%s}", big[k]);
        struct http_resp r;
        http_must_request(s->port, "POST", "/generate", "", more, &r);
        assert_int_equal(r.status, 200);
        assert_non_null(strstr(r.body.p, want));
        http_resp_free(&r);
    }

    /* A stop string ends the text before its first occurrence.  The model
     * has one token per character, so the tokens are the characters before
     * it plus the stop string's two.  It is the last of the four a request
     * may give; the others, control characters, never come. */
    a = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 30, \"temperature\": 0");
    const char *text = str_of(a, "text");
    size_t i = 10;
    while (text[i] && text[i + 1] && ((text[i] | text[i + 1]) & 0x80))
        i++;
    assert_true(text[i] && text[i + 1]);
    char stop[3] = {text[i], text[i + 1], 0};
    size_t at = (size_t)(strstr(text, stop) - text);
    cJSON *stops = cJSON_CreateString(stop);
    char *stop_json = cJSON_PrintUnformatted(stops);
    snprintf(more, sizeof more, "\"max_tokens\": 30, \"temperature\": 0, \"stop\": [\"\\u0001\", \"\\u0002\", \"\\u0003\", %s]",
             stop_json);
    b = generate(s->port, "combo_lstm_lm", more);
    assert_string_equal(str_of(b, "finish_reason"), "stop");
    assert_int_equal(strlen(str_of(b, "text")), at);
    assert_memory_equal(str_of(b, "text"), text, at);
    int chars = 0;
    for (size_t k = 0; k < at; k++)
        chars += ((unsigned char)text[k] & 0xC0) != 0x80;
    assert_int_equal(cJSON_GetObjectItem(b, "tokens")->valueint, chars + 2);
    free(stop_json);
    cJSON_Delete(stops);
    cJSON_Delete(a);
    cJSON_Delete(b);
}

/* `rrnserve run --generate` runs the server's batcher: with the same
 * settings it answers what /generate answers, and with no seed it prints
 * the one it drew, which gives the server the same text; with --stream it
 * prints that text alone, stop strings taken back as the answer's are. */
static void test_cli_generate_equals_server(void **state)
{
    struct server *s = *state;
    static const struct {
        const char *model, *prompt, *args, *more;
    } cases[] = {
        {"combo_lstm_lm", "good day", "--max-tokens 25 --seed 11 --temperature 0.7 --top-k 5",
         "\"max_tokens\": 25, \"seed\": 11, \"temperature\": 0.7, \"top_k\": 5"},
        {"combo_lstm_lm", "the good day", "--max-tokens 30 --temperature 0 --stop za --stop qq --seed 1",
         "\"max_tokens\": 30, \"temperature\": 0, \"stop\": [\"za\", \"qq\"], \"seed\": 1"},
        {"tok_word_lm", "hello world", "--max-tokens 12 --seed 3 --top-p 0.9",
         "\"max_tokens\": 12, \"seed\": 3, \"top_p\": 0.9"},
        {"tok_word_lm", "hello world", "--max-tokens 6", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *out;
        if (proc_rrnserve(&out, NULL, "run " FIXTURES_DIR "/%s.safetensors --generate '%s' %s 2>/dev/null",
                          cases[i].model, cases[i].prompt, cases[i].args) != 0)
            fail_msg("rrnserve run --generate '%s' %s failed:\n%s", cases[i].prompt, cases[i].args, out);
        cJSON *cli = cJSON_Parse(out);
        assert_non_null(cli);
        char more[160];
        if (!cases[i].more)
            snprintf(more, sizeof more, "\"max_tokens\": 6, \"seed\": %.0f",
                     cJSON_GetObjectItem(cli, "seed")->valuedouble);
        char *body = body_with(cases[i].model, "prompt", cases[i].prompt, cases[i].more ? cases[i].more : more);
        cJSON *want = post(s->port, "/generate", 200, body);
        static const char *const keys[] = {"text", "tokens", "prompt_tokens", "finish_reason", "seed"};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
            if (!cJSON_Compare(cJSON_GetObjectItem(cli, keys[k]), cJSON_GetObjectItem(want, keys[k]), 1))
                fail_msg("%s %s: the command line says %s, the server %s", cases[i].model, cases[i].args, out,
                         cJSON_PrintUnformatted(want));
        if (i == 1)
            assert_string_equal(str_of(cli, "finish_reason"), "stop");
        /* --stream prints that text, a line, as it comes. */
        char *streamed, seed[48] = "";
        struct buf line = {0};
        if (!cases[i].more)
            snprintf(seed, sizeof seed, "--seed %.0f", cJSON_GetObjectItem(cli, "seed")->valuedouble);
        if (proc_rrnserve(&streamed, NULL, "run " FIXTURES_DIR "/%s.safetensors --generate '%s' %s %s --stream",
                          cases[i].model, cases[i].prompt, cases[i].args, seed) != 0)
            fail_msg("rrnserve run --generate '%s' %s --stream failed:\n%s", cases[i].prompt, cases[i].args, streamed);
        buf_printf(&line, "%s\n", str_of(cli, "text"));
        assert_string_equal(streamed, line.p);
        free(line.p);
        free(streamed);
        cJSON_Delete(want);
        cJSON_Delete(cli);
        free(body);
        free(out);
    }
}

/* The events of a whole SSE body: the token texts joined, their count,
 * and the final event; the token events themselves added to `tokens`
 * unless it is NULL.  Checks the indexes and the closing [DONE]. */
static cJSON *parse_events(const char *body, struct buf *joined, int *n_tokens, cJSON *tokens)
{
    cJSON *last = NULL;
    int done = 0;
    *n_tokens = 0;
    buf_add(joined, "", 0);
    const char *stop = body + strlen(body);
    for (const char *p = body, *end; p < stop; p = end + 2) {
        end = http_find(p, stop, "\n\n");
        assert_non_null(end);
        assert_true(strncmp(p, "data: ", 6) == 0);
        assert_false(done);
        if (strncmp(p + 6, "[DONE]", 6) == 0) {
            done = 1;
            continue;
        }
        cJSON *e = cJSON_ParseWithLength(p + 6, (size_t)(end - p - 6));
        assert_non_null(e);
        if (cJSON_GetObjectItem(e, "token")) {
            assert_null(last);
            assert_int_equal(cJSON_GetObjectItem(e, "index")->valueint, *n_tokens);
            buf_add(joined, str_of(e, "token"), strlen(str_of(e, "token")));
            ++*n_tokens;
            if (tokens)
                cJSON_AddItemToArray(tokens, e);
            else
                cJSON_Delete(e);
        } else {
            assert_null(last);
            last = e;
        }
    }
    assert_true(done);
    assert_non_null(last);
    return last;
}

static void test_generate_stream_equals_plain(void **state)
{
    struct server *s = *state;
    static const char *const models[] = {"combo_lstm_lm", "tok_word_lm"};
    for (int m = 0; m < 2; m++) {
        cJSON *plain = generate(s->port, models[m], "\"max_tokens\": 25, \"seed\": 11");
        char *body = body_with(models[m], "prompt", "good day", "\"max_tokens\": 25, \"seed\": 11, \"stream\": true");
        struct http_resp r;
        char type[64];
        http_must_request(s->port, "POST", "/generate", "", body, &r);
        assert_int_equal(r.status, 200);
        assert_string_equal(http_header(&r, "Content-Type", type, sizeof type), "text/event-stream");
        assert_string_equal(http_header(&r, "Cache-Control", type, sizeof type), "no-cache");
        struct buf joined = {0};
        int n;
        cJSON *last = parse_events(r.body.p, &joined, &n, NULL);
        assert_int_equal(n, 25);
        assert_string_equal(joined.p, str_of(plain, "text"));
        assert_string_equal(str_of(last, "text"), str_of(plain, "text"));
        assert_string_equal(str_of(last, "finish_reason"), "length");
        assert_int_equal(cJSON_GetObjectItem(last, "tokens")->valueint, 25);
        assert_int_equal(cJSON_GetObjectItem(last, "seed")->valueint, 11);
        cJSON_Delete(last);
        free(joined.p);
        http_resp_free(&r);
        free(body);
        cJSON_Delete(plain);
    }
}

static double logprob_of(const cJSON *o)
{
    const cJSON *v = cJSON_GetObjectItem(o, "logprob");
    assert_true(cJSON_IsNumber(v));
    return v->valuedouble;
}

/* What /score gives a text: ln p of its tokens after the first. */
static double score_of(int port, const char *text)
{
    char *body = body_with("combo_lstm_lm", "text", text, NULL);
    cJSON *o = post(port, "/score", 200, body);
    double lp = logprob_of(o);
    cJSON_Delete(o);
    free(body);
    return lp;
}

/* The log-probabilities beside generated tokens are the model's own: the
 * greedy token is the first of the alternatives, which come most probable
 * first; a seeded sample's add up to what /score finds for the text after
 * the prompt (another code path: the whole text in one forward); and a
 * stream carries the same numbers. */
static void test_generate_logprobs(void **state)
{
    struct server *s = *state;
    cJSON *greedy = generate(s->port, "combo_lstm_lm",
                             "\"max_tokens\": 12, \"temperature\": 0, \"logprobs\": true, \"top_logprobs\": 3");
    const cJSON *list = cJSON_GetObjectItem(greedy, "logprobs");
    assert_int_equal(cJSON_GetArraySize(list), 12);
    for (const cJSON *e = list->child; e; e = e->next) {
        const cJSON *top = cJSON_GetObjectItem(e, "top_logprobs");
        assert_int_equal(cJSON_GetArraySize(top), 3);
        assert_int_equal(cJSON_GetObjectItem(top->child, "id")->valueint, cJSON_GetObjectItem(e, "id")->valueint);
        assert_string_equal(str_of(top->child, "token"), str_of(e, "token"));
        assert_true(logprob_of(top->child) == logprob_of(e));
        for (const cJSON *t = top->child; t->next; t = t->next)
            assert_true(logprob_of(t) >= logprob_of(t->next) && logprob_of(t->next) > -100);
        assert_true(logprob_of(e) <= 0);
    }
    cJSON_Delete(greedy);

    const char *more = "\"max_tokens\": 30, \"seed\": 5, \"temperature\": 0.7, \"logprobs\": true";
    cJSON *sampled = generate(s->port, "combo_lstm_lm", more);
    list = cJSON_GetObjectItem(sampled, "logprobs");
    assert_int_equal(cJSON_GetArraySize(list), 30);
    double sum = 0;
    for (const cJSON *e = list->child; e; e = e->next) {
        assert_null(cJSON_GetObjectItem(e, "top_logprobs"));
        sum += logprob_of(e);
    }
    char whole[128];
    snprintf(whole, sizeof whole, "good day%s", str_of(sampled, "text"));
    const double want = score_of(s->port, whole) - score_of(s->port, "good day");
    if (!(fabs(sum - want) <= 1e-4 * fabs(want)))
        fail_msg("the tokens' log-probabilities add up to %.7f; /score says %.7f", sum, want);
    /* /score's own terms: tokens 2..n, adding up to its logprob, and from
     * the prompt's last on, the generation's. */
    char *score_body = body_with("combo_lstm_lm", "text", whole, "\"logprobs\": true");
    cJSON *scored = post(s->port, "/score", 200, score_body);
    const cJSON *terms = cJSON_GetObjectItem(scored, "logprobs");
    assert_int_equal(cJSON_GetArraySize(terms), 8 + 30 - 1);
    double terms_sum = 0;
    for (const cJSON *t = terms->child; t; t = t->next)
        terms_sum += logprob_of(t);
    assert_true(fabs(terms_sum - logprob_of(scored)) <= 1e-6 * fabs(logprob_of(scored)));
    assert_string_equal(str_of(cJSON_GetArrayItem(terms, 0), "token"), "o"); /* "good": the second token */
    const cJSON *t = cJSON_GetArrayItem(terms, 8 - 1); /* the first generated token, 9th of the text */
    for (const cJSON *e = list->child; e; e = e->next, t = t->next) {
        assert_int_equal(cJSON_GetObjectItem(t, "id")->valueint, cJSON_GetObjectItem(e, "id")->valueint);
        assert_true(fabs(logprob_of(t) - logprob_of(e)) <= 1e-5 * (1 + fabs(logprob_of(e))));
    }
    cJSON_Delete(scored);
    free(score_body);

    char stream_more[128];
    snprintf(stream_more, sizeof stream_more, "%s, \"stream\": true", more);
    char *body = body_with("combo_lstm_lm", "prompt", "good day", stream_more);
    struct http_resp r;
    http_must_request(s->port, "POST", "/generate", "", body, &r);
    assert_int_equal(r.status, 200);
    struct buf joined = {0};
    int n;
    cJSON *events = cJSON_CreateArray();
    cJSON *last = parse_events(r.body.p, &joined, &n, events);
    assert_int_equal(n, 30);
    const cJSON *e = list->child;
    for (const cJSON *ev = events->child; ev; ev = ev->next, e = e->next)
        assert_true(logprob_of(ev) == logprob_of(e));
    assert_null(cJSON_GetObjectItem(last, "logprobs"));
    cJSON_Delete(events);
    cJSON_Delete(last);
    free(joined.p);
    http_resp_free(&r);
    free(body);
    cJSON_Delete(sampled);
}

/* /score's alternatives: at each position the most probable tokens, most
 * probable first, the scored token's term equal to its own entry there to
 * the bit (so that a client can tell whether a text is what greedy
 * decoding gives), the terms those of /score without alternatives, and
 * the alternatives those that a generation from the same prefix gets
 * (another code path: one step at a time). */
static void test_score_alternatives(void **state)
{
    struct server *s = *state;
    cJSON *greedy = generate(s->port, "combo_lstm_lm",
                             "\"max_tokens\": 12, \"temperature\": 0, \"logprobs\": true, \"top_logprobs\": 3");
    char whole[128];
    snprintf(whole, sizeof whole, "good day%s", str_of(greedy, "text"));
    char *with_body = body_with("combo_lstm_lm", "text", whole, "\"logprobs\": true, \"top_logprobs\": 3");
    char *plain_body = body_with("combo_lstm_lm", "text", whole, "\"logprobs\": true");
    cJSON *with = post(s->port, "/score", 200, with_body), *plain = post(s->port, "/score", 200, plain_body);
    const cJSON *terms = cJSON_GetObjectItem(with, "logprobs"), *plain_terms = cJSON_GetObjectItem(plain, "logprobs");
    assert_int_equal(cJSON_GetArraySize(terms), 8 + 12 - 1);
    double sum = 0;
    int firsts = 0;
    const cJSON *pt = plain_terms->child;
    for (const cJSON *t = terms->child; t; t = t->next, pt = pt->next) {
        const cJSON *top = cJSON_GetObjectItem(t, "top_logprobs");
        assert_int_equal(cJSON_GetArraySize(top), 3);
        for (const cJSON *a = top->child; a->next; a = a->next)
            assert_true(logprob_of(a) >= logprob_of(a->next));
        for (const cJSON *a = top->child; a; a = a->next)
            if (cJSON_GetObjectItem(a, "id")->valueint == cJSON_GetObjectItem(t, "id")->valueint) {
                assert_true(logprob_of(a) == logprob_of(t));
                firsts += a == top->child;
            }
        assert_true(fabs(logprob_of(t) - logprob_of(pt)) <= 1e-5 * (1 + fabs(logprob_of(pt))));
        assert_null(cJSON_GetObjectItem(pt, "top_logprobs"));
        sum += logprob_of(t);
    }
    assert_true(fabs(sum - logprob_of(with)) <= 1e-6 * fabs(logprob_of(with)));
    assert_true(firsts >= 12); /* the greedy tokens at least */
    /* The generated tokens' alternatives: the first generated token is the
     * text's 9th, whose term is entry 7. */
    const cJSON *t = cJSON_GetArrayItem(terms, 8 - 1);
    for (const cJSON *e = cJSON_GetObjectItem(greedy, "logprobs")->child; e; e = e->next, t = t->next) {
        const cJSON *a = cJSON_GetObjectItem(t, "top_logprobs")->child;
        for (const cJSON *b = cJSON_GetObjectItem(e, "top_logprobs")->child; b; b = b->next, a = a->next) {
            assert_int_equal(cJSON_GetObjectItem(a, "id")->valueint, cJSON_GetObjectItem(b, "id")->valueint);
            assert_true(fabs(logprob_of(a) - logprob_of(b)) <= 1e-5 * (1 + fabs(logprob_of(b))));
        }
    }
    cJSON_Delete(with);
    cJSON_Delete(plain);
    free(with_body);
    free(plain_body);
    cJSON_Delete(greedy);
    char *b = body_with("combo_lstm_lm", "text", "good day", "\"top_logprobs\": 2");
    expect_error(s->port, "POST", "/score", "", b, 422, "\"logprobs\"");
    free(b);
    b = body_with("combo_lstm_lm", "text", "good day", "\"logprobs\": true, \"top_logprobs\": 21");
    expect_error(s->port, "POST", "/score", "", b, 422, "\"top_logprobs\"");
    free(b);
    /* 60,000 tokens with 20 alternatives each: more than an answer holds
     * (2^20), through /score and through an echo. */
    char *text = malloc(60001);
    assert_non_null(text);
    memset(text, 'a', 60000);
    text[60000] = 0;
    b = body_with("combo_lstm_lm", "text", text, "\"logprobs\": true, \"top_logprobs\": 20");
    expect_error(s->port, "POST", "/score", "", b, 422, "alternatives");
    free(b);
    b = body_with("combo_lstm_lm", "prompt", text, "\"echo\": true, \"max_tokens\": 0, \"logprobs\": 20");
    expect_error(s->port, "POST", "/v1/completions", "", b, 422, "alternatives");
    free(b);
    free(text);
}

static int setup_relu_lm(void **state)
{
    static const char *const models[] = {"plain_rnn_relu_l3_lm", NULL};
    static const char *const extra[] = {"--device", "cpu", NULL};
    *state = server_start(&(struct server_opts){.models = models, .args = extra});
    return 0;
}

/* A text whose score overflows the model (a ReLU RNN of 3 layers on "ab "
 * 150 times) is a 422 naming it, as `rrnserve run` fails on it, not a
 * null score; one it scores is answered. */
static void test_score_not_finite(void **state)
{
    struct server *s = *state;
    char text[451];
    for (int i = 0; i < 150; i++)
        memcpy(text + 3 * i, "ab ", 3);
    text[450] = 0;
    char *b = body_with("plain_rnn_relu_l3_lm", "text", text, NULL);
    expect_error(s->port, "POST", "/score", "", b, 422, "\"text\": its log-probability under the model is not finite");
    free(b);
    text[30] = 0;
    b = body_with("plain_rnn_relu_l3_lm", "text", text, NULL);
    cJSON *scored = post(s->port, "/score", 200, b);
    assert_true(isfinite(logprob_of(scored)));
    cJSON_Delete(scored);
    free(b);
}

/* A generation's latencies are in /metrics under its model: one time to
 * its first token, within the request's own time; one mean time between
 * its tokens when it had 2 or more; its queue wait; its prompt's tokens;
 * and no stream left running after it. */
static void test_generation_metrics(void **state)
{
    struct server *s = *state;
#define GEN_SERIES(name) "rrnserve_" name "{model=\"combo_lstm_lm\"}"
    static const char *const series[] = {
        GEN_SERIES("time_to_first_token_seconds_count"), GEN_SERIES("time_to_first_token_seconds_sum"),
        GEN_SERIES("time_per_output_token_seconds_count"), GEN_SERIES("time_per_output_token_seconds_sum"),
        GEN_SERIES("queue_wait_seconds_count"), GEN_SERIES("prompt_tokens_total"),
        GEN_SERIES("tokens_generated_total"),
    };
    enum { TTFT_N, TTFT_SUM, TPOT_N, TPOT_SUM, QUEUE_N, PROMPT, TOKENS, N_SERIES };
    double before[N_SERIES], after[N_SERIES];
    for (int i = 0; i < N_SERIES; i++)
        assert_true((before[i] = http_metric(s->port, series[i])) >= 0);
    const double t0 = now_s();
    cJSON_Delete(generate(s->port, "combo_lstm_lm", "\"max_tokens\": 6, \"seed\": 2"));
    const double took = now_s() - t0;
    cJSON_Delete(generate(s->port, "combo_lstm_lm", "\"max_tokens\": 1, \"seed\": 2"));
    for (int i = 0; i < N_SERIES; i++)
        after[i] = http_metric(s->port, series[i]) - before[i];
    assert_true(after[TTFT_N] == 2);
    assert_true(after[TTFT_SUM] > 0 && after[TTFT_SUM] < took + 10);
    assert_true(after[TPOT_N] == 1); /* the one-token generation has no interval */
    assert_true(after[TPOT_SUM] > 0 && after[TPOT_SUM] < took);
    assert_true(after[QUEUE_N] == 2);
    assert_true(after[PROMPT] == 2 * 8); /* "good day" */
    assert_true(after[TOKENS] == 7);
    assert_true(http_metric(s->port, GEN_SERIES("streams_running")) == 0);
#undef GEN_SERIES
}

/* "n" generations are each the one a request with its seed gives (seeds
 * following the first's), log-probabilities and all. */
static void test_generate_n(void **state)
{
    struct server *s = *state;
    cJSON *three = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 12, \"seed\": 7, \"n\": 3, \"logprobs\": true");
    const cJSON *results = cJSON_GetObjectItem(three, "results");
    assert_int_equal(cJSON_GetArraySize(results), 3);
    int differ = 0;
    for (int i = 0; i < 3; i++) {
        char more[96];
        snprintf(more, sizeof more, "\"max_tokens\": 12, \"seed\": %d, \"logprobs\": true", 7 + i);
        cJSON *one = generate(s->port, "combo_lstm_lm", more);
        const cJSON *got = cJSON_GetArrayItem(results, i);
        assert_string_equal(str_of(got, "text"), str_of(one, "text"));
        assert_int_equal(cJSON_GetObjectItem(got, "seed")->valueint, 7 + i);
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "logprobs")), 12);
        assert_true(logprob_of(cJSON_GetArrayItem(cJSON_GetObjectItem(got, "logprobs"), 11)) ==
                    logprob_of(cJSON_GetArrayItem(cJSON_GetObjectItem(one, "logprobs"), 11)));
        differ |= i > 0 && strcmp(str_of(got, "text"), str_of(cJSON_GetArrayItem(results, 0), "text")) != 0;
        cJSON_Delete(one);
    }
    assert_true(differ);
    cJSON_Delete(three);
    /* A prompt long enough for the prompt cache runs once: the others
     * start from its state, all in the turn after it (so the engine runs
     * one prefill and six steps), and give what they give alone. */
    const char *cached = "rrnserve_prompt_cache_tokens_total{model=\"combo_lstm_lm\"}",
               *calls = "rrnserve_batch_size_count{model=\"combo_lstm_lm\"}";
    const double cached0 = http_metric(s->port, cached), calls0 = http_metric(s->port, calls);
    char *body = body_with("combo_lstm_lm", "prompt", "twins, twins and more twins", "\"max_tokens\": 6, \"seed\": 3, \"n\": 4");
    cJSON *four = post(s->port, "/generate", 200, body);
    results = cJSON_GetObjectItem(four, "results");
    const int prompt_tokens = cJSON_GetObjectItem(cJSON_GetArrayItem(results, 0), "prompt_tokens")->valueint;
    assert_int_equal(prompt_tokens, 27);
    assert_true(http_metric(s->port, cached) - cached0 == 3 * prompt_tokens);
    for (int i = 0; i < 4; i++)
        assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(results, i), "cached_tokens")->valueint,
                         i ? prompt_tokens : 0);
    assert_true(http_metric(s->port, calls) - calls0 == 1 + 6);
    char *alone = body_with("combo_lstm_lm", "prompt", "twins, twins and more twins", "\"max_tokens\": 6, \"seed\": 6");
    cJSON *last = post(s->port, "/generate", 200, alone);
    assert_string_equal(str_of(last, "text"), str_of(cJSON_GetArrayItem(results, 3), "text"));
    cJSON_Delete(last);
    cJSON_Delete(four);
    free(alone);
    free(body);
    /* Without a seed, one is drawn and the others follow it. */
    cJSON *two = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 2, \"n\": 2");
    results = cJSON_GetObjectItem(two, "results");
    assert_true(cJSON_GetObjectItem(cJSON_GetArrayItem(results, 1), "seed")->valuedouble ==
                cJSON_GetObjectItem(cJSON_GetArrayItem(results, 0), "seed")->valuedouble + 1 ||
                cJSON_GetObjectItem(cJSON_GetArrayItem(results, 1), "seed")->valuedouble == 0);
    cJSON_Delete(two);
}

/* The completions API's shape of an answer, with what a /generate answer
 * with the same fields gives. */
static void check_completion(const cJSON *got, const cJSON *want, int index, const char *model)
{
    const cJSON *choice = cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), index);
    assert_int_equal(strncmp(str_of(got, "id"), "cmpl-", 5), 0);
    assert_string_equal(str_of(got, "object"), "text_completion");
    assert_string_equal(str_of(got, "model"), model);
    assert_true(fabs(cJSON_GetObjectItem(got, "created")->valuedouble - (double)time(NULL)) < 600);
    assert_int_equal(cJSON_GetObjectItem(choice, "index")->valueint, index);
    assert_string_equal(str_of(choice, "text"), str_of(want, "text"));
    assert_string_equal(str_of(choice, "finish_reason"), str_of(want, "finish_reason"));
}

/* POST /v1/completions: OpenAI's completions API over the same generation,
 * so a client of that API gets what /generate gives: texts, n, logprobs
 * with their alternatives, usage, a stream of chunks; and what it cannot
 * do is refused by name.  GET /v1/models lists the models. */
static void test_completions(void **state)
{
    struct server *s = *state;
    /* The API's default max_tokens is 16. */
    char *body = body_with("combo_lstm_lm", "prompt", "good day", "\"seed\": 7, \"n\": 2, \"logprobs\": 2");
    cJSON *got = post(s->port, "/v1/completions", 200, body);
    const cJSON *usage = cJSON_GetObjectItem(got, "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "prompt_tokens")->valueint, 8);
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 2 * 16);
    assert_int_equal(cJSON_GetObjectItem(usage, "total_tokens")->valueint, 8 + 2 * 16);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "choices")), 2);
    for (int i = 0; i < 2; i++) {
        char more[128];
        snprintf(more, sizeof more, "\"max_tokens\": 16, \"seed\": %d, \"logprobs\": true, \"top_logprobs\": 2", 7 + i);
        cJSON *want = generate(s->port, "combo_lstm_lm", more);
        check_completion(got, want, i, "combo_lstm_lm");
        const cJSON *lp = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), i), "logprobs");
        const cJSON *tokens = cJSON_GetObjectItem(lp, "tokens"), *lps = cJSON_GetObjectItem(lp, "token_logprobs"),
                    *tops = cJSON_GetObjectItem(lp, "top_logprobs"), *w = cJSON_GetObjectItem(want, "logprobs")->child;
        assert_int_equal(cJSON_GetArraySize(tokens), 16);
        assert_int_equal(cJSON_GetArraySize(lps), 16);
        assert_int_equal(cJSON_GetArraySize(tops), 16);
        for (int k = 0; k < 16; k++, w = w->next) {
            assert_string_equal(cJSON_GetArrayItem(tokens, k)->valuestring, str_of(w, "token"));
            assert_true(cJSON_GetArrayItem(lps, k)->valuedouble == logprob_of(w));
            const cJSON *top = cJSON_GetArrayItem(tops, k), *wt = cJSON_GetObjectItem(w, "top_logprobs");
            assert_int_equal(cJSON_GetArraySize(top), 2);
            for (const cJSON *t = wt->child; t; t = t->next)
                assert_true(cJSON_GetObjectItem(top, str_of(t, "token"))->valuedouble == logprob_of(t));
        }
        cJSON_Delete(want);
    }
    cJSON_Delete(got);
    free(body);

    /* The answer's id is the request's. */
    struct http_resp idr;
    http_must_request(s->port, "POST", "/v1/completions", "X-Request-Id: trace-42\r\n",
                      "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"max_tokens\": 1}", &idr);
    got = json_of(&idr);
    assert_string_equal(str_of(got, "id"), "cmpl-trace-42");
    cJSON_Delete(got);
    http_resp_free(&idr);

    /* Without logprobs, null; a prompt as an array of one string. */
    got = post(s->port, "/v1/completions", 200,
               "{\"model\": \"combo_lstm_lm\", \"prompt\": [\"good day\"], \"max_tokens\": 25, \"seed\": 11, "
               "\"presence_penalty\": 0, \"best_of\": 1, \"echo\": false, \"logit_bias\": {}}");
    cJSON *want = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 25, \"seed\": 11");
    check_completion(got, want, 0, "combo_lstm_lm");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), 0), "logprobs")));

    /* Streamed: a chunk a token, one with the finish reason, the usage
     * when asked for, and [DONE]. */
    struct http_resp r;
    http_must_request(s->port, "POST", "/v1/completions", "",
                      "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"max_tokens\": 25, \"seed\": 11, "
                      "\"stream\": true, \"stream_options\": {\"include_usage\": true}}",
                      &r);
    assert_int_equal(r.status, 200);
    struct buf joined = {0};
    int chunks = 0, usages = 0, done = 0;
    const char *finish = NULL;
    cJSON *events = cJSON_CreateArray();
    for (const char *p = r.body.p; (p = strstr(p, "data: ")); p += 6) {
        const char *end = strstr(p, "\n\n");
        assert_non_null(end);
        assert_false(done);
        if (strncmp(p + 6, "[DONE]", 6) == 0) {
            done = 1;
            continue;
        }
        cJSON *e = cJSON_ParseWithLength(p + 6, (size_t)(end - p - 6));
        assert_non_null(e);
        cJSON_AddItemToArray(events, e);
        assert_string_equal(str_of(e, "id"), str_of(events->child, "id"));
        const cJSON *choice = cJSON_GetArrayItem(cJSON_GetObjectItem(e, "choices"), 0);
        if (!choice) {
            usages++;
            assert_non_null(finish);
            assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(e, "usage"), "completion_tokens")->valueint, 25);
            continue;
        }
        assert_null(finish);
        assert_int_equal(usages, 0);
        buf_add(&joined, str_of(choice, "text"), strlen(str_of(choice, "text")));
        if (cJSON_IsString(cJSON_GetObjectItem(choice, "finish_reason")))
            finish = str_of(choice, "finish_reason");
        else
            chunks++;
    }
    assert_true(done);
    assert_int_equal(chunks, 25);
    assert_int_equal(usages, 1);
    assert_string_equal(finish, "length");
    assert_string_equal(joined.p, str_of(want, "text"));
    free(joined.p);
    cJSON_Delete(events);
    http_resp_free(&r);
    cJSON_Delete(want);
    cJSON_Delete(got);

    /* What the API has and the server does not do. */
    static const struct {
        const char *more;
        int status;
        const char *mention;
    } refused[] = {
        {"\"max_tokens\": 0", 422, "\"max_tokens\""},
        {"\"echo\": 1", 400, "\"echo\""},
        {"\"suffix\": \"end\"", 422, "\"suffix\""},
        {"\"presence_penalty\": 0.5", 422, "\"presence_penalty\""},
        {"\"frequency_penalty\": -1", 422, "\"frequency_penalty\""},
        {"\"logit_bias\": {\"1\": 5}", 422, "\"logit_bias\""},
        {"\"best_of\": 2", 422, "\"best_of\""},
        {"\"logprobs\": 21", 422, "\"logprobs\""},
        {"\"logprobs\": true", 400, "\"logprobs\""},
        {"\"stream_options\": 1", 400, "\"stream_options\""},
        {"\"stream_options\": {\"include_usage\": 1}", 400, "\"include_usage\""},
        {"\"n\": 2, \"stream\": true", 422, "\"n\""},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        char *b = body_with("combo_lstm_lm", "prompt", "good day", refused[i].more);
        expect_error(s->port, "POST", "/v1/completions", "", b, refused[i].status, refused[i].mention);
        free(b);
    }
    expect_error(s->port, "POST", "/v1/completions", "",
                 "{\"model\": \"combo_lstm_lm\", \"prompt\": [\"a\", \"b\"], \"stream\": true}", 422, "prompts");
    expect_error(s->port, "POST", "/v1/completions", "", "{\"model\": \"combo_lstm_lm\", \"prompt\": []}", 422,
                 "\"prompt\"");
    expect_error(s->port, "POST", "/v1/completions", "", "{\"model\": \"combo_lstm_lm\", \"prompt\": [\"a\", 1]}",
                 400, "\"prompt[1]\"");
    expect_error(s->port, "POST", "/v1/completions", "", "{\"model\": \"combo_lstm_lm\", \"prompt\": [\"a\", \"\"]}",
                 422, "\"prompt[1]\"");
    expect_error(s->port, "POST", "/v1/completions", "", "{\"model\": \"rra_dynamic_w3_l2_bi\", \"prompt\": \"a\"}",
                 422, "/v1/completions");
    expect_error(s->port, "GET", "/v1/completions", "", NULL, 405, NULL);
    assert_true(http_metric(s->port, "rrnserve_requests_total{endpoint=\"/v1/completions\",status=\"200\"}") >= 3);

    cJSON *models = get(s->port, "/v1/models", 200);
    assert_string_equal(str_of(models, "object"), "list");
    int found = 0;
    for (const cJSON *m = cJSON_GetObjectItem(models, "data")->child; m; m = m->next) {
        assert_string_equal(str_of(m, "object"), "model");
        assert_string_equal(str_of(m, "owned_by"), "rrnserve");
        assert_true(cJSON_GetObjectItem(m, "created")->valuedouble > 0);
        found += strcmp(str_of(m, "id"), "combo_lstm_lm") == 0;
    }
    assert_int_equal(found, 1);
    cJSON_Delete(models);
}

/* A choice's logprobs lists, and the number of tokens they hold. */
static int choice_logprobs(const cJSON *got, int index, const cJSON **tokens, const cJSON **lps, const cJSON **tops)
{
    const cJSON *lp = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), index), "logprobs");
    *tokens = cJSON_GetObjectItem(lp, "tokens");
    *lps = cJSON_GetObjectItem(lp, "token_logprobs");
    *tops = cJSON_GetObjectItem(lp, "top_logprobs");
    assert_int_equal(cJSON_GetArraySize(*lps), cJSON_GetArraySize(*tokens));
    return cJSON_GetArraySize(*tokens);
}

/* A completions stream: its events' texts joined, and its first event. */
static char *streamed_completion(int port, const char *body, cJSON **first)
{
    struct http_resp r;
    http_must_request(port, "POST", "/v1/completions", "", body, &r);
    assert_int_equal(r.status, 200);
    struct buf joined = {0};
    buf_add(&joined, "", 0);
    *first = NULL;
    for (const char *p = r.body.p; (p = strstr(p, "data: ")) && strncmp(p + 6, "[DONE]", 6) != 0; p += 6) {
        const char *end = strstr(p, "\n\n");
        assert_non_null(end);
        cJSON *e = cJSON_ParseWithLength(p + 6, (size_t)(end - p - 6));
        assert_non_null(e);
        const cJSON *choice = cJSON_GetArrayItem(cJSON_GetObjectItem(e, "choices"), 0);
        if (choice)
            buf_add(&joined, str_of(choice, "text"), strlen(str_of(choice, "text")));
        if (*first)
            cJSON_Delete(e);
        else
            *first = e;
    }
    http_resp_free(&r);
    return joined.p;
}

/* The text_offset lists of a completion (choice 0, or a stream's events
 * in order) into offs, at most max: how many; *text, its text (the
 * stream's events' joined), to be freed. */
static int text_offsets(int port, const char *body, long *offs, int max, char **text)
{
    struct http_resp r;
    http_must_request(port, "POST", "/v1/completions", "", body, &r);
    if (r.status != 200)
        fail_msg("%s: %d %s", body, r.status, r.body.p);
    struct buf joined = {0};
    buf_add(&joined, "", 0);
    int n = 0;
    const int stream = strstr(body, "\"stream\": true") != NULL;
    const char *p = r.body.p;
    for (const char *end = NULL; stream ? (p = strstr(p, "data: ")) && strncmp(p + 6, "[DONE]", 6) != 0 : !end;
         p = end) {
        if (stream)
            p += 6;
        end = stream ? strstr(p, "\n\n") : p + strlen(p);
        assert_non_null(end);
        cJSON *o = cJSON_ParseWithLength(p, (size_t)(end - p));
        assert_non_null(o);
        const cJSON *choice = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
        if (choice)
            buf_add(&joined, str_of(choice, "text"), strlen(str_of(choice, "text")));
        const cJSON *list = cJSON_GetObjectItem(cJSON_GetObjectItem(choice, "logprobs"), "text_offset");
        for (const cJSON *v = list ? list->child : NULL; v; v = v->next) {
            assert_true(n < max);
            offs[n++] = (long)v->valuedouble;
        }
        cJSON_Delete(o);
    }
    http_resp_free(&r);
    *text = joined.p;
    return n;
}

/* The completion of body as a whole answer and as a stream, with and
 * without echo: the same offsets each way, the echo's first the prompt's
 * tokens' and then the same completion's (counted from the prompt's start
 * either way, as the completions API counts them).  body ends just before
 * its closing brace.  The echoed offsets go to offs; how many. */
static int offsets_every_way(int port, const char *body, int prompt_tokens, long *offs, int max, char **text)
{
    long other[64];
    char full[512], *t;
    assert_true(max <= 64);
    snprintf(full, sizeof full, "%s, \"echo\": true}", body);
    const int n = text_offsets(port, full, offs, max, text);
    snprintf(full, sizeof full, "%s, \"echo\": true, \"stream\": true}", body);
    assert_int_equal(text_offsets(port, full, other, 64, &t), n);
    assert_string_equal(t, *text);
    assert_memory_equal(other, offs, sizeof *offs * (size_t)n);
    free(t);
    for (int stream = 0; stream < 2; stream++) {
        snprintf(full, sizeof full, "%s%s}", body, stream ? ", \"stream\": true" : "");
        assert_int_equal(text_offsets(port, full, other, 64, &t), n - prompt_tokens);
        assert_memory_equal(other, offs + prompt_tokens, sizeof *offs * (size_t)(n - prompt_tokens));
        free(t);
    }
    return n;
}

/* A completion cut by stop strings, streamed or not, has the text of
 * /generate's answer, cut before the stop string that begins first (both
 * taken from the same seed's text run on, ending at its ninth byte, in a
 * word of the word model's, listed shorter first); the stream's pieces hold
 * no part of a stop string, and the logprobs list the tokens of the text
 * alone, the same streamed (offsets_every_way). */
static void test_completions_stop(void **state)
{
    struct server *s = *state;
    static const char *const models[] = {"combo_lstm_lm", "tok_word_lm"};
    for (int m = 0; m < 2; m++) {
        cJSON *run_on = generate(s->port, models[m], "\"max_tokens\": 30, \"seed\": 13");
        const char *text = str_of(run_on, "text");
        assert_true(strlen(text) > 12 && !strpbrk(text, "\"\\"));
        char stops[2][4] = {{text[6], text[7], text[8], 0}, {text[7], text[8], 0}};
        size_t cut = strlen(text);
        for (int k = 0; k < 2; k++)
            if ((size_t)(strstr(text, stops[k]) - text) < cut)
                cut = (size_t)(strstr(text, stops[k]) - text);
        assert_true(cut > 0);
        char more[160], body[320], *streamed, *t;
        snprintf(more, sizeof more, "\"max_tokens\": 30, \"seed\": 13, \"stop\": [\"%s\", \"%s\"]", stops[1], stops[0]);
        cJSON *want = generate(s->port, models[m], more);
        assert_string_equal(str_of(want, "finish_reason"), "stop");
        assert_int_equal(strlen(str_of(want, "text")), cut);
        assert_memory_equal(str_of(want, "text"), text, cut);
        snprintf(body, sizeof body, "{\"model\": \"%s\", \"prompt\": \"good day\", %s, \"stream\": true}", models[m],
                 more);
        cJSON *first;
        streamed = streamed_completion(s->port, body, &first);
        assert_string_equal(streamed, str_of(want, "text"));
        cJSON_Delete(first);
        free(streamed);
        snprintf(body, sizeof body, "{\"model\": \"%s\", \"prompt\": \"good day\", %s, \"logprobs\": 0", models[m],
                 more);
        long offs[64];
        const int prompt = cJSON_GetObjectItem(want, "prompt_tokens")->valueint;
        const int n = offsets_every_way(s->port, body, prompt, offs, 64, &t);
        const long base = (long)strlen("good day") + (m == 1);
        if (n - prompt < 1 || n - prompt > cJSON_GetObjectItem(want, "tokens")->valueint)
            fail_msg("%s: %d tokens listed of %d", models[m], n - prompt, cJSON_GetObjectItem(want, "tokens")->valueint);
        if (offs[n - 1] >= base + (long)cut)
            fail_msg("%s: a token listed at %ld, past the text's end at %ld", models[m], offs[n - 1], base + (long)cut);
        free(t);
        cJSON_Delete(want);
        cJSON_Delete(run_on);
    }
}

/* Code point i of UTF-8 text: where it starts. */
static const char *code_point(const char *text, long i)
{
    for (; *text && i > 0; text++)
        i -= ((unsigned char)text[1] & 0xC0) != 0x80;
    return text;
}

/* text_offset: where each token begins in the text, in characters (code
 * points), from the prompt's start: a character model's tokens each one
 * character on; a word model's at each word (lower-cased, as its tokens
 * are); a byte model's bytes of a character all at the character. */
static void test_completions_text_offset(void **state)
{
    struct server *s = *state;
    long offs[64];
    char *text;
    /* é is not in the model's vocabulary (its unk), 😀 neither. */
    int n = offsets_every_way(s->port,
                              "{\"model\": \"combo_lstm_lm\", \"prompt\": \"h\\u00e9llo \\ud83d\\ude00 day\", "
                              "\"max_tokens\": 8, \"seed\": 3, \"logprobs\": 0",
                              11, offs, 64, &text);
    assert_int_equal(n, 11 + 8);
    for (int i = 0; i < n; i++)
        assert_int_equal(offs[i], i);
    free(text);

    n = offsets_every_way(s->port,
                          "{\"model\": \"tok_word_lm\", \"prompt\": \"Hello, the World\", \"max_tokens\": 5, "
                          "\"seed\": 1, \"logprobs\": 1",
                          3, offs, 64, &text);
    assert_int_equal(n, 3 + 5);
    assert_int_equal(offs[0], 0);
    assert_int_equal(offs[1], 7);
    assert_int_equal(offs[2], 11);
    cJSON *got = post(s->port, "/v1/completions", 200,
                      "{\"model\": \"tok_word_lm\", \"prompt\": \"Hello, the World\", \"max_tokens\": 5, "
                      "\"seed\": 1, \"logprobs\": 1, \"echo\": true}");
    const cJSON *tokens, *lps, *tops;
    assert_int_equal(choice_logprobs(got, 0, &tokens, &lps, &tops), n);
    for (int i = 0; i < n; i++) {
        const char *word = cJSON_GetArrayItem(tokens, i)->valuestring, *at = code_point(text, offs[i]);
        if (strncasecmp(at, word, strlen(word)) != 0)
            fail_msg("token %d \"%s\" at %ld of \"%s\": \"%s\"", i, word, offs[i], text, at);
    }
    cJSON_Delete(got);
    free(text);
}

/* A completions request of n prompts "a", with more fields before them. */
static char *many_prompts(const char *more, int n)
{
    struct buf body = {0};
    buf_printf(&body, "{\"model\": \"combo_lstm_lm\", \"max_tokens\": 1, %s\"prompt\": [\"a\"", more);
    for (int i = 1; i < n; i++)
        buf_printf(&body, ", \"a\"");
    buf_printf(&body, "]}");
    return body.p;
}

/* The completions API as evaluation harnesses use it: several prompts in
 * one request, each choice what its own request gives; "echo", the prompt
 * before the completion with its tokens' log-probabilities (the first
 * null: nothing predicts it) equal to /score's, alternatives included;
 * and max_tokens 0 with echo, the prompts scored alone. */
static void test_completions_echo_and_prompts(void **state)
{
    struct server *s = *state;
    static const char *const prompts[] = {"good day", "the "};
    cJSON *got = post(s->port, "/v1/completions", 200,
                      "{\"model\": \"combo_lstm_lm\", \"prompt\": [\"good day\", \"the \"], \"n\": 2, \"seed\": 7, "
                      "\"max_tokens\": 5, \"logprobs\": 1}");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "choices")), 4);
    int prompt_tokens = 0;
    for (int c = 0; c < 4; c++) {
        char more[160];
        snprintf(more, sizeof more, "\"max_tokens\": 5, \"seed\": %d, \"logprobs\": true, \"top_logprobs\": 1", 7 + c % 2);
        char *body = body_with("combo_lstm_lm", "prompt", prompts[c / 2], more);
        cJSON *want = post(s->port, "/generate", 200, body);
        check_completion(got, want, c, "combo_lstm_lm");
        const cJSON *tokens, *lps, *tops;
        assert_int_equal(choice_logprobs(got, c, &tokens, &lps, &tops), 5);
        const cJSON *w = cJSON_GetObjectItem(want, "logprobs")->child;
        for (int k = 0; k < 5; k++, w = w->next)
            assert_true(cJSON_GetArrayItem(lps, k)->valuedouble == logprob_of(w));
        prompt_tokens += c % 2 ? 0 : cJSON_GetObjectItem(want, "prompt_tokens")->valueint;
        cJSON_Delete(want);
        free(body);
    }
    const cJSON *usage = cJSON_GetObjectItem(got, "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "prompt_tokens")->valueint, prompt_tokens);
    assert_int_equal(prompt_tokens, 8 + 4);
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 4 * 5);
    cJSON_Delete(got);

    /* echo: the prompt's text and tokens, then the completion's. */
    got = post(s->port, "/v1/completions", 200,
               "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"echo\": true, \"max_tokens\": 6, "
               "\"seed\": 3, \"logprobs\": 2}");
    cJSON *want = generate(s->port, "combo_lstm_lm", "\"max_tokens\": 6, \"seed\": 3, \"logprobs\": true, \"top_logprobs\": 2");
    char *score_body = body_with("combo_lstm_lm", "text", "good day", "\"logprobs\": true, \"top_logprobs\": 2");
    cJSON *scored = post(s->port, "/score", 200, score_body);
    const cJSON *choice = cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), 0);
    char text[64];
    snprintf(text, sizeof text, "good day%s", str_of(want, "text"));
    assert_string_equal(str_of(choice, "text"), text);
    const cJSON *tokens, *lps, *tops;
    assert_int_equal(choice_logprobs(got, 0, &tokens, &lps, &tops), 8 + 6);
    assert_string_equal(cJSON_GetArrayItem(tokens, 0)->valuestring, "g");
    assert_true(cJSON_IsNull(cJSON_GetArrayItem(lps, 0)) && cJSON_IsNull(cJSON_GetArrayItem(tops, 0)));
    const cJSON *w = cJSON_GetObjectItem(scored, "logprobs")->child;
    for (int k = 1; k < 8 + 6; k++, w = w->next) {
        if (k == 8)
            w = cJSON_GetObjectItem(want, "logprobs")->child; /* the completion's */
        assert_string_equal(cJSON_GetArrayItem(tokens, k)->valuestring, str_of(w, "token"));
        assert_true(cJSON_GetArrayItem(lps, k)->valuedouble == logprob_of(w));
        const cJSON *top = cJSON_GetArrayItem(tops, k);
        assert_int_equal(cJSON_GetArraySize(top), 2);
        for (const cJSON *t = cJSON_GetObjectItem(w, "top_logprobs")->child; t; t = t->next)
            assert_true(cJSON_GetObjectItem(top, str_of(t, "token"))->valuedouble == logprob_of(t));
    }
    assert_null(w);
    /* Streamed: the prompt first, its tokens' log-probabilities with it,
     * then the completion's, joined as the whole answer's text. */
    cJSON *first;
    char *joined = streamed_completion(s->port,
                                       "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"echo\": true, "
                                       "\"max_tokens\": 6, \"seed\": 3, \"logprobs\": 2, \"stream\": true}",
                                       &first);
    assert_string_equal(joined, text);
    const cJSON *first_tokens, *first_lps, *first_tops;
    assert_int_equal(choice_logprobs(first, 0, &first_tokens, &first_lps, &first_tops), 8);
    assert_true(cJSON_IsNull(first_lps->child));
    for (int k = 1; k < 8; k++)
        assert_true(cJSON_GetArrayItem(first_lps, k)->valuedouble == cJSON_GetArrayItem(lps, k)->valuedouble);
    free(joined);
    cJSON_Delete(first);
    cJSON_Delete(scored);
    free(score_body);
    cJSON_Delete(want);
    cJSON_Delete(got);

    /* max_tokens 0: each prompt scored, its terms adding up to /score's;
     * a word model's echo keeps its prompt as given. */
    got = post(s->port, "/v1/completions", 200,
               "{\"model\": \"combo_lstm_lm\", \"prompt\": [\"good day\", \"the \"], \"echo\": true, \"max_tokens\": 0, "
               "\"logprobs\": 0}");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "choices")), 2);
    for (int c = 0; c < 2; c++) {
        choice = cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), c);
        assert_string_equal(str_of(choice, "text"), prompts[c]);
        assert_string_equal(str_of(choice, "finish_reason"), "length");
        const int n = choice_logprobs(got, c, &tokens, &lps, &tops);
        assert_int_equal(n, (int)strlen(prompts[c]));
        assert_true(cJSON_IsNull(tops));
        double sum = 0;
        for (const cJSON *l = lps->child->next; l; l = l->next)
            sum += l->valuedouble;
        const double want_lp = score_of(s->port, prompts[c]);
        assert_true(fabs(sum - want_lp) <= 1e-6 * fabs(want_lp));
    }
    usage = cJSON_GetObjectItem(got, "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "prompt_tokens")->valueint, 12);
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 0);
    /* Streamed, max_tokens 0 is the prompt's event, the end's and the
     * usage's. */
    struct http_resp sr;
    http_must_request(s->port, "POST", "/v1/completions", "",
                      "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"echo\": true, \"max_tokens\": 0, "
                      "\"logprobs\": 0, \"stream\": true, \"stream_options\": {\"include_usage\": true}}",
                      &sr);
    assert_int_equal(sr.status, 200);
    char type[64];
    assert_non_null(http_header(&sr, "Content-Type", type, sizeof type));
    assert_string_equal(type, "text/event-stream");
    const char *ev = strstr(sr.body.p, "data: ");
    const char *end = ev ? strstr(ev, "\n\n") : NULL;
    assert_non_null(end);
    cJSON *prompt_event = cJSON_ParseWithLength(ev + 6, (size_t)(end - ev - 6));
    assert_int_equal(choice_logprobs(prompt_event, 0, &tokens, &lps, &tops), 8);
    assert_string_equal(str_of(cJSON_GetArrayItem(cJSON_GetObjectItem(prompt_event, "choices"), 0), "text"), "good day");
    const cJSON *whole_tokens, *whole_lps, *whole_tops;
    assert_int_equal(choice_logprobs(got, 0, &whole_tokens, &whole_lps, &whole_tops), 8);
    for (int k = 1; k < 8; k++)
        assert_true(cJSON_GetArrayItem(lps, k)->valuedouble == cJSON_GetArrayItem(whole_lps, k)->valuedouble);
    cJSON_Delete(prompt_event);
    assert_non_null(strstr(end, "\"choices\":[{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\"}]}"));
    assert_non_null(strstr(end, "\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":0,"));
    assert_non_null(strstr(end, "\n\ndata: [DONE]\n\n"));
    http_resp_free(&sr);
    cJSON_Delete(got);
    got = post(s->port, "/v1/completions", 200,
               "{\"model\": \"tok_word_lm\", \"prompt\": \"Hello world\", \"echo\": true, \"max_tokens\": 3, \"seed\": 1}");
    char *word_body = body_with("tok_word_lm", "prompt", "Hello world", "\"max_tokens\": 3, \"seed\": 1");
    want = post(s->port, "/generate", 200, word_body);
    free(word_body);
    snprintf(text, sizeof text, "Hello world %s", str_of(want, "text"));
    assert_string_equal(str_of(cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), 0), "text"), text);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(got, "choices"), 0), "logprobs")));
    joined = streamed_completion(s->port,
                                 "{\"model\": \"tok_word_lm\", \"prompt\": \"Hello world\", \"echo\": true, "
                                 "\"max_tokens\": 3, \"seed\": 1, \"stream\": true}",
                                 &first);
    assert_string_equal(joined, text);
    free(joined);
    cJSON_Delete(first);
    cJSON_Delete(want);
    cJSON_Delete(got);

    /* How many: 256 prompts at most, and prompts times n as many; at
     * either limit, a choice for each. */
    static const struct {
        const char *more;
        int prompts, status;
        const char *mention;
    } many[] = {{"", 256, 200, NULL},
                {"", 257, 422, "\"prompt\""},
                {"\"n\": 16, ", 16, 200, NULL},
                {"\"n\": 16, ", 17, 422, "17 prompts of 16"}};
    for (size_t i = 0; i < sizeof many / sizeof *many; i++) {
        char *body = many_prompts(many[i].more, many[i].prompts);
        if (many[i].status == 200) {
            got = post(s->port, "/v1/completions", 200, body);
            assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "choices")), 256);
            cJSON_Delete(got);
        } else {
            expect_error(s->port, "POST", "/v1/completions", "", body, many[i].status, many[i].mention);
        }
        free(body);
    }
}

static void test_routing_errors(void **state)
{
    struct server *s = *state;
    struct http_resp r;
    char allow[64];
    expect_error(s->port, "GET", "/nope", "", NULL, 404, "/nope");
    expect_error(s->port, "GET", "/index.html", "", NULL, 404, NULL);
    expect_error(s->port, "POST", "/", "", "{}", 405, "GET");
    expect_error(s->port, "POST", "/classify/extra", "", "{}", 404, NULL);
    http_must_request(s->port, "GET", "/classify", "", NULL, &r);
    check_error(&r, 405, "POST");
    assert_string_equal(http_header(&r, "Allow", allow, sizeof allow), "POST");
    http_resp_free(&r);
    http_must_request(s->port, "POST", "/models", "", "{}", &r);
    check_error(&r, 405, "GET");
    assert_string_equal(http_header(&r, "Allow", allow, sizeof allow), "GET, HEAD");
    http_resp_free(&r);
    expect_error(s->port, "DELETE", "/healthz", "", NULL, 405, NULL);
    /* An escaped NUL is no end of the path: these are no endpoints. */
    expect_error(s->port, "GET", "/healthz%00junk", "", NULL, 404, "/healthz?junk");
    expect_error(s->port, "GET", "/metrics%00", "", NULL, 404, "/metrics?");
    expect_error(s->port, "GET", "/v1/models%00/extra", "", NULL, 404, "/v1/models?/extra");
    assert_int_equal(server_wait_log(s, "GET /healthz?junk 404", 1), 1);
    /* A path's control characters (decoded from %0d%0a, %7f, and C1's
     * CSI, %c2%9b) are logged as '?', so that a request cannot write a log
     * line of its own or drive a terminal, as is each byte that is not
     * UTF-8; a long path is logged cut to 127 bytes, between characters. */
    expect_error(s->port, "GET", "/x%0d%0aGET%20/forged%20200%7f%c2%9b31m%ff", "", NULL, 404, NULL);
    assert_int_equal(server_wait_log(s, "GET /x??GET /forged 200??31m? 404", 1), 1);
    struct buf euros = {0};
    buf_printf(&euros, "/x");
    for (int i = 0; i < 50; i++)
        buf_printf(&euros, "%%e2%%82%%ac");
    expect_error(s->port, "GET", euros.p, "", NULL, 404, NULL);
    free(euros.p);
    assert_int_equal(server_wait_log(s, "GET /x" EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 "\xE2\x82\xAC 404", 1),
                     1);
    char path[302] = "/", logged[160];
    memset(path + 1, 'a', 300);
    path[301] = 0;
    expect_error(s->port, "GET", path, "", NULL, 404, NULL);
    snprintf(logged, sizeof logged, "GET %.127s 404", path);
    assert_int_equal(server_wait_log(s, logged, 1), 1);
}

/* Sends raw bytes on one connection and reads to its end. */
static void raw_exchange(int port, const char *bytes, struct buf *raw)
{
    int fd = http_connect(port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    assert_int_equal(http_send_all(fd, bytes, strlen(bytes)), 0);
    assert_true(http_read_all(fd, raw));
    close(fd);
    assert_non_null(raw->p);
}

/* HEAD answers as GET without the body (load balancers check health with
 * it); a POST endpoint refuses it. */
static void test_head(void **state)
{
    struct server *s = *state;
    struct buf raw = {0};
    raw_exchange(s->port, "HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", &raw);
    const char *end = strstr(raw.p, "\r\n\r\n");
    if (strncmp(raw.p, "HTTP/1.1 200", 12) != 0 || !end || end[4] || !strstr(raw.p, "Content-Length: 15\r\n"))
        fail_msg("HEAD /healthz:\n%s", raw.p);
    raw.len = 0;
    raw_exchange(s->port, "HEAD /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", &raw);
    if (strncmp(raw.p, "HTTP/1.1 405", 12) != 0 || !strstr(raw.p, "Allow: POST\r\n"))
        fail_msg("HEAD /classify:\n%s", raw.p);
    free(raw.p);
    assert_int_equal(server_wait_log(s, "HEAD /healthz 200", 1), 1);
}

/* A body two parsers could frame two ways (a proxy in front and this
 * server: how requests are smuggled past a proxy) is refused with 400,
 * and the connection closed, so the bytes after it are not read as a
 * request of their own; so are two Host headers, or none in HTTP/1.1,
 * and a coding the server cannot undo (501).  The same length twice is
 * no ambiguity, a target in absolute form is served as its path, and
 * HTTP/1.0 needs no Host. */
static void test_ambiguous_framing(void **state)
{
    struct server *s = *state;
    static const char body[] = "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good day!\"}";
    const size_t n = strlen(body);
    static const struct {
        const char *framing, *want, *why;
    } cases[] = {
        {"Content-Length: %zu\r\nContent-Length: 5\r\n\r\n%s", "400 Bad Request", "Content-Length headers disagree"},
        {"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n%zx\r\n%s\r\n0\r\n\r\n", "400 Bad Request",
         "both Content-Length and Transfer-Encoding"},
        {"Content-Length : %zu\r\n\r\n%s", "400 Bad Request", "name holds white space"},
        {"Transfer-Encoding: gzip, chunked\r\n\r\n%zx\r\n%s\r\n0\r\n\r\n", "501 Not Implemented",
         "only Transfer-Encoding understood is chunked"},
        {"Host: 127.0.0.2\r\nContent-Length: %zu\r\n\r\n%s", "400 Bad Request", "needs one Host header"},
    };
    char req[2048], framing[512], next[512];
    snprintf(next, sizeof next, "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %zu\r\n\r\n%s", n,
             body);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(framing, sizeof framing, cases[i].framing, n, body);
        snprintf(req, sizeof req, "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s", framing, next);
        struct buf raw = {0};
        raw_exchange(s->port, req, &raw);
        if (strncmp(raw.p + 9, cases[i].want, strlen(cases[i].want)) != 0 || !strstr(raw.p, cases[i].why) ||
            strstr(raw.p, "HTTP/1.1 200"))
            fail_msg("%s:\n%s", cases[i].why, raw.p);
        free(raw.p);
    }
    static const char no_host[] = "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n";
    struct http_resp refused;
    assert_int_equal(http_raw_request(s->port, no_host, strlen(no_host), &refused), 0);
    check_error(&refused, 400, "needs one Host header");
    http_resp_free(&refused);
    static const char *const fine[] = {
        "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %zu\r\nContent-Length: %zu\r\n",
        "POST http://127.0.0.1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %zu\r\n",
        "POST /classify HTTP/1.0\r\nContent-Length: %zu\r\n",
    };
    for (size_t i = 0; i < sizeof fine / sizeof *fine; i++) {
        int len = snprintf(req, sizeof req, fine[i], n, n);
        assert_true(len > 0);
        snprintf(req + len, sizeof req - (size_t)len, "Connection: close\r\n\r\n%s", body);
        struct http_resp r;
        assert_int_equal(http_raw_request(s->port, req, strlen(req), &r), 0);
        if (r.status != 200)
            fail_msg("%s: %d %s", fine[i], r.status, r.body.p);
        http_resp_free(&r);
    }
}

/* The X-Request-Id a request is answered with, into id; fails unless the
 * status is `status` and the request's log line carries the id. */
static void request_id_of(struct server *s, const char *method, const char *path, const char *headers,
                          const char *body, int status, char id[REQUEST_ID_MAX + 1])
{
    struct http_resp r;
    http_must_request(s->port, method, path, headers, body, &r);
    if (r.status != status)
        fail_msg("%s %s: status %d, not %d: %s", method, path, r.status, status, r.body.p);
    if (!http_header(&r, REQUEST_ID_HEADER, id, REQUEST_ID_MAX + 1)[0])
        fail_msg("%s %s: no %s header in\n%s", method, path, REQUEST_ID_HEADER, r.head);
    http_resp_free(&r);
    char line[REQUEST_ID_MAX + 8];
    snprintf(line, sizeof line, "id=%s\n", id);
    assert_int_equal(server_wait_log(s, line, 1), 1);
}

static int made_here(const char *id)
{
    return strlen(id) == 32 && strspn(id, "0123456789abcdef") == 32;
}

static void test_request_ids(void **state)
{
    struct server *s = *state;
    char id[REQUEST_ID_MAX + 1], other[REQUEST_ID_MAX + 1], headers[REQUEST_ID_MAX + 64];
    char *classify = body_with("plain_lstm_l2_bi_last", "text", "good day!", NULL);
    char *stream = body_with("combo_lstm_lm", "prompt", "the ", "\"max_tokens\": 3, \"stream\": true");

    /* Kept as sent: on a success, a stream, an error. */
    request_id_of(s, "POST", "/classify", "X-Request-Id: trace-7f3a:1/2\r\n", classify, 200, id);
    assert_string_equal(id, "trace-7f3a:1/2");
    request_id_of(s, "POST", "/generate", "x-request-id: Root=1-67891233-abcdef\r\n", stream, 200, id);
    assert_string_equal(id, "Root=1-67891233-abcdef");
    request_id_of(s, "GET", "/nope", "X-Request-Id: lost-1\r\n", NULL, 404, id);
    assert_string_equal(id, "lost-1");
    request_id_of(s, "GET", "/models", "X-Request-Id: !visible~\r\n", NULL, 200, id); /* ASCII's ends */
    assert_string_equal(id, "!visible~");
    memset(id, 'x', REQUEST_ID_MAX);
    id[REQUEST_ID_MAX] = 0;
    snprintf(headers, sizeof headers, "X-Request-Id: %s\r\n", id);
    request_id_of(s, "GET", "/models", headers, NULL, 200, other);
    assert_string_equal(other, id);

    /* Made here when absent, a new one each time. */
    request_id_of(s, "GET", "/models", "", NULL, 200, id);
    request_id_of(s, "GET", "/models", "", NULL, 200, other);
    assert_true(made_here(id) && made_here(other));
    assert_string_not_equal(id, other);

    /* Made here in place of ids that could break a log line or a header. */
    static const char *const implausible[] = {
        "X-Request-Id: two words\r\n", "X-Request-Id: \"quoted\"\r\n", "X-Request-Id: back\\slash\r\n",
        "X-Request-Id: caf\xc3\xa9\r\n", "X-Request-Id: del\x7f\r\n", "X-Request-Id:\r\n", NULL,
    };
    for (int i = 0; implausible[i]; i++) {
        request_id_of(s, "GET", "/models", implausible[i], NULL, 200, id);
        if (!made_here(id))
            fail_msg("%s answered with \"%s\"", implausible[i], id);
    }
    memset(id, 'x', REQUEST_ID_MAX + 1);
    snprintf(headers, sizeof headers, "X-Request-Id: %.*s\r\n", REQUEST_ID_MAX + 1, id);
    request_id_of(s, "GET", "/models", headers, NULL, 200, id);
    assert_true(made_here(id));
    free(classify);
    free(stream);
}

static void test_request_errors(void **state)
{
    struct server *s = *state;
    static const struct {
        const char *path, *body;
        int status;
        const char *mention;
    } cases[] = {
        {"/classify", "{bad", 400, "JSON"},
        {"/classify", "", 400, "JSON"},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"a\"} trailing", 400, "JSON"},
        {"/classify", "[1, 2]", 400, "object"},
        /* cJSON would read "good" alone. */
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good\\u0000day\"}", 400, "U+0000"},
        {"/classify", "{\"model\": 5, \"text\": \"a\"}", 400, "\"model\""},
        {"/classify", "{\"text\": \"a\"}", 400, "\"model\""},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\"}", 400, "\"text\""},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": 5}", 400, "\"text\""},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"texts\": \"a\"}", 400, "\"texts\""},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"texts\": [\"a\", 2]}", 400, "texts[1]"},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"a\", \"texts\": [\"a\"]}", 400, "not both"},
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"texts\": []}", 422, "\"texts\""},
        {"/classify", "{\"model\": \"no_such_model\", \"text\": \"a\"}", 404, "no_such_model"},
        {"/classify", "{\"model\": \"tok_word_lm\", \"text\": \"a\"}", 422, "classify"},
        {"/score", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"a\"}", 422, "lm"},
        {"/score", "{\"model\": \"tok_word_lm\", \"text\": \"!!! ...\"}", 422, "no tokens"},
        {"/score", "{\"model\": \"tok_word_lm\", \"texts\": [\"good\", \"?\"]}", 422, "texts[1]"},
        {"/attention", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"a\"}", 422, "attention"},
        {"/attention", "{\"model\": \"rra_dynamic_w3_l2_bi\", \"texts\": [\"a\"]}", 400, "\"text\""},
        {"/generate", "{\"model\": \"plain_lstm_l2_bi_last\", \"prompt\": \"a\"}", 422, "lm"},
        {"/generate", "{\"model\": \"combo_lstm_lm\"}", 400, "\"prompt\""},
        {"/generate", "{\"model\": \"tok_word_lm\", \"prompt\": \"!!!\"}", 422, "no tokens"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"max_tokens\": 0}", 422, "max_tokens"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"max_tokens\": 1025}", 422, "max_tokens"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"max_tokens\": 2.5}", 400, "max_tokens"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"max_tokens\": \"9\"}", 400, "max_tokens"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"temperature\": -1}", 422, "temperature"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"temperature\": \"hot\"}", 400, "temperature"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"top_p\": 0}", 422, "top_p"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"top_p\": 1.5}", 422, "top_p"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"top_k\": -1}", 422, "top_k"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"seed\": -1}", 422, "seed"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"seed\": \"x\"}", 400, "seed"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"stop\": 5}", 400, "stop"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"stop\": [\"a\", 1]}", 400, "stop[1]"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}",
         422, "stop"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"stop\": \"\"}", 422, "stop"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"stream\": \"yes\"}", 400, "stream"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"logprobs\": 1}", 400, "logprobs"},
        {"/score", "{\"model\": \"tok_word_lm\", \"text\": \"good day\", \"logprobs\": \"yes\"}", 400, "logprobs"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"n\": 0}", 422, "\"n\""},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"n\": 17}", 422, "\"n\""},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"n\": \"2\"}", 400, "\"n\""},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"n\": 2, \"stream\": true}", 422, "stream"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"top_logprobs\": 2}", 422, "\"logprobs\": true"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"logprobs\": true, \"top_logprobs\": 21}", 422,
         "top_logprobs"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"logprobs\": true, \"top_logprobs\": 1.5}", 400,
         "top_logprobs"},
        /* A name twice in one object, at the top or deeper down, whether
         * or not the server reads it. */
        {"/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"a\", \"text\": \"b\"}", 400,
         "the name \"text\" appears twice in one object"},
        {"/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"a\", \"max_tokens\": 2000, \"max_tokens\": 2}", 400,
         "\"max_tokens\" appears twice"},
        {"/v1/completions", "{\"model\": \"combo_lstm_lm\", \"x\": [1, {\"b\": {\"c\": 1, \"d\": 0, \"c\": 2}}]}", 400,
         "\"c\" appears twice"},
        /* Bytes that are not UTF-8 in a name the message quotes, and a
         * name of 3-byte characters that the message cuts inside one. */
        {"/classify", "{\"model\": \"a\xff\xfe\", \"text\": \"a\"}", 404, "\"a\xEF\xBF\xBD\xEF\xBF\xBD\""},
        {"/classify",
         "{\"model\": \"" EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5 EURO5
         "\", \"text\": \"a\"}", 404, EURO5 "\xE2\x82\xAC\xEF\xBF\xBD\xEF\xBF\xBD\" (GET /models"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_error(s->port, "POST", cases[i].path, "", cases[i].body, cases[i].status, cases[i].mention);
    expect_error(s->port, "GET", "/%ff%e2%82", "", NULL, 404, "no endpoint at /??? ");
    /* The same name in two objects is no repeat. */
    cJSON_Delete(post(s->port, "/classify", 200,
                      "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"a\", \"x\": {\"text\": 1, \"Text\": 2}}"));
}

static void test_size_limits(void **state)
{
    struct server *s = *state;
    /* 257 texts are too many; 256, and one, are not. */
    static const int counts[] = {257, 256, 1};
    for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
        struct buf b = {0};
        buf_printf(&b, "{\"model\": \"plain_lstm_l2_bi_last\", \"texts\": [");
        for (int i = 0; i < counts[c]; i++)
            buf_printf(&b, "%s\"a\"", i ? "," : "");
        buf_printf(&b, "]}");
        if (counts[c] > 256) {
            expect_error(s->port, "POST", "/classify", "", b.p, 422, "256");
        } else {
            cJSON *got = post(s->port, "/classify", 200, b.p);
            assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(got, "results")), counts[c]);
            cJSON_Delete(got);
        }
        free(b.p);
    }

    /* A text, and a stop string, of one byte over --max-text-bytes
     * (default 100000), and at it: fine. */
    char *text = malloc(100002);
    assert_non_null(text);
    memset(text, 'a', 100001);
    for (int over = 1; over >= 0; over--) {
        text[100000 + over] = 0;
        char *body = body_with("plain_lstm_l2_bi_last", "text", text, NULL);
        char *stop = body_with("combo_lstm_lm", "stop", text, "\"prompt\": \"a\", \"max_tokens\": 2");
        if (over) {
            expect_error(s->port, "POST", "/classify", "", body, 422, "100000");
            expect_error(s->port, "POST", "/generate", "", stop, 422, "stop string");
        } else {
            cJSON_Delete(post(s->port, "/classify", 200, body));
            cJSON_Delete(post(s->port, "/generate", 200, stop));
        }
        free(body);
        free(stop);
    }
    free(text);

    /* A body over --max-body (default 1 MiB): refused on its declared
     * size before it is sent... */
    struct http_resp r;
    const char *declared = "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                           "Content-Length: 1048577\r\n\r\n";
    assert_int_equal(http_raw_request(s->port, declared, strlen(declared), &r), 0);
    check_error(&r, 413, "1048576");
    http_resp_free(&r);
    /* ...or, sent in chunks of undeclared total size, once it passes it;
     * a body of 1 MiB exactly (a request padded with spaces) is taken,
     * declared and in chunks alike. */
    enum { MAX_BODY = 1048576, PIECE = 65536 };
    static char json[MAX_BODY + 1];
    const char *request = "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good\"}";
    memset(json, ' ', sizeof json);
    memcpy(json, request, strlen(request));
    for (int over = 1; over >= 0; over--) {
        struct buf raw = {0};
        size_t len = MAX_BODY + (size_t)over;
        buf_printf(&raw, "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n");
        for (size_t at = 0; at < len; at += PIECE) {
            size_t n = len - at < PIECE ? len - at : PIECE;
            buf_printf(&raw, "%zx\r\n", n);
            buf_add(&raw, json + at, n);
            buf_printf(&raw, "\r\n");
        }
        buf_printf(&raw, "0\r\n\r\n");
        assert_int_equal(http_raw_request(s->port, raw.p, raw.len, &r), 0);
        if (over)
            check_error(&r, 413, "1048576");
        else if (r.status != 200)
            fail_msg("1 MiB in chunks: status %d: %s", r.status, r.body.p);
        http_resp_free(&r);
        free(raw.p);
    }
    assert_int_equal(http_request(s->port, "POST", "/classify", "", json, MAX_BODY, &r), 0);
    if (r.status != 200)
        fail_msg("1 MiB declared: status %d: %s", r.status, r.body.p);
    http_resp_free(&r);
}

/* ---- 64 concurrent clients ----------------------------------------------- */

#define N_CLIENTS 64

struct client_call {
    const char *path;
    char *body;
    struct http_resp alone, together;
    int ok;
    pthread_barrier_t *start;
    int port;
};

static void *client_main(void *arg)
{
    struct client_call *c = arg;
    pthread_barrier_wait(c->start);
    c->ok = http_request(c->port, "POST", c->path, "", c->body, strlen(c->body), &c->together) == 0;
    return NULL;
}

/* Sends every call at once (a barrier releases the threads) and checks
 * each answer against the one it got alone (but for the tokens the prompt
 * cache supplied); returns the mean batch size of the engine calls the
 * round made. */
static double concurrent_round(int port, struct client_call *calls)
{
    double sum0 = http_metric(port, "rrnserve_batch_size_sum{");
    double count0 = http_metric(port, "rrnserve_batch_size_count{");
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, N_CLIENTS);
    pthread_t threads[N_CLIENTS];
    for (int i = 0; i < N_CLIENTS; i++) {
        calls[i].start = &start;
        assert_int_equal(pthread_create(&threads[i], NULL, client_main, &calls[i]), 0);
    }
    for (int i = 0; i < N_CLIENTS; i++)
        pthread_join(threads[i], NULL);
    pthread_barrier_destroy(&start);
    for (int i = 0; i < N_CLIENTS; i++) {
        struct client_call *c = &calls[i];
        assert_true(c->ok);
        assert_int_equal(c->together.status, 200);
        http_drop_cached_tokens(c->together.body.p);
        if (strcmp(c->alone.body.p, c->together.body.p) != 0)
            fail_msg("%s %s\nalone:    %s\ntogether: %s", c->path, c->body, c->alone.body.p, c->together.body.p);
        http_resp_free(&c->together);
    }
    double count = http_metric(port, "rrnserve_batch_size_count{") - count0;
    assert_true(count > 0);
    return (http_metric(port, "rrnserve_batch_size_sum{") - sum0) / count;
}

/* Whether 64 clients at once meet in batches is up to the scheduler: on a
 * loaded 2-core machine under AddressSanitizer each request was once
 * answered before the next arrived, all 304 engine calls alone, and under
 * ThreadSanitizer beside another test binary five rounds in a row once
 * were.  Every round checks the answers; batching must show in one of
 * ten (a round that shows it ends the test).  Under valgrind the threads
 * take turns, so that run checks memory only. */
#define CONCURRENT_ROUNDS 10

static void test_concurrent_clients(void **state)
{
    struct server *s = *state;
    cJSON *cls = fixture_json("plain_lstm_l2_bi_last"), *lm = fixture_json("tok_word_lm");
    cJSON *cls_texts = cJSON_GetObjectItem(cls, "texts"), *lm_texts = cJSON_GetObjectItem(lm, "texts");
    static struct client_call calls[N_CLIENTS];
    for (int i = 0; i < N_CLIENTS; i++) {
        struct client_call *c = &calls[i];
        const char *ct = cJSON_GetArrayItem(cls_texts, i % 4)->valuestring;
        const char *lt = cJSON_GetArrayItem(lm_texts, (i / 4) % 4)->valuestring;
        char more[96];
        memset(c, 0, sizeof *c);
        c->port = s->port;
        switch (i % 4) {
        case 0:
            c->path = "/classify";
            c->body = body_with("plain_lstm_l2_bi_last", "text", ct, NULL);
            break;
        case 1:
            c->path = "/classify";
            c->body = body_with("rra_dynamic_w3_l2_bi", "text", ct, NULL);
            break;
        case 2:
            c->path = "/score";
            c->body = body_with("tok_word_lm", "text", lt, NULL);
            break;
        default:
            c->path = "/generate";
            snprintf(more, sizeof more, "\"max_tokens\": 16, \"seed\": %d", i);
            c->body = body_with("combo_lstm_lm", "prompt", ct, more);
        }
        /* Alone first: the answer each must get in any company. */
        assert_int_equal(http_request(s->port, "POST", c->path, "", c->body, strlen(c->body), &c->alone), 0);
        assert_int_equal(c->alone.status, 200);
        http_drop_cached_tokens(c->alone.body.p);
    }
    cJSON_Delete(cls);
    cJSON_Delete(lm);
    double mean = 1;
    int rounds = server_wrapped() ? 1 : CONCURRENT_ROUNDS;
    for (int round = 0; round < rounds && !(mean > 1); round++)
        mean = concurrent_round(s->port, calls);
    if (!(mean > 1) && !server_wrapped())
        fail_msg("mean batch size %g in each of %d rounds of %d clients", mean, rounds, N_CLIENTS);
    for (int i = 0; i < N_CLIENTS; i++) {
        http_resp_free(&calls[i].alone);
        free(calls[i].body);
    }
}

/* ---- queue limit and clients that leave ------------------------------- */

/* The first event of a generation stream on a fresh connection, which is
 * left open; returns its socket. */
static int open_stream(int port, const char *more)
{
    char *body = body_with("combo_lstm_lm", "prompt", "good day", more);
    int fd = http_connect(port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    assert_int_equal(http_send_request(fd, "POST", "/generate", "", body, strlen(body)), 0);
    struct buf raw = {0};
    http_read_until(fd, &raw, "\"index\":0");
    assert_non_null(raw.p);
    assert_non_null(strstr(raw.p, "\"index\":0"));
    free(raw.p);
    free(body);
    return fd;
}

static int setup_small_queue(void **state)
{
    static const char *const models[] = {"combo_lstm_lm", NULL};
    static const char *const extra[] = {"--device", "cpu", "--max-batch", "1", "--max-queue", "1",
                                        "--max-tokens-limit", "1000000", NULL};
    *state = server_start(&(struct server_opts){.models = models, .args = extra});
    return 0;
}

#define ENDLESS "\"max_tokens\": 1000000"

static void test_queue_full_and_cancel(void **state)
{
    struct server *s = *state;
    const char *depth = "rrnserve_queue_depth{model=\"combo_lstm_lm\"}";
    /* A: a long stream holds the only generation slot. */
    int a = open_stream(s->port, ENDLESS ", \"stream\": true");
    const char *running = "rrnserve_streams_running{model=\"combo_lstm_lm\"}",
               *waited = "rrnserve_queue_wait_seconds_sum{model=\"combo_lstm_lm\"}";
    for (int i = 0; i < 10000 && http_metric(s->port, running) != 1; i++)
        sleep_ms(1);
    assert_true(http_metric(s->port, running) == 1);
    /* Two generations in one request can never fit a queue of one: not
     * a 503 to retry, a 422 that says why; and nothing is queued. */
    char *pair = body_with("combo_lstm_lm", "prompt", "good day", "\"max_tokens\": 5, \"n\": 2");
    struct http_resp r;
    http_must_request(s->port, "POST", "/generate", "", pair, &r);
    check_error(&r, 422, "--max-queue");
    http_resp_free(&r);
    free(pair);
    assert_true(http_metric(s->port, depth) == 0);
    /* B: waits in the queue (of one). */
    char *body = body_with("combo_lstm_lm", "prompt", "good day", "\"max_tokens\": 5, \"seed\": 3");
    int b = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(b >= 0);
    const double waited0 = http_metric(s->port, waited);
    assert_int_equal(http_send_request(b, "POST", "/generate", "", body, strlen(body)), 0);
    for (int i = 0; i < 10000 && http_metric(s->port, depth) != 1; i++)
        sleep_ms(1);
    assert_true(http_metric(s->port, depth) == 1);
    const double b_queued_by = now_s(); /* B was submitted by now */
    /* C: the queue is full. */
    char retry[16];
    http_must_request(s->port, "POST", "/generate", "", body, &r);
    check_error(&r, 503, "queue");
    assert_string_equal(http_header(&r, "Retry-After", retry, sizeof retry), "1");
    http_resp_free(&r);

    /* A's client leaves: its stream is cancelled, so B gets the slot; B's
     * wait for it counts as queue time. */
    sleep_ms(50);
    const double b_queued = now_s() - b_queued_by;
    close(a);
    struct buf raw = {0};
    http_read_all(b, &raw);
    close(b);
    assert_int_equal(http_parse(&raw, &r), 0);
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    free(raw.p);
    assert_int_equal(server_wait_log(s, "POST /generate 499", 1), 1);
    assert_true(http_metric(s->port, waited) - waited0 >= b_queued);

    /* A non-streaming request whose client leaves is cancelled too: the
     * next one gets the slot long before a million tokens. */
    char *endless = body_with("combo_lstm_lm", "prompt", "good day", ENDLESS);
    int d = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(d >= 0);
    assert_int_equal(http_send_request(d, "POST", "/generate", "", endless, strlen(endless)), 0);
    static const char *const tokens = "rrnserve_tokens_generated_total{model=\"combo_lstm_lm\"}";
    double tokens0 = http_metric(s->port, tokens);
    for (int i = 0; i < 10000 && http_metric(s->port, tokens) < tokens0 + 100; i++)
        sleep_ms(1);
    close(d);
    cJSON_Delete(post(s->port, "/generate", 200, body));
    assert_int_equal(server_wait_log(s, "POST /generate 499", 2), 2);
    assert_true(http_metric(s->port, tokens) < 1000000);
    /* A client that leaves is logged as 499, not as an error of the server
     * (nor as a send that failed, when it left a stream). */
    assert_false(server_log_has(s, "internal error"));
    assert_false(server_log_has(s, "Failed to send"));
    free(endless);
    free(body);
}

/* ---- SIGTERM under load ------------------------------------------------- */

#define N_STREAMS 8

struct stream_call {
    int port;
    atomic_int *started;
    int fd;
    struct buf raw;
};

static void *stream_main(void *arg)
{
    struct stream_call *c = arg;
    http_read_until(c->fd, &c->raw, "\"index\":0");
    atomic_fetch_add(c->started, 1);
    http_read_all(c->fd, &c->raw);
    close(c->fd);
    return NULL;
}

static int setup_term(void **state)
{
    static const char *const models[] = {"combo_lstm_lm", "plain_lstm_l2_bi_last", NULL};
    /* A long idle timeout: the test leaves one stream unread for a while. */
    static const char *const extra[] = {"--device", "cpu", "--max-batch", "16", "--max-tokens-limit", "1000000",
                                        "--timeout-s", "600", NULL};
    *state = server_start(&(struct server_opts){.models = models, .args = extra});
    return 0;
}

/* Reads one answer of a kept-alive connection (its Content-Length). */
static void read_one(int fd, struct buf *raw)
{
    http_read_until(fd, raw, "\r\n\r\n");
    assert_non_null(raw->p);
    const char *end = strstr(raw->p, "\r\n\r\n"), *cl = strcasestr_ascii(raw->p, "content-length:");
    assert_true(end && cl);
    size_t want = (size_t)(end + 4 - raw->p) + strtoul(cl + 15, NULL, 10);
    while (raw->len < want && http_read_some(fd, raw) > 0)
        ;
    assert_true(raw->len >= want);
}

static void test_sigterm_answers_accepted_requests(void **state)
{
    struct server *s = *state;
    atomic_int started;
    atomic_init(&started, 0);
    static struct stream_call calls[N_STREAMS];
    pthread_t threads[N_STREAMS];
    /* Streams that run well past the SIGTERM, in valgrind's pace too
     * (some fifty times slower). */
    const int tokens = server_wrapped() ? 2000 : 20000;
    char fields[64];
    snprintf(fields, sizeof fields, "\"max_tokens\": %d, \"stream\": true", tokens);
    char *body = body_with("combo_lstm_lm", "prompt", "good day", fields);
    /* A stream that would run for a million tokens keeps the server
     * draining until its client leaves; meanwhile a kept-alive connection
     * asks /readyz. */
    int holder = open_stream(s->port, ENDLESS ", \"stream\": true");
    int keep = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(keep >= 0);
    const char *healthz = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    const char *readyz = "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    struct buf raw = {0};
    struct http_resp r;
    assert_int_equal(http_send_all(keep, healthz, strlen(healthz)), 0);
    read_one(keep, &raw);
    assert_int_equal(http_parse(&raw, &r), 0);
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    raw.len = 0;

    for (int i = 0; i < N_STREAMS; i++) {
        calls[i] = (struct stream_call){
            .port = s->port, .started = &started, .fd = http_connect(s->port, HTTP_TIMEOUT_S)};
        assert_true(calls[i].fd >= 0);
        assert_int_equal(http_send_request(calls[i].fd, "POST", "/generate", "", body, strlen(body)), 0);
        assert_int_equal(pthread_create(&threads[i], NULL, stream_main, &calls[i]), 0);
    }
    for (int i = 0; i < 100000 && atomic_load(&started) < N_STREAMS; i++)
        sleep_ms(1);
    assert_int_equal(atomic_load(&started), N_STREAMS);
    assert_int_equal(kill(s->pid, SIGTERM), 0);
    assert_int_equal(server_wait_log(s, "no new connections", 1), 1);
    /* The listening socket is closed at once... */
    int late = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(late < 0);
    /* ...connections already open are served, told it is shutting down,
     * and to go elsewhere: their answers close the connection. */
    assert_int_equal(http_send_all(keep, readyz, strlen(readyz)), 0);
    read_one(keep, &raw);
    assert_int_equal(http_parse(&raw, &r), 0);
    check_error(&r, 503, "shutting down");
    char connection[16];
    assert_string_equal(http_header(&r, "Connection", connection, sizeof connection), "close");
    http_resp_free(&r);
    free(raw.p);
    close(keep);
    /* Every stream accepted runs to its end. */
    for (int i = 0; i < N_STREAMS; i++) {
        pthread_join(threads[i], NULL);
        assert_int_equal(http_parse(&calls[i].raw, &r), 0);
        assert_int_equal(r.status, 200);
        struct buf joined = {0};
        int n;
        cJSON *last = parse_events(r.body.p, &joined, &n, NULL);
        assert_int_equal(n, tokens);
        assert_string_equal(str_of(last, "finish_reason"), "length");
        cJSON_Delete(last);
        free(joined.p);
        http_resp_free(&r);
        free(calls[i].raw.p);
    }
    assert_false(server_log_has(s, "stopped"));
    close(holder);
    int status = server_wait_exit(s);
    assert_true(status != -1 && WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_true(server_log_has(s, "stopped"));
    free(body);
}

/* ---- the prompt cache ---------------------------------------------------- */

static const char *const cache_models[] = {"combo_lstm_lm", "rra_dynamic_w3_l2_lm", "tok_word_lm", NULL};

static int setup_prompt_cache(void **state)
{
    static const char *const extra[] = {"--device", "cpu", NULL};
    *state = server_start(&(struct server_opts){.models = cache_models, .args = extra});
    return 0;
}

/* A seeded generation on port: its text (to be freed), its prompt tokens,
 * and how many of those the prompt cache supplied (NULL: not wanted). */
static char *generated(int port, const char *model, const char *prompt, const char *more, int *prompt_tokens,
                       int *cached_tokens)
{
    char *body = body_with(model, "prompt", prompt, more);
    cJSON *got = post(port, "/generate", 200, body);
    free(body);
    char *text = strdup(cJSON_GetObjectItem(got, "text")->valuestring);
    *prompt_tokens = cJSON_GetObjectItem(got, "prompt_tokens")->valueint;
    if (cached_tokens)
        *cached_tokens = cJSON_GetObjectItem(got, "cached_tokens")->valueint;
    cJSON_Delete(got);
    assert_non_null(text);
    return text;
}

static int setup_prompt_cache_cuda(void **state)
{
    *state = NULL;
    static const char *const extra[] = {"--device", "cuda", NULL};
    if (backend_cuda_available())
        *state = server_start(&(struct server_opts){.models = cache_models, .args = extra});
    return 0;
}

/* A prompt sent again gives the same text from the cached state and
 * logits; one that continues a generation with its text starts from the
 * state the generation reached: /metrics counts both.  With plain, a
 * server without the cache, the texts equal its own. */
static void check_prompt_cache(struct server *s, struct server *plain)
{
    struct buf prompt = {0};
    for (int i = 0; i < 12; i++)
        buf_printf(&prompt, "the good day ");
    for (int m = 0; cache_models[m]; m++) {
        const char *name = cache_models[m];
        /* Under valgrind, which makes every request slow, the RRA model
         * alone: its state is the most there is to restore. */
        if (server_wrapped() && strncmp(name, "rra_", 4) != 0)
            continue;
        const int chars = strcmp(name, "tok_word_lm") != 0; /* a token a character */
        char series[128];
        snprintf(series, sizeof series, "rrnserve_prompt_cache_tokens_total{model=\"%s\"}", name);
        int n, n_plain, cached;
        double cached0 = http_metric(s->port, series);

        /* The first time the whole prompt runs; the second it is cached. */
        char *first = generated(s->port, name, prompt.p, "\"max_tokens\": 20, \"seed\": 3", &n, &cached);
        assert_true(http_metric(s->port, series) == cached0);
        assert_int_equal(cached, 0);
        char *again = generated(s->port, name, prompt.p, "\"max_tokens\": 20, \"seed\": 3", &n, &cached);
        assert_true(http_metric(s->port, series) == cached0 + n);
        assert_int_equal(cached, n);
        assert_string_equal(again, first);
        if (plain) {
            char *want = generated(plain->port, name, prompt.p, "\"max_tokens\": 20, \"seed\": 3", &n_plain, NULL);
            assert_string_equal(first, want);
            free(want);
        }

        /* A conversation goes on: the prompt, what was generated, more. */
        struct buf next = {0};
        buf_printf(&next, "%s%s%sgood day", prompt.p, first, chars ? "" : " ");
        double cached1 = http_metric(s->port, series);
        char *reply = generated(s->port, name, next.p, "\"max_tokens\": 12, \"seed\": 4", &n, &cached);
        if (chars) /* all but the last generated token ran through the model */
            assert_int_equal(cached, n - (int)strlen("good day") - 1);
        assert_true(cached > 0 && http_metric(s->port, series) == cached1 + cached);
        if (plain) {
            char *want = generated(plain->port, name, next.p, "\"max_tokens\": 12, \"seed\": 4", &n_plain, NULL);
            assert_string_equal(reply, want);
            free(want);
        }
        /* Two prompts that begin alike and end apart: the second starts
         * from the state at the last block boundary (256 tokens) within
         * their common beginning, which the first left on its way. */
        struct buf common = {0}, one = {0}, other = {0};
        for (int i = 0; i < 24; i++)
            buf_printf(&common, "a nice %s day ", m % 2 ? "long" : "fine");
        buf_printf(&one, "%sthe end", common.p);
        buf_printf(&other, "%swhat a day", common.p);
        char *text_one = generated(s->port, name, one.p, "\"max_tokens\": 8, \"seed\": 5", &n, &cached);
        char *text_other = generated(s->port, name, other.p, "\"max_tokens\": 8, \"seed\": 5", &n, &cached);
        if (chars)
            assert_int_equal(cached, 256);
        if (plain) {
            char *want = generated(plain->port, name, other.p, "\"max_tokens\": 8, \"seed\": 5", &n_plain, NULL);
            assert_string_equal(text_other, want);
            free(want);
        }
        free(text_one);
        free(text_other);
        free(common.p);
        free(one.p);
        free(other.p);
        free(first);
        free(again);
        free(reply);
        free(next.p);
    }
    free(prompt.p);
}

/* On the CPU, to the bit what a server without the cache answers: for an
 * RRA model too, whose state holds a ring of past states and a position. */
static void test_prompt_cache(void **state)
{
    struct server *s = *state;
    static const char *const extra[] = {"--device", "cpu", "--prompt-cache-mb", "0", NULL};
    struct server *plain = server_start(&(struct server_opts){.models = cache_models, .args = extra});
    check_prompt_cache(s, plain);
    assert_true(http_metric(s->port, "rrnserve_prompt_cache_bytes{model=\"rra_dynamic_w3_l2_lm\"}") > 0);
    assert_true(http_metric(plain->port, "rrnserve_prompt_cache_tokens_total{model=\"combo_lstm_lm\"}") == 0);
    assert_true(http_metric(plain->port, "rrnserve_prompt_cache_bytes{model=\"combo_lstm_lm\"}") == 0);
    server_stop(plain);
}

/* On CUDA the states go to and from the device.  A longer or shorter
 * prefill may multiply in another order there, so only a repeated prompt
 * is held to the same text. */
static void test_prompt_cache_cuda(void **state)
{
    if (!*state)
        skip();
    check_prompt_cache(*state, NULL);
}

/* ---- the log as JSON ---------------------------------------------------- */

static int setup_json_log(void **state)
{
    static const char *const models[] = {"plain_lstm_l2_bi_last", NULL};
    static const char *const extra[] = {"--device", "cpu", "--log-format", "json", NULL};
    *state = server_start(&(struct server_opts){.models = models, .args = extra});
    return 0;
}

/* With --log-format json every line the server writes is one JSON object
 * with its time: events as "msg", requests as their fields, a quote in a
 * path escaped.  (Lines of valgrind's own, "==PID== ...", are not the
 * server's.) */
static void test_json_log(void **state)
{
    struct server *s = *state;
    char *body = body_with("plain_lstm_l2_bi_last", "text", "good day!", NULL);
    expect_status(s->port, "POST", "/classify", "X-Request-Id: json-1\r\n", body, 200);
    expect_status(s->port, "GET", "/a%22b%ff%c2%9b%e2%82%ac%e2%82", "X-Request-Id: json-2\r\n", NULL, 404);
    free(body);
    assert_int_equal(server_wait_log(s, "\"id\":\"json-2\"", 1), 1);

    pthread_mutex_lock(&s->mu);
    char *log = strdup(s->log.p);
    pthread_mutex_unlock(&s->mu);
    assert_non_null(log);
    int events = 0, requests = 0;
    char *save = NULL;
    for (char *line = strtok_r(log, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "==", 2) == 0)
            continue;
        cJSON *o = cJSON_Parse(line);
        if (!cJSON_IsObject(o) || !cJSON_IsString(cJSON_GetObjectItem(o, "time")) ||
            u8_check((const uint8_t *)line, strlen(line)))
            fail_msg("not a JSON log line in UTF-8 with a time: %s", line);
        if (cJSON_IsString(cJSON_GetObjectItem(o, "msg"))) {
            events++;
        } else {
            const char *id = cJSON_GetStringValue(cJSON_GetObjectItem(o, "id"));
            const char *path = cJSON_GetStringValue(cJSON_GetObjectItem(o, "path"));
            assert_non_null(id);
            assert_non_null(path);
            assert_true(cJSON_IsNumber(cJSON_GetObjectItem(o, "ms")));
            int status = cJSON_GetObjectItem(o, "status")->valueint;
            const cJSON *batch = cJSON_GetObjectItem(o, "batch");
            if (strcmp(id, "json-1") == 0) {
                assert_string_equal(path, "/classify");
                assert_int_equal(status, 200);
                assert_int_equal(batch->valueint, 1);
                requests++;
            } else if (strcmp(id, "json-2") == 0) {
                assert_string_equal(path, "/a\"b??\xE2\x82\xAC??");
                assert_int_equal(status, 404);
                assert_true(cJSON_IsNull(batch));
                requests++;
            }
        }
        cJSON_Delete(o);
    }
    free(log);
    assert_true(events >= 2); /* the model loaded, listening */
    assert_int_equal(requests, 2);
}

/* ---- SIGHUP reload ----------------------------------------------------- */

static int setup_reload(void **state)
{
    static const char *const extra[] = {"--device", "cpu", NULL};
    *state = server_start(&(struct server_opts){.args = extra});
    return 0;
}

static void reload(struct server *s, int nth)
{
    assert_int_equal(kill(s->pid, SIGHUP), 0);
    assert_int_equal(server_wait_log(s, "reloaded ", nth), nth);
}

static void test_sighup_reload(void **state)
{
    struct server *s = *state;
    const char *req = "{\"model\": \"newmodel\", \"text\": \"good day!\"}";
    /* An empty folder: alive, not ready. */
    expect_error(s->port, "GET", "/readyz", "", NULL, 503, "no model");
    expect_error(s->port, "POST", "/classify", "", req, 404, "newmodel");

    server_add_model(s, "tok_word_lm", "tok_word_lm");
    server_add_model(s, "plain_lstm_l2_bi_last", "newmodel");
    /* A folder named as a weight file is no model, and no error either. */
    char folder[128];
    snprintf(folder, sizeof folder, "%s/folder.safetensors", s->dir);
    assert_int_equal(mkdir(folder, 0700), 0);
    reload(s, 1);
    cJSON_Delete(get(s->port, "/readyz", 200));
    cJSON *j = get(s->port, "/models", 200);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "models")), 2);
    cJSON_Delete(j);
    assert_false(server_log_has(s, "folder"));
    cJSON *before = post(s->port, "/classify", 200, req);

    /* A corrupt file in its place (a new file, renamed over the old one,
     * as deployments do) and a new corrupt one: both logged, the old model
     * keeps serving, the new name is not served. */
    char tmp[128], dst[128];
    snprintf(tmp, sizeof tmp, "%s/newmodel.tmp", s->dir);
    snprintf(dst, sizeof dst, "%s/newmodel.safetensors", s->dir);
    FILE *f = fopen(tmp, "wb");
    assert_non_null(f);
    fputs("this is not a safetensors file", f);
    fclose(f);
    assert_int_equal(rename(tmp, dst), 0);
    snprintf(dst, sizeof dst, "%s/broken.safetensors", s->dir);
    f = fopen(dst, "wb");
    assert_non_null(f);
    /* A safetensors header of two bytes, "{}": no metadata, no tensors. */
    assert_int_equal(fwrite("\x02\0\0\0\0\0\0\0{}", 1, 10, f), 10);
    fclose(f);
    /* A name that is not UTF-8, or holds a control character, is no name
     * to send or to show: such a file is skipped, and logged on one line.
     * A name in UTF-8 beyond ASCII is served. */
    server_add_model(s, "tok_word_lm", "bad\nname\xff");
    server_add_model(s, "plain_lstm_l2_bi_last", "mod\xC3\xA8le");
    reload(s, 2);
    assert_true(server_log_has(s, "newmodel: cannot load"));
    assert_true(server_log_has(s, "broken: cannot load"));
    char skipped[256];
    snprintf(skipped, sizeof skipped, "skipped %s/bad?name?.safetensors: a model's name", s->dir);
    assert_true(server_log_has(s, skipped));
    assert_true(server_log_has(s, "3 failed to load"));
    cJSON_Delete(post(s->port, "/classify", 200, "{\"model\": \"mod\xC3\xA8le\", \"text\": \"a\"}"));
    /* The unchanged file is not read again: its model, and what it holds
     * (a prompt cache, a batcher), stays as it was. */
    assert_int_equal(server_wait_log(s, "model tok_word_lm: loaded ", 1), 1);
    cJSON *after = post(s->port, "/classify", 200, req);
    char *a = cJSON_PrintUnformatted(before), *b = cJSON_PrintUnformatted(after);
    assert_string_equal(a, b);
    free(a);
    free(b);
    cJSON_Delete(before);
    cJSON_Delete(after);
    expect_error(s->port, "POST", "/classify", "", "{\"model\": \"broken\", \"text\": \"a\"}", 404, "broken");
    cJSON_Delete(post(s->port, "/score", 200, "{\"model\": \"tok_word_lm\", \"text\": \"good day\"}"));
}

/* ---- API keys ------------------------------------------------------------- */

static void sha256_hex(const char *key, char out[65])
{
    unsigned char h[32];
    unsigned int n = 0;
    assert_int_equal(EVP_Digest(key, strlen(key), h, &n, EVP_sha256(), NULL), 1);
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", h[i]);
}

static char keys_file[64];

static int setup_auth(void **state)
{
    static const char *const models[] = {"plain_lstm_l2_bi_last", NULL};
    char h1[65], h2[65];
    sha256_hex("first-key", h1);
    sha256_hex("second-key", h2);
    snprintf(keys_file, sizeof keys_file, "/tmp/rrn_keys_XXXXXX");
    int fd = mkstemp(keys_file);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fprintf(f, "# keys of the test\n%s\n\n  %s  # the second one\n", h1, h2);
    fclose(f);
    const char *extra[] = {"--device", "cpu", "--api-keys", keys_file, NULL};
    *state = server_start(&(struct server_opts){.models = models, .args = extra});
    return 0;
}

static int teardown_auth(void **state)
{
    unlink(keys_file);
    return server_teardown(state);
}

static void test_api_keys(void **state)
{
    struct server *s = *state;
    const char *body = "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good day!\"}";
    struct http_resp r;
    /* Health checks need no key. */
    cJSON_Delete(get(s->port, "/healthz", 200));
    cJSON_Delete(get(s->port, "/readyz", 200));
    /* Everything else does. */
    expect_error(s->port, "GET", "/models", "", NULL, 401, "API key");
    expect_error(s->port, "GET", "/metrics", "", NULL, 401, "API key");
    expect_error(s->port, "POST", "/classify", "", body, 401, "API key");
    expect_error(s->port, "POST", "/classify", "Authorization: Bearer wrong-key\r\n", body, 401, NULL);
    expect_error(s->port, "POST", "/classify", "Authorization: Basic Zmlyc3Qta2V5\r\n", body, 401, NULL);
    expect_error(s->port, "POST", "/classify", "Authorization: Bearer first-key2\r\n", body, 401, NULL);
    expect_status(s->port, "POST", "/classify", "Authorization: Bearer first-key\r\n", body, 200);
    expect_status(s->port, "POST", "/classify", "Authorization: Bearer second-key\r\n", body, 200);
    http_must_request(s->port, "GET", "/metrics", "Authorization: Bearer second-key\r\n", NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body.p, "status=\"401\""));
    http_resp_free(&r);
    /* A 401 names the scheme (RFC 9110); without a key, no path or method
     * is told apart from another, the open ones' other methods too. */
    char scheme[64];
    http_must_request(s->port, "GET", "/models", "", NULL, &r);
    assert_string_equal(http_header(&r, "WWW-Authenticate", scheme, sizeof scheme), "Bearer realm=\"rrnserve\"");
    http_resp_free(&r);
    expect_error(s->port, "GET", "/no-such-path", "", NULL, 401, "API key");
    expect_error(s->port, "POST", "/healthz", "", "{}", 401, "API key");
    expect_error(s->port, "GET", "/no-such-path", "Authorization: Bearer second-key\r\n", NULL, 404, "no endpoint");
    expect_error(s->port, "POST", "/healthz", "Authorization: Bearer second-key\r\n", "{}", 405, "needs method GET");

    /* SIGHUP reads the file again: the first key revoked, a third added
     * (its hash in capitals: hex digits of either case are read); a file
     * that fails to read keeps the keys as they were. */
    char h2[65], h3[65];
    sha256_hex("second-key", h2);
    sha256_hex("third-key", h3);
    for (char *c = h3; *c; c++)
        *c = (char)toupper((unsigned char)*c);
    FILE *f = fopen(keys_file, "w");
    assert_non_null(f);
    fprintf(f, "%s\n%s\n", h2, h3);
    fclose(f);
    /* Each reload is awaited by what both its outcomes log, so that one
     * that went the wrong way fails at once, not at the log's timeout. */
    assert_int_equal(kill(s->pid, SIGHUP), 0);
    assert_int_equal(server_wait_log(s, "the API keys: ", 1), 1);
    assert_true(server_log_has(s, "reloaded the API keys: 2 key hash(es)"));
    expect_error(s->port, "POST", "/classify", "Authorization: Bearer first-key\r\n", body, 401, "API key");
    static const char *const kept[] = {"Authorization: Bearer second-key\r\n", "Authorization: Bearer third-key\r\n"};
    for (int i = 0; i < 2; i++)
        expect_status(s->port, "POST", "/classify", kept[i], body, 200);
    /* Line 2 is a hash but for its last digit. */
    h3[63] = 'g';
    assert_non_null(f = fopen(keys_file, "w"));
    fprintf(f, "%s\n%s\n", h2, h3);
    fclose(f);
    assert_int_equal(kill(s->pid, SIGHUP), 0);
    assert_int_equal(server_wait_log(s, "the API keys: ", 2), 2);
    assert_true(server_log_has(s, "cannot reload the API keys"));
    assert_true(server_log_has(s, "line 2: expected a SHA-256 hash"));
    for (int i = 0; i < 2; i++)
        expect_status(s->port, "POST", "/classify", kept[i], body, 200);
    /* A file of comments alone revokes every key (never: lets everyone
     * in); the health checks still need none. */
    assert_non_null(f = fopen(keys_file, "w"));
    fputs("# every key revoked\n", f);
    fclose(f);
    assert_int_equal(kill(s->pid, SIGHUP), 0);
    assert_int_equal(server_wait_log(s, "the API keys: ", 3), 3);
    assert_true(server_log_has(s, "holds no key hash, so every key is revoked"));
    for (int i = 0; i < 2; i++)
        expect_error(s->port, "POST", "/classify", kept[i], body, 401, "API key");
    expect_error(s->port, "POST", "/classify", "", body, 401, "API key");
    cJSON_Delete(get(s->port, "/healthz", 200));
}

/* A model of config json (its weights drawn as `rrnserve train` draws
 * them) written into the server's folder as name, which a reload serves
 * (the server's first). */
static void serve_new_model(struct server *s, const char *name, const char *json)
{
    struct model m;
    char path[128], err[256];
    model_from_json(json, 0, 1, &m);
    snprintf(path, sizeof path, "%s/%s.safetensors", s->dir, name);
    if (model_save(&m, path, NULL, 0, err, sizeof err) != 0)
        fail_msg("model_save: %s", err);
    model_free(&m);
    reload(s, 1);
}

/* A model that reads vectors rather than text (the synthetic tasks'
 * regressions `rrnserve train` makes) is served, listed, and refused by
 * every text endpoint with a 422 that says why. */
static void test_vector_model_refused(void **state)
{
    struct server *s = *state;
    serve_new_model(s, "vectors", "{\"task\": \"regress\", \"cell\": \"lstm\", \"hidden\": 8, \"outputs\": 2, "
                                  "\"input\": {\"type\": \"vector\", \"dim\": 3}}");
    cJSON *j = get(s->port, "/models", 200);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "models")), 1);
    cJSON_Delete(j);
    static const struct {
        const char *path, *body;
    } asks[] = {
        {"/classify", "{\"model\": \"vectors\", \"text\": \"good day\"}"},
        {"/score", "{\"model\": \"vectors\", \"text\": \"good day\"}"},
        {"/attention", "{\"model\": \"vectors\", \"text\": \"good day\"}"},
        {"/generate", "{\"model\": \"vectors\", \"prompt\": \"good day\"}"},
        {"/v1/completions", "{\"model\": \"vectors\", \"prompt\": \"good day\"}"},
    };
    for (size_t i = 0; i < sizeof asks / sizeof asks[0]; i++)
        expect_error(s->port, "POST", asks[i].path, "", asks[i].body, 422,
                     "model \"vectors\" reads vectors, not text");
}

/* A model is named by its file, whatever the name holds: a quote and a
 * backslash come out escaped in /metrics' labels (Prometheus' escaping)
 * and in JSON, and the name asks for the model as the file named it. */
static void test_model_name_escaped(void **state)
{
    struct server *s = *state;
    server_add_model(s, "plain_lstm_l2_bi_last", "it's \"new\\old\"");
    reload(s, 1);
    cJSON_Delete(post(s->port, "/classify", 200, "{\"model\": \"it's \\\"new\\\\old\\\"\", \"text\": \"good day\"}"));
    struct http_resp r;
    http_must_request(s->port, "GET", "/metrics", "", NULL, &r);
    assert_int_equal(r.status, 200);
    if (!strstr(r.body.p, "rrnserve_queue_depth{model=\"it's \\\"new\\\\old\\\"\"} 0\n"))
        fail_msg("/metrics has no escaped label: %.2000s", r.body.p);
    http_resp_free(&r);
    http_must_request(s->port, "GET", "/models", "", NULL, &r);
    assert_non_null(strstr(r.body.p, "\"name\":\"it's \\\"new\\\\old\\\"\""));
    http_resp_free(&r);
}

/* A byte model's: the characters of the text before each byte as a
 * stream's events give them (utf8_stream: a character comes whole with
 * its last byte, a byte that is none as U+FFFD), so that a character's
 * bytes all begin where it does.  The bytes are the tokens' labels (<0xNN>
 * for those above 0x7F). */
static void test_completions_text_offset_bytes(void **state)
{
    struct server *s = *state;
    serve_new_model(s, "bytes", "{\"task\": \"lm\", \"cell\": \"gru\", \"hidden\": 16, \"embed_dim\": 8, "
                                "\"tokenizer\": {\"type\": \"byte\"}}");
    long offs[64];
    char *text;
    /* a, é (2 bytes), 😀 (4), then 24 random bytes, mostly no character. */
    const char *body = "{\"model\": \"bytes\", \"prompt\": \"a\\u00e9\\ud83d\\ude00\", \"max_tokens\": 24, "
                       "\"seed\": 2, \"logprobs\": 0";
    const int n = offsets_every_way(s->port, body, 7, offs, 64, &text);
    assert_int_equal(n, 7 + 24);
    static const long prompt[] = {0, 1, 1, 2, 2, 2, 2};
    assert_memory_equal(offs, prompt, sizeof prompt);
    char full[256], bytes[64], clean[3 * 64 + 1];
    snprintf(full, sizeof full, "%s, \"echo\": true}", body);
    cJSON *got = post(s->port, "/v1/completions", 200, full);
    const cJSON *tokens, *lps, *tops;
    assert_int_equal(choice_logprobs(got, 0, &tokens, &lps, &tops), n);
    for (int i = 0; i < n; i++) {
        const char *label = cJSON_GetArrayItem(tokens, i)->valuestring;
        unsigned hex;
        bytes[i] = strlen(label) == 6 && sscanf(label, "<0x%2X>", &hex) == 1 ? (char)hex : label[0];
        size_t len, chars = 0;
        utf8_clean(bytes, (size_t)i, 0, clean, &len);
        for (size_t k = 0; k < len; k++)
            chars += ((unsigned char)clean[k] & 0xC0) != 0x80;
        if (offs[i] != (long)chars)
            fail_msg("byte %d: text_offset %ld, not %zu", i, offs[i], chars);
    }
    cJSON_Delete(got);
    free(text);
}

/* A byte model's stream that ends inside a character ends it as U+FFFD,
 * as the answer's text does: the events of /generate's stream and of a
 * completion's join to that text, whatever the length. */
static void test_stream_ends_inside_a_character(void **state)
{
    struct server *s = *state;
    serve_new_model(s, "bytes", "{\"task\": \"lm\", \"cell\": \"gru\", \"hidden\": 16, \"embed_dim\": 8, "
                                "\"tokenizer\": {\"type\": \"byte\"}}");
    int replaced_last = 0;
    for (int len = 1; len <= 24; len++) {
        char more[96], body[192], *streamed;
        snprintf(more, sizeof more, "\"max_tokens\": %d, \"seed\": 2", len);
        cJSON *plain = generate(s->port, "bytes", more);
        const char *text = str_of(plain, "text");
        replaced_last += strlen(text) >= 3 && strcmp(text + strlen(text) - 3, "\xef\xbf\xbd") == 0;
        snprintf(body, sizeof body, "{\"model\": \"bytes\", \"prompt\": \"good day\", %s, \"stream\": true}", more);
        struct http_resp r;
        http_must_request(s->port, "POST", "/generate", "", body, &r);
        assert_int_equal(r.status, 200);
        struct buf joined = {0};
        int n;
        cJSON_Delete(parse_events(r.body.p, &joined, &n, NULL));
        if (strcmp(joined.p, text) != 0)
            fail_msg("max_tokens %d: the stream's tokens join to '%s', the text is '%s'", len, joined.p, text);
        free(joined.p);
        http_resp_free(&r);
        cJSON *first;
        streamed = streamed_completion(s->port, body, &first);
        if (strcmp(streamed, text) != 0)
            fail_msg("max_tokens %d: the completion's stream joins to '%s', the text is '%s'", len, streamed, text);
        cJSON_Delete(first);
        free(streamed);
        cJSON_Delete(plain);
    }
    assert_true(replaced_last > 0);
}

/* ---- bad command lines ------------------------------------------------ */

static void test_bad_command_lines(void **state)
{
    (void)state;
    static const struct {
        const char *args;
        int status;
        const char *mention;
    } cases[] = {
        {"--port abc", 2, "--port"},
        {"--port 80x", 2, "--port must be an integer from 0 to 65535, not '80x'"},
        {"--port 70000", 2, "--port"},
        {"--max-batch 0", 2, "--max-batch"},
        {"--device tpu", 2, "--device"},
        {"--log-format xml", 2, "--log-format must be text or json"},
        {"--bogus", 2, "usage"},
        {"extra", 2, "extra"},
        {"--models /nonexistent/folder", 1, "/nonexistent/folder"},
        {"--models tests/fixtures --api-keys /nonexistent/keys", 1, "/nonexistent/keys"},
        {"--models DIR --api-keys DIR/keys", 1, "keys line 2"},
        {"--models DIR --host 256.1.2.3", 1, "256.1.2.3"},
        {"--models DIR --api-keys DIR/no-keys", 1, "no-keys holds no key hash"},
        {"--models DIR --port PORT", 1, "cannot listen on 127.0.0.1 port PORT (in use"},
    };
    /* DIR: a folder with no model, a key file with a bad line 2 and one
     * of comments alone; PORT: a port this test listens on. */
    char dir[64] = "/tmp/rrn_scratch_XXXXXX", keys[96], port[16];
    assert_non_null(mkdtemp(dir));
    snprintf(keys, sizeof keys, "%s/keys", dir);
    file_write_text(keys, "# a comment\nnot-a-hash\n");
    snprintf(keys, sizeof keys, "%s/no-keys", dir);
    file_write_text(keys, "# keys are added here\n\n");
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof addr;
    assert_true(listener >= 0);
    assert_int_equal(bind(listener, (struct sockaddr *)&addr, sizeof addr), 0);
    assert_int_equal(listen(listener, 1), 0);
    assert_int_equal(getsockname(listener, (struct sockaddr *)&addr, &alen), 0);
    snprintf(port, sizeof port, "%d", ntohs(addr.sin_port));
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *out, args[256] = "", mention[256] = "";
        for (int which = 0; which < 2; which++) {
            char *to = which ? mention : args;
            for (const char *p = which ? cases[i].mention : cases[i].args; *p;)
                if (strncmp(p, "DIR", 3) == 0 || strncmp(p, "PORT", 4) == 0) {
                    snprintf(to + strlen(to), sizeof args - strlen(to), "%s", *p == 'D' ? dir : port);
                    p += *p == 'D' ? 3 : 4;
                } else {
                    snprintf(to + strlen(to), sizeof args - strlen(to), "%c", *p++);
                }
        }
        /* Bounded by timeout(1). */
        int status = proc_run(&out, "timeout 120 '%s' serve --port 0 %s", rrn_bin(), args);
        int ok = status == cases[i].status && strstr(out, mention);
        char shown[4096];
        snprintf(shown, sizeof shown, "%s", out);
        free(out);
        if (!ok)
            fail_msg("serve %s: status %d, output:\n%s", args, status, shown);
    }
    close(listener);
    remove_tree(dir, NULL);
}

int main(void)
{
    test_filter_from_env();
    /* One group (tests/run_tests.sh reads one summary per binary): the
     * group's server serves the tests without their own setup; the others
     * start, and kill, a server of their own. */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_health_and_metrics),
        cmocka_unit_test(test_models),
        cmocka_unit_test(test_classify_equals_fixture),
        cmocka_unit_test(test_score_equals_fixture),
        cmocka_unit_test(test_attention_equals_fixture),
        cmocka_unit_test(test_long_attention_of_a_classifier),
        cmocka_unit_test(test_forward_calls_are_bounded),
        cmocka_unit_test(test_generate_seeded),
        cmocka_unit_test(test_generate_stream_equals_plain),
        cmocka_unit_test(test_completions_stop),
        cmocka_unit_test(test_generate_logprobs),
        cmocka_unit_test(test_generation_metrics),
        cmocka_unit_test(test_generate_n),
        cmocka_unit_test(test_score_alternatives),
        cmocka_unit_test(test_completions),
        cmocka_unit_test(test_completions_echo_and_prompts),
        cmocka_unit_test(test_completions_text_offset),
        cmocka_unit_test(test_cli_generate_equals_server),
        cmocka_unit_test(test_routing_errors),
        cmocka_unit_test(test_head),
        cmocka_unit_test(test_ambiguous_framing),
        cmocka_unit_test(test_request_ids),
        cmocka_unit_test(test_request_errors),
        cmocka_unit_test(test_size_limits),
        cmocka_unit_test(test_concurrent_clients),
        cmocka_unit_test_setup_teardown(test_queue_full_and_cancel, setup_small_queue, server_teardown),
        cmocka_unit_test_setup_teardown(test_sigterm_answers_accepted_requests, setup_term, server_teardown),
        cmocka_unit_test_setup_teardown(test_sighup_reload, setup_reload, server_teardown),
        cmocka_unit_test_setup_teardown(test_vector_model_refused, setup_reload, server_teardown),
        cmocka_unit_test_setup_teardown(test_model_name_escaped, setup_reload, server_teardown),
        cmocka_unit_test_setup_teardown(test_completions_text_offset_bytes, setup_reload, server_teardown),
        cmocka_unit_test_setup_teardown(test_stream_ends_inside_a_character, setup_reload, server_teardown),
        cmocka_unit_test_setup_teardown(test_json_log, setup_json_log, server_teardown),
        cmocka_unit_test_setup_teardown(test_score_not_finite, setup_relu_lm, server_teardown),
        cmocka_unit_test_setup_teardown(test_prompt_cache, setup_prompt_cache, server_teardown),
        cmocka_unit_test_setup_teardown(test_prompt_cache_cuda, setup_prompt_cache_cuda, server_teardown),
        cmocka_unit_test_setup_teardown(test_fused_recurrence_equals_fixtures, setup_fused, server_teardown),
        cmocka_unit_test_setup_teardown(test_device_auto, setup_auto, server_teardown),
        cmocka_unit_test_setup_teardown(test_api_keys, setup_auth, teardown_auth),
        cmocka_unit_test(test_bad_command_lines),
    };
    return server_exit_status(cmocka_run_group_tests_name("server", tests, setup_main, server_teardown));
}
