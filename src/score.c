/* score: the `score` phase, ESFT step 1 (shared/reference/esft-semantics.md section 1).
 * Runs the base model over a seeded draw of whole samples and records, per MoE layer,
 * which experts each token is routed to and with what weight, into one routing
 * statistics file (stats.h) that `select` reads.
 *
 * The draw: a permutation of all samples from run.seed, taken in order until
 * score.n_sample_tokens tokens are reached (the sample that reaches it included). It
 * does not depend on the rank count. Drawn sample i goes to data-parallel rank i % dp.
 * Each sample runs as its own forward pass, so its numbers are the same on whichever
 * rank runs it; totals are summed from per-sample values in drawn order on rank 0, so
 * they are bitwise identical for any rank count (counts and gate sums alike). */
#include <inttypes.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "c2r.h"
#include "c2r.h"
#include "dataset.h"
#include "files.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "phases.h"
#include "rng.h"
#include "stats.h"

/* The drawn samples: dataset indices in drawn order, and how many tokens of each are
 * scored (samples longer than data.seq_len are cut to it). */
struct draw {
    uint64_t n;
    uint64_t *index;
    uint64_t *tokens;
    uint64_t total_tokens;
    uint64_t truncated; /* samples cut to seq_len */
};

static void draw_samples(const struct dataset *ds, uint64_t seed, long long want, int seq_len,
                         struct draw *d)
{
    uint64_t S = ds->n_samples;
    uint64_t *order = xmalloc((S ? S : 1) * sizeof *order);
    for (uint64_t i = 0; i < S; i++) order[i] = i;
    struct rng rng;
    rng_seed(&rng, seed);
    for (uint64_t i = S; i > 1; i--) { /* Fisher-Yates */
        uint64_t j = rng_below(&rng, i);
        uint64_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    memset(d, 0, sizeof *d);
    d->index = order;
    d->tokens = xmalloc((S ? S : 1) * sizeof *d->tokens);
    while (d->n < S && d->total_tokens < (uint64_t)want) {
        uint64_t length = dataset_sample_length(ds, order[d->n]);
        if (length > (uint64_t)seq_len) {
            length = (uint64_t)seq_len;
            d->truncated++;
        }
        d->tokens[d->n++] = length;
        d->total_tokens += length;
    }
}

/* Per-sample accumulation of one forward pass into count[Lm,E], gate[Lm,E] (this
 * sample's rows) and coact[Lm,E,E], tokens[Lm] (this rank's running totals). */
static void accumulate(const struct model_config *cfg, const int32_t *moe_layers, int Lm,
                       const struct forward_result *r, int N, const uint8_t *counted,
                       uint32_t *count, double *gate, uint64_t *coact, uint64_t *tokens)
{
    int E = cfg->num_experts, K = cfg->top_k;
    for (int m = 0; m < Lm; m++) {
        int l = moe_layers[m];
        const int32_t *ids = r->topk_ids[l];
        const float *weights = r->topk_weights[l];
        if (!ids) continue; /* a layer of another pipeline stage */
        for (int n = 0; n < N; n++) {
            if (counted && !counted[n]) continue;
            tokens[m]++;
            for (int k = 0; k < K; k++) {
                int e = ids[n * K + k];
                count[(size_t)m * E + e]++;
                gate[(size_t)m * E + e] += weights[n * K + k];
                if (!coact) continue;
                for (int j = 0; j < K; j++)
                    if (j != k) coact[((size_t)m * E + e) * E + ids[n * K + j]]++;
            }
        }
    }
}

int phase_score(const struct deck *deck, const struct layout *layout)
{
    const struct layout_grid *grid = &layout->grid;
    char err[4096];
    struct model_config cfg;
    int rc = hfconfig_load(deck->model.path, &cfg, err, sizeof err);
    if (rc != 0) fatal_all(EXIT_INPUT, "score: %s", err);
    if (cfg.num_experts <= 0) fatal_all(EXIT_INPUT, "score: %s has no MoE layers", deck->model.path);
    struct dataset ds;
    rc = dataset_open(&ds, deck->data.path, err, sizeof err);
    if (rc != 0) fatal_all(EXIT_INPUT, "score: %s", err);
    if (dataset_check_model(&ds, deck->model.path, cfg.vocab_size, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "score: %s", err);

    if (deck->parallel.expert_placement == PLACEMENT_C2R &&
        (grid->ep < 2 || !deck->score.coactivation))
        fatal_all(EXIT_INPUT, "score: parallel.expert_placement c2r needs parallel.ep above 1 "
                  "(the EP group it places experts over; here %d) and score.coactivation: true",
                  grid->ep);
    if (grid->pp > 1 && cfg.tie_word_embeddings)
        fatal_all(EXIT_INPUT, "score: %s ties lm_head to the embedding (tie_word_embeddings); "
                  "pipeline parallelism (parallel.pp %d) does not support tied embeddings yet",
                  deck->model.path, grid->pp);
    /* Every data rank (the dp * ep ranks of a stage) scores its own samples; the stages of
     * one pipeline chain pass the same samples through their layers. Under EP the ranks
     * of a group run the same number of forwards (the experts are exchanged in each), a
     * rank out of samples passing empty batches. */
    int E = cfg.num_experts, K = cfg.top_k, dp = grid->dp * grid->ep;
    int rank = layout->me.dp_rank * grid->ep + layout->me.ep_rank;
    MPI_Comm data_comm = layout->stage.mpi; /* this stage's data ranks, in data-rank order */
    bool writer = layout->me.pp_rank == 0;  /* stage 0's ranks gather and write */
    int Lm = 0;
    int32_t moe_layers[HFCONFIG_MAX_LAYERS];
    for (int l = 0; l < cfg.num_layers; l++)
        if (cfg.is_moe[l]) moe_layers[Lm++] = l;
    size_t LE = (size_t)Lm * E;

    struct draw draw;
    draw_samples(&ds, (uint64_t)deck->run.seed, deck->score.n_sample_tokens, deck->data.seq_len, &draw);
    if (draw.total_tokens < (uint64_t)deck->score.n_sample_tokens)
        log_warn("score: %s holds %" PRIu64 " tokens, fewer than score.n_sample_tokens (%lld): "
                 "scoring all of them", deck->data.path, draw.total_tokens, deck->score.n_sample_tokens);
    if (draw.truncated)
        log_warn("score: %" PRIu64 " samples longer than data.seq_len (%d) are scored on their "
                 "first %d tokens", draw.truncated, deck->data.seq_len, deck->data.seq_len);

    /* This rank's samples: drawn positions rank, rank + dp, ... */
    uint64_t mine = draw.n > (uint64_t)rank ? (draw.n - (uint64_t)rank + dp - 1) / dp : 0;
    uint64_t my_tokens = 0, longest = 1;
    for (uint64_t i = (uint64_t)rank; i < draw.n; i += (uint64_t)dp) {
        my_tokens += draw.tokens[i];
        if (draw.tokens[i] > longest) longest = draw.tokens[i];
    }
    uint64_t longest_here = longest; /* the workspace must hold the EP group's longest */
    check_mpi(MPI_Allreduce(&longest_here, &longest, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD));
    uint64_t rounds = grid->ep > 1 ? (draw.n + (uint64_t)dp - 1) / (uint64_t)dp : mine;
    log_info("score: %" PRIu64 " samples, %" PRIu64 " tokens drawn (seed %lld) from %s; %d "
             "rank%s; %s tokens counted", draw.n, draw.total_tokens, deck->run.seed,
             deck->data.path, dp, dp == 1 ? "" : "s",
             deck->score.tokens == SCORE_TOKENS_LOSS ? "loss-bearing" : "all");

    /* the tensors this rank will load, from the headers, before allocating for them */
    fail_if_any(model_check_checkpoint(&cfg, grid, layout->me, deck->model.path, err, sizeof err),
                EXIT_INPUT, "score: %s", err);
    struct model model;
    model_create(&model, &cfg, grid, layout->me);
    model.ep_comm = &layout->ep;
    model.pp_comm = &layout->pp;
    model_log_stages(&model, "score");
    if (deck->model.frozen_weights == FROZEN_BF16) model_store_frozen_bf16(&model); /* all frozen */
    fail_if_any(model_load(&model, deck->model.path, err, sizeof err) != 0, EXIT_INPUT, "score: %s",
                err);
    const struct backend *ops = phase_backend(deck, "score");
    model_attach(&model, ops);
    c2r_phase_setup(deck, &model, "score", 0);

    /* Buffers sized once for the longest sample of this rank. */
    struct forward_workspace *ws = forward_workspace_new(&model, (int)longest);
    forward_workspace_keep(ws, FORWARD_KEEP_ROUTING); /* the statistics are counted on the host */
    uint32_t *tokens_u32 = xmalloc(longest * sizeof *tokens_u32);
    uint8_t *mask = xmalloc(longest);
    int32_t *tokens = xmalloc(longest * sizeof *tokens);
    int32_t *positions = xmalloc(longest * sizeof *positions);
    int32_t *starts = xcalloc(longest, sizeof *starts);
    for (uint64_t t = 0; t < longest; t++) positions[t] = (int32_t)t;
    uint32_t *my_count = xcalloc((mine ? mine : 1) * LE, sizeof *my_count);
    double *my_gate = xcalloc((mine ? mine : 1) * LE, sizeof *my_gate);
    uint64_t *my_sample_tokens = xcalloc(mine ? mine : 1, sizeof *my_sample_tokens);
    uint64_t *coact = deck->score.coactivation ? xcalloc(LE * E, sizeof *coact) : NULL;
    uint64_t *layer_tokens = xcalloc((size_t)Lm, sizeof *layer_tokens);
    bool placement = deck->parallel.expert_placement == PLACEMENT_C2R;
    struct c2r_kept kept; /* every scored token's routing, for the placement report */
    c2r_kept_init(&kept, placement ? Lm : 0, K);

    double start = wall_time(), last_report = start;
    uint64_t done_tokens = 0;
    for (uint64_t j = 0; j < rounds; j++) {
        if (j >= mine) { /* out of samples: an empty batch for the EP group's exchanges */
            struct batch none = {.N = 0, .tokens = tokens, .positions = positions, .sample_start = starts};
            struct forward_result ignored;
            model_forward(&model, ops, ws, &none, &ignored);
            continue;
        }
        uint64_t i = (uint64_t)rank + j * (uint64_t)dp;
        int N = (int)draw.tokens[i];
        if (dataset_read_prefix(&ds, draw.index[i], (uint64_t)N, tokens_u32, mask, err, sizeof err) != 0)
            fatal(EXIT_RUNTIME, "score: %s", err);
        for (int t = 0; t < N; t++) tokens[t] = (int32_t)tokens_u32[t];
        struct batch batch = {.N = N, .tokens = tokens, .positions = positions, .sample_start = starts};
        struct forward_result result;
        model_forward(&model, ops, ws, &batch, &result);
        uint64_t before = layer_tokens[0];
        accumulate(&cfg, moe_layers, Lm, &result, N,
                   deck->score.tokens == SCORE_TOKENS_LOSS ? mask : NULL, my_count + j * LE,
                   my_gate + j * LE, coact, layer_tokens);
        my_sample_tokens[j] = Lm ? layer_tokens[0] - before : 0;
        for (int m = 0; placement && m < Lm; m++)
            if (result.topk_ids[moe_layers[m]])
                c2r_kept_add(&kept, m, result.topk_ids[moe_layers[m]], N);
        done_tokens += (uint64_t)N;
        double now = wall_time();
        if (now - last_report >= 10.0 || j + 1 == mine) {
            double rate = done_tokens / (now - start);
            log_info("score: %" PRIu64 "/%" PRIu64 " tokens on rank 0, %.0f tokens/s per rank, "
                     "%.0f s left", done_tokens, my_tokens, rate,
                     rate > 0 ? (double)(my_tokens - done_tokens) / rate : 0.0);
            last_report = now;
        }
    }
    model_wait_sends(ws);
    double seconds = wall_time() - start;
    if (grid->pp > 1) { /* each stage counted its own layers: one whole row per sample */
        MPI_Comm chain = layout->pp.mpi;
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, my_count, (int)((mine ? mine : 1) * LE), MPI_UINT32_T, MPI_SUM, chain));
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, my_gate, (int)((mine ? mine : 1) * LE), MPI_DOUBLE, MPI_SUM, chain));
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, my_sample_tokens, (int)(mine ? mine : 1), MPI_UINT64_T, MPI_SUM, chain));
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, layer_tokens, Lm, MPI_UINT64_T, MPI_SUM, chain));
        if (coact) check_mpi(MPI_Allreduce(MPI_IN_PLACE, coact, (int)(LE * E), MPI_UINT64_T, MPI_SUM, chain));
        if (!writer) done_tokens = 0; /* counted once, on stage 0 */
    }

    /* Rank rows, then per-sample values gathered on rank 0 in drawn order. */
    uint64_t *rank_count = xcalloc(LE, sizeof *rank_count);
    double *rank_gate = xcalloc(LE, sizeof *rank_gate);
    for (uint64_t j = 0; j < mine; j++)
        for (size_t x = 0; x < LE; x++) {
            rank_count[x] += my_count[j * LE + x];
            rank_gate[x] += my_gate[j * LE + x];
        }
    if (coact && writer) check_mpi(MPI_Allreduce(MPI_IN_PLACE, coact, (int)(LE * E), MPI_UINT64_T, MPI_SUM, data_comm));

    struct routing_stats all;
    memset(&all, 0, sizeof all);
    int *counts = NULL, *displs = NULL;
    uint32_t *gathered_count = NULL;
    double *gathered_gate = NULL;
    uint64_t *gathered_tokens = NULL;
    if (layout->world_rank == 0) {
        counts = xcalloc((size_t)dp, sizeof *counts);
        displs = xcalloc((size_t)dp, sizeof *displs);
        gathered_count = xcalloc((draw.n ? draw.n : 1) * LE, sizeof *gathered_count);
        gathered_gate = xcalloc((draw.n ? draw.n : 1) * LE, sizeof *gathered_gate);
        gathered_tokens = xcalloc(draw.n ? draw.n : 1, sizeof *gathered_tokens);
        for (int r = 0, offset = 0; r < dp; r++) {
            uint64_t n_r = draw.n > (uint64_t)r ? (draw.n - (uint64_t)r + dp - 1) / dp : 0;
            counts[r] = (int)n_r;
            displs[r] = offset;
            offset += (int)n_r;
        }
    }
    /* Gathered rank by rank: rank r's samples are drawn positions r, r + dp, ... */
    MPI_Datatype row_u32, row_f64;
    check_mpi(MPI_Type_contiguous((int)LE, MPI_UINT32_T, &row_u32));
    check_mpi(MPI_Type_contiguous((int)LE, MPI_DOUBLE, &row_f64));
    check_mpi(MPI_Type_commit(&row_u32));
    check_mpi(MPI_Type_commit(&row_f64));
    if (writer) {
        check_mpi(MPI_Gatherv(my_count, (int)mine, row_u32, gathered_count, counts, displs, row_u32, 0, data_comm));
        check_mpi(MPI_Gatherv(my_gate, (int)mine, row_f64, gathered_gate, counts, displs, row_f64, 0, data_comm));
        check_mpi(MPI_Gatherv(my_sample_tokens, (int)mine, MPI_UINT64_T, gathered_tokens, counts,
                              displs, MPI_UINT64_T, 0, data_comm));
    }
    MPI_Type_free(&row_u32);
    MPI_Type_free(&row_f64);

    if (layout->world_rank == 0) {
        snprintf(all.model_path, sizeof all.model_path, "%s", deck->model.path);
        snprintf(all.model_type, sizeof all.model_type, "%s", cfg.model_type);
        all.config_hash = cfg.hash;
        all.num_layers = cfg.num_layers;
        all.num_experts = E;
        all.top_k = K;
        all.norm_topk_prob = cfg.norm_topk_prob;
        snprintf(all.dataset, sizeof all.dataset, "%s", deck->data.path);
        /* provenance for select's expert_config.json: which data, tokenized how */
        uint64_t data_sum = 0;
        char why[1024];
        if (dataset_hash(&ds, &data_sum, why, sizeof why) == 0)
            snprintf(all.dataset_checksum, sizeof all.dataset_checksum, "%016" PRIx64, data_sum);
        else
            log_warn("score: the dataset's checksum is not recorded: %s", why);
        snprintf(all.tokenizer, sizeof all.tokenizer, "%s", ds.tokenizer);
        snprintf(all.tokenizer_checksum, sizeof all.tokenizer_checksum, "%s",
                 ds.tokenizer_checksum);
        all.seed = deck->run.seed;
        all.n_sample_tokens = deck->score.n_sample_tokens;
        snprintf(all.tokens_scored, sizeof all.tokens_scored, "%s",
                 deck->score.tokens == SCORE_TOKENS_LOSS ? "loss" : "all");
        all.world = grid->world;
        all.pp = grid->pp;
        all.dp = dp;
        all.ep = grid->ep;
        all.n_ranks = dp;
        /* the resolved deck, as --dry-run prints it, for provenance */
        size_t deck_size = 0;
        FILE *text = open_memstream(&all.deck, &deck_size);
        if (text) {
            deck_print(deck, text);
            fclose(text);
        }
        all.n_moe_layers = Lm;
        all.moe_layers = moe_layers;
        all.n_samples = draw.n;
        all.sample_index = draw.index;
        all.sample_tokens = xcalloc(draw.n ? draw.n : 1, sizeof *all.sample_tokens);
        all.sample_count = xcalloc((draw.n ? draw.n : 1) * LE, sizeof *all.sample_count);
        all.sample_gate = xcalloc((draw.n ? draw.n : 1) * LE, sizeof *all.sample_gate);
        /* back to drawn order */
        for (int r = 0; r < dp; r++)
            for (int j = 0; j < counts[r]; j++) {
                uint64_t i = (uint64_t)r + (uint64_t)j * (uint64_t)dp, from = (uint64_t)(displs[r] + j);
                all.sample_tokens[i] = gathered_tokens[from];
                memcpy(all.sample_count + i * LE, gathered_count + from * LE, LE * sizeof(uint32_t));
                memcpy(all.sample_gate + i * LE, gathered_gate + from * LE, LE * sizeof(double));
            }
        all.tokens = xcalloc((size_t)Lm, sizeof *all.tokens);
        all.count = xcalloc(LE, sizeof *all.count);
        all.gate = xcalloc(LE, sizeof *all.gate);
        for (uint64_t i = 0; i < draw.n; i++) {
            for (int m = 0; m < Lm; m++) all.tokens[m] += all.sample_tokens[i];
            for (size_t x = 0; x < LE; x++) {
                all.count[x] += all.sample_count[i * LE + x];
                all.gate[x] += all.sample_gate[i * LE + x];
            }
        }
        all.coact = coact;
    }
    struct stats_rank_part part = {.rank = rank, .tokens = layer_tokens, .count = rank_count,
                                   .gate = rank_gate};
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", deck->run.output_dir, deck->score.output);
    fail_if_any(layout->world_rank == 0 && make_directories(deck->run.output_dir) != 0,
                EXIT_RUNTIME, "score: cannot create %s", deck->run.output_dir);
    rc = writer ? stats_write(path, data_comm, &all, &part, err, sizeof err) : 0;
    fail_if_any(rc != 0, EXIT_RUNTIME, "score: %s", err);

    uint64_t total_tokens = 0;
    check_mpi(MPI_Allreduce(&done_tokens, &total_tokens, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD));
    double slowest = 0;
    check_mpi(MPI_Allreduce(&seconds, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
    log_info("score: %" PRIu64 " tokens in %.1f s (%.0f tokens/s over %d rank%s) -> %s", total_tokens,
             slowest, slowest > 0 ? total_tokens / slowest : 0.0, dp, dp == 1 ? "" : "s", path);
    metrics_write("score", "\"samples\": %" PRIu64 ", \"tokens\": %" PRIu64 ", \"seconds\": %.3f, "
                  "\"tokens_per_second\": %.1f, \"output\": \"%s\"", draw.n, total_tokens, slowest,
                  slowest > 0 ? total_tokens / slowest : 0.0, path);

    if (placement) c2r_placement_report(deck, layout, &cfg, moe_layers, coact, &kept);
    c2r_kept_free(&kept);

    if (layout->world_rank == 0) {
        free(all.deck);
        free(all.sample_tokens);
        free(all.sample_count);
        free(all.sample_gate);
        free(all.tokens);
        free(all.count);
        free(all.gate);
        free(counts);
        free(displs);
        free(gathered_count);
        free(gathered_gate);
        free(gathered_tokens);
    }
    free(rank_count);
    free(rank_gate);
    free(coact);
    free(layer_tokens);
    free(my_count);
    free(my_gate);
    free(my_sample_tokens);
    free(tokens_u32);
    free(mask);
    free(tokens);
    free(positions);
    free(starts);
    free(draw.index);
    free(draw.tokens);
    forward_workspace_free(ws);
    model_free(&model);
    dataset_close(&ds);
    return 0;
}
