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

/* One fused tensor: A [E r, in] or B [out, r E]. */
struct fused {
    char name[PARAM_NAME_MAX + 32];
    int64_t shape[2];
    float *data;
};

struct lora_experts_fuser {
    int E, r;
    int n; /* 4 per layer with pairs */
    struct fused *tensors;
    int *first; /* [num_layers]: the layer's first tensor, or -1 */
};

struct lora_experts_fuser *lora_experts_fuser_new(const struct model *m)
{
    if (!m->expert_lora) return NULL;
    struct lora_experts_fuser *f = xcalloc(1, sizeof *f);
    f->E = m->cfg.num_experts;
    f->r = m->lora_rank;
    int L = m->cfg.num_layers;
    f->first = xmalloc((size_t)L * sizeof(int));
    f->tensors = xcalloc((size_t)L * 4, sizeof *f->tensors);
    for (int l = 0; l < L; l++) f->first[l] = -1;
    for (int i = 0; i < m->n_params; i++) { /* expert 0's pairs give the shapes */
        const struct param *p = &m->params[i];
        if (!lora_experts_is(p) || p->expert != 0) continue;
        if (f->first[p->layer] < 0) f->first[p->layer] = f->n, f->n += 4;
        /* gate_up A, gate_up B, down A, down B */
        struct fused *t =
            &f->tensors[f->first[p->layer] + 2 * (p->lora_target == LORA_EXPERT_DOWN) + p->lora_b];
        char module[PARAM_NAME_MAX];
        snprintf(module, sizeof module, "model.layers.%d.mlp.experts", p->layer);
        lora_experts_fused_name(t->name, sizeof t->name, module, p->lora_target, p->lora_b);
        t->shape[0] = p->lora_b ? p->shape[0] : (int64_t)f->E * f->r;
        t->shape[1] = p->lora_b ? (int64_t)f->r * f->E : p->shape[1];
        t->data = xcalloc((size_t)(t->shape[0] * t->shape[1]), sizeof(float));
    }
    return f;
}

int lora_experts_fuser_declare(const struct lora_experts_fuser *f, fused_declare declare,
                               void *sink, char *err, size_t err_size)
{
    for (int i = 0; f && i < f->n; i++)
        if (declare(f->tensors[i].name, f->tensors[i].shape, sink, err, err_size)) return -1;
    return 0;
}

void lora_experts_fuser_take(struct lora_experts_fuser *f, const struct param *p, const float *data)
{
    struct fused *t =
        &f->tensors[f->first[p->layer] + 2 * (p->lora_target == LORA_EXPERT_DOWN) + p->lora_b];
    int64_t E = f->E, r = f->r, e = p->expert;
    if (!p->lora_b) { /* A_e: rows [e r, e r + r) */
        memcpy(t->data + e * r * t->shape[1], data, p->numel * sizeof(float));
        return;
    }
    for (int64_t o = 0; o < t->shape[0]; o++) /* B_e[o, k] = lora_B[o, k E + e] */
        for (int64_t k = 0; k < r; k++) t->data[o * r * E + k * E + e] = data[o * r + k];
}

int lora_experts_fuser_write(const struct lora_experts_fuser *f, fused_write write, void *sink,
                             char *err, size_t err_size)
{
    for (int i = 0; f && i < f->n; i++) {
        const struct fused *t = &f->tensors[i];
        if (write(t->name, t->data, (size_t)(t->shape[0] * t->shape[1]), sink, err, err_size))
            return -1;
    }
    return 0;
}

void lora_experts_fuser_free(struct lora_experts_fuser *f)
{
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->tensors[i].data);
    free(f->tensors), free(f->first), free(f);
}
