/* conversation: jsonl rows of every accepted shape -> one canonical conversation (see
 * conversation.h). */
#include "conversation.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "tokenizer.h"

const char *json_type_name(const json_t *value)
{
    switch (json_typeof(value)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "a list";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "a JSON value";
}

void conversation_drop(struct conversation *c, const char *name)
{
    size_t n = strlen(name), used = strlen(c->dropped);
    for (const char *p = c->dropped; *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == n && !memcmp(p, name, n)) return;
        p += len + (comma ? 2 : 0);
    }
    snprintf(c->dropped + used, sizeof c->dropped - used, "%s%s", used ? ", " : "", name);
}

void conversation_free(struct conversation *c)
{
    json_decref(c->messages);
    json_decref(c->tools);
    json_decref(c->row);
    free(c->loss);
    memset(c, 0, sizeof *c);
}

/* ShareGPT's speaker names -> roles. */
static const char *sharegpt_role(const char *from)
{
    static const char *const map[][2] = {
        {"human", "user"},         {"user", "user"},   {"gpt", "assistant"},
        {"assistant", "assistant"}, {"model", "assistant"}, {"system", "system"},
        {"tool", "tool"},          {"observation", "tool"}, {"function", "tool"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(from, map[i][0])) return map[i][1];
    return NULL;
}

/* A message's content as a string (or null): a list of text parts is joined. */
static int content_value(const json_t *content, const char *role, json_t **out, char *err,
                         size_t err_size)
{
    if (json_is_string(content)) {
        *out = json_incref((json_t *)content);
        return 0;
    }
    if (json_is_null(content) && !strcmp(role, "assistant")) {
        *out = json_null();
        return 0;
    }
    if (!json_is_array(content)) {
        snprintf(err, err_size, "\"content\" is %s; it must be a string%s", json_type_name(content),
                 !strcmp(role, "assistant") ? ", null or a list of text parts"
                                            : " or a list of text parts");
        return -1;
    }
    size_t size = 0, i;
    json_t *part;
    json_array_foreach(content, i, part) {
        const json_t *type = json_object_get(part, "type");
        const json_t *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type) ||
            strcmp(json_string_value(type), "text") || !json_is_string(text)) {
            snprintf(err, err_size,
                     "content part %zu is not {\"type\": \"text\", \"text\": STRING} (only text "
                     "parts are supported)",
                     i + 1);
            return -1;
        }
        size += json_string_length(text);
    }
    char *joined = xmalloc(size + 1);
    size_t at = 0;
    json_array_foreach(content, i, part) {
        const json_t *text = json_object_get(part, "text");
        memcpy(joined + at, json_string_value(text), json_string_length(text));
        at += json_string_length(text);
    }
    *out = json_stringn_nocheck(joined, at);
    free(joined);
    return 0;
}

/* Appends one message (a copy with role, content and the loss switch settled). */
static int add_message(struct conversation *c, const json_t *entry, bool sharegpt, size_t index,
                       size_t *capacity, char *err, size_t err_size)
{
    char why[512];
    if (!json_is_object(entry)) {
        snprintf(err, err_size, "message %zu is %s, not an object", index, json_type_name(entry));
        return -1;
    }
    json_t *msg = json_copy((json_t *)entry);
    const char *role_key = "role", *content_key = "content";
    if (sharegpt && json_object_get(msg, "from")) {
        role_key = "from";
        content_key = "value";
    }
    const json_t *role = json_object_get(msg, role_key);
    const json_t *content = json_object_get(msg, content_key);
    const char *name = NULL;
    if (!json_is_string(role)) {
        snprintf(err, err_size, "message %zu: \"%s\" is %s; it must be a string", index, role_key,
                 role ? json_type_name(role) : "missing");
        goto fail;
    }
    name = sharegpt && role_key[0] == 'f' ? sharegpt_role(json_string_value(role))
                                          : json_string_value(role);
    if (!name || (strcmp(name, "system") && strcmp(name, "user") && strcmp(name, "assistant") &&
                  strcmp(name, "tool"))) {
        snprintf(err, err_size, "message %zu: unknown %s \"%.64s\" (expected %s)", index, role_key,
                 json_string_value(role),
                 role_key[0] == 'f' ? "human, user, gpt, assistant, model, system, tool, "
                                      "observation or function"
                                    : "system, user, assistant or tool");
        goto fail;
    }
    if (!content) {
        snprintf(err, err_size, "message %zu: \"%s\" is missing", index, content_key);
        goto fail;
    }
    json_t *text;
    if (content_value(content, name, &text, why, sizeof why) != 0) {
        snprintf(err, err_size, "message %zu: %s", index, why);
        goto fail;
    }
    bool assistant = !strcmp(name, "assistant");
    bool loss = assistant;
    const json_t *loss_key = json_object_get(msg, "loss");
    const json_t *mask_key = json_object_get(msg, "mask");
    if (loss_key) {
        if (!json_is_boolean(loss_key) || (json_is_true(loss_key) && !assistant)) {
            snprintf(err, err_size,
                     "message %zu: \"loss\" must be %s", index,
                     assistant ? "true or false" : "false (only assistant messages carry loss)");
            json_decref(text);
            goto fail;
        }
        loss = json_is_true(loss_key);
    }
    if (mask_key) {
        json_int_t v = json_is_integer(mask_key) ? json_integer_value(mask_key) : -1;
        if (v != 0 && v != 1) {
            snprintf(err, err_size, "message %zu: \"mask\" must be 0 or 1", index);
            json_decref(text);
            goto fail;
        }
        bool mask_loss = assistant && v == 0;
        if (loss_key && mask_loss != loss) {
            snprintf(err, err_size,
                     "message %zu: \"loss\" and \"mask\" disagree (\"mask\": 1 means no loss)",
                     index);
            json_decref(text);
            goto fail;
        }
        loss = mask_loss;
    }
    json_object_del(msg, "loss");
    json_object_del(msg, "mask");
    json_object_del(msg, role_key);
    json_object_del(msg, content_key);
    json_object_set_new(msg, "role", json_string(name));
    json_object_set_new(msg, "content", text);
    json_array_append_new(c->messages, msg);
    if (c->n_messages == *capacity) {
        *capacity = *capacity ? 2 * *capacity : 8;
        bool *grown = realloc(c->loss, *capacity * sizeof *grown);
        if (!grown) fatal(EXIT_RUNTIME, "out of memory reading a conversation");
        c->loss = grown;
    }
    c->loss[c->n_messages++] = loss;
    return 0;
fail:
    json_decref(msg);
    return -1;
}

static int add_list(struct conversation *c, const json_t *list, const char *key, bool sharegpt,
                    size_t *capacity, char *err, size_t err_size)
{
    if (!json_is_array(list)) {
        snprintf(err, err_size, "\"%s\" is %s, not a list", key, json_type_name(list));
        return -1;
    }
    if (json_array_size(list) == 0) {
        snprintf(err, err_size, "\"%s\" is an empty list", key);
        return -1;
    }
    size_t i;
    json_t *entry;
    json_array_foreach(list, i, entry) {
        if (add_message(c, entry, sharegpt, c->n_messages + 1, capacity, err, err_size) != 0)
            return -1;
    }
    return 0;
}

static int add_text(struct conversation *c, const char *role, const char *text, size_t n,
                    size_t *capacity, char *err, size_t err_size)
{
    json_t *msg = json_object();
    json_object_set_new(msg, "role", json_string(role));
    json_object_set_new(msg, "content", json_stringn_nocheck(text, n));
    int rc = add_message(c, msg, false, c->n_messages + 1, capacity, err, err_size);
    json_decref(msg);
    return rc;
}

/* A string field of the row, or -1 with a message. */
static int string_field(const json_t *row, const char *key, const json_t **out, char *err,
                        size_t err_size)
{
    const json_t *v = json_object_get(row, key);
    if (!json_is_string(v)) {
        snprintf(err, err_size, "\"%s\" is %s; it must be a string", key,
                 v ? json_type_name(v) : "missing");
        return -1;
    }
    *out = v;
    return 0;
}

/* prompt and completion: strings or message lists. */
static int add_prompt_completion(struct conversation *c, const json_t *row, size_t *capacity,
                                 char *err, size_t err_size)
{
    static const char *const keys[2] = {"prompt", "completion"};
    for (int k = 0; k < 2; k++) {
        const json_t *v = json_object_get(row, keys[k]);
        if (!v) {
            snprintf(err, err_size, "\"%s\" without \"%s\"", keys[1 - k], keys[k]);
            return -1;
        }
    }
    for (int k = 0; k < 2; k++) {
        const json_t *v = json_object_get(row, keys[k]);
        int rc;
        if (json_is_string(v))
            rc = add_text(c, k ? "assistant" : "user", json_string_value(v), json_string_length(v),
                          capacity, err, err_size);
        else if (json_is_array(v))
            rc = add_list(c, v, keys[k], false, capacity, err, err_size);
        else {
            snprintf(err, err_size, "\"%s\" is %s; it must be a string or a list of messages",
                     keys[k], json_type_name(v));
            rc = -1;
        }
        if (rc) return rc;
    }
    return 0;
}

/* Alpaca: instruction (+ input) -> user, output -> assistant. */
static int add_alpaca(struct conversation *c, const json_t *row, size_t *capacity, char *err,
                      size_t err_size)
{
    const json_t *instruction, *output, *input = json_object_get(row, "input");
    if (string_field(row, "instruction", &instruction, err, err_size) ||
        string_field(row, "output", &output, err, err_size))
        return -1;
    if (input && !json_is_string(input)) {
        snprintf(err, err_size, "\"input\" is %s; it must be a string", json_type_name(input));
        return -1;
    }
    size_t ni = json_string_length(instruction), nx = input ? json_string_length(input) : 0;
    char *user = xmalloc(ni + 1 + nx + 1);
    memcpy(user, json_string_value(instruction), ni);
    size_t n = ni;
    if (nx) {
        user[n++] = '\n';
        memcpy(user + n, json_string_value(input), nx);
        n += nx;
    }
    int rc = add_text(c, "user", user, n, capacity, err, err_size);
    free(user);
    if (rc == 0)
        rc = add_text(c, "assistant", json_string_value(output), json_string_length(output),
                      capacity, err, err_size);
    return rc;
}

/* "system" goes first; "tools" is kept for the template. */
static int add_system_and_tools(struct conversation *c, const json_t *row, size_t *capacity,
                                char *err, size_t err_size)
{
    const json_t *system = json_object_get(row, "system");
    if (system) {
        if (!json_is_string(system)) {
            snprintf(err, err_size, "\"system\" is %s; it must be a string",
                     json_type_name(system));
            return -1;
        }
        const json_t *first = json_array_get(c->messages, 0);
        if (!strcmp(json_string_value(json_object_get(first, "role")), "system")) {
            snprintf(err, err_size,
                     "\"system\" is given twice: as a key of the row and as the first message");
            return -1;
        }
        /* appended like any message, then moved to the front */
        if (add_text(c, "system", json_string_value(system), json_string_length(system),
                     capacity, err, err_size))
            return -1;
        size_t last = c->n_messages - 1;
        json_array_insert(c->messages, 0, json_array_get(c->messages, last));
        json_array_remove(c->messages, last + 1);
        memmove(c->loss + 1, c->loss, last * sizeof *c->loss);
        c->loss[0] = false;
    }
    const json_t *tools = json_object_get(row, "tools");
    if (tools) {
        json_t *list = NULL;
        if (json_is_string(tools)) {
            json_error_t error;
            list = json_loadb(json_string_value(tools), json_string_length(tools), 0, &error);
            if (!list) {
                snprintf(err, err_size, "\"tools\" is a string that is not JSON: %s", error.text);
                return -1;
            }
        } else {
            list = json_incref((json_t *)tools);
        }
        if (!json_is_array(list)) {
            snprintf(err, err_size, "\"tools\" is %s; it must be a list of tool definitions",
                     json_type_name(list));
            json_decref(list);
            return -1;
        }
        c->tools = list;
    }
    return 0;
}

int conversation_parse(const char *line, size_t length, struct conversation *c, char *err,
                       size_t err_size)
{
    memset(c, 0, sizeof *c);
    /* Checked before jansson, whose message for a bad byte is less direct. */
    size_t bad;
    if (!utf8_valid(line, length, &bad)) {
        snprintf(err, err_size, "invalid UTF-8 at byte %zu of the row (0x%02x)", bad + 1,
                 (unsigned char)line[bad]);
        return -1;
    }
    json_error_t error;
    c->row = json_loadb(line, length, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL,
                        &error);
    if (!c->row) {
        snprintf(err, err_size, "invalid JSON at column %d: %s", error.column, error.text);
        return -1;
    }
    const json_t *row = c->row;
    if (!json_is_object(row)) {
        snprintf(err, err_size, "the row is %s; it must be an object", json_type_name(row));
        conversation_free(c);
        return -1;
    }
    static const char *const used[] = {"messages",    "conversations", "prompt", "completion",
                                       "instruction", "input",         "output", "text",
                                       "system",      "tools",         NULL};
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *)row, key, value) {
        bool known = false;
        for (int i = 0; used[i] && !known; i++) known = !strcmp(key, used[i]);
        if (!known) conversation_drop(c, key);
    }
    bool messages = json_object_get(row, "messages") != NULL;
    bool sharegpt = json_object_get(row, "conversations") != NULL;
    bool pc = json_object_get(row, "prompt") || json_object_get(row, "completion");
    bool alpaca = json_object_get(row, "instruction") || json_object_get(row, "output") ||
                  json_object_get(row, "input");
    bool text = json_object_get(row, "text") != NULL;
    int shapes = messages + sharegpt + pc + alpaca + text;
    static const char *const names =
        "\"messages\", \"conversations\", \"prompt\" + \"completion\", \"instruction\" + "
        "\"output\", \"text\"";
    int rc = -1;
    size_t capacity = 0;
    c->messages = json_array();
    if (shapes == 0) {
        snprintf(err, err_size, "the row has none of %s", names);
    } else if (shapes > 1) {
        snprintf(err, err_size, "the row mixes shapes (%s); give exactly one", names);
    } else if (text) {
        const json_t *t = json_object_get(row, "text");
        if (!json_is_string(t)) {
            snprintf(err, err_size, "\"text\" is %s; it must be a string", json_type_name(t));
        } else if (json_object_get(row, "system") || json_object_get(row, "tools")) {
            snprintf(err, err_size, "\"%s\" goes with a conversation, not with \"text\"",
                     json_object_get(row, "system") ? "system" : "tools");
        } else {
            c->is_text = true;
            c->text = json_string_value(t);
            c->text_length = json_string_length(t);
            rc = 0;
        }
    } else {
        if (messages)
            rc = add_list(c, json_object_get(row, "messages"), "messages", false, &capacity, err,
                          err_size);
        else if (sharegpt)
            rc = add_list(c, json_object_get(row, "conversations"), "conversations", true,
                          &capacity, err, err_size);
        else if (pc)
            rc = add_prompt_completion(c, row, &capacity, err, err_size);
        else
            rc = add_alpaca(c, row, &capacity, err, err_size);
        if (rc == 0) rc = add_system_and_tools(c, row, &capacity, err, err_size);
    }
    if (rc != 0) conversation_free(c);
    return rc;
}
