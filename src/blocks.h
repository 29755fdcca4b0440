/* blocks: packing a dataset's samples into blocks of at most seq_len tokens, as the
 * train and eval phases feed them to the model: whole samples, in a given order, greedily
 * (a longer sample is cut to seq_len), each block a run of samples with causal attention
 * inside each sample only and positions restarting per sample; pack false: one sample
 * per block. A micro-batch is a token_batch holding several blocks end to end. */
#ifndef ESFT_BLOCKS_H
#define ESFT_BLOCKS_H

#include <stdbool.h>
#include <stdint.h>

#include "dataset.h"

struct block_plan {
    int n_blocks;
    int *first;    /* [n_blocks + 1]: block b packs order[first[b] .. first[b+1]) */
    uint64_t *order; /* sample indices in packing order */
    uint64_t capacity; /* samples the arrays hold */
};

/* Packs samples (in the given order) into plan (its arrays grown only when n is larger
 * than any plan before: a new epoch of the same samples allocates nothing). */
void plan_blocks(const struct dataset *ds, const uint64_t *samples, uint64_t n, int seq_len,
                 bool pack, struct block_plan *plan);

/* Fisher-Yates shuffle of a[n] by the project's xoshiro256** seeded with seed. */
void blocks_shuffle(uint64_t *a, uint64_t n, uint64_t seed);

/* The split of n samples into training and validation ones that train makes and eval's
 * split validation repeats: order[] becomes a permutation of 0 .. n-1 drawn with seed,
 * whose first (returned) count are the training samples and the rest, ceil(val_fraction
 * x n) but at most n - 1, the validation ones. */
uint64_t blocks_split(uint64_t *order, uint64_t n, double val_fraction, long long seed);

/* Token buffers of up to `capacity` tokens: a micro-batch of blocks laid end to end. */
struct token_batch {
    int capacity, N;
    int32_t *tokens, *positions, *sample_start, *targets, *block_start;
    uint32_t *raw;
    uint8_t *mask;
    long long targets_counted;
};

void token_batch_init(struct token_batch *b, int capacity);
void token_batch_free(struct token_batch *b);

/* Appends block `block` of the plan. Token t's target is token t+1 of the same sample
 * when that token is loss-bearing (the dataset's loss mask), else -100. */
void append_block(struct token_batch *b, const struct dataset *ds, const struct block_plan *plan,
                  int block, int seq_len);

#endif
