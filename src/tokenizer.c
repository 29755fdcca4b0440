/* tokenizer: the byte tokenizer, a checkpoint's tokenizer.json with its configuration and
 * chat template, and their identity (see tokenizer.h). */
#include "tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/template.h"
#include "checksum.h"
#include "files.h"
#include "log.h"
#include "tokenizer/hf_tokenizer.h"

#define CONFIG_MAX_BYTES ((size_t)64 << 20)

void token_buffer_reserve(struct token_buffer *buf, size_t extra)
{
    if (buf->n + extra <= buf->capacity) return;
    size_t capacity = buf->capacity ? buf->capacity : 256;
    while (capacity < buf->n + extra) capacity *= 2;
    uint32_t *ids = realloc(buf->ids, capacity * sizeof *ids);
    if (!ids) fatal(EXIT_RUNTIME, "out of memory growing a token buffer to %zu tokens", capacity);
    buf->ids = ids;
    uint8_t *loss_mask = realloc(buf->loss_mask, capacity);
    if (!loss_mask)
        fatal(EXIT_RUNTIME, "out of memory growing a token buffer to %zu tokens", capacity);
    buf->loss_mask = loss_mask;
    buf->capacity = capacity;
}

void token_buffer_append(struct token_buffer *buf, uint32_t id, uint8_t loss)
{
    token_buffer_reserve(buf, 1);
    buf->ids[buf->n] = id;
    buf->loss_mask[buf->n] = loss;
    buf->n++;
}

void token_buffer_free(struct token_buffer *buf)
{
    free(buf->ids);
    free(buf->loss_mask);
    memset(buf, 0, sizeof *buf);
}

/* RFC 3629, section 4: the well-formed byte sequences. The second byte's range depends
 * on the lead byte (E0: A0..BF excludes overlong forms, ED: 80..9F excludes the
 * surrogates D800..DFFF, F0: 90..BF overlong, F4: 80..8F caps at U+10FFFF); every later
 * byte is 80..BF. C0, C1 and F5..FF never appear. */
bool utf8_valid(const char *text, size_t length, size_t *bad_offset)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < length) {
        unsigned char c = s[i];
        size_t n;                           /* bytes in this sequence */
        unsigned char lo = 0x80, hi = 0xBF; /* range of the second byte */
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        bool ok = i + n <= length && s[i + 1] >= lo && s[i + 1] <= hi;
        for (size_t k = 2; ok && k < n; k++) ok = s[i + k] >= 0x80 && s[i + k] <= 0xBF;
        if (!ok) {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        i += n;
    }
    return true;
}

/* ---- encoding ------------------------------------------------------------------------ */

int tokenizer_encode(const struct tokenizer *tok, const char *text, size_t length, uint8_t loss,
                     struct token_buffer *out, char *err, size_t err_size)
{
    size_t bad;
    if (!utf8_valid(text, length, &bad)) {
        snprintf(err, err_size, "invalid UTF-8 at byte %zu of the text (0x%02x)", bad + 1,
                 (unsigned char)text[bad]);
        return -1;
    }
    if (!tok->hf) { /* each byte of the UTF-8 text is its own id */
        token_buffer_reserve(out, length);
        for (size_t i = 0; i < length; i++) {
            out->ids[out->n + i] = (unsigned char)text[i];
            out->loss_mask[out->n + i] = loss;
        }
        out->n += length;
        return 0;
    }
    struct hf_ids ids = {0};
    if (hf_tokenizer_encode(tok->hf, text, length, false, &ids, err, err_size) != 0) {
        hf_ids_free(&ids);
        return -1;
    }
    token_buffer_reserve(out, ids.n);
    for (size_t i = 0; i < ids.n; i++) {
        out->ids[out->n + i] = ids.ids[i];
        out->loss_mask[out->n + i] = loss;
    }
    out->n += ids.n;
    hf_ids_free(&ids);
    return 0;
}

char *tokenizer_decode(const struct tokenizer *tok, const uint32_t *ids, size_t n, size_t *length)
{
    static const char *const byte_specials[] = {"<|begin_of_text|>", "<|end_of_text|>",
                                                "<|system|>",        "<|user|>",
                                                "<|assistant|>",     "<|end_of_turn|>"};
    if (tok->hf) {
        char err[256];
        char *text = hf_tokenizer_decode(tok->hf, ids, n, false, length, err, sizeof err);
        if (text) return text;
        *length = 0;
        return xstrdup("");
    }
    size_t size = 1;
    for (size_t i = 0; i < n; i++) size += ids[i] < 256 ? 1 : 20;
    char *text = xmalloc(size);
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 256)
            text[at++] = (char)ids[i];
        else if (ids[i] < BYTE_VOCAB_SIZE)
            at += (size_t)sprintf(text + at, "%s", byte_specials[ids[i] - 256]);
    }
    text[at] = '\0';
    *length = at;
    return text;
}

/* ---- opening ------------------------------------------------------------------------- */

static void open_byte(struct tokenizer *tok)
{
    tok->name = xstrdup("byte");
    tok->vocab_size = BYTE_VOCAB_SIZE;
    tok->bos = BYTE_BEGIN_OF_TEXT;
    tok->eos = BYTE_END_OF_TEXT;
}

/* bos_token / eos_token of tokenizer_config.json: a string, {"content": ...} or null. */
static int special_token(struct tokenizer *tok, const json_t *config, const char *key,
                         const char *config_path, int64_t *id, char *err, size_t err_size)
{
    *id = -1;
    const json_t *v = json_object_get(config, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) {
        snprintf(err, err_size, "%s: \"%s\" is %s; expected a string or {\"content\": ...}",
                 config_path, key, json_is_object(v) ? "an object" : "not a string");
        return -1;
    }
    int64_t found = hf_tokenizer_token_to_id(tok->hf, json_string_value(v), json_string_length(v));
    if (found < 0) {
        snprintf(err, err_size, "%s: %s \"%s\" is not a token of %s", config_path, key,
                 json_string_value(v), tok->name);
        return -1;
    }
    *id = found;
    json_object_set(tok->template_vars, key, (json_t *)v);
    return 0;
}

/* name=value of prepare.template_kwargs, the value read as YAML reads a plain scalar:
 * true/false, null, an integer, a number, else the text. */
static int template_kwarg(json_t *vars, const char *entry, char *err, size_t err_size)
{
    const char *eq = strchr(entry, '=');
    if (!eq || eq == entry) {
        snprintf(err, err_size, "prepare.template_kwargs: \"%s\" is not name=value", entry);
        return -1;
    }
    char *name = xstrdup(entry);
    name[eq - entry] = '\0';
    const char *text = eq + 1;
    json_t *value;
    char *end;
    long long integer = strtoll(text, &end, 10);
    if (!strcmp(text, "true") || !strcmp(text, "True"))
        value = json_true();
    else if (!strcmp(text, "false") || !strcmp(text, "False"))
        value = json_false();
    else if (!strcmp(text, "null") || !strcmp(text, "~") || !strcmp(text, "None"))
        value = json_null();
    else if (*text && !*end)
        value = json_integer(integer);
    else {
        double number = strtod(text, &end);
        value = *text && !*end ? json_real(number) : json_string(text);
    }
    json_object_set_new(vars, name, value);
    free(name);
    return 0;
}

/* The template named `name` in a list of {"name", "template"} (tokenizer_config.json's
 * chat_template in its list form): a copy of its text and, in *label, what messages call
 * it; NULL when the list has none of that name. */
static char *named_template(const json_t *list, const char *name, const char *config_path,
                            char **label)
{
    const json_t *item;
    size_t i;
    json_array_foreach(list, i, item) {
        const json_t *key = json_object_get(item, "name");
        const json_t *body = json_object_get(item, "template");
        if (json_is_string(key) && json_is_string(body) && !strcmp(json_string_value(key), name)) {
            char text[4200];
            snprintf(text, sizeof text, "%s (template \"%s\")", config_path, name);
            *label = xstrdup(text);
            return xstrdup(json_string_value(body));
        }
    }
    return NULL;
}

/* The chat template: prepare.chat_template (a file, or a name in the config's list),
 * else chat_template.jinja beside the tokenizer, else the config's chat_template (a
 * string, or the entry named "default" of a list). None is no error: the formatter says
 * so if a conversation needs one. */
static int load_template(struct tokenizer *tok, const char *dir, const json_t *config,
                         const char *config_path, const char *wanted, char *err,
                         size_t err_size)
{
    char path[4200];
    char *text = NULL;
    size_t length;
    const json_t *entry = json_object_get(config, "chat_template");
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    if (wanted && is_regular_file(wanted)) {
        text = file_read(wanted, CONFIG_MAX_BYTES, &length, err, err_size);
        if (!text) return -1;
        tok->chat_name = xstrdup(wanted);
    } else if (wanted) {
        text = named_template(entry, wanted, config_path, &tok->chat_name);
        if (!text) {
            snprintf(err, err_size,
                     "prepare.chat_template: \"%s\" is neither a file nor a template named in "
                     "%s",
                     wanted, config_path);
            return -1;
        }
    } else if (is_regular_file(path)) {
        text = file_read(path, CONFIG_MAX_BYTES, &length, err, err_size);
        if (!text) return -1;
        tok->chat_name = xstrdup(path);
    } else if (json_is_string(entry)) {
        text = xstrdup(json_string_value(entry));
        tok->chat_name = xstrdup(config_path);
    } else if (json_is_array(entry)) {
        text = named_template(entry, "default", config_path, &tok->chat_name);
    }
    if (!text) return 0;
    tok->chat = chat_template_compile(text, tok->chat_name, err, err_size);
    free(text);
    return tok->chat ? 0 : -1;
}

/* prepare.date: YYYY-MM-DD -> noon UTC of that day. */
static int parse_date(const char *date, time_t *now, char *err, size_t err_size)
{
    int y, m, d;
    char tail;
    static const int days_in[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (sscanf(date, "%4d-%2d-%2d%c", &y, &m, &d, &tail) != 3 || m < 1 || m > 12 || d < 1 ||
        d > days_in[m - 1] || (m == 2 && d == 29 && (y % 4 || (y % 100 == 0 && y % 400)))) {
        snprintf(err, err_size, "prepare.date: \"%s\" is not a date YYYY-MM-DD", date);
        return -1;
    }
    /* days since 1970-01-01 of the proleptic Gregorian date (Howard Hinnant's
     * days_from_civil), then noon */
    int yy = y - (m <= 2);
    int era = (yy >= 0 ? yy : yy - 399) / 400;
    int yoe = yy - era * 400;
    int doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    long long days = (long long)era * 146097 + doe - 719468;
    *now = (time_t)(days * 86400 + 12 * 3600);
    return 0;
}

static int open_hf(struct tokenizer *tok, const char *file, const struct tokenizer_options *o,
                   char *err, size_t err_size)
{
    tok->name = xstrdup(file);
    uint64_t sum;
    if (checksum_file(file, &sum, err, err_size) != 0) return -1;
    snprintf(tok->checksum, sizeof tok->checksum, "%016llx", (unsigned long long)sum);
    tok->hf = hf_tokenizer_load(file, err, err_size);
    if (!tok->hf) return -1;
    tok->vocab_size = hf_tokenizer_vocab_size(tok->hf);
    tok->template_vars = json_object();
    char *dir = xstrdup(file);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        strcpy(dir, ".");
    char config_path[4200];
    snprintf(config_path, sizeof config_path, "%s/tokenizer_config.json", dir);
    json_t *config = NULL;
    int rc = 0;
    if (is_regular_file(config_path)) {
        json_error_t error;
        config = json_load_file(config_path, JSON_REJECT_DUPLICATES, &error);
        if (!config || !json_is_object(config)) {
            snprintf(err, err_size, "%s:%d: %s", config_path, error.line,
                     config ? "not a JSON object" : error.text);
            rc = -1;
        }
    }
    if (rc == 0) rc = special_token(tok, config, "bos_token", config_path, &tok->bos, err, err_size);
    if (rc == 0) rc = special_token(tok, config, "eos_token", config_path, &tok->eos, err, err_size);
    /* transformers passes the other special tokens too (its special_tokens_map) */
    static const char *const others[] = {"unk_token", "pad_token", "sep_token", "cls_token",
                                         "mask_token"};
    for (size_t i = 0; rc == 0 && i < sizeof others / sizeof others[0]; i++) {
        const json_t *v = json_object_get(config, others[i]);
        if (json_is_object(v)) v = json_object_get(v, "content");
        if (json_is_string(v)) json_object_set(tok->template_vars, others[i], (json_t *)v);
    }
    if (rc == 0)
        rc = load_template(tok, dir, config, config_path, o->chat_template, err, err_size);
    for (int i = 0; rc == 0 && i < o->n_template_kwargs; i++)
        rc = template_kwarg(tok->template_vars, o->template_kwargs[i], err, err_size);
    json_decref(config);
    free(dir);
    return rc;
}

int tokenizer_open(struct tokenizer *tok, const struct tokenizer_options *o, char *err,
                   size_t err_size)
{
    memset(tok, 0, sizeof *tok);
    tok->bos = tok->eos = -1;
    const char *spec = o->spec ? o->spec : "auto";
    char file[4200];
    int rc = 0;
    if (o->date && parse_date(o->date, &tok->now, err, err_size) != 0) return -1;
    if (!strcmp(spec, "byte")) {
        open_byte(tok);
    } else if (!strcmp(spec, "auto")) {
        snprintf(file, sizeof file, "%s/tokenizer.json", o->model_path ? o->model_path : "");
        if (o->model_path && !o->model_made && is_regular_file(file))
            rc = open_hf(tok, file, o, err, err_size);
        else
            open_byte(tok);
    } else {
        if (is_directory(spec))
            snprintf(file, sizeof file, "%s/tokenizer.json", spec);
        else
            snprintf(file, sizeof file, "%s", spec);
        if (!is_regular_file(file)) {
            snprintf(err, err_size, "%s: %s", file,
                     path_exists(file) ? "not a regular file"
                                       : "no such file (expected auto, byte, or a "
                                         "tokenizer.json or its directory)");
            rc = -1;
        } else {
            rc = open_hf(tok, file, o, err, err_size);
        }
    }
    if (rc == 0 && !tok->hf && (o->chat_template || o->n_template_kwargs)) {
        snprintf(err, err_size,
                 "prepare.%s is set but the tokenizer is the built-in byte tokenizer, whose "
                 "chat template is fixed",
                 o->chat_template ? "chat_template" : "template_kwargs");
        rc = -1;
    }
    if (rc != 0) tokenizer_close(tok);
    return rc;
}

void tokenizer_close(struct tokenizer *tok)
{
    free(tok->name);
    free(tok->chat_name);
    hf_tokenizer_free(tok->hf);
    chat_template_free(tok->chat);
    json_decref(tok->template_vars);
    memset(tok, 0, sizeof *tok);
    tok->bos = tok->eos = -1;
}

int tokenizer_model_identity(const char *model_dir, char checksum[17], char *err, size_t err_size)
{
    char file[4200];
    snprintf(file, sizeof file, "%s/tokenizer.json", model_dir);
    checksum[0] = '\0';
    if (!path_exists(file)) return 0;
    uint64_t sum;
    if (checksum_file(file, &sum, err, err_size) != 0) return -1;
    snprintf(checksum, 17, "%016llx", (unsigned long long)sum);
    return 1;
}
