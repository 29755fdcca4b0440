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
    ops->grouped_linear(y, x, w, offsets, E, I, O);
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

static void test_router(const struct backend *ops)
{
    /* hand-worked: logits ln(1), ln(2), ln(3), ln(4) -> probabilities .1 .2 .3 .4; top-2
     * ids 3, 2; weights .4 .3, renormalised .571428.. .428571..; a tie goes to the lower id */
    float logits[8] = {0.0f, logf(2), logf(3), logf(4), 1.0f, 1.0f, 0.0f, 0.0f};
    int32_t ids[4];
    float weights[4], probs[8];
    ops->router_topk(ids, weights, probs, logits, 2, 4, 2, ROUTER_SOFTMAX_TOPK, false, 1.0f);
    CHECK(ids[0] == 3 && ids[1] == 2, "top-2 ids %d %d, expected 3 2", ids[0], ids[1]);
    CHECK(fabsf(weights[0] - 0.4f) < 1e-6f && fabsf(weights[1] - 0.3f) < 1e-6f, "weights %g %g",
          weights[0], weights[1]);
    CHECK(ids[2] == 0 && ids[3] == 1, "tie: ids %d %d, expected 0 1", ids[2], ids[3]);
    ops->router_topk(ids, weights, NULL, logits, 1, 4, 2, ROUTER_SOFTMAX_TOPK, true, 1.0f);
    CHECK(fabsf(weights[0] - 4.0f / 7) < 1e-6f && fabsf(weights[1] - 3.0f / 7) < 1e-6f,
          "renormalised %g %g", weights[0], weights[1]);
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
    test_router(ops);
    test_thread_independence(ops);
    int status = check_done("test_cpu_ops");
    MPI_Finalize();
    return status;
}
