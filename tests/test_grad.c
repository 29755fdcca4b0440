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
 * Under mpirun with PP EP arguments the same comparison runs split over ranks (grid
 * pp x 1 x ep): every stage passes the whole batch through its layers; under EP, EP rank
 * 0 carries the batch and the others pass empty batches (their experts still receive
 * rank 0's tokens), then the replicated gradients are summed over the EP group as the
 * train phase does. Each rank compares the gradients of the tensors it holds (full
 * fine-tuning, cross-entropy; then the aux loss on the routers). Fixtures with tied
 * embeddings are skipped under pp > 1 (refused there).
 * Usage: test_grad [GOLDEN_DIR [PP EP]] */
#include <dirent.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "c2r.h"
#include "check.h"
#include "fixture.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "safetensors.h"
#include "trainable.h"

static char tmp[64] = "/tmp/esft-grad.XXXXXX";

/* gpt_oss's reference gradients of a routed expert come in transformers' fused layout
 * (GptOssExperts): PREFIX.model.layers.L.mlp.experts.gate_up_proj [E, H, 2I] (gate the
 * even columns, up the odd), gate_up_proj_bias [E, 2I], down_proj [E, I, H],
 * down_proj_bias [E, H]. ref[p->numel] = expert p->expert's entry in esft's layout
 * (gate [I, H], down [H, I]); -1 when the fused tensor is missing. */
static int fused_gpt_oss_reference(const struct st_file *expected, const char *prefix,
                                   const struct model_config *c, const struct param *p, float *ref)
{
    bool down = p->part == MLP_DOWN, up = p->part == MLP_UP, bias = p->rank == 1;
    char name[PARAM_NAME_MAX + 64];
    snprintf(name, sizeof name, "%s.model.layers.%d.mlp.experts.%s%s", prefix, p->layer,
             down ? "down_proj" : "gate_up_proj", bias ? "_bias" : "");
    const struct st_tensor *t = st_file_find(expected, name);
    if (!t) return -1;
    size_t E = (size_t)c->num_experts, I = (size_t)c->expert_intermediate_size;
    size_t H = (size_t)c->hidden_size, e = (size_t)p->expert;
    size_t total = down ? E * (bias ? H : I * H) : E * 2 * I * (bias ? 1 : H);
    if ((size_t)t->numel != total) return -1;
    float *all = xmalloc(total * sizeof(float));
    char err[256];
    CHECK(st_read_f32(t, all, total, err, sizeof err) == 0, "%s", err);
    for (size_t j = 0; j < p->numel; j++) {
        size_t r = bias ? 0 : j / (down ? I : H), col = bias ? j : j % (down ? I : H);
        if (bias)
            ref[j] = down ? all[e * H + j] : all[e * 2 * I + 2 * j + (up ? 1 : 0)];
        else if (down) /* down[h][i] = down_proj[e][i][h] */
            ref[j] = all[(e * I + col) * H + r];
        else /* gate[i][h] = gate_up_proj[e][h][2i (+1)] */
            ref[j] = all[(e * H + col) * 2 * I + 2 * r + (up ? 1 : 0)];
    }
    free(all);
    return 0;
}

/* max |p->grad - PREFIX.<name>| / max |PREFIX.<name>| (the difference itself when the
 * reference is ~0; +inf when the reference is missing); *scale = max |reference|. */
static double gradient_error(const struct st_file *expected, const char *prefix,
                             const struct model_config *c, const struct param *p, double *scale)
{
    char ref_name[PARAM_NAME_MAX + 16];
    snprintf(ref_name, sizeof ref_name, "%s.%s", prefix, p->name);
    const struct st_tensor *t = st_file_find(expected, ref_name);
    *scale = 0;
    float *ref = xmalloc(p->numel * sizeof(float));
    bool fused = !t && c->family == HF_GPT_OSS && p->kind == PARAM_EXPERT &&
                 fused_gpt_oss_reference(expected, prefix, c, p, ref) == 0;
    CHECK(fused || (t && (size_t)t->numel == p->numel), "%s missing", ref_name);
    if (!fused && (!t || (size_t)t->numel != p->numel)) {
        free(ref);
        return INFINITY;
    }
    char err[256];
    if (!fused) CHECK(st_read_f32(t, ref, p->numel, err, sizeof err) == 0, "%s", err);
    double diff = 0;
    for (size_t j = 0; j < p->numel; j++) {
        diff = fmax(diff, fabs((double)p->grad[j] - ref[j]));
        *scale = fmax(*scale, fabs((double)ref[j]));
    }
    free(ref);
    return *scale > 1e-8 ? diff / *scale : diff;
}

/* The batch with its loss_scale, 1 / counted targets, as esft's training sets it: a
 * training workspace then takes the loss through lm_head in the forward (the head by
 * token rows; ESFT_HEAD_ROWS small: several blocks). */
static struct batch with_loss_scale(const struct batch *batch)
{
    struct batch b = *batch;
    long long counted = 0;
    for (int t = 0; t < b.N; t++) counted += b.targets[t] >= 0;
    b.loss_scale = counted > 0 ? 1.0f / (float)counted : 0.0f;
    return b;
}

/* The gradients of one forward and backward (the loss, plus 0.01 x the balance loss),
 * kept activations or recomputed (forward_workspace_new_recompute): a copy of them all. */
static float *gradients_of(struct model *m, const struct batch *batch, bool recompute)
{
    model_zero_grads(m);
    struct forward_workspace *ws = recompute ? forward_workspace_new_recompute(m, batch->N)
                                             : forward_workspace_new_training(m, batch->N);
    struct forward_result result;
    struct batch scaled = with_loss_scale(batch);
    model_forward(m, backend_cpu(), ws, &scaled, &result);
    CHECK(scaled.loss_scale == 1.0f / (float)result.loss_count, "loss_scale %g, %lld targets counted",
          (double)scaled.loss_scale, result.loss_count);
    model_backward(m, backend_cpu(), ws, &scaled, scaled.loss_scale, 0.01f);
    forward_workspace_free(ws);
    float *copy = xmalloc((m->grad_floats ? m->grad_floats : 1) * sizeof(float));
    memcpy(copy, m->grad_storage, m->grad_floats * sizeof(float));
    return copy;
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
    struct batch scaled = with_loss_scale(batch);
    model_forward(m, backend_cpu(), ws, &scaled, &result);
    model_backward(m, backend_cpu(), ws, &scaled, scaled.loss_scale, 0.0f);
    double worst = 0;
    int compared = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        CHECK(trainable[i] == (p->grad != NULL), "%s %s: %s %s a gradient buffer", name, what,
              p->name, p->grad ? "has" : "lacks");
        if (!p->grad) continue;
        double scale, rel = gradient_error(expected, "grad", &m->cfg, p, &scale);
        CHECK(rel < 1e-3, "%s %s: %s: relative error %.3g (max |grad| %.3g)", name, what, p->name,
              rel, scale);
        worst = fmax(worst, rel);
        compared++;
    }
    printf("%s %s: %d gradients, worst relative error %.2e\n", name, what, compared, worst);
    forward_workspace_free(ws);

    /* train.recompute: the same gradients bit for bit, with the balance loss on too (the
     * sequence-level one of deepseek_v2 included) */
    float *kept = gradients_of(m, batch, false), *again = gradients_of(m, batch, true);
    size_t differ = 0;
    for (size_t j = 0; j < m->grad_floats; j++)
        differ += memcmp(&kept[j], &again[j], sizeof(float)) != 0;
    CHECK(differ == 0, "%s %s: %zu of %zu gradient values differ under recompute", name, what,
          differ, m->grad_floats);
    if (differ == 0)
        printf("%s %s: recompute: %zu gradient values bitwise equal\n", name, what, m->grad_floats);
    free(kept), free(again);
}

/* Whether every MoE layer's top-k ids equal base's ([L] -> [N*K], NULL for dense). */
static bool same_routing(const struct model *m, int32_t *const *base, int32_t *const *ids, int N)
{
    for (int l = 0; l < m->cfg.num_layers; l++)
        if (base[l] && memcmp(base[l], ids[l], (size_t)N * m->cfg.top_k * sizeof(int32_t)) != 0)
            return false;
    return true;
}

static float read_scalar(const struct st_file *f, const char *name)
{
    const struct st_tensor *t = st_file_find(f, name);
    float v = NAN;
    char err[256];
    CHECK(t && t->numel == 1 && st_read_f32(t, &v, 1, err, sizeof err) == 0, "%s", name);
    return v;
}

/* Every tensor trainable, gradients zeroed, and the forward of batch on the CPU backend in
 * a training workspace (returned, for the backward). */
static struct forward_workspace *forward_all_trainable(struct model *m, const struct batch *batch,
                                                       struct forward_result *result)
{
    bool *all = xmalloc((size_t)m->n_params * sizeof(bool));
    for (int i = 0; i < m->n_params; i++) all[i] = true;
    model_set_trainable(m, all);
    free(all);
    model_zero_grads(m);
    struct forward_workspace *ws = forward_workspace_new_training(m, batch->N);
    model_forward(m, backend_cpu(), ws, batch, result);
    return ws;
}

/* The load-balancing loss: its value against transformers' `aux_loss`; its gradient alone
 * (loss_scale 0) on every router against `grad_aux.<router>`; and, since transformers
 * stores no aux gradient below the routers, the gradient it sends into the layers below
 * (a query projection and an input norm of the first layer) against central finite
 * differences of the aux loss computed by model_forward. */
static void check_aux(const char *name, struct model *m, const struct st_file *expected,
                      const struct batch *batch)
{
    if (!st_file_find(expected, "aux_loss")) { /* deepseek, glm: transformers adds none */
        printf("%s aux: none in transformers for this family, not checked\n", name);
        return;
    }
    struct forward_result result;
    struct forward_workspace *ws = forward_all_trainable(m, batch, &result);
    float want = read_scalar(expected, "aux_loss");
    CHECK(fabs(result.aux_loss - want) <= 1e-5 * fabs(want), "%s: aux loss %.9g, transformers %.9g",
          name, result.aux_loss, want);
    model_backward(m, backend_cpu(), ws, batch, 0.0f, 1.0f);
    double worst = 0;
    int routers = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (p->kind != PARAM_ROUTER) continue;
        double scale, rel = gradient_error(expected, "grad_aux", &m->cfg, p, &scale);
        CHECK(scale > 0 && rel < 1e-3, "%s: grad_aux.%s: relative error %.3g", name, p->name, rel);
        worst = fmax(worst, rel);
        routers++;
    }
    CHECK(routers > 0, "%s: no router compared", name);

    /* below the routers: finite differences on the first layer */
    int32_t **base = xcalloc((size_t)m->cfg.num_layers, sizeof *base);
    for (int l = 0; l < m->cfg.num_layers; l++) {
        if (!result.topk_ids[l]) continue;
        size_t bytes = (size_t)batch->N * m->cfg.top_k * sizeof(int32_t);
        base[l] = xmalloc(bytes);
        memcpy(base[l], result.topk_ids[l], bytes);
    }
    struct forward_workspace *probe = forward_workspace_new(m, batch->N);
    double fd_worst = 0;
    int probes = 0;
    const char *names[2] = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"};
    for (int t = 0; t < 2; t++) {
        struct param *p = model_find_param(m, names[t]);
        CHECK(p != NULL, "%s: no %s", name, names[t]);
        if (!p) continue;
        double diff = 0, scale = 0;
        for (size_t j = 0; j < p->numel; j += p->numel / 7 + 1) {
            /* the top-k choice is piecewise constant: a step that changes it is no
             * derivative, so shrink the step until the routing stays that of the base */
            float saved = p->data[j], h = 1e-2f;
            double fd = NAN;
            for (int tries = 0; tries < 4 && isnan(fd); tries++, h *= 0.25f) {
                struct forward_result up, down;
                p->data[j] = saved + h;
                model_forward(m, backend_cpu(), probe, batch, &up);
                bool same = same_routing(m, base, up.topk_ids, batch->N);
                p->data[j] = saved - h;
                model_forward(m, backend_cpu(), probe, batch, &down);
                same = same && same_routing(m, base, down.topk_ids, batch->N);
                p->data[j] = saved;
                if (same) fd = (up.aux_loss - down.aux_loss) / (2.0 * h);
            }
            if (isnan(fd)) continue;
            probes++;
            diff = fmax(diff, fabs(fd - p->grad[j]));
            scale = fmax(scale, fabs(fd));
        }
        CHECK(scale > 1e-6 && diff / scale < 2e-2, "%s: aux gradient of %s: finite differences "
              "differ by %.3g relative (max %.3g)", name, names[t], diff / scale, scale);
        fd_worst = fmax(fd_worst, diff / fmax(scale, 1e-30));
    }
    CHECK(probes >= 8, "%s: only %d finite-difference probes kept the routing", name, probes);
    printf("%s aux: loss %.7f (transformers %.7f), %d routers, worst relative error %.2e; "
           "first layer vs %d finite differences %.2e\n", name, result.aux_loss, want, routers,
           worst, probes, fd_worst);
    for (int l = 0; l < m->cfg.num_layers; l++) free(base[l]);
    free(base);
    forward_workspace_free(probe);
    forward_workspace_free(ws);
}

/* deepseek_v2's sequence-level balance loss (balance_seq.c) against the hand-written
 * PyTorch version of the ESFT reference's formula (tests/golden/seq_aux_reference.py, in
 * the fixture's seq_aux.safetensors): the sequences are the fixture's rows, passed as
 * blocks; its value, and its gradient alone (loss_scale 0) on every weight. */
static void check_seq_aux(const char *name, const char *dir, struct model *m,
                          const struct st_file *expected, const struct batch *batch)
{
    char path[4200], err[512];
    snprintf(path, sizeof path, "%s/seq_aux.safetensors", dir);
    if (access(path, R_OK) != 0) return;
    struct st_file *want = st_open(path, err, sizeof err);
    CHECK(want != NULL, "%s", err);
    if (!want) return;
    const struct st_tensor *ids = st_file_find(expected, "input_ids");
    int T = (int)ids->shape[1];
    int32_t *rows = xmalloc((size_t)batch->N * sizeof(int32_t));
    for (int n = 0; n < batch->N; n++) rows[n] = n - n % T;
    struct batch blocks = *batch;
    blocks.block_start = rows;
    struct forward_result result;
    struct forward_workspace *ws = forward_all_trainable(m, &blocks, &result);
    float loss = read_scalar(want, "seq_aux_loss");
    CHECK(fabs(result.aux_loss - loss) <= 1e-5 * fabs(loss),
          "%s: sequence aux loss %.9g, the reference formula %.9g", name, result.aux_loss, loss);
    model_backward(m, backend_cpu(), ws, &blocks, 0.0f, 1.0f);
    double worst = 0;
    int compared = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!p->grad) continue;
        double scale, rel = gradient_error(want, "grad_seq_aux", &m->cfg, p, &scale);
        CHECK(rel < 1e-3, "%s: grad_seq_aux.%s: relative error %.3g", name, p->name, rel);
        worst = fmax(worst, rel);
        compared++;
    }
    printf("%s sequence aux: %.7f (reference %.7f), %d gradients, worst relative error %.2e\n",
           name, result.aux_loss, loss, compared, worst);
    forward_workspace_free(ws);
    free(rows);
    st_close(want);
}

/* C2R routing (c2r.h) against the hand-written PyTorch C2R router of
 * tests/golden/c2r_reference.py (the fixture's c2r.safetensors, with the lists of its
 * c2r_config.json read as model.c2r_config is): every MoE layer's chosen ids exactly,
 * their weights, the loss, and the gradient of the loss on every weight. */
static void check_c2r(const char *name, const char *dir, struct model *m, const struct batch *batch)
{
    char path[4200], config[4200], err[1024];
    snprintf(path, sizeof path, "%s/c2r.safetensors", dir);
    snprintf(config, sizeof config, "%s/c2r_config.json", dir);
    if (access(path, R_OK) != 0) return;
    struct st_file *want = st_open(path, err, sizeof err);
    CHECK(want != NULL, "%s", err);
    struct c2r_lists lists;
    int read = c2r_read_config(config, &m->cfg, &lists, err, sizeof err);
    CHECK(read == 0, "%s", err);
    if (!want || read != 0) {
        if (want) st_close(want);
        return;
    }
    /* the CPU backend reads the model's host memory: the lists as c2r_attach keeps them */
    m->c2r_collaborators = lists.collaborators;
    m->c2r_top_t = lists.top_t;
    struct forward_result result;
    struct forward_workspace *ws = forward_all_trainable(m, batch, &result);
    int K = m->cfg.top_k, N = batch->N, layers = 0;
    double worst_weight = 0;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        if (!m->cfg.is_moe[l]) continue;
        char key[64];
        snprintf(key, sizeof key, "c2r.%d.topk_ids", l);
        const struct st_tensor *ids = st_file_find(want, key);
        snprintf(key, sizeof key, "c2r.%d.topk_weights", l);
        const struct st_tensor *weights = st_file_find(want, key);
        CHECK(ids && ids->dtype == ST_I32 && ids->numel == (int64_t)N * K && weights &&
                  weights->numel == (int64_t)N * K, "%s: c2r.%d missing", name, l);
        if (!ids || !weights || ids->dtype != ST_I32 || ids->numel != (int64_t)N * K ||
            weights->numel != (int64_t)N * K)
            continue;
        int32_t *want_ids = xmalloc((size_t)N * K * sizeof(int32_t));
        memcpy(want_ids, ids->data, (size_t)N * K * sizeof(int32_t)); /* maybe unaligned */
        float *want_weights = xmalloc((size_t)N * K * sizeof(float));
        CHECK(st_read_f32(weights, want_weights, (size_t)N * K, err, sizeof err) == 0, "%s", err);
        int wrong = 0;
        for (int s = 0; s < N * K; s++) {
            wrong += result.topk_ids[l][s] != want_ids[s];
            worst_weight = fmax(worst_weight, fabs(result.topk_weights[l][s] - want_weights[s]));
        }
        CHECK(wrong == 0, "%s: layer %d: %d of %d C2R choices differ from the PyTorch router's",
              name, l, wrong, N * K);
        free(want_weights);
        free(want_ids);
        layers++;
    }
    CHECK(worst_weight < 1e-5, "%s: C2R weights differ by %.3g", name, worst_weight);
    float loss = read_scalar(want, "loss");
    double mine = result.loss_sum / (double)result.loss_count;
    CHECK(fabs(mine - loss) <= 1e-5 * fabs(loss), "%s: C2R loss %.9g, PyTorch %.9g", name, mine,
          loss);
    model_backward(m, backend_cpu(), ws, batch, 1.0f / (float)result.loss_count, 0.0f);
    double worst = 0;
    int compared = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!p->grad || p->buffer) continue;
        double scale, rel = gradient_error(want, "grad", &m->cfg, p, &scale);
        CHECK(rel < 1e-3, "%s: C2R grad.%s: relative error %.3g", name, p->name, rel);
        worst = fmax(worst, rel);
        compared++;
    }
    printf("%s C2R: ids of %d MoE layers equal, weights within %.1e, loss %.7f (PyTorch %.7f), "
           "%d gradients, worst relative error %.2e\n",
           name, layers, worst_weight, mine, loss, compared, worst);
    forward_workspace_free(ws);
    m->c2r_collaborators = NULL;
    m->c2r_top_t = 0;
    c2r_lists_free(&lists);
    st_close(want);
}

/* The layout variant (see the top): returns the number of gradients compared here. */
/* top_only: only the routed experts of the last MoE layer train, so the backward stops
 * there (model.h's backward_floor): the stages below it do no backward, and that layer's
 * attention and input gradient are skipped; the gradients that remain must still be
 * transformers'. Otherwise every tensor trains. */
static int check_layout(const char *name, const struct model_config *cfg, const char *dir,
                        const struct st_file *expected, const struct batch *batch,
                        const struct layout *layout, bool top_only)
{
    struct model m;
    char err[1024];
    model_create(&m, cfg, &layout->grid, layout->me);
    m.ep_comm = &layout->ep;
    m.pp_comm = &layout->pp;
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    int top = -1;
    for (int l = 0; l < cfg->num_layers; l++)
        if (cfg->is_moe[l]) top = l;
    bool *all = xmalloc((size_t)m.n_params * sizeof(bool));
    for (int i = 0; i < m.n_params; i++)
        all[i] = !top_only || (m.params[i].kind == PARAM_EXPERT && m.params[i].layer == top);
    model_set_trainable(&m, all);
    if (top_only)
        CHECK(m.backward_floor == top && m.floor_mlp_only, "%s: backward floor %d (mlp only %d), "
              "expected the last MoE layer %d", name, m.backward_floor, m.floor_mlp_only, top);
    /* the backend the environment names (ESFT_BACKEND=cpu-devsim: the simulator), as the
     * phases attach it */
    const char *backend_name = getenv("ESFT_BACKEND");
    const struct backend *ops = backend_named(backend_name, err, sizeof err);
    CHECK(ops != NULL, "%s", err);
    if (!ops) ops = backend_cpu();
    model_attach(&m, ops);
    struct forward_workspace *ws = forward_workspace_new_training(&m, batch->N);
    struct batch mine = *batch;
    if (layout->me.ep_rank != 0) mine.N = 0; /* EP rank 0 carries the batch */
    int compared = 0;
    double worst = 0;
    /* cross-entropy, then the aux loss alone (where transformers has one) */
    int passes = st_file_find(expected, "aux_loss") ? 2 : 1;
    for (int pass = 0; pass < passes; pass++) {
        model_zero_grads(&m);
        struct forward_result r;
        /* the whole batch's scale given to the forward, as esft's training does */
        mine.loss_scale = pass == 0 ? with_loss_scale(batch).loss_scale : 0.0f;
        model_forward(&m, ops, ws, &mine, &r);
        long long count = r.loss_count; /* known on the last stage and EP rank 0: share it */
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, &count, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD));
        CHECK(pass == 1 || mine.loss_scale == 1.0f / (float)count, "%s: loss_scale %g, %lld targets",
              name, (double)mine.loss_scale, count);
        if (pass == 0) model_backward(&m, ops, ws, &mine, mine.loss_scale, 0.0f);
        else model_backward(&m, ops, ws, &mine, 0.0f, 1.0f);
        model_wait_sends(ws);
        model_download_grads(&m);
        for (int i = 0; i < m.n_params; i++) { /* replicated tensors: sum over the EP group */
            struct param *p = &m.params[i];
            if (p->grad && p->ep_rank < 0 && layout->ep.size > 1)
                comm_allreduce(&layout->ep, p->grad, p->numel, COMM_F32, COMM_SUM, COMM_HOST);
        }
        for (int i = 0; i < m.n_params; i++) {
            const struct param *p = &m.params[i];
            if (!p->grad || (pass == 1 && p->kind != PARAM_ROUTER)) continue;
            double scale, rel = gradient_error(expected, pass == 0 ? "grad" : "grad_aux", &m.cfg, p, &scale);
            CHECK(rel < 1e-3, "%s pp %d ep %d rank %d: %s%s: relative error %.3g", name,
                  layout->grid.pp, layout->grid.ep, layout->world_rank, pass ? "aux " : "",
                  p->name, rel);
            worst = fmax(worst, rel);
            compared++;
        }
    }
    int total = compared;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD));
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
    if (layout->world_rank == 0)
        printf("%s under pp %d ep %d on %s%s: %d gradients over the ranks, worst relative "
               "error %.2e\n", name, layout->grid.pp, layout->grid.ep, ops->name,
               top_only ? ", last layer's experts only" : "", total, worst);
    if (top_only) CHECK(total > 0, "%s: no gradient compared", name);
    forward_workspace_free(ws);
    free(all);
    model_free(&m);
    return compared;
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

static void check_fixture(const char *dir, const char *name, void *context)
{
    const struct layout *layout = context;
    char err[1024];
    struct model_config cfg;
    struct fixture_batch fb;
    struct st_file *expected = fixture_open(dir, &cfg, &fb);
    if (!expected) return;
    const struct batch batch = fb.batch;
    if (layout) {
        if (layout->grid.pp > 1 && cfg.tie_word_embeddings) {
            if (layout->world_rank == 0) printf("%s: tied embeddings, skipped under pp > 1\n", name);
        } else if (cfg.num_experts % layout->grid.ep != 0) { /* 7 experts: ep 7; 8: ep 2 */
            if (layout->world_rank == 0)
                printf("%s: %d experts do not split over ep %d, skipped\n", name, cfg.num_experts,
                       layout->grid.ep);
        } else {
            check_layout(name, &cfg, dir, expected, &batch, layout, false);
            check_layout(name, &cfg, dir, expected, &batch, layout, true);
        }
        fixture_batch_free(&fb);
        st_close(expected);
        return;
    }
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, &cfg, &grid, (struct layout_coords){0, 0, 0});
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    bool *trainable = xcalloc((size_t)m.n_params, sizeof(bool));

    CHECK(trainable_select(&m, METHOD_FULL, NULL, trainable, err, sizeof err) == 0, "%s", err);
    check_method(name, "full", &m, trainable, expected, &batch);
    check_aux(name, &m, expected, &batch);
    check_seq_aux(name, dir, &m, expected, &batch);
    check_c2r(name, dir, &m, &batch);
    CHECK(trainable_select(&m, METHOD_FROZEN_ROUTER, NULL, trainable, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < m.n_params; i++)
        CHECK(trainable[i] == (m.params[i].kind != PARAM_ROUTER), "frozen_router: %s", m.params[i].name);
    check_method(name, "frozen_router", &m, trainable, expected, &batch);

    for (int variant = 0; variant < 2; variant++) {
        char config[128];
        snprintf(config, sizeof config, "%s/expert_config.json", tmp);
        /* shared experts only where the model has them (elsewhere the file is refused) */
        write_config(config, &cfg, variant == 1 && cfg.num_shared_experts > 0, variant == 1);
        struct expert_config ec;
        CHECK(expert_config_read(config, &cfg, &ec, err, sizeof err) == 0, "%s", err);
        CHECK(trainable_select(&m, METHOD_ESFT, &ec, trainable, err, sizeof err) == 0, "%s", err);
        int experts = 0;
        for (int i = 0; i < m.n_params; i++) {
            const struct param *p = &m.params[i];
            bool want = p->kind == PARAM_EXPERT
                            ? p->expert == (p->layer + 1) % cfg.num_experts ||
                                  p->expert == (p->layer + 4) % cfg.num_experts
                            : variant == 1 && !p->buffer; /* the selection bias never trains */
            CHECK(trainable[i] == want, "esft variant %d: %s", variant, p->name);
            experts += p->kind == PARAM_EXPERT && trainable[i];
        }
        int moe_layers = 0;
        for (int l = 0; l < cfg.num_layers; l++) moe_layers += cfg.is_moe[l];
        /* three matrices per expert, and gpt_oss's three biases */
        CHECK(experts == moe_layers * 2 * (cfg.expert_bias ? 6 : 3),
              "esft: %d expert tensors train", experts);
        check_method(name, variant ? "esft+shared+non-expert" : "esft", &m, trainable, expected, &batch);
        expert_config_free(&ec);
    }
    free(trainable);
    model_free(&m);
    fixture_batch_free(&fb);
    st_close(expected);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    struct layout layout, *split = NULL;
    if (argc > 3) { /* the layout variant */
        int world;
        MPI_Comm_size(MPI_COMM_WORLD, &world);
        struct layout_grid grid;
        char err[1024];
        if (layout_grid_make(world, atoi(argv[2]), atoi(argv[3]), NULL, &grid, err, sizeof err) != 0) {
            fprintf(stderr, "test_grad: %s\n", err);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        layout_create(&layout, &grid);
        split = &layout;
    }
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    int fixtures = fixture_each(golden, "expected.safetensors", check_fixture, split);
    CHECK(fixtures >= 7, "found %d fixtures", fixtures);
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", tmp);
    CHECK(system(command) == 0, "%s", command);
    if (split) layout_destroy(split);
    int status = check_done("test_grad");
    MPI_Finalize();
    return status;
}
