/* attention_gemm: causal attention within packed samples through cuBLAS (see
 * attention.h). Per sample, per block of query rows, per KV head: the scores of the
 * block's query heads against the keys they can see by one strided-batched GEMM, the
 * causal softmax in place by a row kernel, and the output by a second GEMM; the backward
 * recomputes the probabilities the same way. fp32 operands and accumulation. */
#include "attention.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include "block_reduce.cuh"

enum { SOFTMAX_THREADS = 256 };

/* Floats of one score buffer: the query heads of one KV head, ATTENTION_GEMM_ROWS rows
 * (fewer when the sample is shorter) against at most the sample's length of keys. */
static size_t score_floats(int longest, int group)
{
    size_t rows = longest < ATTENTION_GEMM_ROWS ? (size_t)longest : ATTENTION_GEMM_ROWS;
    return (size_t)group * rows * (size_t)longest;
}

extern "C" size_t attention_gemm_workspace(int longest, int nH, int nKV)
{
    return 2 * score_floats(longest > 0 ? longest : 1, nH / nKV) * sizeof(float);
}

/* Row r of the block (query head j = r / rows, query i = r % rows, at position first + i
 * of its sample) sees keys [0, first + i]; the rest of its `keys` columns get 0. In
 * place: scores -> probabilities. */
__global__ void causal_softmax_kernel(float *p, int rows, int keys, int first)
{
    size_t r = blockIdx.x;
    float *row = p + r * keys;
    int seen = first + (int)(r % rows) + 1;
    float m = -INFINITY;
    for (int t = threadIdx.x; t < seen; t += blockDim.x) m = fmaxf(m, row[t]);
    m = block_max(m);
    float s = 0.0f;
    for (int t = threadIdx.x; t < seen; t += blockDim.x) {
        float e = expf(row[t] - m);
        row[t] = e;
        s += e;
    }
    s = block_sum(s);
    float inv = 1.0f / s;
    for (int t = threadIdx.x; t < keys; t += blockDim.x) row[t] = t < seen ? row[t] * inv : 0.0f;
}

/* dS = P * (dP - sum_t P dP) per row (the softmax's backward), in place over dP. */
__global__ void softmax_backward_kernel(float *dp, const float *p, int rows, int keys, int first)
{
    size_t r = blockIdx.x;
    float *drow = dp + r * keys;
    const float *prow = p + r * keys;
    int seen = first + (int)(r % rows) + 1;
    float d = 0.0f;
    for (int t = threadIdx.x; t < seen; t += blockDim.x) d += prow[t] * drow[t];
    d = block_sum(d);
    for (int t = threadIdx.x; t < keys; t += blockDim.x)
        drow[t] = t < seen ? prow[t] * (drow[t] - d) : 0.0f;
}

static int failed(cublasStatus_t status, const char *what, char *err, size_t err_size)
{
    if (status == CUBLAS_STATUS_SUCCESS) return 0;
    snprintf(err, err_size, "%s: %s", what, cublasGetStatusString(status));
    return -1;
}

static int launched(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

/* What every block of one sample shares. */
struct block {
    cublasHandle_t h;
    int nH, nKV, Dh, group, qw, kvw;
    size_t s0;     /* the sample's first token */
    int first, rows, keys; /* query rows [first, first + rows) see keys [0, keys) */
    float scale;
};

/* P[j] (rows x keys, ld keys) = scale q_j k^T for the query heads j of KV head kv, then
 * the causal softmax. */
static int probabilities(const struct block *b, float *p, const float *q, const float *k, int kv,
                         char *err, size_t err_size)
{
    float zero = 0.0f;
    /* column-major: P^T (keys x rows) = K (keys x Dh) Q^T; K^T and Q^T are the row-major
     * blocks as cuBLAS reads them */
    const float *kb = k + b->s0 * b->kvw + (size_t)kv * b->Dh;
    const float *qb = q + (b->s0 + b->first) * b->qw + (size_t)kv * b->group * b->Dh;
    cublasStatus_t st = cublasSgemmStridedBatched(
        b->h, CUBLAS_OP_T, CUBLAS_OP_N, b->keys, b->rows, b->Dh, &b->scale, kb, b->kvw, 0, qb,
        b->qw, b->Dh, &zero, p, b->keys, (long long)b->rows * b->keys, b->group);
    if (failed(st, "attention scores", err, err_size)) return -1;
    causal_softmax_kernel<<<b->group * b->rows, SOFTMAX_THREADS>>>(p, b->rows, b->keys, b->first);
    return launched("attention softmax", err, err_size);
}

extern "C" int attention_gemm_samples(const int32_t *host_start, int N, int *starts, int *longest)
{
    int count = 0;
    *longest = 0;
    for (int i = 0; i < N; i++)
        if (host_start[i] == i) starts[count++] = i;
    starts[count] = N;
    for (int s = 0; s < count; s++)
        if (starts[s + 1] - starts[s] > *longest) *longest = starts[s + 1] - starts[s];
    return count;
}

extern "C" int attention_gemm_forward(void *cublas, float *out, const float *q, const float *k,
                                      const float *v, const int *starts, int count, int nH,
                                      int nKV, int Dh, float scale, void *workspace, char *err,
                                      size_t err_size)
{
    struct block b = {(cublasHandle_t)cublas, nH, nKV, Dh, nH / nKV, nH * Dh, nKV * Dh};
    b.scale = scale;
    float *p = (float *)workspace, one = 1.0f, zero = 0.0f;
    for (int s = 0; s < count; s++) {
        int L = starts[s + 1] - starts[s];
        b.s0 = (size_t)starts[s];
        for (b.first = 0; b.first < L; b.first += ATTENTION_GEMM_ROWS) {
            b.rows = L - b.first < ATTENTION_GEMM_ROWS ? L - b.first : ATTENTION_GEMM_ROWS;
            b.keys = b.first + b.rows;
            for (int kv = 0; kv < nKV; kv++) {
                if (probabilities(&b, p, q, k, kv, err, err_size)) return -1;
                /* out_j (rows x Dh) = P_j V: column-major out^T = V^T P^T */
                const float *vb = v + b.s0 * b.kvw + (size_t)kv * Dh;
                float *ob = out + (b.s0 + b.first) * b.qw + (size_t)kv * b.group * Dh;
                cublasStatus_t st = cublasSgemmStridedBatched(
                    b.h, CUBLAS_OP_N, CUBLAS_OP_N, Dh, b.rows, b.keys, &one, vb, b.kvw, 0, p,
                    b.keys, (long long)b.rows * b.keys, &zero, ob, b.qw, Dh, b.group);
                if (failed(st, "attention output", err, err_size)) return -1;
            }
        }
    }
    return 0;
}

extern "C" int attention_gemm_backward(void *cublas, float *dq, float *dk, float *dv,
                                       const float *dout, const float *q, const float *k,
                                       const float *v, const int *starts, int count, int nH,
                                       int nKV, int Dh, float scale, void *workspace,
                                       char *err, size_t err_size)
{
    int N = count > 0 ? starts[count] : 0, longest = 0;
    for (int s = 0; s < count; s++)
        if (starts[s + 1] - starts[s] > longest) longest = starts[s + 1] - starts[s];
    struct block b = {(cublasHandle_t)cublas, nH, nKV, Dh, nH / nKV, nH * Dh, nKV * Dh};
    b.scale = scale;
    float *p = (float *)workspace, *ds = p + score_floats(longest, b.group);
    float one = 1.0f, zero = 0.0f;
    /* dk, dv are sums over the query blocks and heads that see each key */
    cudaError_t cs = cudaMemsetAsync(dk, 0, (size_t)N * b.kvw * sizeof(float));
    if (cs == cudaSuccess) cs = cudaMemsetAsync(dv, 0, (size_t)N * b.kvw * sizeof(float));
    if (cs != cudaSuccess) {
        snprintf(err, err_size, "attention backward: %s", cudaGetErrorString(cs));
        return -1;
    }
    for (int s = 0; s < count; s++) {
        int L = starts[s + 1] - starts[s];
        b.s0 = (size_t)starts[s];
        for (b.first = 0; b.first < L; b.first += ATTENTION_GEMM_ROWS) {
            b.rows = L - b.first < ATTENTION_GEMM_ROWS ? L - b.first : ATTENTION_GEMM_ROWS;
            b.keys = b.first + b.rows;
            long long block = (long long)b.rows * b.keys;
            for (int kv = 0; kv < nKV; kv++) {
                if (probabilities(&b, p, q, k, kv, err, err_size)) return -1;
                const float *kb = k + b.s0 * b.kvw + (size_t)kv * Dh;
                const float *vb = v + b.s0 * b.kvw + (size_t)kv * Dh;
                size_t query = (b.s0 + b.first) * b.qw + (size_t)kv * b.group * Dh;
                /* dP_j = dout_j V^T, as the scores: column-major dP^T = V dout^T */
                cublasStatus_t st = cublasSgemmStridedBatched(
                    b.h, CUBLAS_OP_T, CUBLAS_OP_N, b.keys, b.rows, Dh, &one, vb, b.kvw, 0,
                    dout + query, b.qw, Dh, &zero, ds, b.keys, block, b.group);
                if (failed(st, "attention dP", err, err_size)) return -1;
                softmax_backward_kernel<<<b.group * b.rows, SOFTMAX_THREADS>>>(ds, p, b.rows, b.keys,
                                                                              b.first);
                if (launched("attention softmax backward", err, err_size)) return -1;
                /* dq_j (rows x Dh) = scale dS_j K: column-major dq^T = K^T dS^T */
                st = cublasSgemmStridedBatched(b.h, CUBLAS_OP_N, CUBLAS_OP_N, Dh, b.rows, b.keys,
                                               &b.scale, kb, b.kvw, 0, ds, b.keys, block, &zero,
                                               dq + query, b.qw, Dh, b.group);
                if (failed(st, "attention dq", err, err_size)) return -1;
                /* dk (keys x Dh) += scale sum_j dS_j^T q_j; dv += sum_j P_j^T dout_j:
                 * column-major dk^T = q_j^T dS_j, one head at a time into the same sum */
                float *dkb = dk + b.s0 * b.kvw + (size_t)kv * Dh;
                float *dvb = dv + b.s0 * b.kvw + (size_t)kv * Dh;
                for (int j = 0; j < b.group; j++) {
                    st = cublasSgemm(b.h, CUBLAS_OP_N, CUBLAS_OP_T, Dh, b.keys, b.rows, &b.scale,
                                     q + query + (size_t)j * Dh, b.qw, ds + j * block, b.keys,
                                     &one, dkb, b.kvw);
                    if (failed(st, "attention dk", err, err_size)) return -1;
                    st = cublasSgemm(b.h, CUBLAS_OP_N, CUBLAS_OP_T, Dh, b.keys, b.rows, &one,
                                     dout + query + (size_t)j * Dh, b.qw, p + j * block, b.keys,
                                     &one, dvb, b.kvw);
                    if (failed(st, "attention dv", err, err_size)) return -1;
                }
            }
        }
    }
    return 0;
}
