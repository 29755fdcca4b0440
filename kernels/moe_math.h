/* moe_math: the index arithmetic of the CUDA MoE kernels, written once for the device
 * kernels (kernels/moe.cu) and the host, so the CPU build tests it (tests/test_moe_math.c)
 * against the CPU backend without a GPU.
 *
 * Permutation by expert (the device version of backend.h's permute_by_expert): the M
 * token-slots are cut into tiles of PERMUTE_TILE consecutive slots. Pass 1 counts each
 * tile's slots per expert (counts[tile][e]); pass 2 scans them expert-major, tile-minor,
 * giving each (expert, tile) the first row of its run and each expert its offset; pass 3
 * places slot s at row = start[e][tile of s] + (slots of the same expert before s in its
 * tile). Rows are therefore sorted by expert and, within an expert, in slot order: the
 * CPU backend's order exactly, for any tile size.
 *
 * Launch arithmetic: grid sizes for element-wise kernels (grid-stride loops past the
 * grid limit) and for one-warp-per-row kernels. Pure functions of their arguments. */
#ifndef ESFT_KERNELS_MOE_MATH_H
#define ESFT_KERNELS_MOE_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MOE_HD __host__ __device__ static inline
#else
#define MOE_HD static inline
#endif

enum { PERMUTE_TILE = 256, WARP = 32, ROUTER_MAX_EXPERTS = 1024, MAX_GRID_BLOCKS = 65535 * 16 };

/* Tiles of `tile` slots covering M slots. */
MOE_HD int permute_tiles(int M, int tile) { return M > 0 ? (M + tile - 1) / tile : 0; }

/* Pass 1, one tile: counts[e] += slots of [first, end) that chose e. */
MOE_HD void permute_count_tile(int *counts, const int32_t *ids, int first, int end)
{
    for (int s = first; s < end; s++) counts[ids[s]]++;
}

/* Pass 2 for expert e: start[t * E + e] (t < tiles) = offset of e + slots of e in the
 * tiles before t; returns the slots of e in all tiles. expert_offset is the sum of the
 * totals of experts before e (the exclusive scan over experts, done by the caller). */
MOE_HD int permute_scan_expert(int *start, const int *counts, int tiles, int E, int e,
                               int expert_offset)
{
    int run = expert_offset;
    for (int t = 0; t < tiles; t++) {
        start[t * E + e] = run;
        run += counts[t * E + e];
    }
    return run - expert_offset;
}

/* Pass 3, slot s of tile t (tile = its size): its row. */
MOE_HD int permute_row_of(const int32_t *ids, const int *start, int E, int tile, int s)
{
    int t = s / tile, e = ids[s], before = 0;
    for (int j = t * tile; j < s; j++) before += ids[j] == e;
    return start[t * E + e] + before;
}

/* Blocks for n elements at `per_block` threads, one element per thread, capped at the
 * grid limit (the kernels loop grid-stride past it). */
MOE_HD int launch_blocks(size_t n, int per_block)
{
    size_t blocks = (n + (size_t)per_block - 1) / (size_t)per_block;
    if (blocks < 1) blocks = 1;
    return blocks > (size_t)MAX_GRID_BLOCKS ? MAX_GRID_BLOCKS : (int)blocks;
}

/* One warp per row: rows per block of `threads` threads, and the blocks for R rows. */
MOE_HD int warp_rows_per_block(int threads) { return threads / WARP; }
MOE_HD int launch_warp_blocks(int R, int threads)
{
    int per = warp_rows_per_block(threads);
    return R > 0 ? (R + per - 1) / per : 1;
}

/* Router: lane l of a warp holds experts l, l + 32, ...: how many each lane holds. */
MOE_HD int router_per_lane(int E) { return (E + WARP - 1) / WARP; }

/* The expert whose rows [offsets[e], offsets[e+1]) hold row r < offsets[E]: the last e
 * with offsets[e] <= r (an empty expert before it shares its offset), by bisection. */
MOE_HD int expert_of_row(const int32_t *offsets, int E, int r)
{
    int low = 0, high = E - 1; /* offsets[low] <= r always (offsets[0] = 0) */
    while (low < high) {
        int mid = (low + high + 1) / 2;
        if (offsets[mid] <= r)
            low = mid;
        else
            high = mid - 1;
    }
    return low;
}

/* ---- element and row arithmetic shared with the CPU backend (src/cpu_ops.c) ----------- */

/* silu(g) * u, and its gradients: dg = d u silu'(g), du = d silu(g), with silu' = s (1 +
 * g (1 - s)), s = sigmoid(g); silu(g) formed as the forward forms it, g / (1 + e^-g). */
MOE_HD float silu_glu(float g, float u) { return g / (1.0f + expf(-g)) * u; }
MOE_HD void silu_glu_backward(float *dg, float *du, float d, float g, float u)
{
    float s = 1.0f / (1.0f + expf(-g));
    *du = d * (g / (1.0f + expf(-g)));
    *dg = d * u * (s * (1.0f + g * (1.0f - s)));
}

/* gelu(g) * u (exact, erf GELU: transformers' "gelu") and its gradients: gelu' = Phi(g) +
 * g phi(g). */
MOE_HD float gelu_glu(float g, float u)
{
    return 0.5f * g * (1.0f + erff(g * 0.70710678118654752440f)) * u;
}
MOE_HD void gelu_glu_backward(float *dg, float *du, float d, float g, float u)
{
    float cdf = 0.5f * (1.0f + erff(g * 0.70710678118654752440f));
    float pdf = 0.39894228040143267794f * expf(-0.5f * g * g);
    *du = d * (0.5f * g * (1.0f + erff(g * 0.70710678118654752440f)));
    *dg = d * u * (cdf + g * pdf);
}

/* gpt_oss's clamped GLU (transformers' GptOssExperts._apply_gate): g = min(gate, limit),
 * u = clamp(up, -limit, limit), h = (u + 1) * (g * sigmoid(alpha g)), in that order. The
 * gradients pass strictly inside the clamps: gate < limit for dg, -limit < up < limit for
 * du (torch 2.15's clamp backward gives 0 to a value sitting exactly on a bound too:
 * x.clamp(-3, 3) at x = 3 or -3 has gradient 0):
 * dh/du = g s, dh/dg = (u + 1) (s + alpha g s (1 - s)), s = sigmoid(alpha g). */
MOE_HD float glu_clamped(float gate, float up, float alpha, float limit)
{
    float g = gate > limit ? limit : gate;
    float u = up > limit ? limit : (up < -limit ? -limit : up);
    float glu = g * (1.0f / (1.0f + expf(-(g * alpha))));
    return (u + 1.0f) * glu;
}
MOE_HD void glu_clamped_backward(float *dg, float *du, float d, float gate, float up, float alpha,
                                 float limit)
{
    float g = gate > limit ? limit : gate;
    float u = up > limit ? limit : (up < -limit ? -limit : up);
    float s = 1.0f / (1.0f + expf(-(g * alpha)));
    *du = up > -limit && up < limit ? d * (g * s) : 0.0f;
    *dg = gate < limit ? d * (u + 1.0f) * (s + alpha * g * s * (1.0f - s)) : 0.0f;
}

/* The shared expert's gate: sigmoid of its logit, formed as the CPU forms it. */
MOE_HD float gate_sigmoid(float logit) { return 1.0f / (1.0f + expf(-logit)); }

/* ---- the routers, one token per call (backend.h's struct router_params) --------------
 * Written once for the CPU backend (src/cpu_router.c) and the device. No allocation: the
 * caller passes the scratch rows (the CPU keeps them on its stack, sized by
 * HFCONFIG_MAX_EXPERTS). */

/* The routers' exponentials of a row, p[E] = e^(z - max) (max >= every z) and s[E] =
 * sigmoid(z) = 1 / (1 + e^-z), by expf, unless the includer names its own row functions
 * before including this header (the CPU router, cpu_router.c: cpu_math.h's SIMD ones).
 * The device kernels keep these. */
#ifndef MOE_ROUTER_EXP_ROW
MOE_HD void router_exp_row(float *p, const float *z, float max, int E)
{
    for (int e = 0; e < E; e++) p[e] = expf(z[e] - max);
}
#define MOE_ROUTER_EXP_ROW router_exp_row
#endif
#ifndef MOE_ROUTER_SIGMOID_ROW
MOE_HD void router_sigmoid_values(float *s, const float *z, int E)
{
    for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-z[e]));
}
#define MOE_ROUTER_SIGMOID_ROW router_sigmoid_values
#endif

/* p[E] = softmax(z[E]) in fp32: the maximum, e^(z - max) summed in index order, then
 * divided (torch's softmax(dtype=float32) up to rounding). */
MOE_HD void router_softmax_row(float *p, const float *z, int E)
{
    float max = -INFINITY;
    for (int e = 0; e < E; e++) max = z[e] > max ? z[e] : max;
    MOE_ROUTER_EXP_ROW(p, z, max, E);
    float sum = 0.0f;
    for (int e = 0; e < E; e++) sum += p[e];
    for (int e = 0; e < E; e++) p[e] /= sum;
}

/* s[E] = sigmoid(z[E]) and the selection scores c[E] = s + bias[E] (bias NULL: c = s). */
MOE_HD void router_sigmoid_row(float *s, float *c, const float *z, const float *bias, int E)
{
    MOE_ROUTER_SIGMOID_ROW(s, z, E);
    for (int e = 0; e < E; e++) c[e] = bias ? s[e] + bias[e] : s[e];
}

/* The score of the group c[first .. first + size): its largest value, or with top_two the
 * sum of its two largest (torch's topk(2).sum(); a repeated value counts twice). */
MOE_HD float router_group_score(const float *c, int first, int size, int top_two)
{
    float largest = -INFINITY, second = -INFINITY;
    for (int e = first; e < first + size; e++) {
        if (c[e] > largest) {
            second = largest;
            largest = c[e];
        } else if (c[e] > second) {
            second = c[e];
        }
    }
    return top_two ? largest + second : largest;
}

/* Group-limited routing on c[E]: of n_group contiguous groups of E / n_group, the
 * topk_group with the best router_group_score stay (ties to the lower group); every
 * value of the others becomes `masked`. group_score[n_group] is scratch. */
MOE_HD void router_mask_groups_row(float *c, float *group_score, int E, int n_group, int topk_group,
                                   int top_two, float masked)
{
    if (topk_group >= n_group) return;
    int size = E / n_group;
    for (int g = 0; g < n_group; g++)
        group_score[g] = router_group_score(c, g * size, size, top_two);
    for (int g = 0; g < n_group; g++) {
        int better = 0; /* groups ranked before g */
        for (int h = 0; h < n_group; h++)
            better +=
                group_score[h] > group_score[g] || (group_score[h] == group_score[g] && h < g);
        if (better >= topk_group)
            for (int e = g * size; e < (g + 1) * size; e++) c[e] = masked;
    }
}

/* id[K]: the K largest of c[E], in descending order, ties to the lower id (K rounds of
 * argmax; strict > keeps the lower id). taken[E] is scratch. */
MOE_HD void router_select_row(int32_t *id, const float *c, unsigned char *taken, int E, int K)
{
    for (int e = 0; e < E; e++) taken[e] = 0;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || c[e] > c[best])) best = e;
        taken[best] = 1;
        id[k] = best;
    }
}

/* C2R, collaboration-constrained routing (shared/reference/esft-semantics.md section 5):
 * id[0] = the largest of c[E]; id[1..K) = the K-1 largest of c over id[0]'s collaborators
 * collaborators[id[0] * T .. + T) (C2R's top-T collaborative list), in descending order;
 * ties to the lower id (strict >), as router_select_row. T >= K - 1 (the caller checks).
 * taken[E] is scratch. */
MOE_HD void router_select_c2r_row(int32_t *id, const float *c, const int32_t *collaborators, int T,
                                  unsigned char *taken, int E, int K)
{
    int first = 0;
    for (int e = 1; e < E; e++)
        if (c[e] > c[first]) first = e;
    for (int e = 0; e < E; e++) taken[e] = 0;
    taken[first] = 1;
    id[0] = first;
    const int32_t *list = collaborators + (size_t)first * T;
    for (int k = 1; k < K; k++) {
        int best = -1;
        for (int t = 0; t < T; t++) {
            int e = list[t];
            if (!taken[e] && (best < 0 || c[e] > c[best] || (c[e] == c[best] && e < best)))
                best = e;
        }
        taken[best] = 1;
        id[k] = best;
    }
}

/* w[K] = v[id] (divided by their sum, taken in k order, plus epsilon when renormalise),
 * times scaling. */
MOE_HD void router_weights_row(float *w, const float *v, const int32_t *id, int K, int renormalise,
                               float epsilon, float scaling)
{
    float total = 0.0f;
    for (int k = 0; k < K; k++) {
        w[k] = v[id[k]];
        total += w[k];
    }
    total += epsilon;
    for (int k = 0; k < K; k++) {
        if (renormalise) w[k] /= total;
        w[k] *= scaling;
    }
}

/* C2R over a row a router has just routed (the CPU backend's and the device kernel's):
 * the choice again by router_select_c2r_row on c[E], the scores the router chose by,
 * then the router's weights over the new K: with softmax_of_chosen (gpt_oss) the softmax
 * of z over the chosen (id[0], the largest, first; as router_topk_softmax_row), else
 * v[id] as router_weights_row (renormalise, epsilon, scaling). */
MOE_HD void router_c2r_row(int32_t *id, float *w, const float *c, const float *v, const float *z,
                           const int32_t *collaborators, int T, unsigned char *taken, int E, int K,
                           int softmax_of_chosen, int renormalise, float epsilon, float scaling)
{
    router_select_c2r_row(id, c, collaborators, T, taken, E, K);
    if (!softmax_of_chosen) {
        router_weights_row(w, v, id, K, renormalise, epsilon, scaling);
        return;
    }
    float max = z[id[0]], sum = 0.0f;
    for (int k = 0; k < K; k++) {
        w[k] = expf(z[id[k]] - max);
        sum += w[k];
    }
    for (int k = 0; k < K; k++) w[k] /= sum;
}

/* One token through a softmax router: ROUTER_SOFTMAX_TOPK (n_group = topk_group = 1) or
 * ROUTER_GROUPED_GREEDY (DeepseekV2TopkRouter's group_limited_greedy: the probabilities
 * outside the kept groups become 0 for the choice). p[E] = softmax(z) is written;
 * choice[E], group_score[n_group] and taken[E] are scratch. */
MOE_HD void router_softmax_topk_row(int32_t *id, float *w, float *p, float *choice,
                                    float *group_score, unsigned char *taken, const float *z, int E,
                                    int K, int n_group, int topk_group, int renormalise,
                                    float scaling)
{
    router_softmax_row(p, z, E);
    const float *c = p;
    if (topk_group < n_group) {
        for (int e = 0; e < E; e++) choice[e] = p[e];
        router_mask_groups_row(choice, group_score, E, n_group, topk_group, 0, 0.0f);
        c = choice;
    }
    router_select_row(id, c, taken, E, K);
    router_weights_row(w, p, id, K, renormalise, 0.0f, scaling);
}

/* One token through ROUTER_TOPK_SOFTMAX (GptOssTopKRouter): the K largest logits z[E]
 * (the router's bias already in them), descending, ties to the lower id; w[K] = their
 * softmax (the maximum is the first; e^(z - max) summed in k order, then divided).
 * p[E] = softmax(z) over every expert is written too: the load-balancing loss's
 * probabilities (transformers' load_balancing_loss_func softmaxes the recorded logits),
 * and what the backward recovers the weights from. taken[E] is scratch. */
MOE_HD void router_topk_softmax_row(int32_t *id, float *w, float *p, unsigned char *taken,
                                    const float *z, int E, int K)
{
    router_softmax_row(p, z, E);
    router_select_row(id, z, taken, E, K);
    float max = z[id[0]], sum = 0.0f;
    for (int k = 0; k < K; k++) {
        w[k] = expf(z[id[k]] - max);
        sum += w[k];
    }
    for (int k = 0; k < K; k++) w[k] /= sum;
}

/* ROUTER_TOPK_SOFTMAX's backward for one token: through the softmax over the K chosen
 * logits only, dz[id_k] = w_k (dw_k - <w, dw>), 0 for every other expert (the choice has
 * no gradient). w_k = p[id_k] / sum_j p[id_j], the same softmax recovered from the saved
 * probabilities. dz[E] is written. */
MOE_HD void router_topk_softmax_backward_row(float *dz, const float *dw, const float *p,
                                             const int32_t *id, int E, int K)
{
    float total = 0.0f, dot = 0.0f;
    for (int k = 0; k < K; k++) total += p[id[k]];
    for (int k = 0; k < K; k++) dot += dw[k] * (p[id[k]] / total);
    for (int e = 0; e < E; e++) dz[e] = 0.0f;
    for (int k = 0; k < K; k++) dz[id[k]] = (p[id[k]] / total) * (dw[k] - dot);
}

/* One token through ROUTER_SIGMOID_BIAS (DeepseekV3TopkRouter, Glm4MoeTopkRouter): s[E] =
 * sigmoid(z) is written; the choice is made on c = s + bias with the groups outside the
 * kept ones at -inf; the weights are s[id] (over their sum + 1e-20 when renormalise) times
 * scaling. choice[E], group_score[n_group] and taken[E] are scratch. */
MOE_HD void router_sigmoid_bias_row(int32_t *id, float *w, float *s, float *choice,
                                    float *group_score, unsigned char *taken, const float *z,
                                    const float *bias, int E, int K, int n_group, int topk_group,
                                    int renormalise, float scaling)
{
    router_sigmoid_row(s, choice, z, bias, E);
    router_mask_groups_row(choice, group_score, E, n_group, topk_group, 1, -INFINITY);
    router_select_row(id, choice, taken, E, K);
    router_weights_row(w, s, id, K, renormalise, 1e-20f, scaling);
}

/* The router's backward for one token (softmax then top-k, optionally renormalised, then
 * scaled): weights_k = scaling p[id_k] / S, S = the sum of the top-k p when renormalise
 * (else 1): dp[id_k] = scaling (dw_k / S - <dw, p[ids]> / S^2) (without renormalise:
 * scaling dw_k), 0 off the top-k; then the softmax's dz = p (dp - <p, dp>). dz[E] is
 * written. */
MOE_HD void router_topk_backward_row(float *dz, const float *dw, const float *p,
                                     const int32_t *id, int E, int K, int renormalise,
                                     float scaling)
{
    float total = 1.0f, correction = 0.0f;
    if (renormalise) {
        total = 0.0f; /* in k order, as the forward summed it */
        for (int k = 0; k < K; k++) total += p[id[k]];
        for (int k = 0; k < K; k++) correction += dw[k] * p[id[k]];
        correction /= total * total;
    }
    for (int e = 0; e < E; e++) dz[e] = 0.0f;
    float dot = 0.0f; /* <p, dp>, dp being 0 off the top-k */
    for (int k = 0; k < K; k++) {
        float dp = renormalise ? scaling * (dw[k] / total - correction) : scaling * dw[k];
        dz[id[k]] = dp;
        dot += p[id[k]] * dp;
    }
    for (int e = 0; e < E; e++) dz[e] = p[e] * (dz[e] - dot);
}

/* DenseMixer's router backward for one token (softmax then top-k; yaof20/DenseMixer,
 * shared/reference/methods-lora-densemixer.md): the forward keeps the sparse output, but
 * the router sees every expert through the dense path sum_e r_e E_e(x), with
 * dots[e] = <g, E_e(x)> for all E experts. Without renormalise r_e = scaling p_e:
 * dp_e = scaling dots[e]. With it (S = the sum of the top-k p, "partscale"), r_e =
 * scaling p_e / S for e in the top-k and scaling p_e / stopgrad(S) off it: dp_e =
 * scaling (dots[e] / S - [e in top-k] <dots[ids], p[ids]> / S^2). Then the softmax's
 * dz = p (dp - <p, dp>). dz[E] is written. */
MOE_HD void router_dense_backward_row(float *dz, const float *dots, const float *p,
                                      const int32_t *id, int E, int K, int renormalise,
                                      float scaling)
{
    float total = 1.0f, correction = 0.0f;
    if (renormalise) {
        total = 0.0f; /* in k order, as the forward summed it */
        for (int k = 0; k < K; k++) total += p[id[k]];
        for (int k = 0; k < K; k++) correction += dots[id[k]] * p[id[k]];
        correction /= total * total;
    }
    for (int e = 0; e < E; e++) dz[e] = scaling * (dots[e] / total);
    for (int k = 0; k < K && renormalise; k++) dz[id[k]] -= scaling * correction;
    float dot = 0.0f; /* <p, dp> in expert order */
    for (int e = 0; e < E; e++) dot += p[e] * dz[e];
    for (int e = 0; e < E; e++) dz[e] = p[e] * (dz[e] - dot);
}

/* ROUTER_SIGMOID_BIAS's backward for one token: weights_k = scaling s[id_k] / D, D = the
 * sum of the top-k s + 1e-20 when renormalise (else 1): ds[id_k] = scaling (dw_k / D -
 * <dw, s[ids]> / D^2) (without renormalise: scaling dw_k), 0 off the top-k; then the
 * sigmoid's dz = ds s (1 - s). The bias and the choice have no gradient. dz[E] is
 * written. */
MOE_HD void router_sigmoid_backward_row(float *dz, const float *dw, const float *s,
                                        const int32_t *id, int E, int K, int renormalise,
                                        float scaling)
{
    float total = 1.0f, correction = 0.0f;
    if (renormalise) {
        total = 0.0f; /* in k order, as the forward summed it */
        for (int k = 0; k < K; k++) total += s[id[k]];
        total += 1e-20f;
        for (int k = 0; k < K; k++) correction += dw[k] * s[id[k]];
        correction /= total * total;
    }
    for (int e = 0; e < E; e++) dz[e] = 0.0f;
    for (int k = 0; k < K; k++) {
        float sk = s[id[k]];
        float ds = renormalise ? scaling * (dw[k] / total - correction) : scaling * dw[k];
        dz[id[k]] = ds * sk * (1.0f - sk);
    }
}

/* The load-balancing loss through one token's softmax: dz[e] += p[e] (coef[e] - <p, coef>). */
MOE_HD void router_balance_backward_row(float *dz, const float *p, const float *coef, int E)
{
    float dot = 0.0f;
    for (int e = 0; e < E; e++) dot += p[e] * coef[e];
    for (int e = 0; e < E; e++) dz[e] += p[e] * (coef[e] - dot);
}

#endif
