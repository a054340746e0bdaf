/* test_fixtures.c - the engine against fixtures made by PyTorch and by the
 * independent numpy reference (tests/fixtures/make_fixtures.py).
 *
 * For every fixture: the tokenizer gives the recorded ids; the batched
 * forward gives the recorded logits, probabilities, log-probabilities and
 * attention weights within 1e-5; each text alone gives what it gives in the
 * batch within 1e-6; and for language models the step API, with sequences
 * joining at different steps, gives the forward's logits at every step.
 *
 * Every test runs on each backend: the CPU, and CUDA when this binary was
 * built with it, its recurrence by cuBLAS's products and fused (cuda_fused),
 * and in TF32 and BF16.  Without a GPU the CUDA tests report skipped.  On the GPU
 * the fixtures hold within 1e-4 (cuBLAS and the device's exp/tanh round
 * differently) and alone-vs-batch within 1e-5 (cuBLAS picks its algorithm
 * by matrix size, so it is not batch-invariant to the bit).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "tokenizer.h"

#include "support/files.h"
#include "support/fixtures.h"
#include "support/filter.h"

#define FIXTURE_DIR "tests/fixtures"

struct fixture {
    char name[128];
    enum device_kind device;
    enum precision precision;
    enum recurrence recurrence;
    double tol, batch_tol;
    cJSON *json;
    struct model model;
    struct tokenizer tk;
    struct backend *be;
    struct engine *engine;
    int n;               /* texts */
    int32_t **ids;
    int *lens;
};

/* |got - want| within tol, relative to the size of want. */
static void assert_close(double got, double want, double tol, const char *what, int i, int j)
{
    if (!(fabs(got - want) <= tol * (1.0 + fabs(want))))
        fail_msg("%s [%d][%d]: got %.9g, want %.9g", what, i, j, got, want);
}

static int fixture_setup(void **state)
{
    struct fixture *fx = *state;
    char path[256], err[512];
    memset(&fx->model, 0, sizeof fx->model);
    memset(&fx->tk, 0, sizeof fx->tk);
    if (fx->device == DEVICE_CUDA && !backend_cuda_available())
        return 0; /* the test reports skipped */
    fx->json = fixture_json(fx->name);
    snprintf(path, sizeof path, FIXTURE_DIR "/%s.safetensors", fx->name);
    if (model_load(path, &fx->model, err, sizeof err) != 0)
        fail_msg("%s: %s", path, err);
    if (tokenizer_init(&fx->tk, &fx->model.cfg, err, sizeof err) != 0)
        fail_msg("tokenizer: %s", err);
    fx->be = backend_create(fx->device, err, sizeof err);
    if (!fx->be || backend_set_precision(fx->be, fx->precision, err, sizeof err) != 0 ||
        backend_set_recurrence(fx->be, fx->recurrence, err, sizeof err) != 0)
        fail_msg("backend: %s", err);
    int slots = fx->model.cfg.task == TASK_LM ? 8 : 0;
    fx->engine = engine_create(&fx->model, fx->be, slots, err, sizeof err);
    if (!fx->engine)
        fail_msg("engine: %s", err);
    const cJSON *texts = cJSON_GetObjectItem(fx->json, "texts");
    fx->n = cJSON_GetArraySize(texts);
    fx->ids = calloc((size_t)fx->n, sizeof *fx->ids);
    fx->lens = calloc((size_t)fx->n, sizeof *fx->lens);
    assert_true(fx->ids && fx->lens);
    for (int i = 0; i < fx->n; i++) {
        const char *t = cJSON_GetArrayItem(texts, i)->valuestring;
        size_t n;
        assert_int_equal(tokenizer_encode(&fx->tk, t, strlen(t), &fx->ids[i], &n), 0);
        fx->lens[i] = (int)n;
    }
    return 0;
}

static int fixture_teardown(void **state)
{
    struct fixture *fx = *state;
    for (int i = 0; fx->ids && i < fx->n; i++)
        free(fx->ids[i]);
    free(fx->ids);
    free(fx->lens);
    engine_destroy(fx->engine);
    backend_destroy(fx->be);
    tokenizer_free(&fx->tk);
    model_free(&fx->model);
    cJSON_Delete(fx->json);
    fx->json = NULL;
    fx->ids = NULL;
    fx->lens = NULL;
    fx->engine = NULL;
    fx->be = NULL;
    return 0;
}

/* Outputs of one forward, one block per text. */
struct outputs {
    float **probs, **logits, **attn, **terms;
    double *logprob;
};

static void outputs_alloc(const struct fixture *fx, struct outputs *o)
{
    const struct model_config *c = &fx->model.cfg;
    int K = c->attn_mode == ATTN_NONE ? 0 : c->attn_window;
    o->probs = calloc((size_t)fx->n, sizeof *o->probs);
    o->logits = calloc((size_t)fx->n, sizeof *o->logits);
    o->attn = calloc((size_t)fx->n, sizeof *o->attn);
    o->logprob = calloc((size_t)fx->n, sizeof *o->logprob);
    o->terms = calloc((size_t)fx->n, sizeof *o->terms);
    for (int i = 0; i < fx->n; i++) {
        size_t rows = c->task == TASK_LM ? (size_t)fx->lens[i] : 1;
        o->probs[i] = calloc((size_t)fx->model.head_out, sizeof(float));
        o->logits[i] = calloc(rows * fx->model.head_out, sizeof(float));
        o->terms[i] = calloc(rows, sizeof(float));
        if (K)
            o->attn[i] = calloc((size_t)c->layers * config_directions(c) * fx->lens[i] * K, sizeof(float));
    }
}

static void outputs_free(const struct fixture *fx, struct outputs *o)
{
    for (int i = 0; i < fx->n; i++) {
        free(o->probs[i]);
        free(o->logits[i]);
        free(o->attn[i]);
        free(o->terms[i]);
    }
    free(o->probs);
    free(o->logits);
    free(o->attn);
    free(o->terms);
    free(o->logprob);
}

/* Forward the texts listed in which[] (k of them) as one batch. */
static void run_forward(struct fixture *fx, const int *which, int k, struct outputs *o)
{
    char err[512];
    struct engine_seq *seqs = calloc((size_t)k, sizeof *seqs);
    assert_non_null(seqs);
    for (int j = 0; j < k; j++) {
        int i = which[j];
        seqs[j] = (struct engine_seq){
            .tokens = fx->ids[i], .len = fx->lens[i], .slot = -1,
            .probs = fx->model.cfg.task == TASK_CLASSIFY ? o->probs[i] : NULL,
            .logits = o->logits[i], .attention = o->attn[i],
            .token_logprobs = fx->model.cfg.task == TASK_LM ? o->terms[i] : NULL,
        };
    }
    size_t up = fx->be->copies_up, down = fx->be->copies_down;
    if (engine_forward(fx->engine, seqs, k, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    /* One copy in (the index arrays), one out (the results), and one more
     * for the attention weights. */
    const int attention = fx->model.cfg.attn_mode != ATTN_NONE;
    if (fx->be->copies_up - up != 1 || fx->be->copies_down - down != 1 + (size_t)attention)
        fail_msg("a forward made %zu copies in and %zu out", fx->be->copies_up - up, fx->be->copies_down - down);
    for (int j = 0; j < k; j++)
        o->logprob[which[j]] = seqs[j].logprob;
    free(seqs);
}

static void compare_nested(const cJSON *want, const float *got, size_t *at, const char *what, int text, double tol)
{
    if (cJSON_IsArray(want)) {
        const cJSON *x;
        cJSON_ArrayForEach(x, want) compare_nested(x, got, at, what, text, tol);
        return;
    }
    assert_close(got[*at], want->valuedouble, tol, what, text, (int)*at);
    (*at)++;
}

/* A language model's log-probability of each next token: the fixture's
 * logits after token t, log-softmaxed, at token t + 1 (the last, with no
 * token after it, 0). */
static void check_terms(const struct fixture *fx, int i, const cJSON *logits, const float *terms)
{
    for (int t = 0; t < fx->lens[i]; t++) {
        double want = 0;
        if (t + 1 < fx->lens[i]) {
            const cJSON *row = cJSON_GetArrayItem(logits, t);
            double max = -INFINITY, sum = 0;
            for (const cJSON *x = row->child; x; x = x->next)
                max = fmax(max, x->valuedouble);
            for (const cJSON *x = row->child; x; x = x->next)
                sum += exp(x->valuedouble - max);
            want = cJSON_GetArrayItem(row, fx->ids[i][t + 1])->valuedouble - max - log(sum);
        }
        assert_close(terms[t], want, fx->tol, "token log-probability", i, t);
    }
}

static void check_against_fixture(struct fixture *fx, const struct outputs *o)
{
    const cJSON *logits = cJSON_GetObjectItem(fx->json, "logits");
    const cJSON *probs = cJSON_GetObjectItem(fx->json, "probabilities");
    const cJSON *logprob = cJSON_GetObjectItem(fx->json, "logprob");
    const cJSON *attn = cJSON_GetObjectItem(fx->json, "attention");
    for (int i = 0; i < fx->n; i++) {
        size_t at = 0;
        compare_nested(cJSON_GetArrayItem(logits, i), o->logits[i], &at, "logits", i, fx->tol);
        if (fx->model.cfg.task == TASK_CLASSIFY) {
            at = 0;
            compare_nested(cJSON_GetArrayItem(probs, i), o->probs[i], &at, "probabilities", i, fx->tol);
        } else {
            assert_close(o->logprob[i], cJSON_GetArrayItem(logprob, i)->valuedouble, fx->tol, "logprob", i, 0);
            check_terms(fx, i, cJSON_GetArrayItem(logits, i), o->terms[i]);
        }
        if (cJSON_IsArray(attn)) {
            at = 0;
            compare_nested(cJSON_GetArrayItem(attn, i), o->attn[i], &at, "attention", i, fx->tol);
        }
    }
}

/* Tests start with this: skipped where their backend is absent. */
static struct fixture *fixture_of(void **state)
{
    struct fixture *fx = *state;
    if (!fx->engine)
        skip();
    return fx;
}

static void test_tokens(void **state)
{
    struct fixture *fx = fixture_of(state);
    const cJSON *tokens = cJSON_GetObjectItem(fx->json, "tokens");
    for (int i = 0; i < fx->n; i++) {
        const cJSON *want = cJSON_GetArrayItem(tokens, i);
        assert_int_equal(fx->lens[i], cJSON_GetArraySize(want));
        for (int t = 0; t < fx->lens[i]; t++)
            assert_int_equal(fx->ids[i][t], cJSON_GetArrayItem(want, t)->valueint);
    }
}

/* The whole batch, in order and reversed, and each text alone; then the
 * batch in the backend's other layout (backend_ops.pad_steps: padded on
 * the CPU, packed on a GPU).  A text's results are its own whatever ran
 * beside it: to the bit on the CPU. */
static void test_forward(void **state)
{
    struct fixture *fx = fixture_of(state);
    int *which = malloc((size_t)fx->n * sizeof *which);
    struct outputs batch, alone;
    outputs_alloc(fx, &batch);
    outputs_alloc(fx, &alone);
    for (int i = 0; i < fx->n; i++)
        which[i] = fx->n - 1 - i;
    run_forward(fx, which, fx->n, &batch);
    check_against_fixture(fx, &batch);
    const int lm = fx->model.cfg.task == TASK_LM;
    const size_t attn_per_token = (size_t)fx->model.cfg.layers * config_directions(&fx->model.cfg) *
                                  (fx->model.cfg.attn_mode == ATTN_NONE ? 0 : fx->model.cfg.attn_window);
    for (int i = 0; i < fx->n; i++) {
        run_forward(fx, &i, 1, &alone);
        size_t rows = lm ? (size_t)fx->lens[i] : 1;
        for (size_t k = 0; k < rows * fx->model.head_out; k++)
            assert_close(alone.logits[i][k], batch.logits[i][k], fx->batch_tol, "alone vs batch", i, (int)k);
    }
    check_against_fixture(fx, &alone);

    const struct backend_ops *ops = fx->be->ops;
    struct backend_ops other = *ops;
    other.pad_steps = !ops->pad_steps;
    fx->be->ops = &other;
    run_forward(fx, which, fx->n, &alone);
    fx->be->ops = ops;
    for (int i = 0; i < fx->n; i++) {
        size_t rows = lm ? (size_t)fx->lens[i] : 1;
        for (size_t k = 0; k < rows * fx->model.head_out; k++)
            assert_close(alone.logits[i][k], batch.logits[i][k], fx->batch_tol, "other layout", i, (int)k);
        for (size_t k = 0; k < (size_t)fx->lens[i] * attn_per_token; k++)
            assert_close(alone.attn[i][k], batch.attn[i][k], fx->batch_tol, "other layout's attention", i, (int)k);
        if (lm)
            assert_close(alone.logprob[i], batch.logprob[i], fx->batch_tol, "other layout's logprob", i, 0);
    }
    outputs_free(fx, &batch);
    outputs_free(fx, &alone);
    free(which);
}

/* Language models: every text through the step API, text i joining at step
 * i, and also after a prefill of its first half; the logits after each
 * token must equal the forward's, and no step may move more between host
 * and backend than its tokens and results (on the GPU: nothing of the
 * model is copied in the step loop). */
static void test_steps(void **state)
{
    struct fixture *fx = fixture_of(state);
    char err[512];
    const int V = fx->model.head_out, L = fx->model.cfg.layers;
    const int K = fx->model.cfg.attn_mode == ATTN_NONE ? 0 : fx->model.cfg.attn_window;
    struct outputs ref;
    outputs_alloc(fx, &ref);
    int *all = malloc((size_t)fx->n * sizeof *all);
    for (int i = 0; i < fx->n; i++)
        all[i] = i;
    run_forward(fx, all, fx->n, &ref);

    for (int prefill = 0; prefill < 2; prefill++) {
        int slot[64], pos[64], maxlen = 0;
        assert_true(fx->n <= 64);
        for (int i = 0; i < fx->n; i++) {
            slot[i] = engine_slot_open(fx->engine);
            assert_true(slot[i] >= 0);
            pos[i] = 0;
            if (prefill && fx->lens[i] > 1) {
                float *last = malloc((size_t)V * sizeof(float));
                struct engine_seq q = {.tokens = fx->ids[i], .len = fx->lens[i] / 2, .slot = slot[i],
                                       .last_logits = last};
                if (engine_forward(fx->engine, &q, 1, err, sizeof err) != 0)
                    fail_msg("prefill: %s", err);
                pos[i] = q.len;
                for (int v = 0; v < V; v++)
                    assert_close(last[v], ref.logits[i][(size_t)(pos[i] - 1) * V + v], fx->tol, "prefill", i, v);
                free(last);
            }
            if (fx->lens[i] + i > maxlen)
                maxlen = fx->lens[i] + i;
        }
        float *logits = malloc((size_t)fx->n * V * sizeof(float));
        float *attn = malloc((size_t)fx->n * L * (K ? K : 1) * sizeof(float));
        for (int step = 0; step < maxlen; step++) {
            int slots[64], who[64], n = 0;
            int32_t toks[64];
            for (int i = 0; i < fx->n; i++)
                if (step >= i && pos[i] < fx->lens[i]) {
                    who[n] = i;
                    slots[n] = slot[i];
                    toks[n++] = fx->ids[i][pos[i]];
                }
            if (!n)
                continue;
            size_t up = fx->be->bytes_up, down = fx->be->bytes_down;
            size_t copies = fx->be->copies_up + fx->be->copies_down;
            if (engine_step(fx->engine, slots, toks, n, logits, K ? attn : NULL, err, sizeof err) != 0)
                fail_msg("step: %s", err);
            /* A step moves its rows' token, slot, position and ring row in
             * and their logits and attention out, one copy each way:
             * nothing of the model. */
            if (fx->be->bytes_up - up > 4 * sizeof(int) * (size_t)n ||
                fx->be->bytes_down - down > sizeof(float) * (size_t)n * (V + L * K) ||
                fx->be->copies_up + fx->be->copies_down - copies != 2)
                fail_msg("a step of %d rows moved %zu bytes in and %zu out in %zu copies", n, fx->be->bytes_up - up,
                         fx->be->bytes_down - down, fx->be->copies_up + fx->be->copies_down - copies);
            for (int k = 0; k < n; k++) {
                int i = who[k];
                for (int v = 0; v < V; v++)
                    assert_close(logits[(size_t)k * V + v], ref.logits[i][(size_t)pos[i] * V + v], fx->tol, "step", i,
                                 v);
                for (int l = 0; l < L; l++)
                    for (int j = 0; j < K; j++)
                        assert_close(attn[((size_t)k * L + l) * K + j],
                                     ref.attn[i][((size_t)l * fx->lens[i] + pos[i]) * K + j], fx->tol, "step attention",
                                     i, j);
                pos[i]++;
            }
        }
        for (int i = 0; i < fx->n; i++) {
            assert_int_equal(engine_slot_position(fx->engine, slot[i]), fx->lens[i]);
            engine_slot_close(fx->engine, slot[i]);
        }
        free(logits);
        free(attn);
    }
    outputs_free(fx, &ref);
    free(all);
}

/* Whether the fixture is a language model, read from its JSON. */
static int is_lm(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, FIXTURE_DIR "/%s.json", name);
    char *text = file_read(path, NULL);
    cJSON *j = text ? cJSON_Parse(text) : NULL;
    const cJSON *task = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "config"), "task");
    int lm = cJSON_IsString(task) && strcmp(task->valuestring, "lm") == 0;
    cJSON_Delete(j);
    free(text);
    return lm;
}

/* A fixture is NAME.json beside NAME.safetensors (other JSON files, such
 * as the optimizer fixtures, are not models). */
static int is_fixture(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    char path[512];
    snprintf(path, sizeof path, FIXTURE_DIR "/%.*s.safetensors", (int)n - 5, d->d_name);
    return n > 5 && strcmp(d->d_name + n - 5, ".json") == 0 && access(path, R_OK) == 0;
}

/* Fixtures the tensor-core precisions run on: every cell with the skip,
 * residual and attention schemes between them. */
static int precision_fixture(const char *name)
{
    return strncmp(name, "combo_", 6) == 0 || strstr(name, "_K4M4") || strcmp(name, "plain_gru_l2_lm") == 0;
}

int main(void)
{
    test_filter_from_env();
    struct dirent **names;
    int n = scandir(FIXTURE_DIR, &names, is_fixture, alphasort);
    if (n <= 0) {
        fprintf(stderr, "no fixtures in " FIXTURE_DIR "\n");
        return 1;
    }
    /* The tensor-core precisions round every product's inputs (TF32 to 10
     * mantissa bits, BF16 to 7), so they are held only to what shows they
     * compute the model (a wrong layout or a dropped term is off by far
     * more); what they cost in accuracy is measured on real models by
     * tools/gpu-run.sh precision.  They run on the fixtures that have every
     * feature of a cell at once (precision_fixture). */
    static const struct {
        const char *name;
        enum device_kind device;
        enum precision precision;
        enum recurrence recurrence;
        double tol, batch_tol;
    } devices[] = {
        {"cpu", DEVICE_CPU, PRECISION_FP32, RECURRENCE_GEMM, 1e-5, 0},
        {"cuda", DEVICE_CUDA, PRECISION_FP32, RECURRENCE_GEMM, 1e-4, 1e-5},
        {"cuda_fused", DEVICE_CUDA, PRECISION_FP32, RECURRENCE_FUSED, 1e-4, 1e-5},
        {"cuda_tf32", DEVICE_CUDA, PRECISION_TF32, RECURRENCE_GEMM, 2e-2, 2e-2},
        {"cuda_bf16", DEVICE_CUDA, PRECISION_BF16, RECURRENCE_GEMM, 1e-1, 1e-1},
    };
    const int n_dev = sizeof devices / sizeof devices[0];
    static void (*const fns[3])(void **) = {test_tokens, test_forward, test_steps};
    static const char *const kinds[3] = {"tokens", "forward", "steps"};
    struct fixture *fx = calloc((size_t)n * n_dev, sizeof *fx);
    struct CMUnitTest *tests = calloc(3 * (size_t)n * n_dev, sizeof *tests);
    char (*labels)[160] = calloc(3 * (size_t)n * n_dev, sizeof *labels);
    if (!fx || !tests || !labels)
        return 1;
    size_t count = 0;
    for (int i = 0; i < n; i++) {
        int len = (int)strlen(names[i]->d_name) - 5;
        for (int d = 0; d < n_dev; d++) {
            struct fixture *f = &fx[i * n_dev + d];
            snprintf(f->name, sizeof f->name, "%.*s", len, names[i]->d_name);
            if (devices[d].precision != PRECISION_FP32 && !precision_fixture(f->name))
                continue;
            f->device = devices[d].device;
            f->precision = devices[d].precision;
            f->recurrence = devices[d].recurrence;
            f->tol = devices[d].tol;
            f->batch_tol = devices[d].batch_tol;
            int kinds_here = is_lm(f->name) ? 3 : 2; /* steps only for language models */
            for (int k = 0; k < kinds_here; k++) {
                snprintf(labels[count], sizeof labels[count], "%s_%s_%s", kinds[k], devices[d].name, f->name);
                tests[count] = (struct CMUnitTest){labels[count], fns[k], fixture_setup, fixture_teardown, f};
                count++;
            }
        }
        free(names[i]);
    }
    free(names);
    int failed = _cmocka_run_group_tests("fixtures", tests, count, NULL, NULL);
    free(fx);
    free(tests);
    free(labels);
    return failed;
}
