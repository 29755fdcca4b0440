/* attention_gemm: causal attention within packed samples through cuBLAS (see
 * attention.h). Per sample, per block of query rows, per KV head: the scores of the
 * block's query heads against the keys they can see by one strided-batched GEMM, the
 * causal (and windowed, and sink-extended) softmax in place by a row kernel, and the
 * output by a second GEMM; the backward recomputes the probabilities the same way. fp32
 * operands and accumulation. */
#include "attention.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include "block_reduce.cuh"

enum { SOFTMAX_THREADS = 256, SINK_THREADS = 128 };

/* Floats of one score buffer: the query heads of one KV head, ATTENTION_GEMM_ROWS rows
 * (fewer when the sample is shorter) against at most the sample's length of keys. */
static size_t score_floats(int longest, int group)
{
    size_t rows = longest < ATTENTION_GEMM_ROWS ? (size_t)longest : ATTENTION_GEMM_ROWS;
    return (size_t)group * rows * (size_t)longest;
}

/* Two score buffers (P and dS), then one sink probability a row of a block. */
extern "C" size_t attention_gemm_workspace(int longest, int nH, int nKV)
{
    int L = longest > 0 ? longest : 1, group = nH / nKV;
    size_t rows = L < ATTENTION_GEMM_ROWS ? (size_t)L : ATTENTION_GEMM_ROWS;
    return (2 * score_floats(L, group) + (size_t)group * rows) * sizeof(float);
}

/* The keys a block of queries reads start at its first query's earliest visible key
 * (0 without a window): the CPU backend's block_first_key. */
static int block_first_key(int window, int first)
{
    return window && first - window + 1 > 0 ? first - window + 1 : 0;
}

/* The columns [*begin, *end) of a block's keys lo .. that query i (within the sample)
 * sees: the CPU backend's visible_keys. */
__device__ static void visible_keys(int *begin, int *end, int i, int lo, int window)
{
    *begin = window && i - window + 1 > lo ? i - window + 1 - lo : 0;
    *end = i + 1 - lo;
}

/* Row r of the block (query head j = r / rows of the KV head's group, query i = first +
 * r % rows of its sample) sees the columns visible_keys gives of the block's keys lo ..
 * lo + keys - 1; the rest get 0. With sinks (the group's, sinks[j]) the row's max and
 * denominator include the sink's logit, and sink_prob[r] (when not NULL) gets its
 * probability. In place: scores -> probabilities. */
__global__ void causal_softmax_kernel(float *p, int rows, int keys, int first, int lo, int window,
                                      const float *sinks, float *sink_prob)
{
    size_t r = blockIdx.x;
    float *row = p + r * keys;
    int begin, end;
    visible_keys(&begin, &end, first + (int)(r % rows), lo, window);
    float m = -INFINITY;
    for (int t = begin + threadIdx.x; t < end; t += blockDim.x) m = fmaxf(m, row[t]);
    m = block_max(m);
    float sink = sinks ? sinks[r / rows] : -INFINITY;
    if (sinks && sink > m) m = sink;
    float s = 0.0f;
    for (int t = begin + threadIdx.x; t < end; t += blockDim.x) {
        float e = expf(row[t] - m);
        row[t] = e;
        s += e;
    }
    s = block_sum(s);
    float sink_exp = sinks ? expf(sink - m) : 0.0f;
    float inv = 1.0f / (s + sink_exp);
    for (int t = threadIdx.x; t < keys; t += blockDim.x)
        row[t] = t >= begin && t < end ? row[t] * inv : 0.0f;
    if (sink_prob && threadIdx.x == 0) sink_prob[r] = sink_exp * inv;
}

/* dS = P * (dP - D) per row, D = sum_t P dP (the softmax's backward), in place over dP.
 * With sink_terms, the row's term of d sink, -P_sink D, goes to sink_terms[token * nH +
 * head0 + r / rows], token = token0 + r % rows. */
__global__ void softmax_backward_kernel(float *dp, const float *p, int rows, int keys, int first,
                                        int lo, int window, const float *sink_prob,
                                        float *sink_terms, size_t token0, int nH, int head0)
{
    size_t r = blockIdx.x;
    float *drow = dp + r * keys;
    const float *prow = p + r * keys;
    int begin, end;
    visible_keys(&begin, &end, first + (int)(r % rows), lo, window);
    float d = 0.0f;
    for (int t = begin + threadIdx.x; t < end; t += blockDim.x) d += prow[t] * drow[t];
    d = block_sum(d);
    for (int t = threadIdx.x; t < keys; t += blockDim.x)
        drow[t] = t >= begin && t < end ? prow[t] * (drow[t] - d) : 0.0f;
    if (sink_terms && threadIdx.x == 0)
        sink_terms[(token0 + r % rows) * nH + head0 + r / rows] = -sink_prob[r] * d;
}

/* dsinks[h] += sum over tokens, in token order, in double, of sink_terms[n * nH + h]. */
__global__ void sink_sum_kernel(float *dsinks, const float *sink_terms, int N, int nH)
{
    int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= nH) return;
    double sum = 0.0;
    for (int n = 0; n < N; n++) sum += sink_terms[(size_t)n * nH + h];
    dsinks[h] += (float)sum;
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

/* What every block of one sample shares. Row strides: q qw = nH Dh, k kw = nKV Dh, v vw =
 * nKV Dv, out ow = nH Dv. */
struct block {
    cublasHandle_t h;
    int nH, nKV, Dh, Dv, group, qw, kw, vw, ow;
    int window;
    const float *sinks;
    size_t s0;                 /* the sample's first token */
    int first, rows, lo, keys; /* query rows [first, first + rows) read keys [lo, lo + keys) */
    float scale;
};

/* The block of rows starting at query `first` of a sample of length L. */
static void block_at(struct block *b, int first, int L)
{
    b->first = first;
    b->rows = L - first < ATTENTION_GEMM_ROWS ? L - first : ATTENTION_GEMM_ROWS;
    b->lo = block_first_key(b->window, first);
    b->keys = first + b->rows - b->lo;
}

/* P[j] (rows x keys, ld keys) = scale q_j k^T for the query heads j of KV head kv, then
 * the masked softmax (sink_prob: the sinks' probabilities, or NULL). */
static int probabilities(const struct block *b, float *p, float *sink_prob, const float *q,
                         const float *k, int kv, char *err, size_t err_size)
{
    float zero = 0.0f;
    /* column-major: P^T (keys x rows) = K (keys x Dh) Q^T; K^T and Q^T are the row-major
     * blocks as cuBLAS reads them */
    const float *kb = k + (b->s0 + b->lo) * b->kw + (size_t)kv * b->Dh;
    const float *qb = q + (b->s0 + b->first) * b->qw + (size_t)kv * b->group * b->Dh;
    cublasStatus_t st = cublasSgemmStridedBatched(
        b->h, CUBLAS_OP_T, CUBLAS_OP_N, b->keys, b->rows, b->Dh, &b->scale, kb, b->kw, 0, qb,
        b->qw, b->Dh, &zero, p, b->keys, (long long)b->rows * b->keys, b->group);
    if (failed(st, "attention scores", err, err_size)) return -1;
    causal_softmax_kernel<<<b->group * b->rows, SOFTMAX_THREADS>>>(
        p, b->rows, b->keys, b->first, b->lo, b->window,
        b->sinks ? b->sinks + (size_t)kv * b->group : NULL, sink_prob);
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

static struct block block_of(void *cublas, int nH, int nKV, int Dh, int Dv, float scale,
                             const struct attention_gemm_mask *mask)
{
    struct block b = {(cublasHandle_t)cublas, nH, nKV, Dh, Dv, nH / nKV,
                      nH * Dh, nKV * Dh, nKV * Dv, nH * Dv};
    b.window = mask ? mask->window : 0;
    b.sinks = mask ? mask->sinks : NULL;
    b.scale = scale;
    return b;
}

extern "C" int attention_gemm_forward(void *cublas, float *out, const float *q, const float *k,
                                      const float *v, const int *starts, int count, int nH,
                                      int nKV, int Dh, int Dv, float scale,
                                      const struct attention_gemm_mask *mask, void *workspace,
                                      char *err, size_t err_size)
{
    struct block b = block_of(cublas, nH, nKV, Dh, Dv, scale, mask);
    float *p = (float *)workspace, one = 1.0f, zero = 0.0f;
    for (int s = 0; s < count; s++) {
        int L = starts[s + 1] - starts[s];
        b.s0 = (size_t)starts[s];
        for (int first = 0; first < L; first += ATTENTION_GEMM_ROWS) {
            block_at(&b, first, L);
            for (int kv = 0; kv < nKV; kv++) {
                if (probabilities(&b, p, NULL, q, k, kv, err, err_size)) return -1;
                /* out_j (rows x Dv) = P_j V: column-major out^T = V^T P^T */
                const float *vb = v + (b.s0 + b.lo) * b.vw + (size_t)kv * Dv;
                float *ob = out + (b.s0 + b.first) * b.ow + (size_t)kv * b.group * Dv;
                cublasStatus_t st = cublasSgemmStridedBatched(
                    b.h, CUBLAS_OP_N, CUBLAS_OP_N, Dv, b.rows, b.keys, &one, vb, b.vw, 0, p,
                    b.keys, (long long)b.rows * b.keys, &zero, ob, b.ow, Dv, b.group);
                if (failed(st, "attention output", err, err_size)) return -1;
            }
        }
    }
    return 0;
}

extern "C" int attention_gemm_backward(void *cublas, float *dq, float *dk, float *dv,
                                       const float *dout, const float *q, const float *k,
                                       const float *v, const int *starts, int count, int nH,
                                       int nKV, int Dh, int Dv, float scale,
                                       const struct attention_gemm_mask *mask, void *workspace,
                                       char *err, size_t err_size)
{
    int N = count > 0 ? starts[count] : 0, longest = 0;
    for (int s = 0; s < count; s++)
        if (starts[s + 1] - starts[s] > longest) longest = starts[s + 1] - starts[s];
    struct block b = block_of(cublas, nH, nKV, Dh, Dv, scale, mask);
    bool sink_grad = b.sinks && mask->dsinks;
    float *p = (float *)workspace, *ds = p + score_floats(longest, b.group);
    float *sink_prob = sink_grad ? ds + score_floats(longest, b.group) : NULL;
    float *sink_terms = sink_grad ? mask->sink_terms : NULL;
    float one = 1.0f, zero = 0.0f;
    /* dk, dv are sums over the query blocks and heads that see each key */
    cudaError_t cs = cudaMemsetAsync(dk, 0, (size_t)N * b.kw * sizeof(float));
    if (cs == cudaSuccess) cs = cudaMemsetAsync(dv, 0, (size_t)N * b.vw * sizeof(float));
    if (cs != cudaSuccess) {
        snprintf(err, err_size, "attention backward: %s", cudaGetErrorString(cs));
        return -1;
    }
    for (int s = 0; s < count; s++) {
        int L = starts[s + 1] - starts[s];
        b.s0 = (size_t)starts[s];
        for (int first = 0; first < L; first += ATTENTION_GEMM_ROWS) {
            block_at(&b, first, L);
            long long block = (long long)b.rows * b.keys;
            for (int kv = 0; kv < nKV; kv++) {
                if (probabilities(&b, p, sink_prob, q, k, kv, err, err_size)) return -1;
                const float *kb = k + (b.s0 + b.lo) * b.kw + (size_t)kv * Dh;
                const float *vb = v + (b.s0 + b.lo) * b.vw + (size_t)kv * Dv;
                size_t query = (b.s0 + b.first) * b.qw + (size_t)kv * b.group * Dh;
                size_t output = (b.s0 + b.first) * b.ow + (size_t)kv * b.group * Dv;
                /* dP_j = dout_j V^T, as the scores: column-major dP^T = V dout^T */
                cublasStatus_t st = cublasSgemmStridedBatched(
                    b.h, CUBLAS_OP_T, CUBLAS_OP_N, b.keys, b.rows, Dv, &one, vb, b.vw, 0,
                    dout + output, b.ow, Dv, &zero, ds, b.keys, block, b.group);
                if (failed(st, "attention dP", err, err_size)) return -1;
                softmax_backward_kernel<<<b.group * b.rows, SOFTMAX_THREADS>>>(
                    ds, p, b.rows, b.keys, b.first, b.lo, b.window, sink_prob, sink_terms,
                    b.s0 + b.first, nH, kv * b.group);
                if (launched("attention softmax backward", err, err_size)) return -1;
                /* dq_j (rows x Dh) = scale dS_j K: column-major dq^T = K^T dS^T */
                st = cublasSgemmStridedBatched(b.h, CUBLAS_OP_N, CUBLAS_OP_N, Dh, b.rows, b.keys,
                                               &b.scale, kb, b.kw, 0, ds, b.keys, block, &zero,
                                               dq + query, b.qw, Dh, b.group);
                if (failed(st, "attention dq", err, err_size)) return -1;
                /* dk (keys x Dh) += scale sum_j dS_j^T q_j; dv (keys x Dv) += sum_j P_j^T
                 * dout_j: column-major dk^T = q_j^T dS_j, one head at a time into the same
                 * sum */
                float *dkb = dk + (b.s0 + b.lo) * b.kw + (size_t)kv * Dh;
                float *dvb = dv + (b.s0 + b.lo) * b.vw + (size_t)kv * Dv;
                for (int j = 0; j < b.group; j++) {
                    st = cublasSgemm(b.h, CUBLAS_OP_N, CUBLAS_OP_T, Dh, b.keys, b.rows, &b.scale,
                                     q + query + (size_t)j * Dh, b.qw, ds + j * block, b.keys,
                                     &one, dkb, b.kw);
                    if (failed(st, "attention dk", err, err_size)) return -1;
                    st = cublasSgemm(b.h, CUBLAS_OP_N, CUBLAS_OP_T, Dv, b.keys, b.rows, &one,
                                     dout + output + (size_t)j * Dv, b.ow, p + j * block, b.keys,
                                     &one, dvb, b.vw);
                    if (failed(st, "attention dv", err, err_size)) return -1;
                }
            }
        }
    }
    if (sink_grad && N > 0) {
        sink_sum_kernel<<<(nH + SINK_THREADS - 1) / SINK_THREADS, SINK_THREADS>>>(
            mask->dsinks, sink_terms, N, nH);
        if (launched("attention sink gradient", err, err_size)) return -1;
    }
    return 0;
}
