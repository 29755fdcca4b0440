/* fuzz_expert_config: libFuzzer harness for expert_config.json, the selection that
 * train.expert_config names (src/trainable.c, expert_config_read). The input is the file,
 * read against a fixed model: 4 decoder layers, layer 1 dense, 8 experts (a qwen2_moe
 * config built in memory). For a file that is accepted, what trainable.h promises is
 * checked: every listed layer a MoE layer, every id an expert, no id twice in a layer.
 * Seeds: tests/fuzz/corpus/expert_config (select's output on the demo, the reference
 * format, hand-written variants). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz.h"
#include "hfconfig.h"
#include "trainable.h"

static void model_config_of_the_harness(struct model_config *cfg)
{
    char err[512];
    hfconfig_defaults(HF_QWEN2_MOE, cfg);
    cfg->num_layers = 4;
    cfg->num_experts = 8;
    cfg->top_k = 2;
    cfg->num_mlp_only_layers = 1;
    cfg->mlp_only_layers[0] = 1;
    if (hfconfig_finish(cfg, "fuzz", err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_expert_config: %s\n", err);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct model_config cfg;
    static int ready;
    if (!ready) {
        model_config_of_the_harness(&cfg);
        ready = 1;
    }
    char err[1024];
    const char *path = fuzz_write_file("expert_config.json", data, size);
    struct expert_config ec;
    if (expert_config_read(path, &cfg, &ec, err, sizeof err) != 0) return 0;

    fuzz_require(ec.num_layers == cfg.num_layers);
    for (int l = 0; l < ec.num_layers; l++) {
        fuzz_require(ec.n_experts[l] >= 0 && ec.n_experts[l] <= cfg.num_experts);
        if (ec.n_experts[l] > 0) fuzz_require(cfg.is_moe[l]);
        for (int i = 0; i < ec.n_experts[l]; i++) {
            int e = ec.experts[l][i];
            fuzz_require(e >= 0 && e < cfg.num_experts && expert_config_has(&ec, l, e));
            for (int j = 0; j < i; j++) fuzz_require(ec.experts[l][j] != e);
        }
    }
    expert_config_free(&ec);
    return 0;
}
