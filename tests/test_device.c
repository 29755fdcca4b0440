/* test_device: the CUDA build's GPU tests. Fills a device buffer with the fill kernel and
 * reads it back, which proves the kernels were compiled for this GPU; then each MoE
 * kernel (kernels/moe.h) against the CPU backend on random inputs: the permutation bit
 * for bit, the router's ids equal and weights within 1e-6 relative, gather / combine /
 * SwiGLU within 1e-6; each dense kernel (kernels/dense.h) against the same backend, bit
 * for bit where it does one operation an element (embedding and its backward, add, clamp)
 * and within 1e-6 to 1e-5 relative where reductions or libm differ; the optimizer
 * kernels (kernels/optimizer.h) against the host's AdamW, its chunked squared sum (exactly)
 * and its scale (bit for bit); the MoE backward kernels (bit for bit where they only
 * move or add in the CPU's order, 1e-5 where they reduce); the cuBLAS GEMMs (kernels/
 * gemm.h), dense and grouped, forward and backward, fp32 and bf16 operands (the CPU
 * given the same bf16-rounded values), to 1e-5; attention forward (1e-5) and backward
 * (1e-4) over packed samples with grouped KV heads; the tiled bf16 attention (kernels/
 * attention_flash.h), forward, log-sum-exp and backward, to bf16 accuracy (relative L2
 * error 1e-2 forward, 2e-2 gradients), its outputs poisoned with NaN, its backward bit
 * for bit the same twice, and the op table's choice between it and cuBLAS; the CUDA op table (src/cuda_ops.c) on
 * a MoE block, forward and backward, against the CPU op table; LoRA's adapter path
 * (lora.h: linear, scale, linear_backward of the op table) against the CPU's; DenseMixer's
 * row_dots and router_dense_backward ("densemixer"). The router's probabilities
 * are held to a double reference within a bound derived from the kernel's order of
 * summation; router rows with NaN logits must route as the CPU does; a determinism group
 * runs a chain of reducing kernels twice and wants the same bits. The op table's variants
 * of deepseek_v2/v3, glm4_moe and gpt_oss, each against the CPU op table: the grouped,
 * sigmoid and top-k-then-softmax routers forward and backward, with NaN rows ("routers"),
 * and the same with C2R's collaborative lists ("c2r");
 * RoPE in both pair layouts with a head stride, and copy_columns ("heads"); attention with
 * a value width, sliding windows and sinks, forward and backward ("attention-mask");
 * the clamped GLU and the per-expert bias ("gpt-oss-experts"); the chunked cross-entropy
 * ("ce-chunks"). Their tolerances are stated at each check.
 *
 * Usage: tests/test_device [--list] [GROUP...] (default: every group). Several groups run
 * each in a child process, in the list's order with the op table ("ops") last, so that a
 * crash, a fatal() or a sticky CUDA error in one group cannot hide the others; each
 * group prints one line (checks, failed, seconds), and the exit status is 1 when any
 * failed. Skipped (exit 77) in the CPU-only build and where no driver or no GPU is
 * present; a driver that CUDA cannot use (older than the runtime) is a failure. A first
 * run on a new machine: CUDA_LAUNCH_BLOCKING=1, so that an error shows at its kernel. */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "config.h"
#ifdef HAVE_CUDA
#include <errno.h>
#include <math.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "attention.h"
#include "attention_flash.h"
#include "backend.h"
#include "cuda_ops.h"
#include "dense.h"
#include "device.h"
#include "gemm.h"
#include "log.h"
#include "lora.h"
#include "moe.h"
#include "moe_math.h"
#include "optimizer.h"
#include "rng.h"
#include "safetensors.h"

/* The softmax top-k router of the warp kernel (the other routers: group_routers). */
static const struct router_params
    SOFTMAX_RENORM = {ROUTER_SOFTMAX_TOPK, true, 1.0f, 1, 1, NULL, NULL, 0},
    SOFTMAX_RENORM_X25 = {ROUTER_SOFTMAX_TOPK, true, 2.5f, 1, 1, NULL, NULL, 0},
    SOFTMAX_PLAIN_X25 = {ROUTER_SOFTMAX_TOPK, false, 2.5f, 1, 1, NULL, NULL, 0};

static float *to_device(const void *host, size_t bytes)
{
    float *d = device_alloc(bytes ? bytes : 4);
    CHECK(d && device_copy_to_device(d, host, bytes) == 0, "upload of %zu bytes", bytes);
    return d;
}

static void *from_device(const void *device, size_t bytes)
{
    void *h = xmalloc(bytes ? bytes : 4);
    CHECK(device_copy_to_host(h, device, bytes) == 0, "download of %zu bytes", bytes);
    return h;
}

/* cudaFree of each buffer: its error (the context's sticky one, an earlier illegal
 * address, say) fails the check here rather than hiding. */
static void free_on_device(void *const *buffers, size_t count)
{
    int failed = 0;
    for (size_t i = 0; i < count; i++) failed += device_free(buffers[i]) != 0;
    CHECK(failed == 0, "cudaFree failed on %d of %zu buffers", failed, count);
}
#define FREE_ON_DEVICE(array) free_on_device(array, sizeof array / sizeof array[0])

/* The router's probabilities p[N,E] in double, from the same fp32 arguments z - max that
 * both backends exponentiate. */
static double *router_reference(const float *logits, int N, int E)
{
    double *p = xmalloc((size_t)N * E * sizeof(double));
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * E;
        double *row = p + (size_t)n * E, sum = 0;
        float max = -INFINITY;
        for (int e = 0; e < E; e++) max = fmaxf(max, z[e]);
        for (int e = 0; e < E; e++) sum += row[e] = exp((double)(z[e] - max));
        for (int e = 0; e < E; e++) row[e] /= sum;
    }
    return p;
}

/* The kernel's error on a probability against router_reference, elementwise relative, from
 * its order of operations (u = 2^-24, to first order): each lane adds ceil(E/32)
 * exponentials one after another and the warp adds the lanes' totals in 5 xor steps, so
 * the sum of these positive terms is within (ceil(E/32) + 4) u; CUDA's expf is within 2 ulp
 * (4u) in the numerator and in every term of the sum, 8u; the division u; one u for the
 * second-order terms. E = 1024 gives 46u = 2.7e-6. The CPU backend's single fp32 running
 * sum over E terms is no better a reference (it is good to about 1e-6 at E = 1024, and the
 * summation orders alone put the two backends 1.36e-6 apart), so the kernel is held to the
 * double reference instead. */
static double router_probability_bound(int E)
{
    return ((E + 31) / 32 + 14) * 0x1p-24;
}

/* The worst of |got - want| / |want| over n values (want never 0 here). */
static double worst_elementwise_relative(const float *got, const double *want, size_t n)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(got[i] - want[i]) / fabs(want[i]));
    return worst;
}

/* n uniform floats in [low, high) */
static float *random_floats(struct rng *rng, size_t n, float low, float high)
{
    float *x = xmalloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = low + (float)rng_uniform(rng) * (high - low);
    return x;
}

/* The device buffer d of n floats against want: worst relative error at most bound
 * (bound 0: bit for bit). */
/* The E matrices of [size] one after the other in block, as a per-expert array. */
static const float **expert_array(const float *block, int E, size_t size)
{
    const float **experts = xcalloc((size_t)E, sizeof *experts);
    for (int e = 0; e < E; e++) experts[e] = block + (size_t)e * size;
    return experts;
}

static void expect_floats(const float *d, const float *want, size_t n, double bound,
                          const char *what)
{
    float *got = from_device(d, n * sizeof(float));
    if (bound == 0)
        CHECK(memcmp(got, want, n * sizeof(float)) == 0, "%s: not bit for bit the CPU's", what);
    else {
        double worst = check_worst_relative(got, want, n);
        CHECK(worst <= bound, "%s: relative error %.3g above %.3g", what, worst, bound);
    }
    free(got);
}

/* Whether a token's probabilities p[E] leave a near-tie (1e-5 of the largest) within its
 * top-k ids[K] or between the k-th and the best outside: there two correct backends (two
 * libm's exp, two GEMMs) may order the experts either way. */
static bool near_tie(const float *p, const int32_t *ids, int E, int K)
{
    double next = 0; /* the best probability outside the top-k */
    for (int e = 0; e < E; e++) {
        bool in = false;
        for (int k = 0; k < K; k++) in |= ids[k] == e;
        if (!in) next = fmax(next, p[e]);
    }
    double gap = p[ids[K - 1]] - next;
    for (int k = 0; k + 1 < K; k++) gap = fmin(gap, p[ids[k]] - p[ids[k + 1]]);
    return gap < 1e-5 * p[ids[0]];
}

/* The MoE kernels against the CPU backend on one random layer. */
static void check_moe(int N, int E, int K, int H, int I)
{
    const struct backend *cpu = backend_cpu();
    char err[256];
    struct rng rng;
    rng_seed(&rng, (uint64_t)(N * 1000003 + E));
    int M = N * K;
    float *logits = xmalloc((size_t)N * E * sizeof(float));
    for (size_t i = 0; i < (size_t)N * E; i++) logits[i] = (float)(rng_uniform(&rng) * 8.0 - 4.0);
    /* router */
    int32_t *ids = xmalloc((size_t)M * sizeof(int32_t));
    float *weights = xmalloc((size_t)M * sizeof(float)), *probs = xmalloc((size_t)N * E * sizeof(float));
    cpu->router_topk(ids, weights, probs, logits, N, E, K, &SOFTMAX_RENORM);
    float *d_logits = to_device(logits, (size_t)N * E * sizeof(float));
    int32_t *d_ids = device_alloc((size_t)M * sizeof(int32_t));
    float *d_weights = device_alloc((size_t)M * sizeof(float)), *d_probs = device_alloc((size_t)N * E * sizeof(float));
    CHECK(moe_router_topk(d_ids, d_weights, d_probs, d_logits, N, E, K, 1, 1.0f, err, sizeof err) == 0, "%s", err);
    int32_t *g_ids = from_device(d_ids, (size_t)M * sizeof(int32_t));
    float *g_weights = from_device(d_weights, (size_t)M * sizeof(float));
    float *g_probs = from_device(d_probs, (size_t)N * E * sizeof(float));
    /* ids must agree except where the CPU's probabilities leave a near-tie (1e-5) at or
     * next to the top-k: there the two libm's exp may order them either way */
    int differ = 0, near_ties = 0;
    for (int n = 0; n < N; n++) {
        if (near_tie(probs + (size_t)n * E, ids + n * K, E, K)) {
            near_ties++;
            continue;
        }
        differ += memcmp(g_ids + n * K, ids + n * K, (size_t)K * sizeof(int32_t)) != 0;
    }
    CHECK(differ == 0, "router N %d E %d K %d: ids differ on %d tokens (%d near-ties skipped)", N, E,
          K, differ, near_ties);
    CHECK(near_ties * 10 < N + 10, "router: %d of %d tokens are near-ties", near_ties, N);
    /* weights: compared where the ids agree */
    for (int n = 0; n < N; n++)
        if (memcmp(g_ids + n * K, ids + n * K, (size_t)K * sizeof(int32_t)) != 0)
            memcpy(g_weights + n * K, weights + n * K, (size_t)K * sizeof(float));
    CHECK(check_worst_relative(g_weights, weights, (size_t)M) < 1e-6, "router weights");
    double *reference = router_reference(logits, N, E), bound = router_probability_bound(E);
    double worst = worst_elementwise_relative(g_probs, reference, (size_t)N * E);
    CHECK(worst <= bound,
          "router N %d E %d: probabilities %.3g from the double reference, above %.3g", N, E, worst,
          bound);
    /* OLMoE's and qwen2_moe's routing: weights not renormalised, scaled, no probabilities
     * kept; the same ids, and weights p * scaling (one rounding more) at them */
    int32_t *d_ids2 = device_alloc((size_t)M * sizeof(int32_t));
    float *d_weights2 = device_alloc((size_t)M * sizeof(float));
    CHECK(moe_router_topk(d_ids2, d_weights2, NULL, d_logits, N, E, K, 0, 2.5f, err, sizeof err) ==
              0,
          "%s", err);
    int32_t *g_ids2 = from_device(d_ids2, (size_t)M * sizeof(int32_t));
    float *g_weights2 = from_device(d_weights2, (size_t)M * sizeof(float));
    CHECK(memcmp(g_ids2, g_ids, (size_t)M * sizeof(int32_t)) == 0,
          "router N %d E %d: ids without renormalisation differ from the kernel's own", N, E);
    worst = 0;
    for (int s = 0; s < M; s++) {
        if (g_ids[s] < 0 || g_ids[s] >= E) { /* reported with the ids above */
            worst = INFINITY;
            continue;
        }
        double want = 2.5 * reference[(size_t)(s / K) * E + g_ids[s]];
        worst = fmax(worst, fabs(g_weights2[s] - want) / want);
    }
    CHECK(worst <= bound + 0x1p-24,
          "router N %d E %d: weights without renormalisation, scaled: %.3g "
          "from the double reference",
          N, E, worst);
    void *variant_buffers[] = {d_ids2, d_weights2};
    FREE_ON_DEVICE(variant_buffers);
    free(g_ids2), free(g_weights2), free(reference);
    /* permutation, on the CPU's ids */
    int32_t *offsets = xmalloc((size_t)(E + 1) * sizeof(int32_t)), *sor = xmalloc((size_t)M * sizeof(int32_t)),
            *ros = xmalloc((size_t)M * sizeof(int32_t));
    cpu->permute_by_expert(offsets, sor, ros, ids, N, K, E);
    int32_t *d_offsets = device_alloc((size_t)(E + 1) * sizeof(int32_t)), *d_sor = device_alloc((size_t)M * sizeof(int32_t)),
            *d_ros = device_alloc((size_t)M * sizeof(int32_t));
    int32_t *d_cpu_ids = (int32_t *)to_device(ids, (size_t)M * sizeof(int32_t));
    void *workspace = device_alloc(moe_permute_workspace(M, E));
    CHECK(moe_permute_by_expert(d_offsets, d_sor, d_ros, d_cpu_ids, M, E, workspace, err, sizeof err) == 0, "%s", err);
    int32_t *g_offsets = from_device(d_offsets, (size_t)(E + 1) * sizeof(int32_t));
    int32_t *g_sor = from_device(d_sor, (size_t)M * sizeof(int32_t)), *g_ros = from_device(d_ros, (size_t)M * sizeof(int32_t));
    CHECK(memcmp(g_offsets, offsets, (size_t)(E + 1) * sizeof(int32_t)) == 0 &&
              memcmp(g_sor, sor, (size_t)M * sizeof(int32_t)) == 0 && memcmp(g_ros, ros, (size_t)M * sizeof(int32_t)) == 0,
          "permutation N %d E %d K %d differs from the CPU backend's", N, E, K);
    /* gather, SwiGLU, combine */
    float *x = xmalloc((size_t)N * H * sizeof(float)), *gate = xmalloc((size_t)M * I * sizeof(float)),
          *up = xmalloc((size_t)M * I * sizeof(float)), *ys = xmalloc((size_t)M * H * sizeof(float));
    for (size_t i = 0; i < (size_t)N * H; i++) x[i] = (float)rng_uniform(&rng) - 0.5f;
    for (size_t i = 0; i < (size_t)M * I; i++) gate[i] = (float)rng_uniform(&rng) * 6 - 3, up[i] = (float)rng_uniform(&rng) - 0.5f;
    for (size_t i = 0; i < (size_t)M * H; i++) ys[i] = (float)rng_uniform(&rng) - 0.5f;
    float *xs = xmalloc((size_t)M * H * sizeof(float)), *h = xmalloc((size_t)M * I * sizeof(float)),
          *out = xmalloc((size_t)N * H * sizeof(float));
    cpu->gather_rows(xs, x, sor, M, K, H);
    cpu->glu(h, gate, up, (size_t)M * I, ACT_SILU);
    cpu->combine(out, ys, weights, ros, N, K, H, false);
    float *d_x = to_device(x, (size_t)N * H * sizeof(float)), *d_xs = device_alloc((size_t)M * H * sizeof(float));
    float *d_gate = to_device(gate, (size_t)M * I * sizeof(float)), *d_up = to_device(up, (size_t)M * I * sizeof(float));
    float *d_h = device_alloc((size_t)M * I * sizeof(float)), *d_ys = to_device(ys, (size_t)M * H * sizeof(float));
    float *d_out = device_alloc((size_t)N * H * sizeof(float)), *d_w = to_device(weights, (size_t)M * sizeof(float));
    CHECK(moe_gather_rows(d_xs, d_x, d_sor, M, K, H, err, sizeof err) == 0, "%s", err);
    CHECK(moe_glu(d_h, d_gate, d_up, (size_t)M * I, 0, err, sizeof err) == 0, "%s", err);
    CHECK(moe_combine(d_out, d_ys, d_w, d_ros, N, K, H, 0, err, sizeof err) == 0, "%s", err);
    float *g_xs = from_device(d_xs, (size_t)M * H * sizeof(float)), *g_h = from_device(d_h, (size_t)M * I * sizeof(float));
    float *g_out = from_device(d_out, (size_t)N * H * sizeof(float));
    CHECK(memcmp(g_xs, xs, (size_t)M * H * sizeof(float)) == 0, "gather_rows");
    CHECK(check_worst_relative(g_h, h, (size_t)M * I) < 1e-6, "SwiGLU");
    CHECK(check_worst_relative(g_out, out, (size_t)N * H) < 1e-6, "combine");
    cpu->combine(out, ys, weights, ros, N, K, H, true); /* added to the first combine's out */
    CHECK(moe_combine(d_out, d_ys, d_w, d_ros, N, K, H, 1, err, sizeof err) == 0, "%s", err);
    expect_floats(d_out, out, (size_t)N * H, 1e-6, "combine, accumulated");
    printf("moe kernels, N %d E %d K %d H %d I %d: compared with the CPU backend\n", N, E, K, H, I);
    void *device_buffers[] = {d_logits, d_ids, d_weights, d_probs, d_offsets, d_sor, d_ros, d_cpu_ids,
                              workspace, d_x, d_xs, d_gate, d_up, d_h, d_ys, d_out, d_w};
    FREE_ON_DEVICE(device_buffers);
    void *host_buffers[] = {logits, ids, weights, probs, g_ids, g_weights, g_probs, offsets, sor, ros,
                            g_offsets, g_sor, g_ros, x, gate, up, ys, xs, h, out, g_xs, g_h, g_out};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
}
/* Router rows with a NaN logit, all NaN logits, or an infinite one: every probability of
 * such a row is NaN, and the kernel must pick the ids the CPU backend picks there (the
 * lowest untaken, 0, 1, ...), never id E, which sends the permutation out of bounds. The
 * permutation then runs on the kernel's ids. */
static void check_router_nan(int E, int K)
{
    const struct backend *cpu = backend_cpu();
    char err[256];
    struct rng rng;
    rng_seed(&rng, (uint64_t)E * 977 + (uint64_t)K);
    enum { N = 4 };
    int M = N * K;
    float *logits = random_floats(&rng, (size_t)N * E, -4, 4);
    logits[1 * E + E / 2] = NAN;
    for (int e = 0; e < E; e++) logits[2 * E + e] = NAN;
    logits[3 * E + E - 1] = INFINITY;
    int32_t *ids = xmalloc((size_t)M * sizeof(int32_t));
    float *weights = xmalloc((size_t)M * sizeof(float)),
          *probs = xmalloc((size_t)N * E * sizeof(float));
    cpu->router_topk(ids, weights, probs, logits, N, E, K, &SOFTMAX_RENORM);
    float *d_logits = to_device(logits, (size_t)N * E * sizeof(float)),
          *d_probs = device_alloc((size_t)N * E * sizeof(float));
    int32_t *d_ids = device_alloc((size_t)M * sizeof(int32_t));
    float *d_weights = device_alloc((size_t)M * sizeof(float));
    CHECK(moe_router_topk(d_ids, d_weights, d_probs, d_logits, N, E, K, 1, 1.0f, err, sizeof err) ==
              0,
          "%s", err);
    int32_t *g_ids = from_device(d_ids, (size_t)M * sizeof(int32_t));
    float *g_weights = from_device(d_weights, (size_t)M * sizeof(float));
    int out_of_range = 0, nan_differ = 0;
    for (int s = 0; s < M; s++) {
        out_of_range += g_ids[s] < 0 || g_ids[s] >= E;
        nan_differ += !isnan(g_weights[s]) != !isnan(weights[s]);
    }
    CHECK(out_of_range == 0, "router E %d with NaN logits: %d ids out of [0, %d)", E, out_of_range,
          E);
    CHECK(memcmp(g_ids + K, ids + K, (size_t)(M - K) * sizeof(int32_t)) == 0,
          "router E %d with NaN logits: ids differ from the CPU backend's", E);
    CHECK(nan_differ == 0 && isnan(weights[K]) && isnan(weights[2 * K]) && isnan(weights[3 * K]),
          "router E %d with NaN logits: %d weights NaN on one backend only", E, nan_differ);
    if (!near_tie(probs, ids, E, K)) { /* row 0, finite */
        CHECK(memcmp(g_ids, ids, (size_t)K * sizeof(int32_t)) == 0,
              "router E %d: the finite row's ids", E);
        CHECK(check_worst_relative(g_weights, weights, (size_t)K) < 1e-6,
              "router E %d: the finite row's weights", E);
    }
    int32_t *offsets = xmalloc((size_t)(E + 1) * sizeof(int32_t)),
            *sor = xmalloc((size_t)M * sizeof(int32_t)),
            *ros = xmalloc((size_t)M * sizeof(int32_t));
    cpu->permute_by_expert(offsets, sor, ros, ids, N, K, E);
    int32_t *d_offsets = device_alloc((size_t)(E + 1) * sizeof(int32_t)),
            *d_sor = device_alloc((size_t)M * sizeof(int32_t)),
            *d_ros = device_alloc((size_t)M * sizeof(int32_t));
    void *workspace = device_alloc(moe_permute_workspace(M, E));
    if (out_of_range == 0) { /* else the permutation would write out of bounds */
        CHECK(moe_permute_by_expert(d_offsets, d_sor, d_ros, d_ids, M, E, workspace, err,
                                    sizeof err) == 0,
              "%s", err);
        int32_t *g_offsets = from_device(d_offsets, (size_t)(E + 1) * sizeof(int32_t));
        int32_t *g_sor = from_device(d_sor, (size_t)M * sizeof(int32_t)),
                *g_ros = from_device(d_ros, (size_t)M * sizeof(int32_t));
        CHECK(memcmp(g_offsets, offsets, (size_t)(E + 1) * sizeof(int32_t)) == 0 &&
                  memcmp(g_sor, sor, (size_t)M * sizeof(int32_t)) == 0 &&
                  memcmp(g_ros, ros, (size_t)M * sizeof(int32_t)) == 0,
              "router E %d with NaN logits: the permutation differs from the CPU backend's", E);
        free(g_offsets), free(g_sor), free(g_ros);
    }
    printf("router kernel, E %d K %d, rows with NaN and infinite logits: compared with the CPU "
           "backend\n",
           E, K);
    void *device_buffers[] = {d_logits,  d_probs, d_ids, d_weights,
                              d_offsets, d_sor,   d_ros, workspace};
    FREE_ON_DEVICE(device_buffers);
    void *host_buffers[] = {logits, ids, weights, probs, g_ids, g_weights, offsets, sor, ros};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
}

/* The cross-entropy total of the kernel (a 256-thread tree sum of fp32 exponentials a
 * row) against the CPU backend's (fp32 exponentials summed in double, within about 1e-7
 * of exact): the total's error is the sum over rows of each row's log-sum-exp error, which
 * is the relative error of the row's sum of exponentials. Replaying the kernel's order on
 * the host (V = 151936, logits in [-8, 8]) puts that at -4.6e-7 a row on average, 5.5e-7
 * at worst; CUDA's expf (2 ulp) adds noise that averages out over the row. So the bound is
 * 2e-6 a counted row, in absolute terms (a relative bound on the total would depend on
 * how large the loss is). The CPU's former fp32 sum was 1.8e-5 off a row. */
static bool cross_entropy_close(double total, double want, long long counted)
{
    return fabs(total - want) <= 2e-6 * (double)counted;
}

/* The dense kernels (kernels/dense.h) against the CPU backend: N tokens, width H, a
 * vocabulary V, heads of Dh with a partial rotary dimension. */
static void check_dense(int N, int H, int V, int n_heads, int Dh, int rotary_dim)
{
    const struct backend *cpu = backend_cpu();
    char err[256];
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 7919 + (uint64_t)H);
    size_t NH = (size_t)N * H, NV = (size_t)N * V, NQ = (size_t)N * n_heads * Dh;
    /* embedding, forward and backward (tokens repeat: the backward's sums in token order) */
    int32_t *tokens = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) tokens[n] = (int32_t)rng_below(&rng, (uint64_t)(V < 7 ? V : 7));
    float *table = random_floats(&rng, (size_t)V * H, -1, 1), *x = xmalloc(NH * sizeof(float));
    cpu->embedding(x, tokens, table, N, H);
    int32_t *d_tokens = (int32_t *)to_device(tokens, (size_t)N * sizeof(int32_t));
    float *d_table = to_device(table, (size_t)V * H * sizeof(float)), *d_x = device_alloc(NH * sizeof(float));
    CHECK(dense_embedding(d_x, d_tokens, d_table, N, H, err, sizeof err) == 0, "%s", err);
    expect_floats(d_x, x, NH, 0, "embedding");
    float *dx = random_floats(&rng, NH, -1, 1), *d_dx = to_device(dx, NH * sizeof(float));
    cpu->embedding_backward(table, dx, tokens, N, H);
    CHECK(dense_embedding_backward(d_table, d_dx, d_tokens, N, H, err, sizeof err) == 0, "%s", err);
    expect_floats(d_table, table, (size_t)V * H, 0, "embedding backward");
    /* RMSNorm: forward; backward from the CPU's rstd, dx apart and in place over dy */
    float *w = random_floats(&rng, (size_t)H, 0.5f, 1.5f), *y = xmalloc(NH * sizeof(float));
    float *rstd = xmalloc((size_t)N * sizeof(float));
    cpu->rmsnorm(y, rstd, x, w, N, H, 1e-6f);
    float *d_w = to_device(w, (size_t)H * sizeof(float)), *d_y = device_alloc(NH * sizeof(float));
    float *d_rstd = device_alloc((size_t)N * sizeof(float));
    CHECK(dense_rmsnorm(d_y, d_rstd, d_x, d_w, N, H, 1e-6f, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y, y, NH, 1e-6, "rmsnorm");
    expect_floats(d_rstd, rstd, (size_t)N, 1e-6, "rmsnorm rstd");
    CHECK(dense_rmsnorm(d_y, NULL, d_x, d_w, N, H, 1e-6f, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y, y, NH, 1e-6, "rmsnorm without rstd");
    CHECK(device_copy_to_device(d_rstd, rstd, (size_t)N * sizeof(float)) == 0, "upload");
    float *dy = random_floats(&rng, NH, -1, 1), *dw = random_floats(&rng, (size_t)H, -1, 1);
    float *d_dy = to_device(dy, NH * sizeof(float)), *d_dw = to_device(dw, (size_t)H * sizeof(float));
    void *workspace = device_alloc(dense_rmsnorm_workspace(N, H));
    cpu->rmsnorm_backward(dx, dw, dy, x, w, rstd, N, H, false);
    CHECK(dense_rmsnorm_backward(d_dx, d_dw, d_dy, d_x, d_w, d_rstd, N, H, 0, workspace, err,
                                 sizeof err) == 0, "%s", err);
    expect_floats(d_dx, dx, NH, 1e-5, "rmsnorm backward dx");
    expect_floats(d_dw, dw, (size_t)H, 1e-5, "rmsnorm backward dw");
    CHECK(dense_rmsnorm_backward(d_dy, NULL, d_dy, d_x, d_w, d_rstd, N, H, 0, workspace, err,
                                 sizeof err) == 0, "%s", err);
    expect_floats(d_dy, dx, NH, 1e-5, "rmsnorm backward, dx over dy");
    /* accumulate_dx: dx += the gradient (dw always accumulates) */
    CHECK(device_copy_to_device(d_dy, dy, NH * sizeof(float)) == 0, "upload");
    cpu->rmsnorm_backward(dx, dw, dy, x, w, rstd, N, H, true);
    CHECK(dense_rmsnorm_backward(d_dx, d_dw, d_dy, d_x, d_w, d_rstd, N, H, 1, workspace, err,
                                 sizeof err) == 0,
          "%s", err);
    expect_floats(d_dx, dx, NH, 1e-5, "rmsnorm backward dx, accumulated");
    expect_floats(d_dw, dw, (size_t)H, 1e-5, "rmsnorm backward dw, accumulated");
    /* RoPE, forward and its transpose */
    int32_t *positions = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) positions[n] = (int32_t)rng_below(&rng, 4096);
    float *inv_freq = xmalloc((size_t)(rotary_dim / 2) * sizeof(float));
    for (int i = 0; i < rotary_dim / 2; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / rotary_dim);
    float *q = random_floats(&rng, NQ, -1, 1), *d_q = to_device(q, NQ * sizeof(float));
    int32_t *d_positions = (int32_t *)to_device(positions, (size_t)N * sizeof(int32_t));
    float *d_inv_freq = to_device(inv_freq, (size_t)(rotary_dim / 2) * sizeof(float));
    for (int pass = 0; pass < 4; pass++) { /* rotate-half, then interleaved (deepseek) */
        int backward = pass % 2, interleaved = pass / 2;
        enum hf_rope_layout layout = interleaved ? ROPE_INTERLEAVED : ROPE_ROTATE_HALF;
        if (backward)
            cpu->rope_backward(q, positions, inv_freq, 1.25f, N, n_heads, Dh, rotary_dim, layout);
        else
            cpu->rope(q, positions, inv_freq, 1.25f, N, n_heads, Dh, rotary_dim, layout);
        CHECK(dense_rope(d_q, d_positions, d_inv_freq, 1.25f, N, n_heads, Dh, rotary_dim,
                         interleaved, backward, err, sizeof err) == 0, "%s", err);
        expect_floats(d_q, q, NQ, 1e-5,
                      backward ? (interleaved ? "rope backward, interleaved" : "rope backward")
                               : (interleaved ? "rope, interleaved" : "rope"));
    }
    /* add, clamp and its backward: one operation an element, bit for bit */
    float *sum = xmalloc(NH * sizeof(float));
    CHECK(device_copy_to_device(d_dy, dy, NH * sizeof(float)) == 0, "upload"); /* was overwritten */
    cpu->add(sum, x, dy, NH);
    CHECK(dense_add(d_y, d_x, d_dy, NH, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y, sum, NH, 0, "add");
    cpu->clamp(sum, NH, -0.5f, 0.5f);
    CHECK(dense_clamp(d_y, NH, -0.5f, 0.5f, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y, sum, NH, 0, "clamp");
    CHECK(device_copy_to_device(d_dx, dy, NH * sizeof(float)) == 0, "upload");
    cpu->clamp_backward(dy, sum, NH, -0.5f, 0.5f);
    CHECK(dense_clamp_backward(d_dx, d_y, NH, -0.5f, 0.5f, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dx, dy, NH, 0, "clamp backward");
    /* cross-entropy: the loss, and the gradient apart and over the logits */
    float *logits = random_floats(&rng, NV, -8, 8), *dlogits = xmalloc(NV * sizeof(float));
    int32_t *labels = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) labels[n] = n % 5 == 3 ? -100 : (int32_t)rng_below(&rng, (uint64_t)V);
    long long want_counted = 0, counted = 0;
    double want_total = cpu->cross_entropy_sum(logits, labels, N, V, &want_counted), total = 0;
    cpu->cross_entropy_backward(dlogits, logits, labels, N, V, 0.125f);
    float *d_logits = to_device(logits, NV * sizeof(float)), *d_dlogits = device_alloc(NV * sizeof(float));
    int32_t *d_labels = (int32_t *)to_device(labels, (size_t)N * sizeof(int32_t));
    double *d_row_loss = device_alloc((size_t)N * sizeof(double));
    double *host_loss = xmalloc((size_t)N * sizeof(double));
    int32_t *host_labels = xmalloc((size_t)N * sizeof(int32_t));
    for (int in_place = 0; in_place < 2; in_place++) {
        float *target = in_place ? d_logits : d_dlogits;
        CHECK(dense_cross_entropy(d_row_loss, target, d_logits, d_labels, N, V, 0.125f, err,
                                  sizeof err) == 0, "%s", err);
        CHECK(dense_sum_rows(&total, &counted, d_row_loss, d_labels, N, host_loss, host_labels, err,
                         sizeof err) == 0, "%s", err);
        CHECK(counted == want_counted && cross_entropy_close(total, want_total, want_counted),
              "cross-entropy: %.9g over %lld rows, the CPU %.9g over %lld", total, counted,
              want_total, want_counted);
        expect_floats(target, dlogits, NV, 1e-5, in_place ? "cross-entropy gradient over the logits"
                                                          : "cross-entropy gradient");
    }
    /* the loss alone (the op table's cross_entropy_sum): no gradient, the logits untouched */
    CHECK(device_copy_to_device(d_logits, logits, NV * sizeof(float)) == 0, "upload");
    CHECK(dense_cross_entropy(d_row_loss, NULL, d_logits, d_labels, N, V, 0.125f, err,
                              sizeof err) == 0,
          "%s", err);
    CHECK(dense_sum_rows(&total, &counted, d_row_loss, d_labels, N, host_loss, host_labels, err,
                         sizeof err) == 0, "%s",
          err);
    CHECK(counted == want_counted && cross_entropy_close(total, want_total, want_counted),
          "cross-entropy without gradient: %.9g over %lld rows, the CPU %.9g over %lld", total,
          counted, want_total, want_counted);
    expect_floats(d_logits, logits, NV, 0, "cross-entropy without gradient: the logits");
    printf("dense kernels, N %d H %d V %d heads %d x %d (rotary %d): compared with the CPU backend\n",
           N, H, V, n_heads, Dh, rotary_dim);
    void *device_buffers[] = {d_tokens, d_table, d_x, d_dx, d_w, d_y, d_rstd, d_dy, d_dw, workspace,
                              d_q, d_positions, d_inv_freq, d_logits, d_dlogits, d_labels, d_row_loss};
    FREE_ON_DEVICE(device_buffers);
    void *host_buffers[] = {tokens, table, x, dx, w, y, rstd, dy, dw, positions, inv_freq, q, sum,
                            logits, dlogits, labels, host_loss, host_labels};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
}

/* The optimizer kernels (kernels/optimizer.h) against the host's arithmetic on n elements:
 * three AdamW steps, the squared sum, the scale. */
static void check_optim(size_t n)
{
    char err[256];
    struct rng rng;
    rng_seed(&rng, (uint64_t)n);
    float *data = random_floats(&rng, n, -1, 1), *m = xcalloc(n ? n : 1, sizeof(float));
    float *v = xcalloc(n ? n : 1, sizeof(float)), *grad = random_floats(&rng, n, -0.01f, 0.01f);
    float *d_data = to_device(data, n * sizeof(float)), *d_m = to_device(m, n * sizeof(float));
    float *d_v = to_device(v, n * sizeof(float)), *d_grad = to_device(grad, n * sizeof(float));
    for (long long t = 1; t <= 3; t++) {
        struct adamw_coef coef = adamw_coefficients(1e-3, 0.9, 0.999, 1e-8, 0.1, t);
        for (size_t i = 0; i < n; i++) adamw_update(&data[i], &m[i], &v[i], grad[i], &coef);
        CHECK(optim_adamw(d_data, d_m, d_v, d_grad, n, coef, err, sizeof err) == 0, "%s", err);
    }
    expect_floats(d_data, data, n, 1e-6, "AdamW parameters");
    expect_floats(d_m, m, n, 1e-6, "AdamW first moments");
    expect_floats(d_v, v, n, 1e-6, "AdamW second moments");
    double want = 0, got = 0; /* the chunked sum, as src/optim.c's grad_norm forms it: each
                               * chunk by dense_math.h's lanes (test_dense_math checks them
                               * against a sum of its own) */
    for (size_t c = 0; c * NORM_CHUNK < n; c++)
        want += norm_chunk_squares(grad, c * NORM_CHUNK, (c + 1) * NORM_CHUNK < n ? (c + 1) * NORM_CHUNK : n);
    void *workspace = device_alloc(optim_sum_squares_workspace(n));
    double *host_sums = xmalloc(optim_sum_squares_workspace(n));
    CHECK(optim_sum_squares(&got, d_grad, n, workspace, host_sums, err, sizeof err) == 0, "%s", err);
    free(host_sums);
    CHECK(got == want, "squared-gradient sum %.17g, the host's %.17g", got, want);
    for (size_t i = 0; i < n; i++) grad[i] *= 0.375f;
    CHECK(optim_scale(d_grad, n, 0.375f, err, sizeof err) == 0, "%s", err);
    expect_floats(d_grad, grad, n, 0, "gradient scale");
    printf("optimizer kernels, %zu elements: compared with the host\n", n);
    void *device_buffers[] = {d_data, d_m, d_v, d_grad, workspace};
    FREE_ON_DEVICE(device_buffers);
    free(data), free(m), free(v), free(grad);
}
/* x rounded to bf16 in place; returns the bf16 copy (for the device's bf16 operands). */
static uint16_t *round_to_bf16(float *x, size_t n)
{
    uint16_t *h = xmalloc((n ? n : 1) * sizeof(uint16_t));
    st_f32_to_bf16_array(x, h, n);
    for (size_t i = 0; i < n; i++) x[i] = st_bf16_to_f32(h[i]);
    return h;
}

/* The cuBLAS GEMMs (kernels/gemm.h) against the CPU backend, fp32 and bf16 operands: a
 * linear layer with bias forward and backward, then E experts' grouped GEMMs over a
 * random routing with empty and frozen experts. */
static void check_gemm(int N, int I, int O, int E, enum gemm_type type)
{
    const struct backend *cpu = backend_cpu();
    char err[256];
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 31 + (uint64_t)I * 7 + (uint64_t)O + (uint64_t)type);
    struct gemm_context *ctx = gemm_create(err, sizeof err);
    CHECK(ctx != NULL, "%s", err);
    if (!ctx) return;
    size_t es = type == GEMM_BF16 ? 2 : 4;
    float *x = random_floats(&rng, (size_t)N * I, -1, 1), *w = random_floats(&rng, (size_t)E * O * I, -1, 1);
    float *dy = random_floats(&rng, (size_t)N * O, -1, 1), *bias = random_floats(&rng, (size_t)O, -1, 1);
    const void *hx = x, *hw = w, *hdy = dy; /* the operands as the device gets them */
    uint16_t *bx = NULL, *bw = NULL, *bdy = NULL;
    if (type == GEMM_BF16) {
        bx = round_to_bf16(x, (size_t)N * I), bw = round_to_bf16(w, (size_t)E * O * I);
        bdy = round_to_bf16(dy, (size_t)N * O);
        hx = bx, hw = bw, hdy = bdy;
    }
    void *d_x = to_device(hx, (size_t)N * I * es), *d_w = to_device(hw, (size_t)E * O * I * es);
    void *d_dy = to_device(hdy, (size_t)N * O * es);
    float *d_bias = to_device(bias, (size_t)O * sizeof(float));
    /* dense: y = x w0^T + bias, then dx (accumulated), dw, dbias */
    float *y = xmalloc((size_t)N * O * sizeof(float)), *d_y = device_alloc((size_t)N * O * sizeof(float));
    cpu->linear(y, x, w, bias, N, I, O, false);
    CHECK(gemm_linear(ctx, d_y, d_x, d_w, d_bias, N, I, O, 0, type, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y, y, (size_t)N * O, 1e-5, "gemm_linear");
    float *dx = random_floats(&rng, (size_t)N * I, -1, 1), *dw = random_floats(&rng, (size_t)O * I, -1, 1);
    float *dbias = random_floats(&rng, (size_t)O, -1, 1);
    float *d_dx = to_device(dx, (size_t)N * I * sizeof(float)), *d_dw = to_device(dw, (size_t)O * I * sizeof(float));
    float *d_dbias = to_device(dbias, (size_t)O * sizeof(float));
    void *workspace = device_alloc(gemm_bias_workspace(N, O));
    cpu->linear_backward(dx, dw, type == GEMM_F32 ? dbias : NULL, dy, x, w, N, I, O, true);
    CHECK(gemm_linear_backward(ctx, d_dx, d_dw, type == GEMM_F32 ? d_dbias : NULL, d_dy, d_x, d_w, N, I,
                               O, 1, type, workspace, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dx, dx, (size_t)N * I, 1e-5, "gemm_linear_backward dx");
    expect_floats(d_dw, dw, (size_t)O * I, 1e-5, "gemm_linear_backward dw");
    expect_floats(d_dbias, dbias, (size_t)O, type == GEMM_F32 ? 1e-6 : 0, "gemm_linear_backward dbias");
    /* grouped: N rows over E experts, experts 1 and E - 1 empty, odd experts frozen */
    int32_t *offsets = xcalloc((size_t)(E + 1), sizeof(int32_t));
    for (int r = 0; r < N; r++) {
        int e = (int)rng_below(&rng, (uint64_t)E);
        offsets[(e == 1 || e == E - 1 ? 0 : e) + 1]++;
    }
    for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    float *ys = xmalloc((size_t)N * O * sizeof(float));
    const float **experts = expert_array(w, E, (size_t)O * I);
    cpu->grouped_linear(ys, x, experts, offsets, E, I, O);
    CHECK(gemm_grouped_linear(ctx, d_y, d_x, d_w, offsets, E, I, O, type, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y, ys, (size_t)N * O, 1e-5, "gemm_grouped_linear");
    float **dws = xcalloc((size_t)E, sizeof *dws), **d_dws = xcalloc((size_t)E, sizeof *d_dws);
    for (int e = 0; e < E; e++)
        if (e % 2 == 0) {
            dws[e] = random_floats(&rng, (size_t)O * I, -1, 1);
            d_dws[e] = to_device(dws[e], (size_t)O * I * sizeof(float));
        }
    cpu->grouped_linear_backward(dx, dws, dy, x, experts, offsets, E, I, O);
    CHECK(gemm_grouped_linear_backward(ctx, d_dx, d_dws, d_dy, d_x, d_w, offsets, E, I, O, type, err,
                                       sizeof err) == 0, "%s", err);
    expect_floats(d_dx, dx, (size_t)N * I, 1e-5, "gemm_grouped_linear_backward dx");
    for (int e = 0; e < E; e += 2) expect_floats(d_dws[e], dws[e], (size_t)O * I, 1e-5, "grouped dw");
    if (type == GEMM_F32) { /* the same in one cublasGemmGroupedBatchedEx (fp32 in and out) */
        CHECK(gemm_grouped_linear_batched(ctx, d_y, GEMM_F32, d_x, d_w, offsets, E, I, O, type, err,
                                          sizeof err) == 0, "%s", err);
        expect_floats(d_y, ys, (size_t)N * O, 1e-5, "gemm_grouped_linear_batched");
        for (int e = 0; e < E; e += 2) { /* dw accumulates: once more from the same start */
            float *again = random_floats(&rng, (size_t)O * I, -1, 1);
            device_free(d_dws[e]);
            d_dws[e] = to_device(again, (size_t)O * I * sizeof(float));
            memcpy(dws[e], again, (size_t)O * I * sizeof(float));
            free(again);
        }
        cpu->grouped_linear_backward(dx, dws, dy, x, experts, offsets, E, I, O);
        CHECK(gemm_grouped_linear_backward_batched(ctx, d_dx, d_dws, d_dy, d_x, d_w, offsets, E, I, O,
                                                   type, err, sizeof err) == 0, "%s", err);
        expect_floats(d_dx, dx, (size_t)N * I, 1e-5, "gemm_grouped_linear_backward_batched dx");
        for (int e = 0; e < E; e += 2)
            expect_floats(d_dws[e], dws[e], (size_t)O * I, 1e-5, "grouped batched dw");
    }
    free((void *)experts);
    printf("cuBLAS GEMMs, N %d I %d O %d E %d, %s operands: compared with the CPU backend\n", N, I, O,
           E, type == GEMM_BF16 ? "bf16" : "fp32");
    for (int e = 0; e < E; e++) free(dws[e]), device_free(d_dws[e]);
    free(dws), free(d_dws);
    void *device_buffers[] = {d_x, d_w, d_dy, d_bias, d_y, d_dx, d_dw, d_dbias, workspace};
    FREE_ON_DEVICE(device_buffers);
    void *host_buffers[] = {x, w, dy, bias, bx, bw, bdy, y, dx, dw, dbias, offsets, ys};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
    gemm_destroy(ctx);
}

/* The MoE backward kernels against the CPU backend on one random routing. */
static void check_moe_backward(int N, int E, int K, int H, int I)
{
    const struct backend *cpu = backend_cpu();
    char err[256];
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 131 + (uint64_t)E);
    int M = N * K;
    float *logits = random_floats(&rng, (size_t)N * E, -4, 4), *probs = xmalloc((size_t)N * E * sizeof(float));
    int32_t *ids = xmalloc((size_t)M * sizeof(int32_t));
    float *weights = xmalloc((size_t)M * sizeof(float));
    cpu->router_topk(ids, weights, probs, logits, N, E, K, &SOFTMAX_RENORM_X25);
    int32_t *offsets = xmalloc((size_t)(E + 1) * sizeof(int32_t)), *sor = xmalloc((size_t)M * sizeof(int32_t));
    int32_t *ros = xmalloc((size_t)M * sizeof(int32_t));
    cpu->permute_by_expert(offsets, sor, ros, ids, N, K, E);
    int32_t *d_ids = (int32_t *)to_device(ids, (size_t)M * sizeof(int32_t));
    int32_t *d_ros = (int32_t *)to_device(ros, (size_t)M * sizeof(int32_t));
    float *d_probs = to_device(probs, (size_t)N * E * sizeof(float)), *d_weights = to_device(weights, (size_t)M * sizeof(float));
    /* SwiGLU */
    size_t MI = (size_t)M * I;
    float *gate = random_floats(&rng, MI, -4, 4), *up = random_floats(&rng, MI, -1, 1), *dh = random_floats(&rng, MI, -1, 1);
    float *dgate = xmalloc(MI * sizeof(float)), *dup = xmalloc(MI * sizeof(float));
    cpu->glu_backward(dgate, dup, dh, gate, up, MI, ACT_SILU);
    float *d_gate = to_device(gate, MI * sizeof(float)), *d_up = to_device(up, MI * sizeof(float));
    float *d_dh = to_device(dh, MI * sizeof(float)), *d_dgate = device_alloc(MI * sizeof(float)), *d_dup = device_alloc(MI * sizeof(float));
    CHECK(moe_glu_backward(d_dgate, d_dup, d_dh, d_gate, d_up, MI, 0, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dgate, dgate, MI, 1e-6, "SwiGLU backward dgate");
    expect_floats(d_dup, dup, MI, 1e-6, "SwiGLU backward dup");
    /* the same with GELU (gpt_oss-style activations) */
    cpu->glu(dgate, gate, up, MI, ACT_GELU);
    CHECK(moe_glu(d_dgate, d_gate, d_up, MI, 1, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dgate, dgate, MI, 1e-6, "GELU GLU");
    cpu->glu_backward(dgate, dup, dh, gate, up, MI, ACT_GELU);
    CHECK(moe_glu_backward(d_dgate, d_dup, d_dh, d_gate, d_up, MI, 1, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dgate, dgate, MI, 1e-6, "GELU GLU backward dgate");
    expect_floats(d_dup, dup, MI, 1e-6, "GELU GLU backward dup");
    /* load-balancing statistics: a count and a double sum in token order, bit for bit */
    float *counts = xmalloc((size_t)E * sizeof(float)), *prob_sums = xmalloc((size_t)E * sizeof(float));
    cpu->router_balance_stats(counts, prob_sums, probs, ids, N, E, K);
    float *d_counts = device_alloc((size_t)E * sizeof(float)), *d_prob_sums = device_alloc((size_t)E * sizeof(float));
    CHECK(moe_router_balance_stats(d_counts, d_prob_sums, d_probs, d_ids, N, E, K, err, sizeof err) == 0, "%s", err);
    expect_floats(d_counts, counts, (size_t)E, 0, "balance counts");
    expect_floats(d_prob_sums, prob_sums, (size_t)E, 0, "balance probability sums");
    /* the gated shared expert, forward and backward */
    size_t NH0 = (size_t)N * H;
    float *shared = random_floats(&rng, NH0, -1, 1), *glogit = random_floats(&rng, (size_t)N, -3, 3);
    float *y0 = random_floats(&rng, NH0, -1, 1), *dsh = xmalloc(NH0 * sizeof(float));
    float *dglogit = xmalloc((size_t)N * sizeof(float));
    float *d_shared = to_device(shared, NH0 * sizeof(float)), *d_glogit = to_device(glogit, (size_t)N * sizeof(float));
    float *d_y0 = to_device(y0, NH0 * sizeof(float)), *d_dsh = device_alloc(NH0 * sizeof(float));
    float *d_dglogit = device_alloc((size_t)N * sizeof(float));
    cpu->add_sigmoid_gated(y0, shared, glogit, N, H);
    CHECK(moe_add_sigmoid_gated(d_y0, d_shared, d_glogit, N, H, err, sizeof err) == 0, "%s", err);
    expect_floats(d_y0, y0, NH0, 1e-6, "sigmoid-gated add");
    cpu->add_sigmoid_gated_backward(dsh, dglogit, y0, shared, glogit, N, H); /* y0 as dy */
    CHECK(moe_add_sigmoid_gated_backward(d_dsh, d_dglogit, d_y0, d_shared, d_glogit, N, H, err,
                                         sizeof err) == 0, "%s", err);
    expect_floats(d_dsh, dsh, NH0, 1e-6, "sigmoid-gated add backward ds");
    expect_floats(d_dglogit, dglogit, (size_t)N, 1e-5, "sigmoid-gated add backward dgate");
    void *gated_device[] = {d_counts, d_prob_sums, d_shared, d_glogit, d_y0, d_dsh, d_dglogit};
    FREE_ON_DEVICE(gated_device);
    void *gated_host[] = {counts, prob_sums, shared, glogit, y0, dsh, dglogit};
    for (size_t i = 0; i < sizeof gated_host / sizeof gated_host[0]; i++) free(gated_host[i]);
    /* combine and gather backward */
    size_t MH = (size_t)M * H, NH = (size_t)N * H;
    float *ys = random_floats(&rng, MH, -1, 1), *dout = random_floats(&rng, NH, -1, 1);
    float *dys = xmalloc(MH * sizeof(float)), *dweights = xmalloc((size_t)M * sizeof(float));
    cpu->combine_backward(dys, dweights, dout, ys, weights, ros, N, K, H);
    float *d_ys = to_device(ys, MH * sizeof(float)), *d_dout = to_device(dout, NH * sizeof(float));
    float *d_dys = device_alloc(MH * sizeof(float)), *d_dweights = device_alloc((size_t)M * sizeof(float));
    CHECK(moe_combine_backward(d_dys, d_dweights, d_dout, d_ys, d_weights, d_ros, N, K, H, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dys, dys, MH, 0, "combine backward dys");
    expect_floats(d_dweights, dweights, (size_t)M, 1e-5, "combine backward dweights");
    float *dx = random_floats(&rng, NH, -1, 1), *d_dx = to_device(dx, NH * sizeof(float));
    cpu->gather_rows_backward(dx, dys, ros, N, K, H, true);
    CHECK(moe_gather_rows_backward(d_dx, d_dys, d_ros, N, K, H, 1, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dx, dx, NH, 0, "gather_rows backward");
    /* router, then the balance loss added */
    float *dlogits = xmalloc((size_t)N * E * sizeof(float)), *coef = random_floats(&rng, (size_t)E, -1, 1);
    float *d_dlogits = device_alloc((size_t)N * E * sizeof(float)), *d_coef = to_device(coef, (size_t)E * sizeof(float));
    CHECK(device_copy_to_device(d_dweights, dweights, (size_t)M * sizeof(float)) == 0, "upload");
    cpu->router_topk_backward(dlogits, dweights, probs, ids, N, E, K, &SOFTMAX_RENORM_X25);
    CHECK(moe_router_topk_backward(d_dlogits, d_dweights, d_probs, d_ids, N, E, K, 1, 2.5f, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dlogits, dlogits, (size_t)N * E, 1e-5, "router backward");
    CHECK(device_copy_to_device(d_dlogits, dlogits, (size_t)N * E * sizeof(float)) == 0, "upload");
    cpu->router_balance_backward(dlogits, probs, coef, N, E);
    CHECK(moe_router_balance_backward(d_dlogits, d_probs, d_coef, N, E, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dlogits, dlogits, (size_t)N * E, 1e-5, "router balance backward");
    cpu->router_topk_backward(dlogits, dweights, probs, ids, N, E, K, &SOFTMAX_PLAIN_X25);
    CHECK(moe_router_topk_backward(d_dlogits, d_dweights, d_probs, d_ids, N, E, K, 0, 2.5f, err,
                                   sizeof err) == 0,
          "%s", err);
    expect_floats(d_dlogits, dlogits, (size_t)N * E, 1e-5, "router backward, not renormalised");
    printf("moe backward kernels, N %d E %d K %d H %d I %d: compared with the CPU backend\n", N, E, K, H, I);
    void *device_buffers[] = {d_ids, d_ros, d_probs, d_weights, d_gate, d_up, d_dh, d_dgate, d_dup, d_ys,
                              d_dout, d_dys, d_dweights, d_dx, d_dlogits, d_coef};
    FREE_ON_DEVICE(device_buffers);
    void *host_buffers[] = {logits, probs, ids, weights, offsets, sor, ros, gate, up, dh, dgate, dup, ys,
                            dout, dys, dweights, dx, dlogits, coef};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
}
/* One attention test case: samples of the given lengths packed into one batch, nH query
 * heads over nKV KV heads of Dh (values Dv), a window and sinks as asked; random inputs
 * from seed, the CPU backend's forward and backward, and the inputs and outputs on the
 * device (outputs allocated, not written). */
struct attention_case {
    int N, nH, nKV, Dh, Dv;
    size_t nq, nk, nv, no;
    float scale;
    int32_t *start;
    float *q, *k, *v, *dout, *sink, *dsink, *out, *dq, *dk, *dv;
    int32_t *d_start;
    float *d_q, *d_k, *d_v, *d_dout, *d_sink, *d_dsink, *d_out, *d_dq, *d_dk, *d_dv;
    struct attention_mask mask, d_mask;
};

static void attention_case_new(struct attention_case *c, const int *lengths, int n_samples, int nH,
                               int nKV, int Dh, int Dv, int window, bool sinks, uint64_t seed)
{
    const struct backend *cpu = backend_cpu();
    struct rng rng;
    rng_seed(&rng, seed);
    int N = 0;
    for (int s = 0; s < n_samples; s++) N += lengths[s];
    *c = (struct attention_case){.N = N, .nH = nH, .nKV = nKV, .Dh = Dh, .Dv = Dv};
    c->start = xmalloc((size_t)N * sizeof(int32_t));
    for (int s = 0, at = 0; s < n_samples; at += lengths[s], s++)
        for (int j = 0; j < lengths[s]; j++) c->start[at + j] = at;
    c->nq = (size_t)N * nH * Dh, c->nk = (size_t)N * nKV * Dh, c->nv = (size_t)N * nKV * Dv,
    c->no = (size_t)N * nH * Dv;
    c->q = random_floats(&rng, c->nq, -2, 2), c->k = random_floats(&rng, c->nk, -2, 2);
    c->v = random_floats(&rng, c->nv, -1, 1), c->dout = random_floats(&rng, c->no, -1, 1);
    if (sinks) {
        c->sink = random_floats(&rng, (size_t)nH, -1, 3);
        c->dsink = random_floats(&rng, (size_t)nH, -1, 1);
    }
    c->out = xmalloc(c->no * sizeof(float)), c->dq = xmalloc(c->nq * sizeof(float));
    c->dk = xmalloc(c->nk * sizeof(float)), c->dv = xmalloc(c->nv * sizeof(float));
    c->scale = 1.0f / sqrtf((float)Dh);
    c->d_q = to_device(c->q, c->nq * sizeof(float)), c->d_k = to_device(c->k, c->nk * sizeof(float));
    c->d_v = to_device(c->v, c->nv * sizeof(float));
    c->d_dout = to_device(c->dout, c->no * sizeof(float));
    c->d_start = (int32_t *)to_device(c->start, (size_t)N * sizeof(int32_t));
    if (sinks) {
        c->d_sink = to_device(c->sink, (size_t)nH * sizeof(float));
        c->d_dsink = to_device(c->dsink, (size_t)nH * sizeof(float));
    }
    c->d_out = device_alloc(c->no * sizeof(float)), c->d_dq = device_alloc(c->nq * sizeof(float));
    c->d_dk = device_alloc(c->nk * sizeof(float)), c->d_dv = device_alloc(c->nv * sizeof(float));
    c->mask = (struct attention_mask){c->start, window, c->sink, c->dsink, NULL};
    c->d_mask = (struct attention_mask){c->d_start, window, c->d_sink, c->d_dsink, NULL};
    cpu->attention(c->out, c->q, c->k, c->v, &c->mask, N, nH, nKV, Dh, Dv, c->scale);
    cpu->attention_backward(c->dq, c->dk, c->dv, c->dout, c->q, c->k, c->v, c->out, &c->mask, N, nH,
                            nKV, Dh, Dv, c->scale);
}

static void attention_case_free(struct attention_case *c)
{
    void *device_buffers[] = {c->d_q, c->d_k, c->d_v, c->d_dout, c->d_start, c->d_out, c->d_dq,
                              c->d_dk, c->d_dv};
    FREE_ON_DEVICE(device_buffers);
    if (c->d_sink) device_free(c->d_sink), device_free(c->d_dsink);
    void *host_buffers[] = {c->start, c->q, c->k, c->v, c->dout, c->sink, c->dsink, c->out, c->dq,
                            c->dk, c->dv};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
}

/* The attention kernels (kernels/attention.h) against the CPU backend: samples of the
 * given lengths packed into one batch, nH query heads over nKV KV heads of Dh. */
static void check_attention(const int *lengths, int n_samples, int nH, int nKV, int Dh)
{
    char err[256];
    struct attention_case c;
    attention_case_new(&c, lengths, n_samples, nH, nKV, Dh, Dh, 0, false, (uint64_t)nH * 1009 + (uint64_t)Dh);
    int N = c.N;
    size_t nq = c.nq, nkv = c.nk;
    float scale = c.scale, *out = c.out, *dq = c.dq, *dk = c.dk, *dv = c.dv;
    float *d_q = c.d_q, *d_k = c.d_k, *d_v = c.d_v, *d_dout = c.d_dout, *d_out = c.d_out;
    float *d_dq = c.d_dq, *d_dk = c.d_dk, *d_dv = c.d_dv;
    int32_t *start = c.start, *d_start = c.d_start;
    void *workspace = device_alloc(attention_backward_workspace(N, nH));
    CHECK(attention_forward(d_out, d_q, d_k, d_v, d_start, N, nH, nKV, Dh, scale, err, sizeof err) == 0,
          "%s", err);
    expect_floats(d_out, out, nq, 1e-5, "attention forward");
    CHECK(device_copy_to_device(d_out, out, nq * sizeof(float)) == 0, "upload");
    CHECK(attention_backward(d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v, d_out, d_start, N, nH, nKV, Dh,
                             scale, workspace, err, sizeof err) == 0, "%s", err);
    expect_floats(d_dq, dq, nq, 1e-4, "attention backward dq");
    expect_floats(d_dk, dk, nkv, 1e-4, "attention backward dk");
    expect_floats(d_dv, dv, nkv, 1e-5, "attention backward dv");
    /* the same through cuBLAS (attention_gemm.cu, what the CUDA backend runs): fp32, then
     * on the TF32 tensor cores (about 3e-4 per product: a looser bound) */
    struct gemm_context *ctx = gemm_create(err, sizeof err);
    CHECK(ctx != NULL, "%s", err);
    int *starts = xmalloc((size_t)(N + 1) * sizeof *starts), longest = 0;
    int count = attention_gemm_samples(start, N, starts, &longest);
    CHECK(count == n_samples, "attention_gemm_samples: %d samples, want %d", count, n_samples);
    void *gemm_ws = device_alloc(attention_gemm_workspace(longest, nH, nKV));
    for (int tf32 = 0; ctx && tf32 < 2; tf32++) {
        CHECK(gemm_set_tf32(ctx, tf32, err, sizeof err) == 0, "%s", err);
        double f = tf32 ? 1e-2 : 1e-5, b = tf32 ? 1e-2 : 1e-4;
        const char *mode = tf32 ? "tf32" : "fp32";
        CHECK(device_fill_f32(d_out, nq, NAN, err, sizeof err) == 0, "%s", err);
        CHECK(attention_gemm_forward(gemm_cublas(ctx), d_out, d_q, d_k, d_v, starts, count, nH, nKV,
                                     Dh, Dh, scale, NULL, gemm_ws, err, sizeof err) == 0, "%s", err);
        expect_floats(d_out, out, nq, f, tf32 ? "attention gemm forward (tf32)" : "attention gemm forward");
        CHECK(device_fill_f32(d_dq, nq, NAN, err, sizeof err) == 0, "%s", err);
        CHECK(device_fill_f32(d_dk, nkv, NAN, err, sizeof err) == 0, "%s", err);
        CHECK(attention_gemm_backward(gemm_cublas(ctx), d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v,
                                      starts, count, nH, nKV, Dh, Dh, scale, NULL, gemm_ws, err,
                                      sizeof err) == 0,
              "%s", err);
        expect_floats(d_dq, dq, nq, b, tf32 ? "attention gemm dq (tf32)" : "attention gemm dq");
        expect_floats(d_dk, dk, nkv, b, tf32 ? "attention gemm dk (tf32)" : "attention gemm dk");
        expect_floats(d_dv, dv, nkv, tf32 ? b : 1e-5, tf32 ? "attention gemm dv (tf32)" : "attention gemm dv");
        (void)mode;
    }
    gemm_destroy(ctx);
    free(starts);
    printf("attention kernels and cuBLAS attention (fp32, tf32), %d tokens in %d samples, %d/%d heads "
           "of %d: compared with the CPU backend\n", N, n_samples, nH, nKV, Dh);
    void *device_buffers[] = {workspace, gemm_ws};
    FREE_ON_DEVICE(device_buffers);
    attention_case_free(&c);
}
/* ---- tiled bf16 attention (kernels/attention_flash.h) ------------------------------------ */

/* The relative L2 error sqrt(sum (got - want)^2 / sum want^2) of the device buffer d of n
 * floats against want, held to bound; every element must be finite (the outputs are
 * poisoned with NaN first, so an element the kernel never wrote fails here). */
static double expect_l2(const float *d, const float *want, size_t n, double bound, const char *what)
{
    float *got = from_device(d, n * sizeof(float));
    double num = 0, den = 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) bad++;
        else num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        den += (double)want[i] * want[i];
    }
    double rel = sqrt(num / fmax(den, 1e-300));
    CHECK(bad == 0, "%s: %zu of %zu elements not finite (unwritten?)", what, bad, n);
    CHECK(rel <= bound, "%s: relative L2 error %.3g above %.3g", what, rel, bound);
    free(got);
    return rel;
}

/* lse[h * N + i] = log sum_j e^(scale q_i.k_j) over the keys query i sees, in double. */
static double *reference_lse(const float *q, const float *k, const int32_t *start, int N, int nH,
                             int nKV, int Dh, float scale)
{
    double *lse = xmalloc((size_t)N * nH * sizeof(double));
    double *s = xmalloc((size_t)(N > 0 ? N : 1) * sizeof(double));
    for (int h = 0; h < nH; h++)
        for (int i = 0; i < N; i++) {
            const float *qi = q + ((size_t)i * nH + h) * Dh;
            double m = -INFINITY, sum = 0;
            for (int j = start[i]; j <= i; j++) {
                const float *kj = k + ((size_t)j * nKV + h / (nH / nKV)) * Dh;
                double dot = 0;
                for (int d = 0; d < Dh; d++) dot += (double)qi[d] * kj[d];
                s[j] = scale * dot;
                m = fmax(m, s[j]);
            }
            for (int j = start[i]; j <= i; j++) sum += exp(s[j] - m);
            lse[(size_t)h * N + i] = m + log(sum);
        }
    free(s);
    return lse;
}

/* The tiled kernels against the CPU backend on packed samples of the given lengths: the
 * output and the log-sum-exp, then dq, dk, dv from the forward's lse and from a
 * recomputed one, to bf16 operands' accuracy (relative L2 error 1e-2 forward, 2e-2
 * gradients; the CPU is fp32 throughout). Outputs are poisoned with NaN before each
 * call; two backward runs must agree bit for bit (no atomics). */
static void check_flash(const int *lengths, int n_samples, int nH, int nKV, int Dh)
{
    char err[256];
    struct attention_case c;
    attention_case_new(&c, lengths, n_samples, nH, nKV, Dh, Dh, 0, false,
                       (uint64_t)nH * 7919 + (uint64_t)Dh * 31 + (uint64_t)n_samples);
    int N = c.N;
    size_t nq = c.nq, nkv = c.nk, nl = (size_t)N * nH;
    float scale = c.scale, *out = c.out, *dq = c.dq, *dk = c.dk, *dv = c.dv;
    float *d_q = c.d_q, *d_k = c.d_k, *d_v = c.d_v, *d_dout = c.d_dout, *d_out = c.d_out;
    float *d_dq = c.d_dq, *d_dk = c.d_dk, *d_dv = c.d_dv;
    int32_t *d_start = c.d_start;
    double *lse = reference_lse(c.q, c.k, c.start, N, nH, nKV, Dh, scale);
    float *d_lse = device_alloc(nl * sizeof(float));
    void *workspace = device_alloc(attention_flash_workspace(N, nH));
    CHECK(device_fill_f32(d_out, nq, NAN, err, sizeof err) == 0, "%s", err);
    CHECK(device_fill_f32(d_lse, nl, NAN, err, sizeof err) == 0, "%s", err);
    CHECK(attention_flash_forward(d_out, d_lse, d_q, d_k, d_v, d_start, N, nH, nKV, Dh, scale, err,
                                  sizeof err) == 0, "%s", err);
    double e_out = expect_l2(d_out, out, nq, 1e-2, "flash forward");
    float *got_lse = from_device(d_lse, nl * sizeof(float));
    double e_lse = 0;
    for (size_t i = 0; i < nl; i++) e_lse = fmax(e_lse, isfinite(got_lse[i]) ? fabs(got_lse[i] - lse[i]) : INFINITY);
    CHECK(e_lse <= 2e-2, "flash forward lse: worst error %.3g above 2e-2", e_lse);
    free(got_lse);

    /* the backward from the CPU's output (what the op table gives it), with the kernel's
     * lse, then with lse recomputed; twice, for the bits */
    CHECK(device_copy_to_device(d_out, out, nq * sizeof(float)) == 0, "upload");
    double e_grad[3] = {0, 0, 0};
    float *first[3] = {NULL, NULL, NULL};
    const char *names[3] = {"dq", "dk", "dv"};
    float *d_grad[3] = {d_dq, d_dk, d_dv}, *want[3] = {dq, dk, dv};
    size_t count[3] = {nq, nkv, nkv};
    for (int run = 0; run < 3; run++) {
        for (int g = 0; g < 3; g++)
            CHECK(device_fill_f32(d_grad[g], count[g], NAN, err, sizeof err) == 0, "%s", err);
        CHECK(attention_flash_backward(d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v, d_out,
                                       run == 0 ? d_lse : NULL, d_start, N, nH, nKV, Dh, scale,
                                       workspace, err, sizeof err) == 0, "%s", err);
        for (int g = 0; g < 3; g++) {
            char what[64];
            snprintf(what, sizeof what, "flash backward %s (%s lse)", names[g],
                     run == 0 ? "the forward's" : "recomputed");
            e_grad[g] = fmax(e_grad[g], expect_l2(d_grad[g], want[g], count[g], 2e-2, what));
            if (run == 1) first[g] = from_device(d_grad[g], count[g] * sizeof(float));
            if (run == 2) {
                float *again = from_device(d_grad[g], count[g] * sizeof(float));
                CHECK(memcmp(again, first[g], count[g] * sizeof(float)) == 0,
                      "flash backward %s: two runs differ", names[g]);
                free(again);
                free(first[g]);
            }
        }
    }
    printf("flash attention, %d tokens in %d samples, %d/%d heads of %d: relative L2 out %.2e, "
           "dq %.2e, dk %.2e, dv %.2e; lse within %.2e\n", N, n_samples, nH, nKV, Dh, e_out,
           e_grad[0], e_grad[1], e_grad[2], e_lse);
    void *device_buffers[] = {d_lse, workspace};
    FREE_ON_DEVICE(device_buffers);
    free(lse);
    attention_case_free(&c);
}

/* The op table's choice of attention (src/cuda_ops.c): fp32 mode keeps the cuBLAS path
 * (the CPU's output to 1e-5), tf32 mode takes the tiled kernels (bf16 accuracy, and not
 * the cuBLAS path's bits), ESFT_CUDA_ATTENTION=gemm brings cuBLAS back in tf32 mode. */
static void check_flash_dispatch(void)
{
    const struct backend *cuda = backend_cuda();
    struct attention_case c;
    attention_case_new(&c, (const int[]){100, 3, 156}, 3, 4, 2, 64, 64, 0, false, 20);
    int N = c.N, nH = 4, nKV = 2, Dh = 64;
    size_t nq = c.nq, nkv = c.nk;
    float scale = c.scale, *out = c.out, *dq = c.dq, *dk = c.dk, *dv = c.dv;
    float *d_q = c.d_q, *d_k = c.d_k, *d_v = c.d_v, *d_dout = c.d_dout, *d_out = c.d_out;
    float *d_dq = c.d_dq, *d_dk = c.d_dk, *d_dv = c.d_dv;
    struct attention_mask d_mask = c.d_mask;
    float *outs[3];
    for (int mode = 0; mode < 3; mode++) { /* fp32; tf32; tf32 with ESFT_CUDA_ATTENTION=gemm */
        const char *name = mode == 0 ? "fp32" : mode == 1 ? "tf32" : "tf32, ESFT_CUDA_ATTENTION=gemm";
        backend_cuda_set_tf32(mode > 0);
        if (mode == 2) setenv("ESFT_CUDA_ATTENTION", "gemm", 1);
        char what[96], err[256];
        CHECK(device_fill_f32(d_out, nq, NAN, err, sizeof err) == 0, "%s", err);
        cuda->attention(d_out, d_q, d_k, d_v, &d_mask, N, nH, nKV, Dh, Dh, scale);
        cuda->attention_backward(d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v, d_out, &d_mask, N, nH, nKV,
                                 Dh, Dh, scale);
        double f = mode == 0 ? 1e-5 : 1e-2, b = mode == 0 ? 1e-4 : 2e-2;
        snprintf(what, sizeof what, "op table attention (%s)", name);
        expect_l2(d_out, out, nq, f, what);
        snprintf(what, sizeof what, "op table attention dq (%s)", name);
        expect_l2(d_dq, dq, nq, b, what);
        snprintf(what, sizeof what, "op table attention dk (%s)", name);
        expect_l2(d_dk, dk, nkv, b, what);
        snprintf(what, sizeof what, "op table attention dv (%s)", name);
        expect_l2(d_dv, dv, nkv, b, what);
        outs[mode] = from_device(d_out, nq * sizeof(float));
    }
    unsetenv("ESFT_CUDA_ATTENTION");
    backend_cuda_set_tf32(false);
    CHECK(memcmp(outs[1], outs[2], nq * sizeof(float)) != 0,
          "op table attention: tf32 mode gave the cuBLAS path's bits (the tiled kernels unused?)");
    printf("cuda op table attention: cuBLAS in fp32 mode and with ESFT_CUDA_ATTENTION=gemm, the "
           "tiled kernels in tf32 mode\n");
    for (int mode = 0; mode < 3; mode++) free(outs[mode]);
    attention_case_free(&c);
    backend_cuda_release();
}

/* ---- the op table's variants of deepseek_v2/v3, glm4_moe and gpt_oss ------------------- *
 * Each check runs one op of the CUDA op table (src/cuda_ops.c) and of the CPU one on the
 * same random inputs. The routers share their row code with the CPU (moe_math.h), so
 * only the exponentials (the device's expf, the CPU's cpu_math.h polynomial, both within
 * 4 ulp) and fused multiply-adds differ: ids equal except where the CPU's own
 * selection scores are within 1e-5 of each other (at most 1% of the tokens), weights,
 * probabilities and the backward within 1e-5 of the largest value; rows with NaN or
 * infinite logits route exactly as on the CPU, every id in [0, E). */

/* Whether the ids a backend chose for one token (got) differ from the CPU's (want) only
 * among near-equal selection scores: the CPU's choice row (moe_math.h on the host: the
 * probabilities, the bias-corrected sigmoid or the logits, group-masked), at each k, within
 * 1e-5 of the row's best score. */
static bool selection_near_tie(const float *z, const struct router_params *rp, const int32_t *want,
                               const int32_t *got, int E, int K)
{
    float *c = xmalloc((size_t)E * sizeof(float)), *s = xmalloc((size_t)E * sizeof(float));
    float *group_score = xmalloc((size_t)E * sizeof(float));
    if (rp->kind == ROUTER_SIGMOID_BIAS) {
        router_sigmoid_row(s, c, z, rp->bias, E);
        router_mask_groups_row(c, group_score, E, rp->n_group, rp->topk_group, 1, -INFINITY);
    } else if (rp->kind == ROUTER_TOPK_SOFTMAX) {
        memcpy(c, z, (size_t)E * sizeof(float));
    } else {
        router_softmax_row(c, z, E);
        router_mask_groups_row(c, group_score, E, rp->n_group, rp->topk_group, 0, 0.0f);
    }
    bool tie = true;
    double best = fabs((double)c[want[0]]);
    for (int k = 0; k < K; k++)
        tie = tie && got[k] >= 0 && got[k] < E &&
              fabs((double)c[got[k]] - c[want[k]]) <= 1e-5 * best;
    free(c), free(s), free(group_score);
    return tie;
}

/* NaN where the two differ in NaN-ness is counted; both set to 0 there and where both
 * are NaN, so that check_worst_relative compares the finite values. */
static int nan_mismatches(float *got, float *want, size_t n)
{
    int differ = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isnan(got[i]) && !isnan(want[i])) continue;
        differ += !isnan(got[i]) != !isnan(want[i]);
        got[i] = want[i] = 0.0f;
    }
    return differ;
}

/* One router of the op table (rp's bias: a host array of E, or NULL) on N random tokens,
 * forward (with and without the probabilities kept), backward from the CPU's routing, and
 * four rows of NaN and infinite logits. */
static void check_router_variant(const char *what, int N, int E, int K, struct router_params rp)
{
    const struct backend *cpu = backend_cpu(), *cuda = backend_cuda();
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 31 + (uint64_t)E * 7 + (uint64_t)rp.kind);
    int M = N * K;
    size_t NE = (size_t)N * E;
    float *bias = rp.kind == ROUTER_SIGMOID_BIAS ? random_floats(&rng, (size_t)E, -0.1f, 0.1f) : NULL;
    struct router_params host_rp = rp, dev_rp = rp;
    host_rp.bias = bias;
    float *d_bias = bias ? to_device(bias, (size_t)E * sizeof(float)) : NULL;
    dev_rp.bias = d_bias;
    /* C2R: rp.collaborators are the host's lists; the device reads its copy */
    size_t list_bytes = (size_t)E * (size_t)rp.top_t * sizeof(int32_t);
    int32_t *d_collaborators =
        rp.collaborators ? (int32_t *)to_device(rp.collaborators, list_bytes) : NULL;
    dev_rp.collaborators = d_collaborators;
    float *logits = random_floats(&rng, NE, -4, 4), *d_logits = to_device(logits, NE * sizeof(float));
    int32_t *ids = xmalloc((size_t)M * sizeof(int32_t)), *d_ids = device_alloc((size_t)M * sizeof(int32_t));
    float *weights = xmalloc((size_t)M * sizeof(float)), *probs = xmalloc(NE * sizeof(float));
    float *d_weights = device_alloc((size_t)M * sizeof(float)), *d_probs = device_alloc(NE * sizeof(float));
    cpu->router_topk(ids, weights, probs, logits, N, E, K, &host_rp);
    cuda->router_topk(d_ids, d_weights, d_probs, d_logits, N, E, K, &dev_rp);
    int32_t *g_ids = from_device(d_ids, (size_t)M * sizeof(int32_t));
    float *g_weights = from_device(d_weights, (size_t)M * sizeof(float));
    int out_of_range = 0, differ = 0, tied = 0;
    for (int s = 0; s < M; s++) out_of_range += g_ids[s] < 0 || g_ids[s] >= E;
    for (int n = 0; n < N; n++) {
        if (memcmp(g_ids + n * K, ids + n * K, (size_t)K * sizeof(int32_t)) == 0) continue;
        if (selection_near_tie(logits + (size_t)n * E, &host_rp, ids + n * K, g_ids + n * K, E, K))
            tied++;
        else
            differ++;
        memcpy(g_weights + n * K, weights + n * K, (size_t)K * sizeof(float)); /* not compared */
    }
    CHECK(out_of_range == 0, "%s: %d ids out of [0, %d)", what, out_of_range, E);
    CHECK(differ == 0, "%s N %d E %d K %d: ids differ from the CPU's on %d tokens without a "
          "near-tie (%d near-ties)", what, N, E, K, differ, tied);
    CHECK(tied * 100 <= N, "%s: %d of %d tokens near-tied", what, tied, N);
    expect_floats(d_probs, probs, NE, 1e-5, what);
    CHECK(check_worst_relative(g_weights, weights, (size_t)M) <= 1e-5, "%s: weights", what);
    /* without the probabilities kept: the same ids and weights, bit for bit */
    int32_t *d_ids2 = device_alloc((size_t)M * sizeof(int32_t));
    float *d_weights2 = device_alloc((size_t)M * sizeof(float));
    cuda->router_topk(d_ids2, d_weights2, NULL, d_logits, N, E, K, &dev_rp);
    int32_t *g_ids2 = from_device(d_ids2, (size_t)M * sizeof(int32_t));
    float *g_weights2 = from_device(d_weights2, (size_t)M * sizeof(float));
    float *g_weights1 = from_device(d_weights, (size_t)M * sizeof(float));
    CHECK(memcmp(g_ids2, g_ids, (size_t)M * sizeof(int32_t)) == 0 &&
              memcmp(g_weights2, g_weights1, (size_t)M * sizeof(float)) == 0,
          "%s: without probs, the routing differs from the kernel's own", what);
    /* backward from the CPU's routing and probabilities */
    float *dweights = random_floats(&rng, (size_t)M, -1, 1), *dlogits = xmalloc(NE * sizeof(float));
    float *d_dweights = to_device(dweights, (size_t)M * sizeof(float));
    float *d_cpu_probs = to_device(probs, NE * sizeof(float)), *d_dlogits = device_alloc(NE * sizeof(float));
    int32_t *d_cpu_ids = (int32_t *)to_device(ids, (size_t)M * sizeof(int32_t));
    cpu->router_topk_backward(dlogits, dweights, probs, ids, N, E, K, &host_rp);
    cuda->router_topk_backward(d_dlogits, d_dweights, d_cpu_probs, d_cpu_ids, N, E, K, &dev_rp);
    expect_floats(d_dlogits, dlogits, NE, 1e-5, what);
    /* rows of NaN and infinite logits: token 1 one NaN, token 2 all NaN, token 3 one +inf */
    if (N >= 4) {
        logits[1 * E + E / 2] = NAN;
        for (int e = 0; e < E; e++) logits[2 * E + e] = NAN;
        logits[3 * E + E - 1] = INFINITY;
        CHECK(device_copy_to_device(d_logits, logits, NE * sizeof(float)) == 0, "upload");
        cpu->router_topk(ids, weights, probs, logits, N, E, K, &host_rp);
        cuda->router_topk(d_ids, d_weights, d_probs, d_logits, N, E, K, &dev_rp);
        free(g_ids), free(g_weights);
        g_ids = from_device(d_ids, (size_t)M * sizeof(int32_t));
        g_weights = from_device(d_weights, (size_t)M * sizeof(float));
        out_of_range = 0;
        for (int s = 0; s < M; s++) out_of_range += g_ids[s] < 0 || g_ids[s] >= E;
        CHECK(out_of_range == 0, "%s with NaN logits: %d ids out of [0, %d)", what, out_of_range, E);
        CHECK(memcmp(g_ids + K, ids + K, (size_t)3 * K * sizeof(int32_t)) == 0,
              "%s with NaN and infinite logits: ids differ from the CPU's", what);
        CHECK(nan_mismatches(g_weights + K, weights + K, (size_t)3 * K) == 0,
              "%s with NaN logits: weights NaN on one backend only", what);
    }
    printf("%s, N %d E %d K %d (groups %d, keep %d): op table compared with the CPU backend\n",
           what, N, E, K, rp.n_group, rp.topk_group);
    void *device_buffers[] = {d_logits, d_ids, d_weights, d_probs, d_ids2, d_weights2,
                              d_dweights, d_cpu_probs, d_dlogits, d_cpu_ids};
    FREE_ON_DEVICE(device_buffers);
    if (d_bias) device_free(d_bias);
    if (d_collaborators) device_free(d_collaborators);
    void *host_buffers[] = {bias, logits, ids, weights, probs, g_ids, g_weights, g_ids2,
                            g_weights2, g_weights1, dweights, dlogits};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
    backend_cuda_release();
}

/* RoPE of the op table with a head stride (MLA rotates the last dr dims of each head of
 * width dn + dr, and a key of one head of dr) in both pair layouts, forward and backward;
 * copy_columns (MLA's assembly of keys and values, and its gradient sum) bit for bit. */
static void check_heads(int N, int nH, int dn, int dr)
{
    const struct backend *cpu = backend_cpu(), *cuda = backend_cuda();
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 13 + (uint64_t)dr);
    int Dh = dn + dr;
    size_t NQ = (size_t)N * nH * Dh;
    int32_t *positions = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) positions[n] = (int32_t)rng_below(&rng, 8192);
    float *inv_freq = xmalloc((size_t)(dr / 2) * sizeof(float));
    for (int i = 0; i < dr / 2; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / dr);
    float *q = random_floats(&rng, NQ, -1, 1), *d_q = to_device(q, NQ * sizeof(float));
    int32_t *d_positions = (int32_t *)to_device(positions, (size_t)N * sizeof(int32_t));
    float *d_inv_freq = to_device(inv_freq, (size_t)(dr / 2) * sizeof(float));
    for (int pass = 0; pass < 4; pass++) {
        enum hf_rope_layout layout = pass / 2 ? ROPE_ROTATE_HALF : ROPE_INTERLEAVED;
        if (pass % 2) {
            cpu->rope_backward(q + dn, positions, inv_freq, 0.75f, N, nH, Dh, dr, layout);
            cuda->rope_backward(d_q + dn, d_positions, d_inv_freq, 0.75f, N, nH, Dh, dr, layout);
        } else {
            cpu->rope(q + dn, positions, inv_freq, 0.75f, N, nH, Dh, dr, layout);
            cuda->rope(d_q + dn, d_positions, d_inv_freq, 0.75f, N, nH, Dh, dr, layout);
        }
        char what[96];
        snprintf(what, sizeof what, "rope%s, %s pairs, the last %d of heads of %d",
                 pass % 2 ? " backward" : "", pass / 2 ? "rotate-half" : "interleaved", dr, Dh);
        expect_floats(d_q, q, NQ, 1e-5, what);
    }
    /* copy_columns: the rope part of the keys into [N, nH, Dh] rows, then added again;
     * from the same source on both sides (the ropes above agree to rounding, not bits) */
    device_free(d_q);
    d_q = to_device(q, NQ * sizeof(float));
    size_t NK = (size_t)N * nH * Dh;
    float *dst = random_floats(&rng, NK, -1, 1), *d_dst = to_device(dst, NK * sizeof(float));
    cpu->copy_columns(dst + dn, Dh, q + dn, Dh, N * nH, dr, false);
    cuda->copy_columns(d_dst + dn, Dh, d_q + dn, Dh, N * nH, dr, false);
    expect_floats(d_dst, dst, NK, 0, "copy_columns");
    cpu->copy_columns(dst, nH * Dh, q, nH * Dh, N, nH * Dh - 3, true);
    cuda->copy_columns(d_dst, nH * Dh, d_q, nH * Dh, N, nH * Dh - 3, true);
    expect_floats(d_dst, dst, NK, 0, "copy_columns, accumulated");
    printf("rope (interleaved and rotate-half, head stride %d) and copy_columns, N %d, %d heads: "
           "op table compared with the CPU backend\n", Dh, N, nH);
    void *device_buffers[] = {d_q, d_positions, d_inv_freq, d_dst};
    FREE_ON_DEVICE(device_buffers);
    free(positions), free(inv_freq), free(q), free(dst);
    backend_cuda_release();
}

/* Attention of the op table with a value width Dv (MLA), a sliding window and sinks
 * (gpt_oss), forward and backward, against the CPU backend: out and dv within 1e-5 of the
 * largest value, dq and dk 1e-4 (the bounds of the plain attention above), dsinks (added
 * to a random start) 1e-4. */
static void check_attention_mask(const int *lengths, int n_samples, int nH, int nKV, int Dh,
                                 int Dv, int window, bool sinks)
{
    const struct backend *cuda = backend_cuda();
    struct attention_case c;
    attention_case_new(&c, lengths, n_samples, nH, nKV, Dh, Dv, window, sinks,
                       (uint64_t)nH * 1013 + (uint64_t)Dv * 7 + (uint64_t)window);
    int N = c.N;
    size_t nq = c.nq, nk = c.nk, nv = c.nv, no = c.no;
    float scale = c.scale, *out = c.out, *dq = c.dq, *dk = c.dk, *dv = c.dv;
    float *d_q = c.d_q, *d_k = c.d_k, *d_v = c.d_v, *d_dout = c.d_dout, *d_out = c.d_out;
    float *d_dq = c.d_dq, *d_dk = c.d_dk, *d_dv = c.d_dv;
    struct attention_mask d_mask = c.d_mask;
    CHECK(device_fill_f32(d_out, no, NAN, (char[256]){0}, 256) == 0, "fill");
    cuda->attention(d_out, d_q, d_k, d_v, &d_mask, N, nH, nKV, Dh, Dv, scale);
    char what[160];
    snprintf(what, sizeof what, "attention, %d/%d heads of %d (values %d), window %d%s", nH, nKV, Dh,
             Dv, window, sinks ? ", sinks" : "");
    expect_floats(d_out, out, no, 1e-5, what);
    cuda->attention_backward(d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v, d_out, &d_mask, N, nH, nKV,
                             Dh, Dv, scale);
    expect_floats(d_dq, dq, nq, 1e-4, "attention backward dq");
    expect_floats(d_dk, dk, nk, 1e-4, "attention backward dk");
    expect_floats(d_dv, dv, nv, 1e-5, "attention backward dv");
    if (sinks) expect_floats(c.d_dsink, c.dsink, (size_t)nH, 1e-4, "attention backward dsinks");
    printf("%s, %d tokens in %d samples: op table compared with the CPU backend\n", what, N,
           n_samples);
    attention_case_free(&c);
    backend_cuda_release();
}

/* gpt_oss's experts: the clamped GLU and its backward (within 1e-6 of the largest value;
 * a gradient exactly 0 at and beyond a clamp's bound, as the CPU's), the per-expert bias
 * and its gradient (bit for bit: one add an element; the rows summed in the CPU's order),
 * with empty experts and a frozen one. */
static void check_gpt_oss_experts(size_t count, int O)
{
    const struct backend *cpu = backend_cpu(), *cuda = backend_cuda();
    struct rng rng;
    rng_seed(&rng, (uint64_t)count + (uint64_t)O);
    const float alpha = 1.702f, limit = 7.0f;
    float *gate = random_floats(&rng, count, -10, 10), *up = random_floats(&rng, count, -10, 10);
    gate[0] = limit, gate[1] = limit + 1, gate[2] = -limit;
    up[0] = limit, up[1] = -limit, up[2] = limit + 0.5f, up[3] = -limit - 0.5f;
    float *h = xmalloc(count * sizeof(float)), *dh = random_floats(&rng, count, -1, 1);
    float *dgate = xmalloc(count * sizeof(float)), *dup = xmalloc(count * sizeof(float));
    float *d_gate = to_device(gate, count * sizeof(float)), *d_up = to_device(up, count * sizeof(float));
    float *d_dh = to_device(dh, count * sizeof(float)), *d_h = device_alloc(count * sizeof(float));
    float *d_dgate = device_alloc(count * sizeof(float)), *d_dup = device_alloc(count * sizeof(float));
    cpu->glu_clamped(h, gate, up, count, alpha, limit);
    cuda->glu_clamped(d_h, d_gate, d_up, count, alpha, limit);
    expect_floats(d_h, h, count, 1e-6, "glu_clamped");
    cpu->glu_clamped_backward(dgate, dup, dh, gate, up, count, alpha, limit);
    cuda->glu_clamped_backward(d_dgate, d_dup, d_dh, d_gate, d_up, count, alpha, limit);
    expect_floats(d_dgate, dgate, count, 1e-6, "glu_clamped backward dgate");
    expect_floats(d_dup, dup, count, 1e-6, "glu_clamped backward dup");
    float *g_dgate = from_device(d_dgate, count * sizeof(float));
    float *g_dup = from_device(d_dup, count * sizeof(float));
    CHECK(g_dgate[0] == 0 && g_dgate[1] == 0 && g_dgate[2] != 0,
          "glu_clamped backward: dgate at the gate's bound %g, beyond %g, at -limit %g", g_dgate[0],
          g_dgate[1], g_dgate[2]);
    CHECK(g_dup[0] == 0 && g_dup[1] == 0 && g_dup[2] == 0 && g_dup[3] == 0,
          "glu_clamped backward: dup at and beyond the bounds %g %g %g %g", g_dup[0], g_dup[1],
          g_dup[2], g_dup[3]);
    /* grouped_bias: 8 experts, two of them empty, expert 3 frozen in the backward */
    enum { E = 8 };
    const int rows_of[E] = {5, 0, 17, 1, 0, 300, 2, 9};
    int32_t offsets[E + 1] = {0};
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + rows_of[e];
    int rows = offsets[E];
    float *y = random_floats(&rng, (size_t)rows * O, -1, 1);
    float *bias = random_floats(&rng, (size_t)E * O, -1, 1);
    float *d_y = to_device(y, (size_t)rows * O * sizeof(float));
    float *d_bias = to_device(bias, (size_t)E * O * sizeof(float));
    int32_t *d_offsets = (int32_t *)to_device(offsets, sizeof offsets);
    cpu->grouped_bias(y, bias, offsets, E, O);
    cuda->grouped_bias(d_y, d_bias, d_offsets, E, O);
    expect_floats(d_y, y, (size_t)rows * O, 0, "grouped_bias");
    float *dbias[E], *d_dbias[E];
    for (int e = 0; e < E; e++) {
        dbias[e] = e == 3 ? NULL : random_floats(&rng, (size_t)O, -1, 1);
        d_dbias[e] = dbias[e] ? to_device(dbias[e], (size_t)O * sizeof(float)) : NULL;
    }
    cpu->grouped_bias_backward(dbias, y, offsets, E, O);
    cuda->grouped_bias_backward(d_dbias, d_y, d_offsets, E, O);
    for (int e = 0; e < E; e++)
        if (dbias[e]) expect_floats(d_dbias[e], dbias[e], (size_t)O, 0, "grouped_bias backward");
    printf("glu_clamped (%zu elements) and grouped_bias (%d rows of %d): op table compared with the "
           "CPU backend\n", count, rows, O);
    void *device_buffers[] = {d_gate, d_up, d_dh, d_h, d_dgate, d_dup, d_y, d_bias, d_offsets};
    FREE_ON_DEVICE(device_buffers);
    for (int e = 0; e < E; e++)
        if (d_dbias[e]) device_free(d_dbias[e]), free(dbias[e]);
    void *host_buffers[] = {gate, up, h, dh, dgate, dup, g_dgate, g_dup, y, bias};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
    backend_cuda_release();
}
/* The vocabulary-chunked cross-entropy of the op table (ce_chunk_update, _finish,
 * _backward) against the CPU backend's, chunk by chunk over a vocabulary of V in chunks of
 * C (the last one shorter), some labels ignored: the state within 1e-6 of the largest
 * value (the running max exact, the sums' orders differ), the best ids and the counts
 * equal, the loss within cross_entropy_close's 2e-6 a row, each chunk's gradient 1e-5. */
static void check_ce_chunks(int N, int V, int C)
{
    const struct backend *cpu = backend_cpu(), *cuda = backend_cuda();
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 101 + (uint64_t)V);
    float *logits = random_floats(&rng, (size_t)N * V, -8, 8);
    int32_t *labels = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) labels[n] = n % 5 == 3 ? -100 : (int32_t)rng_below(&rng, (uint64_t)V);
    float *state = xmalloc((size_t)N * 4 * sizeof(float)), *chunk = xmalloc((size_t)N * C * sizeof(float));
    float *grad = xmalloc((size_t)N * C * sizeof(float));
    int32_t *best = xmalloc((size_t)N * sizeof(int32_t));
    float *d_state = device_alloc((size_t)N * 4 * sizeof(float)), *d_chunk = device_alloc((size_t)N * C * sizeof(float));
    int32_t *d_best = device_alloc((size_t)N * sizeof(int32_t));
    int32_t *d_labels = (int32_t *)to_device(labels, (size_t)N * sizeof(int32_t));
    for (int pass = 0; pass < 2; pass++) /* 0: the forward's update, 1: the backward */
        for (int v0 = 0; v0 < V; v0 += C) {
            int width = V - v0 < C ? V - v0 : C;
            for (int n = 0; n < N; n++)
                memcpy(chunk + (size_t)n * width, logits + (size_t)n * V + v0, (size_t)width * sizeof(float));
            CHECK(device_copy_to_device(d_chunk, chunk, (size_t)N * width * sizeof(float)) == 0, "upload");
            if (pass == 0) {
                cpu->ce_chunk_update(state, best, chunk, labels, N, width, v0);
                cuda->ce_chunk_update(d_state, d_best, d_chunk, d_labels, N, width, v0);
                expect_floats(d_state, state, (size_t)N * 4, 1e-6, "ce_chunk_update state");
                int32_t *g_best = from_device(d_best, (size_t)N * sizeof(int32_t));
                CHECK(memcmp(g_best, best, (size_t)N * sizeof(int32_t)) == 0,
                      "ce_chunk_update: best ids differ at chunk %d", v0);
                free(g_best);
                /* the next chunk folds into the same state on both */
                CHECK(device_copy_to_device(d_state, state, (size_t)N * 4 * sizeof(float)) == 0, "upload");
            } else {
                cpu->ce_chunk_backward(grad, chunk, state, labels, N, width, v0, 0.125f);
                cuda->ce_chunk_backward(d_chunk, d_chunk, d_state, d_labels, N, width, v0, 0.125f);
                expect_floats(d_chunk, grad, (size_t)N * width, 1e-5, "ce_chunk_backward");
            }
        }
    long long counted = 0, correct = 0, g_counted = -1, g_correct = -1;
    double total = cpu->ce_chunk_finish(state, best, labels, N, &counted, &correct);
    double g_total = cuda->ce_chunk_finish(d_state, d_best, d_labels, N, &g_counted, &g_correct);
    CHECK(g_counted == counted && g_correct == correct, "ce_chunk_finish: %lld counted, %lld right "
          "(CPU %lld, %lld)", g_counted, g_correct, counted, correct);
    CHECK(cross_entropy_close(g_total, total, counted), "ce_chunk_finish: loss %.9g, CPU %.9g",
          g_total, total);
    printf("chunked cross-entropy, N %d V %d in chunks of %d: op table compared with the CPU "
           "backend\n", N, V, C);
    void *device_buffers[] = {d_state, d_chunk, d_best, d_labels};
    FREE_ON_DEVICE(device_buffers);
    free(logits), free(labels), free(state), free(chunk), free(grad), free(best);
    backend_cuda_release();
}
/* ---- the CUDA op table (src/cuda_ops.c) on a whole MoE block --------------------------- */

/* The buffers of one MoE block, forward and backward: host memory for the CPU backend,
 * device memory for the CUDA one. The X-macro lists each with its element count. */
#define BLOCK_INPUTS(X)                                                                        \
    X(float, x, N * H) X(float, norm_w, H) X(float, router_w, E * H) X(float, w_gate, E * I * H) \
    X(float, w_up, E * I * H) X(float, w_down, E * H * I) X(float, dout, N * H)
#define BLOCK_OUTPUTS(X)                                                                       \
    X(float, hn, N * H) X(float, rstd, N) X(float, logits, N * E) X(int32_t, ids, M)            \
    X(float, weights, M) X(float, probs, N * E) X(float, counts, E) X(float, prob_sums, E)      \
    X(int32_t, offsets, E + 1) X(int32_t, sor, M) X(int32_t, ros, M) X(float, xs, M * H)         \
    X(float, gate, M * I) X(float, up, M * I) X(float, act, M * I) X(float, ys, M * H)          \
    X(float, ffn, N * H) X(float, out, N * H) X(float, dys, M * H) X(float, dweights, M)       \
    X(float, dact, M * I) X(float, dgate, M * I) X(float, dup, M * I) X(float, dxs, M * H)      \
    X(float, dxs_up, M * H) X(float, dhn, N * H) X(float, dlogits, N * E) X(float, dx, N * H)   \
    X(float, dw_down0, H * I) X(float, dw_norm, H)

struct block {
#define FIELD(type, name, count) type *name;
    BLOCK_INPUTS(FIELD) BLOCK_OUTPUTS(FIELD)
#undef FIELD
};

/* Forward and backward of a MoE block (pre-norm, softmax top-k router, SwiGLU experts,
 * residual), expert 0's down projection trainable, the rest frozen. */
static void run_block(const struct backend *ops, struct block *b, int N, int H, int E, int K, int I)
{
    int M = N * K;
    const float **w_gate = expert_array(b->w_gate, E, (size_t)I * H);
    const float **w_up = expert_array(b->w_up, E, (size_t)I * H);
    const float **w_down = expert_array(b->w_down, E, (size_t)H * I);
    ops->rmsnorm(b->hn, b->rstd, b->x, b->norm_w, N, H, 1e-6f);
    ops->linear(b->logits, b->hn, b->router_w, NULL, N, H, E, false);
    ops->router_topk(b->ids, b->weights, b->probs, b->logits, N, E, K, &SOFTMAX_RENORM);
    ops->router_balance_stats(b->counts, b->prob_sums, b->probs, b->ids, N, E, K);
    ops->permute_by_expert(b->offsets, b->sor, b->ros, b->ids, N, K, E);
    ops->gather_rows(b->xs, b->hn, b->sor, M, K, H);
    ops->grouped_linear(b->gate, b->xs, w_gate, b->offsets, E, H, I);
    ops->grouped_linear(b->up, b->xs, w_up, b->offsets, E, H, I);
    ops->glu(b->act, b->gate, b->up, (size_t)M * I, ACT_SILU);
    ops->grouped_linear(b->ys, b->act, w_down, b->offsets, E, I, H);
    ops->combine(b->ffn, b->ys, b->weights, b->ros, N, K, H, false);
    ops->add(b->out, b->x, b->ffn, (size_t)N * H);
    /* backward from dout, through the feed-forward branch */
    ops->combine_backward(b->dys, b->dweights, b->dout, b->ys, b->weights, b->ros, N, K, H);
    float **dw = xcalloc((size_t)E, sizeof *dw);
    dw[0] = b->dw_down0;
    ops->grouped_linear_backward(b->dact, dw, b->dys, b->act, w_down, b->offsets, E, I, H);
    ops->glu_backward(b->dgate, b->dup, b->dact, b->gate, b->up, (size_t)M * I, ACT_SILU);
    ops->grouped_linear_backward(b->dxs, NULL, b->dgate, b->xs, w_gate, b->offsets, E, H, I);
    ops->grouped_linear_backward(b->dxs_up, NULL, b->dup, b->xs, w_up, b->offsets, E, H, I);
    ops->add(b->dxs, b->dxs, b->dxs_up, (size_t)M * H);
    ops->gather_rows_backward(b->dhn, b->dxs, b->ros, N, K, H, false);
    ops->router_topk_backward(b->dlogits, b->dweights, b->probs, b->ids, N, E, K, &SOFTMAX_RENORM);
    ops->linear_backward(b->dhn, NULL, NULL, b->dlogits, b->hn, b->router_w, N, H, E, true);
    ops->rmsnorm_backward(b->dx, b->dw_norm, b->dhn, b->x, b->norm_w, b->rstd, N, H, false);
    free(dw);
    free((void *)w_gate), free((void *)w_up), free((void *)w_down);
}

static void check_cuda_ops(int N, int H, int E, int K, int I)
{
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 17 + (uint64_t)E);
    int M = N * K;
    struct block host, dev;
#define HOST_IN(type, name, count) host.name = (type *)random_floats(&rng, (size_t)(count), -1, 1);
#define HOST_OUT(type, name, count) host.name = xcalloc((size_t)(count), sizeof(type));
#define DEV_IN(type, name, count) dev.name = (type *)to_device(host.name, (size_t)(count) * sizeof(type));
#define DEV_OUT(type, name, count) dev.name = (type *)to_device(host.name, (size_t)(count) * sizeof(type));
    BLOCK_INPUTS(HOST_IN) BLOCK_OUTPUTS(HOST_OUT)
    BLOCK_INPUTS(DEV_IN) BLOCK_OUTPUTS(DEV_OUT) /* the outputs start as the host's zeros */
    run_block(backend_cpu(), &host, N, H, E, K, I);
    run_block(backend_cuda(), &dev, N, H, E, K, I);
    /* the routing must agree for the rest to be compared */
    int32_t *ids = from_device(dev.ids, (size_t)M * sizeof(int32_t));
    int differ = 0, tied = 0;
    for (int n = 0; n < N; n++)
        if (memcmp(ids + n * K, host.ids + n * K, (size_t)K * sizeof(int32_t)) != 0) {
            differ++;
            tied += near_tie(host.probs + (size_t)n * E, host.ids + n * K, E, K);
        }
    free(ids);
    CHECK(differ == tied, "cuda ops block N %d E %d: the routing differs from the CPU's on %d tokens "
          "without a near-tie", N, E, differ - tied);
    if (differ > 0 && differ == tied)
        printf("cuda ops block N %d E %d: %d near-tied tokens routed otherwise; the rest not "
               "compared (both routings are right)\n", N, E, tied);
    if (differ == 0) {
        expect_floats(dev.out, host.out, (size_t)N * H, 1e-5, "cuda ops: block output");
        expect_floats(dev.counts, host.counts, (size_t)E, 0, "cuda ops: balance counts");
        expect_floats(dev.dw_down0, host.dw_down0, (size_t)H * I, 1e-4, "cuda ops: expert 0 dw_down");
        expect_floats(dev.dx, host.dx, (size_t)N * H, 1e-4, "cuda ops: dx");
        expect_floats(dev.dw_norm, host.dw_norm, (size_t)H, 1e-4, "cuda ops: norm weight gradient");
    }
    printf("cuda op table, MoE block N %d H %d E %d K %d I %d: compared with the CPU backend\n", N, H,
           E, K, I);
#define RELEASE(type, name, count) free(host.name), device_free(dev.name);
    BLOCK_INPUTS(RELEASE) BLOCK_OUTPUTS(RELEASE)
#undef HOST_IN
#undef HOST_OUT
#undef DEV_IN
#undef DEV_OUT
#undef RELEASE
    backend_cuda_release();
}
/* ---- bf16 weights (model.frozen_weights: bf16) through the op table ------------------- */

/* ||got - want|| / ||want|| over n values, got on the device. */
static double relative_l2(const float *d_got, const float *want, size_t n)
{
    float *got = from_device(d_got, n * sizeof(float));
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        diff += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        norm += (double)want[i] * want[i];
    }
    free(got);
    return norm > 0 ? sqrt(diff / norm) : sqrt(diff);
}

/* The CUDA backend's GEMMs against weights held as bf16 (backend.h's weight_bf16: a bf16
 * weight operand, the activation rounded to bf16, fp32 sums) against the CPU backend's
 * (the weight widened to fp32, the activation exact): linear and its dx, a row block of a
 * bf16 weight (weight_offset, the chunked lm_head's), and the grouped GEMMs with bf16
 * experts beside fp32 ones whose dw trains. The CUDA side rounds the activation, so the
 * bound is bf16's: relative L2 1e-2 (measured on the CPU side of the rounding: ~3e-3). */
static void check_bf16_weights(int N, int I, int O, int E)
{
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 31 + (uint64_t)O);
    const struct backend *cpu = backend_cpu(), *cuda = backend_cuda();
    size_t wn = (size_t)E * O * I;
    float *x = random_floats(&rng, (size_t)N * I, -1, 1);
    float *dy = random_floats(&rng, (size_t)N * O, -1, 1);
    float *w32 = random_floats(&rng, wn, -0.3f, 0.3f);
    uint16_t *w16 = xmalloc(wn * sizeof(uint16_t));
    st_f32_to_bf16_array(w32, w16, wn);
    float *d_x = to_device(x, (size_t)N * I * sizeof(float));
    float *d_dy = to_device(dy, (size_t)N * O * sizeof(float));
    float *d_w32 = to_device(w32, wn * sizeof(float));
    uint16_t *d_w16 = (uint16_t *)to_device(w16, wn * sizeof(uint16_t));
    float *y = xcalloc((size_t)N * O, sizeof(float)), *dx = xcalloc((size_t)N * I, sizeof(float));
    float *d_y = to_device(y, (size_t)N * O * sizeof(float));
    float *d_dx = to_device(dx, (size_t)N * I * sizeof(float));
    const float *host_w = weight_bf16(w16), *dev_w = weight_bf16(d_w16);
    char what[160];

    cpu->linear(y, x, host_w, NULL, N, I, O, false);
    cuda->linear(d_y, d_x, dev_w, NULL, N, I, O, false);
    double e = relative_l2(d_y, y, (size_t)N * O);
    snprintf(what, sizeof what, "bf16 linear N %d I %d O %d", N, I, O);
    CHECK(e < 1e-2, "%s: relative L2 %.3g", what, e);
    cpu->linear_backward(dx, NULL, NULL, dy, x, host_w, N, I, O, false);
    cuda->linear_backward(d_dx, NULL, NULL, d_dy, d_x, dev_w, N, I, O, false);
    e = relative_l2(d_dx, dx, (size_t)N * I);
    CHECK(e < 1e-2, "%s: dx relative L2 %.3g", what, e);
    int half = O / 2; /* rows [half, O): a chunk of the weight as the chunked lm_head reads it */
    cpu->linear(y, x, weight_offset(host_w, (size_t)half * I), NULL, N, I, O - half, false);
    cuda->linear(d_y, d_x, weight_offset(dev_w, (size_t)half * I), NULL, N, I, O - half, false);
    e = relative_l2(d_y, y, (size_t)N * (O - half));
    CHECK(e < 1e-2, "%s: a row block of the weight: relative L2 %.3g", what, e);

    /* grouped: E experts over the N rows; even experts bf16 (frozen), odd fp32 (trained) */
    int32_t *offsets = xcalloc((size_t)E + 1, sizeof(int32_t));
    for (int k = 1; k <= E; k++) offsets[k] = (int)((long long)N * k / E);
    offsets[E / 2] = offsets[E / 2 - 1 > 0 ? E / 2 - 1 : 0]; /* one expert with no rows */
    int32_t *d_offsets = (int32_t *)to_device(offsets, ((size_t)E + 1) * sizeof(int32_t));
    const float **host_experts = xcalloc((size_t)E, sizeof *host_experts);
    const float **dev_experts = xcalloc((size_t)E, sizeof *dev_experts);
    float **dw = xcalloc((size_t)E, sizeof *dw), **d_dw = xcalloc((size_t)E, sizeof *d_dw);
    for (int k = 0; k < E; k++) {
        size_t at = (size_t)k * O * I;
        host_experts[k] = k % 2 ? w32 + at : weight_offset(host_w, at);
        dev_experts[k] = k % 2 ? d_w32 + at : weight_offset(dev_w, at);
        if (k % 2) {
            dw[k] = xcalloc((size_t)O * I, sizeof(float));
            d_dw[k] = to_device(dw[k], (size_t)O * I * sizeof(float));
        }
    }
    cpu->grouped_linear(y, x, host_experts, offsets, E, I, O);
    cuda->grouped_linear(d_y, d_x, dev_experts, d_offsets, E, I, O);
    int M = offsets[E];
    e = relative_l2(d_y, y, (size_t)M * O);
    snprintf(what, sizeof what, "bf16 grouped_linear M %d I %d O %d E %d", M, I, O, E);
    CHECK(e < 1e-2, "%s: relative L2 %.3g", what, e);
    cpu->grouped_linear_backward(dx, dw, dy, x, host_experts, offsets, E, I, O);
    cuda->grouped_linear_backward(d_dx, d_dw, d_dy, d_x, dev_experts, d_offsets, E, I, O);
    e = relative_l2(d_dx, dx, (size_t)M * I);
    CHECK(e < 1e-2, "%s: dx relative L2 %.3g", what, e);
    for (int k = 1; k < E; k += 2) /* the trained experts' dw: fp32 on both sides */
        if (offsets[k + 1] > offsets[k])
            expect_floats(d_dw[k], dw[k], (size_t)O * I, 1e-4, "bf16 grouped: fp32 expert's dw");
    printf("bf16 weights N %d I %d O %d E %d: cuda against the CPU backend\n", N, I, O, E);

    for (int k = 0; k < E; k++) free(dw[k]), device_free(d_dw[k]);
    free(dw), free(d_dw), free((void *)host_experts), free((void *)dev_experts), free(offsets);
    device_free(d_offsets), device_free(d_x), device_free(d_dy), device_free(d_w32);
    device_free(d_w16), device_free(d_y), device_free(d_dx);
    free(x), free(dy), free(w32), free(w16), free(y), free(dx);
    backend_cuda_release();
}

static void group_bf16_weights(void)
{
    check_bf16_weights(1, 16, 8, 2);
    check_bf16_weights(257, 96, 200, 8);
    check_bf16_weights(1024, 2048, 768, 8); /* Qwen3-30B-A3B's expert shape */
}

/* ---- LoRA: the adapter path (lora.h) through the CUDA op table -------------------------- */

/* lora_forward and lora_backward on x [N,I], A [r,I], B [O,r] from dy [N,O], on the CUDA
 * op table and the CPU's: y (added to a random base output), t, dx (added to a random
 * base input gradient), dA, dB (added to random earlier gradients). */
static void check_lora(int N, int I, int O, int r, float scale)
{
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 31 + (uint64_t)r);
    size_t nx = (size_t)N * I, ny = (size_t)N * O, nt = (size_t)N * r, na = (size_t)r * I,
           nb = (size_t)O * r;
    float *x = random_floats(&rng, nx, -1, 1), *a = random_floats(&rng, na, -0.5f, 0.5f);
    float *b = random_floats(&rng, nb, -0.5f, 0.5f), *dy = random_floats(&rng, ny, -1, 1);
    float *y = random_floats(&rng, ny, -1, 1), *dx = random_floats(&rng, nx, -1, 1);
    float *da = random_floats(&rng, na, -0.1f, 0.1f), *db = random_floats(&rng, nb, -0.1f, 0.1f);
    float *t = xcalloc(nt, sizeof(float)), *dt = xcalloc(nt, sizeof(float));
    float *d_x = to_device(x, nx * 4), *d_a = to_device(a, na * 4), *d_b = to_device(b, nb * 4);
    float *d_dy = to_device(dy, ny * 4), *d_y = to_device(y, ny * 4), *d_dx = to_device(dx, nx * 4);
    float *d_da = to_device(da, na * 4), *d_db = to_device(db, nb * 4), *d_t = to_device(t, nt * 4);
    float *d_dt = to_device(dt, nt * 4);
    lora_forward(backend_cpu(), y, t, x, a, b, N, I, O, r, scale);
    lora_backward(backend_cpu(), dx, da, db, dt, dy, x, t, a, b, N, I, O, r, scale);
    lora_forward(backend_cuda(), d_y, d_t, d_x, d_a, d_b, N, I, O, r, scale);
    lora_backward(backend_cuda(), d_dx, d_da, d_db, d_dt, d_dy, d_x, d_t, d_a, d_b, N, I, O, r,
                  scale);
    expect_floats(d_y, y, ny, 1e-5, "lora: y");
    expect_floats(d_t, t, nt, 1e-5, "lora: t");
    expect_floats(d_dx, dx, nx, 1e-4, "lora: dx");
    expect_floats(d_da, da, na, 1e-4, "lora: dA");
    expect_floats(d_db, db, nb, 1e-4, "lora: dB");
    printf("lora N %d I %d O %d r %d: compared with the CPU backend\n", N, I, O, r);
    void *device_buffers[] = {d_x, d_a, d_b, d_dy, d_y, d_dx, d_da, d_db, d_t, d_dt};
    FREE_ON_DEVICE(device_buffers);
    free(x), free(a), free(b), free(dy), free(y), free(dx), free(da), free(db), free(t), free(dt);
    backend_cuda_release();
}

/* ---- determinism: the same inputs twice, the same bits ---------------------------------- */

/* Device results downloaded one after another into one host buffer. */
struct results {
    unsigned char *bytes;
    size_t size;
};

static unsigned char *grow(struct results *r, size_t bytes)
{
    unsigned char *grown = realloc(r->bytes, r->size + bytes);
    if (!grown) fatal(EXIT_RUNTIME, "test_device: out of memory for %zu bytes", r->size + bytes);
    r->bytes = grown;
    r->size += bytes;
    return grown + r->size - bytes;
}

static void keep(struct results *r, const void *device, size_t bytes)
{
    CHECK(device_copy_to_host(grow(r, bytes), device, bytes) == 0, "download of %zu bytes", bytes);
}

/* A chain of the kernels whose results hang on an order of reduction (warp butterflies,
 * block sums, column sums over row chunks, cuBLAS, the sum of squares) on inputs drawn
 * from a fixed seed; returns every output. */
static struct results kernel_chain(void)
{
    enum { N = 512, E = 128, K = 8, H = 256, V = 32000, ROWS = 16, nH = 8, nKV = 2, Dh = 64 };
    char err[256];
    struct rng rng;
    rng_seed(&rng, 20261126);
    struct results r = {NULL, 0};
    /* router */
    float *logits = random_floats(&rng, (size_t)N * E, -4, 4),
          *d_logits = to_device(logits, (size_t)N * E * sizeof(float));
    int32_t *d_ids = device_alloc((size_t)N * K * sizeof(int32_t));
    float *d_weights = device_alloc((size_t)N * K * sizeof(float)),
          *d_probs = device_alloc((size_t)N * E * sizeof(float));
    CHECK(moe_router_topk(d_ids, d_weights, d_probs, d_logits, N, E, K, 1, 1.0f, err, sizeof err) ==
              0,
          "%s", err);
    keep(&r, d_ids, (size_t)N * K * sizeof(int32_t));
    keep(&r, d_weights, (size_t)N * K * sizeof(float));
    keep(&r, d_probs, (size_t)N * E * sizeof(float));
    /* RMSNorm forward and backward (dw: column sums) */
    float *x = random_floats(&rng, (size_t)N * H, -1, 1),
          *w = random_floats(&rng, (size_t)H, 0.5f, 1.5f);
    float *dy = random_floats(&rng, (size_t)N * H, -1, 1);
    float *d_x = to_device(x, (size_t)N * H * sizeof(float)),
          *d_w = to_device(w, (size_t)H * sizeof(float));
    float *d_dy = to_device(dy, (size_t)N * H * sizeof(float)),
          *d_y = device_alloc((size_t)N * H * sizeof(float));
    float *d_rstd = device_alloc((size_t)N * sizeof(float)),
          *d_dx = device_alloc((size_t)N * H * sizeof(float));
    float *d_dw = device_alloc((size_t)H * sizeof(float));
    void *norm_workspace = device_alloc(dense_rmsnorm_workspace(N, H));
    CHECK(device_copy_to_device(d_dw, w, (size_t)H * sizeof(float)) == 0, "upload");
    CHECK(dense_rmsnorm(d_y, d_rstd, d_x, d_w, N, H, 1e-6f, err, sizeof err) == 0, "%s", err);
    CHECK(dense_rmsnorm_backward(d_dx, d_dw, d_dy, d_x, d_w, d_rstd, N, H, 0, norm_workspace, err,
                                 sizeof err) == 0,
          "%s", err);
    keep(&r, d_y, (size_t)N * H * sizeof(float));
    keep(&r, d_rstd, (size_t)N * sizeof(float));
    keep(&r, d_dx, (size_t)N * H * sizeof(float));
    keep(&r, d_dw, (size_t)H * sizeof(float));
    /* cross-entropy */
    float *z = random_floats(&rng, (size_t)ROWS * V, -8, 8),
          *d_z = to_device(z, (size_t)ROWS * V * sizeof(float));
    int32_t labels[ROWS];
    for (int n = 0; n < ROWS; n++) labels[n] = (int32_t)rng_below(&rng, V);
    int32_t *d_labels = (int32_t *)to_device(labels, sizeof labels);
    double *d_row_loss = device_alloc(ROWS * sizeof(double));
    CHECK(dense_cross_entropy(d_row_loss, d_z, d_z, d_labels, ROWS, V, 0.25f, err, sizeof err) == 0,
          "%s", err);
    keep(&r, d_row_loss, ROWS * sizeof(double));
    keep(&r, d_z, (size_t)ROWS * V * sizeof(float));
    /* attention forward and backward over two packed samples (dk, dv: sums over queries) */
    int32_t start[N];
    for (int n = 0; n < N; n++) start[n] = n < 300 ? 0 : 300;
    size_t nq = (size_t)N * nH * Dh, nkv = (size_t)N * nKV * Dh;
    float *q = random_floats(&rng, nq, -2, 2), *k = random_floats(&rng, nkv, -2, 2),
          *v = random_floats(&rng, nkv, -1, 1);
    float *dout = random_floats(&rng, nq, -1, 1);
    float *d_q = to_device(q, nq * sizeof(float)), *d_k = to_device(k, nkv * sizeof(float));
    float *d_v = to_device(v, nkv * sizeof(float)), *d_dout = to_device(dout, nq * sizeof(float));
    int32_t *d_start = (int32_t *)to_device(start, sizeof start);
    float *d_out = device_alloc(nq * sizeof(float)), *d_dq = device_alloc(nq * sizeof(float));
    float *d_dk = device_alloc(nkv * sizeof(float)), *d_dv = device_alloc(nkv * sizeof(float));
    void *attention_workspace = device_alloc(attention_backward_workspace(N, nH));
    float scale = 1.0f / sqrtf((float)Dh);
    CHECK(attention_forward(d_out, d_q, d_k, d_v, d_start, N, nH, nKV, Dh, scale, err,
                            sizeof err) == 0,
          "%s", err);
    CHECK(attention_backward(d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v, d_out, d_start, N, nH, nKV,
                             Dh, scale, attention_workspace, err, sizeof err) == 0,
          "%s", err);
    keep(&r, d_out, nq * sizeof(float));
    keep(&r, d_dq, nq * sizeof(float));
    keep(&r, d_dk, nkv * sizeof(float));
    keep(&r, d_dv, nkv * sizeof(float));
    /* cuBLAS: a linear layer's backward, dw summed over the N rows */
    struct gemm_context *ctx = gemm_create(err, sizeof err);
    CHECK(ctx != NULL, "%s", err);
    if (ctx) {
        float *lw = random_floats(&rng, (size_t)H * H, -1, 1),
              *d_lw = to_device(lw, (size_t)H * H * sizeof(float));
        float *zeros = xcalloc((size_t)H * H, sizeof(float)),
              *d_ldw = to_device(zeros, (size_t)H * H * sizeof(float));
        CHECK(gemm_linear_backward(ctx, d_dx, d_ldw, NULL, d_dy, d_x, d_lw, N, H, H, 0, GEMM_F32,
                                   NULL, err, sizeof err) == 0,
              "%s", err);
        keep(&r, d_dx, (size_t)N * H * sizeof(float));
        keep(&r, d_ldw, (size_t)H * H * sizeof(float));
        void *gemm_buffers[] = {d_lw, d_ldw};
        FREE_ON_DEVICE(gemm_buffers);
        free(lw), free(zeros);
        gemm_destroy(ctx);
    }
    /* the squared sum of the gradient norm */
    double squares = 0;
    void *squares_workspace = device_alloc(optim_sum_squares_workspace((size_t)N * H));
    double *squares_host = xmalloc(optim_sum_squares_workspace((size_t)N * H));
    CHECK(optim_sum_squares(&squares, d_dy, (size_t)N * H, squares_workspace, squares_host, err,
                            sizeof err) == 0,
          "%s", err);
    free(squares_host);
    memcpy(grow(&r, sizeof squares), &squares, sizeof squares);
    void *device_buffers[] = {d_logits,
                              d_ids,
                              d_weights,
                              d_probs,
                              d_x,
                              d_w,
                              d_dy,
                              d_y,
                              d_rstd,
                              d_dx,
                              d_dw,
                              norm_workspace,
                              d_z,
                              d_labels,
                              d_row_loss,
                              d_q,
                              d_k,
                              d_v,
                              d_dout,
                              d_start,
                              d_out,
                              d_dq,
                              d_dk,
                              d_dv,
                              attention_workspace,
                              squares_workspace};
    FREE_ON_DEVICE(device_buffers);
    void *host_buffers[] = {logits, x, w, dy, z, q, k, v, dout};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
    return r;
}

static void check_determinism(void)
{
    struct results first = kernel_chain(), second = kernel_chain();
    size_t differ = 0;
    for (size_t i = 0; i < first.size && i < second.size; i++)
        differ += first.bytes[i] != second.bytes[i];
    CHECK(first.size == second.size && differ == 0,
          "the same kernels on the same inputs twice: %zu of %zu bytes differ", differ, first.size);
    printf("determinism: router, rmsnorm, cross-entropy, attention, cuBLAS and squared-sum results "
           "(%zu bytes) bit for bit the same twice\n",
           first.size);
    free(first.bytes), free(second.bytes);
}

/* ---- groups ----------------------------------------------------------------------------- */

static void group_fill(void)
{
    char err[256];
    const size_t n = 1000003; /* odd: not a multiple of the block size */
    float *x = device_alloc(n * sizeof(float));
    CHECK(x != NULL, "cudaMalloc of %zu floats", n);
    if (!x) return;
    CHECK(device_fill_f32(x, n, 3.25f, err, sizeof err) == 0, "%s", err);
    float *host = xmalloc(n * sizeof(float));
    CHECK(device_copy_to_host(host, x, n * sizeof(float)) == 0, "copy back");
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += host[i] != 3.25f;
    CHECK(wrong == 0, "%zu of %zu elements not filled", wrong, n);
    free(host);
    void *device_buffers[] = {x};
    FREE_ON_DEVICE(device_buffers);
}

static void group_moe(void)
{
    check_moe(1, 8, 2, 16, 8);
    check_moe(1000, 128, 8, 64, 32); /* Qwen3-30B-A3B's routing shape */
    check_moe(333, 60, 4, 48, 24);   /* experts not a multiple of the warp */
    check_moe(4097, 1024, 6, 8, 8);  /* the router's largest expert count */
    check_router_nan(60, 4);
    check_router_nan(1024, 8);
}

static void group_dense(void)
{
    check_dense(1, 64, 11, 1, 16, 16);
    check_dense(300, 2048, 1000, 4, 128, 128); /* Qwen3-30B-A3B's hidden and head widths */
    check_dense(77, 200, 151936, 3, 64, 32);   /* a real vocabulary, a partial rotary */
}

static void group_optimizer(void)
{
    check_optim(1);
    check_optim(3 * NORM_CHUNK + 17);
    check_optim(5000000);
}

static void group_moe_backward(void)
{
    check_moe_backward(1, 8, 2, 16, 8);
    check_moe_backward(1000, 128, 8, 64, 32);
    check_moe_backward(333, 60, 4, 48, 24);
}

static void group_attention(void)
{
    check_attention((const int[]){1}, 1, 1, 1, 8);
    check_attention((const int[]){5, 1, 130, 64}, 4, 4, 2, 64); /* GQA, samples packed */
    check_attention((const int[]){1000, 24}, 2, 32, 4, 128);    /* Qwen3-30B-A3B's heads */
    check_attention((const int[]){40}, 1, 2, 2, 200);           /* head_dim not a multiple of 32 */
    check_attention((const int[]){2100, 7}, 2, 4, 2, 64); /* more rows than one cuBLAS block */
}

static void group_attention_flash(void)
{
    /* a one-token sample, packed: alone, its dq and dk are exactly 0 on the CPU and of
     * rounding size here (dp in bf16 against delta in fp32), which no relative bound fits */
    check_flash((const int[]){1, 40}, 2, 1, 1, 64);
    check_flash((const int[]){5, 1, 130, 64, 77}, 5, 4, 2, 64); /* GQA, tiles across samples */
    check_flash((const int[]){64, 64, 65}, 3, 2, 1, 64);        /* samples on tile edges */
    check_flash((const int[]){300, 1, 211}, 3, 8, 2, 128);
    check_flash((const int[]){520, 24}, 2, 32, 4, 128); /* Qwen3-30B-A3B's heads */
}

static void group_attention_flash_ops(void)
{
    check_flash_dispatch();
}

static void group_gemm(void)
{
    check_gemm(1, 1, 1, 2, GEMM_F32);
    check_gemm(257, 96, 200, 8, GEMM_F32);
    check_gemm(257, 96, 200, 8, GEMM_BF16);
    check_gemm(4096, 2048, 768, 16, GEMM_BF16); /* Qwen3-30B-A3B's expert shape */
}

static void group_lora(void)
{
    check_lora(1, 16, 24, 1, 2.0f);
    check_lora(300, 2048, 512, 16, 0.5f); /* Qwen3-30B-A3B's hidden to its k/v width */
    check_lora(77, 96, 200, 8, 4.0f);
}

/* DenseMixer's ops through the CUDA op table against the CPU's: row_dots into one column
 * of a wider matrix (the other columns untouched; 1e-5: a block reduction against the
 * CPU's running sum), and router_dense_backward from the CPU's routing, renormalised
 * (qwen3_moe's partscale) and not (olmoe), with a scaling (1e-5: the same row function,
 * another compiler's float order). */
static void check_densemixer(int N, int E, int K, int H)
{
    const struct backend *cpu = backend_cpu(), *cuda = backend_cuda();
    struct rng rng;
    rng_seed(&rng, (uint64_t)N * 13 + (uint64_t)E);
    size_t NH = (size_t)N * H, NE = (size_t)N * E, M = (size_t)N * K;
    float *x = random_floats(&rng, NH, -1, 1), *y = random_floats(&rng, NH, -1, 1);
    float *dots = random_floats(&rng, NE, -1, 1), *logits = random_floats(&rng, NE, -3, 3);
    float *d_x = to_device(x, NH * 4), *d_y = to_device(y, NH * 4), *d_dots = to_device(dots, NE * 4);
    cpu->row_dots(dots + E / 2, E, x, y, N, H);
    cuda->row_dots(d_dots + E / 2, E, d_x, d_y, N, H);
    expect_floats(d_dots, dots, NE, 1e-5, "densemixer: row_dots");
    float *probs = xmalloc(NE * 4), *weights = xmalloc(M * 4), *dlogits = xmalloc(NE * 4);
    int32_t *ids = xmalloc(M * sizeof(int32_t));
    float *d_probs = device_alloc(NE * 4), *d_dlogits = device_alloc(NE * 4);
    int32_t *d_ids = device_alloc(M * sizeof(int32_t));
    CHECK(device_copy_to_device(d_dots, dots, NE * 4) == 0, "densemixer: upload"); /* the CPU's */
    for (int renormalise = 0; renormalise < 2; renormalise++) {
        struct router_params rp = {ROUTER_SOFTMAX_TOPK, renormalise, 1.5f, 1, 1, NULL, NULL, 0};
        cpu->router_topk(ids, weights, probs, logits, N, E, K, &rp);
        CHECK(device_copy_to_device(d_probs, probs, NE * 4) == 0 &&
                  device_copy_to_device(d_ids, ids, M * sizeof(int32_t)) == 0,
              "densemixer: upload");
        cpu->router_dense_backward(dlogits, dots, probs, ids, N, E, K, &rp);
        cuda->router_dense_backward(d_dlogits, d_dots, d_probs, d_ids, N, E, K, &rp);
        expect_floats(d_dlogits, dlogits, NE, 1e-5,
                      renormalise ? "densemixer: router_dense_backward, renormalised"
                                  : "densemixer: router_dense_backward");
    }
    void *buffers[] = {d_x, d_y, d_dots, d_probs, d_dlogits, d_ids};
    FREE_ON_DEVICE(buffers);
    free(x), free(y), free(dots), free(logits), free(probs), free(weights), free(dlogits), free(ids);
}

/* qwen3_moe's shape (128 experts, top-8, hidden 2048), olmoe's (64, top-8), a small odd one */
static void group_densemixer(void)
{
    check_densemixer(300, 128, 8, 2048);
    check_densemixer(77, 64, 8, 1000);
    check_densemixer(5, 7, 2, 36);
}

/* deepseek_v2's group-limited greedy (160 experts in 8 groups, keep 3: DeepSeek-V2's;
 * scaling 16 as its routed_scaling_factor) and plain greedy; deepseek_v3's sigmoid router
 * (256 in 8 groups, keep 4, 2.5), glm4_moe's (128, one group), one not renormalised;
 * gpt_oss's top-k then softmax (32 experts, top-4; 60: not a multiple of the warp). */
static void group_routers(void)
{
    check_router_variant("group-limited greedy", 1000, 160, 6,
                         (struct router_params){ROUTER_GROUPED_GREEDY, false, 16.0f, 8, 3, NULL, NULL, 0});
    check_router_variant("group-limited greedy, renormalised", 333, 64, 6,
                         (struct router_params){ROUTER_GROUPED_GREEDY, true, 1.0f, 8, 3, NULL, NULL, 0});
    check_router_variant("greedy", 200, 64, 6,
                         (struct router_params){ROUTER_GROUPED_GREEDY, false, 1.0f, 1, 1, NULL, NULL, 0});
    check_router_variant("sigmoid with bias, grouped", 1000, 256, 8,
                         (struct router_params){ROUTER_SIGMOID_BIAS, true, 2.5f, 8, 4, NULL, NULL, 0});
    check_router_variant("sigmoid with bias", 500, 128, 8,
                         (struct router_params){ROUTER_SIGMOID_BIAS, true, 1.0f, 1, 1, NULL, NULL, 0});
    check_router_variant("sigmoid with bias, not renormalised", 300, 64, 6,
                         (struct router_params){ROUTER_SIGMOID_BIAS, false, 2.5f, 4, 2, NULL, NULL, 0});
    check_router_variant("top-k then softmax", 1000, 32, 4,
                         (struct router_params){ROUTER_TOPK_SOFTMAX, false, 1.0f, 1, 1, NULL, NULL, 0});
    check_router_variant("top-k then softmax", 77, 60, 4,
                         (struct router_params){ROUTER_TOPK_SOFTMAX, false, 1.0f, 1, 1, NULL, NULL, 0});
    check_router_variant("sigmoid with bias, one token", 1, 16, 2,
                         (struct router_params){ROUTER_SIGMOID_BIAS, true, 1.0f, 4, 2, NULL, NULL, 0});
}

/* C2R (src/c2r.h) on every router kind: collaborative lists of T random other experts per
 * expert, the kernel's choice and weights against the CPU backend's, forward and
 * backward (check_router_variant). */
static void check_c2r_variant(const char *what, int N, int E, int K, int T, struct router_params rp)
{
    struct rng rng;
    rng_seed(&rng, (uint64_t)E * 131 + (uint64_t)T);
    int32_t *lists = xmalloc((size_t)E * T * sizeof(int32_t)), *others = xmalloc((size_t)E * sizeof(int32_t));
    for (int e = 0; e < E; e++) {
        int n = 0;
        for (int j = 0; j < E; j++)
            if (j != e) others[n++] = j;
        for (int t = 0; t < T; t++) { /* a partial Fisher-Yates draw of T of the others */
            int pick = t + (int)rng_below(&rng, (uint64_t)(n - t));
            int32_t swap = others[t];
            others[t] = others[pick];
            others[pick] = swap;
            lists[(size_t)e * T + t] = others[t];
        }
    }
    rp.collaborators = lists;
    rp.top_t = T;
    check_router_variant(what, N, E, K, rp);
    free(lists);
    free(others);
}

static void group_c2r(void)
{
    check_c2r_variant("c2r softmax top-k", 1000, 64, 6, 8,
                      (struct router_params){ROUTER_SOFTMAX_TOPK, true, 1.0f, 1, 1, NULL, NULL, 0});
    check_c2r_variant("c2r softmax top-k, plain", 300, 60, 8, 7,
                      (struct router_params){ROUTER_SOFTMAX_TOPK, false, 1.0f, 1, 1, NULL, NULL, 0});
    check_c2r_variant("c2r group-limited greedy", 500, 160, 6, 10,
                      (struct router_params){ROUTER_GROUPED_GREEDY, false, 16.0f, 8, 3, NULL, NULL, 0});
    check_c2r_variant("c2r sigmoid with bias, grouped", 500, 256, 8, 16,
                      (struct router_params){ROUTER_SIGMOID_BIAS, true, 2.5f, 8, 4, NULL, NULL, 0});
    check_c2r_variant("c2r top-k then softmax", 300, 32, 4, 5,
                      (struct router_params){ROUTER_TOPK_SOFTMAX, false, 1.0f, 1, 1, NULL, NULL, 0});
}

/* MLA's head layout (DeepSeek-V2's 128 + 64 and a small one) and a partial rotary. */
static void group_heads(void)
{
    check_heads(1, 1, 0, 8);
    check_heads(300, 16, 128, 64);
    check_heads(77, 3, 16, 8);
}

/* MLA's value width (DeepSeek-V2's 192 / 128, a small one), windows (one crossing the
 * cuBLAS path's blocks of rows), sinks, and gpt_oss's combination of both. */
static void group_attention_mask(void)
{
    check_attention_mask((const int[]){5, 70, 1}, 3, 4, 4, 24, 16, 0, false);
    check_attention_mask((const int[]){300}, 1, 16, 16, 192, 128, 0, false);
    check_attention_mask((const int[]){200, 37, 1}, 3, 4, 2, 64, 64, 16, false);
    check_attention_mask((const int[]){100, 3}, 2, 4, 1, 64, 64, 0, true);
    check_attention_mask((const int[]){300, 50}, 2, 8, 2, 64, 64, 128, true);
    check_attention_mask((const int[]){2100, 9}, 2, 2, 1, 64, 64, 128, true);
}

static void group_gpt_oss_experts(void)
{
    check_gpt_oss_experts(7, 1);
    check_gpt_oss_experts(1000003, 96);
}

/* A small vocabulary and a real one (151936 = Qwen's) in chunks with a short last one. */
static void group_ce_chunks(void)
{
    check_ce_chunks(1, 10, 4);
    check_ce_chunks(37, 1000, 256);
    check_ce_chunks(64, 151936, 32768);
}

/* Last: the op table reports its errors through fatal(), which ends the process. */
static void group_ops(void)
{
    check_cuda_ops(64, 32, 8, 2, 48);
    check_cuda_ops(512, 256, 64, 8, 96);
}

static const struct group {
    const char *name;
    void (*run)(void);
} groups[] = {
    {"fill", group_fill},
    {"moe", group_moe},
    {"dense", group_dense},
    {"optimizer", group_optimizer},
    {"moe-backward", group_moe_backward},
    {"attention", group_attention},
    {"attention-flash", group_attention_flash},
    {"gemm", group_gemm},
    {"determinism", check_determinism},
    {"bf16-weights", group_bf16_weights},
    {"lora", group_lora},
    {"densemixer", group_densemixer},
    {"routers", group_routers},
    {"c2r", group_c2r},
    {"heads", group_heads},
    {"attention-mask", group_attention_mask},
    {"gpt-oss-experts", group_gpt_oss_experts},
    {"ce-chunks", group_ce_chunks},
    {"attention-flash-ops", group_attention_flash_ops},
    {"ops", group_ops},
};
enum { N_GROUPS = sizeof groups / sizeof groups[0] };

static double seconds_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The group running in this process, for its summary line; printed at exit, so that a
 * group that the op table's fatal() ends still reports what it checked. */
static const struct group *current_group;
static double current_start;
static bool current_finished;

static void print_summary(void)
{
    if (!current_group) return;
    printf("group %-12s %5d checks, %3d failed, %6.2f s%s\n", current_group->name, check_count_,
           check_failed_, seconds_now() - current_start,
           current_finished ? "" : ", ended early by the error above");
    fflush(stdout);
}

/* One group in this process, with its summary line; returns the exit status. */
static int run_group(const struct group *g)
{
    char err[256];
    current_group = g;
    current_start = seconds_now();
    atexit(print_summary);
    CHECK(device_select(0, err, sizeof err) >= 0, "%s", err);
    if (check_failed_ == 0) g->run();
    current_finished = true;
    return check_failed_ ? 1 : 0;
}

/* Several groups: each in a child process of its own (this program with the group's name),
 * so that a crash, a fatal() or a sticky CUDA error in one cannot hide the others. */
static int run_groups(const char *self, const bool *selected)
{
    int failed = 0, ran = 0;
    char failed_names[512] = "";
    double start = seconds_now();
    for (int i = 0; i < N_GROUPS; i++) {
        if (!selected[i]) continue;
        ran++;
        fflush(stdout);
        fflush(stderr);
        pid_t child = fork();
        if (child == 0) {
            execl("/proc/self/exe", self, groups[i].name, (char *)NULL);
            execl(self, self, groups[i].name, (char *)NULL);
            fprintf(stderr, "test_device: cannot run %s: %s\n", self, strerror(errno));
            _exit(127);
        }
        int status = 0;
        bool ok = child > 0 && waitpid(child, &status, 0) == child;
        if (ok && WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
        failed++;
        size_t used = strlen(failed_names);
        snprintf(failed_names + used, sizeof failed_names - used, " %s", groups[i].name);
        if (!ok)
            printf("group %-12s could not be run: %s\n", groups[i].name, strerror(errno));
        else if (WIFSIGNALED(status))
            printf("group %-12s ended by signal %d (%s)\n", groups[i].name, WTERMSIG(status),
                   strsignal(WTERMSIG(status)));
        else if (WEXITSTATUS(status) != 1) /* else the group printed its own summary */
            printf("group %-12s ended with exit status %d\n", groups[i].name, WEXITSTATUS(status));
    }
    printf("test_device: %d groups, %d failed%s%s, %.2f s\n", ran, failed, failed ? ":" : "",
           failed_names, seconds_now() - start);
    return failed ? 1 : 0;
}
#endif

/* tests/test_device [--list] [GROUP...]: the named groups (default: all), always in the
 * order of the list, the op table last. */
int main(int argc, char **argv)
{
#ifndef HAVE_CUDA
    (void)argc, (void)argv;
    printf("test_device: skipped: this is the CPU-only build\n");
    return 77;
#else
    bool selected[N_GROUPS] = {false};
    int n_selected = 0;
    for (int a = 1; a < argc; a++) {
        if (strcmp(argv[a], "--list") == 0) {
            for (int i = 0; i < N_GROUPS; i++) printf("%s\n", groups[i].name);
            return 0;
        }
        int found = -1;
        for (int i = 0; i < N_GROUPS; i++)
            if (strcmp(argv[a], groups[i].name) == 0) found = i;
        if (found < 0) {
            fprintf(stderr, "test_device: no group '%s' (--list shows them)\n", argv[a]);
            return 1;
        }
        n_selected += !selected[found];
        selected[found] = true;
    }
    if (n_selected == 0)
        for (int i = 0; i < N_GROUPS; i++) selected[i] = true, n_selected++;
    int devices = device_count();
    if (devices == 0) {
        printf("test_device: skipped: no CUDA device visible\n");
        return 77;
    }
    if (devices < 0) { /* an old driver, say: a failure, never a skip */
        device_print_info(stderr);
        fprintf(stderr, "test_device: CUDA cannot count the devices (see above)\n");
        return 1;
    }
    if (n_selected > 1) return run_groups(argv[0], selected);
    for (int i = 0; i < N_GROUPS; i++)
        if (selected[i]) return run_group(&groups[i]);
    return 1;
#endif
}
