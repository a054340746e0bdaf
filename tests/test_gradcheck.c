/* test_gradcheck.c - the backward pass against central finite differences,
 * for every fixture model (every cell, connection scheme, head, direction
 * and pooling), on the CPU and, in a binary built with CUDA, on the GPU
 * (reported as skipped where there is none).
 *
 * The engine computes in float32, so single-weight differences drown in
 * rounding; instead each tensor is checked along a random +-1 direction u:
 * (L(w + eps u) - L(w - eps u)) / 2 eps against g . u, which sums the
 * contributions of every weight of the tensor.  eps is 1e-3 (1e-4 for ReLU
 * cells, whose kinks a larger step would cross); the truncation error is
 * O(eps^2), and float32 rounding of the two losses adds up to about
 * 4 * 6e-8 * |L| / eps to the quotient.  We allow 2% of the larger of the
 * two derivatives, plus that rounding bound, plus 1e-4.  A wrong term in
 * any backward formula moves the directional derivative by far more (the
 * tests were checked by breaking the backward on purpose).
 *
 * Language models are also checked on a second window that carries its
 * state from the first (truncated backpropagation: the carried state is
 * held fixed while the weights move).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "rng.h"
#include "support/filter.h"
#include "support/model_json.h"

#define FIXTURE_DIR "tests/fixtures"

struct check {
    char name[128];
    char label[160];      /* the test's name: the device, then name */
    enum device_kind device;
    struct model model;
    struct backend *be;
    struct engine *e;
    int carried;          /* lm: check the second of two windows */
    float eps;
    const char *config;   /* a vector-input model made in the test, or NULL */
    int32_t tok[3][24];
    float vec[3][24 * 3], target[3][2];
    int len[3];
    int labels[3];
    int slot[3];
};

static int setup(void **state)
{
    struct check *c = *state;
    char path[256], err[512];
    if (c->config) {
        model_from_json(c->config, 1, 3, &c->model);
    } else {
        snprintf(path, sizeof path, FIXTURE_DIR "/%s.safetensors", c->name);
        if (model_load(path, &c->model, err, sizeof err) != 0)
            fail_msg("%s: %s", path, err);
    }
    if (c->device == DEVICE_CUDA && backend_resolve(DEVICE_AUTO) != DEVICE_CUDA)
        return 0; /* no GPU: the test reports skipped */
    if (!(c->be = backend_create(c->device, err, sizeof err)))
        fail_msg("backend: %s", err);
    int lm = c->model.cfg.task == TASK_LM;
    c->e = engine_create(&c->model, c->be, lm ? 3 : 0, err, sizeof err);
    /* ReLU's kinks: a smaller step crosses fewer of them. */
    c->eps = c->model.cfg.cell == CELL_RNN_RELU ? 1e-4f : 1e-3f;
    if (!c->e)
        fail_msg("engine: %s", err);
    struct rng r, rv; /* tokens and labels; vectors and targets */
    rng_seed(&r, 17);
    rng_seed(&rv, 18);
    static const int lens[3] = {7, 12, 3};
    for (int i = 0; i < 3; i++) {
        c->len[i] = lens[i];
        for (int t = 0; t < 24; t++)
            c->tok[i][t] = c->model.vocab ? (int32_t)(rng_next(&r) % (uint64_t)c->model.vocab) : 0;
        c->labels[i] = (int)(rng_next(&r) % (uint64_t)(lm || !c->model.cfg.n_classes ? 1 : c->model.head_out));
        c->slot[i] = -1;
        for (int k = 0; k < 24 * 3; k++)
            c->vec[i][k] = (float)(2.0 * rng_uniform(&rv) - 1.0);
        for (int k = 0; k < 2; k++)
            c->target[i][k] = (float)rng_uniform(&rv);
    }
    return 0;
}

static int teardown(void **state)
{
    struct check *c = *state;
    engine_destroy(c->e);
    backend_destroy(c->be);
    model_free(&c->model);
    return 0;
}

/* A carried check's first window: odd, so that the second starts at an
 * odd position and a model with two recurrent matrices (combo_lstm_lm)
 * begins it with the second, as the backward must follow. */
#define FIRST_WINDOW 5

/* Sequence i of the checked batch: its tokens (or vectors) and target,
 * past the first window when the check carries state, in its slot. */
static struct engine_seq batch_seq(const struct check *c, int i)
{
    const int off = c->carried ? FIRST_WINDOW : 0, vectors = c->model.cfg.input_dim > 0;
    return (struct engine_seq){.tokens = vectors ? NULL : c->tok[i] + off, .len = c->len[i],
                               .inputs = vectors ? c->vec[i] : NULL, .target = c->target[i],
                               .slot = c->carried ? c->slot[i] : -1,
                               .next = c->model.cfg.task == TASK_LM ? c->tok[i] + off + c->len[i] : NULL};
}

/* The mean loss of the batch (and, as a side effect, its gradients added
 * to the engine's).  With carried state, the first windows run at the
 * weights in `base` and the second at the current ones. */
static double loss_at(struct check *c, const float *base, const float *current)
{
    char err[512];
    struct engine_seq q[3];
    if (c->carried) {
        assert_int_equal(engine_params_from_host(c->e, base), 0);
        for (int i = 0; i < 3; i++) {
            engine_slot_close(c->e, c->slot[i]);
            c->slot[i] = engine_slot_open(c->e);
            q[i] = (struct engine_seq){.tokens = c->tok[i], .len = FIRST_WINDOW, .slot = c->slot[i],
                                       .next = c->tok[i] + FIRST_WINDOW};
        }
        if (engine_forward(c->e, q, 3, err, sizeof err) != 0)
            fail_msg("first window: %s", err);
    }
    assert_int_equal(engine_params_from_host(c->e, current), 0);
    for (int i = 0; i < 3; i++)
        q[i] = batch_seq(c, i);
    struct train_result res = {0};
    const struct train_options no_dropout = {0.0f, 0.0f, 1};
    if (engine_train_batch(c->e, q, 3, c->labels, &no_dropout, &res, err, sizeof err) != 0)
        fail_msg("train: %s", err);
    return res.loss / (double)res.count;
}

/* The batch's mean loss as inference computes it (engine_forward): the
 * language model's negative log-probability a scored token, the
 * classifier's of its label a text, the regression's squared error an
 * output.  Training must minimise the loss inference reports, so its own
 * must be this one, count and scale included.  For a check that carries
 * no state. */
static double inference_loss(struct check *c)
{
    char err[512];
    const int C = c->model.head_out;
    struct engine_seq q[3];
    float out[3][64];
    assert_true(C <= 64 && (c->model.cfg.task != TASK_REGRESS || C <= 2)); /* target[3][2] */
    for (int i = 0; i < 3; i++) {
        q[i] = batch_seq(c, i);
        q[i].probs = c->model.cfg.task == TASK_CLASSIFY ? out[i] : NULL;
        q[i].logits = c->model.cfg.task == TASK_REGRESS ? out[i] : NULL;
    }
    if (engine_forward(c->e, q, 3, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    double sum = 0.0, count = 0.0;
    for (int i = 0; i < 3; i++) {
        if (c->model.cfg.task == TASK_LM) {
            sum -= q[i].logprob;
            count += c->len[i];
        } else if (c->model.cfg.task == TASK_CLASSIFY) {
            sum -= log(out[i][c->labels[i]]);
            count += 1;
        } else {
            for (int k = 0; k < C; k++)
                sum += ((double)out[i][k] - c->target[i][k]) * ((double)out[i][k] - c->target[i][k]);
            count += C;
        }
    }
    return sum / count;
}

static void run_check(struct check *c)
{
    size_t n = c->model.n_params;
    float *base = malloc(n * sizeof(float)), *moved = malloc(n * sizeof(float)), *grad = malloc(n * sizeof(float));
    assert_true(base && moved && grad);
    memcpy(base, c->model.arena, n * sizeof(float));
    assert_int_equal(engine_zero_grads(c->e), 0);
    const double loss = loss_at(c, base, base);
    if (!c->carried) {
        const double want = inference_loss(c);
        if (!(fabs(loss - want) <= 1e-5 * fmax(1.0, fabs(want))))
            fail_msg("%s: training's loss %.9g, inference's %.9g", c->name, loss, want);
    }
    assert_int_equal(engine_grads_to_host(c->e, grad), 0);

    struct model_tensor *t;
    int nt;
    assert_int_equal(model_tensors(&c->model, &t, &nt), 0);
    struct rng r;
    rng_seed(&r, 5);
    for (int k = 0; k < nt; k++) {
        size_t at = (size_t)(t[k].data - c->model.arena), len = (size_t)t[k].shape[0] * (t[k].ndim > 1 ? t[k].shape[1] : 1);
        double analytic = 0.0;
        memcpy(moved, base, n * sizeof(float));
        for (size_t i = 0; i < len; i++) {
            float u = rng_next(&r) & 1 ? 1.0f : -1.0f;
            analytic += (double)grad[at + i] * u;
            moved[at + i] = base[at + i] + c->eps * u;
        }
        double plus = loss_at(c, base, moved);
        for (size_t i = 0; i < len; i++)
            moved[at + i] = 2.0f * base[at + i] - moved[at + i];
        double minus = loss_at(c, base, moved);
        double numeric = (plus - minus) / (2.0 * c->eps);
        /* float32 rounding of the two losses, magnified by 1 / 2 eps. */
        double rounding = 4.0 * 6e-8 * fmax(fabs(plus), fabs(minus)) / c->eps;
        double tol = 2e-2 * fmax(fabs(numeric), fabs(analytic)) + rounding + 1e-4;
        if (!(fabs(numeric - analytic) <= tol))
            fail_msg("%s %s: finite difference %.6g, backward %.6g", c->name, t[k].name, numeric, analytic);
    }
    free(t);
    free(base);
    free(moved);
    free(grad);
}

static void test_gradient(void **state)
{
    struct check *c = *state;
    if (!c->e)
        skip();
    run_check(c);
}

static int is_fixture(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    return n > 12 && strcmp(d->d_name + n - 12, ".safetensors") == 0;
}

/* The devices every check runs on. */
static const enum device_kind devices[] = {DEVICE_CPU, DEVICE_CUDA};
#define N_DEVICES (int)(sizeof devices / sizeof devices[0])

/* The synthetic tasks' models: vector inputs and a regression head. */
static const char *const vector_models[][2] = {
    {"vector_skip_relu_D", "{\"task\": \"regress\", \"cell\": \"rnn_relu\", \"hidden\": 6, \"outputs\": 2,"
                           " \"input\": {\"type\": \"vector\", \"dim\": 3}, \"skip\": {\"period\": 2, \"matrices\": 2}}"},
    {"vector_rra_lstm", "{\"task\": \"regress\", \"cell\": \"lstm\", \"hidden\": 5, \"layers\": 2, \"outputs\": 1,"
                        " \"input\": {\"type\": \"vector\", \"dim\": 3}, \"attention\": {\"window\": 3, \"mode\": \"dynamic\"}}"},
    {"vector_gru_bi_mean", "{\"task\": \"regress\", \"cell\": \"gru\", \"hidden\": 4, \"bidirectional\": true,"
                           " \"pool\": \"mean\", \"outputs\": 2, \"input\": {\"type\": \"vector\", \"dim\": 3}}"},
};
#define N_VECTOR (int)(sizeof vector_models / sizeof vector_models[0])

/* One test: check k on device d, named "cpu/NAME" or "cuda/NAME" (with
 * "/carried" for the second window of a language model). */
static struct CMUnitTest make_test(struct check *k, enum device_kind d)
{
    k->device = d;
    snprintf(k->label, sizeof k->label, "%s/%s%s", d == DEVICE_CUDA ? "cuda" : "cpu", k->name,
             k->carried ? "/carried" : "");
    return (struct CMUnitTest){k->label, test_gradient, setup, teardown, k};
}

int main(void)
{
    test_filter_from_env();
    struct dirent **names;
    int n = scandir(FIXTURE_DIR, &names, is_fixture, alphasort);
    if (n <= 0)
        return 1;
    size_t cap = (size_t)N_DEVICES * (2 * (size_t)n + N_VECTOR);
    struct check *c = calloc(cap, sizeof *c);
    struct CMUnitTest *tests = calloc(cap, sizeof *tests);
    if (!c || !tests)
        return 1;
    int count = 0;
    for (int d = 0; d < N_DEVICES; d++) {
        for (int i = 0; i < n; i++) {
            int lm = strstr(names[i]->d_name, "_lm") != NULL;
            for (int carried = 0; carried <= lm; carried++) {
                struct check *k = &c[count];
                snprintf(k->name, sizeof k->name, "%.*s", (int)strlen(names[i]->d_name) - 12, names[i]->d_name);
                k->carried = carried;
                tests[count++] = make_test(k, devices[d]);
            }
        }
        for (int i = 0; i < N_VECTOR; i++) {
            struct check *k = &c[count];
            snprintf(k->name, sizeof k->name, "%s", vector_models[i][0]);
            k->config = vector_models[i][1];
            tests[count++] = make_test(k, devices[d]);
        }
    }
    for (int i = 0; i < n; i++)
        free(names[i]);
    free(names);
    int failed = _cmocka_run_group_tests("gradcheck", tests, (size_t)count, NULL, NULL);
    free(c);
    free(tests);
    return failed;
}
