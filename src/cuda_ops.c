/* cuda_ops: the CUDA backend's op table (backend.h) over the kernels of kernels/, fp32
 * (TF32 tensor-core products with backend_cuda_set_tf32).
 * Every pointer is one the GPU can read and write (device memory); the ops run on the
 * current device's default stream.
 *
 * The ops are ordered by the legacy default stream alone: no op waits for the device.
 * The host sees device values only through synchronous copies on that stream (download,
 * the losses, the norms, the experts' offsets), which wait for every op before them, so
 * no host code reads what an op has not finished. A launch error is reported at the op
 * that made it (cudaGetLastError); an error inside a kernel at the next synchronous copy.
 * ESFT_CUDA_SYNC=1 restores a device synchronisation after every op (a kernel's fault
 * then names its op); ESFT_CUDA_PROFILE=1 does too, and times each op (the table is
 * logged at backend_cuda_release). The grouped GEMMs read the experts' offsets back to
 * the host (E + 1 integers). Device buffers for the ops (scratch, bf16 operands, the
 * frozen experts' bf16 outputs) and host buffers for the values read back grow on demand
 * and are kept. The scratch and the host buffers sized by tokens or rows grow at once to
 * what the reserved sizes need (backend.h, reserve: the workspace's capacities), so after
 * the first step a step allocates nothing there; the bf16 operand and output buffers
 * still grow when a step needs more than any before it, and the bf16 copies of frozen
 * weights are made at first use (step 1). The ops are called from one thread.
 *
 * Modes: fp32 (cuBLAS fp32 compute); tf32 (backend_cuda_set_tf32: TF32 tensor-core
 * products); bf16 (backend_cuda_set_bf16: GEMMs against frozen weights on bf16 operands).
 * In tf32 and bf16 modes attention with heads of 64 or 128 takes the tiled kernels of
 * attention_flash.cu, whose operands are bf16 (about 1e-2 relative L2 against fp32;
 * ESFT_CUDA_ATTENTION=gemm keeps cuBLAS). Weights stored as bf16
 * (model.frozen_weights: bf16) are multiplied on bf16 operands in every mode: the
 * activation or output gradient is rounded to bf16 too, where the CPU backend widens the
 * weight and keeps them fp32 (test_golden holds cuda to 5e-2 there).
 *
 * Routers: softmax top-k (qwen2/3-MoE, OLMoE, Mixtral) by one warp per token; the
 * grouped (deepseek_v2), sigmoid (deepseek_v3, glm4_moe) and top-k-then-softmax (gpt_oss)
 * routers by one thread per token running moe_math.h's rows, the CPU backend's own.
 * Attention takes MLA's value width, gpt_oss's sliding window and sinks (attention_gemm.cu).
 *
 * Memory: cudaMalloc'd buffers (zeroed), synchronous copies counted as transfers
 * (backend_traffic). The phases run on it with run.backend: cuda (model_attach).
 * STATUS: on an NVIDIA H200 and an H100 (2026-11-26) the golden fixtures' forward,
 * gradients, eval and score (every family) and the demo's curve matched the CPU backend
 * to fp32 rounding in fp32 mode (tests/gpu/device-check.sh), and every test_device group
 * passed (the ops of deepseek_v2/v3, glm4_moe and gpt_oss and the chunked cross-entropy
 * included). Not yet run on a GPU: DenseMixer's ops (row_dots, router_dense_backward;
 * test_device group densemixer). */
#include "cuda_ops.h"

#include <cublas_v2.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention.h"
#include "attention_flash.h"
#include "check_cuda.h"
#include "dense.h"
#include "dense_math.h"
#include "gemm.h"
#include "log.h"
#include "metrics.h"
#include "moe.h"
#include "optimizer.h"

static struct gemm_context *gemm_ctx;
static void cuda_download(void *host_dst, const void *src, size_t bytes);
static void *scratch_buf;
static size_t scratch_size;

/* ---- after each op: errors, and the optional synchronisation and profile ------------- */
enum op_sync { SYNC_UNSET, SYNC_NONE, SYNC_EACH, SYNC_PROFILE };
static enum op_sync op_sync;

struct op_time {
    const char *op; /* the op's function name: a string literal, compared by address */
    long long calls, slowest_call; /* calls; which call (from 1) was the slowest */
    double seconds, fastest, slowest; /* in all; the fastest and the slowest call */
    double host_before; /* the host's time between the previous op and this one's calls */
};
static struct op_time op_times[128];
static int n_op_times;
static double last_mark; /* when the previous op or transfer ended */

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* op's line of the profile (the last one when the table is full). */
static struct op_time *op_line(const char *op)
{
    int i = 0;
    while (i < n_op_times && op_times[i].op != op) i++;
    if (i == n_op_times) {
        if (n_op_times == (int)(sizeof op_times / sizeof op_times[0])) i = n_op_times - 1;
        else op_times[n_op_times++] = (struct op_time){op, 0, 0, 0, INFINITY, 0, 0};
    }
    return &op_times[i];
}

/* Adds one call of `seconds` to op's line of the profile. */
static void charge(const char *op, double seconds)
{
    struct op_time *t = op_line(op);
    t->calls++;
    t->seconds += seconds;
    if (seconds < t->fastest) t->fastest = seconds;
    if (seconds > t->slowest) t->slowest = seconds, t->slowest_call = t->calls;
}

static enum op_sync sync_mode(void)
{
    if (op_sync == SYNC_UNSET) {
        const char *profile = getenv("ESFT_CUDA_PROFILE"), *each = getenv("ESFT_CUDA_SYNC");
        op_sync = profile && strcmp(profile, "0") != 0 ? SYNC_PROFILE
                  : each && strcmp(each, "0") != 0     ? SYNC_EACH
                                                       : SYNC_NONE;
        last_mark = now_seconds();
    }
    return op_sync;
}

/* An op begins: under the profile, the time since the previous op ended goes to the
 * host's bucket (model code, MPI, the phases between ops), and to this op's "host
 * before" column (which op the host's time precedes). */
static void op_begin_in(const char *op)
{
    if (sync_mode() != SYNC_PROFILE) return;
    check_cuda(cudaDeviceSynchronize());
    double t = now_seconds();
    charge("(host, between ops)", t - last_mark);
    op_line(op)->host_before += t - last_mark;
    last_mark = t;
}
#define op_begin() op_begin_in(__func__)

/* An op (or transfer) has been issued: report a launch error; under ESFT_CUDA_SYNC or
 * ESFT_CUDA_PROFILE wait for it, and under the profile charge the time since the previous
 * op ended to this one (so it holds the host's time between the two as well). */
static void op_end(const char *op)
{
    enum op_sync mode = sync_mode();
    if (mode == SYNC_NONE) {
        check_cuda(cudaGetLastError());
        return;
    }
    check_cuda(cudaDeviceSynchronize());
    if (mode != SYNC_PROFILE) return;
    double t = now_seconds();
    charge(op, t - last_mark);
    last_mark = t;
}

static int by_time(const void *a, const void *b)
{
    double x = ((const struct op_time *)a)->seconds, y = ((const struct op_time *)b)->seconds;
    return (x < y) - (x > y);
}

/* The profile's table, most expensive op first; then it starts again. */
static void log_profile(void)
{
    if (op_sync != SYNC_PROFILE || n_op_times == 0) return;
    qsort(op_times, (size_t)n_op_times, sizeof op_times[0], by_time);
    double total = 0;
    for (int i = 0; i < n_op_times; i++) total += op_times[i].seconds;
    log_info("cuda profile (ESFT_CUDA_PROFILE: a device sync before and after each op): "
             "%.3f s in all; op, calls, total, mean, fastest and slowest call (which), share, "
             "the host's time before the op's calls", total);
    for (int i = 0; i < n_op_times; i++) {
        const struct op_time *t = &op_times[i];
        if (t->calls == 0) { /* an op that ends without a device call (a declaration) */
            log_info("cuda profile: %-30s no device work, host before %.3f ms", t->op,
                     1e3 * t->host_before);
            continue;
        }
        log_info("cuda profile: %-30s %7lld %10.3f ms %9.4f ms %9.4f ms %9.4f ms (#%lld) %5.1f%% "
                 "host before %.3f ms", t->op, t->calls, 1e3 * t->seconds,
                 1e3 * t->seconds / (double)t->calls, 1e3 * t->fastest, 1e3 * t->slowest,
                 t->slowest_call, total > 0 ? 100 * t->seconds / total : 0, 1e3 * t->host_before);
    }
    n_op_times = 0;
}

static void ok_in(int rc, const char *err, const char *op)
{
    if (rc != 0) fatal(EXIT_RUNTIME, "cuda backend: %s: %s", op, err);
    op_end(op);
}
#define ok(rc, err) ok_in((rc), (err), __func__)

static struct gemm_context *gemm(void)
{
    if (!gemm_ctx) {
        char err[256];
        gemm_ctx = gemm_create(err, sizeof err);
        if (!gemm_ctx) fatal(EXIT_RUNTIME, "cuda backend: %s", err);
    }
    return gemm_ctx;
}

/* The most tokens and rows the ops will be given (backend.h, reserve): the scratch and
 * the staging buffers grow to what these need at their first growth, so a later step
 * with a longer sample or more expert rows finds them large enough. */
static size_t reserved_tokens, reserved_rows;

static void cuda_reserve(size_t tokens, size_t rows)
{
    if (tokens > reserved_tokens) reserved_tokens = tokens;
    if (rows > reserved_rows) reserved_rows = rows;
}

static int most_tokens(int n)
{
    return (size_t)n > reserved_tokens ? n : (int)reserved_tokens;
}

static int most_rows(int n)
{
    return (size_t)n > reserved_rows ? n : (int)reserved_rows;
}

/* The ops' device scratch: `bytes` now, `most` (the reserved sizes' need) when it grows. */
static void *scratch_most(size_t bytes, size_t most)
{
    if (bytes > scratch_size) {
        if (most > bytes) bytes = most;
        if (scratch_buf) check_cuda(cudaFree(scratch_buf));
        scratch_buf = NULL;
        check_cuda(cudaMalloc(&scratch_buf, bytes));
        alloc_watch_note(0, __FILE__, __LINE__);
        scratch_size = bytes;
    }
    return scratch_buf;
}

static void *scratch(size_t bytes)
{
    return scratch_most(bytes, bytes);
}

/* Host buffers for the values the ops read back, one per use, grown to the largest size
 * asked and kept (the step loop allocates nothing once it has run a step); freed by
 * backend_cuda_release. */
enum staging { STAGE_OFFSETS, STAGE_SAMPLES, STAGE_STARTS, STAGE_CE_STATE, STAGE_CE_BEST,
               STAGE_CE_LABELS, STAGE_ROW_LOSS, STAGE_ROW_LABELS, STAGE_NORM, STAGE_COUNT };
static struct {
    void *p;
    size_t bytes;
} staging[STAGE_COUNT];

static void *staging_most(enum staging which, size_t bytes, size_t most)
{
    if (bytes > staging[which].bytes) {
        if (most > bytes) bytes = most;
        free(staging[which].p);
        staging[which].p = xmalloc(bytes);
        staging[which].bytes = bytes;
    }
    return staging[which].p;
}

static void *staging_buffer(enum staging which, size_t bytes)
{
    return staging_most(which, bytes, bytes);
}

/* A staging buffer of `width` bytes a token for N tokens (at least 1), grown for the
 * reserved tokens. */
static void *staging_tokens(enum staging which, int N, size_t width)
{
    return staging_most(which, (size_t)(N > 0 ? N : 1) * width,
                        (size_t)most_tokens(N > 0 ? N : 1) * width);
}

/* The experts' offsets[E+1], read back for the per-expert GEMMs (a staging buffer: valid
 * until the next call). */
static int32_t *host_offsets(const int32_t *offsets, int E)
{
    int32_t *host = staging_buffer(STAGE_OFFSETS, (size_t)(E + 1) * sizeof(int32_t));
    check_cuda(cudaMemcpy(host, offsets, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost));
    backend_count_download((size_t)(E + 1) * sizeof(int32_t));
    return host;
}

/* The row kernels' description of a router (moe.h), from the op table's: every kind but
 * softmax top-k without C2R lists, which has its own kernel (cuda_router_topk). */
static struct moe_router row_router(const struct router_params *rp)
{
    struct moe_router r = {MOE_ROUTER_SOFTMAX, rp->renormalise, rp->scaling, 1, 1, rp->bias,
                           rp->collaborators, rp->top_t};
    if (rp->kind == ROUTER_SIGMOID_BIAS)
        r.kind = MOE_ROUTER_SIGMOID_BIAS;
    else if (rp->kind == ROUTER_TOPK_SOFTMAX)
        r.kind = MOE_ROUTER_TOPK_SOFTMAX;
    else if (rp->kind != ROUTER_GROUPED_GREEDY && rp->kind != ROUTER_SOFTMAX_TOPK)
        fatal(EXIT_RUNTIME, "cuda backend: router kind %d is not implemented", (int)rp->kind);
    if (rp->kind == ROUTER_GROUPED_GREEDY || rp->kind == ROUTER_SIGMOID_BIAS) {
        r.n_group = rp->n_group; /* softmax top-k and gpt_oss's router ignore the groups */
        r.topk_group = rp->topk_group;
    }
    return r;
}

static void cuda_embedding(float *x, const int32_t *tokens, const float *table, int N, int H)
{
    op_begin();
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
static bool tf32_mode;
static void *operand_buf; /* activations rounded to bf16 */
static size_t operand_size;
static void *output_buf; /* the frozen experts' grouped outputs, bf16 */
static size_t output_size;
static const void **expert_weights; /* their bf16 weights, NULL for a trained expert */
static int expert_weights_capacity;

/* Forgets every declared run and frees the copies. */
static void forget_constants(void)
{
    for (int i = 0; i < n_constants; i++)
        if (constants[i].bf16) check_cuda(cudaFree(constants[i].bf16));
    n_constants = 0;
}

static void cuda_constant(const float *p, size_t n)
{
    op_begin();
    if (!p) { /* the model is freed: its memory may come back as anything */
        log_profile(); /* and its phase has ended: the profile so far */
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
            alloc_watch_note(0, __FILE__, __LINE__);
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
        alloc_watch_note(0, __FILE__, __LINE__);
        operand_size = n * 2;
    }
    char err[256];
    ok(gemm_to_bf16(operand_buf, x, n, err, sizeof err), err);
    return operand_buf;
}

/* A bf16 buffer of n elements for the frozen experts' grouped outputs. */
static void *bf16_output(size_t n)
{
    if (n * 2 > output_size) {
        if (output_buf) check_cuda(cudaFree(output_buf));
        check_cuda(cudaMalloc(&output_buf, n * 2));
        alloc_watch_note(0, __FILE__, __LINE__);
        output_size = n * 2;
    }
    return output_buf;
}

/* The bf16 copies of the E expert weights w[e] (O x I each), NULL for a trained expert
 * (no copy: fp32); NULL when no expert with rows has one. */
static const void *const *bf16_experts(const float *const *w, const int32_t *host, int E,
                                       size_t size)
{
    if (E > expert_weights_capacity) {
        expert_weights = realloc(expert_weights, (size_t)E * sizeof *expert_weights);
        if (!expert_weights) fatal(EXIT_RUNTIME, "cuda backend: out of host memory");
        expert_weights_capacity = E;
    }
    bool any = false;
    for (int e = 0; e < E; e++) {
        expert_weights[e] = bf16_weight(w[e], size);
        any |= expert_weights[e] && host[e + 1] > host[e];
    }
    return any ? expert_weights : NULL;
}

static bool grouped_batched(void);

/* The frozen experts' part of a grouped product in bf16 mode, ahead of the per-expert loop
 * over the rest: out[rows, cols] (fp32) for every row, the frozen experts' rows from one
 * grouped bf16 GEMM (bf16 output, widened), the other rows left for the loop to write.
 * Returns the bf16 weights (NULL: no frozen expert with rows, nothing done). */
static const void *const *frozen_experts_grouped(float *out, const void *in_bf16,
                                                 const float *const *w, const int32_t *host,
                                                 int E, int I, int O, bool input_grad)
{
    if (!grouped_batched() || I == 0 || O == 0 || host[E] == host[0]) return NULL;
    const void *const *wb = bf16_experts(w, host, E, (size_t)O * I);
    if (!wb) return NULL;
    char err[256];
    int cols = input_grad ? I : O;
    size_t n = (size_t)(host[E] - host[0]) * cols;
    char *buf = (char *)bf16_output((size_t)host[E] * cols);
    ok(input_grad ? gemm_grouped_linear_dx_bf16(gemm(), buf, in_bf16, wb, host, E, I, O, err, sizeof err)
                  : gemm_grouped_linear_bf16(gemm(), buf, in_bf16, wb, host, E, I, O, err, sizeof err),
       err);
    ok(gemm_from_bf16(out + (size_t)host[0] * cols, buf + (size_t)host[0] * cols * 2, n, err,
                      sizeof err),
       err);
    return wb;
}

static void cuda_linear(float *y, const float *x, const float *w, const float *bias, int N, int I,
                        int O, bool accumulate)
{
    op_begin();
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
    op_begin();
    char err[256];
    ok(dense_rmsnorm(y, rstd, x, w, R, D, eps, err, sizeof err), err);
}

static void cuda_rope(float *x, const int32_t *positions, const float *inv_freq,
                      float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                      enum hf_rope_layout layout)
{
    op_begin();
    char err[256];
    ok(dense_rope(x, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim,
                  layout == ROPE_INTERLEAVED, 0, err, sizeof err),
       err);
}

/* The samples of a batch, from sample_start copied back (N integers): starts[count + 1]
 * and the longest sample (a staging buffer: valid until the next call). */
static int *batch_samples(const int32_t *sample_start, int N, int *count, int *longest)
{
    int32_t *host = staging_tokens(STAGE_SAMPLES, N, sizeof *host);
    int *starts = staging_tokens(STAGE_STARTS, N + 1, sizeof *starts);
    if (N > 0) check_cuda(cudaMemcpy(host, sample_start, (size_t)N * sizeof *host, cudaMemcpyDeviceToHost));
    backend_count_download((size_t)N * sizeof *host);
    *count = attention_gemm_samples(host, N, starts, longest);
    return starts;
}

/* The scratch of the cuBLAS attention: the score blocks, then (a backward with dsinks)
 * the per-(token, head) sink terms; *gm the mask's window and sinks. */
static void *attention_scratch(const struct attention_mask *mask, struct attention_gemm_mask *gm,
                               int longest, int N, int nH, int nKV, bool backward)
{
    size_t blocks = attention_gemm_workspace(longest, nH, nKV);
    size_t most_blocks = attention_gemm_workspace(most_tokens(longest), nH, nKV);
    bool terms = backward && mask->sinks && mask->dsinks;
    size_t term_bytes = terms ? (size_t)N * nH * sizeof(float) : 0;
    size_t most_terms = terms ? (size_t)most_tokens(N) * nH * sizeof(float) : 0;
    char *ws = scratch_most(blocks + term_bytes, most_blocks + most_terms);
    *gm = (struct attention_gemm_mask){mask->window, mask->sinks, backward ? mask->dsinks : NULL,
                                       terms ? (float *)(ws + blocks) : NULL};
    return ws;
}

/* Whether attention runs on the tiled bf16 kernels (attention_flash.h): in the tf32 and
 * bf16 modes, or when ESFT_CUDA_ATTENTION=flash, for the shapes they cover; never with
 * ESFT_CUDA_ATTENTION=gemm. fp32 mode keeps the cuBLAS path's fp32 products by default. */
static bool use_flash(const struct attention_mask *mask, int Dh, int Dv)
{
    const char *choice = getenv("ESFT_CUDA_ATTENTION");
    bool forced = false;
    if (choice && *choice) {
        if (strcmp(choice, "gemm") == 0) return false;
        if (strcmp(choice, "flash") != 0)
            fatal(EXIT_RUNTIME, "ESFT_CUDA_ATTENTION=%s: not gemm or flash", choice);
        forced = true;
    }
    bool fits = Dv == Dh && attention_flash_supports(Dh) && !mask->window && !mask->sinks;
    return fits && (forced || tf32_mode || bf16_mode);
}

/* Attention on the tiled kernels where use_flash says so; else by cuBLAS GEMMs and a row
 * softmax (kernels/attention_gemm.cu): the scores of a block of queries at a time, on the
 * tensor cores' fp32 path (or TF32). */
static void cuda_attention(float *out, const float *q, const float *k, const float *v,
                           const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                           int Dv, float scale)
{
    op_begin();
    char err[256];
    if (use_flash(mask, Dh, Dv)) {
        ok(attention_flash_forward(out, NULL, q, k, v, mask->sample_start, N, nH, nKV, Dh, scale,
                                   err, sizeof err),
           err);
        return;
    }
    int count, longest;
    int *starts = batch_samples(mask->sample_start, N, &count, &longest);
    struct attention_gemm_mask gm;
    void *ws = attention_scratch(mask, &gm, longest, N, nH, nKV, false);
    ok(attention_gemm_forward(gemm_cublas(gemm()), out, q, k, v, starts, count, nH, nKV, Dh, Dv,
                              scale, &gm, ws, err, sizeof err),
       err);
}

/* copy_columns: a strided 2D copy (cudaMemcpy2D); accumulate by cuBLAS's geam, which
 * adds in place (C = B, ldc = ldb): row-major [rows, cols] with stride ld is column-major
 * [cols, rows] with the same ld. */
static void cuda_copy_columns(float *dst, int dst_ld, const float *src, int src_ld, int rows,
                              int cols, bool accumulate)
{
    op_begin();
    if (rows <= 0 || cols <= 0) return;
    if (!accumulate) {
        check_cuda(cudaMemcpy2D(dst, (size_t)dst_ld * sizeof(float), src,
                                (size_t)src_ld * sizeof(float), (size_t)cols * sizeof(float),
                                (size_t)rows, cudaMemcpyDeviceToDevice));
        op_end(__func__);
        return;
    }
    const float one = 1.0f;
    cublasStatus_t status = cublasSgeam((cublasHandle_t)gemm_cublas(gemm()), CUBLAS_OP_N,
                                        CUBLAS_OP_N, cols, rows, &one, src, src_ld, &one, dst,
                                        dst_ld, dst, dst_ld);
    if (status != CUBLAS_STATUS_SUCCESS)
        fatal(EXIT_RUNTIME, "cuda backend: copy_columns: cublasSgeam failed (status %d)",
              (int)status);
    op_end(__func__);
}

static void cuda_router_topk(int32_t *ids, float *weights, float *probs, const float *logits, int N,
                             int E, int K, const struct router_params *rp)
{
    op_begin();
    char err[256];
    if (rp->kind == ROUTER_SOFTMAX_TOPK && !rp->collaborators) {
        ok(moe_router_topk(ids, weights, probs, logits, N, E, K, rp->renormalise, rp->scaling, err,
                           sizeof err),
           err);
        return;
    }
    struct moe_router r = row_router(rp);
    ok(moe_router_rows(ids, weights, probs, logits, N, E, K, &r,
                       scratch_most(moe_router_rows_workspace(N, E, r.n_group),
                                    moe_router_rows_workspace(most_tokens(N), E, r.n_group)),
                       err, sizeof err),
       err);
}

static void cuda_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                                      const int32_t *ids, int N, int E, int K)
{
    op_begin();
    char err[256];
    ok(moe_router_balance_stats(counts, prob_sums, probs, ids, N, E, K, err, sizeof err), err);
}

static void cuda_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row,
                                   int32_t *row_of_slot, const int32_t *ids, int N, int K, int E)
{
    op_begin();
    char err[256];
    int M = N * K;
    ok(moe_permute_by_expert(expert_offsets, slot_of_row, row_of_slot, ids, M, E,
                             scratch_most(moe_permute_workspace(M, E),
                                          moe_permute_workspace(most_rows(M), E)),
                             err, sizeof err),
       err);
}

static void cuda_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                             int H)
{
    op_begin();
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

/* The experts' fp32 (or TF32) GEMMs when they are one fp32 block (else expert by expert):
 * all in one cublasGemmGroupedBatchedEx, or ESFT_CUDA_GROUPED=loop one cuBLAS call per
 * expert. At a few hundred rows an expert the loop is bound by its launches (128 experts:
 * 128 calls where one would do). */
static bool grouped_batched(void)
{
    static int batched = -1;
    if (batched < 0) {
        const char *v = getenv("ESFT_CUDA_GROUPED");
        batched = !(v && strcmp(v, "loop") == 0);
    }
    return batched;
}

static void cuda_grouped_linear(float *y, const float *x, const float *const *w,
                                const int32_t *offsets, int E, int I, int O)
{
    op_begin();
    char err[256];
    int32_t *host = host_offsets(offsets, E);
    int rc = 0;
    if (bf16_mode || !experts_in_one_block(w, E, (size_t)O * I)) {
        /* the frozen ones in one grouped bf16 call (ESFT_CUDA_GROUPED=loop: one by one),
         * then expert by expert: a frozen one on bf16, a trained one on fp32 */
        const char *xb = host[E] > 0 ? bf16_operand(x, (size_t)host[E] * I) : NULL;
        const void *const *grouped = frozen_experts_grouped(y, xb, w, host, E, I, O, false);
        for (int e = 0; e < E && rc == 0; e++) {
            int rows = host[e + 1] - host[e];
            if (rows == 0 || (grouped && grouped[e])) continue;
            const float *we = w[e];
            const void *wb = bf16_weight(we, (size_t)O * I);
            float *ye = y + (size_t)host[e] * O;
            rc = wb ? gemm_linear(gemm(), ye, xb + (size_t)host[e] * I * 2, wb, NULL, rows, I, O, 0,
                                  GEMM_BF16, err, sizeof err)
                    : gemm_linear(gemm(), ye, x + (size_t)host[e] * I, we, NULL, rows, I, O, 0,
                                  GEMM_F32, err, sizeof err);
        }
    } else if (grouped_batched()) {
        rc = gemm_grouped_linear_batched(gemm(), y, GEMM_F32, x, E ? w[0] : NULL, host, E, I, O,
                                         GEMM_F32, err, sizeof err); /* one block from w[0] */
    } else {
        rc = gemm_grouped_linear(gemm(), y, x, E ? w[0] : NULL, host, E, I, O, GEMM_F32, err,
                                 sizeof err);
    }
    ok(rc, err);
}

static void cuda_glu(float *h, const float *gate, const float *up, size_t count,
                     enum hf_activation act)
{
    op_begin();
    char err[256];
    ok(moe_glu(h, gate, up, count, act == ACT_GELU, err, sizeof err), err);
}

static void cuda_glu_clamped(float *h, const float *gate, const float *up, size_t count,
                             float alpha, float limit)
{
    op_begin();
    char err[256];
    ok(moe_glu_clamped(h, gate, up, count, alpha, limit, err, sizeof err), err);
}

/* The rows' count comes back with the offsets (E + 1 integers), as the grouped GEMMs'. */
static void cuda_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O)
{
    op_begin();
    char err[256];
    int32_t *host = host_offsets(offsets, E);
    int rows = host[E];
    ok(moe_grouped_bias(y, bias, offsets, E, O, rows, err, sizeof err), err);
}

static void cuda_combine(float *out, const float *ys, const float *weights,
                         const int32_t *row_of_slot, int N, int K, int H, bool accumulate)
{
    op_begin();
    char err[256];
    ok(moe_combine(out, ys, weights, row_of_slot, N, K, H, accumulate, err, sizeof err), err);
}

static void cuda_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N, int H)
{
    op_begin();
    char err[256];
    ok(moe_add_sigmoid_gated(y, s, gate_logit, N, H, err, sizeof err), err);
}

static void cuda_clamp(float *x, size_t count, float low, float high)
{
    op_begin();
    char err[256];
    ok(dense_clamp(x, count, low, high, err, sizeof err), err);
}

static void cuda_add(float *y, const float *x, const float *r, size_t count)
{
    op_begin();
    char err[256];
    ok(dense_add(y, x, r, count, err, sizeof err), err);
}

static double cuda_cross_entropy_sum(const float *logits, const int32_t *labels, int N, int V,
                                     long long *counted)
{
    op_begin();
    char err[256];
    double *row_loss = scratch_most((size_t)(N > 0 ? N : 1) * sizeof(double),
                                    (size_t)most_tokens(N > 0 ? N : 1) * sizeof(double));
    double total = 0;
    ok(dense_cross_entropy(row_loss, NULL, logits, labels, N, V, 0.0f, err, sizeof err), err);
    double *host_loss = staging_tokens(STAGE_ROW_LOSS, N, sizeof(double));
    int32_t *host_labels = staging_tokens(STAGE_ROW_LABELS, N, sizeof(int32_t));
    ok(dense_sum_rows(&total, counted, row_loss, labels, N, host_loss, host_labels, err, sizeof err),
       err);
    return total;
}

static void cuda_linear_backward(float *dx, float *dw, float *dbias, const float *dy,
                                 const float *x, const float *w, int N, int I, int O,
                                 bool accumulate_dx)
{
    op_begin();
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
    void *workspace = dbias ? scratch_most(gemm_bias_workspace(N, O),
                                           gemm_bias_workspace(most_rows(N), O))
                            : NULL;
    ok(gemm_linear_backward(gemm(), dx, dw, dbias, dy, x, w, N, I, O, accumulate_dx, GEMM_F32,
                            workspace, err, sizeof err),
       err);
}

static void cuda_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                  const float *w, const float *rstd, int R, int D,
                                  bool accumulate_dx)
{
    op_begin();
    char err[256];
    void *workspace = dw ? scratch_most(dense_rmsnorm_workspace(R, D),
                                        dense_rmsnorm_workspace(most_rows(R), D))
                         : NULL;
    ok(dense_rmsnorm_backward(dx, dw, dy, x, w, rstd, R, D, accumulate_dx, workspace, err,
                              sizeof err),
       err);
}

static void cuda_rope_backward(float *dx, const int32_t *positions, const float *inv_freq,
                               float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                               enum hf_rope_layout layout)
{
    op_begin();
    char err[256];
    ok(dense_rope(dx, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim,
                  layout == ROPE_INTERLEAVED, 1, err, sizeof err),
       err);
}

static void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                    const float *q, const float *k, const float *v,
                                    const float *out, const struct attention_mask *mask, int N,
                                    int nH, int nKV, int Dh, int Dv, float scale)
{
    op_begin();
    char err[256];
    if (use_flash(mask, Dh, Dv)) { /* the log-sum-exp recomputed: the op table has no slot */
        void *ws = scratch_most(attention_flash_workspace(N, nH),
                                attention_flash_workspace(most_tokens(N), nH));
        ok(attention_flash_backward(dq, dk, dv, dout, q, k, v, out, NULL, mask->sample_start, N,
                                    nH, nKV, Dh, scale, ws, err, sizeof err),
           err);
        return;
    }
    int count, longest;
    int *starts = batch_samples(mask->sample_start, N, &count, &longest);
    struct attention_gemm_mask gm;
    void *ws = attention_scratch(mask, &gm, longest, N, nH, nKV, true);
    ok(attention_gemm_backward(gemm_cublas(gemm()), dq, dk, dv, dout, q, k, v, starts, count, nH,
                               nKV, Dh, Dv, scale, &gm, ws, err, sizeof err),
       err);
}

static void cuda_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                                      const int32_t *ids, int N, int E, int K,
                                      const struct router_params *rp)
{
    op_begin();
    char err[256];
    if (rp->kind == ROUTER_SOFTMAX_TOPK) {
        ok(moe_router_topk_backward(dlogits, dweights, probs, ids, N, E, K, rp->renormalise,
                                    rp->scaling, err, sizeof err),
           err);
        return;
    }
    struct moe_router r = row_router(rp);
    ok(moe_router_rows_backward(dlogits, dweights, probs, ids, N, E, K, &r, err, sizeof err), err);
}

static void cuda_router_balance_backward(float *dlogits, const float *probs, const float *coef,
                                         int N, int E)
{
    op_begin();
    char err[256];
    ok(moe_router_balance_backward(dlogits, probs, coef, N, E, err, sizeof err), err);
}

static void cuda_grouped_linear_backward(float *dx, float *const *dw, const float *dy,
                                         const float *x, const float *const *w,
                                         const int32_t *offsets, int E, int I, int O)
{
    op_begin();
    char err[256];
    int32_t *host = host_offsets(offsets, E);
    int rc = 0;
    if (bf16_mode || !experts_in_one_block(w, E, (size_t)O * I)) {
        /* dx of the frozen ones in one grouped bf16 call (ESFT_CUDA_GROUPED=loop: one by
         * one), then expert by expert: dx of a frozen one on bf16; a trained one on fp32 */
        const char *dyb = dx && host[E] > 0 ? bf16_operand(dy, (size_t)host[E] * O) : NULL;
        const void *const *grouped = dx ? frozen_experts_grouped(dx, dyb, w, host, E, I, O, true) : NULL;
        for (int e = 0; e < E && rc == 0; e++) {
            int rows = host[e + 1] - host[e];
            if (rows == 0 || (grouped && grouped[e] && !(dw && dw[e]))) continue;
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
    } else if (grouped_batched()) {
        rc = gemm_grouped_linear_backward_batched(gemm(), dx, dw, dy, x, E ? w[0] : NULL, host, E,
                                                  I, O, GEMM_F32, err, sizeof err);
    } else {
        rc = gemm_grouped_linear_backward(gemm(), dx, dw, dy, x, E ? w[0] : NULL, host, E, I, O,
                                          GEMM_F32, err, sizeof err);
    }
    ok(rc, err);
}

static void cuda_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                              const float *up, size_t count, enum hf_activation act)
{
    op_begin();
    char err[256];
    ok(moe_glu_backward(dgate, dup, dh, gate, up, count, act == ACT_GELU, err, sizeof err), err);
}

static void cuda_combine_backward(float *dys, float *dweights, const float *dout, const float *ys,
                                  const float *weights, const int32_t *row_of_slot, int N, int K,
                                  int H)
{
    op_begin();
    char err[256];
    ok(moe_combine_backward(dys, dweights, dout, ys, weights, row_of_slot, N, K, H, err, sizeof err),
       err);
}

static void cuda_router_dense_backward(float *dlogits, const float *dots, const float *probs,
                                       const int32_t *ids, int N, int E, int K,
                                       const struct router_params *rp)
{
    op_begin();
    char err[256];
    if (rp->kind != ROUTER_SOFTMAX_TOPK)
        fatal(EXIT_RUNTIME,
              "cuda backend: router_dense_backward: router kind %d is not a "
              "softmax top-k router",
              (int)rp->kind);
    ok(moe_router_dense_backward(dlogits, dots, probs, ids, N, E, K, rp->renormalise, rp->scaling,
                                 err, sizeof err),
       err);
}

static void cuda_row_dots(float *out, int out_ld, const float *x, const float *y, int N, int H)
{
    op_begin();
    char err[256];
    ok(moe_row_dots(out, out_ld, x, y, N, H, err, sizeof err), err);
}

static void cuda_gather_rows_backward(float *dx, const float *dxs, const int32_t *row_of_slot,
                                      int N, int K, int H, bool accumulate)
{
    op_begin();
    char err[256];
    ok(moe_gather_rows_backward(dx, dxs, row_of_slot, N, K, H, accumulate, err, sizeof err), err);
}

static void cuda_add_sigmoid_gated_backward(float *ds, float *dgate_logit, const float *dy,
                                            const float *s, const float *gate_logit, int N, int H)
{
    op_begin();
    char err[256];
    ok(moe_add_sigmoid_gated_backward(ds, dgate_logit, dy, s, gate_logit, N, H, err, sizeof err),
       err);
}

static void cuda_glu_clamped_backward(float *dgate, float *dup, const float *dh,
                                      const float *gate, const float *up, size_t count,
                                      float alpha, float limit)
{
    op_begin();
    char err[256];
    ok(moe_glu_clamped_backward(dgate, dup, dh, gate, up, count, alpha, limit, err, sizeof err),
       err);
}

/* dbias is a host array of E device pointers: copied to the scratch for the kernel. */
static void cuda_grouped_bias_backward(float *const *dbias, const float *dy,
                                       const int32_t *offsets, int E, int O)
{
    op_begin();
    char err[256];
    if (E <= 0) return;
    float **pointers = scratch((size_t)E * sizeof *pointers);
    check_cuda(cudaMemcpy(pointers, dbias, (size_t)E * sizeof *pointers, cudaMemcpyHostToDevice));
    ok(moe_grouped_bias_backward(pointers, dy, offsets, E, O, err, sizeof err), err);
}

static void cuda_clamp_backward(float *dx, const float *y, size_t count, float low, float high)
{
    op_begin();
    char err[256];
    ok(dense_clamp_backward(dx, y, count, low, high, err, sizeof err), err);
}

static void cuda_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *labels,
                                        int N, int V, float scale)
{
    op_begin();
    char err[256];
    double *row_loss = scratch_most((size_t)(N > 0 ? N : 1) * sizeof(double),
                                    (size_t)most_tokens(N > 0 ? N : 1) * sizeof(double));
    ok(dense_cross_entropy(row_loss, dlogits, logits, labels, N, V, scale, err, sizeof err), err);
}

static void cuda_ce_chunk_update(float *state, int32_t *best, const float *logits,
                                 const int32_t *labels, int N, int C, int v0)
{
    op_begin();
    char err[256];
    ok(dense_ce_chunk_update(state, best, logits, labels, N, C, v0, err, sizeof err), err);
}

/* The loss of the chunked cross-entropy: the state, best ids and labels downloaded (6 N
 * numbers), summed on the host in token order as the CPU backend sums them. */
static double cuda_ce_chunk_finish(const float *state, const int32_t *best, const int32_t *labels,
                                   int N, long long *counted, long long *correct)
{
    op_begin();
    float *st = staging_tokens(STAGE_CE_STATE, N, 4 * sizeof(float));
    int32_t *host_best = staging_tokens(STAGE_CE_BEST, N, sizeof(int32_t));
    int32_t *host_labels = staging_tokens(STAGE_CE_LABELS, N, sizeof(int32_t));
    cuda_download(st, state, (size_t)N * 4 * sizeof(float));
    cuda_download(host_best, best, (size_t)N * sizeof(int32_t));
    cuda_download(host_labels, labels, (size_t)N * sizeof(int32_t));
    double total = 0.0;
    long long count = 0, right = 0;
    for (int n = 0; n < N; n++) {
        if (host_labels[n] < 0) continue;
        total += cross_entropy_row(st[4 * n], st[4 * n + 1], st[4 * n + 2]);
        count++;
        right += host_best[n] == host_labels[n];
    }
    *counted = count;
    *correct = right;
    return total;
}

static void cuda_ce_chunk_backward(float *dlogits, const float *logits, const float *state,
                                   const int32_t *labels, int N, int C, int v0, float scale)
{
    op_begin();
    char err[256];
    ok(dense_ce_chunk_backward(dlogits, logits, state, labels, N, C, v0, scale, err, sizeof err),
       err);
}

static void cuda_embedding_backward(float *dtable, const float *dx, const int32_t *tokens, int N,
                                    int H)
{
    op_begin();
    char err[256];
    ok(dense_embedding_backward(dtable, dx, tokens, N, H, err, sizeof err), err);
}

static void cuda_adamw(float *data, float *m, float *v, const float *grad, size_t n,
                       const struct adamw_coef *coef)
{
    op_begin();
    char err[256];
    ok(optim_adamw(data, m, v, grad, n, *coef, err, sizeof err), err);
}

static double cuda_sum_squares(const float *x, size_t n)
{
    op_begin();
    char err[256];
    double sum = 0;
    size_t bytes = optim_sum_squares_workspace(n);
    ok(optim_sum_squares(&sum, x, n, scratch(bytes), staging_buffer(STAGE_NORM, bytes), err,
                         sizeof err),
       err);
    backend_count_download(sizeof sum);
    return sum;
}

static void cuda_scale(float *x, size_t n, float factor)
{
    op_begin();
    char err[256];
    ok(optim_scale(x, n, factor, err, sizeof err), err);
}

static long long cuda_count_correct(const float *logits, const int32_t *labels, int N, int V)
{
    op_begin();
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
    op_begin();
    void *p = NULL;
    alloc_watch_note(bytes, __FILE__, __LINE__);
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
    op_end(__func__);
    return p;
}

static void cuda_release(void *p)
{
    op_begin();
    if (p) check_cuda(cudaFree(p));
    op_end(__func__);
}

static void cuda_upload(void *dst, const void *host_src, size_t bytes)
{
    op_begin();
    if (bytes) check_cuda(cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice));
    backend_count_upload(bytes);
    op_end(__func__);
}

static void cuda_download(void *host_dst, const void *src, size_t bytes)
{
    op_begin();
    if (bytes) check_cuda(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost));
    backend_count_download(bytes);
    op_end(__func__);
}

static void cuda_copy(void *dst, const void *src, size_t bytes)
{
    op_begin();
    if (bytes) check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
    op_end(__func__);
}

static void cuda_zero(void *p, size_t bytes)
{
    op_begin();
    if (bytes) check_cuda(cudaMemset(p, 0, bytes));
    op_end(__func__);
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
        .router_dense_backward = cuda_router_dense_backward,
        .grouped_linear_backward = cuda_grouped_linear_backward,
        .grouped_bias_backward = cuda_grouped_bias_backward,
        .glu_backward = cuda_glu_backward,
        .glu_clamped_backward = cuda_glu_clamped_backward,
        .combine_backward = cuda_combine_backward,
        .gather_rows_backward = cuda_gather_rows_backward,
        .row_dots = cuda_row_dots,
        .add_sigmoid_gated_backward = cuda_add_sigmoid_gated_backward,
        .clamp_backward = cuda_clamp_backward,
        .cross_entropy_backward = cuda_cross_entropy_backward,
        .ce_chunk_update = cuda_ce_chunk_update,
        .ce_chunk_finish = cuda_ce_chunk_finish,
        .ce_chunk_backward = cuda_ce_chunk_backward,
        .logits_budget = (size_t)4 << 30,
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
        .reserve = cuda_reserve,
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
    tf32_mode = on;
}

void backend_cuda_release(void)
{
    log_profile();
    gemm_destroy(gemm_ctx);
    gemm_ctx = NULL;
    tf32_mode = false; /* a new context starts with fp32 products */
    forget_constants();
    free(constants);
    constants = NULL;
    constants_capacity = 0;
    if (operand_buf) check_cuda(cudaFree(operand_buf));
    operand_buf = NULL;
    operand_size = 0;
    if (output_buf) check_cuda(cudaFree(output_buf));
    output_buf = NULL;
    output_size = 0;
    free(expert_weights);
    expert_weights = NULL;
    expert_weights_capacity = 0;
    for (int i = 0; i < STAGE_COUNT; i++) free(staging[i].p), staging[i].p = NULL, staging[i].bytes = 0;
    if (scratch_buf) check_cuda(cudaFree(scratch_buf)); /* a sticky error shows here */
    scratch_buf = NULL;
    scratch_size = 0;
}
