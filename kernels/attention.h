/* attention: causal attention within packed samples on the GPU, forward and backward,
 * fp32, C linkage: what the CPU backend's attention and attention_backward compute
 * (backend.h), on device pointers. Token i attends to tokens [sample_start[i], i]; query
 * head h reads KV head h / (nH / nKV).
 *
 * One warp per (query token, head) in the forward, walking the keys with an online
 * softmax (Milakov and Gimelshein's running max and sum), each lane holding Dh / 32 of
 * the output; no score matrix is stored. The backward recomputes each row's log-sum-exp
 * and D = <dout, out>, then dq with one warp per (query, head) and dk, dv with one warp
 * per (key, KV head) walking the queries that see that key: each gradient is written by
 * one warp, in a fixed order, with no atomics. A first, plain version: correct and
 * deterministic, not fast (no tiling in shared memory, no tensor cores).
 *
 * Dh <= ATTENTION_MAX_HEAD_DIM. On an NVIDIA H200 (2026-11-26) these kernels reached 3.1
 * TFLOP/s forward and 1.9 backward at 4096-token samples: correct (tests/test_device.c
 * compares them with the CPU backend) but too slow for the backend, which runs the
 * cuBLAS version below. */
#ifndef ESFT_KERNELS_ATTENTION_H
#define ESFT_KERNELS_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { ATTENTION_MAX_HEAD_DIM = 256 };

/* out[N, nH*Dh] from q[N, nH*Dh], k, v [N, nKV*Dh]; sample_start[N] in device memory. */
int attention_forward(float *out, const float *q, const float *k, const float *v,
                      const int32_t *sample_start, int N, int nH, int nKV, int Dh, float scale,
                      char *err, size_t err_size);

/* dq, dk, dv (written) from dout and the forward's q, k, v, out. workspace:
 * attention_backward_workspace(N, nH) bytes of device memory. */
size_t attention_backward_workspace(int N, int nH);
int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                       const float *k, const float *v, const float *out,
                       const int32_t *sample_start, int N, int nH, int nKV, int Dh, float scale,
                       void *workspace, char *err, size_t err_size);

/* The same two ops through cuBLAS (kernels/attention_gemm.cu), what the CUDA backend
 * runs: per sample, per block of at most ATTENTION_GEMM_ROWS query rows, per KV head,
 * the scores of the block's query heads against the keys they see (a strided-batched
 * GEMM, the KV head's keys shared by stride 0), the causal softmax in place (a row
 * kernel), then out = P V (a second GEMM). The backward recomputes P the same way and
 * forms dP = dout V^T, dS = P (dP - rowsum(P dP)), dq = scale dS K (written), and
 * dk += scale dS^T q, dv += P^T dout over the heads of the group (dk, dv zeroed first);
 * every product fp32 (CUBLAS's default math mode of the handle). Scores of one block are
 * in the workspace, never all at once: attention_gemm_workspace(longest sample, nH, nKV)
 * bytes of device memory serve both directions.
 *
 * Widths: q, k [N, n*Dh], v [N, nKV*Dv], out [N, nH*Dv] (MLA's value width Dv differs
 * from its query-key width Dh). mask (NULL: none) adds backend.h's struct
 * attention_mask's sliding window (a block's scores start at its first query's earliest
 * visible key) and gpt_oss's sinks (a logit per query head in each row's max and
 * denominator, its probability dropped); the backward adds d loss / d sinks[h] = -sum_i
 * P_sink(i) rowsum(P dP)_i to dsinks[h], each (query, head)'s term kept in sink_terms
 * [N * nH] (device memory) and summed per head in token order (in double), so the sum
 * does not depend on the launch.
 *
 * The value width, windows and sinks came later and passed test_device's comparison with
 * the CPU backend on an H100 on 2026-11-26 (group attention-mask).
 *
 * Samples in HOST memory: attention_gemm_samples turns sample_start[N] (copied back)
 * into starts[count + 1] (starts[count] = N; room for N + 1) and the longest length. */
enum { ATTENTION_GEMM_ROWS = 1024 };
struct attention_gemm_mask {
    int window;         /* 0: none; W > 0: query i sees keys i - W < j <= i of its sample */
    const float *sinks; /* [nH] or NULL */
    float *dsinks;      /* [nH], added to by the backward, or NULL */
    float *sink_terms;  /* [N * nH] scratch of the backward with dsinks */
};
int attention_gemm_samples(const int32_t *host_sample_start, int N, int *starts, int *longest);
size_t attention_gemm_workspace(int longest, int nH, int nKV);
int attention_gemm_forward(void *cublas, float *out, const float *q, const float *k, const float *v,
                           const int *starts, int count, int nH, int nKV, int Dh, int Dv,
                           float scale, const struct attention_gemm_mask *mask, void *workspace,
                           char *err, size_t err_size);
int attention_gemm_backward(void *cublas, float *dq, float *dk, float *dv, const float *dout,
                            const float *q, const float *k, const float *v, const int *starts,
                            int count, int nH, int nKV, int Dh, int Dv, float scale,
                            const struct attention_gemm_mask *mask, void *workspace, char *err,
                            size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
