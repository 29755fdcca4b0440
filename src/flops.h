/* flops: the FLOPs of a token, counted as shared/reference/gpu-and-build-notes.md says
 * (Megatron's model-FLOPs convention): 2 FLOPs per multiply-add; every weight GEMM's
 * forward 2N, input gradient 2N and weight gradient 2N for the N active parameters a
 * token meets (routed experts: only its top-k; the lm_head counted, the embedding
 * lookup not); causal attention 2 * d_attn * L FLOPs per token and layer forward for a
 * token in a document of length L, 3x in training. ESFT's true training FLOPs drop the
 * weight gradient of every frozen tensor. Used for the throughput lines and the GPU
 * benchmark's MFU. */
#ifndef ESFT_FLOPS_H
#define ESFT_FLOPS_H

#include "hfconfig.h"

struct token_flops {
    double active_params;     /* multiply-adds of the weight GEMMs a token meets */
    double routed_params;     /* of which in routed experts */
    double forward;           /* FLOPs of the forward pass */
    double training;          /* forward + backward, every weight gradient (full FT) */
};

/* Per token, for documents of mean attention length `attended` (the mean over tokens of
 * the number of keys each attends to, times 2: seq_len for one full causal document). */
struct token_flops token_flops(const struct model_config *cfg, double attended);

/* ESFT's true training FLOPs per token: training minus the weight gradients of frozen
 * tensors. trainable_fraction_routed: the share of the token's routed-expert work that
 * lands on trainable experts; trainable_other: multiply-adds of the trainable tensors
 * outside the routed experts. */
double token_flops_trainable(const struct token_flops *f, double trainable_fraction_routed,
                             double trainable_other);

/* DenseMixer's extra FLOPs per token in a training step (backward.c's densemixer_dots):
 * every routed expert's forward on the token, E/K times the routed experts' forward, and
 * the E dots with the output gradient, in every MoE layer. */
double token_flops_densemixer(const struct model_config *cfg);

#endif
