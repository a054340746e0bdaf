/* test_safetensors.c - the safetensors reader and writer.
 *
 * The writer is checked byte for byte against the format (header length,
 * padding, key order, a known SHA-256); the reader is fed every kind of
 * malformed file we could think of, every truncation of a valid file and
 * single-byte corruptions of its header, and must refuse each one with a
 * message instead of crashing (run under ASan to make "no crash" mean "no
 * out-of-bounds read" too).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <dirent.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

#include "support/files.h"
#include "support/filter.h"

/* SHA-256 of the little-endian float32 bytes of 1.0, -2.0, 0.5. */
#define SHA_1_M2_HALF "2ce4bdb6b34a50ac7092eb9fee94337a27498e9eb9bae44192f15b88831b2422"
#define SHA_EMPTY "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

static int count_dir_entries(void)
{
    DIR *d = opendir(scratch_dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

/* A file with the given 8-byte length field, header bytes and data. */
static void write_raw(const char *path, uint64_t hlen, const char *header, size_t header_bytes,
                      const void *data, size_t ndata)
{
    size_t total = 8 + header_bytes + ndata;
    unsigned char *buf = calloc(1, total);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + 8, header, header_bytes);
    if (ndata)
        memcpy(buf + 8 + header_bytes, data, ndata);
    file_write(path, buf, total);
    free(buf);
}

/* A well-formed frame: correct length, header, ndata zero bytes. */
static void write_simple(const char *path, const char *header, size_t ndata)
{
    unsigned char *zeros = calloc(1, ndata ? ndata : 1);
    assert_non_null(zeros);
    write_raw(path, strlen(header), header, strlen(header), zeros, ndata);
    free(zeros);
}

static void expect_open_error(const char *path, const char *needle)
{
    struct st_file f;
    char err[512] = "";
    int rc = st_open(path, &f, err, sizeof err);
    if (rc != -1 || !strstr(err, needle))
        fail_msg("rc %d, error \"%s\", wanted \"%s\"", rc, err, needle);
    assert_null(f.map);
    assert_null(f.tensors);
}

static const float A[2] = {1.0f, -2.0f};
static const float B[1] = {0.5f};

static void write_sample(const char *path)
{
    struct st_write_tensor t[3] = {
        {.name = "a", .ndim = 1, .shape = {2}, .data = A},
        {.name = "b", .ndim = 2, .shape = {1, 1}, .data = B},
        {.name = "e", .ndim = 2, .shape = {0, 4}, .data = NULL},
    };
    struct st_meta meta[] = {{"k", "v"}};
    char err[256];
    if (st_write(path, t, 3, meta, 1, err, sizeof err) != 0)
        fail_msg("st_write: %s", err);
}

static void test_write_read(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "sample.safetensors");
    write_sample(path);
    write_sample(path); /* replacing an existing file works too */
    assert_int_equal(count_dir_entries(), 1); /* no temporary left over */

    /* The exact bytes: header first, padded with spaces to a multiple of
     * 8, __metadata__ first, then the tensors in the order given. */
    const char *want =
        "{\"__metadata__\":{\"k\":\"v\",\"data_sha256\":\"" SHA_1_M2_HALF "\"},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[8,12]},"
        "\"e\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[12,12]}}";
    size_t len;
    unsigned char *buf = file_must_read(path, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | buf[i];
    assert_int_equal(hlen % 8, 0);
    assert_int_equal(len, 8 + hlen + 12);
    assert_true(hlen >= strlen(want) && hlen < strlen(want) + 8);
    assert_memory_equal(buf + 8, want, strlen(want));
    for (size_t i = 8 + strlen(want); i < 8 + hlen; i++)
        assert_int_equal(buf[i], ' ');
    const unsigned char data[12] = {0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0, 0, 0, 0, 0x3f};
    assert_memory_equal(buf + 8 + hlen, data, 12);
    free(buf);

    struct st_file f;
    char err[256];
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    assert_int_equal(f.n_tensors, 3);
    assert_int_equal(f.data_size, 12);
    assert_string_equal(f.tensors[0].name, "a");
    assert_string_equal(f.tensors[1].name, "b");
    assert_string_equal(f.tensors[2].name, "e");
    assert_string_equal(st_meta_get(&f, "k"), "v");
    assert_string_equal(st_meta_get(&f, "data_sha256"), SHA_1_M2_HALF);
    assert_null(st_meta_get(&f, "nope"));
    char hex[65];
    st_data_sha256(&f, hex);
    assert_string_equal(hex, SHA_1_M2_HALF);

    const struct st_tensor *a = st_find(&f, "a"), *b = st_find(&f, "b"), *e = st_find(&f, "e");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(e);
    assert_null(st_find(&f, "c"));
    assert_null(st_find(&f, ""));
    assert_int_equal(a->dtype, ST_F32);
    assert_int_equal(a->ndim, 1);
    assert_int_equal(a->shape[0], 2);
    assert_int_equal(a->numel, 2);
    assert_int_equal(a->nbytes, 8);
    assert_int_equal(b->ndim, 2);
    assert_int_equal(b->numel, 1);
    assert_int_equal(e->numel, 0);
    assert_int_equal(e->shape[1], 4);
    float va[2], vb[1];
    st_to_f32(a, va);
    st_to_f32(b, vb);
    assert_memory_equal(va, A, sizeof A);
    assert_memory_equal(vb, B, sizeof B);
    st_close(&f);
    assert_null(f.map);
    unlink(path);
}

/* A scalar, shape [], as PyTorch writes a 0-dim tensor: one element. */
static void test_write_scalar(void **state)
{
    (void)state;
    char path[512], err[256];
    scratch_path(path, "scalar.safetensors");
    const struct st_write_tensor t = {.name = "s", .ndim = 0, .data = B};
    if (st_write(path, &t, 1, NULL, 0, err, sizeof err) != 0)
        fail_msg("st_write: %s", err);
    struct st_file f;
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    const struct st_tensor *s = st_find(&f, "s");
    assert_non_null(s);
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    assert_int_equal(s->nbytes, 4);
    float v;
    st_to_f32(s, &v);
    assert_true(v == B[0]);
    st_close(&f);
    unlink(path);
}

static void test_write_empty(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "empty.safetensors");
    char err[256];
    assert_int_equal(st_write(path, NULL, 0, NULL, 0, err, sizeof err), 0);
    struct st_file f;
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    assert_int_equal(f.n_tensors, 0);
    assert_int_equal(f.data_size, 0);
    assert_string_equal(st_meta_get(&f, "data_sha256"), SHA_EMPTY);
    char hex[65];
    st_data_sha256(&f, hex);
    assert_string_equal(hex, SHA_EMPTY);
    st_close(&f);
    unlink(path);
}

static void test_write_errors(void **state)
{
    (void)state;
    char err[256];
    const float x[1] = {1};
    struct st_write_tensor dup[2] = {
        {.name = "w", .ndim = 1, .shape = {1}, .data = x},
        {.name = "w", .ndim = 1, .shape = {1}, .data = x},
    };
    char path[512];
    scratch_path(path, "bad.safetensors");
    assert_int_equal(st_write(path, dup, 2, NULL, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "tensor \"w\" appears twice"));

    struct st_write_tensor one = {.name = "__metadata__", .ndim = 1, .shape = {1}, .data = x};
    assert_int_equal(st_write(path, &one, 1, NULL, 0, err, sizeof err), -1);
    one.name = "w";
    one.shape[0] = -1;
    assert_int_equal(st_write(path, &one, 1, NULL, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "invalid shape"));
    one.shape[0] = 1;
    one.ndim = ST_MAX_DIMS + 1;
    assert_int_equal(st_write(path, &one, 1, NULL, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "at most 8 are supported"));
    /* ST_MAX_DIMS (8) are fine, written and read. */
    const struct st_write_tensor deep = {
        .name = "w", .ndim = ST_MAX_DIMS, .shape = {1, 1, 1, 1, 1, 1, 1, 1}, .data = x};
    assert_int_equal(st_write(path, &deep, 1, NULL, 0, err, sizeof err), 0);
    struct st_file f;
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    assert_int_equal(st_find(&f, "w")->ndim, ST_MAX_DIMS);
    st_close(&f);
    unlink(path);
    one.ndim = 1;
    one.data = NULL;
    assert_int_equal(st_write(path, &one, 1, NULL, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "no data"));
    one.data = x;

    struct st_meta reserved[] = {{"data_sha256", "x"}};
    assert_int_equal(st_write(path, &one, 1, reserved, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "data_sha256"));
    struct st_meta twice[] = {{"k", "1"}, {"k", "2"}};
    assert_int_equal(st_write(path, &one, 1, twice, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "metadata \"k\" appears twice"));
    struct st_meta bad_utf8[] = {{"k", "\xc3"}};
    assert_int_equal(st_write(path, &one, 1, bad_utf8, 1, err, sizeof err), -1);

    char nowhere[512];
    scratch_path(nowhere, "no/such/dir/x.safetensors");
    assert_int_equal(st_write(nowhere, &one, 1, NULL, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "cannot create"));
    assert_int_equal(count_dir_entries(), 0);
}

/* Half- and bfloat16 decoding, including subnormals, infinities and NaN,
 * and an F32 tensor at an odd offset (the mapping is not aligned). */
static void test_f16_bf16(void **state)
{
    (void)state;
    const char *header =
        "{\"h\":{\"dtype\":\"F16\",\"shape\":[2,4],\"data_offsets\":[0,16]},"
        "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[16,22]},"
        "\"f\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[22,26]}}";
    const uint16_t h[8] = {0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8400, 0x7c00, 0x7e00};
    const uint16_t b[3] = {0x3f80, 0xc020, 0x0001};
    unsigned char data[26];
    for (int i = 0; i < 8; i++) {
        data[2 * i] = (unsigned char)h[i];
        data[2 * i + 1] = (unsigned char)(h[i] >> 8);
    }
    for (int i = 0; i < 3; i++) {
        data[16 + 2 * i] = (unsigned char)b[i];
        data[16 + 2 * i + 1] = (unsigned char)(b[i] >> 8);
    }
    const unsigned char three[4] = {0, 0, 0x40, 0x40}; /* 3.0f */
    memcpy(data + 22, three, 4);
    char path[512];
    scratch_path(path, "half.safetensors");
    write_raw(path, strlen(header), header, strlen(header), data, sizeof data);

    struct st_file f;
    char err[256];
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    const struct st_tensor *th = st_find(&f, "h"), *tb = st_find(&f, "b"), *tf = st_find(&f, "f");
    assert_int_equal(th->dtype, ST_F16);
    assert_int_equal(tb->dtype, ST_BF16);
    assert_int_equal(th->numel, 8);
    float vh[8], vb[3], vf[1];
    st_to_f32(th, vh);
    st_to_f32(tb, vb);
    st_to_f32(tf, vf);
    assert_true(vh[0] == 1.0f);
    assert_true(vh[1] == -2.0f);
    assert_true(vh[2] == 0.5f);
    assert_true(vh[3] == 65504.0f);
    assert_true(vh[4] == ldexpf(1.0f, -24));
    assert_true(vh[5] == -ldexpf(1.0f, -14));
    assert_true(isinf(vh[6]) && vh[6] > 0);
    assert_true(isnan(vh[7]));
    assert_true(vb[0] == 1.0f);
    assert_true(vb[1] == -2.5f);
    assert_true(vb[2] == ldexpf(1.0f, -133));
    assert_true(vf[0] == 3.0f);
    st_close(&f);
}

struct bad {
    const char *header;
    size_t ndata;
    const char *needle;
};

#define F32_1(off) "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" off "]}"

static const struct bad bad_headers[] = {
    {"not json", 0, "header is not valid JSON"},
    {"", 0, "header is not valid JSON"},
    {"{} x", 0, "header is not valid JSON"},
    {"[]", 0, "header is not a JSON object"},
    {"\"x\"", 0, "header is not a JSON object"},
    {"{\"a\":1}", 0, "tensor \"a\": entry is not a JSON object"},
    {"{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "tensor \"a\": \"dtype\" is missing"},
    {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "\"shape\" is missing"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "\"data_offsets\" is missing"},
    {"{\"a\":{\"dtype\":5,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "\"dtype\" must be a string"},
    {"{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, "unsupported dtype \"F64\""},
    {"{\"a\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unsupported dtype \"I32\""},
    {"{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unsupported dtype"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":\"x\",\"data_offsets\":[0,4]}}", 4, "\"shape\" must be an array"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape[0] must be a non-negative integer"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "shape[0] must be"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,\"1\"],\"data_offsets\":[0,4]}}", 4, "shape[1] must be"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "at most 8"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "\"data_offsets\" must be two"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "\"data_offsets\" must be two"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{}}}", 4, "\"data_offsets\" must be two"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "\"data_offsets\" must be two"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e300]}}", 4, "\"data_offsets\" must be two"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,\"4\"]}}", 4, "\"data_offsets\" must be two"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "end before they begin"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}", 4, "run past the end of the data (4 bytes)"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[9007199254740992,9007199254740992]}}", 4, "run past the end"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "shape [2] of F32 does not fill data_offsets [0, 4]"},
    {"{\"a\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "does not fill"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776,1099511627776],\"data_offsets\":[0,4]}}", 4, "does not fill"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", 0, "shape[0] must be"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"foo\":1}}", 4, "tensor \"a\": unknown field \"foo\""},
    {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "field \"dtype\" appears twice"},
    {"{\"a\":" F32_1("0,4") ",\"b\":" F32_1("2,6") "}", 6, "tensors \"a\" and \"b\" overlap"},
    {"{\"a\":" F32_1("0,4") ",\"b\":" F32_1("0,4") "}", 4, "overlap"},
    {"{\"a\":" F32_1("0,4") ",\"b\":" F32_1("8,12") "}", 12, "data bytes 4 to 8 belong to no tensor"},
    {"{\"a\":" F32_1("4,8") "}", 8, "data bytes 0 to 4 belong to no tensor"},
    {"{\"a\":" F32_1("0,4") "}", 8, "data bytes 4 to 8 belong to no tensor"},
    {"{}", 4, "data bytes 0 to 4 belong to no tensor"},
    {"{\"a\":" F32_1("0,4") ",\"a\":" F32_1("4,8") "}", 8, "tensor \"a\" appears twice"},
    {"{\"__metadata__\":[]}", 0, "\"__metadata__\" is not a JSON object"},
    {"{\"__metadata__\":{\"x\":1}}", 0, "metadata \"x\" is not a string"},
    {"{\"__metadata__\":{\"x\":null}}", 0, "metadata \"x\" is not a string"},
    {"{\"__metadata__\":{\"x\":{\"y\":\"z\"}}}", 0, "metadata \"x\" is not a string"},
    {"{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, "metadata \"k\" appears twice"},
    {"{\"__metadata__\":{},\"__metadata__\":{}}", 0, "\"__metadata__\" appears twice"},
    {"{\"a\xff\":" F32_1("0,4") "}", 4, "header is not valid UTF-8"},
    {"{\"a\":" F32_1("0,4") "", 4, "header is not valid JSON"},
};

static void test_bad_headers(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "bad.safetensors");
    for (size_t i = 0; i < sizeof bad_headers / sizeof bad_headers[0]; i++) {
        write_simple(path, bad_headers[i].header, bad_headers[i].ndata);
        struct st_file f;
        char err[512] = "";
        int rc = st_open(path, &f, err, sizeof err);
        if (rc != -1 || !strstr(err, bad_headers[i].needle))
            fail_msg("case %zu (%s): rc %d, error \"%s\", wanted \"%s\"", i, bad_headers[i].header,
                     rc, err, bad_headers[i].needle);
        assert_null(f.map);
    }
    unlink(path);
}

static void test_good_oddities(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "odd.safetensors");
    struct st_file f;
    char err[256];
    /* Whitespace around the object, as the padding writes it. */
    write_simple(path, "  {}      ", 0);
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    assert_int_equal(f.n_tensors, 0);
    assert_int_equal(f.n_meta, 0);
    st_close(&f);
    /* An empty tensor with huge dimensions is fine; so is a scalar, and
     * integer offsets written in exponent form. */
    write_simple(path,
                 "{\"z\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776,1099511627776,0],"
                 "\"data_offsets\":[0,0]},\"s\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,2e0]}}",
                 2);
    assert_int_equal(st_open(path, &f, err, sizeof err), 0);
    assert_int_equal(st_find(&f, "z")->numel, 0);
    assert_int_equal(st_find(&f, "s")->numel, 1);
    assert_int_equal(st_find(&f, "s")->ndim, 0);
    /* Sorted by offset: the empty tensor at 0 comes first. */
    assert_string_equal(f.tensors[0].name, "z");
    st_close(&f);
    unlink(path);
}

static void test_bad_frames(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "frame.safetensors");
    const char *h = "{}";
    write_raw(path, (uint64_t)1 << 63, h, 2, NULL, 0);
    expect_open_error(path, "header length 9223372036854775808 is over the limit");
    write_raw(path, UINT64_MAX, h, 2, NULL, 0);
    expect_open_error(path, "is over the limit");
    write_raw(path, 100000001, h, 2, NULL, 0);
    expect_open_error(path, "is over the limit of 100000000 bytes");
    write_raw(path, 100, h, 2, NULL, 0);
    expect_open_error(path, "header length 100 runs past the end of the file (2 bytes follow it)");
    write_raw(path, 3, "{}\0", 3, NULL, 0);
    expect_open_error(path, "header holds a NUL byte");
    write_raw(path, 0, "", 0, NULL, 0);
    expect_open_error(path, "not valid JSON");
    file_write(path, "\x02\0\0\0", 4);
    expect_open_error(path, "file is 4 bytes, too short");
    file_write(path, "", 0);
    expect_open_error(path, "file is 0 bytes");
    char missing[512];
    scratch_path(missing, "missing.safetensors");
    expect_open_error(missing, "cannot open");
    expect_open_error(scratch_dir, "not a regular file");
    unlink(path);
}

/* Every proper prefix of a valid file is invalid (the data must fill the
 * data section exactly), so each one must be refused. */
static void test_truncations(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "whole.safetensors");
    char cut[512];
    scratch_path(cut, "cut.safetensors");
    write_sample(path);
    size_t len;
    unsigned char *buf = file_must_read(path, &len);
    for (size_t n = 0; n < len; n++) {
        file_write(cut, buf, n);
        struct st_file f;
        char err[256];
        if (st_open(cut, &f, err, sizeof err) == 0)
            fail_msg("a file cut to %zu of %zu bytes was accepted", n, len);
    }
    free(buf);
    unlink(cut);
    unlink(path);
}

/* Single-byte corruptions anywhere in the frame: either refused, or
 * accepted with every tensor inside the data section. */
static void test_corruptions(void **state)
{
    (void)state;
    char path[512];
    scratch_path(path, "whole.safetensors");
    char bad[512];
    scratch_path(bad, "corrupt.safetensors");
    write_sample(path);
    size_t len;
    unsigned char *buf = file_must_read(path, &len);
    const unsigned char values[] = {0, ' ', '"', '{', '}', '[', ']', ',', ':', '0', '9', '-', 'e', 0xff, 0x80};
    int accepted = 0;
    for (size_t pos = 0; pos < len; pos++) {
        unsigned char keep = buf[pos];
        for (size_t v = 0; v < sizeof values; v++) {
            if (values[v] == keep)
                continue;
            buf[pos] = values[v];
            file_write(bad, buf, len);
            struct st_file f;
            char err[256];
            if (st_open(bad, &f, err, sizeof err) != 0)
                continue;
            accepted++;
            for (int i = 0; i < f.n_tensors; i++) {
                const struct st_tensor *t = &f.tensors[i];
                assert_true(t->data >= f.data && t->data + t->nbytes <= f.data + f.data_size);
                float *tmp = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *tmp);
                assert_non_null(tmp);
                st_to_f32(t, tmp);
                free(tmp);
            }
            st_close(&f);
        }
        buf[pos] = keep;
    }
    /* Changing data bytes or a metadata value keeps the file valid, so
     * some corruptions must have been accepted. */
    assert_true(accepted > 0);
    free(buf);
    unlink(bad);
    unlink(path);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_write_read),
        cmocka_unit_test(test_write_scalar),
        cmocka_unit_test(test_write_empty),
        cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_f16_bf16),
        cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_good_oddities),
        cmocka_unit_test(test_bad_frames),
        cmocka_unit_test(test_truncations),
        cmocka_unit_test(test_corruptions),
    };
    return cmocka_run_group_tests(tests, scratch_setup, scratch_teardown);
}
