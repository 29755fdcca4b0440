/* attention_mla: deepseek's multi-head latent attention (MLA), forward and backward, for
 * forward.c's and backward.c's layer loops (families deepseek_v2, deepseek_v3). The
 * math of transformers' DeepseekV2Attention / DeepseekV3Attention
 * (modeling_deepseek_v2.py, modeling_deepseek_v3.py), per token of xn [N,H]:
 *
 *   q     = q_b(rmsnorm(q_a(xn) + q_a_bias))  or q_proj(xn) when q_lora_rank is 0
 *                                              [N, nH, dn + dr]: q_nope, q_pe per head
 *   ckv   = kv_a(xn) + kv_a_bias               [N, C + dr]: the latent c, then k_pe
 *   kv    = kv_b(rmsnorm(c))                   [N, nH, dn + dv]: k_nope, value per head
 *   key_h = [k_nope_h, rope(k_pe)]  (one rope key shared by all heads)
 *   query_h = [q_nope_h, rope(q_pe_h)]
 *   out   = o_proj(causal attention(query, key, value) * scale)
 *
 * Sizes: R q_lora_rank, C kv_lora_rank, dn / dr / dv qk_nope_head_dim, qk_rope_head_dim,
 * v_head_dim. The two latent norms use their class's default eps 1e-6, not rms_norm_eps
 * (DeepseekV2RMSNorm(self.q_lora_rank) and (config.kv_lora_rank): no eps passed).
 *
 * Layout here: kv_a is applied as two products over its row blocks (the first C rows
 * give c, the last dr rows k_pe), so that c and k_pe are contiguous; RoPE turns q_pe in
 * place inside q (stride dn + dr); the keys and values are assembled with copy_columns
 * into the [N, nH, dn + dr] and [N, nH, dv] blocks the attention op reads.
 *
 * LoRA (lora.h) adds scale B (A x) beside each projection the targets name: q_proj or
 * q_a_proj / q_b_proj, kv_a_proj_with_mqa (one A on xn; B's first C rows feed c, its last
 * dr rows k_pe, as the weight's), kv_b_proj and o_proj, before the norms and RoPE that
 * follow them, as PEFT's wrapped nn.Linear does. */
#include <math.h>

#include "model_compute.h"

/* eps of q_a_layernorm and kv_a_layernorm: the RMSNorm class default */
#define MLA_LATENT_NORM_EPS 1e-6f

/* transformers' yarn_get_mscale(scale, mscale): 1 for scale <= 1. */
static double yarn_get_mscale(double scale, double mscale)
{
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

/* The attention's softmax scale: (dn + dr)^-0.5, times mscale^2 with mscale =
 * yarn_get_mscale(factor, mscale_all_dim) when the rope type is not the default one and
 * mscale_all_dim is non-zero (transformers' yarn_apply_mscale, modeling_deepseek_v2.py;
 * the config reader keeps mscale_all_dim only for yarn). */
float mla_softmax_scale(const struct model_config *c)
{
    double scale = 1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    if (c->rope.type != ROPE_DEFAULT && c->rope.mscale_all_dim != 0) {
        double m = yarn_get_mscale(c->rope.factor, c->rope.mscale_all_dim);
        scale *= m * m;
    }
    return (float)scale;
}

/* p + offset, or NULL for an absent bias or a frozen gradient */
static float *offset_or_null(float *p, size_t offset)
{
    return p ? p + offset : NULL;
}

/* kv_a_proj_with_mqa's adapter: t = scale A xn [N, r], then kv_latent += t B[0:C]^T and
 * k_rope += t B[C:C+dr]^T (B's rows split as the weight's). */
static void kv_a_lora_forward(const struct model *m, const struct backend *ops,
                              struct layer_activations *a, int l, int N, int H, int C, int dr)
{
    if (!m->lora || !m->lora[l].a[LORA_KV_A]) return;
    int r = m->lora_rank;
    const float *A = m->lora[l].a[LORA_KV_A], *B = m->lora[l].b[LORA_KV_A];
    float *t = a->lora_t[LORA_KV_A];
    ops->linear(t, a->xn, A, NULL, N, H, r, false);
    ops->scale(t, (size_t)N * r, m->lora_scale);
    ops->linear(a->kv_latent, t, B, NULL, N, r, C, true);
    ops->linear(a->k_rope, t, B + (size_t)C * r, NULL, N, r, dr, true);
}

/* Its backward from dkv_latent [N, C] and dk_rope [N, dr]: dB, dA accumulated, dxn +=. */
static void kv_a_lora_backward(const struct model *m, const struct backend *ops,
                               struct forward_workspace *ws, const struct layer_activations *a,
                               int l, float *dxn, int N, int H, int C, int dr)
{
    if (!m->lora || !m->lora[l].a[LORA_KV_A]) return;
    int r = m->lora_rank;
    const float *A = m->lora[l].a[LORA_KV_A], *B = m->lora[l].b[LORA_KV_A];
    float *dA = m->lora_grads ? m->lora_grads[l].a[LORA_KV_A] : NULL;
    float *dB = m->lora_grads ? m->lora_grads[l].b[LORA_KV_A] : NULL;
    const float *t = a->lora_t[LORA_KV_A];
    ops->linear_backward(ws->dlora, dB, NULL, ws->dkv_latent, t, B, N, r, C, false);
    ops->linear_backward(ws->dlora, dB ? dB + (size_t)C * r : NULL, NULL, ws->dk_rope, t,
                         B + (size_t)C * r, N, r, dr, true);
    ops->scale(ws->dlora, (size_t)N * r, m->lora_scale);
    ops->linear_backward(dxn, dA, NULL, ws->dlora, a->xn, A, N, H, r, true);
}

void mla_forward(const struct model *m, const struct backend *ops, struct layer_activations *a,
                 const struct batch *batch, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int N = batch->N, H = c->hidden_size, nH = c->num_heads;
    int R = c->q_lora_rank, C = c->kv_lora_rank;
    int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    int qk = dn + dr; /* query-key head width */
    const float *inv_freq = model_inv_freq(m);
    float rope_scaling = (float)c->rope.attention_scaling;

    /* queries [N, nH, dn + dr]; RoPE on each head's last dr dims */
    if (R > 0) {
        ops->linear(a->q_latent, a->xn, w->q_a, w->q_a_bias, N, H, R, false);
        lora_adapt_forward(m, ops, l, LORA_Q_A, a->q_latent, a->lora_t[LORA_Q_A], a->xn, N, H, R);
        ops->rmsnorm(a->q_latent_norm, a->q_latent_rstd, a->q_latent, w->q_a_norm, N, R,
                     MLA_LATENT_NORM_EPS);
        ops->linear(a->q, a->q_latent_norm, w->q_b, NULL, N, R, nH * qk, false);
        lora_adapt_forward(m, ops, l, LORA_Q_B, a->q, a->lora_t[LORA_Q_B], a->q_latent_norm, N, R,
                           nH * qk);
    } else {
        ops->linear(a->q, a->xn, w->q, NULL, N, H, nH * qk, false);
        lora_adapt_forward(m, ops, l, LORA_Q, a->q, a->lora_t[LORA_Q], a->xn, N, H, nH * qk);
    }
    ops->rope(a->q + dn, batch->positions, inv_freq, rope_scaling, N, nH, qk, dr, c->rope.layout);

    /* kv_a: the latent c (rows [0, C) of the weight) and the shared rope key (rows
     * [C, C + dr)), then kv_b on the normalised latent */
    ops->linear(a->kv_latent, a->xn, w->kv_a, w->kv_a_bias, N, H, C, false);
    ops->linear(a->k_rope, a->xn, weight_offset(w->kv_a, (size_t)C * H),
                offset_or_null(w->kv_a_bias, C), N, H, dr, false);
    kv_a_lora_forward(m, ops, a, l, N, H, C, dr);
    ops->rope(a->k_rope, batch->positions, inv_freq, rope_scaling, N, 1, dr, dr, c->rope.layout);
    ops->rmsnorm(a->kv_latent_norm, a->kv_latent_rstd, a->kv_latent, w->kv_a_norm, N, C,
                 MLA_LATENT_NORM_EPS);
    ops->linear(a->kv, a->kv_latent_norm, w->kv_b, NULL, N, C, nH * (dn + dv), false);
    lora_adapt_forward(m, ops, l, LORA_KV_B, a->kv, a->lora_t[LORA_KV_B], a->kv_latent_norm, N, C,
                       nH * (dn + dv));

    /* keys [N, nH, dn + dr] = [k_nope_h, k_rope]; values [N, nH, dv] */
    ops->copy_columns(a->k, qk, a->kv, dn + dv, N * nH, dn, false);
    for (int h = 0; h < nH; h++)
        ops->copy_columns(a->k + (size_t)h * qk + dn, nH * qk, a->k_rope, dr, N, dr, false);
    ops->copy_columns(a->v, dv, a->kv + dn, dn + dv, N * nH, dv, false);

    struct attention_mask mask = {.sample_start = batch->sample_start, .lse = a->attn_lse};
    ops->attention(a->attn, a->q, a->k, a->v, &mask, N, nH, nH, qk, dv, mla_softmax_scale(c));
    ops->linear(a->h, a->attn, w->o, w->o_bias, N, nH * dv, H, false);
    lora_adapt_forward(m, ops, l, LORA_O, a->h, a->lora_t[LORA_O], a->attn, N, nH * dv, H);
}

void mla_backward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                  const struct layer_activations *a, const struct batch *batch, int l,
                  const float *dy, float *dxn, bool accumulate_dxn)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    const struct layer_grads *g = &m->grads[l];
    int N = batch->N, H = c->hidden_size, nH = c->num_heads;
    int R = c->q_lora_rank, C = c->kv_lora_rank;
    int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    int qk = dn + dr;
    const float *inv_freq = model_inv_freq(m);
    float rope_scaling = (float)c->rope.attention_scaling;
    struct attention_mask mask = {.sample_start = batch->sample_start, .lse = a->attn_lse};

    /* o_proj, then the attention: dq, dk [N, nH, dn + dr], dv [N, nH, dv] */
    ops->linear_backward(ws->dattn, g->o, g->o_bias, dy, a->attn, w->o, N, nH * dv, H, false);
    lora_adapt_backward(m, ops, l, LORA_O, ws->dattn, ws->dlora, dy, a->attn, a->lora_t[LORA_O],
                        N, nH * dv, H);
    ops->attention_backward(ws->dq, ws->dk, ws->dv, ws->dattn, a->q, a->k, a->v, a->attn, &mask, N,
                            nH, nH, qk, dv, mla_softmax_scale(c));

    /* queries: RoPE's transpose on the rope dims, then the projections down to xn */
    ops->rope_backward(ws->dq + dn, batch->positions, inv_freq, rope_scaling, N, nH, qk, dr,
                       c->rope.layout);
    if (R > 0) {
        ops->linear_backward(ws->dq_latent, g->q_b, NULL, ws->dq, a->q_latent_norm, w->q_b, N, R,
                             nH * qk, false);
        lora_adapt_backward(m, ops, l, LORA_Q_B, ws->dq_latent, ws->dlora, ws->dq,
                            a->q_latent_norm, a->lora_t[LORA_Q_B], N, R, nH * qk);
        ops->rmsnorm_backward(ws->dq_latent, g->q_a_norm, ws->dq_latent, a->q_latent, w->q_a_norm,
                              a->q_latent_rstd, N, R, false);
        ops->linear_backward(dxn, g->q_a, g->q_a_bias, ws->dq_latent, a->xn, w->q_a, N, H, R,
                             accumulate_dxn);
        lora_adapt_backward(m, ops, l, LORA_Q_A, dxn, ws->dlora, ws->dq_latent, a->xn,
                            a->lora_t[LORA_Q_A], N, H, R);
    } else {
        ops->linear_backward(dxn, g->q, NULL, ws->dq, a->xn, w->q, N, H, nH * qk, accumulate_dxn);
        lora_adapt_backward(m, ops, l, LORA_Q, dxn, ws->dlora, ws->dq, a->xn, a->lora_t[LORA_Q], N,
                            H, nH * qk);
    }

    /* kv_b's output gradient [N, nH, dn + dv] from the keys' nope part and the values */
    ops->copy_columns(ws->dkv, dn + dv, ws->dk, qk, N * nH, dn, false);
    ops->copy_columns(ws->dkv + dn, dn + dv, ws->dv, dv, N * nH, dv, false);
    /* the shared rope key: the sum over heads of their keys' rope parts, in head order */
    for (int h = 0; h < nH; h++)
        ops->copy_columns(ws->dk_rope, dr, ws->dk + (size_t)h * qk + dn, nH * qk, N, dr, h > 0);
    ops->rope_backward(ws->dk_rope, batch->positions, inv_freq, rope_scaling, N, 1, dr, dr,
                       c->rope.layout);

    /* kv_b, the latent norm, then kv_a's two row blocks down to xn */
    ops->linear_backward(ws->dkv_latent, g->kv_b, NULL, ws->dkv, a->kv_latent_norm, w->kv_b, N, C,
                         nH * (dn + dv), false);
    lora_adapt_backward(m, ops, l, LORA_KV_B, ws->dkv_latent, ws->dlora, ws->dkv,
                        a->kv_latent_norm, a->lora_t[LORA_KV_B], N, C, nH * (dn + dv));
    ops->rmsnorm_backward(ws->dkv_latent, g->kv_a_norm, ws->dkv_latent, a->kv_latent, w->kv_a_norm,
                          a->kv_latent_rstd, N, C, false);
    ops->linear_backward(dxn, g->kv_a, g->kv_a_bias, ws->dkv_latent, a->xn, w->kv_a, N, H, C, true);
    ops->linear_backward(dxn, offset_or_null(g->kv_a, (size_t)C * H),
                         offset_or_null(g->kv_a_bias, C), ws->dk_rope, a->xn,
                         weight_offset(w->kv_a, (size_t)C * H), N, H, dr, true);
    kv_a_lora_backward(m, ops, ws, a, l, dxn, N, H, C, dr);
}
