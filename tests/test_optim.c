/* test_optim: AdamW, the learning-rate schedules and gradient clipping against values
 * worked out independently (torch.optim.AdamW's update in double precision, by hand, for
 * two parameters over two steps; schedule values from their formulas). Also: the
 * optimizer state covers exactly the trainable tensors. */
#include <math.h>
#include <mpi.h>
#include <string.h>

#include "check.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "optim.h"

static void test_schedules(void)
{
    struct deck_train tr;
    memset(&tr, 0, sizeof tr);
    tr.lr = 1e-3;
    tr.warmup_steps = 4;
    tr.steps = 14;
    tr.lr_schedule = LR_CONSTANT;
    CHECK(fabs(lr_at(&tr, 0) - 2.5e-4) < 1e-12, "warmup step 0: %g", lr_at(&tr, 0));
    CHECK(fabs(lr_at(&tr, 3) - 1e-3) < 1e-12, "warmup step 3: %g", lr_at(&tr, 3));
    CHECK(fabs(lr_at(&tr, 13) - 1e-3) < 1e-12, "constant: %g", lr_at(&tr, 13));
    tr.lr_schedule = LR_LINEAR;
    CHECK(fabs(lr_at(&tr, 4) - 1e-3) < 1e-12, "linear start: %g", lr_at(&tr, 4));
    CHECK(fabs(lr_at(&tr, 9) - 5e-4) < 1e-12, "linear half: %g", lr_at(&tr, 9));
    CHECK(fabs(lr_at(&tr, 14)) < 1e-12, "linear end: %g", lr_at(&tr, 14));
    tr.lr_schedule = LR_COSINE;
    CHECK(fabs(lr_at(&tr, 6) - 9.045084971874737e-4) < 1e-12, "cosine at 0.2: %g", lr_at(&tr, 6));
    CHECK(fabs(lr_at(&tr, 9) - 5e-4) < 1e-12, "cosine half: %g", lr_at(&tr, 9));
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    test_schedules();

    /* a tiny model: only the final norm (two of its weights are watched) trains */
    struct model_config cfg;
    hfconfig_defaults(HF_QWEN3_MOE, &cfg);
    cfg.hidden_size = 2, cfg.num_layers = 1, cfg.num_heads = 1, cfg.num_kv_heads = 1;
    cfg.head_dim = 2, cfg.vocab_size = 3, cfg.intermediate_size = 2;
    cfg.expert_intermediate_size = 2, cfg.num_experts = 2, cfg.top_k = 1;
    char err[512];
    CHECK(hfconfig_finish(&cfg, "test", err, sizeof err) == 0, "%s", err);
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, &cfg, &grid, (struct layout_coords){0, 0, 0});
    bool trainable[256] = {false};
    struct param *norm = model_find_param(&m, "model.norm.weight");
    CHECK(norm != NULL && m.n_params <= 256, "model.norm.weight");
    trainable[norm - m.params] = true;
    model_set_trainable(&m, trainable);
    CHECK(m.grad_floats == 2, "gradient storage: %zu floats for the 2 trainable weights", m.grad_floats);

    struct deck_train tr;
    memset(&tr, 0, sizeof tr);
    tr.lr = 0.1, tr.beta1 = 0.9, tr.beta2 = 0.999, tr.eps = 1e-8, tr.weight_decay = 0.1;
    struct adamw opt;
    adamw_init(&opt, &m, &tr);
    CHECK(opt.n == 2, "optimizer state for %zu values, 2 trainable", opt.n);
    norm->data[0] = 1.0f, norm->data[1] = -2.0f;
    norm->grad[0] = 0.5f, norm->grad[1] = 0.125f;
    adamw_step(&opt, &m, 0.1, 1.0f);
    CHECK(fabs(norm->data[0] - 0.890000002) < 2e-7 && fabs(norm->data[1] + 2.07999999) < 2e-7,
          "AdamW step 1: %.9g %.9g", norm->data[0], norm->data[1]);
    norm->grad[0] = -0.25f, norm->grad[1] = 0.0f;
    adamw_step(&opt, &m, 0.1, 1.0f);
    CHECK(fabs(norm->data[0] - 0.854466299) < 2e-7 && fabs(norm->data[1] + 2.12620581) < 2e-7,
          "AdamW step 2: %.9g %.9g", norm->data[0], norm->data[1]);

    /* clipping: norm of (3, 4) is 5; scaled to norm 1 */
    norm->grad[0] = 3.0f, norm->grad[1] = 4.0f;
    CHECK(fabs(grad_norm(&m) - 5.0) < 1e-12, "grad norm %g", grad_norm(&m));
    grad_scale(&m, (float)(1.0 / (5.0 + 1e-6)));
    CHECK(fabs(norm->grad[0] - 0.6f) < 1e-6 && fabs(norm->grad[1] - 0.8f) < 1e-6, "clipped %g %g",
          norm->grad[0], norm->grad[1]);
    /* the clipping folded into the step: the bits of a scaling pass and a step at 1 */
    struct adamw twin;
    adamw_init(&twin, &m, &tr);
    float start[2] = {norm->data[0], norm->data[1]}, clipped[2], *moments[2] = {opt.m, opt.v};
    float saved[2][2] = {{opt.m[0], opt.m[1]}, {opt.v[0], opt.v[1]}};
    adamw_step(&opt, &m, 0.1, 1.0f); /* gradients already scaled above */
    clipped[0] = norm->data[0], clipped[1] = norm->data[1];
    norm->data[0] = start[0], norm->data[1] = start[1];
    norm->grad[0] = 3.0f, norm->grad[1] = 4.0f;
    for (int k = 0; k < 2; k++) memcpy(k ? twin.v : twin.m, saved[k], sizeof saved[k]);
    twin.step = opt.step - 1;
    adamw_step(&twin, &m, 0.1, (float)(1.0 / (5.0 + 1e-6)));
    CHECK(memcmp(&norm->data[0], &clipped[0], sizeof(float)) == 0 &&
              memcmp(&norm->data[1], &clipped[1], sizeof(float)) == 0 &&
              memcmp(twin.m, moments[0], 2 * sizeof(float)) == 0 &&
              memcmp(twin.v, moments[1], 2 * sizeof(float)) == 0,
          "clipping in the step: %.9g %.9g, against a scaling pass: %.9g %.9g", norm->data[0],
          norm->data[1], clipped[0], clipped[1]);
    /* the step reads each gradient once and leaves it zero for the next step, so the
     * next model_zero_grads has nothing to do */
    CHECK(norm->grad[0] == 0.0f && norm->grad[1] == 0.0f && m.grads_zeroed,
          "after the step: gradients %g %g, not cleared", norm->grad[0], norm->grad[1]);
    norm->grad[0] = 1.0f;
    m.grads_zeroed = false;
    model_zero_grads(&m);
    CHECK(norm->grad[0] == 0.0f, "model_zero_grads left %g", norm->grad[0]);
    adamw_free(&twin);
    /* frozen tensors: no gradient buffer */
    for (int i = 0; i < m.n_params; i++)
        CHECK((m.params[i].grad != NULL) == trainable[i], "%s", m.params[i].name);
    adamw_free(&opt);
    model_free(&m);
    int status = check_done("test_optim");
    MPI_Finalize();
    return status;
}
