/* src/chat/text.c: Python's str operations on UTF-8 text as chat templates call them (strip,
 * split, replace, case mapping, jinja2's title filter). Case mapping covers ASCII, Latin-1,
 * Latin Extended-A, Greek and basic Cyrillic letters; other characters count as uncased and pass
 * through unchanged. Whitespace is Python's str.isspace() set. */
#include <stdio.h>
#include <string.h>

#include "chat/internal.h"

bool text_is_space(const char *s, size_t n, size_t i, size_t *len)
{
    unsigned char c = (unsigned char)s[i];
    *len = 1;
    if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) return true;
    if (c == 0xC2 && i + 1 < n &&
        ((unsigned char)s[i + 1] == 0x85 || (unsigned char)s[i + 1] == 0xA0)) {
        *len = 2;
        return true;
    }
    if (c == 0xE2 && i + 2 < n) {
        unsigned char d = (unsigned char)s[i + 1], e = (unsigned char)s[i + 2];
        if ((d == 0x80 && (e <= 0x8A || e == 0xA8 || e == 0xA9 || e == 0xAF)) ||
            (d == 0x81 && e == 0x9F)) {
            *len = 3;
            return true;
        }
    }
    if (c == 0xE3 && i + 2 < n && (unsigned char)s[i + 1] == 0x80 &&
        (unsigned char)s[i + 2] == 0x80) {
        *len = 3;
        return true;
    }
    if (c == 0xE1 && i + 2 < n && (unsigned char)s[i + 1] == 0x9A &&
        (unsigned char)s[i + 2] == 0x80) {
        *len = 3;
        return true;
    }
    return false;
}

size_t text_cp_len(const char *s, size_t n, size_t i)
{
    size_t j = i + 1;
    while (j < n && ((unsigned char)s[j] & 0xC0) == 0x80) j++;
    return j - i;
}

/* Does the code point at s[i] occur in the set chars? */
static bool in_chars(const char *s, size_t i, size_t len, const struct value *chars)
{
    for (size_t k = 0; k < chars->as.str.n;) {
        size_t m = text_cp_len(chars->as.str.s, chars->as.str.n, k);
        if (m == len && !memcmp(chars->as.str.s + k, s + i, len)) return true;
        k += m;
    }
    return false;
}

/* str.strip / lstrip / rstrip with chars (NULL or None: whitespace). */
struct value *text_strip(struct render *r, struct value *str, struct value *chars, bool left,
                         bool right)
{
    const char *s = str->as.str.s;
    size_t n = str->as.str.n, a = 0, b = n;
    bool ws = !chars || chars->kind == V_NONE;
    if (left)
        while (a < b) {
            size_t len;
            if (ws ? !text_is_space(s, n, a, &len)
                   : !in_chars(s, a, (len = text_cp_len(s, n, a)), chars))
                break;
            a += len;
        }
    if (right)
        while (b > a) {
            size_t start = b - 1;
            while (start > a && ((unsigned char)s[start] & 0xC0) == 0x80) start--;
            size_t len;
            if (ws ? !(text_is_space(s, n, start, &len) && start + len == b)
                   : !in_chars(s, start, b - start, chars))
                break;
            b = start;
        }
    return value_string(r, s + a, b - a);
}

struct value *text_split(struct render *r, struct value *str, struct value *sep, int64_t maxsplit,
                         int line)
{
    const char *s = str->as.str.s;
    size_t n = str->as.str.n;
    struct value *out = value_list(r, 0);
    if (!sep || sep->kind == V_NONE) {
        size_t i = 0;
        while (i < n) {
            size_t len;
            while (i < n && text_is_space(s, n, i, &len)) i += len;
            if (i >= n) break;
            if (maxsplit >= 0 && (int64_t)out->as.list.n == maxsplit) {
                size_t e = n;
                while (e > i) {
                    size_t st = e - 1;
                    while (st > i && ((unsigned char)s[st] & 0xC0) == 0x80) st--;
                    if (!(text_is_space(s, n, st, &len) && st + len == e)) break;
                    e = st;
                }
                list_push(r, out, value_string(r, s + i, e - i));
                break;
            }
            size_t j = i;
            while (j < n && !text_is_space(s, n, j, &len)) j += text_cp_len(s, n, j);
            list_push(r, out, value_string(r, s + i, j - i));
            i = j;
        }
        return out;
    }
    if (sep->kind != V_STRING)
        render_fail(r, line, "must be str or None, not %s", value_type_name(sep));
    if (sep->as.str.n == 0) render_fail(r, line, "empty separator");
    size_t start = 0;
    for (size_t i = 0; i + sep->as.str.n <= n;) {
        if ((maxsplit < 0 || (int64_t)out->as.list.n < maxsplit) &&
            !memcmp(s + i, sep->as.str.s, sep->as.str.n)) {
            list_push(r, out, value_string(r, s + start, i - start));
            i += sep->as.str.n;
            start = i;
        } else {
            i++;
        }
    }
    list_push(r, out, value_string(r, s + start, n - start));
    return out;
}

struct value *text_replace(struct render *r, struct value *str, struct value *old,
                           struct value *new, int64_t count)
{
    struct strbuf b = {0};
    strbuf_add(r, &b, "", 0);
    const char *s = str->as.str.s;
    size_t n = str->as.str.n, m = old->as.str.n;
    int64_t done = 0;
    if (m == 0) {
        /* Python inserts new between every code point and at both ends. */
        for (size_t i = 0; i <= n;) {
            if (count < 0 || done < count) {
                strbuf_add(r, &b, new->as.str.s, new->as.str.n);
                done++;
            }
            if (i == n) break;
            size_t len = text_cp_len(s, n, i);
            strbuf_add(r, &b, s + i, len);
            i += len;
        }
        return value_string(r, b.s, b.n);
    }
    size_t i = 0;
    while (i < n) {
        if ((count < 0 || done < count) && i + m <= n && !memcmp(s + i, old->as.str.s, m)) {
            strbuf_add(r, &b, new->as.str.s, new->as.str.n);
            i += m;
            done++;
        } else {
            strbuf_add(r, &b, s + i, 1);
            i++;
        }
    }
    return value_string(r, b.s, b.n);
}

/* Simple case pairs of ASCII, Latin-1, Latin Extended-A, Greek and basic Cyrillic (Python's
 * str.upper/lower on those); other code points count as uncased and stay as they are. */
static uint32_t lower_of(uint32_t c)
{
    if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7) ||
        (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) || (c >= 0x410 && c <= 0x42F))
        return c + 0x20;
    if (c >= 0x400 && c <= 0x40F) return c + 0x50;
    if (c == 0x178) return 0xFF;
    if ((c >= 0x100 && c <= 0x12F) || (c >= 0x132 && c <= 0x137) || (c >= 0x14A && c <= 0x177))
        return c | 1;
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c + 1 : c;
    return c;
}
static uint32_t upper_of(uint32_t c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 0xE0 && c <= 0xFE && c != 0xF7) ||
        (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) || (c >= 0x430 && c <= 0x44F))
        return c - 0x20;
    if (c == 0x3C2) return 0x3A3;
    if (c >= 0x450 && c <= 0x45F) return c - 0x50;
    if (c == 0xFF) return 0x178;
    if ((c >= 0x100 && c <= 0x12F) || (c >= 0x132 && c <= 0x137) || (c >= 0x14A && c <= 0x177))
        return c & ~(uint32_t)1;
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c : c - 1;
    return c;
}
static bool is_cased(uint32_t c)
{
    return lower_of(c) != c || upper_of(c) != c || c == 0xDF;
}

static uint32_t text_decode(const char *s, size_t n, size_t *i)
{
    unsigned char c = (unsigned char)s[*i];
    size_t len = text_cp_len(s, n, *i);
    uint32_t cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (size_t k = 1; k < len; k++) cp = (cp << 6) | ((unsigned char)s[*i + k] & 0x3F);
    *i += len;
    return cp;
}

static void text_encode(struct render *r, struct strbuf *b, uint32_t cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    strbuf_add(r, b, u, n);
}

struct value *text_map_case(struct render *r, struct value *str, enum case_map how)
{
    struct strbuf b = {0};
    strbuf_add(r, &b, "", 0);
    bool prev_cased = false, first = true;
    for (size_t i = 0; i < str->as.str.n;) {
        size_t at = i;
        uint32_t c = text_decode(str->as.str.s, str->as.str.n, &i);
        bool up;
        if (how == CASE_UPPER)
            up = true;
        else if (how == CASE_LOWER)
            up = false;
        else if (how == CASE_TITLE)
            up = !prev_cased;
        else
            up = first;
        if (c == 0xDF && up) {
            strbuf_add(r, &b, how == CASE_UPPER ? "SS" : "Ss", 2);
        } else {
            uint32_t m = up ? upper_of(c) : lower_of(c);
            if (m == c)
                strbuf_add(r, &b, str->as.str.s + at, i - at);
            else
                text_encode(r, &b, m);
        }
        prev_cased = is_cased(c);
        first = false;
    }
    return value_string(r, b.s, b.n);
}

/* jinja2's title filter (not str.title): words begin after runs of whitespace or -({[<; a
 * word's first character is upper-cased, the rest lower-cased. */
struct value *text_title(struct render *r, struct value *str)
{
    struct strbuf b = {0};
    strbuf_add(r, &b, "", 0);
    const char *s = str->as.str.s;
    size_t n = str->as.str.n;
    bool word_start = true;
    for (size_t i = 0; i < n;) {
        size_t at = i, space_len;
        bool separator = text_is_space(s, n, i, &space_len) || strchr("-({[<", s[i]) != NULL;
        uint32_t c = text_decode(s, n, &i);
        if (separator) {
            strbuf_add(r, &b, s + at, i - at);
            word_start = true;
            continue;
        }
        if (c == 0xDF && word_start) {
            strbuf_add(r, &b, "SS", 2);
        } else {
            uint32_t m = word_start ? upper_of(c) : lower_of(c);
            if (m == c)
                strbuf_add(r, &b, s + at, i - at);
            else
                text_encode(r, &b, m);
        }
        word_start = false;
    }
    return value_string(r, b.s, b.n);
}

void chat_py_strip(const char *s, size_t n, size_t *begin, size_t *end)
{
    size_t a = 0, b = n, len;
    while (a < b && text_is_space(s, n, a, &len)) a += len;
    /* a space character ends where b is: try each possible start behind it */
    for (bool moved = true; moved && a < b;) {
        moved = false;
        for (size_t k = 1; k <= 3 && k <= b - a; k++)
            if (text_is_space(s, n, b - k, &len) && len == k) {
                b -= k;
                moved = true;
                break;
            }
    }
    *begin = a;
    *end = b;
}
