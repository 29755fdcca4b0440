/* inspect: `esft --inspect N DECK`, what prepare would make of one sample, shown before
 * any GPU hour is spent. Caller: main.
 *
 * Sample N (0-based) is the N-th sample of the dataset the deck's prepare section would
 * write: the rows of prepare.inputs in order, blank lines skipped, and bad rows skipped
 * under prepare.bad_rows: skip (under abort the first bad row before it is the error it
 * would be). Printed on stdout: where the row is (FILE:LINE), the tokenizer and template,
 * the token and loss counts, the sample's text decoded with every run of loss-bearing
 * tokens between the markers [[ and ]], and the token ids with a * after each
 * loss-bearing one. Nothing is written. */
#ifndef ESFT_INSPECT_H
#define ESFT_INSPECT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "deck.h"

/* Returns 0, or the exit status (2: bad input) with the message in err. */
int inspect_sample(const struct deck *deck, uint64_t n, FILE *out, char *err, size_t err_size);

#endif
