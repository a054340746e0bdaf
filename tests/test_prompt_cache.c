/* test_prompt_cache.c - the prompt-state cache of server/prompt_cache.c on
 * its own: the longest cached prefix is found (and only a true prefix,
 * of one token too), logits come out only for a whole match, an entry is
 * kept once, the least recently used entries go when the bytes pass the
 * limit, entries found again outlast any number of one-off ones (up to
 * their share), an entry larger than the limit is not kept, and a
 * sequence of under 16 tokens is admitted the second time it is asked
 * about.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "prompt_cache.h"
#include "support/filter.h"

#define STATE 6
#define VOCAB 3
#define N 40

static int32_t tokens[N];
static float state_a[STATE] = {1, 2, 3, 4, 5, 6}, state_b[STATE] = {-1, -2, -3, -4, -5, -6};
static float logits_a[VOCAB] = {0.5f, 1.5f, 2.5f}, logits_b[VOCAB] = {9, 8, 7};

static int setup(void **state)
{
    (void)state;
    for (int i = 0; i < N; i++)
        tokens[i] = 1000 + 7 * i;
    return 0;
}

/* An entry's bytes, as a cache counts them, for a sequence of n. */
static size_t entry_bytes(int n)
{
    struct prompt_cache *probe = prompt_cache_new(1 << 20, STATE, VOCAB);
    assert_non_null(probe);
    assert_int_equal(prompt_cache_put(probe, tokens, n, state_a, 0, logits_a), 0);
    size_t bytes = prompt_cache_bytes(probe);
    prompt_cache_free(probe);
    return bytes;
}

static void test_finds_the_longest_prefix(void **unused)
{
    (void)unused;
    struct prompt_cache *pc = prompt_cache_new(1 << 20, STATE, VOCAB);
    assert_non_null(pc);
    float st[STATE], lg[VOCAB];
    int pos = -1;
    assert_int_equal(prompt_cache_find(pc, tokens, N, st, &pos, lg), 0);
    assert_int_equal(prompt_cache_put(pc, tokens, 20, state_a, 20, logits_a), 0);
    assert_int_equal(prompt_cache_put(pc, tokens, 10, state_b, 10, logits_b), 0);

    /* A whole match: state, position and logits. */
    assert_int_equal(prompt_cache_find(pc, tokens, 20, st, &pos, lg), 20);
    assert_memory_equal(st, state_a, sizeof st);
    assert_memory_equal(lg, logits_a, sizeof lg);
    assert_int_equal(pos, 20);
    /* A longer prompt: the longest prefix, and no logits. */
    const float sentinel[VOCAB] = {-7, -7, -7};
    memcpy(lg, sentinel, sizeof lg);
    assert_int_equal(prompt_cache_find(pc, tokens, N, st, &pos, lg), 20);
    assert_memory_equal(lg, sentinel, sizeof lg);
    assert_int_equal(prompt_cache_find(pc, tokens, 15, st, &pos, lg), 10);
    assert_memory_equal(st, state_b, sizeof st);
    assert_int_equal(pos, 10);
    assert_int_equal(prompt_cache_find(pc, tokens, 9, st, &pos, lg), 0);
    /* One token other than the entries' before their ends: no match. */
    int32_t other[N];
    memcpy(other, tokens, sizeof other);
    other[4] = 1;
    assert_int_equal(prompt_cache_find(pc, other, N, st, &pos, lg), 0);
    other[4] = tokens[4];
    other[12] = 1;
    assert_int_equal(prompt_cache_find(pc, other, N, st, &pos, lg), 10);

    /* Kept once. */
    size_t bytes = prompt_cache_bytes(pc);
    assert_int_equal(prompt_cache_put(pc, tokens, 20, state_b, 20, logits_b), 0);
    assert_int_equal(prompt_cache_bytes(pc), bytes);
    assert_int_equal(prompt_cache_find(pc, tokens, 20, st, &pos, lg), 20);
    assert_memory_equal(st, state_a, sizeof st);

    /* One token is an entry like any other, and a prefix of every prompt
     * that begins with it. */
    assert_int_equal(prompt_cache_put(pc, tokens, 1, state_b, 1, logits_b), 0);
    assert_int_equal(prompt_cache_find(pc, tokens, 1, st, &pos, lg), 1);
    assert_memory_equal(lg, logits_b, sizeof lg);
    assert_int_equal(prompt_cache_find(pc, tokens, 9, st, &pos, lg), 1);
    assert_memory_equal(st, state_b, sizeof st);
    prompt_cache_free(pc);
}

/* A sequence of under 16 tokens is admitted the second time it is asked
 * about; a longer one at once. */
static void test_short_sequences_admitted_when_seen_again(void **unused)
{
    (void)unused;
    struct prompt_cache *pc = prompt_cache_new(1 << 20, STATE, VOCAB);
    assert_non_null(pc);
    assert_false(prompt_cache_admits(pc, tokens, 15));
    assert_false(prompt_cache_admits(pc, tokens + 1, 15));
    assert_false(prompt_cache_admits(pc, tokens, 1));
    assert_true(prompt_cache_admits(pc, tokens, 15));
    assert_true(prompt_cache_admits(pc, tokens + 1, 15));
    assert_true(prompt_cache_admits(pc, tokens, 1));
    assert_true(prompt_cache_admits(pc, tokens + 2, 16));
    prompt_cache_free(pc);
}

static void test_least_recently_used_go_first(void **unused)
{
    (void)unused;
    size_t one = entry_bytes(10);

    /* Room for two entries of 10 tokens. */
    struct prompt_cache *pc = prompt_cache_new(2 * one + one / 2, STATE, VOCAB);
    assert_non_null(pc);
    float st[STATE], lg[VOCAB];
    int pos;
    const int32_t *x = tokens, *y = tokens + 10, *z = tokens + 20;
    assert_int_equal(prompt_cache_put(pc, x, 10, state_a, 1, logits_a), 0);
    assert_int_equal(prompt_cache_put(pc, y, 10, state_a, 2, logits_a), 0);
    assert_int_equal(prompt_cache_find(pc, x, 10, st, &pos, lg), 10); /* x used after y */
    assert_int_equal(prompt_cache_put(pc, z, 10, state_a, 3, logits_a), 0);
    assert_int_equal(prompt_cache_bytes(pc), 2 * one);
    assert_int_equal(prompt_cache_find(pc, y, 10, st, &pos, lg), 0);
    assert_int_equal(prompt_cache_find(pc, x, 10, st, &pos, lg), 10);
    assert_int_equal(pos, 1);
    assert_int_equal(prompt_cache_find(pc, z, 10, st, &pos, lg), 10);
    assert_int_equal(pos, 3);

    prompt_cache_free(pc);

    /* Larger than the whole limit: not kept, nothing evicted. */
    struct prompt_cache *small = prompt_cache_new(one, STATE, VOCAB);
    assert_non_null(small);
    assert_int_equal(prompt_cache_put(small, x, 10, state_a, 1, logits_a), 0);
    assert_int_equal(prompt_cache_put(small, tokens, N, state_b, 0, logits_b), 0);
    assert_int_equal(prompt_cache_bytes(small), one);
    assert_int_equal(prompt_cache_find(small, tokens, N, st, &pos, lg), 10);
    prompt_cache_free(small);
}

/* Entries found again are protected: a stream of one-off entries (ended
 * generations nobody continues) cannot push them out, up to the protected
 * share of the bytes, beyond which the least recently found go back on
 * probation and out first. */
static void test_entries_found_again_stay(void **unused)
{
    (void)unused;
    size_t one = entry_bytes(4);

    /* Room for 5 entries of 4 tokens, 4 of them protected. */
    struct prompt_cache *pc = prompt_cache_new(5 * one + one / 2, STATE, VOCAB);
    assert_non_null(pc);
    float st[STATE], lg[VOCAB];
    int pos;
    const int32_t *kept = tokens; /* tokens[0..4) */
    assert_int_equal(prompt_cache_put(pc, kept, 4, state_a, 1, logits_a), 0);
    assert_int_equal(prompt_cache_find(pc, kept, 4, st, &pos, lg), 4);
    for (int i = 1; i < 9; i++) /* 8 one-off entries, each of tokens[4i..4i+4) */
        assert_int_equal(prompt_cache_put(pc, tokens + 4 * i, 4, state_b, 0, logits_b), 0);
    assert_int_equal(prompt_cache_find(pc, kept, 4, st, &pos, lg), 4);
    assert_int_equal(pos, 1);
    assert_int_equal(prompt_cache_find(pc, tokens + 4, 4, st, &pos, lg), 0);  /* long gone */
    assert_int_equal(prompt_cache_find(pc, tokens + 32, 4, st, &pos, lg), 4); /* the newest */

    /* Found again, five entries: the least recently found of them goes back
     * on probation, and then out before the other four. */
    for (int i = 5; i < 9; i++)
        assert_int_equal(prompt_cache_find(pc, tokens + 4 * i, 4, st, &pos, lg), 4);
    assert_int_equal(prompt_cache_put(pc, tokens + 4, 4, state_b, 0, logits_b), 0);
    assert_int_equal(prompt_cache_put(pc, tokens + 8, 4, state_b, 0, logits_b), 0);
    assert_int_equal(prompt_cache_find(pc, kept, 4, st, &pos, lg), 0);
    for (int i = 5; i < 9; i++)
        assert_int_equal(prompt_cache_find(pc, tokens + 4 * i, 4, st, &pos, lg), 4);
    prompt_cache_free(pc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_finds_the_longest_prefix),
        cmocka_unit_test(test_short_sequences_admitted_when_seen_again),
        cmocka_unit_test(test_least_recently_used_go_first),
        cmocka_unit_test(test_entries_found_again_stay),
    };
    test_filter_from_env();
    return cmocka_run_group_tests_name("prompt_cache", tests, setup, NULL);
}
