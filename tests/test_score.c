/* test_score: the score phase against an independent count, and across rank counts.
 *
 *   test_score GOLDEN_DIR WORK_DIR    (under mpirun, any rank count)
 * Rank 0 writes a token dataset of the qwen2_moe golden fixture's three samples (row 0,
 * and row 1's two packed samples); every rank runs phase_score on it; rank 0 then checks
 * the statistics file against counts made here from transformers' own routing of the
 * same tokens (router.{l}.topk_ids / topk_weights in expected.safetensors): per layer
 * and expert counts (exact), gate sums (1e-5), tokens, co-activation, per-sample counts,
 * once with every token scored and once with loss-bearing tokens only. qwen2_moe's
 * layer 1 is dense, so the MoE layers are 0 and 2.
 *
 *   test_score compare A.h5 B.h5      (serial)
 * Exit 0 when both files hold bitwise identical totals and per-sample values (the
 * rank-count invariance test in test-cli.sh). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "dataset_write.h"
#include "deck.h"
#include "layout.h"
#include "log.h"
#include "phases.h"
#include "safetensors.h"
#include "stats.h"

enum { B = 2, T = 13, N = B * T, L = 3, E = 7, K = 2 };

static int compare(const char *a_path, const char *b_path)
{
    char err[1024];
    struct routing_stats a, b;
    CHECK(stats_read(a_path, &a, err, sizeof err) == 0, "%s", err);
    CHECK(stats_read(b_path, &b, err, sizeof err) == 0, "%s", err);
    if (check_failed_) return check_done("test_score compare");
    size_t LE = (size_t)a.n_moe_layers * a.num_experts;
    CHECK(a.n_moe_layers == b.n_moe_layers && a.num_experts == b.num_experts &&
              a.n_samples == b.n_samples, "shapes differ");
    if (check_failed_) return check_done("test_score compare");
    CHECK(memcmp(a.tokens, b.tokens, a.n_moe_layers * sizeof *a.tokens) == 0, "tokens differ");
    CHECK(memcmp(a.count, b.count, LE * sizeof *a.count) == 0, "counts differ");
    CHECK(memcmp(a.gate, b.gate, LE * sizeof *a.gate) == 0, "gate sums differ (not bitwise)");
    CHECK(!a.coact == !b.coact && (!a.coact || memcmp(a.coact, b.coact, LE * a.num_experts * sizeof *a.coact) == 0),
          "co-activation differs");
    CHECK(memcmp(a.sample_index, b.sample_index, a.n_samples * sizeof *a.sample_index) == 0,
          "drawn samples differ");
    CHECK(memcmp(a.sample_count, b.sample_count, a.n_samples * LE * sizeof *a.sample_count) == 0,
          "per-sample counts differ");
    CHECK(memcmp(a.sample_gate, b.sample_gate, a.n_samples * LE * sizeof *a.sample_gate) == 0,
          "per-sample gate sums differ");
    printf("%s (dp %d) and %s (dp %d): %llu samples, identical\n", a_path, a.dp, b_path, b.dp,
           (unsigned long long)a.n_samples);
    stats_free(&a);
    stats_free(&b);
    return check_done("test_score compare");
}

static const struct st_tensor *need(const struct st_file *f, const char *name)
{
    const struct st_tensor *t = st_file_find(f, name);
    CHECK(t != NULL, "expected.safetensors: %s missing", name);
    return t;
}

static int64_t i64_at(const struct st_tensor *t, int i)
{
    int64_t v;
    memcpy(&v, (const char *)t->data + 8 * (size_t)i, 8);
    return v;
}

/* Checks one statistics file against the transformers routing; loss_only counts only
 * tokens whose label (the token itself as a target) is not -100. */
static void check_against_golden(const char *stats_path, const struct st_file *expected,
                                 const uint8_t *mask, int loss_only)
{
    char err[1024];
    struct routing_stats s;
    CHECK(stats_read(stats_path, &s, err, sizeof err) == 0, "%s", err);
    if (check_failed_) return;
    CHECK(s.n_moe_layers == 2 && s.moe_layers[0] == 0 && s.moe_layers[1] == 2,
          "MoE layers: %d", s.n_moe_layers);
    CHECK(s.num_experts == E && s.top_k == K && s.n_samples == 3, "sizes");
    CHECK(s.deck && strstr(s.deck, "n_sample_tokens: 1000") && strstr(s.deck, "qwen2_moe"),
          "the resolved deck is stored in the statistics file");
    /* the dataset's samples: 0 = row 0, 1 = row 1 [0, 6), 2 = row 1 [6, 13) */
    const int first[3] = {0, T, T + 6}, length[3] = {T, 6, 7};
    for (int m = 0; m < 2; m++) {
        int l = s.moe_layers[m];
        char name[64];
        snprintf(name, sizeof name, "router.%d.topk_ids", l);
        const struct st_tensor *ids_t = need(expected, name);
        snprintf(name, sizeof name, "router.%d.topk_weights", l);
        const struct st_tensor *w_t = need(expected, name);
        if (!ids_t || !w_t) continue;
        uint64_t count[E] = {0}, coact[E][E] = {{0}}, tokens = 0;
        double gate[E] = {0};
        uint32_t per_sample[3][E] = {{0}};
        for (int smp = 0; smp < 3; smp++)
            for (int n = first[smp]; n < first[smp] + length[smp]; n++) {
                if (loss_only && !mask[n]) continue;
                tokens++;
                int32_t ids[K];
                float w[K];
                memcpy(ids, (const char *)ids_t->data + 4 * (size_t)n * K, sizeof ids);
                memcpy(w, (const char *)w_t->data + 4 * (size_t)n * K, sizeof w);
                for (int k = 0; k < K; k++) {
                    count[ids[k]]++;
                    per_sample[smp][ids[k]]++;
                    gate[ids[k]] += w[k];
                    for (int j = 0; j < K; j++)
                        if (j != k) coact[ids[k]][ids[j]]++;
                }
            }
        CHECK(s.tokens[m] == tokens, "layer %d: %llu tokens, expected %llu", l,
              (unsigned long long)s.tokens[m], (unsigned long long)tokens);
        for (int e = 0; e < E; e++) {
            CHECK(s.count[m * E + e] == count[e], "layer %d expert %d: count %llu, transformers %llu",
                  l, e, (unsigned long long)s.count[m * E + e], (unsigned long long)count[e]);
            CHECK(fabs(s.gate[m * E + e] - gate[e]) < 1e-5,
                  "layer %d expert %d: gate %.7f, transformers %.7f", l, e, s.gate[m * E + e], gate[e]);
            for (int j = 0; j < E; j++)
                CHECK(!s.coact || s.coact[((size_t)m * E + e) * E + j] == coact[e][j],
                      "layer %d: coact[%d][%d]", l, e, j);
        }
        /* per-sample rows are in drawn order: find each dataset sample */
        for (uint64_t i = 0; i < s.n_samples; i++) {
            uint64_t smp = s.sample_index[i];
            for (int e = 0; e < E; e++)
                CHECK(s.sample_count[(i * 2 + m) * E + e] == per_sample[smp][e],
                      "sample %llu layer %d expert %d", (unsigned long long)smp, l, e);
        }
    }
    stats_free(&s);
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "compare") == 0) return compare(argv[2], argv[3]);
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    log_init(rank, size);
    if (argc != 3) {
        fprintf(stderr, "usage: test_score GOLDEN_DIR WORK_DIR | test_score compare A B\n");
        MPI_Finalize();
        return 2;
    }
    char fixture[4096], path[4200], work[4096], err[1024];
    snprintf(fixture, sizeof fixture, "%s/qwen2_moe", argv[1]);
    snprintf(work, sizeof work, "%s/np%d", argv[2], size);
    snprintf(path, sizeof path, "%s/expected.safetensors", fixture);
    struct st_file *expected = st_open(path, err, sizeof err);
    CHECK(expected != NULL, "%s", err);
    if (!expected) return check_done("test_score");

    /* The three samples' tokens; the loss mask marks tokens that are targets
     * (labels[b, t] != -100 in transformers' convention). */
    uint32_t tokens[N];
    uint8_t mask[N];
    const struct st_tensor *ids = need(expected, "input_ids"), *labels = need(expected, "labels");
    for (int n = 0; n < N; n++) {
        tokens[n] = (uint32_t)i64_at(ids, n);
        mask[n] = i64_at(labels, n) != -100;
    }
    char data_path[4200];
    snprintf(data_path, sizeof data_path, "%s/golden.h5", work);
    if (rank == 0) {
        char command[4300];
        snprintf(command, sizeof command, "mkdir -p '%s'", work);
        CHECK(system(command) == 0, "%s", command);
        const uint64_t offsets[4] = {0, T, T + 6, N};
        const char *sources[1] = {"tests/golden/qwen2_moe"};
        struct dataset_contents contents = {.tokens = tokens, .loss_mask = mask, .n_tokens = N,
                                            .offsets = offsets, .n_samples = 3, .tokenizer = "golden",
                                            .vocab_size = 101, .sources = sources, .n_sources = 1};
        CHECK(dataset_write(data_path, &contents, err, sizeof err) == 0, "%s", err);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    for (int loss_only = 0; loss_only <= 1; loss_only++) {
        struct deck deck;
        deck_defaults(&deck);
        deck.model.path = xstrdup(fixture);
        deck.data.path = xstrdup(data_path);
        free(deck.run.output_dir);
        deck.run.output_dir = xstrdup(work);
        free(deck.score.output);
        deck.score.output = xstrdup(loss_only ? "loss.h5" : "all.h5");
        deck.score.tokens = loss_only ? SCORE_TOKENS_LOSS : SCORE_TOKENS_ALL;
        deck.score.n_sample_tokens = 1000;
        /* the backend the environment names (ESFT_BACKEND: cpu-devsim, or cuda on a GPU) */
        const char *backend = getenv("ESFT_BACKEND");
        if (backend && *backend) {
            char setting[128];
            snprintf(setting, sizeof setting, "run.backend=%s", backend);
            CHECK(deck_override(&deck, setting, err, sizeof err) == 0, "%s", err);
        }
        if (rank == 0 && loss_only == 0)
            printf("test_score: backend: %s\n", deck_backend_name(deck.run.backend));
        struct layout_grid grid = {.world = size, .pp = 1, .dp = size, .ep = 1};
        struct layout layout;
        layout_create(&layout, &grid);
        CHECK(phase_score(&deck, &layout) == 0, "phase_score");
        if (rank == 0) {
            snprintf(path, sizeof path, "%s/%s", work, deck.score.output);
            check_against_golden(path, expected, mask, loss_only);
        }
        layout_destroy(&layout);
        deck_free(&deck);
    }
    st_close(expected);
    int failed = check_failed_, any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    int status = rank == 0 ? check_done("test_score") : (any ? 1 : 0);
    if (any) status = 1;
    MPI_Finalize();
    return status;
}
