/* lora: LoRA adapters' targets, init and compute (see lora.h). */
#include "lora.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model_compute.h"
#include "rng.h"

float lora_scale(const struct lora_spec *spec)
{
    return (float)(spec->rslora ? spec->alpha / sqrt((double)spec->r) : spec->alpha / spec->r);
}

#define BIT(t) (1u << (t))

int lora_parse_targets(char *const *names, int n, unsigned *targets, enum lora_experts *experts,
                       char *err, size_t err_size)
{
    static const struct {
        const char *name;
        unsigned bits;
    } known[] = {
        {"q_proj", BIT(LORA_Q)},
        {"k_proj", BIT(LORA_K)},
        {"v_proj", BIT(LORA_V)},
        {"o_proj", BIT(LORA_O)},
        {"q_a_proj", BIT(LORA_Q_A)},
        {"q_b_proj", BIT(LORA_Q_B)},
        {"kv_a_proj_with_mqa", BIT(LORA_KV_A)},
        {"kv_b_proj", BIT(LORA_KV_B)},
        {"attention", BIT(LORA_Q) | BIT(LORA_K) | BIT(LORA_V) | BIT(LORA_O) | BIT(LORA_Q_A) |
                          BIT(LORA_Q_B) | BIT(LORA_KV_A) | BIT(LORA_KV_B)},
        {"gate_proj", BIT(LORA_MLP_GATE)},
        {"up_proj", BIT(LORA_MLP_UP)},
        {"down_proj", BIT(LORA_MLP_DOWN)},
        {"dense_mlp", BIT(LORA_MLP_GATE) | BIT(LORA_MLP_UP) | BIT(LORA_MLP_DOWN)},
        {"shared_experts", BIT(LORA_SHARED_GATE) | BIT(LORA_SHARED_UP) | BIT(LORA_SHARED_DOWN)},
    };
    *targets = 0;
    *experts = LORA_EXPERTS_NONE;
    for (int i = 0; i < n; i++) {
        bool found = false;
        for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
            if (strcmp(names[i], known[k].name) == 0) *targets |= known[k].bits, found = true;
        if (found) continue;
        bool all = strcmp(names[i], "experts") == 0, selected = strcmp(names[i], "selected") == 0;
        if (all || selected) {
            enum lora_experts want = all ? LORA_EXPERTS_ALL : LORA_EXPERTS_SELECTED;
            if (*experts != LORA_EXPERTS_NONE && *experts != want) {
                snprintf(err, err_size, "train.lora.targets: name experts or selected, not both");
                return -1;
            }
            *experts = want;
            continue;
        }
        snprintf(err, err_size,
                 "train.lora.targets: unknown target '%s' (q_proj, k_proj, v_proj, o_proj, "
                 "q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, attention, gate_proj, up_proj, down_proj, dense_mlp, shared_experts, "
                 "experts, selected)",
                 names[i]);
        return -1;
    }
    if (*targets == 0 && *experts == LORA_EXPERTS_NONE) {
        snprintf(err, err_size, "train.lora.targets: empty: name the modules to adapt");
        return -1;
    }
    return 0;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

int lora_target_of(const char *name, unsigned targets)
{
    if (strncmp(name, "model.layers.", 13) != 0) return -1;
    static const struct {
        const char *suffix;
        enum lora_target target;
    } modules[] = {
        {".self_attn.q_proj.weight", LORA_Q},
        {".self_attn.k_proj.weight", LORA_K},
        {".self_attn.v_proj.weight", LORA_V},
        {".self_attn.o_proj.weight", LORA_O},
        {".self_attn.q_a_proj.weight", LORA_Q_A},
        {".self_attn.q_b_proj.weight", LORA_Q_B},
        {".self_attn.kv_a_proj_with_mqa.weight", LORA_KV_A},
        {".self_attn.kv_b_proj.weight", LORA_KV_B},
        /* the shared expert (qwen2_moe: shared_expert, deepseek: shared_experts) before
         * the dense MLP, whose suffix is a shorter form of the same */
        {".shared_expert.gate_proj.weight", LORA_SHARED_GATE},
        {".shared_expert.up_proj.weight", LORA_SHARED_UP},
        {".shared_expert.down_proj.weight", LORA_SHARED_DOWN},
        {".shared_experts.gate_proj.weight", LORA_SHARED_GATE},
        {".shared_experts.up_proj.weight", LORA_SHARED_UP},
        {".shared_experts.down_proj.weight", LORA_SHARED_DOWN},
        {".mlp.gate_proj.weight", LORA_MLP_GATE},
        {".mlp.up_proj.weight", LORA_MLP_UP},
        {".mlp.down_proj.weight", LORA_MLP_DOWN},
    };
    for (size_t k = 0; k < sizeof modules / sizeof modules[0]; k++)
        if (ends_with(name, modules[k].suffix))
            return targets & BIT(modules[k].target) ? (int)modules[k].target : -1;
    return -1;
}

void lora_fold(float *w, const float *b, const float *a, int64_t rows, int64_t in, int64_t r,
               float scale)
{
    for (int64_t o = 0; o < rows; o++)
        for (int64_t j = 0; j < in; j++) {
            double sum = 0;
            for (int64_t k = 0; k < r; k++) sum += (double)b[o * r + k] * (double)a[k * in + j];
            w[o * in + j] += (float)(scale * sum);
        }
}

void lora_init_a(float *a, int r, int in, uint64_t seed, int table_index)
{
    struct rng rng;
    rng_seed(&rng, seed ^ (0x9e3779b97f4a7c15ULL * (uint64_t)(table_index + 1)));
    double bound = 1.0 / sqrt((double)in);
    for (size_t i = 0; i < (size_t)r * (size_t)in; i++)
        a[i] = (float)((2.0 * rng_uniform(&rng) - 1.0) * bound);
}

void lora_forward(const struct backend *ops, float *y, float *t, const float *x, const float *a,
                  const float *b, int N, int I, int O, int r, float scale)
{
    if (N == 0) return;
    ops->linear(t, x, a, NULL, N, I, r, false);
    ops->scale(t, (size_t)N * r, scale);
    ops->linear(y, t, b, NULL, N, r, O, true);
}

void lora_backward(const struct backend *ops, float *dx, float *da, float *db, float *dt,
                   const float *dy, const float *x, const float *t, const float *a, const float *b,
                   int N, int I, int O, int r, float scale)
{
    if (N == 0) return;
    /* y += t B^T: dt = dy B, dB += dy^T t */
    ops->linear_backward(dt, db, NULL, dy, t, b, N, r, O, false);
    /* t = scale * x A^T */
    ops->scale(dt, (size_t)N * r, scale);
    ops->linear_backward(dx, da, NULL, dt, x, a, N, I, r, true);
}

void lora_adapt_forward(const struct model *m, const struct backend *ops, int l, int target,
                        float *y, float *t, const float *x, int N, int I, int O)
{
    if (!m->lora || !m->lora[l].a[target]) return;
    lora_forward(ops, y, t, x, m->lora[l].a[target], m->lora[l].b[target], N, I, O, m->lora_rank,
                 m->lora_scale);
}

void lora_adapt_backward(const struct model *m, const struct backend *ops, int l, int target,
                         float *dx, float *dt, const float *dy, const float *x, const float *t,
                         int N, int I, int O)
{
    if (!m->lora || !m->lora[l].a[target]) return;
    const struct layer_lora *g = m->lora_grads ? &m->lora_grads[l] : NULL;
    lora_backward(ops, dx, g ? g->a[target] : NULL, g ? g->b[target] : NULL, dt, dy, x, t,
                  m->lora[l].a[target], m->lora[l].b[target], N, I, O, m->lora_rank, m->lora_scale);
}
