/* metrics: counts over a forward's outputs that the host reads, computed where the
 * logits are (C linkage; kernels/metrics.cu). */
#ifndef ESFT_KERNELS_METRICS_H
#define ESFT_KERNELS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* *correct (device memory) = the rows n of logits[N,V] with labels[n] >= 0 whose first
 * maximum (ties to the lower column, as backend.h's count_correct) is labels[n]. Returns
 * 0, or -1 with the CUDA error in err. */
int metrics_count_correct(unsigned long long *correct, const float *logits, const int32_t *labels,
                          int N, int V, char *err, size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
