/* test_utf8.c - text that comes in pieces (a stream's tokens, `rrnserve
 * run --stream`'s reads) cleaned as whole text is: utf8.h's
 * utf8_stream against utf8_clean of the whole, utf8_length, and
 * utf8_printable's one line to show.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "utf8.h"
#include "support/filter.h"

static void take_expect(struct utf8_stream *u, int final, const char *want)
{
    size_t len = 99;
    const char *got = utf8_stream_take(u, final, &len);
    assert_non_null(got);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(got, want, len + 1);
}

/* A character split over pieces comes out whole with its last byte; an
 * invalid byte or NUL as U+FFFD at once; an unfinished character at the
 * end as U+FFFD when final; nothing put, nothing taken. */
static void test_pieces_come_out_whole(void **state)
{
    (void)state;
    struct utf8_stream u = {0};
    take_expect(&u, 0, "");
    assert_int_equal(utf8_stream_put(&u, "caf", 3), 0);
    take_expect(&u, 0, "caf");
    assert_int_equal(utf8_stream_put(&u, "\xc3", 1), 0);
    take_expect(&u, 0, "");
    assert_int_equal(utf8_stream_put(&u, "\xa9!\xff", 3), 0);
    take_expect(&u, 0, "\xc3\xa9!\xEF\xBF\xBD");
    assert_int_equal(utf8_stream_put(&u, "a\0b\xe2\x82", 5), 0);
    take_expect(&u, 0, "a\xEF\xBF\xBD" "b");
    take_expect(&u, 1, "\xEF\xBF\xBD\xEF\xBF\xBD");
    take_expect(&u, 1, "");
    utf8_stream_free(&u);
}

/* Any split of a text, taken piece by piece, joins to utf8_clean of the
 * whole. */
static void test_any_split_equals_the_whole(void **state)
{
    (void)state;
    static const char text[] = "\xe2\x82\xac 5, caf\xc3\xa9 \xf0\x9f\x98\x80\xff\xc3 x\xe2\x82";
    const size_t n = sizeof text - 1;
    char whole[3 * sizeof text + 1];
    size_t whole_len;
    utf8_clean(text, n, 1, whole, &whole_len);
    for (size_t step = 1; step <= n; step++) {
        struct utf8_stream u = {0};
        char joined[3 * sizeof text + 1];
        size_t at = 0, len;
        for (size_t i = 0; i < n; i += step) {
            assert_int_equal(utf8_stream_put(&u, text + i, i + step < n ? step : n - i), 0);
            const char *got = utf8_stream_take(&u, i + step >= n, &len);
            assert_non_null(got);
            memcpy(joined + at, got, len);
            at += len;
        }
        assert_int_equal(at, whole_len);
        assert_memory_equal(joined, whole, at);
        utf8_stream_free(&u);
    }
}

/* utf8_stream_open says, before a piece is put, whether the text up to its
 * end would leave an unfinished character: whether utf8_clean, not final,
 * leaves bytes of that text unread. */
static void test_open_after_a_piece(void **state)
{
    (void)state;
    static const char text[] = "\xe2\x82\xac 5, caf\xc3\xa9 \xf0\x9f\x98\x80\xff\xc3 x\xe2\x82\xf0\x9f\xc3\xe2";
    const size_t n = sizeof text - 1;
    char clean[3 * sizeof text + 1];
    for (size_t step = 1; step <= 4; step++) {
        struct utf8_stream u = {0};
        size_t len;
        for (size_t i = 0; i < n; i += step) {
            const size_t m = i + step < n ? step : n - i;
            const int open = utf8_stream_open(&u, text + i, m);
            if (open != (utf8_clean(text, i + m, 0, clean, &len) < i + m))
                fail_msg("step %zu, bytes up to %zu: utf8_stream_open says %d", step, i + m, open);
            assert_int_equal(utf8_stream_put(&u, text + i, m), 0);
            assert_non_null(utf8_stream_take(&u, 0, &len));
        }
        utf8_stream_free(&u);
    }
}

/* utf8_length counts the characters of utf8_clean's text: of a clean text
 * its code points, and of any other a U+FFFD for each byte replaced. */
static void test_length_counts_the_clean_text(void **state)
{
    (void)state;
    assert_int_equal(utf8_length("", 0), 0);
    assert_int_equal(utf8_length("caf\xc3\xa9 \xf0\x9f\x98\x80", 10), 6);
    /* An invalid byte, a NUL, and an unfinished character's two bytes. */
    assert_int_equal(utf8_length("a\xff\0b\xe2\x82", 6), 6);
    static const char text[] = "\xe2\x82\xac 5, caf\xc3\xa9 \xf0\x9f\x98\x80\xff\xc3 x\xe2\x82";
    char clean[3 * sizeof text + 1];
    size_t len, chars = 0;
    utf8_clean(text, sizeof text - 1, 1, clean, &len);
    for (size_t i = 0; i < len; i++)
        chars += ((unsigned char)clean[i] & 0xC0) != 0x80;
    assert_int_equal(utf8_length(text, sizeof text - 1), chars);
    assert_int_equal(utf8_length(clean, len), chars);
}

/* utf8_printable: one '?' for each control character (C0, DEL, C1) and
 * each byte that is not UTF-8, other characters as they are, cut between
 * characters to fit. */
static void test_printable(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t cap;
        const char *want;
    } cases[] = {
        {"GET /a b", 64, "GET /a b"},
        {"a\r\nb\x1b[31m\x7f", 64, "a??b?[31m?"},
        {"\xc2\x80\xc2\x9b\xc2\x9f\xc2\xa0", 64, "???\xc2\xa0"}, /* C1's ends, then U+00A0 shown */
        {"caf\xc3\xa9 \xf0\x9f\x98\x80", 64, "caf\xc3\xa9 \xf0\x9f\x98\x80"},
        {"\xff\xfe.\xc0\xaf.\xed\xa0\x80", 64, "??.??.???"}, /* stray bytes, an overlong '/', a surrogate */
        {"x\xe2\x82", 64, "x??"},                                   /* unfinished at the end */
        {"ab\xe2\x82\xac", 6, "ab\xe2\x82\xac"},                     /* fits exactly with its NUL */
        {"ab\xe2\x82\xac", 5, "ab"},                                 /* does not: cut before it */
        {"abc", 1, ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[64];
        memset(out, 'Z', sizeof out);
        utf8_printable(out, cases[i].cap, cases[i].in);
        if (strcmp(out, cases[i].want) != 0)
            fail_msg("case %zu: \"%s\", not \"%s\"", i, out, cases[i].want);
    }
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pieces_come_out_whole),
        cmocka_unit_test(test_any_split_equals_the_whole),
        cmocka_unit_test(test_open_after_a_piece),
        cmocka_unit_test(test_length_counts_the_clean_text),
        cmocka_unit_test(test_printable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
