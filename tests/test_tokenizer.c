/* test_tokenizer: the byte tokenizer, the chat template and its loss mask, the row
 * formats of prepare, and the UTF-8 check. Every expected id and mask below was worked
 * out by hand from the template in tokenizer.h:
 *   256 BOS  257 EOS  258 <|system|>  259 <|user|>  260 <|assistant|>  261 END_OF_TURN */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

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
    char err[256];
    CHECK(tokenizer_open(tok, "byte", err, sizeof err) == 0, "byte: %s", err);
    CHECK(strcmp(tok->name, "byte") == 0, "name %s", tok->name);
    CHECK(tok->vocab_size == 262, "vocab_size %llu", (unsigned long long)tok->vocab_size);
    CHECK(tok->begin_of_text == BOS && tok->end_of_text == EOS && tok->system == SYS &&
              tok->user == USR && tok->assistant == AST && tok->end_of_turn == EOT,
          "special ids");
    struct tokenizer other;
    CHECK(tokenizer_open(&other, "gpt2/tokenizer.json", err, sizeof err) != 0,
          "a tokenizer.json is not supported yet");
    CHECK(strstr(err, "tokenizer 'gpt2/tokenizer.json' is not supported yet; use byte") != NULL,
          "message: %s", err);
}

static void test_encode(const struct tokenizer *tok)
{
    char err[256];
    struct token_buffer buf = {0};
    /* "Hi!" = 0x48 0x69 0x21 */
    CHECK(tok->encode(tok, "Hi!", 3, 1, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ascii[] = {72, 105, 33};
    const uint8_t ascii_mask[] = {1, 1, 1};
    CHECK_SAMPLE(&buf, ascii, ascii_mask, "ascii");
    /* e-acute U+00E9 = C3 A9; euro U+20AC = E2 82 AC; grinning face U+1F600 = F0 9F 98 80 */
    buf.n = 0;
    const char *text = "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";
    CHECK(tok->encode(tok, text, strlen(text), 0, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t multi[] = {195, 169, 226, 130, 172, 240, 159, 152, 128};
    const uint8_t multi_mask[] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK_SAMPLE(&buf, multi, multi_mask, "multi-byte");
    /* A failed encode leaves the buffer as it was. */
    CHECK(tok->encode(tok, "ok\xC3", 3, 1, &buf, err, sizeof err) != 0, "truncated accepted");
    CHECK(buf.n == 9, "buffer changed by a failed encode: %zu", buf.n);
    CHECK(strstr(err, "invalid UTF-8 at byte 3") != NULL, "message: %s", err);
    token_buffer_free(&buf);
}

static void test_chat(const struct tokenizer *tok)
{
    char err[256];
    struct token_buffer buf = {0};
    /* system "S", user "Hi", assistant "Yo" */
    struct chat_message conversation[] = {{ROLE_SYSTEM, "S", 1, false},
                                          {ROLE_USER, "Hi", 2, false},
                                          {ROLE_ASSISTANT, "Yo", 2, false}};
    CHECK(tokenizer_format_chat(tok, conversation, 3, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ids[] = {BOS, SYS, 83, EOT, USR, 72, 105, EOT, AST, 89, 111, EOT, EOS};
    const uint8_t mask[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids, mask, "system + two turns");

    /* Two exchanges, the first answer carrying "mask": 1; an empty user message. */
    buf.n = 0;
    struct chat_message masked[] = {{ROLE_USER, "a", 1, false},
                                    {ROLE_ASSISTANT, "b", 1, true},
                                    {ROLE_USER, "", 0, false},
                                    {ROLE_ASSISTANT, "d", 1, false}};
    CHECK(tokenizer_format_chat(tok, masked, 4, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ids2[] = {BOS, USR, 97, EOT, AST, 98, EOT, USR, EOT, AST, 100, EOT, EOS};
    const uint8_t mask2[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids2, mask2, "mask: 1");

    /* Invalid content: refused, buffer untouched. */
    size_t before = buf.n;
    struct chat_message bad[] = {{ROLE_USER, "q", 1, false},
                                 {ROLE_ASSISTANT, "\xED\xA0\x80", 3, false}};
    CHECK(tokenizer_format_chat(tok, bad, 2, &buf, err, sizeof err) != 0, "surrogate accepted");
    CHECK(buf.n == before, "buffer changed by a failed format: %zu", buf.n);
    CHECK(strstr(err, "message 2: invalid UTF-8") != NULL, "message: %s", err);

    /* Plain text: loss on every byte and on EOS. */
    buf.n = 0;
    CHECK(tokenizer_format_text(tok, "ok", 2, &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ids3[] = {BOS, 111, 107, EOS};
    const uint8_t mask3[] = {0, 1, 1, 1};
    CHECK_SAMPLE(&buf, ids3, mask3, "text");
    token_buffer_free(&buf);
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
    CHECK(prepare_format_row(tok, prompt, strlen(prompt), &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ids[] = {BOS, USR, 50, 43, 50, EOT, AST, 52, EOT, EOS};
    const uint8_t mask[] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    CHECK_SAMPLE(&buf, ids, mask, "prompt/completion");

    buf.n = 0;
    const char *text = "{\"text\": \"\\u00e9!\"}"; /* an escaped e-acute: C3 A9 */
    CHECK(prepare_format_row(tok, text, strlen(text), &buf, err, sizeof err) == 0, "%s", err);
    const uint32_t ids2[] = {BOS, 195, 169, 33, EOS};
    const uint8_t mask2[] = {0, 1, 1, 1, 1};
    CHECK_SAMPLE(&buf, ids2, mask2, "text with an escape");

    buf.n = 0;
    const char *chat = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": "
                       "\"assistant\", \"content\": \"y\", \"mask\": 1}, {\"role\": \"user\", "
                       "\"content\": \"z\"}, {\"role\": \"assistant\", \"content\": \"w\", "
                       "\"mask\": 0}]}";
    CHECK(prepare_format_row(tok, chat, strlen(chat), &buf, err, sizeof err) == 0, "%s", err);
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
        {"[1, 2]", "the row is an array; it must be an object"},
        {"\"text\"", "the row is a string"},
        {"{\"id\": 3}", "none of \"messages\""},
        {"{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}", "mixes formats"},
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
         "message 2: unknown role \"tool\""},
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
        int status = prepare_format_row(tok, bad[i].row, strlen(bad[i].row), &buf, err, sizeof err);
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
    tokenizer_close(&tok);
    return check_done("test_tokenizer");
}
