/* src/chat/builtins.c: the filters, tests, globals and str/dict methods that chat templates call,
 * each with the behaviour of its python jinja2 3.x / Python 3 counterpart (tojson as transformers
 * overrides it: json.dumps with ensure_ascii=False). The str operations themselves are in
 * text.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat/internal.h"

/* ---- argument helpers ---- */

struct args {
    struct render *r;
    const char *what;
    struct value **pos;
    size_t n_pos;
    const char **kw_names;
    struct value **kw_values;
    size_t n_kw;
    int line;
};

/* The argument at position i or named name, or NULL. */
static struct value *arg(struct args *a, size_t i, const char *name)
{
    if (i < a->n_pos) return a->pos[i];
    for (size_t k = 0; k < a->n_kw; k++)
        if (name && !strcmp(a->kw_names[k], name)) return a->kw_values[k];
    return NULL;
}

static void check_arity(struct args *a, size_t max_pos, const char *const *names)
{
    if (a->n_pos > max_pos)
        render_fail(a->r, a->line, "%s takes at most %zu positional argument(s), got %zu", a->what,
                    max_pos, a->n_pos);
    for (size_t k = 0; k < a->n_kw; k++) {
        bool ok = false;
        for (size_t i = 0; names && names[i]; i++)
            if (!strcmp(names[i], a->kw_names[k])) ok = true;
        if (!ok)
            render_fail(a->r, a->line, "%s got an unexpected keyword argument '%s'", a->what,
                        a->kw_names[k]);
    }
}

static struct value *need_string(struct args *a, struct value *v, const char *role)
{
    if (v->kind == V_UNDEFINED)
        render_fail(a->r, a->line, "%s", v->as.undefined.hint ? v->as.undefined.hint : "undefined");
    if (v->kind != V_STRING)
        render_fail(a->r, a->line, "%s: %s must be a string, not %s", a->what, role,
                    value_type_name(v));
    return v;
}

static bool starts_or_ends(struct args *a, struct value *self, bool ends)
{
    struct value *p = arg(a, 0, NULL);
    if (!p) render_fail(a->r, a->line, "%s expects at least 1 argument", a->what);
    size_t n_alts = p->kind == V_LIST ? p->as.list.n : 1;
    for (size_t k = 0; k < n_alts; k++) {
        struct value *x = need_string(a, p->kind == V_LIST ? p->as.list.items[k] : p, "prefix");
        size_t m = x->as.str.n, n = self->as.str.n;
        if (m <= n && !memcmp(self->as.str.s + (ends ? n - m : 0), x->as.str.s, m)) return true;
    }
    return false;
}

/* ---- methods ---- */

#define METHOD(name)                                                                               \
    static struct value *name(struct render *r, struct value *self, struct value **pos,            \
                              size_t n_pos, const char **kw_names, struct value **kw_values,       \
                              size_t n_kw, int line)
#define ARGS(label)                                                                                \
    struct args a = {r, label, pos, n_pos, kw_names, kw_values, n_kw, line};                       \
    (void)a

METHOD(m_startswith)
{
    ARGS("str.startswith");
    check_arity(&a, 1, NULL);
    return value_bool(starts_or_ends(&a, self, false));
}
METHOD(m_endswith)
{
    ARGS("str.endswith");
    check_arity(&a, 1, NULL);
    return value_bool(starts_or_ends(&a, self, true));
}
static struct value *chars_arg(struct args *a)
{
    struct value *c = arg(a, 0, "chars");
    if (c && c->kind != V_NONE) need_string(a, c, "chars");
    return c;
}
METHOD(m_strip)
{
    ARGS("str.strip");
    check_arity(&a, 1, NULL);
    return text_strip(r, self, chars_arg(&a), true, true);
}
METHOD(m_lstrip)
{
    ARGS("str.lstrip");
    check_arity(&a, 1, NULL);
    return text_strip(r, self, chars_arg(&a), true, false);
}
METHOD(m_rstrip)
{
    ARGS("str.rstrip");
    check_arity(&a, 1, NULL);
    return text_strip(r, self, chars_arg(&a), false, true);
}
METHOD(m_split)
{
    ARGS("str.split");
    static const char *const names[] = {"sep", "maxsplit", NULL};
    check_arity(&a, 2, names);
    struct value *m = arg(&a, 1, "maxsplit");
    return text_split(r, self, arg(&a, 0, "sep"), m ? m->as.integer : -1, line);
}
METHOD(m_replace)
{
    ARGS("str.replace");
    check_arity(&a, 3, NULL);
    struct value *old = arg(&a, 0, NULL), *new = arg(&a, 1, NULL), *count = arg(&a, 2, NULL);
    if (!old || !new) render_fail(r, line, "str.replace expects 2 arguments");
    return text_replace(r, self, need_string(&a, old, "old"), need_string(&a, new, "new"),
                        count ? count->as.integer : -1);
}
METHOD(m_upper)
{
    ARGS("str.upper");
    check_arity(&a, 0, NULL);
    return text_map_case(r, self, CASE_UPPER);
}
METHOD(m_lower)
{
    ARGS("str.lower");
    check_arity(&a, 0, NULL);
    return text_map_case(r, self, CASE_LOWER);
}
METHOD(m_title)
{
    ARGS("str.title");
    check_arity(&a, 0, NULL);
    return text_map_case(r, self, CASE_TITLE);
}
METHOD(m_capitalize)
{
    ARGS("str.capitalize");
    check_arity(&a, 0, NULL);
    return text_map_case(r, self, CASE_CAPITALIZE);
}
METHOD(m_find)
{
    ARGS("str.find");
    check_arity(&a, 1, NULL);
    struct value *x = need_string(&a, arg(&a, 0, NULL) ? arg(&a, 0, NULL) : value_none(), "sub");
    for (size_t i = 0; i + x->as.str.n <= self->as.str.n; i++)
        if (!memcmp(self->as.str.s + i, x->as.str.s, x->as.str.n))
            return value_int(r, (int64_t)utf8_length(self->as.str.s, i));
    return value_int(r, -1);
}
METHOD(m_items)
{
    ARGS("dict.items");
    check_arity(&a, 0, NULL);
    struct value *l = value_list(r, self->as.dict.n);
    for (size_t i = 0; i < self->as.dict.n; i++) {
        struct value *pair = value_list(r, 2);
        pair->tuple = true;
        list_push(r, pair, self->as.dict.keys[i]);
        list_push(r, pair, self->as.dict.values[i]);
        list_push(r, l, pair);
    }
    return l;
}
METHOD(m_keys)
{
    ARGS("dict.keys");
    check_arity(&a, 0, NULL);
    struct value *l = value_list(r, self->as.dict.n);
    for (size_t i = 0; i < self->as.dict.n; i++) list_push(r, l, self->as.dict.keys[i]);
    return l;
}
METHOD(m_values)
{
    ARGS("dict.values");
    check_arity(&a, 0, NULL);
    struct value *l = value_list(r, self->as.dict.n);
    for (size_t i = 0; i < self->as.dict.n; i++) list_push(r, l, self->as.dict.values[i]);
    return l;
}
METHOD(m_get)
{
    ARGS("dict.get");
    check_arity(&a, 2, NULL);
    struct value *key = arg(&a, 0, NULL);
    if (!key) render_fail(r, line, "dict.get expects at least 1 argument");
    struct value *v = dict_get(self, key);
    struct value *d = arg(&a, 1, NULL);
    return v ? v : d ? d : value_none();
}
METHOD(m_immutable)
{
    (void)self;
    (void)pos;
    (void)n_pos;
    (void)kw_names;
    (void)kw_values;
    (void)n_kw;
    render_fail(r, line,
                "access to a method that modifies a value is unsafe (the sandbox is immutable)");
}

struct method {
    enum value_kind kind;
    const char *name;
    builtin_fn fn;
};
static const struct method methods[] = {
    {V_STRING, "startswith", m_startswith},
    {V_STRING, "endswith", m_endswith},
    {V_STRING, "strip", m_strip},
    {V_STRING, "lstrip", m_lstrip},
    {V_STRING, "rstrip", m_rstrip},
    {V_STRING, "split", m_split},
    {V_STRING, "replace", m_replace},
    {V_STRING, "upper", m_upper},
    {V_STRING, "lower", m_lower},
    {V_STRING, "title", m_title},
    {V_STRING, "capitalize", m_capitalize},
    {V_STRING, "find", m_find},
    {V_DICT, "items", m_items},
    {V_DICT, "keys", m_keys},
    {V_DICT, "values", m_values},
    {V_DICT, "get", m_get},
    {V_DICT, "pop", m_immutable},
    {V_DICT, "update", m_immutable},
    {V_DICT, "setdefault", m_immutable},
    {V_DICT, "clear", m_immutable},
    {V_DICT, "popitem", m_immutable},
    {V_LIST, "append", m_immutable},
    {V_LIST, "extend", m_immutable},
    {V_LIST, "insert", m_immutable},
    {V_LIST, "pop", m_immutable},
    {V_LIST, "remove", m_immutable},
    {V_LIST, "reverse", m_immutable},
    {V_LIST, "sort", m_immutable},
    {V_LIST, "clear", m_immutable},
};

/* Python methods chat templates are not known to use: taking one is refused by name rather
 * than read as a missing attribute (which would render differently from jinja2). */
static const char *const unsupported_str_methods[] = {
    "join",         "format",       "count",      "index",     "rfind",   "rindex",     "rsplit",
    "splitlines",   "partition",    "rpartition", "center",    "ljust",   "rjust",      "zfill",
    "swapcase",     "casefold",     "isdigit",    "isalpha",   "isalnum", "isspace",    "islower",
    "isupper",      "istitle",      "isnumeric",  "isdecimal", "encode",  "expandtabs", "translate",
    "removeprefix", "removesuffix", NULL};

struct value *method_lookup(struct render *r, struct value *self, const char *name, int line)
{
    for (size_t i = 0; i < sizeof methods / sizeof *methods; i++)
        if (methods[i].kind == self->kind && !strcmp(methods[i].name, name)) {
            struct value *v = value_dict(r, V_BUILTIN);
            v->as.builtin.name = methods[i].name;
            v->as.builtin.fn = methods[i].fn;
            v->as.builtin.self = self;
            return v;
        }
    if (self->kind == V_STRING)
        for (size_t i = 0; unsupported_str_methods[i]; i++)
            if (!strcmp(unsupported_str_methods[i], name))
                render_fail(r, line, "unsupported construct: str.%s()", name);
    return NULL;
}

/* ---- globals ---- */

METHOD(g_raise_exception)
{
    (void)self;
    (void)kw_names;
    (void)kw_values;
    (void)n_kw;
    (void)line;
    struct strbuf b = {0};
    strbuf_add(r, &b, "", 0);
    if (n_pos > 0) value_str(r, &b, pos[0]);
    render_fail(r, 0, "%s", b.s);
}

METHOD(g_strftime_now)
{
    ARGS("strftime_now");
    (void)self;
    check_arity(&a, 1, NULL);
    struct value *f = need_string(&a, arg(&a, 0, NULL) ? arg(&a, 0, NULL) : value_none(), "format");
    struct tm tm;
    time_t now = r->options->now;
    if (now) {
        gmtime_r(&now, &tm);
    } else {
        now = time(NULL);
        localtime_r(&now, &tm);
    }
    char buf[512];
    size_t n = strftime(buf, sizeof buf, f->as.str.s, &tm);
    return value_string(r, buf, n);
}

METHOD(g_namespace)
{
    (void)self;
    struct value *ns = value_dict(r, V_NAMESPACE);
    for (size_t i = 0; i < n_pos; i++) {
        if (pos[i]->kind != V_DICT)
            render_fail(r, line, "namespace() takes a mapping as positional argument");
        for (size_t k = 0; k < pos[i]->as.dict.n; k++)
            dict_set(r, ns, pos[i]->as.dict.keys[k], pos[i]->as.dict.values[k]);
    }
    for (size_t i = 0; i < n_kw; i++) dict_set(r, ns, value_cstring(r, kw_names[i]), kw_values[i]);
    return ns;
}

METHOD(g_dict)
{
    (void)self;
    struct value *d = value_dict(r, V_DICT);
    for (size_t i = 0; i < n_pos; i++) {
        if (pos[i]->kind != V_DICT)
            render_fail(r, line, "unsupported construct: dict() of a non-mapping");
        for (size_t k = 0; k < pos[i]->as.dict.n; k++)
            dict_set(r, d, pos[i]->as.dict.keys[k], pos[i]->as.dict.values[k]);
    }
    for (size_t i = 0; i < n_kw; i++) dict_set(r, d, value_cstring(r, kw_names[i]), kw_values[i]);
    return d;
}

METHOD(g_range)
{
    ARGS("range");
    (void)self;
    check_arity(&a, 3, NULL);
    int64_t v[3] = {0, 0, 1};
    for (size_t i = 0; i < n_pos; i++) {
        if (pos[i]->kind != V_INT && pos[i]->kind != V_BOOL)
            render_fail(r, line, "range() takes integers, not %s", value_type_name(pos[i]));
        v[i] = pos[i]->kind == V_INT ? pos[i]->as.integer : pos[i]->as.boolean;
    }
    int64_t start = n_pos >= 2 ? v[0] : 0, stop = n_pos >= 2 ? v[1] : v[0];
    int64_t step = n_pos == 3 ? v[2] : 1;
    if (n_pos == 0 || step == 0) render_fail(r, line, "range() needs a stop and a non-zero step");
    struct value *l = value_list(r, 0);
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (l->as.list.n > 100000) render_fail(r, line, "range too big");
        list_push(r, l, value_int(r, i));
    }
    return l;
}

static void add_global(struct render *r, struct scope *s, const char *name, builtin_fn fn)
{
    struct value *v = value_dict(r, V_BUILTIN);
    v->as.builtin.name = name;
    v->as.builtin.fn = fn;
    scope_set(r, s, name, v);
}

void install_globals(struct render *r, struct scope *root)
{
    add_global(r, root, "raise_exception", g_raise_exception);
    add_global(r, root, "strftime_now", g_strftime_now);
    add_global(r, root, "namespace", g_namespace);
    add_global(r, root, "dict", g_dict);
    add_global(r, root, "range", g_range);
}

/* ---- filters ---- */

static const char *const filter_names[] = {
    "length",  "count",  "join",   "first",  "last",    "items",      "trim",
    "default", "d",      "tojson", "upper",  "lower",   "title",      "capitalize",
    "replace", "string", "int",    "float",  "list",    "selectattr", "rejectattr",
    "map",     "abs",    "safe",   "unique", "reverse", NULL};

bool filter_known(const char *name)
{
    for (size_t i = 0; filter_names[i]; i++)
        if (!strcmp(filter_names[i], name)) return true;
    return false;
}

static struct value *length_of(struct render *r, struct value *v, int line)
{
    switch (v->kind) {
    case V_UNDEFINED:
        return value_int(r, 0);
    case V_STRING:
        return value_int(r, (int64_t)utf8_length(v->as.str.s, v->as.str.n));
    case V_LIST:
        return value_int(r, (int64_t)v->as.list.n);
    case V_DICT:
        return value_int(r, (int64_t)v->as.dict.n);
    default:
        render_fail(r, line, "object of type '%s' has no len()", value_type_name(v));
    }
}

/* jinja2's attribute path for selectattr/map/join(attribute=): "a.b" or "0". */
static struct value *attribute_path(struct render *r, struct value *v, struct value *path, int line)
{
    if (path->kind == V_INT) {
        if (v->kind == V_LIST && path->as.integer >= 0 && (size_t)path->as.integer < v->as.list.n)
            return v->as.list.items[path->as.integer];
        return value_undefined(r, "no such element");
    }
    if (path->kind != V_STRING) render_fail(r, line, "attribute must be a string or an integer");
    const char *s = path->as.str.s;
    while (*s) {
        const char *dot = strchr(s, '.');
        size_t n = dot ? (size_t)(dot - s) : strlen(s);
        char *part = arena_strndup(&r->arena, s, n);
        if (v->kind == V_DICT || v->kind == V_NAMESPACE) {
            struct value *x = dict_get_cstr(v, part);
            v = x ? x : value_undefined(r, "no such attribute");
        } else {
            v = value_undefined(r, "no such attribute");
        }
        s += n + (dot ? 1 : 0);
        if (!dot) break;
    }
    return v;
}

struct value *apply_filter(struct render *r, const char *name, struct value *v, struct value **pos,
                           size_t n_pos, const char **kw_names, struct value **kw_values,
                           size_t n_kw, int line)
{
    struct args a = {r, name, pos, n_pos, kw_names, kw_values, n_kw, line};
    char what[64];
    snprintf(what, sizeof what, "filter '%s'", name);
    a.what = what;
    if (!strcmp(name, "length") || !strcmp(name, "count")) {
        check_arity(&a, 0, NULL);
        return length_of(r, v, line);
    }
    if (!strcmp(name, "default") || !strcmp(name, "d")) {
        static const char *const names[] = {"default_value", "boolean", NULL};
        check_arity(&a, 2, names);
        struct value *d = arg(&a, 0, "default_value"), *boolean = arg(&a, 1, "boolean");
        bool use = v->kind == V_UNDEFINED || (boolean && value_truthy(boolean) && !value_truthy(v));
        return use ? (d ? d : value_string(r, "", 0)) : v;
    }
    if (!strcmp(name, "safe")) {
        check_arity(&a, 0, NULL);
        return v;
    }
    if (!strcmp(name, "string")) {
        check_arity(&a, 0, NULL);
        return value_to_string(r, v);
    }
    if (!strcmp(name, "tojson")) {
        static const char *const names[] = {"ensure_ascii", "indent", "separators", "sort_keys",
                                            NULL};
        check_arity(&a, 4, names);
        struct value *ea = arg(&a, 0, "ensure_ascii"), *indent = arg(&a, 1, "indent"),
                     *seps = arg(&a, 2, "separators"), *sort = arg(&a, 3, "sort_keys");
        if (ea && value_truthy(ea))
            render_fail(r, line, "unsupported construct: tojson(ensure_ascii=true)");
        int ind = -1;
        if (indent && indent->kind != V_NONE) {
            if (indent->kind != V_INT)
                render_fail(r, line, "unsupported construct: tojson indent that is not an integer");
            ind = (int)indent->as.integer;
            if (ind < 0) ind = 0;
        }
        const char *item_sep = ind >= 0 ? "," : ", ", *key_sep = ": ";
        if (seps && seps->kind != V_NONE) {
            if (seps->kind != V_LIST || seps->as.list.n != 2 ||
                seps->as.list.items[0]->kind != V_STRING ||
                seps->as.list.items[1]->kind != V_STRING)
                render_fail(r, line, "tojson separators must be a pair of strings");
            item_sep = seps->as.list.items[0]->as.str.s;
            key_sep = seps->as.list.items[1]->as.str.s;
        }
        struct strbuf b = {0};
        strbuf_add(r, &b, "", 0);
        value_json(r, &b, v, ind, item_sep, key_sep, sort && value_truthy(sort), 0, line);
        return value_string(r, b.s, b.n);
    }
    if (!strcmp(name, "join")) {
        static const char *const names[] = {"d", "attribute", NULL};
        check_arity(&a, 2, names);
        struct value *sep = arg(&a, 0, "d"), *attr = arg(&a, 1, "attribute");
        struct value *items = value_iterable(r, v, line);
        struct strbuf b = {0};
        strbuf_add(r, &b, "", 0);
        for (size_t i = 0; i < items->as.list.n; i++) {
            if (i && sep) value_str(r, &b, sep);
            struct value *x = items->as.list.items[i];
            value_str(r, &b, attr ? attribute_path(r, x, attr, line) : x);
        }
        return value_string(r, b.s, b.n);
    }
    if (!strcmp(name, "first") || !strcmp(name, "last")) {
        check_arity(&a, 0, NULL);
        struct value *items = value_iterable(r, v, line);
        if (items->as.list.n == 0)
            return value_undefined(r, name[0] == 'f' ? "No first item, sequence was empty."
                                                     : "No last item, sequence was empty.");
        return items->as.list.items[name[0] == 'f' ? 0 : items->as.list.n - 1];
    }
    if (!strcmp(name, "items")) {
        check_arity(&a, 0, NULL);
        if (v->kind == V_UNDEFINED) return value_list(r, 0);
        if (v->kind != V_DICT) render_fail(r, line, "Can only get item pairs from a mapping.");
        return m_items(r, v, NULL, 0, NULL, NULL, 0, line);
    }
    if (!strcmp(name, "list")) {
        check_arity(&a, 0, NULL);
        struct value *items = value_iterable(r, v, line);
        struct value *l = value_list(r, items->as.list.n);
        for (size_t i = 0; i < items->as.list.n; i++) list_push(r, l, items->as.list.items[i]);
        return l;
    }
    if (!strcmp(name, "reverse")) {
        check_arity(&a, 0, NULL);
        if (v->kind == V_STRING) {
            struct value *items = value_iterable(r, v, line);
            struct strbuf b = {0};
            strbuf_add(r, &b, "", 0);
            for (size_t i = items->as.list.n; i-- > 0;) value_str(r, &b, items->as.list.items[i]);
            return value_string(r, b.s, b.n);
        }
        struct value *items = value_iterable(r, v, line);
        struct value *l = value_list(r, items->as.list.n);
        for (size_t i = items->as.list.n; i-- > 0;) list_push(r, l, items->as.list.items[i]);
        return l;
    }
    if (!strcmp(name, "unique")) {
        check_arity(&a, 0, NULL);
        struct value *items = value_iterable(r, v, line);
        struct value *l = value_list(r, items->as.list.n);
        for (size_t i = 0; i < items->as.list.n; i++) {
            bool seen = false;
            for (size_t k = 0; k < l->as.list.n; k++)
                if (value_equal(l->as.list.items[k], items->as.list.items[i])) seen = true;
            if (!seen) list_push(r, l, items->as.list.items[i]);
        }
        return l;
    }
    if (!strcmp(name, "selectattr") || !strcmp(name, "rejectattr")) {
        check_arity(&a, 3, NULL);
        struct value *attr = arg(&a, 0, NULL), *test = arg(&a, 1, NULL);
        if (!attr) render_fail(r, line, "%s needs an attribute name", what);
        if (test && (test->kind != V_STRING || !test_known(test->as.str.s)))
            render_fail(r, line, "unsupported test in %s", what);
        struct value *items = value_iterable(r, v, line);
        struct value *l = value_list(r, 0);
        for (size_t i = 0; i < items->as.list.n; i++) {
            struct value *x = attribute_path(r, items->as.list.items[i], attr, line);
            bool t =
                test ? apply_test(r, test->as.str.s, x, pos + 2, n_pos > 2 ? n_pos - 2 : 0, line)
                     : value_truthy(x);
            if (t == (name[0] == 's')) list_push(r, l, items->as.list.items[i]);
        }
        return l;
    }
    if (!strcmp(name, "map")) {
        static const char *const names[] = {"attribute", "default", NULL};
        struct value *items = value_iterable(r, v, line);
        struct value *l = value_list(r, items->as.list.n);
        struct value *attr = NULL, *dflt = NULL;
        for (size_t k = 0; k < n_kw; k++) {
            if (!strcmp(kw_names[k], "attribute"))
                attr = kw_values[k];
            else if (!strcmp(kw_names[k], "default"))
                dflt = kw_values[k];
        }
        if (attr) {
            check_arity(&a, 0, names);
            for (size_t i = 0; i < items->as.list.n; i++) {
                struct value *x = attribute_path(r, items->as.list.items[i], attr, line);
                list_push(r, l, x->kind == V_UNDEFINED && dflt ? dflt : x);
            }
            return l;
        }
        if (n_pos < 1 || pos[0]->kind != V_STRING || !filter_known(pos[0]->as.str.s) || n_kw)
            render_fail(r, line, "unsupported construct: this form of the map filter");
        for (size_t i = 0; i < items->as.list.n; i++)
            list_push(r, l,
                      apply_filter(r, pos[0]->as.str.s, items->as.list.items[i], pos + 1, n_pos - 1,
                                   NULL, NULL, 0, line));
        return l;
    }
    if (!strcmp(name, "int") || !strcmp(name, "float")) {
        check_arity(&a, 1, NULL);
        bool want_int = name[0] == 'i';
        if (v->kind == V_UNDEFINED)
            render_fail(r, line, "%s", v->as.undefined.hint ? v->as.undefined.hint : "undefined");
        struct value *d = arg(&a, 0, "default");
        if (v->kind == V_INT || v->kind == V_BOOL)
            return want_int
                       ? value_int(r, v->kind == V_INT ? v->as.integer : v->as.boolean)
                       : value_float(r, v->kind == V_INT ? (double)v->as.integer : v->as.boolean);
        if (v->kind == V_FLOAT) return want_int ? value_int(r, (int64_t)v->as.real) : v;
        if (v->kind == V_STRING) {
            struct value *t = text_strip(r, v, NULL, true, true);
            char *end;
            if (want_int) {
                long long x = strtoll(t->as.str.s, &end, 10);
                if (t->as.str.n && *end == 0) return value_int(r, x);
            }
            double f = strtod(t->as.str.s, &end);
            if (t->as.str.n && *end == 0)
                return want_int ? value_int(r, (int64_t)f) : value_float(r, f);
        }
        return d ? d : want_int ? value_int(r, 0) : value_float(r, 0.0);
    }
    if (!strcmp(name, "abs")) {
        check_arity(&a, 0, NULL);
        if (v->kind == V_INT)
            return value_int(r, v->as.integer < 0 ? -v->as.integer : v->as.integer);
        if (v->kind == V_FLOAT) return value_float(r, v->as.real < 0 ? -v->as.real : v->as.real);
        render_fail(r, line, "bad operand type for abs(): '%s'", value_type_name(v));
    }
    /* string filters: jinja2 applies them to str(value) */
    struct value *s = value_to_string(r, v);
    if (!strcmp(name, "trim")) {
        check_arity(&a, 1, NULL);
        return text_strip(r, s, chars_arg(&a), true, true);
    }
    if (!strcmp(name, "upper")) return text_map_case(r, s, CASE_UPPER);
    if (!strcmp(name, "lower")) return text_map_case(r, s, CASE_LOWER);
    if (!strcmp(name, "title")) return text_title(r, s);
    if (!strcmp(name, "capitalize")) return text_map_case(r, s, CASE_CAPITALIZE);
    if (!strcmp(name, "replace")) {
        check_arity(&a, 3, NULL);
        struct value *old = arg(&a, 0, "old"), *new = arg(&a, 1, "new"),
                     *count = arg(&a, 2, "count");
        if (!old || !new) render_fail(r, line, "%s expects 2 arguments", what);
        return text_replace(r, s, value_to_string(r, old), value_to_string(r, new),
                            count && count->kind == V_INT ? count->as.integer : -1);
    }
    render_fail(r, line, "internal error: filter '%s' has no implementation", name);
}

/* ---- tests ---- */

static const char *const test_names[] = {
    "defined",     "undefined", "none",     "string", "mapping",  "iterable", "number",
    "integer",     "float",     "sequence", "true",   "false",    "boolean",  "equalto",
    "eq",          "==",        "ne",       "!=",     "sameas",   "odd",      "even",
    "divisibleby", "in",        "lower",    "upper",  "callable", NULL};

bool test_known(const char *name)
{
    for (size_t i = 0; test_names[i]; i++)
        if (!strcmp(test_names[i], name)) return true;
    return false;
}

bool apply_test(struct render *r, const char *name, struct value *v, struct value **args,
                size_t n_args, int line)
{
    struct value *x = n_args > 0 ? args[0] : NULL;
    bool needs_arg = !strcmp(name, "equalto") || !strcmp(name, "eq") || !strcmp(name, "==") ||
                     !strcmp(name, "ne") || !strcmp(name, "!=") || !strcmp(name, "sameas") ||
                     !strcmp(name, "divisibleby") || !strcmp(name, "in");
    if (needs_arg && !x) render_fail(r, line, "test '%s' needs an argument", name);
    if (!strcmp(name, "defined")) return v->kind != V_UNDEFINED;
    if (!strcmp(name, "undefined")) return v->kind == V_UNDEFINED;
    if (!strcmp(name, "none")) return v->kind == V_NONE;
    if (!strcmp(name, "string")) return v->kind == V_STRING;
    if (!strcmp(name, "mapping")) return v->kind == V_DICT;
    if (!strcmp(name, "iterable") || !strcmp(name, "sequence"))
        return v->kind == V_STRING || v->kind == V_LIST || v->kind == V_DICT ||
               (v->kind == V_UNDEFINED && name[0] == 'i');
    if (!strcmp(name, "number")) return v->kind == V_INT || v->kind == V_FLOAT || v->kind == V_BOOL;
    if (!strcmp(name, "integer")) return v->kind == V_INT;
    if (!strcmp(name, "float")) return v->kind == V_FLOAT;
    if (!strcmp(name, "boolean")) return v->kind == V_BOOL;
    if (!strcmp(name, "true")) return v->kind == V_BOOL && v->as.boolean;
    if (!strcmp(name, "false")) return v->kind == V_BOOL && !v->as.boolean;
    if (!strcmp(name, "equalto") || !strcmp(name, "eq") || !strcmp(name, "=="))
        return value_equal(v, x);
    if (!strcmp(name, "ne") || !strcmp(name, "!=")) return !value_equal(v, x);
    if (!strcmp(name, "sameas"))
        return v == x ||
               (v->kind == x->kind &&
                (v->kind == V_NONE || (v->kind == V_BOOL && v->as.boolean == x->as.boolean)));
    if (!strcmp(name, "callable")) return v->kind == V_MACRO || v->kind == V_BUILTIN;
    if (!strcmp(name, "odd") || !strcmp(name, "even") || !strcmp(name, "divisibleby")) {
        if (v->kind != V_INT || (x && x->kind != V_INT))
            render_fail(r, line, "test '%s' needs integers", name);
        if (name[0] == 'o') return v->as.integer % 2 != 0;
        if (name[0] == 'e') return v->as.integer % 2 == 0;
        if (x->as.integer == 0) render_fail(r, line, "integer division or modulo by zero");
        return v->as.integer % x->as.integer == 0;
    }
    if (!strcmp(name, "in")) {
        if (x->kind == V_LIST) {
            for (size_t i = 0; i < x->as.list.n; i++)
                if (value_equal(x->as.list.items[i], v)) return true;
            return false;
        }
        if (x->kind == V_DICT) return dict_get(x, v) != NULL;
        if (x->kind == V_STRING && v->kind == V_STRING) {
            for (size_t i = 0; i + v->as.str.n <= x->as.str.n; i++)
                if (!memcmp(x->as.str.s + i, v->as.str.s, v->as.str.n)) return true;
            return false;
        }
        render_fail(r, line, "test 'in' on a %s", value_type_name(x));
    }
    if (!strcmp(name, "lower") || !strcmp(name, "upper")) {
        if (v->kind != V_STRING) return false;
        struct value *m = text_map_case(r, v, name[0] == 'l' ? CASE_LOWER : CASE_UPPER);
        return !memcmp(m->as.str.s, v->as.str.s, v->as.str.n);
    }
    render_fail(r, line, "internal error: test '%s' has no implementation", name);
}
