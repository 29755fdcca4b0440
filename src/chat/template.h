/* src/chat/template.h: a small interpreter of the Jinja subset that Hugging Face chat templates
 * use (tokenizer_config.json "chat_template" / chat_template.jinja), for turning a conversation
 * into the text a model is trained on. Semantics follow python jinja2 3.x with the environment
 * transformers renders chat templates in: trim_blocks, lstrip_blocks, no trailing newline kept,
 * loop controls (break/continue), the {% generation %} block, the globals raise_exception and
 * strftime_now, and a tojson filter that is json.dumps(ensure_ascii=False).
 *
 * A construct outside the subset is refused when the template is compiled, naming the construct
 * and the template line; nothing is silently rendered differently. */
#ifndef ESFT_CHAT_TEMPLATE_H
#define ESFT_CHAT_TEMPLATE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

struct chat_template;

/* Compile template text. name is used in messages ("NAME:LINE: what is wrong"). On error returns
 * NULL with the message in err. */
struct chat_template *chat_template_compile(const char *text, const char *name, char *err,
                                            size_t errlen);
void chat_template_free(struct chat_template *tpl);

struct chat_render_options {
    /* Time strftime_now formats, in UTC; 0 means the current local time (as transformers'
     * datetime.now()). Tests pin it so golden outputs are reproducible. */
    time_t now;
};

/* Render with the variables of context (a JSON object: messages, tools, add_generation_prompt,
 * bos_token, eos_token, enable_thinking, ...). Returns a malloc'd NUL-terminated string, or NULL
 * with the error in err: for raise_exception(msg) err is exactly msg; otherwise
 * "NAME:LINE: what went wrong". options may be NULL. */
char *chat_template_render(const struct chat_template *tpl, const json_t *context,
                           const struct chat_render_options *options, char *err, size_t errlen);

/* A byte range [start, end) of rendered text. */
struct chat_span {
    size_t start, end;
};

/* Whether the template marks assistant text with {% generation %} blocks. */
bool chat_template_has_generation(const struct chat_template *tpl);

/* chat_template_render, and the byte ranges of the result that {% generation %} blocks
 * wrote (transformers' generation indices, in bytes), in render order: *spans is
 * malloc'd (the caller frees it), *n_spans its length. */
char *chat_template_render_spans(const struct chat_template *tpl, const json_t *context,
                                 const struct chat_render_options *options,
                                 struct chat_span **spans, size_t *n_spans, char *err,
                                 size_t errlen);

/* Python's str.strip() on UTF-8 text: [*begin, *end) is s without leading and trailing
 * whitespace (str.isspace()). */
void chat_py_strip(const char *s, size_t n, size_t *begin, size_t *end);

#endif
