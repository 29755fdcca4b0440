/* gemm: cuBLAS GEMMs of the linear layers (see gemm.h). Never run on a GPU yet: compiled
 * and linked only. */
#include "gemm.h"
#include "dense.h"
#include "gemm_math.h"
#include "moe_math.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

struct gemm_context {
    cublasHandle_t handle;
};

static int cublas_failed(cublasStatus_t status, const char *what, char *err, size_t err_size)
{
    if (status == CUBLAS_STATUS_SUCCESS) return 0;
    snprintf(err, err_size, "%s: %s (%s)", what, cublasGetStatusName(status),
             cublasGetStatusString(status));
    return -1;
}

static int cuda_failed(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

extern "C" struct gemm_context *gemm_create(char *err, size_t err_size)
{
    struct gemm_context *ctx = (struct gemm_context *)calloc(1, sizeof *ctx);
    if (!ctx) {
        snprintf(err, err_size, "gemm_create: out of host memory");
        return NULL;
    }
    if (cublas_failed(cublasCreate(&ctx->handle), "cublasCreate", err, err_size) ||
        /* fp32 operands stay fp32: no TF32 unless asked for */
        cublas_failed(cublasSetMathMode(ctx->handle, CUBLAS_DEFAULT_MATH), "cublasSetMathMode", err,
                      err_size)) {
        if (ctx->handle) cublasDestroy(ctx->handle);
        free(ctx);
        return NULL;
    }
    return ctx;
}

extern "C" void gemm_destroy(struct gemm_context *ctx)
{
    if (!ctx) return;
    cublasDestroy(ctx->handle);
    free(ctx);
}

static size_t element_size(enum gemm_type type) { return type == GEMM_BF16 ? 2 : 4; }
static cudaDataType_t cuda_type(enum gemm_type type)
{
    return type == GEMM_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* One planned product: C (fp32) = op(A) op(B) + beta C. */
static int run_plan(struct gemm_context *ctx, struct gemm_plan p, const void *a, const void *b,
                    float *c, float beta, enum gemm_type type, const char *what, char *err,
                    size_t err_size)
{
    if (p.m == 0 || p.n == 0) return 0;
    const float alpha = 1.0f;
    float zero = 0.0f;
    if (p.k == 0) { /* an empty sum: C = beta C */
        if (beta == 1.0f) return 0;
        return cublas_failed(cublasSscal(ctx->handle, p.m * p.n, &zero, c, 1), what, err, err_size);
    }
    cublasStatus_t status = cublasGemmEx(
        ctx->handle, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
        p.m, p.n, p.k, &alpha, a, cuda_type(type), p.lda, b, cuda_type(type), p.ldb, &beta, c,
        CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return cublas_failed(status, what, err, err_size);
}

enum { THREADS = 256 };

__global__ void add_bias_kernel(float *y, const float *bias, int N, int O)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)N * O;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % O];
}

extern "C" int gemm_linear(struct gemm_context *ctx, float *y, const void *x, const void *w,
                           const float *bias, int N, int I, int O, int accumulate,
                           enum gemm_type type, char *err, size_t err_size)
{
    if (run_plan(ctx, gemm_plan_of(GEMM_FORWARD, N, I, O), w, x, y, accumulate ? 1.0f : 0.0f, type,
                 "gemm_linear", err, err_size))
        return -1;
    if (bias && (size_t)N * O > 0) {
        add_bias_kernel<<<launch_blocks((size_t)N * O, THREADS), THREADS>>>(y, bias, N, O);
        return cuda_failed("gemm_linear bias", err, err_size);
    }
    return 0;
}

extern "C" size_t gemm_bias_workspace(int N, int O) { return dense_column_sums_workspace(N, O); }

extern "C" int gemm_linear_backward(struct gemm_context *ctx, float *dx, float *dw, float *dbias,
                                    const void *dy, const void *x, const void *w, int N, int I,
                                    int O, int accumulate_dx, enum gemm_type type,
                                    void *workspace, char *err, size_t err_size)
{
    if (dx && run_plan(ctx, gemm_plan_of(GEMM_INPUT_GRAD, N, I, O), w, dy, dx,
                       accumulate_dx ? 1.0f : 0.0f, type, "gemm_linear_backward dx", err, err_size))
        return -1;
    if (dw && run_plan(ctx, gemm_plan_of(GEMM_WEIGHT_GRAD, N, I, O), x, dy, dw, 1.0f, type,
                       "gemm_linear_backward dw", err, err_size))
        return -1;
    if (dbias && N > 0) {
        if (type != GEMM_F32) {
            snprintf(err, err_size, "gemm_linear_backward: a bias gradient needs fp32 dy");
            return -1;
        }
        return dense_column_sums(dbias, (const float *)dy, N, O, workspace, err, err_size);
    }
    return 0;
}

/* Row r of a row-major matrix with `cols` columns of the given type. */
static const void *row_of(const void *base, size_t r, int cols, enum gemm_type type)
{
    return (const char *)base + r * (size_t)cols * element_size(type);
}

extern "C" int gemm_grouped_linear(struct gemm_context *ctx, float *y, const void *x, const void *w,
                                   const int32_t *offsets, int E, int I, int O,
                                   enum gemm_type type, char *err, size_t err_size)
{
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        const void *we = row_of(w, (size_t)e * O, I, type);
        if (run_plan(ctx, gemm_plan_of(GEMM_FORWARD, rows, I, O), we, row_of(x, offsets[e], I, type),
                     y + (size_t)offsets[e] * O, 0.0f, type, "gemm_grouped_linear", err, err_size))
            return -1;
    }
    return 0;
}

extern "C" int gemm_grouped_linear_backward(struct gemm_context *ctx, float *dx, float *const *dw,
                                            const void *dy, const void *x, const void *w,
                                            const int32_t *offsets, int E, int I, int O,
                                            enum gemm_type type, char *err, size_t err_size)
{
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        const void *we = row_of(w, (size_t)e * O, I, type);
        const void *dye = row_of(dy, offsets[e], O, type), *xe = row_of(x, offsets[e], I, type);
        if (dx && run_plan(ctx, gemm_plan_of(GEMM_INPUT_GRAD, rows, I, O), we, dye,
                           dx + (size_t)offsets[e] * I, 0.0f, type, "gemm_grouped_linear_backward dx",
                           err, err_size))
            return -1;
        if (dw && dw[e] && run_plan(ctx, gemm_plan_of(GEMM_WEIGHT_GRAD, rows, I, O), xe, dye, dw[e],
                                    1.0f, type, "gemm_grouped_linear_backward dw", err, err_size))
            return -1;
    }
    return 0;
}
