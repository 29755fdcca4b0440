/* bench_forward: throughput of esft's CPU forward pass on one checkpoint, for the
 * comparison with transformers (tests/bench/bench_cpu_hf.py, run side by side by
 * run-cpu.sh) and, with --breakdown, where its time goes.
 *
 * Usage: bench_forward MODEL_DIR [--batch B] [--seq T] [--iters n] [--warmup w]
 *                                [--seed s] [--breakdown n]
 *
 * The batch is B rows of T tokens, one sample per row (sample_start = row start,
 * positions 0..T-1, targets = the next token of the row, the last one not counted), the
 * tokens drawn by splitmix64 so bench_cpu_hf.py draws the very same ones:
 *   token[i] = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) mod V.
 * The loss is printed as a check that both programs computed the same thing.
 *
 * After the timed iterations, --breakdown n (default 1; 0: off) runs n more forward
 * passes through a copy of the CPU op table whose every op is timed, and prints where
 * the time went by part of the model. The ops run one after another (each parallel
 * inside), so the wall-clock time of each call is its cost. */
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "backend.h"
#include "blas.h"
#include "flops.h"
#include "hfconfig.h"
#include "layout.h"
#include "log.h"
#include "model.h"
#include "threads.h"

/* ---- the timed op table ---------------------------------------------------------- */

enum part {
    PART_EMBEDDING,
    PART_NORMS,       /* input, post-attention, QK and final RMSNorms */
    PART_QKVO,        /* q, k, v, o projections (and any other linear not below) */
    PART_ROPE,
    PART_ATTENTION,   /* softmax(q k^T) v */
    PART_ROUTER,      /* router linear + softmax top-k */
    PART_DISPATCH,    /* permute by expert, gather rows, combine */
    PART_EXPERT_GEMM, /* grouped gate, up, down */
    PART_GLU,
    PART_RESIDUAL,    /* adds */
    PART_LM_HEAD,
    PART_LOSS,        /* cross-entropy */
    PART_OTHER,
    PART_COUNT
};

static const char *const part_names[PART_COUNT] = {
    "embedding", "rmsnorm", "q/k/v/o linear", "rope", "attention core", "router",
    "expert dispatch", "expert GEMMs", "glu", "residual add", "lm_head", "cross-entropy",
    "other"};

static double part_seconds[PART_COUNT];
static long part_calls[PART_COUNT];
static const struct backend *inner; /* the op table being timed */
static int model_V, model_E, model_H; /* to tell lm_head and router apart from q/k/v/o */

static void charge(enum part p, double start)
{
    part_seconds[p] += omp_get_wtime() - start;
    part_calls[p]++;
}

static void timed_embedding(float *x, const int32_t *tokens, const float *table, int N, int H)
{
    double t = omp_get_wtime();
    inner->embedding(x, tokens, table, N, H);
    charge(PART_EMBEDDING, t);
}

static void timed_linear(float *y, const float *x, const float *w, const float *bias, int N,
                         int I, int O, bool accumulate)
{
    double t = omp_get_wtime();
    inner->linear(y, x, w, bias, N, I, O, accumulate);
    enum part p = PART_QKVO;
    if (O == model_V && I == model_H)
        p = PART_LM_HEAD;
    else if (O == model_E && I == model_H)
        p = PART_ROUTER;
    charge(p, t);
}

static void timed_rmsnorm(float *y, float *rstd, const float *x, const float *w, int R, int D,
                          float eps)
{
    double t = omp_get_wtime();
    inner->rmsnorm(y, rstd, x, w, R, D, eps);
    charge(PART_NORMS, t);
}

static void timed_rope(float *x, const int32_t *positions, const float *inv_freq,
                       float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                       enum hf_rope_layout layout)
{
    double t = omp_get_wtime();
    inner->rope(x, positions, inv_freq, attention_scaling, N, n_heads, Dh, rotary_dim, layout);
    charge(PART_ROPE, t);
}

static void timed_attention(float *out, const float *q, const float *k, const float *v,
                            const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                            int Dv, float scale)
{
    double t = omp_get_wtime();
    inner->attention(out, q, k, v, mask, N, nH, nKV, Dh, Dv, scale);
    charge(PART_ATTENTION, t);
}

static void timed_router_topk(int32_t *ids, float *weights, float *probs, const float *logits,
                              int N, int E, int K, const struct router_params *rp)
{
    double t = omp_get_wtime();
    inner->router_topk(ids, weights, probs, logits, N, E, K, rp);
    charge(PART_ROUTER, t);
}

static void timed_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row,
                                    int32_t *row_of_slot, const int32_t *ids, int N, int K,
                                    int E)
{
    double t = omp_get_wtime();
    inner->permute_by_expert(expert_offsets, slot_of_row, row_of_slot, ids, N, K, E);
    charge(PART_DISPATCH, t);
}

static void timed_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M,
                              int K, int H)
{
    double t = omp_get_wtime();
    inner->gather_rows(xs, x, slot_of_row, M, K, H);
    charge(PART_DISPATCH, t);
}

static void timed_grouped_linear(float *y, const float *x, const float *const *w,
                                 const int32_t *offsets, int E, int I, int O)
{
    double t = omp_get_wtime();
    inner->grouped_linear(y, x, w, offsets, E, I, O);
    charge(PART_EXPERT_GEMM, t);
}

static void timed_glu(float *h, const float *gate, const float *up, size_t count,
                      enum hf_activation act)
{
    double t = omp_get_wtime();
    inner->glu(h, gate, up, count, act);
    charge(PART_GLU, t);
}

static void timed_combine(float *out, const float *ys, const float *weights,
                          const int32_t *row_of_slot, int N, int K, int H, bool accumulate)
{
    double t = omp_get_wtime();
    inner->combine(out, ys, weights, row_of_slot, N, K, H, accumulate);
    charge(PART_DISPATCH, t);
}

static void timed_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N,
                                    int H)
{
    double t = omp_get_wtime();
    inner->add_sigmoid_gated(y, s, gate_logit, N, H);
    charge(PART_OTHER, t);
}

static void timed_clamp(float *x, size_t count, float low, float high)
{
    double t = omp_get_wtime();
    inner->clamp(x, count, low, high);
    charge(PART_OTHER, t);
}

static void timed_add(float *y, const float *x, const float *r, size_t count)
{
    double t = omp_get_wtime();
    inner->add(y, x, r, count);
    charge(PART_RESIDUAL, t);
}

static double timed_cross_entropy_sum(const float *logits, const int32_t *labels, int N, int V,
                                      long long *counted)
{
    double t = omp_get_wtime();
    double sum = inner->cross_entropy_sum(logits, labels, N, V, counted);
    charge(PART_LOSS, t);
    return sum;
}

/* The op table `ops` with every op timed into part_seconds. */
static struct backend timed_backend(const struct backend *ops, const struct model_config *cfg)
{
    inner = ops;
    model_V = cfg->vocab_size;
    model_E = cfg->num_experts;
    model_H = cfg->hidden_size;
    /* every op of the inner table (memory, statistics, backward, ...), the forward's
     * compute ops replaced by their timed wrappers */
    struct backend timed = *ops;
    timed.name = "cpu (timed)";
    struct backend wrappers = {
        .embedding = timed_embedding,
        .linear = timed_linear,
        .rmsnorm = timed_rmsnorm,
        .rope = timed_rope,
        .attention = timed_attention,
        .router_topk = timed_router_topk,
        .permute_by_expert = timed_permute_by_expert,
        .gather_rows = timed_gather_rows,
        .grouped_linear = timed_grouped_linear,
        .glu = timed_glu,
        .combine = timed_combine,
        .add_sigmoid_gated = timed_add_sigmoid_gated,
        .clamp = timed_clamp,
        .add = timed_add,
        .cross_entropy_sum = timed_cross_entropy_sum,
    };
    timed.embedding = wrappers.embedding;
    timed.linear = wrappers.linear;
    timed.rmsnorm = wrappers.rmsnorm;
    timed.rope = wrappers.rope;
    timed.attention = wrappers.attention;
    timed.router_topk = wrappers.router_topk;
    timed.permute_by_expert = wrappers.permute_by_expert;
    timed.gather_rows = wrappers.gather_rows;
    timed.grouped_linear = wrappers.grouped_linear;
    timed.glu = wrappers.glu;
    timed.combine = wrappers.combine;
    timed.add_sigmoid_gated = wrappers.add_sigmoid_gated;
    timed.clamp = wrappers.clamp;
    timed.add = wrappers.add;
    timed.cross_entropy_sum = wrappers.cross_entropy_sum;
    return timed;
}

/* ---- the benchmark ---------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int int_arg(int argc, char **argv, int *i, int min)
{
    if (*i + 1 >= argc) fatal(EXIT_INPUT, "bench_forward: %s needs a value", argv[*i]);
    char *end;
    long v = strtol(argv[*i + 1], &end, 10);
    if (*end || v < min || v > 1L << 30)
        fatal(EXIT_INPUT, "bench_forward: %s %s: expected an integer >= %d", argv[*i],
              argv[*i + 1], min);
    (*i)++;
    return (int)v;
}

int main(int argc, char **argv)
{
    threads_set_wait_policy(argv); /* the wait policy esft itself runs with (threads.h) */
    MPI_Init(&argc, &argv);
    const char *dir = NULL;
    int B = 8, T = 512, iters = 5, warmup = 1, seed = 1234, breakdown = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--batch"))
            B = int_arg(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--seq"))
            T = int_arg(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--iters"))
            iters = int_arg(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = int_arg(argc, argv, &i, 0);
        else if (!strcmp(argv[i], "--seed"))
            seed = int_arg(argc, argv, &i, 0);
        else if (!strcmp(argv[i], "--breakdown"))
            breakdown = int_arg(argc, argv, &i, 0);
        else if (argv[i][0] == '-' || dir) {
            fprintf(stderr, "usage: bench_forward MODEL_DIR [--batch 8] [--seq 512] [--iters 5] "
                            "[--warmup 1] [--seed 1234] [--breakdown 1]\n");
            MPI_Finalize();
            return EXIT_INPUT;
        } else
            dir = argv[i];
    }
    if (!dir) fatal(EXIT_INPUT, "bench_forward: MODEL_DIR is required");

    char err[1024];
    struct model_config cfg;
    if (hfconfig_load(dir, &cfg, err, sizeof err) != 0) fatal(EXIT_INPUT, "%s", err);
    struct layout_grid grid = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    struct layout_coords me = {0, 0, 0};
    struct model model;
    double t_load = omp_get_wtime();
    model_create(&model, &cfg, &grid, me);
    if (model_load(&model, dir, err, sizeof err) != 0) fatal(EXIT_INPUT, "%s", err);
    t_load = omp_get_wtime() - t_load;

    int N = B * T, V = cfg.vocab_size;
    int32_t *tokens = xmalloc((size_t)N * sizeof(int32_t));
    int32_t *positions = xmalloc((size_t)N * sizeof(int32_t));
    int32_t *sample_start = xmalloc((size_t)N * sizeof(int32_t));
    int32_t *targets = xmalloc((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++)
        tokens[n] = (int32_t)(splitmix64((uint64_t)seed + (uint64_t)(n + 1) * 0x9E3779B97F4A7C15ULL) %
                              (uint64_t)V);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int n = b * T + t;
            positions[n] = t;
            sample_start[n] = b * T;
            targets[n] = t + 1 < T ? tokens[n + 1] : -100;
        }
    struct batch batch = {.N = N, .tokens = tokens, .positions = positions,
                          .sample_start = sample_start, .targets = targets};
    struct forward_workspace *ws = forward_workspace_new(&model, N);
    struct forward_result result;
    const struct backend *ops = backend_cpu();

    for (int i = 0; i < warmup; i++) model_forward(&model, ops, ws, &batch, &result);
    double *seconds = xmalloc((size_t)iters * sizeof(double));
    for (int i = 0; i < iters; i++) {
        double t = omp_get_wtime();
        model_forward(&model, ops, ws, &batch, &result);
        seconds[i] = omp_get_wtime() - t;
    }
    double loss = result.loss_count ? result.loss_sum / (double)result.loss_count : NAN;
    qsort(seconds, (size_t)iters, sizeof(double), compare_double);
    double median = iters % 2 ? seconds[iters / 2]
                              : 0.5 * (seconds[iters / 2 - 1] + seconds[iters / 2]);

    printf("implementation: esft (%s backend)\n", ops->name);
    printf("model: %s (%s, %d layers, H %d, %d experts top-%d, I %d, V %d)\n", dir,
           hfconfig_family_name(cfg.family), cfg.num_layers, cfg.hidden_size, cfg.num_experts,
           cfg.top_k, cfg.expert_intermediate_size, V);
    printf("load seconds: %.2f\n", t_load);
    printf("threads: %d\n", omp_get_max_threads());
    printf("batch: %d x %d\n", B, T);
    printf("tokens per iteration: %d\n", N);
    printf("warmup: %d\n", warmup);
    printf("iterations: %d\n", iters);
    printf("loss: %.6f\n", loss);
    printf("median seconds per iteration: %.4f\n", median);
    printf("min seconds per iteration: %.4f\n", seconds[0]);
    printf("max seconds per iteration: %.4f\n", seconds[iters - 1]);
    printf("tokens per second: %.1f\n", N / median);
    /* model FLOPs (flops.h): one causal document of T tokens per row, T + 1 = twice the
     * mean number of keys a token attends to */
    printf("model flops per iteration: %.6g\n", N * token_flops(&cfg, T + 1.0).forward);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("peak rss mib: %.1f\n", usage.ru_maxrss / 1024.0);
    printf("blas: %s\n", blas_description());
    const char *policy = getenv("OMP_WAIT_POLICY");
    printf("wait policy: %s\n", policy ? policy : "default");

    if (breakdown > 0) {
        struct backend timed = timed_backend(ops, &cfg);
        double total = omp_get_wtime();
        for (int i = 0; i < breakdown; i++) model_forward(&model, &timed, ws, &batch, &result);
        total = omp_get_wtime() - total;
        double in_ops = 0;
        for (int p = 0; p < PART_COUNT; p++) in_ops += part_seconds[p];
        printf("breakdown (%d forward pass%s, seconds per pass, share of the pass):\n", breakdown,
               breakdown > 1 ? "es" : "");
        for (int p = 0; p < PART_COUNT; p++) {
            if (!part_calls[p]) continue;
            printf("  %-16s %8.4f s %5.1f %%  (%ld calls per pass)\n", part_names[p],
                   part_seconds[p] / breakdown, 100.0 * part_seconds[p] / total,
                   part_calls[p] / breakdown);
        }
        printf("  %-16s %8.4f s %5.1f %%\n", "outside ops", (total - in_ops) / breakdown,
               100.0 * (total - in_ops) / total);
        printf("  %-16s %8.4f s\n", "total", total / breakdown);
    }

    free(seconds);
    forward_workspace_free(ws);
    model_free(&model);
    free(tokens);
    free(positions);
    free(sample_start);
    free(targets);
    MPI_Finalize();
    return 0;
}
