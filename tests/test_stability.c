/* test_stability: select.bootstrap's figures (src/stability.h) against an independent
 * implementation, tests/golden/stability_reference.py (Python, numpy, its own xoshiro256**
 * and selection rule), on the same synthetic per-sample statistics: 40 samples, 3 MoE
 * layers, 8 experts, top-2, token score, top_p 0.4, 50 resamples, seed 20261126; its
 * printed figures are pasted below. Also: identical samples give Jaccard 1 everywhere and
 * inclusion 0 or 1; the tokens needed never fall as the target rises; a file without
 * per-sample statistics, or whose samples do not add up, is refused by name. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "log.h"
#include "select.h"
#include "stability.h"

enum { S = 40, LM = 3, E = 8, K = 2, B = 50 };
#define SEED 20261126ULL
#define TOP_P 0.4

/* printed by tests/golden/stability_reference.py */
static const double want_layer_jaccard[3] = {0.4420000000000002, 0.5720000000000003, 0.45000000000000023};
static const double want_mean_jaccard = 0.48800000000000027;
static const double want_fraction_tokens[4] = {78.24, 160.76, 318.48, 633.76};
static const double want_fraction_jaccard[4] = {0.43166666666666664, 0.4658888888888893,
                                                0.45111111111111163, 0.4880000000000004};
static const double want_inclusion[3][8] = {
    {1.0000000000000004, 0.27999999999999997, 0.4400000000000001, 0.1, 0.3, 0.5000000000000001,
     0.1, 0.27999999999999997},
    {1.0000000000000004, 0.21999999999999997, 0.46000000000000013, 0.32, 0.16, 0.18, 0.08,
     0.5800000000000002},
    {1.0000000000000004, 0.18, 0.36000000000000004, 0.46000000000000013, 0.34,
     0.27999999999999997, 0.06, 0.32},
};

/* The synthetic statistics of the reference script (samples()), with totals summed from
 * the samples; identical: every sample the first one. */
static void make_stats(struct routing_stats *s, bool identical)
{
    memset(s, 0, sizeof *s);
    s->num_layers = LM;
    s->num_experts = E;
    s->top_k = K;
    s->n_moe_layers = LM;
    s->moe_layers = xmalloc(LM * sizeof *s->moe_layers);
    for (int l = 0; l < LM; l++) s->moe_layers[l] = l;
    s->tokens = xcalloc(LM, sizeof *s->tokens);
    s->count = xcalloc(LM * E, sizeof *s->count);
    s->gate = xcalloc(LM * E, sizeof *s->gate);
    s->n_samples = S;
    s->sample_tokens = xcalloc(S, sizeof *s->sample_tokens);
    s->sample_count = xcalloc((size_t)S * LM * E, sizeof *s->sample_count);
    s->sample_gate = xcalloc((size_t)S * LM * E, sizeof *s->sample_gate);
    for (int i = 0; i < S; i++) {
        int src = identical ? 0 : i;
        s->sample_tokens[i] = (uint64_t)(10 + (src * 7) % 13);
        for (int l = 0; l < LM; l++) {
            int w[E], sum = 0;
            for (int e = 0; e < E; e++) sum += w[e] = 1 + (src * 3 + l * 5 + e * e + (src * e) % 5) % 7;
            int slots = K * (int)s->sample_tokens[i], c[E], used = 0;
            for (int e = 0; e < E; e++) used += c[e] = slots * w[e] / sum;
            c[0] += slots - used;
            for (int e = 0; e < E; e++) {
                size_t at = ((size_t)i * LM + l) * E + e;
                s->sample_count[at] = (uint32_t)c[e];
                s->sample_gate[at] = c[e] * (0.5 + 0.01 * ((src + e + l) % 5));
                s->count[l * E + e] += (uint64_t)c[e];
                s->gate[l * E + e] += s->sample_gate[at];
            }
            s->tokens[l] += s->sample_tokens[i];
        }
    }
}

static void close_to(double got, double want, const char *what)
{
    CHECK(fabs(got - want) <= 1e-12 * fmax(1.0, fabs(want)), "%s: %.17g, the reference %.17g",
          what, got, want);
}

/* The picture: one outline per chosen expert, one dot per expert where most resamples
 * disagree with the full-data choice (counted here from the figures), the mean Jaccard in
 * the title. */
static void check_picture(const struct stability *st, const struct expert_selection *full)
{
    char err[512], path[] = "/tmp/esft-stability-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) close(fd);
    CHECK(stability_write_svg(path, st, full, "synthetic model", err, sizeof err) == 0, "%s",
          err);
    int disagree = 0;
    for (int l = 0; l < LM; l++)
        for (int e = 0; e < E; e++) {
            double freq = st->inclusion[l * E + e];
            disagree += select_is_chosen(full, l, e) ? freq < 0.5 : freq >= 0.5;
        }
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "%s not written", path);
    int outlines = 0, dots = 0, title = 0;
    char line[4096], want_title[64];
    snprintf(want_title, sizeof want_title, "mean Jaccard %.3f over %d resamples", st->mean_jaccard,
             B);
    while (f && fgets(line, sizeof line, f)) {
        float x, y, w, h, r;
        char end[8];
        if (sscanf(line, "<rect x=\"%f\" y=\"%f\" width=\"%f\" height=\"%f\"%7s", &x, &y, &w,
                   &h, end) == 5 &&
            !strcmp(end, "/>"))
            outlines++;
        if (sscanf(line, "<circle cx=\"%f\" cy=\"%f\" r=\"%f\"%7s", &x, &y, &r, end) == 4 &&
            !strcmp(end, "/>"))
            dots++;
        title += strstr(line, want_title) != NULL;
    }
    if (f) fclose(f);
    CHECK(outlines == select_count(full), "%d outlines for %d chosen experts", outlines,
          select_count(full));
    CHECK(dots == disagree, "%d dots for %d disagreements", dots, disagree);
    CHECK(title == 1, "the title does not say '%s'", want_title);
    printf("picture: %d outlines, %d disagreements marked\n", outlines, dots);
    unlink(path);
}

static void test_reference(void)
{
    struct routing_stats s;
    make_stats(&s, false);
    const struct routing_stats *views[1] = {&s};
    const char *paths[1] = {"synthetic.h5"};
    struct expert_selection full;
    select_experts(views, 1, SCORE_FUNCTION_TOKEN, TOP_P, false, &full);
    static const int want_full[LM][3] = {{0, 4, 2}, {0, 2, 7}, {0, 3, 7}};
    for (int l = 0; l < LM; l++) {
        CHECK(full.n_chosen[l] == 3, "layer %d: %d chosen", l, full.n_chosen[l]);
        for (int i = 0; i < 3; i++)
            CHECK(full.chosen[l * E + i] == want_full[l][i], "layer %d: chosen[%d] %d", l, i,
                  full.chosen[l * E + i]);
    }
    struct stability st;
    char err[512];
    CHECK(stability_run(views, paths, 1, SCORE_FUNCTION_TOKEN, TOP_P, &full, B, SEED, 0.45, &st,
                        err, sizeof err) == 0, "%s", err);
    close_to(st.mean_jaccard, want_mean_jaccard, "mean Jaccard");
    for (int l = 0; l < LM; l++) {
        close_to(st.layer_jaccard[l], want_layer_jaccard[l], "layer Jaccard");
        for (int e = 0; e < E; e++) close_to(st.inclusion[l * E + e], want_inclusion[l][e], "inclusion");
    }
    for (int f = 0; f < STABILITY_FRACTIONS; f++) {
        close_to(st.fraction_tokens[f], want_fraction_tokens[f], "tokens of a fraction");
        close_to(st.fraction_jaccard[f], want_fraction_jaccard[f], "Jaccard of a fraction");
    }
    /* target 0.45: the first fraction at or above it is 1/4 */
    close_to(st.tokens_needed, want_fraction_tokens[1], "tokens needed for 0.45");
    printf("bootstrap: mean Jaccard %.4f, by fraction %.4f %.4f %.4f %.4f: the reference's\n",
           st.mean_jaccard, st.fraction_jaccard[0], st.fraction_jaccard[1],
           st.fraction_jaccard[2], st.fraction_jaccard[3]);
    check_picture(&st, &full);
    stability_free(&st);

    /* the tokens needed never fall as the target rises (unreachable counts as infinite) */
    double previous = 0;
    for (double target = 0.05; target <= 1.0; target += 0.05) {
        CHECK(stability_run(views, paths, 1, SCORE_FUNCTION_TOKEN, TOP_P, &full, 10, SEED, target,
                            &st, err, sizeof err) == 0, "%s", err);
        double needed = st.tokens_needed < 0 ? INFINITY : st.tokens_needed;
        CHECK(needed >= previous, "target %.2f: %g tokens, less than %g for a lower target",
              target, needed, previous);
        previous = needed;
        stability_free(&st);
    }
    CHECK(isinf(previous), "a target of 1 should not be reached on noisy samples");

    /* a file whose samples do not add up to its totals, and one without samples */
    s.tokens[1] += 1;
    CHECK(stability_run(views, paths, 1, SCORE_FUNCTION_TOKEN, TOP_P, &full, 10, SEED, 0.9, &st, err,
                        sizeof err) == -1 &&
              strstr(err, "synthetic.h5: the per-sample statistics of MoE layer 1"),
          "not adding up: %s", err);
    s.tokens[1] -= 1;
    uint64_t n = s.n_samples;
    s.n_samples = 0;
    CHECK(stability_run(views, paths, 1, SCORE_FUNCTION_TOKEN, TOP_P, &full, 10, SEED, 0.9, &st, err,
                        sizeof err) == -1 &&
              strstr(err, "synthetic.h5: no per-sample statistics"),
          "no samples: %s", err);
    s.n_samples = n;
    expert_selection_free(&full);
    stats_free(&s);
}

static void test_identical(void)
{
    struct routing_stats s;
    make_stats(&s, true);
    const struct routing_stats *views[1] = {&s};
    const char *paths[1] = {"identical.h5"};
    struct expert_selection full;
    select_experts(views, 1, SCORE_FUNCTION_GATE, TOP_P, false, &full);
    struct stability st;
    char err[512];
    CHECK(stability_run(views, paths, 1, SCORE_FUNCTION_GATE, TOP_P, &full, B, SEED, 0.9, &st, err,
                        sizeof err) == 0, "%s", err);
    /* 1 up to the rounding of the means (sums of 1 / B) */
    CHECK(fabs(st.mean_jaccard - 1.0) < 1e-12, "identical samples: mean Jaccard %.17g",
          st.mean_jaccard);
    for (int f = 0; f < STABILITY_FRACTIONS; f++)
        CHECK(fabs(st.fraction_jaccard[f] - 1.0) < 1e-12, "identical samples, fraction %g: %.17g",
              st.fraction[f], st.fraction_jaccard[f]);
    for (int l = 0; l < LM; l++)
        for (int e = 0; e < E; e++) {
            double want = select_is_chosen(&full, l, e) ? 1.0 : 0.0;
            CHECK(fabs(st.inclusion[l * E + e] - want) < 1e-12, "identical samples: inclusion "
                  "of %d/%d %.17g", l, e, st.inclusion[l * E + e]);
        }
    CHECK(st.tokens_needed == st.fraction_tokens[0], "identical samples: the smallest fraction "
          "is enough (%g, %g)", st.tokens_needed, st.fraction_tokens[0]);
    printf("identical samples: Jaccard 1 at every fraction\n");
    stability_free(&st);
    expert_selection_free(&full);
    stats_free(&s);
}

int main(void)
{
    test_reference();
    test_identical();
    return check_done("test_stability");
}
