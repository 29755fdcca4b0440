/* test_tokenizer: the byte tokenizer, the row shapes of prepare (conversation.c), the
 * fixed chat layout and the ESFT reference layout (sample.c) with their loss masks, and
 * the UTF-8 check. Every expected id and mask below was worked out by hand from the
 * layouts in tokenizer.h and sample.h:
 *   256 BOS  257 EOS  258 <|system|>  259 <|user|>  260 <|assistant|>  261 END_OF_TURN */#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "prepare.h"
#include "tokenizer.h"

enum { BOS = 256, EOS = 257, SYS = 258, USR = 259, AST = 260, EOT = 261 };

static int same_ids(const struct token_buffer *buf, const uint32_t *ids, size_t n)
{
    if (buf->n != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (buf->ids[i] != ids[i]) return 0;
    return 1;
}

static int same_mask(const struct token_buffer *buf, const uint8_t *mask, size_t n)
{
    if (buf->n != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (buf->loss_mask[i] != mask[i]) return 0;
    return 1;
}

static void print_buffer(const char *what, const struct token_buffer *buf)
{
    fprintf(stderr, "%s (%zu):", what, buf->n);
    for (size_t i = 0; i < buf->n; i++) fprintf(stderr, " %u/%u", buf->ids[i], buf->loss_mask[i]);
    fputc('\n', stderr);
}

#define N(a) (sizeof(a) / sizeof(a)[0])
#define CHECK_SAMPLE(buf, ids, mask, what)                                                         \
    do {                                                                                           \
        int ok_ids = same_ids(buf, ids, N(ids)), ok_mask = same_mask(buf, mask, N(mask));          \
        CHECK(ok_ids, "%s: ids differ", what);                                                     \
        CHECK(ok_mask, "%s: loss mask differs", what);                                             \
        if (!ok_ids || !ok_mask) print_buffer(what, buf);                                          \
    } while (0)

static void test_open(struct tokenizer *tok)
{
    char err[512];
    struct tokenizer_options byte = {.spec = "byte"};
    CHECK(tokenizer_open(tok, &byte, err, sizeof err) == 0, "byte: %s", err);
    CHECK(strcmp(tok->name, "byte") == 0, "name %s", tok->name);
    CHECK(tok->vocab_size == 262, "vocab_size %llu", (unsigned long long)tok->vocab_size);
    CHECK(tok->bos == BOS && tok->eos == EOS && !tok->hf && tok->checksum[0] == '\0',
          "byte identity");
    /* auto without a model directory, or with one init writes in this run: byte */
    struct tokenizer other;
    struct tokenizer_options automatic = {.spec = "auto", .model_path = "/nonexistent"};
    CHECK(tokenizer_open(&other, &automatic, err, sizeof err) == 0, "auto: %s", err);
    CHECK(!other.hf && !strcmp(other.name, "byte"), "auto without tokenizer.json: %s", other.name);
    tokenizer_close(&other);
    struct tokenizer_options missing = {.spec = "gpt2/tokenizer.json"};
    CHECK(tokenizer_open(&other, &missing, err, sizeof err) != 0, "a missing file accepted");
    CHECK(strstr(err, "gpt2/tokenizer.json: no such file") != NULL, "message: %s", err);
    char *kwargs[] = {"enable_thinking=false"};
    struct tokenizer_options byte_kwargs = {.spec = "byte", .template_kwargs = kwargs,
                                            .n_template_kwargs = 1};
    CHECK(tokenizer_open(&other, &byte_kwargs, err, sizeof err) != 0, "kwargs for byte accepted");
    CHECK(strstr(err, "template_kwargs is set but the tokenizer is the built-in byte") != NULL,
          "message: %s", err);
    struct tokenizer_options bad_date = {.spec = "byte", .date = "2026-13-01"};
    CHECK(tokenizer_open(&other, &bad_date, err, sizeof err) != 0, "bad date accepted");
    CHECK(strstr(err, "prepare.date: \"2026-13-01\" is not a date") != NULL, "message: %s", err);
}

static void test_encode(const struct tokenizer *tok)
{
    char err[256];
    struct token_buffer buf = {0};
    /* "Hi!" = 0x48 0x69 0x21 */
    CHECK(tokenizer_encode(tok, "Hi!", 3, 1, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ascii[] = {72, 105, 33};
    const uint8_t ascii_mask[] = {1, 1, 1};
    CHECK_SAMPLE(&buf, ascii, ascii_mask, "ascii");
    /* e-acute U+00E9 = C3 A9; euro U+20AC = E2 82 AC; grinning face U+1F600 = F0 9F 98 80 */
    buf.n = 0;
    const char *text = "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";
    CHECK(tokenizer_encode(tok, text, strlen(text), 0, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t multi[] = {195, 169, 226, 130, 172, 240, 159, 152, 128};
    const uint8_t multi_mask[] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK_SAMPLE(&buf, multi, multi_mask, "multi-byte");
    /* A failed encode leaves the buffer as it was. */
    CHECK(tokenizer_encode(tok, "ok\xC3", 3, 1, &buf, err, sizeof err) != 0, "truncated accepted");
    CHECK(buf.n == 9, "buffer changed by a failed encode: %zu", buf.n);
    CHECK(strstr(err, "invalid UTF-8 at byte 3") != NULL, "message: %s", err);
    token_buffer_free(&buf);
}

/* One row through prepare_format_row; returns its status, err and dropped filled. */
static int row(const struct tokenizer *tok, enum prepare_format format, const char *line,
               struct token_buffer *buf, char *dropped, char *err, size_t err_size)
{
    char ignored[512];
    return prepare_format_row(tok, format, line, strlen(line), buf, dropped ? dropped : ignored,
                              512, err, err_size);
}

static void test_chat(const struct tokenizer *tok)
{
    char err[512], dropped[512];
    struct token_buffer buf = {0};
    /* system "S", user "Hi", assistant "Yo" */
    const char *three = "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, "
                        "{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", "
                        "\"content\": \"Yo\"}]}";
    CHECK(row(tok, FORMAT_TEMPLATE, three, &buf, NULL, err, sizeof err) == 0, "%s", err);
    const uint32_t ids[] = {BOS, SYS, 83, EOT, USR, 72, 105, EOT, AST, 89, 111, EOT, EOS};
    const uint8_t mask[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids, mask, "system + two turns");

    /* The same as ShareGPT, with the system prompt as a key of the row. */
    buf.n = 0;
    const char *sharegpt = "{\"system\": \"S\", \"conversations\": [{\"from\": \"human\", "
                           "\"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Yo\"}]}";
    CHECK(row(tok, FORMAT_TEMPLATE, sharegpt, &buf, NULL, err, sizeof err) == 0, "%s", err);
    CHECK_SAMPLE(&buf, ids, mask, "ShareGPT with system");

    /* Content as text parts, joined. */
    buf.n = 0;
    const char *parts = "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, "
                        "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": "
                        "\"H\"}, {\"type\": \"text\", \"text\": \"i\"}]}, {\"role\": "
                        "\"assistant\", \"content\": \"Yo\"}]}";
    CHECK(row(tok, FORMAT_TEMPLATE, parts, &buf, NULL, err, sizeof err) == 0, "%s", err);
    CHECK_SAMPLE(&buf, ids, mask, "content parts");

    /* Two exchanges, the first answer without loss ("loss": false, and the ESFT reference's
     * "mask": 1); an empty user message. */
    const char *no_loss[] = {
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": "
        "\"assistant\", \"content\": \"b\", \"loss\": false}, {\"role\": \"user\", "
        "\"content\": \"\"}, {\"role\": \"assistant\", \"content\": \"d\"}]}",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": "
        "\"assistant\", \"content\": \"b\", \"mask\": 1}, {\"role\": \"user\", "
        "\"content\": \"\"}, {\"role\": \"assistant\", \"content\": \"d\", \"mask\": 0}]}",
    };
    const uint32_t ids2[] = {BOS, USR, 97, EOT, AST, 98, EOT, USR, EOT, AST, 100, EOT, EOS};
    const uint8_t mask2[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    for (int i = 0; i < 2; i++) {
        buf.n = 0;
        CHECK(row(tok, FORMAT_TEMPLATE, no_loss[i], &buf, NULL, err, sizeof err) == 0, "%s", err);
        CHECK_SAMPLE(&buf, ids2, mask2, i ? "mask: 1" : "loss: false");
    }

    /* Alpaca: instruction "2+2", input "x" -> user "2+2\nx"; output "4". Unused keys are
     * reported. */
    buf.n = 0;
    const char *alpaca = "{\"instruction\": \"2+2\", \"input\": \"x\", \"output\": \"4\", "
                         "\"id\": 7, \"source\": \"s\"}";
    CHECK(row(tok, FORMAT_TEMPLATE, alpaca, &buf, dropped, err, sizeof err) == 0, "%s", err);
    const uint32_t ids3[] = {BOS, USR, 50, 43, 50, 10, 120, EOT, AST, 52, EOT, EOS};
    const uint8_t mask3[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids3, mask3, "alpaca");
    CHECK(!strcmp(dropped, "id, source"), "dropped: '%s'", dropped);

    /* Keys of a message the fixed layout has no place for are reported too. */
    buf.n = 0;
    const char *extra = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
                        "{\"role\": \"assistant\", \"content\": \"b\", \"reasoning_content\": "
                        "\"r\"}], \"tools\": []}";
    CHECK(row(tok, FORMAT_TEMPLATE, extra, &buf, dropped, err, sizeof err) == 0, "%s", err);
    CHECK(!strcmp(dropped, "tools, messages[].reasoning_content"), "dropped: '%s'", dropped);

    /* The ESFT reference layout: BOS, "User: " q.strip() "\n\nAssistant:", " " a.strip(),
     * EOS; loss on the answer and its EOS. */
    buf.n = 0;
    const char *reference = "{\"messages\": [{\"role\": \"user\", \"content\": \" q\\n\"}, "
                            "{\"role\": \"assistant\", \"content\": \"a \"}]}";
    CHECK(row(tok, FORMAT_ESFT_REFERENCE, reference, &buf, NULL, err, sizeof err) == 0, "%s", err);
    const uint32_t ids4[] = {BOS, 85, 115, 101, 114, 58, 32, 113, 10, 10, 65, 115, 115, 105,
                             115, 116, 97, 110, 116, 58, 32, 97, EOS};
    const uint8_t mask4[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                             0, 0, 0, 0, 0, 0, 1, 1, 1};
    CHECK_SAMPLE(&buf, ids4, mask4, "esft_reference");
    buf.n = 0;
    CHECK(row(tok, FORMAT_ESFT_REFERENCE, three, &buf, NULL, err, sizeof err) != 0,
          "a system message accepted by esft_reference");
    CHECK(strstr(err, "message 1: role \"system\": prepare.format esft_reference has only user") !=
              NULL,
          "message: %s", err);

    /* Plain text: loss on every byte and on EOS. */
    buf.n = 0;
    CHECK(row(tok, FORMAT_TEMPLATE, "{\"text\": \"ok\"}", &buf, NULL, err, sizeof err) == 0,
          "%s", err);
    const uint32_t ids5[] = {BOS, 111, 107, EOS};
    const uint8_t mask5[] = {0, 1, 1, 1};
    CHECK_SAMPLE(&buf, ids5, mask5, "text");
    token_buffer_free(&buf);
}

/* Where the chat template comes from: tokenizer_config.json's string, its list (the
 * "default" entry, or the one prepare.chat_template names), a chat_template.jinja beside
 * the tokenizer (taken before the config's), or a file prepare.chat_template names. A
 * tiny byte-level tokenizer.json in a temporary directory stands for a checkpoint. */
static void write_text(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL, "cannot write %s", path);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void expect_template(const char *dir, const char *wanted, const char *rendered_start,
                            const char *what)
{
    struct tokenizer tok;
    char err[1024];
    struct tokenizer_options o = {.spec = dir, .chat_template = wanted};
    int rc = tokenizer_open(&tok, &o, err, sizeof err);
    CHECK(rc == 0, "%s: %s", what, err);
    if (rc) return;
    CHECK(tok.bos == 0 && tok.eos == 1, "%s: bos %lld eos %lld", what, (long long)tok.bos,
          (long long)tok.eos);
    struct token_buffer buf = {0};
    const char *row = "{\"messages\": [{\"role\": \"user\", \"content\": \"ab\"}, "
                      "{\"role\": \"assistant\", \"content\": \"ba\"}]}";
    char dropped[512];
    rc = prepare_format_row(&tok, FORMAT_TEMPLATE, row, strlen(row), &buf, dropped,
                            sizeof dropped, err, sizeof err);
    CHECK(rc == 0, "%s: %s", what, err);
    size_t length = 0;
    char *text = rc == 0 ? tokenizer_decode(&tok, buf.ids, buf.n, &length) : NULL;
    CHECK(text && !strncmp(text, rendered_start, strlen(rendered_start)),
          "%s: rendered '%s', expected it to start '%s'", what, text ? text : "", rendered_start);
    free(text);
    token_buffer_free(&buf);
    tokenizer_close(&tok);
}

static void test_template_sources(void)
{
    char dir[] = "/tmp/esft-tok.XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    write_text(dir, "tokenizer.json",
               "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":0,\"content\":\"<s>\","
               "\"single_word\":false,\"lstrip\":false,\"rstrip\":false,\"normalized\":false,"
               "\"special\":true},{\"id\":1,\"content\":\"</s>\",\"single_word\":false,"
               "\"lstrip\":false,\"rstrip\":false,\"normalized\":false,\"special\":true}],"
               "\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"ByteLevel\","
               "\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":true},"
               "\"post_processor\":null,\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{"
               "\"type\":\"BPE\",\"unk_token\":null,\"fuse_unk\":false,\"byte_fallback\":"
               "false,\"vocab\":{\"a\":2,\"b\":3,\"A\":4,\"B\":5,\"C\":6,\":\":7},"
               "\"merges\":[]}}");
    const char *named = "{\"bos_token\": \"<s>\", \"eos_token\": {\"content\": \"</s>\"}, "
                        "\"chat_template\": [{\"name\": \"default\", \"template\": \"A"
                        "{% for m in messages %}{{ m.content }}{% endfor %}\"}, {\"name\": "
                        "\"tool_use\", \"template\": \"B{% for m in messages %}{{ m.content }}"
                        "{% endfor %}\"}]}";
    write_text(dir, "tokenizer_config.json", named);
    expect_template(dir, NULL, "Aabba", "list: default");
    expect_template(dir, "tool_use", "Babba", "list: named");
    struct tokenizer tok;
    char err[1024];
    struct tokenizer_options missing = {.spec = dir, .chat_template = "rag"};
    CHECK(tokenizer_open(&tok, &missing, err, sizeof err) != 0, "an unknown template name");
    CHECK(strstr(err, "\"rag\" is neither a file nor a template named in") != NULL, "%s", err);
    write_text(dir, "tokenizer_config.json",
               "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"chat_template\": "
               "\"C{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}\"}");
    expect_template(dir, NULL, "C<s>abba", "string");
    write_text(dir, "chat_template.jinja",
               "{{ eos_token }}{% for m in messages %}{{ m.content }}{% endfor %}");
    expect_template(dir, NULL, "</s>abba", "chat_template.jinja first");
    char file[512];
    snprintf(file, sizeof file, "%s/chat_template.jinja", dir);
    expect_template(dir, file, "</s>abba", "a file named");
    write_text(dir, "tokenizer_config.json", "{\"bos_token\": \"<x>\"}");
    struct tokenizer_options plain = {.spec = dir};
    CHECK(tokenizer_open(&tok, &plain, err, sizeof err) != 0, "an unknown bos_token");
    CHECK(strstr(err, "tokenizer_config.json: bos_token \"<x>\" is not a token of") != NULL,
          "%s", err);
    const char *names[] = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"};
    for (int i = 0; i < 3; i++) {
        snprintf(file, sizeof file, "%s/%s", dir, names[i]);
        unlink(file);
    }
    rmdir(dir);
}

static void test_utf8(void)
{
    struct {
        const char *bytes;
        int valid;
        size_t bad_at;
        const char *what;
    } cases[] = {
        {"plain ascii", 1, 0, "ascii"},
        {"\xC2\x80", 1, 0, "U+0080, smallest 2-byte"},
        {"\xDF\xBF", 1, 0, "U+07FF"},
        {"\xE0\xA0\x80", 1, 0, "U+0800, smallest 3-byte"},
        {"\xED\x9F\xBF", 1, 0, "U+D7FF, below the surrogates"},
        {"\xEE\x80\x80", 1, 0, "U+E000, above the surrogates"},
        {"\xF0\x90\x80\x80", 1, 0, "U+10000, smallest 4-byte"},
        {"\xF4\x8F\xBF\xBF", 1, 0, "U+10FFFF, largest"},
        {"\xC0\xAF", 0, 0, "overlong '/' in 2 bytes"},
        {"\xC1\xBF", 0, 0, "overlong 2-byte"},
        {"ab\xE0\x80\xAF", 0, 2, "overlong '/' in 3 bytes"},
        {"\xE0\x9F\xBF", 0, 0, "overlong U+07FF in 3 bytes"},
        {"\xF0\x80\x80\xAF", 0, 0, "overlong '/' in 4 bytes"},
        {"\xF0\x8F\xBF\xBF", 0, 0, "overlong U+FFFF in 4 bytes"},
        {"\xED\xA0\x80", 0, 0, "surrogate U+D800"},
        {"x\xED\xBF\xBF", 0, 1, "surrogate U+DFFF"},
        {"\xF4\x90\x80\x80", 0, 0, "U+110000, above the range"},
        {"\xF5\x80\x80\x80", 0, 0, "lead byte F5"},
        {"\xFF", 0, 0, "byte FF"},
        {"a\x80", 0, 1, "lone continuation byte"},
        {"abc\xC3", 0, 3, "truncated 2-byte at the end"},
        {"\xE2\x82", 0, 0, "truncated 3-byte"},
        {"\xF0\x9F\x98", 0, 0, "truncated 4-byte"},
        {"\xE2\x82x", 0, 0, "3-byte cut by an ASCII byte"},
        {"\xC3\xA9\xC3", 0, 2, "good then truncated"},
    };
    for (size_t i = 0; i < N(cases); i++) {
        size_t bad_at = 999;
        bool valid = utf8_valid(cases[i].bytes, strlen(cases[i].bytes), &bad_at);
        CHECK(valid == (bool)cases[i].valid, "%s: valid=%d", cases[i].what, valid);
        if (!cases[i].valid)
            CHECK(bad_at == cases[i].bad_at, "%s: bad at %zu, expected %zu", cases[i].what, bad_at,
                  cases[i].bad_at);
    }
}

/* The three jsonl row formats, parsed and formatted as prepare does. */
static void test_rows(const struct tokenizer *tok)
{
    char err[512];
    struct token_buffer buf = {0};
    const char *prompt = "{\"prompt\": \"2+2\", \"completion\": \"4\", \"id\": 7}";
    CHECK(row(tok, FORMAT_TEMPLATE, prompt, &buf, NULL, err, sizeof err) == 0, "%s", err);
    const uint32_t ids[] = {BOS, USR, 50, 43, 50, EOT, AST, 52, EOT, EOS};
    const uint8_t mask[] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids, mask, "prompt/completion");

    buf.n = 0;
    const char *text = "{\"text\": \"\\u00e9!\"}"; /* an escaped e-acute: C3 A9 */
    CHECK(row(tok, FORMAT_TEMPLATE, text, &buf, NULL, err, sizeof err) == 0, "%s", err);
    const uint32_t ids2[] = {BOS, 195, 169, 33, EOS};
    const uint8_t mask2[] = {0, 1, 1, 1, 1};
    CHECK_SAMPLE(&buf, ids2, mask2, "text with an escape");

    buf.n = 0;
    const char *chat = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": "
                       "\"assistant\", \"content\": \"y\", \"mask\": 1}, {\"role\": \"user\", "
                       "\"content\": \"z\"}, {\"role\": \"assistant\", \"content\": \"w\", "
                       "\"mask\": 0}]}";
    CHECK(row(tok, FORMAT_TEMPLATE, chat, &buf, NULL, err, sizeof err) == 0, "%s", err);
    const uint32_t ids3[] = {BOS, USR, 120, EOT, AST, 121, EOT, USR, 122, EOT, AST, 119, EOT, EOS};
    const uint8_t mask3[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids3, mask3, "messages with mask 1 and mask 0");

    /* Bad rows: refused with a reason, the buffer untouched. */
    struct {
        const char *row;
        const char *reason;
    } bad[] = {
        {"{\"text\": \"x\"", "invalid JSON"},
        {"{\"text\": \"x\"} trailing", "invalid JSON"},
        {"[1, 2]", "the row is a list; it must be an object"},
        {"\"text\"", "the row is a string"},
        {"{\"id\": 3}", "none of \"messages\""},
        {"{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}", "mixes shapes"},
        {"{\"text\": \"a\", \"text\": \"b\"}", "invalid JSON"}, /* duplicate key */
        {"{\"text\": 5}", "\"text\" is an integer; it must be a string"},
        {"{\"prompt\": \"a\"}", "\"prompt\" without \"completion\""},
        {"{\"completion\": \"a\"}", "\"completion\" without \"prompt\""},
        {"{\"prompt\": null, \"completion\": \"a\"}", "\"prompt\" is null"},
        {"{\"messages\": []}", "\"messages\" is an empty list"},
        {"{\"messages\": {}}", "\"messages\" is an object, not a list"},
        {"{\"messages\": [\"hi\"]}", "message 1 is a string, not an object"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"tool\", "
         "\"content\": \"b\"}]}",
         "message 2: role \"tool\": the byte tokenizer's fixed template has only"},
        {"{\"messages\": [{\"role\": \"robot\", \"content\": \"a\"}]}",
         "message 1: unknown role \"robot\""},
        {"{\"conversations\": [{\"from\": \"bot\", \"value\": \"a\"}]}",
         "message 1: unknown from \"bot\""},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"a\", \"loss\": true}]}",
         "message 1: \"loss\" must be false (only assistant messages carry loss)"},
        {"{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\", \"loss\": true, "
         "\"mask\": 1}]}",
         "message 1: \"loss\" and \"mask\" disagree"},
        {"{\"system\": \"s\", \"messages\": [{\"role\": \"system\", \"content\": \"a\"}]}",
         "\"system\" is given twice"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}]}]}",
         "message 1: content part 1 is not {\"type\": \"text\""},
        {"{\"tools\": 3, \"prompt\": \"a\", \"completion\": \"b\"}",
         "\"tools\" is an integer; it must be a list"},
        {"{\"tools\": \"[\", \"prompt\": \"a\", \"completion\": \"b\"}",
         "\"tools\" is a string that is not JSON"},
        {"{\"text\": \"a\", \"system\": \"s\"}", "\"system\" goes with a conversation"},
        {"{\"instruction\": \"a\"}", "\"output\" is missing"},
        {"{\"messages\": [{\"content\": \"a\"}]}", "message 1: \"role\" is missing"},
        {"{\"messages\": [{\"role\": \"user\"}]}", "message 1: \"content\" is missing"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": null}]}",
         "message 1: \"content\" is null"},
        {"{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\", \"mask\": 2}]}",
         "message 1: \"mask\" must be 0 or 1"},
        {"{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\", \"mask\": true}]}",
         "message 1: \"mask\" must be 0 or 1"},
        {"{\"text\": \"\xC0\xAF\"}", "invalid UTF-8 at byte 11"},
        {"{\"text\": \"\xED\xA0\x80\"}", "invalid UTF-8 at byte 11"},
        {"{\"text\": \"ab\xE2\x82\"}", "invalid UTF-8 at byte 13"},
        {"{\"text\": \"\\ud800\"}", "invalid JSON"}, /* an escaped lone surrogate */
    };
    buf.n = 0;
    for (size_t i = 0; i < N(bad); i++) {
        err[0] = '\0';
        int status = row(tok, FORMAT_TEMPLATE, bad[i].row, &buf, NULL, err, sizeof err);
        CHECK(status != 0, "accepted: %s", bad[i].row);
        CHECK(strstr(err, bad[i].reason) != NULL, "%s: message '%s', expected '%s'", bad[i].row,
              err, bad[i].reason);
        CHECK(buf.n == 0, "%s: buffer changed", bad[i].row);
    }
    token_buffer_free(&buf);
}

int main(void)
{
    struct tokenizer tok;
    test_open(&tok);
    test_encode(&tok);
    test_chat(&tok);
    test_utf8();
    test_rows(&tok);
    test_template_sources();
    tokenizer_close(&tok);
    return check_done("test_tokenizer");
}
