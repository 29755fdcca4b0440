/* gemm: cuBLAS GEMMs of the linear layers (see gemm.h). */
#include "gemm.h"
#include "dense.h"
#include "gemm_math.h"
#include "moe_math.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The arguments of one cublasGemmGroupedBatchedEx call, one group per product (each group
 * holds one matrix product of its own shape): host arrays, and the A, B, C pointer arrays
 * that cuBLAS reads from device memory. Sized by the largest call so far, so a step loop
 * of the same shapes allocates nothing after its first step. */
struct grouped_call {
    int capacity, count;
    cublasOperation_t *trans_a, *trans_b;
    int *m, *n, *k, *lda, *ldb, *ldc, *group_size;
    float *alpha, *beta;
    const void **a, **b; /* host copies of the pointers */
    void **c;
    void **device_pointers; /* [3 * capacity]: A's, then B's, then C's */
};

struct gemm_context {
    cublasHandle_t handle;
    int tf32; /* fp32 products on TF32 tensor cores (gemm_set_tf32) */
    struct grouped_call grouped;
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

static int cuda_status_failed(cudaError_t status, const char *what, char *err, size_t err_size)
{
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

static void grouped_call_free(struct grouped_call *g)
{
    free(g->trans_a), free(g->trans_b), free(g->m), free(g->n), free(g->k), free(g->lda);
    free(g->ldb), free(g->ldc), free(g->group_size), free(g->alpha), free(g->beta);
    free(g->a), free(g->b), free(g->c);
    if (g->device_pointers) cudaFree(g->device_pointers);
    memset(g, 0, sizeof *g);
}

extern "C" void gemm_destroy(struct gemm_context *ctx)
{
    if (!ctx) return;
    grouped_call_free(&ctx->grouped);
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
    if (p.k == 0) { /* an empty sum: C = beta C */
        if (beta == 1.0f) return 0;
        if (beta == 0.0f) { /* beta = 0: C is not read, so NaN in it must not survive */
            cudaStream_t stream;
            if (cublas_failed(cublasGetStream(ctx->handle, &stream), what, err, err_size))
                return -1;
            return cuda_status_failed(cudaMemset2DAsync(c, (size_t)p.ldc * sizeof(float), 0,
                                                        (size_t)p.m * sizeof(float), (size_t)p.n,
                                                        stream),
                                      what, err, err_size);
        }
        /* every plan of gemm_math.h has ldc == m: C is one contiguous block */
        return cublas_failed(cublasSscal(ctx->handle, p.m * p.n, &beta, c, 1), what, err, err_size);
    }
    cublasStatus_t status = cublasGemmEx(
        ctx->handle, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
        p.m, p.n, p.k, &alpha, a, cuda_type(type), p.lda, b, cuda_type(type), p.ldb, &beta, c,
        CUDA_R_32F, p.ldc,
        type == GEMM_F32 && ctx->tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT);
    return cublas_failed(status, what, err, err_size);
}

extern "C" int gemm_set_tf32(struct gemm_context *ctx, int on, char *err, size_t err_size)
{
    ctx->tf32 = on;
    return cublas_failed(cublasSetMathMode(ctx->handle, on ? CUBLAS_TF32_TENSOR_OP_MATH
                                                           : CUBLAS_DEFAULT_MATH),
                         "cublasSetMathMode", err, err_size);
}

/* Element conversions: fp32 to bf16 by round-to-nearest-even, bf16 to fp32 (exact). */
__device__ __forceinline__ void convert(__nv_bfloat16 *out, float in) { *out = __float2bfloat16_rn(in); }
__device__ __forceinline__ void convert(float *out, __nv_bfloat16 in) { *out = __bfloat162float(in); }

template <typename To, typename From>
__global__ void convert_kernel(To *out, const From *in, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        convert(&out[i], in[i]);
}

template <typename To, typename From>
static int convert_array(To *out, const From *in, size_t n, const char *what, char *err,
                         size_t err_size)
{
    if (n == 0) return 0;
    size_t blocks = (n + 255) / 256;
    convert_kernel<<<(unsigned)(blocks < 65535 * 16 ? blocks : 65535 * 16), 256>>>(out, in, n);
    return cuda_status_failed(cudaGetLastError(), what, err, err_size);
}

extern "C" int gemm_to_bf16(void *out, const float *in, size_t n, char *err, size_t err_size)
{
    return convert_array((__nv_bfloat16 *)out, in, n, "gemm_to_bf16", err, err_size);
}

extern "C" int gemm_from_bf16(float *out, const void *in, size_t n, char *err, size_t err_size)
{
    return convert_array(out, (const __nv_bfloat16 *)in, n, "gemm_from_bf16", err, err_size);
}

extern "C" void *gemm_cublas(struct gemm_context *ctx)
{
    return ctx->handle;
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

/* ---- Grouped GEMMs in one cuBLAS call (cublasGemmGroupedBatchedEx) ---- */

/* Makes room for `count` groups; the arrays keep their contents up to the old capacity
 * (they are rewritten by each call anyway). */
static int grouped_reserve(struct grouped_call *g, int count, char *err, size_t err_size)
{
    if (count <= g->capacity) return 0;
    grouped_call_free(g);
    size_t n = (size_t)count;
    g->trans_a = (cublasOperation_t *)malloc(n * sizeof *g->trans_a);
    g->trans_b = (cublasOperation_t *)malloc(n * sizeof *g->trans_b);
    g->m = (int *)malloc(n * sizeof(int)), g->n = (int *)malloc(n * sizeof(int));
    g->k = (int *)malloc(n * sizeof(int)), g->lda = (int *)malloc(n * sizeof(int));
    g->ldb = (int *)malloc(n * sizeof(int)), g->ldc = (int *)malloc(n * sizeof(int));
    g->group_size = (int *)malloc(n * sizeof(int));
    g->alpha = (float *)malloc(n * sizeof(float)), g->beta = (float *)malloc(n * sizeof(float));
    g->a = (const void **)malloc(n * sizeof(void *)), g->b = (const void **)malloc(n * sizeof(void *));
    g->c = (void **)malloc(n * sizeof(void *));
    if (!g->trans_a || !g->trans_b || !g->m || !g->n || !g->k || !g->lda || !g->ldb || !g->ldc ||
        !g->group_size || !g->alpha || !g->beta || !g->a || !g->b || !g->c) {
        grouped_call_free(g);
        snprintf(err, err_size, "grouped GEMM: out of host memory for %d groups", count);
        return -1;
    }
    if (cuda_status_failed(cudaMalloc((void **)&g->device_pointers, 3 * n * sizeof(void *)),
                           "grouped GEMM pointer arrays", err, err_size)) {
        g->device_pointers = NULL;
        grouped_call_free(g);
        return -1;
    }
    g->capacity = count;
    return 0;
}

/* Appends one product to the call. Empty products are left out (cuBLAS is not asked about
 * m, n = 0), and a product with k = 0 (an empty sum) is done at once by run_plan, which
 * writes beta C without a GEMM. */
static int grouped_add(struct gemm_context *ctx, struct gemm_plan p, const void *a, const void *b,
                       void *c, float beta, enum gemm_type type, const char *what, char *err,
                       size_t err_size)
{
    if (p.m == 0 || p.n == 0) return 0;
    if (p.k == 0) return run_plan(ctx, p, a, b, (float *)c, beta, type, what, err, err_size);
    struct grouped_call *g = &ctx->grouped;
    int i = g->count++;
    g->trans_a[i] = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    g->trans_b[i] = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    g->m[i] = p.m, g->n[i] = p.n, g->k[i] = p.k;
    g->lda[i] = p.lda, g->ldb[i] = p.ldb, g->ldc[i] = p.ldc;
    g->group_size[i] = 1, g->alpha[i] = 1.0f, g->beta[i] = beta;
    g->a[i] = a, g->b[i] = b, g->c[i] = c;
    return 0;
}

/* Issues the products collected since the last call: one pointer upload (stream-ordered
 * on the handle's stream; a pageable source is staged before the copy returns, so the
 * host arrays may be reused at once) and one cublasGemmGroupedBatchedEx. */
static int grouped_run(struct gemm_context *ctx, enum gemm_type type, enum gemm_type c_type,
                       const char *what, char *err, size_t err_size)
{
    struct grouped_call *g = &ctx->grouped;
    int count = g->count;
    g->count = 0;
    if (count == 0) return 0;
    cudaStream_t stream;
    if (cublas_failed(cublasGetStream(ctx->handle, &stream), what, err, err_size)) return -1;
    size_t bytes = (size_t)count * sizeof(void *);
    void **dev_a = g->device_pointers, **dev_b = dev_a + g->capacity, **dev_c = dev_b + g->capacity;
    if (cuda_status_failed(cudaMemcpyAsync(dev_a, g->a, bytes, cudaMemcpyHostToDevice, stream),
                           what, err, err_size) ||
        cuda_status_failed(cudaMemcpyAsync(dev_b, g->b, bytes, cudaMemcpyHostToDevice, stream),
                           what, err, err_size) ||
        cuda_status_failed(cudaMemcpyAsync(dev_c, g->c, bytes, cudaMemcpyHostToDevice, stream),
                           what, err, err_size))
        return -1;
    cublasStatus_t status = cublasGemmGroupedBatchedEx(
        ctx->handle, g->trans_a, g->trans_b, g->m, g->n, g->k, g->alpha,
        (const void *const *)dev_a, cuda_type(type), g->lda, (const void *const *)dev_b,
        cuda_type(type), g->ldb, g->beta, dev_c, cuda_type(c_type), g->ldc, count, g->group_size,
        type == GEMM_F32 && ctx->tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
    return cublas_failed(status, what, err, err_size);
}

extern "C" int gemm_grouped_linear_batched(struct gemm_context *ctx, void *y, enum gemm_type y_type,
                                           const void *x, const void *w, const int32_t *offsets,
                                           int E, int I, int O, enum gemm_type type, char *err,
                                           size_t err_size)
{
    const char *what = "gemm_grouped_linear_batched";
    if (y_type == GEMM_BF16 && type != GEMM_BF16) {
        snprintf(err, err_size, "%s: bf16 output needs bf16 operands", what);
        return -1;
    }
    if (I == 0) { /* every product an empty sum: y = 0, whatever its type */
        cudaStream_t stream;
        if (cublas_failed(cublasGetStream(ctx->handle, &stream), what, err, err_size)) return -1;
        size_t bytes = (size_t)(offsets[E] - offsets[0]) * O * element_size(y_type);
        return cuda_status_failed(
            cudaMemsetAsync((char *)y + (size_t)offsets[0] * O * element_size(y_type), 0, bytes,
                            stream),
            what, err, err_size);
    }
    if (grouped_reserve(&ctx->grouped, E, err, err_size)) return -1;
    ctx->grouped.count = 0;
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        if (grouped_add(ctx, gemm_plan_of(GEMM_FORWARD, rows, I, O), row_of(w, (size_t)e * O, I, type),
                        row_of(x, offsets[e], I, type),
                        (char *)y + (size_t)offsets[e] * O * element_size(y_type), 0.0f, type, what,
                        err, err_size))
            return -1;
    }
    return grouped_run(ctx, type, y_type, what, err, err_size);
}

extern "C" int gemm_grouped_linear_backward_batched(struct gemm_context *ctx, float *dx,
                                                    float *const *dw, const void *dy, const void *x,
                                                    const void *w, const int32_t *offsets, int E,
                                                    int I, int O, enum gemm_type type, char *err,
                                                    size_t err_size)
{
    const char *what = "gemm_grouped_linear_backward_batched";
    if (grouped_reserve(&ctx->grouped, 2 * E, err, err_size)) return -1;
    ctx->grouped.count = 0;
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        const void *we = row_of(w, (size_t)e * O, I, type);
        const void *dye = row_of(dy, offsets[e], O, type), *xe = row_of(x, offsets[e], I, type);
        if (dx && grouped_add(ctx, gemm_plan_of(GEMM_INPUT_GRAD, rows, I, O), we, dye,
                              dx + (size_t)offsets[e] * I, 0.0f, type, what, err, err_size))
            return -1;
        if (dw && dw[e] && grouped_add(ctx, gemm_plan_of(GEMM_WEIGHT_GRAD, rows, I, O), xe, dye,
                                       dw[e], 1.0f, type, what, err, err_size))
            return -1;
    }
    return grouped_run(ctx, type, GEMM_F32, what, err, err_size);
}

/* The products of gemm_grouped_linear_bf16 (input_grad 0) or gemm_grouped_linear_dx_bf16
 * (1): one group per expert with rows and a bf16 weight, bf16 output. */
static int grouped_bf16(struct gemm_context *ctx, int input_grad, void *out, const void *in,
                        const void *const *w, const int32_t *offsets, int E, int I, int O,
                        const char *what, char *err, size_t err_size)
{
    if (grouped_reserve(&ctx->grouped, E, err, err_size)) return -1;
    ctx->grouped.count = 0;
    int in_cols = input_grad ? O : I, out_cols = input_grad ? I : O;
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0 || !w[e]) continue;
        struct gemm_plan p = gemm_plan_of(input_grad ? GEMM_INPUT_GRAD : GEMM_FORWARD, rows, I, O);
        if (grouped_add(ctx, p, w[e], row_of(in, offsets[e], in_cols, GEMM_BF16),
                        (char *)out + (size_t)offsets[e] * out_cols * 2, 0.0f, GEMM_BF16, what, err,
                        err_size))
            return -1;
    }
    return grouped_run(ctx, GEMM_BF16, GEMM_BF16, what, err, err_size);
}

extern "C" int gemm_grouped_linear_bf16(struct gemm_context *ctx, void *y, const void *x,
                                        const void *const *w, const int32_t *offsets, int E, int I,
                                        int O, char *err, size_t err_size)
{
    return grouped_bf16(ctx, 0, y, x, w, offsets, E, I, O, "gemm_grouped_linear_bf16", err,
                        err_size);
}

extern "C" int gemm_grouped_linear_dx_bf16(struct gemm_context *ctx, void *dx, const void *dy,
                                           const void *const *w, const int32_t *offsets, int E,
                                           int I, int O, char *err, size_t err_size)
{
    return grouped_bf16(ctx, 1, dx, dy, w, offsets, E, I, O, "gemm_grouped_linear_dx_bf16", err,
                        err_size);
}
