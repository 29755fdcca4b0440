/* test_flops: FLOPs per token against a hand-worked tiny model and against the reference
 * figures of shared/reference/gpu-and-build-notes.md (full fine-tuning at 4K, counted the
 * Megatron way): Qwen3-30B-A3B 23.1 GF, OLMoE-1B-7B 7.9 GF, Qwen1.5-MoE-A2.7B 15.5 GF per
 * token (the configs' published shapes, written out here). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "flops.h"

static struct model_config moe(int H, int L, int nH, int nKV, int Dh, int E, int K, int I, int S,
                               bool gated, int V)
{
    struct model_config c;
    memset(&c, 0, sizeof c);
    c.hidden_size = H, c.num_layers = L, c.num_heads = nH, c.num_kv_heads = nKV, c.head_dim = Dh;
    c.num_experts = E, c.top_k = K, c.expert_intermediate_size = I, c.vocab_size = V;
    c.shared_expert_intermediate_size = S, c.shared_expert_gated = gated;
    for (int l = 0; l < L; l++) c.is_moe[l] = 1;
    return c;
}

int main(void)
{
    /* H 4, one MoE layer, 1 head of 4, E 2, K 1, I 3, V 5; documents attended 10:
     * q, k, v, o 4 x 16 = 64, router 8, one expert 36, lm_head 20: 128 multiply-adds;
     * attention 2 x 4 x 10 = 80; forward 2 x 128 + 80 = 336, training 1008;
     * ESFT with half the routed work trainable: 4 x 128 + 3 x 80 + 2 x 18 = 788. */
    struct model_config tiny = moe(4, 1, 1, 1, 4, 2, 1, 3, 0, false, 5);
    struct token_flops f = token_flops(&tiny, 10);
    CHECK(f.active_params == 128 && f.routed_params == 36, "tiny: %g active, %g routed",
          f.active_params, f.routed_params);
    CHECK(f.forward == 336 && f.training == 1008, "tiny: forward %g, training %g", f.forward, f.training);
    CHECK(token_flops_trainable(&f, 0.5, 0) == 788, "tiny ESFT: %g", token_flops_trainable(&f, 0.5, 0));
    CHECK(token_flops_trainable(&f, 1, 128 - 36) == f.training, "everything trainable is full FT");

    struct {
        const char *name;
        struct model_config cfg;
        double gflops;
    } refs[] = {
        {"Qwen3-30B-A3B", moe(2048, 48, 32, 4, 128, 128, 8, 768, 0, false, 151936), 23.1},
        {"OLMoE-1B-7B", moe(2048, 16, 16, 16, 128, 64, 8, 1024, 0, false, 50304), 7.9},
        {"Qwen1.5-MoE-A2.7B", moe(2048, 24, 16, 16, 128, 60, 4, 1408, 5632, true, 151936), 15.5},
    };
    for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++) {
        struct token_flops t = token_flops(&refs[i].cfg, 4096);
        double got = t.training / 1e9;
        CHECK(fabs(got - refs[i].gflops) <= 0.05, "%s: %.3f GF per token, reference %.1f",
              refs[i].name, got, refs[i].gflops);
        printf("%s at 4K: %.2f GF per training token (reference %.1f), forward %.2f\n", refs[i].name,
               got, refs[i].gflops, t.forward / 1e9);
    }
    return check_done("test_flops");
}
