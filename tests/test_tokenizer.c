/* test_tokenizer.c - the byte, char and word tokenizers against hand-worked
 * token ids, including multibyte and invalid UTF-8 (and Python's decoder on
 * every edge of UTF-8's ranges), Unicode lower-casing, init failures and a
 * 100k-word vocabulary. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tokenizer.h"
#include "support/filter.h"

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static struct model_config make_config(enum tokenizer_type type, char **tokens, int n, int unk)
{
    struct model_config cfg;

    memset(&cfg, 0, sizeof cfg);
    cfg.tok_type = type;
    cfg.tokens = tokens;
    cfg.n_tokens = n;
    cfg.unk = unk;
    return cfg;
}

static void init_ok(struct tokenizer *tk, const struct model_config *cfg)
{
    char err[256] = "";

    if (tokenizer_init(tk, cfg, err, sizeof err) != 0)
        fail_msg("tokenizer_init failed: %s", err);
}

/* Encode text and compare with the expected ids. */
static void expect_ids(const struct tokenizer *tk, const char *text, size_t len,
                       const int32_t *want, size_t n_want)
{
    int32_t *ids = NULL;
    size_t n = 99;

    assert_int_equal(tokenizer_encode(tk, text, len, &ids, &n), 0);
    assert_int_equal(n, n_want);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] != want[i])
            fail_msg("\"%.*s\": id %zu is %d, want %d", (int)len, text, i, (int)ids[i],
                     (int)want[i]);
    }
    free(ids);
}

static void expect_empty(const struct tokenizer *tk, const char *text, size_t len)
{
    static int32_t sentinel;
    int32_t *ids = &sentinel;
    size_t n = 99;

    assert_int_equal(tokenizer_encode(tk, text, len, &ids, &n), 0);
    assert_int_equal(n, 0);
    assert_null(ids);
}

/* tokenizer_token(id) as a NUL-terminated string, for comparisons. */
static void token_text(const struct tokenizer *tk, int32_t id, char *dst, size_t dstlen)
{
    char out[8];
    size_t len = 0;
    const char *s = tokenizer_token(tk, id, out, &len);

    assert_non_null(s);
    assert_true(len < dstlen);
    memcpy(dst, s, len);
    dst[len] = '\0';
}

static void test_byte_ids(void **state)
{
    (void)state;
    struct model_config cfg = make_config(TOKENIZER_BYTE, NULL, 0, 0);
    struct tokenizer tk;
    static const int32_t want[] = {104, 195, 169, 108, 108, 111};
    static const int32_t with_nul_and_high[] = {0, 255, 128, 10};

    init_ok(&tk, &cfg);
    assert_int_equal(tk.vocab, 256);
    expect_ids(&tk, "h\xc3\xa9llo", 6, want, COUNT(want));
    /* Invalid UTF-8 is no concern of the byte tokenizer. */
    expect_ids(&tk, "\0\xff\x80\n", 4, with_nul_and_high, COUNT(with_nul_and_high));
    tokenizer_free(&tk);
}

static void test_byte_inverse(void **state)
{
    (void)state;
    struct model_config cfg = make_config(TOKENIZER_BYTE, NULL, 0, 0);
    struct tokenizer tk;
    static const char text[] = "h\xc3\xa9\0\xff!";
    char out[8];
    char rebuilt[sizeof text];
    size_t len = 0;
    int32_t *ids;
    size_t n;

    init_ok(&tk, &cfg);
    assert_int_equal(tokenizer_encode(&tk, text, sizeof text - 1, &ids, &n), 0);
    assert_int_equal(n, sizeof text - 1);
    for (size_t i = 0; i < n; i++) {
        const char *s = tokenizer_token(&tk, ids[i], out, &len);
        assert_non_null(s);
        assert_int_equal(len, 1);
        rebuilt[i] = s[0];
    }
    assert_memory_equal(rebuilt, text, n);
    free(ids);
    assert_null(tokenizer_token(&tk, 256, out, &len));
    assert_null(tokenizer_token(&tk, -1, out, &len));
    tokenizer_free(&tk);
}

static char *char_vocab[] = {
    "?",                 /* 0: unk, one code point like every char token */
    "h",                 /* 1 */
    "\xc3\xa9",          /* 2: é */
    "l",                 /* 3 */
    "o",                 /* 4 */
    "\xe2\x80\x94",      /* 5: em dash */
    "\xf0\x9f\x98\x80",  /* 6: grinning face */
    " ",                 /* 7 */
};

static void test_char_ids(void **state)
{
    (void)state;
    struct model_config cfg = make_config(TOKENIZER_CHAR, char_vocab, COUNT(char_vocab), 0);
    struct tokenizer tk;
    /* "héllo — 😀x": x and the U+00E8 (è) are not in the vocabulary. */
    static const char text[] = "h\xc3\xa9llo \xe2\x80\x94 \xf0\x9f\x98\x80x\xc3\xa8";
    static const int32_t want[] = {1, 2, 3, 3, 4, 7, 5, 7, 6, 0, 0};

    init_ok(&tk, &cfg);
    assert_int_equal(tk.vocab, 8);
    expect_ids(&tk, text, sizeof text - 1, want, COUNT(want));
    tokenizer_free(&tk);
}

static void test_char_invalid_utf8(void **state)
{
    (void)state;
    char *vocab[] = {"?", "a", "b"};
    struct model_config cfg = make_config(TOKENIZER_CHAR, vocab, 3, 0);
    struct tokenizer tk;

    init_ok(&tk, &cfg);
    {
        /* A lone continuation byte and a byte never used in UTF-8. */
        static const int32_t want[] = {1, 0, 2, 0, 1};
        expect_ids(&tk, "a\x80" "b\xff" "a", 5, want, COUNT(want));
    }
    {
        /* A truncated 3-byte sequence is one unk, and the byte that broke
         * it is read again on its own. */
        static const int32_t want[] = {1, 0, 2};
        expect_ids(&tk, "a\xe2\x80" "b", 4, want, COUNT(want));
        /* So is one at the top of the ranges: lead byte 0xEF, continuation
         * byte 0xBF (Python: b"a\xef\xbfb" has one U+FFFD). */
        expect_ids(&tk, "a\xef\xbf" "b", 4, want, COUNT(want));
    }
    {
        /* An encoded surrogate and an overlong '/' are one unk per byte, as
         * in Python: b"\xed\xa0\x80".decode("utf-8", "replace") has three
         * U+FFFD. */
        static const int32_t want[] = {0, 0, 0, 1, 0, 0};
        expect_ids(&tk, "\xed\xa0\x80" "a\xc0\xaf", 6, want, COUNT(want));
    }
    {
        /* A code point past U+10FFFF, and a 4-byte sequence cut off by the
         * end of the text. */
        static const int32_t want[] = {0, 0, 0, 0, 2, 0};
        expect_ids(&tk, "\xf4\x90\x80\x80" "b\xf0\x9f\x98", 8, want, COUNT(want));
    }
    tokenizer_free(&tk);
}

/* Where the char tokenizer starts each token of 3,812 byte strings valid,
 * invalid and cut short at every edge of UTF-8's ranges, against where
 * Python's decoder, errors replaced, starts each character
 * (tests/fixtures/make_utf8_cases.py wrote them): one unknown token a
 * maximal subpart. */
static void test_char_utf8_edges_as_python(void **state)
{
    (void)state;
    char *vocab[] = {"?", "a"};
    struct model_config cfg = make_config(TOKENIZER_CHAR, vocab, 2, 0);
    struct tokenizer tk;
    init_ok(&tk, &cfg);
    FILE *f = fopen("tests/fixtures/utf8_cases.txt", "r");
    assert_non_null(f);
    char hex[32], want[16];
    int cases = 0;
    while (fscanf(f, "%31s %15s", hex, want) == 2) {
        char text[16];
        size_t len = strlen(hex) / 2, n = 0, *starts = NULL;
        int32_t *ids = NULL;
        for (size_t i = 0; i < len; i++) {
            unsigned byte;
            assert_int_equal(sscanf(hex + 2 * i, "%2x", &byte), 1);
            text[i] = (char)byte;
        }
        assert_int_equal(tokenizer_encode_spans(&tk, text, len, &ids, &starts, &n), 0);
        char got[16] = "";
        for (size_t i = 0; i < n && i < sizeof got - 1; i++)
            got[i] = "0123456789abcdef"[starts[i] & 15];
        if (strcmp(got, want) != 0)
            fail_msg("%s: tokens start at %s, Python's characters at %s", hex, got, want);
        free(ids);
        free(starts);
        cases++;
    }
    fclose(f);
    assert_int_equal(cases, 3812);
    tokenizer_free(&tk);
}

/* A training text's word vocabulary: "<unk>", then the words seen at
 * least min_count times, most frequent first and ties in byte order, at
 * most max_size entries in all; here a 4, b 3, c 2, e 1 and d 1. */
static void test_word_vocab_limits(void **state)
{
    (void)state;
    static const char text[] = "e B a c a b A d c b a";
    static const struct {
        int max_size, min_count;
        const char *want; /* the tokens, space-separated */
    } cases[] = {
        {100, 1, "<unk> a b c d e"}, {100, 2, "<unk> a b c"}, {100, 3, "<unk> a b"},
        {3, 1, "<unk> a b"},         {6, 1, "<unk> a b c d e"}, {1, 1, "<unk>"},
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        char **tokens = NULL, got[64] = "";
        int n = 0;
        assert_int_equal(tokenizer_word_vocab(text, strlen(text), cases[i].max_size, cases[i].min_count, &tokens, &n),
                         0);
        for (int k = 0; k < n; k++) {
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%s", k ? " " : "", tokens[k]);
            free(tokens[k]);
        }
        free(tokens);
        if (strcmp(got, cases[i].want) != 0)
            fail_msg("max_size %d, min_count %d: \"%s\", want \"%s\"", cases[i].max_size, cases[i].min_count, got,
                     cases[i].want);
    }
}

static void test_char_inverse(void **state)
{
    (void)state;
    struct model_config cfg = make_config(TOKENIZER_CHAR, char_vocab, COUNT(char_vocab), 0);
    struct tokenizer tk;
    static const char text[] = "h\xc3\xa9l \xe2\x80\x94\xf0\x9f\x98\x80";
    char rebuilt[64] = "";
    char piece[16];
    int32_t *ids;
    size_t n;
    char out[8];
    size_t len;

    init_ok(&tk, &cfg);
    assert_int_equal(tokenizer_encode(&tk, text, sizeof text - 1, &ids, &n), 0);
    assert_int_equal(n, 6);
    for (size_t i = 0; i < n; i++) {
        token_text(&tk, ids[i], piece, sizeof piece);
        strcat(rebuilt, piece);
    }
    assert_string_equal(rebuilt, text);
    free(ids);
    token_text(&tk, 6, piece, sizeof piece);
    assert_string_equal(piece, "\xf0\x9f\x98\x80");
    assert_null(tokenizer_token(&tk, 8, out, &len));
    tokenizer_free(&tk);
}

static char *word_vocab[] = {
    "<unk>",                 /* 0 */
    "don't",                 /* 1 */
    "stop",                  /* 2 */
    "42",                    /* 3 */
    "times",                 /* 4 */
    "\xc3\xa9" "clair\xe2\x80\x99s", /* 5: éclair’s */
    "i\xcc\x87stanbul",      /* 6: istanbul with U+0307, from İ lowered */
    "\xce\xbf\xce\xb4\xce\xbf\xcf\x82", /* 7: οδος, final sigma */
    "stra\xc3\x9f" "e",      /* 8: straße */
    "\xd9\xa4\xd9\xa2",      /* 9: Arabic-Indic digits ٤٢ (Nd) */
};

static void test_word_ids(void **state)
{
    (void)state;
    struct model_config cfg = make_config(TOKENIZER_WORD, word_vocab, COUNT(word_vocab), 0);
    struct tokenizer tk;

    init_ok(&tk, &cfg);
    {
        static const char text[] = "Don't STOP 42 times, \xc3\x89" "clair\xe2\x80\x99s!";
        static const int32_t want[] = {1, 2, 3, 4, 5};
        expect_ids(&tk, text, sizeof text - 1, want, COUNT(want));
    }
    {
        /* Separators are any non-word character, several in a row, at both
         * ends; "stop42" is one word, and unknown words are unk. */
        static const char text[] = "--stop42...TIMES\ttimes\xe2\x80\x94" "dont  ";
        static const int32_t want[] = {0, 4, 4, 0};
        expect_ids(&tk, text, sizeof text - 1, want, COUNT(want));
    }
    {
        /* Full lower-casing: İ becomes i + U+0307, a final capital sigma
         * becomes ς, and ß is already lower case.  U+00B2 (superscript two,
         * category No) separates; Arabic-Indic digits are Nd. */
        static const char text[] =
            "\xc4\xb0STANBUL \xce\x9f\xce\x94\xce\x9f\xce\xa3 STRA\xc3\x9f" "E "
            "42\xc2\xb2" "42 \xd9\xa4\xd9\xa2";
        static const int32_t want[] = {6, 7, 8, 3, 3, 9};
        expect_ids(&tk, text, sizeof text - 1, want, COUNT(want));
    }
    {
        /* Invalid UTF-8 separates words. */
        static const int32_t want[] = {2, 4};
        expect_ids(&tk, "stop\xff" "times", 10, want, COUNT(want));
    }
    {
        /* An apostrophe alone is a word (an unknown one here). */
        static const int32_t want[] = {2, 0};
        expect_ids(&tk, "stop ' ", 7, want, COUNT(want));
    }
    tokenizer_free(&tk);
}

static void test_word_long_word(void **state)
{
    (void)state;
    /* A word longer than the lower-casing scratch buffer. */
    enum { LEN = 1000 };
    char *upper = malloc(LEN + 1);
    char *lower = malloc(LEN + 1);
    assert_non_null(upper);
    assert_non_null(lower);
    for (int i = 0; i < LEN; i++) {
        upper[i] = (char)('A' + i % 26);
        lower[i] = (char)('a' + i % 26);
    }
    upper[LEN] = lower[LEN] = '\0';
    char *vocab[] = {"<unk>", lower};
    struct model_config cfg = make_config(TOKENIZER_WORD, vocab, 2, 0);
    struct tokenizer tk;
    static const int32_t want[] = {1, 0};

    init_ok(&tk, &cfg);
    char *text = malloc(2 * LEN + 2);
    assert_non_null(text);
    snprintf(text, 2 * LEN + 2, "%s %.*s", upper, LEN - 1, upper);
    expect_ids(&tk, text, strlen(text), want, COUNT(want));
    free(text);
    tokenizer_free(&tk);
    free(upper);
    free(lower);
}

static void test_word_inverse(void **state)
{
    (void)state;
    struct model_config cfg = make_config(TOKENIZER_WORD, word_vocab, COUNT(word_vocab), 0);
    struct tokenizer tk;
    char piece[32];
    int32_t *ids;
    size_t n;
    char out[8];
    size_t len;

    init_ok(&tk, &cfg);
    for (int id = 0; id < (int)COUNT(word_vocab); id++) {
        token_text(&tk, id, piece, sizeof piece);
        assert_string_equal(piece, word_vocab[id]);
        /* Each word, encoded on its own, gives back its id; except
         * i\xcc\x87stanbul: lower-casing İ makes a combining mark (Mn),
         * which typed as it is separates, as the rules say. */
        if (id == 0 || id == 6)
            continue;
        assert_int_equal(tokenizer_encode(&tk, piece, strlen(piece), &ids, &n), 0);
        assert_int_equal(n, 1);
        assert_int_equal(ids[0], id);
        free(ids);
    }
    {
        static const int32_t want[] = {0, 0};
        expect_ids(&tk, word_vocab[6], strlen(word_vocab[6]), want, COUNT(want));
    }
    assert_null(tokenizer_token(&tk, (int32_t)COUNT(word_vocab), out, &len));
    assert_null(tokenizer_token(&tk, -5, out, &len));
    tokenizer_free(&tk);
}

/* Where each token starts: the ids are tokenizer_encode's, and each start
 * the byte offset of the token's first byte (a word's first letter, before
 * lower-casing). */
static void expect_spans(const struct model_config *cfg, const char *text, const size_t *want, size_t n_want)
{
    struct tokenizer tk;
    int32_t *ids, *plain;
    size_t *starts, n, n_plain;
    init_ok(&tk, cfg);
    assert_int_equal(tokenizer_encode_spans(&tk, text, strlen(text), &ids, &starts, &n), 0);
    assert_int_equal(tokenizer_encode(&tk, text, strlen(text), &plain, &n_plain), 0);
    assert_int_equal(n, n_want);
    assert_int_equal(n_plain, n);
    assert_memory_equal(ids, plain, n * sizeof *ids);
    for (size_t i = 0; i < n; i++)
        if (starts[i] != want[i])
            fail_msg("\"%s\": token %zu starts at %zu, want %zu", text, i, starts[i], want[i]);
    free(ids);
    free(plain);
    free(starts);
    tokenizer_free(&tk);
}

static void test_spans(void **state)
{
    (void)state;
    struct model_config bytes = make_config(TOKENIZER_BYTE, NULL, 0, 0);
    static const size_t byte_starts[] = {0, 1, 2, 3};
    expect_spans(&bytes, "h\xc3\xa9!", byte_starts, COUNT(byte_starts));
    struct model_config chars = make_config(TOKENIZER_CHAR, char_vocab, COUNT(char_vocab), 0);
    static const size_t char_starts[] = {0, 1, 3, 4, 5, 6, 7, 10, 11, 15, 16};
    expect_spans(&chars, "h\xc3\xa9llo \xe2\x80\x94 \xf0\x9f\x98\x80x\xc3\xa8", char_starts, COUNT(char_starts));
    struct model_config words = make_config(TOKENIZER_WORD, word_vocab, COUNT(word_vocab), 0);
    static const size_t word_starts[] = {2, 8, 13, 16, 23};
    expect_spans(&words, "  Don't STOP 42 times, \xc3\x89" "clair\xe2\x80\x99s!", word_starts, COUNT(word_starts));
}

static void test_empty_text(void **state)
{
    (void)state;
    char *chars[] = {"?", "a"};
    char *words[] = {"<unk>", "a"};
    struct model_config cfgs[] = {
        make_config(TOKENIZER_BYTE, NULL, 0, 0),
        make_config(TOKENIZER_CHAR, chars, 2, 0),
        make_config(TOKENIZER_WORD, words, 2, 0),
    };

    for (size_t i = 0; i < COUNT(cfgs); i++) {
        struct tokenizer tk;
        init_ok(&tk, &cfgs[i]);
        expect_empty(&tk, "", 0);
        expect_empty(&tk, NULL, 0);
        if (cfgs[i].tok_type == TOKENIZER_WORD)
            expect_empty(&tk, " ,.!?\xe2\x80\x94\xff", 8); /* separators only */
        tokenizer_free(&tk);
    }
}

/* tokenizer_init fails and err names the problem. */
static void expect_init_error(const struct model_config *cfg, const char *needle)
{
    struct tokenizer tk;
    char err[256] = "";

    assert_int_equal(tokenizer_init(&tk, cfg, err, sizeof err), -1);
    if (strstr(err, needle) == NULL)
        fail_msg("error \"%s\" does not mention \"%s\"", err, needle);
    /* A failed init leaves nothing to free, and freeing again is safe. */
    tokenizer_free(&tk);
}

static void test_init_errors(void **state)
{
    (void)state;
    {
        char *vocab[] = {"<unk>", "a", "b", "a"};
        struct model_config cfg = make_config(TOKENIZER_WORD, vocab, 4, 0);
        expect_init_error(&cfg, "duplicate token \"a\" (ids 1 and 3)");
    }
    {
        char *vocab[] = {"?", "\xc3\xa9", "\xc3\xa9"};
        struct model_config cfg = make_config(TOKENIZER_CHAR, vocab, 3, 0);
        expect_init_error(&cfg, "duplicate");
    }
    {
        /* The unk entry may have any name; another entry may not. */
        char *vocab[] = {"<unk>", "a", "<s>"};
        struct model_config cfg = make_config(TOKENIZER_CHAR, vocab, 3, 0);
        expect_init_error(&cfg, "token 2 (\"<s>\") is not exactly one code point");
    }
    {
        /* e + combining acute: one grapheme, two code points. */
        char *vocab[] = {"?", "e\xcc\x81"};
        struct model_config cfg = make_config(TOKENIZER_CHAR, vocab, 2, 0);
        expect_init_error(&cfg, "token 1");
    }
    {
        char *vocab[] = {"?", "\xff"};
        struct model_config cfg = make_config(TOKENIZER_CHAR, vocab, 2, 0);
        expect_init_error(&cfg, "token 1 is not valid UTF-8");
    }
    {
        char *vocab[] = {"<unk>", "ok", "bad\xed\xa0\x80"};
        struct model_config cfg = make_config(TOKENIZER_WORD, vocab, 3, 0);
        expect_init_error(&cfg, "token 2 is not valid UTF-8");
    }
    {
        char *vocab[] = {"<unk>", ""};
        struct model_config cfg = make_config(TOKENIZER_WORD, vocab, 2, 0);
        expect_init_error(&cfg, "token 1 is empty");
    }
    {
        char *vocab[] = {"<unk>", "a"};
        struct model_config cfg = make_config(TOKENIZER_WORD, vocab, 2, 2);
        expect_init_error(&cfg, "unk id 2");
    }
    {
        struct model_config cfg = make_config(TOKENIZER_CHAR, NULL, 0, 0);
        expect_init_error(&cfg, "non-empty token list");
    }
}

static void test_large_vocab(void **state)
{
    (void)state;
    enum { N = 100000 };
    char **vocab = calloc(N, sizeof *vocab);
    assert_non_null(vocab);
    vocab[0] = strdup("<unk>");
    assert_non_null(vocab[0]);
    for (int i = 1; i < N; i++) {
        char word[32];
        snprintf(word, sizeof word, "w%d", i);
        vocab[i] = strdup(word);
        assert_non_null(vocab[i]);
    }
    struct model_config cfg = make_config(TOKENIZER_WORD, vocab, N, 0);
    struct tokenizer tk;

    init_ok(&tk, &cfg);
    assert_true(tk.table_size >= 2 * (size_t)N);

    /* Every word, upper-cased in the text, finds its own id. */
    size_t cap = (size_t)N * 8;
    char *text = malloc(cap);
    assert_non_null(text);
    size_t len = 0;
    for (int i = 1; i < N; i++)
        len += (size_t)snprintf(text + len, cap - len, "W%d ", i);
    len += (size_t)snprintf(text + len, cap - len, "w%d w0", N);
    int32_t *ids;
    size_t n;
    assert_int_equal(tokenizer_encode(&tk, text, len, &ids, &n), 0);
    assert_int_equal(n, N + 1);
    for (int i = 1; i < N; i++) {
        if (ids[i - 1] != i)
            fail_msg("w%d has id %d", i, (int)ids[i - 1]);
    }
    assert_int_equal(ids[N - 1], 0); /* w100000: one past the end */
    assert_int_equal(ids[N], 0);     /* w0: never in the list */
    free(ids);
    free(text);
    tokenizer_free(&tk);
    for (int i = 0; i < N; i++)
        free(vocab[i]);
    free(vocab);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_byte_ids),
        cmocka_unit_test(test_byte_inverse),
        cmocka_unit_test(test_char_ids),
        cmocka_unit_test(test_char_invalid_utf8),
        cmocka_unit_test(test_char_utf8_edges_as_python),
        cmocka_unit_test(test_word_vocab_limits),
        cmocka_unit_test(test_char_inverse),
        cmocka_unit_test(test_word_ids),
        cmocka_unit_test(test_word_long_word),
        cmocka_unit_test(test_word_inverse),
        cmocka_unit_test(test_spans),
        cmocka_unit_test(test_empty_text),
        cmocka_unit_test(test_init_errors),
        cmocka_unit_test(test_large_vocab),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
