/* fuzz_tokenizer.c - libFuzzer target for the three tokenizers
 * (engine/tokenizer.c) on arbitrary bytes.
 *
 * The byte, char and word tokenizers of the fixtures tok_byte, tok_char and
 * tok_word_lm (their configs read from tests/fixtures, so run from the
 * repository root) encode the input; every id must be in the vocabulary
 * and decode.  The input also goes through the training vocabularies
 * (tokenizer_char_vocab, tokenizer_word_vocab), whose token lists must
 * make a valid tokenizer that encodes the same input.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "safetensors.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const fixtures[] = {"tests/fixtures/tok_byte.safetensors", "tests/fixtures/tok_char.safetensors",
                                       "tests/fixtures/tok_word_lm.safetensors"};
#define N_FIXTURES (sizeof fixtures / sizeof fixtures[0])

static struct model_config cfgs[N_FIXTURES];
static struct tokenizer tks[N_FIXTURES];
static int ready;

static void load_fixtures(void)
{
    char err[512];
    for (size_t i = 0; i < N_FIXTURES; i++) {
        struct st_file f;
        const char *json;
        if (st_open(fixtures[i], &f, err, sizeof err) != 0 || !(json = st_meta_get(&f, "config")) ||
            config_parse(json, &cfgs[i], err, sizeof err) != 0 || tokenizer_init(&tks[i], &cfgs[i], err, sizeof err) != 0) {
            fprintf(stderr, "fuzz_tokenizer: %s: %s (run from the repository root)\n", fixtures[i], err);
            exit(1);
        }
        st_close(&f);
    }
    ready = 1;
}

/* Encodes the input and decodes every id. */
static void encode(const struct tokenizer *tk, const uint8_t *data, size_t size)
{
    int32_t *ids = NULL;
    size_t n = 0;
    if (tokenizer_encode(tk, (const char *)data, size, &ids, &n) != 0)
        abort();
    if (tk->type == TOKENIZER_BYTE && n != size)
        abort();
    for (size_t i = 0; i < n; i++) {
        char out[8];
        size_t len = 0;
        if (ids[i] < 0 || ids[i] >= tk->vocab || !tokenizer_token(tk, ids[i], out, &len))
            abort();
        if (tk->type == TOKENIZER_BYTE && (len != 1 || (uint8_t)out[0] != data[i]))
            abort();
    }
    free(ids);
}

/* A tokenizer from a token list the training code made from the input. */
static void from_vocab(enum tokenizer_type type, char **tokens, int n, const uint8_t *data, size_t size)
{
    char err[512];
    struct model_config cfg = {.tok_type = type, .n_tokens = n, .tokens = tokens, .unk = 0};
    struct tokenizer tk;
    if (tokenizer_init(&tk, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, "a trained vocabulary makes no tokenizer: %s\n", err);
        abort();
    }
    encode(&tk, data, size);
    tokenizer_free(&tk);
    for (int i = 0; i < n; i++)
        free(tokens[i]);
    free(tokens);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ready)
        load_fixtures();
    for (size_t i = 0; i < N_FIXTURES; i++)
        encode(&tks[i], data, size);
    char **tokens;
    int n;
    if (tokenizer_char_vocab((const char *)data, size, &tokens, &n) != 0)
        abort();
    from_vocab(TOKENIZER_CHAR, tokens, n, data, size);
    if (tokenizer_word_vocab((const char *)data, size, 64, 1, &tokens, &n) != 0)
        abort();
    from_vocab(TOKENIZER_WORD, tokens, n, data, size);
    return 0;
}
