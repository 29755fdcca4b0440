/* modelpath: what the deck's model.path names, settled once by main before any phase
 * reads it, and the model checked there before anything is allocated or written.
 *
 * model.path is a local checkpoint directory; esft downloads nothing. A Hugging Face hub
 * id (`owner/name`) that is not a local directory is looked up in the Hugging Face cache
 * as huggingface_hub lays it out: the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else
 * $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub; the model is
 * models--owner--name/snapshots/REVISION/ in it, REVISION the one refs/main names, else
 * the only snapshot, else the newest. */
#ifndef ESFT_MODELPATH_H
#define ESFT_MODELPATH_H

#include <stdbool.h>
#include <stddef.h>

#include "deck.h"

enum modelpath_found {
    MODELPATH_DIRECTORY, /* path is a directory: out = path */
    MODELPATH_CACHED,    /* a hub id's snapshot in the cache: out = its directory */
    MODELPATH_ABSENT     /* neither: out = path */
};

/* Where path leads. CACHED writes into note which snapshot was taken and why; ABSENT
 * writes, for a path that looks like a hub id, that esft reads local directories and how
 * to download one (note is "" otherwise). */
enum modelpath_found modelpath_resolve(const char *path, char *out, size_t out_size, char *note,
                                       size_t note_size);

/* Collective over MPI_COMM_WORLD (rank 0 looks, every rank takes its verdict). For a deck
 * whose phases read model.path: a hub id found in the cache replaces deck->model.path by
 * its snapshot directory (logged), so every phase and --dry-run see the directory; then
 * the checkpoint's config.json is read and checked (hfconfig_load: sizes, limits), and
 * with dry_run every tensor's header against it (model_check_checkpoint), as the run
 * would. A deck that inits the model has its init section checked instead. A bad config
 * ends every rank with status 2. When the model is not there (yet), why says so if there
 * is more to say than that config.json cannot be opened (a hub id: how to download it),
 * else it is "". */
void modelpath_prepare(struct deck *deck, bool dry_run, char *why, size_t why_size);
/* modelpath_prepare for a run that reads model.path whatever the deck's phases
 * (esft --apply-adapter) */
void modelpath_prepare_read(struct deck *deck, char *why, size_t why_size);

#endif
