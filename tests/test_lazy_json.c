/* test_lazy_json.c - a JSON answer whose long arrays are written while it
 * is sent (server/lazy_json.c): the bytes read, in pieces of any size,
 * are those of the whole tree printed at once; an element that cannot be
 * made ends the answer with an error; what the answer holds is released
 * once, when it is freed; without an answer an array is made at once;
 * and reply_lazy_json sends an answer without lazy arrays as an ordinary
 * body. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "support/filter.h"
#include "http.h"
#include "lazy_json.h"

static int releases;

static void count_release(void *owner)
{
    (void)owner;
    releases++;
}

/* Element i: {"i": i, "s": a string to escape}, or NULL at fail_at. */
struct items {
    size_t fail_at;
};

static cJSON *item(const void *ctx, size_t i)
{
    const struct items *it = ctx;
    if (i == it->fail_at)
        return NULL;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "i", (double)i);
    cJSON_AddStringToObject(o, "s", "q\"\x01\x02,[]");
    return o;
}

static cJSON *number(const void *ctx, size_t i)
{
    (void)ctx;
    return cJSON_CreateNumber((double)i * 0.5);
}

/* The same answer with its arrays lazy (z) or made now (z NULL). */
static cJSON *answer(struct lazy_json *z, size_t n)
{
    const struct items it = {(size_t)-1};
    cJSON *o = cJSON_CreateObject(), *nested = cJSON_CreateObject(), *list = cJSON_CreateArray();
    cJSON *empty = cJSON_CreateArray(), *more = cJSON_CreateArray();
    cJSON_AddStringToObject(o, "before", "a \x01 control character in a string");
    if (z) {
        cJSON_Delete(list);
        cJSON_Delete(empty);
        cJSON_Delete(more);
        list = lazy_json_array(z, item, &it, sizeof it, n);
        empty = lazy_json_array(z, item, &it, sizeof it, 0);
        more = lazy_json_array(z, number, NULL, 0, 3);
    } else {
        for (size_t i = 0; i < n; i++)
            cJSON_AddItemToArray(list, item(&it, i));
        for (size_t i = 0; i < 3; i++)
            cJSON_AddItemToArray(more, number(NULL, i));
    }
    cJSON_AddItemToObject(o, "list", list);
    cJSON_AddItemToObject(o, "empty", empty);
    cJSON_AddItemToObject(nested, "more", more);
    cJSON_AddItemToObject(o, "nested", nested);
    cJSON_AddNumberToObject(o, "after", 7);
    return o;
}

/* The whole answer, read piece bytes at a time; NULL on a read error. */
static char *read_all(struct lazy_json *z, size_t piece)
{
    size_t len = 0, cap = 1024;
    char *out = malloc(cap);
    assert_non_null(out);
    for (;;) {
        if (cap - len < piece + 1) {
            cap = 2 * cap + piece;
            out = realloc(out, cap);
            assert_non_null(out);
        }
        ssize_t n = lazy_json_read(z, out + len, piece);
        if (n < 0) {
            free(out);
            return NULL;
        }
        if (n == 0)
            break;
        assert_true((size_t)n <= piece);
        len += (size_t)n;
    }
    out[len] = 0;
    return out;
}

static void test_read_equals_the_whole_print(void **state)
{
    (void)state;
    cJSON *eager = answer(NULL, 40);
    char *want = cJSON_PrintUnformatted(eager);
    cJSON_Delete(eager);
    assert_non_null(want);
    const size_t pieces[] = {1, 7, 64, 65536};
    for (size_t p = 0; p < sizeof pieces / sizeof *pieces; p++) {
        releases = 0;
        struct lazy_json *z = lazy_json_new(count_release, NULL);
        assert_non_null(z);
        assert_int_equal(lazy_json_finish(z, answer(z, 40)), 0);
        assert_int_equal(lazy_json_arrays(z), 3);
        char *got = read_all(z, pieces[p]);
        assert_non_null(got);
        assert_string_equal(got, want);
        assert_int_equal(lazy_json_read(z, got, 16), 0); /* and it stays at its end */
        free(got);
        assert_int_equal(releases, 0);
        lazy_json_free(z);
        assert_int_equal(releases, 1);
    }
    free(want);
}

static void test_an_element_that_cannot_be_made_ends_with_an_error(void **state)
{
    (void)state;
    releases = 0;
    struct lazy_json *z = lazy_json_new(count_release, NULL);
    const struct items it = {2};
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "list", lazy_json_array(z, item, &it, sizeof it, 5));
    assert_int_equal(lazy_json_finish(z, o), 0);
    assert_null(read_all(z, 16));
    lazy_json_free(z);
    assert_int_equal(releases, 1);
}

/* Without an answer, lazy_json_array makes the array now: the same
 * elements, or NULL when one cannot be made. */
static void test_an_array_without_an_answer_is_made_now(void **state)
{
    (void)state;
    const struct items all = {(size_t)-1}, third_fails = {2};
    cJSON *now = lazy_json_array(NULL, item, &all, sizeof all, 4), *want = cJSON_CreateArray();
    for (size_t i = 0; i < 4; i++)
        cJSON_AddItemToArray(want, item(&all, i));
    assert_non_null(now);
    assert_true(cJSON_Compare(now, want, 1));
    cJSON_Delete(now);
    cJSON_Delete(want);
    assert_null(lazy_json_array(NULL, item, &third_fails, sizeof third_fails, 4));
}

static void test_reply_sends_an_answer_without_lazy_arrays_as_a_body(void **state)
{
    (void)state;
    releases = 0;
    struct reply r = {.batch_size = -1};
    struct lazy_json *z = lazy_json_new(count_release, NULL);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "x", 1);
    reply_lazy_json(&r, 200, o, z);
    assert_int_equal(r.status, 200);
    assert_null(r.lazy);
    assert_string_equal(r.body, "{\"x\":1}");
    assert_int_equal(releases, 1);
    free(r.body);

    r = (struct reply){.batch_size = -1};
    z = lazy_json_new(count_release, NULL);
    reply_lazy_json(&r, 200, answer(z, 3), z);
    assert_int_equal(r.status, 200);
    assert_null(r.body);
    assert_ptr_equal(r.lazy, z);
    char *got = read_all(z, 5);
    assert_non_null(strstr(got, "\"more\":[0,0.5,1]"));
    free(got);
    assert_int_equal(releases, 1);
    lazy_json_free(z);
    assert_int_equal(releases, 2);

    /* A tree that could not be built (NULL): a 500, and the answer's hold
     * released. */
    r = (struct reply){.batch_size = -1};
    z = lazy_json_new(count_release, NULL);
    cJSON *orphan = lazy_json_array(z, number, NULL, 0, 1);
    assert_non_null(orphan);
    reply_lazy_json(&r, 200, NULL, z);
    cJSON_Delete(orphan);
    assert_int_equal(r.status, 500);
    assert_null(r.lazy);
    assert_int_equal(releases, 3);
    free(r.body);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_equals_the_whole_print),
        cmocka_unit_test(test_an_element_that_cannot_be_made_ends_with_an_error),
        cmocka_unit_test(test_an_array_without_an_answer_is_made_now),
        cmocka_unit_test(test_reply_sends_an_answer_without_lazy_arrays_as_a_body),
    };
    return cmocka_run_group_tests_name("lazy_json", tests, NULL, NULL);
}
