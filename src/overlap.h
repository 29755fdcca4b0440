/* overlap: tasks side by side. When select is given several statistics files, each file
 * is taken as one task, and select reports how much the tasks' expert choices overlap,
 * as the ESFT paper's analysis of expert specialization does (Wang et al. 2024, "Let the
 * Expert Stick to His Last": routing concentrates within a task and differs across tasks).
 *
 * Per task a: its own selection, select_experts on that file alone with the deck's score
 * function and top_p (select.h), whatever select does with the files together (summed or
 * union_tasks). Its scores s_a[l][e] are the token share or gate mean of that file.
 * Per MoE layer l and ordered pair of tasks (a, b), with A and B their chosen sets:
 *   jaccard[l][a][b] = |A and B| / |A or B|                (symmetric, 1 on the diagonal)
 *   share[l][a][b]   = sum over e in B of s_a[l][e] / sum over all e of s_a[l][e]
 * "How much of a's routing lands on b's experts": the share of a's score that b's
 * experts carry, over a's whole score (1 for token scores; the mean total routing weight
 * for gate scores, which is below 1 when the router's top-k weights are not normalised);
 * 0 for a layer with no score. The diagonal share[l][a][a] is a's own coverage.
 * Overall = the mean of each over the MoE layers (every layer counts the same).
 *
 * Called by select (select.c) when it has 2 or more statistics files; also by
 * tests/test_overlap.c. */
#ifndef ESFT_OVERLAP_H
#define ESFT_OVERLAP_H

#include <stddef.h>

#include "deck.h"
#include "select.h"
#include "stats.h"

/* T tasks, Lm MoE layers, E experts. Matrices are row-major, row = task a. */
struct task_overlap {
    int n_tasks;                   /* T */
    int n_moe_layers, num_experts; /* Lm, E */
    const char *const *paths;      /* [T] the statistics files (not owned) */
    enum score_function score_function;
    double top_p;
    struct expert_selection *tasks; /* [T] each task's own selection and scores */
    double *jaccard;                /* [Lm, T, T] */
    double *share;                  /* [Lm, T, T] */
    double *mean_jaccard;           /* [T, T] mean over the MoE layers */
    double *mean_share;             /* [T, T] */
    double seconds;                 /* time it took */
};

/* The figures for n_stats >= 1 files of one model (already checked by select_same_model),
 * one task per file, named by paths [n_stats] (kept, not copied). */
void overlap_run(const struct routing_stats *const *stats, const char *const *paths, int n_stats,
                 enum score_function function, double top_p, struct task_overlap *out);
void overlap_free(struct task_overlap *o);

/* The compact tables through log_info: tasks in rows (numbered, by the files' basenames)
 * and columns (by number), the overall Jaccard, then the overall score share. */
void overlap_log(const struct task_overlap *o);

/* The picture (SVG) at path, via path.tmp: a task x task grid of the overall Jaccard and
 * beside it the grid of the overall score share, numbers in the cells, one colour scale
 * from 0 to 1. 0, or -1 with a message. */
int overlap_write_svg(const char *path, const struct task_overlap *o, char *err, size_t err_size);

#endif
