/* checkpoint: training checkpoints (HDF5), for the train phase (the exports of trained
 * tensors: export.h).
 *
 * A checkpoint is OUTPUT_DIR/checkpoints/step-NNNNNNNN.h5 holding: attributes format =
 * "esft-checkpoint", version = 3, step, epoch, block (the data position: next block of
 * the epoch), rng (4 x uint64), adam_step, config_hash (the base model's), method, deck
 * (text), data_hash, expert_config_hash (what the run trained on: struct checkpoint_run),
 * checksum (of all of these) and layout (int32 [3]: the pp, dp and ep of the run that
 * wrote it); for every trainable tensor, /tensors/<HF name> (fp32), /adam_m/<HF name>
 * and /adam_v/<HF name> (fp32), each a dataset of the tensor's global shape whatever the
 * layout that wrote it, so that a checkpoint resumes under any layout, each with the
 * attributes checksum (checksum64 of its fp32 values' little-endian bytes, checksum.h)
 * and slices (int64 [k][3]: the world rank that wrote rows, its first row and its row
 * count, in row order; together they cover the rows once). The root checksum is
 * checksum64 of, in order: version (int32), step, epoch, block, rng[4], adam_step,
 * config_hash, data_hash, expert_config_hash (8 bytes each), then method and deck, each
 * with its terminating NUL. Readers verify every checksum they come to, and the slices:
 * a damaged checkpoint is an error naming the file and the tensor (or the attributes),
 * never values read silently. Older files still read: version 2 (the same without
 * layout and slices: written whole by rank 0), and version 1 (no checksums, no data or
 * expert_config hash) read unverified: checkpoint_info says so.
 * Every rank writes the rows it holds into the one file (parallel HDF5: the metadata
 * collectively, each rank's rows in its own writes): no rank holds more than its own
 * tensors. A checkpoint is written to a
 * temporary name, flushed and closed by every rank, fsynced, renamed, and the directory
 * fsynced: a crash leaves the previous checkpoints and at most a stray temporary file,
 * never a torn checkpoint under a real name. */
#ifndef ESFT_CHECKPOINT_H
#define ESFT_CHECKPOINT_H

#include <mpi.h>
#include <stdbool.h>
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

/* Why a checkpoint was not read (the statuses below 0 of checkpoint_read and
 * checkpoint_read_info): DAMAGED, it cannot be trusted (unreadable, truncated, not an
 * esft checkpoint, a checksum that does not match), so an older checkpoint of the same
 * run may serve instead; FOREIGN, it is whole but belongs to another run (another base
 * model, method or trainable set, a newer format), so no checkpoint of its directory
 * will do. */
enum { CHECKPOINT_DAMAGED = -1, CHECKPOINT_FOREIGN = -2 };

/* What a checkpoint records of the run that wrote it, beside its tensors and position:
 * what a run that resumes compares with its own (resume.h). */
struct checkpoint_run {
    const char *method;          /* "esft", "full" or "frozen_router" */
    const char *deck_text;       /* the resolved deck (deck_print) */
    uint64_t data_hash;          /* dataset_hash of data.path */
    uint64_t expert_config_hash; /* checksum64 of train.expert_config's bytes; 0: none */
};

/* Collective over comm, the communicator the model's layout was made for (its grid has
 * comm's size, and comm's rank r is the grid's rank r: MPI_COMM_WORLD in esft); the
 * checkpoint directory must be one file system for every rank of comm. Every rank writes
 * the rows of the trainable tensors it holds, with their AdamW m and v, from its own
 * memory (the holders of a tensor share its rows); nothing is sent between ranks but
 * the checksums. The tensors' values do not depend on the layout. The call returns after
 * the file is complete, with the same status and message on every rank. Keeps the newest
 * `keep` checkpoints of the directory and deletes older ones. 0, or -1 with a message. */
int checkpoint_write(const char *output_dir, const struct model *model, const struct adamw *opt,
                     const struct train_position *position, const struct checkpoint_run *run,
                     int keep, MPI_Comm comm, char *err, size_t err_size);

/* The newest complete checkpoint in OUTPUT_DIR/checkpoints (temporary files ignored):
 * 1 and its path, 0 when there is none, -1 with a message on an unreadable directory. */
int checkpoint_latest(const char *output_dir, char *path, size_t path_size, char *err,
                      size_t err_size);

/* The steps of the complete checkpoints in OUTPUT_DIR/checkpoints, newest first, in a
 * new allocation (*steps, NULL when there are none): their number, or -1 with a message
 * on an unreadable directory (a missing one holds none). */
int checkpoint_list(const char *output_dir, long long **steps, char *err, size_t err_size);

/* OUTPUT_DIR/checkpoints/step-NNNNNNNN.h5, the checkpoint of `step`. 0, or -1 with a
 * message when it does not fit path_size. */
int checkpoint_path(const char *output_dir, long long step, char *path, size_t path_size, char *err,
                    size_t err_size);

/* A checkpoint's attributes, read and verified without its tensors. */
struct checkpoint_info {
    int version;   /* of the format: 1 (unverified), 2 or 3 */
    bool verified; /* version 2 or 3: the attributes matched their checksum, and the
                      tensors carry theirs; data_hash and expert_config_hash exist */
    struct train_position position;
    long long adam_step;
    uint64_t config_hash; /* of the base model's config.json */
    char *method, *deck_text;
    uint64_t data_hash, expert_config_hash; /* 0 in version 1 */
};

/* Reads the attributes of a checkpoint (this rank alone). 0, or CHECKPOINT_DAMAGED or
 * CHECKPOINT_FOREIGN (a newer format) with a message naming the file. */
int checkpoint_read_info(const char *path, struct checkpoint_info *info, char *err,
                         size_t err_size);
void checkpoint_info_free(struct checkpoint_info *info);

/* Reads a checkpoint into the trainable tensors this rank holds, their optimizer state
 * and the position; a checkpoint written under any layout reads under any other. Checks
 * that it belongs to this model (config hash), this method, and holds exactly the
 * model's trainable tensors (all of them, held here or not) with their shapes, before
 * anything is changed: such a refusal (CHECKPOINT_FOREIGN) leaves the model as it was.
 * The checksum of each tensor this rank reads is verified as it is read, so a damaged
 * tensor (CHECKPOINT_DAMAGED) is found after some held tensors were overwritten: read
 * another checkpoint or stop. Every rank reads, on its own (no communication): the
 * caller combines the ranks' results (checkpoint_agree). 0, or CHECKPOINT_DAMAGED or
 * CHECKPOINT_FOREIGN with a message naming the file (and the tensor). */
int checkpoint_read(const char *path, struct model *model, struct adamw *opt,
                    struct train_position *position, const char *method, char *err,
                    size_t err_size);

/* Collective over comm: one verdict from every rank's status (ranks_agree, log.h). 0 when
 * every rank's status is 0; otherwise, on every rank, the status and the message (in err,
 * "rank N: " before it when N is not rank 0) of the lowest-numbered failing rank. */
int checkpoint_agree(int status, char *err, size_t err_size, MPI_Comm comm);

#endif
