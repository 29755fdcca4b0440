/* cpu_ops_moe: the CPU backend's ops of gpt_oss's experts (see backend.h): the clamped
 * GLU activation and the per-expert output bias, forward and backward; and DenseMixer's
 * row dots. The element
 * formulas live in kernels/moe_math.h, shared with the CUDA kernels. Called through
 * cpu_ops.c's op table only. */
#include <stdlib.h>

#include "cpu_ops_internal.h"
#include "moe_math.h"

/* h[count] = glu_clamped(gate, up): element by element, so any thread split gives the
 * same bits. */
void cpu_glu_clamped(float *h, const float *gate, const float *up, size_t count, float alpha,
                     float limit)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) h[i] = glu_clamped(gate[i], up[i], alpha, limit);
}

void cpu_glu_clamped_backward(float *dgate, float *dup, const float *dh, const float *gate,
                              const float *up, size_t count, float alpha, float limit)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++)
        glu_clamped_backward(&dgate[i], &dup[i], dh[i], gate[i], up[i], alpha, limit);
}

/* y[rows, O] += bias[e] on expert e's rows [offsets[e], offsets[e+1]); the rows are
 * independent, so they split over threads freely. */
void cpu_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O)
{
    for (int e = 0; e < E; e++) {
        const float *be = bias + (size_t)e * O;
#pragma omp parallel for schedule(static)
        for (int r = offsets[e]; r < offsets[e + 1]; r++) {
            float *yr = y + (size_t)r * O;
            for (int o = 0; o < O; o++) yr[o] += be[o];
        }
    }
}

/* dbias[e][o] += sum of dy[r, o] over expert e's rows, in row order, in fp32 from 0 and
 * then added. Work items: (expert, block of BIAS_COLUMN_BLOCK columns), each summing all
 * its expert's rows for its columns, so the summation order does not depend on the thread
 * count. */
enum { BIAS_COLUMN_BLOCK = 256 };

void cpu_grouped_bias_backward(float *const *dbias, const float *dy, const int32_t *offsets, int E,
                               int O)
{
    int blocks = (O + BIAS_COLUMN_BLOCK - 1) / BIAS_COLUMN_BLOCK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < E * blocks; it++) {
        int e = it / blocks, first = (it % blocks) * BIAS_COLUMN_BLOCK;
        if (!dbias[e]) continue;
        int columns = O - first < BIAS_COLUMN_BLOCK ? O - first : BIAS_COLUMN_BLOCK;
        float sum[BIAS_COLUMN_BLOCK] = {0};
        for (int r = offsets[e]; r < offsets[e + 1]; r++) {
            const float *dyr = dy + (size_t)r * O + first;
            for (int c = 0; c < columns; c++) sum[c] += dyr[c];
        }
        for (int c = 0; c < columns; c++) dbias[e][first + c] += sum[c];
    }
}

/* out[n * out_ld] = <x[n], y[n]>, each row summed in fp32 in column order. */
void cpu_row_dots(float *out, int out_ld, const float *x, const float *y, int N, int H)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * H, *yr = y + (size_t)n * H;
        float sum = 0.0f;
        for (int h = 0; h < H; h++) sum += xr[h] * yr[h];
        out[(size_t)n * out_ld] = sum;
    }
}
