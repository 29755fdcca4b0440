/* attention_gqa: grouped-query attention's forward and backward (every family but
 * deepseek's MLA, attention_mla.c), for forward.c's and backward.c's layer loops:
 * q, k, v projections (with biases), the optional QK-norm (per head or over the whole
 * projection), olmoe's clip_qkv, RoPE, causal attention per packed sample (with gpt_oss's
 * sliding window and sinks), o_proj.
 * Tensor names follow the families' Hugging Face modeling code. */
#include <math.h>

#include "model_compute.h"

/* Who sees whom in layer l: causal within each packed sample, the sliding window on the
 * layers that slide (gpt_oss: every other layer), the layer's sink logits (gpt_oss:
 * GptOssAttention.sinks, one extra softmax column per head), where their gradient goes
 * (dsinks NULL: frozen or no sinks), and the rows' log-sum-exp the forward keeps for the
 * backward (lse NULL outside training). */
static struct attention_mask layer_mask(const struct model *m, const struct batch *batch, int l,
                                        float *dsinks, float *lse)
{
    const struct model_config *c = &m->cfg;
    return (struct attention_mask){.sample_start = batch->sample_start,
                                   .window = c->is_sliding[l] ? c->sliding_window : 0,
                                   .sinks = m->layers[l].sinks,
                                   .dsinks = dsinks,
                                   .lse = lse};
}

void gqa_forward(const struct model *m, const struct backend *ops, struct layer_activations *a,
                 const struct batch *batch, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int N = batch->N, H = c->hidden_size, Dh = c->head_dim;
    int nH = c->num_heads, nKV = c->num_kv_heads;
    int q_width = nH * Dh, kv_width = nKV * Dh;
    float eps = (float)c->rms_norm_eps;

    bool qk_norm = c->qk_norm != QK_NORM_NONE;
    ops->linear(qk_norm ? a->q_proj : a->q, a->xn, w->q, w->q_bias, N, H, q_width, false);
    ops->linear(qk_norm ? a->k_proj : a->k, a->xn, w->k, w->k_bias, N, H, kv_width, false);
    ops->linear(a->v, a->xn, w->v, w->v_bias, N, H, kv_width, false);
    lora_adapt_forward(m, ops, l, LORA_Q, qk_norm ? a->q_proj : a->q, a->lora_t[LORA_Q], a->xn, N,
                       H, q_width);
    lora_adapt_forward(m, ops, l, LORA_K, qk_norm ? a->k_proj : a->k, a->lora_t[LORA_K], a->xn, N,
                       H, kv_width);
    lora_adapt_forward(m, ops, l, LORA_V, a->v, a->lora_t[LORA_V], a->xn, N, H, kv_width);
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
    ops->rope(a->q, batch->positions, model_inv_freq(m), (float)c->rope.attention_scaling, N, nH,
              Dh, c->rope.rotary_dim, c->rope.layout);
    ops->rope(a->k, batch->positions, model_inv_freq(m), (float)c->rope.attention_scaling, N, nKV,
              Dh, c->rope.rotary_dim, c->rope.layout);
    struct attention_mask mask = layer_mask(m, batch, l, NULL, a->attn_lse);
    ops->attention(a->attn, a->q, a->k, a->v, &mask, N, nH, nKV, Dh, Dh, 1.0f / sqrtf((float)Dh));
    ops->linear(a->h, a->attn, w->o, w->o_bias, N, q_width, H, false);
    lora_adapt_forward(m, ops, l, LORA_O, a->h, a->lora_t[LORA_O], a->attn, N, q_width, H);
}

void gqa_backward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                  const struct layer_activations *a, const struct batch *batch, int l,
                  const float *dy, float *dxn, bool accumulate_dxn)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    const struct layer_grads *g = &m->grads[l];
    int N = batch->N, H = c->hidden_size, Dh = c->head_dim;
    int nH = c->num_heads, nKV = c->num_kv_heads, q_width = nH * Dh, kv_width = nKV * Dh;
    struct attention_mask mask = layer_mask(m, batch, l, g->sinks, a->attn_lse);

    /* h = x + o(attn) */
    ops->linear_backward(ws->dattn, g->o, g->o_bias, dy, a->attn, w->o, N, q_width, H, false);
    lora_adapt_backward(m, ops, l, LORA_O, ws->dattn, ws->dlora, dy, a->attn, a->lora_t[LORA_O], N,
                        q_width, H);
    ops->attention_backward(ws->dq, ws->dk, ws->dv, ws->dattn, a->q, a->k, a->v, a->attn, &mask, N,
                            nH, nKV, Dh, Dh, 1.0f / sqrtf((float)Dh));
    ops->rope_backward(ws->dq, batch->positions, model_inv_freq(m),
                       (float)c->rope.attention_scaling, N, nH, Dh, c->rope.rotary_dim,
                       c->rope.layout);
    ops->rope_backward(ws->dk, batch->positions, model_inv_freq(m),
                       (float)c->rope.attention_scaling, N, nKV, Dh, c->rope.rotary_dim,
                       c->rope.layout);
    if (c->clip_qkv > 0) { /* no gradient where the clamp bit */
        float limit = (float)c->clip_qkv;
        ops->clamp_backward(ws->dq, a->q_clamped, (size_t)N * q_width, -limit, limit);
        ops->clamp_backward(ws->dk, a->k_clamped, (size_t)N * kv_width, -limit, limit);
        ops->clamp_backward(ws->dv, a->v, (size_t)N * kv_width, -limit, limit);
    }
    if (c->qk_norm == QK_NORM_PER_HEAD) {
        ops->rmsnorm_backward(ws->dq, g->q_norm, ws->dq, a->q_proj, w->q_norm, a->q_rstd, N * nH,
                              Dh, false);
        ops->rmsnorm_backward(ws->dk, g->k_norm, ws->dk, a->k_proj, w->k_norm, a->k_rstd, N * nKV,
                              Dh, false);
    } else if (c->qk_norm == QK_NORM_WHOLE_PROJECTION) {
        ops->rmsnorm_backward(ws->dq, g->q_norm, ws->dq, a->q_proj, w->q_norm, a->q_rstd, N,
                              q_width, false);
        ops->rmsnorm_backward(ws->dk, g->k_norm, ws->dk, a->k_proj, w->k_norm, a->k_rstd, N,
                              kv_width, false);
    }
    ops->linear_backward(dxn, g->q, g->q_bias, ws->dq, a->xn, w->q, N, H, q_width, accumulate_dxn);
    ops->linear_backward(dxn, g->k, g->k_bias, ws->dk, a->xn, w->k, N, H, kv_width, true);
    ops->linear_backward(dxn, g->v, g->v_bias, ws->dv, a->xn, w->v, N, H, kv_width, true);
    lora_adapt_backward(m, ops, l, LORA_Q, dxn, ws->dlora, ws->dq, a->xn, a->lora_t[LORA_Q], N, H,
                        q_width);
    lora_adapt_backward(m, ops, l, LORA_K, dxn, ws->dlora, ws->dk, a->xn, a->lora_t[LORA_K], N, H,
                        kv_width);
    lora_adapt_backward(m, ops, l, LORA_V, dxn, ws->dlora, ws->dv, a->xn, a->lora_t[LORA_V], N, H,
                        kv_width);
}
