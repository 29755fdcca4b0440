/* workspace: the buffers of the forward and backward passes (model.h), allocated once
 * through the model's backend: the backend's buffers for what the ops touch, host memory
 * for plans, counts and the host copies of what crosses between host and backend. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "model_compute.h"

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
size_t ws_row_capacity(const struct model *m, int N)
{
    const struct model_config *c = &m->cfg;
    int K = c->top_k > 0 ? c->top_k : 1, local = m->n_local_experts > 0 ? m->n_local_experts : 1;
    return (size_t)m->grid.ep * (size_t)N * (size_t)(K < local ? K : local);
}

/* The attention's widths per token: queries, keys, values and the attention output.
 * MLA: every head has its own key and value (nH of each), query-key heads dn + dr wide,
 * value heads dv. */
static void attention_widths(const struct model_config *c, size_t *q, size_t *k, size_t *v,
                             size_t *out)
{
    size_t nH = (size_t)c->num_heads;
    if (c->attention == ATTENTION_MLA) {
        *q = *k = nH * (size_t)(c->qk_nope_head_dim + c->qk_rope_head_dim);
        *v = *out = nH * (size_t)c->v_head_dim;
        return;
    }
    *q = *out = nH * (size_t)c->head_dim;
    *k = *v = (size_t)c->num_kv_heads * c->head_dim;
}

/* MLA's own activations: the latents, the shared rope key, kv_b's output. */
static void alloc_mla(struct forward_workspace *ws, const struct model_config *c, size_t N,
                      struct layer_activations *a)
{
    size_t R = (size_t)c->q_lora_rank, C = (size_t)c->kv_lora_rank, f = sizeof(float);
    size_t kv = (size_t)c->num_heads * (size_t)(c->qk_nope_head_dim + c->v_head_dim);
    if (R > 0) {
        a->q_latent = ws_alloc(ws, N * R * f);
        a->q_latent_norm = ws_alloc(ws, N * R * f);
        a->q_latent_rstd = ws_alloc(ws, N * f);
    }
    a->kv_latent = ws_alloc(ws, N * C * f);
    a->kv_latent_norm = ws_alloc(ws, N * C * f);
    a->kv_latent_rstd = ws_alloc(ws, N * f);
    a->k_rope = ws_alloc(ws, N * (size_t)c->qk_rope_head_dim * f);
    a->kv = ws_alloc(ws, N * kv * f);
}

/* Buffers of one layer's activations. */
static void alloc_layer(struct forward_workspace *ws, const struct model *m, int N, bool moe,
                        struct layer_activations *a)
{
    const struct model_config *c = &m->cfg;
    size_t cap = ws_row_capacity(m, N);
    size_t H = (size_t)c->hidden_size, qw, kvw, vw, aw;
    attention_widths(c, &qw, &kvw, &vw, &aw);
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
    a->v = ws_alloc(ws, N * vw * f);
    a->attn = ws_alloc(ws, N * aw * f);
    if (ws->training) a->attn_lse = ws_alloc(ws, N * (size_t)c->num_heads * f);
    if (c->attention == ATTENTION_MLA) alloc_mla(ws, c, (size_t)N, a);
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
            a->plan = ws_ep_plan_new(ws, m, cap);
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
    for (int t = 0; m->lora && t < LORA_TARGET_COUNT; t++) /* N x r each, every target */
        a->lora_t[t] = ws_alloc(ws, N * (size_t)m->lora_rank * f);
    for (int t = 0; moe && m->expert_lora && t < 2; t++)
        a->expert_lora_t[t] = ws_alloc(ws, cap * (size_t)m->lora_rank * f);
    if (!moe || !ws->training || ws->recompute) { /* a shared set may serve dense layers */
        a->mlp_gate = ws_alloc(ws, N * (D ? D : 1) * f);
        a->mlp_up = ws_alloc(ws, N * (D ? D : 1) * f);
        a->mlp_act = ws->training ? ws_alloc(ws, N * (D ? D : 1) * f) : a->mlp_gate;
    }
}

/* Vocabulary ids per chunk for N tokens: ESFT_VOCAB_CHUNK from the environment (the tests
 * set it small so that their small vocabularies take the chunked path too); else as many
 * as the backend's logits budget holds for N tokens (backend.h), in multiples of
 * WS_VOCAB_CHUNK; else WS_VOCAB_CHUNK. */
static int vocab_chunk_size(const struct backend *ops, size_t N)
{
    const char *text = getenv("ESFT_VOCAB_CHUNK");
    long value = text ? strtol(text, NULL, 10) : 0;
    if (value > 0 && value < (1L << 30)) return (int)value;
    size_t ids = ops->logits_budget / ((N ? N : 1) * sizeof(float));
    ids -= ids % WS_VOCAB_CHUNK;
    return ids > WS_VOCAB_CHUNK ? (int)(ids < (1u << 30) ? ids : (1u << 30)) : WS_VOCAB_CHUNK;
}

/* Token rows of the head's [rows, V] block: ESFT_HEAD_ROWS from the environment (the tests
 * set it small so that a batch takes several blocks); else as many as 64 MiB of logits
 * hold, between 16 and 256 (a GEMM of 256 rows runs near the BLAS's peak), at most N. */
static int head_rows_size(int V, int N)
{
    const char *text = getenv("ESFT_HEAD_ROWS");
    long value = text ? strtol(text, NULL, 10) : 0;
    long rows = value > 0 ? value : (long)((64u << 20) / ((size_t)(V > 0 ? V : 1) * sizeof(float)));
    if (value <= 0 && rows > 256) rows = 256;
    if (value <= 0 && rows < 16) rows = 16;
    if (rows > N) rows = N > 0 ? N : 1;
    return (int)rows;
}

static struct forward_workspace *workspace_new(const struct model *m, int max_tokens, bool training,
                                               bool recompute)
{
    const struct model_config *c = &m->cfg;
    struct forward_workspace *ws = xcalloc(1, sizeof *ws);
    size_t N = (size_t)max_tokens, H = (size_t)c->hidden_size, f = sizeof(float);
    size_t K = (size_t)(c->top_k > 0 ? c->top_k : 1), E = (size_t)(c->num_experts > 0 ? c->num_experts : 1);
    size_t M = N * K, I = (size_t)(c->expert_intermediate_size ? c->expert_intermediate_size : 1);
    size_t cap = ws_row_capacity(m, max_tokens);
    if (m->ops && m->ops->reserve) { /* the ops' kept scratch: per-head rows (q/k norms) too */
        size_t heads = (size_t)(c->num_heads > c->num_kv_heads ? c->num_heads : c->num_kv_heads);
        m->ops->reserve(N, cap > N * heads ? cap : N * heads);
    }
    ws->max_tokens = max_tokens;
    ws->n_layers = c->num_layers;
    ws->training = training;
    ws->recompute = recompute;
    ws->mem = m->ops;
    ws->staged = m->ops && !m->ops->host_visible;
    ws->vocab_size = m->me.pp_rank == m->grid.pp - 1 ? c->vocab_size : 0;
    ws->top_k = (int)K;
    ws->n_experts = (int)E;
    ws->layers = xcalloc((size_t)c->num_layers, sizeof *ws->layers);
    int first = m->first_layer, end = m->first_layer + m->n_layers; /* this stage's layers */
    bool last_stage = m->me.pp_rank == m->grid.pp - 1;
    if (training && !recompute) {
        for (int l = first; l < end; l++) alloc_layer(ws, m, max_tokens, c->is_moe[l], &ws->layers[l]);
    } else {
        /* one set for every layer; a model with MoE and dense layers needs both parts */
        bool any_moe = false;
        for (int l = first; l < end; l++) any_moe |= c->is_moe[l];
        alloc_layer(ws, m, max_tokens, any_moe, &ws->layers[first]);
        for (int l = first + 1; l < end; l++) {
            ws->layers[l] = ws->layers[first];
            /* recompute: each layer's input is its own, the rest is shared */
            if (recompute) ws->layers[l].x = ws_alloc(ws, N * H * f);
        }
    }
    ws->x_final = ws_alloc(ws, N * H * f); /* the stage's output */
    ws->rstd_final = ws_alloc(ws, N * f);
    ws->xn_final = ws_alloc(ws, N * H * f);
    /* the logits a vocabulary chunk at a time when the backend can (the [N, V] block is
     * the largest of a training step: 2.4 GB for 4096 tokens of a 151,936 vocabulary) */
    ws->vocab_chunk = c->vocab_size;
    const struct backend *ops = m->ops ? m->ops : backend_cpu(); /* unattached: the CPU's */
    int chunk = vocab_chunk_size(ops, N);
    if (ops->ce_chunk_update && c->vocab_size > chunk) ws->vocab_chunk = chunk;
    ws->logits = ws_alloc(ws, (last_stage ? N * (size_t)ws->vocab_chunk : 1) * f);
    ws->ce_state = ws_alloc(ws, (last_stage ? N * 4 : 1) * f);
    ws->ce_best = ws_alloc(ws, (last_stage ? N : 1) * sizeof(int32_t));
    /* training on a backend with cross_entropy_rows: the head by token rows
     * (model_compute.h); an explicit ESFT_VOCAB_CHUNK keeps the vocabulary chunks (the
     * tests' way to them) */
    if (training && last_stage && ops->cross_entropy_rows && !getenv("ESFT_VOCAB_CHUNK")) {
        ws->head_rows = head_rows_size(c->vocab_size, max_tokens);
        ws->head_logits = ws_alloc(ws, (size_t)ws->head_rows * (size_t)c->vocab_size * f);
    }
    ws->balance_before = ws_host(ws, (2 * E + 1) * sizeof(double)); /* + the sequence aux */
    ws->xs = ws_alloc(ws, M * H * f);
    if (m->expert_lora) ws->expert_lora_scratch = ws_alloc(ws, cap * (H > I ? H : I) * f);
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
        size_t qw, kvw, vw, aw;
        attention_widths(c, &qw, &kvw, &vw, &aw);
        size_t wide = (size_t)c->intermediate_size;
        if ((size_t)c->shared_expert_intermediate_size > wide) wide = (size_t)c->shared_expert_intermediate_size;
        if (wide == 0) wide = 1;
        ws->dx = ws_alloc(ws, N * H * f);
        ws->dxn = ws_alloc(ws, N * H * f);
        ws->dq = ws_alloc(ws, N * qw * f);
        ws->dk = ws_alloc(ws, N * kvw * f);
        ws->dv = ws_alloc(ws, N * vw * f);
        ws->dattn = ws_alloc(ws, N * aw * f);
        if (c->attention == ATTENTION_MLA) {
            size_t R = (size_t)c->q_lora_rank, C = (size_t)c->kv_lora_rank;
            size_t kv = (size_t)c->num_heads * (size_t)(c->qk_nope_head_dim + c->v_head_dim);
            ws->dq_latent = ws_alloc(ws, N * (R ? R : 1) * f);
            ws->dkv_latent = ws_alloc(ws, N * C * f);
            ws->dk_rope = ws_alloc(ws, N * (size_t)c->qk_rope_head_dim * f);
            ws->dkv = ws_alloc(ws, N * kv * f);
        }
        ws->dxs = ws_alloc(ws, cap * H * f);
        ws->dxs2 = ws_alloc(ws, cap * H * f);
        ws->dys = ws_alloc(ws, M * H * f);
        ws->dact = ws_alloc(ws, cap * I * f);
        ws->dgate = ws_alloc(ws, cap * I * f);
        ws->dup = ws_alloc(ws, cap * I * f);
        if (m->grid.ep > 1) ws->dye = ws_alloc(ws, cap * H * f);
        if (m->lora) ws->dlora = ws_alloc(ws, N * (size_t)m->lora_rank * f);
        for (int t = 0; m->expert_lora && t < 2; t++)
            ws->expert_lora_dt[t] = ws_alloc(ws, cap * (size_t)m->lora_rank * f);
        ws->dweights = ws_alloc(ws, M * f);
        ws->drouter = ws_alloc(ws, N * E * f);
        ws->dshared_a = ws_alloc(ws, N * wide * f);
        ws->dshared_b = ws_alloc(ws, N * wide * f);
        ws->dshared_act = ws_alloc(ws, N * wide * f);
        ws->dshared_out = ws_alloc(ws, N * H * f);
        ws->dgate_logit = ws_alloc(ws, N * f);
        if (m->densemixer && c->num_experts > 0) { /* densemixer.h */
            size_t ep = (size_t)m->grid.ep, R = ep * N, L = E / ep;
            ws->dense_gate = ws_alloc(ws, R * I * f);
            ws->dense_up = ws_alloc(ws, R * I * f);
            ws->dense_act = ws_alloc(ws, R * I * f);
            ws->dense_out = ws_alloc(ws, R * H * f);
            ws->dense_dots = ws_alloc(ws, N * E * f);
            if (ep > 1) {
                ws->dense_x = ws_alloc(ws, R * H * f);
                ws->dense_g = ws_alloc(ws, R * H * f);
                ws->dense_local = ws_alloc(ws, R * L * f);
                ws->dense_recv = ws_alloc(ws, N * E * f);
                ws->dense_tokens = ws_host(ws, ep * sizeof(int));
                if (ws->staged) {
                    size_t most = R * (H > L ? H : L); /* sent: N H or R L; received: R H or N E */
                    ws->h_dense_send = ws_host(ws, most * f);
                    ws->h_dense_recv = ws_host(ws, (R * H > N * E ? R * H : N * E) * f);
                }
            }
        }
    }
    return ws;
}

struct forward_workspace *forward_workspace_new(const struct model *m, int max_tokens)
{
    return workspace_new(m, max_tokens, false, false);
}

struct forward_workspace *forward_workspace_new_training(const struct model *m, int max_tokens)
{
    return workspace_new(m, max_tokens, true, false);
}

struct forward_workspace *forward_workspace_new_recompute(const struct model *m, int max_tokens)
{
    return workspace_new(m, max_tokens, true, true);
}

void forward_workspace_keep(struct forward_workspace *ws, unsigned what)
{
    unsigned added = what & ~ws->keep;
    ws->keep |= what;
    size_t N = (size_t)ws->max_tokens, f = sizeof(float);
    if ((added & FORWARD_KEEP_LOGITS) && ws->vocab_size && ws->vocab_chunk < ws->vocab_size) {
        /* whole logits wanted: the chunked buffer gives way to a whole one */
        ws->vocab_chunk = ws->vocab_size;
        ws->logits = ws_alloc(ws, N * (size_t)ws->vocab_size * f);
        if (!ws->staged) ws->h_logits = ws->logits;
    }
    if (added & FORWARD_KEEP_LOGITS) ws->head_rows = 0; /* the rows' logits are not kept */
    if (!ws->staged) return; /* the results are host memory already */
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
    seq_aux_free(ws);
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

struct ep_plan *ws_ep_plan_new(struct forward_workspace *ws, const struct model *m, size_t capacity)
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
