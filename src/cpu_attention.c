/* cpu_attention: the CPU backend's attention and its backward (backend.h), for cpu_ops.c's
 * op table. Causal within packed samples, with gpt_oss's sliding window and sinks, GQA
 * (query head h reads KV head h / (nH / nKV)) and MLA's value width Dv != Dh.
 *
 * The scheme is FlashAttention-2's (Dao, 2023, arXiv:2307.08691, algorithms 1 and 2) with
 * OpenBLAS for the products: per (sample, head, block of QUERY_BLOCK queries) the keys go
 * by tiles of KEY_TILE, so no score row is longer than a tile whatever the sample's
 * length. Per tile, S = scale Q K^T (one GEMM), the online softmax (Milakov and
 * Gimelshein, 2018, arXiv:1805.02867) keeps each row's running max m and sum l and
 * rescales the output so far by e^(m_old - m_new), and O += P V (one GEMM); at the end
 * O / l and the row's log-sum-exp m + log l, which the backward reads (mask->lse) to
 * recompute P = e^(S - lse) tile by tile. A sink starts a row's running max and sum
 * (m = sink, l = 1) and has no value.
 *
 * KEY_TILE 128: on the bench model's heads (8 x 512 tokens, 8/4 heads of 64, 1 thread)
 * the forward took 0.084 / 0.084 / 0.075 s of CPU with tiles of 64 / 128 / 256 keys and the
 * backward 0.195 / 0.182 / 0.173 s; 128 keeps a 64 x 128 tile in L1 and L2 and lets the
 * tests reach several tiles with short samples. The one-GEMM-per-block version it
 * replaces, whose score rows were as long as the sample, took 0.145 and 0.279 s (and
 * 1.25 and 2.24 s against 0.76 and 1.70 s on one sample of 4096 tokens).
 *
 * Determinism: the tiles depend on the positions alone and each item runs its tiles in
 * order inside one thread, so the bits do not depend on the thread count. The backward's
 * items are (sample, KV head): each owns its dK and dV rows and its query heads' dQ rows,
 * so no two threads add to one element. */
#include <cblas.h>
#undef I
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_math.h"
#include "cpu_ops_internal.h"
#include "log.h"

enum { QUERY_BLOCK = 64, KEY_TILE = 128 };

/* Per-thread scratch of QUERY_BLOCK x (KEY_TILE + max(KEY_TILE, Dv)) floats: the tile's
 * scores and the block's output (forward) or its score gradients (backward). Grown when a
 * wider value head comes, so once per model. */
static _Thread_local float *tile_scratch = NULL;
static _Thread_local size_t tile_scratch_size = 0;

static float *scratch_for(int Dv)
{
    size_t need = (size_t)QUERY_BLOCK * (KEY_TILE + (Dv > KEY_TILE ? Dv : KEY_TILE));
    if (tile_scratch_size < need) {
        free(tile_scratch);
        tile_scratch = xmalloc(need * sizeof(float));
        tile_scratch_size = need;
    }
    return tile_scratch;
}

/* The packed samples as (first token, length) pairs in *samples; returns their count. */
static int list_samples(int32_t **samples, const int32_t *sample_start, int N)
{
    int count = 0;
    for (int i = 0; i < N; i++) count += sample_start[i] == i;
    static struct kept kept; /* the ops are called one at a time */
    int32_t *s = cpu_op_scratch(&kept, (size_t)(count ? count : 1) * 2 * sizeof(int32_t),
                                cpu_most_tokens((size_t)N) * 2 * sizeof(int32_t));
    int at = 0;
    for (int i = 0; i < N; i++) {
        if (sample_start[i] != i) continue;
        int end = i + 1;
        while (end < N && sample_start[end] == i) end++;
        s[2 * at] = i;
        s[2 * at + 1] = end - i;
        at++;
    }
    *samples = s;
    return count;
}

/* One block of queries first .. first + rows - 1 of a sample (positions within it) and
 * the keys lo .. hi - 1 they read: from the first query's window start (0 without a
 * window) to the last query. */
struct query_block {
    int first, rows, lo, hi;
};

static struct query_block query_block(int length, int b, int window)
{
    struct query_block qb = {.first = b * QUERY_BLOCK};
    qb.rows = length - qb.first < QUERY_BLOCK ? length - qb.first : QUERY_BLOCK;
    qb.lo = window && qb.first - window + 1 > 0 ? qb.first - window + 1 : 0;
    qb.hi = qb.first + qb.rows;
    return qb;
}

/* The keys query i sees within the tile k0 .. k0 + width - 1, as [*begin, *end) of the
 * tile's columns, 0 <= *begin <= *end <= width (empty when equal): the keys
 * max(k0, i - window + 1) .. i that lie in the tile. */
static void visible_in_tile(int *begin, int *end, int i, int k0, int width, int window)
{
    int from = window && i - window + 1 > k0 ? i - window + 1 - k0 : 0;
    int to = i + 1 - k0 < width ? i + 1 - k0 : width;
    *begin = from < width ? from : width;
    *end = to > *begin ? to : *begin;
}

/* S[rows, width] = scale Q_block K_tile^T */
static void tile_scores(float *S, const float *qb, int q_stride, const float *kt, int kv_stride,
                        int rows, int width, int Dh, float scale)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, width, Dh, scale, qb, q_stride, kt,
                kv_stride, 0.0f, S, width);
}

/* The online softmax over one tile of scores S[rows, width] (keys k0 ..): each row's
 * visible scores become e^(s - m_new) in place (the others 0), its max[r] and sum[r]
 * advance, and factor[r] = e^(m_old - m_new) is what the row's output so far must be
 * multiplied by (1 when the max did not grow). The forward and the backward's recomputed
 * log-sum-exp share it, so both see the same bits. */
static void online_softmax_tile(float *S, float *factor, float *max, double *sum, int rows,
                                int width, int first, int k0, int window)
{
    for (int r = 0; r < rows; r++) {
        float *row = S + (size_t)r * width;
        int begin, end;
        visible_in_tile(&begin, &end, first + r, k0, width, window);
        factor[r] = 1.0f;
        if (begin >= end) {
            memset(row, 0, (size_t)width * sizeof(float));
            continue;
        }
        float tile_max = row_max(row + begin, end - begin);
        float m = tile_max > max[r] ? tile_max : max[r];
        if (m > max[r]) factor[r] = exp_nonpositive(max[r] - m);
        sum[r] = sum[r] * factor[r] + row_exp_store_sum(row + begin, end - begin, m);
        max[r] = m;
        for (int j = 0; j < begin; j++) row[j] = 0.0f;
        for (int j = end; j < width; j++) row[j] = 0.0f;
    }
}

/* Each row's running max and sum before the first tile: the sink's logit and e^0, or
 * nothing. */
static void online_softmax_start(float *max, double *sum, int rows, const float *sink)
{
    for (int r = 0; r < rows; r++) {
        max[r] = sink ? *sink : -INFINITY;
        sum[r] = sink ? 1.0 : 0.0;
    }
}

static float log_sum_exp(float max, double sum) { return max + (float)log(sum); }

/* The log-sum-exp of each row of a query block, as the forward forms it (the backward's
 * fallback when the forward's was not saved). */
static void block_log_sum_exp(float *lse, float *S, const float *qb, int q_stride, const float *ks,
                              int kv_stride, struct query_block b, int Dh, float scale, int window,
                              const float *sink)
{
    float max[QUERY_BLOCK], factor[QUERY_BLOCK];
    double sum[QUERY_BLOCK];
    online_softmax_start(max, sum, b.rows, sink);
    for (int k0 = b.lo; k0 < b.hi; k0 += KEY_TILE) {
        int width = b.hi - k0 < KEY_TILE ? b.hi - k0 : KEY_TILE;
        tile_scores(S, qb, q_stride, ks + (size_t)k0 * kv_stride, kv_stride, b.rows, width, Dh,
                    scale);
        online_softmax_tile(S, factor, max, sum, b.rows, width, b.first, k0, window);
    }
    for (int r = 0; r < b.rows; r++) lse[r] = log_sum_exp(max[r], sum[r]);
}

/* One row of a tile in the backward, VLANES at a time: p = e^(s - lse) in place of the scores
 * s, and dS = p (dP - D) in place of dP. */
static void probability_gradients(float *p, float *dp, int n, float lse, float D)
{
    int i = 0;
    for (; i + VLANES <= n; i += VLANES) {
        vfloat e = vexp_nonpositive(vload(p + i) - lse);
        vstore(p + i, e);
        vstore(dp + i, e * (vload(dp + i) - D));
    }
    if (i < n) {
        vfloat e = vexp_nonpositive(vload_part(p + i, n - i) - lse);
        vstore_part(p + i, e, n - i);
        vstore_part(dp + i, e * (vload_part(dp + i, n - i) - D), n - i);
    }
}

/* Items (sample, head, query block), each computing its block's output rows alone. */
void cpu_attention(float *out, const float *q, const float *k, const float *v,
                   const struct attention_mask *mask, int N, int nH, int nKV, int Dh, int Dv,
                   float scale)
{
    int group = nH / nKV;
    int q_stride = nH * Dh, kv_stride = nKV * Dh, v_stride = nKV * Dv, out_stride = nH * Dv;
    int32_t *samples;
    int n_samples = list_samples(&samples, mask->sample_start, N);
    int n_items = 0;
    for (int s = 0; s < n_samples; s++)
        n_items += nH * ((samples[2 * s + 1] + QUERY_BLOCK - 1) / QUERY_BLOCK);
    /* at most a block a head for every sample and every QUERY_BLOCK tokens */
    static struct kept kept;
    size_t most_items = (size_t)nH * (cpu_most_tokens((size_t)N) * (QUERY_BLOCK + 1) / QUERY_BLOCK + 1);
    int32_t *items = cpu_op_scratch(&kept, (size_t)(n_items ? n_items : 1) * 2 * sizeof(int32_t),
                                    most_items * 2 * sizeof(int32_t));
    for (int s = 0, at = 0; s < n_samples; s++) {
        int blocks = (samples[2 * s + 1] + QUERY_BLOCK - 1) / QUERY_BLOCK;
        for (int hb = 0; hb < nH * blocks; hb++, at++) items[2 * at] = s, items[2 * at + 1] = hb;
    }
#pragma omp parallel
    {
        float *S = scratch_for(Dv), *O = S + (size_t)QUERY_BLOCK * KEY_TILE;
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            int start = samples[2 * items[2 * it]], length = samples[2 * items[2 * it] + 1];
            int blocks = (length + QUERY_BLOCK - 1) / QUERY_BLOCK;
            int h = items[2 * it + 1] / blocks, kv = h / group;
            struct query_block b = query_block(length, items[2 * it + 1] % blocks, mask->window);
            const float *qb = q + (size_t)(start + b.first) * q_stride + (size_t)h * Dh;
            const float *ks = k + (size_t)start * kv_stride + (size_t)kv * Dh;
            const float *vs = v + (size_t)start * v_stride + (size_t)kv * Dv;
            float max[QUERY_BLOCK], factor[QUERY_BLOCK];
            double sum[QUERY_BLOCK];
            online_softmax_start(max, sum, b.rows, mask->sinks ? mask->sinks + h : NULL);
            memset(O, 0, (size_t)b.rows * Dv * sizeof(float));
            for (int k0 = b.lo; k0 < b.hi; k0 += KEY_TILE) {
                int width = b.hi - k0 < KEY_TILE ? b.hi - k0 : KEY_TILE;
                tile_scores(S, qb, q_stride, ks + (size_t)k0 * kv_stride, kv_stride, b.rows, width,
                            Dh, scale);
                online_softmax_tile(S, factor, max, sum, b.rows, width, b.first, k0, mask->window);
                for (int r = 0; r < b.rows; r++)
                    if (factor[r] != 1.0f) scale_row(O + (size_t)r * Dv, (size_t)Dv, factor[r]);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, b.rows, Dv, width, 1.0f, S,
                            width, vs + (size_t)k0 * v_stride, v_stride, 1.0f, O, Dv);
            }
            for (int r = 0; r < b.rows; r++) {
                float inverse = (float)(1.0 / sum[r]);
                float *o = out + (size_t)(start + b.first + r) * out_stride + (size_t)h * Dv;
                for (int d = 0; d < Dv; d++) o[d] = O[(size_t)r * Dv + d] * inverse;
                if (mask->lse) mask->lse[(size_t)h * N + start + b.first + r] = log_sum_exp(max[r], sum[r]);
            }
        }
    }
}

/* Per (sample, KV head): for each query head of its group and each block of QUERY_BLOCK
 * queries, each key tile's P = e^(S - lse) from the forward's log-sum-exp (recomputed by
 * block_log_sum_exp when mask->lse is NULL), then (FlashAttention-2, algorithm 2)
 *   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D) with D_i = <dO_i, O_i>,
 *   dQ += scale dS K,  dK += scale dS^T Q.
 * A sink adds a column with no value, so dS keeps its form, and d sink = -sum_i
 * P_sink(i) D_i (the sink's own dS), P_sink = e^(sink - lse). The sinks' sums are kept per
 * item and added in sample order. */
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *out,
                            const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                            int Dv, float scale)
{
    int group = nH / nKV;
    int q_stride = nH * Dh, kv_stride = nKV * Dh, v_stride = nKV * Dv, out_stride = nH * Dv;
    int32_t *samples;
    int n_samples = list_samples(&samples, mask->sample_start, N);
    int n_items = n_samples * nKV; /* item = sample * nKV + kv */
    /* per item, per query head of its group: the item's share of d sinks */
    static struct kept kept;
    size_t parts = (size_t)(n_items ? n_items : 1) * group;
    double *dsink_parts = mask->sinks && mask->dsinks
                              ? cpu_op_scratch(&kept, parts * sizeof(double),
                                               cpu_most_tokens((size_t)N) * nKV * group * sizeof(double))
                              : NULL;
    if (dsink_parts) memset(dsink_parts, 0, parts * sizeof(double));
#pragma omp parallel
    {
        float *P = scratch_for(Dv), *dS = P + (size_t)QUERY_BLOCK * KEY_TILE;
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            int start = samples[2 * (it / nKV)], length = samples[2 * (it / nKV) + 1];
            int kv = it % nKV, blocks = (length + QUERY_BLOCK - 1) / QUERY_BLOCK;
            const float *ks = k + (size_t)start * kv_stride + (size_t)kv * Dh;
            const float *vs = v + (size_t)start * v_stride + (size_t)kv * Dv;
            float *dks = dk + (size_t)start * kv_stride + (size_t)kv * Dh;
            float *dvs = dv + (size_t)start * v_stride + (size_t)kv * Dv;
            for (int j = 0; j < length; j++) {
                memset(dks + (size_t)j * kv_stride, 0, (size_t)Dh * sizeof(float));
                memset(dvs + (size_t)j * v_stride, 0, (size_t)Dv * sizeof(float));
            }
            for (int h = kv * group; h < (kv + 1) * group; h++)
                for (int bi = 0; bi < blocks; bi++) {
                    struct query_block b = query_block(length, bi, mask->window);
                    size_t offset = (size_t)(start + b.first) * q_stride + (size_t)h * Dh;
                    size_t out_offset = (size_t)(start + b.first) * out_stride + (size_t)h * Dv;
                    const float *qb = q + offset, *dob = dout + out_offset, *ob = out + out_offset;
                    const float *sink = mask->sinks ? mask->sinks + h : NULL;
                    float lse[QUERY_BLOCK], D[QUERY_BLOCK];
                    if (mask->lse)
                        memcpy(lse, mask->lse + (size_t)h * N + start + b.first,
                               (size_t)b.rows * sizeof(float));
                    else
                        block_log_sum_exp(lse, P, qb, q_stride, ks, kv_stride, b, Dh, scale,
                                          mask->window, sink);
                    for (int r = 0; r < b.rows; r++) {
                        const float *dor = dob + (size_t)r * out_stride, *orow = ob + (size_t)r * out_stride;
                        D[r] = 0.0f;
                        for (int d = 0; d < Dv; d++) D[r] += dor[d] * orow[d];
                        if (dsink_parts)
                            dsink_parts[(size_t)it * group + h - kv * group] -=
                                (double)exp_nonpositive(*sink - lse[r]) * D[r];
                    }
                    for (int k0 = b.lo; k0 < b.hi; k0 += KEY_TILE) {
                        int width = b.hi - k0 < KEY_TILE ? b.hi - k0 : KEY_TILE;
                        const float *kt = ks + (size_t)k0 * kv_stride, *vt = vs + (size_t)k0 * v_stride;
                        tile_scores(P, qb, q_stride, kt, kv_stride, b.rows, width, Dh, scale);
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b.rows, width, Dv, 1.0f,
                                    dob, out_stride, vt, v_stride, 0.0f, dS, width);
                        for (int r = 0; r < b.rows; r++) {
                            float *pr = P + (size_t)r * width, *sr = dS + (size_t)r * width;
                            int begin, end;
                            visible_in_tile(&begin, &end, b.first + r, k0, width, mask->window);
                            for (int j = 0; j < begin; j++) pr[j] = sr[j] = 0.0f;
                            probability_gradients(pr + begin, sr + begin, end - begin, lse[r], D[r]);
                            for (int j = end; j < width; j++) pr[j] = sr[j] = 0.0f;
                        }
                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, width, Dv, b.rows, 1.0f,
                                    P, width, dob, out_stride, 1.0f, dvs + (size_t)k0 * v_stride,
                                    v_stride);
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, b.rows, Dh, width,
                                    scale, dS, width, kt, kv_stride, k0 > b.lo ? 1.0f : 0.0f,
                                    dq + offset, q_stride);
                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, width, Dh, b.rows, scale,
                                    dS, width, qb, q_stride, 1.0f, dks + (size_t)k0 * kv_stride,
                                    kv_stride);
                    }
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
