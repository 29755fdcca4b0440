/* lora_experts: LoRA on a MoE layer's routed experts (train.lora.targets experts /
 * selected), in the form PEFT (0.21) gives transformers 5's fused expert parameters
 * through target_parameters (peft/tuners/lora/layer.py, ParamWrapper):
 *
 *   mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I] (qwen2_moe,
 *   qwen3_moe, olmoe, mixtral, deepseek_v2/v3, glm4_moe; not transposed, so PEFT swaps
 *   in and out: in = H, out = 2I for gate_up, in = I, out = H for down). Each expert e has
 *   its own rank-r pair: lora_A.weight [E r, in] holds A_e [r, in] in rows [e r, e r + r);
 *   lora_B.weight [out, r E] holds B_e [out, r] interleaved, B_e[o, k] = lora_B[o, k E + e]
 *   (get_delta_weight: weight_B.reshape(out, r, E)). The update is W_e += scale B_e A_e.
 *   On gate_up one A_e feeds both halves: rows [0, I) of B_e adapt the gate (transformers'
 *   chunk(2) puts the gate first), rows [I, 2I) the up projection.
 *
 * esft holds the pairs per expert, as entries of the parameter table (kind PARAM_LORA,
 * lora_target LORA_EXPERT_GATE_UP or LORA_EXPERT_DOWN, the expert's index: its EP rank
 * holds them), so gradients, AdamW, checkpoints and EP/PP/DP treat them like any expert
 * tensor; the adapter export writes them into PEFT's fused tensors, each rank its own
 * experts' share (lora_experts_write). PEFT's form has no way to adapt only some experts: with `selected` every expert
 * has a pair, the unselected ones frozen, written as zero A and B (no update). */
#ifndef ESFT_LORA_EXPERTS_H
#define ESFT_LORA_EXPERTS_H

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"
#include "lora.h"

struct model;
struct param;

/* p->lora_target of the expert pairs (after enum lora_target's per-layer modules). */
enum { LORA_EXPERT_GATE_UP = LORA_TARGET_COUNT, LORA_EXPERT_DOWN };

/* One MoE layer's expert pairs in the compute view, per local expert (arrays of
 * n_local_experts; all NULL on a layer without them). b_up[e] is b_gate_up[e] + I r, the
 * up projection's half (lora_experts_refresh). The gradients have the same shape. */
struct expert_lora {
    float **a_gate_up; /* [r, H] */
    float **b_gate_up; /* [2I, r]: rows [0, I) the gate's, [I, 2I) the up projection's */
    float **b_up;      /* [I, r] */
    float **a_down;    /* [r, I] */
    float **b_down;    /* [H, r] */
};

/* The expert pairs' arrays of every layer ([num_layers], n_local experts each). */
struct expert_lora *lora_experts_new(int num_layers, int n_local);
void lora_experts_free(struct expert_lora *x, int num_layers);

/* The slot of a pair's tensor in x (which: lora_target; b: B rather than A), for
 * local expert index e. */
float **lora_experts_slot(struct expert_lora *x, int layer, int which, bool b, int e);

/* b_up = b_gate_up + I r for every local expert that has its pair. */
void lora_experts_refresh(struct expert_lora *x, int num_layers, int n_local, int I, int r);

/* Whether p is one of the expert pairs' tensors. */
bool lora_experts_is(const struct param *p);

/* After the grouped gate / up GEMMs on the local experts' rows xe [rows, H]:
 * gate[rows, I] += scale (xe A_e^T) B_gate,e^T, up likewise with B_up,e; t [rows, r] keeps
 * scale xe A_e^T for the backward, scratch [rows, I]. No-op without pairs on layer l. */
void lora_experts_gate_up_forward(const struct model *m, const struct backend *ops, int l,
                                  float *gate, float *up, float *t, float *scratch, const float *xe,
                                  const int32_t *offsets, int local, int rows, int H, int I);

/* After the grouped down GEMM: ye[rows, H] += scale (act A_e^T) B_e^T; t [rows, r],
 * scratch [rows, H]. */
void lora_experts_down_forward(const struct model *m, const struct backend *ops, int l, float *ye,
                               float *t, float *scratch, const float *act, const int32_t *offsets,
                               int local, int rows, int I, int H);

/* The backward of lora_experts_down_forward from dye [rows, H]: dB, dA of the trained
 * pairs accumulated, dact [rows, I] += its part. dt [rows, r], scratch [rows, I]. */
void lora_experts_down_backward(const struct model *m, const struct backend *ops, int l,
                                float *dact, float *dt, float *scratch, const float *dye,
                                const float *act, const float *t, const int32_t *offsets, int local,
                                int rows, int I, int H);

/* The backward of lora_experts_gate_up_forward from dgate, dup [rows, I]: dB, dA
 * accumulated; dxe [rows, H] += its part when dxe is not NULL. dt, dt2 [rows, r],
 * scratch [rows, H]. */
void lora_experts_gate_up_backward(const struct model *m, const struct backend *ops, int l,
                                   float *dxe, float *dt, float *dt2, float *scratch,
                                   const float *dgate, const float *dup, const float *xe,
                                   const float *t, const int32_t *offsets, int local, int rows,
                                   int H, int I);

/* W += scale B A on every held expert (gate and up from their halves of B), B then zero
 * (host, fp32; model_merge_lora's part for the experts). */
void lora_experts_merge(struct model *m);

/* ---- the export in PEFT's fused form (rank 0) ---- */

/* PEFT's names of a layer's fused tensors (name[PARAM_NAME_MAX + 32]): which as above,
 * b: lora_B. The down pair is the outer ParamWrapper, gate_up the nested one
 * (…mlp.experts.base_layer.lora_A.weight), whatever the order in target_parameters. */
void lora_experts_fused_name(char *name, size_t size, const char *module, int which, bool b);

/* What the fused tensors are written through: declare (name, shape [2]) before the file
 * opens, then slices (count fp32 values at element `first`). */
typedef int (*fused_declare)(const char *name, const int64_t *shape, void *sink, char *err,
                             size_t err_size);
typedef int (*fused_slice)(const char *name, size_t first, const float *data, size_t count,
                           void *sink, char *err, size_t err_size);

/* Declares PEFT's four fused tensors of every MoE layer (from the table: every rank the
 * same). 0, or -1 with a message. */
int lora_experts_declare(const struct model *m, fused_declare declare, void *sink, char *err,
                         size_t err_size);

/* Writes this rank's share of them: the pairs it holds and `provided` says it writes (a
 * frozen pair, an expert `selected` leaves out, as zeros), A_e as one slice, B_e as runs
 * of the rank's local experts (columns k E + e0 .. k E + e0 + n - 1 of each row and k).
 * 0, or -1 with a message. */
int lora_experts_write(const struct model *m, bool (*provided)(const struct model *m,
                                                                const struct param *p),
                       fused_slice write, void *sink, char *err, size_t err_size);

#endif
