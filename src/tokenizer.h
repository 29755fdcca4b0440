/* tokenizer: the tokenizer prepare encodes with, and its identity, which the dataset
 * records and score, train and eval compare with the model's. Callers: prepare, sample.c
 * (formatting), the phases that read a dataset, and the tests.
 *
 * Two kinds:
 *   byte   built in (vocab_size 262): ids 0..255 are the bytes of the UTF-8 text, then
 *          256 <|begin_of_text|> 257 <|end_of_text|> 258 <|system|> 259 <|user|>
 *          260 <|assistant|> 261 <|end_of_turn|>; its chat template is fixed (sample.h).
 *   hf     a Hugging Face tokenizer.json (src/tokenizer/hf_tokenizer.h) with, from the
 *          same directory, tokenizer_config.json (bos_token, eos_token, chat_template: a
 *          string or a list of named templates) and chat_template.jinja (which, when
 *          present, is the default template, as transformers reads it).
 * prepare.tokenizer: `auto` is model.path's tokenizer.json when the checkpoint has one,
 * else byte (a model init writes has none); `byte`; or a tokenizer.json or the directory
 * holding it.
 *
 * Identity: a tokenizer.json is known by the checksum64 (checksum.h) of its bytes, as 16
 * hex digits; the byte tokenizer by the empty string. */
#ifndef ESFT_TOKENIZER_H
#define ESFT_TOKENIZER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct hf_tokenizer;
struct chat_template;

/* A growing sample: token ids and the loss mask beside them. */
struct token_buffer {
    uint32_t *ids;      /* [n] */
    uint8_t *loss_mask; /* [n]: 1 where the token is a target the loss counts */
    size_t n, capacity;
};

void token_buffer_append(struct token_buffer *buf, uint32_t id, uint8_t loss);
void token_buffer_reserve(struct token_buffer *buf, size_t extra);
void token_buffer_free(struct token_buffer *buf);

struct tokenizer {
    char *name;          /* "byte", or the tokenizer.json path */
    char checksum[17];   /* identity: hex checksum of tokenizer.json; "" for byte */
    uint64_t vocab_size; /* every id is < vocab_size */
    int64_t bos, eos;    /* ids of bos_token and eos_token; -1: none */
    struct hf_tokenizer *hf; /* NULL: the byte tokenizer */
    /* the chat template (hf only; NULL: the tokenizer has none) and what it is called */
    struct chat_template *chat;
    char *chat_name;
    json_t *template_vars; /* bos_token, eos_token and prepare.template_kwargs */
    time_t now;            /* what strftime_now formats (0: the current time) */
};

struct tokenizer_options {
    const char *spec;       /* prepare.tokenizer */
    const char *model_path; /* model.path, or NULL */
    bool model_made;        /* init writes the model in this run (no tokenizer files) */
    const char *chat_template;             /* prepare.chat_template, or NULL */
    char *const *template_kwargs;          /* prepare.template_kwargs */
    int n_template_kwargs;
    const char *date;                      /* prepare.date, or NULL */
};

/* Opens the tokenizer the options name. Returns 0, or -1 with a message naming the file
 * and what is wrong in err. */
int tokenizer_open(struct tokenizer *tok, const struct tokenizer_options *options, char *err,
                   size_t err_size);
void tokenizer_close(struct tokenizer *tok);

/* Appends the tokens of `length` bytes of UTF-8 text (no special tokens added) to out,
 * each with loss mask `loss`. Returns 0, or -1 with the reason in err (out unchanged). */
int tokenizer_encode(const struct tokenizer *tok, const char *text, size_t length, uint8_t loss,
                     struct token_buffer *out, char *err, size_t err_size);

/* The text of n ids, special tokens written out (the byte tokenizer's by the names
 * above; bytes that are not UTF-8 as they are, an hf tokenizer's as U+FFFD): a malloc'd,
 * NUL-terminated string with its length. */
char *tokenizer_decode(const struct tokenizer *tok, const uint32_t *ids, size_t n, size_t *length);

/* The byte tokenizer's special ids. */
enum {
    BYTE_BEGIN_OF_TEXT = 256,
    BYTE_END_OF_TEXT = 257,
    BYTE_SYSTEM = 258,
    BYTE_USER = 259,
    BYTE_ASSISTANT = 260,
    BYTE_END_OF_TURN = 261,
    BYTE_VOCAB_SIZE = 262,
};

/* The identity of the tokenizer a checkpoint directory carries: 1 with the checksum of
 * its tokenizer.json in checksum, 0 when it has none, -1 with a message when it cannot be
 * read. */
int tokenizer_model_identity(const char *model_dir, char checksum[17], char *err,
                             size_t err_size);

/* Checks that `length` bytes are well-formed UTF-8. Returns true, or false with the byte
 * offset of the first bad sequence in *bad_offset (may be NULL). */
bool utf8_valid(const char *text, size_t length, size_t *bad_offset);

#endif
