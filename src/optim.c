/* optim: AdamW, learning-rate schedules, gradient norm (see optim.h). */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dense_math.h"
#include "log.h"

void adamw_init(struct adamw *opt, const struct model *model, const struct deck_train *train)
{
    memset(opt, 0, sizeof *opt);
    opt->lr = train->lr;
    opt->beta1 = train->beta1;
    opt->beta2 = train->beta2;
    opt->eps = train->eps;
    opt->weight_decay = train->weight_decay;
    opt->n = model->grad_floats;
    opt->m = xcalloc(opt->n ? opt->n : 1, sizeof(float));
    opt->v = xcalloc(opt->n ? opt->n : 1, sizeof(float));
}

void adamw_attach(struct adamw *opt, const struct model *model)
{
    if (!model->device_grad_storage) return; /* the host's own */
    opt->ops = model->ops;
    size_t bytes = (opt->n ? opt->n : 1) * sizeof(float);
    opt->device_m = opt->ops->alloc(bytes);
    opt->device_v = opt->ops->alloc(bytes);
    opt->ops->upload(opt->device_m, opt->m, opt->n * sizeof(float));
    opt->ops->upload(opt->device_v, opt->v, opt->n * sizeof(float));
}

void adamw_download(struct adamw *opt)
{
    if (!opt->device_m) return;
    opt->ops->download(opt->m, opt->device_m, opt->n * sizeof(float));
    opt->ops->download(opt->v, opt->device_v, opt->n * sizeof(float));
}

void adamw_free(struct adamw *opt)
{
    if (opt->device_m) {
        opt->ops->release(opt->device_m);
        opt->ops->release(opt->device_v);
    }
    free(opt->m);
    free(opt->v);
    memset(opt, 0, sizeof *opt);
}

void adamw_step(struct adamw *opt, struct model *model, double lr, float grad_factor)
{
    opt->step++;
    struct adamw_coef coef = adamw_coefficients(lr, opt->beta1, opt->beta2, opt->eps,
                                                opt->weight_decay, opt->step);
    coef.grad_scale = grad_factor;
    size_t offset = 0;
    for (int i = 0; i < model->n_params; i++) {
        struct param *p = &model->params[i];
        if (!p->grad) continue;
        size_t at = offset;
        offset += p->numel;
        if (opt->device_m) { /* on the backend's copies */
            opt->ops->adamw(model_compute_data(model, p), opt->device_m + at, opt->device_v + at,
                            model_compute_grad(model, p), p->numel, &coef);
            continue;
        }
        float *m = opt->m + at, *v = opt->v + at;
        float *g = p->grad;
        /* each gradient cleared as it is read, for the next step (one pass fewer);
         * element-wise, so the vector lanes give the scalar loop's bits */
#pragma omp parallel for simd schedule(simd : static)
        for (size_t j = 0; j < p->numel; j++) {
            adamw_update(&p->data[j], &m[j], &v[j], g[j], &coef);
            g[j] = 0.0f;
        }
    }
    /* on the host, every gradient of the rank was a trained tensor's and is zero now */
    if (!opt->device_m) model->grads_zeroed = true;
}

double lr_at(const struct deck_train *train, long long step)
{
    double lr = train->lr;
    long long warmup = train->warmup_steps, total = train->steps;
    if (step < warmup) return lr * (double)(step + 1) / (double)warmup;
    if (train->lr_schedule == LR_CONSTANT || total <= warmup) return lr;
    double progress = (double)(step - warmup) / (double)(total - warmup);
    if (progress > 1) progress = 1;
    if (train->lr_schedule == LR_LINEAR) return lr * (1.0 - progress);
    return lr * 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
}

double grad_sum_squares(const struct model *model)
{
    /* the backend's chunked sum (backend.h), where the gradients are */
    const struct backend *ops = model->ops ? model->ops : backend_cpu();
    return ops->sum_squares(model->device_grad_storage ? model->device_grad_storage
                                                       : model->grad_storage,
                            model->grad_floats);
}

double grad_norm(const struct model *model)
{
    return sqrt(grad_sum_squares(model));
}

void grad_scale(struct model *model, float factor)
{
    if (model->device_grad_storage) {
        model->ops->scale(model->device_grad_storage, model->grad_floats, factor);
        return;
    }
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < model->grad_floats; j++) model->grad_storage[j] *= factor;
}
