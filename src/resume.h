/* resume: where a training run starts, for the train phase: afresh, or from a checkpoint
 * of the same run (train.resume).
 *
 * auto: the newest intact checkpoint of run.output_dir. A damaged one (unreadable,
 * truncated, a checksum that does not match) is passed over with a warning naming it and
 * why, and the next newest tried; none intact is an error naming each. A checkpoint
 * path: that file; damaged, it is an error naming the file and the tensor. The chosen
 * checkpoint's deck is then compared with this run's over every key that changes what is
 * trained (the table in resume.c): a difference refuses the resume, naming each key with
 * both values, unless train.resume is force, which resumes from the newest intact
 * checkpoint with a warning listing them (but never one of another base model or
 * method). A checkpoint past train.steps is refused: there is nothing left to train.
 * never: afresh.
 * Every rank reaches the same decision: rank 0 lists the directory and hashes the inputs,
 * every rank reads its own share of the checkpoint, and the verdicts are combined
 * (checkpoint_agree) before any rank acts on one. */
#ifndef ESFT_RESUME_H
#define ESFT_RESUME_H

#include <stddef.h>

#include "checkpoint.h"
#include "dataset.h"
#include "deck.h"
#include "model.h"
#include "optim.h"

/* Fills run->data_hash (dataset_hash of ds, the deck's data.path) and
 * run->expert_config_hash (checksum64 of train.expert_config's bytes under method esft,
 * else 0): what checkpoints record of the run's inputs. Collective over MPI_COMM_WORLD:
 * rank 0 reads and hashes, every rank gets the values; an unreadable input ends every
 * rank with exit status 2. */
void resume_hash_inputs(const struct deck *deck, const struct dataset *ds,
                        struct checkpoint_run *run);

/* Collective over MPI_COMM_WORLD. Reads the checkpoint train.resume names or finds (see
 * above) into the trainable tensors each rank holds, their AdamW state and the position:
 * 1 with its path, or 0 when the run starts afresh (never, or no checkpoint yet).
 * run is this run's record (resume_hash_inputs). A refusal ends every rank with exit
 * status 2 and one message; an unreadable checkpoint directory with status 1. */
int resume_from_checkpoint(const struct deck *deck, const struct checkpoint_run *run,
                           struct model *model, struct adamw *opt, struct train_position *position,
                           char *path, size_t path_size);

#endif
