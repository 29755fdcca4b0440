/* export: the trained tensors as files other tools load (see export.h). Every rank
 * declares every tensor up front from the parameter table (every rank holds it: names,
 * shapes), rank 0 creates the files with their headers and sizes (st_stream, shared), and
 * each rank writes the tensors it provides (gather.h: one holder of each) at their places,
 * converted to the export dtype a bounded piece at a time: no tensor leaves its rank. */
#include "export.h"

#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "files.h"
#include "gather.h"
#include "gpt_oss_layout.h"
#include "hfconfig.h"
#include "log.h"
#include "lora_experts.h"
#include "safetensors.h"
#include "st_stream.h"

static enum st_dtype export_dtype(const struct model_config *cfg)
{
    switch (cfg->dtype) {
    case HF_DTYPE_BF16:
        return ST_BF16;
    case HF_DTYPE_F16:
        return ST_F16;
    default:
        return ST_F32;
    }
}

/* An export's files, as each rank writes its share of them. */
struct export_out {
    struct st_stream *stream;
    enum st_dtype dtype;
    bool trainable_only;
    /* the ESFT reference's layout of the same tensors (NULL: not written): the keys of
     * its DeepseekV2Model, i.e. the names without "model."; outside names the first
     * tensor it cannot hold */
    struct st_stream *reference;
    char outside[PARAM_NAME_MAX];
    /* the merged export of a gpt_oss model: its routed experts in transformers' fused
     * layout (NULL otherwise, and for the adapter, which keeps esft's per-expert names) */
    struct gpt_oss_fuser *fuser;
    bool drop_adapters; /* the merged export: LoRA adapters are folded in, not written */
    bool peft_names;    /* the LoRA adapter: a trained router as base_model.model.<name> */
    bool expert_pairs;  /* the LoRA adapter: the experts' pairs in PEFT's fused form */
};

/* The name p is written under, into name[PARAM_NAME_MAX + 32]; false when p is not
 * written as itself (left out, or fused into another tensor). */
static bool export_name(const struct export_out *out, const struct param *p, char *name)
{
    if (out->trainable_only && !p->trainable) return false;
    if (out->drop_adapters && p->kind == PARAM_LORA) return false; /* merged into their bases */
    if (gpt_oss_fuser_takes(out->fuser, p)) return false;
    if (lora_experts_is(p)) return false; /* fused (the adapter) or merged */
    if (out->peft_names && p->kind != PARAM_LORA)
        snprintf(name, PARAM_NAME_MAX + 32, "base_model.model.%s", p->name);
    else
        snprintf(name, PARAM_NAME_MAX + 32, "%s", p->name);
    return true;
}

/* lora_experts_declare's sink: a fused tensor of the experts' pairs declared. */
static int declare_expert_pairs(const char *name, const int64_t *shape, void *sink, char *err,
                                size_t err_size)
{
    struct export_out *out = sink;
    return st_stream_declare(out->stream, name, out->dtype, 2, shape, err, err_size);
}

/* gpt_oss_fuser_list's sink: a fused tensor declared in the export dtype. */
static int declare_fused_tensor(const char *name, int rank, const int64_t *shape, const float *data,
                                size_t numel, void *sink, char *err, size_t err_size)
{
    (void)data;
    (void)numel;
    struct export_out *out = sink;
    return st_stream_declare(out->stream, name, out->dtype, rank, shape, err, err_size);
}

static int add_fused_slice(const char *name, size_t first, const float *data, size_t count,
                           void *sink, char *err, size_t err_size);

/* Collective over comm: every tensor the export writes declared, then the files opened
 * at `path` (one file) or `dir` (a checkpoint directory, shards of at most
 * max_shard_bytes); fuse: gpt_oss's routed experts in transformers' fused layout (the
 * merged export). With a reference_dir, the ESFT reference's layout too
 * (reference_dir/adapter.safetensors), unless a tensor lies outside it (out->outside
 * names it). 0, or -1 + err, the same on every rank. */
static int open_export(struct export_out *out, const struct model *model, bool fuse,
                       const char *path, const char *dir, size_t max_shard_bytes,
                       const char *reference_dir, MPI_Comm comm, char *err, size_t err_size)
{
    int rank;
    check_mpi(MPI_Comm_rank(comm, &rank));
    out->stream = st_stream_new_shared(comm);
    if (fuse && model->cfg.family == HF_GPT_OSS)
        out->fuser = gpt_oss_fuser_new_sliced(&model->cfg, add_fused_slice, out);
    /* the declarations follow from the parameter table alone: every rank fails alike */
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        char name[PARAM_NAME_MAX + 32];
        if (!export_name(out, p, name)) continue;
        if (st_stream_declare(out->stream, name, out->dtype, p->rank, p->shape, err, err_size))
            return -1;
        if (reference_dir && !out->outside[0] && strncmp(p->name, "model.", 6) != 0)
            snprintf(out->outside, sizeof out->outside, "%s", p->name);
    }
    if (out->fuser && gpt_oss_fuser_list(out->fuser, declare_fused_tensor, out, err, err_size))
        return -1;
    if (out->expert_pairs &&
        lora_experts_declare(model, declare_expert_pairs, out, err, err_size))
        return -1;
    int rc = path ? st_stream_open_file(out->stream, path, 1, err, err_size)
                  : st_stream_open_checkpoint(out->stream, dir, max_shard_bytes, err, err_size);
    if (rc != 0 || !reference_dir || out->outside[0]) return rc;
    if (rank == 0 && make_directories(reference_dir) != 0) {
        snprintf(err, err_size, "%s: cannot create directory: %s", reference_dir, strerror(errno));
        rc = -1;
    }
    if (ranks_agree(rc, err, err_size, comm)) return -1;
    char reference_path[4300];
    snprintf(reference_path, sizeof reference_path, "%s/adapter.safetensors", reference_dir);
    out->reference = st_stream_new_shared(comm);
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        char name[PARAM_NAME_MAX + 32];
        if (export_name(out, p, name) && st_stream_declare(out->reference, p->name + 6, out->dtype,
                                                           p->rank, p->shape, err, err_size))
            return -1;
    }
    return st_stream_open_file(out->reference, reference_path, 1, err, err_size);
}

static void close_export(struct export_out *out)
{
    st_stream_free(out->stream);
    st_stream_free(out->reference);
    gpt_oss_fuser_free(out->fuser);
}

/* The tensor_sink of the exports: one tensor written at its place, in the export dtype. */
static int add_export_tensor(const struct param *p, const float *values, void *sink, char *err,
                             size_t err_size)
{
    struct export_out *out = sink;
    if (gpt_oss_fuser_takes(out->fuser, p))
        return gpt_oss_fuser_take(out->fuser, p, values, err, err_size);
    char name[PARAM_NAME_MAX + 32];
    if (!export_name(out, p, name)) return 0;
    if (out->reference && st_stream_write_f32(out->reference, p->name + 6, 0, values,
                                              (size_t)p->numel, err, err_size) != 0)
        return -1;
    return st_stream_write_f32(out->stream, name, 0, values, (size_t)p->numel, err, err_size);
}

/* The sliced gpt_oss fuser's sink: one expert's part of a fused tensor (fp32, valid
 * during the call) written at its place in the export dtype. */
static int add_fused_slice(const char *name, size_t first, const float *data, size_t count,
                           void *sink, char *err, size_t err_size)
{
    struct export_out *out = sink;
    return st_stream_write_f32(out->stream, name, first, data, count, err, err_size);
}

/* Whether this rank writes p (gather.h). */
static bool provides(const struct model *model, const struct param *p)
{
    return gather_provider(model, p) == layout_rank_of(&model->grid, model->me);
}

/* Collective over comm: each rank writes the tensors it provides (the trainable ones, or
 * all), then the files are finished (every byte written by some rank: the temporary
 * files renamed). A gpt_oss layer's fused experts come from several ranks (their EP
 * ranks): the bytes all ranks wrote, summed, say that each is complete. 0, or -1 + err,
 * the same on every rank. */
static int write_export(struct export_out *out, const struct model *model, bool trainable_only,
                        MPI_Comm comm, char *err, size_t err_size)
{
    int rc = gather_each_provided(model, trainable_only, add_export_tensor, out, err, err_size);
    if (rc == 0 && out->expert_pairs)
        rc = lora_experts_write(model, provides, add_fused_slice, out, err, err_size);
    if (ranks_agree(rc, err, err_size, comm)) return -1;
    if (st_stream_finish(out->stream, err, err_size)) return -1;
    return out->reference ? st_stream_finish(out->reference, err, err_size) : 0;
}

/* The ESFT reference's adapter directory (deepseek-ai/ESFT esft.py, load_esft_model /
 * add_adapter): expert_cfg.json, and safetensors files whose keys are those of the
 * model's inner module (model.model.load_state_dict, strict): the trained tensors' names
 * without "model.". A tensor outside the inner module (lm_head) has no place there: the
 * layout is then left out, with a warning naming it. Its tensors are written by
 * open_export / write_export; here the rest. */
static int finish_reference_layout(const char *sub, const struct export_out *out,
                                   const char *expert_config, char *err, size_t err_size)
{
    if (out->outside[0]) {
        log_warn("train: no ESFT-reference layout of the adapter: %s is outside the model's "
                 "inner module, which the reference loads the adapter into",
                 out->outside);
        return 0;
    }
    char path[4300];
    snprintf(path, sizeof path, "%s/expert_cfg.json", sub);
    return copy_file(expert_config, path, err, err_size);
}

int export_adapter(const char *dir, const struct model *model, const char *expert_config,
                   MPI_Comm comm, char *err, size_t err_size)
{
    int rank;
    check_mpi(MPI_Comm_rank(comm, &rank));
    char path[4200], config_path[4200], reference_dir[4200];
    int rc = gather_check_layout(model, comm, "export_adapter", err, err_size);
    if (rc == 0 &&
        (path_join(path, sizeof path, dir, "adapter.safetensors", err, err_size) ||
         path_join(config_path, sizeof config_path, dir, "expert_config.json", err, err_size) ||
         path_join(reference_dir, sizeof reference_dir, dir, "esft_reference", err, err_size)))
        rc = -1;
    int n_trainable = 0;
    for (int i = 0; i < model->n_params; i++) n_trainable += model->params[i].trainable;
    if (rc == 0 && n_trainable == 0) {
        snprintf(err, err_size, "export_adapter: the model has no trainable tensors");
        rc = -1;
    }
    if (rc == 0 && rank == 0 && make_directories(dir) != 0) {
        snprintf(err, err_size, "%s: cannot create directory: %s", dir, strerror(errno));
        rc = -1;
    }
    if (ranks_agree(rc, err, err_size, comm)) return -1;
    struct export_out out = {.dtype = export_dtype(&model->cfg), .trainable_only = true};
    rc = open_export(&out, model, false, path, NULL, 0, expert_config ? reference_dir : NULL, comm,
                     err, err_size);
    if (rc == 0) rc = write_export(&out, model, true, comm, err, err_size);
    if (rc == 0 && rank == 0 && expert_config) {
        rc = copy_file(expert_config, config_path, err, err_size);
        if (rc == 0)
            rc = finish_reference_layout(reference_dir, &out, expert_config, err, err_size);
    }
    close_export(&out);
    return ranks_agree(rc, err, err_size, comm);
}

/* Whether a and b name the same existing directory. */
static bool same_directory(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) != 0 || stat(b, &sb) != 0) return false;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Rank 0's checks of the merged export's directory, which it then creates. */
static int prepare_merged_directory(const char *dir, const char *base_dir, char *err,
                                    size_t err_size)
{
    if (base_dir && (strcmp(dir, base_dir) == 0 || same_directory(dir, base_dir))) {
        snprintf(err, err_size,
                 "export_merged: %s is the base model's directory; the merged model goes to a "
                 "new directory",
                 dir);
        return -1;
    }
    char path[4200];
    if (path_join(path, sizeof path, dir, "config.json", err, err_size)) return -1;
    if (path_exists(path)) {
        snprintf(err, err_size,
                 "export_merged: %s already holds a checkpoint (config.json); remove it or "
                 "choose another directory",
                 dir);
        return -1;
    }
    if (make_directories(dir) != 0) {
        snprintf(err, err_size, "%s: cannot create directory: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

/* The base model's config.json at `to`: as it is, or, when it declares a
 * quantization_config (DeepSeek-V3's fp8, gpt_oss's mxfp4), without that key, since the merged
 * export's weights are dequantised (the export dtype) and a loader would look for scales that are
 * not there. Rewritten as transformers writes a config (to_json_string: indent 2, sorted
 * keys, ASCII); the other keys and values are kept. */
static int copy_base_config(const char *from, const char *to, enum st_dtype dtype, char *err,
                            size_t err_size)
{
    json_error_t jerr;
    json_t *config = json_load_file(from, 0, &jerr);
    if (!config || !json_is_object(config) || !json_object_get(config, "quantization_config")) {
        json_decref(config);
        return copy_file(from, to, err, err_size);
    }
    json_t *method =
        json_object_get(json_object_get(config, "quantization_config"), "quant_method");
    char quantisation[64];
    snprintf(quantisation, sizeof quantisation, "%s",
             json_is_string(method) && strcmp(json_string_value(method), "mxfp4") == 0
                 ? "gpt_oss's mxfp4 experts"
                 : "fp8 block quantisation");
    json_object_del(config, "quantization_config");
    int rc = hfconfig_write_json(to, config, err, err_size);
    json_decref(config);
    if (rc == 0)
        log_info("export_merged: the weights are written dequantised (%s), so %s has no "
                 "quantization_config (the base's %s)",
                 st_dtype_name(dtype), to, quantisation);
    return rc;
}

/* Rank 0: the base directory's tokenizer and generation files, then config.json (last:
 * a directory without it is an unfinished export, retried freely). */
static int finish_merged_directory(const char *dir, const struct model *model, const char *base_dir,
                                   char *err, size_t err_size)
{
    static const char *const copied[] = {"tokenizer.json",
                                         "tokenizer_config.json",
                                         "special_tokens_map.json",
                                         "vocab.json",
                                         "merges.txt",
                                         "tokenizer.model",
                                         "generation_config.json",
                                         "chat_template.jinja"};
    for (size_t i = 0; base_dir && i < sizeof copied / sizeof copied[0]; i++) {
        char from[4200], to[4200];
        if (path_join(from, sizeof from, base_dir, copied[i], err, err_size) ||
            path_join(to, sizeof to, dir, copied[i], err, err_size))
            return -1;
        if (path_exists(from) && copy_file(from, to, err, err_size)) return -1;
    }
    /* The base model's config.json (its unknown keys kept: the export changes weights, not
     * the architecture; its quantization_config dropped), or one written from the
     * configuration. */
    char from[4200], to[4200];
    if (base_dir && (path_join(from, sizeof from, base_dir, "config.json", err, err_size) ||
                     path_join(to, sizeof to, dir, "config.json", err, err_size)))
        return -1;
    if (base_dir && path_exists(from))
        return copy_base_config(from, to, export_dtype(&model->cfg), err, err_size);
    return hfconfig_write(dir, &model->cfg, err, err_size);
}

int export_merged(const char *dir, const struct model *model, const char *base_dir,
                  size_t max_shard_bytes, MPI_Comm comm, char *err, size_t err_size)
{
    int rank;
    check_mpi(MPI_Comm_rank(comm, &rank));
    int rc = gather_check_layout(model, comm, "export_merged", err, err_size);
    if (rc == 0 && rank == 0) rc = prepare_merged_directory(dir, base_dir, err, err_size);
    if (ranks_agree(rc, err, err_size, comm)) return -1;
    struct export_out out = {.dtype = export_dtype(&model->cfg), .drop_adapters = true};
    rc = open_export(&out, model, true, NULL, dir, max_shard_bytes, NULL, comm, err, err_size);
    if (rc == 0) rc = write_export(&out, model, false, comm, err, err_size);
    if (rc == 0 && rank == 0) rc = finish_merged_directory(dir, model, base_dir, err, err_size);
    close_export(&out);
    return ranks_agree(rc, err, err_size, comm);
}

/* ---- the LoRA adapter in PEFT's format -------------------------------------------------- */

/* Whether PEFT (0.21) on transformers 5 re-targets this model's modules named gate_proj,
 * up_proj, down_proj: for the model types transformers maps onto qwen2_moe's v4
 * conversion (qwen3_moe, olmoe, deepseek_v2/v3, glm4_moe; qwen2_moe itself is not in the
 * map), its _convert_peft_config_moe (peft/utils/transformers_weight_conversion.py) turns
 * every target_modules entry ending in one of those names into target_parameters on the
 * fused experts, so a dense MLP's or shared expert's adapter is not loaded as trained. */
static bool peft_retargets_mlp(const struct model_config *c)
{
    return c->family == HF_QWEN3_MOE || c->family == HF_OLMOE || c->family == HF_DEEPSEEK_V2 ||
           c->family == HF_DEEPSEEK_V3 || c->family == HF_GLM4_MOE;
}

/* adapter_config.json as PEFT (0.17 and later) reads it: target_modules the exact module
 * paths (PEFT matches a list entry by equality or a ".entry" suffix), routers trained in
 * full as modules_to_save. */
static int write_adapter_config(const char *path, const struct model *model,
                                const struct lora_spec *spec, const char *base_path, char *err,
                                size_t err_size)
{
    json_t *root = json_object(), *targets = json_array(), *save = json_array();
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        const char *prefix = "base_model.model.", *suffix = ".lora_A.weight";
        if (lora_experts_is(p)) continue; /* target_parameters */
        if (p->kind == PARAM_LORA && !p->lora_b) {
            size_t n = strlen(p->name) - strlen(prefix) - strlen(suffix);
            char module[PARAM_NAME_MAX];
            snprintf(module, sizeof module, "%.*s", (int)n, p->name + strlen(prefix));
            json_array_append_new(targets, json_string(module));
        } else if (p->trainable && p->kind == PARAM_ROUTER) {
            char module[PARAM_NAME_MAX];
            const char *dot = strrchr(p->name, '.');
            snprintf(module, sizeof module, "%.*s", (int)(dot - p->name), p->name);
            size_t k = json_array_size(save);
            if (k == 0 || strcmp(json_string_value(json_array_get(save, k - 1)), module) != 0)
                json_array_append_new(save, json_string(module));
        }
    }
    for (int i = 0; peft_retargets_mlp(&model->cfg) && i < model->n_params; i++)
        if (model->params[i].kind == PARAM_LORA && !lora_experts_is(&model->params[i]) &&
            !LORA_IS_ATTENTION(model->params[i].lora_target)) {
            log_warn("train: %s: PEFT 0.21 on transformers 5 turns %s's targets named "
                     "gate_proj / up_proj / down_proj into its fused experts' target_parameters, "
                     "so it will not load the dense-MLP or shared-expert adapters as trained; "
                     "the merged checkpoint holds them",
                     path, hfconfig_family_name(model->cfg.family));
            break;
        }
    json_object_set_new(root, "peft_type", json_string("LORA"));
    json_object_set_new(root, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(root, "base_model_name_or_path", json_string(base_path));
    json_object_set_new(root, "r", json_integer(spec->r));
    json_object_set_new(root, "lora_alpha", json_real(spec->alpha));
    json_object_set_new(root, "lora_dropout", json_real(0.0));
    json_object_set_new(root, "target_modules", targets);
    json_object_set_new(root, "bias", json_string("none"));
    json_object_set_new(root, "fan_in_fan_out", json_false());
    json_object_set_new(root, "use_rslora", json_boolean(spec->rslora));
    json_object_set_new(root, "use_dora", json_false());
    json_object_set_new(root, "init_lora_weights", json_true());
    json_object_set_new(root, "rank_pattern", json_object());
    json_object_set_new(root, "alpha_pattern", json_object());
    json_object_set_new(root, "modules_to_save", json_array_size(save) ? save : json_null());
    if (!json_array_size(save)) json_decref(save);
    if (model->expert_lora) { /* every MoE layer's fused expert parameters (lora_experts.h) */
        json_t *params = json_array();
        json_array_append_new(params, json_string("mlp.experts.gate_up_proj"));
        json_array_append_new(params, json_string("mlp.experts.down_proj"));
        json_object_set_new(root, "target_parameters", params);
    } else {
        json_object_set_new(root, "target_parameters", json_null());
    }
    json_object_set_new(root, "inference_mode", json_true());
    int rc = json_dump_file(root, path, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(root);
    if (rc != 0) snprintf(err, err_size, "%s: cannot write: %s", path, strerror(errno));
    return rc != 0 ? -1 : 0;
}

int export_lora_adapter(const char *dir, const struct model *model, const struct lora_spec *spec,
                        const char *base_path, MPI_Comm comm, char *err, size_t err_size)
{
    int rank;
    check_mpi(MPI_Comm_rank(comm, &rank));
    char path[4200], config_path[4200];
    int rc = gather_check_layout(model, comm, "export_lora_adapter", err, err_size);
    if (rc == 0 &&
        (path_join(path, sizeof path, dir, "adapter_model.safetensors", err, err_size) ||
         path_join(config_path, sizeof config_path, dir, "adapter_config.json", err, err_size)))
        rc = -1;
    if (rc == 0 && rank == 0 && make_directories(dir) != 0) {
        snprintf(err, err_size, "%s: cannot create directory: %s", dir, strerror(errno));
        rc = -1;
    }
    /* adapters kept in fp32; a trained router as PEFT saves a modules_to_save copy,
     * base_model.model.<name> */
    if (ranks_agree(rc, err, err_size, comm)) return -1;
    struct export_out out = {.dtype = ST_F32, .trainable_only = true, .peft_names = true,
                             .expert_pairs = model->expert_lora != NULL};
    rc = open_export(&out, model, false, path, NULL, 0, NULL, comm, err, err_size);
    if (rc == 0) rc = write_export(&out, model, true, comm, err, err_size);
    if (rc == 0 && rank == 0)
        rc = write_adapter_config(config_path, model, spec, base_path, err, err_size);
    close_export(&out);
    return ranks_agree(rc, err, err_size, comm);
}
