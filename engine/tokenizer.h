/* tokenizer.h - text to token ids and back, for the three tokenizers of
 * ../shared/MODELS.md.
 *
 * byte: the UTF-8 bytes of the text, ids 0..255.
 * char: Unicode code points looked up in the config's token list; a code
 *       point not in it, or an invalid UTF-8 sequence, maps to unk.
 * word: lower-cased maximal runs of letters (Unicode category L), decimal
 *       digits (Nd) and apostrophes (U+0027, U+2019); everything else
 *       separates words and is dropped.  Lower-casing is Unicode's full
 *       mapping (libunistring), as Python's str.lower() does.
 *
 * An invalid UTF-8 sequence is grouped as Unicode's "maximal subpart"
 * rule groups it, as Python's bytes.decode("utf-8", "replace") does: one
 * unk per group for char, a separator for word.
 */
#ifndef RRN_TOKENIZER_H
#define RRN_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

struct tokenizer {
    enum tokenizer_type type;
    int vocab;
    int unk;           /* -1 for byte */
    char **tokens;     /* borrowed from the config */
    /* Hash table from token string to id, open addressing. */
    int *table;
    size_t table_size;
};

/* The config must outlive the tokenizer.  Fails, with a message in err, on
 * duplicate, empty or invalid UTF-8 tokens, on a char token that is not
 * exactly one code point, and on an unk outside the token list. */
int tokenizer_init(struct tokenizer *tk, const struct model_config *cfg, char *err, size_t errlen);
void tokenizer_free(struct tokenizer *tk);

/* Encode len bytes of text.  *ids is malloc'd (may be NULL when *n is 0).
 * Returns 0, or -1 when out of memory. */
int tokenizer_encode(const struct tokenizer *tk, const char *text, size_t len,
                     int32_t **ids, size_t *n);
/* tokenizer_encode, and where each token starts in text: (*starts)[i] is
 * the offset of token i's first byte (a word's first letter), malloc'd
 * beside *ids (NULL with starts NULL: tokenizer_encode). */
int tokenizer_encode_spans(const struct tokenizer *tk, const char *text, size_t len, int32_t **ids,
                           size_t **starts, size_t *n);

/* The text of one token id: returns a pointer to its bytes (not
 * NUL-terminated for byte, which may be 0) and sets *outlen; NULL for an id
 * outside the vocabulary.  byte: one byte, written to out; char: the code
 * point's UTF-8; word: the word (no separator); both borrowed from the
 * config. */
const char *tokenizer_token(const struct tokenizer *tk, int32_t id, char out[8], size_t *outlen);

/* The token list of a char tokenizer for a training text: "<unk>" (id 0,
 * also what invalid UTF-8 and U+0000 map to) and then every other code
 * point the text holds, in code point order.  *tokens and its strings are malloc'd. */
int tokenizer_char_vocab(const char *text, size_t len, char ***tokens, int *n);

/* The token list of a word tokenizer for a training text: "<unk>" (id 0)
 * and then the words seen at least min_count times, most frequent first
 * (ties in byte order), at most max_size entries in all. */
int tokenizer_word_vocab(const char *text, size_t len, int max_size, int min_count, char ***tokens, int *n);

#endif
