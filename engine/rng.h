/* rng.h - the random generator behind sampling, training and the
 * synthetic data sets: xoshiro256** (256 bits of state, fast, passes
 * BigCrush), seeded through splitmix64 so any seed, 0 included, gives a
 * good stream.  Every consumer owns its generator, so a seed reproduces
 * its draws whatever else the process does.
 */
#ifndef RRN_RNG_H
#define RRN_RNG_H

#include <stdint.h>

struct rng {
    uint64_t s[4];
};

void rng_seed(struct rng *r, uint64_t seed);
uint64_t rng_next(struct rng *r);
double rng_uniform(struct rng *r); /* [0, 1) */

#endif
