/* test_export: the exports (src/export.c) written by the ranks that hold the tensors
 * (st_stream.h, shared), read back by a reader of this file's own and compared with values
 * converted here, independently of esft's safetensors code.
 *
 * Usage: test_export OUT PP EP, under any number of ranks that the layout (pp, dp, ep)
 * of the tiny models fits (2 layers, 4 experts). Writes, under OUT:
 *   adapter/   export_adapter of a tiny qwen3_moe (bf16): experts spread over the EP
 *              ranks and stages, an attention matrix every EP rank holds, a router, the
 *              final norm; with an expert_config, so also the ESFT reference's layout
 *   merged/    export_merged of the same model, in shards of at most 1 KiB
 *   lora/      export_lora_adapter of the tiny model with adapters on the attention
 *              (fp32, a trained router as base_model.model.<name>)
 *   gpt_oss/   export_merged of a tiny gpt_oss: the routed experts fused, as each EP
 *              rank writes its own experts' rows
 *   frozen/    export_merged of a tiny fp32 qwen3_moe loaded with model.frozen_weights
 *              bf16 from base/: the frozen matrices written from the checkpoint's values,
 *              never their bf16 rounding
 * Rank 0 then reads each file: the header's length, padding and JSON; the tensors sorted
 * by name, their data contiguous and the file's size theirs; each tensor's bytes those of
 * its values (element j of tensor i of the parameter table: value(i, j)), rounded to
 * bf16 here (gpt_oss's fused tensors gathered here from the per-expert values); a
 * sharded directory's index naming each tensor's shard. tests/test-export.sh runs it
 * under several layouts and compares the files byte for byte.
 * Under more than one rank, also: a write that fails on rank 1 alone (its file size
 * limit) fails export_merged on every rank with rank 1's message, and leaves no file of
 * the export, under its own name or a temporary one. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <mpi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "check.h"
#include "export.h"
#include "files.h"
#include "hfconfig.h"
#include "layout.h"
#include "log.h"
#include "lora.h"
#include "model.h"
#include "safetensors.h"
#include "tiny_model.h"

static int world_rank, world_size;

/* Element j of tensor i of the parameter table: distinct per tensor and element, and not
 * representable in bf16 (a missed or a double rounding shows). */
static float value(int i, size_t j)
{
    return 0.001f * (float)((i * 131 + (long long)j * 7) % 10007) - 3.0001f;
}

/* fp32 -> bf16, rounded to nearest even: the top 16 bits after adding half of the low
 * 16 bits' range, less one when the kept part is even (the values here are finite). */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- the models -------------------------------------------------------------------- */

/* Every tensor this rank holds in fp32 set to value(); with `trained`, the tensors it
 * names (a NULL-ended list of substrings, or those of kind PARAM_LORA when lora) marked
 * trainable first. */
static void prepare_model(struct model *m, const char *const *trained, bool lora)
{
    bool *mask = xcalloc((size_t)m->n_params, sizeof *mask);
    for (int i = 0; i < m->n_params; i++) {
        mask[i] = lora && m->params[i].kind == PARAM_LORA;
        for (int k = 0; trained && trained[k]; k++)
            mask[i] |= strstr(m->params[i].name, trained[k]) != NULL;
    }
    model_set_trainable(m, mask);
    free(mask);
}

static void fill_values(struct model *m)
{
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        for (size_t j = 0; p->data && j < p->numel; j++) p->data[j] = value(i, j);
    }
}

/* ---- the independent reader -------------------------------------------------------- */

/* The value of element j of the tensor a file names `name`, from the parameter table of
 * the one-rank model `whole`: the name itself (after `prefix`, which the file adds), or
 * one of gpt_oss's fused expert tensors, gathered from the per-expert entries
 * (gpt_oss_layout.h: gate_up_proj[e][h][2i] = gate[i][h], [2i+1] = up[i][h],
 * down_proj[e][i][h] = down[h][i], and the biases alike). false when no entry fits. */
static bool expected(struct model *whole, const char *prefix, const char *name, size_t j,
                     float *out)
{
    char entry[PARAM_NAME_MAX + 64];
    snprintf(entry, sizeof entry, "%s%s", prefix, name);
    struct param *p = model_find_param(whole, entry);
    if (!p && strncmp(name, "base_model.model.", 17) == 0)
        p = model_find_param(whole, name + 17); /* a LoRA adapter's trained router */
    if (p) {
        if (j >= p->numel) return false;
        *out = value((int)(p - whole->params), j);
        return true;
    }
    int layer, n = 0;
    char rest[64];
    if (sscanf(entry, "model.layers.%d.mlp.experts.%63s%n", &layer, rest, &n) != 2) return false;
    size_t H = (size_t)whole->cfg.hidden_size, I = (size_t)whole->cfg.expert_intermediate_size;
    size_t e, at;
    const char *part;
    bool bias = strstr(rest, "_bias") != NULL;
    if (strncmp(rest, "gate_up_proj", 12) == 0) {
        size_t row = bias ? 2 * I : H * 2 * I; /* one expert's values */
        e = j / row;
        size_t h = (j % row) / (2 * I), c = j % (2 * I);
        part = c % 2 == 0 ? "gate_proj" : "up_proj";
        at = bias ? c / 2 : (c / 2) * H + h;
    } else if (strncmp(rest, "down_proj", 9) == 0) {
        size_t row = bias ? H : I * H;
        e = j / row;
        size_t i = (j % row) / H, h = j % H;
        part = "down_proj";
        at = bias ? h : h * I + i;
    } else {
        return false;
    }
    snprintf(entry, sizeof entry, "model.layers.%d.mlp.experts.%zu.%s.%s", layer, e, part,
             bias ? "bias" : "weight");
    p = model_find_param(whole, entry);
    if (!p || at >= p->numel) return false;
    *out = value((int)(p - whole->params), at);
    return true;
}

static unsigned char *read_whole(const char *path, long *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc((size_t)*size + 1);
    if (data && fread(data, 1, (size_t)*size, f) != (size_t)*size) {
        free(data);
        data = NULL;
    }
    fclose(f);
    return data;
}

/* One safetensors file checked against the model's values (dtype "BF16" or "F32", as the
 * export writes them). Its tensors' names are added to `seen` (name -> file name).
 * Returns how many tensors it holds (-1 when it cannot be read). */
static int check_file(const char *path, struct model *whole, const char *prefix, const char *dtype,
                      json_t *seen)
{
    long size = 0;
    unsigned char *data = read_whole(path, &size);
    CHECK(data != NULL && size >= 8, "%s: cannot read", path);
    if (!data || size < 8) {
        free(data);
        return -1;
    }
    uint64_t header = 0;
    for (int i = 0; i < 8; i++) header |= (uint64_t)data[i] << (8 * i);
    CHECK(header % 8 == 0 && 8 + header <= (uint64_t)size, "%s: header length %llu", path,
          (unsigned long long)header);
    if (8 + header > (uint64_t)size) {
        free(data);
        return -1;
    }
    size_t text = header;
    while (text > 0 && data[8 + text - 1] == ' ') text--; /* the padding */
    json_error_t jerr;
    json_t *root = json_loadb((const char *)data + 8, text, JSON_PRESERVE_ORDER, &jerr);
    CHECK(json_is_object(root), "%s: header: %s", path, jerr.text);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    int n = 0;
    uint64_t next = 0; /* where the next tensor's data must start */
    char last[PARAM_NAME_MAX + 64] = "";
    const char *name;
    json_t *entry;
    json_object_foreach(root, name, entry)
    {
        if (strcmp(name, "__metadata__") == 0) {
            const char *format = json_string_value(json_object_get(entry, "format"));
            CHECK(format && strcmp(format, "pt") == 0, "%s: metadata format", path);
            continue;
        }
        n++;
        CHECK(strcmp(last, name) < 0, "%s: %s after %s: not sorted by name", path, name, last);
        snprintf(last, sizeof last, "%s", name);
        json_object_set_new(seen, name, json_string(base));
        const char *t_dtype = json_string_value(json_object_get(entry, "dtype"));
        json_t *shape = json_object_get(entry, "shape"),
               *offsets = json_object_get(entry, "data_offsets");
        uint64_t numel = 1;
        for (size_t d = 0; d < json_array_size(shape); d++)
            numel *= (uint64_t)json_integer_value(json_array_get(shape, d));
        uint64_t begin = (uint64_t)json_integer_value(json_array_get(offsets, 0));
        uint64_t end = (uint64_t)json_integer_value(json_array_get(offsets, 1));
        size_t width = strcmp(dtype, "BF16") == 0 ? 2 : 4;
        CHECK(t_dtype && strcmp(t_dtype, dtype) == 0, "%s: %s: dtype %s, expected %s", path, name,
              t_dtype ? t_dtype : "none", dtype);
        CHECK(begin == next && end == begin + numel * width, "%s: %s: data [%llu, %llu)", path,
              name, (unsigned long long)begin, (unsigned long long)end);
        next = end;
        if (end > (uint64_t)size - 8 - header) break;
        const unsigned char *bytes = data + 8 + header + begin;
        size_t wrong = 0, first_wrong = 0;
        for (size_t j = 0; j < numel; j++) {
            float v = 0;
            bool known = expected(whole, prefix, name, j, &v);
            bool same;
            if (width == 2) {
                uint16_t want = to_bf16(v);
                same = known && bytes[2 * j] == (want & 0xff) && bytes[2 * j + 1] == (want >> 8);
            } else {
                same = known && memcmp(bytes + 4 * j, &v, 4) == 0;
            }
            if (!same && wrong++ == 0) first_wrong = j;
        }
        CHECK(wrong == 0, "%s: %s: %zu of %llu values wrong (the first at %zu)", path, name, wrong,
              (unsigned long long)numel, first_wrong);
    }
    CHECK(8 + header + next == (uint64_t)size, "%s: %ld bytes, the tensors end at %llu", path, size,
          (unsigned long long)(8 + header + next));
    json_decref(root);
    free(data);
    return n;
}

/* The tensors a whole export must hold: the trained ones (trainable_only) or all, less the
 * LoRA adapters of a merged export, less gpt_oss's per-expert entries (fused). */
static int expected_count(const struct model *whole, bool trainable_only)
{
    int n = 0;
    for (int i = 0; i < whole->n_params; i++) {
        const struct param *p = &whole->params[i];
        if (trainable_only ? p->trainable : p->kind != PARAM_LORA) n++;
    }
    if (!trainable_only && whole->cfg.family == HF_GPT_OSS)
        n -= whole->cfg.num_layers * (whole->cfg.num_experts * 6 - 4);
    return n;
}

/* A merged export's directory: one file, or the shards its index names, each tensor in
 * the shard the index says. */
static void check_merged(const char *dir, struct model *whole, const char *dtype)
{
    char path[1400];
    json_t *seen = json_object();
    int total = 0;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_error_t jerr;
    json_t *index = path_exists(path) ? json_load_file(path, 0, &jerr) : NULL;
    if (index) {
        json_t *map = json_object_get(index, "weight_map");
        const char *name;
        json_t *file;
        json_t *files = json_object();
        json_object_foreach(map, name, file)
            json_object_set(files, json_string_value(file), json_true());
        json_object_foreach(files, name, file)
        {
            snprintf(path, sizeof path, "%s/%s", dir, name);
            total += check_file(path, whole, "", dtype, seen);
        }
        json_decref(files);
        CHECK(json_equal(map, seen), "%s: the index's weight_map is not where the tensors are",
              dir);
        json_decref(index);
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        total = check_file(path, whole, "", dtype, seen);
    }
    CHECK(total == expected_count(whole, false), "%s: %d tensors, expected %d", dir, total,
          expected_count(whole, false));
    json_decref(seen);
}

/* ---- the exports ------------------------------------------------------------------- */

/* The model under grid as this rank holds it (m), and the same table on one rank (whole). */
static void make_models(const struct model_config *cfg, const struct layout_grid *grid,
                        const struct lora_spec *spec, struct model *m, struct model *whole)
{
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    if (spec) {
        model_create_lora(m, cfg, grid, layout_coords_of(grid, world_rank), spec, 7);
        model_create_lora(whole, cfg, &one, (struct layout_coords){0, 0, 0}, spec, 7);
    } else {
        model_create(m, cfg, grid, layout_coords_of(grid, world_rank));
        model_create(whole, cfg, &one, (struct layout_coords){0, 0, 0});
    }
    int same = m->n_params == whole->n_params;
    for (int i = 0; same && i < m->n_params; i++)
        same = strcmp(m->params[i].name, whole->params[i].name) == 0;
    CHECK(same, "the parameter table differs from one rank's");
}

static const char *const esft_trained[] = {"layers.0.mlp.experts.1.",
                                           "layers.1.mlp.experts.2.",
                                           "layers.1.mlp.experts.3.",
                                           "layers.0.self_attn.q_proj",
                                           "layers.1.mlp.gate.weight",
                                           "model.norm.weight",
                                           NULL};

static void test_esft(const char *out, const struct layout_grid *grid)
{
    struct model_config cfg;
    tiny_model_config(HF_QWEN3_MOE, HF_DTYPE_BF16, &cfg);
    struct model m, whole;
    make_models(&cfg, grid, NULL, &m, &whole);
    prepare_model(&m, esft_trained, false);
    prepare_model(&whole, esft_trained, false);
    fill_values(&m);
    char dir[1200], path[1300], config[1300], err[2048];
    snprintf(config, sizeof config, "%s/expert_config-source.json", out);
    if (world_rank == 0) {
        FILE *f = fopen(config, "w");
        if (f) fputs("{\"experts\": {\"0\": [1], \"1\": [2, 3]}, \"shared_experts\": false}\n", f);
        if (f) fclose(f);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    snprintf(dir, sizeof dir, "%s/adapter", out);
    int rc = export_adapter(dir, &m, config, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_adapter: %s", err);
    snprintf(dir, sizeof dir, "%s/merged", out);
    rc = export_merged(dir, &m, NULL, 1024, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_merged: %s", err);
    if (world_rank == 0) {
        json_t *seen = json_object();
        int want = expected_count(&whole, true);
        snprintf(path, sizeof path, "%s/adapter/adapter.safetensors", out);
        int n = check_file(path, &whole, "", "BF16", seen);
        CHECK(n == want, "%s: %d tensors, expected %d", path, n, want);
        snprintf(path, sizeof path, "%s/adapter/esft_reference/adapter.safetensors", out);
        n = check_file(path, &whole, "model.", "BF16", seen);
        CHECK(n == want, "%s: %d tensors, expected %d", path, n, want);
        json_decref(seen);
        snprintf(dir, sizeof dir, "%s/merged", out);
        check_merged(dir, &whole, "BF16");
        snprintf(path, sizeof path, "%s/merged/model-00004-of-00004.safetensors", out);
        CHECK(path_exists(path), "the merged export is not in 4 shards (%s)", path);
    }

    /* A write that fails on rank 1 alone: its file size limit below the files' data. */
    if (world_size > 1) {
        snprintf(dir, sizeof dir, "%s/failed", out);
        struct rlimit before;
        getrlimit(RLIMIT_FSIZE, &before);
        void (*handler)(int) = SIG_DFL;
        if (world_rank == 1) {
            handler = signal(SIGXFSZ, SIG_IGN);
            struct rlimit low = {.rlim_cur = 64, .rlim_max = before.rlim_max};
            setrlimit(RLIMIT_FSIZE, &low);
        }
        err[0] = '\0';
        rc = export_merged(dir, &m, NULL, 1024, MPI_COMM_WORLD, err, sizeof err);
        if (world_rank == 1) {
            setrlimit(RLIMIT_FSIZE, &before);
            signal(SIGXFSZ, handler);
        }
        CHECK(rc != 0 && strstr(err, "rank 1: ") && strstr(err, strerror(EFBIG)),
              "a write failing on rank 1: status %d, '%s'", rc, err);
        MPI_Barrier(MPI_COMM_WORLD);
        DIR *d = world_rank == 0 ? opendir(dir) : NULL;
        struct dirent *entry;
        while (d && (entry = readdir(d)))
            CHECK(entry->d_name[0] == '.', "a failed export left %s/%s", dir, entry->d_name);
        if (d) closedir(d);
    }
    model_free(&m);
    model_free(&whole);
}

static void test_lora(const char *out, const struct layout_grid *grid)
{
    struct model_config cfg;
    tiny_model_config(HF_QWEN3_MOE, HF_DTYPE_BF16, &cfg);
    char err[2048], dir[1200], path[1300];
    char *targets[] = {"attention"};
    struct lora_spec spec = {.r = 2, .alpha = 4, .train_router = true};
    CHECK(lora_parse_targets(targets, 1, &spec.targets, &spec.experts, err, sizeof err) == 0, "%s",
          err);
    struct model m, whole;
    make_models(&cfg, grid, &spec, &m, &whole);
    const char *const router[] = {"layers.0.mlp.gate.weight", NULL};
    prepare_model(&m, router, true);
    prepare_model(&whole, router, true);
    fill_values(&m);
    snprintf(dir, sizeof dir, "%s/lora", out);
    int rc = export_lora_adapter(dir, &m, &spec, "tiny-base", MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_lora_adapter: %s", err);
    if (world_rank == 0) {
        json_t *seen = json_object();
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        int n = check_file(path, &whole, "", "F32", seen), want = expected_count(&whole, true);
        CHECK(n == want && want == 2 * 4 * 2 + 1, "%s: %d tensors, expected %d", path, n, want);
        CHECK(json_object_get(seen, "base_model.model.model.layers.0.mlp.gate.weight") != NULL,
              "%s: the router is not under base_model.model.", path);
        json_decref(seen);
    }
    model_free(&m);
    model_free(&whole);
}

static void test_gpt_oss(const char *out, const struct layout_grid *grid)
{
    struct model_config cfg;
    tiny_model_config(HF_GPT_OSS, HF_DTYPE_BF16, &cfg);
    struct model m, whole;
    make_models(&cfg, grid, NULL, &m, &whole);
    prepare_model(&m, NULL, false);
    prepare_model(&whole, NULL, false);
    fill_values(&m);
    char dir[1200], err[2048];
    snprintf(dir, sizeof dir, "%s/gpt_oss", out);
    int rc = export_merged(dir, &m, NULL, 0, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_merged (gpt_oss): %s", err);
    if (world_rank == 0) check_merged(dir, &whole, "BF16");
    model_free(&m);
    model_free(&whole);
}

static void test_frozen_bf16(const char *out, const struct layout_grid *grid)
{
    struct model_config cfg;
    tiny_model_config(HF_QWEN3_MOE, HF_DTYPE_F32, &cfg);
    struct model m, whole;
    make_models(&cfg, grid, NULL, &m, &whole);
    const char *const trained[] = {"layers.1.mlp.experts.2.", NULL};
    char base[1200], dir[1200], err[2048];
    snprintf(base, sizeof base, "%s/base", out);
    /* the base checkpoint, value() in fp32 */
    int rc = 0;
    if (world_rank == 0) {
        prepare_model(&whole, NULL, false);
        fill_values(&whole);
        struct st_writer *w = st_writer_new();
        for (int i = 0; i < whole.n_params && rc == 0; i++) {
            const struct param *p = &whole.params[i];
            rc = st_writer_add(w, p->name, ST_F32, p->rank, p->shape, p->data, err, sizeof err);
        }
        if (rc == 0 && make_directories(base) != 0) rc = -1;
        if (rc == 0) rc = st_writer_write_checkpoint(w, base, 0, err, sizeof err);
        st_writer_free(w);
        CHECK(rc == 0, "the base checkpoint: %s", err);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    prepare_model(&m, trained, false);
    model_store_frozen_bf16(&m);
    rc = model_load(&m, base, err, sizeof err);
    CHECK(rc == 0, "model_load: %s", err);
    int held_bf16 = 0;
    for (int i = 0; i < m.n_params; i++) held_bf16 += m.params[i].data_bf16 != NULL;
    int any = 0;
    MPI_Allreduce(&held_bf16, &any, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    CHECK(any > 0, "no tensor is held as bf16");
    snprintf(dir, sizeof dir, "%s/frozen", out);
    rc = export_merged(dir, &m, NULL, 0, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_merged (bf16 frozen weights): %s", err);
    if (world_rank == 0) check_merged(dir, &whole, "F32");
    model_free(&m);
    model_free(&whole);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    log_init(world_rank, world_size);
    if (argc != 4) {
        if (world_rank == 0) fprintf(stderr, "usage: test_export OUT PP EP\n");
        MPI_Finalize();
        return 2;
    }
    struct layout_model fits = {.num_layers = 2, .num_experts = 4};
    struct layout_grid grid;
    char err[1024];
    if (layout_grid_make(world_size, atoi(argv[2]), atoi(argv[3]), &fits, &grid, err, sizeof err) !=
        0) {
        if (world_rank == 0) fprintf(stderr, "test_export: %s\n", err);
        MPI_Finalize();
        return 2;
    }
    const char *out = argv[1];
    if (world_rank == 0 && make_directories(out) != 0) {
        fprintf(stderr, "test_export: %s: %s\n", out, strerror(errno));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    test_esft(out, &grid);
    test_lora(out, &grid);
    test_gpt_oss(out, &grid);
    test_frozen_bf16(out, &grid);
    char name[64];
    snprintf(name, sizeof name, "test_export (rank %d of %d)", world_rank, world_size);
    int status = check_done(name);
    MPI_Finalize();
    return status;
}
