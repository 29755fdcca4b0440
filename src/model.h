/* model: a Mixture-of-Experts decoder as esft holds it: the parameter table (every
 * tensor with its Hugging Face name, shape, kind, owner under a layout, trainable or
 * frozen), the fp32 weights this rank holds, and the forward pass written once against
 * the backend op table.
 *
 * Sizes (as in backend.h): N tokens, H hidden, L decoder layers, nH / nKV heads, Dh
 * head_dim, E routed experts, K top-k, I expert width, V vocabulary. Linear weights are
 * [out, in] as in the checkpoints. A layer's routed experts are held as three blocks,
 * gate [E_local, I, H], up [E_local, I, H], down [E_local, H, I] (gpt_oss's expert biases
 * likewise: [E_local, I], [E_local, H]), the parameter table's per-expert entries pointing
 * into them; the grouped GEMMs take the matrices through per-expert arrays
 * (layer_weights.expert_gate[e], ...), since with frozen weights held as bf16
 * (model_store_frozen_bf16) the frozen experts' matrices live apart from the trained
 * ones'. */
#ifndef ESFT_MODEL_H
#define ESFT_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "hfconfig.h"
#include "layout.h"
#include "lora.h"

enum param_kind {
    PARAM_EMBEDDING,
    PARAM_ATTENTION,     /* q, k, v, o projections, their biases, QK-norm weights */
    PARAM_NORM,          /* input / post-attention layer norms, the final norm */
    PARAM_ROUTER,        /* mlp.gate */
    PARAM_EXPERT,        /* routed expert e of layer l */
    PARAM_SHARED_EXPERT, /* shared expert and its gate */
    PARAM_DENSE_MLP,     /* the MLP of a non-MoE layer */
    PARAM_LM_HEAD,
    PARAM_LORA,          /* a LoRA adapter's A or B (lora.h), after every base tensor */
    PARAM_KIND_COUNT
};
const char *param_kind_name(enum param_kind kind);

/* Which matrix of an expert (routed or shared) or dense MLP an entry is. */
enum mlp_part { MLP_NONE, MLP_GATE, MLP_UP, MLP_DOWN };

#define PARAM_NAME_MAX 160

/* The gradient buffers of a layer's trainable tensors (NULL = frozen: no gradient, no
 * weight-gradient GEMM). Routed experts: one pointer per local expert. */
struct layer_grads {
    float *input_norm, *post_norm;
    float *q, *k, *v, *o, *q_bias, *k_bias, *v_bias, *o_bias, *q_norm, *k_norm;
    float *q_a, *q_a_bias, *q_a_norm, *q_b, *kv_a, *kv_a_bias, *kv_a_norm, *kv_b; /* MLA */
    float *router, *router_logit_bias, *sinks;
    float **expert_gate, **expert_up, **expert_down; /* [E_local] */
    float **expert_gate_bias, **expert_up_bias, **expert_down_bias; /* [E_local] (gpt_oss) */
    float *shared_gate, *shared_up, *shared_down, *shared_expert_gate;
    float *mlp_gate, *mlp_up, *mlp_down;
};

struct param {
    char name[PARAM_NAME_MAX]; /* Hugging Face name, per-expert spelling */
    enum param_kind kind;
    enum mlp_part part;
    int layer;  /* decoder layer; -1 for embedding, final norm, lm_head */
    int expert; /* routed expert; -1 otherwise */
    int rank;   /* 1 or 2 */
    int64_t shape[2];
    size_t numel;
    int stage;   /* pipeline stage that holds it */
    int ep_rank; /* EP rank that holds it (routed experts); -1: every EP rank of the stage */
    bool trainable;
    bool buffer; /* a fixed tensor of the model that never trains (deepseek_v3 / glm4_moe
                  * mlp.gate.e_score_correction_bias: selection only, no gradient) */
    float *data; /* fp32 weights on this rank; NULL when another rank holds it, or when
                  * they are held as bf16 (data_bf16) */
    uint16_t *data_bf16; /* the weights as bf16 (model_store_frozen_bf16), else NULL */
    float *grad; /* its gradient when trainable and held here, else NULL */
    /* PARAM_LORA: the module it adapts (enum lora_target), and whether it is B [out, r]
     * (else A [r, in]); `layer` is its base weight's */
    int lora_target;
    bool lora_b;
};

struct layer_weights {
    float *input_norm, *post_norm;       /* [H] */
    float *q, *k, *v, *o;                /* [nH*Dh, H], [nKV*Dh, H] x2, [H, nH*Dh] */
    float *q_bias, *k_bias, *v_bias;     /* or NULL */
    float *o_bias;                       /* [H] or NULL */
    float *q_norm, *k_norm;              /* [Dh] per head or [nH*Dh] / [nKV*Dh]; or NULL */
    /* multi-head latent attention (cfg.attention ATTENTION_MLA; q above is q_proj when
     * q_lora_rank is 0): R q_lora_rank, C kv_lora_rank, dn / dr / dv the nope, rope and
     * value head dims */
    float *q_a, *q_a_bias, *q_a_norm;    /* [R, H], [R] or NULL, [R] */
    float *q_b;                          /* [nH*(dn+dr), R] */
    float *kv_a, *kv_a_bias, *kv_a_norm; /* [C+dr, H], [C+dr] or NULL, [C] */
    float *kv_b;                         /* [nH*(dn+dv), C] */
    float *sinks;                        /* [nH] attention sink logits (gpt_oss), or NULL */
    float *router;                       /* [E, H]; MoE layers */
    float *router_bias;                  /* [E] e_score_correction_bias, or NULL */
    float *router_logit_bias;            /* [E] the router linear's bias (gpt_oss), or NULL */
    const float **expert_gate, **expert_up; /* [E_local] -> [I, H] each: per local expert, */
    const float **expert_down;              /* [E_local] -> [H, I]  fp32 or weight_bf16 */
    float *expert_gate_bias, *expert_up_bias; /* [E_local, I] (gpt_oss), or NULL */
    float *expert_down_bias;             /* [E_local, H] (gpt_oss), or NULL */
    float *shared_gate, *shared_up, *shared_down; /* shared expert, or NULL */
    float *shared_expert_gate;           /* [1, H] qwen2_moe, or NULL */
    float *mlp_gate, *mlp_up, *mlp_down; /* dense layers */
};

struct model {
    struct model_config cfg;
    struct layout_grid grid;
    struct layout_coords me;
    int first_layer, n_layers; /* the decoder layers of this rank's stage */
    int *stage_first;          /* [pp + 1]: stage s holds layers [stage_first[s], stage_first[s+1]) */
    int first_expert, n_local_experts;
    int n_params;
    struct param *params;
    /* The compute view: what the forward and backward read and write. The host storage
     * below (params[i].data and .grad name it too) until model_attach moves it to a
     * backend whose buffers the host cannot read; then these name the backend's copies
     * and params[i] keeps naming the host copy (model_download_trainable and the
     * gradient transfers bring the two in step where the host needs them). */
    float *embedding, *final_norm, *lm_head; /* lm_head == embedding when tied */
    struct layer_weights *layers;            /* [cfg.num_layers]; unheld layers all NULL */
    float *inv_freq;                         /* [rotary_dim / 2] */
    float *storage;                          /* every fp32 weight of this rank, one allocation */
    size_t storage_floats;
    uint16_t *storage_bf16;                  /* every bf16 weight (model_store_frozen_bf16) */
    size_t storage_halves;
    float ***weight_slots;                   /* [n_params]: each one's compute-view field, or NULL */
    char *checkpoint_dir;                    /* where model_load read the weights */
    /* gradients (model_set_trainable) */
    struct layer_grads *grads;               /* [cfg.num_layers] */
    /* Where the backward may stop (model_set_trainable): nothing below decoder layer
     * backward_floor trains, so no gradient is computed below it; -1 when the embedding
     * trains (no stop). floor_mlp_only: in that layer only MLP / expert / router tensors
     * train, so its attention and the MLP's input gradient are skipped too. */
    int backward_floor;
    bool floor_mlp_only;
    /* DenseMixer (densemixer.h): the router's gradient sees every expert's output
     * (backward.c); set before the training workspaces are made, which hold its scratch */
    bool densemixer;
    float *embedding_grad, *final_norm_grad, *lm_head_grad;
    float *grad_storage;                     /* every gradient of this rank, one allocation */
    size_t grad_floats;
    bool grads_zeroed; /* grad_storage is all zero already (the host AdamW step clears
                        * each gradient as it reads it): model_zero_grads skips its pass */
    /* model_attach: the backend, and its copies of storage, grad_storage and inv_freq
     * (NULL when it is host-visible or the model is not attached: host memory) */
    const struct backend *ops;
    float *device_storage, *device_grad_storage, *device_inv_freq;
    uint16_t *device_storage_bf16;
    /* the EP group (grid.ep > 1): the ranks that hold the other experts and exchange
     * tokens with this one. Set by the caller after model_create. */
    const struct comm *ep_comm;
    /* the chain of pipeline stages of this rank's data (grid.pp > 1), indexed by stage */
    const struct comm *pp_comm;
    /* LoRA (model_create_lora): rank, scale, the adapters of each layer and their
     * gradients, in the compute view ([cfg.num_layers] each; NULL without adapters) */
    int lora_rank;
    float lora_scale;
    struct layer_lora *lora, *lora_grads;
    /* the routed experts' pairs (lora_experts.h) and their gradients, [cfg.num_layers]
     * of n_local_experts each; NULL without expert targets */
    struct expert_lora *expert_lora, *expert_lora_grads;
    /* C2R routing (c2r.h's c2r_attach): every decoder layer's collaborative lists
     * [cfg.num_layers, E, c2r_top_t] in the compute view (a dense layer's rows unused);
     * NULL under plain top-k routing */
    int32_t *c2r_collaborators;
    int c2r_top_t;
};

/* The forward cost of decoder layer l per token (multiply-adds of its projections and
 * active experts; attention scores, the same in every layer, left out), and of the
 * final norm + lm_head that the last stage adds. */
double model_layer_cost(const struct model_config *cfg, int layer);
double model_head_cost(const struct model_config *cfg);

/* The layer split over pp stages: grid->stage_layers when set (the deck's
 * parallel.stage_layers), else contiguous blocks that minimise the largest stage's cost
 * (the last stage counting the lm_head). first[pp + 1]. The one placement of layers,
 * used by model_create and everything that asks which stage holds a layer. */
void model_split_layers(const struct model_config *cfg, const struct layout_grid *grid, int *first);

/* Logs (rank 0) the layers of each pipeline stage, "pipeline stages: layers 0-11,
 * 12-23", when pp > 1. */
void model_log_stages(const struct model *m, const char *phase);

/* Builds the parameter table for cfg under grid (no weights) and, for the rank at
 * coords, allocates the storage of what it holds. Every entry starts frozen. */
void model_create(struct model *model, const struct model_config *cfg,
                  const struct layout_grid *grid, struct layout_coords coords);
/* model_create, and LoRA adapters (lora.h) on the modules spec->targets names, added to
 * the table after the base tensors, each held where its base weight is; A initialised as
 * PEFT does from seed (lora_init_a), B zero. model_load leaves them as they are. */
void model_create_lora(struct model *model, const struct model_config *cfg,
                       const struct layout_grid *grid, struct layout_coords coords,
                       const struct lora_spec *spec, uint64_t seed);
void model_free(struct model *model);

/* Reads the weights this rank holds from a checkpoint directory (config.json already
 * read into cfg). Accepts per-expert and fused expert tensors. Returns 0, or -1 with a
 * message naming the file and tensor. */
int model_load(struct model *model, const char *dir, char *err, size_t err_size);

/* An ESFT adapter (the train phase's adapter.safetensors: tensors under the model's
 * Hugging Face names, routed experts one tensor per matrix) checked against the
 * parameter table from its header alone: every tensor a tensor of the model, with its
 * shape and a floating-point dtype. *n_tensors: how many it holds. 0, or -1 with a
 * message naming the file and the first tensor that does not fit (and what the file
 * looks like instead: a LoRA adapter, the ESFT reference's layout). */
int model_check_adapter(struct model *model, const char *path, int *n_tensors, char *err,
                        size_t err_size);
/* Puts the adapter's tensors over the weights this rank holds, after
 * model_check_adapter's checks (every rank checks every tensor, so all agree on an
 * error); a tensor held as bf16 is rounded as the base was. 0, or -1 with a message. */
int model_apply_adapter(struct model *model, const char *path, int *n_tensors, char *err,
                        size_t err_size);

/* What model_load will find, known before model_create allocates for it: every tensor the
 * rank at coords holds under grid is in the checkpoint at dir, with the shape cfg gives
 * and a floating-point dtype. Reads the safetensors headers only. Returns 0, or -1 with a
 * message naming the file, the tensor and the config.json keys of its shape. */
int model_check_checkpoint(const struct model_config *cfg, const struct layout_grid *grid,
                           struct layout_coords coords, const char *dir, char *err,
                           size_t err_size);

/* Whether this rank holds p's weights (as fp32 or as bf16). */
static inline bool param_held(const struct param *p)
{
    return p->data || p->data_bf16;
}

/* Whether model_store_frozen_bf16 keeps p as bf16: a frozen weight matrix that a GEMM
 * reads (attention projections, routed, shared and dense MLP matrices, an untied
 * lm_head). What stays fp32: trainable tensors (fp32 master weights), norms, biases,
 * sinks and e_score_correction_bias (vectors), the router (its choice of experts is
 * discrete, a bf16 rounding could flip it; and it is small), gated shared experts'
 * [1, H] gate, and the embedding table (read by a lookup, not a GEMM; tied to lm_head
 * it stays fp32 for both). */
bool model_stores_bf16(const struct param *p);

/* model.frozen_weights: bf16: holds every tensor model_stores_bf16 names as bf16,
 * halving their memory; the rest stays fp32. Call after model_set_trainable (without it
 * every tensor is frozen) and before model_load and model_attach: it lays the storage
 * out again (the fp32 block shrinks), so that no fp32 copy of those tensors is ever
 * held. model_load rounds the checkpoint's values to bf16 (to nearest even: exact when
 * the checkpoint is bf16); exports read the checkpoint again for them
 * (model_read_original), so they are written from the original values. */
void model_store_frozen_bf16(struct model *model);

/* The checkpoint model_load read (model->checkpoint_dir), opened again (close with
 * st_checkpoint_close), and p's values as model_load read them from it, in fp32 into
 * out[p->numel]: what an export writes for a tensor held as bf16. NULL / -1 with a
 * message. */
struct st_checkpoint;
struct st_checkpoint *model_open_original(const struct model *model, char *err, size_t err_size);
int model_read_original(const struct model *model, const struct st_checkpoint *checkpoint,
                        const struct param *p, float *out, char *err, size_t err_size);

/* Folds every adapter this rank holds into its base weight, W += scale B A (host copies,
 * params[i].data; in double, rounded once), and zeroes its B, so that the forward is
 * unchanged and the merged export (which leaves adapters out) holds the trained model. */
void model_merge_lora(struct model *model);

/* The entry for a Hugging Face name, or NULL. */
struct param *model_find_param(struct model *model, const char *name);
/* The 2-D weight of a routed expert's part (gate, up or down), or NULL. */
struct param *model_find_expert(struct model *model, int layer, int expert, enum mlp_part part);

/* Marks the trainable tensors (trainable[i] for params[i]) and allocates zeroed gradient
 * buffers for those this rank holds, in one allocation; frozen tensors get none. Call
 * once, before the first model_backward. */
void model_set_trainable(struct model *model, const bool *trainable);
/* Sets every gradient to zero (the start of an optimizer step), on the host and, when
 * attached, in the backend's copy. */
void model_zero_grads(struct model *model);

/* Moves the compute view to ops: on a backend that is not host-visible, allocates its
 * copies of the weights (and of the gradients, when model_set_trainable came first) and
 * uploads the weights; on the CPU backend nothing moves. Call after the weights are
 * loaded (and a checkpoint restored), before the first workspace; once. */
void model_attach(struct model *model, const struct backend *ops);
/* Brings the backend's gradients to params[i].grad (the host copy) for a reduction over
 * ranks on the host, and the reduced ones back. Nothing to do on a host-visible backend. */
void model_download_grads(struct model *model);
void model_upload_grads(struct model *model);
/* The trained weights back to params[i].data, for checkpoints and exports when the
 * optimizer updated them on the backend. Nothing to do on a host-visible backend. */
void model_download_trainable(struct model *model);
/* The compute view of a parameter's weights and gradient: the backend's copies after
 * model_attach, else params[i].data / .grad themselves; a weight held as bf16 as a
 * weight_bf16 pointer (backend.h). */
float *model_compute_data(const struct model *model, const struct param *p);
float *model_compute_grad(const struct model *model, const struct param *p);

/* A batch of N tokens, flattened: rows and packed samples are runs of tokens. */
struct batch {
    int N;
    const int32_t *tokens;       /* [N] */
    const int32_t *positions;    /* [N] RoPE position (restarts at each sample) */
    const int32_t *sample_start; /* [N] index of the first token of the token's sample */
    const int32_t *targets;      /* [N] next-token target, or -100 (not counted); may be NULL */
    /* [N] index of the first token of the token's block (a training row of data.seq_len
     * tokens at most, packing samples), host memory; NULL: the batch is one block. The
     * sequence-level balance loss (deepseek_v2) is taken per block. */
    const int32_t *block_start;
    /* Training: model_backward's loss_scale (1 / loss-bearing targets of the global batch),
     * known before the forward; with it a workspace that has head_rows (model_compute.h)
     * takes the loss's gradient through lm_head in the forward, a block of token rows at a
     * time, so that no logits are computed twice. 0: the backward does it. */
    float loss_scale;
};

/* What the forward pass leaves behind: logits, the loss sums and, per MoE layer, the
 * routing of every token (the score phase's input). */
struct forward_result {
    float *logits;           /* [N, V] */
    int32_t **topk_ids;      /* [L] -> [N, K] for MoE layers, NULL otherwise */
    float **topk_weights;    /* [L] -> [N, K] */
    float **router_logits;   /* [L] -> [N, E] */
    double loss_sum;         /* sum of token cross-entropies over counted targets */
    long long loss_count;    /* number of counted targets */
    long long correct;       /* counted targets that are their row's argmax (accuracy) */
    /* The load-balancing loss of this batch as transformers computes it for one forward
     * call over all its tokens (load_balancing_loss_func): with c_e the number of top-k
     * slots that chose expert e and P_e the sum of its softmax probabilities, both over
     * every token of every MoE layer, and R = tokens x MoE layers,
     * aux = E * sum_e (c_e / R) (P_e / R). 0 without MoE layers. */
    double aux_loss;
};

/* Workspace of the forward pass for up to max_tokens tokens, allocated once. A training
 * workspace keeps every layer's activations for model_backward; an inference workspace
 * reuses one set for all layers. */
struct forward_workspace;
struct forward_workspace *forward_workspace_new(const struct model *model, int max_tokens);
struct forward_workspace *forward_workspace_new_training(const struct model *model,
                                                        int max_tokens);
/* A training workspace that keeps only each layer's input (activation checkpointing,
 * train.recompute): one set of the other activations serves every layer, and
 * model_backward runs each layer's forward again, from its input, before the layer's
 * backward. The gradients are bitwise those of forward_workspace_new_training (the
 * same ops on the same values); activations take one layer's memory plus an [N, H]
 * input per layer. */
struct forward_workspace *forward_workspace_new_recompute(const struct model *model,
                                                         int max_tokens);
void forward_workspace_free(struct forward_workspace *ws);

/* What the host reads of a forward_result when the model is attached to a backend whose
 * buffers it cannot read: those results are copied back after each forward only when
 * asked for (on a host-visible backend they are always there, without copies).
 * FORWARD_KEEP_ROUTING: topk_ids, topk_weights, router_logits; FORWARD_KEEP_LOGITS:
 * logits. */
enum { FORWARD_KEEP_ROUTING = 1, FORWARD_KEEP_LOGITS = 2 };
void forward_workspace_keep(struct forward_workspace *ws, unsigned what);

/* The forward pass of this rank's stage. Under pipeline parallelism (grid.pp > 1) a stage
 * after the first receives its input from the previous stage, and a stage before the
 * last sends its output on (returning before it has left: model_wait_sends); only the
 * last stage has logits and the losses (result->logits NULL elsewhere), and topk_ids
 * etc. hold this stage's layers only. Every stage passes the same batch (tokens,
 * positions, masks; targets are read on the last). Under expert parallelism (grid.ep > 1) each rank of the EP
 * group passes its own batch: a MoE layer sends each token-slot's row to the rank that
 * holds its expert and takes the results back (collective over model->ep_comm, so every
 * rank of the group calls it the same number of times, with N = 0 if it has no tokens).
 * result's arrays live in ws and are overwritten by the next call; they are host memory
 * (see forward_workspace_keep). The batch's arrays are host memory. */
void model_forward(const struct model *model, const struct backend *ops,
                   struct forward_workspace *ws, const struct batch *batch,
                   struct forward_result *result);

/* The backward pass of the last model_forward on ws (a training workspace) for the loss
 * loss_scale * (sum of the batch's token cross-entropies) + aux_scale * aux_loss
 * (loss_scale = 1 / loss-bearing tokens of the global batch makes the first term the
 * global mean; aux_scale 0 leaves the load-balancing loss out). Adds the gradients of
 * the trainable tensors to their buffers; input gradients flow through frozen tensors
 * (the load-balancing loss's too: it reaches the router's input and everything below).
 * Overwrites the logits. */
/* Waits until the activations or gradients that the last model_forward / model_backward
 * on ws sent to a neighbouring stage have left (pp > 1; otherwise nothing to wait for).
 * A later call on the same ws waits by itself; call this before freeing or at the end of
 * a step. */
void model_wait_sends(struct forward_workspace *ws);

void model_backward(const struct model *model, const struct backend *ops,
                    struct forward_workspace *ws, const struct batch *batch, float loss_scale,
                    float aux_scale);

#endif
