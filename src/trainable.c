/* trainable: training methods' trainable sets and expert_config.json (see trainable.h). */
#include "trainable.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "lora_experts.h"

void expert_config_free(struct expert_config *ec)
{
    if (ec->experts)
        for (int l = 0; l < ec->num_layers; l++) free(ec->experts[l]);
    free(ec->experts);
    free(ec->n_experts);
    memset(ec, 0, sizeof *ec);
}

bool expert_config_has(const struct expert_config *ec, int layer, int expert)
{
    if (layer < 0 || layer >= ec->num_layers) return false;
    for (int i = 0; i < ec->n_experts[layer]; i++)
        if (ec->experts[layer][i] == expert) return true;
    return false;
}

int expert_config_read(const char *path, const struct model_config *cfg,
                       struct expert_config *ec, char *err, size_t err_size)
{
    memset(ec, 0, sizeof *ec);
    json_error_t error;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &error);
    if (!root) {
        if (error.line > 0)
            snprintf(err, err_size, "%s:%d:%d: %s", path, error.line, error.column, error.text);
        else
            snprintf(err, err_size, "%s: %s", path, error.text);
        return -1;
    }
    int rc = -1;
    json_t *experts = json_object_get(root, "experts");
    if (!json_is_object(root) || !json_is_object(experts)) {
        snprintf(err, err_size, "%s: expected an object with an \"experts\" object", path);
        goto done;
    }
    const char *bool_keys[2] = {"shared_experts", "non_expert_modules"};
    bool *bool_values[2] = {&ec->shared_experts, &ec->non_expert_modules};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(root, bool_keys[i]);
        if (v && !json_is_boolean(v)) {
            snprintf(err, err_size, "%s: \"%s\" must be true or false", path, bool_keys[i]);
            goto done;
        }
        *bool_values[i] = v && json_is_true(v);
    }
    ec->num_layers = cfg->num_layers;
    ec->n_experts = xcalloc((size_t)cfg->num_layers, sizeof *ec->n_experts);
    ec->experts = xcalloc((size_t)cfg->num_layers, sizeof *ec->experts);
    const char *key;
    json_t *list;
    json_object_foreach(experts, key, list) {
        /* A key is the layer index in decimal, as select writes it (esft-semantics.md,
         * section 2). Other spellings of a number ("02", "+2", " 2") are refused, so no
         * two keys name one layer: the second would overrun the first one's list. */
        char *end = NULL, plain[24];
        long layer = strtol(key, &end, 10);
        snprintf(plain, sizeof plain, "%ld", layer);
        if (!*key || *end || strcmp(key, plain) != 0 || layer < 0 || layer >= cfg->num_layers ||
            !cfg->is_moe[layer]) {
            snprintf(err, err_size,
                     "%s: experts key \"%s\" is not a MoE layer of the model "
                     "(decoder layers 0-%d, written in decimal)",
                     path, key, cfg->num_layers - 1);
            goto done;
        }
        if (!json_is_array(list)) {
            snprintf(err, err_size, "%s: experts[\"%s\"] must be a list of expert ids", path, key);
            goto done;
        }
        size_t n = json_array_size(list);
        ec->experts[layer] = xcalloc(n ? n : 1, sizeof(int));
        for (size_t i = 0; i < n; i++) {
            json_t *id = json_array_get(list, i);
            long long e = json_is_integer(id) ? json_integer_value(id) : -1;
            if (e < 0 || e >= cfg->num_experts) {
                snprintf(err, err_size, "%s: experts[\"%s\"][%zu] is not an expert id in 0-%d",
                         path, key, i, cfg->num_experts - 1);
                goto done;
            }
            if (expert_config_has(ec, (int)layer, (int)e)) {
                snprintf(err, err_size, "%s: experts[\"%s\"] lists expert %lld twice", path, key, e);
                goto done;
            }
            ec->experts[layer][ec->n_experts[layer]++] = (int)e;
        }
    }
    if (ec->shared_experts && cfg->num_shared_experts == 0) {
        snprintf(err, err_size, "%s: \"shared_experts\" is true but the model (%s) has no "
                 "shared experts; set it to false", path, cfg->model_type);
        goto done;
    }
    int chosen = 0;
    for (int l = 0; l < ec->num_layers; l++) chosen += ec->n_experts[l];
    if (chosen == 0 && !ec->shared_experts && !ec->non_expert_modules) {
        snprintf(err, err_size, "%s: selects nothing to train (no expert in \"experts\", "
                 "shared_experts and non_expert_modules false)", path);
        goto done;
    }
    rc = 0;
done:
    json_decref(root);
    if (rc != 0) expert_config_free(ec);
    return rc;
}

int trainable_method_available(enum train_method method, char *err, size_t err_size)
{
    if ((unsigned)method > METHOD_DENSEMIXER) {
        snprintf(err, err_size, "train.method %d is not a method", (int)method);
        return -1;
    }
    return 0;
}

int trainable_select(const struct model *m, enum train_method method,
                     const struct expert_config *ec, bool *trainable, char *err, size_t err_size)
{
    if (trainable_method_available(method, err, err_size) != 0) return -1;
    if (method == METHOD_ESFT && !ec) {
        snprintf(err, err_size, "train.method esft needs an expert configuration");
        return -1;
    }
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        bool on;
        switch (method) {
        case METHOD_FULL:
        case METHOD_DENSEMIXER:
            on = p->kind != PARAM_LORA;
            break;
        case METHOD_FROZEN_ROUTER: on = p->kind != PARAM_ROUTER; break;
        case METHOD_LORA: /* with ec (targets: selected), only its experts' pairs */
            on = p->kind == PARAM_LORA &&
                 (!ec || !lora_experts_is(p) || expert_config_has(ec, p->layer, p->expert));
            break;
        default: /* esft */
            if (p->kind == PARAM_EXPERT)
                on = expert_config_has(ec, p->layer, p->expert);
            else if (p->kind == PARAM_SHARED_EXPERT)
                on = ec->shared_experts;
            else
                on = ec->non_expert_modules;
        }
        trainable[i] = on && !p->buffer; /* e_score_correction_bias: never trained */
    }
    return 0;
}

void trainable_add_routers(const struct model *m, bool *trainable)
{
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].kind == PARAM_ROUTER && !m->params[i].buffer) trainable[i] = true;
}

bool densemixer_enabled(const struct deck_train *tr)
{
    return tr->method == METHOD_DENSEMIXER || tr->densemixer;
}

int densemixer_check(const struct deck *deck, const struct model_config *cfg, char *err,
                     size_t err_size)
{
    const struct deck_train *tr = &deck->train;
    if (!densemixer_enabled(tr)) return 0;
    const char *key = tr->method == METHOD_DENSEMIXER ? "train.method" : "train.densemixer";
    char where[4200];
    deck_where(deck, key, where, sizeof where);
    if (tr->method == METHOD_LORA) {
        snprintf(err, err_size,
                 "%s: DenseMixer with train.method lora is not supported (use "
                 "it with esft, full, frozen_router, or train.method densemixer)",
                 where);
        return -1;
    }
    if (cfg && (cfg->num_experts == 0 || cfg->router != ROUTER_SOFTMAX_TOPK)) {
        snprintf(err, err_size,
                 "%s: DenseMixer's router gradient is defined for softmax top-k "
                 "routers (qwen2_moe, qwen3_moe, olmoe, mixtral); %s (%s) routes %s",
                 where, deck->model.path, hfconfig_family_name(cfg->family),
                 cfg->num_experts == 0                ? "no tokens: it has no experts"
                 : cfg->router == ROUTER_SIGMOID_BIAS ? "by bias-corrected sigmoid scores"
                 : cfg->router == ROUTER_TOPK_SOFTMAX ? "by a softmax over the top-k logits"
                                                      : "by group-limited top-k");
        return -1;
    }
    return 0;
}
