/* cpu_ops: the fp32 CPU backend (see backend.h): OpenBLAS for the GEMMs, OpenMP over
 * tokens, heads or rows for the rest. It is the reference the CUDA backend is tested
 * against, so every op computes in the order transformers does (softmax and norms in
 * fp32, as the Hugging Face modeling code does).
 *
 * Threads: OpenMP owns every thread. OpenBLAS is kept single-threaded and called from
 * inside OpenMP loops over blocks of rows, experts or (sample, head) pairs; a threaded
 * OpenBLAS beside OpenMP's pool made the two spin against each other (measured: expert
 * GEMMs 1.3x faster on 2 cores when only one pool runs). A row's result does not depend
 * on how rows are split into blocks, so results do not change with the thread count. */
#include <cblas.h>
/* OpenBLAS's cblas.h pulls in <complex.h>, whose macro I would replace the conventional
 * name of the input width. */
#undef I
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "log.h"

/* e^x for x <= 0, the arguments of a softmax after its maximum is subtracted, written so
 * that loops over it vectorise (libm's expf does not). x = n ln2 + r with |r| <= ln2/2;
 * e^r by its Taylor polynomial to degree 6 (remainder < 1.3e-7 relative); 2^n built in
 * the exponent bits. Below -87 the result would leave the normal range: clamped there
 * (e^-87 ~ 1.6e-38 counts as nothing next to the row maximum's e^0 = 1). */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + round) - round;
    float r = x - n * 0.693145751953125f; /* ln 2 in two parts, so n * ln2 is exact */
    r = r - n * 1.42860682030941723e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f +
                                                   r * (8.33333377e-3f + r * 1.38888892e-3f)))));
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* Row reductions of the softmaxes, with eight running partial results so that gcc
 * vectorises them at -O2 (it does not reorder a single float accumulator). The
 * summation order is fixed, so results are the same on every run. */
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
    float lane[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) lane[l] += exp_nonpositive(x[i + l] - max);
    float sum = 0.0f;
    for (; i < n; i++) sum += exp_nonpositive(x[i] - max);
    for (int l = 0; l < LANES; l++) sum += lane[l];
    return sum;
}

/* x[i] = e^(x[i] - max) in place; returns their sum */
static float row_exp_store_sum(float *x, int n, float max)
{
    float lane[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            x[i + l] = exp_nonpositive(x[i + l] - max);
            lane[l] += x[i + l];
        }
    float sum = 0.0f;
    for (; i < n; i++) {
        x[i] = exp_nonpositive(x[i] - max);
        sum += x[i];
    }
    for (int l = 0; l < LANES; l++) sum += lane[l];
    return sum;
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

/* One contiguous range of rows per thread: each GEMM call streams the whole weight, so
 * fewer, taller calls read it fewer times (a 64-row split read lm_head's 64 MB weight
 * once per block). */
static void cpu_linear(float *y, const float *x, const float *w, const float *bias, int N,
                       int I, int O, bool accumulate)
{
    if (N == 0 || O == 0) return;
#pragma omp parallel
    {
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int per_thread = (N + threads - 1) / threads;
        int first = t * per_thread, rows = N - first < per_thread ? N - first : per_thread;
        if (rows > 0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, O, I, 1.0f,
                        x + (size_t)first * I, I, w, I, accumulate ? 1.0f : 0.0f,
                        y + (size_t)first * O, O);
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
        float inv = 1.0f / sqrtf(sum / (float)D + eps);
        if (rstd) rstd[r] = inv;
        /* transformers: weight * (x * rsqrt(var + eps)), the product formed first */
        for (int d = 0; d < D; d++) yr[d] = w[d] * (xr[d] * inv);
    }
}

static void cpu_rope(float *x, const int32_t *positions, const float *inv_freq,
                     float attention_scaling, int N, int n_heads, int Dh, int rotary_dim)
{
    int half = rotary_dim / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float cosv[512], sinv[512];
        /* angle in fp32 as transformers forms it: inv_freq (fp32) x position (fp32) */
        for (int i = 0; i < half; i++) {
            float angle = (float)positions[n] * inv_freq[i];
            cosv[i] = cosf(angle) * attention_scaling;
            sinv[i] = sinf(angle) * attention_scaling;
        }
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + ((size_t)n * n_heads + h) * Dh;
            for (int i = 0; i < half; i++) {
                float a = xh[i], b = xh[i + half];
                xh[i] = a * cosv[i] - b * sinv[i];
                xh[i + half] = b * cosv[i] + a * sinv[i];
            }
        }
    }
}

/* Scratch of the attention scores, one per thread, grown when a longer sample comes. */
static _Thread_local float *attention_scratch = NULL;
static _Thread_local size_t attention_scratch_size = 0;

enum { QUERY_BLOCK = 64 };

/* Per (sample, head, block of QUERY_BLOCK queries): S = Q K^T * scale over the keys up to
 * the block's last query (one GEMM), causal softmax per row in fp32, O = P V (one GEMM).
 * Keys past a query's own position get probability 0; keys of other samples are never
 * touched, which is the per-sample mask of packed batches. */
static void cpu_attention(float *out, const float *q, const float *k, const float *v,
                          const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                          float scale)
{
    int group = nH / nKV;
    int q_stride = nH * Dh, kv_stride = nKV * Dh;
    /* samples are runs of tokens: token i starts one when sample_start[i] == i */
    int n_items = 0, longest = 0;
    for (int i = 0; i < N; i++) {
        if (mask->sample_start[i] != i) continue;
        int end = i + 1;
        while (end < N && mask->sample_start[end] == i) end++;
        if (end - i > longest) longest = end - i;
        n_items += nH * ((end - i + QUERY_BLOCK - 1) / QUERY_BLOCK);
    }
    int32_t *items = xmalloc((size_t)n_items * 3 * sizeof(int32_t)); /* start, length, head*blocks */
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
            int keys = first + rows;     /* keys 0 .. last query of the block */
            const float *qb = q + (size_t)(start + first) * q_stride + (size_t)h * Dh;
            const float *ks = k + (size_t)start * kv_stride + (size_t)kv * Dh;
            const float *vs = v + (size_t)start * kv_stride + (size_t)kv * Dh;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, Dh, scale, qb,
                        q_stride, ks, kv_stride, 0.0f, S, keys);
            for (int r = 0; r < rows; r++) {
                float *row = S + (size_t)r * keys;
                int visible = first + r + 1;
                float sum = row_exp_store_sum(row, visible, row_max(row, visible));
                float inverse = 1.0f / sum;
                for (int j = 0; j < visible; j++) row[j] *= inverse;
                for (int j = visible; j < keys; j++) row[j] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dh, keys, 1.0f, S, keys,
                        vs, kv_stride, 0.0f, out + (size_t)(start + first) * q_stride + (size_t)h * Dh,
                        q_stride);
        }
    }
    free(items);
}

static void cpu_router_topk(int32_t *ids, float *weights, float *probs, const float *logits,
                            int N, int E, int K, enum hf_router_kind kind, bool renormalise,
                            float scaling)
{
    if (kind != ROUTER_SOFTMAX_TOPK)
        fatal(EXIT_RUNTIME, "cpu backend: router kind %d is not implemented", (int)kind);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float p[1024];
        const float *z = logits + (size_t)n * E;
        float max = -INFINITY;
        for (int e = 0; e < E; e++) max = z[e] > max ? z[e] : max;
        float sum = 0.0f;
        for (int e = 0; e < E; e++) {
            p[e] = expf(z[e] - max);
            sum += p[e];
        }
        for (int e = 0; e < E; e++) p[e] /= sum;
        if (probs) memcpy(probs + (size_t)n * E, p, (size_t)E * sizeof(float));
        /* k rounds of argmax; strict > keeps the lower id on ties */
        unsigned char taken[1024] = {0};
        float total = 0.0f;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
            taken[best] = 1;
            ids[(size_t)n * K + k] = best;
            weights[(size_t)n * K + k] = p[best];
            total += p[best];
        }
        for (int k = 0; k < K; k++) {
            if (renormalise) weights[(size_t)n * K + k] /= total;
            weights[(size_t)n * K + k] *= scaling;
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
    int32_t *next = xmalloc((size_t)E * sizeof(int32_t));
    memcpy(next, expert_offsets, (size_t)E * sizeof(int32_t));
    for (int s = 0; s < M; s++) {
        int row = next[ids[s]]++;
        slot_of_row[row] = s;
        row_of_slot[s] = row;
    }
    free(next);
}

static void cpu_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                            int H)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++)
        memcpy(xs + (size_t)r * H, x + (size_t)(slot_of_row[r] / K) * H, (size_t)H * sizeof(float));
}

static void cpu_grouped_linear(float *y, const float *x, const float *w, const int32_t *offsets,
                               int E, int I, int O)
{
    /* work items: (expert, block of ROW_BLOCK rows), so a busy expert spreads over threads
     * and idle experts cost nothing */
    int n_items = 0;
    for (int e = 0; e < E; e++) n_items += (offsets[e + 1] - offsets[e] + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < n_items; it++) {
        int e = 0, index = it;
        for (;; e++) {
            int blocks = (offsets[e + 1] - offsets[e] + ROW_BLOCK - 1) / ROW_BLOCK;
            if (index < blocks) break;
            index -= blocks;
        }
        int first = offsets[e] + index * ROW_BLOCK;
        int rows = offsets[e + 1] - first < ROW_BLOCK ? offsets[e + 1] - first : ROW_BLOCK;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, O, I, 1.0f,
                    x + (size_t)first * I, I, w + (size_t)e * O * I, I, 0.0f,
                    y + (size_t)first * O, O);
    }
}

static void cpu_glu(float *h, const float *gate, const float *up, size_t count,
                    enum hf_activation act)
{
    if (act == ACT_SILU) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) {
            float g = gate[i];
            h[i] = g / (1.0f + expf(-g)) * up[i];
        }
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) {
            float g = gate[i];
            h[i] = 0.5f * g * (1.0f + erff(g * 0.70710678118654752440f)) * up[i];
        }
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
        float g = 1.0f / (1.0f + expf(-gate_logit[n]));
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
        total += log((double)sum) + max - z[labels[n]];
        count++;
    }
    *counted = count;
    return total;
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
        .router_topk = cpu_router_topk,
        .permute_by_expert = cpu_permute_by_expert,
        .gather_rows = cpu_gather_rows,
        .grouped_linear = cpu_grouped_linear,
        .glu = cpu_glu,
        .combine = cpu_combine,
        .add_sigmoid_gated = cpu_add_sigmoid_gated,
        .clamp = cpu_clamp,
        .add = cpu_add,
        .cross_entropy_sum = cpu_cross_entropy_sum,
    };
    return &cpu;
}
