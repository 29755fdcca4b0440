/* gather: a model's tensors, held across the ranks of any (pp, dp, ep) layout, brought to
 * world rank 0 one at a time, for the writers of layout-free files (the exports,
 * export.c), and the checks the checkpoint writer shares (checkpoint_write.c). A tensor rank 0 does not hold comes from its
 * holder on data-parallel slot 0, point to point, in parameter-table order, so no rank
 * ever holds more than its own tensors and one more. */
#ifndef ESFT_GATHER_H
#define ESFT_GATHER_H

#include <mpi.h>
#include <stdbool.h>
#include <stddef.h>

#include "model.h"
#include "optim.h"

/* The model was built for comm: its grid has comm's size and this rank's coordinates
 * name this rank of comm (the transfers address ranks by their grid coordinates). 0, or
 * -1 with a message naming `who`. */
int gather_check_layout(const struct model *model, MPI_Comm comm, const char *who, char *err,
                        size_t err_size);

/* The tensors of this rank's AdamW state: trainable and held here (the tensors with a
 * gradient, in the order of the gradient storage and the AdamW state). */
bool gather_checkpointed(const struct param *p);

/* What rank 0 does with one tensor: parts[0] its weights, parts[1] and parts[2] its AdamW
 * m and v when they were asked for. 0, or -1 with a message. */
typedef int (*tensor_sink)(const struct param *p, const float *const *parts, void *sink, char *err,
                           size_t err_size);

/* Collective over comm. Brings the tensors to rank 0 one at a time, in parameter-table
 * order (the trainable ones, or all), each with n_parts parts (1: the weights; 3: the
 * weights and the AdamW m and v of opt), and hands each to `put` there. A tensor rank 0
 * holds is handed over in place; any other is sent by its provider into a scratch buffer
 * the size of the largest such tensor. After a failed put rank 0 still receives the rest
 * (a sender must not wait forever) but puts no more. Rank 0's status; 0 on the others. */
int gather_to_rank0(const struct model *model, const struct adamw *opt, bool trainable_only,
                    int n_parts, MPI_Comm comm, tensor_sink put, void *sink, char *err,
                    size_t err_size);

#endif
