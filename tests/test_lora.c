/* test_lora: method lora (lora.h) against PEFT. For each golden fixture with a
 * lora_expected.safetensors (tests/golden/lora_reference.py: PEFT's LoRA with seeded
 * random A and B on every attention projection, dense MLP and shared expert), esft's
 * adapters are set to the same values and the fixture batch's loss and the gradients of
 * every A and B must equal PEFT + transformers autograd within 1e-3 relative; the base
 * gets no gradient. Then the merged checkpoint (export_merged after model_merge_lora),
 * loaded as a plain model, must give the adapter-applied model's logits. Also: PEFT's
 * init (A in +-1/sqrt(in), the same for a seed whatever the layout, B zero) and the
 * target names refused or taken. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backend.h"
#include "check.h"
#include "export.h"
#include "fixture.h"
#include "lora.h"
#include "lora_experts.h"
#include "model.h"
#include "peft_adapter.h"
#include "trainable.h"

static char tmp[64] = "/tmp/esft-lora.XXXXXX";

static const unsigned ALL_TARGETS = (1u << LORA_TARGET_COUNT) - 1;

static float scalar(const struct st_file *f, const char *name)
{
    const struct st_tensor *t = st_file_find(f, name);
    float v = NAN;
    char err[256];
    CHECK(t && st_read_f32(t, &v, 1, err, sizeof err) == 0, "%s", name);
    return v;
}

/* The logits of the fixture batch ([N, V], caller frees). */
static float *logits_of(const struct model *m, const struct batch *batch)
{
    struct forward_workspace *ws = forward_workspace_new(m, batch->N);
    forward_workspace_keep(ws, FORWARD_KEEP_LOGITS);
    struct forward_result r;
    model_forward(m, backend_cpu(), ws, batch, &r);
    size_t n = (size_t)batch->N * (size_t)m->cfg.vocab_size;
    float *out = xmalloc(n * sizeof(float));
    memcpy(out, r.logits, n * sizeof(float));
    forward_workspace_free(ws);
    return out;
}

static double max_diff(const float *a, const float *b, size_t n, double *scale)
{
    double d = 0;
    *scale = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        *scale = fmax(*scale, fabs((double)b[i]));
    }
    return d;
}

/* One expert's A or B (p) out of PEFT's fused tensor of its layer in f (lora_experts.h:
 * A_e rows [e r, e r + r) of [E r, in]; B_e[o, k] = B[o, k E + e] of [out, r E]); prefix
 * "" or "grad.". Also the largest |value| of the whole fused tensor in *scale. */
static bool unfuse(const struct st_file *f, const char *prefix, const struct param *p, int E,
                   float *out, double *scale)
{
    char module[64], name[PARAM_NAME_MAX + 64], full[PARAM_NAME_MAX + 80], err[256];
    snprintf(module, sizeof module, "model.layers.%d.mlp.experts", p->layer);
    lora_experts_fused_name(name, sizeof name, module, p->lora_target, p->lora_b);
    snprintf(full, sizeof full, "%s%s", prefix, name);
    const struct st_tensor *t = st_file_find(f, full);
    if (!t || (size_t)t->numel != p->numel * (size_t)E) return false;
    float *all = xmalloc(t->numel * sizeof(float));
    CHECK(st_read_f32(t, all, t->numel, err, sizeof err) == 0, "%s", err);
    int64_t r = p->lora_b ? p->shape[1] : p->shape[0], e = p->expert;
    *scale = 0;
    for (size_t i = 0; i < (size_t)t->numel; i++) *scale = fmax(*scale, fabs((double)all[i]));
    if (!p->lora_b)
        memcpy(out, all + e * r * p->shape[1], p->numel * sizeof(float));
    else
        for (int64_t o = 0; o < p->shape[0]; o++)
            for (int64_t k = 0; k < r; k++) out[o * r + k] = all[o * r * E + k * E + e];
    free(all);
    return true;
}

/* Which reference a fixture pass reads. */
struct lora_case {
    const char *file;
    enum lora_experts experts;
};

static void check_fixture(const char *dir, const char *name, void *context)
{
    const struct lora_case *lc = context;
    char err[1024], path[4200];
    struct model_config cfg;
    struct fixture_batch fb;
    struct st_file *expected = fixture_open(dir, &cfg, &fb);
    if (!expected) return;
    snprintf(path, sizeof path, "%s/%s", dir, lc->file);
    struct st_file *ref = st_open(path, err, sizeof err);
    CHECK(ref != NULL, "%s", err);
    if (!ref) return;
    struct lora_spec spec = {.r = (int)scalar(ref, "lora.r"),
                             .alpha = scalar(ref, "lora.alpha"),
                             .rslora = scalar(ref, "lora.rslora") != 0,
                             .targets = ALL_TARGETS,
                             .experts = lc->experts};
    /* the deepseek fixtures adapt the attention only (lora_reference.py says why) */
    if (st_file_find(ref, "lora.attention_only") && scalar(ref, "lora.attention_only") != 0)
        for (int t = 0; t < LORA_TARGET_COUNT; t++)
            if (!LORA_IS_ATTENTION(t)) spec.targets &= ~(1u << t);
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create_lora(&m, &cfg, &grid, (struct layout_coords){0, 0, 0}, &spec, 7);
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    /* the adapters PEFT made, and no other */
    int adapters = 0, expert_pairs = 0;
    for (int i = 0; i < m.n_params; i++) {
        struct param *p = &m.params[i];
        if (p->kind != PARAM_LORA) continue;
        if (lora_experts_is(p)) {
            double scale;
            CHECK(unfuse(ref, "", p, cfg.num_experts, p->data, &scale), "%s: %s not in PEFT's fused "
                  "expert adapter", name, p->name);
            expert_pairs++;
            continue;
        }
        adapters++;
        const struct st_tensor *t = st_file_find(ref, p->name);
        CHECK(t && (size_t)t->numel == p->numel && t->rank == 2 && t->shape[0] == p->shape[0],
              "%s: %s not in PEFT's adapter as [%lld, %lld]", name, p->name, (long long)p->shape[0],
              (long long)p->shape[1]);
        if (t && (size_t)t->numel == p->numel)
            CHECK(st_read_f32(t, p->data, p->numel, err, sizeof err) == 0, "%s", err);
    }
    int in_file = 0;
    for (int i = 0; i < ref->n_tensors; i++)
        in_file += strstr(ref->tensors[i].name, ".lora_") &&
                   strncmp(ref->tensors[i].name, "grad.", 5) != 0;
    int fused = lc->experts ? 4 * expert_pairs / (4 * cfg.num_experts) : 0; /* per layer: 4 */
    CHECK(adapters + fused == in_file && adapters > 0 && (expert_pairs > 0) == (lc->experts != 0),
          "%s: %d adapters + %d fused expert tensors, PEFT has %d", name, adapters, fused, in_file);

    bool *trainable = xcalloc((size_t)m.n_params, sizeof(bool));
    CHECK(trainable_select(&m, METHOD_LORA, NULL, trainable, err, sizeof err) == 0, "%s", err);
    model_set_trainable(&m, trainable);
    model_zero_grads(&m);
    struct forward_workspace *ws = forward_workspace_new_training(&m, fb.batch.N);
    struct forward_result result;
    model_forward(&m, backend_cpu(), ws, &fb.batch, &result);
    double loss = result.loss_sum / (double)result.loss_count, want = scalar(ref, "loss");
    CHECK(fabs(loss - want) < 1e-5 * fabs(want), "%s: loss %.7f, PEFT %.7f", name, loss, want);
    model_backward(&m, backend_cpu(), ws, &fb.batch, 1.0f / (float)result.loss_count, 0.0f);
    forward_workspace_free(ws);
    double worst = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        CHECK((p->grad != NULL) == (p->kind == PARAM_LORA), "%s: %s %s a gradient", name, p->name,
              p->grad ? "has" : "lacks");
        if (!p->grad) continue;
        if (lora_experts_is(p)) { /* relative to the whole fused gradient: an expert no token
                                   * reached has none */
            float *g = xmalloc(p->numel * sizeof(float));
            double scale;
            CHECK(unfuse(ref, "grad.", p, cfg.num_experts, g, &scale), "grad of %s", p->name);
            double d = 0;
            for (size_t j = 0; j < p->numel; j++) d = fmax(d, fabs((double)p->grad[j] - g[j]));
            CHECK(scale > 0 && d / scale < 1e-3, "%s: %s: error %.3g of max |grad| %.3g", name,
                  p->name, d, scale);
            worst = fmax(worst, scale > 0 ? d / scale : 1);
            free(g);
            continue;
        }
        char gname[PARAM_NAME_MAX + 8];
        snprintf(gname, sizeof gname, "grad.%s", p->name);
        const struct st_tensor *t = st_file_find(ref, gname);
        CHECK(t && (size_t)t->numel == p->numel, "%s missing", gname);
        if (!t || (size_t)t->numel != p->numel) continue;
        float *g = xmalloc(p->numel * sizeof(float));
        CHECK(st_read_f32(t, g, p->numel, err, sizeof err) == 0, "%s", err);
        double scale, diff = max_diff(p->grad, g, p->numel, &scale);
        double rel = scale > 1e-8 ? diff / scale : diff;
        CHECK(scale > 0, "%s: PEFT's gradient of %s is zero (B must be nonzero)", name, p->name);
        CHECK(rel < 1e-3, "%s: %s: relative error %.3g (max |grad| %.3g)", name, p->name, rel,
              scale);
        worst = fmax(worst, rel);
        free(g);
    }
    printf("%s%s: loss %.6f (PEFT %.6f), %d adapter + %d expert pair gradients, worst relative "
           "error %.2e\n", name, lc->experts ? " (experts)" : "", loss, want, adapters, expert_pairs,
           worst);

    /* merged = adapter-applied: W + scale B A written by the merged export, read back as a
     * plain model */
    float *adapted = logits_of(&m, &fb.batch);
    model_merge_lora(&m);
    float *merged_here = logits_of(&m, &fb.batch);
    char out[128];
    snprintf(out, sizeof out, "%s/%s-merged%s", tmp, name, lc->experts ? "-experts" : "");
    CHECK(export_merged(out, &m, dir, (size_t)1 << 30, MPI_COMM_WORLD, err, sizeof err) == 0, "%s",
          err);
    struct model_config merged_cfg;
    CHECK(hfconfig_load(out, &merged_cfg, err, sizeof err) == 0, "%s", err);
    struct model plain;
    model_create(&plain, &merged_cfg, &grid, (struct layout_coords){0, 0, 0});
    CHECK(model_load(&plain, out, err, sizeof err) == 0, "%s", err);
    float *merged = logits_of(&plain, &fb.batch);
    size_t n = (size_t)fb.batch.N * (size_t)cfg.vocab_size;
    double scale, d1 = max_diff(merged_here, adapted, n, &scale),
                  d2 = max_diff(merged, adapted, n, &scale);
    CHECK(d1 < 1e-4 * scale && d2 < 1e-4 * scale,
          "%s: merged logits differ from the adapter-applied ones by %.3g (in place) and %.3g "
          "(exported), max |logit| %.3g",
          name, d1, d2, scale);
    printf("%s: merged export vs adapter-applied logits: max difference %.2e (max |logit| %.2f)\n",
           name, d2, scale);
    free(adapted), free(merged_here), free(merged);
    model_free(&plain);

    /* the adapter as PEFT saved it, folded in (eval.adapter, --apply-adapter): the logits
     * of PEFT's merge_and_unload model */
    char adapter[4200];
    snprintf(adapter, sizeof adapter, "%s/%s", dir, lc->experts ? "lora_experts_adapter" : "lora_adapter");
    const struct st_tensor *peft_logits = st_file_find(ref, "merged.logits");
    CHECK(peft_adapter_is(adapter) && peft_logits, "%s: %s and merged.logits", name, adapter);
    if (peft_adapter_is(adapter) && peft_logits && (size_t)peft_logits->numel == n) {
        struct model folded;
        model_create(&folded, &cfg, &grid, (struct layout_coords){0, 0, 0});
        CHECK(model_load(&folded, dir, err, sizeof err) == 0, "%s", err);
        int tensors = 0;
        CHECK(peft_adapter_apply(&folded, adapter, &tensors, err, sizeof err) == 0, "%s", err);
        float *got = logits_of(&folded, &fb.batch), *want_logits = xmalloc(n * sizeof(float));
        CHECK(st_read_f32(peft_logits, want_logits, n, err, sizeof err) == 0, "%s", err);
        double d3 = max_diff(got, want_logits, n, &scale);
        CHECK(d3 < 1e-4 * scale, "%s: PEFT's adapter folded in: logits differ from PEFT's merged "
              "model's by %.3g (max |logit| %.3g)", name, d3, scale);
        printf("%s: PEFT's adapter folded in (%d tensors) vs PEFT's merged logits: max difference "
               "%.2e\n", name, tensors, d3);
        free(got), free(want_logits);
        model_free(&folded);
    }
    free(trainable);
    model_free(&m);
    st_close(ref);
    fixture_batch_free(&fb);
    st_close(expected);
}

/* PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) from the seed, the same on every layout's
 * holder of a tensor; B zero; model_load leaves them. */
static void check_init(const char *golden)
{
    char dir[4200], err[1024];
    snprintf(dir, sizeof dir, "%s/qwen2_moe", golden);
    struct model_config cfg;
    CHECK(hfconfig_load(dir, &cfg, err, sizeof err) == 0, "%s", err);
    struct lora_spec spec = {.r = 4, .alpha = 8, .targets = ALL_TARGETS};
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct layout_grid two = {.world = 2, .pp = 2, .dp = 1, .ep = 1};
    struct model a, b, c;
    model_create_lora(&a, &cfg, &one, (struct layout_coords){0, 0, 0}, &spec, 11);
    CHECK(model_load(&a, dir, err, sizeof err) == 0, "%s", err);
    model_create_lora(&b, &cfg, &one, (struct layout_coords){0, 0, 0}, &spec, 12);
    model_create_lora(&c, &cfg, &two, (struct layout_coords){1, 0, 0}, &spec, 11);
    int checked = 0, differ = 0;
    for (int i = 0; i < a.n_params; i++) {
        const struct param *p = &a.params[i];
        if (p->kind != PARAM_LORA) continue;
        CHECK(strcmp(p->name, c.params[i].name) == 0, "the same table on every layout");
        double bound = 1.0 / sqrt((double)p->shape[1]), most = 0;
        for (size_t j = 0; j < p->numel; j++) {
            if (p->lora_b) CHECK(p->data[j] == 0.0f, "%s: B not zero", p->name);
            most = fmax(most, fabs(p->data[j]));
            differ += p->data[j] != b.params[i].data[j];
            if (c.params[i].data)
                CHECK(c.params[i].data[j] == p->data[j], "%s: layout-dependent", p->name);
        }
        if (!p->lora_b)
            CHECK(most <= bound && most > 0.5 * bound, "%s: max |A| %g, bound %g", p->name, most,
                  bound);
        checked++;
    }
    CHECK(checked == 42 && differ > 0, "init: %d adapters, %d values differ by seed", checked,
          differ);
    model_free(&a), model_free(&b), model_free(&c);

    unsigned t;
    enum lora_experts x;
    char *ok[] = {"attention", "dense_mlp", "shared_experts"}, *all[] = {"q_proj", "experts"},
         *selected[] = {"selected"}, *both[] = {"experts", "selected"}, *unknown[] = {"w1"};
    CHECK(lora_parse_targets(ok, 3, &t, &x, err, sizeof err) == 0 && t == ALL_TARGETS &&
              x == LORA_EXPERTS_NONE,
          "%s", err);
    CHECK(lora_parse_targets(all, 2, &t, &x, err, sizeof err) == 0 && t == 1u << LORA_Q &&
              x == LORA_EXPERTS_ALL,
          "%s", err);
    CHECK(lora_parse_targets(selected, 1, &t, &x, err, sizeof err) == 0 && t == 0 &&
              x == LORA_EXPERTS_SELECTED,
          "%s", err);
    CHECK(lora_parse_targets(both, 2, &t, &x, err, sizeof err) != 0 && strstr(err, "not both"),
          "experts and selected refused together: %s", err);
    CHECK(lora_parse_targets(unknown, 1, &t, &x, err, sizeof err) != 0 && strstr(err, "'w1'"),
          "%s", err);
    CHECK(lora_target_of("model.layers.0.mlp.experts.3.gate_proj.weight", ALL_TARGETS) < 0,
          "routed experts are not dense MLPs");
    CHECK(lora_target_of("model.layers.0.mlp.shared_expert.up_proj.weight", ALL_TARGETS) ==
              LORA_SHARED_UP,
          "shared expert");
    CHECK(fabsf(lora_scale(&(struct lora_spec){.r = 16, .alpha = 8, .rslora = true}) - 2.0f) <
                  1e-7f &&
              fabsf(lora_scale(&(struct lora_spec){.r = 16, .alpha = 8}) - 0.5f) < 1e-7f,
          "scale alpha/r, rsLoRA alpha/sqrt(r)");
}

/* A LoRA adapter directory esft does not fold is refused with the file and the key (or
 * the tensor): here configs written by hand, and another model's adapter. */
static void check_peft_refusals(const char *golden)
{
    char dir[4200], err[1024], path[4300], command[8800];
    snprintf(dir, sizeof dir, "%s/qwen2_moe", golden);
    struct model_config cfg;
    CHECK(hfconfig_load(dir, &cfg, err, sizeof err) == 0, "%s", err);
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, &cfg, &one, (struct layout_coords){0, 0, 0});
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    static const struct {
        const char *config, *key;
    } cases[] = {
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"use_dora\": true}", "'use_dora'"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"rank_pattern\": {\"q\": 8}}",
         "'rank_pattern'"},
        {"{\"peft_type\": \"LOHA\", \"r\": 4, \"lora_alpha\": 8}", "'peft_type'"},
        {"{\"peft_type\": \"LORA\", \"r\": 0, \"lora_alpha\": 8}", "'r'"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"bias\": \"all\"}", "'bias'"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_parameters\": "
         "[\"mlp.experts.w1\"]}", "'target_parameters'"},
    };
    char adapter[128];
    snprintf(adapter, sizeof adapter, "%s/refused", tmp);
    CHECK(mkdir(adapter, 0755) == 0, "mkdir %s", adapter);
    snprintf(path, sizeof path, "%s/adapter_config.json", adapter);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        FILE *f = fopen(path, "w");
        CHECK(f != NULL, "%s", path);
        if (!f) return;
        fputs(cases[i].config, f);
        fclose(f);
        int n = 0;
        CHECK(peft_adapter_apply(&m, adapter, &n, err, sizeof err) != 0 &&
                  strstr(err, "adapter_config.json: key ") && strstr(err, cases[i].key),
              "refused naming the file and %s: %s", cases[i].key, err);
    }
    /* olmoe's adapter over qwen2_moe: its shapes are another model's */
    snprintf(command, sizeof command, "cp '%s/olmoe/lora_adapter/'* '%s'", golden, adapter);
    CHECK(system(command) == 0, "%s", command);
    int n = 0;
    CHECK(peft_adapter_apply(&m, adapter, &n, err, sizeof err) != 0 &&
              strstr(err, "adapter_model.safetensors: tensor '"),
          "another model's adapter refused naming the tensor: %s", err);
    model_free(&m);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    check_init(golden);
    check_peft_refusals(golden);
    struct lora_case modules = {"lora_expected.safetensors", LORA_EXPERTS_NONE};
    struct lora_case experts = {"lora_experts_expected.safetensors", LORA_EXPERTS_ALL};
    int fixtures = fixture_each(golden, modules.file, check_fixture, &modules);
    CHECK(fixtures >= 2, "found %d LoRA fixtures", fixtures);
    fixtures = fixture_each(golden, experts.file, check_fixture, &experts);
    CHECK(fixtures >= 2, "found %d LoRA fixtures with expert pairs", fixtures);
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", tmp);
    CHECK(system(command) == 0, "%s", command);
    int status = check_done("test_lora");
    MPI_Finalize();
    return status;
}
