/* test_device: the CUDA build's GPU tests. Fills a device buffer with the fill kernel and
 * reads it back, which proves the kernels were compiled for this GPU; then each MoE
 * kernel (kernels/moe.h) against the CPU backend on random inputs: the permutation bit
 * for bit, the router's ids equal and weights within 1e-6 relative, gather / combine /
 * SwiGLU within 1e-6. Skipped (exit 77) in the CPU-only build and where no GPU is
 * visible. NEVER RUN YET: no GPU has been lent to this project's sessions. */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "config.h"
#ifdef HAVE_CUDA
#include <math.h>
#include <string.h>

#include "backend.h"
#include "device.h"
#include "log.h"
#include "moe.h"
#include "rng.h"

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

static double worst_relative(const float *a, const float *b, size_t n)
{
    double diff = 0, scale = 1e-30;
    for (size_t i = 0; i < n; i++) {
        diff = fmax(diff, fabs((double)a[i] - b[i]));
        scale = fmax(scale, fabs((double)b[i]));
    }
    return diff / scale;
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
    cpu->router_topk(ids, weights, probs, logits, N, E, K, ROUTER_SOFTMAX_TOPK, true, 1.0f);
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
        const float *p = probs + (size_t)n * E;
        double next = 0; /* the best probability outside the top-k */
        for (int e = 0; e < E; e++) {
            bool in = false;
            for (int k = 0; k < K; k++) in |= ids[n * K + k] == e;
            if (!in) next = fmax(next, p[e]);
        }
        double gap = p[ids[n * K + K - 1]] - next;
        for (int k = 0; k + 1 < K; k++) gap = fmin(gap, p[ids[n * K + k]] - p[ids[n * K + k + 1]]);
        if (gap < 1e-5 * p[ids[n * K]]) {
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
    CHECK(worst_relative(g_weights, weights, (size_t)M) < 1e-6, "router weights");
    CHECK(worst_relative(g_probs, probs, (size_t)N * E) < 1e-6, "router probabilities");
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
    CHECK(moe_swiglu(d_h, d_gate, d_up, (size_t)M * I, err, sizeof err) == 0, "%s", err);
    CHECK(moe_combine(d_out, d_ys, d_w, d_ros, N, K, H, 0, err, sizeof err) == 0, "%s", err);
    float *g_xs = from_device(d_xs, (size_t)M * H * sizeof(float)), *g_h = from_device(d_h, (size_t)M * I * sizeof(float));
    float *g_out = from_device(d_out, (size_t)N * H * sizeof(float));
    CHECK(memcmp(g_xs, xs, (size_t)M * H * sizeof(float)) == 0, "gather_rows");
    CHECK(worst_relative(g_h, h, (size_t)M * I) < 1e-6, "SwiGLU");
    CHECK(worst_relative(g_out, out, (size_t)N * H) < 1e-6, "combine");
    printf("moe kernels, N %d E %d K %d H %d I %d: compared with the CPU backend\n", N, E, K, H, I);
    void *device_buffers[] = {d_logits, d_ids, d_weights, d_probs, d_offsets, d_sor, d_ros, d_cpu_ids,
                              workspace, d_x, d_xs, d_gate, d_up, d_h, d_ys, d_out, d_w};
    for (size_t i = 0; i < sizeof device_buffers / sizeof device_buffers[0]; i++) device_free(device_buffers[i]);
    void *host_buffers[] = {logits, ids, weights, probs, g_ids, g_weights, g_probs, offsets, sor, ros,
                            g_offsets, g_sor, g_ros, x, gate, up, ys, xs, h, out, g_xs, g_h, g_out};
    for (size_t i = 0; i < sizeof host_buffers / sizeof host_buffers[0]; i++) free(host_buffers[i]);
}
#endif

int main(void)
{
#ifndef HAVE_CUDA
    printf("test_device: skipped: this is the CPU-only build\n");
    return 77;
#else
    if (device_count() == 0) {
        printf("test_device: skipped: no CUDA device visible\n");
        return 77;
    }
    char err[256];
    CHECK(device_select(0, err, sizeof err) == 0, "%s", err);
    const size_t n = 1000003; /* odd: not a multiple of the block size */
    float *x = device_alloc(n * sizeof(float));
    CHECK(x != NULL, "cudaMalloc of %zu floats", n);
    if (!x) return check_done("test_device");
    CHECK(device_fill_f32(x, n, 3.25f, err, sizeof err) == 0, "%s", err);
    float *host = malloc(n * sizeof(float));
    CHECK(device_copy_to_host(host, x, n * sizeof(float)) == 0, "copy back");
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += host[i] != 3.25f;
    CHECK(wrong == 0, "%zu of %zu elements not filled", wrong, n);
    free(host);
    device_free(x);
    check_moe(1, 8, 2, 16, 8);
    check_moe(1000, 128, 8, 64, 32);   /* Qwen3-30B-A3B's routing shape */
    check_moe(333, 60, 4, 48, 24);     /* experts not a multiple of the warp */
    check_moe(4097, 1024, 6, 8, 8);    /* the router's largest expert count */
    return check_done("test_device");
#endif
}
