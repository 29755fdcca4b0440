/* hf_added: the added-token split, the first stage of encoding. The library scans the raw
 * text for the added tokens with normalized=false, then each normalized piece between them
 * for those with normalized=true (their content normalized first): leftmost match, the
 * longest at that position, matches not overlapping. lstrip/rstrip take the white space
 * beside a match into it; single_word drops a match with a word character against it. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "hf_internal.h"

static const struct hf_added_token *sort_tokens;

static int longest_first(const void *a, const void *b)
{
    const struct hf_added_token *x = &sort_tokens[*(const int *)a];
    const struct hf_added_token *y = &sort_tokens[*(const int *)b];
    unsigned char fx = (unsigned char)x->content[0], fy = (unsigned char)y->content[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (x->length != y->length) return x->length > y->length ? -1 : 1;
    return *(const int *)a - *(const int *)b;
}

void hf_added_set_build(struct hf_added_set *set, const struct hf_added_token *tokens, int n_tokens,
                        bool normalized)
{
    set->order = hf_realloc(NULL, (size_t)(n_tokens + 1) * sizeof *set->order);
    int n = 0;
    for (int i = 0; i < n_tokens; i++)
        if (tokens[i].normalized == normalized && tokens[i].length > 0) set->order[n++] = i;
    sort_tokens = tokens;
    qsort(set->order, (size_t)n, sizeof *set->order, longest_first);
    int k = 0;
    for (int b = 0; b < 256; b++) {
        set->first[b] = k;
        while (k < n && (unsigned char)tokens[set->order[k]].content[0] == b) k++;
    }
    set->first[256] = n;
}

void hf_added_set_free(struct hf_added_set *set)
{
    free(set->order);
    set->order = NULL;
}

/* Rust's regex \s (White_Space) and \w (alphabetic, marks, decimal digits, connector
 * punctuation, joiners), as the library's single_word and strip rules use them. */
static bool is_space(int32_t c)
{
    if ((c >= 9 && c <= 13) || c == 0x85) return true;
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ZS || k == UTF8PROC_CATEGORY_ZL || k == UTF8PROC_CATEGORY_ZP;
}

static bool is_word(int32_t c)
{
    if (c == 0x200C || c == 0x200D) return true;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

/* The start of the character that ends text[0, n). */
static size_t last_char_start(const char *text, size_t n)
{
    size_t i = n - 1;
    while (i > 0 && ((unsigned char)text[i] & 0xC0) == 0x80) i--;
    return i;
}

static bool match_at(const struct hf_added_set *set, const struct hf_added_token *tokens,
                     const char *text, size_t n, size_t at, int *which)
{
    unsigned char b = (unsigned char)text[at];
    for (int k = set->first[b]; k < set->first[b + 1]; k++) {
        const struct hf_added_token *t = &tokens[set->order[k]];
        if (t->length <= n - at && !memcmp(text + at, t->content, t->length)) {
            *which = set->order[k];
            return true;
        }
    }
    return false;
}

void hf_added_split(const struct hf_added_set *set, const struct hf_added_token *tokens,
                    const char *text, size_t n, struct hf_spans *out)
{
    size_t done = 0; /* text before this is in out */
    size_t at = 0;
    while (at < n) {
        int which;
        if (!match_at(set, tokens, text, n, at, &which)) {
            at++;
            continue;
        }
        const struct hf_added_token *t = &tokens[which];
        size_t start = at, stop = at + t->length;
        at = stop;
        if (t->single_word) {
            int32_t c;
            bool word_before =
                start > 0 && (hf_utf8_decode(text + last_char_start(text, start), &c), is_word(c));
            bool word_after = stop < n && (hf_utf8_decode(text + stop, &c), is_word(c));
            if (word_before || word_after) continue;
        }
        if (t->lstrip) {
            size_t s = start;
            while (s > 0) {
                int32_t c;
                size_t p = last_char_start(text, s);
                hf_utf8_decode(text + p, &c);
                if (!is_space(c)) break;
                s = p;
            }
            start = s > done ? s : done;
        }
        if (t->rstrip) {
            while (stop < n) {
                int32_t c;
                size_t len = hf_utf8_decode(text + stop, &c);
                if (!is_space(c)) break;
                stop += len;
            }
            at = stop;
        }
        if (done < start) hf_spans_push(out, done, start, -1);
        hf_spans_push(out, start, stop, t->id);
        done = stop;
    }
    if (done != n || n == 0) hf_spans_push(out, done, n, -1);
}
