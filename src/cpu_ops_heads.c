/* cpu_ops_heads: the CPU backend's ops on the head layout of the attention inputs
 * (backend.h): RoPE forward and backward in the rotate-half and the interleaved pair
 * layouts, and copy_columns, the strided copy with which MLA assembles its keys and
 * values (attention_mla.c) and splits their gradients. */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include "cpu_ops_internal.h"
#include "dense_math.h"

/* Rotates (transpose: by the opposite angle, the backward) each head's pairs. The forward
 * maps (a, b) -> (a c - b s, b c + a s); its transpose maps the gradient (da, db) ->
 * (da c + db s, db c - da s), with the forward's c and s (fp32 angle). */
static void rope_pass(float *x, const int32_t *positions, const float *inv_freq,
                      float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                      enum hf_rope_layout layout, bool transpose)
{
    int half = rotary_dim / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float cosv[512], sinv[512];
        for (int i = 0; i < half; i++)
            rope_cos_sin(&cosv[i], &sinv[i], positions[n], inv_freq[i], attention_scaling);
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + ((size_t)n * n_heads + h) * Dh;
            for (int i = 0; i < half; i++) {
                size_t a, b;
                rope_pair_at(layout == ROPE_INTERLEAVED, (size_t)i, half, &a, &b);
                if (transpose)
                    rope_rotate_transpose(&xh[a], &xh[b], cosv[i], sinv[i]);
                else
                    rope_rotate(&xh[a], &xh[b], cosv[i], sinv[i]);
            }
        }
    }
}

void cpu_rope(float *x, const int32_t *positions, const float *inv_freq, float attention_scaling,
              int N, int n_heads, int Dh, int rotary_dim, enum hf_rope_layout layout)
{
    rope_pass(x, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim, layout, false);
}

void cpu_rope_backward(float *dx, const int32_t *positions, const float *inv_freq,
                       float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                       enum hf_rope_layout layout)
{
    rope_pass(dx, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim, layout, true);
}

/* dst[r, c] (+)= src[r, c] over rows x cols, each with its own row stride. */
void cpu_copy_columns(float *dst, int dst_ld, const float *src, int src_ld, int rows, int cols,
                      bool accumulate)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        float *d = dst + (size_t)r * dst_ld;
        const float *s = src + (size_t)r * src_ld;
        if (accumulate)
            for (int c = 0; c < cols; c++) d[c] += s[c];
        else
            memcpy(d, s, (size_t)cols * sizeof(float));
    }
}
