/* forward: the model's forward pass over the backend's ops (model.h), with the EP
 * exchange and the pipeline messages. Tensor names and the per-family math follow the
 * Hugging Face modeling code of each family, summarised in
 * shared/reference/moe-architectures.md. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "lora_experts.h"
#include "model_compute.h"

/* A dense SwiGLU-style MLP: out[N,H] = down(act(gate(x)) * up(x)), width W; with layer
 * l's adapters on targets lt (gate), lt + 1 (up), lt + 2 (down) where it has them (lora.h;
 * t: a->lora_t + lt). */
static void dense_mlp(const struct model *m, const struct backend *ops, int l, int lt,
                      float *const *t, float *out, const float *x, const float *w_gate,
                      const float *w_up, const float *w_down, float *gate, float *up, float *act,
                      int N, int H, int W, enum hf_activation activation)
{
    ops->linear(gate, x, w_gate, NULL, N, H, W, false);
    lora_adapt_forward(m, ops, l, lt, gate, t[0], x, N, H, W);
    ops->linear(up, x, w_up, NULL, N, H, W, false);
    lora_adapt_forward(m, ops, l, lt + 1, up, t[1], x, N, H, W);
    ops->glu(act, gate, up, (size_t)N * W, activation);
    ops->linear(out, act, w_down, NULL, N, W, H, false);
    lora_adapt_forward(m, ops, l, lt + 2, out, t[2], act, N, W, H);
}

/* The rotary frequencies as the ops read them. */
const float *model_inv_freq(const struct model *m)
{
    return m->device_inv_freq ? m->device_inv_freq : m->inv_freq;
}

/* How MoE layer l routes, as the router ops read it (its bias a backend buffer). */
struct router_params model_router_params(const struct model *m, int l)
{
    const struct model_config *c = &m->cfg;
    return (struct router_params){.kind = c->router,
                                  .renormalise = c->renormalise,
                                  .scaling = (float)c->routed_scaling_factor,
                                  .n_group = c->n_group,
                                  .topk_group = c->topk_group,
                                  .bias = m->layers[l].router_bias,
                                  .collaborators = m->c2r_collaborators
                                                       ? m->c2r_collaborators +
                                                             (size_t)l * c->num_experts * m->c2r_top_t
                                                       : NULL,
                                  .top_t = m->c2r_top_t};
}

/* The batch as the ops read it: the caller's host arrays, or (staged) the workspace's
 * copies that model_forward uploaded. */
struct batch ws_ops_batch(const struct forward_workspace *ws, const struct batch *b)
{
    if (!ws->staged) return *b;
    return (struct batch){.N = b->N, .tokens = ws->tokens, .positions = ws->positions,
                          .sample_start = ws->sample_start,
                          .targets = b->targets ? ws->targets : NULL, .loss_scale = b->loss_scale};
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
void ws_stage_recv(const struct model *m, struct forward_workspace *ws, float *buf, size_t count,
                       int from, int tag)
{
    if (!ws->staged) {
        comm_recv(m->pp_comm, buf, count, COMM_F32, from, tag, COMM_HOST);
        return;
    }
    comm_recv(m->pp_comm, ws->h_recv, count, COMM_F32, from, tag, COMM_HOST);
    ws->mem->upload(buf, ws->h_recv, count * sizeof(float));
}

void ws_stage_send_start(const struct model *m, struct forward_workspace *ws, const float *buf,
                             size_t count, int to, int tag, struct comm_request *request)
{
    if (ws->staged) {
        ws->mem->download(ws->h_send, buf, count * sizeof(float));
        buf = ws->h_send;
    }
    comm_send_start(m->pp_comm, buf, count, COMM_F32, to, tag, COMM_HOST, request);
}

/* input norm, the family's attention (attention_gqa.c or attention_mla.c: a->h = its
 * o_proj output), then the residual */
static void attention_block(const struct model *m, const struct backend *ops,
                            struct layer_activations *a, const struct batch *batch, int l)
{
    const struct model_config *c = &m->cfg;
    int N = batch->N, H = c->hidden_size;
    ops->rmsnorm(a->xn, a->rstd_in, a->x, m->layers[l].input_norm, N, H, (float)c->rms_norm_eps);
    if (c->attention == ATTENTION_MLA)
        mla_forward(m, ops, a, batch, l);
    else
        gqa_forward(m, ops, a, batch, l);
    ops->add(a->h, a->h, a->x, (size_t)N * H); /* h = x + attention */
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
    if (total > ws_row_capacity(m, ws->max_tokens))
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
void ws_ep_dispatch(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
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
void ws_ep_return(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
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
    struct router_params route = model_router_params(m, l);

    ops->linear(ws->router_logits[l], a->hn, w->router, w->router_logit_bias, N, H, E, false);
    ops->router_topk(ws->topk_ids[l], ws->topk_weights[l], a->probs, ws->router_logits[l], N, E, K,
                     &route);
    seq_aux_layer(m, ops, ws, l, a->probs, ws->topk_ids[l]); /* deepseek_v2 */
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
        ws_ep_dispatch(m, ops, ws, a->plan, ws->xs, a->xe, H);
        xe = a->xe, ye = a->ye, offsets = a->plan->dev_local_offsets;
        rows = a->plan->rows, local = m->n_local_experts;
    }
    ops->grouped_linear(a->gate, xe, w->expert_gate, offsets, local, H, I);
    ops->grouped_linear(a->up, xe, w->expert_up, offsets, local, H, I);
    lora_experts_gate_up_forward(m, ops, l, a->gate, a->up, a->expert_lora_t[0],
                                 ws->expert_lora_scratch, xe, offsets, local, rows, H, I);
    if (w->expert_gate_bias) { /* gpt_oss: gate_up_proj_bias */
        ops->grouped_bias(a->gate, w->expert_gate_bias, offsets, local, I);
        ops->grouped_bias(a->up, w->expert_up_bias, offsets, local, I);
    }
    if (c->clamped_swiglu) /* gpt_oss: GptOssExperts._apply_gate */
        ops->glu_clamped(a->act, a->gate, a->up, (size_t)rows * I, (float)c->swiglu_alpha,
                         (float)c->swiglu_limit);
    else
        ops->glu(a->act, a->gate, a->up, (size_t)rows * I, c->hidden_act);
    ops->grouped_linear(ye, a->act, w->expert_down, offsets, local, I, H);
    lora_experts_down_forward(m, ops, l, ye, a->expert_lora_t[1], ws->expert_lora_scratch, a->act,
                              offsets, local, rows, I, H);
    if (w->expert_down_bias) ops->grouped_bias(ye, w->expert_down_bias, offsets, local, H);
    if (a->plan) ws_ep_return(m, ops, ws, a->plan, a->ye, a->ys, H);
    ops->combine(a->ffn, a->ys, ws->topk_weights[l], a->row_of_slot, N, K, H, false);

    if (w->shared_gate) {
        int S = c->shared_expert_intermediate_size;
        dense_mlp(m, ops, l, LORA_SHARED_GATE, a->lora_t + LORA_SHARED_GATE, a->shared_out, a->hn, w->shared_gate, w->shared_up, w->shared_down,
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
 * [2E + 1]: counts, prob sums, then the sequence-level aux (deepseek_v2) of the layers so
 * far. In a buffer kept for the next call: valid until then. */
static double *balance_sums(const struct model *m, const struct forward_workspace *ws)
{
    int E = m->cfg.num_experts;
    static struct kept kept;
    double *sums = kept_buffer(&kept, (2 * (size_t)(E > 0 ? E : 1) + 1) * sizeof *sums);
    memcpy(sums, ws->balance_before, (2 * (size_t)E + 1) * sizeof *sums);
    sums[2 * E] += seq_aux_stage_sum(ws);
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

/* The balance loss of the last forward: transformers' load-balancing loss from the
 * per-layer statistics (summed in layer order, in double), with coef non-NULL also its
 * gradient with respect to every router probability, times scale: coef[e] = scale * E *
 * c_e / R^2 (d aux / d P_e; the counts carry no gradient). For the families without it
 * (hfconfig.h, enum hf_aux_kind) coef is 0: deepseek_v2's sequence-level loss (its
 * gradient is balance_seq.c's), or none. */
double ws_balance_loss(const struct model *m, const struct forward_workspace *ws, float *coef,
                           float scale)
{
    const struct model_config *c = &m->cfg;
    int E = c->num_experts, moe_layers = 0;
    for (int l = 0; l < c->num_layers; l++) moe_layers += c->is_moe[l];
    if (moe_layers == 0 || ws->balance_tokens == 0 || c->aux != AUX_GLOBAL) {
        double aux = 0.0;
        if (c->aux == AUX_SEQUENCE && moe_layers > 0) {
            double *sums = balance_sums(m, ws);
            aux = sums[2 * E];
        }
        if (coef)
            for (int e = 0; e < E; e++) coef[e] = 0.0f;
        return aux;
    }
    double R = (double)moe_layers * ws->balance_tokens, aux = 0.0;
    double *sums = balance_sums(m, ws);
    for (int e = 0; e < E; e++) {
        double count = sums[e], prob = sums[E + e];
        aux += (count / R) * (prob / R);
        if (coef) coef[e] = (float)(scale * (double)E * count / (R * R));
    }
    return (double)E * aux;
}

void ws_layer_forward(const struct model *m, const struct backend *ops,
                      struct forward_workspace *ws, const struct batch *batch, int l)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    struct layer_activations *a = &ws->layers[l];
    int N = batch->N, H = c->hidden_size;
    attention_block(m, ops, a, batch, l);
    ops->rmsnorm(a->hn, a->rstd_post, a->h, w->post_norm, N, H, (float)c->rms_norm_eps);
    if (c->is_moe[l])
        moe_block(m, ops, ws, a, N, l);
    else
        dense_mlp(m, ops, l, LORA_MLP_GATE, a->lora_t + LORA_MLP_GATE, a->ffn, a->hn, w->mlp_gate,
                  w->mlp_up, w->mlp_down, a->mlp_gate, a->mlp_up, a->mlp_act, N, H,
                  c->intermediate_size, c->hidden_act);
}

/* lm_head, the loss and the loss's gradient, head_rows token rows at a time: each block's
 * logits [n, V], then in one pass (the backend's cross_entropy_rows) its cross-entropy
 * sum, correct targets and, in place, its gradient (softmax - one-hot) * loss_scale,
 * which gives the block's rows of d xn_final and adds
 * lm_head's gradient. The logits are computed once (the vocabulary chunks compute them
 * again in the backward) and never held whole. The backward starts at the final norm. */
static void head_by_rows(const struct model *m, const struct backend *ops,
                         struct forward_workspace *ws, const struct batch *batch,
                         struct forward_result *result)
{
    const struct model_config *c = &m->cfg;
    int N = batch->N, H = c->hidden_size, V = c->vocab_size;
    float *lm_head_grad = c->tie_word_embeddings ? m->embedding_grad : m->lm_head_grad;
    for (int t0 = 0; t0 < N; t0 += ws->head_rows) {
        int n = N - t0 < ws->head_rows ? N - t0 : ws->head_rows;
        const float *xn = ws->xn_final + (size_t)t0 * H;
        const int32_t *targets = batch->targets + t0;
        long long counted = 0, correct = 0;
        ops->linear(ws->head_logits, xn, m->lm_head, NULL, n, H, V, false);
        result->loss_sum += ops->cross_entropy_rows(ws->head_logits, targets, n, V,
                                                    batch->loss_scale, &counted, &correct);
        result->loss_count += counted;
        result->correct += correct;
        ops->linear_backward(ws->dxn + (size_t)t0 * H, lm_head_grad, NULL, ws->head_logits, xn,
                             m->lm_head, n, H, V, false);
    }
    ws->head_done = true;
    ws->head_scale = batch->loss_scale;
    result->logits = NULL;
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
    const struct batch dev_batch = ws_ops_batch(ws, batch);
    batch = &dev_batch; /* what the ops read */

    if (stage == 0) {
        ops->embedding(ws->layers[first].x, batch->tokens, m->embedding, N, H);
        memset(ws->balance_before, 0, (2 * (size_t)E + 1) * sizeof(double));
    } else { /* the previous stage's output, and its load-balancing sums */
        ws_stage_recv(m, ws, ws->layers[first].x, (size_t)N * H, stage - 1, TAG_ACTIVATION);
        comm_recv(m->pp_comm, ws->balance_before, 2 * (size_t)E + 1, COMM_F64, stage - 1,
                  TAG_BALANCE, COMM_HOST);
    }
    seq_aux_begin(m, ws, batch);
    for (int l = first; l < end; l++) {
        struct layer_activations *a = &ws->layers[l];
        ws_layer_forward(m, ops, ws, batch, l);
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
        memcpy(ws->balance_before, sums, (2 * (size_t)E + 1) * sizeof(double)); /* the sent copy */
        ws_stage_send_start(m, ws, ws->x_final, (size_t)N * H, stage + 1, TAG_ACTIVATION, &ws->sends[0]);
        comm_send_start(m->pp_comm, ws->balance_before, 2 * (size_t)E + 1, COMM_F64, stage + 1,
                        TAG_BALANCE, COMM_HOST, &ws->sends[1]);
        return;
    }
    ops->rmsnorm(ws->xn_final, ws->rstd_final, ws->x_final, m->final_norm, N, H,
                 (float)c->rms_norm_eps);
    result->aux_loss = ws_balance_loss(m, ws, NULL, 0.0f);
    ws->head_done = false;
    if (ws->head_rows > 0 && batch->targets && batch->loss_scale > 0.0f) {
        head_by_rows(m, ops, ws, batch, result);
        return;
    }
    ws->ce_chunked = ws->vocab_chunk < V;
    if (ws->ce_chunked) { /* lm_head and the loss a vocabulary chunk at a time */
        result->logits = NULL;
        if (!batch->targets) return; /* nothing reads logits that are not kept */
        for (int v0 = 0; v0 < V; v0 += ws->vocab_chunk) {
            int C = V - v0 < ws->vocab_chunk ? V - v0 : ws->vocab_chunk;
            ops->linear(ws->logits, ws->xn_final, weight_offset(m->lm_head, (size_t)v0 * H),
                        NULL, N, H, C, false);
            ops->ce_chunk_update(ws->ce_state, ws->ce_best, ws->logits, batch->targets, N, C, v0);
        }
        result->loss_sum = ops->ce_chunk_finish(ws->ce_state, ws->ce_best, batch->targets, N,
                                                &result->loss_count, &result->correct);
        return;
    }
    ops->linear(ws->logits, ws->xn_final, m->lm_head, NULL, N, H, V, false);
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
