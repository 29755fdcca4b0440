/* cpu_ops: the fp32 CPU backend (see backend.h): a CBLAS (blas.h) for the GEMMs, OpenMP over
 * tokens, heads or rows for the rest. It is the reference the CUDA backend is tested
 * against, so every op computes in the order transformers does (softmax and norms in
 * fp32, as the Hugging Face modeling code does).
 *
 * Threads: OpenMP owns every thread. The BLAS (OpenBLAS by default, blas.h) is kept
 * single-threaded and called from inside OpenMP loops over blocks of rows, experts or
 * (sample, head) pairs; a threaded OpenBLAS beside OpenMP's pool made the two spin against each other (measured: expert
 * GEMMs 1.3x faster on 2 cores when only one pool runs). Work is cut into blocks whose
 * shapes depend only on the problem's sizes, so results do not change with the thread
 * count (OpenBLAS's bits for an element depend on the shape of the call). */
#include <cblas.h>
/* OpenBLAS's and BLIS's cblas.h pull in <complex.h>, whose macro I would replace the
 * conventional name of the input width. */
#undef I
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "blas.h"
#include "cpu_router.h"
#include "dense_math.h"
#include "log.h"
#include "moe_math.h"
#include "cpu_math.h"
#include "cpu_ops_internal.h"

/* The most tokens and rows the ops will be given (backend.h, reserve; cpu_ops_internal.h). */
static size_t reserved_tokens, reserved_rows;

static void cpu_reserve(size_t tokens, size_t rows)
{
    if (tokens > reserved_tokens) reserved_tokens = tokens;
    if (rows > reserved_rows) reserved_rows = rows;
}

size_t cpu_most_tokens(size_t n)
{
    return n > reserved_tokens ? n : reserved_tokens;
}

size_t cpu_most_rows(size_t n)
{
    return n > reserved_rows ? n : reserved_rows;
}

void *cpu_op_scratch(struct kept *k, size_t bytes, size_t most)
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

/* Elements per OpenMP item of the element-wise SIMD loops: a multiple of VLANES, so that
 * only the array's end takes the partial vector. */
enum { ELEMENT_CHUNK = 1 << 14 };

/* h = silu(g) u, VLANES at a time. */
static void silu_glu_chunk(float *h, const float *g, const float *u, size_t n)
{
    size_t i = 0;
    for (; i + VLANES <= n; i += VLANES) vstore(h + i, vsilu(vload(g + i)) * vload(u + i));
    int rest = (int)(n - i);
    if (rest) vstore_part(h + i, vsilu(vload_part(g + i, rest)) * vload_part(u + i, rest), rest);
}

/* SwiGLU's SiLU by cpu_math.h's SIMD silu (within 5.5 ulp; moe_math.h's
 * silu_glu, which the CUDA kernels keep, calls glibc's expf per element); GELU by
 * moe_math.h's erf form. */
static void cpu_glu(float *h, const float *gate, const float *up, size_t count,
                    enum hf_activation act)
{
    if (act == ACT_SILU) {
        size_t chunks = (count + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
#pragma omp parallel for schedule(static)
        for (size_t c = 0; c < chunks; c++) {
            size_t first = c * ELEMENT_CHUNK;
            size_t n = count - first < ELEMENT_CHUNK ? count - first : ELEMENT_CHUNK;
            silu_glu_chunk(h + first, gate + first, up + first, n);
        }
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

/* The rows' cross-entropies summed in row order whatever the thread count: each block of
 * rows computed in parallel into part[], then added one after another. */
static double cpu_cross_entropy_sum(const float *logits, const int32_t *labels, int N, int V,
                                    long long *counted)
{
    enum { BLOCK = 256 };
    double total = 0.0, part[BLOCK];
    long long count = 0;
    for (int n0 = 0; n0 < N; n0 += BLOCK) {
        int rows = N - n0 < BLOCK ? N - n0 : BLOCK;
#pragma omp parallel for schedule(static)
        for (int i = 0; i < rows; i++) {
            int n = n0 + i;
            if (labels[n] < 0) continue;
            const float *z = logits + (size_t)n * V;
            /* fp32 exponentials as transformers' fp32 log_softmax, the row's log in double */
            float max = row_max(z, V);
            float sum = row_exp_sum(z, V, max);
            part[i] = cross_entropy_row(max, sum, z[labels[n]]);
        }
        for (int i = 0; i < rows; i++)
            if (labels[n0 + i] >= 0) total += part[i], count++;
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
            st[1] = st[1] * exp_nonpositive(st[0] - max) + row_exp_sum(z, C, max);
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
        /* cross_entropy_dlogit's e * factor, then its label's - scale, a vector at a time */
        exp_shifted_scaled(g, z, C, st[0], scale / st[1]);
        int label = labels[n] - v0;
        if (label >= 0 && label < C) g[label] -= scale;
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
    size_t most_chunks = (cpu_most_rows((size_t)R) + SUM_CHUNK - 1) / SUM_CHUNK;
    float *partial = cpu_op_scratch(&partial_kept, (size_t)chunks * D * sizeof(float),
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
    size_t most_chunks = (cpu_most_rows((size_t)R) + SUM_CHUNK - 1) / SUM_CHUNK;
    float *partial = dw ? cpu_op_scratch(&partial_kept, (size_t)chunks * D * sizeof(float),
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
    size_t most_items = cpu_most_rows((size_t)offsets[E]) / ROW_BLOCK + 2 * (size_t)E +
                        (size_t)E * (size_t)weight_blocks;
    int32_t *items = cpu_op_scratch(&items_kept, ((size_t)row_items + weight_items) * 2 * sizeof(int32_t),
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

/* SwiGLU's gradients, VLANES at a time: dg = d u silu'(g), du = d silu(g), with silu' =
 * s (1 + g (1 - s)), s = sigmoid(g) (moe_math.h's silu_glu_backward with cpu_math.h's
 * functions: silu(g) as the forward formed it). */
static vfloat silu_glu_dgate(vfloat d, vfloat g, vfloat u)
{
    vfloat s = vsigmoid(g);
    return d * u * (s * (1.0f + g * (1.0f - s)));
}

static void silu_glu_backward_chunk(float *dg, float *du, const float *dh, const float *g,
                                    const float *u, size_t n)
{
    size_t i = 0;
    for (; i + VLANES <= n; i += VLANES) {
        vfloat d = vload(dh + i), gi = vload(g + i);
        vstore(du + i, d * vsilu(gi));
        vstore(dg + i, silu_glu_dgate(d, gi, vload(u + i)));
    }
    int rest = (int)(n - i);
    if (rest) {
        vfloat d = vload_part(dh + i, rest), gi = vload_part(g + i, rest);
        vstore_part(du + i, d * vsilu(gi), rest);
        vstore_part(dg + i, silu_glu_dgate(d, gi, vload_part(u + i, rest)), rest);
    }
}

/* h = act(g) * u: dg = dh * u * act'(g), du = dh * act(g), act(g) as the forward forms it.
 * GELU: moe_math.h's gelu_glu_backward. */
static void cpu_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                             const float *up, size_t count, enum hf_activation act)
{
    if (act == ACT_SILU) {
        size_t chunks = (count + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
#pragma omp parallel for schedule(static)
        for (size_t c = 0; c < chunks; c++) {
            size_t first = c * ELEMENT_CHUNK;
            size_t n = count - first < ELEMENT_CHUNK ? count - first : ELEMENT_CHUNK;
            silu_glu_backward_chunk(dgate + first, dup + first, dh + first, gate + first,
                                    up + first, n);
        }
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
        /* cross_entropy_dlogit's e * factor, then the label's - scale, a vector at a time */
        scale_row(g, (size_t)V, scale / sum);
        g[labels[n]] -= scale;
    }
}

/* The first id holding the row's max (ties to the lower id, as a scalar argmax): the
 * vectorised max, then a search that stops there, instead of a compare-and-branch per
 * logit; 0 when none does (a NaN row). */
static int first_max(const float *row, int V, float max)
{
    int best = 0;
    while (best < V && row[best] != max) best++;
    return best < V ? best : 0;
}

/* cross_entropy_sum, count_correct and cross_entropy_backward in one pass per row: the max
 * (and the first id holding it), the label's logit, then the exponentials stored with
 * their sum, the loss from them, and the scaling; the sum added in row order as
 * cross_entropy_sum's. */
static double cpu_cross_entropy_rows(float *logits, const int32_t *labels, int N, int V,
                                     float scale, long long *counted, long long *correct)
{
    enum { BLOCK = 256 };
    double total = 0.0, part[BLOCK];
    long long count = 0, right = 0;
    for (int n0 = 0; n0 < N; n0 += BLOCK) {
        int rows = N - n0 < BLOCK ? N - n0 : BLOCK;
#pragma omp parallel for schedule(static) reduction(+ : right)
        for (int i = 0; i < rows; i++) {
            int n = n0 + i;
            float *z = logits + (size_t)n * V;
            if (labels[n] < 0) {
                memset(z, 0, (size_t)V * sizeof(float));
                continue;
            }
            float max = row_max(z, V);
            right += first_max(z, V, max) == labels[n];
            float label_logit = z[labels[n]];
            float sum = row_exp_store_sum(z, V, max);
            part[i] = cross_entropy_row(max, sum, label_logit);
            scale_row(z, (size_t)V, scale / sum);
            z[labels[n]] -= scale;
        }
        for (int i = 0; i < rows; i++)
            if (labels[n0 + i] >= 0) total += part[i], count++;
    }
    *counted = count;
    *correct = right;
    return total;
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
        partial[c] = norm_chunk_squares(x, c * NORM_CHUNK, end);
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
#pragma omp parallel for schedule(static) reduction(+ : correct)
    for (int n = 0; n < N; n++) {
        if (labels[n] < 0) continue;
        const float *row = logits + (size_t)n * V;
        correct += first_max(row, V, row_max(row, V)) == labels[n];
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
    /* the BLAS runs single-threaded inside OpenMP's loops (see the banner) */
    blas_use_one_thread();
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
        .cross_entropy_rows = cpu_cross_entropy_rows,
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
