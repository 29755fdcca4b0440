/* prepare: the `prepare` phase, jsonl conversations -> token dataset (dataset.h).
 *
 * Rows (one JSON object per line; blank lines are skipped; keys other than these are
 * ignored, so rows may carry ids or metadata):
 *   {"messages": [{"role": "system"|"user"|"assistant", "content": STRING,
 *                  "mask": 0|1 (optional; 1 on an assistant turn: not trained)}, ...]}
 *   {"prompt": STRING, "completion": STRING}
 *   {"text": STRING}
 * Formatting and the loss mask are the tokenizer's chat template (tokenizer.h). Empty
 * strings are allowed. A row is bad when it is not valid UTF-8 or not valid JSON (a
 * duplicate key included), is not an object, has none or more than one of the three
 * formats, has a value of the wrong type, an empty "messages" list, a message that is not
 * an object, an unknown role, or a "mask" other than 0 or 1. */
#ifndef ESFT_PREPARE_H
#define ESFT_PREPARE_H

#include <stddef.h>

#include "deck.h"
#include "layout.h"
#include "tokenizer.h"

/* Reads deck->prepare.inputs on rank 0 and writes deck->prepare.output; the other ranks
 * wait. Bad rows: with prepare.bad_rows abort, the first ends every rank with status 2
 * (`FILE:LINE: message`) and nothing is written; with skip, each is warned about (the
 * first 20 printed), counted and stored as the dataset's rows_skipped. An input that
 * cannot be opened, or inputs with no usable row, end with status 2; a failed write with
 * status 1. Collective over MPI_COMM_WORLD; returns 0. */
int phase_prepare(const struct deck *deck, const struct layout *layout);

/* Formats one jsonl row (length bytes, no newline) into one sample appended to out.
 * Returns 0, or -1 with the reason in err (no file or line prefix); out is then
 * unchanged. */
int prepare_format_row(const struct tokenizer *tok, const char *line, size_t length,
                       struct token_buffer *out, char *err, size_t err_size);

#endif
