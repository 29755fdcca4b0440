/* gather: which rank writes each of a model's tensors into a layout-free file (the
 * exports, export.c: every rank writes its own share of the same files), the tensors
 * this rank writes handed over one at a time, and the checks the checkpoint writer
 * shares (checkpoint_write.c). */
#ifndef ESFT_GATHER_H
#define ESFT_GATHER_H

#include <mpi.h>
#include <stdbool.h>
#include <stddef.h>

#include "model.h"

/* The model was built for comm: its grid has comm's size and this rank's coordinates
 * name this rank of comm. 0, or -1 with a message naming `who`. */
int gather_check_layout(const struct model *model, MPI_Comm comm, const char *who, char *err,
                        size_t err_size);

/* The tensors of this rank's AdamW state: trainable and held here (the tensors with a
 * gradient, in the order of the gradient storage and the AdamW state). */
bool gather_checkpointed(const struct param *p);

/* The one rank (of the model's grid) that writes p, of the ranks that hold it: its holder
 * on data-parallel slot 0, EP rank 0 of its stage for a tensor every EP rank holds. */
int gather_provider(const struct model *model, const struct param *p);

/* What a rank does with one tensor it provides: values its p->numel fp32 values, valid
 * during the call. 0, or -1 with a message. */
typedef int (*tensor_sink)(const struct param *p, const float *values, void *sink, char *err,
                           size_t err_size);

/* Not collective: hands each tensor this rank provides (the trainable ones, or all) to
 * `put`, in parameter-table order: its values in place, or, for a tensor held as bf16
 * (model.frozen_weights), the checkpoint's values read again into a buffer the size of
 * the largest such tensor (never the bf16 rounding). Stops at the first failure. 0, or -1
 * with a message. */
int gather_each_provided(const struct model *model, bool trainable_only, tensor_sink put,
                         void *sink, char *err, size_t err_size);

#endif
