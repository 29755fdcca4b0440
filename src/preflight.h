/* preflight: every check of a deck's inputs that can be made before any phase runs, for
 * all the phases of its list at once, so that a run is refused before it writes anything
 * rather than after its first phases did their work (and `esft --dry-run`, which job
 * scripts run before launching, refuses the same decks).
 *
 * What each phase needs, unless an earlier phase of the same list writes it: init, a
 * model.path that holds no checkpoint yet; prepare, readable inputs and a usable
 * tokenizer; score, train and eval, a model whose config.json esft supports and whose
 * weights are there, a dataset that opens and fits the model's vocabulary; select, its
 * statistics files; train, an available method, an expert_config that reads against the
 * model and selects something, a global batch that the layout divides; eval, its
 * adapter. */
#ifndef ESFT_PREFLIGHT_H
#define ESFT_PREFLIGHT_H

#include <stddef.h>

#include "deck.h"
#include "layout.h"

/* Runs the checks (reads files; no MPI). Returns the number of problems found; their
 * messages, one per line, in messages (cut to size, every problem counted). */
int preflight_check(const struct deck *deck, const struct layout_grid *grid, char *messages,
                    size_t size);

#endif
