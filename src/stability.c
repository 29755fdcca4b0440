/* stability: bootstrap of the expert selection over the scored samples (see stability.h). */
#include "stability.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "rng.h"

/* One pooled sample: its file and row. */
struct pooled {
    const struct routing_stats *stats;
    uint64_t row;
};

/* Whether a file's per-sample statistics add up to its totals. */
static int check_samples(const struct routing_stats *s, const char *path, char *err,
                         size_t err_size)
{
    size_t Lm = (size_t)s->n_moe_layers, E = (size_t)s->num_experts;
    if (s->n_samples == 0 || !s->sample_count || !s->sample_gate || !s->sample_tokens) {
        snprintf(err, err_size, "%s: no per-sample statistics (/samples): select.bootstrap "
                 "needs them", path);
        return -1;
    }
    uint64_t tokens = 0;
    for (uint64_t i = 0; i < s->n_samples; i++) tokens += s->sample_tokens[i];
    for (size_t l = 0; l < Lm; l++) {
        uint64_t count = 0;
        for (uint64_t i = 0; i < s->n_samples; i++)
            for (size_t e = 0; e < E; e++) count += s->sample_count[(i * Lm + l) * E + e];
        if (s->tokens[l] != tokens || count != s->tokens[l] * (uint64_t)s->top_k) {
            snprintf(err, err_size, "%s: the per-sample statistics of MoE layer %d (%" PRIu64
                     " tokens, %" PRIu64 " slots) do not add up to its totals (%" PRIu64
                     " tokens)", path, (int)s->moe_layers[l], tokens, count, s->tokens[l]);
            return -1;
        }
    }
    return 0;
}

/* |a and b| / |a or b| of two chosen lists. */
static double jaccard(const int *a, int na, const int *b, int nb, unsigned char *mark, int E)
{
    memset(mark, 0, (size_t)E);
    for (int i = 0; i < na; i++) mark[a[i]] = 1;
    int both = 0;
    for (int i = 0; i < nb; i++) both += mark[b[i]];
    int either = na + nb - both;
    return either > 0 ? (double)both / either : 1.0;
}

int stability_run(const struct routing_stats *const *stats, const char *const *paths, int n_stats,
                  enum score_function function, double top_p,
                  const struct expert_selection *full, int resamples, uint64_t seed,
                  double target, struct stability *out, char *err, size_t err_size)
{
    memset(out, 0, sizeof *out);
    double start = wall_time();
    uint64_t S = 0;
    for (int f = 0; f < n_stats; f++) {
        if (check_samples(stats[f], paths[f], err, err_size) != 0) return -1;
        S += stats[f]->n_samples;
    }
    struct pooled *pool = xmalloc(S * sizeof *pool);
    for (int f = 0, k = 0; f < n_stats; f++)
        for (uint64_t i = 0; i < stats[f]->n_samples; i++) pool[k++] = (struct pooled){stats[f], i};

    int Lm = full->n_moe_layers, E = full->num_experts;
    size_t LE = (size_t)Lm * E;
    out->resamples = resamples;
    out->seed = seed;
    out->n_moe_layers = Lm;
    out->num_experts = E;
    out->n_samples = S;
    out->target = target;
    out->layer_jaccard = xcalloc((size_t)Lm, sizeof *out->layer_jaccard);
    out->inclusion = xcalloc(LE, sizeof *out->inclusion);

    /* a resample's sums, as a statistics record that select_scores reads */
    struct routing_stats draw = *stats[0];
    draw.tokens = xcalloc((size_t)Lm, sizeof *draw.tokens);
    draw.count = xcalloc(LE, sizeof *draw.count);
    draw.gate = xcalloc(LE, sizeof *draw.gate);
    double *scores = xmalloc(LE * sizeof *scores);
    int *chosen = xmalloc((size_t)E * sizeof *chosen);
    unsigned char *mark = xmalloc((size_t)E);

    struct rng rng;
    rng_seed(&rng, seed);
    static const double fractions[STABILITY_FRACTIONS] = {0.125, 0.25, 0.5, 1.0};
    for (int fi = 0; fi < STABILITY_FRACTIONS; fi++) {
        uint64_t n = (uint64_t)llround(fractions[fi] * (double)S);
        if (n < 1) n = 1;
        double jaccard_sum = 0, tokens_sum = 0;
        for (int b = 0; b < resamples; b++) {
            memset(draw.count, 0, LE * sizeof *draw.count);
            memset(draw.gate, 0, LE * sizeof *draw.gate);
            uint64_t tokens = 0;
            for (uint64_t j = 0; j < n; j++) {
                const struct pooled *p = &pool[rng_below(&rng, S)];
                const struct routing_stats *s = p->stats;
                tokens += s->sample_tokens[p->row];
                const uint32_t *count = &s->sample_count[p->row * LE];
                const double *gate = &s->sample_gate[p->row * LE];
                for (size_t i = 0; i < LE; i++) {
                    draw.count[i] += count[i];
                    draw.gate[i] += gate[i];
                }
            }
            for (int l = 0; l < Lm; l++) draw.tokens[l] = tokens;
            tokens_sum += (double)tokens;
            select_scores(&draw, function, scores);
            for (int l = 0; l < Lm; l++) {
                double cumulative;
                int k = select_layer(&scores[(size_t)l * E], E, top_p, chosen, &cumulative);
                double j = jaccard(&full->chosen[(size_t)l * E], full->n_chosen[l], chosen, k,
                                   mark, E);
                jaccard_sum += j;
                if (fi == STABILITY_FRACTIONS - 1) {
                    out->layer_jaccard[l] += j / resamples;
                    for (int i = 0; i < k; i++)
                        out->inclusion[(size_t)l * E + chosen[i]] += 1.0 / resamples;
                }
            }
        }
        out->fraction[fi] = fractions[fi];
        out->fraction_tokens[fi] = resamples ? tokens_sum / resamples : 0;
        out->fraction_jaccard[fi] = resamples && Lm ? jaccard_sum / ((double)resamples * Lm) : 0;
    }
    for (int l = 0; l < Lm; l++) out->mean_jaccard += out->layer_jaccard[l] / Lm;
    out->tokens_needed = -1;
    for (int fi = 0; fi < STABILITY_FRACTIONS; fi++)
        if (out->fraction_jaccard[fi] >= target) {
            out->tokens_needed = out->fraction_tokens[fi];
            break;
        }
    out->seconds = wall_time() - start;
    free(draw.tokens), free(draw.count), free(draw.gate);
    free(scores), free(chosen), free(mark), free(pool);
    return 0;
}

void stability_free(struct stability *s)
{
    free(s->layer_jaccard);
    free(s->inclusion);
    memset(s, 0, sizeof *s);
}
