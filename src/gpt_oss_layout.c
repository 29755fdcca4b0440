/* gpt_oss_layout: the fuser of gpt_oss's routed experts into transformers' fused tensors
 * (see gpt_oss_layout.h for the layout and its callers). */
#include "gpt_oss_layout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* One layer's fused tensors while its expert tensors arrive. */
struct fused_layer {
    float *gate_up;      /* [E, H, 2I] */
    float *gate_up_bias; /* [E, 2I] */
    float *down;         /* [E, I, H] */
    float *down_bias;    /* [E, H] */
    unsigned char *seen; /* [E * 6]: which of expert e's six tensors arrived */
    int arrived;
    bool done;
    /* sliced: expert e's rows of gate_up_proj [H, 2I] and gate_up_proj_bias [2I] while
     * one of gate and up has arrived (NULL before and after) */
    float **expert_gate_up, **expert_gate_up_bias; /* [E] */
};

struct gpt_oss_fuser {
    int L, E, H, I;
    bool bias; /* cfg.expert_bias: six tensors an expert, else three */
    gpt_oss_fused_sink sink;
    gpt_oss_slice_sink slice_sink; /* sliced: each expert's part handed over alone */
    void *context;
    struct fused_layer *layers; /* [L] */
    float *down_e;              /* sliced: one expert's down_proj [I, H] */
};

struct gpt_oss_fuser *gpt_oss_fuser_new(const struct model_config *cfg, gpt_oss_fused_sink sink,
                                        void *context)
{
    struct gpt_oss_fuser *f = xmalloc(sizeof *f);
    *f = (struct gpt_oss_fuser){.L = cfg->num_layers,
                                .E = cfg->num_experts,
                                .H = cfg->hidden_size,
                                .I = cfg->expert_intermediate_size,
                                .bias = cfg->expert_bias,
                                .sink = sink,
                                .context = context};
    f->layers = xcalloc((size_t)f->L, sizeof *f->layers);
    return f;
}

struct gpt_oss_fuser *gpt_oss_fuser_new_sliced(const struct model_config *cfg,
                                               gpt_oss_slice_sink sink, void *context)
{
    struct gpt_oss_fuser *f = gpt_oss_fuser_new(cfg, NULL, context);
    f->slice_sink = sink;
    return f;
}

static void free_layer(struct gpt_oss_fuser *f, struct fused_layer *layer)
{
    for (int e = 0; layer->expert_gate_up && e < f->E; e++) {
        free(layer->expert_gate_up[e]);
        free(layer->expert_gate_up_bias[e]);
    }
    free(layer->expert_gate_up);
    free(layer->expert_gate_up_bias);
    layer->expert_gate_up = layer->expert_gate_up_bias = NULL;
    free(layer->gate_up);
    free(layer->gate_up_bias);
    free(layer->down);
    free(layer->down_bias);
    free(layer->seen);
    layer->gate_up = layer->gate_up_bias = layer->down = layer->down_bias = NULL;
    layer->seen = NULL;
}

void gpt_oss_fuser_free(struct gpt_oss_fuser *f)
{
    if (!f) return;
    for (int l = 0; l < f->L; l++) free_layer(f, &f->layers[l]);
    free(f->layers);
    free(f->down_e);
    free(f);
}

bool gpt_oss_fuser_takes(const struct gpt_oss_fuser *f, const struct param *p)
{
    return f && p->kind == PARAM_EXPERT && p->layer >= 0 && p->layer < f->L;
}

size_t gpt_oss_fused_numel(const struct model_config *cfg)
{
    size_t E = (size_t)cfg->num_experts, H = (size_t)cfg->hidden_size;
    size_t I = (size_t)cfg->expert_intermediate_size;
    size_t per_layer = E * (3 * H * I + (cfg->expert_bias ? 2 * I + H : 0));
    return per_layer * (size_t)cfg->num_layers;
}

/* gate / up [I, H] -> gate_up_proj[e] [H, 2I], column 2i (gate) or 2i + 1 (up). */
static void place_gate_up(float *gate_up_e, const float *w, size_t I, size_t H, size_t column)
{
    for (size_t i = 0; i < I; i++)
        for (size_t h = 0; h < H; h++) gate_up_e[h * 2 * I + 2 * i + column] = w[i * H + h];
}

/* down [H, I] -> down_proj[e] [I, H]: the transpose. */
static void place_down(float *down_e, const float *w, size_t H, size_t I)
{
    for (size_t h = 0; h < H; h++)
        for (size_t i = 0; i < I; i++) down_e[i * H + h] = w[h * I + i];
}

/* Layer l's fused tensors, in turn, to sink: their values (layer's buffers), or none
 * (layer NULL: the names and shapes only). */
static int each_fused_tensor(const struct gpt_oss_fuser *f, int l, const struct fused_layer *layer,
                             gpt_oss_fused_sink sink, void *context, char *err, size_t err_size)
{
    int64_t E = f->E, H = f->H, I = f->I;
    char name[PARAM_NAME_MAX + 32];
    struct {
        const char *suffix;
        int rank;
        int64_t shape[3];
        const float *data;
    } tensors[4] = {
        {"gate_up_proj", 3, {E, H, 2 * I}, layer ? layer->gate_up : NULL},
        {"down_proj", 3, {E, I, H}, layer ? layer->down : NULL},
        {"gate_up_proj_bias", 2, {E, 2 * I}, layer ? layer->gate_up_bias : NULL},
        {"down_proj_bias", 2, {E, H}, layer ? layer->down_bias : NULL},
    };
    int rc = 0;
    for (int t = 0; t < (f->bias ? 4 : 2) && rc == 0; t++) {
        size_t numel = 1;
        for (int d = 0; d < tensors[t].rank; d++) numel *= (size_t)tensors[t].shape[d];
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%s", l, tensors[t].suffix);
        rc = sink(name, tensors[t].rank, tensors[t].shape, tensors[t].data, numel, context, err,
                  err_size);
    }
    return rc;
}

static int hand_over(struct gpt_oss_fuser *f, int l, char *err, size_t err_size)
{
    struct fused_layer *layer = &f->layers[l];
    int rc = each_fused_tensor(f, l, layer, f->sink, f->context, err, err_size);
    layer->done = true;
    free_layer(f, layer);
    return rc;
}

int gpt_oss_fuser_list(const struct gpt_oss_fuser *f, gpt_oss_fused_sink sink, void *context,
                       char *err, size_t err_size)
{
    for (int l = 0; l < f->L; l++)
        if (each_fused_tensor(f, l, NULL, sink, context, err, err_size) != 0) return -1;
    return 0;
}

/* The sliced fuser's take: expert e's rows of the fused tensors handed over as soon as
 * they are complete (gate_up_proj[e] once both gate and up arrived, down_proj[e] at once,
 * the biases likewise), so no more than one expert's rows are held. */
static int take_slice(struct gpt_oss_fuser *f, const struct param *p, const float *data, int slot,
                      char *err, size_t err_size)
{
    size_t E = (size_t)f->E, H = (size_t)f->H, I = (size_t)f->I, e = (size_t)p->expert;
    struct fused_layer *layer = &f->layers[p->layer];
    if (!layer->seen) {
        layer->seen = xcalloc(E * 6, 1);
        layer->expert_gate_up = xcalloc(E, sizeof(float *));
        layer->expert_gate_up_bias = xcalloc(E, sizeof(float *));
    }
    if (layer->seen[e * 6 + (size_t)slot]) {
        snprintf(err, err_size, "gpt_oss fused layout: tensor %s given twice", p->name);
        return -1;
    }
    layer->seen[e * 6 + (size_t)slot] = 1;
    char name[PARAM_NAME_MAX + 32];
    int rc = 0;
    switch (slot) {
    case 0: /* gate [I, H] */
    case 1: /* up [I, H] */
        if (!layer->expert_gate_up[e])
            layer->expert_gate_up[e] = xmalloc(H * 2 * I * sizeof(float));
        place_gate_up(layer->expert_gate_up[e], data, I, H, (size_t)slot);
        if (layer->seen[e * 6] && layer->seen[e * 6 + 1]) {
            snprintf(name, sizeof name, "model.layers.%d.mlp.experts.gate_up_proj", p->layer);
            rc = f->slice_sink(name, e * H * 2 * I, layer->expert_gate_up[e], H * 2 * I, f->context,
                               err, err_size);
            free(layer->expert_gate_up[e]);
            layer->expert_gate_up[e] = NULL;
        }
        break;
    case 2: /* down [H, I] */
        if (!f->down_e) f->down_e = xmalloc(I * H * sizeof(float));
        place_down(f->down_e, data, H, I);
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.down_proj", p->layer);
        rc = f->slice_sink(name, e * I * H, f->down_e, I * H, f->context, err, err_size);
        break;
    case 3: /* gate bias [I] -> gate_up_proj_bias[e][2i] */
    case 4: /* up bias [I] -> gate_up_proj_bias[e][2i + 1] */
        if (!layer->expert_gate_up_bias[e])
            layer->expert_gate_up_bias[e] = xmalloc(2 * I * sizeof(float));
        for (size_t i = 0; i < I; i++)
            layer->expert_gate_up_bias[e][2 * i + (size_t)(slot - 3)] = data[i];
        if (layer->seen[e * 6 + 3] && layer->seen[e * 6 + 4]) {
            snprintf(name, sizeof name, "model.layers.%d.mlp.experts.gate_up_proj_bias", p->layer);
            rc = f->slice_sink(name, e * 2 * I, layer->expert_gate_up_bias[e], 2 * I, f->context,
                               err, err_size);
            free(layer->expert_gate_up_bias[e]);
            layer->expert_gate_up_bias[e] = NULL;
        }
        break;
    default: /* down bias [H] */
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.down_proj_bias", p->layer);
        rc = f->slice_sink(name, e * H, data, H, f->context, err, err_size);
        break;
    }
    if (++layer->arrived == (int)E * (f->bias ? 6 : 3)) {
        layer->done = true;
        free_layer(f, layer);
    }
    return rc;
}

int gpt_oss_fuser_take(struct gpt_oss_fuser *f, const struct param *p, const float *data, char *err,
                       size_t err_size)
{
    size_t E = (size_t)f->E, H = (size_t)f->H, I = (size_t)f->I, e = (size_t)p->expert;
    struct fused_layer *layer = &f->layers[p->layer];
    bool bias = p->rank == 1;
    int slot = (p->part == MLP_GATE ? 0 : p->part == MLP_UP ? 1 : 2) + (bias ? 3 : 0);
    if (layer->done || p->expert < 0 || e >= E || p->part == MLP_NONE || (bias && !f->bias)) {
        snprintf(err, err_size,
                 "gpt_oss fused layout: tensor %s does not fit layer %d's "
                 "fused experts (given twice, or not an expert tensor)",
                 p->name, p->layer);
        return -1;
    }
    if (f->slice_sink) return take_slice(f, p, data, slot, err, err_size);
    if (!layer->seen) {
        layer->seen = xcalloc(E * 6, 1);
        layer->gate_up = xmalloc(E * H * 2 * I * sizeof(float));
        layer->down = xmalloc(E * I * H * sizeof(float));
        if (f->bias) {
            layer->gate_up_bias = xmalloc(E * 2 * I * sizeof(float));
            layer->down_bias = xmalloc(E * H * sizeof(float));
        }
    }
    if (layer->seen[e * 6 + (size_t)slot]) {
        snprintf(err, err_size, "gpt_oss fused layout: tensor %s given twice", p->name);
        return -1;
    }
    layer->seen[e * 6 + (size_t)slot] = 1;
    switch (slot) {
    case 0: /* gate [I, H] */
    case 1: /* up [I, H] */
        place_gate_up(layer->gate_up + e * H * 2 * I, data, I, H, (size_t)slot);
        break;
    case 2: /* down [H, I] */
        place_down(layer->down + e * I * H, data, H, I);
        break;
    case 3: /* gate bias [I] -> gate_up_proj_bias[e][2i] */
    case 4: /* up bias [I] -> gate_up_proj_bias[e][2i + 1] */
        for (size_t i = 0; i < I; i++)
            layer->gate_up_bias[e * 2 * I + 2 * i + (size_t)(slot - 3)] = data[i];
        break;
    default: /* down bias [H] */
        memcpy(layer->down_bias + e * H, data, H * sizeof(float));
        break;
    }
    if (++layer->arrived == (int)E * (f->bias ? 6 : 3))
        return hand_over(f, p->layer, err, err_size);
    return 0;
}

int gpt_oss_fuser_finish(const struct gpt_oss_fuser *f, char *err, size_t err_size)
{
    for (int l = 0; l < f->L; l++) {
        if (f->layers[l].done) continue;
        snprintf(err, err_size,
                 "gpt_oss fused layout: layer %d's experts are incomplete (%d of "
                 "%d expert tensors arrived)",
                 l, f->layers[l].arrived, f->E * (f->bias ? 6 : 3));
        return -1;
    }
    return 0;
}
