/* sample: conversations -> token ids and loss masks in each format (see sample.h). */
#include "sample.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/template.h"
#include "log.h"
#include "tokenizer/hf_tokenizer.h"

static const char *role_of(const json_t *msg)
{
    return json_string_value(json_object_get(msg, "role"));
}

static const char *content_of(const json_t *msg, size_t *length)
{
    const json_t *content = json_object_get(msg, "content");
    *length = json_is_string(content) ? json_string_length(content) : 0;
    return json_is_string(content) ? json_string_value(content) : "";
}

/* A role a fixed layout has no place for: the message in err; -1. */
static int refuse_role(size_t m, const char *role, const char *layout, const char *roles,
                       char *err, size_t err_size)
{
    snprintf(err, err_size, "message %zu: role \"%s\": %s has only %s", m + 1, role, layout,
             roles);
    return -1;
}

/* Keys of a message that a fixed layout has no place for. */
static void drop_message_keys(struct conversation *c, const json_t *msg)
{
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *)msg, key, value) {
        if (strcmp(key, "role") && strcmp(key, "content")) {
            char name[128];
            snprintf(name, sizeof name, "messages[].%s", key);
            conversation_drop(c, name);
        }
    }
}

/* ---- plain documents ------------------------------------------------------------------ */

static int format_text(const struct tokenizer *tok, const struct conversation *c,
                       struct token_buffer *out, char *err, size_t err_size)
{
    if (tok->eos < 0) {
        snprintf(err, err_size,
                 "a \"text\" row ends with the end-of-sequence token, and %s has no eos_token "
                 "(tokenizer_config.json)",
                 tok->name);
        return -1;
    }
    size_t start = out->n;
    if (!tok->hf) {
        token_buffer_append(out, BYTE_BEGIN_OF_TEXT, 0);
        if (tokenizer_encode(tok, c->text, c->text_length, 1, out, err, err_size) != 0) {
            out->n = start;
            return -1;
        }
    } else {
        struct hf_ids ids = {0};
        if (hf_tokenizer_encode(tok->hf, c->text, c->text_length, true, &ids, err, err_size)) {
            hf_ids_free(&ids);
            return -1;
        }
        for (size_t i = 0; i < ids.n; i++)
            token_buffer_append(out, ids.ids[i], 1);
        hf_ids_free(&ids);
    }
    token_buffer_append(out, (uint32_t)tok->eos, 1);
    /* a leading BOS is no target (nor is any first token: nothing comes before it) */
    if ((int64_t)out->ids[start] == tok->bos) out->loss_mask[start] = 0;
    return 0;
}

/* ---- the byte tokenizer's fixed template ---------------------------------------------- */

static int format_byte_chat(const struct tokenizer *tok, struct conversation *c,
                            struct token_buffer *out, char *err, size_t err_size)
{
    size_t start = out->n;
    if (c->tools) conversation_drop(c, "tools");
    token_buffer_append(out, BYTE_BEGIN_OF_TEXT, 0);
    for (size_t m = 0; m < c->n_messages; m++) {
        const json_t *msg = json_array_get(c->messages, m);
        const char *role = role_of(msg);
        uint32_t id = !strcmp(role, "system")      ? BYTE_SYSTEM
                      : !strcmp(role, "user")      ? BYTE_USER
                      : !strcmp(role, "assistant") ? BYTE_ASSISTANT
                                                   : 0;
        if (!id) {
            out->n = start;
            return refuse_role(m, role, "the byte tokenizer's fixed template",
                               "system, user and assistant (use a checkpoint's tokenizer and "
                               "its chat template)",
                               err, err_size);
        }
        drop_message_keys(c, msg);
        uint8_t loss = c->loss[m];
        token_buffer_append(out, id, 0);
        size_t length;
        const char *content = content_of(msg, &length);
        char why[256];
        if (tokenizer_encode(tok, content, length, loss, out, why, sizeof why) != 0) {
            snprintf(err, err_size, "message %zu: %s", m + 1, why);
            out->n = start;
            return -1;
        }
        token_buffer_append(out, BYTE_END_OF_TURN, loss);
    }
    token_buffer_append(out, BYTE_END_OF_TEXT, 0);
    return 0;
}

/* ---- the ESFT reference's layout -------------------------------------------------------- */

static int format_esft_reference(const struct tokenizer *tok, struct conversation *c,
                                 struct token_buffer *out, char *err, size_t err_size)
{
    if (tok->bos < 0 || tok->eos < 0) {
        snprintf(err, err_size,
                 "prepare.format esft_reference puts BOS first and EOS after each answer, and %s "
                 "has no %s (tokenizer_config.json)",
                 tok->name, tok->bos < 0 ? "bos_token" : "eos_token");
        return -1;
    }
    if (c->tools) conversation_drop(c, "tools");
    size_t start = out->n;
    token_buffer_append(out, (uint32_t)tok->bos, 0);
    for (size_t m = 0; m < c->n_messages; m++) {
        const json_t *msg = json_array_get(c->messages, m);
        const char *role = role_of(msg);
        bool user = !strcmp(role, "user");
        if (!user && strcmp(role, "assistant")) {
            out->n = start;
            return refuse_role(m, role, "prepare.format esft_reference",
                               "user and assistant messages (as the ESFT reference)", err,
                               err_size);
        }
        drop_message_keys(c, msg);
        size_t length, a, b;
        const char *content = content_of(msg, &length);
        chat_py_strip(content, length, &a, &b);
        size_t n = b - a;
        char *text = xmalloc(n + 32);
        size_t at = 0;
        if (user) {
            memcpy(text, "User: ", 6);
            at = 6;
        } else {
            text[at++] = ' ';
        }
        memcpy(text + at, content + a, n);
        at += n;
        if (user) {
            memcpy(text + at, "\n\nAssistant:", 12);
            at += 12;
        }
        uint8_t loss = !user && c->loss[m];
        char why[256];
        int rc = tokenizer_encode(tok, text, at, loss, out, why, sizeof why);
        free(text);
        if (rc != 0) {
            snprintf(err, err_size, "message %zu: %s", m + 1, why);
            out->n = start;
            return -1;
        }
        if (!user) token_buffer_append(out, (uint32_t)tok->eos, loss);
    }
    return 0;
}

/* ---- the checkpoint's chat template ------------------------------------------------------ */

/* A message as transformers hands it to a template (5.x, chat_template_utils'
 * _alias_reasoning_fields): when it has reasoning under "reasoning_content", "thinking" or
 * "reasoning" (the first not null, in that order), "thinking" (read by gpt-oss's template)
 * and "reasoning_content" (read by Qwen3's) both hold it. A new reference. */
static json_t *alias_reasoning(const json_t *msg)
{
    static const char *const fields[] = {"reasoning_content", "thinking", "reasoning"};
    const json_t *reasoning = NULL;
    for (int i = 0; i < 3 && !reasoning; i++) {
        const json_t *v = json_object_get(msg, fields[i]);
        if (v && !json_is_null(v)) reasoning = v;
    }
    if (!reasoning) return json_incref((json_t *)msg);
    json_t *out = json_object();
    if (!json_object_get(msg, "thinking")) json_object_set(out, "thinking", (json_t *)reasoning);
    const char *key;
    json_t *value;
    json_object_foreach((json_t *)msg, key, value) json_object_set(out, key, value);
    json_object_set(out, "reasoning_content", (json_t *)reasoning);
    return out;
}

/* Renders messages[:n_messages] (all: n_messages = c->n_messages). */
static char *render(const struct tokenizer *tok, const struct conversation *c, size_t n_messages,
                    bool add_generation_prompt, struct chat_span **spans, size_t *n_spans,
                    char *err, size_t err_size)
{
    json_t *context = json_copy(tok->template_vars);
    json_t *messages = json_array();
    for (size_t i = 0; i < n_messages; i++)
        json_array_append_new(messages, alias_reasoning(json_array_get(c->messages, i)));
    json_object_set_new(context, "messages", messages);
    if (c->tools) json_object_set(context, "tools", c->tools);
    json_object_set_new(context, "add_generation_prompt", json_boolean(add_generation_prompt));
    struct chat_render_options options = {.now = tok->now};
    char why[1024];
    char *text =
        chat_template_render_spans(tok->chat, context, &options, spans, n_spans, why, sizeof why);
    json_decref(context);
    if (!text) snprintf(err, err_size, "the chat template (%s) says: %s", tok->chat_name, why);
    return text;
}

/* Spans of the rendered text that carry loss, by the prefix rule (sample.h). */
static int prefix_spans(const struct tokenizer *tok, const struct conversation *c,
                        const char *full, size_t full_length, struct chat_span *spans,
                        size_t *n_spans, char *err, size_t err_size)
{
    *n_spans = 0;
    for (size_t i = 0; i < c->n_messages; i++) {
        if (!c->loss[i]) continue;
        if (i == 0) { /* transformers renders no empty conversation, nor does esft */
            snprintf(err, err_size,
                     "assistant message 1 comes first: the prefix rule finds an assistant "
                     "message after the render of the messages before it (give it \"loss\": "
                     "false, or use a template with {%% generation %%} blocks)");
            return -1;
        }
        char *a = render(tok, c, i, true, NULL, NULL, err, err_size);
        if (!a) return -1;
        char *b = render(tok, c, i + 1, false, NULL, NULL, err, err_size);
        if (!b) {
            free(a);
            return -1;
        }
        size_t na = strlen(a), nb = strlen(b);
        size_t end = nb;
        while (end > na && strchr(" \t\r\n", b[end - 1])) end--;
        bool ok = na <= nb && !memcmp(a, b, na) && nb <= full_length && !memcmp(b, full, nb);
        free(a);
        free(b);
        if (!ok) {
            snprintf(err, err_size,
                     "assistant message %zu cannot be located in the rendered conversation: the "
                     "chat template (%s) renders the turns before it differently when the "
                     "conversation ends there (templates that drop earlier reasoning do); give "
                     "earlier assistant messages \"loss\": false, or one turn per row",
                     i + 1, tok->chat_name);
            return -1;
        }
        spans[(*n_spans)++] = (struct chat_span){na, end};
    }
    return 0;
}

/* Which generation blocks carry loss: all, or (when some assistant message has loss false)
 * the k-th block is the k-th assistant message's. */
static int generation_spans(const struct tokenizer *tok, const struct conversation *c,
                            struct chat_span *spans, size_t *n_spans, char *err,
                            size_t err_size)
{
    size_t assistants = 0, trained = 0;
    for (size_t i = 0; i < c->n_messages; i++) {
        if (strcmp(role_of(json_array_get(c->messages, i)), "assistant")) continue;
        assistants++;
        trained += c->loss[i];
    }
    if (trained == assistants) return 0;
    if (*n_spans != assistants) {
        snprintf(err, err_size,
                 "an assistant message has \"loss\": false, but the chat template (%s) writes %zu "
                 "generation blocks for %zu assistant messages, so which block is whose is not "
                 "known",
                 tok->chat_name, *n_spans, assistants);
        return -1;
    }
    size_t k = 0, kept = 0;
    for (size_t i = 0; i < c->n_messages; i++) {
        if (strcmp(role_of(json_array_get(c->messages, i)), "assistant")) continue;
        if (c->loss[i]) spans[kept++] = spans[k];
        k++;
    }
    *n_spans = kept;
    return 0;
}

/* Marks the tokens of ids (the encoding of text) that overlap a span of text. */
static int mark_tokens(const struct tokenizer *tok, const char *text, size_t length,
                       const struct chat_span *spans, size_t n_spans, struct token_buffer *out,
                       size_t first, char *err, size_t err_size)
{
    size_t n = out->n - first;
    if (n == 0 || n_spans == 0) return 0;
    size_t *ends = xmalloc(n * sizeof *ends);
    size_t spelled_length = 0;
    char *spelled = hf_tokenizer_normalize(tok->hf, text, length, &spelled_length, err, err_size);
    int rc = spelled ? hf_tokenizer_token_ends(tok->hf, out->ids + first, n, ends) : -1;
    if (spelled && (rc != 0 || ends[n - 1] != spelled_length)) {
        snprintf(err, err_size,
                 "the tokens of %s do not spell the rendered text byte for byte (its "
                 "pre-tokenizer adds or removes text), so the loss mask cannot be placed",
                 tok->name);
        rc = -1;
    }
    bool same = rc == 0 && spelled_length == length && !memcmp(spelled, text, length);
    for (size_t s = 0; rc == 0 && s < n_spans; s++) {
        size_t lo = spans[s].start, hi = spans[s].end;
        if (!same) { /* the normalizer changed the text: where the cuts fall in its output */
            size_t got;
            char *part = hf_tokenizer_normalize(tok->hf, text, lo, &got, err, err_size);
            if (!part) {
                rc = -1;
                break;
            }
            free(part);
            lo = got;
            part = hf_tokenizer_normalize(tok->hf, text, hi, &got, err, err_size);
            if (!part) {
                rc = -1;
                break;
            }
            free(part);
            hi = got;
        }
        for (size_t t = 0; t < n && lo < hi; t++) {
            size_t begin = t ? ends[t - 1] : 0;
            if (begin < hi && ends[t] > lo) out->loss_mask[first + t] = 1;
        }
    }
    free(spelled);
    free(ends);
    return rc;
}

static int format_template(const struct tokenizer *tok, struct conversation *c,
                           struct token_buffer *out, char *err, size_t err_size)
{
    if (!tok->chat) {
        snprintf(err, err_size,
                 "%s has no chat template (no chat_template in tokenizer_config.json and no "
                 "chat_template.jinja beside it): set prepare.chat_template to a .jinja file, "
                 "or prepare.format: esft_reference",
                 tok->name);
        return -1;
    }
    struct chat_span *spans = NULL;
    size_t n_spans = 0;
    bool marked = chat_template_has_generation(tok->chat);
    char *text = render(tok, c, c->n_messages, false, marked ? &spans : NULL,
                        marked ? &n_spans : NULL, err, err_size);
    if (!text) return -1;
    size_t length = strlen(text), start = out->n;
    int rc = 0;
    if (marked) {
        rc = generation_spans(tok, c, spans, &n_spans, err, err_size);
    } else {
        spans = xmalloc((c->n_messages + 1) * sizeof *spans);
        rc = prefix_spans(tok, c, text, length, spans, &n_spans, err, err_size);
    }
    if (rc == 0) rc = tokenizer_encode(tok, text, length, 0, out, err, err_size);
    if (rc == 0) rc = mark_tokens(tok, text, length, spans, n_spans, out, start, err, err_size);
    if (rc != 0) out->n = start;
    free(spans);
    free(text);
    return rc;
}

int sample_format(const struct tokenizer *tok, enum prepare_format format,
                  struct conversation *c, struct token_buffer *out, char *err, size_t err_size)
{
    if (c->is_text) return format_text(tok, c, out, err, err_size);
    if (format == FORMAT_ESFT_REFERENCE) return format_esft_reference(tok, c, out, err, err_size);
    if (!tok->hf) return format_byte_chat(tok, c, out, err, err_size);
    return format_template(tok, c, out, err, err_size);
}
