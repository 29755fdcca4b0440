/* peft_adapter: a PEFT LoRA adapter directory folded into a loaded model (see
 * peft_adapter.h). */
#include "peft_adapter.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files.h"
#include "log.h"
#include "lora_experts.h"
#include "model.h"
#include "safetensors.h"

#define PREFIX "base_model.model."

/* What adapter_config.json says. */
struct peft_config {
    int r;
    double alpha;
    bool rslora;
    bool gate_up, down; /* target_parameters: the experts' fused parameters */
};

bool peft_adapter_is(const char *dir)
{
    char path[4200], err[64];
    return is_directory(dir) &&
           path_join(path, sizeof path, dir, "adapter_config.json", err, sizeof err) == 0 &&
           path_exists(path);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* A key that changes what the adapter computes in a way esft does not fold. */
static int refuse_key(const char *path, const char *key, const char *why, char *err,
                      size_t err_size)
{
    snprintf(err, err_size, "%s: key '%s': %s", path, key, why);
    return -1;
}

static int read_config(const char *path, struct peft_config *c, char *err, size_t err_size)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root || !json_is_object(root)) {
        snprintf(err, err_size, "%s: %s", path, root ? "not a JSON object" : jerr.text);
        json_decref(root);
        return -1;
    }
    int rc = -1;
    json_t *v;
    memset(c, 0, sizeof *c);
    const char *type = json_string_value(json_object_get(root, "peft_type"));
    if (!type || strcmp(type, "LORA") != 0) {
        refuse_key(path, "peft_type", "only LORA adapters are read", err, err_size);
        goto done;
    }
    v = json_object_get(root, "r");
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 20)) {
        refuse_key(path, "r", "must be a positive integer", err, err_size);
        goto done;
    }
    c->r = (int)json_integer_value(v);
    v = json_object_get(root, "lora_alpha");
    if (!json_is_number(v) || !(json_number_value(v) > 0)) {
        refuse_key(path, "lora_alpha", "must be a positive number", err, err_size);
        goto done;
    }
    c->alpha = json_number_value(v);
    c->rslora = json_is_true(json_object_get(root, "use_rslora"));
    static const char *const flags[] = {"use_dora", "fan_in_fan_out", "lora_bias"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (json_is_true(json_object_get(root, flags[i]))) {
            refuse_key(path, flags[i], "true is not supported (plain LoRA only)", err, err_size);
            goto done;
        }
    const char *bias = json_string_value(json_object_get(root, "bias"));
    if (bias && strcmp(bias, "none") != 0) {
        refuse_key(path, "bias", "only \"none\" is supported", err, err_size);
        goto done;
    }
    static const char *const patterns[] = {"rank_pattern", "alpha_pattern"};
    for (size_t i = 0; i < 2; i++) {
        v = json_object_get(root, patterns[i]);
        if (v && !json_is_null(v) && (!json_is_object(v) || json_object_size(v) > 0)) {
            refuse_key(path, patterns[i], "per-module ranks or alphas are not supported", err,
                       err_size);
            goto done;
        }
    }
    v = json_object_get(root, "layer_replication");
    if (v && !json_is_null(v)) {
        refuse_key(path, "layer_replication", "is not supported", err, err_size);
        goto done;
    }
    v = json_object_get(root, "target_parameters");
    if (v && !json_is_null(v)) {
        size_t i;
        json_t *e;
        if (!json_is_array(v)) {
            refuse_key(path, "target_parameters", "must be a list", err, err_size);
            goto done;
        }
        json_array_foreach(v, i, e)
        {
            const char *name = json_string_value(e);
            if (name && ends_with(name, "experts.gate_up_proj"))
                c->gate_up = true;
            else if (name && ends_with(name, "experts.down_proj"))
                c->down = true;
            else {
                refuse_key(path, "target_parameters",
                           "only the routed experts' gate_up_proj and down_proj are read", err,
                           err_size);
                goto done;
            }
        }
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* The part of a MoE layer's experts a fused tensor's module (…mlp.experts or
 * …mlp.experts.base_layer) adapts: PEFT nests gate_up_proj inside down_proj when both
 * are targeted (lora_experts.h); LORA_EXPERT_GATE_UP, LORA_EXPERT_DOWN or -1. Its layer in
 * *layer. */
static int fused_part(const char *module, const struct peft_config *c, int *layer)
{
    int n = 0;
    if (sscanf(module, "model.layers.%d.mlp.%n", layer, &n) != 1 || n == 0) return -1;
    if (strcmp(module + n, "experts.base_layer") == 0)
        return c->gate_up && c->down ? LORA_EXPERT_GATE_UP : -1;
    if (strcmp(module + n, "experts") != 0) return -1;
    if (c->gate_up && c->down) return LORA_EXPERT_DOWN;
    return c->gate_up ? LORA_EXPERT_GATE_UP : c->down ? LORA_EXPERT_DOWN : -1;
}

/* One adapted weight and the factors that fold into it. */
struct fold {
    struct param *w;  /* [out, in] (the gate_up pair: the gate; up next) */
    struct param *up; /* the gate_up pair's up projection, or NULL */
    int expert;       /* the expert of a fused pair, or -1 */
    const struct st_tensor *a, *b;
};

static int bad_shape(const char *path, const struct st_tensor *t, long long d0, long long d1,
                     char *err, size_t err_size)
{
    if (t->rank == 2 && t->shape[0] == d0 && t->shape[1] == d1) return 0;
    snprintf(err, err_size, "%s: tensor '%s' has shape [%lld, %lld], the model needs [%lld, %lld]",
             path, t->name, (long long)t->shape[0], t->rank > 1 ? (long long)t->shape[1] : 0LL, d0,
             d1);
    return -1;
}

/* The folds of one lora_A tensor (and its lora_B), appended to *list; the modules_to_save
 * copies are checked here and put over in apply. */
static int plan_tensor(struct model *m, const struct st_file *f, const struct peft_config *c,
                       const struct st_tensor *t, struct fold **list, int *n, char *err,
                       size_t err_size)
{
    const char *name = t->name;
    if (strncmp(name, PREFIX, strlen(PREFIX)) != 0) {
        snprintf(err, err_size, "%s: tensor '%s' is not a PEFT adapter's (names start with %s)",
                 f->path, name, PREFIX);
        return -1;
    }
    if (ends_with(name, ".lora_B.weight")) { /* with its A */
        char a_name[PARAM_NAME_MAX + 64];
        snprintf(a_name, sizeof a_name, "%.*s.lora_A.weight",
                 (int)(strlen(name) - strlen(".lora_B.weight")), name);
        if (st_file_find(f, a_name)) return 0;
        snprintf(err, err_size, "%s: tensor '%s' has no %s", f->path, name, a_name);
        return -1;
    }
    if (!ends_with(name, ".lora_A.weight")) { /* a modules_to_save copy */
        struct param *p = model_find_param(m, name + strlen(PREFIX));
        if (!p || p->kind == PARAM_LORA) {
            snprintf(err, err_size,
                     "%s: tensor '%s' is neither a LoRA factor nor a tensor of the "
                     "model (%s)",
                     f->path, name, m->cfg.model_type);
            return -1;
        }
        if (t->rank == p->rank && t->shape[0] == p->shape[0] &&
            (p->rank == 1 || t->shape[1] == p->shape[1]))
            return 0;
        snprintf(err, err_size, "%s: tensor '%s' has another shape than the model's %s", f->path,
                 name, p->name);
        return -1;
    }
    char module[PARAM_NAME_MAX + 64], b_name[PARAM_NAME_MAX + 64];
    int len = (int)(strlen(name) - strlen(PREFIX) - strlen(".lora_A.weight"));
    snprintf(module, sizeof module, "%.*s", len, name + strlen(PREFIX));
    snprintf(b_name, sizeof b_name, PREFIX "%s.lora_B.weight", module);
    const struct st_tensor *b = st_file_find(f, b_name);
    if (!b) {
        snprintf(err, err_size, "%s: tensor '%s' has no %s", f->path, name, b_name);
        return -1;
    }
    int layer, part = fused_part(module, c, &layer);
    int r = c->r;
    if (part >= 0) { /* the routed experts' fused pair */
        int E = m->cfg.num_experts;
        struct param *w0 =
            layer >= 0 && layer < m->cfg.num_layers
                ? model_find_expert(m, layer, 0, part == LORA_EXPERT_DOWN ? MLP_DOWN : MLP_GATE)
                : NULL;
        if (!w0 || m->cfg.family == HF_GPT_OSS) {
            snprintf(err, err_size,
                     "%s: tensor '%s': layer %d of the model (%s) has no routed "
                     "experts of the fused form the adapter's target_parameters name",
                     f->path, name, layer, m->cfg.model_type);
            return -1;
        }
        long long out = part == LORA_EXPERT_DOWN ? w0->shape[0] : 2 * w0->shape[0];
        if (bad_shape(f->path, t, (long long)E * r, w0->shape[1], err, err_size) ||
            bad_shape(f->path, b, out, (long long)r * E, err, err_size))
            return -1;
        *list = realloc(*list, (size_t)(*n + E) * sizeof **list);
        if (!*list) fatal(EXIT_RUNTIME, "out of memory (adapter plan)");
        for (int e = 0; e < E; e++) {
            enum mlp_part first = part == LORA_EXPERT_DOWN ? MLP_DOWN : MLP_GATE;
            (*list)[(*n)++] = (struct fold){
                .w = model_find_expert(m, layer, e, first),
                .up = part == LORA_EXPERT_DOWN ? NULL : model_find_expert(m, layer, e, MLP_UP),
                .expert = e,
                .a = t,
                .b = b};
        }
        return 0;
    }
    char weight[PARAM_NAME_MAX + 64];
    snprintf(weight, sizeof weight, "%s.weight", module);
    struct param *w = model_find_param(m, weight);
    if (!w || w->kind == PARAM_LORA || w->rank != 2) {
        snprintf(err, err_size,
                 "%s: tensor '%s' adapts '%s', which is not a linear weight of the "
                 "model (%s)",
                 f->path, name, module, m->cfg.model_type);
        return -1;
    }
    if (bad_shape(f->path, t, r, w->shape[1], err, err_size) ||
        bad_shape(f->path, b, w->shape[0], r, err, err_size))
        return -1;
    *list = realloc(*list, (size_t)(*n + 1) * sizeof **list);
    if (!*list) fatal(EXIT_RUNTIME, "out of memory (adapter plan)");
    (*list)[(*n)++] = (struct fold){.w = w, .expert = -1, .a = t, .b = b};
    return 0;
}

/* rows [row0, row0 + rows) of p (held: fp32 or bf16) += scale B[rows of b from row0] A;
 * b [*, r], a [r, in]. */
static void add_to(struct param *p, const float *b, const float *a, int64_t row0, int64_t rows,
                   int64_t r, float scale)
{
    float *w = p->data;
    if (!w) { /* bf16: widened, added to, rounded again */
        w = xmalloc(p->numel * sizeof(float));
        for (size_t i = 0; i < p->numel; i++) w[i] = st_bf16_to_f32(p->data_bf16[i]);
    }
    lora_fold(w, b + row0 * r, a, rows, p->shape[1], r, scale);
    if (!p->data) {
        st_f32_to_bf16_array(w, p->data_bf16, p->numel);
        free(w);
    }
}

static bool held(const struct param *p)
{
    return p && (p->data || p->data_bf16);
}

/* One fold into the held weights. */
static int apply_fold(struct model *m, const struct fold *f, int r, float scale, char *err,
                      size_t err_size)
{
    if (!held(f->w)) return 0;
    size_t na = (size_t)f->a->numel, nb = (size_t)f->b->numel;
    float *a = xmalloc(na * sizeof(float)), *b = xmalloc(nb * sizeof(float));
    int rc = st_read_f32(f->a, a, na, err, err_size) || st_read_f32(f->b, b, nb, err, err_size);
    if (rc == 0 && f->expert >= 0) { /* A_e rows [e r, e r + r); B_e[o, k] = B[o, k E + e] */
        int64_t E = m->cfg.num_experts, e = f->expert, out = f->b->shape[0];
        float *be = xmalloc((size_t)out * (size_t)r * sizeof(float));
        for (int64_t o = 0; o < out; o++)
            for (int64_t k = 0; k < r; k++) be[o * r + k] = b[o * r * E + k * E + e];
        const float *ae = a + e * r * f->a->shape[1];
        int64_t rows = f->w->shape[0];
        add_to(f->w, be, ae, 0, rows, r, scale);
        if (f->up && held(f->up)) add_to(f->up, be, ae, rows, rows, r, scale);
        free(be);
    } else if (rc == 0) {
        add_to(f->w, b, a, 0, f->w->shape[0], r, scale);
    }
    free(a), free(b);
    return rc ? -1 : 0;
}

int peft_adapter_apply(struct model *m, const char *dir, int *n_tensors, char *err, size_t err_size)
{
    char config_path[4200], weights_path[4200];
    if (path_join(config_path, sizeof config_path, dir, "adapter_config.json", err, err_size) ||
        path_join(weights_path, sizeof weights_path, dir, "adapter_model.safetensors", err,
                  err_size))
        return -1;
    struct peft_config c;
    if (read_config(config_path, &c, err, err_size)) return -1;
    struct st_file *f = st_open(weights_path, err, err_size);
    if (!f) return -1;
    *n_tensors = f->n_tensors;
    struct fold *list = NULL;
    int n = 0, rc = 0;
    if (f->n_tensors == 0) {
        snprintf(err, err_size, "%s: the adapter holds no tensor", weights_path);
        rc = -1;
    }
    for (int i = 0; i < f->n_tensors && rc == 0; i++)
        rc = plan_tensor(m, f, &c, &f->tensors[i], &list, &n, err, err_size);
    float scale = (float)(c.rslora ? c.alpha / sqrt((double)c.r) : c.alpha / c.r);
    for (int i = 0; i < n && rc == 0; i++) rc = apply_fold(m, &list[i], c.r, scale, err, err_size);
    for (int i = 0; i < f->n_tensors && rc == 0; i++) { /* modules_to_save copies */
        const struct st_tensor *t = &f->tensors[i];
        if (strstr(t->name, ".lora_A.") || strstr(t->name, ".lora_B.")) continue;
        struct param *p = model_find_param(m, t->name + strlen(PREFIX));
        if (p->data) rc = st_read_f32(t, p->data, p->numel, err, err_size);
        if (p->data_bf16) {
            float *values = xmalloc(p->numel * sizeof(float));
            rc = st_read_f32(t, values, p->numel, err, err_size);
            if (rc == 0) st_f32_to_bf16_array(values, p->data_bf16, p->numel);
            free(values);
        }
    }
    free(list);
    st_close(f);
    return rc;
}
