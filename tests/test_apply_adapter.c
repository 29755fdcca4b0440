/* test_apply_adapter: an ESFT adapter put over a base model (model_apply_adapter, and the
 * merged checkpoint `esft --apply-adapter` writes) against transformers 5. For each
 * golden fixture with an esft_adapter/ (tests/golden/esft_adapter_reference.py: perturbed
 * experts and a router under their checkpoint names, and the logits of the transformers
 * model with tests/golden/apply_esft_adapter.py applied, which the generator checked
 * against from_pretrained of the overwritten checkpoint; for gpt_oss, put by hand into
 * transformers' fused layout):
 *   - the base checkpoint with model_apply_adapter gives those logits (max |esft - hf| /
 *     max |hf| < 1e-4, test_golden's bound);
 *   - with MERGED_ROOT, the checkpoint MERGED_ROOT/<fixture>/merged (written by
 *     tests/test-apply-adapter.sh with esft --apply-adapter) loaded as a plain model
 *     gives them too;
 *   - an adapter is refused, with the reason, when a tensor is not the model's (another
 *     family's adapter, PEFT's names, the ESFT reference's names) or has another shape.
 * Usage: test_apply_adapter [GOLDEN_DIR [MERGED_ROOT]]. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "fixture.h"
#include "model.h"
#include "model_compute.h"

static char tmp[64] = "/tmp/esft-apply-adapter.XXXXXX";
static const char *merged_root;

/* The fixture batch's logits [N, V] of the model at dir (with the adapter at adapter put
 * over it unless NULL); NULL after a failed check. */
static float *logits_of(const char *dir, const char *adapter, const struct model_config *cfg,
                        const struct batch *batch)
{
    char err[1024];
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct layout_coords me = {0, 0, 0};
    struct model m;
    model_create(&m, cfg, &grid, me);
    int applied = 0;
    int rc = model_load(&m, dir, err, sizeof err);
    if (rc == 0 && adapter) rc = model_apply_adapter(&m, adapter, &applied, err, sizeof err);
    CHECK(rc == 0, "%s: %s", dir, err);
    CHECK(!adapter || rc != 0 || applied > 0, "%s: no adapter tensor applied", adapter);
    float *out = NULL;
    if (rc == 0) {
        model_attach(&m, backend_cpu());
        struct forward_workspace *ws = forward_workspace_new(&m, batch->N);
        forward_workspace_keep(ws, FORWARD_KEEP_LOGITS);
        struct forward_result r;
        model_forward(&m, backend_cpu(), ws, batch, &r);
        size_t n = (size_t)batch->N * (size_t)cfg->vocab_size;
        out = xmalloc(n * sizeof(float));
        memcpy(out, r.logits, n * sizeof(float));
        forward_workspace_free(ws);
    }
    model_free(&m);
    return out;
}

static void check_logits(const char *what, const float *logits, const float *expected, size_t n)
{
    if (!logits) return;
    double worst = check_worst_relative(logits, expected, n);
    printf("%s: logits max |esft - transformers| / max |transformers| %.2e\n", what, worst);
    CHECK(worst < 1e-4, "%s: logits %.3g from transformers' (relative to the largest)", what,
          worst);
}

static void check_fixture(const char *dir, const char *name, void *context)
{
    (void)context;
    struct model_config cfg;
    char err[1024], path[4200], adapter[4200];
    if (hfconfig_load(dir, &cfg, err, sizeof err) != 0) {
        CHECK(0, "%s: %s", name, err);
        return;
    }
    snprintf(path, sizeof path, "%s/esft_adapter/expected.safetensors", dir);
    struct st_file *expected = st_open(path, err, sizeof err);
    CHECK(expected != NULL, "%s", err);
    if (!expected) return;
    struct fixture_batch fb;
    fixture_batch_read(expected, &fb);
    size_t n = (size_t)fb.batch.N * (size_t)cfg.vocab_size;
    const struct st_tensor *t = st_file_find(expected, "logits");
    float *want = xmalloc(n * sizeof(float));
    CHECK(t && st_read_f32(t, want, n, err, sizeof err) == 0, "%s: logits", path);

    snprintf(adapter, sizeof adapter, "%s/esft_adapter/adapter.safetensors", dir);
    char what[256];
    float *logits = logits_of(dir, adapter, &cfg, &fb.batch);
    snprintf(what, sizeof what, "%s, adapter applied", name);
    check_logits(what, logits, want, n);
    free(logits);
    if (merged_root) {
        char merged[4200];
        snprintf(merged, sizeof merged, "%s/%s/merged", merged_root, name);
        logits = logits_of(merged, NULL, &cfg, &fb.batch);
        snprintf(what, sizeof what, "%s, esft --apply-adapter's merged checkpoint", name);
        check_logits(what, logits, want, n);
        free(logits);
    }
    free(want);
    fixture_batch_free(&fb);
    st_close(expected);
}

/* An adapter file of one tensor (zeros) named `name` with shape rows x cols. */
static void write_adapter(const char *path, const char *name, int64_t rows, int64_t cols)
{
    char err[512];
    struct st_writer *w = st_writer_new();
    int64_t shape[2] = {rows, cols};
    float *zeros = xcalloc((size_t)(rows * cols), sizeof(float));
    CHECK(st_writer_add(w, name, ST_F32, 2, shape, zeros, err, sizeof err) == 0 &&
              st_writer_write(w, path, 1, err, sizeof err) == 0,
          "%s: %s", path, err);
    st_writer_free(w);
    free(zeros);
}

/* model_check_adapter of the adapter at path against the model at dir refuses it with a
 * message containing reason. */
static void expect_refused(const char *dir, const char *path, const char *reason)
{
    char err[2048] = "";
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, sizeof err) != 0) {
        CHECK(0, "%s", err);
        return;
    }
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct layout_coords me = {0, 0, 0};
    struct model m;
    model_create(&m, &cfg, &grid, me);
    int n = 0;
    int rc = model_check_adapter(&m, path, &n, err, sizeof err);
    CHECK(rc != 0, "%s over %s: accepted", path, dir);
    CHECK(strstr(err, reason) != NULL, "%s over %s: '%s' not in '%s'", path, dir, reason, err);
    if (rc == 0 || model_apply_adapter(&m, path, &n, err, sizeof err) == 0)
        CHECK(0, "%s over %s: model_apply_adapter accepted it", path, dir);
    model_free(&m);
}

static void check_refusals(const char *golden)
{
    char qwen3[4200], mixtral[4200], path[4200], adapter[4200];
    snprintf(qwen3, sizeof qwen3, "%s/qwen3_moe", golden);
    snprintf(mixtral, sizeof mixtral, "%s/mixtral", golden);
    snprintf(adapter, sizeof adapter, "%s/esft_adapter/adapter.safetensors", qwen3);
    expect_refused(mixtral, adapter, "is not a tensor of the model (mixtral)");
    snprintf(path, sizeof path, "%s/shape.safetensors", tmp);
    write_adapter(path, "model.layers.0.mlp.experts.1.gate_proj.weight", 21, 36);
    expect_refused(qwen3, path, "has shape [21, 36], the model's is [22, 36]");
    snprintf(path, sizeof path, "%s/peft.safetensors", tmp);
    write_adapter(path, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 4, 36);
    expect_refused(qwen3, path, "LoRA adapter in PEFT's format");
    snprintf(path, sizeof path, "%s/reference.safetensors", tmp);
    write_adapter(path, "layers.0.mlp.experts.1.gate_proj.weight", 22, 36);
    expect_refused(qwen3, path, "the ESFT reference's layout");
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    log_init(0, 1);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    merged_root = argc > 2 ? argv[2] : NULL;
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    int fixtures = fixture_each(golden, "esft_adapter/adapter.safetensors", check_fixture, NULL);
    CHECK(fixtures >= 5, "found %d fixtures with an ESFT adapter", fixtures);
    check_refusals(golden);
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", tmp);
    CHECK(system(command) == 0, "%s", command);
    int status = check_done("test_apply_adapter");
    MPI_Finalize();
    return status;
}
