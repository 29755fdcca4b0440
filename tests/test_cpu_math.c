/* test_cpu_math: the CPU backend's vectorisable exp, sigmoid and SiLU (src/cpu_math.h)
 * against double-precision libm over the floats of their ranges: every 2003rd float (by its
 * bit pattern, so every binade and many mantissa patterns) by default, every float with
 * ESFT_EXHAUSTIVE=1 (the figures cpu_math.h documents; about a minute on 2 cores). Each
 * function's worst error is printed in ulp of the reference's float and as a relative
 * error; results below FLT_MIN (subnormal) are held to an absolute error in units of the
 * subnormal spacing 2^-149. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cpu_math.h"

static float float_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

enum function { EXP_NONPOSITIVE, EXP, SIGMOID, SILU };
static const char *const names[] = {"exp_nonpositive", "exp_vectorised", "sigmoid_vectorised",
                                    "silu_vectorised"};

static double reference(enum function f, float x)
{
    double d = x;
    switch (f) {
    case EXP_NONPOSITIVE:
    case EXP: return exp(d);
    case SIGMOID: return 1.0 / (1.0 + exp(-d));
    default: return d / (1.0 + exp(-d));
    }
}

/* The worst errors over one function's floats. */
struct worst {
    double ulp, relative, subnormal; /* subnormal: in units of 2^-149 */
    float at;
    long count, wrong_overflow;
};

/* |got - want| in ulp of want's float (want normal), or in subnormal spacings. */
static void measure(struct worst *w, float x, float got, double want)
{
    double a = fabs(want), diff = fabs((double)got - want);
    w->count++;
    if (a > FLT_MAX) { /* overflow: +inf, or FLT_MAX where the rounding would keep it */
        if (!(isinf(got) || got == FLT_MAX)) w->wrong_overflow++;
        return;
    }
    if (a < FLT_MIN) {
        double units = diff / 0x1p-149;
        if (units > w->subnormal) w->subnormal = units;
        return;
    }
    int e;
    frexp(a, &e); /* a = m 2^e, 0.5 <= m < 1: the float's ulp is 2^(e - 24) */
    double ulp = diff / ldexp(1.0, e - 24), relative = diff / a;
    if (ulp > w->ulp) w->ulp = ulp, w->at = x;
    if (relative > w->relative) w->relative = relative;
}

/* One block of arguments through the vector form of the function under test (the scalar
 * form is its lane 0); the block's unused end is padded with zeros. */
enum { BLOCK = 4096 };

static vfloat evaluate_vector(enum function f, vfloat x)
{
    switch (f) {
    case EXP_NONPOSITIVE: return vexp_nonpositive(x);
    case EXP: return vexp(x);
    case SIGMOID: return vsigmoid(x);
    default: return vsilu(x);
    }
}

static void evaluate_block(enum function f, float *y, float *x, int n)
{
    for (int i = n; i % VLANES; i++) x[i] = 0.0f;
    for (int i = 0; i < n; i += VLANES) vstore(y + i, evaluate_vector(f, vload(x + i)));
}

/* Every stride-th float of [low, high] (both signs as the range has them). */
static struct worst sweep(enum function f, float low, float high, uint32_t stride)
{
    struct worst total = {0};
    for (int sign = 0; sign < 2; sign++) {
        float end = sign ? -low : high; /* the range's extent on this side */
        if (end <= 0.0f) continue;
        uint32_t count = bits_of(end) / stride + 1, flip = sign ? 0x80000000u : 0;
        uint32_t blocks = (count + BLOCK - 1) / BLOCK;
#pragma omp parallel
        {
            struct worst w = {0};
            float x[BLOCK + VLANES], y[BLOCK + VLANES];
#pragma omp for schedule(static)
            for (uint32_t b = 0; b < blocks; b++) {
                int n = count - b * BLOCK < BLOCK ? (int)(count - b * BLOCK) : BLOCK;
                for (int i = 0; i < n; i++) x[i] = float_bits(((uint32_t)b * BLOCK + i) * stride | flip);
                evaluate_block(f, y, x, n);
                for (int i = 0; i < n; i++) measure(&w, x[i], y[i], reference(f, x[i]));
            }
#pragma omp critical
            {
                if (w.ulp > total.ulp) total.ulp = w.ulp, total.at = w.at;
                if (w.relative > total.relative) total.relative = w.relative;
                if (w.subnormal > total.subnormal) total.subnormal = w.subnormal;
                total.count += w.count;
                total.wrong_overflow += w.wrong_overflow;
            }
        }
    }
    return total;
}

int main(void)
{
    const char *all = getenv("ESFT_EXHAUSTIVE");
    uint32_t stride = all && strcmp(all, "1") == 0 ? 1 : 2003;
    /* the ranges: where each result is neither a constant nor overflowed */
    const float low[] = {-87.0f, -112.0f, -112.0f, -112.0f}, high[] = {0.0f, 89.0f, 104.0f, 104.0f};
    /* bounds a little above the exhaustive maxima (cpu_math.h's table) */
    const double ulp_bound[] = {3.1, 3.1, 4.2, 5.6}, subnormal_bound[] = {0.0, 2.0, 2.0, 2.0};
    for (int f = 0; f < 4; f++) {
        struct worst w = sweep((enum function)f, low[f], high[f], stride);
        printf("%-18s [%g, %g], %ld floats: max %.2f ulp (relative %.2e, at x = %.9g), "
               "subnormal results within %.2f x 2^-149\n",
               names[f], low[f], high[f], w.count, w.ulp, w.relative, w.at, w.subnormal);
        CHECK(w.ulp <= ulp_bound[f], "%s: %.2f ulp at x = %.9g, bound %.1f", names[f], w.ulp, w.at,
              ulp_bound[f]);
        CHECK(w.subnormal <= subnormal_bound[f] || f == EXP_NONPOSITIVE,
              "%s: subnormal results %.2f x 2^-149 off", names[f], w.subnormal);
        CHECK(w.wrong_overflow == 0, "%s: %ld overflowed results are not +inf", names[f],
              w.wrong_overflow);
    }

    /* exp_vectorised is exp_nonpositive on [-87, 0], bit for bit (the softmaxes may use
     * either) */
    long differ = 0;
    for (uint32_t u = 0x80000000u; u <= bits_of(-87.0f); u += 7)
        differ += bits_of(exp_vectorised(float_bits(u))) != bits_of(exp_nonpositive(float_bits(u)));
    CHECK(differ == 0, "exp_vectorised differs from exp_nonpositive at %ld points of [-87, 0]",
          differ);

    /* the special values */
    CHECK(isinf(exp_vectorised(INFINITY)) && exp_vectorised(-INFINITY) == 0.0f,
          "exp(+-inf) %g %g", exp_vectorised(INFINITY), exp_vectorised(-INFINITY));
    CHECK(sigmoid_vectorised(INFINITY) == 1.0f && sigmoid_vectorised(-INFINITY) == 0.0f,
          "sigmoid(+-inf) %g %g", sigmoid_vectorised(INFINITY), sigmoid_vectorised(-INFINITY));
    CHECK(silu_vectorised(INFINITY) == INFINITY && silu_vectorised(-1e30f) == 0.0f &&
              silu_vectorised(-FLT_MAX) == 0.0f && exp_vectorised(-113.0f) == 0.0f,
          "silu(inf) %g, silu(-1e30) %g", silu_vectorised(INFINITY), silu_vectorised(-1e30f));
    CHECK(isnan(exp_vectorised(NAN)) && isnan(exp_nonpositive(NAN)) &&
              isnan(sigmoid_vectorised(NAN)) && isnan(silu_vectorised(NAN)),
          "a NaN argument must give NaN");
    CHECK(exp_vectorised(0.0f) == 1.0f && sigmoid_vectorised(0.0f) == 0.5f, "exp(0) %g sigmoid(0) %g",
          exp_vectorised(0.0f), sigmoid_vectorised(0.0f));
    return check_done("test_cpu_math");
}
