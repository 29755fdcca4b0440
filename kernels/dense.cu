/* dense: the dense kernels (see dense.h). */
#include "dense.h"
#include "dense_math.h"
#include "moe_math.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "block_reduce.cuh"

enum { THREADS = 256, ROW_THREADS = 256 };

static int report(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

#define GRID_STRIDE(i, total)                                                                  \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (total);                \
         i += (size_t)gridDim.x * blockDim.x)

/* ---- embedding ------------------------------------------------------------------------ */

__global__ void embedding_kernel(float *x, const int32_t *tokens, const float *table, int N, int H)
{
    GRID_STRIDE(i, (size_t)N * H)
    {
        size_t n = i / H, h = i % H;
        x[i] = table[(size_t)tokens[n] * H + h];
    }
}

extern "C" int dense_embedding(float *x, const int32_t *tokens, const float *table, int N, int H,
                               char *err, size_t err_size)
{
    if ((size_t)N * H == 0) return 0;
    embedding_kernel<<<launch_blocks((size_t)N * H, THREADS), THREADS>>>(x, tokens, table, N, H);
    return report("dense_embedding", err, err_size);
}

/* One thread per column: tokens in order, so a repeated token's rows add in token order. */
__global__ void embedding_backward_kernel(float *dtable, const float *dx, const int32_t *tokens,
                                          int N, int H)
{
    int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= H) return;
    for (int n = 0; n < N; n++) dtable[(size_t)tokens[n] * H + h] += dx[(size_t)n * H + h];
}

extern "C" int dense_embedding_backward(float *dtable, const float *dx, const int32_t *tokens,
                                        int N, int H, char *err, size_t err_size)
{
    if (N == 0 || H == 0) return 0;
    embedding_backward_kernel<<<(H + THREADS - 1) / THREADS, THREADS>>>(dtable, dx, tokens, N, H);
    return report("dense_embedding_backward", err, err_size);
}

/* ---- RMSNorm ---------------------------------------------------------------------------- */

__global__ void rmsnorm_kernel(float *y, float *rstd, const float *x, const float *w, int D,
                               float eps)
{
    size_t row = blockIdx.x;
    const float *xr = x + row * D;
    float *yr = y + row * D;
    float sum = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) sum += xr[d] * xr[d];
    float r = rmsnorm_rstd(block_sum(sum), D, eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
    for (int d = threadIdx.x; d < D; d += blockDim.x) yr[d] = rmsnorm_out(xr[d], w[d], r);
}

extern "C" int dense_rmsnorm(float *y, float *rstd, const float *x, const float *w, int R, int D,
                             float eps, char *err, size_t err_size)
{
    if (R == 0) return 0;
    rmsnorm_kernel<<<R, ROW_THREADS>>>(y, rstd, x, w, D, eps);
    return report("dense_rmsnorm", err, err_size);
}

/* dx, one block per row. Each thread reads its elements of dy before the block sum and
 * writes the same elements after it, so dx may alias dy. */
__global__ void rmsnorm_dx_kernel(float *dx, const float *dy, const float *x, const float *w,
                                  const float *rstd, int D, int accumulate_dx)
{
    size_t row = blockIdx.x;
    const float *xr = x + row * D, *dyr = dy + row * D;
    float r = rstd[row];
    float dot = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dot += dyr[d] * w[d] * (xr[d] * r);
    float mean = block_sum(dot) / (float)D;
    float *dxr = dx + row * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float g = rmsnorm_dx(dyr[d], xr[d], w[d], r, mean);
        dxr[d] = accumulate_dx ? dxr[d] + g : g;
    }
}

/* partial[c][d] = sum over the rows of chunk c, in row order, of dy (x NULL: a plain
 * column sum) or of dy * xhat (RMSNorm's weight gradient, x and rstd given). */
__global__ void column_partial_kernel(float *partial, const float *dy, const float *x,
                                      const float *rstd, int R, int D)
{
    int d = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
    if (d >= D) return;
    int end = (c + 1) * SUM_CHUNK < R ? (c + 1) * SUM_CHUNK : R;
    float p = 0.0f;
    for (int r = c * SUM_CHUNK; r < end; r++) {
        float g = dy[(size_t)r * D + d];
        p += x ? rmsnorm_dw_term(g, x[(size_t)r * D + d], rstd[r]) : g;
    }
    partial[(size_t)c * D + d] = p;
}

/* sum[d] += the chunks' partial sums, added in chunk order. */
__global__ void add_partial_sums_kernel(float *sum, const float *partial, int chunks, int D)
{
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    float total = 0.0f;
    for (int c = 0; c < chunks; c++) total += partial[(size_t)c * D + d];
    sum[d] += total;
}

static int sum_chunks(int R) { return (R + SUM_CHUNK - 1) / SUM_CHUNK; }

/* The two kernels of a chunked column sum (see column_partial_kernel). */
static void column_sums(float *sum, const float *dy, const float *x, const float *rstd, int R,
                        int D, void *workspace)
{
    float *partial = (float *)workspace;
    dim3 grid((D + THREADS - 1) / THREADS, sum_chunks(R));
    column_partial_kernel<<<grid, THREADS>>>(partial, dy, x, rstd, R, D);
    add_partial_sums_kernel<<<(D + THREADS - 1) / THREADS, THREADS>>>(sum, partial, sum_chunks(R), D);
}

extern "C" size_t dense_column_sums_workspace(int R, int D)
{
    return (size_t)(sum_chunks(R) > 0 ? sum_chunks(R) : 1) * (size_t)D * sizeof(float);
}

extern "C" size_t dense_rmsnorm_workspace(int R, int D) { return dense_column_sums_workspace(R, D); }

extern "C" int dense_column_sums(float *sum, const float *x, int R, int D, void *workspace,
                                 char *err, size_t err_size)
{
    if (R == 0 || D == 0) return 0;
    column_sums(sum, x, NULL, NULL, R, D, workspace);
    return report("dense_column_sums", err, err_size);
}

extern "C" int dense_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                      const float *w, const float *rstd, int R, int D,
                                      int accumulate_dx, void *workspace, char *err,
                                      size_t err_size)
{
    if (R == 0) return 0;
    /* the weight gradient first: it reads dy, which dx may overwrite */
    if (dw) column_sums(dw, dy, x, rstd, R, D, workspace);
    if (dx) rmsnorm_dx_kernel<<<R, ROW_THREADS>>>(dx, dy, x, w, rstd, D, accumulate_dx);
    return report("dense_rmsnorm_backward", err, err_size);
}

/* ---- RoPE ----------------------------------------------------------------------------- */

/* One thread per (token, head, pair). */
__global__ void rope_kernel(float *x, const int32_t *positions, const float *inv_freq,
                            float attention_scaling, int N, int n_heads, int Dh, int half,
                            int interleaved, int backward)
{
    GRID_STRIDE(i, (size_t)N * n_heads * half)
    {
        size_t row, pair, n;
        rope_pair_of(i, half, n_heads, &row, &pair, &n);
        float c, s;
        rope_cos_sin(&c, &s, positions[n], inv_freq[pair], attention_scaling);
        float *xh = x + row * Dh;
        size_t a, b;
        rope_pair_at(interleaved, pair, half, &a, &b);
        if (backward)
            rope_rotate_transpose(&xh[a], &xh[b], c, s);
        else
            rope_rotate(&xh[a], &xh[b], c, s);
    }
}

extern "C" int dense_rope(float *x, const int32_t *positions, const float *inv_freq,
                          float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                          int interleaved, int backward, char *err, size_t err_size)
{
    int half = rotary_dim / 2;
    size_t total = (size_t)N * n_heads * half;
    if (total == 0) return 0;
    rope_kernel<<<launch_blocks(total, THREADS), THREADS>>>(x, positions, inv_freq,
                                                            attention_scaling, N, n_heads, Dh,
                                                            half, interleaved, backward);
    return report("dense_rope", err, err_size);
}

/* ---- element-wise --------------------------------------------------------------------- */

__global__ void add_kernel(float *y, const float *x, const float *r, size_t count)
{
    GRID_STRIDE(i, count) y[i] = x[i] + r[i];
}

extern "C" int dense_add(float *y, const float *x, const float *r, size_t count, char *err,
                         size_t err_size)
{
    if (count == 0) return 0;
    add_kernel<<<launch_blocks(count, THREADS), THREADS>>>(y, x, r, count);
    return report("dense_add", err, err_size);
}

__global__ void clamp_kernel(float *x, size_t count, float low, float high)
{
    GRID_STRIDE(i, count) x[i] = fminf(fmaxf(x[i], low), high);
}

__global__ void clamp_backward_kernel(float *dx, const float *y, size_t count, float low,
                                      float high)
{
    GRID_STRIDE(i, count) if (y[i] <= low || y[i] >= high) dx[i] = 0.0f;
}

extern "C" int dense_clamp(float *x, size_t count, float low, float high, char *err,
                           size_t err_size)
{
    if (count == 0) return 0;
    clamp_kernel<<<launch_blocks(count, THREADS), THREADS>>>(x, count, low, high);
    return report("dense_clamp", err, err_size);
}

extern "C" int dense_clamp_backward(float *dx, const float *y, size_t count, float low,
                                    float high, char *err, size_t err_size)
{
    if (count == 0) return 0;
    clamp_backward_kernel<<<launch_blocks(count, THREADS), THREADS>>>(dx, y, count, low, high);
    return report("dense_clamp_backward", err, err_size);
}

/* ---- cross-entropy, fused with its gradient ------------------------------------------- */

/* One block per row. Every read of the row (the label's logit, the max, the sum) comes
 * before the block sum's barrier, and each thread then writes only the elements it read,
 * so dlogits may be the logits buffer. */
__global__ void cross_entropy_kernel(double *row_loss, float *dlogits, const float *logits,
                                     const int32_t *labels, int V, float scale)
{
    size_t row = blockIdx.x;
    int label = labels[row];
    const float *z = logits + row * V;
    float *g = dlogits ? dlogits + row * V : NULL;
    if (label < 0) { /* the whole block takes this branch */
        if (threadIdx.x == 0) row_loss[row] = 0.0;
        if (g)
            for (int v = threadIdx.x; v < V; v += blockDim.x) g[v] = 0.0f;
        return;
    }
    float label_logit = z[label];
    float max = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) max = fmaxf(max, z[v]);
    max = block_max(max);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(z[v] - max);
    sum = block_sum(sum);
    if (threadIdx.x == 0) row_loss[row] = cross_entropy_row(max, sum, label_logit);
    if (!g) return;
    float factor = scale / sum;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        g[v] = cross_entropy_dlogit(expf(z[v] - max), factor, v == label, scale);
}

extern "C" int dense_cross_entropy(double *row_loss, float *dlogits, const float *logits,
                                   const int32_t *labels, int N, int V, float scale, char *err,
                                   size_t err_size)
{
    if (N == 0) return 0;
    cross_entropy_kernel<<<N, ROW_THREADS>>>(row_loss, dlogits, logits, labels, V, scale);
    return report("dense_cross_entropy", err, err_size);
}

/* ---- the vocabulary-chunked cross-entropy (backend.h's ce_chunk_*) --------------------- */

template <typename T> struct reduce_min {
    __device__ static T apply(T a, T b) { return a < b ? a : b; }
    __device__ static T identity() { return (T)0x7fffffff; }
};

/* One block per token: the chunk's max and sum of exponentials folded into the running
 * state (rescaled when the max grows, as the CPU backend does), the label's logit when it
 * falls in the chunk, and the best logit: the chunk's first largest when it beats the
 * running one (the CPU's strict > in index order). */
__global__ void ce_chunk_update_kernel(float *state, int32_t *best, const float *logits,
                                       const int32_t *labels, int C, int v0)
{
    size_t row = blockIdx.x;
    const float *z = logits + row * C;
    float *st = state + row * 4;
    float old_max = v0 == 0 ? -INFINITY : st[0], old_sum = v0 == 0 ? 0.0f : st[1];
    float old_best = v0 == 0 ? -INFINITY : st[3];
    float chunk_max = -INFINITY;
    for (int v = threadIdx.x; v < C; v += blockDim.x) chunk_max = fmaxf(chunk_max, z[v]);
    chunk_max = block_max(chunk_max);
    float max = v0 == 0 ? chunk_max : fmaxf(chunk_max, old_max);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < C; v += blockDim.x) sum += expf(z[v] - max);
    sum = block_sum(sum);
    int first = 0x7fffffff; /* the first index holding the chunk's max */
    for (int v = threadIdx.x; v < C; v += blockDim.x)
        if (z[v] == chunk_max && v < first) first = v;
    first = block_reduce<int, reduce_min<int> >(first);
    if (threadIdx.x != 0) return;
    st[0] = max;
    st[1] = v0 == 0 ? sum : old_sum * expf(old_max - max) + sum;
    if (v0 == 0) st[2] = 0.0f;
    int label = labels[row] - v0;
    if (label >= 0 && label < C) st[2] = z[label];
    if (v0 == 0) best[row] = -1;
    if (chunk_max > old_best && first < C) {
        st[3] = chunk_max;
        best[row] = v0 + first;
    } else if (v0 == 0) {
        st[3] = -INFINITY;
    }
}

extern "C" int dense_ce_chunk_update(float *state, int32_t *best, const float *logits,
                                     const int32_t *labels, int N, int C, int v0, char *err,
                                     size_t err_size)
{
    if (N == 0) return 0;
    ce_chunk_update_kernel<<<N, ROW_THREADS>>>(state, best, logits, labels, C, v0);
    return report("dense_ce_chunk_update", err, err_size);
}

/* One thread per logit of the chunk: scale * (softmax - onehot) from the final state. */
__global__ void ce_chunk_backward_kernel(float *dlogits, const float *logits, const float *state,
                                         const int32_t *labels, int N, int C, int v0, float scale)
{
    GRID_STRIDE(i, (size_t)N * C)
    {
        size_t row = i / C;
        int v = (int)(i % C), label = labels[row];
        if (label < 0) {
            dlogits[i] = 0.0f;
            continue;
        }
        const float *st = state + row * 4;
        dlogits[i] = cross_entropy_dlogit(expf(logits[i] - st[0]), scale / st[1], v0 + v == label,
                                          scale);
    }
}

extern "C" int dense_ce_chunk_backward(float *dlogits, const float *logits, const float *state,
                                       const int32_t *labels, int N, int C, int v0, float scale,
                                       char *err, size_t err_size)
{
    size_t total = (size_t)N * C;
    if (total == 0) return 0;
    ce_chunk_backward_kernel<<<launch_blocks(total, THREADS), THREADS>>>(dlogits, logits, state,
                                                                        labels, N, C, v0, scale);
    return report("dense_ce_chunk_backward", err, err_size);
}

extern "C" int dense_sum_rows(double *total, long long *counted, const double *row_loss,
                              const int32_t *labels, int N, double *loss, int32_t *lab,
                              char *err, size_t err_size)
{
    *total = 0;
    *counted = 0;
    if (N == 0) return 0;
    cudaError_t status = cudaMemcpy(loss, row_loss, (size_t)N * sizeof(double), cudaMemcpyDeviceToHost);
    if (status == cudaSuccess)
        status = cudaMemcpy(lab, labels, (size_t)N * sizeof(int32_t), cudaMemcpyDeviceToHost);
    if (status == cudaSuccess)
        for (int n = 0; n < N; n++)
            if (lab[n] >= 0) *total += loss[n], ++*counted;
    if (status != cudaSuccess) {
        snprintf(err, err_size, "dense_sum_rows: %s", cudaGetErrorString(status));
        return -1;
    }
    return 0;
}
