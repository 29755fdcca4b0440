/* hf_pattern: what the Split and Digits pre-tokenizers and the Replace normalizer look
 * for: a regex, a literal string, or one numeric character at a time, each turned into
 * spans that cover the text (matches and the gaps between them), as the library's
 * Pattern::find_matches does.
 *
 * Regexes run on Oniguruma, the engine `tokenizers` itself uses (through the onig crate:
 * Regex::new, that is Oniguruma's default syntax (ONIG_SYNTAX_ONIGURUMA), UTF-8, no
 * options), so `(?i:...)` and `(?!\S)` mean what they mean there. The Unicode properties
 * \p{L}, \p{N}, ... are written out as the code points the library's (newer) Oniguruma
 * puts in them (hf_unicode_props.c), since Debian's tables are older. */
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

static void append_ranges(struct hf_string *out, const int32_t (*ranges)[2], size_t n)
{
    char item[40];
    for (size_t i = 0; i < n; i++) {
        if (ranges[i][0] == ranges[i][1])
            snprintf(item, sizeof item, "\\x{%X}", ranges[i][0]);
        else
            snprintf(item, sizeof item, "\\x{%X}-\\x{%X}", ranges[i][0], ranges[i][1]);
        hf_string_append(out, item, strlen(item));
    }
}

/* Writes the pattern with each \p{X} (\P{X}, \p{^X}) of hf_unicode_props.c replaced by
 * the library's own code points for X: inside brackets the ranges, outside in brackets of
 * their own. Other escapes and properties are copied as they are. */
static int expand_properties(const char *regex, size_t length, struct hf_string *out, char *err,
                             size_t err_size)
{
    int depth = 0; /* inside how many [...] */
    for (size_t i = 0; i < length;) {
        char c = regex[i];
        if (c == '\\' && i + 1 < length) {
            char kind = regex[i + 1];
            const char *close = NULL;
            if ((kind == 'p' || kind == 'P') && i + 3 < length && regex[i + 2] == '{')
                close = memchr(regex + i + 3, '}', length - i - 3);
            if (close) {
                const char *name = regex + i + 3;
                bool negated = kind == 'P';
                if (*name == '^') {
                    negated = !negated;
                    name++;
                }
                const int32_t(*ranges)[2];
                size_t n = hf_unicode_property(name, (size_t)(close - name), &ranges);
                size_t next = (size_t)(close - regex) + 1;
                if (n && depth == 0) {
                    hf_string_append(out, negated ? "[^" : "[", negated ? 2 : 1);
                    append_ranges(out, ranges, n);
                    hf_string_append(out, "]", 1);
                    i = next;
                    continue;
                }
                if (n && !negated) {
                    append_ranges(out, ranges, n);
                    i = next;
                    continue;
                }
                if (n) {
                    snprintf(err, err_size,
                             "regex /%.*s/: a negated property inside brackets is not implemented",
                             (int)length, regex);
                    return -1;
                }
            }
            hf_string_append(out, regex + i, 2);
            i += 2;
            continue;
        }
        if (c == '[')
            depth++;
        else if (c == ']' && depth > 0)
            depth--;
        hf_string_append(out, &c, 1);
        i++;
    }
    return 0;
}

int hf_pattern_regex(struct hf_pattern *p, const char *regex, size_t length, char *err,
                     size_t err_size)
{
    onig_once();
    memset(p, 0, sizeof *p);
    p->kind = HF_PATTERN_REGEX;
    struct hf_string expanded = {0};
    hf_string_append(&expanded, "", 0);
    if (expand_properties(regex, length, &expanded, err, err_size)) {
        hf_string_free(&expanded);
        return -1;
    }
    regex_t *re;
    OnigErrorInfo info;
    int rc = onig_new(&re, (const UChar *)expanded.data, (const UChar *)expanded.data + expanded.n,
                      ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
    hf_string_free(&expanded);
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
