/* tokenizer.c - the byte, char and word tokenizers of engine/tokenizer.h.
 *
 * Token strings are found through an open-addressing hash table built once
 * at init, so encoding is O(1) per token whatever the vocabulary size.
 * UTF-8 decoding, Unicode categories and lower-casing come from
 * libunistring.
 */
#include "error.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unicase.h>
#include <unictype.h>
#include <unistr.h>

#define TABLE_EMPTY (-1)
#define BYTE_VOCAB 256

/* FNV-1a, 64 bit: cheap, and spreads short similar strings ("w1", "w2")
 * well enough for linear probing. */
static uint64_t hash_bytes(const uint8_t *s, size_t len)
{
    uint64_t h = 14695981039346656037ULL;

    for (size_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* s may hold NUL bytes (a char tokenizer sees U+0000), so compare
 * lengths first rather than trusting strncmp to stop at the right place. */
static int token_equals(const char *token, const uint8_t *s, size_t len)
{
    return strnlen(token, len + 1) == len && memcmp(token, s, len) == 0;
}

/* The slot holding s, or the empty slot where it would go. */
static size_t table_slot(const struct tokenizer *tk, const uint8_t *s, size_t len)
{
    size_t mask = tk->table_size - 1;
    size_t i = (size_t)hash_bytes(s, len) & mask;

    while (tk->table[i] != TABLE_EMPTY && !token_equals(tk->tokens[tk->table[i]], s, len))
        i = (i + 1) & mask;
    return i;
}

static int32_t lookup(const struct tokenizer *tk, const uint8_t *s, size_t len)
{
    int id = tk->table[table_slot(tk, s, len)];

    return id == TABLE_EMPTY ? tk->unk : id;
}

/* Length of the invalid sequence at s, following Unicode's "maximal
 * subpart" practice (the same grouping as Python's
 * bytes.decode("utf-8", "replace") and WHATWG): a lead byte plus the
 * continuation bytes that could still begin a well-formed sequence.  So an
 * encoded surrogate "\xed\xa0\x80" is three invalid units, not one, which
 * is where libunistring's u8_mbtouc groups differently. */
static size_t invalid_length(const uint8_t *s, size_t len)
{
    uint8_t lead = s[0];
    uint8_t lo = 0x80, hi = 0xBF;
    size_t need;

    if (lead >= 0xC2 && lead <= 0xDF)
        need = 2;
    else if (lead >= 0xE0 && lead <= 0xEF)
        need = 3;
    else if (lead >= 0xF0 && lead <= 0xF4)
        need = 4;
    else
        return 1;
    if (lead == 0xE0)
        lo = 0xA0;
    else if (lead == 0xED)
        hi = 0x9F;
    else if (lead == 0xF0)
        lo = 0x90;
    else if (lead == 0xF4)
        hi = 0x8F;

    size_t n = 1;
    while (n < need && n < len && s[n] >= lo && s[n] <= hi) {
        n++;
        lo = 0x80;
        hi = 0xBF;
    }
    return n;
}

/* Decode one code point at s; returns the number of bytes it covers and
 * sets *valid to 0 when they are an invalid sequence instead. */
static size_t next_char(const uint8_t *s, size_t len, ucs4_t *uc, int *valid)
{
    int n = u8_mbtoucr(uc, s, len);

    if (n > 0) {
        *valid = 1;
        return (size_t)n;
    }
    *valid = 0;
    return invalid_length(s, len);
}

static int is_word_char(ucs4_t uc)
{
    return uc == 0x27 || uc == 0x2019 || uc_is_general_category(uc, UC_CATEGORY_L) ||
           uc_is_general_category(uc, UC_CATEGORY_Nd);
}

static int check_tokens(const struct tokenizer *tk, char *err, size_t errlen)
{
    for (int id = 0; id < tk->vocab; id++) {
        const uint8_t *s = (const uint8_t *)tk->tokens[id];
        size_t len;

        if (s == NULL) {
            error_fmt(err, errlen, "tokenizer: token %d is missing", id);
            return -1;
        }
        len = strlen((const char *)s);
        if (len == 0) {
            error_fmt(err, errlen, "tokenizer: token %d is empty", id);
            return -1;
        }
        if (u8_check(s, len) != NULL) {
            error_fmt(err, errlen, "tokenizer: token %d is not valid UTF-8", id);
            return -1;
        }
        /* The unk entry is never looked up, so it may have any name
         * ("<unk>" is common); every other char token must be matchable. */
        if (tk->type == TOKENIZER_CHAR && id != tk->unk && u8_mbsnlen(s, len) != 1) {
            error_fmt(err, errlen,
                    "tokenizer: char token %d (\"%s\") is not exactly one code point", id,
                    (const char *)s);
            return -1;
        }
    }
    return 0;
}

static int build_table(struct tokenizer *tk, char *err, size_t errlen)
{
    size_t size = 16;

    /* At most half full, so probe runs stay short. */
    while (size < 2 * (size_t)tk->vocab)
        size *= 2;
    tk->table = malloc(size * sizeof *tk->table);
    if (tk->table == NULL) {
        error_fmt(err, errlen, "tokenizer: out of memory for %d tokens", tk->vocab);
        return -1;
    }
    tk->table_size = size;
    for (size_t i = 0; i < size; i++)
        tk->table[i] = TABLE_EMPTY;

    for (int id = 0; id < tk->vocab; id++) {
        const uint8_t *s = (const uint8_t *)tk->tokens[id];
        size_t slot = table_slot(tk, s, strlen(tk->tokens[id]));

        if (tk->table[slot] != TABLE_EMPTY) {
            error_fmt(err, errlen, "tokenizer: duplicate token \"%s\" (ids %d and %d)",
                    tk->tokens[id], tk->table[slot], id);
            return -1;
        }
        tk->table[slot] = id;
    }
    return 0;
}

int tokenizer_init(struct tokenizer *tk, const struct model_config *cfg, char *err, size_t errlen)
{
    memset(tk, 0, sizeof *tk);
    tk->type = cfg->tok_type;
    if (cfg->tok_type == TOKENIZER_BYTE) {
        tk->vocab = BYTE_VOCAB;
        tk->unk = -1;
        return 0;
    }
    if (cfg->tok_type != TOKENIZER_CHAR && cfg->tok_type != TOKENIZER_WORD) {
        error_fmt(err, errlen, "tokenizer: unknown tokenizer type %d", (int)cfg->tok_type);
        return -1;
    }
    if (cfg->n_tokens < 1 || cfg->tokens == NULL) {
        error_fmt(err, errlen, "tokenizer: a %s tokenizer needs a non-empty token list",
                cfg->tok_type == TOKENIZER_CHAR ? "char" : "word");
        return -1;
    }
    if (cfg->unk < 0 || cfg->unk >= cfg->n_tokens) {
        error_fmt(err, errlen, "tokenizer: unk id %d is outside the %d tokens", cfg->unk,
                cfg->n_tokens);
        return -1;
    }
    tk->vocab = cfg->n_tokens;
    tk->unk = cfg->unk;
    tk->tokens = cfg->tokens;
    if (check_tokens(tk, err, errlen) != 0 || build_table(tk, err, errlen) != 0) {
        tokenizer_free(tk);
        return -1;
    }
    return 0;
}

void tokenizer_free(struct tokenizer *tk)
{
    free(tk->table);
    memset(tk, 0, sizeof *tk);
}

/* The encoders write token i's id to ids[i] and, when starts is not
 * NULL, the offset of its first byte in s to starts[i]. */
static size_t encode_bytes(const uint8_t *s, size_t len, int32_t *ids, size_t *starts)
{
    for (size_t i = 0; i < len; i++) {
        ids[i] = s[i];
        if (starts)
            starts[i] = i;
    }
    return len;
}

static size_t encode_chars(const struct tokenizer *tk, const uint8_t *s, size_t len, int32_t *ids, size_t *starts)
{
    size_t n = 0;

    for (size_t i = 0; i < len;) {
        ucs4_t uc;
        int valid;
        size_t step = next_char(s + i, len - i, &uc, &valid);

        if (starts)
            starts[n] = i;
        ids[n++] = valid ? lookup(tk, s + i, step) : tk->unk;
        i += step;
    }
    return n;
}

/* Call fn for each word of s, lower-cased, and where it starts in s: the
 * maximal runs of letters, digits and apostrophes.  fn returns 0 to go on;
 * each_word returns -1 when fn does or memory runs out.  Encoding and
 * vocabulary building share it, so they cannot disagree on what a word is. */
static int each_word(const uint8_t *s, size_t len, int (*fn)(void *ctx, const uint8_t *word, size_t n, size_t at),
                     void *ctx)
{
    size_t start = 0;
    int in_word = 0;

    for (size_t i = 0; i <= len;) {
        ucs4_t uc = 0;
        int valid = 0;
        size_t step = i < len ? next_char(s + i, len - i, &uc, &valid) : 1;
        int word_char = i < len && valid && is_word_char(uc);

        if (word_char && !in_word) {
            start = i;
            in_word = 1;
        } else if (!word_char && in_word) {
            /* Most words fit here; longer ones (or ones that grow when
             * lowered) get a buffer from u8_tolower itself. */
            uint8_t buf[256];
            size_t lower_len = sizeof buf;
            uint8_t *lower = u8_tolower(s + start, i - start, NULL, NULL, buf, &lower_len);
            if (lower == NULL)
                return -1;
            int rc = fn(ctx, lower, lower_len, start);
            if (lower != buf)
                free(lower);
            if (rc != 0)
                return -1;
            in_word = 0;
        }
        i += step;
    }
    return 0;
}

struct encoding {
    const struct tokenizer *tk;
    int32_t *ids;
    size_t *starts;
    size_t n;
};

static int encode_word(void *ctx, const uint8_t *word, size_t n, size_t at)
{
    struct encoding *e = ctx;
    if (e->starts)
        e->starts[e->n] = at;
    e->ids[e->n++] = lookup(e->tk, word, n);
    return 0;
}

static int encode_words(const struct tokenizer *tk, const uint8_t *s, size_t len, int32_t *ids, size_t *starts,
                        size_t *n_out)
{
    struct encoding e = {tk, ids, starts, 0};
    int rc = each_word(s, len, encode_word, &e);
    *n_out = e.n;
    return rc;
}

int tokenizer_encode(const struct tokenizer *tk, const char *text, size_t len, int32_t **ids,
                     size_t *n)
{
    return tokenizer_encode_spans(tk, text, len, ids, NULL, n);
}

/* Gives back the unused tail of an array made for one element per input
 * byte; on failure the larger block is fine. */
static void *shrink(void *p, size_t bytes)
{
    void *shrunk = realloc(p, bytes);
    return shrunk ? shrunk : p;
}

int tokenizer_encode_spans(const struct tokenizer *tk, const char *text, size_t len, int32_t **ids,
                           size_t **starts, size_t *n)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t count = 0, *at = NULL;

    *ids = NULL;
    if (starts)
        *starts = NULL;
    *n = 0;
    if (len == 0)
        return 0;
    /* Every tokenizer makes at most one id per input byte. */
    int32_t *out = malloc(len * sizeof *out);
    if (out == NULL || (starts && !(at = malloc(len * sizeof *at)))) {
        free(out);
        return -1;
    }
    switch (tk->type) {
    case TOKENIZER_BYTE:
        count = encode_bytes(s, len, out, at);
        break;
    case TOKENIZER_CHAR:
        count = encode_chars(tk, s, len, out, at);
        break;
    case TOKENIZER_WORD:
        if (encode_words(tk, s, len, out, at, &count) != 0) {
            free(out);
            free(at);
            return -1;
        }
        break;
    }
    if (count == 0) {
        free(out);
        free(at);
        return 0;
    }
    if (count < len) {
        out = shrink(out, count * sizeof *out);
        at = at ? shrink(at, count * sizeof *at) : NULL;
    }
    *ids = out;
    if (starts)
        *starts = at;
    *n = count;
    return 0;
}

const char *tokenizer_token(const struct tokenizer *tk, int32_t id, char out[8], size_t *outlen)
{
    if (id < 0 || id >= tk->vocab)
        return NULL;
    if (tk->type == TOKENIZER_BYTE) {
        out[0] = (char)(uint8_t)id;
        *outlen = 1;
        return out;
    }
    *outlen = strlen(tk->tokens[id]);
    return tk->tokens[id];
}

int tokenizer_char_vocab(const char *text, size_t len, char ***tokens, int *n)
{
    /* One flag per Unicode code point: 1.1 MB, once per training run. */
    unsigned char *seen = calloc(0x110000, 1);
    if (!seen)
        return -1;
    const uint8_t *s = (const uint8_t *)text;
    int count = 1;
    for (size_t i = 0; i < len;) {
        ucs4_t uc;
        int valid;
        i += next_char(s + i, len - i, &uc, &valid);
        /* U+0000 cannot be a token (tokens are C strings): it maps to unk. */
        if (valid && uc != 0 && !seen[uc]) {
            seen[uc] = 1;
            count++;
        }
    }
    char **t = calloc((size_t)count, sizeof *t);
    int k = 0;
    if (t && (t[k++] = strdup("<unk>")))
        for (ucs4_t uc = 0; uc < 0x110000 && k < count; uc++) {
            if (!seen[uc])
                continue;
            uint8_t buf[8];
            int m = u8_uctomb(buf, uc, sizeof buf);
            if (m <= 0 || !(t[k] = strndup((const char *)buf, (size_t)m)))
                break;
            k++;
        }
    free(seen);
    if (!t || k < count) {
        for (int i = 0; t && i < k; i++)
            free(t[i]);
        free(t);
        return -1;
    }
    *tokens = t;
    *n = count;
    return 0;
}

/* Word counts for tokenizer_word_vocab: open addressing on FNV-1a. */
struct word_count {
    char *word;
    long count;
};

struct counter {
    struct word_count *slot;
    size_t size, used;
};

static int count_word(void *ctx, const uint8_t *word, size_t n, size_t at)
{
    struct counter *c = ctx;
    (void)at;
    if (2 * (c->used + 1) > c->size) {
        /* Grow to keep the table at most half full. */
        size_t size = c->size ? 2 * c->size : 1024;
        struct word_count *slot = calloc(size, sizeof *slot);
        if (!slot)
            return -1;
        for (size_t i = 0; i < c->size; i++) {
            if (!c->slot[i].word)
                continue;
            size_t j = (size_t)hash_bytes((const uint8_t *)c->slot[i].word, strlen(c->slot[i].word)) & (size - 1);
            while (slot[j].word)
                j = (j + 1) & (size - 1);
            slot[j] = c->slot[i];
        }
        free(c->slot);
        c->slot = slot;
        c->size = size;
    }
    size_t j = (size_t)hash_bytes(word, n) & (c->size - 1);
    while (c->slot[j].word && !token_equals(c->slot[j].word, word, n))
        j = (j + 1) & (c->size - 1);
    if (!c->slot[j].word) {
        if (!(c->slot[j].word = strndup((const char *)word, n)))
            return -1;
        c->used++;
    }
    c->slot[j].count++;
    return 0;
}

static int by_count_then_word(const void *a, const void *b)
{
    const struct word_count *x = a, *y = b;
    if (x->count != y->count)
        return x->count < y->count ? 1 : -1;
    return strcmp(x->word, y->word);
}

int tokenizer_word_vocab(const char *text, size_t len, int max_size, int min_count, char ***tokens, int *n)
{
    struct counter c = {0};
    int rc = each_word((const uint8_t *)text, len, count_word, &c);
    /* Pack the used slots to the front, most frequent first. */
    size_t used = 0;
    for (size_t i = 0; i < c.size; i++)
        if (c.slot[i].word)
            c.slot[used++] = c.slot[i];
    if (used)
        qsort(c.slot, used, sizeof *c.slot, by_count_then_word);
    int keep = 1;
    while (rc == 0 && (size_t)(keep - 1) < used && keep < max_size && c.slot[keep - 1].count >= min_count)
        keep++;
    char **t = rc == 0 ? calloc((size_t)keep, sizeof *t) : NULL;
    if (t && (t[0] = strdup("<unk>"))) {
        for (int i = 1; i < keep; i++) {
            t[i] = c.slot[i - 1].word;
            c.slot[i - 1].word = NULL; /* now the list's */
        }
    } else if (t) {
        free(t);
        t = NULL;
    }
    for (size_t i = 0; i < used; i++)
        free(c.slot[i].word);
    free(c.slot);
    if (!t)
        return -1;
    *tokens = t;
    *n = keep;
    return 0;
}
