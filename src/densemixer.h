/* densemixer: DenseMixer's dense pass in the backward of a MoE layer (yaof20/DenseMixer;
 * shared/reference/methods-lora-densemixer.md), for backward.c. The router's gradient
 * under DenseMixer needs <g, E_e(x)> for every expert e on every token; this computes
 * them, on one rank or over the EP group (each rank runs its own experts on every
 * rank's tokens). */
#ifndef ESFT_DENSEMIXER_H
#define ESFT_DENSEMIXER_H

#include "model_compute.h"

/* dots[N,E] (ws->dense_dots) = <dy[n], E_e(hn[n])> for every expert e of layer l, hn the
 * layer's MoE input (a->hn), dy [N,H] the gradient of its routed output. The experts run
 * forward only. Collective over the EP group when ep > 1 (every EP rank calls it for
 * the same layer, N may differ, 0 included). */
void densemixer_dots(const struct model *m, const struct backend *ops,
                     struct forward_workspace *ws, const struct layer_activations *a,
                     const float *dy, int N, int l);

#endif
