/* prompt_cache.c - token sequences and the model states after them, least
 * recently used first out (see prompt_cache.h).
 *
 * A lookup hashes every prefix of the prompt once (FNV-1a, one pass) and
 * compares each entry no longer than the prompt by its hash, then by its
 * tokens: entries number in the thousands at most, and a lookup runs once
 * per stream, beside a prefill that costs far more.
 */
#include <stdlib.h>
#include <string.h>

#include "prompt_cache.h"

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

struct entry {
    struct entry *prev, *next; /* most recently used first */
    int n, position;
    uint64_t hash;
    size_t bytes;
    int32_t *tokens;
    float *state, *logits;
};

struct prompt_cache {
    size_t max_bytes, bytes, state_len;
    int vocab;
    struct entry *head, *tail;
};

static uint64_t hash_more(uint64_t h, int32_t token)
{
    uint32_t t = (uint32_t)token;
    for (int i = 0; i < 4; i++, t >>= 8)
        h = (h ^ (t & 0xff)) * FNV_PRIME;
    return h;
}

static uint64_t hash_of(const int32_t *tokens, int n)
{
    uint64_t h = FNV_OFFSET;
    for (int i = 0; i < n; i++)
        h = hash_more(h, tokens[i]);
    return h;
}

struct prompt_cache *prompt_cache_new(size_t max_bytes, size_t state_len, int vocab)
{
    struct prompt_cache *pc = calloc(1, sizeof *pc);
    if (pc)
        *pc = (struct prompt_cache){.max_bytes = max_bytes, .state_len = state_len, .vocab = vocab};
    return pc;
}

static void unlink_entry(struct prompt_cache *pc, struct entry *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        pc->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        pc->tail = e->prev;
    e->prev = e->next = NULL;
}

static void push_front(struct prompt_cache *pc, struct entry *e)
{
    e->next = pc->head;
    if (pc->head)
        pc->head->prev = e;
    pc->head = e;
    if (!pc->tail)
        pc->tail = e;
}

static void free_entry(struct entry *e)
{
    free(e->tokens);
    free(e->state);
    free(e->logits);
    free(e);
}

void prompt_cache_free(struct prompt_cache *pc)
{
    if (!pc)
        return;
    for (struct entry *e = pc->head, *next; e; e = next) {
        next = e->next;
        free_entry(e);
    }
    free(pc);
}

int prompt_cache_find(struct prompt_cache *pc, const int32_t *tokens, int n, float *state, int *position,
                      float *logits)
{
    if (!pc->head || n < 1)
        return 0;
    /* prefix[k]: the hash of tokens[0..k). */
    uint64_t *prefix = malloc(sizeof *prefix * ((size_t)n + 1));
    if (!prefix)
        return 0;
    prefix[0] = FNV_OFFSET;
    for (int k = 0; k < n; k++)
        prefix[k + 1] = hash_more(prefix[k], tokens[k]);
    struct entry *best = NULL;
    for (struct entry *e = pc->head; e; e = e->next)
        if (e->n <= n && (!best || e->n > best->n) && prefix[e->n] == e->hash &&
            memcmp(e->tokens, tokens, sizeof *tokens * (size_t)e->n) == 0)
            best = e;
    free(prefix);
    if (!best)
        return 0;
    unlink_entry(pc, best);
    push_front(pc, best);
    memcpy(state, best->state, sizeof *state * pc->state_len);
    *position = best->position;
    if (best->n == n)
        memcpy(logits, best->logits, sizeof *logits * (size_t)pc->vocab);
    return best->n;
}

int prompt_cache_put(struct prompt_cache *pc, const int32_t *tokens, int n, const float *state, int position,
                     const float *logits)
{
    size_t bytes = sizeof(struct entry) + sizeof *tokens * (size_t)n +
                   sizeof *state * (pc->state_len + (size_t)pc->vocab);
    if (n < 1 || bytes > pc->max_bytes)
        return 0;
    uint64_t hash = hash_of(tokens, n);
    for (struct entry *e = pc->head; e; e = e->next)
        if (e->n == n && e->hash == hash && memcmp(e->tokens, tokens, sizeof *tokens * (size_t)n) == 0) {
            unlink_entry(pc, e);
            push_front(pc, e);
            return 0;
        }
    struct entry *e = calloc(1, sizeof *e);
    if (e) {
        e->tokens = malloc(sizeof *tokens * (size_t)n);
        e->state = malloc(sizeof *state * pc->state_len);
        e->logits = malloc(sizeof *logits * (size_t)pc->vocab);
    }
    if (!e || !e->tokens || !e->state || !e->logits) {
        if (e)
            free_entry(e);
        return -1;
    }
    *e = (struct entry){.n = n, .position = position, .hash = hash, .bytes = bytes, .tokens = e->tokens,
                        .state = e->state, .logits = e->logits};
    memcpy(e->tokens, tokens, sizeof *tokens * (size_t)n);
    memcpy(e->state, state, sizeof *state * pc->state_len);
    memcpy(e->logits, logits, sizeof *logits * (size_t)pc->vocab);
    push_front(pc, e);
    pc->bytes += bytes;
    while (pc->bytes > pc->max_bytes) {
        struct entry *old = pc->tail;
        unlink_entry(pc, old);
        pc->bytes -= old->bytes;
        free_entry(old);
    }
    return 0;
}

size_t prompt_cache_bytes(const struct prompt_cache *pc)
{
    return pc ? pc->bytes : 0;
}
