/* cpu_ops: the fp32 CPU backend (see backend.h): OpenBLAS for the GEMMs, OpenMP over
 * tokens, heads or rows for the rest. It is the reference the CUDA backend is tested
 * against, so every op computes in the order transformers does (softmax and norms in
 * fp32, as the Hugging Face modeling code does).
 *
 * Threads: OpenMP owns every thread. OpenBLAS is kept single-threaded and called from
 * inside OpenMP loops over blocks of rows, experts or (sample, head) pairs; a threaded
 * OpenBLAS beside OpenMP's pool made the two spin against each other (measured: expert
 * GEMMs 1.3x faster on 2 cores when only one pool runs). Work is cut into blocks whose
 * shapes depend only on the problem's sizes, so results do not change with the thread
 * count (OpenBLAS's bits for an element depend on the shape of the call). */
#include <cblas.h>
/* OpenBLAS's cblas.h pulls in <complex.h>, whose macro I would replace the conventional
 * name of the input width. */
#undef I
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_router.h"
#include "dense_math.h"
#include "log.h"
#include "moe_math.h"
#include "cpu_ops_internal.h"

/* e^x for x <= 0, the arguments of a softmax after its maximum is subtracted, written so
 * that loops over it vectorise (libm's expf does not). x = n ln2 + r with |r| <= ln2/2;
 * e^r by its Taylor polynomial to degree 6 (remainder < 1.3e-7 relative); 2^n built in
 * the exponent bits. Below -87 the result would leave the normal range: clamped there
 * (e^-87 ~ 1.6e-38 counts as nothing next to the row maximum's e^0 = 1). */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    union {
        float f;
        uint32_t u;
    } shifted = {.f = x * 1.44269504088896341f + round}, scale;
    float n = shifted.f - round;
    float r = x - n * 0.693145751953125f; /* ln 2 in two parts, so n * ln2 is exact */
    r = r - n * 1.42860682030941723e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f +
                                                   r * (8.33333377e-3f + r * 1.38888892e-3f)))));
    /* 2^n from the integer n in the low mantissa bits of n + 1.5 * 2^23 (bits 0x4B400000
     * + n), in unsigned arithmetic: a NaN x (a diverged model) gives a NaN p and so a NaN
     * result, never a float-to-int conversion out of range */
    scale.u = (shifted.u - 0x4B400000u + 127u) << 23;
    return p * scale.f;
}

/* Row reductions of the softmaxes, with eight running partial results so that gcc
 * vectorises them at -O2 (it does not reorder a single accumulator). The summation
 * order is fixed, so results are the same on every run. The exponential sums accumulate
 * in double: over a real vocabulary (151936 terms, about 19k per lane) fp32 totals near
 * 1e3 drop every term below half their ulp, which left each row's sum about 1.8e-5 low
 * and biased the loss by as much (tests/test_cpu_ops.c holds this). The exponentials stay
 * fp32, as transformers' fp32 softmax forms them. */
enum { LANES = 8 };

static float row_max(const float *x, int n)
{
    float lane[LANES];
    for (int l = 0; l < LANES; l++) lane[l] = -INFINITY;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) lane[l] = x[i + l] > lane[l] ? x[i + l] : lane[l];
    float max = -INFINITY;
    for (; i < n; i++) max = x[i] > max ? x[i] : max;
    for (int l = 0; l < LANES; l++) max = lane[l] > max ? lane[l] : max;
    return max;
}

/* sum of e^(x[i] - max) */
static float row_exp_sum(const float *x, int n, float max)
{
    double lane[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) lane[l] += exp_nonpositive(x[i + l] - max);
    double sum = 0.0;
    for (; i < n; i++) sum += exp_nonpositive(x[i] - max);
    for (int l = 0; l < LANES; l++) sum += lane[l];
    return (float)sum;
}

/* x[i] = e^(x[i] - max) in place; returns their sum */
static float row_exp_store_sum(float *x, int n, float max)
{
    double lane[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            x[i + l] = exp_nonpositive(x[i + l] - max);
            lane[l] += x[i + l];
        }
    double sum = 0.0;
    for (; i < n; i++) {
        x[i] = exp_nonpositive(x[i] - max);
        sum += x[i];
    }
    for (int l = 0; l < LANES; l++) sum += lane[l];
    return (float)sum;
}

/* The most tokens and rows the ops will be given (backend.h, reserve): the scratch the
 * ops keep between calls is sized for them at its first use, so a later call with a
 * longer sample or more expert rows finds it large enough. */
static size_t reserved_tokens, reserved_rows;

static void cpu_reserve(size_t tokens, size_t rows)
{
    if (tokens > reserved_tokens) reserved_tokens = tokens;
    if (rows > reserved_rows) reserved_rows = rows;
}

static size_t most_tokens(size_t n)
{
    return n > reserved_tokens ? n : reserved_tokens;
}

static size_t most_rows(size_t n)
{
    return n > reserved_rows ? n : reserved_rows;
}

/* A kept buffer of `bytes`, grown to `most` bytes (what the reserved sizes need) when it
 * grows at all. */
static void *op_scratch(struct kept *k, size_t bytes, size_t most)
{
    if (bytes > k->bytes || !k->p) kept_buffer(k, most > bytes ? most : bytes);
    return k->p;
}

static void cpu_embedding(float *x, const int32_t *tokens, const float *table, int N, int H)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        memcpy(x + (size_t)n * H, table + (size_t)tokens[n] * H, (size_t)H * sizeof(float));
}

/* Rows per GEMM call when a matrix product is split across threads: large enough for
 * OpenBLAS's kernels to run at speed, small enough to balance 2 to 64 threads. */
enum { ROW_BLOCK = 64 };

/* The GEMM is cut into blocks that depend only on its sizes, never on the thread count:
 * OpenBLAS's result for an element depends on the shape of the call that computes it, so
 * a per-thread split would change results with OMP_NUM_THREADS. Wide outputs (lm_head)
 * are cut into column blocks, so each slice of the weight is streamed once (a row split
 * re-read lm_head's 64 MB weight once per block); narrow ones into row blocks. */
enum { LINEAR_COLUMN_BLOCK = 2048, LINEAR_ROW_BLOCK = 256 };

/* ---- bf16 weights (backend.h's weight_bf16) ------------------------------------------ *
 * A bf16 weight is multiplied in fp32: WEIGHT_BLOCK_FLOATS of it at a time (whole rows)
 * are widened to fp32 into one workspace, exactly (bf16 is the upper half of an fp32),
 * and sgemm runs on that block. The blocks depend on the shapes alone, so the results do
 * not depend on the thread count; the installed OpenBLAS exports no bf16 GEMM
 * (cblas_sbgemm) to use instead. */
enum { WEIGHT_BLOCK_FLOATS = 1 << 20 };
static float *weight_workspace; /* [WEIGHT_BLOCK_FLOATS], allocated at the first use */

static float bf16_value(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rows [first, first + rows) of the bf16 matrix w[., I] widened into the workspace. */
static const float *widen_rows(const uint16_t *w, int first, int rows, int I)
{
    if (!weight_workspace) weight_workspace = xmalloc(WEIGHT_BLOCK_FLOATS * sizeof(float));
    const uint16_t *from = w + (size_t)first * I;
    size_t count = (size_t)rows * I;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) weight_workspace[i] = bf16_value(from[i]);
    return weight_workspace;
}

/* Whole rows of a [., I] matrix per widened block. */
static int weight_block_rows(int I)
{
    if (I > WEIGHT_BLOCK_FLOATS)
        fatal(EXIT_RUNTIME, "cpu backend: a bf16 weight row of %d values exceeds the %d-value "
              "workspace", I, WEIGHT_BLOCK_FLOATS);
    return WEIGHT_BLOCK_FLOATS / (I > 0 ? I : 1);
}

/* y[N,O] (+)= x[N,I] @ w[O,I]^T for a bf16 w: per block of the weight's rows, the output
 * columns it gives, in row blocks of N over the threads. */
static void linear_bf16(float *y, const float *x, const uint16_t *w, int N, int I, int O,
                        bool accumulate)
{
    int block = weight_block_rows(I), row_blocks = (N + LINEAR_ROW_BLOCK - 1) / LINEAR_ROW_BLOCK;
    for (int o = 0; o < O; o += block) {
        int cols = O - o < block ? O - o : block;
        const float *wf = widen_rows(w, o, cols, I);
#pragma omp parallel for schedule(dynamic, 1)
        for (int b = 0; b < row_blocks; b++) {
            int first = b * LINEAR_ROW_BLOCK;
            int rows = N - first < LINEAR_ROW_BLOCK ? N - first : LINEAR_ROW_BLOCK;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, I, 1.0f,
                        x + (size_t)first * I, I, wf, I, accumulate ? 1.0f : 0.0f,
                        y + (size_t)first * O + o, O);
        }
    }
}

static int split_rows(int n);

/* dx[N,I] (+)= dy[N,O] @ w[O,I] for a bf16 w: the products of each block of the weight's
 * rows added in block order (the first writes unless accumulate_dx). */
static void linear_backward_bf16(float *dx, const float *dy, const uint16_t *w, int N, int I,
                                 int O, bool accumulate_dx)
{
    int block = weight_block_rows(I), row_block = split_rows(N);
    int row_blocks = (N + row_block - 1) / row_block;
    for (int o = 0; o < O; o += block) {
        int outputs = O - o < block ? O - o : block;
        const float *wf = widen_rows(w, o, outputs, I);
        float beta = o > 0 || accumulate_dx ? 1.0f : 0.0f;
#pragma omp parallel for schedule(dynamic, 1)
        for (int b = 0; b < row_blocks; b++) {
            int first = b * row_block, rows = N - first < row_block ? N - first : row_block;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, I, outputs, 1.0f,
                        dy + (size_t)first * O + o, O, wf, I, beta, dx + (size_t)first * I, I);
        }
    }
}

static void cpu_linear(float *y, const float *x, const float *w, const float *bias, int N,
                       int I, int O, bool accumulate)
{
    if (N == 0 || O == 0) return;
    float beta = accumulate ? 1.0f : 0.0f;
    if (weight_is_bf16(w)) {
        linear_bf16(y, x, weight_bf16_data(w), N, I, O, accumulate);
    } else if (O >= 2 * LINEAR_COLUMN_BLOCK) {
        int blocks = (O + LINEAR_COLUMN_BLOCK - 1) / LINEAR_COLUMN_BLOCK;
#pragma omp parallel for schedule(dynamic, 1)
        for (int b = 0; b < blocks; b++) {
            int first = b * LINEAR_COLUMN_BLOCK;
            int cols = O - first < LINEAR_COLUMN_BLOCK ? O - first : LINEAR_COLUMN_BLOCK;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, cols, I, 1.0f, x, I,
                        w + (size_t)first * I, I, beta, y + first, O);
        }
    } else {
        int blocks = (N + LINEAR_ROW_BLOCK - 1) / LINEAR_ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1)
        for (int b = 0; b < blocks; b++) {
            int first = b * LINEAR_ROW_BLOCK;
            int rows = N - first < LINEAR_ROW_BLOCK ? N - first : LINEAR_ROW_BLOCK;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, O, I, 1.0f,
                        x + (size_t)first * I, I, w, I, beta, y + (size_t)first * O, O);
        }
    }
    if (!bias) return;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) y[(size_t)n * O + o] += bias[o];
}

static void cpu_rmsnorm(float *y, float *rstd, const float *x, const float *w, int R, int D,
                        float eps)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)r * D;
        float *yr = y + (size_t)r * D;
        float sum = 0.0f;
        for (int d = 0; d < D; d++) sum += xr[d] * xr[d];
        float inv = rmsnorm_rstd(sum, D, eps);
        if (rstd) rstd[r] = inv;
        for (int d = 0; d < D; d++) yr[d] = rmsnorm_out(xr[d], w[d], inv);
    }
}

/* Scratch of the attention scores, one per thread, grown when a longer sample comes. */
static _Thread_local float *attention_scratch = NULL;
static _Thread_local size_t attention_scratch_size = 0;

enum { QUERY_BLOCK = 64 };

/* The keys a block of queries first .. last (within the sample) reads: from the first
 * query's earliest visible key (0 without a window) to the last query. */
static int block_first_key(const struct attention_mask *mask, int first)
{
    return mask->window && first - mask->window + 1 > 0 ? first - mask->window + 1 : 0;
}

/* The keys query i (within the sample) sees, as [*begin, *end) of a block's keys lo .. */
static void visible_keys(int *begin, int *end, int i, int lo, int window)
{
    *begin = window && i - window + 1 > lo ? i - window + 1 - lo : 0;
    *end = i + 1 - lo;
}

/* S[rows, keys] (scaled scores of queries first .. first+rows-1 of a sample against its
 * keys lo .. lo+keys-1) -> probabilities in place: query i = first + r sees keys
 * max(lo, i - window + 1) .. i (window 0: lo = 0 and all keys up to i), the rest 0. With
 * a sink (its logit: *sink), the row's max and denominator include it, and sink_prob[r]
 * gets its probability (which out drops). The forward and the backward (which recomputes
 * P) share it, so both see the same P. */
static void causal_softmax_block(float *S, float *sink_prob, int rows, int keys, int first,
                                 int lo, int window, const float *sink)
{
    for (int r = 0; r < rows; r++) {
        float *row = S + (size_t)r * keys;
        int begin, end;
        visible_keys(&begin, &end, first + r, lo, window);
        int visible = end - begin;
        float max = row_max(row + begin, visible);
        if (sink && *sink > max) max = *sink;
        float sum = row_exp_store_sum(row + begin, visible, max);
        float sink_exp = sink ? exp_nonpositive(*sink - max) : 0.0f;
        if (sink) sum += sink_exp;
        float inverse = 1.0f / sum;
        if (sink_prob) sink_prob[r] = sink_exp * inverse;
        for (int j = 0; j < begin; j++) row[j] = 0.0f;
        for (int j = begin; j < end; j++) row[j] *= inverse;
        for (int j = end; j < keys; j++) row[j] = 0.0f;
    }
}

/* Per (sample, head, block of QUERY_BLOCK queries): S = Q K^T * scale over the keys up to
 * the block's last query (from its first query's window start with a window; one GEMM),
 * causal softmax per row in fp32, O = P V (one GEMM). Keys past a query's own position or
 * before its window get probability 0; keys of other samples are never touched, which is
 * the per-sample mask of packed batches. */
static void cpu_attention(float *out, const float *q, const float *k, const float *v,
                          const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                          int Dv, float scale)
{
    int group = nH / nKV;
    int q_stride = nH * Dh, kv_stride = nKV * Dh, v_stride = nKV * Dv, out_stride = nH * Dv;
    /* samples are runs of tokens: token i starts one when sample_start[i] == i */
    int n_items = 0, longest = 0;
    for (int i = 0; i < N; i++) {
        if (mask->sample_start[i] != i) continue;
        int end = i + 1;
        while (end < N && mask->sample_start[end] == i) end++;
        if (end - i > longest) longest = end - i;
        n_items += nH * ((end - i + QUERY_BLOCK - 1) / QUERY_BLOCK);
    }
    static struct kept items_kept; /* start, length, head*blocks */
    size_t most_items = (size_t)nH * (most_tokens((size_t)N) * (QUERY_BLOCK + 1) / QUERY_BLOCK + 1);
    int32_t *items = op_scratch(&items_kept, (size_t)n_items * 3 * sizeof(int32_t),
                                most_items * 3 * sizeof(int32_t));
    int at = 0;
    for (int i = 0; i < N; i++) {
        if (mask->sample_start[i] != i) continue;
        int end = i + 1;
        while (end < N && mask->sample_start[end] == i) end++;
        int blocks = (end - i + QUERY_BLOCK - 1) / QUERY_BLOCK;
        for (int h = 0; h < nH; h++)
            for (int b = 0; b < blocks; b++) {
                items[3 * at] = i;
                items[3 * at + 1] = end - i;
                items[3 * at + 2] = h * blocks + b;
                at++;
            }
    }
#pragma omp parallel
    {
        size_t need = (size_t)QUERY_BLOCK * (size_t)longest;
        if (attention_scratch_size < need) {
            need = (size_t)QUERY_BLOCK * most_tokens((size_t)longest);
            free(attention_scratch);
            attention_scratch = xmalloc(need * sizeof(float));
            attention_scratch_size = need;
        }
        float *S = attention_scratch;
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            int start = items[3 * it], length = items[3 * it + 1];
            int blocks = (length + QUERY_BLOCK - 1) / QUERY_BLOCK;
            int h = items[3 * it + 2] / blocks, b = items[3 * it + 2] % blocks;
            int kv = h / group;
            int first = b * QUERY_BLOCK; /* first query of the block, within the sample */
            int rows = length - first < QUERY_BLOCK ? length - first : QUERY_BLOCK;
            int lo = block_first_key(mask, first);
            int keys = first + rows - lo; /* keys lo .. last query of the block */
            const float *qb = q + (size_t)(start + first) * q_stride + (size_t)h * Dh;
            const float *ks = k + (size_t)(start + lo) * kv_stride + (size_t)kv * Dh;
            const float *vs = v + (size_t)(start + lo) * v_stride + (size_t)kv * Dv;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, Dh, scale, qb,
                        q_stride, ks, kv_stride, 0.0f, S, keys);
            causal_softmax_block(S, NULL, rows, keys, first, lo, mask->window,
                                 mask->sinks ? mask->sinks + h : NULL);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dv, keys, 1.0f, S, keys,
                        vs, v_stride, 0.0f, out + (size_t)(start + first) * out_stride + (size_t)h * Dv,
                        out_stride);
        }
    }
}

static void cpu_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row,
                                  int32_t *row_of_slot, const int32_t *ids, int N, int K, int E)
{
    int M = N * K;
    for (int e = 0; e <= E; e++) expert_offsets[e] = 0;
    for (int s = 0; s < M; s++) expert_offsets[ids[s] + 1]++;
    for (int e = 0; e < E; e++) expert_offsets[e + 1] += expert_offsets[e];
    static struct kept next_kept;
    int32_t *next = kept_buffer(&next_kept, (size_t)E * sizeof(int32_t));
    memcpy(next, expert_offsets, (size_t)E * sizeof(int32_t));
    for (int s = 0; s < M; s++) {
        int row = next[ids[s]]++;
        slot_of_row[row] = s;
        row_of_slot[s] = row;
    }
}

static void cpu_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                            int H)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++)
        memcpy(xs + (size_t)r * H, x + (size_t)(slot_of_row[r] / K) * H, (size_t)H * sizeof(float));
}

/* The rows of expert e that the fp32 item loops below take: none for a bf16 expert. */
static int fp32_rows(const float *const *w, const int32_t *offsets, int e)
{
    return weight_is_bf16(w[e]) ? 0 : offsets[e + 1] - offsets[e];
}

static void cpu_grouped_linear(float *y, const float *x, const float *const *w,
                               const int32_t *offsets, int E, int I, int O)
{
    /* work items: (fp32 expert, block of ROW_BLOCK rows), so a busy expert spreads over
     * threads and idle experts cost nothing; then the bf16 experts one by one */
    int n_items = 0;
    for (int e = 0; e < E; e++) n_items += (fp32_rows(w, offsets, e) + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < n_items; it++) {
        int e = 0, index = it;
        for (;; e++) {
            int blocks = (fp32_rows(w, offsets, e) + ROW_BLOCK - 1) / ROW_BLOCK;
            if (index < blocks) break;
            index -= blocks;
        }
        int first = offsets[e] + index * ROW_BLOCK;
        int rows = offsets[e + 1] - first < ROW_BLOCK ? offsets[e + 1] - first : ROW_BLOCK;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, O, I, 1.0f,
                    x + (size_t)first * I, I, w[e], I, 0.0f, y + (size_t)first * O, O);
    }
    for (int e = 0; e < E; e++)
        if (weight_is_bf16(w[e]) && offsets[e + 1] > offsets[e])
            linear_bf16(y + (size_t)offsets[e] * O, x + (size_t)offsets[e] * I,
                        weight_bf16_data(w[e]), offsets[e + 1] - offsets[e], I, O, false);
}

static void cpu_glu(float *h, const float *gate, const float *up, size_t count,
                    enum hf_activation act)
{
    if (act == ACT_SILU) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) h[i] = silu_glu(gate[i], up[i]);
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) h[i] = gelu_glu(gate[i], up[i]);
    }
}

static void cpu_combine(float *out, const float *ys, const float *weights,
                        const int32_t *row_of_slot, int N, int K, int H, bool accumulate)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * H;
        if (!accumulate)
            for (int d = 0; d < H; d++) o[d] = 0.0f;
        for (int k = 0; k < K; k++) {
            float w = weights[(size_t)n * K + k];
            const float *y = ys + (size_t)row_of_slot[(size_t)n * K + k] * H;
            for (int d = 0; d < H; d++) o[d] += w * y[d];
        }
    }
}

static void cpu_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N,
                                  int H)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float g = gate_sigmoid(gate_logit[n]);
        for (int d = 0; d < H; d++) y[(size_t)n * H + d] += g * s[(size_t)n * H + d];
    }
}

static void cpu_clamp(float *x, size_t count, float low, float high)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) x[i] = x[i] < low ? low : x[i] > high ? high : x[i];
}

static void cpu_add(float *y, const float *x, const float *r, size_t count)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) y[i] = x[i] + r[i];
}

static double cpu_cross_entropy_sum(const float *logits, const int32_t *labels, int N, int V,
                                    long long *counted)
{
    double total = 0.0;
    long long count = 0;
#pragma omp parallel for schedule(static) reduction(+ : total, count)
    for (int n = 0; n < N; n++) {
        if (labels[n] < 0) continue;
        const float *z = logits + (size_t)n * V;
        /* fp32 exponentials as transformers' fp32 log_softmax, the row's log in double */
        float max = row_max(z, V);
        float sum = row_exp_sum(z, V, max);
        total += cross_entropy_row(max, sum, z[labels[n]]);
        count++;
    }
    *counted = count;
    return total;
}

/* The vocabulary-chunked cross-entropy (backend.h). Per token, in fp32 as the whole-row
 * op: the max, the sum of exp(z - max) rescaled by exp(old max - new max) when a chunk
 * raises the max, the label's logit; the log in double at the end. */
static void cpu_ce_chunk_update(float *state, int32_t *best, const float *logits,
                                const int32_t *labels, int N, int C, int v0)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * C;
        float *st = state + (size_t)n * 4;
        float chunk_max = row_max(z, C);
        if (v0 == 0) {
            st[0] = chunk_max;
            st[1] = row_exp_sum(z, C, chunk_max);
            st[2] = 0.0f;
            st[3] = -INFINITY;
            best[n] = -1;
        } else {
            float max = chunk_max > st[0] ? chunk_max : st[0];
            st[1] = st[1] * expf(st[0] - max) + row_exp_sum(z, C, max);
            st[0] = max;
        }
        int label = labels[n] - v0;
        if (label >= 0 && label < C) st[2] = z[label];
        /* the argmax: the chunk's first logit equal to its maximum, when that beats the
         * earlier chunks' (ties keep the lower id); no third pass over the chunk */
        if (chunk_max > st[3]) {
            int v = 0;
            while (z[v] != chunk_max) v++;
            st[3] = chunk_max;
            best[n] = v0 + v;
        }
    }
}

static double cpu_ce_chunk_finish(const float *state, const int32_t *best, const int32_t *labels,
                                  int N, long long *counted, long long *correct)
{
    double total = 0.0;
    long long count = 0, right = 0;
    for (int n = 0; n < N; n++) { /* in token order: the same sum for any thread count */
        if (labels[n] < 0) continue;
        const float *st = state + (size_t)n * 4;
        total += cross_entropy_row(st[0], st[1], st[2]);
        count++;
        right += best[n] == labels[n];
    }
    *counted = count;
    *correct = right;
    return total;
}

static void cpu_ce_chunk_backward(float *dlogits, const float *logits, const float *state,
                                  const int32_t *labels, int N, int C, int v0, float scale)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *g = dlogits + (size_t)n * C;
        const float *z = logits + (size_t)n * C;
        if (labels[n] < 0) {
            memset(g, 0, (size_t)C * sizeof(float));
            continue;
        }
        const float *st = state + (size_t)n * 4;
        float max = st[0], factor = scale / st[1];
        for (int v = 0; v < C; v++)
            g[v] = cross_entropy_dlogit(expf(z[v] - max), factor, v0 + v == labels[n], scale);
    }
}

/* ---- backward ------------------------------------------------------------------------ *
 * The transposes of the ops above, in the same order of operations (backend.h gives each
 * op's contract). Determinism: every sum over rows (weight, bias and norm-weight
 * gradients, dK/dV over query heads, embedding rows over tokens) runs in an order fixed by
 * the data alone, never by the thread count: a GEMM splits only over output rows (each
 * element's sum over rows stays inside one call), and column sums go through partial sums
 * over fixed chunks of rows combined in chunk order. No atomics. */

/* Column reductions take SUM_CHUNK rows per partial sum (dense_math.h): a fixed
 * partition, independent of the thread count. */
/* sum[D] += the column sums of partial[chunks, D], added in chunk order. */
static void add_partial_sums(float *sum, const float *partial, int chunks, int D)
{
#pragma omp parallel for schedule(static)
    for (int d = 0; d < D; d++) {
        float total = 0.0f;
        for (int c = 0; c < chunks; c++) total += partial[(size_t)c * D + d];
        sum[d] += total;
    }
}

/* sum[D] += column sums of x[R, D] */
static void add_column_sums(float *sum, const float *x, int R, int D)
{
    int chunks = (R + SUM_CHUNK - 1) / SUM_CHUNK;
    static struct kept partial_kept;
    size_t most_chunks = (most_rows((size_t)R) + SUM_CHUNK - 1) / SUM_CHUNK;
    float *partial = op_scratch(&partial_kept, (size_t)chunks * D * sizeof(float),
                                most_chunks * D * sizeof(float));
    memset(partial, 0, (size_t)chunks * D * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; c++) {
        int end = (c + 1) * SUM_CHUNK < R ? (c + 1) * SUM_CHUNK : R;
        float *p = partial + (size_t)c * D;
        for (int r = c * SUM_CHUNK; r < end; r++)
            for (int d = 0; d < D; d++) p[d] += x[(size_t)r * D + d];
    }
    add_partial_sums(sum, partial, chunks, D);
}

/* Rows per block when a GEMM is split over its output rows in the backward: fixed by the
 * size alone, never by the thread count, because OpenBLAS's value for one element depends
 * on the shape of the call it is computed in (measured: cpu_linear's per-thread split gives
 * different bits on 1 and 3 threads). At most SPLIT_BLOCKS blocks, so that each call is
 * tall enough to amortise packing the shared operand, and at least ROW_BLOCK rows. */
enum { SPLIT_BLOCKS = 64 };

static int split_rows(int n)
{
    int rows = (n + SPLIT_BLOCKS - 1) / SPLIT_BLOCKS;
    return rows < ROW_BLOCK ? ROW_BLOCK : rows;
}

/* x[N,I], w[O,I], dy[N,O] -> dx[N,I] (+)= dy @ w, dw[O,I] += dy^T @ x, dbias[O] += sum_n dy.
 * dx splits over blocks of rows N (a row of dx is one row of dy times w), dw over blocks of
 * its rows O: each call sums over all N rows, so dw's summation order is fixed. */
static void cpu_linear_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                                const float *w, int N, int I, int O, bool accumulate_dx)
{
    if (N == 0) return;
    if (O == 0) {
        if (dx && !accumulate_dx) memset(dx, 0, (size_t)N * I * sizeof(float));
        return;
    }
    if (weight_is_bf16(w)) {
        if (dw || dbias)
            fatal(EXIT_RUNTIME, "linear_backward: a weight held as bf16 has no gradient, nor its "
                  "bias");
        if (dx) linear_backward_bf16(dx, dy, weight_bf16_data(w), N, I, O, accumulate_dx);
        return;
    }
    int row_block = split_rows(N), output_block = split_rows(O);
    int row_items = dx ? (N + row_block - 1) / row_block : 0;
    int output_items = dw ? (O + output_block - 1) / output_block : 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < row_items + output_items; it++) {
        if (it < row_items) {
            int first = it * row_block, rows = N - first < row_block ? N - first : row_block;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, I, O, 1.0f,
                        dy + (size_t)first * O, O, w, I, accumulate_dx ? 1.0f : 0.0f,
                        dx + (size_t)first * I, I);
        } else {
            int first = (it - row_items) * output_block;
            int outputs = O - first < output_block ? O - first : output_block;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, outputs, I, N, 1.0f, dy + first, O,
                        x, I, 1.0f, dw + (size_t)first * I, I);
        }
    }
    if (dbias) add_column_sums(dbias, dy, N, O);
}

/* y = w * (x * r), r = rstd: with xhat = x * r and dxhat = dy * w,
 * dx = r * (dxhat - xhat * mean(dxhat * xhat)), dw += sum_rows dy * xhat. dx may alias dy
 * (each row reads dy before writing dx), not together with accumulate_dx. */
static void cpu_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                 const float *w, const float *rstd, int R, int D,
                                 bool accumulate_dx)
{
    int chunks = (R + SUM_CHUNK - 1) / SUM_CHUNK;
    static struct kept partial_kept;
    size_t most_chunks = (most_rows((size_t)R) + SUM_CHUNK - 1) / SUM_CHUNK;
    float *partial = dw ? op_scratch(&partial_kept, (size_t)chunks * D * sizeof(float),
                                     most_chunks * D * sizeof(float))
                        : NULL;
    if (partial) memset(partial, 0, (size_t)chunks * D * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; c++) {
        int end = (c + 1) * SUM_CHUNK < R ? (c + 1) * SUM_CHUNK : R;
        for (int r = c * SUM_CHUNK; r < end; r++) {
            const float *xr = x + (size_t)r * D, *dyr = dy + (size_t)r * D;
            float inv = rstd[r];
            if (partial) {
                float *p = partial + (size_t)c * D;
                for (int d = 0; d < D; d++) p[d] += rmsnorm_dw_term(dyr[d], xr[d], inv);
            }
            if (!dx) continue;
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += dyr[d] * w[d] * (xr[d] * inv);
            float mean = dot / (float)D;
            float *dxr = dx + (size_t)r * D;
            for (int d = 0; d < D; d++) {
                float g = rmsnorm_dx(dyr[d], xr[d], w[d], inv, mean);
                dxr[d] = accumulate_dx ? dxr[d] + g : g;
            }
        }
    }
    if (partial) add_partial_sums(dw, partial, chunks, D);
}

static _Thread_local float *attention_backward_scratch = NULL;
static _Thread_local size_t attention_backward_scratch_size = 0;

/* Per (sample, KV head): for each query head of its group and each block of QUERY_BLOCK
 * queries, P is recomputed exactly as the forward did, then (Dao, FlashAttention-2, alg. 2)
 *   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D) with D_i = <dO_i, O_i>,
 *   dQ = scale dS K,  dK += scale dS^T Q.
 * A sink adds a column with no value, so dS keeps its form, and d sink = -sum_i
 * P_sink(i) D_i (the sink's own dS). One work item owns its sample's dK and dV rows of
 * that KV head, so the sums over the group's query heads and the blocks run in a fixed
 * order, without races; the sinks' sums are kept per item and added in sample order. */
static void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v, const float *out,
                                   const struct attention_mask *mask, int N, int nH, int nKV,
                                   int Dh, int Dv, float scale)
{
    int group = nH / nKV;
    int q_stride = nH * Dh, kv_stride = nKV * Dh, v_stride = nKV * Dv, out_stride = nH * Dv;
    int n_items = 0, longest = 0;
    for (int i = 0; i < N; i++)
        if (mask->sample_start[i] == i) n_items += nKV;
    static struct kept items_kept; /* start, length, kv */
    int32_t *items = op_scratch(&items_kept, (size_t)n_items * 3 * sizeof(int32_t),
                                (size_t)nKV * most_tokens((size_t)N) * 3 * sizeof(int32_t));
    int at = 0;
    for (int i = 0; i < N; i++) {
        if (mask->sample_start[i] != i) continue;
        int end = i + 1;
        while (end < N && mask->sample_start[end] == i) end++;
        if (end - i > longest) longest = end - i;
        for (int kv = 0; kv < nKV; kv++) {
            items[3 * at] = i;
            items[3 * at + 1] = end - i;
            items[3 * at + 2] = kv;
            at++;
        }
    }
    /* per item, per query head of its group: the item's share of d sinks */
    static struct kept dsink_kept;
    double *dsink_parts = mask->sinks && mask->dsinks
                              ? op_scratch(&dsink_kept, (size_t)n_items * group * sizeof(double),
                                           (size_t)nKV * most_tokens((size_t)N) * group * sizeof(double))
                              : NULL;
    if (dsink_parts) memset(dsink_parts, 0, (size_t)n_items * group * sizeof(double));
#pragma omp parallel
    {
        size_t need = (2 * (size_t)longest + 1) * QUERY_BLOCK;
        if (attention_backward_scratch_size < need) {
            need = (2 * most_tokens((size_t)longest) + 1) * QUERY_BLOCK;
            free(attention_backward_scratch);
            attention_backward_scratch = xmalloc(need * sizeof(float));
            attention_backward_scratch_size = need;
        }
        float *P = attention_backward_scratch;
        float *dS = P + (size_t)QUERY_BLOCK * longest;
        float *sink_prob = dS + (size_t)QUERY_BLOCK * longest;
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            int start = items[3 * it], length = items[3 * it + 1], kv = items[3 * it + 2];
            int blocks = (length + QUERY_BLOCK - 1) / QUERY_BLOCK;
            const float *ks = k + (size_t)start * kv_stride + (size_t)kv * Dh;
            const float *vs = v + (size_t)start * v_stride + (size_t)kv * Dv;
            float *dks = dk + (size_t)start * kv_stride + (size_t)kv * Dh;
            float *dvs = dv + (size_t)start * v_stride + (size_t)kv * Dv;
            for (int j = 0; j < length; j++) {
                memset(dks + (size_t)j * kv_stride, 0, (size_t)Dh * sizeof(float));
                memset(dvs + (size_t)j * v_stride, 0, (size_t)Dv * sizeof(float));
            }
            for (int h = kv * group; h < (kv + 1) * group; h++)
                for (int b = 0; b < blocks; b++) {
                    int first = b * QUERY_BLOCK;
                    int rows = length - first < QUERY_BLOCK ? length - first : QUERY_BLOCK;
                    int lo = block_first_key(mask, first), keys = first + rows - lo;
                    size_t offset = (size_t)(start + first) * q_stride + (size_t)h * Dh;
                    size_t out_offset = (size_t)(start + first) * out_stride + (size_t)h * Dv;
                    const float *qb = q + offset, *dob = dout + out_offset, *ob = out + out_offset;
                    const float *kb = ks + (size_t)lo * kv_stride, *vb = vs + (size_t)lo * v_stride;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, Dh, scale, qb,
                                q_stride, kb, kv_stride, 0.0f, P, keys);
                    causal_softmax_block(P, sink_prob, rows, keys, first, lo, mask->window,
                                         mask->sinks ? mask->sinks + h : NULL);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, Dv, rows, 1.0f, P,
                                keys, dob, out_stride, 1.0f, dvs + (size_t)lo * v_stride, v_stride);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, Dv, 1.0f, dob,
                                out_stride, vb, v_stride, 0.0f, dS, keys);
                    for (int r = 0; r < rows; r++) {
                        const float *dor = dob + (size_t)r * out_stride,
                                    *orow = ob + (size_t)r * out_stride;
                        float D = 0.0f;
                        for (int d = 0; d < Dv; d++) D += dor[d] * orow[d];
                        float *pr = P + (size_t)r * keys, *sr = dS + (size_t)r * keys;
                        int begin, end;
                        visible_keys(&begin, &end, first + r, lo, mask->window);
                        for (int j = 0; j < begin; j++) sr[j] = 0.0f;
                        for (int j = begin; j < end; j++) sr[j] = pr[j] * (sr[j] - D);
                        for (int j = end; j < keys; j++) sr[j] = 0.0f;
                        if (dsink_parts)
                            dsink_parts[(size_t)it * group + h - kv * group] -= (double)sink_prob[r] * D;
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dh, keys, scale,
                                dS, keys, kb, kv_stride, 0.0f, dq + offset, q_stride);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, Dh, rows, scale, dS,
                                keys, qb, q_stride, 1.0f, dks + (size_t)lo * kv_stride, kv_stride);
                }
        }
    }
    if (!dsink_parts) return;
    for (int h = 0; h < nH; h++) { /* items: sample by sample, KV heads in order */
        double total = 0.0;
        for (int it = h / group; it < n_items; it += nKV)
            total += dsink_parts[(size_t)it * group + h % group];
        mask->dsinks[h] += (float)total;
    }
}

/* Per expert e: dx[rows] = dy[rows] @ w[e] (items: expert x block of ROW_BLOCK rows, as the
 * forward), and dw[e] += dy_e^T @ x_e as one GEMM over all the expert's rows, split over
 * blocks of OUTPUT_BLOCK output rows. Frozen experts (dw[e] NULL) and idle experts do no
 * weight-gradient work. */
enum { OUTPUT_BLOCK = 128 };

static void cpu_grouped_linear_backward(float *dx, float *const *dw, const float *dy,
                                        const float *x, const float *const *w,
                                        const int32_t *offsets, int E, int I, int O)
{
    int row_items = 0, weight_items = 0, weight_blocks = (O + OUTPUT_BLOCK - 1) / OUTPUT_BLOCK;
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (dw && dw[e] && weight_is_bf16(w[e]))
            fatal(EXIT_RUNTIME, "grouped_linear_backward: a bf16 weight has no gradient");
        if (dx) row_items += (fp32_rows(w, offsets, e) + ROW_BLOCK - 1) / ROW_BLOCK;
        if (dw && dw[e] && rows > 0) weight_items += weight_blocks;
    }
    static struct kept items_kept;
    /* at most every row's block plus one partial block an expert, and every expert's
     * weight blocks */
    size_t most_items = most_rows((size_t)offsets[E]) / ROW_BLOCK + 2 * (size_t)E +
                        (size_t)E * (size_t)weight_blocks;
    int32_t *items = op_scratch(&items_kept, ((size_t)row_items + weight_items) * 2 * sizeof(int32_t),
                                most_items * 2 * sizeof(int32_t));
    int at = 0; /* (expert, block) pairs: first the fp32 dx blocks, then the dw blocks */
    for (int e = 0; e < E && dx; e++)
        for (int b = 0; b < (fp32_rows(w, offsets, e) + ROW_BLOCK - 1) / ROW_BLOCK; b++) {
            items[2 * at] = e;
            items[2 * at + 1] = b;
            at++;
        }
    for (int e = 0; e < E && dw; e++)
        if (dw[e] && offsets[e + 1] > offsets[e])
            for (int b = 0; b < weight_blocks; b++) {
                items[2 * at] = e;
                items[2 * at + 1] = b;
                at++;
            }
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < row_items + weight_items; it++) {
        int e = items[2 * it], b = items[2 * it + 1];
        const float *we = w[e];
        if (it < row_items) {
            int first = offsets[e] + b * ROW_BLOCK;
            int rows = offsets[e + 1] - first < ROW_BLOCK ? offsets[e + 1] - first : ROW_BLOCK;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, I, O, 1.0f,
                        dy + (size_t)first * O, O, we, I, 0.0f, dx + (size_t)first * I, I);
        } else {
            int first = b * OUTPUT_BLOCK;
            int outputs = O - first < OUTPUT_BLOCK ? O - first : OUTPUT_BLOCK;
            int rows = offsets[e + 1] - offsets[e];
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, outputs, I, rows, 1.0f,
                        dy + (size_t)offsets[e] * O + first, O, x + (size_t)offsets[e] * I, I, 1.0f,
                        dw[e] + (size_t)first * I, I);
        }
    }
    for (int e = 0; e < E && dx; e++)
        if (weight_is_bf16(w[e]) && offsets[e + 1] > offsets[e])
            linear_backward_bf16(dx + (size_t)offsets[e] * I, dy + (size_t)offsets[e] * O,
                                 weight_bf16_data(w[e]), offsets[e + 1] - offsets[e], I, O, false);
}

/* h = act(g) * u: dg = dh * u * act'(g), du = dh * act(g), act(g) as the forward forms it.
 * The element formulas: moe_math.h (silu_glu_backward, gelu_glu_backward). */
static void cpu_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                             const float *up, size_t count, enum hf_activation act)
{
    if (act == ACT_SILU) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) silu_glu_backward(&dgate[i], &dup[i], dh[i], gate[i], up[i]);
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) gelu_glu_backward(&dgate[i], &dup[i], dh[i], gate[i], up[i]);
    }
}

/* dys[row_of_slot[n,k]] = weights[n,k] dout[n]; dweights[n,k] = <dout[n], ys[row]>. */
static void cpu_combine_backward(float *dys, float *dweights, const float *dout, const float *ys,
                                 const float *weights, const int32_t *row_of_slot, int N, int K,
                                 int H)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *g = dout + (size_t)n * H;
        for (int k = 0; k < K; k++) {
            size_t row = (size_t)row_of_slot[(size_t)n * K + k];
            float w = weights[(size_t)n * K + k], dot = 0.0f;
            const float *y = ys + row * H;
            float *dy = dys + row * H;
            for (int d = 0; d < H; d++) {
                dot += g[d] * y[d];
                dy[d] = w * g[d];
            }
            dweights[(size_t)n * K + k] = dot;
        }
    }
}

/* dx[n] (+)= sum_k dxs[row_of_slot[n,k]], summed in k order then added. */
static void cpu_gather_rows_backward(float *dx, const float *dxs, const int32_t *row_of_slot, int N,
                                     int K, int H, bool accumulate)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *o = dx + (size_t)n * H;
        for (int d = 0; d < H; d++) {
            float sum = 0.0f;
            for (int k = 0; k < K; k++) sum += dxs[(size_t)row_of_slot[(size_t)n * K + k] * H + d];
            o[d] = accumulate ? o[d] + sum : sum;
        }
    }
}

static void cpu_add_sigmoid_gated_backward(float *ds, float *dgate_logit, const float *dy,
                                           const float *s, const float *gate_logit, int N, int H)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float g = gate_sigmoid(gate_logit[n]), dot = 0.0f;
        const float *dyn = dy + (size_t)n * H, *sn = s + (size_t)n * H;
        for (int d = 0; d < H; d++) {
            dot += dyn[d] * sn[d];
            ds[(size_t)n * H + d] = g * dyn[d];
        }
        dgate_logit[n] = dot * g * (1.0f - g);
    }
}

static void cpu_clamp_backward(float *dx, const float *y, size_t count, float low, float high)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++)
        if (y[i] <= low || y[i] >= high) dx[i] = 0.0f;
}

/* softmax in fp32 as the forward's loss (same exponentials), then scale * (p - onehot) */
static void cpu_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *labels,
                                       int N, int V, float scale)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *g = dlogits + (size_t)n * V;
        if (labels[n] < 0) {
            memset(g, 0, (size_t)V * sizeof(float));
            continue;
        }
        const float *z = logits + (size_t)n * V;
        if (g != z) memcpy(g, z, (size_t)V * sizeof(float));
        float sum = row_exp_store_sum(g, V, row_max(g, V));
        float factor = scale / sum;
        for (int v = 0; v < V; v++) g[v] = cross_entropy_dlogit(g[v], factor, v == labels[n], scale);
    }
}

/* dtable[tokens[n]] += dx[n], in token order: threads split the columns, never the tokens,
 * so a repeated token's rows are always added in the same order. */
enum { COLUMN_BLOCK = 64 };

static void cpu_embedding_backward(float *dtable, const float *dx, const int32_t *tokens, int N,
                                   int H)
{
    int blocks = (H + COLUMN_BLOCK - 1) / COLUMN_BLOCK;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        int first = b * COLUMN_BLOCK, end = first + COLUMN_BLOCK < H ? first + COLUMN_BLOCK : H;
        for (int n = 0; n < N; n++) {
            float *t = dtable + (size_t)tokens[n] * H;
            const float *g = dx + (size_t)n * H;
            for (int d = first; d < end; d++) t[d] += g[d];
        }
    }
}

static void cpu_adamw(float *data, float *m, float *v, const float *grad, size_t n,
                      const struct adamw_coef *coef)
{
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < n; j++) adamw_update(&data[j], &m[j], &v[j], grad[j], coef);
}

static double cpu_sum_squares(const float *x, size_t n)
{
    size_t chunks = (n + NORM_CHUNK - 1) / NORM_CHUNK;
    static struct kept partial_kept;
    double *partial = kept_buffer(&partial_kept, (chunks ? chunks : 1) * sizeof(double));
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t end = (c + 1) * NORM_CHUNK < n ? (c + 1) * NORM_CHUNK : n;
        double sum = 0;
        for (size_t j = c * NORM_CHUNK; j < end; j++) sum += (double)x[j] * x[j];
        partial[c] = sum;
    }
    double sum = 0;
    for (size_t c = 0; c < chunks; c++) sum += partial[c];
    return sum;
}

static void cpu_scale(float *x, size_t n, float factor)
{
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < n; j++) x[j] *= factor;
}

static long long cpu_count_correct(const float *logits, const int32_t *labels, int N, int V)
{
    long long correct = 0;
    for (int n = 0; n < N; n++) {
        if (labels[n] < 0) continue;
        const float *row = logits + (size_t)n * V;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        correct += best == labels[n];
    }
    return correct;
}

/* Memory: the host's own. */
static void *cpu_alloc(size_t bytes)
{
    return xcalloc(bytes ? bytes : 1, 1);
}

static void cpu_release(void *p)
{
    free(p);
}

static void cpu_transfer(void *dst, const void *src, size_t bytes)
{
    if (dst != src && bytes) memcpy(dst, src, bytes);
}

static void cpu_zero(void *p, size_t bytes)
{
    if (bytes) memset(p, 0, bytes);
}

const struct backend *backend_cpu(void)
{
    /* OpenBLAS runs single-threaded inside OpenMP's loops (see the banner). */
    openblas_set_num_threads(1);
    static const struct backend cpu = {
        .name = "cpu",
        .embedding = cpu_embedding,
        .linear = cpu_linear,
        .rmsnorm = cpu_rmsnorm,
        .rope = cpu_rope,
        .attention = cpu_attention,
        .copy_columns = cpu_copy_columns,
        .router_topk = cpu_router_topk,
        .router_balance_stats = cpu_router_balance_stats,
        .permute_by_expert = cpu_permute_by_expert,
        .gather_rows = cpu_gather_rows,
        .grouped_linear = cpu_grouped_linear,
        .grouped_bias = cpu_grouped_bias,
        .glu = cpu_glu,
        .glu_clamped = cpu_glu_clamped,
        .combine = cpu_combine,
        .add_sigmoid_gated = cpu_add_sigmoid_gated,
        .clamp = cpu_clamp,
        .add = cpu_add,
        .cross_entropy_sum = cpu_cross_entropy_sum,
        .linear_backward = cpu_linear_backward,
        .rmsnorm_backward = cpu_rmsnorm_backward,
        .rope_backward = cpu_rope_backward,
        .attention_backward = cpu_attention_backward,
        .router_topk_backward = cpu_router_topk_backward,
        .router_balance_backward = cpu_router_balance_backward,
        .router_dense_backward = cpu_router_dense_backward,
        .grouped_linear_backward = cpu_grouped_linear_backward,
        .grouped_bias_backward = cpu_grouped_bias_backward,
        .glu_backward = cpu_glu_backward,
        .glu_clamped_backward = cpu_glu_clamped_backward,
        .combine_backward = cpu_combine_backward,
        .gather_rows_backward = cpu_gather_rows_backward,
        .row_dots = cpu_row_dots,
        .add_sigmoid_gated_backward = cpu_add_sigmoid_gated_backward,
        .clamp_backward = cpu_clamp_backward,
        .cross_entropy_backward = cpu_cross_entropy_backward,
        .ce_chunk_update = cpu_ce_chunk_update,
        .ce_chunk_finish = cpu_ce_chunk_finish,
        .ce_chunk_backward = cpu_ce_chunk_backward,
        .embedding_backward = cpu_embedding_backward,
        .adamw = cpu_adamw,
        .sum_squares = cpu_sum_squares,
        .scale = cpu_scale,
        .count_correct = cpu_count_correct,
        .host_visible = true,
        .reserve = cpu_reserve,
        .alloc = cpu_alloc,
        .release = cpu_release,
        .upload = cpu_transfer,
        .download = cpu_transfer,
        .copy = cpu_transfer,
        .zero = cpu_zero,
    };
    return &cpu;
}
