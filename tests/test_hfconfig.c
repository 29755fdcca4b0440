/* test_hfconfig: config.json parsing, validation and writing.
 *
 * Configs are written by hand below (v4 and v5 spellings for each family); the expected
 * fields are read off them and the transformers 5.23 class defaults, not taken from the
 * program. With a directory argument (default tests/golden, or
 * $ESFT_TOP_SRCDIR/tests/golden) every fixture's config must load, survive a write ->
 * load round trip, and agree with its checkpoint (MoE layers have a router tensor,
 * embedding and q_proj shapes).
 *
 * Usage: test_hfconfig [GOLDEN_DIR] */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../src/hfconfig.h"
#include "../src/safetensors.h"
#include "check.h"

static char tmpdir[64];
static int dir_counter = 0;

/* Writes text as config.json in a fresh directory and returns the directory. */
static const char *config_dir(const char *text)
{
    static char dir[256];
    snprintf(dir, sizeof dir, "%s/c%03d", tmpdir, dir_counter++);
    mkdir(dir, 0755);
    char path[300];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
    return dir;
}

static int load_text(const char *text, struct model_config *cfg, char *err, size_t errsize)
{
    return hfconfig_load(config_dir(text), cfg, err, errsize);
}

static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISDIR(sb.st_mode))
            remove_tree(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static int contains(const char *s, const char *part)
{
    return strstr(s, part) != NULL;
}

/* ---- the four families, v5 and v4 ------------------------------------------------- */

static const char *qwen2_v5 =
    "{\n"
    "  \"architectures\": [\"Qwen2MoeForCausalLM\"],\n"
    "  \"model_type\": \"qwen2_moe\",\n"
    "  \"dtype\": \"bfloat16\",\n"
    "  \"hidden_size\": 36, \"num_hidden_layers\": 4, \"num_attention_heads\": 6,\n"
    "  \"num_key_value_heads\": 2, \"vocab_size\": 101, \"intermediate_size\": 30,\n"
    "  \"moe_intermediate_size\": 22, \"shared_expert_intermediate_size\": 26,\n"
    "  \"num_experts\": 7, \"num_experts_per_tok\": 2, \"norm_topk_prob\": true,\n"
    "  \"decoder_sparse_step\": 2, \"mlp_only_layers\": [3],\n"
    "  \"hidden_act\": \"gelu\", \"rms_norm_eps\": 1e-06, \"max_position_embeddings\": 64,\n"
    "  \"tie_word_embeddings\": false, \"use_sliding_window\": false, \"sliding_window\": 0,\n"
    "  \"rope_parameters\": {\"rope_theta\": 1000000.0, \"rope_type\": \"default\"},\n"
    "  \"router_aux_loss_coef\": 0.01, \"output_router_logits\": true\n"
    "}\n";

static void test_qwen2_moe(void)
{
    char err[1024];
    struct model_config c;
    CHECK(load_text(qwen2_v5, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.family == HF_QWEN2_MOE && strcmp(c.model_type, "qwen2_moe") == 0, "family");
    CHECK(strcmp(c.architecture, "Qwen2MoeForCausalLM") == 0, "architecture %s", c.architecture);
    CHECK(c.hidden_size == 36 && c.num_layers == 4 && c.num_heads == 6 && c.num_kv_heads == 2,
          "sizes");
    CHECK(c.head_dim == 6, "head_dim %d (36/6)", c.head_dim);
    CHECK(c.vocab_size == 101 && c.intermediate_size == 30 && c.expert_intermediate_size == 22,
          "widths");
    CHECK(c.num_shared_experts == 1 && c.shared_expert_intermediate_size == 26 &&
              c.shared_expert_gated,
          "shared expert");
    CHECK(c.num_experts == 7 && c.top_k == 2 && c.norm_topk_prob, "routing");
    CHECK(c.router == ROUTER_SOFTMAX_TOPK && c.routed_scaling_factor == 1.0, "router kind");
    /* layer l is MoE iff l not in mlp_only_layers and (l+1) % 2 == 0: only layer 1
     * (layer 3 is listed in mlp_only_layers) */
    CHECK(!c.is_moe[0] && c.is_moe[1] && !c.is_moe[2] && !c.is_moe[3], "is_moe %d%d%d%d",
          c.is_moe[0], c.is_moe[1], c.is_moe[2], c.is_moe[3]);
    CHECK(c.num_mlp_only_layers == 1 && c.mlp_only_layers[0] == 3, "mlp_only_layers");
    CHECK(c.decoder_sparse_step == 2, "decoder_sparse_step");
    CHECK(c.qkv_bias && !c.o_bias, "qkv_bias defaults to true, o_proj has none");
    CHECK(c.qk_norm == QK_NORM_NONE, "qk_norm");
    CHECK(c.hidden_act == ACT_GELU, "gelu");
    CHECK(c.dtype == HF_DTYPE_BF16, "dtype");
    CHECK(c.rms_norm_eps == 1e-6 && c.max_position_embeddings == 64, "eps, max pos");
    CHECK(c.rope.type == ROPE_DEFAULT && c.rope.theta == 1e6 && c.rope.rotary_dim == 6 &&
              c.rope.attention_scaling == 1.0 && c.rope.layout == ROPE_ROTATE_HALF,
          "rope");
    CHECK(c.router_aux_loss_coef == 0.01 && c.output_router_logits, "aux loss");
    CHECK(c.sliding_window == 0 && !c.is_sliding[0] && !c.is_sliding[1], "no sliding window");
    CHECK(c.bos_token_id == -1 && c.eos_token_id == -1, "token ids absent");
    CHECK(c.initializer_range == 0.02, "initializer_range default");

    /* v4: rope_theta + rope_scaling {type: yarn}, torch_dtype, swish; max_window_layers
     * and use_sliding_window: odd (1-based) layers below max_window_layers slide */
    const char *v4 =
        "{\"model_type\": \"qwen2_moe\", \"torch_dtype\": \"float16\",\n"
        " \"hidden_size\": 32, \"num_hidden_layers\": 3, \"num_attention_heads\": 4,\n"
        " \"num_key_value_heads\": 4, \"vocab_size\": 50, \"intermediate_size\": 20,\n"
        " \"moe_intermediate_size\": 10, \"shared_expert_intermediate_size\": 12,\n"
        " \"num_experts\": 4, \"num_experts_per_tok\": 4, \"hidden_act\": \"swish\",\n"
        " \"qkv_bias\": false, \"max_position_embeddings\": 128,\n"
        " \"use_sliding_window\": true, \"sliding_window\": 16, \"max_window_layers\": 2,\n"
        " \"rope_theta\": 500000.0,\n"
        " \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0,\n"
        "                  \"original_max_position_embeddings\": 32},\n"
        " \"eos_token_id\": [7, 8], \"bos_token_id\": 3}";
    CHECK(load_text(v4, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.dtype == HF_DTYPE_F16 && c.hidden_act == ACT_SILU && !c.qkv_bias, "v4 basics");
    CHECK(c.is_moe[0] && c.is_moe[1] && c.is_moe[2], "decoder_sparse_step 1: all MoE");
    CHECK(c.rope.type == ROPE_YARN && c.rope.theta == 500000.0 && c.rope.factor == 4.0 &&
              c.rope.original_max_position_embeddings == 32,
          "v4 yarn");
    CHECK(c.rope.beta_fast == 32.0 && c.rope.beta_slow == 1.0 && c.rope.truncate &&
              !c.rope.has_attention_factor,
          "yarn defaults");
    /* 0.1 ln 4 + 1 */
    CHECK(check_close(c.rope.attention_scaling, 1.138629436111989, 1e-12, 0),
          "yarn attention scaling %.15g", c.rope.attention_scaling);
    CHECK(c.sliding_window == 16 && c.is_sliding[0] && !c.is_sliding[1] && !c.is_sliding[2],
          "sliding layers %d%d%d", c.is_sliding[0], c.is_sliding[1], c.is_sliding[2]);
    CHECK(c.eos_token_id == 7 && c.bos_token_id == 3, "token ids");
}

static void test_qwen3_moe(void)
{
    char err[1024];
    struct model_config c;
    /* v5 as transformers 5.23 saves it: num_local_experts; explicit head_dim != H/nH;
     * yarn with every optional key */
    const char *v5 =
        "{\"model_type\": \"qwen3_moe\", \"dtype\": \"float32\",\n"
        " \"hidden_size\": 36, \"num_hidden_layers\": 3, \"num_attention_heads\": 4,\n"
        " \"num_key_value_heads\": 2, \"head_dim\": 16, \"vocab_size\": 101,\n"
        " \"intermediate_size\": 30, \"moe_intermediate_size\": 22, \"num_local_experts\": 9,\n"
        " \"num_experts_per_tok\": 3, \"norm_topk_prob\": true, \"attention_bias\": true,\n"
        " \"mlp_only_layers\": [], \"max_position_embeddings\": 256,\n"
        " \"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 20000.0, \"factor\": "
        "2.0,\n"
        "   \"original_max_position_embeddings\": 128, \"beta_fast\": 16, \"beta_slow\": 2,\n"
        "   \"attention_factor\": 0.8, \"truncate\": false},\n"
        " \"sliding_window\": null, \"use_sliding_window\": false}";
    CHECK(load_text(v5, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.family == HF_QWEN3_MOE, "family");
    CHECK(c.head_dim == 16 && c.rope.rotary_dim == 16, "explicit head_dim %d", c.head_dim);
    CHECK(c.num_experts == 9 && c.top_k == 3 && c.norm_topk_prob, "experts");
    CHECK(c.qkv_bias && c.o_bias, "attention_bias covers q, k, v and o");
    CHECK(c.qk_norm == QK_NORM_PER_HEAD, "qk norm per head");
    CHECK(c.num_shared_experts == 0, "no shared expert");
    CHECK(c.is_moe[0] && c.is_moe[1] && c.is_moe[2], "all MoE");
    CHECK(c.intermediate_size == 30 && c.expert_intermediate_size == 22, "widths");
    CHECK(c.rope.type == ROPE_YARN && c.rope.theta == 20000.0 && c.rope.factor == 2.0 &&
              c.rope.original_max_position_embeddings == 128 && c.rope.beta_fast == 16.0 &&
              c.rope.beta_slow == 2.0 && !c.rope.truncate,
          "yarn fields");
    CHECK(c.rope.has_attention_factor && c.rope.attention_scaling == 0.8, "explicit factor");
    CHECK(c.rms_norm_eps == 1e-6, "rms_norm_eps default 1e-6");
    CHECK(c.router_aux_loss_coef == 0.001, "aux default 0.001");
    CHECK(c.dtype == HF_DTYPE_F32, "dtype");

    /* v4: num_experts, rope_theta, torch_dtype; yarn with mscale / mscale_all_dim, and a
     * null factor = max_position / original = 2 */
    const char *v4 =
        "{\"model_type\": \"qwen3_moe\", \"torch_dtype\": \"bfloat16\",\n"
        " \"hidden_size\": 40, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,\n"
        " \"num_key_value_heads\": 4, \"vocab_size\": 64, \"intermediate_size\": 24,\n"
        " \"moe_intermediate_size\": 8, \"num_experts\": 8, \"num_experts_per_tok\": 2,\n"
        " \"rope_theta\": 1000000.0, \"max_position_embeddings\": 64,\n"
        " \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": null,\n"
        "   \"original_max_position_embeddings\": 32, \"mscale\": 1.0, \"mscale_all_dim\": 0.5}}";
    CHECK(load_text(v4, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.num_experts == 8 && c.head_dim == 10 && c.dtype == HF_DTYPE_BF16, "v4 fields");
    CHECK(c.rope.theta == 1e6 && c.rope.factor == 2.0, "factor from lengths %g", c.rope.factor);
    /* (0.1 * 1.0 * ln 2 + 1) / (0.1 * 0.5 * ln 2 + 1) = 1.0693147 / 1.0346574 */
    CHECK(check_close(c.rope.attention_scaling, 1.0693147180559945 / 1.0346573590279973, 1e-12, 0),
          "mscale ratio %.15g", c.rope.attention_scaling);
    CHECK(!c.qkv_bias && !c.norm_topk_prob, "defaults false");

    /* the real model's shape: mscale 1 / mscale_all_dim 0.707 at factor 40 */
    const char *deepseek_style =
        "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 32, \"num_hidden_layers\": 1,\n"
        " \"num_attention_heads\": 2, \"num_key_value_heads\": 2, \"vocab_size\": 10,\n"
        " \"intermediate_size\": 8, \"moe_intermediate_size\": 4, \"num_experts\": 2,\n"
        " \"num_experts_per_tok\": 1, \"rope_parameters\": {\"rope_type\": \"yarn\",\n"
        " \"factor\": 40, \"original_max_position_embeddings\": 4096, \"mscale\": 1.0,\n"
        " \"mscale_all_dim\": 0.707}}";
    CHECK(load_text(deepseek_style, &c, err, sizeof err) == 0, "%s", err);
    CHECK(check_close(c.rope.attention_scaling, 1.0857263992561355, 1e-12, 0), "mscale 40: %.15g",
          c.rope.attention_scaling);
    CHECK(c.rope.theta == 10000.0, "default theta 10000");

    /* both spellings of the expert count must agree */
    const char *both =
        "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 32, \"num_hidden_layers\": 1,"
        " \"num_attention_heads\": 2, \"num_key_value_heads\": 2, \"vocab_size\": 10,"
        " \"intermediate_size\": 8, \"moe_intermediate_size\": 4, \"num_experts\": 4,"
        " \"num_local_experts\": 5, \"num_experts_per_tok\": 1}";
    CHECK(load_text(both, &c, err, sizeof err) != 0 && contains(err, "num_local_experts") &&
              contains(err, "disagree"),
          "disagreeing expert counts: %s", err);
}

static void test_olmoe(void)
{
    char err[1024];
    struct model_config c;
    /* v5; no num_key_value_heads (None -> heads), no rms_norm_eps (1e-5), no
     * router_aux_loss_coef (0.01), no eos_token_id (50279), no pad (1) */
    const char *v5 = "{\"model_type\": \"olmoe\", \"dtype\": \"float32\",\n"
                     " \"hidden_size\": 30, \"num_hidden_layers\": 2, \"num_attention_heads\": 3,\n"
                     " \"vocab_size\": 77, \"intermediate_size\": 14, \"num_experts\": 6,\n"
                     " \"num_experts_per_tok\": 2, \"clip_qkv\": 8.0, \"norm_topk_prob\": false,\n"
                     " \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 10000.0}}";
    CHECK(load_text(v5, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.family == HF_OLMOE && c.num_kv_heads == 3 && c.head_dim == 10, "kv %d, Dh %d",
          c.num_kv_heads, c.head_dim);
    CHECK(c.qk_norm == QK_NORM_WHOLE_PROJECTION && c.clip_qkv == 8.0, "qk norm, clip");
    CHECK(c.expert_intermediate_size == 14 && c.num_experts == 6, "experts");
    CHECK(c.is_moe[0] && c.is_moe[1], "every olmoe layer is MoE");
    CHECK(c.rms_norm_eps == 1e-5 && c.router_aux_loss_coef == 0.01, "olmoe defaults");
    CHECK(c.eos_token_id == 50279 && c.pad_token_id == 1 && c.bos_token_id == -1,
          "olmoe token defaults");
    CHECK(!c.qkv_bias && !c.o_bias && !c.norm_topk_prob, "no biases");
    CHECK(c.max_position_embeddings == 4096, "max pos default 4096");

    /* v4: num_key_value_heads null -> heads; num_local_experts alias; linear rope */
    const char *v4 =
        "{\"model_type\": \"olmoe\", \"torch_dtype\": \"float32\",\n"
        " \"hidden_size\": 32, \"num_hidden_layers\": 1, \"num_attention_heads\": 4,\n"
        " \"num_key_value_heads\": null, \"vocab_size\": 50, \"intermediate_size\": 8,\n"
        " \"num_local_experts\": 4, \"num_experts_per_tok\": 2, \"clip_qkv\": null,\n"
        " \"rope_theta\": 10000.0, \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}}";
    CHECK(load_text(v4, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.num_kv_heads == 4 && c.num_experts == 4 && c.clip_qkv == 0, "v4 olmoe");
    CHECK(c.rope.type == ROPE_LINEAR && c.rope.factor == 2.0 && c.rope.attention_scaling == 1.0,
          "linear rope");
}

static void test_mixtral(void)
{
    char err[1024];
    struct model_config c;
    /* v5; head_dim null -> H/nH; no rope_parameters -> default_theta 1e6; sliding window */
    const char *v5 =
        "{\"model_type\": \"mixtral\", \"dtype\": \"bfloat16\",\n"
        " \"hidden_size\": 32, \"num_hidden_layers\": 3, \"num_attention_heads\": 4,\n"
        " \"num_key_value_heads\": 2, \"head_dim\": null, \"vocab_size\": 101,\n"
        " \"intermediate_size\": 22, \"num_local_experts\": 5, \"num_experts_per_tok\": 2,\n"
        " \"sliding_window\": 7, \"router_jitter_noise\": 0.0, \"tie_word_embeddings\": true}";
    CHECK(load_text(v5, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.family == HF_MIXTRAL && c.head_dim == 8 && c.num_experts == 5, "mixtral fields");
    CHECK(c.norm_topk_prob, "mixtral always renormalises");
    CHECK(c.expert_intermediate_size == 22, "expert width = intermediate_size");
    CHECK(c.rope.theta == 1e6 && c.rope.type == ROPE_DEFAULT, "default theta 1e6: %g",
          c.rope.theta);
    CHECK(c.sliding_window == 7 && c.is_sliding[0] && c.is_sliding[2], "sliding window");
    CHECK(c.tie_word_embeddings, "tied");
    CHECK(c.is_moe[0] && c.is_moe[1] && c.is_moe[2], "all MoE");
    CHECK(c.bos_token_id == 1 && c.eos_token_id == 2, "mixtral token defaults");
    CHECK(c.rms_norm_eps == 1e-5 && c.max_position_embeddings == 131072, "mixtral defaults");
    CHECK(c.qk_norm == QK_NORM_NONE && !c.qkv_bias && !c.o_bias, "plain attention");

    /* v4 as the fixture generator writes it: rope_scaling null, rope_theta, torch_dtype;
     * "norm_topk_prob": false is ignored (MixtralTopKRouter always renormalises) */
    const char *v4 =
        "{\"model_type\": \"mixtral\", \"torch_dtype\": \"float32\",\n"
        " \"hidden_size\": 36, \"num_hidden_layers\": 3, \"num_attention_heads\": 4,\n"
        " \"num_key_value_heads\": 2, \"head_dim\": 14, \"vocab_size\": 101,\n"
        " \"intermediate_size\": 22, \"num_local_experts\": 7, \"num_experts_per_tok\": 2,\n"
        " \"rope_scaling\": null, \"rope_theta\": 10000.0, \"sliding_window\": null,\n"
        " \"norm_topk_prob\": false, \"hidden_act\": \"silu\"}";
    CHECK(load_text(v4, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.head_dim == 14 && c.rope.theta == 10000.0 && c.sliding_window == 0 &&
              !c.is_sliding[0] && c.norm_topk_prob && c.dtype == HF_DTYPE_F32,
          "v4 mixtral");
}

/* ---- bad configs ------------------------------------------------------------------- */

/* A valid qwen3_moe config with one replacement: "KEY": VALUE, or KEY removed when VALUE
 * is NULL. */
/* A config.json text from keys[n][2] (name, JSON value) with key's value replaced by
 * value (NULL: the key removed; a key not in the list: added). */
static void config_text(const char *const (*keys)[2], size_t n, const char *key,
                        const char *value, char *text, size_t size)
{
    size_t used = (size_t)snprintf(text, size, "{");
    int first = 1, replaced = 0;
    for (size_t i = 0; i < n; i++) {
        const char *v = keys[i][1];
        if (strcmp(keys[i][0], key) == 0) {
            replaced = 1;
            if (!value) continue;
            v = value;
        }
        used += (size_t)snprintf(text + used, size - used, "%s\"%s\": %s", first ? "" : ", ",
                                 keys[i][0], v);
        first = 0;
    }
    if (!replaced && value) used += (size_t)snprintf(text + used, size - used, ", \"%s\": %s", key, value);
    snprintf(text + used, size - used, "}");
}

static void bad_config(const char *key, const char *value, const char *what, const char *part1,
                       const char *part2)
{
    static const char *const keys[][2] = {
        {"model_type", "\"qwen3_moe\""}, {"hidden_size", "32"},          {"num_hidden_layers", "2"},
        {"num_attention_heads", "4"},    {"num_key_value_heads", "2"},   {"vocab_size", "50"},
        {"intermediate_size", "16"},     {"moe_intermediate_size", "8"}, {"num_experts", "4"},
        {"num_experts_per_tok", "2"},
    };
    char text[2048];
    config_text(keys, sizeof keys / sizeof keys[0], key, value, text, sizeof text);
    char err[1024] = "";
    struct model_config c;
    CHECK(load_text(text, &c, err, sizeof err) != 0, "%s: accepted", what);
    CHECK(contains(err, "config.json: "), "%s: message lacks the file: %s", what, err);
    CHECK(!part1 || contains(err, part1), "%s: message lacks '%s': %s", what, part1, err);
    CHECK(!part2 || contains(err, part2), "%s: message lacks '%s': %s", what, part2, err);
}

/* A small deepseek_v2 config with one key replaced (value NULL: removed). */
static int deepseek_config(const char *key, const char *value, struct model_config *c, char *err,
                           size_t err_size)
{
    static const char *const keys[][2] = {
        {"model_type", "\"deepseek_v2\""}, {"hidden_size", "32"},       {"num_hidden_layers", "3"},
        {"num_attention_heads", "4"},       {"vocab_size", "50"},        {"intermediate_size", "24"},
        {"moe_intermediate_size", "8"},     {"n_routed_experts", "8"},   {"num_experts_per_tok", "2"},
        {"n_shared_experts", "2"},          {"first_k_dense_replace", "1"}, {"kv_lora_rank", "12"},
        {"q_lora_rank", "null"},            {"qk_nope_head_dim", "6"},   {"qk_rope_head_dim", "4"},
        {"v_head_dim", "8"},                {"topk_method", "\"group_limited_greedy\""},
        {"n_group", "4"},                   {"topk_group", "2"},         {"routed_scaling_factor", "1.5"},
        {"norm_topk_prob", "true"},
    };
    char text[2048];
    config_text(keys, sizeof keys / sizeof keys[0], key, value, text, sizeof text);
    return load_text(text, c, err, err_size);
}

static void test_deepseek_glm(void)
{
    struct model_config c;
    char err[512];
    CHECK(deepseek_config("", NULL, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.attention == ATTENTION_MLA && c.rope.layout == ROPE_INTERLEAVED, "deepseek_v2: MLA");
    CHECK(c.head_dim == 4 && c.rope.rotary_dim == 4 && c.num_kv_heads == 4,
          "rotary width qk_rope_head_dim, a key and value per head: %d %d %d", c.head_dim,
          c.rope.rotary_dim, c.num_kv_heads);
    CHECK(c.router == ROUTER_GROUPED_GREEDY && c.n_group == 4 && c.topk_group == 2,
          "group-limited greedy");
    /* DeepseekV2TopkRouter never renormalises, whatever norm_topk_prob says */
    CHECK(c.norm_topk_prob && !c.renormalise && c.routed_scaling_factor == 1.5, "no renormalising");
    CHECK(!c.is_moe[0] && c.is_moe[1] && c.is_moe[2], "first_k_dense_replace 1");
    CHECK(c.num_shared_experts == 2 && c.shared_expert_intermediate_size == 16,
          "shared width = moe_intermediate_size x n_shared_experts");
    uint64_t params, tensors;
    CHECK(hfconfig_count(&c, &params, &tensors) == 0, "count");
    /* embed + lm_head 2*50*32, final norm 32; per layer: norms 64, q_proj 40*32, kv_a 16*32,
     * kv_a_layernorm 12, kv_b 56*12, o 32*32; dense layer 3*24*32; MoE layers: router
     * 8*32, experts 8*3*8*32, shared 3*16*32 */
    uint64_t attention = 64 + 1280 + 512 + 12 + 672 + 1024;
    uint64_t expected = 3200 + 32 + 3 * attention + 2304 + 2 * (256 + 6144 + 1536);
    CHECK(params == expected, "parameters %llu, expected %llu", (unsigned long long)params,
          (unsigned long long)expected);

    struct {
        const char *key, *value, *message;
    } bad[] = {
        {"kv_lora_rank", NULL, "missing required key 'kv_lora_rank'"},
        {"q_lora_rank", NULL, "missing required key 'q_lora_rank'"},
        {"topk_group", "5", "key 'topk_group': 5 must be in [1, n_group = 4]"},
        {"n_group", "3", "key 'n_group': 3 groups do not divide the 8 experts (n_routed_experts)"},
        {"num_experts_per_tok", "5", "key 'num_experts_per_tok': 5 exceeds the 4 experts"},
        {"topk_method", "\"noaux_tc\"", "key 'topk_method': 'noaux_tc' is not supported"},
        {"qk_rope_head_dim", "3", "key 'qk_rope_head_dim': 3 is odd"},
        {"v_head_dim", "0", "key 'v_head_dim': must be positive"},
        {"moe_layer_freq", "2", "key 'moe_layer_freq': 2 is not supported"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        CHECK(deepseek_config(bad[i].key, bad[i].value, &c, err, sizeof err) != 0 &&
                  contains(err, bad[i].message) && contains(err, "config.json"),
              "%s: message '%s' lacks '%s'", bad[i].key, err, bad[i].message);
    }

    /* deepseek_v3 and glm4_moe: sigmoid routers; groups of one expert cannot be scored */
    const char *v3 =
        "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 32, \"num_hidden_layers\": 2,\n"
        " \"num_attention_heads\": 4, \"vocab_size\": 50, \"intermediate_size\": 24,\n"
        " \"moe_intermediate_size\": 8, \"n_routed_experts\": 8, \"num_experts_per_tok\": 2,\n"
        " \"kv_lora_rank\": 12, \"q_lora_rank\": 16, \"qk_nope_head_dim\": 6,\n"
        " \"qk_rope_head_dim\": 4, \"v_head_dim\": 8, \"n_group\": 8, \"topk_group\": 2,\n"
        " \"rope_interleave\": false}";
    CHECK(load_text(v3, &c, err, sizeof err) != 0 && contains(err, "groups of 1 expert(s)"),
          "v3 single-expert groups: %s", err);
    const char *glm =
        "{\"model_type\": \"glm4_moe\", \"hidden_size\": 32, \"num_hidden_layers\": 2,\n"
        " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 12,\n"
        " \"vocab_size\": 50, \"intermediate_size\": 24, \"moe_intermediate_size\": 8,\n"
        " \"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"use_qk_norm\": true,\n"
        " \"attention_bias\": true, \"num_nextn_predict_layers\": 1}";
    CHECK(load_text(glm, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.router == ROUTER_SIGMOID_BIAS && c.renormalise && c.first_k_dense_replace == 1,
          "glm4_moe class defaults: sigmoid router, norm_topk_prob, first layer dense");
    CHECK(c.rope.partial_rotary_factor == 0.5 && c.rope.rotary_dim == 6,
          "glm4_moe: partial_rotary_factor 0.5 when absent: rotary %d", c.rope.rotary_dim);
    CHECK(c.qk_norm == QK_NORM_PER_HEAD && c.qkv_bias && !c.o_bias && c.num_mtp_layers == 1,
          "glm4_moe attention: qk norm per head, q/k/v bias, no o bias");
}

static void test_bad_configs(void)
{
    bad_config("model_type", "\"llama\"", "unknown family", "unknown model_type 'llama'",
               "supported: qwen2_moe, qwen3_moe, olmoe, mixtral");
    bad_config("model_type", "\"grok\"", "grok",
               "unknown model_type 'grok' (supported: qwen2_moe, qwen3_moe, olmoe, mixtral, "
               "deepseek_v2, deepseek_v3, glm4_moe, gpt_oss)",
               NULL);
    bad_config("quantization_config", "{\"quant_method\": \"mxfp4\"}", "mxfp4 on qwen3_moe",
               "'mxfp4' is only supported for gpt_oss", NULL);
    /* the qwen3 keys do not make a deepseek or glm config: their expert count is named */
    bad_config("model_type", "\"deepseek_v3\"", "deepseek_v3",
               "missing required key 'n_routed_experts'", NULL);
    bad_config("model_type", "\"glm4_moe\"", "glm4_moe", "missing required key 'n_routed_experts'",
               NULL);
    bad_config("model_type", NULL, "no model_type", "missing required key 'model_type'", NULL);
    bad_config("model_type", "3", "model_type not string", "key 'model_type'", "got integer");
    bad_config("hidden_size", NULL, "missing hidden_size", "missing required key 'hidden_size'",
               NULL);
    bad_config("num_experts", NULL, "missing experts", "missing required key 'num_experts'", NULL);
    bad_config("num_experts_per_tok", "\"2\"", "top-k as string",
               "config.json: key 'num_experts_per_tok': expected an integer, got string", NULL);
    bad_config("hidden_size", "32.5", "real size",
               "key 'hidden_size': expected an integer, got "
               "real number",
               NULL);
    bad_config("num_key_value_heads", "3", "heads not divisible",
               "key 'num_attention_heads': 4 is not divisible by num_key_value_heads (3)", NULL);
    bad_config("num_experts_per_tok", "5", "top_k > E", "key 'num_experts_per_tok'",
               "exceeds the number of experts (4)");
    bad_config("hidden_size", "0", "zero hidden", "key 'hidden_size': must be positive", NULL);
    bad_config("vocab_size", "-3", "negative vocab", "key 'vocab_size': must be positive", NULL);
    bad_config("num_key_value_heads", "0", "zero kv heads", "key 'num_key_value_heads'",
               "positive");
    bad_config("head_dim", "9", "odd head_dim", "key 'head_dim': 9", "is odd");
    bad_config("hidden_act", "\"relu\"", "relu", "key 'hidden_act': 'relu' is not supported",
               "silu, swish, gelu");
    bad_config("hidden_act", "\"gelu_pytorch_tanh\"", "tanh gelu", "'gelu_pytorch_tanh'", NULL);
    bad_config("dtype", "\"int8\"", "int8 dtype", "key 'dtype': 'int8' is not supported", NULL);
    bad_config("rope_parameters", "{\"rope_type\": \"dynamic\", \"factor\": 2.0}", "dynamic rope",
               "key 'rope_parameters.rope_type': 'dynamic' is not supported", NULL);
    bad_config("rope_parameters", "{\"rope_type\": \"yarn\"}", "yarn without factor",
               "missing required key 'rope_parameters.factor'", NULL);
    bad_config("rope_parameters", "[1]", "rope not object", "key 'rope_parameters'",
               "expected an object, got array");
    bad_config("rope_scaling", "{\"type\": \"yarn\", \"factor\": \"4\"}", "factor as string",
               "key 'rope_scaling.factor': expected a number, got string", NULL);
    bad_config("rope_theta", "\"1e4\"", "theta as string", "key 'rope_theta'", "got string");
    bad_config("mlp_only_layers", "{}", "mlp_only_layers object", "key 'mlp_only_layers'",
               "expected an array");
    bad_config("mlp_only_layers", "[1, \"x\"]", "mlp_only_layers entry", "key 'mlp_only_layers'",
               "entry 1");
    bad_config("norm_topk_prob", "1", "bool as int", "key 'norm_topk_prob': expected a boolean",
               "got integer");
    bad_config("decoder_sparse_step", "0", "sparse step 0", "key 'decoder_sparse_step'",
               "positive");
    bad_config("num_hidden_layers", "100000", "too many layers", "key 'num_hidden_layers'",
               "limit");
    bad_config("partial_rotary_factor", "0.5", "partial rotary", "partial_rotary_factor", NULL);
    /* sizes no real model has, refused by name before anything is sized from them */
    bad_config("hidden_size", "2147483647", "hidden_size 2^31-1",
               "key 'hidden_size': 2147483647 exceeds esft's limit of 65536", NULL);
    bad_config("num_experts", "2147483647", "num_experts 2^31-1",
               "key 'num_experts': 2147483647 exceeds esft's limit of 4096", NULL);
    bad_config("vocab_size", "2147483647", "vocab_size 2^31-1",
               "key 'vocab_size': 2147483647 exceeds esft's limit of 4194304", NULL);
    bad_config("moe_intermediate_size", "1000000", "expert width 10^6",
               "key 'moe_intermediate_size': 1000000 exceeds esft's limit of 262144", NULL);
    bad_config("num_key_value_heads", "4096", "4096 kv heads", "key 'num_key_value_heads'",
               "limit");
    bad_config("head_dim", "4096", "head_dim 4096", "key 'head_dim'", "limit");
    bad_config("rms_norm_eps", "0", "zero eps", "key 'rms_norm_eps'", "positive");

    char err[1024] = "";
    struct model_config c;
    CHECK(load_text("{\"model_type\": ", &c, err, sizeof err) != 0 &&
              contains(err, "config.json") && contains(err, "not valid JSON"),
          "bad JSON: %s", err);
    CHECK(load_text("[1, 2]", &c, err, sizeof err) != 0 && contains(err, "expected a JSON object"),
          "array config: %s", err);
    /* Each size within its limit, their products not: 3 x 4096 experts x 262144 x 65536
     * per layer over 512 layers is 1.1e17 parameters (the parameter table's sum of sizes
     * would pass 2^64 with a few sizes more); 512 layers x 4096 experts of tiny matrices
     * are 6.3 million tensors. */
    CHECK(load_text("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 65536, "
                    "\"num_hidden_layers\": 512, \"num_attention_heads\": 64, "
                    "\"num_key_value_heads\": 8, \"vocab_size\": 4194304, "
                    "\"intermediate_size\": 262144, \"moe_intermediate_size\": 262144, "
                    "\"num_experts\": 4096, \"num_experts_per_tok\": 8}",
                    &c, err, sizeof err) != 0 &&
              contains(err, "config.json: the sizes (hidden_size 65536, num_hidden_layers 512, "
                            "num_experts 4096, moe_intermediate_size 262144") &&
              contains(err, "more than esft's limit of 2.199e+12 (2^41)"),
          "sizes whose product passes the parameter limit: %s", err);
    CHECK(load_text("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 32, "
                    "\"num_hidden_layers\": 512, \"num_attention_heads\": 4, "
                    "\"num_key_value_heads\": 2, \"vocab_size\": 50, "
                    "\"intermediate_size\": 16, \"moe_intermediate_size\": 8, "
                    "\"num_experts\": 4096, \"num_experts_per_tok\": 2}",
                    &c, err, sizeof err) != 0 &&
              contains(err, "config.json: num_hidden_layers 512 and num_experts 4096 give "
                            "6296067 tensors") &&
              contains(err, "limit of 1048576"),
          "too many tensors: %s", err);

    char missing[128];
    snprintf(missing, sizeof missing, "%s/no-such-dir", tmpdir);
    CHECK(hfconfig_load(missing, &c, err, sizeof err) != 0 && contains(err, "config.json") &&
              contains(err, "cannot open"),
          "missing file: %s", err);
}

/* ---- write -> load ----------------------------------------------------------------- */

static void expect_same(const struct model_config *a, const struct model_config *b,
                        const char *what)
{
    CHECK(a->family == b->family && strcmp(a->architecture, b->architecture) == 0, "%s: family",
          what);
    CHECK(a->hidden_size == b->hidden_size && a->num_layers == b->num_layers &&
              a->num_heads == b->num_heads && a->num_kv_heads == b->num_kv_heads &&
              a->head_dim == b->head_dim && a->vocab_size == b->vocab_size,
          "%s: sizes", what);
    CHECK(a->intermediate_size == b->intermediate_size &&
              a->expert_intermediate_size == b->expert_intermediate_size &&
              a->shared_expert_intermediate_size == b->shared_expert_intermediate_size &&
              a->num_shared_experts == b->num_shared_experts,
          "%s: widths", what);
    CHECK(a->num_experts == b->num_experts && a->top_k == b->top_k &&
              a->norm_topk_prob == b->norm_topk_prob && a->router == b->router,
          "%s: routing", what);
    CHECK(a->qkv_bias == b->qkv_bias && a->o_bias == b->o_bias && a->qk_norm == b->qk_norm &&
              a->clip_qkv == b->clip_qkv,
          "%s: attention", what);
    CHECK(a->rms_norm_eps == b->rms_norm_eps && a->tie_word_embeddings == b->tie_word_embeddings &&
              a->hidden_act == b->hidden_act && a->dtype == b->dtype &&
              a->max_position_embeddings == b->max_position_embeddings &&
              a->initializer_range == b->initializer_range,
          "%s: misc", what);
    CHECK(a->bos_token_id == b->bos_token_id && a->eos_token_id == b->eos_token_id &&
              a->pad_token_id == b->pad_token_id,
          "%s: token ids", what);
    CHECK(a->router_aux_loss_coef == b->router_aux_loss_coef &&
              a->output_router_logits == b->output_router_logits &&
              a->router_jitter_noise == b->router_jitter_noise,
          "%s: aux", what);
    CHECK(a->decoder_sparse_step == b->decoder_sparse_step &&
              a->num_mlp_only_layers == b->num_mlp_only_layers &&
              memcmp(a->mlp_only_layers, b->mlp_only_layers,
                     sizeof(int) * (size_t)a->num_mlp_only_layers) == 0,
          "%s: sparse layout", what);
    CHECK(memcmp(a->is_moe, b->is_moe, sizeof a->is_moe) == 0 &&
              memcmp(a->is_sliding, b->is_sliding, sizeof a->is_sliding) == 0 &&
              a->sliding_window == b->sliding_window,
          "%s: per-layer kinds", what);
    CHECK(a->attention_sinks == b->attention_sinks && a->router_bias == b->router_bias &&
              a->expert_bias == b->expert_bias && a->clamped_swiglu == b->clamped_swiglu &&
              a->swiglu_alpha == b->swiglu_alpha && a->swiglu_limit == b->swiglu_limit &&
              a->renormalise == b->renormalise && a->aux == b->aux,
          "%s: gpt_oss's sinks, biases and clamped SwiGLU", what);
    const struct hf_rope *p = &a->rope, *q = &b->rope;
    CHECK(p->type == q->type && p->theta == q->theta && p->factor == q->factor &&
              p->original_max_position_embeddings == q->original_max_position_embeddings &&
              p->beta_fast == q->beta_fast && p->beta_slow == q->beta_slow &&
              p->has_attention_factor == q->has_attention_factor &&
              p->attention_factor == q->attention_factor && p->mscale == q->mscale &&
              p->mscale_all_dim == q->mscale_all_dim && p->truncate == q->truncate &&
              p->rotary_dim == q->rotary_dim && p->attention_scaling == q->attention_scaling,
          "%s: rope", what);
}

static void round_trip(const char *dir_in, const char *what)
{
    char err[1024];
    struct model_config a, b;
    if (hfconfig_load(dir_in, &a, err, sizeof err) != 0) {
        CHECK(0, "%s: %s", what, err);
        return;
    }
    char out[256];
    snprintf(out, sizeof out, "%s/rt%03d", tmpdir, dir_counter++);
    mkdir(out, 0755);
    CHECK(hfconfig_write(out, &a, err, sizeof err) == 0, "%s: write: %s", what, err);
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s/config.json.tmp", out);
    CHECK(access(tmp, F_OK) != 0, "%s: temporary file left", what);
    CHECK(hfconfig_load(out, &b, err, sizeof err) == 0, "%s: reload: %s", what, err);
    expect_same(&a, &b, what);
}

/* gpt_oss: the class defaults of GptOssConfig (5.24) where keys are absent, and what
 * __post_init__ derives: layer_types sliding at even layers, the yarn rope only when
 * rope_parameters is absent, head_dim 64 unless null. */
static void test_gpt_oss(void)
{
    char err[1024];
    struct model_config c;
    const char *bare =
        "{\"model_type\": \"gpt_oss\", \"hidden_size\": 32, \"num_hidden_layers\": 3,\n"
        " \"num_attention_heads\": 16, \"vocab_size\": 50, \"intermediate_size\": 16,\n"
        " \"num_local_experts\": 4, \"num_experts_per_tok\": 2}\n";
    CHECK(load_text(bare, &c, err, sizeof err) == 0, "gpt_oss: %s", err);
    CHECK(c.family == HF_GPT_OSS && c.head_dim == 64 && c.num_kv_heads == 8,
          "gpt_oss class defaults: head_dim %d (64), kv heads %d (8)", c.head_dim, c.num_kv_heads);
    CHECK(c.expert_intermediate_size == 16 && c.num_experts == 4 && c.top_k == 2,
          "gpt_oss experts: width intermediate_size");
    CHECK(c.qkv_bias && c.o_bias && c.attention_sinks && c.router_bias && c.expert_bias,
          "gpt_oss: attention_bias covers q, k, v and o; sinks; router and expert biases");
    CHECK(c.router == ROUTER_TOPK_SOFTMAX && c.aux == AUX_GLOBAL && c.clamped_swiglu &&
              c.swiglu_alpha == 1.702 && c.swiglu_limit == 7.0 && c.router_aux_loss_coef == 0.001,
          "gpt_oss router and activation");
    CHECK(c.sliding_window == 128 && c.is_sliding[0] && !c.is_sliding[1] && c.is_sliding[2],
          "gpt_oss: window 128 on the even layers");
    CHECK(c.rope.type == ROPE_YARN && c.rope.factor == 32.0 && c.rope.theta == 150000.0 &&
              !c.rope.truncate && c.rope.original_max_position_embeddings == 4096 &&
              c.rope.beta_fast == 32.0 && c.rope.beta_slow == 1.0,
          "gpt_oss default rope: yarn, factor 32, theta 150000, truncate false");
    CHECK(fabs(c.rope.attention_scaling - (0.1 * log(32.0) + 1.0)) < 1e-12, "yarn mscale");
    CHECK(c.is_moe[0] && c.is_moe[1] && c.is_moe[2] && !c.quantization.mxfp4, "every layer MoE");

    const char *given =
        "{\"model_type\": \"gpt_oss\", \"hidden_size\": 32, \"num_hidden_layers\": 2,\n"
        " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": null,\n"
        " \"vocab_size\": 50, \"intermediate_size\": 16, \"num_experts\": 4,\n"
        " \"num_experts_per_tok\": 2, \"sliding_window\": 4, \"attention_bias\": false,\n"
        " \"layer_types\": [\"full_attention\", \"sliding_attention\"],\n"
        " \"swiglu_alpha\": 1.5, \"swiglu_limit\": 3.0,\n"
        " \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4.0, \"rope_theta\": 1000.0,\n"
        "   \"original_max_position_embeddings\": 64},\n"
        " \"quantization_config\": {\"quant_method\": \"mxfp4\", \"modules_to_not_convert\": []}}\n";
    CHECK(load_text(given, &c, err, sizeof err) == 0, "gpt_oss: %s", err);
    CHECK(c.head_dim == 8 && c.num_kv_heads == 2 && !c.qkv_bias && !c.o_bias,
          "gpt_oss: null head_dim is hidden / heads (%d); attention_bias false", c.head_dim);
    CHECK(c.sliding_window == 4 && !c.is_sliding[0] && c.is_sliding[1], "gpt_oss layer_types");
    CHECK(c.swiglu_alpha == 1.5 && c.swiglu_limit == 3.0, "gpt_oss swiglu keys");
    CHECK(c.rope.type == ROPE_YARN && c.rope.factor == 4.0 && c.rope.theta == 1000.0 &&
              c.rope.truncate && c.rope.original_max_position_embeddings == 64,
          "gpt_oss: a given rope dict as any other (truncate true when absent)");
    CHECK(c.quantization.mxfp4 && !c.quantization.fp8, "mxfp4 quantization_config");
    round_trip(config_dir(given), "gpt_oss given keys");
    round_trip(config_dir(bare), "gpt_oss class defaults");
    const char *no_window =
        "{\"model_type\": \"gpt_oss\", \"hidden_size\": 32, \"num_hidden_layers\": 2,\n"
        " \"num_attention_heads\": 4, \"vocab_size\": 50, \"intermediate_size\": 16,\n"
        " \"num_key_value_heads\": 2, \"num_local_experts\": 4, \"num_experts_per_tok\": 2,\n"
        " \"sliding_window\": null,\n"
        " \"tie_word_embeddings\": true, \"eos_token_id\": [7, 8],\n"
        " \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 8.0, \"rope_theta\": 500.0,\n"
        "   \"original_max_position_embeddings\": 32, \"truncate\": true}}\n";
    round_trip(config_dir(no_window), "gpt_oss without a window");
}

static void test_round_trips(void)
{
    round_trip(config_dir(qwen2_v5), "qwen2_moe v5");
    const char *yarn_qwen3 =
        "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 36, \"num_hidden_layers\": 3,\n"
        " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 16,\n"
        " \"vocab_size\": 101, \"intermediate_size\": 30, \"moe_intermediate_size\": 22,\n"
        " \"num_experts\": 9, \"num_experts_per_tok\": 3, \"attention_bias\": true,\n"
        " \"mlp_only_layers\": [0], \"decoder_sparse_step\": 1, \"max_position_embeddings\": 256,\n"
        " \"use_sliding_window\": true, \"sliding_window\": 5,\n"
        " \"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 20000.0, \"factor\": "
        "2.0,\n"
        "   \"original_max_position_embeddings\": 128, \"beta_fast\": 16, \"mscale\": 0.9,\n"
        "   \"mscale_all_dim\": 0.7, \"truncate\": false}}";
    round_trip(config_dir(yarn_qwen3), "qwen3_moe yarn");
    const char *olmoe =
        "{\"model_type\": \"olmoe\", \"hidden_size\": 30, \"num_hidden_layers\": 2,\n"
        " \"num_attention_heads\": 3, \"vocab_size\": 77, \"intermediate_size\": 14,\n"
        " \"num_experts\": 6, \"num_experts_per_tok\": 2, \"clip_qkv\": 8.0,\n"
        " \"rope_scaling\": {\"type\": \"linear\", \"factor\": 3.0}}";
    round_trip(config_dir(olmoe), "olmoe");
    const char *mixtral =
        "{\"model_type\": \"mixtral\", \"hidden_size\": 32, \"num_hidden_layers\": 3,\n"
        " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 101,\n"
        " \"intermediate_size\": 22, \"num_local_experts\": 5,\n"
        " \"num_experts_per_tok\": 2, \"sliding_window\": 7, \"torch_dtype\": \"float16\"}";
    round_trip(config_dir(mixtral), "mixtral");

    /* a config built in memory from defaults, as the init phase will */
    struct model_config c, d;
    char err[1024];
    hfconfig_defaults(HF_QWEN2_MOE, &c);
    c.hidden_size = 24;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 6;
    c.num_layers = 2;
    c.vocab_size = 33;
    c.num_experts = 5;
    c.top_k = 2;
    c.dtype = HF_DTYPE_BF16;
    CHECK(hfconfig_finish(&c, "built", err, sizeof err) == 0, "%s", err);
    CHECK(c.is_moe[0] && c.is_moe[1] && !c.is_moe[2], "is_moe from finish");
    char out[256];
    snprintf(out, sizeof out, "%s/built", tmpdir);
    mkdir(out, 0755);
    CHECK(hfconfig_write(out, &c, err, sizeof err) == 0, "%s", err);
    CHECK(hfconfig_load(out, &d, err, sizeof err) == 0, "%s", err);
    expect_same(&c, &d, "built qwen2_moe");
    CHECK(d.expert_intermediate_size == 1408 && d.shared_expert_intermediate_size == 5632,
          "qwen2_moe class defaults 1408 / 5632");

    /* the class defaults of the deepseek, glm and gpt_oss families survive a write and a
     * load */
    const enum hf_family written[] = {HF_DEEPSEEK_V2, HF_DEEPSEEK_V3, HF_GLM4_MOE, HF_GPT_OSS};
    for (size_t i = 0; i < sizeof written / sizeof written[0]; i++) {
        hfconfig_defaults(written[i], &c);
        CHECK(hfconfig_finish(&c, "defaults", err, sizeof err) == 0, "%s", err);
        CHECK(hfconfig_write(out, &c, err, sizeof err) == 0, "%s", err);
        CHECK(hfconfig_load(out, &d, err, sizeof err) == 0, "%s", err);
        expect_same(&c, &d, hfconfig_family_name(written[i]));
        CHECK(d.attention == c.attention && d.q_lora_rank == c.q_lora_rank &&
                  d.kv_lora_rank == c.kv_lora_rank && d.qk_nope_head_dim == c.qk_nope_head_dim &&
                  d.qk_rope_head_dim == c.qk_rope_head_dim && d.v_head_dim == c.v_head_dim &&
                  d.rope.layout == c.rope.layout && d.n_group == c.n_group &&
                  d.topk_group == c.topk_group && d.first_k_dense_replace == c.first_k_dense_replace &&
                  d.routed_scaling_factor == c.routed_scaling_factor &&
                  d.num_mtp_layers == c.num_mtp_layers && d.renormalise == c.renormalise &&
                  d.rope.partial_rotary_factor == c.rope.partial_rotary_factor,
              "%s: MLA, routing and rotary fields", hfconfig_family_name(written[i]));
    }
}

static void test_names_and_hash(void)
{
    CHECK(strcmp(hfconfig_family_name(HF_QWEN2_MOE), "qwen2_moe") == 0, "name");
    CHECK(strcmp(hfconfig_family_name(HF_MIXTRAL), "mixtral") == 0, "name");
    CHECK(strcmp(hfconfig_family_name(HF_DEEPSEEK_V3), "deepseek_v3") == 0, "name");
    enum hf_family f;
    CHECK(hfconfig_family_parse("olmoe", &f) == 0 && f == HF_OLMOE, "parse olmoe");
    CHECK(hfconfig_family_parse("llama", &f) != 0, "parse llama");
    /* FNV-1a 64 test vectors (Fowler/Noll/Vo): "" -> offset basis, "a" -> af63dc4c8601ec8c */
    CHECK(hfconfig_fnv1a64("", 0) == 0xcbf29ce484222325ULL, "fnv empty");
    CHECK(hfconfig_fnv1a64("a", 1) == 0xaf63dc4c8601ec8cULL, "fnv a");
    CHECK(hfconfig_fnv1a64("foobar", 6) == 0x85944171f73967e8ULL, "fnv foobar");
    struct model_config c;
    char err[1024];
    CHECK(load_text(qwen2_v5, &c, err, sizeof err) == 0, "%s", err);
    CHECK(c.hash == hfconfig_fnv1a64(qwen2_v5, strlen(qwen2_v5)), "config hash");
}

/* ---- golden fixtures --------------------------------------------------------------- */

static void test_golden(const char *golden)
{
    DIR *d = opendir(golden);
    if (!d) {
        printf("test_hfconfig: no fixtures at %s, golden checks skipped\n", golden);
        return;
    }
    int fixtures = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char dir[1024], probe[1100];
        snprintf(dir, sizeof dir, "%s/%s", golden, e->d_name);
        snprintf(probe, sizeof probe, "%s/config.json", dir);
        if (access(probe, F_OK) != 0) continue;
        fixtures++;
        char err[2048];
        struct model_config c;
        if (hfconfig_load(dir, &c, err, sizeof err) != 0) {
            CHECK(0, "fixture %s: %s", dir, err);
            continue;
        }
        /* fixture directories are named after their family (init_qwen2_moe included) */
        CHECK(strstr(e->d_name, c.model_type) != NULL, "fixture %s: model_type %s", e->d_name,
              c.model_type);
        round_trip(dir, e->d_name);

        struct st_checkpoint *ck = st_checkpoint_open(dir, err, sizeof err);
        CHECK(ck != NULL, "fixture %s: %s", dir, err);
        if (!ck) continue;
        const struct st_tensor *t = st_get(ck, "model.embed_tokens.weight", err, sizeof err);
        CHECK(t && st_expect_shape(t, err, sizeof err, c.vocab_size, c.hidden_size) == 0,
              "fixture %s: %s", dir, err);
        for (int l = 0; l < c.num_layers; l++) {
            char name[128];
            if (c.attention == ATTENTION_MLA) { /* the query width is nope + rope per head */
                int64_t qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
                snprintf(name, sizeof name, c.q_lora_rank ? "model.layers.%d.self_attn.q_b_proj.weight"
                                                          : "model.layers.%d.self_attn.q_proj.weight", l);
                t = st_get(ck, name, err, sizeof err);
                CHECK(t && st_expect_shape(t, err, sizeof err, c.num_heads * qk,
                                           c.q_lora_rank ? c.q_lora_rank : c.hidden_size) == 0,
                      "fixture %s: %s", dir, err);
                snprintf(name, sizeof name, "model.layers.%d.self_attn.kv_b_proj.weight", l);
                t = st_get(ck, name, err, sizeof err);
                CHECK(t && st_expect_shape(t, err, sizeof err,
                                           c.num_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                           c.kv_lora_rank) == 0,
                      "fixture %s: %s", dir, err);
            } else {
                snprintf(name, sizeof name, "model.layers.%d.self_attn.q_proj.weight", l);
                t = st_get(ck, name, err, sizeof err);
                CHECK(t && st_expect_shape(t, err, sizeof err, c.num_heads * c.head_dim,
                                           c.hidden_size) == 0,
                      "fixture %s: %s", dir, err);
            }
            snprintf(name, sizeof name,
                     c.family == HF_MIXTRAL   ? "model.layers.%d.block_sparse_moe.gate.weight"
                     : c.family == HF_GPT_OSS ? "model.layers.%d.mlp.router.weight"
                                              : "model.layers.%d.mlp.gate.weight",
                     l);
            t = st_find(ck, name);
            CHECK((t != NULL) == (c.is_moe[l] != 0), "fixture %s: layer %d is_moe %d, router %s",
                  dir, l, c.is_moe[l], t ? "present" : "absent");
            if (t)
                CHECK(st_expect_shape(t, err, sizeof err, c.num_experts, c.hidden_size) == 0,
                      "fixture %s: %s", dir, err);
        }
        CHECK((st_find(ck, "lm_head.weight") == NULL) == c.tie_word_embeddings,
              "fixture %s: lm_head vs tie_word_embeddings", dir);
        st_checkpoint_close(ck);
    }
    closedir(d);
    printf("test_hfconfig: %d golden fixtures checked from %s\n", fixtures, golden);
}

int main(int argc, char **argv)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/esft-test-hfc-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_names_and_hash();
    test_qwen2_moe();
    test_qwen3_moe();
    test_olmoe();
    test_mixtral();
    test_bad_configs();
    test_deepseek_glm();
    test_gpt_oss();
    test_round_trips();

    char golden[1024];
    const char *srcdir = getenv("ESFT_TOP_SRCDIR");
    if (argc > 1)
        snprintf(golden, sizeof golden, "%s", argv[1]);
    else if (srcdir)
        snprintf(golden, sizeof golden, "%s/tests/golden", srcdir);
    else
        snprintf(golden, sizeof golden, "tests/golden");
    test_golden(golden);

    remove_tree(tmpdir);
    return check_done("test_hfconfig");
}
