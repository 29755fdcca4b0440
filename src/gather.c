/* gather: a model's tensors to world rank 0, one at a time (see gather.h). */
#include "gather.h"

#include <stdlib.h>

#include "log.h"
#include "safetensors.h"

/* Tag of the point-to-point messages that carry tensors to rank 0. */
#define TRANSFER_TAG 0x6573
/* Floats per message at most: an MPI count is an int. */
#define TRANSFER_CHUNK ((size_t)1 << 28)

/* The model was built for comm: its grid has comm's size and this rank's coordinates
 * name this rank of comm (the transfers below address ranks by their grid coordinates). */
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

/* The rank that sends p to rank 0: its holder on data-parallel slot 0 (every replica
 * holds the same values), EP rank 0 of its stage for a tensor every EP rank holds. */
static int provider_of(const struct model *model, const struct param *p)
{
    struct layout_coords holder = {p->stage, 0, p->ep_rank < 0 ? 0 : p->ep_rank};
    return layout_rank_of(&model->grid, holder);
}

static void send_floats(const float *data, size_t n, int to, MPI_Comm comm)
{
    for (size_t at = 0; at < n; at += TRANSFER_CHUNK) {
        size_t count = n - at < TRANSFER_CHUNK ? n - at : TRANSFER_CHUNK;
        check_mpi(MPI_Send(data + at, (int)count, MPI_FLOAT, to, TRANSFER_TAG, comm));
    }
}

static void receive_floats(float *data, size_t n, int from, MPI_Comm comm)
{
    for (size_t at = 0; at < n; at += TRANSFER_CHUNK) {
        size_t count = n - at < TRANSFER_CHUNK ? n - at : TRANSFER_CHUNK;
        check_mpi(MPI_Recv(data + at, (int)count, MPI_FLOAT, from, TRANSFER_TAG, comm,
                           MPI_STATUS_IGNORE));
    }
}

/* The tensors of this rank's AdamW state: trainable and held here (the tensors with a
 * gradient, in the order of the gradient storage and the AdamW state). */
bool gather_checkpointed(const struct param *p)
{
    return p->trainable && p->data != NULL;
}

/* Collective over comm. Brings the tensors to rank 0 one at a time, in parameter-table
 * order (the trainable ones, or all), each with n_parts parts (1: the weights; 3: the
 * weights and the AdamW m and v of opt), and hands each to `put` there. A tensor rank 0
 * holds is handed over in place; any other is sent by its provider, point to point, into
 * a scratch buffer the size of the largest such tensor: no rank ever holds more than its
 * own tensors and one more. After a failed put rank 0 still receives the rest (a sender
 * must not wait forever) but puts no more. Rank 0's status; 0 on the other ranks. */
int gather_to_rank0(const struct model *model, const struct adamw *opt, bool trainable_only,
                    int n_parts, MPI_Comm comm, tensor_sink put, void *sink, char *err,
                    size_t err_size)
{
    int rank;
    check_mpi(MPI_Comm_rank(comm, &rank));
    size_t scratch_floats = 0, original_floats = 0;
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        if (!p->trainable && trainable_only) continue;
        if (rank == 0 && !p->data && p->numel > scratch_floats) scratch_floats = p->numel;
        if (p->data_bf16 && p->numel > original_floats) original_floats = p->numel;
    }
    float *scratch[3] = {NULL, NULL, NULL};
    for (int k = 0; k < n_parts && scratch_floats > 0; k++)
        scratch[k] = xmalloc(scratch_floats * sizeof(float));
    /* a tensor held as bf16 goes out with the checkpoint's values, read again: never the
     * rounded ones (model_store_frozen_bf16) */
    float *original = original_floats ? xcalloc(original_floats, sizeof(float)) : NULL;
    struct st_checkpoint *checkpoint = NULL;
    int rc = 0, read_rc = 0;
    size_t offset = 0; /* into this rank's AdamW state */
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        const float *parts[3] = {p->data, NULL, NULL};
        if (gather_checkpointed(p)) {
            if (opt) {
                parts[1] = opt->m + offset;
                parts[2] = opt->v + offset;
            }
            offset += p->numel;
        }
        if (trainable_only && !p->trainable) continue;
        int provider = provider_of(model, p);
        if (p->data_bf16 && rank == provider) {
            if (read_rc == 0 && !checkpoint &&
                !(checkpoint = model_open_original(model, err, err_size)))
                read_rc = -1;
            if (read_rc == 0 && model_read_original(model, checkpoint, p, original, err, err_size))
                read_rc = -1;
            if (read_rc != 0 && rank == 0) rc = -1; /* its message is in err */
            parts[0] = original;
        }
        if (rank == provider && provider != 0) {
            for (int k = 0; k < n_parts; k++) send_floats(parts[k], p->numel, 0, comm);
        } else if (rank == 0) {
            for (int k = 0; k < n_parts && provider != 0; k++) {
                receive_floats(scratch[k], p->numel, provider, comm);
                parts[k] = scratch[k];
            }
            if (rc == 0) rc = put(p, parts, sink, err, err_size);
        }
    }
    for (int k = 0; k < 3; k++) free(scratch[k]);
    free(original);
    if (checkpoint) st_checkpoint_close(checkpoint);
    if (read_rc != 0) /* this rank's message; rank 0 learns of it through ranks_agree */
        return -1;
    return rc;
}
