/* prepare: the `prepare` phase, jsonl rows -> token dataset (dataset.h).
 *
 * Rows: one JSON object per line, in any shape conversation.h accepts (messages,
 * ShareGPT conversations, prompt/completion, Alpaca, text; system and tools beside them);
 * blank lines are skipped and a UTF-8 byte order mark at the start of a file is ignored.
 * Formatting and the loss mask: sample.h, with the tokenizer prepare.tokenizer names
 * (tokenizer.h). A key of a row that is not used is reported (FILE:LINE, once per key)
 * and counted. A row is bad when it is not valid UTF-8 or JSON (a duplicate key
 * included), is not an object, has none or more than one shape, has a value of the wrong
 * type, an empty conversation, an unknown role, a bad loss switch, or when its template
 * or format refuses it (the template's own message). */
#ifndef ESFT_PREPARE_H
#define ESFT_PREPARE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "deck.h"
#include "layout.h"
#include "tokenizer.h"

/* Reads deck->prepare.inputs on every rank, each formatting its share of the rows, and
 * writes deck->prepare.output from rank 0 (the same file for any number of ranks). Bad
 * rows: with prepare.bad_rows abort, the first ends every rank with status 2
 * (`FILE:LINE: message`) and nothing is written; with skip, each is warned about (the
 * first 20 printed), counted and stored as the dataset's rows_skipped. An input that
 * cannot be opened, or inputs with no usable row, end with status 2; a failed write with
 * status 1. Collective over MPI_COMM_WORLD; returns 0. */
int phase_prepare(const struct deck *deck, const struct layout *layout);

/* Formats one jsonl row (length bytes, no newline) into one sample appended to out, and
 * writes the keys of the row it did not use into dropped (comma separated; "" if none;
 * dropped may be NULL). Returns 0, or -1 with the reason in err (no file or line prefix);
 * out is then unchanged. */
int prepare_format_row(const struct tokenizer *tok, enum prepare_format format, const char *line,
                       size_t length, struct token_buffer *out, char *dropped,
                       size_t dropped_size, char *err, size_t err_size);

/* The rows of one jsonl input as prepare reads them: a UTF-8 byte order mark at the start
 * of the file dropped, the line's LF or CRLF cut, blank lines skipped. */
struct jsonl_reader {
    const char *path;
    FILE *file;
    char *line;
    size_t capacity;
    uint64_t line_number; /* of the row last returned */
};

/* Opens path. 0, or -1 with "PATH: cannot open input: ..." or "PATH: is a directory"
 * in err. */
int jsonl_open(struct jsonl_reader *r, const char *path, char *err, size_t err_size);
/* The next non-blank row (valid until the next call): 1; 0 at the end; -1 with a read
 * error in err. */
int jsonl_next(struct jsonl_reader *r, const char **text, size_t *length, char *err,
               size_t err_size);
void jsonl_close(struct jsonl_reader *r);

/* Whether one of the first max_rows rows of prepare.inputs is a conversation (not a
 * "text" row; a row that does not parse is passed over):
 * 1 with "FILE:LINE" in where, else 0. For the check before any work that a tokenizer
 * without a chat template is not asked to format conversations. */
int prepare_first_conversation(const struct deck *deck, int max_rows, char *where,
                               size_t where_size);

/* Opens the tokenizer the deck's prepare section names (model_made: init writes
 * model.path in this run, so it has no tokenizer files yet). Returns 0, or -1 with
 * "DECK:LINE:COL: prepare.tokenizer: what is wrong" in err. */
int prepare_open_tokenizer(const struct deck *deck, bool model_made, struct tokenizer *tok,
                           char *err, size_t err_size);

#endif
