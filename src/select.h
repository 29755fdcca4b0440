/* select: the `select` phase of ESFT, routing statistics -> expert configuration, and the
 * pure functions it is built from (exposed for tests/test_select.c).
 *
 * Rules (shared/reference/esft-semantics.md, section 2). Per MoE layer l and expert e,
 * with K = top-k:
 *   token score T[l][e] = count[l][e] / (K * tokens[l])   (sums to 1 over e)
 *   gate score  G[l][e] = gate[l][e] / tokens[l]          (mean routing weight)
 * No rounding. Each layer on its own (scores are never normalised across layers): sort
 * the experts by score, descending, ties to the lower expert index; add experts while
 * the running sum is below top_p; the expert that makes the sum reach or cross top_p is
 * included. So every layer gets at least one expert, and all of them when top_p is above
 * the layer's total. "Reach" allows a relative 1e-12 for the rounding of the running sum
 * (so top_p = 1 with token scores stops at the last expert with a non-zero count).
 *
 * Several statistics files (all from one model):
 *   default      one task scored by several runs: counts, gate sums and tokens are summed
 *                and one selection is made from the summed scores;
 *   union_tasks  one task per file: a selection per file, and per layer the union of
 *                those experts, ordered by the summed score.
 *
 * Output, in run.output_dir: the expert configuration (select.output, the reference
 * format plus scores and provenance), a heatmap beside it (<stem>.svg), and
 * trainable_tensors.txt (the Hugging Face names of the tensors ESFT will train). With
 * 2 or more files, also the tasks side by side (overlap.h): a "tasks" member in the
 * configuration and its picture, <stem>_tasks.svg. */
#ifndef ESFT_SELECT_H
#define ESFT_SELECT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "deck.h"
#include "layout.h"
#include "model.h"
#include "stats.h"

struct stability;
struct task_overlap;

/* The chosen experts of every MoE layer. Lm MoE layers, E experts. */
struct expert_selection {
    int n_moe_layers;    /* Lm */
    int num_experts;     /* E */
    int32_t *moe_layers; /* [Lm] decoder-layer index of each MoE layer */
    double *scores;      /* [Lm, E] the scores the lists are ordered by */
    int *n_chosen;       /* [Lm] */
    int *chosen;         /* [Lm, E]: row l's first n_chosen[l] entries, by descending score */
    double *cumulative;  /* [Lm] sum of the chosen experts' scores */
};

/* scores [Lm, E] from stats' totals: token or gate score (see above). A layer that saw no
 * tokens scores 0 everywhere. */
void select_scores(const struct routing_stats *stats, enum score_function function, double *scores);

/* order [E]: expert ids by descending score, ties to the lower id. */
void select_order(const double *scores, int num_experts, int *order);

/* One layer's selection from its scores [E]: writes the chosen ids to chosen [E] in
 * descending score order and their score sum to *cumulative; returns how many (>= 1). */
int select_layer(const double *scores, int num_experts, double top_p, int *chosen,
                 double *cumulative);

/* 0 when a and b come from the same model (config_hash, num_experts and MoE layers equal),
 * else -1 with a message naming both files. */
int select_same_model(const struct routing_stats *a, const char *a_path,
                      const struct routing_stats *b, const char *b_path, char *err,
                      size_t err_size);

/* sum: the identity of stats[0] and the summed totals (tokens, count, gate; no coact, no
 * per-rank or per-sample arrays) of n_stats files already checked by select_same_model.
 * Free with stats_free. */
void select_sum_stats(const struct routing_stats *const *stats, int n_stats,
                      struct routing_stats *sum);

/* The selection from n_stats >= 1 files of one model, summed or as a union (see above). */
void select_experts(const struct routing_stats *const *stats, int n_stats,
                    enum score_function function, double top_p, bool union_tasks,
                    struct expert_selection *selection);
void expert_selection_free(struct expert_selection *selection);

/* Whether expert e of decoder layer `layer` is chosen (false for a dense layer). */
bool select_is_chosen(const struct expert_selection *selection, int layer, int expert);
/* The total number of chosen (layer, expert) pairs. */
int select_count(const struct expert_selection *selection);

/* The Hugging Face names of the tensors that train, in parameter-table order: every chosen
 * expert's three matrices, the shared experts if train_shared_experts, every non-expert
 * tensor (attention, norms, embedding, lm_head, dense MLPs, routers) if
 * train_non_expert_modules. With model NULL (no checkpoint to ask), only the routed
 * experts, spelled model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight (qwen, olmoe).
 * Returns an allocated array of *n_names allocated strings; free with select_free_names. */
char **select_tensor_names(const struct expert_selection *selection, const struct model *model,
                           bool train_shared_experts, bool train_non_expert_modules, int *n_names);
void select_free_names(char **names, int n_names);

/* One statistics file behind a selection, for the provenance in the outputs. */
struct select_source {
    const char *path;
    char checksum[17]; /* of the statistics file (checksum.h), hex */
    uint64_t config_hash;
    uint64_t tokens; /* tokens seen by the first MoE layer (every token passes each one) */
    const struct routing_stats *stats; /* the rest of its provenance */
};

/* What the output files say besides the selection. */
struct select_report {
    enum score_function score_function;
    double top_p;
    bool union_tasks;
    bool shared_experts, non_expert_modules;
    const char *model_path;
    int n_sources;
    const struct select_source *sources;
    const struct stability *stability; /* select.bootstrap's figures, or NULL */
    const struct task_overlap *tasks;  /* tasks side by side (2+ files), or NULL */
};

/* expert_config.json (reference format + score_function, top_p, union_tasks, scores,
 * cumulative, sources, model_path, and stability and tasks when given) at path, via
 * path.tmp and rename. 0, or -1 with a message. */
int select_write_config(const char *path, const struct expert_selection *selection,
                        const struct select_report *report, char *err, size_t err_size);
/* The heatmap (MoE layers x experts, colour = score, chosen experts outlined) at path,
 * via path.tmp and rename. 0, or -1 with a message. */
int select_write_svg(const char *path, const struct expert_selection *selection,
                     const struct select_report *report, char *err, size_t err_size);
/* One name per line at path, via path.tmp and rename. 0, or -1 with a message. */
int select_write_names(const char *path, char *const *names, int n_names, char *err,
                       size_t err_size);

/* The phase: rank 0 reads and checks the statistics, selects, writes the outputs and
 * prints the per-layer summary; the other ranks wait. User errors end every rank with
 * status 2 (EXIT_INPUT) before anything is written; write failures with status 1. */
int phase_select(const struct deck *deck, const struct layout *layout);

#endif
