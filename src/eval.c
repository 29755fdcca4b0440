/* eval: the `eval` phase: loss, perplexity and next-token accuracy of a model, with the
 * trained tensors of an adapter (eval.adapter: the train phase's adapter.safetensors)
 * put over its weights, or a LoRA adapter directory folded in (peft_adapter.h), on
 * prepared datasets, under any rank layout.
 *
 * The model is eval.model (a merged checkpoint) or model.path; after a train in the same
 * deck, deck_finish points eval.adapter (or eval.model) at what that train wrote. The
 * samples of data.path are evaluated once, in dataset order (eval.split all), or only
 * those train holds out for validation (eval.split validation: blocks_split with
 * train.val_fraction and run.seed, packed in train's order, so the loss is train's
 * validation loss of the same weights); then every dataset of eval.extra_data whole.
 * Samples are packed into blocks of data.seq_len tokens as the train phase packs them
 * (data.pack); eval.batch blocks form one forward pass, and forward pass m goes to data
 * rank m mod (dp x ep). Loss: the sum of token cross-entropies over the loss-bearing
 * targets divided by their number (the train phase's loss); perplexity exp(loss);
 * accuracy: the share of those targets that are the logits' argmax (ties to the lower
 * id). Rank 0 writes OUTPUT_DIR/eval.json: data.path's figures at the top level, each
 * extra dataset's under "extra". */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "c2r.h"
#include "blocks.h"
#include "dataset.h"
#include "files.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "peft_adapter.h"
#include "phases.h"

/* What one dataset gave. */
struct eval_sums {
    double loss_sum, targets, correct, tokens; /* over every rank (last stage) */
    int blocks;
    uint64_t samples;
    double seconds;
};

/* Opens a dataset eval reads and checks it against the model; fatal when it does not fit. */
static void open_dataset(struct dataset *ds, const char *path, const char *model_dir,
                         int vocab_size)
{
    char err[4096];
    if (dataset_open(ds, path, err, sizeof err) != 0) fatal_all(EXIT_INPUT, "eval: %s", err);
    if (dataset_check_model(ds, model_dir, vocab_size, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "eval: %s", err);
    if (ds->n_samples == 0) fatal_all(EXIT_INPUT, "eval: %s holds no sample", path);
}

/* The forward passes over samples order[0 .. n) of ds, packed into blocks; every rank
 * takes part (under EP and PP a rank out of blocks still passes an empty batch). */
static void evaluate_samples(const struct model *model, const struct backend *ops,
                             struct forward_workspace *ws, struct token_batch *batch,
                             const struct dataset *ds, const uint64_t *order, uint64_t n,
                             const struct deck *deck, const struct layout *layout,
                             struct eval_sums *out)
{
    const struct layout_grid *grid = &layout->grid;
    int rank = layout->me.dp_rank * grid->ep + layout->me.ep_rank, dp = grid->dp * grid->ep;
    int seq_len = deck->data.seq_len, per_pass = deck->eval.batch;
    struct block_plan plan = {0};
    plan_blocks(ds, order, n, seq_len, deck->data.pack, &plan);
    int passes = (plan.n_blocks + per_pass - 1) / per_pass;
    int rounds = (passes + dp - 1) / dp;
    log_info("eval: %s: %" PRIu64 " samples in %d blocks of <= %d tokens, %d per forward pass, "
             "%d data rank%s", ds->path, n, plan.n_blocks, seq_len, per_pass, dp,
             dp == 1 ? "" : "s");
    bool last_stage = layout->me.pp_rank == grid->pp - 1;
    double sums[4] = {0, 0, 0, 0}; /* cross-entropy, targets, correct, tokens (last stage) */
    double start = wall_time(), last_report = start;
    for (int round = 0; round < rounds; round++) {
        int pass = round * dp + rank;
        batch->N = 0;
        batch->targets_counted = 0;
        for (int b = pass * per_pass; pass < passes && b < (pass + 1) * per_pass && b < plan.n_blocks; b++)
            append_block(batch, ds, &plan, b, seq_len);
        if (batch->N == 0 && grid->ep == 1 && grid->pp == 1) continue;
        struct batch in = {.N = batch->N, .tokens = batch->tokens, .positions = batch->positions,
                           .sample_start = batch->sample_start, .targets = batch->targets};
        struct forward_result r;
        model_forward(model, ops, ws, &in, &r);
        if (!last_stage) continue;
        sums[0] += r.loss_sum;
        sums[1] += (double)r.loss_count;
        sums[3] += batch->N;
        sums[2] += (double)r.correct;
        double now = wall_time();
        if (now - last_report >= 10.0) {
            log_info("eval: round %d/%d, %.0f s left", round + 1, rounds,
                     (now - start) / (round + 1) * (rounds - round - 1));
            last_report = now;
        }
    }
    model_wait_sends(ws);
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, sums, 4, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    *out = (struct eval_sums){sums[0], sums[1], sums[2], sums[3], plan.n_blocks, n,
                              wall_time() - start};
    free(plan.first), free(plan.order);
}

static double sums_loss(const struct eval_sums *e)
{
    return e->targets > 0 ? e->loss_sum / e->targets : NAN;
}

/* One dataset's figures into o. */
static void put_sums(json_t *o, const struct eval_sums *e, const char *dataset)
{
    double loss = sums_loss(e);
    json_object_set_new(o, "loss", json_real(loss));
    json_object_set_new(o, "perplexity", json_real(exp(loss)));
    json_object_set_new(o, "accuracy", json_real(e->targets > 0 ? e->correct / e->targets : NAN));
    json_object_set_new(o, "targets", json_integer((json_int_t)e->targets));
    json_object_set_new(o, "tokens", json_integer((json_int_t)e->tokens));
    json_object_set_new(o, "blocks", json_integer(e->blocks));
    json_object_set_new(o, "samples", json_integer((json_int_t)e->samples));
    json_object_set_new(o, "dataset", json_string(dataset));
}

static void report(const struct eval_sums *e, const char *dataset, const char *split)
{
    double loss = sums_loss(e), accuracy = e->targets > 0 ? e->correct / e->targets : NAN;
    log_info("eval: %s (%s): loss %.6f  perplexity %.4f  accuracy %.4f over %.0f targets (%.1f s)",
             dataset, split, loss, exp(loss), accuracy, e->targets, e->seconds);
    metrics_write("evaluation", "\"dataset\": \"%s\", \"split\": \"%s\", \"loss\": %.17g, "
                  "\"perplexity\": %.17g, \"accuracy\": %.17g, \"targets\": %.0f, \"seconds\": %.3f",
                  dataset, split, loss, exp(loss), accuracy, e->targets, e->seconds);
}

int phase_eval(const struct deck *deck, const struct layout *layout)
{
    const struct layout_grid *grid = &layout->grid;
    const char *model_dir = deck_eval_model(deck), *adapter = deck_eval_adapter(deck);
    bool validation = deck->eval.split == EVAL_SPLIT_VALIDATION;
    char err[4096];

    struct model_config cfg;
    if (hfconfig_load(model_dir, &cfg, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "eval: %s", err);
    if (grid->pp > 1 && cfg.tie_word_embeddings)
        fatal_all(EXIT_INPUT, "eval: %s ties lm_head to the embedding (tie_word_embeddings); "
                  "pipeline parallelism (parallel.pp %d) does not support tied embeddings yet",
                  model_dir, grid->pp);
    int n_sets = 1 + deck->eval.n_extra_data;
    struct dataset *sets = xcalloc((size_t)n_sets, sizeof *sets);
    open_dataset(&sets[0], deck->data.path, model_dir, cfg.vocab_size);
    for (int i = 1; i < n_sets; i++)
        open_dataset(&sets[i], deck->eval.extra_data[i - 1], model_dir, cfg.vocab_size);

    /* the tensors this rank will load, from the headers, before allocating for them */
    fail_if_any(model_check_checkpoint(&cfg, grid, layout->me, model_dir, err, sizeof err),
                EXIT_INPUT, "eval: %s", err);
    struct model model;
    model_create(&model, &cfg, grid, layout->me);
    model.ep_comm = &layout->ep;
    model.pp_comm = &layout->pp;
    model_log_stages(&model, "eval");
    if (deck->model.frozen_weights == FROZEN_BF16) model_store_frozen_bf16(&model); /* all frozen */
    fail_if_any(model_load(&model, model_dir, err, sizeof err) != 0, EXIT_INPUT, "eval: %s", err);
    int applied = 0;
    if (adapter && peft_adapter_is(adapter)) /* LoRA: W + scale B A */
        fail_if_any(peft_adapter_apply(&model, adapter, &applied, err, sizeof err) != 0,
                    EXIT_INPUT, "eval: %s", err);
    else if (adapter)
        fail_if_any(model_apply_adapter(&model, adapter, &applied, err, sizeof err) != 0,
                    EXIT_INPUT, "eval: %s", err);
    log_info("eval: model %s%s%s", model_dir, adapter ? ", adapter " : "", adapter ? adapter : "");
    const struct backend *ops = phase_backend(deck, "eval");
    model_attach(&model, ops);
    c2r_phase_setup(deck, &model, "eval", 1);

    struct token_batch batch;
    token_batch_init(&batch, deck->eval.batch * deck->data.seq_len);
    struct forward_workspace *ws = forward_workspace_new(&model, deck->eval.batch * deck->data.seq_len);
    struct eval_sums *results = xcalloc((size_t)n_sets, sizeof *results);
    for (int i = 0; i < n_sets; i++) {
        uint64_t n = sets[i].n_samples;
        uint64_t *order = xmalloc(n * sizeof *order), first = 0;
        if (i == 0 && validation) {
            first = blocks_split(order, n, deck->train.val_fraction, deck->run.seed);
            if (first == n)
                fatal_all(EXIT_INPUT, "eval: eval.split validation: train.val_fraction (%g) holds "
                          "out no sample of %s", deck->train.val_fraction, deck->data.path);
        } else {
            for (uint64_t k = 0; k < n; k++) order[k] = k;
        }
        evaluate_samples(&model, ops, ws, &batch, &sets[i], order + first, n - first, deck, layout,
                         &results[i]);
        report(&results[i], sets[i].path, i == 0 && validation ? "validation" : "all");
        free(order);
    }

    int status = 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/eval.json", deck->run.output_dir);
    if (layout->world_rank == 0) {
        char tmp[4300];
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        json_t *o = json_object();
        put_sums(o, &results[0], deck->data.path);
        json_object_set_new(o, "split", json_string(validation ? "validation" : "all"));
        json_object_set_new(o, "model", json_string(model_dir));
        json_object_set_new(o, "adapter", adapter ? json_string(adapter) : json_null());
        json_object_set_new(o, "adapter_tensors", json_integer(applied));
        json_object_set_new(o, "seq_len", json_integer(deck->data.seq_len));
        json_t *extra = json_array();
        for (int i = 1; i < n_sets; i++) {
            json_t *e = json_object();
            put_sums(e, &results[i], sets[i].path);
            json_array_append_new(extra, e);
        }
        json_object_set_new(o, "extra", extra);
        FILE *out = make_directories(deck->run.output_dir) == 0 ? fopen(tmp, "w") : NULL;
        if (!out) {
            snprintf(err, sizeof err, "cannot write %s", tmp);
            status = EXIT_RUNTIME;
        } else {
            if (json_dumpf(o, out, JSON_INDENT(2) | JSON_REAL_PRECISION(17)) != 0 || fputc('\n', out) == EOF)
                fprintf(out, "?"); /* file_commit reports the stream's error */
            if (file_commit(out, tmp, path, err, sizeof err) != 0) status = EXIT_RUNTIME;
        }
        json_decref(o);
    }
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status != 0) fatal_all(status, "eval: %s", err);
    log_info("eval: -> %s", path);

    free(results);
    token_batch_free(&batch);
    forward_workspace_free(ws);
    model_free(&model);
    for (int i = 0; i < n_sets; i++) dataset_close(&sets[i]);
    free(sets);
    return 0;
}
