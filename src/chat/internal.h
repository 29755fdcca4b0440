/* src/chat/internal.h: what the chat template lexer, parser and evaluator share: an arena
 * allocator, the token and syntax-tree types and the runtime value type. Not a public surface
 * (src/chat/template.h is). */
#ifndef ESFT_CHAT_INTERNAL_H
#define ESFT_CHAT_INTERNAL_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chat/template.h"

/* Arena: everything a compile (the tree) or a render (the values) allocates is freed at once. */
struct arena_block;
struct arena {
    struct arena_block *head;
};
void *arena_alloc(struct arena *a, size_t n);
char *arena_strndup(struct arena *a, const char *s, size_t n);
void arena_free(struct arena *a);

/* ---- tokens ---- */
enum token_type {
    TOK_TEXT,        /* template data, whitespace control already applied */
    TOK_PRINT_BEGIN, /* {{ */
    TOK_PRINT_END,   /* }} */
    TOK_BLOCK_BEGIN, /* {% */
    TOK_BLOCK_END,   /* %} */
    TOK_NAME,
    TOK_STRING, /* text holds the decoded literal */
    TOK_INT,
    TOK_FLOAT,
    TOK_OP, /* text holds the operator: + - * / // % ** ~ == != < <= > >= = . , : | ( ) [ ] { } */
    TOK_EOF
};

struct token {
    enum token_type type;
    const char *text;
    size_t len;
    int64_t int_value;
    double float_value;
    int line;
};

struct token_list {
    struct token *items;
    size_t n;
};

/* Returns 0, or -1 with err filled ("NAME:LINE: ..."). Tokens live in the arena. */
int chat_lex(struct arena *a, const char *text, const char *name, struct token_list *out, char *err,
             size_t errlen);

/* ---- syntax tree ---- */
enum node_kind {
    /* statements */
    N_TEXT,
    N_OUTPUT,
    N_IF,
    N_FOR,
    N_SET,
    N_SET_ATTR,
    N_SET_BLOCK,
    N_MACRO,
    N_BREAK,
    N_CONTINUE,
    N_GENERATION,
    /* expressions */
    E_CONST,
    E_NAME,
    E_ATTR,
    E_ITEM,
    E_SLICE,
    E_CALL,
    E_FILTER,
    E_TEST,
    E_BINARY,
    E_NEG,
    E_POS,
    E_NOT,
    E_AND,
    E_OR,
    E_COND,
    E_LIST,
    E_DICT,
    E_COMPARE
};

struct value;
struct node;

struct node_list {
    struct node **items;
    size_t n;
};

struct node {
    enum node_kind kind;
    int line;
    const char *name; /* E_NAME, E_ATTR attribute, E_FILTER / E_TEST name, N_MACRO name,
                         N_SET_ATTR attribute, E_BINARY / E_COMPARE operator */
    const char *text; /* N_TEXT */
    size_t text_len;
    struct value *constant;  /* E_CONST */
    struct node *a, *b, *c;  /* operands: E_* operands; N_IF cond; N_FOR iterable, filter;
                                N_SET value; E_SLICE object (a) start (b) stop (c) */
    struct node *d;          /* E_SLICE step */
    struct node_list args;   /* call/filter/test positional arguments; list items; dict keys;
                                E_COMPARE operands (a is the first) */
    struct node_list kwargs; /* keyword arguments (E_CONST name in ->name, value in ->a);
                                dict values; macro defaults (NULL where none) */
    const char **names;      /* N_FOR / N_SET targets; N_MACRO parameters; E_COMPARE operators */
    size_t n_names;
    struct node_list body, else_body;
    bool negated; /* E_TEST "is not" */
};

struct chat_template {
    struct arena arena;
    char *name;
    struct node_list body;
    bool has_generation; /* a {% generation %} block appears */
};

/* Returns 0, or -1 with err filled. */
int chat_parse(struct arena *a, const struct token_list *tokens, const char *name,
               struct node_list *out, char *err, size_t errlen);

/* ---- runtime values ---- */
enum value_kind {
    V_UNDEFINED,
    V_NONE,
    V_BOOL,
    V_INT,
    V_FLOAT,
    V_STRING,
    V_LIST,
    V_DICT,
    V_NAMESPACE,
    V_MACRO,
    V_BUILTIN
};

struct render;
typedef struct value *(*builtin_fn)(struct render *r, struct value *self, struct value **args,
                                    size_t n_args, const char **kw_names, struct value **kw_values,
                                    size_t n_kw, int line);

struct value {
    enum value_kind kind;
    bool tuple; /* a V_LIST that prints as a tuple */
    union {
        bool boolean;
        int64_t integer;
        double real;
        struct {
            const char *s;
            size_t n;
        } str;
        struct { /* V_LIST (tuples too) */
            struct value **items;
            size_t n, cap;
        } list;
        struct { /* V_DICT, V_NAMESPACE: insertion order kept */
            struct value **keys;
            struct value **values;
            size_t n, cap;
        } dict;
        const struct node *macro;
        struct {
            const char *name;
            builtin_fn fn;
            struct value *self;
        } builtin;
        struct { /* V_UNDEFINED: what the message says when it is used */
            const char *hint;
        } undefined;
    } as;
};

struct scope {
    struct scope *parent;
    const char **names;
    struct value **values;
    size_t n, cap;
};

/* Bounds on one render, far above what a conversation needs, so that a template that
 * loops without end fails instead of hanging prepare. */
#define CHAT_MAX_STEPS 500000 /* a 1,000-message Qwen3 conversation: ~60,000 */
#define CHAT_MAX_TEXT ((size_t)256 << 20) /* bytes of any one string being built */

struct render {
    struct arena arena;
    const struct chat_template *tpl;
    const struct chat_render_options *options;
    struct scope *root;
    char *out;
    size_t out_len, out_cap;
    jmp_buf fail;
    char *err;
    size_t errlen;
    int depth;
    long long steps;          /* statements run, against CHAT_MAX_STEPS */
    const struct strbuf *top; /* the output of the whole template */
    struct chat_span *spans;  /* what {% generation %} blocks wrote into top */
    size_t n_spans, spans_cap;
};

/* Stop the render with "NAME:LINE: message" (line 0: the message alone). */
_Noreturn void render_fail(struct render *r, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

struct value *value_undefined(struct render *r, const char *hint);
struct value *value_none(void);
struct value *value_bool(bool b);
struct value *value_int(struct render *r, int64_t i);
struct value *value_float(struct render *r, double f);
struct value *value_string(struct render *r, const char *s, size_t n);
struct value *value_cstring(struct render *r, const char *s);
struct value *value_list(struct render *r, size_t cap);
void list_push(struct render *r, struct value *list, struct value *item);
struct value *value_dict(struct render *r, enum value_kind kind);
void dict_set(struct render *r, struct value *dict, struct value *key, struct value *v);
struct value *dict_get(const struct value *dict, const struct value *key);
struct value *dict_get_cstr(const struct value *dict, const char *key);
struct value *value_from_json(struct render *r, const json_t *j);

bool value_truthy(const struct value *v);
bool value_equal(const struct value *x, const struct value *y);
const char *value_type_name(const struct value *v);
/* Python str(): appended to a growing buffer. */
struct strbuf {
    char *s;
    size_t n, cap;
};
void strbuf_add(struct render *r, struct strbuf *b, const char *s, size_t n);
void value_str(struct render *r, struct strbuf *b, const struct value *v);
void value_repr(struct render *r, struct strbuf *b, const struct value *v);
struct value *value_to_string(struct render *r, const struct value *v);
/* json.dumps(v, ensure_ascii=False, indent=indent (-1 none), separators) */
void value_json(struct render *r, struct strbuf *b, const struct value *v, int indent,
                const char *item_sep, const char *key_sep, bool sort_keys, int level, int line);
void format_float(double f, char *buf, size_t len);

/* Builtins (builtins.c): filters, tests, methods, globals. */
bool filter_known(const char *name);
bool test_known(const char *name);
struct value *apply_filter(struct render *r, const char *name, struct value *v, struct value **args,
                           size_t n_args, const char **kw_names, struct value **kw_values,
                           size_t n_kw, int line);
bool apply_test(struct render *r, const char *name, struct value *v, struct value **args,
                size_t n_args, int line);
/* Attribute lookup falls back to these: str/dict/list methods as bound builtins, or NULL. */
struct value *method_lookup(struct render *r, struct value *self, const char *name, int line);
/* Binds name to v in scope s (eval.c): replaces a binding of that name, else adds one. */
void scope_set(struct render *r, struct scope *s, const char *name, struct value *v);
void install_globals(struct render *r, struct scope *root);
struct value *call_value(struct render *r, struct value *fn, struct value **args, size_t n_args,
                         const char **kw_names, struct value **kw_values, size_t n_kw, int line);
/* Python sequence helpers shared by evaluator and filters. */
size_t utf8_length(const char *s, size_t n);
struct value *value_iterable(struct render *r, struct value *v, int line);

/* Python str operations (text.c). */
enum case_map { CASE_UPPER, CASE_LOWER, CASE_TITLE, CASE_CAPITALIZE };
/* Is the code point at s[i] whitespace to Python? *len: its byte length. */
bool text_is_space(const char *s, size_t n, size_t i, size_t *len);
size_t text_cp_len(const char *s, size_t n, size_t i);
/* str.strip / lstrip / rstrip; chars NULL or None strips whitespace. */
struct value *text_strip(struct render *r, struct value *str, struct value *chars, bool left,
                         bool right);
/* str.split(sep, maxsplit); maxsplit < 0: no limit. */
struct value *text_split(struct render *r, struct value *str, struct value *sep, int64_t maxsplit,
                         int line);
/* str.replace(old, new, count); count < 0: all. */
struct value *text_replace(struct render *r, struct value *str, struct value *old,
                           struct value *new_text, int64_t count);
struct value *text_map_case(struct render *r, struct value *str, enum case_map how);
/* jinja2's title filter. */
struct value *text_title(struct render *r, struct value *str);

#endif
