/* init: the `init` phase. Writes a random-initialised Hugging Face checkpoint of a
 * supported family and size (config.json + safetensors, single file or sharded) at
 * model.path, for tests, demos and benchmarks. The tensors are the model's parameter
 * table, so names and shapes are exactly what the loader reads back; transformers loads
 * the result (tests/golden/generate.py shows it once).
 *
 * Values as transformers' _init_weights: linear and embedding weights N(0, init_std),
 * norm weights 1, biases 0 (gpt_oss: router bias and attention sinks N(0, init_std)).
 * gpt_oss's routed experts are written in transformers' fused layout. Rank 0 writes; the
 * other ranks wait. */
#include <errno.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "hfconfig.h"
#include "files.h"
#include "gpt_oss_layout.h"
#include "log.h"
#include "model.h"
#include "phases.h"
#include "rng.h"
#include "safetensors.h"

int init_config(const struct deck *deck, struct model_config *cfg, char *err, size_t err_size)
{
    const struct deck_init *in = &deck->init;
    enum hf_family family;
    if (hfconfig_family_parse(in->family, &family) != 0) {
        snprintf(err, err_size, "init.family '%s' is not a supported family", in->family);
        return -1;
    }
    hfconfig_defaults(family, cfg);
    cfg->hidden_size = in->hidden_size;
    cfg->num_layers = in->num_layers;
    cfg->num_heads = in->num_heads;
    cfg->num_kv_heads = in->num_kv_heads;
    cfg->head_dim = in->head_dim;
    cfg->vocab_size = in->vocab_size;
    cfg->intermediate_size = in->intermediate_size;
    /* olmoe, mixtral and gpt_oss experts are intermediate_size wide; the qwen families
     * have a separate moe_intermediate_size */
    cfg->expert_intermediate_size =
        family == HF_OLMOE || family == HF_MIXTRAL || family == HF_GPT_OSS
            ? in->intermediate_size
            : in->moe_intermediate_size;
    cfg->num_experts = in->num_experts;
    cfg->top_k = in->top_k;
    cfg->norm_topk_prob = family == HF_MIXTRAL ? true : in->norm_topk_prob;
    cfg->tie_word_embeddings = in->tie_word_embeddings;
    cfg->initializer_range = in->init_std;
    cfg->rope.theta = in->rope_theta;
    cfg->dtype = in->dtype == DTYPE_FP32 ? HF_DTYPE_F32 : in->dtype == DTYPE_FP16 ? HF_DTYPE_F16
                                                                                : HF_DTYPE_BF16;
    if (family == HF_QWEN2_MOE) {
        cfg->shared_expert_intermediate_size = in->shared_expert_intermediate_size;
        cfg->num_shared_experts = in->shared_expert_intermediate_size > 0;
        cfg->shared_expert_gated = in->shared_expert_intermediate_size > 0;
    }
    if (family == HF_DEEPSEEK_V2 || family == HF_DEEPSEEK_V3 || family == HF_GLM4_MOE) {
        cfg->num_shared_experts = in->n_shared_experts;
        cfg->first_k_dense_replace = in->first_k_dense_replace;
        cfg->n_group = in->n_group;
        cfg->topk_group = in->topk_group;
        cfg->routed_scaling_factor = in->routed_scaling_factor;
        cfg->num_mtp_layers = 0; /* init writes no multi-token-prediction layer */
        if (family == HF_DEEPSEEK_V2)
            cfg->router = in->n_group > 1 ? ROUTER_GROUPED_GREEDY : ROUTER_SOFTMAX_TOPK;
        cfg->shared_expert_intermediate_size = in->n_shared_experts * in->moe_intermediate_size;
    }
    if (family == HF_GPT_OSS) {
        /* the family's other defaults stay (GptOssConfig): attention biases and sinks,
         * alternating sliding and full layers (hfconfig_finish), the yarn rope */
        cfg->sliding_window = in->sliding_window;
        cfg->swiglu_limit = in->swiglu_limit;
    }
    if (cfg->attention == ATTENTION_MLA) { /* head_dim and num_kv_heads do not apply */
        cfg->kv_lora_rank = in->kv_lora_rank;
        cfg->q_lora_rank = in->q_lora_rank;
        cfg->qk_nope_head_dim = in->qk_nope_head_dim;
        cfg->qk_rope_head_dim = in->qk_rope_head_dim;
        cfg->v_head_dim = in->v_head_dim;
        cfg->head_dim = in->qk_rope_head_dim;
        cfg->num_kv_heads = in->num_heads;
    }
    /* qwen2_moe and olmoe have no head_dim key: it is always hidden / heads */
    if ((family == HF_QWEN2_MOE || family == HF_OLMOE) &&
        in->head_dim * in->num_heads != in->hidden_size) {
        char where[4096];
        deck_where(deck, "init.head_dim", where, sizeof where);
        snprintf(err, err_size,
                 "%s: init.head_dim (%d) must be init.hidden_size / init.num_heads "
                 "(%d) for %s, whose config has no head_dim key",
                 where, in->head_dim, in->hidden_size / in->num_heads, in->family);
        return -1;
    }
    char why[1024];
    if (hfconfig_finish(cfg, "init section", why, sizeof why) != 0) {
        snprintf(err, err_size, "%s: %s", deck->file ? deck->file : "command line", why);
        return -1;
    }
    return 0;
}

static void fill_random(struct model *m, uint64_t seed, double std)
{
    struct rng rng;
    rng_seed(&rng, seed);
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        bool norm = p->kind == PARAM_NORM || strstr(p->name, "_norm.weight") ||
                    strstr(p->name, "layernorm.weight");
        /* biases, and deepseek_v3 / glm4_moe's selection bias (a zero buffer at init);
         * gpt_oss's router bias is drawn like its weight (GptOssPreTrainedModel._init_weights,
         * which also draws the attention sinks N(0, std): neither norm nor bias here) */
        bool bias = (strstr(p->name, ".bias") != NULL && p->kind != PARAM_ROUTER) || p->buffer;
        for (size_t j = 0; j < p->numel; j++)
            p->data[j] = norm ? 1.0f : bias ? 0.0f : (float)(std * rng_normal(&rng));
    }
}

/* Where init's tensors go: the writer, and the checkpoint-dtype copies it borrows. */
struct init_out {
    struct st_writer *writer;
    enum st_dtype dtype;
    char *copies;
    size_t used;
};

/* One tensor (fp32) into the writer, converted to the checkpoint dtype. */
static int add_tensor(const char *name, int rank, const int64_t *shape, const float *data,
                      size_t numel, void *context, char *err, size_t err_size)
{
    struct init_out *out = context;
    void *copy = out->copies + out->used;
    out->used += numel * st_dtype_size(out->dtype);
    st_f32_to_dtype_array(data, copy, numel, out->dtype);
    return st_writer_add(out->writer, name, out->dtype, rank, shape, copy, err, err_size);
}

/* The parameter table's tensors, except gpt_oss's routed experts, which go in
 * transformers' fused layout (gpt_oss_layout.h), as the published checkpoints have them. */
static int write_checkpoint(const struct deck *deck, struct model *m, char *err, size_t err_size)
{
    const struct model_config *cfg = &m->cfg;
    struct init_out out = {.writer = st_writer_new()};
    out.dtype = cfg->dtype == HF_DTYPE_F32 ? ST_F32 : cfg->dtype == HF_DTYPE_F16 ? ST_F16 : ST_BF16;
    out.copies = xmalloc(m->storage_floats * st_dtype_size(out.dtype) + 1);
    struct gpt_oss_fuser *fuser =
        cfg->family == HF_GPT_OSS ? gpt_oss_fuser_new(cfg, add_tensor, &out) : NULL;
    int rc = 0;
    for (int i = 0; i < m->n_params && rc == 0; i++) {
        struct param *p = &m->params[i];
        if (gpt_oss_fuser_takes(fuser, p))
            rc = gpt_oss_fuser_take(fuser, p, p->data, err, err_size);
        else
            rc = add_tensor(p->name, p->rank, p->shape, p->data, p->numel, &out, err, err_size);
    }
    if (rc == 0 && fuser) rc = gpt_oss_fuser_finish(fuser, err, err_size);
    if (rc == 0) {
        rc = st_writer_write_checkpoint(out.writer, deck->model.path,
                                        st_writer_shard_limit(out.writer, deck->init.shards), err,
                                        err_size);
    }
    /* config.json last: a directory with a config is a complete checkpoint */
    if (rc == 0) rc = hfconfig_write(deck->model.path, cfg, err, err_size);
    gpt_oss_fuser_free(fuser);
    st_writer_free(out.writer);
    free(out.copies);
    return rc;
}

int phase_init(const struct deck *deck, const struct layout *layout)
{
    struct model_config cfg;
    char err[2048] = "";
    if (init_config(deck, &cfg, err, sizeof err) != 0) fatal_all(EXIT_INPUT, "%s", err);
    const char *dir = deck->model.path;
    char config_path[4200];
    snprintf(config_path, sizeof config_path, "%s/config.json", dir);
    struct stat st;
    if (stat(config_path, &st) == 0)
        fatal_all(EXIT_INPUT, "init: %s already holds a checkpoint (%s); init never overwrites "
                  "a model: remove it or choose another model.path", dir, config_path);

    int status = 0;
    if (layout->world_rank == 0) {
        double start = wall_time();
        struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
        struct layout_coords me = {0, 0, 0};
        struct model m;
        model_create(&m, &cfg, &one, me);
        size_t n_params = m.storage_floats;
        log_info("init: %s, %d layers, hidden %d, %d experts top-%d, %.2fM parameters -> %s",
                 hfconfig_family_name(cfg.family), cfg.num_layers, cfg.hidden_size,
                 cfg.num_experts, cfg.top_k, (double)n_params / 1e6, dir);
        fill_random(&m, (uint64_t)deck->run.seed, deck->init.init_std);
        if (make_directories(dir) != 0) {
            snprintf(err, sizeof err, "cannot create %s: %s", dir, strerror(errno));
            status = EXIT_RUNTIME;
        } else if (write_checkpoint(deck, &m, err, sizeof err) != 0) {
            status = EXIT_RUNTIME;
        }
        if (status == 0) {
            log_info("init: wrote %s in %.1f s", dir, wall_time() - start);
            metrics_write("init", "\"model\": \"%s\", \"parameters\": %zu", dir, n_params);
        }
        model_free(&m);
    }
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status != 0) fatal_all(status, "init: %s", err);
    return 0;
}
