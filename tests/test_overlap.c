/* test_overlap: tasks side by side (src/overlap.h) on a hand-worked example: two tasks on a
 * model of 2 MoE layers and 4 experts, top-2, top_p 0.5. Every expected figure below is
 * worked out by hand in the comment beside it, from the counts alone. Also: the gate score
 * gives the same figures when it is the token score halved (top_p halved too), because a
 * share is taken over the task's whole score; a task against itself is 1 everywhere; the
 * picture holds the numbers and the escaped names. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "files.h"
#include "log.h"
#include "overlap.h"
#include "select.h"
#include "stats.h"

enum { LM = 2, E = 4, K = 2, T = 2 };

/* One task: decoder layers 0 and 1 both MoE, `tokens` tokens per layer, counts [LM, E]
 * (each layer's counts sum to K * tokens), gate sums = counts * gate_per_slot. */
static void make_task(struct routing_stats *s, uint64_t tokens, const uint64_t *counts,
                      double gate_per_slot)
{
    *s = (struct routing_stats){.num_layers = LM, .num_experts = E, .top_k = K, .n_moe_layers = LM};
    s->moe_layers = xmalloc(LM * sizeof *s->moe_layers);
    s->tokens = xmalloc(LM * sizeof *s->tokens);
    s->count = xmalloc(LM * E * sizeof *s->count);
    s->gate = xmalloc(LM * E * sizeof *s->gate);
    for (int l = 0; l < LM; l++) {
        s->moe_layers[l] = l;
        s->tokens[l] = tokens;
    }
    for (int i = 0; i < LM * E; i++) {
        s->count[i] = counts[i];
        s->gate[i] = (double)counts[i] * gate_per_slot;
    }
}

/* Task A, 10 tokens (20 slots) per layer:
 *   layer 0 counts 8 6 4 2   -> T .4 .3 .2 .1; sorted 0, 1: .4 < .5, + .3 = .7 -> A0 = {0, 1}
 *   layer 1 counts 2 2 10 6  -> T .1 .1 .5 .3; expert 2 alone reaches .5   -> A1 = {2}
 * Task B, 5 tokens (10 slots) per layer:
 *   layer 0 counts 0 3 4 3   -> T 0 .3 .4 .3; 2 (.4), then 1 and 3 tie at .3, the lower id
 *                               first: .4 + .3 = .7                          -> B0 = {2, 1}
 *   layer 1 counts 1 1 4 4   -> T .1 .1 .4 .4; 2 and 3 tie, 2 first: .4 < .5, + .4 = .8
 *                                                                            -> B1 = {2, 3}
 * Jaccard, |A and B| / |A or B|:
 *   layer 0: {0,1} vs {1,2}: {1} / {0,1,2} = 1/3;  layer 1: {2} vs {2,3}: {2} / {2,3} = 1/2
 *   overall (mean of the layers): (1/3 + 1/2) / 2 = 5/12; the diagonal 1.
 * Share of row a's score on column b's chosen experts (token scores sum to 1 per layer):
 *   layer 0: A on A {0,1} .4+.3 = .7   A on B {1,2} .3+.2 = .5
 *            B on A {0,1}  0+.3 = .3   B on B {1,2} .3+.4 = .7
 *   layer 1: A on A {2}         = .5   A on B {2,3} .5+.3 = .8
 *            B on A {2}         = .4   B on B {2,3} .4+.4 = .8
 *   overall: A,A (.7+.5)/2 = .6   A,B (.5+.8)/2 = .65   B,A (.3+.4)/2 = .35
 *            B,B (.7+.8)/2 = .75 */
static const uint64_t counts_a[LM * E] = {8, 6, 4, 2, 2, 2, 10, 6};
static const uint64_t counts_b[LM * E] = {0, 3, 4, 3, 1, 1, 4, 4};
static const int want_chosen[T][LM][3] = {{{2, 0, 1}, {1, 2}}, {{2, 2, 1}, {2, 2, 3}}};
static const double want_jaccard[LM][T][T] = {{{1, 1.0 / 3}, {1.0 / 3, 1}}, {{1, 0.5}, {0.5, 1}}};
static const double want_mean_jaccard[T][T] = {{1, 5.0 / 12}, {5.0 / 12, 1}};
static const double want_share[LM][T][T] = {{{0.7, 0.5}, {0.3, 0.7}}, {{0.5, 0.8}, {0.4, 0.8}}};
static const double want_mean_share[T][T] = {{0.6, 0.65}, {0.35, 0.75}};

static void close_to(double got, double want, const char *what, int l, int a, int b)
{
    CHECK(check_close(got, want, 1e-14, 1e-14),
          "%s (layer %d, row %d, column %d): %.17g, by hand %.17g", what, l, a, b, got, want);
}

static void check_figures(const struct task_overlap *o, const char *what)
{
    CHECK(o->n_tasks == T && o->n_moe_layers == LM && o->num_experts == E, "%s: shape", what);
    for (int a = 0; a < T; a++)
        for (int l = 0; l < LM; l++) {
            const struct expert_selection *s = &o->tasks[a];
            int n = want_chosen[a][l][0];
            CHECK(s->n_chosen[l] == n, "%s: task %d layer %d: %d chosen, by hand %d", what, a, l,
                  s->n_chosen[l], n);
            for (int i = 0; i < n && i < s->n_chosen[l]; i++)
                CHECK(s->chosen[l * E + i] == want_chosen[a][l][1 + i],
                      "%s: task %d layer %d: chosen[%d] = %d, by hand %d", what, a, l, i,
                      s->chosen[l * E + i], want_chosen[a][l][1 + i]);
        }
    for (int a = 0; a < T; a++)
        for (int b = 0; b < T; b++) {
            for (int l = 0; l < LM; l++) {
                close_to(o->jaccard[(l * T + a) * T + b], want_jaccard[l][a][b], "Jaccard", l, a,
                         b);
                close_to(o->share[(l * T + a) * T + b], want_share[l][a][b], "share", l, a, b);
            }
            close_to(o->mean_jaccard[a * T + b], want_mean_jaccard[a][b], "mean Jaccard", -1, a, b);
            close_to(o->mean_share[a * T + b], want_mean_share[a][b], "mean share", -1, a, b);
        }
}

static void test_hand_worked(void)
{
    struct routing_stats a, b;
    make_task(&a, 10, counts_a, 1.0);
    make_task(&b, 5, counts_b, 1.0);
    const struct routing_stats *views[T] = {&a, &b};
    const char *paths[T] = {"runs/a&b.h5", "b.h5"};
    struct task_overlap o;
    overlap_run(views, paths, T, SCORE_FUNCTION_TOKEN, 0.5, &o);
    check_figures(&o, "token score");
    CHECK(o.seconds >= 0, "time %g", o.seconds);
    printf("token score: overall Jaccard %.4f, shares %.2f %.2f %.2f %.2f\n", o.mean_jaccard[1],
           o.mean_share[0], o.mean_share[1], o.mean_share[2], o.mean_share[3]);

    /* the picture: both grids' numbers to 2 decimals, names escaped, one closing tag */
    char path[1024], err[1024] = "";
    snprintf(path, sizeof path, "%s/test_overlap.%d.svg",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    CHECK(overlap_write_svg(path, &o, err, sizeof err) == 0, "%s", err);
    size_t n = 0;
    char *svg = file_read(path, 1 << 20, &n, err, sizeof err);
    CHECK(svg != NULL, "%s", err);
    remove(path);
    if (svg) {
        CHECK(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\"") != NULL, "SVG opening");
        CHECK(strstr(svg, "</svg>\n") != NULL && strstr(svg, "</svg>\n")[7] == '\0', "SVG end");
        CHECK(strstr(svg, ">0.42</text>") != NULL, "the overall Jaccard 5/12 in a cell");
        CHECK(strstr(svg, ">0.65</text>") != NULL && strstr(svg, ">0.35</text>") != NULL &&
                  strstr(svg, ">0.75</text>") != NULL && strstr(svg, ">0.60</text>") != NULL,
              "the overall shares in the cells");
        CHECK(strstr(svg, "a&amp;b.h5") != NULL && strstr(svg, "a&b") == NULL,
              "the task named by its escaped basename");
        CHECK(strstr(svg, "runs/") == NULL, "basenames, not paths");
        CHECK(strstr(svg, "token score, top_p = 0.5") != NULL, "the title");
        free(svg);
    }
    overlap_free(&o);

    /* gate sums of 1/4 per slot: G = count / (4 tokens) = T / 2, and at top_p .25 the
     * rule meets the same sums halved, so the same sets; the shares are over the task's
     * whole gate score (.5 per layer), so the same figures, not halved */
    stats_free(&a);
    stats_free(&b);
    make_task(&a, 10, counts_a, 0.25);
    make_task(&b, 5, counts_b, 0.25);
    overlap_run(views, paths, T, SCORE_FUNCTION_GATE, 0.25, &o);
    check_figures(&o, "gate score");
    overlap_free(&o);

    /* a task against itself, three times: 1 everywhere */
    const struct routing_stats *same[3] = {&a, &a, &a};
    const char *same_paths[3] = {"a.h5", "a.h5", "a.h5"};
    overlap_run(same, same_paths, 3, SCORE_FUNCTION_TOKEN, 0.5, &o);
    for (int i = 0; i < LM * 9; i++)
        CHECK(o.jaccard[i] == 1.0, "same task: Jaccard %g", o.jaccard[i]);
    for (int i = 0; i < 9; i++)
        CHECK(o.mean_share[i] == o.mean_share[0], "same task: every share alike (%g, %g)",
              o.mean_share[i], o.mean_share[0]);
    overlap_free(&o);
    stats_free(&a);
    stats_free(&b);
}

int main(void)
{
    test_hand_worked();
    return check_done("test_overlap");
}
