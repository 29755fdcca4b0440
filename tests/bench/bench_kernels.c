/* bench_kernels: what the GPU kernels and cuBLAS calls of the CUDA backend cost on one
 * Qwen3-30B-A3B-shaped layer (hidden 2048, 128 experts top-8 of width 768, 32 query and 4
 * KV heads of 128), 4 samples of 4096 tokens = 16384 tokens; the figures that size the
 * review's S1-S4 and M6 (shared/reference/cuda-review.md) and issue 20's items 4 and 7.
 *
 * Usage: bench_kernels [--sections ceilings,sync,dense,experts,attention,lmhead]
 *                      [--warmup 2] [--iters 10] [--budget-ms 1500] [--seed 1]
 *
 * Sections, in the order they run:
 *   ceilings  the two measured ceilings every other line is compared with: a 4 GiB
 *             device-to-device copy (bytes read + written) and an 8192^3 bf16 cuBLAS GEMM
 *             (bf16 in and out, fp32 accumulation), plus the same GEMM with fp32 output;
 *   sync      one cudaDeviceSynchronize on an idle device, one tiny kernel + sync, one
 *             516-byte device-to-host copy (the offsets read per grouped GEMM): S3;
 *   dense     y[16384,4096] = x[16384,2048] w^T through gemm_linear in fp32 (CUDA-core
 *             SGEMM, what the backend runs today), tf32 and bf16 operands: S1;
 *   experts   gate, up and down projections over 131072 token-slots routed with a skewed
 *             draw (two experts get no rows): the per-expert loop (gemm_grouped_linear)
 *             against one cublasGemmGroupedBatchedEx (gemm_grouped_linear_batched) and
 *             against one dense GEMM of the same FLOPs, forward and backward (dx + dw),
 *             fp32 and bf16 operands; grouped results are compared with the loop's: S4;
 *   attention attention_forward and attention_backward on 4 causal samples of 4096: S2;
 *             then the same through cuBLAS with TF32 products (attention_gemm.cu) and
 *             through the tiled bf16 kernels (attention_flash.cu), whose results are
 *             compared with cuBLAS's (relative L2 error, 2e-2 at most);
 *   lmhead    the LM head y[16384,151936] (2.49e9 fp32 logits, more than 2^31) with bf16
 *             and fp32 operands, 3 rows (the first, the first wholly past 2^31 elements,
 *             the last) checked against a double-precision host product, then the fused
 *             cross-entropy over it, read-only and in place: M6.
 *
 * Timing: CUDA events around each call on the default stream; `warmup` untimed calls,
 * then up to `iters` timed ones, fewer (at least 3) once `budget-ms` of timed work is
 * spent; the median is printed. Inputs are random (never zeros), outputs are poisoned
 * with NaN before every compared run. FLOPs: 2 per multiply-add; causal attention counts
 * the keys each query sees (L(L+1)/2 per sample and head), the backward as 2.5x the
 * forward (five products of the score shape against the forward's two, FlashAttention's
 * convention; the kernel's extra log-sum-exp pass is not credited). The table at the end
 * gives each line's share of the measured ceiling of its kind (the bf16 GEMM for FLOP
 * rates, the copy for bandwidth).
 *
 * Exits 0 with "skipped: no device" where no CUDA device is visible, 1 on any CUDA or
 * cuBLAS error and on any failed comparison. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"

#ifndef HAVE_CUDA
int main(void)
{
    printf("skipped: no device (built without CUDA)\n");
    return 0;
}
#else

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "attention.h"
#include "attention_flash.h"
#include "dense.h"
#include "device.h"
#include "gemm.h"

/* ---- the shape ------------------------------------------------------------------- */
enum {
    HIDDEN = 2048,
    EXPERTS = 128,
    TOP_K = 8,
    EXPERT_WIDTH = 768,
    HEADS = 32,
    KV_HEADS = 4,
    HEAD_DIM = 128,
    SAMPLES = 4,
    SEQ = 4096,
    TOKENS = SAMPLES * SEQ,
    SLOTS = TOKENS * TOP_K,
    VOCAB = 151936,
    DENSE_OUT = 4096,
};

/* ---- errors ---------------------------------------------------------------------- */
static char err[1024];

static void fail(const char *what)
{
    fprintf(stderr, "bench_kernels: FAILED: %s\n", what);
    exit(1);
}

#define check_cuda(call)                                                                           \
    do {                                                                                           \
        cudaError_t status_ = (call);                                                              \
        if (status_ != cudaSuccess) {                                                              \
            snprintf(err, sizeof err, "%s:%d: %s: %s", __FILE__, __LINE__, #call,                  \
                     cudaGetErrorString(status_));                                                 \
            fail(err);                                                                             \
        }                                                                                          \
    } while (0)

#define check_cublas(call)                                                                         \
    do {                                                                                           \
        cublasStatus_t status_ = (call);                                                           \
        if (status_ != CUBLAS_STATUS_SUCCESS) {                                                    \
            snprintf(err, sizeof err, "%s:%d: %s: %s", __FILE__, __LINE__, #call,                  \
                     cublasGetStatusName(status_));                                                \
            fail(err);                                                                             \
        }                                                                                          \
    } while (0)

/* the kernels' launchers return -1 with the reason in err */
#define check_op(call)                                                                             \
    do {                                                                                           \
        if ((call) != 0) fail(err);                                                                \
    } while (0)

/* ---- options and the result table ------------------------------------------------ */
static int opt_warmup = 2, opt_iters = 10;
static double opt_budget_ms = 1500;
static uint64_t opt_seed = 1;
static const char *opt_sections = "ceilings,sync,dense,experts,attention,lmhead";

static int section_on(const char *name)
{
    size_t n = strlen(name);
    for (const char *s = opt_sections; (s = strstr(s, name)) != NULL; s += n)
        if ((s == opt_sections || s[-1] == ',') && (s[n] == ',' || s[n] == '\0')) return 1;
    return 0;
}

enum unit { FLOPS, BYTES, LATENCY };
struct result {
    char name[64];
    double ms;
    double rate; /* TFLOP/s or GB/s; 0 for a latency */
    enum unit unit;
    char note[96];
};
static struct result results[96];
static int n_results;
static double ceiling_tflops, ceiling_gbs; /* measured; 0 until the ceilings ran */

static void record(const char *name, double ms, double work, enum unit unit, const char *note)
{
    if (n_results == (int)(sizeof results / sizeof *results)) fail("too many result lines");
    struct result *r = &results[n_results++];
    snprintf(r->name, sizeof r->name, "%s", name);
    r->ms = ms;
    r->unit = unit;
    r->rate = unit == FLOPS   ? work / (ms * 1e-3) / 1e12
              : unit == BYTES ? work / (ms * 1e-3) / 1e9
                              : 0;
    snprintf(r->note, sizeof r->note, "%s", note ? note : "");
    if (unit == LATENCY)
        printf("  %-34s %10.4f ms  %s\n", name, ms, r->note);
    else
        printf("  %-34s %10.3f ms %9.1f %-7s %s\n", name, ms, r->rate,
               unit == FLOPS ? "TFLOP/s" : "GB/s", r->note);
    fflush(stdout);
}

static void print_table(void)
{
    printf("\n%-36s %11s %10s %-8s %8s  %s\n", "name", "ms", "rate", "unit", "% ceil", "note");
    for (int i = 0; i < n_results; i++) {
        struct result *r = &results[i];
        double ceiling = r->unit == FLOPS ? ceiling_tflops : r->unit == BYTES ? ceiling_gbs : 0;
        char share[16] = "-";
        if (ceiling > 0) snprintf(share, sizeof share, "%.1f", 100.0 * r->rate / ceiling);
        if (r->unit == LATENCY)
            printf("%-36s %11.4f %10s %-8s %8s  %s\n", r->name, r->ms, "-", "-", "-", r->note);
        else
            printf("%-36s %11.3f %10.1f %-8s %8s  %s\n", r->name, r->ms, r->rate,
                   r->unit == FLOPS ? "TFLOP/s" : "GB/s", share, r->note);
    }
    printf("ceilings (measured): %.1f TFLOP/s (8192^3 bf16 cuBLAS GEMM), %.1f GB/s "
           "(device-to-device copy, read + write)\n",
           ceiling_tflops, ceiling_gbs);
}

/* ---- timing ---------------------------------------------------------------------- */
typedef void (*work_fn)(void *arg);

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, compare_doubles);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Median milliseconds of fn(arg) by CUDA events on the default stream. */
static double time_ms(work_fn fn, void *arg)
{
    cudaEvent_t start, stop;
    check_cuda(cudaEventCreate(&start));
    check_cuda(cudaEventCreate(&stop));
    for (int i = 0; i < opt_warmup; i++) fn(arg);
    check_cuda(cudaDeviceSynchronize());
    double times[1000], spent = 0;
    int n = 0, iters = opt_iters < 1000 ? opt_iters : 1000;
    while (n < iters && (n < 3 || spent < opt_budget_ms)) {
        check_cuda(cudaEventRecord(start, 0));
        fn(arg);
        check_cuda(cudaEventRecord(stop, 0));
        check_cuda(cudaEventSynchronize(stop));
        check_cuda(cudaGetLastError());
        float ms = 0;
        check_cuda(cudaEventElapsedTime(&ms, start, stop));
        times[n++] = ms;
        spent += ms;
    }
    check_cuda(cudaEventDestroy(start));
    check_cuda(cudaEventDestroy(stop));
    return median(times, n);
}

static double host_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- data ------------------------------------------------------------------------ */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *state)
{
    return (double)(splitmix64(state) >> 11) * 0x1.0p-53;
}

static double gaussian(uint64_t *state)
{
    double u = uniform01(state), v = uniform01(state);
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* bf16 by round-to-nearest-even of the fp32 bits (the inputs are finite) */
static uint16_t bf16_of(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static float float_of_bf16(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}

static size_t device_bytes_now, device_bytes_peak;

static void *dev_alloc(size_t bytes)
{
    void *p = NULL;
    check_cuda(cudaMalloc(&p, bytes));
    device_bytes_now += bytes;
    if (device_bytes_now > device_bytes_peak) device_bytes_peak = device_bytes_now;
    return p;
}

static void dev_free(void *p, size_t bytes)
{
    check_cuda(cudaFree(p));
    device_bytes_now -= bytes;
}

/* A device tensor of n random values, uniform in [-scale, scale), in fp32 and in bf16
 * (the bf16 copy is the fp32 values rounded; the fp32 copy keeps the unrounded values).
 * host: when not NULL, gets the host fp32 values rounded through bf16 (for references). */
struct tensor {
    size_t n;
    float *f32;
    uint16_t *bf16;
};

static struct tensor random_tensor(size_t n, float scale, uint64_t seed, float **host_rounded)
{
    struct tensor t = {n, NULL, NULL};
    float *h = malloc(n * sizeof *h);
    uint16_t *hb = malloc(n * sizeof *hb);
    if (!h || !hb) fail("out of host memory");
    uint64_t state = seed * 0x2545F4914F6CDD1DULL + opt_seed;
    for (size_t i = 0; i < n; i++) {
        h[i] = (float)((2.0 * uniform01(&state) - 1.0) * scale);
        hb[i] = bf16_of(h[i]);
    }
    t.f32 = dev_alloc(n * sizeof(float));
    t.bf16 = dev_alloc(n * sizeof(uint16_t));
    check_cuda(cudaMemcpy(t.f32, h, n * sizeof(float), cudaMemcpyHostToDevice));
    check_cuda(cudaMemcpy(t.bf16, hb, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    if (host_rounded) {
        for (size_t i = 0; i < n; i++) h[i] = float_of_bf16(hb[i]);
        *host_rounded = h;
    } else {
        free(h);
    }
    free(hb);
    return t;
}

static void tensor_free(struct tensor *t)
{
    dev_free(t->f32, t->n * sizeof(float));
    dev_free(t->bf16, t->n * sizeof(uint16_t));
}

static void poison(void *p, size_t bytes)
{
    check_cuda(cudaMemset(p, 0xFF, bytes)); /* NaN */
}

/* Downloads n fp32 or bf16 values as float. */
static float *download(const void *p, size_t n, int bf16)
{
    float *h = malloc(n * sizeof *h);
    if (!h) fail("out of host memory");
    if (bf16) {
        uint16_t *b = malloc(n * sizeof *b);
        if (!b) fail("out of host memory");
        check_cuda(cudaMemcpy(b, p, n * sizeof *b, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; i++) h[i] = float_of_bf16(b[i]);
        free(b);
    } else {
        check_cuda(cudaMemcpy(h, p, n * sizeof *h, cudaMemcpyDeviceToHost));
    }
    return h;
}

static int failures;

/* Compares got with ref (n values on the device): the largest |got - ref| over the
 * largest |ref|, and the normwise ||got - ref|| / ||ref||; a NaN (an unwritten element)
 * fails whatever the tolerance. */
static void compare(const char *what, const void *got, int got_bf16, const void *ref, int ref_bf16,
                    size_t n, double tolerance)
{
    float *g = download(got, n, got_bf16), *r = download(ref, n, ref_bf16);
    double max_diff = 0, max_ref = 0, diff2 = 0, ref2 = 0;
    size_t nan = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(g[i]) || !isfinite(r[i])) {
            nan++;
            continue;
        }
        double d = fabs((double)g[i] - r[i]);
        if (d > max_diff) max_diff = d;
        if (fabs(r[i]) > max_ref) max_ref = fabs(r[i]);
        diff2 += d * d, ref2 += (double)r[i] * r[i];
    }
    double max_rel = max_ref > 0 ? max_diff / max_ref : max_diff;
    double norm_rel = ref2 > 0 ? sqrt(diff2 / ref2) : sqrt(diff2);
    int ok = nan == 0 && max_rel <= tolerance;
    printf("  check %-40s max|d|/max|ref| %.3g, ||d||/||ref|| %.3g, non-finite %zu, "
           "tolerance %.0e: %s\n",
           what, max_rel, norm_rel, nan, tolerance, ok ? "ok" : "FAILED");
    if (!ok) failures++;
    free(g);
    free(r);
}

/* ---- ceilings -------------------------------------------------------------------- */
struct copy_arg {
    void *dst, *src;
    size_t bytes;
};
static void run_copy(void *a)
{
    struct copy_arg *c = a;
    check_cuda(cudaMemcpyAsync(c->dst, c->src, c->bytes, cudaMemcpyDeviceToDevice, 0));
}

struct cublas_arg {
    cublasHandle_t handle;
    int m, n, k;
    const void *a, *b;
    void *c;
    cudaDataType_t ab_type, c_type;
    cublasComputeType_t compute;
    int trans_a; /* the row-major x w^T layout of gemm_math.h: A = w used transposed */
};
static void run_cublas(void *p)
{
    struct cublas_arg *g = p;
    const float one = 1.0f, zero = 0.0f;
    check_cublas(cublasGemmEx(g->handle, g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, g->m,
                              g->n, g->k, &one, g->a, g->ab_type, g->trans_a ? g->k : g->m, g->b,
                              g->ab_type, g->k, &zero, g->c, g->c_type, g->m, g->compute,
                              CUBLAS_GEMM_DEFAULT));
}

static void bench_ceilings(cublasHandle_t handle)
{
    printf("ceilings\n");
    size_t bytes = (size_t)4 << 30;
    struct copy_arg c = {dev_alloc(bytes), dev_alloc(bytes), bytes};
    check_cuda(cudaMemset(c.src, 0x3C, bytes));
    double ms = time_ms(run_copy, &c);
    record("copy d2d 4 GiB", ms, 2.0 * bytes, BYTES, "read + write");
    ceiling_gbs = results[n_results - 1].rate;
    dev_free(c.dst, bytes), dev_free(c.src, bytes);

    const int n = 8192;
    struct tensor a = random_tensor((size_t)n * n, 1.0f, 101, NULL);
    struct tensor b = random_tensor((size_t)n * n, 1.0f, 102, NULL);
    void *cmat = dev_alloc((size_t)n * n * sizeof(float));
    struct cublas_arg g = {
        handle, n, n, n, a.bf16, b.bf16, cmat, CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, 1};
    double flops = 2.0 * n * (double)n * n;
    ms = time_ms(run_cublas, &g);
    record("gemm 8192^3 bf16 -> bf16", ms, flops, FLOPS, "ceiling");
    ceiling_tflops = results[n_results - 1].rate;
    g.c_type = CUDA_R_32F;
    record("gemm 8192^3 bf16 -> fp32", time_ms(run_cublas, &g), flops, FLOPS, "");
    dev_free(cmat, (size_t)n * n * sizeof(float));
    tensor_free(&a), tensor_free(&b);
}

/* ---- sync cost (S3) -------------------------------------------------------------- */
static void bench_sync(void)
{
    printf("host synchronisation (host clock, median of 1000)\n");
    enum { REPS = 1000 };
    static double t[REPS];
    float *one = dev_alloc(sizeof(float));
    int32_t *offsets = dev_alloc((EXPERTS + 1) * sizeof(int32_t));
    int32_t host_offsets[EXPERTS + 1];
    check_cuda(cudaMemset(offsets, 0, (EXPERTS + 1) * sizeof(int32_t)));
    check_cuda(cudaDeviceSynchronize());
    for (int i = 0; i < REPS; i++) {
        double t0 = host_seconds();
        check_cuda(cudaDeviceSynchronize());
        t[i] = host_seconds() - t0;
    }
    record("cudaDeviceSynchronize, idle", 1e3 * median(t, REPS), 0, LATENCY, "");
    for (int i = 0; i < REPS; i++) {
        double t0 = host_seconds();
        check_op(device_fill_f32(one, 1, 1.0f, err, sizeof err));
        check_cuda(cudaDeviceSynchronize());
        t[i] = host_seconds() - t0;
    }
    char note[96];
    double ms = 1e3 * median(t, REPS);
    snprintf(note, sizeof note, "x 3.4k ops/step = %.0f ms/step", ms * 3400);
    record("tiny kernel + cudaDeviceSynchronize", ms, 0, LATENCY, note);
    for (int i = 0; i < REPS; i++) {
        double t0 = host_seconds();
        check_cuda(cudaMemcpy(host_offsets, offsets, sizeof host_offsets, cudaMemcpyDeviceToHost));
        t[i] = host_seconds() - t0;
    }
    ms = 1e3 * median(t, REPS);
    snprintf(note, sizeof note, "expert offsets; x 288/step = %.1f ms/step", ms * 288);
    record("d2h copy 516 B", ms, 0, LATENCY, note);
    dev_free(one, sizeof(float));
    dev_free(offsets, (EXPERTS + 1) * sizeof(int32_t));
}

/* ---- dense GEMM (S1) ------------------------------------------------------------- */
struct linear_arg {
    struct gemm_context *ctx;
    float *y;
    const void *x, *w;
    int N, I, O;
    enum gemm_type type;
};
static void run_linear(void *p)
{
    struct linear_arg *l = p;
    check_op(
        gemm_linear(l->ctx, l->y, l->x, l->w, NULL, l->N, l->I, l->O, 0, l->type, err, sizeof err));
}

static void bench_dense(struct gemm_context *ctx, cublasHandle_t handle)
{
    printf("dense GEMM y[%d,%d] = x[%d,%d] w^T\n", TOKENS, DENSE_OUT, TOKENS, HIDDEN);
    struct tensor x = random_tensor((size_t)TOKENS * HIDDEN, 1.0f, 201, NULL);
    struct tensor w = random_tensor((size_t)DENSE_OUT * HIDDEN, 0.03f, 202, NULL);
    size_t ybytes = (size_t)TOKENS * DENSE_OUT * sizeof(float);
    float *y = dev_alloc(ybytes), *y_tf32 = dev_alloc(ybytes);
    double flops = 2.0 * TOKENS * (double)HIDDEN * DENSE_OUT;
    struct linear_arg l = {ctx, y, x.f32, w.f32, TOKENS, HIDDEN, DENSE_OUT, GEMM_F32};
    record("dense fp32 (gemm_linear)", time_ms(run_linear, &l), flops, FLOPS, "CUBLAS_COMPUTE_32F");
    struct cublas_arg g = {handle, DENSE_OUT, TOKENS,     HIDDEN,     w.f32,
                           x.f32,  y_tf32,    CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32,
                           1};
    record("dense tf32", time_ms(run_cublas, &g), flops, FLOPS, "COMPUTE_32F_FAST_TF32");
    compare("dense tf32 vs fp32", y_tf32, 0, y, 0, (size_t)TOKENS * DENSE_OUT, 1e-2);
    l.x = x.bf16, l.w = w.bf16, l.type = GEMM_BF16, l.y = y_tf32;
    record("dense bf16 (gemm_linear)", time_ms(run_linear, &l), flops, FLOPS, "fp32 out");
    compare("dense bf16 vs fp32", y_tf32, 0, y, 0, (size_t)TOKENS * DENSE_OUT, 3e-2);
    dev_free(y, ybytes), dev_free(y_tf32, ybytes);
    tensor_free(&x), tensor_free(&w);
}

/* ---- expert GEMMs (S4) ----------------------------------------------------------- */
/* Tokens per expert for SLOTS token-slots: expert popularity exp(0.6 g), g standard
 * normal (the busiest expert gets about 3x the mean, as trained routers do), and two
 * experts that no token picks, so the empty-expert path runs. */
static void draw_routing(int32_t *offsets)
{
    double weight[EXPERTS], cumulative[EXPERTS], total = 0;
    uint64_t state = 0xE5F7ULL + opt_seed;
    for (int e = 0; e < EXPERTS; e++) {
        weight[e] = (e == 5 || e == 77) ? 0 : exp(0.6 * gaussian(&state));
        total += weight[e];
        cumulative[e] = total;
    }
    int count[EXPERTS] = {0};
    for (int s = 0; s < SLOTS; s++) {
        double u = uniform01(&state) * total;
        int lo = 0, hi = EXPERTS - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (cumulative[mid] > u)
                hi = mid;
            else
                lo = mid + 1;
        }
        while (weight[lo] == 0) lo = (lo + 1) % EXPERTS;
        count[lo]++;
    }
    offsets[0] = 0;
    int lo_count = SLOTS, hi_count = 0;
    for (int e = 0; e < EXPERTS; e++) {
        offsets[e + 1] = offsets[e] + count[e];
        if (count[e] < lo_count) lo_count = count[e];
        if (count[e] > hi_count) hi_count = count[e];
    }
    printf("  routing: %d slots over %d experts, rows per expert min %d, mean %d, max %d\n", SLOTS,
           EXPERTS, lo_count, SLOTS / EXPERTS, hi_count);
}

enum expert_variant { LOOP, GROUPED, GROUPED_BF16_OUT, DENSE_SAME_FLOPS };

struct experts_arg {
    struct gemm_context *ctx;
    enum expert_variant variant;
    enum gemm_type type;
    const int32_t *offsets; /* host */
    const void *xs, *h;     /* [SLOTS, HIDDEN], [SLOTS, EXPERT_WIDTH] in `type` */
    const void *w_gate, *w_up, *w_down;
    void *y_gate, *y_up, *y_down; /* fp32, or bf16 for GROUPED_BF16_OUT */
    /* backward */
    const void *dy_gate, *dy_down;
    float *dx_gate, *dx_down;
    float **dw_gate, **dw_up, **dw_down; /* host arrays of EXPERTS device pointers */
    float *dw_dense_gate, *dw_dense_down;
};

static void run_experts_forward(void *p)
{
    struct experts_arg *a = p;
    int32_t one[2] = {0, SLOTS};
    if (a->variant == LOOP) {
        check_op(gemm_grouped_linear(a->ctx, a->y_gate, a->xs, a->w_gate, a->offsets, EXPERTS,
                                     HIDDEN, EXPERT_WIDTH, a->type, err, sizeof err));
        check_op(gemm_grouped_linear(a->ctx, a->y_up, a->xs, a->w_up, a->offsets, EXPERTS, HIDDEN,
                                     EXPERT_WIDTH, a->type, err, sizeof err));
        check_op(gemm_grouped_linear(a->ctx, a->y_down, a->h, a->w_down, a->offsets, EXPERTS,
                                     EXPERT_WIDTH, HIDDEN, a->type, err, sizeof err));
    } else if (a->variant == DENSE_SAME_FLOPS) { /* all slots through expert 0's weights */
        check_op(gemm_grouped_linear(a->ctx, a->y_gate, a->xs, a->w_gate, one, 1, HIDDEN,
                                     EXPERT_WIDTH, a->type, err, sizeof err));
        check_op(gemm_grouped_linear(a->ctx, a->y_up, a->xs, a->w_up, one, 1, HIDDEN, EXPERT_WIDTH,
                                     a->type, err, sizeof err));
        check_op(gemm_grouped_linear(a->ctx, a->y_down, a->h, a->w_down, one, 1, EXPERT_WIDTH,
                                     HIDDEN, a->type, err, sizeof err));
    } else {
        enum gemm_type out = a->variant == GROUPED_BF16_OUT ? GEMM_BF16 : GEMM_F32;
        check_op(gemm_grouped_linear_batched(a->ctx, a->y_gate, out, a->xs, a->w_gate, a->offsets,
                                             EXPERTS, HIDDEN, EXPERT_WIDTH, a->type, err,
                                             sizeof err));
        check_op(gemm_grouped_linear_batched(a->ctx, a->y_up, out, a->xs, a->w_up, a->offsets,
                                             EXPERTS, HIDDEN, EXPERT_WIDTH, a->type, err,
                                             sizeof err));
        check_op(gemm_grouped_linear_batched(a->ctx, a->y_down, out, a->h, a->w_down, a->offsets,
                                             EXPERTS, EXPERT_WIDTH, HIDDEN, a->type, err,
                                             sizeof err));
    }
}

/* Backward of the three projections: dx and dw of each (gate and up share dx_gate: the
 * timing is what matters, and the loop and the grouped call write it the same way). */
static void run_experts_backward(void *p)
{
    struct experts_arg *a = p;
    int32_t one[2] = {0, SLOTS};
    if (a->variant == DENSE_SAME_FLOPS) {
        float *dwg[1] = {a->dw_dense_gate}, *dwd[1] = {a->dw_dense_down};
        check_op(gemm_grouped_linear_backward(a->ctx, a->dx_gate, dwg, a->dy_gate, a->xs, a->w_gate,
                                              one, 1, HIDDEN, EXPERT_WIDTH, a->type, err,
                                              sizeof err));
        check_op(gemm_grouped_linear_backward(a->ctx, a->dx_gate, dwg, a->dy_gate, a->xs, a->w_up,
                                              one, 1, HIDDEN, EXPERT_WIDTH, a->type, err,
                                              sizeof err));
        check_op(gemm_grouped_linear_backward(a->ctx, a->dx_down, dwd, a->dy_down, a->h, a->w_down,
                                              one, 1, EXPERT_WIDTH, HIDDEN, a->type, err,
                                              sizeof err));
        return;
    }
    int (*fn)(struct gemm_context *, float *, float *const *, const void *, const void *,
              const void *, const int32_t *, int, int, int, enum gemm_type, char *, size_t) =
        a->variant == LOOP ? gemm_grouped_linear_backward : gemm_grouped_linear_backward_batched;
    check_op(fn(a->ctx, a->dx_gate, a->dw_gate, a->dy_gate, a->xs, a->w_gate, a->offsets, EXPERTS,
                HIDDEN, EXPERT_WIDTH, a->type, err, sizeof err));
    check_op(fn(a->ctx, a->dx_gate, a->dw_up, a->dy_gate, a->xs, a->w_up, a->offsets, EXPERTS,
                HIDDEN, EXPERT_WIDTH, a->type, err, sizeof err));
    check_op(fn(a->ctx, a->dx_down, a->dw_down, a->dy_down, a->h, a->w_down, a->offsets, EXPERTS,
                EXPERT_WIDTH, HIDDEN, a->type, err, sizeof err));
}

/* One variant that may be refused by cuBLAS (a type pairing it does not support): tried
 * once; a refusal is recorded as such instead of failing the run. */
static int try_once(int forward, struct experts_arg *a, const char *name)
{
    int rc;
    if (forward) {
        enum gemm_type out = a->variant == GROUPED_BF16_OUT ? GEMM_BF16 : GEMM_F32;
        rc = gemm_grouped_linear_batched(a->ctx, a->y_gate, out, a->xs, a->w_gate, a->offsets,
                                         EXPERTS, HIDDEN, EXPERT_WIDTH, a->type, err, sizeof err);
    } else {
        rc = gemm_grouped_linear_backward_batched(a->ctx, a->dx_gate, a->dw_gate, a->dy_gate, a->xs,
                                                  a->w_gate, a->offsets, EXPERTS, HIDDEN,
                                                  EXPERT_WIDTH, a->type, err, sizeof err);
    }
    if (rc == 0) {
        check_cuda(cudaDeviceSynchronize());
        return 0;
    }
    /* fp32 in and out, and bf16 in and out, are pairings cuBLAS documents for the grouped
     * GEMM: a refusal of those is a failure; bf16 in with fp32 out may be refused */
    int documented = a->type == GEMM_F32 || (forward && a->variant == GROUPED_BF16_OUT);
    if (!documented && (strstr(err, "NOT_SUPPORTED") || strstr(err, "INVALID_VALUE"))) {
        printf("  %-34s refused by cuBLAS: %s\n", name, err);
        const char *status = strstr(err, "CUBLAS_STATUS");
        char note[96];
        snprintf(note, sizeof note, "refused: %.80s", status ? status : err);
        record(name, 0, 0, LATENCY, note);
        return -1;
    }
    /* a failure, but not one that hides the other lines (a cuBLAS status is not sticky) */
    printf("  %-34s FAILED: %s\n", name, err);
    char note[96];
    snprintf(note, sizeof note, "FAILED: %.80s", err);
    record(name, 0, 0, LATENCY, note);
    failures++;
    check_cuda(cudaDeviceSynchronize());
    return -1;
}

static float **device_matrices(float *base, size_t each)
{
    float **p = malloc(EXPERTS * sizeof *p);
    if (!p) fail("out of host memory");
    for (int e = 0; e < EXPERTS; e++) p[e] = base + (size_t)e * each;
    return p;
}

static void bench_experts(struct gemm_context *ctx)
{
    printf("expert GEMMs: gate, up [%d,%d] and down [%d,%d] per expert over %d slots\n",
           EXPERT_WIDTH, HIDDEN, HIDDEN, EXPERT_WIDTH, SLOTS);
    int32_t offsets[EXPERTS + 1];
    draw_routing(offsets);
    size_t wn = (size_t)EXPERTS * EXPERT_WIDTH * HIDDEN;
    struct tensor xs = random_tensor((size_t)SLOTS * HIDDEN, 1.0f, 301, NULL);
    struct tensor h = random_tensor((size_t)SLOTS * EXPERT_WIDTH, 1.0f, 302, NULL);
    struct tensor wg = random_tensor(wn, 0.03f, 303, NULL),
                  wu = random_tensor(wn, 0.03f, 304, NULL);
    struct tensor wd = random_tensor(wn, 0.03f, 305, NULL);
    size_t small = (size_t)SLOTS * EXPERT_WIDTH, large = (size_t)SLOTS * HIDDEN;
    /* outputs: [0] the loop's, [1] the grouped call's */
    float *yg[2], *yu[2], *yd[2];
    for (int i = 0; i < 2; i++) {
        yg[i] = dev_alloc(small * sizeof(float)), yu[i] = dev_alloc(small * sizeof(float));
        yd[i] = dev_alloc(large * sizeof(float));
    }
    double flops = 3.0 * 2.0 * SLOTS * (double)HIDDEN * EXPERT_WIDTH;
    char name[64];

    for (int t = 0; t < 2; t++) {
        enum gemm_type type = t ? GEMM_BF16 : GEMM_F32;
        const char *tn = t ? "bf16" : "fp32";
        double tol = 1e-4; /* the same fp32 accumulation, maybe in another order */
        struct experts_arg a = {.ctx = ctx,
                                .variant = LOOP,
                                .type = type,
                                .offsets = offsets,
                                .xs = t ? (void *)xs.bf16 : (void *)xs.f32,
                                .h = t ? (void *)h.bf16 : (void *)h.f32,
                                .w_gate = t ? (void *)wg.bf16 : (void *)wg.f32,
                                .w_up = t ? (void *)wu.bf16 : (void *)wu.f32,
                                .w_down = t ? (void *)wd.bf16 : (void *)wd.f32,
                                .y_gate = yg[0],
                                .y_up = yu[0],
                                .y_down = yd[0]};
        poison(yg[0], small * 4), poison(yu[0], small * 4), poison(yd[0], large * 4);
        snprintf(name, sizeof name, "experts fwd %s loop", tn);
        record(name, time_ms(run_experts_forward, &a), flops, FLOPS, "gemm_grouped_linear");

        a.variant = GROUPED, a.y_gate = yg[1], a.y_up = yu[1], a.y_down = yd[1];
        snprintf(name, sizeof name, "experts fwd %s grouped", tn);
        if (try_once(1, &a, name) == 0) {
            poison(yg[1], small * 4), poison(yu[1], small * 4), poison(yd[1], large * 4);
            run_experts_forward(&a);
            check_cuda(cudaDeviceSynchronize());
            snprintf(name, sizeof name, "experts %s grouped vs loop: gate", tn);
            compare(name, yg[1], 0, yg[0], 0, small, tol);
            snprintf(name, sizeof name, "experts %s grouped vs loop: down", tn);
            compare(name, yd[1], 0, yd[0], 0, large, tol);
            snprintf(name, sizeof name, "experts fwd %s grouped", tn);
            record(name, time_ms(run_experts_forward, &a), flops, FLOPS, "GroupedBatchedEx");
        }
        if (type == GEMM_BF16) {
            a.variant = GROUPED_BF16_OUT;
            snprintf(name, sizeof name, "experts fwd bf16 grouped bf16-out");
            if (try_once(1, &a, name) == 0) {
                poison(yg[1], small * 4), poison(yu[1], small * 4), poison(yd[1], large * 4);
                run_experts_forward(&a);
                check_cuda(cudaDeviceSynchronize());
                /* bf16 output: one rounding of the fp32 result, 2^-8 relative */
                compare("experts bf16-out vs loop: gate", yg[1], 1, yg[0], 0, small, 8e-3);
                compare("experts bf16-out vs loop: down", yd[1], 1, yd[0], 0, large, 8e-3);
                record(name, time_ms(run_experts_forward, &a), flops, FLOPS, "GroupedBatchedEx");
            }
        }
        a.variant = DENSE_SAME_FLOPS, a.y_gate = yg[1], a.y_up = yu[1], a.y_down = yd[1];
        snprintf(name, sizeof name, "experts fwd %s dense same FLOPs", tn);
        record(name, time_ms(run_experts_forward, &a), flops, FLOPS, "one GEMM per projection");
    }

    /* backward: dy random; dw of every expert (full fine-tuning) */
    struct tensor dyg = random_tensor(small, 1.0f, 306, NULL);
    struct tensor dyd = random_tensor(large, 1.0f, 307, NULL);
    float *dxg[2], *dxd[2], *dwg[2], *dwu[2], *dwd[2];
    for (int i = 0; i < 2; i++) {
        dxg[i] = dev_alloc(large * sizeof(float)), dxd[i] = dev_alloc(small * sizeof(float));
        dwg[i] = dev_alloc(wn * sizeof(float)), dwu[i] = dev_alloc(wn * sizeof(float));
        dwd[i] = dev_alloc(wn * sizeof(float));
    }
    float **pg[2], **pu[2], **pd[2];
    for (int i = 0; i < 2; i++) {
        pg[i] = device_matrices(dwg[i], (size_t)EXPERT_WIDTH * HIDDEN);
        pu[i] = device_matrices(dwu[i], (size_t)EXPERT_WIDTH * HIDDEN);
        pd[i] = device_matrices(dwd[i], (size_t)EXPERT_WIDTH * HIDDEN);
    }
    double bflops = 2.0 * flops;
    for (int t = 0; t < 2; t++) {
        enum gemm_type type = t ? GEMM_BF16 : GEMM_F32;
        const char *tn = t ? "bf16" : "fp32";
        struct experts_arg a = {.ctx = ctx,
                                .variant = LOOP,
                                .type = type,
                                .offsets = offsets,
                                .xs = t ? (void *)xs.bf16 : (void *)xs.f32,
                                .h = t ? (void *)h.bf16 : (void *)h.f32,
                                .w_gate = t ? (void *)wg.bf16 : (void *)wg.f32,
                                .w_up = t ? (void *)wu.bf16 : (void *)wu.f32,
                                .w_down = t ? (void *)wd.bf16 : (void *)wd.f32};
        a.dy_gate = t ? (void *)dyg.bf16 : (void *)dyg.f32;
        a.dy_down = t ? (void *)dyd.bf16 : (void *)dyd.f32;
        int grouped = 1;              /* 0 once cuBLAS refuses the grouped call for this type */
        for (int i = 0; i < 2; i++) { /* one run of each from zero dw, for the comparison */
            a.variant = i ? GROUPED : LOOP;
            a.dx_gate = dxg[i], a.dx_down = dxd[i], a.dw_gate = pg[i], a.dw_up = pu[i],
            a.dw_down = pd[i];
            snprintf(name, sizeof name, "experts bwd %s grouped", tn);
            if (i == 1 && try_once(0, &a, name) != 0) {
                grouped = 0;
                break;
            }
            check_cuda(cudaMemset(dwg[i], 0, wn * 4));
            check_cuda(cudaMemset(dwu[i], 0, wn * 4));
            check_cuda(cudaMemset(dwd[i], 0, wn * 4));
            poison(dxg[i], large * 4), poison(dxd[i], small * 4);
            run_experts_backward(&a);
            check_cuda(cudaDeviceSynchronize());
        }
        if (grouped) {
            snprintf(name, sizeof name, "experts bwd %s grouped vs loop: dx down", tn);
            compare(name, dxd[1], 0, dxd[0], 0, small, 1e-4);
            snprintf(name, sizeof name, "experts bwd %s grouped vs loop: dx gate", tn);
            compare(name, dxg[1], 0, dxg[0], 0, large, 1e-4);
            snprintf(name, sizeof name, "experts bwd %s grouped vs loop: dw down", tn);
            compare(name, dwd[1], 0, dwd[0], 0, wn, 1e-4);
            snprintf(name, sizeof name, "experts bwd %s grouped vs loop: dw gate", tn);
            compare(name, dwg[1], 0, dwg[0], 0, wn, 1e-4);
        }
        for (int i = 0; i < 1 + grouped; i++) { /* timed: dw accumulates, as in a step */
            a.variant = i ? GROUPED : LOOP;
            a.dx_gate = dxg[i], a.dx_down = dxd[i], a.dw_gate = pg[i], a.dw_up = pu[i],
            a.dw_down = pd[i];
            snprintf(name, sizeof name, "experts bwd %s %s", tn, i ? "grouped" : "loop");
            record(name, time_ms(run_experts_backward, &a), bflops, FLOPS, "dx + dw, every expert");
        }
        /* ESFT: the weight gradients of 16 of the 128 experts only (the rest frozen: NULL) */
        float *eg[EXPERTS], *eu[EXPERTS], *ed[EXPERTS];
        double esft_flops = flops; /* the input gradients: the forward's FLOPs */
        for (int e = 0; e < EXPERTS; e++) {
            int trained = e % 8 == 3;
            eg[e] = trained ? pg[0][e] : NULL, eu[e] = trained ? pu[0][e] : NULL;
            ed[e] = trained ? pd[0][e] : NULL;
            if (trained)
                esft_flops +=
                    3.0 * 2.0 * (offsets[e + 1] - offsets[e]) * (double)HIDDEN * EXPERT_WIDTH;
        }
        a.dx_gate = dxg[0], a.dx_down = dxd[0], a.dw_gate = eg, a.dw_up = eu, a.dw_down = ed;
        for (int i = 0; i < 1 + grouped; i++) {
            a.variant = i ? GROUPED : LOOP;
            snprintf(name, sizeof name, "experts bwd %s %s ESFT 16/128", tn,
                     i ? "grouped" : "loop");
            record(name, time_ms(run_experts_backward, &a), esft_flops, FLOPS,
                   "dx + dw of 16 experts");
        }
        a.variant = DENSE_SAME_FLOPS;
        a.dx_gate = dxg[0], a.dx_down = dxd[0], a.dw_dense_gate = dwg[0], a.dw_dense_down = dwd[0];
        snprintf(name, sizeof name, "experts bwd %s dense same FLOPs", tn);
        record(name, time_ms(run_experts_backward, &a), bflops, FLOPS, "");
    }
    for (int i = 0; i < 2; i++) {
        dev_free(yg[i], small * 4), dev_free(yu[i], small * 4), dev_free(yd[i], large * 4);
        dev_free(dxg[i], large * 4), dev_free(dxd[i], small * 4);
        dev_free(dwg[i], wn * 4), dev_free(dwu[i], wn * 4), dev_free(dwd[i], wn * 4);
        free(pg[i]), free(pu[i]), free(pd[i]);
    }
    tensor_free(&xs), tensor_free(&h), tensor_free(&wg), tensor_free(&wu), tensor_free(&wd);
    tensor_free(&dyg), tensor_free(&dyd);
}

/* ---- attention (S2) -------------------------------------------------------------- */
struct attention_arg {
    float *out, *q, *k, *v, *dout, *dq, *dk, *dv;
    int32_t *sample_start;
    void *workspace;
    float scale;
};
static void run_attention_forward(void *p)
{
    struct attention_arg *a = p;
    check_op(attention_forward(a->out, a->q, a->k, a->v, a->sample_start, TOKENS, HEADS, KV_HEADS,
                               HEAD_DIM, a->scale, err, sizeof err));
}
static void run_attention_backward(void *p)
{
    struct attention_arg *a = p;
    check_op(attention_backward(a->dq, a->dk, a->dv, a->dout, a->q, a->k, a->v, a->out,
                                a->sample_start, TOKENS, HEADS, KV_HEADS, HEAD_DIM, a->scale,
                                a->workspace, err, sizeof err));
}

/* The same on cuBLAS (attention_gemm.cu) and on the tiled bf16 kernels (attention_flash.cu). */
static const struct attention_gemm_mask no_mask = {0, NULL, NULL, NULL}; /* causal only */
struct attention_paths {
    struct attention_arg *a;
    struct gemm_context *ctx;
    int *starts, count;
    void *gemm_workspace, *flash_workspace;
};
static void run_gemm_forward(void *p)
{
    struct attention_paths *t = p;
    struct attention_arg *a = t->a;
    check_op(attention_gemm_forward(gemm_cublas(t->ctx), a->out, a->q, a->k, a->v, t->starts,
                                    t->count, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, a->scale,
                                    &no_mask, t->gemm_workspace, err, sizeof err));
}
static void run_gemm_backward(void *p)
{
    struct attention_paths *t = p;
    struct attention_arg *a = t->a;
    check_op(attention_gemm_backward(gemm_cublas(t->ctx), a->dq, a->dk, a->dv, a->dout, a->q, a->k,
                                     a->v, t->starts, t->count, HEADS, KV_HEADS, HEAD_DIM,
                                     HEAD_DIM, a->scale, &no_mask, t->gemm_workspace, err,
                                     sizeof err));
}
static void run_flash_forward(void *p)
{
    struct attention_paths *t = p;
    struct attention_arg *a = t->a;
    check_op(attention_flash_forward(a->out, NULL, a->q, a->k, a->v, a->sample_start, TOKENS, HEADS,
                                     KV_HEADS, HEAD_DIM, a->scale, err, sizeof err));
}
static void run_flash_backward(void *p)
{
    struct attention_paths *t = p;
    struct attention_arg *a = t->a;
    check_op(attention_flash_backward(a->dq, a->dk, a->dv, a->dout, a->q, a->k, a->v, a->out, NULL,
                                      a->sample_start, TOKENS, HEADS, KV_HEADS, HEAD_DIM, a->scale,
                                      t->flash_workspace, err, sizeof err));
}

/* sqrt(sum (a - b)^2 / sum b^2) of two device buffers of n floats; inf when a has a
 * non-finite element. */
static double relative_l2(const float *a, const float *b, size_t n)
{
    float *x = download(a, n, 0), *y = download(b, n, 0);
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) num = INFINITY;
        num += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
        den += (double)y[i] * y[i];
    }
    free(x), free(y);
    return sqrt(num / (den > 0 ? den : 1e-300));
}

/* cuBLAS attention with TF32 products (what tf32 mode ran before the tiled kernels) and the
 * tiled bf16 kernels (what tf32 and bf16 modes run now), same shape; the tiled results
 * compared with cuBLAS's (relative L2, bf16 operands: 2e-2 at most). */
static void bench_attention_paths(struct attention_arg *a, struct gemm_context *ctx,
                                  double forward)
{
    size_t qn = (size_t)TOKENS * HEADS * HEAD_DIM, kn = (size_t)TOKENS * KV_HEADS * HEAD_DIM;
    struct attention_paths t = {.a = a, .ctx = ctx};
    int32_t *start = malloc(TOKENS * sizeof *start);
    t.starts = malloc((TOKENS + 1) * sizeof *t.starts);
    if (!start || !t.starts) fail("out of host memory");
    check_cuda(cudaMemcpy(start, a->sample_start, TOKENS * sizeof *start, cudaMemcpyDeviceToHost));
    int longest = 0;
    t.count = attention_gemm_samples(start, TOKENS, t.starts, &longest);
    free(start);
    size_t gemm_ws = attention_gemm_workspace(longest, HEADS, KV_HEADS);
    size_t flash_ws = attention_flash_workspace(TOKENS, HEADS);
    t.gemm_workspace = dev_alloc(gemm_ws);
    t.flash_workspace = dev_alloc(flash_ws);
    printf("attention paths: cuBLAS scores workspace %.1f MiB, tiled kernels' %.1f MiB\n",
           gemm_ws / 1048576.0, flash_ws / 1048576.0);
    if (gemm_set_tf32(ctx, 1, err, sizeof err)) fail(err);
    float *ref[4] = {dev_alloc(qn * 4), dev_alloc(qn * 4), dev_alloc(kn * 4), dev_alloc(kn * 4)};
    float *got[4] = {a->out, a->dq, a->dk, a->dv};
    size_t n[4] = {qn, qn, kn, kn};
    poison(a->out, qn * 4);
    record("attention gemm forward (tf32)", time_ms(run_gemm_forward, &t), forward, FLOPS,
           "causal FLOPs");
    poison(a->dq, qn * 4), poison(a->dk, kn * 4), poison(a->dv, kn * 4);
    record("attention gemm backward (tf32)", time_ms(run_gemm_backward, &t), 2.5 * forward, FLOPS,
           "2.5x forward FLOPs");
    for (int i = 0; i < 4; i++)
        check_cuda(cudaMemcpy(ref[i], got[i], n[i] * 4, cudaMemcpyDeviceToDevice));
    if (gemm_set_tf32(ctx, 0, err, sizeof err)) fail(err);
    poison(a->out, qn * 4);
    record("attention flash forward (bf16)", time_ms(run_flash_forward, &t), forward, FLOPS,
           "causal FLOPs");
    /* the backward from the same out as cuBLAS's, so that only the kernels differ */
    check_cuda(cudaMemcpy(a->out, ref[0], qn * 4, cudaMemcpyDeviceToDevice));
    poison(a->dq, qn * 4), poison(a->dk, kn * 4), poison(a->dv, kn * 4);
    record("attention flash backward (bf16)", time_ms(run_flash_backward, &t), 2.5 * forward,
           FLOPS, "2.5x fwd; runs 8 products (lse again)");
    poison(a->out, qn * 4);
    run_flash_forward(&t);
    check_cuda(cudaDeviceSynchronize());
    const char *names[4] = {"out", "dq", "dk", "dv"};
    for (int i = 0; i < 4; i++) {
        double e = relative_l2(got[i], ref[i], n[i]);
        printf("  check attention flash %s against cuBLAS: relative L2 %.2e: %s\n", names[i], e,
               e <= 2e-2 ? "ok" : "FAILED");
        failures += !(e <= 2e-2);
        dev_free(ref[i], n[i] * 4);
    }
    dev_free(t.gemm_workspace, gemm_ws), dev_free(t.flash_workspace, flash_ws);
    free(t.starts);
}

static void bench_attention(struct gemm_context *ctx)
{
    int warmup = opt_warmup;
    opt_warmup = warmup < 1 ? warmup : 1; /* the slowest lines: one untimed call is enough */
    printf("attention: %d samples of %d tokens, %d/%d heads of %d, causal, fp32\n", SAMPLES, SEQ,
           HEADS, KV_HEADS, HEAD_DIM);
    size_t qn = (size_t)TOKENS * HEADS * HEAD_DIM, kn = (size_t)TOKENS * KV_HEADS * HEAD_DIM;
    struct tensor q = random_tensor(qn, 1.0f, 401, NULL), k = random_tensor(kn, 1.0f, 402, NULL);
    struct tensor v = random_tensor(kn, 1.0f, 403, NULL), dout = random_tensor(qn, 1.0f, 404, NULL);
    struct attention_arg a = {.out = dev_alloc(qn * 4),
                              .q = q.f32,
                              .k = k.f32,
                              .v = v.f32,
                              .dout = dout.f32,
                              .dq = dev_alloc(qn * 4),
                              .dk = dev_alloc(kn * 4),
                              .dv = dev_alloc(kn * 4)};
    int32_t *start = malloc(TOKENS * sizeof *start);
    if (!start) fail("out of host memory");
    for (int i = 0; i < TOKENS; i++) start[i] = i / SEQ * SEQ;
    a.sample_start = dev_alloc(TOKENS * sizeof(int32_t));
    check_cuda(cudaMemcpy(a.sample_start, start, TOKENS * sizeof(int32_t), cudaMemcpyHostToDevice));
    free(start);
    size_t ws = attention_backward_workspace(TOKENS, HEADS);
    a.workspace = ws ? dev_alloc(ws) : NULL;
    a.scale = 1.0f / sqrtf((float)HEAD_DIM);
    /* QK^T and PV: 2 products of 2 FLOPs per multiply-add over the L(L+1)/2 visible keys */
    double forward = SAMPLES * HEADS * 4.0 * HEAD_DIM * ((double)SEQ * (SEQ + 1) / 2);
    poison(a.out, qn * 4);
    record("attention forward", time_ms(run_attention_forward, &a), forward, FLOPS, "causal FLOPs");
    float *o = download(a.out, qn, 0);
    size_t bad = 0;
    for (size_t i = 0; i < qn; i++) bad += !isfinite(o[i]);
    free(o);
    printf("  check attention forward: %zu non-finite outputs: %s\n", bad, bad ? "FAILED" : "ok");
    failures += bad != 0;
    poison(a.dq, qn * 4), poison(a.dk, kn * 4), poison(a.dv, kn * 4);
    record("attention backward", time_ms(run_attention_backward, &a), 2.5 * forward, FLOPS,
           "2.5x forward FLOPs");
    bad = 0;
    float *g[3] = {download(a.dq, qn, 0), download(a.dk, kn, 0), download(a.dv, kn, 0)};
    for (size_t i = 0; i < qn; i++) bad += !isfinite(g[0][i]);
    for (size_t i = 0; i < kn; i++) bad += !isfinite(g[1][i]) + !isfinite(g[2][i]);
    free(g[0]), free(g[1]), free(g[2]);
    printf("  check attention backward: %zu non-finite gradients: %s\n", bad,
           bad ? "FAILED" : "ok");
    failures += bad != 0;
    bench_attention_paths(&a, ctx, forward);
    dev_free(a.out, qn * 4), dev_free(a.dq, qn * 4), dev_free(a.dk, kn * 4), dev_free(a.dv, kn * 4);
    dev_free(a.sample_start, TOKENS * sizeof(int32_t));
    if (a.workspace) dev_free(a.workspace, ws);
    tensor_free(&q), tensor_free(&k), tensor_free(&v), tensor_free(&dout);
    opt_warmup = warmup;
}

/* ---- LM head and cross-entropy (M6) ---------------------------------------------- */
struct ce_arg {
    double *row_loss;
    float *dlogits, *logits;
    int32_t *labels;
};
static void run_cross_entropy(void *p)
{
    struct ce_arg *c = p;
    check_op(dense_cross_entropy(c->row_loss, c->dlogits, c->logits, c->labels, TOKENS, VOCAB,
                                 1.0f / TOKENS, err, sizeof err));
}

static void bench_lm_head(struct gemm_context *ctx)
{
    printf("LM head y[%d,%d] = x[%d,%d] w^T (%.3g logits) and cross-entropy\n", TOKENS, VOCAB,
           TOKENS, HIDDEN, (double)TOKENS * VOCAB);
    float *hx, *hw;
    struct tensor x = random_tensor((size_t)TOKENS * HIDDEN, 1.0f, 501, &hx);
    struct tensor w = random_tensor((size_t)VOCAB * HIDDEN, 0.05f, 502, &hw);
    size_t yn = (size_t)TOKENS * VOCAB;
    float *y = dev_alloc(yn * sizeof(float));
    double flops = 2.0 * TOKENS * (double)HIDDEN * VOCAB;
    struct linear_arg l = {ctx, y, x.f32, w.f32, TOKENS, HIDDEN, VOCAB, GEMM_F32};
    record("lm head fp32", time_ms(run_linear, &l), flops, FLOPS, "gemm_linear");
    l.x = x.bf16, l.w = w.bf16, l.type = GEMM_BF16;
    record("lm head bf16", time_ms(run_linear, &l), flops, FLOPS, "gemm_linear, fp32 out");
    poison(y, yn * sizeof(float));
    run_linear(&l);
    check_cuda(cudaDeviceSynchronize());

    /* rows: the first, the first wholly past 2^31 elements, the last */
    const int rows[3] = {0, (int)(((size_t)1 << 31) / VOCAB) + 1, TOKENS - 1};
    float *row = malloc((size_t)VOCAB * sizeof *row);
    double host_loss[3];
    int32_t *labels = malloc(TOKENS * sizeof *labels);
    if (!row || !labels) fail("out of host memory");
    uint64_t state = 0x1AB5ULL + opt_seed;
    for (int i = 0; i < TOKENS; i++)
        labels[i] = i % 97 == 13 ? -100 : (int32_t)(splitmix64(&state) % VOCAB);
    for (int r = 0; r < 3; r++) {
        int n = rows[r];
        if (labels[n] < 0) labels[n] = n % VOCAB;
        check_cuda(cudaMemcpy(row, y + (size_t)n * VOCAB, (size_t)VOCAB * sizeof(float),
                              cudaMemcpyDeviceToHost));
        double worst = 0, max_logit = -INFINITY, sum = 0;
        size_t bad = 0;
        for (int o = 0; o < VOCAB; o++) {
            double ref = 0, scale = 0;
            const float *xr = hx + (size_t)n * HIDDEN, *wr = hw + (size_t)o * HIDDEN;
            for (int i = 0; i < HIDDEN; i++)
                ref += (double)xr[i] * wr[i], scale += fabs((double)xr[i] * wr[i]);
            if (!isfinite(row[o])) {
                bad++;
                continue;
            }
            double e = fabs(row[o] - ref) / scale; /* against the sum of |terms| */
            if (e > worst) worst = e;
            if (row[o] > max_logit) max_logit = row[o];
        }
        for (int o = 0; o < VOCAB; o++) sum += exp((double)row[o] - max_logit);
        host_loss[r] = max_logit + log(sum) - row[labels[n]];
        int ok = bad == 0 && worst < 1e-4; /* fp32 accumulation of 2048 terms: ~1e-6 */
        printf(
            "  check lm head row %5d (element %zu): max |d| / sum|x w| %.3g, non-finite %zu: %s\n",
            n, (size_t)n * VOCAB, worst, bad, ok ? "ok" : "FAILED");
        failures += !ok;
    }
    free(row), free(hx), free(hw);

    struct ce_arg c = {.row_loss = dev_alloc(TOKENS * sizeof(double)),
                       .logits = y,
                       .labels = dev_alloc(TOKENS * sizeof(int32_t))};
    check_cuda(cudaMemcpy(c.labels, labels, TOKENS * sizeof(int32_t), cudaMemcpyHostToDevice));
    run_cross_entropy(&c);
    for (int r = 0; r < 3; r++) {
        double device_loss;
        check_cuda(
            cudaMemcpy(&device_loss, c.row_loss + rows[r], sizeof(double), cudaMemcpyDeviceToHost));
        double d = fabs(device_loss - host_loss[r]) / fabs(host_loss[r]);
        int ok = isfinite(device_loss) && d < 1e-5;
        printf("  check cross-entropy row %5d: device %.7f, host (double, device logits) %.7f, "
               "rel %.3g: %s\n",
               rows[r], device_loss, host_loss[r], d, ok ? "ok" : "FAILED");
        failures += !ok;
    }
    free(labels);
    double bytes = (double)yn * sizeof(float);
    record("cross-entropy, loss only", time_ms(run_cross_entropy, &c), bytes, BYTES,
           "logits read once");
    c.dlogits = y;
    record("cross-entropy + grad in place", time_ms(run_cross_entropy, &c), 2.0 * bytes, BYTES,
           "read + write once");
    dev_free(c.row_loss, TOKENS * sizeof(double)), dev_free(c.labels, TOKENS * sizeof(int32_t));
    dev_free(y, yn * sizeof(float));
    tensor_free(&x), tensor_free(&w);
}

/* ---- main ------------------------------------------------------------------------ */
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--sections"))
            opt_sections = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "--warmup"))
            opt_warmup = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--iters"))
            opt_iters = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--budget-ms"))
            opt_budget_ms = atof(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--seed"))
            opt_seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr,
                    "usage: %s [--sections ceilings,sync,dense,experts,attention,lmhead] "
                    "[--warmup 2] [--iters 10] [--budget-ms 1500] [--seed 1]\n",
                    argv[0]);
            return 2;
        }
    }
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver ||
        (status == cudaSuccess && count == 0)) {
        printf("skipped: no device (%s)\n",
               status == cudaSuccess ? "no CUDA device" : cudaGetErrorString(status));
        return 0;
    }
    check_cuda(status);
    check_cuda(cudaSetDevice(0));
    device_print_info(stdout);
    size_t free_start, total;
    check_cuda(cudaMemGetInfo(&free_start, &total));
    double t0 = host_seconds();

    struct gemm_context *ctx = gemm_create(err, sizeof err);
    if (!ctx) fail(err);
    cublasHandle_t handle;
    check_cublas(cublasCreate(&handle));

    if (section_on("ceilings")) bench_ceilings(handle);
    if (section_on("sync")) bench_sync();
    if (section_on("dense")) bench_dense(ctx, handle);
    if (section_on("experts")) bench_experts(ctx);
    if (section_on("attention")) bench_attention(ctx);
    if (section_on("lmhead")) bench_lm_head(ctx);

    gemm_destroy(ctx);
    cublasDestroy(handle);
    check_cuda(cudaDeviceSynchronize());
    print_table();
    printf("device memory: %.2f GB total, %.2f GB free at start; this program's peak "
           "allocation %.2f GB\n",
           total / 1e9, free_start / 1e9, device_bytes_peak / 1e9);
    printf("run time %.1f s; %d check(s) failed\n", host_seconds() - t0, failures);
    return failures ? 1 : 0;
}
#endif
