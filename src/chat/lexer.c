/* src/chat/lexer.c: splits a chat template into template data and the tokens inside {{ }} and
 * {% %}, dropping {# #} comments, with jinja2's whitespace rules as transformers configures them:
 * trim_blocks (the newline after a block or comment tag goes), lstrip_blocks (spaces and tabs
 * before a block or comment tag at the start of a line go), "-" on a tag strips all whitespace on
 * that side, "+" turns lstrip/trim off for that side, and one trailing newline of the template is
 * dropped (keep_trailing_newline false). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/internal.h"

struct lexer {
    struct arena *arena;
    const char *src;
    size_t len, pos;
    int line;
    const char *name;
    struct token *tokens;
    size_t n, cap;
    char *err;
    size_t errlen;
};

static int lex_error(struct lexer *lx, int line, const char *fmt, ...)
{
    va_list ap;
    int k = snprintf(lx->err, lx->errlen, "%s:%d: ", lx->name, line);
    va_start(ap, fmt);
    if (k >= 0 && (size_t)k < lx->errlen) vsnprintf(lx->err + k, lx->errlen - (size_t)k, fmt, ap);
    va_end(ap);
    return -1;
}

static struct token *push(struct lexer *lx, enum token_type type, const char *text, size_t len)
{
    if (lx->n == lx->cap) {
        size_t cap = lx->cap ? 2 * lx->cap : 256;
        struct token *t = arena_alloc(lx->arena, cap * sizeof *t);
        if (lx->n) memcpy(t, lx->tokens, lx->n * sizeof *t);
        lx->tokens = t;
        lx->cap = cap;
    }
    struct token *t = &lx->tokens[lx->n++];
    memset(t, 0, sizeof *t);
    t->type = type;
    t->text = text;
    t->len = len;
    t->line = lx->line;
    return t;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static void count_lines(struct lexer *lx, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++)
        if (lx->src[i] == '\n') lx->line++;
}

/* Decode a Python string literal body (unicode-escape rules) into the arena. */
static int decode_string(struct lexer *lx, const char *s, size_t n, struct token *t)
{
    char *out = arena_alloc(lx->arena, 4 * n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\' || i + 1 == n) {
            out[k++] = s[i];
            continue;
        }
        char c = s[++i];
        uint32_t cp = 0;
        int digits = 0;
        switch (c) {
        case 'n':
            out[k++] = '\n';
            continue;
        case 't':
            out[k++] = '\t';
            continue;
        case 'r':
            out[k++] = '\r';
            continue;
        case 'a':
            out[k++] = '\a';
            continue;
        case 'b':
            out[k++] = '\b';
            continue;
        case 'f':
            out[k++] = '\f';
            continue;
        case 'v':
            out[k++] = '\v';
            continue;
        case '\\':
            out[k++] = '\\';
            continue;
        case '\'':
            out[k++] = '\'';
            continue;
        case '"':
            out[k++] = '"';
            continue;
        case '\n':
            continue;
        case 'x':
            digits = 2;
            break;
        case 'u':
            digits = 4;
            break;
        case 'U':
            digits = 8;
            break;
        default:
            if (c >= '0' && c <= '7') {
                int m = 0;
                while (m < 3 && i < n && s[i] >= '0' && s[i] <= '7') {
                    cp = cp * 8 + (uint32_t)(s[i] - '0');
                    i++;
                    m++;
                }
                i--;
                digits = -1;
                break;
            }
            out[k++] = '\\';
            out[k++] = c;
            continue;
        }
        if (digits > 0) {
            for (int m = 0; m < digits; m++) {
                char h = i + 1 < n ? s[++i] : 0;
                int v = h >= '0' && h <= '9'   ? h - '0'
                        : h >= 'a' && h <= 'f' ? h - 'a' + 10
                        : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                               : -1;
                if (v < 0) return lex_error(lx, t->line, "bad \\%c escape in a string literal", c);
                cp = cp * 16 + (uint32_t)v;
            }
        }
        if (cp < 0x80) {
            out[k++] = (char)cp;
        } else if (cp < 0x800) {
            out[k++] = (char)(0xC0 | (cp >> 6));
            out[k++] = (char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out[k++] = (char)(0xE0 | (cp >> 12));
            out[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
            out[k++] = (char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x110000) {
            out[k++] = (char)(0xF0 | (cp >> 18));
            out[k++] = (char)(0x80 | ((cp >> 12) & 0x3F));
            out[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
            out[k++] = (char)(0x80 | (cp & 0x3F));
        } else {
            return lex_error(lx, t->line, "escape beyond U+10FFFF in a string literal");
        }
    }
    out[k] = 0;
    t->text = out;
    t->len = k;
    return 0;
}

/* Tokens inside a tag until its closing "}}" or "%}" (close is '}' or '%'), at bracket depth 0.
 * Returns 0 with lx->pos just after the close and *strip_after set when it was "-}}" / "-%}",
 * *keep_after when "+%}". */
static int lex_tag(struct lexer *lx, char close, bool *strip_after, bool *keep_after)
{
    int depth = 0;
    int start_line = lx->line;
    const char *src = lx->src;
    for (;;) {
        while (lx->pos < lx->len && is_space(src[lx->pos])) {
            if (src[lx->pos] == '\n') lx->line++;
            lx->pos++;
        }
        if (lx->pos >= lx->len)
            return lex_error(lx, start_line, "unclosed '%s' tag", close == '}' ? "{{" : "{%");
        size_t p = lx->pos;
        char c = src[p];
        if (depth == 0) {
            size_t q = p;
            bool minus = false, plus = false;
            if ((c == '-' || c == '+') && p + 1 < lx->len && src[p + 1] == close) {
                minus = c == '-';
                plus = c == '+';
                q = p + 1;
            }
            if (src[q] == close && q + 1 < lx->len && src[q + 1] == '}') {
                *strip_after = minus;
                *keep_after = plus;
                push(lx, close == '}' ? TOK_PRINT_END : TOK_BLOCK_END, src + p, 0);
                lx->pos = q + 2;
                return 0;
            }
        }
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
            size_t q = p;
            while (q < lx->len &&
                   ((src[q] >= 'a' && src[q] <= 'z') || (src[q] >= 'A' && src[q] <= 'Z') ||
                    (src[q] >= '0' && src[q] <= '9') || src[q] == '_'))
                q++;
            push(lx, TOK_NAME, arena_strndup(lx->arena, src + p, q - p), q - p);
            lx->pos = q;
        } else if (c >= '0' && c <= '9') {
            size_t q = p;
            bool is_float = false;
            while (q < lx->len && ((src[q] >= '0' && src[q] <= '9') || src[q] == '_')) q++;
            if (q + 1 < lx->len && src[q] == '.' && src[q + 1] >= '0' && src[q + 1] <= '9') {
                is_float = true;
                q++;
                while (q < lx->len && ((src[q] >= '0' && src[q] <= '9') || src[q] == '_')) q++;
            }
            if (q < lx->len && (src[q] == 'e' || src[q] == 'E')) {
                size_t r = q + 1;
                if (r < lx->len && (src[r] == '+' || src[r] == '-')) r++;
                if (r < lx->len && src[r] >= '0' && src[r] <= '9') {
                    is_float = true;
                    q = r;
                    while (q < lx->len && src[q] >= '0' && src[q] <= '9') q++;
                }
            }
            char buf[64];
            size_t m = 0;
            for (size_t i = p; i < q && m + 1 < sizeof buf; i++)
                if (src[i] != '_') buf[m++] = src[i];
            buf[m] = 0;
            struct token *t = push(lx, is_float ? TOK_FLOAT : TOK_INT, src + p, q - p);
            if (is_float)
                t->float_value = strtod(buf, NULL);
            else
                t->int_value = strtoll(buf, NULL, 10);
            lx->pos = q;
        } else if (c == '\'' || c == '"') {
            size_t q = p + 1;
            while (q < lx->len && src[q] != c) {
                if (src[q] == '\\') q++;
                q++;
            }
            if (q >= lx->len) return lex_error(lx, lx->line, "unterminated string literal");
            struct token *t = push(lx, TOK_STRING, NULL, 0);
            if (decode_string(lx, src + p + 1, q - p - 1, t)) return -1;
            count_lines(lx, p, q);
            lx->pos = q + 1;
        } else {
            static const char *const ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                              "/",  "%",  "~",  "<",  ">",  "=",  ".", ",", ":",
                                              "|",  "(",  ")",  "[",  "]",  "{",  "}"};
            size_t k;
            for (k = 0; k < sizeof ops / sizeof *ops; k++) {
                size_t m = strlen(ops[k]);
                if (p + m <= lx->len && memcmp(src + p, ops[k], m) == 0) break;
            }
            if (k == sizeof ops / sizeof *ops)
                return lex_error(lx, lx->line, "unexpected character '%c'", c);
            size_t m = strlen(ops[k]);
            if (c == '(' || c == '[' || c == '{')
                depth++;
            else if (c == ')' || c == ']' || c == '}')
                depth--;
            push(lx, TOK_OP, ops[k], m);
            lx->pos = p + m;
        }
    }
}

int chat_lex(struct arena *a, const char *text, const char *name, struct token_list *out, char *err,
             size_t errlen)
{
    /* Newlines normalized to \n and one trailing newline dropped, as jinja2 does. */
    size_t n = strlen(text);
    char *src = arena_alloc(a, n + 1);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (text[i] == '\r') {
            src[m++] = '\n';
            if (i + 1 < n && text[i + 1] == '\n') i++;
        } else {
            src[m++] = text[i];
        }
    }
    if (m > 0 && src[m - 1] == '\n') m--;
    src[m] = 0;

    struct lexer lx = {
        .arena = a, .src = src, .len = m, .line = 1, .name = name, .err = err, .errlen = errlen};
    bool strip_next = false, trim_next = false;
    while (lx.pos <= lx.len) {
        /* Find the next tag opening. */
        size_t p = lx.pos;
        const char *open = NULL;
        while (p + 1 < lx.len) {
            if (src[p] == '{' && (src[p + 1] == '{' || src[p + 1] == '%' || src[p + 1] == '#')) {
                open = src + p;
                break;
            }
            p++;
        }
        size_t text_end = open ? p : lx.len;
        size_t text_begin = lx.pos;
        if (strip_next)
            while (text_begin < text_end) {
                size_t len;
                if (!text_is_space(src, text_end, text_begin, &len)) break;
                text_begin += len;
            }
        else if (trim_next && text_begin < text_end && src[text_begin] == '\n')
            text_begin++;
        strip_next = trim_next = false;
        size_t kept_end = text_end;
        char kind = open ? open[1] : 0;
        char modifier = open && p + 2 < lx.len ? src[p + 2] : 0;
        if (open && modifier == '-') {
            /* Python's whitespace, as jinja2's rstrip() and \\s* take it */
            while (kept_end > text_begin) {
                size_t start = kept_end - 1, len;
                while (start > text_begin && ((unsigned char)src[start] & 0xC0) == 0x80) start--;
                if (!text_is_space(src, kept_end, start, &len) || start + len != kept_end) break;
                kept_end = start;
            }
        } else if (open && kind != '{' && modifier != '+') {
            /* lstrip_blocks: only spaces and tabs between the line start and the tag. */
            size_t line_start = text_end;
            while (line_start > text_begin && src[line_start - 1] != '\n') line_start--;
            bool at_line_start =
                line_start > text_begin || text_begin == 0 || src[text_begin - 1] == '\n';
            bool blank = true;
            for (size_t i = line_start; i < text_end; i++)
                if (src[i] != ' ' && src[i] != '\t') blank = false;
            if (at_line_start && blank) kept_end = line_start;
        }
        if (kept_end > text_begin) {
            struct token *t = push(&lx, TOK_TEXT, src + text_begin, kept_end - text_begin);
            t->line = lx.line;
        }
        count_lines(&lx, lx.pos, text_end);
        if (!open) break;
        lx.pos = p + 2 + (modifier == '-' || modifier == '+');
        bool strip_after = false, keep_after = false;
        if (kind == '#') {
            int start_line = lx.line;
            const char *end = strstr(src + lx.pos, "#}");
            if (!end) return lex_error(&lx, start_line, "unclosed comment");
            size_t e = (size_t)(end - src);
            strip_after = e > lx.pos && src[e - 1] == '-';
            keep_after = e > lx.pos && src[e - 1] == '+';
            count_lines(&lx, lx.pos, e);
            lx.pos = e + 2;
            strip_next = strip_after;
            trim_next = !strip_after && !keep_after;
            continue;
        }
        push(&lx, kind == '{' ? TOK_PRINT_BEGIN : TOK_BLOCK_BEGIN, open, 2);
        if (lex_tag(&lx, kind == '{' ? '}' : '%', &strip_after, &keep_after)) return -1;
        strip_next = strip_after;
        trim_next = kind == '%' && !strip_after && !keep_after;
    }
    push(&lx, TOK_EOF, "", 0);
    out->items = lx.tokens;
    out->n = lx.n;
    return 0;
}
