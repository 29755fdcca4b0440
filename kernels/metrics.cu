/* metrics: the evaluation counts that the host reads after a forward (see metrics.h). */
#include "metrics.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

enum { ROW_THREADS = 256 };

/* One block per row: each thread keeps the first maximum of its strided columns, then a
 * tree over the threads keeps the larger value, the lower column on ties, so the winner
 * is the row's first maximum as the CPU's left-to-right scan finds it. NaN: the CPU scan
 * never moves away from a NaN in column 0 and never moves to a NaN elsewhere. */
__global__ void count_correct_kernel(unsigned long long *correct, const float *logits,
                                     const int32_t *labels, int V)
{
    __shared__ float best_value[ROW_THREADS];
    __shared__ int best_column[ROW_THREADS];
    int row = blockIdx.x, label = labels[row];
    if (label < 0) return; /* the whole block leaves: no barrier below is reached */
    const float *x = logits + (size_t)row * V;
    float value = -INFINITY;
    int column = V; /* none yet */
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float y = x[v];
        if (isnan(y)) continue;
        if (column == V || y > value) value = y, column = v;
    }
    best_value[threadIdx.x] = value;
    best_column[threadIdx.x] = column;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            float other = best_value[threadIdx.x + half];
            int other_column = best_column[threadIdx.x + half];
            int mine = best_column[threadIdx.x];
            bool take = other_column != V &&
                        (mine == V || other > best_value[threadIdx.x] ||
                         (other == best_value[threadIdx.x] && other_column < mine));
            if (take) best_value[threadIdx.x] = other, best_column[threadIdx.x] = other_column;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        int winner = isnan(x[0]) || best_column[0] == V ? 0 : best_column[0];
        if (winner == label) atomicAdd(correct, 1ULL); /* an integer count: order-free */
    }
}

extern "C" int metrics_count_correct(unsigned long long *correct, const float *logits,
                                     const int32_t *labels, int N, int V, char *err,
                                     size_t err_size)
{
    cudaError_t status = cudaMemset(correct, 0, sizeof *correct);
    if (status == cudaSuccess && N > 0) {
        count_correct_kernel<<<N, ROW_THREADS>>>(correct, logits, labels, V);
        status = cudaGetLastError();
    }
    if (status != cudaSuccess) {
        snprintf(err, err_size, "count_correct: %s", cudaGetErrorString(status));
        return -1;
    }
    return 0;
}
