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

struct forward_workspace {
    int max_tokens, n_layers;
    float *x, *xn, *h, *q, *k, *v, *attn, *ffn, *logits;
    float *xs, *gate, *up, *ys;    /* token-slots, permuted by expert */
    float *shared_a, *shared_b, *shared_logit;
    int32_t *offsets, *slot_of_row, *row_of_slot;
    int32_t **topk_ids;
    float **topk_weights, **router_logits;
};

struct forward_workspace *forward_workspace_new(const struct model *m, int max_tokens)
{
    const struct model_config *c = &m->cfg;
    struct forward_workspace *ws = xcalloc(1, sizeof *ws);
    size_t N = (size_t)max_tokens, H = (size_t)c->hidden_size;
    size_t q_width = (size_t)c->num_heads * c->head_dim, kv_width = (size_t)c->num_kv_heads * c->head_dim;
    size_t K = (size_t)(c->top_k > 0 ? c->top_k : 1), E = (size_t)(c->num_experts > 0 ? c->num_experts : 1);
    size_t I = (size_t)c->expert_intermediate_size;
    size_t wide = (size_t)c->intermediate_size;
    if ((size_t)c->shared_expert_intermediate_size > wide) wide = (size_t)c->shared_expert_intermediate_size;
    ws->max_tokens = max_tokens;
    ws->n_layers = c->num_layers;
    ws->x = xmalloc(N * H * sizeof(float));
    ws->xn = xmalloc(N * H * sizeof(float));
    ws->h = xmalloc(N * H * sizeof(float));
    ws->q = xmalloc(N * q_width * sizeof(float));
    ws->k = xmalloc(N * kv_width * sizeof(float));
    ws->v = xmalloc(N * kv_width * sizeof(float));
    ws->attn = xmalloc(N * q_width * sizeof(float));
    ws->ffn = xmalloc(N * H * sizeof(float));
    ws->logits = xmalloc(N * (size_t)c->vocab_size * sizeof(float));
    ws->xs = xmalloc(N * K * H * sizeof(float));
    ws->gate = xmalloc(N * K * (I ? I : 1) * sizeof(float));
    ws->up = xmalloc(N * K * (I ? I : 1) * sizeof(float));
    ws->ys = xmalloc(N * K * H * sizeof(float));
    ws->shared_a = xmalloc(N * (wide ? wide : 1) * sizeof(float));
    ws->shared_b = xmalloc(N * (wide ? wide : 1) * sizeof(float));
    ws->shared_logit = xmalloc(N * sizeof(float));
    ws->offsets = xmalloc((E + 1) * sizeof(int32_t));
    ws->slot_of_row = xmalloc(N * K * sizeof(int32_t));
    ws->row_of_slot = xmalloc(N * K * sizeof(int32_t));
    ws->topk_ids = xcalloc((size_t)c->num_layers, sizeof *ws->topk_ids);
    ws->topk_weights = xcalloc((size_t)c->num_layers, sizeof *ws->topk_weights);
    ws->router_logits = xcalloc((size_t)c->num_layers, sizeof *ws->router_logits);
    for (int l = 0; l < c->num_layers; l++) {
        if (!c->is_moe[l]) continue;
        ws->topk_ids[l] = xmalloc(N * K * sizeof(int32_t));
        ws->topk_weights[l] = xmalloc(N * K * sizeof(float));
        ws->router_logits[l] = xmalloc(N * E * sizeof(float));
    }
    return ws;
}

void forward_workspace_free(struct forward_workspace *ws)
{
    if (!ws) return;
    free(ws->x); free(ws->xn); free(ws->h); free(ws->q); free(ws->k); free(ws->v);
    free(ws->attn); free(ws->ffn); free(ws->logits); free(ws->xs); free(ws->gate);
    free(ws->up); free(ws->ys); free(ws->shared_a); free(ws->shared_b); free(ws->shared_logit);
    free(ws->offsets); free(ws->slot_of_row); free(ws->row_of_slot);
    for (int l = 0; l < ws->n_layers; l++) {
        free(ws->topk_ids[l]);
        free(ws->topk_weights[l]);
        free(ws->router_logits[l]);
    }
    free(ws->topk_ids); free(ws->topk_weights); free(ws->router_logits);
    free(ws);
}

/* A dense SwiGLU-style MLP: out[N,H] = down(act(gate(x)) * up(x)), width W. */
static void dense_mlp(const struct backend *ops, float *out, const float *x, const float *w_gate,
                      const float *w_up, const float *w_down, float *a, float *b, int N, int H,
                      int W, enum hf_activation act)
{
    ops->linear(a, x, w_gate, NULL, N, H, W, false);
    ops->linear(b, x, w_up, NULL, N, H, W, false);
    ops->glu(a, a, b, (size_t)N * W, act);
    ops->linear(out, a, w_down, NULL, N, W, H, false);
}

static void attention_block(const struct model *m, const struct backend *ops,
                            struct forward_workspace *ws, const struct batch *batch, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int N = batch->N, H = c->hidden_size, Dh = c->head_dim;
    int nH = c->num_heads, nKV = c->num_kv_heads;
    int q_width = nH * Dh, kv_width = nKV * Dh;
    float eps = (float)c->rms_norm_eps;

    ops->rmsnorm(ws->xn, NULL, ws->x, w->input_norm, N, H, eps);
    ops->linear(ws->q, ws->xn, w->q, w->q_bias, N, H, q_width, false);
    ops->linear(ws->k, ws->xn, w->k, w->k_bias, N, H, kv_width, false);
    ops->linear(ws->v, ws->xn, w->v, w->v_bias, N, H, kv_width, false);
    if (c->qk_norm == QK_NORM_PER_HEAD) {
        ops->rmsnorm(ws->q, NULL, ws->q, w->q_norm, N * nH, Dh, eps);
        ops->rmsnorm(ws->k, NULL, ws->k, w->k_norm, N * nKV, Dh, eps);
    } else if (c->qk_norm == QK_NORM_WHOLE_PROJECTION) {
        ops->rmsnorm(ws->q, NULL, ws->q, w->q_norm, N, q_width, eps);
        ops->rmsnorm(ws->k, NULL, ws->k, w->k_norm, N, kv_width, eps);
    }
    if (c->clip_qkv > 0) { /* olmoe: clamp q, k, v after the norms */
        float limit = (float)c->clip_qkv;
        ops->clamp(ws->q, (size_t)N * q_width, -limit, limit);
        ops->clamp(ws->k, (size_t)N * kv_width, -limit, limit);
        ops->clamp(ws->v, (size_t)N * kv_width, -limit, limit);
    }
    ops->rope(ws->q, batch->positions, m->inv_freq, (float)c->rope.attention_scaling, N, nH, Dh,
              c->rope.rotary_dim);
    ops->rope(ws->k, batch->positions, m->inv_freq, (float)c->rope.attention_scaling, N, nKV, Dh,
              c->rope.rotary_dim);
    struct attention_mask mask = {.sample_start = batch->sample_start};
    ops->attention(ws->attn, ws->q, ws->k, ws->v, &mask, N, nH, nKV, Dh,
                   1.0f / sqrtf((float)Dh));
    ops->linear(ws->h, ws->attn, w->o, w->o_bias, N, q_width, H, false);
    ops->add(ws->h, ws->h, ws->x, (size_t)N * H); /* h = x + attention */
}

/* Routed experts (+ shared expert) of a MoE layer on xn -> ffn. */
static void moe_block(const struct model *m, const struct backend *ops,
                      struct forward_workspace *ws, int N, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int H = c->hidden_size, E = c->num_experts, K = c->top_k, I = c->expert_intermediate_size;
    int M = N * K;
    bool renormalise = c->norm_topk_prob || c->family == HF_MIXTRAL;

    ops->linear(ws->router_logits[l], ws->xn, w->router, NULL, N, H, E, false);
    ops->router_topk(ws->topk_ids[l], ws->topk_weights[l], NULL, ws->router_logits[l], N, E, K,
                     c->router, renormalise, (float)c->routed_scaling_factor);
    ops->permute_by_expert(ws->offsets, ws->slot_of_row, ws->row_of_slot, ws->topk_ids[l], N, K, E);
    ops->gather_rows(ws->xs, ws->xn, ws->slot_of_row, M, K, H);
    ops->grouped_linear(ws->gate, ws->xs, w->expert_gate, ws->offsets, E, H, I);
    ops->grouped_linear(ws->up, ws->xs, w->expert_up, ws->offsets, E, H, I);
    ops->glu(ws->gate, ws->gate, ws->up, (size_t)M * I, c->hidden_act);
    ops->grouped_linear(ws->ys, ws->gate, w->expert_down, ws->offsets, E, I, H);
    ops->combine(ws->ffn, ws->ys, ws->topk_weights[l], ws->row_of_slot, N, K, H, false);

    if (w->shared_gate) {
        int S = c->shared_expert_intermediate_size;
        /* shared branch into xs (free again after the combine) */
        dense_mlp(ops, ws->xs, ws->xn, w->shared_gate, w->shared_up, w->shared_down, ws->shared_a,
                  ws->shared_b, N, H, S, c->hidden_act);
        if (w->shared_expert_gate) {
            ops->linear(ws->shared_logit, ws->xn, w->shared_expert_gate, NULL, N, H, 1, false);
            ops->add_sigmoid_gated(ws->ffn, ws->xs, ws->shared_logit, N, H);
        } else {
            ops->add(ws->ffn, ws->ffn, ws->xs, (size_t)N * H);
        }
    }
}

void model_forward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                   const struct batch *batch, struct forward_result *result)
{
    const struct model_config *c = &m->cfg;
    int N = batch->N, H = c->hidden_size, V = c->vocab_size;
    if (N > ws->max_tokens)
        fatal(EXIT_RUNTIME, "forward: batch of %d tokens exceeds the workspace (%d)", N, ws->max_tokens);
    if (m->grid.pp != 1 || m->grid.ep != 1)
        fatal(EXIT_RUNTIME, "forward: pipeline or expert parallelism is not supported yet");

    ops->embedding(ws->x, batch->tokens, m->embedding, N, H);
    for (int l = 0; l < c->num_layers; l++) {
        const struct layer_weights *w = &m->layers[l];
        attention_block(m, ops, ws, batch, l);
        ops->rmsnorm(ws->xn, NULL, ws->h, w->post_norm, N, H, (float)c->rms_norm_eps);
        if (c->is_moe[l])
            moe_block(m, ops, ws, N, l);
        else
            dense_mlp(ops, ws->ffn, ws->xn, w->mlp_gate, w->mlp_up, w->mlp_down, ws->shared_a,
                      ws->shared_b, N, H, c->intermediate_size, c->hidden_act);
        ops->add(ws->x, ws->h, ws->ffn, (size_t)N * H); /* x = h + feed-forward */
    }
    ops->rmsnorm(ws->xn, NULL, ws->x, m->final_norm, N, H, (float)c->rms_norm_eps);
    ops->linear(ws->logits, ws->xn, m->lm_head, NULL, N, H, V, false);

    result->logits = ws->logits;
    result->topk_ids = ws->topk_ids;
    result->topk_weights = ws->topk_weights;
    result->router_logits = ws->router_logits;
    result->loss_sum = 0.0;
    result->loss_count = 0;
    if (batch->targets)
        result->loss_sum = ops->cross_entropy_sum(ws->logits, batch->targets, N, V, &result->loss_count);
}
