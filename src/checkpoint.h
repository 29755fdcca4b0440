/* checkpoint: training checkpoints (HDF5) and the export of trained tensors
 * (safetensors), for the train phase.
 *
 * A checkpoint is OUTPUT_DIR/checkpoints/step-NNNNNNNN.h5 holding: attributes format =
 * "esft-checkpoint", version = 1, step, epoch, block (the data position: next block of
 * the epoch), rng (4 x uint64), adam_step, config_hash (the base model's), method, deck
 * (text); for every trainable tensor, /tensors/<HF name> (fp32, its shape), /adam_m/<HF
 * name> and /adam_v/<HF name> (fp32), each stored whole whatever the layout (pp, dp, ep)
 * that wrote it, so that a checkpoint resumes under any layout. It is written to a
 * temporary name, flushed and fsynced, renamed, and the directory fsynced: a crash leaves
 * the previous checkpoints and at most a stray temporary file, never a torn checkpoint
 * under a real name. */
#ifndef ESFT_CHECKPOINT_H
#define ESFT_CHECKPOINT_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "optim.h"

struct train_position {
    long long step;  /* optimizer steps completed */
    long long epoch; /* epoch of the next block */
    long long block; /* index of the next block within that epoch */
    uint64_t rng[4]; /* the train phase's random state */
};

/* Collective over comm, the communicator the model's layout was made for (its grid has
 * comm's size, and comm's rank r is the grid's rank r: MPI_COMM_WORLD in esft). World
 * rank 0 writes; every trainable tensor it does not hold, with its AdamW m and v, is sent
 * to it by its holder on data-parallel slot 0, one tensor at a time. The file does not
 * depend on the layout. The call returns after the file is complete, with the same
 * status and message on every rank. Keeps the newest `keep` checkpoints of the directory
 * and deletes older ones. 0, or -1 with a message. */
int checkpoint_write(const char *output_dir, const struct model *model, const struct adamw *opt,
                     const struct train_position *position, const char *method,
                     const char *deck_text, int keep, MPI_Comm comm, char *err, size_t err_size);

/* The newest complete checkpoint in OUTPUT_DIR/checkpoints (temporary files ignored):
 * 1 and its path, 0 when there is none, -1 with a message on an unreadable directory. */
int checkpoint_latest(const char *output_dir, char *path, size_t path_size, char *err,
                      size_t err_size);

/* Reads a checkpoint into the trainable tensors this rank holds, their optimizer state
 * and the position; a checkpoint written under any layout reads under any other. Checks
 * that it belongs to this model (config hash), this method, and holds exactly the
 * model's trainable tensors (all of them, held here or not) with their shapes; nothing
 * is changed unless every check passes. Every rank reads, on its own (no communication):
 * the caller combines the ranks' results. 0, or -1. */
int checkpoint_read(const char *path, struct model *model, struct adamw *opt,
                    struct train_position *position, const char *method, char *err,
                    size_t err_size);

/* The adapter: the trainable tensors under their Hugging Face names in one safetensors
 * file (dtype of the base checkpoint: bf16, fp16 or fp32), and expert_config (when not
 * NULL) copied beside it as expert_config.json. Collective over comm (as for
 * checkpoint_write): world rank 0 writes, the tensors it does not hold sent to it one
 * at a time; the same status and message on every rank. 0, or -1. */
int export_adapter(const char *dir, const struct model *model, const char *expert_config,
                   MPI_Comm comm, char *err, size_t err_size);

/* A complete Hugging Face checkpoint of the trained model: every tensor, sharded
 * safetensors (+ index when sharded, shards of at most max_shard_bytes), config.json,
 * and the base directory's tokenizer and generation files copied. Collective over comm
 * like export_adapter; rank 0 keeps a copy of every tensor in the export dtype until the
 * write (the safetensors writer takes them all at once). 0, or -1. */
int export_merged(const char *dir, const struct model *model, const char *base_dir,
                  size_t max_shard_bytes, MPI_Comm comm, char *err, size_t err_size);

/* An SVG line chart of the training loss per step and the evaluation loss (points at
 * eval_steps), for a person to open in a browser. 0, or -1. */
int plot_loss_curve(const char *path, const char *title, const long long *steps,
                    const double *loss, int n, const long long *eval_steps,
                    const double *eval_loss, int n_eval, char *err, size_t err_size);

#endif
