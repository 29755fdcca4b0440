/* lora: low-rank adapters (train.method lora), as PEFT defines them (peft 0.21,
 * shared/reference/methods-lora-densemixer.md): a frozen linear y = W x gains
 * y += scale * B (A x), A [r, in], B [out, r], scale = alpha / r (rsLoRA: alpha / sqrt(r)),
 * dropout 0. Init as PEFT's default (init_lora_weights true): A Kaiming-uniform with
 * a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)) (torch.nn.init.kaiming_uniform_: gain
 * sqrt(2 / (1 + a^2)), bound gain * sqrt(3 / fan_in)), B zero.
 *
 * The adapters are entries of the model's parameter table (kind PARAM_LORA, named as PEFT
 * saves them: base_model.model.<module>.lora_A.weight), held by the rank that holds their
 * base weight, so gradients, clipping, AdamW, checkpoints and exports treat them like any
 * trainable tensor. This file holds the targets, the init, and the adapter's forward and
 * backward over the backend's ops (linear, linear_backward, scale), which the model's
 * forward and backward call beside each adapted linear. */
#ifndef ESFT_LORA_H
#define ESFT_LORA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

/* The linear modules an adapter can sit on. */
enum lora_target {
    LORA_Q,
    LORA_K,
    LORA_V,
    LORA_O,
    LORA_Q_A, /* multi-head latent attention (deepseek): q_a_proj, q_b_proj, */
    LORA_Q_B,
    LORA_KV_A, /* kv_a_proj_with_mqa, kv_b_proj (q_proj and o_proj: LORA_Q, LORA_O) */
    LORA_KV_B,
    LORA_MLP_GATE, /* dense (non-MoE) layers' MLP */
    LORA_MLP_UP,
    LORA_MLP_DOWN,
    LORA_SHARED_GATE, /* shared experts */
    LORA_SHARED_UP,
    LORA_SHARED_DOWN,
    LORA_TARGET_COUNT
};

/* Which routed experts get pairs (lora_experts.h). */
enum lora_experts {
    LORA_EXPERTS_NONE,
    LORA_EXPERTS_ALL,      /* experts: every routed expert */
    LORA_EXPERTS_SELECTED, /* selected: only those of train.expert_config train */
};

/* What the deck asks for (train.lora.*). */
struct lora_spec {
    int r;
    double alpha;
    bool rslora;
    unsigned targets; /* bit (1 << enum lora_target) */
    enum lora_experts experts;
    bool train_router;
};

/* The adapters of one decoder layer (NULL: none on that module, or not held here), and
 * their gradients in the same shape. */
struct layer_lora {
    float *a[LORA_TARGET_COUNT]; /* [r, in] */
    float *b[LORA_TARGET_COUNT]; /* [out, r] */
};

/* Whether a target is one of the attention's projections (the rest are MLPs'). */
#define LORA_IS_ATTENTION(t) ((t) <= LORA_KV_B)

/* The factor of B A in the forward. */
float lora_scale(const struct lora_spec *spec);

/* Reads train.lora.targets' names into targets and experts: q_proj, k_proj, v_proj,
 * o_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj (multi-head latent
 * attention), attention (all of these a model has), gate_proj, up_proj, down_proj, dense_mlp (the three,
 * non-MoE layers), shared_experts (their gate, up and down); experts (every routed
 * expert's gate_up_proj and down_proj) or selected (only train.expert_config's experts
 * train). 0, or -1 with a message naming the entry. */
int lora_parse_targets(char *const *names, int n, unsigned *targets, enum lora_experts *experts,
                       char *err, size_t err_size);

/* Which target a Hugging Face base weight name (model.layers.L....weight) is for a given
 * spec, or -1. */
int lora_target_of(const char *name, unsigned targets);

/* The merge of one adapter: w[rows, in] += scale b[rows, r] a[r, in] (sums in double;
 * host memory). */
void lora_fold(float *w, const float *b, const float *a, int64_t rows, int64_t in, int64_t r,
               float scale);

/* PEFT's init of one adapter: A [r, in] Kaiming-uniform(a = sqrt(5)) from the project's
 * xoshiro256** seeded with seed mixed with the tensor's index in the parameter table
 * (so every rank and layout draws the same values), B zero. Host memory. */
void lora_init_a(float *a, int r, int in, uint64_t seed, int table_index);

/* y[N,O] += scale * (x[N,I] A^T) B^T; t[N,r] keeps scale * x A^T for the backward. */
void lora_forward(const struct backend *ops, float *y, float *t, const float *x, const float *a,
                  const float *b, int N, int I, int O, int r, float scale);

/* The backward of lora_forward from dy [N,O]: db[O,r] += dy^T t, da[r,I] += scale *
 * (dy B)^T x, and dx[N,I] += scale * (dy B) A when dx is not NULL (always added: the base
 * linear's backward wrote it first). dt [N,r] is scratch. */
void lora_backward(const struct backend *ops, float *dx, float *da, float *db, float *dt,
                   const float *dy, const float *x, const float *t, const float *a, const float *b,
                   int N, int I, int O, int r, float scale);

#endif
