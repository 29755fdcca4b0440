/* train: the `train` phase, ESFT step 3 (shared/reference/esft-semantics.md sections 3
 * and 5): fine-tunes the method's trainable tensors (ESFT: the experts of an
 * expert_config.json), everything else frozen, with data parallelism over the ranks.
 *
 * Data: the dataset's samples are split once, by a permutation seeded with run.seed,
 * into validation (train.val_fraction) and training samples. Each epoch shuffles the
 * training samples (seed and epoch number) and packs them, whole and in order, into
 * blocks of at most data.seq_len tokens (a longer sample is cut), with causal attention
 * inside each sample only and positions restarting per sample (data.pack false: one
 * sample per block). A step takes train.global_batch blocks, cut in order into
 * micro-batches of train.micro_batch blocks; micro-batch m goes to rank m mod dp. So a
 * micro-batch holds the same blocks for any rank count.
 * Loss: the sum of token cross-entropies over the step's loss-bearing targets divided by
 * their number over the whole global batch, so the loss and gradients are the same for
 * any rank count. With train.aux_loss_coef > 0 the load-balancing loss is added as the
 * reference (and transformers under gradient accumulation) does: each micro-batch's
 * aux loss, computed over its tokens as one forward call of transformers would, averaged
 * over the step's micro-batches, times the coefficient. It is reported either way.
 * Gradients (trainable tensors only) are summed over the ranks, clipped to
 * train.clip_grad by global norm, and AdamW takes the step.
 * Checkpoints every train.checkpoint_every steps (0: at the end only) and when SIGUSR1 or
 * SIGTERM arrives (then the run stops after writing it, with EXIT_STOPPED);
 * train.resume auto continues from the newest.
 * A step whose global batch holds no loss-bearing target, or whose loss or gradient norm
 * is not finite, updates nothing: train.bad_steps stop (the default) writes a checkpoint
 * of the last good step and ends the run with an error; skip counts it and goes on. */
#include <inttypes.h>
#include <math.h>
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "backend.h"
#include "c2r.h"
#include "blocks.h"
#include "checkpoint.h"
#include "export.h"
#include "dataset.h"
#include "files.h"
#include "flops.h"
#include "hfconfig.h"
#include "history.h"
#include "log.h"
#include "lora.h"
#include "model.h"
#include "optim.h"
#include "phases.h"
#include "resume.h"
#include "rng.h"
#include "trainable.h"

static volatile sig_atomic_t stop_signal = 0;

static void on_stop_signal(int signal_number) { stop_signal = signal_number; }

/* ---- gradients ------------------------------------------------------------------------ */

/* Sums the trainable gradients over the ranks that saw other data (DESIGN.md, "Process
 * layout"): tensors every rank of a stage holds (non-expert, shared experts) over the
 * stage group, routed experts over edp (the dp replicas of this EP rank). scratch holds
 * grad_floats floats. Returns the global gradient norm, each tensor counted once. */
static double reduce_gradients(struct model *m, const struct layout *layout, float *scratch)
{
    size_t n_replicated = 0, n_expert = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!p->grad) continue;
        if (p->ep_rank < 0) n_replicated += p->numel;
        else n_expert += p->numel;
    }
    float *replicated = scratch, *expert = scratch + n_replicated;
    for (int pass = 0; pass < 2; pass++) { /* pack, then unpack */
        size_t a = 0, b = 0;
        for (int i = 0; i < m->n_params; i++) {
            struct param *p = &m->params[i];
            if (!p->grad) continue;
            float *at = p->ep_rank < 0 ? replicated + a : expert + b;
            if (pass == 0) memcpy(at, p->grad, p->numel * sizeof(float));
            else memcpy(p->grad, at, p->numel * sizeof(float));
            *(p->ep_rank < 0 ? &a : &b) += p->numel;
        }
        if (pass == 1) break;
        if (layout->stage.size > 1 && n_replicated > 0)
            comm_allreduce(&layout->stage, replicated, n_replicated, COMM_F32, COMM_SUM, COMM_HOST);
        if (layout->edp.size > 1 && n_expert > 0)
            comm_allreduce(&layout->edp, expert, n_expert, COMM_F32, COMM_SUM, COMM_HOST);
    }
    double squares[2] = {0, 0};
    for (size_t j = 0; j < n_replicated; j++) squares[0] += (double)replicated[j] * replicated[j];
    for (size_t j = 0; j < n_expert; j++) squares[1] += (double)expert[j] * expert[j];
    /* one copy of each: stage rank 0's replicated tensors, dp rank 0's experts */
    double mine = (layout->stage.rank == 0 ? squares[0] : 0.0) + (layout->me.dp_rank == 0 ? squares[1] : 0.0);
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &mine, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    return sqrt(mine);
}

/* The trained weights and the optimizer's moments to the host copies that checkpoints
 * and exports read (nothing moves when the steps run on the host). */
static void state_to_host(struct model *m, struct adamw *opt)
{
    model_download_trainable(m);
    adamw_download(opt);
}

/* The process's peak before the last reset of the kernel's counter (checkpoint_peaks):
 * ru_maxrss restarts from the resident size then, the run's peak does not. */
static double peak_before_reset_mib;

/* Peak resident memory of this process in MiB (Linux: ru_maxrss is in KiB). */
static double peak_rss_mib(void)
{
    struct rusage usage;
    double now = getrusage(RUSAGE_SELF, &usage) == 0 ? usage.ru_maxrss / 1024.0 : 0.0;
    return now > peak_before_reset_mib ? now : peak_before_reset_mib;
}

/* A line of /proc/self/status ("VmHWM: %lf kB": the peak, "VmRSS: %lf kB": now) in MiB
 * (Linux); 0 when unknown. */
static double proc_status_mib(const char *format)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    double kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, format, &kib) == 1) break;
    fclose(f);
    return kib / 1024.0;
}

/* Each rank's peak resident memory over a write (a checkpoint, the merged export): the
 * kernel's peak (VmHWM) is reset to the resident size at the start (writing 5 to
 * /proc/self/clear_refs) and read at the end, beside the resident size at the start.
 * Where the reset is not allowed the figures are the run's peaks so far. */
struct peak_window {
    double resident, start;
    int reset;
};

static struct peak_window peak_window_open(void)
{
    peak_before_reset_mib = peak_rss_mib();
    struct peak_window w = {.resident = proc_status_mib("VmRSS: %lf kB")};
    FILE *refs = fopen("/proc/self/clear_refs", "w");
    w.reset = refs && fputs("5", refs) >= 0;
    if (refs && fclose(refs) != 0) w.reset = 0;
    w.start = wall_time();
    return w;
}

/* The figures of every rank on rank 0 (collective over MPI_COMM_WORLD): rank 0's peak and
 * resident size at the start, the other ranks' smallest and largest peak and resident
 * size; the seconds since the start; whether every rank's counter was reset. */
struct peak_figures {
    double rank0_peak, rank0_before, others_peak[2], others_before[2], seconds;
    int every_reset;
};

static struct peak_figures peak_window_close(const struct peak_window *w)
{
    struct peak_figures f = {.seconds = wall_time() - w->start, .every_reset = 1};
    int rank, size;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &size));
    double mine[3] = {proc_status_mib("VmHWM: %lf kB"), w->resident, w->reset};
    double *all = rank == 0 ? xmalloc(3 * (size_t)size * sizeof *all) : NULL;
    check_mpi(MPI_Gather(mine, 3, MPI_DOUBLE, all, 3, MPI_DOUBLE, 0, MPI_COMM_WORLD));
    if (rank == 0) {
        const double *first = size > 1 ? all + 3 : all;
        f.rank0_peak = all[0];
        f.rank0_before = all[1];
        f.others_peak[0] = f.others_peak[1] = first[0];
        f.others_before[0] = f.others_before[1] = first[1];
        for (int r = 0; r < size; r++) {
            const double *a = all + 3 * r;
            f.every_reset &= a[2] != 0;
            if (r == 0) continue;
            f.others_peak[0] = a[0] < f.others_peak[0] ? a[0] : f.others_peak[0];
            f.others_peak[1] = a[0] > f.others_peak[1] ? a[0] : f.others_peak[1];
            f.others_before[0] = a[1] < f.others_before[0] ? a[1] : f.others_before[0];
            f.others_before[1] = a[1] > f.others_before[1] ? a[1] : f.others_before[1];
        }
    }
    free(all);
    return f;
}

/* checkpoint_write inside a peak window: logged, and recorded in metrics.jsonl
 * ("checkpoint": rank 0's figures and the smallest and largest of the other ranks'), so
 * that what the write costs each rank is seen: rank 0 holds no more than the others
 * (checkpoint_peak: false when the figures are the run's peaks). */
static int write_checkpoint(const char *output_dir, const struct model *model,
                            const struct adamw *opt, const struct train_position *position,
                            const struct checkpoint_run *run, int keep, char *err,
                            size_t err_size)
{
    struct peak_window window = peak_window_open();
    int rc = checkpoint_write(output_dir, model, opt, position, run, keep, MPI_COMM_WORLD, err,
                              err_size);
    struct peak_figures f = peak_window_close(&window);
    int rank;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    if (rank == 0 && rc == 0) {
        log_info("train: checkpoint at step %lld in %.2f s: peak memory %.1f MiB on rank 0 (%.1f "
                 "before the write), %.1f to %.1f MiB on the other ranks (%.1f to %.1f before)%s",
                 position->step, f.seconds, f.rank0_peak, f.rank0_before, f.others_peak[0],
                 f.others_peak[1], f.others_before[0], f.others_before[1],
                 f.every_reset ? "" : " (the run's peaks: the counter could not be reset)");
        metrics_write("checkpoint",
                      "\"step\": %lld, \"seconds\": %.3f, \"rank0_peak_rss_mib\": %.1f, "
                      "\"others_peak_rss_mib\": "
                      "[%.1f, %.1f], \"rank0_rss_before_mib\": %.1f, \"others_rss_before_mib\": "
                      "[%.1f, %.1f], \"checkpoint_peak\": %s",
                      position->step, f.seconds, f.rank0_peak, f.others_peak[0], f.others_peak[1],
                      f.rank0_before, f.others_before[0], f.others_before[1],
                      f.every_reset ? "true" : "false");
    }
    return rc;
}

/* export_merged inside a peak window, logged and recorded like a checkpoint
 * ("export_merged" in metrics.jsonl). */
static int write_merged(const char *dir, const struct model *model, const char *base_dir,
                        char *err, size_t err_size)
{
    struct peak_window window = peak_window_open();
    int rc = export_merged(dir, model, base_dir, (size_t)5 << 30, MPI_COMM_WORLD, err, err_size);
    struct peak_figures f = peak_window_close(&window);
    int rank;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    if (rank == 0 && rc == 0) {
        log_info("train: merged export in %.2f s: peak memory %.1f MiB on rank 0 (%.1f before "
                 "the write), %.1f to %.1f MiB on the other ranks (%.1f to %.1f before)%s",
                 f.seconds, f.rank0_peak, f.rank0_before, f.others_peak[0], f.others_peak[1],
                 f.others_before[0], f.others_before[1],
                 f.every_reset ? "" : " (the run's peaks: the counter could not be reset)");
        metrics_write("export_merged",
                      "\"seconds\": %.3f, \"rank0_peak_rss_mib\": %.1f, \"others_peak_rss_mib\": "
                      "[%.1f, %.1f], \"rank0_rss_before_mib\": %.1f, \"others_rss_before_mib\": "
                      "[%.1f, %.1f], \"export_peak\": %s",
                      f.seconds, f.rank0_peak, f.others_peak[0], f.others_peak[1], f.rank0_before,
                      f.others_before[0], f.others_before[1], f.every_reset ? "true" : "false");
    }
    return rc;
}

/* ---- the phase ----------------------------------------------------------------------- */

/* Mean loss over the validation blocks (every rank takes blocks j mod dp). */
static double evaluate(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                       const struct dataset *ds, const struct block_plan *val, int seq_len,
                       struct token_batch *b, int rank, int dp)
{
    double sums[2] = {0, 0};
    /* every rank runs the same number of forwards (under EP they exchange tokens), a
     * rank without a block an empty one */
    for (int round = 0; round * dp < val->n_blocks; round++) {
        int j = round * dp + rank;
        b->N = 0;
        b->targets_counted = 0;
        if (j < val->n_blocks) append_block(b, ds, val, j, seq_len);
        else if (m->grid.ep == 1 && m->grid.pp == 1) continue;
        struct batch batch = {.N = b->N, .tokens = b->tokens, .positions = b->positions,
                              .sample_start = b->sample_start, .targets = b->targets,
                              .block_start = b->block_start};
        struct forward_result r;
        model_forward(m, ops, ws, &batch, &r);
        sums[0] += r.loss_sum;
        sums[1] += (double)r.loss_count;
    }
    model_wait_sends(ws);
    /* the losses come from the last stage only */
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    return sums[1] > 0 ? sums[0] / sums[1] : NAN;
}

static void log_eval(long long step, double loss, int n_blocks)
{
    if (isnan(loss)) /* data.seq_len cut away every validation target */
        log_info("train: step %lld  no loss-bearing target in the %d validation blocks", step,
                 n_blocks);
    else
        log_info("train: step %lld  eval loss %.6f (%d validation blocks)", step, loss, n_blocks);
}

/* Method lora: the adapters the deck asks for, and whether this model's modules take
 * them (gpt_oss's experts do not; selected needs train.expert_config). */
static int lora_spec_of(const struct deck *deck, const struct model_config *cfg,
                        struct lora_spec *spec, char *err, size_t err_size)
{
    const struct deck_train *tr = &deck->train;
    *spec = (struct lora_spec){.r = tr->lora_rank, .alpha = tr->lora_alpha,
                               .rslora = tr->lora_rslora, .train_router = tr->lora_train_router};
    char where[4200];
    deck_where(deck, "train.lora.targets", where, sizeof where);
    char why[1024];
    if (lora_parse_targets(tr->lora_targets, tr->n_lora_targets, &spec->targets, &spec->experts,
                           why, sizeof why) != 0) {
        snprintf(err, err_size, "%s: %s", where, why);
        return -1;
    }
    if (spec->experts != LORA_EXPERTS_NONE && (cfg->num_experts == 0 || cfg->family == HF_GPT_OSS)) {
        snprintf(err, err_size, "%s: %s (%s) %s; name attention, dense_mlp or shared_experts",
                 where, deck->model.path, hfconfig_family_name(cfg->family),
                 cfg->num_experts == 0 ? "has no routed experts"
                                       : "keeps its experts transposed with interleaved gate and "
                                         "up columns, a form esft's expert adapters do not write");
        return -1;
    }
    if (spec->experts == LORA_EXPERTS_SELECTED && (!tr->expert_config || !tr->expert_config[0])) {
        snprintf(err, err_size, "%s: selected adapts the experts of train.expert_config, which is "
                 "not set (select writes it: expert_config.json)", where);
        return -1;
    }
    return 0;
}

/* The balance loss esft adds is the family's (hfconfig.h, enum hf_aux_kind). The sigmoid
 * routers of deepseek_v3 and glm4_moe have none in transformers (5.24), and the ESFT
 * reference trains DeepSeek-V2 only: a coefficient would train a term nobody defines. */
int train_check_model(const struct deck *deck, const struct model_config *cfg, char *err,
                      size_t err_size)
{
    if (densemixer_check(deck, cfg, err, err_size) != 0) return -1;
    struct lora_spec spec;
    if (deck->train.method == METHOD_LORA && lora_spec_of(deck, cfg, &spec, err, err_size) != 0)
        return -1;
    if (deck->train.method == METHOD_LORA && deck->train.export_merged &&
        deck->model.frozen_weights == FROZEN_BF16) {
        char where[4200];
        deck_where(deck, "train.export_merged", where, sizeof where);
        snprintf(err, err_size,
                 "%s: train.export_merged with train.method lora and model.frozen_weights bf16 "
                 "is not supported yet (the merge folds B A into base weights that are held as "
                 "bf16); export the adapter alone, or merge with model.frozen_weights fp32",
                 where);
        return -1;
    }
    if (cfg->aux == AUX_NONE && deck->train.aux_loss_coef > 0) {
        char where[4200];
        deck_where(deck, "train.aux_loss_coef", where, sizeof where);
        snprintf(err, err_size,
                 "%s: train.aux_loss_coef (%g) must be 0 for %s (%s): its sigmoid router has "
                 "no balance loss in transformers, and the ESFT reference's sequence-level loss "
                 "is DeepSeek-V2's (softmax scores)",
                 where, deck->train.aux_loss_coef, hfconfig_family_name(cfg->family),
                 deck->model.path);
        return -1;
    }
    return 0;
}

int phase_train(const struct deck *deck, const struct layout *layout)
{
    const struct deck_train *tr = &deck->train;
    const struct layout_grid *grid = &layout->grid;
    /* every rank of a stage (dp x ep of them) takes its own share of the data */
    int rank = layout->me.dp_rank * grid->ep + layout->me.ep_rank, dp = grid->dp * grid->ep;
    int seq_len = deck->data.seq_len;
    char err[4096], where[4200];
    if (tr->global_batch % (tr->micro_batch * dp) != 0) {
        deck_where(deck, "train.global_batch", where, sizeof where);
        fatal_all(EXIT_INPUT, "%s: train.global_batch (%d) is not divisible by train.micro_batch "
                  "x dp x ep (%d x %d x %d = %d)", where, tr->global_batch, tr->micro_batch,
                  grid->dp, grid->ep, tr->micro_batch * dp);
    }

    struct model_config cfg;
    if (hfconfig_load(deck->model.path, &cfg, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);
    struct dataset ds;
    if (dataset_open(&ds, deck->data.path, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);
    if (dataset_check_model(&ds, deck->model.path, cfg.vocab_size, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);
    if (train_check_model(deck, &cfg, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);
    if (grid->pp > 1 && cfg.tie_word_embeddings)
        fatal_all(EXIT_INPUT, "train: %s ties lm_head to the embedding (tie_word_embeddings); "
                  "pipeline parallelism (parallel.pp %d) does not support tied embeddings yet",
                  deck->model.path, grid->pp);
    struct expert_config ec = {0};
    bool selected_lora = deck_lora_selects_experts(deck);
    if ((tr->method == METHOD_ESFT || selected_lora) &&
        expert_config_read(tr->expert_config, &cfg, &ec, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);

    /* validation / training split, fixed for the run */
    uint64_t S = ds.n_samples;
    uint64_t *all = xmalloc((S ? S : 1) * sizeof *all);
    uint64_t n_train = blocks_split(all, S, tr->val_fraction, deck->run.seed);
    uint64_t n_val = S - n_train;
    if (n_train == 0) fatal_all(EXIT_INPUT, "train: %s holds no training sample", deck->data.path);
    uint64_t n_cut = 0; /* samples longer than a block: cut to data.seq_len */
    for (uint64_t i = 0; i < S; i++) n_cut += dataset_sample_length(&ds, i) > (uint64_t)seq_len;
    if (n_cut)
        log_warn("train: %" PRIu64 " of %" PRIu64 " samples of %s are longer than data.seq_len "
                 "(%d) and are cut to it (their later tokens are not trained on)", n_cut, S,
                 deck->data.path, seq_len);
    struct block_plan val = {0}, epoch_plan = {0};
    plan_blocks(&ds, all + n_train, n_val, seq_len, deck->data.pack, &val);
    uint64_t *train_samples = xmalloc(n_train * sizeof *train_samples);

    /* the tensors this rank will load, from the headers, before allocating for them */
    fail_if_any(model_check_checkpoint(&cfg, grid, layout->me, deck->model.path, err, sizeof err),
                EXIT_INPUT, "train: %s", err);
    struct model model;
    struct lora_spec lora = {0};
    if (tr->method == METHOD_LORA) {
        if (lora_spec_of(deck, &cfg, &lora, err, sizeof err) != 0)
            fatal_all(EXIT_INPUT, "train: %s", err);
        /* A drawn as PEFT draws it, from run.seed (lora.h) */
        model_create_lora(&model, &cfg, grid, layout->me, &lora, (uint64_t)deck->run.seed);
    } else {
        model_create(&model, &cfg, grid, layout->me);
    }
    model.ep_comm = &layout->ep;
    model.pp_comm = &layout->pp;
    model_log_stages(&model, "train");
    /* what trains is known from the table alone, before the weights are read: the frozen
     * ones may then be held as bf16 from the start (model.frozen_weights) */
    bool *trainable = xcalloc((size_t)model.n_params, sizeof(bool));
    if (trainable_select(&model, tr->method, tr->method == METHOD_ESFT || selected_lora ? &ec : NULL, trainable,
                         err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);
    if (tr->method == METHOD_LORA && lora.train_router) trainable_add_routers(&model, trainable);
    model_set_trainable(&model, trainable);
    model.densemixer = densemixer_enabled(tr); /* before the workspaces: they hold its scratch */
    if (deck->model.frozen_weights == FROZEN_BF16) model_store_frozen_bf16(&model);
    fail_if_any(model_load(&model, deck->model.path, err, sizeof err) != 0, EXIT_INPUT, "train: %s",
                err);
    size_t n_trainable = 0, n_total = 0;
    int n_tensors = 0;
    for (int i = 0; i < model.n_params; i++) {
        n_total += model.params[i].numel;
        if (trainable[i]) n_trainable += model.params[i].numel, n_tensors++;
    }
    const char *method = tr->method == METHOD_ESFT         ? "esft"
                         : tr->method == METHOD_FULL       ? "full"
                         : tr->method == METHOD_LORA       ? "lora"
                         : tr->method == METHOD_DENSEMIXER ? "densemixer"
                                                           : "frozen_router";
    if (n_tensors == 0) /* every rank holds the whole table, so all agree */
        fatal_all(EXIT_INPUT, "train: method %s selects no tensor of %s to train", method,
                  deck->model.path);
    /* what this rank holds: the routed experts' share falls as 1/ep */
    double held[2] = {0, 0}; /* MiB: all weights, routed experts */
    for (int i = 0; i < model.n_params; i++)
        if (param_held(&model.params[i])) {
            size_t bytes = model.params[i].data_bf16 ? sizeof(uint16_t) : sizeof(float);
            double mib = (double)model.params[i].numel * bytes / 1048576.0;
            held[0] += mib;
            if (model.params[i].kind == PARAM_EXPERT) held[1] += mib;
        }
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, held, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
    log_info("train: weights per rank %.2f MiB (%s), of which routed experts %.2f MiB", held[0],
             deck->model.frozen_weights == FROZEN_BF16 ? "frozen matrices bf16, the rest fp32"
                                                       : "fp32",
             held[1]);
    metrics_write("memory", "\"weights_mib\": %.3f, \"expert_weights_mib\": %.3f", held[0], held[1]);
    struct adamw opt;
    adamw_init(&opt, &model, tr);
    float *grad_scratch = xmalloc((model.grad_floats ? model.grad_floats : 1) * sizeof(float));
    log_info("train: %s, %d trainable tensors, %.3fM of %.3fM parameters (%.2f%%); %" PRIu64
             " training and %" PRIu64 " validation samples; global batch %d blocks of <= %d "
             "tokens, micro-batch %d, dp %d", method, n_tensors, n_trainable / 1e6, n_total / 1e6,
             100.0 * n_trainable / n_total, n_train, n_val, tr->global_batch, seq_len,
             tr->micro_batch, dp);
    if (model.densemixer)
        log_info("train: DenseMixer's router gradient: the backward runs all %d experts of each "
                 "MoE layer on every token (%d/%d = %.3g x the routed experts' forward FLOPs)",
                 cfg.num_experts, cfg.num_experts, cfg.top_k, (double)cfg.num_experts / cfg.top_k);

    /* the resolved deck, stored in checkpoints */
    char *deck_text = NULL;
    size_t deck_size = 0;
    FILE *text = open_memstream(&deck_text, &deck_size);
    if (text) {
        deck_print(deck, text);
        fclose(text);
    }

    /* what checkpoints record of this run, and the checkpoint it continues from, if any:
     * an intact one of the same run (resume.h) */
    struct checkpoint_run run = {.method = method, .deck_text = deck_text};
    resume_hash_inputs(deck, &ds, &run);
    struct train_position position = {0};
    rng_seed((struct rng *)position.rng, (uint64_t)deck->run.seed);
    char path[4200] = "";
    int found = resume_from_checkpoint(deck, &run, &model, &opt, &position, path, sizeof path);
    if (found) log_info("train: resuming from %s at step %lld", path, position.step);
    /* the weights as loaded (and restored) go to the backend: the steps run there */
    const struct backend *ops = phase_backend(deck, "train");
    model_attach(&model, ops);
    c2r_phase_setup(deck, &model, "train", 1);
    adamw_attach(&opt, &model); /* the steps run where the weights are */

    if (position.step >= tr->steps)
        log_info("train: %s is at step %lld, train.steps is %d: nothing to train (raise "
                 "train.steps to train on; train.resume: never or another run.output_dir starts "
                 "over); exporting its tensors again", path, position.step, tr->steps);
    metrics_write("train_start", "\"from_step\": %lld, \"steps\": %d, \"method\": \"%s\", "
                  "\"trainable_parameters\": %zu, \"samples_cut\": %" PRIu64, position.step,
                  tr->steps, method, n_trainable, n_cut);

    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGUSR1, &action, NULL);
    sigaction(SIGTERM, &action, NULL);

    int per_rank = tr->global_batch / dp, micro_batches = per_rank / tr->micro_batch;
    int capacity = tr->micro_batch * seq_len;
    struct token_batch micro[micro_batches > 0 ? micro_batches : 1];
    for (int i = 0; i < micro_batches; i++) token_batch_init(&micro[i], capacity);
    struct token_batch eval_batch;
    token_batch_init(&eval_batch, seq_len);
    /* one training workspace per micro-batch a stage holds at once under 1F1B */
    int n_ws = grid->pp - layout->me.pp_rank;
    if (n_ws > micro_batches) n_ws = micro_batches > 0 ? micro_batches : 1;
    struct forward_workspace *ws[n_ws];
    for (int k = 0; k < n_ws; k++)
        ws[k] = tr->recompute ? forward_workspace_new_recompute(&model, capacity)
                              : forward_workspace_new_training(&model, capacity);
    struct forward_workspace *eval_ws = forward_workspace_new(&model, seq_len);
    bool validate = val.n_blocks > 0 && tr->eval_every > 0; /* eval_every 0: never */

    if (validate && !found) { /* the untrained model's loss, the curve's start */
        double eval = evaluate(&model, ops, eval_ws, &ds, &val, seq_len, &eval_batch, rank, dp);
        log_eval(0, eval, val.n_blocks);
        metrics_write("eval", "\"step\": 0, \"loss\": %.17g", eval);
    }

    long long planned_epoch = -1;
    double start = wall_time(), tokens_done = 0, flops_done = 0;
    double dense_flops_done = 0; /* DenseMixer's extra, beside the model FLOPs */
    long long first_step = position.step, last_checkpoint = found ? position.step : -1;
    long long skipped = 0; /* steps whose batch was skipped (train.bad_steps skip) */
    int status = 0;
    while (position.step < tr->steps) {
        struct train_position before = position; /* the last good step, should this one fail */
        alloc_watch_start(); /* the step's body allocates nothing (counted in "allocations") */
        /* gather this step's blocks: block j of the step goes to rank j mod dp */
        for (int i = 0; i < micro_batches; i++) micro[i].N = 0, micro[i].targets_counted = 0;
        for (int j = 0; j < tr->global_batch; j++) {
            if (planned_epoch != position.epoch) {
                memcpy(train_samples, all, n_train * sizeof *train_samples);
                blocks_shuffle(train_samples, n_train, (uint64_t)deck->run.seed + 1000003ULL * (uint64_t)(position.epoch + 1));
                plan_blocks(&ds, train_samples, n_train, seq_len, deck->data.pack, &epoch_plan);
                planned_epoch = position.epoch;
            }
            int m = j / tr->micro_batch; /* the step's micro-batch that holds block j */
            if (m % dp == rank)
                append_block(&micro[m / dp], &ds, &epoch_plan, (int)position.block, seq_len);
            if (++position.block == epoch_plan.n_blocks) position.block = 0, position.epoch++;
        }
        double counts[3] = {0, 0, 0}; /* loss-bearing targets, tokens, attended keys */
        for (int i = 0; i < micro_batches; i++) {
            counts[0] += (double)micro[i].targets_counted, counts[1] += micro[i].N;
            for (int t = 0; t < micro[i].N; t++) counts[2] += t - micro[i].sample_start[t] + 1;
        }
        /* over the data ranks of the stage: every stage of a chain holds the same data */
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, counts, 3, MPI_DOUBLE, MPI_SUM, layout->stage.mpi));
        /* model FLOPs of the step, full fine-tuning equivalent (flops.h) */
        double attended = counts[1] > 0 ? 2.0 * counts[2] / counts[1] : 0.0;
        flops_done += counts[1] * token_flops(&cfg, attended).training;
        if (model.densemixer) dense_flops_done += counts[1] * token_flops_densemixer(&cfg);
        float scale = counts[0] > 0 ? (float)(1.0 / counts[0]) : 0.0f;

        /* d loss / d aux of one micro-batch: the coefficient over the step's micro-batches */
        int step_micro_batches = tr->global_batch / tr->micro_batch;
        float aux_scale = (float)(tr->aux_loss_coef / step_micro_batches);
        model_zero_grads(&model);
        double sums[3] = {0, 0, 0}; /* cross-entropy, aux losses, correct targets (last stage) */
        /* One forward-one backward (1F1B): stage s runs pp - 1 - s forwards ahead, then
         * alternates a forward with the backward of its oldest micro-batch, then drains;
         * micro-batch i lives in workspace i mod (pp - s). With pp = 1: forward, backward,
         * forward, backward, ... */
        int warmup = grid->pp - 1 - layout->me.pp_rank;
        if (warmup > micro_batches) warmup = micro_batches;
        for (int k = 0; k < micro_batches + warmup; k++) {
            for (int pass = 0; pass < 2; pass++) {
                int i = pass == 0 ? k : k - warmup; /* forward micro-batch k, backward k - warmup */
                if (i < 0 || i >= micro_batches) continue;
                struct batch batch = {.N = micro[i].N, .tokens = micro[i].tokens,
                                      .positions = micro[i].positions,
                                      .sample_start = micro[i].sample_start, .targets = micro[i].targets,
                                      .block_start = micro[i].block_start, .loss_scale = scale};
                /* an empty micro-batch still exchanges under EP and PP */
                if (batch.N == 0 && grid->ep == 1 && grid->pp == 1) continue;
                struct forward_workspace *w = ws[i % n_ws];
                if (pass == 0) {
                    struct forward_result r;
                    model_forward(&model, ops, w, &batch, &r);
                    sums[0] += r.loss_sum;
                    sums[1] += r.aux_loss;
                    sums[2] += (double)r.correct;
                } else {
                    model_backward(&model, ops, w, &batch, scale, aux_scale);
                }
            }
        }
        for (int k = 0; k < n_ws; k++) model_wait_sends(ws[k]);
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, sums, 3, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
        double aux = sums[1] / step_micro_batches;
        double norm;
        if (layout->stage.size > 1 || layout->edp.size > 1) {
            /* summed over ranks on the host: down, reduce, back up */
            model_download_grads(&model);
            norm = reduce_gradients(&model, layout, grad_scratch);
            model_upload_grads(&model);
        } else { /* every gradient is this rank's alone: its norm where it is */
            double squares = grad_sum_squares(&model);
            check_mpi(MPI_Allreduce(MPI_IN_PLACE, &squares, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
            norm = sqrt(squares);
        }
        double loss = counts[0] > 0 ? sums[0] / counts[0] : NAN;
        double accuracy = counts[0] > 0 ? sums[2] / counts[0] : NAN;
        double lr = lr_at(tr, position.step);
        /* every rank holds the same sums and norm, so every rank decides alike */
        const char *bad = counts[0] == 0 ? "its global batch holds no loss-bearing target"
                          : !isfinite(loss) ? "its loss is not finite"
                          : !isfinite(norm) || !isfinite(aux) ? "its gradient norm or aux loss is not finite"
                                                              : NULL;
        if (bad && tr->bad_steps == BAD_STEPS_STOP) {
            state_to_host(&model, &opt);
            if (before.step > last_checkpoint &&
                write_checkpoint(deck->run.output_dir, &model, &opt, &before, &run,
                                 tr->keep_checkpoints, err, sizeof err) != 0)
                fatal_all(EXIT_RUNTIME, "train: %s", err);
            metrics_write("bad_step", "\"step\": %lld, \"reason\": \"%s\", \"loss\": %.17g, "
                          "\"grad_norm\": %.17g", before.step + 1, bad, loss, norm);
            fatal_all(EXIT_RUNTIME, "train: step %lld stopped the run: %s (loss %g, grad norm %g, "
                      "%.0f loss-bearing targets); the model is left at step %lld%s. "
                      "train.bad_steps: skip skips such batches", before.step + 1, bad, loss,
                      norm, counts[0], before.step,
                      before.step > 0 ? ", checkpointed" : "");
        }
        if (bad) {
            skipped++;
            log_warn("train: step %lld skipped: %s (train.bad_steps: skip)", before.step + 1, bad);
            metrics_write("bad_step", "\"step\": %lld, \"reason\": \"%s\", \"skipped\": true",
                          before.step + 1, bad);
        } else {
            /* clipping folded into the step: factor clip / (norm + 1e-6) on every gradient */
            float factor = tr->clip_grad > 0 && norm > tr->clip_grad
                               ? (float)(tr->clip_grad / (norm + 1e-6))
                               : 1.0f;
            adamw_step(&opt, &model, lr, factor);
        }
        long long step_allocations = alloc_watch_stop();
        position.step++;

        /* the largest over the ranks: host memory, and the backend's buffers (its own
         * count; the device's whole use for cuda) where it keeps them apart */
        double peak[3] = {peak_rss_mib(), 0, (double)step_allocations};
        if (ops->memory) {
            size_t in_use, most;
            ops->memory(&in_use, &most);
            peak[1] = (double)most / 1048576.0;
        }
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, peak, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
        double peak_mib = peak[0];
        char device_peak[64] = "";
        if (ops->memory) snprintf(device_peak, sizeof device_peak, ", %.0f MiB on %s", peak[1], ops->name);
        char dense_cost[64] = ""; /* what DenseMixer adds to the model FLOPs */
        if (model.densemixer && flops_done > 0)
            snprintf(dense_cost, sizeof dense_cost, " (+%.0f%% DenseMixer)",
                     100.0 * dense_flops_done / flops_done);
        tokens_done += counts[1];
        double elapsed = wall_time() - start;
        double rate = tokens_done / elapsed, tflops = flops_done / elapsed / 1e12;
        double eta = elapsed / (double)(position.step - first_step) * (double)(tr->steps - position.step);
        /* epochs consumed: whole epochs, and the samples of this epoch's blocks taken */
        double epochs = (double)position.epoch +
                        (epoch_plan.n_blocks ? (double)epoch_plan.first[position.block] / (double)n_train : 0);
        if (position.step % tr->log_every == 0 || position.step == tr->steps)
            log_info("train: step %lld/%d (%.0f%%)  loss %.6f  acc %.4f  aux %.4f  lr %.3g  grad "
                     "norm %.4g  epoch %.2f  %.0f tokens/s  %.3g TFLOP/s%s  %.0f MiB peak%s  %s "
                     "elapsed, %s left",
                     position.step, tr->steps, 100.0 * (double)position.step / tr->steps, loss,
                     accuracy, aux, lr, norm, epochs, rate, tflops, dense_cost, peak_mib,
                     device_peak, duration_text(elapsed).text, duration_text(eta).text);
        metrics_write("step", "\"step\": %lld, \"loss\": %.17g, \"accuracy\": %.9g, "
                      "\"aux_loss\": %.17g, \"aux_loss_coef\": %.6g, \"lr\": %.6g, "
                      "\"grad_norm\": %.6g, \"epoch\": %.6f, \"tokens\": %.0f, "
                      "\"tokens_per_second\": %.1f, \"model_tflops\": %.6g, \"peak_rss_mib\": %.1f, "
                      "\"backend_peak_mib\": %.1f, \"allocations\": %.0f, \"skipped\": %s",
                      position.step, loss, accuracy, aux, tr->aux_loss_coef, lr, norm, epochs,
                      counts[1], rate, tflops, peak_mib, peak[1], peak[2], bad ? "true" : "false");

        bool last = position.step == tr->steps;
        if (validate && (position.step % tr->eval_every == 0 || last)) {
            double eval = evaluate(&model, ops, eval_ws, &ds, &val, seq_len, &eval_batch, rank, dp);
            log_eval(position.step, eval, val.n_blocks);
            metrics_write("eval", "\"step\": %lld, \"loss\": %.17g", position.step, eval);
        }
        int stop = stop_signal;
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, &stop, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
        bool periodic = tr->checkpoint_every > 0 && position.step % tr->checkpoint_every == 0;
        if (periodic || last || stop) {
            state_to_host(&model, &opt);
            if (write_checkpoint(deck->run.output_dir, &model, &opt, &position, &run,
                                 tr->keep_checkpoints, err, sizeof err) != 0)
                fatal_all(EXIT_RUNTIME, "train: %s", err);
            last_checkpoint = position.step;
        }
        if (stop && !last) {
            log_info("train: stopped by signal %d after step %lld; the next run with "
                     "train.resume: auto continues from its checkpoint (exit status %d)", stop,
                     position.step, EXIT_STOPPED);
            metrics_write("stopped", "\"step\": %lld, \"signal\": %d", position.step, stop);
            status = EXIT_STOPPED;
            goto done;
        }
    }

    /* the trained tensors (every rank takes part: rank 0 writes what the holders send),
     * and the curve */
    char dir[4200];
    state_to_host(&model, &opt);
    snprintf(dir, sizeof dir, "%s/adapter", deck->run.output_dir);
    if (tr->method == METHOD_LORA) {
        if (export_lora_adapter(dir, &model, &lora, deck->model.path, MPI_COMM_WORLD, err,
                                sizeof err) != 0)
            status = EXIT_RUNTIME;
        else
            log_info("train: LoRA adapter (PEFT) -> %s/adapter_model.safetensors", dir);
    } else if (export_adapter(dir, &model, tr->method == METHOD_ESFT ? tr->expert_config : NULL,
                              MPI_COMM_WORLD, err, sizeof err) != 0)
        status = EXIT_RUNTIME;
    else
        log_info("train: trained tensors -> %s/adapter.safetensors", dir);
    if (status == 0 && tr->export_merged) {
        snprintf(dir, sizeof dir, "%s/merged", deck->run.output_dir);
        model_merge_lora(&model); /* W += scale B A; the adapters then drop out of the export */
        if (write_merged(dir, &model, deck->model.path, err, sizeof err) != 0)
            status = EXIT_RUNTIME;
        else
            log_info("train: merged checkpoint -> %s", dir);
    }
    /* the picture and the summary cover the whole history: every segment of a stopped
     * and resumed training, read back from the metrics file */
    struct curve losses = {0}, eval_losses = {0};
    if (layout->world_rank == 0 && status == 0) {
        snprintf(dir, sizeof dir, "%s/loss.svg", deck->run.output_dir);
        if (history_read(deck->run.output_dir, &losses, &eval_losses, err, sizeof err) != 0 ||
            (losses.n > 0 &&
             plot_loss_curve(dir, deck->run.name, losses.step, losses.loss, losses.n,
                             eval_losses.step, eval_losses.loss, eval_losses.n, err, sizeof err) != 0))
            status = EXIT_RUNTIME;
    }
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status != 0) fatal_all(status, "train: %s", err);
    /* AdamW's state as held: two fp32 moments per trainable element a rank holds, summed
     * over the ranks (data-parallel replicas each hold their own) */
    double optimizer_bytes = 2.0 * sizeof(float) * (double)opt.n;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &optimizer_bytes, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    if (layout->world_rank == 0) {
        int best = -1;
        for (int i = 0; i < eval_losses.n; i++)
            if (best < 0 || eval_losses.loss[i] < eval_losses.loss[best]) best = i;
        double seconds = wall_time() - start;
        char best_text[96] = "no validation";
        if (best >= 0)
            snprintf(best_text, sizeof best_text, "best validation loss %.6f at step %lld",
                     eval_losses.loss[best], eval_losses.step[best]);
        char final_text[64] = "no step with a loss";
        if (losses.n > 0) snprintf(final_text, sizeof final_text, "final loss %.6f", losses.loss[losses.n - 1]);
        log_info("train: done: step %lld, %s, %s; this run %lld steps%s in %s, %.0f "
                 "tokens; %.3fM trained parameters (%.2f%%)", position.step,
                 final_text, best_text, position.step - first_step,
                 skipped ? " (some skipped)" : "", duration_text(seconds).text, tokens_done,
                 n_trainable / 1e6, 100.0 * n_trainable / n_total);
        metrics_write("train", "\"steps\": %lld, \"steps_this_run\": %lld, \"skipped_steps\": "
                      "%lld, \"final_loss\": %.9g, \"best_eval_loss\": %.9g, \"best_eval_step\": "
                      "%lld, \"seconds\": %.3f, \"tokens\": %.0f, \"trainable_parameters\": %zu, "
                      "\"parameters\": %zu, \"optimizer_bytes\": %.0f, \"method\": \"%s\"",
                      position.step, position.step - first_step, skipped,
                      losses.n ? losses.loss[losses.n - 1] : NAN,
                      best >= 0 ? eval_losses.loss[best] : NAN,
                      best >= 0 ? eval_losses.step[best] : -1LL, seconds, tokens_done, n_trainable,
                      n_total, optimizer_bytes, method);
    }
    curve_free(&losses), curve_free(&eval_losses);
done:
    signal(SIGUSR1, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    for (int i = 0; i < micro_batches; i++) token_batch_free(&micro[i]);
    token_batch_free(&eval_batch);
    for (int k = 0; k < n_ws; k++) forward_workspace_free(ws[k]);
    forward_workspace_free(eval_ws);
    free(deck_text);
    adamw_free(&opt);
    free(grad_scratch);
    free(trainable);
    model_free(&model);
    expert_config_free(&ec);
    free(val.first), free(val.order), free(epoch_plan.first), free(epoch_plan.order);
    free(all);
    free(train_samples);
    dataset_close(&ds);
    return status;
}
