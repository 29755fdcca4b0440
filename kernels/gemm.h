/* gemm: the linear layers' GEMMs on cuBLAS (fp32 accumulation; operands fp32 or bf16),
 * dense and grouped by expert, forward and backward, C linkage. Each computes what the
 * CPU backend's op of the same name computes (backend.h: linear, linear_backward,
 * grouped_linear, grouped_linear_backward), on device pointers, and returns 0 or -1 with
 * the cuBLAS or CUDA error in err. The row-major to column-major mapping: gemm_math.h.
 *
 * Grouped GEMMs take the experts' row offsets in HOST memory (the permutation's offsets,
 * copied back: E + 1 integers) and issue one GEMM per expert with rows; experts without
 * rows cost nothing, and frozen experts (dw[e] NULL) no weight-gradient GEMM. The
 * *_batched forms compute the same in one cublasGemmGroupedBatchedEx call (one group per
 * expert with rows, since each expert's product has its own shape) instead of one cuBLAS
 * call per expert; tests/bench/bench_kernels times and compares the two.
 *
 * STATUS: ran on an NVIDIA H200 on 2026-11-26, where tests/test_device.c's comparison
 * with the CPU backend passed; it runs that comparison wherever a GPU is visible. */
#ifndef ESFT_KERNELS_GEMM_H
#define ESFT_KERNELS_GEMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The element type of the x / w / dy operands; outputs (y, dx, dw) and accumulation are
 * fp32 either way. */
enum gemm_type { GEMM_F32, GEMM_BF16 };

struct gemm_context; /* a cuBLAS handle and its workspace */

/* NULL with the reason in err when cuBLAS cannot start. */
struct gemm_context *gemm_create(char *err, size_t err_size);
void gemm_destroy(struct gemm_context *ctx);

/* on: fp32 operands are multiplied on the TF32 tensor cores (10-bit mantissas, fp32
 * accumulation: about 3e-4 relative on a 2048-long product) in every GEMM of ctx, the
 * handle's own Sgemm calls included; off (the default): true fp32 products. */
int gemm_set_tf32(struct gemm_context *ctx, int on, char *err, size_t err_size);
/* out[n] (bf16) = in[n] rounded to nearest even: an operand for the GEMM_BF16 forms. */
int gemm_to_bf16(void *out, const float *in, size_t n, char *err, size_t err_size);
/* The cuBLAS handle (a cublasHandle_t) for kernels that issue their own GEMMs. */
void *gemm_cublas(struct gemm_context *ctx);

/* y[N,O] (+)= x[N,I] w[O,I]^T + bias[O] (bias fp32, may be NULL). */
int gemm_linear(struct gemm_context *ctx, float *y, const void *x, const void *w,
                const float *bias, int N, int I, int O, int accumulate, enum gemm_type type,
                char *err, size_t err_size);

/* dx[N,I] (+)= dy w (dx may be NULL); dw[O,I] += dy^T x (NULL: frozen, no GEMM); dbias[O]
 * += column sums of dy (fp32 dy only; NULL: none). dw is fp32 whatever the operands.
 * workspace: gemm_bias_workspace(N, O) bytes of device memory when dbias is set. */
size_t gemm_bias_workspace(int N, int O);
int gemm_linear_backward(struct gemm_context *ctx, float *dx, float *dw, float *dbias,
                         const void *dy, const void *x, const void *w, int N, int I, int O,
                         int accumulate_dx, enum gemm_type type, void *workspace, char *err,
                         size_t err_size);

/* For each expert e with rows [offsets[e], offsets[e+1]) (offsets in host memory):
 * y[rows, O] = x[rows, I] w[e]^T, w holding E consecutive [O, I] matrices. */
int gemm_grouped_linear(struct gemm_context *ctx, float *y, const void *x, const void *w,
                        const int32_t *offsets, int E, int I, int O, enum gemm_type type,
                        char *err, size_t err_size);

/* dx[rows, I] = dy[rows, O] w[e] (written; dx may be NULL); dw[e][O,I] += dy_e^T x_e for
 * each e whose dw[e] (a host array of device pointers) is not NULL. */
int gemm_grouped_linear_backward(struct gemm_context *ctx, float *dx, float *const *dw,
                                 const void *dy, const void *x, const void *w,
                                 const int32_t *offsets, int E, int I, int O,
                                 enum gemm_type type, char *err, size_t err_size);

/* gemm_grouped_linear in one cuBLAS call. y_type: GEMM_F32 computes exactly what
 * gemm_grouped_linear computes; GEMM_BF16 (bf16 operands only) writes y in bf16, the
 * output type cuBLAS's grouped GEMM is documented for with bf16 operands (fp32 output with
 * bf16 operands may be refused with CUBLAS_STATUS_NOT_SUPPORTED: the error says so).
 * Keeps host and device arrays of 3 x E entries in ctx, grown on first use. */
int gemm_grouped_linear_batched(struct gemm_context *ctx, void *y, enum gemm_type y_type,
                                const void *x, const void *w, const int32_t *offsets, int E,
                                int I, int O, enum gemm_type type, char *err, size_t err_size);

/* gemm_grouped_linear_backward in one cuBLAS call (dx and the dw of every expert with rows
 * and a non-NULL dw[e] together); outputs fp32 as there. */
int gemm_grouped_linear_backward_batched(struct gemm_context *ctx, float *dx, float *const *dw,
                                         const void *dy, const void *x, const void *w,
                                         const int32_t *offsets, int E, int I, int O,
                                         enum gemm_type type, char *err, size_t err_size);

/* The frozen experts of bf16 mode in one cuBLAS call, bf16 in and out (the pairing
 * cublasGemmGroupedBatchedEx is documented for), fp32 accumulation. w[e] is a host array
 * of E device pointers to bf16 [O, I] matrices; experts whose w[e] is NULL (trained ones,
 * multiplied in fp32 by the caller) and experts without rows are skipped. I, O > 0.
 * Forward: y[rows, O] = x[rows, I] w[e]^T. Input gradient: dx[rows, I] = dy[rows, O] w[e]. */
int gemm_grouped_linear_bf16(struct gemm_context *ctx, void *y, const void *x,
                             const void *const *w, const int32_t *offsets, int E, int I, int O,
                             char *err, size_t err_size);
int gemm_grouped_linear_dx_bf16(struct gemm_context *ctx, void *dx, const void *dy,
                                const void *const *w, const int32_t *offsets, int E, int I, int O,
                                char *err, size_t err_size);
/* out[n] = in[n], bf16 widened to fp32 (exact). */
int gemm_from_bf16(float *out, const void *in, size_t n, char *err, size_t err_size);

#ifdef __cplusplus
}
#endif

#endif
