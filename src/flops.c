/* flops: FLOPs per token (see flops.h). */
#include "flops.h"

struct token_flops token_flops(const struct model_config *c, double attended)
{
    double H = c->hidden_size, nH = c->num_heads;
    /* per head: the query-key width and the value width (MLA: qk_nope + qk_rope, v_head) */
    double qk = c->attention == ATTENTION_MLA ? c->qk_nope_head_dim + c->qk_rope_head_dim : c->head_dim;
    double dv = c->attention == ATTENTION_MLA ? c->v_head_dim : c->head_dim;
    double active = 0, routed = 0, attention = 0;
    for (int l = 0; l < c->num_layers; l++) {
        active += hfconfig_attention_weights(c); /* q, k, v, o */
        attention += nH * (qk + dv) * attended;  /* QK^T and AV, causal: half of 2 x 2 d L */
        if (c->is_moe[l]) {
            double experts = 3.0 * H * c->expert_intermediate_size * c->top_k;
            active += H * c->num_experts + experts + 3.0 * H * c->shared_expert_intermediate_size +
                      (c->shared_expert_gated ? H : 0);
            routed += experts;
        } else {
            active += 3.0 * H * c->intermediate_size;
        }
    }
    active += H * c->vocab_size; /* lm_head */
    struct token_flops f = {.active_params = active, .routed_params = routed};
    f.forward = 2.0 * active + attention;
    f.training = 3.0 * f.forward;
    return f;
}

double token_flops_densemixer(const struct model_config *c)
{
    double H = c->hidden_size, extra = 0;
    for (int l = 0; l < c->num_layers; l++)
        if (c->is_moe[l])
            extra += 2.0 * (3.0 * H * c->expert_intermediate_size + H) * c->num_experts;
    return extra;
}

double token_flops_trainable(const struct token_flops *f, double trainable_fraction_routed,
                             double trainable_other)
{
    /* forward and input gradient of everything, weight gradients of the trainable only */
    double attention = f->forward - 2.0 * f->active_params;
    return 4.0 * f->active_params + 3.0 * attention +
           2.0 * (trainable_fraction_routed * f->routed_params + trainable_other);
}
