/* hf_internal: the data of a loaded tokenizer.json and the stages that share it (loader,
 * added tokens, normalizers, pre-tokenizers, BPE model, post-processor, decoder). Only
 * the files of src/tokenizer/ include it; hf_tokenizer.h is the public surface. */
#ifndef ESFT_HF_INTERNAL_H
#define ESFT_HF_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hf_tokenizer.h"

/* ---- small containers (hf_util.c) ---- */

/* realloc and calloc that end the program when memory runs out. */
void *hf_realloc(void *p, size_t size);
void *hf_calloc(size_t count, size_t size);

/* A growing byte string (not NUL-terminated unless said). */
struct hf_string {
    char *data;
    size_t n, capacity;
};

void hf_string_append(struct hf_string *s, const char *bytes, size_t n);
void hf_string_free(struct hf_string *s);
void hf_ids_push(struct hf_ids *ids, uint32_t id);

/* Spans of a text: [start, end) with a flag (an added token's id, or "is a match"). */
struct hf_spans {
    size_t *start, *end;
    int64_t *value;
    size_t n, capacity;
};

void hf_spans_push(struct hf_spans *s, size_t start, size_t end, int64_t value);
void hf_spans_free(struct hf_spans *s);

/* Strings kept for the tokenizer's lifetime, in large blocks. */
struct hf_arena {
    char **blocks;
    size_t n_blocks, used, block_size;
};

char *hf_arena_copy(struct hf_arena *a, const char *bytes, size_t n); /* NUL-terminated */
void hf_arena_free(struct hf_arena *a);

/* String -> id, open addressing (the vocabulary). Keys are not copied. */
struct hf_string_map {
    const char **keys;
    uint32_t *key_length, *value;
    size_t mask, n;
};

void hf_string_map_init(struct hf_string_map *m, size_t expected);
/* Sets key -> value (an existing key's value is replaced). */
void hf_string_map_put(struct hf_string_map *m, const char *key, size_t length, uint32_t value);
int64_t hf_string_map_get(const struct hf_string_map *m, const char *key, size_t length);
void hf_string_map_free(struct hf_string_map *m);

/* (left id, right id) -> (rank, merged id): the BPE merges. */
struct hf_pair_map {
    uint64_t *keys;
    uint32_t *rank, *merged;
    size_t mask, n;
};

void hf_pair_map_init(struct hf_pair_map *m, size_t expected);
void hf_pair_map_put(struct hf_pair_map *m, uint32_t left, uint32_t right, uint32_t rank,
                     uint32_t merged);
bool hf_pair_map_get(const struct hf_pair_map *m, uint32_t left, uint32_t right, uint32_t *rank,
                     uint32_t *merged);
void hf_pair_map_free(struct hf_pair_map *m);

/* UTF-8: the length of the sequence starting at text[0] if it is well formed (1-4),
 * else 0. */
size_t hf_utf8_valid_length(const unsigned char *text, size_t n);
/* Copies text to out with each maximal invalid subpart replaced by U+FFFD (the rule of
 * Python's errors="replace" and Rust's from_utf8_lossy). */
void hf_utf8_replace_invalid(const char *text, size_t n, struct hf_string *out);
/* Decodes one code point from well-formed UTF-8; returns its length. */
size_t hf_utf8_decode(const char *text, int32_t *codepoint);

/* ---- patterns (hf_pattern.c): what Split, Replace and Digits look for ---- */

enum hf_pattern_kind { HF_PATTERN_REGEX, HF_PATTERN_STRING, HF_PATTERN_NUMERIC_CHAR };

struct hf_pattern {
    enum hf_pattern_kind kind;
    void *regex;   /* Oniguruma regex_t *, HF_PATTERN_REGEX */
    char *literal; /* HF_PATTERN_STRING (arena) */
    size_t literal_length;
};

/* Compiles a regex the way the library does (Oniguruma syntax, UTF-8, no options).
 * Returns 0, or -1 with Oniguruma's message in err. */
int hf_pattern_regex(struct hf_pattern *p, const char *regex, size_t length, char *err,
                     size_t err_size);
void hf_pattern_free(struct hf_pattern *p);
/* Covers text[0, n) with spans, value 1 for a match and 0 between matches (the library's
 * Pattern::find_matches; an empty text is one empty non-match). Appends to out. */
void hf_pattern_find(const struct hf_pattern *p, const char *text, size_t n, struct hf_spans *out);

/* ---- added tokens (hf_added.c) ---- */

struct hf_added_token {
    const char *content; /* as matched: raw, or normalized when normalized is true */
    size_t length;
    const char *text; /* the content as the file gives it */
    size_t text_length;
    uint32_t id;
    bool special, normalized, lstrip, rstrip, single_word;
};

/* The tokens matched on one kind of text, indexed by first byte, longest first. */
struct hf_added_set {
    int *order;     /* indices into the tokenizer's added tokens */
    int first[257]; /* order[first[b] .. first[b+1]) start with byte b */
};

void hf_added_set_build(struct hf_added_set *set, const struct hf_added_token *tokens, int n_tokens,
                        bool normalized);
void hf_added_set_free(struct hf_added_set *set);
/* Splits text into spans: an added token's id, or -1 for the text between them. */
void hf_added_split(const struct hf_added_set *set, const struct hf_added_token *tokens,
                    const char *text, size_t n, struct hf_spans *out);

/* ---- normalizers (hf_normalizer.c) ---- */

enum hf_normalizer_kind { HF_NORM_NFC, HF_NORM_PREPEND, HF_NORM_REPLACE, HF_NORM_SEQUENCE };

struct hf_normalizer {
    enum hf_normalizer_kind kind;
    const char *content; /* Prepend's prefix, Replace's replacement */
    size_t content_length;
    struct hf_pattern pattern;   /* Replace */
    struct hf_normalizer *steps; /* Sequence */
    int n_steps;
};

/* Writes the normalized text to out (cleared first). Returns 0, or -1 with err. */
int hf_normalize(const struct hf_normalizer *nm, const char *text, size_t n, struct hf_string *out,
                 char *err, size_t err_size);
void hf_normalizer_free(struct hf_normalizer *nm);

/* ---- pre-tokenizers (hf_pretokenizer.c) ---- */

enum hf_pre_kind { HF_PRE_SEQUENCE, HF_PRE_SPLIT, HF_PRE_BYTE_LEVEL, HF_PRE_DIGITS };

enum hf_split_behavior {
    HF_REMOVED,
    HF_ISOLATED,
    HF_MERGED_WITH_PREVIOUS,
    HF_MERGED_WITH_NEXT,
    HF_CONTIGUOUS
};

struct hf_pre_tokenizer {
    enum hf_pre_kind kind;
    struct hf_pattern pattern; /* Split; ByteLevel's GPT-2 regex; Digits' numeric chars */
    enum hf_split_behavior behavior;
    bool invert, add_prefix_space, use_regex;
    struct hf_pre_tokenizer *steps; /* Sequence */
    int n_steps;
};

/* Pieces of text: piece i is text.data[spans.start[i], spans.end[i]). */
struct hf_pieces {
    struct hf_string text;
    struct hf_spans spans;
};

/* Splits `in` into `out` (both reused; out cleared first). */
void hf_pre_tokenize(const struct hf_pre_tokenizer *pt, const struct hf_pieces *in,
                     struct hf_pieces *out);
void hf_pre_tokenizer_free(struct hf_pre_tokenizer *pt);
/* The GPT-2 byte <-> printable character map of ByteLevel. */
const char *hf_byte_level_char(unsigned char byte, size_t *length);
int hf_byte_level_byte(int32_t codepoint); /* -1 if the character is not in the map */

/* ---- the BPE model (hf_bpe.c) ---- */

struct hf_bpe {
    struct hf_string_map vocab;
    const char **id_text; /* [n_ids]: the token of each id, NULL where none */
    uint32_t *id_length;
    uint32_t n_ids;
    struct hf_pair_map merges;
    bool byte_fallback, fuse_unk, ignore_merges;
    int64_t unk_id; /* -1: none */
};

/* Appends the ids of one pre-tokenized word. */
void hf_bpe_encode(const struct hf_bpe *bpe, const char *word, size_t n, struct hf_ids *out);
void hf_bpe_free(struct hf_bpe *bpe);

/* ---- post-processor and decoder ---- */

enum hf_post_kind { HF_POST_BYTE_LEVEL, HF_POST_TEMPLATE, HF_POST_SEQUENCE };

struct hf_post_processor {
    enum hf_post_kind kind;
    uint32_t *before, *after; /* TemplateProcessing single: ids around $A */
    size_t n_before, n_after;
    struct hf_post_processor *steps;
    int n_steps;
};

enum hf_decoder_kind { HF_DECODER_NONE, HF_DECODER_BYTE_LEVEL };

/* ---- the tokenizer ---- */

struct hf_tokenizer {
    char *name;
    struct hf_arena arena;
    struct hf_added_token *added;
    int n_added;
    struct hf_string_map added_by_content; /* raw content -> id */
    struct hf_string_map special_contents; /* the special tokens' contents */
    int *added_index;                      /* [vocab_size]: id -> added token, or -1 */
    struct hf_added_set raw_set, normalized_set;
    struct hf_normalizer *normalizer;       /* NULL: none */
    struct hf_pre_tokenizer *pre_tokenizer; /* NULL: none */
    struct hf_bpe bpe;
    struct hf_post_processor *post_processor; /* NULL: none */
    enum hf_decoder_kind decoder;
    uint32_t vocab_size;
};

void hf_post_processor_free(struct hf_post_processor *pp);

#endif
