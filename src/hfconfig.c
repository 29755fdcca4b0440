/* hfconfig: see hfconfig.h. Parses config.json the way transformers 5.23 does (class
 * defaults for absent keys, v4 and v5 spellings of rope and dtype keys, attribute_map
 * aliases) and validates it; writes it back in the form save_pretrained produces.
 *
 * Defaults below are the dataclass field defaults of transformers 5.23.0:
 *   models/qwen2_moe/configuration_qwen2_moe.py: vocab 151936, hidden 2048, intermediate
 *     5632, layers 24, heads 16, kv heads 16, hidden_act silu, max_position 32768,
 *     initializer_range 0.02, rms_norm_eps 1e-6, tie false, use_sliding_window false,
 *     sliding_window 4096, max_window_layers 28, decoder_sparse_step 1,
 *     moe_intermediate 1408, shared_expert_intermediate 5632, num_experts_per_tok 4,
 *     num_experts 60, norm_topk_prob false, router_aux_loss_coef 0.001, mlp_only_layers
 *     [] (None), qkv_bias true, bos/eos/pad None.
 *   models/qwen3_moe/configuration_qwen3_moe.py: vocab 151936, hidden 2048, intermediate
 *     6144, layers 24, heads 32, kv heads 4, silu, max_position 32768, 0.02, 1e-6, tie
 *     false, attention_bias false, use_sliding_window false, sliding_window 4096,
 *     decoder_sparse_step 1, moe_intermediate 768, top-k 8, experts 128, norm_topk_prob
 *     false, aux 0.001, mlp_only_layers []. attribute_map num_experts -> num_local_experts.
 *   models/olmoe/configuration_olmoe.py: vocab 50304, hidden 2048, intermediate 2048,
 *     layers 16, heads 16, kv heads None (= heads), silu, max_position 4096, 0.02, 1e-5,
 *     pad 1, bos None, eos 50279, tie false, attention_bias false, clip_qkv None, top-k 8,
 *     experts 64, aux 0.01, norm_topk_prob false. attribute_map num_local_experts ->
 *     num_experts.
 *   models/mixtral/configuration_mixtral.py: vocab 32000, hidden 4096, intermediate
 *     14336, layers 32, heads 32, kv heads 8, head_dim None (= hidden/heads), silu,
 *     max_position 131072, 0.02, 1e-5, bos 1, eos 2, pad None, tie false, sliding_window
 *     None, top-k 2, num_local_experts 8, aux 0.001, router_jitter_noise 0,
 *     default_theta 1e6. attribute_map num_experts -> num_local_experts.
 *   models/deepseek_v2/configuration_deepseek_v2.py (5.24): vocab 102400, hidden 4096,
 *     intermediate 11008, layers 32, heads 32, kv heads None (= heads), silu, max_position
 *     2048, rms_norm_eps 1e-6, bos 1, eos 2, tie false, attention_bias false,
 *     first_k_dense_replace 0, kv_lora_rank 512, q_lora_rank 1536, n_group None,
 *     n_routed_experts 64, n_shared_experts 2, qk_nope_head_dim 128, qk_rope_head_dim 64,
 *     routed_scaling_factor 1.0, topk_group None, topk_method "greedy", norm_topk_prob
 *     false, v_head_dim 128, moe_intermediate 1407; head_dim = qk_rope_head_dim (the
 *     rotary width). attribute_map num_experts -> n_routed_experts.
 *   models/deepseek_v3/configuration_deepseek_v3.py: vocab 129280, hidden 7168,
 *     intermediate 18432, moe_intermediate 2048, layers 61, heads 128, kv heads 128,
 *     n_shared_experts 1, n_routed_experts 256, routed_scaling_factor 2.5, kv_lora_rank
 *     512, q_lora_rank 1536, qk_rope 64, v_head 128, qk_nope 128, n_group 8, topk_group 4,
 *     top-k 8, first_k_dense_replace 3, norm_topk_prob true, max_position 4096, 1e-6, bos
 *     0, eos 1, rope_interleave true, num_nextn_predict_layers 1. attribute_map
 *     num_local_experts -> n_routed_experts.
 *   models/glm4_moe/configuration_glm4_moe.py: vocab 151552, hidden 4096, intermediate
 *     10944, layers 46, heads 96, kv heads 8, silu, max_position 131072, 1e-5,
 *     attention_bias false, moe_intermediate 1408, top-k 8, n_shared_experts 1,
 *     n_routed_experts 128, routed_scaling_factor 1.0, n_group 1, topk_group 1,
 *     first_k_dense_replace 1, norm_topk_prob true, use_qk_norm false,
 *     partial_rotary_factor 0.5 when absent, num_nextn_predict_layers 1.
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
    [HF_GPT_OSS] = {"gpt_oss", "GptOssForCausalLM", false},
};

#define SUPPORTED_FAMILIES \
    "qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v2, deepseek_v3, glm4_moe"

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

struct reader {
    const char *source; /* file name used in messages */
    char *err;
    size_t errsize;
};

static int fail(const struct reader *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(const struct reader *r, const char *fmt, ...)
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

static const char *kind(const json_t *v)
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
static int get_int64(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                     bool required, int64_t *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return required ? fail(r, "missing required key '%s%s'", prefix, key) : 0;
    if (!json_is_integer(v))
        return fail(r, "key '%s%s': expected an integer, got %s", prefix, key, kind(v));
    *out = (int64_t)json_integer_value(v);
    return 0;
}

static int get_int(const struct reader *r, json_t *obj, const char *key, bool required, int *out)
{
    int64_t v = *out;
    if (get_int64(r, obj, "", key, required, &v) != 0) return -1;
    if (v < -2147483647LL || v > 2147483647LL)
        return fail(r, "key '%s': %lld is out of range", key, (long long)v);
    *out = (int)v;
    return 0;
}

/* An integer or null; null sets *is_null. */
static int get_int_or_null(const struct reader *r, json_t *obj, const char *key, int *out,
                           bool *is_null)
{
    json_t *v = json_object_get(obj, key);
    *is_null = false;
    if (!v) return 0;
    if (json_is_null(v)) {
        *is_null = true;
        return 0;
    }
    return get_int(r, obj, key, false, out);
}

static int get_number(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                      double *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_number(v))
        return fail(r, "key '%s%s': expected a number, got %s", prefix, key, kind(v));
    *out = json_number_value(v);
    return 0;
}

static int get_bool(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                    bool *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_boolean(v))
        return fail(r, "key '%s%s': expected a boolean, got %s", prefix, key, kind(v));
    *out = json_is_true(v);
    return 0;
}

static int get_string(const struct reader *r, json_t *obj, const char *prefix, const char *key,
                      const char **out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_string(v))
        return fail(r, "key '%s%s': expected a string, got %s", prefix, key, kind(v));
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
        return fail(r, "key '%s': expected a token id (non-negative integer or null), got %s", key,
                    kind(v));
    *out = (int)json_integer_value(v);
    return 0;
}

/* ---- defaults ---------------------------------------------------------------------- */

void hfconfig_defaults(enum hf_family family, struct model_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->family = family;
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", hfconfig_family_name(family));
    snprintf(cfg->architecture, sizeof cfg->architecture, "%s",
             (unsigned)family < HF_FAMILY_COUNT ? family_table[family].architecture : "");
    cfg->hidden_act = ACT_SILU;
    cfg->initializer_range = 0.02;
    cfg->bos_token_id = cfg->eos_token_id = cfg->pad_token_id = -1;
    cfg->attention = ATTENTION_GQA;
    cfg->router = ROUTER_SOFTMAX_TOPK;
    cfg->routed_scaling_factor = 1.0;
    cfg->decoder_sparse_step = 1;
    cfg->router_aux_loss_coef = 0.001;
    cfg->rope.type = ROPE_DEFAULT;
    cfg->rope.layout = ROPE_ROTATE_HALF;
    cfg->rope.theta = 10000.0;
    cfg->rope.factor = 1.0;
    cfg->rope.beta_fast = 32.0;
    cfg->rope.beta_slow = 1.0;
    cfg->rope.truncate = true;
    cfg->rope.partial_rotary_factor = 1.0;
    cfg->rope.attention_scaling = 1.0;
    switch (family) {
    case HF_QWEN2_MOE:
        cfg->vocab_size = 151936;
        cfg->hidden_size = 2048;
        cfg->intermediate_size = 5632;
        cfg->num_layers = 24;
        cfg->num_heads = 16;
        cfg->num_kv_heads = 16;
        cfg->max_position_embeddings = 32768;
        cfg->rms_norm_eps = 1e-6;
        cfg->max_window_layers = 28;
        cfg->expert_intermediate_size = 1408;
        cfg->shared_expert_intermediate_size = 5632;
        cfg->num_shared_experts = 1;
        cfg->shared_expert_gated = true;
        cfg->top_k = 4;
        cfg->num_experts = 60;
        cfg->qkv_bias = true;
        break;
    case HF_QWEN3_MOE:
        cfg->vocab_size = 151936;
        cfg->hidden_size = 2048;
        cfg->intermediate_size = 6144;
        cfg->num_layers = 24;
        cfg->num_heads = 32;
        cfg->num_kv_heads = 4;
        cfg->max_position_embeddings = 32768;
        cfg->rms_norm_eps = 1e-6;
        cfg->expert_intermediate_size = 768;
        cfg->top_k = 8;
        cfg->num_experts = 128;
        cfg->qk_norm = QK_NORM_PER_HEAD;
        break;
    case HF_OLMOE:
        cfg->vocab_size = 50304;
        cfg->hidden_size = 2048;
        cfg->intermediate_size = 2048;
        cfg->expert_intermediate_size = 2048;
        cfg->num_layers = 16;
        cfg->num_heads = 16;
        cfg->num_kv_heads = 16;
        cfg->max_position_embeddings = 4096;
        cfg->rms_norm_eps = 1e-5;
        cfg->pad_token_id = 1;
        cfg->eos_token_id = 50279;
        cfg->top_k = 8;
        cfg->num_experts = 64;
        cfg->router_aux_loss_coef = 0.01;
        cfg->qk_norm = QK_NORM_WHOLE_PROJECTION;
        break;
    case HF_MIXTRAL:
        cfg->vocab_size = 32000;
        cfg->hidden_size = 4096;
        cfg->intermediate_size = 14336;
        cfg->expert_intermediate_size = 14336;
        cfg->num_layers = 32;
        cfg->num_heads = 32;
        cfg->num_kv_heads = 8;
        cfg->max_position_embeddings = 4096 * 32;
        cfg->rms_norm_eps = 1e-5;
        cfg->bos_token_id = 1;
        cfg->eos_token_id = 2;
        cfg->top_k = 2;
        cfg->num_experts = 8;
        cfg->norm_topk_prob = true; /* MixtralTopKRouter always renormalises */
        cfg->rope.theta = 1e6;      /* MixtralConfig.default_theta */
        break;
    case HF_DEEPSEEK_V2:
    case HF_DEEPSEEK_V3:
        cfg->attention = ATTENTION_MLA;
        cfg->rope.layout = ROPE_INTERLEAVED;
        cfg->kv_lora_rank = 512;
        cfg->q_lora_rank = 1536;
        cfg->qk_nope_head_dim = 128;
        cfg->qk_rope_head_dim = 64;
        cfg->v_head_dim = 128;
        cfg->rms_norm_eps = 1e-6;
        if (family == HF_DEEPSEEK_V2) {
            cfg->vocab_size = 102400;
            cfg->hidden_size = 4096;
            cfg->intermediate_size = 11008;
            cfg->num_layers = 32;
            cfg->num_heads = cfg->num_kv_heads = 32;
            cfg->max_position_embeddings = 2048;
            cfg->bos_token_id = 1;
            cfg->eos_token_id = 2;
            cfg->num_experts = 64;
            cfg->num_shared_experts = 2;
            cfg->expert_intermediate_size = 1407;
            cfg->top_k = 6;
        } else {
            cfg->vocab_size = 129280;
            cfg->hidden_size = 7168;
            cfg->intermediate_size = 18432;
            cfg->num_layers = 61;
            cfg->num_heads = cfg->num_kv_heads = 128;
            cfg->max_position_embeddings = 4096;
            cfg->bos_token_id = 0;
            cfg->eos_token_id = 1;
            cfg->num_experts = 256;
            cfg->num_shared_experts = 1;
            cfg->expert_intermediate_size = 2048;
            cfg->top_k = 8;
            cfg->router = ROUTER_SIGMOID_BIAS;
            cfg->routed_scaling_factor = 2.5;
            cfg->n_group = 8;
            cfg->topk_group = 4;
            cfg->first_k_dense_replace = 3;
            cfg->norm_topk_prob = true;
            cfg->num_mtp_layers = 1;
        }
        break;
    case HF_GLM4_MOE:
        cfg->vocab_size = 151552;
        cfg->hidden_size = 4096;
        cfg->intermediate_size = 10944;
        cfg->num_layers = 46;
        cfg->num_heads = 96;
        cfg->num_kv_heads = 8;
        cfg->max_position_embeddings = 131072;
        cfg->rms_norm_eps = 1e-5;
        cfg->expert_intermediate_size = 1408;
        cfg->top_k = 8;
        cfg->num_shared_experts = 1;
        cfg->num_experts = 128;
        cfg->router = ROUTER_SIGMOID_BIAS;
        cfg->first_k_dense_replace = 1;
        cfg->norm_topk_prob = true;
        cfg->num_mtp_layers = 1;
        cfg->rope.partial_rotary_factor = 0.5; /* Glm4MoeConfig.__post_init__ */
        break;
    default:
        break;
    }
    if (cfg->n_group == 0) cfg->n_group = cfg->topk_group = 1;
    cfg->shared_expert_intermediate_size = cfg->family == HF_QWEN2_MOE
                                               ? cfg->shared_expert_intermediate_size
                                               : cfg->num_shared_experts * cfg->expert_intermediate_size;
    cfg->head_dim = cfg->num_heads ? cfg->hidden_size / cfg->num_heads : 0;
    if (cfg->attention == ATTENTION_MLA) cfg->head_dim = cfg->qk_rope_head_dim;
    /* 4096 / 96 heads does not divide: the released GLM-4.5 configs give head_dim 128 */
    if (family == HF_GLM4_MOE) cfg->head_dim = 128;
    cfg->rope.rotary_dim = (int)(cfg->head_dim * cfg->rope.partial_rotary_factor);
    for (int l = 0; l < cfg->num_layers && l < HFCONFIG_MAX_LAYERS; l++) cfg->is_moe[l] = 1;
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
        if (!c->is_moe[l]) { /* dense MLP */
            ok &= add_product(&n, 3 * D, H);
            t += 3;
            continue;
        }
        /* router, the routed experts' three matrices each, the shared expert and its gate */
        ok &= add_product(&n, E, H) && add_product(&n, 3 * E, I * H);
        t += 1 + 3 * E;
        if (c->router == ROUTER_SIGMOID_BIAS) { /* e_score_correction_bias */
            ok &= add_product(&n, 1, E);
            t++;
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
    return c->family == HF_OLMOE || c->family == HF_MIXTRAL ? "intermediate_size"
                                                            : "moe_intermediate_size";
}

const char *hfconfig_experts_key(const struct model_config *c)
{
    switch (c->family) {
    case HF_MIXTRAL: return "num_local_experts";
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
                return fail(r, "key '%s': must be positive, got %d", positive[i].key,
                            positive[i].value);
            if (positive[i].value > HFCONFIG_MAX_HIDDEN)
                return fail(r, "key '%s': %d exceeds esft's limit of %d", positive[i].key,
                            positive[i].value, HFCONFIG_MAX_HIDDEN);
        }
        if (c->q_lora_rank < 0 || c->q_lora_rank > HFCONFIG_MAX_HIDDEN)
            return fail(r, "key 'q_lora_rank': must be null or in [1, %d], got %d",
                        HFCONFIG_MAX_HIDDEN, c->q_lora_rank);
        if (c->qk_nope_head_dim < 0 || c->qk_nope_head_dim > HFCONFIG_MAX_HEAD_DIM)
            return fail(r, "key 'qk_nope_head_dim': must be in [0, %d], got %d",
                        HFCONFIG_MAX_HEAD_DIM, c->qk_nope_head_dim);
        if (c->qk_rope_head_dim % 2 != 0)
            return fail(r, "key 'qk_rope_head_dim': %d is odd, but rotary embeddings rotate "
                        "pairs", c->qk_rope_head_dim);
    }
    if (c->router == ROUTER_SOFTMAX_TOPK && c->n_group == 1) return 0;
    const char *E = hfconfig_experts_key(c);
    if (c->n_group <= 0) return fail(r, "key 'n_group': must be positive, got %d", c->n_group);
    if (c->num_experts % c->n_group != 0)
        return fail(r, "key 'n_group': %d groups do not divide the %d experts (%s)", c->n_group,
                    c->num_experts, E);
    if (c->topk_group <= 0 || c->topk_group > c->n_group)
        return fail(r, "key 'topk_group': %d must be in [1, n_group = %d]", c->topk_group,
                    c->n_group);
    int group = c->num_experts / c->n_group;
    if (c->top_k > c->topk_group * group)
        return fail(r, "key 'num_experts_per_tok': %d exceeds the %d experts of the topk_group "
                    "(%d) groups of %d", c->top_k, c->topk_group * group, c->topk_group, group);
    if (c->router == ROUTER_SIGMOID_BIAS && group < 2)
        return fail(r, "key 'n_group': groups of %d expert(s); the group score sums each "
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
            return fail(r, "key '%s': must be positive, got %lld", positive[i].key,
                        (long long)positive[i].value);
    if (c->num_shared_experts > 0 && c->shared_expert_intermediate_size <= 0)
        return fail(r, "key 'shared_expert_intermediate_size': must be positive, got %d",
                    c->shared_expert_intermediate_size);
    if (c->num_layers > HFCONFIG_MAX_LAYERS)
        return fail(r, "key 'num_hidden_layers': %d exceeds esft's limit of %d layers",
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
            return fail(r, "key '%s': %d exceeds esft's limit of %d", bounded[i].key,
                        bounded[i].value, bounded[i].limit);
    if (check_mla_and_groups(c, r) != 0) return -1;
    c->aux = c->family == HF_DEEPSEEK_V2                                ? AUX_SEQUENCE
             : c->family == HF_DEEPSEEK_V3 || c->family == HF_GLM4_MOE ? AUX_NONE
                                                                       : AUX_GLOBAL;
    c->renormalise = c->family == HF_MIXTRAL ||
                     (c->family != HF_DEEPSEEK_V2 && c->norm_topk_prob);
    if (c->num_heads % c->num_kv_heads != 0)
        return fail(r, "key 'num_attention_heads': %d is not divisible by num_key_value_heads (%d)",
                    c->num_heads, c->num_kv_heads);
    if (c->top_k > c->num_experts)
        return fail(r, "key 'num_experts_per_tok': %d exceeds the number of experts (%d)", c->top_k,
                    c->num_experts);
    if (!(c->rms_norm_eps > 0))
        return fail(r, "key 'rms_norm_eps': must be positive, got %g", c->rms_norm_eps);
    if (c->sliding_window < 0)
        return fail(r, "key 'sliding_window': must not be negative, got %d", c->sliding_window);

    struct hf_rope *rope = &c->rope;
    if (!(rope->theta > 0))
        return fail(r, "key 'rope_theta': must be positive, got %g", rope->theta);
    if (!(rope->factor > 0))
        return fail(r, "key 'rope_parameters.factor': must be positive, got %g", rope->factor);
    if (!(rope->partial_rotary_factor > 0 && rope->partial_rotary_factor <= 1))
        return fail(r, "key 'partial_rotary_factor': must be in (0, 1], got %g",
                    rope->partial_rotary_factor);
    rope->rotary_dim = (int)(c->head_dim * rope->partial_rotary_factor);
    if (c->head_dim % 2 != 0 || rope->rotary_dim % 2 != 0)
        return fail(r, "key 'head_dim': %d (x partial_rotary_factor %g) is odd, but rotary "
                    "embeddings rotate pairs", c->head_dim, rope->partial_rotary_factor);
    rope->attention_scaling = 1.0;
    if (rope->type == ROPE_YARN) {
        if (rope->original_max_position_embeddings <= 0)
            return fail(r,
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
        return fail(r,
                    "the sizes (hidden_size %d, num_hidden_layers %d, %s %d, %s %d, "
                    "intermediate_size %d, vocab_size %d) give %.4g parameters, more than "
                    "esft's limit of %.4g (2^41)",
                    c->hidden_size, c->num_layers, experts_key, c->num_experts, expert_width_key,
                    c->expert_intermediate_size, c->intermediate_size, c->vocab_size,
                    (double)parameters, (double)HFCONFIG_MAX_PARAMETERS);
    if (tensors > HFCONFIG_MAX_TENSORS)
        return fail(r,
                    "num_hidden_layers %d and %s %d give %llu tensors (three per routed "
                    "expert and layer), more than esft's limit of %d",
                    c->num_layers, experts_key, c->num_experts, (unsigned long long)tensors,
                    HFCONFIG_MAX_TENSORS);
    return 0;
}

/* The family's default layer_types: qwen2_moe slides odd-numbered (1-based) layers below
 * max_window_layers (Qwen2MoeConfig.__post_init__); the others slide every layer when a
 * window is set. */
static void default_sliding_layers(struct model_config *c)
{
    for (int l = 0; l < c->num_layers && l < HFCONFIG_MAX_LAYERS; l++) {
        if (c->family == HF_QWEN2_MOE)
            c->is_sliding[l] = ((l + 1) % 2) && l < c->max_window_layers && c->use_sliding_window;
        else
            c->is_sliding[l] = 1;
    }
}

int hfconfig_finish(struct model_config *cfg, const char *source, char *err, size_t errsize)
{
    struct reader r = {source, err, errsize};
    if ((cfg->family == HF_QWEN2_MOE || cfg->family == HF_QWEN3_MOE) && !cfg->use_sliding_window)
        cfg->sliding_window = 0;
    default_sliding_layers(cfg);
    return finish(cfg, &r);
}

/* ---- parsing ----------------------------------------------------------------------- */

static int parse_activation(const struct reader *r, json_t *root, struct model_config *c)
{
    const char *act = NULL;
    if (get_string(r, root, "", "hidden_act", &act) != 0) return -1;
    if (!act) return 0;
    /* transformers ACT2FN: "silu" and "swish" are SiLU; "gelu" is the exact erf GELU */
    if (strcmp(act, "silu") == 0 || strcmp(act, "swish") == 0)
        c->hidden_act = ACT_SILU;
    else if (strcmp(act, "gelu") == 0)
        c->hidden_act = ACT_GELU;
    else
        return fail(r, "key 'hidden_act': '%s' is not supported (supported: silu, swish, gelu)",
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
    if (!json_is_string(v)) return fail(r, "key '%s': expected a string, got %s", key, kind(v));
    const char *s = json_string_value(v);
    if (strcmp(s, "bfloat16") == 0)
        c->dtype = HF_DTYPE_BF16;
    else if (strcmp(s, "float16") == 0)
        c->dtype = HF_DTYPE_F16;
    else if (strcmp(s, "float32") == 0)
        c->dtype = HF_DTYPE_F32;
    else
        return fail(r, "key '%s': '%s' is not supported (supported: bfloat16, float16, float32)",
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
        return fail(r, "key 'quantization_config': expected an object, got %s", kind(q));
    const char *method = NULL;
    if (get_string(r, q, "quantization_config.", "quant_method", &method) != 0) return -1;
    if (!method) return fail(r, "key 'quantization_config': no 'quant_method'");
    if (strcmp(method, "fp8") != 0)
        return fail(r,
                    "key 'quantization_config.quant_method': '%s' is not supported (esft "
                    "reads fp8 block-quantised checkpoints, quant_method \"fp8\", and "
                    "unquantised ones)",
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
        if (get_string(r, q, "quantization_config.", strings[i].key, &value) != 0) return -1;
        if (!value) continue;
        bool known = false;
        for (int k = 0; k < 3 && strings[i].allowed[k]; k++)
            known |= strcasecmp(value, strings[i].allowed[k]) == 0;
        if (!known)
            return fail(
                r, "key 'quantization_config.%s': '%s' is not supported (supported: %s%s%s)",
                strings[i].key, value, strings[i].allowed[0], strings[i].allowed[1] ? ", " : "",
                strings[i].allowed[1] ? strings[i].allowed[1] : "");
    }
    c->quantization.fp8 = true;
    c->quantization.block[0] = c->quantization.block[1] = 128;
    json_t *b = json_object_get(q, "weight_block_size");
    if (!b) return 0;
    if (json_is_null(b))
        return fail(r, "key 'quantization_config.weight_block_size': null (one scale per "
                       "tensor) is not supported; esft reads block scales");
    if (!json_is_array(b) || json_array_size(b) != 2 || !json_is_integer(json_array_get(b, 0)) ||
        !json_is_integer(json_array_get(b, 1)))
        return fail(r, "key 'quantization_config.weight_block_size': expected two integers "
                       "[rows, columns]");
    for (int k = 0; k < 2; k++) {
        json_int_t v = json_integer_value(json_array_get(b, (size_t)k));
        if (v < 1 || v > HFCONFIG_MAX_INTERMEDIATE)
            return fail(r,
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
        return fail(r, "key '%s': expected an object, got %s", dict_key, kind(dict));
    char prefix[32];
    snprintf(prefix, sizeof prefix, "%s.", dict_key);

    if (get_number(r, root, "", "rope_theta", &rope->theta) != 0) return -1;
    double partial = rope->partial_rotary_factor;
    if (get_number(r, root, "", "partial_rotary_factor", &partial) != 0) return -1;
    int64_t original = c->max_position_embeddings;
    if (!dict) {
        rope->partial_rotary_factor = partial;
        return 0;
    }
    if (get_number(r, dict, prefix, "rope_theta", &rope->theta) != 0) return -1;
    if (get_number(r, dict, prefix, "partial_rotary_factor", &partial) != 0) return -1;
    rope->partial_rotary_factor = partial;

    const char *type = "default";
    if (json_object_get(dict, "rope_type")) {
        if (get_string(r, dict, prefix, "rope_type", &type) != 0) return -1;
    } else if (get_string(r, dict, prefix, "type", &type) != 0) {
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
        return fail(r,
                    "key '%srope_type': '%s' is not supported (supported: default, linear, yarn)",
                    prefix, type);

    json_t *factor = json_object_get(dict, "factor");
    if (!factor) return fail(r, "missing required key '%sfactor' (rope type '%s')", prefix, type);
    if (rope->type == ROPE_YARN) {
        /* the pretraining length: a top-level key wins (phi3 style), then the dict's,
         * then max_position_embeddings (standardize_rope_params) */
        json_t *top = json_object_get(root, "original_max_position_embeddings");
        if (top) {
            if (get_int64(r, root, "", "original_max_position_embeddings", false, &original) != 0)
                return -1;
        } else if (get_int64(r, dict, prefix, "original_max_position_embeddings", false,
                             &original) != 0) {
            return -1;
        }
        rope->original_max_position_embeddings = original;
    }
    if (json_is_null(factor) && rope->type == ROPE_YARN && original > 0) {
        rope->factor = (double)c->max_position_embeddings / (double)original;
    } else if (get_number(r, dict, prefix, "factor", &rope->factor) != 0) {
        return -1;
    }
    if (rope->type != ROPE_YARN) return 0;

    /* `beta_fast or 32`: a 0 or null means the default, as in transformers */
    json_t *v;
    if ((v = json_object_get(dict, "beta_fast")) && !json_is_null(v)) {
        if (get_number(r, dict, prefix, "beta_fast", &rope->beta_fast) != 0) return -1;
        if (rope->beta_fast == 0) rope->beta_fast = 32.0;
    }
    if ((v = json_object_get(dict, "beta_slow")) && !json_is_null(v)) {
        if (get_number(r, dict, prefix, "beta_slow", &rope->beta_slow) != 0) return -1;
        if (rope->beta_slow == 0) rope->beta_slow = 1.0;
    }
    if ((v = json_object_get(dict, "attention_factor")) && !json_is_null(v)) {
        if (get_number(r, dict, prefix, "attention_factor", &rope->attention_factor) != 0)
            return -1;
        if (rope->attention_factor <= 0)
            return fail(r, "key '%sattention_factor': must be positive, got %g", prefix,
                        rope->attention_factor);
        rope->has_attention_factor = true;
    }
    if ((v = json_object_get(dict, "mscale")) && !json_is_null(v))
        if (get_number(r, dict, prefix, "mscale", &rope->mscale) != 0) return -1;
    if ((v = json_object_get(dict, "mscale_all_dim")) && !json_is_null(v))
        if (get_number(r, dict, prefix, "mscale_all_dim", &rope->mscale_all_dim) != 0) return -1;
    if ((v = json_object_get(dict, "truncate")) && !json_is_null(v))
        if (get_bool(r, dict, prefix, "truncate", &rope->truncate) != 0) return -1;
    return 0;
}

/* The expert count under its own key and its attribute_map alias; both must agree. */
static int parse_num_experts(const struct reader *r, json_t *root, struct model_config *c,
                             const char *key, const char *alias)
{
    json_t *a = json_object_get(root, key);
    json_t *b = alias ? json_object_get(root, alias) : NULL;
    if (!a && !b) return fail(r, "missing required key '%s'", key);
    int n = c->num_experts, m = c->num_experts;
    if (a && get_int(r, root, key, true, &n) != 0) return -1;
    if (b && get_int(r, root, alias, true, &m) != 0) return -1;
    if (a && b && n != m)
        return fail(r, "key '%s' (%d) and key '%s' (%d) disagree", key, n, alias, m);
    c->num_experts = a ? n : m;
    return 0;
}

static int parse_mlp_only_layers(const struct reader *r, json_t *root, struct model_config *c)
{
    json_t *v = json_object_get(root, "mlp_only_layers");
    c->num_mlp_only_layers = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_array(v))
        return fail(r, "key 'mlp_only_layers': expected an array, got %s", kind(v));
    if (json_array_size(v) > HFCONFIG_MAX_LAYERS)
        return fail(r, "key 'mlp_only_layers': more than %d entries", HFCONFIG_MAX_LAYERS);
    for (size_t i = 0; i < json_array_size(v); i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_integer(e))
            return fail(r, "key 'mlp_only_layers': entry %zu: expected an integer, got %s", i,
                        kind(e));
        /* indices outside [0, L) select no layer in transformers either; kept as given */
        json_int_t layer = json_integer_value(e);
        if (layer < -2147483647LL || layer > 2147483647LL)
            return fail(r, "key 'mlp_only_layers': entry %zu out of range", i);
        c->mlp_only_layers[c->num_mlp_only_layers++] = (int)layer;
    }
    return 0;
}

/* qwen2_moe layer_types: "full_attention" / "sliding_attention" per layer. */
static int parse_layer_types(const struct reader *r, json_t *root, struct model_config *c,
                             bool *given)
{
    json_t *v = json_object_get(root, "layer_types");
    *given = false;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_array(v)) return fail(r, "key 'layer_types': expected an array, got %s", kind(v));
    if (json_array_size(v) != (size_t)c->num_layers)
        return fail(r, "key 'layer_types': %zu entries for %d layers", json_array_size(v),
                    c->num_layers);
    for (int l = 0; l < c->num_layers; l++) {
        const char *s = json_string_value(json_array_get(v, (size_t)l));
        if (s && strcmp(s, "sliding_attention") == 0)
            c->is_sliding[l] = 1;
        else if (s && strcmp(s, "full_attention") == 0)
            c->is_sliding[l] = 0;
        else
            return fail(r,
                        "key 'layer_types': entry %d is not 'full_attention' or "
                        "'sliding_attention'",
                        l);
    }
    *given = true;
    return 0;
}

static int parse_common(const struct reader *r, json_t *root, struct model_config *c)
{
    if (get_int(r, root, "hidden_size", true, &c->hidden_size) != 0) return -1;
    if (get_int(r, root, "num_hidden_layers", true, &c->num_layers) != 0) return -1;
    if (c->num_layers > HFCONFIG_MAX_LAYERS)
        return fail(r, "key 'num_hidden_layers': %d exceeds esft's limit of %d layers",
                    c->num_layers, HFCONFIG_MAX_LAYERS);
    if (get_int(r, root, "num_attention_heads", true, &c->num_heads) != 0) return -1;
    if (get_int(r, root, "vocab_size", true, &c->vocab_size) != 0) return -1;
    if (get_int(r, root, "intermediate_size", true, &c->intermediate_size) != 0) return -1;
    if (get_int(r, root, "num_experts_per_tok", true, &c->top_k) != 0) return -1;

    /* num_key_value_heads: absent -> class default; null -> num_attention_heads in
     * olmoe/mixtral (__post_init__), an error for qwen (their modeling would fail) */
    bool is_null;
    if (get_int_or_null(r, root, "num_key_value_heads", &c->num_kv_heads, &is_null) != 0) return -1;
    if (is_null) {
        if (c->family == HF_QWEN2_MOE || c->family == HF_QWEN3_MOE)
            return fail(r, "key 'num_key_value_heads': expected an integer, got null");
        c->num_kv_heads = c->num_heads;
    } else if (!json_object_get(root, "num_key_value_heads") && c->family == HF_OLMOE) {
        c->num_kv_heads = c->num_heads;
    }
    /* head_dim: explicit, else hidden_size / num_attention_heads (getattr in modeling) */
    c->head_dim = 0;
    if (get_int_or_null(r, root, "head_dim", &c->head_dim, &is_null) != 0) return -1;
    if (c->head_dim == 0 && c->num_heads > 0) c->head_dim = c->hidden_size / c->num_heads;

    if (get_int64(r, root, "", "max_position_embeddings", false, &c->max_position_embeddings) != 0)
        return -1;
    if (get_number(r, root, "", "rms_norm_eps", &c->rms_norm_eps) != 0) return -1;
    if (get_bool(r, root, "", "tie_word_embeddings", &c->tie_word_embeddings) != 0) return -1;
    if (get_number(r, root, "", "initializer_range", &c->initializer_range) != 0) return -1;
    if (get_number(r, root, "", "router_aux_loss_coef", &c->router_aux_loss_coef) != 0) return -1;
    if (get_bool(r, root, "", "output_router_logits", &c->output_router_logits) != 0) return -1;
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

/* An integer key that may be null (null: *out = null_value). */
static int get_int_null_as(const struct reader *r, json_t *root, const char *key, int null_value,
                           int *out)
{
    bool is_null;
    if (get_int_or_null(r, root, key, out, &is_null) != 0) return -1;
    if (is_null) *out = null_value;
    return 0;
}

/* deepseek_v2, deepseek_v3, glm4_moe: fine-grained experts with shared experts and dense
 * first layers; MLA (deepseek) or GQA with partial rotary (glm); softmax routers with
 * group-limited greedy selection (deepseek_v2) or sigmoid routers with a selection bias
 * (deepseek_v3, glm4_moe). */
static int parse_deepseek_glm(const struct reader *r, json_t *root, struct model_config *c)
{
    bool v2 = c->family == HF_DEEPSEEK_V2, glm = c->family == HF_GLM4_MOE;
    c->expert_intermediate_size = 0;
    if (get_int(r, root, "moe_intermediate_size", true, &c->expert_intermediate_size) != 0 ||
        parse_num_experts(r, root, c, "n_routed_experts", v2 ? "num_experts" : "num_local_experts") != 0 ||
        get_int_null_as(r, root, "n_shared_experts", 0, &c->num_shared_experts) != 0 ||
        get_int(r, root, "first_k_dense_replace", false, &c->first_k_dense_replace) != 0 ||
        get_number(r, root, "", "routed_scaling_factor", &c->routed_scaling_factor) != 0 ||
        get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
        get_int_null_as(r, root, "n_group", 1, &c->n_group) != 0 ||
        get_int_null_as(r, root, "topk_group", 1, &c->topk_group) != 0 ||
        get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0)
        return -1;
    /* num_nextn_predict_layers, or its attribute_map alias num_mtp_layers */
    const char *mtp = json_object_get(root, "num_nextn_predict_layers") ? "num_nextn_predict_layers"
                                                                        : "num_mtp_layers";
    if (get_int_null_as(r, root, mtp, 0, &c->num_mtp_layers) != 0) return -1;
    if (c->num_shared_experts < 0)
        return fail(r, "key 'n_shared_experts': must not be negative, got %d", c->num_shared_experts);
    if (c->first_k_dense_replace < 0)
        return fail(r, "key 'first_k_dense_replace': must not be negative, got %d",
                    c->first_k_dense_replace);
    if (!(c->routed_scaling_factor > 0))
        return fail(r, "key 'routed_scaling_factor': must be positive, got %g",
                    c->routed_scaling_factor);
    if (c->num_mtp_layers < 0)
        return fail(r, "key '%s': must not be negative, got %d", mtp, c->num_mtp_layers);
    int freq = 1; /* DeepSeek's own code: MoE where layer % moe_layer_freq == 0 */
    if (get_int_null_as(r, root, "moe_layer_freq", 1, &freq) != 0) return -1;
    if (freq != 1)
        return fail(r, "key 'moe_layer_freq': %d is not supported (transformers ignores the key "
                    "and makes every layer from first_k_dense_replace on a MoE layer; "
                    "DeepSeek's own code does not: esft will not guess)", freq);
    c->shared_expert_intermediate_size = c->num_shared_experts * c->expert_intermediate_size;
    if (v2) {
        const char *method = "greedy";
        if (get_string(r, root, "", "topk_method", &method) != 0) return -1;
        if (strcmp(method, "greedy") == 0)
            c->router = ROUTER_SOFTMAX_TOPK;
        else if (strcmp(method, "group_limited_greedy") == 0)
            c->router = ROUTER_GROUPED_GREEDY;
        else
            return fail(r, "key 'topk_method': '%s' is not supported for deepseek_v2 "
                        "(supported: greedy, group_limited_greedy)", method);
        if (c->router == ROUTER_SOFTMAX_TOPK) c->n_group = c->topk_group = 1;
    }
    if (glm) {
        bool qk_norm = false;
        if (get_bool(r, root, "", "use_qk_norm", &qk_norm) != 0) return -1;
        c->qk_norm = qk_norm ? QK_NORM_PER_HEAD : QK_NORM_NONE;
        c->o_bias = false; /* attention_bias covers q, k, v only (modeling_glm4_moe.py) */
        return 0;
    }
    /* multi-head latent attention */
    c->o_bias = c->qkv_bias; /* attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj */
    if (get_int(r, root, "kv_lora_rank", true, &c->kv_lora_rank) != 0 ||
        get_int(r, root, "qk_nope_head_dim", true, &c->qk_nope_head_dim) != 0 ||
        get_int(r, root, "qk_rope_head_dim", true, &c->qk_rope_head_dim) != 0 ||
        get_int(r, root, "v_head_dim", true, &c->v_head_dim) != 0)
        return -1;
    if (!json_object_get(root, "q_lora_rank"))
        return fail(r, "missing required key 'q_lora_rank' (null for a model without the "
                    "low-rank query path)");
    if (get_int_null_as(r, root, "q_lora_rank", 0, &c->q_lora_rank) != 0) return -1;
    if (c->family == HF_DEEPSEEK_V3) {
        bool interleave = true;
        if (get_bool(r, root, "", "rope_interleave", &interleave) != 0) return -1;
        c->rope.layout = interleave ? ROPE_INTERLEAVED : ROPE_ROTATE_HALF;
    }
    c->num_kv_heads = c->num_heads; /* every head has its own key and value */
    c->head_dim = c->qk_rope_head_dim; /* the rotary width, as the configs set it */
    return 0;
}

static int parse_family(const struct reader *r, json_t *root, struct model_config *c)
{
    bool is_null;
    int window = c->sliding_window;
    switch (c->family) {
    case HF_QWEN2_MOE: {
        c->expert_intermediate_size = 0;
        if (get_int(r, root, "moe_intermediate_size", true, &c->expert_intermediate_size) != 0 ||
            get_int(r, root, "shared_expert_intermediate_size", true,
                    &c->shared_expert_intermediate_size) != 0 ||
            parse_num_experts(r, root, c, "num_experts", NULL) != 0 ||
            get_int(r, root, "decoder_sparse_step", false, &c->decoder_sparse_step) != 0 ||
            parse_mlp_only_layers(r, root, c) != 0 ||
            get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
            get_bool(r, root, "", "qkv_bias", &c->qkv_bias) != 0 ||
            get_bool(r, root, "", "use_sliding_window", &c->use_sliding_window) != 0 ||
            get_int(r, root, "max_window_layers", false, &c->max_window_layers) != 0 ||
            get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0)
            return -1;
        /* Qwen2MoeConfig.__post_init__: window only when use_sliding_window; layer_types
         * default: odd-numbered (1-based) layers below max_window_layers slide */
        c->sliding_window = (c->use_sliding_window && !is_null) ? window : 0;
        bool given;
        if (parse_layer_types(r, root, c, &given) != 0) return -1;
        if (!given) default_sliding_layers(c);
        break;
    }
    case HF_QWEN3_MOE:
        c->expert_intermediate_size = 0;
        if (get_int(r, root, "moe_intermediate_size", true, &c->expert_intermediate_size) != 0 ||
            parse_num_experts(r, root, c, "num_experts", "num_local_experts") != 0 ||
            get_int(r, root, "decoder_sparse_step", false, &c->decoder_sparse_step) != 0 ||
            parse_mlp_only_layers(r, root, c) != 0 ||
            get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
            get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0 ||
            get_bool(r, root, "", "use_sliding_window", &c->use_sliding_window) != 0 ||
            get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0)
            return -1;
        c->o_bias = c->qkv_bias; /* attention_bias covers o_proj too (modeling_qwen3_moe.py) */
        c->sliding_window = (c->use_sliding_window && !is_null) ? window : 0;
        default_sliding_layers(c);
        break;
    case HF_OLMOE: {
        double clip = 0;
        json_t *v = json_object_get(root, "clip_qkv");
        if ((v && !json_is_null(v) && get_number(r, root, "", "clip_qkv", &clip) != 0) ||
            parse_num_experts(r, root, c, "num_experts", "num_local_experts") != 0 ||
            get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
            get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0)
            return -1;
        if (clip < 0) return fail(r, "key 'clip_qkv': must not be negative, got %g", clip);
        c->clip_qkv = clip;
        c->o_bias = c->qkv_bias;
        c->expert_intermediate_size = c->intermediate_size; /* every layer is MoE */
        window = 0;
        if (get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0) return -1;
        c->sliding_window = is_null ? 0 : window;
        default_sliding_layers(c);
        break;
    }
    case HF_MIXTRAL:
        if (parse_num_experts(r, root, c, "num_local_experts", "num_experts") != 0 ||
            get_number(r, root, "", "router_jitter_noise", &c->router_jitter_noise) != 0)
            return -1;
        c->expert_intermediate_size = c->intermediate_size;
        c->norm_topk_prob = true;
        window = 0;
        if (get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0) return -1;
        c->sliding_window = is_null ? 0 : window;
        default_sliding_layers(c);
        break;
    case HF_DEEPSEEK_V2:
    case HF_DEEPSEEK_V3:
    case HF_GLM4_MOE:
        if (parse_deepseek_glm(r, root, c) != 0) return -1;
        break;
    default:
        break;
    }
    return 0;
}

int hfconfig_parse(const char *text, size_t len, const char *source, struct model_config *cfg,
                   char *err, size_t errsize)
{
    struct reader r = {source, err, errsize};
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return fail(&r, "not valid JSON: %s (line %d, column %d)", jerr.text, jerr.line,
                    jerr.column);
    int rc = -1;
    if (!json_is_object(root)) {
        fail(&r, "expected a JSON object, got %s", kind(root));
        goto done;
    }
    json_t *mt = json_object_get(root, "model_type");
    if (!mt) {
        fail(&r, "missing required key 'model_type'");
        goto done;
    }
    if (!json_is_string(mt)) {
        fail(&r, "key 'model_type': expected a string, got %s", kind(mt));
        goto done;
    }
    enum hf_family family;
    if (hfconfig_family_parse(json_string_value(mt), &family) != 0) {
        fail(&r, "key 'model_type': unknown model_type '%s' (supported: " SUPPORTED_FAMILIES ")",
             json_string_value(mt));
        goto done;
    }
    if (!family_table[family].supported) {
        fail(&r, "family '%s' is not supported yet (supported: " SUPPORTED_FAMILIES ")",
             json_string_value(mt));
        goto done;
    }
    hfconfig_defaults(family, cfg);
    if (parse_common(&r, root, cfg) != 0 || parse_family(&r, root, cfg) != 0 ||
        parse_rope(&r, root, cfg) != 0 || parse_quantization(&r, root, cfg) != 0)
        goto done;
    if (cfg->rope.partial_rotary_factor != 1.0 && cfg->family != HF_GLM4_MOE) {
        /* the default rope of these families ignores it (modeling_*: dim = head_dim) */
        fail(&r, "key 'partial_rotary_factor': %g is not supported for %s",
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
        fail(&r, "cannot open: %s", strerror(errno));
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
            fail(&r, "larger than 64 MiB, not a config file");
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
        fail(&r, "read error");
    else
        rc = hfconfig_parse(text, len, path, cfg, err, errsize);
    if (rc == 0) cfg->hash = hfconfig_fnv1a64(text, len);
    free(text);
    free(path);
    return rc;
}

/* ---- writing ----------------------------------------------------------------------- */

static json_t *token_json(int id)
{
    return id >= 0 ? json_integer(id) : json_null();
}

static json_t *rope_json(const struct hf_rope *rope)
{
    json_t *o = json_object();
    static const char *types[] = {
        [ROPE_DEFAULT] = "default", [ROPE_LINEAR] = "linear", [ROPE_YARN] = "yarn"};
    json_object_set_new(o, "rope_type", json_string(types[rope->type]));
    json_object_set_new(o, "rope_theta", json_real(rope->theta));
    if (rope->partial_rotary_factor != 1.0)
        json_object_set_new(o, "partial_rotary_factor", json_real(rope->partial_rotary_factor));
    if (rope->type == ROPE_LINEAR || rope->type == ROPE_YARN)
        json_object_set_new(o, "factor", json_real(rope->factor));
    if (rope->type == ROPE_YARN) {
        json_object_set_new(o, "original_max_position_embeddings",
                            json_integer(rope->original_max_position_embeddings));
        json_object_set_new(o, "beta_fast", json_real(rope->beta_fast));
        json_object_set_new(o, "beta_slow", json_real(rope->beta_slow));
        json_object_set_new(o, "truncate", json_boolean(rope->truncate));
        if (rope->has_attention_factor)
            json_object_set_new(o, "attention_factor", json_real(rope->attention_factor));
        if (rope->mscale != 0) json_object_set_new(o, "mscale", json_real(rope->mscale));
        if (rope->mscale_all_dim != 0)
            json_object_set_new(o, "mscale_all_dim", json_real(rope->mscale_all_dim));
    }
    return o;
}

static json_t *int_or_null(int value)
{
    return value > 0 ? json_integer(value) : json_null();
}

/* The keys of deepseek_v2, deepseek_v3 and glm4_moe (their configuration_*.py). */
static void deepseek_glm_json(json_t *o, const struct model_config *c)
{
    bool grouped = c->router != ROUTER_SOFTMAX_TOPK;
    json_object_set_new(o, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(o, "moe_intermediate_size", json_integer(c->expert_intermediate_size));
    json_object_set_new(o, "n_routed_experts", json_integer(c->num_experts));
    json_object_set_new(o, "n_shared_experts", json_integer(c->num_shared_experts));
    json_object_set_new(o, "first_k_dense_replace", json_integer(c->first_k_dense_replace));
    json_object_set_new(o, "routed_scaling_factor", json_real(c->routed_scaling_factor));
    json_object_set_new(o, "n_group", grouped ? json_integer(c->n_group) : json_null());
    json_object_set_new(o, "topk_group", grouped ? json_integer(c->topk_group) : json_null());
    json_object_set_new(o, "attention_bias", json_boolean(c->qkv_bias));
    if (c->family != HF_DEEPSEEK_V2)
        json_object_set_new(o, "num_nextn_predict_layers", json_integer(c->num_mtp_layers));
    if (c->family == HF_GLM4_MOE) {
        json_object_set_new(o, "use_qk_norm", json_boolean(c->qk_norm != QK_NORM_NONE));
        return;
    }
    if (c->family == HF_DEEPSEEK_V2)
        json_object_set_new(o, "topk_method", json_string(c->router == ROUTER_GROUPED_GREEDY
                                                              ? "group_limited_greedy"
                                                              : "greedy"));
    else
        json_object_set_new(o, "rope_interleave", json_boolean(c->rope.layout == ROPE_INTERLEAVED));
    json_object_set_new(o, "kv_lora_rank", json_integer(c->kv_lora_rank));
    json_object_set_new(o, "q_lora_rank", int_or_null(c->q_lora_rank));
    json_object_set_new(o, "qk_nope_head_dim", json_integer(c->qk_nope_head_dim));
    json_object_set_new(o, "qk_rope_head_dim", json_integer(c->qk_rope_head_dim));
    json_object_set_new(o, "v_head_dim", json_integer(c->v_head_dim));
}

static json_t *config_json(const struct model_config *c)
{
    json_t *o = json_object();
    json_t *arch = json_array();
    json_array_append_new(
        arch,
        json_string(c->architecture[0] ? c->architecture : family_table[c->family].architecture));
    json_object_set_new(o, "architectures", arch);
    json_object_set_new(o, "model_type", json_string(hfconfig_family_name(c->family)));
    if (c->dtype != HF_DTYPE_UNSET)
        json_object_set_new(o, "dtype", json_string(hfconfig_dtype_name(c->dtype)));
    json_object_set_new(o, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(o, "num_hidden_layers", json_integer(c->num_layers));
    json_object_set_new(o, "num_attention_heads", json_integer(c->num_heads));
    json_object_set_new(o, "num_key_value_heads", json_integer(c->num_kv_heads));
    /* every family reads an explicit head_dim (getattr(config, "head_dim", ...)) */
    json_object_set_new(o, "head_dim", json_integer(c->head_dim));
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(o, "hidden_act", json_string(c->hidden_act == ACT_GELU ? "gelu" : "silu"));
    json_object_set_new(o, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(o, "initializer_range", json_real(c->initializer_range));
    json_object_set_new(o, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(o, "use_cache", json_true());
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "bos_token_id", token_json(c->bos_token_id));
    json_object_set_new(o, "eos_token_id", token_json(c->eos_token_id));
    json_object_set_new(o, "pad_token_id", token_json(c->pad_token_id));
    json_object_set_new(o, "rope_parameters", rope_json(&c->rope));
    json_object_set_new(o, "num_experts_per_tok", json_integer(c->top_k));
    /* mixtral has no such key: its router always renormalises */
    if (c->family != HF_MIXTRAL)
        json_object_set_new(o, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    json_object_set_new(o, "router_aux_loss_coef", json_real(c->router_aux_loss_coef));
    json_object_set_new(o, "output_router_logits", json_boolean(c->output_router_logits));

    json_t *mlp_only = json_array();
    for (int i = 0; i < c->num_mlp_only_layers; i++)
        json_array_append_new(mlp_only, json_integer(c->mlp_only_layers[i]));
    json_t *window = c->sliding_window > 0 ? json_integer(c->sliding_window) : json_null();
    switch (c->family) {
    case HF_QWEN2_MOE: {
        json_object_set_new(o, "intermediate_size", json_integer(c->intermediate_size));
        json_object_set_new(o, "moe_intermediate_size", json_integer(c->expert_intermediate_size));
        json_object_set_new(o, "shared_expert_intermediate_size",
                            json_integer(c->shared_expert_intermediate_size));
        json_object_set_new(o, "num_experts", json_integer(c->num_experts));
        json_object_set_new(o, "decoder_sparse_step", json_integer(c->decoder_sparse_step));
        json_object_set(o, "mlp_only_layers", mlp_only);
        json_object_set_new(o, "qkv_bias", json_boolean(c->qkv_bias));
        json_object_set_new(o, "use_sliding_window", json_boolean(c->use_sliding_window));
        json_object_set_new(o, "sliding_window", json_integer(c->sliding_window));
        json_object_set_new(o, "max_window_layers", json_integer(c->max_window_layers));
        json_t *types = json_array();
        for (int l = 0; l < c->num_layers; l++)
            json_array_append_new(
                types, json_string(c->is_sliding[l] ? "sliding_attention" : "full_attention"));
        json_object_set_new(o, "layer_types", types);
        break;
    }
    case HF_QWEN3_MOE:
        json_object_set_new(o, "intermediate_size", json_integer(c->intermediate_size));
        json_object_set_new(o, "moe_intermediate_size", json_integer(c->expert_intermediate_size));
        /* 5.23 saves num_local_experts (its attribute_map target); transformers 4.x reads
         * num_experts. Both are written so either version builds the same model. */
        json_object_set_new(o, "num_local_experts", json_integer(c->num_experts));
        json_object_set_new(o, "num_experts", json_integer(c->num_experts));
        json_object_set_new(o, "decoder_sparse_step", json_integer(c->decoder_sparse_step));
        json_object_set(o, "mlp_only_layers", mlp_only);
        json_object_set_new(o, "attention_bias", json_boolean(c->qkv_bias));
        json_object_set_new(o, "use_sliding_window", json_boolean(c->use_sliding_window));
        json_object_set(o, "sliding_window", window);
        break;
    case HF_OLMOE:
        json_object_set_new(o, "intermediate_size", json_integer(c->expert_intermediate_size));
        json_object_set_new(o, "num_experts", json_integer(c->num_experts));
        json_object_set_new(o, "attention_bias", json_boolean(c->qkv_bias));
        json_object_set_new(o, "clip_qkv", c->clip_qkv > 0 ? json_real(c->clip_qkv) : json_null());
        if (c->sliding_window > 0) json_object_set(o, "sliding_window", window);
        break;
    case HF_MIXTRAL:
        json_object_set_new(o, "intermediate_size", json_integer(c->expert_intermediate_size));
        json_object_set_new(o, "num_local_experts", json_integer(c->num_experts));
        json_object_set_new(o, "router_jitter_noise", json_real(c->router_jitter_noise));
        json_object_set(o, "sliding_window", window);
        break;
    case HF_DEEPSEEK_V2:
    case HF_DEEPSEEK_V3:
    case HF_GLM4_MOE:
        deepseek_glm_json(o, c);
        break;
    default:
        break;
    }
    json_decref(mlp_only);
    json_decref(window);
    return o;
}

int hfconfig_write(const char *dir, const struct model_config *cfg, char *err, size_t errsize)
{
    size_t n = strlen(dir) + sizeof "/config.json.tmp";
    char *path = xmalloc(n), *tmp = xmalloc(n);
    snprintf(path, n, "%s/config.json", dir);
    snprintf(tmp, n, "%s/config.json.tmp", dir);
    struct reader r = {path, err, errsize};
    int rc = -1;
    if ((unsigned)cfg->family >= HF_FAMILY_COUNT || !family_table[cfg->family].supported) {
        fail(&r, "family '%s' is not supported yet (supported: " SUPPORTED_FAMILIES ")",
             hfconfig_family_name(cfg->family));
        goto out;
    }
    json_t *o = config_json(cfg);
    /* sorted keys, indent 2: the layout of transformers' to_json_string; 15 significant
     * digits print 1e-06 rather than 9.9999999999999995e-07 and round-trip any decimal
     * of up to 15 digits */
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(15));
    json_decref(o);
    if (!text) {
        fail(&r, "cannot encode the configuration");
        goto out;
    }
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        fail(&r, "cannot create %s: %s", tmp, strerror(errno));
        free(text);
        goto out;
    }
    int ok =
        fputs(text, f) >= 0 && fputc('\n', f) != EOF && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    free(text);
    if (!ok) {
        fail(&r, "write failed: %s", strerror(errno));
        unlink(tmp);
        goto out;
    }
    if (rename(tmp, path) != 0) {
        fail(&r, "cannot rename %s: %s", tmp, strerror(errno));
        unlink(tmp);
        goto out;
    }
    rc = 0;
out:
    free(path);
    free(tmp);
    return rc;
}
