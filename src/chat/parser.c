/* src/chat/parser.c: builds the syntax tree of a chat template from its tokens, following
 * jinja2's grammar and operator precedence (jinja2/parser.py): conditional expression, or, and,
 * not, comparisons (in / not in), + -, ~, * / // %, **, unary - +, then postfix attribute,
 * subscript, slice and call, then filters "|" and tests "is". Statements: if/elif/else, for
 * (with unpacking, an "if" filter and else), set (plain, namespace attribute, block), macro,
 * break, continue and generation. Any other statement is refused by name. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "chat/internal.h"

struct parser {
    struct arena *arena;
    const struct token *t;
    size_t n, pos;
    const char *name;
    char *err;
    size_t errlen;
    jmp_buf fail;
};

_Noreturn static void parse_fail(struct parser *p, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void parse_fail(struct parser *p, int line, const char *fmt, ...)
{
    va_list ap;
    int k = snprintf(p->err, p->errlen, "%s:%d: ", p->name, line);
    va_start(ap, fmt);
    if (k >= 0 && (size_t)k < p->errlen) vsnprintf(p->err + k, p->errlen - (size_t)k, fmt, ap);
    va_end(ap);
    longjmp(p->fail, 1);
}

static const struct token *peek(struct parser *p)
{
    return &p->t[p->pos];
}
static const struct token *peek2(struct parser *p)
{
    return p->pos + 1 < p->n ? &p->t[p->pos + 1] : &p->t[p->n - 1];
}
static const struct token *next(struct parser *p)
{
    const struct token *t = &p->t[p->pos];
    if (t->type != TOK_EOF) p->pos++;
    return t;
}

static bool is_op(const struct token *t, const char *op)
{
    return t->type == TOK_OP && t->len == strlen(op) && memcmp(t->text, op, t->len) == 0;
}
static bool is_name(const struct token *t, const char *name)
{
    return t->type == TOK_NAME && strcmp(t->text, name) == 0;
}

static const char *describe(const struct token *t)
{
    switch (t->type) {
    case TOK_EOF:
        return "end of template";
    case TOK_PRINT_END:
        return "'}}'";
    case TOK_BLOCK_END:
        return "'%}'";
    case TOK_TEXT:
        return "template text";
    case TOK_STRING:
        return "a string";
    case TOK_INT:
    case TOK_FLOAT:
        return "a number";
    default:
        return t->text;
    }
}

static void expect_op(struct parser *p, const char *op)
{
    const struct token *t = next(p);
    if (!is_op(t, op)) parse_fail(p, t->line, "expected '%s', found %s", op, describe(t));
}

static const char *expect_name(struct parser *p)
{
    const struct token *t = next(p);
    if (t->type != TOK_NAME) parse_fail(p, t->line, "expected a name, found %s", describe(t));
    return t->text;
}

static void expect_block_end(struct parser *p)
{
    const struct token *t = next(p);
    if (t->type != TOK_BLOCK_END) parse_fail(p, t->line, "expected '%%}', found %s", describe(t));
}

static struct node *new_node(struct parser *p, enum node_kind kind, int line)
{
    struct node *n = arena_alloc(p->arena, sizeof *n);
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->line = line;
    return n;
}

struct growing {
    struct node **items;
    size_t n, cap;
};
static void grow_push(struct parser *p, struct growing *g, struct node *n)
{
    if (g->n == g->cap) {
        size_t cap = g->cap ? 2 * g->cap : 8;
        struct node **items = arena_alloc(p->arena, cap * sizeof *items);
        if (g->n) memcpy(items, g->items, g->n * sizeof *items);
        g->items = items;
        g->cap = cap;
    }
    g->items[g->n++] = n;
}
static struct node_list grow_done(struct growing *g)
{
    return (struct node_list){g->items, g->n};
}

static struct value *const_value(struct parser *p, enum value_kind kind)
{
    struct value *v = arena_alloc(p->arena, sizeof *v);
    memset(v, 0, sizeof *v);
    v->kind = kind;
    return v;
}

static struct node *parse_expression(struct parser *p, bool with_condexpr);
static struct node *parse_unary(struct parser *p, bool with_filter);

/* Call arguments after "(": positional, then name=value. */
static void parse_call_args(struct parser *p, struct node *call)
{
    struct growing args = {0}, kwargs = {0};
    while (!is_op(peek(p), ")")) {
        if (args.n + kwargs.n > 0) expect_op(p, ",");
        if (is_op(peek(p), ")")) break;
        if (is_op(peek(p), "*") || is_op(peek(p), "**"))
            parse_fail(p, peek(p)->line, "unsupported construct: *args / **kwargs in a call");
        if (peek(p)->type == TOK_NAME && is_op(peek2(p), "=")) {
            struct node *kw = new_node(p, E_CONST, peek(p)->line);
            kw->name = next(p)->text;
            next(p);
            kw->a = parse_expression(p, true);
            grow_push(p, &kwargs, kw);
        } else {
            if (kwargs.n)
                parse_fail(p, peek(p)->line, "positional argument after a keyword argument");
            grow_push(p, &args, parse_expression(p, true));
        }
    }
    expect_op(p, ")");
    call->args = grow_done(&args);
    call->kwargs = grow_done(&kwargs);
}

static struct node *parse_primary(struct parser *p)
{
    const struct token *t = next(p);
    struct node *n;
    switch (t->type) {
    case TOK_NAME:
        if (!strcmp(t->text, "true") || !strcmp(t->text, "True") || !strcmp(t->text, "false") ||
            !strcmp(t->text, "False")) {
            n = new_node(p, E_CONST, t->line);
            n->constant = const_value(p, V_BOOL);
            n->constant->as.boolean = t->text[0] == 't' || t->text[0] == 'T';
        } else if (!strcmp(t->text, "none") || !strcmp(t->text, "None")) {
            n = new_node(p, E_CONST, t->line);
            n->constant = const_value(p, V_NONE);
        } else {
            n = new_node(p, E_NAME, t->line);
            n->name = t->text;
        }
        return n;
    case TOK_STRING: {
        /* Adjacent literals concatenate, as in Python. */
        size_t len = t->len;
        size_t start = p->pos - 1;
        while (peek(p)->type == TOK_STRING) len += next(p)->len;
        char *s = arena_alloc(p->arena, len + 1);
        size_t k = 0;
        for (size_t i = start; i < p->pos; i++) {
            memcpy(s + k, p->t[i].text, p->t[i].len);
            k += p->t[i].len;
        }
        s[k] = 0;
        n = new_node(p, E_CONST, t->line);
        n->constant = const_value(p, V_STRING);
        n->constant->as.str.s = s;
        n->constant->as.str.n = k;
        return n;
    }
    case TOK_INT:
        n = new_node(p, E_CONST, t->line);
        n->constant = const_value(p, V_INT);
        n->constant->as.integer = t->int_value;
        return n;
    case TOK_FLOAT:
        n = new_node(p, E_CONST, t->line);
        n->constant = const_value(p, V_FLOAT);
        n->constant->as.real = t->float_value;
        return n;
    default:
        break;
    }
    if (is_op(t, "(")) {
        if (is_op(peek(p), ")")) {
            next(p);
            n = new_node(p, E_LIST, t->line);
            n->negated = true; /* a tuple */
            return n;
        }
        struct node *first = parse_expression(p, true);
        if (!is_op(peek(p), ",")) {
            expect_op(p, ")");
            return first;
        }
        struct growing items = {0};
        grow_push(p, &items, first);
        while (is_op(peek(p), ",")) {
            next(p);
            if (is_op(peek(p), ")")) break;
            grow_push(p, &items, parse_expression(p, true));
        }
        expect_op(p, ")");
        n = new_node(p, E_LIST, t->line);
        n->args = grow_done(&items);
        n->negated = true;
        return n;
    }
    if (is_op(t, "[")) {
        struct growing items = {0};
        while (!is_op(peek(p), "]")) {
            if (items.n) expect_op(p, ",");
            if (is_op(peek(p), "]")) break;
            grow_push(p, &items, parse_expression(p, true));
        }
        expect_op(p, "]");
        n = new_node(p, E_LIST, t->line);
        n->args = grow_done(&items);
        return n;
    }
    if (is_op(t, "{")) {
        struct growing keys = {0}, values = {0};
        while (!is_op(peek(p), "}")) {
            if (keys.n) expect_op(p, ",");
            if (is_op(peek(p), "}")) break;
            grow_push(p, &keys, parse_expression(p, true));
            expect_op(p, ":");
            grow_push(p, &values, parse_expression(p, true));
        }
        expect_op(p, "}");
        n = new_node(p, E_DICT, t->line);
        n->args = grow_done(&keys);
        n->kwargs = grow_done(&values);
        return n;
    }
    parse_fail(p, t->line, "unexpected %s in an expression", describe(t));
}

static struct node *parse_subscript(struct parser *p, struct node *obj, int line)
{
    struct node *parts[3] = {NULL, NULL, NULL};
    int colons = 0;
    for (;;) {
        if (is_op(peek(p), "]")) break;
        if (is_op(peek(p), ":")) {
            next(p);
            if (++colons > 2) parse_fail(p, line, "too many ':' in a slice");
            continue;
        }
        if (parts[colons]) parse_fail(p, line, "expected ']' or ':' in a subscript");
        parts[colons] = parse_expression(p, true);
    }
    expect_op(p, "]");
    struct node *n;
    if (colons == 0) {
        if (!parts[0]) parse_fail(p, line, "empty subscript");
        n = new_node(p, E_ITEM, line);
        n->a = obj;
        n->b = parts[0];
    } else {
        n = new_node(p, E_SLICE, line);
        n->a = obj;
        n->b = parts[0];
        n->c = parts[1];
        n->d = parts[2];
    }
    return n;
}

static struct node *parse_postfix(struct parser *p, struct node *n)
{
    for (;;) {
        const struct token *t = peek(p);
        if (is_op(t, ".")) {
            next(p);
            const struct token *a = next(p);
            if (a->type == TOK_NAME) {
                struct node *g = new_node(p, E_ATTR, a->line);
                g->a = n;
                g->name = a->text;
                n = g;
            } else if (a->type == TOK_INT) {
                struct node *g = new_node(p, E_ITEM, a->line);
                g->a = n;
                g->b = new_node(p, E_CONST, a->line);
                g->b->constant = const_value(p, V_INT);
                g->b->constant->as.integer = a->int_value;
                n = g;
            } else {
                parse_fail(p, a->line, "expected an attribute name after '.', found %s",
                           describe(a));
            }
        } else if (is_op(t, "[")) {
            next(p);
            n = parse_subscript(p, n, t->line);
        } else if (is_op(t, "(")) {
            next(p);
            struct node *c = new_node(p, E_CALL, t->line);
            c->a = n;
            parse_call_args(p, c);
            n = c;
        } else {
            return n;
        }
    }
}

static struct node *parse_filter_expr(struct parser *p, struct node *n)
{
    for (;;) {
        const struct token *t = peek(p);
        if (is_op(t, "|")) {
            next(p);
            const struct token *f = next(p);
            if (f->type != TOK_NAME) parse_fail(p, f->line, "expected a filter name after '|'");
            const char *fname = f->text;
            while (is_op(peek(p), ".")) {
                parse_fail(p, f->line, "unsupported construct: dotted filter name");
            }
            if (!filter_known(fname)) parse_fail(p, f->line, "unsupported filter '%s'", fname);
            struct node *c = new_node(p, E_FILTER, f->line);
            c->a = n;
            c->name = fname;
            if (is_op(peek(p), "(")) {
                next(p);
                parse_call_args(p, c);
            }
            n = c;
        } else if (is_name(t, "is")) {
            next(p);
            bool negated = false;
            if (is_name(peek(p), "not")) {
                next(p);
                negated = true;
            }
            const struct token *f = next(p);
            if (f->type != TOK_NAME) parse_fail(p, f->line, "expected a test name after 'is'");
            /* "is none", "is true", "is false" name tests, not the constants. */
            const char *tname = f->text;
            if (!strcmp(tname, "None")) tname = "none";
            if (!strcmp(tname, "True")) tname = "true";
            if (!strcmp(tname, "False")) tname = "false";
            if (!test_known(tname)) parse_fail(p, f->line, "unsupported test '%s'", tname);
            struct node *c = new_node(p, E_TEST, f->line);
            c->a = n;
            c->name = tname;
            c->negated = negated;
            const struct token *u = peek(p);
            if (is_op(u, "(")) {
                next(p);
                parse_call_args(p, c);
            } else if ((u->type == TOK_NAME || u->type == TOK_STRING || u->type == TOK_INT ||
                        u->type == TOK_FLOAT || is_op(u, "[") || is_op(u, "{")) &&
                       !is_name(u, "else") && !is_name(u, "or") && !is_name(u, "and") &&
                       !is_name(u, "if") && !is_name(u, "in") && !is_name(u, "not") &&
                       !is_name(u, "is")) {
                struct growing args = {0};
                struct node *arg = parse_postfix(p, parse_primary(p));
                grow_push(p, &args, arg);
                c->args = grow_done(&args);
            }
            n = c;
        } else if (is_op(t, "(")) {
            next(p);
            struct node *c = new_node(p, E_CALL, t->line);
            c->a = n;
            parse_call_args(p, c);
            n = c;
        } else {
            return n;
        }
    }
}

static struct node *parse_unary(struct parser *p, bool with_filter)
{
    const struct token *t = peek(p);
    struct node *n;
    if (is_op(t, "-") || is_op(t, "+")) {
        next(p);
        n = new_node(p, is_op(t, "-") ? E_NEG : E_POS, t->line);
        n->a = parse_unary(p, false);
    } else {
        n = parse_postfix(p, parse_primary(p));
    }
    if (with_filter) n = parse_filter_expr(p, n);
    return n;
}

static struct node *binary(struct parser *p, const char *op, struct node *a, struct node *b,
                           int line)
{
    struct node *n = new_node(p, E_BINARY, line);
    n->name = op;
    n->a = a;
    n->b = b;
    return n;
}

static struct node *parse_pow(struct parser *p)
{
    struct node *n = parse_unary(p, true);
    while (is_op(peek(p), "**")) {
        int line = next(p)->line;
        n = binary(p, "**", n, parse_unary(p, true), line);
    }
    return n;
}

static struct node *parse_math2(struct parser *p)
{
    struct node *n = parse_pow(p);
    for (;;) {
        const struct token *t = peek(p);
        if (is_op(t, "*") || is_op(t, "/") || is_op(t, "//") || is_op(t, "%")) {
            next(p);
            n = binary(p, t->text, n, parse_pow(p), t->line);
        } else {
            return n;
        }
    }
}

static struct node *parse_concat(struct parser *p)
{
    struct node *n = parse_math2(p);
    while (is_op(peek(p), "~")) {
        int line = next(p)->line;
        n = binary(p, "~", n, parse_math2(p), line);
    }
    return n;
}

static struct node *parse_math1(struct parser *p)
{
    struct node *n = parse_concat(p);
    for (;;) {
        const struct token *t = peek(p);
        if (is_op(t, "+") || is_op(t, "-")) {
            next(p);
            n = binary(p, t->text, n, parse_concat(p), t->line);
        } else {
            return n;
        }
    }
}

static struct node *parse_compare(struct parser *p)
{
    struct node *first = parse_math1(p);
    struct growing operands = {0};
    const char *ops[16];
    size_t n_ops = 0;
    int line = peek(p)->line;
    for (;;) {
        const struct token *t = peek(p);
        const char *op = NULL;
        if (is_op(t, "==") || is_op(t, "!=") || is_op(t, "<") || is_op(t, "<=") || is_op(t, ">") ||
            is_op(t, ">=")) {
            next(p);
            op = t->text;
        } else if (is_name(t, "in")) {
            next(p);
            op = "in";
        } else if (is_name(t, "not") && is_name(peek2(p), "in")) {
            next(p);
            next(p);
            op = "not in";
        } else {
            break;
        }
        if (n_ops == 16) parse_fail(p, t->line, "comparison chain too long");
        ops[n_ops++] = op;
        grow_push(p, &operands, parse_math1(p));
    }
    if (n_ops == 0) return first;
    struct node *n = new_node(p, E_COMPARE, line);
    n->a = first;
    n->args = grow_done(&operands);
    n->names = arena_alloc(p->arena, n_ops * sizeof *n->names);
    memcpy(n->names, ops, n_ops * sizeof *ops);
    n->n_names = n_ops;
    return n;
}

static struct node *parse_not(struct parser *p)
{
    if (is_name(peek(p), "not")) {
        struct node *n = new_node(p, E_NOT, next(p)->line);
        n->a = parse_not(p);
        return n;
    }
    return parse_compare(p);
}

static struct node *parse_and(struct parser *p)
{
    struct node *n = parse_not(p);
    while (is_name(peek(p), "and")) {
        struct node *m = new_node(p, E_AND, next(p)->line);
        m->a = n;
        m->b = parse_not(p);
        n = m;
    }
    return n;
}

static struct node *parse_or(struct parser *p)
{
    struct node *n = parse_and(p);
    while (is_name(peek(p), "or")) {
        struct node *m = new_node(p, E_OR, next(p)->line);
        m->a = n;
        m->b = parse_and(p);
        n = m;
    }
    return n;
}

static struct node *parse_expression(struct parser *p, bool with_condexpr)
{
    struct node *n = parse_or(p);
    if (!with_condexpr) return n;
    while (is_name(peek(p), "if")) {
        struct node *c = new_node(p, E_COND, next(p)->line);
        c->b = n;
        c->a = parse_or(p);
        if (is_name(peek(p), "else")) {
            next(p);
            c->c = parse_expression(p, true);
        }
        n = c;
    }
    return n;
}

/* An expression, or a tuple of them without parentheses (as after "set x =" or "in"). */
static struct node *parse_tuple(struct parser *p, bool with_condexpr)
{
    int line = peek(p)->line;
    struct node *first = parse_expression(p, with_condexpr);
    if (!is_op(peek(p), ",")) return first;
    struct growing items = {0};
    grow_push(p, &items, first);
    while (is_op(peek(p), ",")) {
        next(p);
        grow_push(p, &items, parse_expression(p, with_condexpr));
    }
    struct node *n = new_node(p, E_LIST, line);
    n->args = grow_done(&items);
    n->negated = true;
    return n;
}

/* Parse statements until a block tag whose first name is one of ends (NULL-terminated);
 * returns with that name token not consumed (the "{%" is consumed). */
static struct node_list parse_body(struct parser *p, const char *const *ends, const char **found);

static void parse_targets(struct parser *p, struct node *n)
{
    const char *names[16];
    size_t k = 0;
    bool paren = is_op(peek(p), "(");
    if (paren) next(p);
    for (;;) {
        if (k == 16) parse_fail(p, peek(p)->line, "too many names to unpack");
        names[k++] = expect_name(p);
        if (!is_op(peek(p), ",")) break;
        next(p);
    }
    if (paren) expect_op(p, ")");
    n->names = arena_alloc(p->arena, k * sizeof *names);
    memcpy(n->names, names, k * sizeof *names);
    n->n_names = k;
}

static struct node *parse_statement(struct parser *p)
{
    const struct token *t = next(p);
    if (t->type != TOK_NAME)
        parse_fail(p, t->line, "expected a statement name after '{%%', found %s", describe(t));
    const char *kw = t->text;
    int line = t->line;
    if (!strcmp(kw, "if")) {
        struct node *n = new_node(p, N_IF, line);
        struct node *cur = n;
        cur->a = parse_tuple(p, true);
        expect_block_end(p);
        for (;;) {
            static const char *const ends[] = {"elif", "else", "endif", NULL};
            const char *found;
            cur->body = parse_body(p, ends, &found);
            int l = next(p)->line;
            if (!strcmp(found, "elif")) {
                struct node *e = new_node(p, N_IF, l);
                e->a = parse_tuple(p, true);
                expect_block_end(p);
                struct node **one = arena_alloc(p->arena, sizeof *one);
                one[0] = e;
                cur->else_body = (struct node_list){one, 1};
                cur = e;
            } else if (!strcmp(found, "else")) {
                expect_block_end(p);
                static const char *const end_only[] = {"endif", NULL};
                cur->else_body = parse_body(p, end_only, &found);
                next(p);
                expect_block_end(p);
                return n;
            } else {
                expect_block_end(p);
                return n;
            }
        }
    }
    if (!strcmp(kw, "for")) {
        struct node *n = new_node(p, N_FOR, line);
        parse_targets(p, n);
        if (!is_name(next(p), "in")) parse_fail(p, line, "expected 'in' in a for statement");
        n->a = parse_tuple(p, false);
        if (is_name(peek(p), "if")) {
            next(p);
            n->b = parse_expression(p, true);
        }
        if (is_name(peek(p), "recursive"))
            parse_fail(p, line, "unsupported construct: recursive for loop");
        expect_block_end(p);
        static const char *const ends[] = {"else", "endfor", NULL};
        const char *found;
        n->body = parse_body(p, ends, &found);
        next(p);
        expect_block_end(p);
        if (!strcmp(found, "else")) {
            static const char *const end_only[] = {"endfor", NULL};
            n->else_body = parse_body(p, end_only, &found);
            next(p);
            expect_block_end(p);
        }
        return n;
    }
    if (!strcmp(kw, "set")) {
        if (peek(p)->type == TOK_NAME && is_op(peek2(p), ".")) {
            struct node *n = new_node(p, N_SET_ATTR, line);
            struct node *target = new_node(p, E_NAME, line);
            target->name = next(p)->text;
            next(p);
            n->name = expect_name(p);
            n->b = target;
            expect_op(p, "=");
            n->a = parse_tuple(p, true);
            expect_block_end(p);
            return n;
        }
        struct node *n = new_node(p, N_SET, line);
        parse_targets(p, n);
        if (peek(p)->type == TOK_BLOCK_END) {
            if (n->n_names != 1) parse_fail(p, line, "a block set takes one name");
            next(p);
            n->kind = N_SET_BLOCK;
            static const char *const ends[] = {"endset", NULL};
            const char *found;
            n->body = parse_body(p, ends, &found);
            next(p);
            expect_block_end(p);
            return n;
        }
        if (is_op(peek(p), "|")) parse_fail(p, line, "unsupported construct: filtered block set");
        expect_op(p, "=");
        n->a = parse_tuple(p, true);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(kw, "macro")) {
        struct node *n = new_node(p, N_MACRO, line);
        n->name = expect_name(p);
        expect_op(p, "(");
        const char *names[64];
        struct growing defaults = {0};
        size_t k = 0;
        while (!is_op(peek(p), ")")) {
            if (k) expect_op(p, ",");
            if (k == 64) parse_fail(p, line, "too many macro parameters");
            names[k++] = expect_name(p);
            if (is_op(peek(p), "=")) {
                next(p);
                grow_push(p, &defaults, parse_expression(p, true));
            } else {
                if (defaults.n && defaults.items[defaults.n - 1])
                    parse_fail(p, line,
                               "macro parameter '%s' without a default follows one "
                               "with a default",
                               names[k - 1]);
                grow_push(p, &defaults, NULL);
            }
        }
        expect_op(p, ")");
        expect_block_end(p);
        n->names = arena_alloc(p->arena, (k ? k : 1) * sizeof *names);
        memcpy(n->names, names, k * sizeof *names);
        n->n_names = k;
        n->kwargs = grow_done(&defaults);
        static const char *const ends[] = {"endmacro", NULL};
        const char *found;
        n->body = parse_body(p, ends, &found);
        next(p);
        if (peek(p)->type == TOK_NAME) next(p); /* {% endmacro name %} */
        expect_block_end(p);
        return n;
    }
    if (!strcmp(kw, "break") || !strcmp(kw, "continue")) {
        struct node *n = new_node(p, kw[0] == 'b' ? N_BREAK : N_CONTINUE, line);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(kw, "generation")) {
        struct node *n = new_node(p, N_GENERATION, line);
        expect_block_end(p);
        static const char *const ends[] = {"endgeneration", NULL};
        const char *found;
        n->body = parse_body(p, ends, &found);
        next(p);
        expect_block_end(p);
        return n;
    }
    static const char *const known[] = {"call",    "filter", "include", "import", "from",
                                        "extends", "block",  "raw",     "with",   "autoescape",
                                        "do",      "trans",  NULL};
    for (size_t i = 0; known[i]; i++)
        if (!strcmp(kw, known[i])) parse_fail(p, line, "unsupported construct: '%s' statement", kw);
    parse_fail(p, line, "unknown statement '%s'", kw);
}

static struct node_list parse_body(struct parser *p, const char *const *ends, const char **found)
{
    struct growing body = {0};
    for (;;) {
        const struct token *t = next(p);
        if (t->type == TOK_EOF) {
            if (!ends) return grow_done(&body);
            parse_fail(p, t->line, "unexpected end of template, expected '%s'",
                       ends[0] ? ends[ends[1] ? (ends[2] ? 2 : 1) : 0] : "?");
        }
        if (t->type == TOK_TEXT) {
            struct node *n = new_node(p, N_TEXT, t->line);
            n->text = t->text;
            n->text_len = t->len;
            grow_push(p, &body, n);
        } else if (t->type == TOK_PRINT_BEGIN) {
            struct node *n = new_node(p, N_OUTPUT, t->line);
            n->a = parse_tuple(p, true);
            const struct token *e = next(p);
            if (e->type != TOK_PRINT_END)
                parse_fail(p, e->line, "expected '}}', found %s", describe(e));
            grow_push(p, &body, n);
        } else if (t->type == TOK_BLOCK_BEGIN) {
            const struct token *k = peek(p);
            if (k->type == TOK_NAME && ends)
                for (size_t i = 0; ends[i]; i++)
                    if (!strcmp(k->text, ends[i])) {
                        *found = ends[i];
                        return grow_done(&body);
                    }
            if (k->type == TOK_NAME &&
                (!strcmp(k->text, "endif") || !strcmp(k->text, "endfor") ||
                 !strcmp(k->text, "elif") || !strcmp(k->text, "else") ||
                 !strcmp(k->text, "endmacro") || !strcmp(k->text, "endset") ||
                 !strcmp(k->text, "endgeneration")))
                parse_fail(p, k->line, "unexpected '%s'", k->text);
            grow_push(p, &body, parse_statement(p));
        } else {
            parse_fail(p, t->line, "unexpected %s", describe(t));
        }
    }
}

int chat_parse(struct arena *a, const struct token_list *tokens, const char *name,
               struct node_list *out, char *err, size_t errlen)
{
    struct parser p = {
        .arena = a, .t = tokens->items, .n = tokens->n, .name = name, .err = err, .errlen = errlen};
    if (setjmp(p.fail)) return -1;
    *out = parse_body(&p, NULL, NULL);
    return 0;
}
