/* test_init.c - the starting weights of a model to train (train/init.c):
 * each recurrent matrix's H x H gate blocks orthogonal, drawn uniformly
 * over the orthogonal matrices as torch.nn.init.orthogonal_ draws them,
 * for every cell, direction and skip matrix; left as the uniform draw when
 * the config says "orthogonal": false; and every other tensor drawn as
 * PyTorch draws the same module's.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include <cmocka.h>

#include "config.h"
#include "model.h"

#include "support/filter.h"
#include "support/model_json.h"

/* Three gates (GRU), two directions and two recurrent matrices: every
 * block model_init makes orthogonal is in one of these. */
static const char *const configs[] = {
    "{\"task\": \"classify\", \"cell\": \"gru\", \"hidden\": 24, \"layers\": 2, \"embed_dim\": 8,"
    " \"bidirectional\": true, \"classes\": [\"a\", \"b\"], \"tokenizer\": {\"type\": \"byte\"}}",
    "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 32, \"embed_dim\": 8,"
    " \"skip\": {\"period\": 2, \"matrices\": 2}, \"tokenizer\": {\"type\": \"byte\"}}",
};

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
        model_from_json(configs[k], 1, 7, &m);
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
    model_from_json(configs[1], 0, 7, &m);
    struct tally t = {0};
    each_block(&m, count_block, &t);
    /* Entries uniform in +-1/sqrt(H): each row's squared norm is about
     * 1/3, far from the identity's 1. */
    if (t.worst < 0.5)
        fail_msg("without orthogonal, a gate block is orthogonal to %g", t.worst);
    model_free(&m);
}

/* x[0..n) lie in [lo, hi] and fill it: some within a tenth of its width
 * of each end, so that a tensor left at zero, or drawn narrower or wider,
 * fails. */
static void expect_spread(const char *what, const float *x, size_t n, double lo, double hi)
{
    double min = x[0], max = x[0];
    for (size_t i = 1; i < n; i++) {
        min = fmin(min, x[i]);
        max = fmax(max, x[i]);
    }
    const double slack = (hi - lo) / 10;
    if (!(min >= lo && max <= hi && min < lo + slack && max > hi - slack))
        fail_msg("%s: from %g to %g, not over [%g, %g]", what, min, max, lo, hi);
}

/* As torch.nn.LSTM, nn.Embedding and nn.Linear start: recurrent weights
 * and biases uniform in +-1/sqrt(H), the forget gate's input bias moved
 * up by forget_bias, the embedding N(0, 1), the head uniform in
 * +-1/sqrt(fan_in); attention's query as the recurrent weights, a static
 * window's logits 0. */
static void test_other_tensors_start_as_pytorch(void **state)
{
    (void)state;
    static const char *const json[] = {
        "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 64, \"layers\": 2, \"embed_dim\": 16, \"peephole\": true,"
        " \"tokenizer\": {\"type\": \"byte\"}, \"attention\": {\"window\": 4, \"mode\": \"dynamic\"}}",
        "{\"task\": \"lm\", \"cell\": \"lstm\", \"hidden\": 64, \"embed_dim\": 16,"
        " \"tokenizer\": {\"type\": \"byte\"}, \"attention\": {\"window\": 4, \"mode\": \"static\"}}",
    };
    for (size_t k = 0; k < sizeof json / sizeof *json; k++) {
        struct model m;
        model_from_json(json[k], 1, 7, &m);
        const struct model_config *c = &m.cfg;
        const int H = c->hidden, G = config_gates(c), W = config_output_width(c);
        const double b = 1.0 / sqrt(H), fb = 1.0; /* model_from_json's forget_bias */
        const size_t ne = (size_t)m.vocab * c->embed_dim;
        double sum = 0, sq = 0;
        for (size_t i = 0; i < ne; i++) {
            sum += m.embedding[i];
            sq += (double)m.embedding[i] * m.embedding[i];
        }
        /* 4,096 draws: the mean's standard deviation 0.016, the
         * variance's 0.022. */
        const double mean = sum / ne, var = sq / ne - mean * mean;
        if (!(fabs(mean) < 0.08 && fabs(var - 1.0) < 0.11))
            fail_msg("embedding: mean %g, variance %g, not N(0, 1)", mean, var);
        for (int l = 0; l < c->layers; l++) {
            const struct layer_dir_params *p = &m.layers[l].dir[0];
            expect_spread("w_ih", p->w_ih, (size_t)G * H * m.layers[l].in, -b, b);
            expect_spread("b_hh", p->b_hh, (size_t)G * H, -b, b);
            expect_spread("b_ih input gate", p->b_ih, (size_t)H, -b, b);
            expect_spread("b_ih forget gate", p->b_ih + H, (size_t)H, fb - b, fb + b);
            expect_spread("b_ih cell and output gates", p->b_ih + 2 * H, (size_t)2 * H, -b, b);
            if (p->peephole)
                expect_spread("peephole", p->peephole, (size_t)H, -b, b);
            if (p->attn_query)
                expect_spread("attention query", p->attn_query, (size_t)H * H, -b, b);
            for (int j = 0; p->attn_logits && j < c->attn_window; j++)
                assert_true(p->attn_logits[j] == 0.0f);
        }
        expect_spread("head_w", m.head_w, (size_t)m.head_out * W, -1.0 / sqrt(W), 1.0 / sqrt(W));
        expect_spread("head_b", m.head_b, (size_t)m.head_out, -1.0 / sqrt(W), 1.0 / sqrt(W));
        model_free(&m);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_recurrent_blocks_are_orthogonal),
        cmocka_unit_test(test_uniform_blocks_without_orthogonal),
        cmocka_unit_test(test_other_tensors_start_as_pytorch),
    };
    test_filter_from_env();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
