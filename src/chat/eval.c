/* src/chat/eval.c: renders a compiled chat template: statements (if, for with loop.*, set,
 * namespace attribute set, macro, break/continue) and expressions with Python's semantics as
 * jinja2 evaluates them, including jinja2's default Undefined (prints as nothing, is false,
 * iterates as empty, and fails when an attribute of it is taken or it enters arithmetic). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/internal.h"

enum flow { FLOW_NORMAL, FLOW_BREAK, FLOW_CONTINUE };

void render_fail(struct render *r, int line, const char *fmt, ...)
{
    va_list ap;
    int k = line > 0 ? snprintf(r->err, r->errlen, "%s:%d: ", r->tpl->name, line) : 0;
    va_start(ap, fmt);
    if (k >= 0 && (size_t)k < r->errlen) vsnprintf(r->err + k, r->errlen - (size_t)k, fmt, ap);
    va_end(ap);
    longjmp(r->fail, 1);
}

/* Python's integers do not overflow; esft's are 64 bits: a result that does not fit ends
 * the render rather than wrapping. Returns *value when overflowed is false (read after
 * the call's arguments, so it may be written by one of them). */
static int64_t checked(struct render *r, int line, bool overflowed, const int64_t *value)
{
    if (overflowed)
        render_fail(r, line, "integer overflow: the template computes a number beyond 64 bits");
    return *value;
}

static struct scope *scope_new(struct render *r, struct scope *parent)
{
    struct scope *s = arena_alloc(&r->arena, sizeof *s);
    memset(s, 0, sizeof *s);
    s->parent = parent;
    return s;
}

void scope_set(struct render *r, struct scope *s, const char *name, struct value *v)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name)) {
            s->values[i] = v;
            return;
        }
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 8;
        const char **names = arena_alloc(&r->arena, cap * sizeof *names);
        struct value **values = arena_alloc(&r->arena, cap * sizeof *values);
        if (s->n) {
            memcpy(names, s->names, s->n * sizeof *names);
            memcpy(values, s->values, s->n * sizeof *values);
        }
        s->names = names;
        s->values = values;
        s->cap = cap;
    }
    s->names[s->n] = name;
    s->values[s->n++] = v;
}

static struct value *scope_get(struct scope *s, const char *name)
{
    for (; s; s = s->parent)
        for (size_t i = s->n; i-- > 0;)
            if (!strcmp(s->names[i], name)) return s->values[i];
    return NULL;
}

static const char *fmt_hint(struct render *r, const char *fmt, const char *a, const char *b)
{
    size_t n = strlen(fmt) + strlen(a) + (b ? strlen(b) : 0) + 1;
    char *s = arena_alloc(&r->arena, n);
    snprintf(s, n, fmt, a, b);
    return s;
}

static _Noreturn void fail_undefined(struct render *r, const struct value *v, int line)
{
    render_fail(r, line, "%s", v->as.undefined.hint ? v->as.undefined.hint : "undefined value");
}

static const char *object_name(const struct value *v)
{
    switch (v->kind) {
    case V_NONE:
        return "None";
    case V_DICT:
        return "dict object";
    case V_LIST:
        return v->tuple ? "tuple object" : "list object";
    case V_STRING:
        return "str object";
    case V_INT:
        return "int object";
    case V_FLOAT:
        return "float object";
    case V_BOOL:
        return "bool object";
    case V_NAMESPACE:
        return "Namespace object";
    default:
        return "object";
    }
}

/* obj.name: Python attribute first (methods), then obj["name"] (jinja2's getattr). */
static struct value *get_attribute(struct render *r, struct value *obj, const char *name, int line)
{
    if (obj->kind == V_UNDEFINED) fail_undefined(r, obj, line);
    if (obj->kind == V_NAMESPACE) {
        struct value *v = dict_get_cstr(obj, name);
        return v ? v
                 : value_undefined(
                       r, fmt_hint(r, "'Namespace object' has no attribute '%s'", name, NULL));
    }
    struct value *m = method_lookup(r, obj, name, line);
    if (m) return m;
    if (obj->kind == V_DICT) {
        struct value *v = dict_get_cstr(obj, name);
        if (v) return v;
    }
    return value_undefined(r, fmt_hint(r, "'%s' has no attribute '%s'", object_name(obj), name));
}

static bool as_index(const struct value *v, int64_t *i)
{
    if (v->kind == V_INT) {
        *i = v->as.integer;
        return true;
    }
    if (v->kind == V_BOOL) {
        *i = v->as.boolean;
        return true;
    }
    return false;
}

/* Byte offset of code point k in a UTF-8 string of n bytes. */
static size_t utf8_offset(const char *s, size_t n, size_t k)
{
    size_t i = 0;
    while (k > 0 && i < n) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80) i++;
        k--;
    }
    return i;
}

size_t utf8_length(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80) k++;
    return k;
}

/* obj[key]: item first, then attribute for string keys (jinja2's getitem). */
static struct value *get_item(struct render *r, struct value *obj, struct value *key, int line)
{
    if (obj->kind == V_UNDEFINED) fail_undefined(r, obj, line);
    int64_t i;
    if (obj->kind == V_LIST && as_index(key, &i)) {
        int64_t n = (int64_t)obj->as.list.n;
        if (i < 0) i += n;
        if (i >= 0 && i < n) return obj->as.list.items[i];
    } else if (obj->kind == V_STRING && as_index(key, &i)) {
        int64_t n = (int64_t)utf8_length(obj->as.str.s, obj->as.str.n);
        if (i < 0) i += n;
        if (i >= 0 && i < n) {
            size_t a = utf8_offset(obj->as.str.s, obj->as.str.n, (size_t)i);
            size_t b = utf8_offset(obj->as.str.s, obj->as.str.n, (size_t)i + 1);
            return value_string(r, obj->as.str.s + a, b - a);
        }
    } else if (obj->kind == V_DICT) {
        struct value *v = dict_get(obj, key);
        if (v) return v;
    }
    if (key->kind == V_STRING) {
        if (obj->kind == V_NAMESPACE) return get_attribute(r, obj, key->as.str.s, line);
        struct value *m = method_lookup(r, obj, key->as.str.s, line);
        if (m) return m;
        return value_undefined(
            r, fmt_hint(r, "'%s' has no attribute '%s'", object_name(obj), key->as.str.s));
    }
    struct strbuf b = {0};
    value_repr(r, &b, key);
    return value_undefined(r, fmt_hint(r, "'%s' has no element %s", object_name(obj), b.s));
}

/* Python's slice.indices(). */
static void slice_indices(int64_t n, const struct value *start, const struct value *stop,
                          int64_t step, int64_t *a, int64_t *b)
{
    int64_t lo = step < 0 ? -1 : 0, hi = step < 0 ? n - 1 : n;
    if (!start) {
        *a = step < 0 ? hi : lo;
    } else {
        *a = start->as.integer;
        if (*a < 0) {
            *a += n;
            if (*a < lo) *a = lo;
        } else if (*a > hi) {
            *a = hi;
        }
    }
    if (!stop) {
        *b = step < 0 ? lo : hi;
    } else {
        *b = stop->as.integer;
        if (*b < 0) {
            *b += n;
            if (*b < lo) *b = lo;
        } else if (*b > hi) {
            *b = hi;
        }
    }
}

static struct value *slice_value(struct render *r, struct value *obj, struct value *start,
                                 struct value *stop, struct value *stepv, int line)
{
    if (obj->kind == V_UNDEFINED) fail_undefined(r, obj, line);
    struct value *bounds[3] = {start, stop, stepv};
    for (int k = 0; k < 3; k++) {
        if (bounds[k] && bounds[k]->kind == V_NONE) bounds[k] = NULL;
        if (bounds[k] && bounds[k]->kind == V_BOOL) bounds[k] = value_int(r, bounds[k]->as.boolean);
        if (bounds[k] && bounds[k]->kind != V_INT)
            render_fail(r, line, "slice indices must be integers or None");
    }
    int64_t step = bounds[2] ? bounds[2]->as.integer : 1;
    if (step == 0) render_fail(r, line, "slice step cannot be zero");
    int64_t n;
    if (obj->kind == V_LIST)
        n = (int64_t)obj->as.list.n;
    else if (obj->kind == V_STRING)
        n = (int64_t)utf8_length(obj->as.str.s, obj->as.str.n);
    else
        render_fail(r, line, "'%s' object is not subscriptable", value_type_name(obj));
    int64_t a, b;
    slice_indices(n, bounds[0], bounds[1], step, &a, &b);
    if (obj->kind == V_LIST) {
        struct value *l = value_list(r, 0);
        l->tuple = obj->tuple;
        for (int64_t i = a; step > 0 ? i < b : i > b; i += step)
            list_push(r, l, obj->as.list.items[i]);
        return l;
    }
    /* strings: by code point */
    size_t *offs = arena_alloc(&r->arena, ((size_t)n + 1) * sizeof *offs);
    for (int64_t i = 0, at = 0; i <= n; i++) {
        offs[i] = (size_t)at;
        if (i < n) {
            at++;
            while ((size_t)at < obj->as.str.n && ((unsigned char)obj->as.str.s[at] & 0xC0) == 0x80)
                at++;
        }
    }
    struct strbuf sb = {0};
    strbuf_add(r, &sb, "", 0);
    for (int64_t i = a; step > 0 ? i < b : i > b; i += step)
        strbuf_add(r, &sb, obj->as.str.s + offs[i], offs[i + 1] - offs[i]);
    return value_string(r, sb.s, sb.n);
}

struct value *value_iterable(struct render *r, struct value *v, int line)
{
    switch (v->kind) {
    case V_UNDEFINED:
        return value_list(r, 0);
    case V_LIST:
        return v;
    case V_DICT: {
        struct value *l = value_list(r, v->as.dict.n);
        for (size_t i = 0; i < v->as.dict.n; i++) list_push(r, l, v->as.dict.keys[i]);
        return l;
    }
    case V_STRING: {
        struct value *l = value_list(r, v->as.str.n);
        for (size_t i = 0; i < v->as.str.n;) {
            size_t j = i + 1;
            while (j < v->as.str.n && ((unsigned char)v->as.str.s[j] & 0xC0) == 0x80) j++;
            list_push(r, l, value_string(r, v->as.str.s + i, j - i));
            i = j;
        }
        return l;
    }
    default:
        render_fail(r, line, "'%s' object is not iterable", value_type_name(v));
    }
}

static bool contains(struct render *r, struct value *container, struct value *item, int line)
{
    switch (container->kind) {
    case V_UNDEFINED:
        return false;
    case V_STRING:
        if (item->kind == V_UNDEFINED) fail_undefined(r, item, line);
        if (item->kind != V_STRING)
            render_fail(r, line, "'in <string>' requires string as left operand, not %s",
                        value_type_name(item));
        if (item->as.str.n == 0) return true;
        for (size_t i = 0; i + item->as.str.n <= container->as.str.n; i++)
            if (!memcmp(container->as.str.s + i, item->as.str.s, item->as.str.n)) return true;
        return false;
    case V_LIST:
        for (size_t i = 0; i < container->as.list.n; i++)
            if (value_equal(container->as.list.items[i], item)) return true;
        return false;
    case V_DICT:
        return dict_get(container, item) != NULL;
    default:
        render_fail(r, line, "argument of type '%s' is not iterable", value_type_name(container));
    }
}

static bool is_numeric(const struct value *v)
{
    return v->kind == V_INT || v->kind == V_FLOAT || v->kind == V_BOOL;
}
static double num(const struct value *v)
{
    return v->kind == V_FLOAT ? v->as.real
           : v->kind == V_INT ? (double)v->as.integer
                              : v->as.boolean;
}
static int64_t inum(const struct value *v)
{
    return v->kind == V_INT ? v->as.integer : v->as.boolean;
}

static int compare_order(struct render *r, const char *op, struct value *a, struct value *b,
                         int line)
{
    if (a->kind == V_UNDEFINED) fail_undefined(r, a, line);
    if (b->kind == V_UNDEFINED) fail_undefined(r, b, line);
    if (is_numeric(a) && is_numeric(b)) {
        if (a->kind != V_FLOAT && b->kind != V_FLOAT)
            return (inum(a) > inum(b)) - (inum(a) < inum(b));
        return (num(a) > num(b)) - (num(a) < num(b));
    }
    if (a->kind == V_STRING && b->kind == V_STRING) {
        size_t n = a->as.str.n < b->as.str.n ? a->as.str.n : b->as.str.n;
        int k = memcmp(a->as.str.s, b->as.str.s, n);
        if (k) return k > 0 ? 1 : -1;
        return (a->as.str.n > b->as.str.n) - (a->as.str.n < b->as.str.n);
    }
    render_fail(r, line, "'%s' not supported between instances of '%s' and '%s'", op,
                value_type_name(a), value_type_name(b));
}

static struct value *binary_op(struct render *r, const char *op, struct value *a, struct value *b,
                               int line)
{
    if (!strcmp(op, "~")) {
        struct strbuf s = {0};
        strbuf_add(r, &s, "", 0);
        value_str(r, &s, a);
        value_str(r, &s, b);
        return value_string(r, s.s, s.n);
    }
    if (a->kind == V_UNDEFINED) fail_undefined(r, a, line);
    if (b->kind == V_UNDEFINED) fail_undefined(r, b, line);
    bool ints = (a->kind == V_INT || a->kind == V_BOOL) && (b->kind == V_INT || b->kind == V_BOOL);
    int64_t z = 0; /* an integer result, checked for overflow */
    bool nums = is_numeric(a) && is_numeric(b);
    if (!strcmp(op, "+")) {
        if (ints) return value_int(r, checked(r, line, __builtin_add_overflow(inum(a), inum(b), &z), &z));
        if (nums) return value_float(r, num(a) + num(b));
        if (a->kind == V_STRING && b->kind == V_STRING) {
            struct strbuf s = {0};
            strbuf_add(r, &s, a->as.str.s, a->as.str.n);
            strbuf_add(r, &s, b->as.str.s, b->as.str.n);
            return value_string(r, s.s, s.n);
        }
        if (a->kind == V_LIST && b->kind == V_LIST && a->tuple == b->tuple) {
            struct value *l = value_list(r, a->as.list.n + b->as.list.n);
            l->tuple = a->tuple;
            for (size_t i = 0; i < a->as.list.n; i++) list_push(r, l, a->as.list.items[i]);
            for (size_t i = 0; i < b->as.list.n; i++) list_push(r, l, b->as.list.items[i]);
            return l;
        }
    } else if (!strcmp(op, "-")) {
        if (ints) return value_int(r, checked(r, line, __builtin_sub_overflow(inum(a), inum(b), &z), &z));
        if (nums) return value_float(r, num(a) - num(b));
    } else if (!strcmp(op, "*")) {
        if (ints) return value_int(r, checked(r, line, __builtin_mul_overflow(inum(a), inum(b), &z), &z));
        if (nums) return value_float(r, num(a) * num(b));
        struct value *s = a->kind == V_STRING ? a : b->kind == V_STRING ? b : NULL;
        struct value *k = s == a ? b : a;
        if (s && (k->kind == V_INT || k->kind == V_BOOL)) {
            struct strbuf out = {0};
            strbuf_add(r, &out, "", 0);
            for (int64_t i = 0; i < inum(k); i++) {
                strbuf_add(r, &out, s->as.str.s, s->as.str.n);
                if (!s->as.str.n) break; /* the empty string repeated is empty */
            }
            return value_string(r, out.s, out.n);
        }
    } else if (!strcmp(op, "/")) {
        if (nums) {
            if (num(b) == 0) render_fail(r, line, "division by zero");
            return value_float(r, num(a) / num(b));
        }
    } else if (!strcmp(op, "//") || !strcmp(op, "%")) {
        if (ints) {
            int64_t x = inum(a), y = inum(b);
            if (y == 0) render_fail(r, line, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1) checked(r, line, true, &y);
            int64_t q = x / y, m = x % y;
            if (m != 0 && ((m < 0) != (y < 0))) {
                q--;
                m += y;
            }
            return value_int(r, op[0] == '%' ? m : q);
        }
        if (nums) {
            double x = num(a), y = num(b);
            if (y == 0) render_fail(r, line, "float division by zero");
            double m = fmod(x, y);
            if (m != 0 && ((m < 0) != (y < 0))) m += y;
            return value_float(r, op[0] == '%' ? m : floor(x / y));
        }
        if (op[0] == '%' && a->kind == V_STRING)
            render_fail(r, line, "unsupported construct: printf-style string formatting with '%%'");
    } else if (!strcmp(op, "**")) {
        if (ints && inum(b) >= 0) {
            int64_t x = inum(a), e = inum(b), p = 1;
            if (x == 0 || x == 1) return value_int(r, e == 0 ? 1 : x);
            if (x == -1) return value_int(r, e % 2 ? -1 : 1);
            while (e-- > 0) p = checked(r, line, __builtin_mul_overflow(p, x, &z), &z);
            return value_int(r, p);
        }
        if (nums) return value_float(r, pow(num(a), num(b)));
    }
    render_fail(r, line, "unsupported operand type(s) for %s: '%s' and '%s'", op,
                value_type_name(a), value_type_name(b));
}

static struct value *eval(struct render *r, struct scope *s, const struct node *n);
static enum flow exec_body(struct render *r, struct scope *s, const struct node_list *body,
                           struct strbuf *out);

static struct value *call_macro(struct render *r, const struct node *m, struct value **args,
                                size_t n_args, const char **kw_names, struct value **kw_values,
                                size_t n_kw, int line)
{
    if (n_args > m->n_names)
        render_fail(r, line, "macro '%s' takes not more than %zu argument(s)", m->name, m->n_names);
    if (++r->depth > 256)
        render_fail(r, line, "macro '%s': recursion deeper than 256 calls", m->name);
    struct scope *s = scope_new(r, r->root);
    for (size_t i = 0; i < n_kw; i++) {
        size_t k;
        for (k = 0; k < m->n_names; k++)
            if (!strcmp(m->names[k], kw_names[i])) break;
        if (k == m->n_names)
            render_fail(r, line, "macro '%s' takes no keyword argument '%s'", m->name, kw_names[i]);
        if (k < n_args)
            render_fail(r, line, "macro '%s' got multiple values for argument '%s'", m->name,
                        kw_names[i]);
    }
    for (size_t k = 0; k < m->n_names; k++) {
        struct value *v = NULL;
        if (k < n_args) v = args[k];
        for (size_t i = 0; !v && i < n_kw; i++)
            if (!strcmp(m->names[k], kw_names[i])) v = kw_values[i];
        if (!v && m->kwargs.items[k]) v = eval(r, s, m->kwargs.items[k]);
        if (!v)
            v = value_undefined(r,
                                fmt_hint(r, "parameter '%s' was not provided", m->names[k], NULL));
        scope_set(r, s, m->names[k], v);
    }
    struct strbuf out = {0};
    strbuf_add(r, &out, "", 0);
    exec_body(r, s, &m->body, &out);
    r->depth--;
    return value_string(r, out.s, out.n);
}

struct value *call_value(struct render *r, struct value *fn, struct value **args, size_t n_args,
                         const char **kw_names, struct value **kw_values, size_t n_kw, int line)
{
    if (fn->kind == V_MACRO) {
        /* A macro value built from a node: find its definition in the node. */
        return call_macro(r, fn->as.macro, args, n_args, kw_names, kw_values, n_kw, line);
    }
    if (fn->kind == V_BUILTIN)
        return fn->as.builtin.fn(r, fn->as.builtin.self, args, n_args, kw_names, kw_values, n_kw,
                                 line);
    if (fn->kind == V_UNDEFINED) fail_undefined(r, fn, line);
    render_fail(r, line, "'%s' object is not callable", value_type_name(fn));
}

static void eval_args(struct render *r, struct scope *s, const struct node *n, struct value ***args,
                      const char ***kw_names, struct value ***kw_values)
{
    *args = arena_alloc(&r->arena, (n->args.n + 1) * sizeof **args);
    for (size_t i = 0; i < n->args.n; i++) (*args)[i] = eval(r, s, n->args.items[i]);
    *kw_names = arena_alloc(&r->arena, (n->kwargs.n + 1) * sizeof **kw_names);
    *kw_values = arena_alloc(&r->arena, (n->kwargs.n + 1) * sizeof **kw_values);
    for (size_t i = 0; i < n->kwargs.n; i++) {
        (*kw_names)[i] = n->kwargs.items[i]->name;
        (*kw_values)[i] = eval(r, s, n->kwargs.items[i]->a);
    }
}

static struct value *eval(struct render *r, struct scope *s, const struct node *n)
{
    switch (n->kind) {
    case E_CONST:
        return n->constant;
    case E_NAME: {
        struct value *v = scope_get(s, n->name);
        return v ? v : value_undefined(r, fmt_hint(r, "'%s' is undefined", n->name, NULL));
    }
    case E_ATTR:
        return get_attribute(r, eval(r, s, n->a), n->name, n->line);
    case E_ITEM:
        return get_item(r, eval(r, s, n->a), eval(r, s, n->b), n->line);
    case E_SLICE:
        return slice_value(r, eval(r, s, n->a), n->b ? eval(r, s, n->b) : NULL,
                           n->c ? eval(r, s, n->c) : NULL, n->d ? eval(r, s, n->d) : NULL, n->line);
    case E_CALL: {
        struct value *fn = eval(r, s, n->a);
        struct value **args, **kw_values;
        const char **kw_names;
        eval_args(r, s, n, &args, &kw_names, &kw_values);
        return call_value(r, fn, args, n->args.n, kw_names, kw_values, n->kwargs.n, n->line);
    }
    case E_FILTER: {
        struct value *v = eval(r, s, n->a);
        struct value **args, **kw_values;
        const char **kw_names;
        eval_args(r, s, n, &args, &kw_names, &kw_values);
        return apply_filter(r, n->name, v, args, n->args.n, kw_names, kw_values, n->kwargs.n,
                            n->line);
    }
    case E_TEST: {
        struct value *v = eval(r, s, n->a);
        struct value **args, **kw_values;
        const char **kw_names;
        eval_args(r, s, n, &args, &kw_names, &kw_values);
        bool t = apply_test(r, n->name, v, args, n->args.n, n->line);
        return value_bool(n->negated ? !t : t);
    }
    case E_BINARY:
        return binary_op(r, n->name, eval(r, s, n->a), eval(r, s, n->b), n->line);
    case E_NEG:
    case E_POS: {
        struct value *v = eval(r, s, n->a);
        if (v->kind == V_UNDEFINED) fail_undefined(r, v, n->line);
        if (v->kind == V_INT || v->kind == V_BOOL)
            return value_int(r, n->kind == E_NEG && inum(v) == INT64_MIN
                                    ? checked(r, n->line, true, &v->as.integer)
                                : n->kind == E_NEG ? -inum(v)
                                                   : inum(v));
        if (v->kind == V_FLOAT) return value_float(r, n->kind == E_NEG ? -v->as.real : v->as.real);
        render_fail(r, n->line, "bad operand type for unary %c: '%s'", n->kind == E_NEG ? '-' : '+',
                    value_type_name(v));
    }
    case E_NOT:
        return value_bool(!value_truthy(eval(r, s, n->a)));
    case E_AND: {
        struct value *a = eval(r, s, n->a);
        return value_truthy(a) ? eval(r, s, n->b) : a;
    }
    case E_OR: {
        struct value *a = eval(r, s, n->a);
        return value_truthy(a) ? a : eval(r, s, n->b);
    }
    case E_COND:
        if (value_truthy(eval(r, s, n->a))) return eval(r, s, n->b);
        return n->c ? eval(r, s, n->c)
                    : value_undefined(r, "the inline if-expression evaluated to false and no "
                                         "else section was defined.");
    case E_LIST: {
        struct value *l = value_list(r, n->args.n);
        l->tuple = n->negated;
        for (size_t i = 0; i < n->args.n; i++) list_push(r, l, eval(r, s, n->args.items[i]));
        return l;
    }
    case E_DICT: {
        struct value *d = value_dict(r, V_DICT);
        for (size_t i = 0; i < n->args.n; i++)
            dict_set(r, d, eval(r, s, n->args.items[i]), eval(r, s, n->kwargs.items[i]));
        return d;
    }
    case E_COMPARE: {
        struct value *left = eval(r, s, n->a);
        for (size_t i = 0; i < n->n_names; i++) {
            struct value *right = eval(r, s, n->args.items[i]);
            const char *op = n->names[i];
            bool ok;
            if (!strcmp(op, "=="))
                ok = value_equal(left, right);
            else if (!strcmp(op, "!="))
                ok = !value_equal(left, right);
            else if (!strcmp(op, "in"))
                ok = contains(r, right, left, n->line);
            else if (!strcmp(op, "not in"))
                ok = !contains(r, right, left, n->line);
            else {
                int c = compare_order(r, op, left, right, n->line);
                ok = !strcmp(op, "<")    ? c < 0
                     : !strcmp(op, "<=") ? c <= 0
                     : !strcmp(op, ">")  ? c > 0
                                         : c >= 0;
            }
            if (!ok) return value_bool(false);
            left = right;
        }
        return value_bool(true);
    }
    default:
        render_fail(r, n->line, "internal error: statement in an expression");
    }
}

static void assign_targets(struct render *r, struct scope *s, const struct node *n, struct value *v)
{
    if (n->n_names == 1) {
        scope_set(r, s, n->names[0], v);
        return;
    }
    struct value *items = value_iterable(r, v, n->line);
    if (items->as.list.n != n->n_names)
        render_fail(r, n->line, "%s unpack %zu values into %zu names",
                    items->as.list.n > n->n_names ? "too many values to" : "not enough values to",
                    items->as.list.n, n->n_names);
    for (size_t i = 0; i < n->n_names; i++) scope_set(r, s, n->names[i], items->as.list.items[i]);
}

_Noreturn static void fail_steps(struct render *r, int line)
{
    render_fail(r, line,
                "the template ran more than %d statements and loop iterations: a runaway loop "
                "(one conversation needs far fewer)",
                CHAT_MAX_STEPS);
}

static enum flow exec_for(struct render *r, struct scope *s, const struct node *n,
                          struct strbuf *out)
{
    struct value *seq = value_iterable(r, eval(r, s, n->a), n->line);
    if (n->b) {
        struct value *kept = value_list(r, seq->as.list.n);
        for (size_t i = 0; i < seq->as.list.n; i++) {
            struct scope *fs = scope_new(r, s);
            assign_targets(r, fs, n, seq->as.list.items[i]);
            if (value_truthy(eval(r, fs, n->b))) list_push(r, kept, seq->as.list.items[i]);
        }
        seq = kept;
    }
    size_t len = seq->as.list.n;
    if (len == 0) {
        exec_body(r, s, &n->else_body, out);
        return FLOW_NORMAL;
    }
    for (size_t i = 0; i < len; i++) {
        if (++r->steps > CHAT_MAX_STEPS) fail_steps(r, n->line);
        struct scope *it = scope_new(r, s);
        struct value *loop = value_dict(r, V_DICT);
        static const char *const keys[] = {"index",  "index0",   "revindex", "revindex0",
                                           "first",  "last",     "length",   "depth",
                                           "depth0", "previtem", "nextitem"};
        struct value *vals[] = {
            value_int(r, (int64_t)i + 1),
            value_int(r, (int64_t)i),
            value_int(r, (int64_t)(len - i)),
            value_int(r, (int64_t)(len - i - 1)),
            value_bool(i == 0),
            value_bool(i + 1 == len),
            value_int(r, (int64_t)len),
            value_int(r, 1),
            value_int(r, 0),
            i > 0 ? seq->as.list.items[i - 1] : value_undefined(r, "there is no previous item"),
            i + 1 < len ? seq->as.list.items[i + 1] : value_undefined(r, "there is no next item")};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
            dict_set(r, loop, value_cstring(r, keys[k]), vals[k]);
        scope_set(r, it, "loop", loop);
        assign_targets(r, it, n, seq->as.list.items[i]);
        if (exec_body(r, it, &n->body, out) == FLOW_BREAK) break;
    }
    return FLOW_NORMAL;
}

static enum flow exec_body(struct render *r, struct scope *s, const struct node_list *body,
                           struct strbuf *out)
{
    for (size_t i = 0; i < body->n; i++) {
        const struct node *n = body->items[i];
        if (++r->steps > CHAT_MAX_STEPS) fail_steps(r, n->line);
        switch (n->kind) {
        case N_TEXT:
            strbuf_add(r, out, n->text, n->text_len);
            break;
        case N_OUTPUT:
            value_str(r, out, eval(r, s, n->a));
            break;
        case N_IF: {
            enum flow f =
                exec_body(r, s, value_truthy(eval(r, s, n->a)) ? &n->body : &n->else_body, out);
            if (f != FLOW_NORMAL) return f;
            break;
        }
        case N_FOR:
            exec_for(r, s, n, out);
            break;
        case N_SET:
            assign_targets(r, s, n, eval(r, s, n->a));
            break;
        case N_SET_BLOCK: {
            struct strbuf b = {0};
            strbuf_add(r, &b, "", 0);
            exec_body(r, s, &n->body, &b);
            scope_set(r, s, n->names[0], value_string(r, b.s, b.n));
            break;
        }
        case N_SET_ATTR: {
            struct value *ns = eval(r, s, n->b);
            if (ns->kind != V_NAMESPACE)
                render_fail(r, n->line, "cannot assign attribute on non-namespace object");
            if (n->name[0] == '_')
                render_fail(r, n->line,
                            "Chat templates cannot store underscore-prefixed attributes on a "
                            "namespace, but got '%s'. Please rename the attribute.",
                            n->name);
            dict_set(r, ns, value_cstring(r, n->name), eval(r, s, n->a));
            break;
        }
        case N_MACRO: {
            struct value *m = value_dict(r, V_MACRO);
            m->as.macro = n;
            scope_set(r, s, n->name, m);
            break;
        }
        case N_GENERATION: {
            /* transformers records a block's offsets in the rendered chat, so a block
             * rendered into anything else (a macro's or a call's result) has none */
            if (out != r->top)
                render_fail(r, n->line,
                            "a {%% generation %%} block inside a macro or a captured value is "
                            "not supported");
            size_t start = out->n;
            enum flow f = exec_body(r, s, &n->body, out);
            if (r->n_spans == r->spans_cap) {
                size_t cap = r->spans_cap ? 2 * r->spans_cap : 8;
                struct chat_span *grown = realloc(r->spans, cap * sizeof *grown);
                if (!grown) render_fail(r, n->line, "out of memory");
                r->spans = grown;
                r->spans_cap = cap;
            }
            r->spans[r->n_spans++] = (struct chat_span){start, out->n};
            if (f != FLOW_NORMAL) return f;
            break;
        }
        case N_BREAK:
            return FLOW_BREAK;
        case N_CONTINUE:
            return FLOW_CONTINUE;
        default:
            render_fail(r, n->line, "internal error: expression as a statement");
        }
    }
    return FLOW_NORMAL;
}

struct chat_template *chat_template_compile(const char *text, const char *name, char *err,
                                            size_t errlen)
{
    struct chat_template *tpl = calloc(1, sizeof *tpl);
    if (!tpl) {
        snprintf(err, errlen, "%s: out of memory", name);
        return NULL;
    }
    tpl->name = arena_strndup(&tpl->arena, name, strlen(name));
    struct token_list tokens;
    if (chat_lex(&tpl->arena, text, tpl->name, &tokens, err, errlen) ||
        chat_parse(&tpl->arena, &tokens, tpl->name, &tpl->body, err, errlen)) {
        chat_template_free(tpl);
        return NULL;
    }
    for (size_t i = 0; i + 1 < tokens.n; i++)
        if (tokens.items[i].type == TOK_BLOCK_BEGIN && tokens.items[i + 1].type == TOK_NAME &&
            tokens.items[i + 1].len == 10 && !memcmp(tokens.items[i + 1].text, "generation", 10))
            tpl->has_generation = true;
    return tpl;
}

void chat_template_free(struct chat_template *tpl)
{
    if (!tpl) return;
    arena_free(&tpl->arena);
    free(tpl);
}

bool chat_template_has_generation(const struct chat_template *tpl)
{
    return tpl->has_generation;
}

char *chat_template_render(const struct chat_template *tpl, const json_t *context,
                           const struct chat_render_options *options, char *err, size_t errlen)
{
    return chat_template_render_spans(tpl, context, options, NULL, NULL, err, errlen);
}

char *chat_template_render_spans(const struct chat_template *tpl, const json_t *context,
                                 const struct chat_render_options *options,
                                 struct chat_span **spans, size_t *n_spans, char *err,
                                 size_t errlen)
{
    static const struct chat_render_options defaults = {0};
    struct render *volatile r = calloc(1, sizeof *r); /* used after a longjmp */
    if (!r) {
        snprintf(err, errlen, "%s: out of memory", tpl->name);
        return NULL;
    }
    r->tpl = tpl;
    r->options = options ? options : &defaults;
    r->err = err;
    r->errlen = errlen;
    char *volatile result = NULL; /* read after a longjmp */
    if (setjmp(r->fail) == 0) {
        if (context && !json_is_object(context))
            render_fail(r, 0, "%s: the render context is not a JSON object", tpl->name);
        struct scope *globals = scope_new(r, NULL);
        install_globals(r, globals);
        r->root = scope_new(r, globals);
        if (context) {
            const char *key;
            json_t *v;
            json_object_foreach((json_t *)context, key, v) scope_set(
                r, r->root, arena_strndup(&r->arena, key, strlen(key)), value_from_json(r, v));
        }
        struct strbuf out = {0};
        strbuf_add(r, &out, "", 0);
        r->top = &out;
        exec_body(r, r->root, &tpl->body, &out);
        result = malloc(out.n + 1);
        if (result)
            memcpy(result, out.s, out.n + 1);
        else
            snprintf(err, errlen, "%s: out of memory", tpl->name);
    }
    if (result && spans) {
        *spans = r->spans;
        *n_spans = r->n_spans;
    } else {
        free(r->spans);
    }
    arena_free(&r->arena);
    free(r);
    return result;
}
