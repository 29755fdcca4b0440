/* hfconfig_internal: what hfconfig.c (parsing) and hfconfig_write.c (writing) share. */
#ifndef ESFT_HFCONFIG_INTERNAL_H
#define ESFT_HFCONFIG_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "hfconfig.h"

#define SUPPORTED_FAMILIES \
    "qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss"

/* Where messages go: "SOURCE: message" into err. */
struct reader {
    const char *source; /* file name used in messages */
    char *err;
    size_t errsize;
};

/* Writes "r->source: message" into r->err; returns -1. */
int hf_fail(const struct reader *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Typed access to a key of obj: absent -> *out kept (the default) unless required;
 * present with the wrong type -> an error naming PREFIX KEY. prefix names the enclosing
 * object ("rope_parameters.") or is "". hf_get_int_or_null sets *is_null for null. */
const char *hf_kind(const json_t *v); /* "object", "integer", ... for messages */
int hf_get_int64(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                 bool required, int64_t *out);
int hf_get_int(const struct reader *r, json_t *obj, const char *key, bool required, int *out);
int hf_get_int_or_null(const struct reader *r, json_t *obj, const char *key, int *out,
                       bool *is_null);
int hf_get_number(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                  double *out);
int hf_get_bool(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                bool *out);
int hf_get_string(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                  const char **out);

/* hfconfig_families.c: the family's own keys on top of its class defaults; the layers a
 * window slides on when layer_types is not given. */
int hf_parse_family(const struct reader *r, json_t *root, struct model_config *c);
void hf_default_sliding_layers(struct model_config *c);

/* Whether esft parses the family; its transformers class name ("DeepseekV2ForCausalLM"). */
bool hfconfig_family_supported(enum hf_family family);
const char *hfconfig_family_architecture(enum hf_family family);

#endif
