/* attention: causal attention within packed samples (see attention.h). */
#include "attention.h"
#include "moe_math.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

enum { THREADS = 128, PER_LANE = ATTENTION_MAX_HEAD_DIM / WARP };

static int report(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

__device__ static float warp_sum(float value)
{
    for (int step = WARP / 2; step > 0; step /= 2) value += __shfl_xor_sync(0xffffffffu, value, step);
    return value;
}

/* This lane's dims of a head row: d = lane + j * 32 for j < per_lane. */
__device__ static void load_lane(float *dst, const float *row, int Dh, int lane, int per_lane)
{
    for (int j = 0; j < per_lane; j++) {
        int d = lane + j * WARP;
        dst[j] = d < Dh ? row[d] : 0.0f;
    }
}

__device__ static float lane_dot(const float *mine, const float *row, int Dh, int lane, int per_lane)
{
    float sum = 0.0f;
    for (int j = 0; j < per_lane; j++) {
        int d = lane + j * WARP;
        if (d < Dh) sum += mine[j] * row[d];
    }
    return warp_sum(sum);
}

/* The warp's (token, head) item: its index, or -1 past the last. */
__device__ static long warp_item(long items)
{
    long item = (long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    return item < items ? item : -1;
}

__global__ void attention_forward_kernel(float *out, const float *q, const float *k, const float *v,
                                         const int32_t *sample_start, int N, int nH, int nKV,
                                         int Dh, float scale)
{
    long item = warp_item((long)N * nH);
    if (item < 0) return; /* the whole warp */
    int lane = threadIdx.x % WARP, per_lane = (Dh + WARP - 1) / WARP;
    int i = (int)(item / nH), h = (int)(item % nH), kv = h / (nH / nKV);
    size_t q_stride = (size_t)nH * Dh, kv_stride = (size_t)nKV * Dh;
    float qi[PER_LANE], acc[PER_LANE];
    load_lane(qi, q + i * q_stride + (size_t)h * Dh, Dh, lane, per_lane);
    for (int j = 0; j < per_lane; j++) acc[j] = 0.0f;
    float max = -INFINITY, sum = 0.0f;
    for (int key = sample_start[i]; key <= i; key++) {
        float s = scale * lane_dot(qi, k + key * kv_stride + (size_t)kv * Dh, Dh, lane, per_lane);
        float new_max = fmaxf(max, s);
        float correction = expf(max - new_max), p = expf(s - new_max);
        sum = sum * correction + p;
        const float *vr = v + key * kv_stride + (size_t)kv * Dh;
        for (int j = 0; j < per_lane; j++) {
            int d = lane + j * WARP;
            acc[j] = acc[j] * correction + (d < Dh ? p * vr[d] : 0.0f);
        }
        max = new_max;
    }
    float *o = out + i * q_stride + (size_t)h * Dh;
    for (int j = 0; j < per_lane; j++) {
        int d = lane + j * WARP;
        if (d < Dh) o[d] = acc[j] / sum;
    }
}

static int check_head_dim(int Dh, const char *what, char *err, size_t err_size)
{
    if (Dh >= 1 && Dh <= ATTENTION_MAX_HEAD_DIM) return 0;
    snprintf(err, err_size, "%s: head_dim %d: the kernel handles 1 to %d", what, Dh,
             ATTENTION_MAX_HEAD_DIM);
    return -1;
}

extern "C" int attention_forward(float *out, const float *q, const float *k, const float *v,
                                 const int32_t *sample_start, int N, int nH, int nKV, int Dh,
                                 float scale, char *err, size_t err_size)
{
    if (check_head_dim(Dh, "attention_forward", err, err_size)) return -1;
    if (N == 0) return 0;
    long items = (long)N * nH, per_block = THREADS / WARP;
    attention_forward_kernel<<<(unsigned)((items + per_block - 1) / per_block), THREADS>>>(
        out, q, k, v, sample_start, N, nH, nKV, Dh, scale);
    return report("attention_forward", err, err_size);
}

/* Per (query, head): lse = log sum_j exp(s_j) and D = <dout, out>. */
__global__ void attention_row_stats_kernel(float *lse, float *D, const float *q, const float *k,
                                           const float *out, const float *dout,
                                           const int32_t *sample_start, int N, int nH, int nKV,
                                           int Dh, float scale)
{
    long item = warp_item((long)N * nH);
    if (item < 0) return;
    int lane = threadIdx.x % WARP, per_lane = (Dh + WARP - 1) / WARP;
    int i = (int)(item / nH), h = (int)(item % nH), kv = h / (nH / nKV);
    size_t q_stride = (size_t)nH * Dh, kv_stride = (size_t)nKV * Dh;
    float qi[PER_LANE], mine[PER_LANE];
    load_lane(qi, q + i * q_stride + (size_t)h * Dh, Dh, lane, per_lane);
    float max = -INFINITY, sum = 0.0f;
    for (int key = sample_start[i]; key <= i; key++) {
        float s = scale * lane_dot(qi, k + key * kv_stride + (size_t)kv * Dh, Dh, lane, per_lane);
        float new_max = fmaxf(max, s);
        sum = sum * expf(max - new_max) + expf(s - new_max);
        max = new_max;
    }
    load_lane(mine, dout + i * q_stride + (size_t)h * Dh, Dh, lane, per_lane);
    float d = lane_dot(mine, out + i * q_stride + (size_t)h * Dh, Dh, lane, per_lane);
    if (lane == 0) {
        lse[item] = max + logf(sum);
        D[item] = d;
    }
}

/* dq_i = scale sum_j dS_ij k_j, dS_ij = P_ij (<dout_i, v_j> - D_i). */
__global__ void attention_dq_kernel(float *dq, const float *q, const float *k, const float *v,
                                    const float *dout, const float *lse, const float *D,
                                    const int32_t *sample_start, int N, int nH, int nKV, int Dh,
                                    float scale)
{
    long item = warp_item((long)N * nH);
    if (item < 0) return;
    int lane = threadIdx.x % WARP, per_lane = (Dh + WARP - 1) / WARP;
    int i = (int)(item / nH), h = (int)(item % nH), kv = h / (nH / nKV);
    size_t q_stride = (size_t)nH * Dh, kv_stride = (size_t)nKV * Dh;
    float qi[PER_LANE], gi[PER_LANE], acc[PER_LANE];
    load_lane(qi, q + i * q_stride + (size_t)h * Dh, Dh, lane, per_lane);
    load_lane(gi, dout + i * q_stride + (size_t)h * Dh, Dh, lane, per_lane);
    for (int j = 0; j < per_lane; j++) acc[j] = 0.0f;
    float row_lse = lse[item], row_D = D[item];
    for (int key = sample_start[i]; key <= i; key++) {
        const float *kr = k + key * kv_stride + (size_t)kv * Dh;
        float p = expf(scale * lane_dot(qi, kr, Dh, lane, per_lane) - row_lse);
        float ds = p * (lane_dot(gi, v + key * kv_stride + (size_t)kv * Dh, Dh, lane, per_lane) - row_D);
        for (int j = 0; j < per_lane; j++) {
            int d = lane + j * WARP;
            if (d < Dh) acc[j] += ds * kr[d];
        }
    }
    float *o = dq + i * q_stride + (size_t)h * Dh;
    for (int j = 0; j < per_lane; j++) {
        int d = lane + j * WARP;
        if (d < Dh) o[d] = scale * acc[j];
    }
}

/* Per (key, KV head): over the queries of the key's sample at or after it, and the query
 * heads of the group: dv_j = sum P_ij dout_i, dk_j = scale sum dS_ij q_i. */
__global__ void attention_dkv_kernel(float *dk, float *dv, const float *q, const float *k,
                                     const float *v, const float *dout, const float *lse,
                                     const float *D, const int32_t *sample_start, int N, int nH,
                                     int nKV, int Dh, float scale)
{
    long item = warp_item((long)N * nKV);
    if (item < 0) return;
    int lane = threadIdx.x % WARP, per_lane = (Dh + WARP - 1) / WARP;
    int key = (int)(item / nKV), kv = (int)(item % nKV), group = nH / nKV;
    size_t q_stride = (size_t)nH * Dh, kv_stride = (size_t)nKV * Dh;
    float kj[PER_LANE], vj[PER_LANE], acc_k[PER_LANE], acc_v[PER_LANE];
    load_lane(kj, k + key * kv_stride + (size_t)kv * Dh, Dh, lane, per_lane);
    load_lane(vj, v + key * kv_stride + (size_t)kv * Dh, Dh, lane, per_lane);
    for (int j = 0; j < per_lane; j++) acc_k[j] = acc_v[j] = 0.0f;
    for (int i = key; i < N && sample_start[i] == sample_start[key]; i++)
        for (int h = kv * group; h < (kv + 1) * group; h++) {
            const float *qr = q + i * q_stride + (size_t)h * Dh, *gr = dout + i * q_stride + (size_t)h * Dh;
            size_t row = (size_t)i * nH + h;
            float p = expf(scale * lane_dot(kj, qr, Dh, lane, per_lane) - lse[row]);
            float ds = p * (lane_dot(vj, gr, Dh, lane, per_lane) - D[row]);
            for (int j = 0; j < per_lane; j++) {
                int d = lane + j * WARP;
                if (d < Dh) {
                    acc_v[j] += p * gr[d];
                    acc_k[j] += ds * qr[d];
                }
            }
        }
    float *ok = dk + key * kv_stride + (size_t)kv * Dh, *ov = dv + key * kv_stride + (size_t)kv * Dh;
    for (int j = 0; j < per_lane; j++) {
        int d = lane + j * WARP;
        if (d < Dh) {
            ok[d] = scale * acc_k[j];
            ov[d] = acc_v[j];
        }
    }
}

extern "C" size_t attention_backward_workspace(int N, int nH)
{
    size_t n = (size_t)N * nH;
    return 2 * (n ? n : 1) * sizeof(float);
}

extern "C" int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                  const float *k, const float *v, const float *out,
                                  const int32_t *sample_start, int N, int nH, int nKV, int Dh,
                                  float scale, void *workspace, char *err, size_t err_size)
{
    if (check_head_dim(Dh, "attention_backward", err, err_size)) return -1;
    if (N == 0) return 0;
    float *lse = (float *)workspace, *D = lse + (size_t)N * nH;
    long per_block = THREADS / WARP, rows = (long)N * nH, keys = (long)N * nKV;
    unsigned row_blocks = (unsigned)((rows + per_block - 1) / per_block);
    unsigned key_blocks = (unsigned)((keys + per_block - 1) / per_block);
    attention_row_stats_kernel<<<row_blocks, THREADS>>>(lse, D, q, k, out, dout, sample_start, N,
                                                        nH, nKV, Dh, scale);
    attention_dq_kernel<<<row_blocks, THREADS>>>(dq, q, k, v, dout, lse, D, sample_start, N, nH, nKV,
                                                 Dh, scale);
    attention_dkv_kernel<<<key_blocks, THREADS>>>(dk, dv, q, k, v, dout, lse, D, sample_start, N, nH,
                                                  nKV, Dh, scale);
    return report("attention_backward", err, err_size);
}
