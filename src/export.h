/* export: the trained tensors in files other tools load, for the train phase: the
 * adapter (the trained tensors only) and the merged checkpoint (the whole trained model).
 * Both are layout-free: a run under any (pp, dp, ep) writes the same files. */
#ifndef ESFT_EXPORT_H
#define ESFT_EXPORT_H

#include <mpi.h>
#include <stddef.h>

#include "model.h"

/* The adapter: the trainable tensors under their Hugging Face names in one safetensors
 * file (dtype of the base checkpoint: bf16, fp16 or fp32), and expert_config (when not
 * NULL) copied beside it as expert_config.json. With an expert_config, also the ESFT
 * reference's layout in DIR/esft_reference/: expert_cfg.json and adapter.safetensors
 * keyed as the reference's loader (deepseek-ai/ESFT esft.py) loads them into the model's
 * inner module: the names without "model." (left out, with a warning, when a trained
 * tensor lies outside it). Collective over comm (as for checkpoint_write): rank 0
 * creates the files with their headers (from the parameter table: every tensor's name,
 * dtype and shape), then every rank writes the tensors it holds at their places
 * (st_stream.h, shared; a tensor several ranks hold is written by one of them,
 * gather_provider), converted a bounded piece at a time, so no tensor leaves its rank;
 * DIR must be on a file system every rank sees. The same status and message on every
 * rank; a safetensors file is never left unfinished under its own name. 0, or -1. */
int export_adapter(const char *dir, const struct model *model, const char *expert_config,
                   MPI_Comm comm, char *err, size_t err_size);

/* A complete Hugging Face checkpoint of the trained model: every tensor, sharded
 * safetensors (+ index when sharded, shards of at most max_shard_bytes), config.json,
 * and the base directory's tokenizer and generation files copied. Collective over comm
 * like export_adapter: each rank writes its own tensors into the shared files (gpt_oss's
 * routed experts are written fused by their EP ranks, an expert's rows at a time). 0, or
 * -1. */
int export_merged(const char *dir, const struct model *model, const char *base_dir,
                  size_t max_shard_bytes, MPI_Comm comm, char *err, size_t err_size);

/* Method lora's adapter as PEFT (0.17 and later) loads it with PeftModel.from_pretrained:
 * DIR/adapter_model.safetensors (fp32; base_model.model.<module>.lora_A.weight [r, in],
 * lora_B.weight [out, r]; trained routers as modules_to_save copies,
 * base_model.model.<name>) and DIR/adapter_config.json. Collective like export_adapter.
 * 0, or -1. */
int export_lora_adapter(const char *dir, const struct model *model, const struct lora_spec *spec,
                        const char *base_path, MPI_Comm comm, char *err, size_t err_size);

#endif
