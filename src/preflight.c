/* preflight: the checks made before any phase runs (see preflight.h). */
#include "preflight.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "c2r.h"
#include "dataset.h"
#include "files.h"
#include "hfconfig.h"
#include "log.h"
#include "peft_adapter.h"
#include "phases.h"
#include "prepare.h"
#include "tokenizer.h"
#include "trainable.h"

struct problems {
    char *text;
    size_t size;
    int count;
};

static void problem(struct problems *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(struct problems *p, const char *fmt, ...)
{
    p->count++;
    size_t used = strlen(p->text);
    if (used + 1 >= p->size) return;
    va_list args;
    va_start(args, fmt);
    vsnprintf(p->text + used, p->size - used, fmt, args);
    va_end(args);
    used = strlen(p->text);
    if (used + 1 < p->size) strcat(p->text, "\n");
}

/* The files the phases before `upto` in the deck's list write (as the phases name them). */
struct produced {
    bool model, data, stats, expert_config, adapter, merged, extra_data, c2r_config;
    /* the dataset prepare writes in this run: its tokenizer's identity */
    char data_tokenizer[4200], data_checksum[17];
    uint64_t data_vocab_size;
};

static void join(char *out, size_t size, const char *dir, const char *name)
{
    if (name[0] == '/')
        snprintf(out, size, "%s", name);
    else
        snprintf(out, size, "%s/%s", dir, name);
}

/* The model's config, read once for every phase that needs it; false (and a problem
 * reported once) when it cannot be read. */
struct model_check {
    bool tried, ok;
    struct model_config cfg;
};

static bool model_config(const struct deck *deck, const struct produced *made,
                         struct model_check *mc, enum phase phase, struct problems *p)
{
    if (made->model) return false; /* written by init in this run: nothing to read yet */
    if (mc->tried) return mc->ok;
    mc->tried = true;
    char err[4096];
    if (hfconfig_load(deck->model.path, &mc->cfg, err, sizeof err) != 0) {
        problem(p, "%s: %s", phase_name(phase), err);
        return false;
    }
    char weights[4200], index[4200];
    snprintf(weights, sizeof weights, "%s/model.safetensors", deck->model.path);
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", deck->model.path);
    if (!is_regular_file(weights) && !is_regular_file(index)) {
        problem(p, "%s: %s has config.json but no weights (model.safetensors or "
                "model.safetensors.index.json)", phase_name(phase), deck->model.path);
        return false;
    }
    mc->ok = true;
    return true;
}

static void check_data(const struct deck *deck, const struct produced *made,
                       const struct model_check *mc, enum phase phase, struct problems *p)
{
    char err[4096];
    struct dataset ds;
    if (made->data) {
        /* what prepare will write, judged by the tokenizer it will use */
        if (made->model || !mc->ok) return;
        memset(&ds, 0, sizeof ds);
        ds.path = deck->data.path;
        ds.tokenizer = (char *)made->data_tokenizer;
        ds.tokenizer_checksum = (char *)made->data_checksum;
        ds.vocab_size = made->data_vocab_size;
        if (dataset_check_model(&ds, deck->model.path, mc->cfg.vocab_size, err, sizeof err))
            problem(p, "%s: %s (as prepare is set up in this deck)", phase_name(phase), err);
        return;
    }
    if (dataset_open(&ds, deck->data.path, err, sizeof err) != 0) {
        problem(p, "%s: data.path: %s", phase_name(phase), err);
        return;
    }
    if (mc->ok && !made->model &&
        dataset_check_model(&ds, deck->model.path, mc->cfg.vocab_size, err, sizeof err))
        problem(p, "%s: %s", phase_name(phase), err);
    else if (ds.n_samples == 0)
        problem(p, "%s: %s holds no sample", phase_name(phase), deck->data.path);
    dataset_close(&ds);
}

/* eval: its adapter, its model (eval.model) and its extra datasets are there, or an
 * earlier phase of the deck writes them. */
static void check_eval(const struct deck *deck, const struct produced *made, const char *adapter,
                       struct problems *p)
{
    const char *eval_adapter = deck_eval_adapter(deck);
    if (eval_adapter && !(made->adapter && strcmp(eval_adapter, adapter) == 0) &&
        !is_regular_file(eval_adapter) && !peft_adapter_is(eval_adapter))
        problem(p, "eval: eval.adapter: %s is not a file (nor a LoRA adapter directory with "
                "adapter_config.json)", eval_adapter);
    char config[4200], merged[4200];
    snprintf(merged, sizeof merged, "%s/merged", deck->run.output_dir);
    if (deck->eval.model && !(made->merged && strcmp(deck->eval.model, merged) == 0)) {
        snprintf(config, sizeof config, "%s/config.json", deck->eval.model);
        if (!is_regular_file(config))
            problem(p, "eval: eval.model: %s holds no config.json", deck->eval.model);
    }
    for (int i = 0; i < deck->eval.n_extra_data; i++) {
        const char *path = deck->eval.extra_data[i];
        if (made->extra_data && strcmp(path, deck->prepare.extra_output) == 0) continue;
        char err[4096];
        struct dataset ds;
        if (dataset_open(&ds, path, err, sizeof err) != 0) {
            problem(p, "eval: eval.extra_data: %s", err);
            continue;
        }
        if (ds.n_samples == 0) problem(p, "eval: eval.extra_data: %s holds no sample", path);
        dataset_close(&ds);
    }
}

/* model.routing c2r: a readable C2R configuration for this model (or select writing one
 * earlier in the deck); parallel.expert_placement c2r: only the
 * score phase's report, which needs an EP group and the co-activation counts. */
static void check_c2r(const struct deck *deck, const struct layout_grid *grid,
                      const struct produced *made, const struct model_check *mc, enum phase phase,
                      struct problems *p)
{
    char err[1024];
    if (deck->parallel.expert_placement == PLACEMENT_C2R) {
        if (phase != PHASE_SCORE)
            problem(p, "%s: parallel.expert_placement c2r is not implemented for %s: the EP "
                    "exchange holds experts in contiguous blocks; the score phase reports what "
                    "the c2r placement would save (run score with it, the other phases with "
                    "parallel.expert_placement: contiguous)", phase_name(phase), phase_name(phase));
        else if (grid->ep < 2 || !deck->score.coactivation)
            problem(p, "score: parallel.expert_placement c2r needs parallel.ep above 1 (the EP "
                    "group it places experts over; here %d) and score.coactivation: true",
                    grid->ep);
    }
    if (deck->model.routing != ROUTING_C2R) return;
    const char *path = deck->model.c2r_config;
    if (!path || made->c2r_config) return;
    if (!is_regular_file(path)) {
        problem(p, "%s: model.c2r_config: %s is not a file (select writes one with "
                "select.c2r_top_t)", phase_name(phase), path);
    } else if (mc->ok) {
        struct c2r_lists lists;
        if (c2r_read_config(path, &mc->cfg, &lists, err, sizeof err) != 0)
            problem(p, "%s: model.c2r_config: %s", phase_name(phase), err);
        else
            c2r_lists_free(&lists);
    }
}

int preflight_check(const struct deck *deck, const struct layout_grid *grid, char *messages,
                    size_t size)
{
    struct problems p = {messages, size, 0};
    if (size) messages[0] = '\0';
    struct produced made = {0};
    struct model_check mc = {0};
    char err[4096], path[4200];
    char score_output[4200], select_output[4200], adapter[4200];
    join(score_output, sizeof score_output, deck->run.output_dir, deck->score.output);
    join(select_output, sizeof select_output, deck->run.output_dir, deck->select.output);
    snprintf(adapter, sizeof adapter, "%s/adapter/adapter.safetensors", deck->run.output_dir);

    for (int i = 0; i < deck->n_phases; i++) {
        enum phase phase = deck->phases[i];
        switch (phase) {
        case PHASE_INIT:
            snprintf(path, sizeof path, "%s/config.json", deck->model.path);
            if (is_regular_file(path))
                problem(&p, "init: %s already holds a checkpoint (%s); init never overwrites a "
                        "model: remove it or choose another model.path", deck->model.path, path);
            made.model = true;
            break;
        case PHASE_PREPARE: {
            for (int k = 0; k < deck->prepare.n_inputs; k++) {
                const char *input = deck->prepare.inputs[k];
                struct stat st;
                if (stat(input, &st) != 0 || access(input, R_OK) != 0)
                    problem(&p, "prepare: %s: cannot open input: %s", input, strerror(errno));
                else if (S_ISDIR(st.st_mode))
                    problem(&p, "prepare: %s: is a directory, not a jsonl file", input);
            }
            struct tokenizer tok;
            if (prepare_open_tokenizer(deck, made.model, &tok, err, sizeof err) != 0) {
                problem(&p, "%s", err);
            } else {
                char row[4200];
                if (tok.hf && !tok.chat && deck->prepare.format == FORMAT_TEMPLATE &&
                    prepare_first_conversation(deck, 1000, row, sizeof row))
                    problem(&p, "prepare: %s is a conversation, and %s has no chat template "
                            "(no chat_template in tokenizer_config.json, no chat_template.jinja "
                            "beside it): set prepare.chat_template to a .jinja file, or "
                            "prepare.format: esft_reference", row, tok.name);
                snprintf(made.data_tokenizer, sizeof made.data_tokenizer, "%s", tok.name);
                snprintf(made.data_checksum, sizeof made.data_checksum, "%s", tok.checksum);
                made.data_vocab_size = tok.vocab_size;
                tokenizer_close(&tok);
            }
            for (int k = 0; k < deck->prepare.n_extra_inputs; k++) {
                const char *input = deck->prepare.extra_inputs[k];
                struct stat st;
                if (stat(input, &st) != 0 || access(input, R_OK) != 0)
                    problem(&p, "prepare: prepare.extra_inputs: %s: cannot open input: %s", input,
                            strerror(errno));
                else if (S_ISDIR(st.st_mode))
                    problem(&p, "prepare: prepare.extra_inputs: %s: is a directory, not a jsonl "
                            "file", input);
            }
            if (deck->data.path && strcmp(deck->data.path, deck->prepare.output) == 0)
                made.data = true;
            made.extra_data = deck->prepare.extra_output != NULL;
            break;
        }
        case PHASE_SCORE:
        case PHASE_EVAL:
        case PHASE_TRAIN:
            model_config(deck, &made, &mc, phase, &p);
            check_data(deck, &made, &mc, phase, &p);
            if (mc.ok && grid->pp > 1 && mc.cfg.tie_word_embeddings)
                problem(&p, "%s: %s ties lm_head to the embedding (tie_word_embeddings); "
                        "pipeline parallelism (parallel.pp %d) does not support tied "
                        "embeddings yet", phase_name(phase), deck->model.path, grid->pp);
            check_c2r(deck, grid, &made, &mc, phase, &p);
            if (phase == PHASE_SCORE) {
                if (mc.ok && mc.cfg.num_experts <= 0)
                    problem(&p, "score: %s has no MoE layers", deck->model.path);
                made.stats = true;
            }
            if (phase == PHASE_EVAL) check_eval(deck, &made, adapter, &p);
            if (phase != PHASE_TRAIN) break;
            {
                const struct deck_train *tr = &deck->train;
                int data_ranks = grid->dp * grid->ep;
                if (tr->global_batch % (tr->micro_batch * data_ranks) != 0)
                    problem(&p, "train: train.global_batch (%d) is not divisible by "
                            "train.micro_batch x dp x ep (%d x %d x %d = %d)", tr->global_batch,
                            tr->micro_batch, grid->dp, grid->ep, tr->micro_batch * data_ranks);
                if (trainable_method_available(tr->method, err, sizeof err) != 0)
                    problem(&p, "train: %s", err);
                if (mc.ok && train_check_model(deck, &mc.cfg, err, sizeof err) != 0)
                    problem(&p, "train: %s", err);
                else if (!mc.ok && densemixer_check(deck, NULL, err, sizeof err) != 0)
                    problem(&p, "train: %s", err); /* what the deck alone tells */
                bool selected_here = made.expert_config && tr->expert_config &&
                                     strcmp(tr->expert_config, select_output) == 0;
                if ((tr->method == METHOD_ESFT || deck_lora_selects_experts(deck)) &&
                    !selected_here && tr->expert_config) {
                    if (!is_regular_file(tr->expert_config)) {
                        problem(&p, "train: train.expert_config: %s is not a file%s%s%s",
                                tr->expert_config,
                                made.expert_config ? " (select in this deck writes " : "",
                                made.expert_config ? select_output : "",
                                made.expert_config ? "; leave train.expert_config unset to use it)"
                                                   : "");
                    } else if (mc.ok) {
                        struct expert_config ec;
                        if (expert_config_read(tr->expert_config, &mc.cfg, &ec, err, sizeof err) != 0)
                            problem(&p, "train: train.expert_config: %s", err);
                        else
                            expert_config_free(&ec);
                    }
                }
                made.adapter = true;
                made.merged = tr->export_merged;
            }
            break;
        case PHASE_SELECT:
            if (deck->select.n_stats == 0) {
                if (!made.stats && !is_regular_file(score_output))
                    problem(&p, "select: no statistics: select.stats is empty and %s (this "
                            "run's score.output) does not exist; run score first or list "
                            "select.stats", score_output);
            } else {
                for (int k = 0; k < deck->select.n_stats; k++) {
                    const char *s = deck->select.stats[k];
                    if (!(made.stats && strcmp(s, score_output) == 0) && !is_regular_file(s))
                        problem(&p, "select: %s: cannot open statistics file: %s", s,
                                access(s, R_OK) != 0 ? strerror(errno) : "not a file");
                }
            }
            made.expert_config = true;
            made.c2r_config = deck->select.c2r_top_t > 0;
            break;
        default:
            break;
        }
    }
    return p.count;
}
