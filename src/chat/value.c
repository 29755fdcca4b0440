/* src/chat/value.c: the chat template interpreter's runtime values (Python's None, bool, int,
 * float, str, list/tuple, dict, plus jinja2's Undefined and namespace), allocated in the render's
 * arena, with Python's str(), repr(), truthiness and equality, and json.dumps as transformers'
 * tojson filter calls it. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/internal.h"

struct arena_block {
    struct arena_block *next;
    size_t used, size;
    _Alignas(16) unsigned char data[];
};

void *arena_alloc(struct arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    struct arena_block *b = a->head;
    if (!b || b->used + n > b->size) {
        size_t size = n > 65536 ? n : 65536;
        b = malloc(sizeof *b + size);
        if (!b) {
            fprintf(stderr, "chat template: out of memory\n");
            abort();
        }
        b->next = a->head;
        b->used = 0;
        b->size = size;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

char *arena_strndup(struct arena *a, const char *s, size_t n)
{
    char *d = arena_alloc(a, n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

void arena_free(struct arena *a)
{
    while (a->head) {
        struct arena_block *next = a->head->next;
        free(a->head);
        a->head = next;
    }
}

static struct value none_value = {.kind = V_NONE};
static struct value true_value = {.kind = V_BOOL, .as.boolean = true};
static struct value false_value = {.kind = V_BOOL, .as.boolean = false};

static struct value *new_value(struct render *r, enum value_kind kind)
{
    struct value *v = arena_alloc(&r->arena, sizeof *v);
    memset(v, 0, sizeof *v);
    v->kind = kind;
    return v;
}

struct value *value_undefined(struct render *r, const char *hint)
{
    struct value *v = new_value(r, V_UNDEFINED);
    v->as.undefined.hint = hint;
    return v;
}
struct value *value_none(void)
{
    return &none_value;
}
struct value *value_bool(bool b)
{
    return b ? &true_value : &false_value;
}
struct value *value_int(struct render *r, int64_t i)
{
    struct value *v = new_value(r, V_INT);
    v->as.integer = i;
    return v;
}
struct value *value_float(struct render *r, double f)
{
    struct value *v = new_value(r, V_FLOAT);
    v->as.real = f;
    return v;
}
struct value *value_string(struct render *r, const char *s, size_t n)
{
    struct value *v = new_value(r, V_STRING);
    v->as.str.s = arena_strndup(&r->arena, s, n);
    v->as.str.n = n;
    return v;
}
struct value *value_cstring(struct render *r, const char *s)
{
    return value_string(r, s, strlen(s));
}

struct value *value_list(struct render *r, size_t cap)
{
    struct value *v = new_value(r, V_LIST);
    v->as.list.cap = cap;
    v->as.list.items = cap ? arena_alloc(&r->arena, cap * sizeof(struct value *)) : NULL;
    return v;
}

void list_push(struct render *r, struct value *list, struct value *item)
{
    if (list->as.list.n == list->as.list.cap) {
        size_t cap = list->as.list.cap ? 2 * list->as.list.cap : 8;
        struct value **items = arena_alloc(&r->arena, cap * sizeof *items);
        if (list->as.list.n) memcpy(items, list->as.list.items, list->as.list.n * sizeof *items);
        list->as.list.items = items;
        list->as.list.cap = cap;
    }
    list->as.list.items[list->as.list.n++] = item;
}

struct value *value_dict(struct render *r, enum value_kind kind)
{
    return new_value(r, kind);
}

static bool key_equal(const struct value *a, const struct value *b)
{
    return value_equal(a, b);
}

struct value *dict_get(const struct value *dict, const struct value *key)
{
    for (size_t i = 0; i < dict->as.dict.n; i++)
        if (key_equal(dict->as.dict.keys[i], key)) return dict->as.dict.values[i];
    return NULL;
}

struct value *dict_get_cstr(const struct value *dict, const char *key)
{
    size_t n = strlen(key);
    for (size_t i = 0; i < dict->as.dict.n; i++) {
        const struct value *k = dict->as.dict.keys[i];
        if (k->kind == V_STRING && k->as.str.n == n && memcmp(k->as.str.s, key, n) == 0)
            return dict->as.dict.values[i];
    }
    return NULL;
}

void dict_set(struct render *r, struct value *dict, struct value *key, struct value *v)
{
    for (size_t i = 0; i < dict->as.dict.n; i++)
        if (key_equal(dict->as.dict.keys[i], key)) {
            dict->as.dict.values[i] = v;
            return;
        }
    if (dict->as.dict.n == dict->as.dict.cap) {
        size_t cap = dict->as.dict.cap ? 2 * dict->as.dict.cap : 8;
        struct value **keys = arena_alloc(&r->arena, cap * sizeof *keys);
        struct value **values = arena_alloc(&r->arena, cap * sizeof *values);
        if (dict->as.dict.n) {
            memcpy(keys, dict->as.dict.keys, dict->as.dict.n * sizeof *keys);
            memcpy(values, dict->as.dict.values, dict->as.dict.n * sizeof *values);
        }
        dict->as.dict.keys = keys;
        dict->as.dict.values = values;
        dict->as.dict.cap = cap;
    }
    dict->as.dict.keys[dict->as.dict.n] = key;
    dict->as.dict.values[dict->as.dict.n++] = v;
}

struct value *value_from_json(struct render *r, const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_NULL:
        return value_none();
    case JSON_TRUE:
        return value_bool(true);
    case JSON_FALSE:
        return value_bool(false);
    case JSON_INTEGER:
        return value_int(r, (int64_t)json_integer_value(j));
    case JSON_REAL:
        return value_float(r, json_real_value(j));
    case JSON_STRING:
        return value_string(r, json_string_value(j), json_string_length(j));
    case JSON_ARRAY: {
        struct value *l = value_list(r, json_array_size(j));
        for (size_t i = 0; i < json_array_size(j); i++)
            list_push(r, l, value_from_json(r, json_array_get(j, i)));
        return l;
    }
    case JSON_OBJECT: {
        struct value *d = value_dict(r, V_DICT);
        const char *key;
        json_t *v;
        json_object_foreach((json_t *)j, key, v)
            dict_set(r, d, value_cstring(r, key), value_from_json(r, v));
        return d;
    }
    }
    return value_none();
}

bool value_truthy(const struct value *v)
{
    switch (v->kind) {
    case V_UNDEFINED:
    case V_NONE:
        return false;
    case V_BOOL:
        return v->as.boolean;
    case V_INT:
        return v->as.integer != 0;
    case V_FLOAT:
        return v->as.real != 0.0;
    case V_STRING:
        return v->as.str.n > 0;
    case V_LIST:
        return v->as.list.n > 0;
    case V_DICT:
        return v->as.dict.n > 0;
    default:
        return true;
    }
}

static bool is_number(const struct value *v)
{
    return v->kind == V_BOOL || v->kind == V_INT || v->kind == V_FLOAT;
}

bool value_equal(const struct value *x, const struct value *y)
{
    if (is_number(x) && is_number(y)) {
        if (x->kind == V_FLOAT || y->kind == V_FLOAT) {
            double a = x->kind == V_FLOAT ? x->as.real
                       : x->kind == V_INT ? (double)x->as.integer
                                          : x->as.boolean;
            double b = y->kind == V_FLOAT ? y->as.real
                       : y->kind == V_INT ? (double)y->as.integer
                                          : y->as.boolean;
            return a == b;
        }
        int64_t a = x->kind == V_INT ? x->as.integer : x->as.boolean;
        int64_t b = y->kind == V_INT ? y->as.integer : y->as.boolean;
        return a == b;
    }
    if (x->kind != y->kind) return false;
    switch (x->kind) {
    case V_UNDEFINED:
    case V_NONE:
        return true;
    case V_STRING:
        return x->as.str.n == y->as.str.n && memcmp(x->as.str.s, y->as.str.s, x->as.str.n) == 0;
    case V_LIST:
        if (x->as.list.n != y->as.list.n) return false;
        for (size_t i = 0; i < x->as.list.n; i++)
            if (!value_equal(x->as.list.items[i], y->as.list.items[i])) return false;
        return true;
    case V_DICT:
        if (x->as.dict.n != y->as.dict.n) return false;
        for (size_t i = 0; i < x->as.dict.n; i++) {
            const struct value *o = dict_get(y, x->as.dict.keys[i]);
            if (!o || !value_equal(x->as.dict.values[i], o)) return false;
        }
        return true;
    case V_MACRO:
        return x->as.macro == y->as.macro;
    default:
        return x == y;
    }
}

const char *value_type_name(const struct value *v)
{
    switch (v->kind) {
    case V_UNDEFINED:
        return "Undefined";
    case V_NONE:
        return "NoneType";
    case V_BOOL:
        return "bool";
    case V_INT:
        return "int";
    case V_FLOAT:
        return "float";
    case V_STRING:
        return "str";
    case V_LIST:
        return v->tuple ? "tuple" : "list";
    case V_DICT:
        return "dict";
    case V_NAMESPACE:
        return "Namespace";
    case V_MACRO:
        return "Macro";
    case V_BUILTIN:
        return "builtin_function_or_method";
    }
    return "object";
}

void strbuf_add(struct render *r, struct strbuf *b, const char *s, size_t n)
{
    if (n > CHAT_MAX_TEXT || b->n + n > CHAT_MAX_TEXT)
        render_fail(r, 0, "%s: the template builds a text of more than %zu MiB",
                    r->tpl->name, CHAT_MAX_TEXT >> 20);
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *d = arena_alloc(&r->arena, cap);
        if (b->n) memcpy(d, b->s, b->n);
        b->s = d;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void strbuf_cstr(struct render *r, struct strbuf *b, const char *s)
{
    strbuf_add(r, b, s, strlen(s));
}

/* Python's repr(float): the shortest digits that read back to the same double, in fixed
 * notation for exponents -4..15, else scientific with a two-digit exponent at least. */
void format_float(double f, char *buf, size_t len)
{
    if (isnan(f)) {
        snprintf(buf, len, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, len, f < 0 ? "-inf" : "inf");
        return;
    }
    char tmp[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX */
    char digits[32];
    int nd = 0;
    const char *p = tmp;
    bool neg = *p == '-';
    if (neg) p++;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9') digits[nd++] = *p;
    int exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    char out[64];
    int k = 0;
    if (neg) out[k++] = '-';
    if (exp10 >= -4 && exp10 < 16) {
        if (exp10 < 0) {
            out[k++] = '0';
            out[k++] = '.';
            for (int i = 0; i < -exp10 - 1; i++) out[k++] = '0';
            for (int i = 0; i < nd; i++) out[k++] = digits[i];
        } else {
            for (int i = 0; i <= exp10; i++) out[k++] = i < nd ? digits[i] : '0';
            out[k++] = '.';
            if (nd > exp10 + 1)
                for (int i = exp10 + 1; i < nd; i++) out[k++] = digits[i];
            else
                out[k++] = '0';
        }
        out[k] = 0;
    } else {
        out[k++] = digits[0];
        if (nd > 1) {
            out[k++] = '.';
            for (int i = 1; i < nd; i++) out[k++] = digits[i];
        }
        snprintf(out + k, sizeof out - (size_t)k, "e%c%02d", exp10 < 0 ? '-' : '+',
                 exp10 < 0 ? -exp10 : exp10);
    }
    snprintf(buf, len, "%s", out);
}

static void repr_string(struct render *r, struct strbuf *b, const char *s, size_t n)
{
    bool has_single = memchr(s, '\'', n) != NULL, has_double = memchr(s, '"', n) != NULL;
    char quote = has_single && !has_double ? '"' : '\'';
    strbuf_add(r, b, &quote, 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '\\' || c == (unsigned char)quote) {
            esc[0] = '\\';
            esc[1] = (char)c;
            strbuf_add(r, b, esc, 2);
        } else if (c == '\n') {
            strbuf_cstr(r, b, "\\n");
        } else if (c == '\r') {
            strbuf_cstr(r, b, "\\r");
        } else if (c == '\t') {
            strbuf_cstr(r, b, "\\t");
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            strbuf_cstr(r, b, esc);
        } else if (c == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] >= 0x80 &&
                   (unsigned char)s[i + 1] <= 0xA0) {
            /* C1 controls and NO-BREAK SPACE are not printable to Python */
            snprintf(esc, sizeof esc, "\\x%02x", (unsigned char)s[i + 1]);
            strbuf_cstr(r, b, esc);
            i++;
        } else {
            strbuf_add(r, b, s + i, 1);
        }
    }
    strbuf_add(r, b, &quote, 1);
}

void value_repr(struct render *r, struct strbuf *b, const struct value *v)
{
    if (v->kind == V_STRING) {
        repr_string(r, b, v->as.str.s, v->as.str.n);
        return;
    }
    if (v->kind == V_LIST) {
        strbuf_cstr(r, b, v->tuple ? "(" : "[");
        for (size_t i = 0; i < v->as.list.n; i++) {
            if (i) strbuf_cstr(r, b, ", ");
            value_repr(r, b, v->as.list.items[i]);
        }
        if (v->tuple && v->as.list.n == 1) strbuf_cstr(r, b, ",");
        strbuf_cstr(r, b, v->tuple ? ")" : "]");
        return;
    }
    if (v->kind == V_DICT) {
        strbuf_cstr(r, b, "{");
        for (size_t i = 0; i < v->as.dict.n; i++) {
            if (i) strbuf_cstr(r, b, ", ");
            value_repr(r, b, v->as.dict.keys[i]);
            strbuf_cstr(r, b, ": ");
            value_repr(r, b, v->as.dict.values[i]);
        }
        strbuf_cstr(r, b, "}");
        return;
    }
    if (v->kind == V_UNDEFINED) {
        strbuf_cstr(r, b, "Undefined");
        return;
    }
    value_str(r, b, v);
}

void value_str(struct render *r, struct strbuf *b, const struct value *v)
{
    char buf[64];
    switch (v->kind) {
    case V_UNDEFINED:
        return;
    case V_NONE:
        strbuf_cstr(r, b, "None");
        return;
    case V_BOOL:
        strbuf_cstr(r, b, v->as.boolean ? "True" : "False");
        return;
    case V_INT:
        snprintf(buf, sizeof buf, "%lld", (long long)v->as.integer);
        strbuf_cstr(r, b, buf);
        return;
    case V_FLOAT:
        format_float(v->as.real, buf, sizeof buf);
        strbuf_cstr(r, b, buf);
        return;
    case V_STRING:
        strbuf_add(r, b, v->as.str.s, v->as.str.n);
        return;
    case V_LIST:
    case V_DICT:
        value_repr(r, b, v);
        return;
    case V_NAMESPACE:
        strbuf_cstr(r, b, "<Namespace>");
        return;
    case V_MACRO:
        strbuf_cstr(r, b, "<Macro '");
        strbuf_cstr(r, b, v->as.macro->name);
        strbuf_cstr(r, b, "'>");
        return;
    case V_BUILTIN:
        strbuf_cstr(r, b, "<built-in method ");
        strbuf_cstr(r, b, v->as.builtin.name);
        strbuf_cstr(r, b, ">");
        return;
    }
}

struct value *value_to_string(struct render *r, const struct value *v)
{
    if (v->kind == V_STRING) return (struct value *)v;
    struct strbuf b = {0};
    value_str(r, &b, v);
    return value_string(r, b.s ? b.s : "", b.n);
}

static void dump_json_string(struct render *r, struct strbuf *b, const char *s, size_t n)
{
    strbuf_cstr(r, b, "\"");
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[8];
        if (c == '"')
            esc = "\\\"";
        else if (c == '\\')
            esc = "\\\\";
        else if (c == '\n')
            esc = "\\n";
        else if (c == '\r')
            esc = "\\r";
        else if (c == '\t')
            esc = "\\t";
        else if (c == '\b')
            esc = "\\b";
        else if (c == '\f')
            esc = "\\f";
        else if (c < 0x20) {
            snprintf(tmp, sizeof tmp, "\\u%04x", c);
            esc = tmp;
        }
        if (esc) {
            strbuf_add(r, b, s + run, i - run);
            strbuf_cstr(r, b, esc);
            run = i + 1;
        }
    }
    strbuf_add(r, b, s + run, n - run);
    strbuf_cstr(r, b, "\"");
}

static void json_newline(struct render *r, struct strbuf *b, int indent, int level)
{
    strbuf_cstr(r, b, "\n");
    for (int i = 0; i < indent * level; i++) strbuf_cstr(r, b, " ");
}

static int compare_keys(const void *x, const void *y)
{
    const struct value *a = **(struct value *const *const *)x;
    const struct value *c = **(struct value *const *const *)y;
    if (a->kind == V_STRING && c->kind == V_STRING) {
        size_t n = a->as.str.n < c->as.str.n ? a->as.str.n : c->as.str.n;
        int k = memcmp(a->as.str.s, c->as.str.s, n);
        return k ? k : (a->as.str.n > c->as.str.n) - (a->as.str.n < c->as.str.n);
    }
    return 0;
}

void value_json(struct render *r, struct strbuf *b, const struct value *v, int indent,
                const char *item_sep, const char *key_sep, bool sort_keys, int level, int line)
{
    char buf[64];
    switch (v->kind) {
    case V_NONE:
        strbuf_cstr(r, b, "null");
        return;
    case V_BOOL:
        strbuf_cstr(r, b, v->as.boolean ? "true" : "false");
        return;
    case V_INT:
        snprintf(buf, sizeof buf, "%lld", (long long)v->as.integer);
        strbuf_cstr(r, b, buf);
        return;
    case V_FLOAT:
        if (isnan(v->as.real))
            strbuf_cstr(r, b, "NaN");
        else if (isinf(v->as.real))
            strbuf_cstr(r, b, v->as.real < 0 ? "-Infinity" : "Infinity");
        else {
            format_float(v->as.real, buf, sizeof buf);
            strbuf_cstr(r, b, buf);
        }
        return;
    case V_STRING:
        dump_json_string(r, b, v->as.str.s, v->as.str.n);
        return;
    case V_LIST:
        if (v->as.list.n == 0) {
            strbuf_cstr(r, b, "[]");
            return;
        }
        strbuf_cstr(r, b, "[");
        for (size_t i = 0; i < v->as.list.n; i++) {
            if (i) strbuf_cstr(r, b, item_sep);
            if (indent >= 0) json_newline(r, b, indent, level + 1);
            value_json(r, b, v->as.list.items[i], indent, item_sep, key_sep, sort_keys, level + 1,
                       line);
        }
        if (indent >= 0) json_newline(r, b, indent, level);
        strbuf_cstr(r, b, "]");
        return;
    case V_DICT: {
        if (v->as.dict.n == 0) {
            strbuf_cstr(r, b, "{}");
            return;
        }
        size_t n = v->as.dict.n;
        struct value ***order = arena_alloc(&r->arena, n * sizeof *order);
        for (size_t i = 0; i < n; i++) order[i] = &v->as.dict.keys[i];
        if (sort_keys) qsort(order, n, sizeof *order, compare_keys);
        strbuf_cstr(r, b, "{");
        for (size_t i = 0; i < n; i++) {
            size_t at = (size_t)(order[i] - v->as.dict.keys);
            const struct value *key = v->as.dict.keys[at];
            if (i) strbuf_cstr(r, b, item_sep);
            if (indent >= 0) json_newline(r, b, indent, level + 1);
            if (key->kind == V_STRING) {
                dump_json_string(r, b, key->as.str.s, key->as.str.n);
            } else if (key->kind == V_INT || key->kind == V_FLOAT || key->kind == V_BOOL ||
                       key->kind == V_NONE) {
                struct strbuf kb = {0};
                value_json(r, &kb, key, -1, ", ", ": ", false, 0, line);
                dump_json_string(r, b, kb.s, kb.n);
            } else {
                render_fail(r, line, "keys must be str, int, float, bool or None, not %s",
                            value_type_name(key));
            }
            strbuf_cstr(r, b, key_sep);
            value_json(r, b, v->as.dict.values[at], indent, item_sep, key_sep, sort_keys, level + 1,
                       line);
        }
        if (indent >= 0) json_newline(r, b, indent, level);
        strbuf_cstr(r, b, "}");
        return;
    }
    default:
        render_fail(r, line, "Object of type %s is not JSON serializable", value_type_name(v));
    }
}
