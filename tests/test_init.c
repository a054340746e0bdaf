/* test_init.c - the starting weights of a model to train (train/init.c):
 * each recurrent matrix's H x H gate blocks orthogonal, drawn uniformly
 * over the orthogonal matrices as torch.nn.init.orthogonal_ draws them,
 * for every cell, direction and skip matrix; left as the uniform draw when
 * the config says "orthogonal": false.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include <cmocka.h>

#include "config.h"
#include "init.h"
#include "model.h"

#include "support/filter.h"

/* Three gates (GRU), two directions and two recurrent matrices: every
 * block model_init makes orthogonal is in one of these. */
static const char *const configs[] = {
    "{\"task\": \"classify\", \"cell\": \"gru\", \"hidden\": 24, \"layers\": 2, \"embed_dim\": 8,"
    " \"bidirectional\": true, \"classes\": [\"a\", \"b\"], \"tokenizer\": {\"type\": \"byte\"}}",
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 32, \"embed_dim\": 8,"
    " \"skip\": {\"period\": 2, \"matrices\": 2}, \"tokenizer\": {\"type\": \"byte\"}}",
};

static void model_from(const char *json, int orthogonal, struct model *m)
{
    char err[256];
    struct model_config cfg;
    if (config_parse(json, &cfg, err, sizeof err) || model_alloc(m, &cfg, err, sizeof err))
        fail_msg("%s", err);
    const struct init_options o = {orthogonal, 1.0f};
    assert_int_equal(model_init(m, &o, 7), 0);
}

/* The largest |(B B^T)_ij - I_ij| of the H x H block b. */
static double off_identity(const float *b, int H)
{
    double worst = 0;
    for (int i = 0; i < H; i++)
        for (int j = 0; j < H; j++) {
            double dot = 0;
            for (int k = 0; k < H; k++)
                dot += (double)b[(size_t)i * H + k] * b[(size_t)j * H + k];
            worst = fmax(worst, fabs(dot - (i == j)));
        }
    return worst;
}

/* Calls f on every gate block of every recurrent matrix of m. */
static void each_block(const struct model *m, void (*f)(const float *block, int H, void *arg), void *arg)
{
    const struct model_config *c = &m->cfg;
    const int H = c->hidden, G = config_gates(c);
    for (int l = 0; l < c->layers; l++)
        for (int d = 0; d < config_directions(c); d++)
            for (int j = 0; j < c->skip_matrices; j++)
                for (int g = 0; g < G; g++)
                    f(m->layers[l].dir[d].w_hh[j] + (size_t)g * H * H, H, arg);
}

struct tally {
    int blocks;
    double worst; /* the largest off_identity */
    int diagonal, negative; /* diagonal entries, and those below 0 */
};

static void count_block(const float *b, int H, void *arg)
{
    struct tally *t = arg;
    t->blocks++;
    t->worst = fmax(t->worst, off_identity(b, H));
    for (int i = 0; i < H; i++) {
        t->diagonal++;
        t->negative += b[(size_t)i * H + i] < 0;
    }
}

static void test_recurrent_blocks_are_orthogonal(void **state)
{
    (void)state;
    const int want_blocks[] = {2 * 2 * 3, 2 * 4};
    for (size_t k = 0; k < sizeof configs / sizeof *configs; k++) {
        struct model m;
        model_from(configs[k], 1, &m);
        struct tally t = {0};
        each_block(&m, count_block, &t);
        assert_int_equal(t.blocks, want_blocks[k]);
        if (t.worst > 1e-6)
            fail_msg("config %zu: a gate block is %g from orthogonal", k, t.worst);
        /* Householder's QR leaves every diagonal entry of Q below 0; with
         * the signs of R's diagonal taken out, as torch does, an entry is
         * as likely either way: within four standard deviations of half. */
        if (fabs(t.negative - t.diagonal / 2.0) > 4 * sqrt(t.diagonal / 4.0))
            fail_msg("config %zu: %d of %d diagonal entries below 0", k, t.negative, t.diagonal);
        model_free(&m);
    }
}

static void test_uniform_blocks_without_orthogonal(void **state)
{
    (void)state;
    struct model m;
    model_from(configs[1], 0, &m);
    struct tally t = {0};
    each_block(&m, count_block, &t);
    /* Entries uniform in +-1/sqrt(H): each row's squared norm is about
     * 1/3, far from the identity's 1. */
    if (t.worst < 0.5)
        fail_msg("without orthogonal, a gate block is orthogonal to %g", t.worst);
    model_free(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_recurrent_blocks_are_orthogonal),
        cmocka_unit_test(test_uniform_blocks_without_orthogonal),
    };
    test_filter_from_env();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
