/* hf_pattern: what the Split and Digits pre-tokenizers and the Replace normalizer look
 * for: a regex, a literal string, or one numeric character at a time, each turned into
 * spans that cover the text (matches and the gaps between them), as the library's
 * Pattern::find_matches does.
 *
 * Regexes run on Oniguruma, the engine `tokenizers` itself uses (through the onig crate:
 * Regex::new, that is Oniguruma's default syntax (ONIG_SYNTAX_ONIGURUMA), UTF-8, no
 * options), so `(?i:...)`, `\p{L}`, `\p{N}` and `(?!\S)` mean what they mean there. */
#include <oniguruma.h>
#include <stdio.h>
#include <string.h>
#include <utf8proc.h>

#include "hf_internal.h"

static void onig_once(void)
{
    static int done;
    if (!done) {
        OnigEncoding encodings[1] = {ONIG_ENCODING_UTF8};
        onig_initialize(encodings, 1);
        done = 1;
    }
}

int hf_pattern_regex(struct hf_pattern *p, const char *regex, size_t length, char *err,
                     size_t err_size)
{
    onig_once();
    memset(p, 0, sizeof *p);
    p->kind = HF_PATTERN_REGEX;
    regex_t *re;
    OnigErrorInfo info;
    int rc = onig_new(&re, (const UChar *)regex, (const UChar *)regex + length, ONIG_OPTION_NONE,
                      ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
    if (rc != ONIG_NORMAL) {
        UChar message[ONIG_MAX_ERROR_MESSAGE_LEN];
        onig_error_code_to_str(message, rc, &info);
        snprintf(err, err_size, "regex /%.*s/ does not compile: %s", (int)length, regex,
                 (const char *)message);
        return -1;
    }
    p->regex = re;
    return 0;
}

void hf_pattern_free(struct hf_pattern *p)
{
    if (p->regex) onig_free(p->regex);
    p->regex = NULL;
}

/* The onig crate's find_iter: successive leftmost matches; an empty match right where the
 * previous match ended is skipped by moving on one character. */
static void find_regex(regex_t *re, const char *text, size_t n, struct hf_spans *out)
{
    const UChar *s = (const UChar *)text, *end = s + n;
    OnigRegion *region = onig_region_new();
    size_t from = 0, previous = 0;
    bool had_match = false;
    while (from <= n) {
        onig_region_clear(region);
        int at = onig_search(re, s, end, s + from, end, region, ONIG_OPTION_NONE);
        if (at < 0) break;
        size_t start = (size_t)region->beg[0], stop = (size_t)region->end[0];
        if (start == stop && had_match && previous == stop) {
            size_t step = from < n ? hf_utf8_valid_length(s + from, n - from) : 1;
            from += step ? step : 1;
            continue;
        }
        from = stop;
        previous = stop;
        had_match = true;
        hf_spans_push(out, start, stop, 1);
    }
    onig_region_free(region, 1);
}

static bool is_numeric(int32_t c)
{
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

void hf_pattern_find(const struct hf_pattern *p, const char *text, size_t n, struct hf_spans *out)
{
    if (n == 0) {
        hf_spans_push(out, 0, 0, 0);
        return;
    }
    struct hf_spans matches = {0};
    if (p->kind == HF_PATTERN_REGEX) {
        find_regex(p->regex, text, n, &matches);
    } else if (p->kind == HF_PATTERN_STRING) {
        /* the library escapes the string into a regex: plain non-overlapping search; an
         * empty string never matches */
        size_t m = p->literal_length;
        for (size_t i = 0; m && i + m <= n;) {
            if (!memcmp(text + i, p->literal, m)) {
                hf_spans_push(&matches, i, i + m, 1);
                i += m;
            } else
                i++;
        }
    } else {
        for (size_t i = 0; i < n;) {
            int32_t c;
            size_t len = hf_utf8_decode(text + i, &c);
            if (is_numeric(c)) hf_spans_push(&matches, i, i + len, 1);
            i += len;
        }
    }
    size_t previous = 0;
    for (size_t i = 0; i < matches.n; i++) {
        if (matches.start[i] != previous) hf_spans_push(out, previous, matches.start[i], 0);
        hf_spans_push(out, matches.start[i], matches.end[i], 1);
        previous = matches.end[i];
    }
    if (previous != n) hf_spans_push(out, previous, n, 0);
    hf_spans_free(&matches);
}
