/* score.c - the log-probability of whole texts under a language model,
 * however long they are, and on request the most probable tokens at each
 * position.
 *
 * Short texts go through engine_forward together, which bounds its calls'
 * tokens.  A text longer than one chunk runs chunk by chunk through a
 * slot, its state carried from one chunk to the next, so memory stays
 * bounded for a whole novel while the result is the same as one pass over
 * it; a text may also carry on a sequence a slot holds, a part of a long
 * text at a time.  The alternatives need every position's logits on the
 * host, [tokens][V] floats, so texts that ask for them run in chunks and
 * batches bounded by SCORE_LOGITS floats instead, apart from the others.
 * Attention maps go the same way: a chunk writes its positions' weights
 * straight into the text's, whose rows are the whole text's.
 */
#include <stdio.h>
#include <stdlib.h>

#include "engine.h"

#define SCORE_CHUNK 4096         /* tokens of one long text per forward */
#define SCORE_LOGITS (1 << 22)   /* floats of logits a forward brings back (16 MB) */

/* Tokens of one text a forward takes, for texts like t. */
static int score_chunk(const struct engine *e, const struct engine_text *t)
{
    if (!t->top)
        return SCORE_CHUNK;
    const int n = SCORE_LOGITS / engine_model(e)->head_out;
    return n < 1 ? 1 : n < SCORE_CHUNK ? n : SCORE_CHUNK;
}

/* The terms and alternatives of q's positions from its logits [len][V],
 * on the host as a generated token's are (logprob.h), so that the most
 * probable token's term equals its first alternative's to the bit.
 * Position s holds the distribution after tokens 1..s+1; its term is the
 * token that follows, q->next at the last position, or 0 without one.
 * Returns the terms' sum. */
static double seq_alternatives(const struct engine_seq *q, const float *logits, int V, int k, float *terms,
                               struct token_logprob *top)
{
    double sum = 0.0;
    for (int s = 0; s < q->len; s++) {
        const int32_t *next = s + 1 < q->len ? &q->tokens[s + 1] : q->next;
        float lp = token_logprobs(logits + (size_t)s * V, V, next ? *next : 0, k, top + (size_t)s * k);
        lp = next ? lp : 0.0f;
        if (terms)
            terms[s] = lp;
        sum += lp;
    }
    return sum;
}

/* What one forward gave text t, its chunk from token `at` on being q. */
static double seq_result(const struct engine *e, const struct engine_text *t, const struct engine_seq *q, int at)
{
    if (!t->top)
        return q->logprob;
    return seq_alternatives(q, q->logits, engine_model(e)->head_out, t->top_k,
                            t->token_logprobs ? t->token_logprobs + at : NULL, t->top + (size_t)at * t->top_k);
}

/* A text through a slot, chunk tokens a forward: its own, or the one it
 * carries on in. */
static int score_in_slot(struct engine *e, struct engine_text *t, int chunk, float *logits, char *err,
                         size_t errlen)
{
    const int slot = t->carry ? t->slot : engine_slot_open(e);
    if (slot < 0) {
        snprintf(err, errlen, "no free slot to score a text of %d tokens", t->len);
        return -1;
    }
    const int K = engine_model(e)->cfg.attn_window;
    double sum = 0.0;
    int rc = 0;
    for (int at = 0; at < t->len && rc == 0; at += chunk) {
        int n = t->len - at < chunk ? t->len - at : chunk;
        struct engine_seq q = {
            .tokens = t->tokens + at,
            .len = n,
            .slot = slot,
            .next = at + n < t->len ? t->tokens + at + n : t->carry ? t->next : NULL,
            .token_logprobs = t->token_logprobs && !t->top ? t->token_logprobs + at : NULL,
            .logits = t->top ? logits : NULL,
            .attention = t->attention ? t->attention + (size_t)at * K : NULL,
            .attention_rows = t->attention_rows ? t->attention_rows : t->len,
        };
        rc = engine_forward(e, &q, 1, err, errlen);
        if (rc == 0)
            sum += seq_result(e, t, &q, at);
    }
    if (!t->carry)
        engine_slot_close(e, slot);
    t->logprob = sum;
    return rc;
}

int engine_score(struct engine *e, struct engine_text *texts, int n, char *err, size_t errlen)
{
    const int V = engine_model(e)->head_out;
    int alternatives = 0;
    for (int i = 0; i < n; i++)
        alternatives |= texts[i].top != NULL;
    struct engine_seq *seqs = calloc((size_t)n, sizeof *seqs);
    int *which = malloc((size_t)n * sizeof *which);
    float *logits = NULL;
    for (int i = 0; i < n && !logits && alternatives; i++)
        if (texts[i].top && !(logits = malloc(sizeof *logits * (size_t)score_chunk(e, &texts[i]) * V)))
            break;
    int rc = seqs && which && (logits || !alternatives) ? 0 : -1;
    if (rc != 0)
        snprintf(err, errlen, "out of memory");
    for (int i = 0; rc == 0 && i < n;) {
        const int chunk = score_chunk(e, &texts[i]), want = texts[i].top != NULL;
        if (texts[i].len > chunk || texts[i].carry) {
            rc = score_in_slot(e, &texts[i], chunk, logits, err, errlen);
            i++;
            continue;
        }
        int k = 0, total = 0;
        while (i < n && (texts[i].top != NULL) == want && texts[i].len <= chunk && !texts[i].carry &&
               (k == 0 || !want || total + texts[i].len <= chunk)) {
            const struct engine_text *t = &texts[i];
            seqs[k] = (struct engine_seq){.tokens = t->tokens, .len = t->len, .slot = -1,
                                          .token_logprobs = want ? NULL : t->token_logprobs,
                                          .logits = want ? logits + (size_t)total * V : NULL,
                                          .attention = t->attention, .attention_rows = t->attention_rows};
            which[k++] = i;
            total += texts[i++].len;
        }
        rc = engine_forward(e, seqs, k, err, errlen);
        for (int j = 0; rc == 0 && j < k; j++)
            texts[which[j]].logprob = seq_result(e, &texts[which[j]], &seqs[j], 0);
    }
    free(seqs);
    free(which);
    free(logits);
    return rc;
}
