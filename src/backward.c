/* backward: the model's backward pass over the backend's ops (model.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "densemixer.h"
#include "lora_experts.h"
#include "model_compute.h"

/* Dense MLP backward: dy [N,H] -> dx (+)= ..., weight gradients where trainable. */
/* Its adapters (forward.c's dense_mlp): layer l's targets lt, lt + 1, lt + 2, their t. */
struct mlp_adapters {
    const struct model *m;
    int l, lt;
    float *const *t;
    float *dt; /* [N,r] scratch */
};

static void dense_mlp_backward(const struct backend *ops, const struct mlp_adapters *ad, float *dx,
                               bool accumulate_dx, const float *dy, const float *x,
                               const float *w_gate, const float *w_up, const float *w_down,
                               float *g_gate, float *g_up, float *g_down, const float *gate,
                               const float *up, const float *act, float *dgate, float *dup,
                               float *dact, int N, int H, int W, enum hf_activation activation)
{
    ops->linear_backward(dact, g_down, NULL, dy, act, w_down, N, W, H, false);
    lora_adapt_backward(ad->m, ops, ad->l, ad->lt + 2, dact, ad->dt, dy, act, ad->t[2], N, W, H);
    ops->glu_backward(dgate, dup, dact, gate, up, (size_t)N * W, activation);
    ops->linear_backward(dx, g_gate, NULL, dgate, x, w_gate, N, H, W, accumulate_dx);
    ops->linear_backward(dx, g_up, NULL, dup, x, w_up, N, H, W, true);
    lora_adapt_backward(ad->m, ops, ad->l, ad->lt, dx, ad->dt, dgate, x, ad->t[0], N, H, W);
    lora_adapt_backward(ad->m, ops, ad->l, ad->lt + 1, dx, ad->dt, dup, x, ad->t[1], N, H, W);
}

/* qwen2_moe's gated shared expert: y += sigmoid(gate_logit) * shared. The gradient of
 * the shared expert's output (returned, in ws->dshared_out) and of its gate's weight; the
 * gate's input gradient is added to dhn (NULL: not needed). */
static const float *shared_output_gradient_into(const struct backend *ops,
                                               struct forward_workspace *ws,
                                               const struct layer_activations *a,
                                               const struct layer_weights *w,
                                               const struct layer_grads *g, const float *dy,
                                               float *dhn, int N, int H)
{
    ops->add_sigmoid_gated_backward(ws->dshared_out, ws->dgate_logit, dy, a->shared_out,
                                    a->shared_logit, N, H);
    ops->linear_backward(dhn, g->shared_expert_gate, NULL, ws->dgate_logit, a->hn,
                         w->shared_expert_gate, N, H, 1, true);
    return ws->dshared_out;
}

/* The router's share of the MoE backward: d router logits from the routing weights'
 * gradient (ws->dweights; DenseMixer: from every expert's output) and the balance loss,
 * then the router's weight gradient (g->router NULL: frozen) and its input gradient,
 * added to dhn (NULL: not needed). */
static void router_backward(const struct model *m, const struct backend *ops,
                            struct forward_workspace *ws, const struct layer_activations *a,
                            const float *dy, float *dhn, int N, int l, float aux_scale)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    const struct layer_grads *g = &m->grads[l];
    int H = c->hidden_size, E = c->num_experts, K = c->top_k;
    struct router_params route = model_router_params(m, l);
    if (m->densemixer) {
        densemixer_dots(m, ops, ws, a, dy, N, l);
        ops->router_dense_backward(ws->drouter, ws->dense_dots, a->probs, ws->topk_ids[l], N, E, K,
                                   &route);
    } else {
        ops->router_topk_backward(ws->drouter, ws->dweights, a->probs, ws->topk_ids[l], N, E, K,
                                  &route);
    }
    if (aux_scale != 0.0f && c->aux == AUX_SEQUENCE)
        seq_aux_backward(m, ops, ws, l, ws->drouter, a->probs, aux_scale);
    else if (aux_scale != 0.0f)
        ops->router_balance_backward(ws->drouter, a->probs, ws->balance_coef, N, E);
    ops->linear_backward(dhn, g->router, g->router_logit_bias, ws->drouter, a->hn, w->router, N, H,
                         E, true);
}

/* MoE backward: dy = d ffn [N,H] -> dhn [N,H] (written). dhn NULL: only the weight
 * gradients (nothing below needs the input gradient: model.h's backward_floor). */
static void moe_backward(const struct model *m, const struct backend *ops,
                         struct forward_workspace *ws, const struct layer_activations *a,
                         const float *dy, float *dhn, int N, int l, float aux_scale)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    const struct layer_grads *g = &m->grads[l];
    int H = c->hidden_size, E = c->num_experts, K = c->top_k, I = c->expert_intermediate_size;
    int M = N * K;
    struct mlp_adapters shared_adapters = {m, l, LORA_SHARED_GATE, a->lora_t + LORA_SHARED_GATE,
                                           ws->dlora};

    ops->combine_backward(ws->dys, ws->dweights, dy, a->ys, ws->topk_weights[l], a->row_of_slot,
                          N, K, H);
    /* at the experts: the output gradients of their rows (sent over under EP) */
    const float *dye = ws->dys, *xe = ws->xs;
    const int32_t *offsets = a->offsets;
    int rows = M, local = E;
    if (a->plan) {
        ws_ep_dispatch(m, ops, ws, a->plan, ws->dys, ws->dye, H);
        dye = ws->dye, xe = a->xe, offsets = a->plan->dev_local_offsets;
        rows = a->plan->rows, local = m->n_local_experts;
    } else {
        ops->gather_rows(ws->xs, a->hn, a->slot_of_row, M, K, H); /* the experts' inputs again */
    }
    if (w->expert_down_bias) ops->grouped_bias_backward(g->expert_down_bias, dye, offsets, local, H);
    ops->grouped_linear_backward(ws->dact, g->expert_down, dye, a->act, w->expert_down, offsets,
                                 local, I, H);
    lora_experts_down_backward(m, ops, l, ws->dact, ws->expert_lora_dt[0], ws->expert_lora_scratch,
                               dye, a->act, a->expert_lora_t[1], offsets, local, rows, I, H);
    if (c->clamped_swiglu)
        ops->glu_clamped_backward(ws->dgate, ws->dup, ws->dact, a->gate, a->up, (size_t)rows * I,
                                  (float)c->swiglu_alpha, (float)c->swiglu_limit);
    else
        ops->glu_backward(ws->dgate, ws->dup, ws->dact, a->gate, a->up, (size_t)rows * I,
                          c->hidden_act);
    if (w->expert_gate_bias) {
        ops->grouped_bias_backward(g->expert_gate_bias, ws->dgate, offsets, local, I);
        ops->grouped_bias_backward(g->expert_up_bias, ws->dup, offsets, local, I);
    }
    ops->grouped_linear_backward(dhn ? ws->dxs : NULL, g->expert_gate, ws->dgate, xe,
                                 w->expert_gate, offsets, local, H, I);
    ops->grouped_linear_backward(dhn ? ws->dxs2 : NULL, g->expert_up, ws->dup, xe, w->expert_up,
                                 offsets, local, H, I);
    lora_experts_gate_up_backward(m, ops, l, dhn ? ws->dxs : NULL, ws->expert_lora_dt[0],
                                  ws->expert_lora_dt[1], ws->expert_lora_scratch, ws->dgate,
                                  ws->dup, xe, a->expert_lora_t[0], offsets, local, rows, H, I);
    if (!dhn) { /* the weight gradients are all that is needed */
        if (w->shared_gate)
            dense_mlp_backward(ops, &shared_adapters, NULL, false,
                               w->shared_expert_gate
                                   ? shared_output_gradient_into(ops, ws, a, w, g, dy, NULL, N, H)
                                   : dy,
                               a->hn, w->shared_gate, w->shared_up, w->shared_down,
                               g->shared_gate, g->shared_up, g->shared_down, a->shared_gate,
                               a->shared_up, a->shared_act, ws->dshared_a, ws->dshared_b,
                               ws->dshared_act, N, H, c->shared_expert_intermediate_size,
                               c->hidden_act);
        /* a router trained in the lowest trainable layer still needs its own gradient */
        if (g->router) router_backward(m, ops, ws, a, dy, NULL, N, l, aux_scale);
        return;
    }
    ops->add(ws->dxs, ws->dxs, ws->dxs2, (size_t)rows * H);
    const float *dxs = ws->dxs;
    if (a->plan) { /* back to the ranks the rows came from (dys is free again) */
        ws_ep_return(m, ops, ws, a->plan, ws->dxs, ws->dys, H);
        dxs = ws->dys;
    }
    ops->gather_rows_backward(dhn, dxs, a->row_of_slot, N, K, H, false);
    /* the routing weights' gradient reaches the router input even when the router is
     * frozen (g->router NULL: no weight gradient, the input gradient still flows) */
    router_backward(m, ops, ws, a, dy, dhn, N, l, aux_scale);

    if (w->shared_gate) {
        int S = c->shared_expert_intermediate_size;
        const float *dshared =
            w->shared_expert_gate ? shared_output_gradient_into(ops, ws, a, w, g, dy, dhn, N, H)
                                  : dy;
        dense_mlp_backward(ops, &shared_adapters, dhn, true, dshared, a->hn, w->shared_gate, w->shared_up,
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
    int N = batch->N, H = c->hidden_size, V = c->vocab_size;

    bool balance = aux_scale != 0.0f;
    int stage = m->me.pp_rank, first = m->first_layer, end = m->first_layer + m->n_layers;
    int E = c->num_experts > 0 ? c->num_experts : 1;
    /* Nothing below the floor trains: no gradient goes there (model.h). A stage whose
     * layers all lie below it has no backward at all; the stage above it sends none. */
    int floor = m->backward_floor;
    if (stage < m->grid.pp - 1 && end <= floor) return;
    model_wait_sends(ws); /* the previous gradient sent from this workspace has left */
    const struct batch dev_batch = ws_ops_batch(ws, batch); /* uploaded by the forward */
    batch = &dev_batch;

    if (stage == m->grid.pp - 1) {
        if (balance) {
            ws_balance_loss(m, ws, ws->h_balance_coef, aux_scale);
            if (ws->staged) ws->mem->upload(ws->balance_coef, ws->h_balance_coef, (size_t)E * sizeof(float));
        }
        /* loss -> logits (in place) -> final norm */
        float *lm_head_grad = c->tie_word_embeddings ? m->embedding_grad : m->lm_head_grad;
        if (ws->head_done) { /* the forward took the loss to dxn (forward.c's head_by_rows) */
            if (ws->head_scale != loss_scale)
                fatal(EXIT_RUNTIME, "backward: loss_scale %g, but the forward's head used %g",
                      (double)loss_scale, (double)ws->head_scale);
        } else if (ws->ce_chunked) { /* each chunk's logits again, then its part of the gradients */
            for (int v0 = 0; v0 < V; v0 += ws->vocab_chunk) {
                int C = V - v0 < ws->vocab_chunk ? V - v0 : ws->vocab_chunk;
                const float *w = weight_offset(m->lm_head, (size_t)v0 * H);
                ops->linear(ws->logits, ws->xn_final, w, NULL, N, H, C, false);
                ops->ce_chunk_backward(ws->logits, ws->logits, ws->ce_state, batch->targets, N,
                                       C, v0, loss_scale);
                ops->linear_backward(ws->dxn, lm_head_grad ? lm_head_grad + (size_t)v0 * H : NULL,
                                     NULL, ws->logits, ws->xn_final, w, N, H, C, v0 > 0);
            }
        } else {
            ops->cross_entropy_backward(ws->logits, ws->logits, batch->targets, N, V, loss_scale);
            ops->linear_backward(ws->dxn, lm_head_grad, NULL, ws->logits, ws->xn_final,
                                 m->lm_head, N, H, V, false);
        }
        ops->rmsnorm_backward(ws->dx, m->final_norm_grad, ws->dxn, ws->x_final, m->final_norm,
                              ws->rstd_final, N, H, false);
    } else { /* the gradient of this stage's output, and d aux / d probs, from the next */
        ws_stage_recv(m, ws, ws->dx, (size_t)N * H, stage + 1, TAG_GRADIENT);
        if (balance) {
            comm_recv(m->pp_comm, ws->h_balance_coef, (size_t)E, COMM_F32, stage + 1,
                      TAG_BALANCE_GRADIENT, COMM_HOST);
            if (ws->staged) ws->mem->upload(ws->balance_coef, ws->h_balance_coef, (size_t)E * sizeof(float));
        }
    }

    for (int l = end - 1; l >= first && l >= floor; l--) {
        const struct layer_weights *w = &m->layers[l];
        const struct layer_grads *g = &m->grads[l];
        const struct layer_activations *a = &ws->layers[l];
        if (ws->recompute && l < end - 1) { /* the shared set holds the last layer's forward */
            ws->recomputing = true;
            ws_layer_forward(m, ops, ws, batch, l);
            ws->recomputing = false;
        }
        /* the lowest trainable layer, training only its MLP: no input gradient at all */
        float *dhn = l == floor && m->floor_mlp_only ? NULL : ws->dxn;
        struct mlp_adapters adapters = {m, l, LORA_MLP_GATE, a->lora_t + LORA_MLP_GATE, ws->dlora};
        /* x_next = h + ffn: ws->dx is both d h and d ffn */
        if (c->is_moe[l])
            moe_backward(m, ops, ws, a, ws->dx, dhn, N, l, aux_scale);
        else /* the dshared buffers hold N x max(intermediate, shared width); the expert
              * ones (N K x expert width) can be narrower than a dense layer (glm4_moe) */
            dense_mlp_backward(ops, &adapters, dhn, false, ws->dx, a->hn, w->mlp_gate, w->mlp_up, w->mlp_down,
                               g->mlp_gate, g->mlp_up, g->mlp_down, a->mlp_gate, a->mlp_up,
                               a->mlp_act, ws->dshared_a, ws->dshared_b, ws->dshared_act, N, H,
                               c->intermediate_size, c->hidden_act);
        if (!dhn) break;
        /* d h += post-norm backward */
        ops->rmsnorm_backward(ws->dx, g->post_norm, ws->dxn, a->h, w->post_norm, a->rstd_post, N,
                              H, true);
        /* h = x + attention(input norm(x)): the family's attention backward -> dxn */
        if (c->attention == ATTENTION_MLA)
            mla_backward(m, ops, ws, a, batch, l, ws->dx, ws->dxn, false);
        else
            gqa_backward(m, ops, ws, a, batch, l, ws->dx, ws->dxn, false);
        /* d x = d h + input-norm backward */
        ops->rmsnorm_backward(ws->dx, g->input_norm, ws->dxn, a->x, w->input_norm, a->rstd_in, N,
                              H, true);
    }
    if (stage > 0 && first > floor) { /* the gradient of this stage's input goes back */
        ws_stage_send_start(m, ws, ws->dx, (size_t)N * H, stage - 1, TAG_GRADIENT, &ws->sends[0]);
        if (balance)
            comm_send_start(m->pp_comm, ws->h_balance_coef, (size_t)E, COMM_F32, stage - 1,
                            TAG_BALANCE_GRADIENT, COMM_HOST, &ws->sends[1]);
    } else if (stage == 0 && m->embedding_grad) {
        ops->embedding_backward(m->embedding_grad, ws->dx, batch->tokens, N, H);
    }
}
