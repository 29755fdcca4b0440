/* memplan: the memory a training run of the deck needs on each rank, on paper, for
 * `esft --dry-run` (README, "Sizing a job"). Computed from the model's config and the
 * layout alone (the parameter table is built, no weight is allocated), so that a 30B
 * model can be sized on a laptop:
 *
 *   weights      the tensors the rank holds (its stage; its EP rank's experts)
 *   gradients    one fp32 per trainable element held, and the reduction's scratch of the
 *                same size when gradients are summed over ranks (dp or ep > 1)
 *   AdamW        two fp32 moments per trainable element held
 *   activations  the training workspaces (workspace.c: every layer's activations of a
 *                micro-batch unless train.recompute, one per micro-batch in flight under
 *                1F1B) and the validation workspace
 *   baseline     the process itself before any of it (libraries, MPI, the deck): the
 *                dry run's own resident set (VmRSS of /proc/self/status)
 *
 * for the CPU (fp32, model.frozen_weights bf16 halving the frozen matrices) and for the
 * device's memory (the cuda backend: frozen matrices as bf16 with model.frozen_weights
 * bf16, an extra bf16 copy of them with model.dtype bf16; the whole [N, V] logits up to
 * the backend's 4 GiB budget; the CUDA context not counted). */
#ifndef ESFT_MEMPLAN_H
#define ESFT_MEMPLAN_H

#include <stdio.h>

#include "deck.h"
#include "layout.h"

/* Prints the estimate of the deck's training under grid to out (rank 0 of a dry run),
 * or one line saying why there is none (no model config to read, method lora). */
void memplan_print(FILE *out, const struct deck *deck, const struct layout_grid *grid);

#endif
