/* dataset: the token dataset (HDF5) that `prepare` writes and score, train and eval read.
 *
 * File layout:
 *   /tokens     uint32 [T]       every sample's tokens, concatenated
 *   /offsets    uint64 [S + 1]   sample i is tokens [offsets[i], offsets[i+1]); offsets[0] = 0
 *   /loss_mask  uint8  [T]       1 where the token is a target the loss counts (completion)
 *   attributes on /: format = "esft-tokens", version = 2, tokenizer (name or path),
 *     tokenizer_checksum (the tokenizer's identity, tokenizer.h: 16 hex digits of its
 *     tokenizer.json's checksum, "" for the byte tokenizer), special_tokens ("bos=ID
 *     eos=ID" or ""), vocab_size (uint64: every token < vocab_size), sources (the input
 *     files, one string joined by newlines), n_samples, n_tokens, rows_skipped (bad rows
 *     skipped by prepare). Version 1 files (no tokenizer_checksum, special_tokens) are
 *     read as the byte tokenizer's, the only one esft had then.
 * A sample is one conversation or document, already formatted and tokenized. */
#ifndef ESFT_DATASET_H
#define ESFT_DATASET_H

#include <stddef.h>
#include <stdint.h>

struct dataset {
    char *path;
    int64_t file;       /* hid_t of the open file */
    uint64_t n_samples; /* S */
    uint64_t n_tokens;  /* T */
    uint64_t *offsets;  /* [S + 1], read at open */
    uint64_t vocab_size;
    char *tokenizer;
    char *tokenizer_checksum; /* "" for the byte tokenizer */
    char *special_tokens;
};

/* Opens a dataset read-only (serial HDF5: each rank opens it for itself) and reads its
 * offsets, checking every attribute and that offsets start at 0, never decrease and end
 * at the token count. Returns 0, or -1 with a message naming the file and dataset. */
int dataset_open(struct dataset *ds, const char *path, char *err, size_t err_size);
void dataset_close(struct dataset *ds);

/* Whether the dataset's ids are the model's: refused (-1 with a message naming both)
 * when the model directory carries a tokenizer.json and the dataset was made with
 * another tokenizer (or the byte tokenizer), or when the dataset's ids reach the model's
 * vocab_size. 0 when they fit. */
int dataset_check_model(const struct dataset *ds, const char *model_dir, int model_vocab_size,
                        char *err, size_t err_size);

/* Tokens of sample i: offsets[i+1] - offsets[i]. */
static inline uint64_t dataset_sample_length(const struct dataset *ds, uint64_t i)
{
    return ds->offsets[i + 1] - ds->offsets[i];
}

/* Reads sample i's tokens and loss mask (either may be NULL) into caller buffers of
 * dataset_sample_length(i) entries. Returns 0, or -1 with a message. */
int dataset_read_sample(const struct dataset *ds, uint64_t i, uint32_t *tokens,
                        uint8_t *loss_mask, char *err, size_t err_size);

/* The same for the first min(dataset_sample_length(i), max_tokens) entries only: what a
 * reader that cuts samples to data.seq_len needs, into buffers of max_tokens entries. */
int dataset_read_prefix(const struct dataset *ds, uint64_t i, uint64_t max_tokens,
                        uint32_t *tokens, uint8_t *loss_mask, char *err, size_t err_size);

/* The checksum of the dataset's contents: checksum64 (checksum.h) over the offsets
 * (uint64 [S + 1]), then the tokens (uint32 [T]), then the loss mask (uint8 [T]), as
 * little-endian bytes, read a slice at a time. Two files holding the same samples hash
 * the same however they were written (chunking, attributes, sources); checkpoints record
 * it, so that a run resumes only on the data it began with. 0, or -1 with a message. */
int dataset_hash(const struct dataset *ds, uint64_t *hash, char *err, size_t err_size);

#endif
