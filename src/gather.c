/* gather: who writes each tensor of a layout-free file, and this rank's tensors handed
 * over one at a time (see gather.h). */
#include "gather.h"

#include <stdlib.h>

#include "log.h"
#include "safetensors.h"

/* The model was built for comm: its grid has comm's size and this rank's coordinates
 * name this rank of comm (each tensor's writer is named by its grid coordinates). */
int gather_check_layout(const struct model *model, MPI_Comm comm, const char *who, char *err,
                        size_t err_size)
{
    int rank, size;
    check_mpi(MPI_Comm_rank(comm, &rank));
    check_mpi(MPI_Comm_size(comm, &size));
    const struct layout_grid *grid = &model->grid;
    int built_for = layout_rank_of(grid, model->me);
    if (grid->world != size || built_for != rank) {
        snprintf(err, err_size,
                 "%s: the model was built for rank %d of the layout pp %d, dp %d, ep %d (%d "
                 "ranks) but is used on rank %d of %d",
                 who, built_for, grid->pp, grid->dp, grid->ep, grid->world, rank, size);
        return -1;
    }
    return 0;
}

/* The tensors of this rank's AdamW state: trainable and held here (the tensors with a
 * gradient, in the order of the gradient storage and the AdamW state). */
bool gather_checkpointed(const struct param *p)
{
    return p->trainable && p->data != NULL;
}

int gather_provider(const struct model *model, const struct param *p)
{
    struct layout_coords holder = {p->stage, 0, p->ep_rank < 0 ? 0 : p->ep_rank};
    return layout_rank_of(&model->grid, holder);
}

int gather_each_provided(const struct model *model, bool trainable_only, tensor_sink put,
                         void *sink, char *err, size_t err_size)
{
    int me = layout_rank_of(&model->grid, model->me);
    size_t original_floats = 0;
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        if ((p->trainable || !trainable_only) && p->data_bf16 && p->numel > original_floats &&
            gather_provider(model, p) == me)
            original_floats = p->numel;
    }
    /* a tensor held as bf16 goes out with the checkpoint's values, read again: never the
     * rounded ones (model_store_frozen_bf16) */
    float *original = original_floats ? xmalloc(original_floats * sizeof(float)) : NULL;
    struct st_checkpoint *checkpoint = NULL;
    int rc = 0;
    for (int i = 0; i < model->n_params && rc == 0; i++) {
        const struct param *p = &model->params[i];
        if ((trainable_only && !p->trainable) || gather_provider(model, p) != me) continue;
        const float *values = p->data;
        if (p->data_bf16) {
            if (!checkpoint && !(checkpoint = model_open_original(model, err, err_size))) rc = -1;
            if (rc == 0) rc = model_read_original(model, checkpoint, p, original, err, err_size);
            values = original;
        }
        if (rc == 0) rc = put(p, values, sink, err, err_size);
    }
    free(original);
    if (checkpoint) st_checkpoint_close(checkpoint);
    return rc;
}
