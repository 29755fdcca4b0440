/* tiny_model: the configuration of the tiny models the checkpoint and export tests build
 * in memory (test_checkpoint.c, test_export.c): hidden 8, 2 layers, 2 heads of 4 and one
 * KV head, a vocabulary of 11, 4 experts of width 5, top-2 (a dense width of 6, gpt_oss's
 * 5: its experts'). Header-only, for the test programs. */
#ifndef ESFT_TESTS_TINY_MODEL_H
#define ESFT_TESTS_TINY_MODEL_H

#include <mpi.h>
#include <stdio.h>

#include "hfconfig.h"

static inline void tiny_model_config(enum hf_family family, enum hf_dtype dtype,
                                     struct model_config *cfg)
{
    char err[512];
    hfconfig_defaults(family, cfg);
    cfg->hidden_size = 8;
    cfg->num_layers = 2;
    cfg->num_heads = 2;
    cfg->num_kv_heads = 1;
    cfg->head_dim = 4;
    cfg->vocab_size = 11;
    cfg->intermediate_size = family == HF_GPT_OSS ? 5 : 6;
    cfg->expert_intermediate_size = 5;
    cfg->num_experts = 4;
    cfg->top_k = 2;
    cfg->dtype = dtype;
    if (hfconfig_finish(cfg, "tiny", err, sizeof err) != 0) {
        fprintf(stderr, "tiny config: %s\n", err);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}

#endif
