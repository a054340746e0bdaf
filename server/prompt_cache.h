/* prompt_cache.h - the states a model's generation streams reached, kept
 * so that a prompt which begins with a sequence seen before starts from
 * its state instead of running the model over those tokens again.
 *
 * A recurrent model's state after any number of tokens has one size (the
 * engine's slot state: each layer's cell and attention ring, 37 KB for
 * models/austen), so a cached sequence costs the same however long it is,
 * where a transformer's key-value cache grows with it.  An entry is a token
 * sequence, the state after it, the slot's position, and the logits of the
 * token after it.  The batcher keeps the state after each prompt it
 * prefills, at block boundaries on the way through a long one, and after
 * each stream that ends (its prompt and the tokens it generated), so a
 * request that repeats a prompt, continues a conversation with the text
 * generated before, or begins as another prompt did, skips the tokens
 * seen.
 * When the bytes pass the limit, entries go least recently used first,
 * those never found again before those found again (prompt_cache.c).
 * Only the batcher's thread uses a model's cache: there is no lock.
 */
#ifndef RRN_PROMPT_CACHE_H
#define RRN_PROMPT_CACHE_H

#include <stddef.h>
#include <stdint.h>

struct prompt_cache;

/* A cache of at most max_bytes, its entries states of state_len floats and
 * logits of vocab; NULL when out of memory. */
struct prompt_cache *prompt_cache_new(size_t max_bytes, size_t state_len, int vocab);
void prompt_cache_free(struct prompt_cache *pc);

/* The longest entry that is a prefix of tokens[0..n): its length, with its
 * state and position copied out, and its logits too when it is all n
 * tokens; 0 when there is none (or out of memory). */
int prompt_cache_find(struct prompt_cache *pc, const int32_t *tokens, int n, float *state, int *position,
                      float *logits);
/* Whether tokens[0..n) is worth keeping, asked before its state is
 * saved: a sequence of under 16 tokens only the second time it is asked
 * about (the first time its hash is noted; prompt_cache.c says why),
 * a longer one always. */
int prompt_cache_admits(struct prompt_cache *pc, const int32_t *tokens, int n);
/* Keeps tokens[0..n) with the state after it; nothing when the entry is
 * there already or would not fit the limit alone.  -1 when out of
 * memory. */
int prompt_cache_put(struct prompt_cache *pc, const int32_t *tokens, int n, const float *state, int position,
                     const float *logits);
size_t prompt_cache_bytes(const struct prompt_cache *pc);
/* The hash a lookup gives tokens[0..n) (FNV-1a), for telling sequences
 * apart without comparing them. */
uint64_t prompt_cache_hash(const int32_t *tokens, int n);

#endif
