/* dense: CUDA kernels of the dense ops (embedding, RMSNorm, RoPE, residual add, clamp,
 * fused cross-entropy), forward and backward, fp32, C linkage. Each computes what the
 * CPU backend's op of the same name computes (backend.h), on device pointers, on the
 * current stream (0), and returns 0 or -1 with the CUDA error in err. Element arithmetic
 * shared with the CPU backend: dense_math.h.
 *
 * STATUS: ran on an NVIDIA H200 on 2026-11-26, where tests/test_device.c's comparison
 * with the CPU backend passed; it runs that comparison wherever a GPU is visible. The
 * interleaved RoPE pairs and the chunked cross-entropy (ce_chunk_*), which came later,
 * passed it on an H100 the same day (test_device groups dense, ce-chunks). */
#ifndef ESFT_KERNELS_DENSE_H
#define ESFT_KERNELS_DENSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* x[N,H] = table[tokens[n], :] */
int dense_embedding(float *x, const int32_t *tokens, const float *table, int N, int H, char *err,
                    size_t err_size);

/* dtable[V,H] += dx[n] at row tokens[n], in token order: one thread per column, so each
 * element's sum runs in the CPU backend's order (bit for bit equal to it). */
int dense_embedding_backward(float *dtable, const float *dx, const int32_t *tokens, int N, int H,
                             char *err, size_t err_size);

/* y[R,D] = w * x / sqrt(mean(x^2) + eps) per row, rstd[R] = the 1/rms (may be NULL). One
 * block per row; y may alias x. */
int dense_rmsnorm(float *y, float *rstd, const float *x, const float *w, int R, int D, float eps,
                  char *err, size_t err_size);

/* dx[R,D] (+)= the input gradient (dx may be NULL; may alias dy without accumulate_dx);
 * dw[D] += sum over rows of dy * x * rstd (dw may be NULL: frozen), summed per chunk of
 * SUM_CHUNK rows then over chunks in order, as the CPU backend does (equal to it up to
 * nvcc's fused multiply-adds). workspace: dense_rmsnorm_workspace(R, D) bytes of device memory when dw is set. */
size_t dense_rmsnorm_workspace(int R, int D);
int dense_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                           const float *rstd, int R, int D, int accumulate_dx, void *workspace,
                           char *err, size_t err_size);

/* sum[D] += the column sums of x[R,D], per chunk of SUM_CHUNK rows then over the chunks
 * in order (the CPU backend's partition for bias gradients). workspace:
 * dense_column_sums_workspace(R, D) bytes of device memory. */
size_t dense_column_sums_workspace(int R, int D);
int dense_column_sums(float *sum, const float *x, int R, int D, void *workspace, char *err,
                      size_t err_size);

/* In place on x[N, n_heads, Dh] (Dh the head's stride): RoPE over the first rotary_dim
 * dims of each head, pairs rotate-half (interleaved 0) or consecutive (interleaved 1,
 * deepseek's), and its transpose (backward). inv_freq[rotary_dim/2] in device memory. */
int dense_rope(float *x, const int32_t *positions, const float *inv_freq, float attention_scaling,
               int N, int n_heads, int Dh, int rotary_dim, int interleaved, int backward,
               char *err, size_t err_size);

/* y[i] = x[i] + r[i] */
int dense_add(float *y, const float *x, const float *r, size_t count, char *err, size_t err_size);

/* x[i] = min(max(x[i], low), high) in place; backward: dx[i] = 0 where y[i] sits at a bound. */
int dense_clamp(float *x, size_t count, float low, float high, char *err, size_t err_size);
int dense_clamp_backward(float *dx, const float *y, size_t count, float low, float high,
                         char *err, size_t err_size);

/* Cross-entropy of logits[N,V] against labels[N] (-100 = ignored), fused with its
 * gradient: row_loss[N] (device, double) gets each counted row's -log softmax[label] and
 * 0 for ignored rows; when dlogits is not NULL it gets scale * (softmax - onehot) (0 on
 * ignored rows), and may be the logits buffer itself, so no probability tensor is kept.
 * One block per row. The caller sums row_loss in row order (dense_sum_rows). */
int dense_cross_entropy(double *row_loss, float *dlogits, const float *logits,
                        const int32_t *labels, int N, int V, float scale, char *err,
                        size_t err_size);

/* Host side of the loss: downloads row_loss[N] and labels[N] into host_loss[N] and
 * host_labels[N] (the caller's host memory), returns the sum of the counted rows in row
 * order (the CPU backend's sum) and their count. -1 on a copy error. */
int dense_sum_rows(double *total, long long *counted, const double *row_loss,
                   const int32_t *labels, int N, double *host_loss, int32_t *host_labels,
                   char *err, size_t err_size);

/* The vocabulary-chunked cross-entropy of backend.h (ce_chunk_update, ce_chunk_backward):
 * state[N, 4] (running max, running sum of exp(z - max), the label's logit, the best
 * logit) and best[N] folded from the chunk logits[N, C] of ids [v0, v0 + C), one block a
 * token; the backward's scale * (softmax - onehot) of the chunk from the final state
 * (dlogits may be logits). The loss itself is summed on the host (cuda_ops.c). */
int dense_ce_chunk_update(float *state, int32_t *best, const float *logits, const int32_t *labels,
                          int N, int C, int v0, char *err, size_t err_size);
int dense_ce_chunk_backward(float *dlogits, const float *logits, const float *state,
                            const int32_t *labels, int N, int C, int v0, float scale, char *err,
                            size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
