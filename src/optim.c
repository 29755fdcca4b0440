/* optim: AdamW, learning-rate schedules, gradient norm (see optim.h). */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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

void adamw_free(struct adamw *opt)
{
    free(opt->m);
    free(opt->v);
    memset(opt, 0, sizeof *opt);
}

void adamw_step(struct adamw *opt, struct model *model, double lr)
{
    opt->step++;
    /* 1 - beta formed in double, as torch does: in float, 1 - 0.999f is off by 1.3e-5 */
    float b1 = (float)opt->beta1, b2 = (float)opt->beta2, eps = (float)opt->eps;
    float one_minus_b1 = (float)(1.0 - opt->beta1), one_minus_b2 = (float)(1.0 - opt->beta2);
    float decay = (float)(1.0 - lr * opt->weight_decay);
    float step_size = (float)(lr / (1.0 - pow(opt->beta1, (double)opt->step)));
    float bias2_sqrt = (float)sqrt(1.0 - pow(opt->beta2, (double)opt->step));
    size_t offset = 0;
    for (int i = 0; i < model->n_params; i++) {
        struct param *p = &model->params[i];
        if (!p->grad) continue;
        float *m = opt->m + offset, *v = opt->v + offset;
        offset += p->numel;
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < p->numel; j++) {
            float g = p->grad[j];
            p->data[j] *= decay;
            m[j] = b1 * m[j] + one_minus_b1 * g;
            v[j] = b2 * v[j] + one_minus_b2 * g * g;
            float denom = sqrtf(v[j]) / bias2_sqrt + eps;
            p->data[j] -= step_size * m[j] / denom;
        }
    }
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

double grad_norm(const struct model *model)
{
    double sum = 0;
    /* a fixed order: element by element through the gradient storage */
    for (size_t j = 0; j < model->grad_floats; j++)
        sum += (double)model->grad_storage[j] * model->grad_storage[j];
    return sqrt(sum);
}

void grad_scale(struct model *model, float factor)
{
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < model->grad_floats; j++) model->grad_storage[j] *= factor;
}
