/* phases: the entry point of each phase a deck can run, called by main in deck order.
 * Each is collective over every rank of the layout, returns 0 on success, and reports
 * user errors through fatal_all (status 2) before it writes anything. */
#ifndef ESFT_PHASES_H
#define ESFT_PHASES_H

#include "deck.h"
#include "hfconfig.h"
#include "layout.h"

/* init: a random-initialised Hugging Face checkpoint at model.path (init.c). */
int phase_init(const struct deck *deck, const struct layout *layout);
/* The model the deck's init section describes, checked as config.json is (the size
 * limits of hfconfig.h included). 0, or -1 with a message naming the deck and key. */
int init_config(const struct deck *deck, struct model_config *cfg, char *err, size_t err_size);

/* prepare: jsonl conversations -> token dataset (prepare.c). */
int phase_prepare(const struct deck *deck, const struct layout *layout);

/* score: routing statistics of model.path on data.path (score.c). */
int phase_score(const struct deck *deck, const struct layout *layout);

/* select: statistics -> expert_config.json, heatmap, trainable names (select.c). */
int phase_select(const struct deck *deck, const struct layout *layout);

/* train: fine-tune the method's trainable tensors, checkpoint, export (train.c). */
int phase_train(const struct deck *deck, const struct layout *layout);
/* What the train section may not ask of this model (preflight and train both ask): 0, or
 * -1 with a message naming the deck's key. */
int train_check_model(const struct deck *deck, const struct model_config *cfg, char *err,
                      size_t err_size);
int phase_eval(const struct deck *deck, const struct layout *layout);

/* esft --apply-adapter: model.path with the ESFT adapter at `adapter` (its
 * adapter.safetensors, or a directory holding one) put over it, written as a merged
 * checkpoint in RUN.OUTPUT_DIR/merged (apply_adapter.c). Not one of the deck's phases:
 * main runs it instead of them. */
int phase_apply_adapter(const struct deck *deck, const struct layout *layout, const char *adapter);

/* The backend of the deck's run.backend for a phase that computes (score, train, eval),
 * named in the log; a backend that cannot be had (cuda without a build or device for
 * it) ends every rank with the reason. */
struct backend;
const struct backend *phase_backend(const struct deck *deck, const char *phase);

#endif
