/* cpu_math: the CPU backend's exponential, sigmoid and SiLU in SIMD form, and the row
 * loops built on them. For cpu_ops.c, cpu_attention.c and cpu_router.c only: the CUDA
 * kernels keep their own expf (kernels/moe_math.h, dense_math.h).
 *
 * The functions are written on GCC's generic vectors of VLANES floats (vector_size; clang
 * reads them too):
 * gcc 12 at -O2 vectorises no loop over a scalar exponential (the clamps' selects are
 * "control flow in loop" to it, the bit casts "no vectype"), so the loops would run one
 * libm-free element at a time. A scalar call takes lane 0 of the vector form, so a row's
 * tail gives the bits its body would.
 *
 * e^x: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to degree 6
 * (remainder < 1.3e-7 relative), 2^n built in the exponent bits. Maximum errors against
 * double-precision libm over every float of the range (tests/test_cpu_math.c; every float
 * with ESFT_EXHAUSTIVE=1, else every 2003rd), in ulp of the result's float (measured on
 * all 7.8e9 arguments, 2026-11-26):
 *   exp_nonpositive     x in [-87, 0]                    3.01 ulp (2.5e-7 relative)
 *   exp_vectorised      x in [-112, 89], normal results   3.02 ulp (2.6e-7)
 *   sigmoid_vectorised  x in [-112, 104], normal results  4.08 ulp (3.5e-7)
 *   silu_vectorised     x in [-112, 104], normal results  5.48 ulp (3.9e-7)
 * and subnormal results within 1.71 x 2^-149, the subnormal spacing. (glibc's
 * expf is correctly rounded, 0.5 ulp; torch's CPU sigmoid and SiLU, which the golden
 * fixtures come from, are vectorised approximations of their own.) A NaN argument gives
 * NaN: the exponent bits are formed in unsigned arithmetic, never by a float-to-int
 * conversion out of range. */
#ifndef ESFT_CPU_MATH_H
#define ESFT_CPU_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* VLANES floats per vector: 16 bytes, one SSE register, the x86-64 baseline (and NEON's
 * width); 32-byte vectors without -mavx change the ABI of the non-inlined helpers. LANES:
 * the row reductions' partial results, two vectors. */
enum { VLANES = 4, LANES = 8 };
typedef float vfloat __attribute__((vector_size(VLANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(VLANES * sizeof(float))));
typedef uint32_t vuint __attribute__((vector_size(VLANES * sizeof(float))));

static inline vfloat vsplat(float c) { return (vfloat){c, c, c, c}; }
static inline vfloat vload(const float *p)
{
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, vfloat v) { memcpy(p, &v, sizeof v); }
/* a where mask (all ones), else b */
static inline vfloat vselect(vint mask, vfloat a, vfloat b)
{
    return (vfloat)((mask & (vint)a) | (~mask & (vint)b));
}

/* e^r for |r| <= ln2/2 (Horner's form of the degree-6 Taylor polynomial) */
static inline vfloat exp_reduced(vfloat r)
{
    return 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f +
                                                   r * (8.33333377e-3f + r * 1.38888892e-3f)))));
}

/* x = n ln2 + r: returns r (ln 2 in two parts, so n * ln2 is exact) and, in *bits, the
 * bits of n + 1.5 * 2^23, whose low mantissa bits hold n (*bits - 0x4B400000 is n in two's
 * complement). */
static inline vfloat exp_split(vfloat x, vuint *bits)
{
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    vfloat shifted = x * 1.44269504088896341f + round;
    *bits = (vuint)shifted;
    vfloat n = shifted - round;
    vfloat r = x - n * 0.693145751953125f;
    return r - n * 1.42860682030941723e-6f;
}

/* e^x for x <= 0, the arguments of a softmax after its maximum is subtracted. Below -87
 * the result would leave the normal range: clamped there (e^-87 ~ 1.6e-38 counts as
 * nothing next to the row maximum's e^0 = 1). */
static inline vfloat vexp_nonpositive(vfloat x)
{
    x = vselect(x < -87.0f, vsplat(-87.0f), x);
    vuint bits;
    vfloat p = exp_reduced(exp_split(x, &bits));
    return p * (vfloat)((bits - 0x4B400000u + 127u) << 23); /* p * 2^n */
}

/* e^x for every x as p 2^a 2^b, two normal powers of two (a = n/2, b = n - n/2), so that a
 * product with e^x rounds once even where it is subnormal (SiLU's x e^x reaches the
 * subnormals down to x ~ -110). Below -112, p = 0: e^x times any float is 0 there. Above,
 * x <= 88.8, which rounds to n = 128, r ~ 0.077: 2^128 p overflows to +inf as expf past
 * ln(FLT_MAX). */
struct exp_parts {
    vfloat p, low, high;
};

static inline struct exp_parts exp_parts(vfloat x)
{
    vfloat clamped = vselect(x < -112.0f, vsplat(-112.0f), x);
    clamped = vselect(clamped > 88.8f, vsplat(88.8f), clamped);
    vuint bits;
    struct exp_parts e = {.p = exp_reduced(exp_split(clamped, &bits))};
    e.p = vselect(x < -112.0f, vsplat(0.0f), e.p);
    vint n = (vint)(bits - 0x4B400000u), half = n >> 1;
    e.low = (vfloat)((half + 127) << 23);
    e.high = (vfloat)((n - half + 127) << 23);
    return e;
}

/* e^x for every x; equal to exp_nonpositive bit for bit on [-87, 0]. */
static inline vfloat vexp(vfloat x)
{
    struct exp_parts e = exp_parts(x);
    return e.p * e.low * e.high;
}

/* 1 / (1 + e^-x) from t = e^-|x| <= 1 (no overflow): s = 1 / (1 + t) for x >= 0, t s
 * below, formed as s p 2^a 2^b so that a subnormal result rounds once. */
static inline vfloat vsigmoid(vfloat x)
{
    struct exp_parts e = exp_parts(vselect(x < 0.0f, x, -x));
    vfloat s = 1.0f / (1.0f + e.p * e.low * e.high);
    return vselect(x >= 0.0f, s, s * e.p * e.low * e.high);
}

/* x sigmoid(x), the product with x taken before the last powers of two (as the sigmoid's) */
static inline vfloat vsilu(vfloat x)
{
    struct exp_parts e = exp_parts(vselect(x < 0.0f, x, -x));
    vfloat s = 1.0f / (1.0f + e.p * e.low * e.high), above = x * s;
    return vselect(x >= 0.0f, above, above * e.p * e.low * e.high);
}

/* The scalar forms: lane 0 of the vector ones, so the same bits. */
static inline float exp_nonpositive(float x) { return vexp_nonpositive(vsplat(x))[0]; }
static inline float exp_vectorised(float x) { return vexp(vsplat(x))[0]; }
static inline float sigmoid_vectorised(float x) { return vsigmoid(vsplat(x))[0]; }
static inline float silu_vectorised(float x) { return vsilu(vsplat(x))[0]; }

/* The first n < VLANES floats at p as a vector (the rest 0), and back. */
static inline vfloat vload_part(const float *p, int n)
{
    vfloat v = {0};
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}
static inline void vstore_part(float *p, vfloat v, int n) { memcpy(p, &v, (size_t)n * sizeof(float)); }

/* y[i] = e^(x[i] - shift) * factor for shift >= every x[i]; y may be x. */
static inline void exp_shifted_scaled(float *y, const float *x, int n, float shift, float factor)
{
    int i = 0;
    for (; i + VLANES <= n; i += VLANES)
        vstore(y + i, vexp_nonpositive(vload(x + i) - shift) * factor);
    if (i < n) vstore_part(y + i, vexp_nonpositive(vload_part(x + i, n - i) - shift) * factor, n - i);
}

/* s[i] = sigmoid(z[i]) */
static inline void sigmoid_row(float *s, const float *z, int n)
{
    int i = 0;
    for (; i + VLANES <= n; i += VLANES) vstore(s + i, vsigmoid(vload(z + i)));
    if (i < n) vstore_part(s + i, vsigmoid(vload_part(z + i, n - i)), n - i);
}

/* x[i] *= factor (gcc 12's -O2 vectorises no loop whose length is not a multiple of the
 * vector's: its "very cheap" cost model refuses the epilogue) */
static inline void scale_row(float *x, size_t n, float factor)
{
    size_t i = 0;
    for (; i + VLANES <= n; i += VLANES) vstore(x + i, vload(x + i) * factor);
    if (i < n) vstore_part(x + i, vload_part(x + i, (int)(n - i)) * factor, (int)(n - i));
}

/* Row reductions of the softmaxes, with LANES running partial results so that gcc
 * vectorises the max at -O2 (it does not reorder a single accumulator), the exponentials
 * a vector at a time. The summation
 * order is fixed, so results are the same on every run (and for any thread count). The exponential sums accumulate
 * in double: over a real vocabulary (151936 terms, about 19k per lane) fp32 totals near
 * 1e3 drop every term below half their ulp, which left each row's sum about 1.8e-5 low
 * and biased the loss by as much (tests/test_cpu_ops.c holds this). The exponentials stay
 * fp32, as transformers' fp32 softmax forms them. */

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
    for (; i + LANES <= n; i += LANES) {
        vfloat low = vexp_nonpositive(vload(x + i) - max);
        vfloat high = vexp_nonpositive(vload(x + i + VLANES) - max);
        for (int l = 0; l < VLANES; l++) lane[l] += low[l], lane[l + VLANES] += high[l];
    }
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
    for (; i + LANES <= n; i += LANES) {
        vfloat low = vexp_nonpositive(vload(x + i) - max);
        vfloat high = vexp_nonpositive(vload(x + i + VLANES) - max);
        vstore(x + i, low), vstore(x + i + VLANES, high);
        for (int l = 0; l < VLANES; l++) lane[l] += low[l], lane[l + VLANES] += high[l];
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
