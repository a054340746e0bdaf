/* test_optim.c - the optimizers against PyTorch, the learning-rate
 * schedule and gradient clipping.
 *
 * tests/fixtures/optim_expected.json holds five steps of torch.optim for
 * every optimizer (tests/fixtures/make_optim_fixtures.py); each case names
 * only the options it sets, so matching it also checks optim_defaults().
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "optim.h"

#include "support/files.h"

#define FIXTURE "tests/fixtures/optim_expected.json"
#define MAX_PARAMS 16
#define MAX_STEPS 8

/* PyTorch's CPU kernels fuse p + alpha * d into one rounding where they
 * are built for FMA (AVX2, AVX-512) and optim.c rounds twice: up to an ulp
 * of the operands' size (parameters and steps around 1) apart. */
#define TOL 2.4e-7

struct fixture {
    cJSON *json;
    int n, steps;
    float init[MAX_PARAMS];
    float grads[MAX_STEPS][MAX_PARAMS];
};

/* A JSON array of numbers into out[]; returns its length. */
static int read_floats(const cJSON *arr, float *out, int max)
{
    int n = cJSON_GetArraySize(arr);
    assert_true(cJSON_IsArray(arr) && n > 0 && n <= max);
    for (int i = 0; i < n; i++) {
        const cJSON *v = cJSON_GetArrayItem(arr, i);
        assert_true(cJSON_IsNumber(v));
        out[i] = (float)v->valuedouble;
    }
    return n;
}

static int setup(void **state)
{
    static struct fixture fx;
    char *text = file_read(FIXTURE, NULL);
    if (!text)
        fail_msg("cannot read %s", FIXTURE);
    fx.json = cJSON_Parse(text);
    free(text);
    assert_non_null(fx.json);
    fx.n = read_floats(cJSON_GetObjectItem(fx.json, "params"), fx.init, MAX_PARAMS);
    const cJSON *grads = cJSON_GetObjectItem(fx.json, "grads");
    fx.steps = cJSON_GetArraySize(grads);
    assert_true(fx.steps > 0 && fx.steps <= MAX_STEPS);
    for (int s = 0; s < fx.steps; s++)
        assert_int_equal(read_floats(cJSON_GetArrayItem(grads, s), fx.grads[s], MAX_PARAMS), fx.n);
    *state = &fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    cJSON_Delete(fx->json);
    return 0;
}

/* The case's optimizer: PyTorch's defaults, then the options it names. */
static void case_config(const cJSON *c, struct optim_config *cfg)
{
    const char *kind = cJSON_GetStringValue(cJSON_GetObjectItem(c, "optimizer"));
    assert_non_null(kind);
    int k = optim_kind_from_name(kind);
    assert_true(k >= 0);
    optim_defaults(cfg, (enum optim_kind)k);
    const struct {
        const char *name;
        float *field;
    } fields[] = {
        {"lr", &cfg->lr},     {"momentum", &cfg->momentum}, {"beta1", &cfg->beta1},
        {"beta2", &cfg->beta2}, {"alpha", &cfg->alpha},     {"rho", &cfg->rho},
        {"eps", &cfg->eps},   {"weight_decay", &cfg->weight_decay},
    };
    const cJSON *opt;
    cJSON_ArrayForEach(opt, cJSON_GetObjectItem(c, "config")) {
        if (strcmp(opt->string, "nesterov") == 0) {
            cfg->nesterov = opt->valueint;
            continue;
        }
        size_t f = 0;
        while (f < sizeof fields / sizeof fields[0] && strcmp(opt->string, fields[f].name) != 0)
            f++;
        if (f == sizeof fields / sizeof fields[0])
            fail_msg("unknown option %s", opt->string);
        *fields[f].field = (float)opt->valuedouble;
    }
}

static void assert_params(const char *name, int step, const float *got, const cJSON *want_arr, int n)
{
    float want[MAX_PARAMS];
    assert_int_equal(read_floats(want_arr, want, MAX_PARAMS), n);
    for (int i = 0; i < n; i++) {
        if (!(fabsf(got[i] - want[i]) <= TOL * fmaxf(1.0f, fabsf(want[i]))))
            fail_msg("%s step %d param %d: got %.9g, PyTorch %.9g", name, step + 1, i, got[i], want[i]);
    }
}

static void test_matches_pytorch(void **state)
{
    const struct fixture *fx = *state;
    const cJSON *c;
    int cases = 0;

    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->json, "cases")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(c, "name"));
        const cJSON *expected = cJSON_GetObjectItem(c, "expected");
        struct optim_config cfg;
        float p[MAX_PARAMS];

        case_config(c, &cfg);
        assert_int_equal(cJSON_GetArraySize(expected), fx->steps);
        memcpy(p, fx->init, sizeof p);
        struct optim *o = optim_new(&cfg, (size_t)fx->n);
        assert_non_null(o);
        for (int s = 0; s < fx->steps; s++) {
            optim_step(o, p, fx->grads[s], s);
            assert_params(name, s, p, cJSON_GetArrayItem(expected, s), fx->n);
        }
        optim_free(o);
        cases++;
    }
    /* Every optimizer, each plain and with its options. */
    assert_int_equal(cases, 11);
}

/* Stopping after two steps and going on from a copy of the state, as a
 * checkpoint does, gives the same parameters as running straight through. */
static void test_state_restores(void **state)
{
    const struct fixture *fx = *state;
    const cJSON *c;

    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->json, "cases")) {
        struct optim_config cfg;
        float straight[MAX_PARAMS], resumed[MAX_PARAMS];

        case_config(c, &cfg);
        memcpy(straight, fx->init, sizeof straight);
        struct optim *a = optim_new(&cfg, (size_t)fx->n);
        struct optim *b = optim_new(&cfg, (size_t)fx->n);
        assert_non_null(a);
        assert_non_null(b);
        for (int s = 0; s < 2; s++)
            optim_step(a, straight, fx->grads[s], s);
        memcpy(resumed, straight, sizeof resumed);
        assert_int_equal(optim_state_len(a), optim_state_len(b));
        if (optim_state_len(a) > 0)
            memcpy(optim_state(b), optim_state(a), optim_state_len(a) * sizeof(float));
        for (int s = 2; s < fx->steps; s++) {
            optim_step(a, straight, fx->grads[s], s);
            optim_step(b, resumed, fx->grads[s], s);
        }
        assert_memory_equal(straight, resumed, (size_t)fx->n * sizeof(float));
        optim_free(a);
        optim_free(b);
    }
}

static void test_state_len(void **state)
{
    (void)state;
    const struct {
        enum optim_kind kind;
        float momentum;
        size_t arrays;
    } want[] = {
        {OPTIM_SGD, 0.0f, 0},     {OPTIM_SGD, 0.9f, 1},   {OPTIM_RMSPROP, 0.0f, 1}, {OPTIM_RMSPROP, 0.9f, 2},
        {OPTIM_ADAM, 0.0f, 2},    {OPTIM_ADAMW, 0.0f, 2}, {OPTIM_ADADELTA, 0.0f, 2},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        struct optim_config cfg;
        optim_defaults(&cfg, want[i].kind);
        cfg.momentum = want[i].momentum;
        struct optim *o = optim_new(&cfg, 10);
        assert_non_null(o);
        assert_int_equal(optim_state_len(o), want[i].arrays * 10);
        for (size_t j = 0; j < optim_state_len(o); j++)
            assert_true(optim_state(o)[j] == 0.0f);
        optim_free(o);
    }
}

static void test_names_and_defaults(void **state)
{
    (void)state;
    const char *names[] = {"sgd", "rmsprop", "adam", "adamw", "adadelta"};
    for (int k = 0; k < 5; k++) {
        assert_int_equal(optim_kind_from_name(names[k]), k);
        assert_string_equal(optim_kind_name((enum optim_kind)k), names[k]);
    }
    assert_int_equal(optim_kind_from_name("Adam"), -1);
    assert_int_equal(optim_kind_from_name(""), -1);

    struct optim_config c;
    optim_defaults(&c, OPTIM_ADAMW);
    assert_int_equal(c.kind, OPTIM_ADAMW);
    assert_true(c.lr == 1e-3f && c.beta1 == 0.9f && c.beta2 == 0.999f && c.eps == 1e-8f);
    assert_true(c.weight_decay == 1e-2f);
    /* No schedule and no clipping unless asked for. */
    assert_int_equal(c.decay, DECAY_NONE);
    assert_int_equal(c.warmup_steps, 0);
    assert_true(c.clip_norm == 0.0f);
    assert_true(optim_lr(&c, 0) == 1e-3f && optim_lr(&c, 1000000) == 1e-3f);
    optim_defaults(&c, OPTIM_ADADELTA);
    assert_true(c.lr == 1.0f && c.rho == 0.9f && c.eps == 1e-6f && c.weight_decay == 0.0f);
    optim_defaults(&c, OPTIM_RMSPROP);
    assert_true(c.lr == 1e-2f && c.alpha == 0.99f && c.eps == 1e-8f && c.momentum == 0.0f);
}

static void assert_lr(const struct optim_config *c, long step, double want)
{
    float got = optim_lr(c, step);
    if (!(fabs(got - want) <= 1e-6 * fabs(want) + 1e-12))
        fail_msg("lr at step %ld: got %.9g, want %.9g", step, got, want);
}

static void test_schedule(void **state)
{
    (void)state;
    struct optim_config c;
    optim_defaults(&c, OPTIM_ADAM);
    c.lr = 0.1f;
    c.min_lr = 0.01f;
    c.warmup_steps = 10;
    c.total_steps = 110;

    /* Warm-up: from 0, a tenth of the way each step, whatever the decay. */
    for (int d = DECAY_NONE; d <= DECAY_STEP; d++) {
        c.decay = (enum lr_decay)d;
        assert_lr(&c, 0, 0.0);
        assert_lr(&c, 1, 0.01);
        assert_lr(&c, 5, 0.05);
        assert_lr(&c, 9, 0.09);
        assert_lr(&c, 10, 0.1);
    }

    c.decay = DECAY_NONE;
    assert_lr(&c, 110, 0.1);
    assert_lr(&c, 5000, 0.1);

    /* Linear: from lr at the end of warm-up to min_lr at total_steps. */
    c.decay = DECAY_LINEAR;
    assert_lr(&c, 35, 0.1 - 0.09 * 0.25);
    assert_lr(&c, 60, 0.055);
    assert_lr(&c, 109, 0.01 + 0.09 * 0.01);
    assert_lr(&c, 110, 0.01);
    assert_lr(&c, 1000, 0.01);

    c.decay = DECAY_COSINE;
    assert_lr(&c, 35, 0.01 + 0.09 * 0.5 * (1.0 + sqrt(0.5)));
    assert_lr(&c, 60, 0.055);
    assert_lr(&c, 85, 0.01 + 0.09 * 0.5 * (1.0 - sqrt(0.5)));
    assert_lr(&c, 110, 0.01);
    assert_lr(&c, 1000, 0.01);

    /* Step: times gamma every step_every steps after warm-up; no floor. */
    c.decay = DECAY_STEP;
    c.step_every = 30;
    c.step_gamma = 0.5f;
    assert_lr(&c, 39, 0.1);
    assert_lr(&c, 40, 0.05);
    assert_lr(&c, 69, 0.05);
    assert_lr(&c, 70, 0.025);
    assert_lr(&c, 310, 0.1 / 1024.0);

    /* No warm-up: the schedule starts at the peak. */
    c.warmup_steps = 0;
    c.total_steps = 100;
    c.decay = DECAY_LINEAR;
    c.min_lr = 0.0f;
    assert_lr(&c, 0, 0.1);
    assert_lr(&c, 50, 0.05);
    assert_lr(&c, 100, 0.0);
}

static double norm_of(const float *g, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)g[i] * g[i];
    return sqrt(s);
}

static void test_clip(void **state)
{
    (void)state;
    enum { N = 1000 };
    static float g[N], orig[N];
    for (int i = 0; i < N; i++)
        orig[i] = (float)(((i * 37) % 101) - 50) / 7.0f;
    double want = norm_of(orig, N);

    /* Over the limit: the norm before is returned, the norm after is the
     * limit and the direction is kept. */
    memcpy(g, orig, sizeof g);
    double got = optim_clip(g, N, 10.0f);
    assert_true(fabs(got - want) <= 1e-12 * want);
    assert_true(want > 10.0);
    assert_true(fabs(norm_of(g, N) - 10.0) <= 1e-5);
    for (int i = 0; i < N; i++)
        assert_true(fabsf(g[i] - (float)(orig[i] * (10.0 / want))) <= 1e-7f);

    /* Under the limit, or no limit: untouched. */
    memcpy(g, orig, sizeof g);
    assert_true(optim_clip(g, N, (float)(want * 2)) == got);
    assert_memory_equal(g, orig, sizeof g);
    assert_true(optim_clip(g, N, 0.0f) == got);
    assert_memory_equal(g, orig, sizeof g);

    /* The sum is in double: after a 1, a float sum drops each square of
     * 2^-13 (2^-26, under half an ulp of 1) and would return 1. */
    enum { BIG = (1 << 20) + 1 };
    float *tiny = malloc(BIG * sizeof *tiny);
    assert_non_null(tiny);
    tiny[0] = 1.0f;
    for (int i = 1; i < BIG; i++)
        tiny[i] = 0x1p-13f;
    assert_true(optim_clip(tiny, BIG, 0.0f) == sqrt(1.0 + 0x1p-6));
    free(tiny);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_pytorch),
        cmocka_unit_test(test_state_restores),
        cmocka_unit_test(test_state_len),
        cmocka_unit_test(test_names_and_defaults),
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_clip),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
