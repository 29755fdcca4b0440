/* test_model_load: loading checkpoints into the model, good and bad.
 *
 * From deepseek_v3_fp8 (fp8 weights in blocks of [8, 24] with their weight_scale_inv):
 * every dequantised weight equal bit for bit to the generator's dequantized.<name>, and a
 * missing scale, a scale grid of the wrong shape, another block size in config.json, fp8
 * without quantization_config, an unknown quant_method and an fp8 norm each refused by name.
 *
 * From the qwen3_moe golden fixture the test writes variants into a temporary directory
 * and loads each as the program does (hfconfig_load + model_check_checkpoint +
 * model_create + model_load):
 *   - experts in the fused spelling (experts.gate_up_proj [E, 2I, H], down_proj
 *     [E, H, I]) must load and give bit-identical logits to the per-expert original;
 *   - a missing tensor, a config whose sizes disagree with the tensors, a truncated
 *     file and an unsupported family must each fail with a message naming the file and
 *     the tensor or key.
 * From the gpt_oss fixture (transformers' fused experts in bf16): esft's fused writer
 * (gpt_oss_layout.h) gives back transformers' own four tensors of every layer bit for bit,
 * and the written checkpoint loads back into every tensor of the original, biases included.
 * Usage: test_model_load [GOLDEN_DIR]
 *        test_model_load drop SRC DST NAME   (for the shell tests: a copy of checkpoint
 *        SRC in the new directory DST, one file, without tensor NAME) */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "check.h"
#include "hfconfig.h"
#include "log.h"
#include "gpt_oss_layout.h"
#include "model.h"
#include "safetensors.h"
#include "st_stream.h"

static char tmp[256];

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = xmalloc((size_t)n + 1);
    size_t got = fread(text, 1, (size_t)n, f);
    text[got] = '\0';
    fclose(f);
    return text;
}

/* text with its one occurrence of `from` replaced by `to` (a new string). */
static char *replaced(const char *text, const char *from, const char *to)
{
    const char *at = strstr(text, from);
    CHECK(at != NULL, "'%s' not in the fixture's config", from);
    if (!at) return xstrdup(text);
    char *out = xmalloc(strlen(text) + strlen(to) + 1);
    size_t head = (size_t)(at - text);
    memcpy(out, text, head);
    strcpy(out + head, to);
    strcat(out, at + strlen(from));
    return out;
}

/* A new directory under tmp holding config text and the given writer's tensors. */
static void make_variant(const char *name, const char *config, struct st_writer *w, char *dir)
{
    snprintf(dir, 512, "%s/%s", tmp, name);
    mkdir(dir, 0777);
    write_text(dir, "config.json", config);
    char err[512];
    if (w) CHECK(st_writer_write_checkpoint(w, dir, 0, err, sizeof err) == 0, "%s", err);
}

/* Loads dir; returns 0 and fills logits[N*V] on success, else -1 with err. */
static int load_and_run(const char *dir, float *logits, char *err, size_t err_size)
{
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, err_size) != 0) return -1;
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    if (model_check_checkpoint(&cfg, &grid, (struct layout_coords){0, 0, 0}, dir, err, err_size))
        return -1;
    struct model model;
    model_create(&model, &cfg, &grid, (struct layout_coords){0, 0, 0});
    if (model_load(&model, dir, err, err_size) != 0) {
        model_free(&model);
        return -1;
    }
    enum { N = 9 };
    int32_t tokens[N] = {3, 14, 15, 92, 65, 35, 89, 79, 32};
    int32_t positions[N], starts[N];
    for (int i = 0; i < N; i++) positions[i] = i, starts[i] = 0;
    struct forward_workspace *ws = forward_workspace_new(&model, N);
    struct batch batch = {.N = N, .tokens = tokens, .positions = positions, .sample_start = starts};
    struct forward_result result;
    model_forward(&model, backend_cpu(), ws, &batch, &result);
    memcpy(logits, result.logits, sizeof(float) * N * (size_t)cfg.vocab_size);
    forward_workspace_free(ws);
    model_free(&model);
    return 0;
}

static void expect_failure(const char *dir, const char *what, const char *needle1,
                           const char *needle2)
{
    static float logits[9 * 1024];
    char err[1024] = "";
    int rc = load_and_run(dir, logits, err, sizeof err);
    CHECK(rc != 0, "%s: loaded without error", what);
    CHECK(strstr(err, needle1) != NULL, "%s: message '%s' lacks '%s'", what, err, needle1);
    if (needle2) CHECK(strstr(err, needle2) != NULL, "%s: message '%s' lacks '%s'", what, err, needle2);
    printf("%s: %s\n", what, err);
}

/* The checkpoint at src copied to dst (config.json and every tensor but `dropped`). */
static int drop_tensor(const char *src, const char *dst, const char *dropped)
{
    char err[1024], path[600];
    snprintf(path, sizeof path, "%s/config.json", src);
    char *config = read_text(path);
    struct st_checkpoint *ckpt = st_checkpoint_open(src, err, sizeof err);
    if (!config || !ckpt || mkdir(dst, 0777) != 0) {
        fprintf(stderr, "test_model_load drop: cannot copy %s to %s: %s\n", src, dst,
                ckpt ? "no config.json, or the copy exists" : err);
        return 1;
    }
    write_text(dst, "config.json", config);
    struct st_writer *w = st_writer_new();
    int found = 0, rc = 0;
    for (int i = 0; i < ckpt->n_tensors && rc == 0; i++) {
        const struct st_tensor *t = &ckpt->tensors[i];
        if (strcmp(t->name, dropped) == 0)
            found = 1;
        else
            rc = st_writer_add(w, t->name, t->dtype, t->rank, t->shape, t->data, err, sizeof err);
    }
    if (rc == 0) rc = st_writer_write_checkpoint(w, dst, 0, err, sizeof err);
    if (rc == 0 && !found) snprintf(err, sizeof err, "%s has no tensor '%s'", src, dropped);
    if (rc != 0 || !found) fprintf(stderr, "test_model_load drop: %s\n", err);
    st_writer_free(w);
    st_checkpoint_close(ckpt);
    free(config);
    return rc != 0 || !found;
}

/* ---- fp8 block-quantised checkpoints (the deepseek_v3_fp8 fixture) --------------------- */

/* hfconfig_load + model_check_checkpoint + model_create + model_load, no forward (the MLA
 * forward is not needed to check the weights). */
static int load_weights(const char *dir, struct model *model, char *err, size_t err_size)
{
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, err_size) != 0) return -1;
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    if (model_check_checkpoint(&cfg, &grid, (struct layout_coords){0, 0, 0}, dir, err, err_size))
        return -1;
    model_create(model, &cfg, &grid, (struct layout_coords){0, 0, 0});
    if (model_load(model, dir, err, err_size) == 0) return 0;
    model_free(model);
    return -1;
}

/* A variant of ckpt in tmp/name with config text: every tensor but `dropped` (may be NULL),
 * plus `added` (may be NULL) in its place. */
static void fp8_variant(const char *name, const char *config, const struct st_checkpoint *ckpt,
                        const char *dropped, const char *added, enum st_dtype dtype, int rank,
                        const int64_t *shape, const void *data, char *dir)
{
    char err[512];
    struct st_writer *w = st_writer_new();
    for (int i = 0; i < ckpt->n_tensors; i++) {
        const struct st_tensor *t = &ckpt->tensors[i];
        if (!dropped || strcmp(t->name, dropped) != 0)
            CHECK(st_writer_add(w, t->name, t->dtype, t->rank, t->shape, t->data, err, sizeof err) == 0,
                  "%s", err);
    }
    if (added) CHECK(st_writer_add(w, added, dtype, rank, shape, data, err, sizeof err) == 0, "%s", err);
    make_variant(name, config, w, dir);
    st_writer_free(w);
}

static void test_fp8(const char *golden)
{
    char fixture[512], base[512], path[600], err[1024];
    snprintf(fixture, sizeof fixture, "%s/deepseek_v3_fp8", golden);
    snprintf(base, sizeof base, "%s/deepseek_v3", golden);

    /* Every quantised weight bit for bit as the generator's dequantisation (q * scale in
     * fp32, partial edge blocks, one bf16 scale), every other one as the fp32 original. */
    struct model m;
    int rc = load_weights(fixture, &m, err, sizeof err);
    CHECK(rc == 0, "deepseek_v3_fp8: %s", err);
    snprintf(path, sizeof path, "%s/dequantized.safetensors", fixture);
    struct st_file *reference = st_open(path, err, sizeof err);
    CHECK(reference != NULL, "%s", err);
    struct st_checkpoint *original = st_checkpoint_open(base, err, sizeof err);
    CHECK(original != NULL, "%s", err);
    if (rc != 0 || !reference || !original) return;
    int quantised = 0, plain = 0, differ = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        char name[PARAM_NAME_MAX + 16];
        snprintf(name, sizeof name, "dequantized.%s", p->name);
        const struct st_tensor *t = st_file_find(reference, name);
        if (t)
            quantised++;
        else
            t = st_find(original, p->name), plain++;
        float *want = xmalloc(p->numel * sizeof(float));
        CHECK(t && st_read_f32(t, want, p->numel, err, sizeof err) == 0, "%s: %s", p->name, err);
        if (t && memcmp(want, p->data, p->numel * sizeof(float)) != 0) {
            size_t k = 0;
            while (memcmp(&want[k], &p->data[k], sizeof(float)) == 0) k++;
            if (differ++ < 5)
                CHECK(0, "%s[%zu]: loaded %.9g, reference %.9g", p->name, k, p->data[k], want[k]);
        }
        free(want);
    }
    CHECK(differ == 0, "deepseek_v3_fp8: %d tensors differ from the reference", differ);
    CHECK(quantised == 72 && quantised == reference->n_tensors,
          "deepseek_v3_fp8: %d dequantised tensors compared, the reference has %d", quantised,
          reference->n_tensors);
    printf("deepseek_v3_fp8: %d fp8 tensors dequantised bit for bit, %d float tensors as stored\n",
           quantised, plain);
    model_free(&m);
    st_close(reference);
    st_checkpoint_close(original);

    struct st_checkpoint *ckpt = st_checkpoint_open(fixture, err, sizeof err);
    snprintf(path, sizeof path, "%s/config.json", fixture);
    char *config = read_text(path);
    CHECK(ckpt && config, "%s", err);
    if (!ckpt || !config) return;
    char dir[512];

    /* a weight without its scale */
    const char *scale = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv";
    fp8_variant("fp8-no-scale", config, ckpt, scale, NULL, ST_F32, 0, NULL, NULL, dir);
    expect_failure(dir, "fp8 weight without its scale", "'model.layers.1.mlp.experts.5.up_proj.weight'",
                   "its scale 'model.layers.1.mlp.experts.5.up_proj.weight_scale_inv' is not in");

    /* a scale grid of the wrong shape: kv_a_proj_with_mqa [20, 36] in blocks [8, 24] has
     * [3, 2] blocks */
    static const float ones[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    scale = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv";
    fp8_variant("fp8-scale-shape", config, ckpt, scale, scale, ST_F32, 2, (int64_t[]){3, 1}, ones, dir);
    expect_failure(dir, "fp8 scale of the wrong shape", scale,
                   "expected shape [3, 2], got [3, 1] (one scale per block of "
                   "model.layers.0.self_attn.kv_a_proj_with_mqa.weight [20, 36] in blocks of [8, 24]");

    /* the config's block size is the one used: [8, 16] makes the same scales wrong */
    char *other_block = replaced(config, "      24\n", "      16\n");
    make_variant("fp8-block", other_block, NULL, dir);
    char target[600], link_path[600];
    snprintf(target, sizeof target, "%s/model.safetensors", fixture);
    snprintf(link_path, sizeof link_path, "%s/model.safetensors", dir);
    if (target[0] != '/') {
        char cwd[400];
        CHECK(getcwd(cwd, sizeof cwd) != NULL, "getcwd");
        snprintf(target, sizeof target, "%s/%s/model.safetensors", cwd, fixture);
    }
    CHECK(symlink(target, link_path) == 0, "symlink %s", link_path);
    expect_failure(dir, "fp8 scales for another block size", "in blocks of [8, 16]",
                   "weight_block_size");
    free(other_block);

    /* fp8 weights under a config without quantization_config */
    char *unquantised = replaced(config, "\"quantization_config\"", "\"quantization_config_not\"");
    make_variant("fp8-no-config", unquantised, NULL, dir);
    snprintf(link_path, sizeof link_path, "%s/model.safetensors", dir);
    CHECK(symlink(target, link_path) == 0, "symlink %s", link_path);
    expect_failure(dir, "fp8 weights, no quantization_config", "is F8_E4M3 (fp8)",
                   "has no quantization_config");
    free(unquantised);

    /* a quantisation esft does not read */
    char *awq = replaced(config, "\"quant_method\": \"fp8\"", "\"quant_method\": \"awq\"");
    make_variant("fp8-awq", awq, NULL, dir);
    expect_failure(dir, "unknown quant_method", "quantization_config.quant_method", "'awq' is not supported");
    free(awq);

    /* an fp8 norm (DeepSeek-V3 keeps norms, the router, embedding and lm_head in bf16) */
    uint8_t q[36];
    memset(q, 0x38, sizeof q); /* 1.0 */
    const char *norm = "model.layers.1.input_layernorm.weight";
    fp8_variant("fp8-norm", config, ckpt, norm, norm, ST_F8_E4M3, 1, (int64_t[]){36}, q, dir);
    expect_failure(dir, "fp8 norm", norm, "where esft needs a float weight");

    free(config);
    st_checkpoint_close(ckpt);
}

/* ---- MXFP4 experts (the gpt_oss_mxfp4 fixture) ------------------------------------------ */

/* Every routed expert matrix bit for bit as transformers' dequantisation (the fixture's
 * dequantized.safetensors: gate_up_proj [E, H, 2I] and down_proj [E, I, H] after its
 * transpose, bf16), read back into esft's layout (gate[i][h] = gate_up_proj[e][h][2i], up
 * the odd columns, down[h][i] = down_proj[e][i][h]); then malformed MXFP4 tensors, each
 * with an error naming the file, the tensor and what is wrong. */
static void test_mxfp4(const char *golden)
{
    char fixture[512], path[600], err[1024];
    snprintf(fixture, sizeof fixture, "%s/gpt_oss_mxfp4", golden);
    struct model m;
    int rc = load_weights(fixture, &m, err, sizeof err);
    CHECK(rc == 0, "gpt_oss_mxfp4: %s", err);
    snprintf(path, sizeof path, "%s/dequantized.safetensors", fixture);
    struct st_file *reference = st_open(path, err, sizeof err);
    CHECK(reference != NULL, "%s", err);
    if (rc != 0 || !reference) return;
    size_t E = (size_t)m.cfg.num_experts, I = (size_t)m.cfg.expert_intermediate_size;
    size_t H = (size_t)m.cfg.hidden_size;
    int compared = 0, differ = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        if (p->kind != PARAM_EXPERT || p->rank != 2) continue;
        bool down = p->part == MLP_DOWN;
        char name[PARAM_NAME_MAX + 64];
        snprintf(name, sizeof name, "dequantized.model.layers.%d.mlp.experts.%s", p->layer,
                 down ? "down_proj" : "gate_up_proj");
        const struct st_tensor *t = st_file_find(reference, name);
        size_t total = E * I * H * (down ? 1 : 2), e = (size_t)p->expert;
        CHECK(t && (size_t)t->numel == total, "%s missing from the reference", name);
        if (!t || (size_t)t->numel != total) continue;
        float *all = xmalloc(total * sizeof(float));
        CHECK(st_read_f32(t, all, total, err, sizeof err) == 0, "%s", err);
        for (size_t j = 0; j < p->numel; j++) {
            size_t r = j / (down ? I : H), c = j % (down ? I : H);
            float want = down ? all[(e * I + c) * H + r]
                              : all[(e * H + c) * 2 * I + 2 * r + (p->part == MLP_UP)];
            if (memcmp(&want, &p->data[j], sizeof want) != 0 && differ++ < 5)
                CHECK(0, "%s[%zu]: loaded %.9g, transformers %.9g", p->name, j, p->data[j], want);
        }
        compared++;
        free(all);
    }
    CHECK(differ == 0, "gpt_oss_mxfp4: %d values differ from transformers' dequantisation", differ);
    CHECK(compared == m.cfg.num_layers * m.cfg.num_experts * 3,
          "gpt_oss_mxfp4: %d expert matrices compared", compared);
    printf("gpt_oss_mxfp4: %d MXFP4 expert matrices dequantised bit for bit\n", compared);
    model_free(&m);
    st_close(reference);

    struct st_checkpoint *ckpt = st_checkpoint_open(fixture, err, sizeof err);
    snprintf(path, sizeof path, "%s/config.json", fixture);
    char *config = read_text(path);
    CHECK(ckpt && config, "%s", err);
    if (!ckpt || !config) return;
    char dir[512];
    uint8_t *zeros = xcalloc(E * 2 * I * H, 1);

    /* scales of the wrong shape: one exponent per row where there are H / 32 = 2 blocks */
    const char *scales = "model.layers.0.mlp.experts.gate_up_proj_scales";
    fp8_variant("mxfp4-scales-shape", config, ckpt, scales, scales, ST_U8, 3,
                (int64_t[]){(int64_t)E, 2 * (int64_t)I, 1}, zeros, dir);
    expect_failure(dir, "MXFP4 scales of the wrong shape", scales,
                   "expected shape [8, 64, 2], got [8, 64, 1]");

    /* blocks truncated: 8 bytes a block (16 values) where MXFP4 packs 32 in 16 */
    const char *blocks = "model.layers.2.mlp.experts.down_proj_blocks";
    fp8_variant("mxfp4-blocks-truncated", config, ckpt, blocks, blocks, ST_U8, 4,
                (int64_t[]){(int64_t)E, (int64_t)H, (int64_t)I / 32, 8}, zeros, dir);
    expect_failure(dir, "MXFP4 blocks truncated", blocks, "expected shape [8, 64, 1, 16], got [8, 64, 1, 8]");

    /* blocks of another shape: the matrix of another expert width */
    fp8_variant("mxfp4-blocks-shape", config, ckpt, blocks, blocks, ST_U8, 4,
                (int64_t[]){(int64_t)E, (int64_t)H, 2, 16}, zeros, dir);
    expect_failure(dir, "MXFP4 blocks of the wrong shape", "model.safetensors: tensor '" "model.layers.2.mlp.experts.down_proj_blocks'",
                   "num_local_experts x hidden_size x intermediate_size");

    /* blocks without their scales */
    scales = "model.layers.1.mlp.experts.down_proj_scales";
    fp8_variant("mxfp4-no-scales", config, ckpt, scales, NULL, ST_U8, 0, NULL, NULL, dir);
    expect_failure(dir, "MXFP4 blocks without scales",
                   "MXFP4 tensor 'model.layers.1.mlp.experts.down_proj_scales' not found", "_blocks and _scales");

    /* blocks in another dtype */
    blocks = "model.layers.1.mlp.experts.gate_up_proj_blocks";
    fp8_variant("mxfp4-blocks-dtype", config, ckpt, blocks, blocks, ST_I8, 4,
                (int64_t[]){(int64_t)E, 2 * (int64_t)I, (int64_t)H / 32, 16}, zeros, dir);
    expect_failure(dir, "MXFP4 blocks of dtype I8", blocks, "dtype I8; MXFP4 blocks are U8");

    /* MXFP4 tensors under a config that does not say so */
    char *plain = replaced(config, "\"quantization_config\"", "\"quantization_config_not\"");
    fp8_variant("mxfp4-no-config", plain, ckpt, NULL, NULL, ST_U8, 0, NULL, NULL, dir);
    expect_failure(dir, "MXFP4 tensors, no quantization_config", "gate_up_proj_blocks' is MXFP4",
                   "no quantization_config with quant_method \"mxfp4\"");
    free(plain);
    free(zeros);
    free(config);
    st_checkpoint_close(ckpt);
}

/* The fuser's sink of the gpt_oss test: the fused tensor in bf16 into the writer. */
struct fused_out {
    struct st_writer *writer;
    uint16_t *copies;
    size_t used;
};

static int add_fused_bf16(const char *name, int rank, const int64_t *shape, const float *data,
                          size_t numel, void *context, char *err, size_t err_size)
{
    struct fused_out *out = context;
    uint16_t *copy = out->copies + out->used;
    out->used += numel;
    st_f32_to_bf16_array(data, copy, numel);
    return st_writer_add(out->writer, name, ST_BF16, rank, shape, copy, err, err_size);
}

/* The sliced fuser's sinks of the gpt_oss test: the fused tensors declared, then each
 * expert's part written at its place (bf16), as the merged export does. */
static int declare_fused_bf16(const char *name, int rank, const int64_t *shape, const float *data,
                              size_t numel, void *context, char *err, size_t err_size)
{
    (void)data;
    (void)numel;
    return st_stream_declare(context, name, ST_BF16, rank, shape, err, err_size);
}

static int write_slice_bf16(const char *name, size_t first, const float *data, size_t count,
                            void *context, char *err, size_t err_size)
{
    return st_stream_write_f32(context, name, first, data, count, err, err_size);
}

/* gpt_oss: the per-expert tensors, given in reverse order (an expert's up before its
 * gate), through the sliced fuser into a stream: the fused tensors are transformers'
 * bytes. */
static void test_gpt_oss_sliced_writer(const char *golden)
{
    char fixture[512], path[600], err[1024];
    snprintf(fixture, sizeof fixture, "%s/gpt_oss", golden);
    struct model a;
    if (load_weights(fixture, &a, err, sizeof err) != 0) {
        CHECK(0, "gpt_oss fixture: %s", err);
        return;
    }
    struct st_stream *s = st_stream_new();
    struct gpt_oss_fuser *fuser = gpt_oss_fuser_new_sliced(&a.cfg, write_slice_bf16, s);
    int rc = 0;
    for (int i = 0; i < a.n_params && rc == 0; i++) {
        const struct param *p = &a.params[i];
        if (!gpt_oss_fuser_takes(fuser, p))
            rc = st_stream_declare(s, p->name, ST_BF16, p->rank, p->shape, err, sizeof err);
    }
    if (rc == 0) rc = gpt_oss_fuser_list(fuser, declare_fused_bf16, s, err, sizeof err);
    snprintf(path, sizeof path, "%s/gpt_oss_sliced.safetensors", tmp);
    if (rc == 0) rc = st_stream_open_file(s, path, 1, err, sizeof err);
    for (int i = a.n_params - 1; i >= 0 && rc == 0; i--) {
        const struct param *p = &a.params[i];
        rc = gpt_oss_fuser_takes(fuser, p)
                 ? gpt_oss_fuser_take(fuser, p, p->data, err, sizeof err)
                 : st_stream_write_f32(s, p->name, 0, p->data, (size_t)p->numel, err, sizeof err);
    }
    CHECK(rc == 0 && gpt_oss_fuser_finish(fuser, err, sizeof err) == 0 &&
              st_stream_finish(s, err, sizeof err) == 0,
          "gpt_oss sliced fuse: %s", err);
    gpt_oss_fuser_free(fuser);
    st_stream_free(s);
    struct st_checkpoint *theirs = st_checkpoint_open(fixture, err, sizeof err);
    struct st_file *ours = st_open(path, err, sizeof err);
    CHECK(theirs && ours, "%s", err);
    int compared = 0;
    for (int l = 0; theirs && ours && l < a.cfg.num_layers; l++) {
        static const char *const fused[] = {"gate_up_proj", "gate_up_proj_bias", "down_proj",
                                            "down_proj_bias"};
        for (int t = 0; t < 4; t++) {
            char name[128];
            snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%s", l, fused[t]);
            const struct st_tensor *x = st_find(theirs, name), *y = st_file_find(ours, name);
            CHECK(x && y && x->dtype == y->dtype && x->nbytes == y->nbytes &&
                      memcmp(x->data, y->data, x->nbytes) == 0,
                  "gpt_oss sliced: %s differs from transformers'", name);
            compared++;
        }
    }
    CHECK(compared == 4 * a.cfg.num_layers, "gpt_oss sliced: %d fused tensors compared", compared);
    if (theirs) st_checkpoint_close(theirs);
    if (ours) st_close(ours);
    model_free(&a);
}

/* gpt_oss: load the fixture, write its per-expert tensors through the fuser in bf16 (its
 * dtype), compare the fused tensors with transformers' bytes, then load the written
 * checkpoint and compare every tensor with the first load. */
static void test_gpt_oss_fused_writer(const char *golden)
{
    char fixture[512], dir[600], err[1024];
    snprintf(fixture, sizeof fixture, "%s/gpt_oss", golden);
    struct model a, b;
    if (load_weights(fixture, &a, err, sizeof err) != 0) {
        CHECK(0, "gpt_oss fixture: %s", err);
        return;
    }
    struct fused_out out = {.writer = st_writer_new()};
    out.copies = xmalloc(a.storage_floats * sizeof(uint16_t));
    struct gpt_oss_fuser *fuser = gpt_oss_fuser_new(&a.cfg, add_fused_bf16, &out);
    int rc = 0;
    for (int i = 0; i < a.n_params && rc == 0; i++) {
        const struct param *p = &a.params[i];
        rc = gpt_oss_fuser_takes(fuser, p)
                 ? gpt_oss_fuser_take(fuser, p, p->data, err, sizeof err)
                 : add_fused_bf16(p->name, p->rank, p->shape, p->data, p->numel, &out, err,
                                  sizeof err);
    }
    CHECK(rc == 0 && gpt_oss_fuser_finish(fuser, err, sizeof err) == 0, "gpt_oss fuse: %s", err);
    CHECK(out.used == a.storage_floats && gpt_oss_fused_numel(&a.cfg) > 0,
          "gpt_oss fuse: %zu values written of %zu", out.used, a.storage_floats);
    snprintf(dir, sizeof dir, "%s/gpt_oss_written", tmp);
    mkdir(dir, 0777);
    CHECK(st_writer_write_checkpoint(out.writer, dir, 0, err, sizeof err) == 0, "%s", err);
    CHECK(hfconfig_write(dir, &a.cfg, err, sizeof err) == 0, "%s", err);
    gpt_oss_fuser_free(fuser);
    st_writer_free(out.writer);
    free(out.copies);

    /* transformers' fused tensors, bit for bit */
    struct st_checkpoint *theirs = st_checkpoint_open(fixture, err, sizeof err);
    struct st_checkpoint *ours = st_checkpoint_open(dir, err, sizeof err);
    CHECK(theirs && ours, "%s", err);
    int compared = 0;
    for (int l = 0; theirs && ours && l < a.cfg.num_layers; l++) {
        static const char *const fused[] = {"gate_up_proj", "gate_up_proj_bias", "down_proj",
                                            "down_proj_bias"};
        for (int t = 0; t < 4; t++) {
            char name[128];
            snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%s", l, fused[t]);
            const struct st_tensor *x = st_find(theirs, name), *y = st_find(ours, name);
            CHECK(x && y && x->dtype == y->dtype && x->rank == y->rank &&
                      memcmp(x->shape, y->shape, sizeof(int64_t) * (size_t)x->rank) == 0 &&
                      x->nbytes == y->nbytes && memcmp(x->data, y->data, x->nbytes) == 0,
                  "gpt_oss fused writer: %s differs from transformers' (or is missing)", name);
            compared++;
        }
        char per_expert[128];
        snprintf(per_expert, sizeof per_expert, "model.layers.%d.mlp.experts.0.gate_proj.weight", l);
        CHECK(!st_find(ours, per_expert), "gpt_oss fused writer: per-expert %s written", per_expert);
    }
    CHECK(compared == 4 * a.cfg.num_layers, "gpt_oss fused tensors compared: %d", compared);
    if (theirs) st_checkpoint_close(theirs);
    if (ours) st_checkpoint_close(ours);

    /* and esft reads back what it wrote */
    if (load_weights(dir, &b, err, sizeof err) != 0) {
        CHECK(0, "gpt_oss written: %s", err);
        model_free(&a);
        return;
    }
    int differing = 0;
    for (int i = 0; i < a.n_params; i++)
        if (strcmp(a.params[i].name, b.params[i].name) != 0 ||
            memcmp(a.params[i].data, b.params[i].data, a.params[i].numel * sizeof(float)) != 0) {
            if (differing++ < 3) CHECK(0, "gpt_oss written: %s differs", a.params[i].name);
        }
    CHECK(differing == 0 && a.n_params == b.n_params,
          "gpt_oss written and read back: %d of %d tensors differ", differing, a.n_params);
    model_free(&a);
    model_free(&b);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "drop") == 0) return drop_tensor(argv[2], argv[3], argv[4]);
    MPI_Init(&argc, &argv);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    char fixture[512], err[1024];
    snprintf(fixture, sizeof fixture, "%s/qwen3_moe", golden);
    snprintf(tmp, sizeof tmp, "/tmp/esft-model-load.XXXXXX");
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");

    char config_path[600];
    snprintf(config_path, sizeof config_path, "%s/config.json", fixture);
    char *config = read_text(config_path);
    struct model_config cfg;
    CHECK(config && hfconfig_load(fixture, &cfg, err, sizeof err) == 0, "%s", err);
    struct st_checkpoint *ckpt = st_checkpoint_open(fixture, err, sizeof err);
    CHECK(ckpt != NULL, "%s", err);
    if (!ckpt || !config) return check_done("test_model_load");
    int V = cfg.vocab_size, E = cfg.num_experts, I = cfg.expert_intermediate_size, H = cfg.hidden_size;

    static float original[9 * 1024], fused[9 * 1024];
    CHECK(load_and_run(fixture, original, err, sizeof err) == 0, "original: %s", err);

    /* Fused experts: every layer's per-expert matrices stacked as transformers 5 holds
     * them in memory; everything else as it was. */
    struct st_writer *w = st_writer_new();
    float **stacks = xcalloc((size_t)cfg.num_layers * 2, sizeof(float *));
    for (int i = 0; i < ckpt->n_tensors; i++)
        if (!strstr(ckpt->tensors[i].name, ".experts."))
            st_writer_add(w, ckpt->tensors[i].name, ckpt->tensors[i].dtype, ckpt->tensors[i].rank,
                          ckpt->tensors[i].shape, ckpt->tensors[i].data, err, sizeof err);
    for (int l = 0; l < cfg.num_layers; l++) {
        float *gate_up = stacks[2 * l] = xmalloc(sizeof(float) * (size_t)E * 2 * I * H);
        float *down = stacks[2 * l + 1] = xmalloc(sizeof(float) * (size_t)E * H * I);
        for (int e = 0; e < E; e++) {
            const char *parts[3] = {"gate_proj", "up_proj", "down_proj"};
            float *dest[3] = {gate_up + (size_t)e * 2 * I * H, gate_up + (size_t)e * 2 * I * H + (size_t)I * H,
                              down + (size_t)e * H * I};
            for (int p = 0; p < 3; p++) {
                char name[160];
                snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%d.%s.weight", l, e, parts[p]);
                const struct st_tensor *t = st_get(ckpt, name, err, sizeof err);
                CHECK(t && st_read_f32(t, dest[p], (size_t)I * H, err, sizeof err) == 0, "%s", err);
            }
        }
        char name[160];
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.gate_up_proj", l);
        st_writer_add(w, name, ST_F32, 3, (int64_t[]){E, 2 * I, H}, gate_up, err, sizeof err);
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.down_proj", l);
        st_writer_add(w, name, ST_F32, 3, (int64_t[]){E, H, I}, down, err, sizeof err);
    }
    char dir[512];
    make_variant("fused", config, w, dir);
    char fused_dir[512];
    snprintf(fused_dir, sizeof fused_dir, "%s", dir);
    st_writer_free(w);
    CHECK(load_and_run(dir, fused, err, sizeof err) == 0, "fused: %s", err);
    CHECK(memcmp(original, fused, sizeof(float) * 9 * (size_t)V) == 0,
          "fused experts give other logits than per-expert ones");

    /* A tensor missing. */
    w = st_writer_new();
    const char *dropped = "model.layers.1.self_attn.k_proj.weight";
    for (int i = 0; i < ckpt->n_tensors; i++)
        if (strcmp(ckpt->tensors[i].name, dropped) != 0)
            st_writer_add(w, ckpt->tensors[i].name, ckpt->tensors[i].dtype, ckpt->tensors[i].rank,
                          ckpt->tensors[i].shape, ckpt->tensors[i].data, err, sizeof err);
    make_variant("missing", config, w, dir);
    expect_failure(dir, "missing tensor", dropped, "not found");

    /* config.json disagrees with the tensors: a wider expert than the file holds. */
    char *wide = xstrdup(config);
    char *at = strstr(wide, "\"moe_intermediate_size\": 22");
    CHECK(at != NULL, "fixture config has moe_intermediate_size 22");
    if (at) memcpy(at, "\"moe_intermediate_size\": 24", 27);
    make_variant("wide", wide, w, dir);
    expect_failure(dir, "shape disagrees with config", "experts.0.gate_proj.weight", "[24, 36]");
    /* the same config over fused experts: the fused block's shape, and which keys give it */
    make_variant("fused-wide", wide, NULL, dir);
    char target[600], link_path[600];
    snprintf(target, sizeof target, "%s/model.safetensors", fused_dir);
    snprintf(link_path, sizeof link_path, "%s/model.safetensors", dir);
    CHECK(symlink(target, link_path) == 0, "symlink %s", link_path);
    expect_failure(dir, "fused shape disagrees with config", "experts.gate_up_proj",
                   "expected shape [7, 48, 36], got [7, 44, 36] (num_experts x 2 * "
                   "moe_intermediate_size x hidden_size of ");
    free(wide);
    st_writer_free(w);

    /* Sizes within every limit that disagree with the tensors by a terabyte (hidden 65536
     * and a vocabulary of 2^22: 2^38 floats of embedding alone): refused from the headers,
     * naming the tensor and the config keys, before model_create would allocate them. */
    char *wider = replaced(config, "\"hidden_size\": 36", "\"hidden_size\": 65536");
    char *huge = replaced(wider, "\"vocab_size\": 101", "\"vocab_size\": 4194304");
    w = st_writer_new();
    for (int i = 0; i < ckpt->n_tensors; i++)
        st_writer_add(w, ckpt->tensors[i].name, ckpt->tensors[i].dtype, ckpt->tensors[i].rank,
                      ckpt->tensors[i].shape, ckpt->tensors[i].data, err, sizeof err);
    make_variant("huge", huge, w, dir);
    st_writer_free(w);
    struct model_config huge_cfg;
    CHECK(hfconfig_load(dir, &huge_cfg, err, sizeof err) == 0, "huge but within the limits: %s",
          err);
    expect_failure(dir, "sizes the tensors do not have", "model.embed_tokens.weight",
                   "expected shape [4194304, 65536], got [101, 36] (vocab_size x hidden_size of ");
    free(wider);
    free(huge);

    /* A truncated file. */
    make_variant("truncated", config, NULL, dir);
    char src[600], dst[600];
    snprintf(src, sizeof src, "%s/model.safetensors", fixture);
    snprintf(dst, sizeof dst, "%s/model.safetensors", dir);
    char *bytes = NULL;
    FILE *f = fopen(src, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    bytes = xmalloc((size_t)size);
    CHECK(fread(bytes, 1, (size_t)size, f) == (size_t)size, "read %s", src);
    fclose(f);
    f = fopen(dst, "wb");
    fwrite(bytes, 1, (size_t)size / 2, f);
    fclose(f);
    free(bytes);
    expect_failure(dir, "truncated file", "model.safetensors", NULL);

    /* A family esft does not support. */
    char *other = xstrdup(config);
    at = strstr(other, "\"model_type\": \"qwen3_moe\"");
    CHECK(at != NULL, "fixture config names its model_type");
    const char *replacement = "\"model_type\": \"grok\", \"x\": \"";
    if (at) {
        char *text = xmalloc(strlen(other) + 64);
        size_t head = (size_t)(at - other);
        memcpy(text, other, head);
        strcpy(text + head, replacement);
        strcat(text, at + strlen("\"model_type\": \""));
        free(other);
        other = text;
    }
    make_variant("family", other, NULL, dir);
    expect_failure(dir, "unsupported family", "grok", "unknown model_type");
    free(other);

    test_fp8(golden);
    test_mxfp4(golden);
    test_gpt_oss_fused_writer(golden);
    test_gpt_oss_sliced_writer(golden);

    for (int l = 0; l < 2 * cfg.num_layers; l++) free(stacks[l]);
    free(stacks);
    free(config);
    st_checkpoint_close(ckpt);
    char command[600];
    snprintf(command, sizeof command, "rm -rf '%s'", tmp);
    CHECK(system(command) == 0, "%s", command);
    int status = check_done("test_model_load");
    MPI_Finalize();
    return status;
}
