/* sampler.c - temperature, top-k and top-p sampling with a per-stream
 * random generator.
 *
 * Every choice is deterministic given the logits, the parameters and the
 * generator's state: ties in sorting break by token id, and the draw walks
 * the candidates in that fixed order, so a seed reproduces its text.
 */
#include <math.h>
#include <openssl/rand.h>
#include <stdlib.h>

#include "sampler.h"

int sample_seed_random(uint64_t *seed)
{
    unsigned char b[8];
    if (RAND_bytes(b, sizeof b) != 1)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < sizeof b; i++)
        v = v << 8 | b[i];
    *seed = v & SAMPLE_SEED_MAX;
    return 0;
}

int sampler_init(struct sampler *s, int V)
{
    s->V = V;
    s->e = malloc((size_t)V * sizeof *s->e);
    return s->e ? 0 : -1;
}

void sampler_free(struct sampler *s)
{
    free(s->e);
    s->e = NULL;
}

static int by_prob_desc(const void *a, const void *b)
{
    const struct sample_entry *x = a, *y = b;
    if (x->p != y->p)
        return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

int sample_token(struct sampler *s, const float *logits, const struct sample_params *p, struct rng *r)
{
    const int V = s->V;
    int best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best])
            best = v;
    if (p->temperature <= 0.0f)
        return best;
    /* Softmax of logits / T, shifted by the maximum so nothing overflows. */
    double sum = 0.0;
    for (int v = 0; v < V; v++) {
        s->e[v].p = expf((logits[v] - logits[best]) / p->temperature);
        s->e[v].id = v;
        sum += s->e[v].p;
    }
    int n = V;
    if ((p->top_k > 0 && p->top_k < V) || p->top_p < 1.0f) {
        qsort(s->e, (size_t)V, sizeof *s->e, by_prob_desc);
        if (p->top_k > 0 && p->top_k < n)
            n = p->top_k;
        sum = 0.0;
        for (int i = 0; i < n; i++)
            sum += s->e[i].p;
        if (p->top_p < 1.0f) {
            /* The smallest prefix holding top_p of what top-k kept. */
            double kept = 0.0;
            int m = 0;
            while (m < n && kept < p->top_p * sum)
                kept += s->e[m++].p;
            n = m > 0 ? m : 1;
            sum = kept > 0.0 ? kept : s->e[0].p;
        }
    }
    double u = rng_uniform(r) * sum, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += s->e[i].p;
        if (u < acc)
            return s->e[i].id;
    }
    return s->e[n - 1].id; /* u within rounding of the total */
}
