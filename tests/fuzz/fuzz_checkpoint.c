/* fuzz_checkpoint: libFuzzer harness for training checkpoints (src/checkpoint.c,
 * checkpoint_read), read against a tiny qwen3_moe built in memory (the model of
 * tests/test_checkpoint.c: H 8, L 2, E 4, one rank) that trains expert 1 of layer 0 and
 * the final norm under method "esft".
 *
 * The input is not the HDF5 file's bytes: the HDF5 library's own parsing is not compiled
 * with the sanitizers and is not esft's code. It is a script, one byte per decision, that
 * writes a checkpoint through the HDF5 API: for each attribute (format, version,
 * config_hash, method, step, epoch, block, rng, adam_step) and each group (tensors,
 * adam_m, adam_v) and each trainable tensor in it, whether it is written as esft writes
 * it, left out, or written wrong (another type, rank, shape, dataspace, a string, a
 * group or a link in place of a dataset), plus extra entries. Bytes run out as zeros, and
 * 0 means "as esft writes it", so the empty input is a valid checkpoint. checkpoint.h's
 * promise is checked: a refused checkpoint changes nothing (weights, AdamW state,
 * position).
 * Seeds: tests/fuzz/corpus/checkpoint (the valid checkpoint, one seed per way to get
 * each attribute and tensor wrong). */
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "fuzz.h"
#include "hfconfig.h"
#include "layout.h"
#include "model.h"
#include "optim.h"

#define CONFIG_HASH 0x0123456789abcdefULL
#define METHOD "esft"

/* ---- the script -------------------------------------------------------------------- */

struct script {
    const uint8_t *next;
    size_t left;
};

static unsigned next_byte(struct script *s)
{
    if (s->left == 0) return 0;
    s->left--;
    return *s->next++;
}

static uint64_t next_u64(struct script *s)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)next_byte(s) << (8 * i);
    return v;
}

/* A string of 0-47 bytes from the script (may hold NULs; at most out_size - 1). */
static size_t next_text(struct script *s, char *out, size_t out_size)
{
    size_t n = next_byte(s) % 48;
    if (n >= out_size) n = out_size - 1;
    for (size_t i = 0; i < n; i++) out[i] = (char)next_byte(s);
    out[n] = '\0';
    return n;
}

/* ---- the model --------------------------------------------------------------------- */

static struct model model;
static struct adamw opt;
static int n_trainable;
static const struct param *trainable[8];

static void make_model(void)
{
    struct model_config cfg;
    char err[512];
    hfconfig_defaults(HF_QWEN3_MOE, &cfg);
    cfg.hidden_size = 8;
    cfg.num_layers = 2;
    cfg.num_heads = 2;
    cfg.num_kv_heads = 1;
    cfg.head_dim = 4;
    cfg.vocab_size = 11;
    cfg.intermediate_size = 6;
    cfg.expert_intermediate_size = 5;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    fuzz_require(hfconfig_finish(&cfg, "fuzz", err, sizeof err) == 0);
    cfg.hash = CONFIG_HASH;
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    model_create(&model, &cfg, &grid, layout_coords_of(&grid, 0));
    bool *mask = calloc((size_t)model.n_params, sizeof *mask);
    const char *names[] = {"model.layers.0.mlp.experts.1.gate_proj.weight",
                           "model.layers.0.mlp.experts.1.up_proj.weight",
                           "model.layers.0.mlp.experts.1.down_proj.weight", "model.norm.weight"};
    for (int i = 0; i < 4; i++) {
        struct param *p = model_find_param(&model, names[i]);
        fuzz_require(p != NULL);
        mask[p - model.params] = true;
        trainable[n_trainable++] = p;
    }
    model_set_trainable(&model, mask);
    free(mask);
    for (int i = 0; i < n_trainable; i++) opt.n += trainable[i]->numel;
    opt.m = calloc(opt.n, sizeof *opt.m);
    opt.v = calloc(opt.n, sizeof *opt.v);
    fuzz_require(opt.m && opt.v);
}

/* ---- writing the checkpoint the script describes ------------------------------------ */

enum attr_kind { ATTR_STRING, ATTR_INT32, ATTR_INT64, ATTR_UINT64 };

static const struct {
    const char *name;
    enum attr_kind kind;
    int count;
    const char *text;   /* ATTR_STRING */
    uint64_t values[4]; /* the numbers, as esft writes them */
} attributes[] = {
    {"format", ATTR_STRING, 1, "esft-checkpoint", {0}},
    {"version", ATTR_INT32, 1, NULL, {1}},
    {"config_hash", ATTR_UINT64, 1, NULL, {CONFIG_HASH}},
    {"method", ATTR_STRING, 1, METHOD, {0}},
    {"step", ATTR_INT64, 1, NULL, {12}},
    {"epoch", ATTR_INT64, 1, NULL, {1}},
    {"block", ATTR_INT64, 1, NULL, {3}},
    {"rng", ATTR_UINT64, 4, NULL, {1, 2, 3, 4}},
    {"adam_step", ATTR_INT64, 1, NULL, {12}},
};
#define N_ATTRIBUTES (int)(sizeof attributes / sizeof attributes[0])

static void put_attr(hid_t file, const char *name, hid_t type, hid_t space, const void *value)
{
    hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr >= 0 && value) H5Awrite(attr, type, value);
    if (attr >= 0) H5Aclose(attr);
}

static void put_fixed_string(hid_t file, const char *name, const char *text, size_t n)
{
    hid_t type = H5Tcopy(H5T_C_S1), space = H5Screate(H5S_SCALAR);
    H5Tset_size(type, n ? n : 1);
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    put_attr(file, name, type, space, n ? text : "");
    H5Tclose(type);
    H5Sclose(space);
}

static void put_numbers(hid_t file, const char *name, hid_t type, const void *values, int count)
{
    hsize_t dims = (hsize_t)count;
    hid_t space = count == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &dims, NULL);
    put_attr(file, name, type, space, values);
    H5Sclose(space);
}

/* Attribute a with its own type and count: the given numbers, or text for a string. */
static void put_own_type(hid_t file, int a, const uint64_t *numbers, const char *text)
{
    const char *name = attributes[a].name;
    int32_t narrow = (int32_t)numbers[0];
    switch (attributes[a].kind) {
    case ATTR_STRING:
        put_fixed_string(file, name, text, strlen(text));
        break;
    case ATTR_INT32:
        put_numbers(file, name, H5T_NATIVE_INT32, &narrow, 1);
        break;
    case ATTR_INT64:
        put_numbers(file, name, H5T_NATIVE_INT64, numbers, attributes[a].count);
        break;
    case ATTR_UINT64:
        put_numbers(file, name, H5T_NATIVE_UINT64, numbers, attributes[a].count);
    }
}

static void write_attribute(hid_t file, int a, struct script *s)
{
    const char *name = attributes[a].name;
    char text[48];
    uint64_t numbers[8];
    switch (next_byte(s) % 8) {
    case 0: /* as esft writes it */
        put_own_type(file, a, attributes[a].values, attributes[a].text);
        break;
    case 1: /* left out */
        break;
    case 2: /* its own type and count, the value from the script */
        for (int i = 0; i < attributes[a].count; i++) numbers[i] = next_u64(s);
        next_text(s, text, sizeof text);
        put_own_type(file, a, numbers, text);
        break;
    case 3: { /* a fixed-length string */
        size_t n = next_text(s, text, sizeof text);
        put_fixed_string(file, name, text, n);
        break;
    }
    case 4: { /* a variable-length string */
        next_text(s, text, sizeof text);
        const char *values[1] = {text};
        hid_t type = H5Tcopy(H5T_C_S1), space = H5Screate(H5S_SCALAR);
        H5Tset_size(type, H5T_VARIABLE);
        put_attr(file, name, type, space, values);
        H5Tclose(type);
        H5Sclose(space);
        break;
    }
    case 5: { /* 0 to 7 signed numbers */
        int count = (int)(next_byte(s) % 8);
        for (int i = 0; i < count; i++) numbers[i] = next_u64(s);
        hsize_t dims = (hsize_t)count;
        hid_t space = H5Screate_simple(1, &dims, NULL);
        put_attr(file, name, H5T_NATIVE_INT64, space, count ? numbers : NULL);
        H5Sclose(space);
        break;
    }
    case 6: { /* a double */
        uint64_t bits = next_u64(s);
        double value;
        memcpy(&value, &bits, sizeof value);
        put_numbers(file, name, H5T_NATIVE_DOUBLE, &value, 1);
        break;
    }
    default: { /* an empty (null) dataspace */
        hid_t space = H5Screate(H5S_NULL);
        put_attr(file, name, attributes[a].kind == ATTR_STRING ? H5T_NATIVE_INT : H5T_NATIVE_INT64,
                 space, NULL);
        H5Sclose(space);
    }
    }
}

/* values for a tensor's dataset: any floats will do */
static float pattern[64];

static void put_dataset(hid_t group, const char *name, hid_t type, int rank, const hsize_t *dims,
                        bool with_data)
{
    hid_t space = rank < 0    ? H5Screate(H5S_NULL)
                  : rank == 0 ? H5Screate(H5S_SCALAR)
                              : H5Screate_simple(rank, dims, NULL);
    hid_t dset = H5Dcreate2(group, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (dset >= 0 && with_data)
        H5Dwrite(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, pattern);
    if (dset >= 0) H5Dclose(dset);
    H5Sclose(space);
}

static void write_tensor(hid_t group, const char *group_name, const struct param *p,
                         struct script *s)
{
    hsize_t dims[4] = {(hsize_t)p->shape[0], p->rank > 1 ? (hsize_t)p->shape[1] : 1, 1, 1};
    switch (next_byte(s) % 8) {
    case 0: /* as esft writes it */
        put_dataset(group, p->name, H5T_IEEE_F32LE, p->rank, dims, true);
        break;
    case 1: /* left out */
        break;
    case 2: { /* fp32 of a shape from the script (not written: only read once it matches) */
        int rank = (int)(next_byte(s) % 5) - 1;
        for (int d = 0; d < 4; d++) dims[d] = next_byte(s) | (hsize_t)next_byte(s) << 8;
        put_dataset(group, p->name, H5T_IEEE_F32LE, rank, dims, false);
        break;
    }
    case 3: /* integers */
        put_dataset(group, p->name, H5T_STD_I32LE, p->rank, dims, true);
        break;
    case 4: /* fp64 */
        put_dataset(group, p->name, H5T_IEEE_F64BE, p->rank, dims, true);
        break;
    case 5: { /* a group */
        hid_t g = H5Gcreate2(group, p->name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (g >= 0) H5Gclose(g);
        break;
    }
    case 6: /* an empty (null) dataspace */
        put_dataset(group, p->name, H5T_IEEE_F32LE, -1, dims, false);
        break;
    default: { /* a soft link to another trainable tensor of this group, or dangling */
        char target[PARAM_NAME_MAX + 32];
        unsigned which = next_byte(s);
        snprintf(target, sizeof target, "/%s/%s", group_name,
                 which < (unsigned)n_trainable ? trainable[which]->name : "nowhere");
        H5Lcreate_soft(target, group, p->name, H5P_DEFAULT, H5P_DEFAULT);
    }
    }
}

/* Entries the model does not train: a frozen tensor's name or any name. */
static void write_extras(hid_t group, struct script *s)
{
    int count = (int)(next_byte(s) % 4);
    for (int i = 0; i < count; i++) {
        char name[48];
        unsigned which = next_byte(s);
        if (which < (unsigned)model.n_params)
            snprintf(name, sizeof name, "%s", model.params[which].name);
        else
            next_text(s, name, sizeof name);
        hsize_t one = 1;
        if (name[0]) put_dataset(group, name, H5T_IEEE_F32LE, 1, &one, true);
    }
}

static const char *const groups[3] = {"tensors", "adam_m", "adam_v"};

static void write_checkpoint(const char *path, struct script *s)
{
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    fuzz_require(file >= 0);
    for (int a = 0; a < N_ATTRIBUTES; a++) write_attribute(file, a, s);
    for (int g = 0; g < 3; g++) {
        unsigned how = next_byte(s) % 4;
        if (how == 1) continue; /* left out */
        if (how == 2) {         /* a dataset where the group should be */
            put_dataset(file, groups[g], H5T_IEEE_F32LE, 0, NULL, true);
            continue;
        }
        hid_t group = H5Gcreate2(file, groups[g], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        fuzz_require(group >= 0);
        for (int i = 0; i < n_trainable; i++) write_tensor(group, groups[g], trainable[i], s);
        if (how == 3) write_extras(group, s);
        H5Gclose(group);
    }
    H5Fclose(file);
}

/* ---- the harness --------------------------------------------------------------------- */

/* What a refused read must leave as it was. */
struct state {
    float *weights, *m, *v;
    size_t n_weights;
    long long adam_step;
    struct train_position position;
};

static void snapshot(struct state *st, const struct train_position *position)
{
    st->n_weights = 0;
    for (int i = 0; i < n_trainable; i++) {
        memcpy(st->weights + st->n_weights, trainable[i]->data,
               trainable[i]->numel * sizeof(float));
        st->n_weights += trainable[i]->numel;
    }
    memcpy(st->m, opt.m, opt.n * sizeof(float));
    memcpy(st->v, opt.v, opt.n * sizeof(float));
    st->adam_step = opt.step;
    st->position = *position;
}

static bool same_state(const struct state *a, const struct state *b)
{
    return memcmp(a->weights, b->weights, a->n_weights * sizeof(float)) == 0 &&
           memcmp(a->m, b->m, opt.n * sizeof(float)) == 0 &&
           memcmp(a->v, b->v, opt.n * sizeof(float)) == 0 && a->adam_step == b->adam_step &&
           memcmp(&a->position, &b->position, sizeof a->position) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct state before, after;
    static struct train_position position;
    if (!model.params) {
        make_model();
        H5Eset_auto2(H5E_DEFAULT, NULL, NULL); /* the wrong files are meant */
        for (int i = 0; i < 64; i++) pattern[i] = 0.25f * (float)i - 3.0f;
        struct state *both[2] = {&before, &after};
        for (int k = 0; k < 2; k++) {
            both[k]->weights = calloc(opt.n, sizeof(float));
            both[k]->m = calloc(opt.n, sizeof(float));
            both[k]->v = calloc(opt.n, sizeof(float));
        }
    }
    struct script s = {data, size};
    const char *path = fuzz_path("step-00000012.h5");
    write_checkpoint(path, &s);

    char err[2048];
    snapshot(&before, &position);
    int rc = checkpoint_read(path, &model, &opt, &position, METHOD, err, sizeof err);
    snapshot(&after, &position);
    if (rc != 0) {
        if (!same_state(&before, &after)) fprintf(stderr, "refused (%s), but changed\n", err);
        fuzz_require(same_state(&before, &after));
    } else {
        fuzz_require(position.step >= 0 && position.epoch >= 0 && position.block >= 0 &&
                     opt.step >= 0);
    }
    return 0;
}
