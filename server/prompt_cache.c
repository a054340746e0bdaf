/* prompt_cache.c - token sequences and the model states after them (see
 * prompt_cache.h).
 *
 * Two lists, as a segmented LRU: a new entry goes on probation, and one
 * found again moves to the protected list, which may hold up to
 * PROTECTED_SHARE of the bytes (its least recently used entries go back on
 * probation beyond that).  Room is made from probation first.  Under a
 * load of one-off generations, whose ended streams each leave an entry
 * that nobody asks for, the entries that prompts do come back to (a
 * system prompt, a conversation) stay.
 *
 * A lookup hashes every prefix of the prompt once (FNV-1a, one pass) and
 * compares each entry no longer than the prompt by its hash, then by its
 * tokens.  The lengths and hashes sit in one array beside the lists, since
 * walking thousands of entries scattered in memory misses the CPU's cache
 * at every one: with 64 MB of one-off generations cached (1,800 entries of
 * models/austen) that walk cost 5-12% of /generate's requests a second at
 * 64 clients on the CPU; the array's scan, 2%, within the noise.
 *
 * A sequence shorter than SHORT_SEQUENCE is admitted the second time it
 * is asked about, not the first: the first time only its hash is noted,
 * in a table of SEEN_SLOTS (a doorkeeper, as TinyLFU's).  A short prompt
 * costs little to run once, but much when many requests send it (a
 * title, a greeting): at 64 clients sending eight prompts of 5 to 15
 * characters to models/austen on the CPU, running them was 27% of the
 * engine's time, and with them kept the server answers 957-969 requests a
 * second against 537-555 (make bench-server).  And the short one-off
 * prompts, most of them, never take the place of an entry that would be
 * found again (a conversation's ended stream).
 */
#include <stdlib.h>
#include <string.h>

#include "prompt_cache.h"

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define PROTECTED_SHARE 0.8
#define SHORT_SEQUENCE 16
#define SEEN_SLOTS 4096

/* Most recently used first. */
struct list {
    struct entry *head, *tail;
    size_t bytes;
};

struct entry {
    struct entry *prev, *next;
    struct list *on;
    size_t at; /* its place in the index */
    int n, position;
    size_t bytes;
    int32_t *tokens;
    float *state, *logits;
};

/* What a lookup compares first, for every entry, side by side. */
struct key {
    uint64_t hash;
    int n;
    struct entry *e;
};

struct prompt_cache {
    size_t max_bytes, state_len;
    int vocab;
    struct list probation, protected;
    struct key *index;
    size_t count, cap;
    uint64_t seen[SEEN_SLOTS]; /* hashes of short sequences asked about once */
};

static uint64_t hash_more(uint64_t h, int32_t token)
{
    uint32_t t = (uint32_t)token;
    for (int i = 0; i < 4; i++, t >>= 8)
        h = (h ^ (t & 0xff)) * FNV_PRIME;
    return h;
}

uint64_t prompt_cache_hash(const int32_t *tokens, int n)
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

static void unlink_entry(struct entry *e)
{
    struct list *l = e->on;
    if (e->prev)
        e->prev->next = e->next;
    else
        l->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        l->tail = e->prev;
    l->bytes -= e->bytes;
    e->prev = e->next = NULL;
    e->on = NULL;
}

static void push_front(struct list *l, struct entry *e)
{
    e->next = l->head;
    if (l->head)
        l->head->prev = e;
    l->head = e;
    if (!l->tail)
        l->tail = e;
    l->bytes += e->bytes;
    e->on = l;
}

static void free_entry(struct entry *e)
{
    free(e->tokens);
    free(e->state);
    free(e->logits);
    free(e);
}

static void free_list(struct list *l)
{
    for (struct entry *e = l->head, *next; e; e = next) {
        next = e->next;
        free_entry(e);
    }
}

void prompt_cache_free(struct prompt_cache *pc)
{
    if (!pc)
        return;
    free_list(&pc->probation);
    free_list(&pc->protected);
    free(pc->index);
    free(pc);
}

/* An entry leaves the cache: out of its list and the index, freed. */
static void evict(struct prompt_cache *pc, struct entry *e)
{
    unlink_entry(e);
    pc->index[e->at] = pc->index[--pc->count];
    pc->index[e->at].e->at = e->at;
    free_entry(e);
}

/* The entry of tokens[0..n), whose hash is hash, or NULL; with prefix (the
 * hashes of every prefix of tokens[0..n)), the longest entry that is a
 * prefix of it. */
static struct entry *search(const struct prompt_cache *pc, const int32_t *tokens, int n, uint64_t hash,
                            const uint64_t *prefix)
{
    struct entry *best = NULL;
    for (size_t i = 0; i < pc->count; i++) {
        const struct key *k = &pc->index[i];
        if ((prefix ? k->n <= n && (!best || k->n > best->n) && prefix[k->n] == k->hash
                    : k->n == n && k->hash == hash) &&
            memcmp(k->e->tokens, tokens, sizeof *tokens * (size_t)k->n) == 0)
            best = k->e;
    }
    return best;
}

/* e was used: to the front of the protected list, making room there. */
static void promote(struct prompt_cache *pc, struct entry *e)
{
    unlink_entry(e);
    push_front(&pc->protected, e);
    while (pc->protected.bytes > (size_t)(PROTECTED_SHARE * (double)pc->max_bytes)) {
        struct entry *old = pc->protected.tail;
        unlink_entry(old);
        push_front(&pc->probation, old);
    }
}

int prompt_cache_find(struct prompt_cache *pc, const int32_t *tokens, int n, float *state, int *position,
                      float *logits)
{
    if (!pc->count || n < 1)
        return 0;
    /* prefix[k]: the hash of tokens[0..k). */
    uint64_t *prefix = malloc(sizeof *prefix * ((size_t)n + 1));
    if (!prefix)
        return 0;
    prefix[0] = FNV_OFFSET;
    for (int k = 0; k < n; k++)
        prefix[k + 1] = hash_more(prefix[k], tokens[k]);
    struct entry *best = search(pc, tokens, n, 0, prefix);
    free(prefix);
    if (!best)
        return 0;
    promote(pc, best);
    memcpy(state, best->state, sizeof *state * pc->state_len);
    *position = best->position;
    if (best->n == n)
        memcpy(logits, best->logits, sizeof *logits * (size_t)pc->vocab);
    return best->n;
}

int prompt_cache_admits(struct prompt_cache *pc, const int32_t *tokens, int n)
{
    if (n >= SHORT_SEQUENCE)
        return 1;
    const uint64_t hash = prompt_cache_hash(tokens, n);
    uint64_t *seen = &pc->seen[hash % SEEN_SLOTS];
    if (*seen == hash)
        return 1;
    *seen = hash;
    return 0;
}

int prompt_cache_put(struct prompt_cache *pc, const int32_t *tokens, int n, const float *state, int position,
                     const float *logits)
{
    size_t bytes = sizeof(struct entry) + sizeof *tokens * (size_t)n +
                   sizeof *state * (pc->state_len + (size_t)pc->vocab);
    if (n < 1 || bytes > pc->max_bytes)
        return 0;
    const uint64_t hash = prompt_cache_hash(tokens, n);
    if (search(pc, tokens, n, hash, NULL))
        return 0;
    if (pc->count == pc->cap) {
        size_t cap = pc->cap ? 2 * pc->cap : 64;
        struct key *more = realloc(pc->index, sizeof *more * cap);
        if (!more)
            return -1;
        pc->index = more;
        pc->cap = cap;
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
    e->n = n;
    e->position = position;
    e->bytes = bytes;
    e->at = pc->count;
    pc->index[pc->count++] = (struct key){hash, n, e};
    memcpy(e->tokens, tokens, sizeof *tokens * (size_t)n);
    memcpy(e->state, state, sizeof *state * pc->state_len);
    memcpy(e->logits, logits, sizeof *logits * (size_t)pc->vocab);
    push_front(&pc->probation, e);
    while (pc->probation.bytes + pc->protected.bytes > pc->max_bytes)
        evict(pc, pc->probation.tail ? pc->probation.tail : pc->protected.tail);
    return 0;
}

size_t prompt_cache_bytes(const struct prompt_cache *pc)
{
    return pc ? pc->probation.bytes + pc->protected.bytes : 0;
}
