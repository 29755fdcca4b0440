/* hf_tokenizer: encoding and decoding with a loaded tokenizer.json, in the library's
 * order: added tokens on the raw text, normalizer, added tokens on the normalized text,
 * pre-tokenizer, BPE, post-processor; decoding through the ByteLevel decoder. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_internal.h"

/* The post-processor's special tokens around the encoded text (ByteLevel adds none). */
static void post_process(const struct hf_post_processor *pp, struct hf_ids *ids, size_t from)
{
    if (pp->kind == HF_POST_SEQUENCE) {
        for (int i = 0; i < pp->n_steps; i++) post_process(&pp->steps[i], ids, from);
        return;
    }
    if (pp->kind != HF_POST_TEMPLATE) return;
    size_t body = ids->n - from;
    for (size_t i = 0; i < pp->n_before; i++) hf_ids_push(ids, 0);
    memmove(ids->ids + from + pp->n_before, ids->ids + from, body * sizeof *ids->ids);
    memcpy(ids->ids + from, pp->before, pp->n_before * sizeof *ids->ids);
    for (size_t i = 0; i < pp->n_after; i++) hf_ids_push(ids, pp->after[i]);
}

/* One piece of normalized text between added tokens: pre-tokenizer, then BPE. */
static void encode_piece(const struct hf_tokenizer *tok, const char *text, size_t n,
                         struct hf_pieces *a, struct hf_pieces *b, struct hf_ids *out)
{
    if (!n) return;
    a->text.n = 0;
    a->spans.n = 0;
    hf_string_append(&a->text, text, n);
    hf_spans_push(&a->spans, 0, n, 0);
    const struct hf_pieces *words = a;
    if (tok->pre_tokenizer) {
        hf_pre_tokenize(tok->pre_tokenizer, a, b);
        words = b;
    }
    for (size_t i = 0; i < words->spans.n; i++)
        hf_bpe_encode(&tok->bpe, words->text.data + words->spans.start[i],
                      words->spans.end[i] - words->spans.start[i], out);
}

int hf_tokenizer_encode(const struct hf_tokenizer *tok, const char *text, size_t length,
                        bool add_special_tokens, struct hf_ids *out, char *err, size_t err_size)
{
    size_t from = out->n;
    struct hf_string clean = {0}, normalized = {0};
    struct hf_spans raw = {0}, inner = {0};
    struct hf_pieces a = {0}, b = {0};
    int rc = 0;
    hf_utf8_replace_invalid(text, length, &clean);
    hf_added_split(&tok->raw_set, tok->added, clean.data, clean.n, &raw);
    for (size_t i = 0; i < raw.n && rc == 0; i++) {
        if (raw.value[i] >= 0) {
            hf_ids_push(out, (uint32_t)raw.value[i]);
            continue;
        }
        const char *piece = clean.data + raw.start[i];
        size_t n = raw.end[i] - raw.start[i];
        if (!n) continue;
        if (tok->normalizer) {
            if (hf_normalize(tok->normalizer, piece, n, &normalized, err, err_size)) {
                rc = -1;
                break;
            }
        } else {
            normalized.n = 0;
            hf_string_append(&normalized, piece, n);
        }
        inner.n = 0;
        hf_added_split(&tok->normalized_set, tok->added, normalized.data, normalized.n, &inner);
        for (size_t k = 0; k < inner.n; k++) {
            if (inner.value[k] >= 0)
                hf_ids_push(out, (uint32_t)inner.value[k]);
            else
                encode_piece(tok, normalized.data + inner.start[k], inner.end[k] - inner.start[k],
                             &a, &b, out);
        }
    }
    if (rc == 0 && add_special_tokens && tok->post_processor)
        post_process(tok->post_processor, out, from);
    if (rc) out->n = from;
    hf_string_free(&clean);
    hf_string_free(&normalized);
    hf_spans_free(&raw);
    hf_spans_free(&inner);
    hf_string_free(&a.text);
    hf_spans_free(&a.spans);
    hf_string_free(&b.text);
    hf_spans_free(&b.spans);
    return rc;
}

static const struct hf_added_token *added_by_id(const struct hf_tokenizer *tok, uint32_t id)
{
    if (id >= tok->vocab_size || tok->added_index[id] < 0) return NULL;
    return &tok->added[tok->added_index[id]];
}

const char *hf_tokenizer_id_to_token(const struct hf_tokenizer *tok, uint32_t id, size_t *length)
{
    const struct hf_added_token *t = added_by_id(tok, id);
    if (t) {
        /* the library gives a normalized token's normalized form here */
        *length = t->length;
        return t->content;
    }
    if (id < tok->bpe.n_ids && tok->bpe.id_text[id]) {
        *length = tok->bpe.id_length[id];
        return tok->bpe.id_text[id];
    }
    return NULL;
}

int64_t hf_tokenizer_token_to_id(const struct hf_tokenizer *tok, const char *token, size_t length)
{
    int64_t id = hf_string_map_get(&tok->added_by_content, token, length);
    return id >= 0 ? id : hf_string_map_get(&tok->bpe.vocab, token, length);
}

uint32_t hf_tokenizer_vocab_size(const struct hf_tokenizer *tok)
{
    return tok->vocab_size;
}

/* ByteLevel's decoder: a token whose characters are all in the byte map gives those
 * bytes, any other token its own text; the whole is then read as UTF-8 with U+FFFD for
 * what is not (Rust's from_utf8_lossy). */
static void byte_level_token(const char *text, size_t n, struct hf_string *bytes)
{
    size_t start = bytes->n;
    for (size_t i = 0; i < n;) {
        int32_t c;
        size_t len = hf_utf8_valid_length((const unsigned char *)text + i, n - i);
        int b = -1;
        if (len) {
            hf_utf8_decode(text + i, &c);
            b = hf_byte_level_byte(c);
        }
        if (b < 0) {
            bytes->n = start;
            hf_string_append(bytes, text, n);
            return;
        }
        char byte = (char)b;
        hf_string_append(bytes, &byte, 1);
        i += len;
    }
}

int hf_tokenizer_token_ends(const struct hf_tokenizer *tok, const uint32_t *ids, size_t n,
                            size_t *ends)
{
    struct hf_string bytes = {0};
    size_t total = 0;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        size_t len;
        const char *token = hf_tokenizer_id_to_token(tok, ids[i], &len);
        if (!token) {
            rc = -1;
            break;
        }
        bytes.n = 0;
        if (tok->decoder == HF_DECODER_BYTE_LEVEL)
            byte_level_token(token, len, &bytes);
        else
            hf_string_append(&bytes, token, len);
        total += bytes.n;
        ends[i] = total;
    }
    hf_string_free(&bytes);
    return rc;
}

char *hf_tokenizer_normalize(const struct hf_tokenizer *tok, const char *text, size_t length,
                             size_t *out_length, char *err, size_t err_size)
{
    struct hf_string clean = {0}, normalized = {0}, out = {0};
    struct hf_spans raw = {0};
    int rc = 0;
    hf_string_append(&out, "", 0);
    hf_utf8_replace_invalid(text, length, &clean);
    hf_added_split(&tok->raw_set, tok->added, clean.data, clean.n, &raw);
    for (size_t i = 0; i < raw.n && rc == 0; i++) {
        const char *piece = clean.data + raw.start[i];
        size_t n = raw.end[i] - raw.start[i];
        if (raw.value[i] >= 0 || !tok->normalizer) {
            hf_string_append(&out, piece, n);
        } else if (n) {
            rc = hf_normalize(tok->normalizer, piece, n, &normalized, err, err_size);
            if (rc == 0) hf_string_append(&out, normalized.data, normalized.n);
        }
    }
    hf_string_free(&clean);
    hf_string_free(&normalized);
    hf_spans_free(&raw);
    if (rc) {
        hf_string_free(&out);
        return NULL;
    }
    hf_string_append(&out, "", 1);
    *out_length = out.n - 1;
    return out.data;
}

char *hf_tokenizer_decode(const struct hf_tokenizer *tok, const uint32_t *ids, size_t n,
                          bool skip_special_tokens, size_t *length, char *err, size_t err_size)
{
    (void)err;
    (void)err_size;
    struct hf_string bytes = {0}, text = {0};
    hf_string_append(&bytes, "", 0);
    bool first = true;
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *token = hf_tokenizer_id_to_token(tok, ids[i], &len);
        if (!token) continue;
        /* special is decided by the token's text, as the library does */
        if (skip_special_tokens && hf_string_map_get(&tok->special_contents, token, len) >= 0)
            continue;
        if (tok->decoder == HF_DECODER_BYTE_LEVEL)
            byte_level_token(token, len, &bytes);
        else {
            /* no decoder: the library joins the tokens with spaces */
            if (!first) hf_string_append(&bytes, " ", 1);
            hf_string_append(&bytes, token, len);
        }
        first = false;
    }
    hf_string_append(&text, "", 0);
    hf_utf8_replace_invalid(bytes.data, bytes.n, &text);
    hf_string_free(&bytes);
    *length = text.n;
    return text.data;
}
