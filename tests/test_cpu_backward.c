/* test_cpu_backward: every backward op of the CPU backend against central finite
 * differences of L = sum(g * forward(inputs)) for a random upstream gradient g, the
 * forward re-implemented naively in double precision here (differences of the fp32
 * forward would be too noisy). Per op it also checks: weight gradients are added to what
 * their buffers hold, a NULL weight-gradient buffer (frozen weight) is accepted and changes
 * nothing else, accumulate_dx adds, written outputs leave nothing of the buffer's old
 * contents, and results are bitwise the same on 1 and on 3 OpenMP threads. Sizes are odd
 * and cross the backend's blocks: packed samples of 70, 1 and 33 tokens with GQA, experts
 * holding 0, 70, 1 and 130 rows, more rows than one partial-sum chunk. */
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "log.h"
#include "rng.h"

static struct rng rng;

/* what a backward's analytic gradient may differ from the differences by, relatively */
#define TOLERANCE 1e-4

static float *random_array(size_t n, double scale)
{
    float *x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = (float)(scale * rng_normal(&rng));
    return x;
}

static float *filled(size_t n, float value)
{
    float *x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = value;
    return x;
}

static float *copy_of(const float *x, size_t n)
{
    float *y = xmalloc(n * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}

static double *to_double(const float *x, size_t n)
{
    double *y = xmalloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

/* The loss of a test, recomputed after entry `index` of tensor `tensor` was perturbed; it
 * may sum only the terms that entry reaches (the others cancel in the difference). */
typedef double (*loss_fn)(int tensor, size_t index);

/* max |analytic - fd| / max |fd| over the n entries of param, analytic taken minus base
 * (what the buffer held before the op added to it; NULL: nothing) */
static double fd_error(loss_fn loss, int tensor, double *param, size_t n, const float *analytic,
                       const float *base)
{
    double diff = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        double saved = param[i], h = 1e-4 * fmax(1.0, fabs(saved));
        param[i] = saved + h;
        double up = loss(tensor, i);
        param[i] = saved - h;
        double down = loss(tensor, i);
        param[i] = saved;
        double fd = (up - down) / (2 * h);
        double a = (double)analytic[i] - (base ? (double)base[i] : 0.0);
        diff = fmax(diff, fabs(a - fd));
        scale = fmax(scale, fabs(fd));
    }
    return diff / (scale > 0 ? scale : 1);
}

static void report(const char *op, const char *tensor, double err)
{
    printf("%-28s %-8s max relative error %.2e\n", op, tensor, err);
    CHECK(err < TOLERANCE, "%s: %s: relative error %.3g against finite differences", op, tensor,
          err);
}

static void check_same(const char *op, const char *what, const void *a, const void *b, size_t bytes)
{
    CHECK(memcmp(a, b, bytes) == 0, "%s: %s differs", op, what);
}

static void check_threads(const char *op, const char *tensor, const float *one, const float *three,
                          size_t n)
{
    CHECK(memcmp(one, three, n * sizeof(float)) == 0, "%s: %s differs between 1 and 3 threads", op,
          tensor);
}

/* ---- linear ---------------------------------------------------------------------------- */

static struct {
    int N, I, O;
    double *x, *w, *b, *g;
} lin;

static double linear_loss(int tensor, size_t index)
{
    int n0 = 0, n1 = lin.N, o0 = 0, o1 = lin.O;
    if (tensor == 0)
        n0 = (int)(index / lin.I), n1 = n0 + 1; /* x: one row */
    else if (tensor == 1)
        o0 = (int)(index / lin.I), o1 = o0 + 1; /* w: one output */
    else
        o0 = (int)index, o1 = o0 + 1; /* bias: one output */
    double loss = 0;
    for (int n = n0; n < n1; n++)
        for (int o = o0; o < o1; o++) {
            double y = lin.b[o];
            for (int i = 0; i < lin.I; i++) y += lin.x[n * lin.I + i] * lin.w[o * lin.I + i];
            loss += lin.g[n * lin.O + o] * y;
        }
    return loss;
}

/* dx and dw bitwise the same on 1 and 3 threads, on shapes where OpenBLAS gives different
 * bits to calls split per thread (caught a per-thread split over O = 23) */
static void linear_threads(const struct backend *ops, int N, int I, int O)
{
    float *x = random_array((size_t)N * I, 1.0), *w = random_array((size_t)O * I, 0.5);
    float *g = random_array((size_t)N * O, 1.0), *dx[2], *dw[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = filled((size_t)N * I, 7.0f), dw[pass] = filled((size_t)O * I, 0.5f);
        ops->linear_backward(dx[pass], dw[pass], NULL, g, x, w, N, I, O, false);
    }
    char op[64];
    snprintf(op, sizeof op, "linear_backward %dx%dx%d", N, I, O);
    check_threads(op, "dx", dx[0], dx[1], (size_t)N * I);
    check_threads(op, "dw", dw[0], dw[1], (size_t)O * I);
    free(x), free(w), free(g), free(dx[0]), free(dx[1]), free(dw[0]), free(dw[1]);
}

static void test_linear(const struct backend *ops)
{
    linear_threads(ops, 70, 19, 23);
    linear_threads(ops, 131, 37, 23);
    linear_threads(ops, 1000, 256, 300);

    enum { N = 70, I = 19, O = 71 }; /* two blocks of rows and of outputs in the backward */
    const char *op = "linear_backward";
    float *x = random_array(N * I, 1.0), *w = random_array(O * I, 0.5);
    float *b = random_array(O, 1.0), *g = random_array(N * O, 1.0);
    float *dx[2], *dw[2], *db[2];
    float *dw_base = random_array(O * I, 1.0), *db_base = random_array(O, 1.0);
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = filled(N * I, 7.0f);
        dw[pass] = copy_of(dw_base, O * I), db[pass] = copy_of(db_base, O);
        ops->linear_backward(dx[pass], dw[pass], db[pass], g, x, w, N, I, O, false);
    }
    check_threads(op, "dx", dx[0], dx[1], N * I);
    check_threads(op, "dw", dw[0], dw[1], O * I);
    check_threads(op, "dbias", db[0], db[1], O);
    lin.N = N, lin.I = I, lin.O = O;
    lin.x = to_double(x, N * I), lin.w = to_double(w, O * I), lin.b = to_double(b, O);
    lin.g = to_double(g, N * O);
    report(op, "dx", fd_error(linear_loss, 0, lin.x, N * I, dx[0], NULL));
    report(op, "dw", fd_error(linear_loss, 1, lin.w, O * I, dw[0], dw_base));
    report(op, "dbias", fd_error(linear_loss, 2, lin.b, O, db[0], db_base));

    /* frozen weight and bias: dx unchanged; no dx: the weight gradients unchanged */
    float *dx2 = filled(N * I, -3.0f), *dw2 = copy_of(dw_base, O * I), *db2 = copy_of(db_base, O);
    ops->linear_backward(dx2, NULL, NULL, g, x, w, N, I, O, false);
    check_same(op, "dx with frozen w and bias", dx2, dx[0], N * I * sizeof(float));
    ops->linear_backward(NULL, dw2, db2, g, x, w, N, I, O, false);
    check_same(op, "dw without dx", dw2, dw[0], O * I * sizeof(float));
    check_same(op, "dbias without dx", db2, db[0], O * sizeof(float));
    /* accumulate_dx adds */
    float *dx_base = random_array(N * I, 1.0), *dx3 = copy_of(dx_base, N * I);
    ops->linear_backward(dx3, NULL, NULL, g, x, w, N, I, O, true);
    report(op, "dx (+=)", fd_error(linear_loss, 0, lin.x, N * I, dx3, dx_base));

    for (int pass = 0; pass < 2; pass++) free(dx[pass]), free(dw[pass]), free(db[pass]);
    free(x), free(w), free(b), free(g), free(dw_base), free(db_base), free(dx2), free(dw2);
    free(db2), free(dx_base), free(dx3);
    free(lin.x), free(lin.w), free(lin.b), free(lin.g);
}

/* ---- rmsnorm --------------------------------------------------------------------------- */

static struct {
    int R, D;
    double eps, *x, *w, *g;
} rms;

static double rmsnorm_loss(int tensor, size_t index)
{
    int r0 = 0, r1 = rms.R;
    if (tensor == 0) r0 = (int)(index / rms.D), r1 = r0 + 1;
    double loss = 0;
    for (int r = r0; r < r1; r++) {
        const double *xr = rms.x + (size_t)r * rms.D;
        double sum = 0;
        for (int d = 0; d < rms.D; d++) sum += xr[d] * xr[d];
        double inv = 1 / sqrt(sum / rms.D + rms.eps);
        for (int d = 0; d < rms.D; d++)
            loss += rms.g[(size_t)r * rms.D + d] * rms.w[d] * xr[d] * inv;
    }
    return loss;
}

static void test_rmsnorm_case(const struct backend *ops, const char *op, int R, int D)
{
    float eps = 1e-6f;
    float *x = random_array((size_t)R * D, 1.5), *w = random_array(D, 0.3);
    for (int d = 0; d < D; d++) w[d] += 1.0f;
    float *g = random_array((size_t)R * D, 1.0), *y = xmalloc((size_t)R * D * sizeof(float));
    float *rstd = xmalloc((size_t)R * sizeof(float));
    ops->rmsnorm(y, rstd, x, w, R, D, eps);
    float *dw_base = random_array(D, 1.0), *dx[2], *dw[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = filled((size_t)R * D, 7.0f), dw[pass] = copy_of(dw_base, D);
        ops->rmsnorm_backward(dx[pass], dw[pass], g, x, w, rstd, R, D, false);
    }
    check_threads(op, "dx", dx[0], dx[1], (size_t)R * D);
    check_threads(op, "dw", dw[0], dw[1], D);
    rms.R = R, rms.D = D, rms.eps = eps;
    rms.x = to_double(x, (size_t)R * D), rms.w = to_double(w, D),
    rms.g = to_double(g, (size_t)R * D);
    report(op, "dx", fd_error(rmsnorm_loss, 0, rms.x, (size_t)R * D, dx[0], NULL));
    report(op, "dw", fd_error(rmsnorm_loss, 1, rms.w, D, dw[0], dw_base));

    /* frozen weight; dx aliasing dy; accumulate_dx */
    float *dx2 = filled((size_t)R * D, -3.0f), *inplace = copy_of(g, (size_t)R * D);
    ops->rmsnorm_backward(dx2, NULL, g, x, w, rstd, R, D, false);
    check_same(op, "dx with frozen w", dx2, dx[0], (size_t)R * D * sizeof(float));
    ops->rmsnorm_backward(inplace, NULL, inplace, x, w, rstd, R, D, false);
    check_same(op, "dx written over dy", inplace, dx[0], (size_t)R * D * sizeof(float));
    float *dx_base = random_array((size_t)R * D, 1.0), *dx3 = copy_of(dx_base, (size_t)R * D);
    ops->rmsnorm_backward(dx3, NULL, g, x, w, rstd, R, D, true);
    report(op, "dx (+=)", fd_error(rmsnorm_loss, 0, rms.x, (size_t)R * D, dx3, dx_base));

    for (int pass = 0; pass < 2; pass++) free(dx[pass]), free(dw[pass]);
    free(x), free(w), free(g), free(y), free(rstd), free(dw_base), free(dx2), free(inplace);
    free(dx_base), free(dx3), free(rms.x), free(rms.w), free(rms.g);
}

static void test_rmsnorm(const struct backend *ops)
{
    test_rmsnorm_case(ops, "rmsnorm_backward D 36", 300, 36);        /* > one 256-row chunk */
    test_rmsnorm_case(ops, "rmsnorm_backward per-head", 29 * 4, 10); /* 29 tokens x 4 heads */
}

/* ---- rope ------------------------------------------------------------------------------ */

/* Heads of stride Dh whose rotary dims are [offset, offset + rotary): the op is called on
 * x + offset with stride Dh (MLA's q_pe inside each query head). Pairs per layout. */
static struct {
    int N, heads, Dh, rotary, offset;
    enum hf_rope_layout layout;
    double scaling, *x, *g;
    const int32_t *positions;
    const float *inv_freq;
} rp;

static double rope_loss(int tensor, size_t index)
{
    (void)tensor;
    int n = (int)(index / ((size_t)rp.heads * rp.Dh)), h = (int)(index / rp.Dh % rp.heads);
    int half = rp.rotary / 2;
    const double *x = rp.x + ((size_t)n * rp.heads + h) * rp.Dh;
    const double *g = rp.g + ((size_t)n * rp.heads + h) * rp.Dh;
    double loss = 0;
    for (int d = 0; d < rp.Dh; d++) /* the dims outside the rotary block pass through */
        if (d < rp.offset || d >= rp.offset + rp.rotary) loss += g[d] * x[d];
    for (int i = 0; i < half; i++) {
        /* the angle in fp32 as the forward forms it, the rest in double */
        float angle = (float)rp.positions[n] * rp.inv_freq[i];
        double c = cos((double)angle) * rp.scaling, s = sin((double)angle) * rp.scaling;
        int a = rp.offset + (rp.layout == ROPE_INTERLEAVED ? 2 * i : i);
        int b = rp.offset + (rp.layout == ROPE_INTERLEAVED ? 2 * i + 1 : i + half);
        loss += g[a] * (x[a] * c - x[b] * s) + g[b] * (x[b] * c + x[a] * s);
    }
    return loss;
}

static void test_rope_case(const struct backend *ops, const char *op, int rotary, int offset,
                           enum hf_rope_layout layout, float scaling)
{
    enum { N = 13, heads = 3, Dh = 10 };
    size_t count = (size_t)N * heads * Dh;
    int32_t positions[N];
    for (int n = 0; n < N; n++) positions[n] = (int32_t)rng_below(&rng, 2000);
    float inv_freq[Dh / 2];
    for (int i = 0; i < rotary / 2; i++) inv_freq[i] = (float)pow(10000.0, -2.0 * i / rotary);
    float *x = random_array(count, 1.0), *g = random_array(count, 1.0), *dx[2];
    /* the forward against the same naive rotation: L(x) is linear in x, so the forward's
     * output dotted with g is L at x */
    float *y = copy_of(x, count);
    ops->rope(y + offset, positions, inv_freq, scaling, N, heads, Dh, rotary, layout);
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = copy_of(g, count);
        ops->rope_backward(dx[pass] + offset, positions, inv_freq, scaling, N, heads, Dh, rotary,
                           layout);
    }
    check_threads(op, "dx", dx[0], dx[1], count);
    rp.N = N, rp.heads = heads, rp.Dh = Dh, rp.rotary = rotary, rp.scaling = scaling;
    rp.offset = offset, rp.layout = layout;
    rp.positions = positions, rp.inv_freq = inv_freq;
    rp.x = to_double(x, count), rp.g = to_double(g, count);
    report(op, "dx", fd_error(rope_loss, 0, rp.x, count, dx[0], NULL));
    /* forward: per (token, head), <g, rope(x)> against the naive loss */
    double worst = 0, scale = 0;
    for (size_t row = 0; row < (size_t)N * heads; row++) {
        double got = 0;
        for (int d = 0; d < Dh; d++) got += rp.g[row * Dh + d] * (double)y[row * Dh + d];
        double want = rope_loss(0, row * Dh);
        worst = fmax(worst, fabs(got - want)), scale = fmax(scale, fabs(want));
    }
    report(op, "forward", worst / (scale > 0 ? scale : 1));
    free(x), free(g), free(y), free(dx[0]), free(dx[1]), free(rp.x), free(rp.g);
}

static void test_rope(const struct backend *ops)
{
    test_rope_case(ops, "rope_backward full", 10, 0, ROPE_ROTATE_HALF, 1.0f);
    test_rope_case(ops, "rope_backward rotary 6/10", 6, 0, ROPE_ROTATE_HALF, 1.3f);
    test_rope_case(ops, "rope_backward interleaved", 10, 0, ROPE_INTERLEAVED, 1.2f);
    /* MLA's q_pe: the last 4 dims of each 10-wide head, both layouts */
    test_rope_case(ops, "rope_backward interleaved last 4/10", 4, 6, ROPE_INTERLEAVED, 1.1f);
    test_rope_case(ops, "rope_backward rotate-half last 4/10", 4, 6, ROPE_ROTATE_HALF, 0.9f);
}

/* ---- attention ------------------------------------------------------------------------- */

/* q, k [., Dh] per head; v, out [., Dv] per head (MLA: Dv != Dh); gpt_oss's sliding
 * window (0: none) and per-head sinks (NULL: none) */
static struct {
    int N, nH, nKV, Dh, Dv, window;
    double scale, *q, *k, *v, *g, *sinks;
    const int32_t *starts;
} att;

/* sum over queries i of [i0, i1) and query heads [h0, h1) of <g_i, out_i>; written from
 * transformers' masks (query i sees keys j of its sample with i - window < j <= i) and
 * gpt_oss's eager_attention_forward (the sink a softmax column of its own, dropped) */
static double attention_loss_region(int i0, int i1, int h0, int h1)
{
    int group = att.nH / att.nKV, Dh = att.Dh, Dv = att.Dv;
    double *p = xmalloc((size_t)att.N * sizeof(double)), loss = 0;
    for (int i = i0; i < i1; i++)
        for (int h = h0; h < h1; h++) {
            int kv = h / group;
            const double *qi = att.q + ((size_t)i * att.nH + h) * Dh;
            double max = att.sinks ? att.sinks[h] : -INFINITY, sum = 0;
            int first = att.starts[i];
            if (att.window && i - att.window + 1 > first) first = i - att.window + 1;
            for (int j = first; j <= i; j++) {
                double s = 0;
                for (int d = 0; d < Dh; d++)
                    s += qi[d] * att.k[((size_t)j * att.nKV + kv) * Dh + d];
                p[j] = s * att.scale;
                max = fmax(max, p[j]);
            }
            for (int j = first; j <= i; j++) sum += p[j] = exp(p[j] - max);
            if (att.sinks) sum += exp(att.sinks[h] - max);
            const double *gi = att.g + ((size_t)i * att.nH + h) * Dv;
            for (int j = first; j <= i; j++)
                for (int d = 0; d < Dv; d++)
                    loss += gi[d] * p[j] / sum * att.v[((size_t)j * att.nKV + kv) * Dv + d];
        }
    free(p);
    return loss;
}

static double attention_loss(int tensor, size_t index)
{
    if (tensor == 3) return attention_loss_region(0, att.N, (int)index, (int)index + 1); /* a sink */
    int group = att.nH / att.nKV;
    if (tensor == 0) { /* q of one token and head: that query only */
        int i = (int)(index / ((size_t)att.nH * att.Dh)), h = (int)(index / att.Dh % att.nH);
        return attention_loss_region(i, i + 1, h, h + 1);
    }
    /* k or v of token j, KV head c: the later queries of j's sample, c's query heads */
    int width = tensor == 1 ? att.Dh : att.Dv;
    int j = (int)(index / ((size_t)att.nKV * width)), c = (int)(index / width % att.nKV);
    int end = j + 1;
    while (end < att.N && att.starts[end] == att.starts[j]) end++;
    return attention_loss_region(j, end, c * group, (c + 1) * group);
}

/* window 0: none; sinks: gpt_oss's per-head sink logits, with their gradient. The samples:
 * 70, 1 and 33 tokens, or with long_sample, one of 200 before them (key tiles of 128: its
 * last query blocks read two) */
static void test_attention_long_case(const struct backend *ops, const char *op, int nH, int nKV,
                                     int Dh, int Dv, int window, bool sinks, bool long_sample)
{
    const int lengths[4] = {200, 70, 1, 33};
    const int *sample = long_sample ? lengths : lengths + 1, n_samples = long_sample ? 4 : 3;
    int N = 0;
    for (int s = 0; s < n_samples; s++) N += sample[s];
    int32_t *starts = xmalloc((size_t)N * sizeof(int32_t));
    for (int s = 0, at = 0; s < n_samples; at += sample[s++])
        for (int i = 0; i < sample[s]; i++) starts[at + i] = at;
    size_t nq = (size_t)N * nH * Dh, nk = (size_t)N * nKV * Dh, nv = (size_t)N * nKV * Dv;
    size_t nout = (size_t)N * nH * Dv;
    float *q = random_array(nq, 1.0), *k = random_array(nk, 1.0), *v = random_array(nv, 1.0);
    float *g = random_array(nout, 1.0), *out = xmalloc(nout * sizeof(float));
    float scale = 1.0f / sqrtf((float)Dh);
    /* sinks around the scores' size, one far above them (its row max is the sink) */
    float *sink = sinks ? random_array((size_t)nH, 1.5) : NULL;
    if (sink) sink[nH - 1] = 6.0f;
    struct attention_mask mask = {.sample_start = starts, .window = window, .sinks = sink};
    ops->attention(out, q, k, v, &mask, N, nH, nKV, Dh, Dv, scale);
    float *dq[2], *dk[2], *dv[2], *dsink[2] = {NULL, NULL};
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dq[pass] = filled(nq, 7.0f), dk[pass] = filled(nk, 7.0f), dv[pass] = filled(nv, 7.0f);
        mask.dsinks = sinks ? dsink[pass] = filled((size_t)nH, 7.0f) : NULL; /* added to */
        ops->attention_backward(dq[pass], dk[pass], dv[pass], g, q, k, v, out, &mask, N, nH, nKV,
                                Dh, Dv, scale);
    }
    check_threads(op, "dq", dq[0], dq[1], nq);
    check_threads(op, "dk", dk[0], dk[1], nk);
    check_threads(op, "dv", dv[0], dv[1], nv);
    if (sinks) check_threads(op, "dsinks", dsink[0], dsink[1], (size_t)nH);
    /* the log-sum-exp kept by the forward (mask.lse) gives the bits of the backward that
     * recomputes it, and the forward's output does not change for keeping it */
    {
        float *lse = filled((size_t)nH * N, 7.0f), *out_kept = xmalloc(nout * sizeof(float));
        float *dq_kept = filled(nq, 7.0f), *dk_kept = filled(nk, 7.0f), *dv_kept = filled(nv, 7.0f);
        float *dsink_kept = sinks ? filled((size_t)nH, 7.0f) : NULL;
        struct attention_mask kept = mask;
        kept.lse = lse, kept.dsinks = dsink_kept;
        ops->attention(out_kept, q, k, v, &kept, N, nH, nKV, Dh, Dv, scale);
        ops->attention_backward(dq_kept, dk_kept, dv_kept, g, q, k, v, out, &kept, N, nH, nKV, Dh,
                                Dv, scale);
        check_same(op, "out with lse", out, out_kept, nout * sizeof(float));
        check_same(op, "dq with lse", dq[0], dq_kept, nq * sizeof(float));
        check_same(op, "dk with lse", dk[0], dk_kept, nk * sizeof(float));
        check_same(op, "dv with lse", dv[0], dv_kept, nv * sizeof(float));
        if (sinks) check_same(op, "dsinks with lse", dsink[0], dsink_kept, (size_t)nH * sizeof(float));
        free(lse), free(out_kept), free(dq_kept), free(dk_kept), free(dv_kept), free(dsink_kept);
    }
    att.N = N, att.nH = nH, att.nKV = nKV, att.Dh = Dh, att.Dv = Dv, att.scale = scale;
    att.starts = starts, att.window = window;
    att.q = to_double(q, nq), att.k = to_double(k, nk), att.v = to_double(v, nv);
    att.g = to_double(g, nout), att.sinks = sinks ? to_double(sink, (size_t)nH) : NULL;
    report(op, "dq", fd_error(attention_loss, 0, att.q, nq, dq[0], NULL));
    report(op, "dk", fd_error(attention_loss, 1, att.k, nk, dk[0], NULL));
    report(op, "dv", fd_error(attention_loss, 2, att.v, nv, dv[0], NULL));
    if (sinks) {
        float *base = filled((size_t)nH, 7.0f);
        report(op, "dsinks", fd_error(attention_loss, 3, att.sinks, (size_t)nH, dsink[0], base));
        free(base);
    }
    for (int pass = 0; pass < 2; pass++)
        free(dq[pass]), free(dk[pass]), free(dv[pass]), free(dsink[pass]);
    free(q), free(k), free(v), free(g), free(out), free(sink), free(starts);
    free(att.q), free(att.k), free(att.v), free(att.g), free(att.sinks);
    att.window = 0, att.sinks = NULL;
}

static void test_attention_case(const struct backend *ops, const char *op, int nH, int nKV, int Dh,
                                int Dv, int window, bool sinks)
{
    test_attention_long_case(ops, op, nH, nKV, Dh, Dv, window, sinks, false);
}

static void test_attention(const struct backend *ops)
{
    test_attention_case(ops, "attention_backward", 6, 2, 10, 10, 0, false);
    /* MLA's shape: as many KV heads as query heads, values narrower than the keys */
    test_attention_case(ops, "attention_backward Dv 6 != Dh 10", 3, 3, 10, 6, 0, false);
    /* a sample longer than two key tiles: the online softmax over tiles, dQ summed over them */
    test_attention_long_case(ops, "attention_backward 200 tokens", 2, 1, 4, 3, 0, false, true);
    test_attention_long_case(ops, "attention_backward 200, w 150+sinks", 2, 1, 4, 3, 150, true,
                             true);
}

/* gpt_oss: sliding windows (1: a token sees itself only; 5 and 20: bands that start past
 * key 0 in the second 64-query block of the 70-token sample; 67: a band wider than a
 * query block; 200: wider than every sample) and sinks, alone and together; GQA */
static void test_attention_gpt_oss(const struct backend *ops)
{
    const int windows[5] = {1, 5, 20, 67, 200};
    char op[64];
    for (int w = 0; w < 5; w++) {
        snprintf(op, sizeof op, "attention_backward window %d", windows[w]);
        test_attention_case(ops, op, 6, 2, 10, 10, windows[w], false);
        snprintf(op, sizeof op, "attention_backward w %d+sinks", windows[w]);
        test_attention_case(ops, op, 6, 2, 10, 10, windows[w], true);
    }
    test_attention_case(ops, "attention_backward sinks", 6, 2, 10, 10, 0, true);
}

/* ---- router ---------------------------------------------------------------------------- */

static struct {
    int E, K;
    bool renormalise, sigmoid;
    double scaling, *logits, *g;
    const int32_t *ids;
} rt;

/* sum_k g_k weight_k of one token, the top-k choice held fixed (it has no gradient, nor has
 * the sigmoid router's bias, which only chooses): softmax or sigmoid scores p, weight_k =
 * scaling p[id_k] / (sum of the top-k p (+ 1e-20 for the sigmoid) when renormalising). */
static double router_loss(int tensor, size_t index)
{
    (void)tensor;
    int n = (int)(index / rt.E);
    const double *z = rt.logits + (size_t)n * rt.E;
    double max = -INFINITY, sum = 0, p[64], total = rt.sigmoid ? 1e-20 : 0, loss = 0;
    for (int e = 0; e < rt.E; e++) max = fmax(max, z[e]);
    for (int e = 0; e < rt.E; e++) sum += p[e] = exp(z[e] - max);
    for (int e = 0; e < rt.E; e++) p[e] = rt.sigmoid ? 1 / (1 + exp(-z[e])) : p[e] / sum;
    for (int k = 0; k < rt.K; k++) total += p[rt.ids[(size_t)n * rt.K + k]];
    for (int k = 0; k < rt.K; k++) {
        double w = rt.scaling * p[rt.ids[(size_t)n * rt.K + k]] / (rt.renormalise ? total : 1.0);
        loss += rt.g[(size_t)n * rt.K + k] * w;
    }
    return loss;
}

static void test_router_case(const struct backend *ops, const char *kind, int E, int K,
                             const struct router_params *route)
{
    enum { N = 37 };
    char op[64];
    snprintf(op, sizeof op, "router %s %s x%.1f", kind, route->renormalise ? "renorm" : "plain",
             (double)route->scaling);
    float *logits = random_array((size_t)N * E, 1.5), *g = random_array((size_t)N * K, 1.0);
    float *weights = xmalloc((size_t)N * K * sizeof(float));
    float *probs = xmalloc((size_t)N * E * sizeof(float)), *dz[2];
    int32_t *ids = xmalloc((size_t)N * K * sizeof(int32_t));
    ops->router_topk(ids, weights, probs, logits, N, E, K, route);
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dz[pass] = filled((size_t)N * E, 7.0f);
        ops->router_topk_backward(dz[pass], g, probs, ids, N, E, K, route);
    }
    check_threads(op, "dlogits", dz[0], dz[1], (size_t)N * E);
    rt.E = E, rt.K = K, rt.renormalise = route->renormalise, rt.scaling = route->scaling;
    rt.sigmoid = route->kind == ROUTER_SIGMOID_BIAS, rt.ids = ids;
    rt.logits = to_double(logits, (size_t)N * E), rt.g = to_double(g, (size_t)N * K);
    report(op, "dlogits", fd_error(router_loss, 0, rt.logits, (size_t)N * E, dz[0], NULL));
    free(logits), free(g), free(weights), free(probs), free(ids), free(dz[0]), free(dz[1]);
    free(rt.logits), free(rt.g);
}

/* The softmax top-k router (E 7, K 2), deepseek_v2's group-limited greedy and the sigmoid
 * router with a selection bias (E 8 in 4 groups, 2 kept, K 3), renormalised or not,
 * scaled or not. */
static void test_router(const struct backend *ops)
{
    float bias[8] = {0.3f, -0.2f, 0.0f, -1.5f, 0.1f, 0.4f, -0.6f, 0.2f};
    for (int renormalise = 0; renormalise < 2; renormalise++)
        for (int scaled = 0; scaled < 2; scaled++) {
            float scaling = scaled ? 2.5f : 1.0f;
            struct router_params softmax = {ROUTER_SOFTMAX_TOPK, renormalise, scaling, 1, 1, NULL, NULL, 0};
            struct router_params grouped = {
                ROUTER_GROUPED_GREEDY, renormalise, scaling, 4, 2, NULL, NULL, 0};
            struct router_params sigmoid = {ROUTER_SIGMOID_BIAS, renormalise, scaling, 4, 2, bias, NULL, 0};
            test_router_case(ops, "softmax", 7, 2, &softmax);
            test_router_case(ops, "grouped", 8, 3, &grouped);
            test_router_case(ops, "sigmoid", 8, 3, &sigmoid);
        }
}

/* ---- grouped linear -------------------------------------------------------------------- */

enum { GL_E = 4, GL_I = 17, GL_O = 150 }; /* O: two of the backward's 128-row output blocks */
static const int32_t gl_offsets[GL_E + 1] = {0, 0, 70, 71, 201};

static struct {
    double *x, *w[GL_E], *g;
} gl;

static int expert_of_row(int r)
{
    int e = 0;
    while (gl_offsets[e + 1] <= r) e++;
    return e;
}

static double grouped_loss(int tensor, size_t index)
{
    int r0, r1, o0 = 0, o1 = GL_O;
    if (tensor == 0) { /* x: one row */
        r0 = (int)(index / GL_I), r1 = r0 + 1;
    } else { /* w[e]: the expert's rows, one output */
        r0 = gl_offsets[tensor - 1], r1 = gl_offsets[tensor];
        o0 = (int)(index / GL_I), o1 = o0 + 1;
    }
    double loss = 0;
    for (int r = r0; r < r1; r++)
        for (int o = o0; o < o1; o++) {
            const double *w = gl.w[expert_of_row(r)] + (size_t)o * GL_I;
            double y = 0;
            for (int i = 0; i < GL_I; i++) y += gl.x[(size_t)r * GL_I + i] * w[i];
            loss += gl.g[(size_t)r * GL_O + o] * y;
        }
    return loss;
}

static void test_grouped_linear(const struct backend *ops)
{
    const char *op = "grouped_linear_backward";
    enum { E = GL_E, I = GL_I, O = GL_O, frozen = 1 };
    int M = gl_offsets[E];
    float *x = random_array((size_t)M * I, 1.0), *w = random_array((size_t)E * O * I, 0.3);
    float *g = random_array((size_t)M * O, 1.0), *dw_base = random_array((size_t)E * O * I, 1.0);
    float *dx[2], *dw_buffer[2], *dw[2][E];
    const float *experts[E];
    for (int e = 0; e < E; e++) experts[e] = w + (size_t)e * O * I;
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = filled((size_t)M * I, 7.0f);
        dw_buffer[pass] = copy_of(dw_base, (size_t)E * O * I);
        for (int e = 0; e < E; e++)
            dw[pass][e] = e == frozen ? NULL : dw_buffer[pass] + (size_t)e * O * I;
        ops->grouped_linear_backward(dx[pass], dw[pass], g, x, experts, gl_offsets, E, I, O);
    }
    check_threads(op, "dx", dx[0], dx[1], (size_t)M * I);
    check_threads(op, "dw", dw_buffer[0], dw_buffer[1], (size_t)E * O * I);
    gl.x = to_double(x, (size_t)M * I), gl.g = to_double(g, (size_t)M * O);
    for (int e = 0; e < E; e++) gl.w[e] = to_double(w + (size_t)e * O * I, (size_t)O * I);
    report(op, "dx", fd_error(grouped_loss, 0, gl.x, (size_t)M * I, dx[0], NULL));
    for (int e = 0; e < E; e++) {
        char name[16];
        snprintf(name, sizeof name, "dw[%d]", e);
        if (e == frozen)
            check_same(op, "frozen expert's buffer", dw_buffer[0] + (size_t)e * O * I,
                       dw_base + (size_t)e * O * I, (size_t)O * I * sizeof(float));
        else
            report(op, name,
                   fd_error(grouped_loss, 1 + e, gl.w[e], (size_t)O * I, dw[0][e],
                            dw_base + (size_t)e * O * I));
    }
    /* every expert trained: the frozen run's other gradients are unchanged; no dx */
    float *dx2 = filled((size_t)M * I, -3.0f), *all = copy_of(dw_base, (size_t)E * O * I);
    float *all_dw[E], *none = copy_of(dw_base, (size_t)E * O * I), *none_dw[E];
    for (int e = 0; e < E; e++) all_dw[e] = all + (size_t)e * O * I;
    for (int e = 0; e < E; e++) none_dw[e] = none + (size_t)e * O * I;
    ops->grouped_linear_backward(dx2, all_dw, g, x, experts, gl_offsets, E, I, O);
    check_same(op, "dx with an expert frozen", dx2, dx[0], (size_t)M * I * sizeof(float));
    for (int e = 0; e < E; e++)
        if (e != frozen)
            check_same(op, "dw beside a frozen expert", all_dw[e], dw[0][e],
                       (size_t)O * I * sizeof(float));
    report(op, "dw[frozen]",
           fd_error(grouped_loss, 1 + frozen, gl.w[frozen], (size_t)O * I, all_dw[frozen],
                    dw_base + (size_t)frozen * O * I));
    ops->grouped_linear_backward(NULL, none_dw, g, x, experts, gl_offsets, E, I, O);
    check_same(op, "dw without dx", none, all, (size_t)E * O * I * sizeof(float));
    /* no experts trained, no dx: nothing to do, nothing touched */
    float *nothing[E] = {NULL, NULL, NULL, NULL};
    ops->grouped_linear_backward(NULL, nothing, g, x, experts, gl_offsets, E, I, O);

    for (int pass = 0; pass < 2; pass++) free(dx[pass]), free(dw_buffer[pass]);
    for (int e = 0; e < E; e++) free(gl.w[e]);
    free(x), free(w), free(g), free(dw_base), free(dx2), free(all), free(none);
    free(gl.x), free(gl.g);
}

/* ---- glu ------------------------------------------------------------------------------- */

static struct {
    enum hf_activation act;
    double *gate, *up, *g;
} gu;

static double glu_loss(int tensor, size_t i)
{
    (void)tensor;
    double x = gu.gate[i];
    double act = gu.act == ACT_SILU ? x / (1 + exp(-x)) : 0.5 * x * (1 + erf(x / sqrt(2.0)));
    return gu.g[i] * act * gu.up[i];
}

static void test_glu_case(const struct backend *ops, enum hf_activation act, const char *op)
{
    enum { count = 333 };
    float *gate = random_array(count, 2.0), *up = random_array(count, 1.0);
    float *g = random_array(count, 1.0), *dgate[2], *dup[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dgate[pass] = filled(count, 7.0f), dup[pass] = filled(count, 7.0f);
        ops->glu_backward(dgate[pass], dup[pass], g, gate, up, count, act);
    }
    check_threads(op, "dgate", dgate[0], dgate[1], count);
    check_threads(op, "dup", dup[0], dup[1], count);
    gu.act = act, gu.gate = to_double(gate, count), gu.up = to_double(up, count);
    gu.g = to_double(g, count);
    report(op, "dgate", fd_error(glu_loss, 0, gu.gate, count, dgate[0], NULL));
    report(op, "dup", fd_error(glu_loss, 1, gu.up, count, dup[0], NULL));
    /* dgate written over gate's own buffer (the forward values are not needed after) */
    float *inplace = copy_of(gate, count), *dup2 = xmalloc(count * sizeof(float));
    ops->glu_backward(inplace, dup2, g, inplace, up, count, act);
    check_same(op, "dgate written over gate", inplace, dgate[0], count * sizeof(float));
    check_same(op, "dup beside it", dup2, dup[0], count * sizeof(float));
    for (int pass = 0; pass < 2; pass++) free(dgate[pass]), free(dup[pass]);
    free(gate), free(up), free(g), free(inplace), free(dup2), free(gu.gate), free(gu.up);
    free(gu.g);
}

static void test_glu(const struct backend *ops)
{
    test_glu_case(ops, ACT_SILU, "glu_backward silu");
    test_glu_case(ops, ACT_GELU, "glu_backward gelu");
}

/* ---- combine and gather ---------------------------------------------------------------- */

enum { CB_N = 29, CB_K = 3, CB_H = 11, CB_M = CB_N * CB_K };

static struct {
    double *ys, *weights, *x, *g, *gs;
    int32_t row_of_slot[CB_M], slot_of_row[CB_M];
} cb;

static double combine_loss(int tensor, size_t index)
{
    (void)tensor, (void)index;
    double loss = 0;
    for (int n = 0; n < CB_N; n++)
        for (int k = 0; k < CB_K; k++)
            for (int d = 0; d < CB_H; d++)
                loss += cb.g[n * CB_H + d] * cb.weights[n * CB_K + k] *
                        cb.ys[cb.row_of_slot[n * CB_K + k] * CB_H + d];
    return loss;
}

/* gather: xs[r] = x[slot_of_row[r] / K] */
static double gather_loss(int tensor, size_t index)
{
    (void)tensor, (void)index;
    double loss = 0;
    for (int r = 0; r < CB_M; r++)
        for (int d = 0; d < CB_H; d++)
            loss += cb.gs[r * CB_H + d] * cb.x[(cb.slot_of_row[r] / CB_K) * CB_H + d];
    return loss;
}

static void test_combine_gather(const struct backend *ops)
{
    enum { N = CB_N, K = CB_K, H = CB_H, M = CB_M };
    /* slots scattered over rows by a random permutation */
    for (int s = 0; s < M; s++) cb.row_of_slot[s] = s;
    for (int s = M - 1; s > 0; s--) {
        int other = (int)rng_below(&rng, (uint64_t)s + 1), t = cb.row_of_slot[s];
        cb.row_of_slot[s] = cb.row_of_slot[other], cb.row_of_slot[other] = t;
    }
    for (int s = 0; s < M; s++) cb.slot_of_row[cb.row_of_slot[s]] = s;

    const char *op = "combine_backward";
    float *ys = random_array(M * H, 1.0), *weights = random_array(N * K, 1.0);
    float *g = random_array(N * H, 1.0), *dys[2], *dweights[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dys[pass] = filled(M * H, 7.0f), dweights[pass] = filled(N * K, 7.0f);
        ops->combine_backward(dys[pass], dweights[pass], g, ys, weights, cb.row_of_slot, N, K, H);
    }
    check_threads(op, "dys", dys[0], dys[1], M * H);
    check_threads(op, "dweights", dweights[0], dweights[1], N * K);
    cb.ys = to_double(ys, M * H), cb.weights = to_double(weights, N * K),
    cb.g = to_double(g, N * H);
    report(op, "dys", fd_error(combine_loss, 0, cb.ys, M * H, dys[0], NULL));
    report(op, "dweights", fd_error(combine_loss, 1, cb.weights, N * K, dweights[0], NULL));

    op = "gather_rows_backward";
    float *x = random_array(N * H, 1.0), *gs = random_array(M * H, 1.0), *dx[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = filled(N * H, 7.0f);
        ops->gather_rows_backward(dx[pass], gs, cb.row_of_slot, N, K, H, false);
    }
    check_threads(op, "dx", dx[0], dx[1], N * H);
    cb.x = to_double(x, N * H), cb.gs = to_double(gs, M * H);
    report(op, "dx", fd_error(gather_loss, 0, cb.x, N * H, dx[0], NULL));
    float *dx_base = random_array(N * H, 1.0), *dx2 = copy_of(dx_base, N * H);
    ops->gather_rows_backward(dx2, gs, cb.row_of_slot, N, K, H, true);
    report(op, "dx (+=)", fd_error(gather_loss, 0, cb.x, N * H, dx2, dx_base));

    for (int pass = 0; pass < 2; pass++) free(dys[pass]), free(dweights[pass]), free(dx[pass]);
    free(ys), free(weights), free(g), free(x), free(gs), free(dx_base), free(dx2);
    free(cb.ys), free(cb.weights), free(cb.g), free(cb.x), free(cb.gs);
}

/* ---- gated shared expert, clamp -------------------------------------------------------- */

static struct {
    int H;
    double *s, *gate, *g;
} sg;

static double gated_loss(int tensor, size_t index)
{
    int n = (int)(tensor == 0 ? index / sg.H : index);
    double gate = 1 / (1 + exp(-sg.gate[n])), loss = 0;
    for (int d = 0; d < sg.H; d++)
        loss += sg.g[(size_t)n * sg.H + d] * gate * sg.s[(size_t)n * sg.H + d];
    return loss;
}

static void test_add_sigmoid_gated(const struct backend *ops)
{
    enum { N = 29, H = 11 };
    const char *op = "add_sigmoid_gated_backward";
    float *s = random_array(N * H, 1.0), *gate = random_array(N, 2.0),
          *g = random_array(N * H, 1.0);
    float *ds[2], *dgate[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        ds[pass] = filled(N * H, 7.0f), dgate[pass] = filled(N, 7.0f);
        ops->add_sigmoid_gated_backward(ds[pass], dgate[pass], g, s, gate, N, H);
    }
    check_threads(op, "ds", ds[0], ds[1], N * H);
    check_threads(op, "dgate", dgate[0], dgate[1], N);
    sg.H = H, sg.s = to_double(s, N * H), sg.gate = to_double(gate, N), sg.g = to_double(g, N * H);
    report(op, "ds", fd_error(gated_loss, 0, sg.s, N * H, ds[0], NULL));
    report(op, "dgate", fd_error(gated_loss, 1, sg.gate, N, dgate[0], NULL));
    for (int pass = 0; pass < 2; pass++) free(ds[pass]), free(dgate[pass]);
    free(s), free(gate), free(g), free(sg.s), free(sg.gate), free(sg.g);
}

static struct {
    double low, high, *x, *g;
} cl;

static double clamp_loss(int tensor, size_t i)
{
    (void)tensor;
    return cl.g[i] * fmin(fmax(cl.x[i], cl.low), cl.high);
}

static void test_clamp(const struct backend *ops)
{
    enum { count = 500 };
    const char *op = "clamp_backward";
    float low = -1.0f, high = 1.25f;
    float *x = random_array(count, 1.5), *g = random_array(count, 1.0), *dx[2];
    for (int i = 0; i < count; i++) /* keep the differences off the kinks */
        while (fabsf(x[i] - low) < 1e-2f || fabsf(x[i] - high) < 1e-2f)
            x[i] = (float)(1.5 * rng_normal(&rng));
    float *y = copy_of(x, count);
    ops->clamp(y, count, low, high);
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dx[pass] = copy_of(g, count);
        ops->clamp_backward(dx[pass], y, count, low, high);
    }
    check_threads(op, "dx", dx[0], dx[1], count);
    cl.low = low, cl.high = high, cl.x = to_double(x, count), cl.g = to_double(g, count);
    report(op, "dx", fd_error(clamp_loss, 0, cl.x, count, dx[0], NULL));
    free(x), free(g), free(y), free(dx[0]), free(dx[1]), free(cl.x), free(cl.g);
}

/* ---- cross-entropy, embedding ---------------------------------------------------------- */

static struct {
    int V;
    double scale, *logits;
    const int32_t *labels;
} ce;

static double cross_entropy_loss(int tensor, size_t index)
{
    (void)tensor;
    int n = (int)(index / ce.V);
    if (ce.labels[n] < 0) return 0;
    const double *z = ce.logits + (size_t)n * ce.V;
    double max = -INFINITY, sum = 0;
    for (int v = 0; v < ce.V; v++) max = fmax(max, z[v]);
    for (int v = 0; v < ce.V; v++) sum += exp(z[v] - max);
    return ce.scale * (log(sum) + max - z[ce.labels[n]]);
}

static void test_cross_entropy(const struct backend *ops)
{
    enum { N = 23, V = 101 };
    const char *op = "cross_entropy_backward";
    float *logits = random_array(N * V, 2.0), *dz[2];
    int32_t labels[N];
    int counted = 0;
    for (int n = 0; n < N; n++) {
        labels[n] = n % 4 == 1 ? -100 : (int32_t)rng_below(&rng, V);
        counted += labels[n] >= 0;
    }
    float scale = 1.0f / (float)counted;
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dz[pass] = filled(N * V, 7.0f);
        ops->cross_entropy_backward(dz[pass], logits, labels, N, V, scale);
    }
    check_threads(op, "dlogits", dz[0], dz[1], N * V);
    int nonzero = 0;
    for (int n = 0; n < N; n++)
        for (int v = 0; v < V; v++) nonzero += labels[n] < 0 && dz[0][n * V + v] != 0.0f;
    CHECK(nonzero == 0, "%s: %d nonzero gradients in ignored rows", op, nonzero);
    ce.V = V, ce.scale = scale, ce.labels = labels, ce.logits = to_double(logits, N * V);
    report(op, "dlogits", fd_error(cross_entropy_loss, 0, ce.logits, N * V, dz[0], NULL));
    free(logits), free(dz[0]), free(dz[1]), free(ce.logits);
}

static struct {
    int H;
    double *table, *g;
    const int32_t *tokens;
    int N;
} emb;

static double embedding_loss(int tensor, size_t index)
{
    (void)tensor;
    int row = (int)(index / emb.H), d = (int)(index % emb.H);
    double loss = 0;
    for (int n = 0; n < emb.N; n++)
        if (emb.tokens[n] == row) loss += emb.g[(size_t)n * emb.H + d] * emb.table[index];
    return loss;
}

static void test_embedding(const struct backend *ops)
{
    enum { V = 13, H = 70, N = 40 }; /* H crosses the 64-column blocks; tokens repeat */
    const char *op = "embedding_backward";
    int32_t tokens[N];
    for (int n = 0; n < N; n++) tokens[n] = (int32_t)rng_below(&rng, V - 1); /* V-1: unused row */
    float *table = random_array(V * H, 1.0), *g = random_array(N * H, 1.0);
    float *base = random_array(V * H, 1.0), *dtable[2];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dtable[pass] = copy_of(base, V * H);
        ops->embedding_backward(dtable[pass], g, tokens, N, H);
    }
    check_threads(op, "dtable", dtable[0], dtable[1], V * H);
    check_same(op, "an unused row", dtable[0] + (V - 1) * H, base + (V - 1) * H, H * sizeof(float));
    emb.H = H, emb.N = N, emb.tokens = tokens;
    emb.table = to_double(table, V * H), emb.g = to_double(g, N * H);
    report(op, "dtable", fd_error(embedding_loss, 0, emb.table, V * H, dtable[0], base));
    free(table), free(g), free(base), free(dtable[0]), free(dtable[1]), free(emb.table);
    free(emb.g);
}

/* ---- gpt_oss's clamped GLU and per-expert biases ---------------------------------------- */

enum { GC_COUNT = 301 };
static const double GC_ALPHA = 1.702, GC_LIMIT = 7.0;

static struct {
    double *gate, *up, *g;
} gc;

/* g_i h_i for one element, h = (clamp(up) + 1) min(gate, limit) sigmoid(alpha min(gate,
 * limit)) (transformers' GptOssExperts._apply_gate) */
static double glu_clamped_loss(int tensor, size_t i)
{
    (void)tensor;
    double g = fmin(gc.gate[i], GC_LIMIT), u = fmax(fmin(gc.up[i], GC_LIMIT), -GC_LIMIT);
    return gc.g[i] * (u + 1) * g / (1 + exp(-GC_ALPHA * g));
}

/* inputs on both sides of every clamp (|x| up to about 20 against the limit 7), and at
 * the bounds exactly, where torch 2.15's clamp gives the gradient 0 as well */
static void test_glu_clamped(const struct backend *ops)
{
    const char *op = "glu_clamped_backward";
    float *gate = random_array(GC_COUNT, 8.0), *up = random_array(GC_COUNT, 8.0);
    float *g = random_array(GC_COUNT, 1.0), *dgate[2], *dup[2];
    float alpha = (float)GC_ALPHA, limit = (float)GC_LIMIT;
    gate[0] = limit, up[1] = limit, up[2] = -limit, gate[3] = 2 * limit, up[4] = -2 * limit;
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        dgate[pass] = filled(GC_COUNT, 7.0f), dup[pass] = filled(GC_COUNT, 7.0f);
        ops->glu_clamped_backward(dgate[pass], dup[pass], g, gate, up, GC_COUNT, alpha, limit);
    }
    check_threads(op, "dgate", dgate[0], dgate[1], GC_COUNT);
    check_threads(op, "dup", dup[0], dup[1], GC_COUNT);
    int clamped_gate = 0, clamped_up = 0, wrong_zero = 0, wrong_bound = 0;
    for (int i = 0; i < GC_COUNT; i++) {
        clamped_gate += gate[i] > limit, clamped_up += fabsf(up[i]) > limit;
        wrong_zero += (gate[i] > limit && dgate[0][i] != 0) || (fabsf(up[i]) > limit && dup[0][i] != 0);
    }
    /* at a bound: 0, as torch.clamp's backward gives it (checked with torch 2.15:
     * x.clamp(-3, 3).sum().backward() at x = 3 and -3 gives 0) */
    wrong_bound += dgate[0][0] != 0.0f;
    wrong_bound += dup[0][1] != 0.0f;
    wrong_bound += dup[0][2] != 0.0f;
    CHECK(clamped_gate > 10 && clamped_up > 10, "only %d gates and %d ups past the limit",
          clamped_gate, clamped_up);
    CHECK(wrong_zero == 0, "%s: %d gradients through a biting clamp not 0", op, wrong_zero);
    CHECK(wrong_bound == 0, "%s: %d gradients at a bound wrong", op, wrong_bound);
    printf("%-28s clamped: %d gates, %d ups of %d; gradients there and at the bounds 0\n", op,
           clamped_gate, clamped_up, GC_COUNT);
    /* finite differences away from the kinks (a difference across one is meaningless) */
    gc.gate = to_double(gate, GC_COUNT), gc.up = to_double(up, GC_COUNT), gc.g = to_double(g, GC_COUNT);
    for (int i = 0; i < GC_COUNT; i++) {
        if (fabs(fabs(gc.gate[i]) - GC_LIMIT) < 1e-2) gc.gate[i] = gate[i] = 0.5f;
        if (fabs(fabs(gc.up[i]) - GC_LIMIT) < 1e-2) gc.up[i] = up[i] = -0.5f;
    }
    ops->glu_clamped_backward(dgate[0], dup[0], g, gate, up, GC_COUNT, alpha, limit);
    report(op, "dgate", fd_error(glu_clamped_loss, 0, gc.gate, GC_COUNT, dgate[0], NULL));
    report(op, "dup", fd_error(glu_clamped_loss, 1, gc.up, GC_COUNT, dup[0], NULL));
    for (int pass = 0; pass < 2; pass++) free(dgate[pass]), free(dup[pass]);
    free(gate), free(up), free(g), free(gc.gate), free(gc.up), free(gc.g);
}

/* grouped_bias_backward against a naive double sum: experts holding 0, 70, 1 and 300 rows
 * (more than a partial-sum chunk), O wider than one column block, one expert frozen;
 * added to the buffers; the same bits on 1 and 3 threads */
static void test_grouped_bias(const struct backend *ops)
{
    enum { E = 4, O = 300 };
    const char *op = "grouped_bias_backward";
    const int32_t offsets[E + 1] = {0, 0, 70, 71, 371};
    int M = offsets[E], frozen = 2;
    float *dy = random_array((size_t)M * O, 1.0), *base = random_array((size_t)E * O, 1.0);
    float *buffer[2], *dbias[2][E];
    for (int pass = 0; pass < 2; pass++) {
        omp_set_num_threads(pass ? 3 : 1);
        buffer[pass] = copy_of(base, (size_t)E * O);
        for (int e = 0; e < E; e++) dbias[pass][e] = e == frozen ? NULL : buffer[pass] + (size_t)e * O;
        ops->grouped_bias_backward(dbias[pass], dy, offsets, E, O);
    }
    check_threads(op, "dbias", buffer[0], buffer[1], (size_t)E * O);
    double diff = 0, scale = 0;
    for (int e = 0; e < E; e++)
        for (int o = 0; o < O; o++) {
            double want = base[e * O + o];
            if (e != frozen)
                for (int r = offsets[e]; r < offsets[e + 1]; r++) want += dy[(size_t)r * O + o];
            diff = fmax(diff, fabs(buffer[0][e * O + o] - want));
            scale = fmax(scale, fabs(want));
        }
    report(op, "dbias", diff / scale);
    check_same(op, "frozen expert's buffer", buffer[0] + frozen * O, base + frozen * O,
               O * sizeof(float));
    for (int pass = 0; pass < 2; pass++) free(buffer[pass]);
    free(dy), free(base);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    rng_seed(&rng, 2027);
    const struct backend *ops = backend_cpu();
    test_linear(ops);
    test_rmsnorm(ops);
    test_rope(ops);
    test_attention(ops);
    test_router(ops);
    test_grouped_linear(ops);
    test_glu(ops);
    test_combine_gather(ops);
    test_add_sigmoid_gated(ops);
    test_clamp(ops);
    test_cross_entropy(ops);
    test_embedding(ops);
    test_attention_gpt_oss(ops);
    test_glu_clamped(ops);
    test_grouped_bias(ops);
    int status = check_done("test_cpu_backward");
    MPI_Finalize();
    return status;
}
