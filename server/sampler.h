/* sampler.h - choosing the next token from a language model's logits.
 *
 * Temperature scaling, then top-k, then top-p (nucleus) filtering, then a
 * draw from the renormalised distribution with the stream's own random
 * generator, so the same seed and parameters give the same tokens whatever
 * else the server is doing.  temperature 0 means greedy (argmax).  The
 * log-probabilities a client may ask for beside the tokens are logprob.h's.
 */
#ifndef RRN_SAMPLER_H
#define RRN_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "logprob.h"
#include "rng.h"

/* Seeds travel as JSON numbers, which hold integers exactly up to 2^53. */
#define SAMPLE_SEED_MAX ((UINT64_C(1) << 53) - 1)

struct sample_params {
    float temperature;  /* >= 0; 0 is greedy */
    int top_k;          /* 0: no limit */
    float top_p;        /* (0, 1]; 1: no limit */
    uint64_t seed;
};

/* A seed drawn at random (OpenSSL's RAND_bytes), for a request that gave
 * none: 0, or -1 when none could be drawn. */
int sample_seed_random(uint64_t *seed);

/* Scratch for sample_token, sized for a vocabulary of V. */
struct sampler {
    int V;
    struct sample_entry {
        float p;
        int id;
    } *e;
};

int sampler_init(struct sampler *s, int V);
void sampler_free(struct sampler *s);

/* The sampled token id for logits[0..V-1]. */
int sample_token(struct sampler *s, const float *logits, const struct sample_params *p, struct rng *r);

#endif
