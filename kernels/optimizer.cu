/* optimizer: AdamW, squared-gradient sum, scale (see optimizer.h). */
#include "optimizer.h"
#include "moe_math.h"

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

enum { THREADS = 256 };

static int report(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

__global__ void adamw_kernel(float *data, float *m, float *v, const float *grad, size_t n,
                             struct adamw_coef coef)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        adamw_update(&data[i], &m[i], &v[i], grad[i], &coef);
}

extern "C" int optim_adamw(float *data, float *m, float *v, const float *grad, size_t n,
                           struct adamw_coef coef, char *err, size_t err_size)
{
    if (n == 0) return 0;
    adamw_kernel<<<launch_blocks(n, THREADS), THREADS>>>(data, m, v, grad, n, coef);
    return report("optim_adamw", err, err_size);
}

static size_t norm_chunks(size_t n) { return (n + NORM_CHUNK - 1) / NORM_CHUNK; }

/* One thread per chunk: its squares in double, in dense_math.h's order. */
__global__ void sum_squares_kernel(double *partial, const float *grad, size_t n, size_t chunks)
{
    size_t c = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    size_t end = (c + 1) * NORM_CHUNK < n ? (c + 1) * NORM_CHUNK : n;
    partial[c] = norm_chunk_squares(grad, c * NORM_CHUNK, end);
}

extern "C" size_t optim_sum_squares_workspace(size_t n)
{
    return (norm_chunks(n) > 0 ? norm_chunks(n) : 1) * sizeof(double);
}

extern "C" int optim_sum_squares(double *sum, const float *grad, size_t n, void *workspace,
                                 double *host, char *err, size_t err_size)
{
    *sum = 0.0;
    size_t chunks = norm_chunks(n);
    if (chunks == 0) return 0;
    double *partial = (double *)workspace;
    sum_squares_kernel<<<(unsigned)((chunks + THREADS - 1) / THREADS), THREADS>>>(partial, grad, n,
                                                                                  chunks);
    if (report("optim_sum_squares", err, err_size) != 0) return -1;
    cudaError_t status = cudaMemcpy(host, partial, chunks * sizeof(double), cudaMemcpyDeviceToHost);
    if (status == cudaSuccess)
        for (size_t c = 0; c < chunks; c++) *sum += host[c];
    if (status != cudaSuccess) {
        snprintf(err, err_size, "optim_sum_squares: %s", cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

__global__ void scale_kernel(float *grad, size_t n, float factor)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        grad[i] *= factor;
}

extern "C" int optim_scale(float *grad, size_t n, float factor, char *err, size_t err_size)
{
    if (n == 0) return 0;
    scale_kernel<<<launch_blocks(n, THREADS), THREADS>>>(grad, n, factor);
    return report("optim_scale", err, err_size);
}
