/* test_chat_template: the chat template interpreter (src/chat/) against python jinja2.
 *
 * tests/chat/cases.json holds real chat templates' outputs on many conversations, rendered by
 * transformers' own jinja2 environment (tests/chat/make_goldens.py); every case must render
 * byte-identically here, and a case the template rejects with raise_exception must fail with
 * the same message (one that failed in Python another way must fail here too). Then the
 * template errors: a syntax error names its line, a construct outside the subset names itself
 * and its line.
 *
 * Usage: test_chat_template DIR   (DIR holds cases.json and the .jinja files) */
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/template.h"
#include "check.h"

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = 0;
    fclose(f);
    return s;
}

/* First differing byte, for the failure message. */
static size_t first_difference(const char *a, const char *b)
{
    size_t i = 0;
    while (a[i] && a[i] == b[i]) i++;
    return i;
}

struct compiled {
    char name[256];
    struct chat_template *tpl;
};

static void golden_cases(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/cases.json", dir);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK(root != NULL, "%s:%d: %s", path, jerr.line, jerr.text);
    if (!root) return;
    struct chat_render_options options = {
        .now = (time_t)json_integer_value(json_object_get(root, "now"))};
    json_t *cases = json_object_get(root, "cases");
    struct compiled compiled[16];
    size_t n_compiled = 0;
    size_t passed = 0, total = 0, rejected = 0;
    size_t index;
    json_t *c;
    json_array_foreach(cases, index, c)
    {
        const char *file = json_string_value(json_object_get(c, "template"));
        const char *name = json_string_value(json_object_get(c, "name"));
        struct chat_template *tpl = NULL, *own = NULL;
        if (!file) {
            /* a snippet: the template text is in the case */
            const char *source = json_string_value(json_object_get(c, "source"));
            char err[512] = "";
            own = tpl = chat_template_compile(source, "snippet", err, sizeof err);
            CHECK(tpl != NULL, "snippet #%zu does not compile: %s\n%s", index, err, source);
            file = source;
        }
        for (size_t i = 0; !own && i < n_compiled; i++)
            if (!strcmp(compiled[i].name, file)) tpl = compiled[i].tpl;
        if (!tpl && !own && n_compiled < 16) {
            snprintf(path, sizeof path, "%s/%s", dir, file);
            char *text = read_file(path);
            CHECK(text != NULL, "cannot read %s", path);
            char err[512] = "";
            tpl = text ? chat_template_compile(text, file, err, sizeof err) : NULL;
            CHECK(tpl != NULL, "%s does not compile: %s", file, err);
            free(text);
            snprintf(compiled[n_compiled].name, sizeof compiled[n_compiled].name, "%s", file);
            compiled[n_compiled++].tpl = tpl;
        }
        total++;
        if (!tpl) continue;
        char err[1024] = "";
        char *out =
            chat_template_render(tpl, json_object_get(c, "context"), &options, err, sizeof err);
        json_t *expected = json_object_get(c, "expected");
        json_t *error = json_object_get(c, "error");
        bool ok;
        if (expected) {
            const char *want = json_string_value(expected);
            ok = out && !strcmp(out, want);
            if (!out)
                CHECK(ok, "%s / %s #%zu: render failed: %s", file, name, index, err);
            else {
                size_t at = first_difference(out, want);
                CHECK(ok, "%s / %s #%zu: output differs at byte %zu:\n got: %.80s\nwant: %.80s",
                      file, name, index, at, out + (at > 20 ? at - 20 : 0),
                      want + (at > 20 ? at - 20 : 0));
            }
        } else if (error) {
            rejected++;
            ok = !out && !strcmp(err, json_string_value(error));
            CHECK(ok, "%s / %s #%zu: expected the error \"%s\", got %s \"%s\"", file, name, index,
                  json_string_value(error), out ? "output" : "error", out ? out : err);
        } else {
            rejected++;
            ok = !out;
            CHECK(ok, "%s / %s #%zu: python failed (%s), here it rendered", file, name, index,
                  json_string_value(json_object_get(c, "error_kind")));
        }
        passed += ok;
        free(out);
        chat_template_free(own);
    }
    printf("golden cases: %zu of %zu identical (%zu of them rejections)\n", passed, total,
           rejected);
    CHECK(total >= 200, "only %zu golden cases", total);
    for (size_t i = 0; i < n_compiled; i++) chat_template_free(compiled[i].tpl);
    json_decref(root);
}

/* Compiling text must fail with exactly this message. */
static void compile_error(const char *text, const char *want)
{
    char err[512] = "";
    struct chat_template *tpl = chat_template_compile(text, "t.jinja", err, sizeof err);
    CHECK(tpl == NULL && !strcmp(err, want), "compile of \"%s\": want \"%s\", got %s \"%s\"", text,
          want, tpl ? "success" : "error", err);
    chat_template_free(tpl);
}

/* Rendering text with context (JSON) must give want_out, or fail with want_err. */
static void render_case(const char *text, const char *context, const char *want_out,
                        const char *want_err)
{
    char err[512] = "";
    struct chat_template *tpl = chat_template_compile(text, "t.jinja", err, sizeof err);
    CHECK(tpl != NULL, "compile of \"%s\": %s", text, err);
    if (!tpl) return;
    json_t *ctx = json_loads(context, 0, NULL);
    char *out = chat_template_render(tpl, ctx, NULL, err, sizeof err);
    if (want_out)
        CHECK(out && !strcmp(out, want_out), "render of \"%s\": want \"%s\", got \"%s\"", text,
              want_out, out ? out : err);
    else
        CHECK(!out && !strcmp(err, want_err), "render of \"%s\": want error \"%s\", got \"%s\"",
              text, want_err, out ? out : err);
    free(out);
    json_decref(ctx);
    chat_template_free(tpl);
}

static void template_errors(void)
{
    compile_error("line one\n{% if x %}\nno end",
                  "t.jinja:3: unexpected end of template, expected 'endif'");
    compile_error("a\nb\n{{ x + }}", "t.jinja:3: unexpected '}}' in an expression");
    compile_error("{% for x in y %}\n{% endif %}", "t.jinja:2: unexpected 'endif'");
    compile_error("\n\n{{ 'abc }}", "t.jinja:3: unterminated string literal");
    compile_error("x\n{{ y }", "t.jinja:2: unclosed '{{' tag");
    compile_error("{# never closed", "t.jinja:1: unclosed comment");
    compile_error("\n{% include 'other.jinja' %}",
                  "t.jinja:2: unsupported construct: 'include' statement");
    compile_error("\n\n{% call m() %}x{% endcall %}",
                  "t.jinja:3: unsupported construct: 'call' statement");
    compile_error("{{ x | wordwrap }}", "t.jinja:1: unsupported filter 'wordwrap'");
    compile_error("\n{% if x is divisible %}{% endif %}",
                  "t.jinja:2: unsupported test 'divisible'");
    compile_error("{% for x in y recursive %}{% endfor %}",
                  "t.jinja:1: unsupported construct: recursive for loop");
    compile_error("{% frobnicate %}", "t.jinja:1: unknown statement 'frobnicate'");
    compile_error("{{ f(*args) }}", "t.jinja:1: unsupported construct: *args / **kwargs in a call");

    render_case("{{ raise_exception('no ' ~ 'way') }}", "{}", NULL, "no way");
    render_case("a\n{{ x.y }}", "{}", NULL, "t.jinja:2: 'x' is undefined");
    render_case("{{ x }}|{{ x is defined }}|{{ x|length }}|{% for i in x %}i{% endfor %}", "{}",
                "|False|0|", NULL);
    render_case("{{ m.nope }}|{{ m.nope is defined }}", "{\"m\": {}}", "|False", NULL);
    render_case("\n\n{{ 'a' + 1 }}", "{}", NULL,
                "t.jinja:3: unsupported operand type(s) for +: 'str' and 'int'");
    render_case("{{ s.zfill(3) }}", "{\"s\": \"1\"}", NULL,
                "t.jinja:1: unsupported construct: str.zfill()");
    render_case("{{ '%s' % 1 }}", "{}", NULL,
                "t.jinja:1: unsupported construct: printf-style string formatting with '%'");
    render_case(
        "{% set l = [] %}{{ l.append(1) }}", "{}", NULL,
        "t.jinja:1: access to a method that modifies a value is unsafe (the sandbox is immutable)");

    /* esft's bounds where Python would go on (big integers) or run for hours (a runaway
     * loop): an error naming the line, never a wrapped number or a hang */
    render_case("\n{{ 9223372036854775807 + 1 }}", "{}", NULL,
                "t.jinja:2: integer overflow: the template computes a number beyond 64 bits");
    render_case("{{ 2 ** 64 }}", "{}", NULL,
                "t.jinja:1: integer overflow: the template computes a number beyond 64 bits");
    render_case("{{ -x // -1 }}", "{\"x\": 9223372036854775807}", "9223372036854775807", NULL);
    render_case("{{ 1 ** 1000000000000 }}|{{ (-1) ** 3 }}|{{ '' * 1000000000000 }}", "{}", "1|-1|",
                NULL);
    render_case("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "{}", NULL,
                "t.jinja:1: the template ran more than 500000 statements and loop iterations: a "
                "runaway loop (one conversation needs far fewer)");
    render_case("{{ 'x' * 300000000 }}", "{}", NULL,
                "t.jinja: the template builds a text of more than 256 MiB");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR (holding cases.json)\n", argv[0]);
        return 2;
    }
    golden_cases(argv[1]);
    template_errors();
    return check_done("test_chat_template");
}
