/* test_optim.c - the optimizers against PyTorch, the learning-rate
 * schedule and gradient clipping, on the CPU backend and on CUDA (whose
 * tests are skipped without a GPU, and run on the emulator's build).
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

#include "backend.h"
#include "optim.h"

#include "support/files.h"
#include "support/filter.h"

#define FIXTURE "tests/fixtures/optim_expected.json"
#define MAX_PARAMS 16
#define MAX_STEPS 8

/* PyTorch's CPU kernels fuse p + alpha * d into one rounding where they
 * are built for FMA (AVX2, AVX-512) and optim_update.h rounds twice: up to an ulp
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

/* A check's two tests, test_CHECK on the CPU and test_cuda_CHECK on CUDA
 * (skipped without a GPU; the emulator's build runs those named *cuda*). */
#define ON_BOTH_BACKENDS(check)                                                                                   \
    static void test_##check(void **state)                                                                       \
    {                                                                                                             \
        check(*state, DEVICE_CPU);                                                                               \
    }                                                                                                             \
    static void test_cuda_##check(void **state)                                                                  \
    {                                                                                                             \
        check(*state, DEVICE_CUDA);                                                                              \
    }

/* One optimizer's arrays on a backend: parameters, gradients, state, and
 * where a step leaves the gradients' sum of squares. */
struct run {
    struct backend *be;
    float *p, *g, *state;
    double *squares;
    size_t n, state_len;
};

/* The test skipped where the device is CUDA and there is no GPU: each
 * test asks first, before it allocates what skipping would leak. */
static void need(enum device_kind dev)
{
    if (dev == DEVICE_CUDA && !backend_cuda_available())
        skip();
}

static void run_open(struct run *r, enum device_kind dev, const struct optim_config *cfg, const float *init,
                     size_t n)
{
    char err[256];
    memset(r, 0, sizeof *r);
    if (!(r->be = backend_create(dev, err, sizeof err)))
        fail_msg("backend: %s", err);
    r->n = n;
    r->state_len = (size_t)optim_state_arrays(cfg->kind, cfg->momentum) * n;
    assert_non_null(r->p = r->be->ops->alloc(r->be, n * sizeof(float)));
    assert_non_null(r->g = r->be->ops->alloc(r->be, n * sizeof(float)));
    assert_non_null(r->squares = r->be->ops->alloc(r->be, sizeof(double)));
    assert_int_equal(r->be->ops->upload(r->be, r->p, init, n * sizeof(float)), 0);
    if (r->state_len) {
        assert_non_null(r->state = r->be->ops->alloc(r->be, r->state_len * sizeof(float)));
        r->be->ops->zero(r->be, r->state, r->state_len * sizeof(float));
    }
}

static void run_close(struct run *r)
{
    r->be->ops->free(r->be, r->p);
    r->be->ops->free(r->be, r->g);
    r->be->ops->free(r->be, r->state);
    r->be->ops->free(r->be, r->squares);
    backend_destroy(r->be);
}

/* Step s (0-based) of cfg with the gradients grad; returns the sum of
 * their squares the step reported. */
static double run_step(struct run *r, const struct optim_config *cfg, long s, const float *grad)
{
    struct optim_update u;
    double squares;
    optim_update_at(cfg, s, &u);
    assert_int_equal(r->be->ops->upload(r->be, r->g, grad, r->n * sizeof(float)), 0);
    r->be->ops->optim_step(r->be, &u, r->p, r->g, r->state, r->n, r->squares);
    if (r->be->ops->download(r->be, &squares, r->squares, sizeof squares) != 0 || backend_sync(r->be) != 0)
        fail_msg("optim_step: %s", r->be->err);
    return squares;
}

static void run_params(struct run *r, float *p)
{
    assert_int_equal(r->be->ops->download(r->be, p, r->p, r->n * sizeof(float)), 0);
}

/* Five steps of every optimizer, each plain and with its options, match
 * PyTorch's. */
static void matches_pytorch(const struct fixture *fx, enum device_kind dev)
{
    const cJSON *c;
    int cases = 0;
    need(dev);

    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->json, "cases")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(c, "name"));
        const cJSON *expected = cJSON_GetObjectItem(c, "expected");
        struct optim_config cfg;
        struct run r;
        float p[MAX_PARAMS];

        case_config(c, &cfg);
        assert_int_equal(cJSON_GetArraySize(expected), fx->steps);
        run_open(&r, dev, &cfg, fx->init, (size_t)fx->n);
        for (int s = 0; s < fx->steps; s++) {
            run_step(&r, &cfg, s, fx->grads[s]);
            run_params(&r, p);
            assert_params(name, s, p, cJSON_GetArrayItem(expected, s), fx->n);
        }
        run_close(&r);
        cases++;
    }
    assert_int_equal(cases, 11);
}

ON_BOTH_BACKENDS(matches_pytorch)

/* Stopping after two steps and going on from a copy of the state (read
 * back to the host and put on another backend, as a checkpoint does)
 * gives the same parameters as running straight through. */
static void state_restores(const struct fixture *fx, enum device_kind dev)
{
    const cJSON *c;
    need(dev);

    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->json, "cases")) {
        struct optim_config cfg;
        struct run a, b;
        float straight[MAX_PARAMS], resumed[MAX_PARAMS], saved[2 * MAX_PARAMS];

        case_config(c, &cfg);
        run_open(&a, dev, &cfg, fx->init, (size_t)fx->n);
        for (int s = 0; s < 2; s++)
            run_step(&a, &cfg, s, fx->grads[s]);
        run_params(&a, straight);
        run_open(&b, dev, &cfg, straight, (size_t)fx->n);
        assert_true(a.state_len <= 2 * MAX_PARAMS);
        if (a.state_len > 0) {
            assert_int_equal(a.be->ops->download(a.be, saved, a.state, a.state_len * sizeof(float)), 0);
            assert_int_equal(b.be->ops->upload(b.be, b.state, saved, b.state_len * sizeof(float)), 0);
        }
        for (int s = 2; s < fx->steps; s++) {
            run_step(&a, &cfg, s, fx->grads[s]);
            run_step(&b, &cfg, s, fx->grads[s]);
        }
        run_params(&a, straight);
        run_params(&b, resumed);
        assert_memory_equal(straight, resumed, (size_t)fx->n * sizeof(float));
        run_close(&a);
        run_close(&b);
    }
}

ON_BOTH_BACKENDS(state_restores)

/* A step whose gradients are not all finite reports so and changes
 * neither the parameters nor the state, whatever the rule; one whose
 * gradients are finite reports their sum of squares. */
static void nonfinite_changes_nothing(const struct fixture *fx, enum device_kind dev)
{
    const cJSON *c;
    need(dev);
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->json, "cases")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(c, "name"));
        struct optim_config cfg;
        struct run r;
        float before[MAX_PARAMS], after[MAX_PARAMS], bad[MAX_PARAMS];
        float state_before[2 * MAX_PARAMS], state_after[2 * MAX_PARAMS];
        case_config(c, &cfg);
        run_open(&r, dev, &cfg, fx->init, (size_t)fx->n);
        double want = 0;
        for (int i = 0; i < fx->n; i++)
            want += (double)fx->grads[0][i] * fx->grads[0][i];
        if (!(fabs(run_step(&r, &cfg, 0, fx->grads[0]) - want) <= 1e-12 * want))
            fail_msg("%s: the sum of squares is not the gradients'", name);
        run_params(&r, before);
        if (r.state_len)
            assert_int_equal(r.be->ops->download(r.be, state_before, r.state, r.state_len * sizeof(float)), 0);
        for (int k = 0; k < 2; k++) {
            memcpy(bad, fx->grads[1], sizeof bad);
            bad[fx->n / 2] = k ? NAN : INFINITY;
            if (isfinite(run_step(&r, &cfg, 1, bad)))
                fail_msg("%s: a step with a %s gradient reports a finite sum", name, k ? "NaN" : "infinite");
            run_params(&r, after);
            assert_memory_equal(before, after, (size_t)fx->n * sizeof(float));
            if (r.state_len) {
                assert_int_equal(r.be->ops->download(r.be, state_after, r.state, r.state_len * sizeof(float)), 0);
                assert_memory_equal(state_before, state_after, r.state_len * sizeof(float));
            }
        }
        run_close(&r);
    }
}

ON_BOTH_BACKENDS(nonfinite_changes_nothing)

/* A GPU updates every parameter to the CPU's bits (no multiply fused into
 * an add where the CPU rounds twice), over many blocks of threads and
 * every rule with its options; with clipping, whose sum of squares each
 * adds in its own order, within an ulp or two. */
static void test_cuda_gives_the_cpus_bits(void **state)
{
    const struct fixture *fx = *state;
    enum { N = 100003, STEPS = 3 };
    need(DEVICE_CUDA);
    static float init[N], grads[STEPS][N], got[N], want[N];
    for (int i = 0; i < N; i++) {
        init[i] = (float)((i * 7919L) % 2001 - 1000) / 1000.0f;
        for (int s = 0; s < STEPS; s++)
            grads[s][i] = (float)((i * 104729L + s * 31) % 1999 - 999) / 3000.0f;
    }
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->json, "cases")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(c, "name"));
        for (int clip = 0; clip < 2; clip++) {
            struct optim_config cfg;
            struct run cpu, gpu;
            case_config(c, &cfg);
            cfg.clip_norm = clip ? 10.0f : 0.0f;
            run_open(&gpu, DEVICE_CUDA, &cfg, init, N);
            run_open(&cpu, DEVICE_CPU, &cfg, init, N);
            for (int s = 0; s < STEPS; s++) {
                run_step(&cpu, &cfg, s, grads[s]);
                run_step(&gpu, &cfg, s, grads[s]);
            }
            run_params(&cpu, want);
            run_params(&gpu, got);
            for (int i = 0; i < N; i++)
                if (clip ? !(fabsf(got[i] - want[i]) <= 2.4e-7f * fmaxf(1.0f, fabsf(want[i]))) : got[i] != want[i])
                    fail_msg("%s%s: parameter %d is %.9g on CUDA, %.9g on the CPU", name, clip ? ", clipped" : "",
                             i, got[i], want[i]);
            run_close(&cpu);
            run_close(&gpu);
        }
    }
}

static void test_state_len(void **state)
{
    (void)state;
    const struct {
        enum optim_kind kind;
        float momentum;
        int arrays;
    } want[] = {
        {OPTIM_SGD, 0.0f, 0},     {OPTIM_SGD, 0.9f, 1},   {OPTIM_RMSPROP, 0.0f, 1}, {OPTIM_RMSPROP, 0.9f, 2},
        {OPTIM_ADAM, 0.0f, 2},    {OPTIM_ADAMW, 0.0f, 2}, {OPTIM_ADADELTA, 0.0f, 2},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        assert_int_equal(optim_state_arrays(want[i].kind, want[i].momentum), want[i].arrays);
}

static void test_names_and_defaults(void **state)
{
    (void)state;
    const char *names[] = {"sgd", "rmsprop", "adam", "adamw", "adadelta"};
    for (int k = 0; k < 5; k++)
        assert_int_equal(optim_kind_from_name(names[k]), k);
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

/* The gradients g as a step clipped them, seen through SGD with lr 1 from
 * zeros: p = 0 - 1 * g, exactly, and 0 - p is g (+0 where g is 0). */
static void clipped(enum device_kind dev, const float *g, size_t n, float max_norm, float *out)
{
    struct optim_config cfg;
    struct run r;
    float *zeros = calloc(n, sizeof *zeros);
    assert_non_null(zeros);
    optim_defaults(&cfg, OPTIM_SGD);
    cfg.lr = 1.0f;
    cfg.clip_norm = max_norm;
    run_open(&r, dev, &cfg, zeros, n);
    run_step(&r, &cfg, 0, g);
    run_params(&r, out);
    for (size_t i = 0; i < n; i++)
        out[i] = 0.0f - out[i];
    run_close(&r);
    free(zeros);
}

static void clip(const struct fixture *fx, enum device_kind dev)
{
    enum { N = 1000 };
    (void)fx;
    need(dev);
    static float g[N], orig[N];
    for (int i = 0; i < N; i++)
        orig[i] = (float)(((i * 37) % 101) - 50) / 7.0f;
    double want = norm_of(orig, N);

    /* Over the limit: the norm after is the limit and the direction is
     * kept. */
    assert_true(want > 10.0);
    clipped(dev, orig, N, 10.0f, g);
    assert_true(fabs(norm_of(g, N) - 10.0) <= 1e-5);
    for (int i = 0; i < N; i++)
        assert_true(fabsf(g[i] - (float)(orig[i] * (10.0 / want))) <= 1e-7f);

    /* Under the limit, or no limit: untouched. */
    clipped(dev, orig, N, (float)(want * 2), g);
    assert_memory_equal(g, orig, sizeof g);
    clipped(dev, orig, N, 0.0f, g);
    assert_memory_equal(g, orig, sizeof g);

    /* The sum is in double: after a 1, a float sum drops each square of
     * 2^-13 (2^-26, under half an ulp of 1), finds a norm of 1 and would
     * not clip to 1. */
    enum { BIG = (1 << 20) + 1 };
    float *tiny = malloc(BIG * sizeof *tiny), *out = malloc(BIG * sizeof *out);
    assert_non_null(tiny);
    assert_non_null(out);
    tiny[0] = 1.0f;
    for (int i = 1; i < BIG; i++)
        tiny[i] = 0x1p-13f;
    clipped(dev, tiny, BIG, 1.0f, out);
    assert_true(out[0] == (float)(1.0 / sqrt(1.0 + 0x1p-6)));
    free(tiny);
    free(out);
}

ON_BOTH_BACKENDS(clip)

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_pytorch),
        cmocka_unit_test(test_state_restores),
        cmocka_unit_test(test_state_len),
        cmocka_unit_test(test_names_and_defaults),
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_clip),
        cmocka_unit_test(test_nonfinite_changes_nothing),
        cmocka_unit_test(test_cuda_matches_pytorch),
        cmocka_unit_test(test_cuda_state_restores),
        cmocka_unit_test(test_cuda_clip),
        cmocka_unit_test(test_cuda_nonfinite_changes_nothing),
        cmocka_unit_test(test_cuda_gives_the_cpus_bits),
    };
    test_filter_from_env();
    return cmocka_run_group_tests(tests, setup, teardown);
}
