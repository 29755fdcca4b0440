/* model: parameter table, weight loading and the compute view on a backend (see model.h;
 * the forward and backward passes are in forward.c and backward.c, their buffers in
 * workspace.c).
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
#include "safetensors.h"

const char *param_kind_name(enum param_kind kind)
{
    static const char *names[PARAM_KIND_COUNT] = {
        "embedding", "attention", "norm", "router", "expert", "shared_expert", "dense_mlp",
        "lm_head"};
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
    if (kind == PARAM_EXPERT) p->ep_rank = layout_expert_owner(m->cfg.num_experts, m->grid.ep, expert);
    b->slots[m->n_params] = slot;
    m->n_params++;
    return p;
}

/* The module that holds a MoE layer's router and experts. */
static const char *moe_module(const struct model_config *cfg)
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
    const char *moe = moe_module(c), *router = router_module(c);
    int64_t I = c->expert_intermediate_size;
    add_param(b, &w->router, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, H, "%s.%d.%s.%s.weight", P, l, moe, router);
    if (c->router_bias) /* gpt_oss: trains with the router */
        add_param(b, &w->router_logit_bias, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, 0,
                  "%s.%d.%s.%s.bias", P, l, moe, router);
    if (c->router == ROUTER_SIGMOID_BIAS)
        add_param(b, &w->router_bias, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, 0,
                  "%s.%d.%s.gate.e_score_correction_bias", P, l, moe)->buffer = true;
    /* One part at a time over all experts, so each part's local experts are contiguous:
     * the [E_local, out, in] blocks of model.h. */
    const enum mlp_part parts[3] = {MLP_GATE, MLP_UP, MLP_DOWN};
    float **blocks[3] = {&w->expert_gate, &w->expert_up, &w->expert_down};
    for (int i = 0; i < 3; i++) {
        int64_t out = parts[i] == MLP_DOWN ? H : I, in = parts[i] == MLP_DOWN ? I : H;
        for (int e = 0; e < c->num_experts; e++) {
            int owner = layout_expert_owner(c->num_experts, b->model->grid.ep, e);
            int first_local = owner * (c->num_experts / b->model->grid.ep);
            add_param(b, e == first_local ? blocks[i] : NULL, PARAM_EXPERT, parts[i], l, e, out, in,
                      "%s.%d.%s.experts.%d.%s.weight", P, l, moe, e, expert_matrix_name(c, parts[i]));
        }
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
static bool holds(const struct param *p, struct layout_coords coords)
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

void model_create(struct model *m, const struct model_config *cfg, const struct layout_grid *grid,
                  struct layout_coords coords)
{
    struct table_builder b;
    build_table(m, cfg, grid, coords, &b);

    /* One allocation for everything this rank holds, handed out in table order. */
    size_t total = 0;
    for (int i = 0; i < m->n_params; i++)
        if (holds(&m->params[i], coords)) total += m->params[i].numel;
    m->storage = xcalloc(total ? total : 1, sizeof(float));
    m->storage_floats = total;
    size_t used = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        if (!holds(p, coords)) continue;
        p->data = m->storage + used;
        used += p->numel;
        if (b.slots[i]) *b.slots[i] = p->data;
    }
    if (cfg->tie_word_embeddings) m->lm_head = m->embedding;
    free(b.slots);

    m->inv_freq = xcalloc((size_t)cfg->rope.rotary_dim / 2 + 1, sizeof(float));
    rope_frequencies(cfg, m->inv_freq);
}

void model_free(struct model *m)
{
    if (m->ops && m->ops->constant) m->ops->constant(NULL, 0); /* its weights are going */
    if (m->ops && !m->ops->host_visible) {
        m->ops->release(m->device_storage);
        m->ops->release(m->device_grad_storage);
        m->ops->release(m->device_inv_freq);
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
    free(m->grad_storage);
    free(m->params);
    free(m->layers);
    free(m->storage);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

struct param *model_find_param(struct model *m, const char *name)
{
    for (int i = 0; i < m->n_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
    return NULL;
}

/* ---- gradients ---------------------------------------------------------------------- */

/* The field of struct layer_grads (or the model's own) that holds a parameter's
 * gradient; expert entries go to their slot in the per-expert arrays. */
static void publish_grad(struct model *m, const struct param *p)
{
    if (!p->data) return; /* held by another rank (stage or EP rank) */
    if (p->buffer) return;  /* e_score_correction_bias: never trained, no gradient slot */
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
            (p->kind == PARAM_ATTENTION || p->kind == PARAM_NORM))
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
    size_t total = 0;
    for (int i = 0; i < m->n_params; i++) {
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
    set_backward_floor(m);
}

void model_zero_grads(struct model *m)
{
    if (m->grad_storage) memset(m->grad_storage, 0, m->grad_floats * sizeof(float));
    if (m->device_grad_storage) m->ops->zero(m->device_grad_storage, m->grad_floats * sizeof(float));
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

void model_attach(struct model *m, const struct backend *ops)
{
    if (m->ops) fatal(EXIT_RUNTIME, "model_attach: the model is attached already");
    m->ops = ops;
    if (ops->host_visible) return; /* the host storage is the backend's */

    size_t W = m->storage_floats;
    m->device_storage = ops->alloc(W * sizeof(float));
    ops->upload(m->device_storage, m->storage, W * sizeof(float));
    size_t n_freq = (size_t)m->cfg.rope.rotary_dim / 2 + 1;
    m->device_inv_freq = ops->alloc(n_freq * sizeof(float));
    ops->upload(m->device_inv_freq, m->inv_freq, n_freq * sizeof(float));
    float *dev = m->device_storage;
    bool tied = m->lm_head == m->embedding;
    m->embedding = moved(m->embedding, m->storage, W, dev);
    m->final_norm = moved(m->final_norm, m->storage, W, dev);
    m->lm_head = tied ? m->embedding : moved(m->lm_head, m->storage, W, dev);
    for (int l = 0; l < m->cfg.num_layers; l++) {
        struct layer_weights *w = &m->layers[l];
        float **fields[] = {&w->input_norm, &w->post_norm, &w->q, &w->k, &w->v, &w->o,
                            &w->q_bias, &w->k_bias, &w->v_bias, &w->o_bias, &w->q_norm,
                            &w->k_norm, &w->q_a, &w->q_a_bias, &w->q_a_norm, &w->q_b,
                            &w->kv_a, &w->kv_a_bias, &w->kv_a_norm, &w->kv_b, &w->sinks,
                            &w->router, &w->router_bias, &w->router_logit_bias,
                            &w->expert_gate, &w->expert_up, &w->expert_down,
                            &w->expert_gate_bias, &w->expert_up_bias, &w->expert_down_bias,
                            &w->shared_gate, &w->shared_up, &w->shared_down,
                            &w->shared_expert_gate, &w->mlp_gate, &w->mlp_up, &w->mlp_down};
        _Static_assert(sizeof fields / sizeof fields[0] == sizeof(struct layer_weights) / sizeof(float *),
                       "every field of struct layer_weights");
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
            *fields[i] = moved(*fields[i], m->storage, W, dev);
    }
    if (ops->constant) /* the frozen weights, as the backend may keep them */
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
        for (int e = 0; e < local; e++) {
            g->expert_gate[e] = moved(g->expert_gate[e], m->grad_storage, G, gdev);
            g->expert_up[e] = moved(g->expert_up[e], m->grad_storage, G, gdev);
            g->expert_down[e] = moved(g->expert_down[e], m->grad_storage, G, gdev);
            g->expert_gate_bias[e] = moved(g->expert_gate_bias[e], m->grad_storage, G, gdev);
            g->expert_up_bias[e] = moved(g->expert_up_bias[e], m->grad_storage, G, gdev);
            g->expert_down_bias[e] = moved(g->expert_down_bias[e], m->grad_storage, G, gdev);
        }
    }
}

void model_download_grads(struct model *m)
{
    if (m->device_grad_storage)
        m->ops->download(m->grad_storage, m->device_grad_storage, m->grad_floats * sizeof(float));
}

float *model_compute_data(const struct model *m, const struct param *p)
{
    return m->device_storage ? moved(p->data, m->storage, m->storage_floats, m->device_storage)
                             : p->data;
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

/* ---- loading ------------------------------------------------------------------------ */

/* Where a parameter's values are: its tensor from an element offset and, for an fp8
 * tensor, the scale tensor that multiplies it (NULL otherwise). A strided source (cols >
 * 0) reads the parameter's element (r, c) (r < numel / cols) from tensor element offset +
 * r * row_stride + c * col_stride: gpt_oss's fused experts, whose matrices esft holds
 * transposed or de-interleaved. An MXFP4 source (mxfp4_scales non-NULL; tensor is the
 * blocks) counts elements of the dequantised tensor. */
struct weight_source {
    const struct st_tensor *tensor;
    size_t offset;
    const struct st_tensor *scale; /* [..., ceil(R / block[0]), ceil(C / block[1])] */
    int block[2];
    size_t cols, row_stride, col_stride;
    const struct st_tensor *mxfp4_scales; /* [..., R, C / 32] u8 E8M0 exponents */
};

/* FP4 E2M1 values by their 4 bits (transformers integrations/mxfp4.py FP4_VALUES). */
static const float FP4_E2M1[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Element f of an MXFP4 tensor dequantised ([..., R, C] flattened; blocks [..., R, C / 32,
 * 16], scales [..., R, C / 32]): block f / 32 holds 16 bytes, the low nibble the even
 * element and the high nibble the odd one, and one exponent e: FP4_E2M1[nibble] * 2^(e -
 * 127). As convert_moe_packed_tensors: lut[nibble] times torch.ldexp's 2^(e - 127)
 * (2.0 ** 128 = inf for e = 255, as torch.pow gives). */
static float mxfp4_value(const struct weight_source *src, size_t f)
{
    const uint8_t *blocks = (const uint8_t *)src->tensor->data;
    const uint8_t *scales = (const uint8_t *)src->mxfp4_scales->data;
    size_t block = f / 32, within = f % 32;
    uint8_t byte = blocks[block * 16 + within / 2];
    int nibble = within % 2 ? byte >> 4 : byte & 0x0F;
    return FP4_E2M1[nibble] * ldexpf(1.0f, (int)scales[block] - 127);
}

static float scalar_f32(const struct st_tensor *t, size_t i)
{
    const unsigned char *at = (const unsigned char *)t->data + i * st_dtype_size(t->dtype);
    uint16_t h;
    float f;
    switch (t->dtype) {
    case ST_BF16:
        memcpy(&h, at, 2);
        return st_bf16_to_f32(h);
    case ST_F16:
        memcpy(&h, at, 2);
        return st_f16_to_f32(h);
    default:
        memcpy(&f, at, 4);
        return f; /* F32: locate admits no other scale dtype */
    }
}

/* count elements of an fp8 tensor [..., R, C] from element offset, dequantised:
 * w[r][c] = q[r][c] * scale[r / block[0]][c / block[1]], one fp32 product as transformers'
 * Fp8Dequantize (q.to(float32) * scale.to(float32)). Blocks at the right and bottom edges
 * may be partial (the scale grid rounds up, as DeepSeek's weight_dequant). */
static void dequantise_range(const struct weight_source *src, size_t count, float *out)
{
    const struct st_tensor *t = src->tensor;
    size_t R = (size_t)t->shape[t->rank - 2], C = (size_t)t->shape[t->rank - 1];
    size_t SR = (size_t)src->scale->shape[t->rank - 2], SC = (size_t)src->scale->shape[t->rank - 1];
    const uint8_t *q = (const uint8_t *)t->data;
    size_t f = src->offset;
    size_t matrix = f / (R * C), r = f / C % R, c = f % C;
    for (size_t i = 0; i < count; i++, f++) {
        float v = t->dtype == ST_F8_E4M3 ? st_f8_e4m3_to_f32(q[f]) : st_f8_e5m2_to_f32(q[f]);
        size_t block = (matrix * SR + r / (size_t)src->block[0]) * SC + c / (size_t)src->block[1];
        out[i] = v * scalar_f32(src->scale, block);
        if (++c == C) {
            c = 0;
            if (++r == R) r = 0, matrix++;
        }
    }
}

/* Element f of a float tensor, in fp32 (locate admits only float dtypes here). */
static float float_value(const struct st_tensor *t, size_t f)
{
    if (t->dtype != ST_F64) return scalar_f32(t, f);
    double d;
    memcpy(&d, (const unsigned char *)t->data + f * 8, 8);
    return (float)d;
}

/* count elements of a strided or MXFP4 source (see struct weight_source), in fp32. */
static void read_strided(const struct weight_source *src, size_t count, float *out)
{
    size_t cols = src->cols ? src->cols : count;
    size_t row_stride = src->cols ? src->row_stride : 0, col_stride = src->cols ? src->col_stride : 1;
    for (size_t i = 0; i < count; i++) {
        size_t f = src->offset + (i / cols) * row_stride + (i % cols) * col_stride;
        out[i] = src->mxfp4_scales ? mxfp4_value(src, f) : float_value(src->tensor, f);
    }
}

/* count elements of the source, converted (or dequantised) to fp32. */
static int read_range_f32(const struct weight_source *src, size_t count, float *out, char *err,
                          size_t err_size)
{
    const struct st_tensor *t = src->tensor;
    if (src->scale) {
        dequantise_range(src, count, out);
        return 0;
    }
    if (src->cols || src->mxfp4_scales) {
        read_strided(src, count, out);
        return 0;
    }
    const unsigned char *base = (const unsigned char *)t->data;
    size_t size = st_dtype_size(t->dtype);
    for (size_t i = 0; i < count; i++) {
        const unsigned char *at = base + (src->offset + i) * size;
        uint16_t h;
        switch (t->dtype) {
        case ST_F32: memcpy(&out[i], at, 4); break;
        case ST_BF16: memcpy(&h, at, 2); out[i] = st_bf16_to_f32(h); break;
        case ST_F16: memcpy(&h, at, 2); out[i] = st_f16_to_f32(h); break;
        case ST_F64: {
            double d;
            memcpy(&d, at, 8);
            out[i] = (float)d;
            break;
        }
        default:
            snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight",
                     t->file, t->name, st_dtype_name(t->dtype));
            return -1;
        }
    }
    return 0;
}

/* The config.json keys behind p's shape, for messages ("vocab_size x hidden_size"). */
static const char *shape_keys(const struct model_config *c, const struct param *p)
{
    bool down = p->part == MLP_DOWN;
    static char text[3][96]; /* messages of one thread */
    const char *E = hfconfig_experts_key(c), *I = hfconfig_expert_width_key(c);
    if (c->attention == ATTENTION_MLA && p->kind == PARAM_ATTENTION) {
        static const struct {
            const char *suffix, *keys;
        } mla[] = {
            {".q_proj.weight", "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim) x hidden_size"},
            {".q_a_proj.weight", "q_lora_rank x hidden_size"},
            {".q_a_proj.bias", "q_lora_rank"},
            {".q_a_layernorm.weight", "q_lora_rank"},
            {".q_b_proj.weight", "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim) x q_lora_rank"},
            {".kv_a_proj_with_mqa.weight", "kv_lora_rank + qk_rope_head_dim x hidden_size"},
            {".kv_a_proj_with_mqa.bias", "kv_lora_rank + qk_rope_head_dim"},
            {".kv_a_layernorm.weight", "kv_lora_rank"},
            {".kv_b_proj.weight", "num_attention_heads * (qk_nope_head_dim + v_head_dim) x kv_lora_rank"},
            {".o_proj.weight", "hidden_size x num_attention_heads * v_head_dim"},
            {".o_proj.bias", "hidden_size"},
        };
        for (size_t i = 0; i < sizeof mla / sizeof mla[0]; i++) {
            size_t n = strlen(p->name), k = strlen(mla[i].suffix);
            if (n >= k && strcmp(p->name + n - k, mla[i].suffix) == 0) return mla[i].keys;
        }
    }
    switch (p->kind) {
    case PARAM_EMBEDDING:
    case PARAM_LM_HEAD:
        return "vocab_size x hidden_size";
    case PARAM_NORM:
        return "hidden_size";
    case PARAM_ROUTER:
        snprintf(text[0], sizeof text[0], p->rank == 1 ? "%s" : "%s x hidden_size", E);
        return text[0];
    case PARAM_EXPERT:
        if (p->rank == 1) return down ? "hidden_size" : I; /* gpt_oss's expert biases */
        snprintf(text[1], sizeof text[1], down ? "hidden_size x %s" : "%s x hidden_size", I);
        return text[1];
    case PARAM_SHARED_EXPERT:
        if (p->part == MLP_NONE) return "1 x hidden_size";
        if (c->family != HF_QWEN2_MOE) {
            snprintf(text[2], sizeof text[2],
                     down ? "hidden_size x n_shared_experts * %s" : "n_shared_experts * %s x hidden_size", I);
            return text[2];
        }
        return down ? "hidden_size x shared_expert_intermediate_size"
                    : "shared_expert_intermediate_size x hidden_size";
    case PARAM_DENSE_MLP:
        return down ? "hidden_size x intermediate_size" : "intermediate_size x hidden_size";
    case PARAM_ATTENTION:
        if (strstr(p->name, ".sinks")) return "num_attention_heads";
        if (strstr(p->name, "norm.weight"))
            return c->qk_norm == QK_NORM_PER_HEAD ? "head_dim"
                   : strstr(p->name, "q_norm")    ? "num_attention_heads * head_dim"
                                                  : "num_key_value_heads * head_dim";
        if (strstr(p->name, "o_proj.weight")) return "hidden_size x num_attention_heads * head_dim";
        if (strstr(p->name, "o_proj.bias")) return "hidden_size";
        if (strstr(p->name, "q_proj.weight")) return "num_attention_heads * head_dim x hidden_size";
        if (strstr(p->name, "q_proj.bias")) return "num_attention_heads * head_dim";
        if (strstr(p->name, ".weight")) return "num_key_value_heads * head_dim x hidden_size";
        return "num_key_value_heads * head_dim";
    default:
        return "?";
    }
}

static bool is_float_dtype(enum st_dtype dtype)
{
    return dtype == ST_F32 || dtype == ST_BF16 || dtype == ST_F16 || dtype == ST_F64;
}

static bool is_fp8_dtype(enum st_dtype dtype)
{
    return dtype == ST_F8_E4M3 || dtype == ST_F8_E5M2;
}

/* The matrices DeepSeek-V3 stores in fp8: the linear layers of the decoder layers
 * (attention projections, routed and shared experts, dense MLPs). Embedding, lm_head,
 * norms, biases and the router stay in a float dtype there, and transformers' fp8
 * integration leaves them unconverted (lm_head in modules_to_not_convert; the others are
 * no nn.Linear). */
static bool may_be_fp8(const struct param *p)
{
    if (p->rank != 2) return false;
    switch (p->kind) {
    case PARAM_ATTENTION:
    case PARAM_EXPERT:
    case PARAM_DENSE_MLP:
        return true;
    case PARAM_SHARED_EXPERT:
        return p->part != MLP_NONE; /* not qwen2_moe's shared_expert_gate [1, H] */
    default:
        return false;
    }
}

/* The fp8 tensor t's scale: "<t's name>_scale_inv", i.e. "<module>.weight_scale_inv"
 * (DeepSeek-V3, transformers' Fp8Quantize) or "experts.gate_up_proj_scale_inv" for fused
 * experts; a float tensor with one entry per block, [..., ceil(R / B0), ceil(C / B1)]. */
static int locate_scale(const struct model_config *c, const struct st_checkpoint *ckpt,
                        const struct param *p, struct weight_source *src, char *err,
                        size_t err_size)
{
    const struct st_tensor *t = src->tensor;
    if (!c->quantization.fp8) {
        snprintf(err, err_size,
                 "%s: tensor '%s' is %s (fp8), but %s/config.json has no "
                 "quantization_config (fp8 weights need its quant_method \"fp8\" and "
                 "weight_block_size)",
                 t->file, t->name, st_dtype_name(t->dtype), ckpt->dir);
        return -1;
    }
    if (!may_be_fp8(p)) {
        snprintf(err, err_size,
                 "%s: tensor '%s' is %s (fp8), where esft needs a float "
                 "weight: only the linear layers of decoder layers may be fp8, not a %s%s",
                 t->file, t->name, st_dtype_name(t->dtype), param_kind_name(p->kind),
                 p->rank == 1 ? " vector" : "");
        return -1;
    }
    char name[PARAM_NAME_MAX + 48];
    snprintf(name, sizeof name, "%s_scale_inv", t->name);
    const struct st_tensor *s = st_find(ckpt, name);
    if (!s) {
        snprintf(err, err_size,
                 "%s: tensor '%s' is %s (fp8), but its scale '%s' is not in the "
                 "checkpoint",
                 t->file, t->name, st_dtype_name(t->dtype), name);
        return -1;
    }
    if (s->dtype != ST_F32 && s->dtype != ST_BF16 && s->dtype != ST_F16) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s; an fp8 scale is F32, BF16 or F16",
                 s->file, s->name, st_dtype_name(s->dtype));
        return -1;
    }
    int64_t grid[ST_MAX_RANK];
    const int *B = c->quantization.block;
    for (int k = 0; k < t->rank - 2; k++) grid[k] = t->shape[k];
    grid[t->rank - 2] = (t->shape[t->rank - 2] + B[0] - 1) / B[0];
    grid[t->rank - 1] = (t->shape[t->rank - 1] + B[1] - 1) / B[1];
    if (st_check_shape(s, t->rank, grid, err, err_size) != 0) {
        size_t used = strlen(err);
        snprintf(err + used, err_size - used,
                 " (one scale per block of %s [%lld, %lld] in blocks "
                 "of [%d, %d], quantization_config.weight_block_size of %s/config.json)",
                 t->name, (long long)t->shape[t->rank - 2], (long long)t->shape[t->rank - 1], B[0],
                 B[1], ckpt->dir);
        return -1;
    }
    src->scale = s;
    src->block[0] = B[0];
    src->block[1] = B[1];
    return 0;
}

/* The MXFP4 pair "<fused>_blocks" [E, R, C / 32, 16] and "<fused>_scales" [E, R, C / 32],
 * both u8, of the matrix that dequantises to [E, R, C] (gate_up_proj: R = 2I, C = H;
 * down_proj: R = H, C = I; transformers transposes the last two dims after, esft reads
 * the [R, C] rows as they are). src->tensor = the blocks. Named errors for a missing
 * half, a wrong dtype or shape, or a C that is not whole blocks. */
static int locate_mxfp4(const struct model_config *c, const struct st_checkpoint *ckpt,
                        const char *fused, int64_t R, int64_t C, const char *dims,
                        struct weight_source *src, char *err, size_t err_size)
{
    char blocks_name[PARAM_NAME_MAX + 48], scales_name[PARAM_NAME_MAX + 48];
    snprintf(blocks_name, sizeof blocks_name, "%s_blocks", fused);
    snprintf(scales_name, sizeof scales_name, "%s_scales", fused);
    const struct st_tensor *blocks = st_find(ckpt, blocks_name), *scales = st_find(ckpt, scales_name);
    int64_t E = c->num_experts;
    if (!blocks || !scales) {
        snprintf(err, err_size, "%s: MXFP4 tensor '%s' not found (nor the unquantised '%s'; "
                 "an MXFP4 checkpoint stores each fused expert matrix as _blocks and _scales)",
                 ckpt->dir, blocks ? scales_name : blocks_name, fused);
        return -1;
    }
    if (!c->quantization.mxfp4) {
        snprintf(err, err_size, "%s: tensor '%s' is MXFP4, but %s/config.json has no "
                 "quantization_config with quant_method \"mxfp4\"", blocks->file, blocks_name,
                 ckpt->dir);
        return -1;
    }
    const struct st_tensor *pair[2] = {blocks, scales};
    for (int i = 0; i < 2; i++)
        if (pair[i]->dtype != ST_U8) {
            snprintf(err, err_size, "%s: tensor '%s': dtype %s; MXFP4 %s are U8", pair[i]->file,
                     pair[i]->name, st_dtype_name(pair[i]->dtype), i ? "scales" : "blocks");
            return -1;
        }
    if (C % 32 != 0) {
        snprintf(err, err_size, "%s: tensor '%s': rows of %lld values are not whole MXFP4 "
                 "blocks of 32 (%s of %s/config.json)", blocks->file, blocks_name, (long long)C,
                 dims, ckpt->dir);
        return -1;
    }
    if (st_expect_shape(blocks, err, err_size, E, R, C / 32, 16) != 0 ||
        st_expect_shape(scales, err, err_size, E, R, C / 32) != 0) {
        size_t n = strlen(err);
        snprintf(err + n, err_size - n, " (MXFP4 of the %s matrix of %s/config.json: blocks "
                 "[E, R, C/32, 16], scales [E, R, C/32])", dims, ckpt->dir);
        return -1;
    }
    src->tensor = blocks;
    src->mxfp4_scales = scales;
    return 0;
}

/* A gpt_oss routed expert's entry in transformers' fused layout (GptOssExperts, saved as
 * is by 5.24): mlp.experts.gate_up_proj [E, H, 2I] used as x @ W, gate the even columns
 * and up the odd ones, gate_up_proj_bias [E, 2I] (even / odd likewise), down_proj
 * [E, I, H], down_proj_bias [E, H]; or with MXFP4 the _blocks / _scales pairs of
 * gate_up_proj [E, 2I, H] and down_proj [E, H, I] before transformers' transpose. esft's
 * gate [I, H] is then gate[i][h] = gate_up_proj[e][h][2i], and down [H, I] is
 * down[h][i] = down_proj[e][i][h]. */
static int locate_gpt_oss_expert(const struct model *m, const struct st_checkpoint *ckpt,
                                 const struct param *p, struct weight_source *src, char *err,
                                 size_t err_size)
{
    const struct model_config *c = &m->cfg;
    size_t E = (size_t)c->num_experts, I = (size_t)c->expert_intermediate_size;
    size_t H = (size_t)c->hidden_size, e = (size_t)p->expert;
    bool down = p->part == MLP_DOWN, up = p->part == MLP_UP, bias = p->rank == 1;
    char fused[PARAM_NAME_MAX + 32];
    snprintf(fused, sizeof fused, "model.layers.%d.mlp.experts.%s%s", p->layer,
             down ? "down_proj" : "gate_up_proj", bias ? "_bias" : "");
    const struct st_tensor *t = st_find(ckpt, fused);
    int rc = 0;
    if (bias) {
        if (!t) {
            snprintf(err, err_size, "%s: tensor '%s' not found (nor the fused '%s')", ckpt->dir,
                     p->name, fused);
            return -1;
        }
        rc = down ? st_expect_shape(t, err, err_size, E, H) : st_expect_shape(t, err, err_size, E, 2 * I);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (num_local_experts x %s of %s/config.json)",
                     down ? "hidden_size" : "2 * intermediate_size", ckpt->dir);
            return -1;
        }
        src->tensor = t;
        if (down) {
            src->offset = e * H;
        } else { /* gate_up_proj_bias[e][2i (+1)] */
            src->offset = e * 2 * I + (up ? 1 : 0);
            src->cols = I, src->row_stride = 0, src->col_stride = 2;
        }
    } else if (t) {
        rc = down ? st_expect_shape(t, err, err_size, E, I, H)
                  : st_expect_shape(t, err, err_size, E, H, 2 * I);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (num_local_experts x %s of %s/config.json)",
                     down ? "intermediate_size x hidden_size" : "hidden_size x 2 * intermediate_size",
                     ckpt->dir);
            return -1;
        }
        src->tensor = t;
        if (down) { /* down[h][i] = down_proj[e][i][h] */
            src->offset = e * I * H;
            src->cols = I, src->row_stride = 1, src->col_stride = H;
        } else { /* gate[i][h] = gate_up_proj[e][h][2i], up: 2i + 1 */
            src->offset = e * H * 2 * I + (up ? 1 : 0);
            src->cols = H, src->row_stride = 2, src->col_stride = 2 * I;
        }
    } else if (down) { /* MXFP4: down_proj dequantises to [E, H, I], esft's [H, I] rows */
        if (locate_mxfp4(c, ckpt, fused, (int64_t)H, (int64_t)I,
                         "num_local_experts x hidden_size x intermediate_size", src, err,
                         err_size) != 0)
            return -1;
        src->offset = e * H * I;
    } else { /* MXFP4: gate_up_proj dequantises to [E, 2I, H]: gate row i is row 2i */
        if (locate_mxfp4(c, ckpt, fused, 2 * (int64_t)I, (int64_t)H,
                         "num_local_experts x 2 * intermediate_size x hidden_size", src, err,
                         err_size) != 0)
            return -1;
        src->offset = e * 2 * I * H + (up ? H : 0);
        src->cols = H, src->row_stride = 2 * H, src->col_stride = 1;
    }
    if (src->mxfp4_scales) return 0;
    if (!is_float_dtype(t->dtype)) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight%s",
                 t->file, t->name, st_dtype_name(t->dtype),
                 is_fp8_dtype(t->dtype) ? " (fp8 is not read for gpt_oss's fused experts)" : "");
        return -1;
    }
    return 0;
}

/* Where p's weights are in the checkpoint: its own tensor from offset 0, or a routed
 * expert's matrix in the fused spelling (transformers 5 in memory): experts.gate_up_proj
 * [E, 2I, H] (gate rows first, then up) and experts.down_proj [E, H, I]. Checks that the
 * tensor is there, has the shape config.json gives and a floating-point dtype: from the
 * header alone, so before anything is allocated for it. */
static int locate(const struct model *m, const struct st_checkpoint *ckpt, const struct param *p,
                  struct weight_source *src, char *err, size_t err_size)
{
    const struct model_config *c = &m->cfg;
    const struct st_tensor *t = st_find(ckpt, p->name);
    *src = (struct weight_source){.tensor = NULL};
    size_t *offset = &src->offset;
    int rc = 0;
    if (t) {
        rc = p->rank == 2 ? st_expect_shape(t, err, err_size, p->shape[0], p->shape[1])
                          : st_expect_shape(t, err, err_size, p->shape[0]);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (%s of %s/config.json)", shape_keys(c, p), ckpt->dir);
        }
    } else if (p->kind == PARAM_EXPERT && c->family == HF_GPT_OSS) {
        return locate_gpt_oss_expert(m, ckpt, p, src, err, err_size);
    } else if (p->kind == PARAM_EXPERT) {
        int64_t E = c->num_experts, I = c->expert_intermediate_size, H = c->hidden_size;
        char name[PARAM_NAME_MAX + 32];
        bool down = p->part == MLP_DOWN;
        snprintf(name, sizeof name, "model.layers.%d.%s.experts.%s", p->layer, moe_module(c),
                 down ? "down_proj" : "gate_up_proj");
        t = st_find(ckpt, name);
        if (!t) {
            snprintf(err, err_size, "%s: tensor '%s' not found (nor the fused '%s')", ckpt->dir,
                     p->name, name);
            return -1;
        }
        rc = down ? st_expect_shape(t, err, err_size, E, H, I)
                  : st_expect_shape(t, err, err_size, E, 2 * I, H);
        if (rc != 0) {
            const char *experts = hfconfig_experts_key(c), *width = hfconfig_expert_width_key(c);
            size_t n = strlen(err);
            if (down)
                snprintf(err + n, err_size - n, " (%s x hidden_size x %s of %s/config.json)",
                         experts, width, ckpt->dir);
            else
                snprintf(err + n, err_size - n, " (%s x 2 * %s x hidden_size of %s/config.json)",
                         experts, width, ckpt->dir);
        }
        *offset = (size_t)p->expert * (size_t)(down ? H * I : 2 * I * H);
        if (p->part == MLP_UP) *offset += (size_t)(I * H);
    } else {
        snprintf(err, err_size, "%s: tensor '%s' not found in the checkpoint", ckpt->dir, p->name);
        return -1;
    }
    if (rc != 0) return -1;
    src->tensor = t;
    if (is_fp8_dtype(t->dtype)) return locate_scale(c, ckpt, p, src, err, err_size);
    if (!is_float_dtype(t->dtype)) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight", t->file,
                 t->name, st_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

int model_check_checkpoint(const struct model_config *cfg, const struct layout_grid *grid,
                           struct layout_coords coords, const char *dir, char *err, size_t err_size)
{
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, err_size);
    if (!ckpt) return -1;
    struct model m;
    struct table_builder b;
    build_table(&m, cfg, grid, coords, &b);
    free(b.slots);
    int rc = 0;
    for (int i = 0; i < m.n_params && rc == 0; i++) {
        struct weight_source src;
        if (holds(&m.params[i], coords)) rc = locate(&m, ckpt, &m.params[i], &src, err, err_size);
    }
    model_free(&m);
    st_checkpoint_close(ckpt);
    return rc;
}

/* Logs the tensors of decoder layers past num_hidden_layers: the multi-token-prediction
 * layers deepseek_v3 and glm4_moe checkpoints carry (GLM-4.5: model.layers.92.*), which
 * transformers does not build and esft does not read. */
static void log_unused_layers(const struct model_config *c, const struct st_checkpoint *ckpt)
{
    int count = 0, lowest = -1, highest = -1;
    for (int i = 0; i < ckpt->n_tensors; i++) {
        int layer;
        if (sscanf(ckpt->tensors[i].name, "model.layers.%d.", &layer) != 1 || layer < c->num_layers)
            continue;
        count++;
        if (lowest < 0 || layer < lowest) lowest = layer;
        if (layer > highest) highest = layer;
    }
    if (count == 0) return;
    log_info("model: %d tensors of layer%s %d%s%.0d past num_hidden_layers %d are not used "
             "(multi-token prediction, num_nextn_predict_layers %d: transformers ignores them too)",
             count, highest > lowest ? "s" : "", lowest, highest > lowest ? "-" : "",
             highest > lowest ? highest : 0, c->num_layers, c->num_mtp_layers);
}

int model_load(struct model *m, const char *dir, char *err, size_t err_size)
{
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, err_size);
    if (!ckpt) return -1;
    log_unused_layers(&m->cfg, ckpt);
    int rc = 0, dequantised = 0;
    for (int i = 0; i < m->n_params && rc == 0; i++) {
        const struct param *p = &m->params[i];
        struct weight_source src;
        if (!p->data) continue;
        rc = locate(m, ckpt, p, &src, err, err_size);
        if (rc == 0) rc = read_range_f32(&src, p->numel, p->data, err, err_size);
        dequantised += rc == 0 && src.scale;
    }
    if (rc == 0 && dequantised > 0)
        log_info("model: %d fp8 tensors dequantised to fp32 (rank 0's; blocks of [%d, %d], "
                 "quantization_config of %s/config.json)",
                 dequantised, m->cfg.quantization.block[0], m->cfg.quantization.block[1], dir);
    st_checkpoint_close(ckpt);
    return rc;
}
