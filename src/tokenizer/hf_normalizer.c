/* hf_normalizer: the normalizers of tokenizer.json that the byte-level BPE families use:
 * NFC (utf8proc, held to the library's Unicode 9.0 tables), Prepend (its text before a non-empty
 * piece), Replace (every match of a string or regex), and Sequence (each in turn). Each piece
 * between added tokens is normalized on its own, as the library does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "hf_internal.h"

static int nfc_run(const char *text, size_t n, struct hf_string *out, char *err, size_t err_size)
{
    if (!n) return 0;
    utf8proc_uint8_t *composed = NULL;
    utf8proc_ssize_t len = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)n,
                                        &composed, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (len < 0) {
        snprintf(err, err_size, "NFC normalizer: %s", utf8proc_errmsg(len));
        return -1;
    }
    hf_string_append(out, (const char *)composed, (size_t)len);
    free(composed);
    return 0;
}

/* A character that utf8proc knows and Unicode 9.0 did not (U+0000-U+0377 all are 9.0). */
static bool newer_than_unicode9(int32_t c)
{
    return c >= 0x378 && !hf_assigned_in_unicode9(c) &&
           utf8proc_category(c) != UTF8PROC_CATEGORY_CN;
}

/* NFC as the library computes it, with Unicode 9.0 tables (unicode-normalization-
 * alignments 0.1.12): a character assigned later has combining class 0 and neither
 * decomposes nor composes there, so it stands alone, a boundary neither reordering nor
 * composition crosses. The runs between such characters are normalized by utf8proc, whose
 * newer tables agree with 9.0 on every character 9.0 had (Unicode's stability policy). */
static int nfc_unicode9(const char *text, size_t n, struct hf_string *out, char *err,
                        size_t err_size)
{
    size_t run = 0;
    for (size_t i = 0; i < n;) {
        if ((unsigned char)text[i] < 0x80) {
            i++;
            continue;
        }
        int32_t c;
        size_t len = hf_utf8_decode(text + i, &c);
        if (newer_than_unicode9(c)) {
            if (nfc_run(text + run, i - run, out, err, err_size)) return -1;
            hf_string_append(out, text + i, len);
            run = i + len;
        }
        i += len;
    }
    return nfc_run(text + run, n - run, out, err, err_size);
}

static int normalize_step(const struct hf_normalizer *nm, const char *text, size_t n,
                          struct hf_string *out, char *err, size_t err_size)
{
    switch (nm->kind) {
    case HF_NORM_NFC:
        return nfc_unicode9(text, n, out, err, err_size);
    case HF_NORM_PREPEND:
        if (n) hf_string_append(out, nm->content, nm->content_length);
        hf_string_append(out, text, n);
        return 0;
    case HF_NORM_REPLACE: {
        struct hf_spans spans = {0};
        hf_pattern_find(&nm->pattern, text, n, &spans);
        for (size_t i = 0; i < spans.n; i++) {
            if (spans.value[i])
                hf_string_append(out, nm->content, nm->content_length);
            else
                hf_string_append(out, text + spans.start[i], spans.end[i] - spans.start[i]);
        }
        hf_spans_free(&spans);
        return 0;
    }
    case HF_NORM_SEQUENCE: {
        struct hf_string a = {0}, b = {0};
        hf_string_append(&a, text, n);
        for (int i = 0; i < nm->n_steps; i++) {
            b.n = 0;
            hf_string_append(&b, "", 0);
            if (normalize_step(&nm->steps[i], a.data, a.n, &b, err, err_size)) {
                hf_string_free(&a);
                hf_string_free(&b);
                return -1;
            }
            hf_string_swap(&a, &b);
        }
        hf_string_append(out, a.data, a.n);
        hf_string_free(&a);
        hf_string_free(&b);
        return 0;
    }
    }
    return 0;
}

int hf_normalize(const struct hf_normalizer *nm, const char *text, size_t n, struct hf_string *out,
                 char *err, size_t err_size)
{
    out->n = 0;
    hf_string_append(out, "", 0);
    return normalize_step(nm, text, n, out, err, err_size);
}

void hf_normalizer_free(struct hf_normalizer *nm)
{
    if (!nm) return;
    hf_pattern_free(&nm->pattern);
    for (int i = 0; i < nm->n_steps; i++) hf_normalizer_free(&nm->steps[i]);
    free(nm->steps);
    nm->steps = NULL;
    nm->n_steps = 0;
}
