/* logprob.h - the log-probabilities of tokens under a language model's
 * logits: a token's, and the most probable tokens beside it.
 *
 * One function for every place that reports them (a generated token, each
 * token of a scored text), so that a token that is the most probable has
 * exactly the log-probability of the first of its alternatives, as
 * clients that compare the two (is this text what greedy decoding gives?)
 * expect.
 */
#ifndef RRN_LOGPROB_H
#define RRN_LOGPROB_H

struct token_logprob {
    int id;
    float logprob;
};

/* ln p(tok) under softmax(logits[0..V-1]), the model's own distribution
 * (not one that sampling parameters shaped, so that it means the same
 * whatever they were), and its k most probable tokens in top[0..k-1],
 * most probable first, ties by token id. */
float token_logprobs(const float *logits, int V, int tok, int k, struct token_logprob *top);

#endif
