/* logprob.c - a token's log-probability and the most probable tokens, from
 * logits, with the digits of probabilities near 1 kept.
 */
#include <math.h>

#include "logprob.h"

float token_logprobs(const float *logits, int V, int tok, int k, struct token_logprob *top)
{
    int best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best])
            best = v;
    /* ln p(v) = (l_v - max) - ln(1 + rest), rest the other terms of the
     * sum from the maximum: nothing overflows, and summing the rest apart
     * from the 1 (log1p) and never adding ln(1 + rest) to the maximum
     * keeps the digits of a probability near 1, whose ln p is near 0. */
    double rest = 0.0;
    for (int v = 0; v < V; v++)
        if (v != best)
            rest += exp((double)logits[v] - logits[best]);
    const double ln_norm = log1p(rest);
    /* The k largest by insertion into a sorted run: after the first few
     * tokens almost every logit is below the run's last and costs one
     * comparison.  Strictly larger moves ahead, so ties stay in id order. */
    int n = 0;
    for (int v = 0; v < V && k > 0; v++) {
        if (n == k && !(logits[v] > top[k - 1].logprob))
            continue;
        int at = n < k ? n++ : k - 1;
        while (at > 0 && logits[v] > top[at - 1].logprob) {
            top[at] = top[at - 1];
            at--;
        }
        top[at] = (struct token_logprob){.id = v, .logprob = logits[v]};
    }
    for (int i = 0; i < n; i++)
        top[i].logprob = (float)((double)top[i].logprob - logits[best] - ln_norm);
    return (float)((double)logits[tok] - logits[best] - ln_norm);
}
