/* stability: how much a selection depends on the particular samples scored
 * (select.bootstrap). The scored samples of the statistics files (pooled, in file order,
 * each file's samples in their stored order) are resampled with replacement; the
 * selection rule (select.h) is applied to each resample's summed counts and gate sums;
 * each resampled selection is compared with the selection from all the data by the
 * Jaccard similarity of the chosen sets, |A and B| / |A or B|, per MoE layer.
 *
 * Resampling order, so that another implementation can reproduce the figures: one
 * rng (rng.h) seeded with the seed; for each fraction f in 1/8, 1/4, 1/2, 1 (in this
 * order), B resamples, each of n = max(1, round(f * S)) draws rng_below(S) of the S
 * pooled samples. The full-fraction resamples give the per-layer mean Jaccard and each
 * expert's inclusion frequency; each fraction gives the mean Jaccard over its resamples
 * and layers and the mean tokens a resample holds. The tokens needed for a target is
 * that mean for the smallest fraction whose mean Jaccard reaches the target (so it can
 * only grow with the target), or -1 when no fraction reaches it. */
#ifndef ESFT_STABILITY_H
#define ESFT_STABILITY_H

#include <stddef.h>
#include <stdint.h>

#include "deck.h"
#include "select.h"
#include "stats.h"

enum { STABILITY_FRACTIONS = 4 };

struct stability {
    int resamples;   /* B */
    uint64_t seed;
    int n_moe_layers, num_experts;
    uint64_t n_samples; /* S, pooled */
    double *layer_jaccard; /* [Lm] mean over the full-fraction resamples */
    double mean_jaccard;   /* the mean of layer_jaccard */
    double *inclusion;     /* [Lm, E] share of full-fraction resamples that chose e */
    double fraction[STABILITY_FRACTIONS];
    double fraction_tokens[STABILITY_FRACTIONS];  /* mean tokens of a resample */
    double fraction_jaccard[STABILITY_FRACTIONS]; /* mean over resamples and layers */
    double target;
    double tokens_needed; /* -1: no fraction reaches the target */
    double seconds;       /* time it took */
};

/* The figures for the selection `full` made from stats (summed, not union_tasks) with
 * function and top_p. 0, or -1 with a message naming the file when a file holds no
 * per-sample statistics or they do not add up to its totals. */
int stability_run(const struct routing_stats *const *stats, const char *const *paths, int n_stats,
                  enum score_function function, double top_p,
                  const struct expert_selection *full, int resamples, uint64_t seed,
                  double target, struct stability *out, char *err, size_t err_size);
void stability_free(struct stability *s);

/* The picture of the figures (SVG) at path, via path.tmp: each expert's inclusion
 * frequency per MoE layer (colour), the full-data choice outlined, a dot where most
 * resamples disagree with it (chosen but in fewer than half, or not chosen but in half or
 * more), each layer's mean Jaccard (red below the target); and the mean Jaccard against
 * the tokens of a resample, with the target. label names the model. 0, or -1 with a
 * message. */
int stability_write_svg(const char *path, const struct stability *st,
                        const struct expert_selection *full, const char *label, char *err,
                        size_t err_size);

#endif
