/* test_hf_tokenizer: the tokenizer.json implementation against the Hugging Face
 * `tokenizers` library's own output (see tests/tokenizer/README).
 *
 * Usage: test_hf_tokenizer DIR   (DIR = tests/tokenizer)
 *   DIR/cases.json.gz: small tokenizers, one per construct (Split behaviors and invert,
 *     Digits, ByteLevel options, normalizers, added-token flags, TemplateProcessing,
 *     byte_fallback, unk), each with texts and the library's ids and decoded text;
 *   DIR/metaspace_cases.json.gz: the same for SentencePiece-style constructs (Metaspace's
 *     prepend_scheme and split, the Mixtral decoders);
 *   DIR/corpus.bin.gz and DIR/{olmoe,qwen,mixtral,mixtral_metaspace,deepseek-v2,
 *     deepseek-v3,glm45,gpt-oss}/: real tokenizers (glm45 and gpt-oss: the real pipeline
 *     over a small trained vocabulary), the corpora (corpus.bin.gz; chat.bin.gz: every
 *     family's added tokens in text), and per record the library's ids and decoded text
 *     (and the tokens spelling hf_tokenizer_normalize's text);
 *   bad tokenizer files, each refused with a message naming the file and the fault. */
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "gzfile.h"
#include "tokenizer/hf_tokenizer.h"

static struct hf_tokenizer *load_gz(const char *path)
{
    size_t size;
    char *json = read_gz(path, &size);
    CHECK(json != NULL, "cannot read %s", path);
    if (!json) return NULL;
    char err[1024];
    struct hf_tokenizer *tok = hf_tokenizer_load_json(path, json, size, err, sizeof err);
    CHECK(tok != NULL, "%s", err);
    free(json);
    return tok;
}

static void print_ids(const char *what, const uint32_t *ids, size_t n)
{
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %u", ids[i]);
    fputc('\n', stderr);
}

/* One text: encode and decode, compared with the library's. Returns 1 when both agree;
 * the first differences are shown, the rest only counted. */
static int compare_one(const struct hf_tokenizer *tok, const char *label, const char *text,
                       size_t length, const uint32_t *want, size_t n_want, const char *want_text,
                       size_t want_length)
{
    static int shown;
    struct hf_ids got = {0};
    char err[512];
    if (hf_tokenizer_encode(tok, text, length, true, &got, err, sizeof err)) {
        fprintf(stderr, "%s: encode failed: %s\n", label, err);
        return 0;
    }
    bool same_ids =
        got.n == n_want && (n_want == 0 || !memcmp(got.ids, want, n_want * sizeof *want));
    size_t decoded_length = 0;
    char *decoded =
        hf_tokenizer_decode(tok, got.ids, got.n, true, &decoded_length, err, sizeof err);
    bool same_text =
        decoded && decoded_length == want_length && !memcmp(decoded, want_text, want_length);
    if ((!same_ids || !same_text) && shown++ < 20) {
        if (!same_ids) {
            fprintf(stderr, "%s: ids differ from the library's\n", label);
            print_ids("esft", got.ids, got.n);
            print_ids("tokenizers", want, n_want);
        }
        if (!same_text)
            fprintf(stderr,
                    "%s: decode(encode(x)) differs from the library's decode:\n  \"%.*s\"\n  "
                    "\"%.*s\"\n",
                    label, (int)decoded_length, decoded ? decoded : "", (int)want_length,
                    want_text);
    }
    free(decoded);
    hf_ids_free(&got);
    return same_ids && same_text;
}

static size_t json_ids(json_t *list, uint32_t **ids)
{
    size_t n = json_array_size(list);
    *ids = malloc((n + 1) * sizeof **ids);
    for (size_t i = 0; i < n; i++)
        (*ids)[i] = (uint32_t)json_integer_value(json_array_get(list, i));
    return n;
}

/* cases.json: [{"name", "tokenizer": {...}, "texts": [{"text", "ids", "decoded"}]}] */
static void small_cases(const char *dir, const char *file)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    size_t size;
    char *data = read_gz(path, &size);
    CHECK(data != NULL, "cannot read %s", path);
    if (!data) return;
    json_error_t error;
    json_t *cases = json_loadb(data, size, JSON_ALLOW_NUL, &error);
    free(data);
    CHECK(json_is_array(cases), "%s: %s", path, error.text);
    size_t index, n_texts = 0, n_same = 0;
    json_t *c;
    json_array_foreach(cases, index, c)
    {
        const char *name = json_string_value(json_object_get(c, "name"));
        char *json = json_dumps(json_object_get(c, "tokenizer"), 0);
        char err[1024];
        struct hf_tokenizer *tok =
            hf_tokenizer_load_json(name, json, strlen(json), err, sizeof err);
        free(json);
        CHECK(tok != NULL, "case %s: %s", name, err);
        if (!tok) continue;
        size_t k;
        json_t *t;
        json_array_foreach(json_object_get(c, "texts"), k, t)
        {
            uint32_t *ids;
            size_t n = json_ids(json_object_get(t, "ids"), &ids);
            json_t *text = json_object_get(t, "text"), *decoded = json_object_get(t, "decoded");
            char label[256];
            snprintf(label, sizeof label, "case %s text %zu", name, k);
            n_texts++;
            n_same += compare_one(tok, label, json_string_value(text), json_string_length(text),
                                  ids, n, json_string_value(decoded), json_string_length(decoded));
            free(ids);
        }
        hf_tokenizer_free(tok);
    }
    json_decref(cases);
    printf("small cases (%s): %zu of %zu texts as the library\n", file, n_same, n_texts);
    CHECK(n_texts > 0 && n_same == n_texts, "%zu of %zu texts differ", n_texts - n_same, n_texts);
}

/* Parses one line of expected.txt.gz: ids, a tab, "=" or a JSON string. */
static int parse_expected(char *line, uint32_t **ids, size_t *n, char **decoded,
                          size_t *decoded_length, json_t **holder)
{
    char *tab = strchr(line, '\t');
    if (!tab) return -1;
    *tab = 0;
    *n = 0;
    for (char *p = line; *p;) {
        char *end;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p) break;
        (*ids)[(*n)++] = (uint32_t)v;
        p = end;
    }
    *holder = NULL;
    *decoded = NULL;
    if (strcmp(tab + 1, "=")) {
        json_error_t error;
        *holder = json_loads(tab + 1, JSON_DECODE_ANY | JSON_ALLOW_NUL, &error);
        if (!json_is_string(*holder)) return -1;
        *decoded = (char *)json_string_value(*holder);
        *decoded_length = json_string_length(*holder);
    }
    return 0;
}

/* A SentencePiece-style token's bytes as hf_tokenizer.h documents them: its text with
 * each "▁" a space, a byte-fallback token "<0xNN>" that one byte. */
static void metaspace_bytes(const char *token, size_t n, char *out, size_t *length)
{
    unsigned value;
    if (n == 6 && sscanf(token, "<0x%2X>", &value) == 1) {
        out[0] = (char)value;
        *length = 1;
        return;
    }
    *length = 0;
    for (size_t i = 0; i < n;) {
        bool space = n - i >= 3 && !memcmp(token + i, "\xE2\x96\x81", 3);
        out[(*length)++] = space ? ' ' : token[i];
        i += space ? 3 : 1;
    }
}

/* The tokens of text (no special tokens added) spell hf_tokenizer_normalize's text byte
 * for byte, as the loss masks need (prepare's mark_tokens): the total of
 * hf_tokenizer_token_ends, and with `metaspace` each token's bytes by the rule above. */
static bool spells_normalized(const struct hf_tokenizer *tok, const char *text, size_t length,
                              bool metaspace)
{
    struct hf_ids ids = {0};
    char err[512];
    size_t spelled_length = 0;
    char *spelled = hf_tokenizer_normalize(tok, text, length, &spelled_length, err, sizeof err);
    bool same =
        spelled && hf_tokenizer_encode(tok, text, length, false, &ids, err, sizeof err) == 0;
    size_t *ends = malloc((ids.n + 1) * sizeof *ends);
    same = same && hf_tokenizer_token_ends(tok, ids.ids, ids.n, ends) == 0 &&
           (ids.n ? ends[ids.n - 1] : 0) == spelled_length;
    for (size_t i = 0, at = 0; same && metaspace && i < ids.n; i++) {
        size_t n, got;
        const char *token = hf_tokenizer_id_to_token(tok, ids.ids[i], &n);
        char bytes[256];
        same = token && n < sizeof bytes;
        if (!same) break;
        metaspace_bytes(token, n, bytes, &got);
        same = ends[i] == at + got && !memcmp(spelled + at, bytes, got);
        at += got;
    }
    free(ends);
    free(spelled);
    hf_ids_free(&ids);
    return same;
}

/* One family's tokenizer over one corpus: DIR/CORPUS.bin.gz against
 * DIR/FAMILY/EXPECTED.txt.gz. */
static void corpus(const char *dir, const char *family, const char *corpus_name,
                   const char *expected_name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/tokenizer.json.gz", dir, family);
    clock_t t0 = clock();
    struct hf_tokenizer *tok = load_gz(path);
    if (!tok) return;
    double load_s = (double)(clock() - t0) / CLOCKS_PER_SEC;
    size_t corpus_size, expected_size;
    snprintf(path, sizeof path, "%s/%s.bin.gz", dir, corpus_name);
    char *text = read_gz(path, &corpus_size);
    snprintf(path, sizeof path, "%s/%s/%s.txt.gz", dir, family, expected_name);
    char *expected = read_gz(path, &expected_size);
    CHECK(text && expected, "cannot read the corpus or %s", path);
    if (!text || !expected) {
        free(text);
        free(expected);
        hf_tokenizer_free(tok);
        return;
    }
    uint32_t *ids = malloc((expected_size / 2 + 1) * sizeof *ids);
    size_t records = 0, same = 0, tokens = 0, spelled = 0;
    char *record = text, *line = expected;
    while (record < text + corpus_size) {
        char *end = memchr(record, 0x1E, (size_t)(text + corpus_size - record));
        char *eol = strchr(line, '\n');
        CHECK(end && eol, "%s: corpus and expected ids disagree on the record count at %zu", family,
              records);
        if (!end || !eol) break;
        *eol = 0;
        size_t n;
        char *decoded;
        size_t decoded_length = 0;
        json_t *holder;
        int bad = parse_expected(line, &ids, &n, &decoded, &decoded_length, &holder);
        CHECK(bad == 0, "%s: expected line %zu is malformed", family, records + 1);
        if (!bad) {
            /* "=": the library's decode gave back the record's own bytes */
            if (!decoded) {
                decoded = record;
                decoded_length = (size_t)(end - record);
            }
            char label[64];
            snprintf(label, sizeof label, "%s %s record %zu", family, corpus_name, records + 1);
            same += compare_one(tok, label, record, (size_t)(end - record), ids, n, decoded,
                                decoded_length);
            spelled += spells_normalized(tok, record, (size_t)(end - record),
                                         !strncmp(family, "mixtral", 7));
            tokens += n;
            json_decref(holder);
        }
        records++;
        record = end + 1;
        line = eol + 1;
    }
    printf("%s, %s: %zu of %zu records (%zu tokens, %zu bytes) as the library; vocab %u; "
           "load %.2f s\n",
           family, corpus_name, same, records, tokens, corpus_size, hf_tokenizer_vocab_size(tok),
           load_s);
    CHECK(records > 700 && same == records, "%s, %s: %zu of %zu records differ", family,
          corpus_name, records - same, records);
    CHECK(spelled == records,
          "%s, %s: the tokens of %zu of %zu records do not spell the normalized text", family,
          corpus_name, records - spelled, records);
    free(ids);
    free(text);
    free(expected);
    hf_tokenizer_free(tok);
}

/* A bad file is refused with a message naming it and containing `what`. */
static void refused(const char *name, const char *json, const char *what)
{
    char err[1024] = "";
    struct hf_tokenizer *tok = hf_tokenizer_load_json(name, json, strlen(json), err, sizeof err);
    CHECK(tok == NULL, "%s was accepted", name);
    hf_tokenizer_free(tok);
    CHECK(strncmp(err, name, strlen(name)) == 0 && strstr(err, what) != NULL,
          "%s: message \"%s\" does not name the file and \"%s\"", name, err, what);
}

static void bad_files(void)
{
    const char *bpe = "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, "
                      "\"merges\": [\"a b\"]}";
    char json[2048];
    refused("truncated.json",
            "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\"",
            "not valid JSON");
    refused("wordpiece.json", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}",
            "model type \"WordPiece\" is not implemented");
    snprintf(json, sizeof json,
             "{%s, \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a|b\"}, "
             "\"behavior\": \"Isolated\", \"invert\": false}}",
             bpe);
    refused("bad-regex.json", json, "does not compile");
    refused("unknown-merge.json",
            "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, "
            "\"merges\": [\"a b\", \"a c\"]}}",
            "model.merges[1] (\"a\" \"c\"): token \"c\" is not in the vocabulary");
    refused("unknown-merged.json",
            "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, "
            "\"merges\": [[\"a\", \"b\"]]}}",
            "token \"ab\" is not in the vocabulary");
    /* a TemplateProcessing special token whose id no token has (found by fuzz_tokenizer) */
    snprintf(json, sizeof json,
             "{%s, \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": "
             "[{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": "
             "{\"id\": \"A\", \"type_id\": 0}}], \"pair\": [], \"special_tokens\": {\"<s>\": "
             "{\"id\": \"<s>\", \"ids\": [7], \"tokens\": [\"<s>\"]}}}}",
             bpe);
    refused("post-id.json", json,
            "TemplateProcessing adds token id 7, which is not in the vocabulary");
    snprintf(json, sizeof json, "{%s, \"normalizer\": {\"type\": \"Lowercase\"}}", bpe);
    refused("lowercase.json", json, "normalizer type \"Lowercase\" is not implemented");
    snprintf(json, sizeof json, "{%s, \"pre_tokenizer\": {\"type\": \"Whitespace\"}}", bpe);
    refused("whitespace.json", json, "pre_tokenizer type \"Whitespace\" is not implemented");
    snprintf(json, sizeof json,
             "{%s, \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"_\", "
             "\"prepend_scheme\": \"sometimes\"}}",
             bpe);
    refused("metaspace-scheme.json", json, "prepend_scheme \"sometimes\" is unknown");
    snprintf(json, sizeof json,
             "{%s, \"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": "
             "\"Strip\", \"content\": \"ab\", \"start\": 1, \"stop\": 0}]}}",
             bpe);
    refused("strip.json", json, "decoder.decoders[0].content \"ab\" is not one character");
    snprintf(json, sizeof json, "{%s, \"decoder\": {\"type\": \"WordPiece\"}}", bpe);
    refused("decoder.json", json, "decoder type \"WordPiece\" is not implemented");
    snprintf(json, sizeof json, "{%s, \"post_processor\": {\"type\": \"BertProcessing\"}}", bpe);
    refused("bert.json", json, "post_processor type \"BertProcessing\" is not implemented");
    refused("suffix.json",
            "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": [], "
            "\"end_of_word_suffix\": \"</w>\"}}",
            "model.end_of_word_suffix is set: not implemented");
    char err[1024];
    CHECK(hf_tokenizer_load("/nonexistent/tokenizer.json", err, sizeof err) == NULL &&
              strstr(err, "/nonexistent/tokenizer.json: cannot open") != NULL,
          "missing file: \"%s\"", err);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test_hf_tokenizer DIR\n");
        return 2;
    }
    bad_files();
    small_cases(argv[1], "cases.json.gz");
    small_cases(argv[1], "metaspace_cases.json.gz");
    const char *families[] = {"olmoe", "qwen", "deepseek-v2", "deepseek-v3", "glm45", "gpt-oss"};
    for (size_t i = 0; i < sizeof families / sizeof *families; i++) {
        corpus(argv[1], families[i], "corpus", "expected");
        corpus(argv[1], families[i], "chat", "chat");
    }
    corpus(argv[1], "mixtral", "corpus", "expected");
    corpus(argv[1], "mixtral_metaspace", "corpus", "expected");
    return check_done("test_hf_tokenizer");
}
