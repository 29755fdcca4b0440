/* stability: bootstrap of the expert selection over the scored samples (see stability.h). */
#include "stability.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files.h"
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

/* ---- the picture ------------------------------------------------------------------- */

/* Whether the full-data choice and most resamples disagree about expert e of layer l. */
static bool unstable(const struct stability *st, const struct expert_selection *full, int l,
                     int e)
{
    bool chosen = select_is_chosen(full, full->moe_layers[l], e);
    double freq = st->inclusion[(size_t)l * st->num_experts + e];
    return chosen ? freq < 0.5 : freq >= 0.5;
}

/* Inclusion frequencies (layers x experts, the full-data choice outlined, disagreements
 * dotted, each layer's mean Jaccard at the right) and the curve of mean Jaccard against
 * tokens scored with the target. */
static void stability_svg(FILE *out, const struct stability *st,
                          const struct expert_selection *full, const char *label)
{
    int Lm = st->n_moe_layers, E = st->num_experts;
    int cell_w = E * 7 > 900 ? 7 : 900 / E > 28 ? 28 : 900 / E;
    int cell_h = Lm * 12 > 560 ? 12 : 560 / Lm > 28 ? 28 : 560 / Lm;
    int left = 64, top = 84, map_w = cell_w * E, map_h = cell_h * Lm;
    int jac_x = left + map_w + 8, plot_x = jac_x + 80, plot_w = 300, plot_h = 200;
    int width = plot_x + plot_w + 40, height = top + (map_h > plot_h + 60 ? map_h : plot_h + 60) + 90;
    if (width < 1000) width = 1000; /* room for the title and the note */
    char colour[8];
    svg_begin(out, width, height);
    fprintf(out,
            "<text x=\"%d\" y=\"24\" font-size=\"16\" font-weight=\"bold\">Selection stability: "
            "mean Jaccard %.3f over %d resamples of %" PRIu64 " samples</text>\n",
            left, st->mean_jaccard, st->resamples, st->n_samples);
    fprintf(out, "<text x=\"%d\" y=\"44\" font-size=\"11\" fill=\"#444\">", left);
    xml_write_text(out, label);
    fprintf(out,
            ": colour = share of resamples choosing the expert; outlined = chosen from all the "
            "data; dot = most resamples disagree</text>\n");
    fprintf(out,
            "<text x=\"14\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\" "
            "transform=\"rotate(-90 14 %d)\">decoder layer</text>\n",
            top + map_h / 2, top + map_h / 2);
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"11\">Jaccard</text>\n", jac_x, top - 8);
    for (int l = 0; l < Lm; l++) {
        int y = top + l * cell_h + cell_h / 2;
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"9\" text-anchor=\"end\" "
                "dominant-baseline=\"central\">%d</text>\n",
                left - 6, y, (int)full->moe_layers[l]);
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"9\" dominant-baseline=\"central\"%s>%.3f"
                "</text>\n",
                jac_x, y, st->layer_jaccard[l] < st->target ? " fill=\"#c00000\"" : "",
                st->layer_jaccard[l]);
    }
    int step = 1;
    while (step * cell_w < 22) step *= 2;
    for (int e = 0; e < E; e += step)
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"9\" text-anchor=\"middle\">%d</text>\n",
                left + e * cell_w + cell_w / 2, top + map_h + 12, e);
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">expert</text>\n",
            left + map_w / 2, top + map_h + 28);
    /* the colour scale: share of resamples, 0 to 1 */
    int scale_y = top + map_h + 44;
    for (int i = 0; i < 10; i++) {
        svg_viridis(i / 9.0, colour);
        fprintf(out, "<rect x=\"%d\" y=\"%d\" width=\"16\" height=\"10\" fill=\"%s\"/>\n",
                left + 16 * i, scale_y, colour);
    }
    fprintf(out,
            "<text x=\"%d\" y=\"%d\" font-size=\"9\">0</text><text x=\"%d\" y=\"%d\" "
            "font-size=\"9\">1 = every resample chose it</text>\n",
            left, scale_y + 22, left + 150, scale_y + 22);
    fputs("<g shape-rendering=\"crispEdges\">\n", out);
    for (int l = 0; l < Lm; l++)
        for (int e = 0; e < E; e++) {
            double freq = st->inclusion[(size_t)l * E + e];
            svg_viridis(freq, colour);
            fprintf(out,
                    "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\">"
                    "<title>layer %d, expert %d: chosen in %.1f%% of resamples%s</title></rect>\n",
                    left + e * cell_w, top + l * cell_h, cell_w, cell_h, colour,
                    (int)full->moe_layers[l], e, 100 * freq,
                    select_is_chosen(full, full->moe_layers[l], e) ? " (chosen)" : "");
        }
    fputs("</g>\n<g fill=\"none\" stroke=\"#ff2020\" stroke-width=\"1.5\">\n", out);
    for (int l = 0; l < Lm; l++)
        for (int i = 0; i < full->n_chosen[l]; i++) {
            int e = full->chosen[(size_t)l * E + i];
            fprintf(out, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\"/>\n",
                    left + e * cell_w + 0.75, top + l * cell_h + 0.75, cell_w - 1.5,
                    cell_h - 1.5);
        }
    fputs("</g>\n<g fill=\"#ffffff\" stroke=\"#000000\" stroke-width=\"0.6\">\n", out);
    double radius = (cell_w < cell_h ? cell_w : cell_h) / 5.0;
    for (int l = 0; l < Lm; l++)
        for (int e = 0; e < E; e++)
            if (unstable(st, full, l, e))
                fprintf(out, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"%.1f\"/>\n",
                        left + e * cell_w + cell_w / 2.0, top + l * cell_h + cell_h / 2.0,
                        radius < 1.5 ? 1.5 : radius);
    fputs("</g>\n", out);

    /* the curve: mean Jaccard (0..1) against the tokens of a resample (0..the most) */
    int py = top + 20;
    double most = 0;
    for (int f = 0; f < STABILITY_FRACTIONS; f++)
        if (st->fraction_tokens[f] > most) most = st->fraction_tokens[f];
    if (!(most > 0)) most = 1;
    fprintf(out,
            "<text x=\"%d\" y=\"%d\" font-size=\"12\" font-weight=\"bold\">Mean Jaccard "
            "against tokens scored</text>\n",
            plot_x, py - 10);
    fprintf(out,
            "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" "
            "stroke=\"#444\"/>\n",
            plot_x, py, plot_w, plot_h);
    for (int i = 0; i <= 4; i++) {
        int y = py + plot_h - plot_h * i / 4;
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"9\" text-anchor=\"end\" "
                "dominant-baseline=\"central\">%.2f</text>\n",
                plot_x - 4, y, i / 4.0);
    }
    int ty = py + plot_h - (int)lround(plot_h * st->target);
    fprintf(out,
            "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#c00000\" "
            "stroke-dasharray=\"4 3\"/><text x=\"%d\" y=\"%d\" font-size=\"9\" "
            "fill=\"#c00000\">target %.2f</text>\n",
            plot_x, ty, plot_x + plot_w, ty, plot_x + 4, ty - 4, st->target);
    fputs("<polyline fill=\"none\" stroke=\"#1f4e99\" stroke-width=\"1.5\" points=\"", out);
    for (int f = 0; f < STABILITY_FRACTIONS; f++)
        fprintf(out, "%s%.1f,%.1f", f ? " " : "", plot_x + plot_w * st->fraction_tokens[f] / most,
                py + plot_h - plot_h * st->fraction_jaccard[f]);
    fputs("\"/>\n", out);
    for (int f = 0; f < STABILITY_FRACTIONS; f++) {
        double x = plot_x + plot_w * st->fraction_tokens[f] / most;
        double y = py + plot_h - plot_h * st->fraction_jaccard[f];
        fprintf(out,
                "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#1f4e99\"><title>%.0f tokens: "
                "%.3f</title></circle>\n",
                x, y, st->fraction_tokens[f], st->fraction_jaccard[f]);
        fprintf(out,
                "<text x=\"%.1f\" y=\"%d\" font-size=\"9\" text-anchor=\"middle\">%.0f</text>\n",
                x, py + plot_h + 12, st->fraction_tokens[f]);
    }
    fprintf(out,
            "<text x=\"%d\" y=\"%d\" font-size=\"11\" text-anchor=\"middle\">tokens in a "
            "resample</text>\n",
            plot_x + plot_w / 2, py + plot_h + 28);
    if (st->tokens_needed >= 0)
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"11\">target reached with about %.0f "
                "scored tokens</text>\n",
                plot_x, py + plot_h + 46, st->tokens_needed);
    else
        fprintf(out,
                "<text x=\"%d\" y=\"%d\" font-size=\"11\" fill=\"#c00000\">target not reached: "
                "score more tokens</text>\n",
                plot_x, py + plot_h + 46);
    fputs("</svg>\n", out);
}

struct picture {
    const struct stability *st;
    const struct expert_selection *full;
    const char *label;
};

static void picture_body(FILE *out, const void *context)
{
    const struct picture *p = context;
    stability_svg(out, p->st, p->full, p->label);
}

int stability_write_svg(const char *path, const struct stability *st,
                        const struct expert_selection *full, const char *label, char *err,
                        size_t err_size)
{
    struct picture p = {st, full, label};
    return file_write_atomically(path, picture_body, &p, err, err_size);
}
