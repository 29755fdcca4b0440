/* cpu_router: the CPU backend's router ops (backend.h's router_topk, router_balance_stats,
 * router_topk_backward, router_balance_backward,
 * router_dense_backward), kept apart from cpu_ops.c, whose op
 * table points at them. Private to the CPU backend. */
#ifndef ESFT_CPU_ROUTER_H
#define ESFT_CPU_ROUTER_H

#include "backend.h"

void cpu_router_topk(int32_t *ids, float *weights, float *probs, const float *logits, int N, int E,
                     int K, const struct router_params *rp);
void cpu_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                              const int32_t *ids, int N, int E, int K);
void cpu_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                              const int32_t *ids, int N, int E, int K,
                              const struct router_params *rp);
void cpu_router_balance_backward(float *dlogits, const float *probs, const float *coef, int N,
                                 int E);
void cpu_router_dense_backward(float *dlogits, const float *dots, const float *probs,
                               const int32_t *ids, int N, int E, int K,
                               const struct router_params *rp);

#endif
