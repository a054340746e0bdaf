/* test_config.c - config_parse, config_to_json and the derived sizes.
 *
 * The error table checks that each way a config can be wrong is refused
 * with a message naming the field; the round-trip tests check that what
 * config_to_json writes parses back to the same struct.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "support/buf.h"
#include "support/filter.h"

#define TOK "\"tokenizer\":{\"type\":\"byte\"}"
#define CLS "\"classes\":[\"a\",\"b\"]"
#define HEAD "\"task\":\"classify\",\"cell\":\"lstm\",\"hidden\":8,\"embed_dim\":4"
#define BASE HEAD "," CLS "," TOK
#define LM "\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":8,\"embed_dim\":4," TOK

static void assert_configs_equal(const struct model_config *a, const struct model_config *b)
{
    assert_int_equal(a->task, b->task);
    assert_int_equal(a->cell, b->cell);
    assert_int_equal(a->hidden, b->hidden);
    assert_int_equal(a->layers, b->layers);
    assert_int_equal(a->bidirectional, b->bidirectional);
    assert_int_equal(a->embed_dim, b->embed_dim);
    assert_int_equal(a->peephole, b->peephole);
    assert_int_equal(a->skip_period, b->skip_period);
    assert_int_equal(a->skip_matrices, b->skip_matrices);
    assert_int_equal(a->residual_depth, b->residual_depth);
    assert_int_equal(a->attn_mode, b->attn_mode);
    assert_int_equal(a->attn_window, b->attn_window);
    assert_int_equal(a->pool, b->pool);
    assert_int_equal(a->n_classes, b->n_classes);
    for (int i = 0; i < a->n_classes; i++)
        assert_string_equal(a->classes[i], b->classes[i]);
    assert_int_equal(a->n_outputs, b->n_outputs);
    assert_int_equal(a->input_dim, b->input_dim);
    assert_int_equal(a->tok_type, b->tok_type);
    assert_int_equal(a->n_tokens, b->n_tokens);
    for (int i = 0; i < a->n_tokens; i++)
        assert_string_equal(a->tokens[i], b->tokens[i]);
    assert_int_equal(a->unk, b->unk);
}

/* parse -> to_json -> parse gives the same struct, and writing it again
 * gives the same text. */
static void check_roundtrip(const struct model_config *cfg)
{
    char err[256];
    char *json = config_to_json(cfg);
    assert_non_null(json);
    struct model_config back;
    assert_int_equal(config_parse(json, &back, err, sizeof err), 0);
    assert_configs_equal(cfg, &back);
    char *again = config_to_json(&back);
    assert_non_null(again);
    assert_string_equal(json, again);
    free(again);

    char *pretty = config_to_json_pretty(cfg);
    assert_non_null(pretty);
    assert_non_null(strchr(pretty, '\n'));
    config_free(&back);
    assert_int_equal(config_parse(pretty, &back, err, sizeof err), 0);
    assert_configs_equal(cfg, &back);
    config_free(&back);
    free(pretty);
    free(json);
}

static void test_defaults(void **state)
{
    (void)state;
    struct model_config c;
    char err[256];
    assert_int_equal(config_parse("{" BASE "}", &c, err, sizeof err), 0);
    assert_int_equal(c.task, TASK_CLASSIFY);
    assert_int_equal(c.cell, CELL_LSTM);
    assert_int_equal(c.hidden, 8);
    assert_int_equal(c.embed_dim, 4);
    assert_int_equal(c.layers, 1);
    assert_int_equal(c.bidirectional, 0);
    assert_int_equal(c.peephole, 0);
    assert_int_equal(c.skip_period, 1);
    assert_int_equal(c.skip_matrices, 1);
    assert_int_equal(c.residual_depth, 0);
    assert_int_equal(c.attn_mode, ATTN_NONE);
    assert_int_equal(c.attn_window, 0);
    assert_int_equal(c.pool, POOL_LAST);
    assert_int_equal(c.n_classes, 2);
    assert_string_equal(c.classes[0], "a");
    assert_string_equal(c.classes[1], "b");
    assert_int_equal(c.tok_type, TOKENIZER_BYTE);
    assert_int_equal(c.n_tokens, 0);
    assert_null(c.tokens);

    assert_int_equal(config_gates(&c), 4);
    assert_int_equal(config_directions(&c), 1);
    assert_int_equal(config_vocab(&c), 256);
    assert_int_equal(config_layer_input(&c, 0), 4);
    assert_int_equal(config_layer_input(&c, 1), 8);
    assert_int_equal(config_output_width(&c), 8);
    assert_int_equal(config_head_out(&c), 2);
    check_roundtrip(&c);
    config_free(&c);
    assert_null(c.classes);
    config_free(&c); /* freeing twice is harmless: the struct was zeroed */
}

static void test_null_options_are_defaults(void **state)
{
    (void)state;
    struct model_config c;
    char err[256];
    assert_int_equal(config_parse("{" BASE ",\"skip\":null,\"attention\":null}", &c, err, sizeof err), 0);
    assert_int_equal(c.skip_period, 1);
    assert_int_equal(c.skip_matrices, 1);
    assert_int_equal(c.attn_mode, ATTN_NONE);
    config_free(&c);
    /* A partial skip object leaves the other member at its default. */
    assert_int_equal(config_parse("{" BASE ",\"skip\":{\"period\":2}}", &c, err, sizeof err), 0);
    assert_int_equal(c.skip_period, 2);
    assert_int_equal(c.skip_matrices, 1);
    config_free(&c);
}

static void test_everything(void **state)
{
    (void)state;
    const char *json =
        "{\"task\":\"classify\",\"cell\":\"lstm\",\"hidden\":16,\"layers\":3,"
        "\"bidirectional\":true,\"embed_dim\":10,\"peephole\":true,"
        "\"skip\":{\"period\":3,\"matrices\":2},\"residual_depth\":true,"
        "\"attention\":{\"window\":5,\"mode\":\"dynamic\"},\"pool\":\"mean\","
        "\"classes\":[\"neg\",\"neu\",\"pos\"],"
        "\"tokenizer\":{\"type\":\"word\",\"tokens\":[\"<unk>\",\"the\",\"caf\xc3\xa9\",\"\\\"q\\\"\\n\"],\"unk\":0}}";
    struct model_config c;
    char err[256];
    assert_int_equal(config_parse(json, &c, err, sizeof err), 0);
    assert_int_equal(c.hidden, 16);
    assert_int_equal(c.layers, 3);
    assert_int_equal(c.bidirectional, 1);
    assert_int_equal(c.embed_dim, 10);
    assert_int_equal(c.peephole, 1);
    assert_int_equal(c.skip_period, 3);
    assert_int_equal(c.skip_matrices, 2);
    assert_int_equal(c.residual_depth, 1);
    assert_int_equal(c.attn_mode, ATTN_DYNAMIC);
    assert_int_equal(c.attn_window, 5);
    assert_int_equal(c.pool, POOL_MEAN);
    assert_int_equal(c.n_classes, 3);
    assert_string_equal(c.classes[2], "pos");
    assert_int_equal(c.tok_type, TOKENIZER_WORD);
    assert_int_equal(c.n_tokens, 4);
    assert_string_equal(c.tokens[2], "caf\xc3\xa9");
    assert_string_equal(c.tokens[3], "\"q\"\n");
    assert_int_equal(c.unk, 0);
    assert_int_equal(config_directions(&c), 2);
    assert_int_equal(config_vocab(&c), 4);
    assert_int_equal(config_layer_input(&c, 0), 10);
    assert_int_equal(config_layer_input(&c, 2), 32);
    assert_int_equal(config_output_width(&c), 32);
    assert_int_equal(config_head_out(&c), 3);
    check_roundtrip(&c);
    config_free(&c);

    assert_int_equal(config_parse("{" BASE ",\"attention\":{\"mode\":\"static\",\"window\":256}}",
                                  &c, err, sizeof err), 0);
    assert_int_equal(c.attn_mode, ATTN_STATIC);
    assert_int_equal(c.attn_window, 256);
    check_roundtrip(&c);
    config_free(&c);

    /* The synthetic tasks' form: vector inputs, a regression head. */
    assert_int_equal(config_parse("{\"task\":\"regress\",\"cell\":\"rnn_relu\",\"hidden\":16,\"outputs\":6,"
                                  "\"input\":{\"type\":\"vector\",\"dim\":6},\"skip\":{\"period\":2,\"matrices\":2}}",
                                  &c, err, sizeof err), 0);
    assert_int_equal(c.task, TASK_REGRESS);
    assert_int_equal(c.input_dim, 6);
    assert_int_equal(c.embed_dim, 6);
    assert_int_equal(config_vocab(&c), 0);
    assert_int_equal(config_head_out(&c), 6);
    check_roundtrip(&c);
    config_free(&c);
}

static void test_lm(void **state)
{
    (void)state;
    struct model_config c;
    char err[256];
    const char *json = "{\"task\":\"lm\",\"cell\":\"rnn_relu\",\"hidden\":5,\"layers\":2,"
                       "\"embed_dim\":3,\"pool\":\"last\","
                       "\"tokenizer\":{\"type\":\"char\",\"tokens\":[\"a\",\"b\",\"?\"],\"unk\":2}}";
    assert_int_equal(config_parse(json, &c, err, sizeof err), 0);
    assert_int_equal(c.task, TASK_LM);
    assert_int_equal(c.cell, CELL_RNN_RELU);
    assert_int_equal(c.tok_type, TOKENIZER_CHAR);
    assert_int_equal(c.unk, 2);
    assert_int_equal(config_gates(&c), 1);
    assert_int_equal(config_vocab(&c), 3);
    assert_int_equal(config_head_out(&c), 3);
    char *out = config_to_json(&c);
    assert_non_null(out);
    assert_null(strstr(out, "\"pool\""));
    assert_null(strstr(out, "\"classes\""));
    free(out);
    check_roundtrip(&c);
    config_free(&c);

    assert_int_equal(config_parse("{" LM "}", &c, err, sizeof err), 0);
    assert_int_equal(config_gates(&c), 3);
    assert_int_equal(config_head_out(&c), 256);
    check_roundtrip(&c);
    config_free(&c);

    assert_int_equal(config_parse("{\"task\":\"classify\",\"cell\":\"rnn_tanh\",\"hidden\":2,"
                                  "\"embed_dim\":2," CLS "," TOK "}", &c, err, sizeof err), 0);
    assert_int_equal(config_gates(&c), 1);
    config_free(&c);
}

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(cell_name(CELL_RNN_TANH), "rnn_tanh");
    assert_string_equal(cell_name(CELL_RNN_RELU), "rnn_relu");
    assert_string_equal(cell_name(CELL_LSTM), "lstm");
    assert_string_equal(cell_name(CELL_GRU), "gru");
    assert_string_equal(task_name(TASK_CLASSIFY), "classify");
    assert_string_equal(task_name(TASK_LM), "lm");
}

struct bad {
    const char *json;
    const char *needle;
};

static const struct bad bad_configs[] = {
    {"", "not valid JSON"},
    {"[1]", "must be a JSON object"},
    {"{" BASE "} x", "not valid JSON"},
    {"{" BASE ",\"hiden\":3}", "unknown field \"hiden\""},
    {"{" BASE ",\"hidden\":9}", "field \"hidden\" appears twice"},
    {"{\"cell\":\"lstm\",\"hidden\":8,\"embed_dim\":4," CLS "," TOK "}", "\"task\" is required"},
    {"{\"task\":\"translate\",\"cell\":\"lstm\",\"hidden\":8,\"embed_dim\":4," CLS "," TOK "}",
     "\"task\" must be \"classify\", \"lm\" or \"regress\""},
    {"{\"task\":\"regress\",\"cell\":\"lstm\",\"hidden\":8,\"embed_dim\":4," CLS "," TOK "}",
     "\"classes\" is allowed only with task \"classify\""},
    {"{\"task\":\"regress\",\"cell\":\"lstm\",\"hidden\":8,\"input\":{\"type\":\"vector\",\"dim\":6}}",
     "\"outputs\" is required"},
    {"{\"task\":\"regress\",\"cell\":\"lstm\",\"hidden\":8,\"outputs\":1,\"input\":{\"type\":\"vector\",\"dim\":6},"
     TOK "}",
     "\"tokenizer\" is not allowed with vector inputs"},
    {"{\"task\":\"regress\",\"cell\":\"lstm\",\"hidden\":8,\"outputs\":1,\"embed_dim\":4,"
     "\"input\":{\"type\":\"vector\",\"dim\":6}}",
     "\"embed_dim\" must equal \"input.dim\""},
    {"{\"task\":\"regress\",\"cell\":\"lstm\",\"hidden\":8,\"outputs\":1,\"input\":{\"type\":\"image\"}}",
     "\"input\" must be {\"type\": \"vector\", \"dim\": D}"},
    {"{\"task\":\"lm\",\"cell\":\"lstm\",\"hidden\":8,\"input\":{\"type\":\"vector\",\"dim\":6}}",
     "a language model reads tokens"},
    {"{\"task\":\"classify\",\"cell\":\"lstm\",\"hidden\":8,\"embed_dim\":4,\"outputs\":2," CLS "," TOK "}",
     "\"outputs\" is allowed only with task \"regress\""},
    {"{\"task\":\"lm\",\"cell\":\"rnn\",\"hidden\":8,\"embed_dim\":4," TOK "}",
     "\"cell\" must be \"rnn_tanh\", \"rnn_relu\", \"lstm\" or \"gru\""},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"embed_dim\":4," TOK "}", "\"hidden\" is required"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":0,\"embed_dim\":4," TOK "}",
     "\"hidden\" must be an integer between 1 and 16384"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":16385,\"embed_dim\":4," TOK "}",
     "\"hidden\" must be an integer between 1 and 16384"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":8.5,\"embed_dim\":4," TOK "}",
     "\"hidden\" must be an integer"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":\"8\",\"embed_dim\":4," TOK "}",
     "\"hidden\" must be an integer"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":1e400,\"embed_dim\":4," TOK "}",
     "\"hidden\" must be an integer"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":8," TOK "}", "\"embed_dim\" is required"},
    {"{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":8,\"embed_dim\":16385," TOK "}",
     "\"embed_dim\" must be an integer between 1 and 16384"},
    {"{" BASE ",\"layers\":0}", "\"layers\" must be an integer between 1 and 64"},
    {"{" BASE ",\"layers\":65}", "\"layers\" must be an integer between 1 and 64"},
    {"{" BASE ",\"bidirectional\":1}", "\"bidirectional\" must be true or false"},
    {"{" BASE ",\"peephole\":\"yes\"}", "\"peephole\" must be true or false"},
    {"{" BASE ",\"residual_depth\":null}", "\"residual_depth\" must be true or false"},
    {"{" LM ",\"peephole\":true}", "\"peephole\" needs cell \"lstm\""},
    {"{" BASE ",\"skip\":3}", "\"skip\" must be an object or null"},
    {"{" BASE ",\"skip\":{\"period\":0}}", "\"skip.period\" must be an integer between 1 and 1024"},
    {"{" BASE ",\"skip\":{\"period\":1025}}", "\"skip.period\" must be an integer"},
    {"{" BASE ",\"skip\":{\"matrices\":65}}", "\"skip.matrices\" must be an integer between 1 and 64"},
    {"{" BASE ",\"skip\":{\"perod\":2}}", "unknown field \"skip.perod\""},
    {"{" LM ",\"attention\":{\"window\":2,\"mode\":\"static\"}}", "\"attention\" needs cell \"lstm\""},
    {"{" BASE ",\"attention\":[]}", "\"attention\" must be an object or null"},
    {"{" BASE ",\"attention\":{\"window\":0,\"mode\":\"static\"}}",
     "\"attention.window\" must be an integer between 1 and 256"},
    {"{" BASE ",\"attention\":{\"window\":257,\"mode\":\"static\"}}", "\"attention.window\""},
    {"{" BASE ",\"attention\":{\"window\":2,\"mode\":\"soft\"}}",
     "\"attention.mode\" must be \"static\" or \"dynamic\""},
    {"{" BASE ",\"attention\":{\"window\":2}}", "\"attention.mode\" is required"},
    {"{" BASE ",\"attention\":{\"window\":2,\"mode\":\"static\",\"heads\":2}}",
     "unknown field \"attention.heads\""},
    {"{" BASE ",\"pool\":\"max\"}", "\"pool\" must be \"last\" or \"mean\""},
    {"{" HEAD "," TOK "}", "\"classes\" is required"},
    {"{" HEAD ",\"classes\":[\"a\"]," TOK "}", "\"classes\" must be an array of 2 to 65536 strings"},
    {"{" HEAD ",\"classes\":\"ab\"," TOK "}", "\"classes\" must be an array"},
    {"{" HEAD ",\"classes\":[\"a\",\"b\",\"a\"]," TOK "}", "\"classes\" holds \"a\" twice"},
    {"{" HEAD ",\"classes\":[\"a\",1]," TOK "}", "\"classes[1]\" must be a string"},
    {"{" HEAD ",\"classes\":[\"a\",\"\xff\"]," TOK "}", "\"classes[1]\" is not valid UTF-8"},
    {"{" LM ",\"classes\":[\"a\",\"b\"]}", "\"classes\" is allowed only with task \"classify\""},
    {"{" LM ",\"bidirectional\":true}", "cannot look ahead"},
    {"{" LM ",\"pool\":\"mean\"}", "\"pool\" applies only to task \"classify\""},
    {"{" HEAD "," CLS "}", "\"tokenizer\" is required"},
    {"{" HEAD "," CLS ",\"tokenizer\":\"byte\"}", "\"tokenizer\" must be an object"},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"bpe\"}}",
     "\"tokenizer.type\" must be \"byte\", \"char\" or \"word\""},
    {"{" HEAD "," CLS ",\"tokenizer\":{}}", "\"tokenizer.type\" is required"},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"byte\",\"tokens\":[\"a\"]}}",
     "\"tokenizer.tokens\" is not allowed with type \"byte\""},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"byte\",\"unk\":0}}",
     "\"tokenizer.unk\" is not allowed with type \"byte\""},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"char\",\"unk\":0}}",
     "\"tokenizer.tokens\" is required with type \"char\""},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"word\",\"tokens\":[\"a\"]}}",
     "\"tokenizer.unk\" is required with type \"word\""},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"char\",\"tokens\":[\"a\",\"b\"],\"unk\":2}}",
     "\"tokenizer.unk\" must be an integer between 0 and 1"},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"char\",\"tokens\":[],\"unk\":0}}",
     "\"tokenizer.tokens\" must be an array of 1 to 1000000 strings"},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"char\",\"tokens\":[\"a\",null],\"unk\":0}}",
     "\"tokenizer.tokens[1]\" must be a string"},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"byte\",\"type\":\"byte\"}}",
     "field \"tokenizer.type\" appears twice"},
    {"{" HEAD "," CLS ",\"tokenizer\":{\"type\":\"byte\",\"lower\":true}}",
     "unknown field \"tokenizer.lower\""},
};

static void test_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof bad_configs / sizeof bad_configs[0]; i++) {
        struct model_config c;
        char err[256] = "";
        int rc = config_parse(bad_configs[i].json, &c, err, sizeof err);
        if (rc != -1 || !strstr(err, bad_configs[i].needle) || strncmp(err, "config: ", 8) != 0)
            fail_msg("case %zu (%s): rc %d, error \"%s\", wanted \"%s\"", i, bad_configs[i].json,
                     rc, err, bad_configs[i].needle);
        /* A failed parse leaves nothing to free. */
        assert_null(c.classes);
        assert_null(c.tokens);
    }
    struct model_config c;
    char err[256];
    assert_int_equal(config_parse(NULL, &c, err, sizeof err), -1);
    assert_string_equal(err, "config: missing");
    /* A zero-length error buffer is allowed. */
    assert_int_equal(config_parse("{}", &c, NULL, 0), -1);
}

/* A classifier of CONFIG_MAX_CLASSES classes is taken, one of a class
 * more refused. */
static void test_most_classes(void **state)
{
    (void)state;
    for (int n = CONFIG_MAX_CLASSES; n <= CONFIG_MAX_CLASSES + 1; n++) {
        struct buf json = {0};
        char err[256] = "";
        buf_printf(&json, "{" HEAD "," TOK ",\"classes\":[");
        for (int i = 0; i < n; i++)
            buf_printf(&json, "%s\"c%d\"", i ? "," : "", i);
        buf_printf(&json, "]}");
        struct model_config c;
        int rc = config_parse(json.p, &c, err, sizeof err);
        free(json.p);
        if (n == CONFIG_MAX_CLASSES) {
            if (rc != 0)
                fail_msg("%d classes: %s", n, err);
            assert_int_equal(c.n_classes, n);
            assert_string_equal(c.classes[n - 1], "c65535");
            config_free(&c);
        } else {
            assert_int_equal(rc, -1);
            assert_non_null(strstr(err, "\"classes\" must be an array of 2 to 65536 strings"));
        }
    }
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_null_options_are_defaults),
        cmocka_unit_test(test_everything),
        cmocka_unit_test(test_lm),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_most_classes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
