/* test_golden: esft's CPU forward pass against transformers on the golden fixtures
 * (tests/golden/, made by tests/golden/generate.py with transformers itself).
 *
 * For every fixture directory: load config.json and the checkpoint as the esft program
 * does, run the forward pass on the stored batch (two rows, the second packing two
 * samples), and compare with transformers' values:
 *   logits           max |esft - hf| / max |hf| < 1e-4
 *   router top-k ids identical, top-k weights within 1e-5 (absolute)
 *   loss             within 1e-5 relative
 * Usage: test_golden [GOLDEN_DIR] (default tests/golden). */
#include <dirent.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backend.h"
#include "check.h"
#include "hfconfig.h"
#include "layout.h"
#include "log.h"
#include "model.h"
#include "model_compute.h"
#include "safetensors.h"

/* An int64 tensor of the expected file as int32. */
static int32_t *read_i64(const struct st_checkpoint *expected, const char *name, size_t count)
{
    char err[512];
    const struct st_tensor *t = st_get(expected, name, err, sizeof err);
    if (!t || t->dtype != ST_I64 || (size_t)t->numel != count) {
        CHECK(0, "expected tensor %s: %s", name, t ? "wrong dtype or size" : err);
        return NULL;
    }
    int32_t *out = xmalloc(count * sizeof(int32_t));
    for (size_t i = 0; i < count; i++) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, 8);
        out[i] = (int32_t)v;
    }
    return out;
}

static float *read_f32(const struct st_checkpoint *expected, const char *name, size_t count)
{
    char err[512];
    const struct st_tensor *t = st_get(expected, name, err, sizeof err);
    if (!t || (size_t)t->numel != count) {
        CHECK(0, "expected tensor %s: %s", name, t ? "wrong size" : err);
        return NULL;
    }
    float *out = xmalloc(count * sizeof(float));
    if (st_read_f32(t, out, count, err, sizeof err) != 0) CHECK(0, "%s", err);
    return out;
}

/* The logits[N, V] of the fixture at dir with its frozen weight matrices held as bf16
 * (model.frozen_weights: bf16; in a forward every tensor is frozen), on ops; NULL after a
 * failed load. */
static float *bf16_logits(const char *dir, const char *name, const struct model_config *cfg,
                          const struct backend *ops, const struct batch *batch, size_t *halves)
{
    char err[1024];
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct layout_coords me = {0, 0, 0};
    struct model model;
    model_create(&model, cfg, &grid, me);
    model_store_frozen_bf16(&model);
    if (model_load(&model, dir, err, sizeof err) != 0) {
        CHECK(0, "%s: bf16 weights: %s", name, err);
        model_free(&model);
        return NULL;
    }
    *halves = model.storage_halves;
    model_attach(&model, ops);
    struct forward_workspace *ws = forward_workspace_new(&model, batch->N);
    forward_workspace_keep(ws, FORWARD_KEEP_LOGITS);
    struct forward_result result;
    model_forward(&model, ops, ws, batch, &result);
    size_t count = (size_t)batch->N * cfg->vocab_size;
    float *logits = xmalloc(count * sizeof(float));
    memcpy(logits, result.logits, count * sizeof(float));
    forward_workspace_free(ws);
    model_free(&model);
    return logits;
}

/* Whether every tensor model_store_frozen_bf16 would round is bf16 already (a bf16
 * checkpoint, or mxfp4's values): the rounding then changes nothing. */
static bool bf16_exact(const struct model *m)
{
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!p->data || !model_stores_bf16(p)) continue;
        for (size_t j = 0; j < p->numel; j++)
            if (st_bf16_to_f32(st_f32_to_bf16(p->data[j])) != p->data[j]) return false;
    }
    return true;
}

/* bf16 frozen weights against the fp32 run's logits (fp32 of the same backend): tensors
 * were held as bf16; the relative L2 distance within bf16's rounding, and not 0 (the bf16
 * values were used) unless the checkpoint's values are bf16 already (then within 1e-5:
 * the same weights, other GEMM blocks); and the device simulator's bits equal the CPU's.
 * The bound, 2e-2: a weight's relative rounding error is at most 2^-9 ~ 2e-3 (rms ~1.1e-3),
 * and through 2-3 layers of projections, attention and experts and the lm_head the
 * fixtures' logits move by 5.4e-3 to 1.0e-2 (measured, 2026-11-26). */
static void check_bf16_weights(const char *dir, const char *name, const struct model_config *cfg,
                               const struct backend *ops, const struct batch *batch,
                               const float *fp32_logits, bool exact)
{
    size_t halves = 0;
    float *logits = bf16_logits(dir, name, cfg, ops, batch, &halves);
    if (!logits) return;
    CHECK(halves > 0, "%s: bf16 frozen weights: no tensor held as bf16", name);
    size_t count = (size_t)batch->N * cfg->vocab_size;
    double diff = 0, norm = 0;
    for (size_t i = 0; i < count; i++) {
        double d = (double)logits[i] - fp32_logits[i];
        diff += d * d;
        norm += (double)fp32_logits[i] * fp32_logits[i];
    }
    double rel = sqrt(diff / (norm > 0 ? norm : 1));
    /* the CUDA backend multiplies a bf16 weight by the activation rounded to bf16 as well:
     * on an H100 (2026-11-26) the fixtures' logits moved by 5.6e-3 to 3.7e-2 (olmoe_clip_qkv),
     * those of bf16 checkpoints included, so neither 2e-2 nor exactness holds there */
    bool operands_rounded = strcmp(ops->name, "cuda") == 0;
    double bound = operands_rounded ? 5e-2 : 2e-2;
    printf("%s: bf16 frozen weights: logits relative L2 %.3g from the fp32 run\n", name, rel);
    CHECK(rel < bound, "%s: bf16 frozen weights: logits relative L2 %.3g from fp32 (bound %.0e)",
          name, rel, bound);
    if (operands_rounded)
        CHECK(diff > 0, "%s: bf16 frozen weights: logits bitwise the fp32 run's", name);
    else if (exact)
        CHECK(rel < 1e-5, "%s: bf16 frozen weights of a bf16 checkpoint: logits relative L2 "
              "%.3g from fp32", name, rel);
    else
        CHECK(diff > 0, "%s: bf16 frozen weights: logits bitwise the fp32 run's", name);
    if (ops == backend_cpu()) {
        size_t simulated_halves;
        float *simulated = bf16_logits(dir, name, cfg, backend_devsim(), batch, &simulated_halves);
        if (simulated)
            CHECK(memcmp(simulated, logits, count * sizeof(float)) == 0,
                  "%s: bf16 frozen weights: the device simulator's logits differ from the CPU's",
                  name);
        free(simulated);
    }
    free(logits);
}

static void check_fixture(const char *dir, const char *name)
{
    char err[1024];
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, sizeof err) != 0) {
        CHECK(0, "%s: %s", name, err);
        return;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    struct st_file *file = st_open(path, err, sizeof err);
    if (!file) {
        CHECK(0, "%s: %s", name, err);
        return;
    }
    /* view the expected file through the checkpoint lookup */
    struct st_checkpoint expected = {.dir = path, .n_files = 1, .files = &file,
                                     .n_tensors = file->n_tensors, .tensors = file->tensors};
    const struct st_tensor *ids_t = st_find(&expected, "input_ids");
    if (!ids_t || ids_t->rank != 2) {
        CHECK(0, "%s: input_ids missing", name);
        st_close(file);
        return;
    }
    int B = (int)ids_t->shape[0], T = (int)ids_t->shape[1], N = B * T;
    int32_t *tokens = read_i64(&expected, "input_ids", (size_t)N);
    int32_t *positions = read_i64(&expected, "position_ids", (size_t)N);
    int32_t *segments = read_i64(&expected, "segment_ids", (size_t)N);
    int32_t *labels = read_i64(&expected, "labels", (size_t)N);
    if (!tokens || !positions || !segments || !labels) goto done_inputs;

    /* sample starts from segment ids; next-token targets from the transformers labels
     * (logits[b,t] scored against labels[b,t+1]; the last position of a row scores
     * nothing) */
    int32_t *sample_start = xmalloc((size_t)N * sizeof(int32_t));
    int32_t *targets = xmalloc((size_t)N * sizeof(int32_t));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int n = b * T + t;
            bool new_sample = t == 0 || segments[n] != segments[n - 1];
            sample_start[n] = new_sample ? n : sample_start[n - 1];
            targets[n] = t + 1 < T ? labels[n + 1] : -100;
        }

    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct layout_coords me = {0, 0, 0};
    struct model model;
    model_create(&model, &cfg, &grid, me);
    if (model_load(&model, dir, err, sizeof err) != 0) {
        CHECK(0, "%s: %s", name, err);
        model_free(&model);
        free(sample_start);
        free(targets);
        goto done_inputs;
    }
    /* the rotary frequencies and their cos/sin factor, where the fixture stores them */
    const struct st_tensor *freq_t = st_find(&expected, "inv_freq");
    if (freq_t) {
        int half = cfg.rope.rotary_dim / 2;
        CHECK(freq_t->numel == half, "%s: inv_freq has %lld entries, rotary width %d", name,
              (long long)freq_t->numel, cfg.rope.rotary_dim);
        float *freq = read_f32(&expected, "inv_freq", (size_t)half);
        for (int i = 0; freq && i < half; i++)
            CHECK(fabsf(model.inv_freq[i] - freq[i]) <= 1e-6f * fabsf(freq[i]),
                  "%s: inv_freq[%d] %.9g, transformers %.9g", name, i, model.inv_freq[i], freq[i]);
        free(freq);
    }
    if (st_find(&expected, "scaling") && cfg.attention == ATTENTION_MLA) { /* with YaRN's m^2 */
        float *s = read_f32(&expected, "scaling", 1);
        if (s)
            CHECK(fabsf(mla_softmax_scale(&cfg) - s[0]) <= 1e-6f * fabsf(s[0]),
                  "%s: MLA softmax scale %.9g, transformers %.9g", name, mla_softmax_scale(&cfg), s[0]);
        free(s);
    }
    if (st_find(&expected, "rope_attention_scaling")) {
        float *s = read_f32(&expected, "rope_attention_scaling", 1);
        if (s)
            CHECK(fabs(cfg.rope.attention_scaling - s[0]) <= 1e-6 * fabs(s[0]),
                  "%s: rope attention scaling %.9g, transformers %.9g", name,
                  cfg.rope.attention_scaling, s[0]);
        free(s);
    }
    /* the backend the environment names (ESFT_BACKEND: cpu-devsim, or cuda on a GPU), as
     * the phases attach it; the CPU by default */
    const struct backend *ops = backend_named(getenv("ESFT_BACKEND"), err, sizeof err);
    CHECK(ops != NULL, "%s", err);
    if (!ops) ops = backend_cpu();
    printf("%s: backend: %s\n", name, ops->name);
    model_attach(&model, ops);
    struct forward_workspace *ws = forward_workspace_new(&model, N);
    forward_workspace_keep(ws, FORWARD_KEEP_LOGITS | FORWARD_KEEP_ROUTING);
    struct batch batch = {.N = N, .tokens = tokens, .positions = positions,
                          .sample_start = sample_start, .targets = targets};
    struct forward_result result;
    model_forward(&model, ops, ws, &batch, &result);

    int V = cfg.vocab_size, K = cfg.top_k;
    float *logits = read_f32(&expected, "logits", (size_t)N * V);
    if (logits) {
        double max_diff = 0, max_ref = 0;
        for (size_t i = 0; i < (size_t)N * V; i++) {
            max_diff = fmax(max_diff, fabs((double)result.logits[i] - logits[i]));
            max_ref = fmax(max_ref, fabs((double)logits[i]));
        }
        double rel = max_diff / max_ref;
        printf("%s: logits max |diff| %.3g, relative %.3g\n", name, max_diff, rel);
        CHECK(rel < 1e-4, "%s: logits relative error %.3g", name, rel);
    }
    check_bf16_weights(dir, name, &cfg, ops, &batch, result.logits, bf16_exact(&model));
    for (int l = 0; l < cfg.num_layers; l++) {
        if (!cfg.is_moe[l]) continue;
        char tensor[128];
        snprintf(tensor, sizeof tensor, "router.%d.topk_ids", l);
        const struct st_tensor *t = st_get(&expected, tensor, err, sizeof err);
        CHECK(t && t->dtype == ST_I32 && t->numel == (int64_t)N * K, "%s: %s", name, tensor);
        if (!t) continue;
        int mismatched = 0;
        for (int i = 0; i < N * K; i++) {
            int32_t id;
            memcpy(&id, (const char *)t->data + 4 * i, 4);
            mismatched += id != result.topk_ids[l][i];
        }
        CHECK(mismatched == 0, "%s: layer %d: %d of %d top-k ids differ", name, l, mismatched, N * K);
        snprintf(tensor, sizeof tensor, "router.%d.topk_weights", l);
        float *weights = read_f32(&expected, tensor, (size_t)N * K);
        if (weights) {
            double max_diff = 0;
            for (int i = 0; i < N * K; i++)
                max_diff = fmax(max_diff, fabs((double)weights[i] - result.topk_weights[l][i]));
            CHECK(max_diff < 1e-5, "%s: layer %d: top-k weights differ by %.3g", name, l, max_diff);
            free(weights);
        }
    }
    float *loss = read_f32(&expected, "loss", 1);
    if (loss) {
        double ours = result.loss_sum / (double)result.loss_count;
        printf("%s: loss %.7f (transformers %.7f, %lld targets)\n", name, ours, loss[0],
               result.loss_count);
        CHECK(check_close(ours, loss[0], 1e-5, 0), "%s: loss %.7f vs %.7f", name, ours, loss[0]);
        free(loss);
    }
    free(logits);
    forward_workspace_free(ws);
    model_free(&model);
    free(sample_start);
    free(targets);
done_inputs:
    free(tokens);
    free(positions);
    free(segments);
    free(labels);
    st_close(file);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    DIR *d = opendir(golden);
    CHECK(d != NULL, "cannot open %s", golden);
    int fixtures = 0;
    char names[64][256];
    struct dirent *entry;
    while (d && (entry = readdir(d)) && fixtures < 64) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s/expected.safetensors", golden, entry->d_name);
        if (entry->d_name[0] != '.' && stat(path, &st) == 0)
            snprintf(names[fixtures++], sizeof names[0], "%s", entry->d_name);
    }
    if (d) closedir(d);
    qsort(names, (size_t)fixtures, sizeof names[0], (int (*)(const void *, const void *))strcmp);
    for (int i = 0; i < fixtures; i++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/%s", golden, names[i]);
        check_fixture(dir, names[i]);
    }
    CHECK(fixtures >= 6, "found %d fixtures in %s", fixtures, golden);
    int status = check_done("test_golden");
    MPI_Finalize();
    return status;
}
