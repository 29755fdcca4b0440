/* test_params: the parameter table against the checkpoints and the layouts.
 *
 * For every golden fixture: the table's names are exactly the checkpoint's tensors
 * (with fused experts spelled per expert), with the same shapes. Then, for every layout
 * (pp, ep) the model admits, building the model once per rank coordinate must place
 * each tensor on exactly the ranks that should hold it: a routed expert on one EP rank
 * of one stage (the one layout_expert_owner names), everything else on every EP rank of
 * its stage, embedding on the first stage, final norm and lm_head on the last; and the
 * expert blocks of model.h must be contiguous per layer and part. hfconfig_count, which
 * the size limits are checked with, counts the table's tensors and parameters.
 * Usage: test_params [GOLDEN_DIR] */
#include <dirent.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "hfconfig.h"
#include "layout.h"
#include "log.h"
#include "model.h"
#include "safetensors.h"

/* gpt_oss's routed experts are stored fused (transformers 5.24 GptOssExperts):
 * mlp.experts.gate_up_proj and its _bias hold each expert's gate and up, down_proj and its
 * _bias its down; an MXFP4 checkpoint stores the two matrices as _blocks (beside _scales,
 * which are no entry of their own). How many table entries a checkpoint tensor stands for
 * (0 for the scales), and the fused tensor that holds table entry p (NULL: none). */
static int fused_entries(const struct model_config *c, const char *tensor)
{
    int layer, n = 0;
    char rest[64] = "";
    if (c->family != HF_GPT_OSS ||
        sscanf(tensor, "model.layers.%d.mlp.experts.%63s%n", &layer, rest, &n) != 2)
        return 1;
    if (strcmp(rest, "gate_up_proj") == 0 || strcmp(rest, "gate_up_proj_bias") == 0 ||
        strcmp(rest, "gate_up_proj_blocks") == 0)
        return 2 * c->num_experts;
    if (strcmp(rest, "down_proj") == 0 || strcmp(rest, "down_proj_bias") == 0 ||
        strcmp(rest, "down_proj_blocks") == 0)
        return c->num_experts;
    if (strcmp(rest, "gate_up_proj_scales") == 0 || strcmp(rest, "down_proj_scales") == 0)
        return 0;
    return 1;
}

static const struct st_tensor *fused_origin(const struct model_config *c,
                                            const struct st_checkpoint *ckpt,
                                            const struct param *p)
{
    if (c->family != HF_GPT_OSS || p->kind != PARAM_EXPERT) return NULL;
    char fused[PARAM_NAME_MAX + 32];
    const char *matrix = p->part == MLP_DOWN ? "down_proj" : "gate_up_proj";
    snprintf(fused, sizeof fused, "model.layers.%d.mlp.experts.%s%s", p->layer, matrix,
             p->rank == 1 ? "_bias" : "");
    const struct st_tensor *t = st_find(ckpt, fused);
    if (t || p->rank == 1) return t;
    snprintf(fused, sizeof fused, "model.layers.%d.mlp.experts.%s_blocks", p->layer, matrix);
    return st_find(ckpt, fused);
}

static void check_against_checkpoint(const char *dir, const char *name)
{
    char err[1024];
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, sizeof err) != 0) {
        CHECK(0, "%s", err);
        return;
    }
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, sizeof err);
    if (!ckpt) {
        CHECK(0, "%s", err);
        return;
    }
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, &cfg, &one, (struct layout_coords){0, 0, 0});
    /* every checkpoint tensor is in the table, except fp8 scales (a <name>_scale_inv beside
     * each quantised weight) and the tensors of the multi-token-prediction layers past
     * num_hidden_layers (glm4_moe's fixture carries some; nobody reads them) */
    int scales = 0, mtp = 0, entries = 0;
    for (int i = 0; i < ckpt->n_tensors; i++) {
        size_t n = strlen(ckpt->tensors[i].name);
        int layer;
        if (sscanf(ckpt->tensors[i].name, "model.layers.%d.", &layer) == 1 && layer >= cfg.num_layers)
            mtp++;
        else if (n > 10 && strcmp(ckpt->tensors[i].name + n - 10, "_scale_inv") == 0)
            scales++;
        else
            entries += fused_entries(&cfg, ckpt->tensors[i].name);
    }
    CHECK(mtp == 0 || cfg.num_mtp_layers > 0, "%s: %d tensors past the last layer, and no MTP layer",
          name, mtp);
    CHECK(m.n_params == entries,
          "%s: table has %d entries, checkpoint %d tensors (%d fp8 scales, %d of MTP layers; "
          "fused experts count once per expert)", name, m.n_params, ckpt->n_tensors, scales, mtp);
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        const struct st_tensor *t = st_find(ckpt, p->name);
        /* a fused expert's shape is the loader's to check (model_check_checkpoint, below) */
        CHECK(t != NULL || fused_origin(&cfg, ckpt, p) != NULL,
              "%s: table entry %s is not in the checkpoint", name, p->name);
        if (!t) continue;
        CHECK(t->rank == p->rank && t->shape[0] == p->shape[0] &&
                  (p->rank == 1 || t->shape[1] == p->shape[1]),
              "%s: %s shape differs from the checkpoint", name, p->name);
        for (int j = 0; j < i; j++)
            CHECK(strcmp(p->name, m.params[j].name) != 0, "%s: %s twice", name, p->name);
    }
    uint64_t parameters = 0, tensors = 0, table_parameters = 0;
    for (int i = 0; i < m.n_params; i++) table_parameters += m.params[i].numel;
    CHECK(hfconfig_count(&cfg, &parameters, &tensors) == 0, "%s: hfconfig_count failed", name);
    CHECK(tensors == (uint64_t)m.n_params && parameters == table_parameters,
          "%s: hfconfig_count gives %llu tensors, %llu parameters; the table has %d, %llu", name,
          (unsigned long long)tensors, (unsigned long long)parameters, m.n_params,
          (unsigned long long)table_parameters);
    model_free(&m);
    st_checkpoint_close(ckpt);
    CHECK(model_check_checkpoint(&cfg, &one, (struct layout_coords){0, 0, 0}, dir, err,
                                 sizeof err) == 0,
          "%s: %s", name, err);

    /* every layout this model admits, up to 8 stages and 8 EP ranks */
    for (int pp = 1; pp <= 8 && pp <= cfg.num_layers; pp++)
        for (int ep = 1; ep <= 8; ep++) {
            if (cfg.num_experts % ep) continue;
            struct layout_grid grid = {.world = pp * ep, .pp = pp, .dp = 1, .ep = ep};
            int n = 0;
            struct model *models = xcalloc((size_t)(pp * ep), sizeof *models);
            for (int s = 0; s < pp; s++)
                for (int r = 0; r < ep; r++)
                    model_create(&models[n++], &cfg, &grid, (struct layout_coords){s, 0, r});
            int wrong = 0, split[LAYOUT_MAX_STAGES + 1];
            model_split_layers(&cfg, &grid, split);
            for (int k = 0; k < n; k++)
                for (int s = 0; s <= pp; s++) wrong += models[k].stage_first[s] != split[s];
            for (int i = 0; i < models[0].n_params; i++) {
                const struct param *p = &models[0].params[i];
                int expected_stage = p->layer >= 0 ? -1 : p->kind == PARAM_EMBEDDING ? 0 : pp - 1;
                if (p->layer >= 0)
                    for (int s = 0; s < pp; s++) /* the split every model_create agrees on */
                        if (p->layer >= split[s] && p->layer < split[s + 1]) expected_stage = s;
                for (int s = 0; s < pp; s++)
                    for (int r = 0; r < ep; r++) {
                        bool held = models[s * ep + r].params[i].data != NULL;
                        bool should = s == expected_stage &&
                                      (p->kind != PARAM_EXPERT ||
                                       layout_expert_owner(cfg.num_experts, ep, p->expert) == r);
                        wrong += held != should;
                    }
            }
            CHECK(wrong == 0, "%s: pp %d ep %d: %d wrong placements", name, pp, ep, wrong);
            /* per-layer experts: each matrix in its layer's array, each bias at
             * block + (e - first) * size */
            for (int k = 0; k < n; k++) {
                const struct model *mk = &models[k];
                for (int i = 0; i < mk->n_params; i++) {
                    const struct param *p = &mk->params[i];
                    if (p->kind != PARAM_EXPERT || !p->data) continue;
                    const struct layer_weights *w = &mk->layers[p->layer];
                    int local = p->expert - mk->first_expert;
                    if (p->rank == 2) { /* matrices: the layer's per-expert arrays */
                        const float *const *experts = p->part == MLP_GATE ? w->expert_gate
                                                      : p->part == MLP_UP ? w->expert_up
                                                                          : w->expert_down;
                        CHECK(p->data == experts[local], "%s: pp %d ep %d: %s is not its "
                              "expert's matrix in the layer", name, pp, ep, p->name);
                        continue;
                    }
                    /* gpt_oss's expert biases: one block per part */
                    const float *block = p->part == MLP_GATE ? w->expert_gate_bias
                                         : p->part == MLP_UP ? w->expert_up_bias
                                                             : w->expert_down_bias;
                    CHECK(p->data == block + (size_t)local * p->numel,
                          "%s: pp %d ep %d: %s is not at its place in the layer's block", name,
                          pp, ep, p->name);
                }
                model_free(&models[k]);
            }
            free(models);
        }
}

/* The stage split, worked by hand on a model of 3 equal layers of cost c whose lm_head
 * costs h: pp 2 can split [1,2] (largest stage 2c + h) or [2,1] (largest max(2c, c + h)).
 * h = 0: a tie at 2c, the earliest cut wins: [1,2]. h = c/2: [2,1] (2c against 2.5c).
 * pp 3: one layer each. parallel.stage_layers overrides the balance. */
static void check_split(const char *dir)
{
    struct model_config cfg;
    char err[1024];
    CHECK(hfconfig_load(dir, &cfg, err, sizeof err) == 0, "%s", err);
    CHECK(cfg.num_layers == 3 && cfg.is_moe[0] && cfg.is_moe[1] && cfg.is_moe[2], "%s: 3 MoE layers", dir);
    double c = model_layer_cost(&cfg, 0);
    CHECK(c > 0 && c == model_layer_cost(&cfg, 2), "equal layer costs");
    struct layout_grid grid = {.world = 2, .pp = 2, .dp = 1, .ep = 1};
    int first[4];
    cfg.vocab_size = 0;
    model_split_layers(&cfg, &grid, first);
    CHECK(first[0] == 0 && first[1] == 1 && first[2] == 3, "h = 0: split at %d, want 1", first[1]);
    cfg.vocab_size = (int)(0.5 * c / cfg.hidden_size);
    model_split_layers(&cfg, &grid, first);
    CHECK(first[1] == 2 && first[2] == 3, "h = c/2: split at %d, want 2", first[1]);
    grid.stage_layers[0] = 1, grid.stage_layers[1] = 2;
    model_split_layers(&cfg, &grid, first);
    CHECK(first[1] == 1 && first[2] == 3, "the deck's split: at %d, want 1", first[1]);
    struct layout_grid three = {.world = 3, .pp = 3, .dp = 1, .ep = 1};
    model_split_layers(&cfg, &three, first);
    CHECK(first[1] == 1 && first[2] == 2 && first[3] == 3, "pp 3: one layer each");

    /* Against every split, exhaustively: 9 layers, MoE and dense mixed (unequal costs),
     * three lm_head costs, pp 1 to 4: contiguous blocks of at least one layer covering
     * all layers, whose largest stage cost is the smallest any split achieves. */
    cfg.num_layers = 9;
    for (int l = 0; l < 9; l++) cfg.is_moe[l] = l % 3 != 1;
    for (int pp = 1; pp <= 4; pp++)
        for (int head = 0; head < 3; head++) {
            cfg.vocab_size = head * (int)(model_layer_cost(&cfg, 0) / cfg.hidden_size);
            struct layout_grid g = {.world = pp, .pp = pp, .dp = 1, .ep = 1};
            int got[5];
            model_split_layers(&cfg, &g, got);
            double worst = 0, best = INFINITY;
            bool valid = got[0] == 0 && got[pp] == 9;
            for (int st = 0; st < pp; st++) {
                valid = valid && got[st + 1] > got[st];
                double stage = st == pp - 1 ? model_head_cost(&cfg) : 0;
                for (int l = got[st]; l < got[st + 1]; l++) stage += model_layer_cost(&cfg, l);
                worst = fmax(worst, stage);
            }
            /* every split: cut points as a bit mask over the 8 gaps */
            for (int mask = 0; mask < 256; mask++) {
                if (__builtin_popcount(mask) != pp - 1) continue;
                double largest = 0, stage = 0;
                for (int l = 0; l < 9; l++) {
                    stage += model_layer_cost(&cfg, l);
                    if (l == 8) stage += model_head_cost(&cfg);
                    if (l == 8 || (mask >> l & 1)) largest = fmax(largest, stage), stage = 0;
                }
                best = fmin(best, largest);
            }
            CHECK(valid && worst == best, "pp %d, head %d: split's largest stage %g, best %g",
                  pp, head, worst, best);
        }
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    DIR *d = opendir(golden);
    CHECK(d != NULL, "cannot open %s", golden);
    int fixtures = 0;
    struct dirent *entry;
    while (d && (entry = readdir(d))) {
        char dir[4096], probe[4200];
        struct stat st;
        snprintf(dir, sizeof dir, "%s/%s", golden, entry->d_name);
        snprintf(probe, sizeof probe, "%s/config.json", dir);
        if (entry->d_name[0] == '.' || stat(probe, &st) != 0) continue;
        check_against_checkpoint(dir, entry->d_name);
        fixtures++;
    }
    if (d) closedir(d);
    CHECK(fixtures >= 7, "found %d fixtures in %s", fixtures, golden);
    char qwen3[4200];
    snprintf(qwen3, sizeof qwen3, "%s/qwen3_moe", golden);
    check_split(qwen3);
    int status = check_done("test_params");
    MPI_Finalize();
    return status;
}
