/* test_select: the select phase and the statistics file it reads (src/select.c,
 * src/stats.c). An MPI program: run it under any rank count (run-tests uses 1 and 3).
 *   - the per-layer rule on hand-worked examples (every expectation below is worked out
 *     by hand in the comment beside it);
 *   - token and gate scores of a small statistics struct; several files summed and as a
 *     union; the reference's layer-axis normalisation must not happen;
 *   - stats_write on MPI_COMM_WORLD (each rank its own /ranks/ row) -> stats_read, every
 *     array equal; stats_read's errors on a damaged file;
 *   - phase_select end to end on a file written here, against tests/golden/qwen2_moe;
 *     with two task files, the tasks side by side (the "tasks" member and its picture).
 * Usage: test_select GOLDEN_DIR (tests/golden). */
#include <hdf5.h>
#include <jansson.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "checksum.h"
#include "deck.h"
#include "hfconfig.h"
#include "layout.h"
#include "log.h"
#include "model.h"
#include "select.h"
#include "stats.h"

static int world_rank, world_size;

static bool same_ints(const int *got, int n_got, const int *want, int n_want)
{
    if (n_got != n_want) return false;
    for (int i = 0; i < n_want; i++)
        if (got[i] != want[i]) return false;
    return true;
}

/* select_layer on scores, compared with the hand-worked list. */
static void check_layer(const char *what, const double *scores, int E, double top_p,
                        const int *want, int n_want)
{
    int chosen[64];
    double cumulative = -1;
    int n = select_layer(scores, E, top_p, chosen, &cumulative);
    char got[256] = "";
    for (int i = 0; i < n; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), " %d", chosen[i]);
    CHECK(same_ints(chosen, n, want, n_want), "%s: chose [%s ] (%d experts)", what, got, n);
    double sum = 0;
    for (int i = 0; i < n_want; i++) sum += scores[want[i]];
    CHECK(check_close(cumulative, sum, 1e-15, 1e-15), "%s: cumulative %.17g, want %.17g", what,
          cumulative, sum);
}

static void test_rule(void)
{
    /* order 1 (0.5), 3 (0.25), ...: 0.5 < 0.6, so 3 is added and crosses: [1, 3] */
    double crossing[] = {0.1, 0.5, 0.05, 0.25, 0.1};
    check_layer("crossing expert included", crossing, 5, 0.6, (int[]){1, 3}, 2);
    /* 0.5 + 0.25 = 0.75 exactly: reached, stop: [1, 0] */
    double exact[] = {0.25, 0.5, 0.125, 0.125};
    check_layer("exact hit (binary fractions)", exact, 4, 0.75, (int[]){1, 0}, 2);
    /* 0.7 + 0.1 is 0.7999999999999999 in doubles but reaches 0.8: [0, 1], not [0, 1, 2] */
    double inexact[] = {0.7, 0.1, 0.1, 0.1};
    CHECK(0.7 + 0.1 < 0.8, "the example relies on 0.7 + 0.1 < 0.8 in doubles");
    check_layer("exact hit (rounded sum)", inexact, 4, 0.8, (int[]){0, 1}, 2);
    /* ties to the lower index: 1 and 3 tie at 0.3, then 0 and 2 at 0.2 */
    double ties[] = {0.2, 0.3, 0.2, 0.3};
    check_layer("ties, top_p 0.5", ties, 4, 0.5, (int[]){1, 3}, 2);
    check_layer("ties, top_p 0.7", ties, 4, 0.7, (int[]){1, 3, 0}, 3);
    double all_tied[] = {0.25, 0.25, 0.25, 0.25};
    check_layer("all tied", all_tied, 4, 0.3, (int[]){0, 1}, 2);
    /* token scores 1/7, 2/7, 4/7, 0 with top_p 1: the three with a count, not the zero */
    double sevenths[] = {1.0 / 7, 2.0 / 7, 4.0 / 7, 0.0};
    check_layer("top_p 1", sevenths, 4, 1.0, (int[]){2, 1, 0}, 3);
    /* gate scores summing to 0.6 < top_p 0.9: every expert, by descending score */
    double gate_total[] = {0.1, 0.3, 0.05, 0.15};
    check_layer("top_p above the total", gate_total, 4, 0.9, (int[]){1, 3, 0, 2}, 4);
    /* one expert above top_p: alone */
    double dominant[] = {0.05, 0.9, 0.05};
    check_layer("one expert above top_p", dominant, 3, 0.2, (int[]){1}, 1);
    /* all zero (a layer that saw nothing): every expert, in index order */
    double zeros[] = {0, 0, 0};
    check_layer("all zero", zeros, 3, 0.2, (int[]){0, 1, 2}, 3);
}

/* A statistics struct with totals only: Lm layers, E experts, top-k K. */
static void make_stats(struct routing_stats *s, int num_layers, int Lm, const int32_t *moe_layers,
                       int E, int K, const uint64_t *tokens, const uint64_t *count,
                       const double *gate, uint64_t hash)
{
    memset(s, 0, sizeof *s);
    snprintf(s->model_path, sizeof s->model_path, "hand-made");
    s->config_hash = hash;
    s->num_layers = num_layers;
    s->n_moe_layers = Lm;
    s->num_experts = E;
    s->top_k = K;
    s->moe_layers = xmalloc((size_t)Lm * sizeof *s->moe_layers);
    memcpy(s->moe_layers, moe_layers, (size_t)Lm * sizeof *s->moe_layers);
    s->tokens = xmalloc((size_t)Lm * sizeof *s->tokens);
    memcpy(s->tokens, tokens, (size_t)Lm * sizeof *s->tokens);
    s->count = xcalloc((size_t)Lm * E, sizeof *s->count);
    if (count) memcpy(s->count, count, (size_t)Lm * E * sizeof *s->count);
    s->gate = xcalloc((size_t)Lm * E, sizeof *s->gate);
    if (gate) memcpy(s->gate, gate, (size_t)Lm * E * sizeof *s->gate);
}

static void check_chosen(const char *what, const struct expert_selection *sel, int l,
                         const int *want, int n_want)
{
    CHECK(same_ints(&sel->chosen[(size_t)l * sel->num_experts], sel->n_chosen[l], want, n_want),
          "%s: layer row %d: %d experts chosen, first %d", what, l, sel->n_chosen[l],
          sel->n_chosen[l] ? sel->chosen[(size_t)l * sel->num_experts] : -1);
}

static void test_scores(void)
{
    /* 2 MoE layers (decoder layers 1 and 3), 4 experts, top-2.
     * layer 1: 10 tokens, 20 slots; counts 8 6 4 2 -> T 0.4 0.3 0.2 0.1;
     *          gate sums 3 4 1 2 -> G 0.3 0.4 0.1 0.2.
     * layer 3: 20 tokens, 40 slots; counts 2 30 4 4 -> T 0.05 0.75 0.1 0.1;
     *          gate sums 1 6 2 5 -> G 0.05 0.3 0.1 0.25 (total 0.7: no renormalisation). */
    const uint64_t tokens[] = {10, 20};
    const uint64_t count[] = {8, 6, 4, 2, 2, 30, 4, 4};
    const double gate[] = {3, 4, 1, 2, 1, 6, 2, 5};
    struct routing_stats s;
    make_stats(&s, 4, 2, (int32_t[]){1, 3}, 4, 2, tokens, count, gate, 42);
    double scores[8];
    const double T[8] = {0.4, 0.3, 0.2, 0.1, 0.05, 0.75, 0.1, 0.1};
    const double G[8] = {0.3, 0.4, 0.1, 0.2, 0.05, 0.3, 0.1, 0.25};
    select_scores(&s, SCORE_FUNCTION_TOKEN, scores);
    for (int i = 0; i < 8; i++)
        CHECK(check_close(scores[i], T[i], 1e-15, 0), "token score %d: %.17g, want %g", i,
              scores[i], T[i]);
    select_scores(&s, SCORE_FUNCTION_GATE, scores);
    for (int i = 0; i < 8; i++)
        CHECK(check_close(scores[i], G[i], 1e-15, 0), "gate score %d: %.17g, want %g", i, scores[i],
              G[i]);

    const struct routing_stats *one[] = {&s};
    struct expert_selection sel;
    /* token, top_p 0.5: layer 1 0.4 + 0.3 -> [0, 1]; layer 3 0.75 -> [1] */
    select_experts(one, 1, SCORE_FUNCTION_TOKEN, 0.5, false, &sel);
    check_chosen("token", &sel, 0, (int[]){0, 1}, 2);
    check_chosen("token", &sel, 1, (int[]){1}, 1);
    CHECK(sel.moe_layers[0] == 1 && sel.moe_layers[1] == 3, "layer keys are the decoder layers");
    CHECK(select_is_chosen(&sel, 1, 0) && !select_is_chosen(&sel, 0, 0) &&
              !select_is_chosen(&sel, 2, 1) && select_is_chosen(&sel, 3, 1),
          "select_is_chosen by decoder layer (no shift by one)");
    expert_selection_free(&sel);
    /* gate, top_p 0.5: layer 1 0.4 + 0.3 -> [1, 0]; layer 3 0.3 + 0.25 -> [1, 3] */
    select_experts(one, 1, SCORE_FUNCTION_GATE, 0.5, false, &sel);
    check_chosen("gate", &sel, 0, (int[]){1, 0}, 2);
    check_chosen("gate", &sel, 1, (int[]){1, 3}, 2);
    CHECK(check_close(sel.cumulative[1], 0.55, 1e-15, 0), "gate cumulative %.17g",
          sel.cumulative[1]);
    expert_selection_free(&sel);
    /* gate, top_p 0.9 > layer 3's total 0.7: every expert there, by score [1, 3, 2, 0] */
    select_experts(one, 1, SCORE_FUNCTION_GATE, 0.9, false, &sel);
    check_chosen("gate above total", &sel, 1, (int[]){1, 3, 2, 0}, 4);
    expert_selection_free(&sel);
    stats_free(&s);
}

static void test_no_layer_normalisation(void)
{
    /* top-1, 10 tokens per layer. Layer A counts 6 4 (T 0.6 0.4), layer B 9 1 (T 0.9 0.1).
     * Per layer with top_p 0.5: A -> [0], B -> [0]. Normalising each expert over the layer
     * axis (the reference script's bug) would give A 0.4 0.8 and choose [1] in A. */
    struct routing_stats s;
    make_stats(&s, 2, 2, (int32_t[]){0, 1}, 2, 1, (uint64_t[]){10, 10}, (uint64_t[]){6, 4, 9, 1},
               NULL, 7);
    const struct routing_stats *one[] = {&s};
    struct expert_selection sel;
    select_experts(one, 1, SCORE_FUNCTION_TOKEN, 0.5, false, &sel);
    check_chosen("no layer normalisation", &sel, 0, (int[]){0}, 1);
    check_chosen("no layer normalisation", &sel, 1, (int[]){0}, 1);
    CHECK(sel.scores[0] == 0.6 && sel.scores[1] == 0.4 && sel.scores[2] == 0.9,
          "scores are per layer, not normalised over layers: %g %g %g", sel.scores[0],
          sel.scores[1], sel.scores[2]);
    expert_selection_free(&sel);
    stats_free(&s);
}

static void test_several_files(void)
{
    /* top-1, one MoE layer, 4 experts.
     * f1: 10 tokens, counts 6 3 1 0  (T 0.6 0.3 0.1 0)  -> alone [0]
     * f2: 30 tokens, counts 0 3 12 15 (T 0 0.1 0.4 0.5) -> alone [3] (0.5 reaches 0.5)
     * summed: 40 tokens, counts 6 6 13 15 (T 0.15 0.15 0.325 0.375) -> [3, 2] (0.7)
     * union: {0, 3} ordered by the summed score -> [3, 0], cumulative 0.525 */
    struct routing_stats f1, f2, f3;
    make_stats(&f1, 1, 1, (int32_t[]){0}, 4, 1, (uint64_t[]){10}, (uint64_t[]){6, 3, 1, 0}, NULL,
               99);
    make_stats(&f2, 1, 1, (int32_t[]){0}, 4, 1, (uint64_t[]){30}, (uint64_t[]){0, 3, 12, 15}, NULL,
               99);
    make_stats(&f3, 1, 1, (int32_t[]){0}, 4, 1, (uint64_t[]){30}, (uint64_t[]){0, 3, 12, 15}, NULL,
               98);
    char err[1024] = "";
    CHECK(select_same_model(&f1, "f1.h5", &f2, "f2.h5", err, sizeof err) == 0, "same model: %s",
          err);
    CHECK(select_same_model(&f1, "f1.h5", &f3, "f3.h5", err, sizeof err) != 0,
          "different hash accepted");
    CHECK(strstr(err, "f1.h5") && strstr(err, "f3.h5"), "message names both files: %s", err);
    f3.config_hash = 99;
    f3.moe_layers[0] = 1;
    f3.num_layers = 2;
    CHECK(select_same_model(&f1, "f1.h5", &f3, "f3.h5", err, sizeof err) != 0 &&
              strstr(err, "MoE layers"),
          "different MoE layers accepted: %s", err);

    const struct routing_stats *both[] = {&f1, &f2};
    struct expert_selection sel;
    select_experts(both, 2, SCORE_FUNCTION_TOKEN, 0.5, false, &sel);
    check_chosen("summed", &sel, 0, (int[]){3, 2}, 2);
    CHECK(check_close(sel.scores[0], 0.15, 1e-15, 0) && check_close(sel.scores[3], 0.375, 1e-15, 0),
          "summed scores %g %g", sel.scores[0], sel.scores[3]);
    expert_selection_free(&sel);
    select_experts(both, 2, SCORE_FUNCTION_TOKEN, 0.5, true, &sel);
    check_chosen("union", &sel, 0, (int[]){3, 0}, 2);
    CHECK(check_close(sel.cumulative[0], 0.525, 1e-15, 0), "union cumulative %.17g",
          sel.cumulative[0]);
    expert_selection_free(&sel);
    stats_free(&f1);
    stats_free(&f2);
    stats_free(&f3);
}

/* ---- the statistics file --------------------------------------------------------- */

enum { RT_LAYERS = 3, RT_LM = 2, RT_E = 5, RT_K = 2, RT_S = 4 };

static void fill_all(struct routing_stats *s, int R)
{
    memset(s, 0, sizeof *s);
    snprintf(s->model_path, sizeof s->model_path, "/models/qwen \"tiny\" & co");
    snprintf(s->model_type, sizeof s->model_type, "qwen2_moe");
    s->config_hash = 0xfedcba9876543210ull;
    s->num_layers = RT_LAYERS;
    s->num_experts = RT_E;
    s->top_k = RT_K;
    s->norm_topk_prob = true;
    snprintf(s->dataset, sizeof s->dataset, "data/math.h5");
    snprintf(s->dataset_checksum, sizeof s->dataset_checksum, "0123456789abcdef");
    snprintf(s->tokenizer, sizeof s->tokenizer, "models/q/tokenizer.json");
    snprintf(s->tokenizer_checksum, sizeof s->tokenizer_checksum, "fedcba9876543210");
    s->seed = -5934875;
    s->n_sample_tokens = 131072;
    snprintf(s->tokens_scored, sizeof s->tokens_scored, "loss");
    s->world = R;
    s->pp = 1;
    s->dp = R;
    s->ep = 1;
    s->deck = xstrdup("phase: score\nscore:\n  n_sample_tokens: 131072\n");
    s->n_moe_layers = RT_LM;
    s->moe_layers = xmalloc(RT_LM * sizeof *s->moe_layers);
    s->moe_layers[0] = 0;
    s->moe_layers[1] = 2;
    size_t LE = RT_LM * RT_E;
    s->tokens = xmalloc(RT_LM * sizeof *s->tokens);
    s->count = xmalloc(LE * sizeof *s->count);
    s->gate = xmalloc(LE * sizeof *s->gate);
    s->coact = xmalloc(LE * RT_E * sizeof *s->coact);
    for (int l = 0; l < RT_LM; l++) s->tokens[l] = 1000 + (uint64_t)l;
    for (size_t i = 0; i < LE; i++) {
        s->count[i] = 7 * i + 3 + (1ull << 40);
        s->gate[i] = 0.25 * (double)i + 1.0 / 3.0;
    }
    for (size_t i = 0; i < LE * RT_E; i++) s->coact[i] = 11 * i;
    s->n_ranks = R;
    s->n_samples = RT_S;
    s->sample_index = xmalloc(RT_S * sizeof *s->sample_index);
    s->sample_tokens = xmalloc(RT_S * sizeof *s->sample_tokens);
    s->sample_count = xmalloc(RT_S * LE * sizeof *s->sample_count);
    s->sample_gate = xmalloc(RT_S * LE * sizeof *s->sample_gate);
    for (int i = 0; i < RT_S; i++) {
        s->sample_index[i] = 100 - (uint64_t)i * 17;
        s->sample_tokens[i] = 33 + (uint64_t)i;
    }
    for (size_t i = 0; i < RT_S * LE; i++) {
        s->sample_count[i] = (uint32_t)(i * 3 + 1);
        s->sample_gate[i] = (double)i / 7.0;
    }
}

/* rank r's row: values that say which rank wrote them */
struct row {
    uint64_t tokens[RT_LM], count[RT_LM * RT_E];
    double gate[RT_LM * RT_E];
};

static void fill_row(struct row *row, int r)
{
    for (int l = 0; l < RT_LM; l++) row->tokens[l] = 100 * (uint64_t)r + (uint64_t)l;
    for (int i = 0; i < RT_LM * RT_E; i++) {
        row->count[i] = 1000 * (uint64_t)r + (uint64_t)i;
        row->gate[i] = r + i / 8.0;
    }
}

static char tmpdir[1024];

static int write_test_file(const char *path, struct routing_stats *all, char *err, size_t n)
{
    struct row row;
    fill_row(&row, world_rank);
    struct stats_rank_part mine = {world_rank, row.tokens, row.count, row.gate};
    return stats_write(path, MPI_COMM_WORLD, all, &mine, err, n);
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

static void test_stats_round_trip(void)
{
    struct routing_stats all;
    fill_all(&all, world_size);
    char path[1200], err[1024] = "";
    snprintf(path, sizeof path, "%s/stats.h5", tmpdir);
    int rc = write_test_file(path, &all, err, sizeof err);
    CHECK(rc == 0, "stats_write: %s", err);
    char tmp[1300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(!file_exists(tmp), "%s left behind", tmp);

    struct routing_stats got;
    rc = stats_read(path, &got, err, sizeof err);
    CHECK(rc == 0, "stats_read: %s", err);
    if (rc != 0) {
        stats_free(&all);
        return;
    }
    CHECK(strcmp(got.model_path, all.model_path) == 0, "model_path '%s'", got.model_path);
    CHECK(strcmp(got.model_type, "qwen2_moe") == 0, "model_type '%s'", got.model_type);
    CHECK(got.config_hash == all.config_hash, "config_hash %llx",
          (unsigned long long)got.config_hash);
    CHECK(got.num_layers == RT_LAYERS && got.num_experts == RT_E && got.top_k == RT_K &&
              got.norm_topk_prob,
          "dimensions %d %d %d", got.num_layers, got.num_experts, got.top_k);
    CHECK(strcmp(got.dataset, all.dataset) == 0 && got.seed == all.seed &&
              got.n_sample_tokens == all.n_sample_tokens && strcmp(got.tokens_scored, "loss") == 0,
          "dataset '%s' seed %lld n_sample_tokens %lld tokens_scored '%s'", got.dataset, got.seed,
          got.n_sample_tokens, got.tokens_scored);
    CHECK(!strcmp(got.dataset_checksum, "0123456789abcdef") &&
              !strcmp(got.tokenizer, "models/q/tokenizer.json") &&
              !strcmp(got.tokenizer_checksum, "fedcba9876543210"),
          "provenance: dataset_checksum '%s' tokenizer '%s' tokenizer_checksum '%s'",
          got.dataset_checksum, got.tokenizer, got.tokenizer_checksum);
    CHECK(got.world == world_size && got.pp == 1 && got.dp == world_size && got.ep == 1,
          "layout %d %d %d %d", got.world, got.pp, got.dp, got.ep);
    CHECK(got.deck && strcmp(got.deck, all.deck) == 0, "deck text '%s'",
          got.deck ? got.deck : "(null)");
    CHECK(got.n_moe_layers == RT_LM && got.moe_layers[0] == 0 && got.moe_layers[1] == 2,
          "moe_layers");
    size_t LE = RT_LM * RT_E;
    CHECK(memcmp(got.tokens, all.tokens, RT_LM * sizeof *got.tokens) == 0, "totals/tokens");
    CHECK(memcmp(got.count, all.count, LE * sizeof *got.count) == 0, "totals/count");
    CHECK(memcmp(got.gate, all.gate, LE * sizeof *got.gate) == 0, "totals/gate");
    CHECK(got.coact && memcmp(got.coact, all.coact, LE * RT_E * sizeof *got.coact) == 0,
          "totals/coact");
    CHECK(got.n_ranks == world_size, "n_ranks %d", got.n_ranks);
    for (int r = 0; r < world_size && r < got.n_ranks; r++) {
        struct row row;
        fill_row(&row, r);
        CHECK(memcmp(&got.rank_tokens[(size_t)r * RT_LM], row.tokens, sizeof row.tokens) == 0,
              "ranks/tokens row %d", r);
        CHECK(memcmp(&got.rank_count[(size_t)r * LE], row.count, sizeof row.count) == 0,
              "ranks/count row %d", r);
        CHECK(memcmp(&got.rank_gate[(size_t)r * LE], row.gate, sizeof row.gate) == 0,
              "ranks/gate row %d", r);
    }
    CHECK(got.n_samples == RT_S, "n_samples %llu", (unsigned long long)got.n_samples);
    CHECK(memcmp(got.sample_index, all.sample_index, RT_S * sizeof *got.sample_index) == 0 &&
              memcmp(got.sample_tokens, all.sample_tokens, RT_S * sizeof *got.sample_tokens) == 0 &&
              memcmp(got.sample_count, all.sample_count, RT_S * LE * sizeof *got.sample_count) ==
                  0 &&
              memcmp(got.sample_gate, all.sample_gate, RT_S * LE * sizeof *got.sample_gate) == 0,
          "samples/*");
    stats_free(&got);

    /* without co-activation, and with no samples */
    free(all.coact);
    all.coact = NULL;
    all.n_samples = 0;
    snprintf(path, sizeof path, "%s/stats-nocoact.h5", tmpdir);
    rc = write_test_file(path, &all, err, sizeof err);
    CHECK(rc == 0, "stats_write without coact: %s", err);
    rc = stats_read(path, &got, err, sizeof err);
    CHECK(rc == 0 && got.coact == NULL && got.n_samples == 0, "stats_read without coact: %s", err);
    if (rc == 0) stats_free(&got);

    /* a failed write: every rank returns -1, nothing is left */
    snprintf(path, sizeof path, "%s/no/such/dir/stats.h5", tmpdir);
    rc = write_test_file(path, &all, err, sizeof err);
    int worst = 0;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    CHECK(rc == -1 && worst == -1, "write into a missing directory: rc %d", rc);
    CHECK(strstr(err, "stats.h5") != NULL, "message names the file: %s", err);
    /* every rank claiming row 0 (with more than one rank) is refused on every rank */
    if (world_size > 1) {
        struct row row;
        fill_row(&row, 0);
        struct stats_rank_part mine = {0, row.tokens, row.count, row.gate};
        snprintf(path, sizeof path, "%s/stats-rows.h5", tmpdir);
        rc = stats_write(path, MPI_COMM_WORLD, &all, &mine, err, sizeof err);
        CHECK(rc == -1 && strstr(err, "row"), "a row written twice: rc %d: %s", rc, err);
        CHECK(!file_exists(path), "refused write left %s", path);
    }
    stats_free(&all);
}

/* Copies a valid file and damages it (rank 0, serial HDF5). */
static void damaged_copy(const char *from, const char *to, int damage)
{
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    char buf[65536];
    size_t n;
    while (in && out && (n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
    if (in) fclose(in);
    if (out) fclose(out);
    hid_t file = H5Fopen(to, H5F_ACC_RDWR, H5P_DEFAULT);
    if (damage == 0) {
        H5Ldelete(file, "/totals/gate", H5P_DEFAULT);
    } else if (damage == 1) {
        H5Adelete(file, "format");
        hid_t type = H5Tcopy(H5T_C_S1), space = H5Screate(H5S_SCALAR);
        H5Tset_size(type, 8);
        hid_t attr = H5Acreate2(file, "format", type, space, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(attr, type, "not-esft");
        H5Aclose(attr);
        H5Sclose(space);
        H5Tclose(type);
    } else {
        H5Ldelete(file, "/totals/count", H5P_DEFAULT);
        hsize_t dims[2] = {RT_LM, RT_E + 1};
        hid_t space = H5Screate_simple(2, dims, NULL);
        hid_t dset = H5Dcreate2(file, "/totals/count", H5T_STD_U64LE, space, H5P_DEFAULT,
                                H5P_DEFAULT, H5P_DEFAULT);
        H5Dclose(dset);
        H5Sclose(space);
    }
    H5Fclose(file);
}

static void test_stats_errors(void)
{
    if (world_rank != 0) return;
    char good[1200], bad[1200], err[1024] = "";
    snprintf(good, sizeof good, "%s/stats.h5", tmpdir);
    struct routing_stats got;
    const char *expect[3][2] = {
        {"/totals/gate", "missing"}, {"format", "not-esft"}, {"/totals/count", "shape"}};
    for (int damage = 0; damage < 3; damage++) {
        snprintf(bad, sizeof bad, "%s/damaged-%d.h5", tmpdir, damage);
        damaged_copy(good, bad, damage);
        int rc = stats_read(bad, &got, err, sizeof err);
        CHECK(rc == -1, "damage %d accepted", damage);
        CHECK(strstr(err, bad) && strstr(err, expect[damage][0]) && strstr(err, expect[damage][1]),
              "damage %d: message '%s' lacks the file, '%s' or '%s'", damage, err,
              expect[damage][0], expect[damage][1]);
    }
    snprintf(bad, sizeof bad, "%s/absent.h5", tmpdir);
    CHECK(stats_read(bad, &got, err, sizeof err) == -1 && strstr(err, bad), "absent file: %s", err);
    snprintf(bad, sizeof bad, "%s/text.h5", tmpdir);
    FILE *f = fopen(bad, "w");
    if (f) {
        fputs("not hdf5\n", f);
        fclose(f);
    }
    CHECK(stats_read(bad, &got, err, sizeof err) == -1 && strstr(err, "not an HDF5 file"),
          "text file: %s", err);
}

/* ---- the phase, end to end -------------------------------------------------------- */

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = xcalloc((size_t)n + 1, 1);
    if (fread(text, 1, (size_t)n, f) != (size_t)n) text[0] = '\0';
    fclose(f);
    return text;
}

/* A statistics file for tests/golden/qwen2_moe: decoder layers 0 and 2 are MoE, 7 experts,
 * top-2, 10 tokens (20 slots) per layer, counts [2, 7] as given.
 * golden_counts:
 * layer 0 counts 1 7 2 5 0 3 2 -> T .05 .35 .1 .25 0 .15 .1 -> top_p 0.5: [1, 3] (0.6)
 * layer 2 counts 0 2 2 2 12 2 0 -> T 0 .1 .1 .1 .6 .1 0  -> [4] (0.6) */
static const uint64_t golden_counts[14] = {1, 7, 2, 5, 0, 3, 2, 0, 2, 2, 2, 12, 2, 0};
static void write_golden_stats(const char *path, const struct model_config *cfg,
                               const uint64_t counts[14])
{
    struct routing_stats all;
    fill_all(&all, world_size);
    free(all.coact);
    all.coact = NULL;
    all.n_samples = 0;
    all.config_hash = cfg->hash;
    all.n_ranks = 0; /* as the score phase leaves it: R = dp */
    all.num_layers = 3;
    all.num_experts = 7;
    all.top_k = 2;
    all.moe_layers[0] = 0;
    all.moe_layers[1] = 2;
    free(all.count);
    free(all.gate);
    all.count = xmalloc(14 * sizeof *all.count);
    memcpy(all.count, counts, 14 * sizeof *all.count);
    all.gate = xcalloc(14, sizeof *all.gate);
    all.tokens[0] = all.tokens[1] = 10;
    uint64_t row_tokens[2] = {0, 0}, row_count[14] = {0};
    double row_gate[14] = {0};
    struct stats_rank_part mine = {world_rank, row_tokens, row_count, row_gate};
    char err[1024] = "";
    CHECK(stats_write(path, MPI_COMM_WORLD, &all, &mine, err, sizeof err) == 0,
          "stats_write (golden): %s", err);
    stats_free(&all);
}

static void parse_deck(struct deck *deck, const char *text)
{
    char err[4096] = "";
    deck_defaults(deck);
    int n = deck_parse(deck, "test.yaml", text, strlen(text), err, sizeof err);
    n += deck_finish(deck, err, sizeof err);
    CHECK(n == 0, "deck: %s", err);
}

static void check_lines(const char *what, const char *path, const char *const *want, int n_want)
{
    char *text = read_text(path);
    CHECK(text != NULL, "%s: %s not written", what, path);
    if (!text) return;
    int line = 0;
    char *save = NULL;
    for (char *s = strtok_r(text, "\n", &save); s; s = strtok_r(NULL, "\n", &save), line++)
        CHECK(line < n_want && strcmp(s, want[line]) == 0, "%s: line %d is '%s', want '%s'", what,
              line + 1, s, line < n_want ? want[line] : "(end)");
    CHECK(line == n_want, "%s: %d lines, want %d", what, line, n_want);
    free(text);
}

static void check_config(const char *path, bool shared, size_t n_sources,
                         const char *stats_path)
{
    json_error_t error;
    json_t *root = json_load_file(path, 0, &error);
    CHECK(root != NULL, "%s: %s (line %d)", path, error.text, error.line);
    if (!root) return;
    json_t *experts = json_object_get(root, "experts");
    CHECK(json_is_object(experts) && json_object_size(experts) == 2, "experts: two MoE layers");
    json_t *l0 = json_object_get(experts, "0"), *l2 = json_object_get(experts, "2");
    CHECK(json_object_get(experts, "1") == NULL, "dense layer 1 has no key");
    CHECK(json_is_array(l0) && json_array_size(l0) == 2 &&
              json_integer_value(json_array_get(l0, 0)) == 1 &&
              json_integer_value(json_array_get(l0, 1)) == 3,
          "experts[\"0\"] is [1, 3]");
    CHECK(json_is_array(l2) && json_array_size(l2) == 1 &&
              json_integer_value(json_array_get(l2, 0)) == 4,
          "experts[\"2\"] is [4]");
    CHECK(json_is_boolean(json_object_get(root, "shared_experts")) &&
              json_boolean_value(json_object_get(root, "shared_experts")) == shared,
          "shared_experts");
    CHECK(json_is_false(json_object_get(root, "non_expert_modules")), "non_expert_modules");
    const char *function = json_string_value(json_object_get(root, "score_function"));
    CHECK(function && strcmp(function, "token") == 0, "score_function");
    CHECK(json_real_value(json_object_get(root, "top_p")) == 0.5, "top_p");
    json_t *scores = json_object_get(json_object_get(root, "scores"), "0");
    CHECK(json_array_size(scores) == 7 &&
              check_close(json_number_value(json_array_get(scores, 1)), 0.35, 1e-15, 0) &&
              json_number_value(json_array_get(scores, 4)) == 0,
          "scores[\"0\"]");
    json_t *cumulative = json_object_get(root, "cumulative");
    CHECK(check_close(json_number_value(json_object_get(cumulative, "0")), 0.6, 1e-15, 0) &&
              check_close(json_number_value(json_object_get(cumulative, "2")), 0.6, 1e-15, 0),
          "cumulative");
    json_t *sources = json_object_get(root, "sources");
    CHECK(json_array_size(sources) == n_sources &&
              json_string_value(json_object_get(json_array_get(sources, 0), "config_hash")) &&
              strlen(json_string_value(
                  json_object_get(json_array_get(sources, 0), "config_hash"))) == 16 &&
              json_integer_value(json_object_get(json_array_get(sources, 0), "tokens")) == 10,
          "sources");
    CHECK(json_is_string(json_object_get(root, "model_path")), "model_path");
    /* provenance: what produced the statistics, and the statistics file itself */
    uint64_t sum = 0;
    char err[512], hex[17];
    CHECK(checksum_file(stats_path, &sum, err, sizeof err) == 0, "%s", err);
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)sum);
    for (size_t i = 0; i < n_sources; i++) {
        const json_t *src = json_array_get(sources, i);
        const char *got = json_string_value(json_object_get(src, "checksum"));
        CHECK(got && !strcmp(got, hex), "sources[%zu].checksum %s, the file's is %s", i,
              got ? got : "(none)", hex);
        CHECK(!strcmp(json_string_value(json_object_get(src, "dataset")), "data/math.h5") &&
                  !strcmp(json_string_value(json_object_get(src, "dataset_checksum")),
                          "0123456789abcdef") &&
                  !strcmp(json_string_value(json_object_get(src, "tokenizer")),
                          "models/q/tokenizer.json") &&
                  !strcmp(json_string_value(json_object_get(src, "tokenizer_checksum")),
                          "fedcba9876543210") &&
                  json_integer_value(json_object_get(src, "seed")) == -5934875 &&
                  !strcmp(json_string_value(json_object_get(src, "model_type")), "qwen2_moe"),
              "sources[%zu]: dataset, tokenizer, seed, model_type", i);
    }
    CHECK(json_is_string(json_object_get(root, "esft_version")), "esft_version");
    json_decref(root);
}

static double matrix_at(const json_t *m, int a, int b)
{
    return json_number_value(json_array_get(json_array_get(m, (size_t)a), (size_t)b));
}

static bool experts_are(const json_t *list, const int *want, int n)
{
    if (json_array_size(list) != (size_t)n) return false;
    for (int i = 0; i < n; i++)
        if (json_integer_value(json_array_get(list, (size_t)i)) != want[i]) return false;
    return true;
}

/* Two tasks through phase_select with select.union_tasks: the "tasks" member and the
 * picture. Task 1 is golden_counts (chosen: layer 0 [1, 3], layer 2 [4]); task 2:
 * layer 0 counts 0 2 8 6 0 2 2 -> T 0 .1 .4 .3 0 .1 .1 -> [2, 3] (.7)
 * layer 2 counts 2 2 2 2 10 2 0 -> T .1 .1 .1 .1 .5 .1 0 -> [4] (.5)
 * Jaccard: layer 0 {1,3} vs {2,3} = 1/3, layer 2 {4} vs {4} = 1; overall 2/3.
 * Share of row task's score on column task's experts:
 *   layer 0: 1 on 2 {2,3} .1+.25 = .35, 2 on 1 {1,3} .1+.3 = .4, diagonal .6 and .7
 *   layer 2: 1 on 2 {4} .6, 2 on 1 {4} .5, diagonal .6 and .5
 *   overall: 1 on 2 (.35+.6)/2 = .475, 2 on 1 (.4+.5)/2 = .45, diagonal .6 and .6
 * The union (layer 0 {1,2,3} by summed count 9, 10, 11) is [3, 2, 1]. */
static void test_tasks(const char *model_path, const struct model_config *cfg,
                       const struct layout *layout)
{
    static const uint64_t task2_counts[14] = {0, 2, 8, 6, 0, 2, 2, 2, 2, 2, 2, 10, 2, 0};
    char stats1[1200], stats2[1200], out[1200], deck_text[4096], path[1400];
    snprintf(stats1, sizeof stats1, "%s/math_stats.h5", tmpdir);
    snprintf(stats2, sizeof stats2, "%s/code_stats.h5", tmpdir);
    snprintf(out, sizeof out, "%s/select-tasks", tmpdir);
    write_golden_stats(stats1, cfg, golden_counts);
    write_golden_stats(stats2, cfg, task2_counts);
    struct deck deck;
    snprintf(deck_text, sizeof deck_text,
             "phase: select\nrun:\n  output_dir: %s\nmodel:\n  path: %s\nselect:\n"
             "  stats: [%s, %s]\n  top_p: 0.5\n  union_tasks: true\n",
             out, model_path, stats1, stats2);
    parse_deck(&deck, deck_text);
    CHECK(phase_select(&deck, layout) == 0, "phase_select, two tasks");
    deck_free(&deck);
    if (world_rank == 0) {
        snprintf(path, sizeof path, "%s/expert_config.json", out);
        json_error_t error;
        json_t *root = json_load_file(path, 0, &error);
        CHECK(root != NULL, "%s: %s", path, error.text);
        json_t *tasks = json_object_get(root, "tasks");
        CHECK(json_is_object(tasks), "a \"tasks\" member");
        json_t *paths = json_object_get(tasks, "paths");
        CHECK(json_array_size(paths) == 2 &&
                  !strcmp(json_string_value(json_array_get(paths, 0)), stats1) &&
                  !strcmp(json_string_value(json_array_get(paths, 1)), stats2),
              "tasks.paths");
        static const int union0[3] = {3, 2, 1}, first0[2] = {1, 3}, second0[2] = {2, 3},
                         both2[1] = {4};
        CHECK(experts_are(json_object_get(json_object_get(root, "experts"), "0"), union0, 3),
              "the union of the tasks in layer 0");
        json_t *experts = json_object_get(tasks, "experts");
        CHECK(json_array_size(experts) == 2 &&
                  experts_are(json_object_get(json_array_get(experts, 0), "0"), first0, 2) &&
                  experts_are(json_object_get(json_array_get(experts, 0), "2"), both2, 1) &&
                  experts_are(json_object_get(json_array_get(experts, 1), "0"), second0, 2) &&
                  experts_are(json_object_get(json_array_get(experts, 1), "2"), both2, 1),
              "each task's own experts");
        json_t *jaccard = json_object_get(tasks, "jaccard"),
               *share = json_object_get(tasks, "share");
        json_t *j0 = json_object_get(jaccard, "0"), *j2 = json_object_get(jaccard, "2");
        CHECK(check_close(matrix_at(j0, 0, 1), 1.0 / 3, 1e-15, 0) &&
                  check_close(matrix_at(j0, 1, 0), 1.0 / 3, 1e-15, 0) && matrix_at(j0, 0, 0) == 1 &&
                  matrix_at(j2, 0, 1) == 1 && json_object_size(jaccard) == 2,
              "tasks.jaccard per layer");
        json_t *s0 = json_object_get(share, "0"), *s2 = json_object_get(share, "2");
        CHECK(check_close(matrix_at(s0, 0, 1), 0.35, 1e-14, 0) &&
                  check_close(matrix_at(s0, 1, 0), 0.4, 1e-14, 0) &&
                  check_close(matrix_at(s0, 1, 1), 0.7, 1e-14, 0) &&
                  check_close(matrix_at(s2, 0, 1), 0.6, 1e-14, 0) &&
                  check_close(matrix_at(s2, 1, 0), 0.5, 1e-14, 0),
              "tasks.share per layer");
        json_t *mj = json_object_get(tasks, "mean_jaccard"),
               *ms = json_object_get(tasks, "mean_share");
        CHECK(check_close(matrix_at(mj, 0, 1), 2.0 / 3, 1e-15, 0) && matrix_at(mj, 1, 1) == 1,
              "tasks.mean_jaccard");
        CHECK(check_close(matrix_at(ms, 0, 1), 0.475, 1e-14, 0) &&
                  check_close(matrix_at(ms, 1, 0), 0.45, 1e-14, 0) &&
                  check_close(matrix_at(ms, 0, 0), 0.6, 1e-14, 0) &&
                  check_close(matrix_at(ms, 1, 1), 0.6, 1e-14, 0),
              "tasks.mean_share");
        json_decref(root);
        snprintf(path, sizeof path, "%s/expert_config_tasks.svg", out);
        char *svg = read_text(path);
        CHECK(svg != NULL, "%s not written", path);
        if (svg) {
            CHECK(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\"") && strstr(svg, "</svg>"),
                  "tasks picture: standalone SVG");
            CHECK(strstr(svg, "math_stats.h5") && strstr(svg, "code_stats.h5"),
                  "tasks picture: the tasks named");
            CHECK(strstr(svg, ">0.67</text>") && strstr(svg, ">0.45</text>"),
                  "tasks picture: overall Jaccard 2/3 and share .45 in cells");
            free(svg);
        }
        snprintf(path, sizeof path, "%s/expert_config_tasks.svg.tmp", out);
        CHECK(!file_exists(path), "temporary file left");
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

static void test_phase(const char *golden)
{
    char model_path[1200], stats_path[1200], out[1200], deck_text[4096];
    snprintf(model_path, sizeof model_path, "%s/qwen2_moe", golden);
    snprintf(stats_path, sizeof stats_path, "%s/golden-stats.h5", tmpdir);
    snprintf(out, sizeof out, "%s/select-out", tmpdir);
    struct model_config cfg;
    char err[1024] = "";
    int rc = hfconfig_load(model_path, &cfg, err, sizeof err);
    CHECK(rc == 0, "%s", err);
    if (rc != 0) return;
    write_golden_stats(stats_path, &cfg, golden_counts);

    struct layout layout;
    memset(&layout, 0, sizeof layout);
    layout.world_rank = world_rank;
    struct deck deck;
    snprintf(deck_text, sizeof deck_text,
             "phase: select\nrun:\n  output_dir: %s\nmodel:\n  path: %s\nselect:\n"
             "  stats: [%s]\n  top_p: 0.5\n  train_shared_experts: true\n",
             out, model_path, stats_path);
    parse_deck(&deck, deck_text);
    CHECK(phase_select(&deck, &layout) == 0, "phase_select");
    deck_free(&deck);
    char path[1400];
    if (world_rank == 0) {
        snprintf(path, sizeof path, "%s/expert_config.json", out);
        check_config(path, true, 1, stats_path);
        /* one file: no tasks side by side */
        char *text = read_text(path);
        CHECK(text && !strstr(text, "\"tasks\""), "one statistics file: no \"tasks\" member");
        free(text);
        snprintf(path, sizeof path, "%s/expert_config_tasks.svg", out);
        CHECK(!file_exists(path), "one statistics file: %s written", path);
        /* qwen2_moe's parameter table order: per layer, gate of every chosen expert, then
         * up, then down; then the shared expert (train_shared_experts) */
        const char *want[] = {"model.layers.0.mlp.experts.1.gate_proj.weight",
                              "model.layers.0.mlp.experts.3.gate_proj.weight",
                              "model.layers.0.mlp.experts.1.up_proj.weight",
                              "model.layers.0.mlp.experts.3.up_proj.weight",
                              "model.layers.0.mlp.experts.1.down_proj.weight",
                              "model.layers.0.mlp.experts.3.down_proj.weight",
                              "model.layers.0.mlp.shared_expert.gate_proj.weight",
                              "model.layers.0.mlp.shared_expert.up_proj.weight",
                              "model.layers.0.mlp.shared_expert.down_proj.weight",
                              "model.layers.0.mlp.shared_expert_gate.weight",
                              "model.layers.2.mlp.experts.4.gate_proj.weight",
                              "model.layers.2.mlp.experts.4.up_proj.weight",
                              "model.layers.2.mlp.experts.4.down_proj.weight",
                              "model.layers.2.mlp.shared_expert.gate_proj.weight",
                              "model.layers.2.mlp.shared_expert.up_proj.weight",
                              "model.layers.2.mlp.shared_expert.down_proj.weight",
                              "model.layers.2.mlp.shared_expert_gate.weight"};
        snprintf(path, sizeof path, "%s/trainable_tensors.txt", out);
        check_lines("trainable_tensors.txt", path, want, (int)(sizeof want / sizeof want[0]));
        snprintf(path, sizeof path, "%s/expert_config.svg", out);
        char *svg = read_text(path);
        CHECK(svg != NULL, "%s not written", path);
        if (svg) {
            CHECK(strncmp(svg, "<svg", 4) == 0 || strncmp(svg, "<?xml", 5) == 0, "SVG start");
            CHECK(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\"") && strstr(svg, "</svg>"),
                  "standalone SVG");
            CHECK(strstr(svg, ">0</text>") && strstr(svg, ">2</text>"), "each layer labelled");
            CHECK(strstr(svg, "layer 0, expert 1: 0.35 (chosen)") &&
                      strstr(svg, "layer 2, expert 4: 0.6 (chosen)"),
                  "chosen cells marked");
            CHECK(strstr(svg, "token score, top_p = 0.5"), "title names score function and top_p");
            free(svg);
        }
        snprintf(path, sizeof path, "%s/expert_config.json.tmp", out);
        CHECK(!file_exists(path), "temporary file left");
    }

    /* no model.path: qwen/olmoe spelling, routed experts only; output in a subdirectory */
    snprintf(out, sizeof out, "%s/select-nomodel", tmpdir);
    snprintf(deck_text, sizeof deck_text,
             "phase: select\nrun:\n  output_dir: %s\nselect:\n  stats: [%s, %s]\n  top_p: 0.5\n"
             "  output: configs/math.json\n",
             out, stats_path, stats_path);
    parse_deck(&deck, deck_text);
    CHECK(phase_select(&deck, &layout) == 0, "phase_select without model.path");
    deck_free(&deck);
    if (world_rank == 0) {
        /* the same file twice, summed: the same scores, the same selection */
        snprintf(path, sizeof path, "%s/configs/math.json", out);
        check_config(path, false, 2, stats_path);
        const char *want[] = {"model.layers.0.mlp.experts.1.gate_proj.weight",
                              "model.layers.0.mlp.experts.3.gate_proj.weight",
                              "model.layers.0.mlp.experts.1.up_proj.weight",
                              "model.layers.0.mlp.experts.3.up_proj.weight",
                              "model.layers.0.mlp.experts.1.down_proj.weight",
                              "model.layers.0.mlp.experts.3.down_proj.weight",
                              "model.layers.2.mlp.experts.4.gate_proj.weight",
                              "model.layers.2.mlp.experts.4.up_proj.weight",
                              "model.layers.2.mlp.experts.4.down_proj.weight"};
        snprintf(path, sizeof path, "%s/trainable_tensors.txt", out);
        check_lines("trainable_tensors.txt (no model)", path, want,
                    (int)(sizeof want / sizeof want[0]));
        snprintf(path, sizeof path, "%s/configs/math.svg", out);
        CHECK(file_exists(path), "%s not written", path);
        /* two files (summed): the tasks side by side, here one task twice */
        snprintf(path, sizeof path, "%s/configs/math_tasks.svg", out);
        CHECK(file_exists(path), "%s not written", path);
        snprintf(path, sizeof path, "%s/configs/math.json", out);
        json_t *root = json_load_file(path, 0, NULL);
        json_t *mean = json_object_get(json_object_get(root, "tasks"), "mean_jaccard");
        CHECK(json_array_size(mean) == 2 &&
                  json_number_value(json_array_get(json_array_get(mean, 0), 1)) == 1.0,
              "the same file twice: tasks.mean_jaccard[0][1] is 1");
        json_decref(root);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    test_tasks(model_path, &cfg, &layout);
}

/* Names through other families' parameter tables: mixtral's w1/w2/w3 under
 * block_sparse_moe, and the non-expert tensors. */
static void test_names(const char *golden)
{
    if (world_rank != 0) return;
    char dir[1200], err[1024] = "";
    snprintf(dir, sizeof dir, "%s/mixtral", golden);
    struct model_config cfg;
    CHECK(hfconfig_load(dir, &cfg, err, sizeof err) == 0, "%s", err);
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model model;
    model_create(&model, &cfg, &grid, (struct layout_coords){0, 0, 0});
    /* one chosen expert (5) in every MoE layer */
    struct routing_stats s;
    int32_t layers[HFCONFIG_MAX_LAYERS];
    uint64_t tokens[HFCONFIG_MAX_LAYERS];
    int Lm = 0;
    for (int l = 0; l < cfg.num_layers; l++)
        if (cfg.is_moe[l]) {
            tokens[Lm] = 1;
            layers[Lm++] = l;
        }
    uint64_t *count = xcalloc((size_t)Lm * cfg.num_experts, sizeof *count);
    for (int l = 0; l < Lm; l++) count[(size_t)l * cfg.num_experts + 5] = (uint64_t)cfg.top_k;
    make_stats(&s, cfg.num_layers, Lm, layers, cfg.num_experts, cfg.top_k, tokens, count, NULL, 1);
    const struct routing_stats *one[] = {&s};
    struct expert_selection sel;
    select_experts(one, 1, SCORE_FUNCTION_TOKEN, 0.2, false, &sel);
    int n = 0;
    char **names = select_tensor_names(&sel, &model, false, false, &n);
    CHECK(n == 3 * Lm, "mixtral: %d names for %d MoE layers", n, Lm);
    CHECK(n > 0 && strcmp(names[0], "model.layers.0.block_sparse_moe.experts.5.w1.weight") == 0,
          "mixtral first name '%s'", n > 0 ? names[0] : "");
    CHECK(n > 2 && strcmp(names[1], "model.layers.0.block_sparse_moe.experts.5.w3.weight") == 0 &&
              strcmp(names[2], "model.layers.0.block_sparse_moe.experts.5.w2.weight") == 0,
          "mixtral w3 (up) then w2 (down)");
    select_free_names(names, n);
    names = select_tensor_names(&sel, &model, false, true, &n);
    int experts = 0, routers = 0, embedding = 0, norm = 0, attention = 0;
    for (int i = 0; i < n; i++) {
        if (strstr(names[i], ".experts.")) {
            experts++;
            CHECK(strstr(names[i], ".experts.5.") != NULL, "unchosen expert %s", names[i]);
        }
        routers += strstr(names[i], "block_sparse_moe.gate.weight") != NULL;
        embedding += strcmp(names[i], "model.embed_tokens.weight") == 0;
        norm += strcmp(names[i], "model.norm.weight") == 0;
        attention += strstr(names[i], "self_attn.q_proj.weight") != NULL;
    }
    CHECK(experts == 3 * Lm && routers == Lm && embedding == 1 && norm == 1 &&
              attention == cfg.num_layers,
          "non-expert modules: %d experts, %d routers, %d embedding, %d norm, %d q_proj", experts,
          routers, embedding, norm, attention);
    CHECK(n == model.n_params - 3 * Lm * (cfg.num_experts - 1),
          "every tensor but the unchosen experts: %d of %d", n, model.n_params);
    select_free_names(names, n);
    expert_selection_free(&sel);
    stats_free(&s);
    free(count);
    model_free(&model);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    log_init(world_rank, world_size);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";

    if (world_rank == 0) {
        snprintf(tmpdir, sizeof tmpdir, "%s/esft-select.XXXXXX",
                 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        if (!mkdtemp(tmpdir)) tmpdir[0] = '\0';
    }
    MPI_Bcast(tmpdir, sizeof tmpdir, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (!tmpdir[0]) {
        fprintf(stderr, "test_select: cannot create a temporary directory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    if (world_rank == 0) {
        test_rule();
        test_scores();
        test_no_layer_normalisation();
        test_several_files();
    }
    test_stats_round_trip();
    MPI_Barrier(MPI_COMM_WORLD);
    test_stats_errors();
    test_names(golden);
    test_phase(golden);

    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank == 0 && check_failed_ == 0) {
        char command[1200];
        snprintf(command, sizeof command, "rm -rf '%s'", tmpdir);
        if (system(command) != 0) fprintf(stderr, "test_select: could not remove %s\n", tmpdir);
    }
    int failed = check_done("test_select"), any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any;
}
