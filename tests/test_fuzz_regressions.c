/* test_fuzz_regressions.c - every crash the fuzz targets of fuzz/ found,
 * replayed as a cmocka test on the fixed code, so it stays fixed.  Each
 * test names its target and the input (also a seed under fuzz/corpus/).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "tokenizer.h"
#include "support/filter.h"

/* fuzz_tokenizer, fuzz/corpus/tokenizer/crash_nul_in_char_vocab.bin: "A"
 * and 59 NUL bytes.  tokenizer_char_vocab listed U+0000 as a token, whose
 * C string is empty, so the vocabulary it made for a training text holding
 * a NUL byte was refused by tokenizer_init ("token 1 is empty").  U+0000
 * now maps to unk, as in encoding. */
static void test_char_vocab_of_nul_bytes(void **state)
{
    (void)state;
    char text[60] = "A";
    char **tokens;
    int n;
    assert_int_equal(tokenizer_char_vocab(text, sizeof text, &tokens, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(tokens[0], "<unk>");
    assert_string_equal(tokens[1], "A");
    struct model_config cfg = {.tok_type = TOKENIZER_CHAR, .n_tokens = n, .tokens = tokens, .unk = 0};
    struct tokenizer tk;
    char err[256];
    assert_int_equal(tokenizer_init(&tk, &cfg, err, sizeof err), 0);
    int32_t *ids;
    size_t len;
    assert_int_equal(tokenizer_encode(&tk, text, 3, &ids, &len), 0);
    assert_int_equal(len, 3);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 0);
    assert_int_equal(ids[2], 0);
    free(ids);
    tokenizer_free(&tk);
    for (int i = 0; i < n; i++)
        free(tokens[i]);
    free(tokens);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_char_vocab_of_nul_bytes),
    };
    return cmocka_run_group_tests_name("fuzz regressions", tests, NULL, NULL);
}
