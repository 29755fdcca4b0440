/* hfconfig: a Hugging Face config.json -> struct model_config, and back.
 *
 * Callers: the model loader (shapes, per-layer kinds, routing and rope parameters), the
 * `init` phase (hfconfig_write), provenance records (cfg.hash).
 *
 * The struct describes every family in reference/moe-architectures.md so that later
 * families only add parsing, not fields; this version parses qwen2_moe, qwen3_moe, olmoe,
 * mixtral, deepseek_v2, deepseek_v3, glm4_moe and gpt_oss. It is plain data
 * with fixed-size arrays: copy it, or broadcast it to other ranks as bytes.
 *
 * Sizes as in the model header: H hidden, I intermediate, E experts, K top-k, L layers,
 * nH / nKV heads, Dh head_dim. */
#ifndef ESFT_HFCONFIG_H
#define ESFT_HFCONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The largest sizes esft accepts, from config.json or the deck's init section. Generous
 * next to the published MoE models (DeepSeek-V3: hidden 7168; Kimi K2: 384 experts;
 * Qwen3-235B: 94 layers; vocabularies of a few hundred thousand), and small enough that a
 * size no real model has (a corrupt or hand-edited config) is refused by name before
 * anything is allocated for it.
 * Every product of these limits fits in 64 bits; the parameter and tensor counts are
 * checked against their own limits besides. */
#define HFCONFIG_MAX_LAYERS 512              /* num_hidden_layers */
#define HFCONFIG_MAX_HIDDEN 65536            /* hidden_size, 2^16 */
#define HFCONFIG_MAX_HEADS 1024              /* num_attention_heads, num_key_value_heads */
#define HFCONFIG_MAX_HEAD_DIM 1024           /* head_dim */
#define HFCONFIG_MAX_VOCAB 4194304           /* vocab_size, 2^22 */
#define HFCONFIG_MAX_INTERMEDIATE 262144     /* every MLP and expert width, 2^18 */
#define HFCONFIG_MAX_EXPERTS 4096            /* routed experts per layer, 2^12 */
#define HFCONFIG_MAX_PARAMETERS (1ULL << 41) /* about 2.2 trillion */
#define HFCONFIG_MAX_TENSORS (1 << 20)       /* entries of the parameter table */

enum hf_family {
    HF_QWEN2_MOE,
    HF_QWEN3_MOE,
    HF_OLMOE,
    HF_MIXTRAL,
    HF_DEEPSEEK_V2,
    HF_DEEPSEEK_V3,
    HF_GLM4_MOE,
    HF_GPT_OSS,
    HF_FAMILY_COUNT
};

/* How router logits become top-k weights (table "Router" of the reference). */
enum hf_router_kind {
    ROUTER_SOFTMAX_TOPK,   /* softmax over E, top-k, renormalise iff norm_topk_prob */
    ROUTER_GROUPED_GREEDY, /* deepseek_v2: softmax, group-limited greedy top-k, x scale */
    ROUTER_SIGMOID_BIAS,   /* deepseek_v3/glm4_moe: sigmoid, bias-corrected group top-k */
    ROUTER_TOPK_SOFTMAX    /* gpt_oss: top-k on logits (router has a bias), softmax over k */
};

enum hf_qk_norm {
    QK_NORM_NONE,
    QK_NORM_PER_HEAD,        /* qwen3_moe: RMSNorm(Dh) per head */
    QK_NORM_WHOLE_PROJECTION /* olmoe: RMSNorm(nH*Dh) on q, RMSNorm(nKV*Dh) on k */
};

enum hf_attention_kind {
    ATTENTION_GQA, /* q/k/v/o projections, nKV | nH */
    ATTENTION_MLA  /* deepseek multi-head latent attention: see the *_rank fields */
};

/* The balance loss a trainer adds for the family (train.aux_loss_coef): transformers'
 * load_balancing_loss_func over the whole batch (qwen, olmoe, mixtral); for deepseek_v2,
 * which transformers gives none, the ESFT reference's sequence-level loss
 * (deepseek-ai/ESFT deepseek/modeling_deepseek.py, MoEGate with seq_aux); none for the
 * sigmoid routers (deepseek_v3, glm4_moe). */
enum hf_aux_kind { AUX_GLOBAL, AUX_SEQUENCE, AUX_NONE };

enum hf_activation { ACT_SILU, ACT_GELU /* exact (erf) GELU, transformers "gelu" */ };

enum hf_rope_type { ROPE_DEFAULT, ROPE_LINEAR, ROPE_YARN };

/* Which elements form a rotation pair. */
enum hf_rope_layout {
    ROPE_ROTATE_HALF, /* (x_i, x_{i+r/2}) */
    ROPE_INTERLEAVED  /* (x_2i, x_2i+1), deepseek */
};

/* The checkpoint's declared dtype ("dtype" in v5, "torch_dtype" in v4). */
enum hf_dtype { HF_DTYPE_UNSET, HF_DTYPE_BF16, HF_DTYPE_F16, HF_DTYPE_F32 };

struct hf_rope {
    enum hf_rope_type type;
    enum hf_rope_layout layout;
    double theta;
    double factor;                            /* linear, yarn (1 for default) */
    int64_t original_max_position_embeddings; /* yarn */
    double beta_fast, beta_slow;              /* yarn, defaults 32 and 1 */
    bool has_attention_factor;                /* yarn: attention_factor given explicitly */
    double attention_factor;
    double mscale, mscale_all_dim; /* yarn, 0 when absent */
    bool truncate;                 /* yarn, default true */
    double partial_rotary_factor;  /* 1 unless the family rotates part of Dh */
    int rotary_dim;                /* Dh * partial_rotary_factor, even */
    /* What multiplies cos and sin: 1, or yarn's attention factor (explicit, or from
     * factor/mscale as transformers' _compute_yarn_parameters). */
    double attention_scaling;
};

/* config.json "quantization_config" (transformers FineGrainedFP8Config, DeepSeek-V3's
 * {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
 * "weight_block_size": [128, 128]}): linear weights stored as fp8 with a
 * "<name>_scale_inv" tensor of one float per block; the real weight is
 * q[i][j] * scale_inv[i / block[0]][j / block[1]]. esft dequantises on load and trains
 * in fp32 (transformers' dequantize=True). Other quant_method values are refused. */
struct hf_quantization {
    bool fp8;     /* a quantization_config with quant_method "fp8" */
    int block[2]; /* weight_block_size: rows, columns of a block (128, 128 by default) */
    /* quant_method "mxfp4" (transformers Mxfp4Config, the released gpt-oss checkpoints):
     * the routed experts' fused matrices stored as "<name>_blocks" (two E2M1 values a
     * byte, 32 values a block) and "<name>_scales" (one E8M0 exponent a block); esft
     * dequantises on load (integrations/mxfp4.py convert_moe_packed_tensors). gpt_oss only. */
    bool mxfp4;
};

struct model_config {
    enum hf_family family;
    char model_type[32];   /* as in the file */
    char architecture[64]; /* e.g. "Qwen2MoeForCausalLM" */

    int hidden_size;  /* H */
    int num_layers;   /* L */
    int num_heads;    /* nH */
    int num_kv_heads; /* nKV */
    int head_dim;     /* Dh */
    int vocab_size;
    int64_t max_position_embeddings;
    double rms_norm_eps;
    bool tie_word_embeddings;
    enum hf_activation hidden_act;
    double initializer_range;
    enum hf_dtype dtype;
    struct hf_quantization quantization;
    int bos_token_id, eos_token_id, pad_token_id; /* -1: none; eos: first of a list */

    /* attention */
    enum hf_attention_kind attention;
    bool qkv_bias; /* q, k, v projections have biases */
    bool o_bias;   /* o projection has a bias */
    enum hf_qk_norm qk_norm;
    double clip_qkv;               /* olmoe; 0: none */
    bool attention_sinks;          /* gpt_oss */
    int sliding_window;            /* keys i-W < j <= i on layers with is_sliding; 0: none */
    bool use_sliding_window;       /* qwen2_moe / qwen3_moe switch, kept for writing back */
    int max_window_layers;         /* qwen2_moe */
    int q_lora_rank, kv_lora_rank; /* MLA; 0 when unused */
    int qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
    struct hf_rope rope;

    /* feed-forward */
    int intermediate_size;               /* dense MLP width (layers with is_moe 0) */
    int expert_intermediate_size;        /* width of each routed expert */
    int num_experts;                     /* E */
    int top_k;                           /* K */
    int num_shared_experts;              /* 0, or the shared branch count */
    int shared_expert_intermediate_size; /* total width of the shared branch */
    bool shared_expert_gated; /* qwen2_moe: sigmoid(x . w_sg) gate on the shared branch */
    enum hf_router_kind router;
    bool norm_topk_prob; /* as in the file (mixtral: always true) */
    /* whether the model renormalises the top-k weights: norm_topk_prob, except mixtral
     * (always) and deepseek_v2 (never: transformers' DeepseekV2TopkRouter ignores the key) */
    bool renormalise;
    bool router_bias;             /* gpt_oss router linear has a bias */
    /* gpt_oss experts' clamped SwiGLU (GptOssExperts._apply_gate): g = min(gate, limit),
     * u = clamp(up, -limit, limit), h = (u + 1) g sigmoid(alpha g); experts with biases */
    bool clamped_swiglu;
    double swiglu_alpha, swiglu_limit;
    bool expert_bias; /* gpt_oss: each routed expert's gate, up and down have biases */
    double routed_scaling_factor; /* 1 unless deepseek/glm */
    int n_group, topk_group;      /* grouped routing (1 and 1 when ungrouped) */
    int first_k_dense_replace;    /* deepseek/glm */
    int num_mtp_layers;           /* deepseek_v3/glm4_moe: layers past num_hidden_layers that
                                   * the checkpoint carries and transformers ignores */
    int decoder_sparse_step;      /* qwen */
    int num_mlp_only_layers;
    int mlp_only_layers[HFCONFIG_MAX_LAYERS]; /* as in the file (qwen) */
    double router_aux_loss_coef;
    enum hf_aux_kind aux; /* derived from the family */
    bool output_router_logits;
    double router_jitter_noise; /* mixtral; esft keeps 0 for parity */

    /* per layer */
    unsigned char is_moe[HFCONFIG_MAX_LAYERS];
    unsigned char is_sliding[HFCONFIG_MAX_LAYERS];

    uint64_t hash; /* FNV-1a 64 of the config.json bytes (0 for a config built in memory) */
};

/* "qwen2_moe", ... */
const char *hfconfig_family_name(enum hf_family family);
/* model_type -> family; -1 when unknown. */
int hfconfig_family_parse(const char *model_type, enum hf_family *out);
const char *hfconfig_dtype_name(enum hf_dtype dtype); /* "bfloat16", ...; NULL when unset */

/* Reads DIR/config.json. 0, or -1 with "DIR/config.json: key 'K': ..." in err. */
int hfconfig_load(const char *dir, struct model_config *cfg, char *err, size_t errsize);
/* The same from JSON text; `source` names it in messages. hash stays 0. */
int hfconfig_parse(const char *text, size_t len, const char *source, struct model_config *cfg,
                   char *err, size_t errsize);

/* Fills cfg with transformers' defaults for a family (the class defaults of
 * configuration_<family>.py), derived fields computed. */
void hfconfig_defaults(enum hf_family family, struct model_config *cfg);
/* Recomputes head_dim-derived rope fields, is_moe and is_sliding after fields were set
 * by hand, and validates as hfconfig_load does. */
int hfconfig_finish(struct model_config *cfg, const char *source, char *err, size_t errsize);

/* The parameters and tensors of the model cfg describes, as the parameter table
 * (model.h) holds them: routed experts one tensor per matrix. -1 when a count does not fit
 * in 64 bits (never within the limits above). */
int hfconfig_count(const struct model_config *cfg, uint64_t *parameters, uint64_t *tensors);

/* The config.json keys of the routed experts' width and count ("moe_intermediate_size",
 * "n_routed_experts", ...), for messages. */
const char *hfconfig_expert_width_key(const struct model_config *cfg);
const char *hfconfig_experts_key(const struct model_config *cfg);

/* The weights of one layer's attention projections (q, k, v, o; MLA: q or q_a and q_b,
 * kv_a, kv_b, o), biases and norms left out: the multiply-adds per token they cost. */
double hfconfig_attention_weights(const struct model_config *cfg);

/* Writes DIR/config.json (v5 keys, as transformers 5.23 save_pretrained writes them) via
 * a temporary file and rename. 0, or -1 with a message. */
int hfconfig_write(const char *dir, const struct model_config *cfg, char *err, size_t errsize);

/* Writes the JSON object config (jansson's json_t) to path as transformers writes a
 * config: indent 2, sorted keys, ASCII, reals with 15 significant digits when every one
 * prints back to itself (1e-06 stays 1e-06), else 17; via a temporary file and rename.
 * 0, or -1 with a message. */
struct json_t;
int hfconfig_write_json(const char *path, struct json_t *config, char *err, size_t errsize);

/* FNV-1a 64 (for provenance hashes). */
uint64_t hfconfig_fnv1a64(const void *data, size_t n);

#endif
