/* model_compute: what the model's compute files share (workspace.c, forward.c,
 * backward.c; model.h is the public surface): the workspace's layout, the EP plan, the
 * pipeline message tags, and the helpers the forward and the backward both call. */
#ifndef ESFT_MODEL_COMPUTE_H
#define ESFT_MODEL_COMPUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "comm.h"
#include "model.h"

/* Message tags between pipeline stages (per pair of ranks, messages of one tag arrive in
 * the order they were sent: the micro-batch order of the schedule). */
enum { TAG_ACTIVATION = 1, TAG_BALANCE, TAG_GRADIENT, TAG_BALANCE_GRADIENT };

/* Where a MoE layer's token rows travel under expert parallelism. Sender side: rows are
 * sorted by expert (permute_by_expert), and EP rank d holds a contiguous block of experts,
 * so the rows for rank d are one contiguous run. Receiver side: the rows from source s
 * arrive in expert order ("source-major"); the local grouped GEMM wants them expert-major
 * (expert e: the rows of source 0, then source 1, ...), a fixed order for a given batch. */
struct ep_plan {
    int rows;                    /* rows received = rows of the local experts */
    int32_t *recv_counts;        /* [ep * E_local] rows from source s for local expert e */
    int32_t *local_offsets;      /* [E_local + 1] expert-major offsets */
    int32_t *expert_major;       /* [capacity] expert-major row -> source-major row */
    int32_t *source_major;       /* [capacity] source-major row -> expert-major row */
    /* the backend's copies of the three above, which the ops read (the same pointers
     * when the backend is host-visible) */
    int32_t *dev_local_offsets, *dev_expert_major, *dev_source_major;
    size_t *send_rows, *send_first, *recv_rows, *recv_first; /* [ep] in rows */
};

/* What one layer's forward leaves for its backward. In an inference workspace every
 * layer's pointers name the same buffers. */
struct layer_activations {
    float *x;                  /* [N,H] layer input */
    float *xn, *rstd_in;       /* [N,H], [N] input norm */
    float *q_proj, *k_proj;    /* before QK-norm (QK-norm layers; else NULL) */
    float *q_rstd, *k_rstd;    /* QK-norm's 1/rms */
    float *q, *k, *v;          /* what attention read (after norm and RoPE); MLA: q, k
                                * [N, nH*(dn+dr)], v [N, nH*dv] */
    float *q_clamped, *k_clamped; /* clip_qkv (training): q, k after the clamp, before RoPE */
    float *attn;               /* [N, nH*Dh] attention output (MLA: [N, nH*dv]) */
    float *attn_lse;           /* [nH, N] its rows' log-sum-exp for the backward (training) */
    /* multi-head latent attention (attention_mla.c): R q_lora_rank, C kv_lora_rank */
    float *q_latent, *q_latent_norm, *q_latent_rstd;    /* [N,R] q_a(xn), its norm, [N] */
    float *kv_latent, *kv_latent_norm, *kv_latent_rstd; /* [N,C] kv_a's latent, its norm, [N] */
    float *k_rope;             /* [N, dr] the key's rope part, one for all heads, after RoPE */
    float *kv;                 /* [N, nH*(dn+dv)] kv_b: per head k_nope, then the value */
    float *h;                  /* [N,H] after the attention residual */
    float *hn, *rstd_post;     /* [N,H], [N] post-attention norm */
    float *probs;              /* [N,E] router probabilities */
    int32_t *offsets, *slot_of_row, *row_of_slot;
    /* expert parallelism: the rows this rank's experts received, expert-major */
    struct ep_plan *plan;      /* NULL when ep = 1 */
    float *xe, *ye;            /* [rows,H] received inputs, their outputs (ep > 1) */
    float *gate, *up, *act;    /* [rows,I] expert pre-activations and act(gate) * up */
    float *ys;                 /* [M,H] expert outputs, in this rank's slot order */
    float *shared_gate, *shared_up, *shared_act, *shared_out, *shared_logit;
    float *mlp_gate, *mlp_up, *mlp_act; /* dense layer */
    float *ffn;                /* [N,H] feed-forward output */
    float *lora_t[LORA_TARGET_COUNT]; /* [N,r] scale * A x of each adapter (lora.h), or NULL */
    float *expert_lora_t[2]; /* [rows,r] the experts' gate_up and down pairs' scale A x
                              * (lora_experts.h), or NULL */
};

/* Vocabulary ids per chunk of the chunked lm_head and cross-entropy. */
enum { WS_VOCAB_CHUNK = 4096 };

struct forward_workspace {
    int max_tokens, n_layers;
    bool training;
    bool recompute;   /* one activation set for all layers, inputs kept (train.recompute) */
    bool recomputing; /* model_backward is running a layer's forward again */
    /* where the buffers live: the model's backend (NULL: host memory), and whether the
     * host cannot read them (staged: results and exchanges go through host copies) */
    const struct backend *mem;
    bool staged;
    unsigned keep;                        /* FORWARD_KEEP_* */
    int vocab_size, top_k, n_experts;     /* of the logits (last stage; else 0) and routing */
    int32_t *tokens, *positions, *sample_start, *targets; /* [N] the batch's copies (staged) */
    float *h_send, *h_recv;               /* [N,H] host side of the stage exchange (staged) */
    float *h_ep_send, *h_ep_recv;         /* [capacity,H] host side of the EP exchange (staged) */
    int32_t *h_offsets;                   /* [E+1] a layer's expert offsets, read back (staged) */
    float *h_logits;                      /* [N,V] (staged, FORWARD_KEEP_LOGITS) */
    int32_t **h_topk_ids;                 /* host copies (staged, FORWARD_KEEP_ROUTING) */
    float **h_topk_weights, **h_router_logits;
    float *balance_block, *h_balance_block; /* [L][2E] counts, prob sums; its host copy */
    float *h_balance_coef;                /* [E] d aux / d probs as the host computes it */
    struct layer_activations *layers; /* [L] */
    float *x_final, *rstd_final, *xn_final;
    /* logits: [N, vocab_chunk] when the backend has the chunked cross-entropy (backend.h)
     * and no one asked for whole logits; else [N, V]. ce_state [N, 4], ce_best [N] hold
     * the chunked loss between the forward and the backward; ce_chunked says which path
     * the last forward took. */
    float *logits, *ce_state;
    int32_t *ce_best;
    int vocab_chunk;
    bool ce_chunked;
    /* The head by token rows (training workspaces of a backend with cross_entropy_rows:
     * the CPU and the device simulator): head_rows rows of all V logits at a time in head_logits; the forward of
     * a batch with a loss_scale leaves the gradient of xn_final in dxn and lm_head's added
     * to its buffer, and head_scale, the scale it used (head_done: the backward starts at
     * the final norm). 0 rows: the vocabulary-chunk or whole-logits path. */
    int head_rows;
    float *head_logits;
    bool head_done;
    float head_scale;
    float *xs;                        /* [M,H] gathered rows (scratch) */
    int32_t **topk_ids;
    float **topk_weights, **router_logits;
    float **balance_counts, **balance_probs; /* [L] -> [E]: load-balancing statistics */
    float *balance_coef;                     /* [E]: d aux / d probs (backward) */
    int balance_tokens;                      /* N of the last forward */
    struct seq_aux *seq;                     /* deepseek_v2's per-block balance loss, or NULL */
    /* pipeline parallelism: the earlier stages' load-balancing sums (counts, then prob
     * sums: [2E]), received with the activations; the sends still in flight */
    double *balance_before;
    struct comm_request sends[2];
    /* backward scratch */
    float *dx, *dxn, *dq, *dk, *dv, *dattn, *dxs, *dxs2, *dys, *dact, *dgate, *dup;
    float *dq_latent, *dkv_latent, *dk_rope, *dkv; /* MLA: [N,R], [N,C], [N,dr], [N,nH*(dn+dv)] */
    float *dlora;                     /* [N,r] an adapter's scratch (lora_backward) */
    /* the experts' pairs (lora_experts.h): [rows, max(H, I)] scratch (forward and
     * backward), [rows, r] twice (backward) */
    float *expert_lora_scratch, *expert_lora_dt[2];
    float *dweights, *drouter, *dshared_a, *dshared_b, *dshared_act, *dshared_out, *dgate_logit;
    /* DenseMixer (model->densemixer, densemixer.h): one expert on every token of the EP
     * group, [R,I] x 3 and [R,H] (R = ep N), and every expert's <d output, E_e(x)>,
     * [N,E]. Under EP also: the group's inputs and output gradients [R,H] x 2, the local
     * experts' dots [R,E_local], those received [ep N E_local], the tokens of each rank
     * [ep], and (staged) host copies of what is exchanged. */
    float *dense_gate, *dense_up, *dense_act, *dense_out, *dense_dots;
    float *dense_x, *dense_g, *dense_local, *dense_recv, *h_dense_send, *h_dense_recv;
    int *dense_tokens;
    float *ep_rows;                   /* [capacity,H] exchange scratch (ep > 1) */
    float *dye;                       /* [capacity,H] output gradients at the experts (ep > 1) */
    size_t *ep_counts, *ep_offsets;   /* [2 * ep] element counts of one exchange */
    int32_t *ep_send_counts;          /* [ep * E_local] rows for each rank's experts */
    /* every allocation, freed together: host memory, and the backend's buffers */
    struct ws_allocations {
        void **at;
        int capacity, count;
    } host, buffers;
};


/* Layer l's forward, from ws->layers[l].x to its feed-forward output ws->layers[l].ffn
 * (the caller adds the residual); forward.c, and backward.c when it recomputes. */
void ws_layer_forward(const struct model *m, const struct backend *ops,
                      struct forward_workspace *ws, const struct batch *batch, int l);

/* The most token-slot rows this rank's experts can receive for batches of N tokens on
 * each rank of the EP group (N * K when ep = 1). */
size_t ws_row_capacity(const struct model *m, int N);
/* The rotary frequencies as the ops read them. */
const float *model_inv_freq(const struct model *m);
/* How MoE layer l routes, as the router ops read it (its bias a backend buffer). */
struct router_params model_router_params(const struct model *m, int l);
/* The batch as the ops read it: the caller's host arrays, or (staged) the workspace's
 * copies that model_forward uploaded. */
struct batch ws_ops_batch(const struct forward_workspace *ws, const struct batch *b);
/* Point-to-point between pipeline stages of count floats in the backend's buffer buf,
 * through the workspace's host copies when staged. */
void ws_stage_recv(const struct model *m, struct forward_workspace *ws, float *buf, size_t count,
                   int from, int tag);
void ws_stage_send_start(const struct model *m, struct forward_workspace *ws, const float *buf,
                         size_t count, int to, int tag, struct comm_request *request);
/* The load-balancing loss of the last forward, and with coef its gradient (forward.c). */
/* The sequence-level balance loss of deepseek_v2 (balance_seq.c; training workspaces of
 * AUX_SEQUENCE models only, a no-op otherwise): the batch's blocks at the start of a
 * forward; a MoE layer's term from its router probabilities and choices; the sum of this
 * stage's terms; in the backward, scale times a layer's gradient added to the router
 * logits' (dlogits [N,E]); the buffers freed with the workspace. */
void seq_aux_begin(const struct model *m, struct forward_workspace *ws, const struct batch *b);
void seq_aux_layer(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                   int l, const float *probs, const int32_t *ids);
double seq_aux_stage_sum(const struct forward_workspace *ws);
void seq_aux_backward(const struct model *m, const struct backend *ops,
                      struct forward_workspace *ws, int l, float *dlogits, const float *probs,
                      float scale);
void seq_aux_free(struct forward_workspace *ws);
double ws_balance_loss(const struct model *m, const struct forward_workspace *ws, float *coef,
                       float scale);
/* The EP exchange of a layer's rows (forward.c): to the experts' ranks and back. */
void ws_ep_dispatch(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                    const struct ep_plan *p, const float *rows, float *out, int width);
void ws_ep_return(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                  const struct ep_plan *p, const float *rows, float *out, int width);
/* A layer's attention, after the input norm (a->xn) and before the residual: a->h =
 * the o_proj output. The backward takes dy = d h [N,H] and writes (accumulate_dxn: adds)
 * the input norm's output gradient dxn [N,H], adding the weight gradients where the
 * layer's grads are not NULL; ws holds its scratch. Grouped-query attention
 * (attention_gqa.c) and deepseek's multi-head latent attention (attention_mla.c). */
void gqa_forward(const struct model *m, const struct backend *ops, struct layer_activations *a,
                 const struct batch *batch, int l);
void gqa_backward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                  const struct layer_activations *a, const struct batch *batch, int l,
                  const float *dy, float *dxn, bool accumulate_dxn);
void mla_forward(const struct model *m, const struct backend *ops, struct layer_activations *a,
                 const struct batch *batch, int l);
void mla_backward(const struct model *m, const struct backend *ops, struct forward_workspace *ws,
                  const struct layer_activations *a, const struct batch *batch, int l,
                  const float *dy, float *dxn, bool accumulate_dxn);
/* MLA's softmax scale: (dn + dr)^-0.5, times mscale^2 under yarn (attention_mla.c). */
float mla_softmax_scale(const struct model_config *c);

/* Layer l's adapter on `target` (lora.c; nothing when it has none): y[N,O] += scale * B
 * (A x) with x [N,I], keeping scale * A x in t; and its backward from dy, adding to dx
 * (NULL: no input gradient) and to the adapter's gradients (dt: scratch [N,r]). */
void lora_adapt_forward(const struct model *m, const struct backend *ops, int l, int target,
                        float *y, float *t, const float *x, int N, int I, int O);
void lora_adapt_backward(const struct model *m, const struct backend *ops, int l, int target,
                         float *dx, float *dt, const float *dy, const float *x, const float *t,
                         int N, int I, int O);

/* A layer's EP plan, in the workspace (workspace.c). */
struct ep_plan *ws_ep_plan_new(struct forward_workspace *ws, const struct model *m, size_t capacity);

#endif
