/* test_devsim: the device simulator holds code to the rule that the host reaches the
 * backend's buffers only through the transfers, and gives the CPU backend's numbers.
 *
 * 1. A host read and a host write of a simulator buffer end the process with SIGSEGV
 *    (in a child), and a host pointer handed to a simulator op is refused (exit status
 *    EXIT_RUNTIME, in a child): the two ways code goes wrong on a GPU.
 * 2. On every golden fixture (one rank): the forward (loss, token accuracy, logits,
 *    routing, aux loss) and the backward (every gradient of full fine-tuning, with the
 *    cross-entropy and with the load-balancing loss) on the simulator equal the CPU
 *    backend's bit for bit, with the model attached to each backend as the phases do it.
 *    The transfers are counted: a forward that keeps no result reads back only the
 *    load-balancing statistics and the loss sums.
 * Usage: test_devsim [GOLDEN_DIR] */
#include <dirent.h>
#include <math.h>
#include <mpi.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend.h"
#include "check.h"
#include "fixture.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "rng.h"
#include "safetensors.h"
#include "trainable.h"

/* Runs body in a child; returns its wait status. */
static int in_child(void (*body)(void))
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        body();
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}

static volatile float sink;

/* The child's own SIGSEGV handler: an exit status no other end gives (AddressSanitizer,
 * which would otherwise catch the signal, exits with 1, as esft's run-time errors do). */
enum { SEGV_EXIT = 139 };
static void on_segv(int signal_number)
{
    (void)signal_number;
    _exit(SEGV_EXIT);
}

static void host_read(void)
{
    signal(SIGSEGV, on_segv);
    const struct backend *sim = backend_devsim();
    float *buf = sim->alloc(64 * sizeof(float));
    sink = buf[3]; /* the planted mistake */
}

static void host_write(void)
{
    signal(SIGSEGV, on_segv);
    const struct backend *sim = backend_devsim();
    float *buf = sim->alloc(64 * sizeof(float));
    buf[3] = 1.0f;
}

static void host_pointer_to_op(void)
{
    const struct backend *sim = backend_devsim();
    float *dev = sim->alloc(16 * sizeof(float));
    float host[16] = {0};
    sim->add(dev, host, dev, 16); /* host memory where a buffer belongs */
}

/* The child died of the access: its SIGSEGV handler's exit status. */
static bool crashed(int status)
{
    return WIFEXITED(status) && WEXITSTATUS(status) == SEGV_EXIT;
}

/* Before MPI starts: the children must not inherit a running MPI. */
static void check_faults(void)
{
    int status = in_child(host_read);
    CHECK(crashed(status), "a host read of a simulator buffer: wait status %#x, not SIGSEGV", status);
    status = in_child(host_write);
    CHECK(crashed(status), "a host write of a simulator buffer: wait status %#x, not SIGSEGV", status);
    status = in_child(host_pointer_to_op);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == EXIT_RUNTIME,
          "a host pointer given to a simulator op: wait status %#x, not exit %d", status,
          EXIT_RUNTIME);
    /* and the transfers themselves are exact */
    const struct backend *sim = backend_devsim();
    float in[5] = {1.5f, -2.0f, NAN, 3.25f, 0.0f}, out[5];
    float *buf = sim->alloc(sizeof in);
    sim->upload(buf, in, sizeof in);
    sim->download(out, buf, sizeof out);
    CHECK(memcmp(in, out, sizeof in) == 0, "upload then download changed the bytes");
    sim->release(buf);
}

/* The routers on the simulator equal the CPU backend's bits, forward (ids, weights, probs)
 * and backward, for every kind the CPU implements; the sigmoid router's bias is a
 * simulator buffer like the rest (the fixtures do not reach the grouped routers yet). */
static void check_router_ops(void)
{
    enum { N = 29, E = 64, K = 6 };
    const struct backend *cpu = backend_cpu(), *sim = backend_devsim();
    static float logits[N * E], bias[E], dweights[N * K];
    struct rng rng;
    rng_seed(&rng, 7);
    for (int i = 0; i < N * E; i++) logits[i] = (float)(2.0 * rng_normal(&rng));
    for (int e = 0; e < E; e++) bias[e] = (float)(0.3 * rng_normal(&rng) - 0.2);
    for (int i = 0; i < N * K; i++) dweights[i] = (float)rng_normal(&rng);
    float *d_logits = sim->alloc(sizeof logits), *d_bias = sim->alloc(sizeof bias);
    float *d_dweights = sim->alloc(sizeof dweights), *d_weights = sim->alloc(N * K * sizeof(float));
    float *d_probs = sim->alloc(N * E * sizeof(float)),
          *d_dlogits = sim->alloc(N * E * sizeof(float));
    int32_t *d_ids = sim->alloc(N * K * sizeof(int32_t));
    sim->upload(d_logits, logits, sizeof logits);
    sim->upload(d_bias, bias, sizeof bias);
    sim->upload(d_dweights, dweights, sizeof dweights);
    const struct router_params kinds[3] = {{ROUTER_SOFTMAX_TOPK, true, 1.0f, 1, 1, NULL, NULL, 0},
                                           {ROUTER_GROUPED_GREEDY, false, 2.5f, 8, 3, NULL, NULL, 0},
                                           {ROUTER_SIGMOID_BIAS, true, 2.5f, 8, 4, bias, NULL, 0}};
    for (int r = 0; r < 3; r++) {
        static int32_t ids[2][N * K];
        static float weights[2][N * K], probs[2][N * E], dlogits[2][N * E];
        struct router_params on_sim = kinds[r];
        on_sim.bias = kinds[r].bias ? d_bias : NULL;
        cpu->router_topk(ids[0], weights[0], probs[0], logits, N, E, K, &kinds[r]);
        cpu->router_topk_backward(dlogits[0], dweights, probs[0], ids[0], N, E, K, &kinds[r]);
        sim->router_topk(d_ids, d_weights, d_probs, d_logits, N, E, K, &on_sim);
        sim->router_topk_backward(d_dlogits, d_dweights, d_probs, d_ids, N, E, K, &on_sim);
        sim->download(ids[1], d_ids, sizeof ids[1]);
        sim->download(weights[1], d_weights, sizeof weights[1]);
        sim->download(probs[1], d_probs, sizeof probs[1]);
        sim->download(dlogits[1], d_dlogits, sizeof dlogits[1]);
        CHECK(memcmp(ids[0], ids[1], sizeof ids[0]) == 0 &&
                  memcmp(weights[0], weights[1], sizeof weights[0]) == 0 &&
                  memcmp(probs[0], probs[1], sizeof probs[0]) == 0 &&
                  memcmp(dlogits[0], dlogits[1], sizeof dlogits[0]) == 0,
              "router kind %d: the simulator's routing or its backward differs from the CPU's",
              (int)kinds[r].kind);
    }
    printf("routers (softmax, grouped greedy, sigmoid with bias): simulator = CPU bit for bit\n");
    void *buffers[] = {d_logits, d_bias, d_dweights, d_weights, d_probs, d_dlogits, d_ids};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) sim->release(buffers[i]);
}

/* A simulator buffer holding a copy of host[count] (released by the caller). */
static float *on_sim(const struct backend *sim, const float *host, size_t count)
{
    float *d = sim->alloc(count * sizeof(float));
    sim->upload(d, host, count * sizeof(float));
    return d;
}

/* The simulator's result of count floats equals the CPU's, bit for bit. */
static bool sim_equal(const struct backend *sim, const float *d, const float *cpu_result,
                      size_t count)
{
    float *host = xmalloc(count * sizeof(float));
    sim->download(host, d, count * sizeof(float));
    bool same = memcmp(host, cpu_result, count * sizeof(float)) == 0;
    free(host);
    return same;
}

/* gpt_oss's ops on the simulator equal the CPU backend's bits (the fixtures do not reach
 * them yet): attention with a sliding window and sinks, forward and backward with d sinks
 * (its sinks, d sinks and sample starts simulator buffers); the clamped GLU; the
 * per-expert bias with a frozen expert. */
static void check_gpt_oss_ops(void)
{
    enum { N = 90, nH = 4, nKV = 2, Dh = 8, E = 3, O = 70 };
    const struct backend *cpu = backend_cpu(), *sim = backend_devsim();
    struct rng rng;
    rng_seed(&rng, 11);
    size_t nq = (size_t)N * nH * Dh, nk = (size_t)N * nKV * Dh, n_all = nq + 2 * nk + nq + nH;
    float *x = xmalloc(n_all * sizeof(float)); /* q, k, v, dout, sinks */
    for (size_t i = 0; i < n_all; i++) x[i] = (float)(2.0 * rng_normal(&rng));
    float *q = x, *k = q + nq, *v = k + nk, *dout = v + nk, *sinks = dout + nq;
    static int32_t starts[N];
    for (int i = 0; i < N; i++) starts[i] = i < 70 ? 0 : 70; /* samples of 70 and 20 */
    static float out[N * nH * Dh], dq[N * nH * Dh], dk[N * nKV * Dh], dv[N * nKV * Dh], ds[nH];
    struct attention_mask mask = {.sample_start = starts, .window = 5, .sinks = sinks, .dsinks = ds};
    cpu->attention(out, q, k, v, &mask, N, nH, nKV, Dh, Dh, 0.35f);
    cpu->attention_backward(dq, dk, dv, dout, q, k, v, out, &mask, N, nH, nKV, Dh, Dh, 0.35f);
    float *d_x = on_sim(sim, x, n_all), *d_out = sim->alloc(sizeof out);
    float *d_dq = sim->alloc(sizeof dq), *d_dk = sim->alloc(sizeof dk), *d_dv = sim->alloc(sizeof dv);
    float *d_ds = sim->alloc(sizeof ds);
    int32_t *d_starts = sim->alloc(sizeof starts);
    sim->upload(d_starts, starts, sizeof starts);
    struct attention_mask d_mask = {.sample_start = d_starts, .window = 5,
                                    .sinks = d_x + (sinks - x), .dsinks = d_ds};
    sim->attention(d_out, d_x, d_x + (k - x), d_x + (v - x), &d_mask, N, nH, nKV, Dh, Dh, 0.35f);
    sim->attention_backward(d_dq, d_dk, d_dv, d_x + (dout - x), d_x, d_x + (k - x), d_x + (v - x),
                            d_out, &d_mask, N, nH, nKV, Dh, Dh, 0.35f);
    CHECK(sim_equal(sim, d_out, out, nq) && sim_equal(sim, d_dq, dq, nq) &&
              sim_equal(sim, d_dk, dk, nk) && sim_equal(sim, d_dv, dv, nk) &&
              sim_equal(sim, d_ds, ds, nH),
          "attention with a window and sinks: the simulator differs from the CPU");
    /* the clamped GLU on q and k's first nk values as gate and up, dout as dh */
    static float h[N * nKV * Dh], dgate[N * nKV * Dh], dup[N * nKV * Dh];
    cpu->glu_clamped(h, q, k, nk, 1.702f, 3.0f);
    cpu->glu_clamped_backward(dgate, dup, dout, q, k, nk, 1.702f, 3.0f);
    float *d_h = sim->alloc(sizeof h), *d_dgate = sim->alloc(sizeof dgate), *d_dup = sim->alloc(sizeof dup);
    sim->glu_clamped(d_h, d_x, d_x + (k - x), nk, 1.702f, 3.0f);
    sim->glu_clamped_backward(d_dgate, d_dup, d_x + (dout - x), d_x, d_x + (k - x), nk, 1.702f, 3.0f);
    CHECK(sim_equal(sim, d_h, h, nk) && sim_equal(sim, d_dgate, dgate, nk) &&
              sim_equal(sim, d_dup, dup, nk),
          "glu_clamped: the simulator differs from the CPU");
    /* per-expert biases on y[40, O] (q's first values): experts of 10, 1 and 29 rows, the
     * second frozen; k's first values as the biases, dout's as dy */
    const int32_t offsets[E + 1] = {0, 10, 11, 40};
    static float y[40 * O], dbias[E * O];
    memcpy(y, q, sizeof y);
    float *dbias_of[E] = {dbias, NULL, dbias + 2 * O}, *d_dbias = sim->alloc(sizeof dbias);
    float *d_dbias_of[E] = {d_dbias, NULL, d_dbias + 2 * O}, *d_y = on_sim(sim, y, 40 * O);
    int32_t *d_offsets = sim->alloc(sizeof offsets);
    sim->upload(d_offsets, offsets, sizeof offsets);
    cpu->grouped_bias(y, k, offsets, E, O);
    cpu->grouped_bias_backward(dbias_of, dout, offsets, E, O);
    sim->grouped_bias(d_y, d_x + (k - x), d_offsets, E, O);
    sim->grouped_bias_backward(d_dbias_of, d_x + (dout - x), d_offsets, E, O);
    CHECK(sim_equal(sim, d_y, y, 40 * O) && sim_equal(sim, d_dbias, dbias, E * O),
          "grouped_bias: the simulator differs from the CPU");
    printf("gpt_oss ops (attention window 5 + sinks, glu_clamped, grouped_bias; forward and "
           "backward): simulator = CPU bit for bit\n");
    void *buffers[] = {d_x, d_out, d_dq, d_dk, d_dv, d_ds, d_starts, d_h, d_dgate, d_dup,
                       d_dbias, d_y, d_offsets};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) sim->release(buffers[i]);
    free(x);
}

/* What one backend computes on a fixture: forward results and both kinds of gradient. */
struct outcome {
    double loss_sum, aux;
    long long counted, correct;
    float *logits, *grads[2]; /* cross-entropy, then the aux loss alone */
    size_t n_logits, n_grads;
    int32_t *ids;            /* every MoE layer's top-k ids, concatenated */
    float *weights, *router; /* and their weights, router logits */
    size_t n_ids, n_router;
    struct backend_traffic traffic; /* of one forward that keeps nothing */
};

static void run_backend(const char *dir, const struct model_config *cfg, const struct batch *batch,
                        const struct backend *ops, struct outcome *o)
{
    char err[1024];
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct model m;
    model_create(&m, cfg, &grid, (struct layout_coords){0, 0, 0});
    CHECK(model_load(&m, dir, err, sizeof err) == 0, "%s", err);
    bool *all = xcalloc((size_t)m.n_params, sizeof(bool));
    CHECK(trainable_select(&m, METHOD_FULL, NULL, all, err, sizeof err) == 0, "%s", err);
    model_set_trainable(&m, all);
    model_attach(&m, ops);
    struct forward_workspace *ws = forward_workspace_new_training(&m, batch->N);
    forward_workspace_keep(ws, FORWARD_KEEP_LOGITS | FORWARD_KEEP_ROUTING);
    memset(o, 0, sizeof *o);
    for (int pass = 0; pass < 2; pass++) {
        model_zero_grads(&m);
        struct forward_result r;
        model_forward(&m, ops, ws, batch, &r);
        if (pass == 0) {
            o->loss_sum = r.loss_sum, o->aux = r.aux_loss;
            o->counted = r.loss_count, o->correct = r.correct;
            o->n_logits = (size_t)batch->N * cfg->vocab_size;
            o->logits = xmalloc(o->n_logits * sizeof(float));
            memcpy(o->logits, r.logits, o->n_logits * sizeof(float));
            int moe = 0;
            for (int l = 0; l < cfg->num_layers; l++) moe += cfg->is_moe[l];
            size_t slots = (size_t)batch->N * cfg->top_k, rows = (size_t)batch->N * cfg->num_experts;
            o->n_ids = moe * slots, o->n_router = moe * rows;
            o->ids = xcalloc(o->n_ids + 1, sizeof(int32_t));
            o->weights = xcalloc(o->n_ids + 1, sizeof(float));
            o->router = xcalloc(o->n_router + 1, sizeof(float));
            for (int l = 0, k = 0; l < cfg->num_layers; l++) {
                if (!cfg->is_moe[l]) continue;
                memcpy(o->ids + k * slots, r.topk_ids[l], slots * sizeof(int32_t));
                memcpy(o->weights + k * slots, r.topk_weights[l], slots * sizeof(float));
                memcpy(o->router + k * rows, r.router_logits[l], rows * sizeof(float));
                k++;
            }
        }
        model_backward(&m, ops, ws, batch, pass == 0 ? 1.0f / (float)r.loss_count : 0.0f,
                       pass == 0 ? 0.0f : 1.0f);
        model_download_grads(&m);
        o->n_grads = m.grad_floats;
        o->grads[pass] = xmalloc((m.grad_floats ? m.grad_floats : 1) * sizeof(float));
        memcpy(o->grads[pass], m.grad_storage, m.grad_floats * sizeof(float));
    }
    forward_workspace_free(ws);
    /* one forward that keeps nothing: what crosses from the backend to the host */
    ws = forward_workspace_new(&m, batch->N);
    struct backend_traffic before = backend_traffic();
    struct forward_result r;
    model_forward(&m, ops, ws, batch, &r);
    struct backend_traffic after = backend_traffic();
    o->traffic.downloads = after.downloads - before.downloads;
    o->traffic.download_bytes = after.download_bytes - before.download_bytes;
    o->traffic.uploads = after.uploads - before.uploads;
    forward_workspace_free(ws);
    free(all);
    model_free(&m);
}

static void outcome_free(struct outcome *o)
{
    free(o->logits), free(o->grads[0]), free(o->grads[1]);
    free(o->ids), free(o->weights), free(o->router);
}

static void check_fixture(const char *dir, const char *name, void *context)
{
    (void)context;
    struct model_config cfg;
    struct fixture_batch fb;
    struct st_file *expected = fixture_open(dir, &cfg, &fb);
    if (!expected) return;
    const struct batch batch = fb.batch;
    struct outcome cpu, sim;
    run_backend(dir, &cfg, &batch, backend_cpu(), &cpu);
    run_backend(dir, &cfg, &batch, backend_devsim(), &sim);
    CHECK(memcmp(&cpu.loss_sum, &sim.loss_sum, sizeof(double)) == 0 && cpu.counted == sim.counted,
          "%s: loss %.17g over %lld on the CPU, %.17g over %lld on the simulator", name,
          cpu.loss_sum, cpu.counted, sim.loss_sum, sim.counted);
    CHECK(memcmp(&cpu.aux, &sim.aux, sizeof(double)) == 0, "%s: aux loss %.17g vs %.17g", name,
          cpu.aux, sim.aux);
    CHECK(cpu.correct == sim.correct, "%s: %lld vs %lld correct", name, cpu.correct, sim.correct);
    CHECK(memcmp(cpu.logits, sim.logits, cpu.n_logits * sizeof(float)) == 0, "%s: logits differ", name);
    CHECK(memcmp(cpu.ids, sim.ids, cpu.n_ids * sizeof(int32_t)) == 0 &&
              memcmp(cpu.weights, sim.weights, cpu.n_ids * sizeof(float)) == 0 &&
              memcmp(cpu.router, sim.router, cpu.n_router * sizeof(float)) == 0,
          "%s: routing differs", name);
    for (int pass = 0; pass < 2; pass++)
        CHECK(cpu.n_grads == sim.n_grads &&
                  memcmp(cpu.grads[pass], sim.grads[pass], cpu.n_grads * sizeof(float)) == 0,
              "%s: %s gradients differ", name, pass ? "aux-loss" : "cross-entropy");
    /* a forward that keeps nothing reads back the [L][2E] statistics block and the two
     * sums of the loss; the CPU backend counts nothing (it moves nothing) */
    CHECK(sim.traffic.downloads == 3 && cpu.traffic.downloads == 0,
          "%s: %lld reads back from the simulator in one forward (want 3), %lld from the CPU",
          name, sim.traffic.downloads, cpu.traffic.downloads);
    CHECK(sim.traffic.uploads == 4, "%s: %lld uploads in one forward (want the batch's 4)", name,
          sim.traffic.uploads);
    printf("%s: simulator = CPU bit for bit (loss %.9g, %zu logits, %zu gradients x 2); one "
           "forward reads back %lld times, %.0f bytes\n", name, cpu.loss_sum / cpu.counted,
           cpu.n_logits, cpu.n_grads, sim.traffic.downloads, sim.traffic.download_bytes);
    outcome_free(&cpu);
    outcome_free(&sim);
    fixture_batch_free(&fb);
    st_close(expected);
}

int main(int argc, char **argv)
{
    check_faults();
    MPI_Init(&argc, &argv);
    check_router_ops();
    check_gpt_oss_ops();
    const char *golden = argc > 1 ? argv[1] : "tests/golden";
    int fixtures = fixture_each(golden, "expected.safetensors", check_fixture, NULL);
    CHECK(fixtures >= 7, "found %d fixtures", fixtures);
    int status = check_done("test_devsim");
    MPI_Finalize();
    return status;
}
