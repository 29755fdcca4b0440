/* conversation: one jsonl row of any shape prepare accepts, read into one canonical
 * conversation (or one plain document) for the formatter (sample.h). Caller: prepare.
 *
 * Shapes (exactly one per row):
 *   {"messages": [MESSAGE, ...]}
 *   {"conversations": [{"from": F, "value": TEXT}, ...]}       ShareGPT; F is human/user,
 *        gpt/assistant/model, system, tool/observation/function (role/content also read)
 *   {"prompt": P, "completion": C}   P and C strings (user, assistant) or message lists
 *   {"instruction": I, "input": X, "output": O}   Alpaca: user I, or I "\n" X when X is
 *        not empty; assistant O ("input" may be absent)
 *   {"text": T}                      a plain document
 * beside which a row may carry "system" (a string: a system message put first; refused
 * when the conversation already starts with one) and "tools" (a list, or a string of
 * JSON holding one: passed to the chat template). Any other key is not used: it is
 * reported in `dropped` so prepare can warn, never silently ignored.
 *
 * MESSAGE: {"role": "system"|"user"|"assistant"|"tool", "content": C, ...} where C is a
 * string, null (an assistant message with tool_calls), or a list of parts
 * {"type": "text", "text": T} joined with no separator. Every other key of a message
 * (tool_calls, reasoning_content, name, tool_call_id, ...) is kept for the template.
 * Loss switch: "loss": false on an assistant message keeps its tokens out of the loss
 * (true, the default, trains it; on other roles only false is allowed); "mask": 1 is the
 * ESFT reference's spelling of the same (its "mask": 0 trains). */
#ifndef ESFT_CONVERSATION_H
#define ESFT_CONVERSATION_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct conversation {
    bool is_text;     /* a plain document: text */
    const char *text; /* is_text: UTF-8, text_length bytes (owned by row) */
    size_t text_length;
    json_t *messages; /* !is_text: list of message objects, content a string or null */
    bool *loss;       /* !is_text: [n_messages] the message's tokens carry loss */
    size_t n_messages;
    json_t *tools;    /* NULL, or the list passed to the template */
    json_t *row;      /* the parsed row (owns the strings above) */
    char dropped[512]; /* keys not used, comma separated ("" if none) */
};

/* Reads one row (length bytes, no newline). Returns 0, or -1 with the reason in err (no
 * file or line prefix); c is then empty. */
int conversation_parse(const char *line, size_t length, struct conversation *c, char *err,
                       size_t err_size);
void conversation_free(struct conversation *c);

/* Adds name to c->dropped unless it is there already. */
void conversation_drop(struct conversation *c, const char *name);

/* The JSON type of a value in words ("an object", "a string", ...). */
const char *json_type_name(const json_t *value);

#endif
