/* cuda_ops: the CUDA backend's op table (backend.h) over the kernels of kernels/, fp32
 * (TF32 tensor-core products with backend_cuda_set_tf32).
 * Every pointer is one the GPU can read and write (device memory); the ops run on the
 * current device's default stream.
 *
 * This first version synchronises after every op, so that the host code around the op
 * table (the model's load-balancing sums, the EP exchange plan) may read what an op
 * wrote, and it reports a failed launch at the op that caused it: slow but plain. The
 * grouped GEMMs read the experts' offsets back to the host (E + 1 integers). Scratch
 * for the ops that need it is one device buffer, grown on demand and kept; the ops are
 * called from one thread.
 *
 * Routers: softmax top-k only (qwen2/3-MoE, OLMoE, Mixtral); the grouped, sigmoid and
 * top-k-then-softmax routers end the run with a message until their kernels exist.
 *
 * Memory: cudaMalloc'd buffers (zeroed), synchronous copies counted as transfers
 * (backend_traffic). The phases run on it with run.backend: cuda (model_attach); on an
 * NVIDIA H200 (2026-11-26) the golden fixtures' forward, gradients, eval and score and
 * the demo's curve matched the CPU backend to fp32 rounding (tests/gpu/device-check.sh).
 * tests/test_device.c runs a MoE block through it against the CPU backend. */
#include "cuda_ops.h"

#include <cublas_v2.h>
#include <stdlib.h>

#include "attention.h"
#include "check_cuda.h"
#include "dense.h"
#include "gemm.h"
#include "log.h"
#include "metrics.h"
#include "moe.h"
#include "optimizer.h"

static struct gemm_context *gemm_ctx;
static void *scratch_buf;
static size_t scratch_size;

static void ok(int rc, const char *err)
{
    if (rc != 0) fatal(EXIT_RUNTIME, "cuda backend: %s", err);
    check_cuda(cudaDeviceSynchronize());
}

static struct gemm_context *gemm(void)
{
    if (!gemm_ctx) {
        char err[256];
        gemm_ctx = gemm_create(err, sizeof err);
        if (!gemm_ctx) fatal(EXIT_RUNTIME, "cuda backend: %s", err);
    }
    return gemm_ctx;
}

static void *scratch(size_t bytes)
{
    if (bytes > scratch_size) {
        if (scratch_buf) check_cuda(cudaFree(scratch_buf));
        scratch_buf = NULL;
        check_cuda(cudaMalloc(&scratch_buf, bytes));
        scratch_size = bytes;
    }
    return scratch_buf;
}

/* The experts' offsets[E+1], read back for the per-expert GEMMs. Freed by the caller. */
static int32_t *host_offsets(const int32_t *offsets, int E)
{
    int32_t *host = xmalloc((size_t)(E + 1) * sizeof(int32_t));
    check_cuda(cudaMemcpy(host, offsets, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDefault));
    return host;
}

/* The CUDA kernels route by softmax top-k only; the grouped and sigmoid routers run on
 * the CPU backend (moe_math.h holds their rows for the kernels to come). */
static void need_softmax_topk(const struct router_params *rp)
{
    if (rp->kind != ROUTER_SOFTMAX_TOPK)
        fatal(EXIT_RUNTIME,
              "cuda backend: router kind %s is not implemented yet (softmax "
              "top-k only; hint: use the cpu backend)",
              rp->kind == ROUTER_GROUPED_GREEDY ? "group_limited_greedy (deepseek_v2)"
              : rp->kind == ROUTER_SIGMOID_BIAS
                  ? "sigmoid with selection bias (deepseek_v3, glm4_moe)"
                  : "top-k then softmax (gpt_oss)");
}

static void cuda_embedding(float *x, const int32_t *tokens, const float *table, int N, int H)
{
    char err[256];
    ok(dense_embedding(x, tokens, table, N, H, err, sizeof err), err);
}

/* ---- bf16 mode: frozen weights multiplied as bf16 ------------------------------------ *
 * With backend_cuda_set_bf16 on, every run of frozen weights that the model declares
 * (cuda_constant; adjacent runs merged) gets a bf16 copy on first use, and a GEMM whose
 * weight lies in one runs on bf16 operands: the weight's copy, and the activation or
 * output gradient rounded to bf16 into a buffer of its own; outputs and sums stay fp32.
 * Trainable weights and every weight gradient stay fp32 (TF32 products). */
struct constant_run {
    const float *p;
    size_t n;
    void *bf16; /* its copy, made on first use; NULL until then */
};
static struct constant_run *constants;
static int n_constants, constants_capacity;
static bool bf16_mode;
static void *operand_buf; /* activations rounded to bf16 */
static size_t operand_size;

/* Forgets every declared run and frees the copies. */
static void forget_constants(void)
{
    for (int i = 0; i < n_constants; i++)
        if (constants[i].bf16) check_cuda(cudaFree(constants[i].bf16));
    n_constants = 0;
}

static void cuda_constant(const float *p, size_t n)
{
    if (!p) { /* the model is freed: its memory may come back as anything */
        forget_constants();
        return;
    }
    if (!bf16_mode || n == 0) return;
    struct constant_run *last = n_constants ? &constants[n_constants - 1] : NULL;
    if (last && !last->bf16 && last->p + last->n == p) { /* the next tensor in storage */
        last->n += n;
        return;
    }
    if (n_constants == constants_capacity) {
        constants_capacity = constants_capacity ? 2 * constants_capacity : 256;
        constants = realloc(constants, (size_t)constants_capacity * sizeof *constants);
        if (!constants) fatal(EXIT_RUNTIME, "cuda backend: out of host memory");
    }
    constants[n_constants++] = (struct constant_run){p, n, NULL};
}

/* The bf16 copy of the n floats at w, when they lie in a declared run; else NULL. */
static const void *bf16_weight(const float *w, size_t n)
{
    if (weight_is_bf16(w)) return weight_bf16_data(w); /* stored so (model.frozen_weights) */
    if (!bf16_mode) return NULL;
    for (int i = 0; i < n_constants; i++) {
        struct constant_run *r = &constants[i];
        if (w < r->p || w + n > r->p + r->n) continue;
        if (!r->bf16) {
            char err[256];
            check_cuda(cudaMalloc(&r->bf16, r->n * 2));
            ok(gemm_to_bf16(r->bf16, r->p, r->n, err, sizeof err), err);
        }
        return (const char *)r->bf16 + (size_t)(w - r->p) * 2;
    }
    return NULL;
}

/* x[n] rounded to bf16 in the operand buffer. */
static const void *bf16_operand(const float *x, size_t n)
{
    if (n * 2 > operand_size) {
        if (operand_buf) check_cuda(cudaFree(operand_buf));
        check_cuda(cudaMalloc(&operand_buf, n * 2));
        operand_size = n * 2;
    }
    char err[256];
    ok(gemm_to_bf16(operand_buf, x, n, err, sizeof err), err);
    return operand_buf;
}

static void cuda_linear(float *y, const float *x, const float *w, const float *bias, int N, int I,
                        int O, bool accumulate)
{
    char err[256];
    const void *wb = bf16_weight(w, (size_t)O * I);
    if (wb) {
        ok(gemm_linear(gemm(), y, bf16_operand(x, (size_t)N * I), wb, bias, N, I, O, accumulate,
                       GEMM_BF16, err, sizeof err),
           err);
        return;
    }
    ok(gemm_linear(gemm(), y, x, w, bias, N, I, O, accumulate, GEMM_F32, err, sizeof err), err);
}

static void cuda_rmsnorm(float *y, float *rstd, const float *x, const float *w, int R, int D,
                         float eps)
{
    char err[256];
    ok(dense_rmsnorm(y, rstd, x, w, R, D, eps, err, sizeof err), err);
}

/* The kernels rotate rotate-half pairs only; deepseek's interleaved pairs have none yet. */
static void need_rotate_half(enum hf_rope_layout layout, const char *op)
{
    if (layout != ROPE_ROTATE_HALF)
        fatal(EXIT_RUNTIME, "cuda backend: %s with interleaved pairs is not implemented yet "
              "(deepseek MLA)", op);
}

/* The attention kernels take one head width for keys and values. */
static void need_equal_widths(int Dh, int Dv, const char *op)
{
    if (Dv != Dh)
        fatal(EXIT_RUNTIME, "cuda backend: %s with a value width (%d) other than the query-key "
              "width (%d) is not implemented yet (deepseek MLA)", op, Dv, Dh);
}

/* The attention kernels know neither sliding windows nor sinks (gpt_oss). */
static void need_plain_mask(const struct attention_mask *mask, const char *op)
{
    if (mask->window || mask->sinks)
        fatal(EXIT_RUNTIME, "cuda backend: %s with a sliding window or sinks is not implemented "
              "yet (gpt_oss)", op);
}

static void cuda_rope(float *x, const int32_t *positions, const float *inv_freq,
                      float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                      enum hf_rope_layout layout)
{
    char err[256];
    need_rotate_half(layout, "rope");
    ok(dense_rope(x, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim, 0, err,
                  sizeof err),
       err);
}

/* The samples of a batch, from sample_start copied back (N integers): starts[count + 1]
 * and the longest sample; freed by the caller. */
static int *batch_samples(const int32_t *sample_start, int N, int *count, int *longest)
{
    int32_t *host = xmalloc((size_t)(N > 0 ? N : 1) * sizeof *host);
    int *starts = xmalloc((size_t)(N + 1) * sizeof *starts);
    if (N > 0) check_cuda(cudaMemcpy(host, sample_start, (size_t)N * sizeof *host, cudaMemcpyDeviceToHost));
    backend_count_download((size_t)N * sizeof *host);
    *count = attention_gemm_samples(host, N, starts, longest);
    free(host);
    return starts;
}

/* Attention by cuBLAS GEMMs and a row softmax (kernels/attention_gemm.cu): the scores of
 * a block of queries at a time, on the tensor cores' fp32 path (or TF32). */
static void cuda_attention(float *out, const float *q, const float *k, const float *v,
                           const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                           int Dv, float scale)
{
    char err[256];
    need_equal_widths(Dh, Dv, "attention");
    need_plain_mask(mask, "attention");
    int count, longest;
    int *starts = batch_samples(mask->sample_start, N, &count, &longest);
    void *ws = scratch(attention_gemm_workspace(longest, nH, nKV));
    ok(attention_gemm_forward(gemm_cublas(gemm()), out, q, k, v, starts, count, nH, nKV, Dh, scale,
                              ws, err, sizeof err),
       err);
    free(starts);
}

/* copy_columns: a strided 2D copy (cudaMemcpy2D); accumulate by cuBLAS's geam, which
 * adds in place (C = B, ldc = ldb): row-major [rows, cols] with stride ld is column-major
 * [cols, rows] with the same ld. */
static void cuda_copy_columns(float *dst, int dst_ld, const float *src, int src_ld, int rows,
                              int cols, bool accumulate)
{
    if (rows <= 0 || cols <= 0) return;
    if (!accumulate) {
        check_cuda(cudaMemcpy2D(dst, (size_t)dst_ld * sizeof(float), src,
                                (size_t)src_ld * sizeof(float), (size_t)cols * sizeof(float),
                                (size_t)rows, cudaMemcpyDeviceToDevice));
        return;
    }
    const float one = 1.0f;
    cublasStatus_t status = cublasSgeam((cublasHandle_t)gemm_cublas(gemm()), CUBLAS_OP_N,
                                        CUBLAS_OP_N, cols, rows, &one, src, src_ld, &one, dst,
                                        dst_ld, dst, dst_ld);
    if (status != CUBLAS_STATUS_SUCCESS)
        fatal(EXIT_RUNTIME, "cuda backend: copy_columns: cublasSgeam failed (status %d)",
              (int)status);
    check_cuda(cudaDeviceSynchronize());
}

static void cuda_router_topk(int32_t *ids, float *weights, float *probs, const float *logits, int N,
                             int E, int K, const struct router_params *rp)
{
    char err[256];
    need_softmax_topk(rp);
    ok(moe_router_topk(ids, weights, probs, logits, N, E, K, rp->renormalise, rp->scaling, err,
                       sizeof err),
       err);
}

static void cuda_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                                      const int32_t *ids, int N, int E, int K)
{
    char err[256];
    ok(moe_router_balance_stats(counts, prob_sums, probs, ids, N, E, K, err, sizeof err), err);
}

static void cuda_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row,
                                   int32_t *row_of_slot, const int32_t *ids, int N, int K, int E)
{
    char err[256];
    int M = N * K;
    ok(moe_permute_by_expert(expert_offsets, slot_of_row, row_of_slot, ids, M, E,
                             scratch(moe_permute_workspace(M, E)), err, sizeof err),
       err);
}

static void cuda_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                             int H)
{
    char err[256];
    ok(moe_gather_rows(xs, x, slot_of_row, M, K, H, err, sizeof err), err);
}

/* Whether the E expert weights are fp32 [size] matrices one after the other (one grouped
 * call), rather than some stored as bf16 or apart. */
static bool experts_in_one_block(const float *const *w, int E, size_t size)
{
    for (int e = 0; e < E; e++)
        if (weight_is_bf16(w[e]) || w[e] != w[0] + (size_t)e * size) return false;
    return true;
}

static void cuda_grouped_linear(float *y, const float *x, const float *const *w,
                                const int32_t *offsets, int E, int I, int O)
{
    char err[256];
    int32_t *host = host_offsets(offsets, E);
    int rc = 0;
    if (bf16_mode || !experts_in_one_block(w, E, (size_t)O * I)) {
        /* expert by expert: a frozen one on bf16, a trained one on fp32 */
        const char *xb = host[E] > 0 ? bf16_operand(x, (size_t)host[E] * I) : NULL;
        for (int e = 0; e < E && rc == 0; e++) {
            int rows = host[e + 1] - host[e];
            if (rows == 0) continue;
            const float *we = w[e];
            const void *wb = bf16_weight(we, (size_t)O * I);
            float *ye = y + (size_t)host[e] * O;
            rc = wb ? gemm_linear(gemm(), ye, xb + (size_t)host[e] * I * 2, wb, NULL, rows, I, O, 0,
                                  GEMM_BF16, err, sizeof err)
                    : gemm_linear(gemm(), ye, x + (size_t)host[e] * I, we, NULL, rows, I, O, 0,
                                  GEMM_F32, err, sizeof err);
        }
    } else {
        rc = gemm_grouped_linear(gemm(), y, x, E ? w[0] : NULL, host, E, I, O, GEMM_F32, err,
                                 sizeof err);
    }
    free(host);
    ok(rc, err);
}

static void cuda_glu(float *h, const float *gate, const float *up, size_t count,
                     enum hf_activation act)
{
    char err[256];
    ok(moe_glu(h, gate, up, count, act == ACT_GELU, err, sizeof err), err);
}

static void cuda_glu_clamped(float *h, const float *gate, const float *up, size_t count,
                             float alpha, float limit)
{
    (void)h, (void)gate, (void)up, (void)count, (void)alpha, (void)limit;
    fatal(EXIT_RUNTIME, "cuda backend: glu_clamped is not implemented yet (gpt_oss)");
}

static void cuda_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O)
{
    (void)y, (void)bias, (void)offsets, (void)E, (void)O;
    fatal(EXIT_RUNTIME, "cuda backend: grouped_bias is not implemented yet (gpt_oss)");
}

static void cuda_combine(float *out, const float *ys, const float *weights,
                         const int32_t *row_of_slot, int N, int K, int H, bool accumulate)
{
    char err[256];
    ok(moe_combine(out, ys, weights, row_of_slot, N, K, H, accumulate, err, sizeof err), err);
}

static void cuda_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N, int H)
{
    char err[256];
    ok(moe_add_sigmoid_gated(y, s, gate_logit, N, H, err, sizeof err), err);
}

static void cuda_clamp(float *x, size_t count, float low, float high)
{
    char err[256];
    ok(dense_clamp(x, count, low, high, err, sizeof err), err);
}

static void cuda_add(float *y, const float *x, const float *r, size_t count)
{
    char err[256];
    ok(dense_add(y, x, r, count, err, sizeof err), err);
}

static double cuda_cross_entropy_sum(const float *logits, const int32_t *labels, int N, int V,
                                     long long *counted)
{
    char err[256];
    double *row_loss = scratch((size_t)(N > 0 ? N : 1) * sizeof(double)), total = 0;
    ok(dense_cross_entropy(row_loss, NULL, logits, labels, N, V, 0.0f, err, sizeof err), err);
    ok(dense_sum_rows(&total, counted, row_loss, labels, N, err, sizeof err), err);
    return total;
}

static void cuda_linear_backward(float *dx, float *dw, float *dbias, const float *dy,
                                 const float *x, const float *w, int N, int I, int O,
                                 bool accumulate_dx)
{
    char err[256];
    if (weight_is_bf16(w) && (dw || dbias))
        fatal(EXIT_RUNTIME, "linear_backward: a weight held as bf16 has no gradient, nor its bias");
    if (weight_is_bf16(w) && !dx) return; /* a frozen weight without an input gradient */
    const void *wb = !dw && !dbias && dx ? bf16_weight(w, (size_t)O * I) : NULL;
    if (wb) { /* a frozen weight: only dx = dy w, on bf16 operands */
        ok(gemm_linear_backward(gemm(), dx, NULL, NULL, bf16_operand(dy, (size_t)N * O), NULL, wb,
                                N, I, O, accumulate_dx, GEMM_BF16, NULL, err, sizeof err),
           err);
        return;
    }
    void *workspace = dbias ? scratch(gemm_bias_workspace(N, O)) : NULL;
    ok(gemm_linear_backward(gemm(), dx, dw, dbias, dy, x, w, N, I, O, accumulate_dx, GEMM_F32,
                            workspace, err, sizeof err),
       err);
}

static void cuda_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                  const float *w, const float *rstd, int R, int D,
                                  bool accumulate_dx)
{
    char err[256];
    void *workspace = dw ? scratch(dense_rmsnorm_workspace(R, D)) : NULL;
    ok(dense_rmsnorm_backward(dx, dw, dy, x, w, rstd, R, D, accumulate_dx, workspace, err,
                              sizeof err),
       err);
}

static void cuda_rope_backward(float *dx, const int32_t *positions, const float *inv_freq,
                               float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                               enum hf_rope_layout layout)
{
    char err[256];
    need_rotate_half(layout, "rope_backward");
    ok(dense_rope(dx, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim, 1, err,
                  sizeof err),
       err);
}

static void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                    const float *q, const float *k, const float *v,
                                    const float *out, const struct attention_mask *mask, int N,
                                    int nH, int nKV, int Dh, int Dv, float scale)
{
    char err[256];
    need_equal_widths(Dh, Dv, "attention_backward");
    need_plain_mask(mask, "attention_backward");
    (void)out;
    int count, longest;
    int *starts = batch_samples(mask->sample_start, N, &count, &longest);
    void *ws = scratch(attention_gemm_workspace(longest, nH, nKV));
    ok(attention_gemm_backward(gemm_cublas(gemm()), dq, dk, dv, dout, q, k, v, starts, count, nH,
                               nKV, Dh, scale, ws, err, sizeof err),
       err);
    free(starts);
}

static void cuda_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                                      const int32_t *ids, int N, int E, int K,
                                      const struct router_params *rp)
{
    char err[256];
    need_softmax_topk(rp);
    ok(moe_router_topk_backward(dlogits, dweights, probs, ids, N, E, K, rp->renormalise,
                                rp->scaling, err, sizeof err),
       err);
}

static void cuda_router_balance_backward(float *dlogits, const float *probs, const float *coef,
                                         int N, int E)
{
    char err[256];
    ok(moe_router_balance_backward(dlogits, probs, coef, N, E, err, sizeof err), err);
}

static void cuda_grouped_linear_backward(float *dx, float *const *dw, const float *dy,
                                         const float *x, const float *const *w,
                                         const int32_t *offsets, int E, int I, int O)
{
    char err[256];
    int32_t *host = host_offsets(offsets, E);
    int rc = 0;
    if (bf16_mode || !experts_in_one_block(w, E, (size_t)O * I)) {
        /* expert by expert: dx of a frozen one on bf16; a trained one on fp32 */
        const char *dyb = dx && host[E] > 0 ? bf16_operand(dy, (size_t)host[E] * O) : NULL;
        for (int e = 0; e < E && rc == 0; e++) {
            int rows = host[e + 1] - host[e];
            if (rows == 0) continue;
            const float *we = w[e];
            float *dwe = dw ? dw[e] : NULL;
            const void *wb = !dwe && dx ? bf16_weight(we, (size_t)O * I) : NULL;
            float *dxe = dx ? dx + (size_t)host[e] * I : NULL;
            if (wb)
                rc = gemm_linear_backward(gemm(), dxe, NULL, NULL, dyb + (size_t)host[e] * O * 2, NULL,
                                          wb, rows, I, O, 0, GEMM_BF16, NULL, err, sizeof err);
            else if (dxe || dwe)
                rc = gemm_linear_backward(gemm(), dxe, dwe, NULL, dy + (size_t)host[e] * O,
                                          x + (size_t)host[e] * I, we, rows, I, O, 0, GEMM_F32,
                                          NULL, err, sizeof err);
        }
    } else {
        rc = gemm_grouped_linear_backward(gemm(), dx, dw, dy, x, E ? w[0] : NULL, host, E, I, O,
                                          GEMM_F32, err, sizeof err);
    }
    free(host);
    ok(rc, err);
}

static void cuda_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                              const float *up, size_t count, enum hf_activation act)
{
    char err[256];
    ok(moe_glu_backward(dgate, dup, dh, gate, up, count, act == ACT_GELU, err, sizeof err), err);
}

static void cuda_combine_backward(float *dys, float *dweights, const float *dout, const float *ys,
                                  const float *weights, const int32_t *row_of_slot, int N, int K,
                                  int H)
{
    char err[256];
    ok(moe_combine_backward(dys, dweights, dout, ys, weights, row_of_slot, N, K, H, err, sizeof err),
       err);
}

static void cuda_gather_rows_backward(float *dx, const float *dxs, const int32_t *row_of_slot,
                                      int N, int K, int H, bool accumulate)
{
    char err[256];
    ok(moe_gather_rows_backward(dx, dxs, row_of_slot, N, K, H, accumulate, err, sizeof err), err);
}

static void cuda_add_sigmoid_gated_backward(float *ds, float *dgate_logit, const float *dy,
                                            const float *s, const float *gate_logit, int N, int H)
{
    char err[256];
    ok(moe_add_sigmoid_gated_backward(ds, dgate_logit, dy, s, gate_logit, N, H, err, sizeof err),
       err);
}

static void cuda_glu_clamped_backward(float *dgate, float *dup, const float *dh,
                                      const float *gate, const float *up, size_t count,
                                      float alpha, float limit)
{
    (void)dgate, (void)dup, (void)dh, (void)gate, (void)up, (void)count, (void)alpha, (void)limit;
    fatal(EXIT_RUNTIME, "cuda backend: glu_clamped_backward is not implemented yet (gpt_oss)");
}

static void cuda_grouped_bias_backward(float *const *dbias, const float *dy,
                                       const int32_t *offsets, int E, int O)
{
    (void)dbias, (void)dy, (void)offsets, (void)E, (void)O;
    fatal(EXIT_RUNTIME, "cuda backend: grouped_bias_backward is not implemented yet (gpt_oss)");
}

static void cuda_clamp_backward(float *dx, const float *y, size_t count, float low, float high)
{
    char err[256];
    ok(dense_clamp_backward(dx, y, count, low, high, err, sizeof err), err);
}

static void cuda_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *labels,
                                        int N, int V, float scale)
{
    char err[256];
    double *row_loss = scratch((size_t)(N > 0 ? N : 1) * sizeof(double));
    ok(dense_cross_entropy(row_loss, dlogits, logits, labels, N, V, scale, err, sizeof err), err);
}

static void cuda_embedding_backward(float *dtable, const float *dx, const int32_t *tokens, int N,
                                    int H)
{
    char err[256];
    ok(dense_embedding_backward(dtable, dx, tokens, N, H, err, sizeof err), err);
}

static void cuda_adamw(float *data, float *m, float *v, const float *grad, size_t n,
                       const struct adamw_coef *coef)
{
    char err[256];
    ok(optim_adamw(data, m, v, grad, n, *coef, err, sizeof err), err);
}

static double cuda_sum_squares(const float *x, size_t n)
{
    char err[256];
    double sum = 0;
    ok(optim_sum_squares(&sum, x, n, scratch(optim_sum_squares_workspace(n)), err, sizeof err), err);
    backend_count_download(sizeof sum);
    return sum;
}

static void cuda_scale(float *x, size_t n, float factor)
{
    char err[256];
    ok(optim_scale(x, n, factor, err, sizeof err), err);
}

static long long cuda_count_correct(const float *logits, const int32_t *labels, int N, int V)
{
    char err[256];
    unsigned long long *correct = scratch(sizeof *correct), host = 0;
    ok(metrics_count_correct(correct, logits, labels, N, V, err, sizeof err), err);
    check_cuda(cudaMemcpy(&host, correct, sizeof host, cudaMemcpyDeviceToHost));
    backend_count_download(sizeof host);
    return (long long)host;
}

/* ---- memory: cudaMalloc'd buffers, synchronous copies ---------------------------------- */

static size_t peak_in_use;

static void cuda_memory(size_t *in_use, size_t *peak)
{
    size_t free_bytes = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free_bytes, &total));
    *in_use = total - free_bytes; /* the whole device: buffers, cuBLAS, the context */
    if (*in_use > peak_in_use) peak_in_use = *in_use;
    *peak = peak_in_use;
}

static void *cuda_alloc(size_t bytes)
{
    void *p = NULL;
    cudaError_t status = cudaMalloc(&p, bytes ? bytes : 1);
    if (status != cudaSuccess) {
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        fatal(EXIT_RUNTIME, "cuda backend: allocating %.1f MiB of device memory failed (%s); "
              "%.1f of %.1f MiB free", bytes / 1048576.0, cudaGetErrorString(status),
              free_bytes / 1048576.0, total / 1048576.0);
    }
    check_cuda(cudaMemset(p, 0, bytes ? bytes : 1));
    size_t in_use, peak;
    cuda_memory(&in_use, &peak);
    return p;
}

static void cuda_release(void *p)
{
    if (p) check_cuda(cudaFree(p));
}

static void cuda_upload(void *dst, const void *host_src, size_t bytes)
{
    if (bytes) check_cuda(cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice));
    backend_count_upload(bytes);
}

static void cuda_download(void *host_dst, const void *src, size_t bytes)
{
    if (bytes) check_cuda(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost));
    backend_count_download(bytes);
}

static void cuda_copy(void *dst, const void *src, size_t bytes)
{
    if (bytes) check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}

static void cuda_zero(void *p, size_t bytes)
{
    if (bytes) check_cuda(cudaMemset(p, 0, bytes));
}

const struct backend *backend_cuda(void)
{
    static const struct backend cuda = {
        .name = "cuda",
        .embedding = cuda_embedding,
        .linear = cuda_linear,
        .rmsnorm = cuda_rmsnorm,
        .rope = cuda_rope,
        .copy_columns = cuda_copy_columns,
        .attention = cuda_attention,
        .router_topk = cuda_router_topk,
        .router_balance_stats = cuda_router_balance_stats,
        .permute_by_expert = cuda_permute_by_expert,
        .gather_rows = cuda_gather_rows,
        .grouped_linear = cuda_grouped_linear,
        .grouped_bias = cuda_grouped_bias,
        .glu = cuda_glu,
        .glu_clamped = cuda_glu_clamped,
        .combine = cuda_combine,
        .add_sigmoid_gated = cuda_add_sigmoid_gated,
        .clamp = cuda_clamp,
        .add = cuda_add,
        .cross_entropy_sum = cuda_cross_entropy_sum,
        .linear_backward = cuda_linear_backward,
        .rmsnorm_backward = cuda_rmsnorm_backward,
        .rope_backward = cuda_rope_backward,
        .attention_backward = cuda_attention_backward,
        .router_topk_backward = cuda_router_topk_backward,
        .router_balance_backward = cuda_router_balance_backward,
        .grouped_linear_backward = cuda_grouped_linear_backward,
        .grouped_bias_backward = cuda_grouped_bias_backward,
        .glu_backward = cuda_glu_backward,
        .glu_clamped_backward = cuda_glu_clamped_backward,
        .combine_backward = cuda_combine_backward,
        .gather_rows_backward = cuda_gather_rows_backward,
        .add_sigmoid_gated_backward = cuda_add_sigmoid_gated_backward,
        .clamp_backward = cuda_clamp_backward,
        .cross_entropy_backward = cuda_cross_entropy_backward,
        .embedding_backward = cuda_embedding_backward,
        .adamw = cuda_adamw,
        .sum_squares = cuda_sum_squares,
        .scale = cuda_scale,
        .count_correct = cuda_count_correct,
        .host_visible = false,
        .alloc = cuda_alloc,
        .release = cuda_release,
        .upload = cuda_upload,
        .download = cuda_download,
        .copy = cuda_copy,
        .zero = cuda_zero,
        .memory = cuda_memory,
        .constant = cuda_constant,
    };
    return &cuda;
}

void backend_cuda_set_bf16(bool on)
{
    bf16_mode = on;
}

void backend_cuda_set_tf32(bool on)
{
    char err[256];
    if (gemm_set_tf32(gemm(), on, err, sizeof err) != 0) fatal(EXIT_RUNTIME, "cuda backend: %s", err);
}

void backend_cuda_release(void)
{
    gemm_destroy(gemm_ctx);
    gemm_ctx = NULL;
    forget_constants();
    free(constants);
    constants = NULL;
    constants_capacity = 0;
    if (operand_buf) check_cuda(cudaFree(operand_buf));
    operand_buf = NULL;
    operand_size = 0;
    if (scratch_buf) check_cuda(cudaFree(scratch_buf)); /* a sticky error shows here */
    scratch_buf = NULL;
    scratch_size = 0;
}
