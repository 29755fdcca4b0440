/* dense_math: the element arithmetic of the dense kernels (kernels/dense.cu) and of the
 * optimizer kernels (kernels/optimizer.cu), written once and used by the CPU backend
 * (src/cpu_ops.c) and the CPU optimizer (src/optim.c) too. The CPU paths are checked
 * against transformers and torch (test_golden, test_grad, test_optim), so the formulas
 * the device kernels apply are the checked ones; only the reductions around them (sums
 * over a row, over rows) differ between the two, and test_device bounds that.
 *
 * Sums that decide a value bit for bit (a weight gradient over rows, the gradient norm)
 * are cut into fixed chunks of rows or elements whose size depends on nothing but the
 * constants below, never on the thread or block count: the device gives the same value
 * on every run and the CPU the same for any thread count. The two agree to rounding, not
 * bit for bit (nvcc fuses multiplies and adds; the CPU build does not). */
#ifndef ESFT_KERNELS_DENSE_MATH_H
#define ESFT_KERNELS_DENSE_MATH_H

#include <math.h>
#include <stddef.h>

#ifdef __CUDACC__
#define DENSE_HD __host__ __device__ static inline
#else
#define DENSE_HD static inline
#endif

/* Rows per partial sum of a column sum over rows (weight gradients of RMSNorm, biases):
 * partial sums per chunk of SUM_CHUNK rows in row order, then added in chunk order. */
enum { SUM_CHUNK = 256 };

/* Elements per partial sum of the squared-gradient sum (the clipping norm). */
enum { NORM_CHUNK = 4096 };

/* The squares of x[begin, end) in double (one NORM_CHUNK): eight running sums, element i
 * to sum (i - begin) mod 8, added in lane order, then the tail in element order. Eight
 * sums let the CPU's loop vectorise instead of waiting on one sum's every addition. */
DENSE_HD double norm_chunk_squares(const float *x, size_t begin, size_t end)
{
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sum = 0;
    size_t j = begin;
    for (; j + 8 <= end; j += 8)
        for (int k = 0; k < 8; k++) lane[k] += (double)x[j + k] * x[j + k];
    for (int k = 0; k < 8; k++) sum += lane[k];
    for (; j < end; j++) sum += (double)x[j] * x[j];
    return sum;
}

/* ---- RoPE: the rotate-half pair (a, b) = (x[i], x[i + rotary_dim/2]) ----------------- */

/* cos and sin of one pair: the angle in fp32 as transformers forms it, inv_freq (fp32)
 * times the position (fp32), both scaled by attention_scaling. */
DENSE_HD void rope_cos_sin(float *c, float *s, int position, float inv_freq,
                           float attention_scaling)
{
    float angle = (float)position * inv_freq;
    *c = cosf(angle) * attention_scaling;
    *s = sinf(angle) * attention_scaling;
}

/* Where pair i of a head's rotary dims sits: rotate-half (i, i + half), as transformers'
 * rotate_half; interleaved (2i, 2i+1), as deepseek_v2's complex multiply
 * (modeling_deepseek_v2.py apply_rotary_emb: view_as_complex of consecutive pairs). */
DENSE_HD void rope_pair_at(int interleaved, size_t i, int half, size_t *a, size_t *b)
{
    if (interleaved) {
        *a = 2 * i, *b = 2 * i + 1;
    } else {
        *a = i, *b = i + (size_t)half;
    }
}

/* The device kernel's thread i of N * n_heads * half: its head row (token * n_heads +
 * head, the row of x[N * n_heads, Dh]), its pair and its token. */
DENSE_HD void rope_pair_of(size_t i, int half, int n_heads, size_t *row, size_t *pair,
                           size_t *token)
{
    *pair = i % (size_t)half;
    *row = i / (size_t)half;
    *token = *row / (size_t)n_heads;
}

/* Forward: (a, b) -> (a c - b s, b c + a s). */
DENSE_HD void rope_rotate(float *a, float *b, float c, float s)
{
    float x = *a, y = *b;
    *a = x * c - y * s;
    *b = y * c + x * s;
}

/* Backward, the transpose: (da, db) -> (da c + db s, db c - da s). */
DENSE_HD void rope_rotate_transpose(float *da, float *db, float c, float s)
{
    float x = *da, y = *db;
    *da = x * c + y * s;
    *db = y * c - x * s;
}

/* ---- RMSNorm: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) ------------------------- */

/* r from the row's sum of squares over D elements. */
DENSE_HD float rmsnorm_rstd(float sum_squares, int D, float eps)
{
    return 1.0f / sqrtf(sum_squares / (float)D + eps);
}

/* transformers' order: weight * (x * rsqrt(var + eps)), the product formed first. */
DENSE_HD float rmsnorm_out(float x, float w, float r) { return w * (x * r); }

/* With xhat = x r and mean = mean over the row of dy w xhat: dx = r (dy w - xhat mean). */
DENSE_HD float rmsnorm_dx(float dy, float x, float w, float r, float mean)
{
    return r * (dy * w - (x * r) * mean);
}

/* One row's term of the weight gradient: dy * xhat. */
DENSE_HD float rmsnorm_dw_term(float dy, float x, float r) { return dy * (x * r); }

/* ---- AdamW, in torch.optim.AdamW's order (see src/optim.h) --------------------------- */

struct adamw_coef {
    float decay;        /* 1 - lr * weight_decay */
    float b1, one_minus_b1, b2, one_minus_b2, eps;
    float step_size;    /* lr / (1 - b1^t) */
    float bias2_sqrt;   /* sqrt(1 - b2^t) */
    float grad_scale;   /* the gradient's factor (clipping); 1: none (g * 1 is g exactly) */
};

/* The step's coefficients for step t (1-based), formed in double as torch forms them:
 * in float, 1 - 0.999f is off by 1.3e-5. Host only. */
static inline struct adamw_coef adamw_coefficients(double lr, double beta1, double beta2,
                                                   double eps, double weight_decay,
                                                   long long t)
{
    struct adamw_coef c;
    c.decay = (float)(1.0 - lr * weight_decay);
    c.b1 = (float)beta1;
    c.one_minus_b1 = (float)(1.0 - beta1);
    c.b2 = (float)beta2;
    c.one_minus_b2 = (float)(1.0 - beta2);
    c.eps = (float)eps;
    c.step_size = (float)(lr / (1.0 - pow(beta1, (double)t)));
    c.bias2_sqrt = (float)sqrt(1.0 - pow(beta2, (double)t));
    c.grad_scale = 1.0f;
    return c;
}

/* One element, g first scaled by grad_scale (in float, as a separate clipping pass
 * would): p *= decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
 * p -= step_size m / (sqrt(v) / sqrt(1 - b2^t) + eps). */
DENSE_HD void adamw_update(float *p, float *m, float *v, float g, const struct adamw_coef *c)
{
    g *= c->grad_scale;
    float data = *p * c->decay;
    float mt = c->b1 * *m + c->one_minus_b1 * g;
    float vt = c->b2 * *v + c->one_minus_b2 * g * g;
    float denom = sqrtf(vt) / c->bias2_sqrt + c->eps;
    *m = mt;
    *v = vt;
    *p = data - c->step_size * mt / denom;
}

/* ---- cross-entropy ------------------------------------------------------------------- */

/* One row's loss from its max, its sum of exp(z - max) (fp32, as transformers' fp32
 * log_softmax) and the label's logit; the log in double. */
DENSE_HD double cross_entropy_row(float max, float sum, float label_logit)
{
    return log((double)sum) + max - label_logit;
}

/* The gradient of one logit from e = exp(z - max) (each backend's own exp): scale *
 * (e / sum - [v == label]), in the CPU backend's order: e times factor = scale / sum,
 * then the label's minus scale. */
DENSE_HD float cross_entropy_dlogit(float e, float factor, int is_label, float scale)
{
    float g = e * factor;
    return is_label ? g - scale : g;
}

#endif
