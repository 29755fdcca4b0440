/* test_dense_math: the dense and optimizer kernels' host-side arithmetic
 * (kernels/dense_math.h), run without a GPU. The RoPE kernel's thread-to-pair mapping,
 * replayed over every thread index, gives the CPU backend's rotation bit for bit (forward
 * and transpose); the RMSNorm weight gradient's chunked sum, replayed as the device
 * kernels cut it, gives the CPU backend's bit for bit; the gradient norm's chunked sum
 * equals a plain double sum to 1e-12 (rounding over 2e4 terms) and is exactly the
 * device kernel's partition; one AdamW step from zero moments moves each parameter by lr * sign(g) after decay (the
 * hand-worked first step), and the coefficients are formed in double (1 - 0.999 exact to
 * float rounding). The cuBLAS plans of a linear layer's three products (gemm_math.h),
 * replayed by a plain column-major GEMM as BLAS defines it, give the CPU backend's
 * linear and linear_backward to 1e-5. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "dense_math.h"
#include "gemm_math.h"
#include "log.h"
#include "optim.h"
#include "rng.h"

static float *random_floats(struct rng *rng, size_t n, float low, float high)
{
    float *x = xmalloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = low + (float)rng_uniform(rng) * (high - low);
    return x;
}

static void check_rope(int N, int n_heads, int Dh, int rotary_dim, struct rng *rng)
{
    int half = rotary_dim / 2;
    size_t count = (size_t)N * n_heads * Dh;
    int32_t *positions = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) positions[n] = (int32_t)rng_below(rng, 40000);
    float *inv_freq = xmalloc((size_t)half * sizeof(float));
    for (int i = 0; i < half; i++) inv_freq[i] = powf(1e6f, -2.0f * (float)i / (float)rotary_dim);
    float *want = random_floats(rng, count, -2, 2), *got = xmalloc(count * sizeof(float));
    memcpy(got, want, count * sizeof(float));
    for (int backward = 0; backward < 2; backward++) {
        if (backward)
            backend_cpu()->rope_backward(want, positions, inv_freq, 1.1f, N, n_heads, Dh, rotary_dim,
                                         ROPE_ROTATE_HALF);
        else
            backend_cpu()->rope(want, positions, inv_freq, 1.1f, N, n_heads, Dh, rotary_dim,
                                ROPE_ROTATE_HALF);
        /* the kernel's threads, one by one */
        for (size_t i = 0; i < (size_t)N * n_heads * half; i++) {
            size_t row, pair, token;
            rope_pair_of(i, half, n_heads, &row, &pair, &token);
            float c, s;
            rope_cos_sin(&c, &s, positions[token], inv_freq[pair], 1.1f);
            float *xh = got + row * (size_t)Dh;
            if (backward)
                rope_rotate_transpose(&xh[pair], &xh[pair + half], c, s);
            else
                rope_rotate(&xh[pair], &xh[pair + half], c, s);
        }
        CHECK(memcmp(got, want, count * sizeof(float)) == 0,
              "rope%s N %d heads %d Dh %d rotary %d: the kernel's mapping differs from the CPU's",
              backward ? " backward" : "", N, n_heads, Dh, rotary_dim);
    }
    free(positions), free(inv_freq), free(want), free(got);
}

/* The device's two kernels for RMSNorm's dw: per chunk of SUM_CHUNK rows, then over chunks. */
static void check_rmsnorm_dw(int R, int D, struct rng *rng)
{
    float *x = random_floats(rng, (size_t)R * D, -1, 1), *dy = random_floats(rng, (size_t)R * D, -1, 1);
    float *w = random_floats(rng, (size_t)D, 0.5f, 1.5f), *rstd = xmalloc((size_t)R * sizeof(float));
    float *y = xmalloc((size_t)R * D * sizeof(float));
    backend_cpu()->rmsnorm(y, rstd, x, w, R, D, 1e-5f);
    float *want = random_floats(rng, (size_t)D, -1, 1), *got = xmalloc((size_t)D * sizeof(float));
    memcpy(got, want, (size_t)D * sizeof(float));
    backend_cpu()->rmsnorm_backward(NULL, want, dy, x, w, rstd, R, D, false);
    int chunks = (R + SUM_CHUNK - 1) / SUM_CHUNK;
    float *partial = xmalloc((size_t)(chunks ? chunks : 1) * D * sizeof(float));
    for (int c = 0; c < chunks; c++) /* column_partial_kernel, thread d of block c */
        for (int d = 0; d < D; d++) {
            float p = 0.0f;
            for (int r = c * SUM_CHUNK; r < R && r < (c + 1) * SUM_CHUNK; r++)
                p += rmsnorm_dw_term(dy[(size_t)r * D + d], x[(size_t)r * D + d], rstd[r]);
            partial[(size_t)c * D + d] = p;
        }
    for (int d = 0; d < D; d++) { /* add_partial_sums_kernel */
        float total = 0.0f;
        for (int c = 0; c < chunks; c++) total += partial[(size_t)c * D + d];
        got[d] += total;
    }
    CHECK(memcmp(got, want, (size_t)D * sizeof(float)) == 0,
          "rmsnorm dw R %d D %d: the kernels' chunked sum differs from the CPU's", R, D);
    free(x), free(dy), free(w), free(rstd), free(y), free(want), free(got), free(partial);
}

static void check_grad_norm(size_t n, struct rng *rng)
{
    struct model model;
    memset(&model, 0, sizeof model);
    model.grad_floats = n;
    model.grad_storage = random_floats(rng, n, -3, 3);
    double plain = 0, chunked = 0;
    for (size_t i = 0; i < n; i++) plain += (double)model.grad_storage[i] * model.grad_storage[i];
    for (size_t c = 0; c * NORM_CHUNK < n; c++) { /* the chunks in order, each by 8 lanes */
        size_t end = (c + 1) * NORM_CHUNK < n ? (c + 1) * NORM_CHUNK : n, full = end - (end - c * NORM_CHUNK) % 8;
        double lane[8] = {0}, part = 0;
        for (size_t i = c * NORM_CHUNK; i < full; i++)
            lane[(i - c * NORM_CHUNK) % 8] += (double)model.grad_storage[i] * model.grad_storage[i];
        for (int k = 0; k < 8; k++) part += lane[k];
        for (size_t i = full; i < end; i++) part += (double)model.grad_storage[i] * model.grad_storage[i];
        chunked += part;
    }
    double norm = grad_norm(&model);
    CHECK(norm == sqrt(chunked), "grad norm of %zu: %.17g, the chunked sum's %.17g", n, norm,
          sqrt(chunked));
    CHECK(fabs(norm - sqrt(plain)) <= 1e-12 * sqrt(plain) + 1e-300,
          "grad norm of %zu: %.17g, the plain sum's %.17g", n, norm, sqrt(plain));
    free(model.grad_storage);
}

static void check_adamw_first_step(struct rng *rng)
{
    double lr = 2e-4, wd = 0.1;
    struct adamw_coef c = adamw_coefficients(lr, 0.9, 0.999, 1e-8, wd, 1);
    CHECK(c.one_minus_b2 == (float)(1.0 - 0.999) && c.one_minus_b2 != 1.0f - 0.999f,
          "1 - beta2 formed in float");
    CHECK(c.bias2_sqrt == (float)sqrt(0.001), "sqrt(1 - b2^1) %.9g", c.bias2_sqrt);
    int wrong = 0;
    for (int i = 0; i < 1000; i++) {
        float p = (float)rng_uniform(rng) * 2 - 1, m = 0, v = 0;
        float g = (float)(rng_uniform(rng) - 0.5) * powf(10.0f, (float)rng_below(rng, 6) - 4);
        float p0 = p;
        adamw_update(&p, &m, &v, g, &c);
        /* m = 0.1 g, v = 0.001 g^2: the step is lr * m / (0.1 (|g| + eps)) = lr * g / (|g| + eps) */
        double want = p0 * (1 - lr * wd) - lr * g / (fabs(g) + 1e-8);
        wrong += fabs(p - want) > 1e-6 * fabs(want) + 1e-9;
    }
    CHECK(wrong == 0, "AdamW first step: %d of 1000 parameters off lr * sign(g)", wrong);
}

/* C = op(A) op(B) + beta C, column-major, as BLAS defines GEMM. */
static void colmajor_gemm(struct gemm_plan p, const float *a, const float *b, float *c, float beta)
{
    for (int j = 0; j < p.n; j++)
        for (int i = 0; i < p.m; i++) {
            double sum = 0;
            for (int l = 0; l < p.k; l++) {
                float av = p.trans_a ? a[l + (size_t)i * p.lda] : a[i + (size_t)l * p.lda];
                float bv = p.trans_b ? b[j + (size_t)l * p.ldb] : b[l + (size_t)j * p.ldb];
                sum += (double)av * bv;
            }
            float *cij = &c[i + (size_t)j * p.ldc];
            *cij = (float)(sum + (double)beta * *cij);
        }
}

static void check_gemm_plans(int N, int I, int O, struct rng *rng)
{
    const struct backend *cpu = backend_cpu();
    float *x = random_floats(rng, (size_t)N * I, -1, 1), *w = random_floats(rng, (size_t)O * I, -1, 1);
    float *dy = random_floats(rng, (size_t)N * O, -1, 1);
    float *y = xmalloc((size_t)N * O * sizeof(float)), *y_plan = random_floats(rng, (size_t)N * O, -9, 9);
    cpu->linear(y, x, w, NULL, N, I, O, false);
    colmajor_gemm(gemm_plan_of(GEMM_FORWARD, N, I, O), w, x, y_plan, 0.0f);
    CHECK(check_worst_relative(y_plan, y, (size_t)N * O) < 1e-5, "forward plan N %d I %d O %d", N, I, O);
    float *dx = random_floats(rng, (size_t)N * I, -1, 1), *dx_plan = xmalloc((size_t)N * I * sizeof(float));
    float *dw = random_floats(rng, (size_t)O * I, -1, 1), *dw_plan = xmalloc((size_t)O * I * sizeof(float));
    memcpy(dx_plan, dx, (size_t)N * I * sizeof(float)); /* accumulated into: beta 1 */
    memcpy(dw_plan, dw, (size_t)O * I * sizeof(float));
    cpu->linear_backward(dx, dw, NULL, dy, x, w, N, I, O, true);
    colmajor_gemm(gemm_plan_of(GEMM_INPUT_GRAD, N, I, O), w, dy, dx_plan, 1.0f);
    colmajor_gemm(gemm_plan_of(GEMM_WEIGHT_GRAD, N, I, O), x, dy, dw_plan, 1.0f);
    CHECK(check_worst_relative(dx_plan, dx, (size_t)N * I) < 1e-5, "input-gradient plan N %d I %d O %d", N, I, O);
    CHECK(check_worst_relative(dw_plan, dw, (size_t)O * I) < 1e-5, "weight-gradient plan N %d I %d O %d", N, I, O);
    free(x), free(w), free(dy), free(y), free(y_plan), free(dx), free(dx_plan), free(dw), free(dw_plan);
}

int main(void)
{
    struct rng rng;
    rng_seed(&rng, 20261123);
    check_rope(1, 1, 8, 8, &rng);
    check_rope(37, 4, 128, 128, &rng);
    check_rope(19, 3, 64, 32, &rng); /* partial rotary: dims past rotary_dim untouched */
    check_rmsnorm_dw(1, 16, &rng);
    check_rmsnorm_dw(SUM_CHUNK, 33, &rng);
    check_rmsnorm_dw(3 * SUM_CHUNK + 5, 64, &rng);
    check_grad_norm(0, &rng);
    check_grad_norm(NORM_CHUNK, &rng);
    check_grad_norm(5 * NORM_CHUNK + 123, &rng);
    check_adamw_first_step(&rng);
    check_gemm_plans(1, 1, 1, &rng);
    check_gemm_plans(5, 3, 7, &rng);     /* every dimension different: a swapped m/n/k shows */
    check_gemm_plans(64, 48, 96, &rng);
    return check_done("test_dense_math");
}
