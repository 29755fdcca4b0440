/* hfconfig_write: struct model_config -> config.json in the form transformers 5.23's
 * save_pretrained writes it (v5 keys, sorted, indent 2), for the init phase and exports
 * without a base config (see hfconfig.h). */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "files.h"
#include "hfconfig.h"
#include "hfconfig_internal.h"
#include "log.h"

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

/* The keys of GptOssConfig (configuration_gpt_oss.py, 5.24) beyond the common ones:
 * experts of width intermediate_size, attention_bias for q/k/v/o, the clamped SwiGLU's
 * alpha and limit, and the window with the layers it applies to. quantization_config is
 * never written: esft writes its checkpoints unquantised. */
static void gpt_oss_json(json_t *o, const struct model_config *c)
{
    json_object_set_new(o, "intermediate_size", json_integer(c->expert_intermediate_size));
    json_object_set_new(o, "num_local_experts", json_integer(c->num_experts));
    json_object_set_new(o, "attention_bias", json_boolean(c->qkv_bias));
    json_object_set_new(o, "swiglu_alpha", json_real(c->swiglu_alpha));
    json_object_set_new(o, "swiglu_limit", json_real(c->swiglu_limit));
    json_object_set_new(o, "sliding_window",
                        c->sliding_window > 0 ? json_integer(c->sliding_window) : json_null());
    json_t *types = json_array();
    for (int l = 0; l < c->num_layers; l++)
        json_array_append_new(types,
                              json_string(c->is_sliding[l] ? "sliding_attention" : "full_attention"));
    json_object_set_new(o, "layer_types", types);
}

static json_t *config_json(const struct model_config *c)
{
    json_t *o = json_object();
    json_t *arch = json_array();
    json_array_append_new(
        arch,
        json_string(c->architecture[0] ? c->architecture : hfconfig_family_architecture(c->family)));
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
    /* mixtral has no such key: its router always renormalises; gpt_oss's never does */
    if (c->family != HF_MIXTRAL && c->family != HF_GPT_OSS)
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
    case HF_GPT_OSS:
        gpt_oss_json(o, c);
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
    if (!hfconfig_family_supported(cfg->family)) {
        hf_fail(&r, "family '%s' is not supported yet (supported: " SUPPORTED_FAMILIES ")",
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
        hf_fail(&r, "cannot encode the configuration");
        goto out;
    }
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        hf_fail(&r, "cannot create %s: %s", tmp, strerror(errno));
        free(text);
        goto out;
    }
    int ok =
        fputs(text, f) >= 0 && fputc('\n', f) != EOF && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    free(text);
    if (!ok) {
        hf_fail(&r, "write failed: %s", strerror(errno));
        unlink(tmp);
        goto out;
    }
    if (rename(tmp, path) != 0) {
        hf_fail(&r, "cannot rename %s: %s", tmp, strerror(errno));
        unlink(tmp);
        goto out;
    }
    rc = 0;
out:
    free(path);
    free(tmp);
    return rc;
}

/* Whether every real number in v prints back to itself with 15 significant digits. */
static bool reals_fit_15_digits(json_t *v)
{
    if (json_is_real(v)) {
        char text[40];
        snprintf(text, sizeof text, "%.15g", json_real_value(v));
        return strtod(text, NULL) == json_real_value(v);
    }
    const char *key;
    json_t *item;
    size_t i;
    if (json_is_object(v))
        json_object_foreach(v, key, item) if (!reals_fit_15_digits(item)) return false;
    if (json_is_array(v))
        json_array_foreach(v, i, item) if (!reals_fit_15_digits(item)) return false;
    return true;
}

static void write_json_text(FILE *out, const void *context)
{
    fputs(context, out);
    fputc('\n', out);
}

int hfconfig_write_json(const char *path, json_t *config, char *err, size_t errsize)
{
    size_t flags = JSON_INDENT(2) | JSON_SORT_KEYS | JSON_ENSURE_ASCII |
                   JSON_REAL_PRECISION(reals_fit_15_digits(config) ? 15 : 17);
    char *text = json_dumps(config, flags);
    if (!text) {
        snprintf(err, errsize, "%s: cannot encode the configuration", path);
        return -1;
    }
    int rc = file_write_atomically(path, write_json_text, text, err, errsize);
    free(text);
    return rc;
}
