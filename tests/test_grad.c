/* test_grad: esft's backward pass against transformers' autograd on the golden fixtures.
 *
 * For every fixture and each method, the gradient of the mean cross-entropy (the
 * fixture's `loss`) is computed on the stored batch and compared, tensor by tensor, with
 * transformers' `grad.<name>`: max |esft - hf| / max |hf| < 1e-3 for every trainable
 * tensor. Methods: full (everything), frozen_router (routers get no gradient buffer),
 * esft with an expert configuration written here (two experts per MoE layer, then with
 * shared experts and non-expert modules): exactly the configured tensors have gradient
 * buffers, and theirs equal transformers'. Gradients of a tensor do not depend on which
 * others train, so the same reference serves every method.
 * Usage: test_grad [GOLDEN_DIR] */
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
#include "log.h"
#include "model.h"
#include "safetensors.h"
#include "trainable.h"

static char tmp[64] = "/tmp/esft-grad.XXXXXX";

static int32_t *read_i64(const struct st_file *f, const char *name, size_t n)
{
    const struct st_tensor *t = st_file_find(f, name);
    CHECK(t && t->dtype == ST_I64 && (size_t)t->numel == n, "%s", name);
    if (!t) return NULL;
    int32_t *out = xmalloc(n * sizeof *out);
    for (size_t i = 0; i < n; i++) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, 8);
        out[i] = (int32_t)v;
    }
    return out;
}

/* Runs forward + backward with the given trainable set and checks every gradient. */
static void check_method(const char *name, const char *what, struct model *m,
                         const bool *trainable, const struct st_file *expected,
                         const struct batch *batch)
{
    model_set_trainable(m, trainable);
    model_zero_grads(m);
    struct forward_workspace *ws = forward_workspace_new_training(m, batch->N);
    struct forward_result result;
    model_forward(m, backend_cpu(), ws, batch, &result);
    model_backward(m, backend_cpu(), ws, batch, 1.0f / (float)result.loss_count);
    double worst = 0;
    int compared = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        CHECK(trainable[i] == (p->grad != NULL), "%s %s: %s %s a gradient buffer", name, what,
              p->name, p->grad ? "has" : "lacks");
        if (!p->grad) continue;
        char ref_name[PARAM_NAME_MAX + 8];
        snprintf(ref_name, sizeof ref_name, "grad.%s", p->name);
        const struct st_tensor *t = st_file_find(expected, ref_name);
        CHECK(t && (size_t)t->numel == p->numel, "%s: %s missing", name, ref_name);
        if (!t) continue;
        float *ref = xmalloc(p->numel * sizeof(float));
        char err[256];
        st_read_f32(t, ref, p->numel, err, sizeof err);
        double diff = 0, scale = 0;
        for (size_t j = 0; j < p->numel; j++) {
            diff = fmax(diff, fabs((double)p->grad[j] - ref[j]));
            scale = fmax(scale, fabs((double)ref[j]));
        }
        double rel = scale > 1e-8 ? diff / scale : diff;
        CHECK(rel < 1e-3, "%s %s: %s: relative error %.3g (max |grad| %.3g)", name, what, p->name,
              rel, scale);
        worst = fmax(worst, rel);
        compared++;
        free(ref);
    }
    printf("%s %s: %d gradients, worst relative error %.2e\n", name, what, compared, worst);
    forward_workspace_free(ws);
}

static void write_config(const char *path, const struct model_config *cfg, bool shared,
                         bool non_expert)
{
    FILE *f = fopen(path, "w");
    fprintf(f, "{\"experts\": {");
    bool first = true;
    for (int l = 0; l < cfg->num_layers; l++) {
        if (!cfg->is_moe[l]) continue;
        /* two experts per layer, different per layer */
        fprintf(f, "%s\"%d\": [%d, %d]", first ? "" : ", ", l, (l + 1) % cfg->num_experts,
                (l + 4) % cfg->num_experts);
        first = false;
    }
    fprintf(f, "}, \"shared_experts\": %s, \"non_expert_modules\": %s}\n",
            shared ? "true" : "false", non_expert ? "true" : "false");
    fclose(f);
}

static void check_fixture(const char *dir, const char *name)
{
    char err[1024], path[4200];
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, sizeof err) != 0) {
        CHECK(0, "%s", err);
        return;
    }
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    struct st_file *expected = st_open(path, err, sizeof err);
    CHECK(expected != NULL, "%s", err);
    if (!expected) return;
    const struct st_tensor *ids = st_file_find(expected, "input_ids");
    int B = (int)ids->shape[0], T = (int)ids->shape[1], N = B * T;
    int32_t *tokens = read_i64(expected, "input_ids", (size_t)N);
    int32_t *positions = read_i64(expected, "position_ids", (size_t)N);
    int32_t *segments = read_i64(expected, "segment_ids", (size_t)N);
    int32_t *labels = read_i64(expected, "labels", (size_t)N);
    int32_t *starts = xmalloc((size_t)N * sizeof *starts), *targets = xmalloc((size_t)N * sizeof *targets);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int n = b * T + t;
            starts[n] = t == 0 || segments[n] != segments[n - 1] ? n : starts[n - 1];
            targets[n] = t + 1 < T ? labels[n + 1] : -100;
        }
    struct batch batch = {.N = N, .tokens = tokens, .positions = positions,
                          .sample_start = starts, .targets = targets};
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, &cfg, &grid, (struct layout_coords){0, 0, 0});
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    bool *trainable = xcalloc((size_t)m.n_params, sizeof(bool));

    CHECK(trainable_select(&m, METHOD_FULL, NULL, trainable, err, sizeof err) == 0, "%s", err);
    check_method(name, "full", &m, trainable, expected, &batch);
    CHECK(trainable_select(&m, METHOD_FROZEN_ROUTER, NULL, trainable, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < m.n_params; i++)
        CHECK(trainable[i] == (m.params[i].kind != PARAM_ROUTER), "frozen_router: %s", m.params[i].name);
    check_method(name, "frozen_router", &m, trainable, expected, &batch);

    for (int variant = 0; variant < 2; variant++) {
        char config[128];
        snprintf(config, sizeof config, "%s/expert_config.json", tmp);
        write_config(config, &cfg, variant == 1, variant == 1);
        struct expert_config ec;
        CHECK(expert_config_read(config, &cfg, &ec, err, sizeof err) == 0, "%s", err);
        CHECK(trainable_select(&m, METHOD_ESFT, &ec, trainable, err, sizeof err) == 0, "%s", err);
        int experts = 0;
        for (int i = 0; i < m.n_params; i++) {
            const struct param *p = &m.params[i];
            bool want = p->kind == PARAM_EXPERT
                            ? p->expert == (p->layer + 1) % cfg.num_experts ||
                                  p->expert == (p->layer + 4) % cfg.num_experts
                            : variant == 1;
            CHECK(trainable[i] == want, "esft variant %d: %s", variant, p->name);
            experts += p->kind == PARAM_EXPERT && trainable[i];
        }
        int moe_layers = 0;
        for (int l = 0; l < cfg.num_layers; l++) moe_layers += cfg.is_moe[l];
        CHECK(experts == moe_layers * 2 * 3, "esft: %d expert matrices train", experts);
        check_method(name, variant ? "esft+shared+non-expert" : "esft", &m, trainable, expected, &batch);
        expert_config_free(&ec);
    }
    free(trainable);
    model_free(&m);
    free(tokens), free(positions), free(segments), free(labels), free(starts), free(targets);
    st_close(expected);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    DIR *d = opendir(golden);
    CHECK(d != NULL, "cannot open %s", golden);
    int fixtures = 0;
    struct dirent *entry;
    while (d && (entry = readdir(d))) {
        char dir[4096], probe[4200];
        struct stat st;
        snprintf(dir, sizeof dir, "%s/%s", golden, entry->d_name);
        snprintf(probe, sizeof probe, "%s/expected.safetensors", dir);
        if (entry->d_name[0] == '.' || stat(probe, &st) != 0) continue;
        check_fixture(dir, entry->d_name);
        fixtures++;
    }
    if (d) closedir(d);
    CHECK(fixtures >= 7, "found %d fixtures", fixtures);
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", tmp);
    CHECK(system(command) == 0, "%s", command);
    int status = check_done("test_grad");
    MPI_Finalize();
    return status;
}
