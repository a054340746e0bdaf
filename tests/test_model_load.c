/* test_model_load.c - the tensor layout of a config, model_save and
 * model_load.
 *
 * Checks the exact tensor names and shapes MODELS.md prescribes, that a
 * saved model loads back bit for bit (also from F16 and BF16 files), and
 * that every way a weight file can disagree with its config is refused
 * with a message naming the problem.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>
#include <dirent.h>
#include <math.h>
#include <openssl/evp.h>
#include <unistd.h>

#include "model.h"
#include "safetensors.h"

#include "support/files.h"
#include "support/filter.h"

static void make_model(const char *json, struct model *m)
{
    struct model_config c;
    char err[256];
    if (config_parse(json, &c, err, sizeof err))
        fail_msg("config_parse: %s", err);
    if (model_alloc(m, &c, err, sizeof err))
        fail_msg("model_alloc: %s", err);
    assert_null(c.classes); /* ownership moved into the model */
}

/* Small multiples of 1/8, exact in float32, F16 and BF16. */
static void fill(struct model *m)
{
    for (size_t i = 0; i < m->n_params; i++)
        m->arena[i] = (float)((int)((i * 7919) % 32) - 16) / 8.0f;
}

static void sha256_hex(const void *data, size_t len, char hex[65])
{
    unsigned char md[32];
    unsigned int n;
    assert_int_equal(EVP_Digest(data, len, md, &n, EVP_sha256(), NULL), 1);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

static void expect_load_error(const char *path, const char *needle)
{
    struct model m;
    char err[512] = "";
    int rc = model_load(path, &m, err, sizeof err);
    if (rc != -1 || !strstr(err, needle))
        fail_msg("rc %d, error \"%s\", wanted \"%s\"", rc, err, needle);
    assert_null(m.arena);
    assert_null(m.layers);
}

struct want {
    const char *name;
    long rows, cols; /* cols 0: a vector */
};

static void check_list(const struct model *m, const struct want *w, int n_want)
{
    struct model_tensor *list;
    int n;
    assert_int_equal(model_tensors(m, &list, &n), 0);
    assert_int_equal(n, n_want);
    float *next = m->arena;
    for (int i = 0; i < n; i++) {
        assert_string_equal(list[i].name, w[i].name);
        assert_int_equal(list[i].ndim, w[i].cols ? 2 : 1);
        assert_int_equal(list[i].shape[0], w[i].rows);
        if (w[i].cols)
            assert_int_equal(list[i].shape[1], w[i].cols);
        /* Tensors lie back to back in the arena, in list order. */
        assert_ptr_equal(list[i].data, next);
        next += list[i].shape[0] * (w[i].cols ? list[i].shape[1] : 1);
    }
    assert_ptr_equal(next, m->arena + m->n_params);
    free(list);
}

static float *find_data(const struct model *m, const char *name)
{
    struct model_tensor *list;
    int n;
    assert_int_equal(model_tensors(m, &list, &n), 0);
    float *p = NULL;
    for (int i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            p = list[i].data;
    free(list);
    assert_non_null(p);
    return p;
}

static void test_layout_everything(void **state)
{
    (void)state;
    struct model m;
    make_model("{\"task\":\"classify\",\"cell\":\"lstm\",\"hidden\":3,\"layers\":3,"
               "\"bidirectional\":true,\"embed_dim\":5,\"peephole\":true,"
               "\"skip\":{\"period\":2,\"matrices\":3},\"residual_depth\":true,"
               "\"attention\":{\"window\":4,\"mode\":\"static\"},"
               "\"classes\":[\"a\",\"b\",\"c\"],\"tokenizer\":{\"type\":\"byte\"}}",
               &m);
    static const struct want w[] = {
        {"embedding.weight", 256, 5},
        {"rnn.weight_ih_l0", 12, 5}, {"rnn.weight_hh_l0", 12, 3}, {"rnn.weight_hh_l0_m1", 12, 3},
        {"rnn.weight_hh_l0_m2", 12, 3}, {"rnn.bias_ih_l0", 12, 0}, {"rnn.bias_hh_l0", 12, 0},
        {"rnn.peephole_o_l0", 3, 0}, {"rnn.attention_logits_l0", 4, 0},
        {"rnn.weight_ih_l0_reverse", 12, 5}, {"rnn.weight_hh_l0_reverse", 12, 3},
        {"rnn.weight_hh_l0_m1_reverse", 12, 3}, {"rnn.weight_hh_l0_m2_reverse", 12, 3},
        {"rnn.bias_ih_l0_reverse", 12, 0}, {"rnn.bias_hh_l0_reverse", 12, 0},
        {"rnn.peephole_o_l0_reverse", 3, 0}, {"rnn.attention_logits_l0_reverse", 4, 0},
        {"rnn.weight_ih_l1", 12, 6}, {"rnn.weight_hh_l1", 12, 3}, {"rnn.weight_hh_l1_m1", 12, 3},
        {"rnn.weight_hh_l1_m2", 12, 3}, {"rnn.bias_ih_l1", 12, 0}, {"rnn.bias_hh_l1", 12, 0},
        {"rnn.peephole_o_l1", 3, 0}, {"rnn.attention_logits_l1", 4, 0},
        {"rnn.weight_ih_l1_reverse", 12, 6}, {"rnn.weight_hh_l1_reverse", 12, 3},
        {"rnn.weight_hh_l1_m1_reverse", 12, 3}, {"rnn.weight_hh_l1_m2_reverse", 12, 3},
        {"rnn.bias_ih_l1_reverse", 12, 0}, {"rnn.bias_hh_l1_reverse", 12, 0},
        {"rnn.peephole_o_l1_reverse", 3, 0}, {"rnn.attention_logits_l1_reverse", 4, 0},
        {"rnn.residual_proj_l1", 6, 5},
        {"rnn.weight_ih_l2", 12, 6}, {"rnn.weight_hh_l2", 12, 3}, {"rnn.weight_hh_l2_m1", 12, 3},
        {"rnn.weight_hh_l2_m2", 12, 3}, {"rnn.bias_ih_l2", 12, 0}, {"rnn.bias_hh_l2", 12, 0},
        {"rnn.peephole_o_l2", 3, 0}, {"rnn.attention_logits_l2", 4, 0},
        {"rnn.weight_ih_l2_reverse", 12, 6}, {"rnn.weight_hh_l2_reverse", 12, 3},
        {"rnn.weight_hh_l2_m1_reverse", 12, 3}, {"rnn.weight_hh_l2_m2_reverse", 12, 3},
        {"rnn.bias_ih_l2_reverse", 12, 0}, {"rnn.bias_hh_l2_reverse", 12, 0},
        {"rnn.peephole_o_l2_reverse", 3, 0}, {"rnn.attention_logits_l2_reverse", 4, 0},
        {"head.weight", 3, 6}, {"head.bias", 3, 0},
    };
    check_list(&m, w, (int)(sizeof w / sizeof w[0]));
    /* 256*5 + layer 0: 2*(60 + 3*36 + 12 + 12 + 3 + 4) + layer 1: 2*(72 + 108 + 31) + 30
     * + layer 2: 2*211 + head: 18 + 3 */
    assert_int_equal(m.n_params, 1280 + 398 + 452 + 422 + 21);
    assert_int_equal(m.vocab, 256);
    assert_int_equal(m.head_out, 3);

    assert_ptr_equal(m.embedding, m.arena);
    assert_int_equal(m.layers[0].in, 5);
    assert_int_equal(m.layers[1].in, 6);
    assert_int_equal(m.layers[2].in, 6);
    assert_int_equal(m.layers[0].residual_from, 0);
    assert_int_equal(m.layers[1].residual_from, 5);
    assert_int_equal(m.layers[2].residual_from, 6);
    assert_null(m.layers[0].residual_proj);
    assert_ptr_equal(m.layers[1].residual_proj, find_data(&m, "rnn.residual_proj_l1"));
    assert_null(m.layers[2].residual_proj);
    const struct layer_dir_params *d = &m.layers[2].dir[1];
    assert_ptr_equal(d->w_ih, find_data(&m, "rnn.weight_ih_l2_reverse"));
    assert_ptr_equal(d->w_hh[0], find_data(&m, "rnn.weight_hh_l2_reverse"));
    assert_ptr_equal(d->w_hh[2], find_data(&m, "rnn.weight_hh_l2_m2_reverse"));
    assert_ptr_equal(d->b_hh, find_data(&m, "rnn.bias_hh_l2_reverse"));
    assert_ptr_equal(d->peephole, find_data(&m, "rnn.peephole_o_l2_reverse"));
    assert_ptr_equal(d->attn_logits, find_data(&m, "rnn.attention_logits_l2_reverse"));
    assert_null(d->attn_query);
    assert_ptr_equal(m.layers[0].dir[0].w_hh[1], find_data(&m, "rnn.weight_hh_l0_m1"));
    assert_ptr_equal(m.head_w, find_data(&m, "head.weight"));
    assert_ptr_equal(m.head_b, find_data(&m, "head.bias"));
    for (size_t i = 0; i < m.n_params; i++)
        assert_true(m.arena[i] == 0.0f);
    model_free(&m);
    assert_null(m.arena);
    model_free(&m); /* harmless on a freed model */
}

static void test_layout_plain_and_matching_residual(void **state)
{
    (void)state;
    struct model m;
    /* E == H*dirs: the residual is the identity, no projection. */
    make_model("{\"task\":\"lm\",\"cell\":\"lstm\",\"hidden\":4,\"layers\":3,\"embed_dim\":4,"
               "\"residual_depth\":true,\"attention\":{\"window\":2,\"mode\":\"dynamic\"},"
               "\"tokenizer\":{\"type\":\"char\",\"tokens\":[\"a\",\"b\",\"c\"],\"unk\":0}}",
               &m);
    static const struct want w[] = {
        {"embedding.weight", 3, 4},
        {"rnn.weight_ih_l0", 16, 4}, {"rnn.weight_hh_l0", 16, 4}, {"rnn.bias_ih_l0", 16, 0},
        {"rnn.bias_hh_l0", 16, 0}, {"rnn.attention_query_l0", 4, 4},
        {"rnn.weight_ih_l1", 16, 4}, {"rnn.weight_hh_l1", 16, 4}, {"rnn.bias_ih_l1", 16, 0},
        {"rnn.bias_hh_l1", 16, 0}, {"rnn.attention_query_l1", 4, 4},
        {"rnn.weight_ih_l2", 16, 4}, {"rnn.weight_hh_l2", 16, 4}, {"rnn.bias_ih_l2", 16, 0},
        {"rnn.bias_hh_l2", 16, 0}, {"rnn.attention_query_l2", 4, 4},
        {"head.weight", 3, 4}, {"head.bias", 3, 0},
    };
    check_list(&m, w, (int)(sizeof w / sizeof w[0]));
    assert_int_equal(m.layers[1].residual_from, 4);
    assert_null(m.layers[1].residual_proj);
    assert_int_equal(m.layers[2].residual_from, 4);
    assert_ptr_equal(m.layers[1].dir[0].attn_query, find_data(&m, "rnn.attention_query_l1"));
    assert_null(m.layers[1].dir[0].peephole);
    assert_null(m.layers[1].dir[0].attn_logits);
    model_free(&m);

    /* A plain PyTorch GRU: exactly torch's state_dict names. */
    make_model("{\"task\":\"classify\",\"cell\":\"gru\",\"hidden\":2,\"embed_dim\":3,"
               "\"bidirectional\":true,\"classes\":[\"x\",\"y\"],\"tokenizer\":{\"type\":\"byte\"}}",
               &m);
    static const struct want g[] = {
        {"embedding.weight", 256, 3},
        {"rnn.weight_ih_l0", 6, 3}, {"rnn.weight_hh_l0", 6, 2}, {"rnn.bias_ih_l0", 6, 0},
        {"rnn.bias_hh_l0", 6, 0}, {"rnn.weight_ih_l0_reverse", 6, 3},
        {"rnn.weight_hh_l0_reverse", 6, 2}, {"rnn.bias_ih_l0_reverse", 6, 0},
        {"rnn.bias_hh_l0_reverse", 6, 0}, {"head.weight", 2, 4}, {"head.bias", 2, 0},
    };
    check_list(&m, g, (int)(sizeof g / sizeof g[0]));
    assert_int_equal(m.layers[0].residual_from, 0);
    model_free(&m);
}

#define SMALL "{\"task\":\"lm\",\"cell\":\"gru\",\"hidden\":2,\"layers\":2,\"embed_dim\":3," \
              "\"tokenizer\":{\"type\":\"char\",\"tokens\":[\"a\",\"b\",\"c\",\"d\"],\"unk\":3}}"

static void test_roundtrip(void **state)
{
    (void)state;
    static const char *const configs[] = {
        SMALL,
        "{\"task\":\"classify\",\"cell\":\"lstm\",\"hidden\":3,\"layers\":2,\"bidirectional\":true,"
        "\"embed_dim\":5,\"peephole\":true,\"skip\":{\"period\":2,\"matrices\":2},"
        "\"residual_depth\":true,\"attention\":{\"window\":3,\"mode\":\"dynamic\"},\"pool\":\"mean\","
        "\"classes\":[\"neg\",\"pos\"],\"tokenizer\":{\"type\":\"word\",\"tokens\":[\"<unk>\",\"x\"],\"unk\":0}}",
    };
    char path[512];
    scratch_path(path, "model.safetensors");
    for (size_t k = 0; k < sizeof configs / sizeof configs[0]; k++) {
        struct model m, back;
        char err[256];
        make_model(configs[k], &m);
        fill(&m);
        if (model_save(&m, path, NULL, 0, err, sizeof err))
            fail_msg("model_save: %s", err);
        if (model_load(path, &back, err, sizeof err))
            fail_msg("model_load: %s", err);
        char *a = config_to_json(&m.cfg), *b = config_to_json(&back.cfg);
        assert_string_equal(a, b);
        free(a);
        free(b);
        assert_int_equal(back.n_params, m.n_params);
        assert_memory_equal(back.arena, m.arena, m.n_params * sizeof(float));

        /* m->sha256 is the SHA-256 of everything after the header. */
        size_t len;
        unsigned char *buf = file_must_read(path, &len);
        size_t hlen = 0;
        for (int i = 7; i >= 0; i--)
            hlen = hlen << 8 | buf[i];
        assert_int_equal(len - 8 - hlen, m.n_params * sizeof(float));
        char hex[65];
        sha256_hex(buf + 8 + hlen, len - 8 - hlen, hex);
        assert_string_equal(back.sha256, hex);
        free(buf);

        struct st_file f;
        assert_int_equal(st_open(path, &f, err, sizeof err), 0);
        assert_string_equal(st_meta_get(&f, "format"), "rrnserve");
        assert_string_equal(st_meta_get(&f, "format_version"), "1");
        assert_string_equal(st_meta_get(&f, "data_sha256"), hex);
        st_close(&f);
        model_free(&back);
        model_free(&m);
    }
    unlink(path);
}

/* Writes m's tensors with one change: drop leaves a tensor out, extra adds
 * one, reshape gives one the shape [1, numel]; meta replaces the metadata
 * (NULL: the right one). */
static void write_variant(const struct model *m, const char *path, const char *drop,
                          const char *extra, const char *reshape, const struct st_meta *meta,
                          int n_meta)
{
    struct model_tensor *list;
    int n;
    assert_int_equal(model_tensors(m, &list, &n), 0);
    struct st_write_tensor *t = calloc((size_t)n + 1, sizeof *t);
    assert_non_null(t);
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (drop && strcmp(list[i].name, drop) == 0)
            continue;
        t[k].name = list[i].name;
        t[k].ndim = list[i].ndim;
        t[k].shape[0] = list[i].shape[0];
        t[k].shape[1] = list[i].shape[1];
        if (reshape && strcmp(list[i].name, reshape) == 0) {
            t[k].shape[0] = 1;
            t[k].shape[1] = list[i].shape[0] * (list[i].ndim == 2 ? list[i].shape[1] : 1);
            t[k].ndim = 2;
        }
        t[k].data = list[i].data;
        k++;
    }
    if (extra) {
        t[k].name = extra;
        t[k].ndim = 1;
        t[k].shape[0] = 1;
        t[k].data = m->arena;
        k++;
    }
    char *json = config_to_json(&m->cfg);
    assert_non_null(json);
    struct st_meta right[] = {{"format", "rrnserve"}, {"format_version", "1"}, {"config", json}};
    char err[256];
    if (st_write(path, t, k, meta ? meta : right, meta ? n_meta : 3, err, sizeof err))
        fail_msg("st_write: %s", err);
    free(json);
    free(t);
    free(list);
}

/* Replaces the first occurrence of from (same length as to) in the file. */
static void patch_file(const char *path, const char *from, const char *to)
{
    size_t len, n = strlen(from);
    assert_int_equal(strlen(to), n);
    unsigned char *buf = file_must_read(path, &len);
    unsigned char *p = NULL;
    for (size_t i = 0; i + n <= len && !p; i++)
        if (memcmp(buf + i, from, n) == 0)
            p = buf + i;
    assert_non_null(p);
    memcpy(p, to, n);
    file_write(path, buf, len);
    free(buf);
}

static void test_load_errors(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "bad.safetensors");
    struct model m;
    char err[256];
    make_model(SMALL, &m);
    fill(&m);
    char *json = config_to_json(&m.cfg);
    assert_non_null(json);

    write_variant(&m, path, "rnn.bias_hh_l1", NULL, NULL, NULL, 0);
    expect_load_error(path, "missing tensor \"rnn.bias_hh_l1\" [6]");
    write_variant(&m, path, NULL, "rnn.weight_hh_l0_m1", NULL, NULL, 0);
    expect_load_error(path, "unexpected tensor \"rnn.weight_hh_l0_m1\" (the config does not call for it)");
    write_variant(&m, path, NULL, "a.very.long.tensor.name.that.no.config.will.ever.call.for.anywhere", NULL, NULL, 0);
    expect_load_error(path, "unexpected tensor \"a.very.long");
    write_variant(&m, path, NULL, NULL, "rnn.weight_hh_l0", NULL, 0);
    expect_load_error(path, "tensor \"rnn.weight_hh_l0\" has shape [1, 12], the config calls for [6, 2]");
    write_variant(&m, path, NULL, NULL, "head.bias", NULL, 0);
    expect_load_error(path, "tensor \"head.bias\" has shape [1, 4], the config calls for [4]");

    struct st_meta no_format[] = {{"format_version", "1"}, {"config", json}};
    write_variant(&m, path, NULL, NULL, NULL, no_format, 2);
    expect_load_error(path, "metadata \"format\" is missing, not \"rrnserve\"");
    struct st_meta torch[] = {{"format", "pt"}, {"format_version", "1"}, {"config", json}};
    write_variant(&m, path, NULL, NULL, NULL, torch, 3);
    expect_load_error(path, "metadata \"format\" is \"pt\", not \"rrnserve\"");
    struct st_meta v2[] = {{"format", "rrnserve"}, {"format_version", "2"}, {"config", json}};
    write_variant(&m, path, NULL, NULL, NULL, v2, 3);
    expect_load_error(path, "metadata \"format_version\" is \"2\"; this build reads \"1\"");
    struct st_meta no_config[] = {{"format", "rrnserve"}, {"format_version", "1"}};
    write_variant(&m, path, NULL, NULL, NULL, no_config, 2);
    expect_load_error(path, "metadata \"config\" is missing");
    struct st_meta bad_json[] = {{"format", "rrnserve"}, {"format_version", "1"}, {"config", "{"}};
    write_variant(&m, path, NULL, NULL, NULL, bad_json, 3);
    expect_load_error(path, "config: not valid JSON");
    char *xlstm = strdup(json);
    assert_non_null(xlstm);
    char *cell = strstr(xlstm, "\"gru\"");
    assert_non_null(cell);
    memcpy(cell, "\"grx\"", 5);
    struct st_meta unknown_cell[] = {{"format", "rrnserve"}, {"format_version", "1"}, {"config", xlstm}};
    write_variant(&m, path, NULL, NULL, NULL, unknown_cell, 3);
    expect_load_error(path, "config: \"cell\" must be");
    free(xlstm);

    /* A data byte changed after writing. */
    write_variant(&m, path, NULL, NULL, NULL, NULL, 0);
    struct st_file f;
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    char good[65], bad[65], want[256];
    snprintf(good, sizeof good, "%s", st_meta_get(&f, "data_sha256"));
    st_close(&f);
    size_t len;
    unsigned char *buf = file_must_read(path, &len);
    buf[len - 1] ^= 0x01;
    file_write(path, buf, len);
    sha256_hex(buf + len - m.n_params * sizeof(float), m.n_params * sizeof(float), bad);
    free(buf);
    snprintf(want, sizeof want, "checksum mismatch: data_sha256 says %s, data hashes to %s", good, bad);
    expect_load_error(path, want);

    /* Upper-case hex is the same checksum; a missing one is an error. */
    write_variant(&m, path, NULL, NULL, NULL, NULL, 0);
    char upper[65];
    for (int i = 0; i < 65; i++)
        upper[i] = (char)(good[i] >= 'a' && good[i] <= 'f' ? good[i] - 32 : good[i]);
    patch_file(path, good, upper);
    struct model ok;
    assert_int_equal(model_load(path, &ok, err, sizeof err), 0);
    assert_string_equal(ok.sha256, good);
    model_free(&ok);
    patch_file(path, "\"data_sha256\"", "\"data_sha25X\"");
    expect_load_error(path, "metadata \"data_sha256\" is missing");

    /* Non-finite weights. */
    m.head_b[1] = NAN;
    write_variant(&m, path, NULL, NULL, NULL, NULL, 0);
    expect_load_error(path, "tensor \"head.bias\" holds NaN at element 1");
    m.head_b[1] = 0;
    m.layers[1].dir[0].w_ih[5] = -INFINITY;
    write_variant(&m, path, NULL, NULL, NULL, NULL, 0);
    expect_load_error(path, "tensor \"rnn.weight_ih_l1\" holds an infinity at element 5");

    /* Not a safetensors file at all: st_open's message comes through. */
    file_write(path, "hello", 5);
    expect_load_error(path, "too short");
    char absent[512];
    scratch_path(absent, "absent.safetensors");
    expect_load_error(absent, "cannot open");

    free(json);
    model_free(&m);
    unlink(path);
}

static uint16_t to_f16(float v)
{
    /* Enough for the values fill() makes: zero and normal numbers whose
     * mantissa fits in 10 bits. */
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    uint16_t sign = (uint16_t)(b >> 16 & 0x8000);
    if ((b & 0x7fffffff) == 0)
        return sign;
    int exp = (int)(b >> 23 & 0xff) - 127 + 15;
    return (uint16_t)(sign | exp << 10 | (b >> 13 & 0x3ff));
}

/* Writes m as a file of 16-bit floats, built here from scratch so the
 * reader is tested against an independent writer. */
static void write_half(const struct model *m, const char *path, const char *dtype)
{
    struct model_tensor *list;
    int n;
    assert_int_equal(model_tensors(m, &list, &n), 0);
    unsigned char *data = malloc(m->n_params * 2);
    assert_non_null(data);
    cJSON *root = cJSON_CreateObject();
    assert_non_null(root);
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    char *json = config_to_json(&m->cfg);
    assert_non_null(meta);
    assert_non_null(json);
    assert_non_null(cJSON_AddStringToObject(meta, "format", "rrnserve"));
    assert_non_null(cJSON_AddStringToObject(meta, "format_version", "1"));
    assert_non_null(cJSON_AddStringToObject(meta, "config", json));
    free(json);
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t count = (size_t)list[i].shape[0] * (size_t)(list[i].ndim == 2 ? list[i].shape[1] : 1);
        for (size_t j = 0; j < count; j++) {
            uint32_t bits;
            memcpy(&bits, &list[i].data[j], sizeof bits);
            uint16_t h = strcmp(dtype, "F16") == 0 ? to_f16(list[i].data[j]) : (uint16_t)(bits >> 16);
            data[off + 2 * j] = (unsigned char)h;
            data[off + 2 * j + 1] = (unsigned char)(h >> 8);
        }
        cJSON *e = cJSON_AddObjectToObject(root, list[i].name);
        assert_non_null(e);
        assert_non_null(cJSON_AddStringToObject(e, "dtype", dtype));
        double shape[2] = {(double)list[i].shape[0], (double)list[i].shape[1]};
        double offs[2] = {(double)off, (double)(off + 2 * count)};
        cJSON *s = cJSON_CreateDoubleArray(shape, list[i].ndim);
        cJSON *o = cJSON_CreateDoubleArray(offs, 2);
        assert_non_null(s);
        assert_non_null(o);
        assert_true(cJSON_AddItemToObject(e, "shape", s));
        assert_true(cJSON_AddItemToObject(e, "data_offsets", o));
        off += 2 * count;
    }
    char hex[65];
    sha256_hex(data, off, hex);
    cJSON_AddStringToObject(meta, "data_sha256", hex);
    char *header = cJSON_PrintUnformatted(root);
    assert_non_null(header);
    size_t hlen = strlen(header);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    for (int i = 0; i < 8; i++)
        fputc((int)((uint64_t)hlen >> (8 * i) & 0xff), fp);
    assert_int_equal(fwrite(header, 1, hlen, fp), hlen);
    assert_int_equal(fwrite(data, 1, off, fp), off);
    assert_int_equal(fclose(fp), 0);
    free(header);
    cJSON_Delete(root);
    free(data);
    free(list);
}

static void test_half_precision(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "half.safetensors");
    static const char *const dtypes[] = {"F16", "BF16"};
    for (int k = 0; k < 2; k++) {
        struct model m, back;
        char err[256];
        make_model(SMALL, &m);
        fill(&m);
        write_half(&m, path, dtypes[k]);
        struct st_file f;
        assert_int_equal(st_open(path, &f, err, sizeof err), 0);
        assert_int_equal(f.tensors[0].dtype, k == 0 ? ST_F16 : ST_BF16);
        st_close(&f);
        if (model_load(path, &back, err, sizeof err))
            fail_msg("model_load %s: %s", dtypes[k], err);
        assert_int_equal(back.n_params, m.n_params);
        assert_memory_equal(back.arena, m.arena, m.n_params * sizeof(float));
        model_free(&back);
        model_free(&m);
    }
    unlink(path);
}

static void test_truncated(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "whole.safetensors");
    char cut[512];
    scratch_path(cut, "cut.safetensors");
    struct model m;
    char err[256];
    make_model(SMALL, &m);
    fill(&m);
    assert_int_equal(model_save(&m, path, NULL, 0, err, sizeof err), 0);
    model_free(&m);
    size_t len;
    unsigned char *buf = file_must_read(path, &len);
    for (size_t n = 0; n < len; n++) {
        file_write(cut, buf, n);
        struct model back;
        if (model_load(cut, &back, err, sizeof err) == 0)
            fail_msg("a file cut to %zu of %zu bytes loaded", n, len);
    }
    free(buf);
    unlink(cut);
    unlink(path);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_everything),
        cmocka_unit_test(test_layout_plain_and_matching_residual),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_half_precision),
        cmocka_unit_test(test_truncated),
    };
    return cmocka_run_group_tests(tests, scratch_setup, scratch_teardown);
}
