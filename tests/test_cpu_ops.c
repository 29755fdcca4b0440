/* test_cpu_ops: the CPU backend's ops against naive double-precision loops, on sizes the
 * golden fixtures do not reach: packed samples longer than one query block (64), GQA,
 * experts with more rows than one GEMM block, uneven and empty experts, row counts that
 * do not divide among threads, a vocabulary-wide cross-entropy. Run with 1 and with
 * several OpenMP threads by the test driver; results must not depend on it. */
#include <math.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backend.h"
#include "check.h"
#include "log.h"
#include "rng.h"
#include "safetensors.h"

static struct rng rng;

static float *random_array(size_t n, double scale)
{
    float *x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = (float)(scale * rng_normal(&rng));
    return x;
}

static double max_relative(const float *a, const double *ref, size_t n)
{
    double diff = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        diff = fmax(diff, fabs(a[i] - ref[i]));
        scale = fmax(scale, fabs(ref[i]));
    }
    return diff / (scale > 0 ? scale : 1);
}

/* Attention against a naive softmax: q, k [., Dh] per head, v and out [., Dv] per head
 * (MLA: Dv != Dh). */
static void test_attention_case(const struct backend *ops, int nH, int nKV, int Dh, int Dv)
{
    /* samples of 150, 64, 1 and 77 tokens packed in one batch */
    enum { N = 292 };
    const int lengths[4] = {150, 64, 1, 77};
    int32_t starts[N];
    for (int s = 0, at = 0; s < 4; at += lengths[s++])
        for (int i = 0; i < lengths[s]; i++) starts[at + i] = at;
    float *q = random_array((size_t)N * nH * Dh, 1.0), *k = random_array((size_t)N * nKV * Dh, 1.0);
    float *v = random_array((size_t)N * nKV * Dv, 1.0);
    float *out = xcalloc((size_t)N * nH * Dv, sizeof(float));
    double *ref = xcalloc((size_t)N * nH * Dv, sizeof(double));
    float scale = 1.0f / sqrtf((float)Dh);
    struct attention_mask mask = {.sample_start = starts};
    ops->attention(out, q, k, v, &mask, N, nH, nKV, Dh, Dv, scale);
    double p[N];
    for (int i = 0; i < N; i++)
        for (int h = 0; h < nH; h++) {
            int kv = h / (nH / nKV);
            double max = -INFINITY, sum = 0;
            for (int j = starts[i]; j <= i; j++) {
                double s = 0;
                for (int d = 0; d < Dh; d++) s += (double)q[(i * nH + h) * Dh + d] * k[(j * nKV + kv) * Dh + d];
                p[j] = s * scale;
                max = fmax(max, p[j]);
            }
            for (int j = starts[i]; j <= i; j++) sum += p[j] = exp(p[j] - max);
            for (int j = starts[i]; j <= i; j++)
                for (int d = 0; d < Dv; d++)
                    ref[(i * nH + h) * Dv + d] += p[j] / sum * v[(j * nKV + kv) * Dv + d];
        }
    double err = max_relative(out, ref, (size_t)N * nH * Dv);
    CHECK(err < 1e-5, "attention nH %d nKV %d Dh %d Dv %d: relative error %.3g", nH, nKV, Dh, Dv,
          err);
    printf("attention (packed 150+64+1+77, heads %d/%d, Dh %d, Dv %d): max relative error %.2e\n",
           nH, nKV, Dh, Dv, err);
    free(q), free(k), free(v), free(out), free(ref);
}

static void test_attention(const struct backend *ops)
{
    test_attention_case(ops, 6, 2, 10, 10); /* GQA */
    test_attention_case(ops, 4, 4, 12, 7);  /* MLA's shape: values narrower than the keys */
    test_attention_case(ops, 2, 2, 6, 9);   /* and wider */
}

/* copy_columns: a block of a strided matrix into another, written and added; what lies
 * outside the block is untouched. */
static void test_copy_columns(const struct backend *ops)
{
    enum { rows = 37, src_ld = 11, dst_ld = 9, cols = 5, src_at = 4, dst_at = 3 };
    float *src = random_array((size_t)rows * src_ld, 1.0), *dst = random_array((size_t)rows * dst_ld, 1.0);
    float *before = xmalloc((size_t)rows * dst_ld * sizeof(float));
    memcpy(before, dst, (size_t)rows * dst_ld * sizeof(float));
    for (int accumulate = 0; accumulate < 2; accumulate++) {
        ops->copy_columns(dst + dst_at, dst_ld, src + src_at, src_ld, rows, cols, accumulate);
        int wrong = 0;
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < dst_ld; c++) {
                float want = before[r * dst_ld + c];
                if (c >= dst_at && c < dst_at + cols) {
                    float s = src[r * src_ld + src_at + c - dst_at];
                    want = accumulate ? s + s : s; /* the second call adds onto the first */
                }
                wrong += dst[r * dst_ld + c] != want;
            }
        CHECK(wrong == 0, "copy_columns%s: %d elements wrong", accumulate ? " accumulate" : "",
              wrong);
    }
    free(src), free(dst), free(before);
}

static void test_grouped_linear(const struct backend *ops)
{
    /* 5 experts holding 0, 130, 1, 64 and 200 rows */
    enum { E = 5, I = 33, O = 29 };
    const int32_t offsets[E + 1] = {0, 0, 130, 131, 195, 395};
    int M = offsets[E];
    float *x = random_array((size_t)M * I, 1.0), *w = random_array((size_t)E * O * I, 0.3);
    float *y = xcalloc((size_t)M * O, sizeof(float));
    double *ref = xcalloc((size_t)M * O, sizeof(double));
    const float *experts[E];
    for (int e = 0; e < E; e++) experts[e] = w + (size_t)e * O * I;
    ops->grouped_linear(y, x, experts, offsets, E, I, O);
    for (int e = 0; e < E; e++)
        for (int r = offsets[e]; r < offsets[e + 1]; r++)
            for (int o = 0; o < O; o++) {
                double s = 0;
                for (int i = 0; i < I; i++) s += (double)x[r * I + i] * w[((size_t)e * O + o) * I + i];
                ref[r * O + o] = s;
            }
    double err = max_relative(y, ref, (size_t)M * O);
    CHECK(err < 1e-5, "grouped_linear: relative error %.3g", err);
    free(x), free(w), free(y), free(ref);
}

static void test_linear(const struct backend *ops)
{
    enum { N = 131, I = 37, O = 23 };
    float *x = random_array((size_t)N * I, 1.0), *w = random_array((size_t)O * I, 0.3);
    float *b = random_array(O, 1.0), *y = random_array((size_t)N * O, 1.0);
    double *ref = xcalloc((size_t)N * O, sizeof(double));
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) {
            double s = y[n * O + o] + b[o]; /* accumulate onto y, plus bias */
            for (int i = 0; i < I; i++) s += (double)x[n * I + i] * w[o * I + i];
            ref[n * O + o] = s;
        }
    ops->linear(y, x, w, b, N, I, O, true);
    double err = max_relative(y, ref, (size_t)N * O);
    CHECK(err < 1e-5, "linear: relative error %.3g", err);
    free(x), free(w), free(b), free(y), free(ref);
}

static void test_cross_entropy(const struct backend *ops)
{
    enum { N = 37, V = 5003 };
    float *z = random_array((size_t)N * V, 4.0);
    int32_t labels[N];
    double ref = 0;
    long long want = 0;
    for (int n = 0; n < N; n++) {
        labels[n] = n % 5 == 3 ? -100 : (int32_t)rng_below(&rng, V);
        if (labels[n] < 0) continue;
        double max = -INFINITY, sum = 0;
        for (int v = 0; v < V; v++) max = fmax(max, z[(size_t)n * V + v]);
        for (int v = 0; v < V; v++) sum += exp(z[(size_t)n * V + v] - max);
        ref += log(sum) + max - z[(size_t)n * V + labels[n]];
        want++;
    }
    long long counted = 0;
    double got = ops->cross_entropy_sum(z, labels, N, V, &counted);
    CHECK(counted == want, "cross-entropy counted %lld of %lld targets", counted, want);
    CHECK(fabs(got - ref) <= 1e-6 * fabs(ref), "cross-entropy %.9g, naive %.9g", got, ref);
    /* far-apart logits: the exponentials of the small ones underflow to nothing */
    float wide[3] = {0.0f, -200.0f, 30.0f};
    int32_t one[1] = {0};
    got = ops->cross_entropy_sum(wide, one, 1, 3, &counted);
    CHECK(fabs(got - 30.0) < 1e-5, "cross-entropy of far-apart logits %.9g, expected 30", got);
    free(z);
}

/* A real vocabulary (Qwen3's 151936): each row's sum of about 1.5e5 exponentials must be
 * accurate, or the loss is biased. Summed in a few fp32 running totals, every term below
 * half an ulp of a total near 1e3 is lost: the sum comes out about 1.8e-5 low on every
 * row. Against a long-double reference the log-sum-exp of a row must be within 1e-6 (a
 * relative error of the sum of 1e-6; the exponentials themselves are good to about 1e-7
 * each and unbiased), and the softmax that the gradient forms, summed over the row, must be
 * 1 within 1e-6. */
static void test_cross_entropy_vocabulary(const struct backend *ops)
{
    enum { N = 3, V = 151936 };
    float *z = xmalloc((size_t)N * V * sizeof(float)), *g = xmalloc((size_t)N * V * sizeof(float));
    for (size_t i = 0; i < (size_t)N * V; i++) z[i] = (float)(rng_uniform(&rng) * 16.0 - 8.0);
    int32_t labels[N];
    long double ref = 0;
    for (int n = 0; n < N; n++) {
        const float *row = z + (size_t)n * V;
        labels[n] = (int32_t)rng_below(&rng, V);
        float max = -INFINITY;
        for (int v = 0; v < V; v++) max = fmaxf(max, row[v]);
        long double sum = 0;
        for (int v = 0; v < V; v++) sum += expl((long double)row[v] - max);
        ref += logl(sum) + max - row[labels[n]];
    }
    long long counted = 0;
    double got = ops->cross_entropy_sum(z, labels, N, V, &counted);
    CHECK(counted == N && fabsl(got - ref) <= N * 1e-6L,
          "cross-entropy over %d rows of %d logits: %.9f, long-double reference %.9Lf (%.3Lg per "
          "row)",
          N, V, got, ref, (got - ref) / N);
    ops->cross_entropy_backward(g, z, labels, N, V, 1.0f);
    for (int n = 0; n < N; n++) {
        double softmax_sum = 1.0; /* the gradient is softmax - onehot */
        for (int v = 0; v < V; v++) softmax_sum += g[(size_t)n * V + v];
        CHECK(fabs(softmax_sum - 1.0) <= 1e-6,
              "cross-entropy gradient row %d: softmax sums to "
              "1 %+.3g",
              n, softmax_sum - 1.0);
    }
    free(z), free(g);
}

/* The vocabulary-chunked cross-entropy (ce_chunk_update over chunks, ce_chunk_finish)
 * against a naive count of argmax hits and a long-double loss: logits drawn from few
 * values so that a row's maximum repeats, within a chunk and across chunks (the lower id
 * wins, as count_correct's naive scan says), labels placed on the first, a later and no
 * copy of the maximum, and an ignored row. */
static void test_cross_entropy_chunks(const struct backend *ops)
{
    enum { N = 9, V = 50, C = 16 };
    float z[N * V], logits[N * C], state[N * 4];
    int32_t labels[N], best[N];
    for (int i = 0; i < N * V; i++) z[i] = (float)rng_below(&rng, 4) - 2.0f;
    long double ref = 0;
    long long want_right = 0, want_counted = 0;
    for (int n = 0; n < N; n++) {
        const float *row = z + (size_t)n * V;
        int first = 0, last = 0;
        for (int v = 1; v < V; v++) {
            if (row[v] > row[first]) first = v;
            if (row[v] >= row[first]) last = v;
        }
        labels[n] = n % 3 == 0 ? first : n % 3 == 1 ? last : (int32_t)rng_below(&rng, V);
        if (n == N - 1) labels[n] = -100;
        if (labels[n] < 0) continue;
        float max = row[first];
        long double sum = 0;
        for (int v = 0; v < V; v++) sum += expl((long double)row[v] - max);
        ref += logl(sum) + max - row[labels[n]];
        want_counted++;
        want_right += labels[n] == first;
    }
    for (int v0 = 0; v0 < V; v0 += C) {
        int width = V - v0 < C ? V - v0 : C;
        for (int n = 0; n < N; n++)
            memcpy(logits + (size_t)n * width, z + (size_t)n * V + v0, (size_t)width * sizeof(float));
        ops->ce_chunk_update(state, best, logits, labels, N, width, v0);
    }
    long long counted = 0, right = 0;
    double got = ops->ce_chunk_finish(state, best, labels, N, &counted, &right);
    CHECK(counted == want_counted && right == want_right,
          "chunked cross-entropy: %lld counted, %lld right; naive %lld and %lld", counted, right,
          want_counted, want_right);
    CHECK(fabsl(got - ref) <= 1e-5L * N, "chunked cross-entropy %.9g, long double %.9Lg", got, ref);
    CHECK(ops->count_correct(z, labels, N, V) == want_right, "count_correct %lld, naive %lld",
          ops->count_correct(z, labels, N, V), want_right);
    /* cross_entropy_rows: the naive counts and the long-double loss, and bit for bit the
     * separate ops' sum and gradient */
    float fused[N * V], grad[N * V];
    memcpy(fused, z, sizeof fused);
    long long sum_counted = 0;
    double separate = ops->cross_entropy_sum(z, labels, N, V, &sum_counted);
    ops->cross_entropy_backward(grad, z, labels, N, V, 0.25f);
    counted = right = -1;
    double rows = ops->cross_entropy_rows(fused, labels, N, V, 0.25f, &counted, &right);
    CHECK(counted == want_counted && right == want_right,
          "cross_entropy_rows: %lld counted, %lld right; naive %lld and %lld", counted, right,
          want_counted, want_right);
    CHECK(fabsl(rows - ref) <= 1e-5L * N && rows == separate,
          "cross_entropy_rows %.17g; cross_entropy_sum %.17g, long double %.9Lg", rows, separate, ref);
    CHECK(memcmp(fused, grad, sizeof grad) == 0,
          "cross_entropy_rows' gradient is not cross_entropy_backward's");
}

static void test_router(const struct backend *ops)
{
    /* hand-worked: logits ln(1), ln(2), ln(3), ln(4) -> probabilities .1 .2 .3 .4; top-2
     * ids 3, 2; weights .4 .3, renormalised .571428.. .428571..; a tie goes to the lower id */
    float logits[8] = {0.0f, logf(2), logf(3), logf(4), 1.0f, 1.0f, 0.0f, 0.0f};
    int32_t ids[4];
    float weights[4], probs[8];
    struct router_params route = {
        .kind = ROUTER_SOFTMAX_TOPK, .scaling = 1.0f, .n_group = 1, .topk_group = 1};
    ops->router_topk(ids, weights, probs, logits, 2, 4, 2, &route);
    CHECK(ids[0] == 3 && ids[1] == 2, "top-2 ids %d %d, expected 3 2", ids[0], ids[1]);
    CHECK(fabsf(weights[0] - 0.4f) < 1e-6f && fabsf(weights[1] - 0.3f) < 1e-6f, "weights %g %g",
          weights[0], weights[1]);
    CHECK(ids[2] == 0 && ids[3] == 1, "tie: ids %d %d, expected 0 1", ids[2], ids[3]);
    route.renormalise = true;
    ops->router_topk(ids, weights, NULL, logits, 1, 4, 2, &route);
    CHECK(fabsf(weights[0] - 4.0f / 7) < 1e-6f && fabsf(weights[1] - 3.0f / 7) < 1e-6f,
          "renormalised %g %g", weights[0], weights[1]);
}

/* ---- grouped and sigmoid routers ------------------------------------------------------
 * The reference below is written from transformers 5.24's DeepseekV2TopkRouter
 * (group_limited_greedy) and DeepseekV3TopkRouter / Glm4MoeTopkRouter, in double, by
 * sorting instead of the backend's rounds of argmax. */

struct ranked {
    double value;
    int index;
};

/* descending value, ties to the lower index */
static int by_value(const void *a, const void *b)
{
    const struct ranked *x = a, *y = b;
    if (x->value != y->value) return x->value < y->value ? 1 : -1;
    return x->index - y->index;
}

/* One token: ids[K], weights[K], score[E] (softmax probabilities or sigmoid scores). */
static void naive_route(int32_t *ids, double *weights, double *score, const float *z, int E, int K,
                        const struct router_params *rp)
{
    bool sigmoid = rp->kind == ROUTER_SIGMOID_BIAS;
    struct ranked *choice = xmalloc((size_t)E * sizeof *choice);
    double max = -INFINITY, sum = 0;
    for (int e = 0; e < E; e++) max = fmax(max, z[e]);
    for (int e = 0; e < E; e++) sum += exp((double)z[e] - max);
    for (int e = 0; e < E; e++) {
        score[e] = sigmoid ? 1.0 / (1.0 + exp(-(double)z[e])) : exp((double)z[e] - max) / sum;
        choice[e] = (struct ranked){score[e] + (sigmoid && rp->bias ? rp->bias[e] : 0.0), e};
    }
    if (rp->kind != ROUTER_SOFTMAX_TOPK) {
        int size = E / rp->n_group;
        struct ranked *group = xmalloc((size_t)rp->n_group * sizeof *group);
        struct ranked *members = xmalloc((size_t)size * sizeof *members);
        for (int g = 0; g < rp->n_group; g++) {
            memcpy(members, choice + g * size, (size_t)size * sizeof *members);
            qsort(members, (size_t)size, sizeof *members, by_value);
            /* v2: the group's best probability; v3: the sum of its best two scores */
            group[g] = (struct ranked){
                sigmoid ? members[0].value + members[1].value : members[0].value, g};
        }
        qsort(group, (size_t)rp->n_group, sizeof *group, by_value);
        for (int r = rp->topk_group; r < rp->n_group; r++)
            for (int e = group[r].index * size; e < (group[r].index + 1) * size; e++)
                choice[e].value = sigmoid ? -INFINITY : 0.0;
        free(group), free(members);
    }
    qsort(choice, (size_t)E, sizeof *choice, by_value);
    double total = sigmoid ? 1e-20 : 0.0;
    for (int k = 0; k < K; k++) total += score[ids[k] = choice[k].index];
    for (int k = 0; k < K; k++)
        weights[k] = rp->scaling * score[ids[k]] / (rp->renormalise ? total : 1.0);
    free(choice);
}

/* The backend against naive_route on random logits (and a random bias) for one routing. */
static void check_router_against_naive(const struct backend *ops, const char *what, int N, int E,
                                       int K, const struct router_params *rp)
{
    float *logits = random_array((size_t)N * E, 2.0), *weights = xmalloc((size_t)N * K * 4);
    float *probs = xmalloc((size_t)N * E * sizeof(float));
    int32_t *ids = xmalloc((size_t)N * K * sizeof(int32_t)), want_ids[64];
    double want_weights[64], *score = xmalloc((size_t)E * sizeof(double));
    ops->router_topk(ids, weights, probs, logits, N, E, K, rp);
    int wrong_ids = 0;
    double weight_error = 0, score_error = 0;
    for (int n = 0; n < N; n++) {
        naive_route(want_ids, want_weights, score, logits + (size_t)n * E, E, K, rp);
        for (int k = 0; k < K; k++) {
            wrong_ids += ids[(size_t)n * K + k] != want_ids[k];
            weight_error = fmax(weight_error, fabs(weights[(size_t)n * K + k] - want_weights[k]) /
                                                  fmax(1e-30, fabs(want_weights[k])));
        }
        for (int e = 0; e < E; e++)
            score_error = fmax(score_error, fabs(probs[(size_t)n * E + e] - score[e]));
    }
    printf("router %-34s %d tokens: %d ids differ, weights max relative error %.2e, "
           "scores max error %.2e\n",
           what, N, wrong_ids, weight_error, score_error);
    CHECK(wrong_ids == 0, "router %s: %d of %d ids differ from the reference", what, wrong_ids,
          N * K);
    CHECK(weight_error < 1e-6 && score_error < 1e-6,
          "router %s: weights relative error %.3g, scores error %.3g", what, weight_error,
          score_error);
    free(logits), free(weights), free(probs), free(ids), free(score);
}

static float logit_of(double s)
{
    return (float)log(s / (1 - s));
}

static void test_grouped_routers(const struct backend *ops)
{
    /* Hand-worked, E = 8 in 4 groups of 2, keep 2 groups, K = 3.
     * deepseek_v2: probabilities (9 2 8 1 7 7 1 1)/36; group maxima 9 8 7 1 keep groups
     * 0 and 1: ids 0 2 1 (ungrouped top-3 would be 0 2 4); weights p x 2, unnormalised. */
    const double raw[8] = {9, 2, 8, 1, 7, 7, 1, 1};
    float logits[8];
    for (int e = 0; e < 8; e++) logits[e] = (float)log(raw[e]);
    int32_t ids[3];
    float weights[3], probs[8];
    struct router_params v2 = {ROUTER_GROUPED_GREEDY, false, 2.0f, 4, 2, NULL, NULL, 0};
    ops->router_topk(ids, weights, probs, logits, 1, 8, 3, &v2);
    CHECK(ids[0] == 0 && ids[1] == 2 && ids[2] == 1, "grouped greedy ids %d %d %d, want 0 2 1",
          ids[0], ids[1], ids[2]);
    CHECK(fabsf(weights[0] - 0.5f) < 1e-6f && fabsf(weights[1] - 16.0f / 36) < 1e-6f &&
              fabsf(weights[2] - 4.0f / 36) < 1e-6f,
          "grouped greedy weights %g %g %g, want .5 .4444 .1111", weights[0], weights[1],
          weights[2]);
    v2.n_group = v2.topk_group = 1; /* one group: plain top-k */
    ops->router_topk(ids, weights, probs, logits, 1, 8, 3, &v2);
    CHECK(ids[0] == 0 && ids[1] == 2 && ids[2] == 4, "ungrouped ids %d %d %d, want 0 2 4", ids[0],
          ids[1], ids[2]);

    /* deepseek_v3: s = .9 .1 .8 .7 .6 .55 .95 .05, bias -.5 on expert 6: c = .9 .1 .8 .7 .6
     * .55 .45 .05; group sums of the best two 1.0 1.5 1.15 .5 keep groups 1 and 2: ids 2 3 4
     * (by c ungrouped: 0 2 3; without the bias: 6 0 2); weights s / (.8 + .7 + .6) x 2.5 */
    const double s[8] = {.9, .1, .8, .7, .6, .55, .95, .05};
    float bias[8] = {0, 0, 0, 0, 0, 0, -0.5f, 0};
    for (int e = 0; e < 8; e++) logits[e] = logit_of(s[e]);
    struct router_params v3 = {ROUTER_SIGMOID_BIAS, true, 2.5f, 4, 2, bias, NULL, 0};
    ops->router_topk(ids, weights, probs, logits, 1, 8, 3, &v3);
    CHECK(ids[0] == 2 && ids[1] == 3 && ids[2] == 4, "sigmoid ids %d %d %d, want 2 3 4", ids[0],
          ids[1], ids[2]);
    CHECK(fabsf(weights[0] - 2.5f * .8f / 2.1f) < 1e-6f &&
              fabsf(weights[1] - 2.5f * .7f / 2.1f) < 1e-6f &&
              fabsf(weights[2] - 2.5f * .6f / 2.1f) < 1e-6f,
          "sigmoid weights %g %g %g, want .952381 .833333 .714286", weights[0], weights[1],
          weights[2]);
    CHECK(fabsf(probs[6] - 0.95f) < 1e-6f, "sigmoid keeps s, not s + bias: %g", probs[6]);
    v3.n_group = v3.topk_group = 1;
    ops->router_topk(ids, weights, probs, logits, 1, 8, 3, &v3);
    CHECK(ids[0] == 0 && ids[1] == 2 && ids[2] == 3, "sigmoid ungrouped ids %d %d %d, want 0 2 3",
          ids[0], ids[1], ids[2]);
    /* every corrected score negative (bias -2): the groups masked with -inf, not 0, so the
     * kept groups still win: ids 2 3 4, the same weights, unnormalised: s x 2.5 */
    for (int e = 0; e < 8; e++) bias[e] = -2.0f;
    v3 = (struct router_params){ROUTER_SIGMOID_BIAS, false, 2.5f, 4, 2, bias, NULL, 0};
    ops->router_topk(ids, weights, probs, logits, 1, 8, 3, &v3);
    CHECK(ids[0] == 2 && ids[1] == 3 && ids[2] == 4, "negative scores: ids %d %d %d, want 2 3 4",
          ids[0], ids[1], ids[2]);
    CHECK(fabsf(weights[0] - 2.0f) < 1e-6f && fabsf(weights[1] - 1.75f) < 1e-6f &&
              fabsf(weights[2] - 1.5f) < 1e-6f,
          "negative scores: weights %g %g %g, want 2 1.75 1.5", weights[0], weights[1], weights[2]);

    /* random logits and biases, grouped as the released configs (and smaller) */
    enum { N = 67 };
    float *random_bias = random_array(64, 0.3);
    for (int e = 0; e < 64; e++) random_bias[e] -= 0.4f; /* many corrected scores below 0 */
    struct {
        const char *what;
        int E, K;
        struct router_params rp;
    } cases[] = {
        {"softmax top-k renormalised x1", 16, 4, {ROUTER_SOFTMAX_TOPK, true, 1.0f, 1, 1, NULL, NULL, 0}},
        {"group_limited_greedy 8/3 x2.5", 64, 6, {ROUTER_GROUPED_GREEDY, false, 2.5f, 8, 3, NULL, NULL, 0}},
        {"group_limited_greedy 4/1 x1", 16, 3, {ROUTER_GROUPED_GREEDY, false, 1.0f, 4, 1, NULL, NULL, 0}},
        {"sigmoid bias 8/4 renormalised x2.5",
         64,
         8,
         {ROUTER_SIGMOID_BIAS, true, 2.5f, 8, 4, random_bias, NULL, 0}},
        {"sigmoid bias 8/4 plain x2.5",
         64,
         8,
         {ROUTER_SIGMOID_BIAS, false, 2.5f, 8, 4, random_bias, NULL, 0}},
        {"sigmoid bias 1/1 renormalised x1",
         64,
         8,
         {ROUTER_SIGMOID_BIAS, true, 1.0f, 1, 1, random_bias, NULL, 0}},
        {"sigmoid bias 32/1 (groups of 2) x1",
         64,
         2,
         {ROUTER_SIGMOID_BIAS, true, 1.0f, 32, 1, random_bias, NULL, 0}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        check_router_against_naive(ops, cases[c].what, N, cases[c].E, cases[c].K, &cases[c].rp);
    free(random_bias);
}

/* The same results with 1 and 3 threads, for the GEMM-based ops: wide (column blocks)
 * and narrow (row blocks) linears, attention, grouped experts. */
static void test_thread_independence(const struct backend *ops)
{
    const int shapes[3][3] = {{70, 19, 23}, {700, 33, 41}, {300, 16, 2500}};
    for (int s = 0; s < 3; s++) {
        int N = shapes[s][0], I = shapes[s][1], O = shapes[s][2];
        float *x = random_array((size_t)N * I, 1.0), *w = random_array((size_t)O * I, 0.3);
        float *y1 = xmalloc((size_t)N * O * sizeof(float)), *y3 = xmalloc((size_t)N * O * sizeof(float));
        omp_set_num_threads(1);
        ops->linear(y1, x, w, NULL, N, I, O, false);
        omp_set_num_threads(3);
        ops->linear(y3, x, w, NULL, N, I, O, false);
        CHECK(memcmp(y1, y3, (size_t)N * O * sizeof(float)) == 0,
              "linear %dx%dx%d differs between 1 and 3 threads", N, I, O);
        free(x), free(w), free(y1), free(y3);
    }
}

/* ---- gpt_oss: sliding windows, sinks, the clamped GLU, per-expert biases ----------------
 * The references are written from transformers 5.24: masking_utils' sliding window (query
 * i sees keys j with i - window < j <= i, with the causal mask), gpt_oss's
 * eager_attention_forward (the sink a softmax column of its own, in the row max, dropped
 * after the softmax) and GptOssExperts._apply_gate. */

static void test_attention_window_sinks_case(const struct backend *ops, int window, bool sinks)
{
    enum { N = 292, nH = 6, nKV = 2, Dh = 10 };
    const int lengths[4] = {150, 64, 1, 77};
    int32_t starts[N];
    for (int s = 0, at = 0; s < 4; at += lengths[s++])
        for (int i = 0; i < lengths[s]; i++) starts[at + i] = at;
    float *q = random_array((size_t)N * nH * Dh, 1.0), *k = random_array((size_t)N * nKV * Dh, 1.0);
    float *v = random_array((size_t)N * nKV * Dh, 1.0), *sink = random_array(nH, 2.0);
    sink[0] = 8.0f; /* above every score: the row max is the sink */
    float *out = xcalloc((size_t)N * nH * Dh, sizeof(float));
    double *ref = xcalloc((size_t)N * nH * Dh, sizeof(double));
    float scale = 1.0f / sqrtf((float)Dh);
    struct attention_mask mask = {.sample_start = starts, .window = window,
                                  .sinks = sinks ? sink : NULL};
    ops->attention(out, q, k, v, &mask, N, nH, nKV, Dh, Dh, scale);
    double p[N];
    for (int i = 0; i < N; i++)
        for (int h = 0; h < nH; h++) {
            int kv = h / (nH / nKV);
            double max = sinks ? sink[h] : -INFINITY, sum = 0;
            for (int j = starts[i]; j <= i; j++) {
                if (window && !(j - starts[i] > (i - starts[i]) - window)) continue;
                double s = 0;
                for (int d = 0; d < Dh; d++) s += (double)q[(i * nH + h) * Dh + d] * k[(j * nKV + kv) * Dh + d];
                p[j] = s * scale;
                max = fmax(max, p[j]);
            }
            for (int j = starts[i]; j <= i; j++)
                if (!window || j - starts[i] > (i - starts[i]) - window) sum += p[j] = exp(p[j] - max);
            if (sinks) sum += exp(sink[h] - max);
            for (int j = starts[i]; j <= i; j++)
                if (!window || j - starts[i] > (i - starts[i]) - window)
                    for (int d = 0; d < Dh; d++)
                        ref[(i * nH + h) * Dh + d] += p[j] / sum * v[(j * nKV + kv) * Dh + d];
        }
    double err = max_relative(out, ref, (size_t)N * nH * Dh);
    CHECK(err < 1e-5, "attention window %d sinks %d: relative error %.3g", window, sinks, err);
    printf("attention (packed 150+64+1+77, heads 6/2, window %d%s): max relative error %.2e\n",
           window, sinks ? ", sinks" : "", err);
    /* a window as wide as the longest sample changes nothing, bit for bit */
    if (window >= 150 && !sinks) {
        float *plain = xmalloc((size_t)N * nH * Dh * sizeof(float));
        struct attention_mask none = {.sample_start = starts};
        ops->attention(plain, q, k, v, &none, N, nH, nKV, Dh, Dh, scale);
        CHECK(memcmp(plain, out, (size_t)N * nH * Dh * sizeof(float)) == 0,
              "attention with window %d differs from none", window);
        free(plain);
    }
    free(q), free(k), free(v), free(sink), free(out), free(ref);
}

static void test_attention_window_sinks(const struct backend *ops)
{
    const int windows[6] = {0, 1, 7, 64, 100, 150};
    for (int w = 0; w < 6; w++)
        for (int sinks = 0; sinks < 2; sinks++)
            if (windows[w] || sinks) test_attention_window_sinks_case(ops, windows[w], sinks);
    test_attention_window_sinks_case(ops, 1000, false);
}

static void test_glu_clamped(const struct backend *ops)
{
    enum { count = 1001 };
    const float alpha = 1.702f, limit = 7.0f;
    float *gate = random_array(count, 8.0), *up = random_array(count, 8.0);
    float *h = xmalloc(count * sizeof(float));
    gate[0] = limit, up[1] = limit, up[2] = -limit;
    ops->glu_clamped(h, gate, up, count, alpha, limit);
    double err = 0;
    int clamped = 0;
    for (int i = 0; i < count; i++) {
        double g = fmin(gate[i], limit), u = fmax(fmin(up[i], limit), -limit);
        double want = (u + 1) * g / (1 + exp(-alpha * g));
        err = fmax(err, fabs(h[i] - want) / fmax(fabs(want), 1.0));
        clamped += gate[i] > limit || fabsf(up[i]) > limit;
    }
    CHECK(err < 1e-6, "glu_clamped: relative error %.3g", err);
    CHECK(clamped > 100, "glu_clamped: only %d inputs past a clamp", clamped);
    printf("glu_clamped (%d of %d elements clamped): max relative error %.2e\n", clamped, count,
           err);
    free(gate), free(up), free(h);
}

static void test_grouped_bias(const struct backend *ops)
{
    enum { E = 5, O = 29 };
    const int32_t offsets[E + 1] = {0, 0, 130, 131, 195, 395};
    int M = offsets[E];
    float *y = random_array((size_t)M * O, 1.0), *bias = random_array((size_t)E * O, 1.0);
    float *before = xmalloc((size_t)M * O * sizeof(float));
    memcpy(before, y, (size_t)M * O * sizeof(float));
    ops->grouped_bias(y, bias, offsets, E, O);
    int wrong = 0;
    for (int e = 0; e < E; e++)
        for (int r = offsets[e]; r < offsets[e + 1]; r++)
            for (int o = 0; o < O; o++) wrong += y[r * O + o] != before[r * O + o] + bias[e * O + o];
    CHECK(wrong == 0, "grouped_bias: %d elements wrong", wrong);
    free(y), free(bias), free(before);
}

/* ---- bf16 weights (backend.h's weight_bf16) ------------------------------------------ */

/* y[N, O] = x[N, I] @ w[O, I]^T in double, for the rows [first, first + N) of x. */
static void reference_linear(double *y, const float *x, const float *w, int N, int I, int O)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) {
            double s = 0;
            for (int i = 0; i < I; i++) s += (double)x[(size_t)n * I + i] * w[(size_t)o * I + i];
            y[(size_t)n * O + o] = s;
        }
}

/* The GEMM ops with weights held as bf16: the same products as the fp32 ops on the weights
 * widened back to fp32 (a double reference, 1e-5), over weights wider than one widened
 * block (the CPU backend widens 2^20 values at a time: I 3000 gives blocks of 349 rows),
 * the same bits on 1 and 3 threads; bf16 experts beside fp32 ones in the grouped GEMMs. */
static void test_bf16_weights(const struct backend *ops)
{
    enum { N = 70, I = 3000, O = 1000, E = 4, EO = 700 };
    size_t wn = (size_t)O * I;
    float *x = random_array((size_t)N * I, 1.0), *w32 = random_array(wn, 0.05);
    float *dy = random_array((size_t)N * O, 1.0), *dx0 = random_array((size_t)N * I, 1.0);
    uint16_t *w16 = xmalloc(wn * sizeof(uint16_t));
    float *wide = xmalloc(wn * sizeof(float));
    st_f32_to_bf16_array(w32, w16, wn);
    for (size_t i = 0; i < wn; i++) wide[i] = st_bf16_to_f32(w16[i]);
    const float *w = weight_bf16(w16);
    CHECK(weight_is_bf16(w) && !weight_is_bf16(w32) && weight_bf16_data(w) == w16,
          "weight_bf16: the tag does not round-trip");
    CHECK(weight_bf16_data(weight_offset(w, 5)) == w16 + 5 && weight_offset(w32, 5) == w32 + 5,
          "weight_offset: the wrong element");

    double *ref = xcalloc((size_t)N * I, sizeof(double)); /* the larger of N*O and N*I */
    float *y[2], *dx[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        y[pass] = xcalloc((size_t)N * O, sizeof(float));
        ops->linear(y[pass], x, w, NULL, N, I, O, false);
        dx[pass] = xmalloc((size_t)N * I * sizeof(float));
        memcpy(dx[pass], dx0, (size_t)N * I * sizeof(float));
        ops->linear_backward(dx[pass], NULL, NULL, dy, x, w, N, I, O, true);
    }
    omp_set_num_threads(1);
    CHECK(memcmp(y[0], y[1], (size_t)N * O * sizeof(float)) == 0,
          "bf16 linear: 1 and 3 threads differ");
    CHECK(memcmp(dx[0], dx[1], (size_t)N * I * sizeof(float)) == 0,
          "bf16 linear_backward: 1 and 3 threads differ");
    reference_linear(ref, x, wide, N, I, O);
    double err = max_relative(y[0], ref, (size_t)N * O);
    CHECK(err < 1e-5, "bf16 linear: relative error %.3g against the widened weights", err);
    for (int n = 0; n < N; n++) /* dx = dx0 + dy @ wide */
        for (int i = 0; i < I; i++) {
            double s = dx0[(size_t)n * I + i];
            for (int o = 0; o < O; o++)
                s += (double)dy[(size_t)n * O + o] * wide[(size_t)o * I + i];
            ref[(size_t)n * I + i] = s;
        }
    err = max_relative(dx[0], ref, (size_t)N * I);
    CHECK(err < 1e-5, "bf16 linear_backward: relative error %.3g against the widened weights", err);

    /* grouped: experts 0 and 2 bf16 (frozen), 1 and 3 fp32 (trained), expert 2 idle */
    const int32_t offsets[E + 1] = {0, 25, 45, 45, N};
    size_t en = (size_t)E * EO * I;
    float *e32 = random_array(en, 0.05), *ewide = xmalloc(en * sizeof(float));
    uint16_t *e16 = xmalloc(en * sizeof(uint16_t));
    st_f32_to_bf16_array(e32, e16, en);
    for (size_t i = 0; i < en; i++) ewide[i] = st_bf16_to_f32(e16[i]);
    const float *experts[E];
    float *dw_buffer = xcalloc(en, sizeof(float)), *dw[E];
    for (int e = 0; e < E; e++) {
        size_t at = (size_t)e * EO * I;
        experts[e] = e % 2 ? e32 + at : weight_offset(weight_bf16(e16), at);
        dw[e] = e % 2 ? dw_buffer + at : NULL;
    }
    float *gy = xcalloc((size_t)N * EO, sizeof(float));
    float *gdx = xcalloc((size_t)N * I, sizeof(float));
    ops->grouped_linear(gy, x, experts, offsets, E, I, EO);
    float *gdy = random_array((size_t)N * EO, 1.0);
    ops->grouped_linear_backward(gdx, dw, gdy, x, experts, offsets, E, I, EO);
    double worst = 0, worst_dx = 0, worst_dw = 0;
    for (int e = 0; e < E; e++) {
        int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        const float *we = (e % 2 ? e32 : ewide) + (size_t)e * EO * I;
        reference_linear(ref, x + (size_t)offsets[e] * I, we, rows, I, EO);
        worst = fmax(worst, max_relative(gy + (size_t)offsets[e] * EO, ref, (size_t)rows * EO));
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < I; i++) {
                double s = 0;
                for (int o = 0; o < EO; o++)
                    s += (double)gdy[(size_t)(offsets[e] + r) * EO + o] * we[(size_t)o * I + i];
                ref[(size_t)r * I + i] = s;
            }
        worst_dx =
            fmax(worst_dx, max_relative(gdx + (size_t)offsets[e] * I, ref, (size_t)rows * I));
        if (!dw[e]) continue;
        double *dw_ref = xcalloc((size_t)EO * I, sizeof(double));
        for (int r = offsets[e]; r < offsets[e + 1]; r++) /* dw += dy_e^T x_e */
            for (int o = 0; o < EO; o++)
                for (int i = 0; i < I; i++)
                    dw_ref[(size_t)o * I + i] +=
                        (double)gdy[(size_t)r * EO + o] * x[(size_t)r * I + i];
        worst_dw = fmax(worst_dw, max_relative(dw[e], dw_ref, (size_t)EO * I));
        free(dw_ref);
    }
    CHECK(worst < 1e-5, "bf16 grouped_linear: relative error %.3g", worst);
    CHECK(worst_dx < 1e-5, "bf16 grouped_linear_backward: dx relative error %.3g", worst_dx);
    CHECK(worst_dw < 1e-5, "bf16 grouped_linear_backward: an fp32 expert's dw relative error %.3g",
          worst_dw);
    for (int pass = 0; pass < 2; pass++) free(y[pass]), free(dx[pass]);
    free(x), free(w32), free(dy), free(dx0), free(w16), free(wide), free(ref), free(dw_buffer);
    free(gy), free(gdx), free(gdy), free(e32), free(ewide), free(e16);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    rng_seed(&rng, 2026);
    const struct backend *ops = backend_cpu();
    test_attention(ops);
    test_copy_columns(ops);
    test_grouped_linear(ops);
    test_linear(ops);
    test_cross_entropy(ops);
    test_cross_entropy_vocabulary(ops);
    test_cross_entropy_chunks(ops);
    test_router(ops);
    test_grouped_routers(ops);
    test_thread_independence(ops);
    test_attention_window_sinks(ops);
    test_glu_clamped(ops);
    test_grouped_bias(ops);
    test_bf16_weights(ops);
    int status = check_done("test_cpu_ops");
    MPI_Finalize();
    return status;
}
