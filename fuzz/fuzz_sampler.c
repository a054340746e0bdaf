/* fuzz_sampler.c - libFuzzer target for sample_token (server/sampler.c)
 * with arbitrary logits and parameters.
 *
 * Input layout: 4 bytes temperature (float), 4 bytes top_k (int), 4 bytes
 * top_p (float), 8 bytes seed, then the logits (floats, 1 to 4096 of them;
 * any bit pattern, NaN and infinities included).  The parameters are first
 * brought into the ranges POST /generate lets through (temperature finite
 * and >= 0, top_k >= 0, top_p in (0, 1]), as api.c checks them.  The
 * sampled id must be in the vocabulary, greedy must be the first maximum
 * and, with finite logits, the same seed must give the same id.  Then
 * token_logprobs for that id with top_k (at most 20, as the API allows)
 * alternatives: with finite logits every log-probability is <= 0, the
 * alternatives come in order and the first is the greedy token.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define HEAD 20
#define MAX_V 4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < HEAD + sizeof(float))
        return 0;
    struct sample_params p;
    float temperature, top_p;
    int32_t top_k;
    memcpy(&temperature, data, 4);
    memcpy(&top_k, data + 4, 4);
    memcpy(&top_p, data + 8, 4);
    memcpy(&p.seed, data + 12, 8);
    p.temperature = isfinite(temperature) ? fabsf(temperature) : 1.0f;
    p.top_k = top_k == INT32_MIN ? 0 : abs(top_k);
    p.top_p = isfinite(top_p) && fabsf(top_p) > 0 && fabsf(top_p) <= 1 ? fabsf(top_p) : 1.0f;
    size_t V = (size - HEAD) / sizeof(float);
    if (V > MAX_V)
        V = MAX_V;
    float *logits = malloc(V * sizeof *logits);
    if (!logits)
        return 0;
    memcpy(logits, data + HEAD, V * sizeof *logits);
    int finite = 1;
    for (size_t v = 0; v < V; v++)
        finite &= isfinite(logits[v]) != 0;

    struct sampler s;
    if (sampler_init(&s, (int)V) != 0)
        abort();
    struct rng r1, r2;
    rng_seed(&r1, p.seed);
    rng_seed(&r2, p.seed);
    int a = sample_token(&s, logits, &p, &r1), b = sample_token(&s, logits, &p, &r2);
    if (a < 0 || a >= (int)V || b < 0 || b >= (int)V)
        abort();
    if (finite && a != b)
        abort();
    if (finite && p.temperature == 0.0f) {
        int best = 0;
        for (int v = 1; v < (int)V; v++)
            if (logits[v] > logits[best])
                best = v;
        if (a != best)
            abort();
    }
    struct token_logprob top[20];
    int k = p.top_k % 21 < (int)V ? p.top_k % 21 : (int)V;
    float lp = token_logprobs(logits, (int)V, a, k, top);
    for (int i = 0; finite && i < k; i++)
        if (top[i].id < 0 || top[i].id >= (int)V || !(top[i].logprob <= 0) ||
            (i > 0 && !(top[i].logprob <= top[i - 1].logprob)) ||
            (i == 0 && sample_token(&s, logits, &(struct sample_params){.top_p = 1.0f}, &r1) != top[0].id))
            abort();
    if (finite && !(lp <= 0))
        abort();
    sampler_free(&s);
    free(logits);
    return 0;
}
