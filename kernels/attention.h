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
 * Dh <= ATTENTION_MAX_HEAD_DIM. STATUS: compiled and linked in the CUDA build; never run
 * on a GPU (no GPU has been lent to this project's sessions yet). tests/test_device.c
 * compares both with the CPU backend where a GPU is visible. */
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

#ifdef __cplusplus
}
#endif

#endif
