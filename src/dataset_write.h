/* dataset_write: writes a token dataset in the layout dataset.h describes. Caller: the
 * `prepare` phase (and tests that need a dataset). One rank writes, serial HDF5.
 *
 * The file is written as PATH.tmp, flushed to disk, closed and renamed to PATH, so a
 * failure (or a crash) leaves either the old file or the complete new one, never a torn
 * one; PATH.tmp is removed on failure. */
#ifndef ESFT_DATASET_WRITE_H
#define ESFT_DATASET_WRITE_H

#include <stddef.h>
#include <stdint.h>

struct dataset_contents {
    const uint32_t *tokens;   /* [n_tokens], each < vocab_size */
    const uint8_t *loss_mask; /* [n_tokens], each 0 or 1 */
    uint64_t n_tokens;        /* T */
    const uint64_t *offsets;  /* [n_samples + 1]: 0, ..., n_tokens, never decreasing */
    uint64_t n_samples;       /* S */
    const char *tokenizer;    /* name or path */
    const char *tokenizer_checksum; /* identity (tokenizer.h): hex, "" for byte */
    const char *special_tokens;     /* "bos=ID eos=ID", or "" */
    uint64_t vocab_size;
    const char *const *sources; /* [n_sources] input files, stored joined by newlines */
    int n_sources;
    uint64_t rows_skipped; /* bad rows prepare skipped */
};

/* Checks the contents (offsets, token ids, mask values) and writes them to path. Returns
 * 0, or -1 with a message naming the file in err (nothing is left at path.tmp). */
int dataset_write(const char *path, const struct dataset_contents *contents, char *err,
                  size_t err_size);

#endif
