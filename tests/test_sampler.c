/* test_sampler.c - the sampler's generator and filters: the generator
 * matches xoshiro256**'s published outputs, and its seeding splitmix64's,
 * greedy picks the argmax, temperature sampling follows the softmax,
 * top-k and top-p keep exactly the tokens they should, each as often as
 * its share of what they kept, and a seed reproduces its draws;
 * log-probabilities are the log-softmax, their top k in order.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>

#include "sampler.h"
#include "support/filter.h"

static void test_xoshiro_reference_outputs(void **state)
{
    (void)state;
    /* The reference implementation from state {1, 2, 3, 4}. */
    struct rng r = {{1, 2, 3, 4}};
    assert_true(rng_next(&r) == 11520ULL);
    assert_true(rng_next(&r) == 0ULL);
    assert_true(rng_next(&r) == 1509978240ULL);
    assert_true(rng_next(&r) == 1215971899390074240ULL);
    for (int i = 0; i < 1000; i++) {
        double u = rng_uniform(&r);
        assert_true(u >= 0.0 && u < 1.0);
    }
    /* Seeding: the state is splitmix64's first four outputs from the seed,
     * which for seed 0 are the reference implementation's. */
    static const uint64_t splitmix64_from_0[4] = {0xe220a8397b1dcdafULL, 0x6e789e6aa1b965f4ULL,
                                                  0x06c45d188009454fULL, 0xf88bb8a8724c81ecULL};
    rng_seed(&r, 0);
    for (int i = 0; i < 4; i++)
        assert_true(r.s[i] == splitmix64_from_0[i]);
}

static void test_greedy_and_top_k_one(void **state)
{
    (void)state;
    float logits[5] = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f};
    struct sampler s;
    struct rng r;
    rng_seed(&r, 1);
    assert_int_equal(sampler_init(&s, 5), 0);
    struct sample_params greedy = {.temperature = 0.0f, .top_p = 1.0f};
    assert_int_equal(sample_token(&s, logits, &greedy, &r), 1); /* ties go to the lower id */
    struct sample_params k1 = {.temperature = 1.0f, .top_k = 1, .top_p = 1.0f};
    for (int i = 0; i < 100; i++)
        assert_int_equal(sample_token(&s, logits, &k1, &r), 1);
    sampler_free(&s);
}

/* Draws n tokens of V and checks that each came within 1% (absolute) as
 * often as want[] (probabilities summing to 1) says, and never one whose
 * want is 0. */
static void expect_frequencies(struct sampler *s, const float *logits, int V, const struct sample_params *p,
                               struct rng *r, int n, const double *want)
{
    int count[8] = {0};
    assert_true(V <= 8);
    for (int i = 0; i < n; i++)
        count[sample_token(s, logits, p, r)]++;
    for (int v = 0; v < V; v++) {
        assert_true(fabs((double)count[v] / n - want[v]) < 0.01);
        if (want[v] == 0)
            assert_int_equal(count[v], 0);
    }
}

/* 100,000 draws at temperature 2 land within 1% of softmax(logits / 2). */
static void test_temperature_follows_softmax(void **state)
{
    (void)state;
    float logits[4] = {1.0f, 0.0f, -1.0f, 0.5f};
    double want[4], sum = 0;
    for (int v = 0; v < 4; v++)
        sum += want[v] = exp(logits[v] / 2.0);
    for (int v = 0; v < 4; v++)
        want[v] /= sum;
    struct sampler s;
    struct rng r;
    rng_seed(&r, 7);
    assert_int_equal(sampler_init(&s, 4), 0);
    struct sample_params p = {.temperature = 2.0f, .top_p = 1.0f};
    expect_frequencies(&s, logits, 4, &p, &r, 100000, want);
    sampler_free(&s);
}

/* Top-k and top-p keep exactly the tokens they should, each drawn as often
 * as its share of what was kept. */
static void test_top_k_and_top_p_keep_the_right_tokens(void **state)
{
    (void)state;
    /* Probabilities at T=1 in order: id 2 (0.64), id 0 (0.24), id 1 (0.09), id 3 (0.03). */
    float logits[4] = {logf(0.24f), logf(0.09f), logf(0.64f), logf(0.03f)};
    const double two[4] = {0.24 / 0.88, 0, 0.64 / 0.88, 0}, one[4] = {0, 0, 1, 0};
    struct sampler s;
    struct rng r;
    rng_seed(&r, 3);
    assert_int_equal(sampler_init(&s, 4), 0);
    struct sample_params k2 = {.temperature = 1.0f, .top_k = 2, .top_p = 1.0f};
    expect_frequencies(&s, logits, 4, &k2, &r, 50000, two);
    /* top_p 0.8: 0.64 is not enough, 0.64 + 0.24 is. */
    struct sample_params p8 = {.temperature = 1.0f, .top_p = 0.8f};
    expect_frequencies(&s, logits, 4, &p8, &r, 50000, two);
    struct sample_params p5 = {.temperature = 1.0f, .top_p = 0.5f};
    expect_frequencies(&s, logits, 4, &p5, &r, 200, one);
    /* Both: top-k keeps three (0.97), and top_p 0.95 of that (0.92) needs
     * all three. */
    const double three[4] = {0.24 / 0.97, 0.09 / 0.97, 0.64 / 0.97, 0};
    struct sample_params k3p95 = {.temperature = 1.0f, .top_k = 3, .top_p = 0.95f};
    expect_frequencies(&s, logits, 4, &k3p95, &r, 50000, three);
    sampler_free(&s);
}

static void test_same_seed_same_draws(void **state)
{
    (void)state;
    float logits[8] = {0.3f, 0.1f, 0.2f, 0.0f, 0.25f, 0.15f, 0.05f, 0.3f};
    struct sampler s;
    struct rng a, b, c;
    rng_seed(&a, 12345);
    rng_seed(&b, 12345);
    rng_seed(&c, 12346);
    assert_int_equal(sampler_init(&s, 8), 0);
    struct sample_params p = {.temperature = 1.0f, .top_k = 6, .top_p = 0.95f};
    int differs = 0;
    for (int i = 0; i < 200; i++) {
        int x = sample_token(&s, logits, &p, &a);
        assert_int_equal(x, sample_token(&s, logits, &p, &b));
        differs |= x != sample_token(&s, logits, &p, &c);
    }
    assert_true(differs);
    sampler_free(&s);
}

/* Against the log-softmax computed here in long double, on logits whose
 * largest term is near 1 (ln p near 0) and far apart (no overflow). */
static void test_token_logprobs_are_the_log_softmax(void **state)
{
    (void)state;
    enum { V = 300 };
    float logits[V];
    for (int v = 0; v < V; v++)
        logits[v] = (float)((v * 37 % 101) - 50) * 0.25f; /* 12.5 the largest, at 30, 131 and 232 */
    logits[123] = 90.0f; /* p(123) = 1 - 4e-9: ln p must keep its digits */
    logits[7] = 70.0f;   /* a tie with 8, which must follow it */
    logits[8] = 70.0f;
    long double sum = 0;
    for (int v = 0; v < V; v++)
        sum += expl((long double)logits[v]);
    const long double lse = logl(sum);
    struct token_logprob top[5];
    const int toks[] = {123, 7, 0, 30, 299};
    for (size_t i = 0; i < sizeof toks / sizeof *toks; i++) {
        const long double want = logits[toks[i]] - lse;
        const float lp = token_logprobs(logits, V, toks[i], 5, top);
        if (!(fabsl(lp - want) <= 1e-6L * fabsl(want)))
            fail_msg("token %d: ln p %.9g, want %.9Lg", toks[i], lp, want);
    }
    assert_true(logits[123] - lse > -5e-9L && logits[123] - lse < -4e-9L);
    const int want_ids[5] = {123, 7, 8, 30, 131};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(top[i].id, want_ids[i]);
        const long double want = logits[want_ids[i]] - lse;
        assert_true(fabsl(top[i].logprob - want) <= 1e-6L * fabsl(want));
    }
    /* Only what is asked for is written. */
    top[1].id = -1;
    token_logprobs(logits, V, 0, 1, top);
    assert_int_equal(top[0].id, 123);
    assert_int_equal(top[1].id, -1);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_xoshiro_reference_outputs),
        cmocka_unit_test(test_greedy_and_top_k_one),
        cmocka_unit_test(test_temperature_follows_softmax),
        cmocka_unit_test(test_top_k_and_top_p_keep_the_right_tokens),
        cmocka_unit_test(test_same_seed_same_draws),
        cmocka_unit_test(test_token_logprobs_are_the_log_softmax),
    };
    return cmocka_run_group_tests_name("sampler", tests, NULL, NULL);
}
