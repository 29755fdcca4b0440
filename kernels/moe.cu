/* moe: the routing and data-movement kernels of a MoE layer (see moe.h). */
#include "moe.h"
#include "moe_math.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include "block_reduce.cuh"

static int report(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

/* ---- router: one warp per token ------------------------------------------------------ */

enum { ROUTER_THREADS = 256, MAX_PER_LANE = ROUTER_MAX_EXPERTS / WARP };

__global__ void router_topk_kernel(int32_t *ids, float *weights, float *probs,
                                   const float *logits, int N, int E, int K, int renormalise,
                                   float scaling)
{
    int lane = threadIdx.x % WARP;
    int n = blockIdx.x * warp_rows_per_block(blockDim.x) + threadIdx.x / WARP;
    if (n >= N) return; /* a whole warp leaves together: n is the same for its lanes */
    const float *z = logits + (size_t)n * E;
    int per_lane = router_per_lane(E);
    float p[MAX_PER_LANE];
    float max = -INFINITY;
    for (int j = 0; j < per_lane; j++) {
        int e = lane + j * WARP;
        p[j] = e < E ? z[e] : -INFINITY;
        max = fmaxf(max, p[j]);
    }
    for (int step = WARP / 2; step > 0; step /= 2) max = fmaxf(max, __shfl_xor_sync(0xffffffffu, max, step));
    float sum = 0.0f;
    for (int j = 0; j < per_lane; j++) {
        int e = lane + j * WARP;
        p[j] = e < E ? expf(p[j] - max) : 0.0f;
        sum += p[j];
    }
    for (int step = WARP / 2; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
    for (int j = 0; j < per_lane; j++) {
        int e = lane + j * WARP;
        p[j] /= sum;
        if (probs && e < E) probs[(size_t)n * E + e] = p[j];
    }
    /* k rounds of warp argmax over the untaken experts; ties to the lower id. A NaN logit
     * makes the row's sum and so every probability NaN: NaN ranks as -inf here, so such a
     * row takes the lowest untaken ids (0, 1, ...) with NaN weights, as the CPU backend
     * does, and an id is never E (the permutation would write out of bounds). */
    unsigned taken = 0; /* bit j: this lane's expert lane + j*32 is taken */
    float total = 0.0f;
    for (int k = 0; k < K; k++) {
        float best = -INFINITY; /* the rank of best_id: its probability, -inf for NaN */
        int best_id = E;
        for (int j = 0; j < per_lane; j++) {
            int e = lane + j * WARP;
            float rank = isnan(p[j]) ? -INFINITY : p[j];
            if (e < E && !(taken >> j & 1u) && (rank > best || (rank == best && e < best_id)))
                best = rank, best_id = e;
        }
        for (int step = WARP / 2; step > 0; step /= 2) {
            float other = __shfl_xor_sync(0xffffffffu, best, step);
            int other_id = __shfl_xor_sync(0xffffffffu, best_id, step);
            if (other > best || (other == best && other_id < best_id)) best = other, best_id = other_id;
        }
        /* every lane holds the same best_id (K <= E leaves an untaken expert, so < E);
         * its probability comes from the lane that owns it */
        float weight = __shfl_sync(0xffffffffu, p[best_id / WARP], best_id % WARP);
        if (best_id % WARP == lane) taken |= 1u << (best_id / WARP);
        if (lane == 0) {
            ids[(size_t)n * K + k] = best_id;
            weights[(size_t)n * K + k] = weight;
        }
        total += weight; /* in k order, as the CPU backend sums it */
    }
    if (lane == 0)
        for (int k = 0; k < K; k++) {
            float w = weights[(size_t)n * K + k];
            if (renormalise) w /= total;
            weights[(size_t)n * K + k] = w * scaling;
        }
}

extern "C" int moe_router_topk(int32_t *ids, float *weights, float *probs, const float *logits,
                               int N, int E, int K, int renormalise, float scaling, char *err,
                               size_t err_size)
{
    if (E > ROUTER_MAX_EXPERTS || K > E || K > MAX_PER_LANE * WARP) {
        snprintf(err, err_size, "moe_router_topk: %d experts, top-%d: at most %d experts", E, K,
                 ROUTER_MAX_EXPERTS);
        return -1;
    }
    if (N == 0) return 0;
    router_topk_kernel<<<launch_warp_blocks(N, ROUTER_THREADS), ROUTER_THREADS>>>(
        ids, weights, probs, logits, N, E, K, renormalise, scaling);
    return report("moe_router_topk", err, err_size);
}

/* ---- permutation by expert ------------------------------------------------------------ */

__global__ void permute_count_kernel(int *counts, const int32_t *ids, int M, int E)
{
    extern __shared__ int local[]; /* [E] */
    for (int e = threadIdx.x; e < E; e += blockDim.x) local[e] = 0;
    __syncthreads();
    int s = blockIdx.x * PERMUTE_TILE + threadIdx.x;
    if (threadIdx.x < PERMUTE_TILE && s < M) atomicAdd(&local[ids[s]], 1); /* integer: exact */
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[blockIdx.x * E + e] = local[e];
}

/* One block: totals per expert, their exclusive scan, then each expert's run starts. */
__global__ void permute_scan_kernel(int *start, int32_t *expert_offsets, const int *counts,
                                    int tiles, int E)
{
    extern __shared__ int total[]; /* [E + 1] */
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int sum = 0;
        for (int t = 0; t < tiles; t++) sum += counts[t * E + e];
        total[e] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) { /* E <= a few thousand: a serial scan is not the cost here */
        int run = 0;
        for (int e = 0; e < E; e++) {
            int n = total[e];
            total[e] = run;
            expert_offsets[e] = run;
            run += n;
        }
        expert_offsets[E] = run;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) permute_scan_expert(start, counts, tiles, E, e, total[e]);
}

__global__ void permute_place_kernel(int32_t *slot_of_row, int32_t *row_of_slot, const int32_t *ids,
                                     const int *start, int M, int E)
{
    int s = blockIdx.x * PERMUTE_TILE + threadIdx.x;
    if (threadIdx.x >= PERMUTE_TILE || s >= M) return;
    int row = permute_row_of(ids, start, E, PERMUTE_TILE, s);
    slot_of_row[row] = s;
    row_of_slot[s] = row;
}

extern "C" size_t moe_permute_workspace(int M, int E)
{
    return 2 * (size_t)(permute_tiles(M, PERMUTE_TILE) > 0 ? permute_tiles(M, PERMUTE_TILE) : 1) *
           (size_t)E * sizeof(int);
}

extern "C" int moe_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row,
                                     int32_t *row_of_slot, const int32_t *ids, int M, int E,
                                     void *workspace, char *err, size_t err_size)
{
    int tiles = permute_tiles(M, PERMUTE_TILE);
    int *counts = (int *)workspace, *start = counts + (size_t)(tiles > 0 ? tiles : 1) * E;
    size_t shared = (size_t)(E + 1) * sizeof(int);
    if (tiles > 0) permute_count_kernel<<<tiles, PERMUTE_TILE, shared>>>(counts, ids, M, E);
    permute_scan_kernel<<<1, 256, shared>>>(start, expert_offsets, counts, tiles, E);
    if (tiles > 0)
        permute_place_kernel<<<tiles, PERMUTE_TILE>>>(slot_of_row, row_of_slot, ids, start, M, E);
    return report("moe_permute_by_expert", err, err_size);
}

/* ---- gather, combine, SwiGLU ------------------------------------------------------------ */

enum { THREADS = 256 };

__global__ void gather_rows_kernel(float *xs, const float *x, const int32_t *slot_of_row, int M,
                                   int K, int H)
{
    size_t total = (size_t)M * H;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / H, h = i % H;
        xs[i] = x[(size_t)(slot_of_row[r] / K) * H + h];
    }
}

extern "C" int moe_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                               int H, char *err, size_t err_size)
{
    if ((size_t)M * H == 0) return 0;
    gather_rows_kernel<<<launch_blocks((size_t)M * H, THREADS), THREADS>>>(xs, x, slot_of_row, M, K, H);
    return report("moe_gather_rows", err, err_size);
}

__global__ void combine_kernel(float *out, const float *ys, const float *weights,
                               const int32_t *row_of_slot, int N, int K, int H, int accumulate)
{
    size_t total = (size_t)N * H;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / H, h = i % H;
        float sum = 0.0f;
        for (int k = 0; k < K; k++)
            sum += weights[n * K + k] * ys[(size_t)row_of_slot[n * K + k] * H + h];
        out[i] = accumulate ? out[i] + sum : sum;
    }
}

extern "C" int moe_combine(float *out, const float *ys, const float *weights,
                           const int32_t *row_of_slot, int N, int K, int H, int accumulate,
                           char *err, size_t err_size)
{
    if ((size_t)N * H == 0) return 0;
    combine_kernel<<<launch_blocks((size_t)N * H, THREADS), THREADS>>>(out, ys, weights, row_of_slot,
                                                                      N, K, H, accumulate);
    return report("moe_combine", err, err_size);
}

__global__ void glu_kernel(float *h, const float *gate, const float *up, size_t count, int gelu)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        h[i] = gelu ? gelu_glu(gate[i], up[i]) : silu_glu(gate[i], up[i]);
}

extern "C" int moe_glu(float *h, const float *gate, const float *up, size_t count, int gelu,
                       char *err, size_t err_size)
{
    if (count == 0) return 0;
    glu_kernel<<<launch_blocks(count, THREADS), THREADS>>>(h, gate, up, count, gelu);
    return report("moe_glu", err, err_size);
}

/* counts[e] = slots that chose e (an exact count); prob_sums[e] = sum over tokens, in
 * double, of probs[n,e]. One block per expert: its threads stride over the tokens (the probability column, summed
 * in double) and over the N K choices (the count), then sum in block_reduce's fixed order.
 * (A thread per expert scanning everything took 1 ms at N = 4096, E = 128, K = 8 on an H100,
 * 2026-11-26; this is a few microseconds.) */
__global__ void balance_stats_kernel(float *counts, float *prob_sums, const float *probs,
                                     const int32_t *ids, int N, int E, int K)
{
    int e = blockIdx.x;
    double sum = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) sum += probs[(size_t)n * E + e];
    int count = 0;
    for (size_t s = threadIdx.x; s < (size_t)N * K; s += blockDim.x) count += ids[s] == e;
    sum = block_sum(sum);
    count = block_sum(count);
    if (threadIdx.x == 0) {
        prob_sums[e] = (float)sum;
        counts[e] = (float)count;
    }
}

extern "C" int moe_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                                        const int32_t *ids, int N, int E, int K, char *err,
                                        size_t err_size)
{
    if (E == 0) return 0;
    balance_stats_kernel<<<E, THREADS>>>(counts, prob_sums, probs, ids, N, E, K);
    return report("moe_router_balance_stats", err, err_size);
}

__global__ void add_sigmoid_gated_kernel(float *y, const float *s, const float *gate_logit, int N,
                                         int H)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)N * H;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += gate_sigmoid(gate_logit[i / H]) * s[i];
}

extern "C" int moe_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N, int H,
                                     char *err, size_t err_size)
{
    if ((size_t)N * H == 0) return 0;
    add_sigmoid_gated_kernel<<<launch_blocks((size_t)N * H, THREADS), THREADS>>>(y, s, gate_logit, N, H);
    return report("moe_add_sigmoid_gated", err, err_size);
}

/* ---- backward ----------------------------------------------------------------------------- */

__global__ void glu_backward_kernel(float *dgate, float *dup, const float *dh, const float *gate,
                                    const float *up, size_t count, int gelu)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        if (gelu)
            gelu_glu_backward(&dgate[i], &dup[i], dh[i], gate[i], up[i]);
        else
            silu_glu_backward(&dgate[i], &dup[i], dh[i], gate[i], up[i]);
    }
}

extern "C" int moe_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                                const float *up, size_t count, int gelu, char *err, size_t err_size)
{
    if (count == 0) return 0;
    glu_backward_kernel<<<launch_blocks(count, THREADS), THREADS>>>(dgate, dup, dh, gate, up, count,
                                                                  gelu);
    return report("moe_glu_backward", err, err_size);
}

/* One block per token: ds = sigmoid(g) dy, dg = <dy, s> sigmoid(g) (1 - sigmoid(g)). */
__global__ void add_sigmoid_gated_backward_kernel(float *ds, float *dgate_logit, const float *dy,
                                                  const float *s, const float *gate_logit, int H)
{
    size_t n = blockIdx.x;
    float g = gate_sigmoid(gate_logit[n]), dot = 0.0f;
    for (int d = threadIdx.x; d < H; d += blockDim.x) {
        dot += dy[n * H + d] * s[n * H + d];
        ds[n * H + d] = g * dy[n * H + d];
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) dgate_logit[n] = dot * g * (1.0f - g);
}

extern "C" int moe_add_sigmoid_gated_backward(float *ds, float *dgate_logit, const float *dy,
                                              const float *s, const float *gate_logit, int N, int H,
                                              char *err, size_t err_size)
{
    if (N == 0) return 0;
    add_sigmoid_gated_backward_kernel<<<N, THREADS>>>(ds, dgate_logit, dy, s, gate_logit, H);
    return report("moe_add_sigmoid_gated_backward", err, err_size);
}

/* One block per slot (n, k): dys[row] = w dout[n], dweights[n,k] = <dout[n], ys[row]>. */
__global__ void combine_backward_kernel(float *dys, float *dweights, const float *dout,
                                        const float *ys, const float *weights,
                                        const int32_t *row_of_slot, int K, int H)
{
    size_t slot = blockIdx.x, n = slot / K, row = (size_t)row_of_slot[slot];
    const float *g = dout + n * H, *y = ys + row * H;
    float *dy = dys + row * H, w = weights[slot], dot = 0.0f;
    for (int d = threadIdx.x; d < H; d += blockDim.x) {
        dot += g[d] * y[d];
        dy[d] = w * g[d];
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) dweights[slot] = dot;
}

extern "C" int moe_combine_backward(float *dys, float *dweights, const float *dout, const float *ys,
                                    const float *weights, const int32_t *row_of_slot, int N, int K,
                                    int H, char *err, size_t err_size)
{
    if ((size_t)N * K == 0) return 0;
    combine_backward_kernel<<<(unsigned)((size_t)N * K), THREADS>>>(dys, dweights, dout, ys, weights,
                                                                   row_of_slot, K, H);
    return report("moe_combine_backward", err, err_size);
}

/* dx[n,h] (+)= sum over k, in k order, of dxs[row_of_slot[n,k], h]: the CPU's order. */
__global__ void gather_rows_backward_kernel(float *dx, const float *dxs, const int32_t *row_of_slot,
                                            int N, int K, int H, int accumulate)
{
    size_t total = (size_t)N * H;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / H, h = i % H;
        float sum = 0.0f;
        for (int k = 0; k < K; k++) sum += dxs[(size_t)row_of_slot[n * K + k] * H + h];
        dx[i] = accumulate ? dx[i] + sum : sum;
    }
}

extern "C" int moe_gather_rows_backward(float *dx, const float *dxs, const int32_t *row_of_slot,
                                        int N, int K, int H, int accumulate, char *err,
                                        size_t err_size)
{
    if ((size_t)N * H == 0) return 0;
    gather_rows_backward_kernel<<<launch_blocks((size_t)N * H, THREADS), THREADS>>>(
        dx, dxs, row_of_slot, N, K, H, accumulate);
    return report("moe_gather_rows_backward", err, err_size);
}

/* One thread per token, the CPU backend's row function (E <= ROUTER_MAX_EXPERTS). */
__global__ void router_topk_backward_kernel(float *dlogits, const float *dweights,
                                            const float *probs, const int32_t *ids, int N, int E,
                                            int K, int renormalise, float scaling)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    router_topk_backward_row(dlogits + (size_t)n * E, dweights + (size_t)n * K,
                             probs + (size_t)n * E, ids + (size_t)n * K, E, K, renormalise, scaling);
}

extern "C" int moe_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                                        const int32_t *ids, int N, int E, int K, int renormalise,
                                        float scaling, char *err, size_t err_size)
{
    if (N == 0) return 0;
    router_topk_backward_kernel<<<(N + THREADS - 1) / THREADS, THREADS>>>(
        dlogits, dweights, probs, ids, N, E, K, renormalise, scaling);
    return report("moe_router_topk_backward", err, err_size);
}

__global__ void router_dense_backward_kernel(float *dlogits, const float *dots, const float *probs,
                                             const int32_t *ids, int N, int E, int K,
                                             int renormalise, float scaling)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    router_dense_backward_row(dlogits + (size_t)n * E, dots + (size_t)n * E, probs + (size_t)n * E,
                              ids + (size_t)n * K, E, K, renormalise, scaling);
}

extern "C" int moe_router_dense_backward(float *dlogits, const float *dots, const float *probs,
                                         const int32_t *ids, int N, int E, int K, int renormalise,
                                         float scaling, char *err, size_t err_size)
{
    if (N == 0) return 0;
    router_dense_backward_kernel<<<(N + THREADS - 1) / THREADS, THREADS>>>(
        dlogits, dots, probs, ids, N, E, K, renormalise, scaling);
    return report("moe_router_dense_backward", err, err_size);
}

__global__ void row_dots_kernel(float *out, int out_ld, const float *x, const float *y, int H)
{
    size_t n = blockIdx.x;
    const float *xr = x + n * H, *yr = y + n * H;
    float dot = 0.0f;
    for (int d = threadIdx.x; d < H; d += blockDim.x) dot += xr[d] * yr[d];
    dot = block_sum(dot);
    if (threadIdx.x == 0) out[n * out_ld] = dot;
}

extern "C" int moe_row_dots(float *out, int out_ld, const float *x, const float *y, int N, int H,
                            char *err, size_t err_size)
{
    if (N == 0) return 0;
    row_dots_kernel<<<(unsigned)N, THREADS>>>(out, out_ld, x, y, H);
    return report("moe_row_dots", err, err_size);
}

__global__ void router_balance_backward_kernel(float *dlogits, const float *probs,
                                               const float *coef, int N, int E)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    router_balance_backward_row(dlogits + (size_t)n * E, probs + (size_t)n * E, coef, E);
}

extern "C" int moe_router_balance_backward(float *dlogits, const float *probs, const float *coef,
                                           int N, int E, char *err, size_t err_size)
{
    if (N == 0) return 0;
    router_balance_backward_kernel<<<(N + THREADS - 1) / THREADS, THREADS>>>(dlogits, probs, coef, N, E);
    return report("moe_router_balance_backward", err, err_size);
}

/* ---- the routers of moe_math.h's rows: one thread per token ------------------------------ *
 * Each thread takes tokens n, n + threads, ... so that the scratch (a row of choice
 * scores, the group scores, the probabilities when probs is NULL, and a row of taken
 * flags) is held for at most ROUTER_ROW_THREADS tokens at a time. */

enum { ROUTER_ROW_THREADS = 16384, ROUTER_ROW_BLOCK = 128 };

/* Floats of one thread's scratch: choice[E], group_score[n_group], own probabilities[E]. */
__host__ __device__ static size_t router_row_floats(int E, int n_group)
{
    return 2 * (size_t)E + (size_t)(n_group > 0 ? n_group : 1);
}

static int router_row_threads(int N) { return N < ROUTER_ROW_THREADS ? N : ROUTER_ROW_THREADS; }

extern "C" size_t moe_router_rows_workspace(int N, int E, int n_group)
{
    size_t threads = (size_t)(N > 0 ? router_row_threads(N) : 1);
    return threads * (router_row_floats(E, n_group) * sizeof(float) + (size_t)E);
}

__global__ void router_rows_kernel(int32_t *ids, float *weights, float *probs, const float *logits,
                                   int N, int E, int K, struct moe_router r, float *scratch,
                                   unsigned char *flags)
{
    int thread = blockIdx.x * blockDim.x + threadIdx.x, threads = gridDim.x * blockDim.x;
    if (thread >= N) return;
    float *choice = scratch + (size_t)thread * router_row_floats(E, r.n_group);
    float *group_score = choice + E, *own = group_score + (r.n_group > 0 ? r.n_group : 1);
    unsigned char *taken = flags + (size_t)thread * E;
    for (int n = thread; n < N; n += threads) {
        float *p = probs ? probs + (size_t)n * E : own;
        const float *z = logits + (size_t)n * E;
        int32_t *id = ids + (size_t)n * K;
        float *w = weights + (size_t)n * K;
        if (r.kind == MOE_ROUTER_SIGMOID_BIAS)
            router_sigmoid_bias_row(id, w, p, choice, group_score, taken, z, r.bias, E, K,
                                    r.n_group, r.topk_group, r.renormalise, r.scaling);
        else if (r.kind == MOE_ROUTER_TOPK_SOFTMAX)
            router_topk_softmax_row(id, w, p, taken, z, E, K);
        else
            router_softmax_topk_row(id, w, p, choice, group_score, taken, z, E, K, r.n_group,
                                    r.topk_group, r.renormalise, r.scaling);
        if (r.collaborators) { /* C2R: the scores chosen by are in p, choice (masked) or z */
            bool logits = r.kind == MOE_ROUTER_TOPK_SOFTMAX;
            bool masked = r.kind == MOE_ROUTER_SIGMOID_BIAS ||
                          (r.kind == MOE_ROUTER_SOFTMAX && r.topk_group < r.n_group);
            router_c2r_row(id, w, logits ? z : masked ? choice : p, p, z, r.collaborators,
                           r.top_t, taken, E, K, logits, r.renormalise,
                           r.kind == MOE_ROUTER_SIGMOID_BIAS ? 1e-20f : 0.0f, r.scaling);
        }
    }
}

extern "C" int moe_router_rows(int32_t *ids, float *weights, float *probs, const float *logits,
                               int N, int E, int K, const struct moe_router *r, void *workspace,
                               char *err, size_t err_size)
{
    int n_group = r->n_group > 0 ? r->n_group : 1;
    if (K > E || K < 1 || E % n_group != 0 || r->topk_group < 1) {
        snprintf(err, err_size, "moe_router_rows: %d experts in %d groups (keep %d), top-%d", E,
                 n_group, r->topk_group, K);
        return -1;
    }
    if (N == 0) return 0;
    int threads = router_row_threads(N);
    float *scratch = (float *)workspace;
    unsigned char *flags =
        (unsigned char *)(scratch + (size_t)threads * router_row_floats(E, r->n_group));
    router_rows_kernel<<<(threads + ROUTER_ROW_BLOCK - 1) / ROUTER_ROW_BLOCK, ROUTER_ROW_BLOCK>>>(
        ids, weights, probs, logits, N, E, K, *r, scratch, flags);
    return report("moe_router_rows", err, err_size);
}

__global__ void router_rows_backward_kernel(float *dlogits, const float *dweights,
                                            const float *probs, const int32_t *ids, int N, int E,
                                            int K, struct moe_router r)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float *dz = dlogits + (size_t)n * E;
    const float *dw = dweights + (size_t)n * K, *p = probs + (size_t)n * E;
    const int32_t *id = ids + (size_t)n * K;
    if (r.kind == MOE_ROUTER_SIGMOID_BIAS)
        router_sigmoid_backward_row(dz, dw, p, id, E, K, r.renormalise, r.scaling);
    else if (r.kind == MOE_ROUTER_TOPK_SOFTMAX)
        router_topk_softmax_backward_row(dz, dw, p, id, E, K);
    else
        router_topk_backward_row(dz, dw, p, id, E, K, r.renormalise, r.scaling);
}

extern "C" int moe_router_rows_backward(float *dlogits, const float *dweights, const float *probs,
                                        const int32_t *ids, int N, int E, int K,
                                        const struct moe_router *r, char *err, size_t err_size)
{
    if (N == 0) return 0;
    router_rows_backward_kernel<<<(N + THREADS - 1) / THREADS, THREADS>>>(dlogits, dweights, probs,
                                                                         ids, N, E, K, *r);
    return report("moe_router_rows_backward", err, err_size);
}

/* ---- gpt_oss's experts: the clamped GLU and the per-expert bias --------------------------- */

__global__ void glu_clamped_kernel(float *h, const float *gate, const float *up, size_t count,
                                   float alpha, float limit)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        h[i] = glu_clamped(gate[i], up[i], alpha, limit);
}

extern "C" int moe_glu_clamped(float *h, const float *gate, const float *up, size_t count,
                               float alpha, float limit, char *err, size_t err_size)
{
    if (count == 0) return 0;
    glu_clamped_kernel<<<launch_blocks(count, THREADS), THREADS>>>(h, gate, up, count, alpha, limit);
    return report("moe_glu_clamped", err, err_size);
}

__global__ void glu_clamped_backward_kernel(float *dgate, float *dup, const float *dh,
                                            const float *gate, const float *up, size_t count,
                                            float alpha, float limit)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        glu_clamped_backward(&dgate[i], &dup[i], dh[i], gate[i], up[i], alpha, limit);
}

extern "C" int moe_glu_clamped_backward(float *dgate, float *dup, const float *dh,
                                        const float *gate, const float *up, size_t count,
                                        float alpha, float limit, char *err, size_t err_size)
{
    if (count == 0) return 0;
    glu_clamped_backward_kernel<<<launch_blocks(count, THREADS), THREADS>>>(dgate, dup, dh, gate, up,
                                                                          count, alpha, limit);
    return report("moe_glu_clamped_backward", err, err_size);
}

/* One thread per element of y[rows, O]: its row's expert by bisection of the offsets. */
__global__ void grouped_bias_kernel(float *y, const float *bias, const int32_t *offsets, int E,
                                    int O, int rows)
{
    size_t total = (size_t)rows * O;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / O), o = (int)(i % O);
        y[i] += bias[(size_t)expert_of_row(offsets, E, r) * O + o];
    }
}

extern "C" int moe_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O,
                                int rows, char *err, size_t err_size)
{
    if ((size_t)rows * O == 0 || E == 0) return 0;
    grouped_bias_kernel<<<launch_blocks((size_t)rows * O, THREADS), THREADS>>>(y, bias, offsets, E,
                                                                             O, rows);
    return report("moe_grouped_bias", err, err_size);
}

/* One thread per (expert, column): the expert's rows in order, as the CPU sums them. */
__global__ void grouped_bias_backward_kernel(float *const *dbias, const float *dy,
                                             const int32_t *offsets, int E, int O)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)E * O) return;
    int e = (int)(i / O), o = (int)(i % O);
    if (!dbias[e]) return;
    float sum = 0.0f;
    for (int r = offsets[e]; r < offsets[e + 1]; r++) sum += dy[(size_t)r * O + o];
    dbias[e][o] += sum;
}

extern "C" int moe_grouped_bias_backward(float *const *dbias, const float *dy,
                                         const int32_t *offsets, int E, int O, char *err,
                                         size_t err_size)
{
    size_t total = (size_t)E * O;
    if (total == 0) return 0;
    grouped_bias_backward_kernel<<<(unsigned)((total + THREADS - 1) / THREADS), THREADS>>>(
        dbias, dy, offsets, E, O);
    return report("moe_grouped_bias_backward", err, err_size);
}
