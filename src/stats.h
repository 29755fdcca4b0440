/* stats: the routing statistics file the score phase writes and the select phase reads.
 *
 * One HDF5 file per score run. Lm is the number of MoE layers, E experts, R ranks that
 * scored (the data-parallel ranks), S scored samples.
 *   attributes on /: format = "esft-routing-stats", version = 2, model_path,
 *     model_type, config_hash (uint64, FNV-1a of config.json), num_layers (decoder
 *     layers), num_experts, top_k, norm_topk_prob (uint8), dataset, dataset_checksum
 *     (16 hex digits of dataset_hash, dataset.h), tokenizer and tokenizer_checksum (the
 *     dataset's, tokenizer.h), seed,
 *     n_sample_tokens (asked), tokens_scored ("all" or "loss"), world, pp, dp, ep,
 *     deck (the resolved deck text)
 *   /moe_layers        int32   [Lm]        decoder-layer index of each MoE layer
 *   /totals/tokens     uint64  [Lm]        tokens seen by each MoE layer
 *   /totals/count      uint64  [Lm, E]     tokens whose top-k holds expert e
 *   /totals/gate       float64 [Lm, E]     sum of the routing weight given to e
 *   /totals/coact      uint64  [Lm, E, E]  tokens whose top-k holds both i and j (i != j;
 *                                          symmetric, zero diagonal); absent when off
 *   /ranks/tokens      uint64  [R, Lm]     the same per scoring rank (rank r = dp index)
 *   /ranks/count       uint64  [R, Lm, E]
 *   /ranks/gate        float64 [R, Lm, E]
 *   /samples/index     uint64  [S]         dataset index of each scored sample, in the
 *                                          seeded order they were drawn
 *   /samples/tokens    uint64  [S]         tokens of the sample that were scored
 *   /samples/count     uint32  [S, Lm, E]  per-sample counts
 *   /samples/gate      float64 [S, Lm, E]  per-sample gate sums
 * Totals are reduced from the per-sample values in the drawn order, so they are
 * bitwise identical for any rank count. Version 1 files (without dataset_checksum,
 * tokenizer, tokenizer_checksum) are read with those empty. The per-rank datasets are written by each rank
 * with parallel HDF5 (collective create, independent writes of one's own row). */
#ifndef ESFT_STATS_H
#define ESFT_STATS_H

#include <mpi.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct routing_stats {
    /* identity */
    char model_path[4096];
    char model_type[32];
    uint64_t config_hash;
    int num_layers, num_experts, top_k;
    bool norm_topk_prob;
    char dataset[4096];
    char dataset_checksum[17]; /* "" when not known (a version 1 file) */
    char tokenizer[4096];
    char tokenizer_checksum[17];
    long long seed, n_sample_tokens;
    char tokens_scored[8]; /* "all" or "loss" */
    int world, pp, dp, ep;
    char *deck; /* resolved deck text (may be NULL) */

    int n_moe_layers;      /* Lm */
    int32_t *moe_layers;   /* [Lm] */
    uint64_t *tokens;      /* [Lm] */
    uint64_t *count;       /* [Lm, E] */
    double *gate;          /* [Lm, E] */
    uint64_t *coact;       /* [Lm, E, E] or NULL */

    int n_ranks;           /* R */
    uint64_t *rank_tokens; /* [R, Lm] */
    uint64_t *rank_count;  /* [R, Lm, E] */
    double *rank_gate;     /* [R, Lm, E] */

    uint64_t n_samples;      /* S */
    uint64_t *sample_index;  /* [S] */
    uint64_t *sample_tokens; /* [S] */
    uint32_t *sample_count;  /* [S, Lm, E] */
    double *sample_gate;     /* [S, Lm, E] */
};

/* This rank's part of a statistics file being written. */
struct stats_rank_part {
    int rank;                    /* row of /ranks/ this rank writes (its dp index), or -1 */
    const uint64_t *tokens;      /* [Lm] */
    const uint64_t *count;       /* [Lm, E] */
    const double *gate;          /* [Lm, E] */
};

/* Collective over comm: creates path (via path.tmp + rename by rank 0 after every rank
 * is done, so a failed run leaves no file), writes the attributes, totals and samples
 * from `all` (significant on rank 0 only; the rank_* arrays of `all` are ignored) and
 * every rank's row of /ranks/ from `mine`. Returns 0 on every rank, or -1 with a
 * message on the rank(s) that failed (the result is agreed over comm, so all ranks
 * return the same value). */
int stats_write(const char *path, MPI_Comm comm, const struct routing_stats *all,
                const struct stats_rank_part *mine, char *err, size_t err_size);

/* Reads a whole statistics file (serial). Returns 0, or -1 with a message naming the
 * file and the dataset or attribute that is missing or malformed. */
int stats_read(const char *path, struct routing_stats *stats, char *err, size_t err_size);

void stats_free(struct routing_stats *stats);

#endif
