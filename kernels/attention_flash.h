/* attention_flash: causal attention within packed samples, tiled on the tensor cores
 * (bf16 operands, fp32 accumulation), forward and backward, C linkage: what the CPU
 * backend's attention and attention_backward compute (backend.h) with no window and no
 * sinks, on device pointers, for the CUDA backend's tf32 and bf16 modes. Token i attends
 * to tokens [sample_start[i], i]; query head h reads KV head h / (nH / nKV).
 *
 * The scheme is FlashAttention-2's (Dao, 2023, arXiv:2307.08691, algorithms 1 and 2):
 * no score matrix in memory; per block of 64 queries and one head, the keys in tiles of
 * 64, the scores and the output in registers, the row max and sum kept in fp32 and the
 * output rescaled as the max grows (the online softmax of Milakov and Gimelshein); the
 * row's log-sum-exp saved for the backward. The backward recomputes the probabilities
 * tile by tile: dk, dv by one block per (64 keys, KV head) looping over the query heads of
 * its group and the query tiles that see its keys, dq by one block per (64 queries,
 * head) looping over the keys; every gradient element is written once by one thread,
 * in a fixed order, with no atomics (bit-reproducible run to run). Operands are rounded
 * to bf16 as the tiles are loaded (the inputs stay fp32); products accumulate in fp32;
 * the probabilities are rounded to bf16 before they multiply V (and dout, q in the
 * backward), as FlashAttention does: about 1e-2 relative L2 error against fp32.
 *
 * Head widths: 64 and 128 (attention_flash_supports); keys and values of one width. */
#ifndef ESFT_KERNELS_ATTENTION_FLASH_H
#define ESFT_KERNELS_ATTENTION_FLASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Whether the kernels are built for head width Dh (keys and values both Dh wide). */
int attention_flash_supports(int Dh);

/* out[N, nH*Dh] from q[N, nH*Dh], k, v [N, nKV*Dh]; sample_start[N] in device memory.
 * lse: [nH, N] device floats, written with each row's natural log-sum-exp of its scaled
 * scores (log sum_j e^(scale q.k_j)), or NULL. */
int attention_flash_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                            const int32_t *sample_start, int N, int nH, int nKV, int Dh,
                            float scale, char *err, size_t err_size);

/* dq, dk, dv (written) from dout and the forward's q, k, v, out. lse: the forward's
 * [nH, N], or NULL to recompute it (one more pass over the scores, without the values).
 * workspace: attention_flash_workspace(N, nH) bytes of device memory. */
size_t attention_flash_workspace(int N, int nH);
int attention_flash_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                             const float *k, const float *v, const float *out, const float *lse,
                             const int32_t *sample_start, int N, int nH, int nKV, int Dh,
                             float scale, void *workspace, char *err, size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
