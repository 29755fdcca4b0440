/* model: the parameter table, the gradients and the compute view on a backend (see
 * model.h; reading a checkpoint into the table is model_load.c, the forward and backward
 * passes are in forward.c and backward.c, their buffers in workspace.c).
 *
 * Tensor names and the per-family math follow the Hugging Face modeling code of each
 * family (transformers models/<family>/modeling_<family>.py), summarised in
 * shared/reference/moe-architectures.md. */
#include "model.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "lora_experts.h"
#include "model_internal.h"

const char *param_kind_name(enum param_kind kind)
{
    static const char *names[PARAM_KIND_COUNT] = {
        "embedding", "attention", "norm", "router", "expert", "shared_expert", "dense_mlp",
        "lm_head", "lora"};
    return kind < PARAM_KIND_COUNT ? names[kind] : "?";
}

/* ---- parameter table ---------------------------------------------------------------- */

/* Where a parameter's storage pointer must be published once storage exists. */
struct table_builder {
    struct model *model;
    int capacity;
    float ***slots; /* per param: the field to set to its data, or NULL */
};

static struct param *add_param(struct table_builder *b, float **slot, enum param_kind kind,
                               enum mlp_part part, int layer, int expert, int64_t d0,
                               int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));

static struct param *add_param(struct table_builder *b, float **slot, enum param_kind kind,
                               enum mlp_part part, int layer, int expert, int64_t d0,
                               int64_t d1, const char *fmt, ...)
{
    struct model *m = b->model;
    if (m->n_params == b->capacity) {
        b->capacity = b->capacity ? 2 * b->capacity : 256;
        m->params = realloc(m->params, (size_t)b->capacity * sizeof *m->params);
        b->slots = realloc(b->slots, (size_t)b->capacity * sizeof *b->slots);
        if (!m->params || !b->slots) fatal(EXIT_RUNTIME, "out of memory (parameter table)");
    }
    struct param *p = &m->params[m->n_params];
    memset(p, 0, sizeof *p);
    va_list args;
    va_start(args, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, args);
    va_end(args);
    p->kind = kind;
    p->part = part;
    p->layer = layer;
    p->expert = expert;
    p->rank = d1 > 0 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1 > 0 ? d1 : 0;
    p->numel = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    p->ep_rank = -1;
    /* embedding on the first stage; final norm and lm_head on the last */
    if (layer >= 0) {
        for (int s = 0; s < m->grid.pp; s++)
            if (layer >= m->stage_first[s] && layer < m->stage_first[s + 1]) p->stage = s;
    } else {
        p->stage = kind == PARAM_EMBEDDING ? 0 : m->grid.pp - 1;
    }
    if (expert >= 0) /* an expert's tensors, and its LoRA pair, live on its EP rank */
        p->ep_rank = layout_expert_owner(m->cfg.num_experts, m->grid.ep, expert);
    b->slots[m->n_params] = slot;
    m->n_params++;
    return p;
}

/* The module that holds a MoE layer's router and experts. */
const char *model_moe_module(const struct model_config *cfg)
{
    return cfg->family == HF_MIXTRAL ? "block_sparse_moe" : "mlp";
}

/* The router inside it: "gate" (mlp.gate), gpt_oss's "router" (GptOssTopKRouter). */
static const char *router_module(const struct model_config *cfg)
{
    return cfg->family == HF_GPT_OSS ? "router" : "gate";
}

/* Names of a routed expert's three matrices: mixtral's w1 (gate), w3 (up), w2 (down). */
static const char *expert_matrix_name(const struct model_config *cfg, enum mlp_part part)
{
    if (cfg->family == HF_MIXTRAL) return part == MLP_GATE ? "w1" : part == MLP_UP ? "w3" : "w2";
    return part == MLP_GATE ? "gate_proj" : part == MLP_UP ? "up_proj" : "down_proj";
}

/* DeepSeek's multi-head latent attention (modeling_deepseek_v2.py DeepseekV2Attention). */
static void add_mla(struct table_builder *b, int l)
{
    const struct model_config *c = &b->model->cfg;
    struct layer_weights *w = &b->model->layers[l];
    int64_t H = c->hidden_size, nH = c->num_heads, R = c->q_lora_rank, C = c->kv_lora_rank;
    int64_t dr = c->qk_rope_head_dim, qk = c->qk_nope_head_dim + dr, dv = c->v_head_dim;
    const char *P = "model.layers";
    if (R > 0) {
        add_param(b, &w->q_a, PARAM_ATTENTION, MLP_NONE, l, -1, R, H, "%s.%d.self_attn.q_a_proj.weight", P, l);
        if (c->qkv_bias)
            add_param(b, &w->q_a_bias, PARAM_ATTENTION, MLP_NONE, l, -1, R, 0, "%s.%d.self_attn.q_a_proj.bias", P, l);
        add_param(b, &w->q_a_norm, PARAM_ATTENTION, MLP_NONE, l, -1, R, 0, "%s.%d.self_attn.q_a_layernorm.weight", P, l);
        add_param(b, &w->q_b, PARAM_ATTENTION, MLP_NONE, l, -1, nH * qk, R, "%s.%d.self_attn.q_b_proj.weight", P, l);
    } else {
        add_param(b, &w->q, PARAM_ATTENTION, MLP_NONE, l, -1, nH * qk, H, "%s.%d.self_attn.q_proj.weight", P, l);
    }
    add_param(b, &w->kv_a, PARAM_ATTENTION, MLP_NONE, l, -1, C + dr, H, "%s.%d.self_attn.kv_a_proj_with_mqa.weight", P, l);
    if (c->qkv_bias)
        add_param(b, &w->kv_a_bias, PARAM_ATTENTION, MLP_NONE, l, -1, C + dr, 0, "%s.%d.self_attn.kv_a_proj_with_mqa.bias", P, l);
    add_param(b, &w->kv_a_norm, PARAM_ATTENTION, MLP_NONE, l, -1, C, 0, "%s.%d.self_attn.kv_a_layernorm.weight", P, l);
    add_param(b, &w->kv_b, PARAM_ATTENTION, MLP_NONE, l, -1, nH * (qk - dr + dv), C, "%s.%d.self_attn.kv_b_proj.weight", P, l);
    add_param(b, &w->o, PARAM_ATTENTION, MLP_NONE, l, -1, H, nH * dv, "%s.%d.self_attn.o_proj.weight", P, l);
    if (c->o_bias)
        add_param(b, &w->o_bias, PARAM_ATTENTION, MLP_NONE, l, -1, H, 0, "%s.%d.self_attn.o_proj.bias", P, l);
}

static void add_attention(struct table_builder *b, int l)
{
    const struct model_config *c = &b->model->cfg;
    if (c->attention == ATTENTION_MLA) {
        add_mla(b, l);
        return;
    }
    struct layer_weights *w = &b->model->layers[l];
    int64_t H = c->hidden_size, q_width = (int64_t)c->num_heads * c->head_dim,
            kv_width = (int64_t)c->num_kv_heads * c->head_dim;
    const char *P = "model.layers";
    add_param(b, &w->q, PARAM_ATTENTION, MLP_NONE, l, -1, q_width, H, "%s.%d.self_attn.q_proj.weight", P, l);
    add_param(b, &w->k, PARAM_ATTENTION, MLP_NONE, l, -1, kv_width, H, "%s.%d.self_attn.k_proj.weight", P, l);
    add_param(b, &w->v, PARAM_ATTENTION, MLP_NONE, l, -1, kv_width, H, "%s.%d.self_attn.v_proj.weight", P, l);
    add_param(b, &w->o, PARAM_ATTENTION, MLP_NONE, l, -1, H, q_width, "%s.%d.self_attn.o_proj.weight", P, l);
    if (c->qkv_bias) {
        add_param(b, &w->q_bias, PARAM_ATTENTION, MLP_NONE, l, -1, q_width, 0, "%s.%d.self_attn.q_proj.bias", P, l);
        add_param(b, &w->k_bias, PARAM_ATTENTION, MLP_NONE, l, -1, kv_width, 0, "%s.%d.self_attn.k_proj.bias", P, l);
        add_param(b, &w->v_bias, PARAM_ATTENTION, MLP_NONE, l, -1, kv_width, 0, "%s.%d.self_attn.v_proj.bias", P, l);
    }
    if (c->o_bias)
        add_param(b, &w->o_bias, PARAM_ATTENTION, MLP_NONE, l, -1, H, 0, "%s.%d.self_attn.o_proj.bias", P, l);
    if (c->attention_sinks)
        add_param(b, &w->sinks, PARAM_ATTENTION, MLP_NONE, l, -1, c->num_heads, 0, "%s.%d.self_attn.sinks", P, l);
    if (c->qk_norm == QK_NORM_PER_HEAD) {
        add_param(b, &w->q_norm, PARAM_ATTENTION, MLP_NONE, l, -1, c->head_dim, 0, "%s.%d.self_attn.q_norm.weight", P, l);
        add_param(b, &w->k_norm, PARAM_ATTENTION, MLP_NONE, l, -1, c->head_dim, 0, "%s.%d.self_attn.k_norm.weight", P, l);
    } else if (c->qk_norm == QK_NORM_WHOLE_PROJECTION) {
        add_param(b, &w->q_norm, PARAM_ATTENTION, MLP_NONE, l, -1, q_width, 0, "%s.%d.self_attn.q_norm.weight", P, l);
        add_param(b, &w->k_norm, PARAM_ATTENTION, MLP_NONE, l, -1, kv_width, 0, "%s.%d.self_attn.k_norm.weight", P, l);
    }
}

static void add_feed_forward(struct table_builder *b, int l)
{
    const struct model_config *c = &b->model->cfg;
    struct layer_weights *w = &b->model->layers[l];
    int64_t H = c->hidden_size;
    const char *P = "model.layers";
    if (!c->is_moe[l]) {
        int64_t I = c->intermediate_size;
        add_param(b, &w->mlp_gate, PARAM_DENSE_MLP, MLP_GATE, l, -1, I, H, "%s.%d.mlp.gate_proj.weight", P, l);
        add_param(b, &w->mlp_up, PARAM_DENSE_MLP, MLP_UP, l, -1, I, H, "%s.%d.mlp.up_proj.weight", P, l);
        add_param(b, &w->mlp_down, PARAM_DENSE_MLP, MLP_DOWN, l, -1, H, I, "%s.%d.mlp.down_proj.weight", P, l);
        return;
    }
    const char *moe = model_moe_module(c), *router = router_module(c);
    int64_t I = c->expert_intermediate_size;
    add_param(b, &w->router, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, H, "%s.%d.%s.%s.weight", P, l, moe, router);
    if (c->router_bias) /* gpt_oss: trains with the router */
        add_param(b, &w->router_logit_bias, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, 0,
                  "%s.%d.%s.%s.bias", P, l, moe, router);
    if (c->router == ROUTER_SIGMOID_BIAS)
        add_param(b, &w->router_bias, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, 0,
                  "%s.%d.%s.gate.e_score_correction_bias", P, l, moe)->buffer = true;
    /* One part at a time over all experts, so each part's local experts are contiguous
     * in fp32 storage (the [E_local, out, in] blocks of model.h). */
    const enum mlp_part parts[3] = {MLP_GATE, MLP_UP, MLP_DOWN};
    for (int i = 0; i < 3; i++) { /* their compute view: publish_weights' per-expert arrays */
        int64_t out = parts[i] == MLP_DOWN ? H : I, in = parts[i] == MLP_DOWN ? I : H;
        for (int e = 0; e < c->num_experts; e++)
            add_param(b, NULL, PARAM_EXPERT, parts[i], l, e, out, in,
                      "%s.%d.%s.experts.%d.%s.weight", P, l, moe, e, expert_matrix_name(c, parts[i]));
    }
    /* gpt_oss: the experts' biases, after the matrices, each part's local experts one
     * contiguous [E_local, out] block; they belong to their expert (its EP rank holds
     * them, ESFT trains them with it) */
    float **bias_blocks[3] = {&w->expert_gate_bias, &w->expert_up_bias, &w->expert_down_bias};
    for (int i = 0; i < 3 && c->expert_bias; i++) {
        int64_t out = parts[i] == MLP_DOWN ? H : I;
        for (int e = 0; e < c->num_experts; e++) {
            int owner = layout_expert_owner(c->num_experts, b->model->grid.ep, e);
            int first_local = owner * (c->num_experts / b->model->grid.ep);
            add_param(b, e == first_local ? bias_blocks[i] : NULL, PARAM_EXPERT, parts[i], l, e,
                      out, 0, "%s.%d.%s.experts.%d.%s.bias", P, l, moe, e,
                      expert_matrix_name(c, parts[i]));
        }
    }
    if (c->shared_expert_intermediate_size > 0) {
        int64_t S = c->shared_expert_intermediate_size;
        const char *name = c->family == HF_QWEN2_MOE ? "shared_expert" : "shared_experts";
        add_param(b, &w->shared_gate, PARAM_SHARED_EXPERT, MLP_GATE, l, -1, S, H, "%s.%d.mlp.%s.gate_proj.weight", P, l, name);
        add_param(b, &w->shared_up, PARAM_SHARED_EXPERT, MLP_UP, l, -1, S, H, "%s.%d.mlp.%s.up_proj.weight", P, l, name);
        add_param(b, &w->shared_down, PARAM_SHARED_EXPERT, MLP_DOWN, l, -1, H, S, "%s.%d.mlp.%s.down_proj.weight", P, l, name);
        if (c->shared_expert_gated)
            add_param(b, &w->shared_expert_gate, PARAM_SHARED_EXPERT, MLP_NONE, l, -1, 1, H, "%s.%d.mlp.shared_expert_gate.weight", P, l);
    }
}

static const double PI = 3.14159265358979323846;

/* inv_freq of RoPE, in fp32 as transformers computes it (modeling_rope_utils.py:
 * _compute_default_rope_parameters, _compute_yarn_parameters). */
static void rope_frequencies(const struct model_config *c, float *inv_freq)
{
    const struct hf_rope *r = &c->rope;
    int dim = r->rotary_dim, half = dim / 2;
    float base = (float)r->theta;
    double low = 0, high = 0;
    if (r->type == ROPE_YARN) {
        /* correction range: the dims whose wavelength fits beta_fast / beta_slow turns
         * of the original context */
        double L0 = (double)r->original_max_position_embeddings;
        low = dim * log(L0 / (r->beta_fast * 2 * PI)) / (2 * log(r->theta));
        high = dim * log(L0 / (r->beta_slow * 2 * PI)) / (2 * log(r->theta));
        if (r->truncate) {
            low = floor(low);
            high = ceil(high);
        }
        if (low < 0) low = 0;
        if (high > dim - 1) high = dim - 1;
        if (low == high) high += 0.001;
    }
    for (int i = 0; i < half; i++) {
        float pos_freq = powf(base, (float)(2 * i) / (float)dim);
        float extrapolation = 1.0f / pos_freq;
        if (r->type == ROPE_DEFAULT) {
            inv_freq[i] = extrapolation;
        } else if (r->type == ROPE_LINEAR) {
            inv_freq[i] = extrapolation / (float)r->factor;
        } else {
            float interpolation = 1.0f / ((float)r->factor * pos_freq);
            float ramp = (float)(((double)i - low) / (high - low));
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float extrapolation_factor = 1.0f - ramp;
            inv_freq[i] = interpolation * (1.0f - extrapolation_factor) +
                          extrapolation * extrapolation_factor;
        }
    }
}

double model_layer_cost(const struct model_config *c, int l)
{
    double H = c->hidden_size;
    double cost = hfconfig_attention_weights(c);
    if (c->is_moe[l])
        cost += H * c->num_experts + 3.0 * H * c->expert_intermediate_size * c->top_k +
                3.0 * H * c->shared_expert_intermediate_size;
    else
        cost += 3.0 * H * c->intermediate_size;
    return cost;
}

double model_head_cost(const struct model_config *c)
{
    return (double)c->hidden_size * c->vocab_size;
}

void model_split_layers(const struct model_config *c, const struct layout_grid *grid, int *first)
{
    int L = c->num_layers, P = grid->pp;
    if (P < 1 || P > L || P > LAYOUT_MAX_STAGES)
        fatal(EXIT_RUNTIME, "model_split_layers: %d layers over pp %d (programming error)", L, P);
    if (grid->stage_layers[0] > 0) { /* the deck's split, checked against the model by main */
        first[0] = 0;
        for (int s = 0; s < P; s++) first[s + 1] = first[s] + grid->stage_layers[s];
        if (first[P] != L) fatal(EXIT_RUNTIME, "model_split_layers: the stage split does not cover %d layers", L);
        return;
    }
    /* prefix[i]: cost of layers [0, i) */
    double *prefix = xcalloc((size_t)L + 1, sizeof *prefix);
    for (int l = 0; l < L; l++) prefix[l + 1] = prefix[l] + model_layer_cost(c, l);
    double head = model_head_cost(c);
    /* best[s][i]: the smallest largest-stage cost of layers [0, i) over stages 0..s;
     * cut[s][i]: where stage s starts in that split (ties: the earliest cut) */
    double *best = xcalloc((size_t)P * (L + 1), sizeof *best);
    int *cut = xcalloc((size_t)P * (L + 1), sizeof *cut);
    for (int i = 0; i <= L; i++) best[i] = i >= 1 ? prefix[i] : INFINITY;
    for (int s = 1; s < P; s++)
        for (int i = 0; i <= L; i++) {
            double value = INFINITY;
            int at = 0;
            for (int j = s; j < i; j++) { /* stage s = layers [j, i), every stage >= 1 layer */
                double stage = prefix[i] - prefix[j] + (s == P - 1 && i == L ? head : 0.0);
                double worst = fmax(best[(size_t)(s - 1) * (L + 1) + j], stage);
                if (worst < value) value = worst, at = j;
            }
            best[(size_t)s * (L + 1) + i] = value;
            cut[(size_t)s * (L + 1) + i] = at;
        }
    first[P] = L;
    for (int s = P - 1; s >= 1; s--) first[s] = cut[(size_t)s * (L + 1) + first[s + 1]];
    first[0] = 0;
    free(prefix), free(best), free(cut);
}

void model_log_stages(const struct model *m, const char *phase)
{
    if (m->grid.pp < 2) return;
    char text[LAYOUT_MAX_STAGES * 16] = "";
    size_t used = 0;
    for (int s = 0; s < m->grid.pp && used < sizeof text; s++)
        used += (size_t)snprintf(text + used, sizeof text - used, "%s%d-%d", s ? ", " : "",
                                 m->stage_first[s], m->stage_first[s + 1] - 1);
    log_info("%s: pipeline stages: layers %s%s", phase, text,
             m->grid.stage_layers[0] > 0 ? " (parallel.stage_layers)" : " (balanced by cost)");
}

/* Whether the rank at coords holds p: its stage, and its EP rank for a routed expert. */
bool model_holds(const struct param *p, struct layout_coords coords)
{
    return p->stage == coords.pp_rank && (p->ep_rank < 0 || p->ep_rank == coords.ep_rank);
}

/* The parameter table of cfg under grid, and the stage split, for the rank at coords; no
 * weights yet. b->slots says where each entry's storage is to be published. */
static void build_table(struct model *m, const struct model_config *cfg,
                        const struct layout_grid *grid, struct layout_coords coords,
                        struct table_builder *b)
{
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->grid = *grid;
    m->me = coords;
    m->stage_first = xcalloc((size_t)grid->pp + 1, sizeof *m->stage_first);
    model_split_layers(cfg, grid, m->stage_first);
    m->first_layer = m->stage_first[coords.pp_rank];
    m->n_layers = m->stage_first[coords.pp_rank + 1] - m->first_layer;
    if (cfg->num_experts > 0)
        layout_experts_of(cfg->num_experts, grid->ep, coords.ep_rank, &m->first_expert,
                          &m->n_local_experts);
    m->layers = xcalloc((size_t)cfg->num_layers, sizeof *m->layers);

    *b = (struct table_builder){.model = m};
    int64_t V = cfg->vocab_size, H = cfg->hidden_size;
    add_param(b, &m->embedding, PARAM_EMBEDDING, MLP_NONE, -1, -1, V, H,
              "model.embed_tokens.weight");
    for (int l = 0; l < cfg->num_layers; l++) {
        struct layer_weights *w = &m->layers[l];
        add_param(b, &w->input_norm, PARAM_NORM, MLP_NONE, l, -1, H, 0,
                  "model.layers.%d.input_layernorm.weight", l);
        add_attention(b, l);
        add_param(b, &w->post_norm, PARAM_NORM, MLP_NONE, l, -1, H, 0,
                  "model.layers.%d.post_attention_layernorm.weight", l);
        add_feed_forward(b, l);
    }
    add_param(b, &m->final_norm, PARAM_NORM, MLP_NONE, -1, -1, H, 0, "model.norm.weight");
    if (!cfg->tie_word_embeddings)
        add_param(b, &m->lm_head, PARAM_LM_HEAD, MLP_NONE, -1, -1, V, H, "lm_head.weight");
}

void model_table(struct model *m, const struct model_config *cfg, const struct layout_grid *grid,
                 struct layout_coords coords)
{
    struct table_builder b;
    build_table(m, cfg, grid, coords, &b);
    free(b.slots);
}

/* The compute view of p's weights in host memory: its fp32 data, or its bf16 tagged. */
static float *host_view(const struct param *p)
{
    return p->data ? p->data : weight_bf16(p->data_bf16);
}

/* Points the compute view (struct layer_weights, the model's own fields, the routed
 * experts' per-expert arrays) at the storage params[i].data / .data_bf16 name. */
static void publish_weights(struct model *m)
{
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        if (!param_held(p)) continue;
        if (m->weight_slots[i]) *m->weight_slots[i] = host_view(p);
        if (p->kind == PARAM_EXPERT && p->rank == 2) {
            struct layer_weights *w = &m->layers[p->layer];
            const float **experts = p->part == MLP_GATE ? w->expert_gate
                              : p->part == MLP_UP ? w->expert_up
                                                  : w->expert_down;
            experts[p->expert - m->first_expert] = host_view(p);
        }
    }
    if (m->cfg.tie_word_embeddings) m->lm_head = m->embedding;
    lora_experts_refresh(m->expert_lora, m->cfg.num_layers, m->n_local_experts,
                         m->cfg.expert_intermediate_size, m->lora_rank);
}

/* Hands out the fp32 and bf16 blocks to the tensors this rank holds, in table order
 * (so a part's local expert biases stay one contiguous block). A tensor that stays fp32
 * keeps its values (a LoRA A is initialised at creation); one that becomes bf16 had none
 * yet (model_store_frozen_bf16 comes before model_load). */
static void lay_out_storage(struct model *m, bool bf16)
{
    size_t floats = 0, halves = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!model_holds(p, m->me)) continue;
        if (bf16 && model_stores_bf16(p)) halves += p->numel;
        else floats += p->numel;
    }
    float *old = m->storage;
    free(m->storage_bf16);
    m->storage = xcalloc(floats ? floats : 1, sizeof(float));
    m->storage_floats = floats;
    m->storage_bf16 = halves ? xcalloc(halves, sizeof(uint16_t)) : NULL;
    m->storage_halves = halves;
    size_t used = 0, used_halves = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        float *before = p->data; /* in the old block, or NULL */
        p->data = NULL;
        p->data_bf16 = NULL;
        if (!model_holds(p, m->me)) continue;
        if (bf16 && model_stores_bf16(p)) {
            p->data_bf16 = m->storage_bf16 + used_halves;
            used_halves += p->numel;
        } else {
            p->data = m->storage + used;
            used += p->numel;
            if (before) memcpy(p->data, before, p->numel * sizeof(float));
        }
    }
    free(old);
    publish_weights(m);
}

/* The routed experts' pairs (lora_experts.h): for each expert of each MoE layer, gate_up's
 * A [r, H] and B [2I, r], then down's A [r, I] and B [H, r], on its EP rank. */
static void add_expert_adapters(struct table_builder *b, const struct lora_spec *spec, int n_base)
{
    struct model *m = b->model;
    int local = m->n_local_experts > 0 ? m->n_local_experts : 1;
    m->expert_lora = lora_experts_new(m->cfg.num_layers, local);
    for (int i = 0; i < n_base; i++) {
        const struct param *w = &m->params[i];
        if (w->kind != PARAM_EXPERT || w->rank != 2 || w->part == MLP_UP) continue;
        int which = w->part == MLP_GATE ? LORA_EXPERT_GATE_UP : LORA_EXPERT_DOWN;
        int layer = w->layer, e = w->expert, k = e - m->first_expert;
        bool here = k >= 0 && k < local;
        int64_t out = which == LORA_EXPERT_GATE_UP ? 2 * w->shape[0] : w->shape[0];
        const char *proj = which == LORA_EXPERT_GATE_UP ? "gate_up_proj" : "down_proj";
        for (int is_b = 0; is_b < 2; is_b++) {
            float **slot = here ? lora_experts_slot(m->expert_lora, layer, which, is_b, k) : NULL;
            struct param *p = add_param(b, slot, PARAM_LORA, MLP_NONE, layer, e,
                                        is_b ? out : spec->r, is_b ? spec->r : w->shape[1],
                                        "base_model.model.model.layers.%d.mlp.experts.%d.%s.lora_%c.weight",
                                        layer, e, proj, is_b ? 'B' : 'A');
            p->lora_target = which;
            p->lora_b = is_b;
        }
    }
}

/* The adapters of spec after the base tensors: for each base weight a target names, A
 * [r, in] then B [out, r], named as PEFT saves them, on the stage of their base (and
 * every EP rank of it, as the base). */
static void add_adapters(struct table_builder *b, const struct lora_spec *spec)
{
    struct model *m = b->model;
    m->lora = xcalloc((size_t)m->cfg.num_layers, sizeof *m->lora);
    m->lora_rank = spec->r;
    m->lora_scale = lora_scale(spec);
    int n_base = m->n_params;
    for (int i = 0; i < n_base; i++) {
        int target = lora_target_of(m->params[i].name, spec->targets);
        if (target < 0) continue;
        char module[PARAM_NAME_MAX];
        snprintf(module, sizeof module, "%.*s", (int)(strlen(m->params[i].name) - 7),
                 m->params[i].name); /* without ".weight" */
        int layer = m->params[i].layer;
        int64_t out = m->params[i].shape[0], in = m->params[i].shape[1];
        struct layer_lora *ll = &m->lora[layer];
        struct param *a = add_param(b, &ll->a[target], PARAM_LORA, MLP_NONE, layer, -1, spec->r,
                                    in, "base_model.model.%s.lora_A.weight", module);
        a->lora_target = target;
        struct param *bp = add_param(b, &ll->b[target], PARAM_LORA, MLP_NONE, layer, -1, out,
                                     spec->r, "base_model.model.%s.lora_B.weight", module);
        bp->lora_target = target;
        bp->lora_b = true;
    }
    if (spec->experts != LORA_EXPERTS_NONE) add_expert_adapters(b, spec, n_base);
}

static void create(struct model *m, const struct model_config *cfg, const struct layout_grid *grid,
                   struct layout_coords coords, const struct lora_spec *spec, uint64_t seed)
{
    struct table_builder b;
    build_table(m, cfg, grid, coords, &b);
    if (spec) add_adapters(&b, spec);
    m->weight_slots = b.slots;
    int local = m->n_local_experts > 0 ? m->n_local_experts : 1;
    for (int l = 0; l < cfg->num_layers; l++) {
        m->layers[l].expert_gate = xcalloc((size_t)local, sizeof(const float *));
        m->layers[l].expert_up = xcalloc((size_t)local, sizeof(const float *));
        m->layers[l].expert_down = xcalloc((size_t)local, sizeof(const float *));
    }
    /* One allocation for everything this rank holds, handed out in table order. */
    lay_out_storage(m, false);

    m->inv_freq = xcalloc((size_t)cfg->rope.rotary_dim / 2 + 1, sizeof(float));
    rope_frequencies(cfg, m->inv_freq);
    for (int i = 0; i < m->n_params; i++) /* B stays zero */
        if (m->params[i].kind == PARAM_LORA && !m->params[i].lora_b && m->params[i].data)
            lora_init_a(m->params[i].data, (int)m->params[i].shape[0],
                        (int)m->params[i].shape[1], seed, i);
}

void model_create(struct model *m, const struct model_config *cfg, const struct layout_grid *grid,
                  struct layout_coords coords)
{
    create(m, cfg, grid, coords, NULL, 0);
}

void model_create_lora(struct model *m, const struct model_config *cfg,
                       const struct layout_grid *grid, struct layout_coords coords,
                       const struct lora_spec *spec, uint64_t seed)
{
    create(m, cfg, grid, coords, spec, seed);
}

bool model_stores_bf16(const struct param *p)
{
    return !p->trainable && !p->buffer && p->rank == 2 && p->shape[0] > 1 &&
           p->kind != PARAM_ROUTER && p->kind != PARAM_EMBEDDING && p->kind != PARAM_LORA;
}

void model_store_frozen_bf16(struct model *m)
{
    if (m->ops) fatal(EXIT_RUNTIME, "model_store_frozen_bf16 after model_attach");
    if (m->checkpoint_dir)
        fatal(EXIT_RUNTIME, "model_store_frozen_bf16 after model_load (the weights would go)");
    lay_out_storage(m, true); /* no weight was read yet; adapters keep their init */
}

void model_free(struct model *m)
{
    if (m->ops && m->ops->constant) m->ops->constant(NULL, 0); /* its weights are going */
    if (m->ops && !m->ops->host_visible) {
        m->ops->release(m->device_storage_bf16);
        m->ops->release(m->device_storage);
        m->ops->release(m->device_grad_storage);
        m->ops->release(m->device_inv_freq);
        m->ops->release(m->c2r_collaborators);
    } else {
        free(m->c2r_collaborators);
    }
    free(m->stage_first);
    if (m->grads)
        for (int l = 0; l < m->cfg.num_layers; l++) {
            free(m->grads[l].expert_gate);
            free(m->grads[l].expert_up);
            free(m->grads[l].expert_down);
            free(m->grads[l].expert_gate_bias);
            free(m->grads[l].expert_up_bias);
            free(m->grads[l].expert_down_bias);
        }
    free(m->grads);
    free(m->lora);
    free(m->lora_grads);
    lora_experts_free(m->expert_lora, m->cfg.num_layers);
    lora_experts_free(m->expert_lora_grads, m->cfg.num_layers);
    free(m->grad_storage);
    free(m->params);
    for (int l = 0; m->layers && l < m->cfg.num_layers; l++) {
        free((void *)m->layers[l].expert_gate);
        free((void *)m->layers[l].expert_up);
        free((void *)m->layers[l].expert_down);
    }
    free(m->layers);
    free(m->weight_slots);
    free(m->checkpoint_dir);
    free(m->storage);
    free(m->storage_bf16);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

struct param *model_find_param(struct model *m, const char *name)
{
    for (int i = 0; i < m->n_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
    return NULL;
}

struct param *model_find_expert(struct model *m, int layer, int expert, enum mlp_part part)
{
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        if (p->kind == PARAM_EXPERT && p->rank == 2 && p->layer == layer && p->expert == expert &&
            p->part == part)
            return p;
    }
    return NULL;
}

/* ---- gradients ---------------------------------------------------------------------- */

/* The field of struct layer_grads (or the model's own) that holds a parameter's
 * gradient; expert entries go to their slot in the per-expert arrays. */
static void publish_grad(struct model *m, const struct param *p)
{
    if (!p->data) return; /* held by another rank (stage or EP rank) */
    if (p->buffer) return;  /* e_score_correction_bias: never trained, no gradient slot */
    if (lora_experts_is(p)) {
        *lora_experts_slot(m->expert_lora_grads, p->layer, p->lora_target, p->lora_b,
                           p->expert - m->first_expert) = p->grad;
        return;
    }
    if (p->kind == PARAM_LORA) {
        struct layer_lora *g = &m->lora_grads[p->layer];
        *(p->lora_b ? &g->b[p->lora_target] : &g->a[p->lora_target]) = p->grad;
        return;
    }
    if (p->layer < 0) {
        if (p->kind == PARAM_EMBEDDING) m->embedding_grad = p->grad;
        else if (p->kind == PARAM_LM_HEAD) m->lm_head_grad = p->grad;
        else m->final_norm_grad = p->grad;
        return;
    }
    struct layer_grads *g = &m->grads[p->layer];
    if (p->kind == PARAM_EXPERT) {
        float **slots = p->part == MLP_GATE ? g->expert_gate : p->part == MLP_UP ? g->expert_up
                                                                                 : g->expert_down;
        if (p->rank == 1) /* gpt_oss's expert biases */
            slots = p->part == MLP_GATE ? g->expert_gate_bias
                    : p->part == MLP_UP ? g->expert_up_bias
                                        : g->expert_down_bias;
        slots[p->expert - m->first_expert] = p->grad;
        return;
    }
    /* the rest by the end of their name */
    static const struct {
        const char *suffix;
        size_t offset;
    } fields[] = {
        {".input_layernorm.weight", offsetof(struct layer_grads, input_norm)},
        {".post_attention_layernorm.weight", offsetof(struct layer_grads, post_norm)},
        {".q_proj.weight", offsetof(struct layer_grads, q)},
        {".k_proj.weight", offsetof(struct layer_grads, k)},
        {".v_proj.weight", offsetof(struct layer_grads, v)},
        {".o_proj.weight", offsetof(struct layer_grads, o)},
        {".q_proj.bias", offsetof(struct layer_grads, q_bias)},
        {".k_proj.bias", offsetof(struct layer_grads, k_bias)},
        {".v_proj.bias", offsetof(struct layer_grads, v_bias)},
        {".o_proj.bias", offsetof(struct layer_grads, o_bias)},
        {".q_norm.weight", offsetof(struct layer_grads, q_norm)},
        {".k_norm.weight", offsetof(struct layer_grads, k_norm)},
        {".gate.weight", offsetof(struct layer_grads, router)},
        {".router.weight", offsetof(struct layer_grads, router)},
        {".router.bias", offsetof(struct layer_grads, router_logit_bias)},
        {".self_attn.sinks", offsetof(struct layer_grads, sinks)},
        {".q_a_proj.weight", offsetof(struct layer_grads, q_a)},
        {".q_a_proj.bias", offsetof(struct layer_grads, q_a_bias)},
        {".q_a_layernorm.weight", offsetof(struct layer_grads, q_a_norm)},
        {".q_b_proj.weight", offsetof(struct layer_grads, q_b)},
        {".kv_a_proj_with_mqa.weight", offsetof(struct layer_grads, kv_a)},
        {".kv_a_proj_with_mqa.bias", offsetof(struct layer_grads, kv_a_bias)},
        {".kv_a_layernorm.weight", offsetof(struct layer_grads, kv_a_norm)},
        {".kv_b_proj.weight", offsetof(struct layer_grads, kv_b)},
        {".shared_expert_gate.weight", offsetof(struct layer_grads, shared_expert_gate)},
    };
    size_t length = strlen(p->name);
    if (p->kind == PARAM_SHARED_EXPERT && p->part != MLP_NONE) {
        float **field = p->part == MLP_GATE ? &g->shared_gate : p->part == MLP_UP ? &g->shared_up
                                                                                 : &g->shared_down;
        *field = p->grad;
        return;
    }
    if (p->kind == PARAM_DENSE_MLP) {
        float **field = p->part == MLP_GATE ? &g->mlp_gate : p->part == MLP_UP ? &g->mlp_up
                                                                              : &g->mlp_down;
        *field = p->grad;
        return;
    }
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        size_t n = strlen(fields[i].suffix);
        if (length >= n && strcmp(p->name + length - n, fields[i].suffix) == 0) {
            *(float **)((char *)g + fields[i].offset) = p->grad;
            return;
        }
    }
    fatal(EXIT_RUNTIME, "model: no gradient slot for %s", p->name);
}

/* The lowest decoder layer holding a trainable tensor (every rank's table lists every
 * tensor, so every rank finds the same), and what trains there. */
static void set_backward_floor(struct model *m)
{
    int floor = m->cfg.num_layers;
    bool embedding = false;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!p->trainable) continue;
        if (p->kind == PARAM_EMBEDDING) embedding = true;
        if (p->layer >= 0 && p->layer < floor) floor = p->layer;
    }
    m->backward_floor = embedding ? -1 : floor;
    m->floor_mlp_only = !embedding;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (p->trainable && p->layer == floor &&
            (p->kind == PARAM_ATTENTION || p->kind == PARAM_NORM ||
             (p->kind == PARAM_LORA && LORA_IS_ATTENTION(p->lora_target))))
            m->floor_mlp_only = false;
    }
}

void model_set_trainable(struct model *m, const bool *trainable)
{
    if (m->device_storage)
        fatal(EXIT_RUNTIME, "model_set_trainable after model_attach (the gradients would stay "
              "on the host)");
    if (!m->grads) {
        m->grads = xcalloc((size_t)m->cfg.num_layers, sizeof *m->grads);
        int local = m->n_local_experts > 0 ? m->n_local_experts : 1;
        for (int l = 0; l < m->cfg.num_layers; l++) {
            m->grads[l].expert_gate = xcalloc((size_t)local, sizeof(float *));
            m->grads[l].expert_up = xcalloc((size_t)local, sizeof(float *));
            m->grads[l].expert_down = xcalloc((size_t)local, sizeof(float *));
            m->grads[l].expert_gate_bias = xcalloc((size_t)local, sizeof(float *));
            m->grads[l].expert_up_bias = xcalloc((size_t)local, sizeof(float *));
            m->grads[l].expert_down_bias = xcalloc((size_t)local, sizeof(float *));
        }
    }
    if (m->lora && !m->lora_grads)
        m->lora_grads = xcalloc((size_t)m->cfg.num_layers, sizeof *m->lora_grads);
    if (m->expert_lora && !m->expert_lora_grads)
        m->expert_lora_grads = lora_experts_new(m->cfg.num_layers, m->n_local_experts > 0 ? m->n_local_experts : 1);
    size_t total = 0;
    for (int i = 0; i < m->n_params; i++) {
        if (trainable[i] && m->params[i].data_bf16)
            fatal(EXIT_RUNTIME, "model_set_trainable: %s is held as bf16 (model_store_frozen_bf16 "
                  "comes after model_set_trainable)", m->params[i].name);
        m->params[i].trainable = trainable[i] && !m->params[i].buffer;
        if (m->params[i].trainable && m->params[i].data) total += m->params[i].numel;
    }
    free(m->grad_storage);
    m->grad_storage = xcalloc(total ? total : 1, sizeof(float));
    m->grad_floats = total;
    size_t used = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        p->grad = NULL;
        if (p->trainable && p->data) {
            p->grad = m->grad_storage + used;
            used += p->numel;
        }
        publish_grad(m, p);
    }
    lora_experts_refresh(m->expert_lora_grads, m->cfg.num_layers, m->n_local_experts,
                         m->cfg.expert_intermediate_size, m->lora_rank);
    set_backward_floor(m);
}

/* Where the gradients are: on the backend when attached (the host block is only a
 * staging copy, overwritten whole by model_download_grads: zeroing it too cost a full
 * fine-tuning step of 1.9e9 parameters 0.6 s on the host), else on the host. */
void model_zero_grads(struct model *m)
{
    bool zeroed = m->grads_zeroed;
    m->grads_zeroed = false; /* the backward is about to write them */
    if (zeroed) return;
    if (m->device_grad_storage)
        m->ops->zero(m->device_grad_storage, m->grad_floats * sizeof(float));
    else if (m->grad_storage)
        memset(m->grad_storage, 0, m->grad_floats * sizeof(float));
}

/* ---- the compute view on a backend ------------------------------------------------- */

/* The backend's copy of p, a pointer into the host block [from, from + floats). */
static float *moved(float *p, const float *from, size_t floats, float *to)
{
    if (!p) return NULL;
    if (p < from || p >= from + (floats ? floats : 1))
        fatal(EXIT_RUNTIME, "model: a tensor outside the storage it belongs to");
    return to + (p - from);
}

/* The backend's copy of a compute-view weight pointer into the host storage: fp32 or
 * weight_bf16 (attach has allocated both device blocks). */
static float *moved_weight(const struct model *m, const float *w)
{
    if (!w || !weight_is_bf16(w))
        return moved((float *)w, m->storage, m->storage_floats, m->device_storage);
    const uint16_t *h = weight_bf16_data(w);
    if (h < m->storage_bf16 || h >= m->storage_bf16 + m->storage_halves)
        fatal(EXIT_RUNTIME, "model: a bf16 tensor outside the storage it belongs to");
    return weight_bf16(m->device_storage_bf16 + (h - m->storage_bf16));
}

void model_attach(struct model *m, const struct backend *ops)
{
    if (m->ops) fatal(EXIT_RUNTIME, "model_attach: the model is attached already");
    m->ops = ops;
    if (ops->host_visible) return; /* the host storage is the backend's */

    size_t W = m->storage_floats;
    m->device_storage = ops->alloc(W * sizeof(float));
    ops->upload(m->device_storage, m->storage, W * sizeof(float));
    if (m->storage_halves) {
        m->device_storage_bf16 = ops->alloc(m->storage_halves * sizeof(uint16_t));
        ops->upload(m->device_storage_bf16, m->storage_bf16, m->storage_halves * sizeof(uint16_t));
    }
    size_t n_freq = (size_t)m->cfg.rope.rotary_dim / 2 + 1;
    m->device_inv_freq = ops->alloc(n_freq * sizeof(float));
    ops->upload(m->device_inv_freq, m->inv_freq, n_freq * sizeof(float));
    bool tied = m->lm_head == m->embedding;
    m->embedding = moved_weight(m, m->embedding);
    m->final_norm = moved_weight(m, m->final_norm);
    m->lm_head = tied ? m->embedding : moved_weight(m, m->lm_head);
    int local_experts = m->n_local_experts > 0 ? m->n_local_experts : 1;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        struct layer_weights *w = &m->layers[l];
        float **fields[] = {&w->input_norm, &w->post_norm, &w->q, &w->k, &w->v, &w->o,
                            &w->q_bias, &w->k_bias, &w->v_bias, &w->o_bias, &w->q_norm,
                            &w->k_norm, &w->q_a, &w->q_a_bias, &w->q_a_norm, &w->q_b,
                            &w->kv_a, &w->kv_a_bias, &w->kv_a_norm, &w->kv_b, &w->sinks,
                            &w->router, &w->router_bias, &w->router_logit_bias,
                            &w->expert_gate_bias, &w->expert_up_bias, &w->expert_down_bias,
                            &w->shared_gate, &w->shared_up, &w->shared_down,
                            &w->shared_expert_gate, &w->mlp_gate, &w->mlp_up, &w->mlp_down};
        _Static_assert(sizeof fields / sizeof fields[0] + 3 ==
                           sizeof(struct layer_weights) / sizeof(float *),
                       "every field of struct layer_weights (and its three expert arrays)");
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
            *fields[i] = moved_weight(m, *fields[i]);
        for (int e = 0; e < local_experts; e++) {
            w->expert_gate[e] = moved_weight(m, w->expert_gate[e]);
            w->expert_up[e] = moved_weight(m, w->expert_up[e]);
            w->expert_down[e] = moved_weight(m, w->expert_down[e]);
        }
    }
    for (int l = 0; m->lora && l < m->cfg.num_layers; l++)
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            m->lora[l].a[t] = moved_weight(m, m->lora[l].a[t]);
            m->lora[l].b[t] = moved_weight(m, m->lora[l].b[t]);
        }
    for (int l = 0; m->expert_lora && l < m->cfg.num_layers; l++)
        for (int e = 0; e < local_experts; e++) {
            struct expert_lora *x = &m->expert_lora[l];
            x->a_gate_up[e] = moved_weight(m, x->a_gate_up[e]);
            x->b_gate_up[e] = moved_weight(m, x->b_gate_up[e]);
            x->a_down[e] = moved_weight(m, x->a_down[e]);
            x->b_down[e] = moved_weight(m, x->b_down[e]);
        }
    lora_experts_refresh(m->expert_lora, m->cfg.num_layers, m->n_local_experts,
                         m->cfg.expert_intermediate_size, m->lora_rank);
    if (ops->constant) /* the frozen fp32 weights, as the backend may keep them */
        for (int i = 0; i < m->n_params; i++)
            if (m->params[i].data && !m->params[i].trainable)
                ops->constant(model_compute_data(m, &m->params[i]), m->params[i].numel);
    if (!m->grads) return; /* nothing trainable (score, eval) */

    size_t G = m->grad_floats;
    m->device_grad_storage = ops->alloc(G * sizeof(float));
    float *gdev = m->device_grad_storage;
    m->embedding_grad = moved(m->embedding_grad, m->grad_storage, G, gdev);
    m->final_norm_grad = moved(m->final_norm_grad, m->grad_storage, G, gdev);
    m->lm_head_grad = moved(m->lm_head_grad, m->grad_storage, G, gdev);
    int local = m->n_local_experts > 0 ? m->n_local_experts : 1;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        struct layer_grads *g = &m->grads[l];
        float **fields[] = {&g->input_norm, &g->post_norm, &g->q, &g->k, &g->v, &g->o,
                            &g->q_bias, &g->k_bias, &g->v_bias, &g->o_bias, &g->q_norm,
                            &g->k_norm, &g->q_a, &g->q_a_bias, &g->q_a_norm, &g->q_b,
                            &g->kv_a, &g->kv_a_bias, &g->kv_a_norm, &g->kv_b,
                            &g->router, &g->router_logit_bias, &g->sinks, &g->shared_gate,
                            &g->shared_up, &g->shared_down, &g->shared_expert_gate,
                            &g->mlp_gate, &g->mlp_up, &g->mlp_down};
        _Static_assert(sizeof fields / sizeof fields[0] + 6 == sizeof(struct layer_grads) / sizeof(float *),
                       "every field of struct layer_grads (and its six expert arrays)");
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
            *fields[i] = moved(*fields[i], m->grad_storage, G, gdev);
        for (int t = 0; m->lora_grads && t < LORA_TARGET_COUNT; t++) {
            m->lora_grads[l].a[t] = moved(m->lora_grads[l].a[t], m->grad_storage, G, gdev);
            m->lora_grads[l].b[t] = moved(m->lora_grads[l].b[t], m->grad_storage, G, gdev);
        }
        for (int e = 0; e < local; e++) {
            g->expert_gate[e] = moved(g->expert_gate[e], m->grad_storage, G, gdev);
            g->expert_up[e] = moved(g->expert_up[e], m->grad_storage, G, gdev);
            g->expert_down[e] = moved(g->expert_down[e], m->grad_storage, G, gdev);
            g->expert_gate_bias[e] = moved(g->expert_gate_bias[e], m->grad_storage, G, gdev);
            g->expert_up_bias[e] = moved(g->expert_up_bias[e], m->grad_storage, G, gdev);
            g->expert_down_bias[e] = moved(g->expert_down_bias[e], m->grad_storage, G, gdev);
        }
        for (int e = 0; m->expert_lora_grads && e < local; e++) {
            struct expert_lora *x = &m->expert_lora_grads[l];
            x->a_gate_up[e] = moved(x->a_gate_up[e], m->grad_storage, G, gdev);
            x->b_gate_up[e] = moved(x->b_gate_up[e], m->grad_storage, G, gdev);
            x->a_down[e] = moved(x->a_down[e], m->grad_storage, G, gdev);
            x->b_down[e] = moved(x->b_down[e], m->grad_storage, G, gdev);
        }
    }
    lora_experts_refresh(m->expert_lora_grads, m->cfg.num_layers, m->n_local_experts,
                         m->cfg.expert_intermediate_size, m->lora_rank);
}

void model_download_grads(struct model *m)
{
    if (m->device_grad_storage)
        m->ops->download(m->grad_storage, m->device_grad_storage, m->grad_floats * sizeof(float));
}

float *model_compute_data(const struct model *m, const struct param *p)
{
    return m->device_storage ? moved_weight(m, host_view(p)) : host_view(p);
}

float *model_compute_grad(const struct model *m, const struct param *p)
{
    return m->device_grad_storage
               ? moved(p->grad, m->grad_storage, m->grad_floats, m->device_grad_storage)
               : p->grad;
}

void model_download_trainable(struct model *m)
{
    if (!m->device_storage) return;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        if (p->trainable && p->data)
            m->ops->download(p->data, model_compute_data(m, p), p->numel * sizeof(float));
    }
}

void model_upload_grads(struct model *m)
{
    if (m->device_grad_storage)
        m->ops->upload(m->device_grad_storage, m->grad_storage, m->grad_floats * sizeof(float));
}

/* ---- LoRA --------------------------------------------------------------------------- */

void model_merge_lora(struct model *m)
{
    const char *prefix = "base_model.model.", *suffix = ".lora_A.weight";
    for (int i = 0; i + 1 < m->n_params; i++) {
        struct param *a = &m->params[i], *b = &m->params[i + 1]; /* add_adapters: A, then B */
        if (a->kind != PARAM_LORA || a->lora_b || !a->data || lora_experts_is(a)) continue;
        char name[PARAM_NAME_MAX];
        size_t n = strlen(a->name) - strlen(prefix) - strlen(suffix);
        snprintf(name, sizeof name, "%.*s.weight", (int)n, a->name + strlen(prefix));
        struct param *w = model_find_param(m, name);
        if (!w || !w->data || !b->lora_b)
            fatal(EXIT_RUNTIME, "model_merge_lora: no base weight %s held with %s", name, a->name);
        lora_fold(w->data, b->data, a->data, w->shape[0], w->shape[1], a->shape[0], m->lora_scale);
        memset(b->data, 0, b->numel * sizeof(float)); /* its update is in W now */
    }
    lora_experts_merge(m);
}
