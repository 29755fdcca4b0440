/* optimizer: AdamW, the squared-gradient sum for clipping, and the gradient scale,
 * on fp32 device buffers, C linkage. Each applies what src/optim.c applies on the host:
 * the element arithmetic is dense_math.h's, shared with it. Returns 0 or -1 with the
 * CUDA error in err.
 *
 * STATUS: ran on an NVIDIA H200 on 2026-11-26, where tests/test_device.c's comparison
 * with the CPU backend passed; it runs that comparison wherever a GPU is visible. */
#ifndef ESFT_KERNELS_OPTIMIZER_H
#define ESFT_KERNELS_OPTIMIZER_H

#include <stddef.h>

#include "dense_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One AdamW step on n elements: data, m, v updated in place from grad. */
int optim_adamw(float *data, float *m, float *v, const float *grad, size_t n,
                struct adamw_coef coef, char *err, size_t err_size);

/* Sum of grad[i]^2 over n elements, in double: a partial sum per chunk of NORM_CHUNK
 * elements (in element order within a chunk), then the chunks' sums added in chunk order
 * on the host. The chunking depends on n alone, so the value is the same on any GPU and
 * any run. workspace: optim_sum_squares_workspace(n) bytes of device memory, host as
 * many bytes of host memory (the chunks' sums are read back into it). */
size_t optim_sum_squares_workspace(size_t n);
int optim_sum_squares(double *sum, const float *grad, size_t n, void *workspace, double *host,
                      char *err, size_t err_size);

/* grad[i] *= factor (clipping). */
int optim_scale(float *grad, size_t n, float factor, char *err, size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
