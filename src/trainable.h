/* trainable: which tensors a training method updates (shared/reference/esft-semantics.md
 * sections 3 and 5), and the expert configuration file that ESFT's choice comes from.
 *
 *   esft           the experts of expert_config.json; shared experts if its
 *                  "shared_experts" is true; every non-expert tensor (attention, norms,
 *                  embeddings, lm_head, dense MLPs, routers) if "non_expert_modules"
 *   full           everything, routers included
 *   frozen_router  everything but the routers
 *   lora           the LoRA adapters (lora.h) only, the base frozen; with
 *                  train.lora.train_router the routers too (trainable_add_routers)
 *   densemixer     everything, routers included, as full: the method differs in the
 *                  router's gradient only (densemixer.h), as the DenseMixer comparison
 *                  trains the whole model (methods-lora-densemixer.md) */
#ifndef ESFT_TRAINABLE_H
#define ESFT_TRAINABLE_H

#include <stdbool.h>
#include <stddef.h>

#include "deck.h"
#include "model.h"

/* expert_config.json, the reference format: {"experts": {"LAYER": [ids...], ...},
 * "shared_experts": bool, "non_expert_modules": bool} (other members ignored). */
struct expert_config {
    int num_layers;
    int *n_experts;    /* [num_layers]: experts chosen in each decoder layer */
    int **experts;     /* [num_layers] -> [n_experts[l]] */
    bool shared_experts, non_expert_modules;
};

/* Reads and checks path against the model: every key a MoE layer of cfg written in
 * plain decimal ("2", not "02"), every id an expert of it, no duplicate key or id,
 * "shared_experts" only for a model that has them, and something to train. 0, or -1
 * with a message naming the file and key. */
int expert_config_read(const char *path, const struct model_config *cfg,
                       struct expert_config *ec, char *err, size_t err_size);
void expert_config_free(struct expert_config *ec);
bool expert_config_has(const struct expert_config *ec, int layer, int expert);

/* 0 when this version trains with the method, else -1 with a message. */
int trainable_method_available(enum train_method method, char *err, size_t err_size);

/* trainable[i] for model->params[i] under a method (ec: METHOD_ESFT's experts, or
 * METHOD_LORA's with targets selected: only those experts' pairs train; else NULL).
 * Returns 0, or -1 with a message when the method is not available. */
int trainable_select(const struct model *model, enum train_method method,
                     const struct expert_config *ec, bool *trainable, char *err, size_t err_size);

/* Marks every router trainable (method lora with train.lora.train_router). */
void trainable_add_routers(const struct model *model, bool *trainable);

/* Whether a run trains with DenseMixer's router gradient: method densemixer, or
 * train.densemixer with another method. */
bool densemixer_enabled(const struct deck_train *tr);

/* 0 when the deck's DenseMixer (none: always) can train cfg: a softmax top-k router
 * (the rule is defined for it: qwen2_moe, qwen3_moe, olmoe, mixtral) and not method
 * lora (its routed-expert adapters would have to join the dense pass). Else -1 with
 * the deck key's place.
 * cfg NULL: the deck's own conditions only (before the model exists). */
int densemixer_check(const struct deck *deck, const struct model_config *cfg, char *err,
                     size_t err_size);

#endif
