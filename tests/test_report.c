/* test_report.c - the learning curve's CSV (exact text) and SVG plot
 * (well-formed XML, one polyline a loss with a point for each finite
 * value, the title escaped, nothing written on failure).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "report.h"

#include "support/files.h"
#include "support/filter.h"

/* What the tests write: the folder is removed with these alone, so a
 * stray file (a temporary one left behind) fails the teardown. */
static const char *const written[] = {"curve.csv", "plain.csv", "curve.svg", "empty.svg", "one.svg", NULL};

static int teardown(void **state)
{
    (void)state;
    return remove_tree(scratch_dir, written);
}

static void add(struct curve *c, long step, double epoch, double train, double valid, double metric, double lr,
                double tps, double grad_norm)
{
    const struct curve_point p = {step, epoch, train, valid, metric, lr, tps, grad_norm};
    assert_int_equal(curve_add(c, &p), 0);
}

static void test_curve_add(void **state)
{
    (void)state;
    struct curve c = {0};
    for (int i = 0; i < 1000; i++)
        add(&c, i, i / 100.0, 1.0 / (i + 1), NAN, NAN, 0.01, 100.0, 1.0);
    assert_int_equal(c.n, 1000);
    assert_true(c.cap >= 1000);
    for (int i = 0; i < 1000; i++) {
        assert_int_equal(c.p[i].step, i);
        assert_true(c.p[i].train_loss == 1.0 / (i + 1));
        assert_true(isnan(c.p[i].valid_loss));
    }
    curve_free(&c);
    assert_null(c.p);
    assert_int_equal(c.n, 0);
    assert_int_equal(c.cap, 0);
}

static void test_csv(void **state)
{
    (void)state;
    struct curve c = {.metric_name = "bpc"};
    char path[256], err[256] = "";

    add(&c, 0, 0.0, 2.5, NAN, NAN, 0.0, NAN, NAN);
    add(&c, 100, 0.25, 1.75, 1.8125, 2.6, 0.001, 12345.5, 0.75);
    add(&c, 200, 0.5, 1.0 / 3.0, NAN, NAN, 5e-4, 13000.0, 1.5);
    add(&c, 300, 0.1, 0.1, 1e-30, 123456789.0, 3e-7, INFINITY, 2e-3);
    snprintf(path, sizeof path, "%s/curve.csv", scratch_dir);
    if (curve_write_csv(&c, path, err, sizeof err) != 0)
        fail_msg("curve_write_csv: %s", err);
    char *text = file_must_read(path, NULL);
    assert_string_equal(text, "step,epoch,train_loss,valid_loss,bpc,lr,tokens_per_s,grad_norm\n"
                              "0,0,2.5,,,0,,\n"
                              "100,0.25,1.75,1.8125,2.6,0.001,12345.5,0.75\n"
                              "200,0.5,0.3333333333333333,,,0.0005,13000,1.5\n"
                              "300,0.1,0.1,1e-30,123456789,3e-07,inf,0.002\n");
    free(text);

    /* No metric: the column is still there, under a plain name. */
    c.metric_name = NULL;
    c.n = 1;
    snprintf(path, sizeof path, "%s/plain.csv", scratch_dir);
    assert_int_equal(curve_write_csv(&c, path, err, sizeof err), 0);
    text = file_must_read(path, NULL);
    assert_string_equal(text, "step,epoch,train_loss,valid_loss,metric,lr,tokens_per_s,grad_norm\n0,0,2.5,,,0,,\n");
    free(text);
    curve_free(&c);
}

/* ---- A small XML check: every tag closes, in order, under one root;
 * '&' only starts an entity; attribute values are quoted. */

static int is_name_char(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
           ch == ':' || ch == '_';
}

static void check_entities(const char *s, size_t len)
{
    static const char *const ents[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"};
    for (size_t i = 0; i < len; i++) {
        if (s[i] != '&')
            continue;
        size_t e = 0;
        while (e < 5 && strncmp(s + i, ents[e], strlen(ents[e])) != 0)
            e++;
        if (e == 5)
            fail_msg("bare '&' at \"%.20s\"", s + i);
    }
}

static void check_xml(const char *s)
{
    const char *stack[64];
    size_t len[64];
    int depth = 0, roots = 0;

    if (strncmp(s, "<?xml ", 6) == 0)
        s = strstr(s, "?>") + 2;
    while (*s) {
        const char *lt = strchr(s, '<');
        if (!lt) {
            /* Nothing but white space after the root. */
            for (; *s; s++)
                assert_true(*s == ' ' || *s == '\n');
            break;
        }
        check_entities(s, (size_t)(lt - s));
        if (depth == 0)
            for (const char *p = s; p < lt; p++)
                assert_true(*p == ' ' || *p == '\n');
        const char *gt = strchr(lt, '>');
        assert_non_null(gt);
        assert_null(memchr(lt + 1, '<', (size_t)(gt - lt - 1)));
        if (lt[1] == '/') {
            const char *name = lt + 2;
            size_t n = 0;
            while (is_name_char(name[n]))
                n++;
            assert_true(depth > 0);
            depth--;
            if (n != len[depth] || strncmp(name, stack[depth], n) != 0)
                fail_msg("</%.*s> closes <%.*s>", (int)n, name, (int)len[depth], stack[depth]);
        } else {
            const char *name = lt + 1;
            size_t n = 0;
            while (is_name_char(name[n]))
                n++;
            assert_true(n > 0);
            /* Attributes: name="value" pairs. */
            const char *a = name + n;
            for (;;) {
                while (*a == ' ' || *a == '\n')
                    a++;
                if (a >= gt || *a == '/')
                    break;
                while (is_name_char(*a))
                    a++;
                assert_true(a[0] == '=' && a[1] == '"');
                const char *end = strchr(a + 2, '"');
                assert_true(end && end < gt);
                check_entities(a + 2, (size_t)(end - a - 2));
                a = end + 1;
            }
            if (depth == 0)
                roots++;
            if (gt[-1] != '/') {
                assert_true(depth < 64);
                stack[depth] = name;
                len[depth++] = n;
            }
        }
        s = gt + 1;
    }
    assert_int_equal(depth, 0);
    assert_int_equal(roots, 1);
}

/* The number of points of each <polyline> in order, checking that every
 * point is a pair of numbers inside the 800x480 picture. */
static int polylines(const char *s, int *points, int max)
{
    int n = 0;
    while ((s = strstr(s, "<polyline")) != NULL) {
        assert_true(n < max);
        const char *p = strstr(s, "points=\"");
        assert_non_null(p);
        p += 8;
        int count = 0;
        while (*p != '"') {
            char *end;
            double x = strtod(p, &end);
            assert_true(end != p && *end == ',');
            double y = strtod(end + 1, &end);
            assert_true(x >= 0.0 && x <= 800.0 && y >= 0.0 && y <= 480.0);
            count++;
            p = *end == ' ' ? end + 1 : end;
        }
        points[n++] = count;
        s = p;
    }
    return n;
}

static void test_svg(void **state)
{
    (void)state;
    struct curve c = {.metric_name = "accuracy"};
    char path[256], err[256] = "";

    /* 30 training points, validation at every 10th. */
    for (int i = 1; i <= 30; i++)
        add(&c, i * 50, i / 30.0, 2.0 / sqrt(i), i % 10 ? NAN : 2.2 / sqrt(i), i % 10 ? NAN : 0.5 + i / 100.0,
            0.001, 5000.0, 1.0);
    snprintf(path, sizeof path, "%s/curve.svg", scratch_dir);
    if (curve_write_svg(&c, path, "GRU & <friends>", err, sizeof err) != 0)
        fail_msg("curve_write_svg: %s", err);
    char *svg = file_must_read(path, NULL);
    check_xml(svg);
    int points[4];
    assert_int_equal(polylines(svg, points, 4), 2);
    assert_int_equal(points[0], 30);
    assert_int_equal(points[1], 3);
    assert_non_null(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_non_null(strstr(svg, ">GRU &amp; &lt;friends&gt;</text>"));
    assert_non_null(strstr(svg, ">training loss</text>"));
    assert_non_null(strstr(svg, ">validation loss</text>"));
    assert_non_null(strstr(svg, ">step</text>"));
    assert_non_null(strstr(svg, ">loss</text>"));
    /* Round ticks: steps 50..1500 by 200 from 0, loss 0.365..2.0 by 0.2. */
    assert_non_null(strstr(svg, ">0</text>"));
    assert_non_null(strstr(svg, ">1600</text>"));
    assert_non_null(strstr(svg, ">0.2</text>"));
    assert_non_null(strstr(svg, ">2.0</text>"));
    assert_null(strstr(svg, ">0.36"));
    free(svg);
    curve_free(&c);

    /* No points, or one: still a picture, without a NaN in it. */
    struct curve none = {0}, one = {0};
    add(&one, 7, 0.0, 3.0, NAN, NAN, 0.0, 0.0, 1.0);
    const struct {
        struct curve *c;
        const char *name;
        int lines;
    } small[] = {{&none, "empty.svg", 0}, {&one, "one.svg", 1}};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", scratch_dir, small[i].name);
        assert_int_equal(curve_write_svg(small[i].c, path, NULL, err, sizeof err), 0);
        svg = file_must_read(path, NULL);
        check_xml(svg);
        assert_int_equal(polylines(svg, points, 4), small[i].lines);
        assert_null(strstr(svg, "nan"));
        assert_null(strstr(svg, "inf"));
        free(svg);
    }
    curve_free(&one);
}

static void test_write_error(void **state)
{
    (void)state;
    struct curve c = {0};
    char path[256], tmp[300], err[256] = "";

    add(&c, 1, 0.0, 1.0, NAN, NAN, 0.0, 0.0, 1.0);
    snprintf(path, sizeof path, "%s/no/such/dir/curve.csv", scratch_dir);
    assert_int_equal(curve_write_csv(&c, path, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "No such file"));
    assert_int_equal(curve_write_svg(&c, path, "t", err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(access(tmp, F_OK), -1);
    /* A disk that fills: the write fails when the file is closed (its few
     * bytes were buffered until then), and nothing is moved into place. */
    snprintf(path, sizeof path, "%s/full.csv", scratch_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(symlink("/dev/full", tmp), 0);
    assert_int_equal(curve_write_csv(&c, path, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "No space left"));
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(access(tmp, F_OK), -1);
    curve_free(&c);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_curve_add),
        cmocka_unit_test(test_csv),
        cmocka_unit_test(test_svg),
        cmocka_unit_test(test_write_error),
    };
    return cmocka_run_group_tests(tests, scratch_setup, teardown);
}
