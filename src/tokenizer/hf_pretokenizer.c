/* hf_pretokenizer: the pre-tokenizers of tokenizer.json: Split (a regex or string, every
 * behavior, invert), ByteLevel (add_prefix_space, the GPT-2 regex when use_regex, then
 * each byte as its printable character), Digits, Metaspace (SentencePiece's spaces, every
 * prepend_scheme, split or not) and Sequence. Each applies to every piece the previous
 * stage left; empty pieces are dropped, as the library drops them. */
#include <stdlib.h>
#include <string.h>

#include "hf_internal.h"

/* GPT-2's byte map: the printable bytes 33-126, 161-172 and 174-255 stand for themselves;
 * the other 68 bytes, in order, become U+0100 to U+0143. */
static int32_t byte_codepoint(unsigned char b)
{
    if (b <= 32) return 256 + b;
    if (b >= 127 && b <= 160) return 256 + 33 + (b - 127);
    if (b == 173) return 256 + 33 + 34;
    return b;
}

int hf_byte_level_byte(int32_t c)
{
    if ((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255)) return c;
    if (c >= 256 && c <= 288) return c - 256;
    if (c >= 289 && c <= 322) return c - 289 + 127;
    if (c == 323) return 173;
    return -1;
}

const char *hf_byte_level_char(unsigned char byte, size_t *length)
{
    static char table[256][2];
    static size_t lengths[256];
    static int ready;
    if (!ready) {
        for (int b = 0; b < 256; b++) {
            int32_t c = byte_codepoint((unsigned char)b);
            if (c < 0x80) {
                table[b][0] = (char)c;
                lengths[b] = 1;
            } else {
                table[b][0] = (char)(0xC0 | (c >> 6));
                table[b][1] = (char)(0x80 | (c & 0x3F));
                lengths[b] = 2;
            }
        }
        ready = 1;
    }
    *length = lengths[byte];
    return table[byte];
}

/* `first`: the piece begins at the start of the input (see struct hf_pieces). */
static void push_piece(struct hf_pieces *out, const char *text, size_t n, bool first)
{
    if (!n) return;
    size_t at = out->text.n;
    hf_string_append(&out->text, text, n);
    hf_spans_push(&out->spans, at, at + n, first);
}

static void push_byte_level(struct hf_pieces *out, const char *text, size_t n, bool first)
{
    if (!n) return;
    size_t at = out->text.n;
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *c = hf_byte_level_char((unsigned char)text[i], &len);
        hf_string_append(&out->text, c, len);
    }
    hf_spans_push(&out->spans, at, out->text.n, first);
}

/* The library's split with a behavior: `m` covers the text, value 1 on matches. Writes
 * the resulting offsets back into m (value unused) and returns their count. */

/* Left-to-right folding of pieces: a piece joins the one before it when it is a match
 * following a non-match (MergedWithPrevious), or of the same kind (Contiguous). */
static size_t fold_forward(struct hf_spans *m, bool contiguous)
{
    size_t n = 0;
    bool previous_match = false;
    for (size_t i = 0; i < m->n; i++) {
        bool match = m->value[i] != 0;
        bool joins = contiguous ? match == previous_match : match && !previous_match;
        if (joins && n > 0)
            m->end[n - 1] = m->end[i];
        else {
            m->start[n] = m->start[i];
            m->end[n++] = m->end[i];
        }
        previous_match = match;
    }
    return n;
}

static size_t apply_behavior(struct hf_spans *m, enum hf_split_behavior behavior, bool invert)
{
    size_t n = 0;
    if (invert)
        for (size_t i = 0; i < m->n; i++) m->value[i] = !m->value[i];
    switch (behavior) {
    case HF_REMOVED:
        for (size_t i = 0; i < m->n; i++)
            if (!m->value[i]) {
                m->start[n] = m->start[i];
                m->end[n++] = m->end[i];
            }
        return n;
    case HF_ISOLATED:
        return m->n;
    case HF_MERGED_WITH_PREVIOUS:
        return fold_forward(m, false);
    case HF_MERGED_WITH_NEXT: {
        /* the same fold from the right: a match joins the piece that follows it */
        bool previous_match = false;
        size_t k = m->n; /* pieces are built at the top of the arrays, downwards */
        for (size_t i = m->n; i-- > 0;) {
            bool match = m->value[i] != 0;
            if (match && !previous_match && k < m->n)
                m->start[k] = m->start[i];
            else {
                k--;
                m->start[k] = m->start[i];
                m->end[k] = m->end[i];
            }
            previous_match = match;
        }
        n = m->n - k;
        memmove(m->start, m->start + k, n * sizeof *m->start);
        memmove(m->end, m->end + k, n * sizeof *m->end);
        return n;
    }
    case HF_CONTIGUOUS:
        return fold_forward(m, true);
    }
    return n;
}

/* Only a part that begins where its piece begins can begin the input: a removed match in
 * front moves the part's start in the original text too. */
static void split_piece(const struct hf_pattern *pattern, enum hf_split_behavior behavior,
                        bool invert, bool byte_level, const char *text, size_t n, bool first,
                        struct hf_pieces *out)
{
    struct hf_spans m = {0};
    hf_pattern_find(pattern, text, n, &m);
    size_t count = apply_behavior(&m, behavior, invert);
    for (size_t i = 0; i < count; i++) {
        bool at_start = first && m.start[i] == 0;
        if (byte_level)
            push_byte_level(out, text + m.start[i], m.end[i] - m.start[i], at_start);
        else
            push_piece(out, text + m.start[i], m.end[i] - m.start[i], at_start);
    }
    hf_spans_free(&m);
}

/* Metaspace (tokenizers/src/pre_tokenizers/metaspace.rs): every space becomes the
 * replacement; the replacement goes in front of a piece that does not start with it
 * (prepend_scheme "always"; "first": only if the piece begins the input, so not the text
 * after an added token; "never": not at all); with split, the piece is then cut before
 * each replacement (MergedWithNext: "▁a▁▁b" -> "▁a", "▁", "▁b"). Writes the rewritten
 * piece into `scratch`. */
static void metaspace_piece(const struct hf_pre_tokenizer *pt, const char *text, size_t n,
                            bool first, struct hf_string *scratch, struct hf_pieces *out)
{
    const char *rep = pt->pattern.literal;
    size_t rep_length = pt->pattern.literal_length;
    scratch->n = 0;
    /* whether the piece starts with the replacement once its spaces are replaced */
    bool starts = n > 0 && (text[0] == ' ' || (n >= rep_length && !memcmp(text, rep, rep_length)));
    bool prepend = pt->prepend_scheme == HF_PREPEND_ALWAYS ||
                   (pt->prepend_scheme == HF_PREPEND_FIRST && first);
    /* the library's NormalizedString::prepend leaves an empty text alone */
    if (prepend && n > 0 && !starts) hf_string_append(scratch, rep, rep_length);
    for (size_t i = 0; i < n;) {
        size_t k = i;
        while (k < n && text[k] != ' ') k++;
        hf_string_append(scratch, text + i, k - i);
        if (k < n) hf_string_append(scratch, rep, rep_length);
        i = k + 1;
    }
    if (pt->split)
        split_piece(&pt->pattern, HF_MERGED_WITH_NEXT, false, false, scratch->data, scratch->n,
                    first, out);
    else
        push_piece(out, scratch->data, scratch->n, first);
}

static void pre_tokenize_piece(const struct hf_pre_tokenizer *pt, const char *text, size_t n,
                               bool first, struct hf_string *scratch, struct hf_pieces *out)
{
    switch (pt->kind) {
    case HF_PRE_SPLIT:
    case HF_PRE_DIGITS:
        split_piece(&pt->pattern, pt->behavior, pt->invert, false, text, n, first, out);
        return;
    case HF_PRE_METASPACE:
        metaspace_piece(pt, text, n, first, scratch, out);
        return;
    case HF_PRE_BYTE_LEVEL: {
        struct hf_string prefixed = {0};
        if (pt->add_prefix_space && (n == 0 || text[0] != ' ')) {
            hf_string_append(&prefixed, " ", 1);
            hf_string_append(&prefixed, text, n);
            text = prefixed.data;
            n = prefixed.n;
        }
        if (pt->use_regex)
            split_piece(&pt->pattern, HF_ISOLATED, false, true, text, n, first, out);
        else
            push_byte_level(out, text, n, first);
        hf_string_free(&prefixed);
        return;
    }
    case HF_PRE_SEQUENCE:
        break;
    }
}

static void clear(struct hf_pieces *p)
{
    p->text.n = 0;
    p->spans.n = 0;
}

void hf_pre_tokenize(const struct hf_pre_tokenizer *pt, const struct hf_pieces *in,
                     struct hf_pieces *out)
{
    clear(out);
    if (pt->kind != HF_PRE_SEQUENCE) {
        struct hf_string scratch = {0};
        for (size_t i = 0; i < in->spans.n; i++)
            pre_tokenize_piece(pt, in->text.data + in->spans.start[i],
                               in->spans.end[i] - in->spans.start[i], in->spans.value[i] != 0,
                               &scratch, out);
        hf_string_free(&scratch);
        return;
    }
    /* Sequence: each step on all the pieces the step before left */
    struct hf_pieces a = {0}, b = {0};
    const struct hf_pieces *from = in;
    for (int s = 0; s < pt->n_steps; s++) {
        struct hf_pieces *to = from == &a ? &b : &a;
        hf_pre_tokenize(&pt->steps[s], from, to);
        from = to;
    }
    for (size_t i = 0; i < from->spans.n; i++)
        push_piece(out, from->text.data + from->spans.start[i],
                   from->spans.end[i] - from->spans.start[i], from->spans.value[i] != 0);
    hf_string_free(&a.text);
    hf_spans_free(&a.spans);
    hf_string_free(&b.text);
    hf_spans_free(&b.spans);
}

void hf_pre_tokenizer_free(struct hf_pre_tokenizer *pt)
{
    if (!pt) return;
    hf_pattern_free(&pt->pattern);
    for (int i = 0; i < pt->n_steps; i++) hf_pre_tokenizer_free(&pt->steps[i]);
    free(pt->steps);
    pt->steps = NULL;
    pt->n_steps = 0;
}
