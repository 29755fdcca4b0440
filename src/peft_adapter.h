/* peft_adapter: a LoRA adapter directory as PEFT (0.21) and esft's train write it
 * (adapter_config.json + adapter_model.safetensors) folded into a loaded model for
 * eval.adapter and `esft --apply-adapter`: W += scale B A for every adapted linear
 * (base_model.model.<module>.lora_A.weight [r, in], lora_B.weight [out, r]) and for the
 * routed experts' fused target_parameters (lora_experts.h: mlp.experts.gate_up_proj and
 * down_proj), a modules_to_save copy (base_model.model.<name>) put over its tensor;
 * scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
 *
 * Refused, with the file and key: a peft_type other than LORA, use_dora, fan_in_fan_out,
 * lora_bias or a bias other than "none", non-empty rank_pattern or alpha_pattern,
 * layer_replication, a target_parameters entry other than the experts' two, a tensor
 * that names no module of the model or has another shape. */
#ifndef ESFT_PEFT_ADAPTER_H
#define ESFT_PEFT_ADAPTER_H

#include <stdbool.h>
#include <stddef.h>

struct model;

/* Whether dir is such a directory (holds adapter_config.json). */
bool peft_adapter_is(const char *dir);

/* Checks the whole adapter against the model's table (every rank the same, so all agree
 * on an error), then folds it into the weights this rank holds (after model_load; a
 * weight held as bf16 is rounded again). *n_tensors: the adapter's tensors. 0, or -1
 * with a message. */
int peft_adapter_apply(struct model *m, const char *dir, int *n_tensors, char *err,
                       size_t err_size);

#endif
