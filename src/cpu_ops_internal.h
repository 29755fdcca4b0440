/* cpu_ops_internal: the CPU backend's ops that live outside cpu_ops.c (backend.h has
 * their contracts), for cpu_ops.c's op table only. */
#ifndef ESFT_CPU_OPS_INTERNAL_H
#define ESFT_CPU_OPS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hfconfig.h"
#include "log.h"

struct attention_mask; /* backend.h */

/* The ops' kept scratch (log.h's struct kept), sized at its first growth for the most
 * tokens and rows backend.h's reserve announced: cpu_most_tokens(n) and cpu_most_rows(n)
 * are the larger of n and those; cpu_op_scratch returns k's buffer of at least `bytes`,
 * grown to `most` bytes when it grows. */
size_t cpu_most_tokens(size_t n);
size_t cpu_most_rows(size_t n);
void *cpu_op_scratch(struct kept *k, size_t bytes, size_t most);

/* cpu_attention.c: attention and its backward, tiled over the keys */
void cpu_attention(float *out, const float *q, const float *k, const float *v,
                   const struct attention_mask *mask, int N, int nH, int nKV, int Dh, int Dv,
                   float scale);
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *out,
                            const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                            int Dv, float scale);

/* cpu_ops_heads.c: RoPE in both pair layouts, and the strided copy of columns */
void cpu_rope(float *x, const int32_t *positions, const float *inv_freq, float attention_scaling,
              int N, int n_heads, int Dh, int rotary_dim, enum hf_rope_layout layout);
void cpu_rope_backward(float *dx, const int32_t *positions, const float *inv_freq,
                       float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                       enum hf_rope_layout layout);
void cpu_copy_columns(float *dst, int dst_ld, const float *src, int src_ld, int rows, int cols,
                      bool accumulate);

/* cpu_ops_moe.c: gpt_oss's clamped GLU and per-expert biases; DenseMixer's row dots */
void cpu_glu_clamped(float *h, const float *gate, const float *up, size_t count, float alpha,
                     float limit);
void cpu_glu_clamped_backward(float *dgate, float *dup, const float *dh, const float *gate,
                              const float *up, size_t count, float alpha, float limit);
void cpu_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O);
void cpu_grouped_bias_backward(float *const *dbias, const float *dy, const int32_t *offsets,
                               int E, int O);
void cpu_row_dots(float *out, int out_ld, const float *x, const float *y, int N, int H);

#endif
