/* score.c - the log-probability of whole texts under a language model,
 * however long they are.
 *
 * Short texts go through engine_forward together, in batches bounded by
 * their total token count.  A text longer than one chunk runs chunk by
 * chunk through a slot, its state carried from one chunk to the next, so
 * memory stays bounded for a whole novel while the result is the same as
 * one pass over it.
 */
#include <stdio.h>
#include <stdlib.h>

#include "engine.h"

#define SCORE_CHUNK 4096        /* tokens of one long text per forward */
#define SCORE_BATCH_TOKENS 16384 /* tokens of short texts per forward */

static int score_long(struct engine *e, const int32_t *tokens, int len, double *logprob, float *token_logprobs,
                      char *err, size_t errlen)
{
    int slot = engine_slot_open(e);
    if (slot < 0) {
        snprintf(err, errlen, "no free slot to score a text of %d tokens", len);
        return -1;
    }
    double sum = 0.0;
    int rc = 0;
    for (int at = 0; at < len && rc == 0; at += SCORE_CHUNK) {
        int n = len - at < SCORE_CHUNK ? len - at : SCORE_CHUNK;
        struct engine_seq q = {
            .tokens = tokens + at,
            .len = n,
            .slot = slot,
            .next = at + n < len ? tokens + at + n : NULL,
            .token_logprobs = token_logprobs ? token_logprobs + at : NULL,
        };
        rc = engine_forward(e, &q, 1, err, errlen);
        sum += q.logprob;
    }
    engine_slot_close(e, slot);
    *logprob = sum;
    return rc;
}

int engine_score(struct engine *e, const int32_t *const *tokens, const int *lens, int n, double *logprob,
                 float *const *token_logprobs, char *err, size_t errlen)
{
    struct engine_seq *seqs = calloc((size_t)n, sizeof *seqs);
    int *which = malloc((size_t)n * sizeof *which);
    int rc = seqs && which ? 0 : -1;
    if (rc != 0)
        snprintf(err, errlen, "out of memory");
    for (int i = 0; rc == 0 && i < n;) {
        if (lens[i] > SCORE_CHUNK) {
            rc = score_long(e, tokens[i], lens[i], &logprob[i], token_logprobs ? token_logprobs[i] : NULL, err,
                            errlen);
            i++;
            continue;
        }
        int k = 0, total = 0;
        while (i < n && lens[i] <= SCORE_CHUNK && (k == 0 || total + lens[i] <= SCORE_BATCH_TOKENS)) {
            seqs[k] = (struct engine_seq){.tokens = tokens[i], .len = lens[i], .slot = -1,
                                          .token_logprobs = token_logprobs ? token_logprobs[i] : NULL};
            which[k++] = i;
            total += lens[i++];
        }
        rc = engine_forward(e, seqs, k, err, errlen);
        for (int j = 0; rc == 0 && j < k; j++)
            logprob[which[j]] = seqs[j].logprob;
    }
    free(seqs);
    free(which);
    return rc;
}
