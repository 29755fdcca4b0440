/* model: parameter table, weight loading and the forward pass (see model.h).
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

/* Names of a routed expert's three matrices: mixtral's w1 (gate), w3 (up), w2 (down). */
static const char *expert_matrix_name(const struct model_config *cfg, enum mlp_part part)
{
    if (cfg->family == HF_MIXTRAL) return part == MLP_GATE ? "w1" : part == MLP_UP ? "w3" : "w2";
    return part == MLP_GATE ? "gate_proj" : part == MLP_UP ? "up_proj" : "down_proj";
}

static void add_attention(struct table_builder *b, int l)
{
    const struct model_config *c = &b->model->cfg;
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
    const char *moe = moe_module(c);
    int64_t I = c->expert_intermediate_size;
    add_param(b, &w->router, PARAM_ROUTER, MLP_NONE, l, -1, c->num_experts, H, "%s.%d.%s.gate.weight", P, l, moe);
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
    double H = c->hidden_size, q = (double)c->num_heads * c->head_dim;
    double kv = (double)c->num_kv_heads * c->head_dim;
    double cost = H * (2 * q + 2 * kv); /* q, k, v, o */
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
        }
    }
    size_t total = 0;
    for (int i = 0; i < m->n_params; i++) {
        m->params[i].trainable = trainable[i];
        if (trainable[i] && m->params[i].data) total += m->params[i].numel;
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
                            &w->k_norm, &w->router, &w->expert_gate, &w->expert_up,
                            &w->expert_down, &w->shared_gate, &w->shared_up, &w->shared_down,
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
                            &g->k_norm, &g->router, &g->shared_gate, &g->shared_up,
                            &g->shared_down, &g->shared_expert_gate, &g->mlp_gate, &g->mlp_up,
                            &g->mlp_down};
        _Static_assert(sizeof fields / sizeof fields[0] + 3 == sizeof(struct layer_grads) / sizeof(float *),
                       "every field of struct layer_grads (and its three expert arrays)");
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
            *fields[i] = moved(*fields[i], m->grad_storage, G, gdev);
        for (int e = 0; e < local; e++) {
            g->expert_gate[e] = moved(g->expert_gate[e], m->grad_storage, G, gdev);
            g->expert_up[e] = moved(g->expert_up[e], m->grad_storage, G, gdev);
            g->expert_down[e] = moved(g->expert_down[e], m->grad_storage, G, gdev);
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

/* count elements of t starting at element offset, converted to fp32. */
static int read_range_f32(const struct st_tensor *t, size_t offset, size_t count, float *out,
                          char *err, size_t err_size)
{
    const unsigned char *base = (const unsigned char *)t->data;
    size_t size = st_dtype_size(t->dtype);
    for (size_t i = 0; i < count; i++) {
        const unsigned char *at = base + (offset + i) * size;
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
    bool qwen = c->family == HF_QWEN2_MOE || c->family == HF_QWEN3_MOE, down = p->part == MLP_DOWN;
    switch (p->kind) {
    case PARAM_EMBEDDING:
    case PARAM_LM_HEAD:
        return "vocab_size x hidden_size";
    case PARAM_NORM:
        return "hidden_size";
    case PARAM_ROUTER:
        return c->family == HF_MIXTRAL ? "num_local_experts x hidden_size"
                                       : "num_experts x hidden_size";
    case PARAM_EXPERT:
        if (qwen)
            return down ? "hidden_size x moe_intermediate_size"
                        : "moe_intermediate_size x hidden_size";
        return down ? "hidden_size x intermediate_size" : "intermediate_size x hidden_size";
    case PARAM_SHARED_EXPERT:
        if (p->part == MLP_NONE) return "1 x hidden_size";
        return down ? "hidden_size x shared_expert_intermediate_size"
                    : "shared_expert_intermediate_size x hidden_size";
    case PARAM_DENSE_MLP:
        return down ? "hidden_size x intermediate_size" : "intermediate_size x hidden_size";
    case PARAM_ATTENTION:
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

/* Where p's weights are in the checkpoint: its own tensor from offset 0, or a routed
 * expert's matrix in the fused spelling (transformers 5 in memory): experts.gate_up_proj
 * [E, 2I, H] (gate rows first, then up) and experts.down_proj [E, H, I]. Checks that the
 * tensor is there, has the shape config.json gives and a floating-point dtype: from the
 * header alone, so before anything is allocated for it. */
static int locate(const struct model *m, const struct st_checkpoint *ckpt, const struct param *p,
                  const struct st_tensor **tensor, size_t *offset, char *err, size_t err_size)
{
    const struct model_config *c = &m->cfg;
    const struct st_tensor *t = st_find(ckpt, p->name);
    *offset = 0;
    int rc = 0;
    if (t) {
        rc = p->rank == 2 ? st_expect_shape(t, err, err_size, p->shape[0], p->shape[1])
                          : st_expect_shape(t, err, err_size, p->shape[0]);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (%s of %s/config.json)", shape_keys(c, p), ckpt->dir);
        }
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
            const char *experts = c->family == HF_MIXTRAL ? "num_local_experts" : "num_experts";
            const char *width = c->family == HF_QWEN2_MOE || c->family == HF_QWEN3_MOE
                                    ? "moe_intermediate_size"
                                    : "intermediate_size";
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
    if (!is_float_dtype(t->dtype)) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight", t->file,
                 t->name, st_dtype_name(t->dtype));
        return -1;
    }
    *tensor = t;
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
        const struct st_tensor *t;
        size_t offset;
        if (holds(&m.params[i], coords))
            rc = locate(&m, ckpt, &m.params[i], &t, &offset, err, err_size);
    }
    model_free(&m);
    st_checkpoint_close(ckpt);
    return rc;
}

int model_load(struct model *m, const char *dir, char *err, size_t err_size)
{
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, err_size);
    if (!ckpt) return -1;
    int rc = 0;
    for (int i = 0; i < m->n_params && rc == 0; i++) {
        const struct param *p = &m->params[i];
        const struct st_tensor *t;
        size_t offset;
        if (!p->data) continue;
        rc = locate(m, ckpt, p, &t, &offset, err, err_size);
        if (rc == 0) rc = read_range_f32(t, offset, p->numel, p->data, err, err_size);
    }
    st_checkpoint_close(ckpt);
    return rc;
}

/* ---- forward ------------------------------------------------------------------------ */

/* Message tags between pipeline stages (per pair of ranks, messages of one tag arrive in
 * the order they were sent: the micro-batch order of the schedule). */
enum { TAG_ACTIVATION = 1, TAG_BALANCE, TAG_GRADIENT, TAG_BALANCE_GRADIENT };

/* Where a MoE layer's token rows travel under expert parallelism. Sender side: rows are
 * sorted by expert (permute_by_expert), and EP rank d holds a contiguous block of experts,
 * so the rows for rank d are one contiguous run. Receiver side: the rows from source s
 * arrive in expert order ("source-major"); the local grouped GEMM wants them expert-major
 * (expert e: the rows of source 0, then source 1, ...), a fixed order for a given batch. */
struct ep_plan {
    int rows;                    /* rows received = rows of the local experts */
    int32_t *recv_counts;        /* [ep * E_local] rows from source s for local expert e */
    int32_t *local_offsets;      /* [E_local + 1] expert-major offsets */
    int32_t *expert_major;       /* [capacity] expert-major row -> source-major row */
    int32_t *source_major;       /* [capacity] source-major row -> expert-major row */
    /* the backend's copies of the three above, which the ops read (the same pointers
     * when the backend is host-visible) */
    int32_t *dev_local_offsets, *dev_expert_major, *dev_source_major;
    size_t *send_rows, *send_first, *recv_rows, *recv_first; /* [ep] in rows */
};

/* What one layer's forward leaves for its backward. In an inference workspace every
 * layer's pointers name the same buffers. */
struct layer_activations {
    float *x;                  /* [N,H] layer input */
    float *xn, *rstd_in;       /* [N,H], [N] input norm */
    float *q_proj, *k_proj;    /* before QK-norm (QK-norm layers; else NULL) */
    float *q_rstd, *k_rstd;    /* QK-norm's 1/rms */
    float *q, *k, *v;          /* what attention read (after norm and RoPE) */
    float *q_clamped, *k_clamped; /* clip_qkv (training): q, k after the clamp, before RoPE */
    float *attn;               /* [N, nH*Dh] attention output */
    float *h;                  /* [N,H] after the attention residual */
    float *hn, *rstd_post;     /* [N,H], [N] post-attention norm */
    float *probs;              /* [N,E] router probabilities */
    int32_t *offsets, *slot_of_row, *row_of_slot;
    /* expert parallelism: the rows this rank's experts received, expert-major */
    struct ep_plan *plan;      /* NULL when ep = 1 */
    float *xe, *ye;            /* [rows,H] received inputs, their outputs (ep > 1) */
    float *gate, *up, *act;    /* [rows,I] expert pre-activations and act(gate) * up */
    float *ys;                 /* [M,H] expert outputs, in this rank's slot order */
    float *shared_gate, *shared_up, *shared_act, *shared_out, *shared_logit;
    float *mlp_gate, *mlp_up, *mlp_act; /* dense layer */
    float *ffn;                /* [N,H] feed-forward output */
};

struct forward_workspace {
    int max_tokens, n_layers;
    bool training;
    /* where the buffers live: the model's backend (NULL: host memory), and whether the
     * host cannot read them (staged: results and exchanges go through host copies) */
    const struct backend *mem;
    bool staged;
    unsigned keep;                        /* FORWARD_KEEP_* */
    int vocab_size, top_k, n_experts;     /* of the logits (last stage; else 0) and routing */
    int32_t *tokens, *positions, *sample_start, *targets; /* [N] the batch's copies (staged) */
    float *h_send, *h_recv;               /* [N,H] host side of the stage exchange (staged) */
    float *h_ep_send, *h_ep_recv;         /* [capacity,H] host side of the EP exchange (staged) */
    int32_t *h_offsets;                   /* [E+1] a layer's expert offsets, read back (staged) */
    float *h_logits;                      /* [N,V] (staged, FORWARD_KEEP_LOGITS) */
    int32_t **h_topk_ids;                 /* host copies (staged, FORWARD_KEEP_ROUTING) */
    float **h_topk_weights, **h_router_logits;
    float *balance_block, *h_balance_block; /* [L][2E] counts, prob sums; its host copy */
    float *h_balance_coef;                /* [E] d aux / d probs as the host computes it */
    struct layer_activations *layers; /* [L] */
    float *x_final, *rstd_final, *xn_final, *logits;
    float *xs;                        /* [M,H] gathered rows (scratch) */
    int32_t **topk_ids;
    float **topk_weights, **router_logits;
    float **balance_counts, **balance_probs; /* [L] -> [E]: load-balancing statistics */
    float *balance_coef;                     /* [E]: d aux / d probs (backward) */
    int balance_tokens;                      /* N of the last forward */
    /* pipeline parallelism: the earlier stages' load-balancing sums (counts, then prob
     * sums: [2E]), received with the activations; the sends still in flight */
    double *balance_before;
    struct comm_request sends[2];
    /* backward scratch */
    float *dx, *dxn, *dq, *dk, *dv, *dattn, *dxs, *dxs2, *dys, *dact, *dgate, *dup;
    float *dweights, *drouter, *dshared_a, *dshared_b, *dshared_act, *dshared_out, *dgate_logit;
    float *ep_rows;                   /* [capacity,H] exchange scratch (ep > 1) */
    float *dye;                       /* [capacity,H] output gradients at the experts (ep > 1) */
    size_t *ep_counts, *ep_offsets;   /* [2 * ep] element counts of one exchange */
    int32_t *ep_send_counts;          /* [ep * E_local] rows for each rank's experts */
    /* every allocation, freed together: host memory, and the backend's buffers */
    struct ws_allocations {
        void **at;
        int capacity, count;
    } host, buffers;
};

static void remember(struct ws_allocations *list, void *p)
{
    if (list->count == list->capacity) {
        list->capacity = list->capacity ? 2 * list->capacity : 64;
        list->at = realloc(list->at, (size_t)list->capacity * sizeof(void *));
        if (!list->at) fatal(EXIT_RUNTIME, "out of memory (forward workspace)");
    }
    list->at[list->count++] = p;
}

/* Host memory of the workspace (plans, counts, staging), zeroed. */
static void *ws_host(struct forward_workspace *ws, size_t bytes)
{
    void *p = xcalloc(bytes ? bytes : 1, 1);
    remember(&ws->host, p);
    return p;
}

/* A buffer the ops work on: the backend's, zeroed (host memory when the model is not
 * attached to a backend). */
static void *ws_alloc(struct forward_workspace *ws, size_t bytes)
{
    if (!ws->mem) return ws_host(ws, bytes);
    void *p = ws->mem->alloc(bytes ? bytes : 1);
    remember(&ws->buffers, p);
    return p;
}

/* The most token-slot rows this rank's experts can receive for batches of N tokens on
 * each rank of the EP group: every token of every rank sends at most min(K, E_local)
 * slots here. N * K when ep = 1. */
static size_t expert_row_capacity(const struct model *m, int N)
{
    const struct model_config *c = &m->cfg;
    int K = c->top_k > 0 ? c->top_k : 1, local = m->n_local_experts > 0 ? m->n_local_experts : 1;
    return (size_t)m->grid.ep * (size_t)N * (size_t)(K < local ? K : local);
}

static struct ep_plan *ep_plan_new(struct forward_workspace *ws, const struct model *m, size_t capacity);

/* Buffers of one layer's activations. */
static void alloc_layer(struct forward_workspace *ws, const struct model *m, int N, bool moe,
                        struct layer_activations *a)
{
    const struct model_config *c = &m->cfg;
    size_t cap = expert_row_capacity(m, N);
    size_t H = (size_t)c->hidden_size, qw = (size_t)c->num_heads * c->head_dim,
           kvw = (size_t)c->num_kv_heads * c->head_dim;
    size_t K = (size_t)(c->top_k > 0 ? c->top_k : 1), E = (size_t)(c->num_experts > 0 ? c->num_experts : 1);
    size_t M = (size_t)N * K, I = (size_t)c->expert_intermediate_size;
    size_t S = (size_t)c->shared_expert_intermediate_size, D = (size_t)c->intermediate_size;
    size_t f = sizeof(float);
    a->x = ws_alloc(ws, N * H * f);
    a->xn = ws_alloc(ws, N * H * f);
    a->rstd_in = ws_alloc(ws, N * f);
    if (c->qk_norm != QK_NORM_NONE) {
        a->q_proj = ws_alloc(ws, N * qw * f);
        a->k_proj = ws_alloc(ws, N * kvw * f);
        a->q_rstd = ws_alloc(ws, N * (size_t)c->num_heads * f);
        a->k_rstd = ws_alloc(ws, N * (size_t)c->num_kv_heads * f);
    }
    a->q = ws_alloc(ws, N * qw * f);
    a->k = ws_alloc(ws, N * kvw * f);
    if (c->clip_qkv > 0 && ws->training) {
        a->q_clamped = ws_alloc(ws, N * qw * f);
        a->k_clamped = ws_alloc(ws, N * kvw * f);
    }
    a->v = ws_alloc(ws, N * kvw * f);
    a->attn = ws_alloc(ws, N * qw * f);
    a->h = ws_alloc(ws, N * H * f);
    a->hn = ws_alloc(ws, N * H * f);
    a->rstd_post = ws_alloc(ws, N * f);
    a->ffn = ws_alloc(ws, N * H * f);
    if (moe) {
        a->probs = ws_alloc(ws, N * E * f);
        a->offsets = ws_alloc(ws, (E + 1) * sizeof(int32_t));
        a->slot_of_row = ws_alloc(ws, M * sizeof(int32_t));
        a->row_of_slot = ws_alloc(ws, M * sizeof(int32_t));
        a->gate = ws_alloc(ws, cap * (I ? I : 1) * f);
        a->up = ws_alloc(ws, cap * (I ? I : 1) * f);
        a->act = ws->training ? ws_alloc(ws, cap * (I ? I : 1) * f) : a->gate;
        a->ys = ws_alloc(ws, M * H * f);
        if (m->grid.ep > 1) {
            a->plan = ep_plan_new(ws, m, cap);
            a->xe = ws_alloc(ws, cap * H * f);
            a->ye = ws_alloc(ws, cap * H * f);
        }
        if (S) {
            a->shared_gate = ws_alloc(ws, N * S * f);
            a->shared_up = ws_alloc(ws, N * S * f);
            a->shared_act = ws->training ? ws_alloc(ws, N * S * f) : a->shared_gate;
            a->shared_out = ws_alloc(ws, N * H * f);
            a->shared_logit = ws_alloc(ws, N * f);
        }
    }
    if (!moe || !ws->training) {
        a->mlp_gate = ws_alloc(ws, N * (D ? D : 1) * f);
        a->mlp_up = ws_alloc(ws, N * (D ? D : 1) * f);
        a->mlp_act = ws->training ? ws_alloc(ws, N * (D ? D : 1) * f) : a->mlp_gate;
    }
}

static struct forward_workspace *workspace_new(const struct model *m, int max_tokens, bool training)
{
    const struct model_config *c = &m->cfg;
    struct forward_workspace *ws = xcalloc(1, sizeof *ws);
    size_t N = (size_t)max_tokens, H = (size_t)c->hidden_size, f = sizeof(float);
    size_t K = (size_t)(c->top_k > 0 ? c->top_k : 1), E = (size_t)(c->num_experts > 0 ? c->num_experts : 1);
    size_t M = N * K, I = (size_t)(c->expert_intermediate_size ? c->expert_intermediate_size : 1);
    size_t cap = expert_row_capacity(m, max_tokens);
    ws->max_tokens = max_tokens;
    ws->n_layers = c->num_layers;
    ws->training = training;
    ws->mem = m->ops;
    ws->staged = m->ops && !m->ops->host_visible;
    ws->vocab_size = m->me.pp_rank == m->grid.pp - 1 ? c->vocab_size : 0;
    ws->top_k = (int)K;
    ws->n_experts = (int)E;
    ws->layers = xcalloc((size_t)c->num_layers, sizeof *ws->layers);
    int first = m->first_layer, end = m->first_layer + m->n_layers; /* this stage's layers */
    bool last_stage = m->me.pp_rank == m->grid.pp - 1;
    if (training) {
        for (int l = first; l < end; l++) alloc_layer(ws, m, max_tokens, c->is_moe[l], &ws->layers[l]);
    } else {
        /* one set for every layer; a model with MoE and dense layers needs both parts */
        bool any_moe = false;
        for (int l = first; l < end; l++) any_moe |= c->is_moe[l];
        alloc_layer(ws, m, max_tokens, any_moe, &ws->layers[first]);
        for (int l = first + 1; l < end; l++) ws->layers[l] = ws->layers[first];
    }
    ws->x_final = ws_alloc(ws, N * H * f); /* the stage's output */
    ws->rstd_final = ws_alloc(ws, N * f);
    ws->xn_final = ws_alloc(ws, N * H * f);
    ws->logits = ws_alloc(ws, (last_stage ? N * (size_t)c->vocab_size : 1) * f);
    ws->balance_before = ws_host(ws, 2 * E * sizeof(double));
    ws->xs = ws_alloc(ws, M * H * f);
    if (m->grid.ep > 1) {
        ws->ep_rows = ws_alloc(ws, cap * H * f);
        ws->ep_counts = ws_host(ws, 2 * (size_t)m->grid.ep * sizeof(size_t));
        ws->ep_offsets = ws_host(ws, 2 * (size_t)m->grid.ep * sizeof(size_t));
        ws->ep_send_counts = ws_host(ws, (size_t)m->grid.ep * m->n_local_experts * sizeof(int32_t));
    }
    if (ws->staged) { /* the host's side of what crosses between host and backend */
        ws->tokens = ws_alloc(ws, N * sizeof(int32_t));
        ws->positions = ws_alloc(ws, N * sizeof(int32_t));
        ws->sample_start = ws_alloc(ws, N * sizeof(int32_t));
        ws->targets = ws_alloc(ws, N * sizeof(int32_t));
        ws->h_offsets = ws_host(ws, (E + 1) * sizeof(int32_t));
        if (m->grid.pp > 1) {
            ws->h_send = ws_host(ws, N * H * f);
            ws->h_recv = ws_host(ws, N * H * f);
        }
        if (m->grid.ep > 1) {
            ws->h_ep_send = ws_host(ws, cap * H * f);
            ws->h_ep_recv = ws_host(ws, cap * H * f);
        }
    }
    ws->topk_ids = xcalloc((size_t)c->num_layers, sizeof *ws->topk_ids);
    ws->topk_weights = xcalloc((size_t)c->num_layers, sizeof *ws->topk_weights);
    ws->router_logits = xcalloc((size_t)c->num_layers, sizeof *ws->router_logits);
    ws->h_topk_ids = xcalloc((size_t)c->num_layers, sizeof *ws->h_topk_ids);
    ws->h_topk_weights = xcalloc((size_t)c->num_layers, sizeof *ws->h_topk_weights);
    ws->h_router_logits = xcalloc((size_t)c->num_layers, sizeof *ws->h_router_logits);
    ws->balance_counts = xcalloc((size_t)c->num_layers, sizeof *ws->balance_counts);
    ws->balance_probs = xcalloc((size_t)c->num_layers, sizeof *ws->balance_probs);
    ws->balance_coef = ws_alloc(ws, E * f);
    ws->h_balance_coef = ws->staged ? ws_host(ws, E * f) : ws->balance_coef;
    /* every layer's load-balancing statistics in one block, read back in one piece */
    size_t block = (size_t)c->num_layers * 2 * E;
    ws->balance_block = ws_alloc(ws, block * f);
    ws->h_balance_block = ws->staged ? ws_host(ws, block * f) : ws->balance_block;
    for (int l = first; l < end; l++) {
        if (!c->is_moe[l]) continue;
        /* per layer in both kinds of workspace: the score phase reads every layer's */
        ws->topk_ids[l] = ws_alloc(ws, M * sizeof(int32_t));
        ws->topk_weights[l] = ws_alloc(ws, M * f);
        ws->router_logits[l] = ws_alloc(ws, N * E * f);
        ws->balance_counts[l] = ws->balance_block + (size_t)l * 2 * E;
        ws->balance_probs[l] = ws->balance_counts[l] + E;
        if (!ws->staged) { /* the host reads the results where they are */
            ws->h_topk_ids[l] = ws->topk_ids[l];
            ws->h_topk_weights[l] = ws->topk_weights[l];
            ws->h_router_logits[l] = ws->router_logits[l];
        }
    }
    ws->h_logits = ws->staged ? NULL : ws->logits;
    if (training) {
        size_t qw = (size_t)c->num_heads * c->head_dim, kvw = (size_t)c->num_kv_heads * c->head_dim;
        size_t wide = (size_t)c->intermediate_size;
        if ((size_t)c->shared_expert_intermediate_size > wide) wide = (size_t)c->shared_expert_intermediate_size;
        if (wide == 0) wide = 1;
        ws->dx = ws_alloc(ws, N * H * f);
        ws->dxn = ws_alloc(ws, N * H * f);
        ws->dq = ws_alloc(ws, N * qw * f);
        ws->dk = ws_alloc(ws, N * kvw * f);
        ws->dv = ws_alloc(ws, N * kvw * f);
        ws->dattn = ws_alloc(ws, N * qw * f);
        ws->dxs = ws_alloc(ws, cap * H * f);
        ws->dxs2 = ws_alloc(ws, cap * H * f);
        ws->dys = ws_alloc(ws, M * H * f);
        ws->dact = ws_alloc(ws, cap * I * f);
        ws->dgate = ws_alloc(ws, cap * I * f);
        ws->dup = ws_alloc(ws, cap * I * f);
        if (m->grid.ep > 1) ws->dye = ws_alloc(ws, cap * H * f);
        ws->dweights = ws_alloc(ws, M * f);
        ws->drouter = ws_alloc(ws, N * E * f);
        ws->dshared_a = ws_alloc(ws, N * wide * f);
        ws->dshared_b = ws_alloc(ws, N * wide * f);
        ws->dshared_act = ws_alloc(ws, N * wide * f);
        ws->dshared_out = ws_alloc(ws, N * H * f);
        ws->dgate_logit = ws_alloc(ws, N * f);
    }
    return ws;
}

struct forward_workspace *forward_workspace_new(const struct model *m, int max_tokens)
{
    return workspace_new(m, max_tokens, false);
}

struct forward_workspace *forward_workspace_new_training(const struct model *m, int max_tokens)
{
    return workspace_new(m, max_tokens, true);
}

void forward_workspace_keep(struct forward_workspace *ws, unsigned what)
{
    unsigned added = what & ~ws->keep;
    ws->keep |= what;
    if (!ws->staged) return; /* the results are host memory already */
    size_t N = (size_t)ws->max_tokens, f = sizeof(float);
    if ((added & FORWARD_KEEP_LOGITS) && ws->vocab_size)
        ws->h_logits = ws_host(ws, N * (size_t)ws->vocab_size * f);
    if (added & FORWARD_KEEP_ROUTING)
        for (int l = 0; l < ws->n_layers; l++) {
            if (!ws->topk_ids[l]) continue;
            ws->h_topk_ids[l] = ws_host(ws, N * (size_t)ws->top_k * sizeof(int32_t));
            ws->h_topk_weights[l] = ws_host(ws, N * (size_t)ws->top_k * f);
            ws->h_router_logits[l] = ws_host(ws, N * (size_t)ws->n_experts * f);
        }
}

void forward_workspace_free(struct forward_workspace *ws)
{
    if (!ws) return;
    model_wait_sends(ws);
    for (int i = 0; i < ws->host.count; i++) free(ws->host.at[i]);
    for (int i = 0; i < ws->buffers.count; i++) ws->mem->release(ws->buffers.at[i]);
    free(ws->host.at);
    free(ws->buffers.at);
    free(ws->h_topk_ids);
    free(ws->h_topk_weights);
    free(ws->h_router_logits);
    free(ws->layers);
    free(ws->topk_ids);
    free(ws->topk_weights);
    free(ws->router_logits);
    free(ws->balance_counts);
    free(ws->balance_probs);
    free(ws);
}

/* A dense SwiGLU-style MLP: out[N,H] = down(act(gate(x)) * up(x)), width W. */
static void dense_mlp(const struct backend *ops, float *out, const float *x, const float *w_gate,
                      const float *w_up, const float *w_down, float *gate, float *up, float *act,
                      int N, int H, int W, enum hf_activation activation)
{
    ops->linear(gate, x, w_gate, NULL, N, H, W, false);
    ops->linear(up, x, w_up, NULL, N, H, W, false);
    ops->glu(act, gate, up, (size_t)N * W, activation);
    ops->linear(out, act, w_down, NULL, N, W, H, false);
}

/* The rotary frequencies as the ops read them. */
static const float *inv_freq(const struct model *m)
{
    return m->device_inv_freq ? m->device_inv_freq : m->inv_freq;
}

/* The batch as the ops read it: the caller's host arrays, or (staged) the workspace's
 * copies that model_forward uploaded. */
static struct batch ops_batch(const struct forward_workspace *ws, const struct batch *b)
{
    if (!ws->staged) return *b;
    return (struct batch){.N = b->N, .tokens = ws->tokens, .positions = ws->positions,
                          .sample_start = ws->sample_start,
                          .targets = b->targets ? ws->targets : NULL};
}

static void upload_batch(struct forward_workspace *ws, const struct batch *b)
{
    size_t bytes = (size_t)b->N * sizeof(int32_t);
    if (!ws->staged || bytes == 0) return;
    ws->mem->upload(ws->tokens, b->tokens, bytes);
    ws->mem->upload(ws->positions, b->positions, bytes);
    ws->mem->upload(ws->sample_start, b->sample_start, bytes);
    if (b->targets) ws->mem->upload(ws->targets, b->targets, bytes);
}

/* Point-to-point between pipeline stages, of count floats in the backend's buffer buf:
 * directly on host memory, through the workspace's host copies when staged. */
static void stage_recv(const struct model *m, struct forward_workspace *ws, float *buf, size_t count,
                       int from, int tag)
{
    if (!ws->staged) {
        comm_recv(m->pp_comm, buf, count, COMM_F32, from, tag, COMM_HOST);
        return;
    }
    comm_recv(m->pp_comm, ws->h_recv, count, COMM_F32, from, tag, COMM_HOST);
    ws->mem->upload(buf, ws->h_recv, count * sizeof(float));
}

static void stage_send_start(const struct model *m, struct forward_workspace *ws, const float *buf,
                             size_t count, int to, int tag, struct comm_request *request)
{
    if (ws->staged) {
        ws->mem->download(ws->h_send, buf, count * sizeof(float));
        buf = ws->h_send;
    }
    comm_send_start(m->pp_comm, buf, count, COMM_F32, to, tag, COMM_HOST, request);
}

static void attention_block(const struct model *m, const struct backend *ops,
                            struct layer_activations *a, const struct batch *batch, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int N = batch->N, H = c->hidden_size, Dh = c->head_dim;
    int nH = c->num_heads, nKV = c->num_kv_heads;
    int q_width = nH * Dh, kv_width = nKV * Dh;
    float eps = (float)c->rms_norm_eps;

    ops->rmsnorm(a->xn, a->rstd_in, a->x, w->input_norm, N, H, eps);
    bool qk_norm = c->qk_norm != QK_NORM_NONE;
    ops->linear(qk_norm ? a->q_proj : a->q, a->xn, w->q, w->q_bias, N, H, q_width, false);
    ops->linear(qk_norm ? a->k_proj : a->k, a->xn, w->k, w->k_bias, N, H, kv_width, false);
    ops->linear(a->v, a->xn, w->v, w->v_bias, N, H, kv_width, false);
    if (c->qk_norm == QK_NORM_PER_HEAD) {
        ops->rmsnorm(a->q, a->q_rstd, a->q_proj, w->q_norm, N * nH, Dh, eps);
        ops->rmsnorm(a->k, a->k_rstd, a->k_proj, w->k_norm, N * nKV, Dh, eps);
    } else if (c->qk_norm == QK_NORM_WHOLE_PROJECTION) {
        ops->rmsnorm(a->q, a->q_rstd, a->q_proj, w->q_norm, N, q_width, eps);
        ops->rmsnorm(a->k, a->k_rstd, a->k_proj, w->k_norm, N, kv_width, eps);
    }
    if (c->clip_qkv > 0) { /* olmoe: clamp q, k, v after the norms */
        float limit = (float)c->clip_qkv;
        ops->clamp(a->q, (size_t)N * q_width, -limit, limit);
        ops->clamp(a->k, (size_t)N * kv_width, -limit, limit);
        ops->clamp(a->v, (size_t)N * kv_width, -limit, limit);
        if (a->q_clamped) { /* the backward needs to know where the clamp bit */
            ops->copy(a->q_clamped, a->q, (size_t)N * q_width * sizeof(float));
            ops->copy(a->k_clamped, a->k, (size_t)N * kv_width * sizeof(float));
        }
    }
    ops->rope(a->q, batch->positions, inv_freq(m), (float)c->rope.attention_scaling, N, nH, Dh,
              c->rope.rotary_dim);
    ops->rope(a->k, batch->positions, inv_freq(m), (float)c->rope.attention_scaling, N, nKV, Dh,
              c->rope.rotary_dim);
    struct attention_mask mask = {.sample_start = batch->sample_start};
    ops->attention(a->attn, a->q, a->k, a->v, &mask, N, nH, nKV, Dh, 1.0f / sqrtf((float)Dh));
    ops->linear(a->h, a->attn, w->o, w->o_bias, N, q_width, H, false);
    ops->add(a->h, a->h, a->x, (size_t)N * H); /* h = x + attention */
}

static struct ep_plan *ep_plan_new(struct forward_workspace *ws, const struct model *m, size_t capacity)
{
    int ep = m->grid.ep, local = m->n_local_experts;
    struct ep_plan *p = ws_host(ws, sizeof *p);
    p->recv_counts = ws_host(ws, (size_t)ep * local * sizeof(int32_t));
    p->local_offsets = ws_host(ws, ((size_t)local + 1) * sizeof(int32_t));
    p->expert_major = ws_host(ws, capacity * sizeof(int32_t));
    p->source_major = ws_host(ws, capacity * sizeof(int32_t));
    p->send_rows = ws_host(ws, (size_t)ep * sizeof(size_t));
    p->send_first = ws_host(ws, (size_t)ep * sizeof(size_t));
    p->recv_rows = ws_host(ws, (size_t)ep * sizeof(size_t));
    p->recv_first = ws_host(ws, (size_t)ep * sizeof(size_t));
    p->dev_local_offsets = p->local_offsets;
    p->dev_expert_major = p->expert_major;
    p->dev_source_major = p->source_major;
    if (ws->staged) {
        p->dev_local_offsets = ws_alloc(ws, ((size_t)local + 1) * sizeof(int32_t));
        p->dev_expert_major = ws_alloc(ws, capacity * sizeof(int32_t));
        p->dev_source_major = ws_alloc(ws, capacity * sizeof(int32_t));
    }
    return p;
}

/* Fills a layer's plan from its per-expert offsets [E+1] (rows sorted by global expert):
 * exchanges the per-expert row counts with the EP group, then lays out the received
 * rows expert-major. Collective over the EP group. */
static void ep_plan_make(const struct model *m, struct forward_workspace *ws, struct ep_plan *p,
                         const int32_t *offsets)
{
    int ep = m->grid.ep, local = m->n_local_experts;
    if (ws->staged) { /* the plan is made on the host */
        ws->mem->download(ws->h_offsets, offsets, ((size_t)m->cfg.num_experts + 1) * sizeof(int32_t));
        offsets = ws->h_offsets;
    }
    int32_t *send_counts = ws->ep_send_counts; /* [ep * local] */
    size_t *counts = ws->ep_counts, *first = ws->ep_offsets;
    for (int d = 0; d < ep; d++) {
        int e0, n;
        layout_experts_of(m->cfg.num_experts, ep, d, &e0, &n); /* local experts of rank d */
        for (int e = 0; e < local; e++) send_counts[d * local + e] = offsets[e0 + e + 1] - offsets[e0 + e];
        p->send_first[d] = (size_t)offsets[e0];
        p->send_rows[d] = (size_t)(offsets[e0 + local] - offsets[e0]);
        counts[d] = counts[ep + d] = (size_t)local;
        first[d] = first[ep + d] = (size_t)d * local;
    }
    comm_alltoallv(m->ep_comm, send_counts, counts, first, p->recv_counts, counts + ep, first + ep,
                   COMM_I32, COMM_HOST);
    size_t total = 0;
    for (int s = 0; s < ep; s++) {
        p->recv_first[s] = total;
        p->recv_rows[s] = 0;
        for (int e = 0; e < local; e++) p->recv_rows[s] += (size_t)p->recv_counts[s * local + e];
        total += p->recv_rows[s];
    }
    if (total > expert_row_capacity(m, ws->max_tokens))
        fatal(EXIT_RUNTIME, "expert parallelism: %zu rows received, more than the workspace "
              "holds (ranks of an EP group must use the same batch size)", total);
    p->rows = (int)total;
    /* expert-major: expert e takes source 0's rows for e, then source 1's, ... */
    int r = 0;
    p->local_offsets[0] = 0;
    for (int e = 0; e < local; e++) {
        for (int s = 0; s < ep; s++) {
            size_t at = p->recv_first[s];
            for (int j = 0; j < e; j++) at += (size_t)p->recv_counts[s * local + j];
            for (int j = 0; j < p->recv_counts[s * local + e]; j++, r++) {
                p->expert_major[r] = (int32_t)(at + (size_t)j);
                p->source_major[at + (size_t)j] = r;
            }
        }
        p->local_offsets[e + 1] = r;
    }
    if (ws->staged) { /* what the ops read of it */
        ws->mem->upload(p->dev_local_offsets, p->local_offsets, ((size_t)local + 1) * sizeof(int32_t));
        ws->mem->upload(p->dev_expert_major, p->expert_major, total * sizeof(int32_t));
        ws->mem->upload(p->dev_source_major, p->source_major, total * sizeof(int32_t));
    }
}

/* All-to-all of rows over the EP group: directly on host memory, through the workspace's
 * host copies when staged. Counts and offsets in floats, as comm_alltoallv takes them. */
static void exchange_rows(const struct model *m, struct forward_workspace *ws, const float *send,
                          const size_t *sc, const size_t *so, float *recv, const size_t *rc,
                          const size_t *ro)
{
    if (!ws->staged) {
        comm_alltoallv(m->ep_comm, send, sc, so, recv, rc, ro, COMM_F32, COMM_HOST);
        return;
    }
    size_t out = 0, in = 0;
    for (int d = 0; d < m->grid.ep; d++) {
        if (so[d] + sc[d] > out) out = so[d] + sc[d];
        if (ro[d] + rc[d] > in) in = ro[d] + rc[d];
    }
    ws->mem->download(ws->h_ep_send, send, out * sizeof(float));
    comm_alltoallv(m->ep_comm, ws->h_ep_send, sc, so, ws->h_ep_recv, rc, ro, COMM_F32, COMM_HOST);
    ws->mem->upload(recv, ws->h_ep_recv, in * sizeof(float));
}

/* Sends this rank's rows [M, width] (sorted by expert) to the ranks that hold their experts;
 * out [rows, width] receives the local experts' rows, expert-major. Collective. */
static void ep_dispatch(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                        const struct ep_plan *p, const float *rows, float *out, int width)
{
    int ep = m->grid.ep;
    size_t *sc = ws->ep_counts, *rc = ws->ep_counts + ep, *so = ws->ep_offsets, *ro = ws->ep_offsets + ep;
    for (int d = 0; d < ep; d++) {
        sc[d] = p->send_rows[d] * (size_t)width, so[d] = p->send_first[d] * (size_t)width;
        rc[d] = p->recv_rows[d] * (size_t)width, ro[d] = p->recv_first[d] * (size_t)width;
    }
    exchange_rows(m, ws, rows, sc, so, ws->ep_rows, rc, ro);
    ops->gather_rows(out, ws->ep_rows, p->dev_expert_major, p->rows, 1, width);
}

/* The reverse of ep_dispatch: the local experts' rows [rows, width] (expert-major) go back
 * to the ranks they came from; out [M, width] receives this rank's rows in its own order. */
static void ep_return(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                      const struct ep_plan *p, const float *rows, float *out, int width)
{
    int ep = m->grid.ep;
    size_t *sc = ws->ep_counts, *rc = ws->ep_counts + ep, *so = ws->ep_offsets, *ro = ws->ep_offsets + ep;
    ops->gather_rows(ws->ep_rows, rows, p->dev_source_major, p->rows, 1, width);
    for (int d = 0; d < ep; d++) {
        sc[d] = p->recv_rows[d] * (size_t)width, so[d] = p->recv_first[d] * (size_t)width;
        rc[d] = p->send_rows[d] * (size_t)width, ro[d] = p->send_first[d] * (size_t)width;
    }
    exchange_rows(m, ws, ws->ep_rows, sc, so, out, rc, ro);
}

/* Routed experts (+ shared expert) of a MoE layer on hn -> ffn. */
static void moe_block(const struct model *m, const struct backend *ops,
                      struct forward_workspace *ws, struct layer_activations *a, int N, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int H = c->hidden_size, E = c->num_experts, K = c->top_k, I = c->expert_intermediate_size;
    int M = N * K;
    bool renormalise = c->norm_topk_prob || c->family == HF_MIXTRAL;

    ops->linear(ws->router_logits[l], a->hn, w->router, NULL, N, H, E, false);
    ops->router_topk(ws->topk_ids[l], ws->topk_weights[l], a->probs, ws->router_logits[l], N, E,
                     K, c->router, renormalise, (float)c->routed_scaling_factor);
    ops->router_balance_stats(ws->balance_counts[l], ws->balance_probs[l], a->probs,
                              ws->topk_ids[l], N, E, K);
    ops->permute_by_expert(a->offsets, a->slot_of_row, a->row_of_slot, ws->topk_ids[l], N, K, E);
    ops->gather_rows(ws->xs, a->hn, a->slot_of_row, M, K, H);
    /* the local experts' rows: this rank's own (ep = 1) or what the EP group sent */
    const float *xe = ws->xs;
    float *ye = a->ys;
    const int32_t *offsets = a->offsets;
    int rows = M, local = E;
    if (a->plan) {
        ep_plan_make(m, ws, a->plan, a->offsets);
        ep_dispatch(m, ops, ws, a->plan, ws->xs, a->xe, H);
        xe = a->xe, ye = a->ye, offsets = a->plan->dev_local_offsets;
        rows = a->plan->rows, local = m->n_local_experts;
    }
    ops->grouped_linear(a->gate, xe, w->expert_gate, offsets, local, H, I);
    ops->grouped_linear(a->up, xe, w->expert_up, offsets, local, H, I);
    ops->glu(a->act, a->gate, a->up, (size_t)rows * I, c->hidden_act);
    ops->grouped_linear(ye, a->act, w->expert_down, offsets, local, I, H);
    if (a->plan) ep_return(m, ops, ws, a->plan, a->ye, a->ys, H);
    ops->combine(a->ffn, a->ys, ws->topk_weights[l], a->row_of_slot, N, K, H, false);

    if (w->shared_gate) {
        int S = c->shared_expert_intermediate_size;
        dense_mlp(ops, a->shared_out, a->hn, w->shared_gate, w->shared_up, w->shared_down,
                  a->shared_gate, a->shared_up, a->shared_act, N, H, S, c->hidden_act);
        if (w->shared_expert_gate) {
            ops->linear(a->shared_logit, a->hn, w->shared_expert_gate, NULL, N, H, 1, false);
            ops->add_sigmoid_gated(a->ffn, a->shared_out, a->shared_logit, N, H);
        } else {
            ops->add(a->ffn, a->ffn, a->shared_out, (size_t)N * H);
        }
    }
}

/* The load-balancing sums up to the end of this stage, in layer order, in double:
 * the earlier stages' (received; zero on the first stage), then this stage's layers.
 * [2E]: counts, then prob sums. Freed by the caller. */
static double *balance_sums(const struct model *m, const struct forward_workspace *ws)
{
    int E = m->cfg.num_experts;
    double *sums = xmalloc(2 * (size_t)(E > 0 ? E : 1) * sizeof *sums);
    memcpy(sums, ws->balance_before, 2 * (size_t)E * sizeof *sums);
    for (int l = m->first_layer; l < m->first_layer + m->n_layers; l++) {
        if (!m->cfg.is_moe[l]) continue;
        const float *stats = ws->h_balance_block + (size_t)l * 2 * ws->n_experts; /* counts, probs */
        for (int e = 0; e < E; e++) {
            sums[e] += stats[e];
            sums[E + e] += stats[ws->n_experts + e];
        }
    }
    return sums;
}

/* The load-balancing loss of the last forward from its per-layer statistics (summed in
 * layer order, in double). With coef non-NULL also its gradient with respect to every
 * router probability, times scale: coef[e] = scale * E * c_e / R^2 (d aux / d P_e; the
 * counts carry no gradient). */
static double balance_loss(const struct model *m, const struct forward_workspace *ws, float *coef,
                           float scale)
{
    const struct model_config *c = &m->cfg;
    int E = c->num_experts, moe_layers = 0;
    for (int l = 0; l < c->num_layers; l++) moe_layers += c->is_moe[l];
    if (moe_layers == 0 || ws->balance_tokens == 0) {
        if (coef)
            for (int e = 0; e < E; e++) coef[e] = 0.0f;
        return 0.0;
    }
    double R = (double)moe_layers * ws->balance_tokens, aux = 0.0;
    double *sums = balance_sums(m, ws);
    for (int e = 0; e < E; e++) {
        double count = sums[e], prob = sums[E + e];
        aux += (count / R) * (prob / R);
        if (coef) coef[e] = (float)(scale * (double)E * count / (R * R));
    }
    free(sums);
    return (double)E * aux;
}

void model_forward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                   const struct batch *batch, struct forward_result *result)
{
    const struct model_config *c = &m->cfg;
    int N = batch->N, H = c->hidden_size, V = c->vocab_size, L = c->num_layers;
    if (N > ws->max_tokens)
        fatal(EXIT_RUNTIME, "forward: batch of %d tokens exceeds the workspace (%d)", N, ws->max_tokens);
    if (m->grid.ep > 1 && !m->ep_comm)
        fatal(EXIT_RUNTIME, "forward: expert parallelism without the EP group (model.ep_comm)");
    if (m->grid.pp > 1 && !m->pp_comm)
        fatal(EXIT_RUNTIME, "forward: pipeline parallelism without the stage chain (model.pp_comm)");
    int stage = m->me.pp_rank, first = m->first_layer, end = m->first_layer + m->n_layers;
    bool last_stage = stage == m->grid.pp - 1;
    int E = c->num_experts > 0 ? c->num_experts : 1;
    if (ws->staged && ops != ws->mem)
        fatal(EXIT_RUNTIME, "forward: the workspace belongs to backend %s, the call names %s",
              ws->mem->name, ops->name);
    model_wait_sends(ws); /* this workspace's previous outputs have left */
    upload_batch(ws, batch);
    const struct batch dev_batch = ops_batch(ws, batch);
    batch = &dev_batch; /* what the ops read */

    if (stage == 0) {
        ops->embedding(ws->layers[first].x, batch->tokens, m->embedding, N, H);
        memset(ws->balance_before, 0, 2 * (size_t)E * sizeof(double));
    } else { /* the previous stage's output, and its load-balancing sums */
        stage_recv(m, ws, ws->layers[first].x, (size_t)N * H, stage - 1, TAG_ACTIVATION);
        comm_recv(m->pp_comm, ws->balance_before, 2 * (size_t)E, COMM_F64, stage - 1,
                  TAG_BALANCE, COMM_HOST);
    }
    for (int l = first; l < end; l++) {
        const struct layer_weights *w = &m->layers[l];
        struct layer_activations *a = &ws->layers[l];
        attention_block(m, ops, a, batch, l);
        ops->rmsnorm(a->hn, a->rstd_post, a->h, w->post_norm, N, H, (float)c->rms_norm_eps);
        if (c->is_moe[l])
            moe_block(m, ops, ws, a, N, l);
        else
            dense_mlp(ops, a->ffn, a->hn, w->mlp_gate, w->mlp_up, w->mlp_down, a->mlp_gate,
                      a->mlp_up, a->mlp_act, N, H, c->intermediate_size, c->hidden_act);
        float *next = l + 1 < end ? ws->layers[l + 1].x : ws->x_final;
        ops->add(next, a->h, a->ffn, (size_t)N * H); /* x = h + feed-forward */
    }
    (void)L;
    if (ws->staged) { /* what the host reads of this forward */
        size_t stats = (size_t)c->num_layers * 2 * ws->n_experts * sizeof(float);
        ws->mem->download(ws->h_balance_block, ws->balance_block, stats);
        for (int l = first; l < end && (ws->keep & FORWARD_KEEP_ROUTING); l++) {
            if (!ws->topk_ids[l]) continue;
            size_t slots = (size_t)N * ws->top_k;
            ws->mem->download(ws->h_topk_ids[l], ws->topk_ids[l], slots * sizeof(int32_t));
            ws->mem->download(ws->h_topk_weights[l], ws->topk_weights[l], slots * sizeof(float));
            ws->mem->download(ws->h_router_logits[l], ws->router_logits[l],
                              (size_t)N * ws->n_experts * sizeof(float));
        }
    }
    result->logits = NULL;
    result->topk_ids = ws->h_topk_ids;
    result->topk_weights = ws->h_topk_weights;
    result->router_logits = ws->h_router_logits;
    result->loss_sum = 0.0;
    result->loss_count = 0;
    result->correct = 0;
    result->aux_loss = 0.0;
    ws->balance_tokens = N;
    if (!last_stage) { /* on to the next stage, without waiting for it */
        double *sums = balance_sums(m, ws);
        memcpy(ws->balance_before, sums, 2 * (size_t)E * sizeof(double)); /* the sent copy */
        free(sums);
        stage_send_start(m, ws, ws->x_final, (size_t)N * H, stage + 1, TAG_ACTIVATION, &ws->sends[0]);
        comm_send_start(m->pp_comm, ws->balance_before, 2 * (size_t)E, COMM_F64, stage + 1,
                        TAG_BALANCE, COMM_HOST, &ws->sends[1]);
        return;
    }
    ops->rmsnorm(ws->xn_final, ws->rstd_final, ws->x_final, m->final_norm, N, H,
                 (float)c->rms_norm_eps);
    ops->linear(ws->logits, ws->xn_final, m->lm_head, NULL, N, H, V, false);
    result->aux_loss = balance_loss(m, ws, NULL, 0.0f);
    if (batch->targets) {
        result->loss_sum = ops->cross_entropy_sum(ws->logits, batch->targets, N, V, &result->loss_count);
        result->correct = ops->count_correct(ws->logits, batch->targets, N, V);
    }
    if (ws->staged && (ws->keep & FORWARD_KEEP_LOGITS))
        ws->mem->download(ws->h_logits, ws->logits, (size_t)N * V * sizeof(float));
    result->logits = ws->h_logits;
}

void model_wait_sends(struct forward_workspace *ws)
{
    comm_wait(&ws->sends[0]);
    comm_wait(&ws->sends[1]);
}

/* ---- backward ----------------------------------------------------------------------- */

/* Dense MLP backward: dy [N,H] -> dx (+)= ..., weight gradients where trainable. */
static void dense_mlp_backward(const struct backend *ops, float *dx, bool accumulate_dx,
                               const float *dy, const float *x, const float *w_gate,
                               const float *w_up, const float *w_down, float *g_gate, float *g_up,
                               float *g_down, const float *gate, const float *up, const float *act,
                               float *dgate, float *dup, float *dact, int N, int H, int W,
                               enum hf_activation activation)
{
    ops->linear_backward(dact, g_down, NULL, dy, act, w_down, N, W, H, false);
    ops->glu_backward(dgate, dup, dact, gate, up, (size_t)N * W, activation);
    ops->linear_backward(dx, g_gate, NULL, dgate, x, w_gate, N, H, W, accumulate_dx);
    ops->linear_backward(dx, g_up, NULL, dup, x, w_up, N, H, W, true);
}

/* MoE backward: dy = d ffn [N,H] -> dhn [N,H] (written). */
static void moe_backward(const struct model *m, const struct backend *ops,
                         struct forward_workspace *ws, const struct layer_activations *a,
                         const float *dy, float *dhn, int N, int l, bool balance)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    const struct layer_grads *g = &m->grads[l];
    int H = c->hidden_size, E = c->num_experts, K = c->top_k, I = c->expert_intermediate_size;
    int M = N * K;
    bool renormalise = c->norm_topk_prob || c->family == HF_MIXTRAL;

    ops->combine_backward(ws->dys, ws->dweights, dy, a->ys, ws->topk_weights[l], a->row_of_slot,
                          N, K, H);
    /* at the experts: the output gradients of their rows (sent over under EP) */
    const float *dye = ws->dys, *xe = ws->xs;
    const int32_t *offsets = a->offsets;
    int rows = M, local = E;
    if (a->plan) {
        ep_dispatch(m, ops, ws, a->plan, ws->dys, ws->dye, H);
        dye = ws->dye, xe = a->xe, offsets = a->plan->dev_local_offsets;
        rows = a->plan->rows, local = m->n_local_experts;
    } else {
        ops->gather_rows(ws->xs, a->hn, a->slot_of_row, M, K, H); /* the experts' inputs again */
    }
    ops->grouped_linear_backward(ws->dact, g->expert_down, dye, a->act, w->expert_down, offsets,
                                 local, I, H);
    ops->glu_backward(ws->dgate, ws->dup, ws->dact, a->gate, a->up, (size_t)rows * I, c->hidden_act);
    ops->grouped_linear_backward(ws->dxs, g->expert_gate, ws->dgate, xe, w->expert_gate, offsets,
                                 local, H, I);
    ops->grouped_linear_backward(ws->dxs2, g->expert_up, ws->dup, xe, w->expert_up, offsets,
                                 local, H, I);
    ops->add(ws->dxs, ws->dxs, ws->dxs2, (size_t)rows * H);
    const float *dxs = ws->dxs;
    if (a->plan) { /* back to the ranks the rows came from (dys is free again) */
        ep_return(m, ops, ws, a->plan, ws->dxs, ws->dys, H);
        dxs = ws->dys;
    }
    ops->gather_rows_backward(dhn, dxs, a->row_of_slot, N, K, H, false);
    /* the routing weights' gradient reaches the router input even when the router is
     * frozen (g->router NULL: no weight gradient, the input gradient still flows) */
    ops->router_topk_backward(ws->drouter, ws->dweights, a->probs, ws->topk_ids[l], N, E, K,
                              c->router, renormalise, (float)c->routed_scaling_factor);
    if (balance) ops->router_balance_backward(ws->drouter, a->probs, ws->balance_coef, N, E);
    ops->linear_backward(dhn, g->router, NULL, ws->drouter, a->hn, w->router, N, H, E, true);

    if (w->shared_gate) {
        int S = c->shared_expert_intermediate_size;
        const float *dshared = dy;
        if (w->shared_expert_gate) {
            ops->add_sigmoid_gated_backward(ws->dshared_out, ws->dgate_logit, dy, a->shared_out,
                                            a->shared_logit, N, H);
            ops->linear_backward(dhn, g->shared_expert_gate, NULL, ws->dgate_logit, a->hn,
                                 w->shared_expert_gate, N, H, 1, true);
            dshared = ws->dshared_out;
        }
        dense_mlp_backward(ops, dhn, true, dshared, a->hn, w->shared_gate, w->shared_up,
                           w->shared_down, g->shared_gate, g->shared_up, g->shared_down,
                           a->shared_gate, a->shared_up, a->shared_act, ws->dshared_a,
                           ws->dshared_b, ws->dshared_act, N, H, S, c->hidden_act);
    }
}

void model_backward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                    const struct batch *batch, float loss_scale, float aux_scale)
{
    const struct model_config *c = &m->cfg;
    if (!ws->training) fatal(EXIT_RUNTIME, "model_backward needs a training workspace");
    if (!m->grads) fatal(EXIT_RUNTIME, "model_backward before model_set_trainable");
    int N = batch->N, H = c->hidden_size, V = c->vocab_size, Dh = c->head_dim;
    int nH = c->num_heads, nKV = c->num_kv_heads, q_width = nH * Dh, kv_width = nKV * Dh;

    bool balance = aux_scale != 0.0f;
    int stage = m->me.pp_rank, first = m->first_layer, end = m->first_layer + m->n_layers;
    int E = c->num_experts > 0 ? c->num_experts : 1;
    model_wait_sends(ws); /* the previous gradient sent from this workspace has left */
    const struct batch dev_batch = ops_batch(ws, batch); /* uploaded by the forward */
    batch = &dev_batch;

    if (stage == m->grid.pp - 1) {
        if (balance) {
            balance_loss(m, ws, ws->h_balance_coef, aux_scale);
            if (ws->staged) ws->mem->upload(ws->balance_coef, ws->h_balance_coef, (size_t)E * sizeof(float));
        }
        /* loss -> logits (in place) -> final norm */
        ops->cross_entropy_backward(ws->logits, ws->logits, batch->targets, N, V, loss_scale);
        float *lm_head_grad = c->tie_word_embeddings ? m->embedding_grad : m->lm_head_grad;
        ops->linear_backward(ws->dxn, lm_head_grad, NULL, ws->logits, ws->xn_final, m->lm_head, N,
                             H, V, false);
        ops->rmsnorm_backward(ws->dx, m->final_norm_grad, ws->dxn, ws->x_final, m->final_norm,
                              ws->rstd_final, N, H, false);
    } else { /* the gradient of this stage's output, and d aux / d probs, from the next */
        stage_recv(m, ws, ws->dx, (size_t)N * H, stage + 1, TAG_GRADIENT);
        if (balance) {
            comm_recv(m->pp_comm, ws->h_balance_coef, (size_t)E, COMM_F32, stage + 1,
                      TAG_BALANCE_GRADIENT, COMM_HOST);
            if (ws->staged) ws->mem->upload(ws->balance_coef, ws->h_balance_coef, (size_t)E * sizeof(float));
        }
    }

    struct attention_mask mask = {.sample_start = batch->sample_start};
    for (int l = end - 1; l >= first; l--) {
        const struct layer_weights *w = &m->layers[l];
        const struct layer_grads *g = &m->grads[l];
        const struct layer_activations *a = &ws->layers[l];
        /* x_next = h + ffn: ws->dx is both d h and d ffn */
        if (c->is_moe[l])
            moe_backward(m, ops, ws, a, ws->dx, ws->dxn, N, l, balance);
        else
            dense_mlp_backward(ops, ws->dxn, false, ws->dx, a->hn, w->mlp_gate, w->mlp_up,
                               w->mlp_down, g->mlp_gate, g->mlp_up, g->mlp_down, a->mlp_gate,
                               a->mlp_up, a->mlp_act, ws->dgate, ws->dup, ws->dact, N, H,
                               c->intermediate_size, c->hidden_act);
        /* d h += post-norm backward */
        ops->rmsnorm_backward(ws->dx, g->post_norm, ws->dxn, a->h, w->post_norm, a->rstd_post, N,
                              H, true);
        /* h = x + o(attn) */
        ops->linear_backward(ws->dattn, g->o, g->o_bias, ws->dx, a->attn, w->o, N, q_width, H,
                             false);
        ops->attention_backward(ws->dq, ws->dk, ws->dv, ws->dattn, a->q, a->k, a->v, a->attn,
                                &mask, N, nH, nKV, Dh, 1.0f / sqrtf((float)Dh));
        ops->rope_backward(ws->dq, batch->positions, inv_freq(m), (float)c->rope.attention_scaling,
                           N, nH, Dh, c->rope.rotary_dim);
        ops->rope_backward(ws->dk, batch->positions, inv_freq(m), (float)c->rope.attention_scaling,
                           N, nKV, Dh, c->rope.rotary_dim);
        if (c->clip_qkv > 0) { /* no gradient where the clamp bit */
            float limit = (float)c->clip_qkv;
            ops->clamp_backward(ws->dq, a->q_clamped, (size_t)N * q_width, -limit, limit);
            ops->clamp_backward(ws->dk, a->k_clamped, (size_t)N * kv_width, -limit, limit);
            ops->clamp_backward(ws->dv, a->v, (size_t)N * kv_width, -limit, limit);
        }
        if (c->qk_norm == QK_NORM_PER_HEAD) {
            ops->rmsnorm_backward(ws->dq, g->q_norm, ws->dq, a->q_proj, w->q_norm, a->q_rstd,
                                  N * nH, Dh, false);
            ops->rmsnorm_backward(ws->dk, g->k_norm, ws->dk, a->k_proj, w->k_norm, a->k_rstd,
                                  N * nKV, Dh, false);
        } else if (c->qk_norm == QK_NORM_WHOLE_PROJECTION) {
            ops->rmsnorm_backward(ws->dq, g->q_norm, ws->dq, a->q_proj, w->q_norm, a->q_rstd, N,
                                  q_width, false);
            ops->rmsnorm_backward(ws->dk, g->k_norm, ws->dk, a->k_proj, w->k_norm, a->k_rstd, N,
                                  kv_width, false);
        }
        ops->linear_backward(ws->dxn, g->q, g->q_bias, ws->dq, a->xn, w->q, N, H, q_width, false);
        ops->linear_backward(ws->dxn, g->k, g->k_bias, ws->dk, a->xn, w->k, N, H, kv_width, true);
        ops->linear_backward(ws->dxn, g->v, g->v_bias, ws->dv, a->xn, w->v, N, H, kv_width, true);
        /* d x = d h + input-norm backward */
        ops->rmsnorm_backward(ws->dx, g->input_norm, ws->dxn, a->x, w->input_norm, a->rstd_in, N,
                              H, true);
    }
    if (stage > 0) { /* the gradient of this stage's input goes back */
        stage_send_start(m, ws, ws->dx, (size_t)N * H, stage - 1, TAG_GRADIENT, &ws->sends[0]);
        if (balance)
            comm_send_start(m->pp_comm, ws->h_balance_coef, (size_t)E, COMM_F32, stage - 1,
                            TAG_BALANCE_GRADIENT, COMM_HOST, &ws->sends[1]);
    } else if (m->embedding_grad) {
        ops->embedding_backward(m->embedding_grad, ws->dx, batch->tokens, N, H);
    }
}
