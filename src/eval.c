/* eval: the `eval` phase: loss, perplexity and next-token accuracy of a model, with the
 * trained tensors of an adapter (eval.adapter: the train phase's adapter.safetensors)
 * put over the base weights, or a LoRA adapter directory folded in (peft_adapter.h), on a prepared dataset, under any rank layout.
 *
 * Every sample of data.path is evaluated once, in dataset order, packed into blocks of
 * data.seq_len tokens as the train phase packs them (data.pack); eval.batch blocks form
 * one forward pass, and forward pass m goes to data rank m mod (dp x ep). Loss: the sum
 * of token cross-entropies over the loss-bearing targets divided by their number (the
 * train phase's loss); perplexity exp(loss); accuracy: the share of those targets that
 * are the logits' argmax (ties to the lower id). Rank 0 writes OUTPUT_DIR/eval.json. */
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

int phase_eval(const struct deck *deck, const struct layout *layout)
{
    const struct layout_grid *grid = &layout->grid;
    int rank = layout->me.dp_rank * grid->ep + layout->me.ep_rank, dp = grid->dp * grid->ep;
    int seq_len = deck->data.seq_len, per_pass = deck->eval.batch;
    char err[4096];

    struct model_config cfg;
    if (hfconfig_load(deck->model.path, &cfg, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "eval: %s", err);
    if (grid->pp > 1 && cfg.tie_word_embeddings)
        fatal_all(EXIT_INPUT, "eval: %s ties lm_head to the embedding (tie_word_embeddings); "
                  "pipeline parallelism (parallel.pp %d) does not support tied embeddings yet",
                  deck->model.path, grid->pp);
    struct dataset ds;
    if (dataset_open(&ds, deck->data.path, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "eval: %s", err);
    if (dataset_check_model(&ds, deck->model.path, cfg.vocab_size, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "eval: %s", err);
    if (ds.n_samples == 0) fatal_all(EXIT_INPUT, "eval: %s holds no sample", deck->data.path);

    /* the tensors this rank will load, from the headers, before allocating for them */
    fail_if_any(model_check_checkpoint(&cfg, grid, layout->me, deck->model.path, err, sizeof err),
                EXIT_INPUT, "eval: %s", err);
    struct model model;
    model_create(&model, &cfg, grid, layout->me);
    model.ep_comm = &layout->ep;
    model.pp_comm = &layout->pp;
    model_log_stages(&model, "eval");
    if (deck->model.frozen_weights == FROZEN_BF16) model_store_frozen_bf16(&model); /* all frozen */
    fail_if_any(model_load(&model, deck->model.path, err, sizeof err) != 0, EXIT_INPUT, "eval: %s",
                err);
    int applied = 0;
    if (deck->eval.adapter && peft_adapter_is(deck->eval.adapter)) /* LoRA: W + scale B A */
        fail_if_any(peft_adapter_apply(&model, deck->eval.adapter, &applied, err, sizeof err) != 0,
                    EXIT_INPUT, "eval: %s", err);
    else if (deck->eval.adapter)
        fail_if_any(model_apply_adapter(&model, deck->eval.adapter, &applied, err, sizeof err) != 0,
                    EXIT_INPUT, "eval: %s", err);
    const struct backend *ops = phase_backend(deck, "eval");
    model_attach(&model, ops);
    c2r_phase_setup(deck, &model, "eval", 1);

    uint64_t *order = xmalloc(ds.n_samples * sizeof *order);
    for (uint64_t i = 0; i < ds.n_samples; i++) order[i] = i;
    struct block_plan plan = {0};
    plan_blocks(&ds, order, ds.n_samples, seq_len, deck->data.pack, &plan);
    int passes = (plan.n_blocks + per_pass - 1) / per_pass;
    int rounds = (passes + dp - 1) / dp;
    log_info("eval: %" PRIu64 " samples in %d blocks of <= %d tokens, %d per forward pass, %d "
             "data rank%s%s%s", ds.n_samples, plan.n_blocks, seq_len, per_pass, dp,
             dp == 1 ? "" : "s", deck->eval.adapter ? "; adapter " : "",
             deck->eval.adapter ? deck->eval.adapter : "");

    struct token_batch batch;
    token_batch_init(&batch, per_pass * seq_len);
    struct forward_workspace *ws = forward_workspace_new(&model, per_pass * seq_len);
    bool last_stage = layout->me.pp_rank == grid->pp - 1;
    double sums[4] = {0, 0, 0, 0}; /* cross-entropy, targets, correct, tokens (last stage) */
    double start = wall_time(), last_report = start;
    for (int round = 0; round < rounds; round++) {
        int pass = round * dp + rank;
        batch.N = 0;
        batch.targets_counted = 0;
        for (int b = pass * per_pass; pass < passes && b < (pass + 1) * per_pass && b < plan.n_blocks; b++)
            append_block(&batch, &ds, &plan, b, seq_len);
        /* a rank out of blocks still passes an empty batch: EP and PP exchange in each */
        if (batch.N == 0 && grid->ep == 1 && grid->pp == 1) continue;
        struct batch in = {.N = batch.N, .tokens = batch.tokens, .positions = batch.positions,
                           .sample_start = batch.sample_start, .targets = batch.targets};
        struct forward_result r;
        model_forward(&model, ops, ws, &in, &r);
        if (!last_stage) continue;
        sums[0] += r.loss_sum;
        sums[1] += (double)r.loss_count;
        sums[3] += batch.N;
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
    double seconds = wall_time() - start;
    double loss = sums[1] > 0 ? sums[0] / sums[1] : NAN, accuracy = sums[1] > 0 ? sums[2] / sums[1] : NAN;

    int status = 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/eval.json", deck->run.output_dir);
    if (layout->world_rank == 0) {
        char tmp[4300];
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        json_t *o = json_object();
        json_object_set_new(o, "loss", json_real(loss));
        json_object_set_new(o, "perplexity", json_real(exp(loss)));
        json_object_set_new(o, "accuracy", json_real(accuracy));
        json_object_set_new(o, "targets", json_integer((json_int_t)sums[1]));
        json_object_set_new(o, "tokens", json_integer((json_int_t)sums[3]));
        json_object_set_new(o, "blocks", json_integer(plan.n_blocks));
        json_object_set_new(o, "samples", json_integer((json_int_t)ds.n_samples));
        json_object_set_new(o, "model", json_string(deck->model.path));
        json_object_set_new(o, "adapter", deck->eval.adapter ? json_string(deck->eval.adapter) : json_null());
        json_object_set_new(o, "adapter_tensors", json_integer(applied));
        json_object_set_new(o, "dataset", json_string(deck->data.path));
        json_object_set_new(o, "seq_len", json_integer(seq_len));
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
    log_info("eval: loss %.6f  perplexity %.4f  accuracy %.4f over %.0f targets (%.1f s) -> %s", loss,
             exp(loss), accuracy, sums[1], seconds, path);
    metrics_write("evaluation", "\"loss\": %.17g, \"perplexity\": %.17g, \"accuracy\": %.17g, "
                  "\"targets\": %.0f, \"seconds\": %.3f", loss, exp(loss), accuracy, sums[1], seconds);

    token_batch_free(&batch);
    forward_workspace_free(ws);
    free(plan.first), free(plan.order);
    free(order);
    model_free(&model);
    dataset_close(&ds);
    return 0;
}
