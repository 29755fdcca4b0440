/* test_sample: prepare's formatting of rows with a checkpoint's tokenizer and chat
 * template (conversation.c, sample.c, tokenizer.c) against transformers and tokenizers.
 *
 * Usage: test_sample DIR, DIR the source tree's tests/ folder. DIR/samples/cases.json
 * (tests/samples/make_goldens.py) holds, per setup (a real tokenizer of tests/tokenizer/,
 * its tokenizer_config.json, a chat template), jsonl rows with the token ids and loss
 * mask transformers' apply_chat_template gives them (or the refusal expected). Each setup
 * is laid out as a checkpoint directory would be (tokenizer.json, tokenizer_config.json,
 * chat_template.jinja) in a temporary folder and opened as prepare opens it. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "gzfile.h"
#include "prepare.h"
#include "tokenizer.h"

static int write_file(const char *path, const char *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* gunzip src into dst. */
static int gunzip(const char *src, const char *dst)
{
    size_t n;
    char *data = read_gz(src, &n);
    int rc = data ? write_file(dst, data, n) : -1;
    free(data);
    return rc;
}

static int copy(const char *src, const char *dst)
{
    FILE *in = fopen(src, "rb");
    if (!in) return -1;
    char *data = NULL;
    size_t n = 0, cap = 0;
    int c;
    while ((c = fgetc(in)) != EOF) {
        if (n == cap) data = realloc(data, cap = cap ? 2 * cap : 4096);
        data[n++] = (char)c;
    }
    fclose(in);
    int rc = write_file(dst, data ? data : "", n);
    free(data);
    return rc;
}

static void print_run(const char *what, const uint32_t *ids, const uint8_t *mask, size_t n)
{
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n; i++) fprintf(stderr, " %u/%u", ids[i], mask[i]);
    fputc('\n', stderr);
}

static void run_case(struct tokenizer *tok, const json_t *base_vars, const char *setup,
                     const json_t *c)
{
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *row = json_string_value(json_object_get(c, "row"));
    const char *format = json_string_value(json_object_get(c, "format"));
    const json_t *error = json_object_get(c, "error");
    const json_t *error_kind = json_object_get(c, "error_kind"); /* a Python exception */
    json_t *vars = json_deep_copy(base_vars);
    json_object_update(vars, json_object_get(c, "kwargs"));
    json_t *saved = tok->template_vars;
    tok->template_vars = vars;
    struct token_buffer buf = {0};
    char err[2048], dropped[512];
    enum prepare_format f = !strcmp(format, "esft_reference") ? FORMAT_ESFT_REFERENCE
                                                             : FORMAT_TEMPLATE;
    int rc = prepare_format_row(tok, f, row, strlen(row), &buf, dropped, sizeof dropped, err,
                                sizeof err);
    tok->template_vars = saved;
    json_decref(vars);
    if (error_kind) { /* the template failed in Python: esft must refuse too, in its words */
        CHECK(rc != 0, "%s/%s (%s): accepted, expected a refusal (Python's %s)", setup, name,
              format, json_string_value(error_kind));
        token_buffer_free(&buf);
        return;
    }
    if (error) {
        /* the generator's wording is its own; the reason is the same */
        const char *expected = json_string_value(error);
        const char *key = strstr(expected, "cannot be located") ? "cannot be located"
                          : strstr(expected, "comes first")      ? "comes first"
                                                                 : expected;
        CHECK(rc != 0, "%s/%s (%s): accepted, expected a refusal (%s)", setup, name, format,
              expected);
        if (rc != 0)
            CHECK(strstr(err, key) != NULL, "%s/%s: message '%s', expected '%s'", setup, name, err,
                  key);
        token_buffer_free(&buf);
        return;
    }
    CHECK(rc == 0, "%s/%s (%s): %s", setup, name, format, err);
    const json_t *ids = json_object_get(c, "ids"), *mask = json_object_get(c, "mask");
    size_t n = json_array_size(ids);
    int same_ids = rc == 0 && buf.n == n, same_mask = same_ids;
    for (size_t i = 0; same_ids && i < n; i++) {
        same_ids = buf.ids[i] == (uint32_t)json_integer_value(json_array_get(ids, i));
        same_mask = same_mask && buf.loss_mask[i] == json_integer_value(json_array_get(mask, i));
    }
    CHECK(rc != 0 || same_ids, "%s/%s (%s): ids differ from transformers'", setup, name, format);
    CHECK(rc != 0 || !same_ids || same_mask, "%s/%s (%s): loss mask differs", setup, name,
          format);
    if (rc == 0 && (!same_ids || !same_mask)) {
        print_run("esft", buf.ids, buf.loss_mask, buf.n);
        uint32_t *want = calloc(n + 1, sizeof *want);
        uint8_t *want_mask = calloc(n + 1, 1);
        for (size_t i = 0; i < n; i++) {
            want[i] = (uint32_t)json_integer_value(json_array_get(ids, i));
            want_mask[i] = (uint8_t)json_integer_value(json_array_get(mask, i));
        }
        print_run("transformers", want, want_mask, n);
        free(want);
        free(want_mask);
    }
    token_buffer_free(&buf);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test_sample TESTS_DIR\n");
        return 2;
    }
    char path[4096], tmp[] = "/tmp/esft-sample.XXXXXX";
    snprintf(path, sizeof path, "%s/samples/cases.json", argv[1]);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK(root != NULL, "%s:%d: %s", path, jerr.line, jerr.text);
    if (!root || !mkdtemp(tmp)) return check_done("test_sample");
    size_t s, total = 0;
    json_t *setup;
    json_array_foreach(json_object_get(root, "setups"), s, setup) {
        const char *name = json_string_value(json_object_get(setup, "name"));
        const char *family = json_string_value(json_object_get(setup, "tokenizer"));
        char src[4200], dst[4200];
        snprintf(src, sizeof src, "%s/tokenizer/%s/tokenizer.json.gz", argv[1], family);
        snprintf(dst, sizeof dst, "%s/tokenizer.json", tmp);
        CHECK(gunzip(src, dst) == 0, "cannot unpack %s", src);
        snprintf(dst, sizeof dst, "%s/tokenizer_config.json", tmp);
        char *config = json_dumps(json_object_get(setup, "config"), 0);
        CHECK(write_file(dst, config, strlen(config)) == 0, "cannot write %s", dst);
        free(config);
        /* the template path is relative to the source tree, argv[1]'s parent */
        snprintf(src, sizeof src, "%s/../%s", argv[1],
                 json_string_value(json_object_get(setup, "template")));
        snprintf(dst, sizeof dst, "%s/chat_template.jinja", tmp);
        CHECK(copy(src, dst) == 0, "cannot copy %s", src);
        struct tokenizer tok;
        char err[2048];
        struct tokenizer_options options = {.spec = tmp, .date = "2026-01-01"};
        int rc = tokenizer_open(&tok, &options, err, sizeof err);
        CHECK(rc == 0, "%s: %s", name, err);
        if (rc != 0) continue;
        CHECK(tok.chat != NULL, "%s: no chat template read from %s", name, tmp);
        json_t *base = json_deep_copy(tok.template_vars);
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(setup, "cases"), i, c) {
            run_case(&tok, base, name, c);
            total++;
        }
        json_decref(base);
        tokenizer_close(&tok);
    }
    CHECK(total >= 120, "only %zu cases", total);
    snprintf(path, sizeof path, "%s/tokenizer.json", tmp);
    unlink(path);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", tmp);
    unlink(path);
    snprintf(path, sizeof path, "%s/chat_template.jinja", tmp);
    unlink(path);
    rmdir(tmp);
    json_decref(root);
    return check_done("test_sample");
}
