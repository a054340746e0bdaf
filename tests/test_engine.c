/* test_engine.c - the engine's API beyond the fixtures: long texts scored in
 * chunks through a slot equal one pass over them, the most probable tokens
 * at each position of a scored text are the log-softmax's, slots run out
 * and come back, every misuse of the API is refused with a message rather
 * than a crash, a batch large enough to be split over the worker pool gives
 * the same bits as on one thread, in inference and in training, layer 0's
 * token tables give the bits of the projection they replace, and a failure
 * the backend recorded does not fail the calls after it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "engine.h"
#include "engine_internal.h"
#include "pool.h"
#include "support/filter.h"
#include "support/model_json.h"

#define LM_FIXTURE "tests/fixtures/combo_lstm_lm.safetensors"
#define CLS_FIXTURE "tests/fixtures/combo_lstm.safetensors"
/* Large enough (RRA LSTM, 2 x 512) that its cell steps are split over the
 * pool at batch 8. */
#define BIG_LM "models/austen.safetensors"

struct env {
    struct model model;
    struct backend *be;
    struct engine *engine;
};

/* An engine of the model v holds, on device dev. */
static int env_start(void **state, struct env *v, int slots, enum device_kind dev)
{
    char err[512];
    if (!(v->be = backend_create(dev, err, sizeof err)))
        fail_msg("backend: %s", err);
    v->engine = engine_create(&v->model, v->be, slots, err, sizeof err);
    if (!v->engine)
        fail_msg("engine: %s", err);
    *state = v;
    return 0;
}

static int open_env_on(void **state, const char *path, int slots, enum device_kind dev)
{
    char err[512];
    struct env *v = calloc(1, sizeof *v);
    assert_non_null(v);
    if (model_load(path, &v->model, err, sizeof err) != 0)
        fail_msg("%s: %s", path, err);
    return env_start(state, v, slots, dev);
}

/* A model of the config json, its weights drawn from seed 1. */
static int open_env_json(void **state, const char *json, int slots)
{
    struct env *v = calloc(1, sizeof *v);
    assert_non_null(v);
    model_from_json(json, 1, 1, &v->model);
    return env_start(state, v, slots, DEVICE_CPU);
}

static int open_env(void **state, const char *path, int slots)
{
    return open_env_on(state, path, slots, DEVICE_CPU);
}

static int setup_lm(void **state)
{
    return open_env(state, LM_FIXTURE, 4);
}

static int setup_cls(void **state)
{
    return open_env(state, CLS_FIXTURE, 0);
}

static int setup_big_lm(void **state)
{
    return open_env(state, BIG_LM, 8);
}

static int teardown(void **state)
{
    struct env *v = *state;
    engine_destroy(v->engine);
    backend_destroy(v->be);
    model_free(&v->model);
    free(v);
    return 0;
}

/* A text of 10,000 tokens: engine_score runs it in chunks of 4096 through a
 * slot; one forward over the whole text must give the same log-probability,
 * and the same term for every token, those across the chunks' seams too. */
static void test_score_long_text_in_chunks(void **state)
{
    struct env *v = *state;
    char err[512];
    const int n = 10000;
    int32_t *tok = malloc(n * sizeof *tok);
    float *whole_terms = malloc(n * sizeof *whole_terms), *terms = malloc(n * sizeof *terms);
    assert_true(tok && whole_terms && terms);
    srand(7);
    for (int i = 0; i < n; i++)
        tok[i] = rand() % v->model.vocab;
    struct engine_seq whole = {.tokens = tok, .len = n, .slot = -1, .token_logprobs = whole_terms};
    assert_int_equal(engine_forward(v->engine, &whole, 1, err, sizeof err), 0);
    struct engine_text t = {.tokens = tok, .len = n, .token_logprobs = terms};
    if (engine_score(v->engine, &t, 1, err, sizeof err) != 0)
        fail_msg("score: %s", err);
    const double chunked = t.logprob;
    assert_true(whole.logprob < -1000.0); /* it scored every token */
    assert_true(fabs(chunked - whole.logprob) <= 1e-5 * fabs(whole.logprob));
    double sum = 0;
    for (int i = 0; i < n; i++) {
        if (!(fabsf(terms[i] - whole_terms[i]) <= 1e-4f))
            fail_msg("token %d: ln p %g in chunks, %g in one pass", i + 1, terms[i], whole_terms[i]);
        assert_true(i == n - 1 ? terms[i] == 0 : terms[i] <= 0);
        sum += terms[i];
    }
    assert_true(fabs(sum - chunked) <= 1e-9 * fabs(chunked));
    free(terms);
    free(whole_terms);
    /* The slot it borrowed is free again. */
    for (int i = 0; i < 4; i++)
        assert_true(engine_slot_open(v->engine) >= 0);
    assert_int_equal(engine_slot_open(v->engine), -1);
    free(tok);
}

/* Log-probabilities computed two ways: the fixtures' random weights make
 * some of them large, so the tolerance grows with them. */
static int near(double a, double b)
{
    return fabs(a - b) <= 1e-4 * (1 + fabs(b));
}

/* engine_score's alternatives, on device dev: at each position of a text
 * long enough to run in chunks, the top_k of the log-softmax of the logits
 * one forward over the whole text gives (across the chunks' seams too),
 * most probable first with nothing left out larger, and the terms those of
 * the forward; texts with and without alternatives in one call each get
 * what they asked for. */
static void check_score_alternatives(enum device_kind dev)
{
    struct env *v;
    open_env_on((void **)&v, LM_FIXTURE, 4, dev);
    char err[512];
    enum { N = 5000, K = 3, SHORT = 100 };
    const int V = v->model.vocab;
    int32_t *tok = malloc(N * sizeof *tok);
    float *logits = malloc(sizeof *logits * (size_t)N * V), *whole_terms = malloc(N * sizeof *whole_terms);
    float *terms = malloc(N * sizeof *terms), *short_terms = malloc(SHORT * sizeof *short_terms);
    struct token_logprob *top = malloc(sizeof *top * N * K), *top1 = malloc(sizeof *top1 * SHORT);
    assert_true(tok && logits && whole_terms && terms && short_terms && top && top1);
    srand(11);
    for (int i = 0; i < N; i++)
        tok[i] = rand() % V;
    struct engine_seq whole = {.tokens = tok, .len = N, .slot = -1, .logits = logits, .token_logprobs = whole_terms};
    if (engine_forward(v->engine, &whole, 1, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    struct engine_text texts[3] = {
        {.tokens = tok, .len = N, .token_logprobs = terms, .top_k = K, .top = top},
        {.tokens = tok, .len = SHORT, .token_logprobs = short_terms},
        {.tokens = tok, .len = SHORT / 2, .top_k = 1, .top = top1},
    };
    if (engine_score(v->engine, texts, 3, err, sizeof err) != 0)
        fail_msg("score: %s", err);
    for (int s = 0; s < N; s++) {
        const float *l = logits + (size_t)s * V;
        double max = l[0], sum = 0;
        for (int t = 1; t < V; t++)
            max = l[t] > max ? l[t] : max;
        for (int t = 0; t < V; t++)
            sum += exp(l[t] - max);
        const double lse = max + log(sum);
        const struct token_logprob *a = top + (size_t)s * K;
        for (int k = 0; k < K; k++) {
            assert_true(a[k].id >= 0 && a[k].id < V);
            if (!near(a[k].logprob, l[a[k].id] - lse))
                fail_msg("position %d, alternative %d: ln p %g, the logits say %g", s, k, a[k].logprob,
                         l[a[k].id] - lse);
            assert_true(k == 0 || (a[k].logprob <= a[k - 1].logprob && a[k].id != a[k - 1].id));
        }
        int larger = 0;
        for (int t = 0; t < V; t++)
            larger += l[t] - lse > a[K - 1].logprob && !near(l[t] - lse, a[K - 1].logprob);
        assert_true(larger < K);
        if (!(s == N - 1 ? terms[s] == 0 : near(terms[s], whole_terms[s])))
            fail_msg("position %d: term %g, the forward's %g", s, terms[s], whole_terms[s]);
    }
    double sum = 0;
    for (int s = 0; s < N; s++)
        sum += terms[s];
    assert_true(fabs(texts[0].logprob - sum) <= 1e-9 * fabs(sum));
    /* The short texts, beginnings of the long one: the first's terms are
     * its, but for the last (no next token is given); the other's one
     * alternative is its first. */
    for (int s = 0; s < SHORT - 1; s++)
        assert_true(near(short_terms[s], whole_terms[s]));
    for (int s = 0; s < SHORT / 2; s++) {
        assert_int_equal(top1[s].id, top[(size_t)s * K].id);
        assert_true(near(top1[s].logprob, top[(size_t)s * K].logprob));
    }
    assert_true(short_terms[SHORT - 1] == 0);
    free(tok);
    free(logits);
    free(whole_terms);
    free(terms);
    free(short_terms);
    free(top);
    free(top1);
    teardown((void **)&v);
}

static void test_score_alternatives(void **state)
{
    (void)state;
    check_score_alternatives(DEVICE_CPU);
}

static void test_score_alternatives_cuda(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    check_score_alternatives(DEVICE_CUDA);
}

/* A language model's attention maps through engine_score, on device dev:
 * a text long enough to run in chunks, a short one batched beside it, and
 * the long one again in two parts carried through a slot, each part
 * writing its rows into the whole text's map; every weight is the one a
 * forward over the whole text gives. */
static void check_score_attention(enum device_kind dev)
{
    struct env *v;
    open_env_on((void **)&v, LM_FIXTURE, 4, dev);
    char err[512];
    enum { N = 4500, SHORT = 100, CUT = 1700 };
    const int V = v->model.vocab, L = v->model.cfg.layers, K = v->model.cfg.attn_window;
    assert_true(K > 0);
    const size_t map = (size_t)L * N * K;
    int32_t *tok = malloc(N * sizeof *tok);
    float *whole_map = calloc(map, sizeof(float)), *chunked = calloc(map, sizeof(float));
    float *parts = calloc(map, sizeof(float)), *short_map = calloc((size_t)L * SHORT * K, sizeof(float));
    assert_true(tok && whole_map && chunked && parts && short_map);
    srand(13);
    for (int i = 0; i < N; i++)
        tok[i] = rand() % V;
    struct engine_seq whole = {.tokens = tok, .len = N, .slot = -1, .attention = whole_map};
    if (engine_forward(v->engine, &whole, 1, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    struct engine_text texts[2] = {
        {.tokens = tok, .len = N, .attention = chunked, .attention_rows = N},
        {.tokens = tok, .len = SHORT, .attention = short_map},
    };
    if (engine_score(v->engine, texts, 2, err, sizeof err) != 0)
        fail_msg("score: %s", err);
    const int slot = engine_slot_open(v->engine);
    assert_true(slot >= 0);
    struct engine_text part = {.tokens = tok, .len = CUT, .carry = 1, .slot = slot, .next = tok + CUT,
                               .attention = parts, .attention_rows = N};
    if (engine_score(v->engine, &part, 1, err, sizeof err) != 0)
        fail_msg("first part: %s", err);
    part = (struct engine_text){.tokens = tok + CUT, .len = N - CUT, .carry = 1, .slot = slot,
                                .attention = parts + (size_t)CUT * K, .attention_rows = N};
    if (engine_score(v->engine, &part, 1, err, sizeof err) != 0)
        fail_msg("second part: %s", err);
    engine_slot_close(v->engine, slot);
    double mass = 0;
    for (int l = 0; l < L; l++)
        for (int p = 0; p < N; p++)
            for (int k = 0; k < K; k++) {
                const size_t i = ((size_t)l * N + p) * K + k;
                const float w = whole_map[i];
                mass += w;
                if (!(fabsf(chunked[i] - w) <= 1e-5f && fabsf(parts[i] - w) <= 1e-5f))
                    fail_msg("layer %d, position %d, weight %d: %g in chunks, %g in parts, %g in one pass", l, p,
                             k + 1, chunked[i], parts[i], w);
                if (p < SHORT && !(fabsf(short_map[((size_t)l * SHORT + p) * K + k] - w) <= 1e-5f))
                    fail_msg("layer %d, position %d: the short text's weight %d is %g, not %g", l, p, k + 1,
                             short_map[((size_t)l * SHORT + p) * K + k], w);
            }
    assert_true(mass > 0.5 * L * N); /* the maps were written */
    free(tok);
    free(whole_map);
    free(chunked);
    free(parts);
    free(short_map);
    teardown((void **)&v);
}

static void test_score_attention(void **state)
{
    (void)state;
    check_score_attention(DEVICE_CPU);
}

static void test_score_attention_cuda(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    check_score_attention(DEVICE_CUDA);
}

static void test_forward_refuses_bad_batches(void **state)
{
    struct env *v = *state;
    char err[512];
    const int32_t V = v->model.vocab;
    int32_t good[3] = {1, 2, 3}, bad[2] = {1, V};
    struct engine_seq q = {.tokens = good, .len = 0, .slot = -1};
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "empty"));
    assert_int_equal(engine_forward(v->engine, &q, 0, err, sizeof err), -1);
    q = (struct engine_seq){.tokens = bad, .len = 2, .slot = -1};
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    q = (struct engine_seq){.tokens = good, .len = 3, .slot = 3};
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "not open"));
    /* The vocabulary's edges: 0 and V-1 are ids, as tokens and as the
     * next token scored; -1 and V are not. */
    int32_t edges[2] = {0, V - 1}, next = -1;
    q = (struct engine_seq){.tokens = edges, .len = 2, .slot = -1, .next = &next};
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "next token -1"));
    next = V;
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    next = 0;
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), 0);
    next = V - 1;
    assert_int_equal(engine_forward(v->engine, &q, 1, err, sizeof err), 0);
}

static void test_slots_at_different_positions_cannot_share_a_forward(void **state)
{
    struct env *v = *state;
    char err[512];
    int32_t tok[3] = {1, 2, 3};
    int a = engine_slot_open(v->engine), b = engine_slot_open(v->engine);
    struct engine_seq q[2] = {{.tokens = tok, .len = 3, .slot = a}, {.tokens = tok, .len = 2, .slot = b}};
    assert_int_equal(engine_forward(v->engine, q, 1, err, sizeof err), 0);
    assert_int_equal(engine_slot_position(v->engine, a), 3);
    assert_int_equal(engine_forward(v->engine, q, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "at token"));
    q[1].slot = a;
    q[0].slot = -1;
    assert_int_equal(engine_forward(v->engine, q, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "either every sequence"));
    engine_slot_close(v->engine, a);
    engine_slot_close(v->engine, b);
}

static void test_step_refuses_misuse(void **state)
{
    struct env *v = *state;
    char err[512];
    float logits[2 * 64];
    int s = engine_slot_open(v->engine);
    int slots[2] = {s, s};
    int32_t tok[2] = {1, 1};
    assert_true(v->model.vocab <= 64);
    assert_int_equal(engine_step(v->engine, slots, tok, 2, logits, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "twice"));
    slots[1] = s + 1;
    assert_int_equal(engine_step(v->engine, slots, tok, 2, logits, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "not open"));
    tok[0] = -1;
    assert_int_equal(engine_step(v->engine, slots, tok, 1, logits, NULL, err, sizeof err), -1);
    assert_int_equal(engine_step(v->engine, slots, tok, 0, logits, NULL, err, sizeof err), -1);
    tok[0] = v->model.vocab;
    assert_int_equal(engine_step(v->engine, slots, tok, 1, logits, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    tok[0] = v->model.vocab - 1;
    assert_int_equal(engine_step(v->engine, slots, tok, 1, logits, NULL, err, sizeof err), 0);
    assert_int_equal(engine_slot_position(v->engine, s), 1);
    /* A closed slot reopens empty. */
    engine_slot_close(v->engine, s);
    assert_int_equal(engine_slot_open(v->engine), s);
    assert_int_equal(engine_slot_position(v->engine, s), 0);
    engine_slot_close(v->engine, s);
}

static void test_classifier_has_no_slots(void **state)
{
    struct env *v = *state;
    char err[512];
    int slot = 0;
    int32_t tok = 1;
    float logits[8];
    assert_int_equal(engine_slot_open(v->engine), -1);
    assert_int_equal(engine_step(v->engine, &slot, &tok, 1, logits, NULL, err, sizeof err), -1);
    assert_null(engine_create(&v->model, v->be, 4, err, sizeof err));
    assert_non_null(strstr(err, "language model"));
}

/* A training batch with a label outside the classes, or dropout outside
 * [0, 1), is refused naming what is wrong; the classes' edges, 0 and
 * C-1, and dropout 0 are taken. */
static void test_training_refuses_bad_batches(void **state)
{
    struct env *v = *state;
    char err[512];
    int32_t tok[3] = {1, 2, 3};
    struct engine_seq q = {.tokens = tok, .len = 3, .slot = -1};
    struct train_result res = {0};
    const int C = v->model.head_out;
    const struct train_options none = {0.0f, 0.0f, 1}, all = {1.0f, 0.0f, 1}, all_embed = {0.0f, 1.0f, 1};
    const int bad[2] = {-1, C};
    for (int i = 0; i < 2; i++) {
        assert_int_equal(engine_train_batch(v->engine, &q, 1, &bad[i], &none, &res, err, sizeof err), -1);
        assert_non_null(strstr(err, "is not a class"));
    }
    assert_int_equal(engine_train_batch(v->engine, &q, 1, NULL, &none, &res, err, sizeof err), -1);
    const int first = 0, last = C - 1;
    assert_int_equal(engine_train_batch(v->engine, &q, 1, &first, &all, &res, err, sizeof err), -1);
    assert_non_null(strstr(err, "dropout must be in [0, 1)"));
    assert_int_equal(engine_train_batch(v->engine, &q, 1, &first, &all_embed, &res, err, sizeof err), -1);
    assert_non_null(strstr(err, "dropout must be in [0, 1)"));
    assert_int_equal(res.count, 0);
    assert_int_equal(engine_train_batch(v->engine, &q, 1, &first, &none, &res, err, sizeof err), 0);
    assert_int_equal(engine_train_batch(v->engine, &q, 1, &last, &none, &res, err, sizeof err), 0);
    assert_int_equal(res.count, 2);
}

/* A batch of 8 texts of different lengths, forward (logits and attention)
 * and then 20 steps of the step API, with the whole pool and on one
 * thread: the same bits.  main() asks for a pool of 3 threads, so the
 * split happens on any machine. */
static void test_threads_give_the_same_bits(void **state)
{
    struct env *v = *state;
    enum { N = 8, T = 48, STEPS = 20 };
    const int V = v->model.vocab, K = v->model.cfg.attn_window, L = v->model.cfg.layers;
    assert_true(pool_size() >= 2);
    int32_t tokens[N][T];
    for (int i = 0; i < N; i++)
        for (int t = 0; t < T; t++)
            tokens[i][t] = (int32_t)(1 + (i * 31 + t * 7) % (V - 1));
    float *out[2][2];
    const size_t logits_n = (size_t)N * T * V, attn_n = (size_t)N * L * T * K;
    char err[512];
    for (int run = 0; run < 2; run++) {
        pool_set_threads(run == 0 ? 0 : 1);
        assert_non_null(out[run][0] = calloc(logits_n + (size_t)STEPS * N * V, sizeof(float)));
        assert_non_null(out[run][1] = calloc(attn_n + (size_t)STEPS * N * L * K, sizeof(float)));
        struct engine_seq seqs[N];
        int slots[N];
        for (int i = 0; i < N; i++) {
            assert_true((slots[i] = engine_slot_open(v->engine)) >= 0);
            seqs[i] = (struct engine_seq){.tokens = tokens[i], .len = T - i * 3, .slot = -1,
                                          .logits = out[run][0] + (size_t)i * T * V,
                                          .attention = out[run][1] + (size_t)i * L * T * K};
        }
        if (engine_forward(v->engine, seqs, N, err, sizeof err) != 0)
            fail_msg("%s", err);
        for (int s = 0; s < STEPS; s++) {
            int32_t next[N];
            for (int i = 0; i < N; i++)
                next[i] = tokens[i][s];
            if (engine_step(v->engine, slots, next, N, out[run][0] + logits_n + (size_t)s * N * V,
                            out[run][1] + attn_n + (size_t)s * N * L * K, err, sizeof err) != 0)
                fail_msg("%s", err);
        }
        for (int i = 0; i < N; i++)
            engine_slot_close(v->engine, slots[i]);
    }
    pool_set_threads(0);
    assert_memory_equal(out[0][0], out[1][0], (logits_n + (size_t)STEPS * N * V) * sizeof(float));
    assert_memory_equal(out[0][1], out[1][1], (attn_n + (size_t)STEPS * N * L * K) * sizeof(float));
    for (int run = 0; run < 2; run++) {
        free(out[run][0]);
        free(out[run][1]);
    }
}

/* One training batch of 16 windows (forward, backward, the gradient of
 * every parameter) of v's model with the whole pool and on one thread:
 * the same bits. */
static void check_training_threads(struct env *v)
{
    enum { N = 16, T = 32 };
    struct engine *e = v->engine;
    const int V = v->model.vocab;
    const size_t P = v->model.n_params;
    int32_t tokens[N][T + 1];
    for (int i = 0; i < N; i++)
        for (int t = 0; t <= T; t++)
            tokens[i][t] = (int32_t)(1 + (i * 17 + t * 5) % (V - 1));
    float *grads[2];
    char err[512];
    for (int run = 0; run < 2; run++) {
        pool_set_threads(run == 0 ? 0 : 1);
        struct engine_seq seqs[N];
        for (int i = 0; i < N; i++)
            seqs[i] = (struct engine_seq){.tokens = tokens[i], .len = T, .slot = -1, .next = &tokens[i][T]};
        const struct train_options opt = {0.1f, 0.0f, 7};
        struct train_result res = {0};
        assert_int_equal(engine_zero_grads(e), 0);
        if (engine_train_batch(e, seqs, N, NULL, &opt, &res, err, sizeof err) != 0)
            fail_msg("%s", err);
        assert_non_null(grads[run] = malloc(P * sizeof(float)));
        assert_int_equal(engine_grads_to_host(e, grads[run]), 0);
    }
    pool_set_threads(0);
    assert_memory_equal(grads[0], grads[1], P * sizeof(float));
    free(grads[0]);
    free(grads[1]);
}

/* On the shipped language model, and on two with a term whose gradient
 * sums over a step's rows (peepholes; static attention), which the CPU
 * backend must then not split between threads: 16 rows of 4 x 128 gates
 * are past the size it splits at. */
static void test_training_threads_give_the_same_bits(void **state)
{
    check_training_threads(*state);
    static const char *const shared_sums[] = {
        "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 128, \"peephole\": true, \"embed_dim\": 8,"
        " \"tokenizer\": {\"type\": \"byte\"}}",
        "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 128, \"embed_dim\": 8, \"tokenizer\": {\"type\": \"byte\"},"
        " \"attention\": {\"window\": 3, \"mode\": \"static\"}}",
    };
    for (size_t k = 0; k < sizeof shared_sums / sizeof *shared_sums; k++) {
        void *v;
        open_env_json(&v, shared_sums[k], 0);
        check_training_threads(v);
        teardown(&v);
    }
}

/* A failure the backend recorded in an earlier call (a CUDA out-of-memory,
 * say) must not fail the calls after it. */
static void test_backend_error_does_not_stick(void **state)
{
    struct env *v = *state;
    char err[512];
    int32_t tokens[5] = {1, 2, 3, 4, 5};
    snprintf(v->be->err, sizeof v->be->err, "an earlier call's failure");
    struct engine_seq q = {.tokens = tokens, .len = 5, .slot = -1};
    if (engine_forward(v->engine, &q, 1, err, sizeof err) != 0)
        fail_msg("forward after a recorded failure: %s", err);
    int slot = engine_slot_open(v->engine);
    assert_true(slot >= 0);
    float *logits = malloc(sizeof(float) * (size_t)v->model.head_out);
    assert_non_null(logits);
    snprintf(v->be->err, sizeof v->be->err, "an earlier call's failure");
    if (engine_step(v->engine, &slot, tokens, 1, logits, NULL, err, sizeof err) != 0)
        fail_msg("step after a recorded failure: %s", err);
    engine_slot_close(v->engine, slot);
    free(logits);
}

enum { TT_N = 3, TT_T = 17, TT_STEPS = 6 };

/* Floats run_tables_case writes for model m. */
static size_t tables_case_size(const struct model *m)
{
    size_t step = 2 * (size_t)m->head_out + 2 * (size_t)m->cfg.layers * m->cfg.attn_window;
    return (size_t)TT_N * TT_T * m->head_out + (m->cfg.task == TASK_LM ? TT_STEPS * step : 0);
}

/* Forward logits of three texts of different lengths and, for a language
 * model, 6 steps of two slots (logits and attention) into out. */
static void run_tables_case(struct engine *e, const struct model *m, float *out)
{
    const int V = m->vocab, C = m->head_out, K = m->cfg.attn_window, L = m->cfg.layers;
    int32_t tokens[TT_N][TT_T];
    for (int i = 0; i < TT_N; i++)
        for (int t = 0; t < TT_T; t++)
            tokens[i][t] = (int32_t)((i * 13 + t * 5) % V);
    char err[512];
    struct engine_seq seqs[TT_N];
    for (int i = 0; i < TT_N; i++)
        seqs[i] = (struct engine_seq){.tokens = tokens[i], .len = TT_T - 4 * i, .slot = -1,
                                      .logits = out + (size_t)i * TT_T * C};
    if (engine_forward(e, seqs, TT_N, err, sizeof err) != 0)
        fail_msg("%s", err);
    if (m->cfg.task != TASK_LM)
        return;
    out += (size_t)TT_N * TT_T * C;
    int slots[2] = {engine_slot_open(e), engine_slot_open(e)};
    assert_true(slots[0] >= 0 && slots[1] >= 0);
    for (int s = 0; s < TT_STEPS; s++) {
        int32_t next[2] = {tokens[0][s], tokens[1][s]};
        if (engine_step(e, slots, next, 2, out, K ? out + 2 * C : NULL, err, sizeof err) != 0)
            fail_msg("%s", err);
        out += 2 * C + 2 * L * K;
    }
    engine_slot_close(e, slots[0]);
    engine_slot_close(e, slots[1]);
}

/* An engine reads layer 0's projection of each token from a table and,
 * on the CPU, multiplies by packed copies of its weight matrices; one whose
 * weights were replaced (engine_params_from_host) has no table, and none
 * of the packed copies it makes again when its backend cannot pack.  Both
 * must give the same bits: with and without the depth residual (which
 * needs the embedded input anyway), both directions, forward and steps. */
static void test_derived_weights_give_the_same_bits(void **state)
{
    (void)state;
    static const struct {
        const char *file;
        int slots;
    } cases[] = {
        {"tests/fixtures/combo_lstm_bi.safetensors", 0},
        {"tests/fixtures/combo_lstm_lm.safetensors", 2},
        {"tests/fixtures/plain_gru_l1_bi_last.safetensors", 0},
        {"tests/fixtures/plain_gru_l1_lm.safetensors", 2},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        void *v[2];
        float *out[2];
        size_t n = 0;
        struct backend_ops unpacked;
        for (int k = 0; k < 2; k++) {
            open_env(&v[k], cases[c].file, cases[c].slots);
            struct env *env = v[k];
            if (k == 1) {
                unpacked = *env->be->ops;
                unpacked.pack_weights = NULL;
                env->be->ops = &unpacked;
                assert_int_equal(engine_params_from_host(env->engine, env->model.arena), 0);
            }
            n = tables_case_size(&env->model);
            assert_non_null(out[k] = calloc(n, sizeof(float)));
            run_tables_case(env->engine, &env->model, out[k]);
        }
        assert_true(engine_token_table_bytes(((struct env *)v[0])->engine) > 0);
        assert_true(engine_token_table_bytes(((struct env *)v[1])->engine) == 0);
        assert_true(engine_packed_bytes(((struct env *)v[0])->engine) > 0);
        assert_true(engine_packed_bytes(((struct env *)v[1])->engine) == 0);
        if (memcmp(out[0], out[1], n * sizeof(float)) != 0)
            fail_msg("%s: results with and without token tables and packed weights differ", cases[c].file);
        for (int k = 0; k < 2; k++) {
            free(out[k]);
            teardown(&v[k]);
        }
    }
}

/* A batch large enough that a forward projects each step's inputs just
 * before the step (forward.c: at least 32 rows a step, and more than 8 MB
 * of projections for the whole batch, in one engine call) gives each text
 * the bits it gets alone, where the projections of all its steps come
 * from one product: the RRA language model (its layer 0 read from token
 * tables, layer 1 computed) and a bidirectional classifier of three layers
 * with every connection scheme (the backward direction's rows gathered). */
static void test_large_batches_give_each_text_its_bits(void **state)
{
    (void)state;
    static const struct {
        const char *file, *json;
        int len0; /* the shortest text; the others up to 40 tokens longer */
    } cases[] = {
        {NULL,
         "{\"task\": \"classify\", \"cell\": \"lstm\", \"hidden\": 40, \"layers\": 3, \"bidirectional\": true,"
         " \"embed_dim\": 5, \"peephole\": true, \"skip\": {\"period\": 2, \"matrices\": 2}, \"residual_depth\": true,"
         " \"attention\": {\"window\": 3, \"mode\": \"dynamic\"}, \"pool\": \"mean\", \"classes\": [\"a\", \"b\", \"c\"],"
         " \"tokenizer\": {\"type\": \"byte\"}}",
         380},
        {BIG_LM, NULL, 20},
    };
    enum { N = 40 };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        void *vp;
        if (cases[c].file)
            open_env(&vp, cases[c].file, 0);
        else
            open_env_json(&vp, cases[c].json, 0);
        struct env *v = vp;
        const int V = v->model.vocab, C = v->model.head_out, lm = v->model.cfg.task == TASK_LM;
        const int maxlen = cases[c].len0 + N + 7;
        int32_t *tokens = malloc(sizeof(int32_t) * (size_t)maxlen);
        assert_non_null(tokens);
        for (int t = 0; t < maxlen; t++)
            tokens[t] = (int32_t)((t * 7 + t / 5) % V);
        const size_t per = lm ? (size_t)maxlen * C : (size_t)C;
        float *batch = calloc(N * per, sizeof(float)), *alone = calloc(per, sizeof(float));
        assert_true(batch && alone);
        struct engine_seq seqs[N];
        char err[512];
        for (int i = 0; i < N; i++)
            seqs[i] = (struct engine_seq){.tokens = tokens + i % 7, .len = cases[c].len0 + i, .slot = -1,
                                          .logits = batch + i * per};
        if (engine_forward(v->engine, seqs, N, err, sizeof err) != 0)
            fail_msg("%s", err);
        for (int i = 0; i < N; i++) {
            struct engine_seq one = seqs[i];
            one.logits = alone;
            if (engine_forward(v->engine, &one, 1, err, sizeof err) != 0)
                fail_msg("%s", err);
            if (memcmp(alone, batch + i * per, (lm ? (size_t)one.len * C : (size_t)C) * sizeof(float)) != 0)
                fail_msg("case %zu: text %d differs alone and in a batch of %d", c, i, N);
        }
        free(tokens);
        free(batch);
        free(alone);
        teardown(&vp);
    }
}

/* engine_forward runs a batch in calls of at most ENGINE_CALL_TOKENS
 * tokens: four texts of which no two fit one call leave the engine's
 * scratch memory (which keeps its largest call's) where one of them left
 * it, and each text gets what it gets alone. */
static void test_forward_calls_are_bounded(void **state)
{
    struct env *v = *state;
    enum { N = 4, LEN = ENGINE_CALL_TOKENS / 2 + 1 };
    const int V = v->model.vocab;
    int32_t *tok = malloc(sizeof *tok * (LEN + N));
    assert_non_null(tok);
    for (int t = 0; t < LEN + N; t++)
        tok[t] = (int32_t)((t * 7 + t / 5) % V);
    char err[512];
    struct engine_seq seqs[N];
    for (int i = 0; i < N; i++)
        seqs[i] = (struct engine_seq){.tokens = tok + i, .len = LEN, .slot = -1};
    struct engine_seq one = seqs[N - 1];
    if (engine_forward(v->engine, &one, 1, err, sizeof err) != 0)
        fail_msg("%s", err);
    const size_t after_one = engine_scratch_bytes(v->engine);
    if (engine_forward(v->engine, seqs, N, err, sizeof err) != 0)
        fail_msg("%s", err);
    if (engine_scratch_bytes(v->engine) != after_one)
        fail_msg("scratch bytes %zu after one text, %zu after four", after_one, engine_scratch_bytes(v->engine));
    assert_true(one.logprob < -1000.0);
    assert_true(seqs[N - 1].logprob == one.logprob);
    assert_true(seqs[0].logprob != one.logprob);
    free(tok);
}

/* A backend that pretends to record graphs: the work runs as it is queued
 * (the CPU's ops), capture_end hands out a token, replay does nothing.
 * It shows what graphs.c decides, not what a GPU computes. */
static struct {
    int begins, replays, frees, fail;
} mock;

static int mock_begin(struct backend *be)
{
    (void)be;
    mock.begins++;
    return 0;
}

static void *mock_end(struct backend *be)
{
    (void)be;
    return mock.fail ? NULL : malloc(1);
}

static int mock_replay(struct backend *be, void *graph)
{
    (void)be, (void)graph;
    mock.replays++;
    return 0;
}

static void mock_free(struct backend *be, void *graph)
{
    (void)be;
    free(graph);
    mock.frees++;
}

static void forward_n(struct engine *e, int n, int len)
{
    int32_t tokens[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    struct engine_seq q[16];
    char err[512];
    for (int i = 0; i < n; i++)
        q[i] = (struct engine_seq){.tokens = tokens, .len = len, .slot = -1};
    if (engine_forward(e, q, n, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
}

/* A shape is recorded the second time it comes and replayed after; scratch
 * that moves makes it be recorded again; a recording that fails is not
 * tried again for that shape; every graph is freed. */
static void test_graph_cache_policy(void **state)
{
    struct env *v = *state;
    static struct backend_ops ops;
    ops = *v->be->ops;
    ops.capture_begin = mock_begin;
    ops.capture_end = mock_end;
    ops.replay = mock_replay;
    ops.graph_free = mock_free;
    memset(&mock, 0, sizeof mock);
    struct backend *be = v->be;
    const struct backend_ops *cpu = be->ops;
    char err[512];
    be->ops = &ops;
    struct engine *e = engine_create(&v->model, be, 0, err, sizeof err);
    assert_non_null(e);
    for (int i = 0; i < 4; i++)
        forward_n(e, 2, 5);
    assert_int_equal(mock.begins, 1);
    assert_int_equal(mock.replays, 3);
    assert_int_equal(engine_graph_count(e), 1);
    forward_n(e, 16, 16); /* grows the scratch: the graph points into old buffers */
    forward_n(e, 2, 5);
    assert_int_equal(mock.frees, 1);
    assert_int_equal(mock.begins, 2);
    assert_int_equal(mock.replays, 4);
    forward_n(e, 2, 5);
    assert_int_equal(mock.begins, 2);
    assert_int_equal(mock.replays, 5);
    mock.fail = 1;
    for (int i = 0; i < 4; i++)
        forward_n(e, 3, 4);
    assert_int_equal(mock.begins, 3);
    assert_int_equal(mock.replays, 5);
    assert_int_equal(engine_graph_count(e), 1);
    engine_destroy(e);
    assert_int_equal(mock.frees, 2);
    be->ops = cpu;
}

/* Batches of 1 to 8 texts whose longest lies in the same 8 steps share
 * one recorded graph where the backend pads (backend_ops.pad_steps, as on
 * CUDA): the lengths only change the index arrays the kernels read.
 * Packed, every set of lengths is a shape of its own. */
static void test_padded_batches_share_a_graph(void **state)
{
    struct env *v = *state;
    static const int counts[] = {3, 5, 1, 8};
    static const int lens[][8] = {{9, 3, 12}, {16, 1, 10, 2, 2}, {13}, {9, 15, 2, 4, 5, 6, 7, 16}};
    int32_t tokens[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    static struct backend_ops ops;
    const struct backend_ops *cpu = v->be->ops;
    char err[512];
    for (int pad = 0; pad < 2; pad++) {
        ops = *cpu;
        ops.capture_begin = mock_begin;
        ops.capture_end = mock_end;
        ops.replay = mock_replay;
        ops.graph_free = mock_free;
        ops.pad_steps = pad;
        memset(&mock, 0, sizeof mock);
        v->be->ops = &ops;
        struct engine *e = engine_create(&v->model, v->be, 0, err, sizeof err);
        assert_non_null(e);
        for (int b = 0; b < 4; b++) {
            struct engine_seq q[8];
            for (int i = 0; i < counts[b]; i++)
                q[i] = (struct engine_seq){.tokens = tokens, .len = lens[b][i], .slot = -1};
            if (engine_forward(e, q, counts[b], err, sizeof err) != 0)
                fail_msg("forward: %s", err);
        }
        assert_int_equal(mock.begins, pad ? 1 : 0);
        assert_int_equal(mock.replays, pad ? 3 : 0);
        engine_destroy(e);
        v->be->ops = cpu;
    }
}

/* On CUDA, the kernels of a forward or a step are recorded as a graph the
 * second time their shape comes and replayed after: the same kernels on
 * the same pointers, so the same bits as launching them one by one (an
 * engine whose graphs are dropped before every call).  Forwards of three
 * texts of different lengths, which change from forward to forward within
 * one padded length (backend_ops.pad_steps: the third replays the graph
 * the second recorded) of two chunks, so that the two layers run as a
 * wavefront on four streams; a longer batch, which grows the scratch the
 * graphs point into, and the third shape again, which must then be
 * recorded anew rather than replayed into freed memory; then steps with
 * attention asked for and not.  Skipped without a GPU. */
static void test_cuda_graphs_give_the_same_bits(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    enum { N = 3, FORWARDS = 5, LONGER = 3, STEPS = 8, MAXLEN = 13, LONGLEN = 48 };
    void *v[2];
    float *out[2];
    size_t per_step = 0, per_forward = 0;
    for (int k = 0; k < 2; k++) {
        open_env_on(&v[k], "tests/fixtures/rra_dynamic_w3_l2_lm.safetensors", N, DEVICE_CUDA);
        struct env *env = v[k];
        const struct model *m = &env->model;
        const int C = m->head_out, LK = m->cfg.layers * m->cfg.attn_window;
        per_step = (size_t)N * (C + LK);
        per_forward = (size_t)N * LONGLEN * C;
        assert_non_null(out[k] = calloc(FORWARDS * per_forward + STEPS * per_step, sizeof(float)));
        char err[512];
        int32_t tokens[N][LONGLEN];
        for (int i = 0; i < N; i++)
            for (int t = 0; t < LONGLEN; t++)
                tokens[i][t] = (int32_t)((i * 5 + t * 3) % m->vocab);
        for (int f = 0; f < FORWARDS; f++) {
            struct engine_seq seqs[N];
            for (int i = 0; i < N; i++) {
                int len = f == LONGER ? LONGLEN - i : MAXLEN - 1 - 2 * i - (f < LONGER ? f : LONGER - 1);
                seqs[i] = (struct engine_seq){.tokens = tokens[i], .len = len, .slot = -1,
                                              .logits = out[k] + f * per_forward + (size_t)i * LONGLEN * C};
            }
            if (k == 1)
                engine_drop_graphs(env->engine);
            unsigned gen = env->engine->ws_gen;
            if (engine_forward(env->engine, seqs, N, err, sizeof err) != 0)
                fail_msg("forward %d: %s", f, err);
            if (f == LONGER && env->engine->ws_gen == gen)
                fail_msg("the longer batch did not grow the scratch: it checks nothing here");
        }
        int slots[N];
        for (int i = 0; i < N; i++)
            assert_true((slots[i] = engine_slot_open(env->engine)) >= 0);
        for (int s = 0; s < STEPS; s++) {
            int32_t toks[N];
            for (int i = 0; i < N; i++)
                toks[i] = (int32_t)((i * 7 + s * 3) % m->vocab);
            if (k == 1)
                engine_drop_graphs(env->engine);
            float *o = out[k] + FORWARDS * per_forward + s * per_step;
            if (engine_step(env->engine, slots, toks, N, o, s % 2 ? o + (size_t)N * C : NULL, err, sizeof err) != 0)
                fail_msg("step %d: %s", s, err);
        }
    }
    assert_true(engine_graph_count(((struct env *)v[0])->engine) == 3);
    assert_true(engine_graph_count(((struct env *)v[1])->engine) == 0);
    if (memcmp(out[0], out[1], (FORWARDS * per_forward + STEPS * per_step) * sizeof(float)) != 0)
        fail_msg("work replayed from graphs differs from work launched one by one");
    for (int k = 0; k < 2; k++) {
        free(out[k]);
        teardown(&v[k]);
    }
}

/* ---- CUDA against the CPU on wide models ---------------------------------- */

/* The fixtures' models are narrow (H <= 32): every reduction of a CUDA
 * block has one warp's worth of data, so a barrier missing between warps
 * goes unseen.  These spread H over three warps or more and a byte
 * vocabulary's 256 logits over all eight, with every cell and attention
 * mode; the fifth is deep, so that its 11-token text runs as a wavefront
 * of five layers over two chunks, with the depth residual projected from
 * the embedding; the last two are narrow, with attention windows wider
 * than their gates and than the fused step's limit of 32. */
static const char *const wide_models[] = {
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 128, \"layers\": 2, \"embed_dim\": 24,"
    " \"tokenizer\": {\"type\": \"byte\"}, \"attention\": {\"window\": 4, \"mode\": \"dynamic\"}}",
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 72, \"embed_dim\": 16, \"peephole\": true,"
    " \"tokenizer\": {\"type\": \"byte\"}, \"attention\": {\"window\": 3, \"mode\": \"static\"}}",
    "{\"task\": \"lm\", \"cell\": \"rnn_tanh\", \"hidden\": 70, \"embed_dim\": 8,"
    " \"tokenizer\": {\"type\": \"byte\"}, \"skip\": {\"period\": 2, \"matrices\": 2}}",
    "{\"task\": \"classify\", \"cell\": \"gru\", \"hidden\": 132, \"bidirectional\": true, \"pool\": \"mean\","
    " \"embed_dim\": 16, \"classes\": [\"a\", \"b\", \"c\"], \"tokenizer\": {\"type\": \"byte\"}}",
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 40, \"layers\": 5, \"embed_dim\": 16,"
    " \"residual_depth\": true, \"tokenizer\": {\"type\": \"byte\"}, \"attention\": {\"window\": 2, \"mode\": \"dynamic\"}}",
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 2, \"embed_dim\": 8, \"tokenizer\": {\"type\": \"byte\"},"
    " \"attention\": {\"window\": 10, \"mode\": \"dynamic\"}}",
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 16, \"embed_dim\": 8, \"tokenizer\": {\"type\": \"byte\"},"
    " \"attention\": {\"window\": 40, \"mode\": \"dynamic\"}}",
};

/* Everything one device computed for a wide model. */
struct wide_run {
    float *forward;   /* logits (and attention) of a forward of three texts */
    float *steps;     /* logits and attention of steps after it */
    float *grads;     /* gradients of a training batch */
    size_t n_forward, n_steps, n_grads;
};

static void wide_run_free(struct wide_run *r)
{
    free(r->forward);
    free(r->steps);
    free(r->grads);
}

enum { WIDE_N = 3, WIDE_STEPS = 5 };
static const int wide_len[WIDE_N] = {11, 7, 3};

static void wide_run_on(const struct model *m, enum device_kind dev, enum precision prec, enum recurrence rec,
                        const int32_t tokens[WIDE_N][16], struct wide_run *r)
{
    char err[512];
    struct backend *be = backend_create(dev, err, sizeof err);
    if (!be || backend_set_precision(be, prec, err, sizeof err) != 0 ||
        backend_set_recurrence(be, rec, err, sizeof err) != 0)
        fail_msg("backend: %s", err);
    const int lm = m->cfg.task == TASK_LM, C = m->head_out, V = m->vocab;
    const int LK = m->cfg.layers * (m->cfg.bidirectional ? 2 : 1) * m->cfg.attn_window;
    struct engine *e = engine_create(m, be, lm ? WIDE_N : 0, err, sizeof err);
    if (!e)
        fail_msg("engine: %s", err);
    /* Per text: logits (lm: [len][V], else [C]), then attention
     * ([L][D][len][K]).  Per step: logits [n][V], then attention [n][L][K]. */
    size_t per = lm ? 16 * ((size_t)V + LK) : (size_t)C;
    size_t per_step = (size_t)WIDE_N * (V + m->cfg.layers * m->cfg.attn_window);
    r->n_forward = WIDE_N * per;
    r->n_steps = lm ? WIDE_STEPS * per_step : 0;
    r->n_grads = m->n_params;
    assert_non_null(r->forward = calloc(r->n_forward, sizeof(float)));
    assert_non_null(r->steps = calloc(r->n_steps + 1, sizeof(float)));
    assert_non_null(r->grads = calloc(r->n_grads, sizeof(float)));

    struct engine_seq q[WIDE_N];
    int slots[WIDE_N];
    for (int i = 0; i < WIDE_N; i++) {
        float *out = r->forward + i * per;
        slots[i] = lm ? engine_slot_open(e) : -1;
        q[i] = (struct engine_seq){.tokens = tokens[i], .len = wide_len[i], .slot = lm ? slots[i] : -1,
                                   .logits = out,
                                   .attention = LK ? out + (lm ? 16 * (size_t)V : (size_t)C) : NULL};
    }
    /* A language model's first text alone, then the other two: two batch
     * shapes. */
    if (engine_forward(e, q, lm ? 1 : WIDE_N, err, sizeof err) != 0 ||
        (lm && engine_forward(e, q + 1, WIDE_N - 1, err, sizeof err) != 0))
        fail_msg("forward: %s", err);
    for (int s = 0; lm && s < WIDE_STEPS; s++) {
        int32_t tok[WIDE_N];
        for (int i = 0; i < WIDE_N; i++)
            tok[i] = tokens[i][(s + i) % 16];
        float *o = r->steps + s * per_step;
        if (engine_step(e, slots, tok, WIDE_N, o, m->cfg.attn_window ? o + (size_t)WIDE_N * V : NULL, err,
                        sizeof err) != 0)
            fail_msg("step %d: %s", s, err);
    }

    struct engine_seq t[WIDE_N];
    int labels[WIDE_N];
    for (int i = 0; i < WIDE_N; i++) {
        t[i] = (struct engine_seq){.tokens = tokens[i], .len = wide_len[i], .slot = -1,
                                   .next = lm ? tokens[i] + wide_len[i] : NULL};
        labels[i] = i % C;
    }
    struct train_result res = {0};
    const struct train_options no_dropout = {0.0f, 0.0f, 1};
    if (engine_zero_grads(e) != 0 || engine_train_batch(e, t, WIDE_N, labels, &no_dropout, &res, err, sizeof err) ||
        engine_grads_to_host(e, r->grads) != 0)
        fail_msg("training: %s", err);
    engine_destroy(e);
    backend_destroy(be);
}

static void expect_close(const char *model, const char *what, const float *got, const float *want, size_t n,
                         double tol)
{
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= tol * (1.0 + fabs((double)want[i]))))
            fail_msg("%s: %s[%zu] is %.7g on CUDA, %.7g on the CPU", model, what, i, got[i], want[i]);
}

/* Wide model k, its weights drawn from seed 11 + k, and the texts that
 * the wide tests give it. */
static void wide_model(size_t k, struct model *m, int32_t tokens[WIDE_N][16])
{
    model_from_json(wide_models[k], 1, 11 + k, m);
    for (int i = 0; i < WIDE_N; i++)
        for (int t = 0; t < 16; t++)
            tokens[i][t] = (int32_t)((i * 97 + t * 31 + 7) % m->vocab);
}

/* Forwards (logits, attention), steps and a training batch's gradients on
 * CUDA match the CPU, within 1e-4 (the gradients, summed in other orders
 * over more terms, within 1e-3), with the recurrence computed by cuBLAS's
 * products and fused.  The fused kernel's tiles of 8 rows (batches of at
 * most 8) meet every edge here: H over two stages of 128 k (132), H not a
 * multiple of 4 (70: no 16-byte loads), a GRU's tiles of 5 units with the
 * last one short (132), the skip's two matrices, dynamic attention's
 * scores in parts from tiles of the query (8 of 16 units, read 16 bytes
 * at a time; 3 with the last one short), and what the fused step leaves
 * to the products: parts that would not fit the row's gates (10 windows x
 * 1 tile > 4 x 2) and a window of 40.  Skipped without a GPU. */
static void test_cuda_matches_cpu_on_wide_models(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    for (size_t k = 0; k < sizeof wide_models / sizeof wide_models[0]; k++) {
        struct model m;
        int32_t tokens[WIDE_N][16];
        wide_model(k, &m, tokens);
        struct wide_run cpu, gpu;
        wide_run_on(&m, DEVICE_CPU, PRECISION_FP32, RECURRENCE_GEMM, tokens, &cpu);
        for (int rec = RECURRENCE_GEMM; rec <= RECURRENCE_FUSED; rec++) {
            char what[256];
            snprintf(what, sizeof what, "%s, %s", wide_models[k], backend_recurrence_name((enum recurrence)rec));
            wide_run_on(&m, DEVICE_CUDA, PRECISION_FP32, (enum recurrence)rec, tokens, &gpu);
            expect_close(what, "forward", gpu.forward, cpu.forward, cpu.n_forward, 1e-4);
            expect_close(what, "steps", gpu.steps, cpu.steps, cpu.n_steps, 1e-4);
            expect_close(what, "gradients", gpu.grads, cpu.grads, cpu.n_grads, 1e-3);
            wide_run_free(&gpu);
        }
        wide_run_free(&cpu);
        model_free(&m);
    }
}

/* A batch wider than one tile of 64 rows (the CUDA kernels' unit of
 * rows; H over two stages of 64 k of the fused kernel's), on a model with
 * every term of an LSTM cell (dynamic attention,
 * the temporal skip, two recurrent matrices): a forward of 70 texts of
 * their own lengths, then steps of 70 slots of which half started a step
 * ahead, so that a step's rows use both matrices, and steps of 12, 24 and
 * 40 of them, which the fused kernel takes in tiles of 16, 32 and 64 rows.
 * On CUDA, with the recurrence by products and fused, the logits and
 * attention weights match the CPU's within 1e-4.  Skipped without a GPU. */
static void test_cuda_matches_cpu_past_one_tile_of_rows(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    enum { N = 70, LEN = 9, STEPS = 5, K = 3, L = 2 };
    static const int step_rows[STEPS + 1] = {N / 2, N, 12, 24, 40, N};
    char err[512];
    struct model m;
    model_from_json("{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 100, \"layers\": 2, \"embed_dim\": 8,"
                    " \"tokenizer\": {\"type\": \"byte\"}, \"attention\": {\"window\": 3, \"mode\": \"dynamic\"},"
                    " \"skip\": {\"period\": 2, \"matrices\": 2}}",
                    1, 23, &m);
    const int V = m.vocab;
    static int32_t tokens[N][LEN];
    for (int i = 0; i < N; i++)
        for (int t = 0; t < LEN; t++)
            tokens[i][t] = (int32_t)((i * 89 + t * 37 + 5) % V);
    /* Per text: logits [LEN][V]; per step: logits [N][V], attention [N][L][K]. */
    const size_t per_step = (size_t)N * (V + L * K), n_out = (size_t)N * LEN * V + (STEPS + 1) * per_step;
    float *out[3];
    const enum device_kind devices[3] = {DEVICE_CPU, DEVICE_CUDA, DEVICE_CUDA};
    const enum recurrence recs[3] = {RECURRENCE_GEMM, RECURRENCE_GEMM, RECURRENCE_FUSED};
    for (int d = 0; d < 3; d++) {
        struct backend *be = backend_create(devices[d], err, sizeof err);
        struct engine *e = be && backend_set_recurrence(be, recs[d], err, sizeof err) == 0
                               ? engine_create(&m, be, N, err, sizeof err)
                               : NULL;
        if (!e)
            fail_msg("%s", err);
        assert_non_null(out[d] = calloc(n_out, sizeof(float)));
        struct engine_seq seqs[N];
        for (int i = 0; i < N; i++)
            seqs[i] = (struct engine_seq){.tokens = tokens[i], .len = 1 + i % LEN, .slot = -1,
                                          .logits = out[d] + (size_t)i * LEN * V};
        if (engine_forward(e, seqs, N, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        int slots[N];
        for (int i = 0; i < N; i++)
            assert_true((slots[i] = engine_slot_open(e)) >= 0);
        float *o = out[d] + (size_t)N * LEN * V;
        for (int s = 0; s <= STEPS; s++, o += per_step) {
            const int n = step_rows[s];
            int32_t tok[N];
            for (int i = 0; i < n; i++)
                tok[i] = tokens[i][(s + i) % LEN];
            if (engine_step(e, slots, tok, n, o, o + (size_t)N * V, err, sizeof err) != 0)
                fail_msg("step %d: %s", s, err);
        }
        engine_destroy(e);
        backend_destroy(be);
    }
    expect_close("70 rows", "forward and steps", out[1], out[0], n_out, 1e-4);
    expect_close("70 rows, fused", "forward and steps", out[2], out[0], n_out, 1e-4);
    for (int d = 0; d < 3; d++)
        free(out[d]);
    model_free(&m);
}

/* The largest error of x against want, relative to the size of want. */
static double largest_error(const float *x, const float *want, size_t n)
{
    double most = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)x[i] - want[i]) / (1.0 + fabs((double)want[i]));
        most = e > most ? e : most;
    }
    return most;
}

/* Each precision rounds as named: TF32 moves a forward's results off FP32,
 * BF16 (7 mantissa bits to TF32's 10) several times further, and neither
 * by more than its rounding can explain.  cuBLAS, asked only to allow BF16
 * on FP32 operands, ran TF32 kernels, so BF16 multiplies BF16 copies of
 * its operands; this fails where BF16 is TF32 under another name.
 * Skipped without a GPU. */
static void test_cuda_precisions_round_as_named(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    struct model m;
    int32_t tokens[WIDE_N][16];
    wide_model(0, &m, tokens);
    struct wide_run run[3];
    const enum precision precs[3] = {PRECISION_FP32, PRECISION_TF32, PRECISION_BF16};
    for (int p = 0; p < 3; p++)
        wide_run_on(&m, DEVICE_CUDA, precs[p], RECURRENCE_GEMM, tokens, &run[p]);
    double tf32 = largest_error(run[1].forward, run[0].forward, run[0].n_forward);
    double bf16 = largest_error(run[2].forward, run[0].forward, run[0].n_forward);
    if (!(tf32 > 0.0 && tf32 < 1e-2 && bf16 > 4.0 * tf32 && bf16 < 1e-1))
        fail_msg("largest errors against FP32: TF32 %.3g, BF16 %.3g", tf32, bf16);
    for (int p = 0; p < 3; p++)
        wide_run_free(&run[p]);
    model_free(&m);
}

/* BF16 outlives a change of the weights: training changes them every
 * step (engine_optim_step) and may put saved ones back
 * (engine_params_from_host), and its forwards and validation must still
 * multiply BF16 copies, not fall back to FP32 operands.  The same weights
 * uploaded again, or left as they were by a step of zero gradients, give
 * the same bits.  Skipped without a GPU. */
static void test_cuda_bf16_survives_new_weights(void **state)
{
    (void)state;
    if (!backend_cuda_available())
        skip();
    char err[512];
    struct model m;
    int32_t tokens[WIDE_N][16];
    wide_model(0, &m, tokens);
    struct backend *be = backend_create(DEVICE_CUDA, err, sizeof err);
    if (!be || backend_set_precision(be, PRECISION_BF16, err, sizeof err) != 0)
        fail_msg("backend: %s", err);
    struct engine *e = engine_create(&m, be, 0, err, sizeof err);
    if (!e)
        fail_msg("engine: %s", err);
    float out[3][16 * 256];
    struct optim_update sgd = {.kind = OPTIM_SGD, .neg_lr = -0.1f};
    double grad_norm;
    for (int k = 0; k < 3; k++) {
        if (k == 1)
            assert_int_equal(engine_params_from_host(e, m.arena), 0);
        if (k == 2) {
            assert_int_equal(engine_zero_grads(e) || engine_optim_step(e, &sgd, &grad_norm), 0);
            assert_true(grad_norm == 0.0);
        }
        struct engine_seq q = {.tokens = tokens[0], .len = 16, .slot = -1, .logits = out[k]};
        if (engine_forward(e, &q, 1, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
    }
    if (memcmp(out[0], out[1], sizeof out[0]) != 0)
        fail_msg("the same weights uploaded again give other results in BF16");
    if (memcmp(out[0], out[2], sizeof out[0]) != 0)
        fail_msg("weights an optimizer step left as they were give other results in BF16");
    engine_destroy(e);
    backend_destroy(be);
    model_free(&m);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_score_long_text_in_chunks, setup_lm, teardown),
        cmocka_unit_test(test_score_alternatives),
        cmocka_unit_test(test_score_alternatives_cuda),
        cmocka_unit_test(test_score_attention),
        cmocka_unit_test(test_score_attention_cuda),
        cmocka_unit_test_setup_teardown(test_forward_refuses_bad_batches, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_slots_at_different_positions_cannot_share_a_forward, setup_lm,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_step_refuses_misuse, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_classifier_has_no_slots, setup_cls, teardown),
        cmocka_unit_test_setup_teardown(test_training_refuses_bad_batches, setup_cls, teardown),
        cmocka_unit_test_setup_teardown(test_threads_give_the_same_bits, setup_big_lm, teardown),
        cmocka_unit_test_setup_teardown(test_training_threads_give_the_same_bits, setup_big_lm, teardown),
        cmocka_unit_test(test_derived_weights_give_the_same_bits),
        cmocka_unit_test(test_large_batches_give_each_text_its_bits),
        cmocka_unit_test_setup_teardown(test_forward_calls_are_bounded, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_backend_error_does_not_stick, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_graph_cache_policy, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_padded_batches_share_a_graph, setup_lm, teardown),
        cmocka_unit_test(test_cuda_graphs_give_the_same_bits),
        cmocka_unit_test(test_cuda_matches_cpu_on_wide_models),
        cmocka_unit_test(test_cuda_matches_cpu_past_one_tile_of_rows),
        cmocka_unit_test(test_cuda_precisions_round_as_named),
        cmocka_unit_test(test_cuda_bf16_survives_new_weights),
    };
    /* Before the pool starts: three threads even on a one-core machine. */
    setenv("RRN_THREADS", "3", 1);
    return cmocka_run_group_tests_name("engine", tests, NULL, NULL);
}
