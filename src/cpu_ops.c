/* cpu_ops: the fp32 CPU backend (see backend.h): OpenBLAS for the GEMMs, OpenMP over
 * tokens, heads or rows for the rest. It is the reference the CUDA backend is tested
 * against, so every op is written the plain way, in the order transformers computes it
 * (softmax and norms in fp32, as the Hugging Face modeling code does). */
#include <cblas.h>
/* OpenBLAS's cblas.h pulls in <complex.h>, whose macro I would replace the conventional
 * name of the input width. */
#undef I
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "log.h"

static void cpu_embedding(float *x, const int32_t *tokens, const float *table, int N, int H)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        memcpy(x + (size_t)n * H, table + (size_t)tokens[n] * H, (size_t)H * sizeof(float));
}

static void cpu_linear(float *y, const float *x, const float *w, const float *bias, int N,
                       int I, int O, bool accumulate)
{
    if (N == 0 || O == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, O, I, 1.0f, x, I, w, I,
                accumulate ? 1.0f : 0.0f, y, O);
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

static void cpu_attention(float *out, const float *q, const float *k, const float *v,
                          const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                          float scale)
{
    int group = nH / nKV;
    size_t q_stride = (size_t)nH * Dh, kv_stride = (size_t)nKV * Dh;
#pragma omp parallel
    {
        float *scores = xmalloc((size_t)N * sizeof(float));
#pragma omp for schedule(dynamic, 4) collapse(2)
        for (int i = 0; i < N; i++)
            for (int h = 0; h < nH; h++) {
                const float *qi = q + i * q_stride + (size_t)h * Dh;
                int kv = h / group;
                int first = mask->sample_start[i];
                float max = -INFINITY;
                for (int j = first; j <= i; j++) {
                    const float *kj = k + j * kv_stride + (size_t)kv * Dh;
                    float s = 0.0f;
                    for (int d = 0; d < Dh; d++) s += qi[d] * kj[d];
                    s *= scale;
                    scores[j - first] = s;
                    if (s > max) max = s;
                }
                float sum = 0.0f;
                for (int j = first; j <= i; j++) {
                    float p = expf(scores[j - first] - max);
                    scores[j - first] = p;
                    sum += p;
                }
                float *oi = out + i * q_stride + (size_t)h * Dh;
                for (int d = 0; d < Dh; d++) oi[d] = 0.0f;
                for (int j = first; j <= i; j++) {
                    const float *vj = v + j * kv_stride + (size_t)kv * Dh;
                    float p = scores[j - first] / sum;
                    for (int d = 0; d < Dh; d++) oi[d] += p * vj[d];
                }
            }
        free(scores);
    }
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
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, O, I, 1.0f,
                    x + (size_t)offsets[e] * I, I, w + (size_t)e * O * I, I, 0.0f,
                    y + (size_t)offsets[e] * O, O);
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
        float max = -INFINITY;
        for (int v = 0; v < V; v++) max = z[v] > max ? z[v] : max;
        double sum = 0.0;
        for (int v = 0; v < V; v++) sum += exp((double)z[v] - max);
        total += log(sum) + max - z[labels[n]];
        count++;
    }
    *counted = count;
    return total;
}

const struct backend *backend_cpu(void)
{
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
