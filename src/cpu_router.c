/* cpu_router: the routers of the CPU backend (backend.h's struct router_params), token by
 * token with moe_math.h's row functions, which the CUDA kernels share; and the
 * load-balancing loss's statistics and gradient. OpenMP over tokens; each token's result
 * depends on that token alone, so the bits do not change with the thread count. */
/* moe_math.h's routers take cpu_math.h's SIMD exp and sigmoid rows here (cpu_math.h's
 * table gives their errors) */
#include "cpu_math.h"
#define MOE_ROUTER_EXP_ROW(p, z, max, E) exp_shifted_scaled(p, z, E, max, 1.0f)
#define MOE_ROUTER_SIGMOID_ROW sigmoid_row

#include "cpu_router.h"

#include <stdbool.h>
#include <string.h>

#include "log.h"
#include "moe_math.h"

/* The row functions' scratch lives on each thread's stack, sized for the largest layer
 * hfconfig accepts (three float rows and one byte row of 4096: 52 KiB). */
enum { ROUTER_ROW = HFCONFIG_MAX_EXPERTS };

static void check_kind(const struct router_params *rp, const char *op)
{
    if (rp->kind != ROUTER_SOFTMAX_TOPK && rp->kind != ROUTER_GROUPED_GREEDY &&
        rp->kind != ROUTER_SIGMOID_BIAS && rp->kind != ROUTER_TOPK_SOFTMAX)
        fatal(EXIT_RUNTIME, "cpu backend: %s: router kind %d is not implemented", op,
              (int)rp->kind);
}

/* C2R over a row the router has just routed: the scores it chose by are left in p, choice
 * (masked) or z (gpt_oss); the masking and the probabilities do not change, only the
 * choice and so the weights. */
static void c2r_row(int32_t *id, float *w, const float *p, const float *choice,
                    unsigned char *taken, const float *z, int E, int K,
                    const struct router_params *rp)
{
    bool masked = rp->kind == ROUTER_SIGMOID_BIAS ||
                  (rp->kind == ROUTER_GROUPED_GREEDY && rp->topk_group < rp->n_group);
    bool logits = rp->kind == ROUTER_TOPK_SOFTMAX;
    const float *c = logits ? z : masked ? choice : p;
    router_c2r_row(id, w, c, p, z, rp->collaborators, rp->top_t, taken, E, K, logits,
                   rp->renormalise, rp->kind == ROUTER_SIGMOID_BIAS ? 1e-20f : 0.0f, rp->scaling);
}

void cpu_router_topk(int32_t *ids, float *weights, float *probs, const float *logits, int N, int E,
                     int K, const struct router_params *rp)
{
    check_kind(rp, "router_topk");
    if (E > ROUTER_ROW) fatal(EXIT_RUNTIME, "cpu backend: %d experts, at most %d", E, ROUTER_ROW);
    /* softmax top-k ignores the groups: they only select in the grouped routers */
    int grouped = rp->kind == ROUTER_GROUPED_GREEDY || rp->kind == ROUTER_SIGMOID_BIAS;
    int n_group = grouped ? rp->n_group : 1, topk_group = grouped ? rp->topk_group : 1;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float own[ROUTER_ROW], choice[ROUTER_ROW], group_score[ROUTER_ROW];
        unsigned char taken[ROUTER_ROW];
        float *p = probs ? probs + (size_t)n * E : own;
        const float *z = logits + (size_t)n * E;
        int32_t *id = ids + (size_t)n * K;
        float *w = weights + (size_t)n * K;
        if (rp->kind == ROUTER_SIGMOID_BIAS)
            router_sigmoid_bias_row(id, w, p, choice, group_score, taken, z, rp->bias, E, K,
                                    n_group, topk_group, rp->renormalise, rp->scaling);
        else if (rp->kind == ROUTER_TOPK_SOFTMAX) /* gpt_oss: no renormalisation, no scaling */
            router_topk_softmax_row(id, w, p, taken, z, E, K);
        else
            router_softmax_topk_row(id, w, p, choice, group_score, taken, z, E, K, n_group,
                                    topk_group, rp->renormalise, rp->scaling);
        if (rp->collaborators) c2r_row(id, w, p, choice, taken, z, E, K, rp);
    }
}

void cpu_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                              const int32_t *ids, int N, int E, int K)
{
    for (int e = 0; e < E; e++) {
        double sum = 0.0;
        for (int n = 0; n < N; n++) sum += probs[(size_t)n * E + e];
        prob_sums[e] = (float)sum;
        counts[e] = 0.0f;
    }
    for (size_t s = 0; s < (size_t)N * K; s++) counts[ids[s]] += 1.0f;
}

/* Row by row: the softmax routers (plain and grouped: the masking only selects) share
 * router_topk_backward_row with the CUDA kernel; the sigmoid router has its own row. */
void cpu_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                              const int32_t *ids, int N, int E, int K,
                              const struct router_params *rp)
{
    check_kind(rp, "router_topk_backward");
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *dz = dlogits + (size_t)n * E;
        const float *dw = dweights + (size_t)n * K, *p = probs + (size_t)n * E;
        const int32_t *id = ids + (size_t)n * K;
        if (rp->kind == ROUTER_SIGMOID_BIAS)
            router_sigmoid_backward_row(dz, dw, p, id, E, K, rp->renormalise, rp->scaling);
        else if (rp->kind == ROUTER_TOPK_SOFTMAX)
            router_topk_softmax_backward_row(dz, dw, p, id, E, K);
        else
            router_topk_backward_row(dz, dw, p, id, E, K, rp->renormalise, rp->scaling);
    }
}

void cpu_router_balance_backward(float *dlogits, const float *probs, const float *coef, int N,
                                 int E)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        router_balance_backward_row(dlogits + (size_t)n * E, probs + (size_t)n * E, coef, E);
}

void cpu_router_dense_backward(float *dlogits, const float *dots, const float *probs,
                               const int32_t *ids, int N, int E, int K,
                               const struct router_params *rp)
{
    if (rp->kind != ROUTER_SOFTMAX_TOPK)
        fatal(EXIT_RUNTIME,
              "cpu backend: router_dense_backward: router kind %d is not a softmax "
              "top-k router",
              (int)rp->kind);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        router_dense_backward_row(dlogits + (size_t)n * E, dots + (size_t)n * E,
                                  probs + (size_t)n * E, ids + (size_t)n * K, E, K, rp->renormalise,
                                  rp->scaling);
}
