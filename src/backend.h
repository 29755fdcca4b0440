/* backend: the table of numerical ops the model's forward and backward are written
 * against, and the memory they work on. The CPU backend (cpu_ops.c: fp32, OpenBLAS,
 * OpenMP) is the readable reference; the CUDA backend implements the same table with
 * kernels/; the device simulator (devsim.c) runs the CPU ops on buffers the host cannot
 * dereference. Every pointer an op takes is one of the backend's buffers (alloc below),
 * except where a comment says host; shapes are row-major and written in each comment.
 *
 * Sizes: N tokens, H hidden, D a normalised width, nH / nKV heads, Dh head_dim,
 * E experts, K top-k, I expert or MLP width, V vocabulary, M token-slots (N*K). */
#ifndef ESFT_BACKEND_H
#define ESFT_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hfconfig.h"

struct adamw_coef; /* dense_math.h */

/* How a batch's tokens may attend: token i sees tokens [sample_start[i], i] of the
 * flattened batch (causal, and never across packed samples or rows). With a window W > 0,
 * query i (position i within its sample) sees only the keys j of its sample with
 * i - W < j <= i: its own and the W - 1 before it (transformers 5.24's
 * sliding_window_overlay, kv_idx > q_idx - sliding_window, with the causal mask).
 * With sinks (gpt_oss), each query head h adds one logit sinks[h] to every row's softmax
 * and drops its probability: p_ij = e^(s_ij - m) / (sum_j' e^(s_ij' - m) + e^(sinks[h] - m)),
 * m the row's largest score or sink (transformers' gpt_oss eager_attention_forward).
 * attention_backward adds d loss / d sinks[h] = -sum_i P_sink(i) <dO_i, O_i> over head h's
 * queries to dsinks[h]. lse, when set, carries each query row's log-sum-exp from the
 * forward to the backward (log of the softmax's denominator, the sink's term included):
 * attention may write it, attention_backward may read it, and a backend that does neither
 * recomputes what it needs; the same buffer must reach both ops of one step. A zeroed
 * struct's window, sinks, dsinks and lse mean none. */
struct attention_mask {
    const int32_t *sample_start; /* [N] */
    int window;                  /* 0: no window; W > 0: keys i - W < j <= i */
    const float *sinks;          /* [nH] backend buffer, or NULL: no sinks */
    float *dsinks;               /* [nH] backend buffer, ADDED to (backward), or NULL */
    float *lse;                  /* [nH, N] backend buffer, or NULL: not kept */
};

/* How one MoE layer routes (hfconfig.h's enum hf_router_kind; transformers 5.24's
 * routers): ROUTER_SOFTMAX_TOPK: softmax, top-k (groups ignored). ROUTER_GROUPED_GREEDY
 * (DeepseekV2TopkRouter, group_limited_greedy): softmax; a group's score is its largest
 * probability; the probabilities outside the topk_group best of n_group contiguous
 * groups become 0, then top-k. ROUTER_SIGMOID_BIAS (DeepseekV3TopkRouter,
 * Glm4MoeTopkRouter): s = sigmoid(logits), c = s + bias; a group's score is the sum of
 * its two largest c; c outside the kept groups becomes -inf; top-k of c; the weights
 * are s[id], divided by (their sum + 1e-20) when renormalising. Every router then
 * multiplies the weights by scaling.
 * C2R (model.routing: c2r; c2r.h): with collaborators set, every router makes its choice
 * by moe_math.h's router_select_c2r_row instead of a plain top-k, on the same selection
 * scores (the probabilities, group-masked where the router masks; c = s + bias, masked;
 * gpt_oss's logits); the weights follow the router's own rule over the chosen K. */
struct router_params {
    enum hf_router_kind kind;
    bool renormalise;        /* divide the top-k weights by their sum */
    float scaling;           /* routed_scaling_factor */
    int n_group, topk_group; /* 1 and 1 when ungrouped */
    const float *bias;       /* [E] backend buffer: e_score_correction_bias (sigmoid), or NULL */
    const int32_t *collaborators; /* [E, top_t] backend buffer: C2R's lists, or NULL */
    int top_t;                    /* collaborators per expert (C2R's T) */
};

/* Weights stored as bf16 (model.frozen_weights: bf16): a frozen weight matrix kept as
 * bf16 values (uint16_t, the upper half of the fp32 bits) reaches the ops that multiply
 * by a weight (linear, linear_backward, grouped_linear, grouped_linear_backward) through
 * their `const float *` weight argument as its address with the lowest bit set: the
 * dtype travels with the pointer, so the forward and backward read the same for both.
 * fp32 weights are 4-byte aligned, so the bit is free; a device simulator's tag (bit
 * 62) leaves it alone. Only these helpers make or read such a pointer; a bf16 weight
 * never has a gradient (the ops take it with dw NULL). */
#define WEIGHT_BF16_BIT ((uintptr_t)1)
static inline float *weight_bf16(uint16_t *p)
{
    return p ? (float *)((uintptr_t)p | WEIGHT_BF16_BIT) : NULL;
}
static inline bool weight_is_bf16(const float *w)
{
    return ((uintptr_t)w & WEIGHT_BF16_BIT) != 0;
}
static inline const uint16_t *weight_bf16_data(const float *w)
{
    return (const uint16_t *)((uintptr_t)w & ~WEIGHT_BF16_BIT);
}
/* The weight `elements` values after w, in w's own dtype (a row block of a matrix). */
static inline const float *weight_offset(const float *w, size_t elements)
{
    if (!weight_is_bf16(w)) return w + elements;
    return (const float *)((uintptr_t)(weight_bf16_data(w) + elements) | WEIGHT_BF16_BIT);
}

struct backend {
    const char *name;

    /* x[N,H] = table[tokens[n], :] */
    void (*embedding)(float *x, const int32_t *tokens, const float *table, int N, int H);

    /* y[N,O] = x[N,I] @ w[O,I]^T + bias[O] (bias may be NULL); accumulate adds to y. w
     * fp32 or bf16 (weight_bf16 above); the products and sums are fp32 either way. */
    void (*linear)(float *y, const float *x, const float *w, const float *bias, int N, int I,
                   int O, bool accumulate);

    /* y[R,D] = w[D] * x / sqrt(mean(x^2) + eps), per row of D; rstd[R] keeps 1/rms for
     * the backward pass (may be NULL). y may alias x. */
    void (*rmsnorm)(float *y, float *rstd, const float *x, const float *w, int R, int D,
                    float eps);

    /* In place on x[N, n_heads, Dh]: rotate the first rotary_dim dims of each head (the
     * rotary_dim floats from x + (n * n_heads + h) * Dh) by position positions[n], cos
     * and sin scaled by attention_scaling. inv_freq[rotary_dim/2]. Dh is the head's
     * stride, so x may point into a head (MLA's q + dn, stride dn + dr, rotates each
     * head's last dr dims). layout ROPE_ROTATE_HALF: pairs (i, i + rotary_dim/2);
     * ROPE_INTERLEAVED: pairs (2i, 2i+1) (deepseek's complex multiply); pair i turns by
     * position * inv_freq[i]. */
    void (*rope)(float *x, const int32_t *positions, const float *inv_freq,
                 float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                 enum hf_rope_layout layout);

    /* out[N, nH*Dv] = softmax(q k^T * scale + mask) v per head; query head h reads KV
     * head h / (nH/nKV). q[N, nH*Dh], k [N, nKV*Dh], v [N, nKV*Dv] (Dv: the value and
     * output head width; MLA's differs from the query-key width Dh). */
    void (*attention)(float *out, const float *q, const float *k, const float *v,
                      const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                      int Dv, float scale);

    /* dst[r*dst_ld + c] (+)= src[r*src_ld + c] for r < rows, c < cols: a strided 2D copy
     * (cudaMemcpy2D's), to assemble MLA's keys and values and to split or sum their
     * gradients. accumulate adds instead of writing. */
    void (*copy_columns)(float *dst, int dst_ld, const float *src, int src_ld, int rows,
                         int cols, bool accumulate);

    /* From router logits[N,E]: the top-k ids[N,K] and their weights[N,K] as the model
     * multiplies the expert outputs by them, routed as rp describes (see struct
     * router_params). ids are in descending selection score (the group-masked
     * probability or bias-corrected sigmoid), ties to the lower id. probs[N,E] keeps what
     * router_topk_backward needs: the softmax probabilities, or the sigmoid scores for
     * ROUTER_SIGMOID_BIAS; it may be NULL when no backward follows. */
    void (*router_topk)(int32_t *ids, float *weights, float *probs, const float *logits, int N,
                        int E, int K, const struct router_params *rp);

    /* The load-balancing loss's statistics of one MoE layer (transformers'
     * load_balancing_loss_func): counts[e] = how many of the N*K slots chose expert e,
     * prob_sums[e] = sum over tokens of probs[n,e] (summed in double, in token order). */
    void (*router_balance_stats)(float *counts, float *prob_sums, const float *probs,
                                 const int32_t *ids, int N, int E, int K);

    /* Token-slots sorted by expert, stable in slot order: expert_offsets[E+1] (exclusive
     * scan of the per-expert counts), slot_of_row[M] (row r of the permuted matrix is
     * slot slot_of_row[r] = n*K + k), row_of_slot[M] (the inverse). */
    void (*permute_by_expert)(int32_t *expert_offsets, int32_t *slot_of_row,
                              int32_t *row_of_slot, const int32_t *ids, int N, int K, int E);

    /* xs[M,H] = x[slot_of_row[r] / K, :] : gather each slot's token row. */
    void (*gather_rows)(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                        int H);

    /* Grouped expert GEMM: for each expert e with rows [offsets[e], offsets[e+1]):
     * y[rows, O] = x[rows, I] @ w[e][O, I]^T. w is a host array of E weights, each fp32
     * or bf16 (weight_bf16): a trained expert's fp32 beside frozen ones' bf16. */
    void (*grouped_linear)(float *y, const float *x, const float *const *w,
                           const int32_t *offsets, int E, int I, int O);

    /* Per expert e: rows [offsets[e], offsets[e+1]) of y[rows, O] += bias[e*O .. e*O+O)
     * (bias: E consecutive [O] vectors; gpt_oss's expert biases). */
    void (*grouped_bias)(float *y, const float *bias, const int32_t *offsets, int E, int O);

    /* h[M,I] = act(gate[M,I]) * up[M,I]. */
    void (*glu)(float *h, const float *gate, const float *up, size_t count,
                enum hf_activation act);

    /* gpt_oss's expert activation (GptOssExperts._apply_gate), elementwise on count:
     * g = min(gate, limit), u = clamp(up, -limit, limit), h = (u + 1) * g * sigmoid(alpha g). */
    void (*glu_clamped)(float *h, const float *gate, const float *up, size_t count, float alpha,
                        float limit);

    /* out[N,H] (+)= sum_k weights[n,k] * ys[row_of_slot[n*K+k], :], summed in fp32 in k
     * order (a gather: deterministic, no atomics). accumulate adds to out. */
    void (*combine)(float *out, const float *ys, const float *weights,
                    const int32_t *row_of_slot, int N, int K, int H, bool accumulate);

    /* y[N,H] += sigmoid(gate_logit[N]) * s[N,H] (qwen2_moe's gated shared expert). */
    void (*add_sigmoid_gated)(float *y, const float *s, const float *gate_logit, int N, int H);

    /* x[i] = min(max(x[i], low), high) in place (olmoe's clip_qkv). */
    void (*clamp)(float *x, size_t count, float low, float high);

    /* y[n] = x[n] + r[n] for count elements (residual connections). */
    void (*add)(float *y, const float *x, const float *r, size_t count);

    /* Cross-entropy of logits[N,V] against labels[N] (-100 = ignored): returns the sum
     * of -log softmax(logits)[label] over the counted tokens (double), and their count. */
    double (*cross_entropy_sum)(const float *logits, const int32_t *labels, int N, int V,
                                long long *counted);

    /* ---- backward ----------------------------------------------------------------- *
     * Each takes the gradient of the op's output and the forward's inputs (and what the
     * forward saved), and writes input gradients. Weight gradients are ADDED to their
     * buffers (gradient accumulation over micro-batches); a NULL weight-gradient buffer
     * means the weight is frozen: no weight-gradient work at all. accumulate_dx adds
     * the input gradient instead of writing it. */

    /* dx[N,I] (+)= dy[N,O] @ w[O,I]; dw[O,I] += dy^T @ x; dbias[O] += column sums of dy.
     * dx may be NULL (no input gradient needed, e.g. the first layer's input). A bf16 w
     * (weight_bf16) comes with dw and dbias NULL. */
    void (*linear_backward)(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                            const float *w, int N, int I, int O, bool accumulate_dx);

    /* RMSNorm: y = w * x * rstd. dx[R,D] (+)= ...; dw[D] += sum_r dy * x * rstd. rstd[R]
     * as the forward saved it. dx may alias dy. */
    void (*rmsnorm_backward)(float *dx, float *dw, const float *dy, const float *x,
                             const float *w, const float *rstd, int R, int D, bool accumulate_dx);

    /* In place on dx[N, n_heads, Dh] (Dh the stride, as rope): the transpose of rope's
     * rotation (rotate by -angle), same layout. */
    void (*rope_backward)(float *dx, const int32_t *positions, const float *inv_freq,
                          float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                          enum hf_rope_layout layout);

    /* dq[N, nH*Dh], dk [N, nKV*Dh], dv [N, nKV*Dv] (written, not added) from dout
     * [N, nH*Dv], with the forward's q, k, v and out; probabilities recomputed block by
     * block. */
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout,
                               const float *q, const float *k, const float *v, const float *out,
                               const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                               int Dv, float scale);

    /* dlogits[N,E] (written) from dweights[N,K], through the top-k weights' dependence on
     * probs[N,E] (saved by router_topk): the renormalisation when rp->renormalise, the
     * scaling, then the softmax or the sigmoid. The choice of experts (groups, bias) has
     * no gradient. */
    void (*router_topk_backward)(float *dlogits, const float *dweights, const float *probs,
                                 const int32_t *ids, int N, int E, int K,
                                 const struct router_params *rp);

    /* DenseMixer's router gradient (moe_math.h's router_dense_backward_row): dlogits[N,E]
     * (written) from dots[N,E] = <d output, E_e(x)> of every expert e on every token,
     * through the dense path's weights as probs[N,E], ids[N,K] and rp define them. Only
     * ROUTER_SOFTMAX_TOPK routers (preflight refuses the others). */
    void (*router_dense_backward)(float *dlogits, const float *dots, const float *probs,
                                  const int32_t *ids, int N, int E, int K,
                                  const struct router_params *rp);

    /* The load-balancing loss's gradient through the softmax: with d loss / d probs[n,e]
     * = coef[e] (the same for every token), dlogits[n,e] += p[n,e] * (coef[e] -
     * sum_j p[n,j] coef[j]). */
    void (*router_balance_backward)(float *dlogits, const float *probs, const float *coef,
                                    int N, int E);

    /* Grouped GEMM backward: dx[M,I] = dy[M,O] @ w[e] per expert's rows (written), and
     * dw[e][O,I] += dy_e^T @ x_e for each expert e whose dw[e] is not NULL (frozen
     * experts: NULL, no weight-gradient GEMM; a bf16 w[e] is always frozen). w as in
     * grouped_linear. dx may be NULL. */
    void (*grouped_linear_backward)(float *dx, float *const *dw, const float *dy,
                                    const float *x, const float *const *w,
                                    const int32_t *offsets, int E, int I, int O);

    /* grouped_bias: dbias[e][o] += sum over expert e's rows r of dy[r, o], rows summed in
     * order (the same bits on any thread count); dbias is a host array of E buffers,
     * dbias[e] NULL: expert e frozen, skipped. */
    void (*grouped_bias_backward)(float *const *dbias, const float *dy, const int32_t *offsets,
                                  int E, int O);

    /* h = act(gate) * up: dgate, dup [count] (written) from dh. dgate may alias gate's
     * buffer only if the forward values are not needed afterwards (they are not). */
    void (*glu_backward)(float *dgate, float *dup, const float *dh, const float *gate,
                         const float *up, size_t count, enum hf_activation act);

    /* glu_clamped: dgate, dup [count] (written) from dh. A clamp that bites passes no
     * gradient: dgate = 0 where gate >= limit, dup = 0 where |up| >= limit; a value
     * exactly at a bound gets 0 too (torch 2.15's clamp backward; moe_math.h). */
    void (*glu_clamped_backward)(float *dgate, float *dup, const float *dh, const float *gate,
                                 const float *up, size_t count, float alpha, float limit);

    /* combine: out[n] = sum_k weights[n,k] ys[row_of_slot[n*K+k]]. dys[M,H] (written) and
     * dweights[N,K] = <dout[n], ys[row]> (written). */
    void (*combine_backward)(float *dys, float *dweights, const float *dout, const float *ys,
                             const float *weights, const int32_t *row_of_slot, int N, int K,
                             int H);

    /* out[n * out_ld] = <x[n], y[n]> for the rows of x[N,H] and y[N,H] (summed in fp32;
     * out_ld lets it fill a column of a wider matrix: DenseMixer's dots). */
    void (*row_dots)(float *out, int out_ld, const float *x, const float *y, int N, int H);

    /* gather_rows: dx[N,H] (+)= sum_k dxs[row_of_slot[n*K+k]] (a gather in k order:
     * deterministic, no atomics). */
    void (*gather_rows_backward)(float *dx, const float *dxs, const int32_t *row_of_slot, int N,
                                 int K, int H, bool accumulate);

    /* y += sigmoid(g[n]) * s[n]: ds[N,H] = sigmoid(g) dy (written); dg[N] =
     * <dy[n], s[n]> sigmoid(g) (1 - sigmoid(g)) (written). */
    void (*add_sigmoid_gated_backward)(float *ds, float *dgate_logit, const float *dy,
                                       const float *s, const float *gate_logit, int N, int H);

    /* clamp: dx[i] = 0 where the forward's output y[i] sits at a bound (the input was
     * clamped), in place. (An input exactly at the bound also gets 0; torch passes it.) */
    void (*clamp_backward)(float *dx, const float *y, size_t count, float low, float high);

    /* dlogits[N,V] = scale * (softmax(logits) - onehot(label)) for counted rows, 0 for
     * ignored rows (label -100). scale is 1 / (loss-bearing tokens of the global batch). */
    void (*cross_entropy_backward)(float *dlogits, const float *logits, const int32_t *labels,
                                   int N, int V, float scale);
    /* The three above on whole rows in one pass over each (optional; a backend with it
     * takes training's head by token rows, forward.c): returns cross_entropy_sum's loss
     * sum and count, count_correct's correct targets, and turns logits[N,V] in place into
     * cross_entropy_backward's gradient, the same values bit for bit. */
    double (*cross_entropy_rows)(float *logits, const int32_t *labels, int N, int V, float scale,
                                 long long *counted, long long *correct);

    /* lm_head and cross-entropy one vocabulary chunk at a time, so that the [N, V] logits
     * are never held (optional: a backend without them keeps the whole-logits path).
     * state[N, 4] per token: the running max, the running sum of exp(z - max) (fp32,
     * rescaled when the max grows), the label's logit, the largest logit; best[N] its
     * vocabulary index (the first of equal ones, as count_correct). ce_chunk_update
     * folds the chunk logits[N, C] of vocabulary ids [v0, v0 + C) in (v0 == 0 starts
     * afresh); ce_chunk_finish gives the loss sum over the counted tokens (labels >= 0,
     * as cross_entropy_sum) with their count and how many had the label as their best;
     * ce_chunk_backward turns the same chunk's logits into scale * (softmax - onehot)
     * from the final state (in place allowed), as cross_entropy_backward does. */
    void (*ce_chunk_update)(float *state, int32_t *best, const float *logits,
                            const int32_t *labels, int N, int C, int v0);
    double (*ce_chunk_finish)(const float *state, const int32_t *best, const int32_t *labels,
                              int N, long long *counted, long long *correct);
    void (*ce_chunk_backward)(float *dlogits, const float *logits, const float *state,
                              const int32_t *labels, int N, int C, int v0, float scale);
    /* Bytes of logits the backend holds at once by choice: 0 takes chunks of
     * WS_VOCAB_CHUNK ids (the CPU: memory first); otherwise the whole [N, V] block when it
     * fits, else the largest chunks that do (CUDA: each chunk's logits would be computed
     * again in the backward, 15% of an ESFT step on an H100). ESFT_VOCAB_CHUNK overrides. */
    size_t logits_budget;

    /* dtable[V,H] += dx[n] at row tokens[n], in token order (deterministic). */
    void (*embedding_backward)(float *dtable, const float *dx, const int32_t *tokens, int N,
                               int H);

    /* ---- optimizer, on the backend's copies of weights, moments and gradients ------- */

    /* One AdamW step on n elements (dense_math.h's adamw_update): data, m, v in place. */
    void (*adamw)(float *data, float *m, float *v, const float *grad, size_t n,
                  const struct adamw_coef *coef);
    /* Sum of x^2 in double, returned to the host: a partial sum per NORM_CHUNK elements
     * (dense_math.h) in element order, the partials added in chunk order, so every
     * backend and thread count gives the same value. */
    double (*sum_squares)(const float *x, size_t n);
    /* x[i] *= factor (gradient clipping). */
    void (*scale)(float *x, size_t n, float factor);

    /* Targets (>= 0) of labels[N] that are their logits[N,V] row's argmax (ties to the
     * lower id): token accuracy's numerator, returned to the host. */
    long long (*count_correct)(const float *logits, const int32_t *labels, int N, int V);

    /* ---- memory ------------------------------------------------------------------- *
     * host_visible: the host may dereference the backend's buffers (the CPU backend).
     * Otherwise only the ops above and these transfers touch them, and every value the
     * host needs comes through download (counted: backend_traffic). */
    bool host_visible;
    void *(*alloc)(size_t bytes); /* zeroed; ends the run when memory is short */
    void (*release)(void *p);     /* p may be NULL */
    void (*upload)(void *dst, const void *host_src, size_t bytes);
    void (*download)(void *host_dst, const void *src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes);
    void (*zero)(void *p, size_t bytes);
    /* The floats [p, p + count) keep their values for the rest of the run (frozen
     * weights, declared by model_attach): a backend may keep a cheaper copy of them (the
     * CUDA backend's bf16 mode multiplies by a bf16 copy). constant(NULL, 0) ends every
     * declaration (the model that made them is freed, and its memory may be handed out
     * again). May be NULL: nothing kept. */
    void (*constant)(const float *p, size_t count);
    /* From now on no op is given more than `tokens` tokens (an attention's samples
     * included) or `rows` rows of any other kind (the experts' token-slot rows under EP):
     * a backend that keeps scratch between calls sizes it for these at its first use, so
     * that the train step loop allocates nothing after its first step (workspace creation
     * calls it with the workspace's capacities; the largest over calls holds). May be
     * NULL. */
    void (*reserve)(size_t tokens, size_t rows);
    /* Bytes the backend's buffers take now and at most so far (for the progress line). */
    void (*memory)(size_t *in_use, size_t *peak);
};

/* The fp32 CPU backend. */
const struct backend *backend_cpu(void);

/* The device simulator: the CPU ops on buffers whose addresses the host cannot
 * dereference (any host read of one is a crash), so that code run on it is known to
 * reach device memory only through the ops and the transfers. */
const struct backend *backend_devsim(void);

/* The backend of a deck's run.backend name ("cpu", "cpu-devsim", "cuda"), or NULL with a
 * reason in err (an unknown name, or cuda in a build without it / with no device). */
const struct backend *backend_named(const char *name, char *err, size_t err_size);

/* Transfers between host and the backend's buffers since the start (non-host-visible
 * backends count them). */
struct backend_traffic {
    long long uploads, downloads;
    double upload_bytes, download_bytes;
};
struct backend_traffic backend_traffic(void);
void backend_count_upload(size_t bytes);
void backend_count_download(size_t bytes);

#endif
