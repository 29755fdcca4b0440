/* lora_experts: LoRA pairs on the routed experts, their compute over the backend's
 * grouped GEMMs, the merge, and the fusing into PEFT's form (see lora_experts.h). */
#include "lora_experts.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "model_compute.h"

struct expert_lora *lora_experts_new(int num_layers, int n_local)
{
    struct expert_lora *x = xcalloc((size_t)num_layers, sizeof *x);
    for (int l = 0; l < num_layers; l++) {
        x[l].a_gate_up = xcalloc((size_t)n_local, sizeof(float *));
        x[l].b_gate_up = xcalloc((size_t)n_local, sizeof(float *));
        x[l].b_up = xcalloc((size_t)n_local, sizeof(float *));
        x[l].a_down = xcalloc((size_t)n_local, sizeof(float *));
        x[l].b_down = xcalloc((size_t)n_local, sizeof(float *));
    }
    return x;
}

void lora_experts_free(struct expert_lora *x, int num_layers)
{
    for (int l = 0; x && l < num_layers; l++) {
        free(x[l].a_gate_up), free(x[l].b_gate_up), free(x[l].b_up);
        free(x[l].a_down), free(x[l].b_down);
    }
    free(x);
}

float **lora_experts_slot(struct expert_lora *x, int layer, int which, bool b, int e)
{
    struct expert_lora *y = &x[layer];
    if (which == LORA_EXPERT_GATE_UP) return b ? &y->b_gate_up[e] : &y->a_gate_up[e];
    return b ? &y->b_down[e] : &y->a_down[e];
}

void lora_experts_refresh(struct expert_lora *x, int num_layers, int n_local, int I, int r)
{
    for (int l = 0; x && l < num_layers; l++)
        for (int e = 0; e < n_local; e++)
            x[l].b_up[e] = x[l].b_gate_up[e] ? x[l].b_gate_up[e] + (size_t)I * (size_t)r : NULL;
}

bool lora_experts_is(const struct param *p)
{
    return p->kind == PARAM_LORA && p->lora_target >= LORA_EXPERT_GATE_UP;
}

/* The layer's pairs, or NULL when it has none (a dense layer, no expert targets). */
static const struct expert_lora *pairs_of(const struct model *m, int l)
{
    if (!m->expert_lora || !m->expert_lora[l].a_gate_up[0]) return NULL;
    return &m->expert_lora[l];
}

static const float *const *weights(float **w)
{
    return (const float *const *)w;
}

void lora_experts_gate_up_forward(const struct model *m, const struct backend *ops, int l,
                                  float *gate, float *up, float *t, float *scratch, const float *xe,
                                  const int32_t *offsets, int local, int rows, int H, int I)
{
    const struct expert_lora *x = pairs_of(m, l);
    if (!x || rows == 0) return;
    int r = m->lora_rank;
    ops->grouped_linear(t, xe, weights(x->a_gate_up), offsets, local, H, r);
    ops->scale(t, (size_t)rows * r, m->lora_scale);
    ops->grouped_linear(scratch, t, weights(x->b_gate_up), offsets, local, r, I);
    ops->add(gate, gate, scratch, (size_t)rows * I);
    ops->grouped_linear(scratch, t, weights(x->b_up), offsets, local, r, I);
    ops->add(up, up, scratch, (size_t)rows * I);
}

void lora_experts_down_forward(const struct model *m, const struct backend *ops, int l, float *ye,
                               float *t, float *scratch, const float *act, const int32_t *offsets,
                               int local, int rows, int I, int H)
{
    const struct expert_lora *x = pairs_of(m, l);
    if (!x || rows == 0) return;
    int r = m->lora_rank;
    ops->grouped_linear(t, act, weights(x->a_down), offsets, local, I, r);
    ops->scale(t, (size_t)rows * r, m->lora_scale);
    ops->grouped_linear(scratch, t, weights(x->b_down), offsets, local, r, H);
    ops->add(ye, ye, scratch, (size_t)rows * H);
}

/* The gradient arrays of layer l (NULL entries: frozen pairs, no weight gradient). */
static const struct expert_lora *grads_of(const struct model *m, int l)
{
    static const struct expert_lora none;
    return m->expert_lora_grads ? &m->expert_lora_grads[l] : &none;
}

void lora_experts_down_backward(const struct model *m, const struct backend *ops, int l,
                                float *dact, float *dt, float *scratch, const float *dye,
                                const float *act, const float *t, const int32_t *offsets, int local,
                                int rows, int I, int H)
{
    const struct expert_lora *x = pairs_of(m, l), *g = grads_of(m, l);
    if (!x || rows == 0) return;
    int r = m->lora_rank;
    /* ye += t B^T: dt = dye B, dB += dye^T t */
    ops->grouped_linear_backward(dt, g->b_down, dye, t, weights(x->b_down), offsets, local, r, H);
    ops->scale(dt, (size_t)rows * r, m->lora_scale); /* t = scale act A^T */
    ops->grouped_linear_backward(scratch, g->a_down, dt, act, weights(x->a_down), offsets, local, I,
                                 r);
    ops->add(dact, dact, scratch, (size_t)rows * I);
}

void lora_experts_gate_up_backward(const struct model *m, const struct backend *ops, int l,
                                   float *dxe, float *dt, float *dt2, float *scratch,
                                   const float *dgate, const float *dup, const float *xe,
                                   const float *t, const int32_t *offsets, int local, int rows,
                                   int H, int I)
{
    const struct expert_lora *x = pairs_of(m, l), *g = grads_of(m, l);
    if (!x || rows == 0) return;
    int r = m->lora_rank;
    ops->grouped_linear_backward(dt, g->b_gate_up, dgate, t, weights(x->b_gate_up), offsets, local,
                                 r, I);
    ops->grouped_linear_backward(dt2, g->b_up, dup, t, weights(x->b_up), offsets, local, r, I);
    ops->add(dt, dt, dt2, (size_t)rows * r);
    ops->scale(dt, (size_t)rows * r, m->lora_scale);
    ops->grouped_linear_backward(dxe ? scratch : NULL, g->a_gate_up, dt, xe, weights(x->a_gate_up),
                                 offsets, local, H, r);
    if (dxe) ops->add(dxe, dxe, scratch, (size_t)rows * H);
}

/* The held expert weight of (layer, expert, part), or NULL. */
static struct param *expert_weight(struct model *m, int layer, int expert, enum mlp_part part)
{
    struct param *p = model_find_expert(m, layer, expert, part);
    return p && p->data ? p : NULL;
}

void lora_experts_merge(struct model *m)
{
    for (int i = 0; i + 1 < m->n_params; i++) {
        struct param *a = &m->params[i], *b = &m->params[i + 1]; /* A, then its B */
        if (!lora_experts_is(a) || a->lora_b || !a->data) continue;
        int64_t r = a->shape[0], in = a->shape[1];
        if (a->lora_target == LORA_EXPERT_GATE_UP) {
            struct param *gate = expert_weight(m, a->layer, a->expert, MLP_GATE);
            struct param *up = expert_weight(m, a->layer, a->expert, MLP_UP);
            if (!gate || !up)
                fatal(EXIT_RUNTIME, "lora_experts_merge: %s without its experts", a->name);
            int64_t I = gate->shape[0];
            lora_fold(gate->data, b->data, a->data, I, in, r, m->lora_scale);
            lora_fold(up->data, b->data + I * r, a->data, I, in, r, m->lora_scale);
        } else {
            struct param *down = expert_weight(m, a->layer, a->expert, MLP_DOWN);
            if (!down) fatal(EXIT_RUNTIME, "lora_experts_merge: %s without its expert", a->name);
            lora_fold(down->data, b->data, a->data, down->shape[0], in, r, m->lora_scale);
        }
        memset(b->data, 0, b->numel * sizeof(float)); /* its update is in W now */
    }
}

/* ---- PEFT's fused form ---- */

void lora_experts_fused_name(char *name, size_t size, const char *module, int which, bool b)
{
    snprintf(name, size, "base_model.model.%s.%slora_%c.weight", module,
             which == LORA_EXPERT_GATE_UP ? "base_layer." : "", b ? 'B' : 'A');
}

/* The fused tensor's name of p's pair (name[PARAM_NAME_MAX + 64]). */
static void fused_name_of(const struct param *p, char *name, size_t size)
{
    char module[64];
    snprintf(module, sizeof module, "model.layers.%d.mlp.experts", p->layer);
    lora_experts_fused_name(name, size, module, p->lora_target, p->lora_b);
}

int lora_experts_declare(const struct model *m, fused_declare declare, void *sink, char *err,
                         size_t err_size)
{
    int64_t E = m->cfg.num_experts, r = m->lora_rank;
    for (int i = 0; i < m->n_params; i++) { /* expert 0's pairs give the shapes */
        const struct param *p = &m->params[i];
        if (!lora_experts_is(p) || p->expert != 0) continue;
        char name[PARAM_NAME_MAX + 64];
        fused_name_of(p, name, sizeof name);
        int64_t shape[2] = {p->lora_b ? p->shape[0] : E * r, p->lora_b ? r * E : p->shape[1]};
        if (declare(name, shape, sink, err, err_size)) return -1;
    }
    return 0;
}

int lora_experts_write(const struct model *m,
                       bool (*provided)(const struct model *m, const struct param *p),
                       fused_slice write, void *sink, char *err, size_t err_size)
{
    int64_t E = m->cfg.num_experts, r = m->lora_rank;
    int64_t n = m->n_local_experts > 0 ? m->n_local_experts : 1, e0 = m->first_expert;
    float *zeros = NULL, *run = NULL;
    size_t zeros_size = 0, run_size = 0;
    int rc = 0;
    for (int i = 0; i < m->n_params && rc == 0; i++) {
        const struct param *p = &m->params[i];
        if (!lora_experts_is(p) || !p->data || !provided(m, p)) continue;
        const float *values = p->data;
        if (!p->trainable) { /* frozen (not selected): no update */
            if (zeros_size < p->numel) {
                free(zeros);
                zeros = xmalloc((zeros_size = p->numel) * sizeof(float));
            }
            memset(zeros, 0, p->numel * sizeof(float));
            values = zeros;
        }
        char name[PARAM_NAME_MAX + 64];
        fused_name_of(p, name, sizeof name);
        if (!p->lora_b) { /* A_e: rows [e r, e r + r) */
            rc = write(name, (size_t)(p->expert * r * p->shape[1]), values, p->numel, sink, err,
                       err_size);
            continue;
        }
        /* B_e[o, k] = lora_B[o, k E + e]: gathered over the rank's experts (in table order,
         * ascending), written as runs of n when the last has come */
        int64_t out = p->shape[0], k0 = p->expert - e0;
        if (run_size < (size_t)(out * r * n)) {
            free(run);
            run = xmalloc((run_size = (size_t)(out * r * n)) * sizeof(float));
        }
        for (int64_t o = 0; o < out; o++)
            for (int64_t k = 0; k < r; k++) run[(o * r + k) * n + k0] = values[o * r + k];
        for (int64_t o = 0; k0 == n - 1 && o < out && rc == 0; o++)
            for (int64_t k = 0; k < r && rc == 0; k++)
                rc = write(name, (size_t)(o * r * E + k * E + e0), run + (o * r + k) * n, (size_t)n,
                           sink, err, err_size);
    }
    free(zeros), free(run);
    return rc;
}
