/* devsim: the device simulator backend, and the choice of backend by name.
 *
 * The simulator runs the CPU backend's ops, but its buffers are handed out under
 * addresses the host cannot dereference: bit 62 of each address is flipped, which makes
 * it non-canonical on x86-64 (and outside any mapping elsewhere), so a host read or write
 * of a "device" buffer ends the process with SIGSEGV instead of quietly working as it
 * would on the CPU backend and failing on the first GPU. Only the wrappers below and the
 * transfers take the tag off. The wrappers also refuse a host pointer where a buffer is
 * expected, the other half of the same mistake.
 *
 * Results are the CPU backend's bit for bit: the same functions run on the same values. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "deck.h"
#include "log.h"
#include "phases.h"
#ifdef HAVE_CUDA
#include "cuda_ops.h"
#include "device.h"
#endif

#define DEVSIM_TAG (UINT64_C(1) << 62)

static const struct backend *cpu;

/* Each buffer starts with its size, so that release can count it off. */
struct devsim_header {
    size_t bytes;
    size_t pad; /* keeps the buffer 16-byte aligned */
};

static size_t devsim_in_use, devsim_peak;
static struct backend_traffic traffic;

static void *tag(void *p)
{
    return p ? (void *)((uintptr_t)p ^ DEVSIM_TAG) : NULL;
}

/* The host address of a buffer (NULL stays NULL); a pointer without the tag is a host
 * pointer handed to a device op: a bug the GPU would meet as an illegal address. */
static void *host_of(const void *p, const char *op)
{
    if (!p) return NULL;
    if (!((uintptr_t)p & DEVSIM_TAG))
        fatal(EXIT_RUNTIME, "device simulator: %s was given host memory %p where a device "
              "buffer belongs", op, p);
    return (void *)((uintptr_t)p ^ DEVSIM_TAG);
}

#define U(p) host_of((p), __func__)

void backend_count_upload(size_t bytes)
{
    traffic.uploads++;
    traffic.upload_bytes += (double)bytes;
}

void backend_count_download(size_t bytes)
{
    traffic.downloads++;
    traffic.download_bytes += (double)bytes;
}

struct backend_traffic backend_traffic(void)
{
    return traffic;
}

/* ---- memory ------------------------------------------------------------------------ */

static void *sim_alloc(size_t bytes)
{
    struct devsim_header *h = xcalloc(1, sizeof *h + (bytes ? bytes : 1));
    h->bytes = bytes;
    devsim_in_use += bytes;
    if (devsim_in_use > devsim_peak) devsim_peak = devsim_in_use;
    return tag(h + 1);
}

static void sim_release(void *p)
{
    if (!p) return;
    struct devsim_header *h = (struct devsim_header *)U(p) - 1;
    devsim_in_use -= h->bytes;
    free(h);
}

static void sim_upload(void *dst, const void *host_src, size_t bytes)
{
    if (bytes) memcpy(U(dst), host_src, bytes);
    backend_count_upload(bytes);
}

static void sim_download(void *host_dst, const void *src, size_t bytes)
{
    if (bytes) memcpy(host_dst, U(src), bytes);
    backend_count_download(bytes);
}

static void sim_copy(void *dst, const void *src, size_t bytes)
{
    if (bytes) memmove(U(dst), U(src), bytes);
}

static void sim_zero(void *p, size_t bytes)
{
    if (bytes) memset(U(p), 0, bytes);
}

static void sim_reserve(size_t tokens, size_t rows)
{
    cpu->reserve(tokens, rows);
}

static void sim_memory(size_t *in_use, size_t *peak)
{
    *in_use = devsim_in_use;
    *peak = devsim_peak;
}

/* ---- the ops: untag, then the CPU's ------------------------------------------------ */

static void sim_embedding(float *x, const int32_t *tokens, const float *table, int N, int H)
{
    cpu->embedding(U(x), U(tokens), U(table), N, H);
}

static void sim_linear(float *y, const float *x, const float *w, const float *bias, int N, int I,
                       int O, bool accumulate)
{
    cpu->linear(U(y), U(x), U(w), U(bias), N, I, O, accumulate);
}

static void sim_rmsnorm(float *y, float *rstd, const float *x, const float *w, int R, int D,
                        float eps)
{
    cpu->rmsnorm(U(y), U(rstd), U(x), U(w), R, D, eps);
}

static void sim_rope(float *x, const int32_t *positions, const float *inv_freq,
                     float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                     enum hf_rope_layout layout)
{
    cpu->rope(U(x), U(positions), U(inv_freq), attention_scaling, N, n_heads, Dh, rotary_dim,
              layout);
}

static void sim_attention(float *out, const float *q, const float *k, const float *v,
                          const struct attention_mask *mask, int N, int nH, int nKV, int Dh,
                          int Dv, float scale)
{
    struct attention_mask host = {.sample_start = U(mask->sample_start),
                                  .window = mask->window,
                                  .sinks = U(mask->sinks),
                                  .dsinks = U(mask->dsinks),
                                  .lse = U(mask->lse)};
    cpu->attention(U(out), U(q), U(k), U(v), &host, N, nH, nKV, Dh, Dv, scale);
}

static void sim_copy_columns(float *dst, int dst_ld, const float *src, int src_ld, int rows,
                             int cols, bool accumulate)
{
    cpu->copy_columns(U(dst), dst_ld, U(src), src_ld, rows, cols, accumulate);
}

static void sim_router_topk(int32_t *ids, float *weights, float *probs, const float *logits, int N,
                            int E, int K, const struct router_params *rp)
{
    struct router_params host = *rp;
    host.bias = U(rp->bias);
    host.collaborators = U(rp->collaborators);
    cpu->router_topk(U(ids), U(weights), U(probs), U(logits), N, E, K, &host);
}

static void sim_router_balance_stats(float *counts, float *prob_sums, const float *probs,
                                     const int32_t *ids, int N, int E, int K)
{
    cpu->router_balance_stats(U(counts), U(prob_sums), U(probs), U(ids), N, E, K);
}

static void sim_permute_by_expert(int32_t *expert_offsets, int32_t *slot_of_row,
                                  int32_t *row_of_slot, const int32_t *ids, int N, int K, int E)
{
    cpu->permute_by_expert(U(expert_offsets), U(slot_of_row), U(row_of_slot), U(ids), N, K, E);
}

static void sim_gather_rows(float *xs, const float *x, const int32_t *slot_of_row, int M, int K,
                            int H)
{
    cpu->gather_rows(U(xs), U(x), U(slot_of_row), M, K, H);
}

/* The host addresses of a host array of E expert weights (their bf16 bit kept), in a
 * buffer kept for the next call. */
static const float **host_weights(const float *const *w, int E, const char *op)
{
    static struct kept kept;
    const float **host = kept_buffer(&kept, (size_t)(E > 0 ? E : 1) * sizeof *host);
    for (int e = 0; e < E; e++) host[e] = host_of(w[e], op);
    return host;
}

static void sim_grouped_linear(float *y, const float *x, const float *const *w,
                               const int32_t *offsets, int E, int I, int O)
{
    const float **host_w = host_weights(w, E, __func__);
    cpu->grouped_linear(U(y), U(x), host_w, U(offsets), E, I, O);
}

static void sim_grouped_bias(float *y, const float *bias, const int32_t *offsets, int E, int O)
{
    cpu->grouped_bias(U(y), U(bias), U(offsets), E, O);
}

static void sim_glu(float *h, const float *gate, const float *up, size_t count,
                    enum hf_activation act)
{
    cpu->glu(U(h), U(gate), U(up), count, act);
}

static void sim_glu_clamped(float *h, const float *gate, const float *up, size_t count,
                            float alpha, float limit)
{
    cpu->glu_clamped(U(h), U(gate), U(up), count, alpha, limit);
}

static void sim_combine(float *out, const float *ys, const float *weights,
                        const int32_t *row_of_slot, int N, int K, int H, bool accumulate)
{
    cpu->combine(U(out), U(ys), U(weights), U(row_of_slot), N, K, H, accumulate);
}

static void sim_add_sigmoid_gated(float *y, const float *s, const float *gate_logit, int N, int H)
{
    cpu->add_sigmoid_gated(U(y), U(s), U(gate_logit), N, H);
}

static void sim_clamp(float *x, size_t count, float low, float high)
{
    cpu->clamp(U(x), count, low, high);
}

static void sim_add(float *y, const float *x, const float *r, size_t count)
{
    cpu->add(U(y), U(x), U(r), count);
}

static double sim_cross_entropy_sum(const float *logits, const int32_t *labels, int N, int V,
                                    long long *counted)
{
    backend_count_download(sizeof(double) + sizeof(long long)); /* the sum comes back */
    return cpu->cross_entropy_sum(U(logits), U(labels), N, V, counted);
}

static void sim_linear_backward(float *dx, float *dw, float *dbias, const float *dy,
                                const float *x, const float *w, int N, int I, int O,
                                bool accumulate_dx)
{
    cpu->linear_backward(U(dx), U(dw), U(dbias), U(dy), U(x), U(w), N, I, O, accumulate_dx);
}

static void sim_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                 const float *w, const float *rstd, int R, int D,
                                 bool accumulate_dx)
{
    cpu->rmsnorm_backward(U(dx), U(dw), U(dy), U(x), U(w), U(rstd), R, D, accumulate_dx);
}

static void sim_rope_backward(float *dx, const int32_t *positions, const float *inv_freq,
                              float attention_scaling, int N, int n_heads, int Dh, int rotary_dim,
                              enum hf_rope_layout layout)
{
    cpu->rope_backward(U(dx), U(positions), U(inv_freq), attention_scaling, N, n_heads, Dh,
                       rotary_dim, layout);
}

static void sim_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v,
                                   const float *out, const struct attention_mask *mask, int N,
                                   int nH, int nKV, int Dh, int Dv, float scale)
{
    struct attention_mask host = {.sample_start = U(mask->sample_start),
                                  .window = mask->window,
                                  .sinks = U(mask->sinks),
                                  .dsinks = U(mask->dsinks),
                                  .lse = U(mask->lse)};
    cpu->attention_backward(U(dq), U(dk), U(dv), U(dout), U(q), U(k), U(v), U(out), &host, N, nH,
                            nKV, Dh, Dv, scale);
}

static void sim_router_topk_backward(float *dlogits, const float *dweights, const float *probs,
                                     const int32_t *ids, int N, int E, int K,
                                     const struct router_params *rp)
{
    struct router_params host = *rp;
    host.bias = U(rp->bias);
    cpu->router_topk_backward(U(dlogits), U(dweights), U(probs), U(ids), N, E, K, &host);
}

static void sim_router_dense_backward(float *dlogits, const float *dots, const float *probs,
                                      const int32_t *ids, int N, int E, int K,
                                      const struct router_params *rp)
{
    struct router_params host = *rp;
    host.bias = U(rp->bias);
    cpu->router_dense_backward(U(dlogits), U(dots), U(probs), U(ids), N, E, K, &host);
}

static void sim_row_dots(float *out, int out_ld, const float *x, const float *y, int N, int H)
{
    cpu->row_dots(U(out), out_ld, U(x), U(y), N, H);
}

static void sim_router_balance_backward(float *dlogits, const float *probs, const float *coef,
                                        int N, int E)
{
    cpu->router_balance_backward(U(dlogits), U(probs), U(coef), N, E);
}

static void sim_grouped_linear_backward(float *dx, float *const *dw, const float *dy,
                                        const float *x, const float *const *w,
                                        const int32_t *offsets, int E, int I, int O)
{
    /* dw is a host array of buffers (one per expert, NULL when frozen), w one of weights */
    static struct kept kept;
    float **host_dw = kept_buffer(&kept, (size_t)(E > 0 ? E : 1) * sizeof *host_dw);
    for (int e = 0; e < E; e++) host_dw[e] = dw ? U(dw[e]) : NULL;
    const float **host_w = host_weights(w, E, __func__);
    cpu->grouped_linear_backward(U(dx), dw ? host_dw : NULL, U(dy), U(x), host_w, U(offsets), E,
                                 I, O);
}

static void sim_grouped_bias_backward(float *const *dbias, const float *dy,
                                      const int32_t *offsets, int E, int O)
{
    /* dbias is a host array of buffers (one per expert, NULL when frozen) */
    static struct kept kept;
    float **host_dbias = kept_buffer(&kept, (size_t)(E > 0 ? E : 1) * sizeof *host_dbias);
    for (int e = 0; e < E; e++) host_dbias[e] = U(dbias[e]);
    cpu->grouped_bias_backward(host_dbias, U(dy), U(offsets), E, O);
}

static void sim_glu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                             const float *up, size_t count, enum hf_activation act)
{
    cpu->glu_backward(U(dgate), U(dup), U(dh), U(gate), U(up), count, act);
}

static void sim_glu_clamped_backward(float *dgate, float *dup, const float *dh, const float *gate,
                                     const float *up, size_t count, float alpha, float limit)
{
    cpu->glu_clamped_backward(U(dgate), U(dup), U(dh), U(gate), U(up), count, alpha, limit);
}

static void sim_combine_backward(float *dys, float *dweights, const float *dout, const float *ys,
                                 const float *weights, const int32_t *row_of_slot, int N, int K,
                                 int H)
{
    cpu->combine_backward(U(dys), U(dweights), U(dout), U(ys), U(weights), U(row_of_slot), N, K, H);
}

static void sim_gather_rows_backward(float *dx, const float *dxs, const int32_t *row_of_slot, int N,
                                     int K, int H, bool accumulate)
{
    cpu->gather_rows_backward(U(dx), U(dxs), U(row_of_slot), N, K, H, accumulate);
}

static void sim_add_sigmoid_gated_backward(float *ds, float *dgate_logit, const float *dy,
                                           const float *s, const float *gate_logit, int N, int H)
{
    cpu->add_sigmoid_gated_backward(U(ds), U(dgate_logit), U(dy), U(s), U(gate_logit), N, H);
}

static void sim_clamp_backward(float *dx, const float *y, size_t count, float low, float high)
{
    cpu->clamp_backward(U(dx), U(y), count, low, high);
}

static void sim_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *labels,
                                       int N, int V, float scale)
{
    cpu->cross_entropy_backward(U(dlogits), U(logits), U(labels), N, V, scale);
}

static double sim_cross_entropy_rows(float *logits, const int32_t *labels, int N, int V,
                                     float scale, long long *counted, long long *correct)
{
    return cpu->cross_entropy_rows(U(logits), U(labels), N, V, scale, counted, correct);
}

static void sim_ce_chunk_update(float *state, int32_t *best, const float *logits,
                                const int32_t *labels, int N, int C, int v0)
{
    cpu->ce_chunk_update(U(state), U(best), U(logits), U(labels), N, C, v0);
}

static double sim_ce_chunk_finish(const float *state, const int32_t *best, const int32_t *labels,
                                  int N, long long *counted, long long *correct)
{
    /* the sum and both counts come back */
    backend_count_download(sizeof(double) + 2 * sizeof(long long));
    return cpu->ce_chunk_finish(U(state), U(best), U(labels), N, counted, correct);
}

static void sim_ce_chunk_backward(float *dlogits, const float *logits, const float *state,
                                  const int32_t *labels, int N, int C, int v0, float scale)
{
    cpu->ce_chunk_backward(U(dlogits), U(logits), U(state), U(labels), N, C, v0, scale);
}

static void sim_embedding_backward(float *dtable, const float *dx, const int32_t *tokens, int N,
                                   int H)
{
    cpu->embedding_backward(U(dtable), U(dx), U(tokens), N, H);
}

static void sim_adamw(float *data, float *m, float *v, const float *grad, size_t n,
                      const struct adamw_coef *coef)
{
    cpu->adamw(U(data), U(m), U(v), U(grad), n, coef);
}

static double sim_sum_squares(const float *x, size_t n)
{
    backend_count_download(sizeof(double));
    return cpu->sum_squares(U(x), n);
}

static void sim_scale(float *x, size_t n, float factor)
{
    cpu->scale(U(x), n, factor);
}

static long long sim_count_correct(const float *logits, const int32_t *labels, int N, int V)
{
    backend_count_download(sizeof(long long));
    return cpu->count_correct(U(logits), U(labels), N, V);
}

const struct backend *backend_devsim(void)
{
    cpu = backend_cpu();
    static const struct backend sim = {
        .name = "cpu-devsim",
        .embedding = sim_embedding,
        .linear = sim_linear,
        .rmsnorm = sim_rmsnorm,
        .rope = sim_rope,
        .attention = sim_attention,
        .copy_columns = sim_copy_columns,
        .router_topk = sim_router_topk,
        .router_balance_stats = sim_router_balance_stats,
        .permute_by_expert = sim_permute_by_expert,
        .gather_rows = sim_gather_rows,
        .grouped_linear = sim_grouped_linear,
        .grouped_bias = sim_grouped_bias,
        .glu = sim_glu,
        .glu_clamped = sim_glu_clamped,
        .combine = sim_combine,
        .add_sigmoid_gated = sim_add_sigmoid_gated,
        .clamp = sim_clamp,
        .add = sim_add,
        .cross_entropy_sum = sim_cross_entropy_sum,
        .linear_backward = sim_linear_backward,
        .rmsnorm_backward = sim_rmsnorm_backward,
        .rope_backward = sim_rope_backward,
        .attention_backward = sim_attention_backward,
        .router_topk_backward = sim_router_topk_backward,
        .router_balance_backward = sim_router_balance_backward,
        .router_dense_backward = sim_router_dense_backward,
        .grouped_linear_backward = sim_grouped_linear_backward,
        .grouped_bias_backward = sim_grouped_bias_backward,
        .glu_backward = sim_glu_backward,
        .glu_clamped_backward = sim_glu_clamped_backward,
        .combine_backward = sim_combine_backward,
        .gather_rows_backward = sim_gather_rows_backward,
        .row_dots = sim_row_dots,
        .add_sigmoid_gated_backward = sim_add_sigmoid_gated_backward,
        .clamp_backward = sim_clamp_backward,
        .cross_entropy_backward = sim_cross_entropy_backward,
        .cross_entropy_rows = sim_cross_entropy_rows,
        .ce_chunk_update = sim_ce_chunk_update,
        .ce_chunk_finish = sim_ce_chunk_finish,
        .ce_chunk_backward = sim_ce_chunk_backward,
        .embedding_backward = sim_embedding_backward,
        .adamw = sim_adamw,
        .sum_squares = sim_sum_squares,
        .scale = sim_scale,
        .count_correct = sim_count_correct,
        .host_visible = false,
        .reserve = sim_reserve,
        .alloc = sim_alloc,
        .release = sim_release,
        .upload = sim_upload,
        .download = sim_download,
        .copy = sim_copy,
        .zero = sim_zero,
        .memory = sim_memory,
    };
    return &sim;
}

const struct backend *backend_named(const char *name, char *err, size_t err_size)
{
    if (!name || strcmp(name, "cpu") == 0 || strcmp(name, "auto") == 0) return backend_cpu();
    if (strcmp(name, "cpu-devsim") == 0) return backend_devsim();
    if (strcmp(name, "cuda") == 0) {
#ifdef HAVE_CUDA
        /* one GPU per rank of a node: the launcher's local rank picks it */
        const char *names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID",
                               "PMI_LOCAL_RANK"};
        int local_rank = 0;
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (getenv(names[i])) {
                local_rank = atoi(getenv(names[i]));
                break;
            }
        if (device_select(local_rank, err, err_size) < 0) return NULL;
        return backend_cuda();
#else
        snprintf(err, err_size, "run.backend: cuda: this esft was built without CUDA "
                 "(configure found no CUDA toolkit, or --without-cuda)");
        return NULL;
#endif
    }
    snprintf(err, err_size, "run.backend: unknown backend '%s' (cpu, cpu-devsim, cuda)", name);
    return NULL;
}

const struct backend *phase_backend(const struct deck *deck, const char *phase)
{
    char err[512];
    const struct backend *ops = backend_named(deck_backend_name(deck->run.backend), err, sizeof err);
    fail_if_any(!ops, EXIT_INPUT, "%s: %s", phase, err);
#ifdef HAVE_CUDA
    if (deck->run.backend == BACKEND_CUDA) {
        /* bf16: the frozen weights' GEMMs on bf16 operands, the rest on TF32 */
        bool bf16 = deck->model.dtype == DTYPE_BF16;
        backend_cuda_set_tf32(bf16 || deck->model.dtype == DTYPE_TF32);
        backend_cuda_set_bf16(bf16);
    }
#endif
    log_info("%s: backend %s%s", phase, ops->name,
             deck->model.dtype == DTYPE_TF32   ? " (tf32)"
             : deck->model.dtype == DTYPE_BF16 ? " (bf16 frozen weights, tf32)"
                                               : "");
    return ops;
}
