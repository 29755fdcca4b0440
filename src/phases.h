/* phases: the entry point of each phase a deck can run, called by main in deck order.
 * Each is collective over every rank of the layout, returns 0 on success, and reports
 * user errors through fatal_all (status 2) before it writes anything. */
#ifndef ESFT_PHASES_H
#define ESFT_PHASES_H

#include "deck.h"
#include "layout.h"

/* init: a random-initialised Hugging Face checkpoint at model.path (init.c). */
int phase_init(const struct deck *deck, const struct layout *layout);

#endif
