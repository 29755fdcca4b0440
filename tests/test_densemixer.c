/* test_densemixer: DenseMixer's backward (train.method densemixer) against the rule written
 * in PyTorch autograd (tests/golden/densemixer_reference.py) on the golden fixtures that
 * carry densemixer_expected.safetensors.
 *
 * For each such fixture, with every tensor trainable and model.densemixer on:
 *   - the forward is the sparse one bit for bit: the same loss and logits as without it,
 *     and the reference's loss;
 *   - every gradient equals the reference's within 1e-3 of its largest magnitude, the
 *     routers' included (and the routers' differ from the sparse gradient, so the
 *     comparison can tell the two rules apart);
 *   - the last MoE layer's expert gradients equal the sparse backward's bit for bit (its
 *     output gradient is the same under both rules: only the router's gradient changes);
 *   - the device simulator gives the CPU backend's gradients bit for bit.
 * Under mpirun with PP EP arguments the gradients are compared split over the ranks (grid
 * pp x 1 x ep, as test_grad does it): EP rank 0 carries the batch, the others pass empty
 * batches, and each rank's experts still run on rank 0's tokens for the router's dots;
 * the replicated gradients are summed over the EP group; each rank compares what it
 * holds against the reference.
 * Usage: test_densemixer [GOLDEN_DIR [PP EP]] */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "comm.h"
#include "fixture.h"
#include "layout.h"
#include "model.h"
#include "trainable.h"

/* One forward and backward of batch on ops, every tensor trainable: the loss (mean
 * cross-entropy), the logits [N, V] and every gradient, copied (freed by the caller). */
struct pass {
    double loss;
    float *logits, *grads;
};

static struct pass run(const char *dir, const struct model_config *cfg, const struct batch *batch,
                       bool densemixer, const struct backend *ops)
{
    char err[1024];
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, cfg, &grid, (struct layout_coords){0, 0, 0});
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    bool *all = xcalloc((size_t)m.n_params, sizeof(bool));
    CHECK(trainable_select(&m, METHOD_DENSEMIXER, NULL, all, err, sizeof err) == 0, "%s", err);
    model_set_trainable(&m, all);
    m.densemixer = densemixer;
    if (ops != backend_cpu()) model_attach(&m, ops);
    model_zero_grads(&m);
    struct forward_workspace *ws = forward_workspace_new_training(&m, batch->N);
    forward_workspace_keep(ws, FORWARD_KEEP_LOGITS);
    struct forward_result r;
    model_forward(&m, ops, ws, batch, &r);
    struct pass out = {.loss = r.loss_sum / (double)r.loss_count};
    size_t n_logits = (size_t)batch->N * cfg->vocab_size;
    out.logits = xmalloc(n_logits * sizeof(float));
    memcpy(out.logits, r.logits, n_logits * sizeof(float));
    model_backward(&m, ops, ws, batch, 1.0f / (float)r.loss_count, 0.0f);
    if (ops != backend_cpu()) model_download_grads(&m);
    out.grads = xmalloc(m.grad_floats * sizeof(float));
    memcpy(out.grads, m.grad_storage, m.grad_floats * sizeof(float));
    forward_workspace_free(ws);
    free(all);
    model_free(&m);
    return out;
}

/* max |got - ref| / max |ref| over a tensor's numel values; scale: max |ref|. */
static double relative_error(const float *got, const float *ref, size_t numel, double *scale)
{
    double diff = 0;
    *scale = 0;
    for (size_t j = 0; j < numel; j++) {
        diff = fmax(diff, fabs((double)got[j] - ref[j]));
        *scale = fmax(*scale, fabs((double)ref[j]));
    }
    return *scale > 1e-8 ? diff / *scale : diff;
}

/* The reference gradient of p, read into a new array (NULL with a failed check). */
static float *reference_gradient(const struct st_file *ref, const char *name, const struct param *p)
{
    char key[PARAM_NAME_MAX + 8], err[256];
    snprintf(key, sizeof key, "grad.%s", p->name);
    const struct st_tensor *g = st_file_find(ref, key);
    CHECK(g && (size_t)g->numel == p->numel, "%s: no %s of %zu values", name, key, p->numel);
    if (!g || (size_t)g->numel != p->numel) return NULL;
    float *want = xmalloc(p->numel * sizeof(float));
    CHECK(st_read_f32(g, want, p->numel, err, sizeof err) == 0, "%s", err);
    return want;
}

/* The layout variant: every gradient a rank holds against the reference. */
static void check_split(const char *dir, const char *name, const struct model_config *cfg,
                        const struct st_file *ref, const struct batch *batch,
                        const struct layout *layout)
{
    char err[1024];
    if (cfg->num_experts % layout->grid.ep != 0 ||
        cfg->num_layers < layout->grid.pp) { /* the layout does not fit this fixture */
        if (layout->world_rank == 0) printf("%s: not split over this layout\n", name);
        return;
    }
    struct model m;
    model_create(&m, cfg, &layout->grid, layout->me);
    m.ep_comm = &layout->ep;
    m.pp_comm = &layout->pp;
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    bool *all = xcalloc((size_t)m.n_params, sizeof(bool));
    CHECK(trainable_select(&m, METHOD_DENSEMIXER, NULL, all, err, sizeof err) == 0, "%s", err);
    model_set_trainable(&m, all);
    m.densemixer = true;
    struct forward_workspace *ws = forward_workspace_new_training(&m, batch->N);
    struct batch mine = *batch;
    if (layout->me.ep_rank != 0) mine.N = 0; /* EP rank 0 carries the batch */
    model_zero_grads(&m);
    struct forward_result r;
    model_forward(&m, backend_cpu(), ws, &mine, &r);
    long long count = r.loss_count; /* known on the last stage and EP rank 0: share it */
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &count, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD));
    model_backward(&m, backend_cpu(), ws, &mine, 1.0f / (float)count, 0.0f);
    model_wait_sends(ws);
    int compared = 0;
    double worst = 0;
    for (int i = 0; i < m.n_params; i++) {
        struct param *p = &m.params[i];
        if (!p->grad) continue;
        if (p->ep_rank < 0 && layout->ep.size > 1) /* replicated: summed over the EP group */
            comm_allreduce(&layout->ep, p->grad, p->numel, COMM_F32, COMM_SUM, COMM_HOST);
        float *want = reference_gradient(ref, name, p);
        if (!want) continue;
        double scale, rel = relative_error(p->grad, want, p->numel, &scale);
        CHECK(rel < 1e-3, "%s pp %d ep %d rank %d: %s: relative error %.3g", name,
              layout->grid.pp, layout->grid.ep, layout->world_rank, p->name, rel);
        worst = fmax(worst, rel);
        compared++;
        free(want);
    }
    int total = compared;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD));
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
    CHECK(total > 0, "%s: no gradient compared", name);
    if (layout->world_rank == 0)
        printf("%s under pp %d ep %d: %d gradients over the ranks, worst relative error %.2e\n",
               name, layout->grid.pp, layout->grid.ep, total, worst);
    forward_workspace_free(ws);
    free(all);
    model_free(&m);
}

static void check_fixture(const char *dir, const char *name, void *context)
{
    char err[1024], path[4200];
    struct model_config cfg;
    struct fixture_batch fb;
    struct st_file *expected = fixture_open(dir, &cfg, &fb);
    if (!expected) return;
    snprintf(path, sizeof path, "%s/densemixer_expected.safetensors", dir);
    struct st_file *ref = st_open(path, err, sizeof err);
    CHECK(ref != NULL, "%s", err);
    if (!ref) return;
    const struct batch *batch = &fb.batch;
    if (context) {
        check_split(dir, name, &cfg, ref, batch, context);
        st_close(ref);
        st_close(expected);
        fixture_batch_free(&fb);
        return;
    }
    struct pass sparse = run(dir, &cfg, batch, false, backend_cpu());
    struct pass dense = run(dir, &cfg, batch, true, backend_cpu());
    struct pass sim = run(dir, &cfg, batch, true, backend_devsim());

    /* the forward: unchanged */
    size_t n_logits = (size_t)batch->N * cfg.vocab_size;
    CHECK(memcmp(&sparse.loss, &dense.loss, sizeof(double)) == 0 &&
              memcmp(sparse.logits, dense.logits, n_logits * sizeof(float)) == 0,
          "%s: the forward changed under DenseMixer (loss %.9g, sparse %.9g)", name, dense.loss,
          sparse.loss);
    const struct st_tensor *t = st_file_find(ref, "loss");
    float want = NAN;
    CHECK(t && st_read_f32(t, &want, 1, err, sizeof err) == 0, "%s: loss", name);
    CHECK(fabs(dense.loss - want) < 1e-5 * fabs(want), "%s: loss %.7f, reference %.7f", name,
          dense.loss, want);

    /* the gradients: the reference's; and the last MoE layer's experts: the sparse ones */
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m; /* the parameter table, for names and offsets */
    model_create(&m, &cfg, &grid, (struct layout_coords){0, 0, 0});
    bool *all = xcalloc((size_t)m.n_params, sizeof(bool));
    CHECK(trainable_select(&m, METHOD_DENSEMIXER, NULL, all, err, sizeof err) == 0, "%s", err);
    model_set_trainable(&m, all);
    int last_moe = -1;
    for (int l = 0; l < cfg.num_layers; l++)
        if (cfg.is_moe[l]) last_moe = l;
    double worst = 0, router_change = 0;
    int compared = 0, experts_equal = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        if (!p->grad) continue;
        size_t at = (size_t)(p->grad - m.grad_storage);
        float *want_grad = reference_gradient(ref, name, p);
        if (!want_grad) continue;
        double scale, rel = relative_error(dense.grads + at, want_grad, p->numel, &scale);
        CHECK(rel < 1e-3, "%s: %s: relative error %.3g (max |grad| %.3g)", name, p->name, rel,
              scale);
        worst = fmax(worst, rel);
        compared++;
        if (p->kind == PARAM_ROUTER)
            router_change =
                fmax(router_change, relative_error(sparse.grads + at, want_grad, p->numel, &scale));
        if (p->kind == PARAM_EXPERT && p->layer == last_moe) {
            bool same = memcmp(dense.grads + at, sparse.grads + at, p->numel * sizeof(float)) == 0;
            CHECK(same, "%s: %s differs from the sparse backward's", name, p->name);
            experts_equal += same;
        }
        free(want_grad);
    }
    CHECK(router_change > 0.05,
          "%s: the sparse router gradient is within %.3g of DenseMixer's: "
          "the fixture cannot tell the rules apart",
          name, router_change);
    CHECK(memcmp(dense.grads, sim.grads, m.grad_floats * sizeof(float)) == 0,
          "%s: the device simulator's DenseMixer gradients differ from the CPU's", name);
    printf("%s: forward unchanged; %d gradients, worst relative error %.2e (the sparse rule's "
           "router gradient is off by %.2f); layer %d's %d expert gradients = sparse bit for bit; "
           "simulator = CPU\n",
           name, compared, worst, router_change, last_moe, experts_equal);
    free(all);
    model_free(&m);
    struct pass *passes[3] = {&sparse, &dense, &sim};
    for (int i = 0; i < 3; i++) free(passes[i]->logits), free(passes[i]->grads);
    st_close(ref);
    st_close(expected);
    fixture_batch_free(&fb);
}

/* router_dense_backward with every unchosen expert's dot 0 and the chosen ones' equal to
 * their dweights is the sparse rule (router_topk_backward), with and without
 * renormalisation and scaling: off the top-k, dp = dots / S = 0. */
static void check_reduces_to_sparse(void)
{
    enum { N = 5, E = 8, K = 2 };
    const struct backend *cpu = backend_cpu();
    static float logits[N * E], probs[N * E], weights[N * K], dweights[N * K], dots[N * E];
    static float sparse[N * E], dense[N * E];
    static int32_t ids[N * K];
    for (int i = 0; i < N * E; i++) logits[i] = (float)sin(1.7 * i);
    for (int i = 0; i < N * K; i++) dweights[i] = (float)cos(0.9 * i);
    for (int renormalise = 0; renormalise < 2; renormalise++) {
        struct router_params rp = {ROUTER_SOFTMAX_TOPK, renormalise, 1.5f, 1, 1, NULL, NULL, 0};
        cpu->router_topk(ids, weights, probs, logits, N, E, K, &rp);
        memset(dots, 0, sizeof dots);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) dots[n * E + ids[n * K + k]] = dweights[n * K + k];
        cpu->router_topk_backward(sparse, dweights, probs, ids, N, E, K, &rp);
        cpu->router_dense_backward(dense, dots, probs, ids, N, E, K, &rp);
        double scale, rel = relative_error(dense, sparse, N * E, &scale);
        CHECK(rel < 1e-6,
              "router_dense_backward (renormalise %d) with unchosen dots 0: %.3g from "
              "the sparse rule",
              renormalise, rel);
    }
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
            fprintf(stderr, "test_densemixer: %s\n", err);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        layout_create(&layout, &grid);
        split = &layout;
    } else {
        check_reduces_to_sparse();
    }
    int fixtures = fixture_each(golden, "densemixer_expected.safetensors", check_fixture, split);
    CHECK(fixtures >= 2, "found %d DenseMixer fixtures", fixtures);
    if (split) layout_destroy(split);
    int status = check_done("test_densemixer");
    MPI_Finalize();
    return status;
}
