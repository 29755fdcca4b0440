/* cpu_math: the CPU backend's exponential, sigmoid and SiLU, written so that loops over
 * them vectorise (glibc's expf is a call per element; gcc turns these into SIMD code at
 * -O2). For cpu_ops.c, cpu_attention.c, cpu_ops_moe.c and cpu_router.c only: the CUDA
 * kernels keep their own expf (kernels/moe_math.h, dense_math.h).
 *
 * e^x: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to degree 6
 * (remainder < 1.3e-7 relative), 2^n built in the exponent bits. Maximum errors, measured
 * over every float of the range against double-precision libm (tests/test_cpu_math.c, run
 * with ESFT_EXHAUSTIVE=1 for every float, else every 61st):
 *   exp_nonpositive  x in [-87, 0]:            3.1e-7 relative (2.6 ulp)
 *   exp_vectorised   results >= FLT_MIN:       3.1e-7 relative (2.6 ulp); below, within
 *                    2 ulp of the subnormal spacing; +inf past ln(FLT_MAX), as expf
 *   sigmoid_vectorised  results >= FLT_MIN:    4.4e-7 relative (3.7 ulp)
 *   silu_vectorised     results >= FLT_MIN:    4.5e-7 relative (3.8 ulp)
 * (glibc's expf is correctly rounded to 0.5 ulp; torch's CPU sigmoid and SiLU, which the
 * golden fixtures come from, are vectorised approximations of their own.) A NaN argument
 * gives NaN: the exponent bits are formed in unsigned arithmetic, never by a float-to-int
 * conversion out of range. */
#ifndef ESFT_CPU_MATH_H
#define ESFT_CPU_MATH_H

#include <math.h>
#include <stdint.h>

/* e^r for |r| <= ln2/2 (Horner's form of the degree-6 Taylor polynomial), and the split of
 * x into n ln2 + r. */
static inline float exp_reduced(float r)
{
    return 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f +
                                                   r * (8.33333377e-3f + r * 1.38888892e-3f)))));
}

/* round(x / ln2) as a float n and as the bits of n + 1.5 * 2^23 (*bits - 0x4B400000 is n in
 * two's complement); returns r = x - n ln2 (ln 2 in two parts, so n * ln2 is exact). */
static inline float exp_split(float x, uint32_t *bits)
{
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    union {
        float f;
        uint32_t u;
    } shifted = {.f = x * 1.44269504088896341f + round};
    *bits = shifted.u;
    float n = shifted.f - round;
    float r = x - n * 0.693145751953125f;
    return r - n * 1.42860682030941723e-6f;
}

static inline float float_of_bits(uint32_t u)
{
    union {
        uint32_t u;
        float f;
    } v = {.u = u};
    return v.f;
}

/* e^x for x <= 0, the arguments of a softmax after its maximum is subtracted. Below -87
 * the result would leave the normal range: clamped there (e^-87 ~ 1.6e-38 counts as
 * nothing next to the row maximum's e^0 = 1). */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    uint32_t bits;
    float p = exp_reduced(exp_split(x, &bits));
    return p * float_of_bits((bits - 0x4B400000u + 127u) << 23); /* p * 2^n */
}

/* e^x for every x: 2^n applied as two normal powers of two, 2^(n/2) then 2^(n - n/2), so
 * results down to the subnormals (x >= -104, below which e^x rounds to 0) and up to
 * FLT_MAX come out with one rounding; past ln(FLT_MAX) it gives +inf. Equal to
 * exp_nonpositive bit for bit on [-87, 0]. */
static inline float exp_vectorised(float x)
{
    x = x < -104.0f ? -104.0f : x;
    x = x > 88.8f ? 88.8f : x; /* 88.8 rounds to n = 128, r ~ 0.077: 2^128 p overflows */
    uint32_t bits;
    float p = exp_reduced(exp_split(x, &bits));
    int32_t n = (int32_t)(bits - 0x4B400000u), half = n >> 1;
    float low = float_of_bits((uint32_t)(half + 127) << 23);
    float high = float_of_bits((uint32_t)(n - half + 127) << 23);
    return p * low * high;
}

/* 1 / (1 + e^-x) from t = e^-|x| <= 1 (no overflow): 1 / (1 + t) for x >= 0, t / (1 + t)
 * below. */
static inline float sigmoid_vectorised(float x)
{
    float t = exp_vectorised(x < 0.0f ? x : -x);
    float s = 1.0f / (1.0f + t);
    return x >= 0.0f ? s : t * s;
}

/* x sigmoid(x) */
static inline float silu_vectorised(float x) { return x * sigmoid_vectorised(x); }

/* Row reductions of the softmaxes, with eight running partial results so that gcc
 * vectorises them at -O2 (it does not reorder a single accumulator). The summation
 * order is fixed, so results are the same on every run (and for any thread count). The exponential sums accumulate
 * in double: over a real vocabulary (151936 terms, about 19k per lane) fp32 totals near
 * 1e3 drop every term below half their ulp, which left each row's sum about 1.8e-5 low
 * and biased the loss by as much (tests/test_cpu_ops.c holds this). The exponentials stay
 * fp32, as transformers' fp32 softmax forms them. */
enum { LANES = 8 };

static inline float row_max(const float *x, int n)
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
static inline float row_exp_sum(const float *x, int n, float max)
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
static inline float row_exp_store_sum(float *x, int n, float max)
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

#endif
