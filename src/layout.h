/* layout: the rank grid world = pp * dp * ep and its sub-communicators (DESIGN.md,
 * "Process layout"), and the placement function every phase uses to decide which rank
 * holds which experts (the layers of each stage: model_split_layers, which needs the
 * model's costs).
 *
 * Rank order: ep varies fastest, then dp, then pp:
 *   world_rank = (pp_rank * dp + dp_rank) * ep + ep_rank
 * Groups:
 *   stage  all dp*ep ranks with the same pp_rank        (non-expert gradient reduction)
 *   ep     the ep consecutive ranks of one dp slot      (token all-to-all)
 *   edp    ranks with the same (pp_rank, ep_rank)       (expert gradient reduction)
 *   pp     ranks with the same (dp_rank, ep_rank)       (activations between stages) */
#ifndef ESFT_LAYOUT_H
#define ESFT_LAYOUT_H

#include <stddef.h>
#include <stdio.h>

#include "comm.h"

#define LAYOUT_MAX_STAGES 64

struct layout_grid {
    int world; /* pp * dp * ep */
    int pp, dp, ep;
    /* decoder layers per stage from the deck (parallel.stage_layers); all 0: the model
     * balances the stages by cost (model_create) */
    int stage_layers[LAYOUT_MAX_STAGES];
};

struct layout_coords {
    int pp_rank, dp_rank, ep_rank;
};

struct layout {
    struct layout_grid grid;
    int world_rank;
    struct layout_coords me;
    struct comm world, stage, ep, edp, pp;
};

/* What a layout must fit: from the model's config (0 = unknown, not checked). */
struct layout_model {
    int num_layers;  /* decoder layers */
    int num_experts; /* routed experts per MoE layer (0: dense or unknown) */
    /* the layer split [pp + 1] when known (model_split_layers); NULL: the deck's
     * grid.stage_layers if set, else unknown for pp > 1 (balanced once the model is read) */
    const int *stage_first;
};

/* Derives dp = world / (pp * ep) and checks that the grid divides the world and fits the
 * model. Returns 0, or -1 with a one-line reason in err (no file position: the caller
 * adds the deck location of parallel.pp / parallel.ep). Pure arithmetic: no MPI. */
int layout_grid_make(int world, int pp, int ep, const struct layout_model *model,
                     struct layout_grid *grid, char *err, size_t err_size);

struct layout_coords layout_coords_of(const struct layout_grid *grid, int world_rank);
int layout_rank_of(const struct layout_grid *grid, struct layout_coords coords);

/* The one placement function for experts: EP rank r holds the contiguous block
 * [first, first + count) of a layer's num_experts experts, count = num_experts / ep. */
void layout_experts_of(int num_experts, int ep, int ep_rank, int *first, int *count);
/* The EP rank that holds expert e. */
int layout_expert_owner(int num_experts, int ep, int expert);


/* Collective over MPI_COMM_WORLD: builds the grid's communicators. */
void layout_create(struct layout *layout, const struct layout_grid *grid);
void layout_destroy(struct layout *layout);

/* The table of every rank's coordinates, layers and experts (rank 0 prints it). */
void layout_print(FILE *out, const struct layout_grid *grid, const struct layout_model *model);

#endif
