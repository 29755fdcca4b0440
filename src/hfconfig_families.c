/* hfconfig_families: what is particular to each family in config.json: the class
 * defaults of its configuration_<family>.py, and its own keys (expert counts and widths
 * under their names, shared experts, dense layers, sliding windows, MLA ranks, routers).
 * hfconfig.c reads the keys every family shares and validates the result.
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
 *   models/gpt_oss/configuration_gpt_oss.py (5.24): layers 36, num_local_experts 128,
 *     vocab 201088, hidden 2880, intermediate 2880 (the expert width), head_dim 64, heads
 *     64, kv heads 8, sliding_window 128, tie false, silu, 0.02, max_position 131072,
 *     rms_norm_eps 1e-5, top-k 4, swiglu_alpha 1.702, swiglu_limit 7.0, aux 0.001,
 *     attention_bias true (q, k, v and o), default_theta 150000, bos/eos/pad None;
 *     __post_init__: layer_types sliding at even layer indices ((i + 1) % 2), rope
 *     {yarn, factor 32, beta_fast 32, beta_slow 1, truncate false, original 4096} when
 *     rope_parameters is None. attribute_map num_experts -> num_local_experts.
 */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "hfconfig.h"
#include "hfconfig_internal.h"

/* ---- defaults ---------------------------------------------------------------------- */

void hfconfig_defaults(enum hf_family family, struct model_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->family = family;
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", hfconfig_family_name(family));
    snprintf(cfg->architecture, sizeof cfg->architecture, "%s",
             (unsigned)family < HF_FAMILY_COUNT ? hfconfig_family_architecture(family) : "");
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
    case HF_GPT_OSS:
        cfg->vocab_size = 201088;
        cfg->hidden_size = 2880;
        cfg->intermediate_size = 2880;
        cfg->expert_intermediate_size = 2880;
        cfg->num_layers = 36;
        cfg->num_heads = 64;
        cfg->num_kv_heads = 8;
        cfg->max_position_embeddings = 131072;
        cfg->rms_norm_eps = 1e-5;
        cfg->sliding_window = 128;
        cfg->top_k = 4;
        cfg->num_experts = 128;
        cfg->qkv_bias = cfg->o_bias = true;
        cfg->attention_sinks = true;
        cfg->router = ROUTER_TOPK_SOFTMAX;
        cfg->router_bias = true;
        cfg->expert_bias = true;
        cfg->clamped_swiglu = true;
        cfg->swiglu_alpha = 1.702;
        cfg->swiglu_limit = 7.0;
        cfg->rope.theta = 150000.0; /* GptOssConfig.default_theta */
        cfg->rope.type = ROPE_YARN;
        cfg->rope.factor = 32.0;
        cfg->rope.truncate = false;
        cfg->rope.original_max_position_embeddings = 4096;
        break;
    default:
        break;
    }
    if (cfg->n_group == 0) cfg->n_group = cfg->topk_group = 1;
    cfg->shared_expert_intermediate_size = cfg->family == HF_QWEN2_MOE
                                               ? cfg->shared_expert_intermediate_size
                                               : cfg->num_shared_experts * cfg->expert_intermediate_size;
    cfg->head_dim = cfg->num_heads ? cfg->hidden_size / cfg->num_heads : 0;
    if (family == HF_GPT_OSS) cfg->head_dim = 64;
    if (cfg->attention == ATTENTION_MLA) cfg->head_dim = cfg->qk_rope_head_dim;
    /* 4096 / 96 heads does not divide: the released GLM-4.5 configs give head_dim 128 */
    if (family == HF_GLM4_MOE) cfg->head_dim = 128;
    cfg->rope.rotary_dim = (int)(cfg->head_dim * cfg->rope.partial_rotary_factor);
    for (int l = 0; l < cfg->num_layers && l < HFCONFIG_MAX_LAYERS; l++) cfg->is_moe[l] = 1;
}

/* The family's default layer_types: qwen2_moe slides odd-numbered (1-based) layers below
 * max_window_layers (Qwen2MoeConfig.__post_init__); gpt_oss slides the even-indexed
 * layers 0, 2, ... (GptOssConfig.__post_init__); the others slide every layer when a
 * window is set. */
void hf_default_sliding_layers(struct model_config *c)
{
    for (int l = 0; l < c->num_layers && l < HFCONFIG_MAX_LAYERS; l++) {
        if (c->family == HF_QWEN2_MOE)
            c->is_sliding[l] = ((l + 1) % 2) && l < c->max_window_layers && c->use_sliding_window;
        else if (c->family == HF_GPT_OSS)
            c->is_sliding[l] = (l + 1) % 2;
        else
            c->is_sliding[l] = 1;
    }
}

/* The expert count under its own key and its attribute_map alias; both must agree. */
static int parse_num_experts(const struct reader *r, json_t *root, struct model_config *c,
                             const char *key, const char *alias)
{
    json_t *a = json_object_get(root, key);
    json_t *b = alias ? json_object_get(root, alias) : NULL;
    if (!a && !b) return hf_fail(r, "missing required key '%s'", key);
    int n = c->num_experts, m = c->num_experts;
    if (a && hf_get_int(r, root, key, true, &n) != 0) return -1;
    if (b && hf_get_int(r, root, alias, true, &m) != 0) return -1;
    if (a && b && n != m)
        return hf_fail(r, "key '%s' (%d) and key '%s' (%d) disagree", key, n, alias, m);
    c->num_experts = a ? n : m;
    return 0;
}

static int parse_mlp_only_layers(const struct reader *r, json_t *root, struct model_config *c)
{
    json_t *v = json_object_get(root, "mlp_only_layers");
    c->num_mlp_only_layers = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_array(v))
        return hf_fail(r, "key 'mlp_only_layers': expected an array, got %s", hf_kind(v));
    if (json_array_size(v) > HFCONFIG_MAX_LAYERS)
        return hf_fail(r, "key 'mlp_only_layers': more than %d entries", HFCONFIG_MAX_LAYERS);
    for (size_t i = 0; i < json_array_size(v); i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_integer(e))
            return hf_fail(r, "key 'mlp_only_layers': entry %zu: expected an integer, got %s", i,
                        hf_kind(e));
        /* indices outside [0, L) select no layer in transformers either; kept as given */
        json_int_t layer = json_integer_value(e);
        if (layer < -2147483647LL || layer > 2147483647LL)
            return hf_fail(r, "key 'mlp_only_layers': entry %zu out of range", i);
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
    if (!json_is_array(v)) return hf_fail(r, "key 'layer_types': expected an array, got %s", hf_kind(v));
    if (json_array_size(v) != (size_t)c->num_layers)
        return hf_fail(r, "key 'layer_types': %zu entries for %d layers", json_array_size(v),
                    c->num_layers);
    for (int l = 0; l < c->num_layers; l++) {
        const char *s = json_string_value(json_array_get(v, (size_t)l));
        if (s && strcmp(s, "sliding_attention") == 0)
            c->is_sliding[l] = 1;
        else if (s && strcmp(s, "full_attention") == 0)
            c->is_sliding[l] = 0;
        else
            return hf_fail(r,
                        "key 'layer_types': entry %d is not 'full_attention' or "
                        "'sliding_attention'",
                        l);
    }
    *given = true;
    return 0;
}

/* An integer key that may be null (null: *out = null_value). */
static int get_int_null_as(const struct reader *r, json_t *root, const char *key, int null_value,
                           int *out)
{
    bool is_null;
    if (hf_get_int_or_null(r, root, key, out, &is_null) != 0) return -1;
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
    if (hf_get_int(r, root, "moe_intermediate_size", true, &c->expert_intermediate_size) != 0 ||
        parse_num_experts(r, root, c, "n_routed_experts", v2 ? "num_experts" : "num_local_experts") != 0 ||
        get_int_null_as(r, root, "n_shared_experts", 0, &c->num_shared_experts) != 0 ||
        hf_get_int(r, root, "first_k_dense_replace", false, &c->first_k_dense_replace) != 0 ||
        hf_get_number(r, root, "", "routed_scaling_factor", &c->routed_scaling_factor) != 0 ||
        hf_get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
        get_int_null_as(r, root, "n_group", 1, &c->n_group) != 0 ||
        get_int_null_as(r, root, "topk_group", 1, &c->topk_group) != 0 ||
        hf_get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0)
        return -1;
    /* num_nextn_predict_layers, or its attribute_map alias num_mtp_layers */
    const char *mtp = json_object_get(root, "num_nextn_predict_layers") ? "num_nextn_predict_layers"
                                                                        : "num_mtp_layers";
    if (get_int_null_as(r, root, mtp, 0, &c->num_mtp_layers) != 0) return -1;
    if (c->num_shared_experts < 0)
        return hf_fail(r, "key 'n_shared_experts': must not be negative, got %d", c->num_shared_experts);
    if (c->first_k_dense_replace < 0)
        return hf_fail(r, "key 'first_k_dense_replace': must not be negative, got %d",
                    c->first_k_dense_replace);
    if (!(c->routed_scaling_factor > 0))
        return hf_fail(r, "key 'routed_scaling_factor': must be positive, got %g",
                    c->routed_scaling_factor);
    if (c->num_mtp_layers < 0)
        return hf_fail(r, "key '%s': must not be negative, got %d", mtp, c->num_mtp_layers);
    int freq = 1; /* DeepSeek's own code: MoE where layer % moe_layer_freq == 0 */
    if (get_int_null_as(r, root, "moe_layer_freq", 1, &freq) != 0) return -1;
    if (freq != 1)
        return hf_fail(r, "key 'moe_layer_freq': %d is not supported (transformers ignores the key "
                    "and makes every layer from first_k_dense_replace on a MoE layer; "
                    "DeepSeek's own code does not: esft will not guess)", freq);
    c->shared_expert_intermediate_size = c->num_shared_experts * c->expert_intermediate_size;
    if (v2) {
        const char *method = "greedy";
        if (hf_get_string(r, root, "", "topk_method", &method) != 0) return -1;
        if (strcmp(method, "greedy") == 0)
            c->router = ROUTER_SOFTMAX_TOPK;
        else if (strcmp(method, "group_limited_greedy") == 0)
            c->router = ROUTER_GROUPED_GREEDY;
        else
            return hf_fail(r, "key 'topk_method': '%s' is not supported for deepseek_v2 "
                        "(supported: greedy, group_limited_greedy)", method);
        if (c->router == ROUTER_SOFTMAX_TOPK) c->n_group = c->topk_group = 1;
    }
    if (glm) {
        bool qk_norm = false;
        if (hf_get_bool(r, root, "", "use_qk_norm", &qk_norm) != 0) return -1;
        c->qk_norm = qk_norm ? QK_NORM_PER_HEAD : QK_NORM_NONE;
        c->o_bias = false; /* attention_bias covers q, k, v only (modeling_glm4_moe.py) */
        return 0;
    }
    /* multi-head latent attention */
    c->o_bias = c->qkv_bias; /* attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj */
    if (hf_get_int(r, root, "kv_lora_rank", true, &c->kv_lora_rank) != 0 ||
        hf_get_int(r, root, "qk_nope_head_dim", true, &c->qk_nope_head_dim) != 0 ||
        hf_get_int(r, root, "qk_rope_head_dim", true, &c->qk_rope_head_dim) != 0 ||
        hf_get_int(r, root, "v_head_dim", true, &c->v_head_dim) != 0)
        return -1;
    if (!json_object_get(root, "q_lora_rank"))
        return hf_fail(r, "missing required key 'q_lora_rank' (null for a model without the "
                    "low-rank query path)");
    if (get_int_null_as(r, root, "q_lora_rank", 0, &c->q_lora_rank) != 0) return -1;
    if (c->family == HF_DEEPSEEK_V3) {
        bool interleave = true;
        if (hf_get_bool(r, root, "", "rope_interleave", &interleave) != 0) return -1;
        c->rope.layout = interleave ? ROPE_INTERLEAVED : ROPE_ROTATE_HALF;
    }
    c->num_kv_heads = c->num_heads; /* every head has its own key and value */
    c->head_dim = c->qk_rope_head_dim; /* the rotary width, as the configs set it */
    return 0;
}

/* gpt_oss: every layer MoE, experts of width intermediate_size with biases and a clamped
 * SwiGLU, a router with a bias, attention with q/k/v/o biases and per-head sinks, sliding
 * and full layers alternating (modeling_gpt_oss.py). */
static int parse_gpt_oss(const struct reader *r, json_t *root, struct model_config *c)
{
    bool is_null;
    int window = c->sliding_window;
    if (parse_num_experts(r, root, c, "num_local_experts", "num_experts") != 0 ||
        hf_get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0 ||
        hf_get_number(r, root, "", "swiglu_alpha", &c->swiglu_alpha) != 0 ||
        hf_get_number(r, root, "", "swiglu_limit", &c->swiglu_limit) != 0 ||
        hf_get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0)
        return -1;
    c->o_bias = c->qkv_bias; /* attention_bias: q_proj, k_proj, v_proj and o_proj */
    c->expert_intermediate_size = c->intermediate_size;
    c->sliding_window = is_null ? 0 : window;
    if (!(c->swiglu_limit > 0))
        return hf_fail(r, "key 'swiglu_limit': must be positive, got %g", c->swiglu_limit);
    if (!isfinite(c->swiglu_alpha))
        return hf_fail(r, "key 'swiglu_alpha': must be a finite number, got %g", c->swiglu_alpha);
    bool given;
    if (parse_layer_types(r, root, c, &given) != 0) return -1;
    if (!given) hf_default_sliding_layers(c);
    return 0;
}

int hf_parse_family(const struct reader *r, json_t *root, struct model_config *c)
{
    bool is_null;
    int window = c->sliding_window;
    switch (c->family) {
    case HF_QWEN2_MOE: {
        c->expert_intermediate_size = 0;
        if (hf_get_int(r, root, "moe_intermediate_size", true, &c->expert_intermediate_size) != 0 ||
            hf_get_int(r, root, "shared_expert_intermediate_size", true,
                    &c->shared_expert_intermediate_size) != 0 ||
            parse_num_experts(r, root, c, "num_experts", NULL) != 0 ||
            hf_get_int(r, root, "decoder_sparse_step", false, &c->decoder_sparse_step) != 0 ||
            parse_mlp_only_layers(r, root, c) != 0 ||
            hf_get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
            hf_get_bool(r, root, "", "qkv_bias", &c->qkv_bias) != 0 ||
            hf_get_bool(r, root, "", "use_sliding_window", &c->use_sliding_window) != 0 ||
            hf_get_int(r, root, "max_window_layers", false, &c->max_window_layers) != 0 ||
            hf_get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0)
            return -1;
        /* Qwen2MoeConfig.__post_init__: window only when use_sliding_window; layer_types
         * default: odd-numbered (1-based) layers below max_window_layers slide */
        c->sliding_window = (c->use_sliding_window && !is_null) ? window : 0;
        bool given;
        if (parse_layer_types(r, root, c, &given) != 0) return -1;
        if (!given) hf_default_sliding_layers(c);
        break;
    }
    case HF_QWEN3_MOE:
        c->expert_intermediate_size = 0;
        if (hf_get_int(r, root, "moe_intermediate_size", true, &c->expert_intermediate_size) != 0 ||
            parse_num_experts(r, root, c, "num_experts", "num_local_experts") != 0 ||
            hf_get_int(r, root, "decoder_sparse_step", false, &c->decoder_sparse_step) != 0 ||
            parse_mlp_only_layers(r, root, c) != 0 ||
            hf_get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
            hf_get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0 ||
            hf_get_bool(r, root, "", "use_sliding_window", &c->use_sliding_window) != 0 ||
            hf_get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0)
            return -1;
        c->o_bias = c->qkv_bias; /* attention_bias covers o_proj too (modeling_qwen3_moe.py) */
        c->sliding_window = (c->use_sliding_window && !is_null) ? window : 0;
        hf_default_sliding_layers(c);
        break;
    case HF_OLMOE: {
        double clip = 0;
        json_t *v = json_object_get(root, "clip_qkv");
        if ((v && !json_is_null(v) && hf_get_number(r, root, "", "clip_qkv", &clip) != 0) ||
            parse_num_experts(r, root, c, "num_experts", "num_local_experts") != 0 ||
            hf_get_bool(r, root, "", "norm_topk_prob", &c->norm_topk_prob) != 0 ||
            hf_get_bool(r, root, "", "attention_bias", &c->qkv_bias) != 0)
            return -1;
        if (clip < 0) return hf_fail(r, "key 'clip_qkv': must not be negative, got %g", clip);
        c->clip_qkv = clip;
        c->o_bias = c->qkv_bias;
        c->expert_intermediate_size = c->intermediate_size; /* every layer is MoE */
        window = 0;
        if (hf_get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0) return -1;
        c->sliding_window = is_null ? 0 : window;
        hf_default_sliding_layers(c);
        break;
    }
    case HF_MIXTRAL:
        if (parse_num_experts(r, root, c, "num_local_experts", "num_experts") != 0 ||
            hf_get_number(r, root, "", "router_jitter_noise", &c->router_jitter_noise) != 0)
            return -1;
        c->expert_intermediate_size = c->intermediate_size;
        c->norm_topk_prob = true;
        window = 0;
        if (hf_get_int_or_null(r, root, "sliding_window", &window, &is_null) != 0) return -1;
        c->sliding_window = is_null ? 0 : window;
        hf_default_sliding_layers(c);
        break;
    case HF_DEEPSEEK_V2:
    case HF_DEEPSEEK_V3:
    case HF_GLM4_MOE:
        if (parse_deepseek_glm(r, root, c) != 0) return -1;
        break;
    case HF_GPT_OSS:
        if (parse_gpt_oss(r, root, c) != 0) return -1;
        break;
    default:
        break;
    }
    return 0;
}

