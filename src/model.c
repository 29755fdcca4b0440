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
        for (int s = 0; s < m->grid.pp; s++) {
            int first, count;
            layout_layers_of(m->cfg.num_layers, m->grid.pp, s, &first, &count);
            if (layer >= first && layer < first + count) p->stage = s;
        }
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

void model_create(struct model *m, const struct model_config *cfg, const struct layout_grid *grid,
                  struct layout_coords coords)
{
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->grid = *grid;
    m->me = coords;
    layout_layers_of(cfg->num_layers, grid->pp, coords.pp_rank, &m->first_layer, &m->n_layers);
    if (cfg->num_experts > 0)
        layout_experts_of(cfg->num_experts, grid->ep, coords.ep_rank, &m->first_expert,
                          &m->n_local_experts);
    m->layers = xcalloc((size_t)cfg->num_layers, sizeof *m->layers);

    struct table_builder b = {.model = m};
    int64_t V = cfg->vocab_size, H = cfg->hidden_size;
    add_param(&b, &m->embedding, PARAM_EMBEDDING, MLP_NONE, -1, -1, V, H, "model.embed_tokens.weight");
    for (int l = 0; l < cfg->num_layers; l++) {
        struct layer_weights *w = &m->layers[l];
        add_param(&b, &w->input_norm, PARAM_NORM, MLP_NONE, l, -1, H, 0, "model.layers.%d.input_layernorm.weight", l);
        add_attention(&b, l);
        add_param(&b, &w->post_norm, PARAM_NORM, MLP_NONE, l, -1, H, 0, "model.layers.%d.post_attention_layernorm.weight", l);
        add_feed_forward(&b, l);
    }
    add_param(&b, &m->final_norm, PARAM_NORM, MLP_NONE, -1, -1, H, 0, "model.norm.weight");
    if (!cfg->tie_word_embeddings)
        add_param(&b, &m->lm_head, PARAM_LM_HEAD, MLP_NONE, -1, -1, V, H, "lm_head.weight");

    /* One allocation for everything this rank holds, handed out in table order. */
    size_t total = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        bool held = p->stage == coords.pp_rank && (p->ep_rank < 0 || p->ep_rank == coords.ep_rank);
        if (held) total += p->numel;
    }
    m->storage = xcalloc(total ? total : 1, sizeof(float));
    m->storage_floats = total;
    size_t used = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        bool held = p->stage == coords.pp_rank && (p->ep_rank < 0 || p->ep_rank == coords.ep_rank);
        if (!held) continue;
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

/* A routed expert's matrix from the fused spelling (transformers 5 in memory):
 * experts.gate_up_proj [E, 2I, H] (gate rows first, then up) and experts.down_proj
 * [E, H, I]. */
static int load_fused_expert(const struct model *m, const struct st_checkpoint *ckpt,
                             const struct param *p, char *err, size_t err_size)
{
    const struct model_config *c = &m->cfg;
    int64_t E = c->num_experts, I = c->expert_intermediate_size, H = c->hidden_size;
    char name[PARAM_NAME_MAX + 32];
    bool down = p->part == MLP_DOWN;
    snprintf(name, sizeof name, "model.layers.%d.%s.experts.%s", p->layer, moe_module(c),
             down ? "down_proj" : "gate_up_proj");
    const struct st_tensor *t = st_find(ckpt, name);
    if (!t) {
        snprintf(err, err_size, "%s: tensor '%s' not found (nor the fused '%s')", ckpt->dir,
                 p->name, name);
        return -1;
    }
    int rc = down ? st_expect_shape(t, err, err_size, E, H, I)
                  : st_expect_shape(t, err, err_size, E, 2 * I, H);
    if (rc != 0) return -1;
    size_t per_expert = down ? (size_t)(H * I) : (size_t)(2 * I * H);
    size_t offset = (size_t)p->expert * per_expert;
    if (p->part == MLP_UP) offset += (size_t)(I * H);
    return read_range_f32(t, offset, p->numel, p->data, err, err_size);
}

int model_load(struct model *m, const char *dir, char *err, size_t err_size)
{
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, err_size);
    if (!ckpt) return -1;
    int rc = 0;
    for (int i = 0; i < m->n_params && rc == 0; i++) {
        const struct param *p = &m->params[i];
        if (!p->data) continue;
        const struct st_tensor *t = st_find(ckpt, p->name);
        if (!t && p->kind == PARAM_EXPERT) {
            rc = load_fused_expert(m, ckpt, p, err, err_size);
            continue;
        }
        if (!t) {
            snprintf(err, err_size, "%s: tensor '%s' not found in the checkpoint", dir, p->name);
            rc = -1;
            break;
        }
        rc = p->rank == 2 ? st_expect_shape(t, err, err_size, p->shape[0], p->shape[1])
                          : st_expect_shape(t, err, err_size, p->shape[0]);
        if (rc == 0) rc = read_range_f32(t, 0, p->numel, p->data, err, err_size);
    }
    st_checkpoint_close(ckpt);
    return rc;
}

/* ---- forward ------------------------------------------------------------------------ */

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
    float *gate, *up, *act;    /* [M,I] expert pre-activations and act(gate) * up */
    float *ys;                 /* [M,H] expert outputs */
    float *shared_gate, *shared_up, *shared_act, *shared_out, *shared_logit;
    float *mlp_gate, *mlp_up, *mlp_act; /* dense layer */
    float *ffn;                /* [N,H] feed-forward output */
};

struct forward_workspace {
    int max_tokens, n_layers;
    bool training;
    struct layer_activations *layers; /* [L] */
    float *x_final, *rstd_final, *xn_final, *logits;
    float *xs;                        /* [M,H] gathered rows (scratch) */
    int32_t **topk_ids;
    float **topk_weights, **router_logits;
    float **balance_counts, **balance_probs; /* [L] -> [E]: load-balancing statistics */
    float *balance_coef;                     /* [E]: d aux / d probs (backward) */
    int balance_tokens;                      /* N of the last forward */
    /* backward scratch */
    float *dx, *dxn, *dq, *dk, *dv, *dattn, *dxs, *dxs2, *dys, *dact, *dgate, *dup;
    float *dweights, *drouter, *dshared_a, *dshared_b, *dshared_act, *dshared_out, *dgate_logit;
    void **allocations; /* every buffer, freed together */
    int allocation_capacity;
    int n_allocations;
};

static void *ws_alloc(struct forward_workspace *ws, size_t bytes)
{
    if (ws->n_allocations == ws->allocation_capacity) {
        ws->allocation_capacity = ws->allocation_capacity ? 2 * ws->allocation_capacity : 64;
        ws->allocations = realloc(ws->allocations, (size_t)ws->allocation_capacity * sizeof(void *));
        if (!ws->allocations) fatal(EXIT_RUNTIME, "out of memory (forward workspace)");
    }
    void *p = xcalloc(bytes ? bytes : 1, 1);
    ws->allocations[ws->n_allocations++] = p;
    return p;
}

/* Buffers of one layer's activations. */
static void alloc_layer(struct forward_workspace *ws, const struct model_config *c, int N,
                        bool moe, struct layer_activations *a)
{
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
        a->gate = ws_alloc(ws, M * (I ? I : 1) * f);
        a->up = ws_alloc(ws, M * (I ? I : 1) * f);
        a->act = ws->training ? ws_alloc(ws, M * (I ? I : 1) * f) : a->gate;
        a->ys = ws_alloc(ws, M * H * f);
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
    ws->max_tokens = max_tokens;
    ws->n_layers = c->num_layers;
    ws->training = training;
    ws->layers = xcalloc((size_t)c->num_layers, sizeof *ws->layers);
    if (training) {
        for (int l = 0; l < c->num_layers; l++) alloc_layer(ws, c, max_tokens, c->is_moe[l], &ws->layers[l]);
    } else {
        /* one set for every layer; a model with MoE and dense layers needs both parts */
        bool any_moe = false;
        for (int l = 0; l < c->num_layers; l++) any_moe |= c->is_moe[l];
        alloc_layer(ws, c, max_tokens, any_moe, &ws->layers[0]);
        for (int l = 1; l < c->num_layers; l++) ws->layers[l] = ws->layers[0];
    }
    ws->x_final = ws_alloc(ws, N * H * f);
    ws->rstd_final = ws_alloc(ws, N * f);
    ws->xn_final = ws_alloc(ws, N * H * f);
    ws->logits = ws_alloc(ws, N * (size_t)c->vocab_size * f);
    ws->xs = ws_alloc(ws, M * H * f);
    ws->topk_ids = xcalloc((size_t)c->num_layers, sizeof *ws->topk_ids);
    ws->topk_weights = xcalloc((size_t)c->num_layers, sizeof *ws->topk_weights);
    ws->router_logits = xcalloc((size_t)c->num_layers, sizeof *ws->router_logits);
    ws->balance_counts = xcalloc((size_t)c->num_layers, sizeof *ws->balance_counts);
    ws->balance_probs = xcalloc((size_t)c->num_layers, sizeof *ws->balance_probs);
    ws->balance_coef = ws_alloc(ws, E * f);
    for (int l = 0; l < c->num_layers; l++) {
        if (!c->is_moe[l]) continue;
        /* per layer in both kinds of workspace: the score phase reads every layer's */
        ws->topk_ids[l] = ws_alloc(ws, M * sizeof(int32_t));
        ws->topk_weights[l] = ws_alloc(ws, M * f);
        ws->router_logits[l] = ws_alloc(ws, N * E * f);
        ws->balance_counts[l] = ws_alloc(ws, E * f);
        ws->balance_probs[l] = ws_alloc(ws, E * f);
    }
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
        ws->dxs = ws_alloc(ws, M * H * f);
        ws->dxs2 = ws_alloc(ws, M * H * f);
        ws->dys = ws_alloc(ws, M * H * f);
        ws->dact = ws_alloc(ws, M * I * f);
        ws->dgate = ws_alloc(ws, M * I * f);
        ws->dup = ws_alloc(ws, M * I * f);
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

void forward_workspace_free(struct forward_workspace *ws)
{
    if (!ws) return;
    for (int i = 0; i < ws->n_allocations; i++) free(ws->allocations[i]);
    free(ws->allocations);
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
            memcpy(a->q_clamped, a->q, (size_t)N * q_width * sizeof(float));
            memcpy(a->k_clamped, a->k, (size_t)N * kv_width * sizeof(float));
        }
    }
    ops->rope(a->q, batch->positions, m->inv_freq, (float)c->rope.attention_scaling, N, nH, Dh,
              c->rope.rotary_dim);
    ops->rope(a->k, batch->positions, m->inv_freq, (float)c->rope.attention_scaling, N, nKV, Dh,
              c->rope.rotary_dim);
    struct attention_mask mask = {.sample_start = batch->sample_start};
    ops->attention(a->attn, a->q, a->k, a->v, &mask, N, nH, nKV, Dh, 1.0f / sqrtf((float)Dh));
    ops->linear(a->h, a->attn, w->o, w->o_bias, N, q_width, H, false);
    ops->add(a->h, a->h, a->x, (size_t)N * H); /* h = x + attention */
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
    ops->grouped_linear(a->gate, ws->xs, w->expert_gate, a->offsets, E, H, I);
    ops->grouped_linear(a->up, ws->xs, w->expert_up, a->offsets, E, H, I);
    ops->glu(a->act, a->gate, a->up, (size_t)M * I, c->hidden_act);
    ops->grouped_linear(a->ys, a->act, w->expert_down, a->offsets, E, I, H);
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
    for (int e = 0; e < E; e++) {
        double count = 0.0, prob = 0.0;
        for (int l = 0; l < c->num_layers; l++) {
            if (!c->is_moe[l]) continue;
            count += ws->balance_counts[l][e];
            prob += ws->balance_probs[l][e];
        }
        aux += (count / R) * (prob / R);
        if (coef) coef[e] = (float)(scale * (double)E * count / (R * R));
    }
    return (double)E * aux;
}

void model_forward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                   const struct batch *batch, struct forward_result *result)
{
    const struct model_config *c = &m->cfg;
    int N = batch->N, H = c->hidden_size, V = c->vocab_size, L = c->num_layers;
    if (N > ws->max_tokens)
        fatal(EXIT_RUNTIME, "forward: batch of %d tokens exceeds the workspace (%d)", N, ws->max_tokens);
    if (m->grid.pp != 1 || m->grid.ep != 1)
        fatal(EXIT_RUNTIME, "forward: pipeline or expert parallelism is not supported yet");

    ops->embedding(ws->layers[0].x, batch->tokens, m->embedding, N, H);
    for (int l = 0; l < L; l++) {
        const struct layer_weights *w = &m->layers[l];
        struct layer_activations *a = &ws->layers[l];
        attention_block(m, ops, a, batch, l);
        ops->rmsnorm(a->hn, a->rstd_post, a->h, w->post_norm, N, H, (float)c->rms_norm_eps);
        if (c->is_moe[l])
            moe_block(m, ops, ws, a, N, l);
        else
            dense_mlp(ops, a->ffn, a->hn, w->mlp_gate, w->mlp_up, w->mlp_down, a->mlp_gate,
                      a->mlp_up, a->mlp_act, N, H, c->intermediate_size, c->hidden_act);
        float *next = l + 1 < L ? ws->layers[l + 1].x : ws->x_final;
        ops->add(next, a->h, a->ffn, (size_t)N * H); /* x = h + feed-forward */
    }
    ops->rmsnorm(ws->xn_final, ws->rstd_final, ws->x_final, m->final_norm, N, H,
                 (float)c->rms_norm_eps);
    ops->linear(ws->logits, ws->xn_final, m->lm_head, NULL, N, H, V, false);

    result->logits = ws->logits;
    result->topk_ids = ws->topk_ids;
    result->topk_weights = ws->topk_weights;
    result->router_logits = ws->router_logits;
    result->loss_sum = 0.0;
    result->loss_count = 0;
    ws->balance_tokens = N;
    result->aux_loss = balance_loss(m, ws, NULL, 0.0f);
    if (batch->targets)
        result->loss_sum = ops->cross_entropy_sum(ws->logits, batch->targets, N, V, &result->loss_count);
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
    ops->grouped_linear_backward(ws->dact, g->expert_down, ws->dys, a->act, w->expert_down,
                                 a->offsets, E, I, H);
    ops->glu_backward(ws->dgate, ws->dup, ws->dact, a->gate, a->up, (size_t)M * I, c->hidden_act);
    ops->gather_rows(ws->xs, a->hn, a->slot_of_row, M, K, H); /* the experts' inputs again */
    ops->grouped_linear_backward(ws->dxs, g->expert_gate, ws->dgate, ws->xs, w->expert_gate,
                                 a->offsets, E, H, I);
    ops->grouped_linear_backward(ws->dxs2, g->expert_up, ws->dup, ws->xs, w->expert_up,
                                 a->offsets, E, H, I);
    ops->add(ws->dxs, ws->dxs, ws->dxs2, (size_t)M * H);
    ops->gather_rows_backward(dhn, ws->dxs, a->row_of_slot, N, K, H, false);
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
    if (balance) balance_loss(m, ws, ws->balance_coef, aux_scale);

    /* loss -> logits (in place) -> final norm */
    ops->cross_entropy_backward(ws->logits, ws->logits, batch->targets, N, V, loss_scale);
    float *lm_head_grad = c->tie_word_embeddings ? m->embedding_grad : m->lm_head_grad;
    ops->linear_backward(ws->dxn, lm_head_grad, NULL, ws->logits, ws->xn_final, m->lm_head, N, H,
                         V, false);
    ops->rmsnorm_backward(ws->dx, m->final_norm_grad, ws->dxn, ws->x_final, m->final_norm,
                          ws->rstd_final, N, H, false);

    struct attention_mask mask = {.sample_start = batch->sample_start};
    for (int l = c->num_layers - 1; l >= 0; l--) {
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
        ops->rope_backward(ws->dq, batch->positions, m->inv_freq, (float)c->rope.attention_scaling,
                           N, nH, Dh, c->rope.rotary_dim);
        ops->rope_backward(ws->dk, batch->positions, m->inv_freq, (float)c->rope.attention_scaling,
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
    if (m->embedding_grad) ops->embedding_backward(m->embedding_grad, ws->dx, batch->tokens, N, H);
}
