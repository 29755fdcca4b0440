/* moe: CUDA kernels of the MoE layer's routing and data movement, fp32, C linkage. Each
 * computes what the CPU backend's op of the same name computes (backend.h), on device
 * pointers, on the current stream (0), and returns 0 or -1 with the CUDA error in err.
 * Index math shared with the host: moe_math.h.
 *
 * STATUS: ran on an NVIDIA H200 on 2026-11-26, where tests/test_device.c's comparison
 * with the CPU backend passed; it runs that comparison wherever a GPU is visible. The
 * row routers (moe_router_rows*), the clamped GLU and the grouped bias, which came later,
 * passed it on an H100 the same day (test_device groups routers, gpt-oss-experts). */
#ifndef ESFT_KERNELS_MOE_H
#define ESFT_KERNELS_MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Softmax over each row of logits[N,E] (E <= ROUTER_MAX_EXPERTS), the top-k ids[N,K]
 * (descending probability, ties to the lower id) and weights[N,K] (renormalised over the
 * top-k iff renormalise, times scaling); probs[N,E] may be NULL. One warp per token. */
int moe_router_topk(int32_t *ids, float *weights, float *probs, const float *logits, int N, int E,
                    int K, int renormalise, float scaling, char *err, size_t err_size);

/* The routers other than plain softmax top-k (backend.h's struct router_params), one
 * thread per token running moe_math.h's row function, the CPU backend's own
 * (src/cpu_router.c): the same operations in the same order, so the two differ only by
 * libm's expf against CUDA's and by nvcc's fused multiply-adds. kind: MOE_ROUTER_SOFTMAX
 * (softmax top-k, group-limited greedy when topk_group < n_group: deepseek_v2),
 * MOE_ROUTER_SIGMOID_BIAS (deepseek_v3, glm4_moe), MOE_ROUTER_TOPK_SOFTMAX (gpt_oss; no
 * renormalisation or scaling). bias[E] in device memory or NULL. collaborators[E, top_t]
 * in device memory, or NULL: C2R (src/c2r.h), the choice made again by moe_math.h's
 * router_c2r_row after the router's own, as the CPU backend does. */
enum moe_router_kind { MOE_ROUTER_SOFTMAX, MOE_ROUTER_SIGMOID_BIAS, MOE_ROUTER_TOPK_SOFTMAX };
struct moe_router {
    enum moe_router_kind kind;
    int renormalise;
    float scaling;
    int n_group, topk_group;
    const float *bias;
    const int32_t *collaborators;
    int top_t;
};

/* ids[N,K], weights[N,K], probs[N,E] (may be NULL: the row's own scratch holds them) from
 * logits[N,E]. workspace: moe_router_rows_workspace(N, E, n_group) bytes of device
 * memory (the rows' scratch, for at most ROUTER_ROW_THREADS tokens at a time). */
size_t moe_router_rows_workspace(int N, int E, int n_group);
int moe_router_rows(int32_t *ids, float *weights, float *probs, const float *logits, int N, int E,
                    int K, const struct moe_router *r, void *workspace, char *err,
                    size_t err_size);

/* dlogits[N,E] (written) from dweights[N,K], through the weights' dependence on probs
 * (router_topk_backward_row, router_sigmoid_backward_row or
 * router_topk_softmax_backward_row by kind). One thread per token. */
int moe_router_rows_backward(float *dlogits, const float *dweights, const float *probs,
                             const int32_t *ids, int N, int E, int K, const struct moe_router *r,
                             char *err, size_t err_size);

/* gpt_oss's clamped GLU (moe_math.h's glu_clamped), elementwise on count, and its
 * backward (glu_clamped_backward: 0 at and beyond a clamp's bound). */
int moe_glu_clamped(float *h, const float *gate, const float *up, size_t count, float alpha,
                    float limit, char *err, size_t err_size);
int moe_glu_clamped_backward(float *dgate, float *dup, const float *dh, const float *gate,
                             const float *up, size_t count, float alpha, float limit, char *err,
                             size_t err_size);

/* y[rows, O] += bias[e*O ..] on expert e's rows [offsets[e], offsets[e+1]) (offsets[E+1]
 * in device memory; rows = offsets[E], known to the caller). Backward: dbias[e][o] += the
 * sum over expert e's rows, in row order, of dy[r, o] (fp32 from 0, then added: the CPU
 * backend's order, so the same bits); dbias[E] a DEVICE array of device pointers, NULL
 * for a frozen expert. */
int moe_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O, int rows,
                     char *err, size_t err_size);
int moe_grouped_bias_backward(float *const *dbias, const float *dy, const int32_t *offsets, int E,
                              int O, char *err, size_t err_size);

/* Token-slots sorted by expert, stable in slot order (see moe_math.h): expert_offsets[E+1],
 * slot_of_row[M], row_of_slot[M] for ids[M = N*K]. workspace: at least
 * moe_permute_workspace(M, E) bytes of device memory. */
size_t moe_permute_workspace(int M, int E);
int moe_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row, int32_t *row_of_slot,
                          const int32_t *ids, int M, int E, void *workspace, char *err,
                          size_t err_size);

/* xs[r,:] = x[slot_of_row[r] / K, :] for r < M. */
int moe_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K, int H,
                    char *err, size_t err_size);

/* out[n,:] (+)= sum_k weights[n,k] ys[row_of_slot[n*K+k], :], summed in k order. */
int moe_combine(float *out, const float *ys, const float *weights, const int32_t *row_of_slot,
                int N, int K, int H, int accumulate, char *err, size_t err_size);

/* h[i] = act(gate[i]) * up[i], act silu (gelu 0) or exact GELU (gelu 1). */
int moe_glu(float *h, const float *gate, const float *up, size_t count, int gelu, char *err,
            size_t err_size);

/* The load-balancing statistics (backend.h's router_balance_stats): counts[E] and
 * prob_sums[E] (in double, token order). One thread per expert. */
int moe_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                             const int32_t *ids, int N, int E, int K, char *err, size_t err_size);

/* y[N,H] += sigmoid(gate_logit[n]) * s[N,H] (the gated shared expert). */
int moe_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N, int H,
                          char *err, size_t err_size);

/* ---- backward: each the CPU backend's op of the same name (backend.h) ---------------- */

/* dgate[i], dup[i] (written) from dh[i], through h = act(gate) * up. */
int moe_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                     const float *up, size_t count, int gelu, char *err, size_t err_size);

/* ds[N,H] and dgate_logit[N] (written) from dy[N,H]. One block per token. */
int moe_add_sigmoid_gated_backward(float *ds, float *dgate_logit, const float *dy,
                                   const float *s, const float *gate_logit, int N, int H,
                                   char *err, size_t err_size);

/* dys[M,H] and dweights[N,K] (written) from dout[N,H]. One block per slot. */
int moe_combine_backward(float *dys, float *dweights, const float *dout, const float *ys,
                         const float *weights, const int32_t *row_of_slot, int N, int K, int H,
                         char *err, size_t err_size);

/* dx[N,H] (+)= sum_k dxs[row_of_slot[n*K+k]], in k order (bit for bit the CPU's). */
int moe_gather_rows_backward(float *dx, const float *dxs, const int32_t *row_of_slot, int N, int K,
                             int H, int accumulate, char *err, size_t err_size);

/* dlogits[N,E] (written) from dweights[N,K], through the top-k weights and the softmax;
 * one thread per token running moe_math.h's router_topk_backward_row. */
int moe_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                             const int32_t *ids, int N, int E, int K, int renormalise,
                             float scaling, char *err, size_t err_size);

/* DenseMixer: dlogits[N,E] (written) from dots[N,E] = <g, E_e(x)> of every expert; one
 * thread per token running moe_math.h's router_dense_backward_row. */
int moe_router_dense_backward(float *dlogits, const float *dots, const float *probs,
                              const int32_t *ids, int N, int E, int K, int renormalise,
                              float scaling, char *err, size_t err_size);

/* out[n * out_ld] = <x[n], y[n]> for x, y [N,H]. One block per row. */
int moe_row_dots(float *out, int out_ld, const float *x, const float *y, int N, int H, char *err,
                 size_t err_size);

/* dlogits[N,E] += the load-balancing loss's gradient through the softmax. */
int moe_router_balance_backward(float *dlogits, const float *probs, const float *coef, int N, int E,
                                char *err, size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
