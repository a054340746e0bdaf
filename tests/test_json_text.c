/* test_json_text.c - json_text.h: a JSON text read whole or not at all,
 * and the strings that hold U+0000, which cJSON would read cut short.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "json_text.h"
#include "support/filter.h"

static int whole(const char *text)
{
    cJSON *v = json_parse_whole(text, strlen(text));
    cJSON_Delete(v);
    return v != NULL;
}

/* The value must be all of the text, white space around it aside; the
 * length bounds it, so what follows is not read. */
static void test_parse_whole(void **state)
{
    (void)state;
    assert_true(whole("{\"a\": 1}"));
    assert_true(whole(" \t{\"a\": [1, 2]}\r\n"));
    assert_true(whole("3"));
    assert_false(whole("{\"a\": 1} x"));
    assert_false(whole("{\"a\": 1} {\"b\": 2}"));
    assert_false(whole("10k"));
    assert_false(whole("nullius.txt"));
    assert_false(whole("{\"a\": "));
    assert_false(whole(""));
    cJSON *v = json_parse_whole("{\"a\": 1} garbage", 8);
    assert_non_null(v);
    cJSON_Delete(v);
}

/* \u0000 in any string, a name's too, in either case of hex; not an
 * escaped backslash followed by u0000, nor the six characters outside a
 * string's escape. */
static void test_holds_nul(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int nul;
    } cases[] = {
        {"{\"text\": \"good\\u0000day\"}", 1},
        {"{\"a\\u0000\": 1}", 1},
        {"[\"\\\\\", \"\\u0000\"]", 1},
        {"{\"text\": \"x\\\\u0000\"}", 0},
        {"{\"text\": \"\\\"\\u0000\"}", 1},
        {"{\"text\": \"u0000\"}", 0},
        {"{\"text\": \"\\u0001\\u00000\"}", 1},
        {"{\"text\": \"\\u1000\"}", 0},
        {"{\"text\": \"plain\"}", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        if (json_holds_nul(cases[i].text, strlen(cases[i].text)) != cases[i].nul)
            fail_msg("%s: json_holds_nul is not %d", cases[i].text, cases[i].nul);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_whole),
        cmocka_unit_test(test_holds_nul),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
