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
 * tensor lies outside it). Collective over comm (as for
 * checkpoint_write): world rank 0 writes, the tensors it does not hold sent to it one
 * at a time, each written at its place in the file as it arrives (st_stream.h: the
 * headers are written first, from the parameter table), so rank 0 holds its own tensors
 * and one more, never the whole set; the same status and message on every rank. 0, or -1. */
int export_adapter(const char *dir, const struct model *model, const char *expert_config,
                   MPI_Comm comm, char *err, size_t err_size);

/* A complete Hugging Face checkpoint of the trained model: every tensor, sharded
 * safetensors (+ index when sharded, shards of at most max_shard_bytes), config.json,
 * and the base directory's tokenizer and generation files copied. Collective over comm
 * like export_adapter: streamed, rank 0 holds no more than its own tensors and the one
 * arriving (gpt_oss's routed experts are written fused, an expert's rows at a time). 0, or -1. */
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
