/* tokenizer: text -> token ids, and the chat template that turns a conversation into one
 * sample with its loss mask. Callers: the `prepare` phase (and its tests).
 *
 * A tokenizer is a small table: its name, vocab_size, the ids of its special tokens, an
 * `encode` function (UTF-8 text -> ids appended to a buffer) and a `format_chat` function
 * (a conversation -> one sample). The built-in byte tokenizer fills the table here; a
 * Hugging Face tokenizer.json (BPE) implementation plugs in later by filling the same
 * table from the file (tokenizer_open dispatches on the spec) and, where its model has a
 * chat template of its own, its own format_chat.
 *
 * The byte tokenizer ("byte", vocab_size 262):
 *   ids 0..255   the bytes of the UTF-8 text
 *   256 <|begin_of_text|>  257 <|end_of_text|>  258 <|system|>  259 <|user|>
 *   260 <|assistant|>      261 <|end_of_turn|>
 *
 * The chat template (fixed, every tokenizer that does not bring its own):
 *   BOS, then for each message: ROLE, content tokens, END_OF_TURN; then EOS.
 * Loss mask: 1 on the content tokens of each assistant message and on that message's
 * END_OF_TURN, unless the message carries "mask": 1 (then 0 for the whole turn); 0 on
 * everything else (BOS, role tokens, system and user turns, EOS).
 *   {"prompt": P, "completion": C}  is the conversation [user P, assistant C].
 *   {"text": T}                     is BOS, T's tokens, EOS with loss 1 on T and EOS.
 * Empty content is allowed (the turn is ROLE, END_OF_TURN). Text must be valid UTF-8
 * (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF, no truncated
 * sequence); anything else is refused. */
#ifndef ESFT_TOKENIZER_H
#define ESFT_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A growing sample: token ids and the loss mask beside them. */
struct token_buffer {
    uint32_t *ids;      /* [n] */
    uint8_t *loss_mask; /* [n]: 1 where the token is a target the loss counts */
    size_t n, capacity;
};

void token_buffer_append(struct token_buffer *buf, uint32_t id, uint8_t loss);
void token_buffer_free(struct token_buffer *buf);

enum chat_role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

/* "system", "user", "assistant" -> role; -1 for anything else. */
int chat_role_parse(const char *name, enum chat_role *role);

struct chat_message {
    enum chat_role role;
    const char *content; /* UTF-8, length bytes (need not be NUL-terminated) */
    size_t length;
    bool no_loss; /* "mask": 1 on an assistant message: the turn is not trained */
};

struct tokenizer {
    const char *name;    /* "byte", or the tokenizer.json path */
    uint64_t vocab_size; /* every id is < vocab_size */
    /* special token ids */
    uint32_t begin_of_text, end_of_text, system, user, assistant, end_of_turn;
    /* Appends the tokens of `length` bytes of UTF-8 text to out, each with loss mask
     * `loss`. Returns 0, or -1 with the reason in err (out then unchanged). */
    int (*encode)(const struct tokenizer *tok, const char *text, size_t length, uint8_t loss,
                  struct token_buffer *out, char *err, size_t err_size);
    /* Appends one formatted conversation (one sample) to out. Same return convention. */
    int (*format_chat)(const struct tokenizer *tok, const struct chat_message *messages,
                       int n_messages, struct token_buffer *out, char *err, size_t err_size);
    void *state; /* the implementation's own data (a BPE vocabulary and merges) */
};

/* Opens the tokenizer a deck names: "byte" (built in). Anything else: -1 with a message
 * (Hugging Face tokenizer.json files are not supported yet). */
int tokenizer_open(struct tokenizer *tok, const char *spec, char *err, size_t err_size);
void tokenizer_close(struct tokenizer *tok);

/* The fixed chat template above, written against any tokenizer's encode and special ids. */
int tokenizer_chat_template(const struct tokenizer *tok, const struct chat_message *messages,
                            int n_messages, struct token_buffer *out, char *err, size_t err_size);

/* One conversation, through tok->format_chat. */
static inline int tokenizer_format_chat(const struct tokenizer *tok,
                                        const struct chat_message *messages, int n_messages,
                                        struct token_buffer *out, char *err, size_t err_size)
{
    return tok->format_chat(tok, messages, n_messages, out, err, err_size);
}

/* One plain document: BOS, text, EOS; loss 1 on the text's tokens and on EOS. */
int tokenizer_format_text(const struct tokenizer *tok, const char *text, size_t length,
                          struct token_buffer *out, char *err, size_t err_size);

/* Checks that `length` bytes are well-formed UTF-8. Returns true, or false with the byte
 * offset of the first bad sequence in *bad_offset (may be NULL). */
bool utf8_valid(const char *text, size_t length, size_t *bad_offset);

#endif
