/* hfconfig: see hfconfig.h. Parses config.json the way transformers 5.23 does (class
 * defaults for absent keys, v4 and v5 spellings of rope and dtype keys, attribute_map
 * aliases) and validates it. The families' class defaults and their own keys are in
 * hfconfig_families.c; writing config.json back is hfconfig_write.c.
 *
 * Defaults and precedence shared by every family (transformers 5.23.0):
 *   modeling_rope_utils.py: default_theta 10000; rope_type "default"; yarn beta_fast 32,
 *     beta_slow 1, truncate true, original_max_position_embeddings = max_position,
 *     factor None -> max_position / original.
 *   configuration_utils.py: "dtype" wins over "torch_dtype"; a non-empty legacy
 *     "rope_scaling" replaces "rope_parameters"; top-level "rope_theta" is used when the
 *     rope dict has none.
 *
 * Unlike transformers, the keys that fix tensor shapes (hidden_size, num_hidden_layers,
 * num_attention_heads, vocab_size, intermediate_size, the expert count, top-k and the
 * expert widths) are required: the class defaults describe one released model, and a
 * config without them is broken, not that model. */
#include "hfconfig.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "hfconfig_internal.h"
#include "log.h"

static const struct {
    const char *model_type;
    const char *architecture;
    bool supported;
} family_table[HF_FAMILY_COUNT] = {
    [HF_QWEN2_MOE] = {"qwen2_moe", "Qwen2MoeForCausalLM", true},
    [HF_QWEN3_MOE] = {"qwen3_moe", "Qwen3MoeForCausalLM", true},
    [HF_OLMOE] = {"olmoe", "OlmoeForCausalLM", true},
    [HF_MIXTRAL] = {"mixtral", "MixtralForCausalLM", true},
    [HF_DEEPSEEK_V2] = {"deepseek_v2", "DeepseekV2ForCausalLM", true},
    [HF_DEEPSEEK_V3] = {"deepseek_v3", "DeepseekV3ForCausalLM", true},
    [HF_GLM4_MOE] = {"glm4_moe", "Glm4MoeForCausalLM", true},
    [HF_GPT_OSS] = {"gpt_oss", "GptOssForCausalLM", true},
};

bool hfconfig_family_supported(enum hf_family family)
{
    return (unsigned)family < HF_FAMILY_COUNT && family_table[family].supported;
}

const char *hfconfig_family_architecture(enum hf_family family)
{
    return (unsigned)family < HF_FAMILY_COUNT ? family_table[family].architecture : "";
}

const char *hfconfig_family_name(enum hf_family family)
{
    return (unsigned)family < HF_FAMILY_COUNT ? family_table[family].model_type : "?";
}

int hfconfig_family_parse(const char *model_type, enum hf_family *out)
{
    for (int i = 0; i < HF_FAMILY_COUNT; i++)
        if (strcmp(model_type, family_table[i].model_type) == 0) {
            *out = (enum hf_family)i;
            return 0;
        }
    return -1;
}

static const char *dtype_names[] = {
    [HF_DTYPE_UNSET] = NULL,
    [HF_DTYPE_BF16] = "bfloat16",
    [HF_DTYPE_F16] = "float16",
    [HF_DTYPE_F32] = "float32",
};

const char *hfconfig_dtype_name(enum hf_dtype dtype)
{
    return (unsigned)dtype <= HF_DTYPE_F32 ? dtype_names[dtype] : NULL;
}

uint64_t hfconfig_fnv1a64(const void *data, size_t n)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a 64 offset basis and prime (Fowler/Noll/Vo) */
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* ---- typed key access -------------------------------------------------------------- */

int hf_fail(const struct reader *r, const char *fmt, ...)
{
    if (r->err && r->errsize) {
        int n = snprintf(r->err, r->errsize, "%s: ", r->source);
        if (n >= 0 && (size_t)n < r->errsize) {
            va_list args;
            va_start(args, fmt);
            vsnprintf(r->err + n, r->errsize - (size_t)n, fmt, args);
            va_end(args);
        }
    }
    return -1;
}

const char *hf_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "integer";
    case JSON_REAL:
        return "real number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    case JSON_NULL:
        return "null";
    }
    return "?";
}

/* Each getter: absent -> keep *out (the default) unless required; present with the wrong
 * type -> error. `prefix` names the enclosing object ("rope_parameters.") or is "". */
int hf_get_int64(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                     bool required, int64_t *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return required ? hf_fail(r, "missing required key '%s%s'", prefix, key) : 0;
    if (!json_is_integer(v))
        return hf_fail(r, "key '%s%s': expected an integer, got %s", prefix, key, hf_kind(v));
    *out = (int64_t)json_integer_value(v);
    return 0;
}

int hf_get_int(const struct reader *r, json_t *obj, const char *key, bool required, int *out)
{
    int64_t v = *out;
    if (hf_get_int64(r, obj, "", key, required, &v) != 0) return -1;
    if (v < -2147483647LL || v > 2147483647LL)
        return hf_fail(r, "key '%s': %lld is out of range", key, (long long)v);
    *out = (int)v;
    return 0;
}

/* An integer or null; null sets *is_null. */
int hf_get_int_or_null(const struct reader *r, json_t *obj, const char *key, int *out,
                           bool *is_null)
{
    json_t *v = json_object_get(obj, key);
    *is_null = false;
    if (!v) return 0;
    if (json_is_null(v)) {
        *is_null = true;
        return 0;
    }
    return hf_get_int(r, obj, key, false, out);
}

int hf_get_number(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                      double *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_number(v))
        return hf_fail(r, "key '%s%s': expected a number, got %s", prefix, key, hf_kind(v));
    *out = json_number_value(v);
    return 0;
}

int hf_get_bool(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                    bool *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_boolean(v))
        return hf_fail(r, "key '%s%s': expected a boolean, got %s", prefix, key, hf_kind(v));
    *out = json_is_true(v);
    return 0;
}

int hf_get_string(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                      const char **out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_string(v))
        return hf_fail(r, "key '%s%s': expected a string, got %s", prefix, key, hf_kind(v));
    *out = json_string_value(v);
    return 0;
}

/* bos/eos/pad: an integer, null, or (eos) a list of which the first is kept. */
static int get_token_id(const struct reader *r, json_t *obj, const char *key, int *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (json_is_null(v)) {
        *out = -1;
        return 0;
    }
    if (json_is_array(v)) {
        if (json_array_size(v) == 0) {
            *out = -1;
            return 0;
        }
        v = json_array_get(v, 0);
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 2147483647LL)
        return hf_fail(r, "key '%s': expected a token id (non-negative integer or null), got %s", key,
                    hf_kind(v));
    *out = (int)json_integer_value(v);
    return 0;
}

/* ---- derived fields and validation ------------------------------------------------- */

/* transformers _compute_yarn_parameters: get_mscale(scale, mscale) */
static double yarn_mscale(double scale, double mscale)
{
    if (scale <= 1.0) return 1.0;
    return 0.1 * mscale * log(scale) + 1.0;
}

/* *sum += a * b; false when that does not fit in 64 bits. */
static bool add_product(uint64_t *sum, uint64_t a, uint64_t b)
{
    if (a != 0 && b > UINT64_MAX / a) return false;
    if (*sum > UINT64_MAX - a * b) return false;
    *sum += a * b;
    return true;
}

int hfconfig_count(const struct model_config *c, uint64_t *parameters, uint64_t *tensors)
{
    uint64_t H = (uint64_t)c->hidden_size, V = (uint64_t)c->vocab_size;
    uint64_t Dh = (uint64_t)c->head_dim, q_width = (uint64_t)c->num_heads * Dh;
    uint64_t kv_width = (uint64_t)c->num_kv_heads * Dh;
    uint64_t E = (uint64_t)c->num_experts, I = (uint64_t)c->expert_intermediate_size;
    uint64_t S = (uint64_t)c->shared_expert_intermediate_size;
    uint64_t D = (uint64_t)c->intermediate_size;
    uint64_t n = 0, t = 0;
    bool ok = add_product(&n, V, H) && add_product(&n, 1, H); /* embedding, final norm */
    t += 2;
    if (!c->tie_word_embeddings) {
        ok &= add_product(&n, V, H);
        t++;
    }
    for (int l = 0; l < c->num_layers && l < HFCONFIG_MAX_LAYERS; l++) {
        if (c->attention == ATTENTION_MLA) {
            /* two norms; q (or q_a, its norm, q_b); kv_a, its norm, kv_b; o */
            uint64_t nH = (uint64_t)c->num_heads, R = (uint64_t)c->q_lora_rank;
            uint64_t C = (uint64_t)c->kv_lora_rank, dr = (uint64_t)c->qk_rope_head_dim;
            uint64_t qk = (uint64_t)c->qk_nope_head_dim + dr, dv = (uint64_t)c->v_head_dim;
            ok &= add_product(&n, 2, H);
            t += 2;
            if (R > 0) {
                ok &= add_product(&n, R, H) && add_product(&n, 1, R) && add_product(&n, nH * qk, R);
                t += 3;
            } else {
                ok &= add_product(&n, nH * qk, H);
                t++;
            }
            ok &= add_product(&n, C + dr, H) && add_product(&n, 1, C) &&
                  add_product(&n, nH * (qk - dr + dv), C) && add_product(&n, H, nH * dv);
            t += 4;
            if (c->qkv_bias) { /* q_a_proj (with q_lora_rank) and kv_a_proj_with_mqa */
                ok &= add_product(&n, 1, R + C + dr);
                t += R > 0 ? 2 : 1;
            }
        } else {
            /* two norms; q and o; k and v */
            ok &= add_product(&n, 2, H) && add_product(&n, 2 * q_width, H) &&
                  add_product(&n, 2 * kv_width, H);
            t += 6;
            if (c->qkv_bias) {
                ok &= add_product(&n, 1, q_width + 2 * kv_width);
                t += 3;
            }
        }
        if (c->o_bias) {
            ok &= add_product(&n, 1, H);
            t++;
        }
        if (c->qk_norm != QK_NORM_NONE) {
            ok &= add_product(&n, 1, c->qk_norm == QK_NORM_PER_HEAD ? 2 * Dh : q_width + kv_width);
            t += 2;
        }
        if (c->attention_sinks) { /* one logit per query head */
            ok &= add_product(&n, 1, (uint64_t)c->num_heads);
            t++;
        }
        if (!c->is_moe[l]) { /* dense MLP */
            ok &= add_product(&n, 3 * D, H);
            t += 3;
            continue;
        }
        /* router, the routed experts' three matrices each, the shared expert and its gate */
        ok &= add_product(&n, E, H) && add_product(&n, 3 * E, I * H);
        t += 1 + 3 * E;
        if (c->router == ROUTER_SIGMOID_BIAS || c->router_bias) { /* e_score_correction_bias,
                                                                    * or the router's bias */
            ok &= add_product(&n, 1, E);
            t++;
        }
        if (c->expert_bias) { /* each routed expert's gate, up and down biases */
            ok &= add_product(&n, E, 2 * I + H);
            t += 3 * E;
        }
        if (S > 0) {
            ok &= add_product(&n, 3 * S, H);
            t += 3;
        }
        if (S > 0 && c->shared_expert_gated) {
            ok &= add_product(&n, 1, H);
            t++;
        }
    }
    *parameters = n;
    *tensors = t;
    return ok ? 0 : -1;
}

const char *hfconfig_expert_width_key(const struct model_config *c)
{
    return c->family == HF_OLMOE || c->family == HF_MIXTRAL || c->family == HF_GPT_OSS
               ? "intermediate_size"
               : "moe_intermediate_size";
}

const char *hfconfig_experts_key(const struct model_config *c)
{
    switch (c->family) {
    case HF_MIXTRAL:
    case HF_GPT_OSS: return "num_local_experts";
    case HF_DEEPSEEK_V2:
    case HF_DEEPSEEK_V3:
    case HF_GLM4_MOE: return "n_routed_experts";
    default: return "num_experts";
    }
}

/* MLA's shapes and the grouped routers' groups (deepseek / glm). */
static int check_mla_and_groups(const struct model_config *c, const struct reader *r)
{
    if (c->attention == ATTENTION_MLA) {
        struct {
            const char *key;
            int value;
        } positive[] = {{"kv_lora_rank", c->kv_lora_rank},
                        {"qk_rope_head_dim", c->qk_rope_head_dim},
                        {"v_head_dim", c->v_head_dim}};
        for (size_t i = 0; i < sizeof positive / sizeof positive[0]; i++) {
            if (positive[i].value <= 0)
                return hf_fail(r, "key '%s': must be positive, got %d", positive[i].key,
                            positive[i].value);
            if (positive[i].value > HFCONFIG_MAX_HIDDEN)
                return hf_fail(r, "key '%s': %d exceeds esft's limit of %d", positive[i].key,
                            positive[i].value, HFCONFIG_MAX_HIDDEN);
        }
        if (c->q_lora_rank < 0 || c->q_lora_rank > HFCONFIG_MAX_HIDDEN)
            return hf_fail(r, "key 'q_lora_rank': must be null or in [1, %d], got %d",
                        HFCONFIG_MAX_HIDDEN, c->q_lora_rank);
        if (c->qk_nope_head_dim < 0 || c->qk_nope_head_dim > HFCONFIG_MAX_HEAD_DIM)
            return hf_fail(r, "key 'qk_nope_head_dim': must be in [0, %d], got %d",
                        HFCONFIG_MAX_HEAD_DIM, c->qk_nope_head_dim);
        if (c->qk_rope_head_dim % 2 != 0)
            return hf_fail(r, "key 'qk_rope_head_dim': %d is odd, but rotary embeddings rotate "
                        "pairs", c->qk_rope_head_dim);
    }
    if (c->router == ROUTER_SOFTMAX_TOPK && c->n_group == 1) return 0;
    const char *E = hfconfig_experts_key(c);
    if (c->n_group <= 0) return hf_fail(r, "key 'n_group': must be positive, got %d", c->n_group);
    if (c->num_experts % c->n_group != 0)
        return hf_fail(r, "key 'n_group': %d groups do not divide the %d experts (%s)", c->n_group,
                    c->num_experts, E);
    if (c->topk_group <= 0 || c->topk_group > c->n_group)
        return hf_fail(r, "key 'topk_group': %d must be in [1, n_group = %d]", c->topk_group,
                    c->n_group);
    int group = c->num_experts / c->n_group;
    if (c->top_k > c->topk_group * group)
        return hf_fail(r, "key 'num_experts_per_tok': %d exceeds the %d experts of the topk_group "
                    "(%d) groups of %d", c->top_k, c->topk_group * group, c->topk_group, group);
    if (c->router == ROUTER_SIGMOID_BIAS && group < 2)
        return hf_fail(r, "key 'n_group': groups of %d expert(s); the group score sums each "
                    "group's two best experts, so groups need at least 2 (%s %d, n_group %d)",
                    group, E, c->num_experts, c->n_group);
    return 0;
}

double hfconfig_attention_weights(const struct model_config *c)
{
    double H = c->hidden_size, nH = c->num_heads;
    if (c->attention != ATTENTION_MLA)
        return H * nH * c->head_dim * 2 + H * (double)c->num_kv_heads * c->head_dim * 2;
    double R = c->q_lora_rank, C = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    double qk = c->qk_nope_head_dim + dr, dv = c->v_head_dim;
    return (R > 0 ? H * R + R * nH * qk : H * nH * qk) + H * (C + dr) + C * nH * (qk - dr + dv) +
           nH * dv * H;
}

static int finish(struct model_config *c, const struct reader *r)
{
    const char *expert_width_key = hfconfig_expert_width_key(c);
    const char *experts_key = hfconfig_experts_key(c);
    struct {
        const char *key;
        int64_t value;
    } positive[] = {
        {"hidden_size", c->hidden_size},
        {"num_hidden_layers", c->num_layers},
        {"num_attention_heads", c->num_heads},
        {"num_key_value_heads", c->num_kv_heads},
        {"head_dim", c->head_dim},
        {"vocab_size", c->vocab_size},
        {"intermediate_size", c->intermediate_size},
        {expert_width_key, c->expert_intermediate_size},
        {experts_key, c->num_experts},
        {"num_experts_per_tok", c->top_k},
        {"decoder_sparse_step", c->decoder_sparse_step},
        {"max_position_embeddings", c->max_position_embeddings},
    };
    for (size_t i = 0; i < sizeof positive / sizeof positive[0]; i++)
        if (positive[i].value <= 0)
            return hf_fail(r, "key '%s': must be positive, got %lld", positive[i].key,
                        (long long)positive[i].value);
    if (c->num_shared_experts > 0 && c->shared_expert_intermediate_size <= 0)
        return hf_fail(r, "key 'shared_expert_intermediate_size': must be positive, got %d",
                    c->shared_expert_intermediate_size);
    if (c->num_layers > HFCONFIG_MAX_LAYERS)
        return hf_fail(r, "key 'num_hidden_layers': %d exceeds esft's limit of %d layers",
                    c->num_layers, HFCONFIG_MAX_LAYERS);
    struct {
        const char *key;
        int value, limit;
    } bounded[] = {
        {"hidden_size", c->hidden_size, HFCONFIG_MAX_HIDDEN},
        {"num_attention_heads", c->num_heads, HFCONFIG_MAX_HEADS},
        {"num_key_value_heads", c->num_kv_heads, HFCONFIG_MAX_HEADS},
        {"head_dim", c->head_dim, HFCONFIG_MAX_HEAD_DIM},
        {"vocab_size", c->vocab_size, HFCONFIG_MAX_VOCAB},
        {"intermediate_size", c->intermediate_size, HFCONFIG_MAX_INTERMEDIATE},
        {expert_width_key, c->expert_intermediate_size, HFCONFIG_MAX_INTERMEDIATE},
        {"shared_expert_intermediate_size", c->shared_expert_intermediate_size,
         HFCONFIG_MAX_INTERMEDIATE},
        {experts_key, c->num_experts, HFCONFIG_MAX_EXPERTS},
    };
    for (size_t i = 0; i < sizeof bounded / sizeof bounded[0]; i++)
        if (bounded[i].value > bounded[i].limit)
            return hf_fail(r, "key '%s': %d exceeds esft's limit of %d", bounded[i].key,
                        bounded[i].value, bounded[i].limit);
    if (check_mla_and_groups(c, r) != 0) return -1;
    c->aux = c->family == HF_DEEPSEEK_V2                                ? AUX_SEQUENCE
             : c->family == HF_DEEPSEEK_V3 || c->family == HF_GLM4_MOE ? AUX_NONE
                                                                       : AUX_GLOBAL;
    c->renormalise = c->family == HF_MIXTRAL ||
                     (c->family != HF_DEEPSEEK_V2 && c->norm_topk_prob);
    if (c->num_heads % c->num_kv_heads != 0)
        return hf_fail(r, "key 'num_attention_heads': %d is not divisible by num_key_value_heads (%d)",
                    c->num_heads, c->num_kv_heads);
    if (c->top_k > c->num_experts)
        return hf_fail(r, "key 'num_experts_per_tok': %d exceeds the number of experts (%d)", c->top_k,
                    c->num_experts);
    if (!(c->rms_norm_eps > 0))
        return hf_fail(r, "key 'rms_norm_eps': must be positive, got %g", c->rms_norm_eps);
    if (c->sliding_window < 0)
        return hf_fail(r, "key 'sliding_window': must not be negative, got %d", c->sliding_window);

    struct hf_rope *rope = &c->rope;
    if (!(rope->theta > 0))
        return hf_fail(r, "key 'rope_theta': must be positive, got %g", rope->theta);
    if (!(rope->factor > 0))
        return hf_fail(r, "key 'rope_parameters.factor': must be positive, got %g", rope->factor);
    if (!(rope->partial_rotary_factor > 0 && rope->partial_rotary_factor <= 1))
        return hf_fail(r, "key 'partial_rotary_factor': must be in (0, 1], got %g",
                    rope->partial_rotary_factor);
    rope->rotary_dim = (int)(c->head_dim * rope->partial_rotary_factor);
    if (c->head_dim % 2 != 0 || rope->rotary_dim % 2 != 0)
        return hf_fail(r, "key 'head_dim': %d (x partial_rotary_factor %g) is odd, but rotary "
                    "embeddings rotate pairs", c->head_dim, rope->partial_rotary_factor);
    rope->attention_scaling = 1.0;
    if (rope->type == ROPE_YARN) {
        if (rope->original_max_position_embeddings <= 0)
            return hf_fail(r,
                        "key 'rope_parameters.original_max_position_embeddings': must be "
                        "positive, got %lld",
                        (long long)rope->original_max_position_embeddings);
        if (rope->has_attention_factor)
            rope->attention_scaling = rope->attention_factor;
        else if (rope->mscale != 0 && rope->mscale_all_dim != 0)
            rope->attention_scaling = yarn_mscale(rope->factor, rope->mscale) /
                                      yarn_mscale(rope->factor, rope->mscale_all_dim);
        else
            rope->attention_scaling = yarn_mscale(rope->factor, 1.0);
    }

    /* which layers are MoE: reference/moe-architectures.md, "Which layers are MoE" */
    for (int l = 0; l < HFCONFIG_MAX_LAYERS; l++) {
        int moe = 0;
        if (l < c->num_layers) {
            switch (c->family) {
            case HF_QWEN2_MOE:
            case HF_QWEN3_MOE: {
                int listed = 0;
                for (int i = 0; i < c->num_mlp_only_layers; i++)
                    listed |= c->mlp_only_layers[i] == l;
                moe = !listed && c->num_experts > 0 && (l + 1) % c->decoder_sparse_step == 0;
                break;
            }
            case HF_DEEPSEEK_V2:
            case HF_DEEPSEEK_V3:
            case HF_GLM4_MOE:
                moe = l >= c->first_k_dense_replace;
                break;
            default:
                moe = 1;
                break;
            }
        }
        c->is_moe[l] = (unsigned char)moe;
        if (l >= c->num_layers || c->sliding_window == 0) c->is_sliding[l] = 0;
    }

    /* Each size is within its limit; their products must be too, before the model's
     * storage is sized from them. */
    uint64_t parameters = 0, tensors = 0;
    if (hfconfig_count(c, &parameters, &tensors) != 0 || parameters > HFCONFIG_MAX_PARAMETERS)
        return hf_fail(r,
                    "the sizes (hidden_size %d, num_hidden_layers %d, %s %d, %s %d, "
                    "intermediate_size %d, vocab_size %d) give %.4g parameters, more than "
                    "esft's limit of %.4g (2^41)",
                    c->hidden_size, c->num_layers, experts_key, c->num_experts, expert_width_key,
                    c->expert_intermediate_size, c->intermediate_size, c->vocab_size,
                    (double)parameters, (double)HFCONFIG_MAX_PARAMETERS);
    if (tensors > HFCONFIG_MAX_TENSORS)
        return hf_fail(r,
                    "num_hidden_layers %d and %s %d give %llu tensors (three per routed "
                    "expert and layer, six with gpt_oss's biases), more than esft's limit of %d",
                    c->num_layers, experts_key, c->num_experts, (unsigned long long)tensors,
                    HFCONFIG_MAX_TENSORS);
    return 0;
}

int hfconfig_finish(struct model_config *cfg, const char *source, char *err, size_t errsize)
{
    struct reader r = {source, err, errsize};
    if ((cfg->family == HF_QWEN2_MOE || cfg->family == HF_QWEN3_MOE) && !cfg->use_sliding_window)
        cfg->sliding_window = 0;
    hf_default_sliding_layers(cfg);
    return finish(cfg, &r);
}

/* ---- parsing ----------------------------------------------------------------------- */

static int parse_activation(const struct reader *r, json_t *root, struct model_config *c)
{
    const char *act = NULL;
    if (hf_get_string(r, root, "", "hidden_act", &act) != 0) return -1;
    if (!act) return 0;
    /* transformers ACT2FN: "silu" and "swish" are SiLU; "gelu" is the exact erf GELU */
    if (strcmp(act, "silu") == 0 || strcmp(act, "swish") == 0)
        c->hidden_act = ACT_SILU;
    else if (strcmp(act, "gelu") == 0)
        c->hidden_act = ACT_GELU;
    else
        return hf_fail(r, "key 'hidden_act': '%s' is not supported (supported: silu, swish, gelu)",
                    act);
    return 0;
}

static int parse_dtype(const struct reader *r, json_t *root, struct model_config *c)
{
    /* v5 writes "dtype"; v4 wrote "torch_dtype"; "dtype" wins (configuration_utils.py) */
    const char *key = "dtype";
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        key = "torch_dtype";
        v = json_object_get(root, key);
    }
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return hf_fail(r, "key '%s': expected a string, got %s", key, hf_kind(v));
    const char *s = json_string_value(v);
    if (strcmp(s, "bfloat16") == 0)
        c->dtype = HF_DTYPE_BF16;
    else if (strcmp(s, "float16") == 0)
        c->dtype = HF_DTYPE_F16;
    else if (strcmp(s, "float32") == 0)
        c->dtype = HF_DTYPE_F32;
    else
        return hf_fail(r, "key '%s': '%s' is not supported (supported: bfloat16, float16, float32)",
                    key, s);
    return 0;
}

/* "quantization_config": only transformers' FineGrainedFP8Config (quant_method "fp8"),
 * with its defaults (finegrained_fp8: weight_block_size (128, 128), activation_scheme
 * "dynamic", scale_fmt "float", expert_dtype "fp8"). The activation scheme does not
 * matter here: esft computes in fp32 on the dequantised weights, as transformers does
 * with dequantize=True. */
static int parse_quantization(const struct reader *r, json_t *root, struct model_config *c)
{
    json_t *q = json_object_get(root, "quantization_config");
    c->quantization = (struct hf_quantization){.fp8 = false};
    if (!q || json_is_null(q)) return 0;
    if (!json_is_object(q))
        return hf_fail(r, "key 'quantization_config': expected an object, got %s", hf_kind(q));
    const char *method = NULL;
    if (hf_get_string(r, q, "quantization_config.", "quant_method", &method) != 0) return -1;
    if (!method) return hf_fail(r, "key 'quantization_config': no 'quant_method'");
    if (strcmp(method, "mxfp4") == 0) {
        /* Mxfp4Config: modules_to_not_convert and dequantize change nothing here (esft
         * always dequantises the experts' blocks; everything else is stored unquantised) */
        if (c->family != HF_GPT_OSS)
            return hf_fail(r, "key 'quantization_config.quant_method': 'mxfp4' is only "
                           "supported for gpt_oss (its fused experts), not for %s",
                           hfconfig_family_name(c->family));
        c->quantization.mxfp4 = true;
        return 0;
    }
    if (strcmp(method, "fp8") != 0)
        return hf_fail(r,
                    "key 'quantization_config.quant_method': '%s' is not supported (esft "
                    "reads fp8 block-quantised checkpoints, quant_method \"fp8\", gpt_oss's "
                    "mxfp4 experts, and unquantised ones)",
                    method);
    static const struct {
        const char *key, *allowed[3];
    } strings[] = {
        {"fmt", {"e4m3"}}, /* DeepSeek's own key; transformers ignores it */
        {"activation_scheme", {"dynamic", "static"}},
        {"scale_fmt", {"float"}},
        {"expert_dtype", {"fp8"}},
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++) {
        const char *value = NULL;
        if (hf_get_string(r, q, "quantization_config.", strings[i].key, &value) != 0) return -1;
        if (!value) continue;
        bool known = false;
        for (int k = 0; k < 3 && strings[i].allowed[k]; k++)
            known |= strcasecmp(value, strings[i].allowed[k]) == 0;
        if (!known)
            return hf_fail(
                r, "key 'quantization_config.%s': '%s' is not supported (supported: %s%s%s)",
                strings[i].key, value, strings[i].allowed[0], strings[i].allowed[1] ? ", " : "",
                strings[i].allowed[1] ? strings[i].allowed[1] : "");
    }
    c->quantization.fp8 = true;
    c->quantization.block[0] = c->quantization.block[1] = 128;
    json_t *b = json_object_get(q, "weight_block_size");
    if (!b) return 0;
    if (json_is_null(b))
        return hf_fail(r, "key 'quantization_config.weight_block_size': null (one scale per "
                       "tensor) is not supported; esft reads block scales");
    if (!json_is_array(b) || json_array_size(b) != 2 || !json_is_integer(json_array_get(b, 0)) ||
        !json_is_integer(json_array_get(b, 1)))
        return hf_fail(r, "key 'quantization_config.weight_block_size': expected two integers "
                       "[rows, columns]");
    for (int k = 0; k < 2; k++) {
        json_int_t v = json_integer_value(json_array_get(b, (size_t)k));
        if (v < 1 || v > HFCONFIG_MAX_INTERMEDIATE)
            return hf_fail(r,
                        "key 'quantization_config.weight_block_size': %lld is not a block "
                        "size (1..%d)",
                        (long long)v, HFCONFIG_MAX_INTERMEDIATE);
        c->quantization.block[k] = (int)v;
    }
    return 0;
}

static int parse_rope(const struct reader *r, json_t *root, struct model_config *c)
{
    struct hf_rope *rope = &c->rope;
    /* configuration_utils.py / modeling_rope_utils.py: a non-empty legacy rope_scaling
     * replaces rope_parameters */
    const char *dict_key = "rope_scaling";
    json_t *dict = json_object_get(root, dict_key);
    if (!dict || json_is_null(dict) || (json_is_object(dict) && json_object_size(dict) == 0)) {
        dict_key = "rope_parameters";
        dict = json_object_get(root, dict_key);
    }
    if (dict && json_is_null(dict)) dict = NULL;
    if (dict && !json_is_object(dict))
        return hf_fail(r, "key '%s': expected an object, got %s", dict_key, hf_kind(dict));
    char prefix[32];
    snprintf(prefix, sizeof prefix, "%s.", dict_key);

    if (hf_get_number(r, root, "", "rope_theta", &rope->theta) != 0) return -1;
    double partial = rope->partial_rotary_factor;
    if (hf_get_number(r, root, "", "partial_rotary_factor", &partial) != 0) return -1;
    int64_t original = c->max_position_embeddings;
    if (!dict) {
        rope->partial_rotary_factor = partial;
        return 0;
    }
    if (c->family == HF_GPT_OSS) {
        /* GptOssConfig's yarn defaults apply only when rope_parameters is absent; a given
         * dict is read as any other (truncate true unless it says otherwise) */
        double theta = rope->theta;
        *rope = (struct hf_rope){.type = ROPE_DEFAULT, .layout = ROPE_ROTATE_HALF,
                                 .theta = theta, .factor = 1.0, .beta_fast = 32.0,
                                 .beta_slow = 1.0, .truncate = true,
                                 .partial_rotary_factor = 1.0, .attention_scaling = 1.0};
    }
    if (hf_get_number(r, dict, prefix, "rope_theta", &rope->theta) != 0) return -1;
    if (hf_get_number(r, dict, prefix, "partial_rotary_factor", &partial) != 0) return -1;
    rope->partial_rotary_factor = partial;

    const char *type = "default";
    if (json_object_get(dict, "rope_type")) {
        if (hf_get_string(r, dict, prefix, "rope_type", &type) != 0) return -1;
    } else if (hf_get_string(r, dict, prefix, "type", &type) != 0) {
        return -1;
    }
    if (strcmp(type, "default") == 0) {
        rope->type = ROPE_DEFAULT;
        return 0;
    }
    if (strcmp(type, "linear") == 0)
        rope->type = ROPE_LINEAR;
    else if (strcmp(type, "yarn") == 0)
        rope->type = ROPE_YARN;
    else
        return hf_fail(r,
                    "key '%srope_type': '%s' is not supported (supported: default, linear, yarn)",
                    prefix, type);

    json_t *factor = json_object_get(dict, "factor");
    if (!factor) return hf_fail(r, "missing required key '%sfactor' (rope type '%s')", prefix, type);
    if (rope->type == ROPE_YARN) {
        /* the pretraining length: a top-level key wins (phi3 style), then the dict's,
         * then max_position_embeddings (standardize_rope_params) */
        json_t *top = json_object_get(root, "original_max_position_embeddings");
        if (top) {
            if (hf_get_int64(r, root, "", "original_max_position_embeddings", false, &original) != 0)
                return -1;
        } else if (hf_get_int64(r, dict, prefix, "original_max_position_embeddings", false,
                             &original) != 0) {
            return -1;
        }
        rope->original_max_position_embeddings = original;
    }
    if (json_is_null(factor) && rope->type == ROPE_YARN && original > 0) {
        rope->factor = (double)c->max_position_embeddings / (double)original;
    } else if (hf_get_number(r, dict, prefix, "factor", &rope->factor) != 0) {
        return -1;
    }
    if (rope->type != ROPE_YARN) return 0;

    /* `beta_fast or 32`: a 0 or null means the default, as in transformers */
    json_t *v;
    if ((v = json_object_get(dict, "beta_fast")) && !json_is_null(v)) {
        if (hf_get_number(r, dict, prefix, "beta_fast", &rope->beta_fast) != 0) return -1;
        if (rope->beta_fast == 0) rope->beta_fast = 32.0;
    }
    if ((v = json_object_get(dict, "beta_slow")) && !json_is_null(v)) {
        if (hf_get_number(r, dict, prefix, "beta_slow", &rope->beta_slow) != 0) return -1;
        if (rope->beta_slow == 0) rope->beta_slow = 1.0;
    }
    if ((v = json_object_get(dict, "attention_factor")) && !json_is_null(v)) {
        if (hf_get_number(r, dict, prefix, "attention_factor", &rope->attention_factor) != 0)
            return -1;
        if (rope->attention_factor <= 0)
            return hf_fail(r, "key '%sattention_factor': must be positive, got %g", prefix,
                        rope->attention_factor);
        rope->has_attention_factor = true;
    }
    if ((v = json_object_get(dict, "mscale")) && !json_is_null(v))
        if (hf_get_number(r, dict, prefix, "mscale", &rope->mscale) != 0) return -1;
    if ((v = json_object_get(dict, "mscale_all_dim")) && !json_is_null(v))
        if (hf_get_number(r, dict, prefix, "mscale_all_dim", &rope->mscale_all_dim) != 0) return -1;
    if ((v = json_object_get(dict, "truncate")) && !json_is_null(v))
        if (hf_get_bool(r, dict, prefix, "truncate", &rope->truncate) != 0) return -1;
    return 0;
}

static int parse_common(const struct reader *r, json_t *root, struct model_config *c)
{
    if (hf_get_int(r, root, "hidden_size", true, &c->hidden_size) != 0) return -1;
    if (hf_get_int(r, root, "num_hidden_layers", true, &c->num_layers) != 0) return -1;
    if (c->num_layers > HFCONFIG_MAX_LAYERS)
        return hf_fail(r, "key 'num_hidden_layers': %d exceeds esft's limit of %d layers",
                    c->num_layers, HFCONFIG_MAX_LAYERS);
    if (hf_get_int(r, root, "num_attention_heads", true, &c->num_heads) != 0) return -1;
    if (hf_get_int(r, root, "vocab_size", true, &c->vocab_size) != 0) return -1;
    if (hf_get_int(r, root, "intermediate_size", true, &c->intermediate_size) != 0) return -1;
    if (hf_get_int(r, root, "num_experts_per_tok", true, &c->top_k) != 0) return -1;

    /* num_key_value_heads: absent -> class default; null -> num_attention_heads in
     * olmoe/mixtral (__post_init__), an error for qwen (their modeling would fail) */
    bool is_null;
    if (hf_get_int_or_null(r, root, "num_key_value_heads", &c->num_kv_heads, &is_null) != 0) return -1;
    if (is_null) {
        if (c->family == HF_QWEN2_MOE || c->family == HF_QWEN3_MOE)
            return hf_fail(r, "key 'num_key_value_heads': expected an integer, got null");
        c->num_kv_heads = c->num_heads;
    } else if (!json_object_get(root, "num_key_value_heads") && c->family == HF_OLMOE) {
        c->num_kv_heads = c->num_heads;
    }
    /* head_dim: explicit, else hidden_size / num_attention_heads (getattr in modeling);
     * gpt_oss's class default is 64, and only a null gives hidden / heads (__post_init__) */
    c->head_dim = c->family == HF_GPT_OSS ? 64 : 0;
    if (hf_get_int_or_null(r, root, "head_dim", &c->head_dim, &is_null) != 0) return -1;
    if (is_null) c->head_dim = 0;
    if (c->head_dim == 0 && c->num_heads > 0) c->head_dim = c->hidden_size / c->num_heads;

    if (hf_get_int64(r, root, "", "max_position_embeddings", false, &c->max_position_embeddings) != 0)
        return -1;
    if (hf_get_number(r, root, "", "rms_norm_eps", &c->rms_norm_eps) != 0) return -1;
    if (hf_get_bool(r, root, "", "tie_word_embeddings", &c->tie_word_embeddings) != 0) return -1;
    if (hf_get_number(r, root, "", "initializer_range", &c->initializer_range) != 0) return -1;
    if (hf_get_number(r, root, "", "router_aux_loss_coef", &c->router_aux_loss_coef) != 0) return -1;
    if (hf_get_bool(r, root, "", "output_router_logits", &c->output_router_logits) != 0) return -1;
    if (get_token_id(r, root, "bos_token_id", &c->bos_token_id) != 0) return -1;
    if (get_token_id(r, root, "eos_token_id", &c->eos_token_id) != 0) return -1;
    if (get_token_id(r, root, "pad_token_id", &c->pad_token_id) != 0) return -1;
    if (parse_activation(r, root, c) != 0) return -1;
    if (parse_dtype(r, root, c) != 0) return -1;

    json_t *arch = json_object_get(root, "architectures");
    if (arch && json_is_array(arch) && json_array_size(arch) > 0 &&
        json_is_string(json_array_get(arch, 0)))
        snprintf(c->architecture, sizeof c->architecture, "%s",
                 json_string_value(json_array_get(arch, 0)));
    return 0;
}

int hfconfig_parse(const char *text, size_t len, const char *source, struct model_config *cfg,
                   char *err, size_t errsize)
{
    struct reader r = {source, err, errsize};
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return hf_fail(&r, "not valid JSON: %s (line %d, column %d)", jerr.text, jerr.line,
                    jerr.column);
    int rc = -1;
    if (!json_is_object(root)) {
        hf_fail(&r, "expected a JSON object, got %s", hf_kind(root));
        goto done;
    }
    json_t *mt = json_object_get(root, "model_type");
    if (!mt) {
        hf_fail(&r, "missing required key 'model_type'");
        goto done;
    }
    if (!json_is_string(mt)) {
        hf_fail(&r, "key 'model_type': expected a string, got %s", hf_kind(mt));
        goto done;
    }
    enum hf_family family;
    if (hfconfig_family_parse(json_string_value(mt), &family) != 0) {
        hf_fail(&r, "key 'model_type': unknown model_type '%s' (supported: " SUPPORTED_FAMILIES ")",
             json_string_value(mt));
        goto done;
    }
    if (!family_table[family].supported) {
        hf_fail(&r, "family '%s' is not supported yet (supported: " SUPPORTED_FAMILIES ")",
             json_string_value(mt));
        goto done;
    }
    hfconfig_defaults(family, cfg);
    if (parse_common(&r, root, cfg) != 0 || hf_parse_family(&r, root, cfg) != 0 ||
        parse_rope(&r, root, cfg) != 0 || parse_quantization(&r, root, cfg) != 0)
        goto done;
    if (cfg->rope.partial_rotary_factor != 1.0 && cfg->family != HF_GLM4_MOE) {
        /* the default rope of these families ignores it (modeling_*: dim = head_dim) */
        hf_fail(&r, "key 'partial_rotary_factor': %g is not supported for %s",
             cfg->rope.partial_rotary_factor, json_string_value(mt));
        goto done;
    }
    rc = finish(cfg, &r);
done:
    json_decref(root);
    return rc;
}

int hfconfig_load(const char *dir, struct model_config *cfg, char *err, size_t errsize)
{
    size_t n = strlen(dir) + sizeof "/config.json";
    char *path = xmalloc(n);
    snprintf(path, n, "%s/config.json", dir);
    struct reader r = {path, err, errsize};
    FILE *f = fopen(path, "rb");
    if (!f) {
        hf_fail(&r, "cannot open: %s", strerror(errno));
        free(path);
        return -1;
    }
    size_t cap = 1 << 16, len = 0;
    char *text = xmalloc(cap);
    for (;;) {
        size_t k = fread(text + len, 1, cap - len, f);
        len += k;
        if (len < cap) break;
        if (cap >= (size_t)64 << 20) { /* config files are kilobytes */
            fclose(f);
            free(text);
            hf_fail(&r, "larger than 64 MiB, not a config file");
            free(path);
            return -1;
        }
        cap *= 2;
        char *grown = realloc(text, cap);
        if (!grown) fatal(EXIT_RUNTIME, "out of memory reading %s", path);
        text = grown;
    }
    int read_error = ferror(f);
    fclose(f);
    int rc = -1;
    if (read_error)
        hf_fail(&r, "read error");
    else
        rc = hfconfig_parse(text, len, path, cfg, err, errsize);
    if (rc == 0) cfg->hash = hfconfig_fnv1a64(text, len);
    free(text);
    free(path);
    return rc;
}
