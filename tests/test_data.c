/* test_data.c - corpora, truncated-BPTT windows, JSONL classification
 * loading with its split and errors, length-bucketed batches and the
 * synthetic tasks.
 *
 * Self-contained: the files the loaders read are written to a temporary
 * folder here, and removed at the end.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "data.h"

#include "support/files.h"
#include "support/filter.h"

static char tmpdir[64];
static struct tokenizer byte_tk;

static int setup(void **state)
{
    (void)state;
    struct model_config cfg;
    char err[256];

    memset(&cfg, 0, sizeof cfg);
    cfg.tok_type = TOKENIZER_BYTE;
    cfg.unk = -1;
    if (tokenizer_init(&byte_tk, &cfg, err, sizeof err) != 0)
        fail_msg("tokenizer_init: %s", err);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/rrn_test_data_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    remove_tree(tmpdir, NULL);
    tokenizer_free(&byte_tk);
    return 0;
}

/* Write text to tmpdir/name; the path in path. */
static void write_file(const char *name, const char *text, char *path, size_t pathlen)
{
    snprintf(path, pathlen, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
}

static void make_dir(const char *name, char *path, size_t pathlen)
{
    snprintf(path, pathlen, "%s/%s", tmpdir, name);
    assert_int_equal(mkdir(path, 0700), 0);
}

static void assert_err_has(const char *err, const char *part)
{
    if (!strstr(err, part))
        fail_msg("error \"%s\" does not say \"%s\"", err, part);
}

/* ---- Corpora */

static void assert_corpus_text(const struct corpus *c, const char *want)
{
    assert_int_equal(c->n, strlen(want));
    for (size_t i = 0; i < c->n; i++) {
        if (c->ids[i] != (unsigned char)want[i])
            fail_msg("token %zu is %d, want '%c'", i, (int)c->ids[i], want[i]);
    }
}

static void test_corpus_folder_in_name_order(void **state)
{
    (void)state;
    char dir[256], path[256], sub[256], single[256], err[256] = "";
    make_dir("corpus", dir, sizeof dir);
    write_file("corpus/b.txt", "bb", path, sizeof path);
    write_file("corpus/a.txt", "a", path, sizeof path);
    write_file("corpus/B.txt", "B", path, sizeof path);   /* byte order: before a */
    write_file("corpus/.hidden", "HIDDEN", path, sizeof path);
    write_file("corpus/c.txt", "", path, sizeof path);    /* empty: no tokens */
    write_file("corpus/d.txt", "d\n", path, sizeof path);
    make_dir("corpus/sub", sub, sizeof sub);             /* not recursive */
    write_file("corpus/sub/x.txt", "SUB", path, sizeof path);
    write_file("single.txt", "ZZ", single, sizeof single);

    const char *paths[] = {single, dir, single};
    char *text;
    size_t len;
    if (corpus_read(paths, 3, &text, &len, err, sizeof err) != 0)
        fail_msg("corpus_read: %s", err);
    assert_int_equal(len, 10);
    assert_string_equal(text, "ZZBabbd\nZZ");
    free(text);

    struct corpus c;
    if (corpus_load(paths, 3, &byte_tk, &c, err, sizeof err) != 0)
        fail_msg("corpus_load: %s", err);
    assert_corpus_text(&c, "ZZBabbd\nZZ");
    corpus_free(&c);
    assert_null(c.ids);
    assert_int_equal(c.n, 0);

    /* Nothing to read is an empty text, not an error. */
    assert_int_equal(corpus_read(paths, 0, &text, &len, err, sizeof err), 0);
    assert_int_equal(len, 0);
    assert_string_equal(text, "");
    free(text);
}

/* A validation text that is a training file, by whatever name (itself,
 * within a training folder, a link to it), is refused, naming it; files
 * that only share a folder's name or bytes are not. */
static void test_corpus_disjoint(void **state)
{
    (void)state;
    char dir[256], a[256], b[256], other[256], same_bytes[256], link[256], err[256] = "";
    make_dir("disjoint", dir, sizeof dir);
    write_file("disjoint/a.txt", "aaa", a, sizeof a);
    write_file("disjoint/b.txt", "bbb", b, sizeof b);
    write_file("other.txt", "ccc", other, sizeof other);
    write_file("same_bytes.txt", "aaa", same_bytes, sizeof same_bytes);
    snprintf(link, sizeof link, "%s/link_to_b.txt", tmpdir);
    assert_int_equal(symlink(b, link), 0);
    const char *train_dir[] = {dir}, *train_a[] = {other, a};
    const struct {
        const char *const *train;
        int n_train;
        const char *valid, *named; /* named: the file the error names, NULL for none */
    } cases[] = {
        {train_dir, 1, a, a},
        {train_dir, 1, link, link},
        {train_a, 2, a, a},
        {train_a, 2, other, other},
        {train_a, 2, b, NULL},
        {train_a, 2, same_bytes, NULL},
        {train_dir, 1, other, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *valid[] = {same_bytes, cases[i].valid};
        err[0] = 0;
        int rc = corpus_disjoint(cases[i].train, cases[i].n_train, valid, 2, err, sizeof err);
        if (cases[i].named ? rc != -1 || strncmp(err, cases[i].named, strlen(cases[i].named)) != 0 ||
                                 !strstr(err, "is in the training data too")
                           : rc != 0)
            fail_msg("case %zu: %d, \"%s\"", i, rc, err);
    }
    /* Nothing to validate on, and a training path that is not there. */
    assert_int_equal(corpus_disjoint(train_dir, 1, NULL, 0, err, sizeof err), 0);
    const char *missing[] = {"/nonexistent/x.txt"};
    assert_int_equal(corpus_disjoint(missing, 1, train_dir, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/x.txt"));
}

static void test_corpus_errors(void **state)
{
    (void)state;
    char path[256], missing[256], err[256] = "";
    struct corpus c;

    snprintf(missing, sizeof missing, "%s/no_such_file.txt", tmpdir);
    const char *one[] = {missing};
    char *text = (char *)"untouched";
    size_t len = 99;
    assert_int_equal(corpus_read(one, 1, &text, &len, err, sizeof err), -1);
    assert_err_has(err, missing);
    assert_null(text);

    assert_int_equal(corpus_load(one, 1, &byte_tk, &c, err, sizeof err), -1);
    assert_err_has(err, missing);
    assert_err_has(err, "No such file");
    assert_null(c.ids);

    /* An error in a later path frees what the earlier ones loaded. */
    write_file("ok.txt", "plenty of text", path, sizeof path);
    const char *two[] = {path, missing};
    assert_int_equal(corpus_load(two, 2, &byte_tk, &c, err, sizeof err), -1);
    assert_err_has(err, missing);
    assert_null(c.ids);

    write_file("tiny.txt", "x", path, sizeof path);
    const char *tiny[] = {path};
    assert_int_equal(corpus_load(tiny, 1, &byte_tk, &c, err, sizeof err), -1);
    assert_err_has(err, path);
    assert_err_has(err, "1 token;");
    assert_err_has(err, "at least 2");
    write_file("pair.txt", "xy", path, sizeof path);
    const char *pair[] = {path};
    assert_int_equal(corpus_load(pair, 1, &byte_tk, &c, err, sizeof err), 0);
    assert_int_equal(c.n, 2);
    corpus_free(&c);
}

/* ---- Truncated-BPTT windows */

/* A corpus whose token at i is i, so a window shows where it was read. */
static void counting_corpus(struct corpus *c, size_t n)
{
    c->n = n;
    c->ids = malloc(n * sizeof *c->ids);
    assert_non_null(c->ids);
    for (size_t i = 0; i < n; i++)
        c->ids[i] = (int32_t)i;
}

static void test_windows_cover_parts(void **state)
{
    (void)state;
    enum { N = 1000, B = 3, T = 7, EPOCHS = 6 };
    const int part = N / B, W = part / T - 1; /* 333 tokens, 46 windows */
    struct corpus c;
    struct lm_windows w;
    char err[256];
    int32_t win[B][T + 1], prev[B][T + 1];
    int seen[B][part];
    int starts[EPOCHS][B];

    counting_corpus(&c, N);
    if (lm_windows_init(&w, &c, B, T, 42, err, sizeof err) != 0)
        fail_msg("lm_windows_init: %s", err);
    assert_int_equal(lm_windows_per_epoch(&w), W);
    for (int e = 0; e < EPOCHS; e++) {
        memset(seen, 0, sizeof seen);
        for (int k = 0; k < W; k++) {
            assert_int_equal(lm_windows_next(&w, &win[0][0]), k == 0);
            assert_int_equal(w.epoch, e);
            for (int b = 0; b < B; b++) {
                /* Contiguous text inside the stream's own part... */
                for (int t = 0; t <= T; t++) {
                    assert_int_equal(win[b][t], win[b][0] + t);
                    assert_true(win[b][t] >= b * part && win[b][t] < (b + 1) * part);
                }
                /* ...going on from the last window, overlapping by one. */
                if (k == 0)
                    starts[e][b] = win[b][0] - b * part;
                else
                    assert_int_equal(win[b][0], prev[b][T]);
                for (int t = 0; t < T; t++)
                    seen[b][win[b][t] - b * part]++;
            }
            memcpy(prev, win, sizeof win);
        }
        /* Each token of the span read is an input once; what is left out
         * is less than two windows' worth. */
        for (int b = 0; b < B; b++) {
            int inputs = 0;
            for (int i = 0; i < part; i++) {
                assert_true(seen[b][i] <= 1);
                inputs += seen[b][i];
            }
            assert_int_equal(inputs, W * T);
            assert_true(starts[e][b] >= 0 && part - (starts[e][b] + W * T + 1) >= 0);
            assert_true(part - (W * T + 1) >= T - 1 && part - (W * T + 1) <= 2 * T - 2);
        }
    }
    /* The next call starts epoch EPOCHS. */
    assert_int_equal(lm_windows_next(&w, &win[0][0]), 1);
    assert_int_equal(w.epoch, EPOCHS);
    lm_windows_free(&w);

    /* A new random offset each epoch: with 11 possible offsets and six
     * epochs, all equal would be a broken generator. */
    int differ = 0;
    for (int e = 1; e < EPOCHS; e++)
        for (int b = 0; b < B; b++)
            differ += starts[e][b] != starts[0][b];
    assert_true(differ >= 5);
    free(c.ids);
}

/* The window sequence of a seed, as one array of `calls` windows. */
static int32_t *window_run(const struct corpus *c, int B, int T, uint64_t seed, int calls)
{
    struct lm_windows w;
    char err[256];
    size_t per = (size_t)B * (size_t)(T + 1);
    int32_t *all = malloc((size_t)calls * per * sizeof *all);
    assert_non_null(all);
    if (lm_windows_init(&w, c, B, T, seed, err, sizeof err) != 0)
        fail_msg("lm_windows_init: %s", err);
    for (int i = 0; i < calls; i++)
        lm_windows_next(&w, all + (size_t)i * per);
    lm_windows_free(&w);
    return all;
}

static void test_windows_deterministic(void **state)
{
    (void)state;
    struct corpus c;
    counting_corpus(&c, 5000);
    const size_t bytes = 300 * 4 * 11 * sizeof(int32_t);
    int32_t *a = window_run(&c, 4, 10, 7, 300);
    int32_t *b = window_run(&c, 4, 10, 7, 300);
    int32_t *other = window_run(&c, 4, 10, 8, 300);
    assert_memory_equal(a, b, bytes);
    assert_memory_not_equal(a, other, bytes);
    free(a);
    free(b);
    free(other);
    free(c.ids);
}

static void test_windows_errors(void **state)
{
    (void)state;
    struct corpus c;
    struct lm_windows w;
    char err[256] = "";

    counting_corpus(&c, 96);
    /* 3 streams of windows of 16 need 96 tokens: just fits... */
    assert_int_equal(lm_windows_init(&w, &c, 3, 16, 1, err, sizeof err), 0);
    assert_int_equal(lm_windows_per_epoch(&w), 1);
    lm_windows_free(&w);
    /* ...windows of 17 need 102. */
    assert_int_equal(lm_windows_init(&w, &c, 3, 17, 1, err, sizeof err), -1);
    assert_err_has(err, "96 tokens");
    assert_err_has(err, "102");
    /* One stream of windows of one token is the least there is. */
    assert_int_equal(lm_windows_init(&w, &c, 1, 1, 1, err, sizeof err), 0);
    lm_windows_free(&w);
    assert_int_equal(lm_windows_init(&w, &c, 0, 4, 1, err, sizeof err), -1);
    assert_int_equal(lm_windows_init(&w, &c, 3, 0, 1, err, sizeof err), -1);
    assert_err_has(err, "at least 1");
    free(c.ids);
}

/* ---- Classification JSONL */

static char *const classes[] = {"negative", "positive"};

static const char *label_of(int i)
{
    return i % 3 == 0 ? "negative" : "positive";
}

/* 25 examples, "t<i>" labelled by label_of(i), with blank lines around;
 * example 7 has no text. */
static void write_split_file(char *path, size_t pathlen)
{
    char text[4096];
    size_t at = 0;
    at += (size_t)snprintf(text + at, sizeof text - at, "\n");
    for (int i = 0; i < 25; i++) {
        char body[16];
        snprintf(body, sizeof body, i == 7 ? "" : "t%d", i);
        at += (size_t)snprintf(text + at, sizeof text - at, "{\"text\": \"%s\", \"label\": \"%s\"}\n%s", body,
                               label_of(i), i == 12 ? "  \r\n" : "");
    }
    write_file("split.jsonl", text, path, pathlen);
}

static void assert_example(const struct example *e, int i)
{
    char want[16];
    int len = snprintf(want, sizeof want, "t%d", i);
    assert_int_equal(e->len, len);
    for (int k = 0; k < len; k++)
        assert_int_equal(e->ids[k], want[k]);
    assert_int_equal(e->label, i % 3 == 0 ? 0 : 1);
    assert_null(e->inputs);
    assert_null(e->target);
}

static void test_classify_split(void **state)
{
    (void)state;
    char path[256], err[256] = "";
    struct dataset d;
    const struct split split = {10, 0, 1};

    write_split_file(path, sizeof path);
    /* Lines 0, 10, 20 are test; 1, 11, 21 validation; the other 19
     * training, one of which (7) has no tokens. */
    if (classify_load(path, &byte_tk, classes, 2, &split, PART_TEST, &d, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(d.n, 3);
    assert_int_equal(d.skipped, 0);
    assert_int_equal(d.dim, 0);
    for (int k = 0; k < 3; k++)
        assert_example(&d.ex[k], 10 * k);
    dataset_free(&d);

    assert_int_equal(classify_load(path, &byte_tk, classes, 2, &split, PART_VALID, &d, err, sizeof err), 0);
    assert_int_equal(d.n, 3);
    for (int k = 0; k < 3; k++)
        assert_example(&d.ex[k], 10 * k + 1);
    dataset_free(&d);

    assert_int_equal(classify_load(path, &byte_tk, classes, 2, &split, PART_TRAIN, &d, err, sizeof err), 0);
    assert_int_equal(d.n, 18);
    assert_int_equal(d.skipped, 1);
    int k = 0;
    for (int i = 0; i < 25; i++) {
        if (i % 10 > 1 && i != 7)
            assert_example(&d.ex[k++], i);
    }
    dataset_free(&d);

    /* mod 0: everything is training. */
    const struct split all = {0, 0, 0};
    assert_int_equal(classify_load(path, &byte_tk, classes, 2, &all, PART_TRAIN, &d, err, sizeof err), 0);
    assert_int_equal(d.n, 24);
    assert_int_equal(d.skipped, 1);
    dataset_free(&d);
    assert_int_equal(classify_load(path, &byte_tk, classes, 2, &all, PART_TEST, &d, err, sizeof err), -1);
    assert_err_has(err, "no examples in the test part");
    assert_int_equal(d.n, 0);
    assert_null(d.ex);
    assert_int_equal(classify_load(path, &byte_tk, classes, 2, &all, PART_VALID, &d, err, sizeof err), -1);
    assert_err_has(err, "no examples in the validation part");
}

static void test_classify_errors(void **state)
{
    (void)state;
    const char *good = "{\"text\": \"fine\", \"label\": \"positive\"}\n";
    const struct {
        const char *bad;  /* the third line */
        const char *want; /* in the message, after "file:4: " */
    } cases[] = {
        {"{\"text\": \"x\", \"label\": \"positive\"", "not valid JSON"},
        {"{\"text\": \"x\", \"label\": \"positive\"} trailing", "not valid JSON"},
        {"[\"x\", \"positive\"]", "not a JSON object"},
        {"{\"text\": \"x\\u0000y\", \"label\": \"positive\"}", "a string holds U+0000 (\\u0000)"},
        {"{\"label\": \"positive\"}", "no \"text\" field"},
        {"{\"text\": 3, \"label\": \"positive\"}", "\"text\" is not a string"},
        {"{\"text\": \"x\"}", "no \"label\" field"},
        {"{\"text\": \"x\", \"label\": 1}", "\"label\" is not a string"},
        {"{\"text\": \"x\", \"label\": \"neutral\"}", "unknown label \"neutral\" (the classes are \"negative\", \"positive\")"},
        {"{\"text\": \"x\", \"label\": \"positive\", \"label\": \"negative\"}", "\"label\" appears twice"},
        {"{\"text\": \"x\", \"label\": \"positive\", \"Label\": \"negative\", \"text\": \"y\"}",
         "\"text\" appears twice"},
    };
    const struct split split = {10, 0, 1};

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[512], path[256], err[256] = "", want[512];
        struct dataset d;
        /* A blank line counts for the line number, not for the split. */
        snprintf(text, sizeof text, "%s\n%s%s\n%s", good, good, cases[i].bad, good);
        write_file("bad.jsonl", text, path, sizeof path);
        /* The bad line is training; loading another part finds it too. */
        assert_int_equal(classify_load(path, &byte_tk, classes, 2, &split, PART_VALID, &d, err, sizeof err), -1);
        snprintf(want, sizeof want, "%s:4: %s", path, cases[i].want);
        assert_string_equal(err, want);
        assert_int_equal(d.n, 0);
        assert_null(d.ex);
    }

    char missing[256], err[256] = "";
    struct dataset d;
    snprintf(missing, sizeof missing, "%s/missing.jsonl", tmpdir);
    assert_int_equal(classify_load(missing, &byte_tk, classes, 2, &split, PART_TRAIN, &d, err, sizeof err), -1);
    assert_err_has(err, missing);
    assert_err_has(err, "No such file");
}

/* ---- Length-bucketed batches */

/* n examples of lengths 1..100 from seed, no tokens (bucketing looks at
 * lengths only). */
static void lengths_dataset(struct dataset *d, int n, uint64_t seed)
{
    struct rng r;
    rng_seed(&r, seed);
    memset(d, 0, sizeof *d);
    d->ex = calloc((size_t)n, sizeof *d->ex);
    assert_non_null(d->ex);
    d->n = n;
    for (int i = 0; i < n; i++)
        d->ex[i].len = 1 + (int)(rng_uniform(&r) * 100);
}

/* One epoch's batches, checked for covering every example once in batches
 * of B (one smaller at most); returns the mean length spread in a batch. */
static double check_epoch(const struct dataset *d, int B, struct rng *r, int *order, int *starts)
{
    int nb = -1;
    assert_int_equal(bucket_batches(d, B, r, order, starts, &nb), 0);
    assert_int_equal(nb, (d->n + B - 1) / B);
    assert_int_equal(starts[0], 0);
    assert_int_equal(starts[nb], d->n);
    int *count = calloc((size_t)d->n, sizeof *count);
    assert_non_null(count);
    int small = 0;
    double spread = 0.0;
    for (int k = 0; k < nb; k++) {
        int size = starts[k + 1] - starts[k];
        assert_true(size >= 1 && size <= B);
        small += size < B;
        int lo = 1000, hi = 0;
        for (int j = starts[k]; j < starts[k + 1]; j++) {
            count[order[j]]++;
            int len = d->ex[order[j]].len;
            lo = len < lo ? len : lo;
            hi = len > hi ? len : hi;
        }
        spread += hi - lo;
    }
    assert_true(small <= 1);
    for (int i = 0; i < d->n; i++)
        assert_int_equal(count[i], 1);
    free(count);
    return spread / nb;
}

static void test_bucket_batches(void **state)
{
    (void)state;
    enum { N = 1001, B = 8, NB = 126 };
    struct dataset d;
    struct rng r, again;
    int order[N], starts[NB + 1], first[N];

    lengths_dataset(&d, N, 3);
    rng_seed(&r, 11);
    /* Batches of random examples would spread over about 78 lengths; from
     * buckets of 256 sorted examples, over about 3. */
    double spread = check_epoch(&d, B, &r, order, starts);
    assert_true(spread < 8.0);
    memcpy(first, order, sizeof order);
    /* A new epoch, a new order. */
    check_epoch(&d, B, &r, order, starts);
    assert_memory_not_equal(first, order, sizeof order);
    /* The same seed, the same order. */
    rng_seed(&again, 11);
    check_epoch(&d, B, &again, order, starts);
    assert_memory_equal(first, order, sizeof order);

    /* Fewer examples than a batch: one batch. */
    struct dataset few = {.n = 3, .ex = d.ex};
    int nb = 0;
    assert_int_equal(bucket_batches(&few, B, &r, order, starts, &nb), 0);
    assert_int_equal(nb, 1);
    assert_int_equal(starts[1], 3);
    assert_int_equal(bucket_batches(&few, 0, &r, order, starts, &nb), -1);
    dataset_free(&d);
}

/* ---- Synthetic tasks */

static void test_synth_adding(void **state)
{
    (void)state;
    enum { N = 10000, T = 51 };
    struct dataset d, same, other;

    assert_int_equal(synth_adding(N, T, 5, &d), 0);
    assert_int_equal(d.n, N);
    assert_int_equal(d.dim, 2);
    assert_int_equal(d.outputs, 1);
    double mse = 0.0;
    for (int i = 0; i < N; i++) {
        const struct example *e = &d.ex[i];
        assert_int_equal(e->len, T);
        assert_null(e->ids);
        int marks[2], n_marks = 0;
        for (int t = 0; t < T; t++) {
            float v = e->inputs[2 * t], m = e->inputs[2 * t + 1];
            assert_true(v >= 0.0f && v < 1.0f);
            assert_true(m == 0.0f || m == 1.0f);
            if (m == 1.0f) {
                assert_true(n_marks < 2);
                marks[n_marks++] = t;
            }
        }
        /* Exactly two, one in each half (the first 25 steps, the last 26). */
        assert_int_equal(n_marks, 2);
        assert_true(marks[0] < T / 2 && marks[1] >= T / 2);
        assert_true(e->target[0] == e->inputs[2 * marks[0]] + e->inputs[2 * marks[1]]);
        mse += (e->target[0] - 1.0) * (e->target[0] - 1.0);
    }
    /* Always answering 1 scores the variance of the sum of two U[0,1). */
    assert_true(fabs(mse / N - 1.0 / 6.0) < 0.01);

    assert_int_equal(synth_adding(N, T, 5, &same), 0);
    assert_int_equal(synth_adding(N, T, 6, &other), 0);
    int differ = 0;
    for (int i = 0; i < N; i++) {
        assert_memory_equal(d.ex[i].inputs, same.ex[i].inputs, 2 * T * sizeof(float));
        differ += memcmp(d.ex[i].inputs, other.ex[i].inputs, 2 * T * sizeof(float)) != 0;
    }
    assert_int_equal(differ, N);
    dataset_free(&d);
    dataset_free(&same);
    dataset_free(&other);
    assert_int_equal(d.n, 0);

    /* The shortest sequence: one step in each half. */
    assert_int_equal(synth_adding(3, 2, 1, &d), 0);
    for (int i = 0; i < 3; i++)
        assert_true(d.ex[i].inputs[1] == 1.0f && d.ex[i].inputs[3] == 1.0f);
    dataset_free(&d);
    assert_int_equal(synth_adding(3, 1, 1, &d), -1);
    assert_int_equal(synth_adding(0, 10, 1, &d), -1);
}

static void test_synth_remember(void **state)
{
    (void)state;
    enum { N = 500, T = 20, D = 3 };
    struct dataset d, same;

    assert_int_equal(synth_remember(N, T, D, 9, &d), 0);
    assert_int_equal(d.n, N);
    assert_int_equal(d.dim, D);
    assert_int_equal(d.outputs, D);
    double sum = 0.0, sq = 0.0;
    for (int i = 0; i < N; i++) {
        const struct example *e = &d.ex[i];
        assert_int_equal(e->len, T);
        assert_memory_equal(e->target, e->inputs, D * sizeof(float));
        for (int k = 0; k < T * D; k++) {
            float v = e->inputs[k];
            assert_true(v >= -1.0f && v < 1.0f);
            sum += v;
            sq += (double)v * v;
        }
    }
    /* U[-1,1): mean 0, variance 1/3; 30000 draws pin both to +-0.02. */
    assert_true(fabs(sum / (N * T * D)) < 0.02);
    assert_true(fabs(sq / (N * T * D) - 1.0 / 3.0) < 0.02);
    assert_int_equal(synth_remember(N, T, D, 9, &same), 0);
    for (int i = 0; i < N; i++)
        assert_memory_equal(d.ex[i].inputs, same.ex[i].inputs, T * D * sizeof(float));
    dataset_free(&d);
    dataset_free(&same);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_corpus_folder_in_name_order),
        cmocka_unit_test(test_corpus_disjoint),
        cmocka_unit_test(test_corpus_errors),
        cmocka_unit_test(test_windows_cover_parts),
        cmocka_unit_test(test_windows_deterministic),
        cmocka_unit_test(test_windows_errors),
        cmocka_unit_test(test_classify_split),
        cmocka_unit_test(test_classify_errors),
        cmocka_unit_test(test_bucket_batches),
        cmocka_unit_test(test_synth_adding),
        cmocka_unit_test(test_synth_remember),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
