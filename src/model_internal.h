/* model_internal: what model.c (the parameter table) shares with model_load.c. */
#ifndef ESFT_MODEL_INTERNAL_H
#define ESFT_MODEL_INTERNAL_H

#include <stdbool.h>

#include "model.h"

/* The module that holds a MoE layer's router and experts ("mlp", mixtral's
 * "block_sparse_moe"). */
const char *model_moe_module(const struct model_config *cfg);
/* Whether the rank at coords holds p: its stage, and its EP rank for a routed expert. */
bool model_holds(const struct param *p, struct layout_coords coords);
/* The parameter table of cfg under grid for the rank at coords, without storage (what
 * model_check_checkpoint needs; free with model_free). */
void model_table(struct model *m, const struct model_config *cfg, const struct layout_grid *grid,
                 struct layout_coords coords);

#endif
