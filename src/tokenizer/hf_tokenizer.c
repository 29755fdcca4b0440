/* hf_tokenizer: encoding and decoding with a loaded tokenizer.json, in the library's
 * order: added tokens on the raw text, normalizer, added tokens on the normalized text,
 * pre-tokenizer, BPE, post-processor; decoding through the decoders' decode_chain, one list
 * of token strings handed from step to step as the library does; and the text the tokens
 * spell (hf_tokenizer_normalize, hf_tokenizer_token_ends) for the loss masks. */
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

/* One piece of normalized text between added tokens through the pre-tokenizer; its words
 * are appended to `words` (value -1). `first`: the piece begins the input. */
static void pre_tokenize_piece(const struct hf_tokenizer *tok, const char *text, size_t n,
                               bool first, struct hf_pieces *a, struct hf_pieces *b,
                               struct hf_pieces *words)
{
    if (!n) return;
    a->text.n = 0;
    a->spans.n = 0;
    hf_string_append(&a->text, text, n);
    hf_spans_push(&a->spans, 0, n, first);
    const struct hf_pieces *from = a;
    if (tok->pre_tokenizer) {
        hf_pre_tokenize(tok->pre_tokenizer, a, b);
        from = b;
    }
    for (size_t i = 0; i < from->spans.n; i++) {
        size_t at = words->text.n;
        hf_string_append(&words->text, from->text.data + from->spans.start[i],
                         from->spans.end[i] - from->spans.start[i]);
        hf_spans_push(&words->spans, at, words->text.n, -1);
    }
}

/* The library's encode up to the model: the words the model sees, in order, in `words`
 * (cleared first). A span's value is an added token's id (its text: the text it matched,
 * white space taken by lstrip/rstrip included) or -1 for a pre-tokenized word. Returns 0,
 * or -1 with err. */
static int split_words(const struct hf_tokenizer *tok, const char *text, size_t length,
                       struct hf_pieces *words, char *err, size_t err_size)
{
    struct hf_string clean = {0}, normalized = {0};
    struct hf_spans raw = {0}, inner = {0};
    struct hf_pieces a = {0}, b = {0};
    int rc = 0;
    words->text.n = 0;
    words->spans.n = 0;
    hf_string_append(&words->text, "", 0);
    hf_utf8_replace_invalid(text, length, &clean);
    hf_added_split(&tok->raw_set, tok->added, clean.data, clean.n, &raw);
    for (size_t i = 0; i < raw.n && rc == 0; i++) {
        const char *piece = clean.data + raw.start[i];
        size_t n = raw.end[i] - raw.start[i], at = words->text.n;
        if (raw.value[i] >= 0) {
            hf_string_append(&words->text, piece, n);
            hf_spans_push(&words->spans, at, words->text.n, raw.value[i]);
            continue;
        }
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
            const char *part = normalized.data + inner.start[k];
            size_t part_length = inner.end[k] - inner.start[k];
            if (inner.value[k] >= 0) {
                at = words->text.n;
                hf_string_append(&words->text, part, part_length);
                hf_spans_push(&words->spans, at, words->text.n, inner.value[k]);
            } else {
                /* the library's offsets_original().0 == 0 */
                bool first = raw.start[i] == 0 && inner.start[k] == 0;
                pre_tokenize_piece(tok, part, part_length, first, &a, &b, words);
            }
        }
    }
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

int hf_tokenizer_encode(const struct hf_tokenizer *tok, const char *text, size_t length,
                        bool add_special_tokens, struct hf_ids *out, char *err, size_t err_size)
{
    size_t from = out->n;
    struct hf_pieces words = {0};
    int rc = split_words(tok, text, length, &words, err, err_size);
    for (size_t i = 0; i < words.spans.n && rc == 0; i++) {
        if (words.spans.value[i] >= 0)
            hf_ids_push(out, (uint32_t)words.spans.value[i]);
        else
            hf_bpe_encode(&tok->bpe, words.text.data + words.spans.start[i],
                          words.spans.end[i] - words.spans.start[i], out);
    }
    if (rc == 0 && add_special_tokens && tok->post_processor)
        post_process(tok->post_processor, out, from);
    if (rc) out->n = from;
    hf_string_free(&words.text);
    hf_spans_free(&words.spans);
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

/* ---- decoding ---- */

/* A list of token strings, the unit the library's decoders work on (decode_chain). */
struct token_list {
    struct hf_string text;
    size_t *end; /* [n]: token i is text.data[end[i - 1], end[i]), end[-1] = 0 */
    size_t n, capacity;
};

static void list_push(struct token_list *l, const char *s, size_t n)
{
    if (l->n == l->capacity) {
        l->capacity = l->capacity ? 2 * l->capacity : 64;
        l->end = hf_realloc(l->end, l->capacity * sizeof *l->end);
    }
    hf_string_append(&l->text, s, n);
    l->end[l->n++] = l->text.n;
}

static const char *list_token(const struct token_list *l, size_t i, size_t *length)
{
    size_t begin = i ? l->end[i - 1] : 0;
    *length = l->end[i] - begin;
    return l->text.data + begin;
}

static void list_clear(struct token_list *l)
{
    l->text.n = 0;
    l->n = 0;
}

static void list_free(struct token_list *l)
{
    hf_string_free(&l->text);
    free(l->end);
}

/* ByteLevel's decoder: a token whose characters are all in the byte map gives those
 * bytes, any other token its own text. */
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

/* The byte of a byte-fallback token "<0xNN>", or -1 (the library's test: 6 bytes, "<0x",
 * two characters u8::from_str_radix reads in base 16, which takes either case and a
 * leading '+', then ">"). */
static int fallback_byte(const char *t, size_t n)
{
    if (n != 6 || memcmp(t, "<0x", 3) || t[5] != '>') return -1;
    int digit[2];
    for (int k = 0; k < 2; k++) {
        char c = t[3 + k];
        digit[k] = c >= '0' && c <= '9'   ? c - '0'
                   : c >= 'a' && c <= 'f' ? c - 'a' + 10
                   : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                          : -1;
    }
    if (t[3] == '+') return digit[1];
    return digit[0] < 0 || digit[1] < 0 ? -1 : digit[0] * 16 + digit[1];
}

static bool valid_utf8(const char *text, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t len = hf_utf8_valid_length((const unsigned char *)text + i, n - i);
        if (!len) return false;
        i += len;
    }
    return true;
}

/* Every match of a Replace pattern in text[0, n) replaced, appended to out. */
static void replace_all(const struct hf_pattern *pattern, const char *content,
                        size_t content_length, const char *text, size_t n, struct hf_string *out)
{
    struct hf_spans spans = {0};
    hf_pattern_find(pattern, text, n, &spans);
    for (size_t i = 0; i < spans.n; i++) {
        if (spans.value[i])
            hf_string_append(out, content, content_length);
        else
            hf_string_append(out, text + spans.start[i], spans.end[i] - spans.start[i]);
    }
    hf_spans_free(&spans);
}

/* Each replacement character of text[0, n) as a space, or dropped; appended to out. */
static void metaspace_spaces(const struct hf_pattern *rep, bool drop, const char *text, size_t n,
                             struct hf_string *out)
{
    size_t r = rep->literal_length;
    for (size_t i = 0; i < n;) {
        if (n - i >= r && !memcmp(text + i, rep->literal, r)) {
            if (!drop) hf_string_append(out, " ", 1);
            i += r;
        } else {
            hf_string_append(out, text + i, 1);
            i++;
        }
    }
}

/* ByteFallback: a run of byte tokens becomes its bytes as one token when they are UTF-8,
 * else one U+FFFD per byte token (tokenizers/src/decoders/byte_fallback.rs). */
static void flush_bytes(struct hf_string *run, struct token_list *out)
{
    if (!run->n) return;
    if (valid_utf8(run->data, run->n))
        list_push(out, run->data, run->n);
    else
        for (size_t k = 0; k < run->n; k++) list_push(out, "\xEF\xBF\xBD", 3);
    run->n = 0;
}

/* Strip: up to strip_start leading and strip_stop trailing characters equal to strip_char
 * (tokenizers/src/decoders/strip.rs; the trailing count never reaches past the cut). */
static void strip_token(const struct hf_decoder *dec, const char *t, size_t n,
                        struct token_list *out)
{
    size_t begin = 0, cut = 0, chars = 0;
    for (size_t i = 0; i < n; i++) chars += ((unsigned char)t[i] & 0xC0) != 0x80;
    while (cut < dec->strip_start && begin < n) {
        int32_t c;
        size_t len = hf_utf8_decode(t + begin, &c);
        if (c != dec->strip_char) break;
        begin += len;
        cut++;
    }
    size_t stop = n;
    for (size_t k = 0; k < dec->strip_stop && k < chars - cut; k++) {
        size_t p = stop - 1;
        while (p > 0 && ((unsigned char)t[p] & 0xC0) == 0x80) p--;
        int32_t c;
        hf_utf8_decode(t + p, &c);
        if (c != dec->strip_char) break;
        stop = p;
    }
    list_push(out, t + begin, stop - begin);
}

static void byte_fallback_step(const struct token_list *in, struct token_list *out)
{
    struct hf_string run = {0};
    for (size_t i = 0; i < in->n; i++) {
        size_t n;
        const char *t = list_token(in, i, &n);
        int b = fallback_byte(t, n);
        if (b >= 0) {
            char byte = (char)b;
            hf_string_append(&run, &byte, 1);
            continue;
        }
        flush_bytes(&run, out);
        list_push(out, t, n);
    }
    flush_bytes(&run, out);
    hf_string_free(&run);
}

/* ByteLevel (each token's bytes) and Fuse (each token's text) join the tokens into one;
 * ByteLevel then reads the bytes as UTF-8 with U+FFFD (Rust's from_utf8_lossy). */
static void join_step(bool byte_level, const struct token_list *in, struct token_list *out)
{
    struct hf_string joined = {0}, lossy = {0};
    hf_string_append(&joined, "", 0);
    hf_string_append(&lossy, "", 0);
    for (size_t i = 0; i < in->n; i++) {
        size_t n;
        const char *t = list_token(in, i, &n);
        if (byte_level)
            byte_level_token(t, n, &joined);
        else
            hf_string_append(&joined, t, n);
    }
    hf_utf8_replace_invalid(joined.data, joined.n, &lossy);
    list_push(out, lossy.data, lossy.n);
    hf_string_free(&joined);
    hf_string_free(&lossy);
}

/* One decoder's decode_chain on *list; *spare is scratch (the two may be swapped). */
static void decode_chain(const struct hf_decoder *dec, struct token_list **list,
                         struct token_list **spare)
{
    if (dec->kind == HF_DECODER_SEQUENCE) {
        for (int i = 0; i < dec->n_steps; i++) decode_chain(&dec->steps[i], list, spare);
        return;
    }
    const struct token_list *in = *list;
    struct token_list *out = *spare;
    struct hf_string s = {0};
    list_clear(out);
    hf_string_append(&s, "", 0);
    switch (dec->kind) {
    case HF_DECODER_BYTE_LEVEL:
    case HF_DECODER_FUSE:
        join_step(dec->kind == HF_DECODER_BYTE_LEVEL, in, out);
        break;
    case HF_DECODER_BYTE_FALLBACK:
        byte_fallback_step(in, out);
        break;
    case HF_DECODER_REPLACE:
    case HF_DECODER_STRIP:
    case HF_DECODER_METASPACE:
        for (size_t i = 0; i < in->n; i++) {
            size_t n;
            const char *t = list_token(in, i, &n);
            s.n = 0;
            if (dec->kind == HF_DECODER_STRIP) {
                strip_token(dec, t, n, out);
                continue;
            }
            if (dec->kind == HF_DECODER_REPLACE)
                replace_all(&dec->pattern, dec->content, dec->content_length, t, n, &s);
            else /* the first token loses its replacements unless prepend_scheme is "never"
                  * (tokenizers/src/pre_tokenizers/metaspace.rs, decode_chain) */
                metaspace_spaces(&dec->pattern, i == 0 && dec->prepend_scheme != HF_PREPEND_NEVER,
                                 t, n, &s);
            list_push(out, s.data, s.n);
        }
        break;
    case HF_DECODER_SEQUENCE:
        break;
    }
    hf_string_free(&s);
    *spare = *list;
    *list = out;
}

/* What a model token (whole_token) or a pre-tokenized word stands for in the text: the
 * decoder's steps that map each token on its own (ByteLevel's bytes, Replace, a byte
 * token "<0xNN>" as its byte, Metaspace's replacement as a space), before UTF-8 repair and
 * without the steps that join or trim the whole text (Fuse, Strip, Metaspace dropping the
 * first token's replacements). Appends to out. */
static void spell(const struct hf_decoder *dec, const char *text, size_t n, bool whole_token,
                  struct hf_string *out)
{
    if (!dec) {
        hf_string_append(out, text, n);
        return;
    }
    switch (dec->kind) {
    case HF_DECODER_SEQUENCE: {
        struct hf_string a = {0}, b = {0};
        hf_string_append(&a, text, n);
        for (int i = 0; i < dec->n_steps; i++) {
            b.n = 0;
            spell(&dec->steps[i], a.data, a.n, whole_token, &b);
            hf_string_swap(&a, &b);
        }
        hf_string_append(out, a.data, a.n);
        hf_string_free(&a);
        hf_string_free(&b);
        return;
    }
    case HF_DECODER_BYTE_LEVEL:
        byte_level_token(text, n, out);
        return;
    case HF_DECODER_REPLACE:
        replace_all(&dec->pattern, dec->content, dec->content_length, text, n, out);
        return;
    case HF_DECODER_BYTE_FALLBACK: {
        int b = whole_token ? fallback_byte(text, n) : -1;
        if (b >= 0) {
            char byte = (char)b;
            hf_string_append(out, &byte, 1);
        } else
            hf_string_append(out, text, n);
        return;
    }
    case HF_DECODER_METASPACE:
        metaspace_spaces(&dec->pattern, false, text, n, out);
        return;
    case HF_DECODER_FUSE:
    case HF_DECODER_STRIP:
        hf_string_append(out, text, n);
        return;
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
        if (added_by_id(tok, ids[i]))
            hf_string_append(&bytes, token, len); /* as hf_tokenizer_normalize keeps it */
        else
            spell(tok->decoder, token, len, true, &bytes);
        total += bytes.n;
        ends[i] = total;
    }
    hf_string_free(&bytes);
    return rc;
}

char *hf_tokenizer_normalize(const struct hf_tokenizer *tok, const char *text, size_t length,
                             size_t *out_length, char *err, size_t err_size)
{
    struct hf_pieces words = {0};
    struct hf_string out = {0};
    int rc = split_words(tok, text, length, &words, err, err_size);
    hf_string_append(&out, "", 0);
    for (size_t i = 0; i < words.spans.n && rc == 0; i++) {
        const char *word = words.text.data + words.spans.start[i];
        size_t n = words.spans.end[i] - words.spans.start[i];
        if (words.spans.value[i] >= 0)
            hf_string_append(&out, word, n);
        else
            spell(tok->decoder, word, n, false, &out);
    }
    hf_string_free(&words.text);
    hf_spans_free(&words.spans);
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
    struct token_list a = {0}, b = {0}, *list = &a, *spare = &b;
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *token = hf_tokenizer_id_to_token(tok, ids[i], &len);
        if (!token) continue;
        /* special is decided by the token's text, as the library does */
        if (skip_special_tokens && hf_string_map_get(&tok->special_contents, token, len) >= 0)
            continue;
        list_push(&a, token, len);
    }
    struct hf_string bytes = {0}, text = {0};
    hf_string_append(&bytes, "", 0);
    hf_string_append(&text, "", 0);
    if (tok->decoder) decode_chain(tok->decoder, &list, &spare);
    for (size_t i = 0; i < list->n; i++) {
        size_t len;
        const char *t = list_token(list, i, &len);
        /* no decoder: the library joins the tokens with spaces */
        if (!tok->decoder && i > 0) hf_string_append(&bytes, " ", 1);
        hf_string_append(&bytes, t, len);
    }
    hf_utf8_replace_invalid(bytes.data, bytes.n, &text);
    hf_string_free(&bytes);
    list_free(&a);
    list_free(&b);
    *length = text.n;
    return text.data;
}
