/* hf_load: reads a tokenizer.json (jansson) into the stages of hf_internal.h. Every
 * field that changes the ids is read; a type or option not implemented here is an error
 * naming it and the file ("tokenizer.json: normalizer type \"Lowercase\" is not
 * implemented"), never a silent difference. */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_internal.h"

struct loader {
    const char *name;
    struct hf_tokenizer *tok;
    char *err;
    size_t err_size;
};

__attribute__((format(printf, 2, 3))) static int fail(struct loader *L, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    snprintf(L->err, L->err_size, "%s: %s", L->name, message);
    return -1;
}

/* A string member or NULL when absent or null; -1 (with err) when of another type. */
static int get_string(struct loader *L, json_t *obj, const char *key, const char *where,
                      const char **value, size_t *length)
{
    json_t *v = json_object_get(obj, key);
    *value = NULL;
    if (length) *length = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return fail(L, "%s.%s is not a string", where, key);
    *value = json_string_value(v);
    if (length) *length = json_string_length(v);
    return 0;
}

static int get_bool(struct loader *L, json_t *obj, const char *key, const char *where,
                    bool fallback, bool *value)
{
    json_t *v = json_object_get(obj, key);
    *value = fallback;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return fail(L, "%s.%s is not true or false", where, key);
    *value = json_is_true(v);
    return 0;
}

/* A member holding exactly one character (a Rust `char` in the library), kept as a string
 * pattern (Metaspace's replacement) and its code point. */
static int get_char(struct loader *L, json_t *obj, const char *key, const char *where,
                    struct hf_pattern *p, int32_t *codepoint)
{
    const char *value;
    size_t length;
    if (get_string(L, obj, key, where, &value, &length)) return -1;
    if (!value) return fail(L, "%s has no \"%s\"", where, key);
    if (length == 0 || hf_utf8_valid_length((const unsigned char *)value, length) != length)
        return fail(L, "%s.%s \"%s\" is not one character", where, key, value);
    hf_utf8_decode(value, codepoint);
    memset(p, 0, sizeof *p);
    p->kind = HF_PATTERN_STRING;
    p->literal = hf_arena_copy(&L->tok->arena, value, length);
    p->literal_length = length;
    return 0;
}

/* Metaspace's prepend_scheme, or the older add_prefix_space (false means "never"); the
 * library's default is "always" (tokenizers/src/pre_tokenizers/metaspace.rs). */
static int get_prepend_scheme(struct loader *L, json_t *obj, const char *where,
                              enum hf_prepend_scheme *scheme)
{
    static const char *names[] = {"always", "first", "never"};
    const char *name;
    bool add_prefix_space;
    if (get_string(L, obj, "prepend_scheme", where, &name, NULL) ||
        get_bool(L, obj, "add_prefix_space", where, true, &add_prefix_space))
        return -1;
    *scheme = HF_PREPEND_ALWAYS;
    if (name) {
        int k = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(name, names[i])) k = i;
        if (k < 0) return fail(L, "%s: prepend_scheme \"%s\" is unknown", where, name);
        *scheme = (enum hf_prepend_scheme)k;
    }
    /* as in the library, add_prefix_space false needs prepend_scheme "never" beside it
     * (absent, the scheme is "always" and the file does not load there either) */
    if (!add_prefix_space && *scheme != HF_PREPEND_NEVER)
        return fail(L, "%s: add_prefix_space false contradicts prepend_scheme \"%s\"", where,
                    names[*scheme]);
    return 0;
}

static int get_type(struct loader *L, json_t *obj, const char *where, const char **type)
{
    if (!json_is_object(obj)) return fail(L, "%s is not an object", where);
    if (get_string(L, obj, "type", where, type, NULL)) return -1;
    if (!*type) return fail(L, "%s has no \"type\"", where);
    return 0;
}

/* {"String": s} or {"Regex": r} */
static int load_pattern(struct loader *L, json_t *obj, const char *where, struct hf_pattern *p)
{
    memset(p, 0, sizeof *p);
    json_t *s = json_object_get(obj, "String"), *r = json_object_get(obj, "Regex");
    if (json_is_string(s)) {
        p->kind = HF_PATTERN_STRING;
        p->literal = hf_arena_copy(&L->tok->arena, json_string_value(s), json_string_length(s));
        p->literal_length = json_string_length(s);
        return 0;
    }
    if (json_is_string(r)) {
        char message[512];
        if (hf_pattern_regex(p, json_string_value(r), json_string_length(r), message,
                             sizeof message))
            return fail(L, "%s: %s", where, message);
        return 0;
    }
    return fail(L, "%s is neither {\"String\": ...} nor {\"Regex\": ...}", where);
}

static int load_normalizer(struct loader *L, json_t *obj, const char *where,
                           struct hf_normalizer *nm)
{
    const char *type;
    memset(nm, 0, sizeof *nm);
    if (get_type(L, obj, where, &type)) return -1;
    char inner[256];
    if (!strcmp(type, "NFC")) {
        nm->kind = HF_NORM_NFC;
        return 0;
    }
    if (!strcmp(type, "Prepend")) {
        nm->kind = HF_NORM_PREPEND;
        if (get_string(L, obj, "prepend", where, &nm->content, &nm->content_length)) return -1;
        if (!nm->content) return fail(L, "%s (Prepend) has no \"prepend\"", where);
        nm->content = hf_arena_copy(&L->tok->arena, nm->content, nm->content_length);
        return 0;
    }
    if (!strcmp(type, "Replace")) {
        nm->kind = HF_NORM_REPLACE;
        if (get_string(L, obj, "content", where, &nm->content, &nm->content_length)) return -1;
        if (!nm->content) return fail(L, "%s (Replace) has no \"content\"", where);
        nm->content = hf_arena_copy(&L->tok->arena, nm->content, nm->content_length);
        snprintf(inner, sizeof inner, "%s.pattern", where);
        return load_pattern(L, json_object_get(obj, "pattern"), inner, &nm->pattern);
    }
    if (!strcmp(type, "Sequence")) {
        nm->kind = HF_NORM_SEQUENCE;
        json_t *steps = json_object_get(obj, "normalizers");
        if (!json_is_array(steps))
            return fail(L, "%s (Sequence) has no \"normalizers\" list", where);
        nm->steps = hf_calloc(json_array_size(steps) + 1, sizeof *nm->steps);
        for (size_t i = 0; i < json_array_size(steps); i++) {
            snprintf(inner, sizeof inner, "%s.normalizers[%zu]", where, i);
            nm->n_steps++;
            if (load_normalizer(L, json_array_get(steps, i), inner, &nm->steps[i])) return -1;
        }
        return 0;
    }
    return fail(L,
                "%s: normalizer type \"%s\" is not implemented (NFC, Prepend, Replace, "
                "Sequence are)",
                where, type);
}

/* The GPT-2 pre-tokenization regex that ByteLevel applies when use_regex is true. */
static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pre_tokenizer(struct loader *L, json_t *obj, const char *where,
                              struct hf_pre_tokenizer *pt)
{
    const char *type;
    memset(pt, 0, sizeof *pt);
    if (get_type(L, obj, where, &type)) return -1;
    char inner[256];
    if (!strcmp(type, "Sequence")) {
        pt->kind = HF_PRE_SEQUENCE;
        json_t *steps = json_object_get(obj, "pretokenizers");
        if (!json_is_array(steps))
            return fail(L, "%s (Sequence) has no \"pretokenizers\" list", where);
        pt->steps = hf_calloc(json_array_size(steps) + 1, sizeof *pt->steps);
        for (size_t i = 0; i < json_array_size(steps); i++) {
            snprintf(inner, sizeof inner, "%s.pretokenizers[%zu]", where, i);
            pt->n_steps++;
            if (load_pre_tokenizer(L, json_array_get(steps, i), inner, &pt->steps[i])) return -1;
        }
        return 0;
    }
    if (!strcmp(type, "Split")) {
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                      "Contiguous"};
        pt->kind = HF_PRE_SPLIT;
        const char *behavior;
        if (get_string(L, obj, "behavior", where, &behavior, NULL)) return -1;
        if (!behavior) return fail(L, "%s (Split) has no \"behavior\"", where);
        int b = -1;
        for (int i = 0; i < 5; i++)
            if (!strcmp(behavior, names[i])) b = i;
        if (b < 0) return fail(L, "%s: Split behavior \"%s\" is unknown", where, behavior);
        pt->behavior = (enum hf_split_behavior)b;
        if (get_bool(L, obj, "invert", where, false, &pt->invert)) return -1;
        snprintf(inner, sizeof inner, "%s.pattern", where);
        return load_pattern(L, json_object_get(obj, "pattern"), inner, &pt->pattern);
    }
    if (!strcmp(type, "ByteLevel")) {
        pt->kind = HF_PRE_BYTE_LEVEL;
        if (get_bool(L, obj, "add_prefix_space", where, true, &pt->add_prefix_space) ||
            get_bool(L, obj, "use_regex", where, true, &pt->use_regex))
            return -1;
        char message[512];
        if (pt->use_regex &&
            hf_pattern_regex(&pt->pattern, GPT2_REGEX, strlen(GPT2_REGEX), message, sizeof message))
            return fail(L, "%s: %s", where, message);
        return 0;
    }
    if (!strcmp(type, "Digits")) {
        bool individual;
        pt->kind = HF_PRE_DIGITS;
        if (get_bool(L, obj, "individual_digits", where, false, &individual)) return -1;
        pt->pattern.kind = HF_PATTERN_NUMERIC_CHAR;
        pt->behavior = individual ? HF_ISOLATED : HF_CONTIGUOUS;
        return 0;
    }
    if (!strcmp(type, "Metaspace")) {
        int32_t replacement;
        pt->kind = HF_PRE_METASPACE;
        if (get_char(L, obj, "replacement", where, &pt->pattern, &replacement) ||
            get_prepend_scheme(L, obj, where, &pt->prepend_scheme) ||
            get_bool(L, obj, "split", where, true, &pt->split))
            return -1;
        return 0;
    }
    return fail(L,
                "%s: pre_tokenizer type \"%s\" is not implemented (Sequence, Split, "
                "ByteLevel, Digits, Metaspace are)",
                where, type);
}

/* A TemplateProcessing item's special token: its ids from special_tokens. */
static int template_ids(struct loader *L, json_t *specials, const char *name, const char *where,
                        uint32_t **ids, size_t *n)
{
    json_t *entry = json_object_get(specials, name);
    json_t *list = json_object_get(entry, "ids");
    if (!json_is_array(list))
        return fail(L, "%s: special token \"%s\" is not in special_tokens", where, name);
    for (size_t i = 0; i < json_array_size(list); i++) {
        json_t *id = json_array_get(list, i);
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) > UINT32_MAX)
            return fail(L, "%s: special token \"%s\" has a bad id", where, name);
        *ids = hf_realloc(*ids, (*n + 1) * sizeof **ids);
        (*ids)[(*n)++] = (uint32_t)json_integer_value(id);
    }
    return 0;
}

/* Every id a TemplateProcessing adds names a token of the vocabulary or the added tokens
 * (the library would emit it regardless; esft's ids all lie below the vocabulary size). */
static int check_post_ids(struct loader *L, const struct hf_post_processor *pp,
                          uint32_t vocab_size)
{
    for (int i = 0; i < pp->n_steps; i++)
        if (check_post_ids(L, &pp->steps[i], vocab_size)) return -1;
    for (int side = 0; side < 2; side++) {
        const uint32_t *ids = side ? pp->after : pp->before;
        size_t n = side ? pp->n_after : pp->n_before;
        for (size_t k = 0; k < n; k++)
            if (ids[k] >= vocab_size)
                return fail(L,
                            "post_processor: TemplateProcessing adds token id %u, which is not "
                            "in the vocabulary nor the added tokens (ids below %u)",
                            ids[k], vocab_size);
    }
    return 0;
}

static int load_post_processor(struct loader *L, json_t *obj, const char *where,
                               struct hf_post_processor *pp)
{
    const char *type;
    memset(pp, 0, sizeof *pp);
    if (get_type(L, obj, where, &type)) return -1;
    char inner[256];
    if (!strcmp(type, "ByteLevel")) {
        pp->kind = HF_POST_BYTE_LEVEL; /* offsets only: the ids are left as they are */
        return 0;
    }
    if (!strcmp(type, "Sequence")) {
        pp->kind = HF_POST_SEQUENCE;
        json_t *steps = json_object_get(obj, "processors");
        if (!json_is_array(steps))
            return fail(L, "%s (Sequence) has no \"processors\" list", where);
        pp->steps = hf_calloc(json_array_size(steps) + 1, sizeof *pp->steps);
        for (size_t i = 0; i < json_array_size(steps); i++) {
            snprintf(inner, sizeof inner, "%s.processors[%zu]", where, i);
            pp->n_steps++;
            if (load_post_processor(L, json_array_get(steps, i), inner, &pp->steps[i])) return -1;
        }
        return 0;
    }
    if (!strcmp(type, "TemplateProcessing")) {
        pp->kind = HF_POST_TEMPLATE;
        json_t *single = json_object_get(obj, "single");
        json_t *specials = json_object_get(obj, "special_tokens");
        if (!json_is_array(single))
            return fail(L, "%s (TemplateProcessing) has no \"single\"", where);
        bool seen_text = false;
        for (size_t i = 0; i < json_array_size(single); i++) {
            json_t *item = json_array_get(single, i);
            json_t *special = json_object_get(item, "SpecialToken");
            json_t *sequence = json_object_get(item, "Sequence");
            const char *id = json_string_value(json_object_get(special ? special : sequence, "id"));
            snprintf(inner, sizeof inner, "%s.single[%zu]", where, i);
            if (!id) return fail(L, "%s is neither a SpecialToken nor a Sequence", inner);
            if (sequence) {
                if (strcmp(id, "A") || seen_text)
                    return fail(L, "%s: only one $A is implemented in a single template", inner);
                seen_text = true;
            } else if (seen_text) {
                if (template_ids(L, specials, id, inner, &pp->after, &pp->n_after)) return -1;
            } else if (template_ids(L, specials, id, inner, &pp->before, &pp->n_before))
                return -1;
        }
        if (!seen_text) return fail(L, "%s.single has no $A", where);
        return 0;
    }
    return fail(L,
                "%s: post_processor type \"%s\" is not implemented (ByteLevel, "
                "TemplateProcessing, Sequence are)",
                where, type);
}

void hf_post_processor_free(struct hf_post_processor *pp)
{
    if (!pp) return;
    free(pp->before);
    free(pp->after);
    for (int i = 0; i < pp->n_steps; i++) hf_post_processor_free(&pp->steps[i]);
    free(pp->steps);
    memset(pp, 0, sizeof *pp);
}

/* A non-negative integer member, `fallback` when absent. */
static int get_count(struct loader *L, json_t *obj, const char *key, const char *where,
                     size_t fallback, size_t *value)
{
    json_t *v = json_object_get(obj, key);
    *value = fallback;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return fail(L, "%s.%s is not a non-negative integer", where, key);
    *value = (size_t)json_integer_value(v);
    return 0;
}

static int load_decoder(struct loader *L, json_t *obj, const char *where, struct hf_decoder *dec)
{
    const char *type;
    memset(dec, 0, sizeof *dec);
    if (get_type(L, obj, where, &type)) return -1;
    char inner[256];
    if (!strcmp(type, "ByteLevel")) {
        /* its add_prefix_space, trim_offsets and use_regex change offsets, not the text */
        dec->kind = HF_DECODER_BYTE_LEVEL;
        return 0;
    }
    if (!strcmp(type, "ByteFallback")) {
        dec->kind = HF_DECODER_BYTE_FALLBACK;
        return 0;
    }
    if (!strcmp(type, "Fuse")) {
        dec->kind = HF_DECODER_FUSE;
        return 0;
    }
    if (!strcmp(type, "Replace")) {
        dec->kind = HF_DECODER_REPLACE;
        if (get_string(L, obj, "content", where, &dec->content, &dec->content_length)) return -1;
        if (!dec->content) return fail(L, "%s (Replace) has no \"content\"", where);
        dec->content = hf_arena_copy(&L->tok->arena, dec->content, dec->content_length);
        snprintf(inner, sizeof inner, "%s.pattern", where);
        return load_pattern(L, json_object_get(obj, "pattern"), inner, &dec->pattern);
    }
    if (!strcmp(type, "Strip")) {
        struct hf_pattern unused;
        dec->kind = HF_DECODER_STRIP;
        return get_char(L, obj, "content", where, &unused, &dec->strip_char) ||
                       get_count(L, obj, "start", where, 0, &dec->strip_start) ||
                       get_count(L, obj, "stop", where, 0, &dec->strip_stop)
                   ? -1
                   : 0;
    }
    if (!strcmp(type, "Metaspace")) {
        int32_t replacement;
        dec->kind = HF_DECODER_METASPACE;
        return get_char(L, obj, "replacement", where, &dec->pattern, &replacement) ||
                       get_prepend_scheme(L, obj, where, &dec->prepend_scheme)
                   ? -1
                   : 0;
    }
    if (!strcmp(type, "Sequence")) {
        dec->kind = HF_DECODER_SEQUENCE;
        json_t *steps = json_object_get(obj, "decoders");
        if (!json_is_array(steps)) return fail(L, "%s (Sequence) has no \"decoders\" list", where);
        dec->steps = hf_calloc(json_array_size(steps) + 1, sizeof *dec->steps);
        for (size_t i = 0; i < json_array_size(steps); i++) {
            snprintf(inner, sizeof inner, "%s.decoders[%zu]", where, i);
            dec->n_steps++;
            if (load_decoder(L, json_array_get(steps, i), inner, &dec->steps[i])) return -1;
        }
        return 0;
    }
    return fail(L,
                "%s: decoder type \"%s\" is not implemented (ByteLevel, Replace, ByteFallback, "
                "Fuse, Strip, Metaspace, Sequence are)",
                where, type);
}

void hf_decoder_free(struct hf_decoder *dec)
{
    if (!dec) return;
    hf_pattern_free(&dec->pattern);
    for (int i = 0; i < dec->n_steps; i++) hf_decoder_free(&dec->steps[i]);
    free(dec->steps);
    memset(dec, 0, sizeof *dec);
}

static int check_unset(struct loader *L, json_t *obj, const char *key, const char *where)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v) || (json_is_string(v) && json_string_length(v) == 0)) return 0;
    if (json_is_number(v) && json_number_value(v) == 0) return 0;
    return fail(L, "%s.%s is set: not implemented", where, key);
}

static int load_model(struct loader *L, json_t *model)
{
    const char *type;
    struct hf_bpe *bpe = &L->tok->bpe;
    if (get_type(L, model, "model", &type)) return -1;
    if (strcmp(type, "BPE"))
        return fail(L, "model type \"%s\" is not implemented (only BPE is)", type);
    if (check_unset(L, model, "dropout", "model") ||
        check_unset(L, model, "continuing_subword_prefix", "model") ||
        check_unset(L, model, "end_of_word_suffix", "model"))
        return -1;
    if (get_bool(L, model, "byte_fallback", "model", false, &bpe->byte_fallback) ||
        get_bool(L, model, "fuse_unk", "model", false, &bpe->fuse_unk) ||
        get_bool(L, model, "ignore_merges", "model", false, &bpe->ignore_merges))
        return -1;
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab)) return fail(L, "model.vocab is not an object");
    hf_string_map_init(&bpe->vocab, json_object_size(vocab));
    const char *key;
    json_t *value;
    uint32_t n_ids = 0;
    json_object_foreach(vocab, key, value)
    {
        json_int_t id = json_is_integer(value) ? json_integer_value(value) : -1;
        if (id < 0 || id >= (json_int_t)1 << 31)
            return fail(L, "model.vocab[\"%s\"] is not a token id", key);
        if ((uint32_t)id + 1 > n_ids) n_ids = (uint32_t)id + 1;
    }
    bpe->n_ids = n_ids;
    bpe->id_text = hf_calloc(n_ids + 1, sizeof *bpe->id_text);
    bpe->id_length = hf_calloc(n_ids + 1, sizeof *bpe->id_length);
    json_object_foreach(vocab, key, value)
    {
        size_t len = strlen(key);
        const char *text = hf_arena_copy(&L->tok->arena, key, len);
        uint32_t id = (uint32_t)json_integer_value(value);
        hf_string_map_put(&bpe->vocab, text, len, id);
        bpe->id_text[id] = text;
        bpe->id_length[id] = (uint32_t)len;
    }
    const char *unk;
    bpe->unk_id = -1;
    if (get_string(L, model, "unk_token", "model", &unk, NULL)) return -1;
    if (unk) {
        bpe->unk_id = hf_string_map_get(&bpe->vocab, unk, strlen(unk));
        if (bpe->unk_id < 0) return fail(L, "model.unk_token \"%s\" is not in the vocabulary", unk);
    }
    json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges)) return fail(L, "model.merges is not a list");
    hf_pair_map_init(&bpe->merges, json_array_size(merges));
    struct hf_string joined = {0};
    for (size_t i = 0; i < json_array_size(merges); i++) {
        json_t *m = json_array_get(merges, i);
        const char *left, *right;
        size_t left_length, right_length;
        if (json_is_string(m)) {
            /* "a b": exactly one space */
            left = json_string_value(m);
            const char *space = strchr(left, ' ');
            if (!space || strchr(space + 1, ' ') || json_string_length(m) != strlen(left)) {
                hf_string_free(&joined);
                return fail(L, "model.merges[%zu] \"%s\" is not two tokens separated by a space", i,
                            left);
            }
            left_length = (size_t)(space - left);
            right = space + 1;
            right_length = strlen(right);
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            left = json_string_value(json_array_get(m, 0));
            left_length = json_string_length(json_array_get(m, 0));
            right = json_string_value(json_array_get(m, 1));
            right_length = json_string_length(json_array_get(m, 1));
        } else {
            hf_string_free(&joined);
            return fail(L, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
        }
        int64_t a = hf_string_map_get(&bpe->vocab, left, left_length);
        int64_t b = hf_string_map_get(&bpe->vocab, right, right_length);
        joined.n = 0;
        hf_string_append(&joined, left, left_length);
        hf_string_append(&joined, right, right_length);
        int64_t merged = hf_string_map_get(&bpe->vocab, joined.data, joined.n);
        const char *missing = a < 0 ? left : b < 0 ? right : merged < 0 ? joined.data : NULL;
        int missing_length = (int)(a < 0 ? left_length : b < 0 ? right_length : joined.n);
        if (missing) {
            fail(L,
                 "model.merges[%zu] (\"%.*s\" \"%.*s\"): token \"%.*s\" is not in the "
                 "vocabulary",
                 i, (int)left_length, left, (int)right_length, right, missing_length, missing);
            hf_string_free(&joined);
            return -1;
        }
        hf_pair_map_put(&bpe->merges, (uint32_t)a, (uint32_t)b, (uint32_t)i, (uint32_t)merged);
    }
    hf_string_free(&joined);
    return 0;
}

static int load_added_tokens(struct loader *L, json_t *list)
{
    struct hf_tokenizer *tok = L->tok;
    if (!list || json_is_null(list))
        list = json_array();
    else
        json_incref(list);
    int rc = 0;
    if (!json_is_array(list)) rc = fail(L, "added_tokens is not a list");
    tok->added = hf_calloc(json_array_size(list) + 1, sizeof *tok->added);
    hf_string_map_init(&tok->added_by_content, json_array_size(list));
    hf_string_map_init(&tok->special_contents, json_array_size(list));
    for (size_t i = 0; rc == 0 && i < json_array_size(list); i++) {
        json_t *t = json_array_get(list, i);
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%zu]", i);
        struct hf_added_token *a = &tok->added[tok->n_added];
        const char *content;
        size_t length;
        json_t *id = json_object_get(t, "id");
        if (get_string(L, t, "content", where, &content, &length) ||
            get_bool(L, t, "special", where, false, &a->special) ||
            get_bool(L, t, "normalized", where, !a->special, &a->normalized) ||
            get_bool(L, t, "lstrip", where, false, &a->lstrip) ||
            get_bool(L, t, "rstrip", where, false, &a->rstrip) ||
            get_bool(L, t, "single_word", where, false, &a->single_word)) {
            rc = -1;
            break;
        }
        if (!content)
            rc = fail(L, "%s has no content", where);
        else if (!json_is_integer(id) || json_integer_value(id) < 0 ||
                 json_integer_value(id) >= (json_int_t)1 << 31)
            rc = fail(L, "%s has no valid id", where);
        if (rc) break;
        a->text = hf_arena_copy(&tok->arena, content, length);
        a->text_length = length;
        a->content = a->text;
        a->length = length;
        a->id = (uint32_t)json_integer_value(id);
        hf_string_map_put(&tok->added_by_content, a->text, length, a->id);
        if (a->special) hf_string_map_put(&tok->special_contents, a->text, length, a->id);
        tok->n_added++;
    }
    json_decref(list);
    return rc;
}

/* The normalized tokens are matched in their normalized form. */
static int normalize_added(struct loader *L)
{
    struct hf_tokenizer *tok = L->tok;
    struct hf_string out = {0};
    for (int i = 0; i < tok->n_added && tok->normalizer; i++) {
        struct hf_added_token *a = &tok->added[i];
        if (!a->normalized) continue;
        char message[512];
        if (hf_normalize(tok->normalizer, a->text, a->text_length, &out, message, sizeof message)) {
            hf_string_free(&out);
            return fail(L, "added_tokens: \"%s\": %s", a->text, message);
        }
        a->content = hf_arena_copy(&tok->arena, out.data, out.n);
        a->length = out.n;
    }
    hf_string_free(&out);
    return 0;
}

static int load_root(struct loader *L, json_t *root)
{
    struct hf_tokenizer *tok = L->tok;
    if (!json_is_object(root)) return fail(L, "not a JSON object");
    if (check_unset(L, root, "truncation", "tokenizer") ||
        check_unset(L, root, "padding", "tokenizer"))
        return -1;
    json_t *model = json_object_get(root, "model");
    if (!model) return fail(L, "no \"model\"");
    if (load_model(L, model)) return -1;
    if (load_added_tokens(L, json_object_get(root, "added_tokens"))) return -1;
    json_t *v = json_object_get(root, "normalizer");
    if (v && !json_is_null(v)) {
        tok->normalizer = hf_calloc(1, sizeof *tok->normalizer);
        if (load_normalizer(L, v, "normalizer", tok->normalizer)) return -1;
    }
    v = json_object_get(root, "pre_tokenizer");
    if (v && !json_is_null(v)) {
        tok->pre_tokenizer = hf_calloc(1, sizeof *tok->pre_tokenizer);
        if (load_pre_tokenizer(L, v, "pre_tokenizer", tok->pre_tokenizer)) return -1;
    }
    v = json_object_get(root, "post_processor");
    if (v && !json_is_null(v)) {
        tok->post_processor = hf_calloc(1, sizeof *tok->post_processor);
        if (load_post_processor(L, v, "post_processor", tok->post_processor)) return -1;
    }
    v = json_object_get(root, "decoder");
    if (v && !json_is_null(v)) {
        tok->decoder = hf_calloc(1, sizeof *tok->decoder);
        if (load_decoder(L, v, "decoder", tok->decoder)) return -1;
    }
    if (normalize_added(L)) return -1;
    hf_added_set_build(&tok->raw_set, tok->added, tok->n_added, false);
    hf_added_set_build(&tok->normalized_set, tok->added, tok->n_added, true);
    tok->vocab_size = tok->bpe.n_ids;
    for (int i = 0; i < tok->n_added; i++)
        if (tok->added[i].id + 1 > tok->vocab_size) tok->vocab_size = tok->added[i].id + 1;
    tok->added_index = hf_realloc(NULL, (size_t)tok->vocab_size * sizeof *tok->added_index);
    for (uint32_t i = 0; i < tok->vocab_size; i++) tok->added_index[i] = -1;
    for (int i = 0; i < tok->n_added; i++) tok->added_index[tok->added[i].id] = i;
    if (tok->post_processor && check_post_ids(L, tok->post_processor, tok->vocab_size))
        return -1;
    return 0;
}

struct hf_tokenizer *hf_tokenizer_load_json(const char *name, const char *json, size_t size,
                                            char *err, size_t err_size)
{
    struct hf_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) {
        snprintf(err, err_size, "%s: out of memory", name);
        return NULL;
    }
    tok->name = hf_arena_copy(&tok->arena, name, strlen(name));
    struct loader L = {.name = name, .tok = tok, .err = err, .err_size = err_size};
    json_error_t error;
    json_t *root = json_loadb(json, size, 0, &error);
    if (!root) {
        snprintf(err, err_size, "%s:%d:%d: not valid JSON: %s", name, error.line, error.column,
                 error.text);
        hf_tokenizer_free(tok);
        return NULL;
    }
    int rc = load_root(&L, root);
    json_decref(root);
    if (rc) {
        hf_tokenizer_free(tok);
        return NULL;
    }
    return tok;
}

struct hf_tokenizer *hf_tokenizer_load(const char *path, char *err, size_t err_size)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_size, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct hf_string data = {0};
    char buffer[1 << 16];
    size_t got;
    while ((got = fread(buffer, 1, sizeof buffer, f)) > 0) hf_string_append(&data, buffer, got);
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        snprintf(err, err_size, "%s: read error", path);
        hf_string_free(&data);
        return NULL;
    }
    struct hf_tokenizer *tok =
        hf_tokenizer_load_json(path, data.data ? data.data : "", data.n, err, err_size);
    hf_string_free(&data);
    return tok;
}

void hf_tokenizer_free(struct hf_tokenizer *tok)
{
    if (!tok) return;
    hf_string_map_free(&tok->added_by_content);
    hf_string_map_free(&tok->special_contents);
    hf_added_set_free(&tok->raw_set);
    hf_added_set_free(&tok->normalized_set);
    free(tok->added);
    free(tok->added_index);
    hf_normalizer_free(tok->normalizer);
    free(tok->normalizer);
    hf_pre_tokenizer_free(tok->pre_tokenizer);
    free(tok->pre_tokenizer);
    hf_post_processor_free(tok->post_processor);
    free(tok->post_processor);
    hf_decoder_free(tok->decoder);
    free(tok->decoder);
    hf_bpe_free(&tok->bpe);
    hf_arena_free(&tok->arena);
    free(tok);
}
