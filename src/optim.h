/* optim: AdamW, the learning-rate schedules and global-norm gradient clipping, for the
 * train phase. State (first and second moments) exists only for the trainable tensors
 * this rank holds: one fp32 pair per gradient element, laid out like the model's
 * gradient storage. */
#ifndef ESFT_OPTIM_H
#define ESFT_OPTIM_H

#include <stddef.h>

#include "deck.h"
#include "model.h"

struct adamw {
    double lr, beta1, beta2, eps, weight_decay;
    long long step;  /* steps taken */
    float *m, *v;    /* [model->grad_floats] */
    size_t n;
    /* adamw_attach: the moments on the model's backend (NULL: the steps run on the host) */
    const struct backend *ops;
    float *device_m, *device_v;
};

/* State for the model's trainable tensors (after model_set_trainable). */
void adamw_init(struct adamw *opt, const struct model *model, const struct deck_train *train);
void adamw_free(struct adamw *opt);

/* Moves the moments to the model's backend when the model is attached to one the host
 * cannot read (after a restored checkpoint filled m and v): then adamw_step and
 * grad_scale run there, on the backend's weights and gradients, and adamw_download
 * brings m and v back for a checkpoint (model_download_trainable the weights). */
void adamw_attach(struct adamw *opt, const struct model *model);
void adamw_download(struct adamw *opt);

/* One step at learning rate lr on every trainable tensor, in torch.optim.AdamW's order,
 * with g the gradient times grad_factor (the clipping factor, 1 for none: the same bits
 * as grad_scale and then a step at 1, without a pass of its own over the gradients):
 * p *= 1 - lr * weight_decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
 * p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). */
void adamw_step(struct adamw *opt, struct model *model, double lr, float grad_factor);

/* The learning rate of step `step` (0-based) of `total`: linear warmup over
 * warmup_steps from lr/warmup to lr, then constant, linear to 0, or cosine to 0. */
double lr_at(const struct deck_train *train, long long step);

/* Global L2 norm of every trainable gradient of this rank (the caller combines ranks
 * when gradients are sharded), and scaling them so the norm is at most max_norm (torch's
 * clip_grad_norm_: factor max_norm / (norm + 1e-6) when below 1). Returns the norm
 * before clipping. */
double grad_norm(const struct model *model);
/* The sum of squares behind it: a partial sum per NORM_CHUNK elements in element order,
 * the partials added in chunk order (backend.h's sum_squares), on the model's backend. */
double grad_sum_squares(const struct model *model);
void grad_scale(struct model *model, float factor);

#endif
