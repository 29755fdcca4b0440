/* resume: the checkpoint a training run continues from, and whether it may (see
 * resume.h), for the train phase. */
#include "resume.h"

#include <errno.h>
#include <inttypes.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checksum.h"
#include "log.h"

#define RESUME_MESSAGE_MAX 8192
#define RESUME_PATH_MAX 4200

/* ---- what the run trains on --------------------------------------------------------- */

void resume_hash_inputs(const struct deck *deck, const struct dataset *ds,
                        struct checkpoint_run *run)
{
    int rank;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    uint64_t hashes[2] = {0, 0}; /* data, expert_config */
    char err[RESUME_MESSAGE_MAX] = "";
    int rc = 0;
    if (rank == 0) {
        rc = dataset_hash(ds, &hashes[0], err, sizeof err);
        if (rc == 0 && deck->train.method == METHOD_ESFT)
            rc = checksum_file(deck->train.expert_config, &hashes[1], err, sizeof err);
    }
    if (checkpoint_agree(rc, err, sizeof err, MPI_COMM_WORLD) != 0)
        fatal_all(EXIT_INPUT, "train: %s", err);
    check_mpi(MPI_Bcast(hashes, 2, MPI_UINT64_T, 0, MPI_COMM_WORLD));
    run->data_hash = hashes[0];
    run->expert_config_hash = hashes[1];
}

/* ---- comparing the decks ------------------------------------------------------------- */

/* The keys that change what a run trains, compared by their values as deck_print writes
 * them (exact: it writes the shortest text that reads back to the same double). A run
 * may not continue a checkpoint whose deck differs in one of them. Decided key by key
 * over deck.c's schema:
 *   compared here: run.seed (the validation split and the shuffles); data.seq_len and
 *     data.pack (the blocks); train.method, densemixer, lr, lr_schedule, warmup_steps,
 * weight_decay, beta1, beta2, eps, clip_grad, aux_loss_coef, global_batch, micro_batch (the aux
 *     loss is taken per micro-batch, and the sums' order follows them), val_fraction
 *     (the split); model.routing (C2R routes to other experts); train.lora.* under
 *     method lora (below);
 *   compared by content, not by path, so that a moved file is the same input (below):
 *     model.path (the config.json hash the checkpoint records; checkpoint_read also
 *     checks every trainable tensor's shape against the model), data.path (the dataset's
 *     contents, dataset_hash), train.expert_config (its bytes, method esft);
 *   train.steps: a longer one continues the run (with a warning under a decaying
 *     schedule, which spans train.steps); one below the checkpoint's step is refused:
 *     nothing is left to train;
 *   free to differ, since they change how a run computes, reports or writes but not what
 *     it trains: phase, run.name, run.output_dir, run.backend, model.dtype (the
 *     checkpoint holds fp32 state whatever the compute dtype), model.frozen_weights
 *     (only the trainable tensors and their moments are checkpointed, fp32 either way;
 *     the frozen ones are read from model.path again), parallel.* (checkpoints do
 *     not depend on the layout), train.checkpoint_every, keep_checkpoints, eval_every,
 *     log_every, resume, export_merged, recompute, model.c2r_config (not compared yet:
 *     other lists under the same routing are taken as they are), and the init, prepare,
 *     score, select and eval sections (select's choices reach training only through the
 *     expert_config file, compared by content). */
static const char *const compared_keys[] = {
    "run.seed",          "data.seq_len",        "data.pack",
    "train.method",      "train.densemixer",    "model.routing",
    "train.lr",          "train.lr_schedule",   "train.warmup_steps",
    "train.weight_decay", "train.beta1",        "train.beta2",
    "train.eps",         "train.clip_grad",     "train.aux_loss_coef",
    "train.global_batch", "train.micro_batch",  "train.val_fraction",
};
static const char *const lora_keys[] = {"train.lora.r", "train.lora.alpha", "train.lora.rslora",
                                        "train.lora.targets", "train.lora.train_router"};

/* The differences found, one line each, for the refusal or force's warning. */
struct differences {
    char *text;
    size_t size;
    FILE *out;
    int n;
    bool structural;               /* another base model or method: not even force continues it */
    char note[RESUME_MESSAGE_MAX]; /* a difference allowed, worth a warning once resumed */
};

static void compare_key(struct differences *d, const struct deck *written, const struct deck *deck,
                        const char *key)
{
    char a[RESUME_PATH_MAX], b[RESUME_PATH_MAX];
    deck_value_text(written, key, a, sizeof a);
    deck_value_text(deck, key, b, sizeof b);
    if (strcmp(a, b) == 0) return;
    fprintf(d->out, "\n  %s: checkpoint %s, deck %s", key, a, b);
    d->n++;
    if (strcmp(key, "train.method") == 0) d->structural = true;
}

/* An input compared by its hash: "KEY: checkpoint WHAT HASH of PATH, deck WHAT HASH of
 * PATH". */
static void compare_hash(struct differences *d, const struct deck *written, const struct deck *deck,
                         const char *key, const char *what, uint64_t written_hash, uint64_t hash)
{
    if (written_hash == hash) return;
    char a[RESUME_PATH_MAX], b[RESUME_PATH_MAX];
    deck_value_text(written, key, a, sizeof a);
    deck_value_text(deck, key, b, sizeof b);
    fprintf(d->out, "\n  %s: checkpoint %s %016" PRIx64 " of %s, deck %s %016" PRIx64 " of %s", key,
            what, written_hash, a, what, hash, b);
    d->n++;
}

/* The differences between the deck that wrote the checkpoint and this run's. */
static void compare_runs(struct differences *d, const char *path,
                         const struct checkpoint_info *info, const struct deck *deck,
                         const struct checkpoint_run *run, const struct model *model)
{
    d->text = NULL;
    d->size = 0;
    d->n = 0;
    d->structural = false;
    d->note[0] = '\0';
    d->out = open_memstream(&d->text, &d->size);
    if (!d->out) fatal(EXIT_RUNTIME, "open_memstream: %s", strerror(errno));
    struct deck written = {0};
    char label[RESUME_PATH_MAX + 16], err[RESUME_MESSAGE_MAX];
    snprintf(label, sizeof label, "%s (its deck)", path);
    if (deck_parse(&written, label, info->deck_text, strlen(info->deck_text), err, sizeof err)) {
        err[strcspn(err, "\n")] = '\0';
        fprintf(d->out, "\n  the checkpoint's deck does not read back in this esft: %s", err);
        d->n++;
        deck_free(&written);
        fclose(d->out);
        return;
    }
    if (info->config_hash != model->cfg.hash) {
        compare_hash(d, &written, deck, "model.path", "config.json hash", info->config_hash,
                     model->cfg.hash);
        d->structural = true;
    }
    for (size_t k = 0; k < sizeof compared_keys / sizeof compared_keys[0]; k++)
        compare_key(d, &written, deck, compared_keys[k]);
    if (deck->train.method == METHOD_LORA)
        for (size_t k = 0; k < sizeof lora_keys / sizeof lora_keys[0]; k++)
            compare_key(d, &written, deck, lora_keys[k]);
    if (info->verified) {
        compare_hash(d, &written, deck, "data.path", "data hash", info->data_hash, run->data_hash);
        if (deck->train.method == METHOD_ESFT && written.train.method == METHOD_ESFT)
            compare_hash(d, &written, deck, "train.expert_config", "content hash",
                         info->expert_config_hash, run->expert_config_hash);
    } else { /* format 1 recorded no hashes: the paths are all there is */
        compare_key(d, &written, deck, "data.path");
        if (deck->train.method == METHOD_ESFT && written.train.method == METHOD_ESFT)
            compare_key(d, &written, deck, "train.expert_config");
    }
    /* another train.steps moves the end of a decaying schedule the steps taken followed */
    if (written.train.steps != deck->train.steps && deck->train.lr_schedule != LR_CONSTANT &&
        written.train.lr_schedule == deck->train.lr_schedule &&
        info->position.step > deck->train.warmup_steps)
        snprintf(d->note, sizeof d->note,
                 "%s: train.steps: checkpoint %d, deck %d: the %s schedule now decays over %d "
                 "steps, while the checkpoint's %lld steps followed the one over %d",
                 path, written.train.steps, deck->train.steps,
                 deck->train.lr_schedule == LR_LINEAR ? "linear" : "cosine", deck->train.steps,
                 info->position.step, written.train.steps);
    deck_free(&written);
    fclose(d->out);
}

/* ---- choosing the checkpoint ---------------------------------------------------------- */

/* The steps of the checkpoints of run.output_dir, newest first, as rank 0 lists them
 * (every rank gets its list). Their number. */
static int list_candidates(const struct deck *deck, long long **steps)
{
    int rank;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    char err[RESUME_MESSAGE_MAX] = "";
    int n = 0;
    *steps = NULL;
    if (rank == 0) n = checkpoint_list(deck->run.output_dir, steps, err, sizeof err);
    if (checkpoint_agree(n < 0 ? -1 : 0, err, sizeof err, MPI_COMM_WORLD) != 0)
        fatal_all(EXIT_RUNTIME, "train: %s", err);
    check_mpi(MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (rank != 0) *steps = n > 0 ? xmalloc((size_t)n * sizeof **steps) : NULL;
    if (n > 0) check_mpi(MPI_Bcast(*steps, n, MPI_LONG_LONG, 0, MPI_COMM_WORLD));
    return n;
}

/* Refuses (-1 with the message) a checkpoint whose deck differs from this run's in what
 * it trains, unless train.resume is force; one past train.steps always. Fills d with the
 * differences, for force's warnings once the checkpoint is read (free d->text). */
static int check_same_run(struct differences *d, const char *path,
                          const struct checkpoint_info *info, const struct deck *deck,
                          const struct checkpoint_run *run, const struct model *model, bool force,
                          bool explicit_path, char *err, size_t err_size)
{
    compare_runs(d, path, info, deck, run, model);
    if (d->n > 0 && (!force || d->structural)) {
        const char *hint =
            explicit_path
                ? "hint: resume a checkpoint of this deck, or train afresh with train.resume: never"
            : d->structural
                ? "hint: not even train.resume: force continues another base model or method; "
                  "train afresh with train.resume: never (replacing these checkpoints) or in "
                  "another run.output_dir"
                : "hint: train.resume: force continues it anyway; train.resume: never trains "
                  "afresh (replacing these checkpoints); or give this run another "
                  "run.output_dir";
        snprintf(
            err, err_size,
            "%s was written by a run whose deck differs from this one in what it trains:%s\n%s",
            path, d->text, hint);
        return -1;
    }
    if (info->position.step > deck->train.steps) {
        snprintf(err, err_size,
                 "%s is at step %lld, past this deck's train.steps (%d): nothing to train\n"
                 "hint: raise train.steps to continue it, or train afresh with train.resume: "
                 "never or in another run.output_dir",
                 path, info->position.step, deck->train.steps);
        return -1;
    }
    return 0;
}

int resume_from_checkpoint(const struct deck *deck, const struct checkpoint_run *run,
                           struct model *model, struct adamw *opt, struct train_position *position,
                           char *path, size_t path_size)
{
    const char *mode = deck->train.resume;
    if (strcmp(mode, "never") == 0) return 0;
    bool force = strcmp(mode, "force") == 0;
    bool explicit_path = !force && strcmp(mode, "auto") != 0;
    int rank;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));

    long long *steps = NULL;
    int n = explicit_path ? 1 : list_candidates(deck, &steps);
    char err[RESUME_MESSAGE_MAX];
    char *passed_over = NULL; /* the damaged checkpoints, one line each */
    size_t passed_size = 0;
    FILE *passed = open_memstream(&passed_over, &passed_size);
    if (!passed) fatal(EXIT_RUNTIME, "open_memstream: %s", strerror(errno));
    int found = 0;
    for (int i = 0; i < n && !found; i++) {
        if (explicit_path)
            snprintf(path, path_size, "%s", mode);
        else if (checkpoint_path(deck->run.output_dir, steps[i], path, path_size, err,
                                 sizeof err) != 0)
            fatal_all(EXIT_RUNTIME, "train: %s", err);
        /* the attributes, then the decks, then each rank's share of the tensors: every
         * rank reads and decides, and the verdicts are agreed at each stage */
        struct checkpoint_info info;
        int rc = checkpoint_read_info(path, &info, err, sizeof err);
        rc = checkpoint_agree(rc, err, sizeof err, MPI_COMM_WORLD);
        struct differences differences = {.text = NULL};
        if (rc == 0) {
            rc = check_same_run(&differences, path, &info, deck, run, model, force, explicit_path,
                                err, sizeof err);
            if (checkpoint_agree(rc, err, sizeof err, MPI_COMM_WORLD) != 0)
                fatal_all(EXIT_INPUT, "train: %s", err);
            rc = checkpoint_read(path, model, opt, position, run->method, err, sizeof err);
            rc = checkpoint_agree(rc, err, sizeof err, MPI_COMM_WORLD);
        }
        if (rc == CHECKPOINT_FOREIGN || (rc != 0 && explicit_path))
            fatal_all(EXIT_INPUT, "train: %s", err);
        if (rc != 0) { /* damaged: the next newest may serve */
            fprintf(passed, "\n  %s", err);
            char next[RESUME_PATH_MAX], unused[RESUME_MESSAGE_MAX];
            if (rank == 0 && i + 1 < n &&
                checkpoint_path(deck->run.output_dir, steps[i + 1], next, sizeof next, unused,
                                sizeof unused) == 0)
                log_warn("%s; falling back to %s", err, next);
            free(differences.text);
            checkpoint_info_free(&info);
            continue;
        }
        found = 1;
        if (rank == 0 && differences.n > 0)
            log_warn("train.resume: force: continuing %s, whose deck differs from this one in "
                     "what it trains:%s",
                     path, differences.text);
        if (rank == 0 && differences.note[0]) log_warn("%s", differences.note);
        if (rank == 0 && !info.verified)
            log_warn("%s: checkpoint format %d, of an older esft: no checksums, so its tensors "
                     "were read unverified, and no data or expert_config hash, so data.path "
                     "and train.expert_config were compared by path",
                     path, info.version);
        free(differences.text);
        checkpoint_info_free(&info);
    }
    fclose(passed);
    free(steps);
    if (!found && n > 0)
        fatal_all(EXIT_INPUT,
                  "train: no intact checkpoint in %s/checkpoints:%s\nhint: train "
                  "afresh with train.resume: never (replacing them) or in another run.output_dir",
                  deck->run.output_dir, passed_over);
    free(passed_over);
    return found;
}
