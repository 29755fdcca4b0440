/* test_mla_grad: the gradients of deepseek's multi-head latent attention (attention_mla.c)
 * against central finite differences of the model's loss, on small random models.
 *
 * For each case a tiny deepseek model (2 layers, H 16, 2 heads, kv_lora_rank 8,
 * qk_nope 4, qk_rope 4, v_head 6: values narrower than the query-key heads) gets random
 * weights, every tensor trains, and model_forward + model_backward give the gradient of
 * the mean cross-entropy over a batch of two packed samples. Every element of every
 * attention tensor (and of the input norms, which the attention's input gradient reaches)
 * is then compared with (L(w + h) - L(w - h)) / 2h, the loss summed in double by the
 * forward: max |grad - fd| / max |fd| < 1e-2 per tensor (the forward is fp32, so the
 * differences carry its rounding). A step that changes a MoE layer's top-k choice is no
 * derivative: the step shrinks until the routing stays that of the base. Cases: q_proj
 * and q_a/q_b (q_lora_rank 0 and 6), interleaved and rotate-half RoPE, the attention
 * biases, yarn (mscale_all_dim: the softmax scale's mscale^2 and RoPE's
 * attention_scaling). The device simulator must give the CPU's gradients bit for bit. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "rng.h"

enum { N = 12, FIRST_SAMPLE = 7 };

struct mla_case {
    const char *name;
    enum hf_family family;
    int q_lora_rank;
    enum hf_rope_layout layout;
    bool bias, yarn;
};

static void make_config(const struct mla_case *k, struct model_config *cfg)
{
    char err[512];
    hfconfig_defaults(k->family, cfg);
    cfg->hidden_size = 16;
    cfg->num_layers = 2;
    cfg->num_heads = cfg->num_kv_heads = 2;
    cfg->vocab_size = 13;
    cfg->intermediate_size = 12;
    cfg->expert_intermediate_size = 6;
    cfg->num_experts = 4;
    cfg->top_k = 2;
    cfg->num_shared_experts = 1;
    cfg->shared_expert_intermediate_size = 6;
    cfg->q_lora_rank = k->q_lora_rank;
    cfg->kv_lora_rank = 8;
    cfg->qk_nope_head_dim = 4;
    cfg->qk_rope_head_dim = 4;
    cfg->v_head_dim = 6;
    cfg->rms_norm_eps = 1e-5; /* unlike the latent norms' 1e-6 */
    cfg->qkv_bias = cfg->o_bias = k->bias;
    cfg->rope.layout = k->layout;
    if (k->family == HF_DEEPSEEK_V2) {
        cfg->first_k_dense_replace = 1; /* layer 1: MoE with the greedy softmax top-k */
        cfg->routed_scaling_factor = 1.5;
    } else {
        cfg->first_k_dense_replace = 2; /* dense only: deepseek_v3's router is not here */
        cfg->n_group = cfg->topk_group = 1;
    }
    if (k->yarn) {
        cfg->max_position_embeddings = 64;
        cfg->rope.type = ROPE_YARN;
        cfg->rope.factor = 4.0;
        cfg->rope.original_max_position_embeddings = 16;
        cfg->rope.mscale = 0.9;
        cfg->rope.mscale_all_dim = 0.7;
    }
    if (hfconfig_finish(cfg, k->name, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", k->name, err);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}

/* Random weights: matrices N(0, 0.3^2), biases N(0, 0.1^2), norms 1 + N(0, 0.1^2). */
static void random_model(struct model *m, const struct model_config *cfg, struct rng *rng)
{
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    model_create(m, cfg, &grid, (struct layout_coords){0, 0, 0});
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        bool norm = strstr(p->name, "norm") != NULL, bias = strstr(p->name, "bias") != NULL;
        for (size_t j = 0; j < p->numel; j++) {
            double x = rng_normal(rng);
            p->data[j] = (float)(norm ? 1.0 + 0.1 * x : bias ? 0.1 * x : 0.3 * x);
        }
    }
    bool *all = xmalloc((size_t)m->n_params * sizeof(bool));
    for (int i = 0; i < m->n_params; i++) all[i] = true;
    model_set_trainable(m, all);
    free(all);
}

static bool same_routing(const struct model *m, int32_t *const *base, int32_t *const *ids)
{
    for (int l = 0; l < m->cfg.num_layers; l++)
        if (base[l] && memcmp(base[l], ids[l], (size_t)N * m->cfg.top_k * sizeof(int32_t)) != 0)
            return false;
    return true;
}

/* Whether the finite differences check this tensor: MLA's own, and the input norms. */
static bool checked(const struct param *p)
{
    return strstr(p->name, "self_attn.") != NULL || strstr(p->name, "input_layernorm") != NULL;
}

static void check_case(const struct mla_case *k, const struct batch *batch, struct rng *rng)
{
    struct model_config cfg;
    make_config(k, &cfg);
    struct model m;
    random_model(&m, &cfg, rng);
    model_attach(&m, backend_cpu());
    model_zero_grads(&m);
    struct forward_workspace *ws = forward_workspace_new_training(&m, N);
    struct forward_result result;
    model_forward(&m, backend_cpu(), ws, batch, &result);
    double count = (double)result.loss_count;
    model_backward(&m, backend_cpu(), ws, batch, (float)(1.0 / count), 0.0f);
    int32_t **base = xcalloc((size_t)cfg.num_layers, sizeof *base);
    for (int l = 0; l < cfg.num_layers; l++) {
        if (!result.topk_ids[l]) continue;
        size_t bytes = (size_t)N * cfg.top_k * sizeof(int32_t);
        base[l] = xmalloc(bytes);
        memcpy(base[l], result.topk_ids[l], bytes);
    }

    struct forward_workspace *probe = forward_workspace_new(&m, N);
    double worst = 0;
    int tensors = 0;
    long long skipped = 0, probes = 0;
    for (int i = 0; i < m.n_params; i++) {
        struct param *p = &m.params[i];
        if (!checked(p)) continue;
        CHECK(p->grad != NULL, "%s: %s has no gradient", k->name, p->name);
        if (!p->grad) continue;
        double diff = 0, scale = 0;
        for (size_t j = 0; j < p->numel; j++) {
            float saved = p->data[j], h = 1e-2f;
            double fd = NAN;
            for (int tries = 0; tries < 4 && isnan(fd); tries++, h *= 0.25f) {
                struct forward_result up, down;
                p->data[j] = saved + h;
                model_forward(&m, backend_cpu(), probe, batch, &up);
                bool same = same_routing(&m, base, up.topk_ids);
                p->data[j] = saved - h;
                model_forward(&m, backend_cpu(), probe, batch, &down);
                same = same && same_routing(&m, base, down.topk_ids);
                p->data[j] = saved;
                /* the step as the fp32 weights took it */
                double step = (double)(saved + h) - (double)(saved - h);
                if (same) fd = (up.loss_sum - down.loss_sum) / count / step;
            }
            if (isnan(fd)) {
                skipped++;
                continue;
            }
            probes++;
            diff = fmax(diff, fabs(fd - p->grad[j]));
            scale = fmax(scale, fabs(fd));
        }
        double rel = diff / fmax(scale, 1e-12);
        CHECK(scale > 1e-6 && rel < 1e-2,
              "%s: %s: gradient differs from finite differences by %.3g relative (max |fd| %.3g)",
              k->name, p->name, rel, scale);
        worst = fmax(worst, rel);
        tensors++;
    }
    int want_tensors = 0;
    for (int i = 0; i < m.n_params; i++) want_tensors += checked(&m.params[i]);
    CHECK(tensors == want_tensors && tensors >= 2 * 6, "%s: %d tensors checked", k->name, tensors);
    CHECK(skipped * 20 <= probes, "%s: %lld of %lld probes changed the routing", k->name, skipped,
          probes);
    printf("%-40s loss %.4f, %2d tensors, %4lld elements: worst relative error %.2e\n", k->name,
           result.loss_sum / count, tensors, probes, worst);

    /* the device simulator: the same ops on buffers the host cannot read, bit for bit */
    struct model sim;
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    model_create(&sim, &cfg, &grid, (struct layout_coords){0, 0, 0});
    for (int i = 0; i < sim.n_params; i++)
        memcpy(sim.params[i].data, m.params[i].data, m.params[i].numel * sizeof(float));
    bool *all = xmalloc((size_t)sim.n_params * sizeof(bool));
    for (int i = 0; i < sim.n_params; i++) all[i] = true;
    model_set_trainable(&sim, all);
    free(all);
    const struct backend *devsim = backend_devsim();
    model_attach(&sim, devsim);
    model_zero_grads(&sim);
    struct forward_workspace *sim_ws = forward_workspace_new_training(&sim, N);
    struct forward_result sim_result;
    model_forward(&sim, devsim, sim_ws, batch, &sim_result);
    model_backward(&sim, devsim, sim_ws, batch, (float)(1.0 / count), 0.0f);
    model_download_grads(&sim);
    CHECK(sim_result.loss_sum == result.loss_sum, "%s: devsim loss %.9g, cpu %.9g", k->name,
          sim_result.loss_sum, result.loss_sum);
    int differ = 0;
    for (int i = 0; i < sim.n_params; i++)
        differ +=
            memcmp(sim.params[i].grad, m.params[i].grad, m.params[i].numel * sizeof(float)) != 0;
    CHECK(differ == 0, "%s: %d gradients differ between devsim and cpu", k->name, differ);
    forward_workspace_free(sim_ws);
    model_free(&sim);

    for (int l = 0; l < cfg.num_layers; l++) free(base[l]);
    free(base);
    forward_workspace_free(probe);
    forward_workspace_free(ws);
    model_free(&m);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    struct rng rng;
    rng_seed(&rng, 2031);
    /* two packed samples of 7 and 5 tokens; one target not counted */
    int32_t tokens[N], positions[N], starts[N], targets[N];
    for (int n = 0; n < N; n++) {
        int start = n < FIRST_SAMPLE ? 0 : FIRST_SAMPLE;
        tokens[n] = (int32_t)rng_below(&rng, 13);
        targets[n] = n == 3 ? -100 : (int32_t)rng_below(&rng, 13);
        starts[n] = start;
        positions[n] = n - start;
    }
    struct batch batch = {.N = N,
                          .tokens = tokens,
                          .positions = positions,
                          .sample_start = starts,
                          .targets = targets};
    const struct mla_case cases[] = {
        {"deepseek_v2 q_proj interleaved", HF_DEEPSEEK_V2, 0, ROPE_INTERLEAVED, false, false},
        {"deepseek_v2 q_lora interleaved bias", HF_DEEPSEEK_V2, 6, ROPE_INTERLEAVED, true, false},
        {"deepseek_v2 q_lora interleaved yarn", HF_DEEPSEEK_V2, 6, ROPE_INTERLEAVED, false, true},
        {"deepseek_v3 q_lora rotate-half", HF_DEEPSEEK_V3, 6, ROPE_ROTATE_HALF, false, false},
        {"deepseek_v3 q_proj rotate-half yarn bias", HF_DEEPSEEK_V3, 0, ROPE_ROTATE_HALF, true,
         true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) check_case(&cases[i], &batch, &rng);
    int status = check_done("test_mla_grad");
    MPI_Finalize();
    return status;
}
