/* tokenizer: the built-in byte tokenizer and the fixed chat template (see tokenizer.h),
 * for the `prepare` phase. */
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

enum {
    BYTE_BEGIN_OF_TEXT = 256,
    BYTE_END_OF_TEXT = 257,
    BYTE_SYSTEM = 258,
    BYTE_USER = 259,
    BYTE_ASSISTANT = 260,
    BYTE_END_OF_TURN = 261,
    BYTE_VOCAB_SIZE = 262,
};

static void token_buffer_reserve(struct token_buffer *buf, size_t extra)
{
    if (buf->n + extra <= buf->capacity) return;
    size_t capacity = buf->capacity ? buf->capacity : 256;
    while (capacity < buf->n + extra) capacity *= 2;
    uint32_t *ids = realloc(buf->ids, capacity * sizeof *ids);
    if (!ids) fatal(EXIT_RUNTIME, "out of memory growing a token buffer to %zu tokens", capacity);
    buf->ids = ids;
    uint8_t *loss_mask = realloc(buf->loss_mask, capacity);
    if (!loss_mask)
        fatal(EXIT_RUNTIME, "out of memory growing a token buffer to %zu tokens", capacity);
    buf->loss_mask = loss_mask;
    buf->capacity = capacity;
}

void token_buffer_append(struct token_buffer *buf, uint32_t id, uint8_t loss)
{
    token_buffer_reserve(buf, 1);
    buf->ids[buf->n] = id;
    buf->loss_mask[buf->n] = loss;
    buf->n++;
}

void token_buffer_free(struct token_buffer *buf)
{
    free(buf->ids);
    free(buf->loss_mask);
    memset(buf, 0, sizeof *buf);
}

int chat_role_parse(const char *name, enum chat_role *role)
{
    if (strcmp(name, "system") == 0)
        *role = ROLE_SYSTEM;
    else if (strcmp(name, "user") == 0)
        *role = ROLE_USER;
    else if (strcmp(name, "assistant") == 0)
        *role = ROLE_ASSISTANT;
    else
        return -1;
    return 0;
}

/* RFC 3629, section 4: the well-formed byte sequences. The second byte's range depends
 * on the lead byte (E0: A0..BF excludes overlong forms, ED: 80..9F excludes the
 * surrogates D800..DFFF, F0: 90..BF overlong, F4: 80..8F caps at U+10FFFF); every later
 * byte is 80..BF. C0, C1 and F5..FF never appear. */
bool utf8_valid(const char *text, size_t length, size_t *bad_offset)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < length) {
        unsigned char c = s[i];
        size_t n;                           /* bytes in this sequence */
        unsigned char lo = 0x80, hi = 0xBF; /* range of the second byte */
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        bool ok = i + n <= length && s[i + 1] >= lo && s[i + 1] <= hi;
        for (size_t k = 2; ok && k < n; k++) ok = s[i + k] >= 0x80 && s[i + k] <= 0xBF;
        if (!ok) {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        i += n;
    }
    return true;
}

/* Byte tokenizer: each byte of the UTF-8 text is its own id. */
static int byte_encode(const struct tokenizer *tok, const char *text, size_t length, uint8_t loss,
                       struct token_buffer *out, char *err, size_t err_size)
{
    (void)tok;
    size_t bad;
    if (!utf8_valid(text, length, &bad)) {
        snprintf(err, err_size, "invalid UTF-8 at byte %zu of the text (0x%02x)", bad + 1,
                 (unsigned char)text[bad]);
        return -1;
    }
    token_buffer_reserve(out, length);
    for (size_t i = 0; i < length; i++) {
        out->ids[out->n + i] = (unsigned char)text[i];
        out->loss_mask[out->n + i] = loss;
    }
    out->n += length;
    return 0;
}

int tokenizer_chat_template(const struct tokenizer *tok, const struct chat_message *messages,
                            int n_messages, struct token_buffer *out, char *err, size_t err_size)
{
    size_t start = out->n;
    token_buffer_append(out, tok->begin_of_text, 0);
    for (int m = 0; m < n_messages; m++) {
        const struct chat_message *msg = &messages[m];
        uint8_t loss = msg->role == ROLE_ASSISTANT && !msg->no_loss;
        uint32_t role = msg->role == ROLE_SYSTEM ? tok->system
                        : msg->role == ROLE_USER ? tok->user
                                                 : tok->assistant;
        token_buffer_append(out, role, 0);
        char why[256];
        if (tok->encode(tok, msg->content, msg->length, loss, out, why, sizeof why) != 0) {
            snprintf(err, err_size, "message %d: %s", m + 1, why);
            out->n = start;
            return -1;
        }
        token_buffer_append(out, tok->end_of_turn, loss);
    }
    token_buffer_append(out, tok->end_of_text, 0);
    return 0;
}

int tokenizer_format_text(const struct tokenizer *tok, const char *text, size_t length,
                          struct token_buffer *out, char *err, size_t err_size)
{
    size_t start = out->n;
    token_buffer_append(out, tok->begin_of_text, 0);
    if (tok->encode(tok, text, length, 1, out, err, err_size) != 0) {
        out->n = start;
        return -1;
    }
    token_buffer_append(out, tok->end_of_text, 1);
    return 0;
}

int tokenizer_open(struct tokenizer *tok, const char *spec, char *err, size_t err_size)
{
    memset(tok, 0, sizeof *tok);
    if (!spec || strcmp(spec, "byte") != 0) {
        snprintf(err, err_size, "tokenizer '%s' is not supported yet; use byte", spec ? spec : "");
        return -1;
    }
    tok->name = "byte";
    tok->vocab_size = BYTE_VOCAB_SIZE;
    tok->begin_of_text = BYTE_BEGIN_OF_TEXT;
    tok->end_of_text = BYTE_END_OF_TEXT;
    tok->system = BYTE_SYSTEM;
    tok->user = BYTE_USER;
    tok->assistant = BYTE_ASSISTANT;
    tok->end_of_turn = BYTE_END_OF_TURN;
    tok->encode = byte_encode;
    tok->format_chat = tokenizer_chat_template;
    return 0;
}

void tokenizer_close(struct tokenizer *tok)
{
    memset(tok, 0, sizeof *tok);
}
