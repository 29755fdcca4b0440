/* rng: the seeded random numbers of esft (weight init, data shuffles). xoshiro256**
 * (Blackman and Vigna, "Scrambled linear pseudorandom number generators", 2018) seeded
 * through splitmix64, so a 64-bit seed gives the same stream on every machine and rank
 * count. The state is a plain struct: checkpoints save it as 4 words. */
#ifndef ESFT_RNG_H
#define ESFT_RNG_H

#include <stdint.h>

struct rng {
    uint64_t s[4];
};

void rng_seed(struct rng *rng, uint64_t seed);
uint64_t rng_next(struct rng *rng);
/* Uniform in [0, 1) with 53 random bits. */
double rng_uniform(struct rng *rng);
/* Uniform integer in [0, n), without modulo bias. */
uint64_t rng_below(struct rng *rng, uint64_t n);
/* Standard normal (Box-Muller; one value per call, the pair's second is dropped so the
 * stream position does not depend on call history). */
double rng_normal(struct rng *rng);

#endif
