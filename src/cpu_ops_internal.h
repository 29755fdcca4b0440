/* cpu_ops_internal: the CPU backend's ops that live outside cpu_ops.c (backend.h has
 * their contracts), for cpu_ops.c's op table only. */
#ifndef ESFT_CPU_OPS_INTERNAL_H
#define ESFT_CPU_OPS_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "hfconfig.h"

/* cpu_ops_heads.c: RoPE in both pair layouts, and the strided copy of columns */
void cpu_rope(float *x, const int32_t *positions, const float *inv_freq, float attention_scaling,
              int N, int n_heads, int Dh, int rotary_dim, enum hf_rope_layout layout);
void cpu_rope_backward(float *dx, const int32_t *positions, const float *inv_freq,
                       float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                       enum hf_rope_layout layout);
void cpu_copy_columns(float *dst, int dst_ld, const float *src, int src_ld, int rows, int cols,
                      bool accumulate);

#endif
