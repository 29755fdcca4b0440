/* blocks: packing a dataset's samples into blocks of tokens (see blocks.h). */
#include "blocks.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "rng.h"

void blocks_shuffle(uint64_t *a, uint64_t n, uint64_t seed)
{
    struct rng rng;
    rng_seed(&rng, seed);
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = rng_below(&rng, i), t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

uint64_t blocks_split(uint64_t *order, uint64_t n, double val_fraction, long long seed)
{
    for (uint64_t i = 0; i < n; i++) order[i] = i;
    blocks_shuffle(order, n, (uint64_t)seed ^ 0x5eedULL);
    uint64_t n_val = (uint64_t)ceil(val_fraction * (double)n);
    if (n_val >= n) n_val = n > 0 ? n - 1 : 0;
    return n - n_val;
}

static uint64_t clipped_length(const struct dataset *ds, uint64_t sample, int seq_len)
{
    uint64_t n = dataset_sample_length(ds, sample);
    return n > (uint64_t)seq_len ? (uint64_t)seq_len : n;
}

void plan_blocks(const struct dataset *ds, const uint64_t *samples, uint64_t n, int seq_len,
                        bool pack, struct block_plan *plan)
{
    if (!plan->order || n > plan->capacity) {
        free(plan->first);
        free(plan->order);
        plan->order = xmalloc((n ? n : 1) * sizeof *plan->order);
        plan->first = xmalloc((n + 1) * sizeof *plan->first);
        plan->capacity = n;
    }
    memcpy(plan->order, samples, n * sizeof *samples);
    plan->n_blocks = 0;
    uint64_t used = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t length = clipped_length(ds, samples[i], seq_len);
        if (i == 0 || !pack || used + length > (uint64_t)seq_len) {
            plan->first[plan->n_blocks++] = (int)i;
            used = 0;
        }
        used += length;
    }
    plan->first[plan->n_blocks] = (int)n;
}

void token_batch_init(struct token_batch *b, int capacity)
{
    memset(b, 0, sizeof *b);
    b->capacity = capacity;
    b->tokens = xmalloc((size_t)capacity * sizeof(int32_t));
    b->positions = xmalloc((size_t)capacity * sizeof(int32_t));
    b->sample_start = xmalloc((size_t)capacity * sizeof(int32_t));
    b->targets = xmalloc((size_t)capacity * sizeof(int32_t));
    b->block_start = xmalloc((size_t)capacity * sizeof(int32_t));
    b->raw = xmalloc((size_t)capacity * sizeof(uint32_t));
    b->mask = xmalloc((size_t)capacity);
}

void token_batch_free(struct token_batch *b)
{
    free(b->tokens), free(b->positions), free(b->sample_start), free(b->targets);
    free(b->block_start);
    free(b->raw), free(b->mask);
}

void append_block(struct token_batch *b, const struct dataset *ds,
                         const struct block_plan *plan, int block, int seq_len)
{
    char err[1024];
    int first = b->N; /* the block's first token */
    for (int i = plan->first[block]; i < plan->first[block + 1]; i++) {
        uint64_t sample = plan->order[i];
        int n = (int)clipped_length(ds, sample, seq_len);
        if (b->N + n > b->capacity) fatal(EXIT_RUNTIME, "train: batch buffer overflow");
        /* only the kept tokens: the last kept token has no target (the sample ends here
         * for the model), so nothing past the cut is needed */
        uint32_t *raw = b->raw + b->N;
        uint8_t *mask = b->mask + b->N;
        if (dataset_read_prefix(ds, sample, (uint64_t)n, raw, mask, err, sizeof err) != 0)
            fatal(EXIT_RUNTIME, "train: %s", err);
        int start = b->N;
        for (int t = 0; t < n; t++) {
            b->tokens[start + t] = (int32_t)raw[t];
            b->positions[start + t] = t;
            b->sample_start[start + t] = start;
            b->block_start[start + t] = first;
            bool has_next = t + 1 < n;
            b->targets[start + t] = has_next && mask[t + 1] ? (int32_t)raw[t + 1] : -100;
            b->targets_counted += b->targets[start + t] >= 0;
        }
        b->N += n;
    }
}
