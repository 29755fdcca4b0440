/* fuzz_chat_template: libFuzzer harness for a chat template (src/chat/, what
 * tokenizer_config.json's chat_template or chat_template.jinja hold). The input is the
 * template's text; one that compiles is rendered on a fixed conversation (system, user,
 * assistant with tool calls and reasoning, tool; tools; add_generation_prompt and
 * enable_thinking). What template.h promises is checked: compile and render either
 * succeed or fail with a message, a render is a NUL-terminated string, and the
 * {% generation %} spans lie inside it.
 * Seeds: tests/fuzz/corpus/chat_template (the real templates of tests/chat/ and small
 * templates of the constructs they use). */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat/template.h"
#include "fuzz.h"

static const char context_json[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
    " {\"role\": \"user\", \"content\": \"Weather in Paris?\"},"
    " {\"role\": \"assistant\", \"content\": \"\", \"reasoning_content\": \"need a tool\","
    "  \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\","
    "  \"arguments\": {\"city\": \"Paris\"}}}]},"
    " {\"role\": \"tool\", \"content\": \"21\"},"
    " {\"role\": \"assistant\", \"content\": \"21 degrees \\u00e9\"}],"
    " \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\","
    "  \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}],"
    " \"add_generation_prompt\": false, \"enable_thinking\": true,"
    " \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static json_t *context;
    if (!context) {
        context = json_loads(context_json, 0, NULL);
        fuzz_require(context != NULL);
    }
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    char err[1024] = "";
    struct chat_template *tpl = chat_template_compile(text, "fuzz.jinja", err, sizeof err);
    free(text);
    if (!tpl) {
        fuzz_require(err[0] != '\0');
        return 0;
    }
    struct chat_render_options options = {.now = 1767225600};
    struct chat_span *spans = NULL;
    size_t n_spans = 0;
    err[0] = '\0';
    char *out =
        chat_template_render_spans(tpl, context, &options, &spans, &n_spans, err, sizeof err);
    if (out) {
        size_t n = strlen(out);
        for (size_t i = 0; i < n_spans; i++)
            fuzz_require(spans[i].start <= spans[i].end && spans[i].end <= n);
        free(out);
        free(spans);
    }
    chat_template_free(tpl);
    return 0;
}
