/* balance_seq: the sequence-level balance loss that the ESFT reference adds when it trains
 * DeepSeek-V2 (deepseek-ai/ESFT deepseek/modeling_deepseek.py, MoEGate.forward with
 * seq_aux; transformers has no balance loss for deepseek_v2). Per MoE layer, with the
 * router's softmax scores s (unmasked, also under group_limited_greedy) and the K experts
 * chosen for each token, over the B sequences of the batch:
 *   ce[b,e]   = (the choices of sequence b that are e) / (T_b K / E)
 *   aux_layer = (1/B) sum_b sum_e ce[b,e] * (1/T_b) sum_{t in b} s[t,e]
 * ce carries no gradient. The loss is the sum over MoE layers times train.aux_loss_coef
 * (the reference's aux_loss_alpha). A sequence is a block of the batch (batch.block_start:
 * a training row of packed samples, as the reference's rows of seq_length tokens; esft's
 * blocks are not padded, so T_b is the block's own length). Each layer's term depends on
 * that layer alone: no sums cross layers or pipeline stages except the reported value.
 *
 * Per layer the forward asks the ops for each block's statistics (router_balance_stats
 * over the block's tokens), brings them to the host, and keeps d aux_layer / d s[t,e] =
 * ce[b,e] / (B T_b) per block; the backward scales those and hands them to
 * router_balance_backward block by block, through the softmax into the router logits. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "model_compute.h"

struct seq_aux {
    int n_blocks, capacity;  /* blocks of the last forward; what the buffers hold */
    int32_t *first, *length; /* [capacity] each block's tokens */
    float *stats, *h_stats;  /* [capacity][2E] counts, prob sums: the backend's, the host's */
    float *coef, *h_coef;    /* [capacity][E] scaled gradient: the backend's, the host's */
    float *layer_coef;       /* [L][capacity][E] d aux_layer / d s for each block */
    double stage_sum;        /* this stage's layers' aux of the last forward */
};

static void grow(struct seq_aux *s, const struct model *m, struct forward_workspace *ws, int n)
{
    if (n <= s->capacity) return;
    const struct backend *mem = ws->mem;
    size_t E = (size_t)m->cfg.num_experts, L = (size_t)m->cfg.num_layers, f = sizeof(float);
    free(s->first), free(s->length), free(s->layer_coef);
    if (mem) {
        mem->release(s->stats), mem->release(s->coef);
        if (ws->staged) free(s->h_stats), free(s->h_coef);
    } else {
        free(s->stats), free(s->coef);
    }
    s->capacity = n;
    s->first = xmalloc((size_t)n * sizeof(int32_t));
    s->length = xmalloc((size_t)n * sizeof(int32_t));
    s->layer_coef = xcalloc(L * (size_t)n * E, f);
    s->stats = mem ? mem->alloc((size_t)n * 2 * E * f) : xcalloc((size_t)n * 2 * E, f);
    s->coef = mem ? mem->alloc((size_t)n * E * f) : xcalloc((size_t)n * E, f);
    s->h_stats = ws->staged ? xcalloc((size_t)n * 2 * E, f) : s->stats;
    s->h_coef = ws->staged ? xcalloc((size_t)n * E, f) : s->coef;
}

/* Whether token t begins a block (the whole batch is one block without block_start). */
static bool starts_block(const struct batch *b, int t)
{
    return t == 0 || (b->block_start && b->block_start[t] == t);
}

void seq_aux_begin(const struct model *m, struct forward_workspace *ws, const struct batch *b)
{
    if (m->cfg.aux != AUX_SEQUENCE || !ws->training) return;
    if (!ws->seq) ws->seq = xcalloc(1, sizeof *ws->seq);
    struct seq_aux *s = ws->seq;
    int n = 0;
    for (int t = 0; t < b->N; t++) n += starts_block(b, t);
    grow(s, m, ws, n > 0 ? n : 1);
    s->n_blocks = 0;
    for (int t = 0; t < b->N; t++) {
        if (starts_block(b, t)) {
            s->first[s->n_blocks] = t;
            s->length[s->n_blocks++] = 0;
        }
        s->length[s->n_blocks - 1]++;
    }
    s->stage_sum = 0.0;
}

void seq_aux_layer(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                   int l, const float *probs, const int32_t *ids)
{
    struct seq_aux *s = ws->seq;
    /* a recomputed layer's coefficients are those of its forward, already kept */
    if (m->cfg.aux != AUX_SEQUENCE || !ws->training || !s || s->n_blocks == 0 || ws->recomputing)
        return;
    int E = m->cfg.num_experts, K = m->cfg.top_k, B = s->n_blocks;
    for (int b = 0; b < B; b++)
        ops->router_balance_stats(s->stats + (size_t)b * 2 * E, s->stats + (size_t)b * 2 * E + E,
                                  probs + (size_t)s->first[b] * E, ids + (size_t)s->first[b] * K,
                                  s->length[b], E, K);
    if (ws->staged) ws->mem->download(s->h_stats, s->stats, (size_t)B * 2 * E * sizeof(float));
    float *coef = s->layer_coef + (size_t)l * s->capacity * E;
    double aux = 0.0;
    for (int b = 0; b < B; b++) {
        const float *counts = s->h_stats + (size_t)b * 2 * E, *sums = counts + E;
        double T = s->length[b];
        for (int e = 0; e < E; e++) {
            double ce = counts[e] / (T * K / E);
            aux += ce * (sums[e] / T) / B;
            coef[(size_t)b * E + e] = (float)(ce / (B * T));
        }
    }
    s->stage_sum += aux;
}

double seq_aux_stage_sum(const struct forward_workspace *ws)
{
    return ws->seq ? ws->seq->stage_sum : 0.0;
}

void seq_aux_backward(const struct model *m, const struct backend *ops,
                      struct forward_workspace *ws, int l, float *dlogits, const float *probs,
                      float scale)
{
    struct seq_aux *s = ws->seq;
    if (!s || s->n_blocks == 0) return;
    int E = m->cfg.num_experts, B = s->n_blocks;
    const float *coef = s->layer_coef + (size_t)l * s->capacity * E;
    for (size_t i = 0; i < (size_t)B * E; i++) s->h_coef[i] = scale * coef[i];
    if (ws->staged) ws->mem->upload(s->coef, s->h_coef, (size_t)B * E * sizeof(float));
    for (int b = 0; b < B; b++)
        ops->router_balance_backward(dlogits + (size_t)s->first[b] * E,
                                     probs + (size_t)s->first[b] * E, s->coef + (size_t)b * E,
                                     s->length[b], E);
}

void seq_aux_free(struct forward_workspace *ws)
{
    struct seq_aux *s = ws->seq;
    if (!s) return;
    free(s->first), free(s->length), free(s->layer_coef);
    if (ws->mem) {
        ws->mem->release(s->stats), ws->mem->release(s->coef);
        if (ws->staged) free(s->h_stats), free(s->h_coef);
    } else {
        free(s->stats), free(s->coef);
    }
    free(s);
    ws->seq = NULL;
}
