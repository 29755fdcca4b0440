/* checkpoint_internal: what the checkpoint writer (checkpoint_write.c) and the readers
 * (checkpoint.c) share: the format's names and versions, the file access properties,
 * the attributes' checksum and the listing of a checkpoint directory. Not a public
 * surface: checkpoint.h is. */
#ifndef ESFT_CHECKPOINT_INTERNAL_H
#define ESFT_CHECKPOINT_INTERNAL_H

#include <hdf5.h>
#include <stdbool.h>
#include <stdint.h>

#include "checkpoint.h"

#define CHECKPOINT_FORMAT "esft-checkpoint"
/* 3: written by every rank (slices recorded); 2: gathered to rank 0, still read */
#define CHECKPOINT_VERSION 3
/* the first version whose tensors carry a `slices` attribute and the root a `layout` */
#define CHECKPOINT_VERSION_SHARDED 3
/* the oldest version still read: 1, without checksums (read unverified) */
#define CHECKPOINT_VERSION_OLDEST 1
#define CHECKPOINT_PATH_MAX 4200

/* The three groups of tensors, in the order of a tensor's parts: weights, AdamW m, v. */
extern const char *const checkpoint_groups[3];

/* File access without HDF5's advisory locks (checkpoints are protected by the rename, and
 * locks fail on some parallel file systems), in the 1.8 object format or later (which
 * stores attributes of any size: the deck may pass 64 KiB). */
hid_t checkpoint_file_access(void);

/* The root checksum over the attributes (checkpoint.h). */
uint64_t checkpoint_attributes_checksum(const struct checkpoint_info *info);

/* A temporary file the writer leaves when a write dies: ".step-<digits>.h5.tmp". */
bool checkpoint_temporary_name(const char *name);

struct step_list {
    long long *steps;
    int n, cap;
};

/* The steps of the real checkpoint names of dir; 0, -1 with errno on an unreadable
 * directory (ENOENT: none yet). */
int checkpoint_list_steps(const char *dir, struct step_list *list);
int checkpoint_compare_steps(const void *a, const void *b);

#endif
